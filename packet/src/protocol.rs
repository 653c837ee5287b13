//! Client↔gateway control messages, each carried in one fixed-size control frame.
//!
//! Every message is a type byte and fixed big-endian fields, zero-padded by
//! [`Frame::control`] to the one frame size every link uses. Decoding takes the whole
//! padded body and insists the padding is zero, so each message has exactly one
//! encoding (decode → encode is the identity).
//!
//! ```text
//! client → gateway
//!   Pull            | 01 | n: u16 | id: u64 × n |                 n ≤ MAX_ACK_IDS
//!   Ack             | 02 | n: u16 | id: u64 × n |   (older clients; see below)
//!   GetDirectory    | 03 |
//!   AdminChunk      | 04 | index: u16 | count: u16 | len: u16 | bytes: len |
//! gateway → client
//!   Item            | 81 | id: u64 | surb_id: 16 | payload: 2048 |
//!   Dummy           | 82 | zeros to the length of an Item |
//!   PullDone        | 83 | more: u8 (0 or 1) |
//!   DirectoryChunk  | 84 | index: u16 | count: u16 | len: u16 | bytes: len |
//!   Error           | 85 | code: u16 | len: u8 | UTF-8 message: len |
//!   AdminResult     | 86 | code: u16 | len: u8 | UTF-8 message: len |   code 0 = applied
//!   AdminReport     | 87 | index: u16 | count: u16 | len: u16 | bytes: len |
//! ```
//! `AdminChunk`s carry one admin-signed subnet command (its JSON text, split like a
//! directory document) on a link authenticated by a hosted subnet's admin key; the
//! gateway answers the whole command with one `AdminResult`, sent only after the change
//! is durable (or with the refusal's cause). A read-only command (account usage) is
//! answered with its report in `AdminReport` chunks, then the `AdminResult`.
//! A pull is answered with exactly `pull_batch` Item-or-Dummy frames and one PullDone,
//! whatever the mailbox holds, a fixed delay after the pull arrived. PullDone carries
//! one bit ("more items are waiting"), never a count.
//!
//! **Acks ride in the pull.** A `Pull` carries the ids of items the client has made
//! durable since its last pull (as many as fit one frame; the rest wait for the next
//! pull), so the client sends exactly one frame per pull tick and nothing on the
//! client link happens off its schedule. A `Pull` from an older client (type byte,
//! then zero padding) decodes as a pull that acks nothing. The separate `Ack` message
//! is still decoded for older clients (and the client's `legacy_leaks` test switch);
//! current clients never send it.
//!
//! Sphinx frames (packets entering the mixnet) share the link but are not control
//! messages; the driver hands them to the mixing core.

use crate::sphinx::SurbId;
use crate::{Frame, FrameKind, PacketError, SPHINX_PACKET_SIZE, SPHINX_PAYLOAD_SIZE};

/// What can be wrong with a control message. Messages name the message and field,
/// never the bytes: they are peer data and must not reach logs.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProtocolError {
    /// A control message ended before one of its fields. Peer misbehaviour.
    #[error("{what}: truncated, needed {need} bytes, had {got}")]
    Truncated {
        what: &'static str,
        need: usize,
        got: usize,
    },
    /// A length (of a message, list or string) exceeds what the format allows.
    #[error("{what}: length {len} exceeds the maximum of {max}")]
    TooLong {
        what: &'static str,
        len: usize,
        max: usize,
    },
    /// A field held a value the format does not allow. Peer misbehaviour.
    #[error("{what}: invalid value {value}")]
    Field { what: &'static str, value: u64 },
    /// Bytes after the end of a control message were not zero padding.
    #[error("{what}: non-zero bytes after the message")]
    TrailingBytes { what: &'static str },
    /// A Sphinx frame was handed to the control-message decoder.
    #[error("expected a control frame")]
    NotControl,
    /// Building or checking a frame failed.
    #[error("frame: {0}")]
    Frame(PacketError),
    /// A bug in this module, not the peer's fault.
    #[error("internal error: {0}")]
    Internal(&'static str),
}

/// Bytes available for a control message: the body of one frame.
pub const CONTROL_BODY_SIZE: usize = SPHINX_PACKET_SIZE;
/// Ack ids one `Pull` (or `Ack`) message can carry.
pub const MAX_ACK_IDS: usize = (CONTROL_BODY_SIZE - 3) / 8;
/// Bytes of directory one `DirectoryChunk` carries at most.
pub const MAX_CHUNK_BYTES: usize = CONTROL_BODY_SIZE - 7;
/// Bytes of an `Error` message's text at most.
pub const MAX_ERROR_MESSAGE: usize = 200;
/// Encoded length of an `Item` (and of a `Dummy`, which pads itself to match).
pub const ITEM_BODY_SIZE: usize = 1 + 8 + 16 + SPHINX_PAYLOAD_SIZE;
const _: () = assert!(ITEM_BODY_SIZE <= CONTROL_BODY_SIZE && MAX_ACK_IDS < u16::MAX as usize);

const T_PULL: u8 = 0x01;
const T_ACK: u8 = 0x02;
const T_GET_DIRECTORY: u8 = 0x03;
const T_ADMIN_CHUNK: u8 = 0x04;
const T_ITEM: u8 = 0x81;
const T_DUMMY: u8 = 0x82;
const T_PULL_DONE: u8 = 0x83;
const T_DIRECTORY_CHUNK: u8 = 0x84;
const T_ERROR: u8 = 0x85;
const T_ADMIN_RESULT: u8 = 0x86;
const T_ADMIN_REPORT: u8 = 0x87;
/// Chunks one admin command may span at most (about 150 KB: a policy with thousands of
/// revocations still fits).
pub const MAX_ADMIN_CHUNKS: u16 = 64;

/// A message from a client to its gateway.
#[derive(Clone, PartialEq, Eq)]
pub enum ClientMsg {
    /// Delete the items `acks` (durable at the client now), then send the next batch
    /// of mailbox items.
    Pull { acks: Vec<u64> },
    /// These items arrived; delete them. Older clients only: current ones put their
    /// acks in the next `Pull`.
    Ack { ids: Vec<u64> },
    /// Send the current signed directory.
    GetDirectory,
    /// Part `index` of `count` of one admin-signed command (admin links only).
    AdminChunk {
        index: u16,
        count: u16,
        bytes: Vec<u8>,
    },
}

impl std::fmt::Debug for ClientMsg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            // Item ids are per-mailbox traffic data: show only how many.
            ClientMsg::Pull { acks } => write!(f, "Pull({} acks)", acks.len()),
            ClientMsg::Ack { ids } => write!(f, "Ack({} ids)", ids.len()),
            ClientMsg::GetDirectory => f.write_str("GetDirectory"),
            // Commands name accounts and mailboxes: show only the framing.
            ClientMsg::AdminChunk {
                index,
                count,
                bytes,
            } => write!(f, "AdminChunk({index}/{count}, {} bytes)", bytes.len()),
        }
    }
}

/// Why the gateway refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// The peer key is not a registered account.
    Unauthenticated,
    /// The request could not be decoded.
    Malformed,
    /// The gateway is shedding load; retry later.
    Overloaded,
    /// The requested thing (e.g. a directory) is not available yet.
    Unavailable,
    /// The gateway hit a fault of its own.
    Internal,
    /// The account sent Sphinx frames far faster than the network's client rates; its
    /// links are closed and new ones refused for a while.
    RateLimited,
    /// A code this version does not know.
    Other(u16),
}

impl ErrorCode {
    pub fn to_u16(self) -> u16 {
        match self {
            ErrorCode::Unauthenticated => 1,
            ErrorCode::Malformed => 2,
            ErrorCode::Overloaded => 3,
            ErrorCode::Unavailable => 4,
            ErrorCode::Internal => 5,
            ErrorCode::RateLimited => 6,
            ErrorCode::Other(c) => c,
        }
    }

    pub fn from_u16(c: u16) -> Self {
        match c {
            1 => ErrorCode::Unauthenticated,
            2 => ErrorCode::Malformed,
            3 => ErrorCode::Overloaded,
            4 => ErrorCode::Unavailable,
            5 => ErrorCode::Internal,
            6 => ErrorCode::RateLimited,
            other => ErrorCode::Other(other),
        }
    }
}

/// A message from a gateway to one of its clients.
#[derive(Clone, PartialEq, Eq)]
pub enum GatewayMsg {
    /// One stored mailbox packet, exactly as it left the exit hop.
    Item {
        id: u64,
        surb_id: SurbId,
        payload: Box<[u8; SPHINX_PAYLOAD_SIZE]>,
    },
    /// Padding in a pull answer; the client ignores it.
    Dummy,
    /// The end of a pull answer. `more`: further items are waiting.
    PullDone { more: bool },
    /// Part `index` of `count` of the signed directory document.
    DirectoryChunk {
        index: u16,
        count: u16,
        bytes: Vec<u8>,
    },
    /// A refusal. `message` is short and never contains user data.
    Error { code: ErrorCode, message: String },
    /// The outcome of one admin command: `None` = applied and durable. `message` is
    /// short and never contains keys or mailbox addresses.
    AdminResult {
        refusal: Option<AdminRefusal>,
        message: String,
    },
    /// Part `index` of `count` of the answer to a read-only admin command (a usage
    /// report), sent before its `AdminResult`.
    AdminReport {
        index: u16,
        count: u16,
        bytes: Vec<u8>,
    },
}

/// Why a gateway refused an admin command. Nothing changed at the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AdminRefusal {
    /// The command (or the policy it carries) is not validly signed by its subnet's admin.
    BadSignature,
    /// The command's subnet is not hosted here.
    UnknownSubnet,
    /// The command names another gateway.
    WrongGateway,
    /// The command has expired.
    Expired,
    /// Its sequence number is not above the last one accepted from its subnet.
    Replayed,
    /// The command's bytes do not parse, or its chunks do not assemble.
    Malformed,
    /// Signed and fresh, but not applicable (unknown or foreign account, account or
    /// mailbox taken, policy not newer than the one held, ...).
    Rejected,
    /// The link key is not the admin key of a subnet hosted here.
    NotAdmin,
    /// The gateway could not make the change durable.
    Internal,
    /// A code this version does not know.
    Other(u16),
}

impl AdminRefusal {
    /// Every cause this version sends, in metrics order.
    pub const ALL: [AdminRefusal; 9] = [
        AdminRefusal::BadSignature,
        AdminRefusal::UnknownSubnet,
        AdminRefusal::WrongGateway,
        AdminRefusal::Expired,
        AdminRefusal::Replayed,
        AdminRefusal::Malformed,
        AdminRefusal::Rejected,
        AdminRefusal::NotAdmin,
        AdminRefusal::Internal,
    ];

    pub fn to_u16(self) -> u16 {
        match self {
            AdminRefusal::BadSignature => 1,
            AdminRefusal::UnknownSubnet => 2,
            AdminRefusal::WrongGateway => 3,
            AdminRefusal::Expired => 4,
            AdminRefusal::Replayed => 5,
            AdminRefusal::Malformed => 6,
            AdminRefusal::Rejected => 7,
            AdminRefusal::NotAdmin => 8,
            AdminRefusal::Internal => 9,
            AdminRefusal::Other(c) => c,
        }
    }

    /// `None` for 0 (applied).
    pub fn from_u16(c: u16) -> Option<Self> {
        Some(match c {
            0 => return None,
            1 => AdminRefusal::BadSignature,
            2 => AdminRefusal::UnknownSubnet,
            3 => AdminRefusal::WrongGateway,
            4 => AdminRefusal::Expired,
            5 => AdminRefusal::Replayed,
            6 => AdminRefusal::Malformed,
            7 => AdminRefusal::Rejected,
            8 => AdminRefusal::NotAdmin,
            9 => AdminRefusal::Internal,
            other => AdminRefusal::Other(other),
        })
    }

    /// The `/metrics` label.
    pub fn label(self) -> &'static str {
        match self {
            AdminRefusal::BadSignature => "bad_signature",
            AdminRefusal::UnknownSubnet => "unknown_subnet",
            AdminRefusal::WrongGateway => "wrong_gateway",
            AdminRefusal::Expired => "expired",
            AdminRefusal::Replayed => "replayed",
            AdminRefusal::Malformed => "malformed",
            AdminRefusal::Rejected => "rejected",
            AdminRefusal::NotAdmin => "not_admin",
            AdminRefusal::Internal => "internal",
            AdminRefusal::Other(_) => "other",
        }
    }
}

impl std::fmt::Display for AdminRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

impl std::fmt::Debug for GatewayMsg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            // Payloads and their identifiers are user data.
            GatewayMsg::Item { .. } => f.write_str("Item(..)"),
            GatewayMsg::Dummy => f.write_str("Dummy"),
            GatewayMsg::PullDone { more } => {
                f.debug_struct("PullDone").field("more", more).finish()
            }
            GatewayMsg::DirectoryChunk {
                index,
                count,
                bytes,
            } => f
                .debug_struct("DirectoryChunk")
                .field("index", index)
                .field("count", count)
                .field("len", &bytes.len())
                .finish(),
            GatewayMsg::Error { code, message } => f
                .debug_struct("Error")
                .field("code", code)
                .field("message", message)
                .finish(),
            GatewayMsg::AdminResult { refusal, message } => f
                .debug_struct("AdminResult")
                .field("refusal", refusal)
                .field("message", message)
                .finish(),
            GatewayMsg::AdminReport {
                index,
                count,
                bytes,
            } => f
                .debug_struct("AdminReport")
                .field("index", index)
                .field("count", count)
                .field("len", &bytes.len())
                .finish(),
        }
    }
}

/// Reads fixed fields from a control body, naming the message in every error.
struct Reader<'a> {
    what: &'static str,
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(what: &'static str, buf: &'a [u8]) -> Self {
        Reader { what, buf, pos: 1 }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtocolError> {
        let end = self
            .pos
            .checked_add(n)
            .ok_or(ProtocolError::Internal("reader overflow"))?;
        let got = self
            .buf
            .get(self.pos..end)
            .ok_or(ProtocolError::Truncated {
                what: self.what,
                need: end,
                got: self.buf.len(),
            })?;
        self.pos = end;
        Ok(got)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], ProtocolError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, ProtocolError> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, ProtocolError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, ProtocolError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    /// The rest must be zero padding.
    fn finish(self) -> Result<(), ProtocolError> {
        if self.buf[self.pos.min(self.buf.len())..]
            .iter()
            .any(|b| *b != 0)
        {
            return Err(ProtocolError::TrailingBytes { what: self.what });
        }
        Ok(())
    }
}

fn check_body_len(body: &[u8]) -> Result<u8, ProtocolError> {
    if body.len() > CONTROL_BODY_SIZE {
        return Err(ProtocolError::TooLong {
            what: "control body",
            len: body.len(),
            max: CONTROL_BODY_SIZE,
        });
    }
    body.first().copied().ok_or(ProtocolError::Truncated {
        what: "control body",
        need: 1,
        got: 0,
    })
}

fn to_frame(body: &[u8]) -> Result<Frame, ProtocolError> {
    Frame::control(body).map_err(ProtocolError::Frame)
}

fn control_body(frame: &Frame) -> Result<&[u8], ProtocolError> {
    if frame.kind() != FrameKind::Control {
        return Err(ProtocolError::NotControl);
    }
    Ok(frame.body())
}

impl ClientMsg {
    /// The unpadded body.
    pub fn encode(&self) -> Result<Vec<u8>, ProtocolError> {
        Ok(match self {
            ClientMsg::Pull { acks } => encode_ids(T_PULL, "pull acks", acks)?,
            ClientMsg::GetDirectory => vec![T_GET_DIRECTORY],
            ClientMsg::AdminChunk {
                index,
                count,
                bytes,
            } => encode_chunk(T_ADMIN_CHUNK, "admin chunk", *index, *count, bytes)?,
            ClientMsg::Ack { ids } => encode_ids(T_ACK, "ack ids", ids)?,
        })
    }

    pub fn to_frame(&self) -> Result<Frame, ProtocolError> {
        to_frame(&self.encode()?)
    }

    /// Decodes a (possibly zero-padded) control body. Never panics.
    pub fn decode(body: &[u8]) -> Result<Self, ProtocolError> {
        let msg = match check_body_len(body)? {
            T_PULL => ClientMsg::Pull {
                acks: decode_ids("pull", body)?,
            },
            T_GET_DIRECTORY => {
                Reader::new("get directory", body).finish()?;
                ClientMsg::GetDirectory
            }
            T_ACK => ClientMsg::Ack {
                ids: decode_ids("ack", body)?,
            },
            T_ADMIN_CHUNK => {
                let (index, count, bytes) = decode_chunk("admin chunk", body)?;
                ClientMsg::AdminChunk {
                    index,
                    count,
                    bytes,
                }
            }
            other => {
                return Err(ProtocolError::Field {
                    what: "client message type",
                    value: other.into(),
                });
            }
        };
        Ok(msg)
    }

    pub fn from_frame(frame: &Frame) -> Result<Self, ProtocolError> {
        Self::decode(control_body(frame)?)
    }
}

impl GatewayMsg {
    /// The unpadded body.
    pub fn encode(&self) -> Result<Vec<u8>, ProtocolError> {
        Ok(match self {
            GatewayMsg::Item {
                id,
                surb_id,
                payload,
            } => {
                let mut out = Vec::with_capacity(ITEM_BODY_SIZE);
                out.push(T_ITEM);
                out.extend_from_slice(&id.to_be_bytes());
                out.extend_from_slice(surb_id);
                out.extend_from_slice(&payload[..]);
                out
            }
            GatewayMsg::Dummy => {
                // As long as an Item even before frame padding, so no layer can tell them apart by size.
                let mut out = vec![0u8; ITEM_BODY_SIZE];
                out[0] = T_DUMMY;
                out
            }
            GatewayMsg::PullDone { more } => vec![T_PULL_DONE, u8::from(*more)],
            GatewayMsg::DirectoryChunk {
                index,
                count,
                bytes,
            } => encode_chunk(T_DIRECTORY_CHUNK, "directory chunk", *index, *count, bytes)?,
            GatewayMsg::Error { code, message } => encode_coded(T_ERROR, code.to_u16(), message)?,
            GatewayMsg::AdminResult { refusal, message } => encode_coded(
                T_ADMIN_RESULT,
                refusal.map_or(0, AdminRefusal::to_u16),
                message,
            )?,
            GatewayMsg::AdminReport {
                index,
                count,
                bytes,
            } => encode_chunk(T_ADMIN_REPORT, "admin report", *index, *count, bytes)?,
        })
    }

    pub fn to_frame(&self) -> Result<Frame, ProtocolError> {
        to_frame(&self.encode()?)
    }

    /// Decodes a (possibly zero-padded) control body. Never panics.
    pub fn decode(body: &[u8]) -> Result<Self, ProtocolError> {
        let msg = match check_body_len(body)? {
            T_ITEM => {
                let mut r = Reader::new("item", body);
                let id = r.u64()?;
                let surb_id = r.array::<16>()?;
                let payload = Box::new(r.array::<SPHINX_PAYLOAD_SIZE>()?);
                r.finish()?;
                GatewayMsg::Item {
                    id,
                    surb_id,
                    payload,
                }
            }
            T_DUMMY => {
                Reader::new("dummy", body).finish()?;
                GatewayMsg::Dummy
            }
            T_PULL_DONE => {
                let mut r = Reader::new("pull done", body);
                let more = match r.u8()? {
                    0 => false,
                    1 => true,
                    other => {
                        return Err(ProtocolError::Field {
                            what: "pull done flag",
                            value: other.into(),
                        });
                    }
                };
                r.finish()?;
                GatewayMsg::PullDone { more }
            }
            T_DIRECTORY_CHUNK => {
                let (index, count, bytes) = decode_chunk("directory chunk", body)?;
                GatewayMsg::DirectoryChunk {
                    index,
                    count,
                    bytes,
                }
            }
            T_ERROR => {
                let (code, message) = decode_coded("error", body)?;
                GatewayMsg::Error {
                    code: ErrorCode::from_u16(code),
                    message,
                }
            }
            T_ADMIN_RESULT => {
                let (code, message) = decode_coded("admin result", body)?;
                GatewayMsg::AdminResult {
                    refusal: AdminRefusal::from_u16(code),
                    message,
                }
            }
            T_ADMIN_REPORT => {
                let (index, count, bytes) = decode_chunk("admin report", body)?;
                GatewayMsg::AdminReport {
                    index,
                    count,
                    bytes,
                }
            }
            other => {
                return Err(ProtocolError::Field {
                    what: "gateway message type",
                    value: other.into(),
                });
            }
        };
        Ok(msg)
    }

    pub fn from_frame(frame: &Frame) -> Result<Self, ProtocolError> {
        Self::decode(control_body(frame)?)
    }
}

/// `| type | n: u16 | id: u64 × n |`, n ≤ [`MAX_ACK_IDS`].
fn encode_ids(t: u8, what: &'static str, ids: &[u64]) -> Result<Vec<u8>, ProtocolError> {
    if ids.len() > MAX_ACK_IDS {
        return Err(ProtocolError::TooLong {
            what,
            len: ids.len(),
            max: MAX_ACK_IDS,
        });
    }
    let mut out = Vec::with_capacity(3 + 8 * ids.len());
    out.push(t);
    // MAX_ACK_IDS < u16::MAX, checked above.
    out.extend_from_slice(&(ids.len() as u16).to_be_bytes());
    for id in ids {
        out.extend_from_slice(&id.to_be_bytes());
    }
    Ok(out)
}

fn decode_ids(what: &'static str, body: &[u8]) -> Result<Vec<u64>, ProtocolError> {
    let mut r = Reader::new(what, body);
    let n = usize::from(r.u16()?);
    if n > MAX_ACK_IDS {
        return Err(ProtocolError::TooLong {
            what,
            len: n,
            max: MAX_ACK_IDS,
        });
    }
    let mut ids = Vec::with_capacity(n);
    for _ in 0..n {
        ids.push(r.u64()?);
    }
    r.finish()?;
    Ok(ids)
}

/// `| type | index: u16 | count: u16 | len: u16 | bytes: len |`
fn encode_chunk(
    t: u8,
    what: &'static str,
    index: u16,
    count: u16,
    bytes: &[u8],
) -> Result<Vec<u8>, ProtocolError> {
    if bytes.len() > MAX_CHUNK_BYTES {
        return Err(ProtocolError::TooLong {
            what,
            len: bytes.len(),
            max: MAX_CHUNK_BYTES,
        });
    }
    check_chunk_index(index, count)?;
    let mut out = Vec::with_capacity(7 + bytes.len());
    out.push(t);
    out.extend_from_slice(&index.to_be_bytes());
    out.extend_from_slice(&count.to_be_bytes());
    // MAX_CHUNK_BYTES < u16::MAX, checked above.
    out.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
    out.extend_from_slice(bytes);
    Ok(out)
}

fn decode_chunk(what: &'static str, body: &[u8]) -> Result<(u16, u16, Vec<u8>), ProtocolError> {
    let mut r = Reader::new(what, body);
    let index = r.u16()?;
    let count = r.u16()?;
    check_chunk_index(index, count)?;
    let len = usize::from(r.u16()?);
    if len > MAX_CHUNK_BYTES {
        return Err(ProtocolError::TooLong {
            what,
            len,
            max: MAX_CHUNK_BYTES,
        });
    }
    let bytes = r.take(len)?.to_vec();
    r.finish()?;
    Ok((index, count, bytes))
}

/// `| type | code: u16 | len: u8 | UTF-8 message: len |`
fn encode_coded(t: u8, code: u16, message: &str) -> Result<Vec<u8>, ProtocolError> {
    if message.len() > MAX_ERROR_MESSAGE {
        return Err(ProtocolError::TooLong {
            what: "error message",
            len: message.len(),
            max: MAX_ERROR_MESSAGE,
        });
    }
    let mut out = Vec::with_capacity(4 + message.len());
    out.push(t);
    out.extend_from_slice(&code.to_be_bytes());
    out.push(message.len() as u8);
    out.extend_from_slice(message.as_bytes());
    Ok(out)
}

fn decode_coded(what: &'static str, body: &[u8]) -> Result<(u16, String), ProtocolError> {
    let mut r = Reader::new(what, body);
    let code = r.u16()?;
    let len = usize::from(r.u8()?);
    if len > MAX_ERROR_MESSAGE {
        return Err(ProtocolError::TooLong {
            what: "error message",
            len,
            max: MAX_ERROR_MESSAGE,
        });
    }
    let message = std::str::from_utf8(r.take(len)?)
        .map_err(|_| ProtocolError::Field {
            what: "error message utf-8",
            value: len as u64,
        })?
        .to_owned();
    r.finish()?;
    Ok((code, message))
}

/// Splits one admin command into `AdminChunk` messages (at most [`MAX_ADMIN_CHUNKS`]).
pub fn admin_chunks(command: &[u8]) -> Result<Vec<ClientMsg>, ProtocolError> {
    let n = command.len().div_ceil(MAX_CHUNK_BYTES);
    if n == 0 || n > usize::from(MAX_ADMIN_CHUNKS) {
        return Err(ProtocolError::TooLong {
            what: "admin command",
            len: command.len(),
            max: MAX_CHUNK_BYTES * usize::from(MAX_ADMIN_CHUNKS),
        });
    }
    Ok(command
        .chunks(MAX_CHUNK_BYTES)
        .enumerate()
        .map(|(i, bytes)| ClientMsg::AdminChunk {
            // Both below MAX_ADMIN_CHUNKS, checked above.
            index: i as u16,
            count: n as u16,
            bytes: bytes.to_vec(),
        })
        .collect())
}

fn check_chunk_index(index: u16, count: u16) -> Result<(), ProtocolError> {
    if index >= count {
        return Err(ProtocolError::Field {
            what: "directory chunk index",
            value: index.into(),
        });
    }
    Ok(())
}

/// Splits a signed directory document into `DirectoryChunk` messages (at least one).
pub fn directory_chunks(document: &[u8]) -> Result<Vec<GatewayMsg>, ProtocolError> {
    let n = document.len().div_ceil(MAX_CHUNK_BYTES).max(1);
    let count = u16::try_from(n).map_err(|_| ProtocolError::TooLong {
        what: "directory document",
        len: document.len(),
        max: MAX_CHUNK_BYTES * usize::from(u16::MAX),
    })?;
    let mut out = Vec::with_capacity(n);
    for index in 0..count {
        let start = usize::from(index) * MAX_CHUNK_BYTES;
        let end = (start + MAX_CHUNK_BYTES).min(document.len());
        out.push(GatewayMsg::DirectoryChunk {
            index,
            count,
            bytes: document.get(start..end).unwrap_or_default().to_vec(),
        });
    }
    Ok(out)
}

/// Reassembles a run of chunks (a directory document, an admin command) arriving in
/// any order.
///
/// A chunk whose `count` disagrees with the first one starts over: the gateway moved to
/// a newer document mid-transfer.
#[derive(Debug, Clone)]
pub struct ChunkAssembler {
    max_bytes: usize,
    parts: Vec<Option<Vec<u8>>>,
    have: usize,
    bytes: usize,
}

/// The assembler clients use for directory documents.
pub type DirectoryAssembler = ChunkAssembler;

impl ChunkAssembler {
    /// `max_bytes` bounds the document so a hostile gateway cannot exhaust memory.
    pub fn new(max_bytes: usize) -> Self {
        ChunkAssembler {
            max_bytes,
            parts: Vec::new(),
            have: 0,
            bytes: 0,
        }
    }

    /// Adds a chunk; returns the whole document once every chunk is in.
    pub fn push(
        &mut self,
        index: u16,
        count: u16,
        bytes: &[u8],
    ) -> Result<Option<Vec<u8>>, ProtocolError> {
        check_chunk_index(index, count)?;
        if self.parts.len() != usize::from(count) {
            self.parts = vec![None; usize::from(count)];
            self.have = 0;
            self.bytes = 0;
        }
        let slot = self
            .parts
            .get_mut(usize::from(index))
            .ok_or(ProtocolError::Internal("chunk index checked"))?;
        if slot.is_none() {
            if self.bytes + bytes.len() > self.max_bytes {
                return Err(ProtocolError::TooLong {
                    what: "directory document",
                    len: self.bytes + bytes.len(),
                    max: self.max_bytes,
                });
            }
            self.bytes += bytes.len();
            self.have += 1;
            *slot = Some(bytes.to_vec());
        }
        if self.have < self.parts.len() {
            return Ok(None);
        }
        let doc = self.parts.drain(..).flatten().flatten().collect();
        self.have = 0;
        self.bytes = 0;
        Ok(Some(doc))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::FRAME_SIZE;
    use proptest::prelude::*;

    fn roundtrip_client(m: &ClientMsg) {
        let f = m.to_frame().unwrap();
        assert_eq!(f.as_bytes().len(), FRAME_SIZE);
        let back = ClientMsg::from_frame(&Frame::decode(f.as_bytes()).unwrap()).unwrap();
        assert_eq!(&back, m);
        assert_eq!(back.to_frame().unwrap(), f);
    }

    fn roundtrip_gateway(m: &GatewayMsg) {
        let f = m.to_frame().unwrap();
        assert_eq!(f.as_bytes().len(), FRAME_SIZE);
        let back = GatewayMsg::from_frame(&Frame::decode(f.as_bytes()).unwrap()).unwrap();
        assert_eq!(&back, m);
        assert_eq!(back.to_frame().unwrap(), f);
    }

    #[test]
    fn limits() {
        assert_eq!(CONTROL_BODY_SIZE, 2396);
        assert_eq!(MAX_ACK_IDS, 299);
        assert_eq!(MAX_CHUNK_BYTES, 2389);
        assert_eq!(ITEM_BODY_SIZE, 2073);
    }

    #[test]
    fn testvec_client_messages() {
        let empty_pull = ClientMsg::Pull { acks: vec![] };
        assert_eq!(hex::encode(empty_pull.encode().unwrap()), "010000");
        let pull = ClientMsg::Pull {
            acks: vec![0x0a, 0x0102030405060708],
        };
        let hex_pull = "010002000000000000000a".to_owned() + "0102030405060708";
        assert_eq!(hex::encode(pull.encode().unwrap()), hex_pull);
        assert_eq!(
            ClientMsg::decode(&hex::decode(&hex_pull).unwrap()).unwrap(),
            pull
        );
        // An older client's pull (the type byte, then the frame's zero padding) is a
        // pull that acks nothing.
        let mut old = vec![0u8; CONTROL_BODY_SIZE];
        old[0] = T_PULL;
        assert_eq!(ClientMsg::decode(&old).unwrap(), empty_pull);
        assert_eq!(hex::encode(ClientMsg::GetDirectory.encode().unwrap()), "03");
        let ack = ClientMsg::Ack {
            ids: vec![1, 0x0102030405060708],
        };
        let hex_ack = "0200020000000000000001".to_owned() + "0102030405060708";
        assert_eq!(hex::encode(ack.encode().unwrap()), hex_ack);
        assert_eq!(
            ClientMsg::decode(&hex::decode(&hex_ack).unwrap()).unwrap(),
            ack
        );
        // The frame carries the body zero-padded after the 4-byte control header.
        let f = ack.to_frame().unwrap();
        assert_eq!(
            hex::encode(&f.as_bytes()[..17]),
            "010200000200020000000000000001".to_owned() + "0102"
        );
        assert!(f.as_bytes()[4 + 19..].iter().all(|b| *b == 0));
        for m in [empty_pull, pull, ClientMsg::GetDirectory, ack] {
            roundtrip_client(&m);
        }
    }

    #[test]
    fn testvec_gateway_messages() {
        let item = GatewayMsg::Item {
            id: 0x2a,
            surb_id: [0x11; 16],
            payload: Box::new([0xee; SPHINX_PAYLOAD_SIZE]),
        };
        let b = item.encode().unwrap();
        assert_eq!(b.len(), ITEM_BODY_SIZE);
        assert_eq!(
            hex::encode(&b[..27]),
            "81000000000000002a".to_owned() + &"11".repeat(16) + "eeee"
        );
        let dummy = GatewayMsg::Dummy.encode().unwrap();
        assert_eq!(dummy.len(), ITEM_BODY_SIZE);
        assert_eq!(hex::encode(&dummy[..3]), "820000");
        assert_eq!(
            hex::encode(GatewayMsg::PullDone { more: true }.encode().unwrap()),
            "8301"
        );
        assert_eq!(
            hex::encode(GatewayMsg::PullDone { more: false }.encode().unwrap()),
            "8300"
        );
        let chunk = GatewayMsg::DirectoryChunk {
            index: 1,
            count: 3,
            bytes: b"{}".to_vec(),
        };
        assert_eq!(hex::encode(chunk.encode().unwrap()), "840001000300027b7d");
        let err = GatewayMsg::Error {
            code: ErrorCode::Overloaded,
            message: "busy".into(),
        };
        assert_eq!(hex::encode(err.encode().unwrap()), "8500030462757379");
        for m in [
            item,
            GatewayMsg::Dummy,
            GatewayMsg::PullDone { more: true },
            chunk,
            err,
        ] {
            roundtrip_gateway(&m);
        }
    }

    #[test]
    fn every_gateway_frame_has_the_same_size() {
        let msgs = [
            GatewayMsg::Dummy,
            GatewayMsg::PullDone { more: false },
            GatewayMsg::Item {
                id: 1,
                surb_id: [0; 16],
                payload: Box::new([1; SPHINX_PAYLOAD_SIZE]),
            },
        ];
        for m in msgs {
            assert_eq!(m.to_frame().unwrap().as_bytes().len(), FRAME_SIZE);
        }
    }

    #[test]
    fn rejects_malformed() {
        assert!(ClientMsg::decode(&[]).is_err());
        assert!(ClientMsg::decode(&[0]).is_err());
        assert!(
            ClientMsg::decode(&[0x81]).is_err(),
            "gateway types are not client messages"
        );
        assert!(matches!(
            ClientMsg::decode(&[T_GET_DIRECTORY, 0, 1]),
            Err(ProtocolError::TrailingBytes { .. })
        ));
        assert!(matches!(
            ClientMsg::decode(&[T_PULL, 0, 0, 1]),
            Err(ProtocolError::TrailingBytes { .. })
        ));
        // A pull claiming more ack ids than fit.
        assert!(matches!(
            ClientMsg::decode(&[T_PULL, 0xff, 0xff]),
            Err(ProtocolError::TooLong { .. })
        ));
        assert!(
            ClientMsg::Pull {
                acks: vec![0; MAX_ACK_IDS + 1]
            }
            .encode()
            .is_err()
        );
        // Ack claiming more ids than present.
        assert!(matches!(
            ClientMsg::decode(&[T_ACK, 0, 2, 0, 0, 0, 0, 0, 0, 0, 1]),
            Err(ProtocolError::Truncated { .. })
        ));
        // Ack claiming more ids than fit.
        assert!(matches!(
            ClientMsg::decode(&[T_ACK, 0xff, 0xff]),
            Err(ProtocolError::TooLong { .. })
        ));
        assert!(ClientMsg::decode(&[1u8; CONTROL_BODY_SIZE + 1]).is_err());
        assert!(
            ClientMsg::Ack {
                ids: vec![0; MAX_ACK_IDS + 1]
            }
            .encode()
            .is_err()
        );
        assert!(GatewayMsg::decode(&[T_PULL_DONE, 2]).is_err());
        assert!(
            GatewayMsg::decode(&[T_DIRECTORY_CHUNK, 0, 3, 0, 3, 0, 0]).is_err(),
            "index ≥ count"
        );
        assert!(
            GatewayMsg::decode(&[T_ERROR, 0, 1, 2, 0xff, 0xfe]).is_err(),
            "bad utf-8"
        );
        assert!(GatewayMsg::decode(&[T_ITEM, 1, 2, 3]).is_err());
        let sphinx = Frame::sphinx(0, &[0u8; SPHINX_PACKET_SIZE]).unwrap();
        assert_eq!(
            ClientMsg::from_frame(&sphinx),
            Err(ProtocolError::NotControl)
        );
        let long = GatewayMsg::Error {
            code: ErrorCode::Internal,
            message: "x".repeat(MAX_ERROR_MESSAGE + 1),
        };
        assert!(long.encode().is_err());
    }

    #[test]
    fn testvec_admin_messages() {
        let chunk = ClientMsg::AdminChunk {
            index: 1,
            count: 2,
            bytes: b"{}".to_vec(),
        };
        assert_eq!(
            hex::encode(chunk.encode().unwrap()),
            "04000100020002".to_owned() + "7b7d"
        );
        roundtrip_client(&chunk);
        let done = GatewayMsg::AdminResult {
            refusal: None,
            message: "ok".into(),
        };
        assert_eq!(hex::encode(done.encode().unwrap()), "860000026f6b");
        roundtrip_gateway(&done);
        let replay = GatewayMsg::AdminResult {
            refusal: Some(AdminRefusal::Replayed),
            message: String::new(),
        };
        assert_eq!(hex::encode(replay.encode().unwrap()), "86000500");
        roundtrip_gateway(&replay);
        for r in AdminRefusal::ALL {
            assert_eq!(AdminRefusal::from_u16(r.to_u16()), Some(r));
        }
        // A chunk index past its count, and a count of zero, are refused.
        assert!(ClientMsg::decode(&hex::decode("04000200020000").unwrap()).is_err());
        assert!(ClientMsg::decode(&hex::decode("04000000000000").unwrap()).is_err());
    }

    #[test]
    fn admin_commands_split_and_reassemble_within_the_limit() {
        let command: Vec<u8> = (0..MAX_CHUNK_BYTES * 3 + 5).map(|i| i as u8).collect();
        let chunks = admin_chunks(&command).unwrap();
        assert_eq!(chunks.len(), 4);
        let mut asm = ChunkAssembler::new(MAX_CHUNK_BYTES * usize::from(MAX_ADMIN_CHUNKS));
        let mut out = None;
        for c in chunks.iter().rev() {
            let ClientMsg::AdminChunk {
                index,
                count,
                bytes,
            } = c
            else {
                panic!("{c:?}")
            };
            assert_eq!(c.to_frame().unwrap().as_bytes().len(), FRAME_SIZE);
            out = asm.push(*index, *count, bytes).unwrap();
        }
        assert_eq!(out.unwrap(), command);
        assert!(admin_chunks(b"").is_err());
        let too_long = vec![0u8; MAX_CHUNK_BYTES * usize::from(MAX_ADMIN_CHUNKS) + 1];
        assert!(admin_chunks(&too_long).is_err());
    }

    #[test]
    fn directory_chunks_reassemble() {
        let doc: Vec<u8> = (0..MAX_CHUNK_BYTES * 2 + 17).map(|i| i as u8).collect();
        let chunks = directory_chunks(&doc).unwrap();
        assert_eq!(chunks.len(), 3);
        let mut asm = DirectoryAssembler::new(1 << 20);
        let mut out = None;
        for c in chunks.iter().rev() {
            let GatewayMsg::DirectoryChunk {
                index,
                count,
                bytes,
            } = c
            else {
                panic!("not a chunk")
            };
            roundtrip_gateway(c);
            out = asm.push(*index, *count, bytes).unwrap();
        }
        assert_eq!(out.unwrap(), doc);
        assert_eq!(directory_chunks(b"").unwrap().len(), 1);
        let mut small = DirectoryAssembler::new(10);
        assert!(small.push(0, 2, &[0; 11]).is_err());
    }

    fn arb_gateway() -> impl Strategy<Value = GatewayMsg> {
        prop_oneof![
            (any::<u64>(), any::<[u8; 16]>(), any::<u8>()).prop_map(|(id, surb_id, b)| {
                GatewayMsg::Item {
                    id,
                    surb_id,
                    payload: Box::new([b; SPHINX_PAYLOAD_SIZE]),
                }
            }),
            Just(GatewayMsg::Dummy),
            any::<bool>().prop_map(|more| GatewayMsg::PullDone { more }),
            (
                1u16..,
                proptest::collection::vec(any::<u8>(), 0..=MAX_CHUNK_BYTES),
                any::<u16>()
            )
                .prop_map(|(count, bytes, i)| GatewayMsg::DirectoryChunk {
                    index: i % count,
                    count,
                    bytes,
                }),
            (any::<u16>(), "[a-z ]{0,200}").prop_map(|(c, message)| GatewayMsg::Error {
                code: ErrorCode::from_u16(c),
                message,
            }),
            (any::<u16>(), "[a-z ]{0,200}").prop_map(|(c, message)| {
                GatewayMsg::AdminResult {
                    refusal: AdminRefusal::from_u16(c),
                    message,
                }
            }),
        ]
    }

    proptest! {
        #[test]
        fn client_roundtrip(ids in proptest::collection::vec(any::<u64>(), 0..=MAX_ACK_IDS)) {
            for m in [ClientMsg::Pull { acks: ids.clone() }, ClientMsg::Ack { ids }] {
                let f = m.to_frame().unwrap();
                prop_assert_eq!(f.as_bytes().len(), FRAME_SIZE);
                prop_assert_eq!(ClientMsg::from_frame(&f).unwrap(), m);
            }
        }

        #[test]
        fn gateway_roundtrip(m in arb_gateway()) {
            let f = m.to_frame().unwrap();
            let back = GatewayMsg::from_frame(&f).unwrap();
            prop_assert_eq!(back.to_frame().unwrap(), f);
            prop_assert_eq!(back, m);
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2500)) {
            let _ = ClientMsg::decode(&bytes);
            let _ = GatewayMsg::decode(&bytes);
        }

        #[test]
        fn decode_is_canonical(bytes in proptest::collection::vec(any::<u8>(), 1..64)) {
            // Whatever decodes re-encodes to the same bytes, up to zero padding.
            if let Ok(m) = ClientMsg::decode(&bytes) {
                let mut e = m.encode().unwrap();
                e.resize(bytes.len().max(e.len()), 0);
                prop_assert_eq!(&e[..bytes.len()], &bytes[..]);
            }
        }
    }
}

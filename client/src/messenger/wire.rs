//! The application envelope: what travels inside the end-to-end seal of a 1:1 message.
//!
//! ```text
//! envelope = "SM" | version (2) | kind (1) | fields
//! kind 1 Direct  : card (len32 | bytes) | sent_unix_ms u64 | id [16] | ttl_secs u64 | burn u8
//!                  | body (len32 | bytes) | signature [64]
//! kind 2 Mls     : MLS message bytes (Welcome, commit, proposal, application)
//! kind 3 Policy  : admin-signed policy bytes
//! kind 4 Invite  : card (len32 | bytes) | key package (len32 | bytes)
//! ```
//!
//! A *card* is a [`shoal_subnet::MemberCard`]: the sender's admin-signed credential
//! and its own address binding. Integers are big-endian. A direct message is signed by
//! the sender's identity key over [`DIRECT_DOMAIN`], the recipient's identity key and
//! subnet, and every field before the signature (card, time, id, options, body), so it
//! can be neither forged under another key, re-targeted, nor altered; its id and time
//! let the recipient drop a replay forever. Decoding checks every length against what
//! is left and never panics.

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use shoal_subnet::MessageOptions;

const MAGIC: &[u8; 2] = b"SM";
const VERSION: u8 = 2;
const KIND_DIRECT: u8 = 1;
const KIND_MLS: u8 = 2;
const KIND_POLICY: u8 = 3;
const KIND_INVITE: u8 = 4;
/// Domain of the sender's signature on a direct message.
pub const DIRECT_DOMAIN: &[u8] = b"shoal direct message v2\0";

/// True if `bytes` are not meant as an envelope at all (they lack its magic): a plain
/// message from a client without a member card. Empty bytes are not a message.
pub fn is_plain(bytes: &[u8]) -> bool {
    !bytes.is_empty() && !bytes.starts_with(MAGIC)
}

/// A decoded envelope. Nothing in it is checked yet except its shape.
#[derive(Clone, PartialEq, Eq)]
pub enum Envelope {
    Direct(DirectMessage),
    Mls(Vec<u8>),
    Policy(Vec<u8>),
    Invite(Invite),
}

impl std::fmt::Debug for Envelope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Contents are user data; only the kind and size are printed.
        match self {
            Envelope::Direct(d) => write!(f, "Direct({} bytes)", d.body.len()),
            Envelope::Mls(b) => write!(f, "Mls({} bytes)", b.len()),
            Envelope::Policy(b) => write!(f, "Policy({} bytes)", b.len()),
            Envelope::Invite(_) => f.write_str("Invite"),
        }
    }
}

/// A signed 1:1 message with its options.
#[derive(Clone, PartialEq, Eq)]
pub struct DirectMessage {
    /// The sender's member card (credential and own address binding).
    pub card: Vec<u8>,
    /// When the sender sent it (its clock, unix ms): bounds how long a replay is
    /// remembered.
    pub sent_unix_ms: u64,
    /// Chosen by the sender, unique per message.
    pub id: [u8; 16],
    pub options: MessageOptions,
    pub body: Vec<u8>,
    pub signature: [u8; 64],
}

impl std::fmt::Debug for DirectMessage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The body is user data.
        write!(f, "DirectMessage({} bytes)", self.body.len())
    }
}

/// The group half of an invite: a member card and a fresh MLS KeyPackage (whose leaf
/// carries the same card).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invite {
    pub card: Vec<u8>,
    pub key_package: Vec<u8>,
}

/// Why an envelope did not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed envelope: {0}")]
pub struct WireError(pub &'static str);

/// Who a direct message is for: the recipient's identity key and subnet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recipient {
    pub identity_key: [u8; 32],
    pub subnet: [u8; 32],
}

impl DirectMessage {
    /// Everything the signature covers.
    fn signed_bytes(&self, to: &Recipient) -> Vec<u8> {
        let mut m = Vec::with_capacity(DIRECT_DOMAIN.len() + 64 + 128 + self.card.len());
        m.extend_from_slice(DIRECT_DOMAIN);
        m.extend_from_slice(&to.identity_key);
        m.extend_from_slice(&to.subnet);
        self.put_fields(&mut m);
        m
    }

    fn put_fields(&self, out: &mut Vec<u8>) {
        put_bytes(out, &self.card);
        out.extend_from_slice(&self.sent_unix_ms.to_be_bytes());
        out.extend_from_slice(&self.id);
        out.extend_from_slice(&self.options.ttl_secs.to_be_bytes());
        out.push(u8::from(self.options.burn_on_read));
        put_bytes(out, &self.body);
    }

    /// Signs `body` for `to`.
    pub fn sign(
        key: &SigningKey,
        card: Vec<u8>,
        to: &Recipient,
        sent_unix_ms: u64,
        id: [u8; 16],
        options: MessageOptions,
        body: Vec<u8>,
    ) -> Self {
        let mut d = DirectMessage {
            card,
            sent_unix_ms,
            id,
            options,
            body,
            signature: [0; 64],
        };
        d.signature = key.sign(&d.signed_bytes(to)).to_bytes();
        d
    }

    /// Checks the signature by `sender_key` for `to`.
    pub fn verify(&self, sender_key: &[u8; 32], to: &Recipient) -> bool {
        let Ok(key) = VerifyingKey::from_bytes(sender_key) else {
            return false;
        };
        key.verify_strict(
            &self.signed_bytes(to),
            &Signature::from_bytes(&self.signature),
        )
        .is_ok()
    }
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    // Messages are bounded far below 4 GiB by the fragment layer.
    out.extend_from_slice(&(b.len() as u32).to_be_bytes());
    out.extend_from_slice(b);
}

impl Envelope {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        match self {
            Envelope::Direct(d) => {
                out.push(KIND_DIRECT);
                d.put_fields(&mut out);
                out.extend_from_slice(&d.signature);
            }
            Envelope::Mls(b) => {
                out.push(KIND_MLS);
                out.extend_from_slice(b);
            }
            Envelope::Policy(b) => {
                out.push(KIND_POLICY);
                out.extend_from_slice(b);
            }
            Envelope::Invite(i) => {
                out.push(KIND_INVITE);
                put_bytes(&mut out, &i.card);
                put_bytes(&mut out, &i.key_package);
            }
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader(bytes);
        if r.take(2)? != MAGIC {
            return Err(WireError("not a Shoal envelope"));
        }
        if r.u8()? != VERSION {
            return Err(WireError("unknown version"));
        }
        let env = match r.u8()? {
            KIND_DIRECT => {
                let card = r.bytes()?.to_vec();
                let sent_unix_ms = u64::from_be_bytes(r.array()?);
                let id = r.array()?;
                let ttl_secs = u64::from_be_bytes(r.array()?);
                let burn_on_read = match r.u8()? {
                    0 => false,
                    1 => true,
                    _ => return Err(WireError("burn-on-read flag")),
                };
                let body = r.bytes()?.to_vec();
                let signature = r.array()?;
                Envelope::Direct(DirectMessage {
                    card,
                    sent_unix_ms,
                    id,
                    options: MessageOptions {
                        ttl_secs,
                        burn_on_read,
                    },
                    body,
                    signature,
                })
            }
            KIND_MLS => Envelope::Mls(r.rest().to_vec()),
            KIND_POLICY => Envelope::Policy(r.rest().to_vec()),
            KIND_INVITE => Envelope::Invite(Invite {
                card: r.bytes()?.to_vec(),
                key_package: r.bytes()?.to_vec(),
            }),
            _ => return Err(WireError("unknown kind")),
        };
        if !r.0.is_empty() {
            return Err(WireError("trailing bytes"));
        }
        Ok(env)
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.0.len() < n {
            return Err(WireError("truncated"));
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        self.take(N)?.try_into().map_err(|_| WireError("truncated"))
    }
    fn bytes(&mut self) -> Result<&'a [u8], WireError> {
        let len = u32::from_be_bytes(self.array()?) as usize;
        self.take(len)
    }
    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn testvec_direct() {
        let key = SigningKey::from_bytes(&[3; 32]);
        let opts = MessageOptions {
            ttl_secs: 60,
            burn_on_read: true,
        };
        let to = Recipient {
            identity_key: [4; 32],
            subnet: [6; 32],
        };
        let d = DirectMessage::sign(
            &key,
            b"card".to_vec(),
            &to,
            0x0102,
            [7; 16],
            opts,
            b"hi".to_vec(),
        );
        let bytes = Envelope::Direct(d.clone()).encode();
        assert_eq!(
            hex::encode(&bytes[..51]),
            concat!(
                "534d0201",
                "00000004",
                "63617264",
                "0000000000000102",
                "07070707070707070707070707070707",
                "000000000000003c",
                "01",
                "00000002",
                "6869"
            )
        );
        assert_eq!(
            Envelope::decode(&bytes).unwrap(),
            Envelope::Direct(d.clone())
        );
        let sender = key.verifying_key().to_bytes();
        assert!(d.verify(&sender, &to));
        // Re-targeted (another key or another subnet) or altered, it no longer verifies.
        assert!(!d.verify(
            &sender,
            &Recipient {
                identity_key: [5; 32],
                ..to
            }
        ));
        assert!(!d.verify(
            &sender,
            &Recipient {
                subnet: [5; 32],
                ..to
            }
        ));
        let mut longer = d.clone();
        longer.options.ttl_secs = 61;
        assert!(!longer.verify(&sender, &to));
        let mut other_id = d.clone();
        other_id.id[0] ^= 1;
        assert!(!other_id.verify(&sender, &to));
        let mut later = d.clone();
        later.sent_unix_ms += 1;
        assert!(!later.verify(&sender, &to));
    }

    #[test]
    fn rejects_bad_shapes() {
        assert!(Envelope::decode(b"").is_err());
        assert!(Envelope::decode(b"XX\x01\x02").is_err());
        assert!(Envelope::decode(b"SM\x01\x02").is_err());
        assert!(Envelope::decode(b"SM\x02\x09").is_err());
        let inv = Envelope::Invite(Invite {
            card: vec![1],
            key_package: vec![2, 3],
        })
        .encode();
        assert!(Envelope::decode(&inv[..inv.len() - 1]).is_err());
        let mut trailing = inv.clone();
        trailing.push(0);
        assert!(Envelope::decode(&trailing).is_err());
        assert!(Envelope::decode(&inv).is_ok());
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Envelope::decode(&bytes);
            let mut framed = b"SM\x02".to_vec();
            framed.extend_from_slice(&bytes);
            if let Ok(e) = Envelope::decode(&framed) {
                prop_assert_eq!(Envelope::decode(&e.encode()).unwrap(), e);
            }
        }
    }
}

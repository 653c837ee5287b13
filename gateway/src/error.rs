use std::path::PathBuf;

use shoal_packet::PacketError;

/// Everything that can go wrong in the gateway's protocol core, mailbox and store.
///
/// Messages name what was being handled, never the bytes, keys or mailbox addresses
/// involved: those are user data and must not reach logs.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum GatewayError {
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
    /// Building or checking a frame failed.
    #[error("frame: {0}")]
    Frame(PacketError),
    /// A client↔gateway control message was malformed or could not be built.
    #[error("control message: {0}")]
    Protocol(#[from] shoal_packet::protocol::ProtocolError),
    /// No account is registered for this key. For clients: authentication failed.
    #[error("unknown account")]
    UnknownAccount,
    /// The account key is already registered.
    #[error("account key already registered")]
    AccountExists,
    /// The mailbox address already belongs to another account.
    #[error("mailbox address already has an account")]
    MailboxTaken,
    /// A configuration value is out of range.
    #[error("invalid configuration: {0}")]
    Config(&'static str),
    /// The database reported an error during `op`.
    #[error("store: {op}: {detail}")]
    Store { op: &'static str, detail: String },
    /// A record read back from the database does not have the layout this version writes.
    #[error("store: corrupt {what} record")]
    Corrupt { what: &'static str },
    /// The store's writer thread is gone (closed or crashed); nothing more will commit.
    #[error("store writer is not running")]
    StoreClosed,
    /// The store's submission queue is full; try again later.
    #[error("store queue is full")]
    StoreBusy,
    /// Turning an ack slot into a packet failed (the SURB is not a valid reply block).
    #[error("ack: {0}")]
    Ack(PacketError),
    /// The config file could not be read.
    #[error("cannot read config {path}: {detail}")]
    ConfigRead { path: PathBuf, detail: String },
    /// The config file is not valid TOML for this schema (unknown key, wrong type, ...).
    #[error("{path}: {message}")]
    ConfigParse { path: PathBuf, message: String },
    /// A config value parsed but is not usable.
    #[error("{path}: `{key}`: {reason}")]
    ConfigValue {
        path: PathBuf,
        key: &'static str,
        reason: String,
    },
    /// `init` refuses to overwrite an existing gateway.
    #[error("{path} already exists; refusing to overwrite it")]
    AlreadyExists { path: PathBuf },
    /// The mixing half (the relay pipeline: keys, node links, workers) failed.
    #[error("mixing pipeline: {0}")]
    Node(String),
    /// The client link endpoint or the metrics listener could not be set up.
    #[error("cannot listen for {what} on {addr}: {detail}")]
    Listen {
        what: &'static str,
        addr: std::net::SocketAddr,
        detail: String,
    },
    /// No tokio runtime is running; [`crate::driver::spawn`] needs one.
    #[error("no tokio runtime is running")]
    NoRuntime,
    /// The gateway refused an admin command; nothing changed there.
    #[error("gateway refused the admin command ({refusal}): {message}")]
    AdminRefused {
        refusal: shoal_packet::protocol::AdminRefusal,
        message: String,
    },
    /// The admin link to the gateway failed or timed out before an answer.
    #[error("admin link: {detail}")]
    AdminLink { detail: String },
    /// A bug in this crate, not the peer's fault.
    #[error("internal error: {0}")]
    Internal(&'static str),
}

impl GatewayError {
    /// An error of the mixing pipeline, with its chain of causes.
    pub(crate) fn node(e: shoal_relay::RelayError) -> Self {
        // Relay errors name files, keys of the config and addresses, never user data.
        let mut text = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            text.push_str(": ");
            text.push_str(&s.to_string());
            source = s.source();
        }
        GatewayError::Node(text)
    }

    pub(crate) fn store(op: &'static str, e: impl std::fmt::Display) -> Self {
        // redb's messages describe files and pages, never record contents.
        GatewayError::Store {
            op,
            detail: e.to_string(),
        }
    }
}

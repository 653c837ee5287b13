//! The crate's one error type.

use std::path::PathBuf;

/// Everything that can stop a relay from starting or keep it from running.
///
/// Messages name files and config keys, never key material or client addresses.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RelayError {
    /// The config file could not be read.
    #[error("cannot read config {path}")]
    ConfigRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
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
    /// A key or config file could not be read, written or synced.
    #[error("{context} {path}")]
    Io {
        context: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A key file exists but does not hold a key.
    #[error("{path}: {reason}")]
    KeyFile { path: PathBuf, reason: &'static str },
    /// `init` refuses to overwrite an existing relay.
    #[error("{path} already exists; refusing to overwrite it")]
    AlreadyExists { path: PathBuf },
    /// The QUIC endpoint could not be set up.
    #[error("link endpoint")]
    Link(#[source] shoal_link::LinkError),
    /// The metrics listener could not be bound.
    #[error("cannot bind metrics listener on {addr}")]
    MetricsBind {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// A worker thread could not be started.
    #[error("cannot start worker thread")]
    Thread(#[source] std::io::Error),
    /// The relay's own descriptor could not be built (a bug, or a bad advertised address).
    #[error("cannot build descriptor")]
    Descriptor(#[source] shoal_topology::TopologyError),
    /// No tokio runtime is running; [`crate::driver::spawn`] needs one.
    #[error("no tokio runtime is running")]
    NoRuntime,
}

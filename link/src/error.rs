//! The crate's one error type.

use std::io;
use std::net::SocketAddr;

/// Everything that can go wrong on a Shoal link or in the HTTP helper.
///
/// Variants that concern an inbound peer never carry its address: inbound
/// peers may be clients, and client addresses must not reach the logs.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LinkError {
    /// The async runtime needed by quinn is missing (called outside tokio).
    #[error("no tokio runtime is running")]
    NoRuntime,

    /// The UDP socket could not be bound.
    #[error("cannot bind QUIC endpoint on {addr}")]
    Bind {
        /// Address we tried to bind.
        addr: SocketAddr,
        /// Cause.
        #[source]
        source: io::Error,
    },

    /// Building the TLS or QUIC configuration failed (bad local key, provider mismatch).
    #[error("cannot build link configuration: {context}")]
    Config {
        /// What was being built.
        context: &'static str,
        /// Cause, as text (the underlying errors have unrelated types).
        detail: String,
    },

    /// The endpoint's socket address could not be read.
    #[error("cannot read the endpoint's local address")]
    LocalAddr(#[source] io::Error),

    /// A dial could not even be started (endpoint closing, invalid address).
    #[error("cannot dial {addr}")]
    Connect {
        /// Address dialled.
        addr: SocketAddr,
        /// Cause.
        #[source]
        source: quinn::ConnectError,
    },

    /// An outbound handshake failed: unreachable, timed out, or the server did
    /// not prove the pinned key.
    #[error("handshake with {addr} failed")]
    Handshake {
        /// Address dialled.
        addr: SocketAddr,
        /// Cause.
        #[source]
        source: quinn::ConnectionError,
    },

    /// An inbound handshake failed (unknown key, bad signature, timeout).
    #[error("inbound handshake failed")]
    InboundHandshake {
        /// Cause.
        #[source]
        source: quinn::ConnectionError,
    },

    /// After a completed handshake the peer's identity was missing or not an
    /// Ed25519 raw public key. The verifiers should make this impossible.
    #[error("peer identity missing or malformed after handshake")]
    PeerIdentity,

    /// The connection ended while opening or accepting a stream.
    #[error("link closed")]
    Closed {
        /// Cause.
        #[source]
        source: quinn::ConnectionError,
    },

    /// A frame had the wrong length for this stream.
    #[error("frame is {got} bytes, this stream carries {expected}-byte frames")]
    FrameSize {
        /// Frame size of the stream.
        expected: usize,
        /// Length offered.
        got: usize,
    },

    /// The requested frame size is zero or above [`crate::MAX_FRAME_SIZE`].
    #[error("invalid frame size {0}")]
    InvalidFrameSize(usize),

    /// Writing a frame failed (stream stopped by the peer, connection lost).
    #[error("cannot write frame")]
    Write {
        /// Cause.
        #[source]
        source: quinn::WriteError,
    },

    /// Finishing a frame stream failed because it was already closed.
    #[error("frame stream already closed")]
    StreamClosed,

    /// Reading a frame failed (stream reset, connection lost).
    #[error("cannot read frame")]
    Read {
        /// Cause.
        #[source]
        source: quinn::ReadError,
    },

    /// The peer ended the stream in the middle of a frame.
    #[error("stream ended after {got} of {expected} frame bytes")]
    TruncatedFrame {
        /// Frame size of the stream.
        expected: usize,
        /// Bytes of the partial frame.
        got: usize,
    },

    /// HTTP: a socket operation failed.
    #[error("HTTP {context} {addr} failed")]
    HttpIo {
        /// What was being done ("connect to", "write to", "read from").
        context: &'static str,
        /// Remote address.
        addr: SocketAddr,
        /// Cause.
        #[source]
        source: io::Error,
    },

    /// HTTP: the exchange did not finish in time.
    #[error("HTTP request to {addr} timed out")]
    HttpTimeout {
        /// Remote address.
        addr: SocketAddr,
    },

    /// HTTP: the request could not be sent or the response could not be parsed.
    #[error("HTTP exchange with {addr}: {reason}")]
    HttpProtocol {
        /// Remote address.
        addr: SocketAddr,
        /// What was wrong.
        reason: &'static str,
    },
}

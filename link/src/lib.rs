#![doc = include_str!("../README.md")]

mod congestion;
mod endpoint;
mod error;
pub mod http;
mod peers;
mod socket;
mod tls;

pub use endpoint::{
    FrameReceiver, FrameSender, IDLE_TIMEOUT, KEEP_ALIVE, Link, LinkEndpoint, MAX_FRAME_SIZE,
    WIRE_DATAGRAM_SIZE,
};
pub use error::LinkError;
pub use peers::PeerSet;
pub use tls::{ALPN, ed25519_spki, parse_ed25519_spki};

/// A node's identity: its Ed25519 public key bytes.
pub type NodeKey = [u8; 32];

/// The [`NodeKey`] of a signing key.
pub fn node_key(identity: &ed25519_dalek::SigningKey) -> NodeKey {
    identity.verifying_key().to_bytes()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests;

#![doc = include_str!("../README.md")]

pub mod fragment;
pub mod frame;
pub mod payload;
pub mod protocol;
pub mod replay;
pub mod seal;
pub mod sphinx;

mod error;

pub use error::PacketError;
pub use fragment::{Fragment, FragmentHeader, MessageId, Reassembler};
pub use frame::{Frame, FrameKind};
pub use payload::{AckSlot, BodyKind};
pub use replay::{ReplayFilter, ReplayTag, ReplayVerdict};
pub use sphinx::{ForwardPacket, KeyEpoch, NodeAddress, Unwrapped};

/// Bytes of Sphinx payload (before the crate's 17-byte payload overhead).
pub const SPHINX_PAYLOAD_SIZE: usize = 2048;
/// Bytes of a whole Sphinx packet: header for the maximum of five hops plus payload.
pub const SPHINX_PACKET_SIZE: usize = sphinx_packet::header::HEADER_SIZE + SPHINX_PAYLOAD_SIZE;
/// Bytes of the frame header that precedes every Sphinx packet on a link.
pub const FRAME_HEADER_SIZE: usize = 4;
/// The one size of every frame on every link: real, cover, loop, ack and control alike.
pub const FRAME_SIZE: usize = FRAME_HEADER_SIZE + SPHINX_PACKET_SIZE;
/// Bytes of plaintext the exit hop recovers from a forward packet.
pub const PLAINTEXT_SIZE: usize =
    SPHINX_PAYLOAD_SIZE - sphinx_packet::payload::PAYLOAD_OVERHEAD_SIZE;
/// Hops on every route: entry gateway, three mix layers, exit gateway.
pub const ROUTE_HOPS: usize = sphinx_packet::constants::MAX_PATH_LENGTH;
/// Mix layers between the gateways.
pub const MIX_LAYERS: usize = ROUTE_HOPS - 2;

#[cfg(test)]
mod tests {
    use super::*;

    /// The sizes are part of the wire format; a change here is a protocol change.
    #[test]
    fn sizes_are_fixed() {
        assert_eq!(sphinx_packet::header::HEADER_SIZE, 348);
        assert_eq!(SPHINX_PACKET_SIZE, 2396);
        assert_eq!(FRAME_SIZE, 2400);
        assert_eq!(PLAINTEXT_SIZE, 2031);
    }
}

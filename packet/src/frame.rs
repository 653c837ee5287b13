//! The fixed-size frame every link carries.
//!
//! ```text
//! 0      1      2           4                                   FRAME_SIZE
//! | ver  | kind | key epoch |  Sphinx packet (or padded control body)  |
//! ```
//! The key epoch tells a node which of its Sphinx keys to try, so a node never
//! spends two scalar multiplications guessing at an epoch edge. It is the low 16 bits
//! of the epoch number; every sender in the same epoch uses the same value, so it
//! reveals nothing about the sender.

use crate::{FRAME_HEADER_SIZE, FRAME_SIZE, PacketError, SPHINX_PACKET_SIZE};

/// Wire format version carried in every frame.
pub const FRAME_VERSION: u8 = 1;

/// What the body of a frame holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameKind {
    /// A Sphinx packet to unwrap.
    Sphinx = 1,
    /// A client↔gateway control message, padded to the same size.
    Control = 2,
}

impl FrameKind {
    fn from_u8(v: u8) -> Result<Self, PacketError> {
        match v {
            1 => Ok(FrameKind::Sphinx),
            2 => Ok(FrameKind::Control),
            other => Err(PacketError::Field {
                what: "frame kind",
                value: other.into(),
            }),
        }
    }
}

/// One frame, owning exactly [`FRAME_SIZE`] bytes.
///
/// Held as a boxed array so moving a frame between threads moves a pointer.
#[derive(Clone, PartialEq, Eq)]
pub struct Frame(Box<[u8; FRAME_SIZE]>);

impl std::fmt::Debug for Frame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Contents are user data: show only the header.
        f.debug_struct("Frame")
            .field("kind", &self.0[1])
            .field("key_epoch", &self.key_epoch())
            .finish_non_exhaustive()
    }
}

impl Frame {
    /// Wraps a serialized Sphinx packet for the given key epoch.
    pub fn sphinx(key_epoch: u16, packet: &[u8]) -> Result<Self, PacketError> {
        if packet.len() != SPHINX_PACKET_SIZE {
            return Err(PacketError::Length {
                what: "sphinx packet",
                expected: SPHINX_PACKET_SIZE,
                got: packet.len(),
            });
        }
        let mut buf = Box::new([0u8; FRAME_SIZE]);
        buf[0] = FRAME_VERSION;
        buf[1] = FrameKind::Sphinx as u8;
        buf[2..4].copy_from_slice(&key_epoch.to_be_bytes());
        buf[FRAME_HEADER_SIZE..].copy_from_slice(packet);
        Ok(Frame(buf))
    }

    /// A control frame; `body` is zero-padded to the fixed size.
    pub fn control(body: &[u8]) -> Result<Self, PacketError> {
        if body.len() > SPHINX_PACKET_SIZE {
            return Err(PacketError::Length {
                what: "control body",
                expected: SPHINX_PACKET_SIZE,
                got: body.len(),
            });
        }
        let mut buf = Box::new([0u8; FRAME_SIZE]);
        buf[0] = FRAME_VERSION;
        buf[1] = FrameKind::Control as u8;
        buf[FRAME_HEADER_SIZE..FRAME_HEADER_SIZE + body.len()].copy_from_slice(body);
        Ok(Frame(buf))
    }

    /// Checks and takes a frame received from a peer.
    pub fn decode(bytes: &[u8]) -> Result<Self, PacketError> {
        let arr: &[u8; FRAME_SIZE] = bytes.try_into().map_err(|_| PacketError::Length {
            what: "frame",
            expected: FRAME_SIZE,
            got: bytes.len(),
        })?;
        if arr[0] != FRAME_VERSION {
            return Err(PacketError::Field {
                what: "frame version",
                value: arr[0].into(),
            });
        }
        FrameKind::from_u8(arr[1])?;
        Ok(Frame(Box::new(*arr)))
    }

    pub fn kind(&self) -> FrameKind {
        // Constructors and `decode` only admit valid kinds.
        if self.0[1] == FrameKind::Control as u8 {
            FrameKind::Control
        } else {
            FrameKind::Sphinx
        }
    }

    pub fn key_epoch(&self) -> u16 {
        u16::from_be_bytes([self.0[2], self.0[3]])
    }

    /// The body: a Sphinx packet or a padded control message.
    pub fn body(&self) -> &[u8] {
        &self.0[FRAME_HEADER_SIZE..]
    }

    pub fn as_bytes(&self) -> &[u8; FRAME_SIZE] {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn testvec_frame_header() {
        let f = Frame::sphinx(0x0102, &[0xab; SPHINX_PACKET_SIZE]).unwrap();
        assert_eq!(hex::encode(&f.as_bytes()[..6]), "01010102abab");
        let c = Frame::control(b"hi").unwrap();
        assert_eq!(hex::encode(&c.as_bytes()[..8]), "0102000068690000");
        assert_eq!(Frame::decode(c.as_bytes()).unwrap(), c);
    }

    #[test]
    fn rejects_bad_frames() {
        assert!(Frame::decode(&[]).is_err());
        assert!(Frame::decode(&[1u8; FRAME_SIZE - 1]).is_err());
        assert!(Frame::decode(&[1u8; FRAME_SIZE + 1]).is_err());
        let mut b = [0u8; FRAME_SIZE];
        b[0] = 1;
        b[1] = 9;
        assert!(Frame::decode(&b).is_err());
        b[0] = 2;
        b[1] = 1;
        assert!(Frame::decode(&b).is_err());
    }

    proptest! {
        #[test]
        fn roundtrip(epoch: u16, byte: u8) {
            let f = Frame::sphinx(epoch, &[byte; SPHINX_PACKET_SIZE]).unwrap();
            let g = Frame::decode(f.as_bytes()).unwrap();
            prop_assert_eq!(g.key_epoch(), epoch);
            prop_assert_eq!(g.kind(), FrameKind::Sphinx);
            prop_assert_eq!(f, g);
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..3000)) {
            let _ = Frame::decode(&bytes);
        }
    }
}

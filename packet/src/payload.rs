//! The plaintext an exit gateway recovers from a forward packet, and what is inside it.
//!
//! ```text
//! exit plaintext (PLAINTEXT_SIZE)
//! | ack slot: SURB (396) | ack message (32) | sealed body (BODY_SIZE)                    |
//!
//! sealed body, once the recipient opens its end-to-end seal (INNER_BODY_SIZE)
//! | kind (1) | fragment header (22) | fragment data (len) | zero padding               |
//!
//! ack message (ACK_MESSAGE_SIZE), the SURB's payload: the exit gateway reads the
//! key-epoch label, only the SURB's creator reads the reply that carries it
//! | kind = Ack (1) | ack id (16) | key-epoch label u16 (2) | zero padding (13)          |
//! ```
//! The exit gateway sees only the ack slot and an opaque sealed body. It turns the
//! SURB and ack message into an ack packet once the body is durable. Packets that need
//! no ack (drops) fill the slot with random bytes; the slot's first hop then names no
//! node and the gateway discards the ack.

use crate::sphinx::SURB_SIZE;
use crate::{PLAINTEXT_SIZE, PacketError};

/// Bytes the ack message occupies in the ack slot.
pub const ACK_MESSAGE_SIZE: usize = 32;
/// Bytes of the ack slot at the front of every exit plaintext.
pub const ACK_SLOT_SIZE: usize = SURB_SIZE + ACK_MESSAGE_SIZE;
/// Bytes of the end-to-end sealed body.
pub const BODY_SIZE: usize = PLAINTEXT_SIZE - ACK_SLOT_SIZE;
/// Bytes the end-to-end seal adds: an X25519 ephemeral key and an AEAD tag.
pub const SEAL_OVERHEAD: usize = 32 + 16;
/// Bytes of the body once unsealed.
pub const INNER_BODY_SIZE: usize = BODY_SIZE - SEAL_OVERHEAD;
/// Identifier of one packet awaiting acknowledgement.
pub type AckId = [u8; 16];

/// What a body (or ack message) carries. Only the recipient can read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum BodyKind {
    /// A fragment of a real message.
    Real = 1,
    /// Loop cover the client sent to itself.
    Loop = 2,
    /// Drop cover; discarded on arrival.
    Drop = 3,
    /// An acknowledgement of a real packet.
    Ack = 4,
}

impl BodyKind {
    pub fn from_u8(v: u8) -> Result<Self, PacketError> {
        Ok(match v {
            1 => BodyKind::Real,
            2 => BodyKind::Loop,
            3 => BodyKind::Drop,
            4 => BodyKind::Ack,
            other => {
                return Err(PacketError::Field {
                    what: "body kind",
                    value: other.into(),
                });
            }
        })
    }
}

/// The ack slot: a SURB and the message to send through it.
#[derive(Clone, PartialEq, Eq)]
pub struct AckSlot {
    pub surb: [u8; SURB_SIZE],
    pub message: [u8; ACK_MESSAGE_SIZE],
}

impl std::fmt::Debug for AckSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AckSlot(..)")
    }
}

/// Encodes the ack message for `id`, for a SURB built with the keys of the epoch
/// labelled `key_epoch_label`.
///
/// The exit gateway needs the label to frame the ack: a SURB does not say which
/// epoch's keys its header was built with, and near an epoch edge the gateway's
/// current document may not be the one the sender used. Every sender in an epoch uses
/// the same label, so it identifies no one.
pub fn ack_message(id: &AckId, key_epoch_label: u16) -> [u8; ACK_MESSAGE_SIZE] {
    let mut m = [0u8; ACK_MESSAGE_SIZE];
    m[0] = BodyKind::Ack as u8;
    m[1..17].copy_from_slice(id);
    m[17..19].copy_from_slice(&key_epoch_label.to_be_bytes());
    m
}

/// The key-epoch label an ack message carries (see [`ack_message`]).
pub fn ack_key_epoch_label(message: &[u8; ACK_MESSAGE_SIZE]) -> u16 {
    u16::from_be_bytes([message[17], message[18]])
}

/// Decodes an ack message read from a reply.
pub fn parse_ack_message(bytes: &[u8]) -> Result<AckId, PacketError> {
    if bytes.len() < 17 {
        return Err(PacketError::Length {
            what: "ack message",
            expected: ACK_MESSAGE_SIZE,
            got: bytes.len(),
        });
    }
    if BodyKind::from_u8(bytes[0])? != BodyKind::Ack {
        return Err(PacketError::Field {
            what: "ack message kind",
            value: bytes[0].into(),
        });
    }
    let mut id = [0u8; 16];
    id.copy_from_slice(&bytes[1..17]);
    Ok(id)
}

/// Joins an ack slot and a sealed body into an exit plaintext.
pub fn join_plaintext(slot: &AckSlot, sealed_body: &[u8]) -> Result<Vec<u8>, PacketError> {
    if sealed_body.len() != BODY_SIZE {
        return Err(PacketError::Length {
            what: "sealed body",
            expected: BODY_SIZE,
            got: sealed_body.len(),
        });
    }
    let mut out = Vec::with_capacity(PLAINTEXT_SIZE);
    out.extend_from_slice(&slot.surb);
    out.extend_from_slice(&slot.message);
    out.extend_from_slice(sealed_body);
    Ok(out)
}

/// Splits an exit plaintext into its ack slot and sealed body.
pub fn split_plaintext(plaintext: &[u8]) -> Result<(AckSlot, &[u8]), PacketError> {
    if plaintext.len() != PLAINTEXT_SIZE {
        return Err(PacketError::Length {
            what: "exit plaintext",
            expected: PLAINTEXT_SIZE,
            got: plaintext.len(),
        });
    }
    let mut surb = [0u8; SURB_SIZE];
    surb.copy_from_slice(&plaintext[..SURB_SIZE]);
    let mut message = [0u8; ACK_MESSAGE_SIZE];
    message.copy_from_slice(&plaintext[SURB_SIZE..ACK_SLOT_SIZE]);
    Ok((AckSlot { surb, message }, &plaintext[ACK_SLOT_SIZE..]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn sizes() {
        assert_eq!(SURB_SIZE, 396);
        assert_eq!(ACK_SLOT_SIZE, 428);
        assert_eq!(BODY_SIZE, 1603);
        assert_eq!(INNER_BODY_SIZE, 1555);
    }

    #[test]
    fn testvec_ack_message() {
        let m = ack_message(&[0x11; 16], 0x0102);
        assert_eq!(
            hex::encode(m),
            "0411111111111111111111111111111111010200000000000000000000000000"
        );
        assert_eq!(ack_key_epoch_label(&m), 0x0102);
        assert_eq!(parse_ack_message(&m).unwrap(), [0x11; 16]);
        assert!(parse_ack_message(&[2u8; 32]).is_err());
        assert!(parse_ack_message(&[4u8; 3]).is_err());
    }

    proptest! {
        #[test]
        fn plaintext_roundtrip(a: u8, b: u8, c: u8) {
            let slot = AckSlot { surb: [a; SURB_SIZE], message: [b; ACK_MESSAGE_SIZE] };
            let body = vec![c; BODY_SIZE];
            let p = join_plaintext(&slot, &body).unwrap();
            let (s2, b2) = split_plaintext(&p).unwrap();
            prop_assert_eq!(s2, slot);
            prop_assert_eq!(b2, &body[..]);
        }

        #[test]
        fn split_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2100)) {
            let _ = split_plaintext(&bytes);
            let _ = parse_ack_message(&bytes);
        }
    }
}

//! Fragmentation of messages of any length into fixed-size inner bodies, and reassembly.
//!
//! ```text
//! inner body (INNER_BODY_SIZE)
//! | kind (1) | message id (16) | index u16 | count u16 | len u16 | data (len) | zeros |
//! ```
//! Every fragment fills a whole body, so the last fragment of a message looks like all
//! the others once sealed.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use crate::PacketError;
use crate::payload::{BodyKind, INNER_BODY_SIZE};

/// Identifies a message across its fragments. Random, chosen by the sender.
pub type MessageId = [u8; 16];

/// Bytes of the fragment header after the kind byte.
pub const FRAGMENT_HEADER_SIZE: usize = 16 + 2 + 2 + 2;
/// Message bytes one fragment carries.
pub const FRAGMENT_DATA_SIZE: usize = INNER_BODY_SIZE - 1 - FRAGMENT_HEADER_SIZE;
/// The largest message that can be fragmented.
pub const MAX_MESSAGE_SIZE: usize = FRAGMENT_DATA_SIZE * u16::MAX as usize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FragmentHeader {
    pub message_id: MessageId,
    pub index: u16,
    pub count: u16,
    pub len: u16,
}

/// One fragment of a message, or a cover body (kind `Loop`/`Drop`, empty data).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fragment {
    pub kind: BodyKind,
    pub header: FragmentHeader,
    pub data: Vec<u8>,
}

impl Fragment {
    /// A cover body with no data; `id` lets a loop be matched when it returns.
    pub fn cover(kind: BodyKind, id: MessageId) -> Self {
        Fragment {
            kind,
            header: FragmentHeader {
                message_id: id,
                index: 0,
                count: 1,
                len: 0,
            },
            data: Vec::new(),
        }
    }

    /// Encodes into a whole inner body.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![0u8; INNER_BODY_SIZE];
        out[0] = self.kind as u8;
        out[1..17].copy_from_slice(&self.header.message_id);
        out[17..19].copy_from_slice(&self.header.index.to_be_bytes());
        out[19..21].copy_from_slice(&self.header.count.to_be_bytes());
        out[21..23].copy_from_slice(&self.header.len.to_be_bytes());
        let n = self.data.len().min(FRAGMENT_DATA_SIZE);
        out[23..23 + n].copy_from_slice(&self.data[..n]);
        out
    }

    /// Decodes an inner body received from a peer.
    pub fn decode(bytes: &[u8]) -> Result<Self, PacketError> {
        if bytes.len() != INNER_BODY_SIZE {
            return Err(PacketError::Length {
                what: "inner body",
                expected: INNER_BODY_SIZE,
                got: bytes.len(),
            });
        }
        let kind = BodyKind::from_u8(bytes[0])?;
        let mut message_id = [0u8; 16];
        message_id.copy_from_slice(&bytes[1..17]);
        let index = u16::from_be_bytes([bytes[17], bytes[18]]);
        let count = u16::from_be_bytes([bytes[19], bytes[20]]);
        let len = u16::from_be_bytes([bytes[21], bytes[22]]);
        if count == 0 || index >= count {
            return Err(PacketError::Field {
                what: "fragment index/count",
                value: (u64::from(index) << 16) | u64::from(count),
            });
        }
        if usize::from(len) > FRAGMENT_DATA_SIZE {
            return Err(PacketError::Field {
                what: "fragment length",
                value: len.into(),
            });
        }
        if bytes[23 + usize::from(len)..].iter().any(|&b| b != 0) {
            return Err(PacketError::Field {
                what: "fragment padding",
                value: 0,
            });
        }
        Ok(Fragment {
            kind,
            header: FragmentHeader {
                message_id,
                index,
                count,
                len,
            },
            data: bytes[23..23 + usize::from(len)].to_vec(),
        })
    }
}

/// Splits `message` into fragments of kind `Real`. An empty message is one empty fragment.
pub fn fragment(message_id: MessageId, message: &[u8]) -> Result<Vec<Fragment>, PacketError> {
    if message.len() > MAX_MESSAGE_SIZE {
        return Err(PacketError::MessageTooLarge {
            len: message.len(),
            max: MAX_MESSAGE_SIZE,
        });
    }
    let chunks: Vec<&[u8]> = if message.is_empty() {
        vec![&[]]
    } else {
        message.chunks(FRAGMENT_DATA_SIZE).collect()
    };
    let count = chunks.len() as u16;
    Ok(chunks
        .into_iter()
        .enumerate()
        .map(|(i, c)| Fragment {
            kind: BodyKind::Real,
            header: FragmentHeader {
                message_id,
                index: i as u16,
                count,
                len: c.len() as u16,
            },
            data: c.to_vec(),
        })
        .collect())
}

/// Limits that keep a reassembler's memory bounded against a peer that sends
/// first fragments and never the rest.
#[derive(Debug, Clone, Copy)]
pub struct ReassemblyLimits {
    /// Incomplete messages held at once; the oldest is evicted beyond this.
    pub max_pending: usize,
    /// An incomplete message is dropped this long after its first fragment.
    pub timeout: Duration,
    /// Completed message ids remembered to drop late duplicates.
    pub remember_completed: usize,
}

impl Default for ReassemblyLimits {
    fn default() -> Self {
        ReassemblyLimits {
            max_pending: 1024,
            timeout: Duration::from_secs(24 * 3600),
            remember_completed: 65536,
        }
    }
}

#[derive(Debug)]
struct Partial {
    first_seen: Instant,
    count: u16,
    received: usize,
    parts: Vec<Option<Vec<u8>>>,
}

/// What became of a fragment handed to the reassembler.
#[derive(Debug, PartialEq, Eq)]
pub enum Reassembled {
    /// Stored; more fragments are needed.
    Pending,
    /// The message is complete.
    Complete {
        message_id: MessageId,
        message: Vec<u8>,
    },
    /// A duplicate of a fragment or of a completed message; ignored.
    Duplicate,
    /// Inconsistent with earlier fragments of the same id; ignored.
    Inconsistent,
}

/// Collects fragments into messages, de-duplicating on the way.
#[derive(Debug)]
pub struct Reassembler {
    limits: ReassemblyLimits,
    pending: HashMap<MessageId, Partial>,
    order: VecDeque<MessageId>,
    completed: HashMap<MessageId, ()>,
    completed_order: VecDeque<MessageId>,
}

impl Reassembler {
    pub fn new(limits: ReassemblyLimits) -> Self {
        Reassembler {
            limits,
            pending: HashMap::new(),
            order: VecDeque::new(),
            completed: HashMap::new(),
            completed_order: VecDeque::new(),
        }
    }

    /// Incomplete messages currently held.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    pub fn insert(&mut self, fragment: Fragment, now: Instant) -> Reassembled {
        self.expire(now);
        let h = fragment.header;
        if self.completed.contains_key(&h.message_id) {
            return Reassembled::Duplicate;
        }
        if h.count == 1 {
            self.mark_completed(h.message_id);
            return Reassembled::Complete {
                message_id: h.message_id,
                message: fragment.data,
            };
        }
        if !self.pending.contains_key(&h.message_id) {
            if self.pending.len() >= self.limits.max_pending
                && let Some(oldest) = self.order.pop_front()
            {
                self.pending.remove(&oldest);
            }
            self.order.push_back(h.message_id);
            self.pending.insert(
                h.message_id,
                Partial {
                    first_seen: now,
                    count: h.count,
                    received: 0,
                    parts: vec![None; usize::from(h.count)],
                },
            );
        }
        let Some(p) = self.pending.get_mut(&h.message_id) else {
            return Reassembled::Inconsistent;
        };
        if p.count != h.count {
            return Reassembled::Inconsistent;
        }
        let slot = &mut p.parts[usize::from(h.index)];
        if slot.is_some() {
            return Reassembled::Duplicate;
        }
        *slot = Some(fragment.data);
        p.received += 1;
        if p.received < usize::from(p.count) {
            return Reassembled::Pending;
        }
        let Some(p) = self.pending.remove(&h.message_id) else {
            return Reassembled::Inconsistent;
        };
        self.order.retain(|id| id != &h.message_id);
        self.mark_completed(h.message_id);
        let message = p.parts.into_iter().flatten().flatten().collect();
        Reassembled::Complete {
            message_id: h.message_id,
            message,
        }
    }

    /// Drops incomplete messages older than the timeout.
    pub fn expire(&mut self, now: Instant) {
        while let Some(id) = self.order.front().copied() {
            let expired = self
                .pending
                .get(&id)
                .is_none_or(|p| now.saturating_duration_since(p.first_seen) >= self.limits.timeout);
            if !expired {
                break;
            }
            self.order.pop_front();
            self.pending.remove(&id);
        }
    }

    fn mark_completed(&mut self, id: MessageId) {
        self.completed.insert(id, ());
        self.completed_order.push_back(id);
        while self.completed_order.len() > self.limits.remember_completed {
            if let Some(old) = self.completed_order.pop_front() {
                self.completed.remove(&old);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn testvec_fragment() {
        let f = Fragment {
            kind: BodyKind::Real,
            header: FragmentHeader {
                message_id: [0xaa; 16],
                index: 1,
                count: 3,
                len: 2,
            },
            data: vec![0xde, 0xad],
        };
        let e = f.encode();
        assert_eq!(e.len(), INNER_BODY_SIZE);
        assert_eq!(
            hex::encode(&e[..27]),
            "01aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa000100030002dead0000"
        );
        assert_eq!(Fragment::decode(&e).unwrap(), f);
    }

    #[test]
    fn rejects_bad_fragments() {
        let mut e = Fragment::cover(BodyKind::Loop, [1; 16]).encode();
        assert!(Fragment::decode(&e).is_ok());
        e[19..21].copy_from_slice(&0u16.to_be_bytes());
        assert!(Fragment::decode(&e).is_err(), "count 0");
        e[19..21].copy_from_slice(&1u16.to_be_bytes());
        e[21..23].copy_from_slice(&u16::MAX.to_be_bytes());
        assert!(Fragment::decode(&e).is_err(), "len too large");
        e[21..23].copy_from_slice(&0u16.to_be_bytes());
        e[100] = 1;
        assert!(Fragment::decode(&e).is_err(), "nonzero padding");
        assert!(Fragment::decode(&e[..10]).is_err());
    }

    #[test]
    fn duplicates_and_bounds() {
        let now = Instant::now();
        let mut r = Reassembler::new(ReassemblyLimits {
            max_pending: 2,
            timeout: Duration::from_secs(10),
            remember_completed: 4,
        });
        let msg = vec![7u8; FRAGMENT_DATA_SIZE * 2 + 5];
        let frags = fragment([1; 16], &msg).unwrap();
        assert_eq!(frags.len(), 3);
        assert_eq!(r.insert(frags[0].clone(), now), Reassembled::Pending);
        assert_eq!(r.insert(frags[0].clone(), now), Reassembled::Duplicate);
        assert_eq!(r.insert(frags[2].clone(), now), Reassembled::Pending);
        assert!(matches!(
            r.insert(frags[1].clone(), now),
            Reassembled::Complete { .. }
        ));
        assert_eq!(r.insert(frags[1].clone(), now), Reassembled::Duplicate);
        // Pending messages are bounded and expire.
        for i in 2..6u8 {
            let f = fragment([i; 16], &msg).unwrap();
            r.insert(f[0].clone(), now);
        }
        assert_eq!(r.pending(), 2);
        r.expire(now + Duration::from_secs(11));
        assert_eq!(r.pending(), 0);
    }

    proptest! {
        #[test]
        fn fragment_roundtrip(msg in proptest::collection::vec(any::<u8>(), 0..6000), seed: u64) {
            let frags = fragment([5; 16], &msg).unwrap();
            let mut encoded: Vec<Vec<u8>> = frags.iter().map(Fragment::encode).collect();
            // Deliver in a shuffled order with a duplicate.
            let n = encoded.len();
            encoded.rotate_left((seed as usize) % n);
            encoded.push(encoded[0].clone());
            let mut r = Reassembler::new(ReassemblyLimits::default());
            let now = Instant::now();
            let mut out = None;
            for e in encoded {
                if let Reassembled::Complete { message, .. } = r.insert(Fragment::decode(&e).unwrap(), now) {
                    prop_assert!(out.is_none());
                    out = Some(message);
                }
            }
            prop_assert_eq!(out, Some(msg));
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), INNER_BODY_SIZE..=INNER_BODY_SIZE)) {
            let _ = Fragment::decode(&bytes);
        }
    }
}

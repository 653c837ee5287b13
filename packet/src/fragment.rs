//! Fragmentation of messages of any length into fixed-size inner bodies, and reassembly.
//!
//! ```text
//! inner body (INNER_BODY_SIZE)
//! | kind (1) | message id (16) | index u16 | count u16 | len u16 | data (len) | zeros |
//! ```
//! Every fragment fills a whole body, so the last fragment of a message looks like all
//! the others once sealed.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
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
    /// Incomplete messages held at once; beyond this one is dropped (see
    /// [`Reassembler`] for which).
    pub max_pending: usize,
    /// Message bytes held across all incomplete messages; beyond this one is dropped.
    /// A message that could never fit (its fragment count says it is larger) is
    /// refused at its first fragment.
    pub max_bytes: usize,
    /// An incomplete message is dropped once no new fragment of it arrived for this long.
    pub timeout: Duration,
    /// Completed message ids remembered to drop late duplicates.
    pub remember_completed: usize,
}

impl Default for ReassemblyLimits {
    fn default() -> Self {
        ReassemblyLimits {
            max_pending: 1024,
            max_bytes: 32 << 20,
            timeout: Duration::from_secs(24 * 3600),
            remember_completed: 65536,
        }
    }
}

/// One incomplete message: only the fragments received are held (a fragment count
/// from the network allocates nothing).
#[derive(Debug)]
struct Partial {
    count: u16,
    /// When a new fragment of it last arrived (its key in `Reassembler::lru`).
    progress: (Instant, u64),
    bytes: usize,
    parts: BTreeMap<u16, Vec<u8>>,
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
    /// Its message could never be held within [`ReassemblyLimits::max_bytes`]; ignored.
    TooLarge,
}

/// Collects fragments into messages, de-duplicating on the way. Memory is bounded by
/// [`ReassemblyLimits`] whatever the network sends. When it is full, the incomplete
/// message with the fewest fragments received goes first, the least recently
/// progressed among equals: junk costs its sender one packet per fragment, so to push
/// out a message that already has k fragments an attacker must send more than k
/// fragments for every message the limit holds, however long the real sender pauses.
///
/// Every message dropped incomplete (evicted or expired) is reported once by
/// [`Self::take_dropped`], so a caller that persists partial messages can forget it.
#[derive(Debug)]
pub struct Reassembler {
    limits: ReassemblyLimits,
    pending: HashMap<MessageId, Partial>,
    /// Pending messages by (last progress, insertion counter): the front expires first.
    lru: BTreeSet<((Instant, u64), MessageId)>,
    /// Pending messages by (fragments received, last progress): the front is evicted
    /// first when a limit is reached.
    victims: BTreeSet<(usize, (Instant, u64), MessageId)>,
    next_seq: u64,
    bytes: usize,
    completed: HashSet<MessageId>,
    completed_order: VecDeque<MessageId>,
    dropped: Vec<MessageId>,
}

impl Reassembler {
    pub fn new(limits: ReassemblyLimits) -> Self {
        Reassembler {
            limits,
            pending: HashMap::new(),
            lru: BTreeSet::new(),
            victims: BTreeSet::new(),
            next_seq: 0,
            bytes: 0,
            completed: HashSet::new(),
            completed_order: VecDeque::new(),
            dropped: Vec::new(),
        }
    }

    /// Incomplete messages currently held.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Message bytes currently held in incomplete messages.
    pub fn bytes_held(&self) -> usize {
        self.bytes
    }

    /// Ids of incomplete messages dropped (evicted or expired) since the last call (at
    /// most `2 × max_pending + 2` are kept between calls).
    pub fn take_dropped(&mut self) -> Vec<MessageId> {
        std::mem::take(&mut self.dropped)
    }

    pub fn insert(&mut self, fragment: Fragment, now: Instant) -> Reassembled {
        self.expire(now);
        let h = fragment.header;
        if self.completed.contains(&h.message_id) {
            return Reassembled::Duplicate;
        }
        if h.count == 1 {
            self.mark_completed(h.message_id);
            return Reassembled::Complete {
                message_id: h.message_id,
                message: fragment.data,
            };
        }
        // The smallest size `count` fragments can carry.
        let least = usize::from(h.count - 1) * FRAGMENT_DATA_SIZE + 1;
        if least > self.limits.max_bytes {
            return Reassembled::TooLarge;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let progress = (now, seq);
        match self.pending.get_mut(&h.message_id) {
            Some(p) if p.count != h.count => return Reassembled::Inconsistent,
            Some(p) if p.parts.contains_key(&h.index) => return Reassembled::Duplicate,
            Some(p) => {
                self.lru.remove(&(p.progress, h.message_id));
                self.victims
                    .remove(&(p.parts.len(), p.progress, h.message_id));
                p.progress = progress;
                self.lru.insert((progress, h.message_id));
            }
            None => {
                self.pending.insert(
                    h.message_id,
                    Partial {
                        count: h.count,
                        progress,
                        bytes: 0,
                        parts: BTreeMap::new(),
                    },
                );
                self.lru.insert((progress, h.message_id));
            }
        }
        let len = fragment.data.len();
        if let Some(p) = self.pending.get_mut(&h.message_id) {
            p.bytes += len;
            p.parts.insert(h.index, fragment.data);
            self.victims
                .insert((p.parts.len(), p.progress, h.message_id));
        }
        self.bytes += len;
        // Make room: fewest fragments first, never the message just fed.
        while self.pending.len() > self.limits.max_pending || self.bytes > self.limits.max_bytes {
            let victim = self
                .victims
                .iter()
                .map(|(_, _, id)| *id)
                .find(|id| *id != h.message_id);
            let Some(victim) = victim else { break };
            self.drop_partial(&victim);
        }
        let complete = self
            .pending
            .get(&h.message_id)
            .is_some_and(|p| p.parts.len() == usize::from(p.count));
        if !complete {
            return Reassembled::Pending;
        }
        let Some(p) = self.remove(&h.message_id) else {
            return Reassembled::Inconsistent;
        };
        self.mark_completed(h.message_id);
        Reassembled::Complete {
            message_id: h.message_id,
            message: p.parts.into_values().flatten().collect(),
        }
    }

    fn remove(&mut self, id: &MessageId) -> Option<Partial> {
        let p = self.pending.remove(id)?;
        self.lru.remove(&(p.progress, *id));
        self.victims.remove(&(p.parts.len(), p.progress, *id));
        self.bytes -= p.bytes;
        Some(p)
    }

    fn drop_partial(&mut self, id: &MessageId) {
        // Bounded for callers that never take them (they lose the overflow only).
        if self.remove(id).is_some() && self.dropped.len() < 2 * self.limits.max_pending + 2 {
            self.dropped.push(*id);
        }
    }

    /// Drops incomplete messages that made no progress for the timeout.
    pub fn expire(&mut self, now: Instant) {
        while let Some(&((at, _), id)) = self.lru.first() {
            if now.saturating_duration_since(at) < self.limits.timeout {
                break;
            }
            self.drop_partial(&id);
        }
    }

    fn mark_completed(&mut self, id: MessageId) {
        if !self.completed.insert(id) {
            return;
        }
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
            max_bytes: 1 << 20,
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
        assert_eq!(r.take_dropped().len(), 2, "evictions are reported");
        r.expire(now + Duration::from_secs(11));
        assert_eq!(r.pending(), 0);
        assert_eq!(r.take_dropped().len(), 2, "expiries are reported");
        assert_eq!(r.bytes_held(), 0);
    }

    fn junk(i: u32, count: u16, index: u16) -> Fragment {
        let mut id = [0u8; 16];
        id[..4].copy_from_slice(&i.to_be_bytes());
        Fragment {
            kind: BodyKind::Real,
            header: FragmentHeader {
                message_id: id,
                index,
                count,
                len: FRAGMENT_DATA_SIZE as u16,
            },
            data: vec![0x6a; FRAGMENT_DATA_SIZE],
        }
    }

    /// Hole 11: first fragments of messages that claim up to 65,535 fragments, far more
    /// of them than the limits admit. Held bytes stay within the byte bound (one
    /// fragment over at most), the count within its bound, and a message that could
    /// never fit is refused at once. (Before, each partial allocated a slot per claimed
    /// fragment: 1.5 MB for a count of 65,535, 1.6 GB across 1,024 pending.)
    #[test]
    fn rogue_partial_message_flood_stays_within_the_memory_bound() {
        let limits = ReassemblyLimits {
            max_pending: 1024,
            max_bytes: 4 << 20,
            ..ReassemblyLimits::default()
        };
        let mut r = Reassembler::new(limits);
        let now = Instant::now();
        let fits = (limits.max_bytes / FRAGMENT_DATA_SIZE) as u16;
        let (mut too_large, mut dropped) = (0, 0);
        for i in 0..20_000u32 {
            let count = [2, fits, fits + 2, u16::MAX][(i % 4) as usize];
            match r.insert(junk(i, count, (i % 2) as u16), now) {
                Reassembled::TooLarge => too_large += 1,
                Reassembled::Pending => {}
                other => panic!("{other:?}"),
            }
            dropped += r.take_dropped().len();
            assert!(r.pending() <= limits.max_pending);
            assert!(r.bytes_held() <= limits.max_bytes + FRAGMENT_DATA_SIZE);
        }
        assert_eq!(
            too_large, 10_000,
            "counts beyond the byte bound are refused"
        );
        assert_eq!(
            dropped + r.pending(),
            10_000,
            "every other one is held or dropped"
        );
    }

    /// Hole 11: a flood of junk partials does not displace a legitimate message that is
    /// still arriving (one fragment per second here, while the flood sends 50 junk
    /// first fragments per second into a reassembler that holds 64 partials).
    #[test]
    fn rogue_junk_flood_does_not_evict_a_message_still_arriving() {
        let mut r = Reassembler::new(ReassemblyLimits {
            max_pending: 64,
            max_bytes: 1 << 20,
            ..ReassemblyLimits::default()
        });
        let t0 = Instant::now();
        let msg = vec![7u8; FRAGMENT_DATA_SIZE * 100];
        let frags = fragment([0xaa; 16], &msg).unwrap();
        let (mut out, mut n, mut dropped) = (None, 0, 0);
        for (sec, f) in frags.into_iter().enumerate() {
            let now = t0 + Duration::from_secs(sec as u64);
            for _ in 0..50 {
                n += 1;
                let _ = r.insert(junk(n, 2, 0), now);
                dropped += r.take_dropped().len();
            }
            if let Reassembled::Complete { message, .. } = r.insert(f, now) {
                out = Some(message);
            }
        }
        assert_eq!(out, Some(msg));
        assert!(dropped >= 4_900, "the junk was evicted instead: {dropped}");
    }

    /// Review finding: the real sender pauses (a phone asleep) for longer than a junk
    /// flood of one fragment per message takes to fill the limit. Evicting least
    /// recently progressed first lost the real message, whose fragments the gateway had
    /// already forgotten; evicting fewest-fragments first keeps it.
    #[test]
    fn rogue_junk_flood_does_not_evict_a_message_whose_sender_paused() {
        let mut r = Reassembler::new(ReassemblyLimits {
            max_pending: 64,
            max_bytes: 1 << 20,
            ..ReassemblyLimits::default()
        });
        let t0 = Instant::now();
        let msg = vec![9u8; FRAGMENT_DATA_SIZE * 5];
        let mut frags = fragment([0xbb; 16], &msg).unwrap().into_iter();
        for f in frags.by_ref().take(2) {
            assert_eq!(r.insert(f, t0), Reassembled::Pending);
        }
        // The pause: 10,000 junk first fragments, 150 times the limit.
        for n in 0..10_000 {
            let _ = r.insert(junk(n, 2, 0), t0 + Duration::from_millis(u64::from(n)));
        }
        assert!(r.pending() <= 64);
        let later = t0 + Duration::from_secs(3600);
        let mut out = None;
        for f in frags {
            if let Reassembled::Complete { message, .. } = r.insert(f, later) {
                out = Some(message);
            }
        }
        assert_eq!(out, Some(msg), "the paused message was evicted by junk");
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

//! Replay filter keyed by the Sphinx replay tag, one generation per key epoch.
//!
//! A packet can only be unwrapped with the key of the epoch it was built for, so tags
//! of epoch `e` need remembering only while the key of `e` is held. When a key is
//! retired, its generation is dropped with it, which bounds memory by the traffic of
//! the epochs in flight (current, next, and the previous one during its grace period).
//!
//! The filter is shared by all unwrapping workers: it is sharded so that workers
//! rarely contend, and each shard stores a 128-bit fingerprint of the tag (the tag is
//! an HKDF output, so any 16 bytes of it are uniformly distributed).

use std::collections::HashSet;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, RwLock};

/// The replay tag `sphinx-packet` derives from a packet's shared secret.
pub type ReplayTag = [u8; sphinx_packet::constants::REPLAY_TAG_SIZE];

/// What the filter says about a tag being recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayVerdict {
    /// First time seen; now recorded.
    Fresh,
    /// Seen before in this epoch.
    Replayed,
    /// No generation is open for that epoch.
    UnknownEpoch,
    /// The generation reached capacity. The packet must be shed.
    Full,
}

const SHARDS: usize = 16;

/// Tags are uniformly random, so their low bits are already a good hash.
#[derive(Default)]
struct FingerprintHasher(u64);

impl Hasher for FingerprintHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            self.0 ^= u64::from_le_bytes(b);
        }
    }
    fn write_u128(&mut self, v: u128) {
        self.0 = v as u64;
    }
}

type Shard = Mutex<HashSet<u128, BuildHasherDefault<FingerprintHasher>>>;

struct Generation {
    epoch: u64,
    shards: Vec<Shard>,
    len: AtomicUsize,
    /// Tags recorded per upstream (the first 8 bytes of its key). At most one entry per
    /// peer that may send to this node, which the directory bounds.
    per_upstream: Mutex<std::collections::HashMap<u64, usize>>,
}

impl Generation {
    fn new(epoch: u64) -> Self {
        Generation {
            epoch,
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            len: AtomicUsize::new(0),
            per_upstream: Mutex::default(),
        }
    }
}

fn split(tag: &ReplayTag) -> (usize, u128) {
    let mut fp = [0u8; 16];
    fp.copy_from_slice(&tag[..16]);
    let fp = u128::from_le_bytes(fp);
    // The shard comes from bits the in-shard hash does not use.
    (usize::from(tag[16]) % SHARDS, fp)
}

/// A set of replay tags per open key epoch, bounded by `capacity` tags per epoch.
pub struct ReplayFilter {
    generations: RwLock<Vec<Generation>>,
    capacity: usize,
}

impl std::fmt::Debug for ReplayFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplayFilter")
            .field("epochs", &self.epochs())
            .field("capacity", &self.capacity)
            .finish()
    }
}

impl ReplayFilter {
    /// A filter with one open generation for `epoch`.
    pub fn new(epoch: u64, capacity: usize) -> Self {
        ReplayFilter {
            generations: RwLock::new(vec![Generation::new(epoch)]),
            capacity,
        }
    }

    /// Opens a generation for `epoch` if none exists.
    pub fn open(&self, epoch: u64) {
        let mut gens = self.generations.write().unwrap_or_else(|e| e.into_inner());
        if !gens.iter().any(|g| g.epoch == epoch) {
            gens.push(Generation::new(epoch));
        }
    }

    /// Drops every generation older than `epoch`, with its tags.
    pub fn retire_before(&self, epoch: u64) {
        let mut gens = self.generations.write().unwrap_or_else(|e| e.into_inner());
        gens.retain(|g| g.epoch >= epoch);
    }

    /// Epochs with an open generation, oldest first.
    pub fn epochs(&self) -> Vec<u64> {
        let gens = self.generations.read().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<u64> = gens.iter().map(|g| g.epoch).collect();
        v.sort_unstable();
        v
    }

    /// Whether `tag` was recorded in `epoch`. Cheap pre-check before unwrapping.
    pub fn contains(&self, epoch: u64, tag: &ReplayTag) -> bool {
        let gens = self.generations.read().unwrap_or_else(|e| e.into_inner());
        let (shard, fp) = split(tag);
        gens.iter().find(|g| g.epoch == epoch).is_some_and(|g| {
            g.shards[shard]
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains(&fp)
        })
    }

    /// Records `tag` for `epoch`, atomically with the check.
    pub fn insert(&self, epoch: u64, tag: &ReplayTag) -> ReplayVerdict {
        let gens = self.generations.read().unwrap_or_else(|e| e.into_inner());
        let Some(generation) = gens.iter().find(|g| g.epoch == epoch) else {
            return ReplayVerdict::UnknownEpoch;
        };
        let (shard, fp) = split(tag);
        let mut set = generation.shards[shard]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if set.contains(&fp) {
            return ReplayVerdict::Replayed;
        }
        if generation.len.load(Ordering::Relaxed) >= self.capacity {
            return ReplayVerdict::Full;
        }
        set.insert(fp);
        generation.len.fetch_add(1, Ordering::Relaxed);
        ReplayVerdict::Fresh
    }

    /// Records `tag` for `epoch` as sent by `upstream`, which may hold at most
    /// `capacity / shares` tags of the generation: one upstream filling the filter
    /// would otherwise force `Full` on every other sender until the epoch ends.
    /// `shares` is the number of peers that may send to this node (at least 1; with 1,
    /// the only limit is the capacity). Frames the node injects itself have no upstream
    /// and use [`ReplayFilter::insert`].
    pub fn insert_from(
        &self,
        epoch: u64,
        tag: &ReplayTag,
        upstream: &[u8; 32],
        shares: usize,
    ) -> ReplayVerdict {
        let gens = self.generations.read().unwrap_or_else(|e| e.into_inner());
        let Some(generation) = gens.iter().find(|g| g.epoch == epoch) else {
            return ReplayVerdict::UnknownEpoch;
        };
        let share = (self.capacity / shares.max(1)).max(1);
        let key = u64::from_le_bytes([
            upstream[0],
            upstream[1],
            upstream[2],
            upstream[3],
            upstream[4],
            upstream[5],
            upstream[6],
            upstream[7],
        ]);
        let (shard, fp) = split(tag);
        let mut set = generation.shards[shard]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if set.contains(&fp) {
            return ReplayVerdict::Replayed;
        }
        if generation.len.load(Ordering::Relaxed) >= self.capacity {
            return ReplayVerdict::Full;
        }
        let mut counts = generation
            .per_upstream
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let used = counts.entry(key).or_default();
        if *used >= share {
            return ReplayVerdict::Full;
        }
        *used += 1;
        set.insert(fp);
        generation.len.fetch_add(1, Ordering::Relaxed);
        ReplayVerdict::Fresh
    }

    /// Tags held across all generations.
    pub fn len(&self) -> usize {
        let gens = self.generations.read().unwrap_or_else(|e| e.into_inner());
        gens.iter().map(|g| g.len.load(Ordering::Relaxed)).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tag(i: u32) -> ReplayTag {
        let mut t = [0u8; 32];
        t[..4].copy_from_slice(&i.to_le_bytes());
        t[16] = (i % 251) as u8;
        t
    }

    /// A filter-filling upstream: one peer sends fresh tags without end. With the
    /// per-upstream share it fills only its share and the other upstreams keep
    /// getting through; without it (one share) it fills the filter and everyone else
    /// is shed for the rest of the epoch.
    #[test]
    fn sybil_filter_filling_upstream_is_held_to_its_share() {
        let (flooder, honest) = ([1u8; 32], [2u8; 32]);
        let run = |shares: usize| {
            let f = ReplayFilter::new(0, 1000);
            let taken = (0..5000)
                .filter(|&i| f.insert_from(0, &tag(i), &flooder, shares) == ReplayVerdict::Fresh)
                .count();
            let honest_ok = (10_000..10_100)
                .filter(|&i| f.insert_from(0, &tag(i), &honest, shares) == ReplayVerdict::Fresh)
                .count();
            // Replays are still caught, whoever sends them.
            assert_eq!(
                f.insert_from(0, &tag(0), &honest, shares),
                ReplayVerdict::Replayed
            );
            (taken, honest_ok)
        };
        assert_eq!(run(4), (250, 100));
        assert_eq!(run(1), (1000, 0), "the attack, with no shares");
    }

    #[test]
    fn detects_replays_per_epoch() {
        let f = ReplayFilter::new(5, 100);
        assert_eq!(f.insert(5, &tag(1)), ReplayVerdict::Fresh);
        assert!(f.contains(5, &tag(1)));
        assert_eq!(f.insert(5, &tag(1)), ReplayVerdict::Replayed);
        assert_eq!(f.insert(6, &tag(1)), ReplayVerdict::UnknownEpoch);
        f.open(6);
        assert_eq!(f.insert(6, &tag(1)), ReplayVerdict::Fresh);
        f.retire_before(6);
        assert_eq!(f.epochs(), vec![6]);
        assert_eq!(f.insert(5, &tag(1)), ReplayVerdict::UnknownEpoch);
        assert_eq!(f.len(), 1);
    }

    #[test]
    fn capacity_is_a_hard_bound() {
        let f = ReplayFilter::new(0, 10);
        for i in 0..10 {
            assert_eq!(f.insert(0, &tag(i)), ReplayVerdict::Fresh);
        }
        assert_eq!(f.insert(0, &tag(10)), ReplayVerdict::Full);
        assert_eq!(f.insert(0, &tag(3)), ReplayVerdict::Replayed);
        assert_eq!(f.len(), 10);
    }
}

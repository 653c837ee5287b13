//! Fair shares of the worker queues among inbound peers.
//!
//! Without them a peer that floods a relay fills the worker queues, and every other
//! peer's frames meet full queues and are shed with it: the flooder decides who gets
//! through. Here each inbound peer (one Ed25519 link key, however many links or
//! streams it opens) may have at most `capacity / peers` frames waiting for the
//! workers, so a flooder is held to its own share and a peer sending within its share
//! is never shed because of someone else. Frames over a peer's share are dropped and
//! counted as `peer_limit`, before any public-key work.
//!
//! The share follows the number of peers with an open link. A lone peer has no share
//! limit at all: there is no one to be fair to, and its excess is shed as `overload`
//! when the queues fill, as before. Frames a gateway injects for its own
//! clients are limited per account by the gateway and do not count against a share.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use shoal_link::NodeKey;

/// A share never drops below one worker batch, however many peers there are; the
/// global bound still holds (every worker queue full ⇒ `overload`).
pub(crate) const MIN_SHARE: usize = 64;

/// The most frames one of `peers` peers may have waiting when the queues hold
/// `capacity` frames in all (unlimited for a lone peer).
pub(crate) fn fair_share(capacity: usize, peers: usize) -> usize {
    if peers <= 1 {
        return usize::MAX;
    }
    (capacity / peers).max(MIN_SHARE).min(capacity.max(1))
}

/// Frames of one peer waiting for a worker.
#[derive(Debug, Default)]
pub(crate) struct PeerQueue {
    queued: AtomicUsize,
}

impl PeerQueue {
    /// Takes a place for one frame if the peer is under `share`.
    fn try_take(&self, share: usize) -> bool {
        self.queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| {
                (q < share).then_some(q + 1)
            })
            .is_ok()
    }

    /// A worker took one of this peer's frames off its queue (or it was shed).
    pub(crate) fn release(&self) {
        let _ = self
            .queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| q.checked_sub(1));
    }
}

/// The inbound peers with an open link, and their queued frames.
#[derive(Debug)]
pub(crate) struct PeerShares {
    capacity: usize,
    /// Each peer's queue count and how many of its links are open.
    peers: Mutex<HashMap<NodeKey, (Arc<PeerQueue>, usize)>>,
    active: AtomicUsize,
}

/// One link's hold on its peer's queue count; dropping the last one forgets the peer.
#[derive(Debug)]
pub(crate) struct PeerSlot {
    peer: NodeKey,
    queue: Arc<PeerQueue>,
    shares: Arc<PeerShares>,
}

impl PeerShares {
    /// Shares of worker queues that hold `capacity` frames in all.
    pub(crate) fn new(capacity: usize) -> Arc<Self> {
        Arc::new(PeerShares {
            capacity,
            peers: Mutex::new(HashMap::new()),
            active: AtomicUsize::new(0),
        })
    }

    /// The slot of `peer`, shared with its other links.
    pub(crate) fn join(self: &Arc<Self>, peer: NodeKey) -> PeerSlot {
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        let entry = peers
            .entry(peer)
            .or_insert_with(|| (Arc::new(PeerQueue::default()), 0));
        entry.1 += 1;
        let queue = entry.0.clone();
        self.active.store(peers.len(), Ordering::Relaxed);
        PeerSlot {
            peer,
            queue,
            shares: self.clone(),
        }
    }

    /// Peers with an open link.
    pub(crate) fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// The current share of each peer.
    pub(crate) fn share(&self) -> usize {
        fair_share(self.capacity, self.active())
    }
}

impl PeerSlot {
    /// Takes a place for one frame in this peer's share; `false` if it is full.
    pub(crate) fn try_take(&self) -> bool {
        self.queue.try_take(self.shares.share())
    }

    /// The counter a worker releases when it takes the frame.
    pub(crate) fn queue(&self) -> Arc<PeerQueue> {
        self.queue.clone()
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut peers = self.shares.peers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = peers.get_mut(&self.peer) {
            entry.1 = entry.1.saturating_sub(1);
            if entry.1 == 0 {
                peers.remove(&self.peer);
            }
        }
        self.shares.active.store(peers.len(), Ordering::Relaxed);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn the_share_divides_the_queue_with_a_floor() {
        assert_eq!(fair_share(8192, 0), usize::MAX);
        assert_eq!(fair_share(8192, 1), usize::MAX);
        assert_eq!(fair_share(8192, 2), 4096);
        assert_eq!(fair_share(8192, 1000), MIN_SHARE);
        assert_eq!(fair_share(10, 3), 10);
        assert_eq!(fair_share(100, 3), 64);
    }

    #[test]
    fn a_flooding_peer_is_held_to_its_share_and_others_still_get_in() {
        let shares = PeerShares::new(1000);
        let flooder = shares.join([1; 32]);
        let honest = shares.join([2; 32]);
        assert_eq!(shares.active(), 2);
        // The flooder never lets its frames be worked off.
        let taken = (0..10_000).filter(|_| flooder.try_take()).count();
        assert_eq!(taken, 500);
        // The honest peer's frames are all admitted, and worked off as usual.
        for _ in 0..10_000 {
            assert!(honest.try_take());
            honest.queue().release();
        }
        // Once the flooder's frames are worked off it is admitted again.
        flooder.queue().release();
        assert!(flooder.try_take());
    }

    #[test]
    fn links_of_one_peer_share_one_count_and_leaving_frees_the_share() {
        let shares = PeerShares::new(1000);
        let a1 = shares.join([1; 32]);
        let a2 = shares.join([1; 32]);
        let b = shares.join([2; 32]);
        assert_eq!(shares.active(), 2);
        assert_eq!((0..1000).filter(|_| a1.try_take()).count(), 500);
        assert!(!a2.try_take(), "a second link does not get a second share");
        drop(b);
        assert_eq!(shares.active(), 1);
        // Alone, the peer is limited only by the queues themselves.
        assert_eq!((0..1000).filter(|_| a2.try_take()).count(), 1000);
        drop(a1);
        assert_eq!(shares.active(), 1);
        drop(a2);
        assert_eq!(shares.active(), 0);
    }
}

//! The sans-IO mixing core: unwrap → replay check → Exp(μ) delay queue → forward.
//!
//! [`Unwrapper`] is the public-key half. It is `Sync` and shared by every worker
//! thread, so unwrapping runs on all cores. [`MixCore`] is the per-worker state
//! machine around it: `handle_packet(bytes, now)`, `poll_transmit(now)`,
//! `poll_timeout()`, `poll_event()`, and `handle_timeout(now, ..)` for loop cover.
//! It never reads a clock, a socket or the OS RNG.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use rand::{CryptoRng, RngExt};
use rand_distr::{Distribution, Exp};
use shoal_packet::sphinx::{self, MailboxAddress, SurbId, Unwrapped};
use shoal_packet::{Frame, FrameKind, PLAINTEXT_SIZE, PacketError, ReplayFilter};
use shoal_topology::route::sample_delays;
use shoal_topology::{EpochSchedule, NodeId, Topology};

use crate::KeyRing;

/// Why a packet was dropped. Each cause has its own counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Wrong size, version or kind.
    Malformed,
    /// The frame names a key epoch this node does not hold.
    UnknownEpoch,
    /// The Sphinx layer rejected it (MAC, routing info).
    BadPacket,
    /// Its replay tag was already seen.
    Replay,
    /// The replay filter is at capacity; shed rather than forwarded unchecked.
    ReplayFilterFull,
    /// The delay queue is full; shed.
    Overload,
    /// The next hop is not a node this relay can reach.
    NoRoute,
}

impl DropReason {
    pub const ALL: [DropReason; 7] = [
        DropReason::Malformed,
        DropReason::UnknownEpoch,
        DropReason::BadPacket,
        DropReason::Replay,
        DropReason::ReplayFilterFull,
        DropReason::Overload,
        DropReason::NoRoute,
    ];

    /// Label for metrics.
    pub fn label(self) -> &'static str {
        match self {
            DropReason::Malformed => "malformed",
            DropReason::UnknownEpoch => "unknown_epoch",
            DropReason::BadPacket => "bad_packet",
            DropReason::Replay => "replay",
            DropReason::ReplayFilterFull => "replay_filter_full",
            DropReason::Overload => "overload",
            DropReason::NoRoute => "no_route",
        }
    }
}

/// The replay-filter share key of frames injected at this node (no honestly made node
/// key is all zeros).
const INJECTED: [u8; 32] = [0; 32];

/// The shared, thread-safe unwrapping half: keys by epoch and the replay filter.
#[derive(Debug)]
pub struct Unwrapper {
    keys: RwLock<KeyRing>,
    replay: ReplayFilter,
    /// Peers that may send to this node (from the directory): each holds one share of
    /// the replay filter.
    upstream_shares: std::sync::atomic::AtomicUsize,
}

/// A packet after one layer came off.
#[derive(Debug)]
pub enum Processed {
    Forward {
        to: NodeId,
        delay: Duration,
        frame: Frame,
    },
    Final {
        destination: MailboxAddress,
        surb_id: SurbId,
        payload: Vec<u8>,
    },
}

impl Unwrapper {
    /// `replay_capacity` bounds the replay tags held per key epoch.
    pub fn new(keys: KeyRing, replay_capacity: usize) -> Self {
        let epochs = keys.epochs();
        let replay = ReplayFilter::new(epochs.first().copied().unwrap_or(0), replay_capacity);
        for e in &epochs {
            replay.open(*e);
        }
        Unwrapper {
            keys: RwLock::new(keys),
            replay,
            upstream_shares: std::sync::atomic::AtomicUsize::new(1),
        }
    }

    /// Replaces the key ring (at epoch changes): opens replay generations for new keys
    /// and drops those of retired ones.
    pub fn set_keys(&self, keys: KeyRing) {
        let epochs = keys.epochs();
        for e in &epochs {
            self.replay.open(*e);
        }
        if let Some(first) = epochs.first() {
            self.replay.retire_before(*first);
        }
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = keys;
    }

    pub fn epochs(&self) -> Vec<u64> {
        self.keys.read().unwrap_or_else(|e| e.into_inner()).epochs()
    }

    /// Replay tags currently held.
    pub fn replay_tags(&self) -> usize {
        self.replay.len()
    }

    /// Sets how many peers may send to this node (the directory's count of the
    /// nodes that precede it); each gets that share of the replay filter.
    pub fn set_upstream_shares(&self, shares: usize) {
        self.upstream_shares
            .store(shares.max(1), std::sync::atomic::Ordering::Relaxed);
    }

    /// Unwraps one frame. All the public-key work of a hop happens here.
    /// Its replay tag counts against the share of frames injected at this node.
    pub fn unwrap_frame(&self, bytes: &[u8]) -> Result<Processed, DropReason> {
        self.unwrap_frame_from(bytes, None)
    }

    /// [`Unwrapper::unwrap_frame`] for a frame from peer `upstream` (`None`: injected
    /// by this node), whose replay tags count against its share.
    pub fn unwrap_frame_from(
        &self,
        bytes: &[u8],
        upstream: Option<&[u8; 32]>,
    ) -> Result<Processed, DropReason> {
        let frame = Frame::decode(bytes).map_err(|_| DropReason::Malformed)?;
        if frame.kind() != FrameKind::Sphinx {
            return Err(DropReason::Malformed);
        }
        let (epoch, secret) = {
            let keys = self.keys.read().unwrap_or_else(|e| e.into_inner());
            let (e, k) = keys
                .by_label(frame.key_epoch())
                .ok_or(DropReason::UnknownEpoch)?;
            (e, k.clone())
        };
        let shares = self
            .upstream_shares
            .load(std::sync::atomic::Ordering::Relaxed);
        // Frames injected here (a gateway's clients, a node's own loops) share one
        // upstream's part, the "+ 1" of the shares: many accounts sending at once fill
        // that part only, never the part of the mix layer that brings the mail in.
        let out = sphinx::unwrap_from(
            &secret,
            epoch,
            &self.replay,
            frame.body(),
            Some((upstream.unwrap_or(&INJECTED), shares)),
        )
        .map_err(|e| match e {
            PacketError::Replayed => DropReason::Replay,
            PacketError::ReplayFilterFull => DropReason::ReplayFilterFull,
            PacketError::UnknownEpoch { .. } => DropReason::UnknownEpoch,
            _ => DropReason::BadPacket,
        })?;
        Ok(match out {
            Unwrapped::Forward {
                next_hop,
                delay,
                packet,
            } => Processed::Forward {
                to: next_hop,
                delay,
                frame: Frame::sphinx(frame.key_epoch(), &packet)
                    .map_err(|_| DropReason::BadPacket)?,
            },
            Unwrapped::Final {
                destination,
                surb_id,
                payload,
            } => Processed::Final {
                destination,
                surb_id,
                payload,
            },
        })
    }
}

/// Tunables of a mixing core.
#[derive(Debug, Clone)]
pub struct MixConfig {
    /// Cap on a single hop's delay (from the directory). Longer requests are clamped.
    pub max_delay: Duration,
    /// Packets held in the delay queue at most; beyond it new packets are shed.
    pub max_queue: usize,
    /// λM: loop cover packets per second this node emits. Fixed; never follows load.
    pub loop_rate: f64,
    /// A loop not back after this long counts as lost.
    pub loop_timeout: Duration,
}

impl Default for MixConfig {
    fn default() -> Self {
        MixConfig {
            max_delay: Duration::from_secs(1),
            max_queue: 200_000,
            loop_rate: 0.0,
            loop_timeout: Duration::from_secs(30),
        }
    }
}

/// A packet to put on the link to `to`.
#[derive(Debug)]
pub struct Transmit {
    pub to: NodeId,
    pub frame: Frame,
    /// When it was due; the driver measures its own lateness against this.
    pub due: Instant,
}

/// Things the driver must act on besides forwarding.
#[derive(Debug)]
pub enum Event {
    /// A packet ended at this node and is not one of its loops: a mailbox delivery
    /// for gateways, an unexpected final hop for relays.
    Delivered {
        destination: MailboxAddress,
        surb_id: SurbId,
        payload: Vec<u8>,
    },
}

/// Counters a driver exports as metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub received: u64,
    pub forwarded: u64,
    pub delivered: u64,
    pub dropped: HashMap<DropReason, u64>,
    pub loops_sent: u64,
    pub loops_returned: u64,
    pub loops_lost: u64,
    pub loop_build_failures: u64,
}

impl Stats {
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.dropped.get(&reason).copied().unwrap_or(0)
    }

    /// Adds `other` into `self`, for summing workers.
    pub fn absorb(&mut self, other: &Stats) {
        self.received += other.received;
        self.forwarded += other.forwarded;
        self.delivered += other.delivered;
        for (r, n) in &other.dropped {
            *self.dropped.entry(*r).or_default() += n;
        }
        self.loops_sent += other.loops_sent;
        self.loops_returned += other.loops_returned;
        self.loops_lost += other.loops_lost;
        self.loop_build_failures += other.loop_build_failures;
    }
}

#[derive(Debug)]
struct Scheduled {
    at: Instant,
    seq: u64,
    to: NodeId,
    frame: Frame,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Scheduled {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

/// One worker's mixing state machine.
#[derive(Debug)]
pub struct MixCore {
    me: NodeId,
    unwrapper: Arc<Unwrapper>,
    config: MixConfig,
    queue: BinaryHeap<Reverse<Scheduled>>,
    seq: u64,
    events: VecDeque<Event>,
    stats: Stats,
    next_loop: Option<Instant>,
    loops: Arc<LoopRegistry>,
    /// The epoch of the wall clock, once the driver has said ([`Self::set_wall_epoch`]).
    wall_epoch: Option<u64>,
}

/// Loops a node sent and awaits, shared by all its workers: a loop returns to
/// whichever worker its frame is dispatched to, not necessarily the one that sent it.
#[derive(Debug, Default)]
pub struct LoopRegistry(std::sync::Mutex<HashMap<SurbId, Instant>>);

impl LoopRegistry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SurbId, Instant>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl MixCore {
    /// A core with its own loop registry. Workers of one node share one through
    /// [`with_loops`](Self::with_loops).
    pub fn new(me: NodeId, unwrapper: Arc<Unwrapper>, config: MixConfig) -> Self {
        Self::with_loops(me, unwrapper, config, Arc::default())
    }

    pub fn with_loops(
        me: NodeId,
        unwrapper: Arc<Unwrapper>,
        config: MixConfig,
        loops: Arc<LoopRegistry>,
    ) -> Self {
        MixCore {
            me,
            unwrapper,
            config,
            queue: BinaryHeap::new(),
            seq: 0,
            events: VecDeque::new(),
            stats: Stats::default(),
            next_loop: None,
            loops,
            wall_epoch: None,
        }
    }

    /// The epoch the wall clock is in, read by the driver from the document's schedule:
    /// loops are keyed with [`Topology::key_epoch_at`] of it, so they keep working with
    /// the last valid document while its successor is late.
    pub fn set_wall_epoch(&mut self, epoch: u64) {
        self.wall_epoch = Some(epoch);
    }

    pub fn id(&self) -> NodeId {
        self.me
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    pub fn unwrapper(&self) -> &Arc<Unwrapper> {
        &self.unwrapper
    }

    /// Packets waiting out their delay.
    pub fn queue_len(&self) -> usize {
        self.queue.len()
    }

    pub fn set_config(&mut self, config: MixConfig) {
        self.config = config;
    }

    /// Records a drop the driver decided on (no route, link queue full).
    pub fn count_drop(&mut self, reason: DropReason) {
        *self.stats.dropped.entry(reason).or_default() += 1;
    }

    /// Takes in one frame from a link.
    pub fn handle_packet(&mut self, bytes: &[u8], now: Instant) -> Result<(), DropReason> {
        self.handle_packet_from(bytes, None, now)
    }

    /// Takes in one frame from peer `upstream` (`None`: injected by this node).
    pub fn handle_packet_from(
        &mut self,
        bytes: &[u8],
        upstream: Option<&[u8; 32]>,
        now: Instant,
    ) -> Result<(), DropReason> {
        self.stats.received += 1;
        let processed = self.unwrapper.unwrap_frame_from(bytes, upstream);
        self.handle_processed(processed, now)
    }

    /// Second half of [`handle_packet`](Self::handle_packet), for drivers that unwrap elsewhere.
    pub fn handle_processed(
        &mut self,
        processed: Result<Processed, DropReason>,
        now: Instant,
    ) -> Result<(), DropReason> {
        let result = match processed {
            Ok(Processed::Forward { to, delay, frame }) => {
                self.schedule(to, frame, now + delay.min(self.config.max_delay))
            }
            Ok(Processed::Final {
                destination,
                surb_id,
                payload,
            }) => {
                if destination == self.me && self.loops.lock().remove(&surb_id).is_some() {
                    self.stats.loops_returned += 1;
                } else {
                    self.stats.delivered += 1;
                    self.events.push_back(Event::Delivered {
                        destination,
                        surb_id,
                        payload,
                    });
                }
                Ok(())
            }
            Err(r) => Err(r),
        };
        if let Err(r) = result {
            self.count_drop(r);
        }
        result
    }

    /// Queues `frame` for `to` at `at`. Used for forwarding and for locally built packets.
    pub fn schedule(&mut self, to: NodeId, frame: Frame, at: Instant) -> Result<(), DropReason> {
        if self.queue.len() >= self.config.max_queue {
            return Err(DropReason::Overload);
        }
        self.seq += 1;
        self.queue.push(Reverse(Scheduled {
            at,
            seq: self.seq,
            to,
            frame,
        }));
        Ok(())
    }

    /// The next packet whose delay has elapsed.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Transmit> {
        if self.queue.peek().is_some_and(|Reverse(s)| s.at <= now) {
            let Reverse(s) = self.queue.pop()?;
            self.stats.forwarded += 1;
            return Some(Transmit {
                to: s.to,
                frame: s.frame,
                due: s.at,
            });
        }
        None
    }

    /// When the core next needs `poll_transmit` or `handle_timeout`.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let q = self.queue.peek().map(|Reverse(s)| s.at);
        match (q, self.next_loop) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Emits loop cover that is due and expires loops that did not return.
    ///
    /// The loop schedule is a Poisson process at λM drawn from `rng` alone; it is the
    /// same whether the node is idle or saturated.
    pub fn handle_timeout<R: CryptoRng + ?Sized>(
        &mut self,
        now: Instant,
        rng: &mut R,
        topology: Option<&Topology>,
    ) {
        let timeout = self.config.loop_timeout;
        {
            let mut loops = self.loops.lock();
            let before = loops.len();
            loops.retain(|_, sent| now.saturating_duration_since(*sent) < timeout);
            self.stats.loops_lost += (before - loops.len()) as u64;
        }

        if self.config.loop_rate <= 0.0 {
            self.next_loop = None;
            return;
        }
        let Ok(exp) = Exp::new(self.config.loop_rate) else {
            return;
        };
        let mut next = *self
            .next_loop
            .get_or_insert_with(|| now + Duration::from_secs_f64(exp.sample(rng)));
        while next <= now {
            match topology.map(|t| self.build_loop(rng, t)) {
                Some(Ok((first_hop, frame, id))) => {
                    if self.schedule(first_hop, frame, now).is_ok() {
                        self.loops.lock().insert(id, now);
                        self.stats.loops_sent += 1;
                    }
                }
                _ => self.stats.loop_build_failures += 1,
            }
            next += Duration::from_secs_f64(exp.sample(rng));
        }
        self.next_loop = Some(next);
    }

    fn build_loop<R: CryptoRng + ?Sized>(
        &self,
        rng: &mut R,
        topo: &Topology,
    ) -> Result<(NodeId, Frame, SurbId), DropReason> {
        let epoch = topo.key_epoch_at(self.wall_epoch.unwrap_or(topo.epoch()));
        let route = topo
            .loop_route(rng, epoch, &self.me)
            .map_err(|_| DropReason::NoRoute)?;
        let delays = sample_delays(rng, topo.params(), route.len());
        let mut plaintext = vec![0u8; PLAINTEXT_SIZE];
        rng.fill(&mut plaintext[..]);
        let (built, id) = sphinx::build_forward(rng, &route, &delays, &self.me, &plaintext)
            .map_err(|_| DropReason::BadPacket)?;
        let frame = Frame::sphinx(EpochSchedule::frame_label(epoch), &built.packet)
            .map_err(|_| DropReason::BadPacket)?;
        Ok((built.first_hop, frame, id))
    }

    /// Loops sent and not yet returned or expired.
    pub fn loops_outstanding(&self) -> usize {
        self.loops.len()
    }
}

//! The sans-IO client: Loopix streams, SURB-acks and retransmission, loop accounting,
//! receiving and reassembly.
//!
//! Driven by its caller: [`ClientCore::poll_timeout`] says when to call
//! [`ClientCore::handle_timeout`]; frames for the client's gateway come out of
//! [`ClientCore::poll_transmit`]; items pulled from the mailbox go into
//! [`ClientCore::handle_mailbox_item`]; messages and acks come out of
//! [`ClientCore::poll_event`]. No clock, no OS randomness, no I/O.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::CryptoRng;
use serde::{Deserialize, Serialize};
use shoal_packet::fragment::{MAX_MESSAGE_SIZE, Reassembled, ReassemblyLimits};
use shoal_packet::payload::{self, ACK_MESSAGE_SIZE, AckId, AckSlot};
use shoal_packet::sphinx::{self, Hop, MailboxAddress, SURB_SIZE, SurbId};
use shoal_packet::{BodyKind, Fragment, FragmentHeader, Frame, MessageId, Reassembler};
use shoal_topology::route::sample_delays;
use shoal_topology::{EpochSchedule, NodeId, Topology};
use sphinx_packet::surb::SurbReplyRecovery;
use x25519_dalek::{PublicKey, StaticSecret};

use crate::contact::Contact;
use crate::schedule::{Schedule, Stream};
use crate::seal;

/// Who this client is: its mailbox at its gateway and the secret its bodies open with.
#[derive(Clone, Serialize, Deserialize)]
#[serde(into = "SavedIdentity", from = "SavedIdentity")]
pub struct Identity {
    pub mailbox: MailboxAddress,
    pub gateway: NodeId,
    pub secret: StaticSecret,
}

/// The serialized form of an [`Identity`]; it holds the secret key, so store it as such.
/// Wiped on drop: it exists only while an identity is saved or loaded.
#[derive(Clone, Serialize, Deserialize, zeroize::Zeroize, zeroize::ZeroizeOnDrop)]
#[serde(deny_unknown_fields)]
struct SavedIdentity {
    mailbox: MailboxAddress,
    gateway: NodeId,
    secret: [u8; 32],
}

impl From<Identity> for SavedIdentity {
    fn from(i: Identity) -> Self {
        SavedIdentity {
            mailbox: i.mailbox,
            gateway: i.gateway,
            secret: i.secret.to_bytes(),
        }
    }
}

impl From<SavedIdentity> for Identity {
    fn from(s: SavedIdentity) -> Self {
        Identity {
            mailbox: s.mailbox,
            gateway: s.gateway,
            secret: StaticSecret::from(s.secret),
        }
    }
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Identity(..)")
    }
}

impl Identity {
    /// A fresh identity with a random mailbox address at `gateway`. The mailbox account
    /// itself is created at the gateway by its admin; this only picks the values.
    pub fn generate<R: CryptoRng + ?Sized>(rng: &mut R, gateway: NodeId) -> Self {
        let mut mailbox = [0u8; 32];
        while mailbox == DROP_MAILBOX {
            rng.fill_bytes(&mut mailbox);
        }
        Identity {
            mailbox,
            gateway,
            secret: StaticSecret::random_from_rng(rng),
        }
    }

    pub fn public_key(&self) -> PublicKey {
        PublicKey::from(&self.secret)
    }

    /// How others reach this client.
    pub fn contact(&self) -> Contact {
        Contact {
            mailbox: self.mailbox,
            gateway: self.gateway,
            public_key: self.public_key().to_bytes(),
        }
    }
}

/// The mailbox address cover and drops are sent to; gateways store nothing for it (they
/// ack λP cover, whose SURB is real, and not λD drops).
pub use shoal_packet::sphinx::DROP_MAILBOX;

/// When an unacked fragment is sent again.
///
/// The timeout of one attempt is `(forward delays + ack-path delays) × safety_factor +
/// margin`, doubled for each earlier attempt (at most `max_doublings` times) and capped
/// at `max_timeout`. Both delay sums are the ones actually drawn for that attempt's
/// packet and SURB, so the timer tracks the packet rather than an average.
#[derive(Debug, Clone, PartialEq)]
pub struct RetransmitPolicy {
    pub safety_factor: f64,
    /// Covers what the delays do not: link latency, the gateway's durable commit and the
    /// client's mailbox pull interval.
    pub margin: Duration,
    pub max_doublings: u32,
    pub max_timeout: Duration,
}

impl Default for RetransmitPolicy {
    fn default() -> Self {
        RetransmitPolicy {
            safety_factor: 2.0,
            margin: Duration::from_secs(5),
            max_doublings: 6,
            max_timeout: Duration::from_secs(600),
        }
    }
}

impl RetransmitPolicy {
    fn timeout(&self, path_delay: Duration, attempt: u32) -> Duration {
        let factor = if self.safety_factor.is_finite() && self.safety_factor > 0.0 {
            self.safety_factor
        } else {
            1.0
        };
        let base = scale(path_delay, factor).saturating_add(self.margin);
        let doublings = attempt.saturating_sub(1).min(self.max_doublings).min(30);
        base.saturating_mul(1u32 << doublings).min(self.max_timeout)
    }
}

/// Client settings that are local choices (the cover rates are not: they come from the
/// directory).
#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub retransmit: RetransmitPolicy,
    /// A loop is lost if it (and its ack) are not back within its path delays × this
    /// factor + `loop_margin`.
    pub loop_safety_factor: f64,
    pub loop_margin: Duration,
    /// Fragments held for sending (queued or awaiting an ack); `send_message` refuses
    /// beyond this.
    pub max_queued_fragments: usize,
    /// Stream events later than this (a stalled driver) are skipped, not sent in a burst.
    pub max_catch_up: Duration,
    /// How long the recovery material of a SURB is kept for its ack.
    pub surb_lifetime: Duration,
    pub reassembly: ReassemblyLimits,
    /// Completed incoming message ids remembered (and snapshotted) to drop duplicates.
    pub remember_received: usize,
    /// Benchmark instrumentation: keep a [`SendRecord`] for each of the last this many
    /// real fragments sent (0, the default, keeps none). Per-packet timings: for
    /// `shoal bench e2e` only, never logged or exported as metrics.
    pub send_records: usize,
    /// Test-only: restores the pre-fix cover routing (a λP slot with nothing queued
    /// sends a loop to our own gateway, and a real fragment goes whichever gateway it is
    /// for), which lets gateway inbound volume follow real traffic. It exists so the
    /// attack tests can show the leak they guard against; never set it in use.
    pub legacy_leaks: bool,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            retransmit: RetransmitPolicy::default(),
            loop_safety_factor: 2.0,
            loop_margin: Duration::from_secs(5),
            max_queued_fragments: 16 * 1024,
            max_catch_up: Duration::from_secs(2),
            surb_lifetime: Duration::from_secs(3600),
            reassembly: ReassemblyLimits::default(),
            remember_received: 65536,
            send_records: 0,
            legacy_leaks: false,
        }
    }
}

/// When one real fragment went out and the mixing delay its sender drew for it (see
/// [`ClientConfig::send_records`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendRecord {
    pub message_id: MessageId,
    /// 1 for the first send, 2 for the first retransmission, …
    pub attempt: u32,
    /// The λP slot that carried it.
    pub at: Instant,
    /// Sum of the delays drawn for the forward route's hops that wait them out: all
    /// but the exit gateway, which stores on arrival.
    pub forward_delay: Duration,
}

/// What the client tells its user.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// A complete message arrived.
    Message {
        /// The sender, when the layer above can authenticate one. The seal is anonymous,
        /// so this core always reports `None`; MLS credentials fill it in later.
        from: Option<Contact>,
        message_id: MessageId,
        bytes: Vec<u8>,
    },
    /// Every fragment of a message we sent is durable in the recipient's mailbox.
    MessageAcked { message_id: MessageId },
}

/// Counters and gauges. Aggregates only: safe to export as metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ClientStats {
    /// λP events that carried a real fragment (first sends and retransmissions).
    pub real_sent: u64,
    /// Of `real_sent`, retransmissions.
    pub retransmissions: u64,
    /// λP events with no real fragment queued for the slot's gateway, sent as cover to
    /// that gateway's drop mailbox (with `legacy_leaks`: loops to ourselves).
    pub payload_cover_sent: u64,
    /// λL loops.
    pub loops_sent: u64,
    /// λD drops.
    pub drops_sent: u64,
    /// Stream events that could not be sent because no topology was set yet.
    pub events_without_topology: u64,
    /// Stream events skipped because the driver called too late (see `max_catch_up`).
    pub events_skipped_late: u64,
    /// Packets that failed to build (a route or key missing from the topology).
    pub build_failures: u64,

    pub fragments_acked: u64,
    pub messages_acked: u64,
    /// Acks for fragments already acked: a retransmission that was not needed.
    pub duplicate_acks: u64,

    /// Loops (λL; with `legacy_leaks` also λP cover) whose body came back.
    pub loops_returned: u64,
    /// Loops and λP cover whose SURB-ack came back.
    pub loop_acks_returned: u64,
    /// Loops whose body was not back before its deadline: the active-attack signal.
    pub loops_lost: u64,
    /// Loops and λP cover whose ack was not back before the deadline (also a signal).
    pub loop_acks_lost: u64,
    /// Loops that came back after being counted lost.
    pub loops_late: u64,

    pub messages_received: u64,
    pub fragments_received: u64,
    pub duplicate_fragments: u64,
    /// Fragments of messages larger than the reassembly limit allows (junk).
    pub fragments_too_large: u64,
    /// Incomplete messages dropped (evicted to stay within the reassembly limits, or
    /// no new fragment for the reassembly timeout).
    pub partials_dropped: u64,
    pub drops_received: u64,
    /// Loop bodies with an id we never sent (or forgot).
    pub unknown_loops: u64,
    /// Replies for SURBs we no longer hold (expired or from before a restart).
    pub unknown_replies: u64,
    /// Mailbox items that failed to open or decode.
    pub malformed_items: u64,

    /// Fragments waiting for a λP slot.
    pub queued_fragments: usize,
    /// Fragments sent and waiting for their ack.
    pub in_flight_fragments: usize,
    /// Loops sent and not yet resolved.
    pub loops_outstanding: usize,
}

/// A change to the incomplete messages a store keeps, so that a fragment can be acked
/// to the gateway as soon as it is durable here (never held unacked, where the
/// gateway would offer it again and again and a flood of junk first fragments would
/// fill every pull).
#[derive(Clone, PartialEq, Eq)]
pub enum PartialOp {
    /// Keep this fragment of an incomplete message.
    Held(Fragment),
    /// Forget every fragment of this message (completed, evicted or expired).
    Done(MessageId),
}

impl std::fmt::Debug for PartialOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Fragments are user data.
        match self {
            PartialOp::Held(_) => f.write_str("Held(..)"),
            PartialOp::Done(_) => f.write_str("Done(..)"),
        }
    }
}

/// Why the client refused a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    #[error("message of {len} bytes exceeds the maximum of {max}")]
    MessageTooLarge { len: usize, max: usize },
    #[error("outgoing queue full: {held} fragments held, {needed} more needed, limit {limit}")]
    QueueFull {
        held: usize,
        needed: usize,
        limit: usize,
    },
    #[error("contact key is not a usable X25519 public key")]
    WeakContactKey,
    #[error("snapshot version {0} is not supported")]
    SnapshotVersion(u32),
    #[error("snapshot: {0}")]
    Snapshot(&'static str),
    /// Another process (the running client, or the chat) has the store open.
    #[error("store: in use by another process")]
    StoreInUse,
    /// The local store failed (disk, permissions, a damaged file).
    #[error("store: {op}: {reason}")]
    Store { op: &'static str, reason: String },
    /// The local store holds a value this version cannot read.
    #[error("store: unreadable {0}")]
    Corrupt(&'static str),
    /// A bug in this crate, not bad input.
    #[error("internal error: {0}")]
    Internal(&'static str),
}

/// Version of [`ClientSnapshot`]'s layout.
pub const SNAPSHOT_VERSION: u32 = 1;

/// What a durable store must keep across restarts. Restoring requeues every unacked
/// fragment for retransmission; acks for SURBs issued before the restart are not
/// recognised (they count as `unknown_replies`), which costs one retransmission each.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientSnapshot {
    pub version: u32,
    pub outgoing: Vec<OutgoingMessage>,
    /// Ids of completed incoming messages, oldest first.
    pub received: Vec<MessageId>,
}

/// An outgoing message with its fragments that are not yet acked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutgoingMessage {
    pub message_id: MessageId,
    pub to: Contact,
    /// Total fragments of the message.
    pub count: u16,
    pub unacked: Vec<OutgoingFragment>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutgoingFragment {
    pub index: u16,
    pub data: Vec<u8>,
    /// Sends so far; drives the backoff.
    pub attempts: u32,
}

type FragKey = (MessageId, u16);
type LoopId = [u8; 16];

#[derive(Debug)]
struct OutMessage {
    to: Contact,
    count: u16,
    unacked: u16,
}

#[derive(Debug)]
struct OutFragment {
    fragment: Fragment,
    attempts: u32,
    /// The retransmission timer while in flight.
    timer: Option<(Instant, u64)>,
}

#[derive(Debug, Clone, Copy)]
enum SurbPurpose {
    Fragment(FragKey),
    Loop(LoopId),
}

struct PendingSurb {
    recovery: SurbReplyRecovery,
    ack_id: AckId,
    purpose: SurbPurpose,
}

impl std::fmt::Debug for PendingSurb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PendingSurb(..)")
    }
}

#[derive(Debug)]
struct PendingLoop {
    body_back: bool,
    ack_back: bool,
}

/// A bounded set that forgets its oldest member.
#[derive(Debug, Default)]
struct RecentSet {
    set: HashSet<[u8; 16]>,
    order: VecDeque<[u8; 16]>,
}

impl RecentSet {
    fn insert(&mut self, id: [u8; 16], limit: usize) {
        if self.set.insert(id) {
            self.order.push_back(id);
        }
        while self.order.len() > limit {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
    }
}

/// A built packet and what it cost in delay, before it is recorded.
struct Built {
    frame: Frame,
    path_delay: Duration,
    forward_delay: Duration,
}

/// The client state machine. See the module docs.
#[derive(Debug)]
pub struct ClientCore {
    identity: Identity,
    public_key: PublicKey,
    config: ClientConfig,
    topology: Option<Arc<Topology>>,
    /// The epoch of the wall clock, once the driver has said (see [`Self::set_wall_epoch`]).
    wall_epoch: Option<u64>,
    schedule: Schedule,

    messages: HashMap<MessageId, OutMessage>,
    fragments: BTreeMap<FragKey, OutFragment>,
    fresh: VecDeque<FragKey>,
    retry: VecDeque<FragKey>,
    timers: BTreeMap<(Instant, u64), FragKey>,

    surbs: HashMap<SurbId, PendingSurb>,
    surb_expiry: VecDeque<(Instant, SurbId)>,
    loops: HashMap<LoopId, PendingLoop>,
    loop_timers: BTreeMap<(Instant, u64), LoopId>,
    lost_loops: RecentSet,

    reassembler: Reassembler,
    received: RecentSet,
    /// Changes to the incomplete messages since [`ClientCore::take_partial_ops`].
    partial_ops: Vec<PartialOp>,

    seq: u64,
    transmits: VecDeque<Frame>,
    events: VecDeque<Event>,
    stats: ClientStats,
    send_records: VecDeque<SendRecord>,
}

fn random_id<R: CryptoRng + ?Sized>(rng: &mut R) -> [u8; 16] {
    let mut id = [0u8; 16];
    rng.fill_bytes(&mut id);
    id
}

/// `d × factor`, saturating instead of panicking on overflow.
fn scale(d: Duration, factor: f64) -> Duration {
    Duration::try_from_secs_f64(d.as_secs_f64() * factor).unwrap_or(Duration::MAX)
}

/// `now + d`, clamped to a far but representable instant instead of panicking.
fn after(now: Instant, d: Duration) -> Instant {
    now.checked_add(d)
        .or_else(|| now.checked_add(Duration::from_secs(365 * 24 * 3600)))
        .unwrap_or(now)
}

fn sum(delays: &[Duration]) -> Duration {
    delays
        .iter()
        .fold(Duration::ZERO, |a, d| a.saturating_add(*d))
}

fn is_weak_key(key: &PublicKey) -> bool {
    !StaticSecret::from([0x42; 32])
        .diffie_hellman(key)
        .was_contributory()
}

impl ClientCore {
    /// A client with nothing queued. It sends nothing until [`Self::set_topology`] gives
    /// it the network (and with it the cover rates). The schedule's generator is seeded
    /// from `rng` here.
    pub fn new<R: CryptoRng + ?Sized>(
        identity: Identity,
        config: ClientConfig,
        rng: &mut R,
    ) -> Self {
        let mut seed = [0u8; 32];
        rng.fill_bytes(&mut seed);
        ClientCore {
            public_key: identity.public_key(),
            identity,
            reassembler: Reassembler::new(config.reassembly),
            partial_ops: Vec::new(),
            config,
            topology: None,
            wall_epoch: None,
            schedule: Schedule::new(seed),
            messages: HashMap::new(),
            fragments: BTreeMap::new(),
            fresh: VecDeque::new(),
            retry: VecDeque::new(),
            timers: BTreeMap::new(),
            surbs: HashMap::new(),
            surb_expiry: VecDeque::new(),
            loops: HashMap::new(),
            loop_timers: BTreeMap::new(),
            lost_loops: RecentSet::default(),
            received: RecentSet::default(),
            seq: 0,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            stats: ClientStats::default(),
            send_records: VecDeque::new(),
        }
    }

    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    pub fn contact(&self) -> Contact {
        self.identity.contact()
    }

    /// The directory in use, once one is set.
    pub fn topology(&self) -> Option<&Topology> {
        self.topology.as_deref()
    }

    /// Installs a verified directory. The cover rates come from its parameters; a stream
    /// whose rate changed restarts at `now`. (`now` is needed because the first document
    /// is what starts the streams.)
    pub fn set_topology(&mut self, topology: Arc<Topology>, now: Instant) {
        let p = topology.params();
        self.schedule
            .set_rates([p.lambda_p, p.lambda_l, p.lambda_d], now);
        self.topology = Some(topology);
    }

    /// Fragments `bytes` and queues the fragments for λP slots. Nothing is sent here.
    pub fn send_message<R: CryptoRng + ?Sized>(
        &mut self,
        rng: &mut R,
        to: Contact,
        bytes: &[u8],
    ) -> Result<MessageId, ClientError> {
        if is_weak_key(&to.public_key()) {
            return Err(ClientError::WeakContactKey);
        }
        let mut message_id = random_id(rng);
        while self.messages.contains_key(&message_id) {
            message_id = random_id(rng);
        }
        let fragments = shoal_packet::fragment::fragment(message_id, bytes).map_err(|_| {
            ClientError::MessageTooLarge {
                len: bytes.len(),
                max: MAX_MESSAGE_SIZE,
            }
        })?;
        let fragments = fragments.into_iter().map(|f| (f, 0)).collect();
        self.enqueue(message_id, to, fragments, false)?;
        Ok(message_id)
    }

    fn enqueue(
        &mut self,
        message_id: MessageId,
        to: Contact,
        fragments: Vec<(Fragment, u32)>,
        restored: bool,
    ) -> Result<(), ClientError> {
        let held = self.fragments.len();
        let limit = self.config.max_queued_fragments;
        if held.saturating_add(fragments.len()) > limit {
            return Err(ClientError::QueueFull {
                held,
                needed: fragments.len(),
                limit,
            });
        }
        let Some(first) = fragments.first() else {
            return Err(ClientError::Internal("a message has at least one fragment"));
        };
        let count = first.0.header.count;
        self.messages.insert(
            message_id,
            OutMessage {
                to,
                count,
                unacked: fragments.len() as u16,
            },
        );
        for (fragment, attempts) in fragments {
            let key = (message_id, fragment.header.index);
            self.fragments.insert(
                key,
                OutFragment {
                    fragment,
                    attempts,
                    timer: None,
                },
            );
            if restored {
                self.retry.push_back(key);
            } else {
                self.fresh.push_back(key);
            }
        }
        Ok(())
    }

    /// When [`Self::handle_timeout`] must next be called, if ever.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.schedule.next_due()
    }

    /// Fires every stream event due at `now`, each producing exactly one frame.
    pub fn handle_timeout<R: CryptoRng + ?Sized>(&mut self, now: Instant, rng: &mut R) {
        self.expire(now);
        self.stats.events_skipped_late += self.schedule.skip_stale(now, self.config.max_catch_up);
        while let Some((stream, at)) = self.schedule.pop_due(now) {
            self.fire(stream, at, rng);
        }
    }

    /// The next frame for the client's gateway.
    pub fn poll_transmit(&mut self) -> Option<Frame> {
        self.transmits.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Takes the [`SendRecord`]s kept so far (none unless `send_records` is set).
    pub fn take_send_records(&mut self) -> Vec<SendRecord> {
        self.send_records.drain(..).collect()
    }

    pub fn stats(&self) -> ClientStats {
        let mut s = self.stats.clone();
        s.queued_fragments = self.fresh.len() + self.retry.len();
        s.in_flight_fragments = self.timers.len();
        s.loops_outstanding = self.loops.len();
        s
    }

    fn next_seq(&mut self) -> u64 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// Moves due retransmissions to the retry queue, resolves loop deadlines and
    /// forgets expired SURBs.
    fn expire(&mut self, now: Instant) {
        while let Some(entry) = self.timers.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let key = entry.remove();
            if let Some(f) = self.fragments.get_mut(&key) {
                f.timer = None;
                self.retry.push_back(key);
            }
        }
        while let Some(entry) = self.loop_timers.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let id = entry.remove();
            if let Some(l) = self.loops.remove(&id) {
                if !l.body_back {
                    self.stats.loops_lost += 1;
                    self.lost_loops.insert(id, 4096);
                }
                if !l.ack_back {
                    self.stats.loop_acks_lost += 1;
                }
            }
        }
        while let Some(&(at, id)) = self.surb_expiry.front() {
            if at > now {
                break;
            }
            self.surb_expiry.pop_front();
            self.surbs.remove(&id);
        }
    }

    fn fire<R: CryptoRng + ?Sized>(&mut self, stream: Stream, now: Instant, rng: &mut R) {
        let Some(topo) = self.topology.clone() else {
            self.stats.events_without_topology += 1;
            return;
        };
        match stream {
            Stream::Payload if self.config.legacy_leaks => {
                if self.send_next_real(&topo, None, now, rng) {
                    return;
                }
                let gw = self.identity.gateway;
                if self.send_acked_cover(&topo, &gw, true, now, rng) {
                    self.stats.payload_cover_sent += 1;
                }
            }
            Stream::Payload => {
                // The slot's exit gateway is drawn before the queue is looked at, so
                // where λP packets go (and, through their acks, what comes back) does
                // not depend on who we are talking to: a real fragment only takes a
                // slot that was going to its gateway anyway.
                let gateways = topo.gateways();
                let Some(exit) = self.schedule.pick_exit(gateways.len()).map(|i| gateways[i])
                else {
                    self.stats.build_failures += 1;
                    return;
                };
                if self.send_next_real(&topo, Some(&exit), now, rng) {
                    return;
                }
                if self.send_acked_cover(&topo, &exit, false, now, rng) {
                    self.stats.payload_cover_sent += 1;
                }
            }
            Stream::Loop => {
                let gw = self.identity.gateway;
                if self.send_acked_cover(&topo, &gw, true, now, rng) {
                    self.stats.loops_sent += 1;
                }
            }
            Stream::Drop => match self.build_drop(&topo, rng) {
                Some(frame) => {
                    self.transmits.push_back(frame);
                    self.stats.drops_sent += 1;
                }
                None => self.stats.build_failures += 1,
            },
        }
    }

    /// The oldest queued fragment (retransmissions first) for gateway `exit`, or for any
    /// gateway if `None`, taken off its queue.
    fn next_ready(&mut self, exit: Option<&NodeId>) -> Option<(FragKey, bool)> {
        let (fragments, messages) = (&self.fragments, &self.messages);
        let live = |k: &FragKey| fragments.contains_key(k);
        let wanted = |k: &FragKey| {
            live(k) && exit.is_none_or(|e| messages.get(&k.0).is_some_and(|m| m.to.gateway == *e))
        };
        for (queue, is_retry) in [(&mut self.retry, true), (&mut self.fresh, false)] {
            // Acked or forgotten fragments at the front are dropped as they surface.
            while queue.front().is_some_and(|k| !live(k)) {
                queue.pop_front();
            }
            if let Some(key) = queue.iter().position(wanted).and_then(|i| queue.remove(i)) {
                return Some((key, is_retry));
            }
        }
        None
    }

    /// Sends the next queued fragment for `exit` (any gateway if `None`), retransmissions
    /// first. Returns false if there was none or it could not be built, so the slot
    /// carries cover instead.
    fn send_next_real<R: CryptoRng + ?Sized>(
        &mut self,
        topo: &Topology,
        exit: Option<&NodeId>,
        now: Instant,
        rng: &mut R,
    ) -> bool {
        let Some((key, is_retry)) = self.next_ready(exit) else {
            return false;
        };
        let built = self.build_real(topo, key, now, rng);
        let Some(f) = self.fragments.get_mut(&key) else {
            return false;
        };
        f.attempts = f.attempts.saturating_add(1);
        let attempt = f.attempts;
        let (ok, path_delay) = match built {
            Some(b) => {
                self.transmits.push_back(b.frame);
                if self.config.send_records > 0 {
                    if self.send_records.len() >= self.config.send_records {
                        self.send_records.pop_front();
                    }
                    self.send_records.push_back(SendRecord {
                        message_id: key.0,
                        attempt,
                        at: now,
                        forward_delay: b.forward_delay,
                    });
                }
                (true, b.path_delay)
            }
            None => (false, Duration::ZERO),
        };
        // A fragment that cannot be built (its gateway left the directory, say) waits a
        // backed-off timeout like a lost one, rather than blocking the queue.
        let at = after(now, self.config.retransmit.timeout(path_delay, attempt));
        let seq = self.next_seq();
        if let Some(f) = self.fragments.get_mut(&key) {
            f.timer = Some((at, seq));
        }
        self.timers.insert((at, seq), key);
        if ok {
            self.stats.real_sent += 1;
            if is_retry {
                self.stats.retransmissions += 1;
            }
        } else {
            self.stats.build_failures += 1;
        }
        ok
    }

    /// The key epoch (and its frame label) to build with: the document's, or the next
    /// one's while the wall clock is past the document's epoch ([`Topology::key_epoch_at`]).
    fn epoch(&self, topo: &Topology) -> (u64, u16) {
        let epoch = topo.key_epoch_at(self.wall_epoch.unwrap_or(topo.epoch()));
        (epoch, EpochSchedule::frame_label(epoch))
    }

    /// The epoch the wall clock is in, as the driver reads it from the document's schedule.
    /// The core keeps no clock of its own (its `Instant`s do not map to epochs).
    pub fn set_wall_epoch(&mut self, epoch: u64) {
        self.wall_epoch = Some(epoch);
    }

    /// A SURB from the layers back to our mailbox: `[L1, L2, L3, our gateway]`. The
    /// gateway that uses it hands the ack straight to an L1 relay, as it does any
    /// packet entering the mix. Returns the ack slot and the route's delay.
    fn build_ack<R: CryptoRng + ?Sized>(
        &mut self,
        topo: &Topology,
        purpose: SurbPurpose,
        now: Instant,
        rng: &mut R,
    ) -> Option<(AckSlot, Duration)> {
        let (epoch, _) = self.epoch(topo);
        let gw = self.identity.gateway;
        let route: Vec<Hop> = topo.client_route(rng, epoch, &gw, &gw).ok()?.split_off(1);
        let delays = sample_delays(rng, topo.params(), route.len());
        let block = sphinx::build_surb(rng, &route, &delays, &self.identity.mailbox).ok()?;
        let ack_id = random_id(rng);
        let surb_id = *block.recovery.identifier();
        self.surbs.insert(
            surb_id,
            PendingSurb {
                recovery: block.recovery,
                ack_id,
                purpose,
            },
        );
        self.surb_expiry
            .push_back((after(now, self.config.surb_lifetime), surb_id));
        Some((
            AckSlot {
                surb: block.surb,
                message: payload::ack_message(&ack_id, EpochSchedule::frame_label(epoch)),
            },
            sum(&delays),
        ))
    }

    /// Builds a forward packet from our gateway to `mailbox` at `exit`.
    fn build_forward<R: CryptoRng + ?Sized>(
        &self,
        topo: &Topology,
        exit: &NodeId,
        mailbox: &MailboxAddress,
        slot: &AckSlot,
        sealed: &[u8],
        rng: &mut R,
    ) -> Option<(Frame, Duration, Duration)> {
        let (epoch, label) = self.epoch(topo);
        let route = topo
            .client_route(rng, epoch, &self.identity.gateway, exit)
            .ok()?;
        let delays = sample_delays(rng, topo.params(), route.len());
        let plaintext = payload::join_plaintext(slot, sealed).ok()?;
        let (fwd, _) = sphinx::build_forward(rng, &route, &delays, mailbox, &plaintext).ok()?;
        if fwd.first_hop != self.identity.gateway {
            return None;
        }
        let frame = Frame::sphinx(label, &fwd.packet).ok()?;
        // The exit gateway stores on arrival: the last hop's delay is drawn (the
        // Sphinx header has a slot for it) but never waited out.
        let held = sum(delays.split_last().map_or(&[][..], |(_, rest)| rest));
        Some((frame, sum(&delays), held))
    }

    fn build_real<R: CryptoRng + ?Sized>(
        &mut self,
        topo: &Topology,
        key: FragKey,
        now: Instant,
        rng: &mut R,
    ) -> Option<Built> {
        let to = self.messages.get(&key.0)?.to;
        let inner = self.fragments.get(&key)?.fragment.encode();
        // Sealed afresh for every attempt, so the exit gateway cannot link a
        // retransmission to the original by its bytes.
        let sealed = seal::seal(rng, &to.public_key(), &inner).ok()?;
        let (slot, ack_delay) = self.build_ack(topo, SurbPurpose::Fragment(key), now, rng)?;
        let Some((frame, fwd_delay, held_delay)) =
            self.build_forward(topo, &to.gateway, &to.mailbox, &slot, &sealed, rng)
        else {
            self.forget_surb_of(&slot);
            return None;
        };
        Some(Built {
            frame,
            path_delay: fwd_delay.saturating_add(ack_delay),
            forward_delay: held_delay,
        })
    }

    /// Drops the recovery material registered for a slot whose packet was never sent.
    fn forget_surb_of(&mut self, slot: &AckSlot) {
        if let Ok(ack_id) = payload::parse_ack_message(&slot.message) {
            self.surbs.retain(|_, p| p.ack_id != ack_id);
        }
    }

    /// Sends cover carrying a real SURB-ack: a loop to our own mailbox (`to_self`, and
    /// `exit` is our gateway) or λP cover to `exit`'s drop mailbox, whose body is sealed
    /// to a throwaway key like a drop's. Either way its ack is expected back, and a loop's
    /// body too. Returns whether it was sent.
    fn send_acked_cover<R: CryptoRng + ?Sized>(
        &mut self,
        topo: &Topology,
        exit: &NodeId,
        to_self: bool,
        now: Instant,
        rng: &mut R,
    ) -> bool {
        let loop_id = random_id(rng);
        let (kind, seal_to, mailbox) = if to_self {
            (BodyKind::Loop, self.public_key, self.identity.mailbox)
        } else {
            let throwaway = PublicKey::from(&StaticSecret::random_from_rng(rng));
            (BodyKind::Drop, throwaway, DROP_MAILBOX)
        };
        let inner = Fragment::cover(kind, loop_id).encode();
        let Ok(sealed) = seal::seal(rng, &seal_to, &inner) else {
            self.stats.build_failures += 1;
            return false;
        };
        let Some((slot, ack_delay)) = self.build_ack(topo, SurbPurpose::Loop(loop_id), now, rng)
        else {
            self.stats.build_failures += 1;
            return false;
        };
        let Some((frame, fwd_delay, _)) =
            self.build_forward(topo, exit, &mailbox, &slot, &sealed, rng)
        else {
            self.forget_surb_of(&slot);
            self.stats.build_failures += 1;
            return false;
        };
        self.transmits.push_back(frame);
        let factor =
            if self.config.loop_safety_factor.is_finite() && self.config.loop_safety_factor > 0.0 {
                self.config.loop_safety_factor
            } else {
                1.0
            };
        let deadline = after(
            now,
            scale(fwd_delay.saturating_add(ack_delay), factor)
                .saturating_add(self.config.loop_margin),
        );
        self.loops.insert(
            loop_id,
            PendingLoop {
                // Cover to a drop mailbox has no body to come back.
                body_back: !to_self,
                ack_back: false,
            },
        );
        let seq = self.next_seq();
        self.loop_timers.insert((deadline, seq), loop_id);
        true
    }

    /// A drop: a random gateway, the drop mailbox, an all-zero SURB (the gateway sends no
    /// ack for it) and a body sealed to a throwaway key, so it is built like a real body.
    /// Only the exit gateway sees the slot, and it sees the drop mailbox anyway.
    fn build_drop<R: CryptoRng + ?Sized>(&mut self, topo: &Topology, rng: &mut R) -> Option<Frame> {
        let exit = topo.random_gateway(rng).ok()?;
        let surb = [0u8; SURB_SIZE];
        let mut message = [0u8; ACK_MESSAGE_SIZE];
        rng.fill_bytes(&mut message);
        let slot = AckSlot { surb, message };
        let throwaway = PublicKey::from(&StaticSecret::random_from_rng(rng));
        let inner = Fragment::cover(BodyKind::Drop, random_id(rng)).encode();
        let sealed = seal::seal(rng, &throwaway, &inner).ok()?;
        self.build_forward(topo, &exit, &DROP_MAILBOX, &slot, &sealed, rng)
            .map(|(frame, _, _)| frame)
    }

    /// Takes one item pulled from our mailbox: an ack (a reply through one of our
    /// SURBs), a returning loop, a fragment of a message for us, or anything else,
    /// which is counted and dropped. Never panics on any input.
    pub fn handle_mailbox_item(&mut self, surb_id: SurbId, payload: &[u8], now: Instant) {
        self.expire(now);
        if self.surbs.contains_key(&surb_id) {
            self.handle_reply(surb_id, payload);
            return;
        }
        let Ok(plaintext) = sphinx::open_forward(payload) else {
            // Not a forward packet: most likely an ack whose SURB we no longer hold.
            self.stats.unknown_replies += 1;
            return;
        };
        let Ok((_slot, sealed)) = payload::split_plaintext(&plaintext) else {
            self.stats.malformed_items += 1;
            return;
        };
        let Ok(inner) = seal::open(&self.identity.secret, sealed) else {
            self.stats.malformed_items += 1;
            return;
        };
        let Ok(fragment) = Fragment::decode(&inner) else {
            self.stats.malformed_items += 1;
            return;
        };
        match fragment.kind {
            BodyKind::Real => self.handle_fragment(fragment, now),
            BodyKind::Loop => {
                let id = fragment.header.message_id;
                if let Some(l) = self.loops.get_mut(&id) {
                    if !l.body_back {
                        l.body_back = true;
                        self.stats.loops_returned += 1;
                    }
                } else if self.lost_loops.set.contains(&id) {
                    self.stats.loops_late += 1;
                } else {
                    self.stats.unknown_loops += 1;
                }
            }
            BodyKind::Drop => self.stats.drops_received += 1,
            BodyKind::Ack => self.stats.malformed_items += 1,
        }
    }

    fn handle_reply(&mut self, surb_id: SurbId, payload: &[u8]) {
        let Some(pending) = self.surbs.get(&surb_id) else {
            return;
        };
        let valid = sphinx::open_reply(&pending.recovery, payload)
            .ok()
            .and_then(|m| payload::parse_ack_message(&m).ok())
            .is_some_and(|id| id == pending.ack_id);
        if !valid {
            // Keep the SURB: the genuine ack may still come.
            self.stats.malformed_items += 1;
            return;
        }
        let Some(pending) = self.surbs.remove(&surb_id) else {
            return;
        };
        match pending.purpose {
            SurbPurpose::Fragment(key) => self.ack_fragment(key),
            SurbPurpose::Loop(id) => {
                self.stats.loop_acks_returned += 1;
                if let Some(l) = self.loops.get_mut(&id) {
                    l.ack_back = true;
                }
            }
        }
    }

    fn ack_fragment(&mut self, key: FragKey) {
        let Some(f) = self.fragments.remove(&key) else {
            self.stats.duplicate_acks += 1;
            return;
        };
        if let Some(t) = f.timer {
            self.timers.remove(&t);
        }
        self.retry.retain(|k| *k != key);
        self.stats.fragments_acked += 1;
        let done = match self.messages.get_mut(&key.0) {
            Some(m) => {
                m.unacked = m.unacked.saturating_sub(1);
                m.unacked == 0
            }
            None => false,
        };
        if done {
            self.messages.remove(&key.0);
            self.stats.messages_acked += 1;
            self.events
                .push_back(Event::MessageAcked { message_id: key.0 });
        }
    }

    fn handle_fragment(&mut self, fragment: Fragment, now: Instant) {
        self.stats.fragments_received += 1;
        let id = fragment.header.message_id;
        if self.received.set.contains(&id) {
            self.stats.duplicate_fragments += 1;
            return;
        }
        let held = (fragment.header.count > 1).then(|| fragment.clone());
        let outcome = self.reassembler.insert(fragment, now);
        // Drops first: the message just fed may have expired and started over.
        self.take_dropped();
        match outcome {
            Reassembled::Pending => {
                if let Some(f) = held {
                    self.partial_ops.push(PartialOp::Held(f));
                }
            }
            Reassembled::Duplicate | Reassembled::Inconsistent => {
                self.stats.duplicate_fragments += 1
            }
            Reassembled::TooLarge => self.stats.fragments_too_large += 1,
            Reassembled::Complete {
                message_id,
                message,
            } => {
                if held.is_some() {
                    self.partial_ops.push(PartialOp::Done(message_id));
                }
                self.received
                    .insert(message_id, self.config.remember_received);
                self.stats.messages_received += 1;
                self.events.push_back(Event::Message {
                    from: None,
                    message_id,
                    bytes: message,
                });
            }
        }
    }

    fn take_dropped(&mut self) {
        for id in self.reassembler.take_dropped() {
            self.stats.partials_dropped += 1;
            self.partial_ops.push(PartialOp::Done(id));
        }
    }

    /// What changed in the incomplete messages since the last call, in order: the store
    /// applies it in the transaction that saves completed messages, after which every
    /// item pulled so far may be acked ([`crate::store::ClientStore::save_received`]).
    pub fn take_partial_ops(&mut self) -> Vec<PartialOp> {
        std::mem::take(&mut self.partial_ops)
    }

    /// Loads the fragments of incomplete messages a store kept (at start, after
    /// [`Self::restore`]). Their timeout counts from `now`. What the limits no longer
    /// admit is reported by the next [`Self::take_partial_ops`].
    pub fn restore_partials(&mut self, fragments: Vec<Fragment>, now: Instant) {
        for f in fragments {
            let id = f.header.message_id;
            if self.received.set.contains(&id) {
                self.partial_ops.push(PartialOp::Done(id));
                continue;
            }
            match self.reassembler.insert(f, now) {
                Reassembled::Complete {
                    message_id,
                    message,
                } => {
                    // Cannot happen for a store this client wrote (a complete message is
                    // saved with its fragments removed), but is honoured if it does.
                    self.partial_ops.push(PartialOp::Done(message_id));
                    self.received
                        .insert(message_id, self.config.remember_received);
                    self.stats.messages_received += 1;
                    self.events.push_back(Event::Message {
                        from: None,
                        message_id,
                        bytes: message,
                    });
                }
                Reassembled::Pending | Reassembled::Duplicate => {}
                Reassembled::Inconsistent | Reassembled::TooLarge => {
                    self.partial_ops.push(PartialOp::Done(id));
                }
            }
        }
        self.take_dropped();
    }

    /// What a durable store must save: unacked outgoing fragments and the ids of
    /// completed incoming messages.
    pub fn snapshot(&self) -> ClientSnapshot {
        let mut outgoing: BTreeMap<MessageId, OutgoingMessage> = BTreeMap::new();
        for ((id, index), f) in &self.fragments {
            let Some(m) = self.messages.get(id) else {
                continue;
            };
            outgoing
                .entry(*id)
                .or_insert_with(|| OutgoingMessage {
                    message_id: *id,
                    to: m.to,
                    count: m.count,
                    unacked: Vec::new(),
                })
                .unacked
                .push(OutgoingFragment {
                    index: *index,
                    data: f.fragment.data.clone(),
                    attempts: f.attempts,
                });
        }
        ClientSnapshot {
            version: SNAPSHOT_VERSION,
            outgoing: outgoing.into_values().collect(),
            received: self.received.order.iter().copied().collect(),
        }
    }

    /// Loads a snapshot into a fresh client: unacked fragments are queued for
    /// retransmission ahead of new messages; received ids suppress duplicates.
    pub fn restore(&mut self, snapshot: ClientSnapshot) -> Result<(), ClientError> {
        if snapshot.version != SNAPSHOT_VERSION {
            return Err(ClientError::SnapshotVersion(snapshot.version));
        }
        for id in snapshot.received {
            self.received.insert(id, self.config.remember_received);
        }
        for m in snapshot.outgoing {
            if self.messages.contains_key(&m.message_id) {
                return Err(ClientError::Snapshot("duplicate outgoing message id"));
            }
            let mut fragments = Vec::with_capacity(m.unacked.len());
            for f in m.unacked {
                let fragment = Fragment {
                    kind: BodyKind::Real,
                    header: FragmentHeader {
                        message_id: m.message_id,
                        index: f.index,
                        count: m.count,
                        len: u16::try_from(f.data.len())
                            .map_err(|_| ClientError::Snapshot("fragment too long"))?,
                    },
                    data: f.data,
                };
                // Round-trip through the wire decoder so a damaged snapshot cannot
                // queue a fragment the recipient would reject.
                let checked = Fragment::decode(&fragment.encode())
                    .map_err(|_| ClientError::Snapshot("invalid fragment"))?;
                if checked != fragment {
                    return Err(ClientError::Snapshot("invalid fragment"));
                }
                fragments.push((fragment, f.attempts));
            }
            if fragments.is_empty() {
                continue;
            }
            self.enqueue(m.message_id, m.to, fragments, true)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testnet::TestNet;
    use proptest::prelude::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;
    use shoal_packet::fragment::FRAGMENT_DATA_SIZE;
    use shoal_topology::NetworkParams;

    /// The identity's secret wipes itself (as does its serialized form) and Debug
    /// prints nothing of it.
    #[test]
    fn identity_secret_is_wiped_and_not_printed() {
        fn zeroize_on_drop<T: zeroize::ZeroizeOnDrop>() {}
        zeroize_on_drop::<StaticSecret>();
        zeroize_on_drop::<SavedIdentity>();
        let id = Identity::generate(&mut StdRng::seed_from_u64(5), [1; 32]);
        assert_eq!(format!("{id:?}"), "Identity(..)");
        let saved = serde_json::to_string(&id).unwrap();
        let back: Identity = serde_json::from_str(&saved).unwrap();
        assert_eq!(back.secret.to_bytes(), id.secret.to_bytes());
    }

    fn params() -> NetworkParams {
        NetworkParams {
            lambda_p: 2.0,
            lambda_l: 0.5,
            lambda_d: 0.5,
            ..NetworkParams::default()
        }
    }

    struct World {
        net: TestNet,
        rng: StdRng,
        now: Instant,
    }

    impl World {
        fn new(seed: u64) -> Self {
            let mut rng = StdRng::seed_from_u64(seed);
            let net = TestNet::new(&mut rng, params());
            World {
                net,
                rng,
                now: Instant::now(),
            }
        }

        fn client(&mut self, gateway: usize, seed: u64) -> ClientCore {
            let mut rng = StdRng::seed_from_u64(seed);
            let identity = Identity::generate(&mut rng, self.net.gateways[gateway]);
            let mut c = ClientCore::new(identity, ClientConfig::default(), &mut rng);
            c.set_topology(self.net.topo.clone(), self.now);
            c
        }
    }

    /// Runs `c`'s streams until `until`, handing each frame with its send time to
    /// `on_frame` as it is sent.
    fn run_with(
        c: &mut ClientCore,
        rng: &mut StdRng,
        until: Instant,
        mut on_frame: impl FnMut(&mut ClientCore, Instant, Frame),
    ) {
        while let Some(t) = c.poll_timeout() {
            if t > until {
                break;
            }
            c.handle_timeout(t, rng);
            while let Some(f) = c.poll_transmit() {
                on_frame(c, t, f);
            }
        }
    }

    /// Runs `c`'s streams until `until`, returning each frame with its send time.
    fn run(c: &mut ClientCore, rng: &mut StdRng, until: Instant) -> Vec<(Instant, Frame)> {
        let mut out = Vec::new();
        run_with(c, rng, until, |_, t, f| out.push((t, f)));
        out
    }

    /// Delivers a frame `c` sent: to `other` if addressed there, else back to `c`, and
    /// the exit gateway's ack back to `c`. Returns the mailbox it went to and whether an
    /// ack came back.
    fn deliver_acked(
        net: &TestNet,
        c: &mut ClientCore,
        other: &mut ClientCore,
        t: Instant,
        f: &Frame,
    ) -> (MailboxAddress, NodeId, bool) {
        let arrival = net.deliver(c.identity().gateway, f);
        let exit = arrival.exit;
        if arrival.mailbox == DROP_MAILBOX {
            // λP cover carries a real SURB-ack; a λD drop's is all zero.
            let Some(ack) = net.exit_ack(&arrival) else {
                return (DROP_MAILBOX, exit, false);
            };
            assert_eq!(
                (ack.mailbox, ack.exit),
                (c.identity().mailbox, c.identity().gateway)
            );
            c.handle_mailbox_item(ack.surb_id, &ack.payload, t);
            return (DROP_MAILBOX, exit, true);
        }
        if arrival.mailbox == other.identity().mailbox {
            assert_eq!(arrival.exit, other.identity().gateway);
            other.handle_mailbox_item(arrival.surb_id, &arrival.payload, t);
        } else {
            assert_eq!(arrival.mailbox, c.identity().mailbox);
            assert_eq!(arrival.exit, c.identity().gateway);
            c.handle_mailbox_item(arrival.surb_id, &arrival.payload, t);
        }
        let ack = net
            .exit_ack(&arrival)
            .expect("real packets and loops carry a usable SURB");
        assert_eq!(
            (ack.mailbox, ack.exit),
            (c.identity().mailbox, c.identity().gateway)
        );
        c.handle_mailbox_item(ack.surb_id, &ack.payload, t);
        (arrival.mailbox, exit, true)
    }

    fn deliver(
        net: &TestNet,
        c: &mut ClientCore,
        other: &mut ClientCore,
        t: Instant,
        f: &Frame,
    ) -> MailboxAddress {
        deliver_acked(net, c, other, t, f).0
    }

    fn events(c: &mut ClientCore) -> Vec<Event> {
        std::iter::from_fn(|| c.poll_event()).collect()
    }

    #[test]
    fn message_crosses_the_network_and_is_acked() {
        let mut w = World::new(1);
        let mut a = w.client(0, 10);
        let mut b = w.client(1, 11);
        let msg: Vec<u8> = (0..FRAGMENT_DATA_SIZE * 2 + 10).map(|i| i as u8).collect();
        let id = a.send_message(&mut w.rng, b.contact(), &msg).unwrap();
        assert_eq!(a.stats().queued_fragments, 3);
        let mut to_b = 0;
        let mut drops = 0;
        let World { net, rng, now } = &mut w;
        run_with(&mut a, rng, *now + Duration::from_secs(30), |a, t, f| {
            let to = deliver(net, a, &mut b, t, &f);
            if to == DROP_MAILBOX {
                drops += 1;
            } else if to == b.identity().mailbox {
                to_b += 1;
            }
        });
        assert_eq!(to_b, 3);
        assert!(drops > 0);
        assert_eq!(
            events(&mut b),
            vec![Event::Message {
                from: None,
                message_id: id,
                bytes: msg
            }]
        );
        assert_eq!(events(&mut a), vec![Event::MessageAcked { message_id: id }]);
        let s = a.stats();
        assert_eq!(
            (
                s.real_sent,
                s.retransmissions,
                s.fragments_acked,
                s.messages_acked
            ),
            (3, 0, 3, 1)
        );
        // λL loops come back whole; λP cover went to drop mailboxes and only its ack
        // comes back.
        assert_eq!(s.loops_returned, s.loops_sent);
        assert_eq!(s.loop_acks_returned, s.loops_sent + s.payload_cover_sent);
        assert_eq!(s.malformed_items + s.unknown_replies + s.build_failures, 0);
        assert_eq!(s.queued_fragments + s.in_flight_fragments, 0);
        assert_eq!(b.stats().messages_received, 1);
    }

    /// Fragments of a message still arriving are kept in the store with the ack that
    /// lets the gateway forget them: after a crash the message still completes, and
    /// once complete its fragments leave the store.
    #[test]
    fn fragments_of_an_incomplete_message_survive_a_restart() {
        let mut rng = StdRng::seed_from_u64(3);
        let id = Identity::generate(&mut rng, [1; 32]);
        let store = crate::ClientStore::in_memory().unwrap();
        let msg = vec![9u8; FRAGMENT_DATA_SIZE * 2 + 3];
        let frags = shoal_packet::fragment::fragment([4; 16], &msg).unwrap();
        let now = Instant::now();
        let mut a = ClientCore::new(id.clone(), ClientConfig::default(), &mut rng);
        a.handle_fragment(frags[0].clone(), now);
        a.handle_fragment(frags[2].clone(), now);
        assert!(events(&mut a).is_empty());
        store
            .save_received(&[], &a.take_partial_ops(), &a.snapshot())
            .unwrap();
        assert_eq!(store.load_partials().unwrap().len(), 2);
        // The items are acked now; the process dies; a new one starts from the store.
        drop(a);
        let mut b = ClientCore::new(id, ClientConfig::default(), &mut rng);
        b.restore(store.load_snapshot().unwrap().unwrap()).unwrap();
        b.restore_partials(store.load_partials().unwrap(), now);
        assert!(b.take_partial_ops().is_empty());
        b.handle_fragment(frags[1].clone(), now);
        let got: Vec<Vec<u8>> = events(&mut b)
            .into_iter()
            .filter_map(|e| match e {
                Event::Message { bytes, .. } => Some(bytes),
                _ => None,
            })
            .collect();
        assert_eq!(got, vec![msg]);
        store
            .save_received(&[], &b.take_partial_ops(), &b.snapshot())
            .unwrap();
        assert!(store.load_partials().unwrap().is_empty());
        // A late copy of a fragment is a duplicate, not a new partial.
        b.handle_fragment(frags[0].clone(), now);
        assert!(b.take_partial_ops().is_empty());
    }

    #[test]
    fn withheld_ack_is_retransmitted_and_receiver_deduplicates() {
        let mut w = World::new(2);
        let mut a = w.client(0, 20);
        let mut b = w.client(1, 21);
        let msg = vec![5u8; FRAGMENT_DATA_SIZE + 1];
        let id = a.send_message(&mut w.rng, b.contact(), &msg).unwrap();
        let mut withheld = 0;
        let mut delivered_to_b = 0;
        let mut t_end = w.now;
        // Step through time; the first copy of each fragment reaches B but its ack is lost.
        for step in 1..=120 {
            t_end = w.now + Duration::from_secs(step);
            for (t, f) in run(&mut a, &mut w.rng, t_end) {
                let arrival = w.net.deliver(a.identity().gateway, &f);
                if arrival.mailbox != b.identity().mailbox {
                    continue;
                }
                delivered_to_b += 1;
                b.handle_mailbox_item(arrival.surb_id, &arrival.payload, t);
                if withheld < 2 {
                    withheld += 1;
                    continue;
                }
                let ack = w.net.exit_ack(&arrival).unwrap();
                a.handle_mailbox_item(ack.surb_id, &ack.payload, t);
            }
            if a.stats().messages_acked == 1 {
                break;
            }
        }
        let s = a.stats();
        assert_eq!(s.messages_acked, 1, "acked by {t_end:?}");
        assert_eq!(s.retransmissions, 2);
        assert_eq!(s.real_sent, 4);
        assert_eq!(delivered_to_b, 4);
        // B saw every fragment twice but reports the message once.
        let got = events(&mut b);
        assert_eq!(got.len(), 1);
        assert!(
            matches!(&got[0], Event::Message { message_id, bytes, .. } if *message_id == id && *bytes == msg)
        );
        assert_eq!(b.stats().duplicate_fragments, 2);
        // Retransmission waited at least the configured margin.
        assert!(t_end - w.now >= ClientConfig::default().retransmit.margin);
    }

    #[test]
    fn late_ack_for_a_retransmitted_fragment_counts_as_duplicate() {
        let mut w = World::new(3);
        let mut a = w.client(0, 30);
        let b = w.client(1, 31);
        a.send_message(&mut w.rng, b.contact(), b"hi").unwrap();
        let mut copies = Vec::new();
        for step in 1..=60 {
            for (_, f) in run(&mut a, &mut w.rng, w.now + Duration::from_secs(step)) {
                let arrival = w.net.deliver(a.identity().gateway, &f);
                if arrival.mailbox == b.identity().mailbox {
                    copies.push(arrival);
                }
            }
            if copies.len() == 2 {
                break;
            }
        }
        assert_eq!(copies.len(), 2, "one retransmission within a minute");
        let now = w.now + Duration::from_secs(60);
        for c in &copies {
            let ack = w.net.exit_ack(c).unwrap();
            a.handle_mailbox_item(ack.surb_id, &ack.payload, now);
        }
        let s = a.stats();
        assert_eq!((s.fragments_acked, s.duplicate_acks), (1, 1));
    }

    /// Kolmogorov-Smirnov statistic of `samples` against Exp(`rate`).
    fn ks_exp(samples: &mut [f64], rate: f64) -> f64 {
        samples.sort_by(f64::total_cmp);
        let n = samples.len() as f64;
        samples.iter().enumerate().fold(0.0, |d: f64, (i, x)| {
            let cdf = 1.0 - (-rate * x).exp();
            d.max((cdf - i as f64 / n).abs())
                .max(((i + 1) as f64 / n - cdf).abs())
        })
    }

    #[test]
    fn send_times_are_poisson_and_do_not_depend_on_load() {
        let mut w = World::new(4);
        let mut idle = w.client(0, 40);
        let mut busy = w.client(0, 40);
        let peer = w.client(1, 41).contact();
        for i in 0..30u8 {
            busy.send_message(&mut w.rng, peer, &vec![i; FRAGMENT_DATA_SIZE * 3])
                .unwrap();
        }
        let until = w.now + Duration::from_secs(200);
        let idle_times: Vec<Instant> = run(&mut idle, &mut w.rng, until)
            .into_iter()
            .map(|(t, _)| t)
            .collect();
        let mut other_rng = StdRng::seed_from_u64(999);
        let busy_times: Vec<Instant> = run(&mut busy, &mut other_rng, until)
            .into_iter()
            .map(|(t, _)| t)
            .collect();
        // One frame per event, at the same instants, whatever the queue holds.
        assert_eq!(idle_times, busy_times);
        assert!(busy.stats().real_sent > 100, "{:?}", busy.stats());
        assert_eq!(idle.stats().real_sent, 0);
        // The instants are a Poisson process at λP + λL + λD = 3/s. With ~600 gaps the
        // mean's standard error is ~4%; the KS bound is the 1% critical value. Seeds are
        // fixed, so this cannot flake; the bounds are loose enough to survive a change
        // of seed.
        let mut gaps: Vec<f64> = std::iter::once(w.now)
            .chain(idle_times.iter().copied())
            .collect::<Vec<_>>()
            .windows(2)
            .map(|p| (p[1] - p[0]).as_secs_f64())
            .collect();
        let n = gaps.len() as f64;
        assert!(n > 450.0 && n < 750.0, "{n} events in 200 s at 3/s");
        let mean = gaps.iter().sum::<f64>() / n;
        assert!((mean - 1.0 / 3.0).abs() < 0.15 / 3.0, "mean gap {mean}");
        let d = ks_exp(&mut gaps, 3.0);
        assert!(d < 1.63 / n.sqrt(), "KS {d}, n {n}");
    }

    /// Where λP packets go does not depend on what is queued: a client sending all its
    /// real traffic to the other gateway puts its acked packets (λP and λL) on exactly
    /// the same gateways at exactly the same instants as an idle client with the same
    /// seed, λP half on each; every one's ack comes back. With `legacy_leaks` the busy
    /// client's packets pile onto the recipient's gateway (the leak the control shows).
    #[test]
    fn payload_slots_go_where_the_draw_says_whatever_is_queued() {
        fn run_payload(legacy: bool, busy: bool) -> (Vec<(Duration, NodeId)>, ClientStats) {
            let mut w = World::new(12);
            let mut rng = StdRng::seed_from_u64(120);
            let identity = Identity::generate(&mut rng, w.net.gateways[0]);
            let config = ClientConfig {
                legacy_leaks: legacy,
                ..ClientConfig::default()
            };
            let mut a = ClientCore::new(identity, config, &mut rng);
            a.set_topology(w.net.topo.clone(), w.now);
            let mut b = w.client(1, 121);
            if busy {
                for i in 0..40u8 {
                    a.send_message(&mut w.rng, b.contact(), &vec![i; FRAGMENT_DATA_SIZE * 2])
                        .unwrap();
                }
            }
            let mut exits = Vec::new();
            let World { net, rng, now } = &mut w;
            let start = *now;
            run_with(&mut a, rng, start + Duration::from_secs(100), |a, t, f| {
                // λD drops are the only packets without an ack.
                let (_, exit, acked) = deliver_acked(net, a, &mut b, t, &f);
                if acked {
                    exits.push((t - start, exit));
                }
            });
            (exits, a.stats())
        }
        let (idle, idle_stats) = run_payload(false, false);
        let (busy, busy_stats) = run_payload(false, true);
        assert_eq!(idle, busy);
        assert_eq!(idle_stats.real_sent, 0);
        assert!(busy_stats.real_sent > 60, "{busy_stats:?}");
        assert_eq!(
            busy_stats.loop_acks_returned + busy_stats.fragments_acked,
            busy_stats.loops_sent + busy_stats.payload_cover_sent + busy_stats.real_sent
        );
        let gw_b = World::new(12).net.gateways[1];
        let share_b = |x: &[(Duration, NodeId)]| {
            x.iter().filter(|(_, g)| *g == gw_b).count() as f64 / x.len() as f64
        };
        // λP/2 of λP + λL = 0.4 go to B's gateway; ~250 packets, 4 SDs ≈ 0.12.
        assert!((share_b(&busy) - 0.4).abs() < 0.12, "{}", share_b(&busy));
        // The control: the same workload with the old rule.
        let (legacy_idle, _) = run_payload(true, false);
        let (legacy_busy, _) = run_payload(true, true);
        assert_eq!(share_b(&legacy_idle), 0.0);
        assert!(share_b(&legacy_busy) > 0.2, "{}", share_b(&legacy_busy));
    }

    /// Issue 16, leak 6: an admin command sent through the admin's own client (as
    /// `shoal admin` does: an ordinary message to the gateway's admin endpoint) leaves the
    /// admin's link exactly as it was. The observer's whole view of that link, every
    /// frame's (time, size), is the same with no command, a short one (create an
    /// account) and a long one (a policy revoking 200 accounts), while the
    /// command's fragments do reach the endpoint. The control replays what the old path
    /// put on the wire (the admin dialling the gateway with its subnet key and sending the
    /// command as `AdminChunk` frames, encoded by the real `admin_chunks`): a burst on a
    /// link of its own, whose frame count grows with the command.
    #[test]
    fn an_admin_command_leaves_the_admin_link_trace_unchanged() {
        use shoal_packet::FRAME_SIZE;
        use shoal_packet::protocol::admin_chunks;
        use shoal_packet::sphinx::ADMIN_MAILBOX;
        use shoal_subnet::{AccountAction, AdminRequest, CommandBody, ReplyTo, SubnetAdmin};
        use shoal_topology::Hex32;

        /// (time since start, frame size, link: 0 = the client's, 1 = the old admin link)
        type Trace = Vec<(Duration, usize, u8)>;
        let admin = SubnetAdmin::from_secret([9; 32]);
        let command = |revoked: u8| {
            let action = if revoked == 0 {
                AccountAction::CreateAccount {
                    account: Hex32([1; 32]),
                    mailbox: Hex32([2; 32]),
                    quota: 10,
                }
            } else {
                // What a gateway is told of a policy: its version, TTL bound and the
                // link keys of the accounts it revokes.
                AccountAction::PublishPolicy {
                    version: 2,
                    ttl_max_secs: 60,
                    revoked_accounts: (0..revoked).map(|i| Hex32([i; 32])).collect(),
                }
            };
            admin
                .issue_command(CommandBody {
                    subnet: Hex32([0; 32]),
                    gateway: Hex32([3; 32]),
                    sequence: 1,
                    expires_at: 99,
                    action,
                })
                .unwrap()
        };
        // Returns the trace and how many packets reached the admin endpoint.
        let observe = |partners: Option<u8>, old_path: bool| -> (Trace, usize) {
            let mut w = World::new(16);
            let mut a = w.client(0, 160);
            let endpoint = Contact {
                mailbox: ADMIN_MAILBOX,
                gateway: w.net.gateways[1],
                public_key: PublicKey::from(&StaticSecret::from([7; 32])).to_bytes(),
            };
            let start = w.now;
            let t0 = start + Duration::from_secs(30);
            let (mut trace, mut at_endpoint, mut old_link) = (Trace::new(), 0, 0);
            let World { net, rng, .. } = &mut w;
            let mut on_frame = |a: &mut ClientCore, t: Instant, f: Frame| {
                trace.push((t - start, f.as_bytes().len(), 0));
                let arrival = net.deliver(a.identity().gateway, &f);
                if arrival.mailbox == ADMIN_MAILBOX {
                    at_endpoint += 1;
                    // The gateway acks it like any packet (so it is not sent again).
                    let ack = net.exit_ack(&arrival).unwrap();
                    a.handle_mailbox_item(ack.surb_id, &ack.payload, t);
                }
            };
            run_with(&mut a, rng, t0, &mut on_frame);
            if let Some(p) = partners {
                let cmd = command(p);
                let reply = ReplyTo {
                    mailbox: Hex32(a.identity().mailbox),
                    gateway: Hex32(a.identity().gateway),
                    seal_key: Hex32(a.contact().public_key),
                };
                let request = AdminRequest::new(&cmd, reply).to_bytes();
                if old_path {
                    old_link = admin_chunks(&cmd.to_bytes()).unwrap().len();
                } else {
                    a.send_message(rng, endpoint, &request).unwrap();
                }
            }
            run_with(&mut a, rng, start + Duration::from_secs(150), &mut on_frame);
            trace.extend(std::iter::repeat_n((t0 - start, FRAME_SIZE, 1), old_link));
            trace.sort();
            (trace, at_endpoint)
        };
        let (quiet, none) = observe(None, false);
        assert_eq!(none, 0);
        assert!(quiet.len() > 300, "{}", quiet.len());
        assert!(
            quiet
                .iter()
                .all(|(_, size, link)| *size == FRAME_SIZE && *link == 0)
        );
        for partners in [0, 200] {
            let (busy, at_endpoint) = observe(Some(partners), false);
            let fragments = AdminRequest::new(
                &command(partners),
                ReplyTo {
                    mailbox: Hex32([0; 32]),
                    gateway: Hex32([0; 32]),
                    seal_key: Hex32([0; 32]),
                },
            )
            .to_bytes()
            .len()
            .div_ceil(FRAGMENT_DATA_SIZE);
            assert!(at_endpoint >= fragments, "{at_endpoint} < {fragments}");
            assert_eq!(
                busy, quiet,
                "{partners} revoked: the link shows the command"
            );
        }
        // The control: the old path's burst is on a link of its own, and its size says
        // how long the command is.
        let burst = |t: &Trace| t.iter().filter(|(_, _, link)| *link == 1).count();
        let (short, _) = observe(Some(0), true);
        let (long, _) = observe(Some(200), true);
        assert_ne!(short, quiet);
        println!(
            "old admin link: {} frame(s) for a create, {} for a policy revoking 200; \
             through the client: {} frames either way, the same trace",
            burst(&short),
            burst(&long),
            quiet.len()
        );
        assert_eq!(burst(&short), 1);
        assert!(burst(&long) > 3 * burst(&short), "{}", burst(&long));
    }

    #[test]
    fn idle_client_emits_only_cover() {
        let mut w = World::new(5);
        let mut a = w.client(0, 50);
        let mut other = w.client(1, 51);
        let mut frames = 0;
        let World { net, rng, now } = &mut w;
        run_with(&mut a, rng, *now + Duration::from_secs(60), |a, t, f| {
            frames += 1;
            let to = deliver(net, a, &mut other, t, &f);
            assert!(to == DROP_MAILBOX || to == a.identity().mailbox);
        });
        assert!(frames > 100);
        let s = a.stats();
        assert_eq!(s.real_sent, 0);
        assert!(
            s.payload_cover_sent > 0 && s.loops_sent > 0 && s.drops_sent > 0,
            "{s:?}"
        );
        assert_eq!(s.payload_cover_sent + s.loops_sent + s.drops_sent, frames);
        assert_eq!(s.loops_returned, s.loops_sent);
        assert_eq!(s.loop_acks_returned, s.payload_cover_sent + s.loops_sent);
        assert!(events(&mut a).is_empty());
    }

    #[test]
    fn lost_loops_are_counted_and_late_ones_noticed() {
        let mut w = World::new(6);
        let mut a = w.client(0, 60);
        let frames = run(&mut a, &mut w.rng, w.now + Duration::from_secs(10));
        let sent = a.stats().loops_sent + a.stats().payload_cover_sent;
        assert!(a.stats().loops_sent > 0);
        // Nothing comes back; far past every deadline all loops are lost, and every λP
        // cover's ack.
        let later = w.now + Duration::from_secs(3600);
        a.handle_timeout(later, &mut w.rng);
        let s = a.stats();
        assert!(s.loops_lost >= s.loops_sent, "{s:?}");
        assert!(s.loop_acks_lost >= sent);
        // One straggler arrives after all.
        let late = frames
            .iter()
            .map(|(_, f)| w.net.deliver(a.identity().gateway, f))
            .find(|x| x.mailbox == a.identity().mailbox)
            .unwrap();
        a.handle_mailbox_item(late.surb_id, &late.payload, later);
        assert_eq!(a.stats().loops_late, 1);
    }

    #[test]
    fn no_topology_means_no_frames() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut a = ClientCore::new(
            Identity::generate(&mut rng, [1; 32]),
            ClientConfig::default(),
            &mut rng,
        );
        assert_eq!(a.poll_timeout(), None);
        a.handle_timeout(Instant::now(), &mut rng);
        assert!(a.poll_transmit().is_none());
    }

    #[test]
    fn stalled_driver_skips_instead_of_bursting() {
        let mut w = World::new(8);
        let mut a = w.client(0, 80);
        a.handle_timeout(w.now + Duration::from_secs(3600), &mut w.rng);
        let burst = std::iter::from_fn(|| a.poll_transmit()).count();
        assert!(burst <= 3, "{burst} frames after a stall");
        assert_eq!(a.stats().events_skipped_late, 3);
    }

    #[test]
    fn refusals() {
        let mut w = World::new(9);
        let mut rng = StdRng::seed_from_u64(90);
        let config = ClientConfig {
            max_queued_fragments: 2,
            ..ClientConfig::default()
        };
        let mut a = ClientCore::new(
            Identity::generate(&mut rng, w.net.gateways[0]),
            config,
            &mut rng,
        );
        let b = w.client(1, 91).contact();
        let mut weak = b;
        weak.public_key = [0; 32];
        assert_eq!(
            a.send_message(&mut rng, weak, b"x"),
            Err(ClientError::WeakContactKey)
        );
        assert!(matches!(
            a.send_message(&mut rng, b, &vec![0; FRAGMENT_DATA_SIZE * 3]),
            Err(ClientError::QueueFull { .. })
        ));
        assert!(matches!(
            a.send_message(&mut rng, b, &vec![0; MAX_MESSAGE_SIZE + 1]),
            Err(ClientError::MessageTooLarge { .. })
        ));
        a.send_message(&mut rng, b, b"ok").unwrap();
        assert_eq!(a.stats().queued_fragments, 1);
    }

    #[test]
    fn snapshot_restores_outgoing_and_received() {
        let mut w = World::new(10);
        let mut a = w.client(0, 100);
        let mut b = w.client(1, 101);
        let msg = vec![9u8; FRAGMENT_DATA_SIZE + 3];
        let id = a.send_message(&mut w.rng, b.contact(), &msg).unwrap();
        // B gets the message; nothing is acked.
        for (t, f) in run(&mut a, &mut w.rng, w.now + Duration::from_secs(5)) {
            let arrival = w.net.deliver(a.identity().gateway, &f);
            if arrival.mailbox == b.identity().mailbox {
                b.handle_mailbox_item(arrival.surb_id, &arrival.payload, t);
            }
        }
        assert_eq!(events(&mut b).len(), 1);
        let a_snap = a.snapshot();
        assert_eq!(a_snap.outgoing.len(), 1);
        assert_eq!(a_snap.outgoing[0].unacked.len(), 2);
        assert!(a_snap.outgoing[0].unacked.iter().all(|f| f.attempts == 1));
        let b_snap = b.snapshot();
        assert_eq!(b_snap.received, vec![id]);

        // Through JSON, as a store would.
        let a_snap: ClientSnapshot =
            serde_json::from_str(&serde_json::to_string(&a_snap).unwrap()).unwrap();
        let b_snap: ClientSnapshot =
            serde_json::from_str(&serde_json::to_string(&b_snap).unwrap()).unwrap();
        let a_id: Identity =
            serde_json::from_str(&serde_json::to_string(a.identity()).unwrap()).unwrap();
        let b_id = b.identity().clone();
        let mut rng = StdRng::seed_from_u64(102);
        let mut a2 = ClientCore::new(a_id, ClientConfig::default(), &mut rng);
        a2.set_topology(w.net.topo.clone(), w.now);
        a2.restore(a_snap.clone()).unwrap();
        let mut b2 = ClientCore::new(b_id, ClientConfig::default(), &mut rng);
        b2.set_topology(w.net.topo.clone(), w.now);
        b2.restore(b_snap).unwrap();
        assert_eq!(a2.snapshot(), a_snap);

        // The restored sender retransmits at once; the restored receiver drops the
        // duplicates but the sender still gets its acks.
        for (t, f) in run(&mut a2, &mut rng, w.now + Duration::from_secs(5)) {
            let arrival = w.net.deliver(a2.identity().gateway, &f);
            if arrival.mailbox == b2.identity().mailbox {
                b2.handle_mailbox_item(arrival.surb_id, &arrival.payload, t);
                let ack = w.net.exit_ack(&arrival).unwrap();
                a2.handle_mailbox_item(ack.surb_id, &ack.payload, t);
            }
        }
        assert!(events(&mut b2).is_empty());
        assert_eq!(b2.stats().duplicate_fragments, 2);
        assert_eq!(a2.stats().retransmissions, 2);
        assert_eq!(
            events(&mut a2),
            vec![Event::MessageAcked { message_id: id }]
        );

        // Bad snapshots are refused.
        let mut bad = a_snap.clone();
        bad.version = 99;
        assert_eq!(a2.restore(bad), Err(ClientError::SnapshotVersion(99)));
        let mut bad = a_snap;
        bad.outgoing[0].unacked[0].index = 7;
        let mut a3 = ClientCore::new(
            Identity::generate(&mut rng, w.net.gateways[0]),
            ClientConfig::default(),
            &mut rng,
        );
        assert!(a3.restore(bad).is_err());
    }

    #[test]
    fn retransmit_timeout_backs_off_and_caps() {
        let p = RetransmitPolicy::default();
        let d = Duration::from_millis(500);
        assert_eq!(p.timeout(d, 1), Duration::from_secs(6));
        // Absurd settings saturate instead of panicking.
        let wild = RetransmitPolicy {
            safety_factor: 1e300,
            ..RetransmitPolicy::default()
        };
        assert_eq!(wild.timeout(d, 1), wild.max_timeout);
        assert!(after(Instant::now(), Duration::MAX) > Instant::now());
        assert_eq!(p.timeout(d, 2), Duration::from_secs(12));
        assert_eq!(p.timeout(d, 3), Duration::from_secs(24));
        assert_eq!(p.timeout(d, 100), Duration::from_secs(6 << 6));
        assert_eq!(
            p.timeout(Duration::from_secs(100), 100),
            Duration::from_secs(600)
        );
    }

    #[test]
    fn foreign_bodies_are_counted_not_delivered() {
        let mut w = World::new(11);
        let mut a = w.client(0, 110);
        let mut b = w.client(0, 111);
        // A packet for A's mailbox arrives at B (a confused gateway): B cannot open it.
        let frames = run(&mut a, &mut w.rng, w.now + Duration::from_secs(5));
        let arrival = frames
            .iter()
            .map(|(_, f)| w.net.deliver(a.identity().gateway, f))
            .find(|x| x.mailbox == a.identity().mailbox)
            .unwrap();
        b.handle_mailbox_item(arrival.surb_id, &arrival.payload, w.now);
        assert_eq!(b.stats().malformed_items, 1);
        assert!(events(&mut b).is_empty());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn mailbox_items_never_panic(surb_id: [u8; 16], payload in proptest::collection::vec(any::<u8>(), 0..2100)) {
            let mut rng = StdRng::seed_from_u64(1);
            let mut c = ClientCore::new(Identity::generate(&mut rng, [1; 32]), ClientConfig::default(), &mut rng);
            c.handle_mailbox_item(surb_id, &payload, Instant::now());
            let s = c.stats();
            prop_assert_eq!(s.malformed_items + s.unknown_replies, 1);
            prop_assert!(c.poll_event().is_none());
        }
    }
}

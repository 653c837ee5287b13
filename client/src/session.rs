//! The client's side of its gateway link, sans-IO: the pull schedule with the acks it
//! carries ([`PullSession`]), the reconnection policy ([`Backoff`]), when a fetched
//! directory takes effect ([`EpochEdge`]), and what the user is told when the link
//! cannot work ([`LinkProblem`]).
//!
//! **Nothing leaves the client link off schedule.** The client sends exactly one
//! control frame per pull tick, a `Pull`, and it carries the ids of the items the client
//! has made durable since the last one (at most [`MAX_ACK_IDS`]; the rest wait for the
//! next tick). So when a pull's answer held real mail, and when the client's fsync of
//! it finished, shows nowhere on the wire: the frames and their send times are the same
//! function of the schedule whether or not anything arrived. Acked ⇒ durable still
//! holds: the driver hands ids over only after its store saved what they carried.
//!
//! `legacy_leaks` (test-only) restores the old behaviour, a separate `Ack` frame right
//! after each save, so a test can show the timing attack it allowed.

use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand::{Rng, RngExt};
use shoal_packet::protocol::{ClientMsg, MAX_ACK_IDS};

/// Ids waiting for a pull to carry them, at most. Past it, newly durable ids are
/// dropped: the gateway offers those items again after its redelivery timeout and the
/// client acks them then (nothing is lost, and memory stays bounded).
pub const MAX_WAITING_ACKS: usize = 16 * MAX_ACK_IDS;

/// How the pull schedule runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PullConfig {
    /// A pull every `interval`, whatever the client is doing.
    pub interval: Duration,
    /// Test-only: ack in separate `Ack` frames right after each save (the old, leaky
    /// behaviour). See the module docs.
    pub legacy_leaks: bool,
}

/// Counters of a [`PullSession`]. Aggregates only.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PullStats {
    pub pulls_sent: u64,
    /// Item ids acked (in pulls, or in `Ack` frames under `legacy_leaks`).
    pub ids_acked: u64,
    /// Durable ids dropped because [`MAX_WAITING_ACKS`] were waiting already.
    pub ids_dropped: u64,
}

/// The pull schedule and the acks waiting for it. See the module docs.
#[derive(Debug)]
pub struct PullSession {
    config: PullConfig,
    next_pull: Instant,
    link_up: bool,
    /// Durable ids to ack, oldest first, and the same as a set (no id twice).
    waiting: VecDeque<u64>,
    waiting_set: HashSet<u64>,
    out: VecDeque<ClientMsg>,
    stats: PullStats,
}

impl PullSession {
    /// The first pull falls due one interval after `now`.
    pub fn new(config: PullConfig, now: Instant) -> Self {
        PullSession {
            config,
            next_pull: now + config.interval,
            link_up: false,
            waiting: VecDeque::new(),
            waiting_set: HashSet::new(),
            out: VecDeque::new(),
            stats: PullStats::default(),
        }
    }

    pub fn stats(&self) -> PullStats {
        self.stats
    }

    /// Ids waiting for the next pull.
    pub fn waiting_acks(&self) -> usize {
        self.waiting.len()
    }

    /// When the next pull falls due.
    pub fn poll_timeout(&self) -> Instant {
        self.next_pull
    }

    /// The link to the gateway is up: pulls go out from the next tick.
    pub fn handle_link_up(&mut self) {
        self.link_up = true;
    }

    /// The link is down: no frames until it is up again. Waiting ids stay (item ids are
    /// the gateway's, valid on any link of this account); frames not yet written go.
    pub fn handle_link_down(&mut self) {
        self.link_up = false;
        self.out.clear();
    }

    /// Sends the pull that fell due, if one did. A stalled caller (a suspended laptop)
    /// gets one pull, not a burst: the schedule goes on from the next tick after `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        if now < self.next_pull {
            return;
        }
        while self.next_pull <= now {
            self.next_pull += self.config.interval;
        }
        if !self.link_up {
            return;
        }
        let acks = if self.config.legacy_leaks {
            Vec::new()
        } else {
            let n = self.waiting.len().min(MAX_ACK_IDS);
            let acks: Vec<u64> = self.waiting.drain(..n).collect();
            for id in &acks {
                self.waiting_set.remove(id);
            }
            acks
        };
        self.stats.pulls_sent += 1;
        self.stats.ids_acked += acks.len() as u64;
        self.out.push_back(ClientMsg::Pull { acks });
    }

    /// The items `ids` are durable in the client's store (or carried nothing worth
    /// keeping): the gateway may delete them. They go with the next pull.
    pub fn handle_durable(&mut self, ids: impl IntoIterator<Item = u64>) {
        if self.config.legacy_leaks {
            if !self.link_up {
                return;
            }
            let ids: Vec<u64> = ids.into_iter().collect();
            for chunk in ids.chunks(MAX_ACK_IDS) {
                self.stats.ids_acked += chunk.len() as u64;
                self.out.push_back(ClientMsg::Ack {
                    ids: chunk.to_vec(),
                });
            }
            return;
        }
        for id in ids {
            if self.waiting.len() >= MAX_WAITING_ACKS {
                self.stats.ids_dropped += 1;
            } else if self.waiting_set.insert(id) {
                self.waiting.push_back(id);
            }
        }
    }

    /// The next control frame to write.
    pub fn poll_transmit(&mut self) -> Option<ClientMsg> {
        self.out.pop_front()
    }
}

/// How long to wait before reconnecting: exponential from `min` to `max`, with jitter
/// (uniform in the upper half of the step, so clients refused together do not return
/// together), grown by every failure, reset only by a session that worked (a pull was
/// answered), not by a handshake alone.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    step: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        let min = min.max(Duration::from_millis(1));
        Backoff {
            min,
            max: max.max(min),
            step: min,
        }
    }

    /// A connection attempt or a session failed: the wait before the next attempt.
    pub fn next_delay<R: Rng + ?Sized>(&mut self, rng: &mut R) -> Duration {
        let step = self.step;
        self.step = (self.step * 2).min(self.max);
        let half = step / 2;
        let nanos = u64::try_from(half.as_nanos()).unwrap_or(u64::MAX);
        half + Duration::from_nanos(rng.random_range(0..=nanos))
    }

    /// A session worked: the next failure starts from `min` again.
    pub fn session_worked(&mut self) {
        self.step = self.min;
    }
}

/// Whether `gateway` is the one `topology`'s public rule gives the member with account
/// key `account` (rendezvous hashing, [`shoal_topology::gateway_for_member`]). A member's
/// client checks every directory it accepts with this, so a credential or a config that
/// pins it to another gateway (a rogue admin's own) is refused, not used.
pub fn check_assigned_gateway(
    topology: &shoal_topology::Topology,
    account: &[u8; 32],
    gateway: &[u8; 32],
) -> bool {
    topology
        .gateway_for_member(account)
        .is_ok_and(|g| &g == gateway)
}

/// Why the link to the gateway cannot work, in words for the person at the client.
/// No keys and no client addresses; the gateway's address is the user's own config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum LinkProblem {
    /// The gateway does not know (or no longer accepts) this account. Final: the
    /// driver stops connecting.
    AccessRemoved,
    /// The gateway at this address proved a key other than `[gateway] node_key`.
    GatewayKeyMismatch { gateway: SocketAddr },
    /// The gateway's directory is not signed by enough of `[directory] authority_keys`.
    DirectoryNotTrusted { gateway: SocketAddr },
    /// The gateway's directory is signed, but not valid now (check the clock).
    DirectoryOutOfDate { gateway: SocketAddr },
    /// A subnet member's configured gateway is not the one the directory's public rule
    /// gives its account key ([`shoal_topology::gateway_for_member`]). Final: a gateway
    /// an admin picked could gather a whole subnet, and whoever watches it would learn
    /// who belongs to that subnet.
    GatewayNotAssigned { gateway: SocketAddr },
}

impl LinkProblem {
    /// Whether the driver gives up (it does only when the gateway refused the account).
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            LinkProblem::AccessRemoved | LinkProblem::GatewayNotAssigned { .. }
        )
    }
}

impl std::fmt::Display for LinkProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LinkProblem::AccessRemoved => f.write_str(
                "your access to this subnet was removed by its admin \
                 (the gateway no longer knows this account); the client stopped connecting",
            ),
            LinkProblem::GatewayKeyMismatch { gateway } => write!(
                f,
                "the gateway's key does not match client.toml: the gateway at {gateway} \
                 proved another key than [gateway] node_key"
            ),
            LinkProblem::DirectoryNotTrusted { gateway } => write!(
                f,
                "the directory from {gateway} is not signed by the authorities in \
                 client.toml ([directory] authority_keys, threshold)"
            ),
            LinkProblem::DirectoryOutOfDate { gateway } => write!(
                f,
                "the directory from {gateway} is not valid at this computer's time: \
                 check the clock"
            ),
            LinkProblem::GatewayNotAssigned { gateway } => write!(
                f,
                "the directory assigns your account key to another gateway than {gateway}: \
                 members are spread over gateways by a public rule, so that no gateway \
                 gathers a subnet; the client stopped connecting. Ask your admin to enrol \
                 you at the gateway `shoal client init` chose"
            ),
        }
    }
}

/// When a verified directory document takes effect: at its epoch's edge, never before.
///
/// Authorities publish the next epoch's document a vote-lead ahead, and clients fetch it
/// at their own times. A client that switched on fetch would put the next epoch's frame
/// label and keys on the wire early, so exit gateways and observers would see two
/// populations of labels sorted by fetch time. Every client therefore holds a document
/// for a later epoch until that epoch starts. It never goes back to an older epoch than
/// the one in use. A client with no document at all takes the first one at once: it has
/// nothing else to send with.
#[derive(Debug)]
pub struct EpochEdge<T> {
    current: Option<u64>,
    /// The newest later document, and the unix second its epoch starts.
    waiting: Option<(u64, u64, T)>,
}

impl<T> Default for EpochEdge<T> {
    fn default() -> Self {
        EpochEdge {
            current: None,
            waiting: None,
        }
    }
}

impl<T> EpochEdge<T> {
    /// The epoch in use, if any.
    pub fn current(&self) -> Option<u64> {
        self.current
    }

    /// A verified document for `epoch`, whose epoch starts at `starts_unix`. Returns it
    /// when it is to be used now; otherwise it waits (replacing an older waiting one) or
    /// is dropped as old.
    pub fn offer(&mut self, epoch: u64, starts_unix: u64, doc: T, now_unix: u64) -> Option<T> {
        match self.current {
            Some(current) if epoch < current => None,
            Some(_) if now_unix < starts_unix => {
                if self.waiting.as_ref().is_none_or(|(e, _, _)| epoch >= *e) {
                    self.waiting = Some((epoch, starts_unix, doc));
                }
                None
            }
            _ => {
                if self.waiting.as_ref().is_some_and(|(e, _, _)| *e <= epoch) {
                    self.waiting = None;
                }
                self.current = Some(epoch);
                Some(doc)
            }
        }
    }

    /// Unix second at which a waiting document takes effect.
    pub fn poll_timeout(&self) -> Option<u64> {
        self.waiting.as_ref().map(|(_, starts, _)| *starts)
    }

    /// The waiting document, once its epoch has started.
    pub fn handle_timeout(&mut self, now_unix: u64) -> Option<T> {
        if self.poll_timeout().is_none_or(|starts| now_unix < starts) {
            return None;
        }
        let (epoch, _, doc) = self.waiting.take()?;
        self.current = Some(epoch);
        Some(doc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;
    use shoal_packet::FRAME_SIZE;

    const INTERVAL: Duration = Duration::from_secs(1);

    /// What a network observer records of one client's control frames: (send time
    /// since start, frame length) in order.
    type Trace = Vec<(Duration, usize)>;

    /// Runs a client's pull session for `ticks` pulls against a virtual gateway, the
    /// way the driver does: the answer to each pull arrives `rtt` later; if it carried
    /// real items (`mail`: a seeded coin per pull), the client saves them, which takes
    /// a seeded 0.2–3 ms fsync, and then hands their ids over. Frames are recorded at
    /// the instant each call hands them out.
    fn observe(seed: u64, mail: bool, legacy_leaks: bool, ticks: usize) -> Trace {
        let mut rng = StdRng::seed_from_u64(seed);
        let start = Instant::now();
        let config = PullConfig {
            interval: INTERVAL,
            legacy_leaks,
        };
        let mut s = PullSession::new(config, start);
        s.handle_link_up();
        let mut trace = Vec::new();
        let mut next_id = 1u64;
        let rtt = Duration::from_micros(400);
        let record = |s: &mut PullSession, at: Instant, trace: &mut Trace| {
            while let Some(m) = s.poll_transmit() {
                let len = m.to_frame().unwrap().as_bytes().len();
                trace.push((at - start, len));
            }
        };
        for _ in 0..ticks {
            let due = s.poll_timeout();
            s.handle_timeout(due);
            record(&mut s, due, &mut trace);
            // The answer: real items in some pulls (the same draws in both runs, so
            // only `mail` differs).
            let real = rng.random_range(0..=20usize);
            let fsync = Duration::from_micros(rng.random_range(200..3000));
            if mail && real > 0 {
                let saved = due + rtt + fsync;
                let ids: Vec<u64> = (next_id..next_id + real as u64).collect();
                next_id += real as u64;
                s.handle_durable(ids);
                record(&mut s, saved, &mut trace);
            }
        }
        trace
    }

    #[test]
    fn control_frames_and_their_times_do_not_depend_on_mail() {
        for seed in 0..8 {
            let quiet = observe(seed, false, false, 50);
            let busy = observe(seed, true, false, 50);
            assert_eq!(quiet, busy, "seed {seed}");
            // Exactly one frame per tick, on the tick.
            assert_eq!(busy.len(), 50);
            for (i, (t, len)) in busy.iter().enumerate() {
                assert_eq!(*t, INTERVAL * (i as u32 + 1));
                assert_eq!(*len, FRAME_SIZE);
            }
        }
    }

    #[test]
    fn legacy_ack_frames_reveal_mail_to_an_observer() {
        // The control: with separate Ack frames, the observer sees frames off the pull
        // grid exactly after the pulls whose answers held mail.
        let quiet = observe(3, false, true, 50);
        let busy = observe(3, true, true, 50);
        assert_ne!(quiet, busy);
        let off_grid = |t: &Trace| t.iter().filter(|(at, _)| at.subsec_nanos() != 0).count();
        assert_eq!(off_grid(&quiet), 0);
        assert!(off_grid(&busy) > 20, "{}", off_grid(&busy));
        // The attack: "this pull's answer held mail" iff a frame follows it within the
        // interval. Score it against the truth (the same seeded draws).
        let mut rng = StdRng::seed_from_u64(3);
        let truth: Vec<bool> = (0..50)
            .map(|_| {
                let real = rng.random_range(0..=20usize);
                let _fsync: u64 = rng.random_range(200..3000);
                real > 0
            })
            .collect();
        let guesses: Vec<bool> = (0..50u32)
            .map(|i| {
                let tick = INTERVAL * (i + 1);
                busy.iter()
                    .any(|(at, _)| *at > tick && *at < tick + INTERVAL / 2)
            })
            .collect();
        assert_eq!(guesses, truth, "the observer learns every pull's mail");
    }

    #[test]
    fn acks_wait_for_the_next_pull_and_overflow_spreads_over_pulls() {
        let t0 = Instant::now();
        let mut s = PullSession::new(
            PullConfig {
                interval: INTERVAL,
                legacy_leaks: false,
            },
            t0,
        );
        s.handle_link_up();
        s.handle_durable(0..(MAX_ACK_IDS as u64 + 5));
        s.handle_durable([1, 2, 3]); // already waiting: not twice
        assert!(s.poll_transmit().is_none(), "nothing leaves off schedule");
        s.handle_timeout(t0 + INTERVAL);
        let Some(ClientMsg::Pull { acks }) = s.poll_transmit() else {
            panic!()
        };
        assert_eq!(acks.len(), MAX_ACK_IDS);
        assert!(s.poll_transmit().is_none(), "one frame per tick");
        s.handle_timeout(t0 + INTERVAL * 2);
        let Some(ClientMsg::Pull { acks }) = s.poll_transmit() else {
            panic!()
        };
        assert_eq!(
            acks,
            (MAX_ACK_IDS as u64..MAX_ACK_IDS as u64 + 5).collect::<Vec<_>>()
        );
        assert_eq!(s.stats().ids_acked, MAX_ACK_IDS as u64 + 5);
        // Bounded: past MAX_WAITING_ACKS ids are dropped (the gateway re-offers them).
        s.handle_durable(1000..(1000 + MAX_WAITING_ACKS as u64 + 7));
        assert_eq!(s.waiting_acks(), MAX_WAITING_ACKS);
        assert_eq!(s.stats().ids_dropped, 7);
    }

    #[test]
    fn no_pulls_while_down_and_no_burst_after_a_stall() {
        let t0 = Instant::now();
        let mut s = PullSession::new(
            PullConfig {
                interval: INTERVAL,
                legacy_leaks: false,
            },
            t0,
        );
        s.handle_durable([7]);
        s.handle_timeout(t0 + INTERVAL);
        assert!(s.poll_transmit().is_none());
        s.handle_link_up();
        // Ten ticks late: one pull, and the next is on the grid after now.
        s.handle_timeout(t0 + INTERVAL * 11 + Duration::from_millis(1));
        assert_eq!(s.poll_transmit(), Some(ClientMsg::Pull { acks: vec![7] }));
        assert!(s.poll_transmit().is_none());
        assert_eq!(s.poll_timeout(), t0 + INTERVAL * 12);
    }

    #[test]
    fn backoff_grows_with_jitter_and_resets_only_when_a_session_worked() {
        let mut rng = StdRng::seed_from_u64(1);
        let mut b = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
        // A gateway that refuses at once, 87 times: the waits grow to the cap.
        let waits: Vec<Duration> = (0..87).map(|_| b.next_delay(&mut rng)).collect();
        for (i, w) in waits.iter().enumerate() {
            let step = (Duration::from_millis(200) * 2u32.saturating_pow(i as u32))
                .min(Duration::from_secs(30));
            assert!(*w >= step / 2 && *w <= step, "attempt {i}: {w:?}");
        }
        let total: Duration = waits.iter().sum();
        assert!(total > Duration::from_secs(17 * 60), "{total:?}");
        // Jitter: two clients refused together do not come back together.
        let mut other = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
        let mut rng2 = StdRng::seed_from_u64(2);
        let theirs: Vec<Duration> = (0..10).map(|_| other.next_delay(&mut rng2)).collect();
        assert_ne!(&waits[..10], &theirs[..]);
        // Only a session that worked resets it.
        b.session_worked();
        assert!(b.next_delay(&mut rng) <= Duration::from_millis(200));
    }

    /// The rogue admin's attack (issue 16, leak 1): name its own gateway in every
    /// credential of its subnet, so that gateway's address tells an observer who belongs
    /// to the subnet. A member's client checks each directory against the public rule:
    /// the rogue gateway keeps only the members the rule gives it anyway (a share that
    /// does not depend on the subnet), every other member refuses it. Without the check
    /// (the control) the rogue gateway would hold the whole subnet.
    #[test]
    fn a_member_refuses_a_gateway_the_rule_did_not_choose() {
        let mut rng = StdRng::seed_from_u64(16);
        let net = crate::testnet::TestNet::new(&mut rng, shoal_topology::NetworkParams::default());
        let rogue = net.gateways[0];
        let members = 400;
        let (mut kept, mut refused) = (0, 0);
        for _ in 0..members {
            let account = ed25519_dalek::SigningKey::generate(&mut rng)
                .verifying_key()
                .to_bytes();
            let assigned = net.topo.gateway_for_member(&account).unwrap();
            assert!(check_assigned_gateway(&net.topo, &account, &assigned));
            if check_assigned_gateway(&net.topo, &account, &rogue) {
                assert_eq!(assigned, rogue);
                kept += 1;
            } else {
                refused += 1;
            }
        }
        // Two gateways: the rule gives each about half (5 binomial SDs = 50).
        assert!(
            (150..=250).contains(&kept),
            "kept {kept}, refused {refused}"
        );
        // The control: with no check, all `members` would have used the rogue gateway.
        assert!(kept < members, "the check has no power");
        assert!(
            !check_assigned_gateway(&net.topo, &[0; 32], &[0xee; 32]),
            "an unknown gateway"
        );
    }

    #[test]
    fn problems_say_what_is_wrong_and_where_it_is_configured() {
        let gateway: SocketAddr = "192.0.2.1:7102".parse().unwrap();
        let text = LinkProblem::DirectoryNotTrusted { gateway }.to_string();
        assert!(text.contains("192.0.2.1:7102") && text.contains("client.toml"));
        let text = LinkProblem::GatewayKeyMismatch { gateway }.to_string();
        assert!(text.contains("gateway's key does not match client.toml"));
        assert!(
            LinkProblem::AccessRemoved
                .to_string()
                .contains("removed by its admin")
        );
        assert!(LinkProblem::AccessRemoved.is_final());
        assert!(LinkProblem::GatewayNotAssigned { gateway }.is_final());
        assert!(!LinkProblem::GatewayKeyMismatch { gateway }.is_final());
    }

    #[test]
    fn a_later_document_waits_for_its_epoch_edge() {
        let mut edge = EpochEdge::default();
        // The first document is used at once, even before its start: nothing else exists.
        assert_eq!(edge.offer(5, 1_000, "e5", 900), Some("e5"));
        // The next one, fetched in the vote-lead window, waits for the edge.
        assert_eq!(edge.offer(6, 1_100, "e6", 1_090), None);
        assert_eq!(edge.current(), Some(5));
        assert_eq!(edge.poll_timeout(), Some(1_100));
        assert_eq!(edge.handle_timeout(1_099), None);
        assert_eq!(edge.handle_timeout(1_100), Some("e6"));
        assert_eq!(edge.current(), Some(6));
        assert_eq!(edge.poll_timeout(), None);
    }

    #[test]
    fn never_back_to_an_older_epoch() {
        let mut edge = EpochEdge::default();
        assert_eq!(edge.offer(6, 1_100, "e6", 1_150), Some("e6"));
        assert_eq!(edge.offer(5, 1_000, "e5", 1_150), None);
        // A re-fetch of the current epoch (e.g. more signatures) is taken.
        assert_eq!(edge.offer(6, 1_100, "e6'", 1_150), Some("e6'"));
        // A waiting document is never replaced by an older one.
        assert_eq!(edge.offer(8, 1_300, "e8", 1_160), None);
        assert_eq!(edge.offer(7, 1_200, "e7", 1_160), None);
        assert_eq!(edge.poll_timeout(), Some(1_300));
    }

    #[test]
    fn a_late_fetch_after_the_edge_is_used_at_once() {
        let mut edge = EpochEdge::default();
        assert_eq!(edge.offer(5, 1_000, "e5", 1_010), Some("e5"));
        assert_eq!(edge.offer(6, 1_100, "e6", 1_090), None);
        // The edge passed while asleep: the next offer (or timeout) installs it.
        assert_eq!(edge.offer(7, 1_200, "e7", 1_205), Some("e7"));
        assert_eq!(edge.poll_timeout(), None);
        assert_eq!(edge.handle_timeout(1_300), None);
    }
}

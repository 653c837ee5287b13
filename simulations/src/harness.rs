//! The deterministic in-memory harness: real relay cores, virtual time, simulated links.
//!
//! A [`Network`] holds one [`MixCore`] per relay and gateway, one directory
//! [`Authority`], and an event queue ordered by (virtual time, sequence number).
//! Driving the network pops events in that order: a frame arriving over a link, a
//! node's timer, an epoch starting, a retired key's grace period ending. Nothing
//! reads the wall clock (apart from taking one `Instant` as the origin of virtual
//! time) and every random draw comes from RNGs seeded from the network's seed, so
//! the same seed gives the same trace.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use rand::rngs::StdRng;
use rand::{Rng, RngExt, SeedableRng};
use sha2::{Digest, Sha256};
use shoal_packet::sphinx::{self, MailboxAddress, SurbId};
use shoal_packet::{Frame, PLAINTEXT_SIZE};
use shoal_relay::{Event, KeyRing, MixConfig, MixCore, Transmit, Unwrapper};
use shoal_topology::route::sample_delays;
use shoal_topology::{
    Admission, AdmittedOperator, Authority, AuthorityConfig, AuthoritySet, Descriptor,
    EpochSchedule, Hex32, NetworkParams, NodeCertificate, NodeId, Role, SignedDescriptor,
    SphinxKeyEntry, Topology, UncheckedDocument, operator::solo_operator_key,
};

pub use shoal_relay::DropReason;
pub use shoal_relay::core::Stats;

use crate::SimError;

/// Latency and loss of one direction of a link.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkConfig {
    /// Time from sending a frame to its arrival.
    pub latency: Duration,
    /// Probability in `[0, 1]` that a frame is lost. There is no retransmission.
    pub loss: f64,
}

impl Default for LinkConfig {
    fn default() -> Self {
        LinkConfig {
            latency: Duration::from_millis(5),
            loss: 0.0,
        }
    }
}

impl LinkConfig {
    fn validate(&self) -> Result<(), SimError> {
        if !(0.0..=1.0).contains(&self.loss) {
            return Err(SimError::Config {
                what: "link loss",
                reason: format!("{} is not a probability", self.loss),
            });
        }
        Ok(())
    }
}

/// How a node treats the frames it receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Behaviour {
    /// Hands every frame to its core.
    #[default]
    Honest,
    /// Silently discards every frame it receives (an active attacker or a dead node).
    /// Its own timers still run, so it keeps emitting loop cover.
    Blackhole,
}

/// Frames counted by the links rather than by the cores.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkStats {
    /// Frames put on any link, client links included.
    pub sent: u64,
    /// Frames the links lost.
    pub lost: u64,
    /// Frames that arrived at a blackholing node.
    pub blackholed: u64,
}

/// A packet that reached its final hop: a mailbox delivery at a gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// Virtual time of the delivery.
    pub at: Duration,
    /// The node where the packet ended.
    pub node: NodeId,
    pub destination: MailboxAddress,
    pub surb_id: SurbId,
    /// The final Sphinx payload.
    pub payload: Vec<u8>,
}

impl Delivery {
    /// The plaintext of a forward packet.
    pub fn plaintext(&self) -> Option<Vec<u8>> {
        sphinx::open_forward(&self.payload).ok()
    }
}

/// A frame as it arrived at a node; kept only when recording is on.
#[derive(Debug, Clone)]
pub struct FrameRecord {
    pub at: Duration,
    /// `None` for frames injected from outside (clients).
    pub from: Option<NodeId>,
    pub to: NodeId,
    pub frame: Frame,
}

/// A client packet built against one document, ready to [`send`](Network::send).
#[derive(Debug, Clone)]
pub struct ClientPacket {
    pub entry: NodeId,
    pub exit: NodeId,
    pub mailbox: MailboxAddress,
    /// Every hop, entry gateway first.
    pub route: Vec<NodeId>,
    /// The sampled per-hop delays, one per hop.
    pub delays: Vec<Duration>,
    /// The key epoch the packet was built for: its document's epoch, or the next one while
    /// the clock is past it.
    pub key_epoch: u64,
    /// What the exit hop will see next to the payload.
    pub surb_id: SurbId,
    pub frame: Frame,
}

impl ClientPacket {
    /// Time the packet spends in delay queues. The exit delivers at once, so its
    /// sampled delay is never applied.
    pub fn mixing_delay(&self) -> Duration {
        let n = self.delays.len().saturating_sub(1);
        self.delays[..n].iter().sum()
    }
}

/// Settings of a [`Network`]; start from [`Network::builder`].
#[derive(Debug, Clone)]
pub struct NetworkBuilder {
    seed: u64,
    relays_per_layer: usize,
    gateways: usize,
    link: LinkConfig,
    client_link: LinkConfig,
    params: NetworkParams,
    epoch_secs: u64,
    genesis_unix: u64,
    loop_timeout: Duration,
    max_queue: usize,
    replay_capacity: usize,
    vote_lead_secs: u64,
}

impl Default for NetworkBuilder {
    fn default() -> Self {
        NetworkBuilder {
            seed: 0,
            relays_per_layer: 2,
            gateways: 2,
            link: LinkConfig::default(),
            client_link: LinkConfig::default(),
            // No background traffic by default, so packet counts in tests are exact.
            params: NetworkParams {
                lambda_m: 0.0,
                ..NetworkParams::default()
            },
            epoch_secs: 3600,
            genesis_unix: 1_700_000_000,
            loop_timeout: MixConfig::default().loop_timeout,
            max_queue: MixConfig::default().max_queue,
            replay_capacity: 1 << 20,
            vote_lead_secs: 0,
        }
    }
}

impl NetworkBuilder {
    /// Seeds every RNG of the run: keys, routes, delays, loss, loop schedules.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    pub fn relays_per_layer(mut self, n: usize) -> Self {
        self.relays_per_layer = n;
        self
    }

    pub fn gateways(mut self, n: usize) -> Self {
        self.gateways = n;
        self
    }

    /// The default for every node-to-node link (override one with [`Network::set_link`]).
    pub fn link(mut self, link: LinkConfig) -> Self {
        self.link = link;
        self
    }

    /// The link from clients to their entry gateway.
    pub fn client_link(mut self, link: LinkConfig) -> Self {
        self.client_link = link;
        self
    }

    /// The parameters the authority publishes. The harness defaults to `lambda_m = 0`
    /// (no relay loop cover); set it to turn loop cover on.
    pub fn params(mut self, params: NetworkParams) -> Self {
        self.params = params;
        self
    }

    /// Length of a key epoch, in whole seconds as the directory counts them.
    pub fn epoch_secs(mut self, secs: u64) -> Self {
        self.epoch_secs = secs;
        self
    }

    /// How long before an epoch starts the authority publishes its document (less
    /// than an epoch). With 0, documents appear exactly at the epoch boundary.
    pub fn vote_lead_secs(mut self, secs: u64) -> Self {
        self.vote_lead_secs = secs;
        self
    }

    /// Unix time of virtual time zero, which is also the start of epoch 0.
    pub fn genesis_unix(mut self, unix: u64) -> Self {
        self.genesis_unix = unix;
        self
    }

    /// After this long a loop that has not returned counts as lost.
    pub fn loop_timeout(mut self, timeout: Duration) -> Self {
        self.loop_timeout = timeout;
        self
    }

    /// Delay-queue bound of each core.
    pub fn max_queue(mut self, n: usize) -> Self {
        self.max_queue = n;
        self
    }

    /// Replay tags each node holds per key epoch.
    pub fn replay_capacity(mut self, n: usize) -> Self {
        self.replay_capacity = n;
        self
    }

    /// Creates the nodes and their keys, has the authority publish epoch 0's document,
    /// and starts every node's timers at virtual time zero.
    pub fn build(self) -> Result<Network, SimError> {
        Network::new(self)
    }
}

#[derive(Debug)]
enum Action {
    Arrive {
        from: Option<usize>,
        to: usize,
        frame: Frame,
    },
    Wake {
        node: usize,
    },
    Rotate {
        epoch: u64,
    },
    Publish {
        epoch: u64,
    },
    GraceEnd {
        epoch: u64,
    },
}

#[derive(Debug)]
struct Queued {
    at: Duration,
    seq: u64,
    action: Action,
}

impl PartialEq for Queued {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Queued {}
impl PartialOrd for Queued {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Queued {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

#[derive(Debug)]
struct Node {
    id: NodeId,
    role: Role,
    identity: SigningKey,
    link_addr: String,
    keys: KeyRing,
    core: MixCore,
    rng: StdRng,
    behaviour: Behaviour,
    /// The pending timer event, if any. Queued wakes at other times are stale.
    wake: Option<Duration>,
}

/// Epochs past the current one a node holds keys for, as the relay's directory task
/// does: so the document voted ahead of an epoch carries its successor's keys too.
pub const KEYS_AHEAD: u64 = 2;

impl Node {
    /// The descriptor a node publishes at the start of `epoch`: keys for it and the
    /// [`KEYS_AHEAD`] after it, as relays do.
    fn descriptor(&self, epoch: u64, now_unix: u64) -> Result<SignedDescriptor, SimError> {
        let sphinx_keys = (epoch..=epoch + KEYS_AHEAD)
            .filter_map(|e| {
                self.keys.public(e).map(|k| SphinxKeyEntry {
                    epoch: e,
                    key: Hex32(k.to_bytes()),
                })
            })
            .collect();
        Descriptor {
            identity: Hex32(self.id),
            role: self.role,
            link_addr: self.link_addr.clone(),
            sphinx_keys,
            published_unix: now_unix,
            version: None,
        }
        .sign(&self.identity)
        .map(|d| {
            d.certified(NodeCertificate::issue(
                &solo_operator_key(&self.identity),
                self.id,
                self.role,
            ))
        })
        .map_err(|source| SimError::Topology {
            doing: "signing a node descriptor",
            source,
        })
    }
}

/// Relays in three layers, gateways, one authority, and the links between them, all in
/// virtual time.
#[derive(Debug)]
pub struct Network {
    base: Instant,
    now: Duration,
    seq: u64,
    queue: BinaryHeap<Reverse<Queued>>,
    nodes: Vec<Node>,
    index: HashMap<NodeId, usize>,
    authority: Authority,
    schedule: EpochSchedule,
    doc_epoch: u64,
    documents: BTreeMap<u64, Topology>,
    default_link: LinkConfig,
    client_link: LinkConfig,
    links: HashMap<(usize, usize), LinkConfig>,
    link_rng: StdRng,
    client_rng: StdRng,
    link_stats: LinkStats,
    on_links: usize,
    deliveries: Vec<Delivery>,
    record_frames: bool,
    frames: Vec<FrameRecord>,
    record_arrivals: bool,
    arrivals: Vec<Arrival>,
    /// Votes that come late (by this much) or never (`None`), by epoch.
    late_votes: HashMap<u64, Option<Duration>>,
    /// Test-only: clients key packets by their document's epoch alone, as before the
    /// fallback to the next epoch's keys (the dead-epoch control).
    key_by_document: bool,
}

/// A frame's arrival at a node as a link observer sees it: when, from where, to where;
/// no contents. Kept only when [`Network::record_arrivals`] is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arrival {
    pub at: Duration,
    /// `None` for frames injected from outside (clients).
    pub from: Option<NodeId>,
    pub to: NodeId,
}

impl Network {
    pub fn builder() -> NetworkBuilder {
        NetworkBuilder::default()
    }

    fn new(b: NetworkBuilder) -> Result<Self, SimError> {
        b.link.validate()?;
        b.client_link.validate()?;
        if b.relays_per_layer == 0 || b.gateways == 0 {
            return Err(SimError::Config {
                what: "network size",
                reason: "every layer needs a relay and routes need a gateway".into(),
            });
        }
        if b.epoch_secs == 0 {
            return Err(SimError::Config {
                what: "epoch_secs",
                reason: "must be at least one second".into(),
            });
        }
        let topo_err = |doing| move |source| SimError::Topology { doing, source };
        let mut master = StdRng::seed_from_u64(b.seed);
        let schedule = EpochSchedule {
            genesis_unix: b.genesis_unix,
            length_secs: b.epoch_secs,
        };
        let auth_key = SigningKey::generate(&mut master);
        let config = AuthorityConfig {
            authorities: AuthoritySet {
                threshold: 1,
                keys: vec![Hex32(auth_key.verifying_key().to_bytes())],
            },
            schedule,
            params: b.params.clone(),
            descriptor_max_age_secs: b.epoch_secs.saturating_mul(2),
            vote_lead_secs: b.vote_lead_secs,
            bootstrap_delay_secs: 0,
            // Every node is its own operator; admitted once the nodes exist.
            admission: Admission::default(),
        };
        let mut authority =
            Authority::new(auth_key, config).map_err(topo_err("creating the authority"))?;
        let mix = MixConfig {
            max_delay: Duration::from_secs_f64(b.params.max_hop_delay_ms / 1000.0),
            max_queue: b.max_queue,
            loop_rate: b.params.lambda_m,
            loop_timeout: b.loop_timeout,
        };

        let roles = std::iter::repeat_n(Role::Gateway, b.gateways).chain(std::iter::repeat_n(
            Role::Relay,
            b.relays_per_layer * shoal_packet::MIX_LAYERS,
        ));
        let mut nodes = Vec::new();
        let mut index = HashMap::new();
        for (i, role) in roles.enumerate() {
            let mut rng = StdRng::seed_from_u64(master.next_u64());
            let identity = SigningKey::generate(&mut rng);
            let id = identity.verifying_key().to_bytes();
            let mut keys = KeyRing::new();
            keys.ensure(&mut rng, 0..=1);
            let unwrapper = Arc::new(Unwrapper::new(keys.clone(), b.replay_capacity));
            index.insert(id, i);
            nodes.push(Node {
                id,
                role,
                identity,
                link_addr: format!("10.0.{}.{}:1789", i / 256, i % 256),
                keys,
                core: MixCore::new(id, unwrapper, mix.clone()),
                rng,
                behaviour: Behaviour::Honest,
                wake: None,
            });
        }
        let admission = Admission::new(
            nodes
                .iter()
                .enumerate()
                .map(|(i, n)| {
                    AdmittedOperator::solo(&solo_operator_key(&n.identity), format!("node {i}"))
                })
                .collect(),
        )
        .map_err(topo_err("admitting the nodes' operators"))?;
        authority.set_admission(admission);
        let mut net = Network {
            base: Instant::now(),
            now: Duration::ZERO,
            seq: 0,
            queue: BinaryHeap::new(),
            nodes,
            index,
            authority,
            schedule,
            doc_epoch: 0,
            documents: BTreeMap::new(),
            default_link: b.link,
            client_link: b.client_link,
            links: HashMap::new(),
            link_rng: StdRng::seed_from_u64(master.next_u64()),
            client_rng: StdRng::seed_from_u64(master.next_u64()),
            link_stats: LinkStats::default(),
            on_links: 0,
            deliveries: Vec::new(),
            record_frames: false,
            frames: Vec::new(),
            record_arrivals: false,
            arrivals: Vec::new(),
            late_votes: HashMap::new(),
            key_by_document: false,
        };
        net.rotate(0)?;
        net.publish(0)?;
        if b.params.lambda_m > 0.0 {
            for i in 0..net.nodes.len() {
                net.nodes[i].wake = Some(Duration::ZERO);
                net.push(Duration::ZERO, Action::Wake { node: i });
            }
        }
        Ok(net)
    }

    // ---- clock and directory ----

    /// Virtual time since the start of the run.
    pub fn now(&self) -> Duration {
        self.now
    }

    /// Virtual time as the `Instant` the cores see.
    pub fn now_instant(&self) -> Instant {
        self.base + self.now
    }

    /// Unix seconds at the current virtual time, as the directory counts them.
    pub fn now_unix(&self) -> u64 {
        self.schedule.genesis_unix + self.now.as_secs()
    }

    /// Virtual time at which `epoch` starts.
    pub fn epoch_start(&self, epoch: u64) -> Duration {
        Duration::from_secs(self.schedule.start_of(epoch) - self.schedule.genesis_unix)
    }

    /// The authority's vote on `epoch` comes `by` later than scheduled, or never with
    /// `None` (as when too few authorities are reachable to reach the threshold).
    pub fn delay_vote(&mut self, epoch: u64, by: Option<Duration>) {
        self.late_votes.insert(epoch, by);
    }

    /// Test-only: clients key every packet with their document's own epoch, as before a
    /// late document fell back to the next epoch's keys. The control of the dead-epoch
    /// tests.
    pub fn dangerously_key_by_document(&mut self, on: bool) {
        self.key_by_document = on;
    }

    /// The epoch the virtual clock is in.
    pub fn epoch(&self) -> u64 {
        self.schedule.epoch_at(self.now_unix())
    }

    /// The epoch of the newest published document: what nodes and fresh clients use.
    /// Ahead of [`epoch`](Self::epoch) during the vote lead before a boundary.
    pub fn document_epoch(&self) -> u64 {
        self.doc_epoch
    }

    /// The newest document, checked through the full chain (signatures, validity window).
    pub fn topology(&self) -> &Topology {
        // `new` published epoch 0 and documents are never removed.
        &self.documents[&self.doc_epoch]
    }

    /// The document published for `epoch`, for clients that still hold an old one.
    pub fn document(&self, epoch: u64) -> Option<&Topology> {
        self.documents.get(&epoch)
    }

    pub fn authority(&self) -> &Authority {
        &self.authority
    }

    /// Every node, gateways first, then relays.
    pub fn node_ids(&self) -> Vec<NodeId> {
        self.nodes.iter().map(|n| n.id).collect()
    }

    /// Gateways of the newest document.
    pub fn gateways(&self) -> Vec<NodeId> {
        self.topology().gateways().to_vec()
    }

    /// Relays of mix layer `layer` (0-based) in the newest document.
    pub fn layer(&self, layer: usize) -> Vec<NodeId> {
        self.topology().layer(layer).to_vec()
    }

    // ---- nodes and links ----

    fn idx(&self, id: &NodeId) -> Result<usize, SimError> {
        self.index.get(id).copied().ok_or(SimError::UnknownNode)
    }

    pub fn core(&self, id: &NodeId) -> Option<&MixCore> {
        self.index.get(id).map(|&i| &self.nodes[i].core)
    }

    pub fn stats(&self, id: &NodeId) -> Option<&Stats> {
        self.core(id).map(MixCore::stats)
    }

    /// The key epochs a node holds right now.
    pub fn key_epochs(&self, id: &NodeId) -> Option<Vec<u64>> {
        self.index.get(id).map(|&i| self.nodes[i].keys.epochs())
    }

    /// Every node's counters summed.
    pub fn total_stats(&self) -> Stats {
        let mut total = Stats::default();
        for n in &self.nodes {
            total.absorb(n.core.stats());
        }
        total
    }

    pub fn link_stats(&self) -> LinkStats {
        self.link_stats
    }

    pub fn set_behaviour(&mut self, id: &NodeId, behaviour: Behaviour) -> Result<(), SimError> {
        let i = self.idx(id)?;
        self.nodes[i].behaviour = behaviour;
        Ok(())
    }

    /// Overrides the link from `from` to `to` (one direction).
    pub fn set_link(
        &mut self,
        from: &NodeId,
        to: &NodeId,
        link: LinkConfig,
    ) -> Result<(), SimError> {
        link.validate()?;
        let key = (self.idx(from)?, self.idx(to)?);
        self.links.insert(key, link);
        Ok(())
    }

    /// Keeps a copy of every frame that arrives at a node from now on (2.4 kB each).
    pub fn record_frames(&mut self, on: bool) {
        self.record_frames = on;
    }

    pub fn frames(&self) -> &[FrameRecord] {
        &self.frames
    }

    /// Keeps the (time, from, to) of every frame that arrives at a node from now on: the
    /// global passive observer's view of the links, cheap enough for long runs.
    pub fn record_arrivals(&mut self, on: bool) {
        self.record_arrivals = on;
    }

    /// The arrivals recorded since the last call.
    pub fn take_arrivals(&mut self) -> Vec<Arrival> {
        std::mem::take(&mut self.arrivals)
    }

    pub fn deliveries(&self) -> &[Delivery] {
        &self.deliveries
    }

    pub fn take_deliveries(&mut self) -> Vec<Delivery> {
        std::mem::take(&mut self.deliveries)
    }

    /// Frames on links plus frames waiting in delay queues.
    pub fn packets_in_flight(&self) -> usize {
        self.on_links + self.nodes.iter().map(|n| n.core.queue_len()).sum::<usize>()
    }

    // ---- clients ----

    /// Builds a client packet the way a client holding the document of `doc_epoch`
    /// would: a route from that document, keyed for the epoch
    /// [`Topology::key_epoch_at`] gives for the virtual clock's, Exp(μ) delays.
    /// `plaintext` is zero-padded to the full payload size.
    pub fn build_packet(
        &mut self,
        doc_epoch: u64,
        entry: &NodeId,
        exit: &NodeId,
        mailbox: MailboxAddress,
        plaintext: &[u8],
    ) -> Result<ClientPacket, SimError> {
        let pkt_err = |doing| move |source| SimError::Packet { doing, source };
        if plaintext.len() > PLAINTEXT_SIZE {
            return Err(SimError::Config {
                what: "plaintext",
                reason: format!("{} bytes; at most {PLAINTEXT_SIZE} fit", plaintext.len()),
            });
        }
        let wall = self.epoch();
        let topo = self
            .documents
            .get(&doc_epoch)
            .ok_or(SimError::NoDocument { epoch: doc_epoch })?;
        let key_epoch = if self.key_by_document {
            doc_epoch
        } else {
            topo.key_epoch_at(wall)
        };
        let route = topo
            .client_route(&mut self.client_rng, key_epoch, entry, exit)
            .map_err(|source| SimError::Topology {
                doing: "choosing a client route",
                source,
            })?;
        let delays = sample_delays(&mut self.client_rng, topo.params(), route.len());
        let mut padded = vec![0u8; PLAINTEXT_SIZE];
        padded[..plaintext.len()].copy_from_slice(plaintext);
        let (built, surb_id) =
            sphinx::build_forward(&mut self.client_rng, &route, &delays, &mailbox, &padded)
                .map_err(pkt_err("building a client packet"))?;
        let frame = Frame::sphinx(EpochSchedule::frame_label(key_epoch), &built.packet)
            .map_err(pkt_err("framing a client packet"))?;
        Ok(ClientPacket {
            entry: *entry,
            exit: *exit,
            mailbox,
            route: route.iter().map(|h| h.address).collect(),
            delays,
            key_epoch,
            surb_id,
            frame,
        })
    }

    /// Builds a packet against the newest document from a random entry gateway to
    /// `mailbox` at `exit`, and sends it now.
    pub fn send_to(
        &mut self,
        exit: &NodeId,
        mailbox: MailboxAddress,
        plaintext: &[u8],
    ) -> Result<ClientPacket, SimError> {
        let entry = self.documents[&self.doc_epoch]
            .random_gateway(&mut self.client_rng)
            .map_err(|source| SimError::Topology {
                doing: "choosing an entry gateway",
                source,
            })?;
        let packet = self.build_packet(self.doc_epoch, &entry, exit, mailbox, plaintext)?;
        self.send(&packet)?;
        Ok(packet)
    }

    /// Sends a built packet to its entry gateway over the client link, now.
    pub fn send(&mut self, packet: &ClientPacket) -> Result<(), SimError> {
        self.inject(&packet.entry, packet.frame.clone())
    }

    /// Puts any frame on the client link to node `to`, now. Normally `to` is an entry
    /// gateway; tests use other nodes to inject replays or garbage mid-route.
    pub fn inject(&mut self, to: &NodeId, frame: Frame) -> Result<(), SimError> {
        let to = self.idx(to)?;
        self.put_on_link(self.client_link, None, to, frame);
        Ok(())
    }

    // ---- driving ----

    fn push(&mut self, at: Duration, action: Action) {
        self.seq += 1;
        self.queue.push(Reverse(Queued {
            at,
            seq: self.seq,
            action,
        }));
    }

    /// Virtual time of the next event.
    pub fn next_event_at(&self) -> Option<Duration> {
        self.queue.peek().map(|Reverse(q)| q.at)
    }

    /// Processes the next event. Returns `false` when nothing is left to do.
    pub fn step(&mut self) -> Result<bool, SimError> {
        let Some(Reverse(q)) = self.queue.pop() else {
            return Ok(false);
        };
        self.now = self.now.max(q.at);
        match q.action {
            Action::Arrive { from, to, frame } => self.arrive(from, to, frame),
            Action::Wake { node } => {
                if self.nodes[node].wake == Some(q.at) {
                    self.nodes[node].wake = None;
                    self.wake(node);
                }
            }
            Action::Rotate { epoch } => self.rotate(epoch)?,
            Action::Publish { epoch } => self.publish(epoch)?,
            Action::GraceEnd { epoch } => self.end_grace(epoch),
        }
        Ok(true)
    }

    /// Processes every event up to and including virtual time `t`, then sets the clock to `t`.
    pub fn drive_until(&mut self, t: Duration) -> Result<(), SimError> {
        while self.next_event_at().is_some_and(|at| at <= t) {
            self.step()?;
        }
        self.now = self.now.max(t);
        Ok(())
    }

    /// [`drive_until`](Self::drive_until) `now + d`.
    pub fn drive_for(&mut self, d: Duration) -> Result<(), SimError> {
        self.drive_until(self.now + d)
    }

    /// Processes events until no packet is on a link or in a delay queue. Epochs keep
    /// turning meanwhile. Refused when relay loop cover is on: it keeps packets in flight.
    pub fn drive_until_idle(&mut self) -> Result<(), SimError> {
        if self.topology().params().lambda_m > 0.0 {
            return Err(SimError::NeverIdle);
        }
        while self.packets_in_flight() > 0 {
            if !self.step()? {
                break;
            }
        }
        Ok(())
    }

    fn put_on_link(&mut self, link: LinkConfig, from: Option<usize>, to: usize, frame: Frame) {
        self.link_stats.sent += 1;
        // One draw per frame whatever the loss, so changing `loss` does not shift the
        // rest of the link RNG's stream.
        let draw: f64 = self.link_rng.random();
        if draw < link.loss {
            self.link_stats.lost += 1;
            return;
        }
        self.on_links += 1;
        self.push(self.now + link.latency, Action::Arrive { from, to, frame });
    }

    fn arrive(&mut self, from: Option<usize>, to: usize, frame: Frame) {
        self.on_links -= 1;
        if self.record_arrivals {
            self.arrivals.push(Arrival {
                at: self.now,
                from: from.map(|f| self.nodes[f].id),
                to: self.nodes[to].id,
            });
        }
        if self.record_frames {
            self.frames.push(FrameRecord {
                at: self.now,
                from: from.map(|f| self.nodes[f].id),
                to: self.nodes[to].id,
                frame: frame.clone(),
            });
        }
        if self.nodes[to].behaviour == Behaviour::Blackhole {
            self.link_stats.blackholed += 1;
            return;
        }
        let now = self.now_instant();
        // A rejected frame is counted in the core's stats by reason; nothing else to do.
        let _ = self.nodes[to].core.handle_packet(frame.as_bytes(), now);
        self.flush(to);
    }

    fn wake(&mut self, i: usize) {
        let now = self.now_instant();
        let wall = self.epoch();
        let topo = self.documents.get(&self.doc_epoch);
        let node = &mut self.nodes[i];
        node.core.set_wall_epoch(wall);
        node.core.handle_timeout(now, &mut node.rng, topo);
        self.flush(i);
    }

    /// Sends what node `i` has due, collects its deliveries, and re-arms its timer.
    fn flush(&mut self, i: usize) {
        let now = self.now_instant();
        while let Some(t) = self.nodes[i].core.poll_transmit(now) {
            self.transmit(i, t);
        }
        while let Some(event) = self.nodes[i].core.poll_event() {
            match event {
                Event::Delivered {
                    destination,
                    surb_id,
                    payload,
                } => self.deliveries.push(Delivery {
                    at: self.now,
                    node: self.nodes[i].id,
                    destination,
                    surb_id,
                    payload,
                }),
            }
        }
        if let Some(t) = self.nodes[i].core.poll_timeout() {
            let at = t.saturating_duration_since(self.base).max(self.now);
            // An earlier pending wake re-arms the timer itself when it fires.
            if self.nodes[i].wake.is_none_or(|w| w > at) {
                self.nodes[i].wake = Some(at);
                self.push(at, Action::Wake { node: i });
            }
        }
    }

    fn transmit(&mut self, from: usize, t: Transmit) {
        let Some(&to) = self.index.get(&t.to) else {
            self.nodes[from].core.count_drop(DropReason::NoRoute);
            return;
        };
        let link = self
            .links
            .get(&(from, to))
            .copied()
            .unwrap_or(self.default_link);
        self.put_on_link(link, Some(from), to, t.frame);
    }

    /// At the start of `epoch` every node makes sure it holds keys for `epoch` and the
    /// [`KEYS_AHEAD`] after it, keeps the previous one for the grace period, and re-publishes its descriptor.
    fn rotate(&mut self, epoch: u64) -> Result<(), SimError> {
        let now_unix = self.now_unix();
        for node in &mut self.nodes {
            node.keys.ensure(&mut node.rng, epoch..=epoch + KEYS_AHEAD);
            node.core.unwrapper().set_keys(node.keys.clone());
            let descriptor = node.descriptor(epoch, now_unix)?;
            self.authority
                .handle_descriptor(descriptor, now_unix)
                .map_err(|source| SimError::Topology {
                    doing: "handing a descriptor to the authority",
                    source,
                })?;
        }
        self.push(
            self.epoch_start(epoch + 1),
            Action::Rotate { epoch: epoch + 1 },
        );
        if let Some(previous) = epoch.checked_sub(1) {
            let grace = Duration::from_secs(self.topology().params().key_grace_secs);
            self.push(self.now + grace, Action::GraceEnd { epoch: previous });
        }
        Ok(())
    }

    /// The authority votes on `epoch` from the descriptors it holds and publishes; the
    /// document goes through the whole checking chain before anyone uses it.
    fn publish(&mut self, epoch: u64) -> Result<(), SimError> {
        let topo_err = |doing| move |source| SimError::Topology { doing, source };
        let lead = Duration::from_secs(self.authority.config().vote_lead_secs);
        match self.late_votes.remove(&epoch) {
            Some(Some(by)) => {
                self.push(self.now + by, Action::Publish { epoch });
                return Ok(());
            }
            Some(None) => {
                let next = self.epoch_start(epoch + 1).saturating_sub(lead);
                self.push(next, Action::Publish { epoch: epoch + 1 });
                return Ok(());
            }
            None => {}
        }
        let now_unix = self.now_unix();
        self.authority
            .vote(epoch)
            .map_err(topo_err("voting on a document"))?;
        let signed = self
            .authority
            .document(epoch)
            .ok_or(SimError::NoDocument { epoch })?
            .clone();
        let topology = UncheckedDocument::from_signed(signed)
            .map_err(topo_err("parsing a document"))?
            .check_signatures(&self.authority.config().authorities)
            .map_err(topo_err("checking a document's signatures"))?
            .check_valid_at(now_unix)
            .map_err(topo_err("checking a document's validity window"))?;
        self.documents.insert(epoch, topology);
        self.doc_epoch = epoch;
        let next = self.epoch_start(epoch + 1).saturating_sub(lead);
        self.push(next, Action::Publish { epoch: epoch + 1 });
        Ok(())
    }

    /// The grace period of `epoch`'s key is over: every node forgets it and its replay tags.
    fn end_grace(&mut self, epoch: u64) {
        for node in &mut self.nodes {
            node.keys.retire_before(epoch + 1);
            node.core.unwrapper().set_keys(node.keys.clone());
        }
    }

    /// A digest of everything observable in the run so far: each delivery with its
    /// virtual time, every node's counters, and the link counters.
    pub fn trace_digest(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        for d in &self.deliveries {
            h.update(d.at.as_nanos().to_be_bytes());
            h.update(d.node);
            h.update(d.destination);
            h.update(d.surb_id);
            h.update(&d.payload);
        }
        for n in &self.nodes {
            let s = n.core.stats();
            h.update(n.id);
            for v in [
                s.received,
                s.forwarded,
                s.delivered,
                s.loops_sent,
                s.loops_returned,
                s.loops_lost,
                s.loop_build_failures,
            ] {
                h.update(v.to_be_bytes());
            }
            for r in DropReason::ALL {
                h.update(s.dropped(r).to_be_bytes());
            }
        }
        let l = self.link_stats;
        for v in [l.sent, l.lost, l.blackholed] {
            h.update(v.to_be_bytes());
        }
        h.finalize().into()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_settings() {
        let lossy = LinkConfig {
            latency: Duration::ZERO,
            loss: 1.5,
        };
        assert!(matches!(
            Network::builder().link(lossy).build(),
            Err(SimError::Config { .. })
        ));
        assert!(matches!(
            Network::builder().gateways(0).build(),
            Err(SimError::Config { .. })
        ));
        assert!(matches!(
            Network::builder().epoch_secs(0).build(),
            Err(SimError::Config { .. })
        ));
        assert!(matches!(
            Network::builder().epoch_secs(10).vote_lead_secs(10).build(),
            Err(SimError::Topology { .. })
        ));
        let mut net = Network::builder()
            .relays_per_layer(1)
            .gateways(1)
            .build()
            .unwrap();
        assert!(matches!(
            net.inject(&[0; 32], Frame::control(b"x").unwrap()),
            Err(SimError::UnknownNode)
        ));
        assert!(matches!(
            net.build_packet(5, &[0; 32], &[0; 32], [0; 32], b""),
            Err(SimError::NoDocument { epoch: 5 })
        ));
    }

    #[test]
    fn per_link_latency_and_garbage() {
        let mut net = Network::builder()
            .seed(9)
            .relays_per_layer(1)
            .gateways(1)
            .build()
            .unwrap();
        let gw = net.gateways()[0];
        let l1 = net.layer(0)[0];
        net.set_link(
            &gw,
            &l1,
            LinkConfig {
                latency: Duration::from_millis(100),
                loss: 0.0,
            },
        )
        .unwrap();
        let p = net.send_to(&gw, [1; 32], b"slow first link").unwrap();
        net.inject(&l1, Frame::control(b"not a packet").unwrap())
            .unwrap();
        net.drive_until_idle().unwrap();
        let d = &net.deliveries()[0];
        assert_eq!(d.at, p.mixing_delay() + Duration::from_millis(4 * 5 + 100));
        assert_eq!(net.stats(&l1).unwrap().dropped(DropReason::Malformed), 1);
        assert_eq!(net.packets_in_flight(), 0);
    }
}

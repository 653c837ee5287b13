//! Faithful mode with the production client and gateway cores: every client is a real
//! `shoal_client::ClientCore` (Loopix λP real-or-cover, λL loops, λD drops, SURB-acks on real
//! packets and loops, retransmission with backoff), every exit gateway hands its final-hop
//! packets to a real `shoal_gateway::mailbox::Mailbox` (quotas, fixed-size pulls padded with
//! dummies, acks released only by `on_committed`), and clients pull on a constant schedule.
//! See the crate README, *Faithful mode*.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};

use rand::rngs::StdRng;
use rand::{Rng, RngExt, SeedableRng};
use rand_distr::{Distribution, Exp1};
use serde::Serialize;
use shoal_client::core::{ClientConfig, ClientCore, ClientStats, Event, Identity};
use shoal_gateway::StoreConfig;
use shoal_gateway::mailbox::{
    AccountKey, AckToSend, Committed, DeliverOutcome, ItemId, Mailbox, MailboxConfig, MailboxStats,
    PullItem, Salt, WriteBatch,
};
use shoal_packet::Frame;
use shoal_packet::sphinx::{MailboxAddress, SurbId};
use shoal_topology::{NetworkParams, NodeId, Role};

use crate::SimError;
use crate::harness::{LinkConfig, Network};
use crate::model::ModelConfig;
use crate::model::summary::{Dist, Latency};

fn bad(what: &'static str, reason: impl Into<String>) -> SimError {
    SimError::Config {
        what,
        reason: reason.into(),
    }
}

/// Keys of `section` whose value differs from the default, as `section.key`.
fn changed<T: Serialize>(section: &str, got: &T, default: &T) -> Vec<String> {
    let (Ok(serde_json::Value::Object(a)), Ok(serde_json::Value::Object(b))) =
        (serde_json::to_value(got), serde_json::to_value(default))
    else {
        return vec![section.to_string()];
    };
    a.iter()
        .filter(|(k, v)| b.get(*k) != Some(*v))
        .map(|(k, _)| format!("{section}.{k}"))
        .collect()
}

/// A faithful-mode configuration, checked: every key faithful mode does not model is refused
/// by name when it differs from its default, rather than ignored.
#[derive(Debug, Clone)]
struct Checked {
    width: usize,
    gateways: usize,
    mean_hop_s: f64,
    link_s: f64,
    clients: u32,
    real_rate: f64,
    lambda_p: f64,
    loop_rate: f64,
    drop_rate: f64,
    duration_s: f64,
    warmup_s: f64,
    drain_s: f64,
    seed: u64,
    link_loss: f64,
    commit_s: f64,
    pull_interval_s: f64,
    pull_batch: usize,
    quota: u32,
}

fn check(config: &ModelConfig) -> Result<Checked, SimError> {
    if config.sim.mode != "faithful" {
        return Err(bad(
            "sim.mode",
            format!("{:?} is not faithful mode", config.sim.mode),
        ));
    }
    let d = ModelConfig::default();
    let mut refused = Vec::new();
    refused.extend(changed("adversary", &config.adversary, &d.adversary));
    refused.extend(changed("metrics", &config.metrics, &d.metrics));
    refused.extend(changed("workload", &config.workload, &d.workload));
    refused.extend(changed("attacks", &config.attacks, &d.attacks));
    if !refused.is_empty() {
        return Err(bad(
            "faithful mode",
            format!(
                "unsupported keys set: {} (faithful mode has no corrupt nodes, tracks no \
                 anonymity and runs no attacks; use model mode for them)",
                refused.join(", ")
            ),
        ));
    }
    // The remaining model keys are shared; faithful mode's own bounds on top.
    let mut as_model = config.clone();
    as_model.sim = Default::default();
    as_model.faithful = Default::default();
    let v = as_model.validate()?;
    if v.layers != shoal_packet::MIX_LAYERS {
        return Err(bad(
            "network.layers",
            "faithful mode runs the real 3-layer route (entry gateway, L1, L2, L3, exit gateway)",
        ));
    }
    if v.clients < 2 || v.real_rate <= 0.0 {
        return Err(bad(
            "traffic",
            "faithful mode needs >= 2 clients and rate_per_client > 0",
        ));
    }
    let f = &config.faithful;
    let lambda_p = if f.lambda_p > 0.0 {
        f.lambda_p
    } else {
        2.0 * v.real_rate
    };
    if !lambda_p.is_finite() || lambda_p <= v.real_rate {
        return Err(bad("faithful.lambda_p", "must exceed rate_per_client"));
    }
    if !(0.0..1.0).contains(&f.link_loss) {
        return Err(bad("faithful.link_loss", "must be in [0, 1)"));
    }
    if !(f.commit_latency_ms.is_finite() && f.commit_latency_ms >= 0.0) {
        return Err(bad("faithful.commit_latency_ms", "must be finite and >= 0"));
    }
    if !(f.pull_interval_ms.is_finite() && f.pull_interval_ms > 0.0) {
        return Err(bad("faithful.pull_interval_ms", "must be finite and > 0"));
    }
    let pull_batch = f.pull_batch as usize;
    MailboxConfig {
        pull_batch,
        ..MailboxConfig::default()
    }
    .validate()
    .map_err(|e| bad("faithful.pull_batch", e.to_string()))?;
    if f.mailbox_quota == 0 {
        return Err(bad("faithful.mailbox_quota", "must be >= 1"));
    }
    let pull_interval_s = f.pull_interval_ms / 1e3;
    // Model mode's automatic drain (50 mean delays per layer) is for mixing; here the streams
    // keep running so retransmissions, acks and the last pulls finish.
    let drain_s = if config.run.max_drain_s > 0.0 {
        config.run.max_drain_s
    } else {
        30.0 + 2.0 * pull_interval_s
    };
    Ok(Checked {
        width: v.width,
        gateways: v.gateways as usize,
        mean_hop_s: v.mean_hop_s,
        link_s: v.link_s,
        clients: v.clients,
        real_rate: v.real_rate,
        lambda_p,
        loop_rate: v.loop_rate,
        drop_rate: v.drop_rate,
        duration_s: v.duration_s,
        warmup_s: v.warmup_s,
        drain_s,
        seed: v.seed,
        link_loss: f.link_loss,
        commit_s: f.commit_latency_ms / 1e3,
        pull_interval_s,
        pull_batch,
        quota: f.mailbox_quota,
    })
}

/// One real message handed to a client core, and what became of it. Times in seconds of
/// virtual time; `None` when it did not happen before the end of the run.
#[derive(Debug, Clone, PartialEq)]
pub struct MessageRow {
    /// Order in which messages were handed to `send_message`.
    pub id: u64,
    pub sender: u32,
    pub receiver: u32,
    /// Handed to `send_message`.
    pub sent_s: f64,
    /// Sent in `[warmup_s, duration_s)`.
    pub measured: bool,
    /// The λP slot that carried its first copy.
    pub slot_s: Option<f64>,
    /// Copies sent (1 + retransmissions).
    pub attempts: u32,
    /// The delays drawn for the first copy's hops that wait them out.
    pub forward_delay_s: Option<f64>,
    /// The copy that completed it reached the exit gateway's mailbox (`Mailbox::deliver`).
    pub stored_s: Option<f64>,
    /// That item's write batch was committed (`Mailbox::on_committed`).
    pub durable_s: Option<f64>,
    /// The pull answer that carried it reached the recipient (its `Event::Message`).
    pub pulled_s: Option<f64>,
    /// The sender's `Event::MessageAcked` (its ack pulled from the sender's own mailbox).
    pub acked_s: Option<f64>,
}

/// A sample's order statistics and its sample variance.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Part {
    #[serde(flatten)]
    pub dist: Dist,
    pub variance: f64,
}

impl Part {
    fn of(v: &[f64]) -> Self {
        let n = v.len() as f64;
        let mean = v.iter().sum::<f64>() / n.max(1.0);
        let variance = if v.len() > 1 {
            v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)
        } else {
            0.0
        };
        Part {
            dist: Dist::of(v.iter().copied()),
            variance,
        }
    }
}

/// Where the end-to-end latency goes, per delivered measured message (seconds).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LatencyParts {
    /// `send_message` to the λP slot of the first copy (the client's queue).
    pub slot_wait_s: Part,
    /// λP slot to arrival at the exit gateway's mailbox: model mode's latency plus the entry
    /// gateway's mixing delay (Shoal's entry gateway mixes; model mode's does not).
    pub wire_s: Part,
    /// Arrival at the mailbox to the end of the group commit that made it durable.
    pub commit_wait_s: Part,
    /// Durable to the recipient's pull answer: the wait for the next pull plus one link.
    pub pull_wait_s: Part,
    /// Wire latency minus the delays drawn for the first copy: the fixed link part, exactly
    /// 5 links when the first copy is the one delivered.
    pub link_part_s: Part,
    /// Durable at the recipient's gateway to the sender's `MessageAcked`: the ack's own trip,
    /// store and pull. Always positive: the gateway releases an ack only after the commit.
    pub ack_after_durable_s: Part,
}

/// Message and packet counts.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FaithfulTraffic {
    /// Real messages handed to the client cores over the whole run.
    pub messages: u64,
    /// Of those, sent in `[warmup_s, duration_s)`.
    pub measured: u64,
    pub measured_delivered: u64,
    /// Measured messages not pulled by their recipient by the end of the drain.
    pub measured_undelivered: u64,
    /// `Event::MessageAcked` over the whole run.
    pub messages_acked: u64,
    /// λP slots that carried a real fragment in `[0, duration_s)` (retransmissions included).
    pub real_packets: u64,
    /// λP cover, λL loops and λD drops in `[0, duration_s)`.
    pub cover_packets: u64,
}

/// Bandwidth overhead. Every frame on every link is the same size, so bytes scale the same.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FaithfulOverhead {
    /// Cover packets per real packet over `[0, duration_s)`.
    pub cover_per_real: f64,
    /// Share of the clients' packets that are cover.
    pub cover_fraction: f64,
    /// Frames put on mixnet links (client to gateway, between nodes, acks included) in
    /// `[0, duration_s)` per real packet sent in that time.
    pub link_transmissions_per_real: f64,
    /// Frames in pull answers (real items plus dummies) per real item pulled.
    pub pull_frames_per_item: f64,
}

/// Reliability: SURB-acks and retransmissions.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Acks {
    /// Acks the gateways' mailbox cores released after a durable commit (`on_committed`).
    pub released: u64,
    /// Of those, put into the network towards a valid first hop.
    pub sent: u64,
    /// Released acks whose SURB did not build or named no entry node.
    pub unroutable: u64,
    pub fragments_acked: u64,
    pub duplicate_acks: u64,
    pub retransmissions: u64,
    /// Measured messages whose `MessageAcked` came before their item was durable: must be 0.
    pub acked_before_durable: u64,
}

/// The gateways' mailbox counters, summed (`shoal_gateway::mailbox::MailboxStats`).
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct GatewayCounters {
    pub accepted: u64,
    pub dropped_unknown: u64,
    /// Deliveries to the cover/drop mailbox (λP cover, acked; λD drops).
    pub cover: u64,
    /// Of those, λP cover (with an ack slot).
    pub cover_acks: u64,
    pub refused_quota: u64,
    pub malformed: u64,
    pub without_ack_slot: u64,
    pub acks_released: u64,
    pub acks_withheld: u64,
    pub pulls: u64,
    pub items_offered: u64,
    pub dummies_offered: u64,
    pub items_acked: u64,
    pub ack_ids_ignored: u64,
    /// Acks (of items and of cover) whose commit had not finished when the run stopped
    /// (never released).
    pub acks_pending_at_end: u64,
    /// Group commits (one simulated fsync each).
    pub group_commits: u64,
    /// Write batches they covered.
    pub batches_committed: u64,
}

impl GatewayCounters {
    fn add(&mut self, s: &MailboxStats) {
        self.accepted += s.accepted;
        self.dropped_unknown += s.dropped_unknown;
        self.cover += s.cover;
        self.cover_acks += s.cover_acks;
        self.refused_quota += s.refused_quota;
        self.malformed += s.malformed;
        self.without_ack_slot += s.without_ack_slot;
        self.acks_released += s.acks_released;
        self.acks_withheld += s.acks_withheld;
        self.pulls += s.pulls;
        self.items_offered += s.items_offered;
        self.dummies_offered += s.dummies_offered;
        self.items_acked += s.items_acked;
        self.ack_ids_ignored += s.ack_ids_ignored;
    }
}

/// Rates and the run's extent.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FaithfulRunInfo {
    pub lambda_p: f64,
    pub lambda_l: f64,
    pub lambda_d: f64,
    /// Virtual time at which the run stopped (`duration_s` + drain).
    pub end_s: f64,
    /// Frames put on links and lost on them, whole run.
    pub link_frames: u64,
    pub link_frames_lost: u64,
}

/// What faithful mode writes as `summary.json`: the model-mode shape where a quantity exists in
/// both, and explicit about what faithful mode does not measure.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FaithfulSummary {
    pub mode: &'static str,
    pub seed: u64,
    pub config: ModelConfig,
    /// Always "none": see `entropy_note`.
    pub entropy_metric: &'static str,
    /// Always `null`: faithful mode does not track anonymity.
    pub entropy_bits: Option<Dist>,
    pub entropy_note: &'static str,
    /// `send_message` to the recipient's pull answer, for measured messages. The theory fields
    /// are an approximation (see the crate README).
    pub latency_s: Latency,
    pub latency_parts: LatencyParts,
    pub traffic: FaithfulTraffic,
    pub overhead: FaithfulOverhead,
    pub acks: Acks,
    pub gateways: GatewayCounters,
    /// The client cores' counters summed at the end of the drain.
    pub clients: ClientStats,
    /// The same at `duration_s` (rates and overhead are read from these).
    pub clients_window: ClientStats,
    pub run: FaithfulRunInfo,
}

/// Summary plus one row per real message, in `id` order.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientRun {
    pub summary: FaithfulSummary,
    pub rows: Vec<MessageRow>,
}

const ENTROPY_NOTE: &str = "not tracked in faithful mode: it runs the real cores on real \
     Sphinx packets and keeps no adversary posterior; run the same config in model mode for \
     entropy, min-entropy, degree of anonymity and unlinkability";

fn add(s: &mut ClientStats, x: &ClientStats) {
    s.real_sent += x.real_sent;
    s.retransmissions += x.retransmissions;
    s.payload_cover_sent += x.payload_cover_sent;
    s.loops_sent += x.loops_sent;
    s.drops_sent += x.drops_sent;
    s.events_without_topology += x.events_without_topology;
    s.events_skipped_late += x.events_skipped_late;
    s.build_failures += x.build_failures;
    s.fragments_acked += x.fragments_acked;
    s.messages_acked += x.messages_acked;
    s.duplicate_acks += x.duplicate_acks;
    s.loops_returned += x.loops_returned;
    s.loop_acks_returned += x.loop_acks_returned;
    s.loops_lost += x.loops_lost;
    s.loop_acks_lost += x.loop_acks_lost;
    s.loops_late += x.loops_late;
    s.messages_received += x.messages_received;
    s.fragments_received += x.fragments_received;
    s.duplicate_fragments += x.duplicate_fragments;
    s.drops_received += x.drops_received;
    s.unknown_loops += x.unknown_loops;
    s.unknown_replies += x.unknown_replies;
    s.malformed_items += x.malformed_items;
    s.queued_fragments += x.queued_fragments;
    s.in_flight_fragments += x.in_flight_fragments;
    s.loops_outstanding += x.loops_outstanding;
}

fn sum(clients: &[ClientCore]) -> ClientStats {
    let mut s = ClientStats::default();
    for c in clients {
        add(&mut s, &c.stats());
    }
    s
}

/// One stored item as the simulated store holds it.
struct Stored {
    payload: Vec<u8>,
    stored_s: f64,
    durable_s: Option<f64>,
}

/// A pulled item on its way to the client.
struct Pulled {
    id: ItemId,
    surb_id: SurbId,
    payload: Vec<u8>,
    stored_s: f64,
    durable_s: f64,
}

/// One exit/entry gateway: the real mailbox core and, around it, a store modelled in virtual
/// time as the production one behaves: one writer, group commit of every batch waiting (up to
/// `StoreConfig::max_batch`), each commit taking `commit_latency_ms`.
struct Gateway {
    node: NodeId,
    mailbox: Mailbox,
    items: HashMap<ItemId, Stored>,
    /// Items accepted since the last `poll_write`.
    open: Vec<ItemId>,
    waiting: VecDeque<(WriteBatch, Vec<ItemId>)>,
    committing: Vec<(WriteBatch, Vec<ItemId>)>,
    done_at: Option<Duration>,
    group_commits: u64,
    batches_committed: u64,
}

impl Gateway {
    fn start_commit(&mut self, now: Duration, latency: Duration, max_batch: usize) {
        if self.done_at.is_some() || self.waiting.is_empty() {
            return;
        }
        let n = self.waiting.len().min(max_batch);
        self.committing = self.waiting.drain(..n).collect();
        self.done_at = Some(now + latency);
    }

    /// The group commit finished: the mailbox core learns each batch is durable and hands
    /// back the acks of the items they covered.
    fn finish_commit(&mut self, now_s: f64) -> Vec<AckToSend> {
        self.done_at = None;
        self.group_commits += 1;
        let mut acks = Vec::new();
        for (batch, ids) in std::mem::take(&mut self.committing) {
            self.batches_committed += 1;
            acks.extend(
                self.mailbox
                    .on_committed(Committed::dangerously_assume_durable(&batch)),
            );
            for id in ids {
                if let Some(item) = self.items.get_mut(&id) {
                    item.durable_s = Some(now_s);
                }
            }
        }
        acks
    }
}

/// Spacing of frames written back to back on a client link (a pull answer's), as a
/// link observer sees them.
const FRAME_GAP_S: f64 = 50e-6;

/// Client-to-gateway control traffic (QUIC streams: reliable, one link latency each way).
enum Control {
    /// A client's pull timer fired.
    Tick(usize),
    /// Its pull request reached its gateway.
    Pull(usize),
    /// The answer reached the client.
    Answer(usize, Vec<Pulled>),
    /// The client's ack of the items it stored reached its gateway.
    Ack(usize, Vec<ItemId>),
}

/// Nearest-rank quantile of a sorted sample.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let n = sorted.len();
    sorted[((q * n as f64).ceil() as usize).clamp(1, n) - 1]
}

/// Runs `config` (`sim.mode = "faithful"`) with real client cores and real gateway mailbox
/// cores: `rate_per_client` real messages per second (Poisson, to a uniformly random other
/// client) queued for λP slots, plus `loop_rate` (λL) and `drop_rate` (λD) cover, through 3
/// layers of `width` real relays and `gateways` gateways. Client `i` has its mailbox at gateway
/// `i mod gateways` and enters the network there.
pub fn run_clients(config: &ModelConfig) -> Result<ClientRun, SimError> {
    run_scenario(config, &Scenario::default()).map(|(run, _)| run)
}

/// How clients are assigned to gateways.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum Assignment {
    /// Client `i` at gateway `i mod gateways` (faithful mode's default).
    #[default]
    Modulo,
    /// The production rule: the rendezvous-hash winner of the client's account key over
    /// the directory's gateways (`shoal_topology::gateway_for_member`).
    ByKey,
    /// The pre-fix deployment: each subnet's members at one gateway, subnet `s` at gateway
    /// `s mod gateways`. One subnet per client.
    BySubnet(Vec<u32>),
}

/// What a faithful run does beyond `config`'s own workload: the wire-leak attack tests
/// use it to choose who sends to whom and when, and to watch.
#[derive(Debug, Clone, Default)]
pub struct Scenario {
    pub assignment: Assignment,
    /// On/off bursts between clients of different gateways, replacing the config's
    /// Poisson workload (`rate_per_client` then only sets λP's default).
    pub bursts: Option<Bursts>,
    /// Real messages as (time s, sender, recipient), replacing the config's Poisson
    /// workload like `bursts` (which it excludes): `shoal_sim::observe::workload` writes
    /// the observer experiment's.
    pub sends: Option<Vec<(f64, u32, u32)>>,
    /// Runs every client core with `ClientConfig::legacy_leaks` (the control).
    pub legacy_leaks: bool,
    /// Record what a link observer and each exit gateway see ([`Observed`]).
    pub observe: bool,
}

/// The wire-leak workload: `pairs` senders at gateway 0 (the first `pairs` clients there)
/// each send single-fragment messages to their own recipient at gateway 1 (the first
/// `pairs` there), Poisson at `rate_on` per second while a burst is on: during
/// `[2k·period_s, (2k+1)·period_s)`, silent in the periods between, all pairs in step.
#[derive(Debug, Clone, PartialEq)]
pub struct Bursts {
    pub pairs: usize,
    pub period_s: f64,
    pub rate_on: f64,
}

impl Bursts {
    /// Whether a burst is on at time `t` (seconds).
    pub fn on_at(&self, t: f64) -> bool {
        ((t / self.period_s).floor() as u64).is_multiple_of(2)
    }
}

/// What the adversaries of the wire-leak tests see (recorded when [`Scenario::observe`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Observed {
    /// Gateway index of each client.
    pub gateway_of: Vec<usize>,
    /// The (sender, recipient) pairs of [`Scenario::bursts`].
    pub pairs: Vec<(u32, u32)>,
    /// A global passive observer: (time s, gateway index) of every frame arriving at a
    /// gateway from a layer-3 relay (forward packets, cover and SURB replies alike).
    pub gateway_inbound: Vec<(f64, usize)>,
    /// Each exit gateway: (time s, client index, is a forward packet) of every packet
    /// that ended in one of its clients' mailboxes. A gateway tells forward packets from
    /// SURB replies (acks) by whether the payload opens.
    pub mailbox_arrivals: Vec<(f64, u32, bool)>,
    /// A link observer, per client: times (s) of the frames it writes to its gateway
    /// (Sphinx packets, pull requests and, with `legacy_leaks`, `Ack` frames).
    pub client_up: Vec<Vec<f64>>,
    /// Per client: times of the frames its gateway writes to it (pull answers, each
    /// `pull_batch` items or dummies and a `PullDone`).
    pub client_down: Vec<Vec<f64>>,
    /// (time s, gateway index) of every frame a gateway puts towards the mix (client
    /// packets it forwards and the SURB-acks it releases).
    pub gateway_outbound: Vec<(f64, usize)>,
    /// Length of the traffic window (`run.duration_s`).
    pub duration_s: f64,
}

/// [`run_clients`] with a [`Scenario`]: also returns what the observers saw.
pub fn run_scenario(
    config: &ModelConfig,
    scenario: &Scenario,
) -> Result<(ClientRun, Observed), SimError> {
    let v = check(config)?;
    let mean_ms = v.mean_hop_s * 1e3;
    let link = LinkConfig {
        latency: Duration::from_secs_f64(v.link_s),
        loss: v.link_loss,
    };
    let params = NetworkParams {
        mean_hop_delay_ms: mean_ms,
        // As in `run`: a cap at 40 means never bites.
        max_hop_delay_ms: (40.0 * mean_ms).max(1000.0),
        lambda_p: v.lambda_p,
        lambda_l: v.loop_rate,
        lambda_d: v.drop_rate,
        lambda_m: 0.0,
        ..NetworkParams::default()
    };
    let end = v.duration_s + v.drain_s;
    let mut net = Network::builder()
        .seed(v.seed)
        .relays_per_layer(v.width)
        .gateways(v.gateways)
        .link(link)
        .client_link(link)
        .params(params)
        .epoch_secs(end.ceil() as u64 + 3600)
        .build()?;
    let gateway_ids = net.gateways();
    let topo = Arc::new(net.topology().clone());
    let control_link = Duration::from_secs_f64(v.link_s);
    let commit = Duration::from_secs_f64(v.commit_s);
    let pull_every = Duration::from_secs_f64(v.pull_interval_s);
    let max_batch = StoreConfig::default().max_batch;
    // The mailbox core takes wall-clock-like times; any fixed origin works, it only compares
    // its own times.
    let sys_origin = UNIX_EPOCH + Duration::from_secs(1_700_000_000);

    // Client randomness (identities, schedules, packets, the workload) from its own stream.
    let mut rng = StdRng::seed_from_u64(v.seed ^ 0x636c_6965_6e74_7321);
    // Gateways' salts, account keys and the pull phases from another, so adding the gateway
    // stage did not move the client stream.
    let mut gw_rng = StdRng::seed_from_u64(v.seed ^ 0x6761_7465_7761_7973);
    let ccfg = ClientConfig {
        send_records: usize::MAX,
        legacy_leaks: scenario.legacy_leaks,
        ..ClientConfig::default()
    };
    let start = net.now_instant();

    let mcfg = MailboxConfig {
        pull_batch: v.pull_batch,
        ..MailboxConfig::default()
    };
    let mut gws: Vec<Gateway> = Vec::with_capacity(gateway_ids.len());
    for node in &gateway_ids {
        let mailbox = Mailbox::new(mcfg.clone(), Salt::random(&mut gw_rng))
            .map_err(|e| bad("gateway mailbox", e.to_string()))?;
        gws.push(Gateway {
            node: *node,
            mailbox,
            items: HashMap::new(),
            open: Vec::new(),
            waiting: VecDeque::new(),
            committing: Vec::new(),
            done_at: None,
            group_commits: 0,
            batches_committed: 0,
        });
    }
    let by_node: HashMap<NodeId, usize> =
        gws.iter().enumerate().map(|(i, g)| (g.node, i)).collect();
    let n_clients = v.clients as usize;
    let keys: Vec<AccountKey> = (0..n_clients)
        .map(|_| {
            let mut key = [0u8; 32];
            gw_rng.fill_bytes(&mut key);
            key
        })
        .collect();
    let gateway_of: Vec<usize> = match &scenario.assignment {
        Assignment::Modulo => (0..n_clients).map(|i| i % gws.len()).collect(),
        Assignment::ByKey => keys
            .iter()
            .map(|k| {
                let g = topo
                    .gateway_for_member(k)
                    .map_err(|e| bad("gateway assignment", e.to_string()))?;
                Ok(by_node.get(&g).copied().unwrap_or(0))
            })
            .collect::<Result<_, SimError>>()?,
        Assignment::BySubnet(subnets) => {
            if subnets.len() != n_clients {
                return Err(bad("scenario", "one subnet per client"));
            }
            subnets.iter().map(|s| *s as usize % gws.len()).collect()
        }
    };
    let mut clients: Vec<ClientCore> = gateway_of
        .iter()
        .map(|&g| {
            let id = Identity::generate(&mut rng, gateway_ids[g]);
            let mut c = ClientCore::new(id, ccfg.clone(), &mut rng);
            c.set_topology(topo.clone(), start);
            c
        })
        .collect();
    let contacts: Vec<_> = clients.iter().map(ClientCore::contact).collect();
    let client_of: HashMap<MailboxAddress, u32> = contacts
        .iter()
        .enumerate()
        .map(|(i, c)| (c.mailbox, i as u32))
        .collect();
    // Accounts exist before the run starts: created and committed at once.
    for (i, c) in clients.iter().enumerate() {
        let mailbox: MailboxAddress = c.identity().mailbox;
        gws[gateway_of[i]]
            .mailbox
            .create_account(&mailbox, keys[i], v.quota)
            .map_err(|e| bad("gateway account", e.to_string()))?;
    }
    for g in &mut gws {
        while let Some(b) = g.mailbox.poll_write() {
            g.mailbox
                .on_committed(Committed::dangerously_assume_durable(&b));
        }
    }

    // Client-gateway control messages in (time, sequence) order; pull timers start at a
    // uniformly random phase (clients connect at different times).
    let mut control: BTreeMap<(Duration, u64), Control> = BTreeMap::new();
    let mut seq = 0u64;
    let mut push = |control: &mut BTreeMap<(Duration, u64), Control>, at: Duration, c: Control| {
        seq += 1;
        control.insert((at, seq), c);
    };
    for i in 0..clients.len() {
        let phase: f64 = gw_rng.random::<f64>() * v.pull_interval_s;
        push(
            &mut control,
            Duration::from_secs_f64(phase),
            Control::Tick(i),
        );
    }

    // Real messages: each client's Poisson stream, merged (sender, recipient), unless the
    // scenario brings its own.
    let mut sends: Vec<(f64, u32, u32)> = Vec::new();
    let mut pairs = Vec::new();
    if let Some(given) = &scenario.sends {
        if scenario.bursts.is_some() {
            return Err(bad("scenario", "give bursts or sends, not both"));
        }
        for &(t, from, to) in given {
            if !(t.is_finite() && t >= 0.0) || from >= v.clients || to >= v.clients || from == to {
                return Err(bad("scenario", "a send names a bad time or client"));
            }
        }
        sends.extend(given.iter().filter(|s| s.0 < v.duration_s));
    }
    if let Some(b) = &scenario.bursts {
        if !(b.period_s > 0.0 && b.rate_on > 0.0 && b.rate_on.is_finite()) {
            return Err(bad("scenario", "bursts need a positive period and rate"));
        }
        let gof = &gateway_of;
        let at = |g: usize| (0..n_clients).filter(move |&i| gof[i] == g);
        pairs = at(0)
            .zip(at(1))
            .take(b.pairs)
            .map(|(s, r)| (s as u32, r as u32))
            .collect();
        if pairs.len() < b.pairs {
            return Err(bad("scenario", "too few clients at gateways 0 and 1"));
        }
        for &(from, to) in &pairs {
            let mut t = 0.0;
            loop {
                let gap: f64 = Exp1.sample(&mut rng);
                t += gap / b.rate_on;
                if t >= v.duration_s {
                    break;
                }
                if !b.on_at(t) {
                    // Skip to the next burst: Poisson within bursts only.
                    t = ((t / b.period_s).floor() + 1.0) * b.period_s;
                    continue;
                }
                sends.push((t, from, to));
            }
        }
    }
    let own_workload = scenario.bursts.is_none() && scenario.sends.is_none();
    for client in (0..v.clients).filter(|_| own_workload) {
        let mut t = 0.0;
        loop {
            let gap: f64 = Exp1.sample(&mut rng);
            t += gap / v.real_rate;
            if t >= v.duration_s {
                break;
            }
            let r = rng.random_range(0..v.clients - 1);
            sends.push((t, client, if r >= client { r + 1 } else { r }));
        }
    }
    sends.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));

    let mut msgs: Vec<MessageRow> = Vec::with_capacity(sends.len());
    let mut by_id: HashMap<[u8; 16], usize> = HashMap::new();
    let mut acked_events = 0u64;
    let (mut acks_sent, mut acks_unroutable) = (0u64, 0u64);
    let mut observed = Observed {
        gateway_of: gateway_of.clone(),
        pairs,
        duration_s: v.duration_s,
        ..Observed::default()
    };
    if scenario.observe {
        observed.client_up = vec![Vec::new(); n_clients];
        observed.client_down = vec![Vec::new(); n_clients];
    }
    let first_layer: std::collections::HashSet<NodeId> = net.layer(0).into_iter().collect();
    let last_layer: std::collections::HashSet<NodeId> = net
        .layer(shoal_packet::MIX_LAYERS - 1)
        .into_iter()
        .collect();
    net.record_arrivals(scenario.observe);
    let mut next_send = 0usize;
    let secs = |t: Instant| t.saturating_duration_since(start).as_secs_f64();
    let mut window = None;

    loop {
        let t_client = clients
            .iter()
            .filter_map(ClientCore::poll_timeout)
            .min()
            .map(|t| t.saturating_duration_since(start));
        let t_send = sends.get(next_send).map(|s| Duration::from_secs_f64(s.0));
        let t_control = control.keys().next().map(|k| k.0);
        let t_commit = gws.iter().filter_map(|g| g.done_at).min();
        let Some(t) = [t_client, t_send, net.next_event_at(), t_control, t_commit]
            .into_iter()
            .flatten()
            .min()
        else {
            break;
        };
        if window.is_none() && t.as_secs_f64() >= v.duration_s {
            window = Some((sum(&clients), net.link_stats()));
        }
        if t.as_secs_f64() >= end {
            break;
        }
        net.drive_until(t)?;
        for a in net.take_arrivals() {
            if let (Some(from), Some(&gi)) = (a.from, by_node.get(&a.to))
                && last_layer.contains(&from)
            {
                observed.gateway_inbound.push((a.at.as_secs_f64(), gi));
            }
            if let Some(gi) = a.from.and_then(|f| by_node.get(&f))
                && first_layer.contains(&a.to)
            {
                observed.gateway_outbound.push((a.at.as_secs_f64(), *gi));
            }
        }
        let now = net.now_instant();
        let now_s = secs(now);
        let sys = sys_origin + t;

        // Group commits that finished: only now are their acks released.
        for (gi, g) in gws.iter_mut().enumerate() {
            if g.done_at.is_some_and(|d| d <= t) {
                for ack in g.finish_commit(now_s) {
                    let label = ack.key_epoch_label();
                    let routable = ack.into_packet().ok().and_then(|p| {
                        // As the gateway driver: the first hop must be where packets enter
                        // the mix; cover's random ack slots name no such node.
                        topo.node(&p.first_hop)
                            .is_some_and(|n| n.role == Role::Gateway || n.layer == Some(0))
                            .then_some(p)
                    });
                    match routable.and_then(|p| {
                        Frame::sphinx(label, &p.packet)
                            .ok()
                            .map(|f| (p.first_hop, f))
                    }) {
                        Some((first_hop, frame)) => {
                            net.inject(&first_hop, frame)?;
                            acks_sent += 1;
                            // Seen on the gateway's link to a relay (an ack whose
                            // first hop is a gateway goes gateway to gateway).
                            if scenario.observe && first_layer.contains(&first_hop) {
                                observed.gateway_outbound.push((now_s, gi));
                            }
                        }
                        None => acks_unroutable += 1,
                    }
                }
            }
        }

        // Final-hop packets into the exit gateway's mailbox core.
        for d in net.take_deliveries() {
            let Some(&gi) = by_node.get(&d.node) else {
                continue;
            };
            if scenario.observe
                && let Some(&c) = client_of.get(&d.destination)
            {
                let forward = shoal_packet::sphinx::open_forward(&d.payload).is_ok();
                observed
                    .mailbox_arrivals
                    .push((d.at.as_secs_f64(), c, forward));
            }
            let g = &mut gws[gi];
            if let DeliverOutcome::Accepted { id, .. } =
                g.mailbox
                    .deliver(&d.destination, d.surb_id, &d.payload, sys)
            {
                g.items.insert(
                    id,
                    Stored {
                        payload: d.payload,
                        stored_s: d.at.as_secs_f64(),
                        durable_s: None,
                    },
                );
                g.open.push(id);
            }
        }

        // Pulls, answers and acks due now.
        while let Some(entry) = control.first_entry() {
            if entry.key().0 > t {
                break;
            }
            match entry.remove() {
                Control::Tick(i) => {
                    if scenario.observe {
                        observed.client_up[i].push(now_s);
                    }
                    push(&mut control, t + control_link, Control::Pull(i));
                    push(&mut control, t + pull_every, Control::Tick(i));
                }
                Control::Pull(i) => {
                    let g = &mut gws[gateway_of[i]];
                    let plan = g
                        .mailbox
                        .pull(&keys[i], sys)
                        .map_err(|e| bad("gateway pull", e.to_string()))?;
                    let mut items = Vec::new();
                    for item in plan.items() {
                        if let PullItem::Real { id, surb_id } = *item
                            && let Some(s) = g.items.get(&id)
                        {
                            items.push(Pulled {
                                id,
                                surb_id,
                                payload: s.payload.clone(),
                                stored_s: s.stored_s,
                                durable_s: s.durable_s.unwrap_or(f64::NAN),
                            });
                        }
                    }
                    push(&mut control, t + control_link, Control::Answer(i, items));
                }
                Control::Answer(i, items) => {
                    if scenario.observe {
                        let frames = v.pull_batch + 1;
                        observed.client_down[i].extend(
                            (0..frames).map(|k| {
                                now_s - control_link.as_secs_f64() + k as f64 * FRAME_GAP_S
                            }),
                        );
                    }
                    let mut ids = Vec::with_capacity(items.len());
                    let mut saved_mail = false;
                    for p in items {
                        clients[i].handle_mailbox_item(p.surb_id, &p.payload, now);
                        ids.push(p.id);
                        while let Some(e) = clients[i].poll_event() {
                            match e {
                                Event::Message { message_id, .. } => {
                                    saved_mail = true;
                                    if let Some(&k) = by_id.get(&message_id) {
                                        let r = &mut msgs[k];
                                        if r.pulled_s.is_none() {
                                            r.pulled_s = Some(now_s);
                                            r.stored_s = Some(p.stored_s);
                                            r.durable_s = Some(p.durable_s);
                                        }
                                    }
                                }
                                Event::MessageAcked { message_id } => {
                                    acked_events += 1;
                                    if let Some(&k) = by_id.get(&message_id) {
                                        msgs[k].acked_s.get_or_insert(now_s);
                                    }
                                }
                                _ => {}
                            }
                        }
                    }
                    // With `legacy_leaks` the client acks in `Ack` frames of its own as
                    // soon as its store has saved what the answer carried: at once for
                    // loops and acks, after a commit for a message (the driver's fsync).
                    // Today the ids ride in the next pull, which is on the wire anyway.
                    if scenario.observe && scenario.legacy_leaks && !ids.is_empty() {
                        let at = now_s + if saved_mail { v.commit_s } else { 0.0 };
                        let frames = ids.len().div_ceil(shoal_packet::protocol::MAX_ACK_IDS);
                        observed.client_up[i]
                            .extend((0..frames).map(|k| at + k as f64 * FRAME_GAP_S));
                    }
                    // The client acks what it stored, after the answer's end (`PullDone`).
                    if !ids.is_empty() {
                        push(&mut control, t + control_link, Control::Ack(i, ids));
                    }
                }
                Control::Ack(i, ids) => {
                    let g = &mut gws[gateway_of[i]];
                    g.mailbox
                        .ack(&keys[i], &ids)
                        .map_err(|e| bad("gateway ack", e.to_string()))?;
                    for id in ids {
                        g.items.remove(&id);
                    }
                }
            }
        }

        // Whatever the mailbox cores want durable goes to their writers.
        for g in gws.iter_mut() {
            while let Some(b) = g.mailbox.poll_write() {
                let ids = std::mem::take(&mut g.open);
                g.waiting.push_back((b, ids));
            }
            g.start_commit(t, commit, max_batch);
        }

        while next_send < sends.len() && Duration::from_secs_f64(sends[next_send].0) <= t {
            let (at, from, to) = sends[next_send];
            let body = (next_send as u64).to_be_bytes();
            let id = clients[from as usize]
                .send_message(&mut rng, contacts[to as usize], &body)
                .map_err(|e| bad("client send_message", e.to_string()))?;
            by_id.insert(id, msgs.len());
            msgs.push(MessageRow {
                id: next_send as u64,
                sender: from,
                receiver: to,
                sent_s: at,
                measured: at >= v.warmup_s,
                slot_s: None,
                attempts: 0,
                forward_delay_s: None,
                stored_s: None,
                durable_s: None,
                pulled_s: None,
                acked_s: None,
            });
            next_send += 1;
        }
        for (ci, c) in clients.iter_mut().enumerate() {
            if c.poll_timeout().is_some_and(|due| due <= now) {
                c.handle_timeout(now, &mut rng);
            }
            let entry = c.identity().gateway;
            while let Some(frame) = c.poll_transmit() {
                net.inject(&entry, frame)?;
                if scenario.observe {
                    observed.client_up[ci].push(now_s);
                }
            }
            // Events come from pulled items (handled above); timers raise none today, but
            // drain them so none is left queued.
            while let Some(e) = c.poll_event() {
                if let Event::MessageAcked { message_id } = e {
                    acked_events += 1;
                    if let Some(&k) = by_id.get(&message_id) {
                        msgs[k].acked_s.get_or_insert(now_s);
                    }
                }
            }
            for r in c.take_send_records() {
                if let Some(&k) = by_id.get(&r.message_id) {
                    let row = &mut msgs[k];
                    row.attempts = row.attempts.max(r.attempt);
                    if r.attempt == 1 {
                        row.slot_s = Some(secs(r.at));
                        row.forward_delay_s = Some(r.forward_delay.as_secs_f64());
                    }
                }
            }
        }
    }

    let rows = msgs;
    let stats = sum(&clients);
    let (w, wlinks) = window.unwrap_or_else(|| (stats.clone(), net.link_stats()));
    let mut gcount = GatewayCounters::default();
    for g in &gws {
        gcount.add(g.mailbox.stats());
        gcount.group_commits += g.group_commits;
        gcount.batches_committed += g.batches_committed;
        gcount.acks_pending_at_end += g.mailbox.acks_pending() as u64;
    }
    let run = ClientRun {
        summary: summarize(
            config,
            &v,
            slot_wait_theory(&v, &gateway_of, scenario.legacy_leaks),
            &rows,
            stats,
            w,
            wlinks.sent,
            &net,
            gcount,
            acks_sent,
            acks_unroutable,
            acked_events,
            end,
        ),
        rows,
    };
    Ok((run, observed))
}

/// Mean and variance of the wait for a λP slot under the config's workload (each client
/// sends Poisson at `real_rate` to a uniformly random other client). Each λP slot goes to a
/// uniformly drawn gateway, so the fragments for gateway `g` are an M/M/1 queue served at
/// λP / gateways and fed at `real_rate` × the share of recipients at `g`; the wait is the
/// mixture of those queues' Exp sojourns. With `legacy_leaks` one queue is served at λP.
fn slot_wait_theory(v: &Checked, gateway_of: &[usize], legacy: bool) -> (f64, f64) {
    if legacy {
        let m = 1.0 / (v.lambda_p - v.real_rate);
        return (m, m * m);
    }
    let gws = v.gateways.max(1);
    let mu = v.lambda_p / gws as f64;
    let n = gateway_of.len();
    let mut at = vec![0usize; gws];
    for &g in gateway_of {
        at[g.min(gws - 1)] += 1;
    }
    let (mut mean, mut m2) = (0.0, 0.0);
    for &own in gateway_of {
        for (g, &count) in at.iter().enumerate() {
            let others = count - usize::from(g == own);
            let share = others as f64 / (n.max(2) - 1) as f64;
            if share == 0.0 {
                continue;
            }
            let rate = mu - v.real_rate * share;
            if rate <= 0.0 {
                return (f64::INFINITY, f64::INFINITY);
            }
            mean += share / rate;
            m2 += share * 2.0 / (rate * rate);
        }
    }
    let (mean, m2) = (mean / n.max(1) as f64, m2 / n.max(1) as f64);
    (mean, m2 - mean * mean)
}

#[allow(clippy::too_many_arguments)]
fn summarize(
    config: &ModelConfig,
    v: &Checked,
    slot: (f64, f64),
    rows: &[MessageRow],
    stats: ClientStats,
    w: ClientStats,
    window_link_frames: u64,
    net: &Network,
    gateways: GatewayCounters,
    acks_sent: u64,
    acks_unroutable: u64,
    acked_events: u64,
    end: f64,
) -> FaithfulSummary {
    let measured: Vec<&MessageRow> = rows.iter().filter(|r| r.measured).collect();
    let done: Vec<&MessageRow> = measured
        .iter()
        .copied()
        .filter(|r| r.pulled_s.is_some())
        .collect();
    let pick = |f: &dyn Fn(&MessageRow) -> Option<f64>| -> Vec<f64> {
        done.iter()
            .filter_map(|r| f(r))
            .filter(|x| !x.is_nan())
            .collect()
    };
    let mut e2e = pick(&|r| Some(r.pulled_s? - r.sent_s));
    e2e.sort_by(f64::total_cmp);
    let n = e2e.len() as f64;
    let mean = e2e.iter().sum::<f64>() / n.max(1.0);
    let variance = if e2e.len() > 1 {
        e2e.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    let links = 5.0 * v.link_s;
    let (slot_wait, slot_wait_variance) = slot;
    let latency_s = Latency {
        count: e2e.len() as u64,
        mean,
        variance,
        p5: quantile(&e2e, 0.05),
        p50: quantile(&e2e, 0.5),
        p90: quantile(&e2e, 0.9),
        p99: quantile(&e2e, 0.99),
        max: e2e.last().copied().unwrap_or(0.0),
        // M/M/1 wait for a λP slot to the right gateway (see `slot_wait_theory`) + 5 links + Gamma(4, mean) (the entry gateway mixes too)
        // + one commit + a uniform wait for the next pull and one link back. Ignores waiting
        // behind a commit in progress and retransmissions.
        theory_mean: slot_wait
            + links
            + 4.0 * v.mean_hop_s
            + v.commit_s
            + v.pull_interval_s / 2.0
            + v.link_s,
        theory_variance: slot_wait_variance
            + 4.0 * v.mean_hop_s * v.mean_hop_s
            + v.pull_interval_s * v.pull_interval_s / 12.0,
        fixed_links_s: links + v.link_s,
    };
    let parts = LatencyParts {
        slot_wait_s: Part::of(&pick(&|r| Some(r.slot_s? - r.sent_s))),
        wire_s: Part::of(&pick(&|r| Some(r.stored_s? - r.slot_s?))),
        commit_wait_s: Part::of(&pick(&|r| Some(r.durable_s? - r.stored_s?))),
        pull_wait_s: Part::of(&pick(&|r| Some(r.pulled_s? - r.durable_s?))),
        link_part_s: Part::of(&pick(&|r| {
            Some(r.stored_s? - r.slot_s? - r.forward_delay_s?)
        })),
        ack_after_durable_s: Part::of(&pick(&|r| Some(r.acked_s? - r.durable_s?))),
    };
    let acked_before_durable = done
        .iter()
        .filter(|r| match (r.acked_s, r.durable_s) {
            (Some(a), Some(d)) => a.total_cmp(&d).is_le(),
            _ => false,
        })
        .count() as u64;
    let real = w.real_sent as f64;
    let cover = (w.payload_cover_sent + w.loops_sent + w.drops_sent) as f64;
    let links_all = net.link_stats();
    let pulled_items = gateways.items_offered as f64;
    FaithfulSummary {
        mode: "faithful",
        seed: v.seed,
        config: config.clone(),
        entropy_metric: "none",
        entropy_bits: None,
        entropy_note: ENTROPY_NOTE,
        latency_s,
        latency_parts: parts,
        traffic: FaithfulTraffic {
            messages: rows.len() as u64,
            measured: measured.len() as u64,
            measured_delivered: done.len() as u64,
            measured_undelivered: (measured.len() - done.len()) as u64,
            messages_acked: acked_events,
            real_packets: w.real_sent,
            cover_packets: cover as u64,
        },
        overhead: FaithfulOverhead {
            cover_per_real: if real > 0.0 { cover / real } else { 0.0 },
            cover_fraction: if real + cover > 0.0 {
                cover / (real + cover)
            } else {
                0.0
            },
            link_transmissions_per_real: if real > 0.0 {
                window_link_frames as f64 / real
            } else {
                0.0
            },
            pull_frames_per_item: if pulled_items > 0.0 {
                (gateways.items_offered + gateways.dummies_offered) as f64 / pulled_items
            } else {
                0.0
            },
        },
        acks: Acks {
            released: gateways.acks_released,
            sent: acks_sent,
            unroutable: acks_unroutable,
            fragments_acked: stats.fragments_acked,
            duplicate_acks: stats.duplicate_acks,
            retransmissions: stats.retransmissions,
            acked_before_durable,
        },
        gateways,
        clients: stats,
        clients_window: w,
        run: FaithfulRunInfo {
            lambda_p: v.lambda_p,
            lambda_l: v.loop_rate,
            lambda_d: v.drop_rate,
            end_s: end,
            link_frames: links_all.sent,
            link_frames_lost: links_all.lost,
        },
    }
}

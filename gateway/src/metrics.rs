//! The gateway's own counters, appended to the mixing pipeline's `/metrics`.
//!
//! Aggregates only: nothing per account, mailbox or client. The mailbox task publishes a
//! snapshot of the core's and the store's counters after each round of work; link tasks
//! bump relaxed atomics.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use shoal_relay::metrics::{family, histogram, record, summary, summary_scaled};

use crate::mailbox::MailboxStats;
use crate::store::StoreStats;
use shoal_packet::protocol::AdminRefusal;

/// How long a latency window lasts; summaries cover the last one or two windows.
const WINDOW: Duration = Duration::from_secs(30);

/// Why a released SURB-ack did not go out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AckDrop {
    /// The SURB is not a reply block (a cover packet's random slot, or garbage).
    BadSurb,
    /// Its first hop is not an entry node (layer-1 relay or gateway) of any held document:
    /// how cover traffic's random ack slots end.
    NotInDirectory,
    /// No directory document yet, so no key-epoch label.
    NoDirectory,
    /// The link queue to its first hop (or our own worker queues) was full.
    Overload,
}

impl AckDrop {
    pub const ALL: [AckDrop; 4] = [
        AckDrop::BadSurb,
        AckDrop::NotInDirectory,
        AckDrop::NoDirectory,
        AckDrop::Overload,
    ];

    pub fn label(self) -> &'static str {
        match self {
            AckDrop::BadSurb => "bad_surb",
            AckDrop::NotInDirectory => "not_in_directory",
            AckDrop::NoDirectory => "no_directory",
            AckDrop::Overload => "overload",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// A point-in-time summary of a running gateway (the mixing half is in
/// [`shoal_relay::RelayStats`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GatewayStats {
    pub mailbox: MailboxStats,
    pub store: StoreStats,
    pub accounts: usize,
    /// Items held over all mailboxes (durable or being written).
    pub items: usize,
    /// Write batches waiting for or inside the store's writer.
    pub batches_in_flight: usize,
    /// SURB-acks put on a link (or into our own pipeline when we are their first hop).
    pub acks_sent: u64,
    /// SURB-acks released but not sent, by cause (index: [`AckDrop`] order).
    pub acks_dropped: [u64; 4],
    /// Final-hop packets dropped because the mailbox task's queue was full.
    pub deliveries_overload: u64,
    pub clients_connected: usize,
    /// Client links closed because their key is not an account.
    pub clients_refused: u64,
    /// Client frames carrying Sphinx packets (handed to the mixing pipeline).
    pub client_sphinx_frames: u64,
    /// Client frames carrying control messages.
    pub client_control_frames: u64,
    /// Client frames that were neither (bad version or kind) or undecodable control.
    pub client_malformed: u64,
    /// Client Sphinx frames dropped because their account was over its send rate limit.
    pub client_frames_throttled: u64,
    /// Pull answers sent as dummies because their items were not loaded within the
    /// answer delay.
    pub pull_answers_late: u64,
    /// Client links closed because their account passed the flood threshold.
    pub clients_rate_cut: u64,
    /// Client links refused because their account was serving a cut penalty.
    pub clients_rate_refused: u64,
    /// Client links closed because their account opened more than
    /// `MAX_LINKS_PER_ACCOUNT` (the oldest goes).
    pub client_links_superseded: u64,
    /// Admin commands applied and durable.
    pub admin_applied: u64,
    /// Admin commands refused, by cause (index: [`AdminRefusal::ALL`] order).
    pub admin_refused: [u64; ADMIN_CAUSES],
}

const ADMIN_CAUSES: usize = AdminRefusal::ALL.len();

fn admin_index(r: AdminRefusal) -> usize {
    AdminRefusal::ALL
        .iter()
        .position(|x| *x == r)
        .unwrap_or(ADMIN_CAUSES - 1)
}

impl GatewayStats {
    pub fn acks_dropped(&self, why: AckDrop) -> u64 {
        self.acks_dropped[why.index()]
    }

    /// Admin commands refused for `why`.
    pub fn admin_refused(&self, why: AdminRefusal) -> u64 {
        self.admin_refused[admin_index(why)]
    }
}

#[derive(Debug)]
struct Windowed {
    started: Instant,
    current: [Histogram<u64>; 2],
    previous: [Histogram<u64>; 2],
}

/// Shared counters of one gateway.
#[derive(Debug)]
pub(crate) struct Metrics {
    snapshot: Mutex<(MailboxStats, StoreStats, usize, usize, usize)>,
    pub acks_sent: AtomicU64,
    acks_dropped: [AtomicU64; 4],
    pub deliveries_overload: AtomicU64,
    pub clients_connected: AtomicUsize,
    pub clients_refused: AtomicU64,
    pub client_sphinx_frames: AtomicU64,
    pub client_control_frames: AtomicU64,
    pub client_malformed: AtomicU64,
    pub client_frames_throttled: AtomicU64,
    pub pull_answers_late: AtomicU64,
    pub clients_rate_cut: AtomicU64,
    pub clients_rate_refused: AtomicU64,
    pub client_links_superseded: AtomicU64,
    pub admin_applied: AtomicU64,
    admin_refused: [AtomicU64; ADMIN_CAUSES],
    /// [commit latency (ns), ops per batch]
    commits: Mutex<Windowed>,
}

impl Metrics {
    pub(crate) fn new() -> Self {
        Metrics {
            snapshot: Mutex::new(Default::default()),
            acks_sent: AtomicU64::new(0),
            acks_dropped: Default::default(),
            deliveries_overload: AtomicU64::new(0),
            clients_connected: AtomicUsize::new(0),
            clients_refused: AtomicU64::new(0),
            client_sphinx_frames: AtomicU64::new(0),
            client_control_frames: AtomicU64::new(0),
            client_malformed: AtomicU64::new(0),
            client_frames_throttled: AtomicU64::new(0),
            pull_answers_late: AtomicU64::new(0),
            clients_rate_cut: AtomicU64::new(0),
            clients_rate_refused: AtomicU64::new(0),
            client_links_superseded: AtomicU64::new(0),
            admin_applied: AtomicU64::new(0),
            admin_refused: Default::default(),
            commits: Mutex::new(Windowed {
                started: Instant::now(),
                current: [histogram(), histogram()],
                previous: [histogram(), histogram()],
            }),
        }
    }

    pub(crate) fn ack_dropped(&self, why: AckDrop) {
        self.acks_dropped[why.index()].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn admin_refused(&self, why: AdminRefusal) {
        self.admin_refused[admin_index(why)].fetch_add(1, Ordering::Relaxed);
    }

    /// The mailbox task's view after a round of work.
    pub(crate) fn publish(
        &self,
        mailbox: &MailboxStats,
        store: StoreStats,
        accounts: usize,
        items: usize,
        in_flight: usize,
    ) {
        *self.snapshot.lock().unwrap_or_else(|e| e.into_inner()) =
            (mailbox.clone(), store, accounts, items, in_flight);
    }

    /// One batch became durable (or failed) `latency` after it was submitted.
    pub(crate) fn commit(&self, latency: Duration, ops: usize, now: Instant) {
        let mut w = self.commits.lock().unwrap_or_else(|e| e.into_inner());
        if now.saturating_duration_since(w.started) >= WINDOW {
            let current = std::mem::replace(&mut w.current, [histogram(), histogram()]);
            w.previous = current;
            w.started = now;
        }
        record(&mut w.current[0], latency);
        w.current[1].saturating_record(ops.max(1) as u64);
    }

    pub(crate) fn snapshot(&self) -> GatewayStats {
        let (mailbox, store, accounts, items, batches_in_flight) = self
            .snapshot
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        GatewayStats {
            mailbox,
            store,
            accounts,
            items,
            batches_in_flight,
            acks_sent: load(&self.acks_sent),
            acks_dropped: std::array::from_fn(|i| load(&self.acks_dropped[i])),
            deliveries_overload: load(&self.deliveries_overload),
            clients_connected: self.clients_connected.load(Ordering::Relaxed),
            clients_refused: load(&self.clients_refused),
            client_sphinx_frames: load(&self.client_sphinx_frames),
            client_control_frames: load(&self.client_control_frames),
            client_malformed: load(&self.client_malformed),
            client_frames_throttled: load(&self.client_frames_throttled),
            pull_answers_late: load(&self.pull_answers_late),
            clients_rate_cut: load(&self.clients_rate_cut),
            clients_rate_refused: load(&self.clients_rate_refused),
            client_links_superseded: load(&self.client_links_superseded),
            admin_applied: load(&self.admin_applied),
            admin_refused: std::array::from_fn(|i| load(&self.admin_refused[i])),
        }
    }

    /// Prometheus text (format 0.0.4) for the gateway families.
    pub(crate) fn render(&self) -> String {
        let s = self.snapshot();
        let m = &s.mailbox;
        let mut out = String::with_capacity(4096);
        let mut metric = |name: &str, kind: &str, help: &str, samples: &[(&str, f64)]| {
            family(&mut out, name, kind, help, samples)
        };
        let c = |v: u64| v as f64;
        metric(
            "shoal_gateway_deliveries_total",
            "counter",
            "Packets that ended here, by outcome (accepted = queued for a durable write).",
            &[
                ("{outcome=\"accepted\"}", c(m.accepted)),
                ("{outcome=\"unknown_mailbox\"}", c(m.dropped_unknown)),
                ("{outcome=\"cover\"}", c(m.cover)),
                ("{outcome=\"quota_full\"}", c(m.refused_quota)),
                ("{outcome=\"malformed\"}", c(m.malformed)),
                ("{outcome=\"overload\"}", c(s.deliveries_overload)),
            ],
        );
        metric(
            "shoal_gateway_quota_refusals_total",
            "counter",
            "Deliveries refused because the mailbox was at its quota (no ack: the sender retries).",
            &[("", c(m.refused_quota))],
        );
        metric(
            "shoal_gateway_unknown_mailbox_total",
            "counter",
            "Deliveries for no known mailbox (cover ends in the drop mailbox, outcome cover of deliveries_total).",
            &[("", c(m.dropped_unknown))],
        );
        metric(
            "shoal_gateway_acks_released_total",
            "counter",
            "SURB-acks released after their item became durable.",
            &[("", c(m.acks_released))],
        );
        metric(
            "shoal_gateway_acks_withheld_total",
            "counter",
            "SURB-acks withheld because their write failed.",
            &[("", c(m.acks_withheld))],
        );
        metric(
            "shoal_gateway_acks_sent_total",
            "counter",
            "SURB-acks sent into the mixnet.",
            &[("", c(s.acks_sent))],
        );
        let labels: Vec<String> = AckDrop::ALL
            .iter()
            .map(|r| format!("{{reason=\"{}\"}}", r.label()))
            .collect();
        let drops: Vec<(&str, f64)> = AckDrop::ALL
            .iter()
            .zip(&labels)
            .map(|(r, l)| (l.as_str(), c(s.acks_dropped(*r))))
            .collect();
        metric(
            "shoal_gateway_acks_dropped_total",
            "counter",
            "Released SURB-acks not sent, by cause (not_in_directory: cover's random slots).",
            &drops,
        );
        metric(
            "shoal_gateway_pulls_total",
            "counter",
            "Pull requests answered.",
            &[("", c(m.pulls))],
        );
        metric(
            "shoal_gateway_pull_entries_total",
            "counter",
            "Entries of pull answers, by kind.",
            &[
                ("{kind=\"item\"}", c(m.items_offered)),
                ("{kind=\"dummy\"}", c(m.dummies_offered)),
            ],
        );
        metric(
            "shoal_gateway_items_deleted_total",
            "counter",
            "Stored items deleted, by cause.",
            &[
                ("{cause=\"acked\"}", c(m.items_acked)),
                ("{cause=\"expired\"}", c(m.expired)),
                ("{cause=\"orphan\"}", c(m.orphans)),
            ],
        );
        metric(
            "shoal_gateway_ack_ids_ignored_total",
            "counter",
            "Client ack ids that named no durable item of the client's mailbox.",
            &[("", c(m.ack_ids_ignored))],
        );
        metric(
            "shoal_gateway_mailbox_items",
            "gauge",
            "Items held over all mailboxes.",
            &[("", s.items as f64)],
        );
        metric(
            "shoal_gateway_accounts",
            "gauge",
            "Registered accounts.",
            &[("", s.accounts as f64)],
        );
        metric(
            "shoal_gateway_store_commits_total",
            "counter",
            "Write transactions committed (fsyncs).",
            &[("", c(s.store.commits))],
        );
        metric(
            "shoal_gateway_store_batches_total",
            "counter",
            "Write batches made durable (batches / commits = the group-commit factor).",
            &[("", c(s.store.batches))],
        );
        metric(
            "shoal_gateway_store_failures_total",
            "counter",
            "Write transactions that failed.",
            &[("", c(s.store.failed_commits))],
        );
        metric(
            "shoal_gateway_store_batches_in_flight",
            "gauge",
            "Write batches waiting for or inside the store's writer.",
            &[("", s.batches_in_flight as f64)],
        );
        metric(
            "shoal_gateway_clients_connected",
            "gauge",
            "Authenticated client links open.",
            &[("", s.clients_connected as f64)],
        );
        metric(
            "shoal_gateway_clients_refused_total",
            "counter",
            "Client links closed because their key is not an account.",
            &[("", c(s.clients_refused))],
        );
        metric(
            "shoal_gateway_client_frames_total",
            "counter",
            "Frames received from clients, by kind.",
            &[
                ("{kind=\"sphinx\"}", c(s.client_sphinx_frames)),
                ("{kind=\"control\"}", c(s.client_control_frames)),
                ("{kind=\"malformed\"}", c(s.client_malformed)),
            ],
        );
        metric(
            "shoal_gateway_client_frames_throttled_total",
            "counter",
            "Client Sphinx frames dropped because their account was over its send rate limit.",
            &[("", c(s.client_frames_throttled))],
        );
        metric(
            "shoal_gateway_pull_answers_late_total",
            "counter",
            "Pull answers sent as dummies because the store did not load their items within the answer delay.",
            &[("", c(s.pull_answers_late))],
        );
        metric(
            "shoal_gateway_clients_rate_limited_total",
            "counter",
            "Client links closed for flooding (action=cut), refused during the penalty after a cut (action=refused), or closed because their account opened more links than allowed (action=superseded: the oldest goes).",
            &[
                ("{action=\"cut\"}", c(s.clients_rate_cut)),
                ("{action=\"refused\"}", c(s.clients_rate_refused)),
                ("{action=\"superseded\"}", c(s.client_links_superseded)),
            ],
        );
        let mut admin = vec![("{outcome=\"applied\"}".to_owned(), c(s.admin_applied))];
        admin.extend(AdminRefusal::ALL.iter().map(|r| {
            (
                format!("{{outcome=\"{}\"}}", r.label()),
                c(s.admin_refused(*r)),
            )
        }));
        let admin: Vec<(&str, f64)> = admin.iter().map(|(l, v)| (l.as_str(), *v)).collect();
        metric(
            "shoal_gateway_admin_commands_total",
            "counter",
            "Admin-signed subnet commands, by outcome (applied = durable; the rest are refusals by cause).",
            &admin,
        );
        metric(
            "shoal_gateway_accounts_cut_total",
            "counter",
            "Accounts whose links were cut by a de-provision or a policy revocation.",
            &[("", c(m.accounts_cut))],
        );
        let w = self.commits.lock().unwrap_or_else(|e| e.into_inner());
        let mut latency = w.previous[0].clone();
        let _ = latency.add(&w.current[0]);
        let mut ops = w.previous[1].clone();
        let _ = ops.add(&w.current[1]);
        drop(w);
        summary(
            &mut out,
            "shoal_gateway_commit_seconds",
            "Submission of a write batch to its durable commit (last 30-60 s).",
            &latency,
        );
        summary_scaled(
            &mut out,
            "shoal_gateway_commit_batch_ops",
            "Writes per batch handed to the store (last 30-60 s).",
            &ops,
            1.0,
        );
        out
    }
}

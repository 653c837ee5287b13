//! Mode agreement: the same small workload in model mode (abstract delays) and in faithful mode
//! (real Sphinx packets through the real relay cores in the harness; then with the real client
//! and gateway mailbox cores too) gives the same latency and overhead, within stated tolerances.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use shoal_sim::faithful;
use shoal_sim::model::config::{FaithfulSection, MetricsSection, OutputSection};
use shoal_sim::model::{ModelConfig, run_config};

/// 10 clients x 2 msg/s x 20 s ~ 400 packets, 5 Sphinx unwraps each: well under a second of crypto.
const SMALL: &str = r#"
[network]
layers = 3
width = 2
mean_hop_delay_ms = 50
link_delay_ms = 5
gateways = 2
[traffic]
clients = 10
rate_per_client = 2.0
[metrics]
sender_entropy = "off"
receiver_targets = 0
[output]
messages_csv = false
plots = false
[run]
duration_s = 20
warmup_s = 0
seed = 5
"#;

/// Model mode's latency is 5 links + Gamma(3, 50 ms) (three relays mix, gateways do not). In
/// Shoal the entry gateway also mixes: the real route is entry, L1, L2, L3, exit and every hop
/// but the exit applies its sampled Exp(50 ms) delay, so the raw faithful latency is 5 links +
/// Gamma(4, 50 ms). We correct for that explicitly, packet by packet, by subtracting the entry
/// gateway's own sampled delay (read from the built packet), instead of widening the tolerance.
///
/// Tolerance: the two runs are independent samples of the same distribution, so the difference
/// of their means has standard error sqrt(s_m^2 / n_m + s_f^2 / n_f) with the measured sample
/// variances and counts (~400 each, sd = sqrt(3) * 50 ms ~ 87 ms, so SE ~ 6 ms, ~3.5 % of the
/// 175 ms mean). We allow 4 standard errors (a false failure has probability ~6e-5; the seeds are
/// fixed anyway, so the outcome is deterministic).
#[test]
fn model_and_faithful_agree_on_mean_latency() {
    let config = ModelConfig::from_toml_str(SMALL).unwrap();
    let (model, _) = run_config(&config).unwrap();
    let f = faithful::run(&config).unwrap();

    // No loss anywhere, so every message is delivered.
    assert_eq!(f.measured_lost, 0);
    assert_eq!(f.measured_delivered, f.sent);
    assert!(f.sent > 300 && f.sent < 500, "{}", f.sent);

    // The non-random part is exact: delivery - send - applied mixing delays = 5 links.
    let links = 5.0 * 0.005;
    assert!(
        (f.link_part_s.min - links).abs() < 1e-6,
        "{:?}",
        f.link_part_s
    );
    assert!(
        (f.link_part_s.max - links).abs() < 1e-6,
        "{:?}",
        f.link_part_s
    );

    let m = &model.latency_s;
    let fe = &f.model_equivalent_s;
    let se = (m.variance / m.count as f64 + f.model_equivalent_variance / fe.count as f64).sqrt();
    let diff = fe.mean - m.mean;
    eprintln!(
        "model: n = {} mean = {:.4} s p50 = {:.4} p90 = {:.4} p99 = {:.4} | faithful (entry delay removed): \
         n = {} mean = {:.4} s p50 = {:.4} p95 = {:.4} | faithful raw mean = {:.4} | \
         diff = {:.4} s = {:.2} SE (SE = {:.4} s)",
        m.count,
        m.mean,
        m.p50,
        m.p90,
        m.p99,
        fe.count,
        fe.mean,
        fe.median,
        fe.p95,
        f.latency_s.mean,
        diff,
        diff / se,
        se
    );
    assert!(diff.abs() < 4.0 * se, "diff {diff} s, SE {se} s");

    // The correction itself is one Exp(50 ms) hop per packet: its mean over ~400 packets is
    // 50 ms within 4 SE (SE = 50 ms / sqrt(n) ~ 2.5 ms).
    let entry = f.latency_s.mean - fe.mean;
    let entry_se = 0.05 / (fe.count as f64).sqrt();
    assert!((entry - 0.05).abs() < 4.0 * entry_se, "entry delay {entry}");
}

/// Same config and seed give the same faithful result.
#[test]
fn faithful_is_deterministic() {
    let mut config = ModelConfig::from_toml_str(SMALL).unwrap();
    config.run.duration_s = 3.0;
    let a = faithful::run(&config).unwrap();
    let b = faithful::run(&config).unwrap();
    assert_eq!(a, b);
    config.network.layers = 4;
    assert!(faithful::run(&config).is_err());
}

/// The small workload with cover on, in faithful mode: 10 clients, 1 real msg/s, λP = 2/s,
/// λL = 1/s, λD = 1/s, group commits of 10 ms, a pull every 500 ms.
const COVER: &str = r#"
[sim]
mode = "faithful"
[network]
layers = 3
width = 2
mean_hop_delay_ms = 50
link_delay_ms = 5
gateways = 2
[traffic]
clients = 10
rate_per_client = 1.0
loop_rate = 1.0
drop_rate = 1.0
[faithful]
commit_latency_ms = 10
pull_interval_ms = 500
[run]
duration_s = 40
warmup_s = 0
seed = 5
"#;

/// Model mode on the same network: no faithful knobs, no anonymity tracking (only latency and
/// overhead are compared).
fn as_model(c: &ModelConfig) -> ModelConfig {
    let mut m = c.clone();
    m.sim = Default::default();
    m.faithful = FaithfulSection::default();
    m.metrics = MetricsSection {
        sender_entropy: "off".into(),
        receiver_targets: 0,
        ..MetricsSection::default()
    };
    m.output = OutputSection {
        messages_csv: false,
        plots: false,
        ..OutputSection::default()
    };
    m
}

/// Faithful mode with the production client and gateway cores and cover on, against model mode.
///
/// Structural differences, each corrected in expectation and folded into the tolerance:
/// - Model mode's loop stream stands for both λL and the unused λP slots (a λP slot carries a
///   real fragment when one is queued for its drawn gateway, else cover through the same
///   mixes), so it runs with loop rate λL + λP − r.
/// - Wire latency (λP slot to arrival at the recipient's gateway mailbox) includes the entry
///   gateway's Exp(50 ms) delay that model mode leaves out: we subtract its mean (50 ms); its
///   variance stays in the faithful sample variance, so the standard error accounts for it.
/// - Time from `send_message` to the λP slot: each slot's gateway is drawn uniformly, so the
///   fragments for each gateway are an M/M/1 queue served at λP/2 = 1/s and fed at r × the
///   share of recipients there (4/9 on the sender's own gateway, 5/9 on the other): the wait
///   is the mixture of Exp(1 − 4/9) and Exp(1 − 5/9), mean 0.8 + 1.25 = 2.05 s (it was
///   1/(λP − r) = 1 s when a slot took whatever was queued; that rule leaked, see
///   `tests/wire_leaks.rs`).
/// - The gateway stage: one group commit (exactly c = 10 ms when the writer is idle, at most
///   2c when a commit is in progress), then the wait for the recipient's next pull, uniform on
///   [0, P) with the clients' random phases, plus one link back: mean P/2 + 5 ms.
///
/// Tolerances: 4 standard errors from the sample variances and counts (seed fixed, so the
/// outcome is deterministic; a false failure at another seed has probability ~1e-4). Cover per
/// real packet over the window: counts are Poisson, relative SE sqrt(1/C + 1/R) ≈ 6 %, 4 SE.
/// Exact checks: every message pulled and acked, no retransmission, every ack released only
/// after its item's commit, commit waits in [c, 2c], pull waits in [link, P + link], fixed-size
/// pull answers, and delivery − slot − drawn delays equals 5 links for every message.
#[test]
fn client_and_gateway_cores_with_cover_agree_with_model() {
    let config = ModelConfig::from_toml_str(COVER).unwrap();
    let run = faithful::run_clients(&config).unwrap();
    let f = &run.summary;
    let (r, lp, ll, ld) = (1.0, f.run.lambda_p, 1.0, 1.0);
    let (link, c, p) = (0.005, 0.010, 0.5);
    let eps = 1e-6;
    assert_eq!(lp, 2.0);
    let t = &f.traffic;
    assert!(t.measured > 300, "{}", t.measured);
    assert_eq!(t.measured_delivered, t.measured);
    assert_eq!(t.messages_acked, t.messages);
    assert_eq!(f.acks.retransmissions, 0);
    assert_eq!(f.clients.loops_lost, 0, "{:?}", f.clients);

    // Gateway stage. Every item with an ack slot (real packets and loops) and every λP cover
    // had its ack released by `on_committed` and routed, but for those whose commit was still
    // running at the end; cover and drops ended in the drop mailbox, drops without an ack.
    let g = &f.gateways;
    assert_eq!(
        g.acks_released + g.acks_pending_at_end,
        g.accepted - g.without_ack_slot + g.cover_acks
    );
    assert_eq!(f.acks.released, f.acks.sent);
    assert_eq!(f.acks.unroutable, 0);
    assert!(g.cover > g.cover_acks && g.cover_acks > 0);
    assert!(g.dropped_unknown == 0 && g.refused_quota == 0 && g.malformed == 0);
    assert_eq!(g.items_offered + g.dummies_offered, g.pulls * 16);
    assert_eq!(g.ack_ids_ignored, 0);
    assert_eq!(f.acks.acked_before_durable, 0);
    let lp_ = &f.latency_parts;
    // The ack leaves after the commit, crosses 5 links and a 6th to the sender's pull, and is
    // itself committed at the sender's gateway before it can be pulled.
    assert!(lp_.ack_after_durable_s.dist.min >= 6.0 * link + c - eps);
    let cw = &lp_.commit_wait_s.dist;
    assert!(cw.min >= c - eps && cw.max <= 2.0 * c + eps, "{cw:?}");
    let pw = &lp_.pull_wait_s;
    assert!(
        pw.dist.min >= link - eps && pw.dist.max <= p + link + eps,
        "{pw:?}"
    );
    let pw_se = p / 12f64.sqrt() / (pw.dist.count as f64).sqrt();
    assert!(
        (pw.dist.mean - (p / 2.0 + link)).abs() < 4.0 * pw_se,
        "pull wait {} vs {} (SE {pw_se})",
        pw.dist.mean,
        p / 2.0 + link
    );
    let lk = &lp_.link_part_s.dist;
    assert!((lk.min - 5.0 * link).abs() < eps && (lk.max - 5.0 * link).abs() < eps);
    // The parts add up to the end-to-end latency, message by message.
    let parts = lp_.slot_wait_s.dist.mean + lp_.wire_s.dist.mean + cw.mean + pw.dist.mean;
    assert!((parts - f.latency_s.mean).abs() < 1e-9);

    let model_cfg = {
        let mut m = as_model(&config);
        m.traffic.loop_rate = ll + lp - r;
        m
    };
    let (model, _) = run_config(&model_cfg).unwrap();
    let ml = &model.latency_s;
    let w = &lp_.wire_s;
    let se = (w.variance / w.dist.count as f64 + ml.variance / ml.count as f64).sqrt();
    let diff = w.dist.mean - 0.05 - ml.mean;
    assert!(
        diff.abs() < 4.0 * se,
        "faithful wire {} - 0.05 vs model {}: {diff} > 4 x {se}",
        w.dist.mean,
        ml.mean
    );

    // End to end, at the recipient's pull: model latency + entry gateway delay + the slot
    // wait + the measured commit wait + P/2 + one link. SE from both sample variances.
    let (same, other) = (4.0 / 9.0, 5.0 / 9.0);
    let mu = lp / 2.0;
    let want_wait = same / (mu - r * same) + other / (mu - r * other);
    let m2 = same * 2.0 / (mu - r * same).powi(2) + other * 2.0 / (mu - r * other).powi(2);
    let sd_wait = (m2 - want_wait * want_wait).sqrt();
    let theory = want_wait + 5.0 * link + 4.0 * 0.05 + c + p / 2.0 + link;
    assert!((f.latency_s.theory_mean - theory).abs() < 1e-9);
    // The slot wait enters as measured (checked against its theory below).
    let want_e2e = ml.mean + 0.05 + lp_.slot_wait_s.dist.mean + cw.mean + p / 2.0 + link;
    let fl = &f.latency_s;
    let se_e2e = (fl.variance / fl.count as f64 + ml.variance / ml.count as f64).sqrt();
    eprintln!(
        "faithful e2e mean {:.4} s (n = {}) vs model-based {:.4} s (model {:.4} s, n = {}), \
         {:.2} SE; wire {:.4} s ({:.2} SE vs model + 50 ms); slot wait {:.4}; commit wait \
         {:.4} [{:.4}, {:.4}]; pull wait {:.4} [{:.4}, {:.4}]; theory_mean {:.4}; cover/real {:.3}",
        fl.mean,
        fl.count,
        want_e2e,
        ml.mean,
        ml.count,
        (fl.mean - want_e2e) / se_e2e,
        w.dist.mean,
        diff / se,
        lp_.slot_wait_s.dist.mean,
        cw.mean,
        cw.min,
        cw.max,
        pw.dist.mean,
        pw.dist.min,
        pw.dist.max,
        fl.theory_mean,
        f.overhead.cover_per_real
    );
    assert!(
        (fl.mean - want_e2e).abs() < 4.0 * se_e2e,
        "e2e {} vs {want_e2e} (SE {se_e2e})",
        fl.mean
    );

    let want = (lp + ll + ld) / r - 1.0;
    let rel_se = (1.0 / t.cover_packets as f64 + 1.0 / t.real_packets as f64).sqrt();
    for got in [f.overhead.cover_per_real, model.overhead.cover_per_real] {
        assert!(
            (got / want - 1.0).abs() < 4.0 * rel_se,
            "cover/real {got} vs {want}"
        );
    }

    // The slot wait: the steady-state mixture above bounds it from above (SE = its sd /
    // sqrt(n)); the queues start empty and at load 0.44-0.56 with service 1/s they relax
    // over ~15 s, so 40 s measures less (1.66 s, 2026-12-07). It must exceed the single
    // queue's 1/(λP − r) = 1 s of the old rule: that is the price of the fix.
    let wait = lp_.slot_wait_s.dist.mean;
    let se_wait = sd_wait / (lp_.slot_wait_s.dist.count as f64).sqrt();
    assert!(
        wait < want_wait + 4.0 * se_wait && wait > 1.0 / (lp - r),
        "slot wait {wait} vs {want_wait} (SE {se_wait})"
    );
}

/// With 2 % loss on every mixnet link some packets and acks are lost: the client cores
/// retransmit (timeout 2 × drawn path delays + 5 s, doubling) until every message is pulled
/// and acked, the recipients drop the duplicate copies (the gateway stores and offers each
/// copy), and lost loops show up in `loops_lost`.
#[test]
fn client_cores_retransmit_through_loss() {
    let mut config = ModelConfig::from_toml_str(COVER).unwrap();
    config.run.duration_s = 20.0;
    config.run.max_drain_s = 60.0;
    config.faithful.link_loss = 0.02;
    let f = faithful::run_clients(&config).unwrap().summary;
    assert!(f.acks.retransmissions > 0);
    assert!(f.clients.loops_lost > 0);
    assert_eq!(f.traffic.measured_delivered, f.traffic.measured);
    assert_eq!(f.traffic.messages_acked, f.traffic.messages);
    assert_eq!(f.acks.acked_before_durable, 0);
    assert!(f.clients.duplicate_acks + f.clients.duplicate_fragments > 0);
    eprintln!(
        "messages {}, retransmissions {}, duplicate fragments {}, duplicate acks {}, loops lost {}/{}",
        f.traffic.messages,
        f.acks.retransmissions,
        f.clients.duplicate_fragments,
        f.clients.duplicate_acks,
        f.clients.loops_lost,
        f.clients.loops_sent + f.clients.payload_cover_sent
    );
}

/// A mailbox quota of 3 items and a pull every 2 s (the acks of one's own λP packets share the quota): the
/// gateway refuses deliveries beyond the quota without an ack, so senders retransmit (backing
/// off) until their recipient has pulled and acked; most messages get through in the drain.
#[test]
fn full_mailboxes_refuse_without_ack_and_senders_retransmit() {
    let mut config = ModelConfig::from_toml_str(COVER).unwrap();
    config.run.duration_s = 10.0;
    config.run.max_drain_s = 60.0;
    config.traffic.loop_rate = 0.0;
    config.faithful.mailbox_quota = 3;
    config.faithful.pull_interval_ms = 2000.0;
    let f = faithful::run_clients(&config).unwrap().summary;
    eprintln!(
        "refused {}, retransmissions {}, delivered {}/{}",
        f.gateways.refused_quota,
        f.acks.retransmissions,
        f.traffic.measured_delivered,
        f.traffic.measured
    );
    let g = &f.gateways;
    assert!(g.refused_quota > 0);
    assert!(f.acks.retransmissions > 0);
    // A refused copy gets no ack: acks only for accepted items with an ack slot, and cover.
    assert_eq!(
        g.acks_released + g.acks_pending_at_end,
        g.accepted - g.without_ack_slot + g.cover_acks
    );
    assert!(f.traffic.measured_delivered * 10 >= f.traffic.measured * 8);
    assert_eq!(f.acks.acked_before_durable, 0);
}

/// Same config and seed ⇒ identical `summary.json` and `messages.csv` bytes; another seed differs.
/// Also writes the files through `faithful::output::write_run`.
#[test]
fn faithful_with_gateways_is_deterministic() {
    let mut config = ModelConfig::from_toml_str(COVER).unwrap();
    config.run.duration_s = 6.0;
    config.run.max_drain_s = 4.0;
    let a = faithful::run_clients(&config).unwrap();
    let b = faithful::run_clients(&config).unwrap();
    let ja = faithful::output::summary_json(&a.summary).unwrap();
    assert_eq!(ja, faithful::output::summary_json(&b.summary).unwrap());
    assert_eq!(
        faithful::output::messages_csv(&a, u64::MAX),
        faithful::output::messages_csv(&b, u64::MAX)
    );
    assert!(ja.contains("\"entropy_bits\": null"), "{ja}");
    assert!(ja.contains("\"mode\": \"faithful\""));
    config.run.seed = 6;
    let c = faithful::run_clients(&config).unwrap();
    assert_ne!(ja, faithful::output::summary_json(&c.summary).unwrap());

    let dir = tempfile::tempdir().unwrap();
    faithful::output::write_run(dir.path(), &a).unwrap();
    let written = std::fs::read_to_string(dir.path().join("summary.json")).unwrap();
    assert_eq!(written, ja);
    let csv = std::fs::read_to_string(dir.path().join("messages.csv")).unwrap();
    assert_eq!(csv.lines().count(), a.rows.len() + 1);
    assert!(
        std::fs::metadata(dir.path().join("latency.png"))
            .unwrap()
            .len()
            > 1000
    );
}

/// Keys faithful mode does not model are refused by name, not ignored; faithful-only keys are
/// refused in model mode.
#[test]
fn unsupported_keys_are_refused() {
    let base = ModelConfig::from_toml_str(COVER).unwrap();
    let err = |c: &ModelConfig| faithful::run_clients(c).unwrap_err().to_string();
    let mut c = base.clone();
    c.metrics.receiver_targets = 5;
    c.adversary.corrupt_fraction = 0.1;
    let e = err(&c);
    assert!(
        e.contains("metrics.receiver_targets") && e.contains("adversary.corrupt_fraction"),
        "{e}"
    );
    let mut c = base.clone();
    c.attacks.enabled = vec!["timing".into()];
    assert!(err(&c).contains("attacks.enabled"));
    let mut c = base.clone();
    c.network.layers = 4;
    assert!(err(&c).contains("network.layers"));
    let mut c = base.clone();
    c.sim.mode = "model".into();
    assert!(err(&c).contains("sim.mode"));
    let mut m = as_model(&base);
    m.faithful.pull_batch = 8;
    assert!(run_config(&m).unwrap_err().to_string().contains("faithful"));
    m.faithful = FaithfulSection::default();
    m.sim.mode = "faithful".into();
    assert!(run_config(&m).unwrap_err().to_string().contains("sim.mode"));
}

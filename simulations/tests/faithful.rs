//! Mode agreement: the same small workload in model mode (abstract delays) and in faithful mode
//! (real Sphinx packets through the real relay cores in the harness) gives the same mean
//! end-to-end latency.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use shoal_sim::faithful;
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

/// The small workload with cover on: 10 clients, 1 real msg/s, λP = 2/s, λL = 1/s, λD = 1/s.
const COVER: &str = r#"
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
[metrics]
sender_entropy = "off"
receiver_targets = 0
[output]
messages_csv = false
plots = false
[run]
duration_s = 40
warmup_s = 0
seed = 5
"#;

/// Faithful mode with the production client cores and cover on, against model mode.
///
/// Structural differences, each corrected in expectation and folded into the tolerance:
/// - Model mode's loop stream stands for both λL and the unused λP slots (λP carries a real
///   fragment when one is queued, else a loop), so it runs with loop rate λL + λP − r.
/// - Wire latency (λP slot to arrival at the recipient's gateway) includes the entry gateway's
///   Exp(50 ms) delay that model mode leaves out: we subtract its mean (50 ms); its variance
///   stays in the faithful sample variance, so the standard error accounts for it.
/// - Time from `send_message` to delivery adds the wait for a λP slot: with Poisson slots and
///   Poisson arrivals the queue is M/M/1, so the wait is Exp(λP − r), mean 1 s here.
///
/// Tolerances: 4 standard errors from the sample variances and counts (seed fixed, so the
/// outcome is deterministic; a false failure at another seed has probability ~1e-4). Cover per
/// real packet over the window: counts are Poisson, relative SE sqrt(1/C + 1/R) ≈ 6 %, 4 SE.
/// Exact checks: every message delivered and acked, no retransmission and no lost loop without
/// loss, and delivery − slot − drawn delays equals 5 links for every message.
#[test]
fn client_cores_with_cover_agree_with_model() {
    let config = ModelConfig::from_toml_str(COVER).unwrap();
    let f = faithful::run_clients(&config, &faithful::ClientRunOptions::default()).unwrap();
    let (r, lp, ll, ld) = (1.0, f.lambda_p, 1.0, 1.0);
    assert_eq!(lp, 2.0);
    assert!(f.measured > 300, "{}", f.measured);
    assert_eq!(f.measured_delivered, f.measured);
    assert_eq!(f.messages_acked, f.messages);
    assert_eq!(f.stats.retransmissions, 0);
    assert_eq!(f.stats.loops_lost, 0);
    // Only loops sent in the last moments of the run (still on their way) have not returned.
    let loops = f.stats.loops_sent + f.stats.payload_cover_sent;
    assert!(f.stats.loops_returned <= loops && f.stats.loops_returned * 100 >= loops * 99);
    // Every real packet and loop that reached a mailbox was acked by its gateway.
    assert_eq!(
        f.acks_sent,
        f.stats.fragments_received + f.stats.loops_returned
    );
    assert!((f.link_part_s.min - 0.025).abs() < 1e-6 && (f.link_part_s.max - 0.025).abs() < 1e-6);

    let mut m = config.clone();
    m.traffic.loop_rate = ll + lp - r;
    let (model, _) = run_config(&m).unwrap();
    let ml = &model.latency_s;
    let se = (f.wire_latency_variance / f.wire_latency_s.count as f64
        + ml.variance / ml.count as f64)
        .sqrt();
    let diff = f.wire_latency_s.mean - 0.05 - ml.mean;
    assert!(
        diff.abs() < 4.0 * se,
        "faithful {} - 0.05 vs model {}: {diff} > 4 x {se}",
        f.wire_latency_s.mean,
        ml.mean
    );

    let want = (lp + ll + ld) / r - 1.0;
    let w = &f.window_stats;
    let cover = (w.payload_cover_sent + w.loops_sent + w.drops_sent) as f64;
    let rel_se = (1.0 / cover + 1.0 / w.real_sent as f64).sqrt();
    for got in [f.cover_per_real, model.overhead.cover_per_real] {
        assert!(
            (got / want - 1.0).abs() < 4.0 * rel_se,
            "cover/real {got} vs {want}"
        );
    }

    // M/M/1 wait for a λP slot: mean 1 / (λP − r); its sd is the mean, so SE = mean / sqrt(n).
    let wait = f.end_to_end_s.mean - f.wire_latency_s.mean;
    let want_wait = 1.0 / (lp - r);
    let se_wait = (want_wait * want_wait / f.end_to_end_s.count as f64).sqrt();
    assert!(
        (wait - want_wait).abs() < 4.0 * se_wait,
        "slot wait {wait} vs {want_wait} (SE {se_wait})"
    );
}

/// With 2 % loss on every link some packets and acks are lost: the client cores retransmit
/// (timeout 2 × drawn path delays + 5 s, doubling) until every message is delivered and acked,
/// the recipients drop the duplicate copies, and lost loops show up in `loops_lost`.
#[test]
fn client_cores_retransmit_through_loss() {
    let mut config = ModelConfig::from_toml_str(COVER).unwrap();
    config.run.duration_s = 20.0;
    let opts = faithful::ClientRunOptions {
        link_loss: 0.02,
        drain_s: 60.0,
        ..faithful::ClientRunOptions::default()
    };
    let f = faithful::run_clients(&config, &opts).unwrap();
    assert!(f.stats.retransmissions > 0);
    assert!(f.stats.loops_lost > 0);
    assert_eq!(f.measured_delivered, f.measured);
    assert_eq!(f.messages_acked, f.messages);
    assert!(
        f.stats.duplicate_acks + f.stats.duplicate_fragments > 0 || f.stats.retransmissions > 0
    );
    eprintln!(
        "messages {}, retransmissions {}, duplicate fragments {}, duplicate acks {}, loops lost {}/{}",
        f.messages,
        f.stats.retransmissions,
        f.stats.duplicate_fragments,
        f.stats.duplicate_acks,
        f.stats.loops_lost,
        f.stats.loops_sent + f.stats.payload_cover_sent
    );
}

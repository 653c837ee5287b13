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

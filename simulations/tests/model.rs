//! Model mode against theory: Gamma latency over exponential hops, the entropy of one Poisson mix
//! against Danezis' closed form, determinism, corrupt relays, and sweeps.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use shoal_sim::model::summary::{Summary, gamma_quantile};
use shoal_sim::model::{ModelConfig, output, run_config, sweep};

fn config(toml: &str) -> ModelConfig {
    ModelConfig::from_toml_str(toml).unwrap()
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs()
}

/// End-to-end latency over L exponential hops is (L + 2) fixed links plus Gamma(L, mean).
/// ~100k messages: mean within 1 %, variance within 4 %, quantiles p5/p50/p90/p99 within 2 %.
#[test]
fn latency_is_fixed_links_plus_gamma() {
    let c = config(
        r#"
[network]
layers = 3
width = 2
mean_hop_delay_ms = 300
link_delay_ms = 50
[traffic]
clients = 200
rate_per_client = 5.0
[metrics]
sender_entropy = "off"
receiver_targets = 0
[run]
duration_s = 105
warmup_s = 5
seed = 7
"#,
    );
    let (s, _) = run_config(&c).unwrap();
    let l = &s.latency_s;
    assert!(l.count > 90_000, "{}", l.count);
    let fixed = 5.0 * 0.05;
    assert!((l.fixed_links_s - fixed).abs() < 1e-12);
    assert!(
        rel(l.mean, fixed + 0.9) < 0.01,
        "mean {} vs {}",
        l.mean,
        fixed + 0.9
    );
    assert!(
        rel(l.variance, 3.0 * 0.09) < 0.04,
        "variance {} vs {}",
        l.variance,
        0.27
    );
    for (p, got) in [(0.05, l.p5), (0.5, l.p50), (0.9, l.p90), (0.99, l.p99)] {
        let want = fixed + gamma_quantile(3, 0.3, p);
        assert!(rel(got, want) < 0.02, "p{p}: {got} vs {want}");
    }
}

fn single_mix(ratio: f64, clients: u32, measured: f64) -> Summary {
    let c = config(&format!(
        r#"
[network]
layers = 1
width = 1
mean_hop_delay_ms = 1000
link_delay_ms = 0
gateways = 1
[traffic]
clients = {clients}
rate_per_client = {}
[metrics]
sender_entropy = "on"
receiver_targets = 0
[run]
duration_s = {}
warmup_s = 20
seed = 3
"#,
        ratio / f64::from(clients),
        20.0 + measured / ratio
    ));
    run_config(&c).unwrap().0
}

/// One exponential mix with Poisson input rate λ and mean delay 1/μ: the sender entropy of an
/// output tends to Danezis' log2(e λ / μ) (2004, "The traffic analysis of continuous-time
/// mixes"). Tolerance 0.1 bits for λ/μ >= 5; at λ/μ = 2 the pool is often nearly empty and the
/// simulated value sits a little below (measured -0.05), so 0.15 there.
#[test]
fn single_poisson_mix_matches_danezis() {
    for (ratio, tol) in [(2.0, 0.15), (5.0, 0.1), (10.0, 0.1), (20.0, 0.1)] {
        let s = single_mix(ratio, 5000, 4000.0);
        let want = (std::f64::consts::E * ratio).log2();
        let got = s.entropy_bits.mean;
        assert!((got - want).abs() < tol, "λ/μ = {ratio}: {got} vs {want}");
        // The single hop's latency is Exp(1 s).
        assert!(rel(s.latency_s.mean, 1.0) < 0.06, "{}", s.latency_s.mean);
    }
}

const SMALL: &str = r#"
[network]
layers = 3
width = 3
mean_hop_delay_ms = 200
link_delay_ms = 20
[traffic]
clients = 30
rate_per_client = 5.0
loop_rate = 1.0
drop_rate = 1.0
[adversary]
corrupt_fraction = 0.2
[run]
duration_s = 30
warmup_s = 5
seed = 11
"#;

/// Same config and seed give byte-identical summary.json and messages.csv; another seed differs.
#[test]
fn same_seed_same_bytes() {
    let c = config(SMALL);
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    for d in &dirs {
        let (s, raw) = run_config(&c).unwrap();
        output::write_run(d.path(), &s, &raw, false).unwrap();
    }
    for f in ["summary.json", "messages.csv", "targets.csv"] {
        let a = std::fs::read(dirs[0].path().join(f)).unwrap();
        let b = std::fs::read(dirs[1].path().join(f)).unwrap();
        assert!(a.len() > 100 && a == b, "{f} differs");
    }
    let mut other = c.clone();
    other.run.seed = 12;
    let a = output::summary_json(&run_config(&c).unwrap().0).unwrap();
    let b = output::summary_json(&run_config(&other).unwrap().0).unwrap();
    assert_ne!(a, b);
    let v: serde_json::Value = serde_json::from_str(&a).unwrap();
    for k in ["mean", "median", "p5", "min"] {
        assert!(v["entropy_bits"][k].is_f64(), "{k}");
    }
    assert_eq!(v["seed"], 11);
    assert_eq!(v["config"]["network"]["width"], 3);
}

/// Corrupt relays pass mass through unmixed: with every relay corrupt the adversary links every
/// message; with some corrupt, anonymity drops but does not vanish.
#[test]
fn corrupt_relays_pass_mass_unmixed() {
    let mut c = config(SMALL);
    c.adversary.corrupt_fraction = 1.0;
    let (s, _) = run_config(&c).unwrap();
    assert_eq!(s.entropy_bits.max, 0.0);
    assert_eq!(
        s.receiver_anonymity.unwrap().anonymity.entropy_bits.max,
        0.0
    );
    c.adversary.corrupt_fraction = 0.0;
    let honest = run_config(&c).unwrap().0.entropy_bits.mean;
    c.adversary.corrupt_fraction = 0.5;
    let half = run_config(&c).unwrap().0.entropy_bits.mean;
    assert!(
        half < honest && half > 0.5,
        "honest {honest}, half corrupt {half}"
    );
}

/// In a symmetric network (no cover: drops would add gateway outcomes on the receiver side only)
/// sender and receiver anonymity have the same distribution; the two trackers are separate code
/// paths, so agreement checks both.
#[test]
fn sender_and_receiver_entropy_agree() {
    let mut c = config(SMALL);
    c.adversary.corrupt_fraction = 0.0;
    c.traffic.loop_rate = 0.0;
    c.traffic.drop_rate = 0.0;
    c.metrics.receiver_targets = 400;
    c.run.duration_s = 60.0;
    let (s, _) = run_config(&c).unwrap();
    let snd = s.sender_anonymity.unwrap().entropy_bits.mean;
    let rcv = s.receiver_anonymity.unwrap();
    assert!(rcv.anonymity.entropy_bits.count > 50);
    assert!(
        (snd - rcv.anonymity.entropy_bits.mean).abs() < 0.1,
        "{snd} vs {}",
        rcv.anonymity.entropy_bits.mean
    );
    assert!(rcv.residual_mass.max < 1e-5);
}

/// Cover per real packet is (λL + λD) / λP.
#[test]
fn overhead_counts_cover() {
    let (s, _) = run_config(&config(SMALL)).unwrap();
    assert!(
        (s.overhead.cover_per_real - 0.4).abs() < 0.05,
        "{}",
        s.overhead.cover_per_real
    );
    assert!((s.overhead.link_transmissions_per_real - 1.4 * 5.0).abs() < 0.3);
}

#[test]
fn sweep_runs_the_grid_in_order() {
    let params = [sweep::Param::parse("network.width=2,4").unwrap()];
    let base = SMALL.replace("duration_s = 30", "duration_s = 10");
    let rows = sweep::sweep(&base, &params, 2).unwrap();
    let got: Vec<(String, u64)> = rows
        .iter()
        .map(|(r, _)| (r.params[0].1.clone(), r.seed))
        .collect();
    assert_eq!(
        got,
        [
            ("2".into(), 11),
            ("2".into(), 12),
            ("4".into(), 11),
            ("4".into(), 12)
        ]
    );
    assert_eq!(rows[2].1.config.network.width, 4);
    // λ/μ per relay = clients × all rates / width × mean hop delay, from the run's own config.
    let c = &rows[2].1.config;
    let t = &c.traffic;
    let want = f64::from(t.clients) * (t.rate_per_client + t.loop_rate + t.drop_rate) / 4.0
        * c.network.mean_hop_delay_ms
        / 1e3;
    assert!((rows[2].0.lambda_over_mu - want).abs() < 1e-9);
    let dir = tempfile::tempdir().unwrap();
    sweep::write_sweep(dir.path(), &rows, true).unwrap();
    for f in ["sweep.csv", "sweep.json", "sweep.png"] {
        assert!(dir.path().join(f).metadata().unwrap().len() > 0, "{f}");
    }
    let csv = sweep::sweep_csv(&rows.into_iter().map(|r| r.0).collect::<Vec<_>>());
    assert!(csv.starts_with("network.width,seed,lambda_over_mu,entropy_metric,entropy_mean"));
}

/// Two identical senders through one Poisson mix holding `ratio` = λ/μ messages on average.
fn two_senders(ratio: f64, seed: u64, corrupt: bool) -> Summary {
    // λ = 2 × 20 msg/s into the one relay; the mean delay sets λ/μ.
    let mean_ms = ratio / 40.0 * 1000.0;
    let c = config(&format!(
        r#"
[network]
layers = 1
width = 1
mean_hop_delay_ms = {mean_ms}
link_delay_ms = 0
[traffic]
clients = 2
rate_per_client = 20.0
[adversary]
corrupt_fraction = {}
[metrics]
receiver_targets = 0
[output]
messages_csv = false
[run]
duration_s = {}
warmup_s = {}
seed = {seed}
"#,
        if corrupt { 1.0 } else { 0.0 },
        200.0 + 10.0 * mean_ms / 1000.0,
        10.0 * mean_ms / 1000.0
    ));
    run_config(&c).unwrap().0
}

/// Loopix-style ε between two labelled senders, against a case with a known answer. In one
/// Poisson mix fed by two equal senders, the pool's excess D of Alice's mass over Bob's is an
/// AR(1) walk (±1 per arrival, × (1 − 1/n) per departure) with variance ≈ n/2, and a departing
/// message has ln LR = ln((n + D)/(n − D)) ≈ 2D/n: normal with sd √(2/n), n = λ/μ. So
/// ε(δ) ≈ z(1 − δ/2)·√(2μ/λ): 0.39 at λ/μ = 50 and 0.20 at 200 for δ = 0.05 (tolerance 20 %;
/// measured 0.408 and 0.212, seed 3;
/// the approximation ignores pool-size fluctuation). Corrupting the relay links every message:
/// infinite LR, ε undefined (null) at every δ.
#[test]
fn unlinkability_epsilon_matches_single_mix_and_corruption() {
    for ratio in [50.0, 200.0] {
        let s = two_senders(ratio, 3, false);
        let u = s.unlinkability.unwrap();
        let want = 1.96 * (2.0 / ratio).sqrt();
        let got = u.epsilon.unwrap();
        eprintln!(
            "λ/μ {ratio}: ε(0.05) {got} (theory {want}), n {}",
            u.messages
        );
        assert!(u.messages > 5000, "{}", u.messages);
        assert!(rel(got, want) < 0.2, "λ/μ {ratio}: ε {got} vs {want}");
        assert_eq!(u.infinite_fraction, 0.0);
        let p = s.unlinkability_pooled.unwrap();
        assert_eq!(p.messages, s.traffic.real_measured);
    }
    let s = two_senders(50.0, 3, true);
    let u = s.unlinkability.unwrap();
    assert_eq!(u.infinite_fraction, 1.0);
    assert!(u.epsilon.is_none() && u.epsilon_at.iter().all(|e| e.epsilon.is_none()));
}

/// One hostile operator runs 20 % of the relays (issue 20). Under the production rule (no two
/// relays of one operator on a route) it never holds a whole route, so it links no message by
/// itself, and senders keep more anonymity than under uniform selection, where it does hold
/// whole routes (the power check: the same network and seed with families ignored).
#[test]
fn family_selection_denies_a_hostile_operator_whole_routes() {
    let mut c = config(SMALL);
    c.network.width = 10;
    c.traffic.clients = 60;
    c.adversary.corrupt_fraction = 0.2;
    c.adversary.hostile_operators = 1;
    let (family, _) = run_config(&c).unwrap();
    c.adversary.route_selection = "uniform".into();
    let (uniform, _) = run_config(&c).unwrap();
    let (f, u) = (&family.routes, &uniform.routes);
    assert!(f.corrupt_hops.iter().sum::<u64>() > 5_000, "{f:?}");
    assert_eq!(f.corrupt_hops[2..], [0, 0], "{f:?}");
    assert_eq!(f.fully_hostile, 0.0);
    assert!(f.any_hostile > 0.4, "{f:?}");
    assert!(u.fully_hostile > 0.002, "uniform baseline: {u:?}");
    assert!(
        family.entropy_bits.mean > uniform.entropy_bits.mean,
        "family {} vs uniform {}",
        family.entropy_bits.mean,
        uniform.entropy_bits.mean
    );
}

/// A layer whose every relay the hostile operator runs leaves no family-diverse route: the
/// run is refused, as the network itself would refuse to route.
#[test]
fn family_selection_refuses_a_layer_held_by_one_operator() {
    let mut c = config(SMALL);
    c.adversary.corrupt_fraction = 0.0;
    c.adversary.corrupt_relays = vec![3, 4, 5];
    c.adversary.hostile_operators = 1;
    let err = run_config(&c).unwrap_err().to_string();
    assert!(err.contains("layer 1"), "{err}");
    c.adversary.route_selection = "uniform".into();
    run_config(&c).unwrap();
    c.adversary.route_selection = "shortest".into();
    assert!(run_config(&c).is_err());
}

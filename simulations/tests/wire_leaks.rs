//! The wire leaks of issue 16, played as attacks on the production client and gateway
//! cores in faithful mode, each against the fix and against the control
//! (`ClientConfig::legacy_leaks`, gateways by subnet), which must show the attack working.
//!
//! Workload: 16 clients in 4 subnets, 2 gateways; 6 senders at gateway 0 each send to their
//! own recipient at gateway 1 in on/off bursts (Poisson 0.8 msg/s for 4 s, then 4 s silent,
//! all in step) for 160 s; λP = 2, λL = λD = 0.25 per client per second.
//!
//! - Leak 2 (global passive observer): per 4 s window, the frames arriving at each gateway
//!   from the last mix layer (forward packets, cover, loops, drops and SURB replies alike,
//!   all 2400 bytes); statistic: gateway 1's count minus gateway 0's. Scored by the ROC AUC of
//!   burst windows against silent ones.
//! - Leak 3 (the senders' own gateway): per sender and window, forward packets minus SURB
//!   replies arriving at the sender's mailbox, against the truth (incoming − outgoing real
//!   packets, outgoing counted at the λP slot that sent them). Scored by Pearson's r.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::OnceLock;

use shoal_sim::attacks::organisation::nmi;
use shoal_sim::faithful::{self, Assignment, Bursts, ClientRun, Observed, Scenario};
use shoal_sim::model::ModelConfig;
use shoal_sim::observe::score::{lagged, residual};

const CONFIG: &str = r#"
[sim]
mode = "faithful"
[network]
layers = 3
width = 2
mean_hop_delay_ms = 20
link_delay_ms = 5
gateways = 2
[traffic]
clients = 16
rate_per_client = 0.5
loop_rate = 0.25
drop_rate = 0.25
[faithful]
lambda_p = 2.0
commit_latency_ms = 5
pull_interval_ms = 1000
[run]
duration_s = 160
warmup_s = 0
max_drain_s = 2
seed = 16
"#;

const SUBNETS: u32 = 4;
const WINDOW_S: f64 = 4.0;

fn bursts() -> Bursts {
    Bursts {
        pairs: 6,
        period_s: WINDOW_S,
        rate_on: 0.8,
    }
}

struct Run {
    run: ClientRun,
    seen: Observed,
}

fn run(legacy: bool) -> Run {
    let config = ModelConfig::from_toml_str(CONFIG).unwrap();
    let clients = config.traffic.clients;
    let assignment = if legacy {
        Assignment::BySubnet((0..clients).map(|i| i % SUBNETS).collect())
    } else {
        Assignment::ByKey
    };
    let scenario = Scenario {
        assignment,
        bursts: Some(bursts()),
        sends: None,
        legacy_leaks: legacy,
        observe: true,
    };
    let (run, seen) = faithful::run_scenario(&config, &scenario).unwrap();
    Run { run, seen }
}

/// Both runs, made once and shared by the tests (each takes several seconds).
fn runs() -> &'static (Run, Run) {
    static RUNS: OnceLock<(Run, Run)> = OnceLock::new();
    RUNS.get_or_init(|| {
        std::thread::scope(|s| {
            let fixed = s.spawn(|| run(false));
            let legacy = run(true);
            (fixed.join().unwrap(), legacy)
        })
    })
}

fn windows() -> usize {
    (ModelConfig::from_toml_str(CONFIG).unwrap().run.duration_s / WINDOW_S) as usize
}

fn window_of(t: f64) -> Option<usize> {
    let w = (t / WINDOW_S).floor() as usize;
    (w < windows()).then_some(w)
}

/// Whether the senders are bursting in window `w`.
fn burst(w: usize) -> bool {
    bursts().on_at((w as f64 + 0.5) * WINDOW_S)
}

/// ROC AUC of `x` for burst windows against silent ones (ties count half), and its
/// Hanley–McNeil standard error.
fn auc(x: &[f64]) -> (f64, f64) {
    let (mut on, mut off) = (Vec::new(), Vec::new());
    for (w, v) in x.iter().enumerate() {
        if burst(w) {
            on.push(*v);
        } else {
            off.push(*v);
        }
    }
    auc_of(&on, &off)
}

fn auc_of(on: &[f64], off: &[f64]) -> (f64, f64) {
    let mut wins = 0.0;
    for a in on {
        for b in off {
            wins += if a > b {
                1.0
            } else if a == b {
                0.5
            } else {
                0.0
            };
        }
    }
    let (m, n) = (on.len() as f64, off.len() as f64);
    let a = wins / (m * n);
    let q1 = a / (2.0 - a);
    let q2 = 2.0 * a * a / (1.0 + a);
    let var = (a * (1.0 - a) + (m - 1.0) * (q1 - a * a) + (n - 1.0) * (q2 - a * a)) / (m * n);
    (a, var.max(0.0).sqrt())
}

fn pearson(x: &[f64], y: &[f64]) -> f64 {
    let n = x.len() as f64;
    let (mx, my) = (x.iter().sum::<f64>() / n, y.iter().sum::<f64>() / n);
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (a, b) in x.iter().zip(y) {
        sxy += (a - mx) * (b - my);
        sxx += (a - mx) * (a - mx);
        syy += (b - my) * (b - my);
    }
    sxy / (sxx * syy).sqrt()
}

/// 95 % confidence interval of a correlation from `n` points (Fisher's z).
fn fisher_ci(r: f64, n: usize) -> (f64, f64) {
    let z = r.atanh();
    let h = 1.96 / ((n as f64) - 3.0).sqrt();
    ((z - h).tanh(), (z + h).tanh())
}

/// Frames of `times` per window.
fn per_window(times: impl Iterator<Item = f64>) -> Vec<f64> {
    let mut x = vec![0.0; windows()];
    for t in times {
        if let Some(w) = window_of(t) {
            x[w] += 1.0;
        }
    }
    x
}

/// The global observer's statistic per window: frames into gateway 1 (the recipients')
/// minus frames into gateway 0 (the senders') from the last layer, each less what the
/// uploads of its own clients and of everyone explain (least squares on this window's
/// and the last one's; `observe::score::residual`): the cover a client sends comes back
/// to the gateways in a way the client links predict, and taking it out leaves what
/// real traffic moved.
fn inbound_difference(seen: &Observed) -> Vec<f64> {
    let uploads = |g: Option<usize>| {
        per_window(
            seen.client_up
                .iter()
                .enumerate()
                .filter(|(c, _)| g.is_none_or(|g| seen.gateway_of[*c] == g))
                .flat_map(|(_, u)| u.iter().copied()),
        )
    };
    let all = uploads(None);
    let unexplained = |g: usize| {
        let own = uploads(Some(g));
        let inbound = per_window(
            seen.gateway_inbound
                .iter()
                .filter(|x| x.1 == g)
                .map(|x| x.0),
        );
        residual(
            &inbound,
            &[own.clone(), lagged(&own, 1), all.clone(), lagged(&all, 1)],
        )
    };
    let (g0, g1) = (unexplained(0), unexplained(1));
    g1.iter().zip(&g0).map(|(a, b)| a - b).collect()
}

/// Slow (two 160 s faithful runs: ~80–100 s on a loaded 2-core machine): run with
/// `--ignored`. Measured 2026-12-08 with the residual statistic: control AUC 0.835 ±
/// 0.128, fixed 0.475 ± 0.181. (With raw inbound counts the control reached only 0.60 ±
/// 0.18: the cover a client sends comes back to its own gateway and drowned the shift.)
/// The control must be clear of chance and at least 0.8; 0.9 is not reached with 40
/// windows of this workload.
#[test]
#[ignore = "slow (~100 s): run with --ignored"]
fn leak2_gateway_inbound_volume_does_not_follow_bursts() {
    let (fixed, legacy) = runs();
    let mut report = Vec::new();
    for (name, r) in [("fixed", fixed), ("legacy", legacy)] {
        let (a, se) = auc(&inbound_difference(&r.seen));
        let s = &r.run.summary;
        report.push((name, a, se));
        eprintln!(
            "leak 2, {name}: AUC {a:.3} ± {:.3} (95 %), {} real messages, {} frames into \
             gateways from L3; slot wait mean {:.2} s p95 {:.2} s; e2e mean {:.2} s",
            1.96 * se,
            s.traffic.messages,
            r.seen.gateway_inbound.len(),
            s.latency_parts.slot_wait_s.dist.mean,
            s.latency_parts.slot_wait_s.dist.p95,
            s.latency_s.mean,
        );
        // The workload really ran: every message pulled, and the pairs cross gateways.
        assert!(
            s.traffic.measured_delivered * 10 >= s.traffic.measured * 9,
            "{name}"
        );
        assert!(s.traffic.messages > 200, "{name}: {}", s.traffic.messages);
        for &(a, b) in &r.seen.pairs {
            assert_eq!(
                (r.seen.gateway_of[a as usize], r.seen.gateway_of[b as usize]),
                (0, 1)
            );
        }
    }
    let (_, a_fixed, se_fixed) = report[0];
    let (_, a_legacy, se_legacy) = report[1];
    assert!(
        a_legacy >= 0.8 && a_legacy - 1.96 * se_legacy > 0.5,
        "the control must find the bursts: {a_legacy} ± {}",
        1.96 * se_legacy
    );
    assert!(a_fixed <= 0.6, "fixed AUC {a_fixed}");
    assert!(
        (a_fixed - 1.96 * se_fixed..=a_fixed + 1.96 * se_fixed).contains(&0.5),
        "fixed AUC {a_fixed} ± {}",
        1.96 * se_fixed
    );
}

/// Slow (shares leak 2's two faithful runs, ~100 s on a loaded 2-core machine): run with
/// `--ignored`. Measured 2026-12-08: control r = 0.902 (burst AUC 0.824 ± 0.053), fixed
/// burst AUC 0.525 ± 0.073, r = 0.226 (the public slot count, see below).
#[test]
#[ignore = "slow (~100 s): run with --ignored"]
fn leak3_exit_gateway_counts_do_not_reveal_outgoing_traffic() {
    let (fixed, legacy) = runs();
    let mut rs = Vec::new();
    for (name, r) in [("fixed", fixed), ("legacy", legacy)] {
        let senders: Vec<u32> = r.seen.pairs.iter().map(|p| p.0).collect();
        let slot = |c: u32| senders.iter().position(|s| *s == c);
        let n = windows();
        let mut est = vec![0.0; senders.len() * n];
        let mut truth = vec![0.0; senders.len() * n];
        for &(t, c, forward) in &r.seen.mailbox_arrivals {
            if let (Some(i), Some(w)) = (slot(c), window_of(t)) {
                est[i * n + w] += if forward { 1.0 } else { -1.0 };
            }
        }
        for row in &r.run.rows {
            if let Some(w) = row.slot_s.and_then(window_of) {
                if let Some(i) = slot(row.sender) {
                    truth[i * n + w] -= 1.0;
                }
                if let Some(i) = slot(row.receiver) {
                    truth[i * n + w] += 1.0;
                }
            }
        }
        let r_ = pearson(&est, &truth);
        let ci = fisher_ci(r_, est.len());
        // The attack proper: does the gateway's count tell burst windows from silent
        // ones? AUC of replies − forwards over sender-windows.
        let (mut on, mut off) = (Vec::new(), Vec::new());
        for (k, e) in est.iter().enumerate() {
            if burst(k % n) {
                on.push(-e);
            } else {
                off.push(-e);
            }
        }
        let (a, se) = auc_of(&on, &off);
        eprintln!(
            "leak 3, {name}: burst AUC {a:.3} ± {:.3} (95 %); r(forwards − replies, \
             incoming − outgoing) = {r_:.3}, 95 % CI [{:.3}, {:.3}], {} sender-windows",
            1.96 * se,
            ci.0,
            ci.1,
            est.len()
        );
        rs.push((r_, a, se));
    }
    let (r_fixed, a_fixed, se_fixed) = rs[0];
    let (r_legacy, a_legacy, _) = rs[1];
    assert!(
        r_legacy >= 0.8,
        "the control must see outgoing traffic: {r_legacy}"
    );
    assert!(
        a_legacy >= 0.8,
        "the control must find the bursts: {a_legacy}"
    );
    assert!(a_fixed <= 0.6, "fixed AUC {a_fixed}");
    assert!(
        (a_fixed - 1.96 * se_fixed..=a_fixed + 1.96 * se_fixed).contains(&0.5),
        "fixed AUC {a_fixed} ± {}",
        1.96 * se_fixed
    );
    // What is left of the correlation is the public slot count: a client can send real
    // packets only in λP slots drawn for the recipient's gateway, so in a window with
    // more slots it both gets more acks and sends more. A link observer counts those
    // slots too; the counts say nothing about bursts (the AUC above).
    assert!(r_fixed < 0.35, "fixed r {r_fixed}");
}

/// Leak 1: which gateway a member uses says nothing about its subnet. 2000 members in 4
/// subnets over 3 gateways: NMI(subnet, gateway) is at chance with the rendezvous rule and
/// high with gateways by subnet (subnet s at gateway s mod 3, as the old demo did).
#[test]
fn leak1_gateway_assignment_is_independent_of_subnet() {
    use sha2::{Digest, Sha256};
    let gateways: Vec<[u8; 32]> = (0..3u8).map(|i| Sha256::digest([i]).into()).collect();
    let members = 2000u32;
    let subnet: Vec<u32> = (0..members).map(|i| i % SUBNETS).collect();
    let by_key: Vec<u32> = (0..members)
        .map(|i| {
            let key: [u8; 32] = Sha256::digest(i.to_be_bytes()).into();
            let g = shoal_topology::gateway_for_member(&gateways, &key).unwrap();
            gateways.iter().position(|x| *x == g).unwrap() as u32
        })
        .collect();
    let by_subnet: Vec<u32> = subnet.iter().map(|s| s % 3).collect();
    let fixed = nmi(&subnet, &by_key);
    let legacy = nmi(&subnet, &by_subnet);
    // Chance: the same NMI with the gateways shuffled against the subnets.
    let mut shuffled = by_key.clone();
    shuffled.rotate_left(1);
    let chance = nmi(&subnet, &shuffled);
    eprintln!(
        "leak 1: NMI(subnet, gateway) by key {fixed:.4} (chance {chance:.4}), by subnet {legacy:.3}"
    );
    assert!(fixed < 0.01, "{fixed}");
    assert!(legacy > 0.8, "{legacy}");
}

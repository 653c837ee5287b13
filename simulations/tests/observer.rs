//! `shoal observe`'s attacks on faithful-mode traces (production client, relay and gateway
//! cores in virtual time): the same code as on a loopback capture, run on the current
//! design and on the control (`legacy_leaks`, a gateway per subnet), with the same
//! conversations as `shoal observe --testnet` (`observe::Workload`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use shoal_sim::faithful::{self, Assignment, Scenario};
use shoal_sim::model::ModelConfig;
use shoal_sim::observe::{AttackResult, Options, Report, Workload, sim};

const SUBNETS: u32 = 4;

fn config(clients: u32, seconds: f64, seed: u64) -> ModelConfig {
    ModelConfig::from_toml_str(&format!(
        r#"
[sim]
mode = "faithful"
[network]
layers = 3
width = 2
mean_hop_delay_ms = 50
link_delay_ms = 1
gateways = 4
[traffic]
clients = {clients}
rate_per_client = 0.5
loop_rate = 0.5
drop_rate = 0.5
[faithful]
lambda_p = 2.0
commit_latency_ms = 1
pull_interval_ms = 1000
[run]
duration_s = {seconds}
warmup_s = 0
max_drain_s = 2
seed = {seed}
"#
    ))
    .unwrap()
}

/// One run of the experiment: `legacy` is the control.
fn experiment(legacy: bool, clients: u32, seconds: f64, seed: u64) -> Report {
    let cfg = config(clients, seconds, seed);
    let mut work = Workload::standard(clients, SUBNETS, seconds, seed);
    if let Ok(r) = std::env::var("OBS_RATE") {
        work.rate = r.parse().unwrap();
    }
    if let Ok(r) = std::env::var("OBS_BURST") {
        work.burst_s = r.parse().unwrap();
    }
    let scenario = Scenario {
        assignment: if legacy {
            Assignment::BySubnet(work.subnet_of.clone())
        } else {
            Assignment::ByKey
        },
        bursts: None,
        sends: Some(work.schedule()),
        legacy_leaks: legacy,
        observe: true,
    };
    let (run, seen) = faithful::run_scenario(&cfg, &scenario).unwrap();
    let (view, truth) = sim::view_and_truth(&seen, &run.rows, &work.subnet_of, &work.federated);
    let mut opts = Options::default();
    if let Ok(w) = std::env::var("OBS_GW_WINDOW") {
        opts.gateway_window_s = w.parse().unwrap();
    }
    Report::build(&view, &truth, &opts)
}

fn get<'a>(r: &'a Report, name: &str, metric: &str) -> &'a AttackResult {
    r.attacks
        .iter()
        .find(|a| a.name == name && a.metric == metric)
        .unwrap_or_else(|| panic!("no {name}/{metric} in {}", r.text()))
}

/// Both runs of the experiment, side by side (each is a faithful run of its own).
fn both(clients: u32, seconds: f64, seed: u64) -> (Report, Report) {
    let (control, current) = std::thread::scope(|s| {
        let c = s.spawn(|| experiment(true, clients, seconds, seed));
        (c.join().unwrap(), experiment(false, clients, seconds, seed))
    });
    let current = current.with_control(&control);
    eprintln!(
        "== control ==\n{}== current ==\n{}",
        control.text(),
        current.text()
    );
    (control, current)
}

/// What the control shows and the current design must not, on a run of `seconds`.
fn check(control: &Report, current: &Report) {
    // Power: a gateway per subnet gives membership away; gateways whose volumes move
    // against each other give federation away; an ack sent once real mail is saved
    // gives receipt away.
    let m = get(control, "gateway_membership", "nmi");
    assert!(m.value >= 0.5 && m.leaks(), "{m:?}");
    let f = get(control, "federation_pairs", "auc");
    assert!(f.value >= 0.9 && f.leaks(), "{f:?}");
    let t = get(control, "control_timing", "auc");
    assert!(t.leaks(), "{t:?}");
    // The current design: every attack's interval covers chance.
    for a in &current.attacks {
        assert!(!a.leaks(), "{a:?}");
    }
    let f = get(current, "federation_pairs", "auc");
    assert!(
        f.value <= 0.6 && f.ci_low <= 0.5 && 0.5 <= f.ci_high,
        "{f:?}"
    );
}

/// A minute of 12 clients, as the CI capture test runs: membership, federation and
/// receipt timing show on the control and nothing shows on the current design. With 12
/// clients on 4 gateways by key, NMI's chance level is about 0.38, so the membership
/// check on the current design is that its interval covers chance (the longer run
/// below checks NMI ≤ 0.1 with more clients).
#[test]
fn observer_on_faithful_traces_finds_the_control_leaks_and_nothing_today() {
    let (control, current) = both(12, 60.0, 7);
    check(&control, &current);
}

/// Slow (two 150 s runs: a minute or more on a loaded 2-core machine): run with
/// `--ignored`. Adds the gateway-volume attacks' power, which a minute of traffic is too
/// short to show reliably. Measured 2026-12-08: control 0.70 / 0.78 / 0.75 (in, out,
/// both), current 0.54 / 0.53 / 0.54. Not scaled up: with 24 clients (6 per gateway,
/// the same conversations) the control's federation_pairs fell to 0.60 and gateway
/// volume to 0.56–0.66, more cover per gateway drowning the same real flows; the
/// current design's membership NMI there was 0.076 (chance 0.185).
#[test]
#[ignore = "slow: run with --ignored"]
fn observer_on_faithful_traces_longer_run() {
    let (control, current) = both(12, 150.0, 7);
    check(&control, &current);
    for name in ["gateway_volume_in", "gateway_volume_out", "gateway_volume"] {
        let g = get(&control, name, "auc");
        assert!(g.value >= 0.65 && g.leaks(), "{g:?}");
        let g = get(&current, name, "auc");
        assert!(g.value <= 0.6, "{g:?}");
    }
}

/// Prints both reports for any size: `OBS_CLIENTS`, `OBS_SECONDS`, `OBS_RATE`,
/// `OBS_BURST`, `OBS_GW_WINDOW`.
#[test]
#[ignore = "diagnostic"]
fn observer_on_faithful_traces_report() {
    let seconds: f64 = std::env::var("OBS_SECONDS").map_or(150.0, |s| s.parse().unwrap());
    let clients: u32 = std::env::var("OBS_CLIENTS").map_or(12, |s| s.parse().unwrap());
    both(clients, seconds, 7);
}

/// Prints the report of a capture kept by `shoal observe --testnet --keep DIR`:
/// `OBS_DIR=DIR/control OBS_FRONTS=front=link,front=link,...`.
#[test]
#[ignore = "diagnostic"]
fn observer_on_a_kept_capture() {
    use shoal_sim::observe::{Knowledge, Truth, View, read_pcap};
    let dir = std::path::PathBuf::from(std::env::var("OBS_DIR").unwrap());
    let mut k = Knowledge::default();
    k.add_document(&std::fs::read(dir.join("directory.json")).unwrap())
        .unwrap();
    for f in std::env::var("OBS_FRONTS").unwrap().split(',') {
        let (a, b) = f.split_once('=').unwrap();
        k.add_front(a.parse().unwrap(), Some(b.parse().unwrap()));
    }
    let truth = Truth::from_json(&std::fs::read(dir.join("truth.json")).unwrap()).unwrap();
    let file = std::fs::File::open(dir.join("capture.pcap")).unwrap();
    let view = View::build(&read_pcap(std::io::BufReader::new(file)).unwrap(), &k);
    let mut opts = Options::default();
    if let Ok(w) = std::env::var("OBS_GW_WINDOW") {
        opts.gateway_window_s = w.parse().unwrap();
    }
    eprintln!("{}", Report::build(&view, &truth, &opts).text());
}

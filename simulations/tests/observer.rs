//! `shoal observe`'s attacks on faithful-mode traces (production client, relay and gateway
//! cores in virtual time): the same code as on a loopback capture, run on the current
//! design and on the control (`legacy_leaks`, a gateway per subnet), with the same
//! conversations as `shoal observe --testnet` (`observe::Workload`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use shoal_sim::faithful::{self, Assignment, Scenario};
use shoal_sim::model::ModelConfig;
use shoal_sim::observe::{Options, Report, Workload, sim};

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

#[test]
#[ignore = "diagnostic"]
fn observer_on_faithful_traces_report() {
    let seconds: f64 = std::env::var("OBS_SECONDS").map_or(150.0, |s| s.parse().unwrap());
    let clients: u32 = std::env::var("OBS_CLIENTS").map_or(12, |s| s.parse().unwrap());
    let (control, current) = std::thread::scope(|s| {
        let c = s.spawn(|| experiment(true, clients, seconds, 7));
        (c.join().unwrap(), experiment(false, clients, seconds, 7))
    });
    eprintln!("== control ==\n{}", control.text());
    eprintln!("== current ==\n{}", current.with_control(&control).text());
}

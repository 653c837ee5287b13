//! `shoal bench ...`: benchmarks that report ratios against ceilings measured in the same run.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use shoal_bench::relay::{RelayBenchOptions, RelayReport};

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    which: BenchCommand,
}

#[derive(Subcommand, Debug)]
enum BenchCommand {
    /// One relay process forwarding over QUIC against the raw Sphinx unwrap ceiling.
    Relay {
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
        /// Seconds of the saturation phase.
        #[arg(long, default_value_t = 4)]
        saturation_secs: u64,
        /// Seconds of each paced phase (50 % and 80 % load).
        #[arg(long, default_value_t = 5)]
        paced_secs: u64,
        /// Mean per-hop delay the relay applies, in milliseconds.
        #[arg(long, default_value_t = 50.0)]
        mean_delay_ms: f64,
        /// Keep the processes' configs and logs here instead of a temp dir.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    match args.which {
        BenchCommand::Relay {
            json,
            saturation_secs,
            paced_secs,
            mean_delay_ms,
            dir,
        } => {
            let opts = RelayBenchOptions {
                saturation: Duration::from_secs(saturation_secs),
                paced: Duration::from_secs(paced_secs),
                mean_hop_delay_ms: mean_delay_ms,
                ..RelayBenchOptions::default()
            };
            let tmp;
            let dir = match dir {
                Some(d) => d,
                None => {
                    tmp = tempfile::tempdir().context("cannot create a temp dir")?;
                    tmp.path().to_path_buf()
                }
            };
            let shoal = shoal_bench::testnet::shoal_binary()?;
            let report = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?
                .block_on(shoal_bench::relay::run(&shoal, &dir, &opts))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print_relay(&report);
            }
            Ok(())
        }
    }
}

fn print_relay(r: &RelayReport) {
    println!(
        "relay benchmark ({} cores, mean hop delay {} ms)",
        r.cores, r.mean_hop_delay_ms
    );
    println!(
        "  ceiling (raw unwrap, all cores)  {:>10.0} /s",
        r.ceiling_unwraps_per_sec
    );
    println!(
        "  ceiling (raw unwrap, one core)   {:>10.0} /s",
        r.single_core_unwraps_per_sec
    );
    println!(
        "  relay forwarding                 {:>10.0} /s",
        r.relay_packets_per_sec
    );
    println!("  ratio                            {:>10.3}", r.ratio);
    println!(
        "  cpu_efficiency                   {:>10.3}",
        r.cpu_efficiency
    );
    println!(
        "  lost at 80% load                 {:>10}  (offered {}, arrived {})",
        r.lost, r.load_80.offered, r.load_80.arrived
    );
    println!(
        "  added latency at 50% load        p50 {:.0} us, p99 {:.0} us",
        r.added_latency_us.p50, r.added_latency_us.p99
    );
}

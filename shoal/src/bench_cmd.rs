//! `shoal bench ...`: benchmarks that report ratios against ceilings measured in the same run.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use shoal_bench::client::{ClientBenchOptions, ClientReport};
use shoal_bench::e2e::{E2eOptions, E2eReport};
use shoal_bench::gateway::{GatewayBenchOptions, GatewayReport};
use shoal_bench::relay::{RelayBenchOptions, RelayReport};
use shoal_bench::soak::{SoakOptions, SoakReport};

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
        /// Seconds of the overload probe (1.3 × the all-core ceiling offered).
        #[arg(long, default_value_t = 2)]
        probe_secs: u64,
        /// Seconds of each sustained saturation round (rising multiples of the probe's rate).
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
    /// Client packet building against the raw Sphinx build rate, and the cost of
    /// sending to groups of 1..256 members (see `shoal_bench::client`).
    Client {
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
        /// Packets built in each of the raw and the client measurement.
        #[arg(long, default_value_t = 600)]
        packets: usize,
        /// Largest group (sizes are powers of two up to it).
        #[arg(long, default_value_t = 256)]
        max_group: usize,
    },
    /// Durable mailbox ingest and pull+ack of the real mailbox core and redb store,
    /// while the process also mixes at half its unwrap capacity (see
    /// `shoal_bench::gateway`).
    Gateway {
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
        /// Seconds of each measured phase.
        #[arg(long, default_value_t = 4)]
        phase_secs: u64,
        /// Share of the unwrap capacity spent mixing during the phases.
        #[arg(long, default_value_t = 0.5)]
        mix_fraction: f64,
        /// Keep the store here instead of in a temp dir.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// One relay process at a steady load for `--minutes`, its RSS sampled: memory must
    /// stay flat after the warm-up (see `shoal_bench::soak`).
    Soak {
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
        /// Length of the soak.
        #[arg(long, default_value_t = 60.0)]
        minutes: f64,
        /// Packets per second offered to the relay.
        #[arg(long, default_value_t = 500.0)]
        rate: f64,
        /// Epoch length of the test network (keys and replay generations rotate).
        #[arg(long, default_value_t = 30)]
        epoch_secs: u64,
        /// Keep the processes' configs and logs here instead of a temp dir.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// A loopback network at the default parameters: the CPU and memory of one idle
    /// `shoal client run` process, then end-to-end latency and goodput of in-process
    /// clients (see `shoal_bench::e2e`).
    E2e {
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
        /// Seconds the client process idles (measured after it has a directory).
        #[arg(long, default_value_t = 30)]
        idle_secs: u64,
        /// Relays per mix layer (3 layers).
        #[arg(long, default_value_t = 1)]
        relays_per_layer: usize,
        /// In-process clients of the latency phase.
        #[arg(long, default_value_t = 4)]
        clients: usize,
        /// Messages each of them sends, one per second.
        #[arg(long, default_value_t = 15)]
        messages: usize,
        /// Saturated in-process clients of the goodput phase (0 skips it).
        #[arg(long, default_value_t = 8)]
        goodput_clients: usize,
        /// Seconds of the goodput phase's measured window.
        #[arg(long, default_value_t = 60)]
        goodput_window_secs: u64,
        /// Keep the processes' configs, stores and logs here instead of a temp dir.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    match args.which {
        BenchCommand::Relay {
            json,
            probe_secs,
            saturation_secs,
            paced_secs,
            mean_delay_ms,
            dir,
        } => {
            let opts = RelayBenchOptions {
                probe: Duration::from_secs(probe_secs),
                saturation: Duration::from_secs(saturation_secs),
                paced: Duration::from_secs(paced_secs),
                mean_hop_delay_ms: mean_delay_ms,
                ..RelayBenchOptions::default()
            };
            run_bench(dir, json, print_relay, async |shoal, dir| {
                shoal_bench::relay::run(shoal, dir, &opts).await
            })
        }
        BenchCommand::Client {
            json,
            packets,
            max_group,
        } => {
            let opts = ClientBenchOptions {
                packets,
                group_sizes: std::iter::successors(Some(1usize), |n| Some(n * 2))
                    .take_while(|n| *n <= max_group.max(1))
                    .collect(),
                ..ClientBenchOptions::default()
            };
            run_bench(None, json, print_client, async |_, _| {
                tokio::task::spawn_blocking(move || shoal_bench::client::run(&opts)).await?
            })
        }
        BenchCommand::Gateway {
            json,
            phase_secs,
            mix_fraction,
            dir,
        } => {
            let opts = GatewayBenchOptions {
                phase: Duration::from_secs(phase_secs),
                mix_fraction,
                ..GatewayBenchOptions::default()
            };
            run_bench(dir, json, print_gateway, async |_, dir| {
                let dir = dir.to_path_buf();
                tokio::task::spawn_blocking(move || shoal_bench::gateway::run(&dir, &opts)).await?
            })
        }
        BenchCommand::Soak {
            json,
            minutes,
            rate,
            epoch_secs,
            dir,
        } => {
            let opts = SoakOptions {
                rate,
                epoch_secs,
                key_grace_secs: epoch_secs,
                ..SoakOptions::minutes(minutes)
            };
            run_bench(dir, json, print_soak, async |shoal, dir| {
                shoal_bench::soak::run(shoal, dir, &opts).await
            })
        }
        BenchCommand::E2e {
            json,
            idle_secs,
            relays_per_layer,
            clients,
            messages,
            goodput_clients,
            goodput_window_secs,
            dir,
        } => {
            let opts = E2eOptions {
                idle: Duration::from_secs(idle_secs),
                relays_per_layer,
                clients,
                messages,
                goodput_clients,
                goodput_window: Duration::from_secs(goodput_window_secs),
                ..E2eOptions::default()
            };
            run_bench(dir, json, print_e2e, async |shoal, dir| {
                shoal_bench::e2e::run(shoal, dir, &opts).await
            })
        }
    }
}

fn print_client(r: &ClientReport) {
    println!("client benchmark (one thread, CPU time)");
    println!(
        "  raw sphinx-packet build (5-hop packet + 4-hop SURB)  {:>8.0} /CPU-s  ({:.0} us)",
        r.raw_packets_per_cpu_sec, r.raw_build_us
    );
    println!(
        "  Shoal's builder (same packet + SURB)                 {:>8.0} /CPU-s  ({:.0} us)  {:.2} x the crate",
        r.shoal_packets_per_cpu_sec, r.shoal_build_us, r.build_speedup_vs_sphinx_packet
    );
    println!(
        "  client real packet (seal + SURB-ack + packet)       {:>8.0} /CPU-s  ({:.0} us)",
        r.client_packets_per_cpu_sec, r.client_build_us
    );
    println!(
        "  ratio {:.3} (without the {:.0} us end-to-end seal: {:.3})",
        r.ratio, r.seal_us, r.ratio_excluding_seal
    );
    println!("  members  recipients  MLS ms  packets ms  total ms  packets/send");
    for g in &r.groups {
        println!(
            "  {:>7}  {:>10}  {:>6.2}  {:>10.2}  {:>8.2}  {:>12.1}",
            g.members,
            g.recipients,
            g.mls_cpu_ms,
            g.packets_cpu_ms,
            g.cpu_ms_per_send,
            g.packets_per_send
        );
    }
    println!(
        "  fit: {:.3} ms + {:.3} ms per recipient; worst marginal / fitted {:.2}; packets per recipient ≤ {:.2}",
        r.group_fixed_cpu_ms,
        r.group_per_recipient_cpu_ms,
        r.group_worst_superlinear_ratio,
        r.group_packets_per_recipient_max
    );
}

fn print_gateway(r: &GatewayReport) {
    println!(
        "gateway benchmark ({} cores; mixing at {:.0} % of {:.0} unwraps/s during both phases)",
        r.cores,
        r.mix_fraction * 100.0,
        r.unwrap_capacity_per_sec
    );
    println!(
        "  commit ceiling (1 item per fsync)  {:>9.0} /s",
        r.commit_ceiling_per_sec
    );
    for (name, p, target, ratio) in [
        (
            "ingest (durable + ack built)",
            &r.ingest,
            r.ingest_target_per_sec,
            r.ingest_ratio_to_target,
        ),
        (
            "pull + ack (durable delete)",
            &r.pull_ack,
            r.pull_ack_target_per_sec,
            r.pull_ack_ratio_to_target,
        ),
    ] {
        println!(
            "  {name:<34} {:>9.0} /s  ({:.2} × target {:.0}; {:.0} items per commit; mixing {:.0}/s; {:.2} cores busy)",
            p.items_per_sec,
            ratio,
            target,
            p.items_per_commit,
            p.mix_unwraps_per_sec,
            p.cpu_cores_busy
        );
    }
}

fn print_soak(r: &SoakReport) {
    println!(
        "relay soak: {:.0} s at {:.0} packets/s, {} s epochs ({} crossed)",
        r.duration_secs, r.rate_per_sec, r.epoch_secs, r.epochs_crossed
    );
    println!(
        "  offered {}, arrived {}, lost {}; relay CPU {:.1} s",
        r.offered, r.arrived, r.lost, r.relay_cpu_seconds
    );
    println!(
        "  RSS after {:.0} s warm-up: baseline {} KiB, max {} KiB, end {} KiB (growth {} KiB, bound {} KiB)",
        r.warmup_secs,
        r.rss_baseline_kib,
        r.rss_max_after_warmup_kib,
        r.rss_end_kib,
        r.growth_after_warmup_kib,
        r.bound_kib
    );
    println!(
        "  slope {:.1} KiB/min; flat: {}",
        r.slope_kib_per_min, r.flat
    );
}

fn print_e2e(r: &E2eReport) {
    println!(
        "end-to-end benchmark ({} relays, {} gateway; λP {} λL {} λD {} /s, mean hop delay {} ms, pull every {} ms)",
        r.relays,
        r.gateways,
        r.lambda_p,
        r.lambda_l,
        r.lambda_d,
        r.mean_hop_delay_ms,
        r.pull_interval_ms
    );
    println!(
        "  idle client process             {:.3} % of one core, {:.1} MiB RSS (over {:.0} s)",
        r.idle_client_cpu_percent_of_one_core, r.idle_client_rss_mb, r.idle_secs
    );
    println!(
        "  delivered                       {} of {} ({} duplicates), {} clients, {} B bodies",
        r.delivered, r.sent, r.duplicates, r.clients, r.message_bytes
    );
    println!(
        "  latency (send → stored)         p50 {:.0} ms, p99 {:.0} ms, mean {:.0} ms, max {:.0} ms",
        r.latency_ms.p50, r.latency_ms.p99, r.latency_ms.mean, r.latency_ms.max
    );
    println!(
        "  expected mixing delay           {:.0} ms (mean latency − it: {:.0} ms; model: {:.0} ms slot wait + {:.0} ms pull wait)",
        r.expected_mixing_delay_ms,
        r.mean_latency_minus_expected_mixing_ms,
        r.expected_slot_wait_ms,
        r.expected_pull_wait_ms
    );
    println!(
        "  goodput                         {:.2} msg/s, {:.0} B/s (offered {:.1} msg/s); real share of client packets {:.3}",
        r.goodput_messages_per_sec,
        r.goodput_bytes_per_sec,
        r.offered_messages_per_sec,
        r.real_packet_fraction
    );
    let g = &r.saturated;
    if g.goodput_clients > 0 {
        println!(
            "  saturated goodput               {:.1} B/s per client of λP × P = {:.1} B/s (P = {} B): ratio {:.3} (Poisson s.e. {:.3}); {} clients over {:.0} s",
            g.goodput_saturated_bytes_per_sec,
            g.goodput_nominal_bytes_per_sec,
            g.goodput_payload_bytes_per_fragment,
            g.goodput_ratio_nominal,
            g.goodput_poisson_std_error,
            g.goodput_clients,
            g.goodput_window_secs
        );
        println!(
            "  saturated slots                 {} (expected {:.0}): {} real ({} retransmissions), {} cover; {} new fragments delivered = {:.3} of slots",
            g.goodput_slots,
            g.goodput_expected_slots,
            g.goodput_real_slots,
            g.goodput_retransmissions,
            g.goodput_cover_slots,
            g.goodput_first_sends_delivered,
            g.goodput_ratio_slots
        );
    }
}

/// Runs one benchmark with the `shoal` binary in `dir` (a temp dir if none) and prints
/// its report as JSON or as a table.
fn run_bench<R: serde::Serialize>(
    dir: Option<PathBuf>,
    json: bool,
    print: fn(&R),
    bench: impl AsyncFnOnce(&Path, &Path) -> anyhow::Result<R>,
) -> anyhow::Result<()> {
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
        .block_on(bench(&shoal, &dir))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print(&report);
    }
    Ok(())
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
    let [before, after] = &r.ceiling_before_after;
    println!(
        "    (all cores {:.0} before and {:.0} after the round; {:.0} at the start)",
        before.all_cores_unwraps_per_sec,
        after.all_cores_unwraps_per_sec,
        r.start_ceiling.all_cores_unwraps_per_sec
    );
    println!(
        "  relay forwarding, overloaded     {:>10.0} /s  (offered {:.0}, shed {})",
        r.overload_packets_per_sec, r.overload_offered_per_sec, r.saturation_dropped_overload
    );
    println!(
        "  relay forwarding, sustained      {:>10.0} /s  (offered {:.0}, sent {:.0}, shed {})",
        r.relay_packets_per_sec,
        r.saturation_offered_per_sec,
        r.saturation_sent_per_sec,
        r.sustained_dropped_overload
    );
    println!("  ratio                            {:>10.3}", r.ratio);
    println!(
        "  cpu_efficiency                   {:>10.3}  (unwrap workers {:.0} % of the relay's CPU)",
        r.cpu_efficiency,
        100.0 * r.relay_workers_cpu_seconds / r.relay_cpu_seconds.max(1e-9)
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

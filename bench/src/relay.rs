//! `shoal bench relay`: one real `shoal relay run` process forwarding pre-built packets
//! over QUIC on loopback, against the raw unwrap ceiling measured in the same run.
//!
//! Phases, each with fresh packets (the relay's replay filter is on):
//! 1. **ceiling**: raw `sphinx-packet` unwraps/s on one core and on all cores, before
//!    any process starts;
//! 2. **saturation**: an overload probe offers 1.3 × the all-core ceiling for a couple
//!    of seconds (the relay sheds what it cannot carry, counted); then sustained
//!    rounds of a few seconds offer 1.1, 1.25, 1.4 × the probe's forwarded rate,
//!    stopping after the first that sheds. Each round is judged against ceilings
//!    measured just before and just after it (their mean), since the machine's speed
//!    drifts over minutes. The round with the best forwarded rate gives the relay's
//!    capacity C (`relay_packets_per_sec`; `ratio` is C over that round's ceiling),
//!    and its CPU time gives `cpu_efficiency`. The probe's relay also spends CPU
//!    receiving and decrypting the packets it sheds, so the probe's rate is reported
//!    but is not C;
//! 3. the relay is killed (SIGKILL) and restarted from its config, so its latency
//!    histograms start empty (its Sphinx keys are on disk and survive);
//! 4. **50 % load**: offer 0.5 × C paced, read the relay's added-latency quantiles;
//! 5. **80 % load**: offer 0.8 × C paced; `lost` = offered − arrived at the sink.
//!
//! The load generator and the sink are stand-in gateways in this process; they share
//! the machine with the relay, so their CPU time is reported too.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde::Serialize;
use shoal_link::FrameSender;
use shoal_packet::sphinx::{self, Hop};
use shoal_packet::{FRAME_SIZE, Frame, PLAINTEXT_SIZE};
use shoal_topology::route::sample_delays;
use shoal_topology::{EpochSchedule, Topology};

use crate::ceiling::{self, Ceiling};
use crate::standin::{StandIn, network_info, wait_for_topology};
use crate::testnet::{Testnet, TestnetConfig, sum_metric};

/// Knobs of the relay benchmark.
#[derive(Debug, Clone)]
pub struct RelayBenchOptions {
    /// The overload probe (1.3 × the all-core ceiling).
    pub probe: Duration,
    /// The sustained phase, whose rate and CPU give `ratio` and `cpu_efficiency`.
    pub saturation: Duration,
    pub paced: Duration,
    pub ceiling_time: Duration,
    /// Each ceiling measured around a sustained round.
    pub round_ceiling_time: Duration,
    pub mean_hop_delay_ms: f64,
}

impl Default for RelayBenchOptions {
    fn default() -> Self {
        RelayBenchOptions {
            probe: Duration::from_secs(2),
            saturation: Duration::from_secs(4),
            paced: Duration::from_secs(5),
            ceiling_time: Duration::from_secs(2),
            round_ceiling_time: Duration::from_secs(1),
            mean_hop_delay_ms: 50.0,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Quantiles {
    pub p50: f64,
    pub p99: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct LoadPhase {
    pub offered_per_sec: f64,
    pub offered: u64,
    pub arrived: u64,
    pub lost: u64,
    pub relay_dropped: u64,
}

/// Everything `shoal bench relay --json` prints.
#[derive(Debug, Clone, Serialize)]
pub struct RelayReport {
    pub cores: usize,
    /// The ceilings are those of the sustained round that gave `ratio`: the mean of
    /// measurements just before and just after it (`ceiling_before_after`).
    pub ceiling_unwraps_per_sec: f64,
    pub single_core_unwraps_per_sec: f64,
    /// The per-core cost basis of `cpu_efficiency`: unwraps per CPU-second on one thread.
    pub unwraps_per_cpu_sec: f64,
    pub ceiling_before_after: [Ceiling; 2],
    /// Measured before any process started; sets the overload probe's rate.
    pub start_ceiling: Ceiling,
    /// Forwarded per second in the best sustained round's steady window (from 1 s after
    /// its first send to its last).
    pub relay_packets_per_sec: f64,
    pub ratio: f64,
    pub cpu_efficiency: f64,
    /// CPU seconds of the relay process in that window; `harness_cpu_seconds` is this
    /// process's (load generator and sink) in the same window.
    pub relay_cpu_seconds: f64,
    /// The unwrap workers' part of `relay_cpu_seconds`; the rest is link work (QUIC,
    /// UDP and the kernel's share of both) on the relay's async runtime.
    pub relay_workers_cpu_seconds: f64,
    pub harness_cpu_seconds: f64,
    /// The overload probe: offered 1.3 × the all-core ceiling, forwarded, and shed.
    pub overload_offered_per_sec: f64,
    pub overload_packets_per_sec: f64,
    pub saturation_dropped_overload: u64,
    /// The sustained phase (whose rate is `relay_packets_per_sec`): offered, and shed.
    pub saturation_offered_per_sec: f64,
    /// What the load generator managed to send per second in that round: below
    /// `saturation_offered_per_sec` when the link to the relay pushed back.
    pub saturation_sent_per_sec: f64,
    pub sustained_dropped_overload: u64,
    /// Sustained rounds run (each offers a higher multiple of the probe's rate).
    pub sustained_rounds: usize,
    /// Offered minus forwarded at 80 % load, excluding deliberate drops (there are none).
    pub lost: u64,
    pub load_80: LoadPhase,
    pub load_50: LoadPhase,
    /// Time in the relay beyond the scheduled delay at 50 % load (arrival at the link
    /// reader to hand-off to the next hop's link), microseconds.
    pub added_latency_us: Quantiles,
    pub unwrap_us: Quantiles,
    pub mean_hop_delay_ms: f64,
}

/// utime + stime of process `pid` from `/proc/PID/stat`, in seconds (100 ticks/s); 0 if
/// it cannot be read.
pub fn cpu_seconds_of(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which may contain spaces) are space separated.
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|&i| f.get(i).and_then(|v| v.parse::<f64>().ok()))
        .sum();
    ticks / 100.0
}

/// CPU seconds of `pid`'s live threads whose name starts with `prefix`, from their
/// scheduler accounts (nanoseconds); 0 if none can be read.
pub fn threads_cpu_seconds(pid: u32, prefix: &str) -> f64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0.0;
    };
    let ns: u64 = tasks
        .flatten()
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.starts_with(prefix))
        })
        .filter_map(|t| ceiling::schedstat_ns(&t.path().join("schedstat")))
        .sum();
    ns as f64 / 1e9
}

/// Names of the relay process's unwrap workers (`relay/src/driver.rs`), as the kernel
/// truncates them.
const WORKER_THREADS: &str = "shoal-relay-wor";

fn self_cpu_seconds() -> f64 {
    cpu_seconds_of(std::process::id())
}

/// Builds `n` distinct packets routed `[relay, sink]` on all cores (a packet that fails
/// to build is left out; with a checked topology none does).
pub fn build_packets(topo: &Topology, relay: &Hop, sink: &Hop, n: usize, seed: u64) -> Vec<Bytes> {
    build_route_packets(topo, &[relay.clone(), sink.clone()], &[0; 32], n, seed)
}

/// Builds `n` distinct packets along `route` for `destination` (the mailbox address the
/// last hop sees) on all cores; the last hop's delay is zero. A packet that fails to
/// build is left out.
pub fn build_route_packets(
    topo: &Topology,
    route: &[Hop],
    destination: &[u8; 32],
    n: usize,
    seed: u64,
) -> Vec<Bytes> {
    let threads = std::thread::available_parallelism()
        .map(|t| t.get())
        .unwrap_or(1);
    let label = EpochSchedule::frame_label(topo.epoch());
    let per = n.div_ceil(threads);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    let mut rng = StdRng::seed_from_u64(seed ^ ((t as u64 + 1) * 0x9e37_79b9));
                    let mut plaintext = vec![0u8; PLAINTEXT_SIZE];
                    let mut out = Vec::with_capacity(per);
                    for i in 0..per {
                        plaintext[..8].copy_from_slice(&((t * per + i) as u64).to_be_bytes());
                        let mut delays =
                            sample_delays(&mut rng, topo.params(), route.len().saturating_sub(1));
                        delays.push(Duration::ZERO);
                        if let Ok((p, _)) =
                            sphinx::build_forward(&mut rng, route, &delays, destination, &plaintext)
                            && let Ok(f) = Frame::sphinx(label, &p.packet)
                        {
                            out.push(Bytes::copy_from_slice(f.as_bytes()));
                        }
                    }
                    out
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_default())
            .take(n)
            .collect()
    })
}

/// Sends `packets` at `rate` per second in 1 ms batches; returns how many were sent.
async fn paced_send(
    sender: &mut FrameSender,
    packets: &mut [Bytes],
    rate: f64,
) -> anyhow::Result<u64> {
    let start = Instant::now();
    let mut sent = 0usize;
    while sent < packets.len() {
        let due = ((start.elapsed().as_secs_f64() * rate) as usize + 1).min(packets.len());
        if due > sent {
            sender.send_many(&mut packets[sent..due]).await?;
            sent = due;
        } else {
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
    }
    Ok(sent as u64)
}

/// The sustained rounds offer these multiples of the overload probe's forwarded rate,
/// stopping after the first round in which the relay sheds.
const SUSTAIN_STEPS: [f64; 3] = [1.1, 1.25, 1.4];

/// One sustained round, judged against the ceilings measured around it.
struct SustainedRound {
    run: Offered,
    /// Offered per second.
    offered: f64,
    shed: u64,
    /// Measured just before and just after the round.
    ceilings: [Ceiling; 2],
}

impl SustainedRound {
    /// The machine's speed during the round: the mean of the two ceilings.
    fn ceiling(&self) -> Ceiling {
        self.ceilings[0].mean(&self.ceilings[1])
    }
}

/// What one saturation phase measured, over its steady window.
struct Offered {
    /// Forwarded per second.
    rate: f64,
    arrived: u64,
    /// The relay's CPU seconds.
    relay_cpu: f64,
    /// Offered per second as actually sent: below the asked rate when the link pushed
    /// back (QUIC flow or congestion control).
    sent_rate: f64,
    /// The part of `relay_cpu` its unwrap workers used; the rest moved frames (QUIC,
    /// UDP, the kernel's share of both) and ran the directory and metrics.
    workers_cpu: f64,
    /// This process's CPU seconds (load generator and sink).
    harness_cpu: f64,
}

/// Sends before the steady window opens: by then the relay's delay queue (mean 50 ms)
/// has filled and arrivals keep pace with forwarding.
const WINDOW_OPENS: Duration = Duration::from_secs(1);

/// The counters a steady window is measured between.
struct Sample {
    at: Instant,
    arrived: u64,
    relay_cpu: f64,
    workers_cpu: f64,
    harness_cpu: f64,
}

impl Sample {
    fn take(sink: &StandIn, relay_pid: u32) -> Self {
        Sample {
            at: Instant::now(),
            arrived: sink.received.frames.load(Ordering::Relaxed),
            relay_cpu: cpu_seconds_of(relay_pid),
            workers_cpu: threads_cpu_seconds(relay_pid, WORKER_THREADS),
            harness_cpu: self_cpu_seconds(),
        }
    }
}

/// Offers `packets` at `rate`, measures the window from [`WINDOW_OPENS`] to the last
/// send, then waits until the sink is quiet so the next phase starts with empty
/// queues. Counting until the queues drain instead would charge the tail of the mixing
/// delays to the relay's throughput.
async fn offer(
    sender: &mut FrameSender,
    sink: &StandIn,
    relay_pid: u32,
    packets: &mut [Bytes],
    rate: f64,
) -> anyhow::Result<Offered> {
    let before = sink.received.frames.load(Ordering::Relaxed);
    let split = ((rate * WINDOW_OPENS.as_secs_f64()) as usize).min(packets.len() / 2);
    let (head, tail) = packets.split_at_mut(split);
    let t0 = Instant::now();
    let mut offered = paced_send(sender, head, rate).await?;
    let open = Sample::take(sink, relay_pid);
    offered += paced_send(sender, tail, rate).await?;
    let close = Sample::take(sink, relay_pid);
    let send_elapsed = t0.elapsed().as_secs_f64();
    wait_quiet(sink, before + offered, Duration::from_secs(10)).await;
    let arrived = close.arrived - open.arrived;
    Ok(Offered {
        rate: arrived as f64 / (close.at - open.at).as_secs_f64().max(1e-9),
        arrived,
        relay_cpu: close.relay_cpu - open.relay_cpu,
        sent_rate: offered as f64 / send_elapsed.max(1e-9),
        workers_cpu: close.workers_cpu - open.workers_cpu,
        harness_cpu: close.harness_cpu - open.harness_cpu,
    })
}

async fn overload_drops(net: &Testnet) -> u64 {
    let text = metrics_text(net.relays[0].metrics_addr).await;
    sum_metric(
        &text,
        "shoal_relay_packets_dropped_total{reason=\"overload\"}",
    ) as u64
}

async fn metrics_text(addr: SocketAddr) -> String {
    match shoal_link::http::get(addr, "/metrics").await {
        Ok((_, body)) => String::from_utf8_lossy(&body).into_owned(),
        Err(_) => String::new(),
    }
}

async fn wait_relay_ready(addr: SocketAddr, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        let text = metrics_text(addr).await;
        if sum_metric(&text, "shoal_relay_directory_epoch") > 0.0 {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

async fn wait_quiet(sink: &StandIn, expect: u64, timeout: Duration) -> u64 {
    let deadline = Instant::now() + timeout;
    let mut last = u64::MAX;
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let got = sink.received.frames.load(Ordering::Relaxed);
        if got >= expect || (got == last) || Instant::now() >= deadline {
            return got;
        }
        last = got;
    }
}

/// Runs the whole benchmark. `dir` holds the processes' configs and logs.
pub async fn run(
    shoal: &Path,
    dir: &Path,
    opts: &RelayBenchOptions,
) -> anyhow::Result<RelayReport> {
    let ceiling: Ceiling = tokio::task::spawn_blocking({
        let t = opts.ceiling_time;
        move || ceiling::measure(t)
    })
    .await?;

    let cfg = TestnetConfig {
        relays_per_layer: 0,
        extra_relays: 1,
        mean_hop_delay_ms: opts.mean_hop_delay_ms,
        max_hop_delay_ms: opts.mean_hop_delay_ms * 20.0,
        bootstrap_secs: 3,
        ..TestnetConfig::default()
    };
    let mut net = Testnet::start(shoal, dir, &cfg)?;
    let info = network_info_retry(net.authority_addr).await?;
    let _fillers = crate::standin::layer_fillers(net.authority_addr, &info, &[13, 14]).await?;
    let mut loadgen = StandIn::bind(11)?;
    let mut sink = StandIn::bind(12)?;
    loadgen.register(&[net.authority_addr], &info).await?;
    sink.register(&[net.authority_addr], &info).await?;
    sink.spawn_sink(false, false);
    let relay_id = net.relays[0].id;
    let topo = wait_for_topology(
        net.authority_addr,
        &net.authorities,
        &[relay_id, loadgen.id(), sink.id()],
        Duration::from_secs(30),
    )
    .await
    .with_context(|| net.log_tail("authority"))?;
    let epoch = topo.epoch();
    let relay_hop = topo.hop(&relay_id, epoch)?;
    let sink_hop = topo.hop(&sink.id(), epoch)?;
    if !wait_relay_ready(net.relays[0].metrics_addr, Duration::from_secs(30)).await {
        bail!(
            "relay did not load the directory: {}",
            net.log_tail("relay0")
        );
    }

    let relay_addr = net.relays[0].link_addr;
    let connect = |l: &StandIn| {
        let ep = l.endpoint.clone();
        let addr = relay_addr;
        async move {
            let link = ep.connect(addr, relay_id).await?;
            anyhow::Ok(link.open_frames(FRAME_SIZE).await?)
        }
    };
    let mut sender = connect(&loadgen).await?;
    let pid = net.relays[0].proc.pid();

    // Phase 2a: overload probe at 1.3 × the all-core ceiling. Packets for each phase
    // are built before its timed window.
    let probe_rate = ceiling.all_cores_unwraps_per_sec * 1.3;
    let mut probe = tokio::task::block_in_place(|| {
        let n = (probe_rate * opts.probe.as_secs_f64()) as usize;
        build_packets(&topo, &relay_hop, &sink_hop, n, 1)
    });
    let overload0 = overload_drops(&net).await;
    let probe_run = offer(&mut sender, &sink, pid, &mut probe, probe_rate).await?;
    let saturation_dropped_overload = overload_drops(&net).await - overload0;
    drop(probe);

    // Phase 2b: sustained saturation. The probe's relay spent CPU receiving packets it
    // then shed, so its rate understates C. Offer rising multiples of it until the
    // relay sheds (it is then saturated) or the steps run out; C is the best
    // forwarded rate, and its round's CPU gives `cpu_efficiency`.
    // The machine's speed drifts over minutes, so each round is judged against ceilings
    // measured just before and just after it, not the one from the start.
    let measure_ceiling =
        || tokio::task::block_in_place(|| ceiling::measure(opts.round_ceiling_time));
    let mut best: Option<SustainedRound> = None;
    let mut sustained_rounds = 0;
    for (round, step) in SUSTAIN_STEPS.iter().enumerate() {
        let rate = probe_run.rate * step;
        let mut sat = tokio::task::block_in_place(|| {
            let n = (rate * opts.saturation.as_secs_f64()) as usize;
            build_packets(&topo, &relay_hop, &sink_hop, n, 4 + round as u64)
        });
        let before = measure_ceiling();
        let overload0 = overload_drops(&net).await;
        let run = offer(&mut sender, &sink, pid, &mut sat, rate).await?;
        let shed = overload_drops(&net).await - overload0;
        let after = measure_ceiling();
        sustained_rounds += 1;
        let this = SustainedRound {
            run,
            offered: rate,
            shed,
            ceilings: [before, after],
        };
        if best.as_ref().is_none_or(|b| this.run.rate > b.run.rate) {
            best = Some(this);
        }
        if shed > 0 {
            break;
        }
    }
    let best = best.context("no sustained round ran")?;
    let round_ceiling = best.ceiling();
    let relay_rate = best.run.rate;
    let relay_cpu = best.run.relay_cpu;
    let cpu_efficiency =
        (best.run.arrived as f64 / relay_cpu.max(1e-9)) / round_ceiling.unwraps_per_cpu_sec;

    // Phase 3: restart the relay for clean latency histograms.
    net.relays[0].proc.kill();
    net.restart_relay(shoal, 0)?;
    if !wait_relay_ready(net.relays[0].metrics_addr, Duration::from_secs(30)).await {
        bail!(
            "restarted relay did not load the directory: {}",
            net.log_tail("relay0")
        );
    }
    let mut sender = connect(&loadgen).await?;

    let phase = |fraction: f64, seed: u64| {
        let rate = relay_rate * fraction;
        let n = (rate * opts.paced.as_secs_f64()) as usize;
        (
            rate,
            tokio::task::block_in_place(|| build_packets(&topo, &relay_hop, &sink_hop, n, seed)),
        )
    };
    let (rate50, mut p50) = phase(0.5, 2);
    let (rate80, mut p80) = phase(0.8, 3);

    let mut run_phase = async |rate: f64, packets: &mut Vec<Bytes>| -> anyhow::Result<LoadPhase> {
        let before = sink.received.frames.load(Ordering::Relaxed);
        let dropped_before = sum_metric(
            &metrics_text(net.relays[0].metrics_addr).await,
            "shoal_relay_packets_dropped_total",
        );
        let offered = paced_send(&mut sender, packets, rate).await?;
        let arrived = wait_quiet(&sink, before + offered, Duration::from_secs(10)).await - before;
        let dropped = sum_metric(
            &metrics_text(net.relays[0].metrics_addr).await,
            "shoal_relay_packets_dropped_total",
        ) - dropped_before;
        Ok(LoadPhase {
            offered_per_sec: rate,
            offered,
            arrived,
            lost: offered.saturating_sub(arrived),
            relay_dropped: dropped.max(0.0) as u64,
        })
    };
    let load_50 = run_phase(rate50, &mut p50).await?;
    let text = metrics_text(net.relays[0].metrics_addr).await;
    let q = |name: &str, q: &str| sum_metric(&text, &format!("{name}{{quantile=\"{q}\"}}")) * 1e6;
    let added_latency_us = Quantiles {
        p50: q("shoal_relay_delay_error_seconds", "0.5"),
        p99: q("shoal_relay_delay_error_seconds", "0.99"),
    };
    let unwrap_us = Quantiles {
        p50: q("shoal_relay_unwrap_seconds", "0.5"),
        p99: q("shoal_relay_unwrap_seconds", "0.99"),
    };
    let load_80 = run_phase(rate80, &mut p80).await?;

    Ok(RelayReport {
        cores: ceiling.cores,
        ceiling_unwraps_per_sec: round_ceiling.all_cores_unwraps_per_sec,
        single_core_unwraps_per_sec: round_ceiling.single_core_unwraps_per_sec,
        unwraps_per_cpu_sec: round_ceiling.unwraps_per_cpu_sec,
        ceiling_before_after: best.ceilings,
        start_ceiling: ceiling,
        relay_packets_per_sec: relay_rate,
        ratio: relay_rate / round_ceiling.all_cores_unwraps_per_sec,
        cpu_efficiency,
        relay_cpu_seconds: relay_cpu,
        relay_workers_cpu_seconds: best.run.workers_cpu,
        harness_cpu_seconds: best.run.harness_cpu,
        overload_offered_per_sec: probe_rate,
        overload_packets_per_sec: probe_run.rate,
        saturation_dropped_overload,
        saturation_offered_per_sec: best.offered,
        saturation_sent_per_sec: best.run.sent_rate,
        sustained_dropped_overload: best.shed,
        sustained_rounds,
        lost: load_80.lost,
        load_80,
        load_50,
        added_latency_us,
        unwrap_us,
        mean_hop_delay_ms: opts.mean_hop_delay_ms,
    })
}

async fn network_info_retry(addr: SocketAddr) -> anyhow::Result<crate::standin::NetworkInfo> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match network_info(addr).await {
            Ok(i) => return Ok(i),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

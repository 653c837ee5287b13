//! `shoal bench e2e`: what a client costs and what it sees, on a loopback network of
//! real processes (1 authority, 3 × `relays_per_layer` relays, 1 gateway) running with
//! [`NetworkParams::default()`] (cover rates, mixing delay).
//!
//! 1. **Idle client.** One client runs as a real `shoal client run` process, set up with
//!    `shoal client init` and `shoal gateway account add` like a user would. Once it has
//!    installed a directory, it idles for `idle` (no messages: only its λP, λL, λD cover
//!    and its pulls). Its CPU time (utime + stime from `/proc/PID/stat`, 100 ticks/s)
//!    over that window divided by the window's wall time gives
//!    `idle_client_cpu_percent_of_one_core`; `VmRSS` from `/proc/PID/status` at the end
//!    of the window gives `idle_client_rss_mb` (MiB). The idle process is then stopped.
//! 2. **Latency and goodput.** `clients` in-process drivers (own QUIC endpoint, account
//!    key and redb store each, as in `shoal demo`) on the same gateway, at the default
//!    rates and pulling every `pull_interval` (10 ms by default, so that the pull wait
//!    does not swamp the overhead). Each sends one `message_bytes` message to the next
//!    client every `send_interval`, `messages` times. Latency is from the return of
//!    `send` (the message is durable in the sender's queue) to the recipient's
//!    `DriverEvent::Message` (the message is durable in the recipient's store).
//! 3. **Saturated goodput.** `goodput_clients` new in-process clients (default pull
//!    interval) each queue a backlog of one-fragment messages to the next client — bodies
//!    of exactly P = `FRAGMENT_DATA_SIZE` bytes, the most one fragment carries; the
//!    phase fails if a message used more than one fragment — larger than their λP
//!    slots can carry in the phase. Once every client has sent a real fragment, the
//!    window `goodput_window` starts. The clients' stats give the λP slots in it
//!    (`goodput_slots`: real + cover, and retransmissions among the real);
//!    their [`SendRecord`]s give each message's first slot. Goodput is measured at the
//!    recipients: body bytes stored in the delivery window (the slot window shifted
//!    by the median slot → stored time), per client per second, against λP × P
//!    (`goodput_ratio_nominal`, whose Poisson standard error from the slot count alone
//!    is `goodput_poisson_std_error`). `goodput_ratio_slots` counts by slot instead:
//!    the window's first sends stored at their recipient by the end of a 5 s drain ÷
//!    the window's slots, which separates loss and wasted slots from Poisson noise.
//!
//! **Where the latency goes.** The clients keep a [`SendRecord`] per real fragment
//! (`ClientConfig::send_records`, bench-only, never logged): the λP slot that carried
//! it and the sum of the forward delays its sender drew. For every delivered
//! one-fragment message sent exactly once, the latency splits into
//! - `slot_wait_ms`: `send` returned → its λP slot (queueing; Poisson slots at λP);
//! - `sampled_mixing_ms`: the drawn delays of the hops that hold the packet (entry
//!   gateway, L1, L2, L3; the exit gateway stores on arrival, so the fifth drawn delay
//!   is never waited out): what the mix is for;
//! - `overhead_incl_pull_ms` = stored at the recipient − slot − drawn delays: links,
//!   Sphinx processing at 5 hops, the exit gateway's durable commit, **and** the
//!   recipient's side (the wait for its next pull, the answer's trip, its store write).
//!
//! The recipients also keep a [`ReceiveRecord`] per message (`DriverConfig::receive_records`,
//! bench-only, never logged): when the pull whose answer carried it was sent, when the
//! pull before it (answered without it) was sent, and when the answer's first frame,
//! its end and the store write happened. The gateway read pull *k* at about
//! `Ĝk = pull_sent + ½ (answer_first − pull_sent)` (half the pull's round trip, which on
//! loopback is sub-millisecond), so the item became pullable in `(Ĝk−1, Ĝk]`: a window
//! of one pull interval, since pulls run on a fixed schedule whatever arrives. The
//! recipient side splits off as
//! - `overhead_ms` = middle of that window − slot − drawn delays: the **network**
//!   overhead (links, processing, delay-queue lateness, the exit's durable commit),
//!   each value within ± half a pull interval (`overhead_low_ms`, `overhead_high_ms`
//!   are the window's ends); the pull phase is independent of arrivals, so the error
//!   averages out in the mean and is symmetric around each value;
//! - `pull_wait_ms` = `Ĝk` − middle of the window (half the gap between the two pulls);
//! - `pull_answer_ms` = answer's `PullDone` − `Ĝk` (the answer's 16 frames to the
//!   recipient's driver);
//! - `recipient_store_ms` = stored − `PullDone` (the recipient's redb commit), exact.
//!
//! These four add up to `overhead_incl_pull_ms`. Inside `overhead_ms`, the senders'
//! drivers time `client_slot_late_ms` (λP slot → the instant its frames were built
//! for: 0 when they were built `build_ahead` of it) and `client_write_ms` (→ its
//! frames written to the link); the entry gateway's delay counts from arrival, so
//! both add to the overhead. `link_one_way_ms` is half the round
//! trip of one frame echoed over a fresh idle link between two endpoints in the bench
//! process (`link_probes` frames, one per 10 ms, while the network still runs its
//! cover): what one of the five links costs on this host, QUIC and two tokio hand-offs
//! each way included. Per stage and node, the relays' and
//! the gateway's own `/metrics` summaries (p50/p99 over their last 30–60 s, aggregates,
//! read once at the end) give `stages`: worker queue wait, unwrap, delay-queue
//! lateness (`delay_error`: hand-off to the next link − due time) and the gateway's
//! group commit.
//!
//! Messages that needed a retransmission are counted (`retransmitted`) and left out of
//! the split, since their first attempt was lost.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use ed25519_dalek::SigningKey;
use serde::Serialize;
use shoal_client::driver::{self, ClientHandle, DriverConfig, DriverEvent, ReceiveRecord};
use shoal_client::{ClientStats, ClientStore, Identity, SendRecord};
use shoal_packet::fragment::FRAGMENT_DATA_SIZE;
use shoal_topology::NetworkParams;

use crate::relay::cpu_seconds_of;
use crate::standin::wait_for_topology;
use crate::testnet::{
    GatewayInit, GatewayOptions, Proc, Testnet, TestnetConfig, hex32_after, run_init,
};

/// Hops on a forward route that hold a packet for its Exp(μ) delay: all but the exit
/// gateway, which stores on arrival.
pub const HOLDING_HOPS: f64 = (shoal_packet::ROUTE_HOPS - 1) as f64;

/// p50 and p99 of one stage at one node, from its `/metrics` summary (milliseconds).
#[derive(Debug, Clone, Serialize)]
pub struct StageMs {
    pub node: String,
    pub stage: &'static str,
    pub p50: f64,
    pub p99: f64,
}

/// Frames echoed to measure one link (`link_one_way_ms`).
const LINK_PROBES: usize = 200;

/// What to run.
#[derive(Debug, Clone)]
pub struct E2eOptions {
    pub relays_per_layer: usize,
    /// Idle window of the client process, measured after it has a directory.
    pub idle: Duration,
    /// In-process clients of the latency phase.
    pub clients: usize,
    /// Messages each of them sends.
    pub messages: usize,
    /// Each client sends one message per interval.
    pub send_interval: Duration,
    pub message_bytes: usize,
    /// Give up waiting for deliveries this long after the last send.
    pub drain_timeout: Duration,
    /// Pull interval of the latency-phase clients.
    pub pull_interval: Duration,
    /// In-process clients of the goodput phase (0 skips it).
    pub goodput_clients: usize,
    /// Steady window of the goodput phase.
    pub goodput_window: Duration,
}

impl Default for E2eOptions {
    fn default() -> Self {
        E2eOptions {
            relays_per_layer: 1,
            idle: Duration::from_secs(30),
            clients: 4,
            messages: 15,
            send_interval: Duration::from_secs(1),
            message_bytes: 256,
            drain_timeout: Duration::from_secs(30),
            pull_interval: Duration::from_millis(10),
            goodput_clients: 8,
            goodput_window: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct LatencyMs {
    pub p50: f64,
    pub p99: f64,
    pub mean: f64,
    pub max: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct E2eReport {
    pub relays: usize,
    pub gateways: usize,
    /// Client rates from the directory (equal to `NetworkParams::default()`).
    pub lambda_p: f64,
    pub lambda_l: f64,
    pub lambda_d: f64,
    pub mean_hop_delay_ms: f64,
    /// Pull interval of the latency-phase clients (the idle client uses the default).
    pub pull_interval_ms: f64,
    pub idle_secs: f64,
    /// CPU seconds of the idle `shoal client run` process per wall second, × 100.
    pub idle_client_cpu_percent_of_one_core: f64,
    /// VmRSS of the idle client process at the end of the window, MiB.
    pub idle_client_rss_mb: f64,
    /// λP + λL + λD: packets per second the idle client's schedule sends (not measured).
    pub idle_client_expected_packets_per_sec: f64,
    pub clients: usize,
    pub sent: usize,
    pub delivered: usize,
    pub duplicates: usize,
    pub message_bytes: usize,
    /// `send` returned → message stored at the recipient.
    pub latency_ms: LatencyMs,
    /// 4 holding hops × mean hop delay: the mean of the mixing delays a packet waits.
    pub expected_mixing_delay_ms: f64,
    /// Measured mean latency − expected_mixing_delay_ms.
    pub mean_latency_minus_expected_mixing_ms: f64,
    /// The split of each message's latency (see the module docs), over `split_messages`.
    pub split_messages: usize,
    /// Delivered messages left out of the split because a fragment was retransmitted.
    pub retransmitted: usize,
    pub slot_wait_ms: LatencyMs,
    pub sampled_mixing_ms: LatencyMs,
    /// Stored at recipient − λP slot − sampled delays: network and recipient side.
    pub overhead_incl_pull_ms: LatencyMs,
    /// Messages with a receive record that has a previous pull (the split below).
    pub network_split_messages: usize,
    /// Network overhead: middle of the window in which the item became pullable at the
    /// exit gateway − λP slot − sampled delays (± half a pull interval each).
    pub overhead_ms: LatencyMs,
    /// The window's start and end (lower and upper bounds of the network overhead).
    pub overhead_low_ms: LatencyMs,
    pub overhead_high_ms: LatencyMs,
    /// Gateway reads the pull that returns the item − middle of that window.
    pub pull_wait_ms: LatencyMs,
    /// The answer's last frame at the recipient's driver − gateway reads the pull.
    pub pull_answer_ms: LatencyMs,
    /// The recipient's store write (redb commit) of the message.
    pub recipient_store_ms: LatencyMs,
    /// Per node and stage, from the nodes' `/metrics` (last 30–60 s, cover included).
    pub stages: Vec<StageMs>,
    /// Half the round trip of one frame on an idle loopback link (QUIC, padded).
    pub link_one_way_ms: LatencyMs,
    /// λP slot → the instant its frames were built for: 0 when the driver built them
    /// ahead of the slot (`DriverConfig::build_ahead`), > 0 when it woke after the slot.
    pub client_slot_late_ms: LatencyMs,
    /// That instant → its frames written to the link (the Sphinx build too when it
    /// could not be done ahead).
    pub client_write_ms: LatencyMs,
    /// 1/λP: mean wait for the next λP slot of a message that finds the queue empty.
    pub expected_slot_wait_ms: f64,
    /// Half the pull interval: mean wait for the recipient's next pull.
    pub expected_pull_wait_ms: f64,
    /// Messages all clients offered per second (clients / send_interval).
    pub offered_messages_per_sec: f64,
    /// Distinct delivered messages ÷ (last delivery − first send).
    pub goodput_messages_per_sec: f64,
    /// Message-body bytes of distinct delivered messages ÷ (last delivery − first send).
    pub goodput_bytes_per_sec: f64,
    /// Of the latency-phase clients' packets: real fragments ÷ all (real + cover).
    pub real_packet_fraction: f64,
    /// The goodput phase (saturated clients); its keys start with `goodput_`.
    #[serde(flatten)]
    pub saturated: GoodputReport,
    pub elapsed_secs: f64,
}

/// The goodput phase: saturated clients (see the module docs). All counts are totals
/// over the phase's clients and its window.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GoodputReport {
    pub goodput_clients: usize,
    pub goodput_window_secs: f64,
    /// P: the body bytes one fragment carries (`FRAGMENT_DATA_SIZE`); every message of
    /// the phase is exactly this long, so one fragment each.
    pub goodput_payload_bytes_per_fragment: usize,
    /// Messages queued per client before the window (more than its slots can carry).
    pub goodput_backlog_messages: usize,
    /// Wall time to queue every client's backlog (each `send` is a store commit).
    pub goodput_queue_secs: f64,
    /// λP × P: what one client's λP slots carry if every one holds a new fragment.
    pub goodput_nominal_bytes_per_sec: f64,
    /// Mean per client: body bytes stored at recipients in the delivery window ÷ window.
    pub goodput_saturated_bytes_per_sec: f64,
    /// Lowest and highest single client.
    pub goodput_client_min_bytes_per_sec: f64,
    pub goodput_client_max_bytes_per_sec: f64,
    /// goodput_saturated_bytes_per_sec ÷ goodput_nominal_bytes_per_sec.
    pub goodput_ratio_nominal: f64,
    /// 1/sqrt(λP × window × clients): the standard error of that ratio from Poisson
    /// slot counts alone.
    pub goodput_poisson_std_error: f64,
    /// λP × window × clients.
    pub goodput_expected_slots: f64,
    /// λP slots the clients had in the window (real + cover, from their stats).
    pub goodput_slots: u64,
    /// Messages stored at recipients in the delivery window.
    pub goodput_delivered: usize,
    /// goodput_first_sends_delivered ÷ goodput_slots: of the window's λP slots, those
    /// whose new fragment reached its recipient. 1.0 when every slot carried one;
    /// below it by retransmissions, cover slots and losses. Counted by slot, so free
    /// of the Poisson noise of the slot count and of the pull batching at the edges
    /// of the delivery window.
    pub goodput_ratio_slots: f64,
    /// The delivery window is the slot window shifted by this (median λP slot →
    /// stored at the recipient of the window's messages).
    pub goodput_delivery_shift_ms: f64,
    /// Of goodput_slots: carrying a real fragment, of which retransmissions; and cover
    /// (a λP slot sends cover only when the queue is empty or the build failed).
    pub goodput_real_slots: u64,
    pub goodput_retransmissions: u64,
    pub goodput_cover_slots: u64,
    /// Slots skipped because the driver woke too late, and failed builds, in the window.
    pub goodput_skipped_late_slots: u64,
    pub goodput_build_failures: u64,
    /// First sends with their slot in the window, and how many of those were stored at
    /// their recipient by the end of the drain.
    pub goodput_first_sends: usize,
    pub goodput_first_sends_delivered: usize,
    /// The fewest fragments any client still had queued at the end of the window.
    pub goodput_min_queued_at_end: usize,
    pub goodput_phase_secs: f64,
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// VmRSS of `pid` in MiB (0 if unreadable).
fn rss_mib(pid: u32) -> f64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// `shoal client init` + `shoal gateway account add`; returns the config path.
fn init_client_process(
    shoal: &Path,
    net: &Testnet,
    gw: &GatewayInit,
    dir: &Path,
) -> anyhow::Result<std::path::PathBuf> {
    let key_hex = hex::encode(net.authorities.keys.first().context("no authority")?.0);
    let out = run_init(
        shoal,
        &[
            "client",
            "init",
            "--dir",
            &dir.to_string_lossy(),
            "--gateway",
            &format!("{}={}", gw.link_addr, hex::encode(gw.id)),
            "--gateway-client-addr",
            &gw.client_addr.to_string(),
            "--authority",
            &format!("{}={key_hex}", net.authority_addr),
            "--threshold",
            "1",
            "--name",
            "idle",
        ],
    )?;
    let account = hex32_after(&out, "account key: ")?;
    let mailbox = hex32_after(&out, "mailbox: ")?;
    Testnet::add_account(shoal, gw, &account, &mailbox)?;
    Ok(dir.join("client.toml"))
}

/// Body → (recipient, `send` returned).
type Sent = HashMap<Vec<u8>, (usize, Instant)>;

/// Notes a delivery to client `i` if that message was sent to it.
fn record(
    (i, bytes, at): (usize, Vec<u8>, Instant),
    sent_at: &Sent,
    delivered: &mut HashMap<Vec<u8>, Instant>,
    duplicates: &mut usize,
) {
    if sent_at.get(&bytes).is_some_and(|(to, _)| *to == i) && delivered.insert(bytes, at).is_some()
    {
        *duplicates += 1;
    }
}

fn summary(mut v: Vec<f64>) -> LatencyMs {
    v.sort_by(f64::total_cmp);
    let mean = if v.is_empty() {
        0.0
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    };
    LatencyMs {
        p50: percentile(&v, 0.50),
        p99: percentile(&v, 0.99),
        mean: round1(mean),
        max: percentile(&v, 1.0),
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    round1(sorted[idx])
}

/// Runs the phases. `dir` holds the processes' configs, stores and logs.
pub async fn run(shoal: &Path, dir: &Path, opts: &E2eOptions) -> anyhow::Result<E2eReport> {
    if opts.clients < 2 || opts.messages == 0 || opts.idle.is_zero() {
        bail!("need at least 2 clients, 1 message and a non-zero idle window");
    }
    if opts.goodput_clients == 1 || (opts.goodput_clients > 0 && opts.goodput_window.is_zero()) {
        bail!("the goodput phase needs 0 or at least 2 clients and a non-zero window");
    }
    let started = Instant::now();
    let defaults = NetworkParams::default();
    let cfg = TestnetConfig {
        relays_per_layer: opts.relays_per_layer,
        mean_hop_delay_ms: defaults.mean_hop_delay_ms,
        max_hop_delay_ms: defaults.max_hop_delay_ms,
        lambda_m: defaults.lambda_m,
        bootstrap_secs: 6,
        epoch_secs: 3600,
        workers: Some(1),
        client_rates: None,
        ..TestnetConfig::default()
    };
    let mut net = Testnet::start(shoal, &dir.join("net"), &cfg)?;
    let gw = net.init_gateway(shoal, 0, &GatewayOptions::default())?;

    // Accounts must exist before the gateway runs (it locks its store).
    let idle_config = init_client_process(shoal, &net, &gw, &dir.join("idle-client"))?;
    let setups = add_accounts(shoal, &gw, opts.clients)?;
    let goodput_setups = add_accounts(shoal, &gw, opts.goodput_clients)?;
    net.run_gateway(shoal, gw.clone())?;
    let mut expect = net.relay_ids();
    expect.push(gw.id);
    let topology = wait_for_topology(
        net.authority_addr,
        &net.authorities,
        &expect,
        Duration::from_secs(30),
    )
    .await
    .with_context(|| format!("authority log:\n{}", net.log_tail("authority")))?;
    let params = topology.params().clone();
    if (params.lambda_p, params.lambda_l, params.lambda_d)
        != (defaults.lambda_p, defaults.lambda_l, defaults.lambda_d)
    {
        bail!("the directory's client rates differ from NetworkParams::default()");
    }

    // Phase 1: one idle client process.
    let log_path = dir.join("idle-client.log");
    let log = std::fs::File::create(&log_path)?;
    let child = Command::new(shoal)
        .args(["client", "run", "--config", &idle_config.to_string_lossy()])
        // "directory installed" is a debug line of the driver.
        .env("SHOAL_LOG", "info,shoal_client::driver=debug")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("cannot start `shoal client run`")?;
    let mut idle = Proc::from_child("idle-client", child);
    let has_directory = crate::testnet::wait_until(Duration::from_secs(30), || {
        std::fs::read_to_string(&log_path).is_ok_and(|t| t.contains("directory installed"))
    })
    .await;
    if !has_directory || !idle.alive() {
        bail!(
            "the client process got no directory; its log:\n{}",
            std::fs::read_to_string(&log_path).unwrap_or_default()
        );
    }
    let pid = idle.pid();
    let (cpu0, t0) = (cpu_seconds_of(pid), Instant::now());
    tokio::time::sleep(opts.idle).await;
    let (cpu1, wall) = (cpu_seconds_of(pid), t0.elapsed().as_secs_f64());
    let rss = rss_mib(pid);
    if !idle.alive() {
        bail!("the idle client process died during the window");
    }
    idle.kill();
    let idle_cpu_percent = (cpu1 - cpu0) / wall * 100.0;

    // Phase 2: in-process clients, default rates and pull interval.
    let mut clients: Vec<ClientHandle> = Vec::new();
    let pull_interval = opts.pull_interval;
    for (i, setup) in setups.into_iter().enumerate() {
        let mut config = DriverConfig::new(gw.client_addr, gw.id, net.authorities.clone());
        config.pull_interval = opts.pull_interval;
        config.client.send_records = 4 * opts.messages + 64;
        config.receive_records = 4 * opts.messages + 64;
        clients.push(spawn_client(
            config,
            setup,
            &dir.join(format!("client-{i}")),
        )?);
    }
    wait_for_directories(&clients, &net).await?;
    let mut rx = forward_messages(&clients);
    let stats_before: Vec<_> = clients.iter().map(|c| c.stats().core).collect();

    let n = clients.len();
    let mut sent_at: Sent = HashMap::new();
    let mut delivered: HashMap<Vec<u8>, Instant> = HashMap::new();
    let mut duplicates = 0usize;
    let mut message_ids = HashMap::new();
    let first_send = Instant::now();
    let mut tick = tokio::time::interval(opts.send_interval);
    for m in 0..opts.messages {
        tick.tick().await;
        for (i, c) in clients.iter().enumerate() {
            let to = (i + 1) % n;
            let mut body = format!("e2e #{m} from {i} to {to} ").into_bytes();
            body.resize(opts.message_bytes.max(body.len()), b'.');
            let id = c.send(clients[to].contact(), body.clone()).await?;
            sent_at.insert(body.clone(), (to, Instant::now()));
            message_ids.insert(body, id);
        }
        while let Ok(ev) = rx.try_recv() {
            record(ev, &sent_at, &mut delivered, &mut duplicates);
        }
    }
    let sent = sent_at.len();
    let deadline = tokio::time::Instant::now() + opts.drain_timeout;
    while delivered.len() < sent {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(ev)) => record(ev, &sent_at, &mut delivered, &mut duplicates),
            _ => break,
        }
    }
    let mut real = 0u64;
    let mut all = 0u64;
    for (c, before) in clients.iter().zip(&stats_before) {
        let s = c.stats().core;
        let r = s.real_sent - before.real_sent;
        let cover = (s.payload_cover_sent - before.payload_cover_sent)
            + (s.loops_sent - before.loops_sent)
            + (s.drops_sent - before.drops_sent);
        real += r;
        all += r + cover;
    }
    let mut records: HashMap<shoal_packet::MessageId, Vec<SendRecord>> = HashMap::new();
    let mut received: HashMap<shoal_packet::MessageId, ReceiveRecord> = HashMap::new();
    // Per first send: (the instant its frames were built for − the slot, frames
    // written − that instant).
    let mut written: HashMap<shoal_packet::MessageId, (f64, f64)> = HashMap::new();
    for c in &clients {
        let sends = c.take_send_records().await?;
        let (receives, mut writes) = c.take_receive_records().await?;
        writes.sort();
        for r in &sends {
            // The slot's wake-up is this client's first one at or after the slot.
            let i = writes.partition_point(|(wake, _)| *wake < r.at);
            if let (1, Some((wake, done))) = (r.attempt, writes.get(i)) {
                written.insert(
                    r.message_id,
                    (
                        ms(wake.saturating_duration_since(r.at)),
                        ms(done.saturating_duration_since(*wake)),
                    ),
                );
            }
        }
        for r in sends {
            records.entry(r.message_id).or_default().push(r);
        }
        for r in receives {
            received.insert(r.message_id, r);
        }
    }
    let stages = stages(&net).await;
    let link_one_way = link_one_way(LINK_PROBES).await?;
    for c in clients {
        c.shutdown().await;
    }
    // Phase 3, on the same network once the latency clients are gone.
    let saturated = if goodput_setups.is_empty() {
        GoodputReport::default()
    } else {
        goodput(&net, &gw, goodput_setups, dir, opts, params.lambda_p).await?
    };
    let (mut slot_wait, mut mixing, mut overhead_all) = (Vec::new(), Vec::new(), Vec::new());
    let mut net_split = NetworkSplit::default();
    let (mut client_late, mut client_write) = (Vec::new(), Vec::new());
    let mut retransmitted = 0usize;
    for (body, stored) in &delivered {
        let (Some((_, returned)), Some(id)) = (sent_at.get(body), message_ids.get(body)) else {
            continue;
        };
        match records.get(id).map(Vec::as_slice) {
            Some([only]) if only.attempt == 1 => {
                slot_wait.push(ms(only.at.saturating_duration_since(*returned)));
                mixing.push(ms(only.forward_delay));
                let after_slot = ms(stored.saturating_duration_since(only.at));
                overhead_all.push(after_slot - ms(only.forward_delay));
                if let Some(r) = received.get(id) {
                    net_split.add(only, r);
                }
                if let Some((late, write)) = written.get(id) {
                    client_late.push(*late);
                    client_write.push(*write);
                }
            }
            Some(_) => retransmitted += 1,
            None => {}
        }
    }
    let split_messages = overhead_all.len();

    let mut latencies: Vec<f64> = delivered
        .iter()
        .filter_map(|(body, at)| {
            let (_, s) = sent_at.get(body)?;
            Some(at.saturating_duration_since(*s).as_secs_f64() * 1000.0)
        })
        .collect();
    latencies.sort_by(f64::total_cmp);
    let mean = if latencies.is_empty() {
        0.0
    } else {
        latencies.iter().sum::<f64>() / latencies.len() as f64
    };
    let last_delivery = delivered.values().max().copied().unwrap_or(first_send);
    let span = last_delivery
        .saturating_duration_since(first_send)
        .as_secs_f64()
        .max(f64::MIN_POSITIVE);
    let bytes_delivered: usize = delivered.keys().map(Vec::len).sum();
    let expected_mixing = HOLDING_HOPS * params.mean_hop_delay_ms;
    for i in 0..net.gateways.len() {
        if !net.gateways[i].proc.alive() {
            let name = net.gateways[i].init.name.clone();
            bail!("{name} died; log:\n{}", net.log_tail(&name));
        }
    }
    let report = E2eReport {
        relays: net.relays.len(),
        gateways: net.gateways.len(),
        lambda_p: params.lambda_p,
        lambda_l: params.lambda_l,
        lambda_d: params.lambda_d,
        mean_hop_delay_ms: params.mean_hop_delay_ms,
        pull_interval_ms: pull_interval.as_secs_f64() * 1000.0,
        idle_secs: round1(wall),
        idle_client_cpu_percent_of_one_core: round3(idle_cpu_percent),
        idle_client_rss_mb: round1(rss),
        idle_client_expected_packets_per_sec: params.lambda_p + params.lambda_l + params.lambda_d,
        clients: n,
        sent,
        delivered: delivered.len(),
        duplicates,
        message_bytes: opts.message_bytes,
        latency_ms: LatencyMs {
            p50: percentile(&latencies, 0.50),
            p99: percentile(&latencies, 0.99),
            mean: round1(mean),
            max: percentile(&latencies, 1.0),
        },
        expected_mixing_delay_ms: expected_mixing,
        mean_latency_minus_expected_mixing_ms: round1(mean - expected_mixing),
        split_messages,
        retransmitted,
        slot_wait_ms: summary(slot_wait),
        sampled_mixing_ms: summary(mixing),
        overhead_incl_pull_ms: summary(overhead_all),
        network_split_messages: net_split.overhead.len(),
        overhead_ms: summary(net_split.overhead),
        overhead_low_ms: summary(net_split.low),
        overhead_high_ms: summary(net_split.high),
        pull_wait_ms: summary(net_split.pull_wait),
        pull_answer_ms: summary(net_split.answer),
        recipient_store_ms: summary(net_split.store),
        stages,
        link_one_way_ms: summary(link_one_way),
        client_slot_late_ms: summary(client_late),
        client_write_ms: summary(client_write),
        expected_slot_wait_ms: 1000.0 / params.lambda_p.max(f64::MIN_POSITIVE),
        expected_pull_wait_ms: pull_interval.as_secs_f64() * 500.0,
        offered_messages_per_sec: n as f64 / opts.send_interval.as_secs_f64(),
        goodput_messages_per_sec: round3(delivered.len() as f64 / span),
        goodput_bytes_per_sec: round1(bytes_delivered as f64 / span),
        real_packet_fraction: round3(real as f64 / (all.max(1)) as f64),
        saturated,
        elapsed_secs: round1(started.elapsed().as_secs_f64()),
    };
    drop(net);
    Ok(report)
}

/// New account keys and identities, registered with the gateway (which must not run yet:
/// it locks its store).
fn add_accounts(
    shoal: &Path,
    gw: &GatewayInit,
    n: usize,
) -> anyhow::Result<Vec<(SigningKey, Identity)>> {
    let mut rng = rand::rng();
    (0..n)
        .map(|_| {
            let account = SigningKey::generate(&mut rng);
            let identity = Identity::generate(&mut rng, gw.id);
            Testnet::add_account(
                shoal,
                gw,
                &account.verifying_key().to_bytes(),
                &identity.mailbox,
            )?;
            Ok((account, identity))
        })
        .collect()
}

/// One in-process client with its own redb store in `cdir`.
fn spawn_client(
    config: DriverConfig,
    (account, identity): (SigningKey, Identity),
    cdir: &Path,
) -> anyhow::Result<ClientHandle> {
    std::fs::create_dir_all(cdir)?;
    let store = Arc::new(ClientStore::open(cdir.join("client.redb"))?);
    store.save_identity(&identity)?;
    store.save_account_key(&account.to_bytes())?;
    Ok(driver::spawn(config, identity, &account, store)?)
}

async fn wait_for_directories<'a>(
    clients: impl IntoIterator<Item = &'a ClientHandle>,
    net: &Testnet,
) -> anyhow::Result<()> {
    for (i, c) in clients.into_iter().enumerate() {
        if !c.wait_for_directory(Duration::from_secs(20)).await {
            bail!(
                "client {i} got no directory; gateway log:\n{}",
                net.log_tail("gateway0")
            );
        }
    }
    Ok(())
}

/// (recipient index, body, when its driver reported it stored) for every message the
/// clients receive.
type Delivery = (usize, Vec<u8>, Instant);

fn forward_messages<'a>(
    clients: impl IntoIterator<Item = &'a ClientHandle>,
) -> tokio::sync::mpsc::UnboundedReceiver<Delivery> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Delivery>();
    for (i, c) in clients.into_iter().enumerate() {
        let mut events = c.subscribe();
        let tx = tx.clone();
        tokio::spawn(async move {
            loop {
                match events.recv().await {
                    Ok(DriverEvent::Message { bytes, .. }) => {
                        if tx.send((i, bytes, Instant::now())).is_err() {
                            return;
                        }
                    }
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(_) => return,
                }
            }
        });
    }
    rx
}

/// Waited after the window for the window's last messages to be stored (well above
/// the mixing delays' tail plus one default pull interval).
const GOODPUT_DRAIN: Duration = Duration::from_secs(5);

/// Phase 3: saturated clients, each sending one-fragment messages to the next from a
/// backlog its λP slots cannot empty (see the module docs).
async fn goodput(
    net: &Testnet,
    gw: &GatewayInit,
    setups: Vec<(SigningKey, Identity)>,
    dir: &Path,
    opts: &E2eOptions,
    lambda_p: f64,
) -> anyhow::Result<GoodputReport> {
    let started = Instant::now();
    let payload = FRAGMENT_DATA_SIZE;
    let n = setups.len();
    let window_secs = opts.goodput_window.as_secs_f64();
    // Slots of the queueing, the window and the drain, with 30 s and 25 % to spare.
    let backlog = (lambda_p * (window_secs + 30.0) * 1.25).ceil() as usize + 10;
    let mut clients = Vec::with_capacity(n);
    for (i, setup) in setups.into_iter().enumerate() {
        // The default pull interval: every pull is answered with a fixed number of
        // frames, so 10 ms pulls would load the gateway far more than these sends.
        let mut config = DriverConfig::new(gw.client_addr, gw.id, net.authorities.clone());
        config.client.send_records = 2 * backlog + 64;
        let cdir = dir.join(format!("goodput-client-{i}"));
        clients.push(Arc::new(spawn_client(config, setup, &cdir)?));
    }
    wait_for_directories(clients.iter().map(|c| &**c), net).await?;
    let mut rx = forward_messages(clients.iter().map(|c| &**c));

    // Each client queues its backlog concurrently with the others.
    let queue_started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (i, c) in clients.iter().enumerate() {
        let to = (i + 1) % n;
        let contact = clients[to].contact();
        let c = Arc::clone(c);
        tasks.spawn(async move {
            let mut queued = Vec::with_capacity(backlog);
            for m in 0..backlog {
                let mut body = format!("goodput #{m} from {i} to {to} ").into_bytes();
                body.resize(payload, b'.');
                let id = c.send(contact, body.clone()).await?;
                queued.push((body, id));
            }
            anyhow::Ok((i, queued))
        });
    }
    // Body → (sender, message id).
    let mut sent: HashMap<Vec<u8>, (usize, shoal_packet::MessageId)> = HashMap::new();
    while let Some(done) = tasks.join_next().await {
        let (i, queued) = done.context("a queueing task failed")??;
        for (body, id) in queued {
            sent.insert(body, (i, id));
        }
    }
    let queue_secs = queue_started.elapsed().as_secs_f64();
    let all_sending = crate::testnet::wait_until(Duration::from_secs(30), || {
        clients.iter().all(|c| c.stats().core.real_sent > 0)
    })
    .await;
    if !all_sending {
        bail!("a goodput client sent no fragment within 30 s of its backlog being queued");
    }

    let before: Vec<_> = clients.iter().map(|c| c.stats().core).collect();
    let t0 = Instant::now();
    tokio::time::sleep(opts.goodput_window).await;
    let t1 = Instant::now();
    let after: Vec<_> = clients.iter().map(|c| c.stats().core).collect();
    tokio::time::sleep(GOODPUT_DRAIN).await;

    // Message id → its first send's λP slot; every message must be one fragment.
    let mut first_slot: HashMap<shoal_packet::MessageId, Instant> = HashMap::new();
    for c in &clients {
        for r in c.take_send_records().await? {
            if r.attempt == 1 && first_slot.insert(r.message_id, r.at).is_some() {
                bail!("a goodput message of {payload} B went out as more than one fragment");
            }
        }
    }
    for c in clients {
        if let Ok(c) = Arc::try_unwrap(c) {
            c.shutdown().await;
        }
    }
    // Body → first time it was stored at its intended recipient.
    let mut delivered: HashMap<Vec<u8>, Instant> = HashMap::new();
    while let Ok((to, bytes, at)) = rx.try_recv() {
        if sent
            .get(&bytes)
            .is_some_and(|(from, _)| (from + 1) % n == to)
        {
            delivered.entry(bytes).or_insert(at);
        }
    }

    let in_window = |t: Instant| t >= t0 && t < t1;
    let mut first_sends = 0usize;
    let mut first_sends_delivered = 0usize;
    let mut shifts = Vec::new();
    for (body, (_, id)) in &sent {
        let Some(slot) = first_slot.get(id).copied().filter(|s| in_window(*s)) else {
            continue;
        };
        first_sends += 1;
        if let Some(stored) = delivered.get(body) {
            first_sends_delivered += 1;
            shifts.push(ms(stored.saturating_duration_since(slot)));
        }
    }
    shifts.sort_by(f64::total_cmp);
    let shift_ms = percentile(&shifts, 0.5);
    let shift = Duration::from_secs_f64(shift_ms / 1000.0);
    let (d0, d1) = (t0 + shift, t1 + shift);
    let mut per_client = vec![0usize; n];
    for (body, stored) in &delivered {
        if *stored >= d0
            && *stored < d1
            && let Some((from, _)) = sent.get(body)
        {
            per_client[*from] += 1;
        }
    }
    let delivered_in_window: usize = per_client.iter().sum();

    let delta = |f: fn(&ClientStats) -> u64| -> u64 {
        before
            .iter()
            .zip(&after)
            .map(|(b, a)| f(a).saturating_sub(f(b)))
            .sum()
    };
    let real_slots = delta(|s| s.real_sent);
    let cover_slots = delta(|s| s.payload_cover_sent);
    let slots = real_slots + cover_slots;
    let nominal = lambda_p * payload as f64;
    let rate = |count: usize| count as f64 * payload as f64 / window_secs;
    let mean = rate(delivered_in_window) / n as f64;
    let expected_slots = lambda_p * window_secs * n as f64;
    Ok(GoodputReport {
        goodput_clients: n,
        goodput_window_secs: round1(window_secs),
        goodput_payload_bytes_per_fragment: payload,
        goodput_backlog_messages: backlog,
        goodput_queue_secs: round1(queue_secs),
        goodput_nominal_bytes_per_sec: round1(nominal),
        goodput_saturated_bytes_per_sec: round1(mean),
        goodput_client_min_bytes_per_sec: round1(
            per_client
                .iter()
                .map(|&c| rate(c))
                .fold(f64::INFINITY, f64::min),
        ),
        goodput_client_max_bytes_per_sec: round1(
            per_client.iter().map(|&c| rate(c)).fold(0.0, f64::max),
        ),
        goodput_ratio_nominal: round3(mean / nominal.max(f64::MIN_POSITIVE)),
        goodput_poisson_std_error: round3(1.0 / expected_slots.max(f64::MIN_POSITIVE).sqrt()),
        goodput_expected_slots: round1(expected_slots),
        goodput_slots: slots,
        goodput_delivered: delivered_in_window,
        goodput_ratio_slots: round3(first_sends_delivered as f64 / slots.max(1) as f64),
        goodput_delivery_shift_ms: shift_ms,
        goodput_real_slots: real_slots,
        goodput_retransmissions: delta(|s| s.retransmissions),
        goodput_cover_slots: cover_slots,
        goodput_skipped_late_slots: delta(|s| s.events_skipped_late),
        goodput_build_failures: delta(|s| s.build_failures),
        goodput_first_sends: first_sends,
        goodput_first_sends_delivered: first_sends_delivered,
        goodput_min_queued_at_end: after.iter().map(|s| s.queued_fragments).min().unwrap_or(0),
        goodput_phase_secs: round1(started.elapsed().as_secs_f64()),
    })
}

/// The recipient-side split of each message's overhead (see the module docs), in ms.
#[derive(Debug, Default)]
struct NetworkSplit {
    overhead: Vec<f64>,
    low: Vec<f64>,
    high: Vec<f64>,
    pull_wait: Vec<f64>,
    answer: Vec<f64>,
    store: Vec<f64>,
}

impl NetworkSplit {
    fn add(&mut self, sent: &SendRecord, r: &ReceiveRecord) {
        let Some(previous) = r.previous_pull_sent else {
            return;
        };
        // Times relative to the λP slot; `due` is when the drawn delays were waited out.
        let rel = |t: Instant| ms(t.saturating_duration_since(sent.at));
        let due = ms(sent.forward_delay);
        let half_rtt = ms(r.answer_first.saturating_duration_since(r.pull_sent)) / 2.0;
        let read_prev = rel(previous) + half_rtt;
        let read = rel(r.pull_sent) + half_rtt;
        let middle = (read_prev + read) / 2.0;
        self.overhead.push(middle - due);
        self.low.push(read_prev - due);
        self.high.push(read - due);
        self.pull_wait.push(read - middle);
        self.answer.push(rel(r.answer_done) - read);
        self.store
            .push(ms(r.stored.saturating_duration_since(r.answer_done)));
    }
}

/// One quantile of a Prometheus summary in `text`, in ms (NaN if absent).
fn quantile_ms(text: &str, name: &str, q: &str) -> f64 {
    let prefix = format!("{name}{{quantile=\"{q}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(f64::NAN, |s| round3(s * 1000.0))
}

/// Per-stage p50/p99 of every relay and gateway, read from their `/metrics`.
async fn stages(net: &Testnet) -> Vec<StageMs> {
    let mut nodes: Vec<(String, std::net::SocketAddr)> = net
        .relays
        .iter()
        .enumerate()
        .map(|(i, r)| (format!("relay{i}"), r.metrics_addr))
        .collect();
    for g in &net.gateways {
        nodes.push((g.init.name.clone(), g.init.metrics_addr));
    }
    let mut out = Vec::new();
    for (node, addr) in nodes {
        let Ok((_, body)) = shoal_link::http::get(addr, "/metrics").await else {
            continue;
        };
        let text = String::from_utf8_lossy(&body);
        for (stage, name) in [
            ("queue_wait", "shoal_relay_queue_wait_seconds"),
            ("unwrap", "shoal_relay_unwrap_seconds"),
            ("delay_error", "shoal_relay_delay_error_seconds"),
            ("commit", "shoal_gateway_commit_seconds"),
        ] {
            let p50 = quantile_ms(&text, name, "0.5");
            if p50.is_nan() {
                continue;
            }
            out.push(StageMs {
                node: node.clone(),
                stage,
                p50,
                p99: quantile_ms(&text, name, "0.99"),
            });
        }
    }
    out
}

/// Half the round trip of each of `probes` frames echoed over an idle link, in ms.
async fn link_one_way(probes: usize) -> anyhow::Result<Vec<f64>> {
    use shoal_link::{LinkEndpoint, PeerSet, node_key};
    let frame_size = shoal_packet::FRAME_SIZE;
    let mut rng = rand::rng();
    let (a_key, b_key) = (
        SigningKey::generate(&mut rng),
        SigningKey::generate(&mut rng),
    );
    let local = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    let b = LinkEndpoint::bind(local, &b_key, PeerSet::from_keys([node_key(&a_key)]))?;
    let a = LinkEndpoint::bind(local, &a_key, PeerSet::new())?;
    let b_addr = b.local_addr()?;
    let echo = tokio::spawn(async move {
        let link = b.accept().await.context("no link")??;
        let mut rx = link.accept_frames(frame_size).await?;
        let mut tx = link.open_frames(frame_size).await?;
        while let Some(f) = rx.recv().await? {
            tx.send(f).await?;
        }
        anyhow::Ok(())
    });
    let link = a.connect(b_addr, node_key(&b_key)).await?;
    let mut tx = link.open_frames(frame_size).await?;
    let frame = vec![0u8; frame_size];
    // The first frame opens both streams; it is not timed.
    tx.send(&frame).await?;
    let mut rx = link.accept_frames(frame_size).await?;
    rx.recv().await?.context("echo ended")?;
    let mut out = Vec::with_capacity(probes);
    for _ in 0..probes {
        tokio::time::sleep(Duration::from_millis(10)).await;
        let t = Instant::now();
        tx.send(&frame).await?;
        rx.recv().await?.context("echo ended")?;
        out.push(ms(t.elapsed()) / 2.0);
    }
    tx.finish()?;
    drop(rx);
    let _ = tokio::time::timeout(Duration::from_secs(2), echo).await;
    Ok(out)
}

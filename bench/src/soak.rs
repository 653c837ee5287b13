//! `shoal bench soak`: one real `shoal relay run` process at a steady load for a long
//! time, its resident memory sampled every few seconds, to show that it stays flat.
//!
//! The network runs with short epochs, so the soak also crosses many key rotations:
//! the replay filter holds one generation per key epoch in flight and drops it with
//! the key, which is what bounds the relay's memory. With one-hour epochs the filter
//! would (correctly) grow for the whole hour, and a flat line would prove nothing.
//!
//! Packets are built while the soak runs (a one-hour soak cannot pre-build millions
//! of distinct packets), on a thread of this process, always for the current
//! document's epoch. The load is paced in 5 ms steps.
//!
//! "Flat" means: after the warm-up, no sample exceeds the first post-warm-up sample
//! by more than `bound_kib + bound_fraction × baseline`. The least-squares slope over
//! the post-warm-up samples is reported too.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde::Serialize;
use shoal_packet::sphinx;
use shoal_packet::{FRAME_SIZE, Frame, PLAINTEXT_SIZE};
use shoal_topology::route::sample_delays;
use shoal_topology::{EpochSchedule, NodeId, Role, Topology};
use tokio::sync::mpsc;

use crate::relay::cpu_seconds_of;
use crate::standin::{StandIn, fetch_topology, network_info};
use crate::testnet::{Testnet, TestnetConfig, sum_metric};

/// Knobs of the soak.
#[derive(Debug, Clone)]
pub struct SoakOptions {
    pub duration: Duration,
    /// Packets per second offered to the relay.
    pub rate: f64,
    pub epoch_secs: u64,
    pub key_grace_secs: u64,
    pub sample_every: Duration,
    /// Samples before this are warm-up (allocator pools, first epoch generations).
    pub warmup: Duration,
    /// Allowed growth after warm-up: this many KiB plus `bound_fraction` of the baseline.
    pub bound_kib: u64,
    pub bound_fraction: f64,
    pub mean_hop_delay_ms: f64,
}

impl SoakOptions {
    /// A soak of `minutes` minutes at 500 packets/s with 30 s epochs.
    pub fn minutes(minutes: f64) -> Self {
        let duration = Duration::from_secs_f64(minutes * 60.0);
        SoakOptions {
            duration,
            rate: 500.0,
            epoch_secs: 30,
            key_grace_secs: 30,
            sample_every: Duration::from_secs(5),
            // Three epochs plus the grace period fill every replay generation once.
            warmup: Duration::from_secs(120).min(duration / 3),
            bound_kib: 8 * 1024,
            bound_fraction: 0.10,
            mean_hop_delay_ms: 20.0,
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct RssSample {
    pub t_secs: f64,
    pub rss_kib: u64,
}

/// Everything `shoal bench soak --json` prints.
#[derive(Debug, Clone, Serialize)]
pub struct SoakReport {
    pub duration_secs: f64,
    pub rate_per_sec: f64,
    pub epoch_secs: u64,
    pub epochs_crossed: u64,
    pub offered: u64,
    pub arrived: u64,
    pub lost: u64,
    /// Steps in which the packet builder had fallen behind the schedule.
    pub builder_behind_steps: u64,
    /// Times the load generator had to dial the relay again (frames of a failed
    /// write are not counted as offered).
    pub redials: u64,
    /// Stand-in descriptor uploads an authority refused (each one risks the stand-in
    /// dropping out of the next document).
    pub registration_failures: u64,
    pub relay_cpu_seconds: f64,
    pub warmup_secs: f64,
    pub rss_baseline_kib: u64,
    pub rss_max_after_warmup_kib: u64,
    pub rss_end_kib: u64,
    pub growth_after_warmup_kib: i64,
    pub bound_kib: u64,
    /// Least-squares slope of RSS over the post-warm-up samples.
    pub slope_kib_per_min: f64,
    pub flat: bool,
    pub replay_tags_end: f64,
    pub samples: Vec<RssSample>,
}

/// Resident set size of process `pid` in KiB, from `/proc/PID/status`.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Least-squares slope of `y` over `x`; 0 with fewer than two points.
pub fn slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    if points.len() < 2 {
        return 0.0;
    }
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    if sxx == 0.0 { 0.0 } else { sxy / sxx }
}

/// The flatness verdict over `samples` (see the module docs).
pub fn judge(
    samples: &[RssSample],
    warmup: Duration,
    bound_kib: u64,
    bound_fraction: f64,
) -> (u64, u64, u64, f64, bool) {
    let after: Vec<&RssSample> = samples
        .iter()
        .filter(|s| s.t_secs >= warmup.as_secs_f64())
        .collect();
    let baseline = after.first().map_or(0, |s| s.rss_kib);
    let max = after.iter().map(|s| s.rss_kib).max().unwrap_or(0);
    let bound = bound_kib + (baseline as f64 * bound_fraction) as u64;
    let pts: Vec<(f64, f64)> = after
        .iter()
        .map(|s| (s.t_secs / 60.0, s.rss_kib as f64))
        .collect();
    let flat = after.len() >= 2 && max <= baseline + bound;
    (baseline, max, bound, slope(&pts), flat)
}

type Current = Arc<Mutex<Option<Arc<Topology>>>>;

/// Builds `[relay, sink]` packets for whatever document is current, as fast as the
/// bounded channel takes them.
fn builder(
    current: Current,
    relay: NodeId,
    sink: NodeId,
    tx: mpsc::Sender<Bytes>,
    stop: Arc<AtomicBool>,
) {
    let mut rng = StdRng::seed_from_u64(0x50a4);
    let mut plaintext = vec![0u8; PLAINTEXT_SIZE];
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let topo = current.lock().map(|c| c.clone()).unwrap_or_default();
        let Some(topo) = topo else {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        let epoch = topo.epoch();
        let (Ok(r), Ok(s)) = (topo.hop(&relay, epoch), topo.hop(&sink, epoch)) else {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        n += 1;
        plaintext[..8].copy_from_slice(&n.to_be_bytes());
        let mut delays = sample_delays(&mut rng, topo.params(), 1);
        delays.push(Duration::ZERO);
        let Ok((p, _)) = sphinx::build_forward(&mut rng, &[r, s], &delays, &[0; 32], &plaintext)
        else {
            continue;
        };
        let Ok(f) = Frame::sphinx(EpochSchedule::frame_label(epoch), &p.packet) else {
            continue;
        };
        if tx
            .blocking_send(Bytes::copy_from_slice(f.as_bytes()))
            .is_err()
        {
            return;
        }
    }
}

/// Runs the soak. `dir` holds the processes' configs and logs.
pub async fn run(shoal: &Path, dir: &Path, opts: &SoakOptions) -> anyhow::Result<SoakReport> {
    let cfg = TestnetConfig {
        relays_per_layer: 0,
        extra_relays: 1,
        mean_hop_delay_ms: opts.mean_hop_delay_ms,
        max_hop_delay_ms: opts.mean_hop_delay_ms * 20.0,
        bootstrap_secs: 3,
        epoch_secs: opts.epoch_secs,
        key_grace_secs: Some(opts.key_grace_secs),
        ..TestnetConfig::default()
    };
    let net = Testnet::start(shoal, dir, &cfg)?;
    let info = {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match network_info(net.authority_addr).await {
                Ok(i) => break i,
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    };
    let mut fillers = crate::standin::layer_fillers(net.authority_addr, &info, &[23, 24]).await?;
    let mut loadgen = StandIn::bind(21)?;
    let mut sink = StandIn::bind(22)?;
    loadgen.register(&[net.authority_addr], &info).await?;
    sink.register(&[net.authority_addr], &info).await?;
    sink.spawn_sink(false, false);
    let relay_id = net.relays[0].id;
    let sink_id = sink.id();
    let topo = crate::standin::wait_for_topology(
        net.authority_addr,
        &net.authorities,
        &[relay_id, loadgen.id(), sink_id],
        Duration::from_secs(30),
    )
    .await
    .with_context(|| net.log_tail("authority"))?;
    let first_epoch = topo.epoch();
    let current: Current = Arc::new(Mutex::new(Some(Arc::new(topo))));
    let received = sink.received.clone();
    let endpoint = loadgen.endpoint.clone();

    // Stand-ins re-register so their descriptors carry keys for upcoming epochs, and the
    // builder follows the current document.
    let stop = Arc::new(AtomicBool::new(false));
    let registration_failures = Arc::new(AtomicU64::new(0));
    let refresher = tokio::spawn({
        let current = current.clone();
        let stop = stop.clone();
        let failures = registration_failures.clone();
        let authority = net.authority_addr;
        let auths = net.authorities.clone();
        // The nodes' own cadence: authorities leave out a descriptor older than the vote
        // lead plus two of these periods.
        let every = Duration::from_secs(info.schedule.republish_secs());
        async move {
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(every).await;
                for r in [
                    loadgen.register(&[authority], &info).await,
                    sink.register(&[authority], &info).await,
                ] {
                    if r.is_err() {
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
                for f in &mut fillers {
                    if f.register_as(&[authority], &info, Role::Relay)
                        .await
                        .is_err()
                    {
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
                if let Ok(t) = fetch_topology(authority, &auths, None).await
                    && t.node(&relay_id).is_some()
                    && t.node(&sink_id).is_some()
                    && let Ok(mut c) = current.lock()
                {
                    *c = Some(Arc::new(t));
                }
            }
            // Keeps the sink's and the fillers' endpoints alive until the end.
            drop(sink);
            drop(fillers);
        }
    });
    let (tx, mut rx) = mpsc::channel::<Bytes>((opts.rate as usize).max(64));
    let build = std::thread::spawn({
        let current = current.clone();
        let stop = stop.clone();
        move || builder(current, relay_id, sink_id, tx, stop)
    });

    let pid = net.relays[0].proc.pid();
    // The relay accepts the link once its own copy of the directory lists the loadgen;
    // the handshake can fail after the stream opened, so a failed send redials too.
    let relay_addr = net.relays[0].link_addr;
    let dial = async || -> anyhow::Result<shoal_link::FrameSender> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let attempt = async {
                let link = endpoint.connect(relay_addr, relay_id).await?;
                anyhow::Ok(link.open_frames(FRAME_SIZE).await?)
            };
            match attempt.await {
                Ok(s) => return Ok(s),
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(300)).await,
            }
        }
    };
    let mut sender = dial().await.with_context(|| net.log_tail("relay0"))?;
    let mut redials = 0u64;
    let mut samples = Vec::new();
    let mut offered = 0u64;
    let mut behind = 0u64;
    let mut batch: Vec<Bytes> = Vec::new();
    let cpu0 = cpu_seconds_of(pid);
    let t0 = Instant::now();
    let mut next_sample = t0;
    while t0.elapsed() < opts.duration {
        let due = (t0.elapsed().as_secs_f64() * opts.rate) as u64;
        while offered + (batch.len() as u64) < due {
            match rx.try_recv() {
                Ok(b) => batch.push(b),
                Err(_) => {
                    behind += 1;
                    break;
                }
            }
        }
        if !batch.is_empty() {
            if sender.send_many(&mut batch).await.is_ok() {
                offered += batch.len() as u64;
            } else {
                redials += 1;
                if redials > 20 {
                    bail!(
                        "the link to the relay keeps failing: {}",
                        net.log_tail("relay0")
                    );
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
                sender = dial().await?;
            }
            batch.clear();
        }
        if Instant::now() >= next_sample {
            let Some(rss) = rss_kib(pid) else {
                bail!("the relay process exited: {}", net.log_tail("relay0"));
            };
            samples.push(RssSample {
                t_secs: t0.elapsed().as_secs_f64(),
                rss_kib: rss,
            });
            next_sample += opts.sample_every;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let duration_secs = t0.elapsed().as_secs_f64();
    let relay_cpu_seconds = cpu_seconds_of(pid) - cpu0;
    stop.store(true, Ordering::Relaxed);
    drop(rx);
    let _ = build.join();

    // Let the delay queue drain before counting arrivals.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut arrived = received.frames.load(Ordering::Relaxed);
    while arrived < offered && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        arrived = received.frames.load(Ordering::Relaxed);
    }
    let last_epoch = current
        .lock()
        .ok()
        .and_then(|c| c.as_ref().map(|t| t.epoch()))
        .unwrap_or(first_epoch);
    let replay_tags_end = match shoal_link::http::get(net.relays[0].metrics_addr, "/metrics").await
    {
        Ok((_, body)) => sum_metric(&String::from_utf8_lossy(&body), "shoal_relay_replay_tags"),
        Err(_) => -1.0,
    };
    refresher.abort();
    if let Some(end) = rss_kib(pid) {
        samples.push(RssSample {
            t_secs: t0.elapsed().as_secs_f64(),
            rss_kib: end,
        });
    }
    let (baseline, max, bound, slope_kib_per_min, flat) =
        judge(&samples, opts.warmup, opts.bound_kib, opts.bound_fraction);
    let rss_end_kib = samples.last().map_or(0, |s| s.rss_kib);
    Ok(SoakReport {
        duration_secs,
        rate_per_sec: opts.rate,
        epoch_secs: opts.epoch_secs,
        epochs_crossed: last_epoch.saturating_sub(first_epoch),
        offered,
        arrived,
        lost: offered.saturating_sub(arrived),
        builder_behind_steps: behind,
        redials,
        registration_failures: registration_failures.load(Ordering::Relaxed),
        relay_cpu_seconds,
        warmup_secs: opts.warmup.as_secs_f64(),
        rss_baseline_kib: baseline,
        rss_max_after_warmup_kib: max,
        rss_end_kib,
        growth_after_warmup_kib: max as i64 - baseline as i64,
        bound_kib: bound,
        slope_kib_per_min,
        flat,
        replay_tags_end,
        samples,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(t: f64, kib: u64) -> RssSample {
        RssSample {
            t_secs: t,
            rss_kib: kib,
        }
    }

    #[test]
    fn flat_series_passes_and_growth_fails() {
        let flat: Vec<_> = (0..20)
            .map(|i| s(i as f64 * 5.0, 20_000 + (i % 3) * 100))
            .collect();
        let (base, _, _, slope, ok) = judge(&flat, Duration::from_secs(30), 1024, 0.0);
        assert_eq!(base, 20_000);
        assert!(ok);
        assert!(slope.abs() < 100.0);
        let leak: Vec<_> = (0..20)
            .map(|i| s(i as f64 * 5.0, 20_000 + i * 500))
            .collect();
        let (_, max, _, slope, ok) = judge(&leak, Duration::from_secs(30), 1024, 0.0);
        assert!(!ok, "max {max}");
        assert!((slope - 6000.0).abs() < 1.0, "slope {slope}");
    }

    #[test]
    fn too_few_samples_is_not_flat() {
        let one = [s(0.0, 1), s(40.0, 1)];
        assert!(!judge(&one, Duration::from_secs(30), 1024, 0.0).4);
    }
}

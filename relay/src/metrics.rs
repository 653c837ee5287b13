//! Aggregate counters and latency summaries, and their Prometheus text exposition.
//!
//! Workers keep their own [`Stats`] and histograms and publish snapshots a few times a
//! second, so the packet path touches no shared lock. Only aggregates live here: no
//! addresses, no per-packet records.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::core::Unwrapper;
use crate::core::{DropReason, Stats};

/// How long a latency window lasts; summaries cover the last one or two windows.
const WINDOW: Duration = Duration::from_secs(30);

/// Latency histograms, in nanoseconds.
#[derive(Debug, Clone)]
pub struct Latencies {
    /// Time in `handle_packet`: the Sphinx unwrap and replay check.
    pub unwrap: Histogram<u64>,
    /// Arrival at the link reader → a worker starts on it.
    pub queue_wait: Histogram<u64>,
    /// Hand-off to the link − when the delay said it was due.
    pub delay_error: Histogram<u64>,
}

// The bounds are constants that `new_with_bounds` accepts (low >= 1, high >= 2 * low,
// sigfig <= 5), so it cannot fail.
/// An empty histogram of nanoseconds, 1 ns to 10 min at 2 significant digits.
#[allow(clippy::expect_used)]
pub fn histogram() -> Histogram<u64> {
    // 1 ns to 10 min at 2 significant digits: a few kB each.
    Histogram::new_with_bounds(1, 600_000_000_000, 2).expect("constant histogram bounds are valid")
}

impl Default for Latencies {
    fn default() -> Self {
        Latencies {
            unwrap: histogram(),
            queue_wait: histogram(),
            delay_error: histogram(),
        }
    }
}

/// Records `d` in nanoseconds, saturating.
pub fn record(h: &mut Histogram<u64>, d: Duration) {
    h.saturating_record(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX).max(1));
}

impl Latencies {
    fn add(&mut self, other: &Latencies) {
        // Same bounds everywhere, so `add` cannot fail.
        let _ = self.unwrap.add(&other.unwrap);
        let _ = self.queue_wait.add(&other.queue_wait);
        let _ = self.delay_error.add(&other.delay_error);
    }

    pub(crate) fn reset(&mut self) {
        self.unwrap.reset();
        self.queue_wait.reset();
        self.delay_error.reset();
    }
}

#[derive(Debug)]
struct Windowed {
    started: Instant,
    current: Latencies,
    previous: Latencies,
}

/// What one worker last published.
#[derive(Debug, Clone, Default)]
pub(crate) struct WorkerSnapshot {
    pub stats: Stats,
    pub delay_queue: usize,
    pub loops_outstanding: usize,
}

/// The relay's shared counters.
#[derive(Debug)]
pub struct Metrics {
    pub(crate) frames_received: AtomicU64,
    /// Frames handed in through [`crate::driver::Pipeline::inject`] (a gateway's clients).
    pub(crate) frames_injected: AtomicU64,
    /// Frames dropped by readers because every worker queue was full.
    pub(crate) inbound_overload: AtomicU64,
    /// Streams that ended mid-frame (the partial frame is dropped).
    pub(crate) inbound_truncated: AtomicU64,
    /// Frames dropped by readers because their peer was over its fair share.
    pub(crate) inbound_peer_limit: AtomicU64,
    /// Frames lost because an outbound link failed under them.
    pub(crate) link_errors: AtomicU64,
    pub(crate) worker_queue_depth: AtomicUsize,
    pub(crate) links_inbound: AtomicUsize,
    pub(crate) links_outbound: AtomicUsize,
    /// Epoch of the directory document in use, plus one (0 = none yet).
    pub(crate) directory_epoch: AtomicU64,
    pub(crate) workers: Vec<Mutex<WorkerSnapshot>>,
    latencies: Mutex<Windowed>,
}

/// A point-in-time summary of a running relay.
#[derive(Debug, Clone, Default)]
pub struct RelayStats {
    /// Frames read off inbound links, including those dropped before a worker saw them.
    pub frames_received: u64,
    /// Frames handed in by the node's own front end (a gateway's clients).
    pub frames_injected: u64,
    /// Worker counters summed, with the driver's own drops (full worker queues, truncated
    /// streams, full or missing next-hop links) folded into `core.dropped`.
    pub core: Stats,
    /// Frames lost when an outbound link failed.
    pub link_errors: u64,
    /// Frames shed because their inbound peer was over its fair share of the worker
    /// queues (not in `core.dropped`: the core has no notion of peers).
    pub peer_limit: u64,
    pub worker_queue_depth: usize,
    pub delay_queue_depth: usize,
    pub loops_outstanding: usize,
    pub links_inbound: usize,
    pub links_outbound: usize,
    /// Epoch of the directory document in use, if any.
    pub directory_epoch: Option<u64>,
}

impl Metrics {
    pub(crate) fn new(workers: usize) -> Arc<Self> {
        Arc::new(Metrics {
            frames_received: AtomicU64::new(0),
            frames_injected: AtomicU64::new(0),
            inbound_overload: AtomicU64::new(0),
            inbound_truncated: AtomicU64::new(0),
            inbound_peer_limit: AtomicU64::new(0),
            link_errors: AtomicU64::new(0),
            worker_queue_depth: AtomicUsize::new(0),
            links_inbound: AtomicUsize::new(0),
            links_outbound: AtomicUsize::new(0),
            directory_epoch: AtomicU64::new(0),
            workers: (0..workers).map(|_| Mutex::default()).collect(),
            latencies: Mutex::new(Windowed {
                started: Instant::now(),
                current: Latencies::default(),
                previous: Latencies::default(),
            }),
        })
    }

    /// A worker publishes its counters and hands over the latencies it gathered since last time.
    pub(crate) fn publish(
        &self,
        worker: usize,
        snapshot: WorkerSnapshot,
        latencies: &Latencies,
        now: Instant,
    ) {
        if let Some(slot) = self.workers.get(worker) {
            *slot.lock().unwrap_or_else(|e| e.into_inner()) = snapshot;
        }
        let mut w = self.latencies.lock().unwrap_or_else(|e| e.into_inner());
        if now.saturating_duration_since(w.started) >= WINDOW {
            w.previous = std::mem::take(&mut w.current);
            w.started = now;
        }
        w.current.add(latencies);
    }

    /// Latencies over the last one to two windows.
    pub fn latencies(&self) -> Latencies {
        let w = self.latencies.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = w.previous.clone();
        out.add(&w.current);
        out
    }

    pub fn snapshot(&self) -> RelayStats {
        let mut s = RelayStats {
            frames_received: self.frames_received.load(Ordering::Relaxed),
            frames_injected: self.frames_injected.load(Ordering::Relaxed),
            link_errors: self.link_errors.load(Ordering::Relaxed),
            peer_limit: self.inbound_peer_limit.load(Ordering::Relaxed),
            worker_queue_depth: self.worker_queue_depth.load(Ordering::Relaxed),
            links_inbound: self.links_inbound.load(Ordering::Relaxed),
            links_outbound: self.links_outbound.load(Ordering::Relaxed),
            directory_epoch: self.directory_epoch.load(Ordering::Relaxed).checked_sub(1),
            ..RelayStats::default()
        };
        for w in &self.workers {
            let w = w.lock().unwrap_or_else(|e| e.into_inner());
            s.core.absorb(&w.stats);
            s.delay_queue_depth += w.delay_queue;
            s.loops_outstanding += w.loops_outstanding;
        }
        let mut extra = Stats::default();
        extra.dropped.insert(
            DropReason::Overload,
            self.inbound_overload.load(Ordering::Relaxed),
        );
        extra.dropped.insert(
            DropReason::Malformed,
            self.inbound_truncated.load(Ordering::Relaxed),
        );
        s.core.absorb(&extra);
        s
    }

    /// Prometheus text exposition (format 0.0.4).
    pub fn render(&self, unwrapper: Option<&Unwrapper>) -> String {
        let s = self.snapshot();
        let mut out = String::with_capacity(4096);
        let mut metric = |name: &str, kind: &str, help: &str, samples: &[(&str, f64)]| {
            family(&mut out, name, kind, help, samples)
        };
        let c = |v: u64| v as f64;
        let version = format!("{{version=\"{}\"}}", env!("CARGO_PKG_VERSION"));
        metric(
            "shoal_relay_build_info",
            "gauge",
            "Always 1; the software's version is its label.",
            &[(&version, 1.0)],
        );
        metric(
            "shoal_relay_frames_received_total",
            "counter",
            "Frames read from inbound links.",
            &[("", c(s.frames_received))],
        );
        metric(
            "shoal_relay_frames_injected_total",
            "counter",
            "Frames handed in by the node's own front end (a gateway's clients).",
            &[("", c(s.frames_injected))],
        );
        metric(
            "shoal_relay_packets_processed_total",
            "counter",
            "Packets a worker unwrapped or tried to.",
            &[("", c(s.core.received))],
        );
        metric(
            "shoal_relay_packets_forwarded_total",
            "counter",
            "Packets whose delay elapsed and were handed to the next hop's link.",
            &[("", c(s.core.forwarded))],
        );
        metric(
            "shoal_relay_packets_delivered_total",
            "counter",
            "Packets that ended at this relay and were not its own loops (discarded).",
            &[("", c(s.core.delivered))],
        );
        let labels: Vec<String> = DropReason::ALL
            .iter()
            .map(|r| format!("{{reason=\"{}\"}}", r.label()))
            .chain([
                "{reason=\"link_error\"}".to_owned(),
                "{reason=\"peer_limit\"}".to_owned(),
            ])
            .collect();
        let n = DropReason::ALL.len();
        let mut drops: Vec<(&str, f64)> = DropReason::ALL
            .iter()
            .zip(&labels)
            .map(|(r, l)| (l.as_str(), c(s.core.dropped(*r))))
            .collect();
        drops.push((labels[n].as_str(), c(s.link_errors)));
        drops.push((labels[n + 1].as_str(), c(s.peer_limit)));
        metric(
            "shoal_relay_packets_dropped_total",
            "counter",
            "Packets dropped, by cause.",
            &drops,
        );
        metric(
            "shoal_relay_replays_total",
            "counter",
            "Packets dropped because their replay tag was already seen.",
            &[("", c(s.core.dropped(DropReason::Replay)))],
        );
        metric(
            "shoal_relay_worker_queue_depth",
            "gauge",
            "Frames waiting for a worker.",
            &[("", s.worker_queue_depth as f64)],
        );
        metric(
            "shoal_relay_delay_queue_depth",
            "gauge",
            "Packets waiting out their mixing delay.",
            &[("", s.delay_queue_depth as f64)],
        );
        metric(
            "shoal_relay_loops_sent_total",
            "counter",
            "Loop cover packets sent.",
            &[("", c(s.core.loops_sent))],
        );
        metric(
            "shoal_relay_loops_returned_total",
            "counter",
            "Loop cover packets that came back.",
            &[("", c(s.core.loops_returned))],
        );
        metric(
            "shoal_relay_loops_lost_total",
            "counter",
            "Loop cover packets that did not come back in time (alert on a rise).",
            &[("", c(s.core.loops_lost))],
        );
        metric(
            "shoal_relay_loop_build_failures_total",
            "counter",
            "Loops that could not be built (no directory, or no route).",
            &[("", c(s.core.loop_build_failures))],
        );
        let settled = s.core.loops_returned + s.core.loops_lost;
        let ratio = if settled == 0 {
            f64::NAN
        } else {
            c(s.core.loops_returned) / c(settled)
        };
        metric(
            "shoal_relay_loop_success_ratio",
            "gauge",
            "Returned / (returned + lost) loops since start; NaN before any settled.",
            &[("", ratio)],
        );
        metric(
            "shoal_relay_loops_outstanding",
            "gauge",
            "Loops sent and not yet returned or expired.",
            &[("", s.loops_outstanding as f64)],
        );
        metric(
            "shoal_relay_links",
            "gauge",
            "Open links by direction.",
            &[
                ("{direction=\"inbound\"}", s.links_inbound as f64),
                ("{direction=\"outbound\"}", s.links_outbound as f64),
            ],
        );
        metric(
            "shoal_relay_directory_epoch",
            "gauge",
            "Epoch of the directory document in use; -1 before the first.",
            &[("", s.directory_epoch.map_or(-1.0, |e| e as f64))],
        );
        if let Some(u) = unwrapper {
            metric(
                "shoal_relay_replay_tags",
                "gauge",
                "Replay tags held across open key epochs.",
                &[("", u.replay_tags() as f64)],
            );
        }
        let lat = self.latencies();
        for (name, help, h) in [
            (
                "shoal_relay_unwrap_seconds",
                "Time to unwrap one packet (last 30-60 s).",
                &lat.unwrap,
            ),
            (
                "shoal_relay_queue_wait_seconds",
                "Arrival at the link reader to a worker starting on it (last 30-60 s).",
                &lat.queue_wait,
            ),
            (
                "shoal_relay_delay_error_seconds",
                "Hand-off to the next hop's link minus the due time (last 30-60 s).",
                &lat.delay_error,
            ),
        ] {
            summary(&mut out, name, help, h);
        }
        out
    }
}

/// Appends one metric family: its HELP and TYPE lines and a sample per label set.
pub fn family(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(&str, f64)]) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    for (labels, v) in samples {
        let _ = writeln!(out, "{name}{labels} {v}");
    }
}

/// Appends `h` (nanoseconds) as a Prometheus summary in seconds: p50, p99, max, sum, count.
pub fn summary(out: &mut String, name: &str, help: &str, h: &Histogram<u64>) {
    summary_scaled(out, name, help, h, 1e-9);
}

/// Appends `h` as a Prometheus summary, each recorded value multiplied by `scale`.
pub fn summary_scaled(out: &mut String, name: &str, help: &str, h: &Histogram<u64>, scale: f64) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} summary");
    for (q, label) in [(0.5, "0.5"), (0.99, "0.99"), (1.0, "1")] {
        let v = if h.is_empty() {
            f64::NAN
        } else if q >= 1.0 {
            h.max() as f64 * scale
        } else {
            h.value_at_quantile(q) as f64 * scale
        };
        let _ = writeln!(out, "{name}{{quantile=\"{label}\"}} {v}");
    }
    let _ = writeln!(out, "{name}_sum {}", h.mean() * h.len() as f64 * scale);
    let _ = writeln!(out, "{name}_count {}", h.len());
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_every_family_and_folds_driver_drops() {
        let m = Metrics::new(2);
        m.frames_received.store(10, Ordering::Relaxed);
        m.inbound_overload.store(3, Ordering::Relaxed);
        m.inbound_peer_limit.store(5, Ordering::Relaxed);
        let mut stats = Stats {
            received: 7,
            loops_returned: 3,
            loops_lost: 1,
            ..Stats::default()
        };
        stats.dropped.insert(DropReason::Replay, 2);
        let mut lat = Latencies::default();
        record(&mut lat.unwrap, Duration::from_micros(90));
        m.publish(
            1,
            WorkerSnapshot {
                stats,
                delay_queue: 4,
                loops_outstanding: 0,
            },
            &lat,
            Instant::now(),
        );
        let s = m.snapshot();
        assert_eq!(s.core.dropped(DropReason::Overload), 3);
        assert_eq!(s.delay_queue_depth, 4);
        let text = m.render(None);
        for line in [
            "shoal_relay_frames_received_total 10",
            "shoal_relay_packets_dropped_total{reason=\"overload\"} 3",
            "shoal_relay_packets_dropped_total{reason=\"peer_limit\"} 5",
            "shoal_relay_replays_total 2",
            "shoal_relay_loop_success_ratio 0.75",
            "shoal_relay_delay_queue_depth 4",
            "shoal_relay_unwrap_seconds_count 1",
            "shoal_relay_directory_epoch -1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        assert!(
            text.contains("shoal_relay_unwrap_seconds{quantile=\"0.99\"} 0.0000"),
            "{text}"
        );
    }
}

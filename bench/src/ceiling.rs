//! The physical ceiling: raw `sphinx-packet` unwraps per second, on one core and on all.
//!
//! Every relay figure is reported as a ratio against these, measured in the same run,
//! so the numbers mean the same thing on any machine.

use std::path::Path;
use std::time::{Duration, Instant};

use rand::SeedableRng;
use rand::rngs::StdRng;
use serde::Serialize;
use shoal_packet::PLAINTEXT_SIZE;
use shoal_packet::sphinx::{self, Hop};
use sphinx_packet::SphinxPacket;
use x25519_dalek::StaticSecret;

/// Unwrap rates of the bare crate, without any of Shoal's pipeline.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Ceiling {
    /// Unwraps per second of wall time on one thread.
    pub single_core_unwraps_per_sec: f64,
    /// Unwraps per second of CPU time actually received by that thread: the per-core
    /// cost, unaffected by other load on the machine.
    pub unwraps_per_cpu_sec: f64,
    pub all_cores_unwraps_per_sec: f64,
    pub cores: usize,
}

/// Packets for one node key, all distinct, built from a fixed seed.
pub fn packets_for(secret: &StaticSecret, count: usize, seed: u64) -> Vec<Vec<u8>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let me = Hop {
        address: [1; 32],
        sphinx_key: x25519_dalek::PublicKey::from(secret),
    };
    let next = Hop {
        address: [2; 32],
        sphinx_key: sphinx::generate_key(&mut rng).1,
    };
    let plaintext = vec![0u8; PLAINTEXT_SIZE];
    (0..count)
        .filter_map(|_| {
            sphinx::build_forward(
                &mut rng,
                &[me.clone(), next.clone()],
                &[Duration::ZERO; 2],
                &[3; 32],
                &plaintext,
            )
            .ok()
            .map(|(p, _)| p.packet)
        })
        .collect()
}

/// CPU time this thread has run, from the scheduler's nanosecond account.
pub fn thread_cpu_ns() -> Option<u64> {
    schedstat_ns(Path::new("/proc/thread-self/schedstat"))
}

/// The run time, in nanoseconds, of a task's `schedstat` file under `/proc`.
pub(crate) fn schedstat_ns(path: &Path) -> Option<u64> {
    let s = std::fs::read_to_string(path).ok()?;
    s.split_whitespace().next()?.parse().ok()
}

fn unwrap_for(secret: &StaticSecret, packets: &[Vec<u8>], dur: Duration) -> u64 {
    let start = Instant::now();
    let mut n = 0u64;
    'outer: loop {
        for p in packets {
            if let Ok(packet) = SphinxPacket::from_bytes(p) {
                let ok = packet.process(secret).is_ok();
                std::hint::black_box(ok);
            }
            n += 1;
            if n.is_multiple_of(64) && start.elapsed() >= dur {
                break 'outer;
            }
        }
    }
    n
}

fn per_cpu_second(secret: &StaticSecret, packets: &[Vec<u8>], dur: Duration) -> f64 {
    std::thread::scope(|s| {
        s.spawn(|| {
            let cpu0 = thread_cpu_ns();
            let n = unwrap_for(secret, packets, dur);
            match (cpu0, thread_cpu_ns()) {
                (Some(a), Some(b)) if b > a => n as f64 / ((b - a) as f64 / 1e9),
                _ => 0.0,
            }
        })
        .join()
        .unwrap_or(0.0)
    })
}

fn rate(secret: &StaticSecret, packets: &[Vec<u8>], threads: usize, dur: Duration) -> f64 {
    let start = Instant::now();
    let total: u64 = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| s.spawn(|| unwrap_for(secret, packets, dur)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or(0)).sum()
    });
    total as f64 / start.elapsed().as_secs_f64()
}

/// Unwrapping before any figure is taken. A cold first measurement on this VM ran about a
/// quarter below the ones after it, and a low ceiling flatters every ratio against it.
const WARM_UP: Duration = Duration::from_millis(300);

/// Measures both ceilings, spending about `per_measurement` on each after a warm-up.
pub fn measure(per_measurement: Duration) -> Ceiling {
    let secret = StaticSecret::from([42u8; 32]);
    let packets = packets_for(&secret, 512, 1);
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    rate(&secret, &packets, cores, WARM_UP);
    Ceiling {
        single_core_unwraps_per_sec: rate(&secret, &packets, 1, per_measurement),
        unwraps_per_cpu_sec: per_cpu_second(&secret, &packets, per_measurement),
        all_cores_unwraps_per_sec: rate(&secret, &packets, cores, per_measurement),
        cores,
    }
}

impl Ceiling {
    /// The mean of two measurements, such as those taken just before and just after a
    /// timed phase: the best estimate of the machine's speed during it, which drifts by
    /// tens of percent over minutes on a shared VM.
    pub fn mean(&self, other: &Ceiling) -> Ceiling {
        let m = |a: f64, b: f64| (a + b) / 2.0;
        Ceiling {
            single_core_unwraps_per_sec: m(
                self.single_core_unwraps_per_sec,
                other.single_core_unwraps_per_sec,
            ),
            unwraps_per_cpu_sec: m(self.unwraps_per_cpu_sec, other.unwraps_per_cpu_sec),
            all_cores_unwraps_per_sec: m(
                self.all_cores_unwraps_per_sec,
                other.all_cores_unwraps_per_sec,
            ),
            cores: self.cores,
        }
    }
}

//! `shoal bench gateway`: durable mailbox ingest and pull+ack rates of the real mailbox
//! core and redb store (on disk, fsync per commit, group commit), each measured while
//! the same process also mixes at a fixed fraction of its unwrap capacity.
//!
//! Phases, all in this process on all cores:
//! 1. **capacity**: Shoal's `Unwrapper::unwrap_frame` (frame decode, key by label,
//!    Sphinx unwrap, replay filter) flat out on every core: C unwraps/s.
//! 2. **commit ceiling**: one-item batches committed back to back: the store's fsyncs/s.
//! 3. **ingest**: mixer threads unwrap at `mix_fraction × C` (paced) while one thread
//!    plays the gateway driver: `Mailbox::deliver` of real exit payloads (a real
//!    SURB-ack in every ack slot), `poll_write` → `Store::try_submit` whenever the
//!    writer can take a batch, and on each durable commit `on_committed` and
//!    `AckToSend::into_packet` + framing for every released ack. Rate = items made
//!    durable (with their acks built) per second.
//! 4. **pull+ack**: the same mixing load; the driver thread pulls every account in
//!    turn (`Mailbox::pull` → `Store::load` → every answer encoded as a client frame),
//!    acks the real items (`Mailbox::ack`), and submits the deletes. Rate = items
//!    whose delete is durable per second.
//!
//! Targets (issue 6): ingest ≥ 20,000/s, pull+ack ≥ 50,000/s.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

use rand::SeedableRng;
use rand::rngs::StdRng;
use serde::Serialize;
use shoal_gateway::mailbox::{CommitResult, Mailbox, MailboxConfig, PullItem};
use shoal_gateway::{Store, StoreConfig, TrySubmitError};
use shoal_packet::payload::{self, AckSlot};
use shoal_packet::sphinx::{self, Hop, Unwrapped};
use shoal_packet::{Frame, PLAINTEXT_SIZE, ReplayFilter};
use shoal_relay::{KeyRing, Unwrapper};
use shoal_topology::EpochSchedule;
use x25519_dalek::StaticSecret;

use crate::relay::cpu_seconds_of;

/// Knobs of the gateway benchmark.
#[derive(Debug, Clone)]
pub struct GatewayBenchOptions {
    pub phase: Duration,
    pub capacity_time: Duration,
    /// Share of the unwrap capacity the mixer threads use during both phases.
    pub mix_fraction: f64,
    pub accounts: usize,
    pub store: StoreConfig,
}

impl Default for GatewayBenchOptions {
    fn default() -> Self {
        GatewayBenchOptions {
            phase: Duration::from_secs(4),
            capacity_time: Duration::from_secs(2),
            mix_fraction: 0.5,
            accounts: 64,
            store: StoreConfig::default(),
        }
    }
}

/// One measured phase.
#[derive(Debug, Clone, Serialize)]
pub struct GatewayPhase {
    pub items_per_sec: f64,
    pub items: u64,
    pub seconds: f64,
    /// Write transactions (fsyncs) committed in the phase.
    pub commits: u64,
    pub items_per_commit: f64,
    /// Unwraps the mixer threads achieved, per second (target `mix_fraction × C`).
    pub mix_unwraps_per_sec: f64,
    /// Process CPU time over the phase / wall time (2.0 = both cores busy).
    pub cpu_cores_busy: f64,
}

/// Everything `shoal bench gateway --json` prints.
#[derive(Debug, Clone, Serialize)]
pub struct GatewayReport {
    pub cores: usize,
    /// C: `Unwrapper::unwrap_frame` per second on all cores.
    pub unwrap_capacity_per_sec: f64,
    pub mix_fraction: f64,
    /// One-item commits per second: the fsync ceiling of this disk.
    pub commit_ceiling_per_sec: f64,
    /// Items the commit-ceiling phase stored (the pull phase drains them too).
    pub commit_ceiling_items: u64,
    pub ingest: GatewayPhase,
    pub ingest_target_per_sec: f64,
    pub ingest_ratio_to_target: f64,
    pub pull_ack: GatewayPhase,
    pub pull_ack_target_per_sec: f64,
    pub pull_ack_ratio_to_target: f64,
    pub pull_batch: usize,
    pub store_max_batch: usize,
}

fn cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// Frames for one key (epoch 0), two-hop so each unwrap forwards.
fn mix_frames(secret: &StaticSecret, n: usize) -> anyhow::Result<Vec<Vec<u8>>> {
    let label = EpochSchedule::frame_label(0);
    crate::ceiling::packets_for(secret, n, 7)
        .iter()
        .map(|p| Ok(Frame::sphinx(label, p)?.as_bytes().to_vec()))
        .collect()
}

/// Unwraps `frames` round-robin at `rate` per second (flat out if `None`) until `stop`;
/// returns how many. A fresh replay filter per pass keeps every unwrap a full one.
fn mix(keys: &KeyRing, frames: &[Vec<u8>], rate: Option<f64>, stop: &AtomicBool) -> u64 {
    let mut unwrapper = Unwrapper::new(keys.clone(), 1 << 20);
    let start = Instant::now();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        if let Some(r) = rate
            && (n as f64) >= start.elapsed().as_secs_f64() * r
        {
            std::thread::sleep(Duration::from_micros(200));
            continue;
        }
        let i = (n as usize) % frames.len();
        if i == 0 && n > 0 {
            unwrapper = Unwrapper::new(keys.clone(), 1 << 20);
        }
        std::hint::black_box(unwrapper.unwrap_frame(&frames[i]).is_ok());
        n += 1;
    }
    n
}

/// Runs `threads` mixers for the duration of `body`; returns (body's value, unwraps).
fn with_mixing<T>(
    keys: &KeyRing,
    frames: &[Vec<u8>],
    threads: usize,
    rate_per_thread: Option<f64>,
    body: impl FnOnce() -> T,
) -> (T, u64) {
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| s.spawn(|| mix(keys, frames, rate_per_thread, &stop)))
            .collect();
        let out = body();
        stop.store(true, Ordering::Relaxed);
        let n = handles.into_iter().map(|h| h.join().unwrap_or(0)).sum();
        (out, n)
    })
}

/// (mailbox, SURB id, Sphinx payload) as the exit's unwrap hands them to the mailbox.
type ExitPayload = ([u8; 32], [u8; 16], Vec<u8>);

/// Real exit payloads: a one-hop packet to this gateway, unwrapped as the exit would,
/// carrying an ack slot with a real 4-hop SURB back through `ack_route`.
fn exit_payloads(
    rng: &mut StdRng,
    gateway: &StaticSecret,
    ack_route: &[Hop],
    n: usize,
    accounts: usize,
) -> anyhow::Result<Vec<ExitPayload>> {
    let me = Hop {
        address: [1; 32],
        sphinx_key: x25519_dalek::PublicKey::from(gateway),
    };
    let filter = ReplayFilter::new(0, 1 << 20);
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let mailbox = [(i % accounts) as u8; 32];
        let surb = sphinx::build_surb(rng, ack_route, &[Duration::ZERO; 4], &[2; 32])?;
        let slot = AckSlot {
            surb: surb.surb,
            message: payload::ack_message(&[i as u8; 16], EpochSchedule::frame_label(0)),
        };
        let body = vec![9u8; payload::BODY_SIZE];
        let plaintext = payload::join_plaintext(&slot, &body)?;
        debug_assert_eq!(plaintext.len(), PLAINTEXT_SIZE);
        let (p, _) = sphinx::build_forward(
            rng,
            std::slice::from_ref(&me),
            &[Duration::ZERO],
            &mailbox,
            &plaintext,
        )?;
        match sphinx::unwrap(gateway, 0, &filter, &p.packet)? {
            Unwrapped::Final {
                destination,
                surb_id,
                payload,
            } => out.push((destination, surb_id, payload)),
            Unwrapped::Forward { .. } => anyhow::bail!("a one-hop packet was forwarded"),
        }
    }
    Ok(out)
}

/// The gateway driver's side of the store: submit what the core has when the writer
/// can take it, apply commit results as they come back.
struct Driver {
    mailbox: Mailbox,
    store: Store,
    results: mpsc::Receiver<CommitResult>,
    tx: mpsc::Sender<CommitResult>,
    in_flight: usize,
    /// Items made durable (inserts) or deleted durably (acks) so far.
    acks_built: u64,
}

impl Driver {
    /// Submits the open batch unless too many are in flight (the writer would only
    /// queue them: fewer, larger batches are the group commit).
    fn flush(&mut self, max_in_flight: usize) -> anyhow::Result<()> {
        if self.in_flight >= max_in_flight {
            return Ok(());
        }
        if let Some(batch) = self.mailbox.poll_write() {
            let tx = self.tx.clone();
            match self.store.try_submit(batch, move |r| {
                let _ = tx.send(r);
            }) {
                Ok(()) => self.in_flight += 1,
                Err(TrySubmitError::Full(_)) => anyhow::bail!("store queue full"),
                Err(TrySubmitError::Closed(f)) => anyhow::bail!("store closed: {}", f.error),
            }
        }
        Ok(())
    }

    /// Applies finished commits; builds and frames each released ack.
    fn settle(&mut self, wait: bool) -> anyhow::Result<()> {
        let mut first = wait && self.in_flight > 0;
        loop {
            let r = if first {
                first = false;
                match self.results.recv_timeout(Duration::from_secs(30)) {
                    Ok(r) => r,
                    Err(_) => anyhow::bail!("no commit within 30 s"),
                }
            } else {
                match self.results.try_recv() {
                    Ok(r) => r,
                    Err(_) => return Ok(()),
                }
            };
            self.in_flight -= 1;
            for ack in self.mailbox.on_commit(r) {
                let label = ack.key_epoch_label();
                let p = ack.into_packet()?;
                std::hint::black_box(Frame::sphinx(label, &p.packet)?);
                self.acks_built += 1;
            }
        }
    }
}

fn phase(items: u64, t: Duration, commits: u64, mixed: u64, cpu: f64) -> GatewayPhase {
    let s = t.as_secs_f64();
    GatewayPhase {
        items_per_sec: items as f64 / s,
        items,
        seconds: s,
        commits,
        items_per_commit: items as f64 / commits.max(1) as f64,
        mix_unwraps_per_sec: mixed as f64 / s,
        cpu_cores_busy: cpu / s,
    }
}

/// Runs the benchmark with its store under `dir`.
pub fn run(dir: &std::path::Path, opts: &GatewayBenchOptions) -> anyhow::Result<GatewayReport> {
    let mut rng = StdRng::seed_from_u64(0x9a7e);
    let cores = cores();
    let secret = StaticSecret::from([42u8; 32]);
    let mut keys = KeyRing::new();
    keys.insert(0, secret.clone());
    let frames = mix_frames(&secret, 2048)?;
    let pid = std::process::id();

    // 1. Unwrap capacity on all cores.
    let (_, n) = with_mixing(&keys, &frames, cores, None, || {
        std::thread::sleep(opts.capacity_time)
    });
    let capacity = n as f64 / opts.capacity_time.as_secs_f64();
    let mix_rate = capacity * opts.mix_fraction / cores as f64;

    // Payloads with real SURB-acks, and the store with its accounts.
    let ack_route: Vec<Hop> = (0..4u8)
        .map(|i| Hop {
            address: [10 + i; 32],
            sphinx_key: sphinx::generate_key(&mut rng).1,
        })
        .collect();
    let accounts = opts.accounts.clamp(1, 200);
    let payloads = exit_payloads(&mut rng, &secret, &ack_route, 1024, accounts)?;
    let (store, recovered) = Store::open(&dir.join("bench.redb"), &opts.store, &mut rng)?;
    let config = MailboxConfig {
        redelivery_timeout: Duration::from_secs(3600),
        ..MailboxConfig::default()
    };
    let pull_batch = config.pull_batch;
    let mut mailbox = Mailbox::restore(config, recovered)?;
    let mut mailboxes = Vec::new();
    for i in 0..accounts {
        let mailbox_addr = [i as u8; 32];
        let key = [i as u8 ^ 0x80; 32];
        if mailbox.create_account(&mailbox_addr, key, u32::MAX).is_ok() {
            mailboxes.push(key);
        }
    }
    let (tx, results) = mpsc::channel();
    let mut d = Driver {
        mailbox,
        store,
        results,
        tx,
        in_flight: 0,
        acks_built: 0,
    };
    d.flush(1)?;
    d.settle(true)?;

    // 2. Commit ceiling: one item per transaction, back to back.
    let t0 = Instant::now();
    let mut one = 0u64;
    while t0.elapsed() < Duration::from_millis(1500) {
        let (dest, surb, p) = &payloads[one as usize % payloads.len()];
        d.mailbox.deliver(dest, *surb, p, SystemTime::now());
        d.flush(1)?;
        d.settle(true)?;
        one += 1;
    }
    let commit_ceiling = one as f64 / t0.elapsed().as_secs_f64();

    // 3. Ingest while mixing.
    let commits0 = d.store.stats().commits;
    let acks0 = d.acks_built;
    let cpu0 = cpu_seconds_of(pid);
    let t0 = Instant::now();
    let (res, mixed) = with_mixing(&keys, &frames, cores, Some(mix_rate), || {
        let mut i = 0usize;
        let now = SystemTime::now();
        while t0.elapsed() < opts.phase {
            for _ in 0..64 {
                let (dest, surb, p) = &payloads[i % payloads.len()];
                d.mailbox.deliver(dest, *surb, p, now);
                i += 1;
            }
            d.flush(2)?;
            // Backpressure as in the driver: at most a few thousand items wait for
            // the writer, so a commit stays a bounded batch.
            d.settle(d.mailbox.in_flight_batches() >= 2 && i.is_multiple_of(4096))?;
        }
        d.flush(usize::MAX)?;
        while d.in_flight > 0 {
            d.settle(true)?;
            d.flush(usize::MAX)?;
        }
        anyhow::Ok(())
    });
    res?;
    let ingest_t = t0.elapsed();
    let ingest = phase(
        d.acks_built - acks0,
        ingest_t,
        d.store.stats().commits - commits0,
        mixed,
        cpu_seconds_of(pid) - cpu0,
    );

    // 4. Pull + ack while mixing, over what ingest stored.
    let commits0 = d.store.stats().commits;
    let cpu0 = cpu_seconds_of(pid);
    let deleted = AtomicU64::new(0);
    let t0 = Instant::now();
    let (res, mixed) = with_mixing(&keys, &frames, cores, Some(mix_rate), || {
        let now = SystemTime::now();
        let mut k = 0usize;
        let mut empty_rounds = 0usize;
        while t0.elapsed() < opts.phase && empty_rounds < mailboxes.len() {
            let account = mailboxes[k % mailboxes.len()];
            k += 1;
            let plan = d.mailbox.pull(&account, now)?;
            let ids: Vec<u64> = plan
                .items()
                .iter()
                .filter_map(|i| match i {
                    PullItem::Real { id, .. } => Some(*id),
                    PullItem::Dummy => None,
                })
                .collect();
            for msg in d.store.load(&plan)? {
                std::hint::black_box(msg.to_frame()?);
            }
            if ids.is_empty() {
                empty_rounds += 1;
                continue;
            }
            empty_rounds = 0;
            let n = d.mailbox.ack(&account, &ids)?;
            deleted.fetch_add(n as u64, Ordering::Relaxed);
            d.flush(2)?;
            d.settle(false)?;
        }
        d.flush(usize::MAX)?;
        while d.in_flight > 0 {
            d.settle(true)?;
            d.flush(usize::MAX)?;
        }
        anyhow::Ok(())
    });
    res?;
    let pull_t = t0.elapsed();
    let pull_ack = phase(
        deleted.load(Ordering::Relaxed),
        pull_t,
        d.store.stats().commits - commits0,
        mixed,
        cpu_seconds_of(pid) - cpu0,
    );
    let max_batch = opts.store.max_batch;
    d.store.close()?;
    Ok(GatewayReport {
        cores,
        unwrap_capacity_per_sec: capacity,
        mix_fraction: opts.mix_fraction,
        commit_ceiling_per_sec: commit_ceiling,
        commit_ceiling_items: one,
        ingest_target_per_sec: 20_000.0,
        ingest_ratio_to_target: ingest.items_per_sec / 20_000.0,
        ingest,
        pull_ack_target_per_sec: 50_000.0,
        pull_ack_ratio_to_target: pull_ack.items_per_sec / 50_000.0,
        pull_ack,
        pull_batch,
        store_max_batch: max_batch,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_run_stores_acks_and_deletes() {
        let dir = tempfile::tempdir().unwrap();
        let opts = GatewayBenchOptions {
            phase: Duration::from_millis(300),
            capacity_time: Duration::from_millis(200),
            accounts: 4,
            ..GatewayBenchOptions::default()
        };
        let r = run(dir.path(), &opts).unwrap();
        assert!(r.ingest.items > 0, "{r:?}");
        // Every ingested payload carried a real SURB, so every durable item built an ack;
        // the pull phase can delete no more than the two write phases stored.
        let stored = r.ingest.items + r.commit_ceiling_items;
        assert!(r.pull_ack.items > 0 && r.pull_ack.items <= stored, "{r:?}");
        assert!(r.unwrap_capacity_per_sec > 0.0);
    }
}

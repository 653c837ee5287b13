//! Criterion micro-benchmarks of the per-packet hot functions.
//!
//! `cargo bench -p shoal-bench --bench hot` (add `-- <filter>` for one group). Short
//! measurement windows keep a full run to a few minutes on two cores; the whole-process
//! figures (and the ratios that BENCHMARKS.md records) come from `shoal bench`.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use shoal_gateway::mailbox::{Mailbox, MailboxConfig};
use shoal_gateway::{Store, StoreConfig};
use shoal_packet::fragment::{self, ReassemblyLimits};
use shoal_packet::payload::INNER_BODY_SIZE;
use shoal_packet::{FRAME_SIZE, Frame, Reassembler, ReplayFilter, SPHINX_PAYLOAD_SIZE};
use shoal_relay::{KeyRing, MixConfig, MixCore, Unwrapper};
use shoal_topology::EpochSchedule;
use sphinx_packet::SphinxPacket;
use x25519_dalek::{PublicKey, StaticSecret};

fn secret() -> StaticSecret {
    StaticSecret::from([42u8; 32])
}

fn frames(n: usize) -> Vec<Vec<u8>> {
    let label = EpochSchedule::frame_label(0);
    shoal_bench::ceiling::packets_for(&secret(), n, 1)
        .iter()
        .map(|p| Frame::sphinx(label, p).unwrap().as_bytes().to_vec())
        .collect()
}

fn framing(c: &mut Criterion) {
    let mut g = c.benchmark_group("frame");
    let packet = shoal_bench::ceiling::packets_for(&secret(), 1, 1).remove(0);
    let bytes = Frame::sphinx(7, &packet).unwrap().as_bytes().to_vec();
    g.throughput(Throughput::Bytes(FRAME_SIZE as u64));
    g.bench_function("encode", |b| {
        b.iter(|| Frame::sphinx(7, std::hint::black_box(&packet)).unwrap())
    });
    g.bench_function("decode", |b| {
        b.iter(|| Frame::decode(std::hint::black_box(&bytes)).unwrap())
    });
    g.finish();
}

/// Unwraps distinct packets; a fresh replay filter whenever the pool wraps (outside the
/// timed region), so every unwrap is a full one.
fn unwrap(c: &mut Criterion) {
    let pool = frames(256);
    let mut keys = KeyRing::new();
    keys.insert(0, secret());
    let mut g = c.benchmark_group("unwrap");
    g.sample_size(20);
    g.bench_function("shoal_unwrap_frame", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut done = 0u64;
            while done < iters {
                let u = Unwrapper::new(keys.clone(), 1 << 16);
                let take = (iters - done).min(pool.len() as u64) as usize;
                let start = Instant::now();
                for f in &pool[..take] {
                    std::hint::black_box(u.unwrap_frame(f).unwrap());
                }
                total += start.elapsed();
                done += take as u64;
            }
            total
        })
    });
    let s = secret();
    let mut i = 0usize;
    g.bench_function("raw_sphinx_packet_process", |b| {
        b.iter(|| {
            i = (i + 1) % pool.len();
            let p = SphinxPacket::from_bytes(&pool[i][shoal_packet::FRAME_HEADER_SIZE..]).unwrap();
            std::hint::black_box(p.process(&s).unwrap())
        })
    });
    g.finish();
}

fn replay(c: &mut Criterion) {
    let mut rng = StdRng::seed_from_u64(3);
    let tags: Vec<[u8; 32]> = (0..100_000).map(|_| rng.random()).collect();
    let mut g = c.benchmark_group("replay_filter");
    g.bench_function("insert_fresh", |b| {
        b.iter_batched(
            || ReplayFilter::new(0, 1 << 20),
            |f| {
                for t in &tags[..1000] {
                    std::hint::black_box(f.insert(0, t));
                }
                f
            },
            BatchSize::LargeInput,
        )
    });
    let full = ReplayFilter::new(0, 1 << 20);
    for t in &tags {
        full.insert(0, t);
    }
    let mut i = 0usize;
    g.bench_function("check_in_100k", |b| {
        b.iter(|| {
            i = (i + 7) % tags.len();
            full.contains(0, &tags[i])
        })
    });
    g.finish();
}

fn delay_queue(c: &mut Criterion) {
    let mut keys = KeyRing::new();
    keys.insert(0, secret());
    let unwrapper = Arc::new(Unwrapper::new(keys, 1 << 10));
    let frame = Frame::sphinx(0, &vec![0u8; shoal_packet::SPHINX_PACKET_SIZE]).unwrap();
    let mut rng = StdRng::seed_from_u64(5);
    let offsets: Vec<Duration> = (0..4096)
        .map(|_| Duration::from_micros(rng.random_range(0..200_000)))
        .collect();
    let mut g = c.benchmark_group("delay_queue");
    // Steady state with 4,096 packets held: push one with a random delay, pop the earliest.
    g.bench_function("push_pop_4096_held", |b| {
        let mut core = MixCore::new([1; 32], unwrapper.clone(), MixConfig::default());
        let t0 = Instant::now();
        for d in &offsets {
            core.schedule([2; 32], frame.clone(), t0 + *d).unwrap();
        }
        let mut i = 0usize;
        let far = t0 + Duration::from_secs(3600);
        b.iter(|| {
            i = (i + 1) % offsets.len();
            core.schedule([2; 32], frame.clone(), t0 + offsets[i])
                .unwrap();
            std::hint::black_box(core.poll_transmit(far))
        })
    });
    g.finish();
}

fn seal(c: &mut Criterion) {
    let mut rng = StdRng::seed_from_u64(9);
    let recipient = StaticSecret::random_from_rng(&mut rng);
    let public = PublicKey::from(&recipient);
    let inner = vec![3u8; INNER_BODY_SIZE];
    let sealed = shoal_client::seal::seal(&mut rng, &public, &inner).unwrap();
    let mut g = c.benchmark_group("payload");
    g.bench_function("seal", |b| {
        b.iter(|| shoal_client::seal::seal(&mut rng, &public, &inner).unwrap())
    });
    g.bench_function("open", |b| {
        b.iter(|| shoal_client::seal::open(&recipient, &sealed).unwrap())
    });
    g.finish();
}

fn fragments(c: &mut Criterion) {
    let message = vec![1u8; 20_000];
    let mut g = c.benchmark_group("fragment");
    g.throughput(Throughput::Bytes(message.len() as u64));
    g.bench_function("fragment_20k", |b| {
        b.iter(|| fragment::fragment([4; 16], &message).unwrap())
    });
    let parts = fragment::fragment([4; 16], &message).unwrap();
    let now = Instant::now();
    g.bench_function("reassemble_20k", |b| {
        b.iter_batched(
            || (Reassembler::new(ReassemblyLimits::default()), parts.clone()),
            |(mut r, parts)| {
                let mut last = None;
                for p in parts {
                    last = Some(r.insert(p, now));
                }
                last
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

/// One durable group commit of 64 mailbox items (redb on disk, fsync per commit).
fn store(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = StdRng::seed_from_u64(11);
    let (store, recovered) = Store::open(
        &dir.path().join("b.redb"),
        &StoreConfig::default(),
        &mut rng,
    )
    .unwrap();
    let mut mailbox = Mailbox::restore(MailboxConfig::default(), recovered).unwrap();
    mailbox.create_account(&[5; 32], [6; 32], u32::MAX).unwrap();
    let first = mailbox.poll_write().unwrap();
    mailbox.on_commit(store.commit(first));
    let payload = vec![0u8; SPHINX_PAYLOAD_SIZE];
    let mut g = c.benchmark_group("store");
    g.sample_size(20);
    g.throughput(Throughput::Elements(64));
    g.bench_function("commit_batch_64", |b| {
        b.iter(|| {
            let now = SystemTime::now();
            for i in 0..64u8 {
                mailbox.deliver(&[5; 32], [i; 16], &payload, now);
            }
            let batch = mailbox.poll_write().unwrap();
            mailbox.on_commit(store.commit(batch))
        })
    });
    g.finish();
}

criterion_group! {
    name = hot;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = framing, unwrap, replay, delay_queue, seal, fragments, store
}
criterion_main!(hot);

//! A flood of bad frames into a relay and a gateway over their real QUIC links, from a
//! node that is in the directory: malformed (bad version byte), truncated (a stream
//! that ends mid-frame), unknown key epoch, wrong Sphinx key, and replays of good
//! packets. Nothing crashes, VmRSS stays bounded, every bad frame is counted by cause
//! in `/metrics`, and good packets sent during the flood all cross the network.
//!
//! `SHOAL_FLOOD_FRAMES` sets the total number of bad frames (default 1,000,000).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rand::SeedableRng;
use rand::rngs::StdRng;
use shoal_bench::standin::{StandIn, network_info, wait_for_topology};
use shoal_bench::testnet::{GatewayOptions, Testnet, TestnetConfig};
use shoal_link::FrameSender;
use shoal_packet::{FRAME_SIZE, Frame, PLAINTEXT_SIZE};
use shoal_relay::Unwrapper;
use shoal_relay::core::Processed;
use shoal_topology::route::sample_delays;
use shoal_topology::{EpochSchedule, NodeId, Topology};

/// Wrong-key frames and replays each cost the receiver a Sphinx unwrap; they are
/// sent paced, the cheap kinds as fast as the link takes them.
const WRONG_KEY: usize = 10_000;
const GOOD: usize = 2_000;
const TRUNCATED: usize = 1_000;
/// Peak VmRSS allowed for the flooded processes.
const MAX_RSS_MIB: f64 = 512.0;

fn total_frames() -> usize {
    std::env::var("SHOAL_FLOOD_FRAMES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000)
}

fn rss_mib(pid: u32) -> f64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// `shoal_relay_packets_dropped_total` by reason.
async fn drops(metrics: SocketAddr) -> HashMap<String, f64> {
    let (_, body) = shoal_link::http::get(metrics, "/metrics").await.unwrap();
    String::from_utf8_lossy(&body)
        .lines()
        .filter_map(|l| l.strip_prefix("shoal_relay_packets_dropped_total{reason=\""))
        .filter_map(|rest| {
            let (reason, v) = rest.split_once("\"} ")?;
            Some((reason.to_string(), v.trim().parse().ok()?))
        })
        .collect()
}

/// Five-hop packets `[a, first, L2, L3, b]` with the first layer stripped as `a` would.
/// With `wrong_key`, the second hop's Sphinx key is replaced by a random one, so the
/// frame is well formed but fails its MAC check there.
fn build(
    topo: &Topology,
    a: &StandIn,
    b: NodeId,
    n: usize,
    seed: u64,
    wrong_key: bool,
) -> Vec<(NodeId, Vec<u8>)> {
    let label = EpochSchedule::frame_label(topo.epoch());
    let unwrapper = Unwrapper::new(a.keys.clone(), 1 << 20);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let mut route = topo
            .client_route(&mut rng, topo.epoch(), &a.id(), &b)
            .unwrap();
        if wrong_key {
            let secret = x25519_dalek::StaticSecret::random_from_rng(&mut rng);
            route[1].sphinx_key = x25519_dalek::PublicKey::from(&secret);
        }
        let delays = sample_delays(&mut rng, topo.params(), route.len());
        let mut plaintext = vec![0u8; PLAINTEXT_SIZE];
        plaintext[..8].copy_from_slice(&(i as u64).to_be_bytes());
        let (p, _) =
            shoal_packet::sphinx::build_forward(&mut rng, &route, &delays, &[7; 32], &plaintext)
                .unwrap();
        let frame = Frame::sphinx(label, &p.packet).unwrap();
        match unwrapper.unwrap_frame(frame.as_bytes()).unwrap() {
            Processed::Forward { to, frame, .. } => out.push((to, frame.as_bytes().to_vec())),
            Processed::Final { .. } => panic!("first hop was final"),
        }
    }
    out
}

/// What one flooded node received, by kind.
#[derive(Debug, Default, Clone, Copy)]
struct Sent {
    malformed: u64,
    truncated: u64,
    unknown_epoch: u64,
    wrong_key: u64,
    replays: u64,
}

impl Sent {
    fn total(&self) -> u64 {
        self.malformed + self.truncated + self.unknown_epoch + self.wrong_key + self.replays
    }
}

/// Sends the cheap kinds (malformed, unknown epoch) as fast as the stream takes them,
/// the expensive kinds paced, then the truncated streams.
async fn flood(
    link: &shoal_link::Link,
    cheap: usize,
    valid_frame: &[u8],
    wrong_key: &[Vec<u8>],
    replays: &[Vec<u8>],
    sent: &mut Sent,
) {
    let mut tx = link.open_frames(FRAME_SIZE).await.unwrap();
    let mut malformed = valid_frame.to_vec();
    malformed[0] ^= 0xff;
    // A well-formed Sphinx frame whose 16-bit key-epoch label no node holds.
    let mut unknown = valid_frame.to_vec();
    let label = u16::from_be_bytes([unknown[2], unknown[3]]).wrapping_add(1000);
    unknown[2..4].copy_from_slice(&label.to_be_bytes());
    for i in 0..cheap {
        if i % 3 == 2 {
            tx.send(&unknown).await.unwrap();
            sent.unknown_epoch += 1;
        } else {
            tx.send(&malformed).await.unwrap();
            sent.malformed += 1;
        }
    }
    paced(&mut tx, wrong_key).await;
    sent.wrong_key += wrong_key.len() as u64;
    paced(&mut tx, replays).await;
    sent.replays += replays.len() as u64;
    for _ in 0..TRUNCATED {
        let mut raw = link.connection().open_uni().await.unwrap();
        raw.write_all(&valid_frame[..FRAME_SIZE / 2]).await.unwrap();
        raw.finish().unwrap();
        sent.truncated += 1;
    }
}

/// Under the node's unwrap capacity on 2 shared cores, so frames are counted by their
/// own cause rather than shed as overload.
async fn paced(tx: &mut FrameSender, frames: &[Vec<u8>]) {
    for chunk in frames.chunks(200) {
        for f in chunk {
            tx.send(f).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_million_bad_frames_are_counted_and_good_traffic_flows() {
    let dir = tempfile::tempdir().unwrap();
    let shoal = Path::new(env!("CARGO_BIN_EXE_shoal"));
    let cfg = TestnetConfig {
        relays_per_layer: 1,
        mean_hop_delay_ms: 5.0,
        max_hop_delay_ms: 100.0,
        bootstrap_secs: 6,
        workers: Some(1),
        ..TestnetConfig::default()
    };
    let mut net = Testnet::start(shoal, &dir.path().join("net"), &cfg).unwrap();
    let gw = net
        .init_gateway(shoal, 0, &GatewayOptions::default())
        .unwrap();
    net.run_gateway(shoal, gw.clone()).unwrap();
    let info = {
        let mut tries = 0;
        loop {
            match network_info(net.authority_addr).await {
                Ok(i) => break i,
                Err(e) if tries > 100 => panic!("authority never answered: {e}"),
                Err(_) => tries += 1,
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let mut a = StandIn::bind(11).unwrap();
    let mut b = StandIn::bind(12).unwrap();
    a.register(&[net.authority_addr], &info).await.unwrap();
    b.register(&[net.authority_addr], &info).await.unwrap();
    b.spawn_sink(true, true);
    let mut expect = net.relay_ids();
    expect.extend([a.id(), b.id(), gw.id]);
    let topo = wait_for_topology(
        net.authority_addr,
        &net.authorities,
        &expect,
        Duration::from_secs(60),
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", net.log_tail("authority")));
    // Let the relays and the gateway fetch the same document.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let (good, wrong, gw_wrong) = tokio::task::block_in_place(|| {
        (
            build(&topo, &a, b.id(), GOOD, 1, false),
            build(&topo, &a, b.id(), WRONG_KEY, 2, true),
            build(&topo, &a, b.id(), WRONG_KEY / 5, 3, true),
        )
    });
    let l1 = good[0].0;
    assert!(good.iter().chain(&wrong).all(|(to, _)| *to == l1));
    let l1_index = net.relays.iter().position(|r| r.id == l1).unwrap();
    let l1_proc = net.relays[l1_index].proc.pid();
    let l1_metrics = net.relays[l1_index].metrics_addr;
    let gw_proc = net.gateways[0].proc.pid();
    let l1_link = a
        .endpoint
        .connect(topo.node(&l1).unwrap().addr, l1)
        .await
        .unwrap();
    let gw_link = a
        .endpoint
        .connect(topo.node(&gw.id).unwrap().addr, gw.id)
        .await
        .unwrap();

    // RSS of both flooded processes, sampled while the flood runs.
    let stop = Arc::new(AtomicBool::new(false));
    let peak = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
    let base = [rss_mib(l1_proc), rss_mib(gw_proc)];
    let sampler = {
        let (stop, peak) = (stop.clone(), peak.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                for (i, pid) in [l1_proc, gw_proc].into_iter().enumerate() {
                    peak[i].fetch_max((rss_mib(pid) * 1024.0) as u64, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };

    // Good packets on their own stream, spread over the flood.
    let good_frames: Vec<Vec<u8>> = good.iter().map(|(_, f)| f.clone()).collect();
    let good_task = {
        let link = l1_link.clone();
        let frames = good_frames.clone();
        tokio::spawn(async move {
            let mut tx = link.open_frames(FRAME_SIZE).await.unwrap();
            for chunk in frames.chunks(20) {
                for f in chunk {
                    tx.send(f).await.unwrap();
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };

    let total = total_frames();
    // Four fifths of the flood to the relay, one fifth to the gateway.
    let relay_share = total * 4 / 5;
    let gw_share = total - relay_share;
    let replays_relay = GOOD; // each good packet replayed once, after it was sent
    let started = Instant::now();
    let mut sent_relay = Sent::default();
    let mut sent_gw = Sent::default();
    let relay_cheap = relay_share - WRONG_KEY - replays_relay - TRUNCATED;
    let gw_wrong_frames: Vec<Vec<u8>> = gw_wrong.into_iter().map(|(_, f)| f).collect();
    let wrong_frames: Vec<Vec<u8>> = wrong.into_iter().map(|(_, f)| f).collect();
    let gw_cheap = gw_share - gw_wrong_frames.len() - TRUNCATED;
    let relay_flood = flood(
        &l1_link,
        relay_cheap,
        &good_frames[0],
        &wrong_frames,
        &[],
        &mut sent_relay,
    );
    let gw_flood = flood(
        &gw_link,
        gw_cheap,
        &good_frames[0],
        &gw_wrong_frames,
        &[],
        &mut sent_gw,
    );
    tokio::join!(relay_flood, gw_flood);
    good_task.await.unwrap();
    // Replays of every good packet, now that the relay has seen them all.
    let mut tx = l1_link.open_frames(FRAME_SIZE).await.unwrap();
    paced(&mut tx, &good_frames).await;
    sent_relay.replays += good_frames.len() as u64;
    let flood_secs = started.elapsed().as_secs_f64();

    let got = b.wait_for(GOOD as u64, Duration::from_secs(30)).await;
    // Wait until every frame sent has been counted (the workers drain their queue).
    let want_relay = sent_relay.total() as f64;
    let want_gw = sent_gw.total() as f64;
    let deadline = Instant::now() + Duration::from_secs(60);
    let (relay_drops, gw_drops) = loop {
        let r = drops(l1_metrics).await;
        let g = drops(gw.metrics_addr).await;
        let done = r.values().sum::<f64>() >= want_relay && g.values().sum::<f64>() >= want_gw;
        if done || Instant::now() > deadline {
            break (r, g);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    stop.store(true, Ordering::Relaxed);
    sampler.await.unwrap();
    let peak_mib = [
        peak[0].load(Ordering::Relaxed) as f64 / 1024.0,
        peak[1].load(Ordering::Relaxed) as f64 / 1024.0,
    ];
    println!(
        "flood: {} bad frames in {flood_secs:.1} s ({:.0}/s); relay sent {sent_relay:?}, \
         counted {relay_drops:?}; gateway sent {sent_gw:?}, counted {gw_drops:?}; \
         good packets {GOOD} sent during the flood, {got} delivered; \
         VmRSS relay {:.0} → peak {:.0} MiB, gateway {:.0} → peak {:.0} MiB",
        sent_relay.total() + sent_gw.total(),
        (sent_relay.total() + sent_gw.total()) as f64 / flood_secs,
        base[0],
        peak_mib[0],
        base[1],
        peak_mib[1],
    );

    assert!(net.relays[l1_index].proc.alive(), "the relay survived");
    assert!(net.gateways[0].proc.alive(), "the gateway survived");
    assert_eq!(got, GOOD as u64, "every good packet crossed the network");
    assert_eq!(
        b.received.frames.load(Ordering::Relaxed),
        GOOD as u64,
        "no replay or bad frame reached the exit"
    );
    for (name, sent, counted) in [
        ("relay", sent_relay, &relay_drops),
        ("gateway", sent_gw, &gw_drops),
    ] {
        let c = |k: &str| counted.get(k).copied().unwrap_or(0.0) as u64;
        // Shed frames (queues full, or the sender over its fair share of them) are
        // counted as such rather than by their own cause.
        let overload = c("overload") + c("peer_limit");
        assert_eq!(
            counted.values().sum::<f64>() as u64,
            sent.total(),
            "{name}: every bad frame is counted once: {counted:?}"
        );
        // The paced kinds are sent slowly enough that normally nothing is shed.
        assert!(c("malformed") + overload >= sent.malformed + sent.truncated);
        assert!(c("malformed") <= sent.malformed + sent.truncated);
        assert!(c("unknown_epoch") <= sent.unknown_epoch);
        assert!(c("unknown_epoch") + overload >= sent.unknown_epoch);
        assert!(c("bad_packet") <= sent.wrong_key);
        assert!(c("bad_packet") + overload >= sent.wrong_key);
        assert!(c("replay") <= sent.replays);
        assert!(c("replay") + overload >= sent.replays);
        if overload == 0 {
            assert_eq!(c("malformed"), sent.malformed + sent.truncated, "{name}");
            assert_eq!(c("unknown_epoch"), sent.unknown_epoch, "{name}");
            assert_eq!(c("bad_packet"), sent.wrong_key, "{name}");
            assert_eq!(c("replay"), sent.replays, "{name}");
        }
    }
    for (i, name) in ["relay", "gateway"].iter().enumerate() {
        assert!(
            peak_mib[i] < MAX_RSS_MIB,
            "{name} VmRSS peaked at {:.0} MiB",
            peak_mib[i]
        );
    }
}

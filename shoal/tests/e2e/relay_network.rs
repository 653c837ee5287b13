//! End to end over real processes: one `shoal authority`, 3 layers × 2 `shoal relay`
//! processes, and two stand-in gateways in this test. 10,000 packets cross all five
//! hops and every one arrives; 1,000 replays are all dropped and counted.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rand::SeedableRng;
use rand::rngs::StdRng;
use shoal_bench::standin::{StandIn, network_info, wait_for_topology};
use shoal_bench::testnet::{Testnet, TestnetConfig};
use shoal_packet::{FRAME_SIZE, Frame, PLAINTEXT_SIZE};
use shoal_relay::Unwrapper;
use shoal_relay::core::Processed;
use shoal_topology::route::sample_delays;
use shoal_topology::{EpochSchedule, NodeId, Topology};

const PACKETS: usize = 10_000;
const REPLAYS: usize = 1_000;

/// Builds 5-hop packets `[a, L1, L2, L3, b]` with a sequence number in the plaintext,
/// and strips the first layer as gateway `a` would. Returns (L1 relay, frame) pairs.
fn build(topo: &Topology, a: &StandIn, b: NodeId, n: usize) -> Vec<(NodeId, Vec<u8>)> {
    let label = EpochSchedule::frame_label(topo.epoch());
    let threads = 2;
    let per = n.div_ceil(threads);
    let unwrapper = Unwrapper::new(a.keys.clone(), 1 << 20);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let unwrapper = &unwrapper;
                s.spawn(move || {
                    let mut rng = StdRng::seed_from_u64(t as u64 + 100);
                    let mut out = Vec::new();
                    for i in t * per..((t + 1) * per).min(n) {
                        let route = topo
                            .client_route(&mut rng, topo.epoch(), &a.id(), &b)
                            .unwrap();
                        let delays = sample_delays(&mut rng, topo.params(), route.len());
                        let mut plaintext = vec![0u8; PLAINTEXT_SIZE];
                        plaintext[..8].copy_from_slice(&(i as u64).to_be_bytes());
                        let (p, _) = shoal_packet::sphinx::build_forward(
                            &mut rng, &route, &delays, &[7; 32], &plaintext,
                        )
                        .unwrap();
                        let frame = Frame::sphinx(label, &p.packet).unwrap();
                        match unwrapper.unwrap_frame(frame.as_bytes()).unwrap() {
                            Processed::Forward { to, frame, .. } => {
                                out.push((to, frame.as_bytes().to_vec()))
                            }
                            Processed::Final { .. } => panic!("first hop was final"),
                        }
                    }
                    out
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    })
}

async fn send_all(a: &StandIn, topo: &Topology, frames: &[(NodeId, Vec<u8>)]) {
    let mut senders = std::collections::HashMap::new();
    for (to, _) in frames {
        if !senders.contains_key(to) {
            let addr = topo.node(to).unwrap().addr;
            let link = a.endpoint.connect(addr, *to).await.unwrap();
            senders.insert(
                *to,
                (link.clone(), link.open_frames(FRAME_SIZE).await.unwrap()),
            );
        }
    }
    for chunk in frames.chunks(256) {
        for (to, f) in chunk {
            senders.get_mut(to).unwrap().1.send(f).await.unwrap();
        }
        // Stay well under the relays' capacity (one worker each, 7 processes on the CI
        // machine's 2 cores, every frame three padded datagrams): this test is about
        // delivery, not load; `shoal bench relay` measures capacity.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_packets_cross_five_hops_and_replays_are_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let shoal = Path::new(env!("CARGO_BIN_EXE_shoal"));
    let cfg = TestnetConfig {
        relays_per_layer: 2,
        mean_hop_delay_ms: 10.0,
        bootstrap_secs: 4,
        workers: Some(1),
        ..TestnetConfig::default()
    };
    let net = Testnet::start(shoal, dir.path(), &cfg).unwrap();
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
    let mut a = StandIn::bind(1).unwrap();
    let mut b = StandIn::bind(2).unwrap();
    a.register(&[net.authority_addr], &info).await.unwrap();
    b.register(&[net.authority_addr], &info).await.unwrap();
    b.spawn_sink(true, true);
    let mut expect = net.relay_ids();
    expect.extend([a.id(), b.id()]);
    let topo = wait_for_topology(
        net.authority_addr,
        &net.authorities,
        &expect,
        Duration::from_secs(60),
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", net.log_tail("authority")));
    for l in 0..3 {
        assert_eq!(topo.layer(l).len(), 2, "layer {l} has two relays");
    }
    // Give the relays a moment to fetch the same document.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let frames = tokio::task::block_in_place(|| build(&topo, &a, b.id(), PACKETS));
    assert_eq!(frames.len(), PACKETS);
    send_all(&a, &topo, &frames).await;
    let got = b.wait_for(PACKETS as u64, Duration::from_secs(60)).await;
    let arrivals = b.received.arrivals.lock().unwrap().clone();
    let seqs: HashSet<u64> = arrivals
        .iter()
        .filter_map(|a| {
            a.tag
                .map(|t| u64::from_be_bytes(t[..8].try_into().unwrap()))
        })
        .collect();
    assert_eq!(got, PACKETS as u64, "every packet arrives exactly once");
    assert_eq!(
        b.received.bad.load(Ordering::Relaxed),
        0,
        "every arrival unwraps at the exit"
    );
    assert_eq!(seqs.len(), PACKETS, "every sequence number arrives");
    assert!(seqs.iter().all(|&s| s < PACKETS as u64));

    // Replay 1,000 of the frames the first relays already processed.
    send_all(&a, &topo, &frames[..REPLAYS]).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut replays = 0.0;
        for i in 0..net.relays.len() {
            replays += net.metric(i, "shoal_relay_replays_total").await.unwrap();
        }
        if replays as usize >= REPLAYS || Instant::now() >= deadline {
            assert_eq!(replays as usize, REPLAYS, "every replay is counted");
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A replay that slipped through would arrive within three hops of at most 500 ms.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        b.received.frames.load(Ordering::Relaxed),
        PACKETS as u64,
        "no replay reaches the exit"
    );
    let mut forwarded = 0.0;
    for i in 0..net.relays.len() {
        forwarded += net
            .metric(i, "shoal_relay_packets_forwarded_total")
            .await
            .unwrap();
    }
    assert_eq!(
        forwarded as usize,
        PACKETS * 3,
        "three relay hops per packet"
    );
}

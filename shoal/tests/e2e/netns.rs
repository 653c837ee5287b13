//! The network across Linux network namespaces (one per node, veth into a bridge) with
//! 10% loss and 200 ms jitter on every link: every message is delivered and acked, with
//! a bounded number of client retransmissions. Needs root and `ip`; skipped otherwise.
//! The impairment is `tc netem` where the kernel has it, else a userspace proxy per
//! node address with the same parameters (see `shoal_bench::netns`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support::duo;
use crate::support::hosts;

use std::path::Path;
use std::time::{Duration, Instant};

use duo::alice_and_bob;
use hosts::namespaces;
use shoal_bench::netns::{Impairment, NsTestnet};
use shoal_bench::testnet::{GatewayOptions, TestnetConfig};

const MESSAGES: usize = 20;
/// At most this many client retransmissions in the whole run (one per message):
/// QUIC repairs link loss, so a retransmission means an ack came back later than the
/// retransmission timer.
const MAX_RETRANSMISSIONS: u64 = MESSAGES as u64;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_percent_loss_and_200ms_jitter_deliver_every_message() {
    let dir = tempfile::tempdir().unwrap();
    let shoal = Path::new(env!("CARGO_BIN_EXE_shoal"));
    let cfg = TestnetConfig {
        relays_per_layer: 1,
        mean_hop_delay_ms: 20.0,
        max_hop_delay_ms: 200.0,
        bootstrap_secs: 8,
        workers: Some(1),
        client_rates: Some([5.0, 1.0, 1.0]),
        ..TestnetConfig::default()
    };
    let imp = Impairment {
        delay: Duration::from_millis(200),
        jitter: Duration::from_millis(200),
        loss: 0.10,
    };
    let mut net = match NsTestnet::start(shoal, &dir.path().join("net"), &cfg, 2, Some(imp))
        .await
        .unwrap()
    {
        Ok(n) => n,
        Err(why) => {
            eprintln!("skipped: namespace network unavailable: {why}");
            return;
        }
    };
    let opts = GatewayOptions {
        redelivery_timeout_secs: 5,
        ..GatewayOptions::default()
    };
    let entry = net.init_gateway(shoal, 0, &opts).await.unwrap();
    let exit = net.init_gateway(shoal, 1, &opts).await.unwrap();
    let (mut duo, _) = alice_and_bob(
        &mut net,
        dir.path(),
        [&entry, &exit],
        Duration::from_secs(40),
        Duration::from_secs(30),
        |c| {
            c.pull_interval = Duration::from_millis(200);
            c.reconnect_min = Duration::from_millis(100);
            c.reconnect_max = Duration::from_millis(1000);
            // Six impaired links each way, up to 400 ms each, and QUIC's congestion
            // window collapses under 10% loss, so queues build: a round trip takes
            // seconds.
            c.client.retransmit.margin = Duration::from_secs(15);
            c.client.loop_margin = Duration::from_secs(15);
        },
    )
    .await;

    let started = Instant::now();
    for i in 0..MESSAGES {
        duo.send(format!("lossy link message {i}")).await;
    }
    let deadline = Instant::now() + Duration::from_secs(150);
    duo.run_until_all(MESSAGES, deadline, Duration::from_millis(100))
        .await;
    let elapsed = started.elapsed();
    let (a, b) = (duo.alice.stats(), duo.bob.stats());
    let (dropped, forwarded) = net.proxy_totals();
    println!(
        "netns loss/jitter: emulation {:?}, loss {:.0}%, delay {:?} ± {:?} per link direction; \
         sent {MESSAGES}, acked {}, delivered {}, client retransmissions {}, duplicate acks {}, \
         loops lost {} of {} returned, proxy datagrams dropped {dropped} of {}, elapsed {:.1} s",
        net.emulation.unwrap(),
        imp.loss * 100.0,
        imp.delay,
        imp.jitter,
        duo.acked.len(),
        duo.delivered.len(),
        a.core.retransmissions,
        a.core.duplicate_acks,
        a.core.loops_lost + b.core.loops_lost,
        a.core.loops_returned + b.core.loops_returned,
        dropped + forwarded,
        elapsed.as_secs_f64()
    );
    assert_eq!(
        duo.delivered.len(),
        MESSAGES,
        "every message is delivered (alice {a:?}; bob {b:?})\n{}",
        net.log_tail("gateway1")
    );
    for (id, body) in &duo.bodies {
        assert!(duo.acked.contains(id), "message {body:?} was never acked");
        assert!(duo.delivered.contains(body));
    }
    assert!(
        a.core.retransmissions <= MAX_RETRANSMISSIONS,
        "retransmissions are bounded: {} > {MAX_RETRANSMISSIONS}",
        a.core.retransmissions
    );
    if net.emulation == Some(shoal_bench::netns::Emulation::Proxy) {
        // The impairment really happened: about 10% of datagrams were dropped.
        let rate = dropped as f64 / (dropped + forwarded) as f64;
        assert!((0.07..0.13).contains(&rate), "proxy loss rate {rate}");
    }
    duo.shutdown().await;

    // Everything is torn down: no namespace of this network is left.
    let ns: Vec<String> = net.net.nodes().iter().map(|n| n.ns.clone()).collect();
    drop(net);
    let left = namespaces();
    for n in ns {
        assert!(!left.contains(&n), "namespace {n} left behind");
    }
}

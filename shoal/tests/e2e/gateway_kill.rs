//! Acked means durable: the exit gateway is killed with SIGKILL in the middle of a run
//! and restarted; every message whose sender saw an ack is still delivered.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support::duo;

use std::path::Path;
use std::time::{Duration, Instant};

use duo::alice_and_bob;
use shoal_bench::testnet::{GatewayOptions, Testnet, TestnetConfig};

const MESSAGES: usize = 24;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acked_messages_survive_sigkill_of_the_exit_gateway() {
    let dir = tempfile::tempdir().unwrap();
    let shoal = Path::new(env!("CARGO_BIN_EXE_shoal"));
    let cfg = TestnetConfig {
        relays_per_layer: 1,
        mean_hop_delay_ms: 20.0,
        max_hop_delay_ms: 200.0,
        bootstrap_secs: 6,
        workers: Some(1),
        client_rates: Some([10.0, 2.0, 2.0]),
        ..TestnetConfig::default()
    };
    let mut net = Testnet::start(shoal, &dir.path().join("net"), &cfg).unwrap();
    let entry = net
        .init_gateway(shoal, 0, &GatewayOptions::default())
        .unwrap();
    let exit = net
        .init_gateway(shoal, 1, &GatewayOptions::default())
        .unwrap();
    let (mut duo, _) = alice_and_bob(
        &mut net,
        dir.path(),
        [&entry, &exit],
        Duration::from_secs(30),
        Duration::from_secs(20),
        |c| {
            c.pull_interval = Duration::from_millis(100);
            c.reconnect_min = Duration::from_millis(100);
            c.reconnect_max = Duration::from_millis(500);
            c.client.retransmit.margin = Duration::from_millis(1500);
        },
    )
    .await;

    let mut killed = false;
    let mut acked_before_kill = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut next = 0;
    while Instant::now() < deadline && !duo.all(MESSAGES) {
        // Keep a few messages in flight at all times.
        if next < MESSAGES && next < duo.acked.len() + 4 {
            duo.send(format!("durable message {next}")).await;
            next += 1;
        }
        if !killed && duo.acked.len() >= MESSAGES / 3 {
            acked_before_kill = duo.acked.len();
            let g = net
                .gateways
                .iter_mut()
                .find(|g| g.init.id == exit.id)
                .unwrap();
            g.proc.kill();
            killed = true;
            tokio::time::sleep(Duration::from_millis(500)).await;
            net.run_gateway(shoal, exit.clone()).unwrap();
        }
        duo.step(Duration::from_millis(50)).await;
    }
    assert!(
        killed,
        "the exit gateway was killed mid-run (sent {next}, acked {}, delivered {}; alice {:?}; bob {:?})\n{}",
        duo.acked.len(),
        duo.delivered.len(),
        duo.alice.stats(),
        duo.bob.stats(),
        net.log_tail("gateway1")
    );
    println!(
        "exit gateway SIGKILL: killed after {acked_before_kill} acks and restarted; sent {next}, \
         acked {}, delivered {}, retransmissions {}",
        duo.acked.len(),
        duo.delivered.len(),
        duo.alice.stats().core.retransmissions
    );
    assert!(acked_before_kill > 0 && acked_before_kill < MESSAGES);
    duo.assert_no_acked_message_lost();
    assert_eq!(
        duo.delivered.len(),
        MESSAGES,
        "every message is delivered in the end"
    );
    duo.shutdown().await;
}

//! Acked means durable: the exit gateway is killed with SIGKILL in the middle of a run
//! and restarted; every message whose sender saw an ack is still delivered.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use shoal_bench::standin::wait_for_topology;
use shoal_bench::testnet::{GatewayOptions, Testnet, TestnetConfig};
use shoal_client::driver::{self, ClientHandle, DriverConfig, DriverEvent};
use shoal_client::{ClientStore, Identity};

const MESSAGES: usize = 24;

fn client(
    dir: &Path,
    name: &str,
    init: &shoal_bench::testnet::GatewayInit,
    net: &Testnet,
    account: SigningKey,
    identity: Identity,
) -> ClientHandle {
    let mut config = DriverConfig::new(init.client_addr, init.id, net.authorities.clone());
    config.pull_interval = Duration::from_millis(100);
    config.reconnect_min = Duration::from_millis(100);
    config.reconnect_max = Duration::from_millis(500);
    config.client.retransmit.margin = Duration::from_millis(1500);
    let cdir = dir.join(name);
    std::fs::create_dir_all(&cdir).unwrap();
    let store = Arc::new(ClientStore::open(cdir.join("client.redb")).unwrap());
    store.save_identity(&identity).unwrap();
    store.save_account_key(&account.to_bytes()).unwrap();
    driver::spawn(config, identity, &account, store).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acked_messages_survive_sigkill_of_the_exit_gateway() {
    let dir = tempfile::tempdir().unwrap();
    let shoal = Path::new(env!("CARGO_BIN_EXE_shoal"));
    let cfg = TestnetConfig {
        relays_per_layer: 1,
        mean_hop_delay_ms: 20.0,
        max_hop_delay_ms: 200.0,
        bootstrap_secs: 3,
        workers: Some(1),
        client_rates: Some([10.0, 2.0, 2.0]),
        ..TestnetConfig::default()
    };
    let mut net = Testnet::start(shoal, &dir.path().join("net"), &cfg).unwrap();
    let mut rng = rand::rng();
    let entry = net
        .init_gateway(shoal, 0, &GatewayOptions::default())
        .unwrap();
    let exit = net
        .init_gateway(shoal, 1, &GatewayOptions::default())
        .unwrap();
    let (alice_key, bob_key) = (
        SigningKey::generate(&mut rng),
        SigningKey::generate(&mut rng),
    );
    let alice_id = Identity::generate(&mut rng, entry.id);
    let bob_id = Identity::generate(&mut rng, exit.id);
    Testnet::add_account(
        shoal,
        &entry,
        &alice_key.verifying_key().to_bytes(),
        &alice_id.mailbox,
    )
    .unwrap();
    Testnet::add_account(
        shoal,
        &exit,
        &bob_key.verifying_key().to_bytes(),
        &bob_id.mailbox,
    )
    .unwrap();
    net.run_gateway(shoal, entry.clone()).unwrap();
    net.run_gateway(shoal, exit.clone()).unwrap();
    let mut expect = net.relay_ids();
    expect.extend([entry.id, exit.id]);
    wait_for_topology(
        net.authority_addr,
        &net.authorities,
        &expect,
        Duration::from_secs(30),
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", net.log_tail("authority")));

    let alice = client(dir.path(), "alice", &entry, &net, alice_key, alice_id);
    let bob = client(dir.path(), "bob", &exit, &net, bob_key, bob_id);
    for c in [&alice, &bob] {
        assert!(
            c.wait_for_directory(Duration::from_secs(20)).await,
            "client got no directory"
        );
    }
    let mut alice_events = alice.subscribe();
    let mut bob_events = bob.subscribe();
    let bob_contact = bob.contact();

    let mut bodies = HashMap::new();
    let mut acked = HashSet::new();
    let mut delivered = HashSet::new();
    let mut killed = false;
    let mut acked_before_kill = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut next = 0;
    while Instant::now() < deadline && (delivered.len() < MESSAGES || acked.len() < MESSAGES) {
        // Keep a few messages in flight at all times.
        if next < MESSAGES && next < acked.len() + 4 {
            let body = format!("durable message {next}");
            let id = alice
                .send(bob_contact, body.clone().into_bytes())
                .await
                .unwrap();
            bodies.insert(id, body);
            next += 1;
        }
        if !killed && acked.len() >= MESSAGES / 3 {
            acked_before_kill = acked.len();
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
        tokio::select! {
            e = alice_events.recv() => if let Ok(DriverEvent::Acked { message_id }) = e {
                acked.insert(message_id);
            },
            e = bob_events.recv() => if let Ok(DriverEvent::Message { bytes, .. }) = e {
                delivered.insert(String::from_utf8(bytes).unwrap());
            },
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    }
    assert!(
        killed,
        "the exit gateway was killed mid-run (sent {next}, acked {}, delivered {}; alice {:?}; bob {:?})\n{}",
        acked.len(),
        delivered.len(),
        alice.stats(),
        bob.stats(),
        net.log_tail("gateway1")
    );
    assert!(acked_before_kill > 0 && acked_before_kill < MESSAGES);
    for id in &acked {
        let body = &bodies[id];
        assert!(delivered.contains(body), "acked message {body:?} was lost");
    }
    assert_eq!(
        delivered.len(),
        MESSAGES,
        "every message is delivered in the end"
    );
    alice.shutdown().await;
    bob.shutdown().await;
}

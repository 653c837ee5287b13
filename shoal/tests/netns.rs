//! The network across Linux network namespaces (one per node, veth into a bridge) with
//! 10% loss and 200 ms jitter on every link: every message is delivered and acked, with
//! a bounded number of client retransmissions. Needs root and `ip`; skipped otherwise.
//! The impairment is `tc netem` where the kernel has it, else a userspace proxy per
//! node address with the same parameters (see `shoal_bench::netns`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use shoal_bench::netns::{Impairment, NsTestnet};
use shoal_bench::standin::wait_for_topology;
use shoal_bench::testnet::{GatewayInit, GatewayOptions, Testnet, TestnetConfig};
use shoal_client::driver::{self, ClientHandle, DriverConfig, DriverEvent};
use shoal_client::{ClientStore, Identity};

const MESSAGES: usize = 20;
/// At most this many client retransmissions in the whole run (one per message):
/// QUIC repairs link loss, so a retransmission means an ack came back later than the
/// retransmission timer.
const MAX_RETRANSMISSIONS: u64 = MESSAGES as u64;

fn client(
    dir: &Path,
    name: &str,
    init: &GatewayInit,
    net: &NsTestnet,
    account: SigningKey,
    identity: Identity,
) -> ClientHandle {
    let mut config = DriverConfig::new(init.client_addr, init.id, net.authorities.clone());
    config.pull_interval = Duration::from_millis(200);
    config.reconnect_min = Duration::from_millis(100);
    config.reconnect_max = Duration::from_millis(1000);
    // Six impaired links each way, up to 400 ms each, and QUIC's congestion window
    // collapses under 10% loss, so queues build: a round trip takes seconds.
    config.client.retransmit.margin = Duration::from_secs(15);
    config.client.loop_margin = Duration::from_secs(15);
    let cdir = dir.join(name);
    std::fs::create_dir_all(&cdir).unwrap();
    let store = Arc::new(ClientStore::open(cdir.join("client.redb")).unwrap());
    store.save_identity(&identity).unwrap();
    store.save_account_key(&account.to_bytes()).unwrap();
    driver::spawn(config, identity, &account, store).unwrap()
}

fn namespaces() -> String {
    Command::new("ip")
        .args(["netns", "list"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_percent_loss_and_200ms_jitter_deliver_every_message() {
    let dir = tempfile::tempdir().unwrap();
    let shoal = Path::new(env!("CARGO_BIN_EXE_shoal"));
    let cfg = TestnetConfig {
        relays_per_layer: 1,
        mean_hop_delay_ms: 20.0,
        max_hop_delay_ms: 200.0,
        bootstrap_secs: 3,
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
    let mut rng = rand::rng();
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
    net.run_gateway(shoal, 0, entry.clone()).unwrap();
    net.run_gateway(shoal, 1, exit.clone()).unwrap();
    let mut expect = net.relay_ids();
    expect.extend([entry.id, exit.id]);
    wait_for_topology(
        net.authority_addr,
        &net.authorities,
        &expect,
        Duration::from_secs(40),
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", net.log_tail("authority")));

    let alice = client(dir.path(), "alice", &entry, &net, alice_key, alice_id);
    let bob = client(dir.path(), "bob", &exit, &net, bob_key, bob_id);
    for c in [&alice, &bob] {
        assert!(
            c.wait_for_directory(Duration::from_secs(30)).await,
            "client got no directory\n{}",
            net.log_tail("gateway0")
        );
    }
    let mut alice_events = alice.subscribe();
    let mut bob_events = bob.subscribe();
    let bob_contact = bob.contact();

    let started = Instant::now();
    let mut bodies = HashMap::new();
    for i in 0..MESSAGES {
        let body = format!("lossy link message {i}");
        let id = alice
            .send(bob_contact, body.clone().into_bytes())
            .await
            .unwrap();
        bodies.insert(id, body);
    }
    let mut acked = HashSet::new();
    let mut delivered = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(150);
    while Instant::now() < deadline && (delivered.len() < MESSAGES || acked.len() < MESSAGES) {
        tokio::select! {
            e = alice_events.recv() => if let Ok(DriverEvent::Acked { message_id }) = e {
                acked.insert(message_id);
            },
            e = bob_events.recv() => if let Ok(DriverEvent::Message { bytes, .. }) = e {
                delivered.insert(String::from_utf8(bytes).unwrap());
            },
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
    let elapsed = started.elapsed();
    let (a, b) = (alice.stats(), bob.stats());
    let (dropped, forwarded) = net.proxy_totals();
    println!(
        "netns loss/jitter: emulation {:?}, loss {:.0}%, delay {:?} ± {:?} per link direction; \
         sent {MESSAGES}, acked {}, delivered {}, client retransmissions {}, duplicate acks {}, \
         loops lost {} of {} returned, proxy datagrams dropped {dropped} of {}, elapsed {:.1} s",
        net.emulation.unwrap(),
        imp.loss * 100.0,
        imp.delay,
        imp.jitter,
        acked.len(),
        delivered.len(),
        a.core.retransmissions,
        a.core.duplicate_acks,
        a.core.loops_lost + b.core.loops_lost,
        a.core.loops_returned + b.core.loops_returned,
        dropped + forwarded,
        elapsed.as_secs_f64()
    );
    assert_eq!(
        delivered.len(),
        MESSAGES,
        "every message is delivered (alice {a:?}; bob {b:?})\n{}",
        net.log_tail("gateway1")
    );
    for (id, body) in &bodies {
        assert!(acked.contains(id), "message {body:?} was never acked");
        assert!(delivered.contains(body));
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
    alice.shutdown().await;
    bob.shutdown().await;

    // Everything is torn down: no namespace of this network is left.
    let ns: Vec<String> = net.net.nodes().iter().map(|n| n.ns.clone()).collect();
    drop(net);
    let left = namespaces();
    for n in ns {
        assert!(!left.contains(&n), "namespace {n} left behind");
    }
}

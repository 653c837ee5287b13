//! Faults survived, on loopback with short epochs:
//! - an authority down (N = 3, k = 2): documents keep being published with 2 signatures;
//! - a relay killed mid-run: the authority drops it once its descriptor is stale (two
//!   epochs), clients route by the first document without it, and every message (acked
//!   ones included) is still delivered and acked;
//! - every node (authority, relays, gateways) restarted across an epoch edge: every
//!   message delivered and acked, and no frame dropped for an unknown key epoch.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{HashMap, HashSet};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ed25519_dalek::SigningKey;
use shoal_bench::standin::{fetch_topology, wait_for_topology};
use shoal_bench::testnet::{GatewayInit, GatewayOptions, Proc, Testnet, TestnetConfig};
use shoal_client::driver::{self, ClientHandle, DriverConfig, DriverEvent};
use shoal_client::{ClientStore, Identity};
use shoal_link::http;
use shoal_topology::{
    AuthoritySet, Descriptor, Hex32, Role, SignedDescriptor, SignedDocument, SphinxKeyEntry,
    UncheckedDocument,
};

const SHOAL: &str = env!("CARGO_BIN_EXE_shoal");

/// The tests of this file run one at a time: each is timing-sensitive (short epochs,
/// retransmission timers), and together on 2 cores they starved each other.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn shoal(args: &[&str]) -> String {
    let out = Command::new(SHOAL).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "shoal {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// Replaces `key = ...` lines of a generated TOML file.
fn set_keys(path: &Path, values: &[(&str, String)]) {
    let text = std::fs::read_to_string(path).unwrap();
    let mut out = String::new();
    for line in text.lines() {
        let key = line.split('=').next().unwrap_or("").trim();
        match values.iter().find(|(k, _)| *k == key) {
            Some((k, v)) if !line.starts_with('#') => out.push_str(&format!("{k} = {v}\n")),
            _ => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    std::fs::write(path, out).unwrap();
}

fn descriptor(i: u8, role: Role, now: u64, epochs: std::ops::Range<u64>) -> SignedDescriptor {
    let key = SigningKey::from_bytes(&[i; 32]);
    Descriptor {
        identity: Hex32(key.verifying_key().to_bytes()),
        role,
        link_addr: format!("127.0.0.1:{}", 9000 + u16::from(i)),
        sphinx_keys: epochs
            .map(|epoch| SphinxKeyEntry {
                epoch,
                key: Hex32([i.wrapping_add(epoch as u8); 32]),
            })
            .collect(),
        published_unix: now,
    }
    .sign(&key)
    .unwrap()
}

fn spawn_authority(dir: &Path, name: &str) -> Proc {
    let child = Command::new(SHOAL)
        .args(["authority", "run", "--config"])
        .arg(dir.join("authority.toml"))
        .env("SHOAL_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("stderr.log")).unwrap())
        .spawn()
        .unwrap();
    Proc::from_child(name, child)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn documents_keep_being_published_with_one_authority_down() {
    let _serial = SERIAL.lock().await;
    const EPOCH: u64 = 6;
    let base = tempfile::tempdir().unwrap();
    let addrs: Vec<SocketAddr> = (0..3).map(|_| free_addr()).collect();
    let dirs: Vec<PathBuf> = (0..3).map(|i| base.path().join(format!("a{i}"))).collect();
    let genesis = now_unix().to_string();
    let epoch_secs = EPOCH.to_string();
    let init = |i: usize, extra: &[String]| {
        let (dir, listen) = (dirs[i].to_str().unwrap(), addrs[i].to_string());
        let mut args: Vec<&str> = vec!["authority", "init", "--dir", dir, "--listen", &listen];
        args.extend(["--genesis", &genesis, "--epoch-secs", &epoch_secs]);
        args.extend(extra.iter().map(String::as_str));
        shoal(&args)
    };
    let keys: Vec<String> = (0..3).map(|i| init(i, &[])).collect();
    for i in 0..3 {
        let mut extra = vec!["--threshold".to_string(), "2".into(), "--force".into()];
        for j in (0..3).filter(|&j| j != i) {
            extra.extend(["--peer".to_string(), format!("{}={}", addrs[j], keys[j])]);
        }
        assert_eq!(init(i, &extra), keys[i]);
        set_keys(
            &dirs[i].join("authority.toml"),
            &[
                ("sync_interval_secs", "1".into()),
                ("bootstrap_delay_secs", "1".into()),
                ("vote_lead_secs", "2".into()),
            ],
        );
    }
    let auths = AuthoritySet {
        threshold: 2,
        keys: keys
            .iter()
            .map(|k| {
                let mut b = [0u8; 32];
                hex::decode_to_slice(k, &mut b).unwrap();
                Hex32(b)
            })
            .collect(),
    };
    let mut procs: Vec<Proc> = (0..3)
        .map(|i| spawn_authority(&dirs[i], &format!("authority{i}")))
        .collect();

    // Nodes re-upload their descriptors (to every authority) as real ones do.
    let genesis_unix: u64 = genesis.parse().unwrap();
    let first_epoch = (now_unix() - genesis_unix) / EPOCH;
    let post = {
        let addrs = addrs.clone();
        tokio::spawn(async move {
            loop {
                let now = now_unix();
                // Keys for this epoch and the next few, as a node publishes them.
                let e = ((now - genesis_unix) / EPOCH).max(first_epoch);
                let ds: Vec<SignedDescriptor> = (1..=3)
                    .map(|i| descriptor(i, Role::Relay, now, e..e + 4))
                    .chain((101..=102).map(|i| descriptor(i, Role::Gateway, now, e..e + 4)))
                    .collect();
                for &a in &addrs {
                    for d in &ds {
                        let _ = http::post(a, "/v1/descriptor", &d.to_json()).await;
                    }
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
    };

    let signed_document = |addr: SocketAddr, epoch: u64| {
        let auths = auths.clone();
        async move {
            let (status, body) = http::get(addr, &format!("/v1/document/{epoch}"))
                .await
                .unwrap_or((0, Vec::new()));
            if status != 200 {
                return None;
            }
            let sigs = serde_json::from_slice::<SignedDocument>(&body)
                .ok()?
                .signatures
                .len();
            let doc = UncheckedDocument::parse(&body).ok()?;
            doc.check_signatures(&auths).ok().map(|_| sigs)
        }
    };

    // All three up: a document appears.
    let deadline = Instant::now() + Duration::from_secs(40);
    let up_epoch = loop {
        let e = (now_unix() - genesis.parse::<u64>().unwrap()) / EPOCH;
        if signed_document(addrs[0], e).await.is_some() {
            break e;
        }
        assert!(Instant::now() < deadline, "no document with all three up");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    procs[2].kill();
    let killed_in = (now_unix() - genesis.parse::<u64>().unwrap()) / EPOCH;

    // Three further epochs, each voted and signed while authority 2 is down.
    let mut published = Vec::new();
    for e in killed_in + 1..=killed_in + 3 {
        let deadline = Instant::now() + Duration::from_secs(3 * EPOCH);
        let sigs = loop {
            if let Some(s) = signed_document(addrs[0], e).await
                && signed_document(addrs[1], e).await.is_some()
            {
                break s;
            }
            assert!(
                Instant::now() < deadline,
                "no document for epoch {e} with authority 2 down"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        published.push((e, sigs));
    }
    post.abort();
    println!(
        "authority down (N=3, k=2): document for epoch {up_epoch} with all up; authority 2 \
         killed in epoch {killed_in}; documents published after: {published:?} (epoch, signatures)"
    );
    for (_, sigs) in &published {
        assert!(*sigs >= 2);
    }
}

/// Starts the authority again from its config (it keeps no state across restarts).
fn restart_authority(net: &mut Testnet) {
    let log = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(net.dir.join("authority.log"))
        .unwrap();
    let child = Command::new(SHOAL)
        .args(["authority", "run", "--config"])
        .arg(net.dir.join("authority").join("authority.toml"))
        .env("SHOAL_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    net.authority = Proc::from_child("authority", child);
}

fn client(
    dir: &Path,
    name: &str,
    init: &GatewayInit,
    net: &Testnet,
    account: SigningKey,
    identity: Identity,
) -> ClientHandle {
    let mut config = DriverConfig::new(init.client_addr, init.id, net.authorities.clone());
    config.pull_interval = Duration::from_millis(100);
    config.reconnect_min = Duration::from_millis(100);
    config.reconnect_max = Duration::from_millis(500);
    config.directory_refresh = Duration::from_secs(1);
    config.client.retransmit.margin = Duration::from_secs(2);
    // Attempts routed through a dead relay fail until the next document; without a cap
    // the doubling backoff would push the last retry past the test's horizon.
    config.client.retransmit.max_doublings = 1;
    let cdir = dir.join(name);
    std::fs::create_dir_all(&cdir).unwrap();
    let store = Arc::new(ClientStore::open(cdir.join("client.redb")).unwrap());
    store.save_identity(&identity).unwrap();
    store.save_account_key(&account.to_bytes()).unwrap();
    driver::spawn(config, identity, &account, store).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_relay_is_routed_around_from_the_next_document() {
    let _serial = SERIAL.lock().await;
    const MESSAGES: usize = 30;
    let dir = tempfile::tempdir().unwrap();
    let shoal = Path::new(SHOAL);
    // Short epochs: relays re-upload every 3 s and the authority leaves a node out of a
    // document once its descriptor is older than descriptor_max_age_secs (the default,
    // two epochs). A shorter age made live nodes flap out of documents under load.
    let cfg = TestnetConfig {
        relays_per_layer: 2,
        mean_hop_delay_ms: 20.0,
        max_hop_delay_ms: 200.0,
        bootstrap_secs: 3,
        epoch_secs: 12,
        workers: Some(1),
        client_rates: Some([10.0, 2.0, 2.0]),
        ..TestnetConfig::default()
    };
    let mut net = Testnet::start(shoal, &dir.path().join("net"), &cfg).unwrap();
    let mut rng = rand::rng();
    let opts = GatewayOptions::default();
    let entry = net.init_gateway(shoal, 0, &opts).unwrap();
    let exit = net.init_gateway(shoal, 1, &opts).unwrap();
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
    let topo = wait_for_topology(
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
        assert!(c.wait_for_directory(Duration::from_secs(20)).await);
    }
    let mut alice_events = alice.subscribe();
    let mut bob_events = bob.subscribe();
    let bob_contact = bob.contact();
    // The victim: a layer-2 relay.
    let victim_id = topo.layer(1)[0];
    let victim = net.relays.iter().position(|r| r.id == victim_id).unwrap();

    let mut bodies = HashMap::new();
    let mut acked = HashSet::new();
    let mut delivered = HashSet::new();
    let mut killed_at: Option<(Instant, u64)> = None;
    let mut routed_around: Option<(u64, Duration)> = None;
    let mut next = 0;
    let mut next_send = Instant::now();
    let mut last_check = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(150);
    while Instant::now() < deadline
        && (delivered.len() < MESSAGES || acked.len() < MESSAGES || routed_around.is_none())
    {
        // One message every 1.5 s, so sends span the kill and the epochs after it.
        if next < MESSAGES && Instant::now() >= next_send {
            let body = format!("fault message {next}");
            let id = alice
                .send(bob_contact, body.clone().into_bytes())
                .await
                .unwrap();
            bodies.insert(id, body);
            next += 1;
            next_send = Instant::now() + Duration::from_millis(1500);
        }
        if killed_at.is_none() && acked.len() >= 5 {
            net.relays[victim].proc.kill();
            let epoch = fetch_topology(net.authority_addr, &net.authorities, None)
                .await
                .map(|t| t.epoch())
                .unwrap_or(0);
            killed_at = Some((Instant::now(), epoch));
        }
        if let Some((at, _)) = killed_at
            && routed_around.is_none()
            && last_check.elapsed() > Duration::from_millis(500)
        {
            last_check = Instant::now();
            if let Ok(t) = fetch_topology(net.authority_addr, &net.authorities, None).await
                && t.node(&victim_id).is_none()
            {
                routed_around = Some((t.epoch(), at.elapsed()));
            }
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
    let a = alice.stats();
    println!(
        "relay killed: layer-2 relay killed in epoch {:?}; first document without it: {:?} \
         (epoch, time after the kill); sent {next}, acked {}, delivered {}, \
         retransmissions {}",
        killed_at.map(|k| k.1),
        routed_around,
        acked.len(),
        delivered.len(),
        a.core.retransmissions
    );
    assert!(killed_at.is_some(), "the relay was killed mid-run");
    assert!(
        routed_around.is_some(),
        "the authority published a document without the dead relay\n{}",
        net.log_tail("authority")
    );
    for id in &acked {
        assert!(delivered.contains(&bodies[id]), "acked message lost");
    }
    let mut drops = String::new();
    for (name, addr) in net
        .relays
        .iter()
        .map(|r| (format!("relay {:?}", &r.id[..2]), r.metrics_addr))
        .chain(
            net.gateways
                .iter()
                .map(|g| (g.init.name.clone(), g.init.metrics_addr)),
        )
    {
        let (_, body) = http::get(addr, "/metrics").await.unwrap_or((0, Vec::new()));
        let text = String::from_utf8_lossy(&body);
        let d: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("shoal_relay_packets_dropped_total{") && !l.ends_with(" 0"))
            .collect();
        drops.push_str(&format!("{name}: {d:?}\n"));
    }
    assert_eq!(
        delivered.len(),
        MESSAGES,
        "every message delivered (alice {a:?}, bob {:?})\n{drops}",
        bob.stats()
    );
    assert_eq!(acked.len(), MESSAGES, "every message acked\n{drops}");
    alice.shutdown().await;
    bob.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_node_restarted_at_an_epoch_edge_loses_nothing() {
    let _serial = SERIAL.lock().await;
    const MESSAGES: usize = 20;
    const EPOCH: u64 = 12;
    let dir = tempfile::tempdir().unwrap();
    let shoal = Path::new(SHOAL);
    let cfg = TestnetConfig {
        relays_per_layer: 1,
        mean_hop_delay_ms: 50.0,
        max_hop_delay_ms: 500.0,
        bootstrap_secs: 3,
        epoch_secs: EPOCH,
        workers: Some(1),
        client_rates: Some([10.0, 2.0, 2.0]),
        ..TestnetConfig::default()
    };
    let mut net = Testnet::start(shoal, &dir.path().join("net"), &cfg).unwrap();
    let mut rng = rand::rng();
    let opts = GatewayOptions::default();
    let entry = net.init_gateway(shoal, 0, &opts).unwrap();
    let exit = net.init_gateway(shoal, 1, &opts).unwrap();
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
        Duration::from_secs(40),
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", net.log_tail("authority")));
    let alice = client(dir.path(), "alice", &entry, &net, alice_key, alice_id);
    let bob = client(dir.path(), "bob", &exit, &net, bob_key, bob_id);
    for c in [&alice, &bob] {
        assert!(c.wait_for_directory(Duration::from_secs(20)).await);
    }
    let mut alice_events = alice.subscribe();
    let mut bob_events = bob.subscribe();
    let bob_contact = bob.contact();

    // Half the messages go out, then everything is restarted around the next edge
    // (down from 1 s before it to 0.5 s after), then the other half.
    let mut bodies = HashMap::new();
    let send = async |i: usize, bodies: &mut HashMap<_, _>| {
        let body = format!("edge message {i}");
        let id = alice
            .send(bob_contact, body.clone().into_bytes())
            .await
            .unwrap();
        bodies.insert(id, body);
    };
    for i in 0..MESSAGES / 2 {
        send(i, &mut bodies).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let unix = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let to_edge =
        Duration::from_secs(EPOCH) - Duration::from_secs_f64(unix.as_secs_f64() % EPOCH as f64);
    // Too close to this edge to kill before it: take the next one.
    let to_edge = if to_edge < Duration::from_secs(2) {
        to_edge + Duration::from_secs(EPOCH)
    } else {
        to_edge
    };
    let edge_epoch = (unix + to_edge).as_secs() / EPOCH;
    tokio::time::sleep(to_edge - Duration::from_secs(1)).await;
    net.authority.kill();
    for r in &mut net.relays {
        r.proc.kill();
    }
    for g in &mut net.gateways {
        g.proc.kill();
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    restart_authority(&mut net);
    for i in 0..net.relays.len() {
        net.restart_relay(shoal, i).unwrap();
    }
    net.gateways.clear();
    net.run_gateway(shoal, entry.clone()).unwrap();
    net.run_gateway(shoal, exit.clone()).unwrap();
    for i in MESSAGES / 2..MESSAGES {
        send(i, &mut bodies).await;
    }

    let mut acked = HashSet::new();
    let mut delivered = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline && (delivered.len() < MESSAGES || acked.len() < MESSAGES) {
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
    let mut unknown_epoch = 0.0;
    for i in 0..net.relays.len() {
        let (_, body) = http::get(net.relays[i].metrics_addr, "/metrics")
            .await
            .unwrap_or((0, Vec::new()));
        let text = String::from_utf8_lossy(&body);
        unknown_epoch += text
            .lines()
            .filter(|l| {
                l.starts_with("shoal_relay_packets_dropped_total{reason=\"unknown_epoch\"}")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>();
    }
    let a = alice.stats();
    println!(
        "restart at epoch edge: authority, {} relays and 2 gateways down across the start of \
         epoch {edge_epoch}; sent {MESSAGES}, acked {}, delivered {}, retransmissions {}, \
         relay frames dropped for an unknown key epoch after restart {unknown_epoch}",
        net.relays.len(),
        acked.len(),
        delivered.len(),
        a.core.retransmissions
    );
    for id in &acked {
        assert!(delivered.contains(&bodies[id]), "acked message lost");
    }
    assert_eq!(
        delivered.len(),
        MESSAGES,
        "every message delivered\n{}",
        net.log_tail("gateway1")
    );
    assert_eq!(acked.len(), MESSAGES, "every message acked");
    assert_eq!(
        unknown_epoch, 0.0,
        "the old epoch's key still unwraps after the restart"
    );
    alice.shutdown().await;
    bob.shutdown().await;
}

//! Faults survived, on loopback with short epochs:
//! - an authority down (N = 3, k = 2): documents keep being published with 2 signatures;
//! - a relay killed mid-run: the authority drops it once its descriptor is stale (two
//!   epochs), clients route by the first document without it, and every message (acked
//!   ones included) is still delivered and acked;
//! - every node (authority, relays, gateways) restarted across an epoch edge: every
//!   message delivered and acked, and no frame dropped for an unknown key epoch.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support::authorities;
use crate::support::duo;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use authorities::{Authorities, SHOAL, descriptor, free_addr, now_unix};
use duo::{Duo, alice_and_bob};
use shoal_bench::standin::fetch_topology;
use shoal_bench::testnet::{GatewayOptions, Proc, Testnet, TestnetConfig, sum_metric};
use shoal_client::driver::DriverConfig;
use shoal_link::http;
use shoal_topology::{Role, SignedDescriptor, SignedDocument, Topology, UncheckedDocument};

/// The tests of this file run one at a time: each is timing-sensitive (short epochs,
/// retransmission timers), and together on 2 cores they starved each other.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn documents_keep_being_published_with_one_authority_down() {
    let _serial = SERIAL.lock().await;
    const EPOCH: u64 = 6;
    let base = tempfile::tempdir().unwrap();
    let addrs: Vec<SocketAddr> = (0..3).map(|_| free_addr()).collect();
    let genesis = now_unix();
    let epoch_secs = EPOCH.to_string();
    let edits = [
        ("sync_interval_secs", "1".to_string()),
        ("bootstrap_delay_secs", "1".into()),
        ("vote_lead_secs", "2".into()),
    ];
    let mut procs = Authorities::init(
        base.path(),
        addrs.clone(),
        genesis,
        2,
        &["--epoch-secs", &epoch_secs],
        &edits,
    );
    let auths = procs.set.clone();
    for i in 0..3 {
        procs.start(i);
    }

    // Nodes re-upload their descriptors (to every authority) as real ones do.
    let first_epoch = (now_unix() - genesis) / EPOCH;
    let post = {
        let addrs = addrs.clone();
        tokio::spawn(async move {
            loop {
                let now = now_unix();
                // Keys for this epoch and the next few, as a node publishes them.
                let e = ((now - genesis) / EPOCH).max(first_epoch);
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
        let e = (now_unix() - genesis) / EPOCH;
        if signed_document(addrs[0], e).await.is_some() {
            break e;
        }
        assert!(Instant::now() < deadline, "no document with all three up");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    procs.kill(2);
    let killed_in = (now_unix() - genesis) / EPOCH;

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

/// Both gateways set up, then Alice and Bob with [`tune`]'s timers.
async fn start_alice_and_bob(net: &mut Testnet, dir: &Path) -> (Duo, Topology) {
    let shoal = Path::new(SHOAL);
    let opts = GatewayOptions::default();
    let entry = net.init_gateway(shoal, 0, &opts).unwrap();
    let exit = net.init_gateway(shoal, 1, &opts).unwrap();
    let (document, directory) = (Duration::from_secs(40), Duration::from_secs(20));
    alice_and_bob(net, dir, [&entry, &exit], document, directory, tune).await
}

/// Client timers for short epochs and a dead relay.
fn tune(config: &mut DriverConfig) {
    config.pull_interval = Duration::from_millis(100);
    config.reconnect_min = Duration::from_millis(100);
    config.reconnect_max = Duration::from_millis(500);
    config.directory_refresh = Duration::from_secs(1);
    config.client.retransmit.margin = Duration::from_secs(2);
    // Attempts routed through a dead relay fail until the next document; without a cap
    // the doubling backoff would push the last retry past the test's horizon.
    config.client.retransmit.max_doublings = 1;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_relay_is_routed_around_from_the_next_document() {
    let _serial = SERIAL.lock().await;
    const MESSAGES: usize = 30;
    let dir = tempfile::tempdir().unwrap();
    let shoal = Path::new(SHOAL);
    // Short epochs: nodes re-upload every second and the authority leaves a node out of
    // the document of epoch e once its newest descriptor is older than start(e) -
    // descriptor_max_age_secs (the default: vote lead 3 s + 4 s), so the relay is gone
    // from the next document voted 4 s after its death: epoch k+1 or, if it died after
    // that vote's cutoff, k+2.
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
    let (mut duo, topo) = start_alice_and_bob(&mut net, dir.path()).await;
    // The victim: a layer-2 relay.
    let victim_id = topo.layer(1)[0];
    let victim = net.relays.iter().position(|r| r.id == victim_id).unwrap();

    let kill_phase: (f64, f64) = match std::env::var("SHOAL_TEST_KILL_PHASE") {
        Ok(v) if v == "late" => (0.6, 0.9),
        _ => (0.05, 0.35),
    };
    let mut killed_at: Option<(Instant, u64)> = None;
    let mut routed_around: Option<(u64, Duration)> = None;
    let mut victim_status: Option<serde_json::Value> = None;
    let mut next = 0;
    let mut next_send = Instant::now();
    let mut last_check = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(150);
    while Instant::now() < deadline && (!duo.all(MESSAGES) || routed_around.is_none()) {
        // One message every 1.5 s, so sends span the kill and the epochs after it.
        if next < MESSAGES && Instant::now() >= next_send {
            duo.send(format!("fault message {next}")).await;
            next += 1;
            next_send = Instant::now() + Duration::from_millis(1500);
        }
        // Killed early in an epoch, so the next document is voted after its death.
        let phase = (now_unix() % cfg.epoch_secs) as f64 / cfg.epoch_secs as f64;
        if killed_at.is_none()
            && duo.acked.len() >= 5
            && (kill_phase.0..kill_phase.1).contains(&phase)
        {
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
                // `shoal authority status` reads this roster; it must say why.
                let (_, roster) = http::get(net.authority_addr, "/v1/roster/current")
                    .await
                    .unwrap();
                let roster: serde_json::Value = serde_json::from_slice(&roster).unwrap();
                let victim_hex = hex::encode(victim_id);
                victim_status = roster["nodes"]
                    .as_array()
                    .and_then(|n| n.iter().find(|n| n["identity"] == victim_hex.as_str()))
                    .map(|n| n["status"].clone());
            }
        }
        duo.step(Duration::from_millis(50)).await;
    }
    let a = duo.alice.stats();
    println!(
        "relay killed: layer-2 relay killed in epoch {:?}; first document without it: {:?} \
         (epoch, time after the kill); sent {next}, acked {}, delivered {}, \
         retransmissions {}",
        killed_at.map(|k| k.1),
        routed_around,
        duo.acked.len(),
        duo.delivered.len(),
        a.core.retransmissions
    );
    assert!(killed_at.is_some(), "the relay was killed mid-run");
    assert!(
        routed_around.is_some(),
        "the authority published a document without the dead relay\n{}",
        net.log_tail("authority")
    );
    if let (Some((_, killed_epoch)), Some((gone_epoch, _))) = (killed_at, routed_around) {
        assert!(
            gone_epoch <= killed_epoch + 2,
            "the dead relay stayed in documents until epoch {gone_epoch} (killed in {killed_epoch})"
        );
    }
    assert_eq!(
        victim_status,
        Some(serde_json::json!("stale")),
        "the roster of the first epoch without the dead relay says it went stale"
    );
    duo.assert_no_acked_message_lost();
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
        duo.delivered.len(),
        MESSAGES,
        "every message delivered (alice {a:?}, bob {:?})\n{drops}",
        duo.bob.stats()
    );
    assert_eq!(
        duo.acked.len(),
        MESSAGES,
        "every message acked (alice {a:?}, bob {:?})\n{drops}",
        duo.bob.stats()
    );
    duo.shutdown().await;
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
    let (mut duo, _) = start_alice_and_bob(&mut net, dir.path()).await;

    // Half the messages go out, then everything is restarted around the next edge
    // (down from 1 s before it to 0.5 s after), then the other half.
    for i in 0..MESSAGES / 2 {
        duo.send(format!("edge message {i}")).await;
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
    let gateways: Vec<_> = net.gateways.drain(..).map(|g| g.init.clone()).collect();
    for init in gateways {
        net.run_gateway(shoal, init).unwrap();
    }
    for i in MESSAGES / 2..MESSAGES {
        duo.send(format!("edge message {i}")).await;
    }

    let deadline = Instant::now() + Duration::from_secs(120);
    duo.run_until_all(MESSAGES, deadline, Duration::from_millis(50))
        .await;
    let mut unknown_epoch = 0.0;
    for i in 0..net.relays.len() {
        let (_, body) = http::get(net.relays[i].metrics_addr, "/metrics")
            .await
            .unwrap_or((0, Vec::new()));
        unknown_epoch += sum_metric(
            &String::from_utf8_lossy(&body),
            "shoal_relay_packets_dropped_total{reason=\"unknown_epoch\"}",
        );
    }
    let a = duo.alice.stats();
    println!(
        "restart at epoch edge: authority, {} relays and 2 gateways down across the start of \
         epoch {edge_epoch}; sent {MESSAGES}, acked {}, delivered {}, retransmissions {}, \
         relay frames dropped for an unknown key epoch after restart {unknown_epoch}",
        net.relays.len(),
        duo.acked.len(),
        duo.delivered.len(),
        a.core.retransmissions
    );
    duo.assert_no_acked_message_lost();
    assert_eq!(
        duo.delivered.len(),
        MESSAGES,
        "every message delivered\n{}",
        net.log_tail("gateway1")
    );
    assert_eq!(duo.acked.len(), MESSAGES, "every message acked");
    assert_eq!(
        unknown_epoch, 0.0,
        "the old epoch's key still unwraps after the restart"
    );
    duo.shutdown().await;
}

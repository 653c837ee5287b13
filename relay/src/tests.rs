//! End-to-end tests of the driver over real QUIC on loopback, with an in-process
//! authority serving the real HTTP API.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use rand::SeedableRng;
use rand::rngs::StdRng;
use shoal_link::{LinkEndpoint, PeerSet, http, node_key};
use shoal_packet::sphinx::{self, Hop, Unwrapped};
use shoal_packet::{FRAME_SIZE, Frame, PLAINTEXT_SIZE, ReplayFilter};
use shoal_topology::{
    Authority, AuthorityConfig, AuthoritySet, Descriptor, EpochSchedule, Hex32, NetworkParams,
    NodeId, Role, SignedDescriptor, SphinxKeyEntry, Topology, UncheckedDocument,
};
use x25519_dalek::StaticSecret;

use crate::config::AuthorityAddr;
use crate::directory::unix_now;
use crate::keystore::tests::temp_dir;
use crate::{Config, DropReason, keystore};

async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

/// A node the test plays: identity, link endpoint, and Sphinx keys for epochs 0 and 1.
struct StandIn {
    key: SigningKey,
    endpoint: LinkEndpoint,
    addr: SocketAddr,
    sphinx: Vec<StaticSecret>,
}

impl StandIn {
    fn new(rng: &mut StdRng, accept: PeerSet) -> Self {
        let key = SigningKey::generate(rng);
        let endpoint = LinkEndpoint::bind("127.0.0.1:0".parse().unwrap(), &key, accept).unwrap();
        let addr = endpoint.local_addr().unwrap();
        let sphinx = (0..2).map(|_| sphinx::generate_key(rng).0).collect();
        StandIn {
            key,
            endpoint,
            addr,
            sphinx,
        }
    }

    /// Its descriptor in `role`, certified by its own operator, whom it admits at
    /// `authority`.
    fn admitted(&self, authority: &mut Authority, role: Role) -> SignedDescriptor {
        let operator = shoal_topology::operator::solo_operator_key(&self.key);
        authority
            .admit(shoal_topology::AdmittedOperator::solo(
                &operator, "stand-in",
            ))
            .unwrap();
        self.descriptor_as(role)
    }

    fn descriptor_as(&self, role: Role) -> SignedDescriptor {
        let operator = shoal_topology::operator::solo_operator_key(&self.key);
        let cert = shoal_topology::NodeCertificate::issue(&operator, node_key(&self.key), role);
        Descriptor {
            identity: Hex32(node_key(&self.key)),
            role,
            link_addr: self.addr.to_string(),
            sphinx_keys: self
                .sphinx
                .iter()
                .enumerate()
                .map(|(e, s)| SphinxKeyEntry {
                    epoch: e as u64,
                    key: Hex32(x25519_dalek::PublicKey::from(s).to_bytes()),
                })
                .collect(),
            published_unix: unix_now(),
            version: None,
        }
        .sign(&self.key)
        .unwrap()
        .certified(cert)
    }
}

/// [`admit_dir`] before the authority is served.
fn admit_dir_now(authority: &mut Authority, dir: &std::path::Path) {
    let op = keystore::self_certify(dir, Role::Relay).unwrap();
    authority.admit(op).unwrap();
}

/// Certifies the node in `dir` as its own operator and admits that operator.
fn admit_dir(authority: &Mutex<Authority>, dir: &std::path::Path, role: Role) {
    let op = keystore::self_certify(dir, role).unwrap();
    authority.lock().unwrap().admit(op).unwrap();
}

/// An authority (threshold 1) behind the real HTTP API. Documents are built on the
/// first request for them, by which time the relay has posted its descriptor.
async fn serve_authority(authority: Authority) -> (SocketAddr, Arc<Mutex<Authority>>) {
    serve_authority_after(authority, 0).await
}

/// As [`serve_authority`], but answers 404 for documents until `nodes` descriptors are in.
async fn serve_authority_after(
    authority: Authority,
    nodes: usize,
) -> (SocketAddr, Arc<Mutex<Authority>>) {
    let info = {
        let c = authority.config();
        serde_json::json!({
            "schedule": c.schedule,
            "params": c.params,
            "signed": authority.network_description().unwrap(),
        })
        .to_string()
    };
    let authority = Arc::new(Mutex::new(authority));
    let a = authority.clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(http::serve(listener, move |req| {
        let mut a = a.lock().unwrap();
        match (req.method.as_str(), req.path.as_str()) {
            ("GET", "/v1/network") => http::Response::new(200, "application/json", info.clone()),
            ("POST", "/v1/descriptor") => {
                match SignedDescriptor::from_json(&req.body)
                    .and_then(|d| a.handle_descriptor(d, unix_now()))
                {
                    Ok(_) => http::Response::text(200, "ok"),
                    Err(e) => http::Response::text(400, e.to_string()),
                }
            }
            ("GET", path) if path.starts_with("/v1/document/") => {
                let Ok(epoch) = path["/v1/document/".len()..].parse::<u64>() else {
                    return http::Response::not_found();
                };
                if a.document(epoch).is_none() && a.descriptors().len() < nodes {
                    return http::Response::not_found();
                }
                if a.document(epoch).is_none() {
                    a.vote(epoch).unwrap();
                }
                match a.document(epoch) {
                    Some(d) => http::Response::new(200, "application/json", d.to_json()),
                    None => http::Response::not_found(),
                }
            }
            _ => http::Response::not_found(),
        }
    }));
    (addr, authority)
}

fn relay_config(data_dir: std::path::PathBuf, authority: SocketAddr, key: [u8; 32]) -> Config {
    Config {
        data_dir,
        listen: "127.0.0.1:0".parse().unwrap(),
        public_addr: None,
        metrics_listen: Some("127.0.0.1:0".parse().unwrap()),
        workers: 2,
        queue_capacity: 1024,
        delay_queue_capacity: 10_000,
        replay_capacity: 100_000,
        peer_queue_capacity: 1024,
        authorities: vec![AuthorityAddr {
            addr: authority,
            key,
        }],
        threshold: 1,
    }
}

async fn wait_until(
    what: &str,
    relay: &crate::RelayHandle,
    cond: impl Fn(&crate::RelayStats) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = relay.stats();
        if cond(&s) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {s:#?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_forwards_over_quic_and_counts_what_it_drops() {
    let mut rng = StdRng::seed_from_u64(42);
    let now = unix_now();
    let auth_key = SigningKey::generate(&mut rng);
    let params = NetworkParams {
        lambda_m: 0.0,
        ..NetworkParams::default()
    };
    let authority = Authority::new(
        auth_key.clone(),
        AuthorityConfig {
            authorities: AuthoritySet {
                threshold: 1,
                keys: vec![Hex32(node_key(&auth_key))],
            },
            schedule: EpochSchedule {
                genesis_unix: now - 10,
                length_secs: 3600,
            },
            params,
            descriptor_max_age_secs: 86_400,
            vote_lead_secs: 60,
            bootstrap_delay_secs: 0,
            admission: Default::default(),
        },
    )
    .unwrap();

    // The relay's identity exists before it starts, so the next hop can list it.
    let data_dir = temp_dir("e2e");
    let relay_id = node_key(&keystore::create_identity(&data_dir, &mut rng).unwrap());
    let entry = StandIn::new(&mut rng, PeerSet::new());
    let exit = StandIn::new(&mut rng, PeerSet::from_keys([relay_id]));
    // Two more relays (stand-ins) so that every layer has one: no document is
    // published without a usable network.
    let fillers = [
        StandIn::new(&mut rng, PeerSet::new()),
        StandIn::new(&mut rng, PeerSet::new()),
    ];
    let (auth_addr, authority) = {
        let mut authority = authority;
        for s in [&entry, &exit] {
            let d = s.admitted(&mut authority, Role::Gateway);
            authority.handle_descriptor(d, now).unwrap();
        }
        for s in &fillers {
            let d = s.admitted(&mut authority, Role::Relay);
            authority.handle_descriptor(d, now).unwrap();
        }
        admit_dir_now(&mut authority, &data_dir);
        serve_authority(authority).await
    };

    let relay = crate::spawn(relay_config(
        data_dir.clone(),
        auth_addr,
        node_key(&auth_key),
    ))
    .await
    .unwrap();
    assert_eq!(relay.identity(), relay_id);
    assert!(
        relay.wait_for_directory(Duration::from_secs(10)).await,
        "no directory"
    );
    assert_eq!(relay.stats().directory_epoch, Some(0));

    // Read the relay's published Sphinx key from the document, as a client would.
    let doc = authority.lock().unwrap().document(0).unwrap().clone();
    let topo: Topology = UncheckedDocument::from_signed(doc)
        .unwrap()
        .check_signatures(&AuthoritySet {
            threshold: 1,
            keys: vec![Hex32(node_key(&auth_key))],
        })
        .unwrap()
        .check_valid_at(unix_now())
        .unwrap();
    assert!(topo.node(&relay_id).unwrap().layer.is_some());
    let route = vec![
        topo.hop(&relay_id, 0).unwrap(),
        topo.hop(&node_key(&exit.key), 0).unwrap(),
    ];
    let delays = vec![Duration::from_millis(5), Duration::ZERO];
    let label = EpochSchedule::frame_label(0);

    let mut plaintexts = Vec::new();
    let mut frames = Vec::new();
    for i in 0..20u8 {
        let plaintext = vec![i; PLAINTEXT_SIZE];
        let (p, _) =
            sphinx::build_forward(&mut rng, &route, &delays, &[7; 32], &plaintext).unwrap();
        assert_eq!(p.first_hop, relay_id);
        frames.push(Frame::sphinx(label, &p.packet).unwrap());
        plaintexts.push(plaintext);
    }
    // A packet whose next hop is not in the directory.
    let stranger = Hop {
        address: [0xee; 32],
        sphinx_key: sphinx::generate_key(&mut rng).1,
    };
    let (lost, _) = sphinx::build_forward(
        &mut rng,
        &[route[0].clone(), stranger],
        &delays,
        &[7; 32],
        &[0; PLAINTEXT_SIZE],
    )
    .unwrap();

    let link = within(
        "dial relay",
        entry.endpoint.connect(relay.local_addr(), relay_id),
    )
    .await
    .unwrap();
    let mut tx = link.open_frames(FRAME_SIZE).await.unwrap();
    for f in &frames {
        tx.send(f.as_bytes()).await.unwrap();
    }
    tx.send(frames[3].as_bytes()).await.unwrap(); // replay
    tx.send(Frame::sphinx(label, &lost.packet).unwrap().as_bytes())
        .await
        .unwrap(); // no route
    tx.send(Frame::sphinx(999, &lost.packet).unwrap().as_bytes())
        .await
        .unwrap(); // unknown epoch
    let mut garbage = *frames[0].as_bytes();
    garbage[0] = 0x7f;
    tx.send(&garbage).await.unwrap(); // bad version
    let mut flipped = *frames[5].as_bytes();
    flipped[10] ^= 1; // in the group element: a different secret, so not a replay
    tx.send(&flipped).await.unwrap(); // fails its MAC
    // Half a frame on its own stream, as a broken peer would send.
    let mut raw = link.connection().open_uni().await.unwrap();
    raw.write_all(&frames[0].as_bytes()[..FRAME_SIZE / 2])
        .await
        .unwrap();
    raw.finish().unwrap();

    // The exit receives exactly the good packets, and can read every one.
    let inbound = within("relay dials exit", exit.endpoint.accept())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(inbound.peer(), relay_id);
    let mut rx = within("exit stream", inbound.accept_frames(FRAME_SIZE))
        .await
        .unwrap();
    let filter = ReplayFilter::new(0, 1000);
    let mut seen = Vec::new();
    for _ in 0..frames.len() {
        let f = within("forwarded frame", rx.recv()).await.unwrap().unwrap();
        let frame = Frame::decode(f).unwrap();
        assert_eq!(frame.key_epoch(), label);
        match sphinx::unwrap(&exit.sphinx[0], 0, &filter, frame.body()).unwrap() {
            Unwrapped::Final {
                destination,
                payload,
                ..
            } => {
                assert_eq!(destination, [7; 32]);
                seen.push(sphinx::open_forward(&payload).unwrap());
            }
            Unwrapped::Forward { .. } => panic!("exit got a forward hop"),
        }
    }
    seen.sort();
    assert_eq!(seen, plaintexts);

    wait_until("drop counters", &relay, |s| {
        s.core.forwarded == 21
            && s.core.dropped(DropReason::Replay) == 1
            && s.core.dropped(DropReason::NoRoute) == 1
            && s.core.dropped(DropReason::UnknownEpoch) == 1
            && s.core.dropped(DropReason::BadPacket) == 1
            && s.core.dropped(DropReason::Malformed) == 2
    })
    .await;
    let s = relay.stats();
    assert_eq!(s.frames_received, 26);
    assert_eq!(s.core.received, 25);
    assert_eq!(s.core.dropped(DropReason::Overload), 0);
    assert_eq!(s.worker_queue_depth, 0);

    let (status, body) = http::get(relay.metrics_addr().unwrap(), "/health")
        .await
        .unwrap();
    let health = String::from_utf8(body).unwrap();
    assert_eq!(status, 200, "{health}");
    assert!(health.contains("\"status\":\"ok\""), "{health}");
    assert!(health.contains(env!("CARGO_PKG_VERSION")), "{health}");

    let (status, body) = http::get(relay.metrics_addr().unwrap(), "/metrics")
        .await
        .unwrap();
    assert_eq!(status, 200);
    let text = String::from_utf8(body).unwrap();
    for line in [
        "shoal_relay_frames_received_total 26",
        "shoal_relay_replays_total 1",
        "shoal_relay_packets_dropped_total{reason=\"no_route\"} 1",
        "shoal_relay_packets_dropped_total{reason=\"malformed\"} 2",
        "shoal_relay_directory_epoch 0",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in\n{text}"
        );
    }
    assert!(
        text.contains("shoal_relay_unwrap_seconds_count 25"),
        "{text}"
    );

    // The published key is on disk, so a restart unwraps with it.
    relay.shutdown().await;
    let ring = keystore::load_sphinx_keys(&data_dir).unwrap();
    assert_eq!(ring.epochs(), vec![0, 1, 2]);
    assert_eq!(ring.public(0), Some(route[0].sphinx_key));
    std::fs::remove_dir_all(&data_dir).unwrap();
}

#[tokio::test]
async fn unknown_peers_cannot_connect() {
    let mut rng = StdRng::seed_from_u64(5);
    let data_dir = temp_dir("refuse");
    keystore::create_identity(&data_dir, &mut rng).unwrap();
    keystore::self_certify(&data_dir, Role::Relay).unwrap();
    // An authority that never answers: the relay has no directory and accepts nobody.
    let config = relay_config(data_dir.clone(), "127.0.0.1:9".parse().unwrap(), [1; 32]);
    let mut config = config;
    config.authorities[0].key = node_key(&SigningKey::generate(&mut rng));
    let relay = crate::spawn(config).await.unwrap();
    let stranger = StandIn::new(&mut rng, PeerSet::new());
    if let Ok(link) = within(
        "dial",
        stranger
            .endpoint
            .connect(relay.local_addr(), relay.identity()),
    )
    .await
    {
        within("refused link closes", link.connection().closed()).await;
    }
    assert_eq!(relay.stats().frames_received, 0);
    relay.shutdown().await;
    std::fs::remove_dir_all(&data_dir).unwrap();
}

#[test]
fn init_writes_a_config_that_loads_and_refuses_to_overwrite() {
    let dir = temp_dir("init");
    let key = node_key(&SigningKey::from_bytes(&[3; 32]));
    let opts = crate::InitOptions {
        listen: "127.0.0.1:7001".parse().unwrap(),
        public_addr: None,
        metrics_listen: Some("127.0.0.1:9101".parse().unwrap()),
        authorities: vec![AuthorityAddr {
            addr: "127.0.0.1:8000".parse().unwrap(),
            key,
        }],
        threshold: Some(1),
    };
    let (path, id) = crate::config::init_dir(&dir, &opts).unwrap();
    let config = Config::load(&path).unwrap();
    assert_eq!(config.authorities[0].key, key);
    let identity = keystore::load_identity(&config.identity_path()).unwrap();
    assert_eq!(node_key(&identity), id);
    assert!(matches!(
        crate::config::init_dir(&dir, &opts),
        Err(crate::RelayError::AlreadyExists { .. })
    ));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Forwarding rate through the whole driver against the raw all-core unwrap rate of
/// the same packets on the same machine. Run with
/// `cargo test --release -p shoal-relay -- --ignored --nocapture throughput`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark; run in release"]
async fn throughput_vs_raw_unwrap() {
    const N: usize = 40_000;
    let mut rng = StdRng::seed_from_u64(43);
    let now = unix_now();
    let auth_key = SigningKey::generate(&mut rng);
    let authority = Authority::new(
        auth_key.clone(),
        AuthorityConfig {
            authorities: AuthoritySet {
                threshold: 1,
                keys: vec![Hex32(node_key(&auth_key))],
            },
            schedule: EpochSchedule {
                genesis_unix: now - 10,
                length_secs: 3600,
            },
            params: NetworkParams {
                lambda_m: 0.0,
                ..NetworkParams::default()
            },
            descriptor_max_age_secs: 86_400,
            vote_lead_secs: 60,
            bootstrap_delay_secs: 0,
            admission: Default::default(),
        },
    )
    .unwrap();
    let data_dir = temp_dir("bench");
    let relay_id = node_key(&keystore::create_identity(&data_dir, &mut rng).unwrap());
    let entry = StandIn::new(&mut rng, PeerSet::new());
    let exit = StandIn::new(&mut rng, PeerSet::from_keys([relay_id]));
    // Two more relays (stand-ins) so that every layer has one: no document is
    // published without a usable network.
    let fillers = [
        StandIn::new(&mut rng, PeerSet::new()),
        StandIn::new(&mut rng, PeerSet::new()),
    ];
    let (auth_addr, authority) = {
        let mut authority = authority;
        for s in [&entry, &exit] {
            let d = s.admitted(&mut authority, Role::Gateway);
            authority.handle_descriptor(d, now).unwrap();
        }
        for s in &fillers {
            let d = s.admitted(&mut authority, Role::Relay);
            authority.handle_descriptor(d, now).unwrap();
        }
        admit_dir_now(&mut authority, &data_dir);
        serve_authority(authority).await
    };
    let mut config = relay_config(data_dir.clone(), auth_addr, node_key(&auth_key));
    config.workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    config.queue_capacity = 65_536;
    config.peer_queue_capacity = 65_536;
    config.replay_capacity = 1_000_000;
    let relay = crate::spawn(config).await.unwrap();
    assert!(relay.wait_for_directory(Duration::from_secs(10)).await);
    let doc = authority.lock().unwrap().document(0).unwrap().clone();
    let topo = UncheckedDocument::from_signed(doc)
        .unwrap()
        .dangerously_assume_signed()
        .dangerously_assume_timely()
        .unwrap();
    let route = vec![
        topo.hop(&relay_id, 0).unwrap(),
        topo.hop(&node_key(&exit.key), 0).unwrap(),
    ];

    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let t0 = Instant::now();
    let frames: Vec<bytes::Bytes> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|t| {
                let route = route.clone();
                s.spawn(move || {
                    let mut rng = StdRng::seed_from_u64(t as u64);
                    (0..N / threads)
                        .map(|_| {
                            let (p, _) = sphinx::build_forward(
                                &mut rng,
                                &route,
                                &[Duration::ZERO, Duration::ZERO],
                                &[7; 32],
                                &[0; PLAINTEXT_SIZE],
                            )
                            .unwrap();
                            bytes::Bytes::copy_from_slice(
                                Frame::sphinx(0, &p.packet).unwrap().as_bytes(),
                            )
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        hs.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    eprintln!("built {} packets in {:?}", frames.len(), t0.elapsed());

    // Ceiling: the relay's own key, all cores, nothing around it.
    let secret = keystore::load_sphinx_keys(&data_dir)
        .unwrap()
        .get(0)
        .unwrap()
        .clone();
    let filter = ReplayFilter::new(0, N * 2);
    let t0 = Instant::now();
    std::thread::scope(|s| {
        for chunk in frames.chunks(frames.len().div_ceil(threads)) {
            let (secret, filter) = (&secret, &filter);
            s.spawn(move || {
                for f in chunk {
                    sphinx::unwrap(secret, 0, filter, &f[4..]).unwrap();
                }
            });
        }
    });
    let raw = frames.len() as f64 / t0.elapsed().as_secs_f64();

    let inbound = tokio::spawn(async move {
        let link = exit.endpoint.accept().await.unwrap().unwrap();
        let mut rx = link.accept_frames(FRAME_SIZE).await.unwrap();
        let mut n = 0usize;
        while n < N {
            match tokio::time::timeout(Duration::from_secs(5), rx.recv()).await {
                Ok(Ok(Some(_))) => n += 1,
                _ => break,
            }
        }
        (n, Instant::now())
    });
    let link = entry
        .endpoint
        .connect(relay.local_addr(), relay_id)
        .await
        .unwrap();
    let mut tx = link.open_frames(FRAME_SIZE).await.unwrap();
    let t0 = Instant::now();
    // Offer load a little above the ceiling so the relay, not the sender, is the limit.
    let mut sent = 0usize;
    for batch in frames.chunks(64) {
        let target = t0 + Duration::from_secs_f64(sent as f64 / (raw * 1.1));
        tokio::time::sleep_until(target.into()).await;
        let mut b = batch.to_vec();
        tx.send_many(&mut b).await.unwrap();
        sent += batch.len();
    }
    let (received, done) = inbound.await.unwrap();
    let elapsed = done.duration_since(t0).as_secs_f64();
    let fwd = received as f64 / elapsed;
    let s = relay.stats();
    let lat = relay.latencies();
    eprintln!(
        "raw unwrap {raw:.0}/s on {threads} threads; relay forwarded {received}/{} at {fwd:.0}/s = {:.2}x; drops {:?}; \
         unwrap p50 {} us, queue p99 {} us, delay error p99 {} us",
        frames.len(),
        fwd / raw,
        s.core.dropped,
        lat.unwrap.value_at_quantile(0.5) / 1000,
        lat.queue_wait.value_at_quantile(0.99) / 1000,
        lat.delay_error.value_at_quantile(0.99) / 1000,
    );
    relay.shutdown().await;
    std::fs::remove_dir_all(&data_dir).unwrap();
}

fn test_authority(rng: &mut StdRng, params: NetworkParams) -> (SigningKey, Authority) {
    let auth_key = SigningKey::generate(rng);
    let authority = Authority::new(
        auth_key.clone(),
        AuthorityConfig {
            authorities: AuthoritySet {
                threshold: 1,
                keys: vec![Hex32(node_key(&auth_key))],
            },
            schedule: EpochSchedule {
                genesis_unix: unix_now() - 10,
                length_secs: 3600,
            },
            params,
            descriptor_max_age_secs: 86_400,
            vote_lead_secs: 60,
            bootstrap_delay_secs: 0,
            admission: Default::default(),
        },
    )
    .unwrap();
    (auth_key, authority)
}

/// Three relays (one per layer) and a forwarding stand-in gateway: every relay's λM loops
/// go round the whole layered cycle over real links and come back. Two workers per relay:
/// a loop usually returns to a worker other than the one that sent it (regression: loops
/// returning to another worker were taken for deliveries and later counted lost).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loops_return_through_three_layers() {
    let mut rng = StdRng::seed_from_u64(77);
    let params = NetworkParams {
        lambda_m: 20.0,
        mean_hop_delay_ms: 2.0,
        max_hop_delay_ms: 10.0,
        ..NetworkParams::default()
    };
    let (auth_key, mut authority) = test_authority(&mut rng, params);
    let gateway = StandIn::new(&mut rng, PeerSet::any());
    let d = gateway.admitted(&mut authority, Role::Gateway);
    authority.handle_descriptor(d, unix_now()).unwrap();
    let (auth_addr, authority) = serve_authority_after(authority, 4).await;

    let mut relays = Vec::new();
    let mut dirs = Vec::new();
    for i in 0..3 {
        let dir = temp_dir(&format!("loops{i}"));
        keystore::create_identity(&dir, &mut rng).unwrap();
        admit_dir(&authority, &dir, Role::Relay);
        let mut config = relay_config(dir.clone(), auth_addr, node_key(&auth_key));
        config.workers = 2;
        config.metrics_listen = None;
        relays.push(crate::spawn(config).await.unwrap());
        dirs.push(dir);
    }
    for r in &relays {
        assert!(
            r.wait_for_directory(Duration::from_secs(10)).await,
            "no directory"
        );
    }
    let doc = authority.lock().unwrap().document(0).unwrap().clone();
    let topo = Arc::new(
        UncheckedDocument::from_signed(doc)
            .unwrap()
            .dangerously_assume_signed()
            .dangerously_assume_timely()
            .unwrap(),
    );
    for l in 0..3 {
        assert_eq!(topo.layer(l).len(), 1, "one relay per layer");
    }

    // The gateway: unwrap with its key and forward at once to the next hop.
    let mut ring = crate::KeyRing::new();
    ring.insert(0, gateway.sphinx[0].clone());
    let unwrapper = Arc::new(crate::Unwrapper::new(ring, 100_000));
    let endpoint = Arc::new(gateway.endpoint);
    let (fwd_tx, mut fwd_rx) = tokio::sync::mpsc::unbounded_channel::<(NodeId, Frame)>();
    {
        let endpoint = endpoint.clone();
        tokio::spawn(async move {
            while let Some(Ok(link)) = endpoint.accept().await {
                let (unwrapper, fwd_tx) = (unwrapper.clone(), fwd_tx.clone());
                tokio::spawn(async move {
                    while let Ok(mut rx) = link.accept_frames(FRAME_SIZE).await {
                        let (unwrapper, fwd_tx) = (unwrapper.clone(), fwd_tx.clone());
                        tokio::spawn(async move {
                            while let Ok(Some(f)) = rx.recv().await {
                                if let Ok(crate::core::Processed::Forward { to, frame, .. }) =
                                    unwrapper.unwrap_frame(f)
                                {
                                    let _ = fwd_tx.send((to, frame));
                                }
                            }
                        });
                    }
                });
            }
        });
    }
    let topo2 = topo.clone();
    tokio::spawn(async move {
        let mut links = std::collections::HashMap::new();
        while let Some((to, frame)) = fwd_rx.recv().await {
            let (_, tx) = match links.entry(to) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(v) => {
                    let addr = topo2.node(&to).unwrap().addr;
                    let link = endpoint.connect(addr, to).await.unwrap();
                    let tx = link.open_frames(FRAME_SIZE).await.unwrap();
                    v.insert((link, tx))
                }
            };
            tx.send(frame.as_bytes()).await.unwrap();
        }
    });

    for r in &relays {
        wait_until("loops to return", r, |s| s.core.loops_returned >= 5).await;
        let s = r.stats();
        assert_eq!(s.core.loops_lost, 0);
        assert_eq!(s.core.delivered, 0, "every returning loop is recognised");
        assert_eq!(s.core.loop_build_failures, 0);
        assert_eq!(s.core.dropped(DropReason::Replay), 0);
    }
    for r in relays {
        r.shutdown().await;
    }
    for d in dirs {
        std::fs::remove_dir_all(&d).unwrap();
    }
}

/// Review finding: frames injected at a node (a gateway's clients) had no share of the
/// replay filter, so many accounts sending at once could fill it and force
/// `ReplayFilterFull` on the mail the last mix layer brings in, for the whole epoch.
#[test]
fn sybil_injected_frames_are_held_to_their_share() {
    let mut rng = StdRng::seed_from_u64(9);
    let secret = StaticSecret::from([7u8; 32]);
    let route = [Hop {
        address: [1; 32],
        sphinx_key: x25519_dalek::PublicKey::from(&secret),
    }];
    let mut ring = crate::KeyRing::new();
    ring.insert(0, secret);
    let unwrapper = crate::Unwrapper::new(ring, 40);
    // One upstream node precedes this one, plus the share of injected frames.
    unwrapper.set_upstream_shares(2);
    let mut frame = || {
        let (p, _) = sphinx::build_forward(
            &mut rng,
            &route,
            &[Duration::ZERO],
            &[7; 32],
            &[0; PLAINTEXT_SIZE],
        )
        .unwrap();
        Frame::sphinx(0, &p.packet).unwrap()
    };
    let full = (0..40)
        .filter(|_| {
            matches!(
                unwrapper.unwrap_frame(frame().as_bytes()),
                Err(DropReason::ReplayFilterFull)
            )
        })
        .count();
    assert_eq!(full, 20, "injected frames fill their share only");
    let upstream = [3u8; 32];
    for _ in 0..20 {
        assert!(
            unwrapper
                .unwrap_frame_from(frame().as_bytes(), Some(&upstream))
                .is_ok(),
            "the mix layer's frames still get in"
        );
    }
}

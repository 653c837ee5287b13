//! End-to-end tests of the driver over real QUIC on loopback: an in-process authority
//! behind the real HTTP API, three real relays (one per layer), two real gateways and
//! stand-in clients that speak raw frames built with the packet crate.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use rand::SeedableRng;
use rand::rngs::StdRng;
use shoal_link::{FrameReceiver, FrameSender, Link, LinkEndpoint, PeerSet, http, node_key};
use shoal_packet::payload::{
    AckSlot, BODY_SIZE, ack_message, join_plaintext, parse_ack_message, split_plaintext,
};
use shoal_packet::sphinx::{self, Hop, MailboxAddress, ReplyBlock};
use shoal_packet::{FRAME_SIZE, Frame};
use shoal_relay::config::AuthorityAddr;
use shoal_topology::{
    Authority, AuthorityConfig, AuthoritySet, EpochSchedule, Hex32, NetworkParams, NodeId,
    SignedDescriptor, Topology, UncheckedDocument,
};

use crate::config::Config;
use crate::mailbox::MailboxConfig;
use crate::store::StoreConfig;
use crate::{GatewayHandle, admin};
use shoal_packet::protocol::{ClientMsg, DirectoryAssembler, ErrorCode, GatewayMsg};

const PULL_BATCH: usize = 4;
const ALICE_BOX: MailboxAddress = [0xa1; 32];
const BOB_BOX: MailboxAddress = [0xb1; 32];

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

/// An authority (threshold 1) behind the real HTTP API that answers 404 for documents
/// until `nodes` descriptors are in, then votes on first request.
async fn serve_authority(
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
                if a.document(epoch).is_none() {
                    if a.descriptors().len() < nodes {
                        return http::Response::not_found();
                    }
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

fn node_config(
    data_dir: PathBuf,
    authority: SocketAddr,
    key: [u8; 32],
    workers: usize,
) -> shoal_relay::Config {
    shoal_relay::Config {
        data_dir,
        listen: "127.0.0.1:0".parse().unwrap(),
        public_addr: None,
        metrics_listen: Some("127.0.0.1:0".parse().unwrap()),
        workers,
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

pub(crate) fn gateway_config(dir: &Path, authority: SocketAddr, key: [u8; 32]) -> Config {
    Config {
        node: node_config(dir.to_owned(), authority, key, 2),
        client_listen: "127.0.0.1:0".parse().unwrap(),
        mailbox: MailboxConfig {
            pull_batch: PULL_BATCH,
            redelivery_timeout: Duration::from_secs(30),
            ttl: Duration::from_secs(3600),
        },
        default_quota: 100,
        store: StoreConfig::default(),
        limits: crate::LimitConfig::default(),
        subnets: Vec::new(),
        pull_answer_delay: crate::pull::DEFAULT_PULL_ANSWER_DELAY,
        legacy_leaks: false,
    }
}

/// A client that speaks raw frames to its gateway and checks every frame's size.
struct TestClient {
    _endpoint: LinkEndpoint,
    link: Link,
    tx: FrameSender,
    rx: Option<FrameReceiver>,
}

impl TestClient {
    async fn connect(key: &SigningKey, gateway: &GatewayHandle) -> Self {
        let endpoint =
            LinkEndpoint::bind("127.0.0.1:0".parse().unwrap(), key, PeerSet::new()).unwrap();
        let link = within(
            "dial gateway",
            endpoint.connect(gateway.client_addr(), gateway.identity()),
        )
        .await
        .unwrap();
        let tx = link.open_frames(FRAME_SIZE).await.unwrap();
        TestClient {
            _endpoint: endpoint,
            link,
            tx,
            rx: None,
        }
    }

    async fn send(&mut self, frame: &Frame) {
        assert_eq!(frame.as_bytes().len(), FRAME_SIZE);
        self.tx.send(frame.as_bytes()).await.unwrap();
    }

    async fn recv(&mut self) -> Option<GatewayMsg> {
        if self.rx.is_none() {
            self.rx = Some(
                within("gateway stream", self.link.accept_frames(FRAME_SIZE))
                    .await
                    .ok()?,
            );
        }
        let rx = self.rx.as_mut()?;
        let bytes = within("gateway frame", rx.recv()).await.ok()??;
        assert_eq!(
            bytes.len(),
            FRAME_SIZE,
            "every frame on a client link has one size"
        );
        Some(GatewayMsg::from_frame(&Frame::decode(bytes).unwrap()).unwrap())
    }

    /// One pull: exactly `PULL_BATCH` items or dummies, then `PullDone`.
    async fn pull(&mut self) -> Vec<GatewayMsg> {
        self.pull_acking(vec![]).await
    }

    /// One pull that acks `acks`.
    async fn pull_acking(&mut self, acks: Vec<u64>) -> Vec<GatewayMsg> {
        self.send(&ClientMsg::Pull { acks }.to_frame().unwrap())
            .await;
        let mut items = Vec::new();
        for _ in 0..PULL_BATCH {
            let m = self.recv().await.unwrap();
            assert!(
                matches!(m, GatewayMsg::Item { .. } | GatewayMsg::Dummy),
                "{m:?}"
            );
            items.push(m);
        }
        assert!(matches!(
            self.recv().await.unwrap(),
            GatewayMsg::PullDone { .. }
        ));
        items.retain(|m| matches!(m, GatewayMsg::Item { .. }));
        items
    }

    /// Pulls until an item arrives.
    async fn pull_until_item(&mut self) -> GatewayMsg {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(item) = self.pull().await.into_iter().next() {
                return item;
            }
            assert!(Instant::now() < deadline, "no item arrived");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn directory(&mut self) -> Vec<Vec<u8>> {
        self.send(&ClientMsg::GetDirectory.to_frame().unwrap())
            .await;
        let mut assembler = DirectoryAssembler::new(1 << 20);
        let mut docs = Vec::new();
        // Current and next epoch: two documents.
        while docs.len() < 2 {
            match self.recv().await.unwrap() {
                GatewayMsg::DirectoryChunk {
                    index,
                    count,
                    bytes,
                } => {
                    if let Some(doc) = assembler.push(index, count, &bytes).unwrap() {
                        docs.push(doc);
                    }
                }
                other => panic!("{other:?}"),
            }
        }
        docs
    }
}

/// A real packet from a client of `entry` to `mailbox` at `exit`, carrying a SURB-ack that
/// routes back to `ack_box` at `entry`. Returns the frame, the reply block and the body.
fn real_packet(
    rng: &mut StdRng,
    topo: &Topology,
    entry: &NodeId,
    exit: &NodeId,
    mailbox: &MailboxAddress,
    ack_box: &MailboxAddress,
    ack_id: [u8; 16],
) -> (Frame, ReplyBlock, Vec<u8>) {
    let body = vec![ack_id[0]; BODY_SIZE];
    real_packet_with_body(rng, topo, (entry, exit), mailbox, ack_box, ack_id, body)
}

/// [`real_packet`] with a chosen sealed body.
fn real_packet_with_body(
    rng: &mut StdRng,
    topo: &Topology,
    (entry, exit): (&NodeId, &NodeId),
    mailbox: &MailboxAddress,
    ack_box: &MailboxAddress,
    ack_id: [u8; 16],
    body: Vec<u8>,
) -> (Frame, ReplyBlock, Vec<u8>) {
    let epoch = topo.epoch();
    let delays = |n| vec![Duration::from_millis(1); n];
    let ack_route: Vec<Hop> = topo
        .client_route(rng, epoch, entry, entry)
        .unwrap()
        .split_off(1);
    let block = sphinx::build_surb(rng, &ack_route, &delays(ack_route.len()), ack_box).unwrap();
    let slot = AckSlot {
        surb: block.surb,
        message: ack_message(&ack_id, EpochSchedule::frame_label(epoch)),
    };
    let plaintext = join_plaintext(&slot, &body).unwrap();
    let route = topo.client_route(rng, epoch, entry, exit).unwrap();
    let (fwd, _) =
        sphinx::build_forward(rng, &route, &delays(route.len()), mailbox, &plaintext).unwrap();
    assert_eq!(&fwd.first_hop, entry);
    let frame = Frame::sphinx(EpochSchedule::frame_label(epoch), &fwd.packet).unwrap();
    (frame, block, body)
}

async fn wait_for(
    what: &str,
    gateway: &GatewayHandle,
    cond: impl Fn(&crate::GatewayStats) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = gateway.stats();
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
async fn packet_crosses_the_mixnet_into_a_mailbox_and_its_ack_comes_back() {
    let mut rng = StdRng::seed_from_u64(2024);
    let auth_key = SigningKey::generate(&mut rng);
    let auth_id = node_key(&auth_key);
    let authority = Authority::new(
        auth_key.clone(),
        AuthorityConfig {
            authorities: AuthoritySet {
                threshold: 1,
                keys: vec![Hex32(auth_id)],
            },
            schedule: EpochSchedule {
                genesis_unix: unix_now() - 10,
                length_secs: 3600,
            },
            params: NetworkParams {
                lambda_m: 2.0,
                mean_hop_delay_ms: 2.0,
                max_hop_delay_ms: 10.0,
                ..NetworkParams::default()
            },
            descriptor_max_age_secs: 86_400,
            vote_lead_secs: 60,
            bootstrap_delay_secs: 0,
            admission: Default::default(),
        },
    )
    .unwrap();
    let (auth_addr, authority) = serve_authority(authority, 5).await;

    let tmp = tempfile::tempdir().unwrap();
    let mut relays = Vec::new();
    for i in 0..3 {
        let dir = tmp.path().join(format!("relay{i}"));
        shoal_relay::keystore::create_identity(&dir, &mut rng).unwrap();
        let op = shoal_relay::keystore::self_certify(&dir, shoal_topology::Role::Relay).unwrap();
        authority.lock().unwrap().admit(op).unwrap();
        let mut c = node_config(dir, auth_addr, auth_id, 1);
        c.metrics_listen = None;
        relays.push(shoal_relay::spawn(c).await.unwrap());
    }

    // Accounts are added while the gateways are stopped, as `shoal gateway account add` does.
    let alice = SigningKey::generate(&mut rng);
    let bob = SigningKey::generate(&mut rng);
    let (dir_a, dir_b) = (tmp.path().join("gw-a"), tmp.path().join("gw-b"));
    let subnet_admin = shoal_subnet::SubnetAdmin::from_secret([0x5b; 32]);
    let mut configs = Vec::new();
    for (dir, key, mailbox) in [(&dir_a, &alice, ALICE_BOX), (&dir_b, &bob, BOB_BOX)] {
        shoal_relay::keystore::create_identity(dir, &mut rng).unwrap();
        let op = shoal_relay::keystore::self_certify(dir, shoal_topology::Role::Gateway).unwrap();
        authority.lock().unwrap().admit(op).unwrap();
        let config = gateway_config(dir, auth_addr, auth_id);
        admin::add_account(&config, node_key(key), &mailbox, None).unwrap();
        configs.push(config);
    }
    configs[1].subnets = vec![subnet_admin.subnet()];
    let gw_a = crate::spawn(configs[0].clone()).await.unwrap();
    let mut gw_b = crate::spawn(configs[1].clone()).await.unwrap();
    for r in &relays {
        assert!(r.wait_for_directory(Duration::from_secs(10)).await);
    }
    for g in [&gw_a, &gw_b] {
        assert!(g.wait_for_directory(Duration::from_secs(10)).await);
    }
    let (a_id, b_id) = (gw_a.identity(), gw_b.identity());

    // A stranger's key is refused with an Error frame and the link closes.
    let stranger = SigningKey::generate(&mut rng);
    let mut s = TestClient::connect(&stranger, &gw_a).await;
    match s.recv().await {
        Some(GatewayMsg::Error { code, .. }) => assert_eq!(code, ErrorCode::Unauthenticated),
        other => panic!("stranger got {other:?}"),
    }
    within("refused link closes", s.link.connection().closed()).await;
    assert_eq!(gw_a.stats().clients_refused, 1);

    // The directory comes from the gateway: the authority's signed documents.
    let mut alice_c = TestClient::connect(&alice, &gw_a).await;
    let docs = alice_c.directory().await;
    let expected = authority.lock().unwrap().document(0).unwrap().to_json();
    assert_eq!(docs[0], expected);
    let topo = UncheckedDocument::parse(&docs[0])
        .unwrap()
        .check_signatures(&AuthoritySet {
            threshold: 1,
            keys: vec![Hex32(auth_id)],
        })
        .unwrap()
        .check_valid_at(unix_now())
        .unwrap();
    assert_eq!(topo.gateways().len(), 2);

    // Alice → [A, L1, L2, L3, B] → Bob's mailbox.
    let (frame, surb, body) =
        real_packet(&mut rng, &topo, &a_id, &b_id, &BOB_BOX, &ALICE_BOX, [1; 16]);
    alice_c.send(&frame).await;

    let mut bob_c = TestClient::connect(&bob, &gw_b).await;
    let item = bob_c.pull_until_item().await;
    let GatewayMsg::Item { id, payload, .. } = item else {
        unreachable!()
    };
    let plaintext = sphinx::open_forward(&payload[..]).unwrap();
    assert_eq!(split_plaintext(&plaintext).unwrap().1, &body[..]);
    // Bob acks in his next pull: the item is deleted before that pull is answered.
    assert!(bob_c.pull_acking(vec![id]).await.is_empty());
    wait_for("bob's ack", &gw_b, |s| {
        s.mailbox.items_acked == 1 && s.items == 0
    })
    .await;
    assert!(bob_c.pull().await.is_empty());

    // The SURB-ack went out after the commit and lands in Alice's mailbox at A.
    let ack = alice_c.pull_until_item().await;
    let GatewayMsg::Item {
        id: ack_item,
        surb_id,
        payload,
    } = ack
    else {
        unreachable!()
    };
    assert_eq!(&surb_id, surb.recovery.identifier());
    let reply = sphinx::open_reply(&surb.recovery, &payload[..]).unwrap();
    assert_eq!(parse_ack_message(&reply).unwrap(), [1; 16]);
    alice_c
        .send(
            &ClientMsg::Ack {
                ids: vec![ack_item],
            }
            .to_frame()
            .unwrap(),
        )
        .await;

    let b = gw_b.stats();
    assert_eq!(b.mailbox.accepted, 1);
    assert_eq!(b.acks_sent, 1);
    assert!(b.store.commits >= 2, "{b:#?}");
    assert_eq!(b.client_sphinx_frames, 0);
    let a = gw_a.stats();
    assert_eq!(a.client_sphinx_frames, 1);
    assert_eq!(
        a.mailbox.without_ack_slot, 1,
        "a SURB reply carries no ack of its own"
    );

    let (status, text) = http::get(gw_b.metrics_addr().unwrap(), "/metrics")
        .await
        .unwrap();
    assert_eq!(status, 200);
    let text = String::from_utf8(text).unwrap();
    for line in [
        "shoal_gateway_deliveries_total{outcome=\"accepted\"} 1",
        "shoal_gateway_acks_sent_total 1",
        "shoal_gateway_items_deleted_total{cause=\"acked\"} 1",
        "shoal_gateway_accounts 1",
        "shoal_relay_directory_epoch 0",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in\n{text}"
        );
    }
    assert!(
        text.contains("shoal_gateway_commit_seconds_count"),
        "{text}"
    );
    assert!(text.contains("shoal_gateway_pulls_total "), "{text}");
    assert!(gw_b.stats().mailbox.pulls >= 2);

    // An admin command through the mixnet: Alice (standing in for the admin's client)
    // sends a signed CreateAccount to B's admin endpoint, sealed to B's identity, in an
    // ordinary packet with a SURB-ack; B applies it, acks the packet and answers Alice
    // through the mix layers with an answer B signs.
    let alice_x = x25519_dalek::StaticSecret::from([0x3a; 32]);
    let carol = SigningKey::generate(&mut rng);
    let command = subnet_admin
        .issue_command(shoal_subnet::CommandBody {
            subnet: Hex32([0; 32]),
            gateway: Hex32(b_id),
            sequence: 1,
            expires_at: unix_now() + 300,
            action: shoal_subnet::AccountAction::CreateAccount {
                account: Hex32(node_key(&carol)),
                mailbox: Hex32([0xc1; 32]),
                quota: 3,
            },
        })
        .unwrap();
    let request = shoal_subnet::AdminRequest::new(
        &command,
        shoal_subnet::ReplyTo {
            mailbox: Hex32(ALICE_BOX),
            gateway: Hex32(a_id),
            seal_key: Hex32(x25519_dalek::PublicKey::from(&alice_x).to_bytes()),
        },
    )
    .to_bytes();
    let fragments = shoal_packet::fragment::fragment([0x42; 16], &request).unwrap();
    assert_eq!(fragments.len(), 1, "a create command is one packet");
    let seal_to = crate::admin_inbox::admin_seal_key(&b_id).unwrap();
    let body = shoal_packet::seal::seal(&mut rng, &seal_to, &fragments[0].encode()).unwrap();
    let (frame, surb, _) = real_packet_with_body(
        &mut rng,
        &topo,
        (&a_id, &b_id),
        &crate::admin_inbox::ADMIN_MAILBOX,
        &ALICE_BOX,
        [3; 16],
        body,
    );
    alice_c.send(&frame).await;
    let (mut acked, mut answer, mut acks) = (false, None, Vec::new());
    let deadline = Instant::now() + Duration::from_secs(10);
    while !acked || answer.is_none() {
        assert!(
            Instant::now() < deadline,
            "acked {acked}, answer {answer:?}: {:#?}",
            gw_b.stats()
        );
        for item in alice_c.pull_acking(std::mem::take(&mut acks)).await {
            let GatewayMsg::Item {
                id,
                surb_id,
                payload,
            } = item
            else {
                unreachable!()
            };
            acks.push(id);
            if &surb_id == surb.recovery.identifier() {
                let reply = sphinx::open_reply(&surb.recovery, &payload[..]).unwrap();
                assert_eq!(parse_ack_message(&reply).unwrap(), [3; 16]);
                acked = true;
            } else {
                let plaintext = sphinx::open_forward(&payload[..]).unwrap();
                let (slot, sealed) = split_plaintext(&plaintext).unwrap();
                assert!(slot.surb.iter().all(|b| *b == 0), "the answer asks no ack");
                let inner = shoal_packet::seal::open(&alice_x, sealed).unwrap();
                let f = shoal_packet::Fragment::decode(&inner).unwrap();
                assert_eq!(f.header.count, 1);
                answer = Some(shoal_subnet::SignedAnswer::verify(&f.data, &Hex32(b_id)).unwrap());
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let answer = answer.unwrap();
    assert_eq!(
        (answer.subnet, answer.sequence, answer.refusal),
        (subnet_admin.subnet(), 1, None)
    );
    let b = gw_b.stats();
    assert_eq!(b.admin_applied, 1);
    assert_eq!(b.mailbox.admin_packets, 1);
    assert_eq!(b.accounts, 2, "Bob and now Carol");

    // A second message is acked (so durable at B), B restarts, and Bob still gets it.
    let (frame, surb, body) =
        real_packet(&mut rng, &topo, &a_id, &b_id, &BOB_BOX, &ALICE_BOX, [2; 16]);
    alice_c.send(&frame).await;
    let GatewayMsg::Item { payload, .. } = alice_c.pull_until_item().await else {
        unreachable!()
    };
    assert_eq!(
        parse_ack_message(&sphinx::open_reply(&surb.recovery, &payload[..]).unwrap()).unwrap(),
        [2; 16]
    );
    drop(bob_c);
    gw_b.shutdown().await;
    gw_b = crate::spawn(configs[1].clone()).await.unwrap();
    wait_for("the acked item to survive the restart", &gw_b, |s| {
        s.items == 1
    })
    .await;
    let mut bob_c = TestClient::connect(&bob, &gw_b).await;
    let GatewayMsg::Item { payload, .. } = bob_c.pull_until_item().await else {
        unreachable!()
    };
    let plaintext = sphinx::open_forward(&payload[..]).unwrap();
    assert_eq!(split_plaintext(&plaintext).unwrap().1, &body[..]);

    gw_a.shutdown().await;
    gw_b.shutdown().await;
    for r in relays {
        r.shutdown().await;
    }
}

#[test]
fn admin_adds_and_removes_accounts_and_refuses_bad_keys() {
    let tmp = tempfile::tempdir().unwrap();
    let config = gateway_config(tmp.path(), "127.0.0.1:9".parse().unwrap(), [1; 32]);
    let key = node_key(&SigningKey::from_bytes(&[5; 32]));
    admin::add_account(&config, key, &ALICE_BOX, Some(3)).unwrap();
    assert_eq!(
        admin::add_account(&config, key, &BOB_BOX, None),
        Err(crate::GatewayError::AccountExists)
    );
    let not_a_key = (0u8..=255)
        .map(|b| [b; 32])
        .find(|k| ed25519_dalek::VerifyingKey::from_bytes(k).is_err())
        .unwrap();
    assert!(admin::add_account(&config, not_a_key, &BOB_BOX, None).is_err());
    admin::set_quota(&config, &key, 5).unwrap();
    admin::remove_account(&config, &key).unwrap();
    assert_eq!(
        admin::remove_account(&config, &key),
        Err(crate::GatewayError::UnknownAccount)
    );
}

/// Admin commands as the gateway's admin endpoint receives them (delivered packets of
/// a sealed request): each command, each refusal, the live link of a de-provisioned
/// account cut at once, a revoked key refused, a replay after a restart, and the old
/// admin link refused. No directory is needed for the commands to apply (their answers
/// need one to be routed; the mixnet test sends one all the way).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_commands_through_the_endpoint() {
    use crate::admin_inbox::tests::request_payloads;
    use crate::mailbox::tests::Net;
    use shoal_packet::protocol::AdminRefusal;
    use shoal_subnet::{AccountAction, AdminRequest, CommandBody, ReplyTo, SubnetAdmin};

    let mut rng = StdRng::seed_from_u64(77);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("gw");
    shoal_relay::keystore::create_identity(&dir, &mut rng).unwrap();
    shoal_relay::keystore::self_certify(&dir, shoal_topology::Role::Gateway).unwrap();
    let a_key = SigningKey::generate(&mut rng);
    let b_key = SigningKey::generate(&mut rng);
    let (a, b) = (
        SubnetAdmin::new(a_key.clone()),
        SubnetAdmin::new(b_key.clone()),
    );
    let mut config = gateway_config(&dir, "127.0.0.1:9".parse().unwrap(), [1; 32]);
    config.subnets = vec![a.subnet()];
    let identity = shoal_relay::keystore::load_identity(&config.node.identity_path()).unwrap();
    let gw = crate::spawn(config.clone()).await.unwrap();
    let gw_key = gw.identity();
    let alice = SigningKey::generate(&mut rng);
    let now = unix_now();
    let mut net = Net::new(78);
    let reply = ReplyTo {
        mailbox: Hex32([0x55; 32]),
        gateway: Hex32([0x56; 32]),
        seal_key: Hex32([0x57; 32]),
    };
    let request = |admin: &SubnetAdmin, body: CommandBody| {
        AdminRequest::new(&admin.issue_command(body).unwrap(), reply.clone()).to_bytes()
    };
    let body = |seq: u64, action: AccountAction| CommandBody {
        subnet: Hex32([0; 32]),
        gateway: Hex32(gw_key),
        sequence: seq,
        expires_at: now + 300,
        action,
    };
    let create = AccountAction::CreateAccount {
        account: Hex32(node_key(&alice)),
        mailbox: Hex32(ALICE_BOX),
        quota: 5,
    };
    // Plays a request's packets into the endpoint as the mixnet would deliver them.
    async fn send(gw: &GatewayHandle, payloads: Vec<Vec<u8>>) {
        for p in payloads {
            gw.dangerously_deliver_admin(p).await;
        }
    }
    let packets = |net: &mut Net, bytes: Vec<u8>| request_payloads(net, &identity, &bytes);
    let settled = |gw: &GatewayHandle, applied: u64, refused: Option<(AdminRefusal, u64)>| {
        let s = gw.stats();
        s.admin_applied == applied && refused.is_none_or(|(c, n)| s.admin_refused(c) == n)
    };
    async fn until(what: &str, f: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    // Before the account exists, Alice is refused; once applied, she is served at once.
    let create1 = request(&a, body(1, create.clone()));
    send(&gw, packets(&mut net, create1.clone())).await;
    until("create", || settled(&gw, 1, None)).await;
    let mut alice_c = TestClient::connect(&alice, &gw).await;
    assert!(alice_c.pull().await.is_empty());

    // Refusals, each counted by cause; none changes anything.
    send(&gw, packets(&mut net, create1.clone())).await;
    until("replay", || {
        settled(&gw, 1, Some((AdminRefusal::Replayed, 1)))
    })
    .await;
    let mut elsewhere = body(6, create.clone());
    elsewhere.gateway = Hex32([9; 32]);
    send(&gw, packets(&mut net, request(&a, elsewhere))).await;
    until("wrong gateway", || {
        settled(&gw, 1, Some((AdminRefusal::WrongGateway, 1)))
    })
    .await;
    let mut expired = body(7, create.clone());
    expired.expires_at = now - 10;
    send(&gw, packets(&mut net, request(&a, expired))).await;
    until("expired", || {
        settled(&gw, 1, Some((AdminRefusal::Expired, 1)))
    })
    .await;
    // B is not hosted here.
    send(&gw, packets(&mut net, request(&b, body(7, create.clone())))).await;
    until("unknown subnet", || {
        settled(&gw, 1, Some((AdminRefusal::UnknownSubnet, 1)))
    })
    .await;
    let forged = String::from_utf8(request(&a, body(8, create.clone())))
        .unwrap()
        .replace("\\\\\\\"quota\\\\\\\":5", "\\\\\\\"quota\\\\\\\":500");
    assert!(forged.contains("500"));
    send(&gw, packets(&mut net, forged.into_bytes())).await;
    until("forged", || {
        settled(&gw, 1, Some((AdminRefusal::BadSignature, 1)))
    })
    .await;
    // The old admin link is gone: the subnet key is refused like a stranger, and a
    // client sending admin chunks on its own link gets NotAdmin, no change.
    let mut old = TestClient::connect(&a_key, &gw).await;
    assert!(matches!(
        old.recv().await,
        Some(GatewayMsg::Error {
            code: ErrorCode::Unauthenticated,
            ..
        })
    ));
    let chunk = &shoal_packet::protocol::admin_chunks(
        &a.issue_command(body(9, create.clone())).unwrap().to_bytes(),
    )
    .unwrap()[0];
    alice_c.send(&chunk.to_frame().unwrap()).await;
    assert!(matches!(
        alice_c.recv().await,
        Some(GatewayMsg::AdminResult {
            refusal: Some(AdminRefusal::NotAdmin),
            ..
        })
    ));
    send(
        &gw,
        packets(
            &mut net,
            request(
                &a,
                body(
                    9,
                    AccountAction::SetQuota {
                        account: Hex32(node_key(&alice)),
                        quota: 7,
                    },
                ),
            ),
        ),
    )
    .await;
    until("quota", || settled(&gw, 2, None)).await;
    let s = gw.stats();
    assert_eq!(
        s.clients_refused, 1,
        "the admin key is refused like a stranger"
    );
    let text = gw.metrics_text();
    assert!(
        text.contains("shoal_gateway_admin_commands_total{outcome=\"replayed\"} 1"),
        "{text}"
    );
    for secret in [hex::encode(node_key(&alice)), hex::encode(a.subnet().0)] {
        assert!(!text.contains(&secret), "no keys in /metrics");
    }

    // De-provision: Alice's live link is closed at once and she cannot come back.
    let started = Instant::now();
    send(
        &gw,
        packets(
            &mut net,
            request(
                &a,
                body(
                    10,
                    AccountAction::Deprovision {
                        account: Hex32(node_key(&alice)),
                    },
                ),
            ),
        ),
    )
    .await;
    within(
        "de-provisioned link closes",
        alice_c.link.connection().closed(),
    )
    .await;
    let cut_after = started.elapsed();
    assert!(cut_after < Duration::from_secs(5), "{cut_after:?}");
    let mut again = TestClient::connect(&alice, &gw).await;
    assert!(matches!(
        again.recv().await,
        Some(GatewayMsg::Error {
            code: ErrorCode::Unauthenticated,
            ..
        })
    ));
    assert_eq!(gw.stats().accounts, 0);

    // A restart keeps the guard: the captured create is still a replay, and a fresh one
    // works again (Alice re-enrolled), until a published policy revokes her key.
    gw.shutdown().await;
    let gw = crate::spawn(config.clone()).await.unwrap();
    send(&gw, packets(&mut net, create1)).await;
    until("replay after restart", || {
        settled(&gw, 0, Some((AdminRefusal::Replayed, 1)))
    })
    .await;
    send(
        &gw,
        packets(&mut net, request(&a, body(11, create.clone()))),
    )
    .await;
    until("re-create", || settled(&gw, 1, None)).await;
    let mut alice_c = TestClient::connect(&alice, &gw).await;
    assert!(alice_c.pull().await.is_empty());
    let policy = crate::remote_admin::tests::policy(&a, 1, 60, vec![Hex32(node_key(&alice))]);
    send(&gw, packets(&mut net, request(&a, body(12, policy)))).await;
    within("revoked link closes", alice_c.link.connection().closed()).await;
    let mut again = TestClient::connect(&alice, &gw).await;
    assert!(matches!(
        again.recv().await,
        Some(GatewayMsg::Error {
            code: ErrorCode::Unauthenticated,
            ..
        })
    ));
    assert_eq!(gw.stats().mailbox.accounts_cut, 1);
    gw.shutdown().await;
}

/// An account holds at most `MAX_LINKS_PER_ACCOUNT` live links: the next one closes its
/// oldest (counted), so one account cannot multiply its outstanding control requests.
/// No directory is needed: client links do not route packets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_opening_a_fifth_link_loses_its_oldest() {
    let mut rng = StdRng::seed_from_u64(78);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("gw");
    shoal_relay::keystore::create_identity(&dir, &mut rng).unwrap();
    shoal_relay::keystore::self_certify(&dir, shoal_topology::Role::Gateway).unwrap();
    let config = gateway_config(&dir, "127.0.0.1:9".parse().unwrap(), [1; 32]);
    let alice = SigningKey::generate(&mut rng);
    admin::add_account(&config, node_key(&alice), &ALICE_BOX, None).unwrap();
    let gw = crate::spawn(config).await.unwrap();
    let mut links = Vec::new();
    for _ in 0..crate::driver::MAX_LINKS_PER_ACCOUNT {
        let mut c = TestClient::connect(&alice, &gw).await;
        // A pull answered means the link is authenticated and registered.
        assert!(c.pull().await.is_empty());
        links.push(c);
    }
    assert_eq!(gw.stats().client_links_superseded, 0);
    let mut fifth = TestClient::connect(&alice, &gw).await;
    assert!(fifth.pull().await.is_empty());
    within(
        "the oldest link closes",
        links[0].link.connection().closed(),
    )
    .await;
    assert_eq!(gw.stats().client_links_superseded, 1);
    // The others still serve.
    for c in &mut links[1..] {
        assert!(c.pull().await.is_empty());
    }
    gw.shutdown().await;
}

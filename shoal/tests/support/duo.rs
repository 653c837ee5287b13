//! Alice (at the entry gateway) sends to Bob (at the exit gateway) through in-process
//! client drivers, on a network of real processes (loopback or namespaces); what was
//! sent, acked and delivered is tallied for the scenario to judge. Shared by the fault
//! tests (relay kill, restart at an epoch edge, gateway SIGKILL, lossy links).
#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use shoal_bench::netns::NsTestnet;
use shoal_bench::standin::{fetch_topology, wait_for_topology};
use shoal_bench::testnet::{GatewayInit, Testnet};
use shoal_client::driver::{self, ClientHandle, DriverConfig, DriverEvent};
use shoal_client::{ClientStore, Contact, Identity};
use shoal_packet::MessageId;
use shoal_topology::{AuthoritySet, NodeId, Topology};
use tokio::sync::broadcast;

/// Fresh keys for Alice at `entry` and Bob at `exit`, registered with
/// `shoal gateway account add` (the gateways must not be running yet).
pub struct Accounts {
    entry: GatewayInit,
    exit: GatewayInit,
    alice: (SigningKey, Identity),
    bob: (SigningKey, Identity),
}

impl Accounts {
    pub fn register(shoal: &Path, entry: &GatewayInit, exit: &GatewayInit) -> Self {
        let mut rng = rand::rng();
        let (alice_key, bob_key) = (
            SigningKey::generate(&mut rng),
            SigningKey::generate(&mut rng),
        );
        let alice_id = Identity::generate(&mut rng, entry.id);
        let bob_id = Identity::generate(&mut rng, exit.id);
        Testnet::add_account(
            shoal,
            entry,
            &alice_key.verifying_key().to_bytes(),
            &alice_id.mailbox,
        )
        .unwrap();
        Testnet::add_account(
            shoal,
            exit,
            &bob_key.verifying_key().to_bytes(),
            &bob_id.mailbox,
        )
        .unwrap();
        Accounts {
            entry: entry.clone(),
            exit: exit.clone(),
            alice: (alice_key, alice_id),
            bob: (bob_key, bob_id),
        }
    }
}

/// The loopback and the namespace testnets, as far as these scenarios need them.
pub trait Net {
    fn authority_addr(&self) -> SocketAddr;
    fn authority_set(&self) -> &AuthoritySet;
    fn relays(&self) -> Vec<NodeId>;
    /// Starts gateway `index`, set up as `init`.
    fn start_gateway(&mut self, index: usize, init: GatewayInit);
    /// The tail of a process's log.
    fn log(&self, name: &str) -> String;
    /// Every process that has exited, with its log tail.
    fn exited(&mut self) -> String;
}

const SHOAL: &str = env!("CARGO_BIN_EXE_shoal");

impl Net for Testnet {
    fn authority_addr(&self) -> SocketAddr {
        self.authority_addr
    }
    fn authority_set(&self) -> &AuthoritySet {
        &self.authorities
    }
    fn relays(&self) -> Vec<NodeId> {
        self.relay_ids()
    }
    fn start_gateway(&mut self, _index: usize, init: GatewayInit) {
        self.run_gateway(Path::new(SHOAL), init).unwrap();
    }
    fn log(&self, name: &str) -> String {
        self.log_tail(name)
    }
    fn exited(&mut self) -> String {
        self.exited()
    }
}

impl Net for NsTestnet {
    fn authority_addr(&self) -> SocketAddr {
        self.authority_addr
    }
    fn authority_set(&self) -> &AuthoritySet {
        &self.authorities
    }
    fn relays(&self) -> Vec<NodeId> {
        self.relay_ids()
    }
    fn start_gateway(&mut self, index: usize, init: GatewayInit) {
        self.run_gateway(Path::new(SHOAL), index, init).unwrap();
    }
    fn log(&self, name: &str) -> String {
        self.log_tail(name)
    }
    fn exited(&mut self) -> String {
        self.exited()
    }
}

/// Alice registered at `entry` (gateway 0) and Bob at `exit` (gateway 1), both gateways
/// started and in a document (within `document_timeout`), and both clients (timers set
/// by `tune`) holding it (within `directory_timeout` each).
pub async fn alice_and_bob(
    net: &mut impl Net,
    dir: &Path,
    [entry, exit]: [&GatewayInit; 2],
    document_timeout: Duration,
    directory_timeout: Duration,
    tune: impl Fn(&mut DriverConfig),
) -> (Duo, Topology) {
    let accounts = Accounts::register(Path::new(SHOAL), entry, exit);
    net.start_gateway(0, entry.clone());
    net.start_gateway(1, exit.clone());
    let (addr, relays) = (net.authority_addr(), net.relays());
    let topo = wait_for_nodes(
        addr,
        &net.authority_set().clone(),
        relays,
        [entry, exit],
        document_timeout,
        |missing| {
            let mut report = format!("authority:\n{}\n", net.log("authority"));
            for name in missing {
                report.push_str(&format!("{name}:\n{}\n", net.log(name)));
            }
            report + &net.exited()
        },
    )
    .await;
    let duo = Duo::start(dir, net.authority_set(), accounts, tune);
    assert!(
        duo.have_directories(directory_timeout).await,
        "client got no directory\n{}",
        net.log("gateway0")
    );
    (duo, topo)
}

/// Waits until the authority at `addr` serves a document with every relay in `relays`
/// and both gateways; otherwise panics naming the missing nodes, with `log(missing)`
/// (the authority's log tail, the missing nodes' and any exited process's).
pub async fn wait_for_nodes(
    addr: SocketAddr,
    authorities: &AuthoritySet,
    relays: Vec<NodeId>,
    gateways: [&GatewayInit; 2],
    timeout: Duration,
    log: impl FnOnce(&[&str]) -> String,
) -> Topology {
    let names: Vec<(NodeId, String)> = (relays.iter().enumerate())
        .map(|(i, id)| (*id, format!("relay{i}")))
        .chain(gateways.map(|g| (g.id, g.name.clone())))
        .collect();
    let expect: Vec<NodeId> = names.iter().map(|(id, _)| *id).collect();
    match wait_for_topology(addr, authorities, &expect, timeout).await {
        Ok(t) => t,
        Err(e) => {
            let listed = fetch_topology(addr, authorities, None).await.ok();
            let missing: Vec<&str> = (names.iter())
                .filter(|(id, _)| listed.as_ref().is_none_or(|t| t.node(id).is_none()))
                .map(|(_, name)| name.as_str())
                .collect();
            panic!("{e:#}; missing {missing:?}\n{}", log(&missing))
        }
    }
}

/// A client driver with its own store in `dir/name`; `tune` sets the scenario's timers.
fn client(
    dir: &Path,
    name: &str,
    gateway: &GatewayInit,
    authorities: &AuthoritySet,
    (account, identity): (SigningKey, Identity),
    tune: &impl Fn(&mut DriverConfig),
) -> ClientHandle {
    let mut config = DriverConfig::new(gateway.client_addr, gateway.id, authorities.clone());
    tune(&mut config);
    let cdir = dir.join(name);
    std::fs::create_dir_all(&cdir).unwrap();
    let store = Arc::new(ClientStore::open(cdir.join("client.redb")).unwrap());
    store.save_identity(&identity).unwrap();
    store.save_account_key(&account.to_bytes()).unwrap();
    driver::spawn(config, identity, &account, store).unwrap()
}

/// Alice and Bob running, and what happened to Alice's messages to Bob.
pub struct Duo {
    pub alice: ClientHandle,
    pub bob: ClientHandle,
    alice_events: broadcast::Receiver<DriverEvent>,
    bob_events: broadcast::Receiver<DriverEvent>,
    bob_contact: Contact,
    /// Body of every message sent, by id.
    pub bodies: HashMap<MessageId, String>,
    /// Ids Alice saw acked.
    pub acked: HashSet<MessageId>,
    /// Bodies Bob received.
    pub delivered: HashSet<String>,
}

impl Duo {
    /// Starts both drivers (stores under `dir`) and subscribes to their events.
    pub fn start(
        dir: &Path,
        authorities: &AuthoritySet,
        accounts: Accounts,
        tune: impl Fn(&mut DriverConfig),
    ) -> Self {
        let Accounts {
            entry,
            exit,
            alice,
            bob,
        } = accounts;
        let alice = client(dir, "alice", &entry, authorities, alice, &tune);
        let bob = client(dir, "bob", &exit, authorities, bob, &tune);
        Duo {
            alice_events: alice.subscribe(),
            bob_events: bob.subscribe(),
            bob_contact: bob.contact(),
            alice,
            bob,
            bodies: HashMap::new(),
            acked: HashSet::new(),
            delivered: HashSet::new(),
        }
    }

    /// Whether both clients got a directory within `timeout` each.
    pub async fn have_directories(&self, timeout: Duration) -> bool {
        for c in [&self.alice, &self.bob] {
            if !c.wait_for_directory(timeout).await {
                return false;
            }
        }
        true
    }

    /// Alice queues `body` for Bob.
    pub async fn send(&mut self, body: String) {
        let id = self
            .alice
            .send(self.bob_contact, body.clone().into_bytes())
            .await
            .unwrap();
        self.bodies.insert(id, body);
    }

    /// Takes one ack or delivery, or returns after `tick` with nothing.
    pub async fn step(&mut self, tick: Duration) {
        tokio::select! {
            e = self.alice_events.recv() => if let Ok(DriverEvent::Acked { message_id }) = e {
                self.acked.insert(message_id);
            },
            e = self.bob_events.recv() => if let Ok(DriverEvent::Message { bytes, .. }) = e {
                self.delivered.insert(String::from_utf8(bytes).unwrap());
            },
            _ = tokio::time::sleep(tick) => {}
        }
    }

    /// Steps until `n` messages are both delivered and acked, or until `deadline`.
    pub async fn run_until_all(&mut self, n: usize, deadline: Instant, tick: Duration) {
        while Instant::now() < deadline && !self.all(n) {
            self.step(tick).await;
        }
    }

    /// Whether `n` messages were delivered and `n` acked.
    pub fn all(&self, n: usize) -> bool {
        self.delivered.len() >= n && self.acked.len() >= n
    }

    /// Panics if a message Alice saw acked never reached Bob.
    pub fn assert_no_acked_message_lost(&self) {
        for id in &self.acked {
            let body = &self.bodies[id];
            assert!(
                self.delivered.contains(body),
                "acked message {body:?} was lost"
            );
        }
    }

    pub async fn shutdown(self) {
        self.alice.shutdown().await;
        self.bob.shutdown().await;
    }
}

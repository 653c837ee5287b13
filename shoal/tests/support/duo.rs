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
use shoal_bench::standin::wait_for_topology;
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

/// Waits until the authority at `addr` serves a document with every relay in `relays`
/// and both gateways; panics with `log()` (the authority's log tail) otherwise.
pub async fn wait_for_nodes(
    addr: SocketAddr,
    authorities: &AuthoritySet,
    relays: Vec<NodeId>,
    gateways: [&GatewayInit; 2],
    timeout: Duration,
    log: impl FnOnce() -> String,
) -> Topology {
    let mut expect = relays;
    expect.extend(gateways.map(|g| g.id));
    match wait_for_topology(addr, authorities, &expect, timeout).await {
        Ok(t) => t,
        Err(e) => panic!("{e:#}\n{}", log()),
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

//! The gateway driver: the relay's mixing pipeline plus mailboxes and client links.
//!
//! ```text
//!            node links ──┐                                   ┌──> next-hop links
//!  client links (Sphinx) ─┴─> shoal-relay pipeline (workers) ─┤
//!                                                             └─ Event::Delivered ─┐
//!  client links (Pull+acks/GetDirectory) ─requests──> mailbox task <─deliveries────┘
//!                                                      │ poll_write ──> Store writer (fsync)
//!                  SURB-acks (into the mixnet) <──────┘ <── on_commit ───┘
//! ```
//! [`spawn`] starts the mixing half with [`shoal_relay::spawn_with`] (role `Gateway`,
//! final-hop packets to the mailbox task, gateway families on `/metrics`), then the
//! mailbox task, which alone owns the [`Mailbox`] core, and the client endpoint.
//!
//! Each client link answers its pulls through a [`PullResponder`]: the acks a pull
//! carries are applied and its answer planned by the mailbox task, loaded from the store
//! on a blocking thread, and written exactly `pull_answer_delay` after the pull arrived,
//! whatever it holds (a load that misses that time is answered with dummies).
//!
//! Packets for the admin endpoint ([`crate::admin_inbox`]) are acked by the mailbox core
//! like cover and handed to the admin task, which reassembles requests, checks and
//! applies their commands through the mailbox task, and sends each verified command's
//! answer into the mixnet from this gateway once the change is durable.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use shoal_link::{FrameReceiver, FrameSender, Link, LinkEndpoint, NodeKey, PeerSet};
use shoal_packet::frame::FRAME_VERSION;
use shoal_packet::sphinx::{MailboxAddress, SurbId};
use shoal_packet::{FRAME_SIZE, Frame, FrameKind};
use shoal_relay::{Event, NodeHooks, Pipeline, RelayHandle, RelayStats};
use shoal_subnet::{AccountAction, SubnetId, UsageReport};
use shoal_topology::{Hex32, Role, Topology};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tracing::{Instrument, debug, info, trace, warn};

use crate::admin_inbox::{AdminInbox, answer, answer_plaintexts, route_answer};
use crate::config::Config;
use crate::limit::{Admit, LimitConfig, SendLimiter};
use crate::mailbox::{
    AccountKey, AckToSend, BatchId, DeliverOutcome, ItemId, Mailbox, PullPlan, WriteBatch,
};
use crate::metrics::{AckDrop, GatewayStats, Metrics};
use crate::pull::{PullAnswerConfig, PullResponder, PullToken};
use crate::remote_admin::{CheckedAdmin, Refusal, check_command};
use crate::store::{Store, TrySubmitError};
use crate::{CommitResult, GatewayError};
use shoal_packet::protocol::{AdminRefusal, ClientMsg, ErrorCode, GatewayMsg, directory_chunks};

/// Final-hop packets the mailbox task takes per wake-up (one write batch).
const DELIVERY_BATCH: usize = 256;
/// Control requests one client may have waiting for its responder.
const CLIENT_QUEUE: usize = 64;
/// Longest the mailbox task sleeps between expiry checks.
const EXPIRE_CHECK: Duration = Duration::from_secs(60);
/// How long a refused client gets to read its `Error` frame before the link closes.
const REFUSAL_LINGER: Duration = Duration::from_secs(2);
/// Payloads for the admin endpoint waiting to be opened; beyond this they are shed
/// (counted as delivery overload), and their senders' retransmissions bring them back.
const ADMIN_QUEUE: usize = 256;
/// How often a client stream re-reads the directory's client rate for its bucket.
const RATE_REFRESH: Duration = Duration::from_secs(1);

/// The answer to one admin command, once durable (or refused).
/// `Ok` carries the answer of a read-only command (account usage).
type AdminReply = oneshot::Sender<Result<Option<UsageReport>, Refusal>>;

/// A packet that ended here, on its way from a worker to the mailbox task.
struct Delivery {
    destination: MailboxAddress,
    surb_id: SurbId,
    payload: Vec<u8>,
}

/// What client links ask of the mailbox task.
enum Request {
    /// A client link opened; if `key` is an account, `link` is remembered so a
    /// de-provision or revocation can close it at once.
    Authenticate {
        key: AccountKey,
        link: Link,
        reply: oneshot::Sender<bool>,
    },
    /// The client link `id` of `key` ended.
    Gone { key: AccountKey, id: usize },
    /// An admin command whose signature checked out.
    Admin {
        checked: Box<CheckedAdmin>,
        reply: AdminReply,
    },
    /// Delete the acked items, then plan the next answer.
    Pull {
        key: AccountKey,
        acks: Vec<ItemId>,
        reply: oneshot::Sender<Result<PullPlan, GatewayError>>,
    },
    /// A separate `Ack` frame (older clients).
    Ack { key: AccountKey, ids: Vec<ItemId> },
    /// Items planned into an answer that went out as dummies (its load was late).
    ReleaseOffers { key: AccountKey, ids: Vec<ItemId> },
}

/// A store report, timed from submission.
struct Commit {
    result: CommitResult,
    ops: usize,
    submitted: Instant,
}

/// A running gateway. Dropping it stops the gateway without waiting; prefer
/// [`shutdown`](Self::shutdown).
#[derive(Debug)]
pub struct GatewayHandle {
    node: Option<RelayHandle>,
    pipeline: Pipeline,
    client_addr: SocketAddr,
    client_endpoint: Arc<LinkEndpoint>,
    metrics: Arc<Metrics>,
    hosted: Arc<Hosted>,
    shutdown: watch::Sender<bool>,
    mailbox_task: Option<JoinHandle<()>>,
    tasks: Vec<JoinHandle<()>>,
    /// The admin endpoint's queue, for tests that play delivered packets into it.
    #[cfg(test)]
    admin_payloads: mpsc::Sender<Vec<u8>>,
}

impl GatewayHandle {
    /// Hands `payload` to the admin endpoint as if a packet for it had just been
    /// delivered (tests without a directory; the mailbox core's ack is skipped).
    #[cfg(test)]
    pub(crate) async fn dangerously_deliver_admin(&self, payload: Vec<u8>) {
        let _ = self.admin_payloads.send(payload).await;
    }

    fn node(&self) -> Option<&RelayHandle> {
        self.node.as_ref()
    }

    /// The gateway's Ed25519 identity: node id, Sphinx address, and the key both its
    /// node links and its client links authenticate with.
    pub fn identity(&self) -> NodeKey {
        self.node().map_or([0; 32], RelayHandle::identity)
    }

    /// The bound address of the node link endpoint (relays and gateways dial it).
    pub fn node_addr(&self) -> Option<SocketAddr> {
        self.node().map(RelayHandle::local_addr)
    }

    /// The bound address clients dial.
    pub fn client_addr(&self) -> SocketAddr {
        self.client_addr
    }

    /// The bound `/metrics` address, if enabled.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.node().and_then(RelayHandle::metrics_addr)
    }

    /// Replaces the subnets hosted here (an operator edited `subnets` and sent SIGHUP).
    /// Admin links and commands are checked against the new list from now on; a removed
    /// subnet's accounts and stored state stay.
    pub fn set_hosted_subnets(&self, subnets: Vec<SubnetId>) {
        self.hosted.set(subnets);
    }

    /// Mailbox, store, ack and client-link counters.
    pub fn stats(&self) -> GatewayStats {
        self.metrics.snapshot()
    }

    /// The mixing half's counters (unwraps, drops, loops, links).
    pub fn relay_stats(&self) -> RelayStats {
        self.node().map(RelayHandle::stats).unwrap_or_default()
    }

    /// The `/metrics` text: the mixing families followed by the gateway's own.
    pub fn metrics_text(&self) -> String {
        let mut text = self
            .node()
            .map(RelayHandle::metrics_text)
            .unwrap_or_default();
        text.push_str(&self.metrics.render());
        text
    }

    /// The directory document in use, if any.
    pub fn current_document(&self) -> Option<Arc<Topology>> {
        self.pipeline.current_document()
    }

    /// Waits until a directory document is in use; `false` on timeout.
    pub async fn wait_for_directory(&self, timeout: Duration) -> bool {
        match self.node() {
            Some(n) => n.wait_for_directory(timeout).await,
            None => false,
        }
    }

    fn stop(&mut self) {
        let _ = self.shutdown.send(true);
        for t in &self.tasks {
            t.abort();
        }
        self.client_endpoint.close();
    }

    /// Closes client links, stops the mixing half, lets the store finish what it was
    /// given and closes it. Items whose SURB-ack went out are durable already.
    pub async fn shutdown(mut self) {
        self.stop();
        if let Some(task) = self.mailbox_task.take() {
            // The task hands its store reference back when it sees the shutdown signal.
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
        if let Some(node) = self.node.take() {
            node.shutdown().await;
        }
        let _ =
            tokio::time::timeout(Duration::from_secs(2), self.client_endpoint.wait_idle()).await;
        info!("gateway stopped");
    }
}

impl Drop for GatewayHandle {
    fn drop(&mut self) {
        self.stop();
        if let Some(t) = &self.mailbox_task {
            t.abort();
        }
    }
}

/// Starts a gateway from `config` in the current tokio runtime.
///
/// Opens (or creates) the mailbox store in `data_dir` and rebuilds the mailbox core from
/// it, starts the mixing pipeline (keys, node links, workers on all cores, directory),
/// and binds the client endpoint. Returns once everything is bound; use
/// [`GatewayHandle::wait_for_directory`] to wait for the first document.
pub async fn spawn(config: Config) -> Result<GatewayHandle, GatewayError> {
    config.validate(Path::new("gateway config"))?;
    tokio::runtime::Handle::try_current().map_err(|_| GatewayError::NoRuntime)?;
    let identity = shoal_relay::keystore::load_identity(&config.node.identity_path())
        .map_err(GatewayError::node)?;
    let me = identity.verifying_key().to_bytes();

    let (store_path, store_config, mailbox_config) = (
        config.store_path(),
        config.store.clone(),
        config.mailbox.clone(),
    );
    let (store, mailbox) = tokio::task::spawn_blocking(move || {
        let (store, recovered) = Store::open(&store_path, &store_config, &mut rand::rng())?;
        info!(
            accounts = recovered.accounts(),
            items = recovered.items(),
            "mailbox store opened"
        );
        let mailbox = Mailbox::restore(mailbox_config, recovered)?;
        Ok::<_, GatewayError>((store, mailbox))
    })
    .await
    .map_err(|_| GatewayError::Internal("store open task failed"))??;
    let store = Arc::new(store);

    let metrics = Arc::new(Metrics::new());
    let (delivery_tx, delivery_rx) = mpsc::channel::<Delivery>(config.node.queue_capacity);
    let (request_tx, request_rx) = mpsc::channel::<Request>(1024);
    let (commit_tx, commit_rx) = mpsc::unbounded_channel::<Commit>();
    let (admin_tx, admin_rx) = mpsc::channel::<Vec<u8>>(ADMIN_QUEUE);
    #[cfg(test)]
    let admin_tx_test = admin_tx.clone();
    let (shutdown_tx, shutdown_rx) = watch::channel(false);

    let hooks = {
        let metrics = metrics.clone();
        let render = metrics.clone();
        NodeHooks {
            role: Role::Gateway,
            on_delivered: Some(Arc::new(move |event: Event| match event {
                Event::Delivered {
                    destination,
                    surb_id,
                    payload,
                } => {
                    let d = Delivery {
                        destination,
                        surb_id,
                        payload,
                    };
                    if delivery_tx.try_send(d).is_err() {
                        metrics.deliveries_overload.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })),
            extra_metrics: Some(Arc::new(move || render.render())),
        }
    };
    let node = shoal_relay::spawn_with(config.node.clone(), hooks)
        .await
        .map_err(GatewayError::node)?;
    let pipeline = node.pipeline();

    let client_endpoint = Arc::new(
        LinkEndpoint::bind(config.client_listen, &identity, PeerSet::any()).map_err(|e| {
            GatewayError::Listen {
                what: "clients",
                addr: config.client_listen,
                detail: e.to_string(),
            }
        })?,
    );
    let client_addr = client_endpoint
        .local_addr()
        .map_err(|e| GatewayError::Listen {
            what: "clients",
            addr: config.client_listen,
            detail: e.to_string(),
        })?;

    let task = MailboxTask {
        mailbox,
        store: Some(store.clone()),
        pipeline: pipeline.clone(),
        me,
        links: HashMap::new(),
        admin_waiters: HashMap::new(),
        metrics: metrics.clone(),
        deliveries: delivery_rx,
        requests: request_rx,
        commit_tx,
        commits: commit_rx,
        pending: VecDeque::new(),
        admin: admin_tx,
        shutdown: shutdown_rx.clone(),
    };
    let mailbox_task = tokio::spawn(task.run().instrument(tracing::info_span!("mailbox")));

    let hosted = Arc::new(Hosted(std::sync::RwLock::new(config.subnets.clone())));
    let clients = Arc::new(Clients {
        limits: config.limits,
        buckets: std::sync::Mutex::new(HashMap::new()),
        hosted: hosted.clone(),
        requests: request_tx,
        store: Arc::downgrade(&store),
        pull_answer: config.pull_answer(),
        pipeline: pipeline.clone(),
        metrics: metrics.clone(),
    });
    drop(store);
    let tasks = vec![
        tokio::spawn(accept_clients(
            client_endpoint.clone(),
            clients.clone(),
            shutdown_rx,
        )),
        tokio::spawn(
            admin_endpoint(admin_rx, identity, clients)
                .instrument(tracing::info_span!("admin endpoint")),
        ),
    ];
    info!(
        identity = %hex::encode(me),
        client_listen = %client_addr,
        "gateway started"
    );
    Ok(GatewayHandle {
        node: Some(node),
        pipeline,
        client_addr,
        client_endpoint,
        metrics,
        hosted,
        shutdown: shutdown_tx,
        mailbox_task: Some(mailbox_task),
        tasks,
        #[cfg(test)]
        admin_payloads: admin_tx_test,
    })
}

/// Live client links one account may hold. Each link has at most one control request
/// (pull, ack, directory) in the mailbox task at a time, so this bounds an account's
/// share of the task whatever it sends.
pub(crate) const MAX_LINKS_PER_ACCOUNT: usize = 4;

/// The one owner of the mailbox core. Everything that changes mailboxes goes through it,
/// so batches leave `poll_write` and reach the store's single writer in order.
struct MailboxTask {
    mailbox: Mailbox,
    /// `None` once shutting down. Client links hold only weak references, so dropping
    /// this lets the store finish its queue and close.
    store: Option<Arc<Store>>,
    pipeline: Pipeline,
    me: NodeKey,
    /// Live client links per account, closed when the account is cut.
    links: HashMap<AccountKey, Vec<Link>>,
    /// Admins waiting for the batch that carries their command to become durable.
    admin_waiters: HashMap<BatchId, (AdminReply, Option<UsageReport>)>,
    metrics: Arc<Metrics>,
    deliveries: mpsc::Receiver<Delivery>,
    requests: mpsc::Receiver<Request>,
    commit_tx: mpsc::UnboundedSender<Commit>,
    commits: mpsc::UnboundedReceiver<Commit>,
    /// Batches taken from the core that the store's queue had no room for yet. Only
    /// admin commands and acks add to it while it is not empty (deliveries wait).
    pending: VecDeque<WriteBatch>,
    /// Payloads delivered to the admin endpoint, for [`admin_endpoint`].
    admin: mpsc::Sender<Vec<u8>>,
    shutdown: watch::Receiver<bool>,
}

impl MailboxTask {
    async fn run(mut self) {
        let mut batch = Vec::with_capacity(DELIVERY_BATCH);
        // Orphans found on restore are deleted at once.
        self.flush();
        self.publish();
        loop {
            let wait = self.expiry_wait();
            tokio::select! {
                biased;
                _ = self.shutdown.changed() => break,
                Some(c) = self.commits.recv() => {
                    self.on_commit(c);
                    while let Ok(c) = self.commits.try_recv() {
                        self.on_commit(c);
                    }
                }
                // While the store's queue is full, no new deliveries are taken: they
                // wait in the bounded delivery queue, whose overflow is shed and counted
                // (`deliveries_total{outcome="overload"}`), instead of piling up here.
                n = self.deliveries.recv_many(&mut batch, DELIVERY_BATCH),
                    if self.pending.is_empty() =>
                {
                    if n == 0 {
                        break;
                    }
                    let now = SystemTime::now();
                    for d in batch.drain(..) {
                        // The outcome is in the core's counters; nothing here is logged.
                        let outcome =
                            self.mailbox.deliver(&d.destination, d.surb_id, &d.payload, now);
                        if matches!(outcome, DeliverOutcome::Admin { .. })
                            && self.admin.try_send(d.payload).is_err()
                        {
                            self.metrics.deliveries_overload.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                Some(r) = self.requests.recv() => self.on_request(r),
                () = tokio::time::sleep(wait) => {
                    let n = self.mailbox.expire(SystemTime::now());
                    if n > 0 {
                        debug!(items = n, "expired items past their TTL");
                    }
                }
            }
            self.flush();
            self.publish();
        }
        // Batches already with the writer finish (and their acks are simply not sent);
        // the store closes when the last reference goes, joining its writer thread.
        if let Some(store) = self.store.take() {
            let _ = tokio::task::spawn_blocking(move || drop(store)).await;
        }
    }

    fn expiry_wait(&self) -> Duration {
        match self.mailbox.next_expiry() {
            Some(at) => at
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO)
                .clamp(Duration::from_millis(100), EXPIRE_CHECK),
            None => EXPIRE_CHECK,
        }
    }

    fn on_request(&mut self, request: Request) {
        match request {
            Request::Authenticate { key, link, reply } => {
                let known = self.mailbox.is_account(&key);
                if known {
                    let links = self.links.entry(key).or_default();
                    if links.len() >= MAX_LINKS_PER_ACCOUNT {
                        // A client has one link; more are reconnects whose old link
                        // has not timed out yet, or an account multiplying its
                        // outstanding pulls. Either way the oldest goes.
                        links.remove(0).close();
                        self.metrics
                            .client_links_superseded
                            .fetch_add(1, Ordering::Relaxed);
                    }
                    links.push(link);
                }
                let _ = reply.send(known);
            }
            Request::Gone { key, id } => {
                if let Some(links) = self.links.get_mut(&key) {
                    links.retain(|l| l.connection().stable_id() != id);
                    if links.is_empty() {
                        self.links.remove(&key);
                    }
                }
            }
            Request::Admin { checked, reply } => self.on_admin(*checked, reply),
            Request::Pull { key, acks, reply } => {
                if !acks.is_empty() {
                    // An unknown account is refused by the pull itself.
                    let _ = self.mailbox.ack(&key, &acks);
                }
                let _ = reply.send(self.mailbox.pull(&key, SystemTime::now()));
            }
            Request::ReleaseOffers { key, ids } => self.mailbox.release_offers(&key, &ids),
            Request::Ack { key, ids } => {
                // An unknown account here was deleted while connected; its link finds out
                // on its next pull.
                let _ = self.mailbox.ack(&key, &ids);
            }
        }
    }

    /// Applies a checked admin command through the core. Its batch is taken now so the
    /// admin is answered when exactly that batch is durable.
    fn on_admin(&mut self, checked: CheckedAdmin, reply: AdminReply) {
        let me = Hex32(self.me);
        match self.mailbox.apply_admin(checked, &me, SystemTime::now()) {
            Err(refusal) => {
                let _ = reply.send(Err(refusal));
            }
            Ok(applied) => {
                for key in &applied.cut {
                    // Access stops now: the core already refuses this key, and its live
                    // links are closed without waiting for the write.
                    for link in self.links.remove(key).unwrap_or_default() {
                        link.close();
                    }
                }
                if !applied.cut.is_empty() {
                    info!(
                        links_cut = applied.cut.len(),
                        "accounts cut by an admin command"
                    );
                }
                match self.mailbox.poll_write() {
                    Some(batch) => {
                        self.admin_waiters
                            .insert(batch.id(), (reply, applied.usage));
                        self.pending.push_back(batch);
                    }
                    None => {
                        let _ = reply.send(Err((AdminRefusal::Internal, "nothing to write")));
                    }
                }
            }
        }
    }

    /// Hands every batch the core has ready to the store, in order, without blocking.
    fn flush(&mut self) {
        while let Some(b) = self.mailbox.poll_write() {
            self.pending.push_back(b);
        }
        let Some(store) = self.store.clone() else {
            return;
        };
        while let Some(batch) = self.pending.pop_front() {
            let (ops, submitted, tx) = (batch.len(), Instant::now(), self.commit_tx.clone());
            let done = move |result| {
                let _ = tx.send(Commit {
                    result,
                    ops,
                    submitted,
                });
            };
            match store.try_submit(batch, done) {
                Ok(()) => {}
                Err(TrySubmitError::Full(batch)) => {
                    // The writer is busy; its next report brings us back here.
                    self.pending.push_front(batch);
                    break;
                }
                Err(TrySubmitError::Closed(failed)) => {
                    warn!("mailbox store writer is gone; deliveries are not acknowledged");
                    self.mailbox.on_commit_failed(&failed);
                    self.answer_admin(failed.batch, false);
                }
            }
        }
    }

    fn on_commit(&mut self, c: Commit) {
        let now = Instant::now();
        self.metrics
            .commit(now.saturating_duration_since(c.submitted), c.ops, now);
        if let Err(f) = &c.result {
            warn!(error = %f.error, "a mailbox write failed; its acks are withheld");
        }
        let batch = match &c.result {
            Ok(done) => done.batch(),
            Err(f) => f.batch,
        };
        self.answer_admin(batch, c.result.is_ok());
        let acks = self.mailbox.on_commit(c.result);
        if acks.is_empty() {
            return;
        }
        let current = self.pipeline.current_document();
        let documents = self.pipeline.documents();
        for ack in acks {
            match self.send_ack(ack, current.as_deref(), &documents) {
                Ok(()) => {
                    self.metrics.acks_sent.fetch_add(1, Ordering::Relaxed);
                }
                Err(why) => self.metrics.ack_dropped(why),
            }
        }
    }

    /// Answers the admin whose command rode in `batch`, if any.
    fn answer_admin(&mut self, batch: BatchId, durable: bool) {
        if let Some((reply, usage)) = self.admin_waiters.remove(&batch) {
            let _ = reply.send(if durable {
                Ok(usage)
            } else {
                Err((
                    AdminRefusal::Internal,
                    "the store could not make the change durable",
                ))
            });
        }
    }

    /// Builds the ack packet (symmetric work only) and puts it on the link to its first
    /// hop. The first hop must be where packets enter the mix (a layer-1 relay, or a
    /// gateway); cover traffic's random ack slots name no such node and end here.
    fn send_ack(
        &self,
        ack: AckToSend,
        current: Option<&Topology>,
        documents: &[Arc<Topology>],
    ) -> Result<(), AckDrop> {
        current.ok_or(AckDrop::NoDirectory)?;
        let label = ack.key_epoch_label();
        let packet = ack.into_packet().map_err(|_| AckDrop::BadSurb)?;
        let entry = documents.iter().any(|t| {
            t.node(&packet.first_hop)
                .is_some_and(|n| n.role == Role::Gateway || n.layer == Some(0))
        });
        if !entry {
            return Err(AckDrop::NotInDirectory);
        }
        // The SURB's creator says in the ack message which epoch's keys it used.
        let frame = Frame::sphinx(label, &packet.packet).map_err(|_| AckDrop::BadSurb)?;
        if packet.first_hop == self.me {
            if self
                .pipeline
                .inject(Box::new(*frame.as_bytes()), Instant::now())
            {
                Ok(())
            } else {
                Err(AckDrop::Overload)
            }
        } else {
            self.pipeline
                .send(&packet.first_hop, &frame)
                .map_err(|r| match r {
                    shoal_relay::DropReason::Overload => AckDrop::Overload,
                    _ => AckDrop::NotInDirectory,
                })
        }
    }

    fn publish(&self) {
        let store = self.store.as_ref().map(|s| s.stats()).unwrap_or_default();
        self.metrics.publish(
            self.mailbox.stats(),
            store,
            self.mailbox.accounts(),
            self.mailbox.total_items(),
            self.mailbox.in_flight_batches() + self.pending.len(),
        );
    }
}

/// One account's send-rate bucket, shared by all of its links.
type Bucket = Arc<std::sync::Mutex<SendLimiter>>;

/// The subnets hosted here, replaceable while running.
#[derive(Debug)]
struct Hosted(std::sync::RwLock<Vec<SubnetId>>);

impl Hosted {
    fn get(&self) -> Vec<SubnetId> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
    fn set(&self, subnets: Vec<SubnetId>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = subnets;
    }
}

/// What every client link task shares.
struct Clients {
    limits: LimitConfig,
    /// Buckets of connected accounts and of accounts serving a cut penalty. Locked only
    /// when a link opens or closes; frames lock their own account's bucket.
    buckets: std::sync::Mutex<HashMap<AccountKey, Bucket>>,
    /// Subnets hosted here: only their admins' commands are applied.
    hosted: Arc<Hosted>,
    requests: mpsc::Sender<Request>,
    /// Weak, so a lingering client task cannot keep the store open after shutdown.
    store: std::sync::Weak<Store>,
    pull_answer: PullAnswerConfig,
    pipeline: Pipeline,
    metrics: Arc<Metrics>,
}

async fn accept_clients(
    endpoint: Arc<LinkEndpoint>,
    clients: Arc<Clients>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let next = tokio::select! {
            n = endpoint.accept() => n,
            _ = shutdown.changed() => return,
        };
        match next {
            None => return,
            Some(Ok(link)) => {
                let span = tracing::debug_span!("client", id = link.connection().stable_id());
                tokio::spawn(client_task(link, clients.clone()).instrument(span));
            }
            Some(Err(e)) => debug!(error = %e, "client handshake failed"),
        }
    }
}

/// A control message from a client's stream (with its arrival time), or a frame that
/// was not one.
enum Control {
    Msg(ClientMsg, Instant),
    Malformed,
    /// The account passed the flood threshold: refuse and close the link.
    Cut,
}

/// The message of the `RateLimited` refusal.
const RATE_LIMITED: &str = "sending far faster than the network's client rates; try later";

/// λP+λL+λD of the directory in use (the defaults' sum before the first document).
fn client_rate(pipeline: &Pipeline) -> f64 {
    let sum = |p: &shoal_topology::NetworkParams| p.lambda_p + p.lambda_l + p.lambda_d;
    pipeline
        .current_document()
        .map_or_else(|| sum(&Default::default()), |t| sum(t.params()))
}

impl Clients {
    /// The bucket of `key`, created full if it has none; `None` while it serves a cut
    /// penalty. Forgets idle buckets of accounts with no link left.
    fn bucket(&self, key: AccountKey, now: Instant) -> Option<Bucket> {
        let rate = client_rate(&self.pipeline);
        let mut map = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = map.get(&key) {
            if b.lock().unwrap_or_else(|e| e.into_inner()).is_cut(now) {
                return None;
            }
            return Some(b.clone());
        }
        map.retain(|_, b| {
            Arc::strong_count(b) > 1
                || !b
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .is_idle(rate, now)
        });
        let b = Arc::new(std::sync::Mutex::new(SendLimiter::new(
            self.limits,
            rate,
            now,
        )));
        map.insert(key, b.clone());
        Some(b)
    }

    /// A link of `key` ended: forget its bucket if nothing else holds it and a fresh
    /// one would be the same.
    fn release(&self, key: AccountKey, bucket: Bucket) {
        let rate = client_rate(&self.pipeline);
        let mut map = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let idle = bucket
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_idle(rate, Instant::now());
        drop(bucket);
        if idle && map.get(&key).is_some_and(|b| Arc::strong_count(b) == 1) {
            map.remove(&key);
        }
    }
}

async fn ask<T>(clients: &Clients, make: impl FnOnce(oneshot::Sender<T>) -> Request) -> Option<T> {
    let (tx, rx) = oneshot::channel();
    clients.requests.send(make(tx)).await.ok()?;
    rx.await.ok()
}

async fn client_task(link: Link, clients: Arc<Clients>) {
    let key = link.peer();
    // An account that was cut for flooding is refused until its penalty ends.
    if clients
        .buckets
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&key)
        .is_some_and(|b| {
            b.lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_cut(Instant::now())
        })
    {
        clients
            .metrics
            .clients_rate_refused
            .fetch_add(1, Ordering::Relaxed);
        refuse(&link, ErrorCode::RateLimited, RATE_LIMITED).await;
        return;
    }
    let known = ask(&clients, |reply| Request::Authenticate {
        key,
        link: link.clone(),
        reply,
    })
    .await
    .unwrap_or(false);
    if !known {
        clients
            .metrics
            .clients_refused
            .fetch_add(1, Ordering::Relaxed);
        trace!("client key is not an account; refusing");
        refuse(&link, ErrorCode::Unauthenticated, "unknown account").await;
        return;
    }
    let m = &clients.metrics;
    let id = link.connection().stable_id();
    let Some(bucket) = clients.bucket(key, Instant::now()) else {
        // Cut between the check above and now.
        m.clients_rate_refused.fetch_add(1, Ordering::Relaxed);
        let _ = clients.requests.send(Request::Gone { key, id }).await;
        refuse(&link, ErrorCode::RateLimited, RATE_LIMITED).await;
        return;
    };
    m.clients_connected.fetch_add(1, Ordering::Relaxed);
    let (control_tx, control_rx) = mpsc::channel(CLIENT_QUEUE);
    let responder =
        tokio::spawn(respond(link.clone(), key, control_rx, clients.clone()).in_current_span());
    // The client sends on one long-lived stream; a reconnecting client may open another.
    while let Ok(rx) = link.accept_frames(FRAME_SIZE).await {
        tokio::spawn(
            read_client(rx, control_tx.clone(), clients.clone(), bucket.clone()).in_current_span(),
        );
    }
    drop(control_tx);
    // Let the responder send a pending refusal; it ends once every reader is gone.
    let _ = tokio::time::timeout(REFUSAL_LINGER, responder).await;
    m.clients_connected.fetch_sub(1, Ordering::Relaxed);
    let _ = clients.requests.send(Request::Gone { key, id }).await;
    clients.release(key, bucket);
    trace!("client link closed");
}

/// The admin endpoint: opens and reassembles what was delivered to [`crate::admin_inbox::ADMIN_MAILBOX`],
/// checks each request's command (on a blocking thread: public-key work), has the
/// mailbox task apply it, and once that is durable (or refused) sends the signed answer
/// into the mixnet towards the request's `reply_to`. A command that does not even parse
/// is counted and not answered.
async fn admin_endpoint(
    mut payloads: mpsc::Receiver<Vec<u8>>,
    identity: ed25519_dalek::SigningKey,
    clients: Arc<Clients>,
) {
    let m = &clients.metrics;
    let me = identity.verifying_key().to_bytes();
    let mut inbox = AdminInbox::new(&identity);
    while let Some(payload) = payloads.recv().await {
        let request = match inbox.handle_payload(&payload, Instant::now()) {
            Ok(Some(r)) => r,
            Ok(None) => continue,
            Err(why) => {
                trace!(?why, "admin endpoint packet not used");
                continue;
            }
        };
        let hosted = clients.hosted.get();
        let command = request.command.into_bytes();
        let claimed = crate::remote_admin::claimed(&command);
        let checked = tokio::task::spawn_blocking(move || check_command(&command, &hosted))
            .await
            .unwrap_or(Err((AdminRefusal::Internal, "check task failed")));
        let (subnet, sequence, outcome) = match checked {
            Ok(c) => (
                c.subnet(),
                c.command.sequence(),
                admin_command(c, &clients).await,
            ),
            // A refusal names only what the request claimed: one answer per request, of
            // fixed content, so the endpoint amplifies nothing.
            Err(refusal) => match claimed {
                Some((subnet, sequence)) => (subnet, sequence, Err(refusal)),
                None => {
                    m.admin_refused(refusal.0);
                    info!(cause = refusal.0.label(), "admin command refused");
                    continue;
                }
            },
        };
        match &outcome {
            Ok(_) => {
                m.admin_applied.fetch_add(1, Ordering::Relaxed);
            }
            Err((cause, _)) => {
                m.admin_refused(*cause);
                info!(cause = cause.label(), "admin command refused");
            }
        }
        let sent = answer(&identity, subnet, sequence, &outcome)
            .and_then(|bytes| send_answer(&clients.pipeline, &me, &request.reply_to, &bytes));
        if let Err(e) = sent {
            warn!(error = %e, "cannot send an admin answer");
        }
    }
}

/// Builds the answer's packets and puts them into this gateway's own pipeline, where
/// they start their route as its clients' packets do.
fn send_answer(
    pipeline: &Pipeline,
    me: &NodeKey,
    to: &shoal_subnet::ReplyTo,
    bytes: &[u8],
) -> Result<(), GatewayError> {
    let topo = pipeline.current_document().ok_or(GatewayError::Internal(
        "no directory to route an admin answer",
    ))?;
    let mut rng = rand::rng();
    let plaintexts = answer_plaintexts(&mut rng, to, bytes)?;
    for frame in route_answer(&mut rng, &topo, me, to, &plaintexts)? {
        if !pipeline.inject(Box::new(*frame.as_bytes()), Instant::now()) {
            return Err(GatewayError::Internal("pipeline overloaded"));
        }
    }
    Ok(())
}

/// Has the mailbox task apply one checked command; `Ok` once it is durable.
async fn admin_command(
    checked: CheckedAdmin,
    clients: &Clients,
) -> Result<Option<UsageReport>, Refusal> {
    let action = match checked.command.action() {
        AccountAction::CreateAccount { .. } => "create_account",
        AccountAction::Deprovision { .. } => "deprovision",
        AccountAction::SetQuota { .. } => "set_quota",
        AccountAction::PublishPolicy { .. } => "publish_policy",
        AccountAction::AccountUsage => "account_usage",
    };
    let checked = Box::new(checked);
    let result = ask(clients, |reply| Request::Admin { checked, reply })
        .await
        .unwrap_or(Err((AdminRefusal::Internal, "gateway is shutting down")));
    if result.is_ok() {
        info!(action, "admin command applied");
    }
    result
}

/// Sends one `Error` frame, gives the client a moment to read it, and closes.
async fn refuse(link: &Link, code: ErrorCode, message: &str) {
    let msg = GatewayMsg::Error {
        code,
        message: message.to_owned(),
    };
    if let (Ok(frame), Ok(mut tx)) = (msg.to_frame(), link.open_frames(FRAME_SIZE).await)
        && tx.send(frame.as_bytes()).await.is_ok()
    {
        let _ = tx.finish();
        let _ = tokio::time::timeout(REFUSAL_LINGER, link.connection().closed()).await;
    }
    link.close();
}

/// Reads fixed-size frames: Sphinx packets go straight into the mixing pipeline (this
/// gateway is their first hop, and their delay counts from now); control messages go
/// to the link's responder.
async fn read_client(
    mut rx: FrameReceiver,
    control: mpsc::Sender<Control>,
    clients: Arc<Clients>,
    bucket: Bucket,
) {
    let m = &clients.metrics;
    let mut rate = client_rate(&clients.pipeline);
    let mut rate_read = Instant::now();
    loop {
        let mut buf = Box::new([0u8; FRAME_SIZE]);
        match rx.recv_into(&mut buf[..]).await {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                trace!(error = %e, "client stream ended");
                return;
            }
        }
        let arrived = Instant::now();
        let item = if buf[0] != FRAME_VERSION {
            Control::Malformed
        } else if buf[1] == FrameKind::Sphinx as u8 {
            m.client_sphinx_frames.fetch_add(1, Ordering::Relaxed);
            if arrived.saturating_duration_since(rate_read) >= RATE_REFRESH {
                rate = client_rate(&clients.pipeline);
                rate_read = arrived;
            }
            let admit = bucket
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .admit(rate, arrived);
            match admit {
                // Overload is counted by the pipeline; the client's retransmission covers it.
                Admit::Pass => {
                    let _ = clients.pipeline.inject(buf, arrived);
                    continue;
                }
                // Dropped before any public-key work: a flood costs the gateway little.
                Admit::Throttle => {
                    m.client_frames_throttled.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                Admit::Cut => {
                    let _ = control.send(Control::Cut).await;
                    return;
                }
            }
        } else {
            match Frame::decode(&buf[..])
                .ok()
                .and_then(|f| ClientMsg::from_frame(&f).ok())
            {
                Some(msg) => {
                    m.client_control_frames.fetch_add(1, Ordering::Relaxed);
                    Control::Msg(msg, arrived)
                }
                None => Control::Malformed,
            }
        };
        if matches!(item, Control::Malformed) {
            m.client_malformed.fetch_add(1, Ordering::Relaxed);
        }
        if control.send(item).await.is_err() {
            return;
        }
    }
}

/// Answers a client's control messages on one gateway→client stream: pulls through the
/// link's [`PullResponder`] (each at its fixed due time), the rest at once.
async fn respond(
    link: Link,
    key: AccountKey,
    mut control: mpsc::Receiver<Control>,
    clients: Arc<Clients>,
) {
    let mut out: Option<FrameSender> = None;
    let mut pulls = PullResponder::new(clients.pull_answer);
    let (loaded_tx, mut loaded) =
        mpsc::channel::<(PullToken, Vec<GatewayMsg>, bool)>(crate::pull::MAX_PULLS_IN_PROGRESS);
    let mut reading = true;
    loop {
        let due = pulls.poll_timeout().map(tokio::time::Instant::from_std);
        let (messages, close) = tokio::select! {
            c = control.recv(), if reading && pulls.can_accept() => match c {
                Some(Control::Msg(ClientMsg::Pull { acks }, arrived)) => {
                    let token = pulls.handle_pull(arrived);
                    let (clients, tx) = (clients.clone(), loaded_tx.clone());
                    tokio::spawn(
                        async move {
                            let (messages, close) = pull(&clients, key, acks).await;
                            let _ = tx.send((token, messages, close)).await;
                        }
                        .in_current_span(),
                    );
                    continue;
                }
                Some(Control::Msg(ClientMsg::Ack { ids }, _)) => {
                    if clients.requests.send(Request::Ack { key, ids }).await.is_err() {
                        return;
                    }
                    continue;
                }
                Some(c) => answer_now(c, &clients),
                None => {
                    // Every reader is gone: answer what is in progress, then end.
                    reading = false;
                    (Vec::new(), false)
                }
            },
            Some((token, messages, close)) = loaded.recv() => {
                pulls.handle_loaded(token, messages, close, Instant::now());
                (Vec::new(), false)
            }
            () = sleep_until_some(due) => (Vec::new(), false),
        };
        let mut batches = vec![(messages, close)];
        while let Some(a) = pulls.poll_transmit(Instant::now()) {
            if a.late {
                clients
                    .metrics
                    .pull_answers_late
                    .fetch_add(1, Ordering::Relaxed);
            }
            batches.push((a.messages, a.close));
        }
        while let Some(ids) = pulls.poll_release() {
            let _ = clients
                .requests
                .send(Request::ReleaseOffers { key, ids })
                .await;
        }
        for (messages, close) in batches {
            if messages.is_empty() {
                continue;
            }
            if !write_answer(&link, &mut out, &messages).await {
                return;
            }
            if close {
                if let Some(tx) = out.as_mut() {
                    let _ = tx.finish();
                }
                let _ = tokio::time::timeout(REFUSAL_LINGER, link.connection().closed()).await;
                link.close();
                return;
            }
        }
        if !reading && pulls.is_idle() {
            return;
        }
    }
}

/// The answer to a control message that is not a pull (or a frame that was not one),
/// and whether to close the link after it.
fn answer_now(c: Control, clients: &Clients) -> (Vec<GatewayMsg>, bool) {
    match c {
        Control::Cut => {
            clients
                .metrics
                .clients_rate_cut
                .fetch_add(1, Ordering::Relaxed);
            debug!("client link cut for flooding");
            (
                vec![GatewayMsg::Error {
                    code: ErrorCode::RateLimited,
                    message: RATE_LIMITED.into(),
                }],
                true,
            )
        }
        Control::Malformed => (
            vec![GatewayMsg::Error {
                code: ErrorCode::Malformed,
                message: "malformed frame".into(),
            }],
            false,
        ),
        Control::Msg(ClientMsg::GetDirectory, _) => (directory(&clients.pipeline), false),
        // Commands come through the mixnet now (`admin_inbox`); no link carries them.
        Control::Msg(ClientMsg::AdminChunk { .. }, _) => (
            vec![GatewayMsg::AdminResult {
                refusal: Some(AdminRefusal::NotAdmin),
                message: "admin commands travel through the mixnet, not on a link".into(),
            }],
            false,
        ),
        // Handled by the caller.
        Control::Msg(ClientMsg::Pull { .. } | ClientMsg::Ack { .. }, _) => (Vec::new(), false),
    }
}

/// Writes one answer's frames back to back; `false` if the link is gone.
async fn write_answer(link: &Link, out: &mut Option<FrameSender>, messages: &[GatewayMsg]) -> bool {
    let mut frames = Vec::with_capacity(messages.len());
    for m in messages {
        match m.to_frame() {
            Ok(f) => frames.push(Bytes::copy_from_slice(f.as_bytes())),
            Err(e) => {
                warn!(error = %e, "cannot encode a client message");
                return false;
            }
        }
    }
    if out.is_none() {
        match link.open_frames(FRAME_SIZE).await {
            Ok(s) => *out = Some(s),
            Err(_) => return false,
        }
    }
    let Some(tx) = out.as_mut() else { return false };
    tx.send_many(&mut frames).await.is_ok()
}

async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// A pull answer: exactly `pull_batch` Item/Dummy messages and `PullDone`, read from
/// the store off the async threads, after the pull's acks are applied. The flag says
/// whether to close the link after.
async fn pull(clients: &Clients, key: AccountKey, acks: Vec<ItemId>) -> (Vec<GatewayMsg>, bool) {
    let error = |code, message: &str| {
        vec![GatewayMsg::Error {
            code,
            message: message.to_owned(),
        }]
    };
    let plan = match ask(clients, |reply| Request::Pull { key, acks, reply }).await {
        Some(Ok(plan)) => plan,
        Some(Err(GatewayError::UnknownAccount)) => {
            return (error(ErrorCode::Unauthenticated, "unknown account"), true);
        }
        Some(Err(_)) => return (error(ErrorCode::Internal, "pull failed"), false),
        None => return (error(ErrorCode::Unavailable, "shutting down"), true),
    };
    let Some(store) = clients.store.upgrade() else {
        return (error(ErrorCode::Unavailable, "shutting down"), true);
    };
    match tokio::task::spawn_blocking(move || store.load(&plan)).await {
        Ok(Ok(messages)) => (messages, false),
        Ok(Err(e)) => {
            warn!(error = %e, "cannot read a pull answer from the store");
            (error(ErrorCode::Internal, "store read failed"), false)
        }
        Err(_) => (error(ErrorCode::Internal, "store read failed"), false),
    }
}

/// The signed documents of the current and next epoch, each as a run of chunks.
fn directory(pipeline: &Pipeline) -> Vec<GatewayMsg> {
    let Some(current) = pipeline.current_document() else {
        return vec![GatewayMsg::Error {
            code: ErrorCode::Unavailable,
            message: "no directory yet".into(),
        }];
    };
    let mut out = Vec::new();
    let docs = std::iter::once(current.clone()).chain(
        pipeline
            .documents()
            .into_iter()
            .filter(|t| t.epoch() > current.epoch()),
    );
    for doc in docs {
        match directory_chunks(&doc.signed().to_json()) {
            Ok(chunks) => out.extend(chunks),
            Err(e) => warn!(epoch = doc.epoch(), error = %e, "cannot serve a directory document"),
        }
    }
    out
}

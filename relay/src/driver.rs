//! The relay driver: QUIC links (tokio + quinn) around worker threads running [`MixCore`].
//!
//! ```text
//! link reader tasks ──try_send──> bounded queue per worker ──> worker thread (MixCore)
//!                                                                 │ poll_transmit
//! directory task (keys, descriptor, documents)       per-peer bounded queue ──> link task
//! ```
//! [`spawn`] starts everything inside the current tokio runtime and returns a
//! [`RelayHandle`]; the same call serves `shoal relay run`, tests and benchmarks.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use shoal_link::{FrameReceiver, Link, LinkEndpoint, LinkError, NodeKey, PeerSet, http};
use shoal_packet::{FRAME_SIZE, Frame};
use shoal_topology::{NodeId, Role, Topology};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{Instrument, debug, info};

use crate::config::Config;
use crate::core::{DropReason, Event, MixConfig, MixCore, Unwrapper};
use crate::directory::DirectoryTask;
use crate::fair::{PeerShares, PeerSlot};
use crate::metrics::{Metrics, RelayStats};
use crate::outbound::Router;
use crate::worker::{Dispatch, Inbound, Worker};
use crate::{RelayError, keystore};

/// The directory as workers and link tasks see it.
#[derive(Debug, Default)]
pub(crate) struct View {
    /// The document loops are built from (the current epoch's, else the newest before it).
    pub current: Option<Arc<Topology>>,
    /// Every held document (previous epoch in its grace period, current, next), for routing.
    pub docs: BTreeMap<u64, Arc<Topology>>,
    pub mix: MixConfig,
}

/// `/health` for load balancers and container checks: 200 while the node routes with a
/// directory document, 503 before its first one. The version goes with either answer.
fn health(view: &View) -> http::Response {
    let version = env!("CARGO_PKG_VERSION");
    match &view.current {
        Some(doc) => http::Response::new(
            200,
            "application/json",
            format!(
                "{{\"status\":\"ok\",\"version\":\"{version}\",\"epoch\":{}}}\n",
                doc.epoch()
            ),
        ),
        None => http::Response::new(
            503,
            "application/json",
            format!("{{\"status\":\"no directory document yet\",\"version\":\"{version}\"}}\n"),
        ),
    }
}

/// State shared by the tasks and threads of one relay.
#[derive(Debug)]
pub(crate) struct Shared {
    pub metrics: Arc<Metrics>,
    pub unwrapper: Arc<Unwrapper>,
    view: RwLock<Arc<View>>,
    view_generation: AtomicU64,
    stop: AtomicBool,
}

impl Shared {
    pub(crate) fn view(&self) -> Arc<View> {
        self.view.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub(crate) fn set_view(&self, view: View) {
        let epoch = view.current.as_ref().map_or(0, |t| t.epoch() + 1);
        *self.view.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(view);
        self.view_generation.fetch_add(1, Ordering::AcqRel);
        self.metrics.directory_epoch.store(epoch, Ordering::Relaxed);
    }

    pub(crate) fn view_generation(&self) -> u64 {
        self.view_generation.load(Ordering::Acquire)
    }

    /// Link address of `id` in the newest document that lists it.
    pub(crate) fn address_of(&self, id: &NodeId) -> Option<SocketAddr> {
        let view = self.view();
        view.docs
            .values()
            .rev()
            .find_map(|t| t.node(id).map(|n| n.addr))
    }

    pub(crate) fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }
}

/// Called on a worker thread for every packet that ends at this node and is not one of
/// its own loops. Keep it short and non-blocking (a `try_send` on a channel).
pub type DeliverFn = Arc<dyn Fn(Event) + Send + Sync>;
/// Returns Prometheus text appended to this node's `/metrics`.
pub type MetricsFn = Arc<dyn Fn() -> String + Send + Sync>;

/// How a node built on this pipeline differs from a plain relay. A gateway runs the same
/// links, workers, delay queues, outbound links and directory task, and plugs in here.
#[derive(Clone)]
pub struct NodeHooks {
    /// The role published in the node's descriptor.
    pub role: Role,
    /// Where final-hop packets go. `None` (a relay): counted as `delivered` and discarded.
    pub on_delivered: Option<DeliverFn>,
    /// Extra families for `/metrics`.
    pub extra_metrics: Option<MetricsFn>,
}

impl NodeHooks {
    /// A mix relay: no deliveries, no extra metrics.
    pub fn relay() -> Self {
        NodeHooks {
            role: Role::Relay,
            on_delivered: None,
            extra_metrics: None,
        }
    }
}

impl std::fmt::Debug for NodeHooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeHooks")
            .field("role", &self.role)
            .field("on_delivered", &self.on_delivered.is_some())
            .field("extra_metrics", &self.extra_metrics.is_some())
            .finish()
    }
}

/// A handle into a running node's packet path, for front ends built on it (a gateway's
/// client links and SURB-acks). Cheap to clone; usable from any thread.
#[derive(Clone, Debug)]
pub struct Pipeline {
    dispatch: Arc<Dispatch>,
    router: Arc<Router>,
    shared: Arc<Shared>,
}

impl Pipeline {
    /// Hands a frame to the workers as if it had arrived on a link at `arrived` (this node
    /// is its first hop). Never blocks; `false` if every worker queue was full (counted
    /// as `overload`).
    pub fn inject(&self, frame: Box<[u8; FRAME_SIZE]>, arrived: Instant) -> bool {
        self.shared
            .metrics
            .frames_injected
            .fetch_add(1, Ordering::Relaxed);
        self.dispatch.send(Inbound {
            bytes: frame,
            arrived,
            peer: None,
            upstream: None,
        })
    }

    /// Puts `frame` on the link to `to` now, without a mixing delay. Never blocks.
    /// `NoRoute` if no held document lists `to`, `Overload` if its link queue is full.
    pub fn send(&self, to: &NodeId, frame: &Frame) -> Result<(), DropReason> {
        let sender = self.router.sender(to).ok_or(DropReason::NoRoute)?;
        match sender.try_send(Bytes::copy_from_slice(frame.as_bytes())) {
            Ok(()) => Ok(()),
            Err(tokio::sync::mpsc::error::TrySendError::Full(_)) => Err(DropReason::Overload),
            Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => Err(DropReason::NoRoute),
        }
    }

    /// The document in use for routing and loops, if any.
    pub fn current_document(&self) -> Option<Arc<Topology>> {
        self.shared.view().current.clone()
    }

    /// Every held document, oldest epoch first (previous in its grace period, current, next).
    pub fn documents(&self) -> Vec<Arc<Topology>> {
        self.shared.view().docs.values().cloned().collect()
    }

    /// Whether any held document lists node `id`.
    pub fn is_listed(&self, id: &NodeId) -> bool {
        self.shared.address_of(id).is_some()
    }
}

/// A running relay. Dropping it stops the relay without waiting; prefer
/// [`shutdown`](Self::shutdown).
#[derive(Debug)]
pub struct RelayHandle {
    identity: NodeKey,
    local_addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    shared: Arc<Shared>,
    endpoint: Arc<LinkEndpoint>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    workers: Vec<std::thread::JoinHandle<()>>,
    pipeline: Pipeline,
}

impl RelayHandle {
    /// A handle into the packet path (inject frames, send to a peer, read the directory).
    pub fn pipeline(&self) -> Pipeline {
        self.pipeline.clone()
    }

    /// The relay's Ed25519 identity: its node id, Sphinx address and pinned link key.
    pub fn identity(&self) -> NodeKey {
        self.identity
    }

    /// The bound QUIC address (the real port when the config said port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The bound `/metrics` address, if enabled.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// Counters as of the workers' last snapshot (at most ~200 ms old).
    pub fn stats(&self) -> RelayStats {
        self.shared.metrics.snapshot()
    }

    /// Unwrap, queue-wait and delay-error histograms (nanoseconds) over the last 30-60 s.
    pub fn latencies(&self) -> crate::metrics::Latencies {
        self.shared.metrics.latencies()
    }

    /// The `/metrics` text.
    pub fn metrics_text(&self) -> String {
        self.shared.metrics.render(Some(&self.shared.unwrapper))
    }

    /// Waits until a directory document is in use; `false` on timeout.
    pub async fn wait_for_directory(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.stats().directory_epoch.is_none() {
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    fn stop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        let _ = self.shutdown.send(true);
        for t in &self.tasks {
            t.abort();
        }
        self.endpoint.close();
    }

    /// Stops accepting, closes links and joins the worker threads.
    pub async fn shutdown(mut self) {
        self.stop();
        let workers = std::mem::take(&mut self.workers);
        let _ = tokio::task::spawn_blocking(move || {
            for w in workers {
                let _ = w.join();
            }
        })
        .await;
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
        info!("node stopped");
    }
}

impl Drop for RelayHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Starts a relay from `config` in the current tokio runtime.
///
/// Reads the identity from `config.data_dir` (see [`keystore::create_identity`]) and any
/// persisted Sphinx keys, binds the link endpoint and the metrics listener, starts
/// `config.workers` worker threads, and starts talking to the authorities in the
/// background. It returns once the sockets are bound; use
/// [`RelayHandle::wait_for_directory`] to wait for the first document.
pub async fn spawn(config: Config) -> Result<RelayHandle, RelayError> {
    spawn_with(config, NodeHooks::relay()).await
}

/// [`spawn`] for a node that is more than a relay (a gateway): `hooks` set its published
/// role, where final-hop packets go, and extra `/metrics` families.
pub async fn spawn_with(config: Config, hooks: NodeHooks) -> Result<RelayHandle, RelayError> {
    config.validate(Path::new("relay config"))?;
    let runtime = tokio::runtime::Handle::try_current().map_err(|_| RelayError::NoRuntime)?;
    let identity = keystore::load_identity(&config.identity_path())?;
    let certificate = keystore::load_certificate(
        &config.data_dir,
        &identity.verifying_key().to_bytes(),
        hooks.role,
    )?;
    let me = identity.verifying_key().to_bytes();
    let keys = keystore::load_sphinx_keys(&config.data_dir)?;
    let unwrapper = Arc::new(Unwrapper::new(keys.clone(), config.replay_capacity));
    let metrics = Metrics::new(config.workers);
    let initial_mix = MixConfig {
        max_queue: config.delay_queue_capacity.div_ceil(config.workers),
        loop_rate: 0.0,
        ..MixConfig::default()
    };
    let shared = Arc::new(Shared {
        metrics: metrics.clone(),
        unwrapper: unwrapper.clone(),
        view: RwLock::new(Arc::new(View {
            mix: initial_mix.clone(),
            ..View::default()
        })),
        view_generation: AtomicU64::new(0),
        stop: AtomicBool::new(false),
    });

    // Only nodes in the directory may connect; until the first document, nobody.
    let peers = PeerSet::new();
    let endpoint = Arc::new(
        LinkEndpoint::bind(config.listen, &identity, peers.clone()).map_err(RelayError::Link)?,
    );
    let local_addr = endpoint.local_addr().map_err(RelayError::Link)?;
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let mut tasks = Vec::new();

    let metrics_addr = match config.metrics_listen {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| RelayError::MetricsBind { addr, source })?;
            let bound = listener
                .local_addr()
                .map_err(|source| RelayError::MetricsBind { addr, source })?;
            let shared = shared.clone();
            let extra = hooks.extra_metrics.clone();
            tasks.push(tokio::spawn(http::serve(listener, move |req| {
                if req.method == "GET" && req.path == "/metrics" {
                    let mut text = shared.metrics.render(Some(&shared.unwrapper));
                    if let Some(extra) = &extra {
                        text.push_str(&extra());
                    }
                    http::Response::new(200, "text/plain; version=0.0.4; charset=utf-8", text)
                } else if req.method == "GET" && req.path == "/health" {
                    health(&shared.view())
                } else {
                    http::Response::not_found()
                }
            })));
            Some(bound)
        }
        None => None,
    };

    let router = Router::new(
        endpoint.clone(),
        runtime.clone(),
        shared.clone(),
        config.peer_queue_capacity,
        shutdown_rx.clone(),
    );
    let per_worker = config.queue_capacity.div_ceil(config.workers);
    let mut queues = Vec::with_capacity(config.workers);
    let mut workers = Vec::with_capacity(config.workers);
    let loops = Arc::new(crate::core::LoopRegistry::default());
    for index in 0..config.workers {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Inbound>(per_worker);
        queues.push(tx);
        let worker = Worker {
            index,
            core: MixCore::with_loops(me, unwrapper.clone(), initial_mix.clone(), loops.clone()),
            inbox: rx,
            shared: shared.clone(),
            router: router.clone(),
            rng: rand::make_rng(),
            on_delivered: hooks.on_delivered.clone(),
        };
        let thread = std::thread::Builder::new()
            .name(format!("shoal-relay-worker-{index}"))
            .spawn(move || worker.run());
        match thread {
            Ok(t) => workers.push(t),
            Err(e) => {
                shared.stop.store(true, Ordering::Relaxed);
                return Err(RelayError::Thread(e));
            }
        }
    }
    let dispatch = Arc::new(Dispatch::new(queues, shared.clone()));
    let pipeline = Pipeline {
        dispatch: dispatch.clone(),
        router: router.clone(),
        shared: shared.clone(),
    };
    tasks.push(tokio::spawn(accept_loop(
        endpoint.clone(),
        dispatch,
        PeerShares::new(config.queue_capacity),
        shared.clone(),
        shutdown_rx.clone(),
    )));

    let link_addr = config.public_addr.unwrap_or(local_addr).to_string();
    let directory = DirectoryTask {
        shared: shared.clone(),
        router,
        peers,
        identity,
        certificate,
        role: hooks.role,
        link_addr,
        authority_set: config.authority_set(),
        authorities: config.authorities.clone(),
        data_dir: config.data_dir.clone(),
        keys,
        workers: config.workers,
        delay_queue_capacity: config.delay_queue_capacity,
        shutdown: shutdown_rx,
    };
    tasks.push(tokio::spawn(
        directory.run().instrument(tracing::info_span!("directory")),
    ));
    info!(
        identity = %hex::encode(me),
        listen = %local_addr,
        workers = config.workers,
        role = ?hooks.role,
        "node started"
    );
    Ok(RelayHandle {
        identity: me,
        local_addr,
        metrics_addr,
        shared,
        endpoint,
        shutdown: shutdown_tx,
        tasks,
        workers,
        pipeline,
    })
}

async fn accept_loop(
    endpoint: Arc<LinkEndpoint>,
    dispatch: Arc<Dispatch>,
    shares: Arc<PeerShares>,
    shared: Arc<Shared>,
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
                let span = tracing::debug_span!("inbound link", id = link.connection().stable_id());
                let slot = Arc::new(shares.join(link.peer()));
                tokio::spawn(
                    link_task(link, dispatch.clone(), slot, shared.clone()).instrument(span),
                );
            }
            Some(Err(e)) => debug!(error = %e, "inbound link refused"),
        }
    }
}

async fn link_task(link: Link, dispatch: Arc<Dispatch>, slot: Arc<PeerSlot>, shared: Arc<Shared>) {
    shared.metrics.links_inbound.fetch_add(1, Ordering::Relaxed);
    while let Ok(rx) = link.accept_frames(FRAME_SIZE).await {
        tokio::spawn(
            stream_task(
                rx,
                dispatch.clone(),
                slot.clone(),
                link.peer(),
                shared.clone(),
            )
            .in_current_span(),
        );
    }
    shared.metrics.links_inbound.fetch_sub(1, Ordering::Relaxed);
}

async fn stream_task(
    mut rx: FrameReceiver,
    dispatch: Arc<Dispatch>,
    slot: Arc<PeerSlot>,
    upstream: [u8; 32],
    shared: Arc<Shared>,
) {
    let m = &shared.metrics;
    loop {
        let mut buf = Box::new([0u8; FRAME_SIZE]);
        match rx.recv_into(&mut buf[..]).await {
            Ok(true) => {
                m.frames_received.fetch_add(1, Ordering::Relaxed);
                // A peer over its share of the worker queues is shed before any
                // public-key work, whatever the other peers are sending.
                if !slot.try_take() {
                    m.inbound_peer_limit.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                dispatch.send(Inbound {
                    bytes: buf,
                    arrived: Instant::now(),
                    peer: Some(slot.queue()),
                    upstream: Some(upstream),
                });
            }
            Ok(false) => return,
            Err(LinkError::TruncatedFrame { .. }) => {
                m.frames_received.fetch_add(1, Ordering::Relaxed);
                m.inbound_truncated.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Err(e) => {
                debug!(error = %e, "inbound stream ended");
                return;
            }
        }
    }
}

//! Links to next hops: one long-lived QUIC connection and one frame stream per peer,
//! dialled on first use with the peer's key pinned from the directory, fed by a
//! bounded queue that workers fill without blocking.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use shoal_link::LinkEndpoint;
use shoal_packet::FRAME_SIZE;
use shoal_topology::NodeId;
use tokio::sync::{mpsc, watch};
use tracing::{Instrument, debug, trace};

use crate::driver::Shared;

/// Frames written to a link in one `send_many`.
const SEND_BATCH: usize = 128;
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// Hands out the queue of each next hop, creating its link task on first use.
#[derive(Debug)]
pub(crate) struct Router {
    peers: Mutex<HashMap<NodeId, mpsc::Sender<Bytes>>>,
    /// Bumped whenever a queue is removed, so workers drop cached senders.
    generation: AtomicU64,
    endpoint: Arc<LinkEndpoint>,
    runtime: tokio::runtime::Handle,
    shared: Arc<Shared>,
    capacity: usize,
    shutdown: watch::Receiver<bool>,
}

impl Router {
    pub(crate) fn new(
        endpoint: Arc<LinkEndpoint>,
        runtime: tokio::runtime::Handle,
        shared: Arc<Shared>,
        capacity: usize,
        shutdown: watch::Receiver<bool>,
    ) -> Arc<Self> {
        Arc::new(Router {
            peers: Mutex::new(HashMap::new()),
            generation: AtomicU64::new(0),
            endpoint,
            runtime,
            shared,
            capacity,
            shutdown,
        })
    }

    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The queue for `peer`, or `None` if the directory does not list it.
    pub(crate) fn sender(self: &Arc<Self>, peer: &NodeId) -> Option<mpsc::Sender<Bytes>> {
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = peers.get(peer)
            && !s.is_closed()
        {
            return Some(s.clone());
        }
        self.shared.address_of(peer)?;
        let (tx, rx) = mpsc::channel(self.capacity);
        peers.insert(*peer, tx.clone());
        let span = tracing::debug_span!("peer");
        self.runtime
            .spawn(peer_task(self.clone(), *peer, rx).instrument(span));
        Some(tx)
    }

    /// Drops the queues of peers no longer listed; their link tasks end once drained.
    pub(crate) fn retain(&self, keep: impl Fn(&NodeId) -> bool) {
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        let before = peers.len();
        peers.retain(|id, s| keep(id) && !s.is_closed());
        if peers.len() != before {
            self.generation.fetch_add(1, Ordering::AcqRel);
        }
    }

    fn forget(&self, peer: &NodeId) {
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        if peers.get(peer).is_some_and(mpsc::Sender::is_closed) {
            peers.remove(peer);
            self.generation.fetch_add(1, Ordering::AcqRel);
        }
    }

    fn lost(&self, n: usize) {
        self.shared
            .metrics
            .link_errors
            .fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// Waits out a back-off, dropping (and counting) frames that arrive meanwhile: frames
/// queued behind a dead link would leave late and in a burst. Returns `false` to stop.
async fn back_off(
    router: &Router,
    rx: &mut mpsc::Receiver<Bytes>,
    wait: Duration,
    shutdown: &mut watch::Receiver<bool>,
) -> bool {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        tokio::select! {
            () = tokio::time::sleep_until(deadline) => return true,
            _ = shutdown.changed() => return false,
            got = rx.recv() => match got {
                Some(_) => router.lost(1),
                None => return false,
            },
        }
    }
}

async fn connect(
    router: &Router,
    peer: NodeId,
    addr: SocketAddr,
) -> Result<(shoal_link::Link, shoal_link::FrameSender), shoal_link::LinkError> {
    let link = router.endpoint.connect(addr, peer).await?;
    let tx = link.open_frames(FRAME_SIZE).await?;
    Ok((link, tx))
}

async fn peer_task(router: Arc<Router>, peer: NodeId, mut rx: mpsc::Receiver<Bytes>) {
    let mut shutdown = router.shutdown.clone();
    let mut backoff = BACKOFF_MIN;
    let mut batch: Vec<Bytes> = Vec::with_capacity(SEND_BATCH);
    'dial: loop {
        if *shutdown.borrow() {
            break;
        }
        let Some(addr) = router.shared.address_of(&peer) else {
            break;
        };
        let dialled = tokio::select! {
            r = connect(&router, peer, addr) => r,
            _ = shutdown.changed() => break,
        };
        let (link, mut tx) = match dialled {
            Ok(pair) => pair,
            Err(e) => {
                debug!(error = %e, "dialling next hop failed; backing off");
                if !back_off(&router, &mut rx, backoff, &mut shutdown).await {
                    break;
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        trace!(%addr, "next-hop link up");
        backoff = BACKOFF_MIN;
        let links = &router.shared.metrics.links_outbound;
        links.fetch_add(1, Ordering::Relaxed);
        let keep_going = loop {
            let n = tokio::select! {
                n = rx.recv_many(&mut batch, SEND_BATCH) => n,
                _ = link.connection().closed() => break true,
                _ = shutdown.changed() => break false,
            };
            if n == 0 {
                break false;
            }
            if let Err(e) = tx.send_many(&mut batch).await {
                debug!(error = %e, "next-hop link failed; redialling");
                router.lost(n);
                batch.clear();
                break true;
            }
            batch.clear();
        };
        links.fetch_sub(1, Ordering::Relaxed);
        if !keep_going {
            let _ = tx.finish();
            break 'dial;
        }
    }
    rx.close();
    let mut left = 0;
    while rx.try_recv().is_ok() {
        left += 1;
    }
    router.lost(left);
    router.forget(&peer);
}

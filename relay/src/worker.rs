//! Worker threads: each owns a [`MixCore`] and drives it with the frames readers hand over.
//!
//! Unwrapping is public-key work, so it runs on plain OS threads (one per core), never
//! on the async runtime that reads and writes links.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::rngs::StdRng;
use shoal_packet::FRAME_SIZE;
use shoal_topology::{NodeId, Topology};
use tokio::sync::mpsc;
use tracing::trace;

use crate::core::{DropReason, Event, MixCore, Transmit};
use crate::driver::Shared;
use crate::metrics::{Latencies, WorkerSnapshot, record};
use crate::outbound::Router;

/// A frame as a reader received it.
#[derive(Debug)]
pub(crate) struct Inbound {
    pub bytes: Box<[u8; FRAME_SIZE]>,
    pub arrived: Instant,
    /// The sending peer's place in its fair share, released when a worker takes the
    /// frame (`None`: injected by the node's own front end).
    pub peer: Option<Arc<crate::fair::PeerQueue>>,
    /// The sending peer's key (`None`: injected), for its share of the replay filter.
    pub upstream: Option<[u8; 32]>,
}

/// Frames a worker takes per wake-up before it looks at its timers again.
const BATCH: usize = 64;
/// Longest a worker sleeps without checking for directory changes and shutdown.
const TICK: Duration = Duration::from_millis(50);
/// How often a worker publishes its counters.
const PUBLISH_EVERY: Duration = Duration::from_millis(200);

/// Spreads inbound frames over the workers' bounded queues without ever blocking.
#[derive(Debug)]
pub(crate) struct Dispatch {
    queues: Vec<SyncSender<Inbound>>,
    next: std::sync::atomic::AtomicUsize,
    shared: Arc<Shared>,
}

impl Dispatch {
    pub(crate) fn new(queues: Vec<SyncSender<Inbound>>, shared: Arc<Shared>) -> Self {
        Dispatch {
            queues,
            next: std::sync::atomic::AtomicUsize::new(0),
            shared,
        }
    }

    /// Offers `item` to each worker in turn, starting from a rotating one; if every queue
    /// is full the frame is dropped and counted as overload (`false`).
    pub(crate) fn send(&self, mut item: Inbound) -> bool {
        let m = &self.shared.metrics;
        let n = self.queues.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        m.worker_queue_depth.fetch_add(1, Ordering::Relaxed);
        for i in 0..n {
            match self.queues[(start + i) % n].try_send(item) {
                Ok(()) => return true,
                Err(TrySendError::Full(back) | TrySendError::Disconnected(back)) => item = back,
            }
        }
        m.worker_queue_depth.fetch_sub(1, Ordering::Relaxed);
        m.inbound_overload.fetch_add(1, Ordering::Relaxed);
        if let Some(peer) = &item.peer {
            peer.release();
        }
        false
    }
}

pub(crate) struct Worker {
    pub index: usize,
    pub core: MixCore,
    pub inbox: Receiver<Inbound>,
    pub shared: Arc<Shared>,
    pub router: Arc<Router>,
    pub rng: StdRng,
    /// Where final-hop packets go (gateways); `None` discards them (relays).
    pub on_delivered: Option<crate::driver::DeliverFn>,
}

struct Local {
    topology: Option<Arc<Topology>>,
    view_generation: u64,
    router_generation: u64,
    links: HashMap<NodeId, mpsc::Sender<Bytes>>,
    latencies: Latencies,
    batch: Vec<Inbound>,
}

impl Worker {
    pub(crate) fn run(mut self) {
        let mut local = Local {
            topology: None,
            view_generation: u64::MAX,
            router_generation: self.router.generation(),
            links: HashMap::new(),
            latencies: Latencies::default(),
            batch: Vec::with_capacity(BATCH),
        };
        let mut next_publish = Instant::now() + PUBLISH_EVERY;
        while !self.shared.stopping() {
            let now = Instant::now();
            let wait = self
                .core
                .poll_timeout()
                .map_or(TICK, |t| t.saturating_duration_since(now))
                .min(TICK);
            match self.inbox.recv_timeout(wait) {
                Ok(item) => local.batch.push(item),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            while local.batch.len() < BATCH {
                match self.inbox.try_recv() {
                    Ok(item) => local.batch.push(item),
                    Err(_) => break,
                }
            }
            self.handle_batch(&mut local);

            let now = Instant::now();
            self.refresh(&mut local);
            // With no timer set the core may still need its first call (loop schedule
            // after a directory change); it is cheap when there is nothing to do.
            if self.core.poll_timeout().is_none_or(|t| t <= now) {
                if let Some(t) = &local.topology {
                    let wall = t.schedule().epoch_at(crate::directory::unix_now());
                    self.core.set_wall_epoch(wall);
                }
                self.core
                    .handle_timeout(now, &mut self.rng, local.topology.as_deref());
            }
            self.transmit_due(&mut local, now);
            if now >= next_publish {
                self.publish(&mut local, now);
                next_publish = now + PUBLISH_EVERY;
            }
        }
        self.publish(&mut local, Instant::now());
    }

    fn handle_batch(&mut self, local: &mut Local) {
        let depth = &self.shared.metrics.worker_queue_depth;
        if !local.batch.is_empty() {
            depth.fetch_sub(local.batch.len(), Ordering::Relaxed);
        }
        let mut batch = std::mem::take(&mut local.batch);
        for item in batch.drain(..) {
            if let Some(peer) = &item.peer {
                peer.release();
            }
            let start = Instant::now();
            record(
                &mut local.latencies.queue_wait,
                start.saturating_duration_since(item.arrived),
            );
            // The delay counts from arrival, so time spent queued for a worker is part
            // of the mixing delay rather than added to it.
            let _ =
                self.core
                    .handle_packet_from(&item.bytes[..], item.upstream.as_ref(), item.arrived);
            let done = Instant::now();
            record(
                &mut local.latencies.unwrap,
                done.saturating_duration_since(start),
            );
            // A packet that fell due during this unwrap leaves now, not after the rest
            // of the batch: at 64 unwraps a batch is several milliseconds.
            self.transmit_due(local, done);
        }
        local.batch = batch;
        while let Some(event) = self.core.poll_event() {
            match (&self.on_delivered, event) {
                (Some(deliver), event) => deliver(event),
                // A relay is never an exit: a final hop here is a misrouted or probing
                // packet. It is counted (`delivered`) and discarded.
                (None, Event::Delivered { .. }) => {
                    trace!("discarded a packet that ended at this relay")
                }
            }
        }
    }

    /// Hands every packet whose delay has elapsed to its next hop's link queue.
    fn transmit_due(&mut self, local: &mut Local, now: Instant) {
        while let Some(t) = self.core.poll_transmit(now) {
            record(
                &mut local.latencies.delay_error,
                now.saturating_duration_since(t.due),
            );
            self.route(local, t);
        }
    }

    /// Picks up a new directory view and drops cached link queues the router replaced.
    fn refresh(&mut self, local: &mut Local) {
        let generation = self.shared.view_generation();
        if generation != local.view_generation {
            let view = self.shared.view();
            local.topology = view.current.clone();
            self.core.set_config(view.mix.clone());
            local.view_generation = generation;
        }
        let rg = self.router.generation();
        if rg != local.router_generation {
            local.links.clear();
            local.router_generation = rg;
        }
    }

    fn route(&mut self, local: &mut Local, t: Transmit) {
        let mut bytes = Bytes::copy_from_slice(t.frame.as_bytes());
        for _ in 0..2 {
            let sender = match local.links.get(&t.to) {
                Some(s) => s,
                None => match self.router.sender(&t.to) {
                    Some(s) => local.links.entry(t.to).or_insert(s),
                    None => {
                        self.core.count_drop(DropReason::NoRoute);
                        return;
                    }
                },
            };
            match sender.try_send(bytes) {
                Ok(()) => return,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    self.core.count_drop(DropReason::Overload);
                    return;
                }
                Err(mpsc::error::TrySendError::Closed(back)) => {
                    // The link task ended (peer left the directory, shutdown); ask again.
                    local.links.remove(&t.to);
                    bytes = back;
                }
            }
        }
        self.core.count_drop(DropReason::NoRoute);
    }

    fn publish(&mut self, local: &mut Local, now: Instant) {
        let snapshot = WorkerSnapshot {
            stats: self.core.stats().clone(),
            delay_queue: self.core.queue_len(),
            loops_outstanding: self.core.loops_outstanding(),
        };
        self.shared
            .metrics
            .publish(self.index, snapshot, &local.latencies, now);
        local.latencies.reset();
    }
}

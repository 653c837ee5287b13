//! The tokio driver around [`ClientCore`]: one QUIC link to the client's gateway, the
//! constant pull schedule, the directory, and the durable store.
//!
//! ```text
//!             ┌────────────── one task owns the core ───────────────┐
//! commands ──►│ send_message ─► save snapshot ─► reply               │
//!             │ poll_timeout ─► handle_timeout ─► poll_transmit ──────┼──► uni stream ─► gateway
//!             │ pull tick (constant) ─► Pull{acks} ───────────────────┼──►
//! gateway ───►│ Item ─► handle_mailbox_item; PullDone ─► store ─► acks│◄── uni stream ◄─ gateway
//!             │   (the acks wait in the PullSession for the next tick)  │
//!             │ DirectoryChunk ─► parse ─► signatures ─► time ─► epoch edge ─► set_topology
//!             └──► events (broadcast), stats (shared)                 ┘
//! ```
//!
//! **On time.** The driver wakes `build_ahead` before each stream event, builds its
//! frames as of the event's instant and writes them at that instant, so a packet
//! leaves on its Poisson schedule whatever its build costs, real or cover alike.
//!
//! The core keeps its schedule whether or not the link is up: frames produced while
//! disconnected are discarded and counted (`frames_unsent`), and real fragments among
//! them are retransmitted like any lost packet. Reconnection backs off exponentially
//! with jitter ([`Backoff`]) and resets only after a pull was answered; a gateway that
//! refuses the account (`Error{Unauthenticated}`) ends reconnection for good
//! ([`LinkProblem::AccessRemoved`]). A wrong gateway key or a directory the configured
//! authorities did not sign is reported once, as a warning and a
//! [`DriverEvent::Problem`], naming the setting in `client.toml` to check.
//!
//! **Nothing leaves the link off schedule.** The pull schedule and the acks live in a
//! [`PullSession`]: one `Pull` frame per tick, carrying the acks of items made durable
//! since the last one. The tick is served even while a store write is awaited.
//!
//! **Acked ⇒ durable, on the client side too.** A pulled item is acked only once what it
//! carried is durable: completed messages, the fragments of incomplete ones and the
//! snapshot naming completed ids are written in one redb transaction first. Every item
//! of an answer is then acked, whatever it carried, so the gateway never offers an
//! item again once it is safe here: fragments of messages that never complete (junk
//! from anyone who knows our card) cost one pull slot each, and are dropped by the
//! bounded reassembler ([`shoal_packet::fragment::ReassemblyLimits`]), never held
//! unacked where the gateway would offer them again and again ahead of newer mail.
//! Acks go with the next pull.
//!
//! **Emulated loss** (`DriverConfig::emulated_loss`, for demos and tests): each Sphinx
//! frame the client sends and each `Item` it receives is discarded with that
//! probability, before the link sees it (outbound) or the core sees it (inbound). A
//! discarded item is not acked, so the gateway offers it again after its redelivery
//! timeout. QUIC would hide real link loss; this emulates packets lost in the mixnet.

use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ed25519_dalek::SigningKey;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde::Serialize;
use shoal_link::{FrameSender, Link, LinkEndpoint, LinkError, NodeKey, PeerSet};
use shoal_packet::protocol::{ClientMsg, DirectoryAssembler, ErrorCode, GatewayMsg};
use shoal_packet::{FRAME_SIZE, Frame, FrameKind, MessageId};
use shoal_topology::{AuthoritySet, Topology, TopologyError, UncheckedDocument};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::sleep_until;
use tracing::{Instrument, debug, info, trace, warn};

use crate::contact::Contact;
use crate::core::{
    ClientConfig, ClientCore, ClientError, ClientStats, Event, Identity, PartialOp, SendRecord,
};
use crate::session::{Backoff, EpochEdge, LinkProblem, PullConfig, PullSession};
use crate::store::{ClientStore, ReceivedMessage};

/// Largest directory document accepted from a gateway.
const MAX_DIRECTORY_BYTES: usize = 16 << 20;
/// Inbound gateway messages buffered between the link reader and the core task.
const INBOUND_QUEUE: usize = 4096;
/// Completed message ids remembered to ack late fragments of them.
const REMEMBER_COMPLETED: usize = 65536;

/// How the driver runs; the network parameters themselves come from the directory.
#[derive(Debug, Clone)]
pub struct DriverConfig {
    /// The gateway's client endpoint (QUIC).
    pub gateway_addr: SocketAddr,
    /// The gateway's Ed25519 node key, pinned on the link.
    pub gateway_key: NodeKey,
    /// Authorities whose signatures make a directory valid (k of N).
    pub authorities: AuthoritySet,
    /// Where the client's QUIC endpoint binds (port 0: any).
    pub bind: SocketAddr,
    /// A pull is sent every `pull_interval`, whatever the client is doing.
    pub pull_interval: Duration,
    /// The directory is fetched again this often (and when the current one expires).
    pub directory_refresh: Duration,
    /// The core's snapshot is saved this often when it changed.
    pub snapshot_interval: Duration,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    /// Probability of discarding each outbound Sphinx frame and each inbound item
    /// (see the module docs). 0 in production.
    pub emulated_loss: f64,
    /// Benchmarks only: keep a [`ReceiveRecord`] for up to this many received messages
    /// (the oldest are dropped). 0 in production: they are per-message timings, so they
    /// are never logged or exported, only handed to [`ClientHandle::take_receive_records`].
    pub receive_records: usize,
    /// Frames for a stream event are built this long before it falls due and written
    /// at the due instant, so the Sphinx build no longer delays the packet, and real
    /// and cover packets (whose builds differ in cost) leave equally on time. Zero
    /// builds when the event falls due.
    pub build_ahead: Duration,
    /// Test-only (`[testing] legacy_leaks` in client.toml): ack in separate `Ack` frames
    /// right after each save instead of in the next pull, as clients did before. The
    /// observer's control runs use it to show the timing leak that closes.
    pub legacy_leaks: bool,
    pub client: ClientConfig,
}

impl DriverConfig {
    /// Defaults for everything but the gateway and the authorities.
    pub fn new(gateway_addr: SocketAddr, gateway_key: NodeKey, authorities: AuthoritySet) -> Self {
        let bind = if gateway_addr.is_ipv4() {
            SocketAddr::from(([0, 0, 0, 0], 0))
        } else {
            SocketAddr::from(([0u16; 8], 0))
        };
        DriverConfig {
            gateway_addr,
            gateway_key,
            authorities,
            bind,
            pull_interval: Duration::from_secs(1),
            directory_refresh: Duration::from_secs(300),
            snapshot_interval: Duration::from_secs(5),
            reconnect_min: Duration::from_millis(200),
            reconnect_max: Duration::from_secs(30),
            emulated_loss: 0.0,
            receive_records: 0,
            build_ahead: Duration::from_millis(4),
            legacy_leaks: false,
            client: ClientConfig::default(),
        }
    }
}

/// What the driver tells its user.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DriverEvent {
    /// The link to the gateway is up.
    Connected,
    /// The link went down; the driver reconnects by itself.
    Disconnected,
    /// A verified directory for `epoch` is in use.
    Directory { epoch: u64 },
    /// A complete message arrived and is durable in the store.
    Message {
        message_id: MessageId,
        bytes: Vec<u8>,
        received_unix_ms: u64,
    },
    /// A message we sent is durable in its recipient's mailbox.
    Acked { message_id: MessageId },
    /// The link cannot work, and why (its `Display` is the sentence to show). After
    /// [`LinkProblem::AccessRemoved`] the driver no longer connects.
    Problem(LinkProblem),
}

impl std::fmt::Debug for DriverEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DriverEvent::Connected => f.write_str("Connected"),
            DriverEvent::Disconnected => f.write_str("Disconnected"),
            DriverEvent::Directory { epoch } => write!(f, "Directory({epoch})"),
            // Bodies are user data.
            DriverEvent::Message { bytes, .. } => write!(f, "Message({} bytes)", bytes.len()),
            DriverEvent::Acked { .. } => f.write_str("Acked"),
            DriverEvent::Problem(p) => write!(f, "Problem({p:?})"),
        }
    }
}

/// When a received message crossed the recipient's side (see
/// [`DriverConfig::receive_records`]). The gateway answered pull `pull_sent` with the
/// message's last fragment and pull `previous_pull_sent` without it, so the fragment
/// became pullable at the gateway between those two sends (plus the one-way trip of the
/// later one, at most `answer_first − pull_sent`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReceiveRecord {
    pub message_id: MessageId,
    /// The pull whose answer carried the message's last fragment was sent.
    pub pull_sent: Instant,
    /// The pull before it was sent (its answer was complete without the fragment);
    /// `None` for the first answer on a link.
    pub previous_pull_sent: Option<Instant>,
    /// The first frame of that answer reached the driver.
    pub answer_first: Instant,
    /// The answer's `PullDone` reached the driver (all its frames are in).
    pub answer_done: Instant,
    /// The message was durable in the store (just before `DriverEvent::Message`).
    pub stored: Instant,
}

/// What [`ClientHandle::take_receive_records`] returns.
pub type ReceiveRecords = (Vec<ReceiveRecord>, Vec<(Instant, Instant)>);

/// Pull answers being timed on one link, for [`ReceiveRecord`]s.
#[derive(Debug, Default)]
struct PullClock {
    /// Send times of pulls not yet answered, oldest first (answers come in order).
    sent: VecDeque<Instant>,
    /// Send time of the last pull answered.
    previous: Option<Instant>,
    /// First frame of the answer being received.
    answer_first: Option<Instant>,
}

/// Unanswered pulls a [`PullClock`] remembers; a gateway that stops answering leaves no
/// unbounded queue.
const PULL_CLOCK_DEPTH: usize = 64;

/// Timing of one complete pull answer: (pull sent, previous pull sent, first frame, done).
type AnswerTiming = (Instant, Option<Instant>, Instant, Instant);

impl PullClock {
    fn on_pull_sent(&mut self, at: Instant) {
        if self.sent.len() >= PULL_CLOCK_DEPTH {
            self.sent.pop_front();
        }
        self.sent.push_back(at);
    }

    fn on_answer_frame(&mut self, at: Instant) {
        self.answer_first.get_or_insert(at);
    }

    fn on_answer_done(&mut self, at: Instant) -> Option<AnswerTiming> {
        let first = self.answer_first.take().unwrap_or(at);
        let sent = self.sent.pop_front()?;
        let previous = self.previous.replace(sent);
        Some((sent, previous, first, at))
    }
}

/// Driver counters plus the core's. Aggregates only.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DriverStats {
    pub core: ClientStats,
    pub connected: bool,
    pub directory_epoch: Option<u64>,
    pub connects: u64,
    pub connect_failures: u64,
    /// Sphinx frames written to the link.
    pub frames_sent: u64,
    /// Sphinx frames the core produced while the link was down.
    pub frames_unsent: u64,
    pub pulls_sent: u64,
    pub pull_answers: u64,
    /// Pull answers whose `more` bit was set (the schedule does not speed up for it).
    pub pull_answers_more: u64,
    pub items_received: u64,
    pub dummies_received: u64,
    /// Item ids acked to the gateway (carried in pulls).
    pub items_acked: u64,
    /// Item ids durable here and waiting for the next pull to ack them.
    pub acks_waiting: usize,
    pub directory_updates: u64,
    pub directory_rejected: u64,
    pub gateway_errors: u64,
    pub emulated_lost_out: u64,
    pub emulated_lost_in: u64,
    pub snapshots_saved: u64,
    pub store_errors: u64,
    /// The gateway refused this account; the driver stopped connecting.
    pub access_removed: bool,
}

/// Why the driver refused a request or could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DriverError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("client link: {0}")]
    Link(#[from] LinkError),
    #[error("the driver needs a tokio runtime")]
    NoRuntime,
    #[error("the driver has stopped")]
    Stopped,
    #[error("driver config: {0}")]
    Config(&'static str),
}

enum Command {
    Send {
        to: Contact,
        bytes: Vec<u8>,
        reply: oneshot::Sender<Result<MessageId, ClientError>>,
    },
    TakeSendRecords {
        reply: oneshot::Sender<Vec<SendRecord>>,
    },
    TakeReceiveRecords {
        reply: oneshot::Sender<ReceiveRecords>,
    },
    Shutdown,
}

/// A running client. Dropping it stops the driver without a final snapshot; prefer
/// [`shutdown`](Self::shutdown).
#[derive(Debug)]
pub struct ClientHandle {
    commands: mpsc::Sender<Command>,
    events: broadcast::Sender<DriverEvent>,
    stats: Arc<Mutex<DriverStats>>,
    contact: Contact,
    task: Option<JoinHandle<()>>,
}

impl ClientHandle {
    /// How others reach this client.
    pub fn contact(&self) -> Contact {
        self.contact
    }

    /// Queues a message. Returns once it is durable in the local store (it survives a
    /// restart); it goes out in the client's λP slots.
    pub async fn send(&self, to: Contact, bytes: Vec<u8>) -> Result<MessageId, DriverError> {
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(Command::Send { to, bytes, reply })
            .await
            .map_err(|_| DriverError::Stopped)?;
        Ok(rx.await.map_err(|_| DriverError::Stopped)??)
    }

    /// The core's send records since the last call (benchmarks; see
    /// [`ClientConfig::send_records`]). Empty unless enabled.
    pub async fn take_send_records(&self) -> Result<Vec<SendRecord>, DriverError> {
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(Command::TakeSendRecords { reply })
            .await
            .map_err(|_| DriverError::Stopped)?;
        rx.await.map_err(|_| DriverError::Stopped)
    }

    /// Receive records since the last call (benchmarks; see
    /// [`DriverConfig::receive_records`]), and write records: for each core timer
    /// wake-up, its `now` (a [`SendRecord::at`](crate::SendRecord) of any real fragment
    /// it sent) and when the frames it produced had been written to the link. Empty
    /// unless enabled.
    pub async fn take_receive_records(&self) -> Result<ReceiveRecords, DriverError> {
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(Command::TakeReceiveRecords { reply })
            .await
            .map_err(|_| DriverError::Stopped)?;
        rx.await.map_err(|_| DriverError::Stopped)
    }

    /// Events from now on. A subscriber that falls more than 4096 events behind misses
    /// some (`RecvError::Lagged`); the store still has every message.
    pub fn subscribe(&self) -> broadcast::Receiver<DriverEvent> {
        self.events.subscribe()
    }

    pub fn stats(&self) -> DriverStats {
        self.stats.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Waits until a directory is in use; `false` on timeout.
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

    /// Saves the snapshot and closes the link.
    pub async fn shutdown(mut self) {
        let _ = self.commands.send(Command::Shutdown).await;
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for ClientHandle {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Starts a client in the current tokio runtime: restores the core from `store`'s
/// snapshot, binds a QUIC endpoint with `account_key` as its identity and starts
/// connecting to the gateway in the background.
pub fn spawn(
    config: DriverConfig,
    identity: Identity,
    account_key: &SigningKey,
    store: Arc<ClientStore>,
) -> Result<ClientHandle, DriverError> {
    tokio::runtime::Handle::try_current().map_err(|_| DriverError::NoRuntime)?;
    if !(0.0..1.0).contains(&config.emulated_loss) {
        return Err(DriverError::Config("emulated_loss must be in [0, 1)"));
    }
    if config.pull_interval.is_zero() || config.snapshot_interval.is_zero() {
        return Err(DriverError::Config("intervals must be positive"));
    }
    let mut rng: StdRng = rand::make_rng();
    let contact = identity.contact();
    let mut core = ClientCore::new(identity, config.client.clone(), &mut rng);
    let mut completed = Completed::default();
    if let Some(snapshot) = store.load_snapshot()? {
        for id in &snapshot.received {
            completed.insert(*id);
        }
        core.restore(snapshot)?;
    }
    core.restore_partials(store.load_partials()?, Instant::now());
    // The client dials only; nobody may connect to it.
    let endpoint = Arc::new(LinkEndpoint::bind(
        config.bind,
        account_key,
        PeerSet::new(),
    )?);
    let (commands, command_rx) = mpsc::channel(256);
    let (events, _) = broadcast::channel(4096);
    let stats = Arc::new(Mutex::new(DriverStats::default()));
    let loss_rng = StdRng::from_rng(&mut rng);
    let pulls = PullSession::new(
        PullConfig {
            interval: config.pull_interval,
            legacy_leaks: config.legacy_leaks,
        },
        Instant::now(),
    );
    let backoff = Backoff::new(config.reconnect_min, config.reconnect_max);
    let driver = Driver {
        pulls,
        backoff,
        access_removed: false,
        reported: None,
        config,
        core,
        store,
        endpoint,
        rng,
        loss_rng,
        events: events.clone(),
        stats: stats.clone(),
        counters: DriverStats::default(),
        completed,
        directory_valid_until: None,
        edge: EpochEdge::default(),
        dirty: false,
        unsaved: Vec::new(),
        unsaved_partials: Vec::new(),
        unacked: Vec::new(),
        receive_records: VecDeque::new(),
        write_records: VecDeque::new(),
    };
    let task = tokio::spawn(
        driver
            .run(command_rx)
            .instrument(tracing::info_span!("client")),
    );
    Ok(ClientHandle {
        commands,
        events,
        stats,
        contact,
        task: Some(task),
    })
}

/// A bounded set of completed message ids.
#[derive(Debug, Default)]
struct Completed {
    set: HashSet<MessageId>,
    order: VecDeque<MessageId>,
}

impl Completed {
    fn insert(&mut self, id: MessageId) {
        if self.set.insert(id) {
            self.order.push_back(id);
        }
        while self.order.len() > REMEMBER_COMPLETED {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
    }
}

/// One live link to the gateway.
struct Conn {
    link: Link,
    tx: FrameSender,
    rx: mpsc::Receiver<GatewayMsg>,
    reader: JoinHandle<()>,
    assembler: DirectoryAssembler,
    /// Item ids of the pull answer being received.
    batch: Vec<u64>,
    /// Kept only when receive records are on.
    clock: PullClock,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.reader.abort();
        self.link.close();
    }
}

struct Driver {
    config: DriverConfig,
    /// The pull schedule and the acks waiting for it.
    pulls: PullSession,
    backoff: Backoff,
    /// The gateway refused the account: no more connecting.
    access_removed: bool,
    /// The last problem reported, so a retry loop reports it once.
    reported: Option<LinkProblem>,
    core: ClientCore,
    store: Arc<ClientStore>,
    endpoint: Arc<LinkEndpoint>,
    rng: StdRng,
    loss_rng: StdRng,
    events: broadcast::Sender<DriverEvent>,
    stats: Arc<Mutex<DriverStats>>,
    counters: DriverStats,
    completed: Completed,
    directory_valid_until: Option<u64>,
    /// Holds a fetched later document until its epoch starts.
    edge: EpochEdge<Topology>,
    /// The core changed since the last saved snapshot.
    dirty: bool,
    /// Completed messages not yet durable (the store failed).
    unsaved: Vec<ReceivedMessage>,
    /// Changes to incomplete messages not yet durable, in order.
    unsaved_partials: Vec<PartialOp>,
    /// Item ids to ack once `unsaved` is durable.
    unacked: Vec<u64>,
    /// Bench-only (`DriverConfig::receive_records`); never logged.
    receive_records: VecDeque<ReceiveRecord>,
    /// Bench-only, as `receive_records`: (the core's `now` of a timer wake-up, when the
    /// frames it produced were written to the link).
    write_records: VecDeque<(Instant, Instant)>,
}

type Connecting = JoinHandle<Result<Conn, LinkError>>;

impl Driver {
    async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        let mut conn: Option<Conn> = None;
        let mut connecting: Option<Connecting> = Some(self.start_connect(Duration::ZERO));
        let mut next_snapshot = tokio::time::Instant::now() + self.config.snapshot_interval;
        // The first GetDirectory goes out with the connection; until a document is in
        // use, ask again every couple of seconds.
        let mut next_directory = tokio::time::Instant::now() + self.directory_wait();
        let far = Duration::from_secs(3600);
        loop {
            // Every failure below only drops the link; reconnection is scheduled here,
            // after the backoff policy's wait (never after the gateway refused us).
            if conn.is_none() && connecting.is_none() && !self.access_removed {
                let delay = self.backoff.next_delay(&mut self.rng);
                connecting = Some(self.start_connect(delay));
            }
            self.publish_stats(conn.is_some());
            let core_due = self
                .build_time()
                .unwrap_or_else(|| tokio::time::Instant::now() + far);
            let pull_due = tokio::time::Instant::from_std(self.pulls.poll_timeout());
            let edge_due = self.edge.poll_timeout().map(instant_at_unix);
            tokio::select! {
                cmd = commands.recv() => match cmd {
                    Some(Command::Send { to, bytes, reply }) => {
                        let result = self.queue(&mut conn, to, &bytes).await;
                        let _ = reply.send(result);
                    }
                    Some(Command::TakeSendRecords { reply }) => {
                        let _ = reply.send(self.core.take_send_records());
                    }
                    Some(Command::TakeReceiveRecords { reply }) => {
                        let _ = reply.send((
                            self.receive_records.drain(..).collect(),
                            self.write_records.drain(..).collect(),
                        ));
                    }
                    Some(Command::Shutdown) | None => break,
                },
                _ = sleep_until(core_due) => {
                    if let Err(e) = self.on_core_timer(&mut conn).await {
                        self.lost_link(&mut conn, &e);
                    }
                }
                _ = sleep_until(pull_due) => self.on_pull_tick(&mut conn).await,
                _ = sleep_until(next_snapshot) => {
                    next_snapshot += self.config.snapshot_interval;
                    if self.dirty {
                        self.save_snapshot(&mut conn).await;
                    }
                }
                _ = sleep_until_some(edge_due) => {
                    if let Some(topology) = self.edge.handle_timeout(unix_now()) {
                        self.use_directory(topology);
                    }
                }
                _ = sleep_until(next_directory) => {
                    next_directory = tokio::time::Instant::now() + self.directory_wait();
                    if let Some(c) = conn.as_mut()
                        && let Err(e) = send_msg(&mut c.tx, &ClientMsg::GetDirectory).await
                    {
                        self.lost_link(&mut conn, &e);
                    }
                }
                done = join_connect(&mut connecting), if connecting.is_some() => {
                    connecting = None;
                    match done {
                        Ok(Ok(c)) => {
                            info!("connected to gateway");
                            self.counters.connects += 1;
                            conn = Some(c);
                            self.pulls.handle_link_up();
                            self.emit(DriverEvent::Connected);
                        }
                        Ok(Err(e)) => {
                            debug!(error = %e, "cannot connect to gateway");
                            self.counters.connect_failures += 1;
                            if gateway_key_mismatch(&e) {
                                self.report(LinkProblem::GatewayKeyMismatch {
                                    gateway: self.config.gateway_addr,
                                });
                            }
                        }
                        Err(_) => self.counters.connect_failures += 1,
                    }
                }
                msg = next_inbound(&mut conn), if conn.is_some() => {
                    let result = match msg {
                        Some(m) => self.on_gateway_msg(&mut conn, m).await,
                        None => Err(LinkError::StreamClosed),
                    };
                    if let Err(e) = result {
                        self.lost_link(&mut conn, &e);
                    }
                }
            }
        }
        if let Some(t) = connecting {
            t.abort();
        }
        self.save_snapshot(&mut conn).await;
        drop(conn);
        self.endpoint.close();
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
        self.publish_stats(false);
        info!("client stopped");
    }

    /// Bench-only: when the frames of the timer wake-up at `now` were written.
    fn record_write(&mut self, now: Instant) {
        // Room for the same number of real sends as receive records, with cover between.
        if self.write_records.len() >= 16 * self.config.receive_records {
            self.write_records.pop_front();
        }
        self.write_records.push_back((now, Instant::now()));
    }

    fn emit(&self, event: DriverEvent) {
        // No subscriber is fine: the store keeps what matters.
        let _ = self.events.send(event);
    }

    fn publish_stats(&self, connected: bool) {
        let mut s = self.counters.clone();
        s.core = self.core.stats();
        s.connected = connected;
        s.acks_waiting = self.pulls.waiting_acks();
        *self.stats.lock().unwrap_or_else(|e| e.into_inner()) = s;
    }

    /// How long until the directory should be fetched again.
    fn directory_wait(&self) -> Duration {
        let refresh = self.config.directory_refresh;
        match self.directory_valid_until {
            Some(until) => {
                let left = until.saturating_sub(unix_now());
                // Shortly after the current document expires, its successor is out.
                refresh.min(Duration::from_secs(left + 1))
            }
            None => refresh.min(Duration::from_secs(2)),
        }
    }

    fn start_connect(&self, delay: Duration) -> Connecting {
        let endpoint = self.endpoint.clone();
        let addr = self.config.gateway_addr;
        let key = self.config.gateway_key;
        tokio::spawn(
            async move {
                tokio::time::sleep(delay).await;
                connect(&endpoint, addr, key).await
            }
            .in_current_span(),
        )
    }

    fn lost_link(&mut self, conn: &mut Option<Conn>, error: &LinkError) {
        self.pulls.handle_link_down();
        if conn.take().is_some() {
            info!(error = %error, "gateway link lost; reconnecting");
            self.emit(DriverEvent::Disconnected);
        }
    }

    /// When to wake for the core's next event: `build_ahead` before it falls due.
    fn build_time(&self) -> Option<tokio::time::Instant> {
        let due = self.core.poll_timeout()?;
        let at = due.checked_sub(self.config.build_ahead).unwrap_or(due);
        Some(tokio::time::Instant::from_std(at))
    }

    /// The core's next event is `build_ahead` away (or overdue): build its frames as of
    /// its due instant, wait for that instant, and write them.
    async fn on_core_timer(&mut self, conn: &mut Option<Conn>) -> Result<(), LinkError> {
        let now = Instant::now();
        let at = match self.core.poll_timeout() {
            Some(due) if due > now => due,
            _ => now,
        };
        if let Some(schedule) = self.core.topology().map(|t| *t.schedule()) {
            self.core.set_wall_epoch(schedule.epoch_at(unix_now()));
        }
        self.core.handle_timeout(at, &mut self.rng);
        wait_until_precisely(at).await;
        let flushed = self.flush(conn).await;
        if self.config.receive_records > 0 {
            self.record_write(at);
        }
        flushed
    }

    /// Awaits a store job while keeping the core's timers: a λP slot that falls due
    /// during an fsync goes out on time instead of after it (the entry gateway's delay
    /// counts from arrival, so a late slot was added to the end-to-end latency). A link
    /// lost here is dropped; the run loop reconnects.
    async fn while_storing<T>(
        &mut self,
        conn: &mut Option<Conn>,
        mut job: JoinHandle<T>,
    ) -> Result<T, tokio::task::JoinError> {
        loop {
            let due = self.build_time();
            let pull_due = tokio::time::Instant::from_std(self.pulls.poll_timeout());
            tokio::select! {
                done = &mut job => return done,
                _ = sleep_until_some(due) => {
                    if let Err(e) = self.on_core_timer(conn).await {
                        self.lost_link(conn, &e);
                    }
                }
                // A pull tick during an fsync goes out on time too: otherwise a pull
                // would leave late exactly when mail had just arrived.
                _ = sleep_until(pull_due) => self.on_pull_tick(conn).await,
            }
        }
    }

    /// The pull tick: the session's one `Pull` frame (with the acks waiting) goes out.
    async fn on_pull_tick(&mut self, conn: &mut Option<Conn>) {
        self.pulls.handle_timeout(Instant::now());
        self.flush_control(conn).await;
    }

    /// Writes the control frames the pull session has ready.
    async fn flush_control(&mut self, conn: &mut Option<Conn>) {
        while let Some(msg) = self.pulls.poll_transmit() {
            let Some(c) = conn.as_mut() else { continue };
            let is_pull = matches!(msg, ClientMsg::Pull { .. });
            if is_pull && self.config.receive_records > 0 {
                c.clock.on_pull_sent(Instant::now());
            }
            if let Err(e) = send_msg(&mut c.tx, &msg).await {
                self.lost_link(conn, &e);
                continue;
            }
            if is_pull {
                self.counters.pulls_sent += 1;
            }
        }
        self.counters.items_acked = self.pulls.stats().ids_acked;
    }

    /// Tells the user about `problem` (a warning and an event), once while it lasts.
    fn report(&mut self, problem: LinkProblem) {
        if self.reported == Some(problem) {
            return;
        }
        self.reported = Some(problem);
        warn!("{problem}");
        self.emit(DriverEvent::Problem(problem));
    }

    async fn queue(
        &mut self,
        conn: &mut Option<Conn>,
        to: Contact,
        bytes: &[u8],
    ) -> Result<MessageId, ClientError> {
        let id = self.core.send_message(&mut self.rng, to, bytes)?;
        // Durable before the caller hears "queued".
        let snapshot = self.core.snapshot();
        let store = self.store.clone();
        let job = tokio::task::spawn_blocking(move || store.save_snapshot(&snapshot));
        let saved = self
            .while_storing(conn, job)
            .await
            .map_err(|_| ClientError::Internal("store task failed"))?;
        match saved {
            Ok(()) => {
                self.counters.snapshots_saved += 1;
                self.dirty = false;
                Ok(id)
            }
            Err(e) => {
                self.counters.store_errors += 1;
                // Still queued in memory: the next snapshot may succeed.
                self.dirty = true;
                Err(e)
            }
        }
    }

    async fn save_snapshot(&mut self, conn: &mut Option<Conn>) {
        let snapshot = self.core.snapshot();
        let store = self.store.clone();
        let job = tokio::task::spawn_blocking(move || store.save_snapshot(&snapshot));
        match self.while_storing(conn, job).await {
            Ok(Ok(())) => {
                self.counters.snapshots_saved += 1;
                self.dirty = false;
            }
            Ok(Err(e)) => {
                self.counters.store_errors += 1;
                warn!(error = %e, "cannot save client snapshot");
            }
            Err(_) => self.counters.store_errors += 1,
        }
    }

    /// Writes every frame the core has ready to the link (or discards them when it is down).
    async fn flush(&mut self, conn: &mut Option<Conn>) -> Result<(), LinkError> {
        while let Some(frame) = self.core.poll_transmit() {
            let Some(c) = conn.as_mut() else {
                self.counters.frames_unsent += 1;
                continue;
            };
            if self.config.emulated_loss > 0.0
                && self.loss_rng.random_bool(self.config.emulated_loss)
            {
                self.counters.emulated_lost_out += 1;
                continue;
            }
            c.tx.send(frame.as_bytes()).await?;
            self.counters.frames_sent += 1;
        }
        Ok(())
    }

    async fn on_gateway_msg(
        &mut self,
        conn: &mut Option<Conn>,
        msg: GatewayMsg,
    ) -> Result<(), LinkError> {
        let Some(c) = conn.as_mut() else {
            return Ok(());
        };
        if self.config.receive_records > 0
            && matches!(msg, GatewayMsg::Item { .. } | GatewayMsg::Dummy)
        {
            c.clock.on_answer_frame(Instant::now());
        }
        match msg {
            GatewayMsg::Item {
                id,
                surb_id,
                payload,
            } => {
                self.counters.items_received += 1;
                if self.config.emulated_loss > 0.0
                    && self.loss_rng.random_bool(self.config.emulated_loss)
                {
                    self.counters.emulated_lost_in += 1;
                    return Ok(());
                }
                c.batch.push(id);
                self.core
                    .handle_mailbox_item(surb_id, &payload[..], Instant::now());
            }
            GatewayMsg::Dummy => self.counters.dummies_received += 1,
            GatewayMsg::PullDone { more } => {
                self.counters.pull_answers += 1;
                if more {
                    self.counters.pull_answers_more += 1;
                }
                let timing = if self.config.receive_records > 0 {
                    c.clock.on_answer_done(Instant::now())
                } else {
                    None
                };
                // A pull was answered: the session works, so the next failure backs off
                // from the start again.
                self.backoff.session_worked();
                if matches!(self.reported, Some(LinkProblem::GatewayKeyMismatch { .. })) {
                    self.reported = None;
                }
                let batch = std::mem::take(&mut c.batch);
                let ids = self.finish_batch(conn, batch, timing).await;
                // Durable now; the acks go with the next pull (legacy_leaks: at once).
                self.pulls.handle_durable(ids);
                self.flush_control(conn).await;
            }
            GatewayMsg::DirectoryChunk {
                index,
                count,
                bytes,
            } => match c.assembler.push(index, count, &bytes) {
                Ok(Some(document)) => self.install_directory(&document),
                Ok(None) => {}
                Err(e) => {
                    self.counters.directory_rejected += 1;
                    debug!(error = %e, "bad directory chunk");
                }
            },
            GatewayMsg::Error { code, message } => {
                self.counters.gateway_errors += 1;
                if code == ErrorCode::Unauthenticated {
                    // Final: retrying cannot help, and would knock on the gateway forever.
                    self.access_removed = true;
                    self.counters.access_removed = true;
                    self.report(LinkProblem::AccessRemoved);
                    return Err(LinkError::StreamClosed);
                }
                if code == ErrorCode::Unavailable {
                    // A gateway that just started has no directory yet; we ask again.
                    debug!(?message, "gateway: unavailable");
                } else {
                    // The gateway's text, escaped: a line break in it cannot forge a log line.
                    warn!(?code, ?message, "gateway refused a request");
                }
            }
            // Answers admin links only; a client never asks for one.
            GatewayMsg::AdminResult { .. } | GatewayMsg::AdminReport { .. } => {
                self.counters.gateway_errors += 1
            }
        }
        Ok(())
    }

    /// After a pull answer: makes what it carried durable (completed messages and the
    /// fragments of incomplete ones), then returns the item ids that may be acked: all of
    /// them. If the store fails, nothing is acked; what was received stays in memory and
    /// is written with the next answer.
    async fn finish_batch(
        &mut self,
        conn: &mut Option<Conn>,
        ids: Vec<u64>,
        timing: Option<AnswerTiming>,
    ) -> Vec<u64> {
        let mut acked = Vec::new();
        while let Some(event) = self.core.poll_event() {
            match event {
                Event::Message {
                    message_id, bytes, ..
                } => self.unsaved.push(ReceivedMessage {
                    message_id,
                    received_unix_ms: unix_ms(),
                    bytes,
                }),
                Event::MessageAcked { message_id } => acked.push(message_id),
            }
        }
        if !acked.is_empty() {
            self.dirty = true;
        }
        for message_id in acked {
            self.emit(DriverEvent::Acked { message_id });
        }
        self.unacked.extend(ids);
        self.unsaved_partials.extend(self.core.take_partial_ops());
        if !self.unsaved.is_empty() || !self.unsaved_partials.is_empty() {
            let snapshot = self.core.snapshot();
            let store = self.store.clone();
            let batch = self.unsaved.clone();
            let partials = self.unsaved_partials.clone();
            let job = tokio::task::spawn_blocking(move || {
                store.save_received(&batch, &partials, &snapshot)
            });
            let saved = self.while_storing(conn, job).await;
            if !matches!(saved, Ok(Ok(()))) {
                self.counters.store_errors += 1;
                warn!("cannot store received messages; their items stay unacked");
                return Vec::new();
            }
            self.counters.snapshots_saved += 1;
            self.dirty = false;
            self.unsaved_partials.clear();
            let stored = Instant::now();
            for m in std::mem::take(&mut self.unsaved) {
                self.completed.insert(m.message_id);
                if let Some((pull_sent, previous_pull_sent, answer_first, answer_done)) = timing {
                    if self.receive_records.len() >= self.config.receive_records {
                        self.receive_records.pop_front();
                    }
                    self.receive_records.push_back(ReceiveRecord {
                        message_id: m.message_id,
                        pull_sent,
                        previous_pull_sent,
                        answer_first,
                        answer_done,
                        stored,
                    });
                }
                self.emit(DriverEvent::Message {
                    message_id: m.message_id,
                    bytes: m.bytes,
                    received_unix_ms: m.received_unix_ms,
                });
            }
        }
        std::mem::take(&mut self.unacked)
    }

    fn install_directory(&mut self, document: &[u8]) {
        let checked = UncheckedDocument::parse(document)
            .and_then(|d| d.check_signatures(&self.config.authorities))
            .and_then(|d| d.check_valid_at(unix_now()));
        match checked {
            Ok(topology) => {
                let valid_until = topology.body().valid_until;
                self.directory_valid_until = self.directory_valid_until.max(Some(valid_until));
                if matches!(
                    self.reported,
                    Some(
                        LinkProblem::DirectoryNotTrusted { .. }
                            | LinkProblem::DirectoryOutOfDate { .. }
                    )
                ) {
                    self.reported = None;
                }
                let (epoch, starts) = (topology.epoch(), topology.body().epoch_start());
                if let Some(topology) = self.edge.offer(epoch, starts, topology, unix_now()) {
                    self.use_directory(topology);
                }
            }
            Err(e) => {
                self.counters.directory_rejected += 1;
                debug!(error = %e, "directory rejected");
                let gateway = self.config.gateway_addr;
                match e {
                    TopologyError::NotEnoughSignatures { .. } => {
                        self.report(LinkProblem::DirectoryNotTrusted { gateway })
                    }
                    TopologyError::NotValidAt { .. } => {
                        self.report(LinkProblem::DirectoryOutOfDate { gateway })
                    }
                    _ => {}
                }
            }
        }
    }

    /// Puts a verified document in use (at its epoch's edge; see [`EpochEdge`]).
    fn use_directory(&mut self, topology: Topology) {
        let epoch = topology.epoch();
        if topology.node(&self.config.gateway_key).is_none() {
            warn!(epoch, "our gateway is not in the directory");
        }
        self.core.set_topology(Arc::new(topology), Instant::now());
        self.counters.directory_updates += 1;
        self.counters.directory_epoch = Some(epoch);
        debug!(epoch, "directory installed");
        self.emit(DriverEvent::Directory { epoch });
    }
}

/// Dials the gateway, opens our frame stream with a `GetDirectory` (so the gateway sees
/// the stream at once) and accepts the gateway's stream.
async fn connect(
    endpoint: &LinkEndpoint,
    addr: SocketAddr,
    key: NodeKey,
) -> Result<Conn, LinkError> {
    let link = endpoint.connect(addr, key).await?;
    let mut tx = link.open_frames(FRAME_SIZE).await?;
    send_msg(&mut tx, &ClientMsg::GetDirectory).await?;
    let mut rx = tokio::time::timeout(Duration::from_secs(10), link.accept_frames(FRAME_SIZE))
        .await
        .map_err(|_| LinkError::StreamClosed)??;
    let (queue, inbound) = mpsc::channel(INBOUND_QUEUE);
    let reader = tokio::spawn(
        async move {
            loop {
                match rx.recv().await {
                    Ok(Some(bytes)) => {
                        let msg = Frame::decode(bytes)
                            .ok()
                            .filter(|f| f.kind() == FrameKind::Control)
                            .and_then(|f| GatewayMsg::from_frame(&f).ok());
                        match msg {
                            Some(m) => {
                                if queue.send(m).await.is_err() {
                                    return;
                                }
                            }
                            None => trace!("undecodable frame from gateway"),
                        }
                    }
                    Ok(None) => return,
                    Err(e) => {
                        debug!(error = %e, "gateway stream ended");
                        return;
                    }
                }
            }
        }
        .in_current_span(),
    );
    Ok(Conn {
        link,
        tx,
        rx: inbound,
        reader,
        assembler: DirectoryAssembler::new(MAX_DIRECTORY_BYTES),
        batch: Vec::new(),
        clock: PullClock::default(),
    })
}

async fn join_connect(
    connecting: &mut Option<Connecting>,
) -> Result<Result<Conn, LinkError>, tokio::task::JoinError> {
    match connecting {
        Some(task) => task.await,
        None => std::future::pending().await,
    }
}

/// Sleeps until `at`, or forever without one.
/// Sleeps until `at` to within a few microseconds: tokio's timer rounds up to the next
/// millisecond, so the last one is waited out on a spin (at most ~1 ms per stream
/// event, a few per second).
async fn wait_until_precisely(at: Instant) {
    if let Some(coarse) = at.checked_sub(Duration::from_millis(1))
        && coarse > Instant::now()
    {
        sleep_until(tokio::time::Instant::from_std(coarse)).await;
    }
    while Instant::now() < at {
        std::hint::spin_loop();
    }
}

async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn next_inbound(conn: &mut Option<Conn>) -> Option<GatewayMsg> {
    match conn {
        Some(c) => c.rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn send_msg(tx: &mut FrameSender, msg: &ClientMsg) -> Result<(), LinkError> {
    let frame = msg.to_frame().map_err(|_| LinkError::FrameSize {
        expected: FRAME_SIZE,
        got: 0,
    })?;
    tx.send(frame.as_bytes()).await
}

/// Whether a failed dial means the gateway proved another key than the pinned one: our
/// verifier refuses its raw public key, which rustls reports as the TLS alert
/// `access_denied` (49) in a local crypto error.
fn gateway_key_mismatch(e: &LinkError) -> bool {
    const ACCESS_DENIED: u8 = 49;
    matches!(
        e,
        LinkError::Handshake {
            source: quinn::ConnectionError::TransportError(t),
            ..
        } if t.code == quinn::TransportErrorCode::crypto(ACCESS_DENIED)
    )
}

/// The tokio instant at which the wall clock reads `unix` seconds.
fn instant_at_unix(unix: u64) -> tokio::time::Instant {
    let now = SystemTime::now();
    let at = UNIX_EPOCH + Duration::from_secs(unix);
    let wait = at.duration_since(now).unwrap_or(Duration::ZERO);
    tokio::time::Instant::now() + wait
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    /// Regression (issue 18, defect 6): a wrong `[gateway] node_key` used to show only
    /// as "no ack within 15 s". The dial's error must be recognised as a key mismatch.
    #[tokio::test]
    async fn a_wrong_pinned_gateway_key_is_recognised() {
        let gateway_key = SigningKey::from_bytes(&[1; 32]);
        let client_key = SigningKey::from_bytes(&[2; 32]);
        let localhost = SocketAddr::from(([127, 0, 0, 1], 0));
        let gateway = LinkEndpoint::bind(localhost, &gateway_key, PeerSet::any()).unwrap();
        let addr = gateway.local_addr().unwrap();
        let accept = tokio::spawn(async move { while let Some(_link) = gateway.accept().await {} });
        let client = LinkEndpoint::bind(localhost, &client_key, PeerSet::new()).unwrap();
        let wrong = SigningKey::from_bytes(&[3; 32]).verifying_key().to_bytes();
        let err = tokio::time::timeout(Duration::from_secs(10), client.connect(addr, wrong))
            .await
            .unwrap()
            .unwrap_err();
        assert!(gateway_key_mismatch(&err), "{err:?}");
        let right = gateway_key.verifying_key().to_bytes();
        let link = tokio::time::timeout(Duration::from_secs(10), client.connect(addr, right))
            .await
            .unwrap();
        assert!(link.is_ok());
        assert!(!gateway_key_mismatch(&LinkError::StreamClosed));
        accept.abort();
    }
}

//! The tokio driver of the [`Messenger`]: sits on a running [`ClientHandle`], feeds it
//! every received message, sends what it produces, runs its timers (commit settling,
//! TTL expiry) and keeps its state durable.
//!
//! ```text
//! ClientHandle ── DriverEvent::Message (stored in the raw inbox) ──► Messenger::handle_incoming
//! commands (with) ───────────────────────────────────────────────► Messenger
//! poll_timeout (unix ms) ─────────────────────────────────────────► Messenger::handle_timeout
//!        then: snapshot + delete consumed raw inbox entries (one transaction)
//!              → events to subscribers → Outgoing → ClientHandle::send (durable queue)
//! ```
//!
//! A received message stays in the client store's raw inbox until the transaction that
//! stores the messenger's state after processing it, so a crash in between makes it
//! processed again at start, never lost. State is saved before anything is sent (see
//! [`crate::messenger`] on why a crash may lose a send but never repeat one).

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use shoal_packet::MessageId;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::task::JoinHandle;
use tracing::{Instrument, debug, warn};

use crate::driver::{ClientHandle, DriverError, DriverEvent};
use crate::group::GroupStats;
use crate::messenger::{Messenger, MessengerEvent, MessengerStats, Outgoing, OutgoingWhat, SendId};
use crate::store::ClientStore;

type Call = Box<dyn FnOnce(&mut Messenger, u64) + Send>;

enum Command {
    Call(Call),
    Shutdown,
}

/// Messenger and group counters. Aggregates only.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct ManagedStats {
    pub messenger: MessengerStats,
    pub groups: GroupStats,
    /// Outgoing envelopes handed to the client driver.
    pub envelopes_sent: u64,
    /// Outgoing envelopes the client driver refused (queue full, store error).
    pub send_errors: u64,
    pub store_errors: u64,
}

/// An envelope handed to the client driver, or refused by it: its id matches the
/// driver's `DriverEvent::Acked`, and `send` names the user's send it belongs to, so an
/// application can show per-message delivery ([`crate::receipts::Receipts`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvelopeSent {
    pub what: OutgoingWhat,
    pub send: Option<SendId>,
    /// The driver's id for it, or why the driver refused it.
    pub result: Result<MessageId, String>,
}

/// A running managed client.
pub struct ManagedHandle {
    client: Arc<ClientHandle>,
    commands: mpsc::Sender<Command>,
    events: broadcast::Sender<MessengerEvent>,
    sent: broadcast::Sender<EnvelopeSent>,
    stats: Arc<Mutex<ManagedStats>>,
    task: TaskGuard,
}

impl std::fmt::Debug for ManagedHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ManagedHandle(..)")
    }
}

/// Wall-clock unix milliseconds: the messenger's `now`.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl ManagedHandle {
    /// Runs `f` on the messenger in its task (with the current unix ms), then saves and
    /// sends whatever it produced. Returns `f`'s result once the state is durable.
    pub async fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Messenger, u64) -> T + Send + 'static,
    ) -> Result<T, DriverError> {
        let (tx, rx) = oneshot::channel();
        let call: Call = Box::new(move |m, now| {
            let _ = tx.send(f(m, now));
        });
        self.commands
            .send(Command::Call(call))
            .await
            .map_err(|_| DriverError::Stopped)?;
        rx.await.map_err(|_| DriverError::Stopped)
    }

    /// Events from now on (after the state that caused them is durable).
    pub fn subscribe(&self) -> broadcast::Receiver<MessengerEvent> {
        self.events.subscribe()
    }

    /// Envelopes handed to the client driver from now on, in order.
    pub fn subscribe_sent(&self) -> broadcast::Receiver<EnvelopeSent> {
        self.sent.subscribe()
    }

    pub fn stats(&self) -> ManagedStats {
        *self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The underlying client (link, cover traffic, raw counters).
    pub fn client(&self) -> &ClientHandle {
        &self.client
    }

    /// Saves the messenger and stops it and the client.
    pub async fn shutdown(self) {
        let ManagedHandle {
            client,
            commands,
            mut task,
            ..
        } = self;
        let _ = commands.send(Command::Shutdown).await;
        if let Some(t) = task.0.take() {
            let _ = t.await;
        }
        // The task held the only other reference; it has ended.
        if let Ok(client) = Arc::try_unwrap(client) {
            client.shutdown().await;
        }
    }
}

/// Aborts the task if the handle is dropped without `shutdown`.
struct TaskGuard(Option<JoinHandle<()>>);

impl Drop for TaskGuard {
    fn drop(&mut self) {
        if let Some(task) = self.0.take() {
            task.abort();
        }
    }
}

/// Starts the messenger on top of `client` (which must use the same `store`). Messages
/// left in the store's raw inbox (from before a crash) are processed first.
pub fn spawn(
    client: ClientHandle,
    messenger: Messenger,
    store: Arc<ClientStore>,
) -> Result<ManagedHandle, DriverError> {
    tokio::runtime::Handle::try_current().map_err(|_| DriverError::NoRuntime)?;
    let raw = client.subscribe();
    let client = Arc::new(client);
    let (commands, command_rx) = mpsc::channel(64);
    let (events, _) = broadcast::channel(4096);
    let (sent, _) = broadcast::channel(4096);
    let stats = Arc::new(Mutex::new(ManagedStats::default()));
    let task = Task {
        client: client.clone(),
        messenger,
        store,
        events: events.clone(),
        sent: sent.clone(),
        stats: stats.clone(),
        counters: ManagedStats::default(),
        consumed: Vec::new(),
        seen: Seen::default(),
        unsaved: false,
    };
    let task = tokio::spawn(
        task.run(command_rx, raw)
            .instrument(tracing::info_span!("messenger")),
    );
    Ok(ManagedHandle {
        client,
        commands,
        events,
        sent,
        stats,
        task: TaskGuard(Some(task)),
    })
}

/// Raw message ids already given to the messenger (a rescan after a lagged event
/// stream must not process one twice).
#[derive(Default)]
struct Seen {
    set: HashSet<MessageId>,
    order: VecDeque<MessageId>,
}

impl Seen {
    fn insert(&mut self, id: MessageId) -> bool {
        if !self.set.insert(id) {
            return false;
        }
        self.order.push_back(id);
        if self.order.len() > 65536
            && let Some(old) = self.order.pop_front()
        {
            self.set.remove(&old);
        }
        true
    }
}

struct Task {
    client: Arc<ClientHandle>,
    messenger: Messenger,
    store: Arc<ClientStore>,
    events: broadcast::Sender<MessengerEvent>,
    sent: broadcast::Sender<EnvelopeSent>,
    stats: Arc<Mutex<ManagedStats>>,
    counters: ManagedStats,
    /// Raw inbox entries processed but not yet deleted.
    consumed: Vec<MessageId>,
    seen: Seen,
    /// A save failed; try again at the next flush.
    unsaved: bool,
}

impl Task {
    async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        mut raw: broadcast::Receiver<DriverEvent>,
    ) {
        self.rescan().await;
        self.flush().await;
        loop {
            let wait = self
                .messenger
                .poll_timeout()
                .map(|t| Duration::from_millis(t.saturating_sub(unix_ms())))
                .unwrap_or(Duration::from_secs(3600));
            tokio::select! {
                cmd = commands.recv() => match cmd {
                    Some(Command::Call(f)) => f(&mut self.messenger, unix_ms()),
                    Some(Command::Shutdown) | None => break,
                },
                ev = raw.recv() => match ev {
                    Ok(DriverEvent::Message { message_id, bytes, .. }) => {
                        self.take(message_id, &bytes);
                    }
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(_)) => self.rescan().await,
                    Err(broadcast::error::RecvError::Closed) => break,
                },
                _ = tokio::time::sleep(wait) => self.messenger.handle_timeout(unix_ms()),
            }
            self.flush().await;
        }
        self.messenger.take_dirty();
        self.save().await;
    }

    fn take(&mut self, id: MessageId, bytes: &[u8]) {
        if self.seen.insert(id) {
            self.messenger.handle_incoming(bytes, unix_ms());
        }
        self.consumed.push(id);
    }

    /// Processes whatever is in the raw inbox (after a restart or a lagged stream).
    async fn rescan(&mut self) {
        let store = self.store.clone();
        match tokio::task::spawn_blocking(move || store.received_messages()).await {
            Ok(Ok(messages)) => {
                for m in messages {
                    self.take(m.message_id, &m.bytes);
                }
            }
            _ => {
                self.counters.store_errors += 1;
                warn!("cannot read the raw inbox");
            }
        }
    }

    async fn save(&mut self) -> bool {
        let snapshot = match self.messenger.snapshot() {
            Ok(s) => s,
            Err(e) => {
                self.counters.store_errors += 1;
                warn!(error = %e, "cannot snapshot the messenger");
                return false;
            }
        };
        let consumed = std::mem::take(&mut self.consumed);
        let store = self.store.clone();
        let ids = consumed.clone();
        match tokio::task::spawn_blocking(move || store.save_messenger(&snapshot, &ids)).await {
            Ok(Ok(())) => {
                self.unsaved = false;
                true
            }
            _ => {
                self.counters.store_errors += 1;
                warn!("cannot save the messenger state");
                self.consumed = consumed;
                false
            }
        }
    }

    /// Saves if anything changed, then publishes events and sends what is queued.
    async fn flush(&mut self) {
        let dirty = self.messenger.take_dirty() || self.unsaved || !self.consumed.is_empty();
        if dirty && !self.save().await {
            self.unsaved = true;
            // Nothing leaves before the state that produced it is durable; retried at
            // the next flush.
            self.publish();
            return;
        }
        while let Some(e) = self.messenger.poll_event() {
            let _ = self.events.send(e);
        }
        let outgoing: Vec<Outgoing> =
            std::iter::from_fn(|| self.messenger.poll_outgoing()).collect();
        for out in outgoing {
            let (what, send) = (out.what, out.send);
            let result = match self.client.send(out.to, out.bytes).await {
                Ok(message_id) => {
                    self.counters.envelopes_sent += 1;
                    if let Some(send) = send {
                        // Saved at the next flush: receipts after a restart find it.
                        self.messenger.note_envelope(send, message_id);
                        self.unsaved = true;
                    }
                    Ok(message_id)
                }
                Err(e) => {
                    self.counters.send_errors += 1;
                    debug!(error = %e, "client refused an envelope");
                    Err(e.to_string())
                }
            };
            let _ = self.sent.send(EnvelopeSent { what, send, result });
        }
        self.publish();
    }

    fn publish(&self) {
        let mut s = self.counters;
        s.messenger = self.messenger.stats();
        s.groups = self.messenger.group_stats();
        *self.stats.lock().unwrap_or_else(|e| e.into_inner()) = s;
    }
}

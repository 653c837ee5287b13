//! The durable mailbox store on redb, with group commit by one writer thread.
//!
//! Callers submit [`WriteBatch`]es into a bounded queue. The writer takes the first
//! waiting batch, drains up to `max_batch - 1` more without waiting, applies them all
//! in one write transaction and commits it. redb's default durability fsyncs before
//! `commit` returns; only then is each submitter told (its callback gets a
//! [`Committed`]), and only that token releases SURB-acks in the mailbox core. One
//! fsync thus covers many deliveries: the group commit.
//!
//! Tables (all keys and values are fixed big-endian layouts):
//!
//! ```text
//! accounts  tag (32)                    → account key (32) | quota u32 [| subnet (32)]
//! items     tag (32) | item id u64      → surb id (16) | stored at unix ms u64 | payload (2048)
//! subnets   subnet (32)                 → last command sequence u64 | policy JSON (0 or more)
//! meta      "version" → u32, "salt" → 32 bytes, "next_id" → u64
//! ```
//! `tag` is the salted hash of a mailbox address; raw addresses are never written.
//! Reads (pull answers) use redb read transactions on the caller's thread and never
//! wait for the writer.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;

use rand::CryptoRng;
use redb::backends::InMemoryBackend;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use shoal_packet::SPHINX_PAYLOAD_SIZE;
use shoal_packet::sphinx::SurbId;
use shoal_subnet::SubnetId;
use shoal_topology::Hex32;

use crate::GatewayError;
use crate::mailbox::{
    AccountKey, CommitFailed, CommitResult, Committed, ItemId, MailboxTag, PullItem, PullPlan,
    Recovered, Salt, WriteBatch, WriteOp,
};
use shoal_packet::protocol::GatewayMsg;

const ACCOUNTS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("accounts");
const ITEMS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("items");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const SUBNETS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("subnets");

const SCHEMA_VERSION: u32 = 1;
/// An account added offline; one created by a subnet's admin has the subnet after it.
const ACCOUNT_VALUE_SIZE: usize = 32 + 4;
const ITEM_KEY_SIZE: usize = 32 + 8;
const ITEM_META_SIZE: usize = 16 + 8;
const ITEM_VALUE_SIZE: usize = ITEM_META_SIZE + SPHINX_PAYLOAD_SIZE;

/// Tunables of the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreConfig {
    /// Submitted batches applied in one transaction at most.
    pub max_batch: usize,
    /// Batches waiting for the writer at most; `submit` blocks beyond it.
    pub queue_capacity: usize,
    /// redb's page cache, in bytes. It counts in the process's RSS, so it bounds how
    /// much a gateway holding many items grows (redb's own default is 1 GiB).
    pub cache_bytes: usize,
}

/// Default [`StoreConfig::cache_bytes`]: 64 MiB.
pub const DEFAULT_CACHE_BYTES: usize = 64 << 20;

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            max_batch: 256,
            queue_capacity: 4096,
            cache_bytes: DEFAULT_CACHE_BYTES,
        }
    }
}

impl StoreConfig {
    pub fn validate(&self) -> Result<(), GatewayError> {
        if self.max_batch == 0 {
            return Err(GatewayError::Config("max_batch must be positive"));
        }
        if self.queue_capacity == 0 {
            return Err(GatewayError::Config("queue_capacity must be positive"));
        }
        Ok(())
    }
}

/// Counters of the writer, for metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Write transactions committed (fsyncs).
    pub commits: u64,
    /// Batches made durable.
    pub batches: u64,
    /// Write transactions that failed.
    pub failed_commits: u64,
    /// Pulled items missing from the store (deleted between pull and load), sent as dummies.
    pub missing_items: u64,
}

#[derive(Debug, Default)]
struct Counters {
    commits: AtomicU64,
    batches: AtomicU64,
    failed_commits: AtomicU64,
    missing_items: AtomicU64,
}

/// Called on the writer thread once a batch is durable or has failed. Keep it short
/// (send on a channel); it must not block on the store.
type Callback = Box<dyn FnOnce(CommitResult) + Send + 'static>;

struct Request {
    batch: WriteBatch,
    done: Callback,
}

/// Why [`Store::try_submit`] did not take a batch.
#[derive(Debug)]
pub enum TrySubmitError {
    /// The queue is full; the batch is handed back to retry.
    Full(WriteBatch),
    /// The writer is gone; report this to the mailbox core.
    Closed(CommitFailed),
}

/// The durable store. Dropping it finishes queued batches and stops the writer.
pub struct Store {
    db: Arc<Database>,
    tx: Option<mpsc::SyncSender<Request>>,
    writer: Option<JoinHandle<()>>,
    counters: Arc<Counters>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

fn item_key(tag: &MailboxTag, id: ItemId) -> [u8; ITEM_KEY_SIZE] {
    let mut k = [0u8; ITEM_KEY_SIZE];
    k[..32].copy_from_slice(tag.as_bytes());
    k[32..].copy_from_slice(&id.to_be_bytes());
    k
}

fn account_value(key: &AccountKey, quota: u32, subnet: Option<&SubnetId>) -> Vec<u8> {
    let mut v = Vec::with_capacity(ACCOUNT_VALUE_SIZE + 32);
    v.extend_from_slice(key);
    v.extend_from_slice(&quota.to_be_bytes());
    if let Some(s) = subnet {
        v.extend_from_slice(&s.0);
    }
    v
}

fn parse_account(v: &[u8]) -> Result<(AccountKey, u32, Option<SubnetId>), GatewayError> {
    let what = "account";
    let subnet = match v.len() {
        ACCOUNT_VALUE_SIZE => None,
        n if n == ACCOUNT_VALUE_SIZE + 32 => Some(Hex32(fixed(&v[ACCOUNT_VALUE_SIZE..], what)?)),
        _ => return Err(GatewayError::Corrupt { what }),
    };
    Ok((
        fixed(&v[..32], what)?,
        u32::from_be_bytes(fixed(&v[32..ACCOUNT_VALUE_SIZE], what)?),
        subnet,
    ))
}

fn fixed<const N: usize>(bytes: &[u8], what: &'static str) -> Result<[u8; N], GatewayError> {
    bytes.try_into().map_err(|_| GatewayError::Corrupt { what })
}

/// (surb id, stored at) from the front of an item value.
fn item_meta(v: &[u8]) -> Result<(SurbId, u64), GatewayError> {
    if v.len() != ITEM_VALUE_SIZE {
        return Err(GatewayError::Corrupt { what: "item" });
    }
    Ok((
        fixed(&v[..16], "item")?,
        u64::from_be_bytes(fixed(&v[16..24], "item")?),
    ))
}

impl Store {
    /// Opens (or creates) the store at `path` and reads back its state. `rng` draws the
    /// salt of a new store.
    pub fn open<R: CryptoRng + ?Sized>(
        path: &Path,
        config: &StoreConfig,
        rng: &mut R,
    ) -> Result<(Store, Recovered), GatewayError> {
        config.validate()?;
        create_private(path)?;
        let db = Database::builder()
            .set_cache_size(config.cache_bytes)
            .create(path)
            .map_err(|e| GatewayError::store("open", e))?;
        Self::start(db, config, rng)
    }

    /// A store in memory, for tests and harnesses. "Durable" means committed to memory.
    pub fn in_memory<R: CryptoRng + ?Sized>(
        config: &StoreConfig,
        rng: &mut R,
    ) -> Result<(Store, Recovered), GatewayError> {
        config.validate()?;
        let db = Database::builder()
            .create_with_backend(InMemoryBackend::new())
            .map_err(|e| GatewayError::store("open", e))?;
        Self::start(db, config, rng)
    }

    fn start<R: CryptoRng + ?Sized>(
        db: Database,
        config: &StoreConfig,
        rng: &mut R,
    ) -> Result<(Store, Recovered), GatewayError> {
        let recovered = init_and_load(&db, rng)?;
        let db = Arc::new(db);
        let counters = Arc::new(Counters::default());
        let (tx, rx) = mpsc::sync_channel(config.queue_capacity);
        let writer = {
            let db = Arc::clone(&db);
            let counters = Arc::clone(&counters);
            let max_batch = config.max_batch;
            let next_id = recovered.next_id;
            std::thread::Builder::new()
                .name("gateway-store".into())
                .spawn(move || run_writer(&db, &rx, max_batch, &counters, next_id))
                .map_err(|e| GatewayError::store("spawn writer", e))?
        };
        Ok((
            Store {
                db,
                tx: Some(tx),
                writer: Some(writer),
                counters,
            },
            recovered,
        ))
    }

    /// Queues `batch`; `done` runs on the writer thread once it is durable or failed.
    /// `done` must be short and must not panic (it would stop the writer): send the
    /// result on a channel. Blocks while the queue is full; async drivers use
    /// [`try_submit`](Self::try_submit) or a blocking task. On `Err` the batch was not queued and `done` will
    /// not run: hand the error to [`Mailbox::on_commit_failed`](crate::Mailbox::on_commit_failed).
    pub fn submit<F>(&self, batch: WriteBatch, done: F) -> Result<(), CommitFailed>
    where
        F: FnOnce(CommitResult) + Send + 'static,
    {
        let id = batch.id();
        let closed = || CommitFailed {
            batch: id,
            error: GatewayError::StoreClosed,
        };
        let tx = self.tx.as_ref().ok_or_else(closed)?;
        tx.send(Request {
            batch,
            done: Box::new(done),
        })
        .map_err(|_| closed())
    }

    /// Like [`submit`](Self::submit) but never blocks.
    pub fn try_submit<F>(&self, batch: WriteBatch, done: F) -> Result<(), TrySubmitError>
    where
        F: FnOnce(CommitResult) + Send + 'static,
    {
        let id = batch.id();
        let closed = || {
            TrySubmitError::Closed(CommitFailed {
                batch: id,
                error: GatewayError::StoreClosed,
            })
        };
        let Some(tx) = self.tx.as_ref() else {
            return Err(closed());
        };
        match tx.try_send(Request {
            batch,
            done: Box::new(done),
        }) {
            Ok(()) => Ok(()),
            Err(mpsc::TrySendError::Full(r)) => Err(TrySubmitError::Full(r.batch)),
            Err(mpsc::TrySendError::Disconnected(_)) => Err(closed()),
        }
    }

    /// Submits `batch` and waits until it is durable. For tests, tools and admin paths;
    /// the packet path should use [`submit`](Self::submit) so the group commit can work.
    pub fn commit(&self, batch: WriteBatch) -> CommitResult {
        let id = batch.id();
        let (tx, rx) = mpsc::sync_channel(1);
        self.submit(batch, move |r| {
            let _ = tx.send(r);
        })?;
        rx.recv().map_err(|_| CommitFailed {
            batch: id,
            error: GatewayError::StoreClosed,
        })?
    }

    /// Reads the payloads of a pull answer: `pull_batch` `Item`/`Dummy` messages and the
    /// closing `PullDone`. An item deleted since the pull is sent as a dummy.
    pub fn load(&self, plan: &PullPlan) -> Result<Vec<GatewayMsg>, GatewayError> {
        let txn = self
            .db
            .begin_read()
            .map_err(|e| GatewayError::store("begin read", e))?;
        let items = txn
            .open_table(ITEMS)
            .map_err(|e| GatewayError::store("open items", e))?;
        let mut out = Vec::with_capacity(plan.items().len() + 1);
        for entry in plan.items() {
            let msg = match entry {
                PullItem::Dummy => GatewayMsg::Dummy,
                PullItem::Real { id, .. } => {
                    let key = item_key(plan.tag(), *id);
                    match items
                        .get(key.as_slice())
                        .map_err(|e| GatewayError::store("read item", e))?
                    {
                        Some(v) => {
                            let v = v.value();
                            let (surb_id, _) = item_meta(v)?;
                            GatewayMsg::Item {
                                id: *id,
                                surb_id,
                                payload: Box::new(fixed(&v[ITEM_META_SIZE..], "item")?),
                            }
                        }
                        None => {
                            self.counters.missing_items.fetch_add(1, Ordering::Relaxed);
                            GatewayMsg::Dummy
                        }
                    }
                }
            };
            out.push(msg);
        }
        out.push(GatewayMsg::PullDone { more: plan.more() });
        Ok(out)
    }

    pub fn stats(&self) -> StoreStats {
        StoreStats {
            commits: self.counters.commits.load(Ordering::Relaxed),
            batches: self.counters.batches.load(Ordering::Relaxed),
            failed_commits: self.counters.failed_commits.load(Ordering::Relaxed),
            missing_items: self.counters.missing_items.load(Ordering::Relaxed),
        }
    }

    /// Finishes queued batches and stops the writer.
    pub fn close(mut self) -> Result<(), GatewayError> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<(), GatewayError> {
        drop(self.tx.take());
        match self.writer.take() {
            Some(h) => h
                .join()
                .map_err(|_| GatewayError::Internal("store writer panicked")),
            None => Ok(()),
        }
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        if self.shutdown().is_err() {
            tracing::error!("store writer panicked");
        }
    }
}

/// Creates an empty store file readable by the owner only, unless one exists: it holds
/// every mailbox's items.
fn create_private(path: &Path) -> Result<(), GatewayError> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    match opts.open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(GatewayError::store("create", e)),
    }
}

/// Creates the tables of a new store (drawing its salt) and reads back an existing one.
fn init_and_load<R: CryptoRng + ?Sized>(
    db: &Database,
    rng: &mut R,
) -> Result<Recovered, GatewayError> {
    let txn = db
        .begin_write()
        .map_err(|e| GatewayError::store("begin write", e))?;
    let recovered = {
        let mut meta = txn
            .open_table(META)
            .map_err(|e| GatewayError::store("open meta", e))?;
        let version = meta
            .get("version")
            .map_err(|e| GatewayError::store("read meta", e))?
            .map(|v| fixed::<4>(v.value(), "version").map(u32::from_be_bytes))
            .transpose()?;
        match version {
            None => {
                meta.insert("version", SCHEMA_VERSION.to_be_bytes().as_slice())
                    .map_err(|e| GatewayError::store("write meta", e))?;
            }
            Some(SCHEMA_VERSION) => {}
            Some(_) => {
                return Err(GatewayError::Corrupt {
                    what: "schema version",
                });
            }
        }
        let stored_salt = meta
            .get("salt")
            .map_err(|e| GatewayError::store("read meta", e))?
            .map(|v| fixed::<32>(v.value(), "salt"))
            .transpose()?;
        let salt = match stored_salt {
            Some(s) => Salt::from_bytes(s),
            None => {
                let s = Salt::random(rng);
                meta.insert("salt", s.as_bytes().as_slice())
                    .map_err(|e| GatewayError::store("write meta", e))?;
                s
            }
        };
        let next_id = meta
            .get("next_id")
            .map_err(|e| GatewayError::store("read meta", e))?
            .map(|v| fixed::<8>(v.value(), "next_id").map(u64::from_be_bytes))
            .transpose()?
            .unwrap_or(1);

        let accounts_table = txn
            .open_table(ACCOUNTS)
            .map_err(|e| GatewayError::store("open accounts", e))?;
        let mut accounts = Vec::new();
        for entry in accounts_table
            .iter()
            .map_err(|e| GatewayError::store("read accounts", e))?
        {
            let (k, v) = entry.map_err(|e| GatewayError::store("read accounts", e))?;
            let tag = MailboxTag::from_bytes(fixed(k.value(), "account")?);
            let (key, quota, subnet) = parse_account(v.value())?;
            accounts.push((tag, key, quota, subnet));
        }

        let subnets_table = txn
            .open_table(SUBNETS)
            .map_err(|e| GatewayError::store("open subnets", e))?;
        let mut subnets = Vec::new();
        for entry in subnets_table
            .iter()
            .map_err(|e| GatewayError::store("read subnets", e))?
        {
            let (k, v) = entry.map_err(|e| GatewayError::store("read subnets", e))?;
            let subnet = Hex32(fixed(k.value(), "subnet")?);
            let v = v.value();
            let last = u64::from_be_bytes(fixed(v.get(..8).unwrap_or_default(), "subnet")?);
            let policy = (v.len() > 8).then(|| v[8..].to_vec());
            subnets.push((subnet, last, policy));
        }

        let items_table = txn
            .open_table(ITEMS)
            .map_err(|e| GatewayError::store("open items", e))?;
        let mut items = Vec::new();
        for entry in items_table
            .iter()
            .map_err(|e| GatewayError::store("read items", e))?
        {
            let (k, v) = entry.map_err(|e| GatewayError::store("read items", e))?;
            let k: [u8; ITEM_KEY_SIZE] = fixed(k.value(), "item key")?;
            let tag = MailboxTag::from_bytes(fixed(&k[..32], "item key")?);
            let id = u64::from_be_bytes(fixed(&k[32..], "item key")?);
            let (surb_id, stored_at) = item_meta(v.value())?;
            items.push((tag, id, surb_id, stored_at));
        }
        Recovered {
            salt,
            next_id,
            accounts,
            subnets,
            items,
        }
    };
    txn.commit().map_err(|e| GatewayError::store("commit", e))?;
    Ok(recovered)
}

fn run_writer(
    db: &Database,
    rx: &mpsc::Receiver<Request>,
    max_batch: usize,
    counters: &Counters,
    mut next_id: u64,
) {
    let mut requests = Vec::with_capacity(max_batch);
    while let Ok(first) = rx.recv() {
        requests.push(first);
        while requests.len() < max_batch {
            match rx.try_recv() {
                Ok(r) => requests.push(r),
                Err(_) => break,
            }
        }
        let result = apply(db, &requests, &mut next_id);
        match &result {
            Ok(()) => {
                counters.commits.fetch_add(1, Ordering::Relaxed);
                counters
                    .batches
                    .fetch_add(requests.len() as u64, Ordering::Relaxed);
            }
            Err(e) => {
                counters.failed_commits.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, batches = requests.len(), "mailbox store commit failed");
            }
        }
        for Request { batch, done } in requests.drain(..) {
            let id = batch.id();
            drop(batch);
            done(match &result {
                Ok(()) => Ok(Committed::new(id)),
                Err(e) => Err(CommitFailed {
                    batch: id,
                    error: e.clone(),
                }),
            });
        }
    }
}

/// Applies `requests` in order in one write transaction and commits it durably.
fn apply(db: &Database, requests: &[Request], next_id: &mut u64) -> Result<(), GatewayError> {
    let txn = db
        .begin_write()
        .map_err(|e| GatewayError::store("begin write", e))?;
    let mut new_next = *next_id;
    {
        let mut accounts = txn
            .open_table(ACCOUNTS)
            .map_err(|e| GatewayError::store("open accounts", e))?;
        let mut items = txn
            .open_table(ITEMS)
            .map_err(|e| GatewayError::store("open items", e))?;
        let mut subnets = txn
            .open_table(SUBNETS)
            .map_err(|e| GatewayError::store("open subnets", e))?;
        let mut value = vec![0u8; ITEM_VALUE_SIZE];
        for op in requests.iter().flat_map(|r| r.batch.ops()) {
            match op {
                WriteOp::PutAccount {
                    tag,
                    key,
                    quota,
                    subnet,
                } => {
                    accounts
                        .insert(
                            tag.as_bytes().as_slice(),
                            account_value(key, *quota, subnet.as_ref()).as_slice(),
                        )
                        .map_err(|e| GatewayError::store("write account", e))?;
                }
                WriteOp::PutSubnet {
                    subnet,
                    last_sequence,
                    policy,
                } => {
                    let mut v = last_sequence.to_be_bytes().to_vec();
                    v.extend_from_slice(policy.as_deref().unwrap_or_default());
                    subnets
                        .insert(subnet.0.as_slice(), v.as_slice())
                        .map_err(|e| GatewayError::store("write subnet", e))?;
                }
                WriteOp::DeleteAccount { tag } => {
                    accounts
                        .remove(tag.as_bytes().as_slice())
                        .map_err(|e| GatewayError::store("delete account", e))?;
                    let lo = item_key(tag, 0);
                    let hi = item_key(tag, u64::MAX);
                    items
                        .retain_in(lo.as_slice()..=hi.as_slice(), |_, _| false)
                        .map_err(|e| GatewayError::store("delete account items", e))?;
                }
                WriteOp::InsertItem {
                    tag,
                    id,
                    surb_id,
                    stored_at_ms,
                    payload,
                } => {
                    value[..16].copy_from_slice(surb_id);
                    value[16..24].copy_from_slice(&stored_at_ms.to_be_bytes());
                    value[ITEM_META_SIZE..].copy_from_slice(&payload[..]);
                    items
                        .insert(item_key(tag, *id).as_slice(), value.as_slice())
                        .map_err(|e| GatewayError::store("write item", e))?;
                    new_next = new_next.max(id.saturating_add(1));
                }
                WriteOp::DeleteItem { tag, id } => {
                    items
                        .remove(item_key(tag, *id).as_slice())
                        .map_err(|e| GatewayError::store("delete item", e))?;
                }
            }
        }
        if new_next != *next_id {
            let mut meta = txn
                .open_table(META)
                .map_err(|e| GatewayError::store("open meta", e))?;
            meta.insert("next_id", new_next.to_be_bytes().as_slice())
                .map_err(|e| GatewayError::store("write meta", e))?;
        }
    }
    txn.commit().map_err(|e| GatewayError::store("commit", e))?;
    *next_id = new_next;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mailbox::tests::{ALICE, ALICE_BOX, BOB, BOB_BOX, Net, t};
    use crate::mailbox::{DeliverOutcome, Mailbox, MailboxConfig};
    use rand::SeedableRng;
    use rand::rngs::StdRng;
    use std::time::{Duration, Instant};

    fn cfg() -> MailboxConfig {
        MailboxConfig {
            pull_batch: 4,
            redelivery_timeout: Duration::from_secs(10),
            ttl: Duration::from_secs(100),
        }
    }

    fn open(path: &Path) -> (Store, Mailbox) {
        let (store, rec) =
            Store::open(path, &StoreConfig::default(), &mut StdRng::seed_from_u64(1)).unwrap();
        (store, Mailbox::restore(cfg(), rec).unwrap())
    }

    fn flush(store: &Store, m: &mut Mailbox) -> usize {
        let mut acks = 0;
        while let Some(b) = m.poll_write() {
            acks += m.on_commit(store.commit(b)).len();
        }
        acks
    }

    fn payload(b: u8) -> [u8; SPHINX_PAYLOAD_SIZE] {
        [b; SPHINX_PAYLOAD_SIZE]
    }

    fn real_ids(msgs: &[GatewayMsg]) -> Vec<(u64, u8)> {
        msgs.iter()
            .filter_map(|m| match m {
                GatewayMsg::Item { id, payload, .. } => Some((*id, payload[0])),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn roundtrip_through_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mail.redb");
        let ids = {
            let (store, mut m) = open(&path);
            m.create_account(&ALICE_BOX, ALICE, 10).unwrap();
            m.create_account(&BOB_BOX, BOB, 1).unwrap();
            for b in 0..3 {
                m.deliver(&ALICE_BOX, [b; 16], &payload(b), t(0));
            }
            flush(&store, &mut m);
            let msgs = store.load(&m.pull(&ALICE, t(1)).unwrap()).unwrap();
            assert_eq!(msgs.len(), 5, "pull_batch items and PullDone");
            assert_eq!(msgs[4], GatewayMsg::PullDone { more: false });
            let ids = real_ids(&msgs);
            assert_eq!(
                ids.iter().map(|(_, b)| *b).collect::<Vec<_>>(),
                vec![0, 1, 2]
            );
            m.ack(&ALICE, &[ids[0].0]).unwrap();
            m.set_quota(&BOB, 7).unwrap();
            flush(&store, &mut m);
            store.close().unwrap();
            ids
        };
        let (store, mut m) = open(&path);
        assert!(m.is_account(&ALICE) && m.is_account(&BOB));
        assert_eq!(m.item_count(&ALICE), Some(2));
        let msgs = store.load(&m.pull(&ALICE, t(2)).unwrap()).unwrap();
        assert_eq!(real_ids(&msgs), ids[1..].to_vec());
        // The salt survived: the same address still finds the same mailbox.
        let DeliverOutcome::Accepted { id, .. } = m.deliver(&ALICE_BOX, [9; 16], &payload(9), t(3))
        else {
            panic!("not accepted")
        };
        assert!(id > ids[2].0, "ids are never reused");
        for _ in 0..6 {
            m.deliver(&BOB_BOX, [9; 16], &payload(9), t(3));
        }
        assert_eq!(m.stats().refused_quota, 0, "quota change was durable");
        m.delete_account(&BOB).unwrap();
        flush(&store, &mut m);
        drop(store);
        let (_store, m) = open(&path);
        assert!(!m.is_account(&BOB));
        assert_eq!(m.total_items(), 3);
    }

    /// Writes, commits, acks, then dies without any shutdown; the parent reopens.
    #[test]
    fn kill_safety() {
        const CHILD: &str = "SHOAL_GATEWAY_KILL_CHILD";
        if let Ok(path) = std::env::var(CHILD) {
            let path = std::path::PathBuf::from(path);
            let (store, mut m) = open(&path);
            m.create_account(&ALICE_BOX, ALICE, 100).unwrap();
            for b in 1..=5 {
                m.deliver(&ALICE_BOX, [b; 16], &payload(b), t(0));
            }
            flush(&store, &mut m);
            // Item 1 acked and its delete committed; item 2 acked but never submitted.
            m.ack(&ALICE, &[1]).unwrap();
            flush(&store, &mut m);
            m.ack(&ALICE, &[2]).unwrap();
            // Batches still queued or mid-commit when the process dies may or may not land.
            for b in 6..=50 {
                m.deliver(&ALICE_BOX, [b; 16], &payload(b), t(0));
                let batch = m.poll_write().unwrap();
                store.submit(batch, |_| {}).unwrap();
            }
            std::process::abort();
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mail.redb");
        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "store::tests::kill_safety",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD, &path)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::process::ExitStatusExt;
            assert_eq!(
                status.signal(),
                Some(6),
                "the child must reach its abort: {status:?}"
            );
        }
        assert!(!status.success(), "the child must die uncleanly");
        let (store, mut m) = open(&path);
        assert!(m.is_account(&ALICE));
        let mut seen = Vec::new();
        loop {
            let plan = m.pull(&ALICE, t(1)).unwrap();
            let msgs = store.load(&plan).unwrap();
            seen.extend(real_ids(&msgs));
            if !plan.more() {
                break;
            }
        }
        let ids: Vec<u64> = seen.iter().map(|(id, _)| *id).collect();
        assert!(!ids.contains(&1), "committed ack deleted the item");
        assert!(ids.contains(&2) && ids.contains(&3) && ids.contains(&4) && ids.contains(&5));
        for (id, b) in &seen {
            assert_eq!(*id, u64::from(*b), "payload matches its item");
        }
        // Whatever prefix of the unwaited batches landed, later ids never collide with it.
        let max = ids.iter().max().copied().unwrap();
        let DeliverOutcome::Accepted { id, .. } = m.deliver(&ALICE_BOX, [0; 16], &payload(0), t(2))
        else {
            panic!("not accepted")
        };
        assert!(id > max);
    }

    #[test]
    fn ack_is_released_only_after_the_commit_is_visible() {
        let (store, rec) =
            Store::in_memory(&StoreConfig::default(), &mut StdRng::seed_from_u64(2)).unwrap();
        let mut m = Mailbox::restore(cfg(), rec).unwrap();
        m.create_account(&ALICE_BOX, ALICE, 10).unwrap();
        m.create_account(&BOB_BOX, BOB, 10).unwrap();
        flush(&store, &mut m);
        let mut net = Net::new(5);
        let (surb_id, pl, block) = net.forward_with_ack(&ALICE_BOX, &BOB_BOX, [0x77; 16]);
        let DeliverOutcome::Accepted { id, ack: true } = m.deliver(&ALICE_BOX, surb_id, &pl, t(0))
        else {
            panic!("no ack slot")
        };
        let batch = m.poll_write().unwrap();
        // The callback runs on the writer thread after commit returned: the item must
        // already be readable by an independent read transaction at that point.
        let db = Arc::clone(&store.db);
        let tag = MailboxTag::derive(&m_salt(&m), &ALICE_BOX);
        let (tx, rx) = mpsc::channel();
        store
            .submit(batch, move |r| {
                let visible = db
                    .begin_read()
                    .unwrap()
                    .open_table(ITEMS)
                    .unwrap()
                    .get(item_key(&tag, id).as_slice())
                    .unwrap()
                    .is_some();
                tx.send((r, visible)).unwrap();
            })
            .unwrap();
        let (result, visible) = rx.recv().unwrap();
        assert!(visible, "notified before the item was committed");
        let acks = m.on_commit(result);
        assert_eq!(acks.len(), 1);
        assert_eq!(
            net.read_ack(acks.into_iter().next().unwrap(), &block),
            [0x77; 16]
        );
    }

    fn m_salt(m: &Mailbox) -> Salt {
        m.salt_for_tests()
    }

    #[test]
    fn closed_store_reports_failure() {
        let (mut store, rec) =
            Store::in_memory(&StoreConfig::default(), &mut StdRng::seed_from_u64(3)).unwrap();
        let mut m = Mailbox::restore(cfg(), rec).unwrap();
        m.create_account(&ALICE_BOX, ALICE, 10).unwrap();
        store.shutdown().unwrap();
        let b = m.poll_write().unwrap();
        let err = store.submit(b, |_| {}).unwrap_err();
        assert_eq!(err.error, GatewayError::StoreClosed);
        m.on_commit_failed(&err);
        assert_eq!(m.stats().commit_failures, 1);
    }

    #[test]
    fn missing_item_is_sent_as_dummy() {
        let (store, rec) =
            Store::in_memory(&StoreConfig::default(), &mut StdRng::seed_from_u64(4)).unwrap();
        let mut m = Mailbox::restore(cfg(), rec).unwrap();
        m.create_account(&ALICE_BOX, ALICE, 10).unwrap();
        m.deliver(&ALICE_BOX, [1; 16], &payload(1), t(0));
        flush(&store, &mut m);
        let plan = m.pull(&ALICE, t(1)).unwrap();
        m.delete_account(&ALICE).unwrap();
        flush(&store, &mut m);
        let msgs = store.load(&plan).unwrap();
        assert_eq!(msgs.len(), 5);
        assert!(msgs[..4].iter().all(|m| *m == GatewayMsg::Dummy));
        assert_eq!(store.stats().missing_items, 1);
    }

    /// Not asserted: prints durable commits/s one at a time against group commit.
    #[test]
    fn commit_rate_single_vs_batched() {
        let dir = tempfile::tempdir().unwrap();
        let (store, mut m) = open(&dir.path().join("rate.redb"));
        m.create_account(&ALICE_BOX, ALICE, u32::MAX).unwrap();
        flush(&store, &mut m);
        let (single, batched) = measure(&store, &mut m, 50, 1000);
        println!("redb durable deliveries/s: one at a time {single:.0}, group commit {batched:.0}");
        println!("store stats: {:?}", store.stats());
    }

    /// Deliveries per second made durable with a wait per delivery, then with all
    /// submitted at once (the writer groups them).
    fn measure(store: &Store, m: &mut Mailbox, single: usize, batched: usize) -> (f64, f64) {
        let start = Instant::now();
        for _ in 0..single {
            m.deliver(&ALICE_BOX, [0; 16], &payload(0), t(0));
            flush(store, m);
        }
        let single_rate = single as f64 / start.elapsed().as_secs_f64();
        let start = Instant::now();
        let (tx, rx) = mpsc::channel();
        for _ in 0..batched {
            m.deliver(&ALICE_BOX, [0; 16], &payload(0), t(0));
            let b = m.poll_write().unwrap();
            let tx = tx.clone();
            store.submit(b, move |r| tx.send(r).unwrap()).unwrap();
        }
        for _ in 0..batched {
            m.on_commit(rx.recv().unwrap());
        }
        (single_rate, batched as f64 / start.elapsed().as_secs_f64())
    }
}

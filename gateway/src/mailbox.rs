//! The sans-IO mailbox core: accounts, stored items, pulls, acks, expiry.
//!
//! [`Mailbox`] is a state machine. It reads no clock (every call that needs time takes
//! `now`), touches no disk and opens no socket. What must become durable leaves it as
//! a [`WriteBatch`] (`poll_write`); the store commits the batch and hands back a
//! [`Committed`] token, and only [`Mailbox::on_committed`] turns a token into the
//! SURB-acks of the items it covered. [`AckToSend`] has no public constructor and
//! `Committed` is only made by the store after its fsync'd commit returned, so an ack
//! for an item that is not durable cannot be written down.
//!
//! The core keeps only metadata in memory (ids, SURB ids, times); payloads go
//! straight into the write batch and are read back from the store when pulled.
//! Mailbox addresses are never kept raw: each is hashed with the gateway's secret salt
//! into a [`MailboxTag`].

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::CryptoRng;
use sha2::{Digest, Sha256};
use shoal_packet::SPHINX_PAYLOAD_SIZE;
use shoal_packet::payload::{ACK_MESSAGE_SIZE, split_plaintext};
use shoal_packet::sphinx::{self, ForwardPacket, MailboxAddress, SURB_SIZE, SurbId};
pub use shoal_packet::sphinx::{ADMIN_MAILBOX, DROP_MAILBOX};
use shoal_subnet::{
    AccountAction, AccountUsage, CommandGuard, Policy, SubnetError, SubnetId, UsageReport,
};
use shoal_topology::Hex32;

use crate::GatewayError;
use crate::remote_admin::{CheckedAdmin, Refusal};
use shoal_packet::protocol::AdminRefusal;

/// A client's account key: the Ed25519 key its QUIC link authenticates with.
pub type AccountKey = [u8; 32];
/// Identifier of one stored item, unique for the lifetime of the gateway's store.
pub type ItemId = u64;

/// Items a pull answer carries when not configured otherwise.
pub const DEFAULT_PULL_BATCH: usize = 16;
/// Largest allowed `pull_batch`.
pub const MAX_PULL_BATCH: usize = 1024;

const TAG_DOMAIN: &[u8] = b"shoal-gateway mailbox tag v1";

/// The gateway's secret salt for hashing mailbox addresses.
///
/// Generated once when the store is created and kept in it; without it the stored
/// tags cannot be linked to mailbox addresses. Wiped on drop.
#[derive(Clone, PartialEq, Eq, zeroize::Zeroize, zeroize::ZeroizeOnDrop)]
pub struct Salt([u8; 32]);

impl Salt {
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Salt(bytes)
    }

    pub fn random<R: CryptoRng + ?Sized>(rng: &mut R) -> Self {
        let mut b = [0u8; 32];
        rng.fill_bytes(&mut b);
        Salt(b)
    }

    pub(crate) fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl std::fmt::Debug for Salt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Salt(..)")
    }
}

/// A mailbox address hashed with the gateway's salt: what the store and the index key on.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MailboxTag([u8; 32]);

impl MailboxTag {
    /// SHA-256 over a domain label, the salt and the address. Both inputs have fixed
    /// lengths, so there is no ambiguity to exploit.
    pub fn derive(salt: &Salt, address: &MailboxAddress) -> Self {
        let mut h = Sha256::new();
        h.update(TAG_DOMAIN);
        h.update(salt.as_bytes());
        h.update(address);
        MailboxTag(h.finalize().into())
    }

    pub(crate) fn from_bytes(bytes: [u8; 32]) -> Self {
        MailboxTag(bytes)
    }

    pub(crate) fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl std::fmt::Debug for MailboxTag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MailboxTag(..)")
    }
}

/// Tunables of the mailbox core.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MailboxConfig {
    /// Items in every pull answer, real ones padded with dummies.
    pub pull_batch: usize,
    /// An offered item not acked after this long is offered again.
    pub redelivery_timeout: Duration,
    /// Items older than this are deleted by [`Mailbox::expire`].
    pub ttl: Duration,
}

impl Default for MailboxConfig {
    fn default() -> Self {
        MailboxConfig {
            pull_batch: DEFAULT_PULL_BATCH,
            redelivery_timeout: Duration::from_secs(30),
            ttl: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

impl MailboxConfig {
    pub fn validate(&self) -> Result<(), GatewayError> {
        if self.pull_batch == 0 || self.pull_batch > MAX_PULL_BATCH {
            return Err(GatewayError::Config("pull_batch must be 1..=1024"));
        }
        if self.ttl.is_zero() {
            return Err(GatewayError::Config("ttl must be positive"));
        }
        Ok(())
    }
}

/// What happened to a packet that ended at this gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliverOutcome {
    /// Queued for a durable write as item `id`. If `ack` is true its SURB-ack is released
    /// by [`Mailbox::on_committed`] once the write is durable.
    Accepted { id: ItemId, ack: bool },
    /// For the cover/drop mailbox ([`DROP_MAILBOX`]): nothing is stored. If `ack` is true
    /// (λP cover carries a usable SURB-ack) the ack rides in the current write batch and is
    /// released by [`Mailbox::on_committed`] exactly as a real item's, so the acks a
    /// gateway sends count a sender's λP slots, not its real messages.
    Cover { ack: bool },
    /// For the admin endpoint ([`ADMIN_MAILBOX`]): nothing is stored; the driver hands
    /// the payload to [`crate::admin_inbox::AdminInbox`]. Its ack rides the current write
    /// batch like λP cover's, so a command's packets are acked exactly like any other.
    Admin { ack: bool },
    /// No account has this mailbox: discarded.
    UnknownMailbox,
    /// The mailbox is at its quota: refused, no ack, so the sender retries later.
    QuotaFull,
    /// The payload is not a Sphinx payload.
    Malformed,
}

/// A SURB-ack whose item is durable: turn it into a packet and send it.
///
/// Only [`Mailbox::on_committed`] makes these.
pub struct AckToSend {
    surb: Box<[u8; SURB_SIZE]>,
    message: [u8; ACK_MESSAGE_SIZE],
}

impl std::fmt::Debug for AckToSend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AckToSend(..)")
    }
}

impl AckToSend {
    /// Builds the ack packet with the SURB (symmetric work only).
    ///
    /// The driver checks `first_hop` against the directory and discards the ack when it
    /// names no node: cover traffic fills its ack slot with random bytes.
    pub fn into_packet(self) -> Result<ForwardPacket, GatewayError> {
        sphinx::use_surb(&self.surb[..], &self.message).map_err(GatewayError::Ack)
    }

    /// The key-epoch label the SURB's creator built it with, to frame the ack.
    pub fn key_epoch_label(&self) -> u16 {
        shoal_packet::payload::ack_key_epoch_label(&self.message)
    }
}

/// One entry of a pull answer.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum PullItem {
    /// A stored item; the store supplies its payload.
    Real { id: ItemId, surb_id: SurbId },
    /// Padding.
    Dummy,
}

impl std::fmt::Debug for PullItem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PullItem::Real { .. } => f.write_str("Real(..)"),
            PullItem::Dummy => f.write_str("Dummy"),
        }
    }
}

/// The answer to one pull: always exactly `pull_batch` items, real ones first.
#[derive(Clone, PartialEq, Eq)]
pub struct PullPlan {
    tag: MailboxTag,
    items: Vec<PullItem>,
    more: bool,
}

impl std::fmt::Debug for PullPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PullPlan")
            .field("len", &self.items.len())
            .finish_non_exhaustive()
    }
}

impl PullPlan {
    pub fn items(&self) -> &[PullItem] {
        &self.items
    }

    /// Whether further items were waiting beyond this batch. One bit, never a count.
    pub fn more(&self) -> bool {
        self.more
    }

    pub fn real_items(&self) -> usize {
        self.items
            .iter()
            .filter(|i| matches!(i, PullItem::Real { .. }))
            .count()
    }

    pub(crate) fn tag(&self) -> &MailboxTag {
        &self.tag
    }
}

/// Identifies one write batch of one mailbox core.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BatchId(u64);

/// One change to durable state. Built only by the mailbox core.
pub(crate) enum WriteOp {
    PutAccount {
        tag: MailboxTag,
        key: AccountKey,
        quota: u32,
        /// The subnet whose admin created it; `None` for accounts added offline.
        subnet: Option<SubnetId>,
    },
    /// A hosted subnet's last accepted command sequence and what it enforces of the
    /// newest policy ([`HostedPolicy`]'s encoding: never roles, rules or federation).
    PutSubnet {
        subnet: SubnetId,
        last_sequence: u64,
        policy: Option<Vec<u8>>,
    },
    /// Deletes the account and every item of its mailbox.
    DeleteAccount {
        tag: MailboxTag,
    },
    InsertItem {
        tag: MailboxTag,
        id: ItemId,
        surb_id: SurbId,
        stored_at_ms: u64,
        payload: Box<[u8; SPHINX_PAYLOAD_SIZE]>,
    },
    DeleteItem {
        tag: MailboxTag,
        id: ItemId,
    },
}

/// Changes to make durable together, in order. Hand it to the store.
pub struct WriteBatch {
    id: BatchId,
    ops: Vec<WriteOp>,
}

impl std::fmt::Debug for WriteBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteBatch")
            .field("id", &self.id)
            .field("ops", &self.ops.len())
            .finish()
    }
}

impl WriteBatch {
    pub fn id(&self) -> BatchId {
        self.id
    }

    pub fn len(&self) -> usize {
        self.ops.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    pub(crate) fn ops(&self) -> &[WriteOp] {
        &self.ops
    }
}

/// Proof that a batch is durable. Made by the store after its commit returned.
#[derive(Debug, PartialEq, Eq)]
pub struct Committed {
    batch: BatchId,
}

impl Committed {
    pub(crate) fn new(batch: BatchId) -> Self {
        Committed { batch }
    }

    /// For harnesses that model the store themselves (the simulator): declares `batch`
    /// durable without writing it anywhere.
    pub fn dangerously_assume_durable(batch: &WriteBatch) -> Self {
        Committed { batch: batch.id }
    }

    pub fn batch(&self) -> BatchId {
        self.batch
    }
}

/// A batch that did not become durable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitFailed {
    pub batch: BatchId,
    pub error: GatewayError,
}

/// What the store reports for each submitted batch.
pub type CommitResult = Result<Committed, CommitFailed>;

/// State read back from the store on open; feed it to [`Mailbox::restore`].
pub struct Recovered {
    pub(crate) salt: Salt,
    pub(crate) next_id: ItemId,
    pub(crate) accounts: Vec<(MailboxTag, AccountKey, u32, Option<SubnetId>)>,
    /// (subnet, last accepted sequence, newest policy's JSON text)
    pub(crate) subnets: Vec<(SubnetId, u64, Option<Vec<u8>>)>,
    /// (mailbox, id, surb id, stored at in unix ms)
    pub(crate) items: Vec<(MailboxTag, ItemId, SurbId, u64)>,
}

impl std::fmt::Debug for Recovered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recovered")
            .field("accounts", &self.accounts.len())
            .field("items", &self.items.len())
            .finish_non_exhaustive()
    }
}

impl Recovered {
    pub fn accounts(&self) -> usize {
        self.accounts.len()
    }

    pub fn items(&self) -> usize {
        self.items.len()
    }
}

/// Counters a driver exports as metrics. Aggregates only, never per-mailbox.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MailboxStats {
    /// Deliveries queued for a durable write.
    pub accepted: u64,
    /// Deliveries to no known mailbox.
    pub dropped_unknown: u64,
    /// Deliveries to the cover/drop mailbox (λP cover and λD drops; never stored).
    pub cover: u64,
    /// Of those, with an ack slot (λP cover): their acks ride the write batches.
    pub cover_acks: u64,
    /// Deliveries refused because the mailbox was at its quota.
    pub refused_quota: u64,
    /// Deliveries whose payload was not a Sphinx payload.
    pub malformed: u64,
    /// Accepted items without a readable ack slot (SURB replies, i.e. acks for our clients).
    pub without_ack_slot: u64,
    /// SURB-acks released after their item became durable.
    pub acks_released: u64,
    /// SURB-acks dropped because their write failed.
    pub acks_withheld: u64,
    /// Batches the store failed to commit.
    pub commit_failures: u64,
    pub pulls: u64,
    /// Real items offered in pulls (including re-offers).
    pub items_offered: u64,
    pub dummies_offered: u64,
    /// Items deleted because their client acked them.
    pub items_acked: u64,
    /// Acked ids that named no durable item of the client's mailbox.
    pub ack_ids_ignored: u64,
    /// Items deleted because they outlived the TTL.
    pub expired: u64,
    /// Items found in the store without an account on restore (deleted).
    pub orphans: u64,
    /// Admin commands applied (handed to the store).
    pub admin_applied: u64,
    /// Packets delivered to the admin endpoint ([`ADMIN_MAILBOX`]).
    pub admin_packets: u64,
    /// Links closed or refused because their account was de-provisioned or revoked.
    pub accounts_cut: u64,
}

#[derive(Debug)]
struct Item {
    surb_id: SurbId,
    stored_at_ms: u64,
    /// When it expires: stored at + the TTL of its account's subnet (see `ttl_of`).
    due_ms: u64,
    offered_at_ms: Option<u64>,
    durable: bool,
}

#[derive(Debug)]
struct Mbox {
    key: AccountKey,
    quota: u32,
    subnet: Option<SubnetId>,
    items: BTreeMap<ItemId, Item>,
}

#[derive(Debug, Default)]
struct InFlight {
    inserted: Vec<(MailboxTag, ItemId)>,
    acks: Vec<AckToSend>,
}

/// The gateway's mailbox state machine. See the module docs.
pub struct Mailbox {
    config: MailboxConfig,
    salt: Salt,
    by_key: HashMap<AccountKey, MailboxTag>,
    boxes: HashMap<MailboxTag, Mbox>,
    /// (due at, id, mailbox) of every item, soonest first, for expiry.
    expiry: BTreeSet<(u64, ItemId, MailboxTag)>,
    /// Last accepted command sequence per hosted subnet (persisted with each change).
    guard: CommandGuard,
    /// Newest policy per subnet, as published by its admin.
    policies: HashMap<SubnetId, HostedPolicy>,
    /// When each subnet's admin last got a usage report (unix ms).
    usage_asked: HashMap<SubnetId, u64>,
    next_id: ItemId,
    next_batch: u64,
    open_ops: Vec<WriteOp>,
    open: InFlight,
    in_flight: HashMap<BatchId, InFlight>,
    stats: MailboxStats,
}

impl std::fmt::Debug for Mailbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mailbox")
            .field("accounts", &self.boxes.len())
            .field("items", &self.expiry.len())
            .field("in_flight", &self.in_flight.len())
            .finish_non_exhaustive()
    }
}

/// What the gateway is given of a subnet's policy, and all it keeps of it: the version,
/// the TTL bound and the revoked account (link) keys, which it enforces. Roles, rules,
/// federation partners and members' identity keys are never sent to it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct HostedPolicy {
    version: u64,
    ttl_max: Duration,
    revoked: HashSet<AccountKey>,
}

/// First byte of a stored [`HostedPolicy`] (a legacy store holds the signed JSON, `{`).
const HOSTED_POLICY_TAG: u8 = 1;

impl HostedPolicy {
    /// From a legacy store's signed policy, whose revoked keys were link keys then.
    fn legacy(policy: &Policy) -> Self {
        let b = policy.body();
        HostedPolicy {
            version: b.version,
            ttl_max: Duration::from_secs(b.ttl_max_secs),
            revoked: b.revoked_keys.iter().map(|k| k.0).collect(),
        }
    }

    /// `tag | version u64 | ttl_max secs u64 | n u32 | n × key`, keys sorted.
    fn encode(&self) -> Vec<u8> {
        let mut keys: Vec<&AccountKey> = self.revoked.iter().collect();
        keys.sort();
        let mut out = Vec::with_capacity(21 + 32 * keys.len());
        out.push(HOSTED_POLICY_TAG);
        out.extend_from_slice(&self.version.to_be_bytes());
        out.extend_from_slice(&self.ttl_max.as_secs().to_be_bytes());
        out.extend_from_slice(&u32::try_from(keys.len()).unwrap_or(u32::MAX).to_be_bytes());
        for k in keys {
            out.extend_from_slice(k);
        }
        out
    }

    /// Reads what [`Self::encode`] wrote, or a legacy store's signed policy text
    /// (checked against `subnet`, then reduced to what is enforced).
    fn decode(bytes: &[u8], subnet: &SubnetId) -> Option<Self> {
        if bytes.first() == Some(&b'{') {
            return Policy::verify(bytes, subnet)
                .ok()
                .map(|p| HostedPolicy::legacy(&p));
        }
        let (&tag, rest) = bytes.split_first()?;
        if tag != HOSTED_POLICY_TAG || rest.len() < 20 {
            return None;
        }
        let u64_at = |i: usize| -> Option<u64> {
            Some(u64::from_be_bytes(rest.get(i..i + 8)?.try_into().ok()?))
        };
        let version = u64_at(0)?;
        let ttl_max = Duration::from_secs(u64_at(8)?);
        let n = u32::from_be_bytes(rest.get(16..20)?.try_into().ok()?) as usize;
        let keys = rest.get(20..)?;
        if keys.len() != n.checked_mul(32)? {
            return None;
        }
        let revoked = keys
            .chunks_exact(32)
            .filter_map(|k| <AccountKey>::try_from(k).ok())
            .collect();
        Some(HostedPolicy {
            version,
            ttl_max,
            revoked,
        })
    }
}

/// What an applied admin command asks of the driver.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct AdminApplied {
    /// Accounts whose live links must be closed now (de-provisioned or revoked).
    pub cut: Vec<AccountKey>,
    /// The answer to a read-only query (account usage), for the admin only.
    pub usage: Option<UsageReport>,
}

/// How often a subnet's admin may ask for its accounts' usage (not persisted: a
/// restart allows one more).
pub const USAGE_MIN_INTERVAL: Duration = Duration::from_secs(15 * 60);
/// Usage reports count items in steps of `quota / USAGE_STEPS`...
pub const USAGE_STEPS: u32 = 8;
/// ...but never in steps smaller than this: the admin sets the quota, and a tiny quota
/// must not buy it item-exact counts.
pub const USAGE_MIN_STEP: u32 = 64;

/// `items` rounded down to a step of an eighth of `quota`, at least [`USAGE_MIN_STEP`].
fn coarse_items(items: usize, quota: u32) -> u32 {
    let step = (quota / USAGE_STEPS).max(USAGE_MIN_STEP);
    let items = u32::try_from(items).unwrap_or(u32::MAX);
    items / step * step
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The ack slot of a forward packet's payload. SURB replies (sealed for their
/// creator) do not open and have none; λD drops carry an all-zero SURB, meaning none.
fn ack_slot(payload: &[u8]) -> Option<AckToSend> {
    let plaintext = sphinx::open_forward(payload).ok()?;
    let (slot, _) = split_plaintext(&plaintext).ok()?;
    if slot.surb.iter().all(|b| *b == 0) {
        return None;
    }
    Some(AckToSend {
        surb: Box::new(slot.surb),
        message: slot.message,
    })
}

impl Mailbox {
    /// An empty mailbox core (the simulator's entry point; production uses [`restore`](Self::restore)).
    pub fn new(config: MailboxConfig, salt: Salt) -> Result<Self, GatewayError> {
        config.validate()?;
        Ok(Mailbox {
            config,
            salt,
            by_key: HashMap::new(),
            boxes: HashMap::new(),
            expiry: BTreeSet::new(),
            guard: CommandGuard::default(),
            policies: HashMap::new(),
            usage_asked: HashMap::new(),
            next_id: 1,
            next_batch: 1,
            open_ops: Vec::new(),
            open: InFlight::default(),
            in_flight: HashMap::new(),
            stats: MailboxStats::default(),
        })
    }

    /// Rebuilds the core from what the store read on open. Items whose account is gone
    /// are scheduled for deletion.
    pub fn restore(config: MailboxConfig, recovered: Recovered) -> Result<Self, GatewayError> {
        let Recovered {
            salt,
            next_id,
            accounts,
            subnets,
            items,
        } = recovered;
        let mut m = Mailbox::new(config, salt)?;
        m.next_id = next_id.max(1);
        let mut guard = Vec::with_capacity(subnets.len());
        for (subnet, last, policy) in subnets {
            guard.push((subnet, last));
            if let Some(bytes) = policy {
                // Verified when it was published; only what is enforced was kept.
                let p = HostedPolicy::decode(&bytes, &subnet).ok_or(GatewayError::Corrupt {
                    what: "subnet policy",
                })?;
                m.policies.insert(subnet, p);
            }
        }
        m.guard = CommandGuard::from_entries(guard);
        for (tag, key, quota, subnet) in accounts {
            m.by_key.insert(key, tag);
            m.boxes.insert(
                tag,
                Mbox {
                    key,
                    quota,
                    subnet,
                    items: BTreeMap::new(),
                },
            );
        }
        for (tag, id, surb_id, stored_at_ms) in items {
            m.next_id = m.next_id.max(id.saturating_add(1));
            let due_ms = stored_at_ms.saturating_add(ms(m.ttl_of(&tag)));
            match m.boxes.get_mut(&tag) {
                Some(b) => {
                    b.items.insert(
                        id,
                        Item {
                            surb_id,
                            stored_at_ms,
                            due_ms,
                            offered_at_ms: None,
                            durable: true,
                        },
                    );
                    m.expiry.insert((due_ms, id, tag));
                }
                None => {
                    m.stats.orphans += 1;
                    m.open_ops.push(WriteOp::DeleteItem { tag, id });
                }
            }
        }
        Ok(m)
    }

    #[cfg(test)]
    pub(crate) fn salt_for_tests(&self) -> Salt {
        self.salt.clone()
    }

    pub fn config(&self) -> &MailboxConfig {
        &self.config
    }

    pub fn stats(&self) -> &MailboxStats {
        &self.stats
    }

    /// Whether `key` is a registered account that its subnet's policy does not revoke:
    /// the authentication check for a client link.
    pub fn is_account(&self, key: &AccountKey) -> bool {
        self.active_tag(key).is_some()
    }

    /// The mailbox of `key`, unless there is none or the key is revoked.
    fn active_tag(&self, key: &AccountKey) -> Option<MailboxTag> {
        let tag = *self.by_key.get(key)?;
        let subnet = self.boxes.get(&tag)?.subnet;
        let revoked = subnet
            .and_then(|s| self.policies.get(&s))
            .is_some_and(|p| p.revoked.contains(key));
        (!revoked).then_some(tag)
    }

    /// The TTL of items in mailbox `tag`: the gateway's own, or its subnet policy's
    /// `ttl_max_secs` if shorter.
    fn ttl_of(&self, tag: &MailboxTag) -> Duration {
        let policy = self
            .boxes
            .get(tag)
            .and_then(|b| b.subnet)
            .and_then(|s| self.policies.get(&s));
        match policy {
            Some(p) => self.config.ttl.min(p.ttl_max),
            None => self.config.ttl,
        }
    }

    /// The subnet that owns `key`'s account (`None` for accounts added offline).
    pub fn account_subnet(&self, key: &AccountKey) -> Option<SubnetId> {
        self.boxes.get(self.by_key.get(key)?)?.subnet
    }

    /// The version of the newest policy held for `subnet` (only its TTL bound and
    /// revoked keys are kept).
    pub fn policy_version(&self, subnet: &SubnetId) -> Option<u64> {
        self.policies.get(subnet).map(|p| p.version)
    }

    /// The last command sequence accepted from `subnet`.
    pub fn last_sequence(&self, subnet: &SubnetId) -> Option<u64> {
        self.guard.last_sequence(subnet)
    }

    pub fn accounts(&self) -> usize {
        self.boxes.len()
    }

    /// Items held for `key` (durable or being written).
    pub fn item_count(&self, key: &AccountKey) -> Option<usize> {
        let tag = self.by_key.get(key)?;
        self.boxes.get(tag).map(|b| b.items.len())
    }

    /// Items held over all mailboxes.
    pub fn total_items(&self) -> usize {
        self.expiry.len()
    }

    /// Batches handed out by `poll_write` and not yet reported back.
    /// SURB-acks waiting for their batch's commit (not yet taken or still with the store).
    pub fn acks_pending(&self) -> usize {
        self.open.acks.len() + self.in_flight.values().map(|f| f.acks.len()).sum::<usize>()
    }

    pub fn in_flight_batches(&self) -> usize {
        self.in_flight.len()
    }

    /// Whether `poll_write` has something to return.
    pub fn has_pending_writes(&self) -> bool {
        !self.open_ops.is_empty()
    }

    /// Registers an account: `key` authenticates the client's link, `mailbox` is the
    /// address its packets arrive for, `quota` caps the items held for it.
    pub fn create_account(
        &mut self,
        mailbox: &MailboxAddress,
        key: AccountKey,
        quota: u32,
    ) -> Result<(), GatewayError> {
        self.create_account_in(mailbox, key, quota, None)
    }

    fn create_account_in(
        &mut self,
        mailbox: &MailboxAddress,
        key: AccountKey,
        quota: u32,
        subnet: Option<SubnetId>,
    ) -> Result<(), GatewayError> {
        if self.by_key.contains_key(&key) {
            return Err(GatewayError::AccountExists);
        }
        let tag = MailboxTag::derive(&self.salt, mailbox);
        if *mailbox == DROP_MAILBOX || *mailbox == ADMIN_MAILBOX {
            return Err(GatewayError::MailboxTaken);
        }
        if self.boxes.contains_key(&tag) {
            return Err(GatewayError::MailboxTaken);
        }
        self.by_key.insert(key, tag);
        self.boxes.insert(
            tag,
            Mbox {
                key,
                quota,
                subnet,
                items: BTreeMap::new(),
            },
        );
        self.open_ops.push(WriteOp::PutAccount {
            tag,
            key,
            quota,
            subnet,
        });
        Ok(())
    }

    /// Removes an account and every item in its mailbox.
    pub fn delete_account(&mut self, key: &AccountKey) -> Result<(), GatewayError> {
        let tag = self
            .by_key
            .remove(key)
            .ok_or(GatewayError::UnknownAccount)?;
        if let Some(b) = self.boxes.remove(&tag) {
            for (id, item) in &b.items {
                self.expiry.remove(&(item.due_ms, *id, tag));
            }
        }
        self.open_ops.push(WriteOp::DeleteAccount { tag });
        Ok(())
    }

    /// Changes an account's quota. Items above a lowered quota stay until acked or expired.
    pub fn set_quota(&mut self, key: &AccountKey, quota: u32) -> Result<(), GatewayError> {
        let tag = *self.by_key.get(key).ok_or(GatewayError::UnknownAccount)?;
        let b = self
            .boxes
            .get_mut(&tag)
            .ok_or(GatewayError::Internal("account without mailbox"))?;
        b.quota = quota;
        self.open_ops.push(WriteOp::PutAccount {
            tag,
            key: b.key,
            quota,
            subnet: b.subnet,
        });
        Ok(())
    }

    /// Takes in a packet that ended at this gateway (the mixing core's `Event::Delivered`).
    ///
    /// The raw Sphinx payload is stored as-is. If it is a forward packet, its ack slot is
    /// held back until the item is durable.
    pub fn deliver(
        &mut self,
        destination: &MailboxAddress,
        surb_id: SurbId,
        payload: &[u8],
        now: SystemTime,
    ) -> DeliverOutcome {
        let Ok(payload) = <[u8; SPHINX_PAYLOAD_SIZE]>::try_from(payload) else {
            self.stats.malformed += 1;
            return DeliverOutcome::Malformed;
        };
        if *destination == DROP_MAILBOX {
            // Cover is not stored, but its ack waits for the same commit as the items
            // beside it: the ack's timing must not say whether a packet was real.
            self.stats.cover += 1;
            let ack = ack_slot(&payload);
            let has_ack = ack.is_some();
            if let Some(a) = ack {
                self.stats.cover_acks += 1;
                self.open.acks.push(a);
            }
            return DeliverOutcome::Cover { ack: has_ack };
        }
        if *destination == ADMIN_MAILBOX {
            // Acked on the same commit as everything beside it; what it carries is the
            // admin endpoint's business, not the store's.
            self.stats.admin_packets += 1;
            let ack = ack_slot(&payload);
            let has_ack = ack.is_some();
            if let Some(a) = ack {
                self.open.acks.push(a);
            }
            return DeliverOutcome::Admin { ack: has_ack };
        }
        let tag = MailboxTag::derive(&self.salt, destination);
        let ttl = self.ttl_of(&tag);
        let Some(b) = self.boxes.get_mut(&tag) else {
            self.stats.dropped_unknown += 1;
            return DeliverOutcome::UnknownMailbox;
        };
        if b.items.len() >= b.quota as usize {
            self.stats.refused_quota += 1;
            return DeliverOutcome::QuotaFull;
        }
        let id = self.next_id;
        self.next_id = self.next_id.saturating_add(1);
        let stored_at_ms = unix_ms(now);
        let due_ms = stored_at_ms.saturating_add(ms(ttl));
        b.items.insert(
            id,
            Item {
                surb_id,
                stored_at_ms,
                due_ms,
                offered_at_ms: None,
                durable: false,
            },
        );
        self.expiry.insert((due_ms, id, tag));
        let ack = ack_slot(&payload);
        let has_ack = ack.is_some();
        match ack {
            Some(a) => self.open.acks.push(a),
            None => self.stats.without_ack_slot += 1,
        }
        self.open.inserted.push((tag, id));
        self.open_ops.push(WriteOp::InsertItem {
            tag,
            id,
            surb_id,
            stored_at_ms,
            payload: Box::new(payload),
        });
        self.stats.accepted += 1;
        DeliverOutcome::Accepted { id, ack: has_ack }
    }

    /// Everything queued since the last call, as one batch for the store. A batch may
    /// hold no writes, only the acks of cover: it still goes through a commit.
    pub fn poll_write(&mut self) -> Option<WriteBatch> {
        if self.open_ops.is_empty() && self.open.acks.is_empty() {
            return None;
        }
        let id = BatchId(self.next_batch);
        self.next_batch += 1;
        let ops = std::mem::take(&mut self.open_ops);
        let flight = std::mem::take(&mut self.open);
        if !flight.inserted.is_empty() || !flight.acks.is_empty() {
            self.in_flight.insert(id, flight);
        }
        Some(WriteBatch { id, ops })
    }

    /// The batch is durable: its items become pullable and its SURB-acks are released.
    pub fn on_committed(&mut self, committed: Committed) -> Vec<AckToSend> {
        let Some(flight) = self.in_flight.remove(&committed.batch) else {
            return Vec::new();
        };
        for (tag, id) in flight.inserted {
            // Gone if the account was deleted meanwhile; the delete is ordered after this write.
            if let Some(item) = self.boxes.get_mut(&tag).and_then(|b| b.items.get_mut(&id)) {
                item.durable = true;
            }
        }
        self.stats.acks_released += flight.acks.len() as u64;
        flight.acks
    }

    /// The batch did not become durable: its new items are forgotten and their acks
    /// withheld, so senders retransmit. Deletes that failed are harmless: the items
    /// reappear after a restart and are offered again (at-least-once delivery).
    pub fn on_commit_failed(&mut self, failed: &CommitFailed) {
        self.stats.commit_failures += 1;
        let Some(flight) = self.in_flight.remove(&failed.batch) else {
            return;
        };
        for (tag, id) in flight.inserted {
            if let Some(b) = self.boxes.get_mut(&tag)
                && let Some(item) = b.items.remove(&id)
            {
                self.expiry.remove(&(item.due_ms, id, tag));
            }
        }
        self.stats.acks_withheld += flight.acks.len() as u64;
    }

    /// Dispatches a store report to `on_committed` or `on_commit_failed`.
    pub fn on_commit(&mut self, result: CommitResult) -> Vec<AckToSend> {
        match result {
            Ok(c) => self.on_committed(c),
            Err(f) => {
                self.on_commit_failed(&f);
                Vec::new()
            }
        }
    }

    /// Chooses the next batch for `account`: exactly `pull_batch` entries, durable items
    /// not offered within the redelivery timeout first (oldest first), then dummies.
    /// Nothing is deleted; [`ack`](Self::ack) does that.
    pub fn pull(
        &mut self,
        account: &AccountKey,
        now: SystemTime,
    ) -> Result<PullPlan, GatewayError> {
        let tag = self
            .active_tag(account)
            .ok_or(GatewayError::UnknownAccount)?;
        let b = self
            .boxes
            .get_mut(&tag)
            .ok_or(GatewayError::Internal("account without mailbox"))?;
        let now_ms = unix_ms(now);
        let redeliver = ms(self.config.redelivery_timeout);
        let batch = self.config.pull_batch;
        let mut items = Vec::with_capacity(batch);
        let mut more = false;
        for (id, item) in b.items.iter_mut() {
            if !item.durable
                || item
                    .offered_at_ms
                    .is_some_and(|t| now_ms < t.saturating_add(redeliver))
            {
                continue;
            }
            if items.len() == batch {
                more = true;
                break;
            }
            item.offered_at_ms = Some(now_ms);
            items.push(PullItem::Real {
                id: *id,
                surb_id: item.surb_id,
            });
        }
        let real = items.len();
        items.resize(batch, PullItem::Dummy);
        self.stats.pulls += 1;
        self.stats.items_offered += real as u64;
        self.stats.dummies_offered += (batch - real) as u64;
        Ok(PullPlan { tag, items, more })
    }

    /// Deletes the durable items `ids` of `account`'s mailbox; ids that are not its items
    /// are ignored. Returns how many were deleted.
    pub fn ack(&mut self, account: &AccountKey, ids: &[ItemId]) -> Result<usize, GatewayError> {
        let tag = *self
            .by_key
            .get(account)
            .ok_or(GatewayError::UnknownAccount)?;
        let b = self
            .boxes
            .get_mut(&tag)
            .ok_or(GatewayError::Internal("account without mailbox"))?;
        let mut deleted = 0;
        for id in ids {
            if !b.items.get(id).is_some_and(|i| i.durable) {
                self.stats.ack_ids_ignored += 1;
                continue;
            }
            if let Some(item) = b.items.remove(id) {
                self.expiry.remove(&(item.due_ms, *id, tag));
                self.open_ops.push(WriteOp::DeleteItem { tag, id: *id });
                deleted += 1;
            }
        }
        self.stats.items_acked += deleted as u64;
        Ok(deleted)
    }

    /// Makes items of `account` offered in a pull whose answer never carried them (its
    /// load missed the answer's due time) pullable again at once, instead of after the
    /// redelivery timeout. Ids that are not its items are ignored.
    pub fn release_offers(&mut self, account: &AccountKey, ids: &[ItemId]) {
        let Some(b) = self.by_key.get(account).and_then(|t| self.boxes.get_mut(t)) else {
            return;
        };
        for id in ids {
            if let Some(item) = b.items.get_mut(id) {
                item.offered_at_ms = None;
            }
        }
    }

    /// Deletes durable items stored at least their TTL before `now` (the gateway's, or
    /// their subnet policy's max TTL if shorter). Returns how many.
    pub fn expire(&mut self, now: SystemTime) -> usize {
        let cutoff = unix_ms(now);
        let mut due = Vec::new();
        for &(at, id, tag) in &self.expiry {
            if at > cutoff {
                break;
            }
            let durable = self
                .boxes
                .get(&tag)
                .and_then(|b| b.items.get(&id))
                .is_some_and(|i| i.durable);
            if durable {
                due.push((at, id, tag));
            }
        }
        for (at, id, tag) in &due {
            self.expiry.remove(&(*at, *id, *tag));
            if let Some(b) = self.boxes.get_mut(tag) {
                b.items.remove(id);
            }
            self.open_ops
                .push(WriteOp::DeleteItem { tag: *tag, id: *id });
        }
        self.stats.expired += due.len() as u64;
        due.len()
    }

    /// When [`expire`](Self::expire) next has something to do.
    pub fn next_expiry(&self) -> Option<SystemTime> {
        let (at, _, _) = self.expiry.first()?;
        Some(UNIX_EPOCH + Duration::from_millis(*at))
    }

    /// Applies an admin command whose signature [`crate::remote_admin::check_command`]
    /// verified: checks that it names `gateway`, is unexpired at `now` and is newer than
    /// the last command of its subnet, then changes accounts or policy. The change and
    /// the subnet's new sequence number go out together in the next
    /// [`poll_write`](Self::poll_write) batch; answer the admin only once it is durable.
    ///
    /// A refused command changes nothing, not even the sequence number.
    pub fn apply_admin(
        &mut self,
        checked: CheckedAdmin,
        gateway: &Hex32,
        now: SystemTime,
    ) -> Result<AdminApplied, Refusal> {
        let CheckedAdmin { command } = checked;
        let mut guard = self.guard.clone();
        let now_unix = unix_ms(now) / 1000;
        let command = command
            .check_fresh(gateway, now_unix, &mut guard)
            .map_err(|e| match e {
                SubnetError::WrongGateway => {
                    (AdminRefusal::WrongGateway, "command is for another gateway")
                }
                SubnetError::NotValidAt { .. } => (AdminRefusal::Expired, "command has expired"),
                SubnetError::Replayed { .. } => (
                    AdminRefusal::Replayed,
                    "command sequence is not above the last accepted",
                ),
                _ => (AdminRefusal::Rejected, "command refused"),
            })?;
        let subnet = command.subnet();
        let rejected = |why| (AdminRefusal::Rejected, why);
        // An account this subnet may manage: accounts added offline belong to no admin.
        let own = |m: &Self, key: &AccountKey| match m.by_key.get(key) {
            None => Err(rejected("unknown account")),
            Some(tag) if m.boxes.get(tag).and_then(|b| b.subnet) == Some(subnet) => Ok(()),
            Some(_) => Err(rejected("account is not of this subnet")),
        };
        let mut applied = AdminApplied::default();
        match command.action() {
            AccountAction::CreateAccount {
                account,
                mailbox,
                quota,
            } => {
                if ed25519_dalek::VerifyingKey::from_bytes(&account.0).is_err() {
                    return Err(rejected("account key is not an Ed25519 public key"));
                }
                if self
                    .policies
                    .get(&subnet)
                    .is_some_and(|p| p.revoked.contains(&account.0))
                {
                    return Err(rejected("account key is revoked by policy"));
                }
                self.create_account_in(&mailbox.0, account.0, *quota, Some(subnet))
                    .map_err(|e| match e {
                        GatewayError::AccountExists => rejected("account key already registered"),
                        GatewayError::MailboxTaken => rejected("mailbox already has an account"),
                        _ => rejected("account refused"),
                    })?;
            }
            AccountAction::Deprovision { account } => {
                own(self, &account.0)?;
                self.delete_account(&account.0)
                    .map_err(|_| rejected("unknown account"))?;
                applied.cut.push(account.0);
            }
            AccountAction::SetQuota { account, quota } => {
                own(self, &account.0)?;
                self.set_quota(&account.0, *quota)
                    .map_err(|_| rejected("unknown account"))?;
            }
            AccountAction::AccountUsage => {
                // Rate-limited, so polling cannot time who receives mail when.
                let now_ms = unix_ms(now);
                if self
                    .usage_asked
                    .get(&subnet)
                    .is_some_and(|t| now_ms < t.saturating_add(ms(USAGE_MIN_INTERVAL)))
                {
                    return Err(rejected(
                        "account usage was asked for less than 15 minutes ago",
                    ));
                }
                self.usage_asked.insert(subnet, now_ms);
                applied.usage = Some(self.usage_report(&subnet));
            }
            AccountAction::PublishPolicy {
                version,
                ttl_max_secs,
                revoked_accounts,
            } => {
                if let Some(held) = self.policies.get(&subnet)
                    && *version <= held.version
                {
                    return Err(rejected("policy version is not newer than the one held"));
                }
                let hosted = HostedPolicy {
                    version: *version,
                    ttl_max: Duration::from_secs(*ttl_max_secs),
                    revoked: revoked_accounts.iter().map(|k| k.0).collect(),
                };
                applied.cut = self
                    .boxes
                    .values()
                    .filter(|b| b.subnet == Some(subnet) && hosted.revoked.contains(&b.key))
                    .map(|b| b.key)
                    .collect();
                self.policies.insert(subnet, hosted);
                self.reschedule(subnet);
            }
        }
        self.stats.admin_applied += 1;
        self.stats.accounts_cut += applied.cut.len() as u64;
        self.guard = guard;
        self.open_ops.push(WriteOp::PutSubnet {
            subnet,
            last_sequence: command.sequence(),
            policy: self.policies.get(&subnet).map(HostedPolicy::encode),
        });
        Ok(applied)
    }

    /// Per account of `subnet`: items held (durable or being written), rounded down to
    /// a step of an eighth of its quota (so a few messages show as none: the admin sees
    /// how full mailboxes are, not who got mail), their payload bytes and the quota,
    /// named by [`shoal_subnet::usage_id`]; sorted by that id so the order says nothing
    /// about when accounts were made.
    pub fn usage_report(&self, subnet: &SubnetId) -> UsageReport {
        let mut accounts: Vec<AccountUsage> = self
            .boxes
            .values()
            .filter(|b| b.subnet == Some(*subnet))
            .map(|b| AccountUsage {
                id: shoal_subnet::usage_id(subnet, &Hex32(b.key)),
                items: coarse_items(b.items.len(), b.quota),
                quota: b.quota,
                bytes: u64::from(coarse_items(b.items.len(), b.quota))
                    .saturating_mul(SPHINX_PAYLOAD_SIZE as u64),
            })
            .collect();
        accounts.sort_by_key(|a| a.id);
        UsageReport {
            total_accounts: u32::try_from(accounts.len()).unwrap_or(u32::MAX),
            accounts,
        }
    }

    /// Recomputes when the items of `subnet`'s accounts expire (its policy changed).
    fn reschedule(&mut self, subnet: SubnetId) {
        let tags: Vec<MailboxTag> = self
            .boxes
            .iter()
            .filter(|(_, b)| b.subnet == Some(subnet))
            .map(|(t, _)| *t)
            .collect();
        for tag in tags {
            let ttl = ms(self.ttl_of(&tag));
            let Some(b) = self.boxes.get_mut(&tag) else {
                continue;
            };
            for (id, item) in b.items.iter_mut() {
                self.expiry.remove(&(item.due_ms, *id, tag));
                item.due_ms = item.stored_at_ms.saturating_add(ttl);
                self.expiry.insert((item.due_ms, *id, tag));
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;
    use shoal_packet::payload::{
        AckSlot, BODY_SIZE, ack_message, join_plaintext, parse_ack_message,
    };
    use shoal_packet::replay::ReplayFilter;
    use shoal_packet::sphinx::{
        Hop, ReplyBlock, Unwrapped, build_forward, build_surb, generate_key, open_reply, unwrap,
    };
    use x25519_dalek::StaticSecret;

    pub(crate) const ALICE_BOX: MailboxAddress = [0xa1; 32];
    pub(crate) const ALICE: AccountKey = [0xa2; 32];
    pub(crate) const BOB_BOX: MailboxAddress = [0xb1; 32];
    pub(crate) const BOB: AccountKey = [0xb2; 32];

    pub(crate) fn t(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
    }

    fn cfg() -> MailboxConfig {
        MailboxConfig {
            pull_batch: 4,
            redelivery_timeout: Duration::from_secs(10),
            ttl: Duration::from_secs(100),
        }
    }

    fn mailbox() -> Mailbox {
        let mut m = Mailbox::new(cfg(), Salt::from_bytes([7; 32])).unwrap();
        m.create_account(&ALICE_BOX, ALICE, 3).unwrap();
        m.create_account(&BOB_BOX, BOB, 100).unwrap();
        let b = m.poll_write().unwrap();
        let _ = m.on_committed(Committed::dangerously_assume_durable(&b));
        m
    }

    fn commit_all(m: &mut Mailbox) -> Vec<AckToSend> {
        let mut acks = Vec::new();
        while let Some(b) = m.poll_write() {
            acks.extend(m.on_committed(Committed::dangerously_assume_durable(&b)));
        }
        acks
    }

    /// A one-hop network: the exit gateway's key, and the payload and SURB id it sees
    /// for a forward packet carrying an ack slot that routes back to `ack_to`.
    pub(crate) struct Net {
        rng: StdRng,
        exit: Hop,
        exit_secret: StaticSecret,
        filter: ReplayFilter,
    }

    impl Net {
        pub(crate) fn new(seed: u64) -> Self {
            let mut rng = StdRng::seed_from_u64(seed);
            let (exit_secret, key) = generate_key(&mut rng);
            Net {
                rng,
                exit: Hop {
                    address: [0xee; 32],
                    sphinx_key: key,
                },
                exit_secret,
                filter: ReplayFilter::new(0, 1 << 16),
            }
        }

        fn arrive(&mut self, packet: &[u8]) -> (MailboxAddress, SurbId, Vec<u8>) {
            match unwrap(&self.exit_secret, 0, &self.filter, packet).unwrap() {
                Unwrapped::Final {
                    destination,
                    surb_id,
                    payload,
                } => (destination, surb_id, payload),
                Unwrapped::Forward { .. } => panic!("one-hop route"),
            }
        }

        /// A forward packet to `to` whose ack slot carries a SURB back to `ack_to`.
        /// Returns what the exit hop sees and the recovery material of the ack.
        pub(crate) fn forward_with_ack(
            &mut self,
            to: &MailboxAddress,
            ack_to: &MailboxAddress,
            ack_id: [u8; 16],
        ) -> (SurbId, Vec<u8>, ReplyBlock) {
            self.forward_with_body(to, ack_to, ack_id, &[0x5a; BODY_SIZE])
        }

        /// [`Self::forward_with_ack`] with a chosen sealed body.
        pub(crate) fn forward_with_body(
            &mut self,
            to: &MailboxAddress,
            ack_to: &MailboxAddress,
            ack_id: [u8; 16],
            body: &[u8],
        ) -> (SurbId, Vec<u8>, ReplyBlock) {
            let hops = [self.exit.clone()];
            let block = build_surb(&mut self.rng, &hops, &[Duration::ZERO], ack_to).unwrap();
            let slot = AckSlot {
                surb: block.surb,
                message: ack_message(&ack_id, 0),
            };
            let plaintext = join_plaintext(&slot, body).unwrap();
            let (fwd, _) =
                build_forward(&mut self.rng, &hops, &[Duration::ZERO], to, &plaintext).unwrap();
            let (dest, surb_id, payload) = self.arrive(&fwd.packet);
            assert_eq!(&dest, to);
            (surb_id, payload, block)
        }

        /// Sends an ack packet built by the gateway through the one-hop network and
        /// reads it with the recovery material.
        pub(crate) fn read_ack(&mut self, ack: AckToSend, rec: &ReplyBlock) -> [u8; 16] {
            let pkt = ack.into_packet().unwrap();
            assert_eq!(pkt.first_hop, self.exit.address);
            let (_, _, payload) = self.arrive(&pkt.packet);
            let msg = open_reply(&rec.recovery, &payload).unwrap();
            parse_ack_message(&msg).unwrap()
        }
    }

    #[test]
    fn unknown_mailbox_is_dropped_and_counted() {
        let mut m = mailbox();
        let out = m.deliver(&[0x99; 32], [1; 16], &[0; SPHINX_PAYLOAD_SIZE], t(0));
        assert_eq!(out, DeliverOutcome::UnknownMailbox);
        assert_eq!(m.stats().dropped_unknown, 1);
        assert!(!m.has_pending_writes());
        assert_eq!(
            m.deliver(&ALICE_BOX, [1; 16], &[0; 10], t(0)),
            DeliverOutcome::Malformed
        );
        assert_eq!(m.stats().malformed, 1);
    }

    #[test]
    fn quota_refuses_and_counts() {
        let mut m = mailbox();
        for _ in 0..3 {
            assert!(matches!(
                m.deliver(&ALICE_BOX, [1; 16], &[0; SPHINX_PAYLOAD_SIZE], t(0)),
                DeliverOutcome::Accepted { .. }
            ));
        }
        assert_eq!(
            m.deliver(&ALICE_BOX, [1; 16], &[0; SPHINX_PAYLOAD_SIZE], t(0)),
            DeliverOutcome::QuotaFull
        );
        assert_eq!(m.stats().refused_quota, 1);
        m.set_quota(&ALICE, 4).unwrap();
        assert!(matches!(
            m.deliver(&ALICE_BOX, [1; 16], &[0; SPHINX_PAYLOAD_SIZE], t(0)),
            DeliverOutcome::Accepted { .. }
        ));
        assert_eq!(m.item_count(&ALICE), Some(4));
    }

    #[test]
    fn pull_pads_offers_once_and_redelivers_after_timeout() {
        let mut m = mailbox();
        for _ in 0..6 {
            m.deliver(&BOB_BOX, [2; 16], &[0; SPHINX_PAYLOAD_SIZE], t(0));
        }
        // Not durable yet: nothing to offer.
        let p = m.pull(&BOB, t(1)).unwrap();
        assert_eq!(p.items().len(), 4);
        assert_eq!(p.real_items(), 0);
        commit_all(&mut m);
        let p1 = m.pull(&BOB, t(1)).unwrap();
        assert_eq!((p1.real_items(), p1.more()), (4, true));
        let p2 = m.pull(&BOB, t(2)).unwrap();
        assert_eq!((p2.real_items(), p2.more()), (2, false));
        assert_eq!(p2.items()[2], PullItem::Dummy);
        let p3 = m.pull(&BOB, t(3)).unwrap();
        assert_eq!(
            p3.real_items(),
            0,
            "offered items wait out the redelivery timeout"
        );
        let ids: Vec<ItemId> = p1
            .items()
            .iter()
            .filter_map(|i| match i {
                PullItem::Real { id, .. } => Some(*id),
                PullItem::Dummy => None,
            })
            .collect();
        assert_eq!(m.ack(&BOB, &ids).unwrap(), 4);
        assert!(!commit_all(&mut m).iter().any(|_| true));
        let p4 = m.pull(&BOB, t(20)).unwrap();
        assert_eq!(p4.real_items(), 2, "unacked items are offered again");
        assert_eq!(m.item_count(&BOB), Some(2));
    }

    #[test]
    fn released_offers_are_pullable_again_at_once() {
        let mut m = mailbox();
        for _ in 0..2 {
            m.deliver(&BOB_BOX, [2; 16], &[0; SPHINX_PAYLOAD_SIZE], t(0));
        }
        commit_all(&mut m);
        let p1 = m.pull(&BOB, t(1)).unwrap();
        assert_eq!(p1.real_items(), 2);
        let ids: Vec<ItemId> = p1
            .items()
            .iter()
            .filter_map(|i| match i {
                PullItem::Real { id, .. } => Some(*id),
                PullItem::Dummy => None,
            })
            .collect();
        // Another account cannot release Bob's offers.
        m.release_offers(&ALICE, &ids);
        assert_eq!(m.pull(&BOB, t(2)).unwrap().real_items(), 0);
        m.release_offers(&BOB, &ids[..1]);
        assert_eq!(m.pull(&BOB, t(2)).unwrap().real_items(), 1);
    }

    #[test]
    fn ack_only_deletes_own_durable_items() {
        let mut m = mailbox();
        let DeliverOutcome::Accepted { id: a, .. } =
            m.deliver(&ALICE_BOX, [1; 16], &[0; SPHINX_PAYLOAD_SIZE], t(0))
        else {
            panic!()
        };
        assert_eq!(m.ack(&ALICE, &[a]).unwrap(), 0, "not durable yet");
        commit_all(&mut m);
        assert_eq!(m.ack(&BOB, &[a, 12345]).unwrap(), 0, "not Bob's");
        assert_eq!(m.stats().ack_ids_ignored, 3);
        assert_eq!(m.ack(&ALICE, &[a, a]).unwrap(), 1);
        assert_eq!(m.item_count(&ALICE), Some(0));
        assert_eq!(m.ack(&[0; 32], &[a]), Err(GatewayError::UnknownAccount));
        assert_eq!(m.pull(&[0; 32], t(0)), Err(GatewayError::UnknownAccount));
    }

    #[test]
    fn ttl_expires_old_durable_items() {
        let mut m = mailbox();
        m.deliver(&BOB_BOX, [1; 16], &[0; SPHINX_PAYLOAD_SIZE], t(0));
        m.deliver(&BOB_BOX, [1; 16], &[0; SPHINX_PAYLOAD_SIZE], t(50));
        assert_eq!(m.expire(t(200)), 0, "in-flight items are not expired");
        commit_all(&mut m);
        assert_eq!(m.next_expiry(), Some(t(100)));
        assert_eq!(m.expire(t(99)), 0);
        assert_eq!(m.expire(t(100)), 1);
        assert_eq!(m.item_count(&BOB), Some(1));
        assert!(m.has_pending_writes(), "the delete must reach the store");
        assert_eq!(m.expire(t(150)), 1);
        assert_eq!(m.stats().expired, 2);
        assert_eq!(m.next_expiry(), None);
    }

    #[test]
    fn accounts_are_unique_and_deletable() {
        let mut m = mailbox();
        assert_eq!(
            m.create_account(&[5; 32], ALICE, 1),
            Err(GatewayError::AccountExists)
        );
        assert_eq!(
            m.create_account(&ALICE_BOX, [9; 32], 1),
            Err(GatewayError::MailboxTaken)
        );
        m.deliver(&ALICE_BOX, [1; 16], &[0; SPHINX_PAYLOAD_SIZE], t(0));
        commit_all(&mut m);
        m.delete_account(&ALICE).unwrap();
        assert!(!m.is_account(&ALICE));
        assert_eq!(m.total_items(), 0);
        assert_eq!(
            m.deliver(&ALICE_BOX, [1; 16], &[0; SPHINX_PAYLOAD_SIZE], t(0)),
            DeliverOutcome::UnknownMailbox
        );
        assert_eq!(m.delete_account(&ALICE), Err(GatewayError::UnknownAccount));
    }

    /// The salt links stored tags to mailbox addresses: wiped on drop, never printed.
    #[test]
    fn salt_is_wiped_and_not_printed() {
        fn zeroize_on_drop<T: zeroize::ZeroizeOnDrop>() {}
        zeroize_on_drop::<Salt>();
        assert_eq!(format!("{:?}", Salt::from_bytes([0xab; 32])), "Salt(..)");
    }

    #[test]
    fn stored_state_never_holds_raw_mailbox_addresses() {
        let mut m = Mailbox::new(cfg(), Salt::from_bytes([1; 32])).unwrap();
        m.create_account(&ALICE_BOX, ALICE, 3).unwrap();
        m.deliver(&ALICE_BOX, [1; 16], &[0; SPHINX_PAYLOAD_SIZE], t(0));
        let b = m.poll_write().unwrap();
        for op in b.ops() {
            let tag = match op {
                WriteOp::PutAccount { tag, .. }
                | WriteOp::DeleteAccount { tag }
                | WriteOp::InsertItem { tag, .. }
                | WriteOp::DeleteItem { tag, .. } => tag,
                WriteOp::PutSubnet { .. } => continue,
            };
            assert_ne!(tag.as_bytes(), &ALICE_BOX);
        }
        let other = MailboxTag::derive(&Salt::from_bytes([2; 32]), &ALICE_BOX);
        assert_ne!(
            other,
            MailboxTag::derive(&Salt::from_bytes([1; 32]), &ALICE_BOX),
            "salted"
        );
    }

    #[test]
    fn ack_is_released_only_by_commit() {
        let mut net = Net::new(1);
        let mut m = mailbox();
        let (surb_id, payload, rec) = net.forward_with_ack(&ALICE_BOX, &BOB_BOX, [0x42; 16]);
        let out = m.deliver(&ALICE_BOX, surb_id, &payload, t(0));
        assert!(matches!(out, DeliverOutcome::Accepted { ack: true, .. }));
        let batch = m.poll_write().unwrap();
        // A different batch committing releases nothing of this one.
        m.deliver(&BOB_BOX, [0; 16], &[0; SPHINX_PAYLOAD_SIZE], t(0));
        let other = m.poll_write().unwrap();
        assert!(
            m.on_committed(Committed::dangerously_assume_durable(&other))
                .is_empty()
        );
        let acks = m.on_committed(Committed::dangerously_assume_durable(&batch));
        assert_eq!(acks.len(), 1);
        assert_eq!(m.stats().acks_released, 1);
        assert!(
            m.on_committed(Committed::dangerously_assume_durable(&batch))
                .is_empty(),
            "only once"
        );
        let ack = acks.into_iter().next().unwrap();
        assert_eq!(net.read_ack(ack, &rec), [0x42; 16]);
    }

    /// λP cover ends in the drop mailbox: nothing stored, its ack released by the same
    /// commit as a real item delivered beside it; alone it still waits for a commit. A λD
    /// drop (all-zero SURB) gets no ack. No account can take the drop mailbox.
    #[test]
    fn cover_is_not_stored_and_its_ack_rides_the_commit() {
        let mut net = Net::new(4);
        let mut m = mailbox();
        let (sid, cover, rec) = net.forward_with_ack(&DROP_MAILBOX, &BOB_BOX, [0x44; 16]);
        assert_eq!(
            m.deliver(&DROP_MAILBOX, sid, &cover, t(0)),
            DeliverOutcome::Cover { ack: true }
        );
        let (sid2, real, _) = net.forward_with_ack(&ALICE_BOX, &BOB_BOX, [0x45; 16]);
        m.deliver(&ALICE_BOX, sid2, &real, t(0));
        let batch = m.poll_write().unwrap();
        assert_eq!(batch.len(), 1, "only the real item is written");
        let acks = m.on_committed(Committed::dangerously_assume_durable(&batch));
        assert_eq!(acks.len(), 2);
        assert_eq!(m.total_items(), 1);
        assert_eq!(
            net.read_ack(acks.into_iter().next().unwrap(), &rec),
            [0x44; 16]
        );

        // Cover alone: a batch with no writes, acks only after its commit.
        let (sid, cover, _) = net.forward_with_ack(&DROP_MAILBOX, &BOB_BOX, [0x46; 16]);
        m.deliver(&DROP_MAILBOX, sid, &cover, t(0));
        let batch = m.poll_write().unwrap();
        assert!(batch.is_empty());
        assert_eq!(
            m.on_committed(Committed::dangerously_assume_durable(&batch))
                .len(),
            1
        );

        // A drop: an all-zero SURB means no ack, and no batch.
        let hops = [net.exit.clone()];
        let slot = AckSlot {
            surb: [0; SURB_SIZE],
            message: [9; ACK_MESSAGE_SIZE],
        };
        let plaintext = join_plaintext(&slot, &[0x5a; BODY_SIZE]).unwrap();
        let (fwd, _) = build_forward(
            &mut net.rng,
            &hops,
            &[Duration::ZERO],
            &DROP_MAILBOX,
            &plaintext,
        )
        .unwrap();
        let (dest, sid, drop) = net.arrive(&fwd.packet);
        assert_eq!(
            m.deliver(&dest, sid, &drop, t(0)),
            DeliverOutcome::Cover { ack: false }
        );
        assert!(m.poll_write().is_none());
        assert_eq!(m.stats().cover, 3);
        assert_eq!(m.stats().cover_acks, 2);
        assert_eq!(m.acks_pending(), 0);
        assert_eq!(m.stats().acks_released, 3);
        assert_eq!(
            m.create_account(&DROP_MAILBOX, [0xd0; 32], 10),
            Err(GatewayError::MailboxTaken)
        );
    }

    #[test]
    fn failed_commit_withholds_ack_and_forgets_item() {
        let mut net = Net::new(2);
        let mut m = mailbox();
        let (surb_id, payload, _) = net.forward_with_ack(&ALICE_BOX, &BOB_BOX, [1; 16]);
        m.deliver(&ALICE_BOX, surb_id, &payload, t(0));
        let b = m.poll_write().unwrap();
        m.on_commit(Err(CommitFailed {
            batch: b.id(),
            error: GatewayError::StoreClosed,
        }));
        assert_eq!(m.stats().acks_withheld, 1);
        assert_eq!(m.item_count(&ALICE), Some(0));
        assert_eq!(m.total_items(), 0);
    }

    #[test]
    fn surb_replies_are_stored_without_ack() {
        let mut net = Net::new(3);
        let mut m = mailbox();
        // An ack travelling back to Bob: a SURB reply arriving at Bob's mailbox.
        let (surb_id, payload, _) = net.forward_with_ack(&ALICE_BOX, &BOB_BOX, [3; 16]);
        m.deliver(&ALICE_BOX, surb_id, &payload, t(0));
        let acks = commit_all(&mut m);
        let reply = acks.into_iter().next().unwrap().into_packet().unwrap();
        let (dest, reply_id, reply_payload) = net.arrive(&reply.packet);
        assert_eq!(dest, BOB_BOX);
        assert_eq!(
            m.deliver(&dest, reply_id, &reply_payload, t(0)),
            DeliverOutcome::Accepted { id: 2, ack: false }
        );
        assert_eq!(m.stats().without_ack_slot, 1);
        assert!(commit_all(&mut m).is_empty());
        let p = m.pull(&BOB, t(1)).unwrap();
        assert_eq!(
            p.items()[0],
            PullItem::Real {
                id: 2,
                surb_id: reply_id
            }
        );
    }

    #[test]
    fn restore_drops_orphans_and_keeps_ids_increasing() {
        let rec = Recovered {
            salt: Salt::from_bytes([7; 32]),
            next_id: 10,
            accounts: vec![(
                MailboxTag::derive(&Salt::from_bytes([7; 32]), &ALICE_BOX),
                ALICE,
                5,
                None,
            )],
            subnets: Vec::new(),
            items: vec![
                (
                    MailboxTag::derive(&Salt::from_bytes([7; 32]), &ALICE_BOX),
                    12,
                    [0; 16],
                    0,
                ),
                (MailboxTag::from_bytes([3; 32]), 4, [0; 16], 0),
            ],
        };
        let mut m = Mailbox::restore(cfg(), rec).unwrap();
        assert_eq!(m.stats().orphans, 1);
        assert!(m.has_pending_writes());
        assert_eq!(m.item_count(&ALICE), Some(1));
        assert_eq!(
            m.deliver(&ALICE_BOX, [0; 16], &[0; SPHINX_PAYLOAD_SIZE], t(0)),
            DeliverOutcome::Accepted { id: 13, ack: false }
        );
    }

    #[test]
    fn config_is_validated() {
        let bad = MailboxConfig {
            pull_batch: 0,
            ..MailboxConfig::default()
        };
        assert!(Mailbox::new(bad, Salt::from_bytes([0; 32])).is_err());
    }

    proptest! {
        /// Download volume says nothing: every pull has exactly `pull_batch` entries.
        #[test]
        fn pull_always_returns_exactly_the_batch(batch in 1usize..40, n in 0usize..100, pulls in 1usize..6) {
            let mut m = Mailbox::new(
                MailboxConfig { pull_batch: batch, ..MailboxConfig::default() },
                Salt::from_bytes([0; 32]),
            ).unwrap();
            m.create_account(&BOB_BOX, BOB, 1000).unwrap();
            for i in 0..n {
                m.deliver(&BOB_BOX, [0; 16], &[0; SPHINX_PAYLOAD_SIZE], t(i as u64));
                if i % 7 == 0 {
                    commit_all(&mut m);
                }
            }
            let mut offered = 0;
            for p in 0..pulls {
                let plan = m.pull(&BOB, t(1000 + p as u64)).unwrap();
                prop_assert_eq!(plan.items().len(), batch);
                let real = plan.real_items();
                let real_first = plan.items()[..real].iter().all(|i| matches!(i, PullItem::Real { .. }));
                prop_assert!(real_first);
                offered += real;
            }
            prop_assert!(offered <= n);
        }
    }
}

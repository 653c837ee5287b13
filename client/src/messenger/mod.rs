//! The managed messenger: policy-checked 1:1 messages, MLS groups and admin policy
//! updates on top of the client's end-to-end 1:1 messages. Sans-IO.
//!
//! Everything a member sends or receives is one [`wire::Envelope`] inside the
//! end-to-end seal of an ordinary message ([`crate::ClientCore::send_message`]), so on
//! the wire a group commit, a policy update and a "hello" look alike: fixed-size
//! packets on the client's constant Poisson schedule.
//!
//! [`Messenger`] holds the member's credential and signing key, the newest policy of
//! its subnet and its [`GroupManager`]:
//! - **Sending** checks the member's own policy first ([`Policy::may_send`] and
//!   [`Policy::check_options`]); a refusal is a [`MessengerError::Refused`] that names
//!   the rule. Output is [`Outgoing`] items (a contact and bytes) for the driver.
//! - **Identity**: every member travels as a [`MemberCard`] — the admin's credential
//!   ("this key is member H of subnet S") and the member's own address binding signed
//!   by that key. Messages are sealed only to a binding's seal key, so an admin cannot
//!   open or redirect them. Contacts and direct conversations are keyed by (subnet,
//!   identity key) and pinned on first use ([`PinnedContact`]); a second key for a
//!   pinned (subnet, handle) raises [`MessengerEvent::KeyChanged`] and its messages
//!   stay in their own conversation, flagged. [`safety_number`] lets two people check
//!   their keys out of band.
//! - **Receiving** ([`Messenger::handle_incoming`]) checks the sender's card and
//!   signature, drops a replayed direct message (its id is remembered in the state,
//!   see [`REPLAY_WINDOW_MS`]), then the member's *own* policy ([`Policy::may_receive`], options);
//!   what policy forbids is dropped and counted ([`Messenger::policy_drops`]), even
//!   when a modified sender skipped its checks. Group messages are checked by the
//!   [`GroupManager`] the same way.
//! - **Policy updates** signed by the member's admin replace the policy (never by an
//!   older one); members the new policy refuses (a revocation) are removed from every
//!   group at this member's next commit ([`GroupManager::remove_refused`]), which the
//!   messenger issues at once. Pending leave proposals are committed likewise.
//! - **TTL and burn-on-read** travel inside the envelope; stored messages are deleted
//!   when their TTL (counted from receipt) runs out, and burn-on-read ones right after
//!   the first [`Messenger::read`].
//! - **Persistence**: [`Messenger::snapshot`] / [`Messenger::restore`]; the caller
//!   stores it ([`crate::ClientStore::save_messenger`]) whenever
//!   [`Messenger::take_dirty`] says it changed. Save *before* sending what
//!   [`Messenger::poll_outgoing`] yields: MLS must never reuse a ratchet generation
//!   after a crash, so a crash may lose a send but never repeat one.

pub mod wire;

use std::collections::{BTreeSet, HashMap, VecDeque};

use base64::Engine;
use base64::engine::general_purpose::STANDARD_NO_PAD as B64;
use ed25519_dalek::SigningKey;
use serde::{Deserialize, Serialize};
use sha2_0_11::{Digest, Sha256};
use shoal_subnet::{
    MemberCard, MemberCredential, MessageOptions, Policy, PolicyRefusal, SignedCredential,
    SignedPolicy, SubnetError, SubnetId, UncheckedPolicy,
};
use shoal_topology::Hex32;

use crate::contact::Contact;
use crate::group::{
    GroupConfig, GroupError, GroupEvent, GroupId, GroupManager, GroupStats, OutgoingKind,
    contact_of, hex_short,
};
pub use wire::{DirectMessage, Envelope, Invite, Recipient, WireError};

const STATE_VERSION: u32 = 2;
/// How long a direct message's id is remembered: one sent earlier than this (by its
/// own timestamp) is dropped, so a replay is dropped forever however late it comes.
pub const REPLAY_WINDOW_MS: u64 = 14 * 24 * 3600 * 1000;
/// A direct message stamped further in the future than this is dropped (it would
/// otherwise pin its replay entry, and raise the floor, far ahead).
const MAX_FUTURE_MS: u64 = 3600 * 1000;
/// Replay entries kept; beyond this the oldest go and the floor rises to them.
const MAX_REPLAY_ENTRIES: usize = 16_384;
const DIRECT_ID_DOMAIN: &[u8] = b"shoal direct message id";
const SAFETY_DOMAIN: &[u8] = b"shoal safety number v1";
/// Unverified plain messages kept: anyone holding a member's card can send them, so
/// they never push verified messages out of the inbox; the oldest go first.
const MAX_UNVERIFIED: usize = 256;
/// How long an unverified plain message is kept (it carries no TTL of its own).
const UNVERIFIED_TTL_MS: u64 = 24 * 3600 * 1000;
/// Pinned contacts kept; the oldest unconfirmed go first beyond this.
const MAX_CONTACTS: usize = 4096;
/// Group messages for groups not joined yet (their Welcome is still on its way) are
/// kept this long, at most `max_parked` of them.
const PARK_MS: u64 = 10 * 60 * 1000;

/// Local limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessengerConfig {
    pub groups: GroupConfig,
    /// Messages kept in the inbox; the oldest go first beyond this.
    pub max_inbox: usize,
    /// Group messages held until their group's Welcome arrives.
    pub max_parked: usize,
    /// Invites received over the network that are kept for the user.
    pub max_invites: usize,
    /// Test-only: trust the address fields of the admin's credential (the rule before
    /// address bindings), so the rogue suite can show the attack it stops.
    #[serde(skip)]
    #[doc(hidden)]
    pub dangerously_trust_admin_addresses: bool,
}

impl Default for MessengerConfig {
    fn default() -> Self {
        MessengerConfig {
            groups: GroupConfig::default(),
            max_inbox: 10_000,
            max_parked: 256,
            max_invites: 64,
            dangerously_trust_admin_addresses: false,
        }
    }
}

/// Why the messenger refused a request.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MessengerError {
    /// Own policy forbids this send; names the rule.
    #[error("policy refuses sending to {to:?}: {refusal}")]
    Refused { to: String, refusal: PolicyRefusal },
    #[error("group: {0}")]
    Group(GroupError),
    #[error("membership credential or policy: {0}")]
    Subnet(#[from] SubnetError),
    #[error("malformed {what}: {reason}")]
    Malformed { what: &'static str, reason: String },
    #[error("messenger snapshot: {0}")]
    Snapshot(String),
    /// An invite whose owner's key the user has not confirmed (its card was not pasted,
    /// nor the invite accepted).
    #[error("{0} is not a confirmed contact: compare safety numbers, then accept their card")]
    NotConfirmed(String),
    /// The invite's card and the key package inside it name different members.
    #[error("the invite's card and key package belong to different members")]
    InviteMismatch,
    #[error("no contact {0}")]
    UnknownContact(String),
    #[error("{0}")]
    Ambiguous(String),
}

impl From<GroupError> for MessengerError {
    fn from(e: GroupError) -> Self {
        match e {
            GroupError::Policy { handle, refusal } => MessengerError::Refused {
                to: handle,
                refusal,
            },
            other => MessengerError::Group(other),
        }
    }
}

/// What kind of traffic an [`Outgoing`] item is (for counters; the wire does not say).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutgoingWhat {
    Direct,
    Group(OutgoingKind),
    Invite,
    Policy,
}

/// Names one send the user made ([`Messenger::send_direct`], [`Messenger::send_group`]):
/// every [`Outgoing`] envelope it produced carries it, so a receipt is bound to its
/// own message by id, never by position in a queue (see [`crate::receipts`]). Unique
/// per member (the counter is kept in the state).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SendId(pub u64);

/// What a user's send produced: its id and how many envelopes it handed to the driver
/// (one per recipient; zero for a group with nobody else in it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendTicket {
    pub id: SendId,
    pub envelopes: usize,
}

/// Where an own message went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub enum OwnTo {
    Direct { subnet: SubnetId, key: Hex32 },
    Group(#[serde(with = "b64")] GroupId),
}

/// The last delivery mark of an own message (see [`crate::receipts`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum OwnState {
    Queued,
    Sent,
    Delivered,
    Failed,
}

/// A message this member sent, kept (like the inbox, in the store) until its TTL runs
/// out so the sender still sees it after a restart. Burn-on-read messages are not kept.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OwnMessage {
    pub id: SendId,
    pub to: OwnTo,
    #[serde(with = "b64")]
    pub body: Vec<u8>,
    pub sent_unix_ms: u64,
    pub expires_unix_ms: u64,
    /// Copies it went out as (one per recipient).
    pub envelopes: usize,
    /// The client driver's ids of the copies handed to it, so receipts that come after
    /// a restart still find their message.
    pub message_ids: Vec<[u8; 16]>,
    pub state: OwnState,
}

impl std::fmt::Debug for OwnMessage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OwnMessage")
            .field("id", &self.id)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

/// One message for the driver: seal `bytes` to `to` and send.
#[derive(Clone)]
pub struct Outgoing {
    pub to: Contact,
    pub what: OutgoingWhat,
    pub bytes: Vec<u8>,
    /// The user's send this envelope belongs to (`None`: protocol traffic such as
    /// commits, invites, policy updates).
    pub send: Option<SendId>,
}

impl std::fmt::Debug for Outgoing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Outgoing({:?}, {} bytes)", self.what, self.bytes.len())
    }
}

mod b64 {
    use super::B64;
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&B64.encode(b))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        B64.decode(s).map_err(serde::de::Error::custom)
    }
}

mod b64_opt {
    use super::B64;
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(b: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match b {
            Some(b) => s.serialize_some(&B64.encode(b)),
            None => s.serialize_none(),
        }
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|s| B64.decode(s).map_err(serde::de::Error::custom))
            .transpose()
    }
}

/// A received message as kept until it expires or is burnt.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredMessage {
    /// Local sequence number.
    pub id: u64,
    pub from: String,
    pub from_subnet: SubnetId,
    /// The sender's identity key: with `from_subnet`, what the conversation is keyed by.
    pub from_key: Hex32,
    /// The sender's key is not the one first pinned for its (subnet, handle), and the
    /// user has not confirmed it: show an alert with it.
    #[serde(default)]
    pub key_alert: bool,
    /// The group it was sent to; `None` for a direct message.
    #[serde(with = "b64_opt")]
    pub group: Option<GroupId>,
    #[serde(with = "b64")]
    pub body: Vec<u8>,
    pub received_unix_ms: u64,
    pub expires_unix_ms: u64,
    pub burn_on_read: bool,
    pub read: bool,
    /// Not an envelope: plain bytes from a client without a member card (`shoal client
    /// send` outside a subnet). Nothing vouches for its sender; `from_subnet` and
    /// `from_key` are all zero. Kept and shown flagged rather than dropped, since the
    /// gateway has already been told it arrived.
    #[serde(default)]
    pub unverified: bool,
}

impl StoredMessage {
    /// The conversation this message belongs to.
    pub fn conversation(&self) -> Conversation<'_> {
        match &self.group {
            Some(g) => Conversation::Group(g),
            None => Conversation::Direct(self.from_subnet, self.from_key),
        }
    }
}

impl std::fmt::Debug for StoredMessage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Bodies and senders are user data.
        f.debug_struct("StoredMessage")
            .field("id", &self.id)
            .field("len", &self.body.len())
            .finish_non_exhaustive()
    }
}

/// An invite that arrived over the network, kept until the user acts on it. Used
/// only by the identity key it came from, once the user has confirmed that key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReceivedInvite {
    pub handle: String,
    pub subnet: SubnetId,
    pub identity_key: Hex32,
    #[serde(with = "b64")]
    pub card: Vec<u8>,
    #[serde(with = "b64")]
    pub key_package: Vec<u8>,
}

impl ReceivedInvite {
    pub fn invite(&self) -> Invite {
        Invite {
            card: self.card.clone(),
            key_package: self.key_package.clone(),
        }
    }
}

/// A contact as pinned on first use: keyed by (subnet, identity key).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PinnedContact {
    pub subnet: SubnetId,
    pub identity_key: Hex32,
    /// The handle its newest credential carries (for display; never a lookup key alone).
    pub handle: String,
    /// The user vouched for this key: pasted its card, accepted its invite or its key
    /// change. Only confirmed contacts' network invites are used.
    pub confirmed: bool,
    /// Another key was pinned first for this (subnet, handle): this one is a key
    /// change (a new device, or an admin impersonating the person) until confirmed.
    pub replaces: Option<Hex32>,
    /// The newest card seen (its binding says where to reach the contact).
    #[serde(with = "b64")]
    pub card: Vec<u8>,
    pub first_seen_ms: u64,
}

impl PinnedContact {
    /// Shown with an alert: a key change the user has not confirmed.
    pub fn alert(&self) -> bool {
        self.replaces.is_some() && !self.confirmed
    }
    /// `handle@subnet` (the subnet's first 4 bytes), terminal-safe.
    pub fn display(&self) -> String {
        display_name(&self.handle, &self.subnet)
    }
}

/// `handle@abcd0123`: a handle with the start of its subnet id, terminal-safe. Every
/// handle shown to a user is shown so, since handles are unique only per subnet.
pub fn display_name(handle: &str, subnet: &SubnetId) -> String {
    format!("{}@{}", terminal_safe(handle), hex_short(&subnet.0))
}

/// Untrusted text made safe for a terminal: control characters (escape sequences,
/// newlines, bidi overrides) become spaces.
pub fn terminal_safe(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}') {
                ' '
            } else {
                c
            }
        })
        .collect()
}

/// The safety number of two identity keys, as Signal shows it: for each key, 30
/// digits from SHA-256 of the key (six 5-byte chunks, each mod 100000), the two
/// halves sorted so both people see the same 60 digits, in groups of five.
pub fn safety_number(a: &[u8; 32], b: &[u8; 32]) -> String {
    let half = |k: &[u8; 32]| -> String {
        let mut h = Sha256::new();
        h.update(SAFETY_DOMAIN);
        h.update(k);
        let d = h.finalize();
        (0..6)
            .map(|i| {
                let c = &d[i * 5..i * 5 + 5];
                let n = c.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
                format!("{:05}", n % 100_000)
            })
            .collect::<Vec<_>>()
            .join(" ")
    };
    let (x, y) = (half(a), half(b));
    let (lo, hi) = if x <= y { (x, y) } else { (y, x) };
    format!("{lo} {hi}")
}

/// Direct-message ids already seen, bounded; see [`REPLAY_WINDOW_MS`].
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReplaySet {
    /// (sent unix ms, 8 bytes of SHA-256(sender key, id)).
    entries: Vec<(u64, u64)>,
    /// Messages sent at or before this are dropped (raised when entries are evicted).
    floor_ms: u64,
    #[serde(skip)]
    index: HashMap<u64, u64>,
}

impl ReplaySet {
    fn rebuild(&mut self) {
        self.entries.sort_unstable();
        self.index = self.entries.iter().map(|(t, k)| (*k, *t)).collect();
    }

    /// True if the message is new (and now remembered); false for a replay or one too
    /// old or too far ahead to judge.
    fn check_and_insert(&mut self, sender: &[u8; 32], id: &[u8; 16], sent: u64, now: u64) -> bool {
        let floor = self.floor_ms.max(now.saturating_sub(REPLAY_WINDOW_MS));
        if sent <= floor || sent > now.saturating_add(MAX_FUTURE_MS) {
            return false;
        }
        let mut h = Sha256::new();
        h.update(sender);
        h.update(id);
        let d = h.finalize();
        let mut k = [0u8; 8];
        k.copy_from_slice(&d[..8]);
        let key = u64::from_be_bytes(k);
        if self.index.contains_key(&key) {
            return false;
        }
        // Entries are kept sorted by time; drop the expired, then the oldest if full.
        let expired = self.entries.partition_point(|(t, _)| *t <= floor);
        for (_, k) in self.entries.drain(..expired) {
            self.index.remove(&k);
        }
        if self.entries.len() >= MAX_REPLAY_ENTRIES {
            let (t, k) = self.entries.remove(0);
            self.index.remove(&k);
            self.floor_ms = self.floor_ms.max(t);
            if sent <= self.floor_ms {
                return false;
            }
        }
        let at = self.entries.partition_point(|e| *e <= (sent, key));
        self.entries.insert(at, (sent, key));
        self.index.insert(key, sent);
        true
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Parked {
    #[serde(with = "b64")]
    bytes: Vec<u8>,
    at_ms: u64,
}

/// Counters. Aggregates only.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessengerStats {
    pub direct_sent: u64,
    pub direct_received: u64,
    pub group_sent: u64,
    pub group_received: u64,
    /// Sends this member's own policy refused.
    pub sends_refused: u64,
    /// Direct messages dropped because this member's policy forbids their sender or
    /// options (group drops are in the group counters; see [`Messenger::policy_drops`]).
    pub direct_policy_drops: u64,
    pub policy_updates: u64,
    /// Policy documents refused (bad signature, other subnet, not newer).
    pub policies_rejected: u64,
    /// Removal commits issued because policy now refuses a member.
    pub removals_committed: u64,
    /// Commits of pending proposals (leave requests) issued.
    pub proposals_committed: u64,
    pub invites_received: u64,
    pub expired: u64,
    pub burnt: u64,
    /// Envelopes that failed to decode or verify.
    pub malformed: u64,
    /// Plain messages (not envelopes) kept as unverified.
    #[serde(default)]
    pub unverified_received: u64,
    /// Direct messages dropped as replays (or too old / too far ahead to tell).
    pub replays_dropped: u64,
    /// Direct messages or invites from a second key for a pinned (subnet, handle).
    pub key_changes: u64,
    /// Group messages that arrived before their group was joined and were dropped.
    pub parked_dropped: u64,
    /// Group operations that failed on receipt (stale, diverged, undecryptable).
    pub group_errors: u64,
}

/// What happened, for the application.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum MessengerEvent {
    /// A message was stored (read it with [`Messenger::read`]).
    Message {
        id: u64,
        from: String,
        subnet: SubnetId,
        key: Hex32,
        /// From an unconfirmed changed key (see [`StoredMessage::key_alert`]).
        key_alert: bool,
        group: Option<GroupId>,
        body: Vec<u8>,
    },
    /// A second identity key for a pinned (subnet, handle): a new device, or someone
    /// (an admin) impersonating the person. Its messages stay in their own
    /// conversation until the user confirms it ([`Messenger::confirm_contact`]).
    KeyChanged {
        subnet: SubnetId,
        handle: String,
        old_key: Hex32,
        new_key: Hex32,
    },
    /// A message dropped because this member's policy forbids it, counted.
    PolicyDrop {
        group: Option<GroupId>,
        handle: String,
        refusal: PolicyRefusal,
    },
    /// A newer policy of this member's subnet is in force.
    PolicyUpdated { version: u64 },
    /// Someone sent an invite (card + KeyPackage). `confirmed`: from a key the user
    /// confirmed; otherwise it is used only after [`Messenger::confirm_contact`].
    InviteReceived {
        handle: String,
        subnet: SubnetId,
        key: Hex32,
        confirmed: bool,
    },
    /// Everything else from the groups (joined, members added/removed, refused, …).
    Group(GroupEvent),
    /// An envelope failed its checks (a bad signature, a card that does not verify, a
    /// message for someone else) and was dropped, counted in `malformed`: the user is
    /// told, since its receipt went back to the sender.
    Dropped { reason: &'static str },
}

/// A group as listed to the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupSummary {
    pub id: GroupId,
    pub epoch: u64,
    /// (handle, subnet) of every member, this one included.
    pub members: Vec<(String, SubnetId)>,
    /// A change (this member's or another's commit) waits to settle until then (unix
    /// ms); members added by it join only after.
    pub settling_until_ms: Option<u64>,
    /// This member asked to leave and waits for another member's commit.
    pub leaving: bool,
}

/// One conversation of the inbox as a user opens it: a group, or the direct messages
/// from one (subnet, identity key) — never from a handle, which an admin can re-mint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Conversation<'a> {
    Group(&'a [u8]),
    Direct(SubnetId, Hex32),
}

/// What [`Messenger::snapshot`] returns: the MLS state (secret keys included) and the
/// rest (inbox, counters). Store both in one transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessengerSnapshot {
    pub groups: Vec<u8>,
    pub state: Vec<u8>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct State {
    version: u32,
    config: MessengerConfig,
    inbox: Vec<StoredMessage>,
    next_id: u64,
    parked: Vec<Parked>,
    #[serde(with = "ids_b64")]
    leaving: Vec<GroupId>,
    invites: Vec<ReceivedInvite>,
    stats: MessengerStats,
    contacts: Vec<PinnedContact>,
    replay: ReplaySet,
    next_direct: u64,
    #[serde(default)]
    next_send: u64,
    #[serde(default)]
    own: Vec<OwnMessage>,
}

mod ids_b64 {
    use super::B64;
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(ids: &[Vec<u8>], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(ids.iter().map(|b| B64.encode(b)))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Vec<u8>>, D::Error> {
        Vec::<String>::deserialize(d)?
            .into_iter()
            .map(|s| B64.decode(s).map_err(serde::de::Error::custom))
            .collect()
    }
}

/// The bytes an admin sends (as an ordinary message) to each member to publish a policy.
pub fn policy_update(policy: &SignedPolicy) -> Vec<u8> {
    Envelope::Policy(policy.to_bytes()).encode()
}

/// The admin's side of policy distribution, shared by `shoal admin` and the demo: one
/// [`Outgoing`] per member of `members` (the admin's own records) that `policy` does
/// not revoke, to the address the member's credential names, carrying
/// [`policy_update`]. Members whose credential names no usable seal key (enrolled
/// without one) cannot be reached and are returned by handle.
///
/// Nothing here needs trust in the path: a member's messenger applies a policy only if
/// its subnet's admin signed it and its version is newer than the one it holds
/// ([`Messenger::handle_incoming`]), so a gateway or stranger that forges, replays or
/// reorders updates changes nothing.
pub fn policy_deliveries<'a>(
    policy: &Policy,
    members: impl IntoIterator<Item = &'a MemberCredential>,
) -> (Vec<Outgoing>, Vec<String>) {
    let update = policy_update(policy.signed());
    let (mut out, mut unreachable) = (Vec::new(), Vec::new());
    for cred in members {
        if cred.subnet() != policy.subnet() || policy.is_revoked(cred) {
            continue;
        }
        let b = cred.body();
        let to = Contact {
            mailbox: b.mailbox.0,
            gateway: b.gateway.0,
            public_key: b.seal_key.0,
        };
        // An all-zero (unstated) or low-order seal key: a card cannot be made for it.
        if crate::ContactCard::new("member", to).is_err() {
            unreachable.push(cred.handle().to_string());
            continue;
        }
        out.push(Outgoing {
            to,
            what: OutgoingWhat::Policy,
            bytes: update.clone(),
            send: None,
        });
    }
    (out, unreachable)
}

/// One member's messenger.
pub struct Messenger {
    groups: GroupManager,
    key: SigningKey,
    config: MessengerConfig,
    inbox: Vec<StoredMessage>,
    next_id: u64,
    parked: Vec<Parked>,
    leaving: BTreeSet<GroupId>,
    invites: Vec<ReceivedInvite>,
    contacts: Vec<PinnedContact>,
    replay: ReplaySet,
    /// Counter mixed into direct-message ids.
    next_direct: u64,
    /// The next [`SendId`].
    next_send: u64,
    /// Own messages, oldest first.
    own: Vec<OwnMessage>,
    /// Set while a `send_group` call pumps its group's output, so its application
    /// envelopes carry its id.
    sending: Option<SendId>,
    outgoing: VecDeque<Outgoing>,
    events: VecDeque<MessengerEvent>,
    stats: MessengerStats,
    /// Groups must be checked against policy (after a policy update or an epoch change).
    maintain: bool,
    dirty: bool,
}

impl std::fmt::Debug for Messenger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Messenger")
            .field("groups", &self.groups)
            .field("inbox", &self.inbox.len())
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl Messenger {
    /// `signing_secret` is the Ed25519 identity secret whose public key `credential`
    /// names; `own` is where this client is reached (its seal key, mailbox and
    /// gateway), which the member signs into its own address binding; `policy` the
    /// newest policy of the credential's subnet. A credential for another key, or
    /// naming addresses that are not `own`, is refused.
    pub fn new(
        signing_secret: [u8; 32],
        own: Contact,
        credential: &SignedCredential,
        policy: Policy,
        config: MessengerConfig,
        now_ms: u64,
    ) -> Result<Self, MessengerError> {
        let groups = GroupManager::new(
            signing_secret,
            own,
            credential,
            policy,
            config.groups,
            now_ms,
        )?;
        if groups.policy().body().subnet != groups.credential().subnet() {
            return Err(MessengerError::Subnet(SubnetError::WrongSubnet {
                what: "subnet policy",
                subnet: groups.policy().body().subnet,
            }));
        }
        Ok(Self::with_groups(groups, config))
    }

    fn with_groups(groups: GroupManager, config: MessengerConfig) -> Self {
        Messenger {
            key: SigningKey::from_bytes(groups.signing_secret()),
            groups,
            config,
            inbox: Vec::new(),
            next_id: 1,
            parked: Vec::new(),
            leaving: BTreeSet::new(),
            invites: Vec::new(),
            contacts: Vec::new(),
            replay: ReplaySet::default(),
            next_direct: 0,
            next_send: 1,
            own: Vec::new(),
            sending: None,
            outgoing: VecDeque::new(),
            events: VecDeque::new(),
            stats: MessengerStats::default(),
            maintain: false,
            dirty: true,
        }
    }

    pub fn credential(&self) -> &MemberCredential {
        self.groups.credential()
    }
    /// This member's card: credential and own address binding (what contacts need).
    pub fn card(&self) -> &MemberCard {
        self.groups.card()
    }
    /// Where messages to `card` go: its own binding (or, only with the test-only
    /// switch, the admin's credential fields, the old rule).
    fn contact_for(&self, card: &MemberCard) -> Contact {
        if self.config.dangerously_trust_admin_addresses {
            let b = card.credential().body();
            return Contact {
                mailbox: b.mailbox.0,
                gateway: b.gateway.0,
                public_key: b.seal_key.0,
            };
        }
        contact_of(card)
    }
    pub fn policy(&self) -> &Policy {
        self.groups.policy()
    }
    pub fn stats(&self) -> MessengerStats {
        self.stats
    }
    pub fn group_stats(&self) -> GroupStats {
        self.groups.stats()
    }
    /// Every message dropped on receipt because this member's policy forbids it.
    pub fn policy_drops(&self) -> u64 {
        self.stats.direct_policy_drops + self.groups.stats().policy_drops
    }
    /// The group layer, for inspection.
    pub fn group_manager(&self) -> &GroupManager {
        &self.groups
    }

    /// Whether the state changed since the last call (then snapshot and store it).
    pub fn take_dirty(&mut self) -> bool {
        std::mem::take(&mut self.dirty)
    }

    pub fn poll_outgoing(&mut self) -> Option<Outgoing> {
        self.outgoing.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<MessengerEvent> {
        self.events.pop_front()
    }

    /// A fresh invite of this member (its credential and a single-use KeyPackage), to
    /// hand to a group member out of band or with [`Self::send_invite`].
    pub fn invite(&mut self) -> Result<Invite, MessengerError> {
        let key_package = self.groups.key_package()?;
        self.dirty = true;
        Ok(Invite {
            card: self.card().to_bytes(),
            key_package,
        })
    }

    fn check_send(
        &mut self,
        to: &MemberCredential,
        options: Option<&MessageOptions>,
        now_ms: u64,
    ) -> Result<(), MessengerError> {
        let policy = self.groups.policy();
        let me = self.groups.credential();
        let result = policy
            .may_send(me, to, now_ms / 1000)
            .and_then(|()| options.map_or(Ok(()), |o| policy.check_options(o)));
        result.map_err(|refusal| {
            self.stats.sends_refused += 1;
            MessengerError::Refused {
                to: to.handle().into(),
                refusal,
            }
        })
    }

    /// Sends a signed 1:1 message to the member of `to` (sealed to its own binding), if
    /// this member's policy allows it.
    pub fn send_direct(
        &mut self,
        to: &MemberCard,
        options: MessageOptions,
        body: &[u8],
        now_ms: u64,
    ) -> Result<SendTicket, MessengerError> {
        self.check_send(to.credential(), Some(&options), now_ms)?;
        let ticket = self.dangerously_send_direct_ignoring_policy(to, options, body, now_ms);
        let to = OwnTo::Direct {
            subnet: to.subnet(),
            key: Hex32(to.identity_key()),
        };
        self.keep_own(ticket, to, options, body, now_ms);
        Ok(ticket)
    }

    /// Keeps an own message for the sender (not burn-on-read ones: those leave no
    /// copy behind).
    fn keep_own(
        &mut self,
        ticket: SendTicket,
        to: OwnTo,
        options: MessageOptions,
        body: &[u8],
        now_ms: u64,
    ) {
        if options.burn_on_read {
            return;
        }
        self.own.push(OwnMessage {
            id: ticket.id,
            to,
            body: body.to_vec(),
            sent_unix_ms: now_ms,
            expires_unix_ms: now_ms.saturating_add(options.ttl_secs.saturating_mul(1000)),
            envelopes: ticket.envelopes,
            message_ids: Vec::new(),
            state: OwnState::Queued,
        });
        if self.own.len() > self.config.max_inbox {
            let extra = self.own.len() - self.config.max_inbox;
            self.own.drain(..extra);
        }
        self.dirty = true;
    }

    /// Own messages not yet expired, oldest first.
    pub fn own_messages(&self) -> &[OwnMessage] {
        &self.own
    }

    /// The driver took one copy of own message `send` under `message_id`.
    pub fn note_envelope(&mut self, send: SendId, message_id: [u8; 16]) {
        if let Some(m) = self.own.iter_mut().find(|m| m.id == send) {
            m.message_ids.push(message_id);
            self.dirty = true;
        }
    }

    /// The newest delivery mark of own message `send`.
    pub fn note_own_state(&mut self, send: SendId, state: OwnState) {
        if let Some(m) = self.own.iter_mut().find(|m| m.id == send) {
            m.state = state;
            self.dirty = true;
        }
    }

    fn new_send_id(&mut self) -> SendId {
        let id = SendId(self.next_send);
        self.next_send += 1;
        id
    }

    /// What a modified client does: sends without asking its own policy. For demos and
    /// tests of recipient-side enforcement only.
    pub fn dangerously_send_direct_ignoring_policy(
        &mut self,
        to: &MemberCard,
        options: MessageOptions,
        body: &[u8],
        now_ms: u64,
    ) -> SendTicket {
        let send = self.new_send_id();
        let id = self.direct_id(now_ms);
        let msg = DirectMessage::sign(
            &self.key,
            self.card().to_bytes(),
            &Recipient {
                identity_key: to.identity_key(),
                subnet: to.subnet().0,
            },
            now_ms,
            id,
            options,
            body.to_vec(),
        );
        self.stats.direct_sent += 1;
        self.dirty = true;
        self.outgoing.push_back(Outgoing {
            to: self.contact_for(to),
            what: OutgoingWhat::Direct,
            bytes: Envelope::Direct(msg).encode(),
            send: Some(send),
        });
        SendTicket {
            id: send,
            envelopes: 1,
        }
    }

    /// A fresh id: unique per sender because the counter is persisted with the state.
    fn direct_id(&mut self, now_ms: u64) -> [u8; 16] {
        self.next_direct += 1;
        let mut h = Sha256::new();
        h.update(DIRECT_ID_DOMAIN);
        h.update(self.card().identity_key());
        h.update(now_ms.to_be_bytes());
        h.update(self.next_direct.to_be_bytes());
        let d = h.finalize();
        let mut id = [0u8; 16];
        id.copy_from_slice(&d[..16]);
        id
    }

    /// Sends this member's invite to `to` (who may then add it to a group).
    pub fn send_invite(&mut self, to: &MemberCard, now_ms: u64) -> Result<(), MessengerError> {
        self.check_send(to.credential(), None, now_ms)?;
        let invite = self.invite()?;
        self.outgoing.push_back(Outgoing {
            to: self.contact_for(to),
            what: OutgoingWhat::Invite,
            bytes: Envelope::Invite(invite).encode(),
            send: None,
        });
        Ok(())
    }

    /// Invites received over the network, oldest first.
    pub fn received_invites(&self) -> &[ReceivedInvite] {
        &self.invites
    }

    /// The newest network invite from the identity key (`subnet`, `key`), only if the
    /// user confirmed that key. Never chosen by handle: a look-alike is another key.
    pub fn invite_from(&self, subnet: &SubnetId, key: &Hex32) -> Option<Invite> {
        if !self.contact(subnet, key).is_some_and(|c| c.confirmed) {
            return None;
        }
        self.invites
            .iter()
            .rev()
            .find(|i| i.subnet == *subnet && i.identity_key == *key)
            .map(ReceivedInvite::invite)
    }

    /// Contacts pinned so far, oldest first.
    pub fn contacts(&self) -> &[PinnedContact] {
        &self.contacts
    }

    pub fn contact(&self, subnet: &SubnetId, key: &Hex32) -> Option<&PinnedContact> {
        self.contacts
            .iter()
            .find(|c| c.subnet == *subnet && c.identity_key == *key)
    }

    /// The contact a person typed: `handle` or `handle@abcd` (a start of the subnet id in
    /// hex). Confirmed contacts win over unconfirmed ones; two that still match is an
    /// error naming both, never a guess.
    pub fn find_contact(&self, query: &str) -> Result<&PinnedContact, MessengerError> {
        let (handle, subnet) = match query.trim().rsplit_once('@') {
            Some((h, s)) => (h, Some(s.to_ascii_lowercase())),
            None => (query.trim(), None),
        };
        let hits: Vec<&PinnedContact> = self
            .contacts
            .iter()
            .filter(|c| {
                c.handle == handle
                    && subnet
                        .as_ref()
                        .is_none_or(|s| hex_full(&c.subnet.0).starts_with(s.as_str()))
            })
            .collect();
        let confirmed: Vec<&PinnedContact> = hits.iter().copied().filter(|c| c.confirmed).collect();
        let pick = if confirmed.is_empty() {
            hits
        } else {
            confirmed
        };
        match pick.as_slice() {
            [one] => Ok(one),
            [] => Err(MessengerError::UnknownContact(terminal_safe(query))),
            many => Err(MessengerError::Ambiguous(format!(
                "{} could be {}: say which, e.g. with handle@subnet",
                terminal_safe(query),
                many.iter()
                    .map(|c| format!("{} (key {})", c.display(), hex_short(&c.identity_key.0)))
                    .collect::<Vec<_>>()
                    .join(" or ")
            ))),
        }
    }

    /// The card to write to the contact (`subnet`, `key`) with, e.g. to answer a
    /// message whose card arrived with it: a key pinned on first use, or one the user
    /// confirmed. An unconfirmed key change (a second key for a name already pinned: a
    /// new device, or an admin impersonating the person) is refused until the user
    /// accepts it, so a reply never goes to an impostor unnoticed.
    pub fn reply_card(&self, subnet: &SubnetId, key: &Hex32) -> Result<MemberCard, MessengerError> {
        let c = self
            .contact(subnet, key)
            .ok_or_else(|| MessengerError::UnknownContact(hex_short(&key.0)))?;
        if c.alert() {
            return Err(MessengerError::NotConfirmed(c.display()));
        }
        MemberCard::parse(&c.card).map_err(MessengerError::Subnet)
    }

    /// The user vouches for `card` (pasted it, or checked its safety number): pins its
    /// key as confirmed. Returns the pinned contact.
    pub fn confirm_card(&mut self, card: &MemberCard, now_ms: u64) -> PinnedContact {
        self.observe(card, now_ms);
        self.confirm_contact(&card.subnet(), &Hex32(card.identity_key()));
        self.contact(&card.subnet(), &Hex32(card.identity_key()))
            .cloned()
            .unwrap_or_else(|| unreachable_contact(card, now_ms))
    }

    /// The user accepts a pinned key (a new contact's invite, or a key change). False
    /// if no such contact.
    pub fn confirm_contact(&mut self, subnet: &SubnetId, key: &Hex32) -> bool {
        let Some(c) = self
            .contacts
            .iter_mut()
            .find(|c| c.subnet == *subnet && c.identity_key == *key)
        else {
            return false;
        };
        c.confirmed = true;
        self.dirty = true;
        for m in self
            .inbox
            .iter_mut()
            .filter(|m| m.from_subnet == *subnet && m.from_key == *key)
        {
            m.key_alert = false;
        }
        true
    }

    /// The safety number of this member's identity key and `key`.
    pub fn safety_number_with(&self, key: &Hex32) -> String {
        safety_number(&self.card().identity_key(), &key.0)
    }

    /// Pins `card` on first use; a second key for a pinned (subnet, handle), or for a
    /// name shown the same way, is pinned apart, unconfirmed, with a
    /// [`MessengerEvent::KeyChanged`]. Returns whether the
    /// key is an unconfirmed key change (its messages carry an alert).
    fn observe(&mut self, card: &MemberCard, now_ms: u64) -> bool {
        let subnet = card.subnet();
        let key = Hex32(card.identity_key());
        self.dirty = true;
        if let Some(c) = self
            .contacts
            .iter_mut()
            .find(|c| c.subnet == subnet && c.identity_key == key)
        {
            // The same key: a newer binding (new address) or credential replaces.
            let newer = MemberCard::parse(&c.card)
                .map(|old| old.binding().body().sequence < card.binding().body().sequence)
                .unwrap_or(true);
            if newer {
                c.card = card.to_bytes();
                c.handle = card.handle().to_string();
            }
            return c.alert();
        }
        // A name already shown for another key: the same (subnet, handle), or one that
        // only looks the same (a subnet id ground to share the shown prefix, a handle
        // that differs in characters the terminal cannot show).
        let shown = display_name(card.handle(), &subnet);
        let old = self
            .contacts
            .iter()
            .find(|c| {
                c.replaces.is_none()
                    && ((c.subnet == subnet && c.handle == card.handle()) || c.display() == shown)
            })
            .map(|c| c.identity_key);
        if let Some(old_key) = old {
            self.stats.key_changes += 1;
            self.events.push_back(MessengerEvent::KeyChanged {
                subnet,
                handle: card.handle().to_string(),
                old_key,
                new_key: key,
            });
        }
        if self.contacts.len() >= MAX_CONTACTS
            && let Some(i) = self.contacts.iter().position(|c| !c.confirmed)
        {
            self.contacts.remove(i);
        }
        self.contacts.push(PinnedContact {
            subnet,
            identity_key: key,
            handle: card.handle().to_string(),
            confirmed: false,
            replaces: old,
            card: card.to_bytes(),
            first_seen_ms: now_ms,
        });
        old.is_some()
    }

    pub fn create_group(&mut self, now_ms: u64) -> Result<GroupId, MessengerError> {
        let id = self.groups.create_group(now_ms)?;
        self.dirty = true;
        self.pump_groups(now_ms);
        Ok(id)
    }

    /// Adds the owners of `invites` in one commit; each is checked against policy first.
    pub fn add_members(
        &mut self,
        group: &[u8],
        invites: &[Invite],
        now_ms: u64,
    ) -> Result<(), MessengerError> {
        for i in invites {
            let card = MemberCard::parse(&i.card)?;
            let in_kp = self.groups.key_package_card(&i.key_package, now_ms)?;
            if in_kp.identity_key() != card.identity_key() || in_kp.subnet() != card.subnet() {
                return Err(MessengerError::InviteMismatch);
            }
            self.check_send(card.credential(), None, now_ms)?;
        }
        for i in invites {
            // The caller chose these invites: adding someone is vouching for them.
            if let Ok(card) = MemberCard::parse(&i.card) {
                self.confirm_card(&card, now_ms);
            }
        }
        let kps: Vec<&[u8]> = invites.iter().map(|i| i.key_package.as_slice()).collect();
        let result = self.groups.add_members(group, &kps, now_ms);
        self.after_group_call(result, now_ms)
    }

    /// Encrypts `body` to every other member of `group`, if policy allows each of them.
    pub fn send_group(
        &mut self,
        group: &[u8],
        options: MessageOptions,
        body: &[u8],
        now_ms: u64,
    ) -> Result<SendTicket, MessengerError> {
        let result = self.groups.send(group, options, body, now_ms);
        if matches!(result, Err(GroupError::Policy { .. })) {
            self.stats.sends_refused += 1;
        }
        if result.is_ok() {
            self.stats.group_sent += 1;
        }
        let id = self.new_send_id();
        let before = self.outgoing.len();
        self.sending = Some(id);
        let done = self.after_group_call(result, now_ms);
        self.sending = None;
        done?;
        let envelopes = self
            .outgoing
            .iter()
            .skip(before)
            .filter(|o| o.send == Some(id))
            .count();
        let ticket = SendTicket { id, envelopes };
        self.keep_own(ticket, OwnTo::Group(group.to_vec()), options, body, now_ms);
        Ok(ticket)
    }

    pub fn remove_member(
        &mut self,
        group: &[u8],
        handle: &str,
        now_ms: u64,
    ) -> Result<(), MessengerError> {
        let result = self.groups.remove_member(group, handle, now_ms);
        self.after_group_call(result, now_ms)
    }

    /// Fresh leaf keys (post-compromise security).
    pub fn self_update(&mut self, group: &[u8], now_ms: u64) -> Result<(), MessengerError> {
        let result = self.groups.self_update(group, now_ms);
        self.after_group_call(result, now_ms)
    }

    /// Asks to leave; the next commit by another member removes this one.
    pub fn leave(&mut self, group: &[u8], now_ms: u64) -> Result<(), MessengerError> {
        let result = self.groups.leave(group);
        if result.is_ok() {
            self.leaving.insert(group.to_vec());
        }
        self.after_group_call(result, now_ms)
    }

    fn after_group_call(
        &mut self,
        result: Result<(), GroupError>,
        now_ms: u64,
    ) -> Result<(), MessengerError> {
        self.dirty = true;
        self.pump_groups(now_ms);
        Ok(result?)
    }

    pub fn groups(&self) -> Vec<GroupSummary> {
        self.groups
            .group_ids()
            .into_iter()
            .map(|id| GroupSummary {
                epoch: self.groups.epoch(&id).unwrap_or_default(),
                settling_until_ms: self.groups.settle_at(&id),
                leaving: self.leaving.contains(&id),
                members: self
                    .groups
                    .members(&id)
                    .into_iter()
                    .map(|m| (m.credential.handle().to_string(), m.credential.subnet()))
                    .collect(),
                id,
            })
            .collect()
    }

    /// Takes the bytes of one received message (what the driver delivered).
    pub fn handle_incoming(&mut self, bytes: &[u8], now_ms: u64) {
        self.dirty = true;
        match Envelope::decode(bytes) {
            Ok(Envelope::Direct(d)) => self.on_direct(d, now_ms),
            Ok(Envelope::Mls(b)) => self.on_mls(b, now_ms, true),
            Ok(Envelope::Policy(b)) => self.on_policy(&b),
            Ok(Envelope::Invite(i)) => self.on_invite(i, now_ms),
            Err(_) if wire::is_plain(bytes) => self.store_unverified(bytes, now_ms),
            Err(_) => self.drop_malformed("it is damaged"),
        }
        self.pump_groups(now_ms);
    }

    fn drop_malformed(&mut self, reason: &'static str) {
        self.stats.malformed += 1;
        self.events.push_back(MessengerEvent::Dropped { reason });
    }

    /// Keeps plain bytes (not an envelope) as an unverified message, for the default TTL.
    fn store_unverified(&mut self, bytes: &[u8], now_ms: u64) {
        self.stats.unverified_received += 1;
        let id = self.next_id;
        self.next_id += 1;
        let (subnet, key): (SubnetId, Hex32) = (Hex32([0; 32]), Hex32([0; 32]));
        if self.inbox.iter().filter(|m| m.unverified).count() >= MAX_UNVERIFIED
            && let Some(i) = self.inbox.iter().position(|m| m.unverified)
        {
            self.inbox.remove(i);
        }
        self.events.push_back(MessengerEvent::Message {
            id,
            from: String::new(),
            subnet,
            key,
            key_alert: false,
            group: None,
            body: bytes.to_vec(),
        });
        self.push_inbox(StoredMessage {
            id,
            from: String::new(),
            from_subnet: subnet,
            from_key: key,
            key_alert: false,
            group: None,
            body: bytes.to_vec(),
            received_unix_ms: now_ms,
            expires_unix_ms: now_ms.saturating_add(UNVERIFIED_TTL_MS),
            burn_on_read: false,
            read: false,
            unverified: true,
        });
    }

    fn push_inbox(&mut self, m: StoredMessage) {
        self.inbox.push(m);
        if self.inbox.len() > self.config.max_inbox {
            let extra = self.inbox.len() - self.config.max_inbox;
            self.inbox.drain(..extra);
        }
    }

    fn on_direct(&mut self, d: DirectMessage, now_ms: u64) {
        let Ok(card) = MemberCard::parse(&d.card) else {
            self.drop_malformed("its sender's card does not verify");
            return;
        };
        let me = Recipient {
            identity_key: self.card().identity_key(),
            subnet: self.card().subnet().0,
        };
        if !d.verify(&card.identity_key(), &me) {
            self.drop_malformed("its signature does not verify, or it was meant for someone else");
            return;
        }
        if !self
            .replay
            .check_and_insert(&card.identity_key(), &d.id, d.sent_unix_ms, now_ms)
        {
            self.stats.replays_dropped += 1;
            return;
        }
        let cred = card.credential().clone();
        let policy = self.groups.policy();
        let verdict = policy
            .may_receive(self.groups.credential(), &cred, now_ms / 1000)
            .and_then(|()| policy.check_options(&d.options));
        if let Err(refusal) = verdict {
            self.stats.direct_policy_drops += 1;
            self.events.push_back(MessengerEvent::PolicyDrop {
                group: None,
                handle: cred.handle().into(),
                refusal,
            });
            return;
        }
        self.stats.direct_received += 1;
        let key_alert = self.observe(&card, now_ms);
        self.store(&cred, key_alert, None, d.options, d.body, now_ms);
    }

    fn store(
        &mut self,
        from: &MemberCredential,
        key_alert: bool,
        group: Option<GroupId>,
        options: MessageOptions,
        body: Vec<u8>,
        now_ms: u64,
    ) {
        let id = self.next_id;
        self.next_id += 1;
        let key = Hex32(from.signing_key());
        self.events.push_back(MessengerEvent::Message {
            id,
            from: from.handle().into(),
            subnet: from.subnet(),
            key,
            key_alert,
            group: group.clone(),
            body: body.clone(),
        });
        self.push_inbox(StoredMessage {
            id,
            from: from.handle().into(),
            from_subnet: from.subnet(),
            from_key: key,
            key_alert,
            group,
            body,
            received_unix_ms: now_ms,
            expires_unix_ms: now_ms.saturating_add(options.ttl_secs.saturating_mul(1000)),
            burn_on_read: options.burn_on_read,
            read: false,
            unverified: false,
        });
    }

    fn on_mls(&mut self, bytes: Vec<u8>, now_ms: u64, may_park: bool) {
        match self.groups.handle_message(&bytes, now_ms) {
            Ok(()) => {}
            Err(GroupError::UnknownGroup) if may_park => {
                if self.parked.len() >= self.config.max_parked {
                    self.parked.remove(0);
                    self.stats.parked_dropped += 1;
                }
                self.parked.push(Parked {
                    bytes,
                    at_ms: now_ms,
                });
            }
            Err(GroupError::Policy { .. }) => {
                // A Welcome into a group policy forbids: reported as `Refused`.
            }
            Err(_) => self.stats.group_errors += 1,
        }
    }

    fn on_policy(&mut self, bytes: &[u8]) {
        let subnet = self.credential().subnet();
        let checked = UncheckedPolicy::parse(bytes).and_then(|p| p.check_signature(&subnet));
        let result = match checked {
            Ok(p) => {
                let version = p.body().version;
                self.groups.update_policy(p).map(|()| version)
            }
            Err(e) => Err(GroupError::Credential(e)),
        };
        match result {
            Ok(version) => {
                self.stats.policy_updates += 1;
                self.maintain = true;
                self.events
                    .push_back(MessengerEvent::PolicyUpdated { version });
            }
            Err(_) => self.stats.policies_rejected += 1,
        }
    }

    fn on_invite(&mut self, invite: Invite, now_ms: u64) {
        let Ok(card) = MemberCard::parse(&invite.card) else {
            self.drop_malformed("the card in it does not verify");
            return;
        };
        self.stats.invites_received += 1;
        if self.invites.len() >= self.config.max_invites {
            self.invites.remove(0);
        }
        self.observe(&card, now_ms);
        let subnet = card.subnet();
        let key = Hex32(card.identity_key());
        let confirmed = self.contact(&subnet, &key).is_some_and(|c| c.confirmed);
        self.events.push_back(MessengerEvent::InviteReceived {
            handle: card.handle().into(),
            subnet,
            key,
            confirmed,
        });
        self.invites.push(ReceivedInvite {
            handle: card.handle().into(),
            subnet,
            identity_key: key,
            card: invite.card,
            key_package: invite.key_package,
        });
    }

    /// Moves the group layer's output and events into the messenger's, and commits what
    /// policy or pending proposals call for.
    fn pump_groups(&mut self, now_ms: u64) {
        loop {
            let mut joined = false;
            while let Some(out) = self.groups.poll_outgoing() {
                let env = Envelope::Mls(out.bytes).encode();
                // Only a `send_group` call produces application messages.
                let send = match out.kind {
                    OutgoingKind::Application => self.sending,
                    _ => None,
                };
                for r in &out.recipients {
                    self.outgoing.push_back(Outgoing {
                        to: self.contact_for(r),
                        what: OutgoingWhat::Group(out.kind),
                        bytes: env.clone(),
                        send,
                    });
                }
            }
            while let Some(e) = self.groups.poll_event() {
                match e {
                    GroupEvent::Message {
                        group,
                        from,
                        options,
                        body,
                    } => {
                        self.stats.group_received += 1;
                        self.store(&from, false, Some(group), options, body, now_ms);
                    }
                    GroupEvent::PolicyDrop {
                        group,
                        handle,
                        refusal,
                    } => self.events.push_back(MessengerEvent::PolicyDrop {
                        group: Some(group),
                        handle,
                        refusal,
                    }),
                    other => {
                        match &other {
                            GroupEvent::Joined { .. } => joined = true,
                            GroupEvent::Removed { group } | GroupEvent::Refused { group, .. } => {
                                self.leaving.remove(group);
                            }
                            GroupEvent::EpochChanged { .. } | GroupEvent::OwnCommitLost { .. } => {
                                self.maintain = true
                            }
                            _ => {}
                        }
                        self.events.push_back(MessengerEvent::Group(other));
                    }
                }
            }
            if joined && !self.parked.is_empty() {
                for p in std::mem::take(&mut self.parked) {
                    self.on_mls(p.bytes, now_ms, true);
                }
                continue;
            }
            if self.maintain {
                self.maintain = false;
                if self.commit_for_policy(now_ms) {
                    continue;
                }
            }
            break;
        }
    }

    /// Removes members policy now refuses and commits pending proposals, in every group
    /// this member is not leaving. True if a commit was issued.
    fn commit_for_policy(&mut self, now_ms: u64) -> bool {
        let mut issued = false;
        for id in self.groups.group_ids() {
            if self.leaving.contains(&id) {
                continue;
            }
            // `CommitPending` (an own commit is settling) is fine: the next epoch
            // change brings us back here.
            if let Ok(true) = self.groups.remove_refused(&id, now_ms) {
                self.stats.removals_committed += 1;
                issued = true;
            } else if let Ok(true) = self.groups.commit_pending(&id, now_ms) {
                self.stats.proposals_committed += 1;
                issued = true;
            }
        }
        issued
    }

    /// When [`Self::handle_timeout`] must next be called (unix ms), if ever.
    pub fn poll_timeout(&self) -> Option<u64> {
        let expiry = self
            .inbox
            .iter()
            .map(|m| m.expires_unix_ms)
            .chain(self.own.iter().map(|m| m.expires_unix_ms))
            .min();
        let parked = self.parked.iter().map(|p| p.at_ms + PARK_MS).min();
        [self.groups.poll_timeout(), expiry, parked]
            .into_iter()
            .flatten()
            .min()
    }

    /// Settles commits whose window passed and deletes expired messages.
    pub fn handle_timeout(&mut self, now_ms: u64) {
        if self.groups.poll_timeout().is_some_and(|t| t <= now_ms) {
            self.groups.handle_timeout(now_ms);
            self.dirty = true;
        }
        self.expire(now_ms);
        let before = self.parked.len();
        self.parked.retain(|p| p.at_ms + PARK_MS > now_ms);
        if self.parked.len() != before {
            self.stats.parked_dropped += (before - self.parked.len()) as u64;
            self.dirty = true;
        }
        self.pump_groups(now_ms);
    }

    fn expire(&mut self, now_ms: u64) {
        let own = self.own.len();
        self.own.retain(|m| m.expires_unix_ms > now_ms);
        if self.own.len() != own {
            self.dirty = true;
        }
        let before = self.inbox.len();
        self.inbox.retain(|m| m.expires_unix_ms > now_ms);
        if self.inbox.len() != before {
            self.stats.expired += (before - self.inbox.len()) as u64;
            self.dirty = true;
        }
    }

    /// Messages not yet expired, oldest first, marked read; burn-on-read ones are
    /// deleted by this read. Store the snapshot afterwards so the deletion is durable.
    pub fn read(&mut self, now_ms: u64) -> Vec<StoredMessage> {
        self.read_where(now_ms, |_| true)
    }

    /// [`Self::read`] of one conversation only: burn-on-read messages of every other
    /// conversation stay until that one is opened.
    pub fn read_conversation(
        &mut self,
        conversation: Conversation<'_>,
        now_ms: u64,
    ) -> Vec<StoredMessage> {
        self.read_where(now_ms, |m| m.conversation() == conversation)
    }

    fn read_where(
        &mut self,
        now_ms: u64,
        chosen: impl Fn(&StoredMessage) -> bool,
    ) -> Vec<StoredMessage> {
        self.expire(now_ms);
        let out: Vec<StoredMessage> = self.inbox.iter().filter(|m| chosen(m)).cloned().collect();
        let before = self.inbox.len();
        self.inbox.retain(|m| !(m.burn_on_read && chosen(m)));
        self.stats.burnt += (before - self.inbox.len()) as u64;
        for m in self.inbox.iter_mut().filter(|m| chosen(m)) {
            m.read = true;
        }
        self.dirty = true;
        out
    }

    /// The inbox without reading it (nothing is burnt or marked).
    pub fn peek(&self) -> &[StoredMessage] {
        &self.inbox
    }

    pub fn snapshot(&self) -> Result<MessengerSnapshot, MessengerError> {
        let state = State {
            version: STATE_VERSION,
            config: self.config,
            inbox: self.inbox.clone(),
            next_id: self.next_id,
            parked: self.parked.clone(),
            leaving: self.leaving.iter().cloned().collect(),
            invites: self.invites.clone(),
            stats: self.stats,
            contacts: self.contacts.clone(),
            replay: self.replay.clone(),
            next_direct: self.next_direct,
            next_send: self.next_send,
            own: self.own.clone(),
        };
        Ok(MessengerSnapshot {
            groups: self.groups.snapshot()?,
            state: serde_json::to_vec(&state)
                .map_err(|e| MessengerError::Snapshot(e.to_string()))?,
        })
    }

    pub fn restore(snapshot: &MessengerSnapshot, now_ms: u64) -> Result<Self, MessengerError> {
        let state: State = serde_json::from_slice(&snapshot.state)
            .map_err(|e| MessengerError::Snapshot(e.to_string()))?;
        if state.version != STATE_VERSION {
            return Err(MessengerError::Snapshot(format!(
                "version {} is not supported",
                state.version
            )));
        }
        let groups = GroupManager::restore(&snapshot.groups, now_ms)?;
        let mut m = Self::with_groups(groups, state.config);
        m.inbox = state.inbox;
        m.next_id = state.next_id;
        m.parked = state.parked;
        m.leaving = state.leaving.into_iter().collect();
        m.invites = state.invites;
        m.stats = state.stats;
        m.contacts = state.contacts;
        m.replay = state.replay;
        m.replay.rebuild();
        m.next_direct = state.next_direct;
        m.next_send = state.next_send.max(1);
        m.own = state.own;
        m.dirty = false;
        m.expire(now_ms);
        Ok(m)
    }
}

fn hex_full(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

/// Only reached if a contact was pinned and then not found, which `observe` rules out.
fn unreachable_contact(card: &MemberCard, now_ms: u64) -> PinnedContact {
    PinnedContact {
        subnet: card.subnet(),
        identity_key: Hex32(card.identity_key()),
        handle: card.handle().to_string(),
        confirmed: true,
        replaces: None,
        card: card.to_bytes(),
        first_seen_ms: now_ms,
    }
}

/// Invite text: `shoal-invite1:` and base64url of the invite envelope, so it can be
/// pasted like a contact card.
pub fn invite_to_text(invite: &Invite) -> String {
    format!(
        "{INVITE_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(Envelope::Invite(invite.clone()).encode())
    )
}

const INVITE_PREFIX: &str = "shoal-invite1:";

/// Parses [`invite_to_text`]'s output.
pub fn invite_from_text(text: &str) -> Result<Invite, MessengerError> {
    let bad = |reason: &str| MessengerError::Malformed {
        what: "invite",
        reason: reason.into(),
    };
    let body = text
        .trim()
        .strip_prefix(INVITE_PREFIX)
        .ok_or_else(|| bad("does not start with shoal-invite1:"))?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(body)
        .map_err(|_| bad("not base64url"))?;
    match Envelope::decode(&bytes) {
        Ok(Envelope::Invite(i)) => Ok(i),
        _ => Err(bad("not an invite envelope")),
    }
}

#[cfg(test)]
mod tests;

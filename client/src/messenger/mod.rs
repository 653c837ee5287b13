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
//! - **Receiving** ([`Messenger::handle_incoming`]) checks the sender's credential and
//!   signature, then the member's *own* policy ([`Policy::may_receive`], options);
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

use std::collections::{BTreeSet, VecDeque};

use base64::Engine;
use base64::engine::general_purpose::STANDARD_NO_PAD as B64;
use ed25519_dalek::SigningKey;
use serde::{Deserialize, Serialize};
use shoal_subnet::{
    MemberCredential, MessageOptions, Policy, PolicyRefusal, SignedCredential, SignedPolicy,
    SubnetError, SubnetId, UncheckedCredential, UncheckedPolicy,
};

use crate::contact::Contact;
use crate::group::{
    GroupConfig, GroupError, GroupEvent, GroupId, GroupManager, GroupStats, OutgoingKind,
    contact_of,
};
pub use wire::{DirectMessage, Envelope, Invite, WireError};

const STATE_VERSION: u32 = 1;
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
}

impl Default for MessengerConfig {
    fn default() -> Self {
        MessengerConfig {
            groups: GroupConfig::default(),
            max_inbox: 10_000,
            max_parked: 256,
            max_invites: 64,
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

/// One message for the driver: seal `bytes` to `to` and send.
#[derive(Clone)]
pub struct Outgoing {
    pub to: Contact,
    pub what: OutgoingWhat,
    pub bytes: Vec<u8>,
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
    /// The group it was sent to; `None` for a direct message.
    #[serde(with = "b64_opt")]
    pub group: Option<GroupId>,
    #[serde(with = "b64")]
    pub body: Vec<u8>,
    pub received_unix_ms: u64,
    pub expires_unix_ms: u64,
    pub burn_on_read: bool,
    pub read: bool,
}

impl StoredMessage {
    /// The conversation this message belongs to.
    pub fn conversation(&self) -> Conversation<'_> {
        match &self.group {
            Some(g) => Conversation::Group(g),
            None => Conversation::Direct(&self.from),
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

/// An invite that arrived over the network, kept until the user acts on it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReceivedInvite {
    pub handle: String,
    pub subnet: SubnetId,
    #[serde(with = "b64")]
    pub credential: Vec<u8>,
    #[serde(with = "b64")]
    pub key_package: Vec<u8>,
}

impl ReceivedInvite {
    pub fn invite(&self) -> Invite {
        Invite {
            credential: self.credential.clone(),
            key_package: self.key_package.clone(),
        }
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
        group: Option<GroupId>,
        body: Vec<u8>,
    },
    /// A message dropped because this member's policy forbids it, counted.
    PolicyDrop {
        group: Option<GroupId>,
        handle: String,
        refusal: PolicyRefusal,
    },
    /// A newer policy of this member's subnet is in force.
    PolicyUpdated { version: u64 },
    /// Someone sent an invite (credential + KeyPackage).
    InviteReceived { handle: String },
    /// Everything else from the groups (joined, members added/removed, refused, …).
    Group(GroupEvent),
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
/// from one handle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Conversation<'a> {
    Group(&'a [u8]),
    Direct(&'a str),
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
    /// `signing_secret` is the Ed25519 secret whose public key `credential` names;
    /// `policy` the newest policy of the credential's subnet.
    pub fn new(
        signing_secret: [u8; 32],
        credential: &SignedCredential,
        policy: Policy,
        config: MessengerConfig,
        now_ms: u64,
    ) -> Result<Self, MessengerError> {
        let groups = GroupManager::new(signing_secret, credential, policy, config.groups, now_ms)?;
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
            credential: self.credential().to_bytes(),
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

    /// Sends a signed 1:1 message to `to`, if this member's policy allows it.
    pub fn send_direct(
        &mut self,
        to: &MemberCredential,
        options: MessageOptions,
        body: &[u8],
        now_ms: u64,
    ) -> Result<(), MessengerError> {
        self.check_send(to, Some(&options), now_ms)?;
        self.dangerously_send_direct_ignoring_policy(to, options, body);
        Ok(())
    }

    /// What a modified client does: sends without asking its own policy. For demos and
    /// tests of recipient-side enforcement only.
    pub fn dangerously_send_direct_ignoring_policy(
        &mut self,
        to: &MemberCredential,
        options: MessageOptions,
        body: &[u8],
    ) {
        let msg = DirectMessage::sign(
            &self.key,
            self.credential().to_bytes(),
            &to.signing_key(),
            options,
            body.to_vec(),
        );
        self.stats.direct_sent += 1;
        self.dirty = true;
        self.outgoing.push_back(Outgoing {
            to: contact_of(to),
            what: OutgoingWhat::Direct,
            bytes: Envelope::Direct(msg).encode(),
        });
    }

    /// Sends this member's invite to `to` (who may then add it to a group).
    pub fn send_invite(
        &mut self,
        to: &MemberCredential,
        now_ms: u64,
    ) -> Result<(), MessengerError> {
        self.check_send(to, None, now_ms)?;
        let invite = self.invite()?;
        self.outgoing.push_back(Outgoing {
            to: contact_of(to),
            what: OutgoingWhat::Invite,
            bytes: Envelope::Invite(invite).encode(),
        });
        Ok(())
    }

    /// Invites received over the network, oldest first.
    pub fn received_invites(&self) -> &[ReceivedInvite] {
        &self.invites
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
            let cred = UncheckedCredential::parse(&i.credential)?
                .check_signature()?
                .ignore_validity();
            self.check_send(&cred, None, now_ms)?;
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
    ) -> Result<(), MessengerError> {
        let result = self.groups.send(group, options, body, now_ms);
        if matches!(result, Err(GroupError::Policy { .. })) {
            self.stats.sends_refused += 1;
        }
        if result.is_ok() {
            self.stats.group_sent += 1;
        }
        self.after_group_call(result, now_ms)
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
            Ok(Envelope::Invite(i)) => self.on_invite(i),
            Err(_) => self.stats.malformed += 1,
        }
        self.pump_groups(now_ms);
    }

    fn on_direct(&mut self, d: DirectMessage, now_ms: u64) {
        let Ok(cred) = UncheckedCredential::parse(&d.credential)
            .and_then(UncheckedCredential::check_signature)
            .map(|c| c.ignore_validity())
        else {
            self.stats.malformed += 1;
            return;
        };
        if !d.verify(&cred.signing_key(), &self.credential().signing_key()) {
            self.stats.malformed += 1;
            return;
        }
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
        self.store(&cred, None, d.options, d.body, now_ms);
    }

    fn store(
        &mut self,
        from: &MemberCredential,
        group: Option<GroupId>,
        options: MessageOptions,
        body: Vec<u8>,
        now_ms: u64,
    ) {
        let id = self.next_id;
        self.next_id += 1;
        self.events.push_back(MessengerEvent::Message {
            id,
            from: from.handle().into(),
            group: group.clone(),
            body: body.clone(),
        });
        self.inbox.push(StoredMessage {
            id,
            from: from.handle().into(),
            from_subnet: from.subnet(),
            group,
            body,
            received_unix_ms: now_ms,
            expires_unix_ms: now_ms.saturating_add(options.ttl_secs.saturating_mul(1000)),
            burn_on_read: options.burn_on_read,
            read: false,
        });
        if self.inbox.len() > self.config.max_inbox {
            let extra = self.inbox.len() - self.config.max_inbox;
            self.inbox.drain(..extra);
        }
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

    fn on_invite(&mut self, invite: Invite) {
        let Ok(cred) = UncheckedCredential::parse(&invite.credential)
            .and_then(UncheckedCredential::check_signature)
            .map(|c| c.ignore_validity())
        else {
            self.stats.malformed += 1;
            return;
        };
        self.stats.invites_received += 1;
        if self.invites.len() >= self.config.max_invites {
            self.invites.remove(0);
        }
        self.events.push_back(MessengerEvent::InviteReceived {
            handle: cred.handle().into(),
        });
        self.invites.push(ReceivedInvite {
            handle: cred.handle().into(),
            subnet: cred.subnet(),
            credential: invite.credential,
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
                for r in &out.recipients {
                    self.outgoing.push_back(Outgoing {
                        to: contact_of(r),
                        what: OutgoingWhat::Group(out.kind),
                        bytes: env.clone(),
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
                        self.store(&from, Some(group), options, body, now_ms);
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
        let expiry = self.inbox.iter().map(|m| m.expires_unix_ms).min();
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
        m.dirty = false;
        m.expire(now_ms);
        Ok(m)
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

//! End-to-end encrypted groups with MLS (RFC 9420, `openmls`), checked against subnet
//! policy.
//!
//! [`GroupManager`] is sans-IO: bytes in ([`GroupManager::handle_message`]), bytes out
//! ([`GroupManager::poll_outgoing`], each with the members it must reach), events out
//! ([`GroupManager::poll_event`]), timers by [`GroupManager::poll_timeout`] /
//! [`GroupManager::handle_timeout`] with the caller's clock (unix milliseconds). The
//! bytes travel through [`crate::ClientCore::send_message`], fragmented, one copy per
//! recipient; nothing here knows about packets.
//!
//! # Credentials
//! A member's MLS credential is a `BasicCredential` whose identity is a [`MemberCard`]:
//! the admin-signed credential and the member's own [`shoal_subnet::AddressBinding`]
//! (signed by the credential's `signing_key`, which must also be the MLS signature
//! key). Group traffic for a member goes only where its binding says, so an admin
//! cannot redirect it. Every member checks every other leaf — on a Welcome, after every
//! commit, and on every application message — with its **own** subnet's policy
//! ([`Policy::may_share_group`] / [`Policy::may_receive`]). A group that policy forbids
//! is refused: a Welcome is not joined, and a commit bringing in a forbidden member
//! makes this member drop the group ([`GroupEvent::Refused`]). A leaf that appears with
//! a handle some other leaf already has (an admin minting a second credential for an
//! existing person, or a look-alike of another subnet) is reported as
//! [`GroupEvent::DuplicateHandle`], never merged silently into the known identity.
//!
//! # Concurrent commits: an order nobody can grind, after a settle window
//! Shoal has no delivery service to order commits, so two members may commit in the
//! same epoch. The rule:
//! 1. A commit (own or received) for the current epoch is not applied at once. It is
//!    held until `commit_settle_ms` after the first commit for that epoch was seen.
//! 2. At the deadline, every member ranks the held commits the same way and applies
//!    the first that verifies; the others are dropped. The rank (see `order.rs`) puts
//!    an admin-proven de-provisioning first and the commits of a proven-revoked author
//!    last, then a removal before the commits of the member it removes, then a per-epoch
//!    order of the authors' leaves ([`commit_rank`]) that was fixed before the epoch
//!    began. No part of it depends on the commit's bytes, so making many candidate
//!    commits (the old rule was "lowest hash wins") gains nothing. A member's own commit
//!    that lost yields [`GroupEvent::OwnCommitLost`], and its author re-issues the
//!    change in the next epoch. A Welcome is released only when its commit wins, so an
//!    invitee never joins a losing branch.
//! 3. Every application message carries, in its authenticated data, an 8-byte check of
//!    the sender's epoch authenticator. A receiver whose authenticator for that epoch
//!    differs reports [`GroupEvent::Diverged`] and delivers nothing. A commit for an
//!    epoch already decided that would have beaten the applied one means this member
//!    decided too early (the settle window was shorter than the delivery spread); that
//!    is reported as [`GroupEvent::Diverged`] too. So a fork is never silent.
//!
//! The settle window must exceed the spread of commit delivery times between members
//! (mix delays plus mailbox pull interval); members offline for longer see every
//! commit of the epoch in their mailbox at once and decide correctly.
//!
//! # Persistence
//! [`GroupManager::snapshot`] serialises the openmls in-memory store (every group's
//! state and keys) with this manager's own per-group state; [`GroupManager::restore`]
//! loads it. The caller stores the bytes (e.g. in the client's redb store).

use std::collections::{BTreeMap, VecDeque};

use openmls::prelude::tls_codec::{Deserialize as _, Serialize as _};
use openmls::prelude::*;
use openmls_basic_credential::SignatureKeyPair;
use openmls_rust_crypto::OpenMlsRustCrypto;
use serde::{Deserialize, Serialize};
use sha2_0_11::{Digest, Sha256};
use shoal_subnet::{
    AddressBinding, BindingBody, MemberCard, MemberCredential, MessageOptions, Policy,
    PolicyRefusal, SignedCredential,
};
use shoal_topology::Hex32;
use zeroize::{Zeroize, Zeroizing};

use crate::Contact;

mod order;
pub use order::commit_rank;
use order::{CommitClaim, Decided, MAX_HELD, MAX_PROOF};

const CIPHERSUITE: Ciphersuite = Ciphersuite::MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519;
const EPOCH_CHECK_DOMAIN: &[u8] = b"shoal group epoch check";
/// Epochs whose secrets are kept, so messages sent just before a commit still open.
const MAX_PAST_EPOCHS: usize = 4;

/// A group's id as carried on the wire.
pub type GroupId = Vec<u8>;

/// Settings for all groups of one member.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupConfig {
    /// How long commits for one epoch are collected before the winner is applied.
    pub commit_settle_ms: u64,
}

impl Default for GroupConfig {
    fn default() -> Self {
        GroupConfig {
            commit_settle_ms: 30_000,
        }
    }
}

/// Why a group operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GroupError {
    #[error("malformed {what}: {reason}")]
    Malformed { what: &'static str, reason: String },
    #[error("membership credential: {0}")]
    Credential(#[from] shoal_subnet::SubnetError),
    #[error("policy refuses {handle:?}: {refusal}")]
    Policy {
        handle: String,
        refusal: PolicyRefusal,
    },
    #[error("MLS leaf key does not match the key in its membership credential")]
    KeyMismatch,
    /// This member's own credential names a seal key, mailbox or gateway that is not
    /// its own: an admin trying to redirect its messages.
    #[error("own membership credential names a {field} that is not this client's own")]
    NotOwnAddress { field: &'static str },
    #[error("no such group")]
    UnknownGroup,
    #[error("no member {0:?} in this group")]
    UnknownMember(String),
    #[error("a commit of this member is already waiting to settle")]
    CommitPending,
    #[error("group state diverged from the sender's (epoch {epoch})")]
    Diverged { epoch: u64 },
    #[error("MLS: {0}")]
    Mls(String),
    #[error("internal error: {0}")]
    Internal(String),
}

fn mls<E: std::fmt::Debug>(e: E) -> GroupError {
    GroupError::Mls(format!("{e:?}"))
}

/// A member as this client sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberInfo {
    pub leaf: u32,
    pub credential: MemberCredential,
    /// The member's card (credential and its own address binding).
    pub card: MemberCard,
}

impl MemberInfo {
    fn new(leaf: u32, card: MemberCard) -> Self {
        MemberInfo {
            leaf,
            credential: card.credential().clone(),
            card,
        }
    }
    /// Where to send this member's copy of group traffic.
    pub fn contact(&self) -> Contact {
        contact_of(&self.card)
    }
}

/// The [`Contact`] a member card's binding names: signed by the member's own identity
/// key, never the admin's word.
pub fn contact_of(card: &MemberCard) -> Contact {
    let b = card.binding().body();
    Contact {
        mailbox: b.mailbox.0,
        gateway: b.gateway.0,
        public_key: b.seal_key.0,
    }
}

/// Refuses an own credential whose (non-zero) address fields are not this client's:
/// nobody trusts them, but an admin writing foreign ones is attacking, so say so.
fn check_own_addresses(cred: &MemberCredential, own: &Contact) -> Result<(), GroupError> {
    let b = cred.body();
    for (field, stated, mine) in [
        ("seal key", b.seal_key.0, own.public_key),
        ("mailbox", b.mailbox.0, own.mailbox),
        ("gateway", b.gateway.0, own.gateway),
    ] {
        if stated != [0; 32] && stated != mine {
            return Err(GroupError::NotOwnAddress { field });
        }
    }
    Ok(())
}

/// Bytes to send, and to whom.
#[derive(Debug, Clone)]
pub struct GroupOutgoing {
    pub group: GroupId,
    pub kind: OutgoingKind,
    pub bytes: Vec<u8>,
    /// Each gets one copy via `ClientCore::send_message`, at its card's binding.
    pub recipients: Vec<MemberCard>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutgoingKind {
    Application,
    Commit,
    Welcome,
    Proposal,
}

/// What happened, for the application.
// Events are few (one per message or epoch) and moved once, so boxing the credential
// variants would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum GroupEvent {
    Joined {
        group: GroupId,
    },
    Message {
        group: GroupId,
        from: MemberCredential,
        options: MessageOptions,
        body: Vec<u8>,
    },
    /// The group moved to a new epoch (a commit was applied).
    EpochChanged {
        group: GroupId,
        epoch: u64,
    },
    MemberAdded {
        group: GroupId,
        member: MemberInfo,
    },
    MemberRemoved {
        group: GroupId,
        member: MemberInfo,
    },
    /// A leaf's signature key changed (its credential was replaced).
    KeyChanged {
        group: GroupId,
        member: MemberInfo,
    },
    /// A new leaf claims a handle (of a subnet) that another leaf already holds, with a
    /// different key: a second device, or an admin impersonating the person.
    DuplicateHandle {
        group: GroupId,
        existing: MemberInfo,
        new: MemberInfo,
    },
    /// This member's commit lost to a concurrent one; re-issue the change.
    OwnCommitLost {
        group: GroupId,
        epoch: u64,
    },
    /// This member's state no longer matches another member's (see module docs).
    Diverged {
        group: GroupId,
        epoch: u64,
    },
    /// Policy forbids this group (or a commit made it so); it was dropped.
    Refused {
        group: GroupId,
        handle: String,
        refusal: PolicyRefusal,
    },
    /// This member was removed from the group, or left.
    Removed {
        group: GroupId,
    },
    /// A message dropped because policy refuses its sender or options, counted.
    PolicyDrop {
        group: GroupId,
        handle: String,
        refusal: PolicyRefusal,
    },
}

/// Counters (for metrics and tests).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupStats {
    pub policy_drops: u64,
    pub commits_applied: u64,
    pub commits_lost: u64,
    pub stale_commits: u64,
    pub divergences: u64,
    pub malformed: u64,
}

/// A commit waiting for its epoch to settle.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct HeldCommit {
    hash: [u8; 32],
    bytes: Vec<u8>,
    own: bool,
    /// The Welcome to release if this (own) commit wins.
    welcome: Option<Vec<u8>>,
    /// Members to send the Welcome to.
    invitees: Vec<Vec<u8>>,
    /// What the commit states about itself (see `order.rs`).
    #[serde(default)]
    claim: Option<CommitClaim>,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct GroupMeta {
    held: Vec<HeldCommit>,
    settle_at: Option<u64>,
    /// How each recent epoch was decided.
    #[serde(default)]
    decided: BTreeMap<u64, Decided>,
    /// Epoch check of recent epochs.
    checks: BTreeMap<u64, [u8; 8]>,
    /// Leaf index → member card bytes, as last validated.
    known: BTreeMap<u32, Vec<u8>>,
}

/// All MLS groups of one member.
pub struct GroupManager {
    provider: OpenMlsRustCrypto,
    signer: SignatureKeyPair,
    signing_secret: Zeroizing<[u8; 32]>,
    me: MemberCredential,
    /// `me` with this member's own address binding: what its leaves carry.
    card: MemberCard,
    policy: Policy,
    config: GroupConfig,
    groups: BTreeMap<GroupId, (MlsGroup, GroupMeta)>,
    events: VecDeque<GroupEvent>,
    outgoing: VecDeque<GroupOutgoing>,
    stats: GroupStats,
}

impl std::fmt::Debug for GroupManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupManager")
            .field("groups", &self.groups.len())
            .field("stats", &self.stats)
            .finish()
    }
}

#[derive(Serialize, Deserialize)]
struct Snapshot {
    /// Wiped on drop (see the `Drop` below); the serialized snapshot is the caller's to
    /// protect.
    signing_secret: Vec<u8>,
    /// This member's card (credential and own binding).
    card: Vec<u8>,
    policy: Vec<u8>,
    config: GroupConfig,
    store: Vec<(Vec<u8>, Vec<u8>)>,
    groups: Vec<(GroupId, GroupMeta)>,
    stats: GroupStats,
}

impl Drop for Snapshot {
    fn drop(&mut self) {
        self.signing_secret.zeroize();
    }
}

fn epoch_check(ea: &[u8]) -> [u8; 8] {
    let mut h = Sha256::new();
    h.update(EPOCH_CHECK_DOMAIN);
    h.update(ea);
    let d = h.finalize();
    let mut out = [0; 8];
    out.copy_from_slice(&d[..8]);
    out
}

fn hash(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

fn ser(msg: &MlsMessageOut) -> Result<Vec<u8>, GroupError> {
    msg.tls_serialize_detached()
        .map_err(|e| GroupError::Internal(format!("serialize: {e:?}")))
}

fn encode_app(opts: &MessageOptions, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(9 + body.len());
    out.extend_from_slice(&opts.ttl_secs.to_be_bytes());
    out.push(u8::from(opts.burn_on_read));
    out.extend_from_slice(body);
    out
}

fn decode_app(bytes: &[u8]) -> Option<(MessageOptions, Vec<u8>)> {
    if bytes.len() < 9 {
        return None;
    }
    let ttl = u64::from_be_bytes(bytes[..8].try_into().ok()?);
    let burn = match bytes[8] {
        0 => false,
        1 => true,
        _ => return None,
    };
    Some((
        MessageOptions {
            ttl_secs: ttl,
            burn_on_read: burn,
        },
        bytes[9..].to_vec(),
    ))
}

impl GroupManager {
    /// `signing_secret` is the Ed25519 identity secret whose public key `credential`
    /// names; `own` is where this client is reached (its seal key, mailbox, gateway),
    /// which this member signs into its own address binding. A credential naming
    /// another key or other addresses is refused.
    pub fn new(
        signing_secret: [u8; 32],
        own: Contact,
        credential: &SignedCredential,
        policy: Policy,
        config: GroupConfig,
        now_ms: u64,
    ) -> Result<Self, GroupError> {
        let me = MemberCredential::verify(&credential.to_bytes(), now_ms / 1000)?;
        let signing_secret = Zeroizing::new(signing_secret);
        let key = ed25519_dalek::SigningKey::from_bytes(&signing_secret);
        let public = key.verifying_key().to_bytes();
        if public != me.signing_key() {
            return Err(GroupError::KeyMismatch);
        }
        check_own_addresses(&me, &own)?;
        let binding = AddressBinding::sign(
            &key,
            BindingBody {
                subnet: me.subnet(),
                identity_key: Hex32(public),
                seal_key: Hex32(own.public_key),
                mailbox: Hex32(own.mailbox),
                gateway: Hex32(own.gateway),
                sequence: now_ms,
            },
        )?;
        let card = MemberCard::new(me.clone(), binding)?;
        let signer = SignatureKeyPair::from_raw(
            CIPHERSUITE.signature_algorithm(),
            signing_secret.to_vec(),
            public.to_vec(),
        );
        Ok(GroupManager {
            provider: OpenMlsRustCrypto::default(),
            signer,
            signing_secret,
            me,
            card,
            policy,
            config,
            groups: BTreeMap::new(),
            events: VecDeque::new(),
            outgoing: VecDeque::new(),
            stats: GroupStats::default(),
        })
    }

    pub fn credential(&self) -> &MemberCredential {
        &self.me
    }
    /// This member's card: its credential with its own address binding.
    pub fn card(&self) -> &MemberCard {
        &self.card
    }
    pub fn stats(&self) -> GroupStats {
        self.stats
    }
    /// The newest policy of this member's subnet that it holds.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }
    /// The member's Ed25519 secret (it signs leaves and direct messages).
    pub(crate) fn signing_secret(&self) -> &[u8; 32] {
        &self.signing_secret
    }
    /// Replaces the policy with a newer one of the same subnet.
    pub fn update_policy(&mut self, newer: Policy) -> Result<(), GroupError> {
        Ok(self.policy.update(newer)?)
    }

    fn credential_with_key(&self) -> CredentialWithKey {
        CredentialWithKey {
            credential: BasicCredential::new(self.card.to_bytes()).into(),
            signature_key: self.signer.public().into(),
        }
    }

    /// A fresh KeyPackage carrying this member's credential: the group half of an
    /// invite (the other half is the contact card). Single use.
    pub fn key_package(&mut self) -> Result<Vec<u8>, GroupError> {
        let bundle = KeyPackage::builder()
            .build(
                CIPHERSUITE,
                &self.provider,
                &self.signer,
                self.credential_with_key(),
            )
            .map_err(mls)?;
        bundle
            .key_package()
            .tls_serialize_detached()
            .map_err(|e| GroupError::Internal(format!("{e:?}")))
    }

    /// Checks one leaf: credential and binding signatures, key binding, own policy at
    /// `now_ms`.
    fn check_leaf(
        &self,
        credential: &Credential,
        signature_key: &[u8],
        now_ms: u64,
    ) -> Result<MemberCard, GroupError> {
        let basic =
            BasicCredential::try_from(credential.clone()).map_err(|e| GroupError::Malformed {
                what: "MLS credential",
                reason: format!("{e:?}"),
            })?;
        let card = MemberCard::parse(basic.identity())?;
        let cred = card.credential();
        if cred.signing_key().as_slice() != signature_key {
            return Err(GroupError::KeyMismatch);
        }
        if cred.signing_key() != self.me.signing_key() {
            self.policy
                .may_share_group(&self.me, cred, now_ms / 1000)
                .map_err(|refusal| GroupError::Policy {
                    handle: cred.handle().into(),
                    refusal,
                })?;
        }
        Ok(card)
    }

    fn join_config() -> MlsGroupJoinConfig {
        MlsGroupJoinConfig::builder()
            .use_ratchet_tree_extension(true)
            .max_past_epochs(MAX_PAST_EPOCHS)
            .build()
    }

    /// Creates a group with only this member.
    pub fn create_group(&mut self, now_ms: u64) -> Result<GroupId, GroupError> {
        let config = MlsGroupCreateConfig::builder()
            .ciphersuite(CIPHERSUITE)
            .use_ratchet_tree_extension(true)
            .max_past_epochs(MAX_PAST_EPOCHS)
            .build();
        let group = MlsGroup::new(
            &self.provider,
            &self.signer,
            &config,
            self.credential_with_key(),
        )
        .map_err(mls)?;
        let id = group.group_id().as_slice().to_vec();
        let mut meta = GroupMeta::default();
        meta.known
            .insert(group.own_leaf_index().u32(), self.card.to_bytes());
        self.groups.insert(id.clone(), (group, meta));
        self.after_epoch_change(&id, now_ms);
        Ok(id)
    }

    pub fn group_ids(&self) -> Vec<GroupId> {
        self.groups.keys().cloned().collect()
    }

    pub fn epoch(&self, group: &[u8]) -> Option<u64> {
        self.groups.get(group).map(|(g, _)| g.epoch().as_u64())
    }

    /// When the commits held for `group`'s current epoch are decided (unix ms), if any
    /// are held.
    pub fn settle_at(&self, group: &[u8]) -> Option<u64> {
        self.groups.get(group).and_then(|(_, m)| m.settle_at)
    }

    pub fn epoch_authenticator(&self, group: &[u8]) -> Option<Vec<u8>> {
        self.groups
            .get(group)
            .map(|(g, _)| g.epoch_authenticator().as_slice().to_vec())
    }

    /// Current members, as their cards (unchecked for expiry).
    pub fn members(&self, group: &[u8]) -> Vec<MemberInfo> {
        let Some((g, _)) = self.groups.get(group) else {
            return Vec::new();
        };
        g.members()
            .filter_map(|m| {
                let basic = BasicCredential::try_from(m.credential).ok()?;
                let card = MemberCard::parse(basic.identity()).ok()?;
                Some(MemberInfo::new(m.index.u32(), card))
            })
            .collect()
    }

    fn others(&self, group: &[u8]) -> Vec<MemberCard> {
        let me = self.me.signing_key();
        self.members(group)
            .into_iter()
            .filter(|m| m.credential.signing_key() != me)
            .map(|m| m.card)
            .collect()
    }

    fn own_commit_held(&self, group: &[u8]) -> bool {
        self.groups
            .get(group)
            .is_some_and(|(_, m)| m.held.iter().any(|h| h.own))
    }

    /// Holds an own commit (just created, pending in openmls) until the epoch settles.
    fn hold_own_commit(
        &mut self,
        group: &[u8],
        commit: Vec<u8>,
        welcome: Option<Vec<u8>>,
        invitees: Vec<Vec<u8>>,
        claim: CommitClaim,
        now_ms: u64,
    ) -> Result<(), GroupError> {
        let recipients = self.others(group);
        let settle = self.config.commit_settle_ms;
        let (_, meta) = self.groups.get_mut(group).ok_or(GroupError::UnknownGroup)?;
        meta.held.push(HeldCommit {
            hash: hash(&commit),
            bytes: commit.clone(),
            own: true,
            welcome,
            invitees,
            claim: Some(claim),
        });
        meta.settle_at.get_or_insert(now_ms + settle);
        self.outgoing.push_back(GroupOutgoing {
            group: group.to_vec(),
            kind: OutgoingKind::Commit,
            bytes: commit,
            recipients,
        });
        Ok(())
    }

    /// Test only: takes back this member's held commit for `group` and its queued copy,
    /// as an attacker does between candidates when grinding (openmls forgets its pending
    /// commit, so another can be made).
    #[cfg(test)]
    pub(crate) fn dangerously_withdraw_own_commit(&mut self, group: &[u8]) {
        if let Some((g, meta)) = self.groups.get_mut(group) {
            let _ = g.clear_pending_commit(self.provider.storage());
            meta.held.retain(|c| !c.own);
            if meta.held.is_empty() {
                meta.settle_at = None;
            }
        }
        self.outgoing
            .retain(|o| !(o.group == group && o.kind == OutgoingKind::Commit));
    }

    /// Sets the claim (see `order.rs`) of the commit about to be made in `group`, which
    /// removes `removed` and, as every openmls commit here carries the pending
    /// proposals, the leaves whose leave requests are pending; with this member's policy
    /// as the proof if that policy revokes one of them.
    fn claim_next_commit(
        &mut self,
        group: &[u8],
        mut removed: Vec<u32>,
    ) -> Result<CommitClaim, GroupError> {
        let (g, _) = self.groups.get(group).ok_or(GroupError::UnknownGroup)?;
        removed.extend(g.pending_proposals().filter_map(|p| match p.proposal() {
            Proposal::Remove(r) => Some(r.removed().u32()),
            _ => None,
        }));
        let revokes = self
            .members(group)
            .iter()
            .any(|m| removed.contains(&m.leaf) && self.policy.is_revoked(&m.credential));
        let proof = self.policy.signed().to_bytes();
        let proof = (revokes && proof.len() <= MAX_PROOF).then_some(proof);
        let (g, _) = self.groups.get_mut(group).ok_or(GroupError::UnknownGroup)?;
        let claim = CommitClaim::new(g.own_leaf_index().u32(), removed, proof);
        g.set_aad(claim.encode());
        Ok(claim)
    }

    /// Invites the owners of `key_packages` (from their invites), in one commit. The
    /// commit goes out at once; the Welcome only once the commit has won its epoch.
    pub fn add_members(
        &mut self,
        group: &[u8],
        key_packages: &[&[u8]],
        now_ms: u64,
    ) -> Result<(), GroupError> {
        if self.own_commit_held(group) {
            return Err(GroupError::CommitPending);
        }
        let mut kps = Vec::with_capacity(key_packages.len());
        let mut invitees = Vec::with_capacity(key_packages.len());
        for bytes in key_packages {
            let (kp, card) = self.checked_key_package(bytes, now_ms)?;
            invitees.push(card.to_bytes());
            kps.push(kp);
        }
        let claim = self.claim_next_commit(group, Vec::new())?;
        let (g, _) = self.groups.get_mut(group).ok_or(GroupError::UnknownGroup)?;
        let (commit, welcome, _) = g
            .add_members(&self.provider, &self.signer, &kps)
            .map_err(|e| unclaim(g, e))?;
        let (commit, welcome) = (ser(&commit)?, ser(&welcome)?);
        self.hold_own_commit(group, commit, Some(welcome), invitees, claim, now_ms)
    }

    /// The card a KeyPackage's leaf carries, checked as a leaf would be (signatures,
    /// key, own policy): what adding it would really bring in.
    pub fn key_package_card(&self, bytes: &[u8], now_ms: u64) -> Result<MemberCard, GroupError> {
        self.checked_key_package(bytes, now_ms)
            .map(|(_, card)| card)
    }

    /// A KeyPackage decoded, validated and with its leaf's card checked.
    fn checked_key_package(
        &self,
        bytes: &[u8],
        now_ms: u64,
    ) -> Result<(KeyPackage, MemberCard), GroupError> {
        let kp = KeyPackageIn::tls_deserialize_exact(bytes)
            .map_err(|e| GroupError::Malformed {
                what: "key package",
                reason: format!("{e:?}"),
            })?
            .validate(self.provider.crypto(), ProtocolVersion::Mls10)
            .map_err(mls)?;
        let leaf = kp.leaf_node();
        let card = self.check_leaf(leaf.credential(), leaf.signature_key().as_slice(), now_ms)?;
        Ok((kp, card))
    }

    /// Invites one member; see [`Self::add_members`].
    pub fn add_member(
        &mut self,
        group: &[u8],
        key_package: &[u8],
        now_ms: u64,
    ) -> Result<(), GroupError> {
        self.add_members(group, &[key_package], now_ms)
    }

    fn leaf_of(&self, group: &[u8], handle: &str) -> Result<LeafNodeIndex, GroupError> {
        self.members(group)
            .into_iter()
            .find(|m| {
                m.credential.handle() == handle
                    && m.credential.signing_key() != self.me.signing_key()
            })
            .map(|m| LeafNodeIndex::new(m.leaf))
            .ok_or_else(|| GroupError::UnknownMember(handle.into()))
    }

    /// Removes the leaves at `leaves`.
    pub fn remove_leaves(
        &mut self,
        group: &[u8],
        leaves: &[u32],
        now_ms: u64,
    ) -> Result<(), GroupError> {
        if self.own_commit_held(group) {
            return Err(GroupError::CommitPending);
        }
        let claim = self.claim_next_commit(group, leaves.to_vec())?;
        let leaves: Vec<_> = leaves.iter().map(|l| LeafNodeIndex::new(*l)).collect();
        let (g, _) = self.groups.get_mut(group).ok_or(GroupError::UnknownGroup)?;
        let provider = &self.provider;
        let (commit, _, _) = g
            .remove_members(provider, &self.signer, &leaves)
            .map_err(|e| unclaim(g, e))?;
        let commit = ser(&commit)?;
        self.hold_own_commit(group, commit, None, Vec::new(), claim, now_ms)
    }

    /// Removes the member with `handle` (every leaf but this member's own is looked at).
    pub fn remove_member(
        &mut self,
        group: &[u8],
        handle: &str,
        now_ms: u64,
    ) -> Result<(), GroupError> {
        let leaf = self.leaf_of(group, handle)?;
        self.remove_leaves(group, &[leaf.u32()], now_ms)
    }

    /// Removes the member whose identity key is `key` (unambiguous, unlike a handle).
    pub fn remove_key(
        &mut self,
        group: &[u8],
        key: &[u8; 32],
        now_ms: u64,
    ) -> Result<(), GroupError> {
        let leaf = self
            .members(group)
            .into_iter()
            .find(|m| m.credential.signing_key() == *key && *key != self.me.signing_key())
            .map(|m| m.leaf)
            .ok_or_else(|| GroupError::UnknownMember(hex_short(key)))?;
        self.remove_leaves(group, &[leaf], now_ms)
    }

    /// Members this member's policy now refuses (revoked, expired, no longer
    /// federated): the leaves to remove at the next commit.
    pub fn refused_members(&self, group: &[u8], now_ms: u64) -> Vec<MemberInfo> {
        let me = self.me.signing_key();
        self.members(group)
            .into_iter()
            .filter(|m| {
                m.credential.signing_key() != me
                    && self
                        .policy
                        .may_share_group(&self.me, &m.credential, now_ms / 1000)
                        .is_err()
            })
            .collect()
    }

    /// Commits the removal of every member policy now refuses; `Ok(false)` if none.
    pub fn remove_refused(&mut self, group: &[u8], now_ms: u64) -> Result<bool, GroupError> {
        let leaves: Vec<u32> = self
            .refused_members(group, now_ms)
            .iter()
            .map(|m| m.leaf)
            .collect();
        if leaves.is_empty() {
            return Ok(false);
        }
        self.remove_leaves(group, &leaves, now_ms)?;
        Ok(true)
    }

    /// Fresh leaf keys for post-compromise security.
    pub fn self_update(&mut self, group: &[u8], now_ms: u64) -> Result<(), GroupError> {
        if self.own_commit_held(group) {
            return Err(GroupError::CommitPending);
        }
        let claim = self.claim_next_commit(group, Vec::new())?;
        let (g, _) = self.groups.get_mut(group).ok_or(GroupError::UnknownGroup)?;
        let provider = &self.provider;
        let bundle = g
            .self_update(provider, &self.signer, LeafNodeParameters::default())
            .map_err(|e| unclaim(g, e))?;
        let commit = ser(bundle.commit())?;
        self.hold_own_commit(group, commit, None, Vec::new(), claim, now_ms)
    }

    /// Asks to leave: sends a remove proposal that the next commit by any other member
    /// carries out ([`GroupEvent::Removed`] follows then).
    pub fn leave(&mut self, group: &[u8]) -> Result<(), GroupError> {
        let recipients = self.others(group);
        let (g, _) = self.groups.get_mut(group).ok_or(GroupError::UnknownGroup)?;
        let provider = &self.provider;
        g.set_aad(Vec::new());
        let proposal = g.leave_group(provider, &self.signer).map_err(mls)?;
        let bytes = ser(&proposal)?;
        self.outgoing.push_back(GroupOutgoing {
            group: group.to_vec(),
            kind: OutgoingKind::Proposal,
            bytes,
            recipients,
        });
        Ok(())
    }

    /// Commits pending proposals (e.g. someone's leave request).
    pub fn commit_pending(&mut self, group: &[u8], now_ms: u64) -> Result<bool, GroupError> {
        if self.own_commit_held(group) {
            return Err(GroupError::CommitPending);
        }
        let (g, _) = self.groups.get_mut(group).ok_or(GroupError::UnknownGroup)?;
        if g.pending_proposals().next().is_none() {
            return Ok(false);
        }
        let claim = self.claim_next_commit(group, Vec::new())?;
        let (g, _) = self.groups.get_mut(group).ok_or(GroupError::UnknownGroup)?;
        let provider = &self.provider;
        let (commit, _, _) = g
            .commit_to_pending_proposals(provider, &self.signer)
            .map_err(|e| unclaim(g, e))?;
        let commit = ser(&commit)?;
        self.hold_own_commit(group, commit, None, Vec::new(), claim, now_ms)?;
        Ok(true)
    }

    /// Encrypts `body` to the group, after checking policy for every recipient.
    pub fn send(
        &mut self,
        group: &[u8],
        options: MessageOptions,
        body: &[u8],
        now_ms: u64,
    ) -> Result<(), GroupError> {
        self.policy
            .check_options(&options)
            .map_err(|refusal| GroupError::Policy {
                handle: self.me.handle().into(),
                refusal,
            })?;
        let recipients = self.others(group);
        for r in &recipients {
            let r = r.credential();
            self.policy
                .may_send(&self.me, r, now_ms / 1000)
                .map_err(|refusal| GroupError::Policy {
                    handle: r.handle().into(),
                    refusal,
                })?;
        }
        let (g, _) = self.groups.get_mut(group).ok_or(GroupError::UnknownGroup)?;
        g.set_aad(epoch_check(g.epoch_authenticator().as_slice()).to_vec());
        let provider = &self.provider;
        let msg = g
            .create_message(provider, &self.signer, &encode_app(&options, body))
            .map_err(mls)?;
        let bytes = ser(&msg)?;
        self.outgoing.push_back(GroupOutgoing {
            group: group.to_vec(),
            kind: OutgoingKind::Application,
            bytes,
            recipients,
        });
        Ok(())
    }

    /// Takes any group bytes that arrived (Welcome, commit, proposal, application).
    pub fn handle_message(&mut self, bytes: &[u8], now_ms: u64) -> Result<(), GroupError> {
        let msg = MlsMessageIn::tls_deserialize_exact(bytes).map_err(|e| {
            self.stats.malformed += 1;
            GroupError::Malformed {
                what: "MLS message",
                reason: format!("{e:?}"),
            }
        })?;
        match msg.extract() {
            MlsMessageBodyIn::Welcome(w) => self.handle_welcome(w, now_ms),
            MlsMessageBodyIn::PrivateMessage(m) => {
                // The epoch check is in the clear, so a divergent state is reported
                // before (and instead of) a decryption failure.
                if m.content_type() == ContentType::Application {
                    let id = m.group_id().as_slice().to_vec();
                    let epoch = m.epoch().as_u64();
                    let expected = self
                        .groups
                        .get(&id)
                        .and_then(|(_, meta)| meta.checks.get(&epoch));
                    if expected.is_some_and(|c| c.as_slice() != m.aad()) {
                        self.stats.divergences += 1;
                        self.events
                            .push_back(GroupEvent::Diverged { group: id, epoch });
                        return Err(GroupError::Diverged { epoch });
                    }
                }
                let aad = m.aad().to_vec();
                self.handle_protocol(m.into(), &aad, bytes, now_ms)
            }
            // Shoal's groups send handshakes encrypted; a plaintext one carries no
            // claim that can be read here, so a commit among them is refused.
            MlsMessageBodyIn::PublicMessage(m) => {
                self.handle_protocol(m.into(), &[], bytes, now_ms)
            }
            _ => {
                self.stats.malformed += 1;
                Err(GroupError::Malformed {
                    what: "MLS message",
                    reason: "not a Welcome or group message".into(),
                })
            }
        }
    }

    fn handle_welcome(&mut self, welcome: Welcome, now_ms: u64) -> Result<(), GroupError> {
        let staged =
            StagedWelcome::new_from_welcome(&self.provider, &Self::join_config(), welcome, None)
                .map_err(mls)?;
        let mut known = BTreeMap::new();
        for m in staged.members() {
            match self.check_leaf(&m.credential, &m.signature_key, now_ms) {
                Ok(c) => {
                    known.insert(m.index.u32(), c.to_bytes());
                }
                Err(GroupError::Policy { handle, refusal }) => {
                    let group = staged.group_context().group_id().as_slice().to_vec();
                    self.events.push_back(GroupEvent::Refused {
                        group,
                        handle: handle.clone(),
                        refusal: refusal.clone(),
                    });
                    return Err(GroupError::Policy { handle, refusal });
                }
                Err(e) => return Err(e),
            }
        }
        let group = staged.into_group(&self.provider).map_err(mls)?;
        let id = group.group_id().as_slice().to_vec();
        let meta = GroupMeta {
            known,
            ..GroupMeta::default()
        };
        self.groups.insert(id.clone(), (group, meta));
        self.events
            .push_back(GroupEvent::Joined { group: id.clone() });
        self.after_epoch_change(&id, now_ms);
        Ok(())
    }

    fn handle_protocol(
        &mut self,
        msg: ProtocolMessage,
        aad: &[u8],
        bytes: &[u8],
        now_ms: u64,
    ) -> Result<(), GroupError> {
        let id = msg.group_id().as_slice().to_vec();
        let epoch = msg.epoch().as_u64();
        let settle = self.config.commit_settle_ms;
        let (g, meta) = self.groups.get_mut(&id).ok_or(GroupError::UnknownGroup)?;
        let current = g.epoch().as_u64();
        if msg.content_type() == ContentType::Commit {
            let h = hash(bytes);
            let claim = match CommitClaim::decode(aad) {
                Ok(c) => c,
                Err(e) => {
                    self.stats.malformed += 1;
                    return Err(e);
                }
            };
            if epoch < current {
                // A commit for an epoch already decided.
                if meta
                    .decided
                    .get(&epoch)
                    .is_some_and(|d| d.beaten_by(&id, epoch, &claim, h))
                {
                    self.stats.divergences += 1;
                    self.events
                        .push_back(GroupEvent::Diverged { group: id, epoch });
                } else {
                    self.stats.stale_commits += 1;
                }
                return Ok(());
            }
            if epoch > current {
                // From a branch this member has not seen: it missed a commit.
                self.stats.divergences += 1;
                self.events
                    .push_back(GroupEvent::Diverged { group: id, epoch });
                return Err(GroupError::Diverged { epoch });
            }
            if !meta.held.iter().any(|c| c.hash == h) {
                if meta.held.len() >= MAX_HELD {
                    self.stats.malformed += 1;
                    return Err(GroupError::Malformed {
                        what: "commit",
                        reason: "too many commits held for this epoch".into(),
                    });
                }
                meta.held.push(HeldCommit {
                    hash: h,
                    bytes: bytes.to_vec(),
                    own: false,
                    welcome: None,
                    invitees: Vec::new(),
                    claim: Some(claim),
                });
            }
            meta.settle_at.get_or_insert(now_ms + settle);
            return Ok(());
        }
        // Application messages and proposals.
        let processed = g.process_message(&self.provider, msg).map_err(|e| {
            if epoch == current {
                GroupError::Mls(format!("{e:?}"))
            } else {
                GroupError::Mls(format!("epoch {epoch} (at {current}): {e:?}"))
            }
        })?;
        let sender_leaf = match processed.sender() {
            Sender::Member(l) => Some(*l),
            _ => None,
        };
        let aad = processed.aad().to_vec();
        let cred = processed.credential().clone();
        let sig_key = sender_leaf
            .and_then(|l| g.member_at(l))
            .map(|m| m.signature_key)
            .unwrap_or_default();
        match processed.into_content() {
            ProcessedMessageContent::ApplicationMessage(app) => {
                if let Some(expected) = meta.checks.get(&epoch)
                    && aad.as_slice() != expected.as_slice()
                {
                    self.stats.divergences += 1;
                    self.events
                        .push_back(GroupEvent::Diverged { group: id, epoch });
                    return Err(GroupError::Diverged { epoch });
                }
                let from = match self.check_leaf(&cred, &sig_key, now_ms) {
                    Ok(c) => c.credential().clone(),
                    Err(GroupError::Policy { handle, refusal }) => {
                        self.policy_drop(id, handle, refusal);
                        return Ok(());
                    }
                    Err(e) => return Err(e),
                };
                let from_check = self.policy.may_receive(&self.me, &from, now_ms / 1000);
                let Some((options, body)) = decode_app(&app.into_bytes()) else {
                    self.stats.malformed += 1;
                    return Err(GroupError::Malformed {
                        what: "group message body",
                        reason: "short or bad options".into(),
                    });
                };
                if let Err(refusal) = from_check.and_then(|()| self.policy.check_options(&options))
                {
                    self.policy_drop(id, from.handle().into(), refusal);
                    return Ok(());
                }
                self.events.push_back(GroupEvent::Message {
                    group: id,
                    from,
                    options,
                    body,
                });
            }
            ProcessedMessageContent::ProposalMessage(p) => {
                // Only self-removal (leave) requests are taken from others.
                if let Proposal::Remove(r) = p.proposal()
                    && Some(r.removed()) == sender_leaf
                {
                    g.store_pending_proposal(self.provider.storage(), *p)
                        .map_err(mls)?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn policy_drop(&mut self, group: GroupId, handle: String, refusal: PolicyRefusal) {
        self.stats.policy_drops += 1;
        self.events.push_back(GroupEvent::PolicyDrop {
            group,
            handle,
            refusal,
        });
    }

    /// The next instant `handle_timeout` must be called at, if any.
    pub fn poll_timeout(&self) -> Option<u64> {
        self.groups.values().filter_map(|(_, m)| m.settle_at).min()
    }

    /// Applies the winning commit of every group whose settle window has passed.
    pub fn handle_timeout(&mut self, now_ms: u64) {
        let due: Vec<GroupId> = self
            .groups
            .iter()
            .filter(|(_, (_, m))| m.settle_at.is_some_and(|t| t <= now_ms))
            .map(|(id, _)| id.clone())
            .collect();
        for id in due {
            self.settle(&id, now_ms);
        }
    }

    fn settle(&mut self, id: &[u8], now_ms: u64) {
        let Some((g, meta)) = self.groups.get_mut(id) else {
            return;
        };
        let epoch = g.epoch().as_u64();
        let held = std::mem::take(&mut meta.held);
        meta.settle_at = None;
        let had_own = held.iter().any(|c| c.own);
        // A held commit without a claim (restored from before the claims) cannot be
        // ranked by every member alike: it is dropped.
        let held: Vec<(CommitClaim, HeldCommit)> = held
            .into_iter()
            .filter_map(|c| Some((c.claim.clone()?, c)))
            .collect();
        let members = leaf_credentials(g);
        let claims: Vec<(&CommitClaim, [u8; 32])> =
            held.iter().map(|(claim, c)| (claim, c.hash)).collect();
        let (keys, revoked) = order::order(id, epoch, &members, &claims);
        let removals = held
            .iter()
            .map(|(claim, _)| (claim.author, claim.removed.clone()))
            .collect();
        let mut ranked: Vec<_> = keys.into_iter().zip(held).collect();
        ranked.sort_by_key(|a| a.0);
        // The first that verifies wins; verification is the same for every member.
        let mut winner = None;
        for (key, (claim, c)) in ranked {
            if c.own {
                winner = Some((key, claim, c));
                break;
            }
            let Ok(msg) = MlsMessageIn::tls_deserialize_exact(&c.bytes) else {
                continue;
            };
            let Ok(pm) = msg.try_into_protocol_message() else {
                continue;
            };
            let Ok(p) = g.process_message(&self.provider, pm) else {
                self.stats.malformed += 1;
                continue;
            };
            let sender = p.sender().clone();
            let ProcessedMessageContent::StagedCommitMessage(staged) = p.into_content() else {
                continue;
            };
            if !claim_holds(&claim, &sender, &staged) {
                // A false claim: dropped by every member alike.
                self.stats.malformed += 1;
                continue;
            }
            // Our own (lower-ranked) commit must go before another is merged.
            if g.pending_commit().is_some()
                && g.clear_pending_commit(self.provider.storage()).is_err()
            {
                return;
            }
            if g.merge_staged_commit(&self.provider, *staged).is_err() {
                return;
            }
            winner = Some((key, claim, c));
            break;
        }
        let Some((key, claim, w)) = winner else {
            return;
        };
        if w.own && g.merge_pending_commit(&self.provider).is_err() {
            return;
        }
        meta.decided.insert(
            epoch,
            Decided {
                winner: key,
                winner_author: claim.author,
                revoked,
                removals,
            },
        );
        if w.own {
            if let Some(welcome) = w.welcome {
                let recipients = w
                    .invitees
                    .iter()
                    .filter_map(|b| MemberCard::parse(b).ok())
                    .collect();
                self.outgoing.push_back(GroupOutgoing {
                    group: id.to_vec(),
                    kind: OutgoingKind::Welcome,
                    bytes: welcome,
                    recipients,
                });
            }
        } else if had_own {
            self.stats.commits_lost += 1;
            self.events.push_back(GroupEvent::OwnCommitLost {
                group: id.to_vec(),
                epoch,
            });
        }
        while meta.decided.len() > MAX_PAST_EPOCHS {
            meta.decided.pop_first();
        }
        self.stats.commits_applied += 1;
        self.after_epoch_change(id, now_ms);
    }
    /// After any epoch change: record the epoch check, diff and validate the members.
    fn after_epoch_change(&mut self, id: &[u8], now_ms: u64) {
        let Some((g, meta)) = self.groups.get_mut(id) else {
            return;
        };
        if !g.is_active() {
            let _ = g.delete(self.provider.storage());
            self.groups.remove(id);
            self.events
                .push_back(GroupEvent::Removed { group: id.to_vec() });
            return;
        }
        let epoch = g.epoch().as_u64();
        meta.checks
            .insert(epoch, epoch_check(g.epoch_authenticator().as_slice()));
        while meta.checks.len() > MAX_PAST_EPOCHS + 1 {
            meta.checks.pop_first();
        }
        let old = std::mem::take(&mut meta.known);
        let leaves: Vec<(u32, Credential, Vec<u8>)> = g
            .members()
            .map(|m| (m.index.u32(), m.credential, m.signature_key))
            .collect();
        let group = id.to_vec();
        self.events.push_back(GroupEvent::EpochChanged {
            group: group.clone(),
            epoch,
        });
        let mut known = BTreeMap::new();
        let mut refused = None;
        let mut infos = Vec::new();
        for (leaf, cred, key) in leaves {
            match self.check_leaf(&cred, &key, now_ms) {
                Ok(c) => {
                    known.insert(leaf, c.to_bytes());
                    infos.push(MemberInfo::new(leaf, c));
                }
                Err(GroupError::Policy { handle, refusal }) => {
                    refused.get_or_insert((handle, refusal));
                }
                Err(e) => {
                    refused.get_or_insert((
                        format!("leaf {leaf}"),
                        PolicyRefusal::UnknownRole {
                            role: e.to_string(),
                        },
                    ));
                }
            }
        }
        for (leaf, bytes) in &old {
            if !known.contains_key(leaf)
                && let Ok(c) = MemberCard::parse(bytes)
            {
                self.events.push_back(GroupEvent::MemberRemoved {
                    group: group.clone(),
                    member: MemberInfo::new(*leaf, c),
                });
            }
        }
        for m in &infos {
            match old.get(&m.leaf) {
                Some(b) if *b == m.card.to_bytes() => {}
                Some(_) => self.events.push_back(GroupEvent::KeyChanged {
                    group: group.clone(),
                    member: m.clone(),
                }),
                None if !old.is_empty() || m.credential.signing_key() != self.me.signing_key() => {
                    // Same handle, any subnet: a look-alike from a federated subnet
                    // is as dangerous as a second key in one's own.
                    if let Some(existing) = infos.iter().find(|o| {
                        o.leaf != m.leaf && o.credential.handle() == m.credential.handle()
                    }) {
                        self.events.push_back(GroupEvent::DuplicateHandle {
                            group: group.clone(),
                            existing: existing.clone(),
                            new: m.clone(),
                        });
                    }
                    self.events.push_back(GroupEvent::MemberAdded {
                        group: group.clone(),
                        member: m.clone(),
                    });
                }
                None => {}
            }
        }
        if let Some((handle, refusal)) = refused {
            // Policy forbids the group as it now is: drop it, loudly.
            if let Some((g, _)) = self.groups.get_mut(id) {
                let _ = g.delete(self.provider.storage());
            }
            self.groups.remove(id);
            self.events.push_back(GroupEvent::Refused {
                group,
                handle,
                refusal,
            });
            return;
        }
        if let Some((_, meta)) = self.groups.get_mut(id) {
            meta.known = known;
        }
    }

    pub fn poll_event(&mut self) -> Option<GroupEvent> {
        self.events.pop_front()
    }

    pub fn poll_outgoing(&mut self) -> Option<GroupOutgoing> {
        self.outgoing.pop_front()
    }

    /// Everything needed to continue after a restart, including secret keys: store it
    /// encrypted at rest.
    pub fn snapshot(&self) -> Result<Vec<u8>, GroupError> {
        let store = self
            .provider
            .storage()
            .values
            .read()
            .map_err(|_| GroupError::Internal("store lock poisoned".into()))?
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let snap = Snapshot {
            signing_secret: self.signing_secret.to_vec(),
            card: self.card.to_bytes(),
            policy: self.policy.signed().to_bytes(),
            config: self.config,
            store,
            groups: self
                .groups
                .iter()
                .map(|(id, (_, m))| (id.clone(), m.clone()))
                .collect(),
            stats: self.stats,
        };
        serde_json::to_vec(&snap).map_err(|e| GroupError::Internal(e.to_string()))
    }

    /// Loads a [`Self::snapshot`].
    pub fn restore(bytes: &[u8], now_ms: u64) -> Result<Self, GroupError> {
        let bad = |reason: String| GroupError::Malformed {
            what: "group snapshot",
            reason,
        };
        let mut snap: Snapshot = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
        let secret: Zeroizing<[u8; 32]> = Zeroizing::new(
            snap.signing_secret
                .as_slice()
                .try_into()
                .map_err(|_| bad("signing secret length".into()))?,
        );
        let card = MemberCard::parse(&snap.card)?;
        let me = card.credential().clone();
        let policy = Policy::verify(&snap.policy, &me.subnet())?;
        let public = ed25519_dalek::SigningKey::from_bytes(&secret)
            .verifying_key()
            .to_bytes();
        if public != me.signing_key() {
            return Err(GroupError::KeyMismatch);
        }
        let signer = SignatureKeyPair::from_raw(
            CIPHERSUITE.signature_algorithm(),
            secret.to_vec(),
            me.signing_key().to_vec(),
        );
        let provider = OpenMlsRustCrypto::default();
        {
            let mut values = provider
                .storage()
                .values
                .write()
                .map_err(|_| GroupError::Internal("store lock poisoned".into()))?;
            values.extend(std::mem::take(&mut snap.store));
        }
        let mut groups = BTreeMap::new();
        for (id, meta) in std::mem::take(&mut snap.groups) {
            let g = MlsGroup::load(
                provider.storage(),
                &openmls::group::GroupId::from_slice(&id),
            )
            .map_err(mls)?
            .ok_or_else(|| bad("group missing from store".into()))?;
            groups.insert(id, (g, meta));
        }
        let _ = now_ms;
        Ok(GroupManager {
            provider,
            signer,
            signing_secret: secret,
            me,
            card,
            policy,
            config: snap.config,
            groups,
            events: VecDeque::new(),
            outgoing: VecDeque::new(),
            stats: snap.stats,
        })
    }
}

/// Undoes a claim set for a commit that could not be made, so it does not ride on the
/// next message.
fn unclaim<E: std::fmt::Debug>(g: &mut MlsGroup, e: E) -> GroupError {
    g.set_aad(Vec::new());
    mls(e)
}

/// Every current leaf's membership credential (leaves without a readable card are
/// skipped: they prove and are proven nothing).
fn leaf_credentials(g: &MlsGroup) -> Vec<(u32, MemberCredential)> {
    g.members()
        .filter_map(|m| {
            let basic = BasicCredential::try_from(m.credential).ok()?;
            let card = MemberCard::parse(basic.identity()).ok()?;
            Some((m.index.u32(), card.credential().clone()))
        })
        .collect()
}

/// Does an opened commit do what its claim said: sent by the claimed author, removing
/// exactly the claimed leaves?
fn claim_holds(claim: &CommitClaim, sender: &Sender, staged: &StagedCommit) -> bool {
    let mut removed: Vec<u32> = staged
        .remove_proposals()
        .map(|p| p.remove_proposal().removed().u32())
        .collect();
    removed.sort_unstable();
    removed.dedup();
    *sender == Sender::Member(LeafNodeIndex::new(claim.author)) && removed == claim.removed
}

/// The first 4 bytes of a key in hex: enough for a person to tell keys apart in a
/// list, never used to decide anything.
pub fn hex_short(key: &[u8]) -> String {
    key.iter().take(4).map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests;

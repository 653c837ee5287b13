//! Directory authority logic, sans-IO: collect descriptors, build the same document
//! as every other authority from the same inputs, sign it, gather the others'
//! signatures, and publish only with at least k of them.
//!
//! Agreement comes from determinism: authorities exchange descriptors (union, newest
//! wins per node) until their inputs match, so their bodies match byte for byte and
//! their signatures combine. A document that reached the threshold is final for its
//! body; an authority that built a different body adopts the published one without
//! signing it. See the crate README for how competing documents resolve.

use std::collections::{BTreeMap, BTreeSet};

use ed25519_dalek::SigningKey;
use sha2::{Digest, Sha256};

use crate::document::AuthoritySignature;
use crate::{
    Admission, AuthoritySet, Descriptor, DocumentBody, EpochSchedule, Hex32, MAX_DESCRIPTOR_BYTES,
    NetworkParams, NodeEntry, NodeId, Role, SignedDescriptor, SignedDocument, TopologyError,
    UncheckedDocument,
};

/// An authority's configuration. All but the two timing fields must be identical at
/// every authority of a network, or their documents will not match.
#[derive(Debug, Clone, PartialEq)]
pub struct AuthorityConfig {
    pub authorities: AuthoritySet,
    pub schedule: EpochSchedule,
    pub params: NetworkParams,
    /// A descriptor published more than this before an epoch starts is left out of
    /// that epoch's document. This is the liveness rule: a node that stops
    /// re-publishing (dead, or cut off from the authorities) drops out of the first
    /// document voted more than `descriptor_max_age_secs - vote_lead_secs` after its
    /// last descriptor. Must exceed `vote_lead_secs`; see
    /// [`default_descriptor_max_age_secs`].
    pub descriptor_max_age_secs: u64,
    /// Vote for epoch e+1 this many seconds before it starts.
    pub vote_lead_secs: u64,
    /// After startup, collect descriptors this long before voting on any epoch with no
    /// published document (see [`Authority::epochs_to_vote`]).
    pub bootstrap_delay_secs: u64,
    /// The operators whose nodes this authority takes, with their caps. Must list the
    /// same operators at every authority (see [`crate::operator`]).
    pub admission: Admission,
}

/// Why an authority refused a descriptor. Each reason has its own counter
/// ([`Authority::refusals`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum Refusal {
    /// Longer than [`MAX_DESCRIPTOR_BYTES`].
    Oversized,
    /// Not a descriptor, or its content is out of range.
    Malformed,
    /// No operator certificate.
    NoCertificate,
    /// The certificate's operator is not admitted here.
    UnknownOperator,
    /// The certificate is for another node or role, or its signature is bad.
    BadCertificate,
    /// The node's own signature is bad.
    BadSignature,
    /// Published in the future.
    FromTheFuture,
    /// The operator already has its `max_nodes` nodes here.
    OperatorCap,
}

impl Refusal {
    pub const ALL: [Refusal; 8] = [
        Refusal::Oversized,
        Refusal::Malformed,
        Refusal::NoCertificate,
        Refusal::UnknownOperator,
        Refusal::BadCertificate,
        Refusal::BadSignature,
        Refusal::FromTheFuture,
        Refusal::OperatorCap,
    ];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Oversized => "oversized",
            Refusal::Malformed => "malformed",
            Refusal::NoCertificate => "no_certificate",
            Refusal::UnknownOperator => "unknown_operator",
            Refusal::BadCertificate => "bad_certificate",
            Refusal::BadSignature => "bad_signature",
            Refusal::FromTheFuture => "from_the_future",
            Refusal::OperatorCap => "operator_cap",
        }
    }

    /// What the node operator should hear.
    fn explain(self) -> &'static str {
        match self {
            Refusal::Oversized => "the descriptor is too large",
            Refusal::Malformed => "the descriptor is malformed",
            Refusal::NoCertificate => {
                "the descriptor carries no operator certificate (shoal operator certify)"
            }
            Refusal::UnknownOperator => {
                "its operator is not admitted by this authority (shoal authority operator admit)"
            }
            Refusal::BadCertificate => {
                "the operator certificate is not for this node and role, or its signature is bad"
            }
            Refusal::BadSignature => "the node's signature is bad",
            Refusal::FromTheFuture => "published in the future (check the node's clock)",
            Refusal::OperatorCap => "its operator already runs as many nodes as it is admitted for",
        }
    }
}

#[derive(Debug)]
struct Ballot {
    body: String,
    parsed: DocumentBody,
    signatures: BTreeMap<[u8; 32], AuthoritySignature>,
}

/// Whether a node is in an epoch's document, and why not.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Inclusion {
    /// Listed; relays with their layer.
    Included { layer: Option<u8> },
    /// Its newest descriptor is older than the epoch accepts (the node stopped
    /// re-publishing, or its clock is behind).
    Stale {
        published_unix: u64,
        oldest_accepted_unix: u64,
    },
    /// Its descriptor announces no Sphinx key for the epoch.
    NoKeyForEpoch,
    /// Usable now, but the epoch's document was agreed before its descriptor arrived; it
    /// will be in a later one.
    NotInPublished,
    /// Its operator has more nodes, or more relays in its layer, than it is admitted
    /// for; the ones with the highest identities (or ranks, per layer) stay out.
    OperatorCap,
}

/// One line of [`Authority::roster`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RosterEntry {
    pub identity: Hex32,
    pub role: Role,
    pub link_addr: String,
    /// The version its descriptor states, when it states one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(flatten)]
    pub inclusion: Inclusion,
}

/// Epochs a stale descriptor is kept (and reported by the roster) before it is forgotten.
pub const STALE_KEPT_EPOCHS: u64 = 2;

/// Republish periods a live node may miss (a lost post, a slow loop under load) before
/// the next vote leaves it out.
pub const LIVENESS_PERIODS: u64 = 4;

/// The `descriptor_max_age_secs` `shoal authority init` writes: the vote lead plus
/// [`LIVENESS_PERIODS`] republish periods ([`EpochSchedule::republish_secs`]).
///
/// At the moment an authority votes for epoch e (`vote_lead_secs` before it starts) a
/// node is listed only if it published within the last `LIVENESS_PERIODS` periods, so a
/// live node has that many chances and a dead one is gone from the first document voted
/// a quarter of an epoch after it died: from e+1 if it died more than that before the
/// vote for e+1, else from e+2 (the document for e+1 was already final).
pub fn default_descriptor_max_age_secs(schedule: &EpochSchedule, vote_lead_secs: u64) -> u64 {
    vote_lead_secs.saturating_add(LIVENESS_PERIODS.saturating_mul(schedule.republish_secs()))
}

/// Why descriptor `d` cannot be in `epoch`'s document, if it cannot. The one rule
/// `build_body` and `roster` share.
fn exclusion(d: &Descriptor, epoch: u64, oldest_accepted_unix: u64) -> Option<Inclusion> {
    if d.published_unix < oldest_accepted_unix {
        Some(Inclusion::Stale {
            published_unix: d.published_unix,
            oldest_accepted_unix,
        })
    } else if d.key_for(epoch).is_none() {
        Some(Inclusion::NoKeyForEpoch)
    } else {
        None
    }
}

/// One authority's state.
#[derive(Debug)]
pub struct Authority {
    key: SigningKey,
    config: AuthorityConfig,
    descriptors: BTreeMap<NodeId, (SignedDescriptor, Descriptor)>,
    ballots: BTreeMap<u64, Ballot>,
    published: BTreeMap<u64, Published>,
    accepted: u64,
    refused: BTreeMap<Refusal, u64>,
}

/// A document with at least k signatures, and its parsed body.
#[derive(Debug)]
struct Published {
    doc: SignedDocument,
    body: DocumentBody,
}

impl Authority {
    pub fn new(key: SigningKey, config: AuthorityConfig) -> Result<Self, TopologyError> {
        config.authorities.validate()?;
        config.params.validate()?;
        if config.schedule.length_secs == 0 {
            return Err(TopologyError::Invalid {
                what: "epoch schedule",
                reason: "length_secs must be at least 1".into(),
            });
        }
        if config.vote_lead_secs >= config.schedule.length_secs {
            return Err(TopologyError::Invalid {
                what: "vote_lead_secs",
                reason: "must be shorter than an epoch".into(),
            });
        }
        // The cutoff for epoch e is start(e) - max_age and we vote at start(e) - lead:
        // with max_age <= lead every descriptor would have to come from the future.
        if config.descriptor_max_age_secs <= config.vote_lead_secs {
            return Err(TopologyError::Invalid {
                what: "descriptor_max_age_secs",
                reason: "must exceed vote_lead_secs, or no node is fresh when votes are cast"
                    .into(),
            });
        }
        let me = Hex32(key.verifying_key().to_bytes());
        if !config.authorities.keys.contains(&me) {
            return Err(TopologyError::Invalid {
                what: "authority key",
                reason: "not in the configured authority set".into(),
            });
        }
        Ok(Authority {
            key,
            config,
            descriptors: BTreeMap::new(),
            ballots: BTreeMap::new(),
            published: BTreeMap::new(),
            accepted: 0,
            refused: BTreeMap::new(),
        })
    }

    pub fn id(&self) -> NodeId {
        self.key.verifying_key().to_bytes()
    }

    pub fn config(&self) -> &AuthorityConfig {
        &self.config
    }

    /// Takes a descriptor as posted: refuses it before parsing if it is too large.
    pub fn handle_descriptor_bytes(
        &mut self,
        bytes: &[u8],
        now_unix: u64,
    ) -> Result<bool, TopologyError> {
        if bytes.len() > MAX_DESCRIPTOR_BYTES {
            return Err(self.refuse(Refusal::Oversized));
        }
        match SignedDescriptor::from_json(bytes) {
            Ok(d) => self.handle_descriptor(d, now_unix),
            Err(_) => Err(self.refuse(Refusal::Malformed)),
        }
    }

    fn refuse(&mut self, why: Refusal) -> TopologyError {
        *self.refused.entry(why).or_default() += 1;
        TopologyError::Refused {
            reason: why.as_str(),
            detail: why.explain(),
        }
    }

    /// Accepts a node's descriptor if it carries a good certificate from an admitted
    /// operator that is under its cap, its signature checks and it is newer than what
    /// we hold. Returns whether it changed our inputs. Every refusal is counted.
    ///
    /// The cheap checks come first (size, an admitted operator: a map lookup), so a
    /// flood from unknown operators costs no signature verification.
    pub fn handle_descriptor(
        &mut self,
        signed: SignedDescriptor,
        now_unix: u64,
    ) -> Result<bool, TopologyError> {
        if signed.body.len() > MAX_DESCRIPTOR_BYTES {
            return Err(self.refuse(Refusal::Oversized));
        }
        let Some(cert) = signed.certificate.clone() else {
            return Err(self.refuse(Refusal::NoCertificate));
        };
        let Some(operator) = self.config.admission.get(&cert.operator) else {
            return Err(self.refuse(Refusal::UnknownOperator));
        };
        let max_nodes = operator.max_nodes as usize;
        let d = match signed.check() {
            Ok(d) => d,
            Err(TopologyError::BadSignature { .. }) => {
                return Err(self.refuse(Refusal::BadSignature));
            }
            Err(_) => return Err(self.refuse(Refusal::Malformed)),
        };
        if cert.node != d.identity || cert.role != d.role || !cert.verify() {
            return Err(self.refuse(Refusal::BadCertificate));
        }
        if d.published_unix > now_unix.saturating_add(300) {
            return Err(self.refuse(Refusal::FromTheFuture));
        }
        // Newest wins; equal timestamps fall back to the signed bytes, so the merged
        // set does not depend on the order descriptors arrived in.
        if let Some((old_signed, old)) = self.descriptors.get(&d.id())
            && (old.published_unix, old_signed.body.as_str())
                >= (d.published_unix, signed.body.as_str())
        {
            return Ok(false);
        }
        // The operator's cap: it keeps its `max_nodes` smallest identities, whatever
        // order they arrived in, so every authority ends up holding the same ones.
        if !self.descriptors.contains_key(&d.id()) {
            let held: Vec<NodeId> = self
                .descriptors
                .iter()
                .filter(|(_, (s, _))| {
                    s.certificate.as_ref().map(|c| c.operator) == Some(cert.operator)
                })
                .map(|(id, _)| *id)
                .collect();
            if held.len() >= max_nodes {
                match held.iter().max() {
                    Some(largest) if *largest > d.id() => {
                        let largest = *largest;
                        self.descriptors.remove(&largest);
                    }
                    _ => return Err(self.refuse(Refusal::OperatorCap)),
                }
            }
        }
        self.accepted += 1;
        self.descriptors.insert(d.id(), (signed, d));
        Ok(true)
    }

    /// Replaces the admitted operators (the authority's `operators.toml` changed):
    /// forgets the descriptors of operators no longer admitted, and trims the others
    /// to their new caps.
    pub fn set_admission(&mut self, admission: Admission) {
        self.config.admission = admission;
        let mut per_operator: BTreeMap<Hex32, usize> = BTreeMap::new();
        // BTreeMap order is by identity, so each operator keeps its smallest ones.
        let admission = &self.config.admission;
        self.descriptors.retain(|_, (s, _)| {
            let Some(op) = s.certificate.as_ref().map(|c| c.operator) else {
                return false;
            };
            let Some(admitted) = admission.get(&op) else {
                return false;
            };
            let n = per_operator.entry(op).or_default();
            *n += 1;
            *n <= admitted.max_nodes as usize
        });
    }

    /// Admits one more operator (or replaces its caps).
    pub fn admit(&mut self, operator: crate::AdmittedOperator) -> Result<(), TopologyError> {
        let mut ops: Vec<_> = self
            .config
            .admission
            .operators()
            .filter(|o| o.key != operator.key)
            .cloned()
            .collect();
        ops.push(operator);
        self.set_admission(Admission::new(ops)?);
        Ok(())
    }

    /// What `/v1/network` serves: the schedule, parameters and authority set, signed
    /// by this authority.
    pub fn network_description(&self) -> Result<crate::SignedNetwork, TopologyError> {
        crate::SignedNetwork::sign(
            &self.key,
            &crate::NetworkBody {
                schedule: self.config.schedule,
                params: self.config.params.clone(),
                authorities: self.config.authorities.clone(),
            },
        )
    }

    /// Descriptors taken since start.
    pub fn accepted(&self) -> u64 {
        self.accepted
    }

    /// Descriptors refused since start, by reason.
    pub fn refusals(&self) -> Vec<(Refusal, u64)> {
        Refusal::ALL
            .iter()
            .map(|r| (*r, self.refused.get(r).copied().unwrap_or(0)))
            .collect()
    }

    /// Descriptors held. Never more than the admitted operators' `max_nodes` summed.
    pub fn descriptor_count(&self) -> usize {
        self.descriptors.len()
    }

    /// Forgets descriptors too old to appear in the document of the current epoch or
    /// any later one, [`STALE_KEPT_EPOCHS`] epochs after that, so that meanwhile
    /// [`Authority::roster`] can still say a vanished node was left out as stale.
    pub fn expire_descriptors(&mut self, now_unix: u64) {
        let keep = STALE_KEPT_EPOCHS.saturating_mul(self.config.schedule.length_secs);
        let oldest = self
            .oldest_accepted(self.config.schedule.epoch_at(now_unix))
            .saturating_sub(keep);
        self.descriptors
            .retain(|_, (_, d)| d.published_unix >= oldest);
    }

    /// The descriptors we hold, for peers to merge.
    pub fn descriptors(&self) -> Vec<SignedDescriptor> {
        self.descriptors.values().map(|(s, _)| s.clone()).collect()
    }

    /// The oldest `published_unix` `epoch`'s document accepts.
    fn oldest_accepted(&self, epoch: u64) -> u64 {
        self.config
            .schedule
            .start_of(epoch)
            .saturating_sub(self.config.descriptor_max_age_secs)
    }

    fn previous(&self, epoch: u64) -> Option<&DocumentBody> {
        epoch
            .checked_sub(1)
            .and_then(|p| self.published.get(&p))
            .map(|p| &p.body)
    }

    /// Every node we hold a descriptor for or that `epoch`'s document lists, and whether
    /// (and why not) it is in that document: the published one if there is one, else the
    /// body our current inputs build. For operators asking "why is my node not in?".
    pub fn roster(&self, epoch: u64) -> Vec<RosterEntry> {
        let oldest = self.oldest_accepted(epoch);
        let published = self.published.get(&epoch).map(|p| &p.body);
        let body = match published {
            Some(b) => b.clone(),
            None => self.build_body(epoch),
        };
        let capped = self.select(epoch).capped;
        let listed: BTreeMap<NodeId, &NodeEntry> =
            body.nodes.iter().map(|n| (n.identity.0, n)).collect();
        let mut out: BTreeMap<NodeId, RosterEntry> = BTreeMap::new();
        for (id, (_, d)) in &self.descriptors {
            let inclusion = match (listed.get(id), exclusion(d, epoch, oldest)) {
                (Some(n), _) => Inclusion::Included { layer: n.layer },
                (None, Some(why)) => why,
                (None, None) if capped.contains(id) => Inclusion::OperatorCap,
                (None, None) => Inclusion::NotInPublished,
            };
            out.insert(
                *id,
                RosterEntry {
                    identity: d.identity,
                    role: d.role,
                    link_addr: d.link_addr.clone(),
                    version: d.version.clone(),
                    inclusion,
                },
            );
        }
        for (id, n) in listed {
            out.entry(id).or_insert_with(|| RosterEntry {
                identity: n.identity,
                role: n.role,
                link_addr: n.link_addr.clone(),
                version: None,
                inclusion: Inclusion::Included { layer: n.layer },
            });
        }
        out.into_values().collect()
    }

    /// What `epoch`'s document would list from our inputs: the usable descriptors
    /// within their operators' caps, the relays' layers, the shared randomness, and the
    /// usable nodes the caps leave out. Pure and deterministic; `build_body` and
    /// `roster` share it.
    fn select(&self, epoch: u64) -> Selection<'_> {
        let oldest = self.oldest_accepted(epoch);
        let admission = &self.config.admission;
        let mut per_operator: BTreeMap<Hex32, usize> = BTreeMap::new();
        let mut capped = BTreeSet::new();
        let mut kept: Vec<(&Descriptor, Hex32)> = Vec::new();
        // In identity order: an operator over `max_nodes` keeps its smallest identities.
        for (id, (s, d)) in &self.descriptors {
            if exclusion(d, epoch, oldest).is_some() {
                continue;
            }
            let op = operator_of(s);
            let max = admission.get(&op).map_or(0, |o| o.max_nodes as usize);
            let n = per_operator.entry(op).or_default();
            *n += 1;
            if *n > max {
                capped.insert(*id);
            } else {
                kept.push((d, op));
            }
        }
        let prev = self.previous(epoch);
        let ids: Vec<&Descriptor> = kept.iter().map(|(d, _)| *d).collect();
        let shared_random = shared_random(epoch, prev.map(|p| p.shared_random.0), &ids);
        let prior: BTreeMap<NodeId, u8> = prev
            .map(|p| {
                p.nodes
                    .iter()
                    .filter_map(|n| n.layer.map(|l| (n.identity.0, l)))
                    .collect()
            })
            .unwrap_or_default();
        let relays: Vec<(NodeId, Hex32)> = kept
            .iter()
            .filter(|(d, _)| d.role == Role::Relay)
            .map(|(d, op)| (d.id(), *op))
            .collect();
        let per_layer = |op: &Hex32| admission.get(op).map_or(0, |o| o.max_per_layer as usize);
        let layers = assign_layers(
            &relays,
            &prior,
            shoal_packet::MIX_LAYERS,
            &shared_random,
            &per_layer,
        );
        for (id, _) in &relays {
            if !layers.contains_key(id) {
                capped.insert(*id);
            }
        }
        kept.retain(|(d, _)| !capped.contains(&d.id()));
        Selection {
            nodes: kept,
            layers,
            shared_random,
            capped,
        }
    }

    /// Builds the body for `epoch` from our current inputs. Pure and deterministic.
    pub fn build_body(&self, epoch: u64) -> DocumentBody {
        let schedule = &self.config.schedule;
        let sel = self.select(epoch);
        let nodes = sel
            .nodes
            .iter()
            .map(|(d, op)| NodeEntry {
                identity: d.identity,
                role: d.role,
                layer: sel.layers.get(&d.id()).copied(),
                link_addr: d.link_addr.clone(),
                sphinx_keys: d
                    .sphinx_keys
                    .iter()
                    .filter(|k| k.epoch == epoch || k.epoch == epoch + 1)
                    .cloned()
                    .collect(),
                operator: *op,
            })
            .collect();
        DocumentBody {
            epoch,
            valid_after: schedule
                .start_of(epoch)
                .saturating_sub(schedule.length_secs),
            valid_until: schedule
                .end_of(epoch)
                .saturating_add(self.config.params.key_grace_secs),
            schedule: *schedule,
            layers: shoal_packet::MIX_LAYERS as u8,
            params: self.config.params.clone(),
            shared_random: Hex32(sel.shared_random),
            nodes,
        }
    }

    /// Builds (or rebuilds, if inputs changed) our body for `epoch` and signs it.
    ///
    /// A published epoch is final: we return our signature in it, or sign it now if our
    /// own inputs build exactly that body; otherwise we refuse, so we never vouch for a
    /// body we did not build.
    pub fn vote(&mut self, epoch: u64) -> Result<AuthoritySignature, TopologyError> {
        let me = self.id();
        if let Some(p) = self.published.get(&epoch) {
            if let Some(s) = p.doc.signatures.iter().find(|s| s.authority.0 == me) {
                return Ok(s.clone());
            }
            if self.build_body(epoch).to_bytes()? != p.doc.body {
                return Err(TopologyError::Invalid {
                    what: "vote",
                    reason: format!(
                        "our inputs for epoch {epoch} differ from its published document"
                    ),
                });
            }
            let sig = AuthoritySignature::sign(&self.key, &p.doc.body);
            self.add_signature(epoch, sig.clone());
            return Ok(sig);
        }
        let parsed = self.build_body(epoch);
        // A published document is final for its epoch: one that routes nothing (an
        // empty layer, no gateway) would leave every node that arrives a little later
        // out for a whole epoch. Wait for a usable network instead.
        if let Some(missing) = missing_for_routing(&parsed) {
            return Err(TopologyError::Invalid {
                what: "vote",
                reason: format!("no usable network for epoch {epoch} yet: {missing}"),
            });
        }
        let body = parsed.to_bytes()?;
        let keep = self.ballots.get(&epoch).is_some_and(|b| b.body == body);
        if !keep {
            self.ballots.insert(
                epoch,
                Ballot {
                    body: body.clone(),
                    parsed,
                    signatures: BTreeMap::new(),
                },
            );
        }
        let sig = AuthoritySignature::sign(&self.key, &body);
        if let Some(b) = self.ballots.get_mut(&epoch) {
            b.signatures.insert(me, sig.clone());
        }
        self.try_publish(epoch);
        Ok(sig)
    }

    /// Our signature for `epoch` as peers should see it: the one in the published
    /// document, else the one on our current ballot. Does not sign anything.
    pub fn signature_for(&self, epoch: u64) -> Option<AuthoritySignature> {
        let me = self.id();
        match self.published.get(&epoch) {
            Some(p) => p
                .doc
                .signatures
                .iter()
                .find(|s| s.authority.0 == me)
                .cloned(),
            None => self
                .ballots
                .get(&epoch)
                .and_then(|b| b.signatures.get(&me))
                .cloned(),
        }
    }

    /// Adds a peer's signature for `epoch`, to our ballot or to the published document.
    /// Returns whether it was a valid signature over that body.
    pub fn add_signature(&mut self, epoch: u64, sig: AuthoritySignature) -> bool {
        if !self.config.authorities.keys.contains(&sig.authority) {
            return false;
        }
        if let Some(p) = self.published.get_mut(&epoch) {
            if !sig.verify(&p.doc.body) {
                return false;
            }
            if !p
                .doc
                .signatures
                .iter()
                .any(|s| s.authority == sig.authority)
            {
                p.doc.signatures.push(sig);
                p.doc.signatures.sort_by_key(|s| s.authority);
            }
            return true;
        }
        let Some(b) = self.ballots.get_mut(&epoch) else {
            return false;
        };
        if !sig.verify(&b.body) {
            return false;
        }
        b.signatures.insert(sig.authority.0, sig);
        self.try_publish(epoch);
        true
    }

    fn try_publish(&mut self, epoch: u64) {
        let ready = self
            .ballots
            .get(&epoch)
            .is_some_and(|b| b.signatures.len() >= self.config.authorities.threshold);
        if ready && let Some(b) = self.ballots.remove(&epoch) {
            let doc = SignedDocument {
                body: b.body,
                // A BTreeMap's values come sorted by authority key: the canonical order.
                signatures: b.signatures.into_values().collect(),
            };
            self.published.insert(
                epoch,
                Published {
                    doc,
                    body: b.parsed,
                },
            );
            self.prune();
        }
    }

    /// Adopts a document another authority published, if it carries enough valid
    /// signatures. Returns its epoch.
    ///
    /// Only valid signatures from distinct configured authorities are kept, sorted by
    /// key. If we already hold the same body, the signatures are merged, so all
    /// authorities converge on byte-identical documents. If we hold a different body for
    /// the same epoch (possible when an authority re-signed after its inputs changed),
    /// the one with more signatures wins, then the one with the smaller body bytes: a
    /// total order, so every authority ends up with the same document.
    pub fn adopt(&mut self, doc: SignedDocument) -> Result<u64, TopologyError> {
        let checked = UncheckedDocument::from_signed(doc.clone())?
            .check_signatures(&self.config.authorities)?;
        let topo = checked.dangerously_assume_timely()?;
        let epoch = topo.epoch();
        let mut sigs: BTreeMap<[u8; 32], AuthoritySignature> = BTreeMap::new();
        for s in doc.signatures {
            if self.config.authorities.keys.contains(&s.authority) && s.verify(&doc.body) {
                sigs.entry(s.authority.0).or_insert(s);
            }
        }
        let incoming = SignedDocument {
            body: doc.body,
            signatures: sigs.into_values().collect(),
        };
        match self.published.get(&epoch) {
            Some(p) if p.doc.body == incoming.body => {
                for s in incoming.signatures {
                    self.add_signature(epoch, s);
                }
            }
            Some(p) if !preferred(&incoming, &p.doc) => {}
            _ => {
                self.ballots.remove(&epoch);
                self.published.insert(
                    epoch,
                    Published {
                        doc: incoming,
                        body: topo.body().clone(),
                    },
                );
                self.prune();
            }
        }
        Ok(epoch)
    }

    /// The published document for `epoch`, once it has at least k signatures.
    pub fn document(&self, epoch: u64) -> Option<&SignedDocument> {
        self.published.get(&epoch).map(|p| &p.doc)
    }

    /// The parsed body of the published document for `epoch`.
    pub fn document_body(&self, epoch: u64) -> Option<&DocumentBody> {
        self.published.get(&epoch).map(|p| &p.body)
    }

    /// The published document for the epoch containing `now_unix`, else the newest
    /// published one.
    pub fn current_document(&self, now_unix: u64) -> Option<&SignedDocument> {
        let current = self.config.schedule.epoch_at(now_unix);
        self.document(current)
            .or_else(|| self.published.values().next_back().map(|p| &p.doc))
    }

    /// Epochs with a published document.
    pub fn published_epochs(&self) -> Vec<u64> {
        self.published.keys().copied().collect()
    }

    /// Epochs whose documents a driver should fetch from peers at `now_unix`: the
    /// current one and the next.
    pub fn epochs_of_interest(&self, now_unix: u64) -> [u64; 2] {
        let current = self.config.schedule.epoch_at(now_unix);
        [current, current.saturating_add(1)]
    }

    /// Epochs we should vote for at `now_unix`, given that we started at `started_unix`.
    /// Nothing until the bootstrap delay has passed: until then we hold only the
    /// descriptors that arrived since the start, and a published document is final, so
    /// voting earlier would leave out every node that had not re-uploaded yet (for the
    /// next epoch too, when the start falls within `vote_lead_secs` of its beginning).
    /// Then the current epoch if it has no document, and the next epoch once it is less
    /// than `vote_lead_secs` away and has no document.
    pub fn epochs_to_vote(&self, now_unix: u64, started_unix: u64) -> Vec<u64> {
        if now_unix < started_unix.saturating_add(self.config.bootstrap_delay_secs) {
            return Vec::new();
        }
        let schedule = &self.config.schedule;
        let current = schedule.epoch_at(now_unix);
        let next = current.saturating_add(1);
        let mut out = Vec::new();
        if !self.published.contains_key(&current) {
            out.push(current);
        }
        if !self.published.contains_key(&next)
            && now_unix.saturating_add(self.config.vote_lead_secs) >= schedule.start_of(next)
        {
            out.push(next);
        }
        out
    }

    fn prune(&mut self) {
        let Some(&newest) = self.published.keys().next_back() else {
            return;
        };
        let keep_from = newest.saturating_sub(4);
        self.published.retain(|&e, _| e >= keep_from);
        self.ballots.retain(|&e, _| e >= keep_from);
    }
}

/// Whether document `a` should replace `b` for the same epoch: more signatures, then
/// smaller body bytes.
fn preferred(a: &SignedDocument, b: &SignedDocument) -> bool {
    (std::cmp::Reverse(a.signatures.len()), a.body.as_bytes())
        < (std::cmp::Reverse(b.signatures.len()), b.body.as_bytes())
}

fn shared_random(epoch: u64, prev: Option<[u8; 32]>, nodes: &[&Descriptor]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"shoal shared random v1");
    h.update(epoch.to_be_bytes());
    h.update(prev.unwrap_or([0; 32]));
    for d in nodes {
        h.update(d.identity.0);
    }
    h.finalize().into()
}

/// What [`Authority::select`] decides for one epoch.
struct Selection<'a> {
    nodes: Vec<(&'a Descriptor, Hex32)>,
    layers: BTreeMap<NodeId, u8>,
    shared_random: [u8; 32],
    capped: BTreeSet<NodeId>,
}

/// The operator on a held descriptor (every held descriptor has a certificate).
fn operator_of(s: &SignedDescriptor) -> Hex32 {
    s.certificate
        .as_ref()
        .map_or(Hex32([0; 32]), |c| c.operator)
}

/// What a body lacks for a client to build a route, if anything.
fn missing_for_routing(body: &DocumentBody) -> Option<String> {
    if !body.nodes.iter().any(|n| n.role == Role::Gateway) {
        return Some("no gateway".into());
    }
    let empty: Vec<String> = (0..body.layers)
        .filter(|l| !body.nodes.iter().any(|n| n.layer == Some(*l)))
        .map(|l| l.to_string())
        .collect();
    (!empty.is_empty()).then(|| format!("no relay in layer {}", empty.join(", ")))
}

/// Layer assignment that no one steers by choosing when to join.
///
/// - A relay keeps the layer it had (layers do not reshuffle between epochs, which
///   would split anonymity sets), as long as its operator stays within
///   `max_per_layer` there.
/// - A new relay goes to the layer its rank picks (`H(shared_random, id)` mod the
///   layer count), not to the smallest layer: when it joins changes nothing about where
///   it lands. If its operator is at `max_per_layer` there, the next layer with room.
/// - Then, while the largest layer has two more relays than the smallest, the relay of
///   the largest layer with the lowest rank whose operator has room moves to the
///   smallest. Every relay of that layer is equally likely to be the one, a newcomer no
///   more than anyone else.
///
/// A relay whose operator has no room in any layer is left out (absent from the map).
pub fn assign_layers(
    relays: &[(NodeId, Hex32)],
    prior: &BTreeMap<NodeId, u8>,
    layers: usize,
    shared_random: &[u8; 32],
    max_per_layer: &dyn Fn(&Hex32) -> usize,
) -> BTreeMap<NodeId, u8> {
    let mut out = BTreeMap::new();
    if layers == 0 {
        return out;
    }
    let rank = |id: &NodeId| -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(b"shoal layer rank v2");
        h.update(shared_random);
        h.update(id);
        h.finalize().into()
    };
    let mut order: Vec<(NodeId, Hex32)> = relays.to_vec();
    order.sort_by_key(|(id, _)| (!prior.contains_key(id), rank(id)));
    order.dedup_by_key(|(id, _)| *id);
    let mut members: Vec<Vec<(NodeId, Hex32)>> = vec![Vec::new(); layers];
    let mut count: BTreeMap<(Hex32, usize), usize> = BTreeMap::new();
    for (id, op) in order {
        let cap = max_per_layer(&op);
        let kept = prior
            .get(&id)
            .map(|&l| usize::from(l))
            .filter(|&l| l < layers && count.get(&(op, l)).copied().unwrap_or(0) < cap);
        let r = rank(&id);
        let start = (u64::from_be_bytes([r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7]])
            % layers as u64) as usize;
        let place = kept.or_else(|| {
            (0..layers)
                .map(|k| (start + k) % layers)
                .find(|&l| count.get(&(op, l)).copied().unwrap_or(0) < cap)
        });
        if let Some(l) = place {
            *count.entry((op, l)).or_default() += 1;
            members[l].push((id, op));
        }
    }
    loop {
        let largest = (0..layers)
            .max_by_key(|&i| (members[i].len(), std::cmp::Reverse(i)))
            .unwrap_or(0);
        let smallest = (0..layers)
            .min_by_key(|&i| (members[i].len(), i))
            .unwrap_or(0);
        if members[largest].len() <= members[smallest].len() + 1 {
            break;
        }
        members[largest].sort_by_key(|(id, _)| rank(id));
        let Some(pos) = members[largest].iter().position(|(_, op)| {
            count.get(&(*op, smallest)).copied().unwrap_or(0) < max_per_layer(op)
        }) else {
            break;
        };
        let (id, op) = members[largest].remove(pos);
        *count.entry((op, largest)).or_default() -= 1;
        *count.entry((op, smallest)).or_default() += 1;
        members[smallest].push((id, op));
    }
    for (layer, ids) in members.iter().enumerate() {
        for (id, _) in ids {
            out.insert(*id, layer as u8);
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::SphinxKeyEntry;
    use crate::document::tests::{
        authority_key, authority_set, node_key, operator_id, operator_key, sphinx_key,
    };
    use crate::{AdmittedOperator, NodeCertificate};
    use proptest::prelude::*;

    const LENGTH: u64 = 100;
    const GENESIS: u64 = 1000;

    fn config(n: u8, k: usize) -> AuthorityConfig {
        AuthorityConfig {
            authorities: authority_set(n, k),
            schedule: EpochSchedule {
                genesis_unix: GENESIS,
                length_secs: LENGTH,
            },
            params: NetworkParams::default(),
            descriptor_max_age_secs: 1000,
            vote_lead_secs: 20,
            bootstrap_delay_secs: 10,
            admission: admit_all(),
        }
    }

    /// Every test operator 0..=255, each with room for 4 nodes, 2 per layer.
    fn admit_all() -> Admission {
        Admission::new(
            (0..=255u8)
                .map(|i| AdmittedOperator {
                    key: operator_id(i),
                    name: format!("operator {i}"),
                    max_nodes: 4,
                    max_per_layer: 2,
                })
                .collect(),
        )
        .unwrap()
    }

    /// Authorities 0..n of a k-of-n network.
    fn authorities(n: u8, k: usize) -> Vec<Authority> {
        (0..n)
            .map(|i| Authority::new(authority_key(i), config(n, k)).unwrap())
            .collect()
    }

    /// Node `i`'s descriptor, certified by operator `i`: relays for i < 100, gateways
    /// above.
    fn node(i: u8, published_unix: u64, epochs: &[u64]) -> SignedDescriptor {
        node_of(i, i, published_unix, epochs)
    }

    /// A usable network at `published_unix`: relays 1..=3 (one per layer from empty)
    /// and gateway 101.
    fn network(published_unix: u64, epochs: &[u64]) -> Vec<SignedDescriptor> {
        [1, 2, 3, 101]
            .iter()
            .map(|&i| node(i, published_unix, epochs))
            .collect()
    }

    /// Node `i`'s descriptor, certified by operator `op`.
    fn node_of(op: u8, i: u8, published_unix: u64, epochs: &[u64]) -> SignedDescriptor {
        let key = node_key(i);
        let role = if i < 100 { Role::Relay } else { Role::Gateway };
        let cert = NodeCertificate::issue(&operator_key(op), key.verifying_key().to_bytes(), role);
        Descriptor {
            identity: Hex32(key.verifying_key().to_bytes()),
            role,
            link_addr: format!("127.0.0.1:{}", 4000 + u16::from(i)),
            sphinx_keys: epochs
                .iter()
                .map(|&epoch| SphinxKeyEntry {
                    epoch,
                    key: sphinx_key(i, epoch),
                })
                .collect(),
            published_unix,
            version: None,
        }
        .sign(&key)
        .unwrap()
        .certified(cert)
    }

    fn feed(a: &mut Authority, descriptors: &[SignedDescriptor], now: u64) {
        for d in descriptors {
            a.handle_descriptor(d.clone(), now).unwrap();
        }
    }

    /// Every authority merges every other's descriptors.
    fn exchange_descriptors(auths: &mut [Authority], now: u64) {
        let all: Vec<Vec<SignedDescriptor>> = auths.iter().map(Authority::descriptors).collect();
        for a in auths.iter_mut() {
            for ds in &all {
                feed(a, ds, now);
            }
        }
    }

    /// Every authority votes, then takes every other's signature.
    fn exchange_votes(auths: &mut [Authority], epoch: u64) {
        for a in auths.iter_mut() {
            let _ = a.vote(epoch);
        }
        let sigs: Vec<Option<AuthoritySignature>> =
            auths.iter().map(|a| a.signature_for(epoch)).collect();
        for a in auths.iter_mut() {
            for s in sigs.iter().flatten() {
                a.add_signature(epoch, s.clone());
            }
        }
    }

    fn check(doc: &SignedDocument, auths: &AuthoritySet, now: u64) -> crate::Topology {
        UncheckedDocument::parse(&doc.to_json())
            .unwrap()
            .check_signatures(auths)
            .unwrap()
            .check_valid_at(now)
            .unwrap()
    }

    #[test]
    fn a_document_says_when_its_epoch_starts() {
        let a = &authorities(1, 1)[0];
        for epoch in [0, 1, 7, 1000] {
            let body = a.build_body(epoch);
            assert_eq!(body.epoch_start(), config(1, 1).schedule.start_of(epoch));
        }
    }

    #[test]
    fn roster_says_why_a_node_is_left_out() {
        let now = GENESIS + 5 * LENGTH + 30; // epoch 5
        let mut a = authorities(1, 1).remove(0);
        feed(&mut a, &network(now - 10, &[5, 6]), now);
        // No key for epoch 5.
        feed(&mut a, &[node(4, now - 10, &[6, 7])], now);
        // Older than descriptor_max_age before the start of epoch 5.
        let start = GENESIS + 5 * LENGTH;
        feed(&mut a, &[node(5, start - 1001, &[5, 6])], now);

        let roster = a.roster(5);
        assert_eq!(roster.len(), 6);
        let of = |i: u8| {
            let id = node_key(i).verifying_key().to_bytes();
            roster
                .iter()
                .find(|e| e.identity.0 == id)
                .unwrap()
                .inclusion
                .clone()
        };
        for i in 1..=3 {
            assert!(matches!(of(i), Inclusion::Included { layer: Some(_) }));
        }
        assert_eq!(of(4), Inclusion::NoKeyForEpoch);
        assert_eq!(
            of(5),
            Inclusion::Stale {
                published_unix: start - 1001,
                oldest_accepted_unix: start - 1000,
            }
        );
        // The roster agrees with the body the authority would sign.
        let listed = a.build_body(5).nodes.len();
        let included = roster
            .iter()
            .filter(|e| matches!(e.inclusion, Inclusion::Included { .. }))
            .count();
        assert_eq!(listed, included);

        // Once a document is published without a late node, the roster says so.
        let doc_epoch = 5;
        a.vote(doc_epoch).unwrap();
        assert!(a.document(doc_epoch).is_some());
        feed(&mut a, &[node(6, now - 5, &[5, 6])], now);
        let late = node_key(6).verifying_key().to_bytes();
        let entry = a
            .roster(doc_epoch)
            .into_iter()
            .find(|e| e.identity.0 == late)
            .unwrap();
        assert_eq!(entry.inclusion, Inclusion::NotInPublished);
        let json = serde_json::to_string(&entry).unwrap();
        assert!(json.contains("\"status\":\"not_in_published\""), "{json}");
    }

    fn refused(a: &Authority, why: Refusal) -> u64 {
        a.refusals()
            .into_iter()
            .find(|(r, _)| *r == why)
            .map_or(0, |(_, n)| n)
    }

    /// Without a certificate, with one from an operator nobody admitted, or with one
    /// made for another node or role: refused with a reason, counted, not stored.
    #[test]
    fn admission_refuses_uncertified_and_unknown_operators() {
        let now = GENESIS + 30;
        let mut a = authorities(1, 1).remove(0);
        let key = node_key(7);
        let bare = Descriptor {
            identity: Hex32(key.verifying_key().to_bytes()),
            role: Role::Relay,
            link_addr: "127.0.0.1:4007".into(),
            sphinx_keys: vec![SphinxKeyEntry {
                epoch: 0,
                key: sphinx_key(7, 0),
            }],
            published_unix: now,
            version: None,
        }
        .sign(&key)
        .unwrap();
        let err = a.handle_descriptor(bare.clone(), now).unwrap_err();
        assert!(err.to_string().contains("shoal operator certify"), "{err}");
        // An operator key nobody admitted.
        // (Not of the form [b; 32]: every such key is admitted in these tests.)
        let mut seed = [0x99; 32];
        seed[0] = 1;
        let stranger = SigningKey::from_bytes(&seed);
        let unknown = bare.clone().certified(NodeCertificate::issue(
            &stranger,
            key.verifying_key().to_bytes(),
            Role::Relay,
        ));
        let err = a.handle_descriptor(unknown, now).unwrap_err();
        assert!(err.to_string().contains("not admitted"), "{err}");
        // An admitted operator's certificate for another node, or for the other role.
        let other_node = bare.clone().certified(NodeCertificate::issue(
            &operator_key(7),
            node_key(8).verifying_key().to_bytes(),
            Role::Relay,
        ));
        let other_role = bare.clone().certified(NodeCertificate::issue(
            &operator_key(7),
            key.verifying_key().to_bytes(),
            Role::Gateway,
        ));
        // A certificate whose operator field was swapped to an admitted key.
        let mut forged =
            NodeCertificate::issue(&stranger, key.verifying_key().to_bytes(), Role::Relay);
        forged.operator = operator_id(7);
        for bad in [other_node, other_role, bare.clone().certified(forged)] {
            assert!(a.handle_descriptor(bad, now).is_err());
        }
        assert_eq!(a.descriptor_count(), 0);
        assert_eq!(refused(&a, Refusal::NoCertificate), 1);
        assert_eq!(refused(&a, Refusal::UnknownOperator), 1);
        assert_eq!(refused(&a, Refusal::BadCertificate), 3);
        // The right certificate is taken.
        let good = bare.certified(NodeCertificate::issue(
            &operator_key(7),
            key.verifying_key().to_bytes(),
            Role::Relay,
        ));
        assert!(a.handle_descriptor(good, now).unwrap());
        assert_eq!((a.descriptor_count(), a.accepted()), (1, 1));
    }

    /// An oversized descriptor is refused before it is parsed, and counted.
    #[test]
    fn sybil_oversized_descriptor_is_refused_before_parsing() {
        let now = GENESIS + 30;
        let mut a = authorities(1, 1).remove(0);
        let mut big = node(1, now, &[0]);
        big.body = format!("{}{}", big.body, " ".repeat(MAX_DESCRIPTOR_BYTES));
        let bytes = big.to_json();
        assert!(bytes.len() > MAX_DESCRIPTOR_BYTES);
        assert!(a.handle_descriptor_bytes(&bytes, now).is_err());
        assert!(a.handle_descriptor(big, now).is_err());
        assert_eq!(refused(&a, Refusal::Oversized), 2);
        assert!(a.handle_descriptor_bytes(b"{not json", now).is_err());
        assert_eq!(refused(&a, Refusal::Malformed), 1);
        assert_eq!(a.descriptor_count(), 0);
        // A real descriptor is far below the limit.
        assert!(node(1, now, &[0, 1, 2]).to_json().len() < MAX_DESCRIPTOR_BYTES / 2);
        assert!(
            a.handle_descriptor_bytes(&node(1, now, &[0]).to_json(), now)
                .unwrap()
        );
    }

    /// A hostile admitted operator posting far more nodes than its cap: the authority
    /// holds `max_nodes` of them, the same ones whatever the order they came in.
    #[test]
    fn sybil_admitted_operator_is_held_to_its_cap_in_any_order() {
        let now = GENESIS + 30;
        let posts: Vec<SignedDescriptor> = (1..=40).map(|i| node_of(200, i, now, &[0])).collect();
        let mut a = authorities(2, 2);
        feed_lenient(&mut a[0], &posts, now);
        let mut reversed = posts.clone();
        reversed.reverse();
        feed_lenient(&mut a[1], &reversed, now);
        assert_eq!(a[0].descriptor_count(), 4);
        assert_eq!(a[0].descriptors(), a[1].descriptors());
        assert!(refused(&a[0], Refusal::OperatorCap) > 0);
        // Gossip between them changes nothing.
        exchange_descriptors_lenient(&mut a, now);
        assert_eq!(a[0].descriptors(), a[1].descriptors());
        assert_eq!(a[1].descriptor_count(), 4);
    }

    fn feed_lenient(a: &mut Authority, descriptors: &[SignedDescriptor], now: u64) {
        for d in descriptors {
            let _ = a.handle_descriptor(d.clone(), now);
        }
    }

    fn exchange_descriptors_lenient(auths: &mut [Authority], now: u64) {
        let all: Vec<Vec<SignedDescriptor>> = auths.iter().map(Authority::descriptors).collect();
        for a in auths.iter_mut() {
            for ds in &all {
                feed_lenient(a, ds, now);
            }
        }
    }

    /// Bounded state under a flood of 10^5 descriptor posts: 99,000 from operators
    /// nobody admitted (each a fresh key: a Sybil costs the attacker nothing but a
    /// key) and 1,000 distinct nodes from one admitted hostile operator. The authority
    /// holds the hostile operator's cap and the honest network, nothing else; every
    /// refusal is counted.
    #[test]
    fn sybil_flood_of_1e5_posts_leaves_state_bounded() {
        let now = GENESIS + 30;
        let mut a = authorities(1, 1).remove(0);
        feed(&mut a, &network(now, &[0, 1]), now);
        let template = node(9, now, &[0, 1]);
        let mut rng_state = 0x1234_5678_u64;
        for i in 0..99_000u32 {
            // Any 32 bytes will do for an unadmitted operator: it is refused on lookup.
            let mut op = [0u8; 32];
            for chunk in op.chunks_mut(8) {
                rng_state ^= rng_state << 13;
                rng_state ^= rng_state >> 7;
                rng_state ^= rng_state << 17;
                chunk.copy_from_slice(&rng_state.to_le_bytes());
            }
            let mut d = template.clone();
            let mut cert = d.certificate.clone().unwrap();
            cert.operator = Hex32(op);
            d.certificate = Some(cert);
            let bytes = d.to_json();
            assert!(
                a.handle_descriptor_bytes(&bytes, now + u64::from(i % 2))
                    .is_err()
            );
        }
        let hostile = operator_key(250);
        for i in 0..1000u32 {
            let mut seed = [0x77u8; 32];
            seed[..4].copy_from_slice(&i.to_be_bytes());
            let key = SigningKey::from_bytes(&seed);
            let d = Descriptor {
                identity: Hex32(key.verifying_key().to_bytes()),
                role: Role::Relay,
                link_addr: format!("10.{}.{}.1:4000", i / 256, i % 256),
                sphinx_keys: vec![SphinxKeyEntry {
                    epoch: 0,
                    key: Hex32([1; 32]),
                }],
                published_unix: now,
                version: None,
            }
            .sign(&key)
            .unwrap()
            .certified(NodeCertificate::issue(
                &hostile,
                key.verifying_key().to_bytes(),
                Role::Relay,
            ));
            let _ = a.handle_descriptor_bytes(&d.to_json(), now);
        }
        assert_eq!(a.descriptor_count(), 4 + 4);
        assert_eq!(refused(&a, Refusal::UnknownOperator), 99_000);
        assert_eq!(refused(&a, Refusal::OperatorCap) + a.accepted(), 1000 + 4);
        assert!(a.descriptor_count() <= a.config().admission.max_descriptors());
        // The document lists the honest network and at most the hostile cap.
        a.vote(0).unwrap();
        let body = a.document_body(0).unwrap();
        let hostile_id = Hex32(hostile.verifying_key().to_bytes());
        let listed = body
            .nodes
            .iter()
            .filter(|n| n.operator == hostile_id)
            .count();
        assert!(listed <= 4, "{listed}");
        for l in 0..3u8 {
            let per_layer = body
                .nodes
                .iter()
                .filter(|n| n.operator == hostile_id && n.layer == Some(l))
                .count();
            assert!(per_layer <= 2, "layer {l}: {per_layer}");
        }
    }

    /// An operator removed from the admission list loses its nodes at once; a cap
    /// lowered trims the held ones.
    #[test]
    fn admission_removal_forgets_the_operators_nodes() {
        let now = GENESIS + 30;
        let mut a = authorities(1, 1).remove(0);
        feed(&mut a, &network(now, &[0, 1]), now);
        feed(
            &mut a,
            &[
                node_of(200, 110, now, &[0, 1]),
                node_of(200, 111, now, &[0, 1]),
            ],
            now,
        );
        assert_eq!(a.descriptor_count(), 6);
        let mut ops: Vec<AdmittedOperator> = a
            .config()
            .admission
            .operators()
            .filter(|o| o.key != operator_id(1))
            .cloned()
            .collect();
        for o in ops.iter_mut().filter(|o| o.key == operator_id(200)) {
            o.max_nodes = 1;
        }
        a.set_admission(Admission::new(ops).unwrap());
        assert_eq!(a.descriptor_count(), 4);
        assert!(a.handle_descriptor(node(1, now + 1, &[0, 1]), now).is_err());
        assert!(a.vote(0).is_err(), "relay 1 was the only one of its layer");
    }

    #[test]
    fn three_authorities_agree_byte_for_byte() {
        let now = GENESIS + 5 * LENGTH + 30; // epoch 5
        let epoch = 5;
        let mut descriptors: Vec<SignedDescriptor> =
            (1..=7).map(|i| node(i, now - 10, &[5, 6])).collect();
        descriptors.extend((101..=102).map(|i| node(i, now - 10, &[5, 6])));
        // Node 1 re-published; its newer descriptor must win wherever it arrives first.
        let newer = node(1, now - 5, &[5, 6, 7]);
        let mut auths = authorities(3, 2);
        // Different orders, and each sees only part of the network.
        feed(&mut auths[0], &descriptors[..6], now);
        feed(&mut auths[0], std::slice::from_ref(&newer), now);
        let mut reversed = descriptors.clone();
        reversed.reverse();
        feed(&mut auths[1], &reversed[..5], now);
        feed(&mut auths[2], std::slice::from_ref(&newer), now);
        feed(&mut auths[2], &descriptors[3..], now);
        feed(&mut auths[2], &descriptors[..1], now);

        exchange_descriptors(&mut auths, now);
        let held: Vec<Vec<SignedDescriptor>> = auths.iter().map(Authority::descriptors).collect();
        assert_eq!(held[0].len(), 9);
        assert!(held.iter().all(|h| *h == held[0]));
        assert!(held[0].contains(&newer));

        exchange_votes(&mut auths, epoch);
        let docs: Vec<Vec<u8>> = auths
            .iter()
            .map(|a| a.document(epoch).unwrap().to_json())
            .collect();
        assert!(docs.iter().all(|d| *d == docs[0]), "documents differ");
        let doc = auths[0].document(epoch).unwrap();
        assert_eq!(doc.signatures.len(), 3);
        let topo = check(doc, &authority_set(3, 2), now);
        assert_eq!(topo.epoch(), epoch);
        assert_eq!(topo.nodes().count(), 9);
        assert_eq!(topo.gateways().len(), 2);
        let sizes: Vec<usize> = (0..3).map(|l| topo.layer(l).len()).collect();
        assert!(sizes.iter().all(|&s| s >= 2), "{sizes:?}");
        // Keys for this epoch and the next only.
        let n1 = topo.node(&node_key(1).verifying_key().to_bytes()).unwrap();
        assert_eq!(
            n1.sphinx_keys.keys().copied().collect::<Vec<_>>(),
            vec![5, 6]
        );
        // What the driver serves.
        assert_eq!(auths[1].current_document(now), Some(doc));
        assert_eq!(
            auths[1].signature_for(epoch).unwrap().authority.0,
            auths[1].id()
        );
    }

    #[test]
    fn one_of_two_needed_signatures_never_publishes() {
        let now = GENESIS + 30;
        let mut auths = authorities(3, 2);
        feed(&mut auths[0], &network(now, &[0, 1]), now);
        let sig = auths[0].vote(0).unwrap();
        assert!(auths[0].document(0).is_none());
        assert!(auths[0].current_document(now).is_none());
        // Its own signature offered again does not count twice.
        assert!(auths[0].add_signature(0, sig));
        assert!(auths[0].document(0).is_none());
        // Nor does a signature from outside the set.
        let outsider = AuthoritySignature::sign(
            &authority_key(9),
            &auths[0].build_body(0).to_bytes().unwrap(),
        );
        assert!(!auths[0].add_signature(0, outsider));
        assert!(auths[0].document(0).is_none());
        assert!(auths[0].published_epochs().is_empty());
    }

    #[test]
    fn authority_with_different_inputs_does_not_sign_but_adopts() {
        let now = GENESIS + 30;
        let shared: Vec<SignedDescriptor> = (1..=4)
            .chain([101])
            .map(|i| node(i, now, &[0, 1]))
            .collect();
        let mut auths = authorities(3, 2);
        for a in auths.iter_mut() {
            feed(a, &shared, now);
        }
        // Authority 2 alone knows one more relay and does not pass it on.
        feed(&mut auths[2], &[node(5, now, &[0, 1])], now);
        exchange_votes(&mut auths, 0);
        let published = auths[0].document(0).unwrap().clone();
        assert_eq!(auths[1].document(0), Some(&published));
        assert_eq!(published.signatures.len(), 2);
        let c = auths[2].id();
        assert!(published.signatures.iter().all(|s| s.authority.0 != c));
        // Its own body got no signature but its own: nothing published.
        assert!(auths[2].document(0).is_none());
        // Offering it the others' signatures does not help: they are over another body.
        for s in &published.signatures {
            assert!(!auths[2].add_signature(0, s.clone()));
        }
        // And the others do not take its signature.
        let c_sig = auths[2].signature_for(0).unwrap();
        assert!(!auths[0].add_signature(0, c_sig));
        // It adopts the published document, and still refuses to co-sign it.
        assert_eq!(auths[2].adopt(published.clone()).unwrap(), 0);
        assert_eq!(auths[2].document(0), Some(&published));
        assert!(auths[2].vote(0).is_err());
        assert!(auths[2].signature_for(0).is_none());
        assert_eq!(auths[2].document(0), Some(&published));
        // A document short of the threshold is not adopted.
        let mut short = published.clone();
        short.signatures.truncate(1);
        assert!(matches!(
            authorities(3, 2)[2].adopt(short),
            Err(TopologyError::NotEnoughSignatures { .. })
        ));
    }

    /// Regression: a descriptor replaced by one with the same timestamp made the
    /// merged set depend on arrival order, so authorities never agreed.
    #[test]
    fn same_timestamp_descriptors_merge_independently_of_order() {
        let now = GENESIS + 30;
        let a = node(1, now, &[0, 1]);
        let b = node(1, now, &[0, 1, 2]);
        let mut auths = authorities(2, 2);
        feed(&mut auths[0], &[a.clone(), b.clone()], now);
        feed(&mut auths[1], &[b, a], now);
        assert_eq!(auths[0].descriptors(), auths[1].descriptors());
        // Older loses, future is refused.
        assert!(
            !auths[0]
                .handle_descriptor(node(1, now - 1, &[0]), now)
                .unwrap()
        );
        assert!(
            auths[0]
                .handle_descriptor(node(1, now + 301, &[0]), now)
                .is_err()
        );
    }

    /// Regression: `adopt` stored the document as received, so junk or duplicate
    /// signatures next to k good ones were served on.
    #[test]
    fn adopt_keeps_only_valid_distinct_signatures_sorted() {
        let now = GENESIS + 30;
        let mut auths = authorities(3, 2);
        feed(&mut auths[0], &[node(1, now, &[0, 1])], now);
        let body = auths[0].build_body(0).to_bytes().unwrap();
        let (a, b, c) = (authority_key(0), authority_key(1), authority_key(2));
        let mut bad_c = AuthoritySignature::sign(&c, &body);
        bad_c.signature.0[0] ^= 1;
        let doc = SignedDocument {
            body: body.clone(),
            signatures: vec![
                AuthoritySignature::sign(&b, &body),
                AuthoritySignature::sign(&authority_key(9), &body),
                bad_c,
                AuthoritySignature::sign(&a, &body),
                AuthoritySignature::sign(&b, &body),
            ],
        };
        auths[1].adopt(doc).unwrap();
        let mut expected = vec![
            AuthoritySignature::sign(&a, &body),
            AuthoritySignature::sign(&b, &body),
        ];
        expected.sort_by_key(|s| s.authority);
        assert_eq!(auths[1].document(0).unwrap().signatures, expected);
    }

    #[test]
    fn signatures_merge_after_publication() {
        let now = GENESIS + 30;
        let mut auths = authorities(3, 2);
        for a in auths.iter_mut() {
            feed(a, &network(now, &[0, 1]), now);
        }
        let sa = auths[0].vote(0).unwrap();
        let sb = auths[1].vote(0).unwrap();
        let sc = auths[2].vote(0).unwrap();
        // 0 publishes {0, 1}; 2 publishes {0, 2}.
        assert!(auths[0].add_signature(0, sb));
        assert!(auths[2].add_signature(0, sa.clone()));
        assert!(auths[1].add_signature(0, sa));
        let (d0, d2) = (
            auths[0].document(0).unwrap().clone(),
            auths[2].document(0).unwrap().clone(),
        );
        assert_ne!(d0, d2);
        for (i, doc) in [(0, &d2), (2, &d0), (1, &d2)] {
            auths[i].adopt(doc.clone()).unwrap();
        }
        assert!(auths[0].add_signature(0, sc));
        let docs: Vec<Vec<u8>> = auths
            .iter()
            .map(|a| a.document(0).unwrap().to_json())
            .collect();
        assert!(docs.iter().all(|d| *d == docs[0]));
        assert_eq!(auths[0].document(0).unwrap().signatures.len(), 3);
    }

    /// Two bodies for one epoch can each reach k if an authority re-signed after its
    /// inputs changed; every authority must still end up with the same one.
    #[test]
    fn competing_documents_resolve_the_same_everywhere() {
        let now = GENESIS + 30;
        let mut builder = authorities(4, 2).remove(0);
        feed(&mut builder, &[node(1, now, &[0, 1])], now);
        let body1 = builder.build_body(0).to_bytes().unwrap();
        feed(&mut builder, &[node(2, now, &[0, 1])], now);
        let body2 = builder.build_body(0).to_bytes().unwrap();
        let k: Vec<SigningKey> = (0..4).map(authority_key).collect();
        let doc = |body: &str, who: &[usize]| SignedDocument {
            body: body.to_owned(),
            signatures: who
                .iter()
                .map(|&i| AuthoritySignature::sign(&k[i], body))
                .collect(),
        };
        // More signatures win, whatever the order.
        let (small, big) = (doc(&body1, &[0, 1]), doc(&body2, &[0, 2, 3]));
        for order in [[&small, &big], [&big, &small]] {
            let mut a = authorities(4, 2).remove(1);
            for d in order {
                a.adopt(d.clone()).unwrap();
            }
            assert_eq!(a.document(0).unwrap().body, body2);
        }
        // Equal counts: the smaller body wins, whatever the order.
        let (x, y) = (doc(&body1, &[0, 1]), doc(&body2, &[2, 3]));
        let smaller = body1.clone().min(body2.clone());
        for order in [[&x, &y], [&y, &x]] {
            let mut a = authorities(4, 2).remove(1);
            for d in order {
                a.adopt(d.clone()).unwrap();
            }
            assert_eq!(a.document(0).unwrap().body, smaller);
        }
    }

    #[test]
    fn vote_timing() {
        let mut a = authorities(1, 1).remove(0);
        let started = GENESIS + 5;
        // Before the bootstrap delay, nothing; after it, the current epoch.
        assert!(a.epochs_to_vote(GENESIS + 14, started).is_empty());
        assert_eq!(a.epochs_to_vote(GENESIS + 15, started), vec![0]);
        // Within vote_lead of the next epoch, that one too.
        assert_eq!(a.epochs_to_vote(GENESIS + 80, started), vec![0, 1]);
        // Started within vote_lead of the next epoch: that one also waits for the
        // bootstrap delay, or it would be final with whoever uploaded in the first second.
        let late = GENESIS + 85;
        assert!(a.epochs_to_vote(GENESIS + 86, late).is_empty());
        assert!(a.epochs_to_vote(GENESIS + 94, late).is_empty());
        assert_eq!(a.epochs_to_vote(GENESIS + 95, late), vec![0, 1]);
        feed(&mut a, &network(GENESIS, &[0, 1]), GENESIS + 80);
        a.vote(0).unwrap();
        assert_eq!(a.published_epochs(), vec![0]);
        assert!(a.epochs_to_vote(GENESIS + 79, started).is_empty());
        assert_eq!(a.epochs_to_vote(GENESIS + 80, started), vec![1]);
        assert_eq!(a.epochs_of_interest(GENESIS + 80), [0, 1]);
        // The next epoch's document does not replace the current one before it starts.
        a.vote(1).unwrap();
        assert_eq!(
            a.current_document(GENESIS + 99).unwrap().body,
            a.document(0).unwrap().body
        );
        assert_eq!(
            a.current_document(GENESIS + 100).unwrap().body,
            a.document(1).unwrap().body
        );
        // Long after, the newest one is what there is.
        assert_eq!(
            a.current_document(GENESIS + 1000).unwrap().body,
            a.document(1).unwrap().body
        );
    }

    /// Regression (issue 18, defect 12): an authority published a final document with
    /// one relay and no gateway when the other nodes were a few seconds late, and every
    /// late node then waited a whole epoch. No document is voted until every layer has
    /// a relay and there is a gateway.
    #[test]
    fn no_vote_without_a_usable_network() {
        let mut a = authorities(1, 1).remove(0);
        assert!(a.vote(0).is_err());
        assert!(a.signature_for(0).is_none());
        // One relay and a gateway: two layers empty.
        feed(
            &mut a,
            &[node(1, GENESIS, &[0, 1]), node(101, GENESIS, &[0, 1])],
            GENESIS,
        );
        let err = a.vote(0).unwrap_err().to_string();
        assert!(err.contains("no relay in layer"), "{err}");
        assert!(a.document(0).is_none());
        // Three relays and no gateway.
        let mut b = authorities(1, 1).remove(0);
        feed(&mut b, &network(GENESIS, &[0, 1])[..3], GENESIS);
        let err = b.vote(0).unwrap_err().to_string();
        assert!(err.contains("no gateway"), "{err}");
        // The late ones arrive: now it publishes, with all of them.
        feed(&mut a, &network(GENESIS + 5, &[0, 1]), GENESIS + 5);
        a.vote(0).unwrap();
        assert_eq!(a.document_body(0).unwrap().nodes.len(), 4);
        // A node with no key for the epoch does not count.
        let mut c = authorities(1, 1).remove(0);
        feed(&mut c, &network(GENESIS, &[1]), GENESIS);
        assert!(c.vote(0).is_err());
        c.vote(1).unwrap();
        assert!(c.document(1).is_some());
    }

    #[test]
    fn new_rejects_bad_config() {
        let key = authority_key(0);
        assert!(
            Authority::new(authority_key(5), config(3, 2)).is_err(),
            "key not in set"
        );
        assert!(Authority::new(key.clone(), config(3, 0)).is_err());
        let mut c = config(3, 2);
        c.schedule.length_secs = 0;
        assert!(Authority::new(key.clone(), c).is_err());
        let mut c = config(3, 2);
        c.vote_lead_secs = LENGTH;
        assert!(Authority::new(key.clone(), c).is_err());
        let mut c = config(3, 2);
        c.descriptor_max_age_secs = c.vote_lead_secs;
        assert!(Authority::new(key.clone(), c).is_err());
        let mut c = config(3, 2);
        c.params.lambda_l = f64::NAN;
        assert!(Authority::new(key, c).is_err());
    }

    /// The liveness rule with the default max age: nodes re-publish every
    /// `republish_secs`; one relay dies at each offset of an epoch in turn. Live nodes
    /// are in every document; the dead one is in no document voted more than
    /// `max_age - lead` after its last descriptor, so at the latest in the one for the
    /// epoch after next, and the roster says it was left out as stale.
    #[test]
    fn a_relay_that_stops_publishing_leaves_the_next_document_voted() {
        let schedule = EpochSchedule {
            genesis_unix: GENESIS,
            length_secs: LENGTH,
        };
        let lead = LENGTH / 4;
        let max_age = default_descriptor_max_age_secs(&schedule, lead);
        let period = schedule.republish_secs();
        assert_eq!((period, max_age), (6, 49));
        let cfg = AuthorityConfig {
            descriptor_max_age_secs: max_age,
            vote_lead_secs: lead,
            ..config(1, 1)
        };
        let nodes: Vec<u8> = (1..=6).chain([101, 102]).collect();
        let mut left_next = 0;
        for died_offset in (0..LENGTH).step_by(7) {
            let mut a = Authority::new(authority_key(0), cfg.clone()).unwrap();
            let started = GENESIS + 2 * LENGTH;
            let died_at = GENESIS + 4 * LENGTH + died_offset;
            let died_epoch = schedule.epoch_at(died_at);
            let mut last_publish = 0;
            let dead = node_key(1).verifying_key().to_bytes();
            // Each epoch's document when agreed: (vote time, nodes, whether it lists the
            // dead relay).
            let mut agreed: BTreeMap<u64, (u64, usize, bool)> = BTreeMap::new();
            for now in started..GENESIS + 8 * LENGTH {
                if (now - started).is_multiple_of(period) {
                    let e = schedule.epoch_at(now);
                    for &i in &nodes {
                        if i == 1 && now >= died_at {
                            continue;
                        }
                        if i == 1 {
                            last_publish = now;
                        }
                        feed(&mut a, &[node(i, now, &[e, e + 1, e + 2])], now);
                    }
                }
                a.expire_descriptors(now);
                for e in a.epochs_to_vote(now, started) {
                    a.vote(e).unwrap();
                    let body = a.document_body(e).unwrap();
                    let has_dead = body.nodes.iter().any(|n| n.identity.0 == dead);
                    agreed.insert(e, (now, body.nodes.len(), has_dead));
                }
                // Two epochs on, the roster still says why it is out.
                if now == died_at + 2 * LENGTH {
                    let e = schedule.epoch_at(now) + 1;
                    let entry = a.roster(e).into_iter().find(|r| r.identity.0 == dead);
                    assert_eq!(
                        entry.map(|r| r.inclusion),
                        Some(Inclusion::Stale {
                            published_unix: last_publish,
                            oldest_accepted_unix: schedule.start_of(e) - max_age,
                        })
                    );
                }
            }
            let mut first_without = None;
            for (&e, &(at, count, has_dead)) in &agreed {
                // Everyone alive is always listed: no flapping.
                assert_eq!(count, nodes.len() - usize::from(!has_dead), "epoch {e}");
                if at >= last_publish + (max_age - lead) {
                    assert!(!has_dead, "died at +{died_offset}: listed in epoch {e}");
                }
                if at < died_at {
                    assert!(has_dead, "listed before it died (epoch {e})");
                }
                if !has_dead && first_without.is_none() {
                    first_without = Some(e);
                }
            }
            let gone = first_without.unwrap();
            assert!(
                gone <= died_epoch + 2,
                "died at +{died_offset}: gone in {gone}"
            );
            if gone == died_epoch + 1 {
                left_next += 1;
            }
        }
        // Deaths in the first half of an epoch (before the vote for the next one, less
        // the liveness window) are gone from the very next epoch's document.
        assert_eq!(
            left_next,
            (0..LENGTH).step_by(7).filter(|o| *o < 50).count()
        );
    }

    /// The authority's signing key wipes itself on drop and Debug prints none of it.
    #[test]
    fn authority_debug_hides_its_key() {
        fn zeroize_on_drop<T: zeroize::ZeroizeOnDrop>() {}
        zeroize_on_drop::<SigningKey>();
        let a = authorities(1, 1).remove(0);
        let shown = format!("{a:?}");
        let secret = authority_key(0).to_bytes();
        assert!(!shown.contains(&hex::encode(secret)), "{shown}");
        assert!(!shown.contains(format!("{secret:?}").trim_matches(['[', ']'])));
    }

    #[test]
    fn descriptors_expire() {
        let mut a = authorities(1, 1).remove(0);
        // Epoch 20 starts at 3000; max age 1000; stale ones are kept two epochs more.
        let now = GENESIS + 2000;
        feed(&mut a, &[node(1, 1799, &[20]), node(2, 1800, &[20])], now);
        a.expire_descriptors(now);
        assert_eq!(a.descriptors().len(), 1);
    }

    fn layer_of(a: &Authority, epoch: u64, i: u8) -> Option<u8> {
        let id = Hex32(node_key(i).verifying_key().to_bytes());
        let doc = a.document(epoch).unwrap();
        let body: DocumentBody = serde_json::from_str(&doc.body).unwrap();
        body.nodes
            .iter()
            .find(|n| n.identity == id)
            .and_then(|n| n.layer)
    }

    fn own_operators(ids: &[NodeId]) -> Vec<(NodeId, Hex32)> {
        ids.iter().map(|id| (*id, Hex32(*id))).collect()
    }

    fn no_cap(_: &Hex32) -> usize {
        usize::MAX
    }

    #[test]
    fn relays_keep_their_layer_across_epochs() {
        let mut a = authorities(1, 1).remove(0);
        let t = GENESIS + 10;
        // Epoch 0: relays 1..=9 and a gateway. Relay 2 publishes no key for epoch 1.
        let mut ds: Vec<SignedDescriptor> = (1..=9)
            .filter(|&i| i != 2)
            .map(|i| node(i, t, &[0, 1, 2]))
            .collect();
        ds.push(node(2, t, &[0]));
        ds.push(node(101, t, &[0, 1, 2]));
        feed(&mut a, &ds, t);
        a.vote(0).unwrap();
        let before: Vec<Option<u8>> = (1..=9).map(|i| layer_of(&a, 0, i)).collect();
        assert!(before.iter().all(Option::is_some));
        // Epoch 1: relay 2 left, relay 10 joins. At most one kept relay moves (to
        // rebalance), and the layers stay within one of each other.
        feed(&mut a, &[node(10, t, &[1, 2])], t);
        a.vote(1).unwrap();
        let moved = (1..=9)
            .filter(|&i| i != 2 && layer_of(&a, 1, i) != before[usize::from(i - 1)])
            .count();
        assert!(moved <= 1, "{moved} relays moved");
        assert_eq!(layer_of(&a, 1, 2), None);
        let mut counts = [0; 3];
        for i in (1..=10).filter(|&i| i != 2) {
            counts[usize::from(layer_of(&a, 1, i).unwrap())] += 1;
        }
        assert_eq!(counts, [3, 3, 3]);
    }

    /// The attack of a relay that times its join: layers stand at 3/3/1 (two relays of
    /// layer 2 just left). The old rule put every newcomer in the smallest layer, so a
    /// relay joining now was certain to become one of two in layer 2. Now a newcomer
    /// lands where its rank says and only a rebalance moves anyone, picking among all
    /// relays of the largest layer: the newcomer ends in the small layer with
    /// probability 1/3 + 2/3 * 1/4 = 1/2, and choosing when to join does not raise it.
    /// (Grinding identities still can; `max_per_layer` bounds what that buys.)
    #[test]
    fn sybil_late_join_cannot_target_the_small_layer() {
        let id = |i: u16| {
            let mut b = [0u8; 32];
            b[..2].copy_from_slice(&i.to_be_bytes());
            b
        };
        let mut prior = BTreeMap::new();
        for i in 0..3 {
            prior.insert(id(i), 0u8);
        }
        for i in 3..6 {
            prior.insert(id(i), 1u8);
        }
        prior.insert(id(6), 2u8);
        let honest: Vec<NodeId> = (0..7).map(id).collect();
        let trials = 600u16;
        let mut in_small = 0;
        let mut old_rule_in_small = 0;
        for t in 0..trials {
            let attacker = id(1000 + t);
            let mut relays = honest.clone();
            relays.push(attacker);
            let seed = Sha256::digest(t.to_be_bytes()).into();
            let out = assign_layers(&own_operators(&relays), &prior, 3, &seed, &no_cap);
            if out[&attacker] == 2 {
                in_small += 1;
            }
            // The old rule: the newcomer to the smallest layer.
            let smallest = (0..3u8)
                .min_by_key(|l| prior.values().filter(|v| *v == l).count())
                .unwrap();
            if smallest == 2 {
                old_rule_in_small += 1;
            }
            // Balanced either way.
            let mut counts = [0usize; 3];
            for l in out.values() {
                counts[usize::from(*l)] += 1;
            }
            assert!(counts.iter().max().unwrap() - counts.iter().min().unwrap() <= 1);
        }
        assert_eq!(old_rule_in_small, trials);
        // 3/3/1 + 1 must become 3/3/2: the small layer gets one relay, the newcomer
        // with probability 1/3 (it hashed there) + 2/3 * 1/4 (moved from a layer of 4).
        let share = f64::from(in_small) / f64::from(trials);
        assert!((0.38..0.62).contains(&share), "{share}");
    }

    #[test]
    fn empty_layer_is_refilled_from_the_largest() {
        let id = |i: u8| [i; 32];
        // Everything in layer 1 left.
        let prior: BTreeMap<NodeId, u8> =
            [(id(1), 0), (id(2), 0), (id(3), 0), (id(5), 2), (id(6), 2)]
                .into_iter()
                .collect();
        let relays: Vec<NodeId> = [1, 2, 3, 5, 6].map(id).to_vec();
        let out = assign_layers(&own_operators(&relays), &prior, 3, &[7; 32], &no_cap);
        let mut counts = [0; 3];
        for l in out.values() {
            counts[usize::from(*l)] += 1;
        }
        assert_eq!(counts, [2, 1, 2]);
        // Only one relay moved, from layer 0.
        let moved: Vec<_> = out.iter().filter(|(k, v)| prior[*k] != **v).collect();
        assert_eq!(moved.len(), 1);
        assert_eq!(prior[moved[0].0], 0);
        // Too few relays to fill every layer: nothing moves.
        let out = assign_layers(
            &own_operators(&[id(1)]),
            &[(id(1), 2)].into_iter().collect(),
            3,
            &[7; 32],
            &no_cap,
        );
        assert_eq!(out[&id(1)], 2);
    }

    /// One family may hold at most `max_per_layer` relays of a layer, however its
    /// relays hash: the rest go to other layers, and what fits nowhere is left out.
    #[test]
    fn family_per_layer_cap_holds_in_assignment() {
        let id = |i: u8| [i; 32];
        let family = Hex32([0xee; 32]);
        let mut relays: Vec<(NodeId, Hex32)> = (1..=7).map(|i| (id(i), family)).collect();
        relays.extend((20..26).map(|i| (id(i), Hex32(id(i)))));
        let cap = |op: &Hex32| if *op == family { 2 } else { usize::MAX };
        for seed in 0..50u8 {
            let out = assign_layers(&relays, &BTreeMap::new(), 3, &[seed; 32], &cap);
            let mut per_layer = [0; 3];
            for (id, l) in &out {
                if relays.iter().any(|(r, op)| r == id && *op == family) {
                    per_layer[usize::from(*l)] += 1;
                }
            }
            assert!(per_layer.iter().all(|&n| n <= 2), "{per_layer:?}");
            // 7 family relays, room for 6.
            assert_eq!(per_layer.iter().sum::<usize>(), 6);
        }
    }

    proptest! {
        #[test]
        fn layers_from_empty_are_balanced(ids in proptest::collection::btree_set(any::<[u8; 32]>(), 0..80),
                                          seed in any::<[u8; 32]>()) {
            let relays: Vec<NodeId> = ids.into_iter().collect();
            let out = assign_layers(&own_operators(&relays), &BTreeMap::new(), 3, &seed, &no_cap);
            prop_assert_eq!(out.len(), relays.len());
            let mut counts = [0usize; 3];
            for l in out.values() {
                counts[usize::from(*l)] += 1;
            }
            let (min, max) = (counts.iter().min().copied(), counts.iter().max().copied());
            prop_assert!(max.unwrap_or(0) - min.unwrap_or(0) <= 1, "{:?}", counts);
        }

        #[test]
        fn kept_relays_keep_their_layer(ids in proptest::collection::btree_set(any::<[u8; 32]>(), 6..60),
                                        leave in proptest::collection::vec(any::<bool>(), 60),
                                        joiners in proptest::collection::btree_set(any::<[u8; 32]>(), 0..20)) {
            let relays: Vec<NodeId> = ids.iter().copied().collect();
            let first = assign_layers(&own_operators(&relays), &BTreeMap::new(), 3, &[1; 32], &no_cap);
            let mut next: Vec<NodeId> = relays.iter().zip(&leave).filter(|(_, l)| !**l).map(|(id, _)| *id).collect();
            next.extend(joiners.iter().filter(|j| !ids.contains(*j)));
            let second = assign_layers(&own_operators(&next), &first, 3, &[2; 32], &no_cap);
            let mut counts = [0usize; 3];
            for l in second.values() {
                counts[usize::from(*l)] += 1;
            }
            // Kept relays move only to rebalance: no more of them than it takes to
            // bring the kept relays' own layers within one of each other.
            let mut kept = [0usize; 3];
            for id in next.iter().filter(|id| first.contains_key(*id)) {
                kept[usize::from(first[id])] += 1;
            }
            let joiners = next.len() - kept.iter().sum::<usize>();
            let needed = (kept.iter().max().unwrap() - kept.iter().min().unwrap()) * 2 / 3 + 1 + joiners;
            let moved = next.iter().filter(|id| first.contains_key(*id) && second[*id] != first[*id]).count();
            prop_assert!(moved <= needed, "{} moved, {:?} kept, {} joined", moved, kept, joiners);
            prop_assert!(counts.iter().max().unwrap() - counts.iter().min().unwrap() <= 1, "{:?}", counts);
            if next.len() >= 3 {
                prop_assert!(counts.iter().all(|&c| c > 0), "{:?}", counts);
            }
        }
    }
}

//! Directory authority logic, sans-IO: collect descriptors, build the same document
//! as every other authority from the same inputs, sign it, gather the others'
//! signatures, and publish only with at least k of them.
//!
//! Agreement comes from determinism: authorities exchange descriptors (union, newest
//! wins per node) until their inputs match, so their bodies match byte for byte and
//! their signatures combine. A document that reached the threshold is final; an
//! authority that built a different body adopts the published one.

use std::collections::BTreeMap;

use ed25519_dalek::SigningKey;
use sha2::{Digest, Sha256};

use crate::document::AuthoritySignature;
use crate::{
    AuthoritySet, Descriptor, DocumentBody, EpochSchedule, Hex32, NetworkParams, NodeEntry, NodeId, Role,
    SignedDescriptor, SignedDocument, TopologyError, UncheckedDocument,
};

/// What every authority of a network must configure identically.
#[derive(Debug, Clone, PartialEq)]
pub struct AuthorityConfig {
    pub authorities: AuthoritySet,
    pub schedule: EpochSchedule,
    pub params: NetworkParams,
    /// A descriptor older than this (by its own timestamp) is left out of documents.
    pub descriptor_max_age_secs: u64,
}

#[derive(Debug)]
struct Ballot {
    body: String,
    parsed: DocumentBody,
    signatures: BTreeMap<[u8; 32], AuthoritySignature>,
}

/// One authority's state.
#[derive(Debug)]
pub struct Authority {
    key: SigningKey,
    config: AuthorityConfig,
    descriptors: BTreeMap<NodeId, (SignedDescriptor, Descriptor)>,
    ballots: BTreeMap<u64, Ballot>,
    published: BTreeMap<u64, (SignedDocument, DocumentBody)>,
}

impl Authority {
    pub fn new(key: SigningKey, config: AuthorityConfig) -> Result<Self, TopologyError> {
        config.authorities.validate()?;
        config.params.validate()?;
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
        })
    }

    pub fn id(&self) -> NodeId {
        self.key.verifying_key().to_bytes()
    }

    pub fn config(&self) -> &AuthorityConfig {
        &self.config
    }

    /// Accepts a node's descriptor if its signature checks and it is newer than what we hold.
    /// Returns whether it changed our inputs.
    pub fn handle_descriptor(&mut self, signed: SignedDescriptor, now_unix: u64) -> Result<bool, TopologyError> {
        let d = signed.check()?;
        if d.published_unix > now_unix.saturating_add(300) {
            return Err(TopologyError::Invalid {
                what: "descriptor published_unix",
                reason: "in the future".into(),
            });
        }
        match self.descriptors.get(&d.id()) {
            Some((_, old)) if old.published_unix >= d.published_unix => Ok(false),
            _ => {
                self.descriptors.insert(d.id(), (signed, d));
                Ok(true)
            }
        }
    }

    /// The descriptors we hold, for peers to merge.
    pub fn descriptors(&self) -> Vec<SignedDescriptor> {
        self.descriptors.values().map(|(s, _)| s.clone()).collect()
    }

    fn previous(&self, epoch: u64) -> Option<&DocumentBody> {
        epoch
            .checked_sub(1)
            .and_then(|p| self.published.get(&p))
            .map(|(_, b)| b)
    }

    /// Builds the body for `epoch` from our current inputs. Pure and deterministic.
    pub fn build_body(&self, epoch: u64) -> DocumentBody {
        let schedule = &self.config.schedule;
        let oldest = schedule.start_of(epoch).saturating_sub(self.config.descriptor_max_age_secs);
        let usable: Vec<&Descriptor> = self
            .descriptors
            .values()
            .map(|(_, d)| d)
            .filter(|d| d.published_unix >= oldest && d.key_for(epoch).is_some())
            .collect();
        let prev = self.previous(epoch);
        let shared_random = shared_random(epoch, prev.map(|p| p.shared_random.0), &usable);
        let prior: BTreeMap<NodeId, u8> = prev
            .map(|p| p.nodes.iter().filter_map(|n| n.layer.map(|l| (n.identity.0, l))).collect())
            .unwrap_or_default();
        let relays: Vec<NodeId> = usable.iter().filter(|d| d.role == Role::Relay).map(|d| d.id()).collect();
        let layers = assign_layers(&relays, &prior, shoal_packet::MIX_LAYERS, &shared_random);
        let nodes = usable
            .iter()
            .map(|d| NodeEntry {
                identity: d.identity,
                role: d.role,
                layer: layers.get(&d.id()).copied(),
                link_addr: d.link_addr.clone(),
                sphinx_keys: d
                    .sphinx_keys
                    .iter()
                    .filter(|k| k.epoch == epoch || k.epoch == epoch + 1)
                    .cloned()
                    .collect(),
            })
            .collect();
        DocumentBody {
            epoch,
            valid_after: schedule.start_of(epoch).saturating_sub(schedule.length_secs),
            valid_until: schedule.end_of(epoch).saturating_add(self.config.params.key_grace_secs),
            layers: shoal_packet::MIX_LAYERS as u8,
            params: self.config.params.clone(),
            shared_random: Hex32(shared_random),
            nodes,
        }
    }

    /// Builds (or rebuilds, if inputs changed) our body for `epoch` and signs it.
    /// A published epoch is final and returns its existing signature.
    pub fn vote(&mut self, epoch: u64) -> Result<AuthoritySignature, TopologyError> {
        let me = self.id();
        if let Some((doc, _)) = self.published.get(&epoch) {
            if let Some(s) = doc.signatures.iter().find(|s| s.authority.0 == me) {
                return Ok(s.clone());
            }
            return Ok(AuthoritySignature::sign(&self.key, &doc.body));
        }
        let parsed = self.build_body(epoch);
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

    /// Adds a peer's signature for `epoch`. Returns whether it matched our body.
    pub fn add_signature(&mut self, epoch: u64, sig: AuthoritySignature) -> bool {
        if !self.config.authorities.keys.contains(&sig.authority) {
            return false;
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
                signatures: b.signatures.into_values().collect(),
            };
            self.published.insert(epoch, (doc, b.parsed));
            self.prune(epoch);
        }
    }

    /// Adopts a document another authority published, if it carries enough valid signatures.
    pub fn adopt(&mut self, doc: SignedDocument) -> Result<u64, TopologyError> {
        let checked = UncheckedDocument::from_signed(doc.clone())?.check_signatures(&self.config.authorities)?;
        let topo = checked.dangerously_assume_timely()?;
        let epoch = topo.epoch();
        if !self.published.contains_key(&epoch) {
            self.ballots.remove(&epoch);
            self.published.insert(epoch, (doc, topo.body().clone()));
            self.prune(epoch);
        }
        Ok(epoch)
    }

    /// The published document for `epoch`, once it has at least k signatures.
    pub fn document(&self, epoch: u64) -> Option<&SignedDocument> {
        self.published.get(&epoch).map(|(d, _)| d)
    }

    /// Epochs with a published document.
    pub fn published_epochs(&self) -> Vec<u64> {
        self.published.keys().copied().collect()
    }

    fn prune(&mut self, newest: u64) {
        let keep_from = newest.saturating_sub(4);
        self.published.retain(|&e, _| e >= keep_from);
        self.ballots.retain(|&e, _| e >= keep_from);
    }
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

/// Stable layer assignment: a relay keeps the layer it had; a new relay joins the
/// smallest layer, in an order drawn from the shared randomness. Layers therefore do
/// not reshuffle between epochs, which would split anonymity sets.
pub fn assign_layers(
    relays: &[NodeId],
    prior: &BTreeMap<NodeId, u8>,
    layers: usize,
    shared_random: &[u8; 32],
) -> BTreeMap<NodeId, u8> {
    let mut out = BTreeMap::new();
    let mut counts = vec![0usize; layers];
    let mut fresh = Vec::new();
    for id in relays {
        match prior.get(id) {
            Some(&l) if usize::from(l) < layers => {
                counts[usize::from(l)] += 1;
                out.insert(*id, l);
            }
            _ => fresh.push(*id),
        }
    }
    fresh.sort_by_key(|id| {
        let mut h = Sha256::new();
        h.update(shared_random);
        h.update(id);
        <[u8; 32]>::from(h.finalize())
    });
    for id in fresh {
        let (layer, _) = counts
            .iter()
            .enumerate()
            .min_by_key(|&(i, c)| (*c, i))
            .unwrap_or((0, &0));
        counts[layer] += 1;
        out.insert(id, layer as u8);
    }
    out
}

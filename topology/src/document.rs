//! The directory document for one epoch, signed by k of N authorities, and the
//! chain of types that checks it: bytes → [`UncheckedDocument`] →
//! [`SignatureChecked`] → [`Topology`].

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::{Hex32, Hex64, NetworkParams, NodeId, Role, SphinxKeyEntry, TopologyError};

/// One node as the directory lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeEntry {
    pub identity: Hex32,
    pub role: Role,
    /// Mix layer (0-based) for relays; `None` for gateways.
    pub layer: Option<u8>,
    pub link_addr: String,
    /// Keys for this document's epoch and the next, so packets built at an epoch
    /// edge with either key are accepted.
    pub sphinx_keys: Vec<SphinxKeyEntry>,
}

/// What the authorities agree on and sign for one epoch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DocumentBody {
    pub epoch: u64,
    pub valid_after: u64,
    pub valid_until: u64,
    pub layers: u8,
    pub params: NetworkParams,
    /// Randomness every node agrees on; seeds the layer assignment of new relays.
    pub shared_random: Hex32,
    /// Sorted by identity.
    pub nodes: Vec<NodeEntry>,
}

impl DocumentBody {
    /// The canonical bytes authorities sign.
    pub fn to_bytes(&self) -> Result<String, TopologyError> {
        serde_json::to_string(self).map_err(|e| TopologyError::Malformed {
            what: "document body",
            reason: e.to_string(),
        })
    }
}

/// The authorities whose signatures count, and how many must sign.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthoritySet {
    pub threshold: usize,
    pub keys: Vec<Hex32>,
}

impl AuthoritySet {
    pub fn validate(&self) -> Result<(), TopologyError> {
        let distinct: BTreeSet<_> = self.keys.iter().collect();
        if self.threshold == 0 || self.threshold > distinct.len() || distinct.len() != self.keys.len() {
            return Err(TopologyError::Invalid {
                what: "authority set",
                reason: format!(
                    "threshold {} of {} keys ({} distinct)",
                    self.threshold,
                    self.keys.len(),
                    distinct.len()
                ),
            });
        }
        Ok(())
    }

    /// Threshold for a majority of `n`: more than half.
    pub fn majority(keys: Vec<Hex32>) -> Self {
        AuthoritySet {
            threshold: keys.len() / 2 + 1,
            keys,
        }
    }
}

/// One authority's signature over a document body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthoritySignature {
    pub authority: Hex32,
    pub signature: Hex64,
}

impl AuthoritySignature {
    pub fn sign(key: &SigningKey, body: &str) -> Self {
        AuthoritySignature {
            authority: Hex32(key.verifying_key().to_bytes()),
            signature: Hex64(key.sign(body.as_bytes()).to_bytes()),
        }
    }

    pub fn verify(&self, body: &str) -> bool {
        VerifyingKey::from_bytes(&self.authority.0).is_ok_and(|k| {
            k.verify(body.as_bytes(), &Signature::from_bytes(&self.signature.0))
                .is_ok()
        })
    }
}

/// A document as it travels: the exact signed bytes and the signatures gathered so far.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedDocument {
    pub body: String,
    pub signatures: Vec<AuthoritySignature>,
}

impl SignedDocument {
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// A parsed document whose signatures have not been checked. Nothing in it may be used.
#[derive(Debug)]
pub struct UncheckedDocument {
    signed: SignedDocument,
    body: DocumentBody,
}

impl UncheckedDocument {
    pub fn parse(bytes: &[u8]) -> Result<Self, TopologyError> {
        let signed: SignedDocument = serde_json::from_slice(bytes).map_err(|e| TopologyError::Malformed {
            what: "signed document",
            reason: e.to_string(),
        })?;
        Self::from_signed(signed)
    }

    pub fn from_signed(signed: SignedDocument) -> Result<Self, TopologyError> {
        let body: DocumentBody = serde_json::from_str(&signed.body).map_err(|e| TopologyError::Malformed {
            what: "document body",
            reason: e.to_string(),
        })?;
        Ok(UncheckedDocument { signed, body })
    }

    /// The epoch the document claims; for routing the fetch, not for trusting it.
    pub fn claimed_epoch(&self) -> u64 {
        self.body.epoch
    }

    /// Requires at least `threshold` valid signatures from distinct authorities in `auths`.
    pub fn check_signatures(self, auths: &AuthoritySet) -> Result<SignatureChecked, TopologyError> {
        auths.validate()?;
        let trusted: BTreeSet<[u8; 32]> = auths.keys.iter().map(|k| k.0).collect();
        let valid: BTreeSet<[u8; 32]> = self
            .signed
            .signatures
            .iter()
            .filter(|s| trusted.contains(&s.authority.0) && s.verify(&self.signed.body))
            .map(|s| s.authority.0)
            .collect();
        if valid.len() < auths.threshold {
            return Err(TopologyError::NotEnoughSignatures {
                epoch: self.body.epoch,
                valid: valid.len(),
                needed: auths.threshold,
            });
        }
        Ok(SignatureChecked {
            signed: self.signed,
            body: self.body,
        })
    }

    /// Skips signature checks. For tests and the simulator only.
    pub fn dangerously_assume_signed(self) -> SignatureChecked {
        SignatureChecked {
            signed: self.signed,
            body: self.body,
        }
    }
}

/// A document with enough valid signatures, not yet checked against the clock.
#[derive(Debug)]
pub struct SignatureChecked {
    signed: SignedDocument,
    body: DocumentBody,
}

impl SignatureChecked {
    pub fn check_valid_at(self, now_unix: u64) -> Result<Topology, TopologyError> {
        let b = &self.body;
        if now_unix < b.valid_after || now_unix > b.valid_until {
            return Err(TopologyError::NotValidAt {
                epoch: b.epoch,
                valid_after: b.valid_after,
                valid_until: b.valid_until,
                now: now_unix,
            });
        }
        self.dangerously_assume_timely()
    }

    /// Skips the validity window. For tests and the simulator only.
    pub fn dangerously_assume_timely(self) -> Result<Topology, TopologyError> {
        Topology::from_body(self.body, self.signed)
    }
}

/// A node's routing facts, ready to use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutingNode {
    pub id: NodeId,
    pub role: Role,
    pub layer: Option<u8>,
    pub addr: SocketAddr,
    /// Sphinx keys by epoch.
    pub sphinx_keys: BTreeMap<u64, [u8; 32]>,
}

/// A verified, timely directory: the pure view every component routes with.
#[derive(Debug, Clone)]
pub struct Topology {
    body: DocumentBody,
    signed: SignedDocument,
    nodes: BTreeMap<NodeId, RoutingNode>,
    layers: Vec<Vec<NodeId>>,
    gateways: Vec<NodeId>,
}

impl Topology {
    fn from_body(body: DocumentBody, signed: SignedDocument) -> Result<Self, TopologyError> {
        body.params.validate()?;
        if body.layers == 0 || usize::from(body.layers) != shoal_packet::MIX_LAYERS {
            return Err(TopologyError::Invalid {
                what: "document layers",
                reason: format!("{} (routes need exactly {})", body.layers, shoal_packet::MIX_LAYERS),
            });
        }
        let mut nodes = BTreeMap::new();
        let mut layers = vec![Vec::new(); usize::from(body.layers)];
        let mut gateways = Vec::new();
        for n in &body.nodes {
            let addr: SocketAddr = n.link_addr.parse().map_err(|_| TopologyError::Invalid {
                what: "node link_addr",
                reason: "not ip:port".into(),
            })?;
            match (n.role, n.layer) {
                (Role::Relay, Some(l)) if l < body.layers => layers[usize::from(l)].push(n.identity.0),
                (Role::Gateway, None) => gateways.push(n.identity.0),
                _ => {
                    return Err(TopologyError::Invalid {
                        what: "node layer",
                        reason: "relays need a layer below `layers`, gateways none".into(),
                    });
                }
            }
            let routing = RoutingNode {
                id: n.identity.0,
                role: n.role,
                layer: n.layer,
                addr,
                sphinx_keys: n.sphinx_keys.iter().map(|k| (k.epoch, k.key.0)).collect(),
            };
            if nodes.insert(n.identity.0, routing).is_some() {
                return Err(TopologyError::Invalid {
                    what: "document nodes",
                    reason: "duplicate identity".into(),
                });
            }
        }
        Ok(Topology {
            body,
            signed,
            nodes,
            layers,
            gateways,
        })
    }

    pub fn epoch(&self) -> u64 {
        self.body.epoch
    }

    pub fn params(&self) -> &NetworkParams {
        &self.body.params
    }

    pub fn body(&self) -> &DocumentBody {
        &self.body
    }

    /// The signed form, to serve onwards (gateways serve it to their clients).
    pub fn signed(&self) -> &SignedDocument {
        &self.signed
    }

    pub fn node(&self, id: &NodeId) -> Option<&RoutingNode> {
        self.nodes.get(id)
    }

    pub fn nodes(&self) -> impl Iterator<Item = &RoutingNode> {
        self.nodes.values()
    }

    /// Relays of mix layer `layer` (0-based).
    pub fn layer(&self, layer: usize) -> &[NodeId] {
        self.layers.get(layer).map(Vec::as_slice).unwrap_or(&[])
    }

    pub fn gateways(&self) -> &[NodeId] {
        &self.gateways
    }

    /// The layer assignment, for carrying into the next epoch's document.
    pub fn layer_assignment(&self) -> BTreeMap<NodeId, u8> {
        self.nodes
            .values()
            .filter_map(|n| n.layer.map(|l| (n.id, l)))
            .collect()
    }
}

//! The directory document for one epoch, signed by k of N authorities, and the
//! chain of types that checks it: bytes → [`UncheckedDocument`] →
//! [`SignatureChecked`] → [`Topology`].

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::{
    EpochSchedule, Hex32, Hex64, NetworkParams, NodeId, Role, SphinxKeyEntry, TopologyError,
};

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
    /// The admitted operator that certified this node: its family. A route holds at
    /// most one node of a family.
    pub operator: Hex32,
}

/// What the authorities agree on and sign for one epoch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DocumentBody {
    pub epoch: u64,
    pub valid_after: u64,
    pub valid_until: u64,
    /// The epoch schedule, signed with everything else, so that no one on the path
    /// to an authority can shift a node's idea of when epochs start.
    pub schedule: EpochSchedule,
    pub layers: u8,
    pub params: NetworkParams,
    /// Randomness every node agrees on; seeds the layer assignment of new relays.
    pub shared_random: Hex32,
    /// Sorted by identity.
    pub nodes: Vec<NodeEntry>,
}

impl DocumentBody {
    /// Unix second at which this document's epoch starts, by its signed schedule.
    pub fn epoch_start(&self) -> u64 {
        self.schedule.start_of(self.epoch)
    }

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
        if self.threshold == 0
            || self.threshold > distinct.len()
            || distinct.len() != self.keys.len()
        {
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

    /// A short name for this trust root that people compare out of band (as the
    /// network's operators publish it, and as `shoal client init` shows it): SHA-256 over
    /// a domain, the threshold and the keys in sorted order, its first 16 bytes in hex
    /// groups of four. Key order does not matter; any other change gives another name.
    pub fn fingerprint(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut keys: Vec<&Hex32> = self.keys.iter().collect();
        keys.sort();
        let mut h = Sha256::new();
        h.update(b"shoal network trust root v1");
        h.update((self.threshold as u64).to_be_bytes());
        for k in keys {
            h.update(k.0);
        }
        let hex = hex::encode(&h.finalize()[..16]);
        let groups: Vec<&str> = (0..hex.len()).step_by(4).map(|i| &hex[i..i + 4]).collect();
        groups.join("-")
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

/// What an authority's `/v1/network` says: the schedule and parameters a node needs
/// before it holds any document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkBody {
    pub schedule: crate::EpochSchedule,
    pub params: NetworkParams,
    pub authorities: AuthoritySet,
}

/// A [`NetworkBody`] signed by the authority that serves it, so that no one on the
/// path can shift a node's epoch schedule: a node takes it only with the signature of
/// the authority it asked, as configured.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedNetwork {
    pub body: String,
    pub signature: AuthoritySignature,
}

impl SignedNetwork {
    pub fn sign(key: &SigningKey, body: &NetworkBody) -> Result<Self, TopologyError> {
        let body = serde_json::to_string(body).map_err(|e| TopologyError::Malformed {
            what: "network body",
            reason: e.to_string(),
        })?;
        Ok(SignedNetwork {
            signature: AuthoritySignature::sign(key, &body),
            body,
        })
    }

    /// The body, if `authority` signed it.
    pub fn check(&self, authority: &[u8; 32]) -> Result<NetworkBody, TopologyError> {
        if self.signature.authority.0 != *authority || !self.signature.verify(&self.body) {
            return Err(TopologyError::BadSignature {
                what: "network description",
            });
        }
        let body: NetworkBody =
            serde_json::from_str(&self.body).map_err(|e| TopologyError::Malformed {
                what: "network body",
                reason: e.to_string(),
            })?;
        if body.schedule.length_secs == 0 {
            return Err(TopologyError::Invalid {
                what: "network schedule",
                reason: "zero epoch length".into(),
            });
        }
        Ok(body)
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
        let signed: SignedDocument =
            serde_json::from_slice(bytes).map_err(|e| TopologyError::Malformed {
                what: "signed document",
                reason: e.to_string(),
            })?;
        Self::from_signed(signed)
    }

    pub fn from_signed(signed: SignedDocument) -> Result<Self, TopologyError> {
        let body: DocumentBody =
            serde_json::from_str(&signed.body).map_err(|e| TopologyError::Malformed {
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
    /// Its operator (family).
    pub operator: NodeId,
    /// Its network (/16 for IPv4), see [`crate::operator::network_group`].
    pub group: [u8; 5],
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
        let start = body.schedule.start_of(body.epoch);
        if body.schedule.length_secs == 0
            || start < body.valid_after
            || start > body.valid_until
            || body.schedule.epoch_at(start) != body.epoch
        {
            return Err(TopologyError::Invalid {
                what: "document schedule",
                reason: "the epoch does not start inside the validity window".into(),
            });
        }
        if body.layers == 0 || usize::from(body.layers) != shoal_packet::MIX_LAYERS {
            return Err(TopologyError::Invalid {
                what: "document layers",
                reason: format!(
                    "{} (routes need exactly {})",
                    body.layers,
                    shoal_packet::MIX_LAYERS
                ),
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
                (Role::Relay, Some(l)) if l < body.layers => {
                    layers[usize::from(l)].push(n.identity.0)
                }
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
                operator: n.operator.0,
                group: crate::operator::network_group(&addr),
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

    /// The key epoch to build packets with while the wall clock is in `wall_epoch`: this
    /// document's own, or, when its successor is late, the next epoch's keys, which this
    /// document carries too. So a missed or late vote is not a dead epoch: traffic goes on
    /// with the last valid document for one epoch, and never falls back to older keys
    /// (the nodes retire those after their grace period).
    pub fn key_epoch_at(&self, wall_epoch: u64) -> u64 {
        wall_epoch.clamp(self.epoch(), self.epoch() + 1)
    }

    pub fn params(&self) -> &NetworkParams {
        &self.body.params
    }

    /// The epoch schedule the authorities signed.
    pub fn schedule(&self) -> &EpochSchedule {
        &self.body.schedule
    }

    /// Whether clients can route with it: every mix layer and at least one gateway.
    pub fn is_usable(&self) -> bool {
        !self.gateways.is_empty() && self.layers.iter().all(|l| !l.is_empty())
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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
pub(crate) mod tests {
    use super::*;

    /// Authority key `i`, from a fixed seed.
    pub(crate) fn authority_key(i: u8) -> SigningKey {
        SigningKey::from_bytes(&[0xa0 + i; 32])
    }

    pub(crate) fn authority_set(n: u8, threshold: usize) -> AuthoritySet {
        AuthoritySet {
            threshold,
            keys: (0..n)
                .map(|i| Hex32(authority_key(i).verifying_key().to_bytes()))
                .collect(),
        }
    }

    #[test]
    fn fingerprint_names_keys_and_threshold_not_their_order() {
        let set = authority_set(3, 2);
        let fp = set.fingerprint();
        assert_eq!(fp.len(), 16 * 2 + 7, "{fp}");
        let mut reordered = set.clone();
        reordered.keys.reverse();
        assert_eq!(reordered.fingerprint(), fp);
        let mut rogue = set.clone();
        rogue.keys[2] = Hex32([0xee; 32]);
        assert_ne!(rogue.fingerprint(), fp);
        assert_ne!(authority_set(3, 1).fingerprint(), fp);
        assert_ne!(authority_set(2, 2).fingerprint(), fp);
    }

    /// Node key `i`, from a fixed seed.
    pub(crate) fn node_key(i: u8) -> SigningKey {
        SigningKey::from_bytes(&[i; 32])
    }

    /// The operator of node `i` in the sample: each node its own operator.
    pub(crate) fn operator_id(i: u8) -> Hex32 {
        Hex32(operator_key(i).verifying_key().to_bytes())
    }

    /// Operator key `i`, from a fixed seed.
    pub(crate) fn operator_key(i: u8) -> SigningKey {
        SigningKey::from_bytes(&[0x40 ^ i; 32])
    }

    /// The Sphinx public key node `i` publishes for `epoch`, from a fixed secret.
    pub(crate) fn sphinx_key(i: u8, epoch: u64) -> Hex32 {
        let mut secret = [i; 32];
        secret[0] = epoch as u8;
        Hex32(x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from(secret)).to_bytes())
    }

    /// Epoch 7 of a 100-second schedule starting at 1000: 3 relays per layer and two
    /// gateways, keys for epochs 7 and 8.
    pub(crate) fn sample_body() -> DocumentBody {
        let epoch = 7;
        let mut nodes: Vec<NodeEntry> = (1..=11u8)
            .map(|i| {
                let (role, layer) = if i <= 9 {
                    (Role::Relay, Some((i - 1) % 3))
                } else {
                    (Role::Gateway, None)
                };
                NodeEntry {
                    identity: Hex32(node_key(i).verifying_key().to_bytes()),
                    role,
                    layer,
                    link_addr: format!("127.0.0.1:{}", 4000 + u16::from(i)),
                    sphinx_keys: [epoch, epoch + 1]
                        .iter()
                        .map(|&e| SphinxKeyEntry {
                            epoch: e,
                            key: sphinx_key(i, e),
                        })
                        .collect(),
                    operator: operator_id(i),
                }
            })
            .collect();
        nodes.sort_by_key(|n| n.identity);
        DocumentBody {
            epoch,
            valid_after: 1600,
            valid_until: 1860,
            schedule: EpochSchedule {
                genesis_unix: 1000,
                length_secs: 100,
            },
            layers: 3,
            params: NetworkParams::default(),
            shared_random: Hex32([0x5a; 32]),
            nodes,
        }
    }

    pub(crate) fn sign(body: &str, signers: &[&SigningKey]) -> SignedDocument {
        SignedDocument {
            body: body.to_owned(),
            signatures: signers
                .iter()
                .map(|k| AuthoritySignature::sign(k, body))
                .collect(),
        }
    }

    fn check(
        doc: &SignedDocument,
        auths: &AuthoritySet,
        now: u64,
    ) -> Result<Topology, TopologyError> {
        UncheckedDocument::parse(&doc.to_json())?
            .check_signatures(auths)?
            .check_valid_at(now)
    }

    #[test]
    fn chain_accepts_k_of_n() {
        let body = sample_body().to_bytes().unwrap();
        let (a, b, c) = (authority_key(0), authority_key(1), authority_key(2));
        let auths = authority_set(3, 2);
        for signers in [vec![&a, &b], vec![&b, &c], vec![&a, &b, &c]] {
            let topo = check(&sign(&body, &signers), &auths, 1750).unwrap();
            assert_eq!(topo.epoch(), 7);
            assert_eq!(topo.body(), &sample_body());
            assert_eq!(topo.gateways().len(), 2);
            assert!((0..3).all(|l| topo.layer(l).len() == 3));
            assert_eq!(topo.signed().body, body);
            assert_eq!(topo.layer_assignment().len(), 9);
        }
    }

    #[test]
    fn chain_rejects_fewer_than_k() {
        let body = sample_body().to_bytes().unwrap();
        let doc = sign(&body, &[&authority_key(0)]);
        let err = check(&doc, &authority_set(3, 2), 1750).unwrap_err();
        assert!(
            matches!(
                err,
                TopologyError::NotEnoughSignatures {
                    epoch: 7,
                    valid: 1,
                    needed: 2
                }
            ),
            "{err}"
        );
        assert!(check(&sign(&body, &[]), &authority_set(3, 2), 1750).is_err());
    }

    #[test]
    fn duplicate_signatures_count_once() {
        let body = sample_body().to_bytes().unwrap();
        let a = authority_key(0);
        let doc = sign(&body, &[&a, &a, &a]);
        let err = check(&doc, &authority_set(3, 2), 1750).unwrap_err();
        assert!(
            matches!(err, TopologyError::NotEnoughSignatures { valid: 1, .. }),
            "{err}"
        );
    }

    #[test]
    fn signatures_outside_the_set_are_ignored() {
        let body = sample_body().to_bytes().unwrap();
        let (a, b) = (authority_key(0), authority_key(1));
        let outsider = authority_key(9);
        let auths = authority_set(3, 2);
        let err = check(&sign(&body, &[&a, &outsider]), &auths, 1750).unwrap_err();
        assert!(
            matches!(err, TopologyError::NotEnoughSignatures { valid: 1, .. }),
            "{err}"
        );
        check(&sign(&body, &[&outsider, &a, &b]), &auths, 1750).unwrap();
        // An outsider's signature relabelled as a member's does not verify.
        let mut forged = sign(&body, &[&a, &outsider]);
        forged.signatures[1].authority = Hex32(b.verifying_key().to_bytes());
        assert!(check(&forged, &auths, 1750).is_err());
    }

    #[test]
    fn tampered_body_is_rejected() {
        let body = sample_body().to_bytes().unwrap();
        let mut doc = sign(&body, &[&authority_key(0), &authority_key(1)]);
        doc.body = doc.body.replace("127.0.0.1:4001", "127.0.0.1:4999");
        assert_ne!(doc.body, body);
        let err = check(&doc, &authority_set(3, 2), 1750).unwrap_err();
        assert!(
            matches!(err, TopologyError::NotEnoughSignatures { valid: 0, .. }),
            "{err}"
        );
        // Re-encoding with different whitespace also breaks the signatures: they are over bytes.
        let mut spaced = sign(&body, &[&authority_key(0), &authority_key(1)]);
        spaced.body = format!(" {}", spaced.body);
        assert!(check(&spaced, &authority_set(3, 2), 1750).is_err());
    }

    #[test]
    fn validity_window_is_enforced() {
        let body = sample_body().to_bytes().unwrap();
        let doc = sign(&body, &[&authority_key(0), &authority_key(1)]);
        let auths = authority_set(3, 2);
        for now in [1600, 1700, 1860] {
            check(&doc, &auths, now).unwrap();
        }
        for now in [0, 1599, 1861, u64::MAX] {
            let err = check(&doc, &auths, now).unwrap_err();
            assert!(
                matches!(err, TopologyError::NotValidAt { epoch: 7, .. }),
                "{err}"
            );
        }
    }

    #[test]
    fn malformed_json_is_rejected() {
        let body = sample_body().to_bytes().unwrap();
        let a = authority_key(0);
        let mut with_unknown = body.clone();
        with_unknown.insert_str(1, "\"extra\":1,");
        let cases: Vec<Vec<u8>> = vec![
            b"".to_vec(),
            b"{".to_vec(),
            b"[]".to_vec(),
            br#"{"body":"{}","signatures":[]}"#.to_vec(),
            br#"{"body":"not json","signatures":[]}"#.to_vec(),
            br#"{"body":"{}","signatures":[],"more":1}"#.to_vec(),
            sign(&with_unknown, &[&a]).to_json(),
            sign(&body, &[&a])
                .to_json()
                .iter()
                .map(|&c| if c == b'"' { b'\'' } else { c })
                .collect(),
        ];
        for bytes in cases {
            let err = UncheckedDocument::parse(&bytes).unwrap_err();
            assert!(matches!(err, TopologyError::Malformed { .. }), "{err}");
        }
        // A signature that is not 64 bytes of hex.
        let mut short = serde_json::to_value(sign(&body, &[&a])).unwrap();
        short["signatures"][0]["signature"] = "abcd".into();
        let err = UncheckedDocument::parse(short.to_string().as_bytes()).unwrap_err();
        assert!(matches!(err, TopologyError::Malformed { .. }), "{err}");
    }

    #[test]
    fn invalid_params_and_nodes_are_rejected_after_signatures() {
        let keys = [authority_key(0), authority_key(1)];
        let auths = authority_set(3, 2);
        let mutations: Vec<fn(&mut DocumentBody)> = vec![
            |b| b.params.frame_size += 1,
            |b| b.params.mean_hop_delay_ms = -1.0,
            |b| b.params.max_hop_delay_ms = 1.0,
            |b| b.params.lambda_p = 1e9,
            |b| b.layers = 2,
            |b| b.nodes[0].layer = Some(3),
            |b| {
                let g = b
                    .nodes
                    .iter_mut()
                    .find(|n| n.role == Role::Gateway)
                    .unwrap();
                g.layer = Some(0);
            },
            |b| b.nodes[0].link_addr = "nowhere".into(),
            |b| {
                let n = b.nodes[0].clone();
                b.nodes.push(n);
            },
        ];
        for (i, mutate) in mutations.into_iter().enumerate() {
            let mut body = sample_body();
            mutate(&mut body);
            let doc = sign(&body.to_bytes().unwrap(), &[&keys[0], &keys[1]]);
            let err = check(&doc, &auths, 1750).unwrap_err();
            assert!(
                matches!(err, TopologyError::Invalid { .. }),
                "case {i}: {err}"
            );
        }
    }

    #[test]
    fn invalid_authority_sets_are_rejected() {
        let body = sample_body().to_bytes().unwrap();
        let doc = sign(&body, &[&authority_key(0), &authority_key(1)]);
        let mut dup = authority_set(2, 1);
        dup.keys.push(dup.keys[0]);
        for auths in [authority_set(3, 0), authority_set(3, 4), dup] {
            let err = check(&doc, &auths, 1750).unwrap_err();
            assert!(
                matches!(
                    err,
                    TopologyError::Invalid {
                        what: "authority set",
                        ..
                    }
                ),
                "{err}"
            );
        }
        assert_eq!(
            AuthoritySet::majority(authority_set(3, 0).keys).threshold,
            2
        );
        assert_eq!(
            AuthoritySet::majority(authority_set(4, 0).keys).threshold,
            3
        );
    }

    /// A man in the middle of `/v1/network` shifts the schedule (so the node would make
    /// keys for the wrong epochs): the signature no longer checks, and a body signed by
    /// another key (even another authority's) is not taken either.
    #[test]
    fn admission_network_description_resists_a_man_in_the_middle() {
        let key = authority_key(0);
        let me = key.verifying_key().to_bytes();
        let body = NetworkBody {
            schedule: EpochSchedule {
                genesis_unix: 1000,
                length_secs: 100,
            },
            params: NetworkParams::default(),
            authorities: authority_set(3, 2),
        };
        let signed = SignedNetwork::sign(&key, &body).unwrap();
        assert_eq!(signed.check(&me).unwrap(), body);
        let mut shifted = signed.clone();
        shifted.body = shifted
            .body
            .replace("\"genesis_unix\":1000", "\"genesis_unix\":1050");
        assert_ne!(shifted.body, signed.body);
        assert!(shifted.check(&me).is_err());
        // Re-signed by the attacker's own key, claiming to be the authority.
        let mut resigned = SignedNetwork::sign(&authority_key(9), &body).unwrap();
        assert!(resigned.check(&me).is_err());
        resigned.signature.authority = Hex32(me);
        assert!(resigned.check(&me).is_err());
        // Another authority's genuine signature is not the one asked.
        let other = SignedNetwork::sign(&authority_key(1), &body).unwrap();
        assert!(other.check(&me).is_err());
    }

    /// Fixed keys → exact bytes; decode → re-encode gives the same bytes, and the
    /// signature of authority 0 over them is fixed (Ed25519 is deterministic).
    #[test]
    fn testvec_document_body() {
        // The sample, cut to one relay and one gateway to keep the vector short.
        let mut expected = sample_body();
        expected
            .nodes
            .retain(|n| ["127.0.0.1:4001", "127.0.0.1:4010"].contains(&n.link_addr.as_str()));
        let body = expected.to_bytes().unwrap();
        assert_eq!(body, TESTVEC_BODY, "\n{body}\n");
        let decoded: DocumentBody = serde_json::from_str(TESTVEC_BODY).unwrap();
        assert_eq!(decoded, expected);
        assert_eq!(decoded.to_bytes().unwrap(), TESTVEC_BODY);
        let sig = AuthoritySignature::sign(&authority_key(0), TESTVEC_BODY);
        assert_eq!(hex::encode(sig.signature.0), TESTVEC_SIGNATURE);
        assert_eq!(hex::encode(sig.authority.0), TESTVEC_AUTHORITY);
        let doc = SignedDocument {
            body: TESTVEC_BODY.into(),
            signatures: vec![sig],
        };
        let json = doc.to_json();
        let reparsed: SignedDocument = serde_json::from_slice(&json).unwrap();
        assert_eq!(reparsed.to_json(), json);
        UncheckedDocument::parse(&json)
            .unwrap()
            .check_signatures(&authority_set(3, 1))
            .unwrap();
    }

    const TESTVEC_BODY: &str = concat!(
        r#"{"epoch":7,"valid_after":1600,"valid_until":1860,"#,
        r#""schedule":{"genesis_unix":1000,"length_secs":100},"layers":3,"#,
        r#""params":{"mean_hop_delay_ms":50.0,"max_hop_delay_ms":1000.0,"lambda_p":2.0,"lambda_l":0.5,"#,
        r#""lambda_d":0.5,"lambda_m":0.5,"frame_size":2400,"key_grace_secs":60},"#,
        r#""shared_random":"5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a","nodes":["#,
        r#"{"identity":"43a72e714401762df66b68c26dfbdf2682aaec9f2474eca4613e424a0fbafd3c","#,
        r#""role":"gateway","layer":null,"link_addr":"127.0.0.1:4010","sphinx_keys":["#,
        r#"{"epoch":7,"key":"6c01eb150e9d00778728c5ab4416da158dc2e33078a52e8ed28be8b710b98156"},"#,
        r#"{"epoch":8,"key":"f77ff4b10788bfdca62ca0bb160d427cf5762d85f2b5cad6807ec9c3febbde09"}],"#,
        r#""operator":"353c8a7feeca38b2c4536e0bd2586fdb18d070e50e059f1d43f8bfefb97a7ce1"},"#,
        r#"{"identity":"8a88e3dd7409f195fd52db2d3cba5d72ca6709bf1d94121bf3748801b40f6f5c","#,
        r#""role":"relay","layer":0,"link_addr":"127.0.0.1:4001","sphinx_keys":["#,
        r#"{"epoch":7,"key":"a4e09292b651c278b9772c569f5fa9bb13d906b46ab68c9df9dc2b4409f8a209"},"#,
        r#"{"epoch":8,"key":"0fd16a33e45c8c8fc31462cc57cf2e7bdf997e5fa9d3bfc731f3120398751633"}],"#,
        r#""operator":"db995fe25169d141cab9bbba92baa01f9f2e1ece7df4cb2ac05190f37fcc1f9d"}]}"#,
    );
    const TESTVEC_AUTHORITY: &str =
        "b533d8ad9fcfbdde0b481c1b334ddc3c53412fd614564e7e5afd020368d382c3";
    const TESTVEC_SIGNATURE: &str = concat!(
        "eddd6ad88c5c05a7d194bee04a12019b6bc28f4fb95ffed4ac3debf6d405f297",
        "776f26370e422887dc8e8036a4ca9a84e8956008517fea5ebb247b9262d9cb04",
    );
}

//! Who may run a node: operators admitted by the authorities, and the certificates
//! with which an operator vouches for its own nodes.
//!
//! The admission model (docs/threat-model.md, "Who may run a node"):
//!
//! - Every authority lists the admitted operators in its configuration (`operators.toml`),
//!   each with its caps. An authority takes a descriptor only if it carries a
//!   [`NodeCertificate`] from an operator it admits, and only up to that operator's caps.
//! - A document needs k of N authority signatures over one body, and each authority
//!   signs only the body its own inputs build. So a node reaches a document only if at
//!   least k authorities, each on its own, admit its operator: the same k-of-N rule that
//!   protects the document protects admission. One authority that adds an operator
//!   alone builds a body nobody else signs.
//! - The operator of every node is listed in the signed document ([`crate::NodeEntry`]),
//!   so clients can keep one operator (a family) to one hop of a route.

use std::collections::BTreeMap;

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::{Hex32, Hex64, NodeId, Role, TopologyError};

/// Longest operator name, in bytes.
pub const MAX_OPERATOR_NAME: usize = 64;

/// One admitted operator and what it may run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdmittedOperator {
    /// The operator's Ed25519 public key; it signs its nodes' certificates.
    pub key: Hex32,
    /// A label for people (who runs it); not used in any decision.
    pub name: String,
    /// Most nodes (relays and gateways) of this operator in a document.
    pub max_nodes: u32,
    /// Most relays of this operator in one mix layer.
    pub max_per_layer: u32,
}

impl AdmittedOperator {
    /// An operator with room for one node, as in test networks where every node is its
    /// own operator (its own family).
    pub fn solo(operator: &SigningKey, name: impl Into<String>) -> Self {
        AdmittedOperator {
            key: Hex32(operator.verifying_key().to_bytes()),
            name: name.into(),
            max_nodes: 1,
            max_per_layer: 1,
        }
    }
}

/// The operator key of a node that is its own operator, derived from the node's own
/// secret key (test networks and the simulator: no extra key to keep or seed).
pub fn solo_operator_key(node: &SigningKey) -> SigningKey {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(b"shoal solo operator v1");
    h.update(node.to_bytes());
    SigningKey::from_bytes(&h.finalize().into())
}

/// The operators an authority admits, by key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Admission {
    operators: BTreeMap<Hex32, AdmittedOperator>,
}

impl Admission {
    /// Checks the list: distinct keys that are curve points, short names, caps of at
    /// least one.
    pub fn new(operators: Vec<AdmittedOperator>) -> Result<Self, TopologyError> {
        let mut map = BTreeMap::new();
        for op in operators {
            let bad = |reason: String| TopologyError::Invalid {
                what: "admitted operator",
                reason,
            };
            if VerifyingKey::from_bytes(&op.key.0).is_err() {
                return Err(bad(format!("{:?} is not an Ed25519 public key", op.key)));
            }
            if op.name.len() > MAX_OPERATOR_NAME || op.name.chars().any(char::is_control) {
                return Err(bad(format!(
                    "the name of {:?} must be at most {MAX_OPERATOR_NAME} bytes, no control characters",
                    op.key
                )));
            }
            if op.max_nodes == 0 || op.max_per_layer == 0 {
                return Err(bad(format!(
                    "{:?}: max_nodes and max_per_layer must be at least 1",
                    op.key
                )));
            }
            if map.insert(op.key, op.clone()).is_some() {
                return Err(bad(format!("{:?} is listed twice", op.key)));
            }
        }
        Ok(Admission { operators: map })
    }

    pub fn get(&self, key: &Hex32) -> Option<&AdmittedOperator> {
        self.operators.get(key)
    }

    pub fn operators(&self) -> impl Iterator<Item = &AdmittedOperator> {
        self.operators.values()
    }

    pub fn len(&self) -> usize {
        self.operators.len()
    }

    pub fn is_empty(&self) -> bool {
        self.operators.is_empty()
    }

    /// The most descriptors these operators can have held at once: the bound on an
    /// authority's descriptor state.
    pub fn max_descriptors(&self) -> usize {
        self.operators
            .values()
            .map(|o| o.max_nodes as usize)
            .fold(0, usize::saturating_add)
    }
}

/// An operator's signed statement that it runs node `node` in role `role`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeCertificate {
    pub operator: Hex32,
    pub node: Hex32,
    pub role: Role,
    pub signature: Hex64,
}

const CERTIFICATE_DOMAIN: &[u8] = b"shoal operator certifies node v1\0";

fn certified_bytes(node: &NodeId, role: Role) -> Vec<u8> {
    let mut m = CERTIFICATE_DOMAIN.to_vec();
    m.extend_from_slice(node);
    m.push(match role {
        Role::Relay => 1,
        Role::Gateway => 2,
    });
    m
}

impl NodeCertificate {
    /// Signs that `operator` runs `node` as `role`.
    pub fn issue(operator: &SigningKey, node: NodeId, role: Role) -> Self {
        NodeCertificate {
            operator: Hex32(operator.verifying_key().to_bytes()),
            node: Hex32(node),
            role,
            signature: Hex64(operator.sign(&certified_bytes(&node, role)).to_bytes()),
        }
    }

    /// Whether the operator's signature is good.
    pub fn verify(&self) -> bool {
        VerifyingKey::from_bytes(&self.operator.0).is_ok_and(|k| {
            k.verify(
                &certified_bytes(&self.node.0, self.role),
                &Signature::from_bytes(&self.signature.0),
            )
            .is_ok()
        })
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    pub fn from_json(bytes: &[u8]) -> Result<Self, TopologyError> {
        serde_json::from_slice(bytes).map_err(|e| TopologyError::Malformed {
            what: "node certificate",
            reason: e.to_string(),
        })
    }
}

/// The /16 of an IPv4 address or the /32 of an IPv6 address: nodes in one such network
/// are treated as one family by route selection when the network is large enough.
pub fn network_group(addr: &std::net::SocketAddr) -> [u8; 5] {
    match addr.ip() {
        std::net::IpAddr::V4(v4) => {
            let o = v4.octets();
            [4, o[0], o[1], 0, 0]
        }
        std::net::IpAddr::V6(v6) => {
            let o = v6.octets();
            [6, o[0], o[1], o[2], o[3]]
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn op(seed: u8) -> AdmittedOperator {
        AdmittedOperator {
            key: Hex32(
                SigningKey::from_bytes(&[seed; 32])
                    .verifying_key()
                    .to_bytes(),
            ),
            name: format!("op{seed}"),
            max_nodes: 4,
            max_per_layer: 2,
        }
    }

    #[test]
    fn certificates_bind_operator_node_and_role() {
        let operator = SigningKey::from_bytes(&[9; 32]);
        let node = [3; 32];
        let cert = NodeCertificate::issue(&operator, node, Role::Relay);
        assert!(cert.verify());
        let back = NodeCertificate::from_json(cert.to_json().as_bytes()).unwrap();
        assert_eq!(back, cert);
        // Moved to another node, another role or another operator: no longer valid.
        let mut other_node = cert.clone();
        other_node.node = Hex32([4; 32]);
        let mut other_role = cert.clone();
        other_role.role = Role::Gateway;
        let mut other_op = cert.clone();
        other_op.operator = op(1).key;
        for bad in [other_node, other_role, other_op] {
            assert!(!bad.verify());
        }
        assert!(NodeCertificate::from_json(b"{}").is_err());
    }

    #[test]
    fn admission_list_is_checked() {
        let a = Admission::new(vec![op(1), op(2)]).unwrap();
        assert_eq!(a.len(), 2);
        assert_eq!(a.max_descriptors(), 8);
        assert!(a.get(&op(1).key).is_some());
        let mut zero = op(3);
        zero.max_per_layer = 0;
        let mut long = op(4);
        long.name = "x".repeat(65);
        let mut not_point = op(5);
        not_point.key = Hex32(
            (0..=255u8)
                .map(|b| {
                    let mut k = [b; 32];
                    k[31] = 0x7f;
                    k
                })
                .find(|k| VerifyingKey::from_bytes(k).is_err())
                .unwrap(),
        );
        for bad in [vec![op(1), op(1)], vec![zero], vec![long], vec![not_point]] {
            assert!(Admission::new(bad).is_err());
        }
    }

    #[test]
    fn network_groups_are_slash_16() {
        let g = |s: &str| network_group(&s.parse().unwrap());
        assert_eq!(g("10.1.2.3:1"), g("10.1.200.9:2"));
        assert_ne!(g("10.1.2.3:1"), g("10.2.2.3:1"));
    }
}

//! Node descriptors: what a relay or gateway says about itself, signed by itself.

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::{Hex32, Hex64, NodeId, Role, TopologyError};

/// A Sphinx public key and the epoch it unwraps packets for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SphinxKeyEntry {
    pub epoch: u64,
    pub key: Hex32,
}

/// The content of a descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Descriptor {
    pub identity: Hex32,
    pub role: Role,
    /// QUIC link address, `ip:port`.
    pub link_addr: String,
    /// Keys for the current and upcoming epochs, ascending by epoch.
    pub sphinx_keys: Vec<SphinxKeyEntry>,
    /// Unix seconds at signing; a newer descriptor replaces an older one.
    pub published_unix: u64,
}

impl Descriptor {
    pub fn id(&self) -> NodeId {
        self.identity.0
    }

    /// The Sphinx key for `epoch`, if published.
    pub fn key_for(&self, epoch: u64) -> Option<[u8; 32]> {
        self.sphinx_keys.iter().find(|k| k.epoch == epoch).map(|k| k.key.0)
    }

    fn validate(&self) -> Result<(), TopologyError> {
        self.link_addr
            .parse::<std::net::SocketAddr>()
            .map_err(|e| TopologyError::Invalid {
                what: "descriptor link_addr",
                reason: e.to_string(),
            })?;
        if self.sphinx_keys.is_empty() || self.sphinx_keys.len() > 8 {
            return Err(TopologyError::Invalid {
                what: "descriptor sphinx_keys",
                reason: format!("{} keys; between 1 and 8 are allowed", self.sphinx_keys.len()),
            });
        }
        if self.sphinx_keys.windows(2).any(|w| w[0].epoch >= w[1].epoch) {
            return Err(TopologyError::Invalid {
                what: "descriptor sphinx_keys",
                reason: "epochs must be strictly ascending".into(),
            });
        }
        Ok(())
    }

    /// Signs this descriptor with the node's identity key.
    pub fn sign(&self, identity: &SigningKey) -> Result<SignedDescriptor, TopologyError> {
        if identity.verifying_key().to_bytes() != self.identity.0 {
            return Err(TopologyError::Invalid {
                what: "descriptor identity",
                reason: "does not match the signing key".into(),
            });
        }
        self.validate()?;
        let body = serde_json::to_string(self).map_err(|e| TopologyError::Malformed {
            what: "descriptor",
            reason: e.to_string(),
        })?;
        let signature = Hex64(identity.sign(body.as_bytes()).to_bytes());
        Ok(SignedDescriptor { body, signature })
    }
}

/// A descriptor as it travels: the exact signed bytes and the signature over them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedDescriptor {
    pub body: String,
    pub signature: Hex64,
}

const DESCRIPTOR_DOMAIN: &str = "descriptor";

impl SignedDescriptor {
    /// Parses a descriptor from the wire; its signature is not yet checked.
    pub fn from_json(bytes: &[u8]) -> Result<Self, TopologyError> {
        serde_json::from_slice(bytes).map_err(|e| TopologyError::Malformed {
            what: DESCRIPTOR_DOMAIN,
            reason: e.to_string(),
        })
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Checks the self-signature and returns the content.
    pub fn check(&self) -> Result<Descriptor, TopologyError> {
        let d: Descriptor = serde_json::from_str(&self.body).map_err(|e| TopologyError::Malformed {
            what: DESCRIPTOR_DOMAIN,
            reason: e.to_string(),
        })?;
        d.validate()?;
        let key = VerifyingKey::from_bytes(&d.identity.0).map_err(|_| TopologyError::BadSignature {
            what: DESCRIPTOR_DOMAIN,
        })?;
        key.verify(self.body.as_bytes(), &Signature::from_bytes(&self.signature.0))
            .map_err(|_| TopologyError::BadSignature {
                what: DESCRIPTOR_DOMAIN,
            })?;
        Ok(d)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    pub(crate) fn descriptor(rng: &mut StdRng, role: Role, port: u16, epochs: &[u64]) -> (SigningKey, Descriptor) {
        let key = SigningKey::generate(rng);
        let d = Descriptor {
            identity: Hex32(key.verifying_key().to_bytes()),
            role,
            link_addr: format!("127.0.0.1:{port}"),
            sphinx_keys: epochs
                .iter()
                .map(|&epoch| SphinxKeyEntry {
                    epoch,
                    key: Hex32(shoal_packet::sphinx::generate_key(rng).1.to_bytes()),
                })
                .collect(),
            published_unix: 100,
        };
        (key, d)
    }

    #[test]
    fn sign_and_check() {
        let mut rng = StdRng::seed_from_u64(1);
        let (key, d) = descriptor(&mut rng, Role::Relay, 4000, &[1, 2]);
        let s = d.sign(&key).unwrap();
        let back = SignedDescriptor::from_json(&s.to_json()).unwrap();
        assert_eq!(back.check().unwrap(), d);
        assert_eq!(d.key_for(2), Some(d.sphinx_keys[1].key.0));
        // Tampering breaks the signature.
        let mut t = back.clone();
        t.body = t.body.replace("4000", "4001");
        assert!(matches!(t.check(), Err(TopologyError::BadSignature { .. })));
        // Signing with another key is refused.
        let other = SigningKey::generate(&mut rng);
        assert!(d.sign(&other).is_err());
        // Bad keys list.
        let mut bad = d.clone();
        bad.sphinx_keys.reverse();
        assert!(bad.sign(&key).is_err());
        assert!(SignedDescriptor::from_json(b"{").is_err());
    }
}

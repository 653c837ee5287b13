//! Node descriptors: what a relay or gateway says about itself, signed by itself.

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::{Hex32, Hex64, NodeCertificate, NodeId, Role, TopologyError};

/// Longest descriptor (its JSON as posted) an authority takes. A real one, with its
/// certificate and eight keys, is about 1.6 KiB.
pub const MAX_DESCRIPTOR_BYTES: usize = 4096;

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
    /// The software's version, for operators (`shoal authority status`); never used to
    /// route. Absent from older nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

/// Longest `version` a descriptor may carry.
pub const MAX_VERSION_BYTES: usize = 32;

impl Descriptor {
    pub fn id(&self) -> NodeId {
        self.identity.0
    }

    /// The Sphinx key for `epoch`, if published.
    pub fn key_for(&self, epoch: u64) -> Option<[u8; 32]> {
        self.sphinx_keys
            .iter()
            .find(|k| k.epoch == epoch)
            .map(|k| k.key.0)
    }

    fn validate(&self) -> Result<(), TopologyError> {
        if let Some(v) = &self.version
            && (v.is_empty()
                || v.len() > MAX_VERSION_BYTES
                || !v.bytes().all(|b| b.is_ascii_graphic()))
        {
            return Err(TopologyError::Invalid {
                what: "descriptor version",
                reason: format!(
                    "1 to {MAX_VERSION_BYTES} printable ASCII characters without spaces"
                ),
            });
        }
        self.link_addr
            .parse::<std::net::SocketAddr>()
            .map_err(|e| TopologyError::Invalid {
                what: "descriptor link_addr",
                reason: e.to_string(),
            })?;
        if self.sphinx_keys.is_empty() || self.sphinx_keys.len() > 8 {
            return Err(TopologyError::Invalid {
                what: "descriptor sphinx_keys",
                reason: format!(
                    "{} keys; between 1 and 8 are allowed",
                    self.sphinx_keys.len()
                ),
            });
        }
        if self
            .sphinx_keys
            .windows(2)
            .any(|w| w[0].epoch >= w[1].epoch)
        {
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
        Ok(SignedDescriptor {
            body,
            signature,
            certificate: None,
        })
    }
}

/// A descriptor as it travels: the exact signed bytes, the signature over them, and
/// the operator's certificate for the node.
///
/// The certificate rides beside the node-signed bytes rather than inside them: it is
/// itself signed by the operator over the node's identity and role, so moving it to
/// another descriptor of the same node changes nothing, and no other node can use it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedDescriptor {
    pub body: String,
    pub signature: Hex64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<NodeCertificate>,
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

    /// The same descriptor carrying the operator's certificate for the node.
    pub fn certified(mut self, certificate: NodeCertificate) -> Self {
        self.certificate = Some(certificate);
        self
    }

    /// Checks the self-signature and returns the content.
    pub fn check(&self) -> Result<Descriptor, TopologyError> {
        let d: Descriptor =
            serde_json::from_str(&self.body).map_err(|e| TopologyError::Malformed {
                what: DESCRIPTOR_DOMAIN,
                reason: e.to_string(),
            })?;
        d.validate()?;
        let key =
            VerifyingKey::from_bytes(&d.identity.0).map_err(|_| TopologyError::BadSignature {
                what: DESCRIPTOR_DOMAIN,
            })?;
        key.verify(
            self.body.as_bytes(),
            &Signature::from_bytes(&self.signature.0),
        )
        .map_err(|_| TopologyError::BadSignature {
            what: DESCRIPTOR_DOMAIN,
        })?;
        Ok(d)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
pub(crate) mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    pub(crate) fn descriptor(
        rng: &mut StdRng,
        role: Role,
        port: u16,
        epochs: &[u64],
    ) -> (SigningKey, Descriptor) {
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
            version: None,
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

    #[test]
    fn check_rejects_bad_content() {
        let mut rng = StdRng::seed_from_u64(2);
        let (key, d) = descriptor(&mut rng, Role::Gateway, 4000, &[1]);
        let good = d.sign(&key).unwrap();
        // Content that `sign` would refuse, signed anyway, is refused by `check`.
        let sign_raw = |body: String| SignedDescriptor {
            signature: Hex64(key.sign(body.as_bytes()).to_bytes()),
            body,
            certificate: None,
        };
        let too_many = {
            let mut t = d.clone();
            t.sphinx_keys = (0..9)
                .map(|epoch| SphinxKeyEntry {
                    epoch,
                    key: Hex32([1; 32]),
                })
                .collect();
            t
        };
        let no_keys = Descriptor {
            sphinx_keys: vec![],
            ..d.clone()
        };
        let bad_addr = Descriptor {
            link_addr: "localhost:4000".into(),
            ..d.clone()
        };
        // A version is for operators' eyes: short and printable, or refused.
        let bad_version = Descriptor {
            version: Some("1.0\x1b[2J".into()),
            ..d.clone()
        };
        let long_version = Descriptor {
            version: Some("9".repeat(MAX_VERSION_BYTES + 1)),
            ..d.clone()
        };
        let versioned = Descriptor {
            version: Some("0.1.0".into()),
            ..d.clone()
        };
        let signed = versioned.sign(&key).unwrap();
        assert_eq!(signed.check().unwrap().version.as_deref(), Some("0.1.0"));
        for bad in [too_many, no_keys, bad_addr, bad_version, long_version] {
            let err = sign_raw(serde_json::to_string(&bad).unwrap())
                .check()
                .unwrap_err();
            assert!(matches!(err, TopologyError::Invalid { .. }), "{err}");
            assert!(bad.sign(&key).is_err());
        }
        // Unknown fields are refused, even when signed.
        let extra = good.body.replacen('{', r#"{"extra":1,"#, 1);
        assert!(matches!(
            sign_raw(extra).check(),
            Err(TopologyError::Malformed { .. })
        ));
        // A signature by another key over the same body.
        let other = SigningKey::generate(&mut rng);
        let forged = SignedDescriptor {
            body: good.body.clone(),
            signature: Hex64(other.sign(good.body.as_bytes()).to_bytes()),
            certificate: None,
        };
        assert!(matches!(
            forged.check(),
            Err(TopologyError::BadSignature { .. })
        ));
        // An identity that is not a curve point.
        let mut not_point = d.clone();
        not_point.identity = Hex32([0xff; 32]);
        let raw = sign_raw(serde_json::to_string(&not_point).unwrap());
        assert!(matches!(
            raw.check(),
            Err(TopologyError::BadSignature { .. })
        ));
    }

    /// Fixed key → exact bytes and signature; decode → re-encode gives the same bytes.
    #[test]
    fn testvec_descriptor() {
        let key = SigningKey::from_bytes(&[1; 32]);
        let d = Descriptor {
            identity: Hex32(key.verifying_key().to_bytes()),
            role: Role::Relay,
            link_addr: "127.0.0.1:4001".into(),
            sphinx_keys: vec![
                SphinxKeyEntry {
                    epoch: 7,
                    key: Hex32([0x07; 32]),
                },
                SphinxKeyEntry {
                    epoch: 8,
                    key: Hex32([0x08; 32]),
                },
            ],
            published_unix: 1650,
            version: None,
        };
        let signed = d.sign(&key).unwrap();
        let wire = String::from_utf8(signed.to_json()).unwrap();
        assert_eq!(wire, TESTVEC_SIGNED_DESCRIPTOR, "\n{wire}\n");
        let decoded = SignedDescriptor::from_json(TESTVEC_SIGNED_DESCRIPTOR.as_bytes()).unwrap();
        assert_eq!(decoded.check().unwrap(), d);
        assert_eq!(decoded.to_json(), TESTVEC_SIGNED_DESCRIPTOR.as_bytes());
    }

    const TESTVEC_SIGNED_DESCRIPTOR: &str = concat!(
        r#"{"body":"{\"identity\":\"8a88e3dd7409f195fd52db2d3cba5d72ca6709bf1d94121bf3748801b40f6f5c\","#,
        r#"\"role\":\"relay\",\"link_addr\":\"127.0.0.1:4001\",\"sphinx_keys\":["#,
        r#"{\"epoch\":7,\"key\":\"0707070707070707070707070707070707070707070707070707070707070707\"},"#,
        r#"{\"epoch\":8,\"key\":\"0808080808080808080808080808080808080808080808080808080808080808\"}],"#,
        r#"\"published_unix\":1650}","#,
        r#""signature":"dad24c8b235ea4afedf1a1215036cc8e48dc6f93495a079290188887310cb483"#,
        r#"5bc5534935c349455a3d06d5396e2beb13d1bde6b4d06326c61bf26a39477904"}"#,
    );
}

//! The signed envelope shared by credentials, policies and commands: the exact body
//! bytes (canonical JSON) and the admin's signature over a domain-separated copy.

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use shoal_topology::{Hex32, Hex64};

use crate::SubnetError;

/// Envelope as it travels. `body` is kept as the exact signed text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Envelope {
    pub body: String,
    pub signature: Hex64,
}

/// The bytes signed: a per-type domain, a zero byte, the body. A credential signature
/// can then never be replayed as a policy or a command signature.
pub(crate) fn signed_bytes(domain: &str, body: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(domain.len() + 1 + body.len());
    out.extend_from_slice(domain.as_bytes());
    out.push(0);
    out.extend_from_slice(body.as_bytes());
    out
}

impl Envelope {
    pub fn seal<T: Serialize>(
        key: &SigningKey,
        domain: &str,
        what: &'static str,
        body: &T,
    ) -> Result<Self, SubnetError> {
        let body = serde_json::to_string(body).map_err(|e| SubnetError::Malformed {
            what,
            reason: e.to_string(),
        })?;
        let signature = key.sign(&signed_bytes(domain, &body));
        Ok(Envelope {
            body,
            signature: Hex64(signature.to_bytes()),
        })
    }

    pub fn parse(bytes: &[u8], what: &'static str) -> Result<Self, SubnetError> {
        serde_json::from_slice(bytes).map_err(|e| SubnetError::Malformed {
            what,
            reason: e.to_string(),
        })
    }

    pub fn body<T: for<'de> Deserialize<'de>>(&self, what: &'static str) -> Result<T, SubnetError> {
        serde_json::from_str(&self.body).map_err(|e| SubnetError::Malformed {
            what,
            reason: e.to_string(),
        })
    }

    pub fn verify(
        &self,
        signer: &Hex32,
        domain: &str,
        what: &'static str,
    ) -> Result<(), SubnetError> {
        let key =
            VerifyingKey::from_bytes(&signer.0).map_err(|_| SubnetError::BadSignature { what })?;
        key.verify_strict(
            &signed_bytes(domain, &self.body),
            &Signature::from_bytes(&self.signature.0),
        )
        .map_err(|_| SubnetError::BadSignature { what })
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// The admin of one subnet: holds the key that names the subnet and signs
/// credentials, policies and gateway commands.
pub struct SubnetAdmin {
    key: SigningKey,
}

impl std::fmt::Debug for SubnetAdmin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SubnetAdmin({:?})", self.subnet())
    }
}

impl SubnetAdmin {
    pub fn new(key: SigningKey) -> Self {
        SubnetAdmin { key }
    }

    pub fn from_secret(secret: [u8; 32]) -> Self {
        SubnetAdmin::new(SigningKey::from_bytes(&secret))
    }

    pub fn subnet(&self) -> crate::SubnetId {
        Hex32(self.key.verifying_key().to_bytes())
    }

    pub(crate) fn key(&self) -> &SigningKey {
        &self.key
    }
}

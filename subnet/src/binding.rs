//! Address bindings: a member's **own** identity key vouches for where it is reached.
//!
//! The admin's credential says only "this Ed25519 key is member H of subnet S with
//! role R". Where that member's messages go — the X25519 key bodies are sealed to, the
//! mailbox and the gateway — is an [`AddressBinding`] signed by the member's identity
//! key itself. A sender seals only to a binding that verifies under the identity key
//! the credential names, so an admin (who can sign credentials but does not hold any
//! member's identity key) cannot redirect or open anyone's messages; all it can do is
//! mint a *new* identity key, which contacts see as a different person (pinning).
//!
//! A [`MemberCard`] is the pair as it travels (in invites, direct messages and MLS
//! leaves): `"SB" | 1 | len32 credential | binding`. Checking is a chain of types:
//! bytes → [`MemberCard::parse`] (both signatures and their agreement checked) →
//! [`MemberCard`]. Several devices per person later means several bindings (one per
//! device key) under one identity; `sequence` orders bindings of one key.

use serde::{Deserialize, Serialize};
use shoal_topology::Hex32;

use crate::envelope::Envelope;
use crate::{MemberCredential, SubnetError, SubnetId, UncheckedCredential};

const DOMAIN: &str = "shoal member address binding v1";
const WHAT: &str = "address binding";
const CARD_MAGIC: &[u8; 2] = b"SB";
const CARD_VERSION: u8 = 1;

/// What the member's identity key signs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BindingBody {
    pub subnet: SubnetId,
    /// The Ed25519 identity key that signs this binding (the credential's `signing_key`).
    pub identity_key: Hex32,
    /// X25519 key message bodies are sealed to.
    pub seal_key: Hex32,
    pub mailbox: Hex32,
    pub gateway: Hex32,
    /// Orders bindings of one key (unix ms when made): the newest wins.
    pub sequence: u64,
}

/// A binding whose signature by `identity_key` verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddressBinding {
    envelope: Envelope,
    body: BindingBody,
}

impl AddressBinding {
    /// Signs `body` with the member's identity key (`body.identity_key` is overwritten).
    pub fn sign(
        identity: &ed25519_dalek::SigningKey,
        mut body: BindingBody,
    ) -> Result<Self, SubnetError> {
        body.identity_key = Hex32(identity.verifying_key().to_bytes());
        Ok(AddressBinding {
            envelope: Envelope::seal(identity, DOMAIN, WHAT, &body)?,
            body,
        })
    }

    /// Parses and checks the signature by the key the binding names.
    pub fn verify(bytes: &[u8]) -> Result<Self, SubnetError> {
        let envelope = Envelope::parse(bytes, WHAT)?;
        let body: BindingBody = envelope.body(WHAT)?;
        envelope.verify(&body.identity_key, DOMAIN, WHAT)?;
        Ok(AddressBinding { envelope, body })
    }

    pub fn body(&self) -> &BindingBody {
        &self.body
    }
    pub fn to_bytes(&self) -> Vec<u8> {
        self.envelope.to_bytes()
    }
}

/// An admin-signed credential and the member's self-signed binding, checked to agree:
/// same subnet, and the binding is signed by the key the credential names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberCard {
    credential: MemberCredential,
    binding: AddressBinding,
}

impl MemberCard {
    /// Pairs a credential with a binding; refuses if they do not belong together.
    pub fn new(credential: MemberCredential, binding: AddressBinding) -> Result<Self, SubnetError> {
        if binding.body.identity_key.0 != credential.signing_key()
            || binding.body.subnet != credential.subnet()
        {
            return Err(SubnetError::Invalid {
                what: WHAT,
                reason: "not signed by the key the credential names, or for another subnet".into(),
            });
        }
        Ok(MemberCard {
            credential,
            binding,
        })
    }

    /// Parses a card: checks the admin signature (validity is left to policy, which
    /// names why it refuses) and the binding's signature by the credential's key.
    pub fn parse(bytes: &[u8]) -> Result<Self, SubnetError> {
        let bad = |reason: &str| SubnetError::Malformed {
            what: "member card",
            reason: reason.into(),
        };
        if bytes.len() < 7 || &bytes[..2] != CARD_MAGIC {
            return Err(bad("not a member card"));
        }
        if bytes[2] != CARD_VERSION {
            return Err(bad("unknown version"));
        }
        let mut len = [0u8; 4];
        len.copy_from_slice(&bytes[3..7]);
        let len = u32::from_be_bytes(len) as usize;
        let rest = &bytes[7..];
        if rest.len() < len {
            return Err(bad("truncated"));
        }
        let (cred, binding) = rest.split_at(len);
        let credential = UncheckedCredential::parse(cred)?
            .check_signature()?
            .ignore_validity();
        Self::new(credential, AddressBinding::verify(binding)?)
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let cred = self.credential.to_bytes();
        let binding = self.binding.to_bytes();
        let mut out = Vec::with_capacity(7 + cred.len() + binding.len());
        out.extend_from_slice(CARD_MAGIC);
        out.push(CARD_VERSION);
        // Credentials are a few hundred bytes.
        out.extend_from_slice(&(cred.len() as u32).to_be_bytes());
        out.extend_from_slice(&cred);
        out.extend_from_slice(&binding);
        out
    }

    pub fn credential(&self) -> &MemberCredential {
        &self.credential
    }
    pub fn binding(&self) -> &AddressBinding {
        &self.binding
    }
    /// The member's identity key (credential and binding agree on it).
    pub fn identity_key(&self) -> [u8; 32] {
        self.credential.signing_key()
    }
    pub fn subnet(&self) -> SubnetId {
        self.credential.subnet()
    }
    pub fn handle(&self) -> &str {
        self.credential.handle()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SubnetAdmin;
    use crate::credential::tests::body;

    fn binding(key: &ed25519_dalek::SigningKey, subnet: SubnetId, seal: u8) -> AddressBinding {
        AddressBinding::sign(
            key,
            BindingBody {
                subnet,
                identity_key: Hex32([0; 32]),
                seal_key: Hex32([seal; 32]),
                mailbox: Hex32([3; 32]),
                gateway: Hex32([4; 32]),
                sequence: 1,
            },
        )
        .unwrap()
    }

    #[test]
    fn card_roundtrip_and_refusals() {
        let admin = SubnetAdmin::from_secret([1; 32]);
        let key = ed25519_dalek::SigningKey::from_bytes(&[2; 32]);
        let cred = admin.issue_credential(body("ana", "staff", 2)).unwrap();
        let cred = MemberCredential::verify(&cred.to_bytes(), 1500).unwrap();
        let card = MemberCard::new(cred.clone(), binding(&key, admin.subnet(), 5)).unwrap();
        let back = MemberCard::parse(&card.to_bytes()).unwrap();
        assert_eq!(back, card);
        assert_eq!(back.binding().body().seal_key, Hex32([5; 32]));
        // The admin cannot bind addresses for the member's key: its own key's binding
        // does not pair with the member's credential.
        let rogue = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
        assert!(MemberCard::new(cred.clone(), binding(&rogue, admin.subnet(), 6)).is_err());
        // A binding for another subnet does not pair either.
        assert!(MemberCard::new(cred, binding(&key, Hex32([7; 32]), 5)).is_err());
        // A tampered binding fails its signature.
        let text = String::from_utf8(card.to_bytes()).unwrap_or_default();
        assert!(text.is_empty() || MemberCard::parse(text.replace("05", "06").as_bytes()).is_err());
        for cut in [0, 3, 8, card.to_bytes().len() - 1] {
            assert!(MemberCard::parse(&card.to_bytes()[..cut]).is_err());
        }
    }
}

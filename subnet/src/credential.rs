//! Membership credentials: the admin vouches that a signing key belongs to a handle
//! with a role, for a time. Where the member is reached is *not* the admin's to say:
//! that is the member's own [`crate::AddressBinding`]; the address fields below are
//! the admin's bookkeeping and no client trusts them.
//!
//! Checking is a chain of types: bytes → [`UncheckedCredential`] →
//! `.check_signature()` → [`VerifiedCredential`] → `.check_valid_at(now)` →
//! [`MemberCredential`]. The signature check needs no outside key because a subnet *is*
//! its admin key; whether that subnet is trusted is the [`crate::Policy`]'s question.

use serde::{Deserialize, Serialize};
use shoal_topology::Hex32;

use crate::envelope::Envelope;
use crate::{SubnetAdmin, SubnetError, SubnetId};

const DOMAIN: &str = "shoal subnet credential v1";
const WHAT: &str = "membership credential";
/// Longest handle or role name, in bytes.
pub const MAX_NAME_LEN: usize = 64;

/// What the admin signs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialBody {
    pub subnet: SubnetId,
    pub handle: String,
    pub role: String,
    /// The member's Ed25519 key: it signs the member's MLS leaf and messages.
    pub signing_key: Hex32,
    /// Not trusted by any client (senders seal to the member's own
    /// [`crate::AddressBinding`]); a member's client refuses a credential whose
    /// non-zero value here is not its own key. All zero: not stated.
    pub seal_key: Hex32,
    /// The admin's record of the member's mailbox; not trusted, as `seal_key`.
    pub mailbox: Hex32,
    /// The admin's record of the member's gateway; not trusted, as `seal_key`.
    pub gateway: Hex32,
    /// Unix seconds.
    pub not_before: u64,
    pub not_after: u64,
}

pub(crate) fn check_name(what: &'static str, s: &str) -> Result<(), SubnetError> {
    if s.is_empty() || s.len() > MAX_NAME_LEN || s.chars().any(char::is_control) {
        return Err(SubnetError::Invalid {
            what,
            reason: "empty, longer than 64 bytes, or has control characters".into(),
        });
    }
    Ok(())
}

/// A credential as it travels (inside MLS leaves and contact invites).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedCredential {
    envelope: Envelope,
}

impl SubnetAdmin {
    /// Signs a membership credential for this subnet (`body.subnet` is overwritten).
    pub fn issue_credential(
        &self,
        mut body: CredentialBody,
    ) -> Result<SignedCredential, SubnetError> {
        body.subnet = self.subnet();
        check_name("handle", &body.handle)?;
        check_name("role", &body.role)?;
        Ok(SignedCredential {
            envelope: Envelope::seal(self.key(), DOMAIN, WHAT, &body)?,
        })
    }
}

impl SignedCredential {
    pub fn to_bytes(&self) -> Vec<u8> {
        self.envelope.to_bytes()
    }
}

/// Parsed, nothing checked: only `claimed_*` may be looked at.
#[derive(Debug, Clone)]
pub struct UncheckedCredential {
    envelope: Envelope,
    body: CredentialBody,
}

impl UncheckedCredential {
    pub fn parse(bytes: &[u8]) -> Result<Self, SubnetError> {
        let envelope = Envelope::parse(bytes, WHAT)?;
        let body: CredentialBody = envelope.body(WHAT)?;
        check_name("handle", &body.handle)?;
        check_name("role", &body.role)?;
        Ok(UncheckedCredential { envelope, body })
    }

    pub fn claimed_subnet(&self) -> SubnetId {
        self.body.subnet
    }

    /// Verifies the admin signature of the subnet the credential names.
    pub fn check_signature(self) -> Result<VerifiedCredential, SubnetError> {
        self.envelope.verify(&self.body.subnet, DOMAIN, WHAT)?;
        Ok(VerifiedCredential {
            envelope: self.envelope,
            body: self.body,
        })
    }

    /// Skips the signature check. Tests only.
    pub fn dangerously_assume_signed(self) -> VerifiedCredential {
        VerifiedCredential {
            envelope: self.envelope,
            body: self.body,
        }
    }
}

/// Signature checked, clock not yet.
#[derive(Debug, Clone)]
pub struct VerifiedCredential {
    envelope: Envelope,
    body: CredentialBody,
}

impl VerifiedCredential {
    pub fn check_valid_at(self, now_unix: u64) -> Result<MemberCredential, SubnetError> {
        if now_unix < self.body.not_before || now_unix > self.body.not_after {
            return Err(SubnetError::NotValidAt {
                what: WHAT,
                not_before: self.body.not_before,
                not_after: self.body.not_after,
                now: now_unix,
            });
        }
        Ok(MemberCredential {
            signed: SignedCredential {
                envelope: self.envelope,
            },
            body: self.body,
        })
    }

    /// Keeps the credential even if expired, so policy can name *why* it refuses.
    pub fn ignore_validity(self) -> MemberCredential {
        MemberCredential {
            signed: SignedCredential {
                envelope: self.envelope,
            },
            body: self.body,
        }
    }
}

/// A credential whose admin signature verified. Expiry is checked again by every
/// policy decision, which takes `now`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberCredential {
    signed: SignedCredential,
    body: CredentialBody,
}

impl MemberCredential {
    /// Parses and checks the signature and, at `now_unix`, the validity window.
    pub fn verify(bytes: &[u8], now_unix: u64) -> Result<Self, SubnetError> {
        UncheckedCredential::parse(bytes)?
            .check_signature()?
            .check_valid_at(now_unix)
    }

    pub fn body(&self) -> &CredentialBody {
        &self.body
    }
    pub fn subnet(&self) -> SubnetId {
        self.body.subnet
    }
    pub fn handle(&self) -> &str {
        &self.body.handle
    }
    pub fn role(&self) -> &str {
        &self.body.role
    }
    pub fn signing_key(&self) -> [u8; 32] {
        self.body.signing_key.0
    }
    pub fn is_valid_at(&self, now_unix: u64) -> bool {
        (self.body.not_before..=self.body.not_after).contains(&now_unix)
    }
    pub fn signed(&self) -> &SignedCredential {
        &self.signed
    }
    pub fn to_bytes(&self) -> Vec<u8> {
        self.signed.to_bytes()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn body(handle: &str, role: &str, key: u8) -> CredentialBody {
        CredentialBody {
            subnet: Hex32([0; 32]),
            handle: handle.into(),
            role: role.into(),
            signing_key: Hex32(
                ed25519_dalek::SigningKey::from_bytes(&[key; 32])
                    .verifying_key()
                    .to_bytes(),
            ),
            seal_key: Hex32([6; 32]),
            mailbox: Hex32([7; 32]),
            gateway: Hex32([8; 32]),
            not_before: 1000,
            not_after: 2000,
        }
    }

    #[test]
    fn testvec_credential() {
        let admin = SubnetAdmin::from_secret([1; 32]);
        let cred = admin.issue_credential(body("ana", "staff", 2)).unwrap();
        let bytes = cred.to_bytes();
        assert_eq!(String::from_utf8(bytes.clone()).unwrap(), CRED_VECTOR);
        let checked = MemberCredential::verify(CRED_VECTOR.as_bytes(), 1500).unwrap();
        assert_eq!(checked.handle(), "ana");
        assert_eq!(checked.subnet(), admin.subnet());
        // Decode → re-encode gives the same bytes.
        assert_eq!(checked.to_bytes(), bytes);
    }

    const CRED_VECTOR: &str = r#"{"body":"{\"subnet\":\"8a88e3dd7409f195fd52db2d3cba5d72ca6709bf1d94121bf3748801b40f6f5c\",\"handle\":\"ana\",\"role\":\"staff\",\"signing_key\":\"8139770ea87d175f56a35466c34c7ecccb8d8a91b4ee37a25df60f5b8fc9b394\",\"seal_key\":\"0606060606060606060606060606060606060606060606060606060606060606\",\"mailbox\":\"0707070707070707070707070707070707070707070707070707070707070707\",\"gateway\":\"0808080808080808080808080808080808080808080808080808080808080808\",\"not_before\":1000,\"not_after\":2000}","signature":"1fa67331f60b2d6ce9ef14e4f8809e98c693f6692dcad8b86db74661ebb1ef16ece956c77c6f5902017f7f63b1a277f4a73b979a8ea93e5ea726f54a4da9960c"}"#;

    #[test]
    fn refuses_tampering_and_expiry() {
        let admin = SubnetAdmin::from_secret([1; 32]);
        let cred = admin.issue_credential(body("ana", "staff", 2)).unwrap();
        let text = String::from_utf8(cred.to_bytes()).unwrap();
        let tampered = text.replace("staff", "admin");
        assert_eq!(
            MemberCredential::verify(tampered.as_bytes(), 1500),
            Err(SubnetError::BadSignature { what: WHAT })
        );
        assert!(matches!(
            MemberCredential::verify(text.as_bytes(), 2001),
            Err(SubnetError::NotValidAt { .. })
        ));
        assert!(matches!(
            MemberCredential::verify(b"{}", 1500),
            Err(SubnetError::Malformed { .. })
        ));
        // Another admin cannot claim this subnet: the signer is the subnet.
        let rogue = SubnetAdmin::from_secret([9; 32]);
        let mut other = rogue.issue_credential(body("ana", "staff", 2)).unwrap();
        let victim = admin.subnet();
        let mut b: CredentialBody = other.envelope.body(WHAT).unwrap();
        b.subnet = victim;
        other.envelope.body = serde_json::to_string(&b).unwrap();
        assert!(matches!(
            MemberCredential::verify(&other.to_bytes(), 1500),
            Err(SubnetError::BadSignature { .. })
        ));
    }
}

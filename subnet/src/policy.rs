//! The subnet's versioned policy, signed by its admin, and the decisions made from it.
//!
//! Chain: bytes → [`UncheckedPolicy`] → `.check_signature(&subnet)` → [`Policy`].
//! A member holds the newest policy of its own subnet ([`Policy::update`] refuses
//! older versions) and asks it about every peer: [`Policy::may_send`] before sending,
//! [`Policy::may_receive`] on receipt (so a modified sender gains nothing), and
//! [`Policy::may_share_group`] for every MLS group member.

use serde::{Deserialize, Serialize};
use shoal_topology::Hex32;

use crate::credential::check_name;
use crate::envelope::Envelope;
use crate::{MemberCredential, PolicyRefusal, SubnetAdmin, SubnetError, SubnetId};

const DOMAIN: &str = "shoal subnet policy v1";
const WHAT: &str = "subnet policy";

/// Role `from` may send to role `to` (directional; add both for a conversation).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleRule {
    pub from: String,
    pub to: String,
}

/// Another subnet this one federates with, and which roles on each side may talk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Federation {
    pub subnet: SubnetId,
    pub local_roles: Vec<String>,
    pub remote_roles: Vec<String>,
}

/// Whether messages may, or must, be deleted after their first read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BurnOnRead {
    Forbidden,
    Allowed,
    Required,
}

/// What the admin signs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyBody {
    pub subnet: SubnetId,
    /// Strictly increasing; a member never goes back to an older policy.
    pub version: u64,
    /// Unix seconds; informational.
    pub issued_at: u64,
    pub roles: Vec<String>,
    pub rules: Vec<RoleRule>,
    pub federation: Vec<Federation>,
    pub ttl_min_secs: u64,
    pub ttl_max_secs: u64,
    pub burn_on_read: BurnOnRead,
    /// Member signing keys whose credentials are revoked (a de-provisioned or
    /// compromised device).
    pub revoked_keys: Vec<Hex32>,
    /// Handles revoked entirely, whatever key their credentials name.
    pub revoked_handles: Vec<String>,
}

impl PolicyBody {
    fn validate(&self) -> Result<(), SubnetError> {
        let invalid = |reason: String| SubnetError::Invalid {
            what: "policy",
            reason,
        };
        for r in &self.roles {
            check_name("role", r)?;
        }
        let known = |r: &String| self.roles.contains(r);
        for rule in &self.rules {
            if !known(&rule.from) || !known(&rule.to) {
                return Err(invalid(format!(
                    "rule {}→{} names an unknown role",
                    rule.from, rule.to
                )));
            }
        }
        for f in &self.federation {
            if f.subnet == self.subnet {
                return Err(invalid("federates with itself".into()));
            }
            if let Some(r) = f.local_roles.iter().find(|r| !known(r)) {
                return Err(invalid(format!("federation names unknown local role {r}")));
            }
        }
        if self.ttl_min_secs > self.ttl_max_secs {
            return Err(invalid("ttl_min_secs > ttl_max_secs".into()));
        }
        Ok(())
    }
}

/// A policy as it travels (to members through their gateway, like any message).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedPolicy {
    envelope: Envelope,
}

impl SignedPolicy {
    pub fn to_bytes(&self) -> Vec<u8> {
        self.envelope.to_bytes()
    }
}

impl SubnetAdmin {
    /// Signs a policy for this subnet (`body.subnet` is overwritten).
    pub fn issue_policy(&self, mut body: PolicyBody) -> Result<SignedPolicy, SubnetError> {
        body.subnet = self.subnet();
        body.validate()?;
        Ok(SignedPolicy {
            envelope: Envelope::seal(self.key(), DOMAIN, WHAT, &body)?,
        })
    }
}

/// Parsed, signature not checked.
#[derive(Debug, Clone)]
pub struct UncheckedPolicy {
    envelope: Envelope,
    body: PolicyBody,
}

impl UncheckedPolicy {
    pub fn parse(bytes: &[u8]) -> Result<Self, SubnetError> {
        let envelope = Envelope::parse(bytes, WHAT)?;
        let body: PolicyBody = envelope.body(WHAT)?;
        body.validate()?;
        Ok(UncheckedPolicy { envelope, body })
    }

    /// Accepts only a policy of `subnet`, signed by its admin.
    pub fn check_signature(self, subnet: &SubnetId) -> Result<Policy, SubnetError> {
        if self.body.subnet != *subnet {
            return Err(SubnetError::WrongSubnet {
                what: WHAT,
                subnet: self.body.subnet,
            });
        }
        self.envelope.verify(subnet, DOMAIN, WHAT)?;
        Ok(Policy {
            signed: SignedPolicy {
                envelope: self.envelope,
            },
            body: self.body,
        })
    }
}

/// The checked policy of one subnet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    signed: SignedPolicy,
    body: PolicyBody,
}

/// Options that travel inside the encrypted message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageOptions {
    pub ttl_secs: u64,
    pub burn_on_read: bool,
}

impl Policy {
    pub fn verify(bytes: &[u8], subnet: &SubnetId) -> Result<Self, SubnetError> {
        UncheckedPolicy::parse(bytes)?.check_signature(subnet)
    }

    pub fn body(&self) -> &PolicyBody {
        &self.body
    }
    pub fn subnet(&self) -> SubnetId {
        self.body.subnet
    }
    pub fn version(&self) -> u64 {
        self.body.version
    }
    pub fn signed(&self) -> &SignedPolicy {
        &self.signed
    }

    /// Replaces this policy with `newer` if it is of the same subnet and a later version.
    pub fn update(&mut self, newer: Policy) -> Result<(), SubnetError> {
        if newer.subnet() != self.subnet() {
            return Err(SubnetError::WrongSubnet {
                what: WHAT,
                subnet: newer.subnet(),
            });
        }
        if newer.version() <= self.version() {
            return Err(SubnetError::StalePolicy {
                have: self.version(),
                got: newer.version(),
            });
        }
        *self = newer;
        Ok(())
    }

    /// Is this credential of this subnet revoked?
    pub fn is_revoked(&self, cred: &MemberCredential) -> bool {
        cred.subnet() == self.body.subnet
            && (self
                .body
                .revoked_keys
                .iter()
                .any(|k| k.0 == cred.signing_key())
                || self.body.revoked_handles.iter().any(|h| h == cred.handle()))
    }

    fn check_member(&self, cred: &MemberCredential, now: u64) -> Result<(), PolicyRefusal> {
        if !cred.is_valid_at(now) {
            return Err(PolicyRefusal::Expired {
                handle: cred.handle().into(),
            });
        }
        if self.is_revoked(cred) {
            return Err(PolicyRefusal::Revoked {
                handle: cred.handle().into(),
            });
        }
        Ok(())
    }

    /// The role rule for a message from `from` to `to`, one of which is `me`.
    fn check_pair(
        &self,
        me: &MemberCredential,
        from: &MemberCredential,
        to: &MemberCredential,
        now: u64,
    ) -> Result<(), PolicyRefusal> {
        if me.subnet() != self.body.subnet {
            return Err(PolicyRefusal::NotOwnSubnet);
        }
        self.check_member(from, now)?;
        self.check_member(to, now)?;
        if !self.body.roles.iter().any(|r| r == me.role()) {
            return Err(PolicyRefusal::UnknownRole {
                role: me.role().into(),
            });
        }
        let other = if std::ptr::eq(me, from) { to } else { from };
        if other.subnet() == self.body.subnet {
            let allowed = self
                .body
                .rules
                .iter()
                .any(|r| r.from == from.role() && r.to == to.role());
            if !allowed {
                return Err(PolicyRefusal::RolesNotAllowed {
                    from: from.role().into(),
                    to: to.role().into(),
                });
            }
            return Ok(());
        }
        let fed = self
            .body
            .federation
            .iter()
            .find(|f| f.subnet == other.subnet())
            .ok_or(PolicyRefusal::NotFederated {
                subnet: other.subnet(),
            })?;
        if !fed.local_roles.iter().any(|r| r == me.role())
            || !fed.remote_roles.iter().any(|r| r == other.role())
        {
            return Err(PolicyRefusal::FederationRoleNotAllowed {
                subnet: other.subnet(),
                local: me.role().into(),
                remote: other.role().into(),
            });
        }
        Ok(())
    }

    /// May `me` (of this subnet) send to `them`? Checked by the sender's client.
    pub fn may_send(
        &self,
        me: &MemberCredential,
        them: &MemberCredential,
        now_unix: u64,
    ) -> Result<(), PolicyRefusal> {
        self.check_pair(me, me, them, now_unix)
    }

    /// May `me` accept a message from `them`? Checked by the recipient's client
    /// whatever the sender's client did.
    pub fn may_receive(
        &self,
        me: &MemberCredential,
        them: &MemberCredential,
        now_unix: u64,
    ) -> Result<(), PolicyRefusal> {
        self.check_pair(me, them, me, now_unix)
    }

    /// May `me` be in a group with `them`? A group carries messages both ways.
    pub fn may_share_group(
        &self,
        me: &MemberCredential,
        them: &MemberCredential,
        now_unix: u64,
    ) -> Result<(), PolicyRefusal> {
        self.may_send(me, them, now_unix)?;
        self.may_receive(me, them, now_unix)
    }

    /// Are these message options within policy? Checked at both ends.
    pub fn check_options(&self, opts: &MessageOptions) -> Result<(), PolicyRefusal> {
        let b = &self.body;
        if opts.ttl_secs < b.ttl_min_secs || opts.ttl_secs > b.ttl_max_secs {
            return Err(PolicyRefusal::Ttl {
                ttl: opts.ttl_secs,
                min: b.ttl_min_secs,
                max: b.ttl_max_secs,
            });
        }
        match (b.burn_on_read, opts.burn_on_read) {
            (BurnOnRead::Forbidden, true) => Err(PolicyRefusal::BurnOnRead("is not allowed")),
            (BurnOnRead::Required, false) => Err(PolicyRefusal::BurnOnRead("is required")),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::credential::tests::body as cred_body;

    pub(crate) fn policy_body(federation: Vec<Federation>) -> PolicyBody {
        PolicyBody {
            subnet: Hex32([0; 32]),
            version: 1,
            issued_at: 1000,
            roles: vec!["staff".into(), "guest".into(), "lead".into()],
            rules: vec![
                RoleRule {
                    from: "staff".into(),
                    to: "staff".into(),
                },
                RoleRule {
                    from: "lead".into(),
                    to: "staff".into(),
                },
                RoleRule {
                    from: "staff".into(),
                    to: "lead".into(),
                },
                RoleRule {
                    from: "guest".into(),
                    to: "lead".into(),
                },
            ],
            federation,
            ttl_min_secs: 60,
            ttl_max_secs: 86_400,
            burn_on_read: BurnOnRead::Allowed,
            revoked_keys: vec![],
            revoked_handles: vec![],
        }
    }

    fn cred(admin: &SubnetAdmin, handle: &str, role: &str, key: u8) -> MemberCredential {
        let c = admin
            .issue_credential(cred_body(handle, role, key))
            .unwrap();
        MemberCredential::verify(&c.to_bytes(), 1500).unwrap()
    }

    #[test]
    fn testvec_policy() {
        let admin = SubnetAdmin::from_secret([1; 32]);
        let signed = admin.issue_policy(policy_body(vec![])).unwrap();
        let text = String::from_utf8(signed.to_bytes()).unwrap();
        assert_eq!(text, POLICY_VECTOR);
        let p = Policy::verify(POLICY_VECTOR.as_bytes(), &admin.subnet()).unwrap();
        assert_eq!(p.to_bytes_for_test(), signed.to_bytes());
    }

    impl Policy {
        fn to_bytes_for_test(&self) -> Vec<u8> {
            self.signed.to_bytes()
        }
    }

    const POLICY_VECTOR: &str = r#"{"body":"{\"subnet\":\"8a88e3dd7409f195fd52db2d3cba5d72ca6709bf1d94121bf3748801b40f6f5c\",\"version\":1,\"issued_at\":1000,\"roles\":[\"staff\",\"guest\",\"lead\"],\"rules\":[{\"from\":\"staff\",\"to\":\"staff\"},{\"from\":\"lead\",\"to\":\"staff\"},{\"from\":\"staff\",\"to\":\"lead\"},{\"from\":\"guest\",\"to\":\"lead\"}],\"federation\":[],\"ttl_min_secs\":60,\"ttl_max_secs\":86400,\"burn_on_read\":\"allowed\",\"revoked_keys\":[],\"revoked_handles\":[]}","signature":"1942582da644e3b9fe55bc726e8f6626ee9a14c46fbe671c553e807fb1583089a268cb45ca51f6e4c8a3ab9832f75c39cfeaf407a0128369bcf68ca688b29a02"}"#;

    #[test]
    fn roles_federation_revocation() {
        let a = SubnetAdmin::from_secret([1; 32]);
        let b = SubnetAdmin::from_secret([2; 32]);
        let c = SubnetAdmin::from_secret([3; 32]);
        let fed = Federation {
            subnet: b.subnet(),
            local_roles: vec!["staff".into()],
            remote_roles: vec!["staff".into()],
        };
        let signed = a.issue_policy(policy_body(vec![fed])).unwrap();
        let mut pa = Policy::verify(&signed.to_bytes(), &a.subnet()).unwrap();
        // A policy is only accepted for the subnet whose admin signed it.
        assert!(matches!(
            Policy::verify(&signed.to_bytes(), &b.subnet()),
            Err(SubnetError::WrongSubnet { .. })
        ));

        let ana = cred(&a, "ana", "staff", 10);
        let lea = cred(&a, "lea", "lead", 11);
        let gus = cred(&a, "gus", "guest", 12);
        let bob = cred(&b, "bob", "staff", 13);
        let bee = cred(&b, "bee", "guest", 14);
        let cy = cred(&c, "cy", "staff", 15);

        assert_eq!(pa.may_send(&ana, &lea, 1500), Ok(()));
        assert_eq!(pa.may_send(&gus, &lea, 1500), Ok(()));
        assert_eq!(
            pa.may_send(&gus, &ana, 1500),
            Err(PolicyRefusal::RolesNotAllowed {
                from: "guest".into(),
                to: "staff".into()
            })
        );
        // Directional: lead may not send to a guest, so a guest may not receive from one.
        assert!(pa.may_receive(&gus, &lea, 1500).is_err());
        assert_eq!(pa.may_receive(&lea, &gus, 1500), Ok(()));
        assert!(pa.may_share_group(&lea, &gus, 1500).is_err());
        assert_eq!(pa.may_share_group(&ana, &bob, 1500), Ok(()));
        assert_eq!(
            pa.may_send(&ana, &cy, 1500),
            Err(PolicyRefusal::NotFederated { subnet: c.subnet() })
        );
        assert!(matches!(
            pa.may_send(&ana, &bee, 1500),
            Err(PolicyRefusal::FederationRoleNotAllowed { .. })
        ));
        assert!(matches!(
            pa.may_send(&gus, &bob, 1500),
            Err(PolicyRefusal::FederationRoleNotAllowed { .. })
        ));
        assert_eq!(
            pa.may_send(&bob, &ana, 1500),
            Err(PolicyRefusal::NotOwnSubnet)
        );
        assert!(matches!(
            pa.may_send(&ana, &lea, 2500),
            Err(PolicyRefusal::Expired { .. })
        ));

        // Revocation by key, then a newer version only.
        let mut body = policy_body(vec![]);
        body.version = 2;
        body.revoked_keys.push(Hex32(lea.signing_key()));
        let p2 = Policy::verify(
            &a.issue_policy(body.clone()).unwrap().to_bytes(),
            &a.subnet(),
        )
        .unwrap();
        pa.update(p2.clone()).unwrap();
        assert_eq!(
            pa.may_send(&ana, &lea, 1500),
            Err(PolicyRefusal::Revoked {
                handle: "lea".into()
            })
        );
        assert_eq!(
            pa.may_receive(&lea, &ana, 1500),
            Err(PolicyRefusal::Revoked {
                handle: "lea".into()
            })
        );
        assert_eq!(
            pa.update(p2),
            Err(SubnetError::StalePolicy { have: 2, got: 2 })
        );
        body.version = 3;
        body.revoked_keys.clear();
        body.revoked_handles.push("ana".into());
        pa.update(Policy::verify(&a.issue_policy(body).unwrap().to_bytes(), &a.subnet()).unwrap())
            .unwrap();
        assert!(matches!(
            pa.may_send(&ana, &lea, 1500),
            Err(PolicyRefusal::Revoked { .. })
        ));
    }

    #[test]
    fn message_options() {
        let a = SubnetAdmin::from_secret([1; 32]);
        let mut body = policy_body(vec![]);
        let p = Policy::verify(
            &a.issue_policy(body.clone()).unwrap().to_bytes(),
            &a.subnet(),
        )
        .unwrap();
        let ok = MessageOptions {
            ttl_secs: 3600,
            burn_on_read: false,
        };
        assert_eq!(p.check_options(&ok), Ok(()));
        assert!(matches!(
            p.check_options(&MessageOptions { ttl_secs: 10, ..ok }),
            Err(PolicyRefusal::Ttl { .. })
        ));
        assert!(matches!(
            p.check_options(&MessageOptions {
                ttl_secs: 100_000,
                ..ok
            }),
            Err(PolicyRefusal::Ttl { .. })
        ));
        body.burn_on_read = BurnOnRead::Required;
        let p = Policy::verify(
            &a.issue_policy(body.clone()).unwrap().to_bytes(),
            &a.subnet(),
        )
        .unwrap();
        assert_eq!(
            p.check_options(&ok),
            Err(PolicyRefusal::BurnOnRead("is required"))
        );
        body.burn_on_read = BurnOnRead::Forbidden;
        let p = Policy::verify(&a.issue_policy(body).unwrap().to_bytes(), &a.subnet()).unwrap();
        assert!(
            p.check_options(&MessageOptions {
                burn_on_read: true,
                ..ok
            })
            .is_err()
        );
    }

    #[test]
    fn invalid_policies_refused() {
        let a = SubnetAdmin::from_secret([1; 32]);
        let mut body = policy_body(vec![]);
        body.rules.push(RoleRule {
            from: "staff".into(),
            to: "nobody".into(),
        });
        assert!(matches!(
            a.issue_policy(body),
            Err(SubnetError::Invalid { .. })
        ));
        let mut body = policy_body(vec![]);
        body.ttl_min_secs = 10;
        body.ttl_max_secs = 5;
        assert!(a.issue_policy(body).is_err());
        let signed = a.issue_policy(policy_body(vec![])).unwrap();
        let text = String::from_utf8(signed.to_bytes())
            .unwrap()
            .replace("86400", "86401");
        assert!(matches!(
            Policy::verify(text.as_bytes(), &a.subnet()),
            Err(SubnetError::BadSignature { .. })
        ));
    }
}

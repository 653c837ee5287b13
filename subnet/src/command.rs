//! Admin-signed account commands for the gateways that host a subnet.
//!
//! Chain: bytes → [`UncheckedCommand`] → `.check_signature(hosted subnets)` →
//! `.check_fresh(gateway, now, &mut CommandGuard)` → [`AdminCommand`]. Replay
//! protection: each command names one gateway, expires, and carries a sequence number
//! that must be above the last one the gateway accepted from that subnet. The gateway
//! persists its [`CommandGuard`] with the account change it applies, in one commit.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use shoal_topology::Hex32;

use crate::envelope::Envelope;
use crate::{Policy, SubnetAdmin, SubnetError, SubnetId};

const DOMAIN: &str = "shoal subnet gateway command v1";
const WHAT: &str = "admin command";

/// What the gateway is asked to do. `account` is the client's Ed25519 link key, as the
/// gateway's accounts are keyed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum AccountAction {
    CreateAccount {
        account: Hex32,
        mailbox: Hex32,
        quota: u32,
    },
    /// Stops mailbox access at once and deletes the mailbox's content.
    Deprovision {
        account: Hex32,
    },
    SetQuota {
        account: Hex32,
        quota: u32,
    },
    /// What the gateway enforces of the subnet's policy `version`, and nothing else:
    /// it expires the subnet's mailbox items no later than `ttl_max_secs` and refuses
    /// links (and new accounts) of the `revoked_accounts` link keys. The members' policy
    /// itself (roles, federation, revoked member identity keys) never goes to a gateway:
    /// nothing a gateway receives names a member's identity key.
    PublishPolicy {
        version: u64,
        ttl_max_secs: u64,
        revoked_accounts: Vec<Hex32>,
    },
    /// Read-only: the gateway answers with a [`crate::UsageReport`] of the subnet's
    /// accounts (items, bytes, quota; no keys, mailboxes or content). Signed, fresh and
    /// sequenced like every command, so only the admin can ask and a captured query is
    /// useless.
    AccountUsage,
}

impl AccountAction {
    /// What a gateway is told of `policy`: its version and TTL bound, and the link keys
    /// of the accounts it must refuse (the admin's records map the member identity keys
    /// the policy revokes to them). Nothing else of the policy goes to a gateway.
    pub fn publish_policy(policy: &Policy, revoked_accounts: Vec<Hex32>) -> Self {
        AccountAction::PublishPolicy {
            version: policy.version(),
            ttl_max_secs: policy.body().ttl_max_secs,
            revoked_accounts,
        }
    }
}

/// What the admin signs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandBody {
    pub subnet: SubnetId,
    pub gateway: Hex32,
    pub sequence: u64,
    /// Unix seconds after which the command is refused.
    pub expires_at: u64,
    pub action: AccountAction,
}

/// A command as it travels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedCommand {
    envelope: Envelope,
}

impl SignedCommand {
    pub fn to_bytes(&self) -> Vec<u8> {
        self.envelope.to_bytes()
    }
}

impl SubnetAdmin {
    /// Signs a gateway command for this subnet (`body.subnet` is overwritten).
    pub fn issue_command(&self, mut body: CommandBody) -> Result<SignedCommand, SubnetError> {
        body.subnet = self.subnet();
        Ok(SignedCommand {
            envelope: Envelope::seal(self.key(), DOMAIN, WHAT, &body)?,
        })
    }
}

/// Parsed, nothing checked.
#[derive(Debug, Clone)]
pub struct UncheckedCommand {
    envelope: Envelope,
    body: CommandBody,
}

impl UncheckedCommand {
    pub fn parse(bytes: &[u8]) -> Result<Self, SubnetError> {
        let envelope = Envelope::parse(bytes, WHAT)?;
        let body = envelope.body(WHAT)?;
        Ok(UncheckedCommand { envelope, body })
    }

    /// The subnet and sequence number it claims, unchecked: enough to address an answer
    /// that refuses it (which then says nothing the sender did not write).
    pub fn claimed(&self) -> (SubnetId, u64) {
        (self.body.subnet, self.body.sequence)
    }

    /// Accepts a command only from the admin of a subnet this gateway hosts.
    pub fn check_signature(self, hosted: &[SubnetId]) -> Result<SignedCheckedCommand, SubnetError> {
        if !hosted.contains(&self.body.subnet) {
            return Err(SubnetError::WrongSubnet {
                what: WHAT,
                subnet: self.body.subnet,
            });
        }
        self.envelope.verify(&self.body.subnet, DOMAIN, WHAT)?;
        Ok(SignedCheckedCommand { body: self.body })
    }
}

/// Signature checked; freshness and replay not yet.
#[derive(Debug, Clone)]
pub struct SignedCheckedCommand {
    body: CommandBody,
}

impl SignedCheckedCommand {
    /// The subnet whose admin signed it.
    pub fn subnet(&self) -> SubnetId {
        self.body.subnet
    }

    /// What it asks for; signed, but not yet checked for freshness or replay.
    pub fn action(&self) -> &AccountAction {
        &self.body.action
    }

    /// Its sequence number (signed; not yet checked against the last accepted), which
    /// an answer names.
    pub fn sequence(&self) -> u64 {
        self.body.sequence
    }
}

/// The last sequence number accepted per subnet. A gateway persists it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandGuard {
    last: BTreeMap<SubnetId, u64>,
}

impl CommandGuard {
    /// A guard as a gateway stored it.
    pub fn from_entries(entries: impl IntoIterator<Item = (SubnetId, u64)>) -> Self {
        CommandGuard {
            last: entries.into_iter().collect(),
        }
    }

    pub fn last_sequence(&self, subnet: &SubnetId) -> Option<u64> {
        self.last.get(subnet).copied()
    }

    /// Every (subnet, last accepted sequence), to persist.
    pub fn entries(&self) -> impl Iterator<Item = (SubnetId, u64)> + '_ {
        self.last.iter().map(|(s, n)| (*s, *n))
    }
}

impl SignedCheckedCommand {
    /// Checks the command is for `gateway`, unexpired at `now_unix`, and newer than any
    /// accepted before; records its sequence number in `guard`.
    pub fn check_fresh(
        self,
        gateway: &Hex32,
        now_unix: u64,
        guard: &mut CommandGuard,
    ) -> Result<AdminCommand, SubnetError> {
        let b = &self.body;
        if b.gateway != *gateway {
            return Err(SubnetError::WrongGateway);
        }
        if now_unix > b.expires_at {
            return Err(SubnetError::NotValidAt {
                what: WHAT,
                not_before: 0,
                not_after: b.expires_at,
                now: now_unix,
            });
        }
        if let Some(last) = guard.last_sequence(&b.subnet)
            && b.sequence <= last
        {
            return Err(SubnetError::Replayed {
                last,
                got: b.sequence,
            });
        }
        guard.last.insert(b.subnet, b.sequence);
        Ok(AdminCommand { body: self.body })
    }
}

/// A command the gateway should apply now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminCommand {
    body: CommandBody,
}

impl AdminCommand {
    pub fn subnet(&self) -> SubnetId {
        self.body.subnet
    }
    pub fn sequence(&self) -> u64 {
        self.body.sequence
    }
    pub fn action(&self) -> &AccountAction {
        &self.body.action
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(seq: u64) -> CommandBody {
        CommandBody {
            subnet: Hex32([0; 32]),
            gateway: Hex32([8; 32]),
            sequence: seq,
            expires_at: 2000,
            action: AccountAction::CreateAccount {
                account: Hex32([5; 32]),
                mailbox: Hex32([6; 32]),
                quota: 100,
            },
        }
    }

    fn check(
        bytes: &[u8],
        hosted: &[SubnetId],
        now: u64,
        g: &mut CommandGuard,
    ) -> Result<AdminCommand, SubnetError> {
        UncheckedCommand::parse(bytes)?
            .check_signature(hosted)?
            .check_fresh(&Hex32([8; 32]), now, g)
    }

    #[test]
    fn testvec_command() {
        let admin = SubnetAdmin::from_secret([1; 32]);
        let text = String::from_utf8(admin.issue_command(body(1)).unwrap().to_bytes()).unwrap();
        assert_eq!(text, COMMAND_VECTOR);
        let mut g = CommandGuard::default();
        let cmd = check(COMMAND_VECTOR.as_bytes(), &[admin.subnet()], 1500, &mut g).unwrap();
        assert_eq!(cmd.action(), &body(1).action);
    }

    const COMMAND_VECTOR: &str = r#"{"body":"{\"subnet\":\"8a88e3dd7409f195fd52db2d3cba5d72ca6709bf1d94121bf3748801b40f6f5c\",\"gateway\":\"0808080808080808080808080808080808080808080808080808080808080808\",\"sequence\":1,\"expires_at\":2000,\"action\":{\"create_account\":{\"account\":\"0505050505050505050505050505050505050505050505050505050505050505\",\"mailbox\":\"0606060606060606060606060606060606060606060606060606060606060606\",\"quota\":100}}}","signature":"914a0a36fafde3ff184d6197a2a286bfbc0fea5a9f6cd6a95f5fb5333c0d1671388d8e8d9cffbeb0ee955724a68c0551c947f23df8c8dadff1e431785d43a504"}"#;

    #[test]
    fn publish_policy_travels_and_the_guard_persists() {
        let admin = SubnetAdmin::from_secret([1; 32]);
        let mut b = body(3);
        b.action = AccountAction::PublishPolicy {
            version: 2,
            ttl_max_secs: 3600,
            revoked_accounts: vec![Hex32([7; 32])],
        };
        let bytes = admin.issue_command(b.clone()).unwrap().to_bytes();
        let checked = UncheckedCommand::parse(&bytes)
            .unwrap()
            .check_signature(&[admin.subnet()])
            .unwrap();
        assert_eq!(checked.subnet(), admin.subnet());
        assert_eq!(checked.action(), &b.action);
        let mut g = CommandGuard::default();
        let cmd = checked.check_fresh(&Hex32([8; 32]), 1500, &mut g).unwrap();
        assert_eq!(cmd.sequence(), 3);
        let stored: Vec<_> = g.entries().collect();
        assert_eq!(stored, vec![(admin.subnet(), 3)]);
        assert_eq!(CommandGuard::from_entries(stored), g);
    }

    #[test]
    fn replay_expiry_and_scope() {
        let admin = SubnetAdmin::from_secret([1; 32]);
        let other = SubnetAdmin::from_secret([2; 32]);
        let hosted = [admin.subnet()];
        let mut g = CommandGuard::default();
        let c1 = admin.issue_command(body(1)).unwrap().to_bytes();
        let c2 = admin.issue_command(body(2)).unwrap().to_bytes();
        check(&c1, &hosted, 1500, &mut g).unwrap();
        assert_eq!(
            check(&c1, &hosted, 1500, &mut g),
            Err(SubnetError::Replayed { last: 1, got: 1 })
        );
        check(&c2, &hosted, 1500, &mut g).unwrap();
        // An older, still unexpired command cannot be slipped in after a newer one.
        assert!(matches!(
            check(&c1, &hosted, 1500, &mut g),
            Err(SubnetError::Replayed { .. })
        ));
        let c3 = admin.issue_command(body(3)).unwrap().to_bytes();
        assert!(matches!(
            check(&c3, &hosted, 2001, &mut g),
            Err(SubnetError::NotValidAt { .. })
        ));
        // Refused commands do not move the guard.
        assert_eq!(g.last_sequence(&admin.subnet()), Some(2));
        let foreign = other.issue_command(body(9)).unwrap().to_bytes();
        assert!(matches!(
            check(&foreign, &hosted, 1500, &mut g),
            Err(SubnetError::WrongSubnet { .. })
        ));
        let mut b = body(4);
        b.gateway = Hex32([9; 32]);
        let elsewhere = admin.issue_command(b).unwrap().to_bytes();
        assert_eq!(
            check(&elsewhere, &hosted, 1500, &mut g),
            Err(SubnetError::WrongGateway)
        );
        let tampered = String::from_utf8(c3).unwrap().replace("100", "999");
        assert!(matches!(
            check(tampered.as_bytes(), &hosted, 1500, &mut g),
            Err(SubnetError::BadSignature { .. })
        ));
        // The same key signing the same body under another type's domain does not pass.
        let mut b = body(5);
        b.subnet = admin.subnet();
        let cross = Envelope::seal(admin.key(), "shoal subnet credential v1", WHAT, &b).unwrap();
        assert!(matches!(
            check(&cross.to_bytes(), &hosted, 1500, &mut g),
            Err(SubnetError::BadSignature { .. })
        ));
    }
}

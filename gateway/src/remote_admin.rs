//! Admin-signed subnet commands: the check every command passes before the mailbox
//! core applies it, whichever way it came.
//!
//! Commands reach a gateway through the mixnet ([`crate::admin_inbox`]): the admin's own
//! client sends them as ordinary messages to the gateway's admin endpoint. The gateway
//! checks the command's signature off the mailbox task with [`check_command`], and hands
//! the resulting [`CheckedAdmin`] to [`crate::Mailbox::apply_admin`], which checks target,
//! expiry and sequence against the persisted guard and applies it. The answer goes out
//! only after the store reports the batch durable. The one read-only command, account
//! usage, goes the same way (signed, fresh, sequenced, answered once its sequence number
//! is durable) and is answered with a [`shoal_subnet::UsageReport`].
//!
//! (Admins used to dial the gateway's client port with their subnet key and send the
//! command as a burst of `AdminChunk` frames: a link of its own whose frame count grew
//! with the command. That path is gone; gateways refuse such frames.)

use shoal_packet::protocol::AdminRefusal;
use shoal_subnet::{SignedCheckedCommand, SubnetError, SubnetId, UncheckedCommand};

/// A command whose admin signature verified against a hosted subnet. Freshness and
/// replay are checked when the mailbox core applies it.
#[derive(Debug, Clone)]
pub struct CheckedAdmin {
    pub(crate) command: SignedCheckedCommand,
}

impl CheckedAdmin {
    pub fn subnet(&self) -> SubnetId {
        self.command.subnet()
    }
}

/// A refused command: the cause (for the answer and `/metrics`) and a short message
/// without keys or addresses.
pub type Refusal = (AdminRefusal, &'static str);

/// The subnet and sequence number a command claims (unchecked), to address the answer
/// refusing it; `None` if it does not even parse (then no answer can name it).
pub fn claimed(bytes: &[u8]) -> Option<(SubnetId, u64)> {
    UncheckedCommand::parse(bytes).ok().map(|c| c.claimed())
}

/// Parses `bytes` as a signed command and checks its signature against the `hosted`
/// subnets. Public-key work: the driver runs it on a blocking thread.
pub fn check_command(bytes: &[u8], hosted: &[SubnetId]) -> Result<CheckedAdmin, Refusal> {
    let unchecked = UncheckedCommand::parse(bytes)
        .map_err(|_| (AdminRefusal::Malformed, "command does not parse"))?;
    let command = unchecked.check_signature(hosted).map_err(|e| match e {
        SubnetError::WrongSubnet { .. } => (
            AdminRefusal::UnknownSubnet,
            "command is from a subnet this gateway does not host",
        ),
        _ => (
            AdminRefusal::BadSignature,
            "command signature does not verify",
        ),
    })?;
    Ok(CheckedAdmin { command })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
pub(crate) mod tests {
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    use ed25519_dalek::SigningKey;
    use shoal_packet::SPHINX_PAYLOAD_SIZE;
    use shoal_subnet::UsageReport;
    use shoal_subnet::{
        AccountAction, BurnOnRead, CommandBody, Policy, PolicyBody, RoleRule, SubnetAdmin,
    };
    use shoal_topology::Hex32;

    use super::*;
    use crate::GatewayError;
    use crate::mailbox::{Committed, Mailbox, MailboxConfig, Salt};
    use crate::store::{Store, StoreConfig};

    const GW: Hex32 = Hex32([0x6a; 32]);
    const NOW: u64 = 1_700_000_000;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(NOW + secs)
    }

    fn key(seed: u8) -> Hex32 {
        Hex32(
            SigningKey::from_bytes(&[seed; 32])
                .verifying_key()
                .to_bytes(),
        )
    }

    fn body(seq: u64, action: AccountAction) -> CommandBody {
        CommandBody {
            subnet: Hex32([0; 32]),
            gateway: GW,
            sequence: seq,
            expires_at: NOW + 600,
            action,
        }
    }

    fn create(account: u8, mailbox: u8) -> AccountAction {
        AccountAction::CreateAccount {
            account: key(account),
            mailbox: Hex32([mailbox; 32]),
            quota: 10,
        }
    }

    /// What the admin tells its gateways of its policy `version`.
    pub(crate) fn policy(
        admin: &SubnetAdmin,
        version: u64,
        ttl_max: u64,
        revoked: Vec<Hex32>,
    ) -> AccountAction {
        AccountAction::publish_policy(&policy_body(admin, version, ttl_max), revoked)
    }

    fn policy_body(admin: &SubnetAdmin, version: u64, ttl_max: u64) -> Policy {
        let body = PolicyBody {
            subnet: admin.subnet(),
            version,
            issued_at: NOW,
            roles: vec!["staff".into()],
            rules: vec![RoleRule {
                from: "staff".into(),
                to: "staff".into(),
            }],
            federation: vec![],
            ttl_min_secs: 0,
            ttl_max_secs: ttl_max,
            burn_on_read: BurnOnRead::Allowed,
            revoked_keys: vec![],
            revoked_handles: vec![],
        };
        Policy::verify(
            &admin.issue_policy(body).unwrap().to_bytes(),
            &admin.subnet(),
        )
        .unwrap()
    }

    fn cfg() -> MailboxConfig {
        MailboxConfig {
            pull_batch: 4,
            redelivery_timeout: Duration::from_secs(10),
            ttl: Duration::from_secs(3600),
        }
    }

    fn apply(
        m: &mut Mailbox,
        admin: &SubnetAdmin,
        hosted: &[SubnetId],
        b: CommandBody,
        now: SystemTime,
    ) -> Result<Vec<[u8; 32]>, AdminRefusal> {
        let bytes = admin.issue_command(b).unwrap().to_bytes();
        let checked = check_command(&bytes, hosted).map_err(|r| r.0)?;
        let applied = m.apply_admin(checked, &GW, now).map_err(|r| r.0)?;
        while let Some(b) = m.poll_write() {
            let _ = m.on_committed(Committed::dangerously_assume_durable(&b));
        }
        Ok(applied.cut)
    }

    #[test]
    fn each_command_applies_and_each_refusal_changes_nothing() {
        let a = SubnetAdmin::from_secret([1; 32]);
        let b = SubnetAdmin::from_secret([2; 32]);
        let hosted = [a.subnet(), b.subnet()];
        let mut m = Mailbox::new(cfg(), Salt::from_bytes([3; 32])).unwrap();

        apply(&mut m, &a, &hosted, body(1, create(10, 0xa0)), at(0)).unwrap();
        assert!(m.is_account(&key(10).0));
        assert_eq!(m.account_subnet(&key(10).0), Some(a.subnet()));
        assert_eq!(m.last_sequence(&a.subnet()), Some(1));

        // Replay, older sequence, wrong gateway, expired: refused, nothing moves.
        let r = |m: &mut Mailbox, b: CommandBody, now| apply(m, &a, &hosted, b, now);
        assert_eq!(
            r(&mut m, body(1, create(11, 0xa1)), at(0)),
            Err(AdminRefusal::Replayed)
        );
        let mut elsewhere = body(5, create(11, 0xa1));
        elsewhere.gateway = Hex32([0x6b; 32]);
        assert_eq!(r(&mut m, elsewhere, at(0)), Err(AdminRefusal::WrongGateway));
        assert_eq!(
            r(&mut m, body(5, create(11, 0xa1)), at(601)),
            Err(AdminRefusal::Expired)
        );
        assert!(!m.is_account(&key(11).0));
        assert_eq!(m.last_sequence(&a.subnet()), Some(1));
        // A command that is fresh but does not apply does not use up its sequence number.
        assert_eq!(
            r(&mut m, body(2, create(10, 0xa2)), at(0)),
            Err(AdminRefusal::Rejected)
        );
        assert_eq!(m.last_sequence(&a.subnet()), Some(1));

        // Quota, then de-provision: the account's links are to be cut.
        r(
            &mut m,
            body(
                2,
                AccountAction::SetQuota {
                    account: key(10),
                    quota: 1,
                },
            ),
            at(0),
        )
        .unwrap();
        assert_eq!(
            m.deliver(&[0xa0; 32], [0; 16], &[0; SPHINX_PAYLOAD_SIZE], at(1)),
            crate::DeliverOutcome::Accepted { id: 1, ack: false }
        );
        assert_eq!(
            m.deliver(&[0xa0; 32], [0; 16], &[0; SPHINX_PAYLOAD_SIZE], at(1)),
            crate::DeliverOutcome::QuotaFull
        );

        // Another hosted subnet cannot touch A's accounts.
        assert_eq!(
            apply(
                &mut m,
                &b,
                &hosted,
                body(1, AccountAction::Deprovision { account: key(10) }),
                at(0)
            ),
            Err(AdminRefusal::Rejected)
        );
        assert_eq!(
            r(
                &mut m,
                body(3, AccountAction::Deprovision { account: key(10) }),
                at(0)
            ),
            Ok(vec![key(10).0])
        );
        assert!(!m.is_account(&key(10).0));
        assert_eq!(m.item_count(&key(10).0), None);
        assert_eq!(m.pull(&key(10).0, at(2)), Err(GatewayError::UnknownAccount));

        // Not hosted, bad signature, garbage.
        let c = SubnetAdmin::from_secret([4; 32]);
        assert_eq!(
            apply(&mut m, &c, &hosted, body(9, create(12, 0xa3)), at(0)),
            Err(AdminRefusal::UnknownSubnet)
        );
        let good = String::from_utf8(
            a.issue_command(body(9, create(12, 0xa3)))
                .unwrap()
                .to_bytes(),
        )
        .unwrap();
        let tampered = good.replace("\\\"quota\\\":10", "\\\"quota\\\":99");
        assert_ne!(good, tampered);
        assert_eq!(
            check_command(tampered.as_bytes(), &hosted).unwrap_err().0,
            AdminRefusal::BadSignature
        );
        assert_eq!(
            check_command(b"{}", &hosted).unwrap_err().0,
            AdminRefusal::Malformed
        );
        assert_eq!(m.stats().admin_applied, 3);
    }

    #[test]
    fn policy_caps_ttl_and_revokes_keys() {
        let a = SubnetAdmin::from_secret([1; 32]);
        let hosted = [a.subnet()];
        let mut m = Mailbox::new(cfg(), Salt::from_bytes([3; 32])).unwrap();
        m.create_account(&[0xee; 32], key(30).0, 10).unwrap();
        apply(&mut m, &a, &hosted, body(1, create(10, 0xa0)), at(0)).unwrap();
        apply(&mut m, &a, &hosted, body(2, create(11, 0xa1)), at(0)).unwrap();
        for mb in [0xa0, 0xa1, 0xee] {
            m.deliver(&[mb; 32], [0; 16], &[0; SPHINX_PAYLOAD_SIZE], at(0));
        }
        while let Some(b) = m.poll_write() {
            let _ = m.on_committed(Committed::dangerously_assume_durable(&b));
        }
        // Policy v1: max TTL 60 s (the gateway's own is an hour), revokes key 11.
        let p1 = policy(&a, 1, 60, vec![key(11)]);
        let cut = apply(&mut m, &a, &hosted, body(3, p1.clone()), at(1)).unwrap();
        assert_eq!(cut, vec![key(11).0]);
        assert!(!m.is_account(&key(11).0), "revoked key refused");
        assert!(m.is_account(&key(10).0));
        assert_eq!(m.policy_version(&a.subnet()), Some(1));
        // Items already stored are rescheduled to the policy's TTL.
        assert_eq!(m.next_expiry(), Some(at(60)));
        assert_eq!(m.expire(at(59)), 0);
        assert_eq!(
            m.expire(at(60)),
            2,
            "both of the subnet's items, not the offline account's"
        );
        assert_eq!(m.item_count(&key(30).0), Some(1));
        // A revoked key cannot be created again, and an old policy is not taken back.
        assert_eq!(
            apply(&mut m, &a, &hosted, body(4, create(11, 0xa5)), at(2)),
            Err(AdminRefusal::Rejected)
        );
        assert_eq!(
            apply(&mut m, &a, &hosted, body(5, p1), at(2)),
            Err(AdminRefusal::Rejected)
        );
    }

    /// Applies `b` and returns the usage report it was answered with, after the batch
    /// carrying its sequence number was made durable.
    fn usage(
        m: &mut Mailbox,
        admin: &SubnetAdmin,
        hosted: &[SubnetId],
        seq: u64,
        now: SystemTime,
    ) -> UsageReport {
        let unix = now.duration_since(UNIX_EPOCH).unwrap().as_secs();
        let bytes = admin
            .issue_command(CommandBody {
                expires_at: unix + 600,
                ..body(seq, AccountAction::AccountUsage)
            })
            .unwrap()
            .to_bytes();
        let applied = m
            .apply_admin(check_command(&bytes, hosted).unwrap(), &GW, now)
            .unwrap();
        while let Some(b) = m.poll_write() {
            let _ = m.on_committed(Committed::dangerously_assume_durable(&b));
        }
        applied
            .usage
            .expect("a usage query is answered with a report")
    }

    /// Hole 7: an admin polling account usage to watch who receives mail when. Reports
    /// are refused more often than every 15 minutes, and a few items in a mailbox with an
    /// ordinary quota show as none; only mailboxes filling up show.
    #[test]
    fn rogue_admin_cannot_watch_activity_through_usage_reports() {
        use crate::mailbox::{USAGE_MIN_INTERVAL, USAGE_STEPS};
        let a = SubnetAdmin::from_secret([1; 32]);
        let hosted = [a.subnet()];
        let mut m = Mailbox::new(cfg(), Salt::from_bytes([3; 32])).unwrap();
        let big = AccountAction::CreateAccount {
            account: key(10),
            mailbox: Hex32([0xa0; 32]),
            quota: 10_000,
        };
        apply(&mut m, &a, &hosted, body(1, big), at(0)).unwrap();
        let id = shoal_subnet::usage_id(&a.subnet(), &key(10));
        let items = |r: &UsageReport| r.accounts.iter().find(|u| u.id == id).unwrap().items;
        assert_eq!(items(&usage(&mut m, &a, &hosted, 2, at(1))), 0);
        for _ in 0..5 {
            m.deliver(&[0xa0; 32], [1; 16], &[0; SPHINX_PAYLOAD_SIZE], at(2));
        }
        while let Some(b) = m.poll_write() {
            let _ = m.on_committed(Committed::dangerously_assume_durable(&b));
        }
        // Asked again a minute later: refused, nothing learnt.
        let again = a
            .issue_command(body(3, AccountAction::AccountUsage))
            .unwrap()
            .to_bytes();
        let refused = m
            .apply_admin(check_command(&again, &hosted).unwrap(), &GW, at(61))
            .unwrap_err();
        assert_eq!(refused.0, AdminRefusal::Rejected);
        // Once allowed again, five items of a 10,000 quota still read as none...
        let later = at(1 + USAGE_MIN_INTERVAL.as_secs());
        let report = usage(&mut m, &a, &hosted, 4, later);
        assert_eq!(items(&report), 0);
        assert_eq!(report.accounts[0].bytes, 0);
        // ...while a mailbox an eighth full shows it, in whole steps.
        let step = 10_000 / USAGE_STEPS as usize;
        for _ in 0..step + 3 {
            m.deliver(&[0xa0; 32], [1; 16], &[0; SPHINX_PAYLOAD_SIZE], later);
        }
        while let Some(b) = m.poll_write() {
            let _ = m.on_committed(Committed::dangerously_assume_durable(&b));
        }
        let much_later = later + USAGE_MIN_INTERVAL;
        assert_eq!(
            items(&usage(&mut m, &a, &hosted, 5, much_later)),
            step as u32
        );
        // A tiny quota does not buy item-exact counts: steps are never below
        // USAGE_MIN_STEP items.
        let tiny = AccountAction::CreateAccount {
            account: key(11),
            mailbox: Hex32([0xa1; 32]),
            quota: 8,
        };
        let unix = much_later.duration_since(UNIX_EPOCH).unwrap().as_secs();
        let create_tiny = CommandBody {
            expires_at: unix + 600,
            ..body(6, tiny)
        };
        apply(&mut m, &a, &hosted, create_tiny, much_later).unwrap();
        for _ in 0..5 {
            m.deliver(&[0xa1; 32], [2; 16], &[0; SPHINX_PAYLOAD_SIZE], much_later);
        }
        while let Some(b) = m.poll_write() {
            let _ = m.on_committed(Committed::dangerously_assume_durable(&b));
        }
        let id11 = shoal_subnet::usage_id(&a.subnet(), &key(11));
        let report = usage(&mut m, &a, &hosted, 7, much_later + USAGE_MIN_INTERVAL);
        let row = report.accounts.iter().find(|u| u.id == id11).unwrap();
        assert_eq!((row.items, row.bytes), (0, 0), "5 items of a quota of 8");
    }

    /// Usage in whole steps (here 64 items: a quota of 512) goes up when mail is
    /// stored and down after pull and ack; each subnet sees its own accounts only.
    #[test]
    fn usage_goes_up_when_mail_is_stored_and_down_after_pull_and_ack() {
        use crate::mailbox::USAGE_MIN_STEP;
        let a = SubnetAdmin::from_secret([1; 32]);
        let b = SubnetAdmin::from_secret([2; 32]);
        let hosted = [a.subnet(), b.subnet()];
        let mut m = Mailbox::new(cfg(), Salt::from_bytes([3; 32])).unwrap();
        let create = |account, mailbox| AccountAction::CreateAccount {
            account: key(account),
            mailbox: Hex32([mailbox; 32]),
            quota: 8 * USAGE_MIN_STEP,
        };
        apply(&mut m, &a, &hosted, body(1, create(10, 0xa0)), at(0)).unwrap();
        apply(&mut m, &a, &hosted, body(2, create(11, 0xa1)), at(0)).unwrap();
        apply(&mut m, &b, &hosted, body(1, create(12, 0xb0)), at(0)).unwrap();
        // An account added offline belongs to no subnet and is in no report.
        m.create_account(&[0xee; 32], key(30).0, 10).unwrap();

        let empty = usage(&mut m, &a, &hosted, 3, at(1));
        assert_eq!(empty.total_accounts, 2, "only A's accounts");
        let id10 = shoal_subnet::usage_id(&a.subnet(), &key(10));
        let id11 = shoal_subnet::usage_id(&a.subnet(), &key(11));
        let row = |r: &UsageReport, id| *r.accounts.iter().find(|u| u.id == id).unwrap();
        assert_eq!(
            (
                row(&empty, id10).items,
                row(&empty, id10).bytes,
                row(&empty, id10).quota
            ),
            (0, 0, 8 * USAGE_MIN_STEP)
        );

        let step = USAGE_MIN_STEP as usize;
        for (mb, n) in [(0xa0, 2 * step + 1), (0xa1, step), (0xb0, step), (0xee, 1)] {
            for i in 0..n {
                let tag = [
                    mb,
                    (i % 256) as u8,
                    (i / 256) as u8,
                    0,
                    0,
                    0,
                    0,
                    0,
                    0,
                    0,
                    0,
                    0,
                    0,
                    0,
                    0,
                    0,
                ];
                m.deliver(&[mb; 32], tag, &[0; SPHINX_PAYLOAD_SIZE], at(2));
            }
        }
        while let Some(batch) = m.poll_write() {
            let _ = m.on_committed(Committed::dangerously_assume_durable(&batch));
        }
        let full = usage(&mut m, &a, &hosted, 4, at(1000));
        assert_eq!(row(&full, id10).items, 2 * USAGE_MIN_STEP);
        assert_eq!(
            row(&full, id10).bytes,
            2 * u64::from(USAGE_MIN_STEP) * SPHINX_PAYLOAD_SIZE as u64
        );
        assert_eq!(row(&full, id11).items, USAGE_MIN_STEP);
        // B sees its own account only, under its own id.
        let of_b = usage(&mut m, &b, &hosted, 2, at(3));
        assert_eq!(of_b.total_accounts, 1);
        assert_eq!(
            of_b.accounts[0].id,
            shoal_subnet::usage_id(&b.subnet(), &key(12))
        );
        assert_eq!(of_b.accounts[0].items, USAGE_MIN_STEP);

        // Pull and ack two: 2 steps + 1 becomes 2 steps - 1, one step down.
        let plan = m.pull(&key(10).0, at(4)).unwrap();
        let ids: Vec<u64> = plan
            .items()
            .iter()
            .filter_map(|i| match i {
                crate::mailbox::PullItem::Real { id, .. } => Some(*id),
                crate::mailbox::PullItem::Dummy => None,
            })
            .take(2)
            .collect();
        assert_eq!(ids.len(), 2);
        m.ack(&key(10).0, &ids).unwrap();
        while let Some(batch) = m.poll_write() {
            let _ = m.on_committed(Committed::dangerously_assume_durable(&batch));
        }
        let after = usage(&mut m, &a, &hosted, 5, at(2000));
        assert_eq!(row(&after, id10).items, USAGE_MIN_STEP);
        assert_eq!(
            row(&after, id10).bytes,
            u64::from(USAGE_MIN_STEP) * SPHINX_PAYLOAD_SIZE as u64
        );
        assert_eq!(row(&after, id11).items, USAGE_MIN_STEP);

        // A usage query is a command like the others: a replay is refused.
        let replay = a
            .issue_command(CommandBody {
                expires_at: NOW + 2600,
                ..body(5, AccountAction::AccountUsage)
            })
            .unwrap()
            .to_bytes();
        assert_eq!(
            m.apply_admin(check_command(&replay, &hosted).unwrap(), &GW, at(2000))
                .unwrap_err()
                .0,
            AdminRefusal::Replayed
        );
    }

    #[test]
    fn rogue_gateway_store_keeps_no_federation_partners() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.redb");
        let a = SubnetAdmin::from_secret([1; 32]);
        let partner = SubnetAdmin::from_secret([0x77; 32]).subnet();
        let hosted = [a.subnet()];
        let mut pb = policy_body(&a, 1, 60).body().clone();
        pb.federation.push(shoal_subnet::Federation {
            subnet: partner,
            local_roles: vec!["staff".into()],
            remote_roles: vec!["staff".into()],
        });
        pb.roles.push("secretrole".into());
        // A member identity key the policy revokes, whose account's link key is key(11).
        pb.revoked_keys.push(Hex32([0x1d; 32]));
        let full = Policy::verify(&a.issue_policy(pb).unwrap().to_bytes(), &a.subnet()).unwrap();
        let p1 = AccountAction::publish_policy(&full, vec![key(11)]);
        {
            let (store, rec) =
                Store::open(&path, &StoreConfig::default(), &mut rand::rng()).unwrap();
            let mut m = Mailbox::restore(cfg(), rec).unwrap();
            for (seq, action) in [(1, create(10, 0xa0)), (2, create(11, 0xa1)), (3, p1)] {
                let c = a.issue_command(body(seq, action)).unwrap().to_bytes();
                m.apply_admin(check_command(&c, &hosted).unwrap(), &GW, at(0))
                    .unwrap();
            }
            while let Some(b) = m.poll_write() {
                store.commit(b).unwrap();
            }
            store.close().unwrap();
        }
        let raw = std::fs::read(&path).unwrap();
        let has = |needle: &[u8]| raw.windows(needle.len()).any(|w| w == needle);
        assert!(!has(&partner.0), "partner's id, raw");
        assert!(!has(hex::encode(partner.0).as_bytes()), "partner's id, hex");
        assert!(!has(b"secretrole"), "roles");
        assert!(!has(&[0x1d; 32]), "revoked member identity key");
        let (_store, rec) = Store::open(&path, &StoreConfig::default(), &mut rand::rng()).unwrap();
        let mut m = Mailbox::restore(cfg(), rec).unwrap();
        assert_eq!(m.policy_version(&a.subnet()), Some(1));
        assert!(m.is_account(&key(10).0));
        assert!(!m.is_account(&key(11).0), "the revocation is kept");
        let old = a
            .issue_command(body(4, policy(&a, 1, 60, vec![])))
            .unwrap()
            .to_bytes();
        assert!(
            m.apply_admin(check_command(&old, &hosted).unwrap(), &GW, at(0))
                .is_err(),
            "the version is kept: an older one is still refused"
        );
    }

    #[test]
    fn guard_policy_and_subnet_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.redb");
        let a = SubnetAdmin::from_secret([1; 32]);
        let hosted = [a.subnet()];
        let create1 = a
            .issue_command(body(7, create(10, 0xa0)))
            .unwrap()
            .to_bytes();
        let p1 = policy(&a, 1, 60, vec![]);
        {
            let (store, rec) =
                Store::open(&path, &StoreConfig::default(), &mut rand::rng()).unwrap();
            let mut m = Mailbox::restore(cfg(), rec).unwrap();
            m.apply_admin(check_command(&create1, &hosted).unwrap(), &GW, at(0))
                .unwrap();
            let pub1 = a.issue_command(body(8, p1.clone())).unwrap().to_bytes();
            m.apply_admin(check_command(&pub1, &hosted).unwrap(), &GW, at(0))
                .unwrap();
            while let Some(b) = m.poll_write() {
                store.commit(b).unwrap();
            }
            store.close().unwrap();
        }
        let (store, rec) = Store::open(&path, &StoreConfig::default(), &mut rand::rng()).unwrap();
        let mut m = Mailbox::restore(cfg(), rec).unwrap();
        assert_eq!(m.last_sequence(&a.subnet()), Some(8));
        assert_eq!(m.account_subnet(&key(10).0), Some(a.subnet()));
        assert_eq!(m.policy_version(&a.subnet()), Some(1));
        // The captured command replayed after the restart is still refused.
        assert_eq!(
            m.apply_admin(check_command(&create1, &hosted).unwrap(), &GW, at(0))
                .unwrap_err()
                .0,
            AdminRefusal::Replayed
        );
        // And the restored policy still caps the TTL.
        m.deliver(&[0xa0; 32], [0; 16], &[0; SPHINX_PAYLOAD_SIZE], at(0));
        assert_eq!(m.next_expiry(), Some(at(60)));
        drop(store);
    }
}

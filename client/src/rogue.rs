//! The rogue suite, run against the code *before* the identity fix: each test here
//! asserts that the attack SUCCEEDS on the old acceptance rules. Kept only as evidence.

use shoal_subnet::{BurnOnRead, CredentialBody, PolicyBody, RoleRule, SubnetAdmin};
use shoal_topology::Hex32;

use crate::group::GroupConfig;
use crate::messenger::*;
use shoal_subnet::{MessageOptions, Policy};

const NOW: u64 = 1_500_000;
const OPTS: MessageOptions = MessageOptions {
    ttl_secs: 3600,
    burn_on_read: false,
};

fn policy(admin: &SubnetAdmin, fed: &[shoal_subnet::SubnetId]) -> Policy {
    let body = PolicyBody {
        subnet: admin.subnet(),
        version: 1,
        issued_at: 1000,
        roles: vec!["staff".into()],
        rules: vec![RoleRule {
            from: "staff".into(),
            to: "staff".into(),
        }],
        federation: fed
            .iter()
            .map(|s| shoal_subnet::Federation {
                subnet: *s,
                local_roles: vec!["staff".into()],
                remote_roles: vec!["staff".into()],
            })
            .collect(),
        ttl_min_secs: 60,
        ttl_max_secs: 86_400,
        burn_on_read: BurnOnRead::Allowed,
        revoked_keys: vec![],
        revoked_handles: vec![],
    };
    let signed = admin.issue_policy(body).unwrap();
    Policy::verify(&signed.to_bytes(), &admin.subnet()).unwrap()
}

fn x(seed: u8) -> [u8; 32] {
    x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from([seed; 32])).to_bytes()
}

/// A member whose admin-signed credential names `seal`/`mailbox` (the admin chooses them).
fn member_with(admin: &SubnetAdmin, pol: &Policy, handle: &str, seed: u8, seal: [u8; 32], mailbox: [u8; 32]) -> Messenger {
    let secret = [seed; 32];
    let key = ed25519_dalek::SigningKey::from_bytes(&secret);
    let cred = admin
        .issue_credential(CredentialBody {
            subnet: admin.subnet(),
            handle: handle.into(),
            role: "staff".into(),
            signing_key: Hex32(key.verifying_key().to_bytes()),
            seal_key: Hex32(seal),
            mailbox: Hex32(mailbox),
            gateway: Hex32([9; 32]),
            not_before: 1000,
            not_after: 100_000,
        })
        .unwrap();
    let config = MessengerConfig {
        groups: GroupConfig { commit_settle_ms: 1000 },
        ..MessengerConfig::default()
    };
    Messenger::new(secret, &cred, pol.clone(), config, NOW).unwrap()
}

fn events(m: &mut Messenger) -> Vec<MessengerEvent> {
    std::iter::from_fn(|| m.poll_event()).collect()
}

/// Hole 1: the admin writes its own seal key and mailbox into bob's credential. Bob's
/// client accepts it; ana's reply is sealed to the admin's key and sent to its mailbox.
#[test]
fn rogue_admin_seal_key_old_rule_attack_succeeds() {
    let admin = SubnetAdmin::from_secret([0xa1; 32]);
    let pol = policy(&admin, &[]);
    let mut ana = member_with(&admin, &pol, "ana", 1, x(1), [1; 32]);
    // Bob's real seal key would be x(2); the admin substitutes x(0xee).
    let bob = member_with(&admin, &pol, "bob", 2, x(0xee), [0xee; 32]);
    ana.send_direct(bob.credential(), OPTS, b"secret", NOW).unwrap();
    let out = ana.poll_outgoing().unwrap();
    assert_eq!(out.to.public_key, x(0xee), "sealed to the admin's key");
    assert_eq!(out.to.mailbox, [0xee; 32], "sent to the admin's mailbox");
    println!("ATTACK 1 SUCCEEDED: ana sealed to the admin's key, bob's client accepted the credential");
}

/// Hole 2: the admin mints a second "bob" with its own key; its DM lands in the same
/// conversation as bob's, with no alert. A federated "bob" of another subnet too.
#[test]
fn rogue_admin_impersonation_old_rule_attack_succeeds() {
    let admin = SubnetAdmin::from_secret([0xa1; 32]);
    let other = SubnetAdmin::from_secret([0xb2; 32]);
    let pol = policy(&admin, &[other.subnet()]);
    let pol_b = policy(&other, &[admin.subnet()]);
    let mut ana = member_with(&admin, &pol, "ana", 1, x(1), [1; 32]);
    let mut bob = member_with(&admin, &pol, "bob", 2, x(2), [2; 32]);
    let mut fake = member_with(&admin, &pol, "bob", 0xee, x(0xee), [0xee; 32]);
    let mut fed = member_with(&other, &pol_b, "bob", 0xdd, x(0xdd), [0xdd; 32]);
    for (m, body) in [(&mut bob, &b"real"[..]), (&mut fake, b"fake"), (&mut fed, b"federated")] {
        m.send_direct(ana.credential(), OPTS, body, NOW).unwrap();
        let out = m.poll_outgoing().unwrap();
        ana.handle_incoming(&out.bytes, NOW);
    }
    let evs = events(&mut ana);
    assert!(evs.iter().all(|e| matches!(e, MessengerEvent::Message { .. })), "no alert: {evs:?}");
    let conv = ana.read_conversation(Conversation::Direct("bob"), NOW);
    let bodies: Vec<&[u8]> = conv.iter().map(|m| m.body.as_slice()).collect();
    assert_eq!(bodies, [&b"real"[..], b"fake", b"federated"]);
    println!("ATTACK 2 SUCCEEDED: three different keys merged into conversation \"bob\" with no alert");
}

/// Hole 3: a network invite from anyone with the handle "bob" is what `/invite bob`
/// picks (the old `invite_for` in shoal/src/chat/member.rs, replicated here).
#[test]
fn rogue_admin_lookalike_invite_old_rule_attack_succeeds() {
    let admin = SubnetAdmin::from_secret([0xa1; 32]);
    let pol = policy(&admin, &[]);
    let mut ana = member_with(&admin, &pol, "ana", 1, x(1), [1; 32]);
    let mut bob = member_with(&admin, &pol, "bob", 2, x(2), [2; 32]);
    let mut fake = member_with(&admin, &pol, "bob", 0xee, x(0xee), [0xee; 32]);
    let pasted = bob.invite().unwrap(); // the card ana pasted
    fake.send_invite(ana.credential(), NOW).unwrap();
    let out = fake.poll_outgoing().unwrap();
    ana.handle_incoming(&out.bytes, NOW);
    // Old rule: newest network invite with a matching handle, else the pasted card.
    let chosen = ana
        .received_invites()
        .iter()
        .rev()
        .find(|i| i.handle == "bob")
        .map(|i| i.invite())
        .unwrap_or(pasted.clone());
    assert_ne!(chosen, pasted);
    let g = ana.create_group(NOW).unwrap();
    ana.add_members(&g, &[chosen], NOW).unwrap();
    println!("ATTACK 3 SUCCEEDED: /invite bob picked the admin's look-alike invite over the pasted card");
}

//! The rogue suite: the adversary holds the subnet's admin key (and, where it matters,
//! the gateway's mailboxes, so it can drop, copy and replay what members receive).
//! Each test plays one attack and passes only when the attack is prevented. Where a
//! test-only switch restores an old acceptance rule, a companion test shows the attack
//! succeeding with it (so the test has power). `cargo test -p shoal-client --lib rogue`.

use rand::SeedableRng;
use rand::rngs::StdRng;
use shoal_packet::payload::INNER_BODY_SIZE;
use shoal_subnet::{
    AddressBinding, BindingBody, BurnOnRead, CredentialBody, Federation, MemberCard,
    MemberCredential, MessageOptions, Policy, PolicyBody, RoleRule, SubnetAdmin, SubnetId,
};
use shoal_topology::Hex32;
use x25519_dalek::{PublicKey, StaticSecret};

use crate::Contact;
use crate::group::{
    GroupConfig, GroupError, GroupEvent, GroupManager, GroupOutgoing, OutgoingKind, commit_rank,
};
use crate::messenger::*;
use crate::seal;

const NOW: u64 = 1_500_000_000;
const OPTS: MessageOptions = MessageOptions {
    ttl_secs: 3600,
    burn_on_read: false,
};

fn policy(admin: &SubnetAdmin, fed: &[SubnetId]) -> Policy {
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
            .map(|s| Federation {
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

/// Where the client with `seed` is really reached (its core's seal key and mailbox).
fn own(seed: u8) -> Contact {
    Contact {
        mailbox: [seed; 32],
        gateway: [9; 32],
        public_key: PublicKey::from(&StaticSecret::from([seed; 32])).to_bytes(),
    }
}

/// An admin-signed credential for the identity key of `seed`, stating `addr` (the
/// admin's word on where the member is; all zero: not stated).
fn credential(
    admin: &SubnetAdmin,
    handle: &str,
    seed: u8,
    addr: Option<Contact>,
) -> MemberCredential {
    let key = ed25519_dalek::SigningKey::from_bytes(&[seed; 32]);
    let addr = addr.unwrap_or(Contact {
        mailbox: [0; 32],
        gateway: [0; 32],
        public_key: [0; 32],
    });
    let signed = admin
        .issue_credential(CredentialBody {
            subnet: admin.subnet(),
            handle: handle.into(),
            role: "staff".into(),
            signing_key: Hex32(key.verifying_key().to_bytes()),
            seal_key: Hex32(addr.public_key),
            mailbox: Hex32(addr.mailbox),
            gateway: Hex32(addr.gateway),
            not_before: 1000,
            not_after: NOW / 1000 + 1_000_000,
        })
        .unwrap();
    MemberCredential::verify(&signed.to_bytes(), NOW / 1000).unwrap()
}

fn config(old_rule: bool) -> MessengerConfig {
    MessengerConfig {
        groups: GroupConfig {
            commit_settle_ms: 1000,
        },
        dangerously_trust_admin_addresses: old_rule,
        ..MessengerConfig::default()
    }
}

fn member(admin: &SubnetAdmin, pol: &Policy, handle: &str, seed: u8) -> Messenger {
    let cred = credential(admin, handle, seed, Some(own(seed)));
    Messenger::new(
        [seed; 32],
        own(seed),
        cred.signed(),
        pol.clone(),
        config(false),
        NOW,
    )
    .unwrap()
}

fn events(m: &mut Messenger) -> Vec<MessengerEvent> {
    std::iter::from_fn(|| m.poll_event()).collect()
}

fn key_of(m: &Messenger) -> (SubnetId, Hex32) {
    (m.card().subnet(), Hex32(m.card().identity_key()))
}

fn deliver(from: &mut Messenger, to: &mut Messenger, now: u64) -> Vec<Outgoing> {
    let mut outs = Vec::new();
    while let Some(out) = from.poll_outgoing() {
        to.handle_incoming(&out.bytes, now);
        outs.push(out);
    }
    outs
}

/// Seals a body to where `out` goes, as the client core would, and says who can open it.
fn who_opens(out: &Outgoing, secrets: &[(&str, u8)]) -> Vec<String> {
    let mut rng = StdRng::seed_from_u64(1);
    let sealed = seal::seal(
        &mut rng,
        &PublicKey::from(out.to.public_key),
        &vec![7u8; INNER_BODY_SIZE],
    )
    .unwrap();
    secrets
        .iter()
        .filter(|(_, s)| seal::open(&StaticSecret::from([*s; 32]), &sealed).is_ok())
        .map(|(n, _)| n.to_string())
        .collect()
}

/// The admin's attack on hole 1: bob's credential carries the admin's seal key and
/// mailbox (it cannot sign a binding for bob's key, so it pairs its credential with
/// bob's real binding, or hands bob the credential directly).
struct Hole1 {
    ana: Messenger,
    bob_card_as_admin_shows_it: MemberCard,
}

const ADMIN_SEED: u8 = 0xee;
const BOB: u8 = 2;

fn hole1(old_rule: bool) -> Hole1 {
    let admin = SubnetAdmin::from_secret([0xa1; 32]);
    let pol = policy(&admin, &[]);
    let ana = {
        let cred = credential(&admin, "ana", 1, Some(own(1)));
        Messenger::new(
            [1; 32],
            own(1),
            cred.signed(),
            pol.clone(),
            config(old_rule),
            NOW,
        )
        .unwrap()
    };
    let bob = member(&admin, &pol, "bob", BOB);
    let evil = credential(&admin, "bob", BOB, Some(own(ADMIN_SEED)));
    let card = MemberCard::new(evil, bob.card().binding().clone()).unwrap();
    Hole1 {
        ana,
        bob_card_as_admin_shows_it: card,
    }
}

#[test]
fn rogue_admin_credential_with_foreign_seal_key_is_refused_by_its_owner() {
    let admin = SubnetAdmin::from_secret([0xa1; 32]);
    let pol = policy(&admin, &[]);
    for (what, addr) in [
        ("seal key", own(ADMIN_SEED)),
        (
            "mailbox",
            Contact {
                mailbox: [ADMIN_SEED; 32],
                ..own(BOB)
            },
        ),
        (
            "gateway",
            Contact {
                gateway: [ADMIN_SEED; 32],
                ..own(BOB)
            },
        ),
    ] {
        let cred = credential(&admin, "bob", BOB, Some(addr));
        let err = Messenger::new(
            [BOB; 32],
            own(BOB),
            cred.signed(),
            pol.clone(),
            config(false),
            NOW,
        )
        .unwrap_err();
        assert!(
            matches!(&err, MessengerError::Group(GroupError::NotOwnAddress { field }) if *field == what),
            "{err}"
        );
    }
    // A credential stating no addresses is fine: the member binds its own.
    let cred = credential(&admin, "bob", BOB, None);
    let bob = Messenger::new([BOB; 32], own(BOB), cred.signed(), pol, config(false), NOW).unwrap();
    assert_eq!(bob.card().binding().body().seal_key.0, own(BOB).public_key);
}

#[test]
fn rogue_admin_cannot_bind_addresses_for_a_members_key() {
    let admin = SubnetAdmin::from_secret([0xa1; 32]);
    let evil = credential(&admin, "bob", BOB, None);
    // A binding the admin signs with its own key does not pair with bob's credential...
    let admin_key = ed25519_dalek::SigningKey::from_bytes(&[0xa1; 32]);
    let forged = AddressBinding::sign(
        &admin_key,
        BindingBody {
            subnet: admin.subnet(),
            identity_key: Hex32(evil.signing_key()),
            seal_key: Hex32(own(ADMIN_SEED).public_key),
            mailbox: Hex32([ADMIN_SEED; 32]),
            gateway: Hex32([9; 32]),
            sequence: NOW + 1,
        },
    )
    .unwrap();
    assert!(MemberCard::new(evil, forged.clone()).is_err());
    // ...and one claiming bob's key but signed by the admin fails its signature.
    let mut bytes = forged.to_bytes();
    let text = String::from_utf8(bytes.clone()).unwrap();
    let admin_pub = hex::encode(admin_key.verifying_key().to_bytes());
    let bob_pub = hex::encode(
        ed25519_dalek::SigningKey::from_bytes(&[BOB; 32])
            .verifying_key()
            .to_bytes(),
    );
    if text.contains(&admin_pub) {
        bytes = text.replace(&admin_pub, &bob_pub).into_bytes();
    }
    assert!(AddressBinding::verify(&bytes).is_err());
}

/// Hole 1, the read: ana's direct message to "bob" is sealed to bob's own key, never
/// to the admin's, even when bob's card carries the admin's credential fields.
#[test]
fn rogue_admin_cannot_read_direct_messages() {
    let Hole1 {
        mut ana,
        bob_card_as_admin_shows_it: card,
    } = hole1(false);
    ana.send_direct(&card, OPTS, b"secret", NOW).unwrap();
    let out = ana.poll_outgoing().unwrap();
    assert_eq!(out.to, own(BOB), "sealed to bob's own binding");
    assert_eq!(
        who_opens(&out, &[("admin", ADMIN_SEED), ("bob", BOB)]),
        ["bob"]
    );
}

/// The same attack with the old rule (seal to the credential's fields) switched back
/// on: the admin opens the message. Shows the test above has power.
#[test]
fn rogue_admin_reads_direct_messages_under_the_old_rule() {
    let Hole1 {
        mut ana,
        bob_card_as_admin_shows_it: card,
    } = hole1(true);
    ana.send_direct(&card, OPTS, b"secret", NOW).unwrap();
    let out = ana.poll_outgoing().unwrap();
    assert_eq!(out.to.mailbox, [ADMIN_SEED; 32]);
    assert_eq!(
        who_opens(&out, &[("admin", ADMIN_SEED), ("bob", BOB)]),
        ["admin"]
    );
}

/// Hole 1 for groups: group traffic to bob goes to bob's binding too.
#[test]
fn rogue_admin_cannot_read_group_messages() {
    let admin = SubnetAdmin::from_secret([0xa1; 32]);
    let pol = policy(&admin, &[]);
    let mut ana = member(&admin, &pol, "ana", 1);
    let mut bob = member(&admin, &pol, "bob", BOB);
    let g = ana.create_group(NOW).unwrap();
    let inv = bob.invite().unwrap();
    ana.add_members(&g, &[inv], NOW).unwrap();
    deliver(&mut ana, &mut bob, NOW);
    ana.handle_timeout(NOW + 1000);
    deliver(&mut ana, &mut bob, NOW + 1000);
    assert_eq!(bob.groups().len(), 1);
    ana.send_group(&g, OPTS, b"to the group", NOW + 2000)
        .unwrap();
    let outs = deliver(&mut ana, &mut bob, NOW + 2000);
    assert!(!outs.is_empty());
    for out in &outs {
        assert_eq!(out.to, own(BOB));
        assert_eq!(
            who_opens(out, &[("admin", ADMIN_SEED), ("bob", BOB)]),
            ["bob"]
        );
    }
}

/// Hole 2: the admin re-mints "bob" with its own key. ana, who talks to the real bob,
/// sees a key-change alert; the impostor's message is kept apart, flagged; a
/// federated "bob" of another subnet is another conversation with another name.
#[test]
fn rogue_admin_reminted_handle_is_a_different_contact_with_an_alert() {
    let admin = SubnetAdmin::from_secret([0xa1; 32]);
    let other = SubnetAdmin::from_secret([0xb2; 32]);
    let pol = policy(&admin, &[other.subnet()]);
    let pol_b = policy(&other, &[admin.subnet()]);
    let mut ana = member(&admin, &pol, "ana", 1);
    let mut bob = member(&admin, &pol, "bob", BOB);
    let mut fake = member(&admin, &pol, "bob", ADMIN_SEED);
    let mut fed = member(&other, &pol_b, "bob", 0xdd);
    let to_ana = ana.card().clone();
    for (m, body) in [
        (&mut bob, &b"real"[..]),
        (&mut fake, b"fake"),
        (&mut fed, b"federated"),
    ] {
        m.send_direct(&to_ana, OPTS, body, NOW).unwrap();
        deliver(m, &mut ana, NOW);
    }
    let evs = events(&mut ana);
    let changes: Vec<_> = evs
        .iter()
        .filter_map(|e| match e {
            MessengerEvent::KeyChanged {
                handle,
                old_key,
                new_key,
                ..
            } => Some((handle, *old_key, *new_key)),
            _ => None,
        })
        .collect();
    assert_eq!(
        changes,
        [(&"bob".to_string(), key_of(&bob).1, key_of(&fake).1)],
        "one alert: the second key in ana's own subnet"
    );
    let alerts: Vec<(bool, &[u8])> = ana
        .peek()
        .iter()
        .map(|m| (m.key_alert, m.body.as_slice()))
        .collect();
    assert_eq!(
        alerts,
        [
            (false, &b"real"[..]),
            (true, b"fake"),
            (false, b"federated")
        ]
    );
    // Three conversations, one per (subnet, key): nothing merged by handle.
    for (m, body) in [(&bob, &b"real"[..]), (&fake, b"fake"), (&fed, b"federated")] {
        let (s, k) = key_of(m);
        let got = ana.read_conversation(Conversation::Direct(s, k), NOW);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].body, body);
    }
    // Names carry the subnet; the safety numbers tell the two "bob@A" apart.
    let names: Vec<String> = ana.contacts().iter().map(PinnedContact::display).collect();
    assert_ne!(names[0], names[2], "{names:?}");
    assert_ne!(
        ana.safety_number_with(&key_of(&bob).1),
        ana.safety_number_with(&key_of(&fake).1)
    );
    // "bob" is ambiguous until ana confirms one; then it means that one.
    assert!(matches!(
        ana.find_contact("bob"),
        Err(MessengerError::Ambiguous(_))
    ));
    let (s, k) = key_of(&bob);
    assert!(ana.confirm_contact(&s, &k));
    assert_eq!(ana.find_contact("bob").unwrap().identity_key, k);
    let fed_name = format!("bob@{}", &hex::encode(other.subnet().0)[..4]);
    assert_eq!(
        ana.find_contact(&fed_name).unwrap().identity_key,
        key_of(&fed).1
    );
}

/// Issue 18 #3 against hole 2: ana answers the people who wrote to her without
/// pasting their cards (the card that came with the message is pinned on first use),
/// but an answer to the admin's re-minted "bob" is refused until ana accepts that key;
/// the real bob's answer is sealed to bob. With the naive rule (answer whichever card
/// came with the message) the admin reads ana's answer.
#[test]
fn rogue_reminted_handle_gets_no_reply_until_accepted() {
    let admin = SubnetAdmin::from_secret([0xa1; 32]);
    let pol = policy(&admin, &[]);
    let mut ana = member(&admin, &pol, "ana", 1);
    let mut bob = member(&admin, &pol, "bob", BOB);
    let mut fake = member(&admin, &pol, "bob", ADMIN_SEED);
    let to_ana = ana.card().clone();
    bob.send_direct(&to_ana, OPTS, b"real", NOW).unwrap();
    deliver(&mut bob, &mut ana, NOW);
    fake.send_direct(&to_ana, OPTS, b"it's me, new phone", NOW)
        .unwrap();
    deliver(&mut fake, &mut ana, NOW);
    let secrets = [("bob", BOB), ("admin", ADMIN_SEED)];

    // The real bob (first seen, not yet verified): the answer goes to him.
    let (s, k) = key_of(&bob);
    let card = ana.reply_card(&s, &k).unwrap();
    ana.send_direct(&card, OPTS, b"hi bob", NOW).unwrap();
    let out = ana.poll_outgoing().unwrap();
    assert_eq!(who_opens(&out, &secrets), ["bob"]);

    // The re-minted key: refused until accepted.
    let (fs, fk) = key_of(&fake);
    assert!(matches!(
        ana.reply_card(&fs, &fk),
        Err(MessengerError::NotConfirmed(_))
    ));
    // The naive rule, the card that came with the message, hands the admin the answer.
    let naive = MemberCard::parse(&ana.contact(&fs, &fk).unwrap().card).unwrap();
    ana.send_direct(&naive, OPTS, b"hi bob", NOW).unwrap();
    let out = ana.poll_outgoing().unwrap();
    assert_eq!(who_opens(&out, &secrets), ["admin"], "the attack has power");
    // Once ana accepts it (after comparing safety numbers), she may answer it.
    assert!(ana.confirm_contact(&fs, &fk));
    assert!(ana.reply_card(&fs, &fk).is_ok());
}

/// Hole 2 in groups: the DM carries no weight for a group, but a group that gains a
/// leaf with a handle already present — from any subnet — reports it.
#[test]
fn rogue_lookalike_in_a_group_is_reported_across_subnets() {
    let admin = SubnetAdmin::from_secret([0xa1; 32]);
    let other = SubnetAdmin::from_secret([0xb2; 32]);
    let pol = policy(&admin, &[other.subnet()]);
    let pol_b = policy(&other, &[admin.subnet()]);
    let mut ana = member(&admin, &pol, "ana", 1);
    let mut bob = member(&admin, &pol, "bob", BOB);
    let mut fed = member(&other, &pol_b, "bob", 0xdd);
    let g = ana.create_group(NOW).unwrap();
    let inv = bob.invite().unwrap();
    ana.add_members(&g, &[inv], NOW).unwrap();
    ana.handle_timeout(NOW + 1000);
    let inv = fed.invite().unwrap();
    ana.add_members(&g, &[inv], NOW + 1000).unwrap();
    ana.handle_timeout(NOW + 2000);
    let evs = events(&mut ana);
    assert!(
        evs.iter().any(
            |e| matches!(e, MessengerEvent::Group(GroupEvent::DuplicateHandle { existing, new, .. })
            if existing.credential.subnet() != new.credential.subnet())
        ),
        "{evs:?}"
    );
    let _ = (&mut bob, &mut fed);
}

/// Hole 3: a look-alike's network invite is never what `/invite bob` uses: invites are
/// chosen by the confirmed key, and an unconfirmed key's invite needs confirmation.
#[test]
fn rogue_lookalike_network_invite_is_not_chosen() {
    let admin = SubnetAdmin::from_secret([0xa1; 32]);
    let pol = policy(&admin, &[]);
    let mut ana = member(&admin, &pol, "ana", 1);
    let mut bob = member(&admin, &pol, "bob", BOB);
    let mut fake = member(&admin, &pol, "bob", ADMIN_SEED);
    // ana pastes bob's card: a confirmed pin.
    let pasted = bob.invite().unwrap();
    let bob_card = MemberCard::parse(&pasted.card).unwrap();
    ana.confirm_card(&bob_card, NOW);
    // The admin's "bob" sends its invite over the network.
    let to_ana = ana.card().clone();
    fake.send_invite(&to_ana, NOW).unwrap();
    deliver(&mut fake, &mut ana, NOW);
    let evs = events(&mut ana);
    assert!(
        evs.iter().any(|e| matches!(
            e,
            MessengerEvent::InviteReceived {
                confirmed: false,
                ..
            }
        )),
        "{evs:?}"
    );
    assert!(
        evs.iter()
            .any(|e| matches!(e, MessengerEvent::KeyChanged { .. })),
        "{evs:?}"
    );
    // "bob" means the confirmed key; the look-alike's invite is not offered for it,
    // nor for its own key until ana confirms that.
    let chosen = ana.find_contact("bob").unwrap().clone();
    assert_eq!(chosen.identity_key.0, bob_card.identity_key());
    assert!(
        ana.invite_from(&chosen.subnet, &chosen.identity_key)
            .is_none(),
        "bob sent none"
    );
    let (fs, fk) = key_of(&fake);
    assert!(ana.invite_from(&fs, &fk).is_none(), "unconfirmed key");
    // An invite whose card is bob's but whose key package is the look-alike's is refused.
    let fake_inv = ana.received_invites()[0].invite();
    let g = ana.create_group(NOW).unwrap();
    let mixed = Invite {
        card: pasted.card.clone(),
        key_package: fake_inv.key_package.clone(),
    };
    assert!(matches!(
        ana.add_members(&g, &[mixed], NOW),
        Err(MessengerError::InviteMismatch)
    ));
    // Bob's own network invite is taken, by his key.
    bob.send_invite(&to_ana, NOW).unwrap();
    deliver(&mut bob, &mut ana, NOW);
    assert!(
        ana.invite_from(&chosen.subnet, &chosen.identity_key)
            .is_some()
    );
}

/// Hole 9: a gateway that keeps a copy of a delivered direct message and replays it
/// later (after a read burnt it, after a restart) gets nothing shown twice.
#[test]
fn rogue_gateway_replayed_direct_message_is_dropped_forever() {
    let admin = SubnetAdmin::from_secret([0xa1; 32]);
    let pol = policy(&admin, &[]);
    let mut ana = member(&admin, &pol, "ana", 1);
    let mut bob = member(&admin, &pol, "bob", BOB);
    let burn = MessageOptions {
        ttl_secs: 3600,
        burn_on_read: true,
    };
    let to_ana = ana.card().clone();
    bob.send_direct(&to_ana, burn, b"burn after reading", NOW)
        .unwrap();
    let copy = deliver(&mut bob, &mut ana, NOW).remove(0).bytes;
    assert_eq!(ana.read(NOW + 1).len(), 1);
    assert!(ana.peek().is_empty(), "burnt");
    ana.handle_incoming(&copy, NOW + 2);
    assert!(ana.peek().is_empty(), "replay dropped");
    // After a restart from the stored state, and days later, still dropped.
    let snap = ana.snapshot().unwrap();
    let mut ana = Messenger::restore(&snap, NOW + 3).unwrap();
    ana.handle_incoming(&copy, NOW + 5 * 24 * 3600 * 1000);
    assert!(ana.peek().is_empty());
    // Past the replay window, a message is too old to judge and is dropped as well.
    ana.handle_incoming(&copy, NOW + REPLAY_WINDOW_MS + 1);
    assert!(ana.peek().is_empty());
    assert_eq!(ana.stats().replays_dropped, 3);
    // A fresh message from bob still arrives.
    bob.send_direct(&to_ana, burn, b"new", NOW + 10).unwrap();
    deliver(&mut bob, &mut ana, NOW + 10);
    assert_eq!(ana.peek().len(), 1);
}

/// The safety number is the same on both sides, 60 digits, and differs per key pair.
#[test]
fn safety_numbers_match_on_both_sides() {
    let a = [1u8; 32];
    let b = [2u8; 32];
    let n = safety_number(&a, &b);
    assert_eq!(n, safety_number(&b, &a));
    assert_eq!(n.chars().filter(char::is_ascii_digit).count(), 60);
    assert_eq!(n.split(' ').count(), 12);
    assert_ne!(n, safety_number(&a, &[3u8; 32]));
}

/// Hole 12: handles and bodies from the network cannot drive the terminal.
#[test]
fn rogue_terminal_escapes_are_neutralised() {
    assert_eq!(
        terminal_safe("bob\x1b[2J\x07\n\u{202e}evil"),
        "bob [2J   evil"
    );
    let s = SubnetId::from([0xab; 32]);
    assert_eq!(display_name("b\x1bob", &s), "b ob@abababab");
}

/// Policy version `version` of `admin`'s subnet: `fed` federated, `revoked` keys
/// revoked.
fn policy_version(
    admin: &SubnetAdmin,
    version: u64,
    fed: &[SubnetId],
    revoked: &[[u8; 32]],
) -> Policy {
    let mut body = policy(admin, fed).body().clone();
    body.version = version;
    body.revoked_keys = revoked.iter().map(|k| Hex32(*k)).collect();
    let signed = admin.issue_policy(body).unwrap();
    Policy::verify(&signed.to_bytes(), &admin.subnet()).unwrap()
}

/// What a gateway (or anyone who knows a member's card) hands the member's messenger.
fn policy_bytes(p: &Policy) -> Vec<u8> {
    policy_update(p.signed())
}

/// A policy "of" `subnet` signed by `key`, with `edit` applied to its body: the signed
/// text is rebuilt and signed, as a forger with its own key would.
fn forged_policy(key: &ed25519_dalek::SigningKey, body: &PolicyBody) -> Vec<u8> {
    use ed25519_dalek::Signer;
    let text = serde_json::to_string(body).unwrap();
    let mut signed = b"shoal subnet policy v1\0".to_vec();
    signed.extend_from_slice(text.as_bytes());
    let sig = key.sign(&signed);
    let envelope = serde_json::json!({
        "body": text,
        "signature": hex::encode(sig.to_bytes()),
    });
    policy_update_raw(serde_json::to_vec(&envelope).unwrap())
}

fn policy_update_raw(policy: Vec<u8>) -> Vec<u8> {
    Envelope::Policy(policy).encode()
}

/// Hole 4, the path: the admin's records (credentials) give one update per member the
/// new version does not revoke, sealed to that member alone; each member's messenger
/// applies it, and the revoked member is removed from the group at the next commit.
#[test]
fn rogue_policy_reaches_members_through_ordinary_messages() {
    let admin = SubnetAdmin::from_secret([0xa1; 32]);
    let v1 = policy(&admin, &[]);
    let mut ms = [
        member(&admin, &v1, "ana", 1),
        member(&admin, &v1, "bob", BOB),
        member(&admin, &v1, "cy", 3),
    ];
    let g = ms[0].create_group(NOW).unwrap();
    let invites: Vec<_> = [1, 2].iter().map(|&i| ms[i].invite().unwrap()).collect();
    ms[0].add_members(&g, &invites, NOW).unwrap();
    let mut t = NOW;
    for _ in 0..4 {
        let outs: Vec<Outgoing> = std::iter::from_fn(|| ms[0].poll_outgoing()).collect();
        for o in outs {
            for m in ms.iter_mut().skip(1) {
                if o.to == crate::group::contact_of(m.card()) {
                    m.handle_incoming(&o.bytes, t);
                }
            }
        }
        t += 1000;
        for m in ms.iter_mut() {
            m.handle_timeout(t);
        }
    }
    assert!(ms.iter().all(|m| m.groups().len() == 1), "group formed");
    // The admin de-provisions cy: v2 revokes cy's key; its records name where each is.
    let records: Vec<MemberCredential> = [("ana", 1), ("bob", BOB), ("cy", 3), ("dee", 4)]
        .iter()
        .map(|&(h, s)| {
            let addr = if h == "dee" { None } else { Some(own(s)) };
            credential(&admin, h, s, addr)
        })
        .collect();
    let cy_key = records[2].signing_key();
    let v2 = policy_version(&admin, 2, &[], &[cy_key]);
    let (outs, unreachable) = policy_deliveries(&v2, records.iter());
    assert_eq!(unreachable, ["dee"], "no seal key in dee's credential");
    let to: Vec<Contact> = outs.iter().map(|o| o.to).collect();
    assert_eq!(to, [own(1), own(BOB)], "not to cy, whom it revokes");
    for (o, (name, seed)) in outs.iter().zip([("ana", 1), ("bob", BOB)]) {
        assert_eq!(o.what, OutgoingWhat::Policy);
        assert!(
            o.bytes.len() < INNER_BODY_SIZE * 4,
            "a few fixed-size packets"
        );
        assert_eq!(who_opens(o, &[("ana", 1), ("bob", BOB), ("cy", 3)]), [name]);
        let i = usize::from(seed != 1);
        ms[i].handle_incoming(&o.bytes, t);
        assert!(events(&mut ms[i]).contains(&MessengerEvent::PolicyUpdated { version: 2 }));
    }
    // Each remaining member commits the removal; whichever commit wins, cy is out.
    for _ in 0..4 {
        for i in 0..2 {
            let outs: Vec<Outgoing> = std::iter::from_fn(|| ms[i].poll_outgoing()).collect();
            for o in outs {
                for m in ms.iter_mut() {
                    if o.to == crate::group::contact_of(m.card()) {
                        m.handle_incoming(&o.bytes, t);
                    }
                }
            }
        }
        t += 1000;
        for m in ms.iter_mut() {
            m.handle_timeout(t);
        }
    }
    for (i, m) in ms.iter().take(2).enumerate() {
        let members = &m.groups()[0].members;
        assert_eq!(members.len(), 2, "member {i}: {members:?}");
        assert!(!members.iter().any(|(h, _)| h == "cy"));
    }
    ms[1].send_group(&g, OPTS, b"cy is gone", t).unwrap();
    let outs: Vec<Outgoing> = std::iter::from_fn(|| ms[1].poll_outgoing()).collect();
    assert!(!outs.is_empty());
    assert!(
        outs.iter().all(|o| o.to == own(1)),
        "group messages go to ana alone"
    );
}

/// Hole 4, forgery: a gateway or a stranger makes a policy "of" subnet A that
/// federates A with the stranger's subnet (so the stranger could message A's members)
/// and drops a revocation. Signed by another key, edited after A's admin signed it, or
/// the stranger's own genuine policy: each is refused, and the stranger's message is
/// still dropped.
#[test]
fn rogue_forged_policy_is_refused() {
    let admin = SubnetAdmin::from_secret([0xa1; 32]);
    let mallory_admin = SubnetAdmin::from_secret([0x66; 32]);
    let v1 = policy(&admin, &[]);
    let mut ana = member(&admin, &v1, "ana", 1);
    let mpol = policy(&mallory_admin, &[admin.subnet()]);
    let mut mallory = member(&mallory_admin, &mpol, "mallory", 6);
    let mut wanted = policy_version(&admin, 2, &[mallory_admin.subnet()], &[])
        .body()
        .clone();
    wanted.version = 99;
    let stranger = ed25519_dalek::SigningKey::from_bytes(&[0x66; 32]);
    let by_stranger = forged_policy(&stranger, &wanted);
    // A's genuine v2 (federating nobody), its body edited to federate mallory.
    let genuine = policy_version(&admin, 2, &[], &[]);
    let text = String::from_utf8(genuine.signed().to_bytes()).unwrap();
    let edited = text.replace(
        "\\\"federation\\\":[]",
        &format!(
            "\\\"federation\\\":[{{\\\"subnet\\\":\\\"{}\\\",\\\"local_roles\\\":[\\\"staff\\\"],\\\"remote_roles\\\":[\\\"staff\\\"]}}]",
            hex::encode(mallory_admin.subnet().0)
        ),
    );
    assert_ne!(edited, text, "the edit applies");
    let edited = policy_update_raw(edited.into_bytes());
    let foreign = policy_bytes(&policy_version(&mallory_admin, 50, &[admin.subnet()], &[]));
    for (what, bytes) in [
        ("signed by a stranger", by_stranger),
        ("edited after signing", edited),
        ("another subnet's", foreign),
    ] {
        let before = ana.stats().policies_rejected;
        ana.handle_incoming(&bytes, NOW);
        assert_eq!(ana.stats().policies_rejected, before + 1, "{what}");
        assert_eq!(ana.policy().version(), 1, "{what}");
        assert!(
            !events(&mut ana)
                .iter()
                .any(|e| matches!(e, MessengerEvent::PolicyUpdated { .. })),
            "{what}"
        );
    }
    let to_ana = ana.card().clone();
    mallory
        .send_direct(&to_ana, OPTS, b"let me in", NOW)
        .unwrap();
    deliver(&mut mallory, &mut ana, NOW);
    assert!(ana.peek().is_empty(), "still not federated");
    assert_eq!(ana.stats().direct_policy_drops, 1);
}

/// Hole 4, rollback: a gateway that kept policy v1 (before cy was revoked) replays it,
/// before and after a restart, and delivers v2 after v3: members never go back, and
/// cy's messages stay dropped.
#[test]
fn rogue_replayed_old_policy_cannot_undo_a_revocation() {
    let admin = SubnetAdmin::from_secret([0xa1; 32]);
    let v1 = policy(&admin, &[]);
    let mut ana = member(&admin, &v1, "ana", 1);
    let mut cy = member(&admin, &v1, "cy", 3);
    let cy_key = cy.card().identity_key();
    let v2 = policy_version(&admin, 2, &[], &[cy_key]);
    let v3 = policy_version(&admin, 3, &[SubnetId::from([0x33; 32])], &[cy_key]);
    ana.handle_incoming(&policy_bytes(&v3), NOW);
    assert_eq!(ana.policy().version(), 3);
    for old in [&v2, &v1] {
        ana.handle_incoming(&policy_bytes(old), NOW + 1);
        assert_eq!(ana.policy().version(), 3);
    }
    let snap = ana.snapshot().unwrap();
    let mut ana = Messenger::restore(&snap, NOW + 2).unwrap();
    assert_eq!(
        ana.policy().version(),
        3,
        "the applied version survives a restart"
    );
    ana.handle_incoming(&policy_bytes(&v1), NOW + 3);
    assert_eq!(ana.policy().version(), 3);
    assert_eq!(ana.stats().policies_rejected, 3);
    let to_ana = ana.card().clone();
    cy.dangerously_send_direct_ignoring_policy(&to_ana, OPTS, b"am I back?", NOW + 4);
    deliver(&mut cy, &mut ana, NOW + 4);
    assert!(ana.peek().is_empty(), "cy stays revoked");
}

/// New federation takes effect at members once their admins' updates arrive: before,
/// ana's client refuses to send to cy's subnet and drops cy's messages; after, both
/// directions work.
#[test]
fn federation_update_takes_effect_at_members() {
    let a = SubnetAdmin::from_secret([0xa1; 32]);
    let c = SubnetAdmin::from_secret([0xc3; 32]);
    let mut ana = member(&a, &policy(&a, &[]), "ana", 1);
    let mut cy = member(&c, &policy(&c, &[]), "cy", 3);
    let (to_ana, to_cy) = (ana.card().clone(), cy.card().clone());
    assert!(matches!(
        ana.send_direct(&to_cy, OPTS, b"hi", NOW),
        Err(MessengerError::Refused { .. })
    ));
    cy.dangerously_send_direct_ignoring_policy(&to_ana, OPTS, b"early", NOW);
    deliver(&mut cy, &mut ana, NOW);
    assert!(ana.peek().is_empty());
    let a2 = policy_version(&a, 2, &[c.subnet()], &[]);
    let c2 = policy_version(&c, 2, &[a.subnet()], &[]);
    let ana_rec = credential(&a, "ana", 1, Some(own(1)));
    let cy_rec = credential(&c, "cy", 3, Some(own(3)));
    for o in policy_deliveries(&a2, [&ana_rec]).0 {
        ana.handle_incoming(&o.bytes, NOW + 1);
    }
    for o in policy_deliveries(&c2, [&cy_rec]).0 {
        cy.handle_incoming(&o.bytes, NOW + 1);
    }
    ana.send_direct(&to_cy, OPTS, b"hello C", NOW + 2).unwrap();
    deliver(&mut ana, &mut cy, NOW + 2);
    cy.send_direct(&to_ana, OPTS, b"hello A", NOW + 3).unwrap();
    deliver(&mut cy, &mut ana, NOW + 3);
    assert_eq!(cy.peek()[0].body, b"hello C");
    assert_eq!(ana.peek()[0].body, b"hello A");
}

// Hole 10: the order of concurrent commits. The attacker is a member; it sees the other
// members' commits for the epoch (they are sent to it too) and makes as many candidate
// commits of its own as it likes before sending one.

const SETTLE_MS: u64 = 1000;
/// Candidate commits the grinder makes per epoch: under "lowest hash wins" it beats a
/// given commit with probability GRIND / (GRIND + 1).
const GRIND: usize = 64;

fn group_member(admin: &SubnetAdmin, pol: &Policy, handle: &str, seed: u8) -> GroupManager {
    let cred = credential(admin, handle, seed, Some(own(seed)));
    GroupManager::new(
        [seed; 32],
        own(seed),
        cred.signed(),
        pol.clone(),
        GroupConfig {
            commit_settle_ms: SETTLE_MS,
        },
        NOW,
    )
    .unwrap()
}

/// Delivers what `ms[from]` has queued to every member it names.
fn pump_group(from: usize, ms: &mut [GroupManager], now: u64) {
    while let Some(out) = ms[from].poll_outgoing() {
        for r in &out.recipients {
            if let Some(m) = ms
                .iter_mut()
                .find(|m| m.credential().signing_key() == r.identity_key())
            {
                let _ = m.handle_message(&out.bytes, now);
            }
        }
    }
}

/// `ms[0]` creates a group and adds the others in one commit.
fn form_group(ms: &mut [GroupManager], now: u64) -> Vec<u8> {
    let g = ms[0].create_group(now).unwrap();
    let kps: Vec<Vec<u8>> = ms[1..]
        .iter_mut()
        .map(|m| m.key_package().unwrap())
        .collect();
    let refs: Vec<&[u8]> = kps.iter().map(Vec::as_slice).collect();
    ms[0].add_members(&g, &refs, now).unwrap();
    pump_group(0, ms, now);
    ms[0].handle_timeout(now + SETTLE_MS);
    pump_group(0, ms, now + SETTLE_MS);
    for m in ms.iter_mut() {
        while m.poll_event().is_some() {}
    }
    g
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    use sha2_0_11::Digest;
    sha2_0_11::Sha256::digest(bytes).into()
}

/// The grinder's best effort against "lowest hash wins": candidates from `make` until
/// one hashes below `target`, at most GRIND of them. The last candidate stays held
/// (and is returned to be sent) if none did.
fn grind(
    m: &mut GroupManager,
    g: &[u8],
    target: [u8; 32],
    make: &dyn Fn(&mut GroupManager) -> Result<(), GroupError>,
) -> GroupOutgoing {
    for i in 0..GRIND {
        make(m).unwrap();
        let out = std::iter::from_fn(|| m.poll_outgoing())
            .find(|o| o.kind == OutgoingKind::Commit)
            .unwrap();
        if sha256(&out.bytes) < target || i + 1 == GRIND {
            return out;
        }
        m.dangerously_withdraw_own_commit(g);
    }
    unreachable!("GRIND > 0")
}

#[derive(Debug, Clone, Copy)]
enum Counter {
    /// Any commit of its own (an update), ground to win.
    SelfUpdate,
    /// Removing the member who removes it, ground to win.
    RemoveRemover,
}

/// Hole 10, own removal: the admin de-provisions mal; ana (holding the new policy)
/// commits mal's removal; mal sees it and grinds a counter-commit. Passes only if mal
/// is out at every other member, who agree on the group, and mal learns it was removed.
#[test]
fn rogue_member_cannot_grind_past_its_own_removal() {
    for counter in [Counter::SelfUpdate, Counter::RemoveRemover] {
        let admin = SubnetAdmin::from_secret([0xa1; 32]);
        let v1 = policy(&admin, &[]);
        let mut ms = [
            group_member(&admin, &v1, "ana", 1),
            group_member(&admin, &v1, "vic", 2),
            group_member(&admin, &v1, "mal", 3),
        ];
        let g = form_group(&mut ms, NOW);
        let (ana_key, mal_key) = (
            ms[0].credential().signing_key(),
            ms[2].credential().signing_key(),
        );
        let v2 = policy_version(&admin, 2, &[], &[mal_key]);
        ms[0].update_policy(v2.clone()).unwrap();
        ms[1].update_policy(v2).unwrap();
        let t = NOW + 10 * SETTLE_MS;
        assert!(ms[0].remove_refused(&g, t).unwrap());
        let removal = ms[0].poll_outgoing().unwrap();
        assert_eq!(removal.kind, OutgoingKind::Commit);
        for m in &mut ms[1..] {
            m.handle_message(&removal.bytes, t).unwrap();
        }
        let target = sha256(&removal.bytes);
        let make: &dyn Fn(&mut GroupManager) -> Result<(), GroupError> = match counter {
            Counter::SelfUpdate => &|m| m.self_update(&g, t),
            Counter::RemoveRemover => &|m| m.remove_key(&g, &ana_key, t),
        };
        let counter_commit = grind(&mut ms[2], &g, target, make);
        for m in &mut ms[..2] {
            let _ = m.handle_message(&counter_commit.bytes, t + 1);
        }
        for m in ms.iter_mut() {
            m.handle_timeout(t + SETTLE_MS + 1);
        }
        for (i, m) in ms[..2].iter().enumerate() {
            let handles: Vec<String> = m
                .members(&g)
                .iter()
                .map(|m| m.credential.handle().to_string())
                .collect();
            assert_eq!(
                handles,
                ["ana", "vic"],
                "{counter:?}: member {i} after the race (mal ground {GRIND} candidates)"
            );
        }
        assert_eq!(ms[0].epoch_authenticator(&g), ms[1].epoch_authenticator(&g));
        let mal_events: Vec<GroupEvent> = std::iter::from_fn(|| ms[2].poll_event()).collect();
        assert!(
            mal_events.contains(&GroupEvent::Removed { group: g.clone() }),
            "{counter:?}: mal was not removed: {mal_events:?}"
        );
    }
}

/// Hole 10, censorship: each epoch vic commits (an update), and mal, having seen vic's
/// commit, grinds one of its own against it. Each epoch's winner must be the one the
/// order fixed before the epoch names (vic whenever vic's leaf ranks before mal's),
/// whatever mal ground, and so vic gets through within a few epochs. Under "lowest
/// hash wins" mal wins each epoch with probability GRIND / (GRIND + 1).
#[test]
fn rogue_member_cannot_grind_to_censor_another() {
    let admin = SubnetAdmin::from_secret([0xa1; 32]);
    let v1 = policy(&admin, &[]);
    let mut ms = [
        group_member(&admin, &v1, "ana", 1),
        group_member(&admin, &v1, "vic", 2),
        group_member(&admin, &v1, "mal", 3),
    ];
    let g = form_group(&mut ms, NOW);
    let leaf = |m: &GroupManager| {
        m.members(&g)
            .iter()
            .find(|x| x.credential.signing_key() == m.credential().signing_key())
            .unwrap()
            .leaf
    };
    let (vic_leaf, mal_leaf) = (leaf(&ms[1]), leaf(&ms[2]));
    let mut t = NOW + 10 * SETTLE_MS;
    // Vic's leaf ranks first in about half the epochs; 40 epochs without one happen
    // with probability 2^-40.
    let mut vic_landed = None;
    for round in 0..40 {
        let epoch = ms[0].epoch(&g).unwrap();
        ms[1].self_update(&g, t).unwrap();
        let vic_commit = ms[1].poll_outgoing().unwrap();
        for i in [0, 2] {
            ms[i].handle_message(&vic_commit.bytes, t).unwrap();
        }
        let mal_commit = grind(&mut ms[2], &g, sha256(&vic_commit.bytes), &|m| {
            m.self_update(&g, t)
        });
        for i in [0, 1] {
            ms[i].handle_message(&mal_commit.bytes, t + 1).unwrap();
        }
        for m in ms.iter_mut() {
            m.handle_timeout(t + SETTLE_MS + 1);
        }
        let vic_lost = std::iter::from_fn(|| ms[1].poll_event())
            .any(|e| matches!(e, GroupEvent::OwnCommitLost { .. }));
        let vic_first = commit_rank(&g, epoch, vic_leaf) < commit_rank(&g, epoch, mal_leaf);
        assert_eq!(
            !vic_lost, vic_first,
            "round {round}: the winner is not the one the order names"
        );
        for m in &ms {
            assert_eq!(m.epoch(&g), Some(epoch + 1));
            assert_eq!(m.epoch_authenticator(&g), ms[0].epoch_authenticator(&g));
        }
        for m in ms.iter_mut() {
            while m.poll_event().is_some() {}
        }
        t += 2 * SETTLE_MS;
        if !vic_lost {
            vic_landed = Some(round);
            break;
        }
    }
    assert!(vic_landed.is_some(), "mal censored vic for 40 epochs");
}

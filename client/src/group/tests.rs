use super::*;
use shoal_subnet::{
    BurnOnRead, CredentialBody, Federation, PolicyBody, RoleRule, SubnetAdmin, SubnetId,
};
use shoal_topology::Hex32;

const NOW: u64 = 1_500_000; // ms
const SETTLE: u64 = 1_000;
const OPTS: MessageOptions = MessageOptions {
    ttl_secs: 3600,
    burn_on_read: false,
};

fn policy(admin: &SubnetAdmin, federated: &[SubnetId]) -> Policy {
    let body = PolicyBody {
        subnet: admin.subnet(),
        version: 1,
        issued_at: 1000,
        roles: vec!["staff".into(), "guest".into()],
        rules: vec![RoleRule {
            from: "staff".into(),
            to: "staff".into(),
        }],
        federation: federated
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
    Policy::verify(
        &admin.issue_policy(body).unwrap().to_bytes(),
        &admin.subnet(),
    )
    .unwrap()
}

fn credential(admin: &SubnetAdmin, handle: &str, role: &str, seed: [u8; 32]) -> SignedCredential {
    let key = ed25519_dalek::SigningKey::from_bytes(&seed);
    admin
        .issue_credential(CredentialBody {
            subnet: admin.subnet(),
            handle: handle.into(),
            role: role.into(),
            signing_key: Hex32(key.verifying_key().to_bytes()),
            seal_key: Hex32(
                x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from(seed)).to_bytes(),
            ),
            mailbox: Hex32(seed),
            gateway: Hex32([9; 32]),
            not_before: 1000,
            not_after: 100_000,
        })
        .unwrap()
}

/// The address a member with `seed` signs into its binding (what `credential` records).
fn own(seed: [u8; 32]) -> Contact {
    Contact {
        mailbox: seed,
        gateway: [9; 32],
        public_key: x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from(seed))
            .to_bytes(),
    }
}

fn member(admin: &SubnetAdmin, pol: &Policy, handle: &str, role: &str, seed: u8) -> GroupManager {
    let mut secret = [seed; 32];
    secret[0] = seed.wrapping_add(1);
    secret[1] = (seed >> 4) ^ 0x5a;
    let cred = credential(admin, handle, role, secret);
    GroupManager::new(
        secret,
        own(secret),
        &cred,
        pol.clone(),
        GroupConfig {
            commit_settle_ms: SETTLE,
        },
        NOW,
    )
    .unwrap()
}

/// Delivers everything `from` has queued to the members named as recipients.
fn pump(from: usize, ms: &mut [GroupManager], now: u64) -> Vec<GroupOutgoing> {
    let mut sent = Vec::new();
    while let Some(out) = ms[from].poll_outgoing() {
        for r in &out.recipients {
            if let Some(i) = ms
                .iter()
                .position(|m| m.credential().signing_key() == r.identity_key())
            {
                let _ = ms[i].handle_message(&out.bytes, now);
            }
        }
        sent.push(out);
    }
    sent
}

fn settle_all(ms: &mut [GroupManager], now: u64) {
    for m in ms.iter_mut() {
        m.handle_timeout(now);
    }
}

fn events(m: &mut GroupManager) -> Vec<GroupEvent> {
    std::iter::from_fn(|| m.poll_event()).collect()
}

fn messages(m: &mut GroupManager) -> Vec<Vec<u8>> {
    events(m)
        .into_iter()
        .filter_map(|e| match e {
            GroupEvent::Message { body, .. } => Some(body),
            _ => None,
        })
        .collect()
}

/// Creator `ms[0]` adds all the others, one commit; everyone joins.
fn form_group(ms: &mut [GroupManager], now: u64) -> GroupId {
    let g = ms[0].create_group(now).unwrap();
    let kps: Vec<Vec<u8>> = ms[1..]
        .iter_mut()
        .map(|m| m.key_package().unwrap())
        .collect();
    let refs: Vec<&[u8]> = kps.iter().map(Vec::as_slice).collect();
    ms[0].add_members(&g, &refs, now).unwrap();
    pump(0, ms, now);
    ms[0].handle_timeout(now + SETTLE);
    pump(0, ms, now + SETTLE);
    for m in ms.iter_mut() {
        events(m);
    }
    g
}

/// Where `m`'s commits rank in `epoch` of `group`.
fn rank_of(m: &GroupManager, group: &[u8], epoch: u64) -> [u8; 32] {
    let leaf = m
        .members(group)
        .iter()
        .find(|x| x.credential.signing_key() == m.credential().signing_key())
        .unwrap()
        .leaf;
    commit_rank(group, epoch, leaf)
}

fn admins() -> (SubnetAdmin, SubnetAdmin, SubnetAdmin) {
    (
        SubnetAdmin::from_secret([0xa1; 32]),
        SubnetAdmin::from_secret([0xb2; 32]),
        SubnetAdmin::from_secret([0xc3; 32]),
    )
}

#[test]
fn lifecycle_create_invite_message_update_remove_leave() {
    let (a, b, _) = admins();
    let pa = policy(&a, &[b.subnet()]);
    let pb = policy(&b, &[a.subnet()]);
    let mut ms = vec![
        member(&a, &pa, "ana", "staff", 1),
        member(&b, &pb, "bob", "staff", 2),
        member(&a, &pa, "avi", "staff", 3),
    ];
    let g = ms[0].create_group(NOW).unwrap();
    let kp = ms[1].key_package().unwrap();
    ms[0].add_member(&g, &kp, NOW).unwrap();
    // The commit goes out at once, the Welcome only after the epoch settles.
    let sent = pump(0, &mut ms, NOW);
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].kind, OutgoingKind::Commit);
    assert!(sent[0].recipients.is_empty());
    assert_eq!(ms[0].poll_timeout(), Some(NOW + SETTLE));
    ms[0].handle_timeout(NOW + SETTLE);
    let sent = pump(0, &mut ms, NOW + SETTLE);
    assert_eq!(sent[0].kind, OutgoingKind::Welcome);
    assert!(events(&mut ms[1]).contains(&GroupEvent::Joined { group: g.clone() }));
    assert_eq!(ms[0].epoch_authenticator(&g), ms[1].epoch_authenticator(&g));

    let t = NOW + 2 * SETTLE;
    ms[1].send(&g, OPTS, b"hello from B", t).unwrap();
    pump(1, &mut ms, t);
    let got: Vec<_> = events(&mut ms[0]);
    assert!(
        got.iter()
            .any(|e| matches!(e, GroupEvent::Message { body, from, .. }
        if body == b"hello from B" && from.handle() == "bob"))
    );

    // Third member, then self-update (post-compromise security), all converge.
    let kp = ms[2].key_package().unwrap();
    ms[1].add_member(&g, &kp, t).unwrap();
    pump(1, &mut ms, t);
    settle_all(&mut ms, t + SETTLE);
    pump(1, &mut ms, t + SETTLE);
    let t = t + 2 * SETTLE;
    ms[2].self_update(&g, t).unwrap();
    pump(2, &mut ms, t);
    settle_all(&mut ms, t + SETTLE);
    let ea = ms[0].epoch_authenticator(&g).unwrap();
    assert!(
        ms.iter()
            .all(|m| m.epoch_authenticator(&g) == Some(ea.clone()))
    );
    assert_eq!(ms[0].epoch(&g), Some(3));
    for m in ms.iter_mut() {
        events(m);
    }

    // Remove avi; avi sees Removed, the others a MemberRemoved.
    let t = t + 2 * SETTLE;
    ms[0].remove_member(&g, "avi", t).unwrap();
    pump(0, &mut ms, t);
    settle_all(&mut ms, t + SETTLE);
    assert!(events(&mut ms[2]).contains(&GroupEvent::Removed { group: g.clone() }));
    assert!(events(&mut ms[1]).iter().any(
        |e| matches!(e, GroupEvent::MemberRemoved { member, .. } if member.credential.handle() == "avi")
    ));
    assert_eq!(ms[0].members(&g).len(), 2);

    // bob leaves: a proposal, carried out by ana's next commit.
    let t = t + 2 * SETTLE;
    ms[1].leave(&g).unwrap();
    pump(1, &mut ms, t);
    assert!(ms[0].commit_pending(&g, t).unwrap());
    pump(0, &mut ms, t);
    settle_all(&mut ms, t + SETTLE);
    assert!(events(&mut ms[1]).contains(&GroupEvent::Removed { group: g.clone() }));
    assert_eq!(ms[0].members(&g).len(), 1);
}

#[test]
fn concurrent_commits_converge_on_the_authors_rank() {
    let (a, _, _) = admins();
    let pa = policy(&a, &[]);
    let mut ms: Vec<_> = (0..4)
        .map(|i| member(&a, &pa, &format!("m{i}"), "staff", 10 + i))
        .collect();
    let g = form_group(&mut ms, NOW);
    let e0 = ms[0].epoch(&g).unwrap();
    // Two members commit in the same epoch (a self-update and an add-less removal).
    let t = NOW + 10 * SETTLE;
    ms[1].self_update(&g, t).unwrap();
    ms[2].self_update(&g, t).unwrap();
    // Deliver in different orders to different members.
    let c1 = ms[1].poll_outgoing().unwrap();
    let c2 = ms[2].poll_outgoing().unwrap();
    ms[0].handle_message(&c1.bytes, t).unwrap();
    ms[0].handle_message(&c2.bytes, t + 10).unwrap();
    ms[3].handle_message(&c2.bytes, t).unwrap();
    ms[3].handle_message(&c1.bytes, t + 10).unwrap();
    ms[1].handle_message(&c2.bytes, t + 5).unwrap();
    ms[2].handle_message(&c1.bytes, t + 5).unwrap();
    settle_all(&mut ms, t + SETTLE);
    let ea = ms[0].epoch_authenticator(&g).unwrap();
    for m in &ms {
        assert_eq!(m.epoch(&g), Some(e0 + 1));
        assert_eq!(
            m.epoch_authenticator(&g),
            Some(ea.clone()),
            "a member forked"
        );
    }
    // Exactly one author lost: the one whose leaf ranks later in this epoch.
    let lost: Vec<usize> = (1..3)
        .filter(|&i| {
            events(&mut ms[i])
                .iter()
                .any(|e| matches!(e, GroupEvent::OwnCommitLost { .. }))
        })
        .collect();
    assert_eq!(lost.len(), 1);
    let loser = if rank_of(&ms[1], &g, e0) < rank_of(&ms[2], &g, e0) {
        2
    } else {
        1
    };
    assert_eq!(lost, vec![loser]);
    // The loser re-proposes in the next epoch; everyone converges again and talks.
    let t = t + 2 * SETTLE;
    ms[loser].self_update(&g, t).unwrap();
    pump(loser, &mut ms, t);
    settle_all(&mut ms, t + SETTLE);
    let ea = ms[0].epoch_authenticator(&g).unwrap();
    assert!(
        ms.iter()
            .all(|m| m.epoch_authenticator(&g) == Some(ea.clone()))
    );
    ms[3].send(&g, OPTS, b"after", t + SETTLE).unwrap();
    pump(3, &mut ms, t + SETTLE);
    for m in &mut ms[..3] {
        assert_eq!(messages(m), vec![b"after".to_vec()]);
    }
}

/// Every openmls commit here carries the pending leave requests, whatever it was made
/// for; its claim must list them, or the other members drop it as false and fork.
#[test]
fn a_leave_request_riding_on_another_commit_is_claimed() {
    let (a, _, _) = admins();
    let pa = policy(&a, &[]);
    let mut ms: Vec<_> = (0..3)
        .map(|i| member(&a, &pa, &format!("m{i}"), "staff", 40 + i))
        .collect();
    let g = form_group(&mut ms, NOW);
    let t = NOW + 10 * SETTLE;
    ms[2].leave(&g).unwrap();
    pump(2, &mut ms, t);
    ms[1].self_update(&g, t).unwrap();
    pump(1, &mut ms, t);
    settle_all(&mut ms, t + SETTLE);
    assert!(events(&mut ms[2]).contains(&GroupEvent::Removed { group: g.clone() }));
    assert_eq!(ms[0].members(&g).len(), 2);
    assert_eq!(ms[0].epoch_authenticator(&g), ms[1].epoch_authenticator(&g));
    assert_eq!(ms[0].stats().malformed, 0);
}

#[test]
fn late_commit_and_mismatched_epoch_are_loud() {
    let (a, _, _) = admins();
    let pa = policy(&a, &[]);
    let mut ms: Vec<_> = (0..3)
        .map(|i| member(&a, &pa, &format!("m{i}"), "staff", 30 + i))
        .collect();
    let g = form_group(&mut ms, NOW);
    let t = NOW + 10 * SETTLE;
    ms[0].self_update(&g, t).unwrap();
    ms[1].self_update(&g, t).unwrap();
    let c0 = ms[0].poll_outgoing().unwrap();
    let c1 = ms[1].poll_outgoing().unwrap();
    let e = ms[0].epoch(&g).unwrap();
    let (low, high) = if rank_of(&ms[0], &g, e) < rank_of(&ms[1], &g, e) {
        (c0.clone(), c1.clone())
    } else {
        (c1.clone(), c0.clone())
    };
    // m2 sees only the higher commit within its window (delivery spread > window).
    ms[2].handle_message(&high.bytes, t).unwrap();
    ms[2].handle_timeout(t + SETTLE);
    ms[0].handle_message(&c1.bytes, t).unwrap();
    ms[1].handle_message(&c0.bytes, t).unwrap();
    ms[0].handle_timeout(t + SETTLE);
    ms[1].handle_timeout(t + SETTLE);
    assert_ne!(ms[0].epoch_authenticator(&g), ms[2].epoch_authenticator(&g));
    events(&mut ms[2]);
    // The late, winning commit tells m2 it decided wrongly.
    ms[2].handle_message(&low.bytes, t + 2 * SETTLE).unwrap();
    assert!(events(&mut ms[2]).contains(&GroupEvent::Diverged {
        group: g.clone(),
        epoch: ms[2].epoch(&g).unwrap() - 1
    }));
    // And a message from the majority is refused as divergent, never misdelivered.
    ms[0].send(&g, OPTS, b"x", t + 2 * SETTLE).unwrap();
    let out = ms[0].poll_outgoing().unwrap();
    assert!(ms[2].handle_message(&out.bytes, t + 2 * SETTLE).is_err());
    let ev = events(&mut ms[2]);
    assert!(ev.iter().any(|e| matches!(e, GroupEvent::Diverged { .. })));
    assert!(!ev.iter().any(|e| matches!(e, GroupEvent::Message { .. })));
    assert!(ms[2].stats().divergences >= 2);
}

#[test]
fn policy_refuses_unfederated_and_forbidden_groups() {
    let (a, b, c) = admins();
    let pa = policy(&a, &[b.subnet()]);
    let pb = policy(&b, &[a.subnet()]);
    let pc = policy(&c, &[a.subnet()]); // C federates A, but A does not federate C.
    let mut ana = member(&a, &pa, "ana", "staff", 50);
    let mut cy = member(&c, &pc, "cy", "staff", 51);
    let bob = member(&b, &pb, "bob", "staff", 52);
    let mut gus = member(&b, &pb, "gus", "guest", 53);
    let g = ana.create_group(NOW).unwrap();
    // The sender's side refuses to add C: not federated.
    let err = ana
        .add_member(&g, &cy.key_package().unwrap(), NOW)
        .unwrap_err();
    assert!(matches!(
        err,
        GroupError::Policy {
            refusal: PolicyRefusal::NotFederated { .. },
            ..
        }
    ));
    // C creates a group and invites ana; ana's client refuses the Welcome.
    let gc = cy.create_group(NOW).unwrap();
    cy.add_member(&gc, &ana.key_package().unwrap(), NOW)
        .unwrap();
    cy.poll_outgoing();
    cy.handle_timeout(NOW + SETTLE);
    let welcome = cy.poll_outgoing().unwrap();
    assert!(ana.handle_message(&welcome.bytes, NOW + SETTLE).is_err());
    assert!(
        events(&mut ana)
            .iter()
            .any(|e| matches!(e, GroupEvent::Refused { .. }))
    );
    assert_eq!(ana.group_ids(), vec![g.clone()]);

    // A group A+B, then bob adds gus, a B guest (B's policy allows it: guest is a
    // role there, and bob's client does not check guest→staff because … it does:
    // refused at bob's side too).
    let mut ms = vec![ana, bob];
    let kp = ms[1].key_package().unwrap();
    ms[0].add_member(&g, &kp, NOW).unwrap();
    pump(0, &mut ms, NOW);
    ms[0].handle_timeout(NOW + SETTLE);
    pump(0, &mut ms, NOW + SETTLE);
    assert!(
        ms[1]
            .add_member(&g, &gus.key_package().unwrap(), NOW)
            .is_err()
    );

    // A message whose options break ana's policy is dropped and counted at ana even
    // though bob's policy would allow it (a modified sender).
    let t = NOW + 2 * SETTLE;
    let mut lax_body = pb.body().clone();
    lax_body.version = 2;
    lax_body.ttl_max_secs = 10_000_000;
    let lax = Policy::verify(&b.issue_policy(lax_body).unwrap().to_bytes(), &b.subnet()).unwrap();
    ms[1].update_policy(lax).unwrap();
    ms[1]
        .send(
            &g,
            MessageOptions {
                ttl_secs: 1_000_000,
                burn_on_read: false,
            },
            b"too long",
            t,
        )
        .unwrap();
    pump(1, &mut ms, t);
    let ev = events(&mut ms[0]);
    assert!(ev.iter().any(|e| matches!(
        e,
        GroupEvent::PolicyDrop {
            refusal: PolicyRefusal::Ttl { .. },
            ..
        }
    )));
    assert!(!ev.iter().any(|e| matches!(e, GroupEvent::Message { .. })));
    assert_eq!(ms[0].stats().policy_drops, 1);
    // Sender-side refusal with a clear error.
    let err = ms[0]
        .send(
            &g,
            MessageOptions {
                ttl_secs: 5,
                burn_on_read: false,
            },
            b"short",
            t,
        )
        .unwrap_err();
    assert!(err.to_string().contains("TTL 5s"), "{err}");

    // Revocation: A revokes bob's key? Not A's member; A revokes nobody of B. A
    // de-federates B instead: ana's next check refuses bob, and ana removes him.
    let mut body = pa.body().clone();
    body.version = 2;
    body.federation.clear();
    ms[0]
        .update_policy(
            Policy::verify(&a.issue_policy(body).unwrap().to_bytes(), &a.subnet()).unwrap(),
        )
        .unwrap();
    assert_eq!(ms[0].refused_members(&g, t).len(), 1);
    assert!(ms[0].remove_refused(&g, t).unwrap());
    pump(0, &mut ms, t);
    settle_all(&mut ms, t + SETTLE);
    assert!(events(&mut ms[1]).contains(&GroupEvent::Removed { group: g.clone() }));
    drop(gus.poll_event());
}

#[test]
fn commit_bringing_forbidden_member_makes_member_drop_group() {
    let (a, b, _) = admins();
    let pa = policy(&a, &[b.subnet()]);
    // B's policy allows staff→guest and guest→staff, and federates A for all roles.
    let mut bb = policy(&b, &[a.subnet()]).body().clone();
    bb.version = 2;
    bb.rules.push(RoleRule {
        from: "staff".into(),
        to: "guest".into(),
    });
    bb.rules.push(RoleRule {
        from: "guest".into(),
        to: "staff".into(),
    });
    bb.federation[0].local_roles.push("guest".into());
    let pb = Policy::verify(&b.issue_policy(bb).unwrap().to_bytes(), &b.subnet()).unwrap();
    let mut ms = vec![
        member(&a, &pa, "ana", "staff", 60),
        member(&b, &pb, "bob", "staff", 61),
        member(&b, &pb, "gus", "guest", 62),
    ];
    let g = ms[0].create_group(NOW).unwrap();
    let kp = ms[1].key_package().unwrap();
    ms[0].add_member(&g, &kp, NOW).unwrap();
    pump(0, &mut ms, NOW);
    ms[0].handle_timeout(NOW + SETTLE);
    pump(0, &mut ms, NOW + SETTLE);
    let kp = ms[2].key_package().unwrap();
    ms[1].add_member(&g, &kp, NOW + SETTLE).unwrap();
    pump(1, &mut ms, NOW + SETTLE);
    settle_all(&mut ms, NOW + 2 * SETTLE);
    // ana's policy does not federate B guests: ana drops the group, loudly.
    let ev = events(&mut ms[0]);
    assert!(ev.iter().any(|e| matches!(e, GroupEvent::Refused { handle, refusal: PolicyRefusal::FederationRoleNotAllowed { .. }, .. } if handle == "gus")));
    assert!(ms[0].group_ids().is_empty());
}

#[test]
fn rogue_admin_cannot_read_or_inject_and_reminted_handle_is_visible() {
    let (a, _, _) = admins();
    let pa = policy(&a, &[]);
    let mut ms = vec![
        member(&a, &pa, "ana", "staff", 70),
        member(&a, &pa, "bob", "staff", 71),
    ];
    let g = form_group(&mut ms, NOW);
    let t = NOW + 2 * SETTLE;
    ms[0].send(&g, OPTS, b"secret plan", t).unwrap();
    let ciphertext = ms[0].poll_outgoing().unwrap().bytes;
    // The wire bytes do not contain the plaintext.
    assert!(!ciphertext.windows(11).any(|w| w == b"secret plan"));

    // The admin mints a credential for "bob" with a key it holds, and builds a group
    // with the *same group id*, at the same epoch, to try to read and to inject.
    let mut rogue = member(&a, &pa, "bob", "staff", 99);
    let creds = rogue.credential_with_key();
    let mut fake = MlsGroup::builder()
        .with_group_id(openmls::group::GroupId::from_slice(&g))
        .ciphersuite(CIPHERSUITE)
        .use_ratchet_tree_extension(true)
        .build(&rogue.provider, &rogue.signer, creds)
        .unwrap();
    // Cannot read: the ciphertext does not open with the admin's keys.
    let msg = MlsMessageIn::tls_deserialize_exact(&ciphertext).unwrap();
    assert!(
        fake.process_message(&rogue.provider, msg.try_into_protocol_message().unwrap())
            .is_err()
    );
    // Cannot inject: its message is refused by members, at any epoch it can reach.
    for _ in 0..2 {
        let forged = fake
            .create_message(
                &rogue.provider,
                &rogue.signer,
                &encode_app(&OPTS, b"forged"),
            )
            .unwrap();
        let bytes = forged.tls_serialize_detached().unwrap();
        assert!(ms[1].handle_message(&bytes, t).is_err());
        let (_, _, _) = fake
            .self_update(
                &rogue.provider,
                &rogue.signer,
                LeafNodeParameters::default(),
            )
            .map(|b| b.into_contents())
            .unwrap();
        fake.merge_pending_commit(&rogue.provider).unwrap();
    }
    // A forged commit for the real group's epoch is not applied either.
    let forged_commit = fake
        .self_update(
            &rogue.provider,
            &rogue.signer,
            LeafNodeParameters::default(),
        )
        .unwrap();
    let _ = ms[1].handle_message(&ser(forged_commit.commit()).unwrap(), t);
    ms[1].handle_timeout(t + SETTLE);
    assert!(
        !events(&mut ms[1])
            .iter()
            .any(|e| matches!(e, GroupEvent::Message { .. }))
    );
    assert_eq!(ms[0].epoch_authenticator(&g), ms[1].epoch_authenticator(&g));

    // If the admin's KeyPackage for "bob" is ever added (e.g. a member is tricked into
    // inviting it), it is a new leaf with a new key, reported as a duplicate handle.
    let kp = rogue.key_package().unwrap();
    ms[0].add_member(&g, &kp, t).unwrap();
    pump(0, &mut ms, t);
    settle_all(&mut ms, t + SETTLE);
    let ev = events(&mut ms[1]);
    let dup = ev
        .iter()
        .find_map(|e| match e {
            GroupEvent::DuplicateHandle { existing, new, .. } => Some((existing, new)),
            _ => None,
        })
        .expect("re-minted handle must be reported");
    assert_eq!(dup.0.credential.handle(), "bob");
    assert_ne!(
        dup.0.credential.signing_key(),
        dup.1.credential.signing_key()
    );
    assert_ne!(dup.0.leaf, dup.1.leaf);
}

#[test]
fn leaf_key_must_match_credential_key() {
    let (a, _, _) = admins();
    let pa = policy(&a, &[]);
    let mut ana = member(&a, &pa, "ana", "staff", 80);
    // A member holding someone else's credential cannot use it with its own key.
    let cred_of_bob = credential(&a, "bob", "staff", [81; 32]);
    assert!(matches!(
        GroupManager::new(
            [82; 32],
            own([81; 32]),
            &cred_of_bob,
            pa.clone(),
            GroupConfig::default(),
            NOW
        ),
        Err(GroupError::KeyMismatch)
    ));
    let g = ana.create_group(NOW).unwrap();
    assert!(ana.add_member(&g, b"junk", NOW).is_err());
    assert!(ana.handle_message(b"\x00\x01junk", NOW).is_err());
}

#[test]
fn group_state_survives_restart() {
    let (a, _, _) = admins();
    let pa = policy(&a, &[]);
    let mut ms = vec![
        member(&a, &pa, "ana", "staff", 90),
        member(&a, &pa, "bob", "staff", 91),
    ];
    let g = form_group(&mut ms, NOW);
    let t = NOW + 2 * SETTLE;
    ms[0].send(&g, OPTS, b"one", t).unwrap();
    pump(0, &mut ms, t);
    assert_eq!(messages(&mut ms[1]), vec![b"one".to_vec()]);
    let snap = ms[1].snapshot().unwrap();
    ms[1] = GroupManager::restore(&snap, t).unwrap();
    assert_eq!(ms[1].epoch_authenticator(&g), ms[0].epoch_authenticator(&g));
    ms[0].send(&g, OPTS, b"two", t).unwrap();
    pump(0, &mut ms, t);
    assert_eq!(messages(&mut ms[1]), vec![b"two".to_vec()]);
    ms[1].self_update(&g, t).unwrap();
    pump(1, &mut ms, t);
    settle_all(&mut ms, t + SETTLE);
    assert_eq!(ms[1].epoch_authenticator(&g), ms[0].epoch_authenticator(&g));
}

/// Sizes of group traffic vs group size, printed for BENCHMARKS.md
/// (`cargo test -p shoal-client --release group_sizes -- --ignored --nocapture`).
#[test]
#[ignore = "measurement; prints a table"]
fn group_sizes() {
    let (a, _, _) = admins();
    let pa = policy(&a, &[]);
    println!(
        "| members | app msg (100 B body) | self-update commit | add-1 commit | Welcome (add 1) |"
    );
    println!("|---|---|---|---|---|");
    for n in [2usize, 16, 64, 256] {
        let mut ms: Vec<_> = (0..n)
            .map(|i| member(&a, &pa, &format!("m{i}"), "staff", i as u8))
            .collect();
        // Only the creator and one member need full state: the creator adds n-2 at
        // once, then the last member, whose Welcome and commit are measured.
        let g = ms[0].create_group(NOW).unwrap();
        let kps: Vec<Vec<u8>> = ms[1..n - 1]
            .iter_mut()
            .map(|m| m.key_package().unwrap())
            .collect();
        let refs: Vec<&[u8]> = kps.iter().map(Vec::as_slice).collect();
        if !refs.is_empty() {
            ms[0].add_members(&g, &refs, NOW).unwrap();
            ms[0].handle_timeout(NOW + SETTLE);
            while ms[0].poll_outgoing().is_some() {}
        }
        let t = NOW + 2 * SETTLE;
        let kp = ms[n - 1].key_package().unwrap();
        ms[0].add_member(&g, &kp, t).unwrap();
        let add_commit = ms[0].poll_outgoing().unwrap().bytes.len();
        ms[0].handle_timeout(t + SETTLE);
        let welcome = ms[0].poll_outgoing().unwrap();
        ms[n - 1]
            .handle_message(&welcome.bytes, t + SETTLE)
            .unwrap();
        let t = t + 2 * SETTLE;
        ms[0].send(&g, OPTS, &[7u8; 100], t).unwrap();
        let app = ms[0].poll_outgoing().unwrap();
        ms[n - 1].handle_message(&app.bytes, t).unwrap();
        assert_eq!(messages(&mut ms[n - 1]), vec![vec![7u8; 100]]);
        ms[n - 1].self_update(&g, t).unwrap();
        let update = ms[n - 1].poll_outgoing().unwrap().bytes.len();
        println!(
            "| {n} | {} | {update} | {add_commit} | {} |",
            app.bytes.len(),
            welcome.bytes.len()
        );
    }
}

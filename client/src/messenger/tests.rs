use super::*;
use shoal_subnet::{BurnOnRead, CredentialBody, Federation, PolicyBody, RoleRule, SubnetAdmin};
use shoal_topology::Hex32;

const NOW: u64 = 1_500_000; // ms
const SETTLE: u64 = 1_000;
const OPTS: MessageOptions = MessageOptions {
    ttl_secs: 3600,
    burn_on_read: false,
};

fn policy_body(admin: &SubnetAdmin, federated: &[SubnetId], version: u64) -> PolicyBody {
    PolicyBody {
        subnet: admin.subnet(),
        version,
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
    }
}

fn policy(admin: &SubnetAdmin, federated: &[SubnetId]) -> Policy {
    let signed = admin
        .issue_policy(policy_body(admin, federated, 1))
        .unwrap();
    Policy::verify(&signed.to_bytes(), &admin.subnet()).unwrap()
}

fn member(admin: &SubnetAdmin, pol: &Policy, handle: &str, role: &str, seed: u8) -> Messenger {
    let mut secret = [seed; 32];
    secret[0] = seed.wrapping_add(1);
    let key = ed25519_dalek::SigningKey::from_bytes(&secret);
    let cred = admin
        .issue_credential(CredentialBody {
            subnet: admin.subnet(),
            handle: handle.into(),
            role: role.into(),
            signing_key: Hex32(key.verifying_key().to_bytes()),
            seal_key: Hex32(
                x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from(secret)).to_bytes(),
            ),
            mailbox: Hex32(secret),
            gateway: Hex32([9; 32]),
            not_before: 1000,
            not_after: 100_000,
        })
        .unwrap();
    let config = MessengerConfig {
        groups: GroupConfig {
            commit_settle_ms: SETTLE,
        },
        ..MessengerConfig::default()
    };
    let own = Contact {
        mailbox: secret,
        gateway: [9; 32],
        public_key: x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from(secret))
            .to_bytes(),
    };
    Messenger::new(secret, own, &cred, pol.clone(), config, NOW).unwrap()
}

/// Delivers everything queued, repeatedly, to whoever owns the mailbox; returns how many
/// messages moved.
fn deliver(ms: &mut [Messenger], now: u64) -> usize {
    let mut moved = 0;
    loop {
        let mut any = false;
        for i in 0..ms.len() {
            while let Some(out) = ms[i].poll_outgoing() {
                any = true;
                moved += 1;
                if let Some(j) = ms
                    .iter()
                    .position(|m| m.card().binding().body().mailbox.0 == out.to.mailbox)
                {
                    ms[j].handle_incoming(&out.bytes, now);
                }
            }
        }
        if !any {
            return moved;
        }
    }
}

fn tick(ms: &mut [Messenger], now: u64) {
    for m in ms.iter_mut() {
        m.handle_timeout(now);
    }
    deliver(ms, now);
}

fn events(m: &mut Messenger) -> Vec<MessengerEvent> {
    std::iter::from_fn(|| m.poll_event()).collect()
}

fn bodies(m: &mut Messenger) -> Vec<Vec<u8>> {
    events(m)
        .into_iter()
        .filter_map(|e| match e {
            MessengerEvent::Message { body, .. } => Some(body),
            _ => None,
        })
        .collect()
}

struct World {
    a: SubnetAdmin,
    ms: Vec<Messenger>,
}

/// ana, al, ax (subnet A), bo (B, federated with A), cy (C, federated with nobody).
fn world() -> World {
    let a = SubnetAdmin::from_secret([0xa1; 32]);
    let b = SubnetAdmin::from_secret([0xb2; 32]);
    let c = SubnetAdmin::from_secret([0xc3; 32]);
    let pa = policy(&a, &[b.subnet()]);
    let pb = policy(&b, &[a.subnet()]);
    let pc = policy(&c, &[]);
    let ms = vec![
        member(&a, &pa, "ana", "staff", 1),
        member(&a, &pa, "al", "staff", 2),
        member(&a, &pa, "ax", "staff", 3),
        member(&b, &pb, "bo", "staff", 4),
        member(&c, &pc, "cy", "staff", 5),
    ];
    World { a, ms }
}

fn cred(ms: &[Messenger], i: usize) -> MemberCard {
    ms[i].card().clone()
}

/// ana creates a group and adds `others`; returns its id once everyone joined.
fn form_group(ms: &mut [Messenger], others: &[usize], now: u64) -> GroupId {
    let g = ms[0].create_group(now).unwrap();
    let invites: Vec<Invite> = others.iter().map(|&i| ms[i].invite().unwrap()).collect();
    ms[0].add_members(&g, &invites, now).unwrap();
    deliver(ms, now);
    tick(ms, now + SETTLE);
    for &i in others {
        assert!(
            ms[i].groups().iter().any(|s| s.id == g),
            "member {i} did not join"
        );
    }
    for m in ms.iter_mut() {
        events(m);
    }
    g
}

#[test]
fn direct_policy_refused_at_sender_and_dropped_at_recipient() {
    let World { mut ms, .. } = world();
    let (ana, bo) = (cred(&ms, 0), cred(&ms, 3));
    // Federated: delivered, with the sender named from its credential.
    ms[0].send_direct(&bo, OPTS, b"hi bo", NOW).unwrap();
    deliver(&mut ms, NOW);
    let got = events(&mut ms[3]);
    assert!(
        matches!(&got[..], [MessengerEvent::Message { from, group: None, body, .. }]
            if from == "ana" && body == b"hi bo"),
        "{got:?}"
    );
    // C is not federated with A: cy's own client refuses, naming the rule.
    let err = ms[4]
        .send_direct(&ana, OPTS, b"let me in", NOW)
        .unwrap_err();
    assert!(
        matches!(&err, MessengerError::Refused { to, refusal: PolicyRefusal::NotFederated { .. } } if to == "ana"),
        "{err}"
    );
    assert!(err.to_string().contains("not federated"), "{err}");
    assert_eq!(ms[4].stats().sends_refused, 1);
    assert_eq!(deliver(&mut ms, NOW), 0, "nothing was sent");
    // A modified client skips its check: ana's client drops and counts it.
    ms[4].dangerously_send_direct_ignoring_policy(&ana, OPTS, b"let me in", NOW);
    assert_eq!(deliver(&mut ms, NOW), 1);
    assert_eq!(ms[0].policy_drops(), 1);
    assert!(ms[0].peek().is_empty());
    let got = events(&mut ms[0]);
    assert!(
        matches!(&got[..], [MessengerEvent::PolicyDrop { handle, refusal: PolicyRefusal::NotFederated { .. }, .. }] if handle == "cy"),
        "{got:?}"
    );
    // Options are policy too: a TTL above the maximum is refused at both ends.
    let long = MessageOptions {
        ttl_secs: 100_000,
        burn_on_read: false,
    };
    assert!(matches!(
        ms[0].send_direct(&bo, long, b"x", NOW),
        Err(MessengerError::Refused {
            refusal: PolicyRefusal::Ttl { .. },
            ..
        })
    ));
    ms[0].dangerously_send_direct_ignoring_policy(&bo, long, b"x", NOW);
    deliver(&mut ms, NOW);
    assert_eq!(ms[3].policy_drops(), 1);
    assert_eq!(ms[3].stats().direct_received, 1);
}

#[test]
fn forged_or_retargeted_direct_messages_are_dropped() {
    let World { mut ms, .. } = world();
    let (al, bo) = (cred(&ms, 1), cred(&ms, 3));
    // ana signs a message for al; someone re-sends those bytes to bo.
    ms[0].send_direct(&al, OPTS, b"for al", NOW).unwrap();
    let out = ms[0].poll_outgoing().unwrap();
    ms[3].handle_incoming(&out.bytes, NOW);
    assert_eq!(ms[3].stats().malformed, 1);
    assert!(ms[3].peek().is_empty());
    let _ = bo;
    // Garbage never panics and is counted.
    ms[3].handle_incoming(b"SM\x01\x01\xff\xff\xff\xff", NOW);
    ms[3].handle_incoming(b"", NOW);
    assert_eq!(ms[3].stats().malformed, 3);
}

#[test]
fn ttl_expiry_and_burn_on_read() {
    let World { mut ms, .. } = world();
    let al = cred(&ms, 1);
    let burn = MessageOptions {
        ttl_secs: 60,
        burn_on_read: true,
    };
    let keep = MessageOptions {
        ttl_secs: 120,
        burn_on_read: false,
    };
    ms[0].send_direct(&al, burn, b"burn me", NOW).unwrap();
    ms[0].send_direct(&al, keep, b"keep me", NOW).unwrap();
    deliver(&mut ms, NOW);
    assert_eq!(ms[1].poll_timeout(), Some(NOW + 60_000));
    let first = ms[1].read(NOW + 1);
    assert_eq!(first.len(), 2);
    assert!(first.iter().all(|m| !m.read));
    let second = ms[1].read(NOW + 2);
    assert_eq!(second.len(), 1, "burnt after the first read");
    assert_eq!(second[0].body, b"keep me");
    assert!(second[0].read);
    assert_eq!(ms[1].stats().burnt, 1);
    // Unread burn-on-read messages still expire; everything goes at its TTL.
    ms[1].handle_timeout(NOW + 120_000);
    assert!(ms[1].peek().is_empty());
    assert_eq!(ms[1].stats().expired, 1);
    assert_eq!(ms[1].poll_timeout(), None);
}

#[test]
fn reading_one_conversation_burns_only_its_messages() {
    let World { mut ms, .. } = world();
    let al = cred(&ms, 1);
    let direct = |ms: &[Messenger], i: usize| {
        let c = ms[i].card();
        Conversation::Direct(c.subnet(), Hex32(c.identity_key()))
    };
    let burn = MessageOptions {
        ttl_secs: 600,
        burn_on_read: true,
    };
    let g = form_group(&mut ms, &[1], NOW);
    ms[0].send_direct(&al, burn, b"from ana", NOW).unwrap();
    ms[2].send_direct(&al, burn, b"from ax", NOW).unwrap();
    ms[0].send_group(&g, burn, b"to the group", NOW).unwrap();
    deliver(&mut ms, NOW);
    assert_eq!(ms[1].peek().len(), 3);

    // Opening ana's direct conversation shows and burns only what ana sent directly.
    let from_ana = direct(&ms, 0);
    let read = ms[1].read_conversation(from_ana, NOW + 1);
    assert_eq!(read.len(), 1);
    assert_eq!(read[0].body, b"from ana");
    let mut left: Vec<&[u8]> = ms[1].peek().iter().map(|m| m.body.as_slice()).collect();
    left.sort();
    assert_eq!(left, [b"from ax".as_slice(), b"to the group"]);
    assert!(ms[1].peek().iter().all(|m| !m.read), "others stay unread");
    assert_eq!(ms[1].stats().burnt, 1);

    // The group, then ax: each burns its own.
    let read = ms[1].read_conversation(Conversation::Group(&g), NOW + 2);
    assert_eq!(read.len(), 1);
    assert_eq!(read[0].body, b"to the group");
    assert_eq!(read[0].conversation(), Conversation::Group(&g));
    assert_eq!(ms[1].peek().len(), 1);
    let from_bo = direct(&ms, 3);
    assert!(ms[1].read_conversation(from_bo, NOW + 3).is_empty());
    assert_eq!(ms[1].peek().len(), 1, "an empty conversation burns nothing");
    let ax = direct(&ms, 2);
    ms[1].read_conversation(ax, NOW + 4);
    assert!(ms[1].peek().is_empty());
    assert_eq!(ms[1].stats().burnt, 3);
}

#[test]
fn group_summary_shows_a_change_waiting_to_settle() {
    let World { mut ms, .. } = world();
    let g = form_group(&mut ms, &[1], NOW);
    let s = &ms[0].groups()[0];
    assert_eq!((s.settling_until_ms, s.leaving), (None, false));
    ms[0].self_update(&g, NOW).unwrap();
    assert_eq!(ms[0].groups()[0].settling_until_ms, Some(NOW + SETTLE));
    ms[1].leave(&g, NOW).unwrap();
    assert!(ms[1].groups()[0].leaving);
    tick(&mut ms, NOW + SETTLE);
    assert_eq!(ms[0].groups()[0].settling_until_ms, None);
}

#[test]
fn group_spanning_federated_subnets_and_restart() {
    let World { mut ms, .. } = world();
    let g = form_group(&mut ms, &[1, 3], NOW);
    let now = NOW + 2 * SETTLE;
    ms[3].send_group(&g, OPTS, b"hello from B", now).unwrap();
    deliver(&mut ms, now);
    assert_eq!(bodies(&mut ms[0]), vec![b"hello from B".to_vec()]);
    assert_eq!(bodies(&mut ms[1]), vec![b"hello from B".to_vec()]);
    // C may not be added: ana's own policy refuses the invite.
    let cy_invite = ms[4].invite().unwrap();
    assert!(matches!(
        ms[0].add_members(&g, &[cy_invite], now),
        Err(MessengerError::Refused { .. })
    ));

    // al restarts from its store: groups, policy and inbox survive.
    let store = crate::ClientStore::in_memory().unwrap();
    store
        .save_messenger(&ms[1].snapshot().unwrap(), &[])
        .unwrap();
    let snap = store.load_messenger().unwrap().unwrap();
    ms[1] = Messenger::restore(&snap, now).unwrap();
    assert_eq!(ms[1].peek().len(), 1);
    assert_eq!(ms[1].groups()[0].members.len(), 3);
    ms[1].send_group(&g, OPTS, b"al is back", now).unwrap();
    ms[0].send_group(&g, OPTS, b"welcome back", now).unwrap();
    deliver(&mut ms, now);
    let mut got = bodies(&mut ms[3]);
    got.sort();
    assert_eq!(got, vec![b"al is back".to_vec(), b"welcome back".to_vec()]);
    assert_eq!(bodies(&mut ms[1]), vec![b"welcome back".to_vec()]);
    // Policy is enforced after the restart too.
    let cy = cred(&ms, 4);
    assert!(ms[1].send_direct(&cy, OPTS, b"x", now).is_err());
}

#[test]
fn revocation_removes_the_member_at_the_next_commit() {
    let World { a, mut ms } = world();
    let b = SubnetAdmin::from_secret([0xb2; 32]);
    let g = form_group(&mut ms, &[1, 2, 3], NOW);
    let ax_key = cred(&ms, 2).identity_key();
    // The admin revokes ax and publishes policy v2 to A's remaining members.
    let mut body = policy_body(&a, &[b.subnet()], 2);
    body.revoked_keys.push(Hex32(ax_key));
    let update = policy_update(&a.issue_policy(body).unwrap());
    let t = NOW + 5 * SETTLE;
    for i in [0, 1] {
        ms[i].handle_incoming(&update, t);
        assert!(
            events(&mut ms[i]).contains(&MessengerEvent::PolicyUpdated { version: 2 }),
            "member {i}"
        );
    }
    // A policy of another subnet, or a replayed one, is refused.
    ms[3].handle_incoming(&update, t);
    ms[0].handle_incoming(&update, t);
    assert_eq!(ms[3].stats().policies_rejected, 1);
    assert_eq!(ms[0].stats().policies_rejected, 1);
    // Both A members commit the removal at once; one wins by rank, no fork.
    assert_eq!(ms[0].stats().removals_committed, 1);
    assert_eq!(ms[1].stats().removals_committed, 1);
    deliver(&mut ms, t);
    tick(&mut ms, t + SETTLE);
    tick(&mut ms, t + 2 * SETTLE);
    for i in [0, 1, 3] {
        let members = &ms[i].groups()[0].members;
        assert_eq!(members.len(), 3, "member {i}: {members:?}");
        assert!(!members.iter().any(|(h, _)| h == "ax"));
        let evs = events(&mut ms[i]);
        assert!(
            evs.iter().any(|e| matches!(e, MessengerEvent::Group(GroupEvent::MemberRemoved { member, .. }) if member.credential.handle() == "ax")),
            "member {i}: {evs:?}"
        );
    }
    assert!(ms[2].groups().is_empty(), "ax knows it was removed");
    let auths: Vec<_> = [0, 1, 3]
        .iter()
        .map(|&i| ms[i].group_manager().epoch_authenticator(&g).unwrap())
        .collect();
    assert!(auths.windows(2).all(|w| w[0] == w[1]), "one branch");
    // The group still works, and a revoked member's direct message is dropped.
    ms[3]
        .send_group(&g, OPTS, b"after", t + 3 * SETTLE)
        .unwrap();
    deliver(&mut ms, t + 3 * SETTLE);
    assert_eq!(bodies(&mut ms[0]), vec![b"after".to_vec()]);
    let ana = cred(&ms, 0);
    ms[2].send_direct(&ana, OPTS, b"still here?", t).unwrap();
    deliver(&mut ms, t);
    assert!(matches!(
        &events(&mut ms[0])[..],
        [MessengerEvent::PolicyDrop {
            refusal: PolicyRefusal::Revoked { .. },
            ..
        }]
    ));
}

#[test]
fn group_message_before_welcome_is_parked_then_delivered() {
    let World { mut ms, .. } = world();
    let g = ms[0].create_group(NOW).unwrap();
    let inv = ms[1].invite().unwrap();
    ms[0].add_members(&g, &[inv], NOW).unwrap();
    deliver(&mut ms, NOW);
    ms[0].handle_timeout(NOW + SETTLE);
    let welcome = ms[0].poll_outgoing().unwrap();
    ms[0].send_group(&g, OPTS, b"early", NOW + SETTLE).unwrap();
    let early = ms[0].poll_outgoing().unwrap();
    ms[1].handle_incoming(&early.bytes, NOW + SETTLE);
    assert!(ms[1].peek().is_empty());
    ms[1].handle_incoming(&welcome.bytes, NOW + SETTLE);
    assert_eq!(bodies(&mut ms[1]), vec![b"early".to_vec()]);
}

#[test]
fn invites_travel_as_text_and_as_messages() {
    let World { mut ms, .. } = world();
    let inv = ms[1].invite().unwrap();
    let text = invite_to_text(&inv);
    assert!(text.starts_with("shoal-invite1:"));
    assert_eq!(invite_from_text(&text).unwrap(), inv);
    assert!(invite_from_text("shoal1:abc").is_err());
    let ana = cred(&ms, 0);
    ms[3].send_invite(&ana, NOW).unwrap();
    deliver(&mut ms, NOW);
    assert_eq!(ms[0].received_invites().len(), 1);
    let g = ms[0].create_group(NOW).unwrap();
    // bo is no confirmed contact of ana's yet: its network invite is not used...
    let (sb, kb) = (ms[3].card().subnet(), Hex32(ms[3].card().identity_key()));
    assert!(ms[0].invite_from(&sb, &kb).is_none());
    // ... until ana confirms bo's key.
    assert!(ms[0].confirm_contact(&sb, &kb));
    let from_bo = ms[0].invite_from(&sb, &kb).unwrap();
    ms[0].add_members(&g, &[from_bo], NOW).unwrap();
    deliver(&mut ms, NOW);
    tick(&mut ms, NOW + SETTLE);
    assert_eq!(ms[3].groups().len(), 1);
}

/// Wire indistinguishability: a member whose group spans two federated subnets and a
/// member whose group stays inside one subnet put the same thing on the wire: frames
/// of one size, at send times with the same (Poisson) distribution.
#[test]
fn inter_and_intra_subnet_group_traffic_look_alike_on_the_wire() {
    use crate::core::{ClientConfig, ClientCore, Identity};
    use crate::testnet::TestNet;
    use rand::SeedableRng;
    use rand::rngs::StdRng;
    use shoal_packet::FRAME_SIZE;
    use shoal_topology::NetworkParams;
    use std::time::{Duration, Instant};

    let rates = (2.0, 0.5, 0.5);
    let mut rng = StdRng::seed_from_u64(77);
    let net = TestNet::new(
        &mut rng,
        NetworkParams {
            lambda_p: rates.0,
            lambda_l: rates.1,
            lambda_d: rates.2,
            ..NetworkParams::default()
        },
    );
    let a = SubnetAdmin::from_secret([0xa1; 32]);
    let b = SubnetAdmin::from_secret([0xb2; 32]);
    let pa = policy(&a, &[b.subnet()]);
    let pb = policy(&b, &[a.subnet()]);
    // A member whose credential names a real gateway and seal key, with its core.
    let make = |admin: &SubnetAdmin, pol: &Policy, handle: &str, seed: u8, gw: usize| {
        let mut crng = StdRng::seed_from_u64(u64::from(seed));
        let identity = Identity::generate(&mut crng, net.gateways[gw]);
        let secret = [seed; 32];
        let key = ed25519_dalek::SigningKey::from_bytes(&secret);
        let cred = admin
            .issue_credential(CredentialBody {
                subnet: admin.subnet(),
                handle: handle.into(),
                role: "staff".into(),
                signing_key: Hex32(key.verifying_key().to_bytes()),
                seal_key: Hex32(identity.public_key().to_bytes()),
                mailbox: Hex32(identity.mailbox),
                gateway: Hex32(identity.gateway),
                not_before: 1000,
                not_after: 100_000,
            })
            .unwrap();
        let m = Messenger::new(
            secret,
            identity.contact(),
            &cred,
            pol.clone(),
            MessengerConfig::default(),
            NOW,
        )
        .unwrap();
        let core = ClientCore::new(identity, ClientConfig::default(), &mut crng);
        (m, core)
    };
    // Intra: ana and al (both A). Inter: ana2 (A) and bo (B, other gateway).
    let runs = [
        vec![make(&a, &pa, "ana", 11, 0), make(&a, &pa, "al", 12, 0)],
        vec![make(&a, &pa, "ana2", 13, 0), make(&b, &pb, "bo", 14, 1)],
    ];
    let start = Instant::now();
    let mut results = Vec::new();
    for (k, mut pair) in runs.into_iter().enumerate() {
        let (mut m0, mut core) = pair.remove(0);
        let (mut m1, _) = pair.remove(0);
        core.set_topology(net.topo.clone(), start);
        // Form the group directly (the joiner's side is not on the wire here).
        let g = m0.create_group(NOW).unwrap();
        let inv = m1.invite().unwrap();
        m0.add_members(&g, &[inv], NOW).unwrap();
        m0.handle_timeout(NOW + 30_000);
        let mut frames: Vec<(Instant, usize)> = Vec::new();
        let mut core_rng = StdRng::seed_from_u64(500 + k as u64);
        let until = start + Duration::from_secs(400);
        let mut next_send = start;
        let mut sent = 0;
        while let Some(t) = core.poll_timeout() {
            if t > until {
                break;
            }
            // The workload: a 600-byte group message every 2 s.
            while next_send <= t {
                let now_ms = NOW + 31_000 + (next_send - start).as_millis() as u64;
                m0.send_group(&g, OPTS, &[7u8; 600], now_ms).unwrap();
                next_send += Duration::from_secs(2);
                sent += 1;
            }
            while let Some(out) = m0.poll_outgoing() {
                core.send_message(&mut core_rng, out.to, &out.bytes)
                    .unwrap();
            }
            core.handle_timeout(t, &mut core_rng);
            while let Some(f) = core.poll_transmit() {
                frames.push((t, f.as_bytes().len()));
            }
        }
        let s = core.stats();
        assert!(sent > 150 && s.real_sent > 100, "run {k}: {s:?}");
        assert_eq!(s.build_failures, 0, "run {k}");
        results.push(frames);
    }
    // One size on the wire.
    for frames in &results {
        assert!(frames.iter().all(|(_, len)| *len == FRAME_SIZE));
    }
    let gaps = |frames: &[(Instant, usize)]| -> Vec<f64> {
        frames
            .windows(2)
            .map(|p| (p[1].0 - p[0].0).as_secs_f64())
            .collect()
    };
    let mut intra = gaps(&results[0]);
    let mut inter = gaps(&results[1]);
    let total = rates.0 + rates.1 + rates.2;
    // Each is Poisson at the configured total rate (1% KS critical value)...
    for g in [&mut intra, &mut inter] {
        let n = g.len() as f64;
        assert!(n > 1000.0, "{n} gaps");
        let d = ks_exp(g, total);
        assert!(d < 1.63 / n.sqrt(), "KS vs Exp: {d}, n {n}");
    }
    // ...and the two workloads' gaps are indistinguishable (two-sample KS, 1%).
    let d = ks_two_sample(&mut intra, &mut inter);
    let (n, m) = (intra.len() as f64, inter.len() as f64);
    assert!(d < 1.63 * ((n + m) / (n * m)).sqrt(), "two-sample KS {d}");
}

/// Kolmogorov-Smirnov statistic of `samples` against Exp(`rate`).
fn ks_exp(samples: &mut [f64], rate: f64) -> f64 {
    samples.sort_by(f64::total_cmp);
    let n = samples.len() as f64;
    samples.iter().enumerate().fold(0.0, |d: f64, (i, x)| {
        let cdf = 1.0 - (-rate * x).exp();
        d.max((cdf - i as f64 / n).abs())
            .max(((i + 1) as f64 / n - cdf).abs())
    })
}

/// Two-sample Kolmogorov-Smirnov statistic.
fn ks_two_sample(a: &mut [f64], b: &mut [f64]) -> f64 {
    a.sort_by(f64::total_cmp);
    b.sort_by(f64::total_cmp);
    let (mut i, mut j, mut d) = (0, 0, 0.0f64);
    while i < a.len() && j < b.len() {
        let x = a[i].min(b[j]);
        while i < a.len() && a[i] <= x {
            i += 1;
        }
        while j < b.len() && b[j] <= x {
            j += 1;
        }
        d = d.max((i as f64 / a.len() as f64 - j as f64 / b.len() as f64).abs());
    }
    d
}

/// The replay set stays bounded: beyond its capacity the oldest ids go and the floor
/// rises to them, so an evicted id's message is still refused (as too old).
#[test]
fn replay_set_is_bounded_and_evicted_ids_stay_refused() {
    let mut r = ReplaySet::default();
    let sender = [1u8; 32];
    let now = REPLAY_WINDOW_MS * 2;
    let id = |i: usize| {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&(i as u64).to_be_bytes());
        b
    };
    let base = now - REPLAY_WINDOW_MS / 2;
    for i in 0..MAX_REPLAY_ENTRIES + 10 {
        assert!(r.check_and_insert(&sender, &id(i), base + i as u64, now));
    }
    assert_eq!(r.entries.len(), MAX_REPLAY_ENTRIES);
    assert!(
        !r.check_and_insert(&sender, &id(0), base, now),
        "evicted, below the floor"
    );
    assert!(
        !r.check_and_insert(&sender, &id(20), base + 20, now),
        "remembered"
    );
    assert!(
        !r.check_and_insert(&sender, &id(999_999), now - REPLAY_WINDOW_MS, now),
        "too old"
    );
    assert!(
        !r.check_and_insert(&sender, &id(999_998), now + MAX_FUTURE_MS + 1, now),
        "too far ahead"
    );
    assert!(
        r.check_and_insert(&[2; 32], &id(20), base + 20, now),
        "another sender's id"
    );
}

// Regression (issue 18 #2): a plain message (from `shoal client send` without a member
// card) was acked at the gateway and then dropped as malformed, unseen. It is kept,
// flagged unverified; a damaged or forged envelope is dropped but the user is told.
#[test]
fn plain_messages_are_kept_unverified_and_drops_are_reported() {
    let World { mut ms, .. } = world();
    ms[0].handle_incoming(b"hello from a plain client", NOW);
    let got = ms[0].peek().to_vec();
    assert_eq!(got.len(), 1);
    assert!(got[0].unverified);
    assert_eq!(got[0].body, b"hello from a plain client");
    assert_eq!(got[0].from_key, Hex32([0; 32]));
    assert_eq!(ms[0].stats().unverified_received, 1);
    assert!(events(&mut ms[0]).iter().any(|e| matches!(
        e,
        MessengerEvent::Message { body, .. } if body == b"hello from a plain client"
    )));
    // A damaged envelope: dropped, counted and reported.
    ms[0].handle_incoming(b"SM\x00\x02\x01garbage", NOW);
    assert_eq!(ms[0].peek().len(), 1);
    assert_eq!(ms[0].stats().malformed, 1);
    assert!(
        events(&mut ms[0])
            .iter()
            .any(|e| matches!(e, MessengerEvent::Dropped { .. }))
    );
    // Kept across a restart like any message.
    let snap = ms[0].snapshot().unwrap();
    let back = Messenger::restore(&snap, NOW).unwrap();
    assert!(back.peek()[0].unverified);
    // A flood of them (anyone with the card can send them) never evicts a verified
    // message: they are capped among themselves.
    let ana = cred(&ms, 0);
    ms[1].send_direct(&ana, OPTS, b"verified", NOW).unwrap();
    deliver(&mut ms, NOW);
    for i in 0..(MAX_UNVERIFIED + 50) {
        ms[0].handle_incoming(format!("spam {i}").as_bytes(), NOW);
    }
    let inbox = ms[0].peek();
    assert_eq!(
        inbox.iter().filter(|m| m.unverified).count(),
        MAX_UNVERIFIED
    );
    assert!(inbox.iter().any(|m| m.body == b"verified"));
}

// Issue 18 #1: every envelope of a send carries that send's id, and only those.
#[test]
fn sends_tag_their_own_envelopes() {
    let World { mut ms, .. } = world();
    let g = form_group(&mut ms, &[1, 3], NOW);
    let now = NOW + 2 * SETTLE;
    while ms[0].poll_outgoing().is_some() {}
    let al = cred(&ms, 1);
    let a = ms[0].send_direct(&al, OPTS, b"one", now).unwrap();
    let b = ms[0].send_group(&g, OPTS, b"two", now).unwrap();
    assert_ne!(a.id, b.id);
    assert_eq!((a.envelopes, b.envelopes), (1, 2));
    let tags: Vec<Option<SendId>> = std::iter::from_fn(|| ms[0].poll_outgoing())
        .map(|o| o.send)
        .collect();
    assert_eq!(tags, [Some(a.id), Some(b.id), Some(b.id)]);
    // Protocol traffic carries none.
    ms[0].send_invite(&al, now).unwrap();
    assert_eq!(ms[0].poll_outgoing().unwrap().send, None);
}

// Regression (issue 18 #8): own messages vanished when the chat restarted. They are
// kept in the state (with the driver's ids of their copies and their last mark) until
// their TTL runs out; burn-on-read ones leave no copy.
#[test]
fn own_messages_survive_a_restart_until_they_expire() {
    let World { mut ms, .. } = world();
    let al = cred(&ms, 1);
    let t = ms[0].send_direct(&al, OPTS, b"kept", NOW).unwrap();
    let burn = MessageOptions {
        ttl_secs: 60,
        burn_on_read: true,
    };
    ms[0].send_direct(&al, burn, b"not kept", NOW).unwrap();
    ms[0].note_envelope(t.id, [5; 16]);
    ms[0].note_own_state(t.id, OwnState::Sent);
    let back = Messenger::restore(&ms[0].snapshot().unwrap(), NOW + 1).unwrap();
    let own = back.own_messages();
    assert_eq!(own.len(), 1);
    assert_eq!(own[0].body, b"kept");
    assert_eq!(own[0].id, t.id);
    assert_eq!(own[0].message_ids, [[5; 16]]);
    assert_eq!(own[0].state, OwnState::Sent);
    assert_eq!(
        own[0].to,
        OwnTo::Direct {
            subnet: al.subnet(),
            key: Hex32(al.identity_key())
        }
    );
    // Send ids stay unique across the restart.
    let mut back = back;
    let next = back.send_direct(&al, OPTS, b"after", NOW + 2).unwrap();
    assert!(next.id > t.id);
    // Gone with their TTL.
    let later = NOW + OPTS.ttl_secs * 1000 + 10;
    back.handle_timeout(later);
    assert!(back.own_messages().is_empty());
}

/// Review finding: a federated admin grinds a subnet id whose shown prefix equals a
/// contact's subnet (about 2^32 tries) and mints the same handle. Keyed only by what is
/// shown, its messages landed in the real contact's conversation with no alert. The
/// look-alike is now pinned as a key change of the name it imitates.
#[test]
fn rogue_look_alike_subnet_prefix_is_flagged_as_a_key_change() {
    let mut w = world();
    let real = cred(&w.ms, 3);
    // The real "bo" is pinned first, under a subnet that differs from the look-alike's
    // only past the shown prefix (as ground), with another key.
    let mut ground = real.subnet();
    ground.0[31] ^= 1;
    let mut pinned = PinnedContact {
        subnet: ground,
        identity_key: Hex32([0x77; 32]),
        handle: real.handle().to_string(),
        confirmed: true,
        replaces: None,
        card: Vec::new(),
        first_seen_ms: 0,
    };
    assert_eq!(
        pinned.display(),
        display_name(real.handle(), &real.subnet())
    );
    let ana = &mut w.ms[0];
    ana.contacts.push(pinned.clone());
    assert!(
        ana.observe(&real, 1),
        "a look-alike name must raise an alert"
    );
    assert!(
        events(ana)
            .iter()
            .any(|e| matches!(e, MessengerEvent::KeyChanged { .. }))
    );
    // A different shown name is no key change.
    let ana = &mut w.ms[0];
    ana.contacts.clear();
    pinned.handle = "someone-else".into();
    ana.contacts.push(pinned);
    assert!(!ana.observe(&real, 2));
}

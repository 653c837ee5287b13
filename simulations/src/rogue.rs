//! Attacks on the client↔gateway mailbox path, played on the production cores (the
//! gateway's `Mailbox`, the client's `ClientCore` and `ClientStore`) in virtual time.
//! Part of the `rogue` suite (`cargo test --workspace --lib -- rogue`).

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rand::SeedableRng;
use rand::rngs::StdRng;
use shoal_client::{ClientConfig, ClientCore, ClientStore, Event, Identity, seal};
use shoal_gateway::mailbox::{Committed, Mailbox, MailboxConfig, PullItem, Salt};
use shoal_packet::fragment::{FRAGMENT_DATA_SIZE, fragment};
use shoal_packet::payload::{AckSlot, join_plaintext};
use shoal_packet::replay::ReplayFilter;
use shoal_packet::sphinx::{Hop, Unwrapped, build_forward, generate_key, unwrap};
use shoal_packet::{BodyKind, Fragment, MessageId};
use x25519_dalek::StaticSecret;

const ACCOUNT: [u8; 32] = [0xa2; 32];

/// A one-hop network to the victim's gateway: turns inner bodies for the victim into
/// the Sphinx payloads its gateway stores, exactly as the exit hop unwraps them.
struct Exit {
    rng: StdRng,
    hop: Hop,
    secret: StaticSecret,
    filter: ReplayFilter,
}

impl Exit {
    fn new() -> Self {
        let mut rng = StdRng::seed_from_u64(7);
        let (secret, key) = generate_key(&mut rng);
        Exit {
            rng,
            hop: Hop {
                address: [0xee; 32],
                sphinx_key: key,
            },
            secret,
            filter: ReplayFilter::new(0, 1 << 16),
        }
    }

    /// What the gateway stores for a fragment sealed to `to` (no ack slot: a λD-like
    /// all-zero SURB, which the gateway ignores).
    fn payload(&mut self, to: &Identity, f: &Fragment) -> ([u8; 16], Vec<u8>) {
        let sealed = seal::seal(&mut self.rng, &to.public_key(), &f.encode()).unwrap();
        let slot = AckSlot {
            surb: [0; shoal_packet::sphinx::SURB_SIZE],
            message: [0; shoal_packet::payload::ACK_MESSAGE_SIZE],
        };
        let plaintext = join_plaintext(&slot, &sealed).unwrap();
        let (fwd, _) = build_forward(
            &mut self.rng,
            std::slice::from_ref(&self.hop),
            &[Duration::ZERO],
            &to.mailbox,
            &plaintext,
        )
        .unwrap();
        match unwrap(&self.secret, 0, &self.filter, &fwd.packet).unwrap() {
            Unwrapped::Final {
                surb_id, payload, ..
            } => (surb_id, payload),
            Unwrapped::Forward { .. } => panic!("one-hop route"),
        }
    }
}

fn at(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
}

fn commit(m: &mut Mailbox) {
    while let Some(b) = m.poll_write() {
        let _ = m.on_committed(Committed::dangerously_assume_durable(&b));
    }
}

/// How the client acks what a pull answer carried.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum AckRule {
    /// Today's driver: everything, once the answer (completed messages and fragments of
    /// incomplete ones) is durable in the store.
    AllOnceDurable,
    /// The old driver: fragments of messages still incomplete are held unacked (they
    /// were not persisted), so the gateway offers them again after its redelivery
    /// timeout. The control that shows the attack works.
    HoldIncomplete,
}

/// Hole 11: anyone who knows a user's card fills its mailbox with first fragments of
/// messages that never complete, `pull_batch × redelivery / pull interval` of them
/// (480 at the defaults), then a real message arrives. Pull once a second and
/// return the number of pulls until the real message is received.
fn junk_flood(rule: AckRule, max_pulls: u64) -> Option<u64> {
    let cfg = MailboxConfig::default();
    let pull_every = Duration::from_secs(1);
    let junk = cfg.pull_batch as u64 * cfg.redelivery_timeout.as_secs() / pull_every.as_secs();
    let mut gw = Mailbox::new(cfg, Salt::from_bytes([7; 32])).unwrap();
    let mut rng = StdRng::seed_from_u64(1);
    let victim = Identity::generate(&mut rng, [0xee; 32]);
    gw.create_account(&victim.mailbox, ACCOUNT, 100_000)
        .unwrap();
    commit(&mut gw);
    let mut exit = Exit::new();
    let mut payloads = std::collections::HashMap::new();
    let mut stored = |gw: &mut Mailbox, f: Fragment, exit: &mut Exit| {
        let (surb_id, payload) = exit.payload(&victim, &f);
        if let shoal_gateway::mailbox::DeliverOutcome::Accepted { id, .. } =
            gw.deliver(&victim.mailbox, surb_id, &payload, at(0))
        {
            payloads.insert(id, (surb_id, payload));
        }
    };
    for i in 0..junk {
        let mut id: MessageId = [0; 16];
        id[..8].copy_from_slice(&i.to_be_bytes());
        // Every size the header allows, the largest too: nothing is allocated for it.
        let count = if i % 2 == 0 { 2 } else { u16::MAX };
        let f = Fragment {
            kind: BodyKind::Real,
            header: shoal_packet::FragmentHeader {
                message_id: id,
                index: 0,
                count,
                len: FRAGMENT_DATA_SIZE as u16,
            },
            data: vec![0x6a; FRAGMENT_DATA_SIZE],
        };
        stored(&mut gw, f, &mut exit);
    }
    let real: MessageId = [0x11; 16];
    for f in fragment(real, b"the real message").unwrap() {
        stored(&mut gw, f, &mut exit);
    }
    commit(&mut gw);

    let mut core = ClientCore::new(victim.clone(), ClientConfig::default(), &mut rng);
    let store = ClientStore::in_memory().unwrap();
    let t0 = Instant::now();
    for pull in 1..=max_pulls {
        let now = at(pull);
        let plan = gw.pull(&ACCOUNT, now).unwrap();
        let mut ids = Vec::new();
        for item in plan.items() {
            let PullItem::Real { id, .. } = *item else {
                continue;
            };
            let (surb_id, payload) = &payloads[&id];
            core.handle_mailbox_item(*surb_id, payload, t0 + Duration::from_secs(pull));
            if rule == AckRule::AllOnceDurable || !of_multi_fragment_message(&victim, payload) {
                ids.push(id);
            }
        }
        let mut got = false;
        let mut messages = Vec::new();
        while let Some(e) = core.poll_event() {
            if let Event::Message {
                message_id, bytes, ..
            } = e
            {
                got |= message_id == real;
                messages.push(shoal_client::ReceivedMessage {
                    message_id,
                    received_unix_ms: pull * 1000,
                    bytes,
                });
            }
        }
        // Acked only once durable, as the driver does.
        store
            .save_received(&messages, &core.take_partial_ops(), &core.snapshot())
            .unwrap();
        gw.ack(&ACCOUNT, &ids).unwrap();
        commit(&mut gw);
        if got {
            return Some(pull);
        }
    }
    None
}

/// What the old driver checked before holding an item back (`multi_fragment_of`).
fn of_multi_fragment_message(to: &Identity, payload: &[u8]) -> bool {
    let Ok(plaintext) = shoal_packet::sphinx::open_forward(payload) else {
        return false;
    };
    let Ok((_, sealed)) = shoal_packet::payload::split_plaintext(&plaintext) else {
        return false;
    };
    seal::open(&to.secret, sealed)
        .ok()
        .and_then(|b| Fragment::decode(&b).ok())
        .is_some_and(|f| f.header.count > 1)
}

#[test]
fn rogue_junk_fragment_flood_does_not_block_real_mail() {
    // Every item is acked once durable: the junk costs one pull slot each, once.
    let pulls = junk_flood(AckRule::AllOnceDurable, 120).expect("the real message arrives");
    println!("the real message arrived with pull {pulls}");
    assert!(pulls <= 32, "after the junk ahead of it: {pulls} pulls");
}

/// The control: with incomplete fragments held unacked (the old rule), the same flood
/// keeps every pull full of re-offered junk and the real message never arrives.
#[test]
fn rogue_junk_fragment_flood_blocks_real_mail_under_the_old_rule() {
    assert_eq!(junk_flood(AckRule::HoldIncomplete, 600), None);
}

/// Everything a gateway is given or keeps while a small subnet lives through it: the
/// admin's commands (as signed bytes), what it stores for each message (the payloads
/// its exit hop unwraps), the link keys clients pull with, the usage report it sends,
/// and its database file. And what it must not be able to name: each member's
/// identity key and handle.
struct GatewayView {
    seen: Vec<(&'static str, Vec<u8>)>,
    identity_keys: Vec<[u8; 32]>,
    handles: Vec<&'static str>,
}

impl GatewayView {
    /// Where the gateway's view names a member (an identity key, raw or hex, or a
    /// handle), by the kind of thing it was found in.
    fn linked(&self) -> Vec<&'static str> {
        let has = |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).any(|w| w == needle);
        let mut found: Vec<&'static str> = self
            .seen
            .iter()
            .filter(|(_, bytes)| {
                self.identity_keys
                    .iter()
                    .any(|k| has(bytes, k) || has(bytes, hex::encode(k).as_bytes()))
                    || self.handles.iter().any(|h| has(bytes, h.as_bytes()))
            })
            .map(|(what, _)| *what)
            .collect();
        found.sort();
        found.dedup();
        found
    }
}

/// Hole 5: a subnet of two members, made as `shoal client init` and `shoal admin`
/// make them (`MemberKeys`, credentials naming the identity key, accounts created by
/// signed commands naming the link key), form a group, talk in it and directly; then
/// the admin asks for usage and de-provisions one of them. `one_key` gives each member
/// the old single key for link and identity.
fn gateway_view(one_key: bool) -> GatewayView {
    use shoal_client::MemberKeys;
    use shoal_client::messenger::{Messenger, MessengerConfig, Outgoing};
    use shoal_gateway::remote_admin::check_command;
    use shoal_gateway::{Store, StoreConfig};
    use shoal_subnet::{
        AccountAction, BurnOnRead, CommandBody, CredentialBody, MessageOptions, Policy, PolicyBody,
        RoleRule, SubnetAdmin,
    };
    use shoal_topology::Hex32;

    const GW: [u8; 32] = [0x9a; 32];
    const NOW: u64 = 1_700_000_000;
    let opts = MessageOptions {
        ttl_secs: 3600,
        burn_on_read: false,
    };
    let mut rng = StdRng::seed_from_u64(5);
    let admin = SubnetAdmin::from_secret([0xad; 32]);
    let policy = |version: u64, revoked: Vec<Hex32>| {
        let body = PolicyBody {
            subnet: admin.subnet(),
            version,
            issued_at: NOW,
            roles: vec!["member".into()],
            rules: vec![RoleRule {
                from: "member".into(),
                to: "member".into(),
            }],
            federation: vec![],
            ttl_min_secs: 0,
            ttl_max_secs: 86_400,
            burn_on_read: BurnOnRead::Allowed,
            revoked_keys: revoked,
            revoked_handles: vec![],
        };
        Policy::verify(
            &admin.issue_policy(body).unwrap().to_bytes(),
            &admin.subnet(),
        )
        .unwrap()
    };
    let v1 = policy(1, vec![]);
    let handles = ["ana-of-acme", "bob-of-acme"];
    let keys: Vec<MemberKeys> = handles
        .iter()
        .map(|_| {
            let k = MemberKeys::generate(&mut rng, GW);
            if one_key {
                k.dangerously_one_key_for_everything()
            } else {
                k
            }
        })
        .collect();
    let mut members: Vec<Messenger> = handles
        .iter()
        .zip(&keys)
        .map(|(h, k)| {
            let cred = admin
                .issue_credential(CredentialBody {
                    subnet: admin.subnet(),
                    handle: (*h).into(),
                    role: "member".into(),
                    signing_key: Hex32(k.identity_key()),
                    seal_key: Hex32(k.identity.public_key().to_bytes()),
                    mailbox: Hex32(k.identity.mailbox),
                    gateway: Hex32(GW),
                    not_before: NOW - 60,
                    not_after: NOW + 86_400,
                })
                .unwrap();
            Messenger::new(
                k.signing.to_bytes(),
                k.identity.contact(),
                &cred,
                v1.clone(),
                MessengerConfig {
                    groups: shoal_client::group::GroupConfig {
                        commit_settle_ms: 1000,
                    },
                    ..MessengerConfig::default()
                },
                NOW * 1000,
            )
            .unwrap()
        })
        .collect();

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.redb");
    let (store, rec) = Store::open(&path, &StoreConfig::default(), &mut rng).unwrap();
    let mut gw = Mailbox::restore(MailboxConfig::default(), rec).unwrap();
    let flush = |gw: &mut Mailbox| {
        while let Some(b) = gw.poll_write() {
            let _ = gw.on_committed(store.commit(b).unwrap());
        }
    };
    let at_unix = |t: u64| UNIX_EPOCH + Duration::from_secs(t);
    let mut seen: Vec<(&'static str, Vec<u8>)> = Vec::new();
    let mut sequence = 0;
    let mut command = |gw: &mut Mailbox, seen: &mut Vec<_>, action: AccountAction, t: u64| {
        sequence += 1;
        let bytes = admin
            .issue_command(CommandBody {
                subnet: admin.subnet(),
                gateway: Hex32(GW),
                sequence,
                expires_at: NOW + t + 300,
                action,
            })
            .unwrap()
            .to_bytes();
        seen.push(("an admin command", bytes.clone()));
        let checked = check_command(&bytes, &[admin.subnet()]).unwrap();
        gw.apply_admin(checked, &Hex32(GW), at_unix(NOW + t))
            .unwrap()
    };
    for k in &keys {
        command(
            &mut gw,
            &mut seen,
            AccountAction::CreateAccount {
                account: Hex32(k.account_key()),
                mailbox: Hex32(k.identity.mailbox),
                quota: 10_000,
            },
            0,
        );
    }

    // Members' traffic, as their gateway gets it: each message fragmented, each
    // fragment sealed to its recipient and unwrapped by the exit hop into its mailbox.
    let mut exit = Exit::new();
    let mut next_id = 0u64;
    let mut carry = |members: &mut Vec<Messenger>, gw: &mut Mailbox, seen: &mut Vec<_>, t: u64| {
        for from in 0..members.len() {
            let outs: Vec<Outgoing> =
                std::iter::from_fn(|| members[from].poll_outgoing()).collect();
            for o in outs {
                let to = keys
                    .iter()
                    .position(|k| k.identity.mailbox == o.to.mailbox)
                    .expect("to a member");
                next_id += 1;
                let mut id: MessageId = [0; 16];
                id[..8].copy_from_slice(&next_id.to_be_bytes());
                for f in fragment(id, &o.bytes).unwrap() {
                    let (surb_id, payload) = exit.payload(&keys[to].identity, &f);
                    gw.deliver(&o.to.mailbox, surb_id, &payload, at_unix(NOW + t));
                    seen.push(("a stored message payload", payload));
                }
                members[to].handle_incoming(&o.bytes, (NOW + t) * 1000);
            }
        }
        for m in members.iter_mut() {
            m.handle_timeout((NOW + t + 1) * 1000);
        }
    };
    let g = members[0].create_group(NOW * 1000).unwrap();
    let invite = members[1].invite().unwrap();
    members[0].add_members(&g, &[invite], NOW * 1000).unwrap();
    for t in 0..4 {
        carry(&mut members, &mut gw, &mut seen, t);
    }
    assert_eq!(members[1].groups().len(), 1, "the group formed");
    members[1]
        .send_group(&g, opts, b"hello group", (NOW + 5) * 1000)
        .unwrap();
    let ana_card = members[0].card().clone();
    members[1]
        .send_direct(&ana_card, opts, b"hello ana", (NOW + 5) * 1000)
        .unwrap();
    carry(&mut members, &mut gw, &mut seen, 5);
    flush(&mut gw);

    // Clients pull over links keyed by their link key.
    for k in &keys {
        seen.push(("a link key", k.account_key().to_vec()));
        let plan = gw.pull(&k.account.verifying_key().to_bytes(), at_unix(NOW + 6));
        assert!(plan.is_ok(), "the account is there");
    }
    // The admin asks for usage and de-provisions bob: members get a policy revoking
    // bob's identity key, the gateway only his link key.
    let usage = command(&mut gw, &mut seen, AccountAction::AccountUsage, 7);
    seen.push((
        "the usage report",
        usage.usage.expect("answered").encode(usize::MAX),
    ));
    let v2 = policy(2, vec![Hex32(keys[1].identity_key())]);
    command(
        &mut gw,
        &mut seen,
        AccountAction::Deprovision {
            account: Hex32(keys[1].account_key()),
        },
        8,
    );
    command(
        &mut gw,
        &mut seen,
        AccountAction::publish_policy(&v2, vec![Hex32(keys[1].account_key())]),
        9,
    );
    flush(&mut gw);
    store.close().unwrap();
    seen.push(("its database", std::fs::read(&path).unwrap()));
    GatewayView {
        seen,
        identity_keys: keys.iter().map(MemberKeys::identity_key).collect(),
        handles: handles.to_vec(),
    }
}

/// Hole 5: nothing a gateway is given or keeps (commands, stored payloads, link keys,
/// usage reports, its database) holds a member's identity key or handle, so it cannot
/// tie an account to a member.
#[test]
fn rogue_gateway_view_holds_no_member_identity_key() {
    let view = gateway_view(false);
    let mut kinds: Vec<&str> = view.seen.iter().map(|(what, _)| *what).collect();
    kinds.sort();
    kinds.dedup();
    assert_eq!(
        kinds,
        [
            "a link key",
            "a stored message payload",
            "an admin command",
            "its database",
            "the usage report"
        ],
        "the gateway saw the subnet's life"
    );
    let payloads = view
        .seen
        .iter()
        .filter(|(what, _)| *what == "a stored message payload")
        .count();
    println!(
        "{} things seen, {payloads} stored payloads",
        view.seen.len()
    );
    assert!(
        payloads >= 4,
        "a welcome, a commit, a group and a direct message"
    );
    assert_eq!(view.linked(), Vec::<&str>::new());
}

/// The control: with one key for link and identity (the old default), the same view
/// names every member's identity key: in the account commands, the link keys and the
/// database.
#[test]
fn rogue_gateway_links_accounts_to_members_with_one_key() {
    let linked = gateway_view(true).linked();
    println!("the gateway names members in: {linked:?}");
    for what in ["an admin command", "a link key", "its database"] {
        assert!(linked.contains(&what), "{what}: {linked:?}");
    }
}

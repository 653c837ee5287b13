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

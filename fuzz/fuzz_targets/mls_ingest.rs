#![no_main]
//! MLS ingestion as the client does it from the network: `Messenger::handle_incoming`
//! (envelope, then Welcome, commit, proposal or application message through the group
//! manager), then the settle timer, which ranks the held commits by their claims and
//! opens them. Real messages of a small group are the templates that the input
//! mutates, so the fuzzer gets past the framing; the first input byte picks the
//! template (or raw bytes, as an envelope and as bare MLS), the rest are edits.
//!
//! The group's keys come from openmls's own OS-seeded RNG, so they differ per process:
//! a crash found here may need the whole run's log to reproduce, not only the input.
use std::cell::RefCell;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use shoal_client::Contact;
use shoal_client::group::GroupConfig;
use shoal_client::messenger::{Envelope, Messenger, MessengerConfig, MessengerSnapshot};
use shoal_subnet::{
    BurnOnRead, CredentialBody, MessageOptions, Policy, PolicyBody, RoleRule, SubnetAdmin,
};
use shoal_topology::Hex32;

const NOW: u64 = 1_700_000_000_000;
const SETTLE: u64 = 1_000;
const OPTS: MessageOptions = MessageOptions {
    ttl_secs: 3600,
    burn_on_read: false,
};

struct World {
    /// Bob before the Welcome, and once in the group.
    fresh: MessengerSnapshot,
    joined: MessengerSnapshot,
    /// (needs the joined state, bytes as they reach bob)
    templates: Vec<(bool, Vec<u8>)>,
}

fn own(seed: u8) -> Contact {
    Contact {
        mailbox: [seed; 32],
        gateway: [9; 32],
        public_key: x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from([seed; 32]))
            .to_bytes(),
    }
}

fn member(admin: &SubnetAdmin, policy: &Policy, handle: &str, seed: u8) -> Messenger {
    let key = ed25519_dalek::SigningKey::from_bytes(&[seed; 32]);
    let addr = own(seed);
    let cred = admin
        .issue_credential(CredentialBody {
            subnet: admin.subnet(),
            handle: handle.into(),
            role: "staff".into(),
            signing_key: Hex32(key.verifying_key().to_bytes()),
            seal_key: Hex32(addr.public_key),
            mailbox: Hex32(addr.mailbox),
            gateway: Hex32(addr.gateway),
            not_before: 0,
            not_after: u64::MAX / 2,
        })
        .expect("credential");
    let config = MessengerConfig {
        groups: GroupConfig {
            commit_settle_ms: SETTLE,
        },
        ..MessengerConfig::default()
    };
    Messenger::new([seed; 32], addr, &cred, policy.clone(), config, NOW).expect("messenger")
}

/// Everything `from` queued for `to`'s address, delivered, and returned.
fn deliver(from: &mut Messenger, to: &mut Messenger, now: u64) -> Vec<Vec<u8>> {
    let addr = shoal_client::group::contact_of(to.card());
    let mut got = Vec::new();
    while let Some(out) = from.poll_outgoing() {
        if out.to == addr {
            to.handle_incoming(&out.bytes, now);
            got.push(out.bytes);
        }
    }
    got
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let admin = SubnetAdmin::from_secret([0xa1; 32]);
        let body = PolicyBody {
            subnet: admin.subnet(),
            version: 1,
            issued_at: 0,
            roles: vec!["staff".into()],
            rules: vec![RoleRule {
                from: "staff".into(),
                to: "staff".into(),
            }],
            federation: vec![],
            ttl_min_secs: 60,
            ttl_max_secs: 86_400,
            burn_on_read: BurnOnRead::Allowed,
            revoked_keys: vec![],
            revoked_handles: vec![],
        };
        let signed = admin.issue_policy(body).expect("policy");
        let policy = Policy::verify(&signed.to_bytes(), &admin.subnet()).expect("policy");
        let mut ana = member(&admin, &policy, "ana", 1);
        let mut bob = member(&admin, &policy, "bob", 2);
        let mut cy = member(&admin, &policy, "cy", 3);
        let invites = vec![bob.invite().expect("invite"), cy.invite().expect("invite")];
        let fresh = bob.snapshot().expect("snapshot");
        let g = ana.create_group(NOW).expect("group");
        ana.add_members(&g, &invites, NOW).expect("add");
        ana.handle_timeout(NOW + SETTLE);
        let mut templates = Vec::new();
        // ana's queue holds both Welcome copies: deliver each to its member.
        let outs: Vec<_> = std::iter::from_fn(|| ana.poll_outgoing()).collect();
        for out in outs {
            if out.to == shoal_client::group::contact_of(bob.card()) {
                bob.handle_incoming(&out.bytes, NOW + SETTLE);
                templates.push((false, out.bytes));
            } else if out.to == shoal_client::group::contact_of(cy.card()) {
                cy.handle_incoming(&out.bytes, NOW + SETTLE);
            }
        }
        let joined = bob.snapshot().expect("snapshot");
        let t = NOW + 2 * SETTLE;
        ana.send_group(&g, OPTS, b"hello", t).expect("send");
        templates.extend(
            deliver(&mut ana, &mut bob, t)
                .into_iter()
                .map(|b| (true, b)),
        );
        ana.self_update(&g, t).expect("update");
        templates.extend(
            deliver(&mut ana, &mut bob, t)
                .into_iter()
                .map(|b| (true, b)),
        );
        cy.leave(&g, t).expect("leave");
        templates.extend(deliver(&mut cy, &mut bob, t).into_iter().map(|b| (true, b)));
        let bob_card = bob.card().clone();
        ana.send_direct(&bob_card, OPTS, b"direct", t)
            .expect("direct");
        templates.extend(
            deliver(&mut ana, &mut bob, t)
                .into_iter()
                .map(|b| (true, b)),
        );
        assert!(
            templates.len() >= 5,
            "every template made: {}",
            templates.len()
        );
        World {
            fresh,
            joined,
            templates,
        }
    })
}

/// Applies 4-byte edits: position (2), operation (1), value (1).
fn mutate(template: &[u8], edits: &[u8]) -> Vec<u8> {
    let mut out = template.to_vec();
    for op in edits.chunks_exact(4) {
        let pos = usize::from(u16::from_be_bytes([op[0], op[1]]));
        match op[2] % 4 {
            0 if !out.is_empty() => {
                let i = pos % out.len();
                out[i] ^= op[3].max(1);
            }
            1 => out.truncate(pos % (out.len() + 1)),
            2 => {
                let i = pos % (out.len() + 1);
                out.insert(i, op[3]);
            }
            3 if !out.is_empty() => {
                let i = pos % out.len();
                out.remove(i);
            }
            _ => {}
        }
    }
    out
}

/// Inputs one restored bob takes before he is restored again.
const REUSE: u32 = 256;

thread_local! {
    /// Bob restored from each snapshot (fresh, joined) and the inputs he took since.
    /// Restoring costs far more than an input (about a second under the sanitizer), so
    /// he is reused, state and all, unless he dropped out of the group.
    static BOBS: RefCell<[(Option<Messenger>, u32); 2]> = const { RefCell::new([(None, 0), (None, 0)]) };
}

fn ingest(joined: bool, bytes: &[&[u8]]) {
    let w = world();
    let t = NOW + 3 * SETTLE;
    BOBS.with(|bobs| {
        let mut bobs = bobs.borrow_mut();
        let (slot, uses) = &mut bobs[usize::from(joined)];
        if slot.is_none() || *uses >= REUSE {
            let snapshot = if joined { &w.joined } else { &w.fresh };
            *slot = Messenger::restore(snapshot, t).ok();
            *uses = 0;
        }
        *uses += 1;
        let Some(bob) = slot.as_mut() else {
            return;
        };
        for b in bytes {
            bob.handle_incoming(b, t);
        }
        bob.handle_timeout(t + 10 * SETTLE);
        while bob.poll_event().is_some() {}
        while bob.poll_outgoing().is_some() {}
        // Out of the group (or, fresh, in one): nothing more to learn from him.
        if bob.groups().is_empty() == joined {
            *slot = None;
        }
    });
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let w = world();
    let pick = usize::from(pick) % (w.templates.len() + 1);
    if let Some((joined, template)) = w.templates.get(pick) {
        let bytes = mutate(template, rest);
        ingest(*joined, &[&bytes]);
    } else {
        let wrapped = Envelope::Mls(rest.to_vec()).encode();
        ingest(true, &[rest, &wrapped]);
        ingest(false, &[&wrapped]);
    }
});

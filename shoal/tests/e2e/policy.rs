//! Policy reaches members through the mixnet, with the real CLI only (issue 17 hole 4).
//! Alice, Bob and Carol of one subnet share a group; the admin's own client (a `shoal
//! client run` like any other, set up by `start_subnet`) carries gateway commands and
//! policy updates. `shoal admin deprovision carol` sends the de-provisioning and the new
//! policy to Carol's gateway through that client and the mixnet (and waits for the
//! gateway's signed answers), and queues policy v2 for every other member in the same
//! client's outbox; it sends them as ordinary messages; Alice's and Bob's running clients check and apply it and remove
//! Carol from the group at their next commit; a group message sent afterwards goes to
//! Alice alone, and Carol's store never gets it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support::cli_net;

use std::time::{Duration, Instant};

use cli_net::{
    ClientDir, field, run_client, shoal, shoal_output, start_subnet, stop, temp_dir, wait_run_line,
};

#[test]
fn deprovisioned_member_is_removed_from_groups_by_the_published_policy() {
    let started = Instant::now();
    let dir = temp_dir("policy");
    let (net, people) = start_subnet(&dir, &[("alice", 0), ("bob", 1), ("carol", 0)]);
    let (alice, bob, carol) = (&people[0], &people[1], &people[2]);
    let d = |c: &ClientDir| c.dir.to_string_lossy().into_owned();
    let (a, b, c) = (d(alice), d(bob), d(carol));
    let admin = dir.join("admin").to_string_lossy().into_owned();

    let card = |dir: &str| {
        shoal(&[
            "client",
            "group",
            "card",
            "--dir",
            dir,
            "--commit-settle-secs",
            "8",
        ])
        .trim()
        .to_string()
    };
    let (_, card_b, card_c) = (card(&a), card(&b), card(&c));
    shoal(&["client", "contact", "add", "--dir", &a, "bob", &card_b]);
    shoal(&["client", "contact", "add", "--dir", &a, "carol", &card_c]);
    shoal(&["client", "group", "create", "--dir", &a, "friends"]);
    let list = shoal(&["client", "group", "list", "--dir", &a]);
    let sub = list.split("alice@").nth(1).expect("alice@subnet")[..8].to_string();
    let id = field(&list, "friends\tid ");
    let id = id.split('\t').next().unwrap().to_string();

    let mut bob_run = run_client(bob);
    let mut carol_run = run_client(carol);
    // Only a running client sends: Alice's takes her invite in.
    let mut alice_run = run_client(alice);
    let out = shoal_output(&[
        "client",
        "group",
        "invite",
        "--dir",
        &a,
        "--wait",
        "--timeout-secs",
        "60",
        "friends",
        "bob",
        "carol",
    ]);
    assert!(
        out.status.success(),
        "invite: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let long = Duration::from_secs(60);
    for p in [bob, carol] {
        wait_run_line(p, "join", long, |l| l == format!("you joined group {id}"));
    }

    // De-provision Carol: cut at her gateway (a command through the mixnet, answered
    // by the gateway), and policy v2 queued for the others.
    let out = shoal(&["admin", "deprovision", "--dir", &admin, "--handle", "carol"]);
    assert!(out.contains("policy v2 revokes its keys"), "{out}");
    // To every gateway that holds a member: the public rule placed them, by key.
    let hosting: std::collections::BTreeSet<usize> = people.iter().map(|p| p.gateway).collect();
    assert!(
        out.contains(&format!("published to {} gateway(s)", hosting.len())),
        "{out}"
    );
    assert!(
        out.contains("queued for 2 member(s) through the mixnet"),
        "alice and bob, not carol: {out}"
    );
    for p in [alice, bob] {
        wait_run_line(p, "policy v2", long, |l| {
            l == "your admin's policy version 2 is in force"
        });
    }
    // Whichever of Alice's and Bob's removal commits wins, both end at epoch 2.
    // (Alice named the group; Bob sees its id.)
    for (p, label) in [(alice, "friends"), (bob, id.as_str())] {
        wait_run_line(p, "carol's removal", long, |l| {
            l == format!("group {label} is at epoch 2")
        });
    }
    stop(&mut alice_run);
    stop(&mut bob_run);
    stop(&mut carol_run);
    for who in [&a, &b] {
        let list = shoal(&["client", "group", "list", "--dir", who]);
        assert!(
            list.contains(&format!("epoch 2\tmembers: alice@{sub}"))
                && list.contains(&format!("bob@{sub}"))
                && !list.contains("carol@"),
            "{list}"
        );
    }

    // A message sent now goes to Alice alone; Carol's store never gets it.
    let after = "carol is no longer with us";
    let mut bob_run = run_client(bob);
    let out = shoal(&[
        "client",
        "group",
        "send",
        "--dir",
        &b,
        "--wait",
        "--timeout-secs",
        "60",
        &id,
        after,
    ]);
    assert!(out.contains("to the mailboxes of 1 members"), "{out}");
    stop(&mut bob_run);
    let mut alice_run = run_client(alice);
    wait_run_line(alice, "the message after the removal", long, |l| {
        l.contains(&format!("bob@{sub}: {after}"))
    });
    stop(&mut alice_run);
    let read = shoal(&["client", "read", "--dir", &c]);
    assert!(!read.contains(after), "{read}");

    drop(net);
    let _ = std::fs::remove_dir_all(&dir);
    println!("policy test took {:?}", started.elapsed());
}

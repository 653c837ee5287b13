//! The client CLI as a person uses it, against a live testnet of real processes:
//! `shoal client init` ×2, the recipient's `shoal client run` in the background, a
//! contact card pasted from `contact show` into `contact add`, `shoal client send`,
//! and `shoal client read` on the recipient.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support::cli_net;

use std::time::{Duration, Instant};

use cli_net::{run_client, run_output, shoal, shoal_output, sigterm, start, temp_dir};

#[test]
fn two_people_exchange_a_message_with_the_cli() {
    let started = Instant::now();
    let dir = temp_dir("client-cli");
    let (net, _gateways, clients) = start(&dir, None, &[("alice", 0), ("bob", 1)]);
    let (alice, bob) = (&clients[0], &clients[1]);
    let alice_dir = alice.dir.to_string_lossy().into_owned();
    let bob_dir = bob.dir.to_string_lossy().into_owned();

    // Bob prints his card; Alice pastes it.
    let card = shoal(&["client", "contact", "show", "--dir", &bob_dir]);
    let card = card.trim();
    assert_eq!(card, bob.card, "contact show prints the card init printed");
    shoal(&["client", "contact", "add", "--dir", &alice_dir, "bob", card]);
    let list = shoal(&["client", "contact", "list", "--dir", &alice_dir]);
    assert!(list.starts_with("bob\t"), "{list}");

    let mut bob_run = run_client(bob);
    let body = "hello bob, this crossed five mixing hops";
    // `send` runs Alice's client until the SURB-ack says the message is durable in
    // Bob's mailbox.
    let out = shoal_output(&[
        "client",
        "send",
        "--dir",
        &alice_dir,
        "--to",
        "bob",
        "--timeout-secs",
        "40",
        body,
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("delivered to bob's mailbox"),
        "send failed: {stdout}\n{}\n--- gateway0 ---\n{}\n--- gateway1 ---\n{}",
        String::from_utf8_lossy(&out.stderr),
        net.log_tail("gateway0"),
        net.log_tail("gateway1"),
    );

    // Bob's running client pulls it and prints it.
    let deadline = Instant::now() + Duration::from_secs(15);
    while !run_output(bob).contains(body) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        run_output(bob).contains(body),
        "bob's client did not print the message: {}\n{}",
        run_output(bob),
        std::fs::read_to_string(bob.dir.join("run.log")).unwrap_or_default()
    );

    // Stopped like Ctrl-C; then `read` opens the store and shows the message.
    sigterm(bob_run.pid());
    let deadline = Instant::now() + Duration::from_secs(10);
    while bob_run.alive() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!bob_run.alive(), "bob's client ignored SIGTERM");
    let read = shoal(&["client", "read", "--dir", &bob_dir]);
    let lines: Vec<&str> = read.lines().filter(|l| l.contains(body)).collect();
    assert_eq!(lines.len(), 1, "exactly one copy: {read}");
    assert!(
        lines[0].starts_with('[') && lines[0].contains(" UTC] "),
        "{read}"
    );

    // Alice received nothing.
    assert_eq!(shoal(&["client", "read", "--dir", &alice_dir]).trim(), "");
    drop(net);
    let _ = std::fs::remove_dir_all(&dir);
    // Printed, not asserted: each step above has its own deadline.
    println!("client_cli took {:?}", started.elapsed());
}

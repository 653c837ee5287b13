//! The client CLI as a person uses it, against a live testnet of real processes:
//! `shoal client init` ×2, the recipient's `shoal client run` in the background, a
//! contact card pasted from `contact show` into `contact add`, `shoal client send`
//! (queued while no client runs, sent by `shoal client start`'s background client),
//! and `shoal client read` on the recipient. And the adversary's view of leak 5:
//! `send` opens no socket; only the long-running client connects.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support::cli_net;

use std::time::{Duration, Instant};

use cli_net::{
    outbox_len, run_client, run_output, shoal, shoal_output, sigterm, start, start_background,
    temp_dir,
};

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
    // No client of Alice's runs: `send` only queues (it never connects).
    let out = shoal(&["client", "send", "--dir", &alice_dir, "--to", "bob", body]);
    assert!(
        out.contains("queued: message to bob; no client is running"),
        "{out}"
    );
    assert_eq!(outbox_len(&alice.dir), 1);
    // Her background client takes it in and sends it; a second `send --wait` returns
    // once the running client has seen the SURB-ack (durable in Bob's mailbox).
    let alice_bg = start_background(&alice.dir);
    let second = "and a second one, waited for";
    let out = shoal_output(&[
        "client",
        "send",
        "--dir",
        &alice_dir,
        "--to",
        "bob",
        "--wait",
        "--timeout-secs",
        "40",
        second,
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("delivered to bob's mailbox"),
        "send failed: {stdout}\n{}\n--- alice ---\n{}\n--- gateway0 ---\n{}\n--- gateway1 ---\n{}",
        String::from_utf8_lossy(&out.stderr),
        alice_bg.log(),
        net.log_tail("gateway0"),
        net.log_tail("gateway1"),
    );
    assert_eq!(outbox_len(&alice.dir), 0, "both taken in");

    // Bob's running client pulls it and prints it.
    let deadline = Instant::now() + Duration::from_secs(15);
    while !(run_output(bob).contains(body) && run_output(bob).contains(second))
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        run_output(bob).contains(body) && run_output(bob).contains(second),
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

    // Alice received nothing (`read` needs the store: stop her client first).
    alice_bg.stop();
    assert_eq!(shoal(&["client", "read", "--dir", &alice_dir]).trim(), "");
    drop(net);
    let _ = std::fs::remove_dir_all(&dir);
    // Printed, not asserted: each step above has its own deadline.
    println!("client_cli took {:?}", started.elapsed());
}

/// Leak 5: an observer of a client's link must not see it come up when its owner
/// sends. The "gateway" here is a UDP socket the test holds, so every datagram the
/// client sends it is seen. With no client running, `send` (and `send --wait`, and a
/// group command) returns having sent nothing: loopback delivers a datagram into the
/// socket's buffer before `sendto` returns, so an empty buffer once the process has
/// exited means none was sent. The control: `shoal client start` connects, and the
/// socket sees it at once; the queued message leaves the outbox for the store.
#[test]
fn sending_with_no_client_running_opens_no_connection() {
    let dir = temp_dir("client-offline");
    let gateway = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    gateway.set_nonblocking(true).unwrap();
    // Any valid Ed25519 point serves as the keys: nothing here is ever reached.
    let key = format!("58{}", "66".repeat(31));
    let init = |name: &str| {
        shoal(&[
            "client",
            "init",
            "--dir",
            &dir.join(name).to_string_lossy(),
            "--gateway",
            &format!("127.0.0.1:9={key}"),
            "--gateway-client-addr",
            &gateway.local_addr().unwrap().to_string(),
            "--authority",
            &format!("127.0.0.1:9={key}"),
            "--name",
            name,
        ])
    };
    init("eve");
    let bob = init("bob");
    let card = bob
        .lines()
        .find_map(|l| l.strip_prefix("contact card: "))
        .unwrap();
    let eve = dir.join("eve");
    let eve_s = eve.to_string_lossy().into_owned();
    shoal(&["client", "contact", "add", "--dir", &eve_s, "bob", card]);
    let nothing_arrived = |what: &str| match gateway.recv_from(&mut [0u8; 2048]) {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("{what} sent a datagram to the gateway: {other:?}"),
    };

    let out = shoal(&["client", "send", "--dir", &eve_s, "--to", "bob", "hi bob"]);
    assert!(
        out.contains("queued: message to bob; no client is running"),
        "{out}"
    );
    nothing_arrived("`client send`");
    let out = shoal_output(&[
        "client",
        "send",
        "--dir",
        &eve_s,
        "--to",
        "bob",
        "--wait",
        "--timeout-secs",
        "1",
        "waited for",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("no client started within 1 s"),
        "{err}"
    );
    nothing_arrived("`client send --wait`");
    let out = shoal_output(&["client", "group", "send", "--dir", &eve_s, "g", "x"]);
    assert!(!out.status.success());
    nothing_arrived("`client group send`");
    assert_eq!(outbox_len(&eve), 2, "both messages wait in the outbox");

    // The control: the long-running client does connect, and takes the queue in.
    let bg = start_background(&eve);
    let mut buf = [0u8; 2048];
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = 0;
    while (seen == 0 || outbox_len(&eve) > 0) && Instant::now() < deadline {
        while gateway.recv_from(&mut buf).is_ok() {
            seen += 1;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(seen > 0, "the running client never tried its gateway");
    assert_eq!(outbox_len(&eve), 0, "the running client took the queue in");
    bg.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

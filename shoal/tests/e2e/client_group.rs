//! Groups from scripts: `shoal client group ...` on a live testnet of real processes.
//! Three members of one subnet (set up by `shoal admin` only); Alice makes a group,
//! invites Bob and Carol by their saved membership cards (queued while her client is
//! stopped, sent by `shoal client start`'s background client), and sends; Bob and
//! Carol, each running `shoal client run`, join and get it; `read` shows the group,
//! sender, TTL and burn flag. Alice removes Carol, who then receives nothing more.
//! Errors for unknown groups and contacts and for policy refusals are checked on the
//! way, both before a client runs and through a running one.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support::cli_net;

use std::time::{Duration, Instant};

use cli_net::{
    ClientDir, client_init, client_init_member, enroll_member, field, outbox_len, run_client,
    run_output, shoal, shoal_output, start_background, start_subnet, stop, temp_dir, wait_run_line,
};
use shoal_bench::testnet::GatewayInit;

/// `shoal ARGS` that must fail; returns its stderr.
fn shoal_fails(args: &[&str]) -> String {
    let out = shoal_output(args);
    assert!(
        !out.status.success(),
        "`shoal {}` succeeded: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn three_members_use_a_group_from_the_cli() {
    let started = Instant::now();
    let dir = temp_dir("client-group");
    let (net, people) = start_subnet(&dir, &[("alice", 0), ("bob", 1), ("carol", 0)]);
    let (alice, bob, carol) = (&people[0], &people[1], &people[2]);
    let d = |c: &ClientDir| c.dir.to_string_lossy().into_owned();
    let (a, b, c) = (d(alice), d(bob), d(carol));

    // First use reads the admin's files; group changes settle in 8 s here (30 s by
    // default) to keep the test short.
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
    assert!(card_b.starts_with("shoal-invite1:"), "{card_b}");

    // Alice saves their cards; a card under another name than its handle is refused.
    let err = shoal_fails(&["client", "contact", "add", "--dir", &a, "robert", &card_b]);
    assert!(err.contains("\"bob\"'s"), "{err}");
    shoal(&["client", "contact", "add", "--dir", &a, "bob", &card_b]);
    shoal(&["client", "contact", "add", "--dir", &a, "carol", &card_c]);
    let list = shoal(&["client", "contact", "list", "--dir", &a]);
    // Members are named handle@subnet (the subnet id's first 8 hex digits), each with
    // its key and safety number.
    let sub = field(&list, "bob@")[..8].to_string();
    assert!(
        list.contains(&format!("bob@{sub}\tshoal-invite1:")),
        "{list}"
    );
    assert!(
        list.contains(&format!("bob@{sub}\tkey ")) && list.contains("\tconfirmed\tsafety number "),
        "{list}"
    );

    let out = shoal(&["client", "group", "create", "--dir", &a, "friends"]);
    assert!(out.contains("group \"friends\" created"), "{out}");
    let err = shoal_fails(&["client", "group", "create", "--dir", &a, "friends"]);
    assert!(err.contains("already have a group named"), "{err}");
    let err = shoal_fails(&["client", "group", "invite", "--dir", &a, "nosuch", "bob"]);
    assert!(err.contains("no group \"nosuch\""), "{err}");
    let err = shoal_fails(&["client", "group", "invite", "--dir", &a, "friends", "dave"]);
    assert!(err.contains("no card for \"dave\""), "{err}");
    let list = shoal(&["client", "group", "list", "--dir", &a]);
    assert!(
        list.contains("friends\tid ")
            && list.contains(&format!("epoch 0\tmembers: alice@{sub} (you)")),
        "{list}"
    );
    let id = field(&list, "friends\tid ");
    let id = id.split('\t').next().unwrap().to_string();

    // Bob and Carol run their clients (as members: groups and messages printed).
    let mut bob_run = run_client(bob);
    let mut carol_run = run_client(carol);

    // Alice's client is stopped: the invite is checked, queued, and goes nowhere yet.
    let out = shoal(&[
        "client", "group", "invite", "--dir", &a, "friends", "bob", "carol",
    ]);
    assert!(
        out.contains("queued: adding bob, carol to friends; no client is running"),
        "{out}"
    );
    assert_eq!(outbox_len(&alice.dir), 1);
    // Her background client takes it in and commits it once it has settled (8 s);
    // `group list`, answered by the running client, shows when.
    let alice_bg = start_background(&alice.dir);
    let deadline = Instant::now() + Duration::from_secs(60);
    let want = format!("epoch 1\tmembers: alice@{sub} (you), bob@{sub}, carol@{sub}");
    loop {
        let list = shoal(&["client", "group", "list", "--dir", &a]);
        if list.contains(&want) && !list.contains("pending") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "invite: {list}\n--- alice ---\n{}\n--- gateway0 ---\n{}",
            alice_bg.log(),
            net.log_tail("gateway0"),
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(outbox_len(&alice.dir), 0);
    let long = Duration::from_secs(40);
    for p in [bob, carol] {
        wait_run_line(p, "join", long, |l| l == format!("you joined group {id}"));
    }
    let list = shoal(&["client", "group", "list", "--dir", &a]);
    assert!(
        list.contains(&format!(
            "epoch 1\tmembers: alice@{sub} (you), bob@{sub}, carol@{sub}"
        )),
        "{list}"
    );
    assert!(!list.contains("pending"), "{list}");

    // Policy refusals say why; nothing is sent.
    let err = shoal_fails(&[
        "client", "group", "send", "--dir", &a, "--ttl", "99999999", "friends", "too long",
    ]);
    assert!(
        err.contains("policy refuses") && err.contains("TTL 99999999s is outside"),
        "{err}"
    );

    let hello = "hello friends, from the command line";
    let out = shoal(&[
        "client",
        "group",
        "send",
        "--dir",
        &a,
        "--ttl",
        "7200",
        "--wait",
        "--timeout-secs",
        "60",
        "friends",
        hello,
    ]);
    assert!(
        out.contains("delivered: message to friends, to the mailboxes of 2 members"),
        "{out}"
    );
    let out = shoal(&[
        "client",
        "group",
        "send",
        "--dir",
        &a,
        "--burn-on-read",
        "--wait",
        "--timeout-secs",
        "60",
        "friends",
        "burn me",
    ]);
    assert!(out.contains("delivered"), "{out}");
    for p in [bob, carol] {
        wait_run_line(p, "hello", long, |l| {
            l.ends_with(&format!("#{id} alice@{sub}: {hello} [ttl 2h]"))
        });
        wait_run_line(p, "burn-on-read notice", long, |l| {
            l.contains(&format!("#{id} alice@{sub}: (burn-on-read:"))
                && l.ends_with("[ttl 24h, burn-on-read]")
        });
    }
    assert!(
        !run_output(bob).contains("burn me"),
        "run does not show burn-on-read bodies"
    );

    // Carol is removed; her client learns it, Bob's applies it.
    let out = shoal(&[
        "client",
        "group",
        "remove",
        "--dir",
        &a,
        "--wait",
        "--timeout-secs",
        "60",
        "friends",
        "carol",
    ]);
    assert!(
        out.contains("done: removing carol from friends (epoch 2, 2 members)"),
        "{out}"
    );
    wait_run_line(carol, "removal", long, |l| {
        l == format!("you were removed from group {id}")
    });
    wait_run_line(bob, "carol's removal", long, |l| {
        l == format!("group {id} is at epoch 2")
    });
    let err = shoal_fails(&["client", "group", "remove", "--dir", &a, "friends", "carol"]);
    assert!(err.contains("no member \"carol\""), "{err}");

    let after = "carol is gone now";
    let out = shoal(&[
        "client",
        "group",
        "send",
        "--dir",
        &a,
        "--wait",
        "--timeout-secs",
        "60",
        "friends",
        after,
    ]);
    assert!(out.contains("to the mailboxes of 1 members"), "{out}");
    wait_run_line(bob, "message after the removal", long, |l| {
        l.contains(after)
    });

    // Fresh keys for Alice: a change Bob applies like any other.
    let out = shoal(&[
        "client",
        "group",
        "update",
        "--dir",
        &a,
        "--wait",
        "--timeout-secs",
        "60",
        "friends",
    ]);
    assert!(
        out.contains("done: new keys in friends (epoch 3, 2 members)"),
        "{out}"
    );
    wait_run_line(bob, "the update", long, |l| {
        l == format!("group {id} is at epoch 3")
    });
    // While `run` holds Bob's store, his running client answers group commands.
    let list = shoal(&["client", "group", "list", "--dir", &b]);
    assert!(
        list.contains(&format!("epoch 3\tmembers: alice@{sub}, bob@{sub} (you)")),
        "{list}"
    );
    stop(&mut bob_run);
    stop(&mut carol_run);

    // Bob's read shows group, sender, TTL and burn flag; a burnt message goes at once.
    let read = shoal(&["client", "read", "--dir", &b]);
    assert!(
        read.contains(&format!(" UTC] #{id} alice@{sub}: {hello} [ttl 2h]")),
        "{read}"
    );
    assert!(
        read.contains(&format!(
            "#{id} alice@{sub}: burn me [ttl 24h, burn-on-read: deleted after this read]"
        )),
        "{read}"
    );
    assert!(read.contains(after), "{read}");
    let again = shoal(&["client", "read", "--dir", &b]);
    assert!(
        !again.contains("burn me") && again.contains(hello),
        "{again}"
    );
    let list = shoal(&["client", "group", "list", "--dir", &b]);
    assert!(
        list.contains(&format!("epoch 3\tmembers: alice@{sub}, bob@{sub} (you)")),
        "{list}"
    );
    // Bob asks to leave with his client stopped: queued for his next start.
    let out = shoal(&["client", "group", "leave", "--dir", &b, &id]);
    assert!(
        out.contains(&format!(
            "queued: asking to leave {id}; the next change by another member removes you; no client is running"
        )),
        "{out}"
    );
    assert_eq!(outbox_len(&bob.dir), 1);

    // Carol got what was sent while she was in, and nothing after.
    let read = shoal(&["client", "read", "--dir", &c]);
    assert!(read.contains(hello), "{read}");
    assert!(!read.contains(after), "{read}");
    let list = shoal(&["client", "group", "list", "--dir", &c]);
    assert!(list.contains("no groups"), "{list}");

    alice_bg.stop();

    // Leak 1, the rogue admin: it names a gateway of its choosing for a member, to
    // gather its subnet where an observer can read it off. The member's client refuses.
    let gws: Vec<GatewayInit> = net.gateways.iter().map(|g| g.init.clone()).collect();
    let authority = format!(
        "{}={}",
        net.authority_addr,
        hex::encode(net.authorities.keys[0].0)
    );
    let named = |out: &str, g: &GatewayInit| {
        field(out, "gateway: ").starts_with(&format!("{}={}", g.link_addr, hex::encode(g.id)))
    };
    let admin = dir.join("admin");
    // (a) Dave's client chose its gateway by the rule; the credential names the other.
    let dave = dir.join("dave");
    let out = client_init_member(&dave, "dave", &gws, &authority);
    let other = gws.iter().find(|g| !named(&out, g)).unwrap();
    enroll_member(&admin, &dave, "dave", other, &out);
    let err = shoal_fails(&["client", "group", "card", "--dir", &dave.to_string_lossy()]);
    assert!(err.contains("names another gateway"), "{err}");
    // (b) Erin's client was set up with the admin's gateway alone (the old way), one the
    // rule does not give her key: config and credential agree, and the running client
    // refuses at the first directory.
    let (erin, erin_out, pinned) = (0..32)
        .find_map(|i| {
            let d = dir.join(format!("erin{i}"));
            let g = &gws[0];
            let out = client_init(&d, "erin", g, &authority);
            let mut key = [0u8; 32];
            hex::decode_to_slice(field(&out, "account key: "), &mut key).unwrap();
            let ids: Vec<[u8; 32]> = gws.iter().map(|g| g.id).collect();
            (shoal_topology::gateway_for_member(&ids, &key) != Some(g.id)).then_some((d, out, g))
        })
        .unwrap();
    enroll_member(&admin, &erin, "erin", pinned, &erin_out);
    let erin_dir = ClientDir {
        name: "erin".into(),
        dir: erin.clone(),
        card: String::new(),
        gateway: 0,
    };
    let mut erin_run = run_client(&erin_dir);
    let deadline = Instant::now() + Duration::from_secs(30);
    while erin_run.alive() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = std::fs::read_to_string(erin.join("run.log")).unwrap_or_default();
    assert!(
        !erin_run.alive(),
        "erin's client went on with the admin's gateway: {log}"
    );
    assert!(
        log.contains("assigns your account key to another gateway"),
        "{log}"
    );
    drop(net);
    let _ = std::fs::remove_dir_all(&dir);
    let took = started.elapsed();
    // Printed, not asserted: each wait above has its own deadline.
    println!("client_group took {took:?}");
}

//! `shoal chat` driven the way a person uses it: two people on a live testnet of real
//! processes, each running the chat in a terminal (a detached tmux session), typing
//! with `tmux send-keys`, pasting cards with `tmux paste-buffer`, and reading the
//! screen with `tmux capture-pane`. Only Bob pastes a card: he writes to Alice, she
//! answers from the message (issue 18 #3) and her answer is marked delivered by its own
//! receipt (#1); she accepts his key, makes a group, adds Bob, and a group message goes
//! each way. Carol, a member using `shoal client send` from a script, writes to Bob, and
//! his chat shows it (#2: one message format).
//!
//! Set-up is by CLI only, as `use-the-chat.md` says: `shoal admin init` (a subnet,
//! hosted by both gateways), `shoal client init` for each person, `shoal admin enroll`
//! with what `client init` printed for the admin (account key and mailbox, no seal key:
//! #7), and the admin's files handed to each person (`members/H.cred` → `credential`,
//! `policy.json` → `policy`), which the chat reads on first use.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support::cli_net;

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use cli_net::{ClientDir, SHOAL, shoal, start_subnet, temp_dir};

/// A tmux server of our own (`-L`), killed on drop even if the test fails.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn run(&self, args: &[&str]) -> Output {
        Command::new("tmux")
            .arg("-L")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("cannot run tmux")
    }

    fn ok(&self, args: &[&str]) {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "tmux {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn screen(&self, session: &str) -> String {
        String::from_utf8_lossy(&self.run(&["capture-pane", "-p", "-t", session]).stdout)
            .into_owned()
    }

    fn type_line(&self, session: &str, text: &str) {
        self.ok(&["send-keys", "-t", session, "-l", text]);
        self.ok(&["send-keys", "-t", session, "Enter"]);
    }

    /// Pastes `text` into the terminal, as a person pastes a card.
    fn paste(&self, session: &str, text: &str) {
        self.ok(&["set-buffer", "-b", "card", "--", text]);
        self.ok(&["paste-buffer", "-b", "card", "-t", session]);
    }

    fn alive(&self, session: &str) -> bool {
        self.run(&["has-session", "-t", session]).status.success()
    }

    /// Waits until the screen satisfies `pred`; returns the last screen.
    fn wait_for(
        &self,
        session: &str,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
        log: &Path,
    ) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.screen(session);
            if pred(&s) {
                return s;
            }
            if Instant::now() >= deadline {
                panic!(
                    "{session}: no {what} within {timeout:?}; screen:\n{s}\n--- log ---\n{}",
                    std::fs::read_to_string(log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.run(&["kill-server"]);
    }
}

#[test]
fn two_people_chat_in_a_group_through_tmux() {
    if Command::new("tmux").arg("-V").output().is_err() {
        println!("skipped: tmux is not installed (apt-get install tmux)");
        return;
    }
    let started = Instant::now();
    let dir = temp_dir("chat-tmux");
    let (net, clients) = start_subnet(&dir, &[("alice", 0), ("bob", 1), ("carol", 0)]);
    let (alice, bob, carol) = (&clients[0], &clients[1], &clients[2]);

    // Each prints the card to give the other (first use also reads the admin's files).
    // Group changes settle in 8 s here (30 s by default) to keep the test short.
    let card = |c: &ClientDir| {
        let dir = c.dir.to_string_lossy();
        shoal(&[
            "chat",
            "--dir",
            &dir,
            "--print-card",
            "--commit-settle-secs",
            "8",
        ])
        .trim()
        .to_string()
    };
    let (card_a, card_b) = (card(alice), card(bob));
    assert!(card_a.starts_with("shoal-invite1:"), "{card_a}");
    // `client contact show` prints the same kind of card.
    let carol_s = carol.dir.to_string_lossy().into_owned();
    let card_c = shoal(&["client", "contact", "show", "--dir", &carol_s]);
    assert!(card_c.trim().starts_with("shoal-invite1:"), "{card_c}");
    // Carol saves Bob's card for her script.
    shoal(&[
        "client", "contact", "add", "--dir", &carol_s, "bob", &card_b,
    ]);

    let tmux = Tmux {
        socket: format!("shoal-chat-test-{}", std::process::id()),
    };
    for c in [alice, bob] {
        // Logs at debug and stderr left on the pane: the chat must write them to its
        // log file, never over the screen.
        let cmd = format!("SHOAL_LOG=debug {SHOAL} chat --dir {}", c.dir.display());
        tmux.ok(&[
            "new-session",
            "-d",
            "-s",
            &c.name,
            "-x",
            "120",
            "-y",
            "40",
            &cmd,
        ]);
    }
    let log = |c: &ClientDir| c.dir.join("chat.log");
    let short = Duration::from_secs(15);
    let long = Duration::from_secs(45);
    for c in [alice, bob] {
        tmux.wait_for(
            &c.name,
            "chat screen",
            short,
            |s| s.contains(" message "),
            &log(c),
        );
    }

    // Only Bob pastes a card, and writes to Alice.
    tmux.ok(&["send-keys", "-t", "bob", "-l", "/add "]);
    tmux.paste("bob", &card_a);
    tmux.ok(&["send-keys", "-t", "bob", "Enter"]);
    tmux.wait_for(
        "bob",
        "contact alice",
        short,
        |s| s.contains("@ alice"),
        &log(bob),
    );
    tmux.type_line("bob", "hi alice, it's bob");
    // Alice sees it in a conversation with Bob, without pasting anything, and answers.
    tmux.wait_for(
        "alice",
        "bob's message",
        long,
        |s| s.contains("@ bob@") && s.contains(": hi alice, it's bob"),
        &log(alice),
    );
    let answer = "hello bob, no card pasted";
    tmux.type_line("alice", answer);
    let screen = tmux.wait_for(
        "alice",
        "the answer's own receipt",
        long,
        |s| {
            s.lines()
                .any(|l| l.contains(answer) && l.contains("[delivered"))
        },
        &log(alice),
    );
    assert!(!screen.contains("not in your contacts"), "{screen}");
    tmux.wait_for(
        "bob",
        "alice's answer",
        long,
        |s| s.contains(&format!(": {answer}")),
        &log(bob),
    );

    // To add Bob to a group, Alice accepts his key (the card his /add sent her); the
    // safety number is what she would compare with him first.
    tmux.type_line("alice", "/verify");
    tmux.wait_for(
        "alice",
        "safety number",
        short,
        |s| s.contains("safety number with bob@"),
        &log(alice),
    );
    tmux.type_line("alice", "/accept bob");
    tmux.wait_for(
        "alice",
        "bob accepted",
        short,
        |s| s.contains("accepted"),
        &log(alice),
    );

    // Alice saves Carol's card too (she uses scripts, not the chat).
    tmux.ok(&["send-keys", "-t", "alice", "-l", "/add "]);
    tmux.paste("alice", card_c.trim());
    tmux.ok(&["send-keys", "-t", "alice", "Enter"]);
    tmux.wait_for(
        "alice",
        "contact carol",
        short,
        |s| s.contains("@ carol@"),
        &log(alice),
    );

    // Alice makes a group and adds Bob; the group shows him once the change settled.
    tmux.type_line("alice", "/group new friends");
    tmux.wait_for(
        "alice",
        "group",
        short,
        |s| s.contains("# friends"),
        &log(alice),
    );
    tmux.type_line("alice", "/invite bob");
    // A second invite while the first settles is queued, not refused (issue 18 #9).
    tmux.type_line("alice", "/invite carol");
    tmux.wait_for(
        "alice",
        "carol queued",
        short,
        |s| s.contains("carol is queued"),
        &log(alice),
    );
    tmux.wait_for(
        "alice",
        "bob in the group",
        long,
        |s| s.contains("friends — with bob"),
        &log(alice),
    );

    tmux.wait_for(
        "alice",
        "carol in the group after bob",
        long,
        |s| s.contains("friends — with bob") && s.contains(", carol@"),
        &log(alice),
    );
    // Bob applies Carol's change after its own settle time; what Alice writes before
    // that he cannot read (documented: wait for a change to reach everyone).
    tmux.wait_for(
        "bob",
        "carol's change applied",
        long,
        |s| s.contains("carol@") && s.contains("joined a group"),
        &log(bob),
    );
    tmux.type_line("alice", "/members");
    tmux.wait_for(
        "alice",
        "member list",
        short,
        |s| s.contains("3 members: alice (you), bob@"),
        &log(alice),
    );
    let hello = "hello friends, this crossed the mixnet";
    tmux.type_line("alice", hello);
    tmux.wait_for(
        "alice",
        "own message",
        short,
        |s| s.contains(&format!("alice: {hello}")),
        &log(alice),
    );

    // Bob joined from the Welcome; the message arrives as unread in the group.
    let screen = tmux.wait_for(
        "bob",
        "unread group message",
        long,
        |s| {
            s.lines()
                .any(|l| l.contains("# group ") && l.contains("(1)"))
        },
        &log(bob),
    );
    assert!(!screen.contains(hello), "not shown before Bob opens it");
    tmux.ok(&["send-keys", "-t", "bob", "Tab"]);
    let screen = tmux.wait_for(
        "bob",
        "the group message",
        short,
        // Other members are named handle@subnet.
        |s| s.contains("alice@") && s.contains(&format!(": {hello}")),
        &log(bob),
    );
    assert!(screen.contains("with alice"), "{screen}");
    assert!(screen.contains("[ttl 24h]"), "{screen}");

    // Bob answers in the group; Alice sees it and her message's receipt.
    let reply = "hi alice, got it";
    tmux.type_line("bob", reply);
    let screen = tmux.wait_for(
        "alice",
        "reply and receipt",
        long,
        |s| s.contains("bob@") && s.contains(&format!(": {reply}")) && s.contains("[delivered"),
        &log(alice),
    );
    println!("alice's screen:\n{screen}");
    let bob_screen = tmux.screen("bob");
    println!("bob's screen:\n{bob_screen}");
    for (c, s) in [(alice, &screen), (bob, &bob_screen)] {
        for level in [" TRACE ", " DEBUG ", " INFO ", " WARN ", " ERROR "] {
            assert!(
                !s.contains(level),
                "a log line on {}'s screen:\n{s}",
                c.name
            );
        }
        let logged = std::fs::read_to_string(log(c)).unwrap_or_default();
        assert!(
            logged.contains("DEBUG"),
            "{}'s chat.log has no log lines",
            c.name
        );
    }

    // Carol, from a script: a signed direct message (before this change, a plain one
    // Bob's chat acked at the gateway and then dropped unseen).
    // Her script starts her client in the background: only it sends.
    let carol_bg = cli_net::start_background(&carol.dir);
    let sent = shoal(&[
        "client",
        "send",
        "--dir",
        &carol_s,
        "--to",
        "bob",
        "--wait",
        "--timeout-secs",
        "60",
        "from carol's script",
    ]);
    assert!(sent.contains("delivered to bob@"), "{sent}");
    carol_bg.stop();
    tmux.wait_for(
        "bob",
        "carol's conversation",
        long,
        |s| {
            s.lines()
                .any(|l| l.contains("@ carol@") && l.contains("(1)"))
        },
        &log(bob),
    );

    // A script of Alice's while her chat holds the store: spooled, then sent by the
    // chat itself.
    let alice_s = alice.dir.to_string_lossy().into_owned();
    let spooled = shoal(&[
        "client",
        "send",
        "--dir",
        &alice_s,
        "--to",
        "bob",
        "from alice's script",
    ]);
    assert!(spooled.contains("queued: message to bob@"), "{spooled}");
    tmux.wait_for(
        "bob",
        "alice's scripted message",
        long,
        |s| {
            s.lines()
                .any(|l| l.contains("@ alice@") && l.contains("(1)"))
        },
        &log(bob),
    );

    // Both leave cleanly with /quit.
    for c in [alice, bob] {
        tmux.type_line(&c.name, "/quit");
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while (tmux.alive("alice") || tmux.alive("bob")) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        !tmux.alive("alice") && !tmux.alive("bob"),
        "the chat did not exit on /quit"
    );
    // Alice opens the chat again: her own messages are still there, with their marks
    // (issue 18 #8).
    let cmd = format!("SHOAL_LOG=debug {SHOAL} chat --dir {}", alice.dir.display());
    tmux.ok(&[
        "new-session",
        "-d",
        "-s",
        "alice",
        "-x",
        "120",
        "-y",
        "40",
        &cmd,
    ]);
    tmux.wait_for(
        "alice",
        "her own answer after a restart",
        short,
        |s| {
            s.lines()
                .any(|l| l.contains(&format!("alice: {answer}")) && l.contains("[delivered"))
        },
        &log(alice),
    );
    tmux.type_line("alice", "/quit");
    drop(tmux);
    drop(net);
    let _ = std::fs::remove_dir_all(&dir);
    let took = started.elapsed();
    // Printed, not asserted: each wait above has its own deadline.
    println!("chat_tmux took {took:?}");
}

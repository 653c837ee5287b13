//! A network deployed from config files alone, by following docs/guides/run-a-node.md
//! and docs/guides/run-a-subnet.md step by step with the real binary: three authorities
//! (k = 2), three layers of two relays and two gateways, each made with `init`, its TOML
//! edited as an operator would and started with `run --config`; then a subnet admin
//! (`shoal admin init`, its own client with an account the gateway operator adds,
//! `use-client`, `invite`, `redeem`, `list`, every command through that client and the
//! mixnet) enrols two users whose clients
//! (`shoal client init`, `contact`, `send`, `run`, `read`) message each other both ways.
//!
//! Every node, the admin and each user is its own host: a network namespace with its own
//! address over veth where the machine allows it (root, `ip`), else loopback ports; the
//! test prints which. Namespaces are deleted even when the test fails.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support::authorities;
use crate::support::hosts;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use authorities::{Authorities, edit_toml, now_unix};
use hosts::{Host, Hosts, namespaces};
use shoal_bench::testnet::Proc;

const RELAYS: usize = 6;
/// The authorities wait this long for descriptors before the first document; every node
/// is started well inside it, so all are in epoch 0's document (hour-long epochs).
const BOOTSTRAP_SECS: u64 = 6;

/// The value after `prefix` on the first line that has it.
fn field(out: &str, prefix: &str) -> String {
    out.lines()
        .find_map(|l| l.trim_start().strip_prefix(prefix))
        .unwrap_or_else(|| panic!("no {prefix:?} in:\n{out}"))
        .trim()
        .to_owned()
}

/// A relay or gateway host: its dir, addresses and identity.
struct Node {
    host: Host,
    dir: PathBuf,
    config: PathBuf,
    id: String,
    link: std::net::SocketAddr,
    client: Option<std::net::SocketAddr>,
}

/// Polls `shoal authority status` until the current document is published with
/// `nodes` nodes in it; returns its output.
fn wait_for_document(
    hosts: &Hosts,
    on: &Host,
    addr: &str,
    nodes: usize,
    auth: &Authorities,
) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = hosts
            .shoal(on)
            .args(["authority", "status", "--addr", addr])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let current = text.split("next epoch").next().unwrap_or("");
        let included = current
            .lines()
            .filter(|l| {
                (l.starts_with("  ") && l.trim_end().ends_with(" in")) || l.contains(" in, layer ")
            })
            .count();
        if current.contains("(published)") && included == nodes {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "no document with all {nodes} nodes:\n{text}\n{}",
            auth.logs()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Sends SIGTERM (Ctrl-C as a person would) and waits for the process to exit.
fn stop(p: &mut Proc) {
    let _ = Command::new("kill")
        .args(["-TERM", &p.pid().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(10);
    while p.alive() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!p.alive(), "{} ignored SIGTERM", p.name);
}

/// Waits until `path` (a running client's stdout) contains `text`.
fn wait_for_output(path: &Path, text: &str, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if std::fs::read_to_string(path)
            .unwrap_or_default()
            .contains(text)
        {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_network_deployed_from_config_files_carries_messages_between_enrolled_users() {
    let started = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path();
    // Declared first so it is dropped last: every process below dies before its namespace.
    let mut hosts = Hosts::create();
    let auth_hosts: Vec<Host> = (0..3).map(|i| hosts.add(&format!("a{i}"))).collect();
    let relay_hosts: Vec<Host> = (0..RELAYS).map(|i| hosts.add(&format!("r{i}"))).collect();
    let gateway_hosts: Vec<Host> = (0..2).map(|i| hosts.add(&format!("g{i}"))).collect();
    let admin = hosts.add("admin");
    let users: Vec<Host> = ["ana", "ben"].iter().map(|n| hosts.add(n)).collect();

    // run-a-node §2: three authorities, k = 2, hour-long epochs. Epoch 0 began a minute
    // ago. Operator edits: sync every second and a short bootstrap, for a test.
    let auth_addrs: Vec<_> = auth_hosts.iter().map(|h| hosts.tcp(h, 8000)).collect();
    let mut auths = Authorities::init(
        &base.join("authorities"),
        auth_addrs,
        now_unix() - 60,
        2,
        &["--epoch-secs", "3600"],
        &[
            ("sync_interval_secs", "1".into()),
            ("bootstrap_delay_secs", BOOTSTRAP_SECS.to_string()),
        ],
    );
    let authority_args: Vec<String> = (0..3)
        .flat_map(|i| ["--authority".to_string(), auths.arg(i)])
        .collect();

    // §3 relays and §4 gateways: `init` with the guide's flags; one worker thread each
    // (a config edit: this machine has two cores for thirteen hosts).
    let init_node = |kind: &str, host: &Host, i: usize| -> Node {
        let dir = base.join(format!("{kind}{i}"));
        let (link_port, metrics_port) = if kind == "relay" {
            (7001, 9101)
        } else {
            (7101, 9102)
        };
        let link = hosts.udp(host, link_port);
        let metrics = hosts.tcp(host, metrics_port);
        let (dir_s, listen, link_s, metrics_s) = (
            dir.to_string_lossy().into_owned(),
            hosts.listen(link).to_string(),
            link.to_string(),
            metrics.to_string(),
        );
        let mut args = vec![kind, "init", "--dir", &dir_s, "--listen", &listen];
        args.extend(["--public-addr", &link_s, "--metrics", &metrics_s]);
        let client = (kind == "gateway").then(|| hosts.udp(host, 7102));
        let client_listen = client.map(|c| hosts.listen(c).to_string());
        if let Some(c) = &client_listen {
            args.extend(["--client-listen", c]);
        }
        args.extend(authority_args.iter().map(String::as_str));
        args.extend(["--threshold", "2"]);
        let out = hosts.run(host, &args);
        let config = dir.join(format!("{kind}.toml"));
        edit_toml(&config, &[("workers", "1".into())]);
        Node {
            host: host.clone(),
            id: field(&out, &format!("{kind} identity: ")),
            dir,
            config,
            link,
            client,
        }
    };
    let relays: Vec<Node> = relay_hosts
        .iter()
        .enumerate()
        .map(|(i, h)| init_node("relay", h, i))
        .collect();
    let gateways: Vec<Node> = gateway_hosts
        .iter()
        .enumerate()
        .map(|(i, h)| init_node("gateway", h, i))
        .collect();

    // run-a-node "Admit operators": every node here has its own operator (a route holds
    // at most one node per operator), who makes a key, is admitted by every authority,
    // and certifies its node into the node's directory.
    for (i, (node, role)) in relays
        .iter()
        .map(|n| (n, "relay"))
        .chain(gateways.iter().map(|n| (n, "gateway")))
        .enumerate()
    {
        let op_dir = base
            .join(format!("operator{i}"))
            .to_string_lossy()
            .into_owned();
        let op_key = hosts
            .run(&node.host, &["operator", "keygen", "--dir", &op_dir])
            .trim()
            .to_string();
        for (a, h) in auth_hosts.iter().enumerate() {
            let config = auths.dirs[a].join("authority.toml");
            let config = config.to_string_lossy();
            let name = format!("operator {i}");
            hosts.run(
                h,
                &[
                    "authority",
                    "operator",
                    "admit",
                    "--config",
                    &config,
                    "--key",
                    &op_key,
                    "--name",
                    &name,
                ],
            );
        }
        let cert = node
            .dir
            .join("operator.cert")
            .to_string_lossy()
            .into_owned();
        hosts.run(
            &node.host,
            &[
                "operator", "certify", "--dir", &op_dir, "--node", &node.id, "--role", role,
                "--out", &cert,
            ],
        );
    }

    // run-a-subnet §1-2: the admin creates the subnet; each gateway operator lists its
    // id under `subnets` in gateway.toml.
    let admin_dir = base.join("acme-admin");
    let admin_s = admin_dir.to_string_lossy().into_owned();
    let out = hosts.run(
        &admin,
        &[
            "admin",
            "init",
            "--dir",
            &admin_s,
            "--name",
            "acme",
            "--roles",
            "staff,guest",
        ],
    );
    let subnet = field(&out, "subnet id:");
    for g in &gateways {
        edit_toml(&g.config, &[("subnets", format!("[\"{subnet}\"]"))]);
    }
    // run-a-subnet §2-3: the admin's own client, its account added by gateway 0's
    // operator while the gateway is stopped, named with `use-client`.
    let admin_client = admin_dir.join("client");
    let admin_client_s = admin_client.to_string_lossy().into_owned();
    let (g0_link, g0_client) = (
        format!("{}={}", gateways[0].link, gateways[0].id),
        gateways[0].client.unwrap().to_string(),
    );
    let mut args = vec![
        "client",
        "init",
        "--dir",
        &admin_client_s,
        "--gateway",
        &g0_link,
    ];
    args.extend(["--gateway-client-addr", &g0_client]);
    args.extend(authority_args.iter().map(String::as_str));
    args.extend(["--threshold", "2", "--name", "acme-admin"]);
    let out = hosts.run(&admin, &args);
    let g0_config = gateways[0].config.to_string_lossy().into_owned();
    let (key, mailbox) = (field(&out, "account key: "), field(&out, "mailbox: "));
    hosts.run(
        &gateways[0].host,
        &[
            "gateway",
            "account",
            "add",
            "--config",
            &g0_config,
            "--key",
            &key,
            "--mailbox",
            &mailbox,
        ],
    );
    hosts.run(
        &admin,
        &["admin", "use-client", "--dir", &admin_s, &admin_client_s],
    );
    let configured = started.elapsed();

    // Start everything: `shoal <kind> run --config FILE`, each on its own host.
    for (i, h) in auth_hosts.iter().enumerate() {
        auths.start_with(i, hosts.shoal(h));
    }
    let mut procs: Vec<Proc> = Vec::new();
    for (kind, nodes) in [("relay", &relays), ("gateway", &gateways)] {
        for n in nodes {
            let config = n.config.to_string_lossy().into_owned();
            procs.push(hosts.spawn(
                &n.host,
                &[kind, "run", "--config", &config],
                &n.dir.join("stdout"),
                &n.dir.join("node.log"),
            ));
        }
    }
    let status = wait_for_document(
        &hosts,
        &admin,
        &auths.addrs[0].to_string(),
        RELAYS + 2,
        &auths,
    );
    let first_document = started.elapsed();
    let admin_client_toml = admin_client.join("client.toml");
    procs.push(hosts.spawn(
        &admin,
        &[
            "client",
            "run",
            "--config",
            &admin_client_toml.to_string_lossy(),
        ],
        &admin_client.join("run.out"),
        &admin_client.join("run.log"),
    ));
    println!("shoal authority status:\n{status}");
    let current = status.split("next epoch").next().unwrap_or("");
    for layer in 0..3 {
        let n = current.matches(&format!(" in, layer {layer}")).count();
        assert_eq!(n, RELAYS / 3, "relays in layer {layer}:\n{status}");
    }

    // run-a-subnet §3: the network file the authorities' operators publish (users and
    // the admin take the trust root from it), an invite per user (naming the network by
    // fingerprint), `shoal client init` exactly as the invite says, the output appended,
    // and `shoal admin redeem`.
    let network = base.join("network.toml");
    let network_s = network.to_string_lossy().into_owned();
    let a0_config = auths.dirs[0].join("authority.toml");
    hosts.run(
        &auth_hosts[0],
        &[
            "authority",
            "network-file",
            "--config",
            &a0_config.to_string_lossy(),
            "--out",
            &network_s,
        ],
    );
    let mut user_dirs = Vec::new();
    for (user, (host, g)) in ["ana", "ben"].iter().zip(users.iter().zip(&gateways)) {
        let invite = base.join(format!("{user}.invite"));
        let invite_s = invite.to_string_lossy().into_owned();
        let (gw_client, gw_link) = (g.client.unwrap().to_string(), g.link.to_string());
        let invite_args = vec![
            "admin",
            "invite",
            "--dir",
            &admin_s,
            "--handle",
            user,
            "--role",
            "staff",
            "--gateway",
            &gw_client,
            "--gateway-key",
            &g.id,
            "--gateway-node",
            &gw_link,
            "--out",
            &invite_s,
            "--network",
            &network_s,
        ];
        hosts.run(&admin, &invite_args);
        let text = std::fs::read_to_string(&invite).unwrap();
        let command = field(&text, "#    shoal client init ");
        let dir = base.join(format!("{user}-client"));
        let dir_s = dir.to_string_lossy().into_owned();
        let command = command
            .replace("<YOUR_DIR>", &dir_s)
            .replace("<NETWORK_FILE>", &network_s)
            .replace("<THIS_FILE>", &invite_s);
        let mut args: Vec<&str> = vec!["client", "init"];
        args.extend(command.split_whitespace());
        args.extend(["--name", user]);
        let out = hosts.run(host, &args);
        std::fs::write(&invite, format!("{text}{out}")).unwrap();
        let redeemed = hosts.run(&admin, &["admin", "redeem", "--dir", &admin_s, &invite_s]);
        assert!(redeemed.contains("redeemed"), "{redeemed}");
        println!("{}", redeemed.trim());
        user_dirs.push(dir_s);
    }
    let list = hosts.run(&admin, &["admin", "list", "--dir", &admin_s]);
    println!("{list}");
    for user in ["ana ", "ben "] {
        let row = list.lines().find(|l| l.starts_with(user)).unwrap_or("");
        assert!(row.contains("active"), "{user} is active:\n{list}");
    }
    let enrolled = started.elapsed();

    // Contact cards, exchanged out of band: each pastes the other's.
    for (me, other, other_name) in [(0, 1, "ben"), (1, 0, "ana")] {
        let card = hosts.run(
            &users[other],
            &["client", "contact", "show", "--dir", &user_dirs[other]],
        );
        hosts.run(
            &users[me],
            &[
                "client",
                "contact",
                "add",
                "--dir",
                &user_dirs[me],
                other_name,
                card.trim(),
            ],
        );
    }

    // Both ways: both clients run; the sender's `send --wait` waits for the ack
    // (durable in the recipient's mailbox); the recipient's client prints it; stopped,
    // `read` shows it.
    let mut first_delivery = None;
    for (from, to, to_name) in [(0, 1, "ben"), (1, 0, "ana")] {
        let body = format!("hello {to_name}, from a network built from config files");
        let config = format!("{}/client.toml", user_dirs[to]);
        let out = Path::new(&user_dirs[to]).join("run.out");
        let mut run = hosts.spawn(
            &users[to],
            &["client", "run", "--config", &config],
            &out,
            &Path::new(&user_dirs[to]).join("run.log"),
        );
        // Only the sender's running client touches the network.
        let from_config = format!("{}/client.toml", user_dirs[from]);
        let mut from_run = hosts.spawn(
            &users[from],
            &["client", "run", "--config", &from_config],
            &Path::new(&user_dirs[from]).join("run.out"),
            &Path::new(&user_dirs[from]).join("run.log"),
        );
        let t = Instant::now();
        let sent = hosts.run(
            &users[from],
            &[
                "client",
                "send",
                "--dir",
                &user_dirs[from],
                "--to",
                to_name,
                "--wait",
                "--timeout-secs",
                "60",
                &body,
            ],
        );
        let acked = t.elapsed();
        assert!(
            sent.contains(&format!("delivered to {to_name}'s mailbox")),
            "{sent}"
        );
        assert!(
            wait_for_output(&out, &body, Duration::from_secs(30)),
            "{to_name}'s client did not print the message:\n{}\n{}",
            std::fs::read_to_string(&out).unwrap_or_default(),
            std::fs::read_to_string(Path::new(&user_dirs[to]).join("run.log")).unwrap_or_default()
        );
        let shown = t.elapsed();
        first_delivery.get_or_insert(shown);
        println!(
            "{} -> {to_name}: acked after {:.1} s, shown by {to_name}'s client after {:.1} s",
            ["ana", "ben"][from],
            acked.as_secs_f64(),
            shown.as_secs_f64()
        );
        stop(&mut run);
        stop(&mut from_run);
        let read = hosts.run(&users[to], &["client", "read", "--dir", &user_dirs[to]]);
        assert_eq!(
            read.lines().filter(|l| l.contains(&body)).count(),
            1,
            "`read` shows the message once:\n{read}"
        );
    }

    // The operators' view: every node healthy, each gateway with its user's account, and
    // gateway 0 with the admin's client's too.
    for (i, g) in gateways.iter().enumerate() {
        let config = g.config.to_string_lossy().into_owned();
        let out = hosts.run(&g.host, &["gateway", "status", "--config", &config]);
        let accounts = if i == 0 { 2 } else { 1 };
        assert!(
            out.contains(&format!("mailboxes      {accounts} accounts")),
            "{out}"
        );
    }

    let total = started.elapsed();
    println!(
        "deploy ({}): 13 hosts; configured in {:.1} s, first document with all 8 nodes at \
         {:.1} s, both users enrolled at {:.1} s, first delivery {:.1} s after `send`, \
         total {:.1} s",
        if hosts.namespaced() {
            "namespaces"
        } else {
            "loopback"
        },
        configured.as_secs_f64(),
        first_document.as_secs_f64(),
        enrolled.as_secs_f64(),
        first_delivery.unwrap().as_secs_f64(),
        total.as_secs_f64()
    );

    // Torn down: processes first, then the namespaces; none is left behind.
    let names = hosts.namespace_names();
    drop(procs);
    drop(auths);
    drop(hosts);
    let left = namespaces();
    for n in names {
        assert!(!left.contains(&n), "namespace {n} left behind");
    }
}

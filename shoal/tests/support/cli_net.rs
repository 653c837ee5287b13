//! A testnet (authority, 3 × 2 relays, 2 gateways as real processes) with clients
//! set up the way a person does it: `shoal client init`, then the gateway operator's
//! `shoal gateway account add` ([`start`]), or enrolled in a subnet by `shoal admin`
//! ([`start_subnet`]). Shared by the CLI, chat, group and packet-capture tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use shoal_bench::testnet::{GatewayInit, GatewayOptions, Proc, Testnet, TestnetConfig};

pub const SHOAL: &str = env!("CARGO_BIN_EXE_shoal");

/// One client directory made by `shoal client init`.
#[derive(Debug, Clone)]
pub struct ClientDir {
    pub name: String,
    pub dir: PathBuf,
    pub card: String,
    pub gateway: usize,
}

/// Runs `shoal ARGS`, panics with its stderr unless it succeeds; returns stdout.
pub fn shoal(args: &[&str]) -> String {
    let out = shoal_output(args);
    assert!(
        out.status.success(),
        "`shoal {}` failed: {}\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn shoal_output(args: &[&str]) -> Output {
    Command::new(SHOAL)
        .args(args)
        .env("SHOAL_LOG", "warn")
        .output()
        .expect("cannot run shoal")
}

/// Starts the network and sets up `clients` (name, gateway index) before the
/// authority's first document, so both gateways are in it.
pub fn start(
    dir: &Path,
    rates: Option<[f64; 3]>,
    clients: &[(&str, usize)],
) -> (Testnet, Vec<GatewayInit>, Vec<ClientDir>) {
    let cfg = TestnetConfig {
        bootstrap_secs: 6,
        workers: Some(1),
        lambda_m: 1.0,
        client_rates: rates,
        ..TestnetConfig::default()
    };
    let shoal_bin = Path::new(SHOAL);
    let mut net = Testnet::start(shoal_bin, &dir.join("net"), &cfg).expect("testnet");
    let gateways: Vec<GatewayInit> = (0..2)
        .map(|g| {
            net.init_gateway(shoal_bin, g, &GatewayOptions::default())
                .expect("gateway init")
        })
        .collect();
    let authority = format!(
        "{}={}",
        net.authority_addr,
        hex::encode(net.authorities.keys[0].0)
    );
    let mut made = Vec::new();
    for &(name, g) in clients {
        let gw = &gateways[g];
        let cdir = dir.join(name);
        let out = client_init(&cdir, name, gw, &authority);
        let field = |prefix: &str| field(&out, prefix);
        let hex32 = |s: String| {
            let mut b = [0u8; 32];
            hex::decode_to_slice(&s, &mut b).unwrap();
            b
        };
        // What the gateway operator runs, with the values `client init` printed.
        Testnet::add_account(
            shoal_bin,
            gw,
            &hex32(field("account key: ")),
            &hex32(field("mailbox: ")),
        )
        .expect("account add");
        made.push(ClientDir {
            name: name.to_string(),
            dir: cdir,
            card: field("contact card: "),
            gateway: g,
        });
    }
    for gw in &gateways {
        net.run_gateway(shoal_bin, gw.clone()).expect("gateway run");
    }
    (net, gateways, made)
}

/// The value after `prefix` on one of `out`'s lines.
pub fn field(out: &str, prefix: &str) -> String {
    out.lines()
        .find_map(|l| l.strip_prefix(prefix))
        .unwrap_or_else(|| panic!("no {prefix:?} in: {out}"))
        .trim()
        .to_string()
}

/// The admin's own client of [`start_subnet`] (`DIR/admin-client`, at gateway 0): it
/// carries the admin's gateway commands and policy updates through the mixnet.
pub fn admin_client(dir: &Path) -> ClientDir {
    ClientDir {
        name: "admin-client".into(),
        dir: dir.join("admin-client"),
        card: String::new(),
        gateway: 0,
    }
}

/// Sets up a subnet admin's own client ([`admin_client`]) at `gw`, which must not run
/// yet: `shoal client init`, the gateway operator's `shoal gateway account add` (an
/// account outside any subnet: the bootstrap), and `shoal admin use-client` for the
/// admin directory `admin`. Start it with [`run_client`] once the gateway runs.
pub fn prepare_admin_client(net: &Testnet, gw: &GatewayInit, admin: &str, dir: &Path) -> ClientDir {
    let authority = format!(
        "{}={}",
        net.authority_addr,
        hex::encode(net.authorities.keys[0].0)
    );
    let office = admin_client(dir);
    let out = client_init(&office.dir, "admin", gw, &authority);
    let hex32 = |s: String| {
        let mut b = [0u8; 32];
        hex::decode_to_slice(&s, &mut b).unwrap();
        b
    };
    Testnet::add_account(
        Path::new(SHOAL),
        gw,
        &hex32(field(&out, "account key: ")),
        &hex32(field(&out, "mailbox: ")),
    )
    .expect("admin client account");
    let used = shoal(&[
        "admin",
        "use-client",
        "--dir",
        admin,
        &office.dir.to_string_lossy(),
    ]);
    assert!(used.contains("go through the client at"), "{used}");
    office
}

/// The network with two gateways hosting a fresh subnet, and `people` (name, gateway)
/// enrolled in it by `shoal admin`, each with the admin's files in their directory.
///
/// As the guide does it: the admin's own client ([`admin_client`]) gets its account
/// from the gateway operator (`shoal gateway account add`, before the gateway runs),
/// `shoal admin use-client` names it, and its `shoal client run` (kept running in
/// `net.others`) carries every `shoal admin enroll` to the gateway through the mixnet.
pub fn start_subnet(dir: &Path, people: &[(&str, usize)]) -> (Testnet, Vec<ClientDir>) {
    let cfg = TestnetConfig {
        bootstrap_secs: 6,
        workers: Some(1),
        lambda_m: 1.0,
        ..TestnetConfig::default()
    };
    let bin = Path::new(SHOAL);
    let mut net = Testnet::start(bin, &dir.join("net"), &cfg).expect("testnet");
    let admin = dir.join("admin");
    let admin_s = admin.to_string_lossy().into_owned();
    let out = shoal(&["admin", "init", "--dir", &admin_s, "--name", "friends"]);
    let mut subnet = [0u8; 32];
    hex::decode_to_slice(field(&out, "subnet id:"), &mut subnet).unwrap();
    let gateways: Vec<GatewayInit> = (0..2)
        .map(|g| {
            let init = net
                .init_gateway(bin, g, &GatewayOptions::default())
                .expect("gateway init");
            Testnet::host_subnet(&init, &subnet).unwrap();
            init
        })
        .collect();
    let authority = format!(
        "{}={}",
        net.authority_addr,
        hex::encode(net.authorities.keys[0].0)
    );
    let office = prepare_admin_client(&net, &gateways[0], &admin_s, dir);
    for gw in &gateways {
        net.run_gateway(bin, gw.clone()).expect("gateway run");
    }
    net.others.push(run_client(&office));
    let mut made = Vec::new();
    // The gateway index asked for is ignored: a member's gateway is the public rule's
    // choice for its key (`client init` picks it among all of them; its client refuses
    // any other), so subnets share gateways.
    for &(name, _) in people {
        let cdir = dir.join(name);
        let out = client_init_member(&cdir, name, &gateways, &authority);
        let chosen = field(&out, "gateway: ");
        let g = gateways
            .iter()
            .position(|gw| chosen.starts_with(&format!("{}={}", gw.link_addr, hex::encode(gw.id))))
            .expect("the chosen gateway is one of those given");
        let gw = &gateways[g];
        let card = field(&out, "contact card: ");
        enroll_member(&admin, &cdir, name, gw, &out);
        made.push(ClientDir {
            name: name.to_string(),
            dir: cdir,
            card,
            gateway: g,
        });
    }
    (net, made)
}

/// `shoal admin enroll` of the client at `cdir` (`init_out`: what its `client init`
/// printed) at gateway `gw`, and the admin's files copied into its directory.
pub fn enroll_member(admin: &Path, cdir: &Path, name: &str, gw: &GatewayInit, init_out: &str) {
    let admin_s = admin.to_string_lossy().into_owned();
    // What `shoal client init` prints for the admin, and nothing else (the guide's
    // path). The seal key is for the admin's policy updates only: members sign
    // their own into their cards.
    let enroll = [
        "admin",
        "enroll",
        "--dir",
        &admin_s,
        "--gateway",
        &gw.client_addr.to_string(),
        "--gateway-key",
        &hex::encode(gw.id),
        "--handle",
        name,
        "--role",
        "member",
        "--account-key",
        &field(init_out, "account key: "),
        "--identity-key",
        &field(init_out, "identity key: "),
        "--mailbox",
        &field(init_out, "mailbox: "),
        "--seal-key",
        &field(init_out, "seal key: "),
    ];
    // The gateway process may still be starting: retry until it answers.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = shoal_output(&enroll);
        if out.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "admin enroll {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // What the admin hands the person.
    std::fs::copy(
        admin.join("members").join(format!("{name}.cred")),
        cdir.join("credential"),
    )
    .unwrap();
    std::fs::copy(admin.join("policy.json"), cdir.join("policy")).unwrap();
}

/// `shoal client init` for `name` on `gw`, as a person runs it; returns its output.
pub fn client_init(cdir: &Path, name: &str, gw: &GatewayInit, authority: &str) -> String {
    shoal(&[
        "client",
        "init",
        "--dir",
        &cdir.to_string_lossy(),
        "--gateway",
        &format!("{}={}", gw.link_addr, hex::encode(gw.id)),
        "--gateway-client-addr",
        &gw.client_addr.to_string(),
        "--authority",
        authority,
        "--threshold",
        "1",
        "--name",
        name,
    ])
}

/// `shoal client init` for a member: every gateway is named, and the rule picks one.
pub fn client_init_member(
    cdir: &Path,
    name: &str,
    gateways: &[GatewayInit],
    authority: &str,
) -> String {
    let mut args: Vec<String> = ["client", "init", "--dir", &cdir.to_string_lossy()]
        .map(str::to_owned)
        .to_vec();
    for gw in gateways {
        args.push("--gateway".into());
        args.push(format!("{}={}", gw.link_addr, hex::encode(gw.id)));
        args.push("--gateway-client-addr".into());
        args.push(gw.client_addr.to_string());
    }
    for a in ["--authority", authority, "--threshold", "1", "--name", name] {
        args.push(a.into());
    }
    shoal(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

/// Rewrites `pull_interval_ms` in a client's config.
pub fn set_pull_interval(client: &ClientDir, ms: u64) {
    let path = client.dir.join("client.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let text: Vec<String> = text
        .lines()
        .map(|l| {
            if l.trim_start().starts_with("pull_interval_ms") {
                format!("pull_interval_ms = {ms}")
            } else {
                l.to_string()
            }
        })
        .collect();
    assert!(
        text.iter()
            .any(|l| l == &format!("pull_interval_ms = {ms}"))
    );
    std::fs::write(&path, text.join("\n") + "\n").unwrap();
}

/// `shoal client run` in the background; stdout goes to `DIR/run.out`.
pub fn run_client(client: &ClientDir) -> Proc {
    let out = std::fs::File::create(client.dir.join("run.out")).unwrap();
    let err = std::fs::File::create(client.dir.join("run.log")).unwrap();
    let child = Command::new(SHOAL)
        .args([
            "client",
            "run",
            "--config",
            &client.dir.join("client.toml").to_string_lossy(),
        ])
        .env("SHOAL_LOG", "info")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .expect("client run");
    let pid = child.id();
    let proc = Proc::from_child(&client.name, child);
    // Returns once it holds the store (it writes DIR/client.pid then), so a command run
    // next hands its work to it rather than finding the store free.
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::fs::read_to_string(client.dir.join("client.pid"))
        .map_or(true, |p| p.trim() != pid.to_string())
    {
        assert!(
            Instant::now() < deadline,
            "{}'s client never took its store: {}",
            client.name,
            std::fs::read_to_string(client.dir.join("run.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    proc
}

/// Asks a process to stop as a person would (Ctrl-C / SIGTERM).
pub fn sigterm(pid: u32) {
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
}

/// What a background client printed so far.
pub fn run_output(client: &ClientDir) -> String {
    std::fs::read_to_string(client.dir.join("run.out")).unwrap_or_default()
}

pub fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "shoal-{tag}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Waits until `c`'s background `run` printed a line satisfying `pred`.
pub fn wait_run_line(c: &ClientDir, what: &str, timeout: Duration, pred: impl Fn(&str) -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if run_output(c).lines().any(&pred) {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!(
        "{}: no {what} within {timeout:?}; run printed:\n{}\n--- log ---\n{}",
        c.name,
        run_output(c),
        std::fs::read_to_string(c.dir.join("run.log")).unwrap_or_default()
    );
}

/// SIGTERM to a background `client run` (it may have ended already), then waits until
/// it is gone (at most 10 s).
pub fn stop(p: &mut Proc) {
    sigterm(p.pid());
    let deadline = Instant::now() + Duration::from_secs(10);
    while p.alive() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!p.alive(), "client run ignored SIGTERM");
}

/// A client started in the background with `shoal client start`, the way a person
/// runs one; `shoal client stop` when dropped (also when a test fails).
#[derive(Debug)]
pub struct Background {
    dir: PathBuf,
    stopped: bool,
}

/// `shoal client start --dir DIR`: returns once the client holds its store.
pub fn start_background(dir: &Path) -> Background {
    let out = shoal(&["client", "start", "--dir", &dir.to_string_lossy()]);
    assert!(out.contains("running in the background"), "{out}");
    Background {
        dir: dir.to_path_buf(),
        stopped: false,
    }
}

impl Background {
    /// `shoal client stop`; returns once the store is free again.
    pub fn stop(mut self) {
        self.stopped = true;
        let out = shoal(&["client", "stop", "--dir", &self.dir.to_string_lossy()]);
        assert!(out.contains("the client stopped"), "{out}");
    }

    /// What the background client wrote to `DIR/client.log`.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("client.log")).unwrap_or_default()
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if !self.stopped {
            let _ = shoal_output(&["client", "stop", "--dir", &self.dir.to_string_lossy()]);
        }
    }
}

/// Requests waiting in a client's outbox for its running client.
pub fn outbox_len(dir: &Path) -> usize {
    std::fs::read_dir(dir.join("outbox"))
        .map(|d| {
            d.flatten()
                .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
                .count()
        })
        .unwrap_or(0)
}

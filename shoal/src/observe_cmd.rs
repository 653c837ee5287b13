//! `shoal observe`: the global passive adversary as a tool. On a capture the user supplies
//! it reads the pcap and the public directory, runs every attack of
//! [`shoal_sim::observe`] and, given a truth file, scores them. With `--testnet` it
//! starts a network of real processes on loopback (4 subnets on shared gateways, two of
//! them federated and talking in bursts), captures every link with tcpdump, writes the
//! truth file, and runs the attacks on the current design and on the control with the
//! leaks switched back on. See docs/guides/observe.md.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;
use shoal_bench::testnet::{
    GatewayInit, GatewayOptions, Proc, SegmentedLoopback, Tcpdump, Testnet, TestnetConfig,
    shoal_binary, udp_addrs_of,
};
use shoal_sim::observe::{
    Knowledge, Options, Report, Truth, TruthClient, TruthSend, View, Workload, read_pcap,
};

#[derive(clap::Args, Debug)]
pub struct ObserveArgs {
    /// Packet capture (classic pcap, as `tcpdump -w` writes it).
    #[arg(required_unless_present = "testnet")]
    capture: Option<PathBuf>,
    /// Public directory documents (JSON, as an authority serves `/v1/document/current`).
    #[arg(long, value_name = "DOC.json", num_args = 1..)]
    directory: Vec<PathBuf>,
    /// A gateway's client-facing address, `FRONT` or `FRONT=LINK` (LINK: the gateway's
    /// link address in the directory). Without any, fronts are inferred from the capture.
    #[arg(long = "gateway-front", value_name = "ADDR[=LINK]")]
    fronts: Vec<String>,
    /// Ground truth to score the attacks against (format: docs/guides/observe.md).
    #[arg(long, value_name = "TRUTH.json")]
    truth: Option<PathBuf>,
    /// One JSON object on stdout instead of the table.
    #[arg(long)]
    json: bool,
    /// Window of the volume series, seconds.
    #[arg(long, default_value_t = 1.0)]
    window_secs: f64,
    /// Seed of the bootstrap intervals.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Also print each client link found (names addresses from the capture).
    #[arg(long)]
    verbose: bool,
    /// Start a network on loopback, capture it, and observe it (needs root and tcpdump).
    #[arg(long, conflicts_with = "capture")]
    testnet: bool,
    /// With --testnet: minutes of traffic captured per run (two runs: design and control).
    #[arg(long, default_value_t = 2.5)]
    minutes: f64,
    /// With --testnet: keep the network directory (captures, truth, directory, logs) here.
    #[arg(long, value_name = "DIR")]
    keep: Option<PathBuf>,
}

pub fn run(args: ObserveArgs) -> anyhow::Result<()> {
    if !(args.window_secs > 0.0 && args.window_secs.is_finite()) {
        bail!("--window-secs must be positive");
    }
    let opts = Options {
        window_s: args.window_secs,
        seed: args.seed,
        ..Options::default()
    };
    if args.testnet {
        return testnet(&args, &opts);
    }
    let capture = args.capture.as_deref().context("give a capture file")?;
    let mut knowledge = Knowledge::default();
    for doc in &args.directory {
        let bytes = std::fs::read(doc).with_context(|| format!("cannot read {}", doc.display()))?;
        knowledge
            .add_document(&bytes)
            .with_context(|| format!("{}", doc.display()))?;
    }
    for f in &args.fronts {
        let (front, link) = match f.split_once('=') {
            Some((a, b)) => (
                a,
                Some(b.parse::<SocketAddr>().context("--gateway-front LINK")?),
            ),
            None => (f.as_str(), None),
        };
        knowledge.add_front(front.parse().context("--gateway-front ADDR")?, link);
    }
    let truth = match &args.truth {
        Some(p) => Truth::from_json(
            &std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?,
        )?,
        None => Truth::default(),
    };
    let report = observe(capture, &knowledge, &truth, &opts, args.verbose)?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.text());
        if args.truth.is_none() {
            println!("(no --truth: nothing to score against; see docs/guides/observe.md)");
        }
    }
    Ok(())
}

/// Reads the capture, builds the observer's view and runs the attacks.
fn observe(
    capture: &Path,
    knowledge: &Knowledge,
    truth: &Truth,
    opts: &Options,
    verbose: bool,
) -> anyhow::Result<Report> {
    let file = std::fs::File::open(capture)
        .with_context(|| format!("cannot open {}", capture.display()))?;
    let datagrams = read_pcap(std::io::BufReader::new(file))?;
    let view = View::build(&datagrams, knowledge);
    if verbose {
        // Asked for: the per-link detail names the capture's own addresses.
        for (i, c) in view.clients.iter().enumerate() {
            eprintln!(
                "client {i} {c}: {} up, {} down, gateway front {}",
                view.up[i].len(),
                view.down[i].len(),
                view.fronts[view.client_front[i]]
            );
        }
    }
    Ok(Report::build(&view, truth, opts))
}

// ---- --testnet ----

const SUBNETS: usize = 4;
const PER_SUBNET: usize = 3;
const GATEWAYS: usize = 4;
/// Gateways the current design's clients use (the others carry no client).
const SHARED_GATEWAYS: usize = 2;
/// The subnets that federate (and message each other); the others do not.
const FEDERATED: (usize, usize) = (0, 1);

/// Which run of the experiment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Design {
    /// What the code does now: subnets spread over shared gateways.
    Current,
    /// The leaks switched back on, each subnet on its own gateway (as the demo does).
    Control,
}

impl Design {
    fn name(self) -> &'static str {
        match self {
            Design::Current => "current",
            Design::Control => "control",
        }
    }

    /// The gateway of member `m` of subnet `s`. Current: members round-robin over the
    /// first `SHARED_GATEWAYS`, the same for every subnet, so which gateway a client uses
    /// says nothing of its subnet (until the shared-gateway rule decides this); control:
    /// one gateway per subnet.
    fn gateway(self, s: usize, m: usize) -> usize {
        match self {
            Design::Current => m % SHARED_GATEWAYS,
            Design::Control => s % GATEWAYS,
        }
    }
}

/// Whether this build's client config has the test-only `[testing] legacy_leaks` knob
/// (it restores the pre-fix cover routing, λP rule and ack frames for the control).
const LEGACY_LEAKS_KNOB: bool = true;

/// Switches the leaks back on in one client's config for the control run: the one place
/// the knob is written. Returns false when this build has no knob.
fn enable_legacy_leaks(client_toml: &Path) -> anyhow::Result<bool> {
    if !LEGACY_LEAKS_KNOB {
        return Ok(false);
    }
    let text = std::fs::read_to_string(client_toml)?;
    let text = if text.contains("[testing]") {
        text.replacen("[testing]", "[testing]\nlegacy_leaks = true", 1)
    } else {
        format!("{text}\n[testing]\nlegacy_leaks = true\n")
    };
    std::fs::write(client_toml, text)?;
    Ok(true)
}

#[derive(Serialize)]
struct TestnetReport {
    #[serde(flatten)]
    current: Report,
    control: Report,
    /// Whether the control's clients had the `legacy_leaks` knob set.
    control_knob: bool,
}

fn testnet(args: &ObserveArgs, opts: &Options) -> anyhow::Result<()> {
    if !(args.minutes > 0.0 && args.minutes <= 60.0) {
        bail!("--minutes must be in (0, 60]");
    }
    let dir = match &args.keep {
        Some(d) => d.clone(),
        None => {
            let mut id = [0u8; 6];
            rand::RngExt::fill(&mut rand::rng(), &mut id);
            std::env::temp_dir().join(format!("shoal-observe-{}", hex::encode(id)))
        }
    };
    std::fs::create_dir_all(&dir)?;
    let result = (|| {
        let (control, knob) = experiment(&dir.join("control"), Design::Control, args, opts)?;
        let (current, _) = experiment(&dir.join("current"), Design::Current, args, opts)?;
        Ok::<_, anyhow::Error>(TestnetReport {
            current: current.with_control(&control),
            control,
            control_knob: knob,
        })
    })();
    if args.keep.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        eprintln!("kept: {}", dir.display());
    }
    let report = result?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("== control (leaks switched back on, a gateway per subnet) ==");
        if !report.control_knob {
            println!(
                "   note: this client has no [testing] legacy_leaks knob yet; the control ran today's client as is"
            );
        }
        print!("{}", report.control.text());
        println!("== current design (shared gateways) ==");
        print!("{}", report.current.text());
    }
    Ok(())
}

/// A client of the experiment.
struct Member {
    name: String,
    subnet: usize,
    dir: PathBuf,
    card: String,
    gateway: usize,
}

fn shoal_cmd(shoal: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(shoal)
        .args(args)
        .env("SHOAL_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {}", shoal.display()))?;
    if !out.status.success() {
        bail!(
            "`shoal {}` failed: {}",
            args.first().copied().unwrap_or(""),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn field(out: &str, prefix: &str) -> anyhow::Result<String> {
    out.lines()
        .find_map(|l| l.strip_prefix(prefix))
        .map(|v| v.trim().to_string())
        .with_context(|| format!("no {prefix:?} in a command's output"))
}

fn hex32(s: &str) -> anyhow::Result<[u8; 32]> {
    let h: shoal_topology::Hex32 = s.parse().map_err(anyhow::Error::msg)?;
    Ok(h.0)
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Polls `f` every 100 ms until it is true or `timeout` passes.
fn poll(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    f()
}

/// Partners a member sends to: everyone in its subnet, and across the federation.
fn partners(members: &[Member], m: usize) -> Vec<usize> {
    let s = members[m].subnet;
    let fed = |a: usize, b: usize| (a.min(b), a.max(b)) == FEDERATED;
    (0..members.len())
        .filter(|&o| o != m && (members[o].subnet == s || fed(s, members[o].subnet)))
        .collect()
}

/// One run: network up, clients warm, capture, bursts of real messages, capture down,
/// truth and directory written next to the capture, attacks run.
fn experiment(
    dir: &Path,
    design: Design,
    args: &ObserveArgs,
    opts: &Options,
) -> anyhow::Result<(Report, bool)> {
    let shoal = shoal_binary()?;
    eprintln!("observe: {} run: starting the network", design.name());
    // The first document is voted once, `bootstrap_secs` after the authority starts, and
    // the next only at the next epoch (an hour on): every gateway must have posted its
    // descriptor by then. The gateways start only after every client's account is on
    // them, which took 6 s on a loaded 2-core machine, and at 6 s a run lost the race
    // (two gateways missing, their clients never acked).
    let cfg = TestnetConfig {
        bootstrap_secs: 30,
        workers: Some(1),
        lambda_m: 1.0,
        ..TestnetConfig::default()
    };
    let mut net = Testnet::start(&shoal, &dir.join("net"), &cfg)?;
    let gateways: Vec<GatewayInit> = (0..GATEWAYS)
        .map(|g| net.init_gateway(&shoal, g, &GatewayOptions::default()))
        .collect::<anyhow::Result<_>>()?;
    let authority = format!(
        "{}={}",
        net.authority_addr,
        hex::encode(net.authorities.keys.first().context("no authority")?.0)
    );
    let mut members = Vec::new();
    let mut knob = false;
    for s in 0..SUBNETS {
        for m in 0..PER_SUBNET {
            let name = format!("s{s}m{m}");
            let g = design.gateway(s, m);
            let gw = &gateways[g];
            let cdir = dir.join(&name);
            let out = shoal_cmd(
                &shoal,
                &[
                    "client",
                    "init",
                    "--dir",
                    &cdir.to_string_lossy(),
                    "--gateway",
                    &format!("{}={}", gw.link_addr, hex::encode(gw.id)),
                    "--gateway-client-addr",
                    &gw.client_addr.to_string(),
                    "--authority",
                    &authority,
                    "--threshold",
                    "1",
                    "--name",
                    &name,
                ],
            )?;
            Testnet::add_account(
                &shoal,
                gw,
                &hex32(&field(&out, "account key: ")?)?,
                &hex32(&field(&out, "mailbox: ")?)?,
            )?;
            if design == Design::Control {
                knob = enable_legacy_leaks(&cdir.join("client.toml"))?;
            }
            members.push(Member {
                name,
                subnet: s,
                dir: cdir,
                card: field(&out, "contact card: ")?,
                gateway: g,
            });
        }
    }
    for m in 0..members.len() {
        for p in partners(&members, m) {
            shoal_cmd(
                &shoal,
                &[
                    "client",
                    "contact",
                    "add",
                    "--dir",
                    &members[m].dir.to_string_lossy(),
                    &members[p].name,
                    &members[p].card,
                ],
            )?;
        }
    }
    for gw in &gateways {
        net.run_gateway(&shoal, gw.clone())?;
    }
    let _segmented = SegmentedLoopback::hold()?;
    let mut runs: Vec<Proc> = Vec::new();
    for m in &members {
        let out = std::fs::File::create(m.dir.join("run.out"))?;
        let err = std::fs::File::create(m.dir.join("run.log"))?;
        let child = Command::new(&shoal)
            .args(["client", "run", "--config"])
            .arg(m.dir.join("client.toml"))
            .env("SHOAL_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .context("cannot start a client")?;
        runs.push(Proc::from_child(&m.name, child));
    }
    // `client send` spools to the store of a running client, but opens the store itself
    // when no `client run` holds it yet, and the run started a moment ago would then fail
    // to open it. A run binds its socket only after opening its store: wait for that.
    if !poll(Duration::from_secs(60), || {
        runs.iter()
            .all(|r| udp_addrs_of(r.pid()).is_ok_and(|a| !a.is_empty()))
    }) {
        bail!(
            "{} run: a client did not open its store within 60 s; {}",
            design.name(),
            net.exited()
        );
    }
    // Warm-up: every client sends one message and waits for its ack, so the network is
    // whole before the capture starts.
    eprintln!(
        "observe: {} run: waiting for every client to be acked once",
        design.name()
    );
    let send = |from: usize, to: usize, text: &str| -> anyhow::Result<f64> {
        let at = unix_now();
        shoal_cmd(
            &shoal,
            &[
                "client",
                "send",
                "--dir",
                &members[from].dir.to_string_lossy(),
                "--to",
                &members[to].name,
                "--no-wait",
                text,
            ],
        )?;
        Ok(at)
    };
    for m in 0..members.len() {
        let p = partners(&members, m);
        send(
            m,
            *p.first().context("a member without partners")?,
            "warm-up",
        )?;
    }
    let acked = |m: &Member| {
        std::fs::read_to_string(m.dir.join("run.out"))
            .is_ok_and(|o| o.contains("a sent message was acked"))
    };
    if !poll(Duration::from_secs(180), || members.iter().all(acked)) {
        bail!(
            "{} run: not every client was acked within 180 s; {}",
            design.name(),
            net.exited()
        );
    }
    // Which capture address is which client: the ground truth, from /proc.
    let mut truth = Truth {
        federated: vec![(format!("s{}", FEDERATED.0), format!("s{}", FEDERATED.1))],
        ..Truth::default()
    };
    let mut addr = Vec::new();
    for (m, run) in members.iter().zip(&runs) {
        let local = udp_addrs_of(run.pid())?
            .into_iter()
            .next()
            .context("a client holds no UDP socket")?;
        // Bound to the unspecified address, seen on the wire from loopback.
        let a = if local.ip().is_unspecified() {
            SocketAddr::from(([127, 0, 0, 1], local.port()))
        } else {
            local
        };
        addr.push(a);
        truth.clients.push(TruthClient {
            address: a,
            subnet: format!("s{}", m.subnet),
            gateway: gateways[m.gateway].link_addr,
        });
    }
    let pcap = dir.join("capture.pcap");
    let tcpdump = Tcpdump::start(&pcap)?;
    eprintln!(
        "observe: {} run: capturing {} min of traffic",
        design.name(),
        args.minutes
    );
    // Conversations (see `shoal_sim::observe::Workload`): bursts at half of λP, 1:1 and
    // group sends, half of the federated subnets' across the federation. The schedule
    // is the same one faithful mode replays; a send whose time has passed (a slow
    // `client send` before it) goes at once.
    let work = Workload::standard(
        members.len() as u32,
        SUBNETS as u32,
        args.minutes * 60.0,
        opts.seed,
    );
    debug_assert!(
        members
            .iter()
            .enumerate()
            .all(|(i, m)| work.subnet_of[i] as usize == m.subnet)
    );
    let began = Instant::now();
    let mut n = 0u64;
    for (at, from, to) in work.schedule() {
        let due = began + Duration::from_secs_f64(at);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        n += 1;
        let (from, to) = (from as usize, to as usize);
        let at = send(from, to, &format!("m{n}"))?;
        truth.sends.push(TruthSend {
            from: addr[from],
            to: addr[to],
            at,
        });
    }
    if let Some(rest) = (began + Duration::from_secs_f64(args.minutes * 60.0))
        .checked_duration_since(Instant::now())
    {
        std::thread::sleep(rest);
    }
    tcpdump.stop();
    // Public knowledge: the directory, and which front belongs to which gateway.
    let doc = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(shoal_link::http::get(
            net.authority_addr,
            "/v1/document/current",
        ))?
        .1;
    std::fs::write(dir.join("directory.json"), &doc)?;
    std::fs::write(dir.join("truth.json"), serde_json::to_vec_pretty(&truth)?)?;
    drop(runs);
    drop(net);
    let mut knowledge = Knowledge::default();
    knowledge.add_document(&doc)?;
    for g in &gateways {
        knowledge.add_front(g.client_addr, Some(g.link_addr));
    }
    eprintln!(
        "observe: {} run: {} real messages; attacking the capture",
        design.name(),
        truth.sends.len()
    );
    let report = observe(&pcap, &knowledge, &truth, opts, false)?;
    Ok((report, knob))
}

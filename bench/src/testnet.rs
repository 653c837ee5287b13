//! A network of real `shoal` processes on loopback: one authority and some relays,
//! each set up with its own `init` command and run with `run --config`.
//!
//! Used by the end-to-end tests, `shoal bench relay` and the demo. Processes are
//! killed when the [`Testnet`] is dropped, also on panic.

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use shoal_topology::{AuthoritySet, Hex32, NodeId};

/// A child process that is killed on drop.
#[derive(Debug)]
pub struct Proc {
    pub name: String,
    child: Child,
}

impl Proc {
    /// Takes ownership of a spawned child (killed on drop like the others).
    pub fn from_child(name: &str, child: Child) -> Self {
        Proc {
            name: name.to_string(),
            child,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGKILL and reaps the process.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A loopback address whose port was free for both UDP and TCP a moment ago.
///
/// Ports come from below the kernel's ephemeral range (32768 and up on Linux): the
/// port is bound later by another process, and meanwhile any socket bound to port 0 or
/// any outgoing connection (nodes fetch documents every second) could otherwise be
/// given the same port, and the node would fail to start. Each process walks the range
/// from its own offset and takes a port only if it can also lock that port's file in
/// the temp dir (`reserve`), so two processes (two demos in parallel, say) never pick
/// the same one before either has bound it.
pub fn free_port() -> anyhow::Result<SocketAddr> {
    const LOW: u32 = 10_000;
    const SPAN: u32 = 22_000;
    static BASE: OnceLock<u32> = OnceLock::new();
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let base = *BASE.get_or_init(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        (std::process::id().wrapping_mul(7919) ^ nanos) % SPAN
    });
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (LOW + (base + n) % SPAN) as u16;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        if UdpSocket::bind(addr).is_ok() && TcpListener::bind(addr).is_ok() && reserve(port) {
            return Ok(addr);
        }
    }
    bail!("no free loopback port in {LOW}..{}", LOW + SPAN)
}

/// Locks `port`'s file under the temp dir for the rest of this process's life (the
/// kernel drops the lock when the process exits, however it exits). False if another
/// process holds it. Without a usable lock directory or locks, every port counts as
/// reserved: the offsets alone make a clash unlikely.
fn reserve(port: u16) -> bool {
    static HELD: std::sync::Mutex<Vec<std::fs::File>> = std::sync::Mutex::new(Vec::new());
    let dir = std::env::temp_dir().join("shoal-ports");
    let file = std::fs::create_dir_all(&dir).and_then(|()| {
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(port.to_string()))
    });
    let Ok(file) = file else {
        return true;
    };
    match file.try_lock() {
        Ok(()) => {
            HELD.lock().unwrap_or_else(|e| e.into_inner()).push(file);
            true
        }
        Err(std::fs::TryLockError::WouldBlock) => false,
        // A file system without locks: fall back to the offsets.
        Err(std::fs::TryLockError::Error(_)) => true,
    }
}

/// Runs a `shoal` command that must succeed (init, account, ...) and returns its stdout.
pub(crate) fn run_init(shoal: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(shoal)
        .args(args)
        .env("SHOAL_LOG", "warn")
        .output()
        .with_context(|| format!("cannot run {}", shoal.display()))?;
    if !out.status.success() {
        bail!(
            "`shoal {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn spawn(shoal: &Path, name: &str, args: &[&str], log: &Path) -> anyhow::Result<Proc> {
    let log =
        std::fs::File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
    let child = Command::new(shoal)
        .args(args)
        .env(
            "SHOAL_LOG",
            std::env::var("SHOAL_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .with_context(|| format!("cannot start {name}"))?;
    Ok(Proc {
        name: name.to_string(),
        child,
    })
}

fn spawn_relay(shoal: &Path, dir: &Path, i: usize) -> anyhow::Result<Proc> {
    let config = dir.join(format!("relay{i}")).join("relay.toml");
    // Append to the log so a restart keeps the earlier run's lines.
    let log = dir.join(format!("relay{i}.log"));
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .with_context(|| format!("cannot open {}", log.display()))?;
    let child = Command::new(shoal)
        .args(["relay", "run", "--config", &config.to_string_lossy()])
        .env(
            "SHOAL_LOG",
            std::env::var("SHOAL_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(file)
        .spawn()
        .context("cannot start a relay")?;
    Ok(Proc {
        name: format!("relay{i}"),
        child,
    })
}

/// The 32 bytes printed in hex after `prefix` on a line of a command's output.
pub(crate) fn hex32_after(out: &str, prefix: &str) -> anyhow::Result<[u8; 32]> {
    let v = out
        .lines()
        .find_map(|l| l.strip_prefix(prefix))
        .with_context(|| format!("the command printed no {prefix:?}"))?;
    let mut b = [0u8; 32];
    hex::decode_to_slice(v.trim(), &mut b)?;
    Ok(b)
}

/// Replaces `key = ...` lines of a TOML file we generated ourselves.
pub(crate) fn set_keys(path: &Path, values: &[(&str, String)]) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(path)?;
    let mut out = String::new();
    for line in text.lines() {
        let key = line.split('=').next().unwrap_or("").trim();
        match values
            .iter()
            .find(|(k, _)| *k == key && !line.trim_start().starts_with('#'))
        {
            Some((k, v)) => out.push_str(&format!("{k} = {v}\n")),
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    std::fs::write(path, out)?;
    Ok(())
}

/// Stand-in seeds whose operators every test network admits from the start.
pub const STANDIN_SEEDS: u64 = 64;

/// Makes the node in `node_dir` the node of its own operator, as a real operator
/// would (docs/guides/run-a-node.md): `shoal operator keygen`, `shoal operator certify`
/// into the node's directory, and `shoal authority operator admit` at the testnet's
/// authority (`net_dir/authority`), which re-reads its operators every sync round, so
/// this works while it runs. One operator per node, so that routes in a small network
/// can keep every operator to one hop.
pub(crate) fn operate(
    shoal: &Path,
    net_dir: &Path,
    node_dir: &Path,
    id: &[u8; 32],
    role: &str,
) -> anyhow::Result<()> {
    let name = node_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let op_dir = net_dir.join("operators").join(&name);
    let out = run_init(
        shoal,
        &["operator", "keygen", "--dir", &op_dir.to_string_lossy()],
    )?;
    let op_key = out.lines().last().unwrap_or("").trim().to_string();
    run_init(
        shoal,
        &[
            "operator",
            "certify",
            "--dir",
            &op_dir.to_string_lossy(),
            "--node",
            &hex::encode(id),
            "--role",
            role,
            "--out",
            &node_dir.join("operator.cert").to_string_lossy(),
        ],
    )?;
    run_init(
        shoal,
        &[
            "authority",
            "operator",
            "admit",
            "--config",
            &net_dir
                .join("authority")
                .join("authority.toml")
                .to_string_lossy(),
            "--key",
            &op_key,
            "--name",
            &name,
            "--max-nodes",
            "1",
            "--max-per-layer",
            "1",
        ],
    )?;
    Ok(())
}

/// `shoal authority init` in `auth_dir`, listening on `listen`, with `cfg`'s schedule and
/// network parameters written into its config. Returns the authority's public key and
/// the config's path.
pub(crate) fn init_authority(
    shoal: &Path,
    auth_dir: &Path,
    listen: SocketAddr,
    cfg: &TestnetConfig,
) -> anyhow::Result<([u8; 32], PathBuf)> {
    let out = run_init(
        shoal,
        &[
            "authority",
            "init",
            "--dir",
            &auth_dir.to_string_lossy(),
            "--listen",
            &listen.to_string(),
            "--epoch-secs",
            &cfg.epoch_secs.to_string(),
        ],
    )?;
    let key_hex = out.lines().last().unwrap_or("").trim().to_string();
    let mut key = [0u8; 32];
    hex::decode_to_slice(&key_hex, &mut key).context("authority init did not print its key")?;
    let auth_config = auth_dir.join("authority.toml");
    let mut values = vec![
        ("sync_interval_secs", "1".to_string()),
        ("bootstrap_delay_secs", cfg.bootstrap_secs.to_string()),
        ("vote_lead_secs", (cfg.epoch_secs / 4).max(1).to_string()),
        ("mean_hop_delay_ms", format!("{:?}", cfg.mean_hop_delay_ms)),
        ("max_hop_delay_ms", format!("{:?}", cfg.max_hop_delay_ms)),
        ("lambda_m", format!("{:?}", cfg.lambda_m)),
    ];
    if let Some([p, l, d]) = cfg.client_rates {
        values.extend([
            ("lambda_p", format!("{p:?}")),
            ("lambda_l", format!("{l:?}")),
            ("lambda_d", format!("{d:?}")),
        ]);
    }
    if let Some(g) = cfg.key_grace_secs {
        values.push(("key_grace_secs", g.to_string()));
    }
    set_keys(&auth_config, &values)?;
    // Stand-ins (`StandIn::bind(seed)`, seeds below 64) are admitted in advance, each
    // its own operator, so that tests can register them at any time.
    let mut operators = std::fs::read_to_string(auth_dir.join("operators.toml"))?;
    for seed in 0..STANDIN_SEEDS {
        operators.push_str(&format!(
            "\n[[operators]]\nkey = \"{}\"\nname = \"stand-in {seed}\"\nmax_nodes = 1\nmax_per_layer = 1\n",
            crate::standin::StandIn::operator_hex_for_seed(seed)
        ));
    }
    std::fs::write(auth_dir.join("operators.toml"), operators)?;
    Ok((key, auth_config))
}

/// What kind of network to start.
#[derive(Debug, Clone)]
pub struct TestnetConfig {
    pub relays_per_layer: usize,
    /// Relays beyond `3 × relays_per_layer` (the authority assigns them layers too).
    pub extra_relays: usize,
    pub mean_hop_delay_ms: f64,
    pub max_hop_delay_ms: f64,
    pub lambda_m: f64,
    /// The authority waits this long for descriptors before publishing the first document.
    pub bootstrap_secs: u64,
    pub epoch_secs: u64,
    /// Worker threads per relay (None: all cores).
    pub workers: Option<usize>,
    /// Client cover rates λP, λL, λD (None: the authority's defaults).
    pub client_rates: Option<[f64; 3]>,
    /// How long a retired Sphinx key keeps unwrapping (None: the authority's default).
    pub key_grace_secs: Option<u64>,
    /// Test-only: restores the pre-fix deployment, in which each subnet's members sit at
    /// one gateway that hosts only that subnet ([`assign_gateway`]), and clients use the
    /// pre-fix cover routing (`ClientConfig::legacy_leaks`). For control runs of the
    /// attacks that show the leaks; never in use.
    pub legacy_leaks: bool,
}

/// The gateway (an index into `gateways`) a member with account key `account` uses: the
/// directory's rule, rendezvous hashing of the key (`shoal_topology::gateway_for_member`),
/// the same for the member's client and the admin who enrols it, whatever its subnet.
/// With `legacy_leaks` it is `by_subnet`, the gateway of the member's subnet, as before.
pub fn assign_gateway(
    legacy_leaks: bool,
    gateways: &[NodeId],
    account: &[u8; 32],
    by_subnet: usize,
) -> usize {
    if legacy_leaks {
        return by_subnet;
    }
    shoal_topology::gateway_for_member(gateways, account)
        .and_then(|g| gateways.iter().position(|x| *x == g))
        .unwrap_or(by_subnet)
}

impl Default for TestnetConfig {
    fn default() -> Self {
        TestnetConfig {
            relays_per_layer: 2,
            extra_relays: 0,
            mean_hop_delay_ms: 20.0,
            max_hop_delay_ms: 500.0,
            lambda_m: 0.0,
            bootstrap_secs: 4,
            epoch_secs: 3600,
            workers: None,
            client_rates: None,
            key_grace_secs: None,
            legacy_leaks: false,
        }
    }
}

/// A running relay process.
#[derive(Debug)]
pub struct RelayProc {
    pub proc: Proc,
    pub id: NodeId,
    pub link_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
}

/// One authority and `3 × relays_per_layer` relays, as real processes.
#[derive(Debug)]
pub struct Testnet {
    pub dir: PathBuf,
    pub authority: Proc,
    pub authority_addr: SocketAddr,
    pub authorities: AuthoritySet,
    pub relays: Vec<RelayProc>,
    /// Gateways started with [`Testnet::run_gateway`].
    pub gateways: Vec<GatewayProc>,
    /// Other processes that live as long as the network (a subnet admin's running
    /// client in the CLI tests), killed with it.
    pub others: Vec<Proc>,
}

/// Gateway settings the testnet writes into `gateway.toml`.
#[derive(Debug, Clone)]
pub struct GatewayOptions {
    /// Seconds before an offered, unacked mailbox item is offered again.
    pub redelivery_timeout_secs: u64,
    /// Worker threads (None: all cores).
    pub workers: Option<usize>,
    /// Items a new account's mailbox may hold (None: the template's default).
    pub default_quota: Option<u32>,
}

impl GatewayOptions {
    /// Writes these options into the `gateway.toml` that `shoal gateway init` made.
    pub(crate) fn write_into(&self, config: &Path) -> anyhow::Result<()> {
        let mut keys = vec![(
            "redelivery_timeout_secs",
            self.redelivery_timeout_secs.to_string(),
        )];
        if let Some(q) = self.default_quota {
            keys.push(("default_quota", q.to_string()));
        }
        set_keys(config, &keys)?;
        if let Some(w) = self.workers {
            let text = std::fs::read_to_string(config)?;
            std::fs::write(config, format!("workers = {w}\n{text}"))?;
        }
        Ok(())
    }
}

impl Default for GatewayOptions {
    fn default() -> Self {
        GatewayOptions {
            redelivery_timeout_secs: 2,
            workers: Some(1),
            default_quota: None,
        }
    }
}

/// A gateway set up with `shoal gateway init`, not yet running. Register accounts
/// (`shoal gateway account add` needs the store, which a running gateway locks), then
/// hand it to [`Testnet::run_gateway`].
#[derive(Debug, Clone)]
pub struct GatewayInit {
    pub name: String,
    pub config: PathBuf,
    pub id: NodeId,
    pub link_addr: SocketAddr,
    pub client_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
}

/// A running gateway process.
#[derive(Debug)]
pub struct GatewayProc {
    pub proc: Proc,
    pub init: GatewayInit,
}

impl Testnet {
    /// Sets up gateway number `index` under the testnet's directory.
    pub fn init_gateway(
        &self,
        shoal: &Path,
        index: usize,
        opts: &GatewayOptions,
    ) -> anyhow::Result<GatewayInit> {
        let name = format!("gateway{index}");
        let gdir = self.dir.join(&name);
        let link_addr = free_port()?;
        let client_addr = free_port()?;
        let metrics_addr = free_port()?;
        let key_hex = hex::encode(self.authorities.keys.first().context("no authority")?.0);
        let out = run_init(
            shoal,
            &[
                "gateway",
                "init",
                "--dir",
                &gdir.to_string_lossy(),
                "--listen",
                &link_addr.to_string(),
                "--client-listen",
                &client_addr.to_string(),
                "--metrics",
                &metrics_addr.to_string(),
                "--authority",
                &format!("{}={key_hex}", self.authority_addr),
                "--threshold",
                "1",
            ],
        )?;
        let id_hex = out
            .lines()
            .find_map(|l| l.strip_prefix("gateway identity: "))
            .context("gateway init did not print its identity")?;
        let mut id = [0u8; 32];
        hex::decode_to_slice(id_hex.trim(), &mut id)?;
        operate(shoal, &self.dir, &gdir, &id, "gateway")?;
        let config = gdir.join("gateway.toml");
        opts.write_into(&config)?;
        Ok(GatewayInit {
            name,
            config,
            id,
            link_addr,
            client_addr,
            metrics_addr,
        })
    }

    /// Registers an account (Ed25519 link key, mailbox address) at a stopped gateway.
    pub fn add_account(
        shoal: &Path,
        gateway: &GatewayInit,
        key: &[u8; 32],
        mailbox: &[u8; 32],
    ) -> anyhow::Result<()> {
        run_init(
            shoal,
            &[
                "gateway",
                "account",
                "add",
                "--config",
                &gateway.config.to_string_lossy(),
                "--key",
                &hex::encode(key),
                "--mailbox",
                &hex::encode(mailbox),
            ],
        )?;
        Ok(())
    }

    /// Adds `subnet` (an admin's public key, as `shoal admin init` prints it) to the
    /// subnets a stopped gateway hosts.
    pub fn host_subnet(gateway: &GatewayInit, subnet: &[u8; 32]) -> anyhow::Result<()> {
        let text = std::fs::read_to_string(&gateway.config)?;
        let entry = format!("\"{}\"", hex::encode(subnet));
        let out = match text.lines().position(|l| l.starts_with("subnets = [")) {
            Some(i) => text
                .lines()
                .enumerate()
                .map(|(j, l)| {
                    if j == i {
                        l.replacen('[', &format!("[{entry}, "), 1)
                    } else {
                        l.to_owned()
                    }
                })
                .collect::<Vec<_>>()
                .join("\n"),
            // Top-level keys go before the first table.
            None => format!("subnets = [{entry}]\n{text}"),
        };
        std::fs::write(&gateway.config, out)?;
        Ok(())
    }

    /// Starts a gateway process.
    pub fn run_gateway(&mut self, shoal: &Path, init: GatewayInit) -> anyhow::Result<()> {
        let proc = spawn(
            shoal,
            &init.name,
            &["gateway", "run", "--config", &init.config.to_string_lossy()],
            &self.dir.join(format!("{}.log", init.name)),
        )?;
        self.gateways.push(GatewayProc { proc, init });
        Ok(())
    }

    /// Initialises and starts every process under `dir`. Returns once they are running;
    /// the first document appears `bootstrap_secs` after the authority starts.
    pub fn start(shoal: &Path, dir: &Path, cfg: &TestnetConfig) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let auth_dir = dir.join("authority");
        let authority_addr = free_port()?;
        let (key, auth_config) = init_authority(shoal, &auth_dir, authority_addr, cfg)?;

        // Every `init` runs before anything starts: the bootstrap delay counts from the
        // authority's start, and on a loaded machine the inits alone can outlast it.
        let mut relay_inits = Vec::new();
        for i in 0..cfg.relays_per_layer * shoal_packet::MIX_LAYERS + cfg.extra_relays {
            let rdir = dir.join(format!("relay{i}"));
            let link_addr = free_port()?;
            let metrics_addr = free_port()?;
            let out = run_init(
                shoal,
                &[
                    "relay",
                    "init",
                    "--dir",
                    &rdir.to_string_lossy(),
                    "--listen",
                    &link_addr.to_string(),
                    "--metrics",
                    &metrics_addr.to_string(),
                    "--authority",
                    &format!("{authority_addr}={}", hex::encode(key)),
                    "--threshold",
                    "1",
                ],
            )?;
            let id_hex = out
                .lines()
                .find_map(|l| l.strip_prefix("relay identity: "))
                .context("relay init did not print its identity")?;
            let mut id = [0u8; 32];
            hex::decode_to_slice(id_hex.trim(), &mut id)?;
            operate(shoal, dir, &rdir, &id, "relay")?;
            let config = rdir.join("relay.toml");
            if let Some(w) = cfg.workers {
                let text = std::fs::read_to_string(&config)?;
                std::fs::write(&config, format!("workers = {w}\n{text}"))?;
            }
            relay_inits.push((id, link_addr, metrics_addr));
        }
        let authority = spawn(
            shoal,
            "authority",
            &[
                "authority",
                "run",
                "--config",
                &auth_config.to_string_lossy(),
            ],
            &dir.join("authority.log"),
        )?;
        let mut relays = Vec::new();
        for (i, (id, link_addr, metrics_addr)) in relay_inits.into_iter().enumerate() {
            relays.push(RelayProc {
                proc: spawn_relay(shoal, dir, i)?,
                id,
                link_addr,
                metrics_addr,
            });
        }
        Ok(Testnet {
            dir: dir.to_path_buf(),
            authority,
            authority_addr,
            authorities: AuthoritySet {
                threshold: 1,
                keys: vec![Hex32(key)],
            },
            relays,
            gateways: Vec::new(),
            others: Vec::new(),
        })
    }

    /// Admits an operator (e.g. a stand-in's, [`crate::standin::StandIn::operator_hex`]) at
    /// the running authority, with room for one node.
    pub fn admit_operator(&self, shoal: &Path, key_hex: &str, name: &str) -> anyhow::Result<()> {
        run_init(
            shoal,
            &[
                "authority",
                "operator",
                "admit",
                "--config",
                &self
                    .dir
                    .join("authority")
                    .join("authority.toml")
                    .to_string_lossy(),
                "--key",
                key_hex,
                "--name",
                name,
                "--max-nodes",
                "1",
                "--max-per-layer",
                "1",
            ],
        )?;
        Ok(())
    }

    /// Starts relay `i` again from its config (after a kill); its keys are on disk.
    pub fn restart_relay(&mut self, shoal: &Path, i: usize) -> anyhow::Result<()> {
        let proc = spawn_relay(shoal, &self.dir, i)?;
        let r = self.relays.get_mut(i).context("no such relay")?;
        r.proc = proc;
        Ok(())
    }

    pub fn relay_ids(&self) -> Vec<NodeId> {
        self.relays.iter().map(|r| r.id).collect()
    }

    /// Reads one counter or gauge (summing all label sets) from a relay's `/metrics`.
    pub async fn metric(&self, relay: usize, name: &str) -> anyhow::Result<f64> {
        let r = self.relays.get(relay).context("no such relay")?;
        let (_, body) = shoal_link::http::get(r.metrics_addr, "/metrics").await?;
        Ok(sum_metric(&String::from_utf8_lossy(&body), name))
    }

    /// The tail of a process's log, for failure messages.
    pub fn log_tail(&self, name: &str) -> String {
        log_tail(&self.dir, name)
    }

    /// Every process that has exited, with its log tail, for failure messages.
    pub fn exited(&mut self) -> String {
        exited(
            &self.dir,
            std::iter::once(&mut self.authority)
                .chain(self.relays.iter_mut().map(|r| &mut r.proc))
                .chain(self.gateways.iter_mut().map(|g| &mut g.proc)),
        )
    }
}

/// The last 20 lines of `dir/name.log`.
pub(crate) fn log_tail(dir: &Path, name: &str) -> String {
    let text = std::fs::read_to_string(dir.join(format!("{name}.log"))).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// Which of `procs` have exited, each with the tail of `dir/NAME.log`.
pub(crate) fn exited<'a>(dir: &Path, procs: impl Iterator<Item = &'a mut Proc>) -> String {
    let mut report = String::new();
    for p in procs {
        if p.alive() {
            continue;
        }
        report.push_str(&format!(
            "{} exited; its log ends:\n{}\n",
            p.name,
            log_tail(dir, &p.name)
        ));
    }
    if report.is_empty() {
        report.push_str("every process is still running\n");
    }
    report
}

/// Sums the samples of metric `name` (any labels) in Prometheus text.
pub fn sum_metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Finds the `shoal` binary next to the running executable (for `shoal bench` and
/// `shoal demo`), or at `CARGO_BIN_EXE_shoal`.
pub fn shoal_binary() -> anyhow::Result<PathBuf> {
    if let Ok(p) = std::env::var("CARGO_BIN_EXE_shoal") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    if exe.file_name().is_some_and(|n| n == "shoal") {
        return Ok(exe);
    }
    if let Some(dir) = exe.parent() {
        for cand in [dir.join("shoal"), dir.join("../shoal")] {
            if cand.exists() {
                return Ok(cand);
            }
        }
    }
    bail!("cannot find the shoal binary; build it with `cargo build -p shoal`")
}

/// Sleeps in small steps until `f` is true or `timeout` passes.
pub async fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    f()
}

/// `tcpdump -i lo udp` writing a pcap file, stopped (and flushed) by [`Tcpdump::stop`]
/// or killed on drop. Used by `shoal observe --testnet` and the capture tests.
#[derive(Debug)]
pub struct Tcpdump {
    proc: Proc,
}

impl Tcpdump {
    /// Starts the capture and returns once tcpdump listens. Fails with the reason when
    /// capturing is not possible here (not root, no tcpdump).
    pub fn start(file: &Path) -> anyhow::Result<Tcpdump> {
        use std::io::BufRead;
        let uid = Command::new("id")
            .arg("-u")
            .output()
            .context("cannot run id")?;
        if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
            bail!("capturing on lo needs root (tcpdump)");
        }
        let mut child = Command::new("tcpdump")
            .args(["-i", "lo", "-n", "-U", "-s", "96", "-B", "16384", "-w"])
            .arg(file)
            .arg("udp")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot run tcpdump; install it (apt-get install tcpdump)")?;
        let stderr = child.stderr.take().context("tcpdump stderr")?;
        let proc = Proc::from_child("tcpdump", child);
        // "listening on lo" comes before the first packet is taken.
        let mut err = std::io::BufReader::new(stderr);
        let mut line = String::new();
        err.read_line(&mut line)?;
        if !line.contains("listening") {
            bail!("tcpdump did not start: {}", line.trim());
        }
        std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::sink()));
        Ok(Tcpdump { proc })
    }

    /// SIGINT makes tcpdump write out what it buffered and exit; waits up to 10 s.
    pub fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-INT", &self.proc.pid().to_string()])
            .status();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while self.proc.alive() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// UDP segmentation offload on `lo` turned off while held, and restored on drop.
///
/// Links hand the kernel GSO runs of datagrams. A device that offloads UDP segmentation
/// (loopback does) is handed the run whole, so a capture there would see one large
/// datagram; with the offload off the kernel splits the run before the device, and the
/// capture sees what any wire carries.
#[derive(Debug)]
pub struct SegmentedLoopback {
    restore: bool,
}

impl SegmentedLoopback {
    const FEATURE: &str = "tx-udp-segmentation";

    /// Fails when ethtool cannot be run here.
    pub fn hold() -> anyhow::Result<Self> {
        let out = Command::new("ethtool")
            .args(["-k", "lo"])
            .output()
            .context("cannot run ethtool; install it (apt-get install ethtool)")?;
        if !out.status.success() {
            bail!("ethtool -k lo failed");
        }
        let on = String::from_utf8_lossy(&out.stdout).lines().any(|l| {
            l.trim_start()
                .starts_with(&format!("{}: on", Self::FEATURE))
        });
        if on {
            Self::set("off")?;
        }
        Ok(SegmentedLoopback { restore: on })
    }

    fn set(value: &str) -> anyhow::Result<()> {
        let status = Command::new("ethtool")
            .args(["-K", "lo", Self::FEATURE, value])
            .status()?;
        if !status.success() {
            bail!("ethtool -K lo {} {value} failed", Self::FEATURE);
        }
        Ok(())
    }
}

impl Drop for SegmentedLoopback {
    fn drop(&mut self) {
        if self.restore {
            let _ = Self::set("on");
        }
    }
}

/// The local addresses of the IPv4 UDP sockets process `pid` holds (from `/proc`): the
/// ground truth of which capture address is which client, for the truth file.
pub fn udp_addrs_of(pid: u32) -> anyhow::Result<Vec<SocketAddr>> {
    let mut inodes = std::collections::BTreeSet::new();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        let Ok(target) = std::fs::read_link(fd?.path()) else {
            continue;
        };
        let t = target.to_string_lossy();
        if let Some(n) = t.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')) {
            inodes.insert(n.to_string());
        }
    }
    let table = std::fs::read_to_string(format!("/proc/{pid}/net/udp"))?;
    let mut out = Vec::new();
    for line in table.lines().skip(1) {
        let cols: Vec<&str> = line.split_whitespace().collect();
        let (Some(local), Some(inode)) = (cols.get(1), cols.get(9)) else {
            continue;
        };
        if !inodes.contains(*inode) {
            continue;
        }
        let Some((ip, port)) = local.split_once(':') else {
            continue;
        };
        let (Ok(ip), Ok(port)) = (u32::from_str_radix(ip, 16), u16::from_str_radix(port, 16))
        else {
            continue;
        };
        // /proc prints the network-order address read as a native integer.
        let ip = std::net::Ipv4Addr::from(ip.to_ne_bytes());
        out.push(SocketAddr::from((ip, port)));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A port handed out stays locked: any other open of its file (as another test
    /// process's would be) cannot take it.
    #[test]
    fn our_own_udp_socket_is_found_in_proc() {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = sock.local_addr().unwrap();
        assert!(udp_addrs_of(std::process::id()).unwrap().contains(&addr));
    }

    #[test]
    fn a_handed_out_port_is_reserved_against_other_processes() {
        let a = free_port().unwrap();
        let b = free_port().unwrap();
        assert_ne!(a, b);
        assert!(!reserve(a.port()));
        assert!(!reserve(b.port()));
    }
}

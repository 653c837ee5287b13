//! A multi-host test network on one machine: one Linux network namespace per node, each
//! with its own IPv4 address on a veth pair into a bridge that lives in a namespace of
//! its own. The test process stays in the host namespace and reaches the nodes through
//! one more veth into the same bridge (so in-process client drivers need no helper
//! process). Links are impaired with `tc netem` (delay, jitter, loss) on every node's
//! egress and the host's, or, where the kernel has no `sch_netem`, with a userspace
//! UDP impairment proxy per node address (same parameters, same place on the path:
//! once per direction per link).
//!
//! Everything is torn down when the [`Netns`] is dropped, also on panic: deleting a
//! namespace deletes its veth ends and with them their peers. Only the subnet of the
//! bridge is routed (a link-scoped route on the host veth); nothing leaves the machine.
//!
//! Needs root and `ip` (iproute2); `tc` only for netem. [`Netns::create`] returns
//! [`Unavailable`] otherwise, and tests print "skipped: ..." and return.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use rand::RngExt;
use shoal_topology::{AuthoritySet, Hex32, NodeId};
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;

use crate::testnet::{
    GatewayInit, GatewayOptions, GatewayProc, Proc, RelayProc, TestnetConfig, hex32_after,
    init_authority, operate, run_init,
};

/// Why the namespace network cannot run here (not root, no `ip`, namespaces refused).
#[derive(Debug, Clone)]
pub struct Unavailable(pub String);

impl std::fmt::Display for Unavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// What every link does to a datagram, like `netem delay D J loss L%`: the delay is
/// uniform in `[delay − jitter, delay + jitter]` (clamped at 0), so datagrams reorder.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Impairment {
    pub delay: Duration,
    pub jitter: Duration,
    /// Probability in [0, 1] that a datagram is dropped.
    pub loss: f64,
}

impl Impairment {
    fn netem_args(&self) -> Vec<String> {
        vec![
            "netem".into(),
            "delay".into(),
            format!("{}us", self.delay.as_micros()),
            format!("{}us", self.jitter.as_micros()),
            "loss".into(),
            format!("{}%", self.loss * 100.0),
            // A queue deep enough that the delay line itself never drops.
            "limit".into(),
            "100000".into(),
        ]
    }

    fn sample_delay(&self, rng: &mut impl RngExt) -> Duration {
        let d = self.delay.as_secs_f64();
        let j = self.jitter.as_secs_f64();
        let x = if j > 0.0 {
            rng.random_range(d - j..=d + j)
        } else {
            d
        };
        Duration::from_secs_f64(x.max(0.0))
    }
}

/// How link impairment is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Emulation {
    /// `tc qdisc ... netem` on every egress veth.
    Netem,
    /// A userspace UDP proxy in front of every node address (kernel without sch_netem).
    Proxy,
}

/// One node's namespace and address.
#[derive(Debug, Clone)]
pub struct NsNode {
    pub name: String,
    pub ns: String,
    pub addr: Ipv4Addr,
}

/// The namespaces, the bridge and the host's veth. Dropping it deletes them all.
#[derive(Debug)]
pub struct Netns {
    tag: String,
    bridge_ns: String,
    host_if: String,
    subnet: [u8; 3],
    nodes: Vec<NsNode>,
    netem: bool,
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    run("ip", args)
}

fn run(prog: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {prog}"))?;
    if !out.status.success() {
        bail!(
            "`{prog} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|v| v.split_whitespace().nth(1).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

static NEXT: AtomicU32 = AtomicU32::new(0);

impl Netns {
    /// Creates the bridge namespace and the host's veth into it, on a /24 of 10/8 that
    /// no host interface uses.
    pub fn create() -> Result<Self, Unavailable> {
        if !is_root() {
            return Err(Unavailable("needs root (network namespaces)".into()));
        }
        if Command::new("ip")
            .arg("-V")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| !s.success())
            .unwrap_or(true)
        {
            return Err(Unavailable("needs `ip` from iproute2".into()));
        }
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        // Short: interface names have at most 15 bytes ("{tag}n{i}" stays under).
        let tag = format!("sh{:x}{n:x}", pid % 0x10000);
        let used = Command::new("ip")
            .args(["-4", "route", "show", "table", "all"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let mut subnet = None;
        for k in 0..64u32 {
            let s = [10, 100 + ((pid + k) % 150) as u8, ((n + k * 7) % 250) as u8];
            if !used.contains(&format!("{}.{}.{}.", s[0], s[1], s[2])) {
                subnet = Some(s);
                break;
            }
        }
        let subnet = subnet.ok_or_else(|| Unavailable("no free 10.x.y.0/24".into()))?;
        let mut net = Netns {
            bridge_ns: format!("{tag}-br"),
            host_if: format!("{tag}h"),
            tag,
            subnet,
            nodes: Vec::new(),
            netem: false,
        };
        net.setup_bridge()
            .map_err(|e| Unavailable(format!("cannot create namespaces: {e:#}")))?;
        Ok(net)
    }

    fn setup_bridge(&mut self) -> anyhow::Result<()> {
        let br = self.bridge_ns.clone();
        ip(&["netns", "add", &br])?;
        ip(&["-n", &br, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &br, "link", "set", "br0", "up"])?;
        let peer = format!("{}hb", self.tag);
        ip(&[
            "link",
            "add",
            &self.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &peer,
            "netns",
            &br,
        ])?;
        ip(&["-n", &br, "link", "set", &peer, "master", "br0"])?;
        ip(&["-n", &br, "link", "set", &peer, "up"])?;
        let host_addr = format!("{}/24", self.host_addr());
        ip(&["addr", "add", &host_addr, "dev", &self.host_if])?;
        ip(&["link", "set", &self.host_if, "up"])?;
        Ok(())
    }

    /// The test process's own address on the bridge (clients, proxies).
    pub fn host_addr(&self) -> Ipv4Addr {
        let [a, b, c] = self.subnet;
        Ipv4Addr::new(a, b, c, 1)
    }

    /// Adds a namespace `{tag}-{name}` with address `.(i + 2)` and loopback up.
    pub fn add_node(&mut self, name: &str) -> anyhow::Result<NsNode> {
        let i = self.nodes.len();
        if i > 200 {
            bail!("too many nodes for one /24");
        }
        let ns = format!("{}-{name}", self.tag);
        let [a, b, c] = self.subnet;
        let addr = Ipv4Addr::new(a, b, c, i as u8 + 2);
        ip(&["netns", "add", &ns])?;
        // Recorded before the rest so Drop deletes it even if a step below fails.
        self.nodes.push(NsNode {
            name: name.to_string(),
            ns: ns.clone(),
            addr,
        });
        let br_end = format!("{}n{i}", self.tag);
        ip(&[
            "-n",
            &self.bridge_ns,
            "link",
            "add",
            &br_end,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &ns,
        ])?;
        ip(&[
            "-n",
            &self.bridge_ns,
            "link",
            "set",
            &br_end,
            "master",
            "br0",
        ])?;
        ip(&["-n", &self.bridge_ns, "link", "set", &br_end, "up"])?;
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        Ok(self.nodes[i].clone())
    }

    pub fn nodes(&self) -> &[NsNode] {
        &self.nodes
    }

    /// Whether this kernel has `sch_netem` (tried on the host's veth, then removed).
    pub fn netem_supported(&self) -> bool {
        let ok = run(
            "tc",
            &[
                "qdisc",
                "add",
                "dev",
                &self.host_if,
                "root",
                "netem",
                "delay",
                "1ms",
            ],
        )
        .is_ok();
        if ok {
            let _ = run("tc", &["qdisc", "del", "dev", &self.host_if, "root"]);
        }
        ok
    }

    /// Puts `netem` with `imp` on every node's egress and the host's.
    pub fn apply_netem(&mut self, imp: &Impairment) -> anyhow::Result<()> {
        let args = imp.netem_args();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        for node in &self.nodes {
            let mut a = vec!["netns", "exec", &node.ns, "tc", "qdisc", "replace"];
            a.extend(["dev", "eth0", "root"]);
            a.extend(&args);
            ip(&a)?;
        }
        let mut a = vec!["qdisc", "replace", "dev", &self.host_if, "root"];
        a.extend(&args);
        run("tc", &a)?;
        self.netem = true;
        Ok(())
    }

    /// A command that runs `program` inside `node`'s namespace (`ip netns exec` execs
    /// the program, so the child's pid is the program's).
    pub fn command(&self, node: &NsNode, program: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &node.ns]).arg(program);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if self.netem {
            let _ = run("tc", &["qdisc", "del", "dev", &self.host_if, "root"]);
        }
        for node in self.nodes.iter().rev() {
            let _ = ip(&["netns", "del", &node.ns]);
        }
        // Takes the host veth's peer, and so the host veth, with it.
        let _ = ip(&["netns", "del", &self.bridge_ns]);
        let _ = ip(&["link", "del", &self.host_if]);
    }
}

/// Datagrams a proxy forwarded and dropped, both directions.
#[derive(Debug, Default)]
pub struct ProxyStats {
    pub forwarded: AtomicU64,
    pub dropped: AtomicU64,
}

/// A userspace impairment proxy: datagrams to `listen` go to `target` from a socket per
/// sender, and answers go back; each one is dropped with probability `loss` or held
/// for a sampled delay. Aborted on drop.
#[derive(Debug)]
pub struct Proxy {
    pub listen: SocketAddr,
    pub stats: Arc<ProxyStats>,
    task: JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn impaired_send(
    sock: &Arc<UdpSocket>,
    to: SocketAddr,
    buf: &[u8],
    imp: Impairment,
    stats: &ProxyStats,
) {
    let mut rng = rand::rng();
    if rng.random_bool(imp.loss.clamp(0.0, 1.0)) {
        stats.dropped.fetch_add(1, Ordering::Relaxed);
        return;
    }
    stats.forwarded.fetch_add(1, Ordering::Relaxed);
    let delay = imp.sample_delay(&mut rng);
    let sock = sock.clone();
    let buf = buf.to_vec();
    tokio::spawn(async move {
        tokio::time::sleep(delay).await;
        let _ = sock.send_to(&buf, to).await;
    });
}

impl Proxy {
    /// Binds `listen` (port 0: any) and forwards to `target`, binding its upstream
    /// sockets on `upstream_ip`. Needs a tokio runtime.
    pub async fn spawn(
        listen: SocketAddr,
        upstream_ip: IpAddr,
        target: SocketAddr,
        imp: Impairment,
    ) -> anyhow::Result<Proxy> {
        let front = Arc::new(UdpSocket::bind(listen).await?);
        let listen = front.local_addr()?;
        let stats = Arc::new(ProxyStats::default());
        let st = stats.clone();
        let task = tokio::spawn(async move {
            let mut upstreams: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
            let mut back = tokio::task::JoinSet::new();
            let mut buf = vec![0u8; 65_536];
            loop {
                let Ok((n, from)) = front.recv_from(&mut buf).await else {
                    continue;
                };
                let up = match upstreams.get(&from) {
                    Some(u) => u.clone(),
                    None => {
                        let Ok(u) = UdpSocket::bind(SocketAddr::new(upstream_ip, 0)).await else {
                            continue;
                        };
                        let u = Arc::new(u);
                        upstreams.insert(from, u.clone());
                        let (u2, front2, st2) = (u.clone(), front.clone(), st.clone());
                        back.spawn(async move {
                            let mut buf = vec![0u8; 65_536];
                            while let Ok((n, _)) = u2.recv_from(&mut buf).await {
                                impaired_send(&front2, from, &buf[..n], imp, &st2);
                            }
                        });
                        u
                    }
                };
                impaired_send(&up, target, &buf[..n], imp, &st);
            }
        });
        Ok(Proxy {
            listen,
            stats,
            task,
        })
    }
}

const LINK_PORT: u16 = 7000;
const CLIENT_PORT: u16 = 7001;
const METRICS_PORT: u16 = 7100;
const AUTHORITY_PORT: u16 = 7200;

/// The whole network in namespaces: one authority, `3 × relays_per_layer` relays and
/// `gateways` gateways, each a real `shoal` process in its own namespace. Field order
/// is drop order: processes, then proxies, then the namespaces.
#[derive(Debug)]
pub struct NsTestnet {
    pub authority: Proc,
    pub relays: Vec<RelayProc>,
    /// Gateways started with [`NsTestnet::run_gateway`].
    pub gateways: Vec<GatewayProc>,
    pub proxies: Vec<Proxy>,
    pub net: Netns,
    pub dir: PathBuf,
    pub authority_addr: SocketAddr,
    pub authorities: AuthoritySet,
    pub emulation: Option<Emulation>,
    imp: Option<Impairment>,
    gateway_nodes: Vec<NsNode>,
    relay_nodes: Vec<NsNode>,
}

impl NsTestnet {
    /// Creates the namespaces (authority, relays, `gateways` gateways), applies `imp`
    /// (netem if the kernel has it, else proxies) and starts the authority and relays.
    /// Gateways are set up by [`NsTestnet::init_gateway`].
    pub async fn start(
        shoal: &Path,
        dir: &Path,
        cfg: &TestnetConfig,
        gateways: usize,
        imp: Option<Impairment>,
    ) -> anyhow::Result<Result<Self, Unavailable>> {
        let mut net = match Netns::create() {
            Ok(n) => n,
            Err(e) => return Ok(Err(e)),
        };
        std::fs::create_dir_all(dir)?;
        let auth_node = net.add_node("auth")?;
        let relays_n = cfg.relays_per_layer * shoal_packet::MIX_LAYERS + cfg.extra_relays;
        let mut relay_nodes = Vec::new();
        for i in 0..relays_n {
            relay_nodes.push(net.add_node(&format!("r{i}"))?);
        }
        let mut gateway_nodes = Vec::new();
        for i in 0..gateways {
            gateway_nodes.push(net.add_node(&format!("g{i}"))?);
        }
        let emulation = match imp {
            None => None,
            Some(imp) if net.netem_supported() => {
                net.apply_netem(&imp)?;
                Some(Emulation::Netem)
            }
            Some(_) => Some(Emulation::Proxy),
        };

        let authority_addr = SocketAddr::new(IpAddr::V4(auth_node.addr), AUTHORITY_PORT);
        let auth_dir = dir.join("authority");
        let (key, auth_config) = init_authority(shoal, &auth_dir, authority_addr, cfg)?;
        let log = std::fs::File::create(dir.join("authority.log"))?;
        let child = net
            .command(&auth_node, shoal)
            .args([
                "authority",
                "run",
                "--config",
                &auth_config.to_string_lossy(),
            ])
            .env("SHOAL_LOG", log_level())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("cannot start the authority")?;
        let authority = Proc::from_child("authority", child);

        let mut me = NsTestnet {
            authority,
            relays: Vec::new(),
            gateways: Vec::new(),
            proxies: Vec::new(),
            net,
            dir: dir.to_path_buf(),
            authority_addr,
            authorities: AuthoritySet {
                threshold: 1,
                keys: vec![Hex32(key)],
            },
            emulation,
            imp,
            gateway_nodes,
            relay_nodes,
        };
        for i in 0..relays_n {
            me.init_relay(shoal, i, cfg.workers).await?;
        }
        Ok(Ok(me))
    }

    /// The address to advertise for `addr`: a new impairment proxy in front of it when
    /// netem is not available, else `addr` itself.
    async fn advertised(&mut self, addr: SocketAddr) -> anyhow::Result<SocketAddr> {
        match (self.emulation, self.imp) {
            (Some(Emulation::Proxy), Some(imp)) => {
                let host = IpAddr::V4(self.net.host_addr());
                let p = Proxy::spawn(SocketAddr::new(host, 0), host, addr, imp).await?;
                let a = p.listen;
                self.proxies.push(p);
                Ok(a)
            }
            _ => Ok(addr),
        }
    }

    fn authority_arg(&self) -> String {
        let key = self
            .authorities
            .keys
            .first()
            .map(|k| k.0)
            .unwrap_or_default();
        format!("{}={}", self.authority_addr, hex::encode(key))
    }

    async fn init_relay(
        &mut self,
        shoal: &Path,
        i: usize,
        workers: Option<usize>,
    ) -> anyhow::Result<()> {
        let node = self.relay_nodes[i].clone();
        let link_addr = SocketAddr::new(IpAddr::V4(node.addr), LINK_PORT);
        let metrics_addr = SocketAddr::new(IpAddr::V4(node.addr), METRICS_PORT);
        let public = self.advertised(link_addr).await?;
        let rdir = self.dir.join(format!("relay{i}"));
        let out = run_init(
            shoal,
            &[
                "relay",
                "init",
                "--dir",
                &rdir.to_string_lossy(),
                "--listen",
                &link_addr.to_string(),
                "--public-addr",
                &public.to_string(),
                "--metrics",
                &metrics_addr.to_string(),
                "--authority",
                &self.authority_arg(),
                "--threshold",
                "1",
            ],
        )?;
        let id = hex32_after(&out, "relay identity: ")?;
        operate(shoal, &self.dir, &rdir, &id, "relay")?;
        let config = rdir.join("relay.toml");
        if let Some(w) = workers {
            let text = std::fs::read_to_string(&config)?;
            std::fs::write(&config, format!("workers = {w}\n{text}"))?;
        }
        let proc = self.spawn_node(shoal, &node, &format!("relay{i}"), "relay", &config)?;
        self.relays.push(RelayProc {
            proc,
            id,
            link_addr: public,
            metrics_addr,
        });
        Ok(())
    }

    fn spawn_node(
        &self,
        shoal: &Path,
        node: &NsNode,
        name: &str,
        role: &str,
        config: &Path,
    ) -> anyhow::Result<Proc> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{name}.log")))?;
        let child = self
            .net
            .command(node, shoal)
            .args([role, "run", "--config", &config.to_string_lossy()])
            .env("SHOAL_LOG", log_level())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        Ok(Proc::from_child(name, child))
    }

    /// Sets up gateway `index` in its namespace. `client_addr` in the result is what
    /// clients dial (the proxy's address when links are proxied).
    pub async fn init_gateway(
        &mut self,
        shoal: &Path,
        index: usize,
        opts: &GatewayOptions,
    ) -> anyhow::Result<GatewayInit> {
        let node = self
            .gateway_nodes
            .get(index)
            .cloned()
            .context("no namespace for this gateway")?;
        let name = format!("gateway{index}");
        let gdir = self.dir.join(&name);
        let link_addr = SocketAddr::new(IpAddr::V4(node.addr), LINK_PORT);
        let client_listen = SocketAddr::new(IpAddr::V4(node.addr), CLIENT_PORT);
        let metrics_addr = SocketAddr::new(IpAddr::V4(node.addr), METRICS_PORT);
        let public = self.advertised(link_addr).await?;
        let client_addr = self.advertised(client_listen).await?;
        let out = run_init(
            shoal,
            &[
                "gateway",
                "init",
                "--dir",
                &gdir.to_string_lossy(),
                "--listen",
                &link_addr.to_string(),
                "--public-addr",
                &public.to_string(),
                "--client-listen",
                &client_listen.to_string(),
                "--metrics",
                &metrics_addr.to_string(),
                "--authority",
                &self.authority_arg(),
                "--threshold",
                "1",
            ],
        )?;
        let id = hex32_after(&out, "gateway identity: ")?;
        operate(shoal, &self.dir, &gdir, &id, "gateway")?;
        let config = gdir.join("gateway.toml");
        opts.write_into(&config)?;
        Ok(GatewayInit {
            name,
            config,
            id,
            link_addr: public,
            client_addr,
            metrics_addr,
        })
    }

    /// Starts gateway `index` (set up by [`NsTestnet::init_gateway`]) in its namespace.
    pub fn run_gateway(
        &mut self,
        shoal: &Path,
        index: usize,
        init: GatewayInit,
    ) -> anyhow::Result<()> {
        let node = self
            .gateway_nodes
            .get(index)
            .cloned()
            .context("no namespace for this gateway")?;
        let proc = self.spawn_node(shoal, &node, &init.name, "gateway", &init.config)?;
        self.gateways.push(GatewayProc { proc, init });
        Ok(())
    }

    pub fn relay_ids(&self) -> Vec<NodeId> {
        self.relays.iter().map(|r| r.id).collect()
    }

    /// Datagrams the proxies dropped and forwarded (0, 0 under netem).
    pub fn proxy_totals(&self) -> (u64, u64) {
        self.proxies.iter().fold((0, 0), |(d, f), p| {
            (
                d + p.stats.dropped.load(Ordering::Relaxed),
                f + p.stats.forwarded.load(Ordering::Relaxed),
            )
        })
    }

    /// The tail of a process's log, for failure messages.
    pub fn log_tail(&self, name: &str) -> String {
        crate::testnet::log_tail(&self.dir, name)
    }

    /// Every process that has exited, with its log tail, for failure messages.
    pub fn exited(&mut self) -> String {
        crate::testnet::exited(
            &self.dir,
            std::iter::once(&mut self.authority)
                .chain(self.relays.iter_mut().map(|r| &mut r.proc))
                .chain(self.gateways.iter_mut().map(|g| &mut g.proc)),
        )
    }
}

fn log_level() -> String {
    std::env::var("SHOAL_LOG").unwrap_or_else(|_| "info".into())
}

/// Whether a namespace network can be created here, without creating one for long.
pub fn probe() -> Result<(), Unavailable> {
    Netns::create().map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netem_arguments_match_the_impairment() {
        let imp = Impairment {
            delay: Duration::from_millis(200),
            jitter: Duration::from_millis(200),
            loss: 0.1,
        };
        let a = imp.netem_args().join(" ");
        assert!(
            a.starts_with("netem delay 200000us 200000us loss 10%"),
            "{a}"
        );
    }

    #[test]
    fn sampled_delays_stay_in_the_window() {
        let imp = Impairment {
            delay: Duration::from_millis(100),
            jitter: Duration::from_millis(50),
            loss: 0.0,
        };
        let mut rng = rand::rng();
        let mut lo = Duration::MAX;
        let mut hi = Duration::ZERO;
        for _ in 0..10_000 {
            let d = imp.sample_delay(&mut rng);
            lo = lo.min(d);
            hi = hi.max(d);
        }
        assert!(lo >= Duration::from_millis(50) && lo < Duration::from_millis(55));
        assert!(hi <= Duration::from_millis(150) && hi > Duration::from_millis(145));
    }
}

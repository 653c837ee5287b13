//! N directory authorities set up the way the "run a node" guide does it: `shoal
//! authority init` once each to learn the keys, then again with every peer, the
//! threshold and `--force` (the key is kept), then operator edits of `authority.toml`.
//! Shared by the authority, fault and deployment tests.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ed25519_dalek::SigningKey;
use shoal_link::http;
use shoal_topology::{AuthoritySet, Descriptor, Hex32, Role, SignedDescriptor, SphinxKeyEntry};

pub const SHOAL: &str = env!("CARGO_BIN_EXE_shoal");

pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A loopback address that was free a moment ago (see [`shoal_bench::testnet::free_port`]).
pub fn free_addr() -> SocketAddr {
    shoal_bench::testnet::free_port().unwrap()
}

/// Runs `shoal ARGS` (it must succeed); its stdout, trimmed.
pub fn shoal_trimmed(args: &[&str]) -> String {
    let out = Command::new(SHOAL).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "shoal {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// Sets `key = value` lines of a generated TOML file, as an operator edits it: every
/// line that sets `key` is replaced; a key set nowhere has its commented-out default
/// (`# key = ...`) uncommented instead. A key found in neither form fails the test, so a
/// renamed setting cannot be silently ignored.
pub fn edit_toml(path: &Path, values: &[(&str, String)]) {
    let text = std::fs::read_to_string(path).unwrap();
    let key_of = |line: &str| line.split('=').next().unwrap_or("").trim().to_owned();
    let live: Vec<bool> = values
        .iter()
        .map(|(k, _)| text.lines().any(|l| !l.starts_with('#') && key_of(l) == *k))
        .collect();
    let mut done = vec![false; values.len()];
    let mut out = String::new();
    for line in text.lines() {
        let hit = match line.strip_prefix("# ") {
            Some(commented) => values
                .iter()
                .position(|(k, _)| key_of(commented) == *k)
                .filter(|&i| !live[i] && !done[i]),
            None if line.starts_with('#') => None,
            None => values.iter().position(|(k, _)| key_of(line) == *k),
        };
        match hit {
            Some(i) => {
                done[i] = true;
                out.push_str(&format!("{} = {}\n", values[i].0, values[i].1));
            }
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    for ((k, _), done) in values.iter().zip(done) {
        assert!(done, "{} has no setting {k:?}", path.display());
    }
    std::fs::write(path, out).unwrap();
}

/// The operator of made-up node `i`: every node its own operator.
pub fn operator_key(i: u8) -> SigningKey {
    SigningKey::from_bytes(&[0xc0 ^ i; 32])
}

/// Admits the operators of every made-up node (`operators.toml` in `dir`), as
/// `shoal authority operator admit` would.
pub fn admit_test_operators(dir: &Path) {
    let mut text = String::new();
    for i in 0..=255u8 {
        text.push_str(&format!(
            "[[operators]]\nkey = \"{}\"\nname = \"node {i}\"\nmax_nodes = 1\nmax_per_layer = 1\n\n",
            hex::encode(operator_key(i).verifying_key().to_bytes())
        ));
    }
    std::fs::write(dir.join("operators.toml"), text).unwrap();
}

/// A self-signed descriptor of a made-up node `i` with Sphinx keys for `epochs`, as a
/// relay or gateway uploads it, with its operator's certificate.
pub fn descriptor(i: u8, role: Role, now: u64, epochs: Range<u64>) -> SignedDescriptor {
    let key = SigningKey::from_bytes(&[i; 32]);
    let cert = shoal_topology::NodeCertificate::issue(
        &operator_key(i),
        key.verifying_key().to_bytes(),
        role,
    );
    Descriptor {
        identity: Hex32(key.verifying_key().to_bytes()),
        role,
        link_addr: format!("127.0.0.1:{}", 9000 + u16::from(i)),
        sphinx_keys: epochs
            .map(|epoch| SphinxKeyEntry {
                epoch,
                key: Hex32([i.wrapping_add(epoch as u8); 32]),
            })
            .collect(),
        published_unix: now,
        version: None,
    }
    .sign(&key)
    .unwrap()
    .certified(cert)
}

/// Authorities set up with `shoal authority init`, each started on demand; every
/// process is killed when this is dropped, also when a test panics.
pub struct Authorities {
    pub addrs: Vec<SocketAddr>,
    pub dirs: Vec<PathBuf>,
    /// Public keys in hex, as `init` printed them.
    pub keys: Vec<String>,
    pub set: AuthoritySet,
    procs: Vec<Option<Child>>,
}

impl Drop for Authorities {
    fn drop(&mut self) {
        for child in self.procs.iter_mut().flatten() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Authorities {
    /// One authority per address, in `base/a{i}`, with schedule `--genesis genesis` plus
    /// `extra` init arguments (e.g. `--epoch-secs`), `threshold` of them needed, then
    /// `edits` made to every `authority.toml`.
    pub fn init(
        base: &Path,
        addrs: Vec<SocketAddr>,
        genesis: u64,
        threshold: usize,
        extra: &[&str],
        edits: &[(&str, String)],
    ) -> Self {
        let n = addrs.len();
        let dirs: Vec<PathBuf> = (0..n).map(|i| base.join(format!("a{i}"))).collect();
        let genesis = genesis.to_string();
        let init = |i: usize, more: &[String]| {
            let (dir, listen) = (dirs[i].to_str().unwrap(), addrs[i].to_string());
            let mut args = vec!["authority", "init", "--dir", dir, "--listen", &listen];
            args.extend(["--genesis", &genesis]);
            args.extend(extra);
            args.extend(more.iter().map(String::as_str));
            shoal_trimmed(&args)
        };
        // First init to learn every key, then init again with the peers.
        let keys: Vec<String> = (0..n).map(|i| init(i, &[])).collect();
        for i in 0..n {
            let mut more = vec!["--threshold".to_string(), threshold.to_string()];
            more.push("--force".into());
            for j in (0..n).filter(|&j| j != i) {
                more.extend(["--peer".to_string(), format!("{}={}", addrs[j], keys[j])]);
            }
            assert_eq!(init(i, &more), keys[i], "re-init must keep the key");
            edit_toml(&dirs[i].join("authority.toml"), edits);
            admit_test_operators(&dirs[i]);
        }
        let set = AuthoritySet {
            threshold,
            keys: keys
                .iter()
                .map(|k| {
                    let mut b = [0u8; 32];
                    hex::decode_to_slice(k, &mut b).unwrap();
                    Hex32(b)
                })
                .collect(),
        };
        Authorities {
            addrs,
            dirs,
            keys,
            set,
            procs: (0..n).map(|_| None).collect(),
        }
    }

    /// `ADDR=KEY` of authority `i`, as `--authority` takes it.
    pub fn arg(&self, i: usize) -> String {
        format!("{}={}", self.addrs[i], self.keys[i])
    }

    /// Starts authority `i` with `shoal authority run`; its log is `a{i}/stderr.log`.
    pub fn start(&mut self, i: usize) {
        self.start_with(i, Command::new(SHOAL));
    }

    /// Starts authority `i` with `launcher` (the `shoal` binary, or a wrapper that runs
    /// it in a namespace) plus `authority run --config ...`.
    pub fn start_with(&mut self, i: usize, mut launcher: Command) {
        let dir = &self.dirs[i];
        let child = launcher
            .args(["authority", "run", "--config"])
            .arg(dir.join("authority.toml"))
            .env("SHOAL_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("stderr.log")).unwrap())
            .spawn()
            .unwrap();
        self.procs[i] = Some(child);
    }

    /// SIGKILL.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.procs[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn child(&mut self, i: usize) -> &mut Child {
        self.procs[i].as_mut().expect("authority not running")
    }

    /// Every authority's log, for failure messages.
    pub fn logs(&self) -> String {
        self.dirs
            .iter()
            .map(|d| {
                let log = d.join("stderr.log");
                format!(
                    "--- {}\n{}",
                    log.display(),
                    std::fs::read_to_string(&log).unwrap_or_default()
                )
            })
            .collect()
    }

    /// Waits until authority `i` answers on its API.
    pub async fn wait_until_up(&self, i: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while get(self.addrs[i], "/v1/network").await.0 != 200 {
            assert!(
                Instant::now() < deadline,
                "{} did not come up\n{}",
                self.addrs[i],
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// An HTTP GET; `(0, [])` when the server cannot be reached.
pub async fn get(addr: SocketAddr, path: &str) -> (u16, Vec<u8>) {
    http::get(addr, path).await.unwrap_or((0, Vec::new()))
}

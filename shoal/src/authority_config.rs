//! `authority.toml`: read with `deny_unknown_fields`, then validated into
//! [`AuthorityFileConfig`], which the driver runs from.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use ed25519_dalek::SigningKey;
use serde::Deserialize;
use shoal_topology::{
    Admission, AdmittedOperator, AuthorityConfig, AuthoritySet, EpochSchedule, Hex32, NetworkParams,
};

/// The admitted operators, beside authority.toml; `shoal authority operator` edits it and
/// a running authority re-reads it every sync round.
pub const OPERATORS_FILE: &str = "operators.toml";

/// `operators.toml` as written.
#[derive(Debug, Default, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct OperatorsFile {
    // Empty: nothing written, so `[[operators]]` tables can be appended by hand.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub operators: Vec<AdmittedOperator>,
}

/// Reads the admitted operators; a missing file admits nobody.
pub fn load_operators(path: &Path) -> anyhow::Result<Admission> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Admission::default()),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let file: OperatorsFile =
        toml::from_str(&text).with_context(|| format!("in {}", path.display()))?;
    Admission::new(file.operators).with_context(|| format!("in {}", path.display()))
}

/// Writes the admitted operators (atomically: a temporary file renamed over the old).
pub fn save_operators(path: &Path, admission: &Admission) -> anyhow::Result<()> {
    let file = OperatorsFile {
        operators: admission.operators().cloned().collect(),
    };
    let text = format!(
        "# Operators this authority admits (shoal authority operator admit/remove).\n\
         # Every authority of the network must list the same operators with the same caps:\n\
         # a node is in a document only if k authorities admit its operator.\n\n{}",
        toml::to_string(&file).context("cannot encode the operators")?
    );
    let tmp = path.with_extension("toml.tmp");
    std::fs::write(&tmp, text).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot replace {}", path.display()))
}

/// The file as written: every field required, nothing unknown.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub listen: String,
    pub key_file: PathBuf,
    pub threshold: usize,
    pub sync_interval_secs: u64,
    pub descriptor_max_age_secs: u64,
    pub vote_lead_secs: u64,
    pub bootstrap_delay_secs: u64,
    pub schedule: EpochSchedule,
    pub params: NetworkParams,
    pub authorities: Vec<RawAuthority>,
    /// Per-source request limits; absent in configs written before they existed.
    #[serde(default)]
    pub limits: RawLimits,
}

/// `[limits]`: what one source network (an IPv4 /24 or IPv6 /64) may ask of the API.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    pub requests_per_sec: f64,
    pub burst: f64,
}

impl Default for RawLimits {
    fn default() -> Self {
        // Generous for one host running many nodes and peers (a test network on
        // loopback), tight enough that one source cannot keep the authority busy.
        RawLimits {
            requests_per_sec: 200.0,
            burst: 400.0,
        }
    }
}

/// One `[[authorities]]` entry.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAuthority {
    pub addr: String,
    pub key: String,
}

/// A peer authority: where to reach it and its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub addr: SocketAddr,
    pub key: [u8; 32],
}

/// A checked configuration, ready to run.
#[derive(Debug)]
pub struct AuthorityFileConfig {
    pub listen: SocketAddr,
    pub key: SigningKey,
    /// Every other authority.
    pub peers: Vec<Peer>,
    pub sync_interval: Duration,
    pub authority: AuthorityConfig,
    /// Where the admitted operators are (re-read while running).
    pub operators_path: PathBuf,
    /// Requests per second one source network (/24 or /64) may sustain, and its burst.
    pub rate_per_source: f64,
    pub burst_per_source: f64,
}

/// Parses a hex Ed25519 public key.
pub fn parse_key(hex_key: &str) -> anyhow::Result<[u8; 32]> {
    let mut key = [0u8; 32];
    hex::decode_to_slice(hex_key.trim(), &mut key)
        .with_context(|| format!("{hex_key:?} is not a 64-digit hex Ed25519 public key"))?;
    ed25519_dalek::VerifyingKey::from_bytes(&key)
        .with_context(|| format!("{hex_key:?} is not a valid Ed25519 public key"))?;
    Ok(key)
}

/// Reads a secret key file: 64 hex digits, readable by its owner only.
pub fn read_key_file(path: &Path) -> anyhow::Result<SigningKey> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path)
            .with_context(|| format!("cannot read key file {}", path.display()))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            bail!(
                "key file {} is accessible by other users (mode {:o}); run `chmod 600` on it",
                path.display(),
                mode & 0o777
            );
        }
    }
    // Through the node key store, whose read buffers are wiped when dropped.
    shoal_relay::keystore::load_identity(path)
        .with_context(|| format!("cannot read key file {}", path.display()))
}

impl RawConfig {
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        Ok(toml::from_str(text)?)
    }

    /// Checks everything; relative `key_file` paths are taken from `base_dir`.
    pub fn validate(self, base_dir: &Path) -> anyhow::Result<AuthorityFileConfig> {
        let listen: SocketAddr = self
            .listen
            .parse()
            .with_context(|| format!("listen = {:?} is not ip:port", self.listen))?;
        let key_path = base_dir.join(&self.key_file);
        let key = read_key_file(&key_path)?;
        let me = key.verifying_key().to_bytes();

        if self.authorities.is_empty() {
            bail!("[[authorities]] is empty; list every authority, this one included");
        }
        let mut all = Vec::with_capacity(self.authorities.len());
        for a in &self.authorities {
            let addr: SocketAddr = a
                .addr
                .parse()
                .with_context(|| format!("authority addr {:?} is not ip:port", a.addr))?;
            let key = parse_key(&a.key).context("in [[authorities]]")?;
            if all.iter().any(|p: &Peer| p.key == key) {
                bail!("authority key {} is listed twice", a.key);
            }
            if all.iter().any(|p: &Peer| p.addr == addr) {
                bail!("authority addr {addr} is listed twice");
            }
            all.push(Peer { addr, key });
        }
        if !all.iter().any(|p| p.key == me) {
            bail!(
                "this authority's own key ({}, from {}) is not in [[authorities]]",
                hex::encode(me),
                key_path.display()
            );
        }
        let n = all.len();
        if self.threshold <= n / 2 || self.threshold > n {
            bail!(
                "threshold = {} with {n} authorities; it must be a majority (between {} and {n}) so two \
                 disjoint groups can never both publish",
                self.threshold,
                n / 2 + 1
            );
        }
        if self.schedule.length_secs == 0 {
            bail!("schedule.length_secs must be at least 1");
        }
        if self.vote_lead_secs >= self.schedule.length_secs {
            bail!(
                "vote_lead_secs = {} must be shorter than an epoch ({} s)",
                self.vote_lead_secs,
                self.schedule.length_secs
            );
        }
        if self.sync_interval_secs == 0 {
            bail!("sync_interval_secs must be at least 1");
        }
        if self.descriptor_max_age_secs == 0 {
            bail!("descriptor_max_age_secs must be at least 1");
        }
        self.params.validate().context("in [params]")?;
        if !(self.limits.requests_per_sec.is_finite()
            && self.limits.requests_per_sec > 0.0
            && self.limits.burst.is_finite()
            && self.limits.burst >= 1.0)
        {
            bail!("[limits] requests_per_sec must be > 0 and burst >= 1");
        }

        let authority = AuthorityConfig {
            authorities: AuthoritySet {
                threshold: self.threshold,
                keys: all.iter().map(|p| Hex32(p.key)).collect(),
            },
            schedule: self.schedule,
            params: self.params,
            descriptor_max_age_secs: self.descriptor_max_age_secs,
            vote_lead_secs: self.vote_lead_secs,
            bootstrap_delay_secs: self.bootstrap_delay_secs,
            admission: load_operators(&base_dir.join(OPERATORS_FILE))?,
        };
        Ok(AuthorityFileConfig {
            listen,
            key,
            peers: all.into_iter().filter(|p| p.key != me).collect(),
            sync_interval: Duration::from_secs(self.sync_interval_secs),
            authority,
            operators_path: base_dir.join(OPERATORS_FILE),
            rate_per_source: self.limits.requests_per_sec,
            burst_per_source: self.limits.burst,
        })
    }
}

/// Reads and validates `path`.
pub fn load(path: &Path) -> anyhow::Result<AuthorityFileConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config {}", path.display()))?;
    let raw = RawConfig::parse(&text).with_context(|| format!("in config {}", path.display()))?;
    let base = path.parent().unwrap_or(Path::new("."));
    raw.validate(base)
        .with_context(|| format!("in config {}", path.display()))
}

/// `text` with this authority's entry in `[[authorities]]` changed from `old` to `new`
/// (public keys), for `keys rotate`. Exactly one `key = "<old>"` must be there; a text
/// already naming `new` (an interrupted rotation run again) comes back unchanged.
pub fn replace_own_key(text: &str, old: &[u8; 32], new: &[u8; 32]) -> anyhow::Result<String> {
    let line = |k: &[u8; 32]| format!("key = \"{}\"", hex::encode(k));
    let (old_line, new_line) = (line(old), line(new));
    match (
        text.matches(&old_line).count(),
        text.matches(&new_line).count(),
    ) {
        (1, 0) => Ok(text.replacen(&old_line, &new_line, 1)),
        (0, 1) => Ok(text.to_owned()),
        (o, n) => bail!(
            "expected this authority's key once in [[authorities]] as `{old_line}`; found it \
             {o} times (and the new key {n} times)"
        ),
    }
}

/// What `shoal authority init` writes into the template.
#[derive(Debug)]
pub struct Template<'a> {
    pub listen: SocketAddr,
    pub key_file: &'a str,
    /// Every authority, this one included.
    pub authorities: &'a [Peer],
    pub threshold: usize,
    pub schedule: EpochSchedule,
}

/// A commented `authority.toml`.
pub fn render(t: &Template<'_>) -> String {
    let p = NetworkParams::default();
    let length = t.schedule.length_secs;
    let lead = (length / 4).max(1).min(length.saturating_sub(1));
    let mut out = format!(
        r#"# Shoal directory authority. Every authority of a network must agree on
# [[authorities]], threshold, [schedule], [params] and descriptor_max_age_secs:
# documents are built deterministically from these and the node descriptors.

# Address the HTTP API (docs/authority-api.md) listens on.
listen = "{listen}"
# This authority's Ed25519 secret key (64 hex digits, mode 0600). Relative to this file.
key_file = "{key_file}"
# Signatures a document needs before anyone serves or accepts it. A majority.
threshold = {threshold}
# How often to pull descriptors, documents and votes from the other authorities.
sync_interval_secs = {sync}
# A node descriptor older than this at the start of an epoch is left out of its document:
# how fast a dead node drops out. Nodes re-upload every length_secs / 16 (at least 1 s);
# the default is vote_lead_secs plus four of those, and it must exceed vote_lead_secs.
descriptor_max_age_secs = {max_age}
# Vote for the next epoch this long before it starts.
vote_lead_secs = {lead}
# After startup, collect descriptors this long before voting on any epoch that has no
# published document yet (a published document is final).
bootstrap_delay_secs = {bootstrap}

# Epoch e runs from genesis_unix + e * length_secs for length_secs seconds.
[schedule]
genesis_unix = {genesis}
length_secs = {length}

# Network parameters published in every document. Rates per second, delays in ms.
[params]
# Mean of the exponential per-hop delay (1/mu), and the cap on one hop's delay.
mean_hop_delay_ms = {mean:?}
max_hop_delay_ms = {max:?}
# Client streams: payload (real or cover), loops, drops. Relay loop stream.
lambda_p = {lp:?}
lambda_l = {ll:?}
lambda_d = {ld:?}
lambda_m = {lm:?}
# Bytes of every frame on every link; must match the software.
frame_size = {frame}
# How long a retired epoch's Sphinx key keeps unwrapping packets.
key_grace_secs = {grace}

# Every authority, this one included: where its API is reached and its public key.
"#,
        listen = t.listen,
        key_file = t.key_file,
        threshold = t.threshold,
        sync = (length / 60).clamp(1, 10),
        max_age = shoal_topology::default_descriptor_max_age_secs(&t.schedule, lead),
        bootstrap = (length / 12).clamp(1, 60).min(length),
        genesis = t.schedule.genesis_unix,
        mean = p.mean_hop_delay_ms,
        max = p.max_hop_delay_ms,
        lp = p.lambda_p,
        ll = p.lambda_l,
        ld = p.lambda_d,
        lm = p.lambda_m,
        frame = p.frame_size,
        grace = p.key_grace_secs,
    );
    for a in t.authorities {
        out.push_str(&format!(
            "[[authorities]]\naddr = \"{}\"\nkey = \"{}\"\n\n",
            a.addr,
            hex::encode(a.key)
        ));
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn setup(dir: &Path, authorities: &[Peer], threshold: usize) -> (SigningKey, String) {
        let key = SigningKey::from_bytes(&[3; 32]);
        write_key(&dir.join("authority.key"), &key);
        let mut all = vec![Peer {
            addr: "127.0.0.1:7000".parse().unwrap(),
            key: key.verifying_key().to_bytes(),
        }];
        all.extend_from_slice(authorities);
        let text = render(&Template {
            listen: "127.0.0.1:7000".parse().unwrap(),
            key_file: "authority.key",
            authorities: &all,
            threshold,
            schedule: EpochSchedule {
                genesis_unix: 0,
                length_secs: 3600,
            },
        });
        (key, text)
    }

    fn write_key(path: &Path, key: &SigningKey) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(path, hex::encode(key.to_bytes())).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "shoal-authority-config-{name}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn peer(i: u8) -> Peer {
        Peer {
            addr: format!("127.0.0.1:{}", 7000 + u16::from(i))
                .parse()
                .unwrap(),
            key: SigningKey::from_bytes(&[10 + i; 32])
                .verifying_key()
                .to_bytes(),
        }
    }

    #[test]
    fn template_round_trips() {
        let dir = temp_dir("template");
        let (key, text) = setup(&dir, &[peer(1), peer(2)], 2);
        let cfg = RawConfig::parse(&text).unwrap().validate(&dir).unwrap();
        assert_eq!(cfg.key.to_bytes(), key.to_bytes());
        assert_eq!(cfg.peers, vec![peer(1), peer(2)]);
        assert_eq!(cfg.authority.authorities.threshold, 2);
        assert_eq!(cfg.authority.authorities.keys.len(), 3);
        assert_eq!(cfg.authority.params, NetworkParams::default());
        assert_eq!(cfg.authority.schedule.length_secs, 3600);
        assert_eq!(cfg.authority.vote_lead_secs, 900);
        assert_eq!(cfg.sync_interval, Duration::from_secs(10));
        // The result is usable as is.
        shoal_topology::Authority::new(cfg.key, cfg.authority).unwrap();
    }

    #[test]
    fn bad_configs_are_refused_with_a_reason() {
        let dir = temp_dir("bad");
        let (_, text) = setup(&dir, &[peer(1), peer(2)], 2);
        let cases: Vec<(String, &str)> = vec![
            (text.replace("threshold = 2", "threshold = 1"), "majority"),
            (text.replace("threshold = 2", "threshold = 4"), "majority"),
            (
                text.replace("lambda_p = 2.0", "lambda_p = -1.0"),
                "lambda_p",
            ),
            (
                text.replace("frame_size = ", "frame_size = 1"),
                "frame_size",
            ),
            (
                text.replace("vote_lead_secs = 900", "vote_lead_secs = 3600"),
                "vote_lead_secs",
            ),
            (
                text.replace("length_secs = 3600", "length_secs = 0"),
                "length_secs",
            ),
            (
                text.replace("sync_interval_secs = 10", "sync_interval_secs = 0"),
                "sync_interval_secs",
            ),
            (
                text.replace("listen = ", "colour = \"blue\"\nlisten = "),
                "unknown field",
            ),
            (
                text.replace("genesis_unix = 0", "genesis_unix = 0\nextra = 1"),
                "unknown field",
            ),
            (
                text.replace("listen = \"127.0.0.1:7000\"", "listen = \"nowhere\""),
                "ip:port",
            ),
            (
                text.replace("key_file = \"authority.key\"", "key_file = \"missing.key\""),
                "missing.key",
            ),
            (
                text.replace(&hex::encode(peer(1).key), &hex::encode(peer(2).key)),
                "listed twice",
            ),
            (text.replace(&hex::encode(peer(1).key), "abcd"), "hex"),
        ];
        for (text, needle) in cases {
            let err = RawConfig::parse(&text)
                .and_then(|r| r.validate(&dir))
                .unwrap_err();
            let msg = format!("{err:#}");
            assert!(msg.contains(needle), "expected {needle:?} in {msg:?}");
        }
        // Without this authority's own key in the list.
        let (_, lonely) = setup(&dir, &[], 1);
        let other = lonely.replace(
            &hex::encode(SigningKey::from_bytes(&[3; 32]).verifying_key().to_bytes()),
            &hex::encode(peer(5).key),
        );
        let msg = format!(
            "{:#}",
            RawConfig::parse(&other)
                .unwrap()
                .validate(&dir)
                .unwrap_err()
        );
        assert!(msg.contains("not in [[authorities]]"), "{msg}");
    }

    #[test]
    fn replace_own_key_changes_one_entry_and_is_idempotent() {
        let dir = temp_dir("replace");
        let (key, text) = setup(&dir, &[peer(1), peer(2)], 2);
        let old = key.verifying_key().to_bytes();
        let new = SigningKey::from_bytes(&[4; 32]).verifying_key().to_bytes();
        let rotated = replace_own_key(&text, &old, &new).unwrap();
        assert!(!rotated.contains(&hex::encode(old)));
        assert_eq!(rotated.matches(&hex::encode(new)).count(), 1);
        // The peers' entries are untouched.
        assert!(rotated.contains(&hex::encode(peer(1).key)));
        assert!(rotated.contains(&hex::encode(peer(2).key)));
        write_key(
            &dir.join("authority.key"),
            &SigningKey::from_bytes(&[4; 32]),
        );
        let cfg = RawConfig::parse(&rotated).unwrap().validate(&dir).unwrap();
        assert_eq!(cfg.peers, vec![peer(1), peer(2)]);
        // Run again after the config was written: nothing to change.
        assert_eq!(replace_own_key(&rotated, &old, &new).unwrap(), rotated);
        // Neither key there: refused, not guessed.
        let other = SigningKey::from_bytes(&[5; 32]).verifying_key().to_bytes();
        let msg = format!("{:#}", replace_own_key(&text, &other, &new).unwrap_err());
        assert!(msg.contains("found it 0 times"), "{msg}");
    }

    /// `operator admit` writes what `run` reads, an empty list takes hand-appended
    /// `[[operators]]` tables, and a bad entry is refused with the file named.
    #[test]
    fn admission_operators_file_round_trips() {
        let dir = temp_dir("operators");
        let path = dir.join(OPERATORS_FILE);
        assert!(load_operators(&path).unwrap().is_empty(), "missing: nobody");
        save_operators(&path, &Admission::default()).unwrap();
        let key = hex::encode(peer(1).key);
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str(&format!(
            "\n[[operators]]\nkey = \"{key}\"\nname = \"a\"\nmax_nodes = 3\nmax_per_layer = 1\n"
        ));
        std::fs::write(&path, &text).unwrap();
        let a = load_operators(&path).unwrap();
        assert_eq!(a.len(), 1);
        save_operators(&path, &a).unwrap();
        assert_eq!(load_operators(&path).unwrap(), a);
        std::fs::write(
            &path,
            text.replace("max_per_layer = 1", "max_per_layer = 0"),
        )
        .unwrap();
        let msg = format!("{:#}", load_operators(&path).unwrap_err());
        assert!(msg.contains("operators.toml"), "{msg}");
    }

    #[test]
    fn key_file_must_be_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = temp_dir("perm");
        let path = dir.join("k");
        write_key(&path, &SigningKey::from_bytes(&[1; 32]));
        read_key_file(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let msg = format!("{:#}", read_key_file(&path).unwrap_err());
        assert!(msg.contains("chmod 600"), "{msg}");
    }
}

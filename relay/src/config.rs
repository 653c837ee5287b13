//! Relay configuration, in two phases: [`RawConfig`] is exactly what the TOML file says
//! (unknown keys are errors), [`Config`] is the checked form the driver runs with.
//!
//! Relative paths in the file are resolved against the directory holding the file, so
//! a relay directory written by `shoal relay init` can be moved as a whole.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use shoal_topology::{AuthoritySet, Hex32};

use crate::RelayError;

/// Default bound of the inbound worker queue (frames, all workers together).
pub const DEFAULT_QUEUE_CAPACITY: usize = 8192;
/// Default bound of the delay queue (packets, all workers together).
pub const DEFAULT_DELAY_QUEUE_CAPACITY: usize = 100_000;
/// Default bound of replay tags held per key epoch.
pub const DEFAULT_REPLAY_CAPACITY: usize = 8_000_000;
/// Default bound of each next hop's outbound queue (frames).
pub const DEFAULT_PEER_QUEUE_CAPACITY: usize = 4096;

/// The config file as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub data_dir: PathBuf,
    pub listen: String,
    pub public_addr: Option<String>,
    pub metrics_listen: Option<String>,
    pub workers: Option<usize>,
    pub queue_capacity: Option<usize>,
    pub delay_queue_capacity: Option<usize>,
    pub replay_capacity: Option<usize>,
    pub peer_queue_capacity: Option<usize>,
    pub directory: RawDirectory,
}

/// `[directory]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDirectory {
    pub authorities: Vec<RawAuthority>,
    pub threshold: usize,
}

/// One entry of `directory.authorities`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAuthority {
    pub addr: String,
    pub key: String,
}

pub use shoal_topology::AuthorityAddr;

/// A checked relay configuration. Build it from a file with [`Config::load`], or
/// directly (tests, harnesses) and then call [`Config::validate`].
#[derive(Debug, Clone)]
pub struct Config {
    /// Holds `identity.key` and the Sphinx keys.
    pub data_dir: PathBuf,
    /// QUIC link address to bind. Port 0 picks one (tests).
    pub listen: SocketAddr,
    /// What the descriptor advertises; `None` means the bound address.
    pub public_addr: Option<SocketAddr>,
    /// Where `/metrics` is served; `None` disables it.
    pub metrics_listen: Option<SocketAddr>,
    /// Unwrapping worker threads.
    pub workers: usize,
    /// Inbound frames waiting for a worker, all workers together.
    pub queue_capacity: usize,
    /// Packets waiting out their delay, all workers together.
    pub delay_queue_capacity: usize,
    /// Replay tags held per key epoch.
    pub replay_capacity: usize,
    /// Frames waiting for each next hop's link.
    pub peer_queue_capacity: usize,
    /// The authorities, in the order they are tried.
    pub authorities: Vec<AuthorityAddr>,
    /// Signatures a directory document needs.
    pub threshold: usize,
}

fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

impl Config {
    /// Reads and checks `path`.
    pub fn load(path: &Path) -> Result<Self, RelayError> {
        let text = std::fs::read_to_string(path).map_err(|source| RelayError::ConfigRead {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses config text; `path` names the file in errors and anchors relative paths.
    pub fn parse(text: &str, path: &Path) -> Result<Self, RelayError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| RelayError::ConfigParse {
            path: path.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        Self::from_raw(raw, path)
    }

    /// Second phase: turns what the file says into what the relay runs with.
    pub fn from_raw(raw: RawConfig, path: &Path) -> Result<Self, RelayError> {
        let bad = |key: &'static str, reason: String| RelayError::ConfigValue {
            path: path.to_owned(),
            key,
            reason,
        };
        let addr = |key: &'static str, s: &str| {
            s.parse::<SocketAddr>()
                .map_err(|_| bad(key, format!("{s:?} is not ip:port")))
        };
        let base = path.parent().unwrap_or(Path::new("."));
        let data_dir = if raw.data_dir.is_absolute() {
            raw.data_dir.clone()
        } else {
            base.join(&raw.data_dir)
        };
        let mut authorities = Vec::new();
        for a in &raw.directory.authorities {
            let mut key = [0u8; 32];
            hex::decode_to_slice(a.key.trim(), &mut key).map_err(|_| {
                bad(
                    "directory.authorities.key",
                    format!("{:?} is not 64 hex digits", a.key),
                )
            })?;
            ed25519_dalek::VerifyingKey::from_bytes(&key).map_err(|_| {
                bad(
                    "directory.authorities.key",
                    format!("{:?} is not an Ed25519 public key", a.key),
                )
            })?;
            authorities.push(AuthorityAddr {
                addr: addr("directory.authorities.addr", &a.addr)?,
                key,
            });
        }
        let config = Config {
            data_dir,
            listen: addr("listen", &raw.listen)?,
            public_addr: raw
                .public_addr
                .as_deref()
                .map(|s| addr("public_addr", s))
                .transpose()?,
            metrics_listen: raw
                .metrics_listen
                .as_deref()
                .map(|s| addr("metrics_listen", s))
                .transpose()?,
            workers: raw.workers.unwrap_or_else(default_workers),
            queue_capacity: raw.queue_capacity.unwrap_or(DEFAULT_QUEUE_CAPACITY),
            delay_queue_capacity: raw
                .delay_queue_capacity
                .unwrap_or(DEFAULT_DELAY_QUEUE_CAPACITY),
            replay_capacity: raw.replay_capacity.unwrap_or(DEFAULT_REPLAY_CAPACITY),
            peer_queue_capacity: raw
                .peer_queue_capacity
                .unwrap_or(DEFAULT_PEER_QUEUE_CAPACITY),
            authorities,
            threshold: raw.directory.threshold,
        };
        config.validate(path)?;
        Ok(config)
    }

    /// Checks a config however it was built; `path` only names the source in errors.
    pub fn validate(&self, path: &Path) -> Result<(), RelayError> {
        let bad = |key: &'static str, reason: String| {
            Err(RelayError::ConfigValue {
                path: path.to_owned(),
                key,
                reason,
            })
        };
        if self.public_addr.is_none() && self.listen.ip().is_unspecified() {
            return bad(
                "public_addr",
                format!(
                    "required when `listen` ({}) is a wildcard address",
                    self.listen
                ),
            );
        }
        if let Some(p) = self.public_addr
            && (p.ip().is_unspecified() || p.port() == 0)
        {
            return bad("public_addr", format!("{p} cannot be dialled"));
        }
        if !(1..=1024).contains(&self.workers) {
            return bad("workers", format!("{} (allowed: 1 to 1024)", self.workers));
        }
        if self.queue_capacity < self.workers {
            return bad(
                "queue_capacity",
                format!(
                    "{} is below `workers` ({})",
                    self.queue_capacity, self.workers
                ),
            );
        }
        if self.delay_queue_capacity < self.workers {
            return bad(
                "delay_queue_capacity",
                format!(
                    "{} is below `workers` ({})",
                    self.delay_queue_capacity, self.workers
                ),
            );
        }
        if self.replay_capacity == 0 {
            return bad("replay_capacity", "must be at least 1".into());
        }
        if self.peer_queue_capacity == 0 {
            return bad("peer_queue_capacity", "must be at least 1".into());
        }
        if self.authorities.is_empty() {
            return bad(
                "directory.authorities",
                "at least one authority is needed".into(),
            );
        }
        let set = self.authority_set();
        if set.validate().is_err() {
            return bad(
                "directory.threshold",
                format!(
                    "{} of {} authorities (keys must be distinct; threshold 1 to their number)",
                    self.threshold,
                    self.authorities.len()
                ),
            );
        }
        Ok(())
    }

    /// The keys and threshold directory documents are checked against.
    pub fn authority_set(&self) -> AuthoritySet {
        AuthoritySet {
            threshold: self.threshold,
            keys: self.authorities.iter().map(|a| Hex32(a.key)).collect(),
        }
    }

    /// Where the identity key lives.
    pub fn identity_path(&self) -> PathBuf {
        self.data_dir.join(crate::keystore::IDENTITY_FILE)
    }
}

/// Values `shoal relay init` fills into the config it writes.
#[derive(Debug, Clone)]
pub struct InitOptions {
    pub listen: SocketAddr,
    pub public_addr: Option<SocketAddr>,
    pub metrics_listen: Option<SocketAddr>,
    /// Authorities as (HTTP address, Ed25519 key).
    pub authorities: Vec<AuthorityAddr>,
    /// Defaults to a majority of `authorities`.
    pub threshold: Option<usize>,
}

/// A TOML string literal. Only addresses and hex go through here; escape anyway.
pub fn toml_str(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// The `authorities = [...]` entries and the threshold (default: a majority) that
/// every node's `init` writes into its `[directory]` table.
pub fn render_authorities(
    authorities: &[AuthorityAddr],
    threshold: Option<usize>,
) -> (String, usize) {
    let threshold = threshold.unwrap_or(authorities.len() / 2 + 1).max(1);
    let mut auths = String::new();
    for a in authorities {
        auths.push_str(&format!(
            "  {{ addr = {}, key = {} }},\n",
            toml_str(&a.addr.to_string()),
            toml_str(&hex::encode(a.key))
        ));
    }
    if authorities.is_empty() {
        auths.push_str("  # { addr = \"192.0.2.1:8000\", key = \"<64 hex digits>\" },\n");
    }
    (auths, threshold)
}

/// The commented config `shoal relay init` writes. `data_dir` is the file's own directory.
pub fn render_template(opts: &InitOptions) -> String {
    let on_off = |v: Option<SocketAddr>, key: &str, example: &str| match v {
        Some(a) => format!("{key} = {}\n", toml_str(&a.to_string())),
        None => format!("# {key} = \"{example}\"\n"),
    };
    let (auths, threshold) = render_authorities(&opts.authorities, opts.threshold);
    format!(
        r#"# Shoal mix relay configuration. Unknown keys are errors.
# Relative paths are resolved against the directory holding this file.

# Where the identity key (identity.key) and the per-epoch Sphinx keys (sphinx/) live.
# Keep it private: mode 0700, backed up only if you accept the key exposure.
data_dir = "."

# UDP address of the QUIC link endpoint other nodes send packets to.
listen = {listen}

# Address published in the directory for other nodes to dial. Defaults to `listen`;
# required when `listen` is a wildcard address such as 0.0.0.0.
{public}
# HTTP address serving Prometheus metrics at /metrics. Omit to disable.
# Metrics are aggregate counters only; bind it to a private interface anyway.
{metrics}
# Unwrapping worker threads. Defaults to the number of CPU cores.
# workers = 2

# Frames that may wait for a worker (all workers together). When full, new frames are
# dropped and counted as `overload`: a relay sheds load rather than queueing without bound.
queue_capacity = {queue}

# Packets that may wait out their mixing delay (all workers together); beyond it, shed.
# delay_queue_capacity = {delay}

# Replay tags remembered per key epoch (16 bytes each plus table overhead). When full,
# packets of that epoch are shed rather than forwarded unchecked.
# replay_capacity = {replay}

# Frames that may wait for one next hop's link before new ones are dropped.
# peer_queue_capacity = {peer}

[directory]
# The directory authorities: HTTP address and Ed25519 public key (hex). The relay
# publishes its descriptor to every one and fetches documents from any.
authorities = [
{auths}]
# Distinct authority signatures a directory document needs to be accepted.
threshold = {threshold}
"#,
        listen = toml_str(&opts.listen.to_string()),
        public = on_off(opts.public_addr, "public_addr", "203.0.113.7:7001"),
        metrics = on_off(opts.metrics_listen, "metrics_listen", "127.0.0.1:9101"),
        queue = DEFAULT_QUEUE_CAPACITY,
        delay = DEFAULT_DELAY_QUEUE_CAPACITY,
        replay = DEFAULT_REPLAY_CAPACITY,
        peer = DEFAULT_PEER_QUEUE_CAPACITY,
    )
}

/// File name `shoal relay init` gives the config.
pub const CONFIG_FILE: &str = "relay.toml";

/// Sets up a relay directory: a fresh identity key and a commented `relay.toml` whose
/// `data_dir` is the directory itself. Refuses to overwrite either file. Returns the
/// config path and the relay's identity.
pub fn init_dir(dir: &Path, opts: &InitOptions) -> Result<(PathBuf, [u8; 32]), RelayError> {
    let config_path = dir.join(CONFIG_FILE);
    if config_path.exists() {
        return Err(RelayError::AlreadyExists { path: config_path });
    }
    let text = render_template(opts);
    // Refuse a config that would not load, before anything is written.
    Config::parse(&text, &config_path).or_else(|e| match e {
        // A template without authorities is allowed: the operator fills them in.
        RelayError::ConfigValue {
            key: "directory.authorities",
            ..
        } if opts.authorities.is_empty() => Ok(Config {
            data_dir: dir.to_owned(),
            listen: opts.listen,
            public_addr: opts.public_addr,
            metrics_listen: opts.metrics_listen,
            workers: 1,
            queue_capacity: 1,
            delay_queue_capacity: 1,
            replay_capacity: 1,
            peer_queue_capacity: 1,
            authorities: vec![],
            threshold: 0,
        }),
        other => Err(other),
    })?;
    let identity = crate::keystore::create_identity(dir, &mut rand::rng())?;
    crate::keystore::write_private(&config_path, text.as_bytes(), true)?;
    Ok((config_path, identity.verifying_key().to_bytes()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    const KEY: &str = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a";

    fn parse(text: &str) -> Result<Config, RelayError> {
        Config::parse(text, Path::new("/etc/shoal/relay.toml"))
    }

    fn minimal(extra: &str) -> String {
        format!(
            "data_dir = \"keys\"\nlisten = \"127.0.0.1:7001\"\n{extra}\n[directory]\nauthorities = [{{ addr = \"127.0.0.1:8000\", key = \"{KEY}\" }}]\nthreshold = 1\n"
        )
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = parse(&minimal("")).unwrap();
        assert_eq!(c.data_dir, Path::new("/etc/shoal/keys"));
        assert_eq!(c.listen, "127.0.0.1:7001".parse().unwrap());
        assert_eq!(c.public_addr, None);
        assert_eq!(c.queue_capacity, DEFAULT_QUEUE_CAPACITY);
        assert!(c.workers >= 1);
        assert_eq!(c.authority_set().threshold, 1);
    }

    #[test]
    fn unknown_key_is_named() {
        let e = parse(&minimal("colour = \"blue\""))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/etc/shoal/relay.toml"), "{e}");
        assert!(e.contains("colour"), "{e}");
    }

    #[test]
    fn unknown_key_in_table_is_named() {
        let text = minimal("").replace("threshold = 1", "threshold = 1\nquorum = 2");
        let e = parse(&text).unwrap_err().to_string();
        assert!(e.contains("quorum"), "{e}");
    }

    #[test]
    fn syntax_and_type_errors_are_reported() {
        assert!(matches!(
            parse("listen = "),
            Err(RelayError::ConfigParse { .. })
        ));
        let e = parse(&minimal("workers = \"two\""))
            .unwrap_err()
            .to_string();
        assert!(e.contains("workers"), "{e}");
        let e = parse(&minimal("").replace("listen = \"127.0.0.1:7001\"\n", ""))
            .unwrap_err()
            .to_string();
        assert!(e.contains("listen"), "{e}");
    }

    #[test]
    fn bad_values_name_their_key() {
        let cases = [
            (
                minimal("").replace("127.0.0.1:7001", "localhost"),
                "`listen`",
            ),
            (minimal("workers = 0"), "`workers`"),
            (minimal("queue_capacity = 0"), "`queue_capacity`"),
            (
                minimal("").replace(KEY, "abcd"),
                "`directory.authorities.key`",
            ),
            (
                minimal("").replace("threshold = 1", "threshold = 2"),
                "`directory.threshold`",
            ),
            (
                minimal("").replace("127.0.0.1:7001", "0.0.0.0:7001"),
                "`public_addr`",
            ),
            (minimal("metrics_listen = \"nope\""), "`metrics_listen`"),
        ];
        for (text, key) in cases {
            let e = parse(&text).unwrap_err().to_string();
            assert!(e.contains(key), "{key}: {e}");
            assert!(e.starts_with("/etc/shoal/relay.toml"), "{e}");
        }
    }

    #[test]
    fn template_parses_back() {
        let mut key = [0u8; 32];
        hex::decode_to_slice(KEY, &mut key).unwrap();
        let opts = InitOptions {
            listen: "0.0.0.0:7001".parse().unwrap(),
            public_addr: Some("192.0.2.9:7001".parse().unwrap()),
            metrics_listen: Some("127.0.0.1:9101".parse().unwrap()),
            authorities: vec![AuthorityAddr {
                addr: "192.0.2.1:8000".parse().unwrap(),
                key,
            }],
            threshold: None,
        };
        let text = render_template(&opts);
        let c = Config::parse(&text, Path::new("/srv/relay/relay.toml")).unwrap();
        assert_eq!(c.data_dir, Path::new("/srv/relay/."));
        assert_eq!(c.public_addr, opts.public_addr);
        assert_eq!(c.metrics_listen, opts.metrics_listen);
        assert_eq!(c.authorities, opts.authorities);
        assert_eq!(c.threshold, 1);

        // Without authorities the template still parses as TOML but is refused until filled in.
        let empty = render_template(&InitOptions {
            authorities: vec![],
            ..opts
        });
        let e = Config::parse(&empty, Path::new("r.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("directory.authorities"), "{e}");
    }
}

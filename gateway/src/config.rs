//! Gateway configuration, in two phases: [`RawConfig`] is exactly what `gateway.toml`
//! says (unknown keys are errors), [`Config`] is the checked form the driver runs with.
//!
//! The mixing half is a relay pipeline, so its part of the file has the relay's keys and
//! is checked by the relay's own second phase ([`shoal_relay::Config::from_raw`]).
//! Relative paths are resolved against the directory holding the file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use shoal_relay::config::{AuthorityAddr, RawDirectory, render_authorities, toml_str};

use shoal_subnet::SubnetId;
use shoal_topology::Hex32;

use crate::GatewayError;
use crate::limit::{
    DEFAULT_BURST_SECS, DEFAULT_CUT_AFTER, DEFAULT_CUT_PENALTY, DEFAULT_CUT_WINDOW,
    DEFAULT_RATE_FACTOR, LimitConfig,
};
use crate::mailbox::{DEFAULT_PULL_BATCH, MailboxConfig};
use crate::pull::{DEFAULT_PULL_ANSWER_DELAY, PullAnswerConfig};
use crate::store::StoreConfig;

/// File name `shoal gateway init` gives the config.
pub const CONFIG_FILE: &str = "gateway.toml";
/// File name of the mailbox store inside `data_dir`.
pub const STORE_FILE: &str = "mailboxes.redb";
/// Items an account may hold unless its own quota says otherwise.
pub const DEFAULT_QUOTA: u32 = 10_000;
/// Default time-to-live of an unfetched item.
pub const DEFAULT_TTL_SECS: u64 = 7 * 24 * 3600;
/// Default time before an offered, unacked item is offered again.
pub const DEFAULT_REDELIVERY_SECS: u64 = 30;

/// The config file as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub data_dir: PathBuf,
    pub listen: String,
    pub public_addr: Option<String>,
    pub client_listen: String,
    pub metrics_listen: Option<String>,
    pub workers: Option<usize>,
    pub queue_capacity: Option<usize>,
    pub delay_queue_capacity: Option<usize>,
    pub replay_capacity: Option<usize>,
    pub peer_queue_capacity: Option<usize>,
    /// Hosted subnets: their admin Ed25519 public keys (hex).
    #[serde(default)]
    pub subnets: Vec<String>,
    pub directory: RawDirectory,
    #[serde(default)]
    pub mailbox: RawMailbox,
    #[serde(default)]
    pub store: RawStore,
    #[serde(default)]
    pub limits: RawLimits,
    #[serde(default)]
    pub testing: RawTesting,
}

/// `[limits]`: per-account send rate limits (see [`crate::limit`]).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    pub rate_factor: Option<f64>,
    pub burst_secs: Option<f64>,
    pub cut_after: Option<u64>,
    pub cut_window_secs: Option<u64>,
    pub cut_penalty_secs: Option<u64>,
}

/// `[mailbox]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMailbox {
    pub pull_batch: Option<usize>,
    pub ttl_secs: Option<u64>,
    pub default_quota: Option<u32>,
    pub redelivery_timeout_secs: Option<u64>,
    pub pull_answer_delay_ms: Option<u64>,
}

/// `[testing]`: switches that turn protections off, for tests and the observer's
/// control runs only.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTesting {
    /// Answer pulls as soon as their items are loaded (timing then depends on content).
    #[serde(default)]
    pub legacy_leaks: bool,
}

/// `[store]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStore {
    pub max_batch: Option<usize>,
    pub queue_capacity: Option<usize>,
    pub cache_mib: Option<usize>,
}

/// A checked gateway configuration. Build it with [`Config::load`], or directly (tests)
/// and then call [`Config::validate`].
#[derive(Debug, Clone)]
pub struct Config {
    /// The mixing half: node links, workers, keys in `data_dir`, directory authorities.
    pub node: shoal_relay::Config,
    /// QUIC address clients connect to.
    pub client_listen: SocketAddr,
    pub mailbox: MailboxConfig,
    /// Quota of accounts added without one.
    pub default_quota: u32,
    pub store: StoreConfig,
    /// Per-account send rate limits on client links.
    pub limits: LimitConfig,
    /// Subnets hosted here: only their admins may connect as admins, and only their
    /// signed commands are applied.
    pub subnets: Vec<SubnetId>,
    /// A pull is answered this long after it arrived, whatever it carries.
    pub pull_answer_delay: Duration,
    /// Test-only (`[testing] legacy_leaks`): answer pulls as soon as they are loaded.
    pub legacy_leaks: bool,
}

impl Config {
    /// Reads and checks `path`.
    pub fn load(path: &Path) -> Result<Self, GatewayError> {
        let text = std::fs::read_to_string(path).map_err(|e| GatewayError::ConfigRead {
            path: path.to_owned(),
            detail: e.to_string(),
        })?;
        Self::parse(&text, path)
    }

    /// Parses config text; `path` resolves relative paths and names the source in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, GatewayError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| GatewayError::ConfigParse {
            path: path.to_owned(),
            message: e.message().to_owned(),
        })?;
        Self::from_raw(raw, path)
    }

    /// Second phase: turns what the file says into what the gateway runs with.
    pub fn from_raw(raw: RawConfig, path: &Path) -> Result<Self, GatewayError> {
        let bad = |key: &'static str, reason: String| GatewayError::ConfigValue {
            path: path.to_owned(),
            key,
            reason,
        };
        let node_raw = shoal_relay::config::RawConfig {
            data_dir: raw.data_dir,
            listen: raw.listen,
            public_addr: raw.public_addr,
            metrics_listen: raw.metrics_listen,
            workers: raw.workers,
            queue_capacity: raw.queue_capacity,
            delay_queue_capacity: raw.delay_queue_capacity,
            replay_capacity: raw.replay_capacity,
            peer_queue_capacity: raw.peer_queue_capacity,
            directory: raw.directory,
        };
        let node =
            shoal_relay::Config::from_raw(node_raw, path).map_err(|e| relay_config(e, path))?;
        let client_listen = raw.client_listen.parse::<SocketAddr>().map_err(|_| {
            bad(
                "client_listen",
                format!("{:?} is not ip:port", raw.client_listen),
            )
        })?;
        let mut subnets = Vec::with_capacity(raw.subnets.len());
        for text in &raw.subnets {
            let mut key = [0u8; 32];
            hex::decode_to_slice(text.trim(), &mut key)
                .ok()
                .filter(|_| ed25519_dalek::VerifyingKey::from_bytes(&key).is_ok())
                .ok_or_else(|| {
                    bad(
                        "subnets",
                        format!("{text:?} is not a hex Ed25519 public key"),
                    )
                })?;
            subnets.push(Hex32(key));
        }
        let m = raw.mailbox;
        let l = raw.limits;
        let defaults = LimitConfig::default();
        let limits = LimitConfig {
            rate_factor: l.rate_factor.unwrap_or(defaults.rate_factor),
            burst_secs: l.burst_secs.unwrap_or(defaults.burst_secs),
            cut_after: l.cut_after.unwrap_or(defaults.cut_after),
            cut_window: l
                .cut_window_secs
                .map_or(defaults.cut_window, Duration::from_secs),
            cut_penalty: l
                .cut_penalty_secs
                .map_or(defaults.cut_penalty, Duration::from_secs),
        };
        let config = Config {
            limits,
            subnets,
            node,
            client_listen,
            mailbox: MailboxConfig {
                pull_batch: m.pull_batch.unwrap_or(DEFAULT_PULL_BATCH),
                redelivery_timeout: Duration::from_secs(
                    m.redelivery_timeout_secs.unwrap_or(DEFAULT_REDELIVERY_SECS),
                ),
                ttl: Duration::from_secs(m.ttl_secs.unwrap_or(DEFAULT_TTL_SECS)),
            },
            default_quota: m.default_quota.unwrap_or(DEFAULT_QUOTA),
            pull_answer_delay: m
                .pull_answer_delay_ms
                .map_or(DEFAULT_PULL_ANSWER_DELAY, Duration::from_millis),
            legacy_leaks: raw.testing.legacy_leaks,
            store: StoreConfig {
                max_batch: raw
                    .store
                    .max_batch
                    .unwrap_or(StoreConfig::default().max_batch),
                queue_capacity: raw
                    .store
                    .queue_capacity
                    .unwrap_or(StoreConfig::default().queue_capacity),
                cache_bytes: raw
                    .store
                    .cache_mib
                    .map_or(StoreConfig::default().cache_bytes, |m| {
                        m.saturating_mul(1 << 20)
                    }),
            },
        };
        config.validate(path)?;
        Ok(config)
    }

    /// Checks a config however it was built; `path` only names the source in errors.
    pub fn validate(&self, path: &Path) -> Result<(), GatewayError> {
        self.node
            .validate(path)
            .map_err(|e| relay_config(e, path))?;
        let bad = |key: &'static str, reason: &str| {
            Err(GatewayError::ConfigValue {
                path: path.to_owned(),
                key,
                reason: reason.to_owned(),
            })
        };
        if self.client_listen == self.node.listen && self.client_listen.port() != 0 {
            return bad("client_listen", "must differ from `listen`");
        }
        if let Err(GatewayError::Config(reason)) = self.mailbox.validate() {
            let key = if reason.starts_with("pull_batch") {
                "mailbox.pull_batch"
            } else {
                "mailbox.ttl_secs"
            };
            return bad(key, reason);
        }
        if self.default_quota == 0 {
            return bad("mailbox.default_quota", "must be at least 1");
        }
        if let Err(GatewayError::Config(reason)) = self.pull_answer().validate() {
            return bad("mailbox.pull_answer_delay_ms", reason);
        }
        if let Err(reason) = self.limits.validate() {
            let key = match reason.split_whitespace().next() {
                Some("rate_factor") => "limits.rate_factor",
                Some("burst_secs") => "limits.burst_secs",
                Some("cut_after") => "limits.cut_after",
                _ => "limits.cut_window_secs",
            };
            return bad(key, reason);
        }
        if let Err(GatewayError::Config(reason)) = self.store.validate() {
            let key = if reason.starts_with("max_batch") {
                "store.max_batch"
            } else {
                "store.queue_capacity"
            };
            return bad(key, reason);
        }
        Ok(())
    }

    /// How client links time their pull answers.
    pub fn pull_answer(&self) -> PullAnswerConfig {
        PullAnswerConfig {
            delay: self.pull_answer_delay,
            pull_batch: self.mailbox.pull_batch,
            legacy_leaks: self.legacy_leaks,
        }
    }

    pub fn data_dir(&self) -> &Path {
        &self.node.data_dir
    }

    /// Where the mailbox store lives.
    pub fn store_path(&self) -> PathBuf {
        self.node.data_dir.join(STORE_FILE)
    }
}

fn relay_config(e: shoal_relay::RelayError, path: &Path) -> GatewayError {
    match e {
        shoal_relay::RelayError::ConfigValue { path, key, reason } => {
            GatewayError::ConfigValue { path, key, reason }
        }
        shoal_relay::RelayError::ConfigParse { path, message } => {
            GatewayError::ConfigParse { path, message }
        }
        other => GatewayError::ConfigValue {
            path: path.to_owned(),
            key: "(node)",
            reason: GatewayError::node(other).to_string(),
        },
    }
}

/// Values `shoal gateway init` fills into the config it writes.
#[derive(Debug, Clone)]
pub struct InitOptions {
    pub listen: SocketAddr,
    pub public_addr: Option<SocketAddr>,
    pub client_listen: SocketAddr,
    pub metrics_listen: Option<SocketAddr>,
    /// Authorities as (HTTP address, Ed25519 key).
    pub authorities: Vec<AuthorityAddr>,
    /// Defaults to a majority of `authorities`.
    pub threshold: Option<usize>,
    /// Hosted subnets (admin public keys).
    pub subnets: Vec<SubnetId>,
}

/// The commented config `shoal gateway init` writes. `data_dir` is the file's own directory.
pub fn render_template(opts: &InitOptions) -> String {
    let on_off = |v: Option<SocketAddr>, key: &str, example: &str| match v {
        Some(a) => format!("{key} = {}\n", toml_str(&a.to_string())),
        None => format!("# {key} = \"{example}\"\n"),
    };
    let (auths, threshold) = render_authorities(&opts.authorities, opts.threshold);
    let store = StoreConfig::default();
    format!(
        r#"# Shoal gateway configuration. Unknown keys are errors.
# Relative paths are resolved against the directory holding this file.

# Where the identity key (identity.key), the per-epoch Sphinx keys (sphinx/) and the
# mailbox store ({store_file}) live. Keep it private and on a disk that honours fsync:
# a SURB-ack is sent only after the packet it acknowledges is durable here.
data_dir = "."

# UDP address of the QUIC link endpoint other nodes (relays, gateways) send packets to.
listen = {listen}

# Address published in the directory for other nodes to dial. Defaults to `listen`;
# required when `listen` is a wildcard address such as 0.0.0.0.
{public}
# UDP address of the QUIC endpoint clients connect to. Any key may connect; only keys
# registered as accounts (`shoal gateway account add`) are served.
client_listen = {client}

# HTTP address serving Prometheus metrics at /metrics. Omit to disable.
# Metrics are aggregate counters only; bind it to a private interface anyway.
{metrics}
# Unwrapping worker threads. Defaults to the number of CPU cores.
# workers = 2

# Subnets hosted here: each admin's Ed25519 public key (hex), as `shoal admin init`
# prints it. Only these admins may connect to `client_listen` as admins, and only
# commands they signed (create/de-provision accounts, quotas, policy) are applied.
# A running gateway re-reads this list on SIGHUP (other settings need a restart).
{subnets}

# Frames that may wait for a worker (all workers together); beyond it they are shed.
# queue_capacity = 8192

[directory]
# The directory authorities: HTTP address and Ed25519 public key (hex). The gateway
# publishes its descriptor to every one, fetches documents from any, and serves the
# documents to its clients.
authorities = [
{auths}]
# Distinct authority signatures a directory document needs to be accepted.
threshold = {threshold}

[mailbox]
# Items in every pull answer: real ones padded with dummies, so the volume a client
# downloads says nothing about how much mail it has.
pull_batch = {pull_batch}
# Unfetched items are deleted after this many seconds.
ttl_secs = {ttl}
# Items an account may hold unless `account add --quota` says otherwise. Deliveries
# beyond it are refused without an ack, so senders retry later.
default_quota = {quota}
# An item offered in a pull and not acked is offered again after this many seconds.
redelivery_timeout_secs = {redelivery}
# A pull is answered this many milliseconds after it arrives, whatever the mailbox
# holds, so the answer's timing says nothing about it. Reading the answer from the
# store must fit in it; a read that does not is answered with dummies (its items come
# with the next pull) and counted in shoal_gateway_pull_answers_late_total.
pull_answer_delay_ms = {answer_delay}

[store]
# Write batches made durable in one transaction (one fsync) at most: the group commit.
max_batch = {max_batch}
# Write batches that may wait for the store's writer.
queue_capacity = {store_queue}
# The store's page cache in MiB; it counts in the gateway's memory use.
# cache_mib = 64

[limits]
# Each account's Sphinx frames pass a token bucket refilled at `rate_factor` times the
# directory's client rate (lambda_p + lambda_l + lambda_d) and holding `burst_secs` of
# that refill. Honest clients send at exactly the client rate, so they never reach it;
# frames over it are dropped and counted (shoal_gateway_client_frames_throttled_total).
# rate_factor = {rate_factor}
# burst_secs = {burst_secs}
# An account with `cut_after` frames over the limit within `cut_window_secs` has its
# links closed (Error RateLimited) and new links refused for `cut_penalty_secs`.
# cut_after = {cut_after}
# cut_window_secs = {cut_window}
# cut_penalty_secs = {cut_penalty}
"#,
        store_file = STORE_FILE,
        listen = toml_str(&opts.listen.to_string()),
        public = on_off(opts.public_addr, "public_addr", "203.0.113.7:7101"),
        client = toml_str(&opts.client_listen.to_string()),
        metrics = on_off(opts.metrics_listen, "metrics_listen", "127.0.0.1:9102"),
        pull_batch = DEFAULT_PULL_BATCH,
        ttl = DEFAULT_TTL_SECS,
        quota = DEFAULT_QUOTA,
        redelivery = DEFAULT_REDELIVERY_SECS,
        answer_delay = DEFAULT_PULL_ANSWER_DELAY.as_millis(),
        max_batch = store.max_batch,
        store_queue = store.queue_capacity,
        rate_factor = DEFAULT_RATE_FACTOR,
        burst_secs = DEFAULT_BURST_SECS,
        cut_after = DEFAULT_CUT_AFTER,
        cut_window = DEFAULT_CUT_WINDOW.as_secs(),
        cut_penalty = DEFAULT_CUT_PENALTY.as_secs(),
        subnets = if opts.subnets.is_empty() {
            "# subnets = [\"<hex admin key>\"]".to_owned()
        } else {
            let list: Vec<String> = opts
                .subnets
                .iter()
                .map(|s| toml_str(&hex::encode(s.0)))
                .collect();
            format!("subnets = [{}]", list.join(", "))
        },
    )
}

/// Sets up a gateway directory: a fresh identity key and a commented `gateway.toml`
/// whose `data_dir` is the directory itself. Refuses to overwrite either file. Returns
/// the config path and the gateway's identity.
pub fn init_dir(dir: &Path, opts: &InitOptions) -> Result<(PathBuf, [u8; 32]), GatewayError> {
    let config_path = dir.join(CONFIG_FILE);
    if config_path.exists() {
        return Err(GatewayError::AlreadyExists { path: config_path });
    }
    let text = render_template(opts);
    // Refuse a config that would not load, before anything is written. A template
    // without authorities is allowed: the operator fills them in.
    match Config::parse(&text, &config_path) {
        Ok(_) => {}
        Err(GatewayError::ConfigValue {
            key: "directory.authorities",
            ..
        }) if opts.authorities.is_empty() => {}
        Err(e) => return Err(e),
    }
    let identity = shoal_relay::keystore::create_identity(dir, &mut rand::rng())
        .map_err(GatewayError::node)?;
    shoal_relay::keystore::write_private(&config_path, text.as_bytes(), true)
        .map_err(GatewayError::node)?;
    Ok((config_path, identity.verifying_key().to_bytes()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    const KEY: &str = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a";

    fn minimal(extra: &str, tables: &str) -> String {
        format!(
            "data_dir = \"keys\"\nlisten = \"127.0.0.1:7101\"\nclient_listen = \"127.0.0.1:7102\"\n{extra}\n[directory]\nauthorities = [{{ addr = \"127.0.0.1:8000\", key = \"{KEY}\" }}]\nthreshold = 1\n{tables}"
        )
    }

    fn parse(text: &str) -> Result<Config, GatewayError> {
        Config::parse(text, Path::new("/etc/shoal/gateway.toml"))
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = parse(&minimal("", "")).unwrap();
        assert_eq!(c.data_dir(), Path::new("/etc/shoal/keys"));
        assert_eq!(c.store_path(), Path::new("/etc/shoal/keys/mailboxes.redb"));
        assert_eq!(c.client_listen, "127.0.0.1:7102".parse().unwrap());
        assert_eq!(c.mailbox.pull_batch, DEFAULT_PULL_BATCH);
        assert_eq!(c.default_quota, DEFAULT_QUOTA);
        assert_eq!(c.store, StoreConfig::default());
        assert_eq!(c.limits, LimitConfig::default());
        let c = parse(&minimal(
            "",
            "[limits]\nrate_factor = 8\ncut_after = 5\ncut_penalty_secs = 1\n",
        ))
        .unwrap();
        assert_eq!(c.limits.rate_factor, 8.0);
        assert_eq!(c.limits.cut_after, 5);
        assert_eq!(c.limits.cut_penalty, Duration::from_secs(1));
        assert_eq!(c.limits.burst_secs, DEFAULT_BURST_SECS);
    }

    #[test]
    fn unknown_keys_are_named_in_every_table() {
        for text in [
            minimal("colour = \"blue\"", ""),
            minimal("", "[mailbox]\npull_bacth = 3\n"),
            minimal("", "[store]\nfsync = false\n"),
            minimal("", "[limits]\nfsync = false\n"),
        ] {
            let e = parse(&text).unwrap_err().to_string();
            assert!(e.starts_with("/etc/shoal/gateway.toml"), "{e}");
            assert!(
                e.contains("colour") || e.contains("pull_bacth") || e.contains("fsync"),
                "{e}"
            );
        }
    }

    #[test]
    fn bad_values_name_their_key() {
        let cases = [
            (
                minimal("", "").replace("127.0.0.1:7102", "nope"),
                "`client_listen`",
            ),
            (minimal("", "").replace("127.0.0.1:7101", "x"), "`listen`"),
            (
                minimal("", "[mailbox]\npull_batch = 0\n"),
                "`mailbox.pull_batch`",
            ),
            (
                minimal("", "[mailbox]\nttl_secs = 0\n"),
                "`mailbox.ttl_secs`",
            ),
            (
                minimal("", "[mailbox]\ndefault_quota = 0\n"),
                "`mailbox.default_quota`",
            ),
            (minimal("", "[store]\nmax_batch = 0\n"), "`store.max_batch`"),
            (
                minimal("", "[limits]\nrate_factor = 0.5\n"),
                "`limits.rate_factor`",
            ),
            (
                minimal("", "[limits]\nburst_secs = 0\n"),
                "`limits.burst_secs`",
            ),
            (
                minimal("", "[limits]\ncut_after = 0\n"),
                "`limits.cut_after`",
            ),
            (
                minimal("", "[limits]\ncut_window_secs = 0\n"),
                "`limits.cut_window_secs`",
            ),
            (minimal("subnets = [\"00\"]", ""), "`subnets`"),
            (
                minimal("", "").replace("threshold = 1", "threshold = 2"),
                "`directory.threshold`",
            ),
            (
                minimal("", "").replace("127.0.0.1:7102", "127.0.0.1:7101"),
                "`client_listen`",
            ),
        ];
        for (text, key) in cases {
            let e = parse(&text).unwrap_err().to_string();
            assert!(e.contains(key), "{key}: {e}");
        }
    }

    #[test]
    fn template_parses_back_and_init_refuses_to_overwrite() {
        let mut key = [0u8; 32];
        hex::decode_to_slice(KEY, &mut key).unwrap();
        let opts = InitOptions {
            listen: "127.0.0.1:7101".parse().unwrap(),
            public_addr: None,
            client_listen: "127.0.0.1:7102".parse().unwrap(),
            metrics_listen: Some("127.0.0.1:9102".parse().unwrap()),
            authorities: vec![AuthorityAddr {
                addr: "192.0.2.1:8000".parse().unwrap(),
                key,
            }],
            threshold: None,
            subnets: vec![Hex32(key)],
        };
        let dir = tempfile::tempdir().unwrap();
        let (path, id) = init_dir(dir.path(), &opts).unwrap();
        let c = Config::load(&path).unwrap();
        assert_eq!(c.node.authorities, opts.authorities);
        assert_eq!(c.node.metrics_listen, opts.metrics_listen);
        assert_eq!(c.client_listen, opts.client_listen);
        assert_eq!(c.subnets, opts.subnets);
        assert_eq!(c.limits, LimitConfig::default());
        let identity = shoal_relay::keystore::load_identity(&c.node.identity_path()).unwrap();
        assert_eq!(identity.verifying_key().to_bytes(), id);
        assert!(matches!(
            init_dir(dir.path(), &opts),
            Err(GatewayError::AlreadyExists { .. })
        ));
    }
}

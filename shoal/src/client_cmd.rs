//! `shoal client ...`: a Loopix client a person can use.
//!
//! Everything lives in one directory: `client.toml` (gateway, authorities, timings),
//! `client.redb` (identity, account key, outgoing queue, received messages, contacts)
//! and `outbox/` (messages handed over by `send` while `run` holds the store).
//!
//! `send` queues durably and then, by default, runs the client until the message is
//! acked (`--no-wait` just queues; the next `run` sends it). While `shoal client run`
//! is running, the store is locked by it, so `send` drops the message into `outbox/`
//! instead and the running client picks it up within a second. `read` needs the store,
//! so it works while the client is stopped; a running client prints messages as they
//! arrive.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Subcommand;
use ed25519_dalek::SigningKey;
use serde::{Deserialize, Serialize};
use shoal_client::driver::{self, DriverConfig, DriverEvent};
use shoal_client::{ClientStore, ContactCard, Identity};
use shoal_relay::config::AuthorityAddr;
use shoal_topology::{AuthoritySet, Hex32};

pub const CONFIG_FILE: &str = "client.toml";
pub const STORE_FILE: &str = "client.redb";
const OUTBOX_DIR: &str = "outbox";

#[derive(Subcommand, Debug)]
pub enum ClientCommand {
    /// Create an identity (account key, X25519 key, mailbox address) and DIR/client.toml.
    Init {
        #[arg(long)]
        dir: PathBuf,
        /// The gateway's node key, as ADDR=HEXKEY (ADDR is its node link address).
        #[arg(long, value_name = "ADDR=HEXKEY", value_parser = parse_authority)]
        gateway: AuthorityAddr,
        /// The gateway's client endpoint.
        #[arg(long)]
        gateway_client_addr: SocketAddr,
        /// A directory authority as ADDR=HEXKEY (repeatable).
        #[arg(long = "authority", value_name = "ADDR=HEXKEY", value_parser = parse_authority, required = true)]
        authorities: Vec<AuthorityAddr>,
        /// Authority signatures a document needs (default: a majority).
        #[arg(long)]
        threshold: Option<usize>,
        /// The name your contact card carries.
        #[arg(long, default_value = "me")]
        name: String,
    },
    /// Contact cards.
    #[command(subcommand)]
    Contact(ContactCommand),
    /// Queue a message to a contact (and by default run until it is acked).
    Send {
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        #[arg(long)]
        to: String,
        message: String,
        /// Only queue it; a later `shoal client run` sends it.
        #[arg(long)]
        no_wait: bool,
        /// Give up waiting for the ack after this many seconds.
        #[arg(long, default_value_t = 120)]
        timeout_secs: u64,
    },
    /// Print received messages.
    Read {
        #[arg(long, default_value = ".")]
        dir: PathBuf,
    },
    /// Run the client until SIGINT or SIGTERM; prints messages as they arrive.
    Run {
        /// The client's config file (DIR/client.toml).
        #[arg(long)]
        config: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
pub enum ContactCommand {
    /// Print your pasteable contact card.
    Show {
        #[arg(long, default_value = ".")]
        dir: PathBuf,
    },
    /// Save someone's card under NAME.
    Add {
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        name: String,
        card: String,
    },
    /// List saved contacts.
    List {
        #[arg(long, default_value = ".")]
        dir: PathBuf,
    },
}

fn parse_authority(s: &str) -> Result<AuthorityAddr, String> {
    s.parse()
}

/// `client.toml`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientFile {
    /// The name your contact card carries.
    pub name: String,
    pub gateway: GatewaySection,
    pub directory: DirectorySection,
    #[serde(default)]
    pub timing: TimingSection,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewaySection {
    /// Hex Ed25519 node key of the gateway (its id in the directory).
    pub node_key: String,
    /// The gateway's client endpoint.
    pub client_addr: SocketAddr,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirectorySection {
    /// Hex Ed25519 keys of the authorities (clients fetch the directory through their
    /// gateway, so only the keys matter).
    pub authority_keys: Vec<String>,
    pub threshold: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TimingSection {
    pub pull_interval_ms: u64,
    pub snapshot_interval_ms: u64,
    pub directory_refresh_secs: u64,
}

impl Default for TimingSection {
    fn default() -> Self {
        TimingSection {
            pull_interval_ms: 1000,
            snapshot_interval_ms: 5000,
            directory_refresh_secs: 300,
        }
    }
}

fn hex32(s: &str, what: &str) -> anyhow::Result<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(s.trim(), &mut out)
        .with_context(|| format!("{what} is not 32 hex bytes"))?;
    Ok(out)
}

/// A checked client config.
#[derive(Debug)]
pub struct Loaded {
    pub dir: PathBuf,
    pub name: String,
    pub driver: DriverConfig,
}

pub fn load_config(path: &Path) -> anyhow::Result<Loaded> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let file: ClientFile = toml::from_str(&text)
        .with_context(|| format!("{} is not a valid client config", path.display()))?;
    let gateway_key = hex32(&file.gateway.node_key, "gateway.node_key")?;
    let mut keys = Vec::new();
    for k in &file.directory.authority_keys {
        keys.push(Hex32(hex32(k, "directory.authority_keys")?));
    }
    let authorities = AuthoritySet {
        threshold: file.directory.threshold,
        keys,
    };
    authorities.validate().context("directory")?;
    let t = &file.timing;
    if t.pull_interval_ms == 0 || t.snapshot_interval_ms == 0 || t.directory_refresh_secs == 0 {
        bail!("{}: timing values must be positive", path.display());
    }
    let mut driver = DriverConfig::new(file.gateway.client_addr, gateway_key, authorities);
    driver.pull_interval = Duration::from_millis(t.pull_interval_ms);
    driver.snapshot_interval = Duration::from_millis(t.snapshot_interval_ms);
    driver.directory_refresh = Duration::from_secs(t.directory_refresh_secs);
    let dir = path
        .parent()
        .map(Path::to_path_buf)
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or_else(|| PathBuf::from("."));
    Ok(Loaded {
        dir,
        name: file.name,
        driver,
    })
}

fn open_store(dir: &Path) -> anyhow::Result<ClientStore> {
    let path = dir.join(STORE_FILE);
    if !path.exists() {
        bail!(
            "{} has no client; run `shoal client init --dir {}` first",
            dir.display(),
            dir.display()
        );
    }
    ClientStore::open(&path).with_context(|| {
        format!(
            "cannot open {} (is `shoal client run` using it?)",
            path.display()
        )
    })
}

/// The identity and account key of the client in `store`.
pub fn load_identity(store: &ClientStore) -> anyhow::Result<(Identity, SigningKey)> {
    let identity = store
        .load_identity()?
        .context("the store holds no identity")?;
    let key = store
        .load_account_key()?
        .context("the store holds no account key")?;
    Ok((identity, SigningKey::from_bytes(&key)))
}

/// Writes a fresh identity into `dir`; returns (account key, mailbox, contact card).
pub fn init_dir(
    dir: &Path,
    gateway_key: [u8; 32],
    client_file: &ClientFile,
) -> anyhow::Result<([u8; 32], [u8; 32], String)> {
    // Owner-only: the store in it holds the identity's secrets.
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let config_path = dir.join(CONFIG_FILE);
    let store_path = dir.join(STORE_FILE);
    if config_path.exists() || store_path.exists() {
        bail!("{} already holds a client", dir.display());
    }
    let mut rng = rand::rng();
    let account = SigningKey::generate(&mut rng);
    let identity = Identity::generate(&mut rng, gateway_key);
    let store = ClientStore::open(&store_path)?;
    store.save_identity(&identity)?;
    store.save_account_key(&account.to_bytes())?;
    let card = ContactCard::new(client_file.name.clone(), identity.contact())
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let text = render_config(client_file);
    std::fs::write(&config_path, text)
        .with_context(|| format!("cannot write {}", config_path.display()))?;
    Ok((
        account.verifying_key().to_bytes(),
        identity.mailbox,
        card.to_text(),
    ))
}

/// `read` for a managed client: pending raw messages go through the messenger (policy,
/// TTL), then its inbox is read, which deletes burn-on-read messages; the state is
/// saved before anything is printed, so a burnt message is gone even if printing fails.
fn read_managed(
    store: &ClientStore,
    snapshot: &shoal_client::messenger::MessengerSnapshot,
) -> anyhow::Result<()> {
    let now = shoal_client::managed::unix_ms();
    let mut messenger = shoal_client::messenger::Messenger::restore(snapshot, now)?;
    let mut consumed = Vec::new();
    for m in store.received_messages()? {
        messenger.handle_incoming(&m.bytes, now);
        consumed.push(m.message_id);
    }
    let messages = messenger.read(now);
    store.save_messenger(&messenger.snapshot()?, &consumed)?;
    for m in messages {
        let place = if m.group.is_some() { " (group)" } else { "" };
        let burn = if m.burn_on_read {
            " [burnt after this read]"
        } else {
            ""
        };
        println!(
            "[{}] {}{place}: {}{burn}",
            format_ms(m.received_unix_ms),
            m.from,
            String::from_utf8_lossy(&m.body)
        );
    }
    let drops = messenger.policy_drops();
    if drops > 0 {
        println!("({drops} messages dropped by your subnet's policy so far)");
    }
    Ok(())
}

/// `client.toml` with a comment on every key (what it does, and its unit).
pub fn render_config(f: &ClientFile) -> String {
    let keys: Vec<String> = f
        .directory
        .authority_keys
        .iter()
        .map(|k| format!("\"{k}\""))
        .collect();
    let t = &f.timing;
    format!(
        r#"# Shoal client. The identity, account key, queue, messages and contacts are in
# {STORE_FILE} in this directory; keep the directory private.

# The name your contact card carries (others see it when you give them your card).
name = {name}

[gateway]
# The gateway's Ed25519 node key (hex): its id in the directory, pinned on the link.
node_key = "{node_key}"
# The gateway's client endpoint (QUIC, ip:port).
client_addr = "{client_addr}"

[directory]
# Ed25519 keys (hex) of the directory authorities. The directory comes through the
# gateway; only documents signed by `threshold` of these keys are used.
authority_keys = [{keys}]
# How many authority signatures a directory document needs.
threshold = {threshold}

[timing]
# The mailbox is pulled this often (ms), busy or idle: a constant schedule.
pull_interval_ms = {pull}
# The client's state is saved at least this often (ms) when it changed.
snapshot_interval_ms = {snap}
# The directory is fetched again this often (seconds), and when it expires.
directory_refresh_secs = {dir}
"#,
        name = toml::Value::String(f.name.clone()),
        node_key = f.gateway.node_key,
        client_addr = f.gateway.client_addr,
        keys = keys.join(", "),
        threshold = f.directory.threshold,
        pull = t.pull_interval_ms,
        snap = t.snapshot_interval_ms,
        dir = t.directory_refresh_secs,
    )
}

/// A message waiting in `outbox/` for a running client.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Spooled {
    to: String,
    message: String,
}

fn spool(dir: &Path, to: &str, message: &str) -> anyhow::Result<PathBuf> {
    let outbox = dir.join(OUTBOX_DIR);
    std::fs::create_dir_all(&outbox)?;
    let mut id = [0u8; 8];
    rand::RngExt::fill(&mut rand::rng(), &mut id);
    let name = format!("{}.json", hex::encode(id));
    let tmp = outbox.join(format!(".{name}.tmp"));
    let body = serde_json::to_vec(&Spooled {
        to: to.to_string(),
        message: message.to_string(),
    })?;
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&body)?;
        f.sync_all()?;
    }
    let path = outbox.join(name);
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("shoal-client")
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn find_contact(store: &ClientStore, name: &str) -> anyhow::Result<ContactCard> {
    store
        .contacts()?
        .into_iter()
        .find(|c| c.name == name)
        .with_context(|| {
            format!("no contact named {name:?}; add one with `shoal client contact add`")
        })
}

pub fn run(cmd: ClientCommand) -> anyhow::Result<()> {
    match cmd {
        ClientCommand::Init {
            dir,
            gateway,
            gateway_client_addr,
            authorities,
            threshold,
            name,
        } => {
            let threshold = threshold.unwrap_or(authorities.len() / 2 + 1);
            if threshold == 0 || threshold > authorities.len() {
                bail!(
                    "--threshold {threshold} must be between 1 and the number of --authority ({})",
                    authorities.len()
                );
            }
            let file = ClientFile {
                name,
                gateway: GatewaySection {
                    node_key: hex::encode(gateway.key),
                    client_addr: gateway_client_addr,
                },
                directory: DirectorySection {
                    authority_keys: authorities.iter().map(|a| hex::encode(a.key)).collect(),
                    threshold,
                },
                timing: TimingSection::default(),
            };
            let (account, mailbox, card) = init_dir(&dir, gateway.key, &file)?;
            println!("account key: {}", hex::encode(account));
            println!("mailbox: {}", hex::encode(mailbox));
            println!("contact card: {card}");
            println!("config written: {}", dir.join(CONFIG_FILE).display());
            println!(
                "ask the gateway operator to run: shoal gateway account add --config <gateway.toml> --key {} --mailbox {}",
                hex::encode(account),
                hex::encode(mailbox)
            );
            Ok(())
        }
        ClientCommand::Contact(ContactCommand::Show { dir }) => {
            let loaded = load_config(&dir.join(CONFIG_FILE))?;
            let store = open_store(&dir)?;
            let (identity, _) = load_identity(&store)?;
            let card = ContactCard::new(loaded.name, identity.contact())
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            println!("{}", card.to_text());
            Ok(())
        }
        ClientCommand::Contact(ContactCommand::Add { dir, name, card }) => {
            let store = open_store(&dir)?;
            let parsed = ContactCard::parse(&card).map_err(|e| anyhow::anyhow!("{e}"))?;
            let card = ContactCard::new(name.clone(), parsed.contact)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            store.put_contact(&card)?;
            println!("contact {name:?} saved");
            Ok(())
        }
        ClientCommand::Contact(ContactCommand::List { dir }) => {
            let store = open_store(&dir)?;
            for c in store.contacts()? {
                println!("{}\t{}", c.name, c.to_text());
            }
            Ok(())
        }
        ClientCommand::Read { dir } => {
            let store = open_store(&dir)?;
            if let Some(snapshot) = store.load_messenger()? {
                return read_managed(&store, &snapshot);
            }
            for m in store.received_messages()? {
                println!(
                    "[{}] {}",
                    format_ms(m.received_unix_ms),
                    String::from_utf8_lossy(&m.bytes)
                );
            }
            Ok(())
        }
        ClientCommand::Send {
            dir,
            to,
            message,
            no_wait,
            timeout_secs,
        } => {
            let loaded = load_config(&dir.join(CONFIG_FILE))?;
            let store = match ClientStore::open(dir.join(STORE_FILE)) {
                Ok(s) => s,
                Err(_) if dir.join(STORE_FILE).exists() => {
                    // Most likely `shoal client run` holds the store: hand it over.
                    let path = spool(&dir, &to, &message)?;
                    println!("the client is running; queued in {}", path.display());
                    return Ok(());
                }
                Err(e) => return Err(e.into()),
            };
            let card = find_contact(&store, &to)?;
            let (identity, account) = load_identity(&store)?;
            let store = Arc::new(store);
            runtime()?.block_on(async move {
                let handle = driver::spawn(loaded.driver, identity, &account, store)?;
                let mut events = handle.subscribe();
                let id = handle.send(card.contact, message.into_bytes()).await?;
                println!("queued");
                if no_wait {
                    handle.shutdown().await;
                    return Ok(());
                }
                let wait = async {
                    loop {
                        match events.recv().await {
                            Ok(DriverEvent::Acked { message_id }) if message_id == id => return true,
                            Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                            Err(_) => return false,
                        }
                    }
                };
                let acked = tokio::time::timeout(Duration::from_secs(timeout_secs), wait)
                    .await
                    .unwrap_or(false);
                handle.shutdown().await;
                if acked {
                    println!("delivered to {to}'s mailbox");
                    Ok(())
                } else {
                    bail!("no ack within {timeout_secs} s; the message stays queued and `shoal client run` keeps sending it")
                }
            })
        }
        ClientCommand::Run { config } => {
            let loaded = load_config(&config)?;
            let store = open_store(&loaded.dir)?;
            let (identity, account) = load_identity(&store)?;
            let store = Arc::new(store);
            let dir = loaded.dir.clone();
            runtime()?.block_on(async move {
                let handle = driver::spawn(loaded.driver, identity, &account, store.clone())?;
                let mut events = handle.subscribe();
                let mut outbox_tick = tokio::time::interval(Duration::from_millis(500));
                let signal = crate::runtime::wait_for_signal();
                tokio::pin!(signal);
                loop {
                    tokio::select! {
                        r = &mut signal => { r?; break; }
                        _ = outbox_tick.tick() => drain_outbox(&dir, &store, &handle).await,
                        ev = events.recv() => match ev {
                            Ok(DriverEvent::Message { bytes, received_unix_ms, .. }) => {
                                println!("[{}] {}", format_ms(received_unix_ms), String::from_utf8_lossy(&bytes));
                            }
                            Ok(DriverEvent::Acked { .. }) => println!("a sent message was acked"),
                            Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                            Err(_) => break,
                        },
                    }
                }
                tracing::info!("shutting down");
                handle.shutdown().await;
                Ok(())
            })
        }
    }
}

/// Moves messages from `outbox/` into the client's durable queue.
async fn drain_outbox(dir: &Path, store: &ClientStore, handle: &driver::ClientHandle) {
    let Ok(entries) = std::fs::read_dir(dir.join(OUTBOX_DIR)) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let spooled = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<Spooled>(&b).ok());
        let Some(s) = spooled else {
            tracing::warn!(file = %path.display(), "unreadable outbox file; left in place");
            continue;
        };
        let card = match find_contact(store, &s.to) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("outbox: {e:#}; message discarded");
                let _ = std::fs::remove_file(&path);
                continue;
            }
        };
        match handle.send(card.contact, s.message.into_bytes()).await {
            // Durable in the store now, so the spool file can go.
            Ok(_) => {
                let _ = std::fs::remove_file(&path);
                println!("queued a message to {}", s.to);
            }
            Err(e) => tracing::warn!(error = %e, "cannot queue an outbox message"),
        }
    }
}

fn format_ms(ms: u64) -> String {
    let secs = ms / 1000;
    let (h, m, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
    format!("{h:02}:{m:02}:{s:02} UTC")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn commented_config_parses_back() {
        let f = ClientFile {
            name: "ana \"the\" admin".into(),
            gateway: GatewaySection {
                node_key: "ab".repeat(32),
                client_addr: "127.0.0.1:4000".parse().unwrap(),
            },
            directory: DirectorySection {
                authority_keys: vec!["cd".repeat(32), "ef".repeat(32)],
                threshold: 2,
            },
            timing: TimingSection::default(),
        };
        let text = render_config(&f);
        assert!(text.lines().filter(|l| l.starts_with('#')).count() >= 8);
        let back: ClientFile = toml::from_str(&text).unwrap();
        assert_eq!(
            toml::to_string(&back).unwrap(),
            toml::to_string(&f).unwrap()
        );
    }
}

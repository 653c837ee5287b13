//! `shoal client ...`: a Loopix client a person can use.
//!
//! Everything lives in one directory: `client.toml` (gateway, authorities, timings),
//! `client.redb` (identity, account key, outgoing queue, received messages, contacts)
//! and `outbox/` (requests waiting for the running client, see [`crate::client_spool`]).
//!
//! Only the long-running client touches the network: `shoal client run` (or `shoal
//! chat`), started in the background with `shoal client start`. It stays connected
//! with its constant streams whether its owner sends or not. Every other command works
//! on the store or the outbox and returns: `send` and the group commands that send
//! queue a request that the running client takes in within a second (`--wait` then
//! waits for its receipt). A command that connected to send would show an observer of
//! the client's link when its owner sends.
//!
//! The running client holds the store (redb locks it), which is how a command tells
//! whether one runs. While it runs, commands that read or change the member state
//! (`group card`, `create`, `list`) are answered by it through the outbox too; `read`
//! and the `contact` commands need the store, so they work while it is stopped.
//!
//! A member of a subnet (the admin's `credential` and `policy` files in the directory,
//! read on first use) also has groups: `shoal client group ...` does what the chat does,
//! for scripts. Its state (MLS groups, inbox) is the chat's, in the same store, and
//! `chat.json` holds the same contacts' membership cards and group names.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use ed25519_dalek::SigningKey;
use serde::{Deserialize, Serialize};
use shoal_client::driver::{self, DriverConfig, DriverEvent};
use shoal_client::group::GroupEvent;
use shoal_client::managed::{self, ManagedHandle, unix_ms};
use shoal_client::messenger::{
    Messenger, MessengerEvent, PinnedContact, StoredMessage, display_name, invite_to_text,
};
use shoal_client::{ClientError, ClientStore, ContactCard, Identity};

use crate::chat::member::{ChatFile, MemberFiles, card_credential, clean, open_messenger};
use crate::client_spool::{
    Applied, MemberSpooler, Op, Reply, ReplyLevel, ReplyState, Request, Spooled, SpooledBytes,
    apply_member_op, spooled_files, wait_reply, waiting, write_reply, write_spool,
};
use shoal_topology::AuthorityAddr;
use shoal_topology::{AuthoritySet, Hex32};

pub const CONFIG_FILE: &str = "client.toml";
pub const STORE_FILE: &str = "client.redb";
/// Written by the running `shoal client run` once it holds the store: its process id.
pub const PID_FILE: &str = "client.pid";
/// Where `shoal client start` sends the background client's output.
pub const LOG_FILE: &str = "client.log";
/// How long group changes are collected before they take effect, unless set on first use.
const DEFAULT_COMMIT_SETTLE_SECS: u64 = 30;

#[derive(Subcommand, Debug)]
pub enum ClientCommand {
    /// Create an identity (account key for the gateway link, identity key for the
    /// subnet, X25519 seal key, mailbox address) and DIR/client.toml. The account key
    /// comes first; the gateway is then the one the public rule gives it among the
    /// gateways named (give all the directory's gateways: a member's client refuses any
    /// other than the rule's choice over the directory).
    Init {
        #[arg(long)]
        dir: PathBuf,
        /// A gateway's node key, as ADDR=HEXKEY (ADDR is its node link address);
        /// repeatable, in the same order as --gateway-client-addr.
        #[arg(long = "gateway", value_name = "ADDR=HEXKEY", required = true)]
        gateways: Vec<AuthorityAddr>,
        /// That gateway's client endpoint (repeatable, one per --gateway).
        #[arg(long = "gateway-client-addr", required = true)]
        gateway_client_addrs: Vec<SocketAddr>,
        /// The network's trust root: the network file its operators publish (the
        /// directory authorities and how many must sign). Check the fingerprint this
        /// prints with them.
        #[arg(long, value_name = "FILE", conflicts_with_all = ["authorities", "threshold"], required_unless_present = "authorities")]
        network: Option<PathBuf>,
        /// Instead of --network: a directory authority as ADDR=HEXKEY (repeatable), as
        /// the network's operators announce them.
        #[arg(long = "authority", value_name = "ADDR=HEXKEY")]
        authorities: Vec<AuthorityAddr>,
        /// With --authority: signatures a document needs (default: a majority).
        #[arg(long)]
        threshold: Option<usize>,
        /// Your admin's invite file: refused if it is for another network than the one
        /// you trust (an admin cannot choose your directory authorities).
        #[arg(long, value_name = "FILE")]
        invite: Option<PathBuf>,
        /// The name your contact card carries.
        #[arg(long, default_value = "me")]
        name: String,
    },
    /// Contact cards.
    #[command(subcommand)]
    Contact(ContactCommand),
    /// Queue a message to a contact in the outbox; the running client sends it.
    Send {
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        #[arg(long)]
        to: String,
        message: String,
        #[command(flatten)]
        wait: WaitOpts,
    },
    /// Print received messages.
    Read {
        #[arg(long, default_value = ".")]
        dir: PathBuf,
    },
    /// Run the client until SIGINT or SIGTERM; prints messages as they arrive. The only
    /// command (with `shoal chat`) that connects to the network.
    Run {
        /// The client's config file (DIR/client.toml).
        #[arg(long)]
        config: PathBuf,
    },
    /// Start `shoal client run` in the background (log in DIR/client.log); returns once
    /// it holds the client's store.
    Start {
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 30)]
        timeout_secs: u64,
    },
    /// Stop the background client `start` started (SIGTERM); returns once it has let go
    /// of the store.
    Stop {
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 30)]
        timeout_secs: u64,
    },
    /// Groups (for a member of a subnet): create, invite, list, send, remove, update, leave.
    #[command(subcommand)]
    Group(GroupCommand),
}

/// The client directory and, on first use only, the admin's membership files.
#[derive(Args, Debug)]
pub struct MemberOpts {
    #[arg(long, default_value = ".")]
    dir: PathBuf,
    /// First use only: the membership credential your admin gave you (default DIR/credential).
    #[arg(long)]
    credential: Option<PathBuf>,
    /// First use only: your subnet's policy file (default DIR/policy).
    #[arg(long)]
    policy: Option<PathBuf>,
    /// First use only: how long group changes are collected before they take effect
    /// (every member must get them within this time).
    #[arg(long, default_value_t = DEFAULT_COMMIT_SETTLE_SECS)]
    commit_settle_secs: u64,
}

#[derive(Args, Debug)]
pub struct WaitOpts {
    /// Wait until the running client reports the message durable in every
    /// recipient's mailbox (or the group change settled).
    #[arg(long)]
    wait: bool,
    /// Do not even wait for the running client to take it in (for scripts that queue
    /// many); errors then show only in the running client's output.
    #[arg(long, hide = true)]
    no_wait: bool,
    /// Give up waiting after this many seconds (what is queued stays queued).
    #[arg(long, default_value_t = 120)]
    timeout_secs: u64,
}

#[derive(Subcommand, Debug)]
pub enum GroupCommand {
    /// Print your membership card, for people who will add you to a group (one card
    /// brings you into one group; print a fresh one for the next).
    Card {
        #[command(flatten)]
        member: MemberOpts,
    },
    /// Make a group with only you in it; NAME is yours alone (others see its id).
    Create {
        #[command(flatten)]
        member: MemberOpts,
        name: String,
    },
    /// Add contacts (saved with `contact add HANDLE CARD`, or whose card came over the
    /// network) to GROUP, in one change.
    Invite {
        #[command(flatten)]
        member: MemberOpts,
        /// A name given with `group create`, or the id `group list` shows.
        group: String,
        #[arg(required = true, value_name = "CONTACT")]
        contacts: Vec<String>,
        #[command(flatten)]
        wait: WaitOpts,
    },
    /// Your groups: members, epoch, changes waiting to settle; and cards received.
    List {
        #[command(flatten)]
        member: MemberOpts,
    },
    /// Send MESSAGE to every other member of GROUP.
    Send {
        #[command(flatten)]
        member: MemberOpts,
        /// A name given with `group create`, or the id `group list` shows.
        group: String,
        message: String,
        /// Seconds the message is kept on the recipients' devices (policy bounds it).
        #[arg(long, default_value_t = crate::chat::DEFAULT_TTL_SECS)]
        ttl: u64,
        /// Recipients delete it after they first read it.
        #[arg(long)]
        burn_on_read: bool,
        #[command(flatten)]
        wait: WaitOpts,
    },
    /// Remove MEMBER (a handle) from GROUP.
    Remove {
        #[command(flatten)]
        member: MemberOpts,
        /// A name given with `group create`, or the id `group list` shows.
        group: String,
        #[arg(value_name = "MEMBER")]
        handle: String,
        #[command(flatten)]
        wait: WaitOpts,
    },
    /// Fresh keys for you in GROUP (post-compromise security).
    Update {
        #[command(flatten)]
        member: MemberOpts,
        /// A name given with `group create`, or the id `group list` shows.
        group: String,
        #[command(flatten)]
        wait: WaitOpts,
    },
    /// Ask to leave GROUP; the next change by another member removes you.
    Leave {
        #[command(flatten)]
        member: MemberOpts,
        /// A name given with `group create`, or the id `group list` shows.
        group: String,
        #[command(flatten)]
        wait: WaitOpts,
    },
}

#[derive(Subcommand, Debug)]
pub enum ContactCommand {
    /// Print your pasteable contact card.
    Show {
        #[arg(long, default_value = ".")]
        dir: PathBuf,
    },
    /// Save someone's card under NAME. A membership card (`shoal-invite1:`, from
    /// `group card`) is saved under the handle its credential carries, for groups.
    Add {
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        name: String,
        card: String,
    },
    /// List saved contacts, and every member key pinned so far with its safety number
    /// (compare it with the person's own `contact list`, read out over a trusted channel).
    List {
        #[arg(long, default_value = ".")]
        dir: PathBuf,
    },
    /// Accept the key of someone who sent you their card over the network, or a changed
    /// key (`handle` or `handle@subnet`): check the safety number first.
    Accept {
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        contact: String,
    },
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
    /// Test-only switches; absent from configs `init` writes.
    #[serde(default, skip_serializing_if = "TestingSection::is_default")]
    pub testing: TestingSection,
}

/// `[testing]`: switches that exist only so tests and the observer's control runs can
/// measure what a protection is worth. Never set them in use.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TestingSection {
    /// Restores the pre-fix leaks: cover routing and the λP rule that show who sends
    /// real traffic to which gateway (`shoal_client::core::ClientConfig::legacy_leaks`),
    /// and acks in separate frames right after saving instead of in the next pull.
    pub legacy_leaks: bool,
}

impl TestingSection {
    fn is_default(&self) -> bool {
        *self == TestingSection::default()
    }
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
    let key: Hex32 = s.parse().map_err(|e| anyhow::anyhow!("{what}: {e}"))?;
    Ok(key.0)
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
    driver.legacy_leaks = file.testing.legacy_leaks;
    driver.client.legacy_leaks = file.testing.legacy_leaks;
    if file.testing.legacy_leaks {
        tracing::warn!("[testing] legacy_leaks is on: the client's traffic shows what it sends");
    }
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
    ClientStore::open(&path).map_err(|e| match e {
        ClientError::StoreInUse => anyhow::anyhow!(
            "the client is running and holds {}: `shoal client stop --dir {}` first",
            path.display(),
            dir.display()
        ),
        e => anyhow::Error::from(e).context(format!("cannot open {}", path.display())),
    })
}

/// `open_store` for the long-running client: a command that checks a request against
/// the store holds it for a moment, so a client started just then waits (bounded) for it.
fn open_store_waiting(dir: &Path) -> anyhow::Result<ClientStore> {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        match ClientStore::open(dir.join(STORE_FILE)) {
            Ok(store) => return Ok(store),
            Err(ClientError::StoreInUse) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            // Says why, in the usual words.
            Err(_) => return open_store(dir),
        }
    }
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

/// What a fresh client directory's owner gives an admin or a gateway operator.
#[derive(Debug)]
pub struct NewClient {
    /// The link key: all a gateway sees of this client.
    pub account_key: [u8; 32],
    /// The identity key a credential names (MLS, direct messages, address binding).
    pub identity_key: [u8; 32],
    pub mailbox: [u8; 32],
    pub seal_key: [u8; 32],
    pub card: String,
}

/// Writes a fresh identity into `dir`.
pub fn init_dir(
    dir: &Path,
    account: SigningKey,
    gateway_key: [u8; 32],
    client_file: &ClientFile,
) -> anyhow::Result<NewClient> {
    // Owner-only: the store in it holds the identity's secrets.
    shoal_relay::keystore::create_private_dir(dir)?;
    let config_path = dir.join(CONFIG_FILE);
    let store_path = dir.join(STORE_FILE);
    if config_path.exists() || store_path.exists() {
        bail!("{} already holds a client", dir.display());
    }
    let mut rng = rand::rng();
    // One key per purpose: the link key the gateway knows the account by (made first,
    // since it chose the gateway), the identity key that signs as the member, and the
    // X25519 seal key.
    let keys = shoal_client::MemberKeys::with_account(&mut rng, account, gateway_key);
    let store = ClientStore::open(&store_path)?;
    keys.save(&store)?;
    let identity = &keys.identity;
    let card = ContactCard::new(client_file.name.clone(), identity.contact())
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let text = render_config(client_file);
    std::fs::write(&config_path, text)
        .with_context(|| format!("cannot write {}", config_path.display()))?;
    Ok(NewClient {
        account_key: keys.account_key(),
        identity_key: keys.identity_key(),
        mailbox: identity.mailbox,
        seal_key: identity.contact().public_key,
        card: card.to_text(),
    })
}

/// `read` for a member: pending raw messages go through the messenger (policy, TTL),
/// then its inbox is read, which deletes burn-on-read messages; the state is saved
/// before anything is printed, so a burnt message is gone even if printing fails.
fn read_managed(
    dir: &Path,
    store: &ClientStore,
    snapshot: &shoal_client::messenger::MessengerSnapshot,
) -> anyhow::Result<()> {
    let now = shoal_client::managed::unix_ms();
    let mut messenger = Messenger::restore(snapshot, now)?;
    let mut consumed = Vec::new();
    for m in store.received_messages()? {
        messenger.handle_incoming(&m.bytes, now);
        consumed.push(m.message_id);
    }
    if messenger.poll_outgoing().is_some() {
        // What arrived calls for a group change this offline read cannot send (and an
        // own commit kept but never sent would fork the group): leave it to `run`.
        println!(
            "({} new items need the network; `shoal client run` takes them in)",
            consumed.len()
        );
        messenger = Messenger::restore(snapshot, now)?;
        consumed.clear();
    }
    let messages = messenger.read(now);
    store.save_messenger(&messenger.snapshot()?, &consumed)?;
    let file = ChatFile::load(dir)?;
    for m in messages {
        println!("{}", message_line(&m, &file, true));
    }
    let drops = messenger.policy_drops();
    if drops > 0 {
        println!("({drops} messages dropped by your subnet's policy so far)");
    }
    Ok(())
}

/// One received message for the terminal: time, group, sender, body, TTL, burn flag.
fn message_line(m: &StoredMessage, file: &ChatFile, burnt_now: bool) -> String {
    let place = match &m.group {
        Some(g) => format!("#{} ", clean(file.group_label(g).as_bytes())),
        None => String::new(),
    };
    let ttl = crate::chat::human_secs(m.expires_unix_ms.saturating_sub(m.received_unix_ms) / 1000);
    let burn = match (m.burn_on_read, burnt_now) {
        (false, _) => "",
        (true, true) => ", burn-on-read: deleted after this read",
        (true, false) => ", burn-on-read",
    };
    let alert = if m.key_alert {
        " [NEW KEY, not accepted]"
    } else {
        ""
    };
    let from = if m.unverified {
        "unverified plain message (no sender identity)".to_string()
    } else {
        display_name(&m.from, &m.from_subnet)
    };
    format!(
        "[{}] {place}{from}{alert}: {} [ttl {ttl}{burn}]",
        format_ms(m.received_unix_ms),
        clean(&m.body)
    )
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
{testing}"#,
        name = toml::Value::String(f.name.clone()),
        node_key = f.gateway.node_key,
        client_addr = f.gateway.client_addr,
        keys = keys.join(", "),
        threshold = f.directory.threshold,
        pull = t.pull_interval_ms,
        snap = t.snapshot_interval_ms,
        dir = t.directory_refresh_secs,
        testing = if f.testing.legacy_leaks {
            "\n[testing]\n# Test-only: turns the client link's timing protection off.\nlegacy_leaks = true\n"
        } else {
            ""
        },
    )
}

/// Queues `bytes` for the contact of `card` (a contact card's text) in the outbox of
/// the client at `dir`: its running client (`shoal client run`) sends it as an ordinary
/// message. Used by `shoal admin` for policy updates.
pub(crate) fn spool_bytes(dir: &Path, card: &str, bytes: &[u8]) -> anyhow::Result<PathBuf> {
    let (_, path) = write_spool(
        dir,
        &Spooled::Bytes(SpooledBytes {
            card: card.to_string(),
            bytes: hex::encode(bytes),
        }),
    )?;
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
            gateways,
            gateway_client_addrs,
            network,
            authorities,
            threshold,
            invite,
            name,
        } => {
            let network = match network {
                Some(path) => crate::network_file::Network::load(&path)?,
                None => crate::network_file::Network::from_flags(authorities, threshold)?,
            };
            if let Some(path) = &invite {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read the invite {}", path.display()))?;
                crate::network_file::check_invite(&text, &network)
                    .with_context(|| format!("the invite {}", path.display()))?;
            }
            if gateways.len() != gateway_client_addrs.len() {
                bail!(
                    "give one --gateway-client-addr per --gateway ({} and {})",
                    gateway_client_addrs.len(),
                    gateways.len()
                );
            }
            // Keys first: the gateway follows from the account key by the public rule,
            // so neither the person nor an admin picks it.
            let account = SigningKey::generate(&mut rand::rng());
            let ids: Vec<[u8; 32]> = gateways.iter().map(|g| g.key).collect();
            let chosen =
                shoal_topology::gateway_for_member(&ids, &account.verifying_key().to_bytes())
                    .context("no --gateway given")?;
            let at = ids
                .iter()
                .position(|g| *g == chosen)
                .context("chosen gateway")?;
            let (gateway, gateway_client_addr) = (&gateways[at], gateway_client_addrs[at]);
            let file = ClientFile {
                name,
                gateway: GatewaySection {
                    node_key: hex::encode(gateway.key),
                    client_addr: gateway_client_addr,
                },
                directory: DirectorySection {
                    authority_keys: (network.authorities.iter())
                        .map(|a| hex::encode(a.key))
                        .collect(),
                    threshold: network.set.threshold,
                },
                timing: TimingSection::default(),
                testing: TestingSection::default(),
            };
            let NewClient {
                account_key: account,
                identity_key,
                mailbox,
                seal_key,
                card,
            } = init_dir(&dir, account, gateway.key, &file)?;
            println!("account key: {}", hex::encode(account));
            println!("identity key: {}", hex::encode(identity_key));
            println!(
                "gateway: {}={} (client endpoint {gateway_client_addr}; the rule's choice for your key among {} named)",
                gateway.addr,
                hex::encode(gateway.key),
                gateways.len()
            );
            println!("mailbox: {}", hex::encode(mailbox));
            println!("seal key: {}", hex::encode(seal_key));
            println!("network: {}", network.fingerprint());
            println!("contact card: {card}");
            println!("config written: {}", dir.join(CONFIG_FILE).display());
            println!(
                "check the network fingerprint with your network's operators (their network file shows it): it names the directory authorities this client trusts"
            );
            println!(
                "to enrol in a subnet: give your admin these lines with your invite code \
                 (`shoal admin redeem`); without a subnet, ask the gateway operator to run: \
                 shoal gateway account add --config <gateway.toml> --key {} --mailbox {}",
                hex::encode(account),
                hex::encode(mailbox)
            );
            Ok(())
        }
        ClientCommand::Contact(ContactCommand::Show { dir }) => {
            let loaded = load_config(&dir.join(CONFIG_FILE))?;
            let store = open_store(&dir)?;
            let (identity, _) = load_identity(&store)?;
            if store.load_messenger()?.is_some() || dir.join("credential").exists() {
                // A member's card: the signed member card the chat's `/card` gives.
                let files = MemberFiles {
                    credential: None,
                    policy: None,
                    commit_settle_secs: 30,
                };
                let mut m = open_messenger(&dir, &files, &store, identity.contact())?;
                let card = invite_to_text(&m.invite()?);
                // The card's one-time key is now part of the state: keep it.
                store.save_messenger(&m.snapshot()?, &[])?;
                println!("{card}");
                return Ok(());
            }
            let card = ContactCard::new(loaded.name, identity.contact())
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            println!("{}", card.to_text());
            Ok(())
        }
        ClientCommand::Contact(ContactCommand::Add { dir, name, card }) => {
            let store = open_store(&dir)?;
            if card.trim().starts_with("shoal-invite1:") {
                return add_member_card(&dir, &store, &name, &card);
            }
            if store.load_messenger()?.is_some() {
                bail!(
                    "this is a plain card (shoal1:), which carries no signed identity; as a member, ask {} for their member card (`shoal client contact show`, or /card in the chat), which starts with shoal-invite1:",
                    clean(name.as_bytes())
                );
            }
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
                println!("{}\t{}", clean(c.name.as_bytes()), c.to_text());
            }
            for c in ChatFile::load(&dir)?.contacts {
                let name = match card_credential(&c.card) {
                    Ok((_, m)) => display_name(m.handle(), &m.subnet()),
                    Err(_) => clean(c.handle.as_bytes()),
                };
                println!("{name}\t{}", c.card);
            }
            if let Some(snapshot) = store.load_messenger()? {
                let m = Messenger::restore(&snapshot, unix_ms())?;
                for c in m.contacts() {
                    println!("{}", pinned_line(&m, c));
                }
            }
            Ok(())
        }
        ClientCommand::Contact(ContactCommand::Accept { dir, contact }) => {
            let store = open_store(&dir)?;
            let snapshot = store
                .load_messenger()?
                .context("no member state yet: run `shoal client group card` first")?;
            let mut m = Messenger::restore(&snapshot, unix_ms())?;
            let c = m.find_contact(&contact)?.clone();
            m.confirm_contact(&c.subnet, &c.identity_key);
            store.save_messenger(&m.snapshot()?, &[])?;
            let c = m
                .contact(&c.subnet, &c.identity_key)
                .cloned()
                .context("contact vanished")?;
            println!("accepted: {}", pinned_line(&m, &c));
            Ok(())
        }
        ClientCommand::Read { dir } => {
            let store = open_store(&dir)?;
            if let Some(snapshot) = store.load_messenger()? {
                return read_managed(&dir, &store, &snapshot);
            }
            // A gateway's answers to an admin's commands are filed by the running client
            // (`admin-answers/`), not mail to show.
            for m in store.received_messages()? {
                if !crate::admin_cmd::is_answer(&m.bytes) {
                    println!("[{}] {}", format_ms(m.received_unix_ms), clean(&m.bytes));
                }
            }
            Ok(())
        }
        ClientCommand::Send {
            dir,
            to,
            message,
            wait,
        } => hand_over(&dir, Op::Direct { to, message }, &wait),
        ClientCommand::Start { dir, timeout_secs } => start_background(&dir, timeout_secs),
        ClientCommand::Stop { dir, timeout_secs } => stop_background(&dir, timeout_secs),
        ClientCommand::Group(cmd) => run_group(cmd),
        ClientCommand::Run { config } => {
            let loaded = load_config(&config)?;
            let store = open_store_waiting(&loaded.dir)?;
            let (identity, account) = load_identity(&store)?;
            // Holding the store now: say so to `client start` and `client stop`.
            let _pid = PidFile::write(&loaded.dir)?;
            // A member (its state in the store, or the admin's files in the directory on
            // first use) runs the messenger: policy updates, groups, checked messages.
            if store.load_messenger()?.is_some() || loaded.dir.join("credential").exists() {
                let files = MemberFiles {
                    credential: None,
                    policy: None,
                    commit_settle_secs: DEFAULT_COMMIT_SETTLE_SECS,
                };
                let messenger = open_messenger(&loaded.dir, &files, &store, identity.contact())?;
                let mut loaded = loaded;
                // A member uses the gateway the public rule gives its key, or none.
                loaded.driver.assigned_to = Some(account.verifying_key().to_bytes());
                return run_member(loaded, store, identity, account, messenger);
            }
            let store = Arc::new(store);
            let dir = loaded.dir.clone();
            runtime()?.block_on(async move {
                let handle = driver::spawn(loaded.driver, identity, &account, store.clone())?;
                let mut events = handle.subscribe();
                let mut outbox_tick = tokio::time::interval(Duration::from_millis(500));
                let mut following = HashMap::new();
                let signal = crate::runtime::wait_for_signal();
                tokio::pin!(signal);
                loop {
                    tokio::select! {
                        r = &mut signal => { r?; break; }
                        _ = outbox_tick.tick() => {
                            drain_outbox(&dir, &store, &handle, &mut following).await;
                        }
                        ev = events.recv() => match ev {
                            Ok(DriverEvent::Message { bytes, received_unix_ms, .. }) => {
                                // A gateway's answer to an admin command is filed, not shown.
                                if !crate::admin_cmd::keep_answer(&dir, &bytes) {
                                    println!("[{}] {}", format_ms(received_unix_ms), clean(&bytes));
                                }
                            }
                            Ok(DriverEvent::Acked { message_id }) => {
                                println!("a sent message was acked");
                                if let Some((id, to)) = following.remove(&message_id) {
                                    let reply = Reply {
                                        state: ReplyState::Done,
                                        text: format!("delivered to {to}'s mailbox"),
                                    };
                                    write_reply(&dir, &id, &reply);
                                }
                            }
                            // The driver has logged it; only the final one ends the run.
                            Ok(DriverEvent::Problem(p)) => {
                                if p.is_final() {
                                    handle.shutdown().await;
                                    bail!("{p}");
                                }
                            }
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

/// Sends whose final reply a command asked for: the request's id and who to.
type Following = HashMap<shoal_packet::MessageId, (String, String)>;

/// The outbox of a client without a subnet: texts to saved contacts and prepared
/// bytes go into the client's durable queue; each file is removed once it is there.
async fn drain_outbox(
    dir: &Path,
    store: &ClientStore,
    handle: &driver::ClientHandle,
    following: &mut Following,
) {
    for (id, path, s) in spooled_files(dir) {
        let (contact, bytes, to, reply) = match s {
            Spooled::Text(t) => match find_contact(store, &t.to) {
                Ok(c) => (c.contact, t.message.into_bytes(), t.to, ReplyLevel::None),
                Err(e) => {
                    eprintln!("outbox: {e:#}; message discarded");
                    let _ = std::fs::remove_file(&path);
                    continue;
                }
            },
            Spooled::Bytes(b) => match b.decode() {
                Some((contact, bytes)) => {
                    (contact, bytes, "a member".to_string(), ReplyLevel::None)
                }
                None => {
                    eprintln!("outbox: a damaged file; discarded");
                    let _ = std::fs::remove_file(&path);
                    continue;
                }
            },
            Spooled::Request(Request {
                request: Op::Direct { to, message },
                reply,
            }) => match find_contact(store, &to) {
                Ok(c) => (c.contact, message.into_bytes(), to, reply),
                Err(e) => {
                    refuse(dir, &id, &path, reply, &format!("{e:#}"));
                    continue;
                }
            },
            Spooled::Request(r) => {
                let why = "group commands are for members of a subnet (this client has no membership credential)";
                refuse(dir, &id, &path, r.reply, why);
                continue;
            }
        };
        let to = clean(to.as_bytes());
        match handle.send(contact, bytes).await {
            // Durable in the store now, so the spool file can go.
            Ok(message_id) => {
                let _ = std::fs::remove_file(&path);
                println!("queued a message to {to}");
                if reply >= ReplyLevel::Accepted {
                    let r = Reply {
                        state: ReplyState::Accepted,
                        text: format!("queued: message to {to}"),
                    };
                    write_reply(dir, &id, &r);
                }
                if reply >= ReplyLevel::Final {
                    following.insert(message_id, (id, to));
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot queue an outbox message"),
        }
    }
}

/// A request the running client cannot do: removed, and the reason given if asked for.
fn refuse(dir: &Path, id: &str, path: &Path, reply: ReplyLevel, why: &str) {
    eprintln!("outbox: {why}; request discarded");
    let _ = std::fs::remove_file(path);
    if reply >= ReplyLevel::Accepted {
        let r = Reply {
            state: ReplyState::Failed,
            text: why.to_string(),
        };
        write_reply(dir, id, &r);
    }
}

/// Saves a membership card in `chat.json` (shared with the chat) and pins its key as
/// confirmed (the user pasted it: that is the vouching).
fn add_member_card(dir: &Path, store: &ClientStore, name: &str, card: &str) -> anyhow::Result<()> {
    let (_, member) = card_credential(card)?;
    let handle = member.handle().to_string();
    if handle != name && display_name(&handle, &member.subnet()) != name {
        bail!(
            "this membership card is {:?}'s (the handle its credential carries): save it as `shoal client contact add {} CARD`",
            clean(handle.as_bytes()),
            clean(handle.as_bytes())
        );
    }
    // On first use this reads the admin's files in DIR, like the chat.
    let (identity, _) = load_identity(store)?;
    let files = MemberFiles {
        credential: None,
        policy: None,
        commit_settle_secs: 30,
    };
    let mut m = open_messenger(dir, &files, store, identity.contact())?;
    let pinned = m.confirm_card(&member, unix_ms());
    store.save_messenger(&m.snapshot()?, &[])?;
    let mut file = ChatFile::load(dir)?;
    file.put_contact(&member, card);
    file.save(dir)?;
    println!(
        "member {} saved; add them to a group with `shoal client group invite GROUP {}`",
        pinned.display(),
        clean(handle.as_bytes())
    );
    println!("{}", pinned_line(&m, &pinned));
    Ok(())
}

/// One pinned member key: name, key, state, safety number.
fn pinned_line(m: &Messenger, c: &PinnedContact) -> String {
    let state = match (c.confirmed, c.replaces.is_some()) {
        (true, _) => "confirmed",
        (false, true) => "KEY CHANGED, not accepted",
        (false, false) => "not confirmed",
    };
    format!(
        "{}\tkey {}\t{state}\tsafety number {}",
        c.display(),
        hex::encode(&c.identity_key.0[..4]),
        m.safety_number_with(&c.identity_key)
    )
}

/// `run` for a member: the messenger on the client, printing messages and group news.
fn run_member(
    loaded: Loaded,
    store: ClientStore,
    identity: Identity,
    account: SigningKey,
    messenger: Messenger,
) -> anyhow::Result<()> {
    let store = Arc::new(store);
    let dir = loaded.dir.clone();
    runtime()?.block_on(async move {
        let client = driver::spawn(loaded.driver, identity, &account, store.clone())?;
        let mut problems = client.subscribe();
        let handle = managed::spawn(client, messenger, store.clone())?;
        let mut events = handle.subscribe();
        let mut outbox_tick = tokio::time::interval(Duration::from_millis(500));
        let mut spooler = MemberSpooler::new(&dir, &handle);
        let signal = crate::runtime::wait_for_signal();
        tokio::pin!(signal);
        let result: anyhow::Result<()> = async {
            loop {
                tokio::select! {
                    r = &mut signal => { r?; return Ok(()); }
                    _ = outbox_tick.tick() => {
                        for note in spooler.tick(&handle).await {
                            println!("{note}");
                        }
                    }
                    ev = events.recv() => match ev {
                        Ok(e) => member_event(&handle, &dir, e).await,
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                        Err(_) => return Ok(()),
                    },
                    // The driver logs problems; only the final one ends the run. A
                    // gateway's answer to an admin command is filed for `shoal admin`.
                    ev = problems.recv() => match ev {
                        Ok(DriverEvent::Problem(p)) if p.is_final() => bail!("{p}"),
                        Ok(DriverEvent::Message { bytes, .. }) => {
                            crate::admin_cmd::keep_answer(&dir, &bytes);
                        }
                        _ => {}
                    },
                }
            }
        }
        .await;
        tracing::info!("shutting down");
        handle.shutdown().await;
        result
    })
}

/// One line per message or group change, as `run` prints them.
async fn member_event(handle: &ManagedHandle, dir: &Path, e: MessengerEvent) {
    use std::io::Write;
    // Names may have been given since the start (`group create`, through the outbox).
    let file = ChatFile::load(dir).unwrap_or_default();
    let group_label = |g: &[u8]| clean(file.group_label(g).as_bytes());
    let line = match e {
        MessengerEvent::Message { id, .. } => {
            let stored = handle
                .with(move |m, _| m.peek().iter().find(|s| s.id == id).cloned())
                .await
                .ok()
                .flatten();
            // Gone already (expired): nothing to show.
            let Some(s) = stored else { return };
            if s.burn_on_read {
                // Shown once, by `read`, which then deletes it.
                let mut hidden = s.clone();
                hidden.body = b"(burn-on-read: `shoal client read` shows it once)".to_vec();
                message_line(&hidden, &file, false)
            } else {
                message_line(&s, &file, false)
            }
        }
        MessengerEvent::InviteReceived {
            handle,
            subnet,
            confirmed: true,
            ..
        } => format!(
            "{h} sent you their card: `shoal client group invite GROUP {h}` adds them",
            h = display_name(&handle, &subnet)
        ),
        MessengerEvent::InviteReceived { handle, subnet, .. } => format!(
            "{h} sent you their card, from a key you have not confirmed: check the safety number (`shoal client contact list`), then `shoal client contact accept {h}`",
            h = display_name(&handle, &subnet)
        ),
        MessengerEvent::KeyChanged {
            subnet,
            handle,
            old_key,
            new_key,
        } => format!(
            "WARNING: {} has a NEW KEY ({} instead of {}): a new device, or someone impersonating them; their messages are kept apart until you check the safety number and `shoal client contact accept` it",
            display_name(&handle, &subnet),
            hex::encode(&new_key.0[..4]),
            hex::encode(&old_key.0[..4])
        ),
        MessengerEvent::PolicyDrop {
            handle, refusal, ..
        } => format!(
            "a message from {:?} was dropped by your subnet's policy: {refusal}",
            clean(handle.as_bytes())
        ),
        MessengerEvent::PolicyUpdated { version } => {
            format!("your admin's policy version {version} is in force")
        }
        MessengerEvent::Dropped { reason } => {
            format!("a message that failed its checks was dropped: {reason}")
        }
        MessengerEvent::Group(g) => match g {
            GroupEvent::Joined { group } => format!("you joined group {}", group_label(&group)),
            GroupEvent::MemberAdded { group, member } => format!(
                "{} joined group {}",
                display_name(member.credential.handle(), &member.credential.subnet()),
                group_label(&group)
            ),
            GroupEvent::MemberRemoved { group, member } => format!(
                "{} left group {}",
                display_name(member.credential.handle(), &member.credential.subnet()),
                group_label(&group)
            ),
            GroupEvent::Removed { group } => {
                format!("you were removed from group {}", group_label(&group))
            }
            GroupEvent::Refused {
                group,
                handle,
                refusal,
            } => format!(
                "group {} refused: your policy does not allow {:?}: {refusal}",
                group_label(&group),
                clean(handle.as_bytes())
            ),
            GroupEvent::DuplicateHandle {
                group,
                existing,
                new,
            } => format!(
                "WARNING: a second {:?} with a different key joined group {}: {} (key {}) besides {} (key {})",
                clean(new.credential.handle().as_bytes()),
                group_label(&group),
                display_name(new.credential.handle(), &new.credential.subnet()),
                hex::encode(&new.credential.signing_key()[..4]),
                display_name(existing.credential.handle(), &existing.credential.subnet()),
                hex::encode(&existing.credential.signing_key()[..4]),
            ),
            GroupEvent::OwnCommitLost { group, .. } => format!(
                "your change to group {} lost to another member's; make it again",
                group_label(&group)
            ),
            GroupEvent::Diverged { group, epoch } => format!(
                "group {} diverged at epoch {epoch}: messages from the other branch cannot be read",
                group_label(&group)
            ),
            GroupEvent::EpochChanged { group, epoch } => {
                format!("group {} is at epoch {epoch}", group_label(&group))
            }
            _ => return,
        },
        _ => return,
    };
    println!("{line}");
    let _ = std::io::stdout().flush();
}

/// Whether a long-running client (`run`, or the chat) holds the store in `dir`; if
/// not, the store, opened.
fn store_or_running(dir: &Path) -> anyhow::Result<Option<ClientStore>> {
    let path = dir.join(STORE_FILE);
    if !path.exists() {
        bail!(
            "{} has no client; run `shoal client init --dir {}` first",
            dir.display(),
            dir.display()
        );
    }
    match ClientStore::open(&path) {
        Ok(store) => Ok(Some(store)),
        Err(ClientError::StoreInUse) => Ok(None),
        Err(e) => Err(anyhow::Error::from(e).context(format!("cannot open {}", path.display()))),
    }
}

/// Whether the client in `dir` is a member of a subnet (it runs the messenger).
fn is_member(dir: &Path, store: &ClientStore) -> anyhow::Result<bool> {
    Ok(store.load_messenger()?.is_some() || dir.join("credential").exists())
}

/// With no client running: what `op` would do, checked on the store's state without
/// keeping anything (`None` for an op that sends nothing, which is then done for real
/// and printed). A bad request is refused here, before it is queued.
fn check_offline(
    dir: &Path,
    store: &ClientStore,
    op: &Op,
    files: &MemberFiles,
) -> anyhow::Result<Option<String>> {
    if !is_member(dir, store)? {
        return match op {
            Op::Direct { to, .. } => {
                find_contact(store, to)?;
                Ok(Some(format!("message to {}", clean(to.as_bytes()))))
            }
            _ => bail!(
                "group commands are for members of a subnet: {} holds no membership credential",
                dir.display()
            ),
        };
    }
    let (identity, _) = load_identity(store)?;
    let mut m = open_messenger(dir, files, store, identity.contact())?;
    let mut file = ChatFile::load(dir)?;
    let Applied { text, .. } = apply_member_op(&mut m, &mut file, dir, op.clone(), unix_ms())?;
    if op.sends() {
        // A copy: the running client makes the change (an own commit kept but never
        // sent would fork its group).
        let what = ["queued: ", "done: "]
            .iter()
            .find_map(|p| text.strip_prefix(p))
            .unwrap_or(&text);
        return Ok(Some(what.to_string()));
    }
    if m.poll_outgoing().is_some() {
        bail!(
            "your client has group changes to send first: start it (`shoal client start --dir {}`), then try again",
            dir.display()
        );
    }
    store.save_messenger(&m.snapshot()?, &[])?;
    println!("{text}");
    Ok(None)
}

/// Hands `op` to the long-running client through the outbox: this command opens no
/// connection, whatever it asks for. With no client running, the request is checked
/// against the store and waits in the outbox for the next start.
fn hand_over_with(dir: &Path, op: Op, wait: &WaitOpts, files: &MemberFiles) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(wait.timeout_secs);
    let sends = op.sends();
    let offline = match store_or_running(dir)? {
        Some(store) => match check_offline(dir, &store, &op, files)? {
            Some(what) => Some(what),
            // Done already (an op that sends nothing).
            None => return Ok(()),
        },
        None => None,
    };
    // Running: hear at least that it was taken in (errors are reported then).
    // (`--no-wait`, for old scripts: not even that; they spool at their own pace.)
    let level = match (&offline, wait.wait || !sends) {
        (_, true) => ReplyLevel::Final,
        (None, false) if wait.no_wait => ReplyLevel::None,
        (None, false) => ReplyLevel::Accepted,
        (Some(_), false) => ReplyLevel::None,
    };
    let (id, path) = write_spool(
        dir,
        &Spooled::Request(Request {
            request: op,
            reply: level,
        }),
    )?;
    if let Some(what) = &offline {
        println!(
            "queued: {what}; no client is running, so it waits in {} until one starts: `shoal client start --dir {}`",
            path.display(),
            dir.display()
        );
        if level == ReplyLevel::None {
            return Ok(());
        }
    } else if level == ReplyLevel::None {
        println!("queued in {}; the running client sends it", path.display());
        return Ok(());
    }
    let mut failed = None;
    let last = wait_reply(dir, &id, level, deadline, |r| match r.state {
        ReplyState::Failed => failed = Some(r.text.clone()),
        _ if offline.is_some() && r.state == ReplyState::Accepted => {}
        _ => println!("{}", r.text),
    });
    if let Some(why) = failed {
        bail!("{why}");
    }
    match last {
        Some(r) if r.state == ReplyState::Done || level == ReplyLevel::Accepted => Ok(()),
        Some(_) => bail!(
            "no receipt within {} s; it stays queued and the running client goes on with it",
            wait.timeout_secs
        ),
        None if offline.is_some() => bail!(
            "no client started within {} s; the request stays queued in {}",
            wait.timeout_secs,
            path.display()
        ),
        None => bail!(
            "the running client did not take the request in within {} s; it stays queued in {}",
            wait.timeout_secs,
            path.display()
        ),
    }
}

fn hand_over(dir: &Path, op: Op, wait: &WaitOpts) -> anyhow::Result<()> {
    let files = MemberFiles {
        credential: None,
        policy: None,
        commit_settle_secs: DEFAULT_COMMIT_SETTLE_SECS,
    };
    hand_over_with(dir, op, wait, &files)
}

fn run_group(cmd: GroupCommand) -> anyhow::Result<()> {
    let answer = WaitOpts {
        wait: true,
        no_wait: false,
        timeout_secs: 30,
    };
    let (member, op, wait) = match cmd {
        GroupCommand::Card { member } => (member, Op::GroupCard, answer),
        GroupCommand::Create { member, name } => (member, Op::GroupCreate { name }, answer),
        GroupCommand::List { member } => (member, Op::GroupList, answer),
        GroupCommand::Invite {
            member,
            group,
            contacts,
            wait,
        } => (member, Op::GroupInvite { group, contacts }, wait),
        GroupCommand::Send {
            member,
            group,
            message,
            ttl,
            burn_on_read,
            wait,
        } => (
            member,
            Op::GroupSend {
                group,
                message,
                ttl_secs: ttl,
                burn_on_read,
            },
            wait,
        ),
        GroupCommand::Remove {
            member,
            group,
            handle,
            wait,
        } => (member, Op::GroupRemove { group, handle }, wait),
        GroupCommand::Update {
            member,
            group,
            wait,
        } => (member, Op::GroupUpdate { group }, wait),
        GroupCommand::Leave {
            member,
            group,
            wait,
        } => (member, Op::GroupLeave { group }, wait),
    };
    let files = MemberFiles {
        credential: member.credential,
        policy: member.policy,
        commit_settle_secs: member.commit_settle_secs,
    };
    hand_over_with(&member.dir, op, &wait, &files)
}

/// `DIR/client.pid` while `run` holds the store; removed when it ends.
struct PidFile(PathBuf);

impl PidFile {
    fn write(dir: &Path) -> anyhow::Result<PidFile> {
        let path = dir.join(PID_FILE);
        crate::chat::member::write_private(&path, format!("{}\n", std::process::id()).as_bytes())?;
        Ok(PidFile(path))
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let ours = std::fs::read_to_string(&self.0)
            .is_ok_and(|s| s.trim() == std::process::id().to_string());
        if ours {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

fn read_pid(dir: &Path) -> Option<u32> {
    std::fs::read_to_string(dir.join(PID_FILE))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// `client start`: `shoal client run` detached from this terminal (its own process
/// group, so Ctrl-C here does not reach it), output in `DIR/client.log` (owner-only).
/// Returns once the new process holds the store, or fails with the end of its log.
fn start_background(dir: &Path, timeout_secs: u64) -> anyhow::Result<()> {
    let config = dir.join(CONFIG_FILE);
    load_config(&config)?;
    if store_or_running(dir)?.is_none() {
        match read_pid(dir) {
            Some(pid) => println!("the client is already running (pid {pid})"),
            None => println!("the client is already running (the chat, or `client run`)"),
        }
        return Ok(());
    }
    let log_path = dir.join(LOG_FILE);
    let log = {
        let mut opts = std::fs::OpenOptions::new();
        opts.append(true).create(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        opts.open(&log_path)
            .with_context(|| format!("cannot open {}", log_path.display()))?
    };
    #[cfg(unix)]
    std::fs::set_permissions(
        &log_path,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )?;
    let exe = std::env::current_exe().context("cannot find the shoal binary")?;
    let mut command = std::process::Command::new(exe);
    command
        .args(["client", "run", "--config"])
        .arg(&config)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    #[cfg(unix)]
    std::os::unix::process::CommandExt::process_group(&mut command, 0);
    let mut child = command.spawn().context("cannot start the client")?;
    let deadline = std::time::Instant::now() + Duration::from_secs(timeout_secs);
    loop {
        if read_pid(dir) == Some(child.id()) {
            let queued = waiting(dir);
            if queued > 0 {
                println!("{queued} queued requests leave with it");
            }
            println!(
                "the client is running in the background (pid {}, log {}); `shoal client stop --dir {}` stops it",
                child.id(),
                log_path.display(),
                dir.display()
            );
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            bail!(
                "the client stopped at once ({status}); the end of {}:\n{}",
                log_path.display(),
                log_tail(&log_path)
            );
        }
        if std::time::Instant::now() >= deadline {
            bail!(
                "the client did not get going within {timeout_secs} s (pid {}, log {})",
                child.id(),
                log_path.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(10)..].join("\n")
}

/// `client stop`: SIGTERM to the client `run` wrote into `DIR/client.pid` (only while
/// the store is held, so a stale file never names another process), then waits until
/// the store is free.
fn stop_background(dir: &Path, timeout_secs: u64) -> anyhow::Result<()> {
    if store_or_running(dir)?.is_some() {
        println!("no client is running");
        return Ok(());
    }
    let Some(pid) = read_pid(dir) else {
        bail!("the store is held by a client `start` did not start (the chat?): stop that one");
    };
    // `kill` keeps this crate free of unsafe code.
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .context("cannot run kill")?;
    if !status.success() {
        bail!("cannot signal pid {pid}");
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(timeout_secs);
    loop {
        if store_or_running(dir)?.is_some() {
            println!("the client stopped");
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            bail!("the client (pid {pid}) is still running after {timeout_secs} s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn format_ms(ms: u64) -> String {
    crate::human_time::human_time_ms(ms)
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
            testing: TestingSection::default(),
        };
        let text = render_config(&f);
        assert!(text.lines().filter(|l| l.starts_with('#')).count() >= 8);
        let back: ClientFile = toml::from_str(&text).unwrap();
        assert_eq!(
            toml::to_string(&back).unwrap(),
            toml::to_string(&f).unwrap()
        );
        assert!(!text.contains("[testing]"));
        // The observer's control run adds the test-only table by hand.
        let legacy: ClientFile =
            toml::from_str(&format!("{text}\n[testing]\nlegacy_leaks = true\n")).unwrap();
        assert!(legacy.testing.legacy_leaks);
    }
}

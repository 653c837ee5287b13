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
//!
//! A member of a subnet (the admin's `credential` and `policy` files in the directory,
//! read on first use) also has groups: `shoal client group ...` does what the chat does,
//! for scripts. Its state (MLS groups, inbox) is the chat's, in the same store, and
//! `chat.json` holds the same contacts' membership cards and group names. Commands that
//! change a group run the client until the change has settled and what it sent is
//! acked (`--no-wait` only queues), so they too need the store: stop `run` first.

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
    Messenger, MessengerError, MessengerEvent, OutgoingWhat, PinnedContact, StoredMessage,
    display_name, invite_to_text,
};
use shoal_client::{ClientStore, ContactCard, Identity};
use shoal_subnet::{MemberCard, MessageOptions};

use crate::chat::member::{
    ChatFile, MemberFiles, card_credential, clean, invite_for, open_messenger,
};
use shoal_topology::AuthorityAddr;
use shoal_topology::{AuthoritySet, Hex32};

pub const CONFIG_FILE: &str = "client.toml";
pub const STORE_FILE: &str = "client.redb";
const OUTBOX_DIR: &str = "outbox";
/// How long group changes are collected before they take effect, unless set on first use.
const DEFAULT_COMMIT_SETTLE_SECS: u64 = 30;

#[derive(Subcommand, Debug)]
pub enum ClientCommand {
    /// Create an identity (account key for the gateway link, identity key for the
    /// subnet, X25519 seal key, mailbox address) and DIR/client.toml.
    Init {
        #[arg(long)]
        dir: PathBuf,
        /// The gateway's node key, as ADDR=HEXKEY (ADDR is its node link address).
        #[arg(long, value_name = "ADDR=HEXKEY")]
        gateway: AuthorityAddr,
        /// The gateway's client endpoint.
        #[arg(long)]
        gateway_client_addr: SocketAddr,
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
    /// Only queue it; the next `shoal client run` (or group command) sends it.
    #[arg(long)]
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
    /// Send MESSAGE to every other member of GROUP (waits for every ack).
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
    gateway_key: [u8; 32],
    client_file: &ClientFile,
) -> anyhow::Result<NewClient> {
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
    // One key per purpose: the link key the gateway knows the account by, the identity
    // key that signs as the member, and the X25519 seal key.
    let keys = shoal_client::MemberKeys::generate(&mut rng, gateway_key);
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

/// A message waiting in `outbox/` for a running client.
#[derive(Debug, Serialize, Deserialize)]
#[serde(untagged)]
enum Spooled {
    Text(SpooledText),
    Bytes(SpooledBytes),
}

/// `shoal client send` while `run` holds the store: a text to a saved contact.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SpooledText {
    to: String,
    message: String,
}

/// Bytes another command prepared (an admin's policy update), to a contact card.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SpooledBytes {
    card: String,
    /// Hex.
    bytes: String,
}

impl SpooledBytes {
    /// Where to and what, or `None` for a damaged file.
    fn decode(&self) -> Option<(shoal_client::Contact, Vec<u8>)> {
        let card = ContactCard::parse(&self.card).ok()?;
        Some((card.contact, hex::decode(&self.bytes).ok()?))
    }
}

/// Writes one outbox file atomically (a running client never sees half of one).
fn write_spool(dir: &Path, spooled: &Spooled) -> anyhow::Result<PathBuf> {
    let outbox = dir.join(OUTBOX_DIR);
    std::fs::create_dir_all(&outbox)?;
    let mut id = [0u8; 8];
    rand::RngExt::fill(&mut rand::rng(), &mut id);
    let name = format!("{}.json", hex::encode(id));
    let tmp = outbox.join(format!(".{name}.tmp"));
    let body = serde_json::to_vec(spooled)?;
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

fn spool(dir: &Path, to: &str, message: &str) -> anyhow::Result<PathBuf> {
    write_spool(
        dir,
        &Spooled::Text(SpooledText {
            to: to.to_string(),
            message: message.to_string(),
        }),
    )
}

/// Queues `bytes` for the contact of `card` (a contact card's text) in the outbox of
/// the client at `dir`: its running client (`shoal client run`) sends it as an ordinary
/// message. Used by `shoal admin` for policy updates.
pub(crate) fn spool_bytes(dir: &Path, card: &str, bytes: &[u8]) -> anyhow::Result<PathBuf> {
    write_spool(
        dir,
        &Spooled::Bytes(SpooledBytes {
            card: card.to_string(),
            bytes: hex::encode(bytes),
        }),
    )
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
            } = init_dir(&dir, gateway.key, &file)?;
            println!("account key: {}", hex::encode(account));
            println!("identity key: {}", hex::encode(identity_key));
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
            for m in store.received_messages()? {
                println!("[{}] {}", format_ms(m.received_unix_ms), clean(&m.bytes));
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
                    println!(
                        "the client (or the chat) is running; queued in {}",
                        path.display()
                    );
                    return Ok(());
                }
                Err(e) => return Err(e.into()),
            };
            if let Some(snapshot) = store.load_messenger()? {
                // A member writes signed direct messages, the one format the chat reads.
                return send_member(
                    loaded,
                    store,
                    &snapshot,
                    &to,
                    message,
                    no_wait,
                    timeout_secs,
                );
            }
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
                            Ok(DriverEvent::Acked { message_id }) if message_id == id => return Ok(true),
                            // Waiting out the timeout cannot help: say what is wrong.
                            Ok(DriverEvent::Problem(p)) => return Err(p),
                            Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                            Err(_) => return Ok(false),
                        }
                    }
                };
                let acked = tokio::time::timeout(Duration::from_secs(timeout_secs), wait)
                    .await
                    .unwrap_or(Ok(false));
                handle.shutdown().await;
                match acked {
                    Ok(true) => {
                        println!("delivered to {to}'s mailbox");
                        Ok(())
                    }
                    Ok(false) => bail!("no ack within {timeout_secs} s; the message stays queued and `shoal client run` keeps sending it"),
                    Err(p) => bail!("{p}; the message stays queued"),
                }
            })
        }
        ClientCommand::Group(cmd) => run_group(cmd),
        ClientCommand::Run { config } => {
            let loaded = load_config(&config)?;
            let store = open_store(&loaded.dir)?;
            let (identity, account) = load_identity(&store)?;
            // A member (its state in the store, or the admin's files in the directory on
            // first use) runs the messenger: policy updates, groups, checked messages.
            if store.load_messenger()?.is_some() || loaded.dir.join("credential").exists() {
                let files = MemberFiles {
                    credential: None,
                    policy: None,
                    commit_settle_secs: DEFAULT_COMMIT_SETTLE_SECS,
                };
                let messenger = open_messenger(&loaded.dir, &files, &store, identity.contact())?;
                return run_member(loaded, store, identity, account, messenger);
            }
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
                                // A gateway's answer to an admin command is filed, not shown.
                                if !crate::admin_cmd::keep_answer(&dir, &bytes) {
                                    println!("[{}] {}", format_ms(received_unix_ms), clean(&bytes));
                                }
                            }
                            Ok(DriverEvent::Acked { .. }) => println!("a sent message was acked"),
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

/// Moves messages from `outbox/` into the client's durable queue.
/// The readable files of `dir`'s outbox, each with its path (to remove once queued).
/// An unreadable one is left in place and logged.
fn spooled_files(dir: &Path) -> Vec<(PathBuf, Spooled)> {
    let Ok(entries) = std::fs::read_dir(dir.join(OUTBOX_DIR)) else {
        return Vec::new();
    };
    let mut files = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let spooled = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<Spooled>(&b).ok());
        match spooled {
            Some(s) => files.push((path, s)),
            None => {
                tracing::warn!(file = %path.display(), "unreadable outbox file; left in place")
            }
        }
    }
    files
}

async fn drain_outbox(dir: &Path, store: &ClientStore, handle: &driver::ClientHandle) {
    for (path, s) in spooled_files(dir) {
        let (contact, bytes, to) = match s {
            Spooled::Text(t) => match find_contact(store, &t.to) {
                Ok(c) => (c.contact, t.message.into_bytes(), clean(t.to.as_bytes())),
                Err(e) => {
                    eprintln!("outbox: {e:#}; message discarded");
                    let _ = std::fs::remove_file(&path);
                    continue;
                }
            },
            Spooled::Bytes(b) => match b.decode() {
                Some((contact, bytes)) => (contact, bytes, "a member".to_string()),
                None => {
                    eprintln!("outbox: a damaged file; discarded");
                    let _ = std::fs::remove_file(&path);
                    continue;
                }
            },
        };
        match handle.send(contact, bytes).await {
            // Durable in the store now, so the spool file can go.
            Ok(_) => {
                let _ = std::fs::remove_file(&path);
                println!("queued a message to {to}");
            }
            Err(e) => tracing::warn!(error = %e, "cannot queue an outbox message"),
        }
    }
}

/// The member card to write to the contact `to` (`handle` or `handle@subnet`): a key
/// pinned on first use or confirmed, never an unaccepted key change.
fn member_card_for(m: &Messenger, to: &str) -> anyhow::Result<MemberCard> {
    let c = m.find_contact(to).map_err(|e| match e {
        MessengerError::UnknownContact(_) => anyhow::anyhow!(
            "no member {:?} among your contacts: save their member card with `shoal client contact add {} CARD` (they print it with `shoal client contact show`)",
            clean(to.as_bytes()),
            clean(to.as_bytes())
        ),
        e => anyhow::anyhow!("{e}"),
    })?;
    m.reply_card(&c.subnet, &c.identity_key).map_err(|e| match e {
        MessengerError::NotConfirmed(who) => anyhow::anyhow!(
            "{who} has a new key you have not accepted: compare the safety number (`shoal client contact list`) with theirs, then `shoal client contact accept {who}`"
        ),
        e => anyhow::anyhow!("{e}"),
    })
}

/// `client send` for a member: a signed direct message through the messenger (the
/// format `shoal chat` and `shoal client read` show), then, unless `no_wait`, the
/// client runs until the recipient's mailbox has acked that message.
fn send_member(
    loaded: Loaded,
    store: ClientStore,
    snapshot: &shoal_client::messenger::MessengerSnapshot,
    to: &str,
    message: String,
    no_wait: bool,
    timeout_secs: u64,
) -> anyhow::Result<()> {
    let messenger =
        Messenger::restore(snapshot, unix_ms()).context("cannot restore the member state")?;
    let card = member_card_for(&messenger, to)?;
    let shown = display_name(card.handle(), &card.subnet());
    let (identity, account) = load_identity(&store)?;
    let store = Arc::new(store);
    runtime()?.block_on(async move {
        let client = driver::spawn(loaded.driver, identity, &account, store.clone())?;
        let handle = managed::spawn(client, messenger, store)?;
        let result =
            send_member_online(&handle, card, &shown, message, no_wait, timeout_secs).await;
        handle.shutdown().await;
        result
    })
}

async fn send_member_online(
    handle: &ManagedHandle,
    card: MemberCard,
    shown: &str,
    message: String,
    no_wait: bool,
    timeout_secs: u64,
) -> anyhow::Result<()> {
    use shoal_client::receipts::{Delivery, Receipts};
    // Subscribed before the send, so nothing it causes is missed.
    let mut sent = handle.subscribe_sent();
    let mut raw = handle.client().subscribe();
    let options = MessageOptions {
        ttl_secs: crate::chat::DEFAULT_TTL_SECS,
        burn_on_read: false,
    };
    let ticket = handle
        .with(move |m, now| m.send_direct(&card, options, message.as_bytes(), now))
        .await?
        .map_err(|e| anyhow::anyhow!("not sent: {e}"))?;
    println!("queued");
    if no_wait {
        return Ok(());
    }
    let mut receipts = Receipts::new();
    let mut outcome = receipts.expect(ticket);
    let wait = async {
        loop {
            match outcome.take().map(|(_, d)| d) {
                Some(Delivery::Delivered) => return Ok(()),
                Some(Delivery::Failed(why)) => bail!("not sent: {why}"),
                _ => {}
            }
            tokio::select! {
                s = sent.recv() => if let Ok(s) = s && let Some(id) = s.send {
                    outcome = receipts.on_envelope(id, s.result);
                },
                d = raw.recv() => match d {
                    Ok(DriverEvent::Acked { message_id }) => outcome = receipts.on_acked(&message_id),
                    // Waiting out the timeout cannot help: say what is wrong.
                    Ok(DriverEvent::Problem(p)) => bail!("{p}; the message stays queued"),
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(_) => bail!("the client stopped"),
                },
            }
        }
    };
    match tokio::time::timeout(Duration::from_secs(timeout_secs), wait).await {
        Ok(Ok(())) => {
            println!("delivered to {shown}'s mailbox");
            Ok(())
        }
        Ok(Err(e)) => Err(e),
        Err(_) => bail!(
            "no ack within {timeout_secs} s; the message stays queued and `shoal client run` keeps sending it"
        ),
    }
}

/// `drain_outbox` for a member: spooled messages (from `client send` while `run` or the
/// chat holds the store) become signed direct messages. Returns a line per message for
/// the user (the chat shows them on its status line, `run` prints them).
pub(crate) async fn drain_member_outbox(dir: &Path, handle: &ManagedHandle) -> Vec<String> {
    let mut notes = Vec::new();
    for (path, s) in spooled_files(dir) {
        let s = match s {
            Spooled::Text(t) => t,
            // Prepared bytes (the admin's policy updates) go out as they are.
            Spooled::Bytes(b) => {
                let Some((contact, bytes)) = b.decode() else {
                    notes.push("outbox: a damaged file; discarded".to_string());
                    let _ = std::fs::remove_file(&path);
                    continue;
                };
                match handle.client().send(contact, bytes).await {
                    Ok(_) => {
                        let _ = std::fs::remove_file(&path);
                        notes.push("queued a message to a member".to_string());
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot queue an outbox message"),
                }
                continue;
            }
        };
        let to = s.to.clone();
        let options = MessageOptions {
            ttl_secs: crate::chat::DEFAULT_TTL_SECS,
            burn_on_read: false,
        };
        let done = handle
            .with(move |m, now| {
                let card = member_card_for(m, &s.to)?;
                m.send_direct(&card, options, s.message.as_bytes(), now)
                    .map_err(|e| anyhow::anyhow!("{e}"))
            })
            .await;
        match done {
            // In the messenger's state, saved before it is handed on: the file can go.
            Ok(Ok(_)) => {
                let _ = std::fs::remove_file(&path);
                notes.push(format!("queued a message to {}", clean(to.as_bytes())));
            }
            Ok(Err(e)) => {
                notes.push(format!("outbox: {e:#}; message discarded"));
                let _ = std::fs::remove_file(&path);
            }
            Err(e) => tracing::warn!(error = %e, "cannot queue an outbox message"),
        }
    }
    notes
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

/// A member's client opened for a group command: the store (held until the command
/// ends), its identity and the messenger.
struct Member {
    dir: PathBuf,
    store: ClientStore,
    identity: Identity,
    account: SigningKey,
    messenger: Messenger,
    file: ChatFile,
}

impl Member {
    fn open(opts: &MemberOpts) -> anyhow::Result<Member> {
        let dir = opts.dir.clone();
        let path = dir.join(STORE_FILE);
        if !path.exists() {
            bail!(
                "{} has no client; run `shoal client init --dir {}` first",
                dir.display(),
                dir.display()
            );
        }
        let store = ClientStore::open(&path).with_context(|| {
            format!(
                "cannot open {}: is `shoal client run` or `shoal chat` using it? Group commands need the store: stop it first",
                path.display()
            )
        })?;
        let (identity, account) = load_identity(&store)?;
        let files = MemberFiles {
            credential: opts.credential.clone(),
            policy: opts.policy.clone(),
            commit_settle_secs: opts.commit_settle_secs,
        };
        let messenger = open_messenger(&dir, &files, &store, identity.contact())?;
        let file = ChatFile::load(&dir)?;
        Ok(Member {
            dir,
            store,
            identity,
            account,
            messenger,
            file,
        })
    }

    /// Keeps what an offline command changed. An offline command must not produce
    /// anything to send: an own commit kept but never sent would fork its group.
    fn save(&mut self) -> anyhow::Result<()> {
        if self.messenger.poll_outgoing().is_some() {
            bail!(
                "your client has group changes to send first (your policy now refuses a member): run `shoal client run` for a while, then try again"
            );
        }
        self.store
            .save_messenger(&self.messenger.snapshot()?, &[])?;
        Ok(())
    }

    fn group(&self, query: &str) -> anyhow::Result<Vec<u8>> {
        self.file.find_group(&self.messenger.groups(), query)
    }
}

/// What a group command that needs the network does, and what it waits for.
enum Change {
    Invite(Vec<String>),
    Send(MessageOptions, String),
    Remove(String),
    Update,
    Leave,
}

fn run_group(cmd: GroupCommand) -> anyhow::Result<()> {
    let (opts, group, change, wait) = match cmd {
        GroupCommand::Card { member } => {
            let mut m = Member::open(&member)?;
            let card = invite_to_text(&m.messenger.invite()?);
            // The card's one-time key is now part of the state: keep it.
            m.save()?;
            println!("{card}");
            return Ok(());
        }
        GroupCommand::Create { member, name } => {
            let mut m = Member::open(&member)?;
            if m.file.groups.iter().any(|g| g.name == name) {
                bail!("you already have a group named {name:?}");
            }
            let id = m.messenger.create_group(unix_ms())?;
            m.save()?;
            m.file.groups.push(crate::chat::member::SavedGroup {
                id: hex::encode(&id),
                name: name.clone(),
            });
            m.file.save(&m.dir)?;
            println!("group {name:?} created (id {})", hex::encode(&id));
            println!("add people with `shoal client group invite {name} HANDLE`");
            return Ok(());
        }
        GroupCommand::List { member } => {
            let m = Member::open(&member)?;
            print_groups(&m);
            return Ok(());
        }
        GroupCommand::Invite {
            member,
            group,
            contacts,
            wait,
        } => (member, group, Change::Invite(contacts), wait),
        GroupCommand::Send {
            member,
            group,
            message,
            ttl,
            burn_on_read,
            wait,
        } => {
            let options = MessageOptions {
                ttl_secs: ttl,
                burn_on_read,
            };
            (member, group, Change::Send(options, message), wait)
        }
        GroupCommand::Remove {
            member,
            group,
            handle,
            wait,
        } => (member, group, Change::Remove(handle), wait),
        GroupCommand::Update {
            member,
            group,
            wait,
        } => (member, group, Change::Update, wait),
        GroupCommand::Leave {
            member,
            group,
            wait,
        } => (member, group, Change::Leave, wait),
    };
    let m = Member::open(&opts)?;
    let id = m.group(&group)?;
    let label = clean(m.file.group_label(&id).as_bytes());
    // Contacts are looked up before anything runs, so a typo costs nothing.
    let invites = match &change {
        Change::Invite(handles) => {
            let mut out = Vec::new();
            for h in handles {
                let invite = invite_for(&m.messenger, &m.file, h).with_context(|| {
                    format!(
                        "no card for {:?}: save their membership card (their `shoal client group card`) with `shoal client contact add {} CARD`",
                        clean(h.as_bytes()),
                        clean(h.as_bytes())
                    )
                })?;
                out.push(invite);
            }
            out
        }
        _ => Vec::new(),
    };
    let loaded = load_config(&m.dir.join(CONFIG_FILE))?;
    let Member {
        store,
        identity,
        account,
        messenger,
        ..
    } = m;
    let store = Arc::new(store);
    runtime()?.block_on(async move {
        let client = driver::spawn(loaded.driver, identity, &account, store.clone())?;
        let handle = managed::spawn(client, messenger, store)?;
        let result = change_online(&handle, &id, &label, change, invites, &wait).await;
        handle.shutdown().await;
        result
    })
}

/// Makes `change` on the running messenger and, unless `--no-wait`, waits until it has
/// settled and every envelope it sent is acked.
async fn change_online(
    handle: &ManagedHandle,
    id: &[u8],
    label: &str,
    change: Change,
    invites: Vec<shoal_client::messenger::Invite>,
    wait: &WaitOpts,
) -> anyhow::Result<()> {
    // Subscribed before the change, so nothing it causes is missed.
    let mut sent = handle.subscribe_sent();
    let mut raw = handle.client().subscribe();
    let mut events = handle.subscribe();
    let g = id.to_vec();
    let (what, commits) = match &change {
        Change::Invite(h) => (format!("adding {} to {label}", h.join(", ")), true),
        Change::Send(..) => (format!("message to {label}"), false),
        Change::Remove(h) => (format!("removing {h} from {label}"), true),
        Change::Update => (format!("new keys in {label}"), true),
        Change::Leave => (format!("asking to leave {label}"), false),
    };
    let done: Result<usize, MessengerError> = handle
        .with(move |m, now| {
            let others = m
                .groups()
                .iter()
                .find(|s| s.id == g)
                .map_or(0, |s| s.members.len().saturating_sub(1));
            match change {
                Change::Invite(_) => m.add_members(&g, &invites, now),
                Change::Send(options, body) => {
                    m.send_group(&g, options, body.as_bytes(), now).map(|_| ())
                }
                Change::Remove(h) => m.remove_member(&g, &h, now),
                Change::Update => m.self_update(&g, now),
                Change::Leave => m.leave(&g, now),
            }
            .map(|()| others)
        })
        .await?;
    let others = match done {
        Ok(n) => n,
        Err(e @ MessengerError::Refused { .. }) => bail!("not done ({what}): {e}"),
        Err(e) => bail!("cannot do it ({what}): {e}"),
    };
    println!("queued: {what}");
    if wait.no_wait {
        return Ok(());
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(wait.timeout_secs);
    let mut outstanding = std::collections::HashSet::new();
    let mut acked = std::collections::HashSet::new();
    let mut handed = 0usize;
    loop {
        // Answered after the flush that sent what the change (or a settle) produced, so
        // those envelopes are in `sent` by now.
        let g = id.to_vec();
        let state = handle
            .with(move |m, _| {
                m.groups()
                    .into_iter()
                    .find(|s| s.id == g)
                    .map(|s| (s.settling_until_ms, s.epoch, s.members.len()))
            })
            .await?;
        loop {
            match sent.try_recv() {
                Ok(s) => {
                    if matches!(s.what, OutgoingWhat::Group(_)) {
                        handed += 1;
                        match s.result {
                            Ok(id) => {
                                if !acked.remove(&id) {
                                    outstanding.insert(id);
                                }
                            }
                            Err(e) => bail!("not done ({what}): the client refused a copy: {e}"),
                        }
                    }
                }
                Err(tokio::sync::broadcast::error::TryRecvError::Lagged(_)) => {}
                Err(_) => break,
            }
        }
        loop {
            match raw.try_recv() {
                Ok(DriverEvent::Acked { message_id }) => {
                    if !outstanding.remove(&message_id) {
                        acked.insert(message_id);
                    }
                }
                Ok(_) | Err(tokio::sync::broadcast::error::TryRecvError::Lagged(_)) => {}
                Err(_) => break,
            }
        }
        loop {
            match events.try_recv() {
                Ok(MessengerEvent::Group(GroupEvent::OwnCommitLost { group, .. }))
                    if group == id =>
                {
                    bail!(
                        "another member changed {label} at the same time and their change won; run the command again"
                    )
                }
                Ok(MessengerEvent::Group(GroupEvent::Removed { group })) if group == id => {
                    println!("you are no longer in {label}");
                    return Ok(());
                }
                Ok(_) | Err(tokio::sync::broadcast::error::TryRecvError::Lagged(_)) => {}
                Err(_) => break,
            }
        }
        let Some((settling, epoch, members)) = state else {
            bail!("you are no longer in {label}");
        };
        let settled = !commits || settling.is_none();
        // A send hands one envelope per other member; a change's commit and Welcome
        // are counted as they come (a group of one sends no commit).
        let all_handed = commits || handed >= others;
        if settled && all_handed && outstanding.is_empty() {
            match (commits, handed) {
                (true, _) => println!(
                    "done: {what} (epoch {epoch}, {members} members); {handed} envelopes acked"
                ),
                (false, 0) => println!("done: {what} (nobody else is in {label})"),
                (false, n) => println!("delivered: {what}, to the mailboxes of {n} members"),
            }
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            let left = if settled {
                format!(
                    "{} of {handed} envelopes are not acked yet",
                    outstanding.len()
                )
            } else {
                "the change has not settled yet".to_string()
            };
            bail!(
                "{left} after {} s; it stays queued and `shoal client run` goes on with it",
                wait.timeout_secs
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

fn print_groups(m: &Member) {
    let me = m.messenger.credential();
    let now = unix_ms();
    let groups = m.messenger.groups();
    if groups.is_empty() {
        println!("no groups; make one with `shoal client group create NAME`");
    }
    for s in groups {
        let mut skipped_me = false;
        let members: Vec<String> = s
            .members
            .iter()
            .map(|(h, subnet)| {
                let shown = display_name(h, subnet);
                if !skipped_me && h == me.handle() && *subnet == me.subnet() {
                    skipped_me = true;
                    format!("{shown} (you)")
                } else {
                    shown
                }
            })
            .collect();
        println!(
            "{}\tid {}\tepoch {}\tmembers: {}",
            clean(m.file.group_label(&s.id).as_bytes()),
            hex::encode(&s.id[..s.id.len().min(4)]),
            s.epoch,
            members.join(", ")
        );
        if let Some(t) = s.settling_until_ms {
            println!(
                "\tpending: a change settles in {} s (run the client to apply it)",
                t.saturating_sub(now).div_ceil(1000)
            );
        }
        if s.leaving {
            println!(
                "\tpending: you asked to leave; the next change by another member removes you"
            );
        }
    }
    for i in m.messenger.received_invites() {
        let name = display_name(&i.handle, &i.subnet);
        let confirmed = m
            .messenger
            .contact(&i.subnet, &i.identity_key)
            .is_some_and(|c| c.confirmed);
        if confirmed {
            println!(
                "card received from {name}: `shoal client group invite GROUP {name}` adds them"
            );
        } else {
            println!(
                "card received from {name} (key {}, not confirmed): check the safety number with `shoal client contact list`, then `shoal client contact accept {name}`",
                hex::encode(&i.identity_key.0[..4])
            );
        }
    }
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
        let signal = crate::runtime::wait_for_signal();
        tokio::pin!(signal);
        let result: anyhow::Result<()> = async {
            loop {
                tokio::select! {
                    r = &mut signal => { r?; return Ok(()); }
                    _ = outbox_tick.tick() => {
                        for note in drain_member_outbox(&dir, &handle).await {
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
    // Names may have been given since the start (`group create` needs the store, so
    // not while this runs, but the chat file can be edited).
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

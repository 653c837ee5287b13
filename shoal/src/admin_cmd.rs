//! `shoal admin ...`: run a subnet. The admin's directory holds its key, the current
//! signed policy, a command sequence counter, and one record per enrolled member (the
//! account registry that invites and listings can grow from).
//!
//! ```text
//! D/admin.key          the subnet's Ed25519 secret (hex, 0600); its public key IS the subnet id
//! D/policy.json        the newest signed policy
//! D/state.json         { name, sequence }: the last command sequence number used
//! D/members/H.cred     the signed membership credential of handle H (give it to the member)
//! D/members/H.json     where H's account lives: gateway, account key, keys, mailbox
//! D/members/H.json.revoked  the same record after H was de-provisioned (for `list`)
//! D/invites/H.json     a pending one-time invite for H: its secret code, role, gateway, expiry
//! D/federation.json    federation offers made (nonce → expiry) and the replay guard over
//!                      offers accepted
//! D/client/            the admin's own `shoal client` directory (or the one state.json
//!                      names, `use-client`): its running client carries gateway commands
//!                      and policy updates, and files answers in its admin-answers/
//! ```
//!
//! Policy distribution: every new version is queued, one ordinary message per member it
//! does not revoke, in the admin client's `outbox/` (sealed to the seal key, mailbox and
//! gateway of the member's credential, [`shoal_client::messenger::policy_deliveries`]);
//! the admin's `shoal client run` sends them on its constant schedule, and each member's
//! client applies a version only if this key signed it and it is newer than its own.
//! Gateways get the version too, but only when what they enforce changes (TTL bound,
//! revoked account keys).
//!
//! Gateway commands (create an account, de-provision, quota, publish the policy to a
//! gateway, account usage) go the same way: each is signed, wrapped in an
//! [`shoal_subnet::AdminRequest`] that names the admin client as where to answer, and
//! queued in the admin client's `outbox/` for the gateway's admin endpoint (its
//! [`ADMIN_MAILBOX`], sealed to its identity key). The running client sends it in its λP
//! slots like any message, so the admin's link looks like any member's; no link ever
//! carries the subnet key. The gateway answers through the mixnet with a signed
//! [`SignedAnswer`]; the admin's running client files it in `admin-answers/`
//! ([`keep_answer`]), where this command waits for it ([`ANSWER_TIMEOUT`]). Commands to
//! one gateway go one at a time: the mixnet reorders, and a gateway takes each subnet's
//! sequence numbers in order only.
//!
//! Bootstrap: the admin's client needs an account before it can send anything; the
//! gateway operator adds it like any account outside a subnet
//! (`shoal gateway account add`, gateway stopped).
//!
//! Federation: `federate offer` writes an offer signed by D/admin.key; the other admin's
//! `federate accept` checks it (signature, expiry, not ours, not replayed), shows the
//! policy diff, publishes the new policy and prints a counter-offer addressed to us, which
//! our `federate accept` applies the same way. `list` asks each gateway for the use of the
//! subnet's accounts there (a signed read-only command) and still works without them.
//!
//! Invites: `admin invite` writes D/invites/H.json and an invite file for the user holding
//! a random one-time code. The user runs `shoal client init` with the gateway the invite
//! names and hands back a redeem file (the invite code plus that command's output: account
//! key, mailbox, contact card); `admin redeem` checks the code (unexpired, unused), enrols
//! the account with the invite's handle, role and gateway, and marks the invite used. No
//! client change is needed: the exchange is two files over a channel the admin trusts.

use crate::parse_hex32;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use ed25519_dalek::SigningKey;
use serde::{Deserialize, Serialize};
use shoal_gateway::admin_inbox::{ADMIN_MAILBOX, admin_seal_key};
use shoal_subnet::{
    AccountAction, AdminRequest, AnswerBody, BurnOnRead, CommandBody, CredentialBody, Federation,
    OfferBody, OfferGuard, Policy, PolicyBody, ReplyTo, RoleRule, SignedAnswer, SubnetAdmin,
    SubnetError, SubnetId, UncheckedCredential, UncheckedOffer, UsageReport, VerifiedCredential,
    usage_id,
};
use shoal_topology::AuthorityAddr;
use shoal_topology::Hex32;

const KEY_FILE: &str = "admin.key";
const POLICY_FILE: &str = "policy.json";
const STATE_FILE: &str = "state.json";
const MEMBERS_DIR: &str = "members";
const INVITES_DIR: &str = "invites";
const FEDERATION_FILE: &str = "federation.json";
/// The admin's own client directory unless state.json names another.
const ADMIN_CLIENT_DIR: &str = "client";
/// Where the admin's running client files the gateways' answers.
pub const ANSWERS_DIR: &str = "admin-answers";
/// How long a command waits for its gateway's answer: a round trip through the mixnet
/// (the admin client's λP slots, the mix delays, the pull interval) with room to spare.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(120);
/// How long `list` waits for the gateways' usage reports unless told.
const USAGE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a signed command stays valid: long enough to reach the gateway, short
/// enough that a captured one is useless soon.
const COMMAND_LIFETIME_SECS: u64 = 300;

#[derive(Subcommand, Debug)]
pub enum AdminCommand {
    /// Create a subnet: the admin key (DIR/admin.key) and policy version 1. Prints the
    /// subnet id, which gateways list under `subnets` to host it.
    Init {
        #[arg(long)]
        dir: PathBuf,
        /// A name for the subnet (kept in DIR/state.json, never sent anywhere).
        #[arg(long)]
        name: String,
        /// Roles of the first policy; each may talk to each.
        #[arg(long, value_delimiter = ',', default_value = "member")]
        roles: Vec<String>,
        /// Longest message TTL policy allows (seconds); gateways expire mail by then.
        #[arg(long, default_value_t = 7 * 24 * 3600)]
        ttl_max: u64,
    },
    /// Sign a member credential (DIR/members/HANDLE.cred) and create the member's
    /// account at its gateway.
    Enroll {
        #[command(flatten)]
        gateway: GatewayArgs,
        /// The member's handle, unique in the subnet.
        #[arg(long)]
        handle: String,
        /// One of the policy's roles.
        #[arg(long)]
        role: String,
        /// The Ed25519 key the member's client authenticates its gateway link with.
        #[arg(long, value_parser = parse_hex32)]
        account_key: [u8; 32],
        /// The mailbox address the member's mail arrives for.
        #[arg(long, value_parser = parse_hex32)]
        mailbox: [u8; 32],
        /// The member's Ed25519 identity key (`identity key:` from `shoal client init`):
        /// it signs the member's MLS leaf, direct messages and address binding, and the
        /// credential names it. Never the account key: a gateway sees only that one, and
        /// must not be able to tie an account to a member.
        #[arg(long, value_parser = parse_hex32)]
        identity_key: [u8; 32],
        /// The member's seal key (`seal key:` from `shoal client init`). Senders never use
        /// it (they seal to the key the member's client signs itself, and the member's
        /// client refuses a credential naming a key that is not its own); the admin's
        /// client seals policy updates to it, so enrolment refuses to go without it.
        #[arg(long, value_parser = parse_hex32)]
        seal_key: [u8; 32],
        /// Items the member's mailbox may hold.
        #[arg(long, default_value_t = 10_000)]
        quota: u32,
        /// Days the credential is valid.
        #[arg(long, default_value_t = 365)]
        valid_days: u64,
    },
    /// Write a one-time invite for HANDLE: DIR/invites/HANDLE.json (the admin's copy) and
    /// an invite file for the user with a single-use code that expires.
    Invite {
        #[command(flatten)]
        gateway: GatewayArgs,
        #[arg(long)]
        handle: String,
        #[arg(long)]
        role: String,
        /// The gateway's node link address, printed in the invite for `shoal client init`.
        #[arg(long)]
        gateway_node: Option<SocketAddr>,
        /// The network file from the network's operators: the invite names the network
        /// by its fingerprint (never its authorities: the user's client takes those from
        /// the operators' file and refuses an invite for another network).
        #[arg(long, value_name = "FILE", conflicts_with_all = ["authorities", "threshold"], required_unless_present = "authorities")]
        network: Option<PathBuf>,
        /// Instead of --network: a directory authority as ADDR=HEXKEY (repeatable).
        #[arg(long = "authority", value_name = "ADDR=HEXKEY")]
        authorities: Vec<AuthorityAddr>,
        /// With --authority: signatures a document needs (default: a majority).
        #[arg(long, requires = "authorities")]
        threshold: Option<usize>,
        /// Where to write the invite file for the user (default: ./HANDLE.invite).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Seconds the invite can be redeemed in.
        #[arg(long, default_value_t = 72 * 3600)]
        valid_secs: u64,
        /// Items the member's mailbox may hold.
        #[arg(long, default_value_t = 10_000)]
        quota: u32,
        /// Days the credential is valid once redeemed.
        #[arg(long, default_value_t = 365)]
        valid_days: u64,
    },
    /// Redeem a user's redeem file (its invite code plus its `shoal client init` output):
    /// enrols the account once; a used, unknown or expired code is refused.
    Redeem {
        #[arg(long)]
        dir: PathBuf,
        /// The redeem file the user handed back.
        file: PathBuf,
    },
    /// List accounts: handle, role, gateway, state, credential expiry, quota and what
    /// each mailbox holds (items, bytes; asked of the gateways by a signed read-only
    /// command), and pending invites. Never keys, mailboxes, message content or contacts.
    List {
        #[arg(long)]
        dir: PathBuf,
        /// Do not ask the gateways (shows what this directory holds only).
        #[arg(long)]
        offline: bool,
        /// How long to wait for the gateways' reports, which come back through the
        /// mixnet; a gateway silent for this long is listed as unreachable.
        #[arg(long, default_value_t = 60)]
        timeout_secs: u64,
    },
    /// De-provision a member: its gateway stops its mailbox access at once, and a new
    /// policy version revokes its keys (published to the gateway, written to DIR).
    Deprovision {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        handle: String,
    },
    /// Change an enrolled member's mailbox quota at its gateway.
    Quota {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        handle: String,
        #[arg(long)]
        quota: u32,
    },
    /// Show or change the policy.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Name the admin's own `shoal client` directory (default: DIR/client). Its running
    /// client (`shoal client run`) carries each new policy version to every member
    /// through the mixnet, as ordinary messages.
    UseClient {
        #[arg(long)]
        dir: PathBuf,
        /// A directory made by `shoal client init` (an account at a gateway of the network).
        client: PathBuf,
    },
    /// Federate with another subnet by exchanging signed offers: `offer` on one side,
    /// `accept` on the other (which prints a counter-offer), `accept` back.
    #[command(subcommand)]
    Federate(FederateCommand),
}

#[derive(Subcommand, Debug)]
pub enum FederateCommand {
    /// Write a federation offer signed by this subnet's admin key, to give to the other
    /// subnet's admin. Changes nothing here: our policy lists them once we accept their
    /// counter-offer.
    Offer {
        #[arg(long)]
        dir: PathBuf,
        /// Our roles that may talk to the other subnet.
        #[arg(long, value_delimiter = ',', required = true)]
        roles: Vec<String>,
        /// Their roles allowed to reach us (default: the same names as --roles).
        #[arg(long, value_delimiter = ',')]
        remote_roles: Vec<String>,
        /// How long the offer can be accepted: e.g. 3600, 90m, 12h, 7d.
        #[arg(long, default_value = "7d", value_parser = parse_duration_secs)]
        expires: u64,
        /// Only this subnet may accept it (its id); default: whoever it is given to.
        #[arg(long, value_parser = parse_hex32)]
        to: Option<[u8; 32]>,
        /// Where to write the offer (default: print it).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Accept another subnet's offer: checks its signature, expiry and that it is new,
    /// shows the policy change, then signs and publishes the new policy and prints the
    /// counter-offer for the other admin (unless this offer answered one of ours).
    Accept {
        #[arg(long)]
        dir: PathBuf,
        /// The offer file (or `-` for standard input).
        file: PathBuf,
        /// Our roles that may talk to them (default: the roles the offer names for us).
        #[arg(long, value_delimiter = ',')]
        roles: Vec<String>,
        /// How long the counter-offer can be accepted.
        #[arg(long, default_value = "7d", value_parser = parse_duration_secs)]
        expires: u64,
        /// Also write the counter-offer to this file.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Check the offer and print what would change; write, send and record nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Edit the federation entry directly, without an offer (both admins must do it).
    Set {
        #[arg(long)]
        dir: PathBuf,
        /// The other subnet's id (its admin's public key).
        #[arg(long = "with", value_parser = parse_hex32)]
        with: [u8; 32],
        /// Our roles that may talk to the other subnet.
        #[arg(long, value_delimiter = ',', required = true)]
        roles: Vec<String>,
        /// Their roles we accept (default: the same names as --roles).
        #[arg(long, value_delimiter = ',')]
        remote_roles: Vec<String>,
        /// Print what would change; write and send nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Stop federating with a subnet (a new policy version without it).
    Remove {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long = "with", value_parser = parse_hex32)]
        with: [u8; 32],
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum PolicyCommand {
    /// Print the current policy body.
    Show {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Send the current policy again to every member (through the admin's client), e.g.
    /// after setting the client up, or for a member whose client was away for longer
    /// than mail is kept. Members ignore a version they already have.
    Publish {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Make a new policy version: validated, signed, written, queued for every member
    /// through the admin's client, and given to the gateways if what they enforce (TTL
    /// bound, revoked account keys) changed.
    Set {
        #[arg(long)]
        dir: PathBuf,
        /// Replace the roles.
        #[arg(long, value_delimiter = ',')]
        roles: Option<Vec<String>>,
        /// Replace the role rules: FROM:TO (repeatable; directional).
        #[arg(long = "rule", value_name = "FROM:TO")]
        rules: Vec<String>,
        #[arg(long)]
        ttl_min: Option<u64>,
        #[arg(long)]
        ttl_max: Option<u64>,
        /// forbidden, allowed or required.
        #[arg(long)]
        burn_on_read: Option<String>,
        /// Print the difference; write and send nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

/// Where the admin directory is and which gateway hosts the member.
#[derive(Args, Debug)]
pub struct GatewayArgs {
    #[arg(long)]
    dir: PathBuf,
    /// The gateway's client address (its `client_listen`).
    #[arg(long)]
    gateway: SocketAddr,
    /// The gateway's identity key, as `shoal gateway init` prints it.
    #[arg(long, value_parser = parse_hex32)]
    gateway_key: [u8; 32],
}

/// Seconds from `3600`, `90s`, `90m`, `12h` or `7d`.
fn parse_duration_secs(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, unit) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&s[..i], c),
        _ => (s, 's'),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?}: expected a number with s, m, h or d"))?;
    let unit = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86_400,
        _ => return Err(format!("{s:?}: the unit is s, m, h or d")),
    };
    match n.checked_mul(unit) {
        Some(v) if v > 0 => Ok(v),
        _ => Err(format!("{s:?}: must be above zero and not absurdly long")),
    }
}

/// DIR/state.json.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct State {
    name: String,
    /// The last command sequence number used; the next is above it and above now in ms.
    sequence: u64,
    /// The admin's own `shoal client` directory, whose running client carries policy
    /// updates to members through the mixnet (default: DIR/client).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    client: Option<PathBuf>,
    /// That client's contact card: where gateways send their answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    client_card: Option<String>,
}

/// DIR/members/HANDLE.json: what the admin needs to manage the account later.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Member {
    handle: String,
    role: String,
    gateway_addr: SocketAddr,
    gateway_key: Hex32,
    /// The link key: what the gateway knows the account by.
    account_key: Hex32,
    /// The member's identity key, which the credential names (never sent to a gateway).
    signing_key: Hex32,
    mailbox: Hex32,
    /// The configured mailbox quota (absent in records written before it was kept).
    #[serde(default)]
    quota: Option<u32>,
    /// When the credential expires (unix seconds).
    #[serde(default)]
    not_after: Option<u64>,
}

/// DIR/invites/HANDLE.json: a pending or used one-time invite.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Invite {
    handle: String,
    role: String,
    gateway_addr: SocketAddr,
    gateway_key: Hex32,
    /// The one-time secret; kept in the 0600 admin directory next to admin.key.
    code: Hex32,
    expires_at: u64,
    quota: u32,
    valid_days: u64,
    /// Set when redeemed; a used invite is kept so a second redeem says so clearly.
    #[serde(default)]
    redeemed_at: Option<u64>,
}

/// DIR/federation.json: offers this subnet made (so a counter-offer can be matched to
/// one) and the replay guard over offers it accepted.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FederationState {
    /// Nonce of each offer made → its expiry (unix seconds).
    #[serde(default)]
    offers_made: std::collections::BTreeMap<Hex32, u64>,
    #[serde(default)]
    accepted: OfferGuard,
}

fn random_nonce() -> anyhow::Result<Hex32> {
    use rand::TryRng;
    let mut nonce = [0u8; 32];
    rand::rngs::SysRng
        .try_fill_bytes(&mut nonce)
        .map_err(|e| anyhow::anyhow!("cannot read OS randomness: {e}"))?;
    Ok(Hex32(nonce))
}

/// Compares secrets without an early exit on the first differing byte.
fn same_secret(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The value after `label:` on the first line that has it.
fn field<'a>(text: &'a str, label: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|l| l.trim().strip_prefix(label)?.strip_prefix(':'))
        .map(str::trim)
}

fn field_hex32(text: &str, label: &str) -> anyhow::Result<[u8; 32]> {
    let v = field(text, label).with_context(|| format!("the redeem file has no {label:?} line"))?;
    parse_hex32(v).map_err(|_| anyhow::anyhow!("the redeem file's {label:?} is not 64 hex digits"))
}

/// An opened admin directory.
struct Subnet {
    dir: PathBuf,
    admin: SubnetAdmin,
}

use crate::human_time::{human_date, human_time};

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Every `*.json` record in `dir` (none if it does not exist yet).
fn read_json_dir<T: for<'de> Deserialize<'de>>(dir: &Path, what: &str) -> anyhow::Result<Vec<T>> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e).with_context(|| format!("cannot list {what}")),
    };
    for e in entries {
        let path = e?.path();
        if path.extension().is_some_and(|x| x == "json") {
            out.push(read_json(&path)?);
        }
    }
    Ok(out)
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> anyhow::Result<T> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not valid", path.display()))
}

fn write_file(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    crate::chat::member::write_private(path, bytes)
}

fn check_handle(handle: &str) -> anyhow::Result<()> {
    // The handle names files in DIR/members.
    if handle.is_empty()
        || handle.len() > 64
        || !handle
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        || handle.starts_with('.')
    {
        bail!("handle {handle:?}: use 1-64 letters, digits, '-', '_' or '.'");
    }
    Ok(())
}

impl Subnet {
    fn open(dir: &Path) -> anyhow::Result<Self> {
        let key = shoal_relay::keystore::load_identity(&dir.join(KEY_FILE))
            .with_context(|| format!("{} is not an admin directory", dir.display()))?;
        Ok(Subnet {
            dir: dir.to_owned(),
            admin: SubnetAdmin::new(key),
        })
    }

    fn id(&self) -> SubnetId {
        self.admin.subnet()
    }

    fn policy(&self) -> anyhow::Result<Policy> {
        let bytes = std::fs::read(self.dir.join(POLICY_FILE)).context("cannot read the policy")?;
        Policy::verify(&bytes, &self.id()).context("the policy file does not verify")
    }

    /// Signs `body` as the next version and returns it with the old one.
    fn next_policy(&self, mut body: PolicyBody) -> anyhow::Result<(Policy, Policy)> {
        let old = self.policy()?;
        body.version = old.version() + 1;
        body.issued_at = unix_now();
        let signed = self.admin.issue_policy(body).context("invalid policy")?;
        let new = Policy::verify(&signed.to_bytes(), &self.id())?;
        Ok((old, new))
    }

    fn federation_state(&self) -> anyhow::Result<FederationState> {
        let path = self.dir.join(FEDERATION_FILE);
        if !path.exists() {
            return Ok(FederationState::default());
        }
        read_json(&path)
    }

    fn save_federation_state(&self, state: &FederationState) -> anyhow::Result<()> {
        write_file(
            &self.dir.join(FEDERATION_FILE),
            serde_json::to_string_pretty(state)?.as_bytes(),
        )
    }

    /// Asks gateways for the usage of this subnet's accounts there (a signed,
    /// read-only command each, all queued at once: different gateways keep their own
    /// sequence), and waits up to `wait` for the answers (a report, or a refusal).
    async fn usage(
        &self,
        gateways: &[[u8; 32]],
        wait: Duration,
    ) -> anyhow::Result<Vec<anyhow::Result<AnswerBody>>> {
        let mut sent = Vec::new();
        for key in gateways {
            sent.push(self.queue(*key, AccountAction::AccountUsage)?);
        }
        let deadline = std::time::Instant::now() + wait;
        let mut out = Vec::new();
        for (key, sequence) in gateways.iter().zip(sent) {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            out.push(self.answer(*key, sequence, left).await);
        }
        Ok(out)
    }

    fn save_policy(&self, policy: &Policy) -> anyhow::Result<()> {
        write_file(&self.dir.join(POLICY_FILE), &policy.signed().to_bytes())
    }

    /// The next command sequence number, saved before it is used so a crash can never
    /// hand out the same number twice. Milliseconds since the epoch keep it increasing
    /// even if the state file is restored from an old backup.
    fn next_sequence(&self) -> anyhow::Result<u64> {
        let path = self.dir.join(STATE_FILE);
        let mut state: State = read_json(&path)?;
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        state.sequence = state.sequence.saturating_add(1).max(now_ms);
        write_file(&path, serde_json::to_string_pretty(&state)?.as_bytes())?;
        Ok(state.sequence)
    }

    /// Sends `action` to the gateway `gateway_key` through the admin's client and the
    /// mixnet, and returns once the gateway's signed answer says it is applied and
    /// durable. A refusal, or no answer within [`ANSWER_TIMEOUT`], is an error (the
    /// command may still be applied later: re-running it is safe, a replay is refused).
    async fn send(
        &self,
        gateway: SocketAddr,
        gateway_key: [u8; 32],
        action: AccountAction,
    ) -> anyhow::Result<()> {
        let sequence = self.queue(gateway_key, action)?;
        let answer = self
            .answer(gateway_key, sequence, ANSWER_TIMEOUT)
            .await
            .with_context(|| format!("gateway {gateway}"))?;
        match answer.refusal {
            None => Ok(()),
            Some(cause) => bail!(
                "gateway {gateway} refused the command ({cause}): {}",
                answer.message
            ),
        }
    }

    /// Signs `action` for `gateway_key` with the next sequence number and queues it in
    /// the admin client's outbox, addressed to that gateway's admin endpoint. Returns
    /// the sequence number, which the answer names.
    fn queue(&self, gateway_key: [u8; 32], action: AccountAction) -> anyhow::Result<u64> {
        let client = self.client_dir()?;
        let reply_to = self.reply_to(&client)?;
        let sequence = self.next_sequence()?;
        let command = self.admin.issue_command(CommandBody {
            subnet: self.id(),
            gateway: Hex32(gateway_key),
            sequence,
            expires_at: unix_now() + COMMAND_LIFETIME_SECS,
            action,
        })?;
        let request = AdminRequest::new(&command, reply_to).to_bytes();
        let card =
            shoal_client::ContactCard::new("gateway admin", gateway_admin_contact(gateway_key)?)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
        crate::client_cmd::spool_bytes(&client, &card.to_text(), &request)?;
        Ok(sequence)
    }

    /// Waits for the answer of `gateway_key` to command `sequence` in the admin client's
    /// `admin-answers/`, checks the gateway's signature, and removes it.
    async fn answer(
        &self,
        gateway_key: [u8; 32],
        sequence: u64,
        timeout: Duration,
    ) -> anyhow::Result<AnswerBody> {
        let client = self.client_dir()?;
        let path = client
            .join(ANSWERS_DIR)
            .join(answer_file(&gateway_key, sequence));
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Ok(bytes) = std::fs::read(&path) {
                let _ = std::fs::remove_file(&path);
                let body = SignedAnswer::verify(&bytes, &Hex32(gateway_key))
                    .context("the gateway's answer does not verify")?;
                if body.subnet != self.id() || body.sequence != sequence {
                    bail!("the gateway's answer is for another command");
                }
                return Ok(body);
            }
            if std::time::Instant::now() >= deadline {
                bail!(
                    "no answer within {} s: is the admin's client running (`shoal client run --config {}`)? \
                     The command stays queued until it expires; running it again is safe (a replay is refused)",
                    timeout.as_secs(),
                    client.join(crate::client_cmd::CONFIG_FILE).display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Where gateways answer: the admin client's contact, from state.json or (saved
    /// there) read from the client's store, which needs the client stopped once.
    fn reply_to(&self, client: &Path) -> anyhow::Result<ReplyTo> {
        if !client.join(crate::client_cmd::CONFIG_FILE).exists() {
            bail!(
                "the admin has no client at {}: make one with `shoal client init --dir {} ...`, \
                 have the gateway operator add its account (`shoal gateway account add`), \
                 or name another with `shoal admin use-client`",
                client.display(),
                client.display()
            );
        }
        let path = self.dir.join(STATE_FILE);
        let mut state: State = read_json(&path)?;
        let card = match state.client_card.clone() {
            Some(c) => c,
            None => {
                let card = client_card(client)?;
                state.client_card = Some(card.clone());
                write_file(&path, serde_json::to_string_pretty(&state)?.as_bytes())?;
                card
            }
        };
        let card = shoal_client::ContactCard::parse(&card).context("the admin client's card")?;
        Ok(ReplyTo {
            mailbox: Hex32(card.contact.mailbox),
            gateway: Hex32(card.contact.gateway),
            seal_key: Hex32(card.contact.public_key),
        })
    }

    fn member(&self, handle: &str) -> anyhow::Result<Member> {
        check_handle(handle)?;
        read_json(&self.dir.join(MEMBERS_DIR).join(format!("{handle}.json")))
            .with_context(|| format!("{handle:?} is not enrolled here"))
    }

    fn members(&self) -> anyhow::Result<Vec<Member>> {
        read_json_dir(&self.dir.join(MEMBERS_DIR), "members")
    }

    fn invites(&self) -> anyhow::Result<Vec<Invite>> {
        read_json_dir(&self.dir.join(INVITES_DIR), "invites")
    }

    /// Signs a credential, creates the account at its gateway, and records the member.
    async fn enroll(&self, e: Enrolment) -> anyhow::Result<PathBuf> {
        check_handle(&e.handle)?;
        let policy = self.policy()?;
        if !policy.body().roles.contains(&e.role) {
            bail!(
                "role {:?} is not in the policy (roles: {:?})",
                e.role,
                policy.body().roles
            );
        }
        let members = self.dir.join(MEMBERS_DIR);
        if members.join(format!("{}.json", e.handle)).exists() {
            bail!("{:?} is already enrolled; de-provision it first", e.handle);
        }
        if e.identity_key == e.account_key {
            bail!(
                "the identity key is the account key: a gateway would see the key that signs the member's messages; give the `identity key:` line of `shoal client init`"
            );
        }
        let signing_key = Hex32(e.identity_key);
        let now = unix_now();
        let not_after = now + e.valid_days * 24 * 3600;
        let credential = self.admin.issue_credential(CredentialBody {
            subnet: self.id(),
            handle: e.handle.clone(),
            role: e.role.clone(),
            signing_key,
            seal_key: Hex32(e.seal_key.unwrap_or([0; 32])),
            mailbox: Hex32(e.mailbox),
            gateway: Hex32(e.gateway_key),
            not_before: now.saturating_sub(60),
            not_after,
        })?;
        self.send(
            e.gateway,
            e.gateway_key,
            AccountAction::CreateAccount {
                account: Hex32(e.account_key),
                mailbox: Hex32(e.mailbox),
                quota: e.quota,
            },
        )
        .await?;
        shoal_relay::keystore::create_private_dir(&members)?;
        let member = Member {
            handle: e.handle.clone(),
            role: e.role,
            gateway_addr: e.gateway,
            gateway_key: Hex32(e.gateway_key),
            account_key: Hex32(e.account_key),
            signing_key,
            mailbox: Hex32(e.mailbox),
            quota: Some(e.quota),
            not_after: Some(not_after),
        };
        let cred_path = members.join(format!("{}.cred", e.handle));
        write_file(&cred_path, &credential.to_bytes())?;
        self.save_member(&member)?;
        Ok(cred_path)
    }

    fn save_member(&self, m: &Member) -> anyhow::Result<()> {
        write_file(
            &self
                .dir
                .join(MEMBERS_DIR)
                .join(format!("{}.json", m.handle)),
            serde_json::to_string_pretty(m)?.as_bytes(),
        )
    }

    /// The admin's own client directory (see [`State::client`]).
    fn client_dir(&self) -> anyhow::Result<PathBuf> {
        let state: State = read_json(&self.dir.join(STATE_FILE))?;
        Ok(state
            .client
            .unwrap_or_else(|| self.dir.join(ADMIN_CLIENT_DIR)))
    }

    /// Publishes `new` (replacing `old`): to every member through the mixnet, and to
    /// every gateway hosting an enrolled member if what gateways enforce changed (or
    /// `gateways` is `Revoking`). Gateways are told first, so a de-provisioned account is
    /// cut there before members hear of it.
    async fn publish(
        &self,
        old: &Policy,
        new: &Policy,
        gateways: ToGateways,
    ) -> anyhow::Result<Published> {
        let enforced = |p: &Policy| (p.body().ttl_max_secs, p.body().revoked_keys.clone());
        let revoking = match gateways {
            ToGateways::Revoking(account) => Some(account),
            ToGateways::IfEnforcedChanged => None,
        };
        let tell_gateways = revoking.is_some() || enforced(old) != enforced(new);
        let mut published = Published::default();
        if tell_gateways {
            let mut revoked = self.revoked_accounts()?;
            revoked.extend(revoking);
            published.gateways = Some(self.publish_to_gateways(new, revoked).await?);
        }
        self.publish_to_members(new, &mut published)?;
        Ok(published)
    }

    /// The link keys of de-provisioned members' accounts (from their kept records).
    fn revoked_accounts(&self) -> anyhow::Result<Vec<Hex32>> {
        let mut keys = Vec::new();
        let Ok(entries) = std::fs::read_dir(self.dir.join(MEMBERS_DIR)) else {
            return Ok(keys);
        };
        for e in entries {
            let path = e?.path();
            if path.to_string_lossy().ends_with(".json.revoked") {
                keys.push(read_json::<Member>(&path)?.account_key);
            }
        }
        keys.sort();
        Ok(keys)
    }

    /// Tells every gateway hosting an enrolled member what it enforces of `policy`
    /// (they bound mailbox TTLs by it) and which account link keys to refuse. Never the
    /// policy itself: its roles, federation and revoked member identity keys stay
    /// between the admin and the members.
    async fn publish_to_gateways(
        &self,
        policy: &Policy,
        revoked_accounts: Vec<Hex32>,
    ) -> anyhow::Result<usize> {
        let gateways: BTreeSet<(SocketAddr, [u8; 32])> = self
            .members()?
            .iter()
            .map(|m| (m.gateway_addr, m.gateway_key.0))
            .collect();
        let action = AccountAction::publish_policy(policy, revoked_accounts);
        for (addr, key) in &gateways {
            self.send(*addr, *key, action.clone()).await?;
        }
        Ok(gateways.len())
    }

    /// Queues `policy` for every enrolled member the policy does not revoke, in the
    /// admin client's outbox: its running client sends each as an ordinary message
    /// (sealed to the member, fixed-size packets on its Poisson schedule). A member
    /// whose credential names no seal key cannot be reached and is listed.
    fn publish_to_members(&self, policy: &Policy, out: &mut Published) -> anyhow::Result<()> {
        let client = self.client_dir()?;
        out.client = Some(client.clone());
        let mut creds = Vec::new();
        for m in self.members()? {
            let cred_path = self
                .dir
                .join(MEMBERS_DIR)
                .join(format!("{}.cred", m.handle));
            let cred = std::fs::read(&cred_path)
                .ok()
                .and_then(|b| UncheckedCredential::parse(&b).ok())
                .and_then(|c| c.check_signature().ok())
                .map(VerifiedCredential::ignore_validity);
            match cred {
                Some(c) => creds.push(c),
                None => out.unreachable.push(m.handle.clone()),
            }
        }
        creds.sort_by(|a, b| a.handle().cmp(b.handle()));
        let (deliveries, unreachable) =
            shoal_client::messenger::policy_deliveries(policy, creds.iter());
        out.unreachable.extend(unreachable);
        if !client.join(crate::client_cmd::CONFIG_FILE).exists() {
            out.unqueued = deliveries.len();
            return Ok(());
        }
        for d in deliveries {
            let card = shoal_client::ContactCard::new("member", d.to)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            crate::client_cmd::spool_bytes(&client, &card.to_text(), &d.bytes)?;
            out.members += 1;
        }
        Ok(())
    }
}

/// Whether [`Subnet::publish`] must give the policy to the gateways.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ToGateways {
    /// Only if what they enforce changed.
    IfEnforcedChanged,
    /// Always, adding this de-provisioned account's link key to those refused.
    Revoking(Hex32),
}

/// Where a policy version went.
#[derive(Debug, Default)]
struct Published {
    /// Gateways told (`None`: nothing they enforce changed, so none was dialled).
    gateways: Option<usize>,
    /// Members it was queued for.
    members: usize,
    /// Members it could not be queued for because the admin has no client yet.
    unqueued: usize,
    /// Members without a usable seal key in their credential.
    unreachable: Vec<String>,
    client: Option<PathBuf>,
}

impl Published {
    /// What the admin is told, one line each.
    fn report(&self, version: u64) -> String {
        let mut out = match self.gateways {
            Some(n) => format!("policy v{version} written and published to {n} gateway(s)\n"),
            None => format!(
                "policy v{version} written (gateways not told: nothing they enforce changed)\n"
            ),
        };
        out.push_str(&self.members_report());
        out
    }

    /// The lines about members only.
    fn members_report(&self) -> String {
        let mut out = String::new();
        let client = self
            .client
            .as_ref()
            .map_or_else(String::new, |c| c.display().to_string());
        if self.members > 0 {
            out.push_str(&format!(
                "queued for {} member(s) through the mixnet (in {client}/outbox; `shoal client run --config {client}/client.toml` sends them, within a second if it is running)\n",
                self.members
            ));
        }
        if self.unqueued > 0 {
            out.push_str(&format!(
                "NOT sent to {} member(s): the admin has no client at {client} (make one with `shoal client init --dir {client} ...`, enrol it, or name another with `shoal admin use-client`), then run `shoal admin policy publish`\n",
                self.unqueued
            ));
        }
        if !self.unreachable.is_empty() {
            out.push_str(&format!(
                "NOT sent to {} (their credentials name no seal key: re-enrol them with --seal-key)\n",
                self.unreachable.join(", ")
            ));
        }
        out
    }
}

/// What enrolling one account needs.
struct Enrolment {
    gateway: SocketAddr,
    gateway_key: [u8; 32],
    handle: String,
    role: String,
    account_key: [u8; 32],
    mailbox: [u8; 32],
    /// The member's identity key (the credential's `signing_key`).
    identity_key: [u8; 32],
    seal_key: Option<[u8; 32]>,
    quota: u32,
    valid_days: u64,
}

/// The policy bodies as pretty JSON, line by line: what `--dry-run` shows.
fn diff(old: &PolicyBody, new: &PolicyBody) -> anyhow::Result<String> {
    let a = serde_json::to_string_pretty(old)?;
    let b = serde_json::to_string_pretty(new)?;
    let (a, b): (Vec<&str>, Vec<&str>) = (a.lines().collect(), b.lines().collect());
    // Longest common subsequence: policies are small.
    let mut lcs = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let (mut i, mut j, mut out) = (0, 0, String::new());
    while i < a.len() || j < b.len() {
        if i < a.len() && j < b.len() && a[i] == b[j] {
            out.push_str(&format!("  {}\n", a[i]));
            i += 1;
            j += 1;
        } else if i < a.len() && (j == b.len() || lcs[i + 1][j] >= lcs[i][j + 1]) {
            // Old line before its replacement, as `diff -u` reads.
            out.push_str(&format!("- {}\n", a[i]));
            i += 1;
        } else {
            out.push_str(&format!("+ {}\n", b[j]));
            j += 1;
        }
    }
    Ok(out)
}

fn first_policy(roles: Vec<String>, ttl_max: u64) -> PolicyBody {
    let rules = roles
        .iter()
        .flat_map(|f| {
            roles.iter().map(|t| RoleRule {
                from: f.clone(),
                to: t.clone(),
            })
        })
        .collect();
    PolicyBody {
        subnet: Hex32([0; 32]),
        version: 1,
        issued_at: unix_now(),
        roles,
        rules,
        federation: vec![],
        ttl_min_secs: 0,
        ttl_max_secs: ttl_max,
        burn_on_read: BurnOnRead::Allowed,
        revoked_keys: vec![],
        revoked_handles: vec![],
    }
}

pub fn run(cmd: AdminCommand) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run_async(cmd))
}

async fn run_async(cmd: AdminCommand) -> anyhow::Result<()> {
    match cmd {
        AdminCommand::Init {
            dir,
            name,
            roles,
            ttl_max,
        } => {
            if dir.join(KEY_FILE).exists() {
                bail!("{} already holds a subnet", dir.display());
            }
            shoal_relay::keystore::create_private_dir(&dir)?;
            let key = SigningKey::generate(&mut rand::rng());
            let admin = SubnetAdmin::new(key.clone());
            let policy = admin
                .issue_policy(first_policy(roles, ttl_max))
                .context("invalid first policy")?;
            shoal_relay::keystore::write_private(
                &dir.join(KEY_FILE),
                format!("{}\n", hex::encode(key.to_bytes())).as_bytes(),
                true,
            )?;
            write_file(&dir.join(POLICY_FILE), &policy.to_bytes())?;
            let state = State {
                name,
                sequence: 0,
                client: None,
                client_card: None,
            };
            write_file(
                &dir.join(STATE_FILE),
                serde_json::to_string_pretty(&state)?.as_bytes(),
            )?;
            println!("subnet id: {}", hex::encode(admin.subnet().0));
            println!("admin key written: {}", dir.join(KEY_FILE).display());
            println!("policy v1 written: {}", dir.join(POLICY_FILE).display());
            Ok(())
        }
        AdminCommand::Enroll {
            gateway,
            handle,
            role,
            account_key,
            mailbox,
            identity_key,
            seal_key,
            quota,
            valid_days,
        } => {
            let s = Subnet::open(&gateway.dir)?;
            let cred_path = s
                .enroll(Enrolment {
                    gateway: gateway.gateway,
                    gateway_key: gateway.gateway_key,
                    handle,
                    role,
                    account_key,
                    mailbox,
                    identity_key,
                    seal_key: Some(seal_key),
                    quota,
                    valid_days,
                })
                .await?;
            println!("account created at {}", gateway.gateway);
            println!("credential written: {}", cred_path.display());
            Ok(())
        }
        AdminCommand::Invite {
            gateway,
            handle,
            role,
            gateway_node,
            network,
            authorities,
            threshold,
            out,
            valid_secs,
            quota,
            valid_days,
        } => {
            let s = Subnet::open(&gateway.dir)?;
            let network = match network {
                Some(path) => crate::network_file::Network::load(&path)?,
                None => crate::network_file::Network::from_flags(authorities, threshold)?,
            };
            check_handle(&handle)?;
            if !s.policy()?.body().roles.contains(&role) {
                bail!("role {role:?} is not in the policy");
            }
            if gateway
                .dir
                .join(MEMBERS_DIR)
                .join(format!("{handle}.json"))
                .exists()
            {
                bail!("{handle:?} is already enrolled; de-provision it first");
            }
            let mut code = [0u8; 32];
            {
                use rand::TryRng;
                rand::rngs::SysRng
                    .try_fill_bytes(&mut code)
                    .map_err(|e| anyhow::anyhow!("cannot read OS randomness: {e}"))?;
            }
            let expires_at = unix_now() + valid_secs;
            let invite = Invite {
                handle: handle.clone(),
                role: role.clone(),
                gateway_addr: gateway.gateway,
                gateway_key: Hex32(gateway.gateway_key),
                code: Hex32(code),
                expires_at,
                quota,
                valid_days,
                redeemed_at: None,
            };
            let invites = gateway.dir.join(INVITES_DIR);
            shoal_relay::keystore::create_private_dir(&invites)?;
            // A new invite for the same handle replaces (and so cancels) the old one.
            write_file(
                &invites.join(format!("{handle}.json")),
                serde_json::to_string_pretty(&invite)?.as_bytes(),
            )?;
            let node =
                gateway_node.map_or_else(|| "<GATEWAY_NODE_ADDR>".to_owned(), |a| a.to_string());
            let text = format!(
                "# Shoal invite: one use, expires at {expires_human} (unix time {expires_at}).\n\
                 # 1. Get the network file from the network's operators (not from your admin) and\n\
                 #    check its fingerprint with them: it should read {fingerprint}. Then run:\n\
                 #    shoal client init --dir <YOUR_DIR> --network <NETWORK_FILE> --invite <THIS_FILE> --gateway {node}={gw_key} --gateway-client-addr {gw}\n\
                 #    (it refuses this invite if it is for another network than your network file's).\n\
                 # 2. Append that command's output to this file and give the file back to your admin.\n\
                 network: {fingerprint}\n\
                 subnet: {subnet}\n\
                 handle: {handle}\n\
                 role: {role}\n\
                 gateway: {gw}\n\
                 gateway key: {gw_key}\n\
                 invite code: {code}\n",
                gw = gateway.gateway,
                gw_key = hex::encode(gateway.gateway_key),
                subnet = hex::encode(s.id().0),
                code = hex::encode(code),
                expires_human = human_time(expires_at),
                fingerprint = network.fingerprint(),
            );
            let out = out.unwrap_or_else(|| PathBuf::from(format!("{handle}.invite")));
            write_file(&out, text.as_bytes())?;
            println!("invite written: {}", out.display());
            println!("invite code: {}", hex::encode(code));
            println!("expires at: {}", human_time(expires_at));
            Ok(())
        }
        AdminCommand::Redeem { dir, file } => {
            let s = Subnet::open(&dir)?;
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            let code = field_hex32(&text, "invite code")?;
            let mut invite = s
                .invites()?
                .into_iter()
                .find(|i| same_secret(&i.code.0, &code))
                .context("the invite code is not one this subnet issued (or it was replaced)")?;
            if let Some(at) = invite.redeemed_at {
                bail!(
                    "the invite for {:?} was already redeemed (at {}); an invite works once",
                    invite.handle,
                    human_time(at)
                );
            }
            if unix_now() >= invite.expires_at {
                bail!(
                    "the invite for {:?} expired (at {}); issue a new one",
                    invite.handle,
                    human_time(invite.expires_at)
                );
            }
            let account_key = field_hex32(&text, "account key")?;
            let identity_key = field_hex32(&text, "identity key")?;
            let card = field(&text, "contact card")
                .context("the redeem file has no \"contact card\" line")?;
            let card =
                shoal_client::ContactCard::parse(card).context("the redeem file's contact card")?;
            if card.contact.gateway != invite.gateway_key.0 {
                bail!("the user's client uses a different gateway than the invite names");
            }
            if field(&text, "mailbox").is_some()
                && field_hex32(&text, "mailbox")? != card.contact.mailbox
            {
                bail!("the redeem file's mailbox and contact card disagree");
            }
            let cred_path = s
                .enroll(Enrolment {
                    gateway: invite.gateway_addr,
                    gateway_key: invite.gateway_key.0,
                    handle: invite.handle.clone(),
                    role: invite.role.clone(),
                    account_key,
                    mailbox: card.contact.mailbox,
                    identity_key,
                    seal_key: Some(card.contact.public_key),
                    quota: invite.quota,
                    valid_days: invite.valid_days,
                })
                .await?;
            invite.redeemed_at = Some(unix_now());
            write_file(
                &dir.join(INVITES_DIR)
                    .join(format!("{}.json", invite.handle)),
                serde_json::to_string_pretty(&invite)?.as_bytes(),
            )?;
            println!(
                "invite for {:?} redeemed: account created at {}",
                invite.handle, invite.gateway_addr
            );
            println!("credential written: {}", cred_path.display());
            Ok(())
        }
        AdminCommand::List {
            dir,
            offline,
            timeout_secs,
        } => {
            let s = Subnet::open(&dir)?;
            let wait = (!offline).then_some(Duration::from_secs(timeout_secs));
            print!("{}", list(&s, wait).await?);
            Ok(())
        }
        AdminCommand::Deprovision { dir, handle } => {
            let s = Subnet::open(&dir)?;
            let m = s.member(&handle)?;
            let started = std::time::Instant::now();
            s.send(
                m.gateway_addr,
                m.gateway_key.0,
                AccountAction::Deprovision {
                    account: m.account_key,
                },
            )
            .await?;
            let cut = started.elapsed();
            let mut body = s.policy()?.body().clone();
            // Members learn the identity key only; gateways the link key only.
            if !body.revoked_keys.contains(&m.signing_key) {
                body.revoked_keys.push(m.signing_key);
            }
            let (old, new) = s.next_policy(body)?;
            // Publish while the member's record still names its gateway; forget it after.
            let published = s
                .publish(&old, &new, ToGateways::Revoking(m.account_key))
                .await?;
            s.save_policy(&new)?;
            let members = dir.join(MEMBERS_DIR);
            // Kept (outside *.json) so `list` still shows the account as de-provisioned.
            std::fs::rename(
                members.join(format!("{handle}.json")),
                members.join(format!("{handle}.json.revoked")),
            )?;
            let _ = std::fs::rename(
                members.join(format!("{handle}.cred")),
                members.join(format!("{handle}.cred.revoked")),
            );
            println!(
                "de-provisioned {handle:?}: mailbox access stopped in {} ms",
                cut.as_millis()
            );
            println!(
                "policy v{} revokes its keys; published to {} gateway(s)",
                new.version(),
                published.gateways.unwrap_or(0)
            );
            print!("{}", published.members_report());
            println!(
                "members' clients remove {handle:?} from every group at their next commit once they have v{}",
                new.version()
            );
            Ok(())
        }
        AdminCommand::Quota { dir, handle, quota } => {
            let s = Subnet::open(&dir)?;
            let m = s.member(&handle)?;
            s.send(
                m.gateway_addr,
                m.gateway_key.0,
                AccountAction::SetQuota {
                    account: m.account_key,
                    quota,
                },
            )
            .await?;
            s.save_member(&Member {
                quota: Some(quota),
                ..m
            })?;
            println!("quota of {handle:?} set to {quota}");
            Ok(())
        }
        AdminCommand::UseClient { dir, client } => {
            let s = Subnet::open(&dir)?;
            if !client.join(crate::client_cmd::CONFIG_FILE).exists() {
                bail!(
                    "{} has no {}: make it with `shoal client init --dir {}`",
                    client.display(),
                    crate::client_cmd::CONFIG_FILE,
                    client.display()
                );
            }
            let card = client_card(&client)?;
            let path = s.dir.join(STATE_FILE);
            let mut state: State = read_json(&path)?;
            state.client = Some(std::path::absolute(&client)?);
            state.client_card = Some(card);
            write_file(&path, serde_json::to_string_pretty(&state)?.as_bytes())?;
            println!(
                "gateway commands and policy updates go through the client at {}; keep `shoal client run --config {}` running",
                client.display(),
                client.join(crate::client_cmd::CONFIG_FILE).display()
            );
            Ok(())
        }
        AdminCommand::Policy(PolicyCommand::Publish { dir }) => {
            let s = Subnet::open(&dir)?;
            let p = s.policy()?;
            let mut published = Published::default();
            s.publish_to_members(&p, &mut published)?;
            println!("policy v{} (current)", p.version());
            print!("{}", published.members_report());
            Ok(())
        }
        AdminCommand::Policy(PolicyCommand::Show { dir }) => {
            let s = Subnet::open(&dir)?;
            let p = s.policy()?;
            println!("{}", serde_json::to_string_pretty(p.body())?);
            Ok(())
        }
        AdminCommand::Policy(PolicyCommand::Set {
            dir,
            roles,
            rules,
            ttl_min,
            ttl_max,
            burn_on_read,
            dry_run,
        }) => {
            let s = Subnet::open(&dir)?;
            let mut body = s.policy()?.body().clone();
            if let Some(r) = roles {
                body.roles = r;
            }
            if !rules.is_empty() {
                body.rules = rules
                    .iter()
                    .map(|r| match r.split_once(':') {
                        Some((from, to)) => Ok(RoleRule {
                            from: from.to_owned(),
                            to: to.to_owned(),
                        }),
                        None => bail!("--rule {r:?}: expected FROM:TO"),
                    })
                    .collect::<anyhow::Result<_>>()?;
            }
            if let Some(v) = ttl_min {
                body.ttl_min_secs = v;
            }
            if let Some(v) = ttl_max {
                body.ttl_max_secs = v;
            }
            if let Some(b) = burn_on_read {
                body.burn_on_read = serde_json::from_value(serde_json::Value::String(b.clone()))
                    .map_err(|_| {
                        anyhow::anyhow!("--burn-on-read {b:?}: forbidden, allowed or required")
                    })?;
            }
            update_policy(&s, body, dry_run).await
        }
        AdminCommand::Federate(FederateCommand::Set {
            dir,
            with,
            roles,
            remote_roles,
            dry_run,
        }) => {
            let s = Subnet::open(&dir)?;
            let mut body = s.policy()?.body().clone();
            let remote_roles = if remote_roles.is_empty() {
                roles.clone()
            } else {
                remote_roles
            };
            body.federation.retain(|f| f.subnet.0 != with);
            body.federation.push(Federation {
                subnet: Hex32(with),
                local_roles: roles,
                remote_roles,
            });
            update_policy(&s, body, dry_run).await
        }
        AdminCommand::Federate(FederateCommand::Remove { dir, with, dry_run }) => {
            let s = Subnet::open(&dir)?;
            let mut body = s.policy()?.body().clone();
            let before = body.federation.len();
            body.federation.retain(|f| f.subnet.0 != with);
            if body.federation.len() == before {
                bail!("the policy does not federate with {}", hex::encode(with));
            }
            update_policy(&s, body, dry_run).await
        }
        AdminCommand::Federate(FederateCommand::Offer {
            dir,
            roles,
            remote_roles,
            expires,
            to,
            out,
        }) => {
            let s = Subnet::open(&dir)?;
            let policy = s.policy()?;
            if let Some(r) = roles.iter().find(|r| !policy.body().roles.contains(r)) {
                bail!(
                    "role {r:?} is not in the policy (roles: {:?})",
                    policy.body().roles
                );
            }
            let remote_roles = if remote_roles.is_empty() {
                roles.clone()
            } else {
                remote_roles
            };
            let now = unix_now();
            let nonce = random_nonce()?;
            let offer = s
                .admin
                .issue_offer(OfferBody {
                    subnet: s.id(),
                    to: to.map(Hex32),
                    local_roles: roles,
                    remote_roles,
                    issued_at: now,
                    expires_at: now.saturating_add(expires),
                    nonce,
                    reply_to: None,
                })
                .context("invalid offer")?;
            let mut state = s.federation_state()?;
            state.offers_made.insert(nonce, offer.body().expires_at);
            s.save_federation_state(&state)?;
            let text = offer.to_text();
            match out {
                Some(path) => {
                    write_file(&path, text.as_bytes())?;
                    println!("offer written: {}", path.display());
                }
                None => print!("{text}"),
            }
            println!(
                "expires at {}; give it to the other admin, who runs \
                 `shoal admin federate accept` and hands you back a counter-offer",
                human_time(offer.body().expires_at)
            );
            Ok(())
        }
        AdminCommand::Federate(FederateCommand::Accept {
            dir,
            file,
            roles,
            expires,
            out,
            dry_run,
        }) => accept_offer(&dir, &file, roles, expires, out, dry_run).await,
    }
}

/// Reads, checks and applies a federation offer; prints the counter-offer.
async fn accept_offer(
    dir: &Path,
    file: &Path,
    roles: Vec<String>,
    expires: u64,
    out: Option<PathBuf>,
    dry_run: bool,
) -> anyhow::Result<()> {
    let s = Subnet::open(dir)?;
    let text = if file == Path::new("-") {
        std::io::read_to_string(std::io::stdin()).context("cannot read the offer from stdin")?
    } else {
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?
    };
    let mut state = s.federation_state()?;
    let now = unix_now();
    let offer = UncheckedOffer::parse(&text)
        .and_then(|o| o.check_signature())
        .and_then(|o| o.check_fresh(&s.id(), now, &mut state.accepted))
        .map_err(|e| anyhow::anyhow!("offer refused: {}", offer_refusal(&e, now)))?;
    let b = offer.body();
    if let Some(ours) = b.reply_to
        && !state.offers_made.contains_key(&ours)
    {
        bail!(
            "offer refused: it answers an offer this subnet did not make (or whose record in {} is gone)",
            FEDERATION_FILE
        );
    }
    let policy = s.policy()?;
    let mut entry = offer.federation();
    if !roles.is_empty() {
        entry.local_roles = roles;
    } else {
        // Roles the offer names for us that this policy does not define are left out.
        entry
            .local_roles
            .retain(|r| policy.body().roles.contains(r));
    }
    if entry.local_roles.is_empty() {
        bail!(
            "none of the roles the offer names for us ({:?}) is in our policy (roles: {:?}); pass --roles",
            b.remote_roles,
            policy.body().roles
        );
    }
    println!("offer from subnet {}", hex::encode(b.subnet.0));
    println!(
        "  their roles {} may talk to our roles {}; offer expires at {}",
        entry.remote_roles.join(","),
        entry.local_roles.join(","),
        human_time(b.expires_at)
    );
    let mut body = policy.body().clone();
    body.federation.retain(|f| f.subnet != entry.subnet);
    body.federation.push(entry.clone());
    let (old, new) = s.next_policy(body)?;
    print!("{}", diff(old.body(), new.body())?);
    if dry_run {
        println!(
            "(dry run: the offer is valid and policy v{} would be; nothing written, sent or recorded)",
            new.version()
        );
        return Ok(());
    }
    let published = s.publish(&old, &new, ToGateways::IfEnforcedChanged).await?;
    s.save_policy(&new)?;
    // Recorded only once applied, so an offer whose policy could not be published can be
    // accepted again.
    if let Some(ours) = b.reply_to {
        state.offers_made.remove(&ours);
    }
    state.offers_made.retain(|_, exp| *exp >= now);
    let counter = if b.reply_to.is_none() {
        let nonce = random_nonce()?;
        let counter = s.admin.issue_offer(offer.counter_body(
            &entry,
            now,
            now.saturating_add(expires),
            nonce,
        ))?;
        state.offers_made.insert(nonce, counter.body().expires_at);
        Some(counter)
    } else {
        None
    };
    s.save_federation_state(&state)?;
    print!("{}", published.report(new.version()));
    match counter {
        Some(counter) => {
            // Printed first: the policy is already published, so the counter-offer must
            // not be lost to a file that cannot be written.
            let text = counter.to_text();
            println!(
                "counter-offer (give it to the other admin, who runs `shoal admin federate accept`):"
            );
            print!("{text}");
            if let Some(path) = &out {
                write_file(path, text.as_bytes())?;
                println!("counter-offer written: {}", path.display());
            }
        }
        None => println!(
            "federation complete: this answered our own offer, and both policies list each other"
        ),
    }
    Ok(())
}

/// A refused offer, in words an admin can act on.
fn offer_refusal(e: &SubnetError, now: u64) -> String {
    match e {
        SubnetError::BadSignature { .. } => {
            "its signature does not verify: it was changed after signing (or damaged in the paste)"
                .into()
        }
        SubnetError::NotValidAt { not_after, .. } if now > *not_after => {
            format!(
                "it expired at {} (now {}); ask for a new one",
                human_time(*not_after),
                human_time(now)
            )
        }
        SubnetError::NotValidAt { not_before, .. } => {
            format!(
                "it is issued in the future ({}, now {}); check the clocks",
                human_time(*not_before),
                human_time(now)
            )
        }
        SubnetError::OwnOffer => {
            "it is this subnet's own offer; give it to the other subnet's admin".into()
        }
        SubnetError::WrongSubnet { subnet, .. } => format!(
            "it is addressed to subnet {}, not this one",
            hex::encode(subnet.0)
        ),
        SubnetError::ReplayedOffer { reason } => format!("replayed: {reason}"),
        other => other.to_string(),
    }
}

/// What `list` shows for one account's use at its gateway.
enum Use {
    /// Not asked (the account is not active, or `--offline`).
    NotAsked,
    Reported {
        items: u32,
        bytes: u64,
        quota: u32,
    },
    /// The gateway answered but does not have this account.
    Missing,
    Unreachable,
    /// The gateway refused to answer (asked again within its interval).
    Refused,
}

/// What one gateway said to the usage query.
enum Asked {
    Report(UsageReport),
    Refused,
    Unreachable,
}

/// The account table: configuration the admin holds and, unless `offline`, each
/// active account's use as its gateway reports it (items, bytes, quota). Never keys,
/// mailboxes, message content or contacts.
async fn list(s: &Subnet, wait: Option<Duration>) -> anyhow::Result<String> {
    let offline = wait.is_none();
    let mut rows: Vec<(Member, &str)> = s.members()?.into_iter().map(|m| (m, "active")).collect();
    let members = s.dir.join(MEMBERS_DIR);
    if let Ok(entries) = std::fs::read_dir(&members) {
        for e in entries {
            let path = e?.path();
            if path.to_string_lossy().ends_with(".json.revoked") {
                rows.push((read_json(&path)?, "de-provisioned"));
            }
        }
    }
    let now = unix_now();
    for (m, state) in &mut rows {
        if *state == "active" && m.not_after.is_some_and(|t| t <= now) {
            *state = "expired";
        }
    }
    rows.sort_by(|a, b| a.0.handle.cmp(&b.0.handle));

    // One usage query per gateway that hosts an active member.
    let gateways: BTreeSet<(SocketAddr, [u8; 32])> = rows
        .iter()
        .filter(|(_, st)| *st != "de-provisioned")
        .map(|(m, _)| (m.gateway_addr, m.gateway_key.0))
        .collect();
    let mut reports = std::collections::BTreeMap::new();
    let mut notes = Vec::new();
    if !offline && !gateways.is_empty() {
        let keys: Vec<[u8; 32]> = gateways.iter().map(|(_, k)| *k).collect();
        let answers = match s.usage(&keys, wait.unwrap_or(USAGE_TIMEOUT)).await {
            Ok(got) => got,
            Err(e) => {
                notes.push(format!("gateways not asked: {e:#}"));
                Vec::new()
            }
        };
        for ((addr, _), answer) in gateways.iter().zip(answers) {
            let report = match answer {
                Err(e) => {
                    notes.push(format!("gateway {addr} unreachable: {e:#}"));
                    Asked::Unreachable
                }
                // Gateways answer once per 15 minutes per subnet.
                Ok(a) if a.refusal.is_some() => {
                    notes.push(format!(
                        "gateway {addr} refused the usage query (a gateway answers it once per 15 minutes): ({}) {}",
                        a.refusal.as_deref().unwrap_or("?"),
                        a.message
                    ));
                    Asked::Refused
                }
                Ok(a) => match usage_of(&a) {
                    Ok(r) => Asked::Report(r),
                    Err(e) => {
                        notes.push(format!("gateway {addr} unreachable: {e:#}"));
                        Asked::Unreachable
                    }
                },
            };
            reports.insert(*addr, report);
        }
    }
    let mut known = BTreeSet::new();
    let usage_of = |m: &Member, state: &str, known: &mut BTreeSet<[u8; 16]>| -> Use {
        if state == "de-provisioned" || offline {
            return Use::NotAsked;
        }
        match reports.get(&m.gateway_addr) {
            None => Use::NotAsked,
            Some(Asked::Unreachable) => Use::Unreachable,
            Some(Asked::Refused) => Use::Refused,
            Some(Asked::Report(report)) => {
                let id = usage_id(&s.id(), &m.account_key);
                known.insert(id);
                match report.accounts.iter().find(|u| u.id == id) {
                    Some(u) => Use::Reported {
                        items: u.items,
                        bytes: u.bytes,
                        quota: u.quota,
                    },
                    None => Use::Missing,
                }
            }
        }
    };

    let line =
        |h: &str, r: &str, g: &str, st: &str, exp: &str, q: &str, items: &str, bytes: &str| {
            format!("{h:<20} {r:<12} {g:<22} {st:<15} {exp:<12} {q:>8} {items:>11} {bytes:>11}\n")
        };
    let mut out = line(
        "HANDLE",
        "ROLE",
        "GATEWAY",
        "STATE",
        "EXPIRES(UTC)",
        "QUOTA",
        "STORED",
        "BYTES",
    );
    let opt = |v: Option<u64>| v.map_or_else(|| "-".to_owned(), |v| v.to_string());
    let date = |v: Option<u64>| v.map_or_else(|| "-".to_owned(), human_date);
    for (m, state) in &rows {
        let (quota, items, bytes) = match usage_of(m, state, &mut known) {
            Use::NotAsked => (opt(m.quota.map(u64::from)), "-".into(), "-".into()),
            Use::Reported {
                items,
                bytes,
                quota,
            } => (quota.to_string(), items.to_string(), bytes.to_string()),
            Use::Missing => (opt(m.quota.map(u64::from)), "no-account".into(), "-".into()),
            Use::Unreachable => (
                opt(m.quota.map(u64::from)),
                "unreachable".into(),
                "-".into(),
            ),
            Use::Refused => (opt(m.quota.map(u64::from)), "refused".into(), "-".into()),
        };
        out.push_str(&line(
            &m.handle,
            &m.role,
            &m.gateway_addr.to_string(),
            state,
            &date(m.not_after),
            &quota,
            &items,
            &bytes,
        ));
    }
    let mut invites = s.invites()?;
    invites.sort_by(|a, b| a.handle.cmp(&b.handle));
    for i in invites.iter().filter(|i| i.redeemed_at.is_none()) {
        let state = if i.expires_at <= now {
            "invite-expired"
        } else {
            "invited"
        };
        out.push_str(&line(
            &i.handle,
            &i.role,
            &i.gateway_addr.to_string(),
            state,
            &human_date(i.expires_at),
            &i.quota.to_string(),
            "-",
            "-",
        ));
    }
    for (addr, report) in &reports {
        let Asked::Report(report) = report else {
            continue;
        };
        let unknown = report
            .accounts
            .iter()
            .filter(|u| !known.contains(&u.id))
            .count();
        let left_out = (report.total_accounts as usize).saturating_sub(report.accounts.len());
        if unknown > 0 {
            notes.push(format!(
                "gateway {addr} has {unknown} account(s) of this subnet not in {}",
                s.dir.join(MEMBERS_DIR).display()
            ));
        }
        if left_out > 0 {
            notes.push(format!(
                "gateway {addr} left {left_out} account(s) out of its report (too many for one answer)"
            ));
        }
    }
    out.push_str(
        "(EXPIRES: credential or invite expiry, unix seconds; QUOTA: items allowed, as the \
         gateway reports it when reachable; STORED/BYTES: items waiting in the mailbox and \
         their size, as the gateway reports it)\n",
    );
    for n in notes {
        out.push_str(&format!("note: {n}\n"));
    }
    Ok(out)
}

/// Validates and signs `body` as the next version; with `dry_run` prints the
/// difference only, otherwise publishes it to the gateways and writes it.
async fn update_policy(s: &Subnet, body: PolicyBody, dry_run: bool) -> anyhow::Result<()> {
    let (old, new) = s.next_policy(body)?;
    if dry_run {
        print!("{}", diff(old.body(), new.body())?);
        println!(
            "(dry run: policy v{} is valid; nothing written or sent)",
            new.version()
        );
        return Ok(());
    }
    let published = s.publish(&old, &new, ToGateways::IfEnforcedChanged).await?;
    s.save_policy(&new)?;
    print!("{}", published.report(new.version()));
    Ok(())
}

/// The usage report an answer carries.
fn usage_of(answer: &AnswerBody) -> anyhow::Result<UsageReport> {
    if let Some(cause) = &answer.refusal {
        bail!("refused ({cause}): {}", answer.message);
    }
    let hex = answer
        .usage
        .as_deref()
        .context("the gateway answered without a usage report")?;
    let bytes = hex::decode(hex).context("the gateway's usage report")?;
    UsageReport::decode(&bytes).map_err(|e| anyhow::anyhow!("the gateway's usage report: {e}"))
}

/// The contact of a gateway's admin endpoint: its [`ADMIN_MAILBOX`], sealed to its
/// identity key (`gateway_key`) on the Montgomery curve.
pub(crate) fn gateway_admin_contact(
    gateway_key: [u8; 32],
) -> anyhow::Result<shoal_client::Contact> {
    let key = admin_seal_key(&gateway_key).context("the gateway key is not an Ed25519 key")?;
    Ok(shoal_client::Contact {
        mailbox: ADMIN_MAILBOX,
        gateway: gateway_key,
        public_key: key.to_bytes(),
    })
}

/// The contact card of the client at `dir`, read from its store (which the running
/// client holds locked).
fn client_card(dir: &Path) -> anyhow::Result<String> {
    let store = shoal_client::ClientStore::open(dir.join(crate::client_cmd::STORE_FILE))
        .with_context(|| {
            format!(
                "cannot read the client at {} (stop its `shoal client run` for this once)",
                dir.display()
            )
        })?;
    let (identity, _) = crate::client_cmd::load_identity(&store)?;
    let card = shoal_client::ContactCard::new("admin", identity.contact())
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(card.to_text())
}

/// The file an answer is kept in: the gateway (its key's first 8 bytes) and the sequence.
fn answer_file(gateway: &[u8; 32], sequence: u64) -> String {
    format!("{}-{sequence}.answer", hex::encode(&gateway[..8]))
}

/// For the admin's running client: if `bytes` (a message it received) is a gateway's
/// answer to an admin command, files it in DIR/admin-answers/ for the `shoal admin`
/// command waiting on it, and returns `true` (the caller does not show it as mail).
/// Nothing is trusted here; the waiting command checks the gateway's signature.
pub(crate) fn keep_answer(dir: &Path, bytes: &[u8]) -> bool {
    if !is_answer(bytes) {
        return false;
    }
    let Some(body) = SignedAnswer::peek(bytes) else {
        return true;
    };
    let answers = dir.join(ANSWERS_DIR);
    let name = answer_file(&body.gateway.0, body.sequence);
    let written = shoal_relay::keystore::create_private_dir(&answers)
        .map_err(anyhow::Error::from)
        .and_then(|()| write_file(&answers.join(&name), bytes));
    if let Err(e) = written {
        // The root cause only: the path names the gateway.
        tracing::warn!(error = %e.root_cause(), "cannot keep a gateway's admin answer");
    }
    true
}

/// Whether received `bytes` are a gateway's answer to an admin command (filed, never
/// shown as mail).
pub(crate) fn is_answer(bytes: &[u8]) -> bool {
    SignedAnswer::looks_like(bytes)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn diff_marks_changed_lines() {
        let a = first_policy(vec!["member".into()], 60);
        let mut b = a.clone();
        b.ttl_max_secs = 30;
        let d = diff(&a, &b).unwrap();
        // Each line keeps its JSON indentation after the two-column marker.
        assert!(
            d.contains("-   \"ttl_max_secs\": 60,\n+   \"ttl_max_secs\": 30,"),
            "{d}"
        );
        assert!(d.contains("\n    \"ttl_min_secs\": 0,"), "{d}");
        assert_eq!(d.lines().filter(|l| !l.starts_with("  ")).count(), 2, "{d}");
    }

    #[test]
    fn handles_cannot_escape_the_members_directory() {
        for bad in ["", "../x", "a/b", ".hidden", "x y"] {
            assert!(check_handle(bad).is_err(), "{bad:?}");
        }
        check_handle("ana-1.b_c").unwrap();
    }
}

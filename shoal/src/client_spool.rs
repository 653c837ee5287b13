//! The outbox: how every client command other than the long-running client hands its
//! work over, so that only `shoal client run` (or `shoal chat`) ever touches the network.
//!
//! A person's link to their gateway is up all the time, with constant streams, whether
//! they send or not. A command that connected to send and then disconnected would show
//! an observer of that link exactly when its owner sends (issue 16, leak 5). So `send`
//! and the group commands that send write a request into `DIR/outbox/` (one file each,
//! written atomically and fsynced) and return. The running client takes each request in
//! within a second, applies it to its state, and removes the file only once what it
//! made is durable in the store: a request the command acknowledged is never lost.
//!
//! A command that wants to know what became of its request asks for a reply: the
//! running client writes `DIR/outbox/replies/ID.json` when it has taken the request in
//! (`accepted`, or `failed` with the reason) and, if asked, again once the message is
//! durable in every recipient's mailbox or the group change has settled (`done`). The
//! command polls that file with a deadline and removes it when it has read it.
//!
//! The commands open no socket and start no network task: this module and the offline
//! paths of `client_cmd` have no network code in them; `tests/e2e/client_cli.rs` checks
//! it on the real binary.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use shoal_client::ContactCard;
use shoal_client::driver::DriverEvent;
use shoal_client::group::{GroupEvent, GroupId};
use shoal_client::managed::{EnvelopeSent, ManagedHandle};
use shoal_client::messenger::{
    Messenger, MessengerError, MessengerEvent, SendId, SendTicket, display_name, invite_to_text,
};
use shoal_client::receipts::{Delivery, Receipts};
use shoal_subnet::{MemberCard, MessageOptions};
use tokio::sync::broadcast;

use crate::chat::member::{ChatFile, clean, invite_for};

pub(crate) const OUTBOX_DIR: &str = "outbox";
const REPLIES_DIR: &str = "replies";
/// Replies nobody came for (the command gave up waiting) are removed after this long.
const STALE_REPLY: Duration = Duration::from_secs(24 * 3600);

/// A file waiting in `outbox/` for the running client.
#[derive(Debug, Serialize, Deserialize)]
#[serde(untagged)]
pub(crate) enum Spooled {
    Text(SpooledText),
    Bytes(SpooledBytes),
    Request(Request),
}

/// A text to a saved contact, as earlier versions spooled it (no reply).
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SpooledText {
    pub to: String,
    pub message: String,
}

/// Bytes another command prepared (an admin's policy update), to a contact card.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SpooledBytes {
    pub card: String,
    /// Hex.
    pub bytes: String,
}

impl SpooledBytes {
    /// Where to and what, or `None` for a damaged file.
    pub(crate) fn decode(&self) -> Option<(shoal_client::Contact, Vec<u8>)> {
        let card = ContactCard::parse(&self.card).ok()?;
        Some((card.contact, hex::decode(&self.bytes).ok()?))
    }
}

/// A command's request to the running client.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Request {
    pub request: Op,
    /// How far the running client reports back.
    #[serde(default)]
    pub reply: ReplyLevel,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum ReplyLevel {
    /// No reply file.
    #[default]
    None,
    /// Once the request is taken in (or refused).
    Accepted,
    /// Also once it is delivered, or the change has settled.
    Final,
}

/// What a command asks the running client to do.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub(crate) enum Op {
    /// A message to a contact (a saved card; for a member, a pinned member key).
    Direct {
        to: String,
        message: String,
    },
    GroupSend {
        group: String,
        message: String,
        ttl_secs: u64,
        burn_on_read: bool,
    },
    GroupInvite {
        group: String,
        contacts: Vec<String>,
    },
    GroupRemove {
        group: String,
        handle: String,
    },
    GroupUpdate {
        group: String,
    },
    GroupLeave {
        group: String,
    },
    /// The rest change or read only the member's own state, but that state is the
    /// running client's while it runs.
    GroupCreate {
        name: String,
    },
    GroupCard,
    GroupList,
}

impl Op {
    /// Whether it sends anything (the others are answered at once).
    pub(crate) fn sends(&self) -> bool {
        !matches!(self, Op::GroupCreate { .. } | Op::GroupCard | Op::GroupList)
    }
}

/// What the running client says about a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Reply {
    pub state: ReplyState,
    /// What the command prints (or fails with).
    pub text: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum ReplyState {
    Accepted,
    Done,
    Failed,
}

impl ReplyState {
    fn reaches(self, level: ReplyLevel) -> bool {
        match self {
            ReplyState::Accepted => level <= ReplyLevel::Accepted,
            ReplyState::Done | ReplyState::Failed => true,
        }
    }
}

/// Writes `bytes` to `dir/name` atomically and durably (a reader never sees half).
fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> anyhow::Result<PathBuf> {
    shoal_relay::keystore::create_private_dir(dir)?;
    let path = dir.join(name);
    crate::chat::member::write_private(&path, bytes)?;
    Ok(path)
}

/// Writes one outbox file; returns its id (the name of its reply) and path.
pub(crate) fn write_spool(dir: &Path, spooled: &Spooled) -> anyhow::Result<(String, PathBuf)> {
    let mut id = [0u8; 8];
    rand::RngExt::fill(&mut rand::rng(), &mut id);
    let id = hex::encode(id);
    let path = write_atomic(
        &dir.join(OUTBOX_DIR),
        &format!("{id}.json"),
        &serde_json::to_vec(spooled)?,
    )?;
    Ok((id, path))
}

/// The readable files of `dir`'s outbox, oldest first, each with its id and path (to
/// remove once taken in). An unreadable one is left in place and logged.
pub(crate) fn spooled_files(dir: &Path) -> Vec<(String, PathBuf, Spooled)> {
    let Ok(entries) = std::fs::read_dir(dir.join(OUTBOX_DIR)) else {
        return Vec::new();
    };
    let mut files = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "json") || !path.is_file() {
            continue;
        }
        let Some(id) = path
            .file_stem()
            .and_then(|s| s.to_str())
            .map(str::to_string)
        else {
            continue;
        };
        let modified = entry.metadata().and_then(|m| m.modified()).ok();
        let spooled = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<Spooled>(&b).ok());
        match spooled {
            Some(s) => files.push((modified, id, path, s)),
            None => {
                tracing::warn!(file = %path.display(), "unreadable outbox file; left in place")
            }
        }
    }
    // Sent in the order they were written (as far as the file times tell).
    files.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.cmp(&b.1)));
    files.into_iter().map(|(_, i, p, s)| (i, p, s)).collect()
}

/// How many requests wait in `dir`'s outbox.
pub(crate) fn waiting(dir: &Path) -> usize {
    spooled_files(dir).len()
}

fn reply_dir(dir: &Path) -> PathBuf {
    dir.join(OUTBOX_DIR).join(REPLIES_DIR)
}

/// The running client's reply to request `id` (a name this module made).
pub(crate) fn write_reply(dir: &Path, id: &str, reply: &Reply) {
    let written = serde_json::to_vec(reply)
        .map_err(anyhow::Error::from)
        .and_then(|b| write_atomic(&reply_dir(dir), &format!("{id}.json"), &b));
    if let Err(e) = written {
        tracing::warn!(error = %e, "cannot write a reply to a command");
    }
}

pub(crate) fn read_reply(dir: &Path, id: &str) -> Option<Reply> {
    let bytes = std::fs::read(reply_dir(dir).join(format!("{id}.json"))).ok()?;
    serde_json::from_slice(&bytes).ok()
}

pub(crate) fn remove_reply(dir: &Path, id: &str) {
    let _ = std::fs::remove_file(reply_dir(dir).join(format!("{id}.json")));
}

/// Removes replies older than a day (their command stopped waiting).
fn prune_replies(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(reply_dir(dir)) else {
        return;
    };
    for e in entries.flatten() {
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > STALE_REPLY);
        if old {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Polls for the reply to `id` until it reaches `level` or `deadline` passes. Each
/// reply on the way is given to `on_reply` (which prints it). Returns the last reply.
pub(crate) fn wait_reply(
    dir: &Path,
    id: &str,
    level: ReplyLevel,
    deadline: Instant,
    mut on_reply: impl FnMut(&Reply),
) -> Option<Reply> {
    let mut last: Option<Reply> = None;
    loop {
        if let Some(r) = read_reply(dir, id)
            && last.as_ref() != Some(&r)
        {
            on_reply(&r);
            let reached = r.state.reaches(level);
            last = Some(r);
            if reached {
                remove_reply(dir, id);
                return last;
            }
        }
        if Instant::now() >= deadline {
            return last;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// What applying a request produced, and what to follow until its final reply.
#[derive(Debug)]
pub(crate) struct Applied {
    pub text: String,
    pub track: Track,
}

#[derive(Debug)]
pub(crate) enum Track {
    /// Final at once.
    Nothing,
    /// Delivered once every envelope of the send is acked.
    Send { ticket: SendTicket, done: String },
    /// Done once the group's change has settled.
    Change { group: GroupId, what: String },
}

/// The member card to write to the contact `to` (`handle` or `handle@subnet`): a key
/// pinned on first use or confirmed, never an unaccepted key change.
pub(crate) fn member_card_for(m: &Messenger, to: &str) -> anyhow::Result<MemberCard> {
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

/// Applies `op` to a member's messenger: the one place both the running client (on
/// its state) and a command with no client running (on a copy it throws away, to refuse
/// a bad request before it is spooled; or, for the ops that send nothing, for real)
/// interpret a request. `file` is `chat.json` (group names), saved in `dir` if changed.
pub(crate) fn apply_member_op(
    m: &mut Messenger,
    file: &mut ChatFile,
    dir: &Path,
    op: Op,
    now: u64,
) -> anyhow::Result<Applied> {
    let group_of = |m: &Messenger, file: &ChatFile, q: &str| -> anyhow::Result<(GroupId, String)> {
        let id = file.find_group(&m.groups(), q)?;
        let label = clean(file.group_label(&id).as_bytes());
        Ok((id, label))
    };
    let refused = |what: &str, e: MessengerError| match e {
        e @ MessengerError::Refused { .. } => anyhow::anyhow!("not done ({what}): {e}"),
        e => anyhow::anyhow!("cannot do it ({what}): {e}"),
    };
    let change = |group: GroupId, what: String| Applied {
        text: format!("queued: {what}"),
        track: Track::Change { group, what },
    };
    Ok(match op {
        Op::Direct { to, message } => {
            let card = member_card_for(m, &to)?;
            let shown = display_name(card.handle(), &card.subnet());
            let options = MessageOptions {
                ttl_secs: crate::chat::DEFAULT_TTL_SECS,
                burn_on_read: false,
            };
            let ticket = m
                .send_direct(&card, options, message.as_bytes(), now)
                .map_err(|e| anyhow::anyhow!("not sent: {e}"))?;
            Applied {
                text: format!("queued: message to {shown}"),
                track: Track::Send {
                    ticket,
                    done: format!("delivered to {shown}'s mailbox"),
                },
            }
        }
        Op::GroupSend {
            group,
            message,
            ttl_secs,
            burn_on_read,
        } => {
            let (g, label) = group_of(m, file, &group)?;
            let what = format!("message to {label}");
            let options = MessageOptions {
                ttl_secs,
                burn_on_read,
            };
            let ticket = m
                .send_group(&g, options, message.as_bytes(), now)
                .map_err(|e| refused(&what, e))?;
            if ticket.envelopes == 0 {
                Applied {
                    text: format!("done: {what} (nobody else is in {label})"),
                    track: Track::Nothing,
                }
            } else {
                Applied {
                    text: format!("queued: {what}"),
                    track: Track::Send {
                        ticket,
                        done: format!(
                            "delivered: {what}, to the mailboxes of {} members",
                            ticket.envelopes
                        ),
                    },
                }
            }
        }
        Op::GroupInvite { group, contacts } => {
            let (g, label) = group_of(m, file, &group)?;
            // Contacts are looked up first, so a typo changes nothing.
            let mut invites = Vec::new();
            for h in &contacts {
                invites.push(invite_for(m, file, h).with_context(|| {
                    format!(
                        "no card for {:?}: save their membership card (their `shoal client group card`) with `shoal client contact add {} CARD`",
                        clean(h.as_bytes()),
                        clean(h.as_bytes())
                    )
                })?);
            }
            let what = format!("adding {} to {label}", contacts.join(", "));
            m.add_members(&g, &invites, now)
                .map_err(|e| refused(&what, e))?;
            change(g, what)
        }
        Op::GroupRemove { group, handle } => {
            let (g, label) = group_of(m, file, &group)?;
            let what = format!("removing {handle} from {label}");
            m.remove_member(&g, &handle, now)
                .map_err(|e| refused(&what, e))?;
            change(g, what)
        }
        Op::GroupUpdate { group } => {
            let (g, label) = group_of(m, file, &group)?;
            let what = format!("new keys in {label}");
            m.self_update(&g, now).map_err(|e| refused(&what, e))?;
            change(g, what)
        }
        Op::GroupLeave { group } => {
            let (g, label) = group_of(m, file, &group)?;
            let what = format!("asking to leave {label}");
            m.leave(&g, now).map_err(|e| refused(&what, e))?;
            Applied {
                text: format!("done: {what}; the next change by another member removes you"),
                track: Track::Nothing,
            }
        }
        Op::GroupCreate { name } => {
            if file.groups.iter().any(|g| g.name == name) {
                bail!("you already have a group named {name:?}");
            }
            let id = m.create_group(now)?;
            file.groups.push(crate::chat::member::SavedGroup {
                id: hex::encode(&id),
                name: name.clone(),
            });
            file.save(dir)?;
            Applied {
                text: format!(
                    "group {name:?} created (id {})\nadd people with `shoal client group invite {name} HANDLE`",
                    hex::encode(&id)
                ),
                track: Track::Nothing,
            }
        }
        Op::GroupCard => Applied {
            text: invite_to_text(&m.invite()?),
            track: Track::Nothing,
        },
        Op::GroupList => Applied {
            text: groups_text(m, file, now),
            track: Track::Nothing,
        },
    })
}

/// `group list`: groups with members, epoch and pending changes; cards received.
pub(crate) fn groups_text(m: &Messenger, file: &ChatFile, now: u64) -> String {
    let me = m.credential();
    let mut out = Vec::new();
    let groups = m.groups();
    if groups.is_empty() {
        out.push("no groups; make one with `shoal client group create NAME`".to_string());
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
        out.push(format!(
            "{}\tid {}\tepoch {}\tmembers: {}",
            clean(file.group_label(&s.id).as_bytes()),
            hex::encode(&s.id[..s.id.len().min(4)]),
            s.epoch,
            members.join(", ")
        ));
        if let Some(t) = s.settling_until_ms {
            out.push(format!(
                "\tpending: a change settles in {} s (the running client applies it)",
                t.saturating_sub(now).div_ceil(1000)
            ));
        }
        if s.leaving {
            out.push(
                "\tpending: you asked to leave; the next change by another member removes you"
                    .to_string(),
            );
        }
    }
    for i in m.received_invites() {
        let name = display_name(&i.handle, &i.subnet);
        let confirmed = m
            .contact(&i.subnet, &i.identity_key)
            .is_some_and(|c| c.confirmed);
        if confirmed {
            out.push(format!(
                "card received from {name}: `shoal client group invite GROUP {name}` adds them"
            ));
        } else {
            out.push(format!(
                "card received from {name} (key {}, not confirmed): check the safety number with `shoal client contact list`, then `shoal client contact accept {name}`",
                hex::encode(&i.identity_key.0[..4])
            ));
        }
    }
    out.join("\n")
}

/// A request taken in whose final reply is still due.
#[derive(Debug)]
struct Following {
    id: String,
    /// The final reply is written only if asked for.
    reply: bool,
    what: Track,
}

/// The running member client's side of the outbox (`shoal client run` and the chat):
/// takes requests in, answers them, and follows sends to their receipts and changes
/// until they settle.
#[derive(Debug)]
pub(crate) struct MemberSpooler {
    dir: PathBuf,
    receipts: Receipts,
    sends: HashMap<SendId, Following>,
    changes: Vec<Following>,
    sent: broadcast::Receiver<EnvelopeSent>,
    raw: broadcast::Receiver<DriverEvent>,
    events: broadcast::Receiver<MessengerEvent>,
}

impl MemberSpooler {
    pub(crate) fn new(dir: &Path, handle: &ManagedHandle) -> Self {
        prune_replies(dir);
        MemberSpooler {
            dir: dir.to_path_buf(),
            receipts: Receipts::new(),
            sends: HashMap::new(),
            changes: Vec::new(),
            sent: handle.subscribe_sent(),
            raw: handle.client().subscribe(),
            events: handle.subscribe(),
        }
    }

    /// Once a tick (every half second or so): receipts, settled changes, new requests.
    /// Returns a line per event for the user.
    pub(crate) async fn tick(&mut self, handle: &ManagedHandle) -> Vec<String> {
        let mut notes = Vec::new();
        self.follow(handle).await;
        for (id, path, s) in spooled_files(&self.dir) {
            let request = match s {
                Spooled::Text(t) => Request {
                    request: Op::Direct {
                        to: t.to,
                        message: t.message,
                    },
                    reply: ReplyLevel::None,
                },
                // Prepared bytes (the admin's policy updates) go out as they are.
                Spooled::Bytes(b) => {
                    let Some((contact, bytes)) = b.decode() else {
                        notes.push("outbox: a damaged file; discarded".to_string());
                        let _ = std::fs::remove_file(&path);
                        continue;
                    };
                    match handle.client().send(contact, bytes).await {
                        // Durable in the client's queue: the file can go.
                        Ok(_) => {
                            let _ = std::fs::remove_file(&path);
                            notes.push("queued a message to a member".to_string());
                        }
                        Err(e) => tracing::warn!(error = %e, "cannot queue an outbox message"),
                    }
                    continue;
                }
                Spooled::Request(r) => r,
            };
            let dir = self.dir.clone();
            let op = request.request;
            let done = handle
                .with(move |m, now| {
                    let mut file = ChatFile::load(&dir)?;
                    apply_member_op(m, &mut file, &dir, op, now)
                })
                .await;
            match done {
                // In the messenger's state, saved before `with` returned: the file can go.
                Ok(Ok(applied)) => {
                    let _ = std::fs::remove_file(&path);
                    notes.push(format!("outbox: {}", first_line(&applied.text)));
                    self.taken(id, request.reply, applied);
                }
                Ok(Err(e)) => {
                    let _ = std::fs::remove_file(&path);
                    notes.push(format!("outbox: {e:#}; request discarded"));
                    if request.reply >= ReplyLevel::Accepted {
                        let reply = Reply {
                            state: ReplyState::Failed,
                            text: format!("{e:#}"),
                        };
                        write_reply(&self.dir, &id, &reply);
                    }
                }
                // The messenger stopped: the file stays for the next start.
                Err(e) => tracing::warn!(error = %e, "cannot take an outbox request in"),
            }
        }
        notes
    }

    fn taken(&mut self, id: String, level: ReplyLevel, applied: Applied) {
        let final_now = matches!(applied.track, Track::Nothing);
        if level >= ReplyLevel::Accepted {
            let state = if final_now {
                ReplyState::Done
            } else {
                ReplyState::Accepted
            };
            let reply = Reply {
                state,
                text: applied.text,
            };
            write_reply(&self.dir, &id, &reply);
        }
        let following = Following {
            id,
            reply: level >= ReplyLevel::Final,
            what: applied.track,
        };
        match &following.what {
            Track::Nothing => {}
            Track::Send { ticket, .. } => {
                let ticket = *ticket;
                self.sends.insert(ticket.id, following);
                if let Some(outcome) = self.receipts.expect(ticket) {
                    self.settle(outcome);
                }
            }
            Track::Change { .. } => self.changes.push(following),
        }
    }

    /// Envelope reports and acks since the last tick; settled changes.
    async fn follow(&mut self, handle: &ManagedHandle) {
        loop {
            match self.sent.try_recv() {
                Ok(s) => {
                    if let Some(send) = s.send
                        && let Some(outcome) = self.receipts.on_envelope(send, s.result)
                    {
                        self.settle(outcome);
                    }
                }
                Err(broadcast::error::TryRecvError::Lagged(_)) => {}
                Err(_) => break,
            }
        }
        loop {
            match self.raw.try_recv() {
                Ok(DriverEvent::Acked { message_id }) => {
                    if let Some(outcome) = self.receipts.on_acked(&message_id) {
                        self.settle(outcome);
                    }
                }
                Ok(_) | Err(broadcast::error::TryRecvError::Lagged(_)) => {}
                Err(_) => break,
            }
        }
        // A change another member's beat is not done: say so rather than "settled".
        let mut lost = Vec::new();
        loop {
            match self.events.try_recv() {
                Ok(MessengerEvent::Group(GroupEvent::OwnCommitLost { group, .. })) => {
                    lost.push(group)
                }
                Ok(_) | Err(broadcast::error::TryRecvError::Lagged(_)) => {}
                Err(_) => break,
            }
        }
        let dir = self.dir.clone();
        self.changes.retain(|f| {
            let Track::Change { group, what } = &f.what else {
                return false;
            };
            if !lost.contains(group) {
                return true;
            }
            if f.reply {
                let reply = Reply {
                    state: ReplyState::Failed,
                    text: format!(
                        "not done ({what}): another member changed the group at the same time and their change won; run the command again"
                    ),
                };
                write_reply(&dir, &f.id, &reply);
            }
            false
        });
        if self.changes.is_empty() {
            return;
        }
        let Ok(groups) = handle.with(|m, _| m.groups()).await else {
            return;
        };
        self.changes.retain(|f| {
            let Track::Change { group, what } = &f.what else {
                return false;
            };
            let text = match groups.iter().find(|s| &s.id == group) {
                None => format!("you are no longer in the group ({what})"),
                Some(s) if s.settling_until_ms.is_none() => format!(
                    "done: {what} (epoch {}, {} members)",
                    s.epoch,
                    s.members.len()
                ),
                Some(_) => return true,
            };
            if f.reply {
                let reply = Reply {
                    state: ReplyState::Done,
                    text,
                };
                write_reply(&dir, &f.id, &reply);
            }
            false
        });
    }

    fn settle(&mut self, (send, delivery): (SendId, Delivery)) {
        let Some(f) = self.sends.remove(&send) else {
            return;
        };
        let reply = match (delivery, &f.what) {
            (Delivery::Delivered, Track::Send { done, .. }) => Reply {
                state: ReplyState::Done,
                text: done.clone(),
            },
            (Delivery::Failed(why), _) => Reply {
                state: ReplyState::Failed,
                text: format!("not sent: {why}"),
            },
            (Delivery::Sent, _) | (Delivery::Delivered, _) => {
                self.sends.insert(send, f);
                return;
            }
        };
        if f.reply {
            write_reply(&self.dir, &f.id, &reply);
        }
    }
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or("")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn spooled_files_read_back_in_order_and_old_texts_still_parse() {
        let dir = tempfile::tempdir().unwrap();
        let (a, _) = write_spool(
            dir.path(),
            &Spooled::Request(Request {
                request: Op::GroupSend {
                    group: "friends".into(),
                    message: "hi".into(),
                    ttl_secs: 60,
                    burn_on_read: false,
                },
                reply: ReplyLevel::Final,
            }),
        )
        .unwrap();
        // What an earlier version wrote.
        std::fs::write(
            dir.path().join(OUTBOX_DIR).join("00.json"),
            br#"{"to":"bob","message":"old"}"#,
        )
        .unwrap();
        let files = spooled_files(dir.path());
        assert_eq!(files.len(), 2);
        assert!(files.iter().any(|(id, _, s)| id == &a
            && matches!(s, Spooled::Request(Request { request: Op::GroupSend { group, .. }, reply: ReplyLevel::Final }) if group == "friends")));
        assert!(
            files
                .iter()
                .any(|(_, _, s)| matches!(s, Spooled::Text(t) if t.message == "old"))
        );
        // Replies live beside the outbox and are not requests.
        write_reply(
            dir.path(),
            &a,
            &Reply {
                state: ReplyState::Accepted,
                text: "queued".into(),
            },
        );
        assert_eq!(waiting(dir.path()), 2);
        assert_eq!(read_reply(dir.path(), &a).unwrap().text, "queued");
    }

    #[test]
    fn a_wait_stops_at_the_level_asked_for() {
        let dir = tempfile::tempdir().unwrap();
        let reply = |state| Reply {
            state,
            text: String::new(),
        };
        write_reply(dir.path(), "a", &reply(ReplyState::Accepted));
        let got = wait_reply(
            dir.path(),
            "a",
            ReplyLevel::Accepted,
            Instant::now(),
            |_| {},
        );
        assert_eq!(got.unwrap().state, ReplyState::Accepted);
        assert!(
            read_reply(dir.path(), "a").is_none(),
            "read replies are removed"
        );
        // Not final yet: the wait ends at its deadline with what it saw.
        write_reply(dir.path(), "b", &reply(ReplyState::Accepted));
        let got = wait_reply(dir.path(), "b", ReplyLevel::Final, Instant::now(), |_| {});
        assert_eq!(got.unwrap().state, ReplyState::Accepted);
        assert!(
            read_reply(dir.path(), "b").is_some(),
            "kept for a later wait"
        );
        assert!(ReplyState::Failed.reaches(ReplyLevel::Final));
    }
}

//! The chat's driver: sets up the messenger, runs the client and the terminal, and
//! moves keys, messenger events and delivery receipts between them and the state.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use shoal_client::ClientStore;
use shoal_client::driver::{self, DriverEvent};
use shoal_client::group::GroupEvent;
use shoal_client::managed::{self, EnvelopeSent, ManagedHandle, unix_ms};
use shoal_client::messenger::{
    Conversation, Messenger, MessengerEvent, OutgoingWhat, PinnedContact, display_name,
    invite_to_text,
};
use shoal_packet::MessageId;
use shoal_subnet::{MemberCard, MessageOptions, SubnetId};
use shoal_topology::Hex32;
use tokio::sync::{broadcast, mpsc};

use super::ChatArgs;
use super::member::{
    ChatFile, MemberFiles, SavedGroup, card_credential, clean, invite_for, open_messenger,
    write_private,
};
use super::state::{ChatState, ConvKey, Delivery, Key, Request, Update, default_title};
use super::view;
use crate::client_cmd::{CONFIG_FILE, STORE_FILE, load_config, load_identity};

const CARD_FILE: &str = "my-card.txt";

pub fn run(args: ChatArgs) -> anyhow::Result<()> {
    let loaded = load_config(&args.dir.join(CONFIG_FILE))?;
    let store_path = args.dir.join(STORE_FILE);
    if !store_path.exists() {
        bail!(
            "{} has no client; run `shoal client init --dir {}` first",
            args.dir.display(),
            args.dir.display()
        );
    }
    let store = ClientStore::open(&store_path).with_context(|| {
        format!(
            "cannot open {} (is another shoal chat or client using it?)",
            store_path.display()
        )
    })?;
    let (identity, account) = load_identity(&store)?;
    let mut messenger = open_messenger(
        &args.dir,
        &MemberFiles {
            credential: args.credential.clone(),
            policy: args.policy.clone(),
            commit_settle_secs: args.commit_settle_secs,
        },
        &store,
        &account,
        identity.contact(),
    )?;
    if args.print_card {
        let card = invite_to_text(&messenger.invite()?);
        // The card's one-time key is now part of the state: keep it.
        store.save_messenger(&messenger.snapshot()?, &[])?;
        println!("{card}");
        return Ok(());
    }
    let file = ChatFile::load(&args.dir)?;
    let store = Arc::new(store);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("shoal-chat")
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let client = driver::spawn(loaded.driver, identity, &account, store.clone())?;
        let handle = managed::spawn(client, messenger, store)?;
        let result = run_terminal(&handle, args.dir, file).await;
        handle.shutdown().await;
        result
    })
}

async fn run_terminal(handle: &ManagedHandle, dir: PathBuf, file: ChatFile) -> anyhow::Result<()> {
    // Subscribe before anything can happen, so no event is missed.
    let mut events = handle.subscribe();
    let mut sent = handle.subscribe_sent();
    let mut raw = handle.client().subscribe();
    let mut ui = Ui::new(handle, dir, file).await?;

    let mut terminal = ratatui::try_init().context("cannot use this terminal")?;
    // No bracketed paste: crossterm lost long pastes (a card is ~2-4 KB) in tests;
    // pasted text arrives as typed characters instead, which the reducer takes as is.
    let (key_tx, mut keys) = mpsc::channel(256);
    let reader = std::thread::spawn(move || read_keys(key_tx));

    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let signal = crate::runtime::wait_for_signal();
    tokio::pin!(signal);
    let result: anyhow::Result<()> = async {
        loop {
            terminal.draw(|f| view::render(&ui.state, f))?;
            if ui.state.quit {
                return Ok(());
            }
            tokio::select! {
                k = keys.recv() => {
                    let Some(k) = k else { return Ok(()) };
                    // Take every key already waiting before drawing again: a pasted
                    // card is thousands of keys, and a redraw per key is too slow.
                    let mut next = Some(k);
                    while let Some(k) = next {
                        if let Some(r) = ui.state.on_key(k) {
                            ui.request(r).await;
                        }
                        next = if ui.state.quit { None } else { keys.try_recv().ok() };
                    }
                }
                e = events.recv() => match e {
                    Ok(e) => ui.on_event(e).await,
                    Err(broadcast::error::RecvError::Lagged(_)) => ui.refresh_groups().await,
                    Err(broadcast::error::RecvError::Closed) => return Ok(()),
                },
                s = sent.recv() => if let Ok(s) = s { ui.tracker.on_sent(s) },
                d = raw.recv() => match d {
                    Ok(DriverEvent::Acked { message_id }) => {
                        if let Some(id) = ui.tracker.on_acked(&message_id) {
                            ui.state.apply(Update::Delivery { local_id: id, delivery: Delivery::Acked });
                        }
                    }
                    Ok(DriverEvent::Connected) => ui.state.apply(Update::Online(true)),
                    Ok(DriverEvent::Disconnected) => ui.state.apply(Update::Online(false)),
                    Ok(DriverEvent::Problem(p)) => ui.state.apply(Update::Status(p.to_string())),
                    _ => {}
                },
                _ = tick.tick() => ui.on_tick(),
                r = &mut signal => { r?; return Ok(()); }
            }
            ui.burn_if_seen().await;
        }
    }
    .await;
    drop(keys);
    ratatui::restore();
    let _ = reader.join();
    result
}

/// Terminal events → [`Key`]s, on a plain thread (crossterm's reader blocks).
fn read_keys(tx: mpsc::Sender<Key>) {
    loop {
        if tx.is_closed() {
            return;
        }
        match event::poll(Duration::from_millis(200)) {
            Ok(true) => {}
            Ok(false) => continue,
            Err(_) => return,
        }
        let key = match event::read() {
            Ok(Event::Key(k)) if k.kind != KeyEventKind::Release => match k.code {
                KeyCode::Char('c') if k.modifiers.contains(KeyModifiers::CONTROL) => Key::CtrlC,
                KeyCode::Char(c) => Key::Char(c),
                KeyCode::Enter => Key::Enter,
                KeyCode::Backspace => Key::Backspace,
                KeyCode::Tab => Key::Tab,
                KeyCode::BackTab => Key::BackTab,
                KeyCode::Up => Key::Up,
                KeyCode::Down => Key::Down,
                _ => continue,
            },
            Ok(Event::Paste(s)) => Key::Paste(s),
            Ok(_) => continue,
            Err(_) => return,
        };
        if tx.blocking_send(key).is_err() {
            return;
        }
    }
}

/// Maps the driver's message ids to the chat's own messages, for delivery marks.
#[derive(Debug, Default)]
struct Tracker {
    /// Own messages whose envelopes the messenger has yet to hand to the driver, in
    /// order: (local id, envelopes still to come).
    expecting: VecDeque<(u64, usize)>,
    by_id: HashMap<MessageId, u64>,
    /// Local id → (envelopes not yet acked, tick at which the last was handed over).
    open: HashMap<u64, (usize, Option<u64>)>,
    ticks: u64,
}

impl Tracker {
    fn expect(&mut self, local_id: u64, envelopes: usize) {
        if envelopes > 0 {
            self.expecting.push_back((local_id, envelopes));
            self.open.insert(local_id, (envelopes, None));
        }
    }

    /// Direct and group application envelopes come only from the chat's own sends, in
    /// the order the sends were made.
    fn on_sent(&mut self, s: EnvelopeSent) {
        let mine = matches!(
            s.what,
            OutgoingWhat::Direct
                | OutgoingWhat::Group(shoal_client::group::OutgoingKind::Application)
        );
        if !mine {
            return;
        }
        let Some((local, left)) = self.expecting.front_mut() else {
            return;
        };
        let local = *local;
        *left -= 1;
        if *left == 0 {
            self.expecting.pop_front();
            if let Some(o) = self.open.get_mut(&local) {
                o.1 = Some(self.ticks);
            }
        }
        self.by_id.insert(s.message_id, local);
    }

    /// The local id that is now fully acked, if any.
    fn on_acked(&mut self, id: &MessageId) -> Option<u64> {
        let local = self.by_id.remove(id)?;
        let o = self.open.get_mut(&local)?;
        o.0 = o.0.saturating_sub(1);
        if o.0 == 0 && o.1.is_some() {
            self.open.remove(&local);
            return Some(local);
        }
        None
    }

    /// Own messages that have left the device: handed over before the previous tick
    /// (so the driver's counters include them) and nothing is waiting to be sent.
    fn on_tick(&mut self, queued_fragments: usize) -> Vec<u64> {
        self.ticks += 1;
        if queued_fragments > 0 {
            return Vec::new();
        }
        let now = self.ticks;
        let mut out = Vec::new();
        for (local, (_, handed)) in &mut self.open {
            if handed.is_some_and(|t| t + 1 < now) {
                *handed = Some(u64::MAX / 2);
                out.push(*local);
            }
        }
        out
    }
}

struct Ui<'a> {
    handle: &'a ManagedHandle,
    dir: PathBuf,
    file: ChatFile,
    state: ChatState,
    tracker: Tracker,
    /// Conversations that received burn-on-read messages not yet burnt.
    burn_pending: Vec<ConvKey>,
    me: (String, shoal_subnet::SubnetId),
}

impl<'a> Ui<'a> {
    async fn new(handle: &'a ManagedHandle, dir: PathBuf, file: ChatFile) -> anyhow::Result<Self> {
        let (me, inbox, contacts) = handle
            .with(|m, _| {
                let c = m.credential();
                let inbox: Vec<(StoredLabel, shoal_client::messenger::StoredMessage)> = m
                    .peek()
                    .iter()
                    .map(|s| (label_of(m, &s.from_subnet, &s.from_key), s.clone()))
                    .collect();
                let contacts: Vec<String> = m
                    .contacts()
                    .iter()
                    .filter(|c| c.confirmed)
                    .map(conv_label)
                    .collect();
                ((c.handle().to_string(), c.subnet()), inbox, contacts)
            })
            .await?;
        let mut ui = Ui {
            handle,
            dir,
            file,
            state: ChatState::new(clean(me.0.as_bytes())),
            tracker: Tracker::default(),
            burn_pending: Vec::new(),
            me,
        };
        for g in &ui.file.groups {
            if let Ok(id) = hex::decode(&g.id) {
                ui.state.name_group(id, g.name.clone());
            }
        }
        for label in contacts {
            ui.state.apply(Update::Conversation {
                key: ConvKey::Direct(label.clone()),
                title: label,
                members: Vec::new(),
            });
        }
        ui.refresh_groups().await;
        for (label, m) in inbox {
            let conv = match m.group {
                Some(g) => ConvKey::Group(g),
                None => ConvKey::Direct(label.clone()),
            };
            if m.burn_on_read {
                ui.burn_pending.push(conv.clone());
            }
            ui.state.apply(Update::Received {
                conv,
                from: label,
                body: clean(&m.body),
                at_unix_ms: m.received_unix_ms,
                expires_unix_ms: m.expires_unix_ms,
                burn_on_read: m.burn_on_read,
            });
        }
        // What was there before this session counts as seen.
        for c in &mut ui.state.conversations {
            c.unread = 0;
        }
        ui.state.online = handle.client().stats().connected;
        Ok(ui)
    }

    fn status(&mut self, s: impl Into<String>) {
        self.state.apply(Update::Status(s.into()));
    }

    async fn refresh_groups(&mut self) {
        let Ok(groups) = self.handle.with(|m, _| m.groups()).await else {
            return;
        };
        for g in groups {
            let mut members: Vec<String> = Vec::new();
            let mut skipped_me = false;
            for (h, subnet) in g.members {
                if !skipped_me && h == self.me.0 && subnet == self.me.1 {
                    skipped_me = true;
                    continue;
                }
                members.push(display_name(&h, &subnet));
            }
            let key = ConvKey::Group(g.id);
            let title = default_title(&key);
            self.state.apply(Update::Conversation {
                key,
                title,
                members,
            });
        }
    }

    async fn request(&mut self, r: Request) {
        let result = match r {
            Request::Send {
                local_id,
                to,
                body,
                ttl_secs,
                burn_on_read,
            } => self.send(local_id, to, body, ttl_secs, burn_on_read).await,
            Request::AddContact { card } => self.add_contact(&card).await,
            Request::NewGroup { name } => self.new_group(name).await,
            Request::Invite { group, handle } => self.invite(group, handle).await,
            Request::ShowCard => self.show_card().await,
            Request::Verify { to, contact } => self.verify(to, contact).await,
            Request::Accept { contact } => self.accept(contact).await,
            Request::Quit => Ok(()),
        };
        if let Err(e) = result {
            self.status(format!("{e:#}"));
        }
    }

    async fn send(
        &mut self,
        local_id: u64,
        to: ConvKey,
        body: String,
        ttl_secs: u64,
        burn_on_read: bool,
    ) -> anyhow::Result<()> {
        let options = MessageOptions {
            ttl_secs,
            burn_on_read,
        };
        let now = unix_ms();
        self.state.stamp_own(local_id, now, ttl_secs);
        let result = match to {
            ConvKey::Direct(label) => {
                let sent = self
                    .handle
                    .with(move |m, now| {
                        let card = contact_by_label(m, &label)
                            .and_then(|c| MemberCard::parse(&c.card).ok());
                        card.map(|card| {
                            m.send_direct(&card, options, body.as_bytes(), now)
                                .map(|()| 1)
                        })
                    })
                    .await?;
                let Some(result) = sent else {
                    self.fail(local_id);
                    bail!("not in your contacts: ask for their card and /add it");
                };
                result
            }
            ConvKey::Group(g) => {
                self.handle
                    .with(move |m, now| {
                        let others = m
                            .groups()
                            .into_iter()
                            .find(|s| s.id == g)
                            .map_or(0, |s| s.members.len().saturating_sub(1));
                        m.send_group(&g, options, body.as_bytes(), now)
                            .map(|()| others)
                    })
                    .await?
            }
        };
        match result {
            Ok(envelopes) => {
                self.tracker.expect(local_id, envelopes);
                Ok(())
            }
            Err(e) => {
                self.fail(local_id);
                Err(anyhow::anyhow!("not sent: {e}"))
            }
        }
    }

    fn fail(&mut self, local_id: u64) {
        self.state.apply(Update::Delivery {
            local_id,
            delivery: Delivery::Failed,
        });
    }

    async fn add_contact(&mut self, card: &str) -> anyhow::Result<()> {
        let (_, member) = card_credential(card)?;
        self.file.put_contact(&member, card);
        self.file.save(&self.dir)?;
        // Pasting a card is the user vouching for its key; then send them this user's
        // card, so they can add this user to groups too.
        let (pinned, sent) = self
            .handle
            .with(move |m, now| {
                let pinned = m.confirm_card(&member, now);
                (pinned, m.send_invite(&member, now))
            })
            .await?;
        let label = conv_label(&pinned);
        let key = ConvKey::Direct(label.clone());
        self.state.apply(Update::Conversation {
            key: key.clone(),
            title: label.clone(),
            members: Vec::new(),
        });
        self.state.focus(&key);
        let shown = label;
        match sent {
            Ok(()) => self.status(format!("{shown} added; your card is on its way to them")),
            Err(e) => self.status(format!("{shown} added, but your card was not sent: {e}")),
        }
        Ok(())
    }

    async fn new_group(&mut self, name: String) -> anyhow::Result<()> {
        let id = self.handle.with(|m, now| m.create_group(now)).await??;
        self.file.groups.push(SavedGroup {
            id: hex::encode(&id),
            name: name.clone(),
        });
        self.file.save(&self.dir)?;
        self.state.name_group(id.clone(), name.clone());
        let key = ConvKey::Group(id);
        self.state.apply(Update::Conversation {
            key: key.clone(),
            title: name.clone(),
            members: Vec::new(),
        });
        self.state.focus(&key);
        self.status(format!("group {name} made; add people with /invite HANDLE"));
        Ok(())
    }

    async fn invite(&mut self, group: Vec<u8>, handle: String) -> anyhow::Result<()> {
        let file = self.file.clone();
        let h = handle.clone();
        // The handle is resolved to one pinned key; only that key's cards are used.
        let done = self
            .handle
            .with(move |m, now| invite_for(m, &file, &h).map(|i| m.add_members(&group, &[i], now)))
            .await?;
        let shown = clean(handle.as_bytes());
        match done {
            Err(e) => bail!("cannot add {shown}: {e:#}"),
            Ok(Err(e)) => bail!("cannot add {shown}: {e}"),
            Ok(Ok(())) => {
                self.status(format!(
                    "adding {shown}: they join once the change has settled (the group list shows them then)"
                ));
                Ok(())
            }
        }
    }

    /// Shows the safety number with a contact: both people must see the same digits.
    async fn verify(&mut self, to: Option<ConvKey>, contact: String) -> anyhow::Result<()> {
        let line = self
            .handle
            .with(move |m, _| {
                let c = if contact.is_empty() {
                    match to {
                        Some(ConvKey::Direct(label)) => contact_by_label(m, &label)
                            .cloned()
                            .ok_or_else(|| anyhow::anyhow!("no such contact")),
                        _ => Err(anyhow::anyhow!("open a direct conversation, or /verify HANDLE")),
                    }
                } else {
                    m.find_contact(&contact)
                        .cloned()
                        .map_err(|e| anyhow::anyhow!("{e}"))
                }?;
                let state = if c.confirmed { "accepted" } else { "not accepted: /accept it once the digits match" };
                Ok::<_, anyhow::Error>(format!(
                    "safety number with {} (key {}): {} ({state}); compare it with theirs over a channel you trust",
                    c.display(),
                    hex::encode(&c.identity_key.0[..4]),
                    m.safety_number_with(&c.identity_key)
                ))
            })
            .await??;
        self.status(line);
        Ok(())
    }

    async fn accept(&mut self, contact: String) -> anyhow::Result<()> {
        let label = self
            .handle
            .with(move |m, _| {
                let c = m.find_contact(&contact).cloned()?;
                m.confirm_contact(&c.subnet, &c.identity_key);
                Ok::<_, shoal_client::messenger::MessengerError>(conv_label(&c))
            })
            .await??;
        self.state.apply(Update::Conversation {
            key: ConvKey::Direct(label.clone()),
            title: label.clone(),
            members: Vec::new(),
        });
        self.status(format!("{label} accepted"));
        Ok(())
    }

    async fn show_card(&mut self) -> anyhow::Result<()> {
        let card = self
            .handle
            .with(|m, _| m.invite().map(|i| invite_to_text(&i)))
            .await??;
        let path = self.dir.join(CARD_FILE);
        write_private(&path, format!("{card}\n").as_bytes())?;
        self.status(format!(
            "your card is in {}; give it only to people you want to talk to",
            path.display()
        ));
        Ok(())
    }

    async fn on_event(&mut self, e: MessengerEvent) {
        match e {
            MessengerEvent::Message {
                id,
                subnet,
                key,
                key_alert,
                group,
                body,
                ..
            } => {
                let meta =
                    self.handle
                        .with(move |m, _| {
                            let label = label_of(m, &subnet, &key);
                            m.peek().iter().find(|s| s.id == id).map(|s| {
                                (label, s.received_unix_ms, s.expires_unix_ms, s.burn_on_read)
                            })
                        })
                        .await
                        .ok()
                        .flatten();
                // Gone already (expired): nothing to show.
                let Some((label, at, expires, burn)) = meta else {
                    return;
                };
                let conv = match group {
                    Some(g) => ConvKey::Group(g),
                    None => ConvKey::Direct(label.clone()),
                };
                if burn {
                    self.burn_pending.push(conv.clone());
                }
                if key_alert {
                    self.status(format!(
                        "WARNING: {label} is a NEW KEY for this name: /verify and /accept it only if the safety number matches"
                    ));
                }
                self.state.apply(Update::Received {
                    conv,
                    from: label,
                    body: clean(&body),
                    at_unix_ms: at,
                    expires_unix_ms: expires,
                    burn_on_read: burn,
                });
            }
            MessengerEvent::InviteReceived {
                handle,
                subnet,
                confirmed,
                ..
            } => {
                let h = display_name(&handle, &subnet);
                if confirmed {
                    self.status(format!(
                        "{h} sent you their card: open a group and /invite {h} to add them"
                    ));
                } else {
                    self.status(format!(
                        "{h} sent you their card from a key you have not accepted: /verify {h}, then /accept {h}"
                    ));
                }
            }
            MessengerEvent::KeyChanged { subnet, handle, .. } => {
                let h = display_name(&handle, &subnet);
                self.status(format!(
                    "WARNING: {h} now has a DIFFERENT KEY (a new device, or someone impersonating them); its messages are kept apart: /verify {h}"
                ));
            }
            MessengerEvent::PolicyDrop { handle, .. } => {
                let h = clean(handle.as_bytes());
                self.status(format!(
                    "a message from {h} was dropped: your group's rules do not allow it"
                ));
            }
            MessengerEvent::PolicyUpdated { version } => {
                self.status(format!("your admin updated the rules (version {version})"));
                self.refresh_groups().await;
            }
            MessengerEvent::Group(g) => {
                match &g {
                    GroupEvent::Joined { .. } => self.status("you were added to a group"),
                    GroupEvent::MemberAdded { member, .. } => {
                        let h =
                            display_name(member.credential.handle(), &member.credential.subnet());
                        self.status(format!("{h} joined a group"));
                    }
                    GroupEvent::Refused { handle, .. } => {
                        let h = clean(handle.as_bytes());
                        self.status(format!(
                            "a group with {h} was refused: your rules do not allow it"
                        ));
                    }
                    GroupEvent::Removed { .. } => self.status("you were removed from a group"),
                    GroupEvent::DuplicateHandle { new, existing, .. } => {
                        let h = display_name(new.credential.handle(), &new.credential.subnet());
                        let e = display_name(
                            existing.credential.handle(),
                            &existing.credential.subnet(),
                        );
                        self.status(format!(
                            "WARNING: {h} joined a group that has {e}: same name, different key; check with them in person"
                        ));
                    }
                    GroupEvent::KeyChanged { member, .. } => {
                        let h =
                            display_name(member.credential.handle(), &member.credential.subnet());
                        self.status(format!("{h}'s device key changed in a group"));
                    }
                    GroupEvent::OwnCommitLost { .. } => self.status(
                        "someone changed the group at the same time; repeat your last /invite",
                    ),
                    _ => {}
                }
                self.refresh_groups().await;
            }
            _ => {}
        }
    }

    fn on_tick(&mut self) {
        self.state.expire(unix_ms());
        let stats = self.handle.client().stats();
        self.state.apply(Update::Online(stats.connected));
        // Offline, the schedule still runs but its packets go nowhere: nothing "left".
        let waiting = if stats.connected {
            stats.core.queued_fragments
        } else {
            usize::MAX
        };
        for local_id in self.tracker.on_tick(waiting) {
            self.state.apply(Update::Delivery {
                local_id,
                delivery: Delivery::Sent,
            });
        }
    }

    /// Once a conversation with burn-on-read messages is on screen, they are deleted
    /// from the device (they stay on screen until the chat closes).
    async fn burn_if_seen(&mut self) {
        let Some(current) = self.state.current().map(|c| c.key.clone()) else {
            return;
        };
        if self.burn_pending.contains(&current) {
            let conv = current.clone();
            let burnt = self
                .handle
                .with(move |m, now| burn_conversation(m, &conv, now))
                .await;
            if burnt.is_ok() {
                self.burn_pending.retain(|c| *c != current);
            }
        }
    }
}

/// Deletes the burn-on-read messages of `conv` (now on screen) from the device; those
/// of other conversations stay until they are opened. Returns how many were burnt.
fn burn_conversation(m: &mut Messenger, conv: &ConvKey, now_ms: u64) -> usize {
    let c = match conv {
        ConvKey::Group(g) => Conversation::Group(g),
        ConvKey::Direct(label) => match contact_by_label(m, label) {
            Some(c) => Conversation::Direct(c.subnet, c.identity_key),
            None => return 0,
        },
    };
    m.read_conversation(c, now_ms)
        .iter()
        .filter(|s| s.burn_on_read)
        .count()
}

/// What a direct conversation is called: `handle@subnet`, and for a second key of a
/// pinned name (a key change or an impostor) that key's start too, so two keys never
/// share a conversation.
fn conv_label(c: &PinnedContact) -> String {
    match c.replaces {
        None => c.display(),
        Some(_) => format!(
            "{} (new key {})",
            c.display(),
            hex::encode(&c.identity_key.0[..4])
        ),
    }
}

type StoredLabel = String;

/// The conversation label of the sender (subnet, key).
fn label_of(m: &Messenger, subnet: &SubnetId, key: &Hex32) -> String {
    m.contact(subnet, key).map(conv_label).unwrap_or_else(|| {
        format!(
            "{} key {}",
            hex::encode(&subnet.0[..4]),
            hex::encode(&key.0[..4])
        )
    })
}

fn contact_by_label<'m>(m: &'m Messenger, label: &str) -> Option<&'m PinnedContact> {
    m.contacts().iter().find(|c| conv_label(c) == label)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::SigningKey;
    use shoal_client::group::GroupConfig;
    use shoal_client::messenger::MessengerConfig;
    use shoal_subnet::Policy;

    fn sent(what: OutgoingWhat, n: u8) -> EnvelopeSent {
        EnvelopeSent {
            what,
            message_id: [n; 16],
        }
    }

    #[test]
    fn tracker_maps_envelopes_in_order_and_acks_when_all_are_back() {
        let mut t = Tracker::default();
        t.expect(1, 2); // a group message to two others
        t.expect(2, 1); // a direct message
        // A commit from elsewhere is not ours.
        t.on_sent(sent(
            OutgoingWhat::Group(shoal_client::group::OutgoingKind::Commit),
            9,
        ));
        let app = OutgoingWhat::Group(shoal_client::group::OutgoingKind::Application);
        t.on_sent(sent(app, 1));
        t.on_sent(sent(app, 2));
        t.on_sent(sent(OutgoingWhat::Direct, 3));
        assert_eq!(t.on_acked(&[9; 16]), None);
        assert_eq!(t.on_acked(&[3; 16]), Some(2));
        assert_eq!(t.on_acked(&[1; 16]), None);
        // Not yet "sent" on the tick it was handed over, nor while fragments wait.
        assert!(t.on_tick(0).is_empty());
        assert!(t.on_tick(5).is_empty());
        assert_eq!(t.on_tick(0), vec![1]);
        assert!(t.on_tick(0).is_empty(), "reported once");
        assert_eq!(t.on_acked(&[2; 16]), Some(1));
        assert!(t.open.is_empty());
    }

    /// Two members of one subnet whose policy allows burn-on-read.
    fn two_members() -> (Messenger, Messenger) {
        use shoal_subnet::{BurnOnRead, CredentialBody, PolicyBody, RoleRule, SubnetAdmin};
        use shoal_topology::Hex32;
        let admin = SubnetAdmin::from_secret([7; 32]);
        let signed = admin
            .issue_policy(PolicyBody {
                subnet: admin.subnet(),
                version: 1,
                issued_at: 1000,
                roles: vec!["member".into()],
                rules: vec![RoleRule {
                    from: "member".into(),
                    to: "member".into(),
                }],
                federation: vec![],
                ttl_min_secs: 60,
                ttl_max_secs: 86_400,
                burn_on_read: BurnOnRead::Allowed,
                revoked_keys: vec![],
                revoked_handles: vec![],
            })
            .unwrap();
        let policy = Policy::verify(&signed.to_bytes(), &admin.subnet()).unwrap();
        let member = |handle: &str, seed: u8| {
            let secret = [seed; 32];
            let key = SigningKey::from_bytes(&secret);
            let cred = admin
                .issue_credential(CredentialBody {
                    subnet: admin.subnet(),
                    handle: handle.into(),
                    role: "member".into(),
                    signing_key: Hex32(key.verifying_key().to_bytes()),
                    seal_key: Hex32([0; 32]),
                    mailbox: Hex32([seed; 32]),
                    gateway: Hex32([9; 32]),
                    not_before: 1000,
                    not_after: 100_000,
                })
                .unwrap();
            let config = MessengerConfig {
                groups: GroupConfig {
                    commit_settle_ms: 1000,
                },
                ..MessengerConfig::default()
            };
            let own = shoal_client::Contact {
                mailbox: [seed; 32],
                gateway: [9; 32],
                public_key: x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from(
                    [seed; 32],
                ))
                .to_bytes(),
            };
            Messenger::new(secret, own, &cred, policy.clone(), config, NOW).unwrap()
        };
        (member("ana", 1), member("al", 2))
    }

    const NOW: u64 = 2_000_000;

    /// Hands everything `from` queued to `to`.
    fn deliver(from: &mut Messenger, to: &mut Messenger, now: u64) {
        while let Some(out) = from.poll_outgoing() {
            to.handle_incoming(&out.bytes, now);
        }
    }

    // Regression: opening one conversation used to burn every burn-on-read message in
    // the inbox, those of conversations never opened included.
    #[test]
    fn opening_a_conversation_burns_only_its_own_messages() {
        let (mut ana, mut al) = two_members();
        let g = ana.create_group(NOW).unwrap();
        let invite = al.invite().unwrap();
        ana.add_members(&g, &[invite], NOW).unwrap();
        ana.handle_timeout(NOW + 1000);
        deliver(&mut ana, &mut al, NOW + 1000);
        assert_eq!(al.groups().len(), 1, "al joined");
        let burn = MessageOptions {
            ttl_secs: 600,
            burn_on_read: true,
        };
        let al_card = al.card().clone();
        ana.send_direct(&al_card, burn, b"direct", NOW + 1000)
            .unwrap();
        ana.send_group(&g, burn, b"in the group", NOW + 1000)
            .unwrap();
        deliver(&mut ana, &mut al, NOW + 1000);
        assert_eq!(al.peek().len(), 2);

        let ana_label = label_of(&al, &ana.card().subnet(), &Hex32(ana.card().identity_key()));
        assert!(ana_label.starts_with("ana@"), "{ana_label}");
        let mut pending = vec![
            ConvKey::Direct(ana_label.clone()),
            ConvKey::Group(g.clone()),
        ];
        let open = ConvKey::Direct(ana_label);
        assert_eq!(burn_conversation(&mut al, &open, NOW + 2000), 1);
        pending.retain(|c| *c != open);
        assert_eq!(
            al.peek().len(),
            1,
            "the group's message is still on the device"
        );
        assert_eq!(al.peek()[0].body, b"in the group");
        assert_eq!(pending, vec![ConvKey::Group(g.clone())]);
        assert_eq!(
            burn_conversation(&mut al, &ConvKey::Group(g), NOW + 3000),
            1
        );
        assert!(al.peek().is_empty());
    }

    #[test]
    fn clean_strips_terminal_escapes() {
        assert_eq!(clean(b"hi\x1b[2Jthere\n"), "hi [2Jthere ");
        assert_eq!(clean(&[0xff, b'a']), "\u{fffd}a");
    }
}

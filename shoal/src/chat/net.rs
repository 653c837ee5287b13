//! The chat's driver: sets up the messenger, runs the client and the terminal, and
//! moves keys, messenger events and delivery receipts between them and the state.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use shoal_client::ClientStore;
use shoal_client::driver::{self, DriverEvent};
use shoal_client::group::{GroupError, GroupEvent};
use shoal_client::managed::{self, EnvelopeSent, ManagedHandle, unix_ms};
use shoal_client::messenger::{
    Conversation, Messenger, MessengerError, MessengerEvent, OwnMessage, OwnState, OwnTo,
    PinnedContact, SendId, SendTicket, display_name, invite_to_text,
};
use shoal_client::receipts::{self, Receipts};
use shoal_subnet::{MessageOptions, SubnetId};
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
                s = sent.recv() => if let Ok(s) = s { ui.on_envelope(s).await },
                d = raw.recv() => match d {
                    Ok(DriverEvent::Acked { message_id }) => {
                        let r = ui.tracker.on_acked(&message_id);
                        ui.on_receipt(r).await;
                    }
                    Ok(DriverEvent::Connected) => ui.state.apply(Update::Online(true)),
                    Ok(DriverEvent::Disconnected) => ui.state.apply(Update::Online(false)),
                    Ok(DriverEvent::Problem(p)) => ui.state.apply(Update::Status(p.to_string())),
                    _ => {}
                },
                _ = tick.tick() => {
                    ui.on_tick().await;
                    ui.flush_invites().await;
                    // `shoal client send` while the chat holds the store spools here.
                    for note in crate::client_cmd::drain_member_outbox(&ui.dir, handle).await {
                        ui.status(note);
                    }
                }
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

/// An own message on its way to the messenger (kept to retry a held one).
#[derive(Debug, Clone)]
struct Outbound {
    local_id: u64,
    to: ConvKey,
    body: String,
    options: MessageOptions,
}

/// Why the messenger did not take an own message.
enum NotTaken {
    /// The recipient's key is not one the user may write to yet (unknown, or an
    /// unaccepted key change): held until `/add` or `/accept`.
    Identity(String),
    /// Refused for good (policy, no such group, ...).
    Refused(MessengerError),
}

struct Ui<'a> {
    handle: &'a ManagedHandle,
    dir: PathBuf,
    file: ChatFile,
    state: ChatState,
    /// Receipts of own messages, by send id.
    tracker: Receipts,
    local_of: HashMap<SendId, u64>,
    /// Own messages held until their recipient's key is accepted.
    held: Vec<Outbound>,
    /// (group, handle) invites waiting for the group's current change to settle.
    queued_invites: Vec<(Vec<u8>, String)>,
    /// Conversations that received burn-on-read messages not yet burnt.
    burn_pending: Vec<ConvKey>,
    me: (String, shoal_subnet::SubnetId),
}

impl<'a> Ui<'a> {
    async fn new(handle: &'a ManagedHandle, dir: PathBuf, file: ChatFile) -> anyhow::Result<Self> {
        let (me, inbox, contacts, own) = handle
            .with(|m, _| {
                let c = m.credential();
                let own: Vec<(String, OwnMessage)> = m
                    .own_messages()
                    .iter()
                    .map(|o| {
                        let label = match &o.to {
                            OwnTo::Direct { subnet, key } => label_of(m, subnet, key),
                            OwnTo::Group(_) => String::new(),
                        };
                        (label, o.clone())
                    })
                    .collect();
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
                ((c.handle().to_string(), c.subnet()), inbox, contacts, own)
            })
            .await?;
        let mut ui = Ui {
            handle,
            dir,
            file,
            state: ChatState::new(clean(me.0.as_bytes())),
            tracker: Receipts::new(),
            local_of: HashMap::new(),
            held: Vec::new(),
            queued_invites: Vec::new(),
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
        // Received and own messages from before, in time order.
        let mut earlier: Vec<(u64, Update)> = Vec::new();
        for (label, m) in inbox {
            let conv = match m.group {
                Some(g) => ConvKey::Group(g),
                None => ConvKey::Direct(label.clone()),
            };
            if m.burn_on_read {
                ui.burn_pending.push(conv.clone());
            }
            earlier.push((
                m.received_unix_ms,
                Update::Received {
                    conv,
                    from: label,
                    body: clean(&m.body),
                    at_unix_ms: m.received_unix_ms,
                    expires_unix_ms: m.expires_unix_ms,
                    burn_on_read: m.burn_on_read,
                },
            ));
        }
        for (label, o) in own {
            let local_id = RESTORED_LOCAL_IDS + o.id.0;
            let conv = match o.to {
                OwnTo::Group(g) => ConvKey::Group(g),
                OwnTo::Direct { .. } => ConvKey::Direct(label),
            };
            let delivery = match o.state {
                OwnState::Queued => Delivery::Queued,
                OwnState::Sent => Delivery::Sent,
                OwnState::Delivered => Delivery::Acked,
                OwnState::Failed => Delivery::Failed,
            };
            // Receipts still to come find their message again.
            if matches!(o.state, OwnState::Queued | OwnState::Sent)
                && o.message_ids.len() == o.envelopes
            {
                ui.local_of.insert(o.id, local_id);
                ui.tracker.expect(SendTicket {
                    id: o.id,
                    envelopes: o.envelopes,
                });
                for id in &o.message_ids {
                    ui.tracker.on_envelope(o.id, Ok(*id));
                }
            }
            earlier.push((
                o.sent_unix_ms,
                Update::Own {
                    conv,
                    local_id,
                    body: clean(&o.body),
                    at_unix_ms: o.sent_unix_ms,
                    expires_unix_ms: o.expires_unix_ms,
                    delivery,
                },
            ));
        }
        earlier.sort_by_key(|(t, _)| *t);
        for (_, u) in earlier {
            ui.state.apply(u);
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
            Request::Remove { group, handle } => self.remove(group, handle).await,
            Request::Leave { group } => self.leave(group).await,
            Request::Rename { group, name } => self.rename(group, name),
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
        self.dispatch(Outbound {
            local_id,
            to,
            body,
            options,
        })
        .await
    }

    /// Hands one own message to the messenger. A direct message goes to the contact's
    /// pinned key: one first seen with their message (TOFU) or confirmed; to an
    /// unaccepted key change, or someone not in the contacts, it is held until `/accept`
    /// or `/add` sends it.
    async fn dispatch(&mut self, o: Outbound) -> anyhow::Result<()> {
        let (to, body, options) = (o.to.clone(), o.body.clone(), o.options);
        let result: Result<SendTicket, NotTaken> = self
            .handle
            .with(move |m, now| match to {
                ConvKey::Direct(label) if label == UNVERIFIED_LABEL => Err(NotTaken::Refused(
                    MessengerError::UnknownContact(
                        "plain messages carry no sender to answer".into(),
                    ),
                )),
                ConvKey::Direct(label) => {
                    let Some(c) = contact_by_label(m, &label) else {
                        return Err(NotTaken::Identity(format!(
                            "{label} is not in your contacts: /add their card"
                        )));
                    };
                    let (subnet, key) = (c.subnet, c.identity_key);
                    let card = m.reply_card(&subnet, &key).map_err(|_| {
                        NotTaken::Identity(format!(
                            "{label} has a key you have not accepted: /verify {label}, then /accept it"
                        ))
                    })?;
                    m.send_direct(&card, options, body.as_bytes(), now)
                        .map_err(NotTaken::Refused)
                }
                ConvKey::Group(g) => m
                    .send_group(&g, options, body.as_bytes(), now)
                    .map_err(NotTaken::Refused),
            })
            .await?;
        match result {
            Ok(ticket) => {
                self.local_of.insert(ticket.id, o.local_id);
                let r = self.tracker.expect(ticket);
                self.on_receipt(r).await;
                Ok(())
            }
            Err(NotTaken::Identity(why)) => {
                self.state.apply(Update::Delivery {
                    local_id: o.local_id,
                    delivery: Delivery::Held,
                });
                self.held.push(o);
                bail!("{why}; your message is kept and sent then")
            }
            Err(NotTaken::Refused(e)) => {
                self.fail(o.local_id);
                bail!("not sent: {e}")
            }
        }
    }

    /// Sends again the messages held for a key the user has now added or accepted (the
    /// others stay held).
    async fn retry_held(&mut self) {
        for o in std::mem::take(&mut self.held) {
            self.state.apply(Update::Retry {
                local_id: o.local_id,
            });
            // A message still held is back in `held`; its reason is not news.
            let _ = self.dispatch(o).await;
        }
    }

    async fn on_envelope(&mut self, s: EnvelopeSent) {
        if let Some(send) = s.send {
            let r = self.tracker.on_envelope(send, s.result);
            self.on_receipt(r).await;
        }
    }

    /// Shows what became of an own message, and keeps the mark with it.
    async fn on_receipt(&mut self, r: Option<(SendId, receipts::Delivery)>) {
        let Some((send, d)) = r else { return };
        let Some(&local_id) = self.local_of.get(&send) else {
            return;
        };
        let (delivery, kept) = match d {
            receipts::Delivery::Sent => (Delivery::Sent, OwnState::Sent),
            receipts::Delivery::Delivered => {
                self.local_of.remove(&send);
                (Delivery::Acked, OwnState::Delivered)
            }
            receipts::Delivery::Failed(why) => {
                self.local_of.remove(&send);
                self.status(format!("a message was not sent: {why}"));
                (Delivery::Failed, OwnState::Failed)
            }
        };
        self.state.apply(Update::Delivery { local_id, delivery });
        let _ = self
            .handle
            .with(move |m, _| m.note_own_state(send, kept))
            .await;
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
        self.retry_held().await;
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
        let group_id = group.clone();
        // The handle is resolved to one pinned key; only that key's cards are used.
        let done = self
            .handle
            .with(move |m, now| invite_for(m, &file, &h).map(|i| m.add_members(&group, &[i], now)))
            .await?;
        let shown = clean(handle.as_bytes());
        match done {
            Err(e) => bail!("cannot add {shown}: {e:#}"),
            Ok(Err(MessengerError::Group(GroupError::CommitPending))) => {
                // Another change of this group is settling: add them right after it.
                self.queued_invites.push((group_id, handle));
                self.status(format!(
                    "{shown} is queued: they are added when the group's current change has settled"
                ));
                Ok(())
            }
            Ok(Err(e)) => bail!("cannot add {shown}: {e}"),
            Ok(Ok(())) => {
                self.status(format!(
                    "adding {shown}: they join once the change has settled (the group list shows them then)"
                ));
                Ok(())
            }
        }
    }

    /// Adds the queued invites of groups whose change has settled, all of a group's in
    /// one change.
    async fn flush_invites(&mut self) {
        if self.queued_invites.is_empty() {
            return;
        }
        let queued = std::mem::take(&mut self.queued_invites);
        let file = self.file.clone();
        let (done, still): (Vec<String>, Vec<(Vec<u8>, String)>) = self
            .handle
            .with(move |m, now| {
                let mut done = Vec::new();
                let mut still = Vec::new();
                let mut groups: Vec<Vec<u8>> = queued.iter().map(|(g, _)| g.clone()).collect();
                groups.dedup();
                for g in groups {
                    let handles: Vec<String> = queued
                        .iter()
                        .filter(|(q, _)| *q == g)
                        .map(|(_, h)| h.clone())
                        .collect();
                    let settling = m
                        .groups()
                        .iter()
                        .find(|s| s.id == g)
                        .is_some_and(|s| s.settling_until_ms.is_some());
                    if settling {
                        still.extend(handles.into_iter().map(|h| (g.clone(), h)));
                        continue;
                    }
                    let invites: Vec<_> = handles
                        .iter()
                        .filter_map(|h| invite_for(m, &file, h).ok())
                        .collect();
                    match m.add_members(&g, &invites, now) {
                        Ok(()) => done.extend(handles),
                        Err(MessengerError::Group(GroupError::CommitPending)) => {
                            still.extend(handles.into_iter().map(|h| (g.clone(), h)))
                        }
                        Err(e) => done.push(format!("(not added: {e})")),
                    }
                }
                (done, still)
            })
            .await
            .unwrap_or_default();
        self.queued_invites.extend(still);
        if !done.is_empty() {
            let shown: Vec<String> = done.iter().map(|h| clean(h.as_bytes())).collect();
            self.status(format!(
                "adding {}: they join once the change has settled",
                shown.join(", ")
            ));
        }
    }

    async fn remove(&mut self, group: Vec<u8>, handle: String) -> anyhow::Result<()> {
        let h = handle.clone();
        self.handle
            .with(move |m, now| m.remove_member(&group, &h, now))
            .await??;
        self.status(format!(
            "removing {}: done once the change has settled",
            clean(handle.as_bytes())
        ));
        Ok(())
    }

    async fn leave(&mut self, group: Vec<u8>) -> anyhow::Result<()> {
        self.handle
            .with(move |m, now| m.leave(&group, now))
            .await??;
        self.status("asked to leave: the next change by another member takes you out");
        Ok(())
    }

    fn rename(&mut self, group: Vec<u8>, name: String) -> anyhow::Result<()> {
        let id = hex::encode(&group);
        self.file.groups.retain(|g| g.id != id);
        self.file.groups.push(SavedGroup {
            id,
            name: name.clone(),
        });
        self.file.save(&self.dir)?;
        self.state.name_group(group, name.clone());
        self.status(format!("the group is called {name} on this device"));
        Ok(())
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
        self.retry_held().await;
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
            MessengerEvent::Dropped { reason } => {
                self.status(format!(
                    "a message that failed its checks was dropped: {reason}"
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

    async fn on_tick(&mut self) {
        self.state.expire(unix_ms());
        let stats = self.handle.client().stats();
        self.state.apply(Update::Online(stats.connected));
        // Offline, the schedule still runs but its packets go nowhere: nothing "left".
        let idle = stats.connected && stats.core.queued_fragments == 0;
        for r in self.tracker.on_tick(idle) {
            self.on_receipt(Some(r)).await;
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

/// Local ids of own messages from before this session: the kept message's id plus
/// this, apart from the ids the state hands out.
const RESTORED_LOCAL_IDS: u64 = 1 << 62;

/// Where plain messages (from a client without a member card) are shown.
const UNVERIFIED_LABEL: &str = "unverified (no sender identity)";

/// The conversation label of the sender (subnet, key).
fn label_of(m: &Messenger, subnet: &SubnetId, key: &Hex32) -> String {
    if subnet.0 == [0; 32] && key.0 == [0; 32] {
        return UNVERIFIED_LABEL.to_string();
    }
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

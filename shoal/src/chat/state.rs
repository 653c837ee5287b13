//! The chat's UI state as a plain struct: key presses go through [`ChatState::on_key`]
//! (which may return a [`Request`] for the network side), network news through
//! [`ChatState::apply`], and the screen is drawn from the state alone
//! (`super::view`). No terminal, clock or socket here, so it is tested directly.

use std::collections::BTreeMap;

/// How long a message lives if the user does not say (one day).
pub const DEFAULT_TTL_SECS: u64 = 86_400;
/// Longest compose line kept (a pasted invite card is about 2 KB).
const MAX_INPUT: usize = 16 * 1024;
/// Messages kept on screen per conversation.
const MAX_SHOWN: usize = 500;

/// A conversation: an MLS group (by id) or one person (by handle).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum ConvKey {
    Group(Vec<u8>),
    Direct(String),
}

/// Delivery of one of this user's own messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Saved on this device, waiting for its turn in the steady send schedule.
    Queued,
    /// Left this device; no receipt yet.
    Sent,
    /// Every recipient's mailbox has it (the receipt came back).
    Acked,
    /// The app refused it (the reason is in the status line).
    Failed,
    /// Kept on this device until the user accepts the recipient's key (`/accept`) or
    /// adds their card (`/add`); then it is sent.
    Held,
}

impl Delivery {
    pub fn label(self) -> &'static str {
        match self {
            Delivery::Queued => "queued",
            Delivery::Sent => "sent",
            Delivery::Acked => "delivered",
            Delivery::Failed => "not sent",
            Delivery::Held => "held: /accept or /add them to send",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    pub from: String,
    pub body: String,
    pub at_unix_ms: u64,
    pub expires_unix_ms: u64,
    pub burn_on_read: bool,
    /// `Some` for this user's own messages: (local id, delivery).
    pub own: Option<(u64, Delivery)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conversation {
    pub key: ConvKey,
    pub title: String,
    /// Group members other than this user (empty for a direct conversation).
    pub members: Vec<String>,
    pub unread: usize,
    pub messages: Vec<ChatMessage>,
}

/// What the user asked for that needs the network side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Send {
        local_id: u64,
        to: ConvKey,
        body: String,
        ttl_secs: u64,
        burn_on_read: bool,
    },
    /// Save a contact from a pasted card.
    AddContact {
        card: String,
    },
    NewGroup {
        name: String,
    },
    /// Add a contact (by handle) to a group.
    Invite {
        group: Vec<u8>,
        handle: String,
    },
    /// Take a member out of a group.
    Remove {
        group: Vec<u8>,
        handle: String,
    },
    /// Ask to leave a group.
    Leave {
        group: Vec<u8>,
    },
    /// Give a group another (local) name.
    Rename {
        group: Vec<u8>,
        name: String,
    },
    /// Write this user's card to a file and say where.
    ShowCard,
    /// Show the safety number with the contact of a direct conversation (or `contact`).
    Verify {
        to: Option<ConvKey>,
        contact: String,
    },
    /// Accept a contact's key (a card that came over the network, or a changed key).
    Accept {
        contact: String,
    },
    Quit,
}

/// News from the network side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Update {
    Received {
        conv: ConvKey,
        from: String,
        body: String,
        at_unix_ms: u64,
        expires_unix_ms: u64,
        burn_on_read: bool,
    },
    /// A conversation exists (a contact, a group created or joined); members refreshed.
    Conversation {
        key: ConvKey,
        title: String,
        members: Vec<String>,
    },
    Delivery {
        local_id: u64,
        delivery: Delivery,
    },
    /// An own message from before this session (kept in the store).
    Own {
        conv: ConvKey,
        local_id: u64,
        body: String,
        at_unix_ms: u64,
        expires_unix_ms: u64,
        delivery: Delivery,
    },
    /// A held or failed own message is being sent again: back to queued.
    Retry {
        local_id: u64,
    },
    Online(bool),
    Status(String),
}

/// Keys the chat reacts to (mapped from terminal events by the driver).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Key {
    Char(char),
    /// Pasted text (bracketed paste), inserted as is.
    Paste(String),
    Enter,
    Backspace,
    Tab,
    BackTab,
    Up,
    Down,
    CtrlC,
}

/// Everything the screen shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatState {
    pub me: String,
    pub conversations: Vec<Conversation>,
    pub selected: usize,
    pub input: String,
    pub status: String,
    pub online: bool,
    pub ttl_secs: u64,
    pub burn_on_read: bool,
    pub quit: bool,
    next_local_id: u64,
    /// Group names this user gave, by group id.
    names: BTreeMap<Vec<u8>, String>,
}

pub const HELP: &str = "/add CARD · /group new NAME · /invite HANDLE · /members · /remove HANDLE · /leave · /rename NAME · /verify [HANDLE] · /accept HANDLE · /ttl SECS · /burn on|off · /card · /quit";

impl ChatState {
    pub fn new(me: String) -> Self {
        ChatState {
            me,
            conversations: Vec::new(),
            selected: 0,
            input: String::new(),
            status: format!("Welcome. {HELP}"),
            online: false,
            ttl_secs: DEFAULT_TTL_SECS,
            burn_on_read: false,
            quit: false,
            next_local_id: 1,
            names: BTreeMap::new(),
        }
    }

    pub fn current(&self) -> Option<&Conversation> {
        self.conversations.get(self.selected)
    }

    fn select(&mut self, i: usize) {
        self.selected = i;
        if let Some(c) = self.conversations.get_mut(i) {
            c.unread = 0;
        }
    }

    fn move_selection(&mut self, forward: bool) {
        let n = self.conversations.len();
        if n == 0 {
            return;
        }
        let i = if forward {
            (self.selected + 1) % n
        } else {
            (self.selected + n - 1) % n
        };
        self.select(i);
    }

    /// The reducer for key presses.
    pub fn on_key(&mut self, key: Key) -> Option<Request> {
        match key {
            Key::CtrlC => {
                self.quit = true;
                Some(Request::Quit)
            }
            Key::Tab | Key::Down => {
                self.move_selection(true);
                None
            }
            Key::BackTab | Key::Up => {
                self.move_selection(false);
                None
            }
            Key::Backspace => {
                self.input.pop();
                None
            }
            Key::Char(c) => {
                if !c.is_control() && self.input.len() < MAX_INPUT {
                    self.input.push(c);
                }
                None
            }
            Key::Paste(text) => {
                let room = MAX_INPUT.saturating_sub(self.input.len());
                self.input
                    .extend(text.chars().filter(|c| !c.is_control()).take(room));
                None
            }
            Key::Enter => {
                let line = std::mem::take(&mut self.input);
                self.submit(line.trim())
            }
        }
    }

    fn submit(&mut self, line: &str) -> Option<Request> {
        if line.is_empty() {
            return None;
        }
        let Some(cmd) = line.strip_prefix('/') else {
            return self.send(line);
        };
        let (word, rest) = cmd.split_once(' ').unwrap_or((cmd, ""));
        let rest = rest.trim();
        match word {
            "quit" | "q" => {
                self.quit = true;
                Some(Request::Quit)
            }
            "help" => {
                self.status = HELP.into();
                None
            }
            "card" => Some(Request::ShowCard),
            "verify" => Some(Request::Verify {
                to: self.current().map(|c| c.key.clone()),
                contact: rest.into(),
            }),
            "accept" if !rest.is_empty() => Some(Request::Accept {
                contact: rest.into(),
            }),
            "add" if !rest.is_empty() => Some(Request::AddContact { card: rest.into() }),
            "group" => match rest.split_once(' ') {
                Some(("new", name)) if !name.trim().is_empty() => Some(Request::NewGroup {
                    name: name.trim().into(),
                }),
                _ => self.say("usage: /group new NAME"),
            },
            "invite" if !rest.is_empty() => match self.current().map(|c| c.key.clone()) {
                Some(ConvKey::Group(group)) => Some(Request::Invite {
                    group,
                    handle: rest.into(),
                }),
                _ => self.say("open a group first (Tab), then /invite HANDLE"),
            },
            "members" => match self.current() {
                Some(c) if matches!(c.key, ConvKey::Group(_)) => {
                    let mut all = vec![format!("{} (you)", self.me)];
                    all.extend(c.members.iter().cloned());
                    let line = format!("{} members: {}", all.len(), all.join(", "));
                    self.say(&line)
                }
                _ => self.say("open a group first (Tab), then /members"),
            },
            "remove" | "leave" | "rename" => {
                let Some(ConvKey::Group(group)) = self.current().map(|c| c.key.clone()) else {
                    return self.say(&format!("open a group first (Tab), then /{word}"));
                };
                match word {
                    "remove" if !rest.is_empty() => Some(Request::Remove {
                        group,
                        handle: rest.into(),
                    }),
                    "leave" => Some(Request::Leave { group }),
                    "rename" if !rest.is_empty() => Some(Request::Rename {
                        group,
                        name: rest.into(),
                    }),
                    _ => self.say(&format!(
                        "usage: /{word} {}",
                        if word == "remove" { "HANDLE" } else { "NAME" }
                    )),
                }
            }
            "ttl" => match rest.parse::<u64>() {
                Ok(secs) if secs > 0 => {
                    self.ttl_secs = secs;
                    self.say(&format!(
                        "new messages are deleted {} after they arrive",
                        human_secs(secs)
                    ))
                }
                _ => self.say("usage: /ttl SECONDS (more than 0)"),
            },
            "burn" => match rest {
                "on" => {
                    self.burn_on_read = true;
                    self.say("new messages are deleted once read")
                }
                "off" => {
                    self.burn_on_read = false;
                    self.say("new messages are kept until their time runs out")
                }
                _ => self.say("usage: /burn on|off"),
            },
            _ => self.say(&format!("unknown command /{word}; {HELP}")),
        }
    }

    fn say(&mut self, s: &str) -> Option<Request> {
        self.status = s.into();
        None
    }

    /// A text line: shown at once as this user's message (queued), sent by the caller.
    fn send(&mut self, body: &str) -> Option<Request> {
        let Some(conv) = self.conversations.get_mut(self.selected) else {
            return self.say("no conversation yet: /add a contact or /group new NAME");
        };
        if matches!(conv.key, ConvKey::Group(_)) && conv.members.is_empty() {
            return self.say("nobody else is in this group yet: /invite HANDLE");
        }
        let local_id = self.next_local_id;
        self.next_local_id += 1;
        let to = conv.key.clone();
        push_capped(
            &mut conv.messages,
            ChatMessage {
                from: self.me.clone(),
                body: body.into(),
                // Filled in by the caller's clock (`stamp_own`), to keep this pure.
                at_unix_ms: 0,
                expires_unix_ms: u64::MAX,
                burn_on_read: self.burn_on_read,
                own: Some((local_id, Delivery::Queued)),
            },
        );
        Some(Request::Send {
            local_id,
            to,
            body: body.into(),
            ttl_secs: self.ttl_secs,
            burn_on_read: self.burn_on_read,
        })
    }

    /// Sets the time of an own message just sent (the reducer has no clock).
    pub fn stamp_own(&mut self, local_id: u64, now_unix_ms: u64, ttl_secs: u64) {
        for m in self
            .conversations
            .iter_mut()
            .flat_map(|c| c.messages.iter_mut())
        {
            if m.own.is_some_and(|(id, _)| id == local_id) {
                m.at_unix_ms = now_unix_ms;
                m.expires_unix_ms = now_unix_ms.saturating_add(ttl_secs.saturating_mul(1000));
            }
        }
    }

    /// Remembers the name this user gave a group (and shows it).
    pub fn name_group(&mut self, group: Vec<u8>, name: String) {
        if let Some(c) = self
            .conversations
            .iter_mut()
            .find(|c| c.key == ConvKey::Group(group.clone()))
        {
            c.title = name.clone();
        }
        self.names.insert(group, name);
    }

    /// Applies news from the network side.
    pub fn apply(&mut self, update: Update) {
        match update {
            Update::Received {
                conv,
                from,
                body,
                at_unix_ms,
                expires_unix_ms,
                burn_on_read,
            } => {
                let i = self.ensure(conv.clone(), default_title(&conv), Vec::new());
                let selected = i == self.selected;
                let c = &mut self.conversations[i];
                push_capped(
                    &mut c.messages,
                    ChatMessage {
                        from,
                        body,
                        at_unix_ms,
                        expires_unix_ms,
                        burn_on_read,
                        own: None,
                    },
                );
                if !selected {
                    c.unread += 1;
                }
            }
            Update::Conversation {
                key,
                title,
                members,
            } => {
                let title = match &key {
                    ConvKey::Group(id) => self.names.get(id).cloned().unwrap_or(title),
                    ConvKey::Direct(_) => title,
                };
                let i = self.ensure(key, title.clone(), members.clone());
                let c = &mut self.conversations[i];
                c.title = title;
                c.members = members;
            }
            Update::Delivery { local_id, delivery } => {
                for m in self
                    .conversations
                    .iter_mut()
                    .flat_map(|c| c.messages.iter_mut())
                {
                    if let Some((id, d)) = &mut m.own
                        && *id == local_id
                        && rank(delivery) > rank(*d)
                    {
                        *d = delivery;
                    }
                }
            }
            Update::Own {
                conv,
                local_id,
                body,
                at_unix_ms,
                expires_unix_ms,
                delivery,
            } => {
                let i = self.ensure(conv.clone(), default_title(&conv), Vec::new());
                let from = self.me.clone();
                push_capped(
                    &mut self.conversations[i].messages,
                    ChatMessage {
                        from,
                        body,
                        at_unix_ms,
                        expires_unix_ms,
                        burn_on_read: false,
                        own: Some((local_id, delivery)),
                    },
                );
            }
            Update::Retry { local_id } => {
                for m in self
                    .conversations
                    .iter_mut()
                    .flat_map(|c| c.messages.iter_mut())
                {
                    if let Some((id, d)) = &mut m.own
                        && *id == local_id
                    {
                        *d = Delivery::Queued;
                    }
                }
            }
            Update::Online(online) => self.online = online,
            Update::Status(s) => self.status = s,
        }
    }

    /// Index of the conversation `key`, created (at the end) if new.
    fn ensure(&mut self, key: ConvKey, title: String, members: Vec<String>) -> usize {
        if let Some(i) = self.conversations.iter().position(|c| c.key == key) {
            return i;
        }
        self.conversations.push(Conversation {
            key,
            title,
            members,
            unread: 0,
            messages: Vec::new(),
        });
        self.conversations.len() - 1
    }

    /// Selects a conversation by key (after creating a group, say).
    pub fn focus(&mut self, key: &ConvKey) {
        if let Some(i) = self.conversations.iter().position(|c| &c.key == key) {
            self.select(i);
        }
    }

    /// Drops messages whose time ran out, own ones included.
    pub fn expire(&mut self, now_unix_ms: u64) {
        for c in &mut self.conversations {
            c.messages.retain(|m| m.expires_unix_ms > now_unix_ms);
        }
    }
}

fn rank(d: Delivery) -> u8 {
    match d {
        Delivery::Queued => 0,
        Delivery::Sent => 1,
        Delivery::Acked => 2,
        Delivery::Failed => 3,
        // Left only by a retry (`Update::Retry`).
        Delivery::Held => 4,
    }
}

fn push_capped(v: &mut Vec<ChatMessage>, m: ChatMessage) {
    v.push(m);
    if v.len() > MAX_SHOWN {
        v.remove(0);
    }
}

pub fn default_title(key: &ConvKey) -> String {
    match key {
        ConvKey::Direct(h) => h.clone(),
        ConvKey::Group(id) => format!("group {}", hex::encode(&id[..id.len().min(4)])),
    }
}

/// "30s", "5m", "2h", "1d": for TTL marks.
pub fn human_secs(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn typed(s: &mut ChatState, text: &str) -> Option<Request> {
        for c in text.chars() {
            assert_eq!(s.on_key(Key::Char(c)), None);
        }
        s.on_key(Key::Enter)
    }

    fn with_two() -> ChatState {
        let mut s = ChatState::new("alice".into());
        s.apply(Update::Conversation {
            key: ConvKey::Direct("bob".into()),
            title: "bob".into(),
            members: vec![],
        });
        s.apply(Update::Conversation {
            key: ConvKey::Group(vec![1, 2, 3, 4, 5]),
            title: "group".into(),
            members: vec!["bob".into()],
        });
        s
    }

    #[test]
    fn enter_sends_to_the_open_conversation_and_shows_it_queued() {
        let mut s = with_two();
        let r = typed(&mut s, "  hello bob ");
        assert_eq!(
            r,
            Some(Request::Send {
                local_id: 1,
                to: ConvKey::Direct("bob".into()),
                body: "hello bob".into(),
                ttl_secs: DEFAULT_TTL_SECS,
                burn_on_read: false,
            })
        );
        assert!(s.input.is_empty());
        let m = &s.conversations[0].messages[0];
        assert_eq!(m.own, Some((1, Delivery::Queued)));
        s.stamp_own(1, 1_000, 10);
        assert_eq!(s.conversations[0].messages[0].expires_unix_ms, 11_000);
    }

    #[test]
    fn held_messages_go_back_to_queued_on_retry_and_kept_ones_show() {
        let mut s = with_two();
        assert!(typed(&mut s, "hi").is_some());
        let held = |s: &ChatState| s.conversations[0].messages[0].own.map(|o| o.1);
        s.apply(Update::Delivery {
            local_id: 1,
            delivery: Delivery::Held,
        });
        assert_eq!(held(&s), Some(Delivery::Held));
        s.apply(Update::Delivery {
            local_id: 1,
            delivery: Delivery::Sent,
        });
        assert_eq!(held(&s), Some(Delivery::Held), "only a retry leaves held");
        s.apply(Update::Retry { local_id: 1 });
        assert_eq!(held(&s), Some(Delivery::Queued));
        s.apply(Update::Own {
            conv: ConvKey::Direct("bob".into()),
            local_id: 1 << 62,
            body: "from before".into(),
            at_unix_ms: 5,
            expires_unix_ms: 10,
            delivery: Delivery::Acked,
        });
        let m = &s.conversations[0].messages[1];
        assert_eq!((m.from.as_str(), m.body.as_str()), ("alice", "from before"));
        assert_eq!(m.own, Some((1 << 62, Delivery::Acked)));
    }

    #[test]
    fn group_commands_need_an_open_group() {
        let mut s = with_two();
        assert_eq!(typed(&mut s, "/leave"), None);
        assert!(s.status.contains("open a group first"), "{}", s.status);
        s.on_key(Key::Tab);
        assert_eq!(typed(&mut s, "/members"), None);
        assert_eq!(s.status, "2 members: alice (you), bob");
        assert_eq!(
            typed(&mut s, "/remove bob"),
            Some(Request::Remove {
                group: vec![1, 2, 3, 4, 5],
                handle: "bob".into()
            })
        );
        assert_eq!(
            typed(&mut s, "/leave"),
            Some(Request::Leave {
                group: vec![1, 2, 3, 4, 5]
            })
        );
        assert_eq!(
            typed(&mut s, "/rename book club"),
            Some(Request::Rename {
                group: vec![1, 2, 3, 4, 5],
                name: "book club".into()
            })
        );
        s.name_group(vec![1, 2, 3, 4, 5], "book club".into());
        assert_eq!(s.conversations[1].title, "book club");
    }

    #[test]
    fn delivery_only_moves_forward() {
        let mut s = with_two();
        typed(&mut s, "x");
        s.apply(Update::Delivery {
            local_id: 1,
            delivery: Delivery::Acked,
        });
        s.apply(Update::Delivery {
            local_id: 1,
            delivery: Delivery::Sent,
        });
        assert_eq!(
            s.conversations[0].messages[0].own,
            Some((1, Delivery::Acked))
        );
    }

    #[test]
    fn unread_counts_rise_elsewhere_and_clear_on_switch() {
        let mut s = with_two();
        let group = ConvKey::Group(vec![1, 2, 3, 4, 5]);
        for i in 0..3 {
            s.apply(Update::Received {
                conv: group.clone(),
                from: "bob".into(),
                body: format!("m{i}"),
                at_unix_ms: 5,
                expires_unix_ms: 100,
                burn_on_read: false,
            });
        }
        assert_eq!(s.conversations[1].unread, 3);
        assert_eq!(s.on_key(Key::Tab), None);
        assert_eq!(s.selected, 1);
        assert_eq!(s.conversations[1].unread, 0);
        // Into the open conversation: nothing unread.
        s.apply(Update::Received {
            conv: group,
            from: "bob".into(),
            body: "seen".into(),
            at_unix_ms: 6,
            expires_unix_ms: 100,
            burn_on_read: true,
        });
        assert_eq!(s.conversations[1].unread, 0);
        assert!(s.conversations[1].messages[3].burn_on_read);
        // Wraps around both ways.
        s.on_key(Key::Tab);
        assert_eq!(s.selected, 0);
        s.on_key(Key::Up);
        assert_eq!(s.selected, 1);
        s.expire(100);
        assert!(s.conversations[1].messages.is_empty());
    }

    #[test]
    fn a_message_from_someone_new_opens_a_conversation() {
        let mut s = ChatState::new("alice".into());
        s.apply(Update::Received {
            conv: ConvKey::Direct("carol".into()),
            from: "carol".into(),
            body: "hi".into(),
            at_unix_ms: 1,
            expires_unix_ms: 2,
            burn_on_read: false,
        });
        assert_eq!(s.conversations.len(), 1);
        assert_eq!(s.conversations[0].title, "carol");
        // It is the selected one (the only one), so not unread.
        assert_eq!(s.conversations[0].unread, 0);
    }

    #[test]
    fn commands() {
        let mut s = with_two();
        assert_eq!(
            typed(&mut s, "/group new  friends "),
            Some(Request::NewGroup {
                name: "friends".into()
            })
        );
        assert_eq!(typed(&mut s, "/group"), None);
        assert!(s.status.contains("usage"));
        // /invite needs a group open.
        assert_eq!(typed(&mut s, "/invite bob"), None);
        s.on_key(Key::Tab);
        assert_eq!(
            typed(&mut s, "/invite bob"),
            Some(Request::Invite {
                group: vec![1, 2, 3, 4, 5],
                handle: "bob".into()
            })
        );
        assert_eq!(typed(&mut s, "/ttl 0"), None);
        assert_eq!(s.ttl_secs, DEFAULT_TTL_SECS);
        typed(&mut s, "/ttl 60");
        typed(&mut s, "/burn on");
        assert!(s.burn_on_read);
        assert!(matches!(
            typed(&mut s, "hi"),
            Some(Request::Send {
                ttl_secs: 60,
                burn_on_read: true,
                ..
            })
        ));
        assert_eq!(typed(&mut s, "/card"), Some(Request::ShowCard));
        assert_eq!(
            typed(&mut s, "/accept bob@ab12"),
            Some(Request::Accept {
                contact: "bob@ab12".into()
            })
        );
        assert!(matches!(
            typed(&mut s, "/verify bob"),
            Some(Request::Verify { contact, .. }) if contact == "bob"
        ));
        assert_eq!(typed(&mut s, "/nope"), None);
        assert!(s.status.contains("unknown command"));
        s.on_key(Key::Paste("/add shoal-invite1:abc\n".into()));
        assert_eq!(
            s.on_key(Key::Enter),
            Some(Request::AddContact {
                card: "shoal-invite1:abc".into()
            })
        );
        assert_eq!(typed(&mut s, "/quit"), Some(Request::Quit));
        assert!(s.quit);
    }

    #[test]
    fn sending_needs_somewhere_to_send() {
        let mut s = ChatState::new("alice".into());
        assert_eq!(typed(&mut s, "hello"), None);
        assert!(s.status.contains("no conversation"));
        s.apply(Update::Conversation {
            key: ConvKey::Group(vec![9]),
            title: "g".into(),
            members: vec![],
        });
        assert_eq!(typed(&mut s, "hello"), None);
        assert!(s.status.contains("nobody else"));
        assert!(s.conversations[0].messages.is_empty());
    }

    #[test]
    fn named_groups_keep_their_name() {
        let mut s = ChatState::new("alice".into());
        s.name_group(vec![7], "friends".into());
        s.apply(Update::Conversation {
            key: ConvKey::Group(vec![7]),
            title: "group 07".into(),
            members: vec!["bob".into()],
        });
        assert_eq!(s.conversations[0].title, "friends");
        assert_eq!(s.conversations[0].members, vec!["bob".to_string()]);
    }

    #[test]
    fn ctrl_c_quits_and_input_is_bounded() {
        let mut s = ChatState::new("a".into());
        s.on_key(Key::Paste("x".repeat(MAX_INPUT + 10)));
        assert_eq!(s.input.len(), MAX_INPUT);
        s.on_key(Key::Backspace);
        assert_eq!(s.input.len(), MAX_INPUT - 1);
        assert_eq!(s.on_key(Key::CtrlC), Some(Request::Quit));
        assert!(s.quit);
        assert_eq!(human_secs(90), "90s");
        assert_eq!(human_secs(3600), "60m");
        assert_eq!(human_secs(86_400), "24h");
        assert_eq!(human_secs(7 * 86_400), "7d");
    }
}

//! What the chat and `shoal client group ...` share: the member's messenger (made from
//! the admin's files on first use, then kept in the store), `chat.json` (membership
//! cards of contacts, names of groups) and how a group or contact is looked up by what
//! a person types.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use ed25519_dalek::SigningKey;
use serde::{Deserialize, Serialize};
use shoal_client::group::{GroupConfig, GroupId};
use shoal_client::managed::unix_ms;
use shoal_client::messenger::{GroupSummary, Invite, Messenger, MessengerConfig, invite_from_text};
use shoal_client::{ClientStore, Contact};
use shoal_subnet::{MemberCard, Policy, UncheckedCredential};
use shoal_topology::Hex32;

const CHAT_FILE: &str = "chat.json";

/// `chat.json`: contacts (their pasted cards, one per (subnet, identity key)) and group
/// names.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ChatFile {
    pub contacts: Vec<SavedContact>,
    pub groups: Vec<SavedGroup>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SavedContact {
    pub handle: String,
    pub card: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SavedGroup {
    pub id: String,
    pub name: String,
}

impl ChatFile {
    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        let path = dir.join(CHAT_FILE);
        match std::fs::read(&path) {
            Ok(b) => {
                serde_json::from_slice(&b).with_context(|| format!("{} is damaged", path.display()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ChatFile::default()),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
        }
    }

    pub fn save(&self, dir: &Path) -> anyhow::Result<()> {
        write_private(&dir.join(CHAT_FILE), &serde_json::to_vec_pretty(self)?)
    }

    /// The saved card of the member with this (subnet, identity key): never looked up
    /// by handle, which another subnet (or a rogue admin) can reuse.
    pub fn contact_by_key(&self, subnet: &Hex32, key: &Hex32) -> Option<&SavedContact> {
        self.contacts.iter().find(|c| {
            card_credential(&c.card)
                .is_ok_and(|(_, m)| m.subnet() == *subnet && m.identity_key() == key.0)
        })
    }

    /// Saves (or replaces) the card of the member it names (same subnet and key).
    pub fn put_contact(&mut self, card: &MemberCard, text: &str) {
        self.contacts.retain(|c| {
            !card_credential(&c.card).is_ok_and(|(_, m)| {
                m.subnet() == card.subnet() && m.identity_key() == card.identity_key()
            })
        });
        self.contacts.push(SavedContact {
            handle: card.handle().to_string(),
            card: text.trim().to_string(),
        });
    }

    /// The name this user gave `group`, if any.
    pub fn group_name(&self, group: &[u8]) -> Option<&str> {
        let id = hex::encode(group);
        self.groups
            .iter()
            .find(|g| g.id == id)
            .map(|g| g.name.as_str())
    }

    /// What the CLI calls `group`: its name, or the start of its id (8 hex digits,
    /// which [`Self::find_group`] takes back).
    pub fn group_label(&self, group: &[u8]) -> String {
        match self.group_name(group) {
            Some(n) => n.to_string(),
            None => hex::encode(&group[..group.len().min(4)]),
        }
    }

    /// The group `query` names among `groups` (this member's): a name given with
    /// `group create`, or its id in hex, whole or its start (8 digits are shown).
    pub fn find_group(&self, groups: &[GroupSummary], query: &str) -> anyhow::Result<GroupId> {
        let query = query.trim();
        if let Some(g) = self.groups.iter().find(|g| g.name == query) {
            let id = hex::decode(&g.id).unwrap_or_default();
            if groups.iter().any(|s| s.id == id) {
                return Ok(id);
            }
            bail!("you are no longer in group {query:?} (removed, or you left it)");
        }
        let q = query
            .strip_prefix("group ")
            .unwrap_or(query)
            .to_ascii_lowercase();
        if q.len() >= 4 && q.chars().all(|c| c.is_ascii_hexdigit()) {
            let hits: Vec<&GroupSummary> = groups
                .iter()
                .filter(|s| hex::encode(&s.id).starts_with(&q))
                .collect();
            match hits.as_slice() {
                [one] => return Ok(one.id.clone()),
                [] => {}
                _ => bail!("{query:?} matches more than one group; give more of its id"),
            }
        }
        bail!(
            "no group {query:?}: give a name from `shoal client group list` or the start of its id"
        )
    }
}

/// Writes `bytes` readable by this user only, replacing the file atomically and
/// durably (the relay keystore's write; its temporary file is hidden, so a reader
/// scanning the directory, like the running client's outbox, never takes it for one of
/// its files).
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    // A bare file name has an empty parent, which the keystore cannot sync.
    let path = if path.parent() == Some(Path::new("")) {
        Path::new(".").join(path)
    } else {
        path.to_owned()
    };
    shoal_relay::keystore::write_private(&path, bytes, false)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// The member card inside a card text (an invite text): the admin's signature on the
/// credential and the member's own on its address binding checked.
pub(crate) fn card_credential(card: &str) -> anyhow::Result<(Invite, MemberCard)> {
    if card.trim().starts_with(shoal_client::contact::CARD_PREFIX) {
        bail!(
            "this is a plain card (shoal1:), which carries no signed identity: ask for their member card (/card in their chat, or `shoal client contact show`), which starts with shoal-invite1:"
        );
    }
    let invite = invite_from_text(card).map_err(|e| anyhow::anyhow!("not a contact card: {e}"))?;
    let member = MemberCard::parse(&invite.card)
        .map_err(|e| anyhow::anyhow!("the card does not check: {e}"))?;
    Ok((invite, member))
}

/// Untrusted text made safe for a terminal: no control characters (escape sequences)
/// nor bidi overrides.
pub(crate) fn clean(bytes: &[u8]) -> String {
    shoal_client::messenger::terminal_safe(&String::from_utf8_lossy(bytes))
}

/// The admin's files a member starts from (read on first use only).
#[derive(Debug, Clone)]
pub(crate) struct MemberFiles {
    /// Default DIR/credential.
    pub credential: Option<PathBuf>,
    /// Default DIR/policy.
    pub policy: Option<PathBuf>,
    pub commit_settle_secs: u64,
}

/// The messenger kept in the store, or a new one from the admin's files (first use).
pub(crate) fn open_messenger(
    dir: &Path,
    files: &MemberFiles,
    store: &ClientStore,
    own: Contact,
) -> anyhow::Result<Messenger> {
    let now = unix_ms();
    if let Some(snapshot) = store.load_messenger()? {
        return Messenger::restore(&snapshot, now).context("cannot restore the member state");
    }
    let cred_path = files
        .credential
        .clone()
        .unwrap_or_else(|| dir.join("credential"));
    let policy_path = files.policy.clone().unwrap_or_else(|| dir.join("policy"));
    let read = |p: &PathBuf, what: &str| {
        std::fs::read(p).with_context(|| {
            format!(
                "cannot read your {what} file {}: on first use Shoal needs the membership \
                 files your subnet's admin gave you (--credential, --policy)",
                p.display()
            )
        })
    };
    let cred = UncheckedCredential::parse(&read(&cred_path, "credential")?)
        .and_then(UncheckedCredential::check_signature)
        .and_then(|c| c.check_valid_at(now / 1000))
        .context("your membership credential")?;
    let signing = identity_key(store)?;
    if cred.signing_key() != signing.verifying_key().to_bytes() {
        bail!(
            "this credential names another key than this client's identity key {}; give your admin the `identity key:` line `shoal client init` printed (never the account key: that one is your gateway's to see)",
            hex::encode(signing.verifying_key().to_bytes())
        );
    }
    // The admin records the member's gateway in the credential; it must be the one this
    // client chose by the public rule (`client init`), which the running client checks
    // against every directory. A credential naming another is an admin picking it.
    if cred.body().gateway.0 != own.gateway {
        bail!(
            "this credential names another gateway than the one your client uses (the rule's choice for your key): ask your admin to enrol you at the gateway `shoal client init` printed"
        );
    }
    let policy = Policy::verify(&read(&policy_path, "policy")?, &cred.subnet())
        .context("your subnet's policy")?;
    let config = MessengerConfig {
        groups: GroupConfig {
            commit_settle_ms: files.commit_settle_secs.saturating_mul(1000),
        },
        ..MessengerConfig::default()
    };
    let m = Messenger::new(signing.to_bytes(), own, cred.signed(), policy, config, now)
        .context("your membership credential is not for this client")?;
    store.save_messenger(&m.snapshot()?, &[])?;
    Ok(m)
}

/// The member's identity key from `store`. A client made before keys were separate has
/// none: it gets its own now (its admin must enrol it; the account key stays the link's).
fn identity_key(store: &ClientStore) -> anyhow::Result<SigningKey> {
    if let Some(k) = store.load_signing_key()? {
        return Ok(SigningKey::from_bytes(&k));
    }
    let k = SigningKey::generate(&mut rand::rng());
    store.save_signing_key(&k.to_bytes())?;
    Ok(k)
}

/// The invite to add the contact `query` names (`handle` or `handle@subnet`) with. The
/// name is resolved to one pinned identity key first; then the newest network invite
/// *from that key* (only if the user confirmed the key) is fresher than the saved card
/// (each card brings its owner into one group). A look-alike's invite, from another
/// key, is never chosen.
pub(crate) fn invite_for(m: &Messenger, file: &ChatFile, query: &str) -> anyhow::Result<Invite> {
    let c = m.find_contact(query)?;
    if let Some(i) = m.invite_from(&c.subnet, &c.identity_key) {
        return Ok(i);
    }
    if let Some(saved) = file.contact_by_key(&c.subnet, &c.identity_key) {
        return Ok(card_credential(&saved.card)?.0);
    }
    if !c.confirmed {
        bail!(
            "{} sent a card but is not a confirmed contact: compare safety numbers ({}), then accept it",
            c.display(),
            m.safety_number_with(&c.identity_key)
        );
    }
    bail!("no card for {}: ask them for their card", c.display())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(id: Vec<u8>) -> GroupSummary {
        GroupSummary {
            id,
            epoch: 1,
            members: vec![],
            settling_until_ms: None,
            leaving: false,
        }
    }

    /// A credential naming the account (link) key, or any key but this client's
    /// identity key, is refused: the member signs only with a key its gateway never sees.
    #[test]
    fn a_credential_must_name_the_identity_key_not_the_account_key() {
        use shoal_subnet::{BurnOnRead, CredentialBody, PolicyBody, RoleRule, SubnetAdmin};
        let dir = tempfile::tempdir().unwrap();
        let store = ClientStore::in_memory().unwrap();
        let keys = shoal_client::MemberKeys::generate(&mut rand::rng(), [9; 32]);
        keys.save(&store).unwrap();
        let admin = SubnetAdmin::from_secret([0xad; 32]);
        let policy = admin
            .issue_policy(PolicyBody {
                subnet: admin.subnet(),
                version: 1,
                issued_at: 0,
                roles: vec!["member".into()],
                rules: vec![RoleRule {
                    from: "member".into(),
                    to: "member".into(),
                }],
                federation: vec![],
                ttl_min_secs: 0,
                ttl_max_secs: 3600,
                burn_on_read: BurnOnRead::Allowed,
                revoked_keys: vec![],
                revoked_handles: vec![],
            })
            .unwrap();
        std::fs::write(dir.path().join("policy"), policy.to_bytes()).unwrap();
        let now = unix_ms() / 1000;
        let credential = |key: [u8; 32]| {
            admin
                .issue_credential(CredentialBody {
                    subnet: admin.subnet(),
                    handle: "ana".into(),
                    role: "member".into(),
                    signing_key: shoal_topology::Hex32(key),
                    seal_key: shoal_topology::Hex32([0; 32]),
                    mailbox: shoal_topology::Hex32([0; 32]),
                    // The gateway the keys were made for: only the key is under test.
                    gateway: shoal_topology::Hex32([9; 32]),
                    not_before: now - 60,
                    not_after: now + 3600,
                })
                .unwrap()
                .to_bytes()
        };
        let files = MemberFiles {
            credential: None,
            policy: None,
            commit_settle_secs: 1,
        };
        std::fs::write(
            dir.path().join("credential"),
            credential(keys.account_key()),
        )
        .unwrap();
        let Err(err) = open_messenger(dir.path(), &files, &store, keys.identity.contact()) else {
            panic!("a credential for the account key is refused");
        };
        let err = err.to_string();
        assert!(err.contains("identity key"), "{err}");
        std::fs::write(
            dir.path().join("credential"),
            credential(keys.identity_key()),
        )
        .unwrap();
        let m = open_messenger(dir.path(), &files, &store, keys.identity.contact()).unwrap();
        assert_eq!(m.card().identity_key(), keys.identity_key());
    }

    #[test]
    fn groups_are_found_by_name_or_id_start() {
        let mut file = ChatFile::default();
        file.groups.push(SavedGroup {
            id: "aabbccdd01".into(),
            name: "friends".into(),
        });
        file.groups.push(SavedGroup {
            id: "0000000000".into(),
            name: "old".into(),
        });
        let groups = [
            summary(vec![0xaa, 0xbb, 0xcc, 0xdd, 0x01]),
            summary(vec![0xaa, 0xbb, 0xcc, 0xee, 0x02]),
        ];
        assert_eq!(file.find_group(&groups, "friends").unwrap(), groups[0].id);
        assert_eq!(file.find_group(&groups, "aabbccee").unwrap(), groups[1].id);
        assert_eq!(
            file.find_group(&groups, "group AABBCCEE").unwrap(),
            groups[1].id
        );
        let e = file.find_group(&groups, "aabbcc").unwrap_err().to_string();
        assert!(e.contains("more than one"), "{e}");
        let e = file.find_group(&groups, "nobody").unwrap_err().to_string();
        assert!(e.contains("no group \"nobody\""), "{e}");
        let e = file.find_group(&groups, "old").unwrap_err().to_string();
        assert!(e.contains("no longer in group"), "{e}");
        assert_eq!(file.group_label(&groups[1].id), "aabbccee");
        assert_eq!(file.group_label(&groups[0].id), "friends");
    }
}

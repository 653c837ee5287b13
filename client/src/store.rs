//! The client's durable store on redb: identity, the core's snapshot, contacts, and the
//! messenger's state (groups, policy, inbox with TTLs).
//!
//! Each write is one redb transaction, committed durably (fsync) before returning. The
//! driver saves a snapshot after `send_message` (before telling the user the message is
//! queued) and after events that change it (acks, completed messages).
//!
//! The identity's secret key is stored as is: protecting the file (disk encryption,
//! OS keystore) is the platform's job for now.

use std::path::Path;

use redb::backends::InMemoryBackend;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use shoal_packet::{BodyKind, Fragment, FragmentHeader, MessageId};

use crate::contact::ContactCard;
use crate::core::{ClientError, ClientSnapshot, Identity, PartialOp};
use crate::messenger::MessengerSnapshot;

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const CONTACTS: TableDefinition<&str, &str> = TableDefinition::new("contacts");
/// Received messages by message id (so storing one twice is harmless); values are JSON
/// [`ReceivedMessage`]s.
const INBOX: TableDefinition<&[u8], &[u8]> = TableDefinition::new("inbox");
/// Fragments of incomplete incoming messages, by message id and index (18 bytes);
/// values are the fragment count (2 bytes, big-endian) and the data.
const PARTIALS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("partials");
const SCHEMA_VERSION: u32 = 1;
/// The messenger's MLS state (secret keys included) and the rest of its state.
const MESSENGER_GROUPS: &str = "messenger.groups";
const MESSENGER_STATE: &str = "messenger.state";

fn store_err(op: &'static str) -> impl FnOnce(redb::Error) -> ClientError {
    move |e| ClientError::Store {
        op,
        reason: e.to_string(),
    }
}

/// A message as kept in the inbox.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReceivedMessage {
    pub message_id: MessageId,
    /// Wall-clock milliseconds since the Unix epoch when it was stored.
    pub received_unix_ms: u64,
    pub bytes: Vec<u8>,
}

impl std::fmt::Debug for ReceivedMessage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Message bodies are user data.
        f.debug_struct("ReceivedMessage")
            .field("len", &self.bytes.len())
            .finish_non_exhaustive()
    }
}

/// A client's local database.
pub struct ClientStore {
    db: Database,
}

impl std::fmt::Debug for ClientStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientStore(..)")
    }
}

/// The store holds the identity's secrets: create it (or tighten it) owner-only, before
/// redb writes anything into it. redb takes an empty file as a new database.
fn restrict_to_owner(path: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

impl ClientStore {
    /// Opens (or creates) the store at `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, ClientError> {
        let path = path.as_ref();
        restrict_to_owner(path).map_err(|e| store_err("create")(e.into()))?;
        let db = Database::create(path).map_err(|e| store_err("open")(e.into()))?;
        Self::init(db)
    }

    /// A store that lives in memory, for tests and simulations.
    pub fn in_memory() -> Result<Self, ClientError> {
        let db = Database::builder()
            .create_with_backend(InMemoryBackend::new())
            .map_err(|e| store_err("open")(e.into()))?;
        Self::init(db)
    }

    fn init(db: Database) -> Result<Self, ClientError> {
        let txn = db
            .begin_write()
            .map_err(|e| store_err("begin write")(e.into()))?;
        {
            let mut meta = txn
                .open_table(META)
                .map_err(|e| store_err("open meta")(e.into()))?;
            let version = meta
                .get("version")
                .map_err(|e| store_err("read meta")(e.into()))?
                .map(|v| v.value().to_vec());
            match version {
                None => {
                    meta.insert("version", SCHEMA_VERSION.to_be_bytes().as_slice())
                        .map_err(|e| store_err("write meta")(e.into()))?;
                }
                Some(v) if v == SCHEMA_VERSION.to_be_bytes() => {}
                Some(_) => return Err(ClientError::Corrupt("store schema version")),
            }
            txn.open_table(CONTACTS)
                .map_err(|e| store_err("open contacts")(e.into()))?;
            txn.open_table(INBOX)
                .map_err(|e| store_err("open inbox")(e.into()))?;
            txn.open_table(PARTIALS)
                .map_err(|e| store_err("open partials")(e.into()))?;
        }
        txn.commit().map_err(|e| store_err("commit")(e.into()))?;
        Ok(ClientStore { db })
    }

    fn put<T: Serialize>(&self, key: &str, value: &T) -> Result<(), ClientError> {
        let bytes = serde_json::to_vec(value)
            .map_err(|_| ClientError::Internal("serialize store value"))?;
        let txn = self
            .db
            .begin_write()
            .map_err(|e| store_err("begin write")(e.into()))?;
        {
            let mut meta = txn
                .open_table(META)
                .map_err(|e| store_err("open meta")(e.into()))?;
            meta.insert(key, bytes.as_slice())
                .map_err(|e| store_err("write meta")(e.into()))?;
        }
        txn.commit().map_err(|e| store_err("commit")(e.into()))
    }

    fn get<T: DeserializeOwned>(&self, key: &'static str) -> Result<Option<T>, ClientError> {
        let txn = self
            .db
            .begin_read()
            .map_err(|e| store_err("begin read")(e.into()))?;
        let meta = txn
            .open_table(META)
            .map_err(|e| store_err("open meta")(e.into()))?;
        let Some(v) = meta
            .get(key)
            .map_err(|e| store_err("read meta")(e.into()))?
        else {
            return Ok(None);
        };
        serde_json::from_slice(v.value())
            .map(Some)
            .map_err(|_| ClientError::Corrupt(key))
    }

    pub fn save_identity(&self, identity: &Identity) -> Result<(), ClientError> {
        self.put("identity", identity)
    }

    pub fn load_identity(&self) -> Result<Option<Identity>, ClientError> {
        self.get("identity")
    }

    pub fn save_snapshot(&self, snapshot: &ClientSnapshot) -> Result<(), ClientError> {
        self.put("snapshot", snapshot)
    }

    pub fn load_snapshot(&self) -> Result<Option<ClientSnapshot>, ClientError> {
        self.get("snapshot")
    }

    /// Stores received messages, the changes to incomplete messages (`partials`, in
    /// order) and the snapshot that remembers completed ids in one durable transaction.
    /// Only after this returns may the mailbox items they came in be acked.
    pub fn save_received(
        &self,
        messages: &[ReceivedMessage],
        partials: &[PartialOp],
        snapshot: &ClientSnapshot,
    ) -> Result<(), ClientError> {
        let snap = serde_json::to_vec(snapshot)
            .map_err(|_| ClientError::Internal("serialize store value"))?;
        let txn = self
            .db
            .begin_write()
            .map_err(|e| store_err("begin write")(e.into()))?;
        {
            let mut inbox = txn
                .open_table(INBOX)
                .map_err(|e| store_err("open inbox")(e.into()))?;
            for m in messages {
                let value = serde_json::to_vec(m)
                    .map_err(|_| ClientError::Internal("serialize store value"))?;
                inbox
                    .insert(m.message_id.as_slice(), value.as_slice())
                    .map_err(|e| store_err("write inbox")(e.into()))?;
            }
            let mut held = txn
                .open_table(PARTIALS)
                .map_err(|e| store_err("open partials")(e.into()))?;
            for op in partials {
                match op {
                    PartialOp::Held(f) => {
                        let mut key = f.header.message_id.to_vec();
                        key.extend_from_slice(&f.header.index.to_be_bytes());
                        let mut value = f.header.count.to_be_bytes().to_vec();
                        value.extend_from_slice(&f.data);
                        held.insert(key.as_slice(), value.as_slice())
                            .map_err(|e| store_err("write partials")(e.into()))?;
                    }
                    PartialOp::Done(id) => {
                        let mut end = id.to_vec();
                        end.extend_from_slice(&[0xff, 0xff]);
                        held.retain_in(id.as_slice()..=end.as_slice(), |_, _| false)
                            .map_err(|e| store_err("remove partials")(e.into()))?;
                    }
                }
            }
            let mut meta = txn
                .open_table(META)
                .map_err(|e| store_err("open meta")(e.into()))?;
            meta.insert("snapshot", snap.as_slice())
                .map_err(|e| store_err("write meta")(e.into()))?;
        }
        txn.commit().map_err(|e| store_err("commit")(e.into()))
    }

    /// The fragments of incomplete messages kept by [`Self::save_received`]; a damaged
    /// entry is skipped (its message is then dropped like any incomplete one).
    pub fn load_partials(&self) -> Result<Vec<Fragment>, ClientError> {
        let txn = self
            .db
            .begin_read()
            .map_err(|e| store_err("begin read")(e.into()))?;
        let t = txn
            .open_table(PARTIALS)
            .map_err(|e| store_err("open partials")(e.into()))?;
        let mut out = Vec::new();
        for entry in t.iter().map_err(|e| store_err("read partials")(e.into()))? {
            let (k, v) = entry.map_err(|e| store_err("read partials")(e.into()))?;
            let (k, v) = (k.value(), v.value());
            if k.len() != 18 || v.len() < 2 {
                continue;
            }
            let mut message_id = [0u8; 16];
            message_id.copy_from_slice(&k[..16]);
            let data = v[2..].to_vec();
            let Ok(len) = u16::try_from(data.len()) else {
                continue;
            };
            let f = Fragment {
                kind: BodyKind::Real,
                header: FragmentHeader {
                    message_id,
                    index: u16::from_be_bytes([k[16], k[17]]),
                    count: u16::from_be_bytes([v[0], v[1]]),
                    len,
                },
                data,
            };
            // Through the wire decoder, so a damaged entry cannot be what no peer could send.
            if Fragment::decode(&f.encode()).is_ok_and(|g| g == f) {
                out.push(f);
            }
        }
        Ok(out)
    }

    /// Every received message, oldest first.
    pub fn received_messages(&self) -> Result<Vec<ReceivedMessage>, ClientError> {
        let txn = self
            .db
            .begin_read()
            .map_err(|e| store_err("begin read")(e.into()))?;
        let t = txn
            .open_table(INBOX)
            .map_err(|e| store_err("open inbox")(e.into()))?;
        let mut out = Vec::new();
        for entry in t.iter().map_err(|e| store_err("read inbox")(e.into()))? {
            let (_, v) = entry.map_err(|e| store_err("read inbox")(e.into()))?;
            out.push(
                serde_json::from_slice::<ReceivedMessage>(v.value())
                    .map_err(|_| ClientError::Corrupt("inbox message"))?,
            );
        }
        out.sort_by_key(|m| (m.received_unix_ms, m.message_id));
        Ok(out)
    }

    /// Stores the messenger's state and, in the same durable transaction, deletes the
    /// raw inbox entries (`consumed`) it has taken in, so a message is never both lost
    /// and never processed twice across a crash.
    pub fn save_messenger(
        &self,
        snapshot: &MessengerSnapshot,
        consumed: &[MessageId],
    ) -> Result<(), ClientError> {
        let txn = self
            .db
            .begin_write()
            .map_err(|e| store_err("begin write")(e.into()))?;
        {
            let mut meta = txn
                .open_table(META)
                .map_err(|e| store_err("open meta")(e.into()))?;
            meta.insert(MESSENGER_GROUPS, snapshot.groups.as_slice())
                .map_err(|e| store_err("write meta")(e.into()))?;
            meta.insert(MESSENGER_STATE, snapshot.state.as_slice())
                .map_err(|e| store_err("write meta")(e.into()))?;
            let mut inbox = txn
                .open_table(INBOX)
                .map_err(|e| store_err("open inbox")(e.into()))?;
            for id in consumed {
                inbox
                    .remove(id.as_slice())
                    .map_err(|e| store_err("remove inbox")(e.into()))?;
            }
        }
        txn.commit().map_err(|e| store_err("commit")(e.into()))
    }

    /// The messenger's state, if one was saved.
    pub fn load_messenger(&self) -> Result<Option<MessengerSnapshot>, ClientError> {
        let txn = self
            .db
            .begin_read()
            .map_err(|e| store_err("begin read")(e.into()))?;
        let meta = txn
            .open_table(META)
            .map_err(|e| store_err("open meta")(e.into()))?;
        let get = |key: &str| -> Result<Option<Vec<u8>>, ClientError> {
            Ok(meta
                .get(key)
                .map_err(|e| store_err("read meta")(e.into()))?
                .map(|v| v.value().to_vec()))
        };
        match (get(MESSENGER_GROUPS)?, get(MESSENGER_STATE)?) {
            (Some(groups), Some(state)) => Ok(Some(MessengerSnapshot { groups, state })),
            (None, None) => Ok(None),
            _ => Err(ClientError::Corrupt("messenger state")),
        }
    }

    /// The Ed25519 secret key that authenticates this client's link to its gateway.
    pub fn save_account_key(&self, secret: &[u8; 32]) -> Result<(), ClientError> {
        self.put("account_key", secret)
    }

    pub fn load_account_key(&self) -> Result<Option<[u8; 32]>, ClientError> {
        self.get("account_key")
    }

    /// The member's Ed25519 identity key: it signs MLS leaves, direct messages and
    /// address bindings, and a credential names it. Never the account key, which is
    /// all a gateway sees.
    pub fn save_signing_key(&self, secret: &[u8; 32]) -> Result<(), ClientError> {
        self.put("signing_key", secret)
    }

    pub fn load_signing_key(&self) -> Result<Option<[u8; 32]>, ClientError> {
        self.get("signing_key")
    }

    /// Adds or replaces the contact stored under the card's name.
    pub fn put_contact(&self, card: &ContactCard) -> Result<(), ClientError> {
        let txn = self
            .db
            .begin_write()
            .map_err(|e| store_err("begin write")(e.into()))?;
        {
            let mut t = txn
                .open_table(CONTACTS)
                .map_err(|e| store_err("open contacts")(e.into()))?;
            t.insert(card.name.as_str(), card.to_text().as_str())
                .map_err(|e| store_err("write contact")(e.into()))?;
        }
        txn.commit().map_err(|e| store_err("commit")(e.into()))
    }

    /// Removes a contact; returns whether it existed.
    pub fn remove_contact(&self, name: &str) -> Result<bool, ClientError> {
        let txn = self
            .db
            .begin_write()
            .map_err(|e| store_err("begin write")(e.into()))?;
        let existed = {
            let mut t = txn
                .open_table(CONTACTS)
                .map_err(|e| store_err("open contacts")(e.into()))?;
            t.remove(name)
                .map_err(|e| store_err("remove contact")(e.into()))?
                .is_some()
        };
        txn.commit().map_err(|e| store_err("commit")(e.into()))?;
        Ok(existed)
    }

    /// All contacts, by name.
    pub fn contacts(&self) -> Result<Vec<ContactCard>, ClientError> {
        let txn = self
            .db
            .begin_read()
            .map_err(|e| store_err("begin read")(e.into()))?;
        let t = txn
            .open_table(CONTACTS)
            .map_err(|e| store_err("open contacts")(e.into()))?;
        let mut out = Vec::new();
        for entry in t.iter().map_err(|e| store_err("read contacts")(e.into()))? {
            let (_, v) = entry.map_err(|e| store_err("read contacts")(e.into()))?;
            out.push(ContactCard::parse(v.value()).map_err(|_| ClientError::Corrupt("contact"))?);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contact::Contact;
    use crate::core::{OutgoingFragment, OutgoingMessage, SNAPSHOT_VERSION};
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    #[test]
    fn survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("client.redb");
        let mut rng = StdRng::seed_from_u64(1);
        let identity = Identity::generate(&mut rng, [7; 32]);
        let card = ContactCard::new("Bo", identity.contact()).unwrap();
        let snapshot = ClientSnapshot {
            version: SNAPSHOT_VERSION,
            outgoing: vec![OutgoingMessage {
                message_id: [1; 16],
                to: identity.contact(),
                count: 2,
                unacked: vec![OutgoingFragment {
                    index: 1,
                    data: vec![1, 2, 3],
                    attempts: 4,
                }],
            }],
            received: vec![[2; 16]],
        };
        {
            let store = ClientStore::open(&path).unwrap();
            assert!(store.load_identity().unwrap().is_none());
            assert!(store.load_snapshot().unwrap().is_none());
            store.save_identity(&identity).unwrap();
            store.save_snapshot(&snapshot).unwrap();
            store.put_contact(&card).unwrap();
            let other = Contact {
                mailbox: [3; 32],
                ..identity.contact()
            };
            store
                .put_contact(&ContactCard::new("Cy", other).unwrap())
                .unwrap();
            assert!(store.remove_contact("Cy").unwrap());
            assert!(!store.remove_contact("Cy").unwrap());
        }
        let store = ClientStore::open(&path).unwrap();
        let back = store.load_identity().unwrap().unwrap();
        assert_eq!(back.contact(), identity.contact());
        assert_eq!(back.secret.to_bytes(), identity.secret.to_bytes());
        assert_eq!(store.load_snapshot().unwrap().unwrap(), snapshot);
        assert_eq!(store.contacts().unwrap(), vec![card]);
    }

    #[test]
    fn inbox_is_idempotent_and_ordered() {
        let store = ClientStore::in_memory().unwrap();
        let snapshot = ClientSnapshot {
            version: SNAPSHOT_VERSION,
            outgoing: vec![],
            received: vec![[2; 16], [1; 16]],
        };
        let a = ReceivedMessage {
            message_id: [2; 16],
            received_unix_ms: 20,
            bytes: b"second".to_vec(),
        };
        let b = ReceivedMessage {
            message_id: [1; 16],
            received_unix_ms: 10,
            bytes: b"first".to_vec(),
        };
        store
            .save_received(std::slice::from_ref(&a), &[], &snapshot)
            .unwrap();
        store
            .save_received(&[b.clone(), a.clone()], &[], &snapshot)
            .unwrap();
        assert_eq!(store.received_messages().unwrap(), vec![b, a]);
        assert_eq!(store.load_snapshot().unwrap().unwrap(), snapshot);
        store.save_account_key(&[9; 32]).unwrap();
        assert_eq!(store.load_account_key().unwrap(), Some([9; 32]));
        assert_eq!(store.load_signing_key().unwrap(), None);
        store.save_signing_key(&[8; 32]).unwrap();
        assert_eq!(store.load_signing_key().unwrap(), Some([8; 32]));
        assert_eq!(store.load_account_key().unwrap(), Some([9; 32]));
    }

    #[test]
    fn in_memory_works() {
        let store = ClientStore::in_memory().unwrap();
        assert!(store.contacts().unwrap().is_empty());
    }
}

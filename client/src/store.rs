//! The client's durable store on redb: identity, the core's snapshot, contacts.
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
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::contact::ContactCard;
use crate::core::{ClientError, ClientSnapshot, Identity};

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const CONTACTS: TableDefinition<&str, &str> = TableDefinition::new("contacts");
const SCHEMA_VERSION: u32 = 1;

fn store_err(op: &'static str) -> impl FnOnce(redb::Error) -> ClientError {
    move |e| ClientError::Store {
        op,
        reason: e.to_string(),
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

impl ClientStore {
    /// Opens (or creates) the store at `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, ClientError> {
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
    fn in_memory_works() {
        let store = ClientStore::in_memory().unwrap();
        assert!(store.contacts().unwrap().is_empty());
    }
}

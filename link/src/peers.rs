//! The set of keys allowed on a link.

use std::collections::HashSet;
use std::fmt;
use std::sync::{Arc, RwLock};

use crate::NodeKey;

/// Which remote keys may connect to an endpoint.
///
/// Cheap to clone; all clones share one set, so a relay can [`replace`](Self::replace)
/// it when a new directory arrives and every later handshake sees the change.
/// Existing links are not affected.
#[derive(Clone)]
pub struct PeerSet {
    inner: Arc<Inner>,
}

struct Inner {
    /// Accept every key (gateways accepting clients).
    any: bool,
    keys: RwLock<HashSet<NodeKey>>,
}

impl PeerSet {
    /// An empty set: nobody may connect until keys are added.
    pub fn new() -> Self {
        Self::build(false, HashSet::new())
    }

    /// A set that accepts any key. The peer still has to prove possession of
    /// the key it presents; [`crate::Link::peer`] reports it.
    pub fn any() -> Self {
        Self::build(true, HashSet::new())
    }

    /// A set holding exactly `keys`.
    pub fn from_keys(keys: impl IntoIterator<Item = NodeKey>) -> Self {
        Self::build(false, keys.into_iter().collect())
    }

    fn build(any: bool, keys: HashSet<NodeKey>) -> Self {
        Self {
            inner: Arc::new(Inner {
                any,
                keys: RwLock::new(keys),
            }),
        }
    }

    /// Replace the whole set. Has no effect on what an [`any`](Self::any) set accepts.
    pub fn replace(&self, keys: impl IntoIterator<Item = NodeKey>) {
        let new: HashSet<NodeKey> = keys.into_iter().collect();
        *self.write() = new;
    }

    /// Add one key.
    pub fn insert(&self, key: NodeKey) {
        self.write().insert(key);
    }

    /// Remove one key.
    pub fn remove(&self, key: &NodeKey) {
        self.write().remove(key);
    }

    /// Whether `key` may connect.
    pub fn contains(&self, key: &NodeKey) -> bool {
        self.inner.any || self.read().contains(key)
    }

    /// Whether this set accepts any key.
    pub fn is_any(&self) -> bool {
        self.inner.any
    }

    /// Number of listed keys (zero for an [`any`](Self::any) set with no keys added).
    pub fn len(&self) -> usize {
        self.read().len()
    }

    /// Whether no key is listed.
    pub fn is_empty(&self) -> bool {
        self.read().is_empty()
    }

    // A poisoned lock only means another thread panicked while holding it; the
    // set itself is always in a valid state, so recover it instead of panicking.
    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashSet<NodeKey>> {
        self.inner
            .keys
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashSet<NodeKey>> {
        self.inner
            .keys
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Default for PeerSet {
    fn default() -> Self {
        Self::new()
    }
}

// Keys are identities: the Debug form gives only the shape of the set.
impl fmt::Debug for PeerSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerSet")
            .field("any", &self.inner.any)
            .field("len", &self.len())
            .finish()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn replace_is_seen_by_clones() {
        let set = PeerSet::new();
        let clone = set.clone();
        assert!(!clone.contains(&[1; 32]));
        set.replace([[1; 32], [2; 32]]);
        assert!(clone.contains(&[1; 32]));
        set.replace([[3; 32]]);
        assert!(!clone.contains(&[1; 32]));
        assert!(clone.contains(&[3; 32]));
        assert_eq!(clone.len(), 1);
    }

    #[test]
    fn any_accepts_everything() {
        let set = PeerSet::any();
        assert!(set.contains(&[9; 32]));
        set.replace([]);
        assert!(set.contains(&[9; 32]));
    }

    #[test]
    fn debug_hides_keys() {
        let set = PeerSet::from_keys([[0xab; 32]]);
        let text = format!("{set:?}");
        assert!(!text.contains("171"), "{text}");
        assert!(!text.to_lowercase().contains("ab, "), "{text}");
    }
}

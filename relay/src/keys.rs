//! The Sphinx keys a node holds, by epoch.

use std::collections::BTreeMap;

use rand::CryptoRng;
use x25519_dalek::{PublicKey, StaticSecret};

/// Secret Sphinx keys by epoch: the current one, those published ahead, and the
/// previous one during its grace period.
#[derive(Clone, Default)]
pub struct KeyRing {
    keys: BTreeMap<u64, StaticSecret>,
}

impl std::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyRing")
            .field("epochs", &self.epochs())
            .finish()
    }
}

impl KeyRing {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&mut self, epoch: u64, secret: StaticSecret) {
        self.keys.insert(epoch, secret);
    }

    /// Makes sure keys exist for every epoch in `epochs`, generating missing ones.
    /// Returns the epochs that were generated.
    pub fn ensure<R: CryptoRng + ?Sized>(
        &mut self,
        rng: &mut R,
        epochs: std::ops::RangeInclusive<u64>,
    ) -> Vec<u64> {
        let mut made = Vec::new();
        for e in epochs {
            self.keys.entry(e).or_insert_with(|| {
                made.push(e);
                StaticSecret::random_from_rng(&mut *rng)
            });
        }
        made
    }

    /// Forgets keys of epochs before `epoch`.
    pub fn retire_before(&mut self, epoch: u64) {
        self.keys.retain(|&e, _| e >= epoch);
    }

    pub fn get(&self, epoch: u64) -> Option<&StaticSecret> {
        self.keys.get(&epoch)
    }

    /// The held epoch whose 16-bit frame label is `label`.
    pub fn by_label(&self, label: u16) -> Option<(u64, &StaticSecret)> {
        self.keys
            .iter()
            .rev()
            .find(|(e, _)| **e as u16 == label)
            .map(|(e, k)| (*e, k))
    }

    pub fn public(&self, epoch: u64) -> Option<PublicKey> {
        self.keys.get(&epoch).map(PublicKey::from)
    }

    pub fn epochs(&self) -> Vec<u64> {
        self.keys.keys().copied().collect()
    }

    /// All keys, for persisting.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &StaticSecret)> {
        self.keys.iter().map(|(e, k)| (*e, k))
    }
}

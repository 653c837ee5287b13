//! A member's keys, one per purpose, so that what one party sees of a member cannot be
//! tied to what another sees.
//!
//! - The **account (link) key** authenticates the client's QUIC link to its gateway; the
//!   gateway knows the account by it, and by nothing else of the member.
//! - The **identity (signing) key** signs as the member: its MLS leaf, its direct
//!   messages and its address binding; the admin's credential names it. It travels only
//!   inside sealed messages, so no gateway sees it.
//! - The **seal key** (X25519, in [`Identity`]) is what message bodies are sealed to.
//!
//! With one key for link and identity, a gateway would read the member's identity key
//! off every link and every account command, and so tie each account (its mail, its
//! times online) to the member's handle.

use ed25519_dalek::SigningKey;
use rand::CryptoRng;
use shoal_topology::NodeId;

use crate::ClientError;
use crate::core::Identity;
use crate::store::ClientStore;

/// The keys `shoal client init` makes. `Debug` shows none of them.
pub struct MemberKeys {
    /// Link key: the gateway's account key.
    pub account: SigningKey,
    /// Identity key: the credential's `signing_key`.
    pub signing: SigningKey,
    /// Seal key and mailbox.
    pub identity: Identity,
}

impl std::fmt::Debug for MemberKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MemberKeys(..)")
    }
}

impl MemberKeys {
    /// Fresh, independent keys for a client of `gateway`.
    pub fn generate<R: CryptoRng + ?Sized>(rng: &mut R, gateway: NodeId) -> Self {
        let mut secret = [0u8; 32];
        rng.fill_bytes(&mut secret);
        let account = SigningKey::from_bytes(&secret);
        rng.fill_bytes(&mut secret);
        let signing = SigningKey::from_bytes(&secret);
        secret.fill(0);
        MemberKeys {
            account,
            signing,
            identity: Identity::generate(rng, gateway),
        }
    }

    /// The old shape, for tests that show what it gave away: the identity key is the
    /// link key.
    pub fn dangerously_one_key_for_everything(self) -> Self {
        MemberKeys {
            signing: self.account.clone(),
            ..self
        }
    }

    /// The public link key (what the gateway sees).
    pub fn account_key(&self) -> [u8; 32] {
        self.account.verifying_key().to_bytes()
    }

    /// The public identity key (what a credential names).
    pub fn identity_key(&self) -> [u8; 32] {
        self.signing.verifying_key().to_bytes()
    }

    /// Writes all three into `store`.
    pub fn save(&self, store: &ClientStore) -> Result<(), ClientError> {
        store.save_identity(&self.identity)?;
        store.save_account_key(&self.account.to_bytes())?;
        store.save_signing_key(&self.signing.to_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn each_purpose_has_its_own_key() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let k = MemberKeys::generate(&mut rng, [9; 32]);
        let seal = k.identity.public_key().to_bytes();
        assert_ne!(k.account_key(), k.identity_key());
        assert_ne!(k.account_key(), seal);
        assert_ne!(k.identity_key(), seal);
        let store = ClientStore::in_memory().unwrap();
        k.save(&store).unwrap();
        assert_eq!(
            store.load_account_key().unwrap(),
            Some(k.account.to_bytes())
        );
        assert_eq!(
            store.load_signing_key().unwrap(),
            Some(k.signing.to_bytes())
        );
        let one = k.dangerously_one_key_for_everything();
        assert_eq!(one.account_key(), one.identity_key());
    }
}

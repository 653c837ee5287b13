//! Account administration on a stopped gateway: opens the store (the one writer), applies
//! the change through the mailbox core, waits for it to be durable, closes.
//!
//! redb locks its file, so these fail cleanly while the gateway runs. Admin-signed
//! account commands over the network come later; they will call the same core methods.

use shoal_packet::sphinx::MailboxAddress;

use crate::GatewayError;
use crate::config::Config;
use crate::mailbox::{AccountKey, Mailbox};
use crate::store::Store;

fn with_mailbox(
    config: &Config,
    change: impl FnOnce(&mut Mailbox) -> Result<(), GatewayError>,
) -> Result<(), GatewayError> {
    let (store, recovered) = Store::open(&config.store_path(), &config.store, &mut rand::rng())?;
    let mut mailbox = Mailbox::restore(config.mailbox.clone(), recovered)?;
    change(&mut mailbox)?;
    while let Some(batch) = mailbox.poll_write() {
        let result = store.commit(batch);
        if let Err(failed) = &result {
            let error = failed.error.clone();
            mailbox.on_commit(result);
            return Err(error);
        }
        // Account writes carry no acks; anything else here is an orphan delete.
        let _ = mailbox.on_commit(result);
    }
    store.close()
}

/// Registers `key` (the client's Ed25519 link key) with mailbox `address` and `quota`
/// (the config's `default_quota` if `None`).
pub fn add_account(
    config: &Config,
    key: AccountKey,
    address: &MailboxAddress,
    quota: Option<u32>,
) -> Result<(), GatewayError> {
    if ed25519_dalek::VerifyingKey::from_bytes(&key).is_err() {
        return Err(GatewayError::Field {
            what: "account key (not an Ed25519 public key)",
            value: 0,
        });
    }
    let quota = quota.unwrap_or(config.default_quota);
    with_mailbox(config, |m| m.create_account(address, key, quota))
}

/// Removes the account of `key` and every item in its mailbox.
pub fn remove_account(config: &Config, key: &AccountKey) -> Result<(), GatewayError> {
    with_mailbox(config, |m| m.delete_account(key))
}

/// Changes the quota of `key`'s account.
pub fn set_quota(config: &Config, key: &AccountKey, quota: u32) -> Result<(), GatewayError> {
    with_mailbox(config, |m| m.set_quota(key, quota))
}

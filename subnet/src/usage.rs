//! What a gateway tells a subnet's admin about its accounts' mailboxes, in answer to
//! [`crate::AccountAction::AccountUsage`]: per account, the items stored, their bytes and
//! the quota. Accounts are named by a [`UsageId`], a hash of the subnet and the account
//! key that the admin recomputes from its own records; the report carries no key,
//! mailbox address or content.
//!
//! ```text
//! | total accounts: u32 | record × n |      record = | id: 16 | items: u32 | quota: u32 | bytes: u64 |
//! ```
//! Big-endian; `n ≤ total` (a report cut to fit the answer says how many it left out).

use sha2::{Digest, Sha256};
use shoal_topology::Hex32;

use crate::{SubnetError, SubnetId};

const ID_DOMAIN: &[u8] = b"shoal subnet account usage id v1";
const WHAT: &str = "usage report";
/// Bytes of one account's record.
pub const USAGE_RECORD_LEN: usize = 16 + 4 + 4 + 8;
const HEADER_LEN: usize = 4;

/// How an account is named in a usage report.
pub type UsageId = [u8; 16];

/// The name of `account` (its link key) of `subnet` in usage reports.
pub fn usage_id(subnet: &SubnetId, account: &Hex32) -> UsageId {
    let mut h = Sha256::new();
    h.update(ID_DOMAIN);
    h.update([0]);
    h.update(subnet.0);
    h.update(account.0);
    let digest = h.finalize();
    let mut id = [0u8; 16];
    id.copy_from_slice(&digest[..16]);
    id
}

/// One account's mailbox use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AccountUsage {
    pub id: UsageId,
    /// Items stored (durable or being written).
    pub items: u32,
    /// Items the account may hold.
    pub quota: u32,
    /// Bytes those items take in the store (payload bytes).
    pub bytes: u64,
}

/// A gateway's answer for one subnet.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UsageReport {
    /// Accounts the subnet has at the gateway (more than `accounts.len()` if cut).
    pub total_accounts: u32,
    pub accounts: Vec<AccountUsage>,
}

impl UsageReport {
    /// Encodes at most `max_len` bytes: records that do not fit are left out (and
    /// `total_accounts` still counts them).
    pub fn encode(&self, max_len: usize) -> Vec<u8> {
        let fit = max_len.saturating_sub(HEADER_LEN) / USAGE_RECORD_LEN;
        let n = self.accounts.len().min(fit);
        let mut out = Vec::with_capacity(HEADER_LEN + n * USAGE_RECORD_LEN);
        let total = self
            .total_accounts
            .max(u32::try_from(self.accounts.len()).unwrap_or(u32::MAX));
        out.extend_from_slice(&total.to_be_bytes());
        for a in &self.accounts[..n] {
            out.extend_from_slice(&a.id);
            out.extend_from_slice(&a.items.to_be_bytes());
            out.extend_from_slice(&a.quota.to_be_bytes());
            out.extend_from_slice(&a.bytes.to_be_bytes());
        }
        out
    }

    /// Decodes a report. Never panics.
    pub fn decode(bytes: &[u8]) -> Result<Self, SubnetError> {
        let malformed = |reason: &str| SubnetError::Malformed {
            what: WHAT,
            reason: reason.into(),
        };
        let (header, records) = bytes
            .split_first_chunk::<HEADER_LEN>()
            .ok_or_else(|| malformed("shorter than its header"))?;
        if records.len() % USAGE_RECORD_LEN != 0 {
            return Err(malformed("not a whole number of records"));
        }
        let total_accounts = u32::from_be_bytes(*header);
        let mut accounts = Vec::with_capacity(records.len() / USAGE_RECORD_LEN);
        for r in records.chunks_exact(USAGE_RECORD_LEN) {
            let (id, rest) = r.split_at(16);
            let (items, rest) = rest.split_at(4);
            let (quota, bytes) = rest.split_at(4);
            let arr = |s: &[u8]| -> Result<[u8; 4], SubnetError> {
                s.try_into().map_err(|_| malformed("record"))
            };
            accounts.push(AccountUsage {
                id: id.try_into().map_err(|_| malformed("record id"))?,
                items: u32::from_be_bytes(arr(items)?),
                quota: u32::from_be_bytes(arr(quota)?),
                bytes: u64::from_be_bytes(bytes.try_into().map_err(|_| malformed("record"))?),
            });
        }
        if accounts.len() as u64 > u64::from(total_accounts) {
            return Err(malformed("more records than accounts"));
        }
        Ok(UsageReport {
            total_accounts,
            accounts,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> UsageReport {
        UsageReport {
            total_accounts: 2,
            accounts: vec![
                AccountUsage {
                    id: [1; 16],
                    items: 3,
                    quota: 100,
                    bytes: 3 * 2048,
                },
                AccountUsage {
                    id: [2; 16],
                    items: 0,
                    quota: 7,
                    bytes: 0,
                },
            ],
        }
    }

    #[test]
    fn testvec_usage_report() {
        let bytes = report().encode(usize::MAX);
        assert_eq!(
            hex::encode(&bytes),
            "00000002\
             01010101010101010101010101010101 00000003 00000064 0000000000001800\
             02020202020202020202020202020202 00000000 00000007 0000000000000000"
                .replace(' ', "")
        );
        assert_eq!(UsageReport::decode(&bytes).unwrap(), report());
    }

    #[test]
    fn a_report_cut_to_fit_says_so_and_bad_bytes_are_refused() {
        let cut = report().encode(4 + USAGE_RECORD_LEN + 5);
        let got = UsageReport::decode(&cut).unwrap();
        assert_eq!(got.total_accounts, 2);
        assert_eq!(got.accounts, report().accounts[..1]);
        let full = report().encode(usize::MAX);
        for bad in [&full[..3], &full[..full.len() - 1], &[0, 0, 0, 1][..]] {
            let mut b = bad.to_vec();
            if b.len() == 4 {
                b.extend_from_slice(&full[4..]);
            }
            assert!(UsageReport::decode(&b).is_err(), "{b:?}");
        }
    }

    #[test]
    fn ids_depend_on_subnet_and_account() {
        let (s1, s2, k1, k2) = (
            Hex32([1; 32]),
            Hex32([2; 32]),
            Hex32([3; 32]),
            Hex32([4; 32]),
        );
        assert_eq!(usage_id(&s1, &k1), usage_id(&s1, &k1));
        assert_ne!(usage_id(&s1, &k1), usage_id(&s2, &k1));
        assert_ne!(usage_id(&s1, &k1), usage_id(&s1, &k2));
    }
}

//! The order of concurrent commits: one that no member can grind.
//!
//! Under "lowest hash of the commit's bytes wins", a member who sees another member's
//! commit can make candidate commits of its own (each has fresh path secrets, so a
//! fresh hash) until one hashes lower, and so censor any commit, its own removal
//! included. Here nothing the committer can vary after the epoch began decides the
//! order. Every commit states, in its MLS authenticated data, a [`CommitClaim`]: its
//! author's leaf, the leaves it removes and, for a de-provisioning, the admin-signed
//! policy that revokes them. Held commits are ranked by [`OrderKey`], lowest first:
//! 1. commits whose author a carried policy proves revoked come last, whatever they do;
//! 2. commits that remove a leaf some carried policy proves revoked come first;
//! 3. commits whose author another held commit removes come after those whose author
//!    nobody removes;
//! 4. then [`commit_rank`] of the author's leaf: a hash of (group, epoch, leaf), fixed
//!    before the epoch began and blind to the commit's bytes;
//! 5. the hash of the bytes breaks ties only among one author's own commits.
//!
//! A claim is read before the commit is opened (the authenticated data of a
//! `PrivateMessage` is in the clear), so it is checked once the commit is opened:
//! the sender must be the claimed author and the removals the claimed removals. A
//! commit whose claim is false is dropped by every member alike, so lying buys nothing.

use serde::{Deserialize, Serialize};
use sha2_0_11::{Digest, Sha256};
use shoal_subnet::{MemberCredential, Policy, SubnetId};

use super::GroupError;

const RANK_DOMAIN: &[u8] = b"shoal commit order v1";
/// First byte of a claim: the version of the ordering rule. A commit from a client that
/// still orders by lowest hash carries no claim and is refused.
const CLAIM_TAG: u8 = 0xc1;
/// Leaves one claim may list (far above any group Shoal forms).
const MAX_REMOVED: usize = 1024;
/// Bytes of a carried policy.
pub(super) const MAX_PROOF: usize = 64 * 1024;
/// Commits held for one epoch; more are refused (and counted as malformed).
pub(super) const MAX_HELD: usize = 256;

/// What a commit states about itself, in its authenticated data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct CommitClaim {
    pub author: u32,
    /// Sorted, without repeats.
    pub removed: Vec<u32>,
    /// The signed policy of a removed member's subnet that revokes it.
    pub proof: Option<Vec<u8>>,
}

fn malformed(reason: &str) -> GroupError {
    GroupError::Malformed {
        what: "commit order claim",
        reason: reason.into(),
    }
}

impl CommitClaim {
    pub fn new(author: u32, mut removed: Vec<u32>, proof: Option<Vec<u8>>) -> Self {
        removed.sort_unstable();
        removed.dedup();
        CommitClaim {
            author,
            removed,
            proof,
        }
    }

    /// `tag (1) | author u32 | count u16 | removed u32 × count | proof length u32 | proof`
    pub fn encode(&self) -> Vec<u8> {
        let proof = self.proof.as_deref().unwrap_or_default();
        let mut out = Vec::with_capacity(11 + 4 * self.removed.len() + proof.len());
        out.push(CLAIM_TAG);
        out.extend_from_slice(&self.author.to_be_bytes());
        // A group never has u16::MAX leaves to remove (and `decode` refuses more than
        // MAX_REMOVED); the count and the list agree whatever happens.
        let count = u16::try_from(self.removed.len()).unwrap_or(u16::MAX);
        out.extend_from_slice(&count.to_be_bytes());
        for l in self.removed.iter().take(usize::from(count)) {
            out.extend_from_slice(&l.to_be_bytes());
        }
        out.extend_from_slice(&(proof.len() as u32).to_be_bytes());
        out.extend_from_slice(proof);
        out
    }

    /// Parses a claim from untrusted bytes; never allocates more than the input's size.
    pub fn decode(bytes: &[u8]) -> Result<Self, GroupError> {
        let (&tag, rest) = bytes.split_first().ok_or_else(|| {
            malformed("missing: the commit comes from a client that orders by lowest hash")
        })?;
        if tag != CLAIM_TAG {
            return Err(malformed("unknown version"));
        }
        let take = |rest: &mut &[u8], n: usize| -> Result<Vec<u8>, GroupError> {
            if rest.len() < n {
                return Err(malformed("truncated"));
            }
            let (head, tail) = rest.split_at(n);
            *rest = tail;
            Ok(head.to_vec())
        };
        let mut rest = rest;
        let u32_of = |b: Vec<u8>| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        let author = u32_of(take(&mut rest, 4)?);
        let count = take(&mut rest, 2)?;
        let count = usize::from(u16::from_be_bytes([count[0], count[1]]));
        if count > MAX_REMOVED {
            return Err(malformed("too many removals"));
        }
        let mut removed = Vec::with_capacity(count.min(rest.len() / 4));
        for _ in 0..count {
            removed.push(u32_of(take(&mut rest, 4)?));
        }
        let len = u32_of(take(&mut rest, 4)?) as usize;
        if len > MAX_PROOF {
            return Err(malformed("proof too long"));
        }
        let proof = take(&mut rest, len)?;
        if !rest.is_empty() {
            return Err(malformed("trailing bytes"));
        }
        if removed.windows(2).any(|w| w[0] >= w[1]) {
            return Err(malformed("removals not sorted"));
        }
        Ok(CommitClaim {
            author,
            removed,
            proof: (len > 0).then_some(proof),
        })
    }
}

/// A leaf's place in the order of `epoch` of `group`: fixed when the group and the leaf
/// exist, so nobody can change it once the epoch began, and independent of what the
/// leaf commits.
pub fn commit_rank(group: &[u8], epoch: u64, leaf: u32) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(RANK_DOMAIN);
    h.update((group.len() as u64).to_be_bytes());
    h.update(group);
    h.update(epoch.to_be_bytes());
    h.update(leaf.to_be_bytes());
    h.finalize().into()
}

/// A held commit's place in the order; the lowest wins (fields compare in order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub(super) struct OrderKey {
    /// A carried policy proves the author revoked.
    pub author_revoked: bool,
    /// Removes no leaf that its own carried policy proves revoked.
    pub unproven: bool,
    /// Another author's held commit removes this commit's author.
    pub author_removed: bool,
    pub rank: [u8; 32],
    pub hash: [u8; 32],
}

/// What is kept of a decided epoch, to tell whether a commit that arrives late would
/// have won it (then this member decided too early).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Decided {
    pub winner: OrderKey,
    pub winner_author: u32,
    /// Leaves some held commit's policy proved revoked.
    pub revoked: Vec<u32>,
    /// (author, removed leaves) of every held commit.
    pub removals: Vec<(u32, Vec<u32>)>,
}

impl Decided {
    /// Would `claim` (bytes hashing to `hash`) have beaten the winner, had it come in
    /// time? Its own proof cannot be checked without that epoch's tree, so it is
    /// assumed valid: a false alarm needs a lying member.
    pub fn beaten_by(&self, group: &[u8], epoch: u64, claim: &CommitClaim, hash: [u8; 32]) -> bool {
        let late = OrderKey {
            author_revoked: self.revoked.contains(&claim.author),
            unproven: claim.proof.is_none() || claim.removed.is_empty(),
            author_removed: self
                .removals
                .iter()
                .any(|(a, r)| *a != claim.author && r.contains(&claim.author)),
            rank: commit_rank(group, epoch, claim.author),
            hash,
        };
        let mut winner = self.winner;
        if claim.author != self.winner_author && claim.removed.contains(&self.winner_author) {
            winner.author_removed = true;
        }
        late < winner
    }
}

/// The policy `proof` is, if it is validly signed for one of `subnets`.
fn checked_proof(proof: &[u8], subnets: &[SubnetId]) -> Option<Policy> {
    subnets.iter().find_map(|s| Policy::verify(proof, s).ok())
}

/// Orders the held commits of `epoch` of `group`, whose current leaves carry
/// `members`' credentials: the keys (in the input's order) and what to keep of the
/// decision. The same inputs give the same keys at every member.
pub(super) fn order(
    group: &[u8],
    epoch: u64,
    members: &[(u32, MemberCredential)],
    held: &[(&CommitClaim, [u8; 32])],
) -> (Vec<OrderKey>, Vec<u32>) {
    let mut subnets: Vec<SubnetId> = members.iter().map(|(_, c)| c.subnet()).collect();
    subnets.sort();
    subnets.dedup();
    let proofs: Vec<Option<Policy>> = held
        .iter()
        .map(|(c, _)| c.proof.as_deref().and_then(|p| checked_proof(p, &subnets)))
        .collect();
    let revoked_by = |p: &Policy| -> Vec<u32> {
        members
            .iter()
            .filter(|(_, c)| p.is_revoked(c))
            .map(|(l, _)| *l)
            .collect()
    };
    let mut revoked: Vec<u32> = proofs.iter().flatten().flat_map(revoked_by).collect();
    revoked.sort_unstable();
    revoked.dedup();
    let keys = held
        .iter()
        .zip(&proofs)
        .map(|((claim, hash), proof)| OrderKey {
            author_revoked: revoked.contains(&claim.author),
            unproven: !proof
                .as_ref()
                .is_some_and(|p| revoked_by(p).iter().any(|l| claim.removed.contains(l))),
            author_removed: held.iter().any(|(other, _)| {
                other.author != claim.author && other.removed.contains(&claim.author)
            }),
            rank: commit_rank(group, epoch, claim.author),
            hash: *hash,
        })
        .collect();
    (keys, revoked)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn testvec_claim() {
        let claim = CommitClaim::new(2, vec![7, 1, 7], Some(b"pol".to_vec()));
        let bytes = claim.encode();
        assert_eq!(
            hex::encode(&bytes),
            concat!(
                "c1", "00000002", "0002", "00000001", "00000007", "00000003", "706f6c"
            )
        );
        assert_eq!(CommitClaim::decode(&bytes).unwrap(), claim);
        let bare = CommitClaim::new(0, vec![], None);
        assert_eq!(
            hex::encode(bare.encode()),
            concat!("c1", "00000000", "0000", "00000000")
        );
        assert_eq!(CommitClaim::decode(&bare.encode()).unwrap(), bare);
    }

    #[test]
    fn bad_claims_are_refused() {
        let good = CommitClaim::new(1, vec![2, 3], Some(vec![9; 10])).encode();
        assert!(CommitClaim::decode(&[]).is_err(), "no claim: an old client");
        for cut in 0..good.len() {
            assert!(CommitClaim::decode(&good[..cut]).is_err(), "cut at {cut}");
        }
        let mut trailing = good.clone();
        trailing.push(0);
        assert!(CommitClaim::decode(&trailing).is_err());
        let mut tag = good.clone();
        tag[0] = 0xc2;
        assert!(CommitClaim::decode(&tag).is_err());
        let unsorted = [0xc1, 0, 0, 0, 1, 0, 2, 0, 0, 0, 3, 0, 0, 0, 2, 0, 0, 0, 0];
        assert!(CommitClaim::decode(&unsorted).is_err());
        // A huge stated count or proof length allocates nothing.
        let huge = [0xc1, 0, 0, 0, 1, 0xff, 0xff];
        assert!(CommitClaim::decode(&huge).is_err());
        let long = [0xc1, 0, 0, 0, 1, 0, 0, 0xff, 0xff, 0xff, 0xff];
        assert!(CommitClaim::decode(&long).is_err());
    }

    #[test]
    fn rank_is_per_epoch_and_leaf() {
        let g = b"group";
        assert_ne!(commit_rank(g, 1, 0), commit_rank(g, 2, 0));
        assert_ne!(commit_rank(g, 1, 0), commit_rank(g, 1, 1));
        assert_ne!(commit_rank(g, 1, 0), commit_rank(b"other", 1, 0));
        assert_eq!(commit_rank(g, 1, 0), commit_rank(g, 1, 0));
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = CommitClaim::decode(&bytes);
        }

        #[test]
        fn roundtrip(author: u32, removed in proptest::collection::vec(any::<u32>(), 0..20),
                     proof in proptest::option::of(proptest::collection::vec(any::<u8>(), 1..100))) {
            let claim = CommitClaim::new(author, removed, proof);
            prop_assert_eq!(CommitClaim::decode(&claim.encode()).unwrap(), claim);
        }
    }
}

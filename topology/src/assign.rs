//! Which gateway a member uses: rendezvous (highest-random-weight) hashing of the member's
//! account key over the directory's gateways.
//!
//! The rule is a pure function of (member key, gateway ids), so the member's client and
//! the admin who enrols it compute the same gateway without talking, and nothing about
//! the member's subnet enters it: whoever sees which gateway a client connects to learns
//! nothing about which organisation it belongs to. Subnets share gateways by design.
//! When a gateway leaves or joins, only the members whose top choice changed move
//! (rendezvous hashing's minimal disruption).

use sha2::{Digest, Sha256};

use crate::{NodeId, Topology, TopologyError};

const DOMAIN: &[u8] = b"shoal gateway choice v1";

fn weight(member_key: &[u8; 32], gateway: &NodeId) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(DOMAIN);
    h.update(member_key);
    h.update(gateway);
    h.finalize().into()
}

/// The gateway among `gateways` with the highest weight for `member_key`, or `None` if
/// there is none. Ties (a SHA-256 collision) go to the smaller id, so the order of
/// `gateways` never matters.
pub fn gateway_for_member(gateways: &[NodeId], member_key: &[u8; 32]) -> Option<NodeId> {
    gateways
        .iter()
        .map(|g| (weight(member_key, g), *g))
        .max_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)))
        .map(|(_, g)| g)
}

impl Topology {
    /// The gateway this directory assigns to the member with account key `member_key`
    /// (see the module docs).
    pub fn gateway_for_member(&self, member_key: &[u8; 32]) -> Result<NodeId, TopologyError> {
        gateway_for_member(self.gateways(), member_key)
            .ok_or_else(|| TopologyError::NoRoute("gateway list is empty".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: u8) -> Vec<NodeId> {
        (0..n)
            .map(|i| [i.wrapping_mul(37).wrapping_add(1); 32])
            .collect()
    }

    fn key(i: u32) -> [u8; 32] {
        let mut k = [0u8; 32];
        k[..4].copy_from_slice(&i.to_be_bytes());
        Sha256::digest(k).into()
    }

    #[test]
    fn stable_order_free_and_balanced() {
        let gws = ids(4);
        let mut reversed = gws.clone();
        reversed.reverse();
        let mut counts = [0u32; 4];
        for i in 0..4000 {
            let g = gateway_for_member(&gws, &key(i)).unwrap();
            assert_eq!(gateway_for_member(&reversed, &key(i)), Some(g));
            counts[gws.iter().position(|x| *x == g).unwrap()] += 1;
        }
        // 1000 expected each; 5 binomial SDs ≈ 137.
        for c in counts {
            assert!((860..=1140).contains(&c), "{counts:?}");
        }
        assert_eq!(gateway_for_member(&[], &key(0)), None);
    }

    #[test]
    fn removing_a_gateway_moves_only_its_members() {
        let gws = ids(5);
        let fewer: Vec<NodeId> = gws[1..].to_vec();
        for i in 0..2000 {
            let before = gateway_for_member(&gws, &key(i)).unwrap();
            let after = gateway_for_member(&fewer, &key(i)).unwrap();
            if before != gws[0] {
                assert_eq!(before, after);
            }
        }
    }
}

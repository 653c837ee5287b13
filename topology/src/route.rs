//! Route selection and per-hop delays.
//!
//! Client routes are `[entry gateway, L1, L2, L3, exit gateway]` with one relay drawn
//! uniformly from each layer. A mix-node loop follows the same layered cycle from the
//! node's own position back to itself, so it is carried on exactly the links ordinary
//! traffic uses.

use std::time::Duration;

use rand::{Rng, RngExt};
use rand_distr::{Distribution, Exp};
use shoal_packet::sphinx::Hop;
use x25519_dalek::PublicKey;

use crate::{NetworkParams, NodeId, Role, Topology, TopologyError};

impl Topology {
    /// The hop for `id` with its Sphinx key for `key_epoch`.
    pub fn hop(&self, id: &NodeId, key_epoch: u64) -> Result<Hop, TopologyError> {
        let node = self.node(id).ok_or(TopologyError::UnknownNode)?;
        let key = node
            .sphinx_keys
            .get(&key_epoch)
            .ok_or_else(|| TopologyError::NoRoute(format!("a node has no key for epoch {key_epoch}")))?;
        Ok(Hop {
            address: *id,
            sphinx_key: PublicKey::from(*key),
        })
    }

    fn pick<R: Rng + ?Sized>(rng: &mut R, ids: &[NodeId], what: &str) -> Result<NodeId, TopologyError> {
        if ids.is_empty() {
            return Err(TopologyError::NoRoute(format!("{what} is empty")));
        }
        Ok(ids[rng.random_range(0..ids.len())])
    }

    /// A uniformly chosen gateway.
    pub fn random_gateway<R: Rng + ?Sized>(&self, rng: &mut R) -> Result<NodeId, TopologyError> {
        Self::pick(rng, self.gateways(), "gateway list")
    }

    /// `[entry, L1, L2, L3, exit]` keyed for `key_epoch`.
    pub fn client_route<R: Rng + ?Sized>(
        &self,
        rng: &mut R,
        key_epoch: u64,
        entry: &NodeId,
        exit: &NodeId,
    ) -> Result<Vec<Hop>, TopologyError> {
        for gw in [entry, exit] {
            if self.node(gw).map(|n| n.role) != Some(Role::Gateway) {
                return Err(TopologyError::NoRoute("entry and exit must be gateways".into()));
            }
        }
        let mut route = vec![self.hop(entry, key_epoch)?];
        for l in 0..shoal_packet::MIX_LAYERS {
            let id = Self::pick(rng, self.layer(l), "a mix layer")?;
            route.push(self.hop(&id, key_epoch)?);
        }
        route.push(self.hop(exit, key_epoch)?);
        Ok(route)
    }

    /// A loop for node `me`: the layered cycle from the position after `me` back to `me`.
    ///
    /// Positions are `[gateway, L1, L2, L3]` repeating; the route has exactly one hop per
    /// position and ends at `me`, so it is four hops long.
    pub fn loop_route<R: Rng + ?Sized>(
        &self,
        rng: &mut R,
        key_epoch: u64,
        me: &NodeId,
    ) -> Result<Vec<Hop>, TopologyError> {
        let node = self.node(me).ok_or(TopologyError::UnknownNode)?;
        let positions = shoal_packet::MIX_LAYERS + 1;
        // Position 0 is the gateway tier, 1..=L the mix layers.
        let start = match node.layer {
            Some(l) => usize::from(l) + 1,
            None => 0,
        };
        let mut route = Vec::with_capacity(positions);
        for step in 1..positions {
            let pos = (start + step) % positions;
            let id = if pos == 0 {
                self.random_gateway(rng)?
            } else {
                Self::pick(rng, self.layer(pos - 1), "a mix layer")?
            };
            route.push(self.hop(&id, key_epoch)?);
        }
        route.push(self.hop(me, key_epoch)?);
        Ok(route)
    }
}

/// Draws independent Exp(μ) delays, one per hop, each capped at the maximum.
pub fn sample_delays<R: Rng + ?Sized>(rng: &mut R, params: &NetworkParams, hops: usize) -> Vec<Duration> {
    let mean = params.mean_hop_delay_ms.max(f64::MIN_POSITIVE);
    let cap = params.max_hop_delay_ms.max(0.0);
    let Ok(exp) = Exp::new(1.0 / mean) else {
        return vec![Duration::ZERO; hops];
    };
    (0..hops)
        .map(|_| Duration::from_secs_f64(exp.sample(rng).min(cap) / 1000.0))
        .collect()
}

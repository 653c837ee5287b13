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
        let key = node.sphinx_keys.get(&key_epoch).ok_or_else(|| {
            TopologyError::NoRoute(format!("a node has no key for epoch {key_epoch}"))
        })?;
        Ok(Hop {
            address: *id,
            sphinx_key: PublicKey::from(*key),
        })
    }

    fn pick<R: Rng + ?Sized>(
        rng: &mut R,
        ids: &[NodeId],
        what: &str,
    ) -> Result<NodeId, TopologyError> {
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
                return Err(TopologyError::NoRoute(
                    "entry and exit must be gateways".into(),
                ));
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
pub fn sample_delays<R: Rng + ?Sized>(
    rng: &mut R,
    params: &NetworkParams,
    hops: usize,
) -> Vec<Duration> {
    let mean = params.mean_hop_delay_ms.max(f64::MIN_POSITIVE);
    let cap = params.max_hop_delay_ms.max(0.0);
    let Ok(exp) = Exp::new(1.0 / mean) else {
        return vec![Duration::ZERO; hops];
    };
    (0..hops)
        .map(|_| Duration::from_secs_f64(exp.sample(rng).min(cap) / 1000.0))
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::UncheckedDocument;
    use crate::document::tests::{authority_key, sample_body, sign};
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn topology() -> Topology {
        let body = sample_body().to_bytes().unwrap();
        UncheckedDocument::from_signed(sign(&body, &[&authority_key(0)]))
            .unwrap()
            .dangerously_assume_signed()
            .dangerously_assume_timely()
            .unwrap()
    }

    fn key_of(topo: &Topology, id: &NodeId, epoch: u64) -> [u8; 32] {
        topo.node(id).unwrap().sphinx_keys[&epoch]
    }

    #[test]
    fn client_route_has_one_relay_per_layer_in_order() {
        let topo = topology();
        let mut rng = StdRng::seed_from_u64(3);
        let (entry, exit) = (topo.gateways()[0], topo.gateways()[1]);
        let mut seen = std::collections::BTreeSet::new();
        for epoch in [7, 8] {
            for _ in 0..200 {
                let route = topo.client_route(&mut rng, epoch, &entry, &exit).unwrap();
                assert_eq!(route.len(), shoal_packet::MIX_LAYERS + 2);
                assert_eq!(route[0].address, entry);
                assert_eq!(route[4].address, exit);
                for (l, hop) in route[1..4].iter().enumerate() {
                    assert!(
                        topo.layer(l).contains(&hop.address),
                        "hop {l} not in layer {l}"
                    );
                    seen.insert(hop.address);
                }
                for hop in &route {
                    assert_eq!(
                        hop.sphinx_key.to_bytes(),
                        key_of(&topo, &hop.address, epoch)
                    );
                }
            }
        }
        assert_eq!(seen.len(), 9, "every relay gets picked");
        // No key for epoch 9 in this document.
        assert!(matches!(
            topo.client_route(&mut rng, 9, &entry, &exit),
            Err(TopologyError::NoRoute(_))
        ));
        // Entry and exit must be gateways.
        let relay = topo.layer(0)[0];
        assert!(topo.client_route(&mut rng, 7, &relay, &exit).is_err());
        assert!(topo.client_route(&mut rng, 7, &entry, &[0; 32]).is_err());
    }

    #[test]
    fn loop_routes_follow_the_layer_cycle_back_home() {
        let topo = topology();
        let mut rng = StdRng::seed_from_u64(4);
        // Position of a node in the cycle [gateway, L1, L2, L3].
        let position = |id: &NodeId| {
            topo.node(id)
                .unwrap()
                .layer
                .map_or(0, |l| usize::from(l) + 1)
        };
        let mut homes = topo.gateways().to_vec();
        homes.extend((0..3).map(|l| topo.layer(l)[0]));
        for me in homes {
            for epoch in [7, 8] {
                let route = topo.loop_route(&mut rng, epoch, &me).unwrap();
                assert_eq!(route.len(), 4);
                assert_eq!(route[3].address, me);
                let mut pos = position(&me);
                for hop in &route {
                    pos = (pos + 1) % 4;
                    assert_eq!(position(&hop.address), pos);
                    assert_eq!(
                        hop.sphinx_key.to_bytes(),
                        key_of(&topo, &hop.address, epoch)
                    );
                }
            }
        }
        assert!(matches!(
            topo.loop_route(&mut rng, 7, &[0; 32]),
            Err(TopologyError::UnknownNode)
        ));
    }

    #[test]
    fn empty_layer_gives_no_route() {
        let mut body = sample_body();
        body.nodes.retain(|n| n.layer != Some(1));
        let signed = sign(&body.to_bytes().unwrap(), &[&authority_key(0)]);
        let topo = UncheckedDocument::from_signed(signed)
            .unwrap()
            .dangerously_assume_signed()
            .dangerously_assume_timely()
            .unwrap();
        let mut rng = StdRng::seed_from_u64(5);
        let (entry, exit) = (topo.gateways()[0], topo.gateways()[1]);
        assert!(matches!(
            topo.client_route(&mut rng, 7, &entry, &exit),
            Err(TopologyError::NoRoute(_))
        ));
    }

    #[test]
    fn delays_have_the_configured_mean_and_cap() {
        let mut rng = StdRng::seed_from_u64(6);
        let params = NetworkParams::default();
        let n = 40_000;
        let delays = sample_delays(&mut rng, &params, n);
        assert_eq!(delays.len(), n);
        let mean_ms = delays.iter().map(Duration::as_secs_f64).sum::<f64>() * 1000.0 / n as f64;
        // Standard error of the mean of Exp is mean/sqrt(n) = 0.25 ms; allow 3%.
        assert!(
            (mean_ms - params.mean_hop_delay_ms).abs() < 0.03 * params.mean_hop_delay_ms,
            "{mean_ms}"
        );
        let cap = Duration::from_secs_f64(params.max_hop_delay_ms / 1000.0);
        assert!(delays.iter().all(|d| *d <= cap));

        // A tight cap binds: nothing above it, and a good share exactly at it.
        let tight = NetworkParams {
            max_hop_delay_ms: 60.0,
            ..params
        };
        let delays = sample_delays(&mut rng, &tight, 10_000);
        let cap = Duration::from_secs_f64(0.060);
        assert!(delays.iter().all(|d| *d <= cap));
        let at_cap = delays.iter().filter(|d| **d == cap).count();
        // P(Exp(mean 50) > 60) = e^-1.2 ≈ 0.30.
        assert!((2_500..3_500).contains(&at_cap), "{at_cap}");
        assert!(sample_delays(&mut rng, &tight, 0).is_empty());
    }
}

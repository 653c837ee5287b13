//! Route selection and per-hop delays.
//!
//! Client routes are `[entry gateway, L1, L2, L3, exit gateway]` with one relay drawn
//! uniformly from each layer among those that keep the route diverse. A mix-node loop
//! follows the same layered cycle from the node's own position back to itself, so it is
//! carried on exactly the links ordinary traffic uses.
//!
//! Diversity: a route never holds two nodes of one operator (family); the entry and exit
//! gateways are given, so the relays avoid their operators too. Where a layer has a
//! relay outside every network (/16) already on the route, only such relays are drawn.
//! No weight comes from anything a node says about itself: the draw is uniform over
//! the eligible relays.

use std::time::Duration;

use rand::{Rng, RngExt};
use rand_distr::{Distribution, Exp};
use shoal_packet::sphinx::Hop;
use x25519_dalek::PublicKey;

use crate::{NetworkParams, NodeId, Role, Topology, TopologyError};

/// Fresh starts a route gets when a diverse pick meets a dead end.
const ROUTE_ATTEMPTS: usize = 16;

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

    /// One of `ids` drawn uniformly among those whose operator is not on `route` yet,
    /// and, if any is left, whose network is not either.
    fn pick_diverse<R: Rng + ?Sized>(
        &self,
        rng: &mut R,
        ids: &[NodeId],
        route: &[NodeId],
        what: &str,
    ) -> Result<NodeId, TopologyError> {
        if ids.is_empty() {
            return Err(TopologyError::NoRoute(format!("{what} is empty")));
        }
        let on_route: Vec<&crate::document::RoutingNode> =
            route.iter().filter_map(|id| self.node(id)).collect();
        let other_family: Vec<NodeId> = ids
            .iter()
            .filter(|id| {
                self.node(id)
                    .is_some_and(|n| on_route.iter().all(|r| r.operator != n.operator))
            })
            .copied()
            .collect();
        if other_family.is_empty() {
            return Err(TopologyError::NoRoute(format!(
                "every node of {what} is run by an operator already on the route"
            )));
        }
        let other_network: Vec<NodeId> = other_family
            .iter()
            .filter(|id| {
                self.node(id)
                    .is_some_and(|n| on_route.iter().all(|r| r.group != n.group))
            })
            .copied()
            .collect();
        let pool = if other_network.is_empty() {
            other_family
        } else {
            other_network
        };
        Self::pick(rng, &pool, what)
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
        // Layer by layer; an early pick can leave a later layer with only families
        // already on the route, so a dead end starts over (a few times: it is rare
        // unless one family dominates a layer, which `max_per_layer` prevents).
        let mut last = None;
        for _ in 0..ROUTE_ATTEMPTS {
            let mut chosen = vec![*entry, *exit];
            let relays: Result<Vec<NodeId>, TopologyError> = (0..shoal_packet::MIX_LAYERS)
                .map(|l| {
                    let id = self.pick_diverse(rng, self.layer(l), &chosen, "a mix layer")?;
                    chosen.push(id);
                    Ok(id)
                })
                .collect();
            match relays {
                Ok(relays) => {
                    let mut route = vec![self.hop(entry, key_epoch)?];
                    for id in &relays {
                        route.push(self.hop(id, key_epoch)?);
                    }
                    route.push(self.hop(exit, key_epoch)?);
                    return Ok(route);
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| TopologyError::NoRoute("no attempt made".into())))
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
        let mut last = None;
        'attempt: for _ in 0..ROUTE_ATTEMPTS {
            let mut chosen = vec![*me];
            for step in 1..positions {
                let pos = (start + step) % positions;
                let id = if pos == 0 {
                    self.pick_diverse(rng, self.gateways(), &chosen, "the gateway list")
                } else {
                    self.pick_diverse(rng, self.layer(pos - 1), &chosen, "a mix layer")
                };
                match id {
                    Ok(id) => chosen.push(id),
                    Err(e) => {
                        last = Some(e);
                        continue 'attempt;
                    }
                }
            }
            let mut route = Vec::with_capacity(positions);
            for id in chosen[1..].iter().chain([me]) {
                route.push(self.hop(id, key_epoch)?);
            }
            return Ok(route);
        }
        Err(last.unwrap_or_else(|| TopologyError::NoRoute("no attempt made".into())))
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

    /// A topology of `per_layer` relays per layer and `gateways` gateways, every node
    /// its own operator at its own /16, except that `hostile(i)` relays belong to one
    /// operator (relays are numbered 0.. across layers).
    fn big_topology(
        per_layer: usize,
        gateways: usize,
        hostile: impl Fn(usize) -> bool,
        same_network: bool,
    ) -> Topology {
        use crate::{DocumentBody, EpochSchedule, Hex32, NodeEntry, SphinxKeyEntry};
        let family = Hex32([0xee; 32]);
        let id = |i: usize| {
            let mut b = [0u8; 32];
            b[..8].copy_from_slice(&(i as u64 + 1).to_be_bytes());
            b
        };
        let key = Hex32(
            x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from([9; 32])).to_bytes(),
        );
        let mut nodes = Vec::new();
        for i in 0..per_layer * 3 + gateways {
            let relay = i < per_layer * 3;
            let addr = if same_network {
                format!("10.0.{}.{}:4000", i / 256, i % 256)
            } else {
                format!("{}.{}.0.1:4000", 10 + i / 256, i % 256)
            };
            nodes.push(NodeEntry {
                identity: Hex32(id(i)),
                role: if relay { Role::Relay } else { Role::Gateway },
                layer: relay.then_some((i / per_layer) as u8),
                link_addr: addr,
                sphinx_keys: vec![SphinxKeyEntry { epoch: 7, key }],
                operator: if relay && hostile(i) {
                    family
                } else {
                    Hex32(id(i))
                },
            });
        }
        nodes.sort_by_key(|n| n.identity);
        let body = DocumentBody {
            epoch: 7,
            valid_after: 1600,
            valid_until: 1860,
            schedule: EpochSchedule {
                genesis_unix: 1000,
                length_secs: 100,
            },
            layers: 3,
            params: NetworkParams::default(),
            shared_random: Hex32([0; 32]),
            nodes,
        };
        UncheckedDocument::from_signed(sign(&body.to_bytes().unwrap(), &[&authority_key(0)]))
            .unwrap()
            .dangerously_assume_signed()
            .dangerously_assume_timely()
            .unwrap()
    }

    /// With 20% of the relays run by one hostile operator, spread over all layers, no
    /// route has two of its nodes; uniform selection (the protection off) gives such
    /// routes about 10% of the time, and fully hostile ones 0.8%.
    #[test]
    fn family_20_percent_hostile_never_takes_two_hops() {
        let per_layer = 30;
        let hostile = |i: usize| i.is_multiple_of(5);
        let topo = big_topology(per_layer, 10, hostile, false);
        let family = [0xee; 32];
        let is_hostile = |id: &NodeId| topo.node(id).unwrap().operator == family;
        let hostile_share =
            topo.nodes().filter(|n| n.operator == family).count() as f64 / (per_layer * 3) as f64;
        assert!((hostile_share - 0.2).abs() < 1e-9);
        let mut rng = StdRng::seed_from_u64(20);
        let (entry, exit) = (topo.gateways()[0], topo.gateways()[1]);
        let n = 20_000;
        let (mut two, mut all_three) = (0, 0);
        let (mut base_two, mut base_three) = (0, 0);
        for _ in 0..n {
            let route = topo.client_route(&mut rng, 7, &entry, &exit).unwrap();
            let h = route.iter().filter(|h| is_hostile(&h.address)).count();
            two += usize::from(h >= 2);
            all_three += usize::from(h == 3);
            // The protection off: one relay per layer, uniformly.
            let h = (0..3)
                .map(|l| Topology::pick(&mut rng, topo.layer(l), "layer").unwrap())
                .filter(is_hostile)
                .count();
            base_two += usize::from(h >= 2);
            base_three += usize::from(h == 3);
        }
        assert_eq!((two, all_three), (0, 0));
        // P(at least two of three) = 3 * 0.04 * 0.8 + 0.008 = 0.104.
        let base = base_two as f64 / n as f64;
        assert!((0.09..0.12).contains(&base), "{base}");
        assert!(base_three > 0);
    }

    /// A family that holds relays in two layers can take at most one hop of a route,
    /// also when it holds every relay but one of a layer; where it holds a whole layer
    /// and a relay elsewhere, the route avoids its other relay.
    #[test]
    fn family_cannot_take_two_hops_of_one_route() {
        // Layer 0: relays 0..4 (0, 1, 2 hostile); layer 1: 4..8 (4 hostile); layer 2: 8..12.
        let topo = big_topology(4, 2, |i| [0, 1, 2, 4].contains(&i), false);
        let family = [0xee; 32];
        let mut rng = StdRng::seed_from_u64(21);
        let (entry, exit) = (topo.gateways()[0], topo.gateways()[1]);
        let mut hostile_hops = [0usize; 3];
        for _ in 0..4000 {
            let route = topo.client_route(&mut rng, 7, &entry, &exit).unwrap();
            let h: Vec<bool> = route[1..4]
                .iter()
                .map(|h| topo.node(&h.address).unwrap().operator == family)
                .collect();
            assert!(h.iter().filter(|x| **x).count() <= 1, "{h:?}");
            for (l, x) in h.iter().enumerate() {
                hostile_hops[l] += usize::from(*x);
            }
        }
        assert!(hostile_hops[0] > 0 && hostile_hops[1] > 0);
        // Loops too.
        let me = topo.layer(2)[0];
        for _ in 0..500 {
            let route = topo.loop_route(&mut rng, 7, &me).unwrap();
            let h = route
                .iter()
                .filter(|h| topo.node(&h.address).unwrap().operator == family)
                .count();
            assert!(h <= 1);
        }
        // A family holding all of layers 0 and 1: no route at all, rather than one
        // through two of its relays.
        let topo = big_topology(2, 2, |i| i < 4, false);
        let (entry, exit) = (topo.gateways()[0], topo.gateways()[1]);
        assert!(matches!(
            topo.client_route(&mut rng, 7, &entry, &exit),
            Err(TopologyError::NoRoute(_))
        ));
    }

    /// Relays in one /16 are not combined where the network has others; where every
    /// relay is in one /16 (a small network), routes are still built.
    #[test]
    fn family_of_one_network_is_kept_apart_where_possible() {
        let topo = big_topology(6, 2, |_| false, false);
        let mut rng = StdRng::seed_from_u64(22);
        let (entry, exit) = (topo.gateways()[0], topo.gateways()[1]);
        for _ in 0..500 {
            let route = topo.client_route(&mut rng, 7, &entry, &exit).unwrap();
            let groups: std::collections::BTreeSet<[u8; 5]> = route
                .iter()
                .map(|h| topo.node(&h.address).unwrap().group)
                .collect();
            assert_eq!(groups.len(), 5);
        }
        let one_net = big_topology(6, 2, |_| false, true);
        let (entry, exit) = (one_net.gateways()[0], one_net.gateways()[1]);
        one_net.client_route(&mut rng, 7, &entry, &exit).unwrap();
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

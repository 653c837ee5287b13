//! A hand-built network for tests: a one-authority directory, and the hops played with
//! the packet crate's `unwrap`, including the exit gateway's use of the ack slot.

use std::collections::HashMap;
use std::sync::Arc;

use ed25519_dalek::SigningKey;
use rand::rngs::StdRng;
use shoal_packet::sphinx::{self, MailboxAddress, SurbId, Unwrapped};
use shoal_packet::{Frame, PacketError, ReplayFilter, payload};
use shoal_topology::{
    Authority, AuthorityConfig, AuthoritySet, Descriptor, EpochSchedule, Hex32, NetworkParams,
    NodeId, Role, SphinxKeyEntry, Topology, UncheckedDocument,
};
use x25519_dalek::StaticSecret;

/// What arrived at an exit gateway.
#[derive(Debug, Clone)]
pub(crate) struct Arrival {
    pub exit: NodeId,
    pub mailbox: MailboxAddress,
    pub surb_id: SurbId,
    pub payload: Vec<u8>,
}

pub(crate) struct TestNet {
    pub topo: Arc<Topology>,
    pub gateways: Vec<NodeId>,
    secrets: HashMap<NodeId, StaticSecret>,
    filters: HashMap<NodeId, ReplayFilter>,
}

impl TestNet {
    /// Two gateways and two relays per layer, epoch 0, through the real checking chain.
    pub fn new(rng: &mut StdRng, params: NetworkParams) -> Self {
        let auth_key = SigningKey::generate(rng);
        let set = AuthoritySet {
            threshold: 1,
            keys: vec![Hex32(auth_key.verifying_key().to_bytes())],
        };
        let mut authority = Authority::new(
            auth_key,
            AuthorityConfig {
                authorities: set.clone(),
                schedule: EpochSchedule {
                    genesis_unix: 0,
                    length_secs: 3600,
                },
                params,
                descriptor_max_age_secs: 86_400,
                vote_lead_secs: 60,
                bootstrap_delay_secs: 0,
                admission: Default::default(),
            },
        )
        .unwrap();
        let mut secrets = HashMap::new();
        let mut gateways = Vec::new();
        for (i, role) in [Role::Gateway, Role::Gateway]
            .into_iter()
            .chain(std::iter::repeat_n(Role::Relay, 6))
            .enumerate()
        {
            let identity = SigningKey::generate(rng);
            let (secret, public) = sphinx::generate_key(rng);
            let d = Descriptor {
                identity: Hex32(identity.verifying_key().to_bytes()),
                role,
                link_addr: format!("127.0.0.1:{}", 4000 + i),
                sphinx_keys: vec![SphinxKeyEntry {
                    epoch: 0,
                    key: Hex32(public.to_bytes()),
                }],
                published_unix: 100,
                version: None,
            };
            secrets.insert(d.id(), secret);
            if role == Role::Gateway {
                gateways.push(d.id());
            }
            let operator = shoal_topology::operator::solo_operator_key(&identity);
            authority
                .admit(shoal_topology::AdmittedOperator::solo(&operator, "test"))
                .unwrap();
            let cert = shoal_topology::NodeCertificate::issue(&operator, d.id(), role);
            authority
                .handle_descriptor(d.sign(&identity).unwrap().certified(cert), 100)
                .unwrap();
        }
        authority.vote(0).unwrap();
        let doc = authority.document(0).unwrap().clone();
        let topo = UncheckedDocument::from_signed(doc)
            .unwrap()
            .check_signatures(&set)
            .unwrap()
            .check_valid_at(100)
            .unwrap();
        let filters = secrets
            .keys()
            .map(|id| (*id, ReplayFilter::new(0, 1 << 20)))
            .collect();
        TestNet {
            topo: Arc::new(topo),
            gateways,
            secrets,
            filters,
        }
    }

    /// Unwraps hop by hop from `first` until the packet reaches its exit.
    pub fn walk(&self, first: NodeId, packet: &[u8]) -> Result<Arrival, PacketError> {
        let mut node = first;
        let mut packet = packet.to_vec();
        for _ in 0..shoal_packet::ROUTE_HOPS {
            let secret = self
                .secrets
                .get(&node)
                .ok_or(PacketError::Route("unknown node"))?;
            let filter = &self.filters[&node];
            match sphinx::unwrap(secret, 0, filter, &packet)? {
                Unwrapped::Forward {
                    next_hop,
                    packet: next,
                    ..
                } => {
                    node = next_hop;
                    packet = next;
                }
                Unwrapped::Final {
                    destination,
                    surb_id,
                    payload,
                } => {
                    return Ok(Arrival {
                        exit: node,
                        mailbox: destination,
                        surb_id,
                        payload,
                    });
                }
            }
        }
        Err(PacketError::Route("too many hops"))
    }

    /// A frame the client handed to its gateway `entry`.
    pub fn deliver(&self, entry: NodeId, frame: &Frame) -> Arrival {
        assert_eq!(frame.key_epoch(), 0);
        self.walk(entry, frame.body()).unwrap()
    }

    /// What the exit gateway does once a forward packet is durable: send the ack slot's
    /// message through its SURB, if the SURB's first hop is a node. Returns the ack's
    /// arrival, or `None` for a slot it must discard (drops).
    pub fn exit_ack(&self, arrival: &Arrival) -> Option<Arrival> {
        let plaintext = sphinx::open_forward(&arrival.payload).ok()?;
        let (slot, _) = payload::split_plaintext(&plaintext).ok()?;
        let reply = sphinx::use_surb(&slot.surb, &slot.message).ok()?;
        if !self.secrets.contains_key(&reply.first_hop) {
            return None;
        }
        // Acks enter the mix at layer 1, as the crate documents.
        assert_eq!(
            self.topo.node(&reply.first_hop).and_then(|n| n.layer),
            Some(0)
        );
        Some(self.walk(reply.first_hop, &reply.packet).unwrap())
    }
}

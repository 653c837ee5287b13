//! `shoal bench client`: what a client spends to build packets and to send to groups,
//! against the raw `sphinx-packet` build rate measured in the same run.
//!
//! Everything runs on one thread and is timed in that thread's CPU time
//! (`/proc/thread-self/schedstat`), so other load on the machine changes wall time but
//! not the figures.
//!
//! - **raw ceiling**: `sphinx-packet`'s own builder for one 5-hop forward packet plus
//!   one 4-hop SURB (the ack's route: L1, L2, L3, back to the sender's gateway), which
//!   is exactly the Sphinx work of one real client packet.
//! - **Shoal's builder**: the same packet and SURB built by `shoal_packet::sphinx`
//!   (`build_forward`, `build_surb`: one X25519 ladder per hop where the crate spends
//!   `n(n+1)/2`); `build_speedup_vs_sphinx_packet` divides its rate by the crate's.
//! - **client path**: a real [`ClientCore`] with a directory that went through the
//!   whole checking chain, messages queued with `send_message`, λP slots fired with
//!   `handle_timeout`: seal, fragment encoding, ack SURB, forward packet, framing and
//!   the bookkeeping for acks and retransmission. `ratio` divides the two rates.
//! - **groups**: an MLS group of n members (real [`GroupManager`]s, admin-signed
//!   credentials), one application message encrypted by the sender, then each copy
//!   queued and built by the sender's `ClientCore`. CPU time and packets per send are
//!   fitted against the number of recipients.
//!
//! The idle client's CPU share and RSS at default rates are `shoal bench e2e`'s
//! (measured on a real `shoal client run` process); they are not repeated here.

use std::sync::Arc;
use std::time::Instant;

use ed25519_dalek::SigningKey;
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde::Serialize;
use shoal_client::group::{GroupConfig, GroupManager, contact_of};
use shoal_client::{ClientConfig, ClientCore, Identity};
use shoal_packet::{PLAINTEXT_SIZE, sphinx};
use shoal_subnet::{
    BurnOnRead, CredentialBody, MessageOptions, Policy, PolicyBody, RoleRule, SignedCredential,
    SubnetAdmin,
};
use shoal_topology::{
    Authority, AuthorityConfig, AuthoritySet, Descriptor, EpochSchedule, Hex32, NetworkParams,
    NodeId, Role, SphinxKeyEntry, Topology, UncheckedDocument,
};
use sphinx_packet::SphinxPacketBuilder;
use sphinx_packet::header::delays::Delay;
use sphinx_packet::route::{Destination, DestinationAddressBytes, Node, NodeAddressBytes};
use sphinx_packet::surb::{SURB, SURBMaterial};
use sphinx_packet::version::SINGLE_SEED_SURB_VERSION;
use x25519_dalek::StaticSecret;

use crate::ceiling::thread_cpu_ns;

/// Knobs of the client benchmark.
#[derive(Debug, Clone)]
pub struct ClientBenchOptions {
    /// Packets built in each of the raw and client measurements.
    pub packets: usize,
    /// Group sizes (members including the sender).
    pub group_sizes: Vec<usize>,
    /// Sends measured per group size.
    pub sends_per_size: usize,
}

impl Default for ClientBenchOptions {
    fn default() -> Self {
        ClientBenchOptions {
            packets: 600,
            group_sizes: vec![1, 2, 4, 8, 16, 32, 64, 128, 256],
            sends_per_size: 2,
        }
    }
}

/// One group size.
#[derive(Debug, Clone, Serialize)]
pub struct GroupPoint {
    pub members: usize,
    pub recipients: usize,
    /// MLS encryption of the one application message.
    pub mls_cpu_ms: f64,
    /// Queueing every copy and building its packets (seal, SURB-ack, forward packet).
    pub packets_cpu_ms: f64,
    pub cpu_ms_per_send: f64,
    pub packets_per_send: f64,
}

/// Everything `shoal bench client --json` prints.
#[derive(Debug, Clone, Serialize)]
pub struct ClientReport {
    /// Raw `sphinx-packet`: one 5-hop forward packet + one 4-hop SURB, per CPU-second.
    pub raw_packets_per_cpu_sec: f64,
    /// The client's real build path (real packets with their SURB-acks), per CPU-second.
    pub client_packets_per_cpu_sec: f64,
    /// client / raw (target ≥ 0.9).
    pub ratio: f64,
    /// Shoal's own builder (`sphinx::build_forward` + `sphinx::build_surb`) for the same
    /// 5-hop packet + 4-hop SURB, per CPU-second.
    pub shoal_packets_per_cpu_sec: f64,
    /// Shoal's builder / raw `sphinx-packet`, measured in the same run (target ≥ 2.2).
    pub build_speedup_vs_sphinx_packet: f64,
    /// client / Shoal's builder: what the client adds on top of the Sphinx work it does.
    pub ratio_vs_shoal_build: f64,
    pub shoal_build_us: f64,
    /// The same with the end-to-end seal's own X25519 work taken out of the client's
    /// time (measured separately): what the Sphinx wrapping costs over the raw crate.
    pub ratio_excluding_seal: f64,
    pub seal_us: f64,
    pub raw_build_us: f64,
    pub client_build_us: f64,
    pub groups: Vec<GroupPoint>,
    /// Least-squares fit cpu_ms_per_send = fixed + per_recipient × recipients.
    pub group_fixed_cpu_ms: f64,
    pub group_per_recipient_cpu_ms: f64,
    /// The largest (marginal cost between consecutive sizes) / fitted per-recipient cost;
    /// 1.0 is perfectly linear.
    pub group_worst_superlinear_ratio: f64,
    /// Packets per send / recipients, worst over sizes with at least one recipient.
    pub group_packets_per_recipient_max: f64,
}

/// A small network as a real, signature-checked directory: two gateways and two relays
/// per layer, with the given parameters.
pub fn topology(
    rng: &mut StdRng,
    params: NetworkParams,
) -> anyhow::Result<(Arc<Topology>, Vec<NodeId>)> {
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
    )?;
    let mut gateways = Vec::new();
    for (i, role) in [Role::Gateway, Role::Gateway]
        .into_iter()
        .chain(std::iter::repeat_n(Role::Relay, 6))
        .enumerate()
    {
        let identity = SigningKey::generate(rng);
        let (_, public) = shoal_packet::sphinx::generate_key(rng);
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
        if role == Role::Gateway {
            gateways.push(d.id());
        }
        let operator = shoal_topology::operator::solo_operator_key(&identity);
        authority.admit(shoal_topology::AdmittedOperator::solo(&operator, "bench"))?;
        let cert = shoal_topology::NodeCertificate::issue(&operator, d.id(), role);
        authority.handle_descriptor(d.sign(&identity)?.certified(cert), 100)?;
    }
    authority.vote(0)?;
    let doc = authority
        .document(0)
        .ok_or_else(|| anyhow::anyhow!("the authority published no document"))?
        .clone();
    let topo = UncheckedDocument::from_signed(doc)?
        .check_signatures(&set)?
        .check_valid_at(100)?;
    Ok((Arc::new(topo), gateways))
}

fn cpu_ns() -> u64 {
    thread_cpu_ns().unwrap_or(0)
}

/// The routes both build-rate measurements use: a 5-hop packet from one gateway to the
/// other, and its 4-hop SURB-ack back to the first.
fn bench_routes(
    topo: &Topology,
    gateways: &[NodeId],
    rng: &mut StdRng,
) -> anyhow::Result<(
    Vec<shoal_packet::sphinx::Hop>,
    Vec<shoal_packet::sphinx::Hop>,
)> {
    let route = topo.client_route(rng, 0, &gateways[0], &gateways[1])?;
    let ack_route = topo
        .client_route(rng, 0, &gateways[0], &gateways[0])?
        .split_off(1);
    Ok((route, ack_route))
}

/// Per CPU-second of one 5-hop forward packet + one 4-hop SURB with the bare crate.
fn raw_rate(
    topo: &Topology,
    gateways: &[NodeId],
    n: usize,
    rng: &mut StdRng,
) -> anyhow::Result<f64> {
    let (route, ack_route) = bench_routes(topo, gateways, rng)?;
    let nodes = |r: &[shoal_packet::sphinx::Hop]| -> Vec<Node> {
        r.iter()
            .map(|h| Node::new(NodeAddressBytes::from_bytes(h.address), h.sphinx_key))
            .collect()
    };
    let (fwd, ack) = (nodes(&route), nodes(&ack_route));
    let delays = |k: usize| vec![Delay::new_from_nanos(20_000_000); k];
    let plaintext = vec![7u8; PLAINTEXT_SIZE];
    let start = cpu_ns();
    for i in 0..n {
        let dest = Destination::new(
            DestinationAddressBytes::from_bytes([3; 32]),
            [(i % 255) as u8 + 1; 16],
        );
        let packet = SphinxPacketBuilder::new()
            .with_payload_size(shoal_packet::SPHINX_PAYLOAD_SIZE)
            .with_initial_secret(&StaticSecret::random_from_rng(&mut *rng))
            .build_packet(&plaintext, &fwd, &dest, &delays(fwd.len()))?;
        let material = SURBMaterial::new(
            ack.clone(),
            delays(ack.len()),
            dest,
            SINGLE_SEED_SURB_VERSION,
        );
        let surb = SURB::new_recoverable(StaticSecret::random_from_rng(&mut *rng), material)?;
        std::hint::black_box((packet.to_bytes(), surb.0.to_bytes()));
    }
    Ok(n as f64 / ((cpu_ns() - start) as f64 / 1e9))
}

/// The same as [`raw_rate`] with Shoal's builder (what the client runs).
fn shoal_rate(
    topo: &Topology,
    gateways: &[NodeId],
    n: usize,
    rng: &mut StdRng,
) -> anyhow::Result<f64> {
    let (route, ack_route) = bench_routes(topo, gateways, rng)?;
    let delays = |k: usize| vec![std::time::Duration::from_millis(20); k];
    let plaintext = vec![7u8; PLAINTEXT_SIZE];
    let start = cpu_ns();
    for _ in 0..n {
        let (packet, _) =
            sphinx::build_forward(rng, &route, &delays(route.len()), &[3; 32], &plaintext)?;
        let surb = sphinx::build_surb(rng, &ack_route, &delays(ack_route.len()), &[3; 32])?;
        std::hint::black_box((packet, surb));
    }
    Ok(n as f64 / ((cpu_ns() - start) as f64 / 1e9))
}

/// A client whose λP stream fires often enough to drain any queue in virtual time.
fn fast_client(topo: &Arc<Topology>, gateway: NodeId, rng: &mut StdRng) -> (ClientCore, Instant) {
    let mut core = ClientCore::new(
        Identity::generate(rng, gateway),
        ClientConfig::default(),
        rng,
    );
    let now = Instant::now();
    core.set_topology(topo.clone(), now);
    (core, now)
}

/// Fires λP slots in virtual time until `real` more real packets went out; returns the
/// frames produced and the virtual time reached.
fn drain(core: &mut ClientCore, rng: &mut StdRng, mut now: Instant, real: u64) -> (u64, Instant) {
    let target = core.stats().real_sent + real;
    let mut frames = 0;
    let mut guard = 0u64;
    while core.stats().real_sent < target && guard < 10 * real + 100 {
        now = core.poll_timeout().unwrap_or(now).max(now);
        core.handle_timeout(now, rng);
        while core.poll_transmit().is_some() {
            frames += 1;
        }
        guard += 1;
    }
    (frames, now)
}

fn seal_us(rng: &mut StdRng, n: usize) -> anyhow::Result<f64> {
    let to = x25519_dalek::PublicKey::from(&StaticSecret::random_from_rng(&mut *rng));
    let body = vec![1u8; shoal_packet::payload::INNER_BODY_SIZE];
    let start = cpu_ns();
    for _ in 0..n {
        std::hint::black_box(shoal_client::seal::seal(rng, &to, &body)?);
    }
    Ok((cpu_ns() - start) as f64 / 1e3 / n as f64)
}

struct Org {
    admin: SubnetAdmin,
    policy: Policy,
}

impl Org {
    fn new(rng: &mut StdRng) -> anyhow::Result<Self> {
        let admin = SubnetAdmin::new(SigningKey::generate(rng));
        let body = PolicyBody {
            subnet: admin.subnet(),
            version: 1,
            issued_at: 1000,
            roles: vec!["staff".into()],
            rules: vec![RoleRule {
                from: "staff".into(),
                to: "staff".into(),
            }],
            federation: vec![],
            ttl_min_secs: 60,
            ttl_max_secs: 86_400,
            burn_on_read: BurnOnRead::Allowed,
            revoked_keys: vec![],
            revoked_handles: vec![],
        };
        let policy = Policy::verify(&admin.issue_policy(body)?.to_bytes(), &admin.subnet())?;
        Ok(Org { admin, policy })
    }

    fn member(&self, i: usize, gateway: NodeId, now_ms: u64) -> anyhow::Result<GroupManager> {
        let mut seed = [0u8; 32];
        seed[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
        seed[31] = 0x5a;
        let key = SigningKey::from_bytes(&seed);
        let cred: SignedCredential = self.admin.issue_credential(CredentialBody {
            subnet: self.admin.subnet(),
            handle: format!("m{i}"),
            role: "staff".into(),
            signing_key: Hex32(key.verifying_key().to_bytes()),
            seal_key: Hex32(x25519_dalek::PublicKey::from(&StaticSecret::from(seed)).to_bytes()),
            mailbox: Hex32(seed),
            gateway: Hex32(gateway),
            not_before: 1000,
            not_after: 100_000,
        })?;
        let own = shoal_client::Contact {
            mailbox: seed,
            gateway,
            public_key: x25519_dalek::PublicKey::from(&StaticSecret::from(seed)).to_bytes(),
        };
        Ok(GroupManager::new(
            seed,
            own,
            &cred,
            self.policy.clone(),
            GroupConfig {
                commit_settle_ms: SETTLE_MS,
            },
            now_ms,
        )?)
    }
}

const NOW_MS: u64 = 1_500_000;
const SETTLE_MS: u64 = 1_000;

/// One group of `n` members; measures `sends` application sends by member 0.
fn group_point(
    org: &Org,
    topo: &Arc<Topology>,
    gateways: &[NodeId],
    n: usize,
    sends: usize,
    rng: &mut StdRng,
) -> anyhow::Result<GroupPoint> {
    let mut creator = org.member(0, gateways[0], NOW_MS)?;
    let g = creator.create_group(NOW_MS)?;
    if n > 1 {
        let mut kps = Vec::with_capacity(n - 1);
        for i in 1..n {
            kps.push(org.member(i, gateways[1], NOW_MS)?.key_package()?);
        }
        let refs: Vec<&[u8]> = kps.iter().map(Vec::as_slice).collect();
        creator.add_members(&g, &refs, NOW_MS)?;
        creator.handle_timeout(NOW_MS + SETTLE_MS);
        while creator.poll_outgoing().is_some() {}
    }
    let (mut core, mut now) = fast_client(topo, gateways[0], rng);
    let opts = MessageOptions {
        ttl_secs: 3600,
        burn_on_read: false,
    };
    let (mut mls_ns, mut pkt_ns, mut packets, mut recipients) = (0u64, 0u64, 0u64, 0usize);
    let t = NOW_MS + 2 * SETTLE_MS;
    for s in 0..sends {
        let c0 = cpu_ns();
        creator.send(&g, opts, &[s as u8; 100], t)?;
        let out = creator
            .poll_outgoing()
            .ok_or_else(|| anyhow::anyhow!("no outgoing group message"))?;
        let c1 = cpu_ns();
        let before = core.stats().real_sent;
        for r in &out.recipients {
            core.send_message(rng, contact_of(r), &out.bytes)?;
        }
        let queued = core.stats().queued_fragments as u64;
        let (_, reached) = drain(&mut core, rng, now, queued);
        now = reached;
        let c2 = cpu_ns();
        mls_ns += c1 - c0;
        pkt_ns += c2 - c1;
        packets += core.stats().real_sent - before;
        recipients = out.recipients.len();
    }
    let per = |ns: u64| ns as f64 / 1e6 / sends as f64;
    Ok(GroupPoint {
        members: n,
        recipients,
        mls_cpu_ms: per(mls_ns),
        packets_cpu_ms: per(pkt_ns),
        cpu_ms_per_send: per(mls_ns + pkt_ns),
        packets_per_send: packets as f64 / sends as f64,
    })
}

/// (fixed, per-unit) least-squares line through `points`.
pub fn fit(points: &[(f64, f64)]) -> (f64, f64) {
    let n = points.len() as f64;
    if points.len() < 2 {
        return (points.first().map_or(0.0, |p| p.1), 0.0);
    }
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let b = if sxx == 0.0 { 0.0 } else { sxy / sxx };
    (my - b * mx, b)
}

/// Worst marginal cost between consecutive points over the fitted slope.
pub fn worst_superlinear(points: &[(f64, f64)], slope: f64) -> f64 {
    points
        .windows(2)
        .filter(|w| w[1].0 > w[0].0)
        .map(|w| ((w[1].1 - w[0].1) / (w[1].0 - w[0].0)) / slope)
        .fold(0.0, f64::max)
}

/// Runs the whole benchmark on the calling thread.
pub fn run(opts: &ClientBenchOptions) -> anyhow::Result<ClientReport> {
    let mut rng = StdRng::seed_from_u64(0xc1);
    let params = NetworkParams {
        // λP high enough that every queued fragment goes out within a few virtual
        // milliseconds; λL and λD low so almost every packet built is a real one.
        lambda_p: 10_000.0,
        lambda_l: 0.001,
        lambda_d: 0.001,
        ..NetworkParams::default()
    };
    let (topo, gateways) = topology(&mut rng, params)?;
    let n = opts.packets.max(10);

    // Warm-up of both paths (page faults, caches), then the measurements interleaved
    // raw / client / raw so that drift on a shared machine falls on both alike.
    let _ = raw_rate(&topo, &gateways, 10, &mut rng)?;
    let _ = shoal_rate(&topo, &gateways, 10, &mut rng)?;
    let raw_a = raw_rate(&topo, &gateways, n / 2, &mut rng)?;
    let shoal_a = shoal_rate(&topo, &gateways, n / 2, &mut rng)?;
    let (mut core, now) = fast_client(&topo, gateways[0], &mut rng);
    let peer = Identity::generate(&mut rng, gateways[1]).contact();
    for _ in 0..n {
        core.send_message(&mut rng, peer, &[5u8; 200])?;
    }
    let (_, now) = drain(&mut core, &mut rng, now, 10);
    let start = cpu_ns();
    let before = core.stats().real_sent;
    let (frames, _) = drain(&mut core, &mut rng, now, (n - 10) as u64);
    let client_ns = cpu_ns() - start;
    let real = core.stats().real_sent - before;
    let shoal_b = shoal_rate(&topo, &gateways, n / 2, &mut rng)?;
    let raw_b = raw_rate(&topo, &gateways, n / 2, &mut rng)?;
    let raw = (raw_a + raw_b) / 2.0;
    let shoal = (shoal_a + shoal_b) / 2.0;
    // Every frame (a few λL/λD among them) is one build; count them all.
    let client = frames.max(real) as f64 / (client_ns as f64 / 1e9);
    let seal = seal_us(&mut rng, 200)?;
    let client_build_us = 1e6 / client;
    let raw_build_us = 1e6 / raw;

    let org = Org::new(&mut rng)?;
    let mut groups = Vec::new();
    for &size in &opts.group_sizes {
        groups.push(group_point(
            &org,
            &topo,
            &gateways,
            size,
            opts.sends_per_size,
            &mut rng,
        )?);
    }
    let pts: Vec<(f64, f64)> = groups
        .iter()
        .map(|g| (g.recipients as f64, g.cpu_ms_per_send))
        .collect();
    let (fixed, per) = fit(&pts);
    Ok(ClientReport {
        raw_packets_per_cpu_sec: raw,
        client_packets_per_cpu_sec: client,
        ratio: client / raw,
        shoal_packets_per_cpu_sec: shoal,
        build_speedup_vs_sphinx_packet: shoal / raw,
        ratio_vs_shoal_build: client / shoal,
        shoal_build_us: 1e6 / shoal,
        ratio_excluding_seal: raw_build_us / (client_build_us - seal).max(1e-9),
        seal_us: seal,
        raw_build_us,
        client_build_us,
        group_fixed_cpu_ms: fixed,
        group_per_recipient_cpu_ms: per,
        group_worst_superlinear_ratio: worst_superlinear(&pts, per),
        group_packets_per_recipient_max: groups
            .iter()
            .filter(|g| g.recipients > 0)
            .map(|g| g.packets_per_send / g.recipients as f64)
            .fold(0.0, f64::max),
        groups,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fit_recovers_a_line_and_flags_a_bend() {
        let line: Vec<(f64, f64)> = [1.0, 2.0, 4.0, 8.0]
            .iter()
            .map(|&x| (x, 3.0 + 2.0 * x))
            .collect();
        let (a, b) = fit(&line);
        assert!((a - 3.0).abs() < 1e-9 && (b - 2.0).abs() < 1e-9);
        assert!((worst_superlinear(&line, b) - 1.0).abs() < 1e-9);
        let bent: Vec<(f64, f64)> = [1.0, 2.0, 4.0, 8.0].iter().map(|&x| (x, x * x)).collect();
        let (_, b) = fit(&bent);
        assert!(worst_superlinear(&bent, b) > 1.2);
    }

    #[test]
    fn client_path_builds_real_packets_for_a_small_group() {
        let opts = ClientBenchOptions {
            packets: 20,
            group_sizes: vec![1, 3],
            sends_per_size: 1,
        };
        let r = run(&opts).unwrap();
        assert!(r.ratio > 0.0 && r.raw_packets_per_cpu_sec > 0.0);
        assert!(r.build_speedup_vs_sphinx_packet > 0.0 && r.shoal_packets_per_cpu_sec > 0.0);
        assert_eq!(r.groups[0].recipients, 0);
        assert_eq!(r.groups[1].recipients, 2);
        // One 100-byte application message is one fragment per recipient.
        assert_eq!(r.groups[1].packets_per_send, 2.0);
    }
}

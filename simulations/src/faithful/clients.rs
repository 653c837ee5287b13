//! Faithful mode with the production client cores: every client is a real
//! `shoal_client::ClientCore` (Loopix λP real-or-cover, λL loops, λD drops, SURB-acks on real
//! packets and loops, retransmission with backoff) wired to the harness's real relay and gateway
//! cores. See the crate README, *Faithful mode*.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use rand_distr::{Distribution, Exp1};
use shoal_client::core::{ClientConfig, ClientCore, ClientStats, DROP_MAILBOX, Event, Identity};
use shoal_packet::sphinx::{self, MailboxAddress};
use shoal_packet::{Frame, payload};
use shoal_topology::NetworkParams;

use crate::SimError;
use crate::harness::{Delivery, LinkConfig, Network};
use crate::model::ModelConfig;
use crate::model::summary::Dist;

/// Knobs of a client-driven run that model mode has no key for.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientRunOptions {
    /// λP per client (real-or-cover payload stream). Must exceed `rate_per_client`, or the
    /// client's queue grows without bound. 0 means twice `rate_per_client`.
    pub lambda_p: f64,
    /// Independent loss on every link (client links included); losses make the cores retransmit.
    pub link_loss: f64,
    /// Virtual time after `duration_s` during which the streams keep running so retransmissions
    /// and late acks can finish.
    pub drain_s: f64,
}

impl Default for ClientRunOptions {
    fn default() -> Self {
        Self {
            lambda_p: 0.0,
            link_loss: 0.0,
            drain_s: 30.0,
        }
    }
}

/// Result of a client-driven run. Latencies in seconds, for real messages handed to the client
/// cores in `[warmup_s, duration_s)`.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientRunSummary {
    pub lambda_p: f64,
    pub lambda_l: f64,
    pub lambda_d: f64,
    /// Real messages handed to `send_message` (whole run).
    pub messages: u64,
    pub measured: u64,
    pub measured_delivered: u64,
    /// `Event::MessageAcked` over the whole run.
    pub messages_acked: u64,
    /// The clients' counters, summed (`shoal_client::ClientStats`), at the end of the drain.
    pub stats: ClientStats,
    /// The same at `duration_s`: the streams keep running through the drain, so rates and
    /// overhead are read from this one.
    pub window_stats: ClientStats,
    /// Acks the exit gateways sent (one per real packet and loop that reached a mailbox).
    pub acks_sent: u64,
    /// Cover packets (λP cover, λL, λD) per real packet sent in `[0, duration_s)`.
    pub cover_per_real: f64,
    /// Arrival at the recipient's gateway minus the λP slot that carried the message's first
    /// copy: model mode's latency plus the entry gateway's mixing delay.
    pub wire_latency_s: Dist,
    pub wire_latency_variance: f64,
    /// `send_message` to the recipient's `Event::Message`: adds the wait for a λP slot.
    pub end_to_end_s: Dist,
    /// Wire latency minus the delays drawn for the packet: the fixed link part, exactly
    /// (L + 2) links when the first copy arrives.
    pub link_part_s: Dist,
}

fn bad(what: &'static str, reason: &str) -> SimError {
    SimError::Config {
        what,
        reason: reason.into(),
    }
}

/// What a gateway does with a packet for one of its mailboxes once it is stored: send the
/// ack slot's message through its SURB (as `shoal_gateway::mailbox::AckToSend` does), framed
/// with the SURB creator's key-epoch label. `None` for items with no ack slot (acks
/// themselves) or a slot naming no node.
fn gateway_ack(net: &Network, d: &Delivery) -> Option<([u8; 32], Frame)> {
    let plaintext = sphinx::open_forward(&d.payload).ok()?;
    let (slot, _) = payload::split_plaintext(&plaintext).ok()?;
    let label = payload::ack_key_epoch_label(&slot.message);
    let reply = sphinx::use_surb(&slot.surb[..], &slot.message).ok()?;
    net.topology().node(&reply.first_hop)?;
    let frame = Frame::sphinx(label, &reply.packet).ok()?;
    Some((reply.first_hop, frame))
}

fn add(s: &mut ClientStats, x: &ClientStats) {
    s.real_sent += x.real_sent;
    s.retransmissions += x.retransmissions;
    s.payload_cover_sent += x.payload_cover_sent;
    s.loops_sent += x.loops_sent;
    s.drops_sent += x.drops_sent;
    s.loops_returned += x.loops_returned;
    s.loop_acks_returned += x.loop_acks_returned;
    s.loops_lost += x.loops_lost;
    s.fragments_acked += x.fragments_acked;
    s.messages_acked += x.messages_acked;
    s.duplicate_acks += x.duplicate_acks;
    s.messages_received += x.messages_received;
    s.fragments_received += x.fragments_received;
    s.duplicate_fragments += x.duplicate_fragments;
    s.unknown_replies += x.unknown_replies;
    s.malformed_items += x.malformed_items;
    s.build_failures += x.build_failures;
    s.events_skipped_late += x.events_skipped_late;
    s.queued_fragments += x.queued_fragments;
    s.in_flight_fragments += x.in_flight_fragments;
    s.loops_outstanding += x.loops_outstanding;
}

/// Runs `config` with real client cores: `rate_per_client` real messages per second (Poisson,
/// to a uniformly random other client) queued for λP slots, plus `loop_rate` (λL) and
/// `drop_rate` (λD) cover, through 3 layers of `width` real relays and `gateways` gateways.
/// Client `i` has its mailbox at gateway `i mod gateways` and enters the network there.
pub fn run_clients(
    config: &ModelConfig,
    opts: &ClientRunOptions,
) -> Result<ClientRunSummary, SimError> {
    let v = config.validate()?;
    if v.layers != shoal_packet::MIX_LAYERS {
        return Err(bad(
            "network.layers",
            "faithful mode runs the real 3-layer route",
        ));
    }
    if v.corrupt_fraction > 0.0 || !v.corrupt_relays.is_empty() {
        return Err(bad("adversary", "faithful mode has no adversary"));
    }
    if v.clients < 2 || v.real_rate <= 0.0 {
        return Err(bad("traffic", "needs >= 2 clients and rate_per_client > 0"));
    }
    let lambda_p = if opts.lambda_p > 0.0 {
        opts.lambda_p
    } else {
        2.0 * v.real_rate
    };
    if lambda_p <= v.real_rate {
        return Err(bad("lambda_p", "must exceed rate_per_client"));
    }
    if !(0.0..1.0).contains(&opts.link_loss) || !opts.drain_s.is_finite() || opts.drain_s < 0.0 {
        return Err(bad("options", "link_loss in [0, 1), drain_s >= 0"));
    }
    let mean_ms = v.mean_hop_s * 1e3;
    let link = LinkConfig {
        latency: Duration::from_secs_f64(v.link_s),
        loss: opts.link_loss,
    };
    let params = NetworkParams {
        mean_hop_delay_ms: mean_ms,
        // As in `run`: a cap at 40 means never bites.
        max_hop_delay_ms: (40.0 * mean_ms).max(1000.0),
        lambda_p,
        lambda_l: v.loop_rate,
        lambda_d: v.drop_rate,
        lambda_m: 0.0,
        ..NetworkParams::default()
    };
    let end = v.duration_s + opts.drain_s;
    let mut net = Network::builder()
        .seed(v.seed)
        .relays_per_layer(v.width)
        .gateways(v.gateways as usize)
        .link(link)
        .client_link(link)
        .params(params)
        .epoch_secs(end.ceil() as u64 + 3600)
        .build()?;
    let gateways = net.gateways();
    let topo = Arc::new(net.topology().clone());

    // Client randomness (identities, schedules, packets, the workload) from its own stream.
    let mut rng = StdRng::seed_from_u64(v.seed ^ 0x636c_6965_6e74_7321);
    let ccfg = ClientConfig {
        send_records: usize::MAX,
        ..ClientConfig::default()
    };
    let start = net.now_instant();
    let mut clients: Vec<ClientCore> = (0..v.clients as usize)
        .map(|i| {
            let id = Identity::generate(&mut rng, gateways[i % gateways.len()]);
            let mut c = ClientCore::new(id, ccfg.clone(), &mut rng);
            c.set_topology(topo.clone(), start);
            c
        })
        .collect();
    let by_mailbox: HashMap<MailboxAddress, usize> = clients
        .iter()
        .enumerate()
        .map(|(i, c)| (c.identity().mailbox, i))
        .collect();
    let contacts: Vec<_> = clients.iter().map(ClientCore::contact).collect();

    // Real messages: each client's Poisson stream, merged (sender, recipient).
    let mut sends: Vec<(f64, u32, u32)> = Vec::new();
    for client in 0..v.clients {
        let mut t = 0.0;
        loop {
            let gap: f64 = Exp1.sample(&mut rng);
            t += gap / v.real_rate;
            if t >= v.duration_s {
                break;
            }
            let r = rng.random_range(0..v.clients - 1);
            sends.push((t, client, if r >= client { r + 1 } else { r }));
        }
    }
    sends.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));

    // message id -> (handed over at, measured); first complete arrival; first-copy send record.
    let mut handed: HashMap<[u8; 16], (f64, bool)> = HashMap::new();
    let mut delivered: HashMap<[u8; 16], f64> = HashMap::new();
    let mut records: HashMap<[u8; 16], (Instant, Duration)> = HashMap::new();
    let mut acked = 0u64;
    let mut acks_sent = 0u64;
    let mut next_send = 0usize;
    let secs = |t: Instant| t.saturating_duration_since(start).as_secs_f64();
    let sum = |clients: &[ClientCore]| {
        let mut s = ClientStats::default();
        for c in clients {
            add(&mut s, &c.stats());
        }
        s
    };
    let mut window_stats = None;

    loop {
        let t_client = clients
            .iter()
            .filter_map(ClientCore::poll_timeout)
            .min()
            .map(|t| t.saturating_duration_since(start));
        let t_send = sends.get(next_send).map(|s| Duration::from_secs_f64(s.0));
        let Some(t) = [t_client, t_send, net.next_event_at()]
            .into_iter()
            .flatten()
            .min()
        else {
            break;
        };
        if window_stats.is_none() && t.as_secs_f64() >= v.duration_s {
            window_stats = Some(sum(&clients));
        }
        if t.as_secs_f64() >= end {
            break;
        }
        net.drive_until(t)?;
        let now = net.now_instant();
        // Mailbox items: the gateway acks at once (storage is instant here) and the owner
        // takes the item at once (no pull interval).
        for d in net.take_deliveries() {
            if d.destination == DROP_MAILBOX {
                continue;
            }
            let Some(&to) = by_mailbox.get(&d.destination) else {
                continue;
            };
            if let Some((first_hop, frame)) = gateway_ack(&net, &d) {
                net.inject(&first_hop, frame)?;
                acks_sent += 1;
            }
            clients[to].handle_mailbox_item(d.surb_id, &d.payload, now);
        }
        while next_send < sends.len() && Duration::from_secs_f64(sends[next_send].0) <= t {
            let (at, from, to) = sends[next_send];
            next_send += 1;
            let body = (next_send as u64).to_be_bytes();
            let id = clients[from as usize]
                .send_message(&mut rng, contacts[to as usize], &body)
                .map_err(|e| SimError::Config {
                    what: "client send_message",
                    reason: e.to_string(),
                })?;
            handed.insert(id, (at, at >= v.warmup_s));
        }
        for c in clients.iter_mut() {
            if c.poll_timeout().is_some_and(|due| due <= now) {
                c.handle_timeout(now, &mut rng);
            }
            let entry = c.identity().gateway;
            while let Some(frame) = c.poll_transmit() {
                net.inject(&entry, frame)?;
            }
            while let Some(e) = c.poll_event() {
                match e {
                    Event::Message { message_id, .. } => {
                        delivered.entry(message_id).or_insert(secs(now));
                    }
                    Event::MessageAcked { .. } => acked += 1,
                    _ => {}
                }
            }
            for r in c.take_send_records() {
                if r.attempt == 1 {
                    records.insert(r.message_id, (r.at, r.forward_delay));
                }
            }
        }
    }

    let mut wire = Vec::new();
    let mut e2e = Vec::new();
    let mut links = Vec::new();
    let (mut measured, mut measured_delivered) = (0u64, 0u64);
    for (id, &(at, is_measured)) in &handed {
        if !is_measured {
            continue;
        }
        measured += 1;
        let Some(&got) = delivered.get(id) else {
            continue;
        };
        measured_delivered += 1;
        e2e.push(got - at);
        if let Some(&(slot, fwd)) = records.get(id) {
            let w = got - secs(slot);
            wire.push(w);
            links.push(w - fwd.as_secs_f64());
        }
    }
    // HashMap order is arbitrary: sort so sums, and so the summary, do not depend on it.
    for x in [&mut wire, &mut e2e, &mut links] {
        x.sort_by(f64::total_cmp);
    }
    let n = wire.len() as f64;
    let mean = wire.iter().sum::<f64>() / n.max(1.0);
    let variance = if wire.len() > 1 {
        wire.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    let stats = sum(&clients);
    let w = window_stats.unwrap_or_else(|| stats.clone());
    let cover = (w.payload_cover_sent + w.loops_sent + w.drops_sent) as f64;
    Ok(ClientRunSummary {
        lambda_p,
        lambda_l: v.loop_rate,
        lambda_d: v.drop_rate,
        messages: handed.len() as u64,
        measured,
        measured_delivered,
        messages_acked: acked,
        cover_per_real: if w.real_sent > 0 {
            cover / w.real_sent as f64
        } else {
            0.0
        },
        stats,
        window_stats: w,
        acks_sent,
        wire_latency_s: Dist::of(wire.into_iter()),
        wire_latency_variance: variance,
        end_to_end_s: Dist::of(e2e.into_iter()),
        link_part_s: Dist::of(links.into_iter()),
    })
}

//! Faithful mode: a model-mode workload run through the deterministic [`harness`](crate::harness),
//! so every packet is a real Sphinx packet unwrapped by the real relay cores in virtual time.
//!
//! Only the latency part of a model config is supported: 3 layers (the Sphinx route length is
//! fixed), `width` relays per layer, `gateways` gateways, a fixed `link_delay_ms` on every link
//! (client links included), Exp(`mean_hop_delay_ms`) per-hop delays, and `clients` Poisson streams
//! of real messages at `rate_per_client` for `duration_s` of virtual time. Cover traffic and
//! corrupt relays are refused rather than silently ignored.
//!
//! Structural difference from model mode: in Shoal the entry gateway is a mixing hop (a route is
//! entry gateway, L1, L2, L3, exit gateway, and every hop but the exit applies its sampled delay),
//! while model mode does not mix at gateways. [`RelayRunSummary::latency_s`] is the real
//! end-to-end latency; [`RelayRunSummary::model_equivalent_s`] subtracts each packet's own sampled
//! entry-gateway delay (known exactly from the built packet), which is what model mode measures.

pub mod clients;
pub mod output;

pub use clients::{
    Assignment, Bursts, ClientRun, FaithfulSummary as ClientRunSummary, MessageRow, Observed,
    Scenario, run_clients, run_scenario,
};

use std::collections::HashMap;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use rand_distr::{Distribution, Exp1};
use shoal_packet::sphinx::SurbId;
use shoal_topology::NetworkParams;

use crate::SimError;
use crate::harness::{LinkConfig, Network};
use crate::model::ModelConfig;
use crate::model::summary::Dist;

/// Result of one faithful-mode run. Latencies are in seconds and cover messages sent in
/// `[warmup_s, duration_s)`, as in model mode.
#[derive(Debug, Clone, PartialEq)]
pub struct RelayRunSummary {
    /// Real messages sent over the whole run.
    pub sent: u64,
    /// Measured messages (sent inside the window) that were delivered.
    pub measured_delivered: u64,
    /// Measured messages sent but never delivered (0 without loss).
    pub measured_lost: u64,
    /// Delivery time minus send time, as the real network produces it.
    pub latency_s: Dist,
    /// The same minus each packet's entry-gateway delay: comparable with model mode.
    pub model_equivalent_s: Dist,
    /// Sample variance of `model_equivalent_s`.
    pub model_equivalent_variance: f64,
    /// Delivery time minus send time minus the packet's applied mixing delays, per packet: the
    /// fixed link part, which should be exactly (L + 2) links.
    pub link_part_s: Dist,
}

/// Runs `config`'s real-message workload through the harness.
pub fn run(config: &ModelConfig) -> Result<RelayRunSummary, SimError> {
    let v = config.validate()?;
    let bad = |what: &'static str, reason: &str| SimError::Config {
        what,
        reason: reason.into(),
    };
    if v.layers != shoal_packet::MIX_LAYERS {
        return Err(bad(
            "network.layers",
            "faithful mode runs the real 3-layer route",
        ));
    }
    if v.loop_rate > 0.0 || v.drop_rate > 0.0 {
        return Err(bad(
            "traffic",
            "faithful mode sends real messages only (loop_rate = drop_rate = 0)",
        ));
    }
    if v.corrupt_fraction > 0.0 || !v.corrupt_relays.is_empty() {
        return Err(bad("adversary", "faithful mode has no adversary"));
    }
    if v.real_rate <= 0.0 {
        return Err(bad("traffic.rate_per_client", "must be > 0"));
    }
    let mean_ms = v.mean_hop_s * 1e3;
    let link = LinkConfig {
        latency: Duration::from_secs_f64(v.link_s),
        loss: 0.0,
    };
    let params = NetworkParams {
        mean_hop_delay_ms: mean_ms,
        // Model mode does not cap delays; with a cap at 40 means a draw is clamped with
        // probability e^-40, i.e. never.
        max_hop_delay_ms: (40.0 * mean_ms).max(1000.0),
        lambda_m: 0.0,
        ..NetworkParams::default()
    };
    // One epoch longer than the run, so key rotation plays no part in the latency.
    let epoch_secs = (v.duration_s + v.drain_s).ceil() as u64 + 3600;
    let mut net = Network::builder()
        .seed(v.seed)
        .relays_per_layer(v.width)
        .gateways(v.gateways as usize)
        .link(link)
        .client_link(link)
        .params(params)
        .epoch_secs(epoch_secs)
        .build()?;
    let gateways = net.gateways();

    // Every client's Poisson send times, merged into one ordered schedule.
    let mut rng = StdRng::seed_from_u64(v.seed ^ 0x6661_6974_6866_756c);
    let mut sends: Vec<(f64, u32)> = Vec::new();
    for client in 0..v.clients {
        let mut t = 0.0;
        loop {
            let gap: f64 = Exp1.sample(&mut rng);
            t += gap / v.real_rate;
            if t >= v.duration_s {
                break;
            }
            sends.push((t, client));
        }
    }
    sends.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));

    // surb id -> (send time, entry-gateway delay, applied mixing delay, measured)
    let mut pending: HashMap<SurbId, (Duration, Duration, Duration, bool)> = HashMap::new();
    for (i, &(t, client)) in sends.iter().enumerate() {
        let at = Duration::from_secs_f64(t);
        net.drive_until(at)?;
        let entry = gateways[rng.random_range(0..gateways.len())];
        let exit = gateways[rng.random_range(0..gateways.len())];
        let mut mailbox = [0u8; 32];
        mailbox[..4].copy_from_slice(&client.to_be_bytes());
        let packet = net.build_packet(
            net.document_epoch(),
            &entry,
            &exit,
            mailbox,
            &i.to_be_bytes(),
        )?;
        net.send(&packet)?;
        let measured = t >= v.warmup_s;
        pending.insert(
            packet.surb_id,
            (at, packet.delays[0], packet.mixing_delay(), measured),
        );
    }
    net.drive_until_idle()?;

    let mut raw = Vec::new();
    let mut equiv = Vec::new();
    let mut links = Vec::new();
    for d in net.deliveries() {
        let Some((sent, entry_delay, mixing, measured)) = pending.remove(&d.surb_id) else {
            continue;
        };
        if !measured {
            continue;
        }
        let lat = d.at.saturating_sub(sent);
        raw.push(lat.as_secs_f64());
        equiv.push(lat.saturating_sub(entry_delay).as_secs_f64());
        links.push(lat.saturating_sub(mixing).as_secs_f64());
    }
    let measured_lost = pending.values().filter(|p| p.3).count() as u64;
    let n = equiv.len() as f64;
    let mean = equiv.iter().sum::<f64>() / n.max(1.0);
    let variance = if equiv.len() > 1 {
        equiv.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    Ok(RelayRunSummary {
        sent: sends.len() as u64,
        measured_delivered: equiv.len() as u64,
        measured_lost,
        latency_s: Dist::of(raw.into_iter()),
        model_equivalent_s: Dist::of(equiv.into_iter()),
        model_equivalent_variance: variance,
        link_part_s: Dist::of(links.into_iter()),
    })
}

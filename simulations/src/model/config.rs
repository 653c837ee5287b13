//! Model-mode configuration: one TOML file, read into serde structs with
//! `deny_unknown_fields` and then checked into [`Validated`].

use serde::{Deserialize, Serialize};

use crate::SimError;

/// Everything a model-mode run needs. Every key has a default, so an empty file is a valid run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    #[serde(default)]
    pub network: NetworkSection,
    #[serde(default)]
    pub traffic: TrafficSection,
    #[serde(default)]
    pub adversary: AdversarySection,
    #[serde(default)]
    pub run: RunSection,
    #[serde(default)]
    pub metrics: MetricsSection,
    #[serde(default)]
    pub output: OutputSection,
    /// Workload of the attacks (organisations, groups, on/offline).
    #[serde(default)]
    pub workload: crate::attacks::WorkloadSection,
    /// Which attacks run, at which cover levels.
    #[serde(default)]
    pub attacks: crate::attacks::AttacksSection,
    /// Which simulator runs this file.
    #[serde(default)]
    pub sim: SimSection,
    /// Knobs that only faithful mode has.
    #[serde(default)]
    pub faithful: FaithfulSection,
}

/// `[sim]`: which simulator runs the file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SimSection {
    /// "model" (abstract crypto, anonymity tracking, scales) or "faithful" (the production
    /// relay, gateway and client cores in the deterministic harness).
    pub mode: String,
}

impl Default for SimSection {
    fn default() -> Self {
        Self {
            mode: "model".into(),
        }
    }
}

/// `[faithful]`: what only faithful mode models. Model mode refuses a changed value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FaithfulSection {
    /// λP per client (real-or-cover payload stream); 0 means 2 × `rate_per_client`. Must
    /// exceed `rate_per_client`, or a client's queue grows without bound.
    pub lambda_p: f64,
    /// Independent loss on every mixnet link (client to gateway included); the cores
    /// retransmit. Pull requests, answers and acks travel on reliable streams (QUIC) and are
    /// never lost.
    pub link_loss: f64,
    /// Time one group commit of the gateway's store takes (redb fsync), in milliseconds.
    pub commit_latency_ms: f64,
    /// Every client pulls its mailbox once per interval, whatever it is doing.
    pub pull_interval_ms: f64,
    /// Items in every pull answer (real ones padded with dummies).
    pub pull_batch: u32,
    /// Items a mailbox holds at most; deliveries beyond it are refused without an ack.
    pub mailbox_quota: u32,
}

impl Default for FaithfulSection {
    fn default() -> Self {
        Self {
            lambda_p: 0.0,
            link_loss: 0.0,
            commit_latency_ms: 5.0,
            pull_interval_ms: 1000.0,
            pull_batch: 16,
            mailbox_quota: 100_000,
        }
    }
}

/// `[network]`: the stratified mix network.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkSection {
    /// Number of mix layers L.
    pub layers: u32,
    /// Relays per layer.
    pub width: u32,
    /// Mean of the exponential delay at every relay hop, in milliseconds (1/μ).
    pub mean_hop_delay_ms: f64,
    /// Fixed propagation delay of every link, in milliseconds.
    pub link_delay_ms: f64,
    /// Number of gateways (entry = exit = the client's own; drops go to a random one).
    pub gateways: u32,
}

impl Default for NetworkSection {
    fn default() -> Self {
        Self {
            layers: 3,
            width: 10,
            mean_hop_delay_ms: 300.0,
            link_delay_ms: 50.0,
            gateways: 3,
        }
    }
}

/// `[traffic]`: the clients' Poisson streams.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrafficSection {
    /// Number of clients.
    pub clients: u32,
    /// Real messages per second per client (Poisson), to a uniformly random other client.
    pub rate_per_client: f64,
    /// Loop cover per second per client (λL): back to the sender.
    pub loop_rate: f64,
    /// Drop cover per second per client (λD): discarded at a random gateway.
    pub drop_rate: f64,
}

impl Default for TrafficSection {
    fn default() -> Self {
        Self {
            clients: 50,
            rate_per_client: 1.0,
            loop_rate: 0.0,
            drop_rate: 0.0,
        }
    }
}

/// Hostile operators a route remembers (one bit each).
pub const MAX_HOSTILE_OPERATORS: u32 = 64;

/// `[adversary]`: a global passive observer plus corrupt relays.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdversarySection {
    /// Fraction of relays (rounded to the nearest count) chosen at random to be corrupt.
    pub corrupt_fraction: f64,
    /// Explicit corrupt relays as global indices `layer * width + position`; added to the fraction's picks.
    pub corrupt_relays: Vec<u32>,
    /// How many hostile operators run the corrupt relays between them (round-robin in
    /// relay order). 0: each corrupt relay is an operator of its own. Honest relays are
    /// always each their own operator.
    pub hostile_operators: u32,
    /// "family" (the production rule: a route never takes two relays of one operator) or
    /// "uniform" (every hop uniform in its layer, the baseline without families).
    pub route_selection: String,
}

impl Default for AdversarySection {
    fn default() -> Self {
        Self {
            corrupt_fraction: 0.0,
            corrupt_relays: Vec::new(),
            hostile_operators: 0,
            route_selection: "family".into(),
        }
    }
}

/// `[run]`: time window and seed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunSection {
    /// Messages sent in `[warmup_s, duration_s)` are measured.
    pub duration_s: f64,
    /// Time for the pools to fill before measuring.
    pub warmup_s: f64,
    /// Seed of every random stream of the run.
    pub seed: u64,
    /// Extra virtual time after `duration_s` during which traffic continues so measured messages
    /// and tracked targets finish; 0 means automatic (50 mean delays per layer plus links).
    pub max_drain_s: f64,
}

impl Default for RunSection {
    fn default() -> Self {
        Self {
            duration_s: 150.0,
            warmup_s: 20.0,
            seed: 1,
            max_drain_s: 0.0,
        }
    }
}

/// `[metrics]`: what to measure.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsSection {
    /// Exact sender anonymity of every measured message: "auto" (on when
    /// `clients <= sender_exact_max_clients`), "on" or "off". Costs O(clients) per honest hop.
    pub sender_entropy: String,
    /// Limit for "auto".
    pub sender_exact_max_clients: u32,
    /// How many measured real messages to track forward for receiver anonymity.
    pub receiver_targets: u32,
    /// How many targets may be in flight at once (at most 32).
    pub target_slots: u32,
    /// A target is finished when less than this much of its probability mass is still inside the network.
    pub mass_epsilon: f64,
    /// The two labelled senders ("Alice" and "Bob") of the unlinkability estimate (client ids).
    pub unlinkability_senders: [u32; 2],
    /// δ at which `unlinkability.epsilon` is reported (the table in the summary lists others).
    pub unlinkability_delta: f64,
}

impl Default for MetricsSection {
    fn default() -> Self {
        Self {
            sender_entropy: "auto".into(),
            sender_exact_max_clients: 5000,
            receiver_targets: 1000,
            target_slots: 8,
            mass_epsilon: 1e-6,
            unlinkability_senders: [0, 1],
            unlinkability_delta: 0.05,
        }
    }
}

/// `[output]`: files written by `shoal sim`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutputSection {
    /// Write `messages.csv`.
    pub messages_csv: bool,
    /// At most this many rows in `messages.csv` (the first measured messages delivered).
    pub csv_max_rows: u64,
    /// Write PNG plots.
    pub plots: bool,
}

impl Default for OutputSection {
    fn default() -> Self {
        Self {
            messages_csv: true,
            csv_max_rows: 1_000_000,
            plots: true,
        }
    }
}

impl ModelConfig {
    /// Parses a TOML document.
    pub fn from_toml_str(s: &str) -> Result<Self, SimError> {
        toml::from_str(s).map_err(|e| SimError::Config {
            what: "model config",
            reason: e.to_string(),
        })
    }

    /// Model mode's own check: the file asks for model mode and sets no faithful-only knob.
    pub fn check_model_mode(&self) -> Result<(), SimError> {
        if self.sim.mode != "model" {
            return Err(SimError::Config {
                what: "sim.mode",
                reason: format!(
                    "{:?} is not model mode (run it with `shoal sim --mode {}`; sweeps run model mode only)",
                    self.sim.mode, self.sim.mode
                ),
            });
        }
        if self.faithful != FaithfulSection::default() {
            return Err(SimError::Config {
                what: "faithful",
                reason: "[faithful] keys only apply with sim.mode = \"faithful\"".into(),
            });
        }
        Ok(())
    }

    /// Checks every value and derives the numbers the engine uses.
    pub fn validate(&self) -> Result<Validated, SimError> {
        fn bad(what: &'static str, reason: impl Into<String>) -> SimError {
            SimError::Config {
                what,
                reason: reason.into(),
            }
        }
        fn finite_nonneg(what: &'static str, v: f64) -> Result<f64, SimError> {
            if v.is_finite() && v >= 0.0 {
                Ok(v)
            } else {
                Err(bad(what, format!("must be finite and >= 0, got {v}")))
            }
        }
        let n = &self.network;
        let t = &self.traffic;
        if n.layers == 0 || n.layers > 64 {
            return Err(bad("network.layers", "must be 1..=64"));
        }
        if n.width == 0 {
            return Err(bad("network.width", "must be >= 1"));
        }
        if n.gateways == 0 {
            return Err(bad("network.gateways", "must be >= 1"));
        }
        if t.clients == 0 {
            return Err(bad("traffic.clients", "must be >= 1"));
        }
        let mean_hop = finite_nonneg("network.mean_hop_delay_ms", n.mean_hop_delay_ms)? / 1e3;
        let link = finite_nonneg("network.link_delay_ms", n.link_delay_ms)? / 1e3;
        let real = finite_nonneg("traffic.rate_per_client", t.rate_per_client)?;
        let lp = finite_nonneg("traffic.loop_rate", t.loop_rate)?;
        let dr = finite_nonneg("traffic.drop_rate", t.drop_rate)?;
        if real + lp + dr <= 0.0 {
            return Err(bad(
                "traffic",
                "at least one of rate_per_client, loop_rate, drop_rate must be > 0",
            ));
        }
        let r = &self.run;
        let duration = finite_nonneg("run.duration_s", r.duration_s)?;
        let warmup = finite_nonneg("run.warmup_s", r.warmup_s)?;
        if warmup >= duration {
            return Err(bad("run.warmup_s", "must be < run.duration_s"));
        }
        let mut drain = finite_nonneg("run.max_drain_s", r.max_drain_s)?;
        if drain == 0.0 {
            drain = 50.0 * f64::from(n.layers) * mean_hop + f64::from(n.layers + 2) * link + 1.0;
        }
        let a = &self.adversary;
        if !(0.0..=1.0).contains(&a.corrupt_fraction) {
            return Err(bad("adversary.corrupt_fraction", "must be in [0, 1]"));
        }
        let relays = n
            .layers
            .checked_mul(n.width)
            .ok_or_else(|| bad("network", "too many relays"))?;
        if let Some(r) = a.corrupt_relays.iter().find(|&&r| r >= relays) {
            return Err(bad(
                "adversary.corrupt_relays",
                format!("relay {r} out of range (0..{relays})"),
            ));
        }
        if a.hostile_operators > MAX_HOSTILE_OPERATORS {
            return Err(bad(
                "adversary.hostile_operators",
                format!("at most {MAX_HOSTILE_OPERATORS}"),
            ));
        }
        let family = match a.route_selection.as_str() {
            "family" => true,
            "uniform" => false,
            other => {
                return Err(bad(
                    "adversary.route_selection",
                    format!("\"{other}\" is not \"family\" or \"uniform\""),
                ));
            }
        };
        let m = &self.metrics;
        let sender_exact = match m.sender_entropy.as_str() {
            "auto" => t.clients <= m.sender_exact_max_clients,
            "on" => true,
            "off" => false,
            other => {
                return Err(bad(
                    "metrics.sender_entropy",
                    format!("expected auto|on|off, got {other:?}"),
                ));
            }
        };
        if m.target_slots > 32 {
            return Err(bad("metrics.target_slots", "must be <= 32"));
        }
        let eps = finite_nonneg("metrics.mass_epsilon", m.mass_epsilon)?;
        if eps <= 0.0 || eps >= 1.0 {
            return Err(bad("metrics.mass_epsilon", "must be in (0, 1)"));
        }
        let [ua, ub] = m.unlinkability_senders;
        if ua == ub || ua >= t.clients || ub >= t.clients {
            return Err(bad(
                "metrics.unlinkability_senders",
                format!("need two different client ids below {}", t.clients),
            ));
        }
        if !(m.unlinkability_delta >= 0.0 && m.unlinkability_delta < 1.0) {
            return Err(bad("metrics.unlinkability_delta", "must be in [0, 1)"));
        }
        Ok(Validated {
            layers: n.layers as usize,
            width: n.width as usize,
            gateways: n.gateways,
            mean_hop_s: mean_hop,
            link_s: link,
            clients: t.clients,
            real_rate: real,
            loop_rate: lp,
            drop_rate: dr,
            duration_s: duration,
            warmup_s: warmup,
            drain_s: drain,
            seed: r.seed,
            corrupt_fraction: a.corrupt_fraction,
            corrupt_relays: a.corrupt_relays.clone(),
            hostile_operators: a.hostile_operators,
            family,
            sender_exact,
            receiver_targets: m.receiver_targets,
            target_slots: m.target_slots as usize,
            mass_epsilon: eps,
            unlinkability_senders: m.unlinkability_senders,
            unlinkability_delta: m.unlinkability_delta,
            csv_max_rows: if self.output.messages_csv {
                self.output.csv_max_rows
            } else {
                0
            },
        })
    }
}

/// A checked configuration in engine units (seconds, rates per second).
#[derive(Debug, Clone)]
pub struct Validated {
    pub layers: usize,
    pub width: usize,
    pub gateways: u32,
    pub mean_hop_s: f64,
    pub link_s: f64,
    pub clients: u32,
    pub real_rate: f64,
    pub loop_rate: f64,
    pub drop_rate: f64,
    pub duration_s: f64,
    pub warmup_s: f64,
    pub drain_s: f64,
    pub seed: u64,
    pub corrupt_fraction: f64,
    pub corrupt_relays: Vec<u32>,
    pub hostile_operators: u32,
    /// Routes never take two relays of one operator.
    pub family: bool,
    pub sender_exact: bool,
    pub receiver_targets: u32,
    pub target_slots: usize,
    pub mass_epsilon: f64,
    pub unlinkability_senders: [u32; 2],
    pub unlinkability_delta: f64,
    pub csv_max_rows: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The exact file from issue 5 must parse as written.
    #[test]
    fn issue_example_parses() {
        let s = r#"
[network]
layers = 3
width = 10
mean_hop_delay_ms = 300
link_delay_ms = 50
[traffic]
clients = 50
rate_per_client = 100.0
loop_rate = 0.0
drop_rate = 0.0
[adversary]
corrupt_fraction = 0.0
[run]
duration_s = 150
warmup_s = 20
seed = 1
"#;
        let c = ModelConfig::from_toml_str(s).unwrap();
        let v = c.validate().unwrap();
        assert_eq!(v.layers, 3);
        assert_eq!(v.width, 10);
        assert!((v.mean_hop_s - 0.3).abs() < 1e-12);
        assert!(v.sender_exact);
    }

    #[test]
    fn unknown_key_is_refused() {
        assert!(ModelConfig::from_toml_str("[network]\nlayer = 3\n").is_err());
        assert!(
            ModelConfig::from_toml_str("[run]\nwarmup_s = 200\n")
                .unwrap()
                .validate()
                .is_err()
        );
    }
}

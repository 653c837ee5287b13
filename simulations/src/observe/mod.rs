//! The global passive observer as a tool (`shoal observe`): reads what every link carries
//! (a packet capture, [`capture`]), knows the public directory, and runs the attacks such
//! an observer can run ([`attacks`]) — who talks to whom, who belongs to which subnet, which
//! subnets federate — each scored against a [`Truth`] file with a bootstrap interval and
//! the chance level ([`score`]). The attacks read only a [`View`] (one time series per
//! link), so the same code can run on a simulator trace.
//!
//! Nothing here logs; reports name clients only by index unless the caller asks for the
//! per-link detail.

pub mod attacks;
pub mod capture;
pub mod score;
pub mod sim;
pub mod workload;

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

pub use attacks::{AttackResult, Options, run_attacks};
pub use capture::{Datagram, Knowledge, View, read_pcap};
pub use workload::Workload;

/// Why a capture, directory or truth file could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ObserveError {
    #[error("capture: {0}")]
    Capture(String),
    #[error("directory document: {0}")]
    Directory(String),
    #[error("truth file: {0}")]
    Truth(String),
}

/// The ground truth a capture is scored against (`--truth`; see docs/guides/observe.md).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Truth {
    pub clients: Vec<TruthClient>,
    /// Pairs of subnet names that federate (order does not matter).
    #[serde(default)]
    pub federated: Vec<(String, String)>,
    /// Every real message a client handed to the network, one entry per recipient
    /// (a group send to three members is three entries).
    #[serde(default)]
    pub sends: Vec<TruthSend>,
}

/// One client: the address it sends from as the capture shows it, its subnet, and the
/// gateway it uses (the gateway's link address as the directory lists it).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TruthClient {
    pub address: SocketAddr,
    pub subnet: String,
    pub gateway: SocketAddr,
}

/// One real message: sender and recipient addresses, and when it was handed to the
/// client (Unix seconds, the capture's clock).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TruthSend {
    pub from: SocketAddr,
    pub to: SocketAddr,
    pub at: f64,
}

impl Truth {
    pub fn from_json(bytes: &[u8]) -> Result<Truth, ObserveError> {
        serde_json::from_slice(bytes).map_err(|e| ObserveError::Truth(e.to_string()))
    }

    /// Subnet names in first-seen order.
    pub fn subnets(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for c in &self.clients {
            if !out.contains(&c.subnet) {
                out.push(c.subnet.clone());
            }
        }
        out
    }
}

/// `--json` output.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Report {
    /// Length of the capture.
    pub minutes: f64,
    /// Clients the observer found on the capture.
    pub clients: usize,
    /// Subnets in the truth file (0 without one).
    pub subnets: usize,
    pub window_s: f64,
    pub seed: u64,
    pub attacks: Vec<AttackResult>,
}

impl Report {
    /// Runs every attack on `view`, scored against `truth`.
    pub fn build(view: &View, truth: &Truth, opts: &Options) -> Report {
        Report {
            minutes: (view.end - view.start).max(0.0) / 60.0,
            clients: view.clients.len(),
            subnets: truth.subnets().len(),
            window_s: opts.window_s,
            seed: opts.seed,
            attacks: run_attacks(view, truth, opts),
        }
    }

    /// Sets each attack's `control_value` from the same attack and metric in `control`.
    pub fn with_control(mut self, control: &Report) -> Report {
        let by_key: BTreeMap<(&str, &str), f64> = control
            .attacks
            .iter()
            .map(|a| ((a.name.as_str(), a.metric.as_str()), a.value))
            .collect();
        for a in &mut self.attacks {
            a.control_value = by_key.get(&(a.name.as_str(), a.metric.as_str())).copied();
        }
        self
    }

    /// The report for people: one line per attack and metric.
    pub fn text(&self) -> String {
        let mut s = format!(
            "observer: {:.1} min, {} clients, {} subnets, {} s windows (seed {})\n",
            self.minutes, self.clients, self.subnets, self.window_s, self.seed
        );
        s.push_str(&format!(
            "  {:<22} {:<12} {:>7} {:>17} {:>7} {:>8}  verdict\n",
            "attack", "metric", "value", "95% CI", "chance", "control"
        ));
        for a in &self.attacks {
            let control = a
                .control_value
                .map_or("-".to_string(), |c| format!("{c:.3}"));
            s.push_str(&format!(
                "  {:<22} {:<12} {:>7.3} [{:>6.3}, {:>6.3}] {:>7.3} {:>8}  {}\n",
                a.name,
                a.metric,
                a.value,
                a.ci_low,
                a.ci_high,
                a.chance,
                control,
                a.verdict()
            ));
        }
        s
    }
}

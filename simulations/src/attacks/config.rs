//! `[workload]` and `[attacks]`: who talks to whom, when users are online, and which attacks run
//! with which cover levels.

use serde::{Deserialize, Serialize};

use crate::SimError;

/// `[workload]`: users in organisations (subnets), contacts, groups and on/offline patterns.
/// Used by the attacks; the anonymity metrics of model mode keep their uniform workload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkloadSection {
    /// Organisations (subnets); user `u` belongs to organisation `u * orgs / clients`.
    pub orgs: u32,
    /// Distinct contacts per user.
    pub contacts: u32,
    /// Probability that a contact is in the user's own organisation (else in a federated one).
    pub intra_org_fraction: f64,
    /// Organisation pairs, chosen at random, whose users may be each other's contacts.
    pub federated_pairs: u32,
    /// Groups; each lies inside one random organisation.
    pub groups: u32,
    /// Members per group (capped at the organisation's size).
    pub group_size: u32,
    /// Probability that a message of a user in a group goes to one of its groups (one packet
    /// to every other member) rather than to one contact.
    pub group_message_fraction: f64,
    /// Mean online period in seconds (exponential); 0 means always online.
    pub online_mean_s: f64,
    /// Mean offline period in seconds (exponential). Offline users send nothing, cover included;
    /// their mail waits at the gateway until they are back.
    pub offline_mean_s: f64,
}

impl Default for WorkloadSection {
    fn default() -> Self {
        Self {
            orgs: 5,
            contacts: 3,
            intra_org_fraction: 0.8,
            federated_pairs: 2,
            groups: 0,
            group_size: 4,
            group_message_fraction: 0.2,
            online_mean_s: 0.0,
            offline_mean_s: 0.0,
        }
    }
}

/// One cover level the attacks are run at (per client, while online).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoverLevel {
    /// Loops per second (λL), back to the sender's own mailbox.
    pub loop_rate: f64,
    /// Drops per second (λD), discarded at a gateway.
    pub drop_rate: f64,
}

/// `[attacks]`: which attacks run, at which cover levels, with which parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AttacksSection {
    /// Any of "disclosure", "organisation", "timing". Empty: no attack runs.
    pub enabled: Vec<String>,
    /// Cover levels; every enabled attack runs once per level, with the same real traffic.
    /// Empty: `[{0, 0}, {traffic.loop_rate, traffic.drop_rate}]` (one level if both are 0).
    pub cover: Vec<CoverLevel>,
    /// Observed time in seconds (from 0, no warm-up); 0 means `run.duration_s`.
    pub duration_s: f64,
    /// Observation window (round) of the disclosure and organisation attacks, seconds.
    pub window_s: f64,
    /// Receipts in windows r..=r+lag are credited to sends in window r.
    pub lag_windows: u32,
    /// Disclosure targets (users 0, k, 2k, ... spread over organisations).
    pub disclosure_targets: u32,
    /// Times at which the disclosure and organisation attacks are scored.
    pub checkpoints: u32,
    /// Edge threshold of the organisation attack's traffic graph (z-score).
    pub org_threshold: f64,
    /// Real packets tested by the timing attack (positives).
    pub timing_packets: u32,
    /// Wrong receivers per tested packet (negatives).
    pub timing_negatives: u32,
    /// False-positive rate at which the timing attack's TPR is reported.
    pub timing_fpr: f64,
}

impl Default for AttacksSection {
    fn default() -> Self {
        Self {
            enabled: Vec::new(),
            cover: Vec::new(),
            duration_s: 0.0,
            window_s: 2.0,
            lag_windows: 1,
            disclosure_targets: 20,
            checkpoints: 10,
            org_threshold: 3.0,
            timing_packets: 2000,
            timing_negatives: 10,
            timing_fpr: 1e-2,
        }
    }
}

/// Names an attack may have in `attacks.enabled`.
pub const ATTACKS: [&str; 3] = ["disclosure", "organisation", "timing"];

fn bad(what: &'static str, reason: impl Into<String>) -> SimError {
    SimError::Config {
        what,
        reason: reason.into(),
    }
}

fn check_nonneg(what: &'static str, v: f64) -> Result<(), SimError> {
    if v.is_finite() && v >= 0.0 {
        Ok(())
    } else {
        Err(bad(what, format!("must be finite and >= 0, got {v}")))
    }
}

fn check_prob(what: &'static str, v: f64) -> Result<(), SimError> {
    if (0.0..=1.0).contains(&v) {
        Ok(())
    } else {
        Err(bad(what, format!("must be in [0, 1], got {v}")))
    }
}

impl WorkloadSection {
    /// Checks the values against the number of clients.
    pub fn check(&self, clients: u32) -> Result<(), SimError> {
        if self.orgs == 0 || self.orgs > clients {
            return Err(bad("workload.orgs", "must be 1..=traffic.clients"));
        }
        check_prob("workload.intra_org_fraction", self.intra_org_fraction)?;
        check_prob(
            "workload.group_message_fraction",
            self.group_message_fraction,
        )?;
        check_nonneg("workload.online_mean_s", self.online_mean_s)?;
        check_nonneg("workload.offline_mean_s", self.offline_mean_s)?;
        let pairs = u64::from(self.orgs) * u64::from(self.orgs - 1) / 2;
        if u64::from(self.federated_pairs) > pairs {
            return Err(bad(
                "workload.federated_pairs",
                format!("at most orgs*(orgs-1)/2 = {pairs}"),
            ));
        }
        if self.contacts == 0 {
            return Err(bad("workload.contacts", "must be >= 1"));
        }
        Ok(())
    }
}

impl AttacksSection {
    /// Checks the values.
    pub fn check(&self) -> Result<(), SimError> {
        if let Some(a) = self.enabled.iter().find(|a| !ATTACKS.contains(&a.as_str())) {
            return Err(bad(
                "attacks.enabled",
                format!("unknown attack {a:?} (expected one of {ATTACKS:?})"),
            ));
        }
        for c in &self.cover {
            check_nonneg("attacks.cover.loop_rate", c.loop_rate)?;
            check_nonneg("attacks.cover.drop_rate", c.drop_rate)?;
        }
        check_nonneg("attacks.duration_s", self.duration_s)?;
        if !(self.window_s.is_finite() && self.window_s > 0.0) {
            return Err(bad("attacks.window_s", "must be > 0"));
        }
        if self.checkpoints == 0 {
            return Err(bad("attacks.checkpoints", "must be >= 1"));
        }
        if !self.org_threshold.is_finite() {
            return Err(bad("attacks.org_threshold", "must be finite"));
        }
        if !(self.timing_fpr > 0.0 && self.timing_fpr < 1.0) {
            return Err(bad("attacks.timing_fpr", "must be in (0, 1)"));
        }
        Ok(())
    }

    /// True when `name` is enabled.
    pub fn on(&self, name: &str) -> bool {
        self.enabled.iter().any(|a| a == name)
    }
}

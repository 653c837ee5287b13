//! Attacks of a global passive observer on a workload with organisations, groups and on/offline
//! users, each run at several cover levels so that the effect of cover is visible: statistical
//! disclosure ([`disclosure`]), organisation and federation inference ([`organisation`]) and a
//! timing likelihood-ratio baseline ([`timing`]). See the crate README's researcher's guide.

pub mod config;
pub mod disclosure;
pub mod organisation;
pub mod timing;
pub mod workload;

mod output;

pub use config::{AttacksSection, CoverLevel, WorkloadSection};
pub use output::write_attacks;

use rayon::prelude::*;
use serde::Serialize;

use crate::SimError;
use crate::model::ModelConfig;
use disclosure::DisclosurePoint;
use organisation::OrgPoint;
use timing::TimingResult;
use workload::{DelayLaw, Rates, Trace, Workload};

/// The ground truth the attacks are scored against, in brief.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Truth {
    pub users: u32,
    pub orgs: u32,
    pub federated_pairs: Vec<(u32, u32)>,
    pub groups: u32,
    /// Mean number of partners (contacts and fellow group members) per user.
    pub mean_partners: f64,
    /// Fraction of contacts outside the user's organisation.
    pub cross_org_contacts: f64,
    pub disclosure_targets: Vec<u32>,
}

/// Everything measured at one cover level.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LevelReport {
    pub loop_rate: f64,
    pub drop_rate: f64,
    pub real_packets: u64,
    pub cover_packets: u64,
    /// Cover packets per real packet.
    pub cover_per_real: f64,
    pub online_fraction: f64,
    /// Real packets not received before the end (recipient offline).
    pub real_undelivered: u64,
    pub disclosure: Option<Vec<DisclosurePoint>>,
    pub organisation: Option<Vec<OrgPoint>>,
    pub timing: Option<TimingResult>,
}

/// `attacks.json`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct AttacksReport {
    pub seed: u64,
    pub duration_s: f64,
    pub window_s: f64,
    pub lag_windows: u32,
    pub truth: Truth,
    pub levels: Vec<LevelReport>,
}

/// The cover levels `attacks.cover` names, or its default.
pub fn cover_levels(cfg: &ModelConfig) -> Vec<CoverLevel> {
    if !cfg.attacks.cover.is_empty() {
        return cfg.attacks.cover.clone();
    }
    let mut v = vec![CoverLevel {
        loop_rate: 0.0,
        drop_rate: 0.0,
    }];
    if cfg.traffic.loop_rate > 0.0 || cfg.traffic.drop_rate > 0.0 {
        v.push(CoverLevel {
            loop_rate: cfg.traffic.loop_rate,
            drop_rate: cfg.traffic.drop_rate,
        });
    }
    v
}

/// Runs every enabled attack at every cover level (levels in parallel; the output does not
/// depend on the thread timing). `None` when no attack is enabled.
pub fn run(cfg: &ModelConfig) -> Result<Option<AttacksReport>, SimError> {
    let a = &cfg.attacks;
    a.check()?;
    if a.enabled.is_empty() {
        return Ok(None);
    }
    let v = cfg.validate()?;
    let ws = &cfg.workload;
    ws.check(v.clients)?;
    if a.on("organisation") && v.clients > organisation::MAX_USERS {
        return Err(SimError::Config {
            what: "attacks.enabled",
            reason: format!(
                "organisation inference keeps a users² matrix; at most {} clients",
                organisation::MAX_USERS
            ),
        });
    }
    let end = if a.duration_s > 0.0 {
        a.duration_s
    } else {
        v.duration_s
    };
    let law = DelayLaw::of(&v);
    let wl = Workload::generate(ws, v.clients, v.seed);
    let targets = disclosure::pick_targets(v.clients, a.disclosure_targets);
    let contacts: usize = wl.contacts.iter().map(Vec::len).sum();
    let cross = wl
        .contacts
        .iter()
        .enumerate()
        .flat_map(|(u, c)| c.iter().map(move |&x| (u, x as usize)))
        .filter(|&(u, x)| wl.org[u] != wl.org[x])
        .count();
    let truth = Truth {
        users: v.clients,
        orgs: wl.orgs,
        federated_pairs: wl.federated.clone(),
        groups: wl.groups.len() as u32,
        mean_partners: wl.partners.iter().map(Vec::len).sum::<usize>() as f64
            / f64::from(v.clients),
        cross_org_contacts: cross as f64 / contacts.max(1) as f64,
        disclosure_targets: targets.clone(),
    };
    let levels: Vec<LevelReport> = cover_levels(cfg)
        .par_iter()
        .map(|c| {
            let rates = Rates {
                real: v.real_rate,
                loop_rate: c.loop_rate,
                drop_rate: c.drop_rate,
            };
            let trace = Trace::generate(&wl, ws, law, rates, end, v.seed);
            let real = trace.real.len() as u64;
            LevelReport {
                loop_rate: c.loop_rate,
                drop_rate: c.drop_rate,
                real_packets: real,
                cover_packets: trace.cover_sent,
                cover_per_real: trace.cover_sent as f64 / real.max(1) as f64,
                online_fraction: trace.online_fraction,
                real_undelivered: trace
                    .real
                    .iter()
                    .filter(|p| !p.received_s.is_finite())
                    .count() as u64,
                disclosure: a.on("disclosure").then(|| {
                    disclosure::run(
                        &wl,
                        &trace,
                        &targets,
                        a.window_s,
                        a.lag_windows,
                        a.checkpoints,
                    )
                }),
                organisation: a.on("organisation").then(|| {
                    organisation::run(
                        &wl,
                        &trace,
                        a.window_s,
                        a.lag_windows,
                        a.checkpoints,
                        a.org_threshold,
                        v.seed,
                    )
                }),
                timing: a.on("timing").then(|| {
                    timing::run(
                        &trace,
                        law,
                        a.timing_packets,
                        a.timing_negatives,
                        a.timing_fpr,
                        v.seed,
                    )
                }),
            }
        })
        .collect();
    Ok(Some(AttacksReport {
        seed: v.seed,
        duration_s: end,
        window_s: a.window_s,
        lag_windows: a.lag_windows,
        truth,
        levels,
    }))
}

//! Timing (flow-correlation) baseline: a likelihood-ratio test with the known delay density.
//!
//! The observer sees packet `m` leave its sender at `t0` and wants to know whether it went to
//! user `r`. Under H0, `r`'s receipts are a background Poisson stream of rate `λ_r` (estimated
//! as `r`'s receipts / observed time); under H1, one of them is `m`, delayed by the known law
//! (fixed links plus Gamma(L, mean hop delay), density `f`). The likelihood ratio is
//! `Λ_r = (1 / λ_r) Σ_j f(t_j − t0)` over `r`'s receipts `t_j` (Danezis, "The traffic analysis of
//! continuous-time mixes", 2004). Positives are tested real packets scored against their true
//! recipient; negatives the same packets scored against random other users (neither sender nor
//! recipient). The threshold is the `(1 − fpr)` quantile of the negatives; TPR is the share of
//! positives strictly above it. Only packets received before the end of the run are tested, and
//! the test assumes recipients are online (mail that waited at a gateway arrives "too late").

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde::Serialize;

use super::workload::{DelayLaw, Trace, stream_seed};
use crate::model::summary::gamma_quantile;

/// Results of the timing attack at one cover level.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TimingResult {
    pub positives: u32,
    pub negatives: u32,
    /// The FPR asked for and the TPR reached at it.
    pub fpr: f64,
    pub tpr_at_fpr: f64,
    /// Area under the ROC curve (0.5 = chance).
    pub auc: f64,
    /// `(fpr, tpr)` points of the ROC curve at log-spaced FPRs from 1e-4 to 1.
    pub roc: Vec<(f64, f64)>,
}

/// Runs the attack on up to `packets` real packets with `negatives` wrong receivers each.
pub fn run(
    trace: &Trace,
    law: DelayLaw,
    packets: u32,
    negatives: u32,
    fpr: f64,
    seed: u64,
) -> TimingResult {
    let n = trace.users as usize;
    let mut by_user: Vec<Vec<f64>> = vec![Vec::new(); n];
    for o in &trace.receipts {
        by_user[o.user as usize].push(o.t);
    }
    let span = trace.end_s.max(1e-9);
    let horizon = law.fixed_s + gamma_quantile(law.layers, law.mean_hop_s, 1.0 - 1e-9);
    let score = |r: usize, t0: f64| -> f64 {
        let ts = &by_user[r];
        if ts.is_empty() {
            return 0.0;
        }
        let lambda = ts.len() as f64 / span;
        let lo = ts.partition_point(|&t| t < t0 + law.fixed_s);
        let hi = ts.partition_point(|&t| t <= t0 + horizon);
        ts[lo..hi].iter().map(|&t| law.pdf(t - t0)).sum::<f64>() / lambda
    };
    let delivered: Vec<_> = trace
        .real
        .iter()
        .filter(|p| p.received_s.is_finite())
        .collect();
    let count = (packets as usize).min(delivered.len());
    let mut rng = StdRng::seed_from_u64(stream_seed(seed, 30));
    let mut pos = Vec::with_capacity(count);
    let mut neg = Vec::with_capacity(count * negatives as usize);
    for i in 0..count {
        let p = delivered[i * delivered.len() / count];
        pos.push(score(p.recipient as usize, p.sent_s));
        if n < 3 {
            continue;
        }
        for _ in 0..negatives {
            let r = loop {
                let r = rng.random_range(0..n as u32);
                if r != p.sender && r != p.recipient {
                    break r;
                }
            };
            neg.push(score(r as usize, p.sent_s));
        }
    }
    neg.sort_by(f64::total_cmp);
    let tpr_at = |f: f64| -> f64 {
        if neg.is_empty() || pos.is_empty() {
            return 0.0;
        }
        // Threshold: the smallest negative score with at most a fraction f of negatives above it.
        let k = ((1.0 - f) * neg.len() as f64).ceil() as usize;
        let thr = neg[k.clamp(1, neg.len()) - 1];
        pos.iter().filter(|&&s| s > thr).count() as f64 / pos.len() as f64
    };
    let roc = (0..=16)
        .map(|i| {
            let f = 10f64.powf(-4.0 + f64::from(i) * 0.25);
            (f, tpr_at(f))
        })
        .collect();
    let auc = if neg.is_empty() || pos.is_empty() {
        0.5
    } else {
        let mut wins = 0.0;
        for &s in &pos {
            let below = neg.partition_point(|&x| x < s);
            let eq = neg.partition_point(|&x| x <= s) - below;
            wins += below as f64 + eq as f64 / 2.0;
        }
        wins / (pos.len() * neg.len()) as f64
    };
    TimingResult {
        positives: pos.len() as u32,
        negatives: neg.len() as u32,
        fpr,
        tpr_at_fpr: tpr_at(fpr),
        auc,
        roc,
    }
}

#[cfg(test)]
mod tests {
    use super::super::config::WorkloadSection;
    use super::super::workload::{Rates, Workload};
    use super::*;

    fn tpr(mean_hop_s: f64, link_s: f64, cover: f64) -> TimingResult {
        let ws = WorkloadSection {
            orgs: 1,
            federated_pairs: 0,
            ..WorkloadSection::default()
        };
        let wl = Workload::generate(&ws, 100, 6);
        let law = DelayLaw {
            layers: 3,
            mean_hop_s,
            fixed_s: 5.0 * link_s,
        };
        let rates = Rates {
            real: 0.5,
            loop_rate: cover,
            drop_rate: cover,
        };
        let trace = Trace::generate(&wl, &ws, law, rates, 200.0, 6);
        run(&trace, law, 1000, 10, 1e-2, 6)
    }

    /// Millisecond delays and no cover: nearly every packet is matched at FPR 1e-2. Realistic
    /// delays (300 ms per hop) already cost much of that; cover on top costs more.
    #[test]
    fn tiny_delays_are_matched_realistic_ones_much_less() {
        let tiny = tpr(0.001, 0.0, 0.0);
        let real = tpr(0.3, 0.05, 0.0);
        let cover = tpr(0.3, 0.05, 1.0);
        assert!(tiny.tpr_at_fpr > 0.9, "{tiny:?}");
        assert!(real.tpr_at_fpr < tiny.tpr_at_fpr - 0.2, "{real:?}");
        assert!(cover.tpr_at_fpr < real.tpr_at_fpr, "{cover:?} vs {real:?}");
        assert!(tiny.auc > cover.auc);
    }
}

//! Statistical disclosure (Danezis' SDA, in its covariance form) against a global passive observer.
//!
//! Time is cut into windows (rounds). For target Alice the observer has her send count `a_w` per
//! window and every user's receipt count `o_w[c]`, with receipts of windows `w..=w+lag` credited
//! to window `w` because packets spend time in the mixes (and at the gateway, for offline users).
//! Her partners are estimated by the covariance of `a_w` with `o_w[c]`:
//! `score[c] = Σ a_w o_w[c] − (Σ a_w / R) Σ o_w[c]`. This is Danezis' SDA (mean receiver profile
//! when Alice sends minus the background) generalised to counts, so it needs no rounds in which
//! Alice is silent, which cover traffic would remove. Alice herself is excluded: her own loops
//! make her correlate with herself, and nobody messages themself.
//!
//! The score of every user is ranked; a true partner's rank is 1 + the number of users scored
//! higher (+ half the ties), so chance is about `users / 2`.

use serde::Serialize;

use super::workload::{Trace, Workload};

/// Disclosure figures at one observation time.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DisclosurePoint {
    /// Observed time in seconds.
    pub time_s: f64,
    pub windows: u32,
    /// Mean rank of true partners (1 = best; chance ≈ users / 2).
    pub mean_rank: f64,
    pub median_rank: f64,
    /// Fraction of true partners ranked within the top k, k = that target's partner count.
    pub topk_fraction: f64,
    /// Fraction of targets whose partners are exactly their top k.
    pub targets_disclosed: f64,
}

/// Runs the attack on `targets`, scoring at `checkpoints` evenly spaced observation times.
pub fn run(
    wl: &Workload,
    trace: &Trace,
    targets: &[u32],
    window_s: f64,
    lag: u32,
    checkpoints: u32,
) -> Vec<DisclosurePoint> {
    let n = trace.users as usize;
    let (send_w, recv_w) = trace.windows(window_s);
    let lag = lag as usize;
    // Windows whose lagged receipts are all inside the run.
    let usable = send_w.len().saturating_sub(lag).max(1);
    let mut marks: Vec<usize> = (1..=checkpoints as usize)
        .map(|i| (usable * i).div_ceil(checkpoints as usize).max(1))
        .collect();
    marks.dedup();
    let mut index_of = vec![usize::MAX; n];
    for (i, &t) in targets.iter().enumerate() {
        index_of[t as usize] = i;
    }
    let mut sum_a = vec![0.0f64; targets.len()];
    let mut s_ao = vec![vec![0.0f64; n]; targets.len()];
    let mut s_o = vec![0.0f64; n];
    let mut a_now: Vec<(usize, f64)> = Vec::new();
    let mut out = Vec::new();
    let mut next_mark = 0;
    for (w, sends) in send_w.iter().enumerate().take(usable) {
        a_now.clear();
        for &(u, c) in sends {
            let i = index_of[u as usize];
            if i != usize::MAX {
                a_now.push((i, f64::from(c)));
                sum_a[i] += f64::from(c);
            }
        }
        for recv in recv_w.iter().skip(w).take(lag + 1) {
            for &(c, cnt) in recv {
                let cnt = f64::from(cnt);
                s_o[c as usize] += cnt;
                for &(i, a) in &a_now {
                    s_ao[i][c as usize] += a * cnt;
                }
            }
        }
        if next_mark < marks.len() && w + 1 == marks[next_mark] {
            next_mark += 1;
            let r = (w + 1) as f64;
            let mut ranks = Vec::new();
            let mut disclosed = 0usize;
            let mut topk = 0usize;
            for (i, &t) in targets.iter().enumerate() {
                let mean_a = sum_a[i] / r;
                let score: Vec<f64> = (0..n).map(|c| s_ao[i][c] - mean_a * s_o[c]).collect();
                let partners = &wl.partners[t as usize];
                let k = partners.len();
                let mut all_in = true;
                for &p in partners {
                    let sp = score[p as usize];
                    let (mut gt, mut eq) = (0usize, 0usize);
                    for (c, &s) in score.iter().enumerate() {
                        if c == t as usize || c == p as usize {
                            continue;
                        }
                        if s > sp {
                            gt += 1;
                        } else if s == sp {
                            eq += 1;
                        }
                    }
                    let rank = 1.0 + gt as f64 + eq as f64 / 2.0;
                    if rank <= k as f64 {
                        topk += 1;
                    } else {
                        all_in = false;
                    }
                    ranks.push(rank);
                }
                disclosed += usize::from(all_in && k > 0);
            }
            ranks.sort_by(f64::total_cmp);
            let m = ranks.len().max(1) as f64;
            out.push(DisclosurePoint {
                time_s: r * window_s,
                windows: (w + 1) as u32,
                mean_rank: ranks.iter().sum::<f64>() / m,
                median_rank: ranks.get(ranks.len() / 2).copied().unwrap_or(0.0),
                topk_fraction: topk as f64 / m,
                targets_disclosed: disclosed as f64 / targets.len().max(1) as f64,
            });
        }
    }
    out
}

/// `count` targets spread evenly over the users (and so over organisations).
pub fn pick_targets(users: u32, count: u32) -> Vec<u32> {
    let count = count.min(users).max(1);
    let mut t: Vec<u32> = (0..count)
        .map(|i| (u64::from(i) * u64::from(users) / u64::from(count)) as u32)
        .collect();
    t.dedup();
    t
}

#[cfg(test)]
mod tests {
    use super::super::config::WorkloadSection;
    use super::super::workload::{DelayLaw, Rates, Trace, Workload};
    use super::*;

    fn runs(cover: f64) -> Vec<DisclosurePoint> {
        let ws = WorkloadSection {
            orgs: 1,
            contacts: 2,
            federated_pairs: 0,
            ..WorkloadSection::default()
        };
        let wl = Workload::generate(&ws, 60, 1);
        let law = DelayLaw {
            layers: 3,
            mean_hop_s: 0.3,
            fixed_s: 0.25,
        };
        let rates = Rates {
            real: 0.2,
            loop_rate: cover,
            drop_rate: cover,
        };
        let trace = Trace::generate(&wl, &ws, law, rates, 1500.0, 2);
        run(&wl, &trace, &pick_targets(60, 10), 5.0, 1, 5)
    }

    /// Few partners and no cover: the true partners rise to the top over time. Strong cover (10x
    /// the real rate in loops and drops) leaves them ranked much worse at the same time.
    #[test]
    fn partners_surface_without_cover_and_less_with_it() {
        let off = runs(0.0);
        let on = runs(2.0);
        let (first, last) = (&off[0], off.last().unwrap());
        assert!(last.mean_rank < first.mean_rank, "{off:?}");
        assert!(last.topk_fraction >= 0.8, "{last:?}");
        assert!(last.mean_rank < 3.0, "{last:?}");
        let on_last = on.last().unwrap();
        assert!(
            on_last.topk_fraction < last.topk_fraction - 0.2,
            "off {last:?} on {on_last:?}"
        );
        assert!(on_last.mean_rank > 2.0 * last.mean_rank, "{on_last:?}");
    }
}

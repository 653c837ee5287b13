//! Pure scoring: AUC, TPR at a fixed FPR, seeded bootstrap intervals, clustering agreement
//! with a jackknife interval against a permutation chance level, and the lagged correlation the attacks rank with.
//! No I/O; every random draw comes from the seed the caller passes.

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use crate::attacks::organisation::{ari, nmi};

/// Bootstrap resamples behind every interval.
pub const BOOTSTRAP: usize = 400;

/// Area under the ROC curve of `pos` against `neg` scores (ties count half): the
/// probability that a random positive outranks a random negative. `None` if either is empty.
pub fn auc(pos: &[f64], neg: &[f64]) -> Option<f64> {
    if pos.is_empty() || neg.is_empty() {
        return None;
    }
    // Rank-sum (Mann–Whitney U) with mid-ranks for ties: O(n log n).
    let mut all: Vec<(f64, bool)> = pos
        .iter()
        .map(|&s| (s, true))
        .chain(neg.iter().map(|&s| (s, false)))
        .collect();
    all.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut rank_sum = 0.0;
    let mut i = 0;
    while i < all.len() {
        let mut j = i;
        while j + 1 < all.len() && all[j + 1].0 == all[i].0 {
            j += 1;
        }
        let mid = (i + j) as f64 / 2.0 + 1.0;
        rank_sum += mid * all[i..=j].iter().filter(|x| x.1).count() as f64;
        i = j + 1;
    }
    let (np, nn) = (pos.len() as f64, neg.len() as f64);
    Some((rank_sum - np * (np + 1.0) / 2.0) / (np * nn))
}

/// True-positive rate at the threshold that lets at most `fpr` of the negatives through
/// (strictly above the ⌈(1 − fpr)·n⌉-th negative). `None` if either is empty.
pub fn tpr_at_fpr(pos: &[f64], neg: &[f64], fpr: f64) -> Option<f64> {
    if pos.is_empty() || neg.is_empty() {
        return None;
    }
    let mut n = neg.to_vec();
    n.sort_by(|a, b| b.total_cmp(a));
    let allowed = (fpr * n.len() as f64).floor() as usize;
    let threshold = n[allowed.min(n.len() - 1)];
    Some(pos.iter().filter(|&&p| p > threshold).count() as f64 / pos.len() as f64)
}

/// The 2.5 % and 97.5 % quantiles of `samples` (sorted in place); NaN if empty.
pub fn interval(samples: &mut [f64]) -> (f64, f64) {
    if samples.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    samples.sort_by(f64::total_cmp);
    let q = |p: f64| {
        samples[((p * (samples.len() - 1) as f64).round() as usize).min(samples.len() - 1)]
    };
    (q(0.025), q(0.975))
}

fn resample(rng: &mut StdRng, xs: &[f64]) -> Vec<f64> {
    (0..xs.len())
        .map(|_| xs[rng.random_range(0..xs.len())])
        .collect()
}

/// A metric with its bootstrap interval and the value an attacker guessing at random gets.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scored {
    pub value: f64,
    pub ci_low: f64,
    pub ci_high: f64,
    pub chance: f64,
}

/// AUC of `pos` against `neg`, with a stratified bootstrap (positives and negatives
/// resampled separately). Chance is 0.5.
pub fn auc_scored(pos: &[f64], neg: &[f64], seed: u64) -> Option<Scored> {
    let value = auc(pos, neg)?;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut boots: Vec<f64> = (0..BOOTSTRAP)
        .filter_map(|_| auc(&resample(&mut rng, pos), &resample(&mut rng, neg)))
        .collect();
    let (ci_low, ci_high) = interval(&mut boots);
    Some(Scored {
        value,
        ci_low,
        ci_high,
        chance: 0.5,
    })
}

/// TPR at FPR `fpr`, bootstrapped like [`auc_scored`]. Chance is `fpr` itself.
pub fn tpr_scored(pos: &[f64], neg: &[f64], fpr: f64, seed: u64) -> Option<Scored> {
    let value = tpr_at_fpr(pos, neg, fpr)?;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut boots: Vec<f64> = (0..BOOTSTRAP)
        .filter_map(|_| tpr_at_fpr(&resample(&mut rng, pos), &resample(&mut rng, neg), fpr))
        .collect();
    let (ci_low, ci_high) = interval(&mut boots);
    Some(Scored {
        value,
        ci_low,
        ci_high,
        chance: fpr,
    })
}

/// Which partition-agreement score.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Agreement {
    Nmi,
    Ari,
}

impl Agreement {
    fn of(self, a: &[u32], b: &[u32]) -> f64 {
        match self {
            Agreement::Nmi => nmi(a, b),
            Agreement::Ari => ari(a, b),
        }
    }
}

fn renumber(labels: &[u32]) -> Vec<u32> {
    let mut seen: Vec<u32> = Vec::new();
    labels
        .iter()
        .map(|l| match seen.iter().position(|s| s == l) {
            Some(i) => i as u32,
            None => {
                seen.push(*l);
                (seen.len() - 1) as u32
            }
        })
        .collect()
}

/// Agreement of `predicted` with `truth` (one label per client), a leave-one-out
/// jackknife interval (value ± 1.96 standard errors), and the chance level: the mean
/// agreement of `predicted` shuffled over the clients (same cluster sizes, no
/// information). NMI's chance is above 0 for small sets, which is why it is measured
/// rather than assumed. Not a bootstrap: resampling clients with replacement makes
/// copies of one client, which always agree with each other, so the bootstrap of a
/// clustering score is biased upwards (it put the interval of a chance-level ARI of 12
/// clients above chance). `None` with fewer than three clients.
pub fn agreement_scored(
    predicted: &[u32],
    truth: &[u32],
    kind: Agreement,
    seed: u64,
) -> Option<Scored> {
    let n = predicted.len();
    if n < 3 || truth.len() != n {
        return None;
    }
    let value = kind.of(predicted, truth);
    let loo: Vec<f64> = (0..n)
        .map(|skip| {
            let keep = |v: &[u32]| {
                renumber(
                    &v.iter()
                        .enumerate()
                        .filter(|(i, _)| *i != skip)
                        .map(|(_, l)| *l)
                        .collect::<Vec<_>>(),
                )
            };
            kind.of(&keep(predicted), &keep(truth))
        })
        .collect();
    let mean = loo.iter().sum::<f64>() / n as f64;
    let se =
        ((n - 1) as f64 / n as f64 * loo.iter().map(|x| (x - mean).powi(2)).sum::<f64>()).sqrt();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut shuffled = predicted.to_vec();
    let mut chance = 0.0;
    for _ in 0..BOOTSTRAP {
        for i in (1..n).rev() {
            shuffled.swap(i, rng.random_range(0..=i));
        }
        chance += kind.of(&shuffled, truth);
    }
    Some(Scored {
        value,
        ci_low: (value - 1.96 * se).max(-1.0),
        ci_high: (value + 1.96 * se).min(1.0),
        chance: chance / BOOTSTRAP as f64,
    })
}

/// Pearson correlation; 0 when either series is constant (no information).
pub fn pearson(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len().min(b.len());
    if n < 2 {
        return 0.0;
    }
    let (a, b) = (&a[..n], &b[..n]);
    let ma = a.iter().sum::<f64>() / n as f64;
    let mb = b.iter().sum::<f64>() / n as f64;
    let (mut sab, mut saa, mut sbb) = (0.0, 0.0, 0.0);
    for i in 0..n {
        let (x, y) = (a[i] - ma, b[i] - mb);
        sab += x * y;
        saa += x * x;
        sbb += y * y;
    }
    if saa <= 0.0 || sbb <= 0.0 {
        return 0.0;
    }
    sab / (saa * sbb).sqrt()
}

/// What is left of `y` after least squares on an intercept and the `predictors` (each as
/// long as `y`), z-scored: the part of a series its predictors do not explain. A small
/// ridge keeps collinear or constant predictors harmless.
pub fn residual(y: &[f64], predictors: &[Vec<f64>]) -> Vec<f64> {
    let n = y.len();
    let k = predictors.len() + 1;
    let row = |i: usize| -> Vec<f64> {
        std::iter::once(1.0)
            .chain(predictors.iter().map(|p| p.get(i).copied().unwrap_or(0.0)))
            .collect()
    };
    // Normal equations (X'X + εI) β = X'y, solved by Gaussian elimination.
    let mut a = vec![vec![0.0; k + 1]; k];
    for (i, &yi) in y.iter().enumerate() {
        let x = row(i);
        for (r, line) in a.iter_mut().enumerate() {
            for (c, v) in line[..k].iter_mut().enumerate() {
                *v += x[r] * x[c];
            }
            line[k] += x[r] * yi;
        }
    }
    for (r, line) in a.iter_mut().enumerate() {
        line[r] += 1e-6 * (1.0 + line[r]);
    }
    for col in 0..k {
        let pivot = (col..k)
            .max_by(|&p, &q| a[p][col].abs().total_cmp(&a[q][col].abs()))
            .unwrap_or(col);
        a.swap(col, pivot);
        let d = a[col][col];
        if d.abs() < 1e-12 {
            continue;
        }
        let pivot_row = a[col].clone();
        for (r, line) in a.iter_mut().enumerate() {
            if r != col {
                let f = line[col] / d;
                for (v, p) in line[col..=k].iter_mut().zip(&pivot_row[col..=k]) {
                    *v -= f * p;
                }
            }
        }
    }
    let beta: Vec<f64> = (0..k)
        .map(|r| {
            if a[r][r].abs() < 1e-12 {
                0.0
            } else {
                a[r][k] / a[r][r]
            }
        })
        .collect();
    let res: Vec<f64> = (0..n)
        .map(|i| y[i] - row(i).iter().zip(&beta).map(|(x, b)| x * b).sum::<f64>())
        .collect();
    zscore(&res)
}

/// `x` minus its mean, over its standard deviation (all zeros if constant).
pub fn zscore(x: &[f64]) -> Vec<f64> {
    let n = x.len().max(1) as f64;
    let mean = x.iter().sum::<f64>() / n;
    let sd = (x.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n).sqrt();
    if sd <= 1e-12 {
        return vec![0.0; x.len()];
    }
    x.iter().map(|v| (v - mean) / sd).collect()
}

/// `x` delayed by `lag` (the first `lag` entries 0).
pub fn lagged(x: &[f64], lag: usize) -> Vec<f64> {
    (0..x.len())
        .map(|i| if i >= lag { x[i - lag] } else { 0.0 })
        .collect()
}

/// The largest correlation of `lead` with `follow` delayed by 0..=`max_lag` windows.
pub fn max_lagged_corr(lead: &[f64], follow: &[f64], max_lag: usize) -> f64 {
    (0..=max_lag)
        .filter(|&l| l < follow.len())
        .map(|l| pearson(lead, &follow[l..]))
        .fold(f64::NEG_INFINITY, f64::max)
        .max(-1.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_distr::{Distribution, Normal};

    fn normal(rng: &mut StdRng, mean: f64, n: usize) -> Vec<f64> {
        let d = Normal::new(mean, 1.0).unwrap();
        (0..n).map(|_| d.sample(rng)).collect()
    }

    #[test]
    fn auc_of_known_orders() {
        assert_eq!(auc(&[3.0, 4.0], &[1.0, 2.0]), Some(1.0));
        assert_eq!(auc(&[1.0, 2.0], &[3.0, 4.0]), Some(0.0));
        assert_eq!(auc(&[1.0], &[1.0]), Some(0.5));
        assert_eq!(auc(&[2.0, 0.0], &[1.0]), Some(0.5));
        assert_eq!(auc(&[], &[1.0]), None);
    }

    #[test]
    fn tpr_at_fpr_of_known_orders() {
        let neg: Vec<f64> = (0..100).map(f64::from).collect();
        // Threshold: the highest negative (99) at FPR 1e-2 of 100 lets none through...
        // floor(0.01·100) = 1 → second highest (98): one negative (99) above it.
        assert_eq!(tpr_at_fpr(&[98.5, 200.0, 0.0], &neg, 0.01), Some(2.0 / 3.0));
        assert_eq!(tpr_at_fpr(&[1000.0], &neg, 0.0), Some(1.0));
    }

    /// Planted signal: positives shifted by 2σ are found (AUC ≈ 0.92) and the interval
    /// excludes chance; no signal: the interval covers 0.5.
    #[test]
    fn auc_interval_finds_a_planted_shift_and_covers_chance_without_one() {
        let mut rng = StdRng::seed_from_u64(7);
        let (pos, neg) = (normal(&mut rng, 2.0, 200), normal(&mut rng, 0.0, 2000));
        let s = auc_scored(&pos, &neg, 1).unwrap();
        assert!(s.value > 0.88 && s.ci_low > 0.8, "{s:?}");
        let t = tpr_scored(&pos, &neg, 0.01, 1).unwrap();
        assert!(t.value > 0.2 && t.ci_low > t.chance, "{t:?}");
        let (pos, neg) = (normal(&mut rng, 0.0, 200), normal(&mut rng, 0.0, 2000));
        let s = auc_scored(&pos, &neg, 1).unwrap();
        assert!(s.ci_low < 0.5 && 0.5 < s.ci_high, "{s:?}");
        let t = tpr_scored(&pos, &neg, 0.01, 1).unwrap();
        assert!(t.value < 0.06, "{t:?}");
    }

    /// Perfect clustering scores 1 above a chance well below it; a random labelling scores
    /// near its chance, and the interval covers it.
    #[test]
    fn agreement_scores_a_planted_partition_and_a_random_one() {
        let truth: Vec<u32> = (0..40).map(|i| i / 10).collect();
        let s = agreement_scored(&truth, &truth, Agreement::Nmi, 3).unwrap();
        assert!((s.value - 1.0).abs() < 1e-9 && s.chance < 0.2, "{s:?}");
        let a = agreement_scored(&truth, &truth, Agreement::Ari, 3).unwrap();
        assert!(
            (a.value - 1.0).abs() < 1e-9 && a.chance.abs() < 0.05,
            "{a:?}"
        );
        let mut rng = StdRng::seed_from_u64(9);
        let random: Vec<u32> = (0..40).map(|_| rng.random_range(0..4)).collect();
        let s = agreement_scored(&random, &truth, Agreement::Nmi, 3).unwrap();
        assert!(s.ci_low <= s.chance + 0.05 && s.value < 0.3, "{s:?}");
    }

    /// A series made of its predictor plus a small planted part: the residual is the
    /// planted part (correlation ≈ 1), and a constant predictor changes nothing.
    #[test]
    fn residual_removes_what_the_predictors_explain() {
        let mut rng = StdRng::seed_from_u64(3);
        let p = normal(&mut rng, 10.0, 300);
        let planted = normal(&mut rng, 0.0, 300);
        let y: Vec<f64> = (0..300)
            .map(|i| 3.0 * p[i] + 0.2 * planted[i] + 5.0)
            .collect();
        assert!(pearson(&y, &planted) < 0.2);
        let r = residual(&y, &[p.clone(), vec![1.0; 300]]);
        assert!(pearson(&r, &planted) > 0.99, "{}", pearson(&r, &planted));
        assert_eq!(lagged(&[1.0, 2.0, 3.0], 1), vec![0.0, 1.0, 2.0]);
        assert_eq!(zscore(&[2.0, 2.0]), vec![0.0, 0.0]);
    }

    #[test]
    fn lagged_correlation_finds_a_delayed_copy() {
        let mut rng = StdRng::seed_from_u64(5);
        let a = normal(&mut rng, 0.0, 300);
        let mut b = vec![0.0, 0.0];
        b.extend_from_slice(&a[..298]);
        assert!(max_lagged_corr(&a, &b, 3) > 0.99);
        assert!(max_lagged_corr(&a, &b, 1) < 0.3);
        assert_eq!(pearson(&[1.0, 1.0, 1.0], &[1.0, 2.0, 3.0]), 0.0);
    }
}

//! Organisation inference: recover who belongs to which organisation (subnet) and which
//! organisations federate, from what a global passive observer sees.
//!
//! The observer builds a traffic graph between users from window counts (as in
//! [`super::disclosure`]): for every ordered pair, the correlation of `i`'s send counts with `j`'s
//! (lagged) receipt counts, as a z-score `z_ij = corr_ij · √R` (≈ N(0, 1) when `i` never writes
//! to `j`). The symmetric score `s_ij = (z_ij + z_ji) / √2` is kept as an edge of weight
//! `s_ij − threshold` when it exceeds `threshold` (3 by default: roughly one false edge per 700
//! pairs). Users are clustered by Louvain modularity maximisation (deterministic: nodes in index
//! order, ties to the lower community). Users with no edge at all form one "unclustered" group,
//! since the observer knows nothing about them.
//!
//! Scores against the truth: NMI (arithmetic normalisation) and the adjusted Rand index, plus
//! the same for the inferred labels randomly permuted (chance with equal cluster sizes).
//! Federation, two ways: from the inferred clusters (mean `s` between and within clusters, read
//! off for each pair of true organisations), and for an observer who knows every user's subnet
//! (IP addresses) and asks only which subnets talk (mean `s` between the two subnets' users).
//! Organisation pairs are ranked by the score and scored against the true federated pairs by
//! ROC AUC (0.5 = chance) and precision at F (F = the number of federated pairs).

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde::Serialize;

use super::workload::{Trace, Workload, stream_seed};

/// Largest population the attack accepts (its state is a dense users² matrix).
pub const MAX_USERS: u32 = 2000;

/// Organisation-inference figures at one observation time.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct OrgPoint {
    pub time_s: f64,
    pub windows: u32,
    /// Edges kept in the observed graph.
    pub edges: u64,
    /// Inferred clusters (the unclustered group counts as one).
    pub clusters: u32,
    pub nmi: f64,
    pub ari: f64,
    /// NMI and ARI of the inferred labels shuffled over users.
    pub nmi_chance: f64,
    pub ari_chance: f64,
    /// ROC AUC of the federated organisation pairs (null when undefined).
    pub federation_auc: Option<f64>,
    /// Fraction of the top-F organisation pairs that truly federate (null when F = 0).
    pub federation_precision: Option<f64>,
    /// The top-F organisation pairs, as the observer ranks them.
    pub federation_guess: Vec<(u32, u32)>,
    /// The same two scores for an observer who knows every user's subnet.
    pub federation_auc_known_orgs: Option<f64>,
    pub federation_precision_known_orgs: Option<f64>,
}

/// Runs the attack, scoring at `checkpoints` evenly spaced observation times.
pub fn run(
    wl: &Workload,
    trace: &Trace,
    window_s: f64,
    lag: u32,
    checkpoints: u32,
    threshold: f64,
    seed: u64,
) -> Vec<OrgPoint> {
    let n = trace.users as usize;
    let (send_w, recv_w) = trace.windows(window_s);
    let lag = lag as usize;
    let usable = send_w.len().saturating_sub(lag).max(1);
    let mut marks: Vec<usize> = (1..=checkpoints as usize)
        .map(|i| (usable * i).div_ceil(checkpoints as usize).max(1))
        .collect();
    marks.dedup();
    let mut sxy = vec![0.0f64; n * n];
    let (mut sa, mut saa) = (vec![0.0f64; n], vec![0.0f64; n]);
    let (mut so, mut soo) = (vec![0.0f64; n], vec![0.0f64; n]);
    let mut lagged = vec![0.0f64; n];
    let mut touched: Vec<usize> = Vec::new();
    let mut out = Vec::new();
    let mut next_mark = 0;
    for (w, sends) in send_w.iter().enumerate().take(usable) {
        touched.clear();
        for recv in recv_w.iter().skip(w).take(lag + 1) {
            for &(c, cnt) in recv {
                let c = c as usize;
                if lagged[c] == 0.0 {
                    touched.push(c);
                }
                lagged[c] += f64::from(cnt);
            }
        }
        for &c in &touched {
            so[c] += lagged[c];
            soo[c] += lagged[c] * lagged[c];
        }
        for &(i, a) in sends {
            let (i, a) = (i as usize, f64::from(a));
            sa[i] += a;
            saa[i] += a * a;
            let row = &mut sxy[i * n..(i + 1) * n];
            for &c in &touched {
                row[c] += a * lagged[c];
            }
        }
        for &c in &touched {
            lagged[c] = 0.0;
        }
        if next_mark < marks.len() && w + 1 == marks[next_mark] {
            next_mark += 1;
            let r = (w + 1) as f64;
            let s = symmetric_scores(n, r, &sxy, (&sa, &saa), (&so, &soo));
            out.push(score_point(wl, &s, n, r, window_s, threshold, seed));
        }
    }
    out
}

/// `s_ij = (z_ij + z_ji) / √2`, zero on the diagonal and where a variance is zero.
fn symmetric_scores(
    n: usize,
    r: f64,
    sxy: &[f64],
    (sa, saa): (&[f64], &[f64]),
    (so, soo): (&[f64], &[f64]),
) -> Vec<f64> {
    let va: Vec<f64> = (0..n).map(|i| saa[i] - sa[i] * sa[i] / r).collect();
    let vo: Vec<f64> = (0..n).map(|j| soo[j] - so[j] * so[j] / r).collect();
    let z = |i: usize, j: usize| {
        let d = va[i] * vo[j];
        if d <= 1e-12 {
            0.0
        } else {
            (sxy[i * n + j] - sa[i] * so[j] / r) / d.sqrt() * r.sqrt()
        }
    };
    let mut s = vec![0.0f64; n * n];
    for i in 0..n {
        for j in i + 1..n {
            let v = (z(i, j) + z(j, i)) / std::f64::consts::SQRT_2;
            s[i * n + j] = v;
            s[j * n + i] = v;
        }
    }
    s
}

fn score_point(
    wl: &Workload,
    s: &[f64],
    n: usize,
    r: f64,
    window_s: f64,
    threshold: f64,
    seed: u64,
) -> OrgPoint {
    let mut g = vec![0.0f64; n * n];
    let mut edges = 0u64;
    let mut degree = vec![0.0f64; n];
    for i in 0..n {
        for j in 0..n {
            if i != j && s[i * n + j] > threshold {
                let w = s[i * n + j] - threshold;
                g[i * n + j] = w;
                degree[i] += w;
                if i < j {
                    edges += 1;
                }
            }
        }
    }
    let mut labels = louvain(&g, n);
    // Users with no edge at all are one group: the observer knows nothing about them.
    let unclustered = n as u32;
    for (i, l) in labels.iter_mut().enumerate() {
        if degree[i] == 0.0 {
            *l = unclustered;
        }
    }
    let labels = renumber(&labels);
    let clusters = labels.iter().max().map_or(0, |m| m + 1);
    let nmi = nmi(&wl.org, &labels);
    let ari = ari(&wl.org, &labels);
    let mut shuffled = labels.clone();
    let mut rng = StdRng::seed_from_u64(stream_seed(seed, 20));
    for i in (1..n).rev() {
        let j = rng.random_range(0..=i);
        shuffled.swap(i, j);
    }
    let (auc, precision, guess) = rank_pairs(wl, &federation_inferred(wl, s, n, &labels));
    let (auc_known, precision_known, _) = rank_pairs(wl, &federation_known(wl, s, n));
    OrgPoint {
        time_s: r * window_s,
        windows: r as u32,
        edges,
        clusters,
        nmi,
        ari,
        nmi_chance: self::nmi(&wl.org, &shuffled),
        ari_chance: self::ari(&wl.org, &shuffled),
        federation_auc: auc,
        federation_precision: precision,
        federation_guess: guess,
        federation_auc_known_orgs: auc_known,
        federation_precision_known_orgs: precision_known,
    }
}

/// Scores the organisation pairs: `(AUC, precision at F, top-F pairs)` for the ranking of
/// `pair_score` against the true federated pairs.
fn rank_pairs(wl: &Workload, pair_score: &[f64]) -> (Option<f64>, Option<f64>, Vec<(u32, u32)>) {
    let k = wl.orgs as usize;
    let mut pairs: Vec<((u32, u32), f64, bool)> = Vec::new();
    for a in 0..k {
        for b in a + 1..k {
            let p = (a as u32, b as u32);
            pairs.push((p, pair_score[a * k + b], wl.federated.contains(&p)));
        }
    }
    let f = wl.federated.len();
    let pos: Vec<f64> = pairs.iter().filter(|p| p.2).map(|p| p.1).collect();
    let neg: Vec<f64> = pairs.iter().filter(|p| !p.2).map(|p| p.1).collect();
    let auc = (!pos.is_empty() && !neg.is_empty()).then(|| {
        let mut wins = 0.0;
        for &p in &pos {
            for &q in &neg {
                wins += if p > q {
                    1.0
                } else if p == q {
                    0.5
                } else {
                    0.0
                };
            }
        }
        wins / (pos.len() * neg.len()) as f64
    });
    pairs.sort_by(|x, y| y.1.total_cmp(&x.1).then(x.0.cmp(&y.0)));
    let top: Vec<(u32, u32)> = pairs.iter().take(f).map(|p| p.0).collect();
    let precision = (f > 0).then(|| pairs.iter().take(f).filter(|p| p.2).count() as f64 / f as f64);
    (auc, precision, top)
}

/// Federation from the inferred clusters: `D[x][y]` is the mean `s` between inferred clusters
/// `x` and `y` (within a cluster for `x = y`); organisations `A`, `B` score the mean of
/// `D[c_i][c_j]` over their users. Two organisations merged into one cluster thus score that
/// cluster's inner density, as the merge is itself a sign that they talk.
fn federation_inferred(wl: &Workload, s: &[f64], n: usize, labels: &[u32]) -> Vec<f64> {
    let c = labels.iter().max().map_or(0, |m| *m as usize + 1);
    let mut sum = vec![0.0f64; c * c];
    let mut cnt = vec![0.0f64; c * c];
    for i in 0..n {
        for j in 0..n {
            if i != j {
                let x = labels[i] as usize * c + labels[j] as usize;
                sum[x] += s[i * n + j];
                cnt[x] += 1.0;
            }
        }
    }
    let d: Vec<f64> = sum
        .iter()
        .zip(&cnt)
        .map(|(s, n)| if *n > 0.0 { s / n } else { 0.0 })
        .collect();
    let k = wl.orgs as usize;
    let mut score = vec![0.0f64; k * k];
    let mut pairs = vec![0.0f64; k * k];
    for i in 0..n {
        for j in 0..n {
            if i != j {
                let x = wl.org[i] as usize * k + wl.org[j] as usize;
                score[x] += d[labels[i] as usize * c + labels[j] as usize];
                pairs[x] += 1.0;
            }
        }
    }
    score
        .iter()
        .zip(&pairs)
        .map(|(s, n)| if *n > 0.0 { s / n } else { 0.0 })
        .collect()
}

/// Federation when the observer knows every user's subnet (e.g. from IP addresses): the mean
/// `s` over user pairs between the two organisations.
fn federation_known(wl: &Workload, s: &[f64], n: usize) -> Vec<f64> {
    let k = wl.orgs as usize;
    let mut score = vec![0.0f64; k * k];
    let mut pairs = vec![0.0f64; k * k];
    for i in 0..n {
        for j in 0..n {
            if i != j {
                let x = wl.org[i] as usize * k + wl.org[j] as usize;
                score[x] += s[i * n + j];
                pairs[x] += 1.0;
            }
        }
    }
    score
        .iter()
        .zip(&pairs)
        .map(|(s, n)| if *n > 0.0 { s / n } else { 0.0 })
        .collect()
}

/// Relabels to 0.. in order of first appearance.
fn renumber(labels: &[u32]) -> Vec<u32> {
    let mut map: Vec<(u32, u32)> = Vec::new();
    labels
        .iter()
        .map(|&l| match map.iter().find(|m| m.0 == l) {
            Some(m) => m.1,
            None => {
                let id = map.len() as u32;
                map.push((l, id));
                id
            }
        })
        .collect()
}

/// Louvain modularity maximisation on a dense symmetric weight matrix (zero diagonal).
pub fn louvain(w: &[f64], n: usize) -> Vec<u32> {
    let mut labels: Vec<u32> = (0..n as u32).collect();
    let mut g = w.to_vec();
    let mut size = n;
    for _ in 0..32 {
        let comm = one_level(&g, size);
        let k = comm.iter().max().map_or(0, |m| *m as usize + 1);
        for l in labels.iter_mut() {
            *l = comm[*l as usize];
        }
        if k == size {
            break;
        }
        let mut h = vec![0.0f64; k * k];
        for i in 0..size {
            for j in 0..size {
                h[comm[i] as usize * k + comm[j] as usize] += g[i * size + j];
            }
        }
        g = h;
        size = k;
    }
    labels
}

/// One Louvain level: local moves until none improves modularity; returns renumbered communities.
fn one_level(g: &[f64], n: usize) -> Vec<u32> {
    let k: Vec<f64> = (0..n).map(|i| g[i * n..(i + 1) * n].iter().sum()).collect();
    let m2: f64 = k.iter().sum();
    let mut comm: Vec<usize> = (0..n).collect();
    if m2 <= 0.0 {
        return (0..n as u32).collect();
    }
    let mut tot = k.clone();
    let mut links = vec![0.0f64; n];
    let mut seen: Vec<usize> = Vec::new();
    for _ in 0..100 {
        let mut moved = false;
        for i in 0..n {
            let ci = comm[i];
            seen.clear();
            for j in 0..n {
                let wij = g[i * n + j];
                if j != i && wij != 0.0 {
                    let c = comm[j];
                    if links[c] == 0.0 {
                        seen.push(c);
                    }
                    links[c] += wij;
                }
            }
            tot[ci] -= k[i];
            let mut best = ci;
            let mut best_gain = links[ci] - tot[ci] * k[i] / m2;
            seen.sort_unstable();
            for &c in &seen {
                let gain = links[c] - tot[c] * k[i] / m2;
                if gain > best_gain + 1e-12 {
                    best = c;
                    best_gain = gain;
                }
            }
            tot[best] += k[i];
            comm[i] = best;
            moved |= best != ci;
            for &c in &seen {
                links[c] = 0.0;
            }
            links[ci] = 0.0;
        }
        if !moved {
            break;
        }
    }
    renumber(&comm.iter().map(|&c| c as u32).collect::<Vec<_>>())
}

fn contingency(a: &[u32], b: &[u32]) -> (Vec<Vec<f64>>, Vec<f64>, Vec<f64>) {
    let ka = a.iter().max().map_or(0, |m| *m as usize + 1);
    let kb = b.iter().max().map_or(0, |m| *m as usize + 1);
    let mut t = vec![vec![0.0f64; kb]; ka];
    for (&x, &y) in a.iter().zip(b) {
        t[x as usize][y as usize] += 1.0;
    }
    let ra = t.iter().map(|r| r.iter().sum()).collect();
    let rb = (0..kb).map(|j| t.iter().map(|r| r[j]).sum()).collect();
    (t, ra, rb)
}

fn entropy(counts: &[f64], n: f64) -> f64 {
    counts
        .iter()
        .filter(|&&c| c > 0.0)
        .map(|&c| -(c / n) * (c / n).ln())
        .sum()
}

/// Normalised mutual information, I / ((H(a) + H(b)) / 2); 1 when both are one cluster.
pub fn nmi(a: &[u32], b: &[u32]) -> f64 {
    let n = a.len() as f64;
    let (t, ra, rb) = contingency(a, b);
    let (ha, hb) = (entropy(&ra, n), entropy(&rb, n));
    if ha + hb == 0.0 {
        return 1.0;
    }
    let mut mi = 0.0;
    for (i, row) in t.iter().enumerate() {
        for (j, &c) in row.iter().enumerate() {
            if c > 0.0 {
                mi += c / n * (c * n / (ra[i] * rb[j])).ln();
            }
        }
    }
    (mi / ((ha + hb) / 2.0)).max(0.0)
}

/// Adjusted Rand index (Hubert and Arabie).
pub fn ari(a: &[u32], b: &[u32]) -> f64 {
    let c2 = |x: f64| x * (x - 1.0) / 2.0;
    let (t, ra, rb) = contingency(a, b);
    let idx: f64 = t.iter().flatten().map(|&c| c2(c)).sum();
    let sa: f64 = ra.iter().map(|&c| c2(c)).sum();
    let sb: f64 = rb.iter().map(|&c| c2(c)).sum();
    let total = c2(a.len() as f64);
    let expected = sa * sb / total;
    let max = (sa + sb) / 2.0;
    if max == expected {
        return 1.0;
    }
    (idx - expected) / (max - expected)
}

#[cfg(test)]
mod tests {
    use super::super::config::WorkloadSection;
    use super::super::workload::{DelayLaw, Rates, Trace, Workload};
    use super::*;

    #[test]
    fn scores_of_known_partitions() {
        let a = [0, 0, 1, 1, 2, 2];
        assert!((nmi(&a, &[5, 5, 3, 3, 4, 4]) - 1.0).abs() < 1e-12);
        assert!((ari(&a, &[1, 1, 2, 2, 0, 0]) - 1.0).abs() < 1e-12);
        assert!(nmi(&a, &[0; 6]).abs() < 1e-12);
        assert!(ari(&a, &[0; 6]).abs() < 1e-12);
    }

    #[test]
    fn louvain_splits_two_cliques() {
        let n = 8;
        let mut w = vec![0.0; n * n];
        for i in 0..n {
            for j in 0..n {
                if i != j && (i < 4) == (j < 4) {
                    w[i * n + j] = 1.0;
                }
            }
        }
        w[3 * n + 4] = 0.1;
        w[4 * n + 3] = 0.1;
        let l = louvain(&w, n);
        assert!(l[..4].iter().all(|&x| x == l[0]));
        assert!(l[4..].iter().all(|&x| x == l[4]));
        assert_ne!(l[0], l[4]);
    }

    fn runs(cover: f64) -> OrgPoint {
        let ws = WorkloadSection {
            orgs: 4,
            contacts: 4,
            intra_org_fraction: 0.8,
            federated_pairs: 2,
            ..WorkloadSection::default()
        };
        let wl = Workload::generate(&ws, 60, 4);
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
        let trace = Trace::generate(&wl, &ws, law, rates, 2000.0, 4);
        run(&wl, &trace, 2.0, 1, 1, 3.0, 4).pop().unwrap()
    }

    /// Without cover the organisations are recovered far better than chance; strong cover
    /// (10x the real rate) makes the same observation time worth much less.
    #[test]
    fn organisations_recovered_without_cover_and_less_with_it() {
        let off = runs(0.0);
        let on = runs(2.0);
        assert!(off.nmi > 0.6 && off.ari > 0.4, "{off:?}");
        assert!(off.nmi > off.nmi_chance + 0.4, "{off:?}");
        assert!(on.nmi < off.nmi - 0.15, "off {off:?} on {on:?}");
    }
}

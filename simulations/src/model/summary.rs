//! `summary.json`: the run's configuration, seed and aggregated metrics. It holds no wall-clock
//! numbers, so the same configuration and seed give the same bytes.

use serde::Serialize;

use super::config::{ModelConfig, Validated};
use super::engine::RawRun;

/// Order statistics of a sample. Quantiles are nearest-rank: the value at sorted index
/// `ceil(q * n) - 1`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Dist {
    pub count: u64,
    pub mean: f64,
    pub median: f64,
    pub p5: f64,
    pub p95: f64,
    pub min: f64,
    pub max: f64,
}

impl Dist {
    /// Summarises `v` (NaNs are skipped); all fields are 0 for an empty sample.
    pub fn of(v: impl Iterator<Item = f64>) -> Self {
        let mut v: Vec<f64> = v.filter(|x| !x.is_nan()).collect();
        if v.is_empty() {
            return Self {
                count: 0,
                mean: 0.0,
                median: 0.0,
                p5: 0.0,
                p95: 0.0,
                min: 0.0,
                max: 0.0,
            };
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let q = |q: f64| v[((q * n as f64).ceil() as usize).clamp(1, n) - 1];
        Self {
            count: n as u64,
            mean: v.iter().sum::<f64>() / n as f64,
            median: q(0.5),
            p5: q(0.05),
            p95: q(0.95),
            min: v[0],
            max: v[n - 1],
        }
    }
}

/// One anonymity measure in three forms.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Anonymity {
    /// Shannon entropy (bits) of the adversary's distribution.
    pub entropy_bits: Dist,
    /// Min-entropy, -log2 of the largest probability (bits).
    pub min_entropy_bits: Dist,
    /// Entropy divided by log2(clients).
    pub degree: Dist,
}

/// Receiver anonymity of the tracked targets.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ReceiverAnonymity {
    #[serde(flatten)]
    pub anonymity: Anonymity,
    /// Probability the adversary assigns to the true recipient.
    pub true_recipient_prob: Dist,
    /// Rank of the true recipient among all recipients (1 = the adversary's top guess).
    pub true_recipient_rank: Dist,
    /// Mass still undelivered when each target was closed (at most `mass_epsilon` unless the drain was cut).
    pub residual_mass: Dist,
}

/// Loopix-style sender unlinkability (Piotrowska et al. 2017, §5): for a message sent by one
/// of two senders, the adversary's likelihood ratio between the worlds "Alice sent it" and "Bob
/// sent it" is `p(Alice) / p(Bob)` under its posterior (equal priors: both senders behave alike).
/// `epsilon(δ)` is the smallest ε with `Pr[|ln LR| > ε] <= δ` over the measured messages (the
/// empirical `1 − δ` quantile of `|ln LR|`): the worlds are (ε, δ)-indistinguishable per message.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Unlinkability {
    /// The labelled senders, or `None` for the pooled estimate (every sender `s` against `s ^ 1`).
    pub senders: Option<[u32; 2]>,
    pub messages: u64,
    pub delta: f64,
    /// `None` (JSON `null`) when more than a δ share of messages are linked outright (infinite LR),
    /// or when there are no messages.
    pub epsilon: Option<f64>,
    /// `epsilon` at δ = 0 (the largest |ln LR| seen), 0.01, 0.05, 0.1, 0.5.
    pub epsilon_at: Vec<EpsilonAt>,
    /// Mean of |ln LR| over the messages with a finite ratio.
    pub mean_abs_log_lr: f64,
    /// Share of messages whose other sender had probability 0 (the adversary is certain).
    pub infinite_fraction: f64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct EpsilonAt {
    pub delta: f64,
    pub epsilon: Option<f64>,
}

impl Unlinkability {
    /// Estimates ε(δ) from signed log-likelihood ratios (infinite when one world is excluded).
    pub fn of(senders: Option<[u32; 2]>, log_lr: &[f64], delta: f64) -> Self {
        let mut a: Vec<f64> = log_lr
            .iter()
            .filter(|x| !x.is_nan())
            .map(|x| x.abs())
            .collect();
        a.sort_by(f64::total_cmp);
        let n = a.len();
        let at = |d: f64| -> Option<f64> {
            if n == 0 {
                return None;
            }
            // Nearest rank: at most a δ share of the sample lies strictly above the value.
            let k = ((1.0 - d) * n as f64).ceil() as usize;
            let x = a[k.clamp(1, n) - 1];
            x.is_finite().then_some(x)
        };
        let finite: Vec<f64> = a.iter().copied().filter(|x| x.is_finite()).collect();
        Self {
            senders,
            messages: n as u64,
            delta,
            epsilon: at(delta),
            epsilon_at: [0.0, 0.01, 0.05, 0.1, 0.5]
                .into_iter()
                .map(|d| EpsilonAt {
                    delta: d,
                    epsilon: at(d),
                })
                .collect(),
            mean_abs_log_lr: if finite.is_empty() {
                0.0
            } else {
                finite.iter().sum::<f64>() / finite.len() as f64
            },
            infinite_fraction: if n == 0 {
                0.0
            } else {
                (n - finite.len()) as f64 / n as f64
            },
        }
    }
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Latency {
    pub count: u64,
    pub mean: f64,
    pub variance: f64,
    pub p5: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
    /// Theory for honest pools: (L + 2) fixed links plus Gamma(L, mean hop delay).
    pub theory_mean: f64,
    pub theory_variance: f64,
    pub fixed_links_s: f64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Traffic {
    pub real_sent: u64,
    pub loop_sent: u64,
    pub drop_sent: u64,
    /// Real messages sent in the measured window (all of them are measured).
    pub real_measured: u64,
    pub loop_window: u64,
    pub drop_window: u64,
    pub targets: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Overhead {
    /// Cover packets (loops + drops) per real packet, over the measured window.
    pub cover_per_real: f64,
    /// Share of all packets that are cover.
    pub cover_fraction: f64,
    /// Link transmissions (client to gateway, gateway to relay, relay to relay, relay to gateway) per
    /// measured real message, counting the cover sent alongside. Every packet has the same size, so
    /// bytes are this times the packet size.
    pub link_transmissions_per_real: f64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RunInfo {
    pub events: u64,
    pub end_s: f64,
    pub drain_cut: bool,
    pub max_in_flight: u64,
}

/// Everything in `summary.json`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Summary {
    pub mode: &'static str,
    pub seed: u64,
    pub config: ModelConfig,
    /// Which measure `entropy_bits` reports: "sender" (every measured message) or "receiver" (targets).
    pub entropy_metric: &'static str,
    pub entropy_bits: Dist,
    pub min_entropy_bits: Dist,
    pub degree_of_anonymity: Dist,
    pub sender_anonymity: Option<Anonymity>,
    pub receiver_anonymity: Option<ReceiverAnonymity>,
    /// Unlinkability of the two labelled senders (needs sender tracking).
    pub unlinkability: Option<Unlinkability>,
    /// The same estimate pooled over every sender and its partner `s ^ 1` (many more messages).
    pub unlinkability_pooled: Option<Unlinkability>,
    pub latency_s: Latency,
    pub traffic: Traffic,
    pub overhead: Overhead,
    pub corrupt_relays: Vec<u32>,
    pub routes: Routes,
    pub run: RunInfo,
}

/// How much of the measured messages' routes the corrupt relays held.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Routes {
    /// "family" or "uniform" (`[adversary] route_selection`).
    pub selection: &'static str,
    pub hostile_operators: u32,
    /// Measured delivered messages by their number of corrupt relays (0..=layers).
    pub corrupt_hops: Vec<u64>,
    /// Share whose every relay was corrupt: the adversary links sender and receiver.
    pub fully_hostile: f64,
    /// Share with at least one corrupt relay.
    pub any_hostile: f64,
}

impl Routes {
    fn of(v: &Validated, hist: &[u64]) -> Self {
        let total: u64 = hist.iter().sum();
        let share = |n: u64| {
            if total == 0 {
                0.0
            } else {
                n as f64 / total as f64
            }
        };
        Self {
            selection: if v.family { "family" } else { "uniform" },
            hostile_operators: v.hostile_operators,
            corrupt_hops: hist.to_vec(),
            fully_hostile: share(hist.last().copied().unwrap_or(0)),
            any_hostile: share(total - hist.first().copied().unwrap_or(0)),
        }
    }
}

/// Builds the summary of a run.
pub fn summarize(config: &ModelConfig, v: &Validated, raw: &RawRun) -> Summary {
    let log_n = f64::from(v.clients).log2().max(f64::MIN_POSITIVE);
    let sender = v.sender_exact.then(|| Anonymity {
        entropy_bits: Dist::of(raw.sender_entropy.iter().copied()),
        min_entropy_bits: Dist::of(raw.sender_min_entropy.iter().copied()),
        degree: Dist::of(raw.sender_entropy.iter().map(|&x| x / log_n)),
    });
    let receiver = (!raw.targets.is_empty()).then(|| ReceiverAnonymity {
        anonymity: Anonymity {
            entropy_bits: Dist::of(raw.targets.iter().map(|t| t.entropy)),
            min_entropy_bits: Dist::of(raw.targets.iter().map(|t| t.min_entropy)),
            degree: Dist::of(raw.targets.iter().map(|t| t.entropy / log_n)),
        },
        true_recipient_prob: Dist::of(raw.targets.iter().map(|t| t.true_prob)),
        true_recipient_rank: Dist::of(raw.targets.iter().map(|t| f64::from(t.true_rank))),
        residual_mass: Dist::of(raw.targets.iter().map(|t| t.residual)),
    });
    let empty = Anonymity {
        entropy_bits: Dist::of(std::iter::empty()),
        min_entropy_bits: Dist::of(std::iter::empty()),
        degree: Dist::of(std::iter::empty()),
    };
    let (metric, primary) = match (&sender, &receiver) {
        (Some(s), _) => ("sender", s.clone()),
        (None, Some(r)) => ("receiver", r.anonymity.clone()),
        (None, None) => ("none", empty),
    };
    let c = &raw.counters;
    let n = c.measured_delivered as f64;
    let mean = if n > 0.0 { raw.latency_sum / n } else { 0.0 };
    let variance = if n > 1.0 {
        (raw.latency_sum_sq - n * mean * mean) / (n - 1.0)
    } else {
        0.0
    };
    let q = |p: f64| raw.latency_us.value_at_quantile(p) as f64 / 1e6;
    let fixed = (v.layers as f64 + 2.0) * v.link_s;
    let cover = (c.loop_window + c.drop_window) as f64;
    let real = c.real_window as f64;
    Summary {
        mode: "model",
        seed: v.seed,
        config: config.clone(),
        entropy_metric: metric,
        entropy_bits: primary.entropy_bits,
        min_entropy_bits: primary.min_entropy_bits,
        degree_of_anonymity: primary.degree,
        sender_anonymity: sender,
        receiver_anonymity: receiver,
        unlinkability: v.sender_exact.then(|| {
            Unlinkability::of(
                Some(v.unlinkability_senders),
                &raw.pair_log_lr,
                v.unlinkability_delta,
            )
        }),
        unlinkability_pooled: v
            .sender_exact
            .then(|| Unlinkability::of(None, &raw.pooled_log_lr, v.unlinkability_delta)),
        latency_s: Latency {
            count: c.measured_delivered,
            mean,
            variance: variance.max(0.0),
            p5: q(0.05),
            p50: q(0.5),
            p90: q(0.9),
            p99: q(0.99),
            max: raw.latency_max,
            theory_mean: fixed + v.layers as f64 * v.mean_hop_s,
            theory_variance: v.layers as f64 * v.mean_hop_s * v.mean_hop_s,
            fixed_links_s: fixed,
        },
        traffic: Traffic {
            real_sent: c.real_sent,
            loop_sent: c.loop_sent,
            drop_sent: c.drop_sent,
            real_measured: c.real_window,
            loop_window: c.loop_window,
            drop_window: c.drop_window,
            targets: raw.targets.len() as u64,
        },
        overhead: Overhead {
            cover_per_real: if real > 0.0 { cover / real } else { 0.0 },
            cover_fraction: if real + cover > 0.0 {
                cover / (real + cover)
            } else {
                0.0
            },
            link_transmissions_per_real: if real > 0.0 {
                (real + cover) * (v.layers as f64 + 2.0) / real
            } else {
                0.0
            },
        },
        corrupt_relays: raw.corrupt.clone(),
        routes: Routes::of(v, &raw.corrupt_hops_hist),
        run: RunInfo {
            events: c.events,
            end_s: c.end_s,
            drain_cut: c.drain_cut,
            max_in_flight: c.max_in_flight,
        },
    }
}

/// Density of Gamma(k, theta) at `x` (integer shape, as for k exponential hops).
pub fn gamma_pdf(k: u32, theta: f64, x: f64) -> f64 {
    if x < 0.0 || theta <= 0.0 {
        return 0.0;
    }
    let k = k.max(1);
    let ln_fact: f64 = (1..k).map(|i| f64::from(i).ln()).sum();
    ((f64::from(k) - 1.0) * (x / theta).ln() - x / theta - ln_fact).exp() / theta
}

/// CDF of Gamma(k, theta) for integer k (Erlang): 1 - e^{-x/θ} Σ_{i<k} (x/θ)^i / i!.
pub fn gamma_cdf(k: u32, theta: f64, x: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    let y = x / theta;
    let mut term = 1.0;
    let mut sum = 1.0;
    for i in 1..k.max(1) {
        term *= y / f64::from(i);
        sum += term;
    }
    1.0 - (-y).exp() * sum
}

/// Quantile of Gamma(k, theta) by bisection.
pub fn gamma_quantile(k: u32, theta: f64, p: f64) -> f64 {
    let (mut lo, mut hi) = (0.0, theta * (f64::from(k) + 50.0));
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if gamma_cdf(k, theta, mid) < p {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    0.5 * (lo + hi)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_quantiles() {
        let d = Dist::of((1..=100).map(f64::from));
        assert_eq!(
            (d.p5, d.median, d.p95, d.min, d.max),
            (5.0, 50.0, 95.0, 1.0, 100.0)
        );
    }

    #[test]
    fn erlang_quantile_inverts_cdf() {
        let x = gamma_quantile(3, 0.3, 0.9);
        assert!((gamma_cdf(3, 0.3, x) - 0.9).abs() < 1e-9);
        assert!((gamma_cdf(1, 2.0, 2.0) - (1.0 - (-1.0f64).exp())).abs() < 1e-12);
    }
}

//! The three Loopix send streams as independent Poisson processes.
//!
//! The schedule draws its inter-event gaps from its own generator, seeded once from the
//! caller's CSPRNG when the client is created. Packet building consumes a different
//! amount of randomness for a real fragment than for cover, so drawing gaps from the
//! shared generator would make the *timing* of later sends depend on what earlier ones
//! carried. With a separate generator the send times are a pure function of (seed,
//! rates, `now`): a busy client and an idle one with the same seed send at exactly the
//! same instants, which the tests check.
//!
//! Where each λP slot goes (its exit gateway) is drawn from a third generator, also
//! seeded once, for the same reason: the destinations of λP packets are a pure function
//! of (seed, number of gateways, slot count), the same whatever is queued.

use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use rand_distr::{Distribution, Exp};

/// Which stream an event belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stream {
    /// λP: the slot's exit gateway is drawn uniformly; a real fragment for that gateway if
    /// one is queued, else cover to its drop mailbox (see the crate's design notes).
    Payload,
    /// λL: a loop to self.
    Loop,
    /// λD: a drop.
    Drop,
}

const STREAMS: [Stream; 3] = [Stream::Payload, Stream::Loop, Stream::Drop];

/// A gap longer than this is treated as "never" (only reachable with absurdly small rates).
const MAX_GAP: Duration = Duration::from_secs(7 * 24 * 3600);

#[derive(Debug)]
pub(crate) struct Schedule {
    rng: StdRng,
    /// Draws λP slots' exit gateways; separate so those draws never move send times.
    exits: StdRng,
    rates: [f64; 3],
    next: [Option<Instant>; 3],
}

impl Schedule {
    pub(crate) fn new(seed: [u8; 32]) -> Self {
        let mut exit_seed = seed;
        for (b, d) in exit_seed
            .iter_mut()
            .zip(b"shoal lambda-P exit gateway draw")
        {
            *b ^= d;
        }
        Schedule {
            rng: StdRng::from_seed(seed),
            exits: StdRng::from_seed(exit_seed),
            rates: [0.0; 3],
            next: [None; 3],
        }
    }

    fn gap(&mut self, rate: f64) -> Option<Duration> {
        if !(rate.is_finite() && rate > 0.0) {
            return None;
        }
        let exp = Exp::new(rate).ok()?;
        let secs = exp.sample(&mut self.rng);
        Duration::try_from_secs_f64(secs)
            .ok()
            .filter(|d| *d <= MAX_GAP)
    }

    fn draw_from(&mut self, i: usize, from: Instant) {
        self.next[i] = self.gap(self.rates[i]).and_then(|g| from.checked_add(g));
    }

    /// Sets the rates `[λP, λL, λD]` (per second). A stream whose rate changed restarts
    /// from `now`; by memorylessness that is still a Poisson process.
    pub(crate) fn set_rates(&mut self, rates: [f64; 3], now: Instant) {
        for (i, rate) in rates.into_iter().enumerate() {
            #[allow(clippy::float_cmp)] // An exact comparison: "did the directory change it".
            let same = self.rates[i] == rate && self.next[i].is_some();
            if !same {
                self.rates[i] = rate;
                self.draw_from(i, now);
            }
        }
    }

    /// When the next event of any stream is due.
    pub(crate) fn next_due(&self) -> Option<Instant> {
        self.next.iter().flatten().min().copied()
    }

    /// Restarts, from `now`, every stream whose next event is more than `max_lag` late,
    /// returning how many were restarted. Used when the driver was stalled (a suspended
    /// laptop): the missed events are skipped instead of sent in a burst.
    pub(crate) fn skip_stale(&mut self, now: Instant, max_lag: Duration) -> u64 {
        let mut skipped = 0;
        for i in 0..STREAMS.len() {
            if self.next[i].is_some_and(|t| now.saturating_duration_since(t) > max_lag) {
                self.draw_from(i, now);
                skipped += 1;
            }
        }
        skipped
    }

    /// The index, uniform in `0..n`, of the exit gateway of the λP slot being fired, or
    /// `None` if `n` is 0.
    pub(crate) fn pick_exit(&mut self, n: usize) -> Option<usize> {
        (n > 0).then(|| self.exits.random_range(0..n))
    }

    /// Takes the earliest event due at or before `now` and schedules that stream's next.
    /// Ties go to λP, then λL, then λD.
    pub(crate) fn pop_due(&mut self, now: Instant) -> Option<(Stream, Instant)> {
        let (i, at) = self
            .next
            .iter()
            .enumerate()
            .filter_map(|(i, t)| t.map(|t| (i, t)))
            .filter(|&(_, t)| t <= now)
            .min_by_key(|&(i, t)| (t, i))?;
        self.draw_from(i, at);
        Some((STREAMS[i], at))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Kolmogorov-Smirnov statistic of `samples` against Exp(`rate`).
    pub(crate) fn ks_exp(samples: &mut [f64], rate: f64) -> f64 {
        samples.sort_by(f64::total_cmp);
        let n = samples.len() as f64;
        let mut d: f64 = 0.0;
        for (i, x) in samples.iter().enumerate() {
            let cdf = 1.0 - (-rate * x).exp();
            d = d
                .max((cdf - i as f64 / n).abs())
                .max(((i + 1) as f64 / n - cdf).abs());
        }
        d
    }

    #[test]
    fn merged_streams_are_poisson_at_the_summed_rate() {
        let start = Instant::now();
        let mut s = Schedule::new([7; 32]);
        s.set_rates([2.0, 0.5, 0.5], start);
        let mut last = start;
        let mut gaps = Vec::new();
        let mut counts = [0usize; 3];
        let end = start + Duration::from_secs(20_000);
        while let Some(t) = s.next_due() {
            if t > end {
                break;
            }
            let (stream, at) = s.pop_due(t).unwrap();
            assert_eq!(at, t);
            counts[STREAMS.iter().position(|x| *x == stream).unwrap()] += 1;
            gaps.push((at - last).as_secs_f64());
            last = at;
        }
        let n = gaps.len() as f64;
        // About 60 000 events: the mean gap is within 2% of 1/3 s (its sd is ~0.4%).
        let mean = gaps.iter().sum::<f64>() / n;
        assert!((mean - 1.0 / 3.0).abs() < 0.02 / 3.0, "mean gap {mean}");
        // KS at well below the 1% critical value 1.63/sqrt(n), with a fixed seed.
        let d = ks_exp(&mut gaps, 3.0);
        assert!(d < 1.63 / n.sqrt(), "KS statistic {d} with n = {n}");
        // Each stream's share matches its rate.
        let share = counts[0] as f64 / n;
        assert!((share - 2.0 / 3.0).abs() < 0.01, "λP share {share}");
    }

    #[test]
    fn same_seed_same_times_and_stalls_skip() {
        let start = Instant::now();
        let mut a = Schedule::new([1; 32]);
        let mut b = Schedule::new([1; 32]);
        a.set_rates([1.0, 1.0, 1.0], start);
        b.set_rates([1.0, 1.0, 1.0], start);
        for _ in 0..100 {
            let t = a.next_due().unwrap();
            assert_eq!(a.pop_due(t), b.pop_due(t));
        }
        // Unchanged rates keep the schedule; nothing is due before its time.
        let t = a.next_due().unwrap();
        a.set_rates([1.0, 1.0, 1.0], start);
        assert_eq!(a.next_due(), Some(t));
        assert!(a.pop_due(t - Duration::from_nanos(1)).is_none());
        // A long stall restarts the streams instead of bursting.
        let late = t + Duration::from_secs(3600);
        assert_eq!(a.skip_stale(late, Duration::from_secs(2)), 3);
        assert!(a.next_due().unwrap() > late);
        // Zero rates stop a stream.
        a.set_rates([0.0, 0.0, 0.0], late);
        assert_eq!(a.next_due(), None);
    }
}

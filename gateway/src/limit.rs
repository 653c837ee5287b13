//! Per-account send rate limits, sans-IO: a token bucket per account, refilled at a
//! multiple of the network's client rate λP+λL+λD, and a hard threshold past which a
//! flooding account is cut off for a while.
//!
//! An honest client sends Sphinx frames on Poisson streams at exactly λP+λL+λD per
//! second whatever it has to send (a busy client queues, it never speeds up), so a
//! bucket refilled several times faster and holding several seconds of that rate is
//! never emptied by one (the unit test below runs a Poisson sender for a virtual day).
//! Anything that empties it is not running the client schedule. Control frames (pulls,
//! acks, directory requests) are not counted here: each client link has at most one
//! of them in the mailbox task at a time (its responder answers in order), and an
//! account holds at most `MAX_LINKS_PER_ACCOUNT` links (the driver closes the oldest),
//! so an account's control load is bounded by the gateway's own answering speed.

use std::time::{Duration, Instant};

/// Default refill rate as a multiple of λP+λL+λD.
pub const DEFAULT_RATE_FACTOR: f64 = 4.0;
/// Default bucket depth, in seconds of refill.
pub const DEFAULT_BURST_SECS: f64 = 10.0;
/// Default frames over the limit within one `cut_window` that cut an account.
pub const DEFAULT_CUT_AFTER: u64 = 2_000;
/// Default length of the window `cut_after` is counted in.
pub const DEFAULT_CUT_WINDOW: Duration = Duration::from_secs(10);
/// Default time a cut account is refused.
pub const DEFAULT_CUT_PENALTY: Duration = Duration::from_secs(60);
/// Refill floor in frames per second, so a network whose cover rates are all zero
/// still lets its clients send a little.
pub const MIN_RATE: f64 = 1.0;

/// How client send rates are limited (`[limits]` in `gateway.toml`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LimitConfig {
    /// Refill rate = `rate_factor` × (λP+λL+λD) Sphinx frames per second.
    pub rate_factor: f64,
    /// Bucket depth = refill rate × `burst_secs` frames (a full bucket to start).
    pub burst_secs: f64,
    /// Frames over the limit within one `cut_window` after which the account's links
    /// are closed with `Error{RateLimited}`.
    pub cut_after: u64,
    pub cut_window: Duration,
    /// How long a cut account's new links are refused.
    pub cut_penalty: Duration,
}

impl Default for LimitConfig {
    fn default() -> Self {
        LimitConfig {
            rate_factor: DEFAULT_RATE_FACTOR,
            burst_secs: DEFAULT_BURST_SECS,
            cut_after: DEFAULT_CUT_AFTER,
            cut_window: DEFAULT_CUT_WINDOW,
            cut_penalty: DEFAULT_CUT_PENALTY,
        }
    }
}

impl LimitConfig {
    /// A reason naming the field when the values cannot work.
    pub fn validate(&self) -> Result<(), &'static str> {
        if !(self.rate_factor.is_finite() && self.rate_factor >= 1.0) {
            return Err(
                "rate_factor must be a finite number >= 1 (below 1 throttles honest clients)",
            );
        }
        if !(self.burst_secs.is_finite() && self.burst_secs >= 1.0) {
            return Err("burst_secs must be a finite number >= 1");
        }
        if self.cut_after == 0 {
            return Err("cut_after must be at least 1");
        }
        if self.cut_window.is_zero() {
            return Err("cut_window_secs must be at least 1");
        }
        Ok(())
    }

    /// Refill rate for clients sending at `client_rate` (λP+λL+λD) frames per second.
    pub fn refill(&self, client_rate: f64) -> f64 {
        let r = if client_rate.is_finite() {
            client_rate
        } else {
            0.0
        };
        (self.rate_factor * r).max(MIN_RATE)
    }
}

/// What to do with one Sphinx frame from an account.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Within the limit: into the mixing pipeline.
    Pass,
    /// Over the limit: dropped and counted.
    Throttle,
    /// Past the hard threshold (now or earlier, within the penalty): close the link.
    Cut,
}

/// One account's bucket. The driver keeps one per connected account, shared by all of
/// its links, and calls [`admit`](Self::admit) for each Sphinx frame.
#[derive(Debug, Clone)]
pub struct SendLimiter {
    config: LimitConfig,
    tokens: f64,
    last: Instant,
    window_start: Instant,
    over_in_window: u64,
    cut_until: Option<Instant>,
}

impl SendLimiter {
    /// A full bucket at `now`, for clients sending at `client_rate` frames per second.
    pub fn new(config: LimitConfig, client_rate: f64, now: Instant) -> Self {
        SendLimiter {
            config,
            tokens: config.refill(client_rate) * config.burst_secs,
            last: now,
            window_start: now,
            over_in_window: 0,
            cut_until: None,
        }
    }

    /// Decides on one frame arriving at `now`. `client_rate` is the current directory's
    /// λP+λL+λD (it may change between epochs; the bucket follows it).
    pub fn admit(&mut self, client_rate: f64, now: Instant) -> Admit {
        if self.is_cut(now) {
            return Admit::Cut;
        }
        let refill = self.config.refill(client_rate);
        let depth = refill * self.config.burst_secs;
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * refill).min(depth);
        self.last = self.last.max(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Admit::Pass;
        }
        if now.saturating_duration_since(self.window_start) >= self.config.cut_window {
            self.window_start = now;
            self.over_in_window = 0;
        }
        self.over_in_window += 1;
        if self.over_in_window >= self.config.cut_after {
            self.cut_until = Some(now + self.config.cut_penalty);
            return Admit::Cut;
        }
        Admit::Throttle
    }

    /// Whether the account is serving a cut penalty at `now`.
    pub fn is_cut(&self, now: Instant) -> bool {
        self.cut_until.is_some_and(|t| now < t)
    }

    /// Whether this bucket can be forgotten at `now` once no link uses it: a fresh one
    /// would be the same (full, no penalty).
    pub fn is_idle(&self, client_rate: f64, now: Instant) -> bool {
        if self.is_cut(now) {
            return false;
        }
        let refill = self.config.refill(client_rate);
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens + elapsed * refill >= refill * self.config.burst_secs
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{RngExt, SeedableRng};

    /// An Exp(`rate`) sample by inversion.
    fn exp(rng: &mut StdRng, rate: f64) -> f64 {
        -(1.0 - rng.random::<f64>()).ln() / rate
    }

    /// The default client rates: λP 2 + λL 0.5 + λD 0.5.
    const RATE: f64 = 3.0;

    #[test]
    fn honest_poisson_sender_is_never_throttled_in_a_virtual_day() {
        let t0 = Instant::now();
        let mut rng = StdRng::seed_from_u64(7);
        // λP, λL and λD as three independent Poisson streams, merged.
        let rates = [2.0, 0.5, 0.5];
        let mut next = rates.map(|l| exp(&mut rng, l));
        let mut limiter = SendLimiter::new(LimitConfig::default(), RATE, t0);
        let day = 24.0 * 3600.0;
        let (mut sent, mut throttled) = (0u64, 0u64);
        loop {
            let (i, at) = next
                .iter()
                .copied()
                .enumerate()
                .min_by(|a, b| a.1.total_cmp(&b.1))
                .unwrap();
            if at > day {
                break;
            }
            next[i] = at + exp(&mut rng, rates[i]);
            sent += 1;
            match limiter.admit(RATE, t0 + Duration::from_secs_f64(at)) {
                Admit::Pass => {}
                Admit::Throttle | Admit::Cut => throttled += 1,
            }
        }
        assert!(sent > 250_000, "{sent}");
        assert_eq!(throttled, 0, "of {sent} honest frames");
    }

    #[test]
    fn honest_sender_after_a_stall_is_not_throttled() {
        // A link that stalls for 5 s delivers its queued frames in one burst.
        let t0 = Instant::now();
        let mut limiter = SendLimiter::new(LimitConfig::default(), RATE, t0);
        let t1 = t0 + Duration::from_secs(30);
        for _ in 0..(5.0 * RATE * 3.0) as usize {
            assert_eq!(limiter.admit(RATE, t1), Admit::Pass);
        }
    }

    #[test]
    fn flooder_is_throttled_then_cut_then_refused_until_the_penalty_ends() {
        let config = LimitConfig::default();
        let t0 = Instant::now();
        let mut limiter = SendLimiter::new(config, RATE, t0);
        let depth = (config.refill(RATE) * config.burst_secs) as u64;
        // 1000 frames/s, 100× the allowance of 12/s.
        let mut outcome = Vec::new();
        let mut t = t0;
        for _ in 0..20_000 {
            t += Duration::from_millis(1);
            let a = limiter.admit(RATE, t);
            outcome.push(a);
            if a == Admit::Cut {
                break;
            }
        }
        let passed = outcome.iter().filter(|a| **a == Admit::Pass).count() as u64;
        let throttled = outcome.iter().filter(|a| **a == Admit::Throttle).count() as u64;
        assert_eq!(outcome.last(), Some(&Admit::Cut));
        assert_eq!(throttled, config.cut_after - 1);
        // The bucket's depth, plus what refilled while the flood ran.
        let secs = t.saturating_duration_since(t0).as_secs_f64();
        let allowed = depth + (secs * config.refill(RATE)) as u64;
        assert!(
            passed <= allowed + 1 && passed + 2 >= allowed,
            "{passed} vs {allowed}"
        );
        assert!(limiter.is_cut(t));
        assert!(!limiter.is_idle(RATE, t));
        assert_eq!(limiter.admit(RATE, t + Duration::from_secs(59)), Admit::Cut);
        let later = t + config.cut_penalty;
        assert!(!limiter.is_cut(later));
        assert_eq!(limiter.admit(RATE, later), Admit::Pass);
    }

    #[test]
    fn a_slow_excess_is_throttled_but_not_cut() {
        // 20 frames/s against an allowance of 12/s: 8/s over, 80 per window < cut_after.
        let config = LimitConfig::default();
        let t0 = Instant::now();
        let mut limiter = SendLimiter::new(config, RATE, t0);
        let (mut throttled, mut cut) = (0, 0);
        for i in 1..=20 * 600 {
            match limiter.admit(RATE, t0 + Duration::from_millis(50 * i)) {
                Admit::Pass => {}
                Admit::Throttle => throttled += 1,
                Admit::Cut => cut += 1,
            }
        }
        assert!(throttled > 3000, "{throttled}");
        assert_eq!(cut, 0);
    }

    #[test]
    fn the_bucket_follows_the_directory_rate_and_has_a_floor() {
        let config = LimitConfig::default();
        assert_eq!(config.refill(0.0), MIN_RATE);
        assert_eq!(config.refill(f64::NAN), MIN_RATE);
        assert_eq!(config.refill(14.0), 56.0);
        let t0 = Instant::now();
        let mut limiter = SendLimiter::new(config, RATE, t0);
        let t1 = t0 + Duration::from_secs(60);
        // A new document with 10× the rates: the bucket refills to the new depth.
        let mut passed = 0;
        while limiter.admit(RATE * 10.0, t1) == Admit::Pass {
            passed += 1;
        }
        assert_eq!(
            passed,
            (config.refill(RATE * 10.0) * config.burst_secs) as usize
        );
        assert!(limiter.is_idle(RATE * 10.0, t1 + Duration::from_secs(10)));
        assert!(!limiter.is_idle(RATE * 10.0, t1 + Duration::from_secs(1)));
    }

    #[test]
    fn config_is_checked() {
        assert!(LimitConfig::default().validate().is_ok());
        for bad in [
            LimitConfig {
                rate_factor: 0.5,
                ..LimitConfig::default()
            },
            LimitConfig {
                burst_secs: f64::INFINITY,
                ..LimitConfig::default()
            },
            LimitConfig {
                cut_after: 0,
                ..LimitConfig::default()
            },
            LimitConfig {
                cut_window: Duration::ZERO,
                ..LimitConfig::default()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }
}

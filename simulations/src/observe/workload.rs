//! The observer experiment's real traffic, as a pure function of a seed: who sends to whom
//! and when. `shoal observe --testnet` replays it with `shoal client send`; faithful mode
//! hands it to the client cores ([`Scenario::sends`](crate::faithful::Scenario)), so both
//! attack the same kind of usage.
//!
//! Usage comes in conversations (bursts): one member writes to a partner, or to a group,
//! at a good fraction of λP for a few seconds, then falls silent. Half the conversations
//! of a member of a federated subnet go across the federation. Two kinds:
//! - **1:1**: messages to one partner, Poisson at `rate`;
//! - **group**: one message to every member of the target subnet (a group send is one
//!   copy per member), group messages Poisson at `rate` / members, so the fragments per
//!   second are the same.

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use rand_distr::{Distribution, Exp1};

/// Who is in which subnet, which subnets federate, and how hard they talk.
#[derive(Debug, Clone, PartialEq)]
pub struct Workload {
    /// Subnet of each client.
    pub subnet_of: Vec<u32>,
    /// Pairs of subnets that federate: members talk across them.
    pub federated: Vec<(u32, u32)>,
    /// Conversations start over `[0, seconds)`.
    pub seconds: f64,
    /// Mean gap between conversation starts (exponential).
    pub burst_every_s: f64,
    /// Length of a conversation.
    pub burst_s: f64,
    /// Copies (fragments) per second a member sends during a conversation.
    pub rate: f64,
    pub seed: u64,
}

impl Workload {
    /// The experiment's default for `clients` in `subnets` subnets (client `i` in subnet
    /// `i / (clients / subnets)`), subnets 0 and 1 federated: conversations every 3 s on
    /// average, 8 s long, at 1.5 copies/s (three quarters of the default λP).
    pub fn standard(clients: u32, subnets: u32, seconds: f64, seed: u64) -> Self {
        let per = (clients / subnets.max(1)).max(1);
        Workload {
            subnet_of: (0..clients).map(|i| (i / per).min(subnets - 1)).collect(),
            federated: vec![(0, 1)],
            seconds,
            burst_every_s: 3.0,
            burst_s: 8.0,
            rate: 1.5,
            seed,
        }
    }

    fn federates(&self, a: u32, b: u32) -> bool {
        self.federated
            .iter()
            .any(|&(x, y)| (x, y) == (a, b) || (y, x) == (a, b))
    }

    /// Real messages as (time s, sender, recipient), sorted by time.
    pub fn schedule(&self) -> Vec<(f64, u32, u32)> {
        let n = self.subnet_of.len() as u32;
        let mut rng = StdRng::seed_from_u64(self.seed ^ 0x776f_726b_6c6f_6164);
        let mut out = Vec::new();
        if n < 2 || !(self.rate > 0.0 && self.burst_every_s > 0.0 && self.burst_s > 0.0) {
            return out;
        }
        let exp = |rng: &mut StdRng| -> f64 { Exp1.sample(rng) };
        let mut start = exp(&mut rng) * self.burst_every_s;
        while start < self.seconds {
            let from = rng.random_range(0..n);
            let own = self.subnet_of[from as usize];
            let partners: Vec<u32> = (0..self.subnet_of.len() as u32)
                .filter(|&o| o != from)
                .collect();
            let across: Vec<u32> = (0..self.subnet_of.len() as u32)
                .filter(|&o| self.subnet_of[o as usize] != own)
                .filter(|&o| self.federates(own, self.subnet_of[o as usize]))
                .collect();
            let inside: Vec<u32> = partners
                .iter()
                .copied()
                .filter(|&o| self.subnet_of[o as usize] == own)
                .collect();
            let target = if !across.is_empty() && rng.random_range(0..2) == 0 {
                across
            } else {
                inside
            };
            if !target.is_empty() {
                let group = rng.random_range(0..2) == 0;
                let recipients: Vec<u32> = if group {
                    target.clone()
                } else {
                    vec![target[rng.random_range(0..target.len())]]
                };
                let rate = self.rate / recipients.len() as f64;
                let mut t = start + exp(&mut rng) / rate;
                while t < (start + self.burst_s).min(self.seconds) {
                    for &to in &recipients {
                        out.push((t, from, to));
                    }
                    t += exp(&mut rng) / rate;
                }
            }
            start += exp(&mut rng) * self.burst_every_s;
        }
        out.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_is_seeded_talks_across_the_federation_only_and_keeps_its_rate() {
        let w = Workload::standard(12, 4, 600.0, 3);
        let s = w.schedule();
        assert_eq!(s, w.schedule());
        assert_ne!(
            s,
            Workload {
                seed: 4,
                ..w.clone()
            }
            .schedule()
        );
        let sub = |c: u32| w.subnet_of[c as usize];
        let mut across = 0;
        for &(t, a, b) in &s {
            assert!((0.0..600.0).contains(&t) && a != b);
            if sub(a) != sub(b) {
                assert!(w.federates(sub(a), sub(b)), "{a} -> {b}");
                across += 1;
            }
        }
        assert!(across > 100, "{across}");
        // About 2.7 conversations in flight (8 s every 3 s) at 1.5 copies/s.
        let per_s = s.len() as f64 / 600.0;
        assert!((2.5..6.0).contains(&per_s), "{per_s}");
    }
}

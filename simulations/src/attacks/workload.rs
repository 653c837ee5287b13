//! The attacks' workload and what a global passive observer sees of it.
//!
//! [`Workload::generate`] draws the ground truth: organisations, federated organisation pairs,
//! each user's contacts and groups. [`Trace::generate`] then runs the traffic in virtual time and
//! records the observer's view: every packet a client hands to its gateway (`sends`) and every
//! packet a gateway hands to a client (`receipts`), real and cover alike, with the truth about
//! real packets kept apart for scoring.
//!
//! The delay of a packet from its sender to the exit gateway is `(L + 2)` fixed links plus the sum
//! of `L` independent Exp(mean hop delay) draws. That is exactly the per-message delay law of
//! model mode (an exponential mix's delay does not depend on its pool), so the endpoint view is
//! sampled directly rather than by running the mixing engine; an observer who sees only endpoints
//! learns nothing more from the engine's internals. Offline recipients' packets wait at the
//! gateway and are handed over when the recipient comes back.

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use rand_distr::{Distribution, Exp1};

use super::config::WorkloadSection;
use crate::model::Validated;

/// Derives an independent stream seed (SplitMix64), so that e.g. changing cover does not change
/// the real traffic.
pub(crate) fn stream_seed(seed: u64, stream: u64) -> u64 {
    let mut z = seed.wrapping_add(stream.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xA77A_C4ED);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn exp1(rng: &mut StdRng) -> f64 {
    Exp1.sample(rng)
}

/// The ground truth of who talks to whom.
#[derive(Debug, Clone)]
pub struct Workload {
    /// Organisation of every user.
    pub org: Vec<u32>,
    pub orgs: u32,
    /// Federated organisation pairs `(a, b)` with `a < b`, sorted.
    pub federated: Vec<(u32, u32)>,
    /// Each user's contacts (sorted).
    pub contacts: Vec<Vec<u32>>,
    /// Members of each group (sorted).
    pub groups: Vec<Vec<u32>>,
    /// Groups of each user.
    pub user_groups: Vec<Vec<u32>>,
    /// Everyone a user sends real packets to: contacts and fellow group members (sorted).
    pub partners: Vec<Vec<u32>>,
}

impl Workload {
    /// Draws the workload for `clients` users from its own seed stream.
    pub fn generate(w: &WorkloadSection, clients: u32, seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(stream_seed(seed, 10));
        let n = clients as usize;
        let k = w.orgs;
        let org: Vec<u32> = (0..n)
            .map(|u| (u as u64 * u64::from(k) / n as u64) as u32)
            .collect();
        let mut members: Vec<Vec<u32>> = vec![Vec::new(); k as usize];
        for (u, &o) in org.iter().enumerate() {
            members[o as usize].push(u as u32);
        }
        let mut all_pairs: Vec<(u32, u32)> = (0..k)
            .flat_map(|a| (a + 1..k).map(move |b| (a, b)))
            .collect();
        for i in 0..(w.federated_pairs as usize).min(all_pairs.len()) {
            let j = rng.random_range(i..all_pairs.len());
            all_pairs.swap(i, j);
        }
        let mut federated = all_pairs[..(w.federated_pairs as usize).min(all_pairs.len())].to_vec();
        federated.sort_unstable();
        let mut fed_of: Vec<Vec<u32>> = vec![Vec::new(); k as usize];
        for &(a, b) in &federated {
            fed_of[a as usize].push(b);
            fed_of[b as usize].push(a);
        }
        let mut contacts = Vec::with_capacity(n);
        for u in 0..n as u32 {
            let o = org[u as usize] as usize;
            let own = members[o].len() - 1;
            let foreign: usize = fed_of[o].iter().map(|&f| members[f as usize].len()).sum();
            let want = (w.contacts as usize).min(own + foreign);
            let mut c: Vec<u32> = Vec::with_capacity(want);
            let mut tries = 0;
            while c.len() < want && tries < 100 * want + 100 {
                tries += 1;
                let intra = foreign == 0 || (own > 0 && rng.random::<f64>() < w.intra_org_fraction);
                let v = if intra {
                    members[o][rng.random_range(0..members[o].len())]
                } else {
                    let f = fed_of[o][rng.random_range(0..fed_of[o].len())] as usize;
                    members[f][rng.random_range(0..members[f].len())]
                };
                if v != u && !c.contains(&v) {
                    c.push(v);
                }
            }
            c.sort_unstable();
            contacts.push(c);
        }
        let mut groups = Vec::new();
        let mut user_groups: Vec<Vec<u32>> = vec![Vec::new(); n];
        for g in 0..w.groups {
            let o = rng.random_range(0..k) as usize;
            let mut pool = members[o].clone();
            let size = (w.group_size as usize).min(pool.len());
            for i in 0..size {
                let j = rng.random_range(i..pool.len());
                pool.swap(i, j);
            }
            let mut m = pool[..size].to_vec();
            m.sort_unstable();
            for &u in &m {
                user_groups[u as usize].push(g);
            }
            groups.push(m);
        }
        let partners = (0..n)
            .map(|u| {
                let mut p = contacts[u].clone();
                for &g in &user_groups[u] {
                    p.extend(groups[g as usize].iter().filter(|&&v| v as usize != u));
                }
                p.sort_unstable();
                p.dedup();
                p
            })
            .collect();
        Self {
            org,
            orgs: k,
            federated,
            contacts,
            groups,
            user_groups,
            partners,
        }
    }
}

/// Per-window sparse `(user, count)` lists.
pub type Windows = Vec<Vec<(u32, u32)>>;

/// One observed event: a packet crossing a client↔gateway link.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Obs {
    pub t: f64,
    pub user: u32,
}

/// One real packet, for scoring.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RealPacket {
    pub sender: u32,
    pub recipient: u32,
    pub sent_s: f64,
    /// When the exit gateway received it (sent + links + mixing).
    pub at_gateway_s: f64,
    /// When the recipient got it (later than `at_gateway_s` if it was offline); infinite if
    /// not before the end of the run.
    pub received_s: f64,
}

/// The observer's view of one run plus the truth about real packets.
#[derive(Debug, Clone)]
pub struct Trace {
    pub users: u32,
    pub end_s: f64,
    /// Every packet a client sent (real, loop, drop), sorted by time.
    pub sends: Vec<Obs>,
    /// Every packet a client received (real, loop), sorted by time.
    pub receipts: Vec<Obs>,
    /// Real packets in send order.
    pub real: Vec<RealPacket>,
    pub cover_sent: u64,
    /// Mean fraction of time users were online.
    pub online_fraction: f64,
}

/// On/off schedule of one user: sorted, disjoint online intervals.
fn schedule(w: &WorkloadSection, end: f64, rng: &mut StdRng) -> Vec<(f64, f64)> {
    if w.online_mean_s <= 0.0 || w.offline_mean_s <= 0.0 {
        return vec![(0.0, end)];
    }
    // Start in the stationary state.
    let p_on = w.online_mean_s / (w.online_mean_s + w.offline_mean_s);
    let mut online = rng.random::<f64>() < p_on;
    let mut t = 0.0;
    let mut out = Vec::new();
    while t < end {
        let mean = if online {
            w.online_mean_s
        } else {
            w.offline_mean_s
        };
        let next = t + exp1(rng) * mean;
        if online {
            out.push((t, next.min(end)));
        }
        t = next;
        online = !online;
    }
    out
}

/// When a packet reaching the gateway at `t` is handed to a user with online intervals `on`.
fn handover(on: &[(f64, f64)], t: f64) -> f64 {
    let i = on.partition_point(|&(_, e)| e <= t);
    match on.get(i) {
        Some(&(s, _)) => s.max(t),
        None => f64::INFINITY,
    }
}

/// Network parameters the trace needs.
#[derive(Debug, Clone, Copy)]
pub struct DelayLaw {
    pub layers: u32,
    pub mean_hop_s: f64,
    /// `(layers + 2) * link`.
    pub fixed_s: f64,
}

impl DelayLaw {
    pub fn of(v: &Validated) -> Self {
        Self {
            layers: v.layers as u32,
            mean_hop_s: v.mean_hop_s,
            fixed_s: (v.layers as f64 + 2.0) * v.link_s,
        }
    }

    fn sample(&self, rng: &mut StdRng) -> f64 {
        let mut d = self.fixed_s;
        for _ in 0..self.layers {
            d += exp1(rng) * self.mean_hop_s;
        }
        d
    }

    /// Density of the sender → exit-gateway delay at `x`.
    pub fn pdf(&self, x: f64) -> f64 {
        crate::model::summary::gamma_pdf(self.layers, self.mean_hop_s, x - self.fixed_s)
    }
}

/// Rates of one trace.
#[derive(Debug, Clone, Copy)]
pub struct Rates {
    /// Real messages per second per online user (a group message is one packet per member).
    pub real: f64,
    pub loop_rate: f64,
    pub drop_rate: f64,
}

impl Trace {
    /// Runs the workload for `end` seconds. Real traffic, schedules and real delays come from
    /// their own seed streams, so two traces that differ only in cover rates carry the same
    /// real packets.
    pub fn generate(
        wl: &Workload,
        ws: &WorkloadSection,
        law: DelayLaw,
        rates: Rates,
        end: f64,
        seed: u64,
    ) -> Self {
        let n = wl.org.len();
        let mut sched_rng = StdRng::seed_from_u64(stream_seed(seed, 11));
        let on: Vec<Vec<(f64, f64)>> = (0..n).map(|_| schedule(ws, end, &mut sched_rng)).collect();
        let mut real_rng = StdRng::seed_from_u64(stream_seed(seed, 12));
        let mut cover_rng = StdRng::seed_from_u64(stream_seed(seed, 13));
        let mut sends = Vec::new();
        let mut receipts = Vec::new();
        let mut real = Vec::new();
        let mut cover_sent = 0u64;
        let mut online_total = 0.0;
        for u in 0..n {
            for &(s, e) in &on[u] {
                online_total += e - s;
                // Real messages.
                if rates.real > 0.0 {
                    let mut t = s + exp1(&mut real_rng) / rates.real;
                    while t < e {
                        let groups = &wl.user_groups[u];
                        let use_group = !groups.is_empty()
                            && real_rng.random::<f64>() < ws.group_message_fraction;
                        let mut to_one = |v: u32, rng: &mut StdRng| {
                            let at = t + law.sample(rng);
                            let rec = handover(&on[v as usize], at);
                            sends.push(Obs { t, user: u as u32 });
                            if rec < end {
                                receipts.push(Obs { t: rec, user: v });
                            }
                            real.push(RealPacket {
                                sender: u as u32,
                                recipient: v,
                                sent_s: t,
                                at_gateway_s: at,
                                received_s: if rec < end { rec } else { f64::INFINITY },
                            });
                        };
                        if use_group {
                            let g = groups[real_rng.random_range(0..groups.len())] as usize;
                            for &v in &wl.groups[g] {
                                if v as usize != u {
                                    to_one(v, &mut real_rng);
                                }
                            }
                        } else if !wl.contacts[u].is_empty() {
                            let c = &wl.contacts[u];
                            let v = c[real_rng.random_range(0..c.len())];
                            to_one(v, &mut real_rng);
                        }
                        t += exp1(&mut real_rng) / rates.real;
                    }
                }
                // Cover: loops come back to the sender's mailbox, drops vanish at a gateway.
                let cover = rates.loop_rate + rates.drop_rate;
                if cover > 0.0 {
                    let p_loop = rates.loop_rate / cover;
                    let mut t = s + exp1(&mut cover_rng) / cover;
                    while t < e {
                        cover_sent += 1;
                        sends.push(Obs { t, user: u as u32 });
                        if cover_rng.random::<f64>() < p_loop {
                            let rec = handover(&on[u], t + law.sample(&mut cover_rng));
                            if rec < end {
                                receipts.push(Obs {
                                    t: rec,
                                    user: u as u32,
                                });
                            }
                        }
                        t += exp1(&mut cover_rng) / cover;
                    }
                }
            }
        }
        let by_time = |a: &Obs, b: &Obs| a.t.total_cmp(&b.t).then(a.user.cmp(&b.user));
        sends.sort_by(by_time);
        receipts.sort_by(by_time);
        real.sort_by(|a, b| a.sent_s.total_cmp(&b.sent_s));
        Self {
            users: n as u32,
            end_s: end,
            sends,
            receipts,
            real,
            cover_sent,
            online_fraction: if n > 0 && end > 0.0 {
                online_total / (n as f64 * end)
            } else {
                0.0
            },
        }
    }

    /// Per-window counts: `(sends[w][u], receipts[w][u])` as sparse `(user, count)` lists.
    pub fn windows(&self, window_s: f64) -> (Windows, Windows) {
        let nw = (self.end_s / window_s).ceil().max(1.0) as usize;
        let bucket = |obs: &[Obs]| {
            let mut out: Vec<Vec<(u32, u32)>> = vec![Vec::new(); nw];
            let mut scratch: Vec<u32> = Vec::new();
            let mut i = 0;
            for (w, slot) in out.iter_mut().enumerate() {
                let hi = (w + 1) as f64 * window_s;
                scratch.clear();
                while i < obs.len() && (obs[i].t < hi || w + 1 == nw) {
                    scratch.push(obs[i].user);
                    i += 1;
                }
                scratch.sort_unstable();
                for &u in &scratch {
                    match slot.last_mut() {
                        Some((v, c)) if *v == u => *c += 1,
                        _ => slot.push((u, 1)),
                    }
                }
            }
            out
        };
        (bucket(&self.sends), bucket(&self.receipts))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn section() -> WorkloadSection {
        WorkloadSection {
            orgs: 4,
            contacts: 3,
            federated_pairs: 2,
            groups: 3,
            group_size: 4,
            ..WorkloadSection::default()
        }
    }

    #[test]
    fn workload_respects_orgs_and_federation() {
        let w = Workload::generate(&section(), 40, 3);
        assert_eq!(w.federated.len(), 2);
        for (u, c) in w.contacts.iter().enumerate() {
            assert_eq!(c.len(), 3);
            for &v in c {
                assert_ne!(v as usize, u);
                let (a, b) = (w.org[u], w.org[v as usize]);
                if a != b {
                    assert!(w.federated.contains(&(a.min(b), a.max(b))));
                }
            }
        }
        for g in &w.groups {
            assert!(g.iter().all(|&u| w.org[u as usize] == w.org[g[0] as usize]));
        }
    }

    #[test]
    fn offline_mail_waits_and_cover_keeps_real_traffic() {
        let mut s = section();
        s.online_mean_s = 20.0;
        s.offline_mean_s = 20.0;
        let w = Workload::generate(&s, 30, 5);
        let law = DelayLaw {
            layers: 3,
            mean_hop_s: 0.1,
            fixed_s: 0.25,
        };
        let r = |c| Rates {
            real: 1.0,
            loop_rate: c,
            drop_rate: c,
        };
        let a = Trace::generate(&w, &s, law, r(0.0), 400.0, 9);
        let b = Trace::generate(&w, &s, law, r(2.0), 400.0, 9);
        assert_eq!(a.real, b.real);
        assert!(b.sends.len() > 3 * a.sends.len());
        assert!(
            (a.online_fraction - 0.5).abs() < 0.15,
            "{}",
            a.online_fraction
        );
        // Some packets waited for their recipient (much longer than the delay law allows).
        assert!(a.real.iter().any(|p| p.received_s - p.at_gateway_s > 1.0));
        assert!(a.real.iter().all(|p| p.received_s >= p.at_gateway_s));
        assert!(a.sends.windows(2).all(|x| x[0].t <= x[1].t));
    }
}

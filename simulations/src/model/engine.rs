//! The model-mode discrete-event engine.
//!
//! Event sources, merged by time each step:
//! - client sends: the superposition of all clients' Poisson streams is one Poisson stream of the
//!   summed rate whose events pick the client uniformly, so one "next send" time replaces 100k timers;
//! - arrivals: every link has the same fixed delay, so arrivals are produced in time order and sit
//!   in two FIFOs (entry: send + 2 links, through the entry gateway; hop: departure + 1 link);
//! - departures: a relay holding `n` messages, each with an independent Exp(μ) delay, releases its
//!   next message after Exp(nμ), and that message is uniformly one of the `n` (memorylessness).
//!   This is the same process in distribution as drawing each message's delay at arrival, but it
//!   needs one timer per relay instead of one per message: the timers sit in a tournament tree.
//!
//! Per-message state is split by how often it is touched. What the relays need (the carriers of
//! probability mass and the hop) travels by value in the link FIFOs, and a pool holds only 4-byte
//! indices, so the uniformly random pick of a departure hits a small, cache-resident vector. The
//! rest of a message (sender, recipient, send time, id) sits in a slab reused through a free list
//! and is read once, at delivery. At 100k clients this halved the cache misses per message (an
//! earlier layout chased a slab index at every hop). Probability mass lives in slabs too (see
//! [`super::mass`]), so the steady state allocates nothing per event.

use std::collections::VecDeque;
use std::time::Instant;

use hdrhistogram::Histogram;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use rand_distr::{Distribution, Exp1};

use super::config::Validated;
use super::mass::{NONE, SenderMass, TargetMass, TargetOutcome};
use crate::SimError;

const REAL: u8 = 0;
const LOOP: u8 = 1;
const DROP: u8 = 2;

/// One measured real message, as written to `messages.csv`.
#[derive(Debug, Clone, Copy)]
pub struct MessageRow {
    pub id: u64,
    pub sender: u32,
    pub receiver: u32,
    pub sent_s: f64,
    pub latency_s: f64,
    /// NaN when sender tracking is off.
    pub sender_entropy: f64,
    pub sender_min_entropy: f64,
    /// How many of its relays were corrupt.
    pub corrupt_hops: u8,
    pub is_target: bool,
}

/// One tracked target message, as written to `targets.csv`.
#[derive(Debug, Clone, Copy)]
pub struct TargetRow {
    pub id: u64,
    pub sender: u32,
    pub receiver: u32,
    pub sent_s: f64,
    pub entropy: f64,
    pub min_entropy: f64,
    pub true_prob: f64,
    pub true_rank: u32,
    pub residual: f64,
}

/// Counters of a run.
#[derive(Debug, Clone, Default)]
pub struct Counters {
    pub real_sent: u64,
    pub loop_sent: u64,
    pub drop_sent: u64,
    /// Sent inside the measured window.
    pub real_window: u64,
    pub loop_window: u64,
    pub drop_window: u64,
    pub measured_delivered: u64,
    pub events: u64,
    /// Relay-to-relay and gateway link transmissions of every kind.
    pub link_transmissions: u64,
    pub max_in_flight: u64,
    /// Virtual time at which the run stopped.
    pub end_s: f64,
    /// True when traffic had to stop at `max_drain_s` with measured messages or targets still inside.
    pub drain_cut: bool,
}

/// Raw results of one engine run; [`super::summary`] turns them into the summary.
#[derive(Debug)]
pub struct RawRun {
    pub rows: Vec<MessageRow>,
    pub targets: Vec<TargetRow>,
    /// Sender entropy and min-entropy (bits) of every measured message (empty when off).
    pub sender_entropy: Vec<f64>,
    pub sender_min_entropy: Vec<f64>,
    /// `ln(p(true sender) / p(other labelled sender))` of every measured message sent by one of
    /// the two labelled senders (infinite when the other is ruled out); empty when tracking is off.
    pub pair_log_lr: Vec<f64>,
    /// The same for every measured message against its sender's fixed partner `sender ^ 1`.
    pub pooled_log_lr: Vec<f64>,
    /// End-to-end latency of measured messages in microseconds.
    pub latency_us: Histogram<u64>,
    pub latency_sum: f64,
    pub latency_sum_sq: f64,
    pub latency_max: f64,
    pub counters: Counters,
    /// Measured delivered messages by how many of their relays were corrupt (index 0..=layers).
    pub corrupt_hops_hist: Vec<u64>,
    pub corrupt: Vec<u32>,
    pub wall_s: f64,
    pub peak_state_bytes: usize,
}

/// One message inside the network: the part read at delivery (and by corrupt relays).
#[derive(Debug, Clone, Copy)]
struct Msg {
    sent: f64,
    id: u64,
    sender: u32,
    /// A client, or `clients + g` for a drop discarded at gateway `g`.
    recipient: u32,
    /// Carriers held while the message sits in a corrupt relay (honest pools absorb them).
    s_carrier: u32,
    t_carrier: u32,
    measured: bool,
    corrupt_hops: u8,
    /// The hostile operators (bits) whose relays it has passed.
    hostile_ops: u64,
    /// Target slot + 1, or 0.
    target: u8,
}

/// A message on a link: its slab index, the mass it carries and the layer it enters next.
#[derive(Debug, Clone, Copy)]
struct Hot {
    idx: u32,
    s_carrier: u32,
    t_carrier: u32,
    hop: u8,
}

/// Relay timers: a tournament tree whose root names the relay with the earliest next departure
/// (ties go to the lower index, so the order is deterministic).
#[derive(Debug)]
struct MinTree {
    p: usize,
    t: Vec<f64>,
    node: Vec<u32>,
}

impl MinTree {
    fn new(n: usize) -> Self {
        let p = n.next_power_of_two().max(1);
        let mut node = vec![0u32; 2 * p];
        for (i, x) in node[p..].iter_mut().enumerate() {
            *x = i as u32;
        }
        let mut tree = Self {
            p,
            t: vec![f64::INFINITY; p],
            node,
        };
        for j in (1..p).rev() {
            tree.node[j] = tree.node[2 * j];
        }
        tree
    }

    fn set(&mut self, i: usize, v: f64) {
        self.t[i] = v;
        let mut j = (self.p + i) / 2;
        while j >= 1 {
            let (a, b) = (self.node[2 * j], self.node[2 * j + 1]);
            self.node[j] = if self.t[a as usize] <= self.t[b as usize] {
                a
            } else {
                b
            };
            j /= 2;
        }
    }

    fn min(&self) -> (usize, f64) {
        let i = self.node[1] as usize;
        (i, self.t[i])
    }
}

struct TargetInfo {
    id: u64,
    sender: u32,
    receiver: u32,
    sent: f64,
}

/// Derives independent stream seeds from the run seed (SplitMix64), so e.g. turning cover on
/// does not change which relays are corrupt.
fn stream_seed(seed: u64, stream: u64) -> u64 {
    let mut z = seed.wrapping_add(stream.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn exp1(rng: &mut StdRng) -> f64 {
    Exp1.sample(rng)
}

/// Picks the corrupt relays: a seeded random `round(fraction * relays)` plus the explicit list.
pub(crate) fn corrupt_set(cfg: &Validated) -> Vec<bool> {
    let relays = cfg.layers * cfg.width;
    let mut corrupt = vec![false; relays];
    let mut rng = StdRng::seed_from_u64(stream_seed(cfg.seed, 4));
    let count = (cfg.corrupt_fraction * relays as f64).round() as usize;
    let mut idx: Vec<usize> = (0..relays).collect();
    // Partial Fisher-Yates: the first `count` entries are a uniform random subset.
    for i in 0..count.min(relays) {
        let j = rng.random_range(i..relays);
        idx.swap(i, j);
        corrupt[idx[i]] = true;
    }
    for &r in &cfg.corrupt_relays {
        corrupt[r as usize] = true;
    }
    corrupt
}

/// The hostile operator of each relay (`None`: an honest operator of its own, or a corrupt
/// relay that is its own operator when `hostile_operators` is 0): round-robin over the
/// corrupt relays in relay order.
pub(crate) fn operators(cfg: &Validated, corrupt: &[bool]) -> Vec<Option<u8>> {
    let mut next = 0u32;
    corrupt
        .iter()
        .map(|&bad| {
            (bad && cfg.hostile_operators > 0).then(|| {
                let op = next % cfg.hostile_operators;
                next += 1;
                op as u8
            })
        })
        .collect()
}

/// The engine's mutable state apart from outputs.
struct State {
    msgs: Vec<Msg>,
    free: Vec<u32>,
    /// Slab indices of the messages each relay holds.
    pools: Vec<Vec<u32>>,
    timers: MinTree,
    corrupt: Vec<bool>,
    operator: Vec<Option<u8>>,
    smass: Option<SenderMass>,
    tmass: TargetMass,
    mix_rng: StdRng,
}

impl State {
    fn alloc(&mut self, msg: Msg) -> u32 {
        if let Some(i) = self.free.pop() {
            self.msgs[i as usize] = msg;
            return i;
        }
        self.msgs.push(msg);
        (self.msgs.len() - 1) as u32
    }

    /// Draws relay `r`'s next departure: Exp(n μ) after `now` for `n` messages held.
    fn rearm(&mut self, r: usize, now: f64, mean_hop_s: f64) {
        let n = self.pools[r].len();
        let t = if n == 0 {
            f64::INFINITY
        } else {
            now + exp1(&mut self.mix_rng) * mean_hop_s / n as f64
        };
        self.timers.set(r, t);
    }

    /// Message `m` reaches its next layer: a uniformly random relay of that layer, among
    /// those of no operator already on its route when routes keep families apart.
    fn arrive(&mut self, h: Hot, now: f64, cfg: &Validated) {
        let first = usize::from(h.hop) * cfg.width;
        let used = self.msgs[h.idx as usize].hostile_ops;
        let relay = if cfg.family && used != 0 {
            let operator = &self.operator;
            let allowed = |r: &usize| operator[*r].is_none_or(|op| used & (1 << op) == 0);
            let n = (first..first + cfg.width).filter(allowed).count();
            // `run` checked that every layer keeps a relay of no hostile operator.
            let k = self.mix_rng.random_range(0..n.max(1));
            (first..first + cfg.width)
                .filter(allowed)
                .nth(k)
                .unwrap_or(first)
        } else {
            first + self.mix_rng.random_range(0..cfg.width)
        };
        if self.corrupt[relay] {
            let msg = &mut self.msgs[h.idx as usize];
            msg.corrupt_hops += 1;
            if let Some(op) = self.operator[relay] {
                msg.hostile_ops |= 1 << op;
            }
            msg.s_carrier = h.s_carrier;
            msg.t_carrier = h.t_carrier;
        } else {
            if let Some(s) = self.smass.as_mut() {
                s.arrive(relay, h.s_carrier, self.msgs[h.idx as usize].sender);
            }
            self.tmass.arrive(relay, h.t_carrier);
        }
        self.pools[relay].push(h.idx);
        self.rearm(relay, now, cfg.mean_hop_s);
    }

    /// Relay `r` releases a uniformly random message of its pool.
    fn depart(&mut self, r: usize, now: f64, cfg: &Validated) -> Hot {
        let n = self.pools[r].len();
        let i = self.mix_rng.random_range(0..n);
        let idx = self.pools[r].swap_remove(i);
        let mut h = Hot {
            idx,
            s_carrier: NONE,
            t_carrier: NONE,
            hop: (r / cfg.width) as u8,
        };
        if self.corrupt[r] {
            let msg = &self.msgs[idx as usize];
            (h.s_carrier, h.t_carrier) = (msg.s_carrier, msg.t_carrier);
        } else {
            if let Some(s) = self.smass.as_mut() {
                h.s_carrier = s.depart(r, n as u32);
            }
            h.t_carrier = self.tmass.depart(r, n as u32);
        }
        self.rearm(r, now, cfg.mean_hop_s);
        h
    }
}

/// Runs one model-mode simulation.
pub fn run(cfg: &Validated) -> Result<RawRun, SimError> {
    let wall = Instant::now();
    let (l, w) = (cfg.layers, cfg.width);
    let relays = l * w;
    let n_clients = cfg.clients;
    let corrupt = corrupt_set(cfg);
    let operator = operators(cfg, &corrupt);
    if cfg.family
        && let Some(layer) =
            (0..l).find(|&i| operator[i * w..(i + 1) * w].iter().all(Option::is_some))
    {
        return Err(SimError::Config {
            what: "adversary",
            reason: format!(
                "every relay of layer {layer} is run by a hostile operator, so no route keeps \
                 families apart (the network would refuse to route)"
            ),
        });
    }
    let mut gen_rng = StdRng::seed_from_u64(stream_seed(cfg.seed, 1));
    let mut sample_rng = StdRng::seed_from_u64(stream_seed(cfg.seed, 3));

    let per_client = cfg.real_rate + cfg.loop_rate + cfg.drop_rate;
    let total_rate = per_client * f64::from(n_clients);
    let (p_real, p_loop) = (
        cfg.real_rate / per_client,
        (cfg.real_rate + cfg.loop_rate) / per_client,
    );
    let window = cfg.duration_s - cfg.warmup_s;
    let expected_measured = cfg.real_rate * f64::from(n_clients) * window;
    let target_p = if expected_measured > 0.0 {
        (f64::from(cfg.receiver_targets) / expected_measured).min(1.0)
    } else {
        0.0
    };
    let target_slots = if cfg.receiver_targets == 0 {
        0
    } else {
        cfg.target_slots
    };
    let recipients = n_clients as usize + cfg.gateways as usize;

    let mut st = State {
        msgs: Vec::new(),
        free: Vec::new(),
        pools: vec![Vec::new(); relays],
        timers: MinTree::new(relays),
        corrupt: corrupt.clone(),
        operator,
        smass: cfg
            .sender_exact
            .then(|| SenderMass::new(relays, n_clients as usize)),
        tmass: TargetMass::new(relays, target_slots, recipients),
        mix_rng: StdRng::seed_from_u64(stream_seed(cfg.seed, 2)),
    };
    let mut entry: VecDeque<(f64, Hot)> = VecDeque::new();
    let mut hopq: VecDeque<(f64, Hot)> = VecDeque::new();
    let mut tinfo: Vec<Option<TargetInfo>> = (0..st.tmass.slots()).map(|_| None).collect();

    let hist = || {
        Histogram::<u64>::new_with_bounds(1, 3_600_000_000_000, 3).map_err(|e| SimError::Config {
            what: "latency histogram",
            reason: e.to_string(),
        })
    };
    let mut out = RawRun {
        rows: Vec::new(),
        targets: Vec::new(),
        sender_entropy: Vec::new(),
        sender_min_entropy: Vec::new(),
        pair_log_lr: Vec::new(),
        pooled_log_lr: Vec::new(),
        latency_us: hist()?,
        latency_sum: 0.0,
        latency_sum_sq: 0.0,
        latency_max: 0.0,
        counters: Counters::default(),
        corrupt_hops_hist: vec![0; l + 1],
        corrupt: corrupt
            .iter()
            .enumerate()
            .filter(|(_, c)| **c)
            .map(|(i, _)| i as u32)
            .collect(),
        wall_s: 0.0,
        peak_state_bytes: 0,
    };
    let c = &mut out.counters;

    let mut next_send = exp1(&mut gen_rng) / total_rate;
    let mut next_id: u64 = 0;
    let mut in_flight: u64 = 0;
    let mut measured_in_flight: u64 = 0;
    let mut targets_started: u32 = 0;
    let hard_stop = cfg.duration_s + cfg.drain_s;

    loop {
        // The earliest source goes first; on equal times: hop arrivals, entry arrivals, departures, sends.
        let th = hopq.front().map_or(f64::INFINITY, |e| e.0);
        let te = entry.front().map_or(f64::INFINITY, |e| e.0);
        let (relay, td) = st.timers.min();
        let ts = next_send;
        if ts >= cfg.duration_s && measured_in_flight == 0 && st.tmass.active == 0 {
            c.end_s = cfg.duration_s.max(th.min(te).min(td).min(ts));
            break;
        }
        if ts >= hard_stop && th.min(te).min(td) >= hard_stop {
            c.end_s = hard_stop;
            c.drain_cut = true;
            break;
        }
        c.events += 1;
        if th <= te && th <= td && th <= ts {
            if let Some((now, m)) = hopq.pop_front() {
                st.arrive(m, now, cfg);
                c.link_transmissions += 1;
            }
        } else if te <= td && te <= ts {
            if let Some((now, m)) = entry.pop_front() {
                st.arrive(m, now, cfg);
                c.link_transmissions += 2;
            }
        } else if td <= ts {
            let now = td;
            let mut h = st.depart(relay, now, cfg);
            if usize::from(h.hop) + 1 < l {
                h.hop += 1;
                hopq.push_back((now + cfg.link_s, h));
                continue;
            }
            // Leaves the last layer: at the exit gateway one link later; the gateway does not mix.
            let msg = st.msgs[h.idx as usize];
            st.free.push(h.idx);
            c.link_transmissions += 1;
            in_flight -= 1;
            let delivered_at = now + cfg.link_s;
            let finished = st
                .tmass
                .deliver(h.t_carrier, msg.recipient, cfg.mass_epsilon);
            if msg.measured
                && let Some(s) = st.smass.as_ref()
            {
                let lr = |other: u32| {
                    let own = s.prob(h.s_carrier, msg.sender, msg.sender);
                    (own / s.prob(h.s_carrier, msg.sender, other)).ln()
                };
                let [a, b] = cfg.unlinkability_senders;
                if msg.sender == a || msg.sender == b {
                    out.pair_log_lr
                        .push(lr(if msg.sender == a { b } else { a }));
                }
                if msg.sender ^ 1 < n_clients {
                    out.pooled_log_lr.push(lr(msg.sender ^ 1));
                }
            }
            let (h, hmin) = match st.smass.as_mut() {
                Some(s) if msg.measured => s.finish(h.s_carrier),
                Some(s) => {
                    s.release(h.s_carrier);
                    (f64::NAN, f64::NAN)
                }
                None => (f64::NAN, f64::NAN),
            };
            if msg.measured {
                measured_in_flight -= 1;
                c.measured_delivered += 1;
                out.corrupt_hops_hist[usize::from(msg.corrupt_hops).min(l)] += 1;
                let lat = delivered_at - msg.sent;
                out.latency_sum += lat;
                out.latency_sum_sq += lat * lat;
                out.latency_max = out.latency_max.max(lat);
                out.latency_us
                    .saturating_record((lat * 1e6).round().max(1.0) as u64);
                if st.smass.is_some() {
                    out.sender_entropy.push(h);
                    out.sender_min_entropy.push(hmin);
                }
                if (out.rows.len() as u64) < cfg.csv_max_rows {
                    out.rows.push(MessageRow {
                        id: msg.id,
                        sender: msg.sender,
                        receiver: msg.recipient,
                        sent_s: msg.sent,
                        latency_s: lat,
                        sender_entropy: h,
                        sender_min_entropy: hmin,
                        corrupt_hops: msg.corrupt_hops,
                        is_target: msg.target != 0,
                    });
                }
            }
            let mut f = finished;
            while f != 0 {
                let slot = f.trailing_zeros() as usize;
                f &= f - 1;
                if let Some(info) = tinfo[slot].take() {
                    let o = st.tmass.close(slot, info.receiver);
                    out.targets.push(target_row(&info, &o));
                }
            }
        } else {
            // A client sends.
            let now = ts;
            next_send = ts + exp1(&mut gen_rng) / total_rate;
            let u: f64 = gen_rng.random();
            let kind = if u < p_real {
                REAL
            } else if u < p_loop {
                LOOP
            } else {
                DROP
            };
            let sender = gen_rng.random_range(0..n_clients);
            let recipient = match kind {
                REAL if n_clients > 1 => {
                    let r = gen_rng.random_range(0..n_clients - 1);
                    if r >= sender { r + 1 } else { r }
                }
                REAL | LOOP => sender,
                _ => n_clients + gen_rng.random_range(0..cfg.gateways),
            };
            let in_window = now >= cfg.warmup_s && now < cfg.duration_s;
            match kind {
                REAL => {
                    c.real_sent += 1;
                    c.real_window += u64::from(in_window);
                }
                LOOP => {
                    c.loop_sent += 1;
                    c.loop_window += u64::from(in_window);
                }
                _ => {
                    c.drop_sent += 1;
                    c.drop_window += u64::from(in_window);
                }
            }
            let measured = kind == REAL && in_window;
            let mut msg = Msg {
                sent: now,
                id: next_id,
                sender,
                recipient,
                s_carrier: NONE,
                t_carrier: NONE,
                measured,
                corrupt_hops: 0,
                hostile_ops: 0,
                target: 0,
            };
            if measured {
                measured_in_flight += 1;
                if target_slots > 0 && targets_started < cfg.receiver_targets {
                    let draw: f64 = sample_rng.random();
                    if draw < target_p
                        && let Some((slot, carrier)) = st.tmass.start(target_slots)
                    {
                        targets_started += 1;
                        msg.t_carrier = carrier;
                        msg.target = slot as u8 + 1;
                        tinfo[slot] = Some(TargetInfo {
                            id: next_id,
                            sender,
                            receiver: recipient,
                            sent: now,
                        });
                    }
                }
            }
            let h = Hot {
                idx: st.alloc(msg),
                s_carrier: NONE,
                t_carrier: msg.t_carrier,
                hop: 0,
            };
            next_id += 1;
            in_flight += 1;
            c.max_in_flight = c.max_in_flight.max(in_flight);
            entry.push_back((now + 2.0 * cfg.link_s, h));
        }
    }
    // Targets still open when traffic stopped are scored with the mass delivered so far.
    for (slot, info) in tinfo.iter_mut().enumerate() {
        if let Some(info) = info.take() {
            let o = st.tmass.close(slot, info.receiver);
            out.targets.push(target_row(&info, &o));
        }
    }
    out.peak_state_bytes = st.msgs.capacity() * std::mem::size_of::<Msg>()
        + st.pools.iter().map(|p| p.capacity() * 4).sum::<usize>()
        + st.smass.as_ref().map_or(0, SenderMass::bytes)
        + st.tmass.bytes()
        + (entry.capacity() + hopq.capacity()) * std::mem::size_of::<(f64, Hot)>();
    out.wall_s = wall.elapsed().as_secs_f64();
    Ok(out)
}

fn target_row(info: &TargetInfo, o: &TargetOutcome) -> TargetRow {
    TargetRow {
        id: info.id,
        sender: info.sender,
        receiver: info.receiver,
        sent_s: info.sent,
        entropy: o.entropy,
        min_entropy: o.min_entropy,
        true_prob: o.true_prob,
        true_rank: o.true_rank,
        residual: o.residual,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_seeds_differ() {
        assert_ne!(stream_seed(1, 1), stream_seed(1, 2));
        assert_ne!(stream_seed(1, 1), stream_seed(2, 1));
    }

    #[test]
    fn corrupt_fraction_picks_rounded_count() {
        let mut c = super::super::ModelConfig::default();
        c.adversary.corrupt_fraction = 0.2;
        let v = c.validate().unwrap();
        assert_eq!(corrupt_set(&v).iter().filter(|&&x| x).count(), 6);
    }
}

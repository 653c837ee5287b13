//! Probability-mass tracking through Poisson (exponential-delay) mixes.
//!
//! The adversary sees every arrival at and departure from every relay, but not which arrival a
//! departure is. With exponential delays the next message out of an honest relay is, given what
//! the adversary has seen, equally likely to be any message currently in it (memorylessness).
//! So each honest relay keeps one vector `S`, the sum of the distributions of the messages in its
//! pool (its total mass is the pool size `n`): an arrival adds its distribution to `S`; a departure
//! leaves with `S / n` and `S` becomes `S - S / n`. That is the exact Bayesian posterior given
//! the observed counts, and it is the Loopix/MiXiM "average of the pool" rule, with the remaining
//! messages updated consistently. A corrupt relay reveals its mapping, so a message keeps its own
//! distribution through it.
//!
//! Two trackers share this rule: [`SenderMass`] (a dense distribution over all clients, so every
//! delivered message gets its sender anonymity) and [`TargetMass`] (up to 32 sampled "target"
//! messages followed forward, giving the distribution over recipients of each).

/// A carrier index meaning "no vector": the sender's point mass for [`SenderMass`], zero for
/// [`TargetMass`].
pub(crate) const NONE: u32 = u32::MAX;

/// Shannon entropy and min-entropy (bits) of the normalised non-negative weights `p`.
pub fn entropies(p: impl Iterator<Item = f64> + Clone) -> (f64, f64) {
    let total: f64 = p.clone().filter(|&x| x > 0.0).sum();
    if total <= 0.0 {
        return (0.0, 0.0);
    }
    let mut h = 0.0;
    let mut max = 0.0f64;
    for x in p {
        if x > 0.0 {
            let q = x / total;
            h -= q * q.log2();
            max = max.max(q);
        }
    }
    (h.max(0.0), -max.log2())
}

/// A slab of fixed-width f64 vectors reused through a free list, so steady state allocates nothing.
#[derive(Debug)]
struct Slab {
    w: usize,
    data: Vec<f64>,
    free: Vec<u32>,
}

impl Slab {
    fn new(w: usize) -> Self {
        Self {
            w,
            data: Vec::new(),
            free: Vec::new(),
        }
    }

    /// A slot whose contents are unspecified (callers overwrite all of it).
    fn alloc(&mut self) -> u32 {
        if let Some(i) = self.free.pop() {
            return i;
        }
        let i = (self.data.len() / self.w.max(1)) as u32;
        self.data.resize(self.data.len() + self.w.max(1), 0.0);
        i
    }

    fn release(&mut self, i: u32) {
        self.free.push(i);
    }

    fn get(&self, i: u32) -> &[f64] {
        let s = i as usize * self.w;
        &self.data[s..s + self.w]
    }

    fn slots(&self) -> usize {
        self.data.len() / self.w.max(1)
    }
}

/// Exact sender distributions: one dense vector over clients per honest relay pool and per
/// message in flight between pools (or held by a corrupt relay).
#[derive(Debug)]
pub struct SenderMass {
    w: usize,
    pools: Vec<f64>,
    slab: Slab,
}

impl SenderMass {
    pub(crate) fn new(relays: usize, clients: usize) -> Self {
        Self {
            w: clients,
            pools: vec![0.0; relays * clients],
            slab: Slab::new(clients),
        }
    }

    /// A message with carrier `c` (sender `sender`) enters honest relay `relay`.
    pub(crate) fn arrive(&mut self, relay: usize, c: u32, sender: u32) {
        let pool = &mut self.pools[relay * self.w..(relay + 1) * self.w];
        if c == NONE {
            pool[sender as usize] += 1.0;
        } else {
            let s = c as usize * self.w;
            for (p, v) in pool.iter_mut().zip(&self.slab.data[s..s + self.w]) {
                *p += v;
            }
            self.slab.release(c);
        }
    }

    /// A message leaves honest relay `relay`, which held `n` messages including it; returns its carrier.
    pub(crate) fn depart(&mut self, relay: usize, n: u32) -> u32 {
        let c = self.slab.alloc();
        let s = c as usize * self.w;
        let pool = &mut self.pools[relay * self.w..(relay + 1) * self.w];
        let out = &mut self.slab.data[s..s + self.w];
        if n <= 1 {
            out.copy_from_slice(pool);
            pool.fill(0.0);
        } else {
            let inv = 1.0 / f64::from(n);
            for (o, p) in out.iter_mut().zip(pool.iter_mut()) {
                let v = *p * inv;
                *o = v;
                *p -= v;
            }
        }
        c
    }

    /// Entropy and min-entropy (bits) of a carrier, then frees it.
    pub(crate) fn finish(&mut self, c: u32) -> (f64, f64) {
        if c == NONE {
            return (0.0, 0.0);
        }
        let r = entropies(self.slab.get(c).iter().copied());
        self.slab.release(c);
        r
    }

    /// The adversary's probability that the message with carrier `c` (true sender `sender`)
    /// came from `client`.
    pub(crate) fn prob(&self, c: u32, sender: u32, client: u32) -> f64 {
        if c == NONE {
            return if client == sender { 1.0 } else { 0.0 };
        }
        let v = self.slab.get(c);
        let total: f64 = v.iter().sum();
        if total > 0.0 {
            v[client as usize] / total
        } else {
            0.0
        }
    }

    pub(crate) fn release(&mut self, c: u32) {
        if c != NONE {
            self.slab.release(c);
        }
    }

    /// Bytes held by pools and carriers.
    pub(crate) fn bytes(&self) -> usize {
        (self.pools.len() + self.slab.data.len()) * 8
    }
}

/// A finished target: where its mass ended up.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TargetOutcome {
    pub entropy: f64,
    pub min_entropy: f64,
    /// Probability the adversary gives the true recipient.
    pub true_prob: f64,
    /// 1 + number of recipients the adversary ranks strictly above the true one.
    pub true_rank: u32,
    /// Mass not yet delivered when the target was closed.
    pub residual: f64,
}

/// Forward tracking of up to 32 target messages: per honest relay a vector of the target slots'
/// mass, per carrier the same, and per slot the mass delivered to each recipient so far.
#[derive(Debug)]
pub struct TargetMass {
    k: usize,
    pools: Vec<f64>,
    pool_mask: Vec<u32>,
    slab: Slab,
    slab_mask: Vec<u32>,
    /// Mass delivered per (recipient, slot), interleaved so one delivery touches one or a few
    /// cache lines; plus, per slot, the recipients touched in first-touch order.
    out: Vec<f64>,
    touched: Vec<Vec<u32>>,
    delivered: Vec<f64>,
    pub(crate) active: u32,
}

impl TargetMass {
    pub(crate) fn new(relays: usize, slots: usize, recipients: usize) -> Self {
        let k = slots.max(1);
        Self {
            k,
            pools: vec![0.0; relays * k],
            pool_mask: vec![0; relays],
            slab: Slab::new(k),
            slab_mask: Vec::new(),
            out: vec![0.0; if slots == 0 { 0 } else { recipients * k }],
            touched: vec![Vec::new(); k],
            delivered: vec![0.0; k],
            active: 0,
        }
    }

    pub(crate) fn slots(&self) -> usize {
        self.k
    }

    /// Claims a free slot for a new target and returns (slot, carrier holding its unit mass).
    pub(crate) fn start(&mut self, slots: usize) -> Option<(usize, u32)> {
        let slot = (0..slots).find(|&s| self.active & (1 << s) == 0)?;
        self.active |= 1 << slot;
        self.delivered[slot] = 0.0;
        let c = self.alloc_carrier();
        let s = c as usize * self.k;
        self.slab.data[s..s + self.k].fill(0.0);
        self.slab.data[s + slot] = 1.0;
        self.slab_mask[c as usize] = 1 << slot;
        Some((slot, c))
    }

    fn alloc_carrier(&mut self) -> u32 {
        let c = self.slab.alloc();
        if self.slab_mask.len() < self.slab.slots() {
            self.slab_mask.resize(self.slab.slots(), 0);
        }
        c
    }

    fn release(&mut self, c: u32) {
        self.slab_mask[c as usize] = 0;
        self.slab.release(c);
    }

    pub(crate) fn arrive(&mut self, relay: usize, c: u32) {
        if c == NONE {
            return;
        }
        let mask = self.slab_mask[c as usize];
        let (k, s) = (self.k, c as usize * self.k);
        let mut m = mask;
        while m != 0 {
            let i = m.trailing_zeros() as usize;
            m &= m - 1;
            self.pools[relay * k + i] += self.slab.data[s + i];
        }
        self.pool_mask[relay] |= mask;
        self.release(c);
    }

    pub(crate) fn depart(&mut self, relay: usize, n: u32) -> u32 {
        let mask = self.pool_mask[relay];
        if mask == 0 {
            return NONE;
        }
        let c = self.alloc_carrier();
        let (k, s) = (self.k, c as usize * self.k);
        let inv = if n <= 1 { 1.0 } else { 1.0 / f64::from(n) };
        let mut m = mask;
        while m != 0 {
            let i = m.trailing_zeros() as usize;
            m &= m - 1;
            let p = &mut self.pools[relay * k + i];
            let v = if n <= 1 { *p } else { *p * inv };
            self.slab.data[s + i] = v;
            *p = if n <= 1 { 0.0 } else { *p - v };
        }
        if n <= 1 {
            self.pool_mask[relay] = 0;
        }
        self.slab_mask[c as usize] = mask;
        c
    }

    /// A message with carrier `c` leaves the network to `recipient`. Returns the mask of slots
    /// whose undelivered mass is now below `eps` (the caller closes them).
    pub(crate) fn deliver(&mut self, c: u32, recipient: u32, eps: f64) -> u32 {
        if c == NONE {
            return 0;
        }
        let mask = self.slab_mask[c as usize];
        let s = c as usize * self.k;
        let mut done = 0;
        let mut m = mask;
        while m != 0 {
            let i = m.trailing_zeros() as usize;
            m &= m - 1;
            let v = self.slab.data[s + i];
            let o = &mut self.out[recipient as usize * self.k + i];
            if *o == 0.0 && v > 0.0 {
                self.touched[i].push(recipient);
            }
            *o += v;
            self.delivered[i] += v;
            if 1.0 - self.delivered[i] < eps {
                done |= 1 << i;
            }
        }
        self.release(c);
        done
    }

    /// Scores and closes `slot`, wiping its mass from every pool and carrier.
    pub(crate) fn close(&mut self, slot: usize, true_recipient: u32) -> TargetOutcome {
        let (out, k) = (&self.out, self.k);
        let touched = &self.touched[slot];
        let (entropy, min_entropy) = entropies(touched.iter().map(|&r| out[r as usize * k + slot]));
        let total = self.delivered[slot];
        let t = out[true_recipient as usize * k + slot];
        let true_rank = 1 + touched
            .iter()
            .filter(|&&r| out[r as usize * k + slot] > t)
            .count() as u32;
        let outcome = TargetOutcome {
            entropy,
            min_entropy,
            true_prob: if total > 0.0 { t / total } else { 0.0 },
            true_rank,
            residual: (1.0 - total).max(0.0),
        };
        for &r in &self.touched[slot] {
            self.out[r as usize * self.k + slot] = 0.0;
        }
        self.touched[slot].clear();
        let bit = 1u32 << slot;
        for (relay, mask) in self.pool_mask.iter_mut().enumerate() {
            if *mask & bit != 0 {
                *mask &= !bit;
                self.pools[relay * self.k + slot] = 0.0;
            }
        }
        for (c, mask) in self.slab_mask.iter_mut().enumerate() {
            if *mask & bit != 0 {
                *mask &= !bit;
                self.slab.data[c * self.k + slot] = 0.0;
            }
        }
        self.active &= !bit;
        outcome
    }

    pub(crate) fn bytes(&self) -> usize {
        (self.pools.len() + self.slab.data.len() + self.out.len()) * 8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entropy_of_uniform_and_point() {
        let (h, m) = entropies([1.0, 1.0, 1.0, 1.0].into_iter());
        assert!((h - 2.0).abs() < 1e-12 && (m - 2.0).abs() < 1e-12);
        let (h, m) = entropies([0.0, 3.0].into_iter());
        assert_eq!((h, m), (0.0, 0.0));
    }

    /// Two messages from different senders in one pool: the first out is 50/50, and so is the
    /// second (the pool keeps the rest of the mass).
    #[test]
    fn pool_average_conserves_mass() {
        let mut s = SenderMass::new(1, 2);
        s.arrive(0, NONE, 0);
        s.arrive(0, NONE, 1);
        let a = s.depart(0, 2);
        assert_eq!(s.slab.get(a), &[0.5, 0.5]);
        let b = s.depart(0, 1);
        assert_eq!(s.slab.get(b), &[0.5, 0.5]);
        assert!(s.pools.iter().all(|&x| x == 0.0));
        assert!((s.finish(a).0 - 1.0).abs() < 1e-12);
    }
}

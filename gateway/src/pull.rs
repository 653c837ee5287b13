//! When a pull is answered: a sans-IO clock per client link.
//!
//! A pull is answered exactly `delay` after it arrived, whatever the mailbox holds. The
//! mailbox core plans the answer and the store loads its items within that delay; a
//! load that takes longer (a busy disk) does not move the answer: at its due time the
//! link gets an all-dummy answer of the same length instead, and the items the late load
//! carried are handed back (`poll_release`) to be offered again at the next pull. So the
//! time and the size of an answer are the same for an empty and a full mailbox: an
//! observer of the link (or of its QUIC packets' timing) learns nothing from them.
//!
//! The driver feeds arrivals (`handle_pull`) and finished loads (`handle_loaded`), sleeps
//! until `poll_timeout`, and writes what `poll_transmit` yields.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::GatewayError;
use crate::mailbox::ItemId;
use shoal_packet::protocol::GatewayMsg;

/// How long after its arrival a pull is answered, when not configured otherwise.
pub const DEFAULT_PULL_ANSWER_DELAY: Duration = Duration::from_millis(50);
/// Longest allowed answer delay.
pub const MAX_PULL_ANSWER_DELAY: Duration = Duration::from_secs(10);
/// Pulls one link may have in progress (planned, loading or waiting for their due time).
/// A client sends one per pull interval; the link reads no further control messages
/// while this many are in progress, which bounds what one account can make the gateway
/// hold.
pub const MAX_PULLS_IN_PROGRESS: usize = 4;

/// How pulls are answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PullAnswerConfig {
    /// A pull is answered this long after it arrived.
    pub delay: Duration,
    /// Items (real or dummy) in every answer: the mailbox core's `pull_batch`.
    pub pull_batch: usize,
    /// Test-only: answer each pull as soon as its items are loaded, as gateways did
    /// before (the answer's timing then depends on how many real items it carries).
    /// Lets a test show that the attack on the timing works without the fixed delay.
    pub legacy_leaks: bool,
}

impl PullAnswerConfig {
    pub fn validate(&self) -> Result<(), GatewayError> {
        if self.delay.is_zero() || self.delay > MAX_PULL_ANSWER_DELAY {
            return Err(GatewayError::Config(
                "pull_answer_delay_ms must be 1..=10000",
            ));
        }
        Ok(())
    }
}

/// Names one pull in progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PullToken(u64);

/// What to write to the client for one pull.
#[derive(Debug, PartialEq, Eq)]
pub struct PullAnswer {
    pub messages: Vec<GatewayMsg>,
    /// Close the link after writing (the account is gone).
    pub close: bool,
    /// The load missed the due time; `messages` are all dummies.
    pub late: bool,
}

#[derive(Debug)]
struct InProgress {
    token: u64,
    due: Instant,
    /// (answer, close after it, when it was loaded)
    loaded: Option<(Vec<GatewayMsg>, bool, Instant)>,
}

/// The answer clock of one client link. See the module docs.
#[derive(Debug)]
pub struct PullResponder {
    config: PullAnswerConfig,
    next_token: u64,
    /// Pulls not answered yet, in arrival order (answers leave in that order).
    waiting: VecDeque<InProgress>,
    /// Pulls answered with dummies whose load has not come back yet.
    late: Vec<u64>,
    /// Item ids of late loads, to offer again.
    release: VecDeque<Vec<ItemId>>,
    late_answers: u64,
}

impl PullResponder {
    pub fn new(config: PullAnswerConfig) -> Self {
        PullResponder {
            config,
            next_token: 0,
            waiting: VecDeque::new(),
            late: Vec::new(),
            release: VecDeque::new(),
            late_answers: 0,
        }
    }

    /// Whether another pull may start (see [`MAX_PULLS_IN_PROGRESS`]).
    pub fn can_accept(&self) -> bool {
        self.waiting.len() + self.late.len() < MAX_PULLS_IN_PROGRESS
    }

    /// No pull is in progress (every answer written, every late load back).
    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.late.is_empty()
    }

    /// A pull arrived at `arrived`; plan and load its answer, then hand it to
    /// [`handle_loaded`](Self::handle_loaded) with the returned token.
    pub fn handle_pull(&mut self, arrived: Instant) -> PullToken {
        let token = self.next_token;
        self.next_token += 1;
        // Answers leave in order, so a due time never precedes the one before it.
        let due = (arrived + self.config.delay).max(self.waiting.back().map_or(arrived, |w| w.due));
        self.waiting.push_back(InProgress {
            token,
            due,
            loaded: None,
        });
        PullToken(token)
    }

    /// The answer of pull `token` is ready at `now` (`close`: the link ends after it).
    pub fn handle_loaded(
        &mut self,
        token: PullToken,
        messages: Vec<GatewayMsg>,
        close: bool,
        now: Instant,
    ) {
        if let Some(w) = self.waiting.iter_mut().find(|w| w.token == token.0) {
            w.loaded = Some((messages, close, now));
            return;
        }
        if let Some(i) = self.late.iter().position(|t| *t == token.0) {
            self.late.swap_remove(i);
            let ids: Vec<ItemId> = messages
                .iter()
                .filter_map(|m| match m {
                    GatewayMsg::Item { id, .. } => Some(*id),
                    _ => None,
                })
                .collect();
            if !ids.is_empty() {
                self.release.push_back(ids);
            }
        }
    }

    /// When [`poll_transmit`](Self::poll_transmit) next has something to write.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let first = self.waiting.front()?;
        if self.config.legacy_leaks {
            return first.loaded.as_ref().map(|(_, _, at)| *at);
        }
        Some(first.due)
    }

    /// The next answer due at `now`, if any.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<PullAnswer> {
        let first = self.waiting.front()?;
        let ready = if self.config.legacy_leaks {
            first.loaded.is_some()
        } else {
            now >= first.due
        };
        if !ready {
            return None;
        }
        let w = self.waiting.pop_front()?;
        Some(match w.loaded {
            Some((messages, close, _)) => PullAnswer {
                messages,
                close,
                late: false,
            },
            None => {
                self.late.push(w.token);
                self.late_answers += 1;
                let mut messages = vec![GatewayMsg::Dummy; self.config.pull_batch];
                messages.push(GatewayMsg::PullDone { more: false });
                PullAnswer {
                    messages,
                    close: false,
                    late: true,
                }
            }
        })
    }

    /// Items a late load carried: the mailbox core should offer them again now.
    pub fn poll_release(&mut self) -> Option<Vec<ItemId>> {
        self.release.pop_front()
    }

    /// Answers sent as dummies because their load missed the due time.
    pub fn late_answers(&self) -> u64 {
        self.late_answers
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_packet::SPHINX_PAYLOAD_SIZE;

    const BATCH: usize = 16;

    fn config(legacy_leaks: bool) -> PullAnswerConfig {
        PullAnswerConfig {
            delay: Duration::from_millis(50),
            pull_batch: BATCH,
            legacy_leaks,
        }
    }

    /// An answer with `real` items padded to the batch, as the store builds it.
    fn answer(real: usize) -> Vec<GatewayMsg> {
        let mut out: Vec<GatewayMsg> = (0..real)
            .map(|i| GatewayMsg::Item {
                id: i as u64 + 1,
                surb_id: [0; 16],
                payload: Box::new([7; SPHINX_PAYLOAD_SIZE]),
            })
            .collect();
        out.resize(BATCH, GatewayMsg::Dummy);
        out.push(GatewayMsg::PullDone { more: false });
        out
    }

    /// The adversary's view of one link: pulls arrive every second; loading `real[i]`
    /// items takes 0.3 ms + 0.05 ms per item (the shape a loopback capture measured).
    /// Returns (answer send time since the pull arrived, frames in the answer) per pull.
    fn observe(legacy_leaks: bool, real: &[usize]) -> Vec<(Duration, usize)> {
        let start = Instant::now();
        let mut r = PullResponder::new(config(legacy_leaks));
        let mut out = Vec::new();
        for (i, n) in real.iter().enumerate() {
            let arrived = start + Duration::from_secs(i as u64);
            let token = r.handle_pull(arrived);
            assert_eq!(r.poll_transmit(arrived), None);
            let loaded_at =
                arrived + Duration::from_micros(300) + Duration::from_micros(50) * *n as u32;
            r.handle_loaded(token, answer(*n), false, loaded_at);
            // Virtual time: the driver wakes when the responder says; nothing is sent
            // before.
            let wake = r.poll_timeout().unwrap();
            let a = r.poll_transmit(wake).unwrap();
            assert!(!a.late);
            out.push((wake - arrived, a.messages.len()));
        }
        out
    }

    #[test]
    fn answer_timing_and_size_do_not_depend_on_real_items() {
        let empty = observe(false, &[0, 0, 0, 0]);
        let full = observe(false, &[16, 3, 16, 1]);
        assert_eq!(empty, full);
        assert!(
            empty
                .iter()
                .all(|(t, n)| *t == Duration::from_millis(50) && *n == BATCH + 1)
        );
    }

    #[test]
    fn legacy_answer_timing_reveals_real_items() {
        // The control: answering when loaded, the send time tells an empty mailbox from
        // a full one on every single pull.
        let empty = observe(true, &[0, 0, 0, 0]);
        let full = observe(true, &[16, 3, 16, 1]);
        assert_ne!(empty, full);
        let threshold = Duration::from_micros(325);
        let guesses: Vec<bool> = empty
            .iter()
            .chain(&full)
            .map(|(t, _)| *t > threshold)
            .collect();
        assert_eq!(
            guesses,
            [false, false, false, false, true, true, true, true],
            "the adversary classifies every answer"
        );
    }

    #[test]
    fn a_late_load_becomes_a_dummy_answer_on_time_and_its_items_are_released() {
        let t0 = Instant::now();
        let mut r = PullResponder::new(config(false));
        let token = r.handle_pull(t0);
        let due = r.poll_timeout().unwrap();
        assert_eq!(due, t0 + Duration::from_millis(50));
        let a = r.poll_transmit(due).unwrap();
        assert!(a.late);
        assert_eq!(a.messages, answer(0));
        assert_eq!(r.late_answers(), 1);
        assert!(r.poll_release().is_none());
        r.handle_loaded(token, answer(2), false, due + Duration::from_millis(1));
        assert_eq!(r.poll_release(), Some(vec![1, 2]));
        assert!(r.poll_transmit(due + Duration::from_secs(1)).is_none());
    }

    #[test]
    fn answers_leave_in_order_and_in_progress_pulls_are_bounded() {
        let t0 = Instant::now();
        let mut r = PullResponder::new(config(false));
        let mut tokens = Vec::new();
        for i in 0..MAX_PULLS_IN_PROGRESS {
            assert!(r.can_accept());
            tokens.push(r.handle_pull(t0 + Duration::from_millis(i as u64)));
        }
        assert!(!r.can_accept());
        // Loads finish in reverse order; answers still leave in arrival order.
        for (i, t) in tokens.iter().enumerate().rev() {
            r.handle_loaded(*t, answer(i), i == MAX_PULLS_IN_PROGRESS - 1, t0);
        }
        let late = t0 + Duration::from_secs(1);
        for i in 0..MAX_PULLS_IN_PROGRESS {
            let a = r.poll_transmit(late).unwrap();
            assert_eq!(a.messages, answer(i));
            assert_eq!(a.close, i == MAX_PULLS_IN_PROGRESS - 1);
        }
        assert!(r.can_accept());
        assert!(r.poll_timeout().is_none());
    }

    #[test]
    fn config_bounds() {
        assert!(config(false).validate().is_ok());
        for ms in [0, 10_001] {
            let c = PullAnswerConfig {
                delay: Duration::from_millis(ms),
                ..config(false)
            };
            assert!(c.validate().is_err());
        }
    }
}

//! Delivery receipts for the user's own messages, bound to each message by id. Sans-IO.
//!
//! A send ([`crate::messenger::Messenger::send_direct`] or `send_group`) returns a
//! [`SendTicket`]: its [`SendId`] and how many envelopes it produced. Each envelope the
//! managed task hands to the client driver is reported with that id and the driver's
//! [`MessageId`] (or why the driver refused it); the driver's `Acked { message_id }`
//! says every fragment of that envelope is durable in the recipient's mailbox (the
//! recipient's gateway releases the SURB-ack only after its write). So a send is:
//!
//! - **delivered** once every one of its envelopes is acked: only its own ids count, so
//!   a message that never leaves (or is refused) cannot lend its receipt to another;
//! - **failed**, with a reason, if the driver refused any of its envelopes or it had
//!   nobody to go to; it is never counted against another send;
//! - **sent** (left the device) once all of its envelopes were handed over before the
//!   previous tick, the link is up and nothing waits in the client's send queue.
//!
//! Acks that arrive before the report of their envelope (two channels, no order
//! between them) are held, bounded, until it comes.

use std::collections::{HashMap, HashSet, VecDeque};

use shoal_packet::MessageId;

use crate::messenger::{SendId, SendTicket};

/// Acks held while their envelope's report has not arrived.
const MAX_EARLY_ACKS: usize = 4096;

/// What became of one send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// Left the device (see the module docs for how that is judged).
    Sent,
    /// Every envelope is durable in its recipient's mailbox.
    Delivered,
    /// It cannot reach (all of) its recipients; it will not be retried as is.
    Failed(Failure),
}

/// Why a send failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Failure {
    /// A group send with nobody else in the group.
    #[error("nobody else is in this group yet")]
    NoRecipients,
    /// The client refused `refused` of the send's `of` envelopes.
    #[error("{refused} of {of} copies could not be queued: {reason}")]
    Refused {
        refused: usize,
        of: usize,
        reason: String,
    },
}

#[derive(Debug, Default)]
struct Open {
    /// From the ticket; `None` while only envelope reports have been seen.
    expected: Option<usize>,
    handed: usize,
    unacked: HashSet<MessageId>,
    refused: Vec<String>,
    /// The tick at which the last envelope was handed over.
    handed_at: Option<u64>,
    sent_reported: bool,
}

/// Receipts of the sends still open. Feed it tickets, envelope reports, acks and ticks;
/// each returns the changes to show.
#[derive(Debug, Default)]
pub struct Receipts {
    open: HashMap<SendId, Open>,
    by_message: HashMap<MessageId, SendId>,
    early: HashSet<MessageId>,
    early_order: VecDeque<MessageId>,
    ticks: u64,
}

impl Receipts {
    pub fn new() -> Self {
        Self::default()
    }

    /// A send the user made.
    pub fn expect(&mut self, ticket: SendTicket) -> Option<(SendId, Delivery)> {
        self.open.entry(ticket.id).or_default().expected = Some(ticket.envelopes);
        self.settle(ticket.id)
    }

    /// The managed task handed one envelope of `send` to the driver (`Ok`, with the
    /// driver's id) or the driver refused it (`Err`, why).
    pub fn on_envelope(
        &mut self,
        send: SendId,
        result: Result<MessageId, String>,
    ) -> Option<(SendId, Delivery)> {
        let ticks = self.ticks;
        let open = self.open.entry(send).or_default();
        open.handed += 1;
        open.handed_at = Some(ticks);
        match result {
            Ok(id) => {
                if self.early.remove(&id) {
                    self.early_order.retain(|m| *m != id);
                } else {
                    open.unacked.insert(id);
                    self.by_message.insert(id, send);
                }
            }
            Err(reason) => open.refused.push(reason),
        }
        self.settle(send)
    }

    /// The driver's `Acked { message_id }`.
    pub fn on_acked(&mut self, message_id: &MessageId) -> Option<(SendId, Delivery)> {
        let Some(send) = self.by_message.remove(message_id) else {
            // Not reported yet (or not ours: commits, invites): hold it a while.
            if self.early.insert(*message_id) {
                self.early_order.push_back(*message_id);
                if self.early_order.len() > MAX_EARLY_ACKS
                    && let Some(old) = self.early_order.pop_front()
                {
                    self.early.remove(&old);
                }
            }
            return None;
        };
        if let Some(open) = self.open.get_mut(&send) {
            open.unacked.remove(message_id);
        }
        self.settle(send)
    }

    /// Once a tick (the caller's pace, e.g. 500 ms): sends that have left the device.
    /// `idle` is true when the link is up and the client's send queue is empty.
    pub fn on_tick(&mut self, idle: bool) -> Vec<(SendId, Delivery)> {
        self.ticks += 1;
        if !idle {
            return Vec::new();
        }
        let now = self.ticks;
        let mut out: Vec<(SendId, Delivery)> = self
            .open
            .iter_mut()
            .filter(|(_, o)| {
                !o.sent_reported
                    && o.expected.is_some_and(|e| o.handed >= e)
                    && o.handed_at.is_some_and(|t| t + 1 < now)
            })
            .map(|(id, o)| {
                o.sent_reported = true;
                (*id, Delivery::Sent)
            })
            .collect();
        out.sort_by_key(|(id, _)| *id);
        out
    }

    /// Sends whose outcome is still open.
    pub fn pending(&self) -> usize {
        self.open.len()
    }

    /// The final outcome of `send`, if it has one now (then it is closed).
    fn settle(&mut self, send: SendId) -> Option<(SendId, Delivery)> {
        let open = self.open.get(&send)?;
        let expected = open.expected?;
        if expected == 0 {
            self.close(send);
            return Some((send, Delivery::Failed(Failure::NoRecipients)));
        }
        if open.handed < expected {
            return None;
        }
        if let Some(reason) = open.refused.first() {
            let failure = Failure::Refused {
                refused: open.refused.len(),
                of: expected,
                reason: reason.clone(),
            };
            self.close(send);
            return Some((send, Delivery::Failed(failure)));
        }
        if open.unacked.is_empty() {
            self.close(send);
            return Some((send, Delivery::Delivered));
        }
        None
    }

    fn close(&mut self, send: SendId) {
        if let Some(open) = self.open.remove(&send) {
            for id in open.unacked {
                self.by_message.remove(&id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ticket(id: u64, envelopes: usize) -> SendTicket {
        SendTicket {
            id: SendId(id),
            envelopes,
        }
    }

    #[test]
    fn a_group_send_is_delivered_when_every_copy_is_acked() {
        let mut r = Receipts::new();
        assert_eq!(r.expect(ticket(1, 2)), None);
        assert_eq!(r.on_envelope(SendId(1), Ok([1; 16])), None);
        assert_eq!(r.on_acked(&[1; 16]), None, "one of two copies handed");
        assert_eq!(r.on_envelope(SendId(1), Ok([2; 16])), None);
        // Not "sent" on the tick it was handed over, nor while the queue is busy.
        assert!(r.on_tick(true).is_empty());
        assert!(r.on_tick(false).is_empty());
        assert_eq!(r.on_tick(true), vec![(SendId(1), Delivery::Sent)]);
        assert!(r.on_tick(true).is_empty(), "reported once");
        assert_eq!(r.on_acked(&[2; 16]), Some((SendId(1), Delivery::Delivered)));
        assert_eq!(r.pending(), 0);
    }

    // Regression (issue 18 #1): the chat matched envelopes to messages in FIFO order,
    // so a message that never left (its recipient unreachable) took the next message's
    // envelope, and the next one's receipt went to it: a "delivered" mark on a
    // message whose recipient got nothing, and a delivered message stuck "queued".
    #[test]
    fn a_message_that_never_leaves_does_not_shift_later_receipts() {
        let mut r = Receipts::new();
        // Three direct messages: to bob (gateway down), to carol (her seal key is
        // unusable: the driver refuses it), to dan.
        r.expect(ticket(1, 1));
        r.expect(ticket(2, 1));
        r.expect(ticket(3, 1));
        assert_eq!(
            r.on_envelope(SendId(2), Err("contact key is not usable".into())),
            Some((
                SendId(2),
                Delivery::Failed(Failure::Refused {
                    refused: 1,
                    of: 1,
                    reason: "contact key is not usable".into()
                })
            ))
        );
        assert_eq!(r.on_envelope(SendId(3), Ok([3; 16])), None);
        assert_eq!(r.on_envelope(SendId(1), Ok([1; 16])), None);
        // Dan's mailbox acks; bob's never does.
        assert_eq!(r.on_acked(&[3; 16]), Some((SendId(3), Delivery::Delivered)));
        assert_eq!(r.pending(), 1);
        assert!(r.open.contains_key(&SendId(1)), "bob's stays open");
    }

    #[test]
    fn an_ack_before_its_report_is_held() {
        let mut r = Receipts::new();
        r.expect(ticket(7, 1));
        assert_eq!(r.on_acked(&[9; 16]), None);
        assert_eq!(
            r.on_envelope(SendId(7), Ok([9; 16])),
            Some((SendId(7), Delivery::Delivered))
        );
        // Held acks are bounded.
        for i in 0..(MAX_EARLY_ACKS as u32 + 10) {
            let mut id = [0u8; 16];
            id[..4].copy_from_slice(&i.to_be_bytes());
            r.on_acked(&id);
        }
        assert!(r.early.len() <= MAX_EARLY_ACKS);
    }

    #[test]
    fn a_group_of_one_fails_with_a_reason() {
        let mut r = Receipts::new();
        assert_eq!(
            r.expect(ticket(4, 0)),
            Some((SendId(4), Delivery::Failed(Failure::NoRecipients)))
        );
        assert_eq!(
            Failure::NoRecipients.to_string(),
            "nobody else is in this group yet"
        );
    }

    #[test]
    fn acks_for_other_traffic_change_nothing() {
        let mut r = Receipts::new();
        r.expect(ticket(1, 1));
        r.on_envelope(SendId(1), Ok([1; 16]));
        // A commit's ack: not one of ours.
        assert_eq!(r.on_acked(&[0xcc; 16]), None);
        assert_eq!(r.pending(), 1);
    }
}

//! A producer's pending messages without I/O: sequence ids, what waits for
//! a receipt, what must be sent again after a reconnect (in sequence
//! order), and which sends timed out.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;

/// One sent entry (a message or a batch) waiting for its receipt.
#[derive(Debug)]
pub struct Pending<R> {
    pub sequence_id: u64,
    /// Messages in the entry (a batch holds several).
    pub messages: u32,
    /// The stored form, to send again after a reconnect.
    pub payload: Bytes,
    pub sent_at: Instant,
    /// Who waits for the outcome, one per message.
    pub waiters: Vec<R>,
}

/// What a receipt from the broker means for the pending queue.
#[derive(Debug, PartialEq, Eq)]
pub enum ReceiptOutcome {
    /// The front entry is acknowledged.
    Acked,
    /// A receipt for an entry acknowledged earlier (sent twice): ignored.
    Duplicate,
    /// A receipt for an entry we do not have in front: the connection is
    /// out of step; reconnecting resends what is pending.
    OutOfOrder,
}

#[derive(Debug)]
pub struct ProducerState<R> {
    next_seq: u64,
    pending: VecDeque<Pending<R>>,
}

impl<R> ProducerState<R> {
    pub fn new(first_seq: u64) -> ProducerState<R> {
        ProducerState {
            next_seq: first_seq,
            pending: VecDeque::new(),
        }
    }

    /// The broker stored this producer's messages up to `last` (a named
    /// producer with deduplication on): new messages continue after it.
    pub fn resume_after(&mut self, last: i64) {
        if last >= 0 && last as u64 >= self.next_seq {
            self.next_seq = last as u64 + 1;
        }
    }

    /// Assigns sequence ids to an entry of `messages` messages; returns its
    /// first sequence id and its stored form (built by `payload_for`).
    pub fn push(
        &mut self,
        messages: u32,
        payload_for: impl FnOnce(u64) -> Bytes,
        waiters: Vec<R>,
        now: Instant,
    ) -> (u64, Bytes) {
        let seq = self.next_seq;
        self.next_seq += messages.max(1) as u64;
        let payload = payload_for(seq);
        self.pending.push_back(Pending {
            sequence_id: seq,
            messages: messages.max(1),
            payload: payload.clone(),
            sent_at: now,
            waiters,
        });
        (seq, payload)
    }

    /// The sequence id the next entry gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// A receipt for `sequence_id` came.
    pub fn receipt(&mut self, sequence_id: u64) -> (ReceiptOutcome, Option<Pending<R>>) {
        match self.pending.front() {
            Some(p) if p.sequence_id == sequence_id => {
                (ReceiptOutcome::Acked, self.pending.pop_front())
            }
            Some(p) if sequence_id < p.sequence_id => (ReceiptOutcome::Duplicate, None),
            None => (ReceiptOutcome::Duplicate, None),
            Some(_) => (ReceiptOutcome::OutOfOrder, None),
        }
    }

    /// The broker refused the entry `sequence_id`: it leaves the queue.
    pub fn failed(&mut self, sequence_id: u64) -> Option<Pending<R>> {
        let i = self
            .pending
            .iter()
            .position(|p| p.sequence_id == sequence_id)?;
        self.pending.remove(i)
    }

    /// Everything to send again after a reconnect, in sequence order.
    pub fn to_resend(&self) -> impl Iterator<Item = &Pending<R>> {
        self.pending.iter()
    }

    /// Entries waiting longer than `timeout`: they fail (timed out).
    pub fn expired(&mut self, now: Instant, timeout: Duration) -> Vec<Pending<R>> {
        let mut out = Vec::new();
        while self
            .pending
            .front()
            .is_some_and(|p| now.duration_since(p.sent_at) >= timeout)
        {
            out.extend(self.pending.pop_front());
        }
        out
    }

    /// Every pending entry (the producer is closing).
    pub fn drain(&mut self) -> Vec<Pending<R>> {
        self.pending.drain(..).collect()
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Messages (not entries) pending.
    pub fn messages(&self) -> usize {
        self.pending.iter().map(|p| p.messages as usize).sum()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_producer_resumes_after_what_the_broker_stored() {
        let mut s: ProducerState<()> = ProducerState::new(0);
        s.resume_after(-1);
        assert_eq!(s.push(1, |_| Bytes::new(), vec![], Instant::now()).0, 0);
        s.resume_after(41);
        assert_eq!(s.push(1, |_| Bytes::new(), vec![], Instant::now()).0, 42);
        s.resume_after(10);
        assert_eq!(
            s.push(1, |_| Bytes::new(), vec![], Instant::now()).0,
            43,
            "never back"
        );
    }

    fn push(s: &mut ProducerState<u32>, n: u32, w: u32, now: Instant) -> u64 {
        s.push(n, |seq| Bytes::from(seq.to_string()), vec![w], now)
            .0
    }

    #[test]
    fn receipts_pop_in_order_and_batches_take_several_ids() {
        let now = Instant::now();
        let mut s = ProducerState::new(0);
        assert_eq!(push(&mut s, 1, 1, now), 0);
        assert_eq!(push(&mut s, 3, 2, now), 1, "a batch of three");
        assert_eq!(push(&mut s, 1, 3, now), 4);
        assert_eq!(s.messages(), 5);
        let (o, p) = s.receipt(0);
        assert_eq!(o, ReceiptOutcome::Acked);
        assert_eq!(p.unwrap().waiters, vec![1]);
        assert_eq!(s.receipt(0).0, ReceiptOutcome::Duplicate, "a repeat");
        assert_eq!(s.receipt(4).0, ReceiptOutcome::OutOfOrder, "1 comes first");
        assert_eq!(s.receipt(1).0, ReceiptOutcome::Acked);
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn a_reconnect_resends_everything_pending_in_order() {
        let now = Instant::now();
        let mut s = ProducerState::new(10);
        for w in 0..4 {
            push(&mut s, 1, w, now);
        }
        s.receipt(10);
        let again: Vec<u64> = s.to_resend().map(|p| p.sequence_id).collect();
        assert_eq!(again, vec![11, 12, 13]);
        let payloads: Vec<Bytes> = s.to_resend().map(|p| p.payload.clone()).collect();
        assert_eq!(payloads[0], Bytes::from("11"), "the same bytes go again");
        assert!(s.failed(12).is_some());
        let again: Vec<u64> = s.to_resend().map(|p| p.sequence_id).collect();
        assert_eq!(again, vec![11, 13]);
    }

    #[test]
    fn old_entries_time_out_from_the_front() {
        let t0 = Instant::now();
        let mut s = ProducerState::new(0);
        push(&mut s, 1, 0, t0);
        push(&mut s, 1, 1, t0 + Duration::from_secs(5));
        let gone = s.expired(t0 + Duration::from_secs(30), Duration::from_secs(30));
        assert_eq!(gone.len(), 1);
        assert_eq!(s.len(), 1);
        assert_eq!(s.drain().len(), 1);
        assert!(s.is_empty());
    }
}

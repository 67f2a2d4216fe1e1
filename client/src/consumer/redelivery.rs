//! Which messages a consumer asks the broker to send again, without I/O:
//! negatively acknowledged ones once the nack delay has passed, and — with
//! an ack timeout — ones handed to the application and not acknowledged in
//! time. Entries are `(part, ledger, entry)`: a batch is redelivered whole,
//! as Pulsar does. The time comes in as an argument.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

/// An entry of one of the consumer's topics: (part index, ledger, entry).
pub type Entry = (usize, u64, u64);

#[derive(Debug)]
pub struct Redelivery {
    nack_delay: Duration,
    ack_timeout: Option<Duration>,
    /// Negatively acknowledged, by when to redeliver.
    nacked: BTreeSet<(Instant, Entry)>,
    /// Handed out under an ack timeout: entry -> deadline.
    unacked: HashMap<Entry, Instant>,
}

impl Redelivery {
    pub fn new(nack_delay: Duration, ack_timeout: Option<Duration>) -> Redelivery {
        Redelivery {
            nack_delay,
            ack_timeout: ack_timeout.filter(|t| !t.is_zero()),
            nacked: BTreeSet::new(),
            unacked: HashMap::new(),
        }
    }

    /// A message of `e` was handed to the application.
    pub fn received(&mut self, e: Entry, now: Instant) {
        if let Some(t) = self.ack_timeout {
            self.unacked.entry(e).or_insert(now + t);
        }
    }

    /// `e` is acknowledged (wholly, for a batch).
    pub fn acked(&mut self, e: Entry) {
        self.unacked.remove(&e);
    }

    /// Everything of `part` up to and including (ledger, entry) is acked.
    pub fn acked_through(&mut self, part: usize, ledger: u64, entry: u64) {
        self.unacked
            .retain(|&(p, l, en), _| p != part || (l, en) > (ledger, entry));
    }

    /// `e` was negatively acknowledged: redeliver it after the nack delay.
    pub fn nacked(&mut self, e: Entry, now: Instant) {
        self.nacked_after(e, now, self.nack_delay);
    }

    /// `e` was negatively acknowledged: redeliver it after `delay`.
    pub fn nacked_after(&mut self, e: Entry, now: Instant, delay: Duration) {
        self.unacked.remove(&e);
        if !self.nacked.iter().any(|(_, x)| *x == e) {
            self.nacked.insert((now + delay, e));
        }
    }

    /// The part subscribed again: everything of it comes again anyway.
    pub fn subscribed(&mut self, part: usize) {
        self.unacked.retain(|&(p, _, _), _| p != part);
        self.nacked.retain(|(_, (p, _, _))| *p != part);
    }

    /// The entries to redeliver now, each once, in order.
    pub fn due(&mut self, now: Instant) -> Vec<Entry> {
        let mut out = BTreeSet::new();
        while let Some(&(at, e)) = self.nacked.first() {
            if at > now {
                break;
            }
            self.nacked.pop_first();
            out.insert(e);
        }
        self.unacked.retain(|e, at| {
            if *at <= now {
                out.insert(*e);
                false
            } else {
                true
            }
        });
        out.into_iter().collect()
    }

    /// How many entries wait for an ack or a redelivery.
    #[cfg(test)]
    pub fn tracked(&self) -> usize {
        self.nacked.len() + self.unacked.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn nacks_come_due_after_the_delay_once() {
        let t0 = Instant::now();
        let mut r = Redelivery::new(100 * MS, None);
        r.received((0, 1, 1), t0);
        assert_eq!(r.tracked(), 0, "no ack timeout: nothing tracked");
        r.nacked((0, 1, 1), t0);
        r.nacked((0, 1, 1), t0 + 10 * MS);
        r.nacked((1, 1, 2), t0 + 50 * MS);
        assert!(r.due(t0 + 99 * MS).is_empty());
        assert_eq!(r.due(t0 + 100 * MS), vec![(0, 1, 1)]);
        assert_eq!(r.due(t0 + 200 * MS), vec![(1, 1, 2)]);
        assert!(r.due(t0 + 300 * MS).is_empty());
    }

    #[test]
    fn the_ack_timeout_redelivers_what_was_not_acked() {
        let t0 = Instant::now();
        let mut r = Redelivery::new(100 * MS, Some(1000 * MS));
        for e in 0..4 {
            r.received((0, 7, e), t0);
        }
        r.received((0, 7, 0), t0 + 500 * MS); // another message of a batch
        r.acked((0, 7, 1));
        r.acked_through(0, 7, 0);
        r.nacked((0, 7, 2), t0 + 200 * MS);
        assert_eq!(r.due(t0 + 300 * MS), vec![(0, 7, 2)], "nack: sooner");
        assert_eq!(r.due(t0 + 999 * MS), vec![]);
        assert_eq!(r.due(t0 + 1000 * MS), vec![(0, 7, 3)]);
        assert_eq!(r.tracked(), 0);
    }

    #[test]
    fn a_new_subscription_forgets_its_part() {
        let t0 = Instant::now();
        let mut r = Redelivery::new(MS, Some(MS));
        r.received((0, 1, 1), t0);
        r.received((1, 1, 1), t0);
        r.nacked((0, 1, 2), t0);
        r.subscribed(0);
        assert_eq!(r.due(t0 + 10 * MS), vec![(1, 1, 1)]);
    }
}

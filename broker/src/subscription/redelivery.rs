//! `Unacked`: what every dispatcher tracks — the next new entry to read,
//! entries delivered and not yet acknowledged (and to whom), entries due
//! for redelivery, how often each was redelivered, and entries whose
//! delivery is delayed (`deliver_at_time`) until their time.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::dispatcher::{ConsumerKey, Delivery, EntrySource};
use crate::managed_ledger::cursor::Position;

#[derive(Debug, Clone, Default)]
pub struct Unacked {
    /// Next position to read for first delivery.
    read_pos: Position,
    /// Delivered and not yet acked.
    pending: BTreeMap<Position, ConsumerKey>,
    redeliver: BTreeSet<Position>,
    counts: HashMap<Position, u32>,
    /// Delayed entries by the time (ms since the epoch) they are due.
    delayed: BTreeSet<(u64, Position)>,
    delayed_at: HashMap<Position, u64>,
}

/// Most delayed entries a subscription keeps waiting; at the limit it
/// reads no new entries until some are due (nothing is dropped).
pub const MAX_DELAYED: usize = 1_000_000;

impl Unacked {
    pub fn new(read_from: Position) -> Unacked {
        Unacked {
            read_pos: read_from,
            ..Default::default()
        }
    }

    /// The next position to read for a first delivery.
    pub fn read_pos(&self) -> Position {
        self.read_pos
    }

    /// The next entry to deliver: one due for redelivery first, then the
    /// next new one. Entries acknowledged meanwhile are skipped.
    pub fn take_next(&mut self, src: &dyn EntrySource) -> Option<(Position, u32)> {
        while let Some(p) = self.redeliver.pop_first() {
            if !src.is_acked(p) {
                return Some((p, self.counts.get(&p).copied().unwrap_or(0)));
            }
            self.counts.remove(&p);
        }
        if self.delayed.len() >= MAX_DELAYED {
            return None;
        }
        loop {
            let p = src.at_or_after(self.read_pos)?;
            self.read_pos = p.bump();
            if !src.is_acked(p) && !self.pending.contains_key(&p) {
                return Some((p, 0));
            }
        }
    }

    /// The entries that could go next, in the order they should: those due
    /// for redelivery (or held back), then new ones — with their redelivery
    /// counts. Lazy; changes nothing.
    pub fn candidates<'a>(
        &'a self,
        src: &'a dyn EntrySource,
    ) -> impl Iterator<Item = (Position, u32)> + 'a {
        self.candidates_after(src, None)
    }

    /// The `candidates` after `after` (they come in position order).
    pub fn candidates_after<'a>(
        &'a self,
        src: &'a dyn EntrySource,
        after: Option<Position>,
    ) -> impl Iterator<Item = (Position, u32)> + 'a {
        use std::ops::Bound;
        let lower = after.map_or(Bound::Unbounded, Bound::Excluded);
        let due = self
            .redeliver
            .range((lower, Bound::Unbounded))
            .filter(move |p| !src.is_acked(**p))
            .map(|p| (*p, self.counts.get(p).copied().unwrap_or(0)));
        let start = match after {
            Some(a) if a >= self.read_pos => a.bump(),
            _ => self.read_pos,
        };
        let fresh =
            std::iter::successors(src.at_or_after(start), move |p| src.at_or_after(p.bump()))
                .filter(move |p| !src.is_acked(*p) && !self.pending.contains_key(p))
                .map(|p| (p, 0))
                .take(if self.delayed.len() >= MAX_DELAYED {
                    0
                } else {
                    usize::MAX
                });
        due.chain(fresh)
    }

    /// Takes `p`, one of the `candidates`, for delivery. New entries before
    /// it that were passed over stay due (held back: not counted as
    /// redelivered).
    pub fn take(&mut self, p: Position, src: &dyn EntrySource) {
        if self.redeliver.remove(&p) {
            return;
        }
        while let Some(q) = src.at_or_after(self.read_pos) {
            if q > p {
                break;
            }
            self.read_pos = q.bump();
            if q == p {
                break;
            }
            if !src.is_acked(q) && !self.pending.contains_key(&q) {
                self.redeliver.insert(q);
            }
        }
    }

    /// Who holds `p` (delivered, not acknowledged), if anyone.
    pub fn holder(&self, p: Position) -> Option<ConsumerKey> {
        self.pending.get(&p).copied()
    }

    /// The entries delivered and not acknowledged, with their holders.
    pub fn pending(&self) -> impl Iterator<Item = (Position, ConsumerKey)> + '_ {
        self.pending.iter().map(|(p, c)| (*p, *c))
    }

    /// The next entry (see `take_next`) as a delivery to `consumer`.
    pub fn deliver_to(&mut self, consumer: ConsumerKey, src: &dyn EntrySource) -> Option<Delivery> {
        let (position, redelivery_count) = self.take_next(src)?;
        Some(Delivery {
            consumer,
            position,
            redelivery_count,
        })
    }

    pub fn delivered(&mut self, p: Position, to: ConsumerKey) {
        self.pending.insert(p, to);
    }

    /// `p` was taken but not sent: due again, without counting a redelivery.
    pub fn not_delivered(&mut self, p: Position) {
        self.pending.remove(&p);
        self.redeliver.insert(p);
    }

    fn back(&mut self, p: Position) {
        self.pending.remove(&p);
        self.redeliver.insert(p);
        *self.counts.entry(p).or_default() += 1;
    }

    /// Everything `consumer` holds goes back for redelivery.
    pub fn give_back(&mut self, consumer: ConsumerKey) {
        let mine: Vec<Position> = self
            .pending
            .iter()
            .filter(|(_, c)| **c == consumer)
            .map(|(p, _)| *p)
            .collect();
        for p in mine {
            self.back(p);
        }
    }

    /// Those of `positions` that `consumer` holds go back for redelivery.
    pub fn give_back_some(&mut self, consumer: ConsumerKey, positions: &[Position]) {
        for p in positions {
            if self.pending.get(p) == Some(&consumer) {
                self.back(*p);
            }
        }
    }

    /// How often `p` was given back for redelivery.
    pub fn count(&self, p: Position) -> u32 {
        self.counts.get(&p).copied().unwrap_or(0)
    }

    pub fn acked(&mut self, p: Position) {
        self.pending.remove(&p);
        self.redeliver.remove(&p);
        self.counts.remove(&p);
        if let Some(at) = self.delayed_at.remove(&p) {
            self.delayed.remove(&(at, p));
        }
    }

    /// `p` (taken, not sent) waits until `at_ms`; it is not counted as a
    /// redelivery when it goes.
    pub fn delay(&mut self, p: Position, at_ms: u64) {
        self.pending.remove(&p);
        self.redeliver.remove(&p);
        if let Some(old) = self.delayed_at.insert(p, at_ms) {
            self.delayed.remove(&(old, p));
        }
        self.delayed.insert((at_ms, p));
    }

    /// `p` (taken, not sent) waits elsewhere — in the topic's delayed
    /// index — until `release_passed` gives it back.
    pub fn pass_by(&mut self, p: Position) {
        self.pending.remove(&p);
        self.redeliver.remove(&p);
    }

    /// Entries whose delivery time came: those this subscription passed by
    /// (read, not delivered, not acknowledged) become due; the rest —
    /// not read yet, delivered, acknowledged — are not its concern.
    pub fn release_passed(&mut self, due: &[Position], is_acked: impl Fn(Position) -> bool) {
        for &p in due {
            if p < self.read_pos && !self.pending.contains_key(&p) && !is_acked(p) {
                self.redeliver.insert(p);
            }
        }
    }

    /// Delayed entries due at `now_ms` become due for delivery.
    pub fn release_delayed(&mut self, now_ms: u64) {
        while let Some(&(at, p)) = self.delayed.first() {
            if at > now_ms {
                break;
            }
            self.delayed.pop_first();
            self.delayed_at.remove(&p);
            self.redeliver.insert(p);
        }
    }

    /// When the next delayed entry is due (ms since the epoch).
    pub fn next_delayed(&self) -> Option<u64> {
        self.delayed.first().map(|(at, _)| *at)
    }

    /// How many entries wait for their delivery time.
    pub fn delayed(&self) -> usize {
        self.delayed.len()
    }

    pub fn acked_through(&mut self, p: Position) {
        let later = self.pending.split_off(&p.bump());
        for q in std::mem::replace(&mut self.pending, later).into_keys() {
            self.counts.remove(&q);
        }
        let later = self.redeliver.split_off(&p.bump());
        for q in std::mem::replace(&mut self.redeliver, later) {
            self.counts.remove(&q);
        }
        let gone: Vec<Position> = self
            .delayed_at
            .keys()
            .filter(|q| **q <= p)
            .copied()
            .collect();
        for q in gone {
            if let Some(at) = self.delayed_at.remove(&q) {
                self.delayed.remove(&(at, q));
            }
        }
    }

    pub fn rewind(&mut self, next_read: Position) {
        *self = Unacked::new(next_read);
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::Entries;
    use super::*;

    #[test]
    fn delayed_entries_wait_for_their_time_then_go_uncounted() {
        let src = Entries::new(1, 4);
        let mut u = Unacked::new(Position::new(1, 0));
        let (p0, _) = u.take_next(&src).unwrap();
        u.delay(p0, 5_000);
        let (p1, _) = u.take_next(&src).unwrap();
        assert_eq!(p1, Position::new(1, 1), "later entries are not held up");
        u.delivered(p1, (1, 1));
        assert_eq!(u.next_delayed(), Some(5_000));
        u.release_delayed(4_999);
        assert_eq!(u.take_next(&src).unwrap().0, Position::new(1, 2));
        u.release_delayed(5_000);
        assert_eq!(u.next_delayed(), None);
        assert_eq!(
            u.take_next(&src),
            Some((p0, 0)),
            "due now, not a redelivery"
        );
    }

    #[test]
    fn acknowledged_delayed_entries_are_forgotten() {
        let src = Entries::new(1, 3);
        let mut u = Unacked::new(Position::new(1, 0));
        for _ in 0..3 {
            let (p, _) = u.take_next(&src).unwrap();
            u.delay(p, 100 + p.entry_id as u64);
        }
        u.acked(Position::new(1, 1));
        assert_eq!(u.delayed(), 2);
        u.acked_through(Position::new(1, 0));
        assert_eq!(u.delayed(), 1);
        assert_eq!(u.next_delayed(), Some(102));
    }
}

//! `Unacked`: what every dispatcher tracks — the next new entry to read,
//! entries delivered and not yet acknowledged (and to whom), entries due
//! for redelivery, and how often each was redelivered.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::dispatcher::{ConsumerKey, EntrySource};
use crate::managed_ledger::cursor::Position;

#[derive(Debug, Clone, Default)]
pub struct Unacked {
    /// Next position to read for first delivery.
    read_pos: Position,
    /// Delivered and not yet acked.
    pending: BTreeMap<Position, ConsumerKey>,
    redeliver: BTreeSet<Position>,
    counts: HashMap<Position, u32>,
}

impl Unacked {
    pub fn new(read_from: Position) -> Unacked {
        Unacked {
            read_pos: read_from,
            ..Default::default()
        }
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
        let due = self
            .redeliver
            .iter()
            .filter(move |p| !src.is_acked(**p))
            .map(|p| (*p, self.counts.get(p).copied().unwrap_or(0)));
        let fresh = std::iter::successors(src.at_or_after(self.read_pos), move |p| {
            src.at_or_after(p.bump())
        })
        .filter(move |p| !src.is_acked(*p) && !self.pending.contains_key(p))
        .map(|p| (p, 0));
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

    /// How many entries are due again or held back.
    pub fn due(&self) -> usize {
        self.redeliver.len()
    }

    /// Whether `take_next` could return something without new entries.
    pub fn has_redeliveries(&self) -> bool {
        !self.redeliver.is_empty()
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

    pub fn acked(&mut self, p: Position) {
        self.pending.remove(&p);
        self.redeliver.remove(&p);
        self.counts.remove(&p);
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
    }

    pub fn rewind(&mut self, next_read: Position) {
        *self = Unacked::new(next_read);
    }

    /// Entries delivered to `consumer` and not acknowledged.
    pub fn held_by(&self, consumer: ConsumerKey) -> usize {
        self.pending.values().filter(|c| **c == consumer).count()
    }
}

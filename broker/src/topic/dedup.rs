//! Producer deduplication: a message resent with a (producer name,
//! sequence id) the topic already took is stored once and acknowledged with
//! the original message id. Per producer the topic keeps the highest
//! sequence id handed to the ledger ("pushed") and the highest stored
//! ("persisted"), plus the ids of its last `WINDOW` entries.
//!
//! The state survives restarts and failovers: every `SNAPSHOT_EVERY`
//! stored entries it is written as the properties of the `pulsar.dedup`
//! cursor, whose mark-delete is the last entry the snapshot covers (so the
//! ledgers after it are kept); loading replays the entries after it.
//!
//! `Dedup` is I/O-free; the topic calls it around its appends.

use std::collections::{BTreeMap, HashMap, VecDeque};

use crate::managed_ledger::cursor::Position;
use crate::managed_ledger::{AppendDone, MlError};

/// The cursor whose state holds the snapshot (Pulsar's name).
pub const CURSOR: &str = "pulsar.dedup";
/// Stored entries between two snapshots.
pub const SNAPSHOT_EVERY: u64 = 1_000;
/// Entries per producer whose ids a duplicate is answered with (a client
/// resends at most its pending messages, 1,000 by default).
pub const WINDOW: usize = 1_024;
/// Producers tracked per topic; past it the least recently active one is
/// forgotten (its late duplicates would be stored again).
pub const MAX_PRODUCERS: usize = 10_000;

/// What a send is.
#[derive(Debug, PartialEq, Eq)]
pub enum Check {
    /// New: append it.
    New,
    /// Stored already: answer with this id (`None`: older than the window).
    Stored(Option<Position>),
    /// Its original is still being stored: answer when it is.
    InFlight,
}

struct ProducerSeq {
    pushed: i64,
    persisted: i64,
    /// (first sequence id, highest sequence id, position) of recent entries.
    recent: VecDeque<(u64, u64, Position)>,
    /// Duplicates of entries in flight: (sequence id, their answer).
    waiting: Vec<(u64, AppendDone)>,
    last_active: u64,
}

impl Default for ProducerSeq {
    /// Nothing sent yet: sequence ids start at 0.
    fn default() -> ProducerSeq {
        ProducerSeq {
            pushed: -1,
            persisted: -1,
            recent: VecDeque::new(),
            waiting: Vec::new(),
            last_active: 0,
        }
    }
}

#[derive(Default)]
pub struct Dedup {
    producers: HashMap<String, ProducerSeq>,
    /// Entries stored since the last snapshot.
    since_snapshot: u64,
    /// The last stored entry (what a snapshot covers).
    last_stored: Option<Position>,
    clock: u64,
}

impl Dedup {
    /// The state of a snapshot: each producer's highest stored sequence id.
    pub fn from_snapshot(snapshot: &BTreeMap<String, i64>) -> Dedup {
        let mut d = Dedup::default();
        for (name, seq) in snapshot {
            let p = d.producer(name);
            p.pushed = *seq;
            p.persisted = *seq;
        }
        d
    }

    fn producer(&mut self, name: &str) -> &mut ProducerSeq {
        self.clock += 1;
        let clock = self.clock;
        if !self.producers.contains_key(name) && self.producers.len() >= MAX_PRODUCERS {
            let idle = self
                .producers
                .iter()
                .filter(|(_, p)| p.waiting.is_empty())
                .min_by_key(|(_, p)| p.last_active)
                .map(|(n, _)| n.clone());
            if let Some(idle) = idle {
                self.producers.remove(&idle);
            }
        }
        let p = self.producers.entry(name.to_string()).or_default();
        p.last_active = clock;
        p
    }

    /// A send of `[seq, highest]` by `producer`: new ones are marked pushed.
    pub fn check(&mut self, producer: &str, seq: u64, highest: u64) -> Check {
        let p = self.producer(producer);
        if (seq as i64) > p.pushed {
            p.pushed = highest.max(seq) as i64;
            return Check::New;
        }
        if (seq as i64) > p.persisted {
            return Check::InFlight;
        }
        let id = p
            .recent
            .iter()
            .rev()
            .find(|(first, last, _)| *first <= seq && seq <= *last)
            .map(|(_, _, pos)| *pos);
        Check::Stored(id)
    }

    /// Answers a duplicate of an entry in flight once that entry is stored.
    pub fn wait(&mut self, producer: &str, seq: u64, done: AppendDone) {
        self.producer(producer).waiting.push((seq, done));
    }

    /// `[seq, highest]` of `producer` was stored at `pos`; returns the
    /// duplicates it answers.
    pub fn stored(
        &mut self,
        producer: &str,
        seq: u64,
        highest: u64,
        pos: Position,
    ) -> Vec<AppendDone> {
        self.since_snapshot += 1;
        self.last_stored = Some(self.last_stored.map_or(pos, |l| l.max(pos)));
        let p = self.producer(producer);
        let highest = highest.max(seq);
        p.persisted = p.persisted.max(highest as i64);
        p.recent.push_back((seq, highest, pos));
        if p.recent.len() > WINDOW {
            p.recent.pop_front();
        }
        let (answered, left): (Vec<_>, Vec<_>) = std::mem::take(&mut p.waiting)
            .into_iter()
            .partition(|(s, _)| *s <= highest);
        p.waiting = left;
        answered.into_iter().map(|(_, d)| d).collect()
    }

    /// Storing `[seq, ..]` failed: the producer may send it again (it is
    /// no longer "pushed"); duplicates waiting on it fail too.
    pub fn failed(&mut self, producer: &str, seq: u64) -> Vec<AppendDone> {
        let p = self.producer(producer);
        p.pushed = p.persisted;
        let (failed, left): (Vec<_>, Vec<_>) = std::mem::take(&mut p.waiting)
            .into_iter()
            .partition(|(s, _)| *s >= seq);
        p.waiting = left;
        failed.into_iter().map(|(_, d)| d).collect()
    }

    /// An entry read back while recovering: its producer's sequence ids.
    pub fn replayed(&mut self, producer: &str, seq: u64, highest: u64, pos: Position) {
        let _ = self.stored(producer, seq, highest, pos);
        let p = self.producer(producer);
        p.pushed = p.persisted;
    }

    /// The producer's highest stored sequence id (-1: none), which
    /// PRODUCER_SUCCESS reports so a client resumes after it.
    pub fn last_sequence(&self, producer: &str) -> i64 {
        self.producers.get(producer).map_or(-1, |p| p.persisted)
    }

    /// A snapshot is due: what it holds and the entry it covers.
    pub fn take_snapshot(&mut self, force: bool) -> Option<(Position, BTreeMap<String, i64>)> {
        if !force && self.since_snapshot < SNAPSHOT_EVERY {
            return None;
        }
        let at = self.last_stored?;
        self.since_snapshot = 0;
        let map = self
            .producers
            .iter()
            .filter(|(_, p)| p.persisted >= 0)
            .map(|(n, p)| (n.clone(), p.persisted))
            .collect();
        Some((at, map))
    }

    /// Fails every waiting duplicate (the topic closes; the client resends
    /// to the next owner).
    pub fn close(&mut self) {
        for p in self.producers.values_mut() {
            for (_, done) in p.waiting.drain(..) {
                done(Err(MlError::Closed(String::new())));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    fn pos(e: i64) -> Position {
        Position::new(7, e)
    }

    #[test]
    fn a_resend_is_answered_with_the_original_id() {
        let mut d = Dedup::default();
        assert_eq!(d.check("p", 0, 0), Check::New);
        assert_eq!(d.check("p", 1, 1), Check::New);
        assert!(d.stored("p", 0, 0, pos(0)).is_empty());
        assert_eq!(d.check("p", 0, 0), Check::Stored(Some(pos(0))));
        assert_eq!(d.check("p", 1, 1), Check::InFlight);
        d.stored("p", 1, 1, pos(1));
        assert_eq!(d.check("p", 1, 1), Check::Stored(Some(pos(1))));
        assert_eq!(d.check("q", 0, 0), Check::New, "per producer");
        assert_eq!(d.last_sequence("p"), 1);
        assert_eq!(d.last_sequence("nobody"), -1);
    }

    #[test]
    fn batches_cover_their_sequence_range() {
        let mut d = Dedup::default();
        assert_eq!(d.check("p", 10, 19), Check::New);
        d.stored("p", 10, 19, pos(3));
        assert_eq!(d.check("p", 15, 15), Check::Stored(Some(pos(3))));
        assert_eq!(d.check("p", 20, 29), Check::New);
    }

    #[test]
    fn a_duplicate_in_flight_is_answered_when_its_original_is_stored() {
        let mut d = Dedup::default();
        assert_eq!(d.check("p", 5, 5), Check::New);
        let got = Arc::new(Mutex::new(None));
        let g = got.clone();
        d.wait("p", 5, Box::new(move |r| *g.lock().unwrap() = Some(r.ok())));
        let answered = d.stored("p", 5, 5, pos(9));
        assert_eq!(answered.len(), 1);
        for done in answered {
            done(Ok(pos(9)));
        }
        assert_eq!(*got.lock().unwrap(), Some(Some(pos(9))));
    }

    #[test]
    fn after_a_failure_the_same_sequence_is_new_again() {
        let mut d = Dedup::default();
        d.check("p", 0, 0);
        d.stored("p", 0, 0, pos(0));
        assert_eq!(d.check("p", 1, 1), Check::New);
        assert!(d.failed("p", 1).is_empty());
        assert_eq!(d.check("p", 1, 1), Check::New, "resent after the failure");
    }

    #[test]
    fn snapshots_every_so_many_entries_and_restore() {
        let mut d = Dedup::default();
        for i in 0..SNAPSHOT_EVERY {
            d.check("p", i, i);
            d.stored("p", i, i, pos(i as i64));
            if i + 1 < SNAPSHOT_EVERY {
                assert!(d.take_snapshot(false).is_none());
            }
        }
        let (at, map) = d.take_snapshot(false).unwrap();
        assert_eq!(at, pos(SNAPSHOT_EVERY as i64 - 1));
        assert_eq!(map.get("p"), Some(&(SNAPSHOT_EVERY as i64 - 1)));
        let mut back = Dedup::from_snapshot(&map);
        assert!(matches!(back.check("p", 3, 3), Check::Stored(None)));
        back.replayed("p", SNAPSHOT_EVERY, SNAPSHOT_EVERY, pos(2000));
        assert_eq!(
            back.check("p", SNAPSHOT_EVERY, SNAPSHOT_EVERY),
            Check::Stored(Some(pos(2000)))
        );
        assert_eq!(
            back.check("p", SNAPSHOT_EVERY + 1, SNAPSHOT_EVERY + 1),
            Check::New
        );
    }

    #[test]
    fn producers_are_bounded() {
        let mut d = Dedup::default();
        for i in 0..MAX_PRODUCERS + 5 {
            d.check(&format!("p{i}"), 0, 0);
        }
        assert_eq!(d.producers.len(), MAX_PRODUCERS);
        assert_eq!(d.check("p0", 0, 0), Check::New, "the oldest was forgotten");
    }
}

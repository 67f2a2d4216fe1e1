//! The in-memory index: where each (ledger, entry) is — a journal segment
//! or an entry-log run — and every ledger's key, fence and LAC.

use std::fs::File;
use std::sync::Arc;

use magnetar_proto::ledger::MasterKey;
use rustc_hash::FxHashMap;

use super::entry_index::Run;
use super::entry_map::EntryMap;

#[derive(Debug, Clone, Copy)]
pub(super) struct Location {
    pub(super) segment: u64,
    /// Offset of the payload in the segment.
    pub(super) offset: u64,
    pub(super) len: u32,
    pub(super) lac: i64,
    pub(super) digest: u32,
}

#[derive(Debug)]
pub(super) struct LedgerIndex {
    pub(super) master_key: Option<MasterKey>,
    pub(super) fenced: bool,
    pub(super) lac: i64,
    /// Highest entry id stored, or -1.
    pub(super) last: i64,
    /// Adds still in the journal, each where it is (the checkpoint moves
    /// them to an entry log).
    pub(super) journaled: EntryMap<Location>,
    /// Where the rest are: runs of entry-log indexes, oldest first. An
    /// entry held in more than one place is the journal's copy, else the
    /// latest run's.
    pub(super) runs: Vec<Run>,
}

impl Default for LedgerIndex {
    fn default() -> Self {
        LedgerIndex {
            master_key: None,
            fenced: false,
            lac: -1,
            last: -1,
            journaled: EntryMap::default(),
            runs: Vec::new(),
        }
    }
}

#[derive(Default)]
pub(super) struct Index {
    pub(super) ledgers: FxHashMap<u64, LedgerIndex>,
    /// Journal segments and entry logs, open for reading.
    pub(super) segments: FxHashMap<u64, Arc<File>>,
    /// Entry logs' `.eidx` files, open for reading.
    pub(super) entry_indexes: FxHashMap<u64, Arc<File>>,
    /// Adds indexed in the journal since the last checkpoint took them:
    /// (ledger, entry, where in the journal) — what the next checkpoint
    /// moves. Kept in journal order (the checkpoint bisects it).
    pub(super) unflushed: Vec<(u64, u64, Location)>,
    /// Per file (journal segment or entry log): how many indexed entries it
    /// holds and their payload bytes — for an entry log, counted by run, so
    /// an entry re-written since stays counted (compaction errs towards
    /// keeping). A file absent here holds nothing live.
    pub(super) live: FxHashMap<u64, (u64, u64)>,
}

impl Index {
    /// The ledger's index, created on first use.
    pub(super) fn ledger(&mut self, id: u64) -> &mut LedgerIndex {
        self.ledgers.entry(id).or_default()
    }

    /// A run of an entry log for `ledger`, if the ledger is still here (one
    /// deleted since the log was written leaves its entries as garbage).
    pub(super) fn add_run(&mut self, ledger: u64, run: Run) {
        let Some(l) = self.ledgers.get_mut(&ledger) else {
            return;
        };
        l.last = l.last.max(run.last as i64);
        l.runs.push(run);
        self.count(run.log, run.count, run.bytes);
    }

    /// An add the journal made durable at `loc`: indexed there, the
    /// ledger's key and LAC taken from it, and listed for the next
    /// checkpoint — with one lookup of the ledger.
    pub(super) fn journaled(&mut self, ledger: u64, entry: u64, loc: Location, key: MasterKey) {
        let l = self.ledger(ledger);
        l.master_key.get_or_insert(key);
        l.lac = l.lac.max(loc.lac);
        l.last = l.last.max(entry as i64);
        if let Some(old) = l.journaled.insert(entry, loc) {
            self.unref(old.segment, 1, old.len as u64);
        }
        self.count(loc.segment, 1, loc.len as u64);
        self.unflushed.push((ledger, entry, loc));
    }

    /// Forgets the journal's copy of (ledger, entry) if it is still the one
    /// at `old` (nothing re-wrote or deleted it meanwhile) — the checkpoint
    /// has put it in an entry log; says whether it did.
    pub(super) fn unjournal(&mut self, ledger: u64, entry: u64, old: &Location) -> bool {
        let Some(l) = self.ledgers.get_mut(&ledger) else {
            return false;
        };
        // One look-up in the usual case; a copy written since goes back.
        match l.journaled.remove(entry) {
            Some(loc) if loc.segment == old.segment && loc.offset == old.offset => {
                self.unref(old.segment, 1, old.len as u64);
                true
            }
            Some(newer) => {
                l.journaled.insert(entry, newer);
                false
            }
            None => false,
        }
    }

    /// Forgets the ledger's runs in `logs` (compaction copied their
    /// entries to the journal).
    pub(super) fn drop_runs(&mut self, ledger: u64, logs: &std::collections::HashSet<u64>) {
        let Some(l) = self.ledgers.get_mut(&ledger) else {
            return;
        };
        let mut gone = Vec::new();
        l.runs.retain(|r| {
            let keep = !logs.contains(&r.log);
            if !keep {
                gone.push(*r);
            }
            keep
        });
        for r in gone {
            self.unref(r.log, r.count, r.bytes);
        }
    }

    pub(super) fn count(&mut self, file: u64, entries: u64, bytes: u64) {
        let r = self.live.entry(file).or_default();
        r.0 += entries;
        r.1 += bytes;
    }

    fn unref(&mut self, file: u64, entries: u64, bytes: u64) {
        if let Some(r) = self.live.get_mut(&file) {
            r.0 -= entries.min(r.0);
            r.1 -= bytes.min(r.1);
            if r.0 == 0 {
                self.live.remove(&file);
            }
        }
    }

    pub(super) fn drop_ledger(&mut self, id: u64) {
        if let Some(l) = self.ledgers.remove(&id) {
            for loc in l.journaled.into_values() {
                self.unref(loc.segment, 1, loc.len as u64);
            }
            for r in l.runs {
                self.unref(r.log, r.count, r.bytes);
            }
        }
    }
}

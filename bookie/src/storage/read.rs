//! Reads: single entries and ranges, from the tail cache, a journal
//! segment or an entry log.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use bytes::Bytes;
use magnetar_proto::ledger::BookieErrorCode;

use super::entry_index::{self, Run};
use super::index::Location;
use super::replay::check_digest;
use super::{Storage, StoredEntry, ENTRY_LOG};

/// A range read takes entries of an entry log in one read when at most this
/// many bytes lie between them…
const RANGE_READ_GAP: u64 = 4096;
/// …and the read stays within this many bytes.
const RANGE_READ_SPAN: u64 = 2 * 1024 * 1024;

impl Storage {
    /// Where (ledger, entry) is, with its file: the journal's copy, else
    /// the latest entry-log run's (looked up in the log's index file, or in
    /// `block`, the index records the last look-up read).
    fn locate(
        &self,
        ledger_id: u64,
        entry_id: u64,
        block: &mut entry_index::Block,
    ) -> Result<(Location, Arc<File>), BookieErrorCode> {
        let candidates: Vec<(Run, Arc<File>, Arc<File>)> = {
            let g = self.index.read().unwrap_or_else(|e| e.into_inner());
            let l = g
                .ledgers
                .get(&ledger_id)
                .ok_or(BookieErrorCode::NoSuchLedger)?;
            if let Some(loc) = l.journaled.get(entry_id) {
                let file = g.segments.get(&loc.segment).cloned();
                return Ok((*loc, file.ok_or(BookieErrorCode::Io)?));
            }
            l.runs
                .iter()
                .rev()
                .filter(|r| r.first <= entry_id && entry_id <= r.last)
                .filter_map(|r| {
                    let idx = g.entry_indexes.get(&r.log)?.clone();
                    Some((*r, idx, g.segments.get(&r.log)?.clone()))
                })
                .collect()
        };
        for (run, idx, log) in candidates {
            match entry_index::find(&idx, ledger_id, &run, entry_id, block) {
                Ok(Some(r)) => {
                    let loc = Location {
                        segment: run.log,
                        offset: r.offset,
                        len: r.len,
                        lac: r.lac,
                        digest: r.digest,
                    };
                    return Ok((loc, log));
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::error!(ledger_id, entry_id, log = run.log & !ENTRY_LOG, error = %e, "entry index read failed");
                    return Err(BookieErrorCode::Io);
                }
            }
        }
        Err(BookieErrorCode::NoSuchEntry)
    }

    pub fn read(&self, ledger_id: u64, entry_id: u64) -> Result<StoredEntry, BookieErrorCode> {
        self.read_with(ledger_id, entry_id, &mut entry_index::Block::default())
    }

    /// [`Storage::read`], looking in `block` first for the entry's index
    /// record (and leaving there what it read).
    fn read_with(
        &self,
        ledger_id: u64,
        entry_id: u64,
        block: &mut entry_index::Block,
    ) -> Result<StoredEntry, BookieErrorCode> {
        let (loc, file) = self.locate(ledger_id, entry_id, block)?;
        let payload = self.payload_at(ledger_id, entry_id, &loc, &file)?;
        Ok(StoredEntry {
            lac: loc.lac,
            payload,
            digest: loc.digest,
        })
    }

    /// The payload at `loc` (from the tail cache when it holds it), its
    /// digest checked.
    fn payload_at(
        &self,
        ledger_id: u64,
        entry_id: u64,
        loc: &Location,
        file: &File,
    ) -> Result<Bytes, BookieErrorCode> {
        let mut buf = vec![0u8; loc.len as usize];
        if loc.segment & ENTRY_LOG != 0 || !self.cache.copy(loc.segment, loc.offset, &mut buf) {
            file.read_exact_at(&mut buf, loc.offset).map_err(|e| {
                tracing::error!(ledger_id, entry_id, error = %e, "journal read failed");
                BookieErrorCode::Io
            })?;
        }
        let payload = Bytes::from(buf);
        check_digest(ledger_id, entry_id, loc, &payload)?;
        Ok(payload)
    }

    /// Entries `first`, `first + step`, … up to `last` of a ledger, in
    /// order: those held from `first` on, ending before the first that
    /// cannot be read (its error if that is `first`), at `max_entries`, or
    /// once the payloads reach `max_bytes` (one entry at least). Entries
    /// side by side in an entry log (as a run's are) come in one read.
    pub fn read_range(
        &self,
        ledger_id: u64,
        first: u64,
        last: u64,
        step: u64,
        max_bytes: u64,
        max_entries: usize,
    ) -> Result<Vec<(u64, StoredEntry)>, BookieErrorCode> {
        // Where each is first (one read of the index serves a block of
        // entries), then their payloads.
        let mut block = entry_index::Block::default();
        let mut places: Vec<(u64, Location, Arc<File>)> = Vec::new();
        let mut bytes = 0u64;
        let mut stopped = None;
        let mut e = first;
        while e <= last && bytes < max_bytes && places.len() < max_entries.max(1) {
            match self.locate(ledger_id, e, &mut block) {
                Ok((loc, file)) => {
                    bytes += loc.len as u64;
                    places.push((e, loc, file));
                }
                Err(code) => {
                    stopped = Some(code);
                    break;
                }
            }
            match e.checked_add(step.max(1)) {
                Some(next) => e = next,
                None => break,
            }
        }
        if places.is_empty() {
            return stopped.map_or(Ok(Vec::new()), Err);
        }
        let mut out = Vec::with_capacity(places.len());
        let mut i = 0;
        while i < places.len() {
            let (entry, at, file) = &places[i];
            // The stretch of entries that follow each other in one entry
            // log, or nearly: a small gap (another stripe's entry between
            // two of this one's) costs less read along than a read more.
            let mut j = i + 1;
            let mut end = at.offset + at.len as u64;
            if at.segment & ENTRY_LOG != 0 {
                while let Some((_, next, _)) = places.get(j) {
                    let close = next.segment == at.segment
                        && next.offset >= end
                        && next.offset - end <= RANGE_READ_GAP
                        && next.offset + next.len as u64 - at.offset <= RANGE_READ_SPAN;
                    if !close {
                        break;
                    }
                    end = next.offset + next.len as u64;
                    j += 1;
                }
            }
            // What was read of the stretch, and what ended it early.
            let mut got = Vec::with_capacity(j - i);
            let mut failed = None;
            if j == i + 1 {
                match self.payload_at(ledger_id, *entry, at, file) {
                    Ok(p) => got.push((*entry, *at, p)),
                    Err(code) => failed = Some(code),
                }
            } else {
                let mut buf = vec![0u8; (end - at.offset) as usize];
                match file.read_exact_at(&mut buf, at.offset) {
                    Ok(()) => {
                        let data = Bytes::from(buf);
                        for (e, loc, _) in &places[i..j] {
                            let from = (loc.offset - at.offset) as usize;
                            let payload = data.slice(from..from + loc.len as usize);
                            if let Err(code) = check_digest(ledger_id, *e, loc, &payload) {
                                failed = Some(code);
                                break;
                            }
                            got.push((*e, *loc, payload));
                        }
                    }
                    Err(err) => {
                        tracing::error!(ledger_id, entry_id = entry, error = %err, "entry log read failed");
                        failed = Some(BookieErrorCode::Io);
                    }
                }
            }
            out.extend(got.into_iter().map(|(e, loc, payload)| {
                let s = StoredEntry {
                    lac: loc.lac,
                    payload,
                    digest: loc.digest,
                };
                (e, s)
            }));
            if let Some(code) = failed {
                if out.is_empty() {
                    return Err(code);
                }
                break;
            }
            i = j;
        }
        Ok(out)
    }

    /// (LAC, last stored entry or -1) of a ledger.
    pub fn lac(&self, ledger_id: u64) -> Result<(i64, i64), BookieErrorCode> {
        let g = self.index.read().unwrap_or_else(|e| e.into_inner());
        let l = g
            .ledgers
            .get(&ledger_id)
            .ok_or(BookieErrorCode::NoSuchLedger)?;
        Ok((l.lac, l.last))
    }
}

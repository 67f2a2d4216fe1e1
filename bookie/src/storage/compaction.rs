//! Garbage collection: deleted ledgers are recorded durably; mostly-dead
//! segments and entry logs have their live entries copied to the journal's
//! head and are removed.

use std::fs::File;

use magnetar_proto::ledger::{AddRequest, BookieErrorCode};
use tokio::sync::oneshot;

use super::direct_io::DIRECT_ALIGN;
use super::entry_index;
use super::entry_log::INDEX_UPDATE_SLICE;
use super::{entry_index_path, segment_path, CompactStats, Request, Storage, ENTRY_LOG};

/// Entries compaction moves per journal request.
const COMPACT_BATCH: usize = 1024;

impl Storage {
    /// Forgets `ledgers` durably: their entries become garbage for `compact`.
    pub async fn delete_ledgers(&self, ledgers: Vec<u64>) -> Result<(), BookieErrorCode> {
        if ledgers.is_empty() {
            return Ok(());
        }
        let (done, rx) = oneshot::channel();
        self.tx
            .send(Request::Delete { ledgers, done })
            .await
            .map_err(|_| BookieErrorCode::Io)?;
        rx.await.map_err(|_| BookieErrorCode::Io)?
    }

    /// Removes every closed segment whose share of garbage is at least
    /// `min_garbage` (0.0–1.0), after copying its live entries to the head of
    /// the journal and re-recording every fence (a fence record may live in
    /// a removed segment).
    pub async fn compact(&self, min_garbage: f64) -> Result<CompactStats, BookieErrorCode> {
        let _one = self.maintenance.lock().await;
        let (victims, ledger_ids) = {
            let g = self.index.read().unwrap_or_else(|e| e.into_inner());
            let active = g
                .segments
                .keys()
                .copied()
                .filter(|k| k & ENTRY_LOG == 0)
                .max()
                .unwrap_or(0);
            // Journal segments from the first add not yet checkpointed on:
            // the next checkpoint copies their adds once and frees them;
            // compacting them would copy those adds twice.
            let pending_from = g
                .unflushed
                .first()
                .map(|(_, _, loc)| loc.segment)
                .filter(|_| {
                    self.checkpointing
                        .load(std::sync::atomic::Ordering::Relaxed)
                })
                .unwrap_or(u64::MAX);
            let mut victims = Vec::new();
            for (seg, file) in &g.segments {
                if seg & ENTRY_LOG == 0 && *seg >= pending_from {
                    continue;
                }
                let total = file.metadata().map(|m| m.len()).unwrap_or(0);
                let used = g.live.get(seg).map(|r| r.1).unwrap_or(0);
                // An entry log's last block may be padding (O_DIRECT), not garbage.
                let garbage = (total - used.min(total)).saturating_sub(DIRECT_ALIGN as u64);
                if *seg != active && total > 0 && garbage as f64 >= min_garbage * total as f64 {
                    victims.push((*seg, total));
                }
            }
            (victims, g.ledgers.keys().copied().collect::<Vec<u64>>())
        };
        if victims.is_empty() {
            return Ok(CompactStats::default());
        }
        // Which entries live in the victims: the journal's part of the
        // index is scanned a slice at a time, so that adds (which index
        // under the same lock) are not held up behind millions of entries;
        // the victim entry logs' runs are read from their index files.
        let set: std::collections::HashSet<u64> = victims.iter().map(|(s, _)| *s).collect();
        let mut moves = Vec::new();
        let mut fences = Vec::new();
        // Ledgers whose runs in the victims are moved (the rest keep theirs
        // and so their files).
        let mut emptied = Vec::new();
        for id in ledger_ids {
            let mut from = 0u64;
            let mut runs = Vec::new();
            let mut key = None;
            loop {
                let g = self.index.read().unwrap_or_else(|e| e.into_inner());
                let Some(l) = g.ledgers.get(&id) else { break };
                if from == 0 {
                    key = l.master_key;
                    if l.fenced {
                        if let Some(k) = l.master_key {
                            fences.push((id, k));
                        }
                    }
                    runs = l
                        .runs
                        .iter()
                        .filter(|r| set.contains(&r.log))
                        .filter_map(|r| Some((*r, g.entry_indexes.get(&r.log)?.clone())))
                        .collect();
                }
                let mut next = None;
                for (n, (e, loc)) in l.journaled.range_from(from).enumerate() {
                    if n == INDEX_UPDATE_SLICE {
                        next = Some(e);
                        break;
                    }
                    if set.contains(&loc.segment) {
                        moves.push((id, e, l.master_key));
                    }
                }
                match next {
                    Some(e) => from = e,
                    None => break,
                }
            }
            let Some(key) = key.filter(|_| !runs.is_empty()) else {
                continue; // nothing there, or no key to re-add with: its files stay
            };
            for (run, file) in &runs {
                // Each entry once (the run lists a re-written one twice);
                // `read` below takes whichever copy is current.
                let mut last = None;
                entry_index::visit(file, run, |r| {
                    if last != Some(r.entry) {
                        moves.push((id, r.entry, Some(key)));
                        last = Some(r.entry);
                    }
                })
                .map_err(|e| {
                    tracing::error!(log = run.log, error = %e, "compaction: reading an entry index failed");
                    BookieErrorCode::Io
                })?;
            }
            emptied.push(id);
        }
        let mut stats = CompactStats::default();
        // Moved in batches: one journal request (and group commit) per
        // batch rather than one fsync per entry.
        let mut batch = Vec::with_capacity(COMPACT_BATCH);
        let mut moves = moves.into_iter().peekable();
        while let Some((ledger, entry, key)) = moves.next() {
            if let Some(key) = key {
                match self.read(ledger, entry) {
                    Ok(e) => batch.push(AddRequest {
                        ledger_id: ledger,
                        entry_id: entry,
                        master_key: key,
                        lac: e.lac,
                        payload: e.payload,
                        digest: e.digest,
                        recovery: true,
                    }),
                    // Deleted meanwhile.
                    Err(BookieErrorCode::NoSuchLedger | BookieErrorCode::NoSuchEntry) => {}
                    Err(e) => return Err(e),
                }
            }
            if batch.len() == COMPACT_BATCH || (moves.peek().is_none() && !batch.is_empty()) {
                let n = batch.len();
                for r in self.add_batch(std::mem::take(&mut batch), |_| Ok(())).await {
                    r?;
                }
                stats.entries_moved += n;
            }
        }
        for (ledger, key) in fences {
            self.fence(ledger, key).await?;
        }
        {
            let mut g = self.index.write().unwrap_or_else(|e| e.into_inner());
            for ledger in emptied {
                g.drop_runs(ledger, &set);
            }
        }
        for (seg, total) in victims {
            let mut g = self.index.write().unwrap_or_else(|e| e.into_inner());
            if g.live.contains_key(&seg) {
                continue;
            }
            g.segments.remove(&seg);
            g.entry_indexes.remove(&seg);
            drop(g);
            if let Err(e) = std::fs::remove_file(segment_path(&self.dir, seg)) {
                tracing::warn!(segment = seg, error = %e, "could not remove a compacted file");
                continue;
            }
            if seg & ENTRY_LOG != 0 {
                let _ = std::fs::remove_file(entry_index_path(&self.dir, seg));
            }
            stats.segments_removed += 1;
            stats.bytes_freed += total;
        }
        if stats.segments_removed > 0 {
            if let Ok(d) = File::open(&self.dir) {
                let _ = d.sync_all();
            }
            tracing::info!(?stats, "journal compacted");
        }
        Ok(stats)
    }
}

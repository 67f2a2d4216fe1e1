//! Checkpoints: the journal position before which every add is in entry
//! logs, and the ledgers' state, so a restart replays only what follows.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::time::Duration;

use magnetar_proto::ledger::{BookieErrorCode, MasterKey};
use tokio::sync::oneshot;

use super::entry_log::move_to_entry_log;
use super::{segment_path, CheckpointStats, Request, Storage, ENTRY_LOG};

pub(super) const CHECKPOINT: &str = "checkpoint";

/// The last checkpoint: every add before (`segment`, `offset`) of the
/// journal is in the listed entry logs, and the ledgers' state is here, so
/// a restart replays only the journal after that point.
#[derive(serde::Serialize, serde::Deserialize, Default)]
pub(super) struct Checkpoint {
    pub(super) segment: u64,
    pub(super) offset: u64,
    /// (ledger, master key, fenced, lac)
    pub(super) ledgers: Vec<(u64, Option<MasterKey>, bool, i64)>,
    pub(super) entry_logs: Vec<u64>,
}

fn write_atomic(dir: &Path, name: &str, data: &[u8]) -> std::io::Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    let mut f = File::create(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join(name))?;
    File::open(dir)?.sync_all()
}

impl Storage {
    pub(super) async fn mark(&self) -> Result<(u64, u64), BookieErrorCode> {
        let (done, rx) = oneshot::channel();
        self.tx
            .send(Request::Mark { done })
            .await
            .map_err(|_| BookieErrorCode::Io)?;
        rx.await.map_err(|_| BookieErrorCode::Io)
    }

    /// Moves every add journaled so far into a new entry log — sorted by
    /// (ledger, entry), with an index file — then records a checkpoint (the
    /// journal position and every ledger's state) and removes the journal
    /// segments before it. A restart then replays only the journal after
    /// the checkpoint.
    pub async fn checkpoint(&self) -> Result<CheckpointStats, BookieErrorCode> {
        self.checkpoint_paced(Duration::ZERO).await
    }

    /// [`Storage::checkpoint`], writing the entry log over about `pace`.
    pub async fn checkpoint_paced(
        &self,
        pace: Duration,
    ) -> Result<CheckpointStats, BookieErrorCode> {
        // The lock holds the memory a checkpoint works in (see `Spare`).
        let mut guard = self.maintenance.lock().await;
        let (seg, off) = self.mark().await?;
        let mut spare = std::mem::take(&mut *guard);
        spare.moving.clear();
        let next_log = {
            let mut g = self.index.write().unwrap_or_else(|e| e.into_inner());
            // Only what was journaled since the last checkpoint, up to the
            // mark; the few after it stay for the next one. (The two lists
            // swap; the list is in journal order, so the mark is found by
            // bisection, not by a pass over millions of adds under the lock.)
            let moving = &mut spare.moving;
            std::mem::swap(&mut g.unflushed, moving);
            let split =
                moving.partition_point(|(_, _, loc)| (loc.segment, loc.offset) < (seg, off));
            g.unflushed.extend_from_slice(&moving[split..]);
            moving.truncate(split);
            g.segments
                .keys()
                .filter(|k| *k & ENTRY_LOG != 0)
                .map(|k| (k & !ENTRY_LOG) + 1)
                .max()
                .unwrap_or(1)
        };
        let log_id = next_log | ENTRY_LOG;
        let (index, dir, cache) = (self.index.clone(), self.dir.clone(), self.cache.clone());
        // The work on millions of adds (filter, sort, copy, re-index) runs
        // on a blocking thread: on a runtime worker it held up the bookie's
        // network traffic for hundreds of milliseconds per checkpoint.
        let (back, moved) = tokio::task::spawn_blocking(move || {
            let moved = move_to_entry_log(&index, &dir, log_id, &mut spare, pace, &cache);
            (spare, moved)
        })
        .await
        .map_err(|_| {
            // The list is lost with the task; its adds stay readable where
            // they are in the journal, whose segments are kept while they
            // hold indexed entries.
            tracing::error!("the entry log writer panicked");
            BookieErrorCode::Io
        })?;
        let mut spare = back;
        let moving = &mut spare.moving;
        let mut stats = CheckpointStats::default();
        match moved {
            Ok(n) => stats.entries_flushed = n,
            Err(e) => {
                // Leave them for the next checkpoint: their journal
                // segments stay until they are in an entry log.
                tracing::error!(error = %e, "writing an entry log failed");
                // Back in front, in journal order (the list stays ordered).
                moving.sort_unstable_by_key(|(_, _, loc)| (loc.segment, loc.offset));
                let mut g = self.index.write().unwrap_or_else(|e| e.into_inner());
                g.unflushed.splice(0..0, moving.iter().copied());
                moving.clear();
                *guard = spare;
                return Err(BookieErrorCode::Io);
            }
        }
        moving.clear();
        *guard = spare;
        // Everything before the mark is in an entry log now.
        self.cache.release_before(seg, off);
        let (cp, removable) = {
            let g = self.index.read().unwrap_or_else(|e| e.into_inner());
            let cp = Checkpoint {
                segment: seg,
                offset: off,
                ledgers: g
                    .ledgers
                    .iter()
                    .map(|(id, l)| (*id, l.master_key, l.fenced, l.lac))
                    .collect(),
                entry_logs: g
                    .segments
                    .keys()
                    .filter(|k| *k & ENTRY_LOG != 0)
                    .map(|k| k & !ENTRY_LOG)
                    .collect(),
            };
            let removable: Vec<u64> = g
                .segments
                .keys()
                .copied()
                .filter(|k| *k & ENTRY_LOG == 0 && *k < seg && !g.live.contains_key(k))
                .collect();
            (cp, removable)
        };
        // File system work (fsyncs, unlinking gigabytes of segments: ~40 ms
        // each) on a blocking thread, not on a runtime worker.
        let (index, dir) = (self.index.clone(), self.dir.clone());
        let removed = tokio::task::spawn_blocking(move || {
            let bytes = bincode::serialize(&cp).map_err(std::io::Error::other)?;
            write_atomic(&dir, CHECKPOINT, &bytes)?;
            let mut removed = 0;
            for k in removable {
                index
                    .write()
                    .unwrap_or_else(|e| e.into_inner())
                    .segments
                    .remove(&k);
                if std::fs::remove_file(segment_path(&dir, k)).is_ok() {
                    removed += 1;
                }
            }
            Ok::<usize, std::io::Error>(removed)
        })
        .await
        .map_err(|_| BookieErrorCode::Io)?
        .map_err(|e| {
            tracing::error!(error = %e, "writing the checkpoint failed");
            BookieErrorCode::Io
        })?;
        stats.journal_segments_removed = removed;
        self.checkpointing
            .store(true, std::sync::atomic::Ordering::Relaxed);
        Ok(stats)
    }
}

//! The bookie's storage engine, behind the [`Storage`] handle: one
//! sequential journal for the adds and fences of every ledger, written by a
//! single thread that group-commits (`journal_writer.rs`) — it takes every
//! request waiting, writes them in one go, makes them durable with one
//! `fdatasync`, and only then answers each of them. Where the file system
//! allows it the journal is written with `O_DIRECT` (`direct_io.rs`; each
//! group padded to the block size with a record replay skips, `record.rs`):
//! the page cache would cost a kernel copy and page allocations per byte,
//! more CPU than the rest of the write path.
//!
//! An in-memory index (`index.rs`) maps (ledger, entry) to a position in a
//! journal segment or an entry log; it is rebuilt at start from the last
//! checkpoint (entry-log indexes, `entry_index.rs`) and the journal tail
//! (`replay.rs`), and a torn tail (a crash during a write) is cut off there.
//! `checkpoint` (`checkpoint.rs`) moves journaled adds into entry logs
//! sorted by ledger (`entry_log.rs`) and frees the journal segments. Reads
//! (`read.rs`) come from the unflushed tail in memory (`tail_cache.rs`), a
//! journal segment or an entry log.
//!
//! Garbage collection (`compaction.rs`): `delete_ledgers` records deletions
//! (a `DELETE` record, so a restart does not bring them back) and drops them
//! from the index; `compact` copies the live entries of mostly-dead segments
//! and entry logs to the head of the journal and removes those files, so
//! disk use follows live data.

mod checkpoint;
mod compaction;
mod direct_io;
mod entry_index;
mod entry_log;
mod entry_map;
mod index;
mod journal_writer;
mod read;
mod record;
mod replay;
pub mod tail_cache;
#[cfg(test)]
mod tests;

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use magnetar_proto::ledger::{entry_digest, AddRequest, BookieErrorCode, MasterKey};
use rustc_hash::FxHashMap;
use tokio::sync::{mpsc, oneshot};

use checkpoint::{Checkpoint, CHECKPOINT};
use direct_io::{AlignedBuf, DIRECT_ALIGN};
use entry_log::Spare;
use index::{Index, LedgerIndex};
use journal_writer::{open_segment, Writer};
use replay::replay_file;
use tail_cache::{TailCache, DEFAULT_CACHE_BYTES};

/// Journal segments roll over at this size.
pub const SEGMENT_BYTES: u64 = 256 * 1024 * 1024;
/// Most bytes one group commit writes before it syncs.
pub const MAX_GROUP_BYTES: usize = 4 * 1024 * 1024;
/// Requests that may wait for the journal thread; senders wait beyond this.
pub const JOURNAL_QUEUE_REQUESTS: usize = 64 * 1024;

pub struct StoredEntry {
    pub lac: i64,
    pub payload: Bytes,
    pub digest: u32,
}

enum Request {
    /// Adds that already passed their digest check, staged in one group;
    /// answered with a result per add, in order.
    AddBatch {
        adds: Vec<AddRequest>,
        done: oneshot::Sender<Vec<Result<(), BookieErrorCode>>>,
    },
    Fence {
        ledger_id: u64,
        master_key: MasterKey,
        done: oneshot::Sender<Result<i64, BookieErrorCode>>,
    },
    Delete {
        ledgers: Vec<u64>,
        done: oneshot::Sender<Result<(), BookieErrorCode>>,
    },
    /// Answers the journal position after everything sent before it is
    /// durable and indexed.
    Mark { done: oneshot::Sender<(u64, u64)> },
}

/// Handle to the journal. Cheap to clone.
#[derive(Clone)]
pub struct Storage {
    tx: mpsc::Sender<Request>,
    index: Arc<RwLock<Index>>,
    dir: PathBuf,
    /// Checkpoints and compactions run one at a time; the checkpoint's
    /// memory, kept from one to the next, lives here.
    maintenance: Arc<tokio::sync::Mutex<Spare>>,
    /// Woken whenever adds were indexed (LACs may have moved).
    added: Arc<tokio::sync::Notify>,
    /// Set once a checkpoint succeeded: from then on journal segments are
    /// freed by checkpoints, and compaction leaves alone those whose adds
    /// the next checkpoint moves anyway.
    checkpointing: Arc<std::sync::atomic::AtomicBool>,
    /// What the journal wrote since the last checkpoint, in memory.
    cache: Arc<TailCache>,
    /// Set by the writer thread when a write or sync failed.
    broken: Arc<std::sync::atomic::AtomicBool>,
}

/// The in-memory index's size: entries still in the journal are indexed
/// one by one, those in entry logs by run (see `entry_index.rs`).
#[derive(Debug, Clone, Copy, Default)]
pub struct IndexStats {
    pub ledgers: usize,
    pub journaled_entries: usize,
    pub runs: usize,
}

/// What one checkpoint did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CheckpointStats {
    pub entries_flushed: usize,
    pub journal_segments_removed: usize,
}

/// What one `compact` pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CompactStats {
    pub segments_removed: usize,
    pub entries_moved: usize,
    pub bytes_freed: u64,
}

/// File ids with this bit set are entry logs; the others journal segments.
const ENTRY_LOG: u64 = 1 << 62;

fn segment_path(dir: &Path, n: u64) -> PathBuf {
    if n & ENTRY_LOG != 0 {
        dir.join(format!("{:010}.elog", n & !ENTRY_LOG))
    } else {
        dir.join(format!("{n:010}.jnl"))
    }
}

fn entry_index_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("{:010}.eidx", n & !ENTRY_LOG))
}

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("journal I/O: {0}")]
    Io(#[from] std::io::Error),
}

impl Storage {
    /// Opens (replaying) or creates the journal in `dir`.
    pub fn open(dir: &Path) -> Result<Storage, StorageError> {
        Self::open_with(dir, SEGMENT_BYTES)
    }

    /// As `open`, rolling segments at `segment_bytes`.
    pub fn open_with(dir: &Path, segment_bytes: u64) -> Result<Storage, StorageError> {
        Self::open_with_cache(dir, segment_bytes, DEFAULT_CACHE_BYTES)
    }

    /// As `open_with`, keeping up to `cache_bytes` of the journal's
    /// unflushed tail in memory (see [`TailCache`]; 0 keeps none).
    pub fn open_with_cache(
        dir: &Path,
        segment_bytes: u64,
        cache_bytes: u64,
    ) -> Result<Storage, StorageError> {
        std::fs::create_dir_all(dir)?;
        let names: Vec<String> = std::fs::read_dir(dir)?
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().to_str().map(String::from))
            .collect();
        let numbered = |suffix: &str| -> Vec<u64> {
            let mut v: Vec<u64> = names
                .iter()
                .filter_map(|n| n.strip_suffix(suffix).and_then(|n| n.parse().ok()))
                .collect();
            v.sort_unstable();
            v
        };
        let mut segs = numbered(".jnl");
        let mut index = Index::default();
        let checkpoint: Checkpoint = match std::fs::read(dir.join(CHECKPOINT)) {
            Ok(b) => bincode::deserialize(&b).map_err(|e| {
                std::io::Error::new(std::io::ErrorKind::InvalidData, format!("checkpoint: {e}"))
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Checkpoint::default(),
            Err(e) => return Err(e.into()),
        };
        for (id, key, fenced, lac) in &checkpoint.ledgers {
            index.ledgers.insert(
                *id,
                LedgerIndex {
                    master_key: *key,
                    fenced: *fenced,
                    lac: *lac,
                    ..Default::default()
                },
            );
        }
        // Oldest first: a later log's copy of an entry is the newer one.
        let mut logs = checkpoint.entry_logs.clone();
        logs.sort_unstable();
        for &n in &logs {
            let id = n | ENTRY_LOG;
            let file = match File::open(segment_path(dir, id)) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue, // compacted away
                Err(e) => return Err(e.into()),
            };
            let idx = File::open(entry_index_path(dir, id))?;
            let runs = entry_index::load_runs(&idx, id)
                .map_err(|e| std::io::Error::new(e.kind(), format!("entry index {n}: {e}")))?;
            // Ledgers deleted before the checkpoint are not in it.
            for (ledger, run) in runs {
                index.add_run(ledger, run);
            }
            index.segments.insert(id, Arc::new(file));
            index.entry_indexes.insert(id, Arc::new(idx));
        }
        // Entry logs a crash left before their checkpoint: not referenced.
        for n in numbered(".elog") {
            if !checkpoint.entry_logs.contains(&n) {
                let _ = std::fs::remove_file(segment_path(dir, n | ENTRY_LOG));
                let _ = std::fs::remove_file(entry_index_path(dir, n | ENTRY_LOG));
            }
        }
        // Journal segments wholly before the checkpoint are no longer needed.
        segs.retain(|&seg| {
            if seg < checkpoint.segment {
                let _ = std::fs::remove_file(segment_path(dir, seg));
                false
            } else {
                true
            }
        });
        for &seg in &segs {
            let path = segment_path(dir, seg);
            let from = if seg == checkpoint.segment {
                checkpoint.offset
            } else {
                0
            };
            let (valid, len) = replay_file(&path, seg, from, &mut index)?;
            if valid < len {
                tracing::warn!(segment = %path.display(), valid, len, "journal has a torn tail; truncating");
                let f = OpenOptions::new().write(true).open(&path)?;
                f.set_len(valid)?;
                f.sync_all()?;
            }
            index.segments.insert(seg, Arc::new(File::open(&path)?));
        }
        let current = segs.last().copied().unwrap_or(checkpoint.segment);
        let path = segment_path(dir, current);
        let (file, direct) = open_segment(&path)?;
        let size = file.metadata()?.len();
        index.segments.insert(current, Arc::new(File::open(&path)?));
        File::open(dir)?.sync_all()?;
        let index = Arc::new(RwLock::new(index));
        let added: Arc<tokio::sync::Notify> = Arc::default();
        let (tx, rx) = mpsc::channel(JOURNAL_QUEUE_REQUESTS);
        let cache = Arc::new(TailCache::new(cache_bytes));
        let broken: Arc<std::sync::atomic::AtomicBool> = Arc::default();
        let mut writer = Writer {
            cache: cache.clone(),
            dir: dir.to_path_buf(),
            segment: current,
            file,
            size,
            index: index.clone(),
            state: FxHashMap::default(),
            failed: false,
            broken: broken.clone(),
            segment_bytes: segment_bytes.max(4096),
            added: added.clone(),
            direct,
            scratch: AlignedBuf::new(MAX_GROUP_BYTES),
            base: 0,
        };
        // O_DIRECT writes go at block boundaries; a segment that ends
        // elsewhere (a cut torn tail) is left as it is.
        if direct && size % DIRECT_ALIGN as u64 != 0 {
            writer.roll()?;
        }
        {
            let g = index.read().unwrap_or_else(|e| e.into_inner());
            for (id, l) in &g.ledgers {
                writer.state.insert(*id, (l.master_key, l.fenced));
            }
        }
        std::thread::Builder::new()
            .name("bookie-journal".into())
            .spawn(move || writer.run(rx))?;
        Ok(Storage {
            tx,
            index,
            dir: dir.to_path_buf(),
            maintenance: Arc::default(),
            added,
            checkpointing: Arc::default(),
            cache,
            broken,
        })
    }

    /// Whether a journal write or sync failed (a full disk, a failing
    /// device): from then on every add and fence is refused until the
    /// bookie restarts; what was stored before stays readable.
    pub fn is_broken(&self) -> bool {
        self.broken.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The journal's unflushed tail has filled half its cache: a
    /// checkpoint should run now rather than at its next interval.
    pub fn checkpoint_due(&self) -> bool {
        self.cache.half_full()
    }

    /// Resolves when a checkpoint becomes due (see `checkpoint_due`).
    pub async fn checkpoint_wanted(&self) {
        self.cache.wanted().await
    }

    /// Waits until the ledger's LAC is above `previous`, or `timeout`;
    /// returns (LAC, last stored entry) as then known (-1, -1 for a ledger
    /// this bookie has nothing of yet).
    pub async fn wait_lac(
        &self,
        ledger_id: u64,
        previous: i64,
        timeout: std::time::Duration,
    ) -> (i64, i64) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let added = self.added.notified();
            tokio::pin!(added);
            // Register before looking, so an add in between is not missed.
            added.as_mut().enable();
            let now = self.lac(ledger_id).unwrap_or((-1, -1));
            if now.0 > previous {
                return now;
            }
            if tokio::time::timeout_at(deadline, added).await.is_err() {
                return now;
            }
        }
    }

    /// What the in-memory index holds.
    pub fn index_stats(&self) -> IndexStats {
        let g = self.index.read().unwrap_or_else(|e| e.into_inner());
        IndexStats {
            ledgers: g.ledgers.len(),
            journaled_entries: g.ledgers.values().map(|l| l.journaled.len()).sum(),
            runs: g.ledgers.values().map(|l| l.runs.len()).sum(),
        }
    }

    /// Ledgers this bookie holds anything of.
    pub fn ledger_ids(&self) -> Vec<u64> {
        let g = self.index.read().unwrap_or_else(|e| e.into_inner());
        g.ledgers.keys().copied().collect()
    }

    #[allow(clippy::too_many_arguments)]
    pub async fn add(
        &self,
        ledger_id: u64,
        entry_id: u64,
        lac: i64,
        master_key: MasterKey,
        payload: Bytes,
        digest: u32,
        recovery: bool,
    ) -> Result<(), BookieErrorCode> {
        let add = AddRequest {
            ledger_id,
            entry_id,
            master_key,
            lac,
            payload,
            digest,
            recovery,
        };
        self.add_batch(vec![add], |_| Ok(()))
            .await
            .pop()
            .unwrap_or(Err(BookieErrorCode::Io))
    }

    /// Adds many entries at once (one request to the journal thread, one
    /// group commit when they fit); a result per add, in order. `admit` is
    /// the caller's own check of each add (size, read-only…), made with
    /// the digest check before anything reaches the journal.
    pub async fn add_batch(
        &self,
        adds: Vec<AddRequest>,
        admit: impl Fn(&AddRequest) -> Result<(), BookieErrorCode>,
    ) -> Vec<Result<(), BookieErrorCode>> {
        let n = adds.len();
        let mut results: Vec<Result<(), BookieErrorCode>> = Vec::with_capacity(n);
        let mut valid = Vec::with_capacity(n);
        for a in adds {
            let check = admit(&a).and_then(|()| {
                if entry_digest(a.ledger_id, a.entry_id, a.lac, &a.payload) == a.digest {
                    Ok(())
                } else {
                    Err(BookieErrorCode::BadDigest)
                }
            });
            if check.is_ok() {
                valid.push(a);
            }
            results.push(check);
        }
        if valid.is_empty() {
            return results;
        }
        let (done, rx) = oneshot::channel();
        let stored = match self.tx.send(Request::AddBatch { adds: valid, done }).await {
            Ok(()) => rx.await.ok(),
            Err(_) => None,
        };
        let mut stored = stored.map(|v| v.into_iter());
        for r in results.iter_mut().filter(|r| r.is_ok()) {
            *r = match stored.as_mut() {
                Some(it) => it.next().unwrap_or(Err(BookieErrorCode::Io)),
                None => Err(BookieErrorCode::Io),
            };
        }
        results
    }

    /// Fences the ledger durably; returns its LAC.
    pub async fn fence(
        &self,
        ledger_id: u64,
        master_key: MasterKey,
    ) -> Result<i64, BookieErrorCode> {
        let (done, rx) = oneshot::channel();
        self.tx
            .send(Request::Fence {
                ledger_id,
                master_key,
                done,
            })
            .await
            .map_err(|_| BookieErrorCode::Io)?;
        rx.await.map_err(|_| BookieErrorCode::Io)?
    }
}

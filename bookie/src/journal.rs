//! The bookie journal: one sequential file for the adds and fences of every
//! ledger, written by a single thread that group-commits — it takes every
//! request waiting, writes them in one go, makes them durable with one
//! `fdatasync`, and only then answers each of them. Where the file system
//! allows it the journal is written with `O_DIRECT` (each group padded to
//! the block size with a record replay skips): the page cache would cost a
//! kernel copy and page allocations per byte, more CPU than the rest of the
//! write path.
//!
//! An in-memory index maps (ledger, entry) to a position in a journal
//! segment or an entry log; it is rebuilt at start from the last checkpoint
//! (entry-log indexes) and the journal tail, and a torn tail (a crash during
//! a write) is cut off there. `checkpoint` moves journaled adds into entry
//! logs sorted by ledger and frees the journal segments.
//!
//! Garbage collection: `delete_ledgers` records deletions (a `DELETE` record,
//! so a restart does not bring them back) and drops them from the index;
//! `compact` copies the live entries of mostly-dead segments and entry logs
//! to the head of the journal and removes those files, so disk use follows
//! live data.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use magnetar_proto::ledger::{entry_digest, AddRequest, BookieErrorCode, MasterKey};
use rustc_hash::FxHashMap;
use tokio::sync::{mpsc, oneshot};

use crate::entry_index::{self, Record, Run};
use crate::entry_map::EntryMap;
use crate::tail_cache::{TailCache, DEFAULT_CACHE_BYTES};

/// Journal segments roll over at this size.
pub const SEGMENT_BYTES: u64 = 256 * 1024 * 1024;
/// Most bytes one group commit writes before it syncs.
pub const MAX_GROUP_BYTES: usize = 4 * 1024 * 1024;
/// Requests that may wait for the journal thread; senders wait beyond this.
pub const JOURNAL_QUEUE_REQUESTS: usize = 64 * 1024;

/// Buffer of a checkpoint's entry log writes.
const ENTRY_LOG_WRITE_BYTES: usize = 1024 * 1024;
/// Entries compaction moves per journal request.
const COMPACT_BATCH: usize = 1024;
/// A checkpoint syncs its entry log every this many bytes.
const ENTRY_LOG_SYNC_BYTES: u64 = 16 * 1024 * 1024;
/// A range read takes entries of an entry log in one read when at most this
/// many bytes lie between them…
const RANGE_READ_GAP: u64 = 4096;
/// …and the read stays within this many bytes.
const RANGE_READ_SPAN: u64 = 2 * 1024 * 1024;
/// Entries a checkpoint re-points per hold of the index lock.
const INDEX_UPDATE_SLICE: usize = 8192;
const REC_ADD: u8 = 1;
const REC_FENCE: u8 = 2;
const REC_DELETE: u8 = 3;
/// Fills a group up to the block size; replay skips it.
const REC_PAD: u8 = 4;
/// An add whose record CRC covers its header only: the payload is covered
/// by the entry's digest, which was checked when the add came in and is
/// checked again at replay — one CRC pass over every payload fewer on the
/// journal thread. (`REC_ADD`, CRC over everything, still replays.)
const REC_ADD_SEALED: u8 = 5;
const CHECKPOINT: &str = "checkpoint";
/// `[u32 len][u32 crc32c][type]` then the body.
const REC_HEADER: usize = 9;
/// Add body before the payload: ledger, entry, lac, digest, master key.
const ADD_HEADER: usize = 8 + 8 + 8 + 4 + 16;

#[derive(Debug, Clone, Copy)]
struct Location {
    segment: u64,
    /// Offset of the payload in the segment.
    offset: u64,
    len: u32,
    lac: i64,
    digest: u32,
}

#[derive(Debug)]
struct LedgerIndex {
    master_key: Option<MasterKey>,
    fenced: bool,
    lac: i64,
    /// Highest entry id stored, or -1.
    last: i64,
    /// Adds still in the journal, each where it is (the checkpoint moves
    /// them to an entry log).
    journaled: EntryMap<Location>,
    /// Where the rest are: runs of entry-log indexes, oldest first. An
    /// entry held in more than one place is the journal's copy, else the
    /// latest run's.
    runs: Vec<Run>,
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
struct Index {
    ledgers: FxHashMap<u64, LedgerIndex>,
    /// Journal segments and entry logs, open for reading.
    segments: FxHashMap<u64, Arc<File>>,
    /// Entry logs' `.eidx` files, open for reading.
    entry_indexes: FxHashMap<u64, Arc<File>>,
    /// Adds indexed in the journal since the last checkpoint took them:
    /// (ledger, entry, where in the journal) — what the next checkpoint
    /// moves. Kept in journal order (the checkpoint bisects it).
    unflushed: Vec<(u64, u64, Location)>,
    /// Per file (journal segment or entry log): how many indexed entries it
    /// holds and their payload bytes — for an entry log, counted by run, so
    /// an entry re-written since stays counted (compaction errs towards
    /// keeping). A file absent here holds nothing live.
    live: FxHashMap<u64, (u64, u64)>,
}

impl Index {
    /// The ledger's index, created on first use.
    fn ledger(&mut self, id: u64) -> &mut LedgerIndex {
        self.ledgers.entry(id).or_default()
    }

    /// A run of an entry log for `ledger`, if the ledger is still here (one
    /// deleted since the log was written leaves its entries as garbage).
    fn add_run(&mut self, ledger: u64, run: Run) {
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
    fn journaled(&mut self, ledger: u64, entry: u64, loc: Location, key: MasterKey) {
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
    fn unjournal(&mut self, ledger: u64, entry: u64, old: &Location) -> bool {
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
    fn drop_runs(&mut self, ledger: u64, logs: &std::collections::HashSet<u64>) {
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

    fn count(&mut self, file: u64, entries: u64, bytes: u64) {
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

    fn drop_ledger(&mut self, id: u64) {
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
pub struct Journal {
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

/// Writes entry log `id` and its index, both fsynced, from `entries` (in
/// journal order), and returns the index's runs, by ledger.
///
/// The journal is read a window of up to [`CHECKPOINT_WINDOW`] bytes at a
/// time, with one sequential read, and each window's adds are written sorted
/// by (ledger, entry): a ledger's entries end up in one block per window.
/// (Reading entry by entry in ledger order instead cost a disk read per
/// entry when many ledgers' adds are interleaved in the journal.)
///
/// With a `pace`, writing is spread over about that long (a burst of
/// gigabytes would delay the journal's fsyncs behind it on a shared disk).
fn write_entry_log(
    dir: &Path,
    id: u64,
    entries: &mut [(u64, u64, Location)],
    pace: Duration,
    cache: &TailCache,
    buffers: &mut Buffers,
) -> std::io::Result<Vec<(u64, Run)>> {
    let total: u64 = entries
        .iter()
        .map(|(_, _, l)| l.len as u64)
        .sum::<u64>()
        .max(1);
    let started = std::time::Instant::now();
    let mut out = LogWriter::create(&segment_path(dir, id), buffers.piece.take())?;
    let records = &mut buffers.records;
    records.clear();
    records.reserve(entries.len());
    let mut offset = 0u64;
    let mut synced = 0u64;
    // Needed only for windows the tail cache does not hold: kept for the
    // next checkpoint while checkpoints read back (the cache overflows
    // while writes outpace them), let go after one that did not.
    let buf = &mut buffers.read;
    let mut read_back = false;
    // The journal's segments opened for `O_DIRECT` reads: through the page
    // cache every byte would cost a kernel copy and a page allocation.
    let mut readers: HashMap<u64, File> = HashMap::new();
    let mut rest = &mut *entries;
    while !rest.is_empty() {
        let n = window_len(rest);
        let (window, after) = rest.split_at_mut(n);
        rest = after;
        let (first, last) = (window[0].2, window[n - 1].2);
        let from = first.offset - first.offset % DIRECT_ALIGN as u64;
        let need = (last.offset + last.len as u64 - from) as usize;
        // From memory if the journal's tail cache holds the window (the
        // usual case: entries go from its chunks straight to the log),
        // else one read of the window from the segment.
        let data: Option<&[u8]> = if cache.holds(first.segment, from, need) {
            None
        } else {
            tracing::debug!(
                segment = first.segment,
                from,
                need,
                cached_bytes = cache.bytes(),
                "checkpoint: window read back from the journal"
            );
            let size = need.next_multiple_of(DIRECT_ALIGN);
            let buf = match buf.as_mut() {
                Some(b) if b.len >= size => b,
                _ => buf.insert(AlignedBuf::new(size.max(CHECKPOINT_WINDOW))),
            };
            let file = match readers.entry(first.segment) {
                std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
                std::collections::hash_map::Entry::Vacant(v) => {
                    let path = segment_path(dir, first.segment);
                    let (file, _) =
                        open_direct(OpenOptions::new().read(true), &path).map_err(|e| {
                            std::io::Error::new(e.kind(), format!("segment {}: {e}", first.segment))
                        })?;
                    v.insert(file)
                }
            };
            read_aligned(file, buf, from, need)?;
            read_back = true;
            Some(&buf.window()[..need])
        };
        // Stable: a ledger's adds keep their journal order.
        window.sort_by_key(|(l, e, _)| (*l, *e));
        for (ledger, entry, loc) in window.iter() {
            let len = loc.len as usize;
            match data {
                Some(data) => {
                    let at = (loc.offset - from) as usize;
                    out.append(&data[at..at + len])?;
                }
                None => {
                    if !cache.visit(loc.segment, loc.offset, len, |piece| out.append(piece))? {
                        return Err(std::io::Error::other(
                            "the journal's tail cache lost a window",
                        ));
                    }
                }
            }
            records.push(Record {
                ledger: *ledger,
                entry: *entry,
                offset,
                len: loc.len,
                lac: loc.lac,
                digest: loc.digest,
            });
            offset += loc.len as u64;
            // Written back a slice at a time: one large flush at the end
            // would queue the whole log ahead of the journal's next fsync.
            if offset - synced >= ENTRY_LOG_SYNC_BYTES {
                out.sync()?;
                synced = offset;
                let due = pace.mul_f64(offset as f64 / total as f64);
                if let Some(ahead) = due.checked_sub(started.elapsed()) {
                    std::thread::sleep(ahead);
                }
            }
        }
    }
    let piece = out.finish()?;
    if !read_back {
        *buf = None;
    }
    // The index (tens of megabytes per checkpoint) goes the same way,
    // encoded straight into the writer (the padding after it is ignored
    // when it is read).
    let mut idx = LogWriter::create(&entry_index_path(dir, id), Some(piece))?;
    let runs = entry_index::write(&mut idx, id, records.drain(..))?;
    buffers.piece = Some(idx.finish()?);
    File::open(dir)?.sync_all()?;
    Ok(runs)
}

/// The blocking part of a checkpoint: writes the adds of `moving` (in
/// journal order) to entry log `log_id`, sorted by (ledger, entry) a window
/// at a time, adds the log's runs to the index, then forgets the journal's
/// copies — except where something re-wrote or deleted them meanwhile. The
/// index is updated in slices, so adds are not held up. Returns how many
/// moved.
fn move_to_entry_log(
    index: &RwLock<Index>,
    dir: &Path,
    log_id: u64,
    spare: &mut Spare,
    pace: Duration,
    cache: &TailCache,
) -> std::io::Result<usize> {
    let Spare { moving, buffers } = spare;
    // Adds whose journal segment is gone (compacted before checkpoints
    // began) are left out; adds of deleted ledgers or re-written since are
    // copied anyway (rare; garbage for compaction) — a lookup per add
    // would cost more than it saves.
    let present: Vec<u64> = index
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .segments
        .keys()
        .copied()
        .filter(|k| k & ENTRY_LOG == 0) // a handful; entry logs pile up
        .collect();
    moving.retain(|(_, _, loc)| present.contains(&loc.segment));
    if moving.is_empty() {
        return Ok(0);
    }
    let started = std::time::Instant::now();
    let runs = write_entry_log(dir, log_id, moving, pace, cache, buffers)?;
    tracing::debug!(
        adds = moving.len(),
        runs = runs.len(),
        ms = started.elapsed().as_millis() as u64,
        "checkpoint: entry log written"
    );
    let started = std::time::Instant::now();
    let file = File::open(segment_path(dir, log_id))?;
    let idx = File::open(entry_index_path(dir, log_id))?;
    {
        // The runs first: until the journal's copies are forgotten below,
        // reads still find those (the journal's copy wins).
        let mut g = index.write().unwrap_or_else(|e| e.into_inner());
        g.segments.insert(log_id, Arc::new(file));
        g.entry_indexes.insert(log_id, Arc::new(idx));
        for (ledger, run) in runs {
            g.add_run(ledger, run);
        }
    }
    let mut moved = 0;
    for slice in moving.chunks(INDEX_UPDATE_SLICE) {
        let mut g = index.write().unwrap_or_else(|e| e.into_inner());
        for (ledger, entry, old) in slice {
            moved += g.unjournal(*ledger, *entry, old) as usize;
        }
    }
    tracing::debug!(
        ms = started.elapsed().as_millis() as u64,
        "checkpoint: index re-pointed"
    );
    Ok(moved)
}

/// Writes an entry log in aligned 1 MiB pieces. Where the file system
/// allows it the file is opened with `O_DIRECT`: the data goes from this
/// buffer to the device, not through the page cache — a checkpoint would
/// otherwise copy every byte a second time and compete with the journal for
/// memory and CPU. The last piece is padded to the block size (the index
/// says where entries end). Elsewhere (tmpfs) plain buffered writes.
struct LogWriter {
    file: File,
    direct: bool,
    buf: AlignedBuf,
    len: usize,
}

/// Block size and memory alignment of `O_DIRECT` writes.
const DIRECT_ALIGN: usize = 4096;

/// Opens `path` with `options` plus `O_DIRECT` where the file system allows
/// it (tmpfs does not: then without); says which.
fn open_direct(options: &OpenOptions, path: &Path) -> std::io::Result<(File, bool)> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut direct = options.clone();
    direct.custom_flags(nix::fcntl::OFlag::O_DIRECT.bits());
    match direct.open(path) {
        Ok(f) => Ok((f, true)),
        Err(e) if e.raw_os_error() == Some(nix::errno::Errno::EINVAL as i32) => {
            Ok((options.open(path)?, false))
        }
        Err(e) => Err(e),
    }
}

/// Reads at least `need` bytes from the block-aligned `from` into `buf`
/// (whole blocks, as `O_DIRECT` wants; the file may end sooner, after `need`).
fn read_aligned(file: &File, buf: &mut AlignedBuf, from: u64, need: usize) -> std::io::Result<()> {
    let window = buf.window();
    let len = need.next_multiple_of(DIRECT_ALIGN);
    let mut got = 0;
    while got < need {
        match file.read_at(&mut window[got..len], from + got as u64) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Memory for `O_DIRECT` I/O: a block-aligned window of a vector (safe
/// code cannot ask the allocator for an alignment).
struct AlignedBuf {
    buf: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    fn new(len: usize) -> AlignedBuf {
        let buf = vec![0u8; len + DIRECT_ALIGN];
        let start = buf.as_ptr().align_offset(DIRECT_ALIGN).min(DIRECT_ALIGN);
        AlignedBuf { buf, start, len }
    }

    fn window(&mut self) -> &mut [u8] {
        &mut self.buf[self.start..self.start + self.len]
    }
}

impl Write for LogWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.append(data)?;
        Ok(data.len())
    }

    /// Pieces go out as they fill; [`LogWriter::finish`] writes the rest.
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl LogWriter {
    /// Writes through `buf` if given (a piece's worth, from an earlier
    /// writer's `finish`).
    fn create(path: &Path, buf: Option<AlignedBuf>) -> std::io::Result<LogWriter> {
        let mut options = OpenOptions::new();
        options.write(true).create(true).truncate(true);
        let (file, direct) = open_direct(&options, path)?;
        Ok(LogWriter {
            file,
            direct,
            buf: buf.unwrap_or_else(|| AlignedBuf::new(ENTRY_LOG_WRITE_BYTES)),
            len: 0,
        })
    }

    fn append(&mut self, mut data: &[u8]) -> std::io::Result<()> {
        while !data.is_empty() {
            let take = data.len().min(ENTRY_LOG_WRITE_BYTES - self.len);
            let at = self.len;
            self.buf.window()[at..at + take].copy_from_slice(&data[..take]);
            self.len += take;
            data = &data[take..];
            if self.len == ENTRY_LOG_WRITE_BYTES {
                self.flush_piece()?;
            }
        }
        Ok(())
    }

    fn flush_piece(&mut self) -> std::io::Result<()> {
        let mut n = self.len;
        let window = self.buf.window();
        if self.direct {
            // Only the last piece can be short: pad it to the block size.
            n = n.next_multiple_of(DIRECT_ALIGN);
            window[self.len..n].fill(0);
        }
        self.file.write_all(&window[..n])?;
        self.len = 0;
        Ok(())
    }

    /// Makes what was written so far durable (a full piece boundary is not
    /// needed: buffered data stays buffered).
    fn sync(&mut self) -> std::io::Result<()> {
        self.file.sync_data()
    }

    /// Writes the rest and syncs; gives the buffer back for the next writer.
    fn finish(mut self) -> std::io::Result<AlignedBuf> {
        if self.len > 0 {
            self.flush_piece()?;
        }
        self.file.sync_all()?;
        Ok(self.buf)
    }
}

/// What a checkpoint works in, kept from one to the next: fresh buffers of
/// tens of megabytes every checkpoint cost page faults, and the kernel's
/// zeroing of every page, in profiles (64 MiB for each window read back
/// alone).
#[derive(Default)]
struct Spare {
    /// The adds to move, in journal order.
    moving: Vec<(u64, u64, Location)>,
    buffers: Buffers,
}

#[derive(Default)]
struct Buffers {
    /// The entry log's index records.
    records: Vec<Record>,
    /// Journal windows read back from disk.
    read: Option<AlignedBuf>,
    /// The log writers' piece.
    piece: Option<AlignedBuf>,
}

/// Most journal bytes a checkpoint reads (and holds) at a time; see
/// [`write_entry_log`].
const CHECKPOINT_WINDOW: usize = 64 * 1024 * 1024;

/// How many of `entries` (in journal order, from the first) one window
/// covers: those in the first one's segment whose span stays within
/// [`CHECKPOINT_WINDOW`] (at least one, however large).
fn window_len(entries: &[(u64, u64, Location)]) -> usize {
    let Some((_, _, first)) = entries.first() else {
        return 0;
    };
    let n = entries
        .iter()
        .take_while(|(_, _, loc)| {
            loc.segment == first.segment
                && loc.offset >= first.offset
                && loc.offset + loc.len as u64 - first.offset <= CHECKPOINT_WINDOW as u64
        })
        .count();
    n.max(1)
}

/// The last checkpoint: every add before (`segment`, `offset`) of the
/// journal is in the listed entry logs, and the ledgers' state is here, so
/// a restart replays only the journal after that point.
#[derive(serde::Serialize, serde::Deserialize, Default)]
struct Checkpoint {
    segment: u64,
    offset: u64,
    /// (ledger, master key, fenced, lac)
    ledgers: Vec<(u64, Option<MasterKey>, bool, i64)>,
    entry_logs: Vec<u64>,
}

fn write_atomic(dir: &Path, name: &str, data: &[u8]) -> std::io::Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    let mut f = File::create(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join(name))?;
    File::open(dir)?.sync_all()
}

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal I/O: {0}")]
    Io(#[from] std::io::Error),
}

impl Journal {
    /// Opens (replaying) or creates the journal in `dir`.
    pub fn open(dir: &Path) -> Result<Journal, JournalError> {
        Self::open_with(dir, SEGMENT_BYTES)
    }

    /// As `open`, rolling segments at `segment_bytes`.
    pub fn open_with(dir: &Path, segment_bytes: u64) -> Result<Journal, JournalError> {
        Self::open_with_cache(dir, segment_bytes, DEFAULT_CACHE_BYTES)
    }

    /// As `open_with`, keeping up to `cache_bytes` of the journal's
    /// unflushed tail in memory (see [`TailCache`]; 0 keeps none).
    pub fn open_with_cache(
        dir: &Path,
        segment_bytes: u64,
        cache_bytes: u64,
    ) -> Result<Journal, JournalError> {
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
        Ok(Journal {
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

    async fn mark(&self) -> Result<(u64, u64), BookieErrorCode> {
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

    /// [`Journal::checkpoint`], writing the entry log over about `pace`.
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

    /// [`Journal::read`], looking in `block` first for the entry's index
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

/// Bytes of a segment replay reads at a time (small in tests, so that
/// records straddle chunks there).
const REPLAY_CHUNK: usize = if cfg!(test) {
    64 * 1024
} else {
    8 * 1024 * 1024
};
/// No journal record is longer (an add of the largest entry is ~6 MiB); a
/// length field above it is a torn or spoilt record, not one to read on for.
const MAX_RECORD_BYTES: usize = 64 * 1024 * 1024;

/// Replays segment `seg` (at `path`) from offset `from`, reading it a chunk
/// at a time (a whole segment in memory would be hundreds of megabytes at
/// every restart); returns where its valid records end and its length.
fn replay_file(path: &Path, seg: u64, from: u64, index: &mut Index) -> std::io::Result<(u64, u64)> {
    let file = File::open(path)?;
    let len = file.metadata()?.len();
    // `buf` holds the segment from `pos` on, as far as read.
    let mut pos = from.min(len);
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let read_to = pos + buf.len() as u64;
        let n = (len - read_to).min(REPLAY_CHUNK as u64) as usize;
        if n > 0 {
            let have = buf.len();
            buf.resize(have + n, 0);
            file.read_exact_at(&mut buf[have..], read_to)?;
        }
        let used = replay(seg, &buf, pos, index);
        pos += used as u64;
        buf.drain(..used);
        let rest = &buf[..];
        let at_end = pos + rest.len() as u64 >= len;
        // Stopped at a record that is there in full (so it is spoilt), or
        // at the end of the file: the valid records end here.
        if at_end || !record_incomplete(rest) {
            return Ok((pos, len));
        }
    }
}

/// Whether `rest` is the start of a record that continues past it (read
/// more), rather than a complete record that failed its checks.
fn record_incomplete(rest: &[u8]) -> bool {
    if rest.len() < REC_HEADER {
        return true;
    }
    let len = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
    (1..=MAX_RECORD_BYTES).contains(&len) && 8 + len > rest.len()
}

/// Paired check: what was read back must be what was written.
fn check_digest(
    ledger_id: u64,
    entry_id: u64,
    loc: &Location,
    payload: &[u8],
) -> Result<(), BookieErrorCode> {
    if entry_digest(ledger_id, entry_id, loc.lac, payload) != loc.digest {
        tracing::error!(ledger_id, entry_id, "stored entry fails its digest");
        return Err(BookieErrorCode::BadDigest);
    }
    Ok(())
}

/// Replays the records of `data`, which starts at `base` in segment `seg`;
/// returns how many bytes of it are valid records.
fn replay(seg: u64, data: &[u8], base: u64, index: &mut Index) -> usize {
    let mut pos = 0usize;
    while data.len() - pos >= REC_HEADER {
        let len =
            u32::from_be_bytes([data[pos], data[pos + 1], data[pos + 2], data[pos + 3]]) as usize;
        let crc = u32::from_be_bytes([data[pos + 4], data[pos + 5], data[pos + 6], data[pos + 7]]);
        if len < 1 || len - 1 > data.len() - pos - REC_HEADER {
            break;
        }
        let rec = &data[pos + 8..pos + 8 + len];
        let covered = if rec[0] == REC_ADD_SEALED {
            (1 + ADD_HEADER).min(rec.len())
        } else {
            rec.len()
        };
        if crc32c::crc32c(&rec[..covered]) != crc {
            break;
        }
        let body = &rec[1..];
        let u64_at = |i: usize| u64::from_be_bytes(body[i..i + 8].try_into().unwrap_or([0; 8]));
        match rec[0] {
            REC_ADD | REC_ADD_SEALED if body.len() >= ADD_HEADER => {
                let (ledger, entry, lac) = (u64_at(0), u64_at(8), u64_at(16) as i64);
                let digest = u32::from_be_bytes(body[24..28].try_into().unwrap_or([0; 4]));
                if rec[0] == REC_ADD_SEALED
                    && entry_digest(ledger, entry, lac, &body[ADD_HEADER..]) != digest
                {
                    break; // a torn payload
                }
                let mut key = [0u8; 16];
                key.copy_from_slice(&body[28..44]);
                let offset = base + (pos + REC_HEADER + ADD_HEADER) as u64;
                let loc = Location {
                    segment: seg,
                    offset,
                    len: (body.len() - ADD_HEADER) as u32,
                    lac,
                    digest,
                };
                index.journaled(ledger, entry, loc, key);
            }
            REC_DELETE => {
                for id in body.chunks_exact(8) {
                    index.drop_ledger(u64::from_be_bytes(id.try_into().unwrap_or([0; 8])));
                }
            }
            REC_PAD => {}
            REC_FENCE if body.len() >= 24 => {
                let l = index.ledger(u64_at(0));
                let mut key = [0u8; 16];
                key.copy_from_slice(&body[8..24]);
                l.master_key.get_or_insert(key);
                l.fenced = true;
            }
            _ => break,
        }
        pos += 8 + len;
    }
    pos
}

struct Writer {
    dir: PathBuf,
    segment: u64,
    file: File,
    size: u64,
    index: Arc<RwLock<Index>>,
    /// Authoritative per-ledger (master key, fenced), including requests not yet synced.
    state: FxHashMap<u64, (Option<MasterKey>, bool)>,
    /// Shared with the handles: set with `failed`.
    broken: Arc<std::sync::atomic::AtomicBool>,
    /// Set after a failed write or sync: the file's tail is unknown, so the
    /// journal refuses everything from then on rather than guess offsets.
    failed: bool,
    segment_bytes: u64,
    added: Arc<tokio::sync::Notify>,
    /// The segment is open with `O_DIRECT`: groups are padded to the block
    /// size and written where they were staged, which is block-aligned in
    /// memory (through `scratch` if a large group made the buffer move).
    direct: bool,
    scratch: AlignedBuf,
    /// Where groups start in the staging buffer (see [`staging_buffer`]).
    base: usize,
    /// Written groups go here too, for the checkpoint and for reads.
    cache: Arc<TailCache>,
}

/// The buffer groups are staged in, and the offset in it where a group
/// starts: block-aligned in memory, so that an `O_DIRECT` write takes the
/// group where it is. Room for two full groups, so that it rarely grows
/// (and moves).
fn staging_buffer() -> (Vec<u8>, usize) {
    let mut buf: Vec<u8> = Vec::with_capacity(2 * MAX_GROUP_BYTES + DIRECT_ALIGN);
    let base = buf.as_ptr().align_offset(DIRECT_ALIGN).min(DIRECT_ALIGN);
    buf.resize(base, 0);
    (buf, base)
}

/// Opens a journal segment for writing at explicit offsets.
fn open_segment(path: &Path) -> std::io::Result<(File, bool)> {
    let mut options = OpenOptions::new();
    options.write(true).create(true);
    open_direct(&options, path)
}

/// Pads the group staged in `buf` from `base` to the block size with a
/// record replay skips (a record needs a header, so a gap shorter than one
/// takes a block more).
fn pad_group(buf: &mut Vec<u8>, base: usize) {
    static ZEROS: [u8; DIRECT_ALIGN] = [0; DIRECT_ALIGN];
    let len = buf.len() - base;
    let mut pad = len.next_multiple_of(DIRECT_ALIGN) - len;
    if pad == 0 {
        return;
    }
    if pad < REC_HEADER {
        pad += DIRECT_ALIGN;
    }
    put_record(buf, REC_PAD, &[&ZEROS[..pad - REC_HEADER]]);
}

/// Appends `[len][crc32c][kind][parts…]` to `buf`; returns where the body starts.
fn put_record(buf: &mut Vec<u8>, kind: u8, parts: &[&[u8]]) -> usize {
    put_record_sealed(buf, kind, parts, &[])
}

/// As [`put_record`], with `tail` appended after `parts` and left out of
/// the CRC (see [`REC_ADD_SEALED`]).
fn put_record_sealed(buf: &mut Vec<u8>, kind: u8, parts: &[&[u8]], tail: &[u8]) -> usize {
    let start = buf.len();
    let len = 1 + parts.iter().map(|p| p.len()).sum::<usize>() + tail.len();
    buf.extend_from_slice(&(len as u32).to_be_bytes());
    buf.extend_from_slice(&[0; 4]);
    buf.push(kind);
    for p in parts {
        buf.extend_from_slice(p);
    }
    let crc = crc32c::crc32c(&buf[start + 8..]);
    buf.extend_from_slice(tail);
    buf[start + 4..start + 8].copy_from_slice(&crc.to_be_bytes());
    start + REC_HEADER
}

enum Done {
    /// Staged adds as (ledger, entry, location, key); `results` (one per
    /// add of the batch) already holds the refusals.
    Batch(
        Vec<(u64, u64, Location, MasterKey)>,
        Vec<Result<(), BookieErrorCode>>,
        oneshot::Sender<Vec<Result<(), BookieErrorCode>>>,
    ),
    Fence(
        u64,
        MasterKey,
        oneshot::Sender<Result<i64, BookieErrorCode>>,
    ),
    Delete(Vec<u64>, oneshot::Sender<Result<(), BookieErrorCode>>),
    Mark(oneshot::Sender<(u64, u64)>),
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Request>) {
        let (mut buf, base) = staging_buffer();
        self.base = base;
        let mut done: Vec<Done> = Vec::new();
        while let Some(first) = rx.blocking_recv() {
            let mut next = Some(first);
            while let Some(req) = next.take() {
                self.stage(req, &mut buf, &mut done);
                if buf.len() - self.base < MAX_GROUP_BYTES {
                    next = rx.try_recv().ok();
                }
            }
            if buf.len() == self.base {
                // Nothing to write (refused requests, or only marks): answer the marks.
                self.finish(true, &mut done);
                continue;
            }
            if self.direct {
                pad_group(&mut buf, self.base);
            }
            let group = &buf[self.base..];
            let res = self.write_group(group).and_then(|_| self.file.sync_data());
            let (segment, at) = (self.segment, self.size);
            self.size += group.len() as u64;
            if let Err(e) = &res {
                tracing::error!(error = %e, "journal write failed; the journal refuses all further requests");
                self.failed = true;
                self.broken
                    .store(true, std::sync::atomic::Ordering::Relaxed);
            }
            self.finish(res.is_ok(), &mut done);
            // Kept for the checkpoint once the adds are answered (the copy
            // is not on their path).
            if res.is_ok() {
                self.cache.put(segment, at, &buf[self.base..]);
            }
            if buf[self.base..].as_ptr().align_offset(DIRECT_ALIGN) != 0 {
                // It grew and moved: start over with an aligned one.
                (buf, self.base) = staging_buffer();
            }
            buf.truncate(self.base);
            if self.size >= self.segment_bytes {
                if let Err(e) = self.roll() {
                    tracing::error!(error = %e, "journal segment roll failed");
                }
            }
        }
    }

    /// Writes a group at the end of the segment (with `O_DIRECT`, through
    /// the aligned scratch buffer if the group is not aligned in memory).
    fn write_group(&mut self, data: &[u8]) -> std::io::Result<()> {
        if !self.direct || data.as_ptr().align_offset(DIRECT_ALIGN) == 0 {
            return self.file.write_all_at(data, self.size);
        }
        let window = self.scratch.window();
        let mut at = self.size;
        for piece in data.chunks(window.len()) {
            window[..piece.len()].copy_from_slice(piece);
            self.file.write_all_at(&window[..piece.len()], at)?;
            at += piece.len() as u64;
        }
        Ok(())
    }

    /// Checks `key` against the key the ledger is bound to (binding it on
    /// first use); returns the ledger's fenced flag.
    fn authorize(&mut self, ledger_id: u64, key: MasterKey) -> Result<&mut bool, BookieErrorCode> {
        let (bound, fenced) = self.state.entry(ledger_id).or_insert((None, false));
        if bound.is_some_and(|k| k != key) {
            return Err(BookieErrorCode::Unauthorized);
        }
        *bound = Some(key);
        Ok(fenced)
    }

    /// Appends an add's record to `buf` after the key and fencing checks;
    /// returns where its payload will be.
    fn stage_add(
        &mut self,
        a: &AddRequest,
        buf: &mut Vec<u8>,
    ) -> Result<Location, BookieErrorCode> {
        let fenced = *self.authorize(a.ledger_id, a.master_key)?;
        if fenced && !a.recovery {
            return Err(BookieErrorCode::Fenced);
        }
        // The payload's digest was checked on the way in (`add_batch`).
        let body = put_record_sealed(
            buf,
            REC_ADD_SEALED,
            &[
                &a.ledger_id.to_be_bytes(),
                &a.entry_id.to_be_bytes(),
                &a.lac.to_be_bytes(),
                &a.digest.to_be_bytes(),
                &a.master_key,
            ],
            &a.payload,
        );
        Ok(Location {
            segment: self.segment,
            offset: self.size + (body - self.base + ADD_HEADER) as u64,
            len: a.payload.len() as u32,
            lac: a.lac,
            digest: a.digest,
        })
    }

    fn stage(&mut self, req: Request, buf: &mut Vec<u8>, done: &mut Vec<Done>) {
        if self.failed {
            match req {
                Request::AddBatch { adds, done } => {
                    let _ = done.send(vec![Err(BookieErrorCode::Io); adds.len()]);
                }
                Request::Fence { done, .. } => {
                    let _ = done.send(Err(BookieErrorCode::Io));
                }
                Request::Delete { done, .. } => {
                    let _ = done.send(Err(BookieErrorCode::Io));
                }
                Request::Mark { .. } => {}
            }
            return;
        }
        match req {
            Request::AddBatch { adds, done: tx } => {
                let mut staged = Vec::with_capacity(adds.len());
                let mut results = Vec::with_capacity(adds.len());
                for a in &adds {
                    match self.stage_add(a, buf) {
                        Ok(loc) => {
                            staged.push((a.ledger_id, a.entry_id, loc, a.master_key));
                            results.push(Ok(()));
                        }
                        Err(e) => results.push(Err(e)),
                    }
                }
                done.push(Done::Batch(staged, results, tx));
            }
            Request::Fence {
                ledger_id,
                master_key,
                done: tx,
            } => {
                match self.authorize(ledger_id, master_key) {
                    Ok(fenced) => *fenced = true,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                }
                put_record(buf, REC_FENCE, &[&ledger_id.to_be_bytes(), &master_key]);
                done.push(Done::Fence(ledger_id, master_key, tx));
            }
            Request::Mark { done: tx } => done.push(Done::Mark(tx)),
            Request::Delete { ledgers, done: tx } => {
                let ids: Vec<[u8; 8]> = ledgers.iter().map(|l| l.to_be_bytes()).collect();
                let parts: Vec<&[u8]> = ids.iter().map(|b| &b[..]).collect();
                put_record(buf, REC_DELETE, &parts);
                for l in &ledgers {
                    self.state.remove(l);
                }
                done.push(Done::Delete(ledgers, tx));
            }
        }
    }

    fn finish(&mut self, ok: bool, done: &mut Vec<Done>) {
        if !ok {
            for d in done.drain(..) {
                match d {
                    Done::Batch(_, results, tx) => {
                        drop(tx.send(vec![Err(BookieErrorCode::Io); results.len()]))
                    }
                    Done::Fence(.., tx) => drop(tx.send(Err(BookieErrorCode::Io))),
                    Done::Delete(_, tx) => drop(tx.send(Err(BookieErrorCode::Io))),
                    Done::Mark(_) => {}
                }
            }
            return;
        }
        let mut g = self.index.write().unwrap_or_else(|e| e.into_inner());
        let mut batches = Vec::new();
        for d in done.drain(..) {
            match d {
                Done::Batch(staged, results, tx) => {
                    for (ledger, entry, loc, key) in staged {
                        g.journaled(ledger, entry, loc, key);
                    }
                    batches.push((results, tx));
                }
                Done::Fence(ledger, key, tx) => {
                    let l = g.ledger(ledger);
                    l.master_key.get_or_insert(key);
                    l.fenced = true;
                    let lac = l.lac;
                    let _ = tx.send(Ok(lac));
                }
                Done::Delete(ledgers, tx) => {
                    for l in ledgers {
                        g.drop_ledger(l);
                    }
                    let _ = tx.send(Ok(()));
                }
                Done::Mark(tx) => {
                    let _ = tx.send((self.segment, self.size));
                }
            }
        }
        drop(g);
        if !batches.is_empty() {
            self.added.notify_waiters();
        }
        for (results, tx) in batches {
            let _ = tx.send(results);
        }
    }

    fn roll(&mut self) -> std::io::Result<()> {
        let next = self.segment + 1;
        let path = segment_path(&self.dir, next);
        let (file, direct) = open_segment(&path)?;
        File::open(&self.dir)?.sync_all()?;
        self.index
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .segments
            .insert(next, Arc::new(File::open(&path)?));
        self.file = file;
        self.direct = direct;
        self.segment = next;
        self.size = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> MasterKey {
        [7; 16]
    }

    async fn add(j: &Journal, l: u64, e: u64, data: &[u8]) -> Result<(), BookieErrorCode> {
        let p = Bytes::copy_from_slice(data);
        j.add(
            l,
            e,
            e as i64 - 1,
            key(),
            p.clone(),
            entry_digest(l, e, e as i64 - 1, &p),
            false,
        )
        .await
    }

    #[tokio::test]
    async fn acked_entries_survive_restart_and_torn_tail_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        {
            let j = Journal::open(dir.path()).unwrap();
            let adds: Vec<_> = (0..200u64)
                .map(|e| {
                    let j = j.clone();
                    tokio::spawn(async move {
                        add(&j, 1 + e % 3, e, format!("entry-{e}").as_bytes()).await
                    })
                })
                .collect();
            for a in adds {
                a.await.unwrap().unwrap();
            }
            j.fence(2, key()).await.unwrap();
        }
        // Simulate a crash in the middle of a write: garbage after the last record.
        let seg = segment_path(dir.path(), 0);
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(&[0, 0, 1, 0, 9, 9]).unwrap();
        drop(f);
        let j = Journal::open(dir.path()).unwrap();
        for e in 0..200u64 {
            let got = j.read(1 + e % 3, e).unwrap();
            assert_eq!(&got.payload[..], format!("entry-{e}").as_bytes());
        }
        assert_eq!(
            add(&j, 2, 1000, b"late").await,
            Err(BookieErrorCode::Fenced),
            "fence survives restart"
        );
        assert!(
            add(&j, 1, 1000, b"ok").await.is_ok(),
            "journal writable after the torn tail was cut"
        );
        let wrong = j
            .add(
                1,
                1001,
                0,
                [9; 16],
                Bytes::from_static(b"x"),
                entry_digest(1, 1001, 0, b"x"),
                false,
            )
            .await;
        assert_eq!(wrong, Err(BookieErrorCode::Unauthorized));
        let bad = j
            .add(1, 1002, 0, key(), Bytes::from_static(b"x"), 12345, false)
            .await;
        assert_eq!(bad, Err(BookieErrorCode::BadDigest));
    }

    /// Adds are journaled with a CRC over their header only (the entry's
    /// digest covers the payload): a payload torn or spoilt on disk ends the
    /// replay there like a bad CRC would; records of the older kind (CRC
    /// over everything) still replay.
    #[test]
    fn a_sealed_add_with_a_spoilt_payload_ends_replay_and_old_adds_replay() {
        let add_record = |buf: &mut Vec<u8>, sealed: bool, e: u64, p: &[u8]| {
            let digest = entry_digest(1, e, e as i64 - 1, p);
            let (id, lac, digest) = (e.to_be_bytes(), (e as i64 - 1).to_be_bytes(), digest);
            let head: [&[u8]; 5] = [
                &1u64.to_be_bytes(),
                &id,
                &lac,
                &digest.to_be_bytes(),
                &key(),
            ];
            if sealed {
                put_record_sealed(buf, REC_ADD_SEALED, &head, p);
            } else {
                put_record(
                    buf,
                    REC_ADD,
                    &[head[0], head[1], head[2], head[3], head[4], p],
                );
            }
        };
        let mut data = Vec::new();
        add_record(&mut data, false, 0, b"old kind, all covered");
        add_record(&mut data, true, 1, b"header covered");
        let spoilt_at = data.len();
        add_record(&mut data, true, 2, b"spoilt on disk");
        add_record(&mut data, true, 3, b"after the spoilt one");
        let mut index = Index::default();
        assert_eq!(replay(0, &data, 0, &mut index), data.len());
        assert_eq!(index.ledgers[&1].journaled.len(), 4);
        // One payload byte of entry 2 flipped: replay stops before it.
        let last = data.len() - 1;
        let mut spoilt = data.clone();
        let in_payload = spoilt_at + REC_HEADER + ADD_HEADER + 3;
        spoilt[in_payload] ^= 0x20;
        let mut index = Index::default();
        assert_eq!(replay(0, &spoilt, 0, &mut index), spoilt_at);
        assert_eq!(index.ledgers[&1].journaled.len(), 2);
        // A flipped header byte is caught by the CRC.
        let mut spoilt = data.clone();
        spoilt[spoilt_at + REC_HEADER + 2] ^= 1;
        let mut index = Index::default();
        assert_eq!(replay(0, &spoilt, 0, &mut index), spoilt_at);
        // A torn last payload, likewise.
        let mut index = Index::default();
        assert!(replay(0, &data[..last], 0, &mut index) < last);
        assert_eq!(index.ledgers[&1].journaled.len(), 3);
    }

    #[tokio::test]
    async fn lone_adds_are_padded_to_blocks_and_replay_skips_the_padding() {
        let dir = tempfile::tempdir().unwrap();
        let mut probe = OpenOptions::new();
        probe.write(true).create(true);
        let (_, direct) = open_direct(&probe, &dir.path().join("probe")).unwrap();
        std::fs::remove_file(dir.path().join("probe")).unwrap();
        // One add per group; 4,039 bytes leave a gap shorter than a record
        // header before the block end, so its padding takes a block more.
        let sizes = [1usize, 4039, 4096, 5000, 100];
        let payload = |e: u64| vec![e as u8; sizes[e as usize % sizes.len()]];
        {
            let j = Journal::open(dir.path()).unwrap();
            for e in 0..10u64 {
                add(&j, 1, e, &payload(e)).await.unwrap();
                let len = std::fs::metadata(segment_path(dir.path(), 0))
                    .unwrap()
                    .len();
                if direct {
                    assert_eq!(len % DIRECT_ALIGN as u64, 0, "group {e} padded");
                }
            }
        }
        // A torn last group: its padding record is cut short, so replay
        // keeps the add before it and the segment then ends off a block
        // boundary — the reopened journal goes on in a new segment, and a
        // checkpoint reads the old one's last entry up to its end.
        // (Without O_DIRECT there is no padding to cut.)
        let seg = segment_path(dir.path(), 0);
        let len = std::fs::metadata(&seg).unwrap().len();
        if direct {
            OpenOptions::new()
                .write(true)
                .open(&seg)
                .unwrap()
                .set_len(len - 100)
                .unwrap();
        }
        {
            let j = Journal::open(dir.path()).unwrap();
            for e in 0..10u64 {
                assert_eq!(&j.read(1, e).unwrap().payload[..], &payload(e)[..]);
            }
            for e in 10..20u64 {
                add(&j, 1, e, &payload(e)).await.unwrap();
            }
            assert_eq!(segment_path(dir.path(), 1).exists(), direct);
            let stats = j.checkpoint().await.unwrap();
            assert_eq!(stats.entries_flushed, 20);
        }
        let j = Journal::open(dir.path()).unwrap();
        for e in 0..20u64 {
            assert_eq!(&j.read(1, e).unwrap().payload[..], &payload(e)[..]);
        }
        assert_eq!(j.lac(1).unwrap().1, 19);
    }

    #[tokio::test]
    async fn a_group_larger_than_the_staging_buffer_is_written_and_replayed() {
        let dir = tempfile::tempdir().unwrap();
        // Over twice the group size: the staging buffer grows and moves, so
        // the group is written through the aligned scratch buffer, and the
        // next group starts in a fresh aligned buffer.
        let big: Vec<u8> = (0..9u32 << 20).map(|i| (i % 253) as u8).collect();
        {
            let j = Journal::open(dir.path()).unwrap();
            add(&j, 1, 0, b"before").await.unwrap();
            add(&j, 1, 1, &big).await.unwrap();
            add(&j, 1, 2, b"after").await.unwrap();
            assert_eq!(&j.read(1, 1).unwrap().payload[..], &big[..]);
        }
        let j = Journal::open(dir.path()).unwrap();
        assert_eq!(&j.read(1, 0).unwrap().payload[..], b"before");
        assert_eq!(&j.read(1, 1).unwrap().payload[..], &big[..]);
        assert_eq!(&j.read(1, 2).unwrap().payload[..], b"after");
        j.checkpoint().await.unwrap();
        assert_eq!(&j.read(1, 1).unwrap().payload[..], &big[..]);
    }

    #[tokio::test]
    async fn deleted_ledgers_are_compacted_away_and_stay_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let payload = vec![9u8; 1000];
        {
            let j = Journal::open_with(dir.path(), 64 * 1024).unwrap();
            // Three ledgers interleaved over many small segments.
            for e in 0..150u64 {
                for l in 1..=3u64 {
                    add(&j, l, e, &payload).await.unwrap();
                }
            }
            j.fence(2, key()).await.unwrap();
            let before = count(dir.path(), ".jnl");
            assert!(before > 5, "{before} segments");
            j.delete_ledgers(vec![1, 3]).await.unwrap();
            assert_eq!(j.ledger_ids(), vec![2]);
            let stats = j.compact(0.5).await.unwrap();
            assert!(stats.segments_removed > 0, "{stats:?}");
            let after = count(dir.path(), ".jnl");
            assert!(after < before, "{before} -> {after} segments");
            for e in 0..150u64 {
                assert_eq!(j.read(2, e).unwrap().payload.as_ref(), &payload[..]);
            }
            // Compaction moved entries no checkpoint had taken yet (and
            // removed their old segments): the next checkpoint takes them
            // from where they are now.
            let cp = j.checkpoint().await.unwrap();
            assert!(cp.entries_flushed >= 150, "{cp:?}");
            for e in 0..150u64 {
                assert_eq!(j.read(2, e).unwrap().payload.as_ref(), &payload[..]);
            }
            assert_eq!(
                add(&j, 2, 150, &payload).await,
                Err(BookieErrorCode::Fenced),
                "the fence survives compaction"
            );
        }
        // After a restart: deleted ledgers stay deleted, the fence and the
        // live entries are still there.
        let j = Journal::open_with(dir.path(), 64 * 1024).unwrap();
        assert_eq!(j.ledger_ids(), vec![2]);
        assert!(matches!(j.read(1, 0), Err(BookieErrorCode::NoSuchLedger)));
        for e in 0..150u64 {
            assert_eq!(j.read(2, e).unwrap().payload.as_ref(), &payload[..]);
        }
        assert_eq!(
            add(&j, 2, 150, &payload).await,
            Err(BookieErrorCode::Fenced)
        );
    }

    /// Once checkpoints run, compaction leaves journal segments whose adds
    /// the next checkpoint will move anyway (moving them would copy them
    /// twice); the checkpoint frees those segments.
    #[tokio::test]
    async fn compaction_leaves_pending_journal_segments_to_the_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let payload = vec![7u8; 1000];
        let j = Journal::open_with(dir.path(), 64 * 1024).unwrap();
        add(&j, 9, 0, &payload).await.unwrap();
        j.checkpoint().await.unwrap();
        for e in 0..100u64 {
            add(&j, 1, e, &payload).await.unwrap();
            add(&j, 2, e, &payload).await.unwrap();
        }
        j.delete_ledgers(vec![1]).await.unwrap();
        let st = j.compact(0.4).await.unwrap();
        assert_eq!(st.entries_moved, 0, "{st:?}");
        let cp = j.checkpoint().await.unwrap();
        assert_eq!(cp.entries_flushed, 100, "{cp:?}");
        assert!(cp.journal_segments_removed > 0, "{cp:?}");
        for e in 0..100u64 {
            assert_eq!(j.read(2, e).unwrap().payload.as_ref(), &payload[..]);
        }
        assert!(matches!(j.read(1, 0), Err(BookieErrorCode::NoSuchLedger)));
    }

    fn count(dir: &Path, suffix: &str) -> usize {
        std::fs::read_dir(dir)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .ends_with(suffix)
            })
            .count()
    }

    #[tokio::test]
    async fn checkpoint_moves_adds_to_entry_logs_and_restart_replays_the_tail() {
        checkpoint_round_trip(DEFAULT_CACHE_BYTES).await;
    }

    /// The same with no tail cache: the checkpoint reads the journal back.
    #[tokio::test]
    async fn checkpoint_without_a_tail_cache_reads_the_journal_back() {
        checkpoint_round_trip(0).await;
    }

    #[tokio::test]
    async fn checkpoint_copies_from_the_tail_cache_and_releases_it() {
        let dir = tempfile::tempdir().unwrap();
        let data = |e: u64| format!("entry-{e:04}-").repeat(40).into_bytes();
        let j = Journal::open_with(dir.path(), 1024 * 1024).unwrap();
        for e in 0..200u64 {
            add(&j, 1, e, &data(e)).await.unwrap();
        }
        assert!(j.cache.bytes() >= 200 * data(0).len());
        // Spoil entry 7 on disk: the checkpoint must not read it from there.
        let needle = data(7);
        let mut spoiled = 0;
        for f in std::fs::read_dir(dir.path()).unwrap() {
            let path = f.unwrap().path();
            let mut bytes = std::fs::read(&path).unwrap();
            if let Some(at) = bytes.windows(needle.len()).position(|w| w == &needle[..]) {
                bytes[at + 5] ^= 0xff;
                std::fs::write(&path, &bytes).unwrap();
                spoiled += 1;
            }
        }
        assert_eq!(spoiled, 1);
        assert_eq!(j.checkpoint().await.unwrap().entries_flushed, 200);
        assert!(j.cache.bytes() <= crate::tail_cache::CHUNK, "released");
        drop(j);
        let j = Journal::open_with(dir.path(), 1024 * 1024).unwrap();
        for e in 0..200u64 {
            assert_eq!(j.read(1, e).unwrap().payload.as_ref(), &data(e)[..]);
        }
    }

    async fn checkpoint_round_trip(cache_bytes: u64) {
        let dir = tempfile::tempdir().unwrap();
        let data = |l: u64, e: u64| format!("l{l}-e{e}").repeat(50).into_bytes();
        {
            let j = Journal::open_with_cache(dir.path(), 32 * 1024, cache_bytes).unwrap();
            for e in 0..100u64 {
                for l in [5u64, 3, 9] {
                    add(&j, l, e, &data(l, e)).await.unwrap();
                }
            }
            let before = count(dir.path(), ".jnl");
            let stats = j.checkpoint().await.unwrap();
            assert_eq!(stats.entries_flushed, 300);
            assert!(stats.journal_segments_removed > 0, "{stats:?}");
            assert!(count(dir.path(), ".jnl") < before);
            assert_eq!(count(dir.path(), ".elog"), 1);
            // Sorted by ledger a window at a time (here: a journal segment
            // each): a few runs per segment, not one per add, entries in
            // order within a run.
            let idx = File::open(entry_index_path(dir.path(), 1 | ENTRY_LOG)).unwrap();
            let runs = entry_index::load_runs(&idx, 1 | ENTRY_LOG).unwrap();
            assert_eq!(runs.iter().map(|(_, r)| r.count).sum::<u64>(), 300);
            assert!(
                runs.len() <= 3 * before,
                "{} runs over {before} segments",
                runs.len()
            );
            for (ledger, run) in &runs {
                let mut seen = Vec::new();
                entry_index::visit(&idx, run, |r| {
                    assert_eq!(r.ledger, *ledger);
                    seen.push(r.entry);
                })
                .unwrap();
                assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
                assert_eq!((seen[0], seen[seen.len() - 1]), (run.first, run.last));
            }
            // Only the runs are in memory now.
            let stats = j.index_stats();
            assert_eq!(stats.journaled_entries, 0, "{stats:?}");
            assert_eq!(stats.runs, runs.len(), "{stats:?}");
            // Reads now come from the entry log.
            for e in 0..100u64 {
                assert_eq!(j.read(3, e).unwrap().payload.as_ref(), &data(3, e)[..]);
            }
            // After the checkpoint: more adds, a fence, a deletion.
            for e in 100..120u64 {
                add(&j, 5, e, &data(5, e)).await.unwrap();
            }
            j.fence(3, key()).await.unwrap();
            j.delete_ledgers(vec![9]).await.unwrap();
        }
        let j = Journal::open_with_cache(dir.path(), 32 * 1024, cache_bytes).unwrap();
        let mut ids = j.ledger_ids();
        ids.sort();
        assert_eq!(ids, vec![3, 5]);
        for e in 0..120u64 {
            assert_eq!(j.read(5, e).unwrap().payload.as_ref(), &data(5, e)[..]);
        }
        assert_eq!(j.lac(5).unwrap().1, 119);
        assert_eq!(
            add(&j, 3, 100, &data(3, 100)).await,
            Err(BookieErrorCode::Fenced)
        );
        // A second checkpoint, compaction of the deleted ledger's share, restart again.
        j.checkpoint().await.unwrap();
        let stats = j.compact(0.2).await.unwrap();
        // The first entry log (a third of it ledger 9's) is gone, index and all.
        assert!(stats.segments_removed > 0, "{stats:?}");
        assert!(!segment_path(dir.path(), 1 | ENTRY_LOG).exists());
        assert!(!entry_index_path(dir.path(), 1 | ENTRY_LOG).exists());
        drop(j);
        let j = Journal::open_with_cache(dir.path(), 32 * 1024, cache_bytes).unwrap();
        for e in 0..100u64 {
            assert_eq!(j.read(3, e).unwrap().payload.as_ref(), &data(3, e)[..]);
            assert_eq!(j.read(5, e).unwrap().payload.as_ref(), &data(5, e)[..]);
        }
        assert!(matches!(j.read(9, 0), Err(BookieErrorCode::NoSuchLedger)));
        assert_eq!(
            add(&j, 3, 100, &data(3, 100)).await,
            Err(BookieErrorCode::Fenced)
        );
    }

    #[tokio::test]
    async fn the_newest_copy_of_a_rewritten_entry_wins_across_entry_logs() {
        let dir = tempfile::tempdir().unwrap();
        let add_with_lac = |j: &Journal, e: u64, lac: i64| {
            let p = Bytes::from(format!("entry {e}").into_bytes());
            let digest = entry_digest(1, e, lac, &p);
            let j = j.clone();
            async move { j.add(1, e, lac, key(), p, digest, true).await.unwrap() }
        };
        let lac_of = |j: &Journal| j.read(1, 10).unwrap().lac;
        let j = Journal::open(dir.path()).unwrap();
        for e in 0..50u64 {
            add_with_lac(&j, e, e as i64 - 1).await;
        }
        j.checkpoint().await.unwrap();
        // Written again (recovery re-replicating it, say) with a later LAC.
        add_with_lac(&j, 10, 40).await;
        assert_eq!(lac_of(&j), 40, "the journal's copy");
        j.checkpoint().await.unwrap();
        assert_eq!(j.index_stats().journaled_entries, 0);
        assert_eq!(lac_of(&j), 40, "the second entry log's copy");
        assert_eq!(j.read(1, 11).unwrap().lac, 10);
        drop(j);
        let j = Journal::open(dir.path()).unwrap();
        assert_eq!(lac_of(&j), 40, "after a restart");
        assert_eq!(j.lac(1).unwrap(), (48, 49));
        // Compacting everything moves each entry once, the current copy.
        j.compact(0.0).await.unwrap();
        j.checkpoint().await.unwrap();
        assert_eq!(lac_of(&j), 40, "after compaction");
        for e in (0..50u64).filter(|e| *e != 10) {
            assert_eq!(j.read(1, e).unwrap().lac, e as i64 - 1);
        }
        drop(j);
        let j = Journal::open(dir.path()).unwrap();
        assert_eq!(lac_of(&j), 40);
        assert!(matches!(j.read(1, 50), Err(BookieErrorCode::NoSuchEntry)));
    }

    #[tokio::test]
    async fn a_range_read_stops_at_its_entry_cap_and_before_a_gap() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        for e in (0..10u64).chain(11..15) {
            add(&j, 1, e, b"0123456789").await.unwrap();
        }
        let ids = |r: Result<Vec<(u64, StoredEntry)>, BookieErrorCode>| match r {
            Ok(v) => Ok(v.into_iter().map(|(e, _)| e).collect::<Vec<_>>()),
            Err(code) => Err(code),
        };
        assert_eq!(
            ids(j.read_range(1, 0, 100, 1, u64::MAX, 3)),
            Ok(vec![0, 1, 2])
        );
        assert_eq!(ids(j.read_range(1, 0, 100, 4, 25, 100)), Ok(vec![0, 4, 8]));
        assert_eq!(
            ids(j.read_range(1, 8, 100, 1, u64::MAX, 100)),
            Ok(vec![8, 9])
        );
        assert_eq!(
            ids(j.read_range(1, 10, 100, 1, u64::MAX, 100)),
            Err(BookieErrorCode::NoSuchEntry)
        );
        assert_eq!(
            ids(j.read_range(2, 0, 5, 1, 100, 10)),
            Err(BookieErrorCode::NoSuchLedger)
        );
        // No overflow at the top of the id space.
        assert_eq!(
            ids(j.read_range(1, 14, u64::MAX, u64::MAX, u64::MAX, 100)),
            Ok(vec![14])
        );
    }

    #[tokio::test]
    async fn replay_reads_a_segment_in_chunks_and_stops_at_a_spoilt_record() {
        let dir = tempfile::tempdir().unwrap();
        let data = |e: u64| {
            // Entry 100 is longer than a replay chunk.
            let n = if e == 100 { 3 * REPLAY_CHUNK } else { 3000 };
            format!("e{e:04}-").repeat(n / 6).into_bytes()
        };
        {
            let j = Journal::open_with(dir.path(), 64 * 1024 * 1024).unwrap();
            for e in 0..=110u64 {
                add(&j, 1, e, &data(e)).await.unwrap();
            }
        }
        let seg = segment_path(dir.path(), 0);
        let before = std::fs::metadata(&seg).unwrap().len();
        assert!(before > 4 * REPLAY_CHUNK as u64);
        let j = Journal::open_with(dir.path(), 64 * 1024 * 1024).unwrap();
        for e in 0..=110u64 {
            assert_eq!(j.read(1, e).unwrap().payload.as_ref(), &data(e)[..], "{e}");
        }
        drop(j);
        // One byte of entry 105's payload spoilt on disk: replay ends before
        // it, and the segment is cut there.
        let mut bytes = std::fs::read(&seg).unwrap();
        let at = bytes.windows(6).position(|w| w == b"e0105-").unwrap();
        bytes[at + 100] ^= 1;
        std::fs::write(&seg, &bytes).unwrap();
        let j = Journal::open_with(dir.path(), 64 * 1024 * 1024).unwrap();
        for e in 0..105u64 {
            assert_eq!(j.read(1, e).unwrap().payload.as_ref(), &data(e)[..], "{e}");
        }
        for e in 105..=110u64 {
            assert!(
                matches!(j.read(1, e), Err(BookieErrorCode::NoSuchEntry)),
                "{e}"
            );
        }
        let after = std::fs::metadata(&seg).unwrap().len();
        assert!(
            after < at as u64 && after > (at - 4096) as u64,
            "{after} vs {at}"
        );
    }

    #[tokio::test]
    async fn a_range_read_takes_side_by_side_entries_in_one_read_and_stops_at_a_spoilt_one() {
        let dir = tempfile::tempdir().unwrap();
        let data = |e: u64| format!("entry-{e:03}-").repeat(20).into_bytes();
        // No tail cache: the entries are read from the entry log on disk.
        let j = Journal::open_with_cache(dir.path(), SEGMENT_BYTES, 0).unwrap();
        for e in 0..20u64 {
            add(&j, 1, e, &data(e)).await.unwrap();
        }
        j.checkpoint().await.unwrap();
        assert_eq!(j.index_stats().journaled_entries, 0);
        let read = |first: u64, step: u64| {
            j.read_range(1, first, 19, step, u64::MAX, 100).map(|v| {
                v.into_iter()
                    .map(|(e, s)| {
                        assert_eq!(s.payload.as_ref(), &data(e)[..], "{e}");
                        e
                    })
                    .collect::<Vec<_>>()
            })
        };
        assert_eq!(read(0, 1), Ok((0..20).collect()));
        // Every fourth entry: the three between are read along (small gaps).
        assert_eq!(read(1, 4), Ok(vec![1, 5, 9, 13, 17]));
        // One byte of entry 7 spoilt in the entry log.
        let log = segment_path(dir.path(), 1 | ENTRY_LOG);
        let mut bytes = std::fs::read(&log).unwrap();
        let at = bytes.windows(10).position(|w| w == b"entry-007-").unwrap();
        bytes[at + 3] ^= 1;
        std::fs::write(&log, &bytes).unwrap();
        assert_eq!(read(0, 1), Ok((0..7).collect()), "ends before it");
        assert_eq!(read(1, 2), Ok(vec![1, 3, 5]), "read across gaps, likewise");
        assert_eq!(read(7, 1), Err(BookieErrorCode::BadDigest));
        assert_eq!(read(8, 1), Ok((8..20).collect()));
    }
}

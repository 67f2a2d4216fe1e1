//! Entry logs: a checkpoint writes the journal's adds sorted by (ledger,
//! entry), a window at a time, with an index file of runs.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use super::direct_io::{open_direct, read_aligned, AlignedBuf, DIRECT_ALIGN};
use super::entry_index::{self, Record, Run};
use super::index::{Index, Location};
use super::tail_cache::TailCache;
use super::{entry_index_path, segment_path, ENTRY_LOG};

/// Buffer of a checkpoint's entry log writes.
const ENTRY_LOG_WRITE_BYTES: usize = 1024 * 1024;

/// A checkpoint syncs its entry log every this many bytes.
const ENTRY_LOG_SYNC_BYTES: u64 = 16 * 1024 * 1024;

/// Entries a checkpoint re-points per hold of the index lock.
pub(super) const INDEX_UPDATE_SLICE: usize = 8192;

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
pub(super) fn move_to_entry_log(
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
    if let Ok(m) = std::fs::metadata(segment_path(dir, log_id)) {
        metrics::counter!(crate::metrics::CHECKPOINT_BYTES).increment(m.len());
    }
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
pub(super) struct LogWriter {
    pub(super) file: File,
    pub(super) direct: bool,
    pub(super) buf: AlignedBuf,
    pub(super) len: usize,
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
    pub(super) fn create(path: &Path, buf: Option<AlignedBuf>) -> std::io::Result<LogWriter> {
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

    pub(super) fn append(&mut self, mut data: &[u8]) -> std::io::Result<()> {
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
    pub(super) fn sync(&mut self) -> std::io::Result<()> {
        self.file.sync_data()
    }

    /// Writes the rest and syncs; gives the buffer back for the next writer.
    pub(super) fn finish(mut self) -> std::io::Result<AlignedBuf> {
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
pub(super) struct Spare {
    /// The adds to move, in journal order.
    pub(super) moving: Vec<(u64, u64, Location)>,
    pub(super) buffers: Buffers,
}

#[derive(Default)]
pub(super) struct Buffers {
    /// The entry log's index records.
    pub(super) records: Vec<Record>,
    /// Journal windows read back from disk.
    pub(super) read: Option<AlignedBuf>,
    /// The log writers' piece.
    pub(super) piece: Option<AlignedBuf>,
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

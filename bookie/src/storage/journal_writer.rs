//! The journal thread: takes every request waiting, writes them as one
//! group, makes it durable with one `fdatasync`, then answers each.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use magnetar_proto::ledger::{AddRequest, BookieErrorCode, MasterKey};
use rustc_hash::FxHashMap;
use tokio::sync::{mpsc, oneshot};

use super::direct_io::{open_direct, AlignedBuf, DIRECT_ALIGN};
use super::index::{Index, Location};
use super::record::{
    pad_group, put_record, put_record_sealed, ADD_HEADER, REC_ADD_SEALED, REC_DELETE, REC_FENCE,
};
use super::tail_cache::TailCache;
use super::{segment_path, Request, MAX_GROUP_BYTES};

pub(super) struct Writer {
    pub(super) dir: PathBuf,
    pub(super) segment: u64,
    pub(super) file: File,
    pub(super) size: u64,
    pub(super) index: Arc<RwLock<Index>>,
    /// Authoritative per-ledger (master key, fenced), including requests not yet synced.
    pub(super) state: FxHashMap<u64, (Option<MasterKey>, bool)>,
    /// Shared with the handles: set with `failed`.
    pub(super) broken: Arc<std::sync::atomic::AtomicBool>,
    /// Set after a failed write or sync: the file's tail is unknown, so the
    /// journal refuses everything from then on rather than guess offsets.
    pub(super) failed: bool,
    pub(super) segment_bytes: u64,
    pub(super) added: Arc<tokio::sync::Notify>,
    /// The segment is open with `O_DIRECT`: groups are padded to the block
    /// size and written where they were staged, which is block-aligned in
    /// memory (through `scratch` if a large group made the buffer move).
    pub(super) direct: bool,
    pub(super) scratch: AlignedBuf,
    /// Where groups start in the staging buffer (see [`staging_buffer`]).
    pub(super) base: usize,
    /// Written groups go here too, for the checkpoint and for reads.
    pub(super) cache: Arc<TailCache>,
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
pub(super) fn open_segment(path: &Path) -> std::io::Result<(File, bool)> {
    let mut options = OpenOptions::new();
    options.write(true).create(true);
    open_direct(&options, path)
}

pub(super) enum Done {
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
    pub(super) fn run(mut self, mut rx: mpsc::Receiver<Request>) {
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
            let started = std::time::Instant::now();
            let res = self.write_group(group).and_then(|_| self.file.sync_data());
            metrics::histogram!(crate::metrics::JOURNAL_SYNC)
                .record(started.elapsed().as_secs_f64());
            metrics::histogram!(crate::metrics::JOURNAL_GROUP_ENTRIES).record(done.len() as f64);
            metrics::histogram!(crate::metrics::JOURNAL_GROUP_BYTES).record(group.len() as f64);
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

    pub(super) fn finish(&mut self, ok: bool, done: &mut Vec<Done>) {
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

    pub(super) fn roll(&mut self) -> std::io::Result<()> {
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

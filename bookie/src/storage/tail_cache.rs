//! The journal's unflushed tail, kept in memory: what the journal wrote
//! since the last checkpoint, in 1 MiB chunks that mirror the segment
//! files. A checkpoint copies adds from here into the entry log instead of
//! reading back from disk what was just written there (the journal writes
//! with `O_DIRECT`, so the page cache does not hold it), and reads of recent
//! entries are served from here too — the role of BookKeeper's write cache,
//! with the journal staying the only durable copy until the checkpoint.
//!
//! It is bounded: when full, further groups are simply not kept (the
//! checkpoint reads those from disk) and the checkpoint is asked to run
//! early once it is half full. A checkpoint releases everything before its
//! mark; chunk buffers are reused, not returned to the allocator.

use std::collections::BTreeMap;
use std::sync::Mutex;

/// Bytes per chunk.
pub const CHUNK: usize = 1024 * 1024;

/// Default bound on the cache (see `BookieConfig::journal_cache_bytes`).
pub const DEFAULT_CACHE_BYTES: u64 = 512 * 1024 * 1024;

pub struct TailCache {
    /// Most chunks held (0: the cache is off).
    limit: usize,
    inner: Mutex<Inner>,
    /// Woken when the cache gets half full: a checkpoint is due.
    wanted: tokio::sync::Notify,
}

#[derive(Default)]
struct Inner {
    /// (segment, offset / CHUNK) → the bytes of the segment from that
    /// chunk's start on, contiguous (a chunk only ever grows at its end).
    chunks: BTreeMap<(u64, u64), Vec<u8>>,
    /// Released chunk buffers, for reuse.
    free: Vec<Vec<u8>>,
}

impl TailCache {
    pub fn new(limit_bytes: u64) -> TailCache {
        TailCache {
            limit: (limit_bytes / CHUNK as u64) as usize,
            inner: Mutex::default(),
            wanted: tokio::sync::Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps `data`, just written at `offset` of journal segment `segment`.
    /// Bytes whose chunk is not held (the cache was full when the chunk
    /// began) are skipped: lookups that need them fail and go to disk.
    pub fn put(&self, segment: u64, mut offset: u64, mut data: &[u8]) {
        if self.limit == 0 {
            return;
        }
        let mut half_full = false;
        let mut g = self.lock();
        while !data.is_empty() {
            let within = (offset % CHUNK as u64) as usize;
            let take = (CHUNK - within).min(data.len());
            let key = (segment, offset / CHUNK as u64);
            let held = g.chunks.len();
            let Inner { chunks, free } = &mut *g;
            let chunk = match chunks.entry(key) {
                std::collections::btree_map::Entry::Occupied(o) => Some(o.into_mut()),
                std::collections::btree_map::Entry::Vacant(v)
                    if within == 0 && held < self.limit =>
                {
                    half_full |= held + 1 == self.limit.div_ceil(2);
                    let mut buf = free.pop().unwrap_or_else(|| Vec::with_capacity(CHUNK));
                    buf.clear();
                    Some(v.insert(buf))
                }
                std::collections::btree_map::Entry::Vacant(_) => None,
            };
            if let Some(chunk) = chunk.filter(|c| c.len() == within) {
                chunk.extend_from_slice(&data[..take]);
            }
            offset += take as u64;
            data = &data[take..];
        }
        drop(g);
        if half_full {
            self.wanted.notify_one();
        }
    }

    /// Whether the cache holds all `len` bytes at `offset` of journal
    /// segment `segment`. (Held bytes stay held until `release_before`.)
    pub fn holds(&self, segment: u64, offset: u64, len: usize) -> bool {
        let g = self.lock();
        let mut pos = offset;
        let end = offset + len as u64;
        while pos < end {
            let within = (pos % CHUNK as u64) as usize;
            let take = ((CHUNK - within) as u64).min(end - pos);
            match g.chunks.get(&(segment, pos / CHUNK as u64)) {
                Some(c) if c.len() as u64 >= within as u64 + take => pos += take,
                _ => return false,
            }
        }
        true
    }

    /// Passes the `len` bytes at `offset` of journal segment `segment` to
    /// `f`, a chunk's piece at a time, if the cache holds them (says
    /// whether it did; `f` may have seen a first piece when it did not).
    /// The lock is taken piece by piece, so the journal's writer is not held
    /// up behind a large copy.
    pub fn visit<E>(
        &self,
        segment: u64,
        offset: u64,
        len: usize,
        mut f: impl FnMut(&[u8]) -> Result<(), E>,
    ) -> Result<bool, E> {
        let mut at = 0;
        while at < len {
            let pos = offset + at as u64;
            let within = (pos % CHUNK as u64) as usize;
            let take = (CHUNK - within).min(len - at);
            let g = self.lock();
            match g.chunks.get(&(segment, pos / CHUNK as u64)) {
                Some(c) if c.len() >= within + take => f(&c[within..within + take])?,
                _ => return Ok(false),
            }
            drop(g);
            at += take;
        }
        Ok(true)
    }

    /// Fills `dst` with the bytes at `offset` of journal segment `segment`,
    /// if the cache holds all of them; says whether it did (when it did
    /// not, `dst` may be partly written).
    pub fn copy(&self, segment: u64, offset: u64, dst: &mut [u8]) -> bool {
        let mut at = 0;
        let done = self.visit(segment, offset, dst.len(), |piece| {
            dst[at..at + piece.len()].copy_from_slice(piece);
            at += piece.len();
            Ok::<(), std::convert::Infallible>(())
        });
        matches!(done, Ok(true))
    }

    /// Drops every chunk wholly before (`segment`, `offset`): a checkpoint
    /// has moved those adds to an entry log.
    pub fn release_before(&self, segment: u64, offset: u64) {
        let mut g = self.lock();
        let keep = g.chunks.split_off(&(segment, offset / CHUNK as u64));
        let gone = std::mem::replace(&mut g.chunks, keep);
        for (_, buf) in gone {
            if g.free.len() + g.chunks.len() < self.limit {
                g.free.push(buf);
            }
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.lock().chunks.values().map(Vec::len).sum()
    }

    /// At least half of the bound is in use: a checkpoint should run.
    pub fn half_full(&self) -> bool {
        self.limit > 0 && self.lock().chunks.len() >= self.limit.div_ceil(2)
    }

    /// Resolves when the cache gets half full (or has since the last call).
    pub async fn wanted(&self) {
        self.wanted.notified().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(n: usize, seed: u8) -> Vec<u8> {
        (0..n).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect()
    }

    #[test]
    fn what_was_put_is_copied_back_across_chunks_and_segments() {
        let cache = TailCache::new(16 * CHUNK as u64);
        let a = bytes(CHUNK + 5000, 1);
        let b = bytes(3 * CHUNK / 2, 2);
        cache.put(4, 0, &a[..4096]);
        cache.put(4, 4096, &a[4096..]);
        cache.put(4, a.len() as u64, &b);
        cache.put(5, 0, &b[..100]);
        let mut out = vec![0u8; a.len() + b.len() - 10];
        assert!(cache.copy(4, 10, &mut out));
        assert_eq!(&out[..a.len() - 10], &a[10..]);
        assert_eq!(&out[a.len() - 10..], &b[..]);
        let mut small = [0u8; 100];
        assert!(cache.copy(5, 0, &mut small));
        assert_eq!(&small[..], &b[..100]);
        // Beyond what was written, or another segment: not held.
        assert!(!cache.copy(5, 50, &mut small));
        assert!(!cache.copy(6, 0, &mut small));
    }

    #[test]
    fn a_full_cache_skips_new_chunks_and_asks_for_a_checkpoint() {
        let cache = TailCache::new(2 * CHUNK as u64);
        let data = bytes(3 * CHUNK, 3);
        assert!(!cache.half_full());
        cache.put(1, 0, &data);
        assert!(cache.half_full());
        assert_eq!(cache.bytes(), 2 * CHUNK);
        let mut out = vec![0u8; 10];
        assert!(cache.copy(1, 2 * CHUNK as u64 - 10, &mut out));
        assert!(
            !cache.copy(1, 2 * CHUNK as u64, &mut out),
            "third chunk not kept"
        );
        // The notification was stored for the checkpoint loop.
        let waited = ready_at_once(cache.wanted());
        assert!(waited, "half full must wake the checkpoint loop");
        // Once released, the chunks are reused: the cache keeps the rest
        // of segment 1's next chunk onwards only from a chunk boundary.
        cache.release_before(1, 2 * CHUNK as u64);
        assert_eq!(cache.bytes(), 0);
        cache.put(1, 3 * CHUNK as u64 + 10, &data[..10]);
        assert_eq!(cache.bytes(), 0, "a chunk is never started mid-way");
        cache.put(2, 0, &data[..10]);
        assert!(cache.copy(2, 0, &mut out));
        assert_eq!(&out[..], &data[..10]);
    }

    #[test]
    fn release_keeps_the_chunk_holding_the_mark() {
        let cache = TailCache::new(8 * CHUNK as u64);
        let data = bytes(2 * CHUNK, 4);
        cache.put(1, 0, &data);
        cache.put(2, 0, &data);
        cache.release_before(2, CHUNK as u64 + 7);
        let mut out = vec![0u8; 16];
        assert!(!cache.copy(1, 0, &mut out));
        assert!(!cache.copy(2, 0, &mut out));
        assert!(cache.copy(2, CHUNK as u64, &mut out));
        assert_eq!(&out[..], &data[CHUNK..CHUNK + 16]);
    }

    #[test]
    fn a_cache_of_zero_bytes_holds_nothing() {
        let cache = TailCache::new(0);
        cache.put(1, 0, &[1, 2, 3]);
        assert!(!cache.copy(1, 0, &mut [0u8; 3]));
        assert!(!cache.half_full());
    }

    /// Polls a future once.
    fn ready_at_once<F: std::future::Future>(f: F) -> bool {
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        let mut f = std::pin::pin!(f);
        f.as_mut().poll(&mut cx).is_ready()
    }
}

//! A topic's delayed-delivery index, one per topic and shared by its
//! subscriptions (Pulsar keeps one per subscription, in memory).
//!
//! A Shared or Key_Shared subscription that reads an entry whose
//! `deliver_at_time` has not come passes it by and records (due time,
//! position) here. When the time comes, the topic's task tells every
//! subscription; each takes back the entries it passed by and has not
//! acknowledged. Nothing per subscription is kept while entries wait.
//!
//! Memory is bounded: past `seal_at` records the in-memory part is sealed
//! into a *bucket* — a ledger of the records sorted by due time, in chunks
//! of a tenth of `seal_at` (at most `CHUNK`) — named in the managed ledger's record; only the chunk due
//! next of each bucket stays in memory. After a restart or failover the
//! buckets are read back from their ledgers and the in-memory part is
//! rebuilt by the subscriptions as they read their backlogs again. A
//! record may come twice (a bucket and the rebuilt part); subscriptions
//! ignore what they have delivered or had acknowledged.
//!
//! This is the index and its stored form, without I/O; the topic's task
//! that reads and writes the buckets and tells the subscriptions is
//! `topic::delayed::run`.

use std::collections::{BTreeSet, VecDeque};
use std::sync::Mutex;

use bytes::{BufMut, Bytes, BytesMut};

use crate::managed_ledger::cursor::Position;
use crate::managed_ledger::DelayedBucket;

/// Most records in one ledger entry of a bucket.
pub const CHUNK: usize = 5_000;

/// Bytes of one record: due time, ledger id, entry id.
const RECORD: usize = 24;

pub type Record = (u64, Position);

struct Bucket {
    /// `None` while it is being written.
    ledger_id: Option<u64>,
    chunks: u64,
    entries: u64,
    /// The next chunk to read into memory.
    next_chunk: u64,
    /// Records read or kept and not released yet, in due order.
    loaded: VecDeque<Record>,
    loading: bool,
    released: u64,
}

impl Bucket {
    fn needs_chunk(&self) -> bool {
        self.loaded.is_empty() && !self.loading && self.next_chunk < self.chunks
    }

    fn exhausted(&self) -> bool {
        self.loaded.is_empty() && self.next_chunk >= self.chunks
    }
}

#[derive(Default)]
struct State {
    tail: BTreeSet<Record>,
    buckets: Vec<Bucket>,
    /// The highest position recorded. Subscriptions read in position order
    /// and pass by the same entries, so one at or before it is recorded
    /// already (by another subscription, or in a bucket before a reload).
    last: Option<Position>,
}

pub struct DelayedIndex {
    state: Mutex<State>,
    pub wake: tokio::sync::Notify,
    seal_at: usize,
    chunk: usize,
}

impl DelayedIndex {
    /// An index holding at most `seal_at` records in memory before it
    /// seals them into a bucket, with the buckets the topic has.
    pub fn new(seal_at: usize, buckets_in: &[DelayedBucket]) -> DelayedIndex {
        let buckets = buckets_in
            .iter()
            .map(|b| Bucket {
                ledger_id: Some(b.ledger_id),
                chunks: b.chunks,
                entries: b.entries,
                next_chunk: 0,
                loaded: VecDeque::new(),
                loading: false,
                released: 0,
            })
            .collect();
        let last = buckets_in.iter().map(|b| b.last).max();
        DelayedIndex {
            state: Mutex::new(State {
                tail: BTreeSet::new(),
                buckets,
                last,
            }),
            wake: tokio::sync::Notify::new(),
            seal_at: seal_at.max(1),
            chunk: (seal_at / 10).clamp(1, CHUNK),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records that `p` is due at `due_ms` (a subscription passed it by),
    /// unless it is recorded already.
    pub fn insert(&self, due_ms: u64, p: Position) {
        let (earliest, full) = {
            let mut s = self.lock();
            if s.last.is_some_and(|l| p <= l) {
                return;
            }
            s.last = Some(p);
            let earliest = s.tail.first().is_none_or(|f| (due_ms, p) < *f);
            s.tail.insert((due_ms, p));
            (earliest, s.tail.len() >= self.seal_at)
        };
        if earliest || full {
            self.wake.notify_one();
        }
    }

    /// Records waiting (in memory and in buckets).
    pub fn len(&self) -> u64 {
        let s = self.lock();
        s.tail.len() as u64
            + s.buckets
                .iter()
                .map(|b| b.entries.saturating_sub(b.released))
                .sum::<u64>()
    }

    /// Wakes the task (the topic is closing: it ends).
    pub fn stop(&self) {
        self.wake.notify_one();
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Records in one ledger entry of a bucket.
    pub fn chunk_size(&self) -> usize {
        self.chunk
    }

    /// Sealed buckets (in ledgers or being written).
    pub fn buckets(&self) -> usize {
        self.lock().buckets.len()
    }

    /// Records held in memory.
    pub fn in_memory(&self) -> usize {
        let s = self.lock();
        s.tail.len() + s.buckets.iter().map(|b| b.loaded.len()).sum::<usize>()
    }

    /// When the next record is due, among those in memory.
    pub fn next_due(&self) -> Option<u64> {
        let s = self.lock();
        let tail = s.tail.first().map(|r| r.0);
        let heads = s
            .buckets
            .iter()
            .filter_map(|b| b.loaded.front().map(|r| r.0));
        tail.into_iter().chain(heads).min()
    }

    /// Takes every record due at `now_ms`, in due order.
    pub fn pop_due(&self, now_ms: u64) -> Vec<Position> {
        let mut s = self.lock();
        let mut out = Vec::new();
        loop {
            let tail = s.tail.first().copied().filter(|r| r.0 <= now_ms);
            let bucket = s
                .buckets
                .iter()
                .enumerate()
                .filter_map(|(i, b)| b.loaded.front().map(|r| (*r, i)))
                .filter(|(r, _)| r.0 <= now_ms)
                .min();
            match (tail, bucket) {
                (Some(t), Some((r, i))) if r < t => {
                    take_from_bucket(&mut s.buckets[i], &mut out);
                }
                (Some(t), _) => {
                    s.tail.pop_first();
                    out.push(t.1);
                }
                (None, Some((_, i))) => take_from_bucket(&mut s.buckets[i], &mut out),
                (None, None) => break,
            }
        }
        out
    }

    /// The (ledger, chunk) of each bucket whose next records must be read.
    pub fn wanted_chunks(&self) -> Vec<(u64, u64)> {
        let mut s = self.lock();
        let mut out = Vec::new();
        for b in s.buckets.iter_mut().filter(|b| b.needs_chunk()) {
            if let Some(id) = b.ledger_id {
                b.loading = true;
                out.push((id, b.next_chunk));
            }
        }
        out
    }

    pub fn chunk_read(&self, ledger_id: u64, chunk: u64, records: Option<Vec<Record>>) {
        let mut s = self.lock();
        if let Some(b) = s
            .buckets
            .iter_mut()
            .find(|b| b.ledger_id == Some(ledger_id))
        {
            b.loading = false;
            if let Some(records) = records {
                b.loaded.extend(records);
                b.next_chunk = chunk + 1;
            }
        }
    }

    /// Buckets fully released: out of the index; their ledgers go.
    pub fn take_exhausted(&self) -> Vec<u64> {
        let mut s = self.lock();
        let mut gone = Vec::new();
        s.buckets.retain(|b| match b.ledger_id {
            Some(id) if b.exhausted() => {
                gone.push(id);
                false
            }
            _ => true,
        });
        gone
    }

    /// The in-memory records to seal, when there are enough of them; they
    /// stay releasable (as a bucket being written) meanwhile.
    pub fn take_for_seal(&self) -> Option<(Vec<Record>, Position)> {
        let mut s = self.lock();
        if s.tail.len() < self.seal_at || s.buckets.iter().any(|b| b.ledger_id.is_none()) {
            return None;
        }
        let records: Vec<Record> = std::mem::take(&mut s.tail).into_iter().collect();
        let n = records.len() as u64;
        let last = s.last.unwrap_or_default();
        s.buckets.push(Bucket {
            ledger_id: None,
            chunks: n.div_ceil(self.chunk as u64),
            entries: n,
            next_chunk: n.div_ceil(self.chunk as u64),
            loaded: records.iter().copied().collect(),
            loading: false,
            released: 0,
        });
        Some((records, last))
    }

    /// The bucket being written is stored in `ledger_id`: only its chunk
    /// due next stays in memory.
    pub fn sealed(&self, ledger_id: u64) {
        let mut s = self.lock();
        if let Some(b) = s.buckets.iter_mut().find(|b| b.ledger_id.is_none()) {
            b.ledger_id = Some(ledger_id);
            let chunk = self.chunk as u64;
            let current = b.released / chunk;
            let keep = ((current + 1) * chunk - b.released) as usize;
            b.loaded.truncate(keep);
            b.next_chunk = current + 1;
        }
    }

    /// Writing the bucket failed: what is left of it goes back to memory.
    pub fn seal_failed(&self) {
        let mut s = self.lock();
        if let Some(i) = s.buckets.iter().position(|b| b.ledger_id.is_none()) {
            let b = s.buckets.remove(i);
            s.tail.extend(b.loaded);
        }
    }
}

fn take_from_bucket(b: &mut Bucket, out: &mut Vec<Position>) {
    if let Some(r) = b.loaded.pop_front() {
        b.released += 1;
        out.push(r.1);
    }
}

/// A chunk's stored form: its records, 24 bytes each, little-endian.
pub fn encode_chunk(records: &[Record]) -> Bytes {
    let mut b = BytesMut::with_capacity(records.len() * RECORD);
    for (due, p) in records {
        b.put_u64_le(*due);
        b.put_u64_le(p.ledger_id);
        b.put_i64_le(p.entry_id);
    }
    b.freeze()
}

pub fn decode_chunk(data: &[u8]) -> Result<Vec<Record>, String> {
    if !data.len().is_multiple_of(RECORD) {
        return Err(format!("a delayed-index chunk of {} bytes", data.len()));
    }
    let word = |c: &[u8], i: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&c[i..i + 8]);
        w
    };
    Ok(data
        .chunks_exact(RECORD)
        .map(|c| {
            let due = u64::from_le_bytes(word(c, 0));
            let ledger = u64::from_le_bytes(word(c, 8));
            let entry = i64::from_le_bytes(word(c, 16));
            (due, Position::new(ledger, entry))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(e: i64) -> Position {
        Position::new(3, e)
    }

    #[test]
    fn records_come_out_in_due_order_from_memory_and_buckets() {
        let idx = DelayedIndex::new(4, &[]);
        for (due, e) in [(50, 1), (10, 2), (30, 3), (20, 4)] {
            idx.insert(due, p(e));
            idx.insert(due, p(e));
        }
        idx.insert(40, p(2));
        assert_eq!(idx.len(), 4, "a position recorded already is not again");
        let (sealing, last) = idx.take_for_seal().expect("full");
        assert_eq!(sealing.len(), 4);
        assert_eq!(last, p(4));
        assert_eq!(idx.in_memory(), 4, "releasable while written");
        idx.insert(15, p(5));
        idx.insert(15, p(3));
        assert_eq!(idx.pop_due(12), vec![p(2)]);
        // Stored in chunks of one record: only the one due next stays.
        idx.sealed(77);
        assert_eq!(idx.in_memory(), 2);
        assert_eq!(idx.next_due(), Some(15));
        assert_eq!(idx.pop_due(40), vec![p(5), p(4)]);
        assert_eq!(idx.wanted_chunks(), vec![(77, 2)]);
        idx.chunk_read(77, 2, Some(vec![(30, p(3))]));
        assert_eq!(idx.pop_due(40), vec![p(3)]);
        assert_eq!(idx.wanted_chunks(), vec![(77, 3)]);
        idx.chunk_read(77, 3, Some(vec![(50, p(1))]));
        assert_eq!(idx.len(), 1);
        assert_eq!(idx.pop_due(60), vec![p(1)]);
        assert_eq!(idx.take_exhausted(), vec![77]);
        assert!(idx.is_empty());
    }

    #[test]
    fn a_sealed_bucket_keeps_one_chunk_in_memory_and_reads_the_next() {
        let n = 2 * CHUNK + 10;
        let idx = DelayedIndex::new(10 * CHUNK, &[]);
        for e in 0..n as i64 {
            idx.insert(1_000 + e as u64, p(e));
        }
        let records = idx.lock().tail.iter().copied().collect::<Vec<_>>();
        {
            // Sealed before it is full, as if the limit were this.
            let mut s = idx.lock();
            s.tail.clear();
            s.buckets.push(Bucket {
                ledger_id: None,
                chunks: 3,
                entries: n as u64,
                next_chunk: 3,
                loaded: records.iter().copied().collect(),
                loading: false,
                released: 0,
            });
        }
        idx.sealed(9);
        assert_eq!(idx.in_memory(), CHUNK);
        let chunks: Vec<Bytes> = records.chunks(CHUNK).map(encode_chunk).collect();
        assert_eq!(chunks.len(), 3);
        assert_eq!(idx.pop_due(1_000 + CHUNK as u64 - 1).len(), CHUNK);
        assert_eq!(idx.wanted_chunks(), vec![(9, 1)]);
        assert!(idx.wanted_chunks().is_empty(), "one read at a time");
        idx.chunk_read(9, 1, Some(decode_chunk(&chunks[1]).unwrap()));
        let next = idx.pop_due(u64::MAX);
        assert_eq!(next.first(), Some(&p(CHUNK as i64)));
        assert_eq!(next.len(), CHUNK);
        assert_eq!(idx.wanted_chunks(), vec![(9, 2)]);
        idx.chunk_read(9, 2, Some(decode_chunk(&chunks[2]).unwrap()));
        assert_eq!(idx.pop_due(u64::MAX).len(), 10);
        assert_eq!(idx.take_exhausted(), vec![9]);
    }

    #[test]
    fn buckets_of_the_record_are_read_from_the_start_after_a_reload() {
        let idx = DelayedIndex::new(
            100,
            &[DelayedBucket {
                ledger_id: 4,
                chunks: 1,
                entries: 2,
                last: p(2),
            }],
        );
        idx.insert(6, p(1));
        assert_eq!(idx.len(), 2, "in the bucket already");
        assert_eq!(idx.len(), 2);
        assert_eq!(idx.next_due(), None, "nothing known before the read");
        assert_eq!(idx.wanted_chunks(), vec![(4, 0)]);
        idx.chunk_read(4, 0, Some(vec![(5, p(1)), (9, p(2))]));
        idx.insert(7, p(3));
        assert_eq!(idx.pop_due(10), vec![p(1), p(3), p(2)]);
    }

    #[test]
    fn a_failed_seal_puts_what_is_left_back_in_memory() {
        let idx = DelayedIndex::new(2, &[]);
        idx.insert(1, p(1));
        idx.insert(2, p(2));
        assert!(idx.take_for_seal().is_some());
        assert_eq!(idx.pop_due(1), vec![p(1)]);
        idx.seal_failed();
        assert_eq!(idx.len(), 1);
        assert_eq!(idx.pop_due(5), vec![p(2)]);
    }

    #[test]
    fn a_cut_chunk_is_refused() {
        let data = encode_chunk(&[(1, p(1))]);
        assert!(decode_chunk(&data[..20]).is_err());
        assert_eq!(decode_chunk(&data).unwrap(), vec![(1, p(1))]);
    }
}

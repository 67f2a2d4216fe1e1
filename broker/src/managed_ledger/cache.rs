//! The managed ledger's caches: the tail (entries just written, for readers
//! at the head of the topic) and the read-ahead (entries fetched along with
//! a missed one, for catch-up readers). Both are bounded; neither holds data
//! that is not on the bookies.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;

use bytes::Bytes;

use super::cursor::Position;

/// Read-ahead entries kept per topic (the oldest go first).
pub const READ_AHEAD_CACHE_ENTRIES: usize = 4096;

#[derive(Default)]
struct Tail {
    entries: BTreeMap<Position, Bytes>,
    order: VecDeque<Position>,
    bytes: usize,
}

pub struct EntryCache {
    tail: Mutex<Tail>,
    tail_limit_bytes: usize,
    read_ahead: Mutex<BTreeMap<Position, Bytes>>,
}

impl EntryCache {
    pub fn new(tail_limit_bytes: usize) -> EntryCache {
        EntryCache {
            tail: Mutex::default(),
            tail_limit_bytes,
            read_ahead: Mutex::default(),
        }
    }

    /// Keeps a just-confirmed entry, evicting the oldest beyond the limit.
    pub fn put_tail(&self, pos: Position, data: Bytes) {
        let mut c = self.tail.lock().unwrap_or_else(|e| e.into_inner());
        c.bytes += data.len();
        c.entries.insert(pos, data);
        c.order.push_back(pos);
        while c.bytes > self.tail_limit_bytes {
            let Some(old) = c.order.pop_front() else {
                break;
            };
            if let Some(d) = c.entries.remove(&old) {
                c.bytes -= d.len();
            }
        }
    }

    /// A cached entry: from the tail (kept), or from the read-ahead (taken:
    /// a catch-up reader reads each entry once).
    pub fn get(&self, pos: Position) -> Option<Bytes> {
        if let Some(d) = self
            .tail
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entries
            .get(&pos)
        {
            return Some(d.clone());
        }
        self.read_ahead
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&pos)
    }

    pub fn put_read_ahead(&self, entries: impl IntoIterator<Item = (Position, Bytes)>) {
        let mut ra = self.read_ahead.lock().unwrap_or_else(|e| e.into_inner());
        ra.extend(entries);
        while ra.len() > READ_AHEAD_CACHE_ENTRIES {
            ra.pop_first();
        }
    }

    pub fn tail_bytes(&self) -> usize {
        self.tail.lock().unwrap_or_else(|e| e.into_inner()).bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_is_bounded_and_read_ahead_is_read_once() {
        let c = EntryCache::new(25);
        for e in 0..5 {
            c.put_tail(Position::new(1, e), Bytes::from(vec![0u8; 10]));
        }
        assert!(c.tail_bytes() <= 25);
        assert!(
            c.get(Position::new(1, 0)).is_none(),
            "the oldest went first"
        );
        assert!(c.get(Position::new(1, 4)).is_some());
        assert!(c.get(Position::new(1, 4)).is_some(), "tail entries stay");
        c.put_read_ahead([(Position::new(2, 0), Bytes::from_static(b"x"))]);
        assert!(c.get(Position::new(2, 0)).is_some());
        assert!(
            c.get(Position::new(2, 0)).is_none(),
            "read-ahead entries are taken"
        );
    }
}

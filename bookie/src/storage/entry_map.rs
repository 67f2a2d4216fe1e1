//! A ledger's entries that are still in the journal, by entry id.
//!
//! A bookie takes a ledger's adds in about ascending order (batches on
//! separate streams can swap places) and a checkpoint lets them go oldest
//! first, so most of them sit in a window of slots from `base` on: an add is
//! an index into a ring buffer, a checkpoint's removal leaves a hole that the
//! front pops, and the buffer is reused from one checkpoint to the next. A
//! B-tree here allocated and freed a node every few adds, several hundred
//! thousand a second on a busy bookie, and fresh memory costs page faults.
//!
//! Entries far from the window (an old entry re-written by recovery or
//! compaction, a jump ahead) go to a B-tree beside it, so a stray entry
//! never stretches the window. An entry is in one of the two, never both.

use std::collections::{BTreeMap, VecDeque};

/// Holes the window may open to take an entry beside it (striping leaves
/// one every few entries; a bookie of an E=5, Qw=2 ensemble holds 2 in 5).
const MAX_GAP: u64 = 4096;

/// A window emptied with more slots than this gives its memory back (an
/// idle ledger should not keep a busy ledger's buffer).
const KEEP_SLOTS: usize = 1024;

#[derive(Debug)]
pub struct EntryMap<V> {
    /// Entry id of `slots[0]`.
    base: u64,
    slots: VecDeque<Option<V>>,
    sparse: BTreeMap<u64, V>,
    len: usize,
}

impl<V> Default for EntryMap<V> {
    fn default() -> Self {
        EntryMap {
            base: 0,
            slots: VecDeque::new(),
            sparse: BTreeMap::new(),
            len: 0,
        }
    }
}

impl<V: Copy> EntryMap<V> {
    pub fn len(&self) -> usize {
        self.len
    }

    /// One past the window's last slot.
    fn end(&self) -> u64 {
        self.base + self.slots.len() as u64
    }

    fn slot(&self, entry: u64) -> Option<usize> {
        (entry >= self.base && entry < self.end()).then(|| (entry - self.base) as usize)
    }

    pub fn get(&self, entry: u64) -> Option<&V> {
        // A hole of the window may hold an entry that went to the side
        // before the window grew over it.
        match self.slot(entry).and_then(|i| self.slots[i].as_ref()) {
            Some(v) => Some(v),
            None => self.sparse.get(&entry),
        }
    }

    /// Sets `entry` to `value`; returns what it was.
    pub fn insert(&mut self, entry: u64, value: V) -> Option<V> {
        if self.slots.is_empty() {
            self.base = entry;
        } else if entry >= self.end() && entry - self.end() <= MAX_GAP {
            let holes = (entry - self.end()) as usize;
            self.slots.extend(std::iter::repeat_n(None, holes));
        } else if entry < self.base && self.base - entry <= MAX_GAP {
            for _ in entry..self.base {
                self.slots.push_front(None);
            }
            self.base = entry;
        }
        let old = match self.slot(entry) {
            Some(i) => self.slots[i].replace(value),
            None if entry == self.end() => {
                self.slots.push_back(Some(value));
                None
            }
            None => return self.insert_sparse(entry, value),
        };
        // An entry that went to the side while the window was elsewhere
        // moves into it.
        let old = old.or_else(|| self.sparse_remove(entry));
        if old.is_none() {
            self.len += 1;
        }
        old
    }

    fn insert_sparse(&mut self, entry: u64, value: V) -> Option<V> {
        let old = self.sparse.insert(entry, value);
        if old.is_none() {
            self.len += 1;
        }
        old
    }

    fn sparse_remove(&mut self, entry: u64) -> Option<V> {
        if self.sparse.is_empty() {
            return None;
        }
        self.sparse.remove(&entry)
    }

    /// Removes `entry`; returns what it was.
    pub fn remove(&mut self, entry: u64) -> Option<V> {
        let old = match self.slot(entry).and_then(|i| self.slots[i].take()) {
            Some(v) => {
                self.trim();
                Some(v)
            }
            None => self.sparse_remove(entry),
        };
        if old.is_some() {
            self.len -= 1;
        }
        old
    }

    /// Drops the holes at both ends of the window.
    fn trim(&mut self) {
        while let Some(None) = self.slots.front() {
            self.slots.pop_front();
            self.base += 1;
        }
        while let Some(None) = self.slots.back() {
            self.slots.pop_back();
        }
        if self.slots.is_empty() && self.slots.capacity() > KEEP_SLOTS {
            self.slots = VecDeque::new();
        }
    }

    /// The entries from `from` on, in entry order.
    pub fn range_from(&self, from: u64) -> impl Iterator<Item = (u64, &V)> + '_ {
        let skip = from.saturating_sub(self.base).min(self.slots.len() as u64) as usize;
        let window = self
            .slots
            .iter()
            .enumerate()
            .skip(skip)
            .filter_map(|(i, v)| Some((self.base + i as u64, v.as_ref()?)));
        Merge {
            a: window.peekable(),
            b: self.sparse.range(from..).map(|(e, v)| (*e, v)).peekable(),
        }
    }

    /// Every value, in no particular order.
    pub fn into_values(self) -> impl Iterator<Item = V> {
        self.slots
            .into_iter()
            .flatten()
            .chain(self.sparse.into_values())
    }
}

/// Two iterators ascending by key, as one (keys never repeat across them).
struct Merge<A: Iterator, B: Iterator> {
    a: std::iter::Peekable<A>,
    b: std::iter::Peekable<B>,
}

impl<'a, V: 'a, A, B> Iterator for Merge<A, B>
where
    A: Iterator<Item = (u64, &'a V)>,
    B: Iterator<Item = (u64, &'a V)>,
{
    type Item = (u64, &'a V);

    fn next(&mut self) -> Option<Self::Item> {
        match (self.a.peek(), self.b.peek()) {
            (Some((x, _)), Some((y, _))) if y < x => self.b.next(),
            (Some(_), _) => self.a.next(),
            (None, _) => self.b.next(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The map against a B-tree, through a sequence of inserts and removes.
    fn check(ops: &[(bool, u64)]) {
        let mut map = EntryMap::default();
        let mut model = BTreeMap::new();
        for (n, &(insert, entry)) in ops.iter().enumerate() {
            if insert {
                assert_eq!(
                    map.insert(entry, n),
                    model.insert(entry, n),
                    "insert {entry}"
                );
            } else {
                assert_eq!(map.remove(entry), model.remove(&entry), "remove {entry}");
            }
            assert_eq!(map.len(), model.len());
        }
        for e in model.keys().copied().chain([0, 5, 10_000, u64::MAX / 2]) {
            assert_eq!(map.get(e), model.get(&e), "get {e}");
        }
        for from in [0, 3, 100, 5_000, 20_000] {
            let got: Vec<_> = map.range_from(from).map(|(e, v)| (e, *v)).collect();
            let want: Vec<_> = model.range(from..).map(|(e, v)| (*e, *v)).collect();
            assert_eq!(got, want, "range from {from}");
        }
        let mut values: Vec<_> = map.into_values().collect();
        values.sort_unstable();
        let mut want: Vec<_> = model.into_values().collect();
        want.sort_unstable();
        assert_eq!(values, want);
    }

    #[test]
    fn in_order_adds_then_a_checkpoint_in_order() {
        let mut ops: Vec<_> = (0..3000).map(|e| (true, e)).collect();
        ops.extend((0..2990).map(|e| (false, e)));
        ops.extend((3000..3010).map(|e| (true, e)));
        check(&ops);
    }

    #[test]
    fn striped_adds_leave_holes_and_batches_swap() {
        // A bookie of a 3/2/2 ensemble: two entries in three, and batches
        // that arrive out of order.
        let mine = |e: &u64| e % 3 != 1;
        let mut ops: Vec<_> = (100..200).filter(mine).map(|e| (true, e)).collect();
        ops.extend((0..100).filter(mine).map(|e| (true, e)));
        ops.extend((200..300).filter(mine).map(|e| (true, e)));
        // Removed in journal order (not entry order), one re-written.
        ops.push((true, 150));
        ops.extend((100..200).filter(mine).map(|e| (false, e)));
        ops.extend((0..50).filter(mine).map(|e| (false, e)));
        check(&ops);
    }

    #[test]
    fn entries_far_from_the_window_go_to_the_side_and_come_back() {
        let ops = vec![
            (true, 10_000),
            (true, 10_001),
            // Far behind: recovery re-writes an old entry.
            (true, 3),
            // Far ahead.
            (true, 30_000),
            (true, 3),
            (false, 10_000),
            (false, 10_001),
            // The window is empty: it restarts at 3's neighbour, and 3 moves
            // in from the side when re-written.
            (true, 4),
            (true, 3),
            (false, 30_000),
            (false, 30_000),
            (true, 2),
            // Beside the window, then covered by it as it grows.
            (true, 3 + MAX_GAP + 10),
            (true, 3 + MAX_GAP - 5),
            (true, 3 + MAX_GAP + 20),
        ];
        check(&ops);
    }

    #[test]
    fn an_emptied_large_window_gives_its_memory_back() {
        let mut map = EntryMap::default();
        for e in 0..10_000u64 {
            map.insert(e, e);
        }
        for e in 0..10_000u64 {
            assert_eq!(map.remove(e), Some(e));
        }
        assert_eq!(map.len(), 0);
        assert_eq!(map.slots.capacity(), 0);
        map.insert(7, 7);
        assert_eq!(map.get(7), Some(&7));
    }

    #[test]
    fn mixed_sequences_match_a_btree() {
        // A deterministic pseudo-random mix around a moving front.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut ops = Vec::new();
        for i in 0..20_000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let near = (i / 2).saturating_sub(x % 64) + x % 96;
            let entry = if x.is_multiple_of(97) {
                x % 50_000
            } else {
                near
            };
            ops.push((!x.is_multiple_of(5), entry));
        }
        check(&ops);
    }
}

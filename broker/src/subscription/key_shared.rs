//! Key_Shared: any number of consumers; every message of a key goes to the
//! same consumer, in order. A key is hashed (Murmur3, as Pulsar does) to one
//! of 65,536 slots; each consumer owns ranges of slots:
//! - auto-split (the default): the first consumer owns every slot; each
//!   joining one takes the lower half of the largest range; a leaving one's
//!   ranges go to the owner of the next range (or the previous, at the end);
//! - sticky: each consumer names its ranges; an overlap is refused with
//!   ConsumerAssignError, and slots nobody owns wait for an owner.
//!
//! Order across changes of ownership: an entry goes to its slot's owner
//! only while no *other* consumer holds unacknowledged entries of that slot
//! (they were sent before the change). Until those are acknowledged — or
//! come back, when their holder leaves, and go first — the slot's entries
//! wait, and so does every later entry of the slot: per-key order holds
//! across joins and leaves. Entries that must wait are held back while the
//! dispatcher looks ahead (at most [`LOOKAHEAD`] entries) for others.
//!
//! The dispatcher needs an entry's key before it decides; it asks for the
//! keys it lacks (`wants_keys`) and the subscription task reads them
//! (`learn_key`).

use std::collections::BTreeMap;
use std::time::Instant;

use magnetar_proto::hash::KEY_HASH_SLOTS;
use magnetar_proto::pulsar::{command_subscribe::SubType, ServerError};
use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};

use super::dispatcher::{
    ConsumerInfo, ConsumerKey, Delivery, Dispatcher, EntrySource, KeySharedSpec,
};
use super::redelivery::Unacked;
use crate::managed_ledger::cursor::Position;
use crate::BrokerError;

/// Entries the dispatcher looks at, past those that must wait, for one it
/// can send.
pub const LOOKAHEAD: usize = 1000;
/// Keys asked for at a time.
const KEYS_PER_ASK: usize = 256;

const LAST_SLOT: u16 = (KEY_HASH_SLOTS - 1) as u16;

/// Who owns which slots.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Owners {
    /// No consumer yet: the mode comes with the first.
    None,
    /// Ranges by their last slot (inclusive); together they cover every slot.
    AutoSplit(BTreeMap<u16, ConsumerKey>),
    /// Ranges (first, last, owner), not overlapping.
    Sticky(Vec<(u16, u16, ConsumerKey)>),
}

impl Owners {
    fn owner(&self, slot: u16) -> Option<ConsumerKey> {
        match self {
            Owners::None => None,
            Owners::AutoSplit(ranges) => ranges.range(slot..).next().map(|(_, c)| *c),
            Owners::Sticky(ranges) => ranges
                .iter()
                .find(|(a, b, _)| (*a..=*b).contains(&slot))
                .map(|(_, _, c)| *c),
        }
    }

    fn add(&mut self, key: ConsumerKey, spec: &KeySharedSpec) -> Result<(), BrokerError> {
        let assign = |msg: String| BrokerError::new(ServerError::ConsumerAssignError, msg);
        if *self == Owners::None {
            *self = match spec {
                KeySharedSpec::AutoSplit => Owners::AutoSplit(BTreeMap::new()),
                KeySharedSpec::Sticky(_) => Owners::Sticky(Vec::new()),
            };
        }
        match (self, spec) {
            (Owners::AutoSplit(ranges), KeySharedSpec::AutoSplit) if ranges.is_empty() => {
                ranges.insert(LAST_SLOT, key);
            }
            (Owners::AutoSplit(ranges), KeySharedSpec::AutoSplit) => {
                // The largest range (the first of equals) is split in two;
                // the newcomer takes the lower half.
                let mut start = 0u32;
                let mut best: Option<(u32, u16)> = None; // (size, last)
                for &last in ranges.keys() {
                    let size = last as u32 + 1 - start;
                    if best.is_none_or(|(s, _)| size > s) {
                        best = Some((size, last));
                    }
                    start = last as u32 + 1;
                }
                let (size, last) = best.unwrap_or((0, 0));
                if size < 2 {
                    return Err(assign("no hash range left to split".into()));
                }
                let first = last as u32 + 1 - size;
                ranges.insert((first + size / 2 - 1) as u16, key);
            }
            (Owners::Sticky(ranges), KeySharedSpec::Sticky(asked)) => {
                if asked.is_empty() {
                    return Err(assign(
                        "a sticky Key_Shared consumer needs hash ranges".into(),
                    ));
                }
                for (i, &(a, b)) in asked.iter().enumerate() {
                    if a > b {
                        return Err(assign(format!("hash range [{a}, {b}] is empty")));
                    }
                    let theirs = ranges.iter().map(|&(x, y, _)| (x, y));
                    let mine = asked
                        .iter()
                        .enumerate()
                        .filter(|(j, _)| *j != i)
                        .map(|(_, r)| *r);
                    if let Some((x, y)) = theirs.chain(mine).find(|&(x, y)| a <= y && x <= b) {
                        return Err(assign(format!(
                            "hash range [{a}, {b}] overlaps the range [{x}, {y}]"
                        )));
                    }
                }
                ranges.extend(asked.iter().map(|&(a, b)| (a, b, key)));
            }
            _ => return Err(BrokerError::new(
                ServerError::ConsumerBusy,
                "Key_Shared subscription has consumers of the other mode (auto-split or sticky)",
            )),
        }
        Ok(())
    }

    fn remove(&mut self, key: ConsumerKey) {
        match self {
            Owners::None => {}
            Owners::AutoSplit(ranges) => {
                let mine: Vec<u16> = ranges
                    .iter()
                    .filter(|(_, c)| **c == key)
                    .map(|(l, _)| *l)
                    .collect();
                for last in mine {
                    ranges.remove(&last);
                    // The next range takes it over; at the end, the previous.
                    if ranges.range(last..).next().is_none() {
                        if let Some((&prev, &owner)) = ranges.range(..last).next_back() {
                            ranges.remove(&prev);
                            ranges.insert(last, owner);
                        }
                    }
                }
                if ranges.is_empty() {
                    *self = Owners::None;
                }
            }
            Owners::Sticky(ranges) => {
                ranges.retain(|(_, _, c)| *c != key);
                if ranges.is_empty() {
                    *self = Owners::None;
                }
            }
        }
    }
}

/// How far `next` looked since the state last changed: every candidate up
/// to `last` waits (their slots in `waiting`), so the next call goes on
/// after it. Any event that could let one of them go drops it.
#[derive(Default)]
struct Scan {
    last: Option<Position>,
    scanned: usize,
    waiting: HashSet<u16>,
}

pub struct KeyShared {
    /// Consumers in arrival order, with their permits.
    consumers: Vec<(ConsumerKey, u32)>,
    owners: Owners,
    unacked: Unacked,
    /// The slot of every entry whose key was read and that is not yet
    /// acknowledged.
    slots: HashMap<Position, u16>,
    /// Per slot, who holds how many delivered, unacknowledged entries.
    holding: HashMap<u16, Vec<(ConsumerKey, u32)>>,
    scan: Option<Scan>,
}

impl KeyShared {
    pub fn new(unacked: Unacked) -> KeyShared {
        KeyShared {
            consumers: Vec::new(),
            owners: Owners::None,
            unacked,
            slots: HashMap::default(),
            holding: HashMap::default(),
            scan: None,
        }
    }

    fn permits(&self, key: ConsumerKey) -> u32 {
        self.consumers
            .iter()
            .find(|(k, _)| *k == key)
            .map_or(0, |(_, p)| *p)
    }

    /// Whether a consumer other than `owner` holds entries of `slot`.
    fn draining(&self, slot: u16, owner: ConsumerKey) -> bool {
        self.holding
            .get(&slot)
            .is_some_and(|h| h.iter().any(|(c, n)| *c != owner && *n > 0))
    }

    fn hold(&mut self, slot: u16, c: ConsumerKey) {
        let h = self.holding.entry(slot).or_default();
        match h.iter_mut().find(|(k, _)| *k == c) {
            Some((_, n)) => *n += 1,
            None => h.push((c, 1)),
        }
    }

    /// `p`, held by `c`, is no longer: acknowledged or back for redelivery.
    fn release(&mut self, p: Position, c: ConsumerKey) {
        let Some(slot) = self.slots.get(&p) else {
            return;
        };
        if let Some(h) = self.holding.get_mut(slot) {
            if let Some(i) = h.iter().position(|(k, _)| *k == c) {
                h[i].1 = h[i].1.saturating_sub(1);
                if h[i].1 == 0 {
                    h.swap_remove(i);
                }
            }
            if h.is_empty() {
                self.holding.remove(slot);
            }
        }
    }

    /// Releases every entry `c` holds (they go back for redelivery).
    fn release_all_of(&mut self, c: ConsumerKey) {
        let mine: Vec<Position> = self
            .unacked
            .pending()
            .filter(|(_, k)| *k == c)
            .map(|(p, _)| p)
            .collect();
        for p in mine {
            self.release(p, c);
        }
    }
}

impl Dispatcher for KeyShared {
    fn sub_type(&self) -> SubType {
        SubType::KeyShared
    }

    fn add_consumer(&mut self, c: ConsumerInfo, _now: Instant) -> Result<(), BrokerError> {
        self.scan = None;
        if let Err(e) = self.owners.add(c.key, &c.key_shared) {
            if self.consumers.is_empty() {
                self.owners = Owners::None;
            }
            return Err(e);
        }
        self.consumers.push((c.key, 0));
        Ok(())
    }

    fn remove_consumer(&mut self, key: ConsumerKey, _now: Instant) {
        self.scan = None;
        if let Some(i) = self.consumers.iter().position(|(k, _)| *k == key) {
            self.consumers.remove(i);
            self.owners.remove(key);
            self.release_all_of(key);
            self.unacked.give_back(key);
        }
    }

    fn consumers(&self) -> Vec<ConsumerKey> {
        self.consumers.iter().map(|(k, _)| *k).collect()
    }

    fn flow(&mut self, key: ConsumerKey, permits: u32) {
        self.scan = None;
        if let Some((_, p)) = self.consumers.iter_mut().find(|(k, _)| *k == key) {
            *p = p.saturating_add(permits);
        }
    }

    fn wants_keys(&self, src: &dyn EntrySource) -> Vec<Position> {
        // Nothing can be decided while no consumer can take anything.
        if self.consumers.iter().all(|(_, p)| *p == 0) {
            return Vec::new();
        }
        let (after, scanned) = self
            .scan
            .as_ref()
            .map_or((None, 0), |s| (s.last, s.scanned));
        self.unacked
            .candidates_after(src, after)
            .take(LOOKAHEAD.saturating_sub(scanned))
            .map(|(p, _)| p)
            .filter(|p| !self.slots.contains_key(p))
            .take(KEYS_PER_ASK)
            .collect()
    }

    fn learn_key(&mut self, p: Position, slot: u16) {
        self.slots.insert(p, slot);
    }

    fn next(&mut self, src: &dyn EntrySource, _now: Instant) -> Option<Delivery> {
        // Nobody can take anything: no need to look (this runs on every ack).
        if self.consumers.iter().all(|(_, p)| *p == 0) {
            return None;
        }
        let mut scan = self.scan.take().unwrap_or_default();
        let mut chosen = None;
        for (p, count) in self.unacked.candidates_after(src, scan.last) {
            if scan.scanned >= LOOKAHEAD {
                break;
            }
            // An entry whose key is not read yet: it and what follows wait
            // for `learn_key` (order within a slot is decided in position order).
            let Some(&slot) = self.slots.get(&p) else {
                break;
            };
            if !scan.waiting.contains(&slot) {
                match self.owners.owner(slot) {
                    Some(c) if self.permits(c) > 0 && !self.draining(slot, c) => {
                        chosen = Some((p, count, c));
                        break;
                    }
                    _ => {
                        scan.waiting.insert(slot);
                    }
                }
            }
            scan.last = Some(p);
            scan.scanned += 1;
        }
        // Sending only uses permits and adds holders: what waits still waits.
        self.scan = Some(scan);
        let (position, redelivery_count, consumer) = chosen?;
        self.unacked.take(position, src);
        Some(Delivery {
            consumer,
            position,
            redelivery_count,
        })
    }

    fn sent(&mut self, d: Delivery, messages: u32) {
        if let Some((_, p)) = self.consumers.iter_mut().find(|(k, _)| *k == d.consumer) {
            *p = p.saturating_sub(messages);
        }
        if let Some(&slot) = self.slots.get(&d.position) {
            self.hold(slot, d.consumer);
        }
        self.unacked.delivered(d.position, d.consumer);
    }

    fn unacked(&mut self) -> &mut Unacked {
        self.scan = None;
        &mut self.unacked
    }

    fn unacked_ref(&self) -> &Unacked {
        &self.unacked
    }

    fn into_unacked(self: Box<Self>) -> Unacked {
        self.unacked
    }

    fn acked(&mut self, p: Position) {
        self.scan = None;
        if let Some(c) = self.unacked.holder(p) {
            self.release(p, c);
        }
        self.slots.remove(&p);
        self.unacked.acked(p);
    }

    fn acked_through(&mut self, p: Position) {
        self.scan = None;
        let done: Vec<(Position, ConsumerKey)> = self
            .unacked
            .pending()
            .take_while(|(q, _)| *q <= p)
            .collect();
        for (q, c) in done {
            self.release(q, c);
        }
        self.slots.retain(|q, _| *q > p);
        self.unacked.acked_through(p);
    }

    fn redeliver(&mut self, key: ConsumerKey, positions: Option<&[Position]>) {
        self.scan = None;
        match positions {
            Some(ps) => {
                for p in ps {
                    if self.unacked.holder(*p) == Some(key) {
                        self.release(*p, key);
                    }
                }
                self.unacked.give_back_some(key, ps);
            }
            None => {
                self.release_all_of(key);
                self.unacked.give_back(key);
            }
        }
    }

    fn rewind(&mut self, next_read: Position) {
        self.scan = None;
        self.slots.clear();
        self.holding.clear();
        self.unacked.rewind(next_read);
    }

    fn not_sent(&mut self, d: Delivery) {
        self.scan = None;
        // `sent` was not called: nothing is held for it.
        self.unacked.not_delivered(d.position);
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::Entries;
    use super::*;

    fn c(id: u64) -> ConsumerInfo {
        ConsumerInfo {
            key: (1, id),
            name: format!("c{id}"),
            priority: 0,
            key_shared: KeySharedSpec::AutoSplit,
        }
    }

    fn sticky(id: u64, ranges: &[(u16, u16)]) -> ConsumerInfo {
        ConsumerInfo {
            key_shared: KeySharedSpec::Sticky(ranges.to_vec()),
            ..c(id)
        }
    }

    /// Entries 0..n of ledger 1 with slots from `slot_of(entry)`.
    fn with_slots(d: &mut KeyShared, n: i64, slot_of: impl Fn(i64) -> u16) {
        for e in 0..n {
            d.learn_key(Position::new(1, e), slot_of(e));
        }
    }

    /// Deliveries until none: (consumer, entry, redelivery count).
    fn drain(d: &mut KeyShared, src: &Entries) -> Vec<(u64, i64, u32)> {
        super::super::testing::deliver_counted(d, src, Instant::now())
    }

    #[test]
    fn auto_split_halves_the_largest_range_and_merges_on_leave() {
        let mut o = Owners::None;
        o.add((1, 1), &KeySharedSpec::AutoSplit).unwrap();
        assert_eq!(o.owner(0), Some((1, 1)));
        assert_eq!(o.owner(LAST_SLOT), Some((1, 1)));
        o.add((1, 2), &KeySharedSpec::AutoSplit).unwrap();
        assert_eq!(
            o.owner(0),
            Some((1, 2)),
            "the newcomer takes the lower half"
        );
        assert_eq!(o.owner(32767), Some((1, 2)));
        assert_eq!(o.owner(32768), Some((1, 1)));
        o.add((1, 3), &KeySharedSpec::AutoSplit).unwrap();
        assert_eq!(o.owner(0), Some((1, 3)));
        assert_eq!(o.owner(16384), Some((1, 2)));
        o.remove((1, 3));
        assert_eq!(o.owner(0), Some((1, 2)), "the next range takes it over");
        o.remove((1, 1));
        assert_eq!(
            o.owner(LAST_SLOT),
            Some((1, 2)),
            "at the end, the previous one"
        );
        o.remove((1, 2));
        assert_eq!(o, Owners::None);
        // Sticky and auto-split do not mix.
        o.add((1, 1), &KeySharedSpec::AutoSplit).unwrap();
        let e = o
            .add((1, 2), &KeySharedSpec::Sticky(vec![(0, 9)]))
            .unwrap_err();
        assert_eq!(e.code(), ServerError::ConsumerBusy);
    }

    #[test]
    fn sticky_ranges_must_not_overlap() {
        let mut o = Owners::None;
        o.add((1, 1), &KeySharedSpec::Sticky(vec![(0, 99), (200, 299)]))
            .unwrap();
        let e = o
            .add((1, 2), &KeySharedSpec::Sticky(vec![(250, 400)]))
            .unwrap_err();
        assert_eq!(e.code(), ServerError::ConsumerAssignError);
        assert!(e.to_string().contains("[200, 299]"), "{e}");
        for bad in [vec![], vec![(5, 4)], vec![(100, 150), (150, 160)]] {
            let e = o
                .add((1, 3), &KeySharedSpec::Sticky(bad.clone()))
                .unwrap_err();
            assert_eq!(e.code(), ServerError::ConsumerAssignError, "{bad:?}");
        }
        o.add((1, 2), &KeySharedSpec::Sticky(vec![(100, 199)]))
            .unwrap();
        assert_eq!(o.owner(150), Some((1, 2)));
        assert_eq!(o.owner(300), None, "nobody owns it");
        let e = o.add((1, 4), &KeySharedSpec::AutoSplit).unwrap_err();
        assert_eq!(e.code(), ServerError::ConsumerBusy);
    }

    #[test]
    fn a_key_always_goes_to_its_owner_in_order() {
        let src = Entries::new(1, 40);
        let mut d = KeyShared::new(Unacked::new(Position::new(1, 0)));
        d.add_consumer(c(1), Instant::now()).unwrap();
        d.add_consumer(c(2), Instant::now()).unwrap();
        // Slot 10 is c2's (lower half), 40000 c1's.
        with_slots(&mut d, 40, |e| if e % 2 == 0 { 10 } else { 40000 });
        d.flow((1, 1), 100);
        d.flow((1, 2), 100);
        let got = drain(&mut d, &src);
        assert_eq!(got.len(), 40);
        for (consumer, entry, _) in &got {
            assert_eq!(*consumer, if entry % 2 == 0 { 2 } else { 1 });
        }
    }

    #[test]
    fn a_consumer_without_permits_holds_back_only_its_keys() {
        let src = Entries::new(1, 6);
        let mut d = KeyShared::new(Unacked::new(Position::new(1, 0)));
        d.add_consumer(c(1), Instant::now()).unwrap();
        d.add_consumer(c(2), Instant::now()).unwrap();
        with_slots(&mut d, 6, |e| if e < 3 { 10 } else { 40000 });
        d.flow((1, 1), 10);
        // c2 (slot 10) has no permits: 0..3 wait, 3..6 go to c1.
        assert_eq!(drain(&mut d, &src), vec![(1, 3, 0), (1, 4, 0), (1, 5, 0)]);
        d.flow((1, 2), 10);
        assert_eq!(
            drain(&mut d, &src),
            vec![(2, 0, 0), (2, 1, 0), (2, 2, 0)],
            "held back, in order, not counted as redeliveries"
        );
    }

    #[test]
    fn a_newcomer_gets_a_key_only_after_earlier_entries_of_it_are_acked() {
        let mut src = Entries::new(1, 6);
        let now = Instant::now();
        let mut d = KeyShared::new(Unacked::new(Position::new(1, 0)));
        d.add_consumer(c(1), now).unwrap();
        with_slots(&mut d, 6, |_| 10); // one key
        d.flow((1, 1), 2);
        assert_eq!(drain(&mut d, &src), vec![(1, 0, 0), (1, 1, 0)]);
        // c2 joins and takes the lower half (slot 10 is now c2's)...
        d.add_consumer(c(2), now).unwrap();
        d.flow((1, 2), 10);
        assert!(drain(&mut d, &src).is_empty(), "c1 still holds 0 and 1");
        src.ack(Position::new(1, 0));
        d.acked(Position::new(1, 0));
        assert!(drain(&mut d, &src).is_empty(), "c1 still holds 1");
        src.ack(Position::new(1, 1));
        d.acked(Position::new(1, 1));
        assert_eq!(
            drain(&mut d, &src),
            vec![(2, 2, 0), (2, 3, 0), (2, 4, 0), (2, 5, 0)]
        );
    }

    #[test]
    fn a_leaving_consumers_entries_go_first_to_the_new_owner() {
        let src = Entries::new(1, 5);
        let now = Instant::now();
        let mut d = KeyShared::new(Unacked::new(Position::new(1, 0)));
        d.add_consumer(c(1), now).unwrap();
        d.add_consumer(c(2), now).unwrap();
        with_slots(&mut d, 5, |_| 10); // c2's
        d.flow((1, 2), 2);
        d.flow((1, 1), 10);
        assert_eq!(drain(&mut d, &src), vec![(2, 0, 0), (2, 1, 0)]);
        d.remove_consumer((1, 2), now);
        assert_eq!(
            drain(&mut d, &src),
            vec![(1, 0, 1), (1, 1, 1), (1, 2, 0), (1, 3, 0), (1, 4, 0)]
        );
    }

    #[test]
    fn sticky_slots_without_an_owner_wait_for_one() {
        let src = Entries::new(1, 4);
        let now = Instant::now();
        let mut d = KeyShared::new(Unacked::new(Position::new(1, 0)));
        d.add_consumer(sticky(1, &[(0, 99)]), now).unwrap();
        with_slots(&mut d, 4, |e| if e % 2 == 0 { 5 } else { 500 });
        d.flow((1, 1), 10);
        assert_eq!(drain(&mut d, &src), vec![(1, 0, 0), (1, 2, 0)]);
        d.add_consumer(sticky(2, &[(100, 999)]), now).unwrap();
        d.flow((1, 2), 10);
        assert_eq!(drain(&mut d, &src), vec![(2, 1, 0), (2, 3, 0)]);
    }

    #[test]
    fn keys_are_asked_for_before_deciding_and_lookahead_is_bounded() {
        let src = Entries::new(1, 3000);
        let mut d = KeyShared::new(Unacked::new(Position::new(1, 0)));
        assert!(
            d.wants_keys(&src).is_empty(),
            "no consumers: nothing to decide"
        );
        d.add_consumer(c(1), Instant::now()).unwrap();
        assert!(
            d.wants_keys(&src).is_empty(),
            "no permits: nothing to decide"
        );
        d.flow((1, 1), 10);
        let want = d.wants_keys(&src);
        assert_eq!(want.len(), KEYS_PER_ASK);
        assert_eq!(want[0], Position::new(1, 0));
        assert!(
            d.next(&src, Instant::now()).is_none(),
            "keys unknown: nothing yet"
        );
        // Every key is c1's, but c1 has no permits left after 10: the rest
        // wait and the look-ahead stops at LOOKAHEAD entries.
        with_slots(&mut d, 3000, |_| 1);
        assert_eq!(drain(&mut d, &src).len(), 10);
        assert!(d.wants_keys(&src).is_empty());
        // What waited is not lost: one more permit, the next in order.
        d.flow((1, 1), 1);
        assert_eq!(drain(&mut d, &src), vec![(1, 10, 0)]);
    }
}

//! A subscription's position without I/O: the mark-delete position (all at
//! or before it acknowledged), the entries acknowledged individually beyond
//! it (per ledger a compressed bitmap — runs, arrays or bits, whichever is
//! smallest — so a million acked holes cost kilobytes, not megabytes), and
//! the entries of which only some messages are acknowledged (batch index
//! acks). `encode`/`decode` give its stored form.

use std::collections::BTreeMap;

use roaring::RoaringBitmap;

use magnetar_proto::pulsar::MessageIdData;
use serde::{Deserialize, Serialize};

/// A position in a managed ledger. `entry_id == -1` means "before the first
/// entry of `ledger_id`". Ledger ids grow over a topic's life, so the derived
/// order is the log order.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Position {
    pub ledger_id: u64,
    pub entry_id: i64,
}

impl Position {
    pub fn new(ledger_id: u64, entry_id: i64) -> Position {
        Position {
            ledger_id,
            entry_id,
        }
    }

    /// The wire form (not partitioned, not batched).
    pub fn message_id(self) -> MessageIdData {
        MessageIdData {
            ledger_id: self.ledger_id,
            entry_id: self.entry_id as u64,
            partition: Some(-1),
            batch_index: Some(-1),
            ..Default::default()
        }
    }

    /// The entry a wire message id names (its batch index aside).
    pub fn from_message_id(id: &MessageIdData) -> Position {
        Position::new(id.ledger_id, id.entry_id as i64)
    }

    /// The position right after this one within the same ledger.
    pub fn bump(self) -> Position {
        Position {
            ledger_id: self.ledger_id,
            entry_id: self.entry_id + 1,
        }
    }

    /// The position right before this one within the same ledger (`-1`
    /// for the first entry: before the ledger).
    pub fn prev(self) -> Position {
        Position {
            ledger_id: self.ledger_id,
            entry_id: self.entry_id - 1,
        }
    }
}

/// Most individually acknowledged entries a cursor holds after its mark
/// (in memory and stored; at most ~2 bytes each, far less when they
/// cluster). Past it, further acks beyond the mark are not recorded: those
/// entries count as unacknowledged and are redelivered after the
/// subscription is next loaded — redelivery, never loss. An ack that moves
/// the mark is always taken.
pub const MAX_ACKED_ENTRIES: u64 = if cfg!(test) { 1_000 } else { 10_000_000 };

/// Most partially acknowledged batches a cursor keeps; past it the newest
/// one's partial acks are forgotten (its messages are redelivered after a
/// reload).
pub const MAX_PARTIAL_BATCHES: usize = 10_000;

/// An acknowledgement of one entry: the whole of it, or — a batch index ack
/// — the messages whose bits are clear in `unacked` (Pulsar's `ack_set`: a
/// bit set per message still not acknowledged, 64 to a word).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryAck {
    pub position: Position,
    pub unacked: Option<Vec<i64>>,
}

impl EntryAck {
    pub fn whole(position: Position) -> EntryAck {
        EntryAck {
            position,
            unacked: None,
        }
    }

    /// From a wire message id: an `ack_set` with every bit clear acks the
    /// whole entry, as one with no `ack_set`.
    pub fn from_message_id(id: &MessageIdData) -> EntryAck {
        let partial = id.ack_set.iter().any(|w| *w != 0);
        EntryAck {
            position: Position::from_message_id(id),
            unacked: partial.then(|| id.ack_set.clone()),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct CursorState {
    pub mark_delete: Position,
    /// Individually acknowledged entries after the mark: per ledger, its
    /// entry ids. No ledger holds an empty bitmap.
    acked: BTreeMap<u64, RoaringBitmap>,
    /// How many entries `acked` holds.
    held: u64,
    /// Entries after the mark of which some messages are acknowledged: the
    /// bits of those still unacknowledged (never all clear).
    partial: BTreeMap<Position, Vec<i64>>,
    /// Named numbers kept with the position (the dedup snapshot).
    pub properties: BTreeMap<String, i64>,
}

impl CursorState {
    pub fn new(mark_delete: Position) -> CursorState {
        CursorState {
            mark_delete,
            ..Default::default()
        }
    }

    pub fn is_acked(&self, p: Position) -> bool {
        p <= self.mark_delete || self.holds(p)
    }

    fn holds(&self, p: Position) -> bool {
        let Ok(e) = u32::try_from(p.entry_id) else {
            return false;
        };
        self.acked.get(&p.ledger_id).is_some_and(|b| b.contains(e))
    }

    /// The messages of `p` still unacknowledged, when only some are.
    pub fn unacked_in_batch(&self, p: Position) -> Option<&[i64]> {
        self.partial.get(&p).map(Vec::as_slice)
    }

    /// How many entries after the mark are acknowledged.
    pub fn acked_entries(&self) -> u64 {
        self.held
    }

    /// The acknowledged ranges after the mark: (first, last) positions,
    /// found as they are iterated.
    pub fn acked_ranges(&self) -> impl Iterator<Item = (Position, Position)> + '_ {
        self.acked.iter().flat_map(|(l, b)| {
            let mut it = b.iter().peekable();
            std::iter::from_fn(move || {
                let first = it.next()?;
                let mut last = first;
                while it.next_if(|n| *n == last + 1).is_some() {
                    last += 1;
                }
                Some((
                    Position::new(*l, i64::from(first)),
                    Position::new(*l, i64::from(last)),
                ))
            })
        })
    }

    /// How many partially acknowledged batches the cursor holds.
    pub fn partial_batches(&self) -> usize {
        self.partial.len()
    }

    /// Records `p` (after the mark, not acked yet) unless the cursor holds
    /// its most already; false when it was not recorded.
    fn insert(&mut self, p: Position, moves_mark: bool) -> bool {
        let Ok(e) = u32::try_from(p.entry_id) else {
            return false;
        };
        if self.held >= MAX_ACKED_ENTRIES && !moves_mark {
            tracing::warn!(position = ?p, held = self.held, "too many acknowledged entries after the mark-delete position: this ack is not recorded (the entry is redelivered after a reload)");
            return false;
        }
        if self.acked.entry(p.ledger_id).or_default().insert(e) {
            self.held += 1;
        }
        true
    }

    /// `next(p)` gives the first existing position after `p`, if any.
    fn advance(&mut self, next: &impl Fn(Position) -> Option<Position>) {
        while let Some(n) = next(self.mark_delete) {
            let Ok(e) = u32::try_from(n.entry_id) else {
                break;
            };
            let removed = self
                .acked
                .get_mut(&n.ledger_id)
                .is_some_and(|b| b.remove(e));
            if !removed {
                break;
            }
            self.held -= 1;
            self.mark_delete = n;
        }
        let md = self.mark_delete;
        let after = self.acked.split_off(&md.ledger_id);
        for b in std::mem::replace(&mut self.acked, after).values() {
            self.held -= b.len();
        }
        if let Some(b) = self.acked.get_mut(&md.ledger_id) {
            if md.entry_id >= 0 {
                let through = u32::try_from(md.entry_id).unwrap_or(u32::MAX);
                self.held -= b.remove_range(..=through);
            }
            if b.is_empty() {
                self.acked.remove(&md.ledger_id);
            }
        }
        self.partial = self.partial.split_off(&md.bump());
    }

    /// Individual ack; returns whether the state changed.
    pub fn ack(&mut self, p: Position, next: &impl Fn(Position) -> Option<Position>) -> bool {
        self.ack_entry(&EntryAck::whole(p), next)
    }

    /// Individual ack of an entry or of some messages of it.
    pub fn ack_entry(
        &mut self,
        a: &EntryAck,
        next: &impl Fn(Position) -> Option<Position>,
    ) -> bool {
        let p = a.position;
        if self.is_acked(p) {
            return false;
        }
        if let Some(bits) = &a.unacked {
            if !self.narrow(p, bits) {
                return true;
            }
        }
        self.partial.remove(&p);
        let moves_mark = next(self.mark_delete) == Some(p);
        self.insert(p, moves_mark);
        self.advance(next);
        true
    }

    /// Clears in `p`'s batch the messages acknowledged by `bits`; true when
    /// none is left (the entry is acknowledged as a whole).
    fn narrow(&mut self, p: Position, bits: &[i64]) -> bool {
        let left = match self.partial.get(&p) {
            Some(have) => have
                .iter()
                .enumerate()
                .map(|(i, w)| w & bits.get(i).copied().unwrap_or(0))
                .collect(),
            None => bits.to_vec(),
        };
        if left.iter().all(|w| *w == 0) {
            return true;
        }
        if self.partial.len() >= MAX_PARTIAL_BATCHES && !self.partial.contains_key(&p) {
            tracing::warn!(position = ?p, "too many partially acknowledged batches: this partial ack is not kept (its messages are redelivered)");
            return false;
        }
        self.partial.insert(p, left);
        false
    }

    /// Cumulative ack of everything up to and including `p`.
    pub fn ack_cumulative(
        &mut self,
        p: Position,
        next: &impl Fn(Position) -> Option<Position>,
    ) -> bool {
        self.ack_cumulative_entry(&EntryAck::whole(p), next)
    }

    /// Cumulative ack; with `unacked` bits, of everything before the entry
    /// and of the entry's messages whose bits are clear.
    pub fn ack_cumulative_entry(
        &mut self,
        a: &EntryAck,
        next: &impl Fn(Position) -> Option<Position>,
    ) -> bool {
        let partial = a.unacked.is_some();
        let through = if partial {
            a.position.prev()
        } else {
            a.position
        };
        let mut changed = false;
        if through > self.mark_delete {
            self.mark_delete = through;
            self.advance(next);
            changed = true;
        }
        if partial {
            // The entry's own messages: as an individual ack of them.
            changed |= self.ack_entry(a, next);
        }
        changed
    }

    /// The stored form: compact, so a cursor with many holes stays a small
    /// entry (varints; each ledger's bitmap in Roaring's portable format).
    pub fn encode(&self) -> Vec<u8> {
        let bitmaps: usize = self.acked.values().map(|b| b.serialized_size()).sum();
        let mut out = Vec::with_capacity(64 + bitmaps + self.acked.len() * 8);
        out.extend_from_slice(MAGIC);
        put_position(&mut out, self.mark_delete, None);
        put_u64(&mut out, self.properties.len() as u64);
        for (k, v) in &self.properties {
            put_u64(&mut out, k.len() as u64);
            out.extend_from_slice(k.as_bytes());
            put_u64(&mut out, zigzag(*v));
        }
        put_u64(&mut out, self.acked.len() as u64);
        let mut prev = self.mark_delete.ledger_id;
        for (l, b) in &self.acked {
            put_u64(&mut out, l.wrapping_sub(prev));
            put_u64(&mut out, b.serialized_size() as u64);
            // Writing to a Vec cannot fail.
            let _ = b.serialize_into(&mut out);
            prev = *l;
        }
        put_u64(&mut out, self.partial.len() as u64);
        let mut prev = self.mark_delete;
        for (p, bits) in &self.partial {
            put_position(&mut out, *p, Some(prev));
            put_u64(&mut out, bits.len() as u64);
            for w in bits {
                out.extend_from_slice(&w.to_le_bytes());
            }
            prev = *p;
        }
        out
    }

    /// Reads a stored cursor: this format, or the JSON of earlier versions.
    pub fn decode(data: &[u8]) -> Result<CursorState, String> {
        match data.strip_prefix(MAGIC) {
            Some(rest) => decode_binary(rest),
            None => {
                let old: LegacyCursor = serde_json::from_slice(data).map_err(|e| e.to_string())?;
                let mut c = CursorState::new(old.mark_delete);
                c.properties = old.properties;
                for p in old.acked.into_iter().filter(|p| *p > old.mark_delete) {
                    c.insert(p, false);
                }
                Ok(c)
            }
        }
    }
}

const MAGIC: &[u8] = b"MCUR\x02";

/// The JSON form cursors were stored in before ranges.
#[derive(Deserialize)]
struct LegacyCursor {
    mark_delete: Position,
    #[serde(default)]
    acked: Vec<Position>,
    #[serde(default)]
    properties: BTreeMap<String, i64>,
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

fn put_u64(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A position as the ledger's delta from `prev`'s and the entry (its delta
/// from `prev`'s within the same ledger).
fn put_position(out: &mut Vec<u8>, p: Position, prev: Option<Position>) {
    match prev {
        Some(q) if q.ledger_id == p.ledger_id => {
            put_u64(out, 0);
            put_u64(out, zigzag(p.entry_id - q.entry_id));
        }
        Some(q) => {
            put_u64(out, p.ledger_id.wrapping_sub(q.ledger_id));
            put_u64(out, zigzag(p.entry_id));
        }
        None => {
            put_u64(out, p.ledger_id);
            put_u64(out, zigzag(p.entry_id));
        }
    }
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn u64(&mut self) -> Result<u64, String> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&b, rest) = self.0.split_first().ok_or("cursor record cut short")?;
            self.0 = rest;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("cursor record: varint too long".into())
    }

    fn bytes(&mut self, n: u64) -> Result<&[u8], String> {
        let n = usize::try_from(n).map_err(|_| "cursor record: length too large")?;
        if n > self.0.len() {
            return Err("cursor record cut short".into());
        }
        let (b, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(b)
    }

    fn position(&mut self, prev: Option<Position>) -> Result<Position, String> {
        let l = self.u64()?;
        let e = unzigzag(self.u64()?);
        Ok(match prev {
            Some(q) if l == 0 => Position::new(q.ledger_id, q.entry_id + e),
            Some(q) => Position::new(q.ledger_id.wrapping_add(l), e),
            None => Position::new(l, e),
        })
    }

    /// A count, refused when the rest could not hold that many items.
    fn count(&mut self, min_item_bytes: usize) -> Result<usize, String> {
        let n = self.u64()?;
        match usize::try_from(n) {
            Ok(n) if n.saturating_mul(min_item_bytes) <= self.0.len() => Ok(n),
            _ => Err(format!("cursor record: count {n} past its end")),
        }
    }
}

fn decode_binary(data: &[u8]) -> Result<CursorState, String> {
    let mut r = Reader(data);
    let mut c = CursorState::new(r.position(None)?);
    for _ in 0..r.count(2)? {
        let n = r.u64()?;
        let k = String::from_utf8(r.bytes(n)?.to_vec()).map_err(|e| e.to_string())?;
        let v = unzigzag(r.u64()?);
        c.properties.insert(k, v);
    }
    let mut prev = c.mark_delete.ledger_id;
    for _ in 0..r.count(2)? {
        let l = prev.wrapping_add(r.u64()?);
        if l < c.mark_delete.ledger_id || (l <= prev && !c.acked.is_empty()) {
            return Err(format!("cursor record: ledger {l} out of order"));
        }
        let n = r.u64()?;
        let b = RoaringBitmap::deserialize_from(r.bytes(n)?).map_err(|e| e.to_string())?;
        if l == c.mark_delete.ledger_id
            && b.min()
                .is_some_and(|m| i64::from(m) <= c.mark_delete.entry_id)
        {
            return Err("cursor record: an acked entry at or before the mark".into());
        }
        c.held += b.len();
        if !b.is_empty() {
            c.acked.insert(l, b);
        }
        prev = l;
    }
    let mut prev = c.mark_delete;
    for _ in 0..r.count(3)? {
        let p = r.position(Some(prev))?;
        let n = r.u64()?;
        let words = r.bytes(n.saturating_mul(8))?;
        let bits = words
            .chunks_exact(8)
            .map(|w| i64::from_le_bytes(w.try_into().unwrap_or([0; 8])))
            .collect();
        c.partial.insert(p, bits);
        prev = p;
    }
    if !r.0.is_empty() {
        return Err("cursor record: bytes after its end".into());
    }
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ledgers 1 (entries 0..3) and 5 (entries 0..2).
    fn next(p: Position) -> Option<Position> {
        match (p.ledger_id, p.entry_id) {
            (1, e) if e < 2 => Some(Position::new(1, e + 1)),
            (1, _) => Some(Position::new(5, 0)),
            (5, e) if e < 1 => Some(Position::new(5, e + 1)),
            _ => None,
        }
    }

    /// One ledger (7) of `n` entries.
    fn one_ledger(n: i64) -> impl Fn(Position) -> Option<Position> {
        move |p: Position| {
            let e = if p.ledger_id < 7 { 0 } else { p.entry_id + 1 };
            (p.ledger_id <= 7 && e < n).then(|| Position::new(7, e))
        }
    }

    #[test]
    fn individual_acks_fold_into_mark_delete_across_ledgers() {
        let mut c = CursorState::new(Position::new(1, -1));
        assert!(c.ack(Position::new(1, 1), &next));
        assert_eq!(c.mark_delete, Position::new(1, -1));
        assert!(c.is_acked(Position::new(1, 1)) && !c.is_acked(Position::new(1, 0)));
        c.ack(Position::new(5, 0), &next);
        c.ack(Position::new(1, 2), &next);
        assert!(
            !c.ack(Position::new(1, 2), &next),
            "a repeated ack changes nothing"
        );
        assert_eq!(c.acked_ranges().count(), 2, "1:1..1:2 and 5:0");
        c.ack(Position::new(1, 0), &next);
        assert_eq!(c.mark_delete, Position::new(5, 0));
        assert_eq!(c.acked_entries(), 0);
    }

    #[test]
    fn cumulative_ack_drops_covered_individual_acks() {
        let mut c = CursorState::new(Position::new(1, -1));
        c.ack(Position::new(5, 1), &next);
        c.ack(Position::new(1, 2), &next);
        c.ack_cumulative(Position::new(1, 1), &next);
        // 1:2 was acked already, so the mark moves on through it.
        assert_eq!(c.mark_delete, Position::new(1, 2));
        assert_eq!(c.acked_entries(), 1);
        c.ack_cumulative(Position::new(5, 0), &next);
        assert_eq!(c.mark_delete, Position::new(5, 1));
        assert!(!c.ack_cumulative(Position::new(1, 0), &next));
    }

    #[test]
    fn neighbouring_acks_merge_into_one_range_and_a_cumulative_ack_cuts_one() {
        let next = one_ledger(100);
        let mut c = CursorState::new(Position::new(7, -1));
        for e in [10, 12, 11, 20, 14, 13] {
            c.ack(Position::new(7, e), &next);
        }
        let ranges: Vec<_> = c.acked_ranges().collect();
        assert_eq!(
            ranges,
            vec![
                (Position::new(7, 10), Position::new(7, 14)),
                (Position::new(7, 20), Position::new(7, 20))
            ]
        );
        assert_eq!(c.acked_entries(), 6);
        // A mark inside a range keeps the range's rest, then runs through it.
        c.ack_cumulative(Position::new(7, 11), &next);
        assert_eq!(c.mark_delete, Position::new(7, 14));
        assert_eq!(c.acked_entries(), 1);
        assert!(c.is_acked(Position::new(7, 20)) && !c.is_acked(Position::new(7, 19)));
    }

    #[test]
    fn past_the_limit_acks_are_not_recorded_but_the_mark_still_moves() {
        let max = MAX_ACKED_ENTRIES as i64;
        let n = 2 * max + 10;
        let next = one_ledger(n);
        let mut c = CursorState::new(Position::new(7, -1));
        // Every other entry: a hole before each.
        for e in (1..n).step_by(2) {
            c.ack(Position::new(7, e), &next);
        }
        assert_eq!(c.acked_entries(), MAX_ACKED_ENTRIES);
        assert_eq!(c.acked_ranges().count(), max as usize);
        for e in (0..n).step_by(2) {
            assert!(!c.is_acked(Position::new(7, e)), "never acked: {e}");
        }
        assert!(c.is_acked(Position::new(7, 2 * max - 1)));
        assert!(!c.is_acked(Position::new(7, 2 * max + 1)), "not recorded");
        // Filling the holes brings the mark through what was recorded; the
        // acks not recorded are simply not acked (they will be redelivered).
        for e in (0..n).step_by(2) {
            c.ack(Position::new(7, e), &next);
        }
        assert_eq!(c.mark_delete, Position::new(7, 2 * max));
        assert_eq!(c.acked_entries(), 4, "2*max+2, +4, +6, +8");
    }

    #[test]
    fn batch_index_acks_narrow_an_entry_until_every_message_is_acked() {
        let mut c = CursorState::new(Position::new(1, -1));
        let p = Position::new(1, 0);
        // A batch of 4: messages 0 and 2 acked (bits of 1 and 3 left).
        let a = EntryAck {
            position: p,
            unacked: Some(vec![0b1010]),
        };
        assert!(c.ack_entry(&a, &next));
        assert!(!c.is_acked(p));
        assert_eq!(c.unacked_in_batch(p), Some(&[0b1010i64][..]));
        // Message 1 acked: only 3 is left.
        c.ack_entry(
            &EntryAck {
                position: p,
                unacked: Some(vec![0b1101]),
            },
            &next,
        );
        assert_eq!(c.unacked_in_batch(p), Some(&[0b1000i64][..]));
        // Message 3 acked (the client sends no words: all clear).
        c.ack_entry(
            &EntryAck {
                position: p,
                unacked: Some(vec![0b0111]),
            },
            &next,
        );
        assert!(c.is_acked(p));
        assert_eq!(c.mark_delete, p);
        assert_eq!(c.unacked_in_batch(p), None);
    }

    #[test]
    fn cumulative_batch_ack_marks_the_entry_before_and_keeps_the_rest() {
        let mut c = CursorState::new(Position::new(1, -1));
        let p = Position::new(1, 2);
        c.ack_cumulative_entry(
            &EntryAck {
                position: p,
                unacked: Some(vec![0b1100]),
            },
            &next,
        );
        assert_eq!(c.mark_delete, Position::new(1, 1));
        assert_eq!(c.unacked_in_batch(p), Some(&[0b1100i64][..]));
        c.ack(p, &next);
        assert_eq!(c.mark_delete, p);
        assert_eq!(c.unacked_in_batch(p), None);
    }

    #[test]
    fn stored_form_round_trips_and_reads_the_old_json() {
        let next = one_ledger(1_000);
        let mut c = CursorState::new(Position::new(7, 3));
        for e in [5, 6, 9, 500, 501, 999] {
            c.ack(Position::new(7, e), &next);
        }
        c.ack_entry(
            &EntryAck {
                position: Position::new(7, 700),
                unacked: Some(vec![-2, 0x0f]),
            },
            &next,
        );
        c.properties.insert("p".into(), -12);
        let bytes = c.encode();
        assert_eq!(CursorState::decode(&bytes), Ok(c.clone()));
        for cut in 0..bytes.len() {
            assert!(CursorState::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let json = br#"{"mark_delete":{"ledger_id":7,"entry_id":3},"acked":[{"ledger_id":7,"entry_id":5},{"ledger_id":7,"entry_id":6}],"properties":{"x":1}}"#;
        let old = CursorState::decode(json).unwrap();
        assert_eq!(old.mark_delete, Position::new(7, 3));
        assert_eq!(
            old.acked_ranges().collect::<Vec<_>>(),
            vec![(Position::new(7, 5), Position::new(7, 6))]
        );
        assert_eq!(old.properties.get("x"), Some(&1));
    }

    #[test]
    fn many_holes_stay_small_when_stored() {
        let n = 2 * MAX_ACKED_ENTRIES as i64;
        let next = one_ledger(n);
        let mut c = CursorState::new(Position::new(7, -1));
        for e in (1..n).step_by(2) {
            c.ack(Position::new(7, e), &next);
        }
        let bytes = c.encode();
        assert!(
            bytes.len() < 2 * MAX_ACKED_ENTRIES as usize + 64,
            "{} bytes",
            bytes.len()
        );
        assert_eq!(CursorState::decode(&bytes), Ok(c));
    }
}

//! A subscription's position without I/O: the mark-delete position (all at
//! or before it acknowledged) plus the positions acknowledged individually
//! beyond it.

use std::collections::{BTreeMap, BTreeSet};

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
}

/// Most individually acknowledged positions a cursor keeps; beyond this the
/// oldest unacknowledged message is redelivered rather than growing the state.
pub const MAX_INDIVIDUAL_ACKS: usize = 100_000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CursorState {
    pub mark_delete: Position,
    pub acked: BTreeSet<Position>,
    /// Named numbers kept with the position (the dedup snapshot).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub properties: BTreeMap<String, i64>,
}

impl CursorState {
    pub fn new(mark_delete: Position) -> CursorState {
        CursorState {
            mark_delete,
            acked: BTreeSet::new(),
            properties: BTreeMap::new(),
        }
    }

    pub fn is_acked(&self, p: Position) -> bool {
        p <= self.mark_delete || self.acked.contains(&p)
    }

    /// `next(p)` gives the first existing position after `p`, if any.
    fn advance(&mut self, next: &impl Fn(Position) -> Option<Position>) {
        while let Some(n) = next(self.mark_delete) {
            if !self.acked.remove(&n) {
                break;
            }
            self.mark_delete = n;
        }
        let md = self.mark_delete;
        self.acked = self.acked.split_off(&md.bump());
    }

    /// Individual ack; returns whether the state changed.
    pub fn ack(&mut self, p: Position, next: &impl Fn(Position) -> Option<Position>) -> bool {
        if self.is_acked(p) {
            return false;
        }
        self.acked.insert(p);
        self.advance(next);
        true
    }

    /// Cumulative ack of everything up to and including `p`.
    pub fn ack_cumulative(
        &mut self,
        p: Position,
        next: &impl Fn(Position) -> Option<Position>,
    ) -> bool {
        if p <= self.mark_delete {
            return false;
        }
        self.mark_delete = p;
        self.advance(next);
        true
    }
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
        c.ack(Position::new(1, 0), &next);
        assert_eq!(c.mark_delete, Position::new(5, 0));
        assert!(c.acked.is_empty());
    }

    #[test]
    fn cumulative_ack_drops_covered_individual_acks() {
        let mut c = CursorState::new(Position::new(1, -1));
        c.ack(Position::new(5, 1), &next);
        c.ack(Position::new(1, 2), &next);
        c.ack_cumulative(Position::new(1, 1), &next);
        // 1:2 was acked already, so the mark moves on through it.
        assert_eq!(c.mark_delete, Position::new(1, 2));
        assert_eq!(c.acked.len(), 1);
        c.ack_cumulative(Position::new(5, 0), &next);
        assert_eq!(c.mark_delete, Position::new(5, 1));
        assert!(!c.ack_cumulative(Position::new(1, 0), &next));
    }
}

//! The compacted view of a topic as storage sees it: a ledger beside the
//! topic's whose entries are `[ledger id u64][entry id i64][the entry]`
//! (each kept entry at its original position), and the index of those
//! positions up to the horizon. `read_through` reads an entry from the view
//! when it holds it, else from the topic — for compacted readers and for
//! the next compaction alike. What is kept is decided in
//! `topic::compaction`.

use std::collections::BTreeMap;

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::cursor::Position;
use super::{ManagedLedger, MlError};

/// A compacted entry: its position, then the entry.
pub fn encode(p: Position, entry: &Bytes) -> Bytes {
    let mut b = BytesMut::with_capacity(16 + entry.len());
    b.put_u64(p.ledger_id);
    b.put_i64(p.entry_id);
    b.put_slice(entry);
    b.freeze()
}

pub fn decode(mut b: Bytes) -> Option<(Position, Bytes)> {
    if b.len() < 16 {
        return None;
    }
    let ledger = b.get_u64();
    let entry = b.get_i64();
    Some((Position::new(ledger, entry), b))
}

/// The compacted view a topic's subscriptions read: which positions it
/// holds, up to the horizon, and where.
#[derive(Debug, Clone, Default)]
pub struct CompactedView {
    pub ledger_id: u64,
    pub horizon: Position,
    /// Position → entry id in the compacted ledger.
    pub positions: BTreeMap<Position, u64>,
}

impl CompactedView {
    /// The first position at or after `p` this view holds (up to the
    /// horizon); `None` past the horizon.
    pub fn at_or_after(&self, p: Position) -> Option<Position> {
        self.positions.range(p..).next().map(|(p, _)| *p)
    }
}

impl ManagedLedger {
    /// Entry `p`: from `view` when it holds it (up to its horizon), else
    /// from the topic.
    pub async fn read_through(
        &self,
        view: Option<&CompactedView>,
        p: Position,
    ) -> Result<Bytes, MlError> {
        if let Some(id) = view
            .filter(|v| p <= v.horizon)
            .and_then(|v| v.positions.get(&p).map(|id| (v.ledger_id, *id)))
        {
            let mut got = self.read_side_ledger(id.0, id.1, id.1).await?;
            if let Some((_, entry)) = got.pop().and_then(decode) {
                return Ok(entry);
            }
        }
        self.read(p).await
    }
}

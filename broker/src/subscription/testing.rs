//! Test data for dispatcher cores: a ledger's entries and a cursor's acks.

use std::collections::BTreeSet;
use std::time::Instant;

use super::dispatcher::{ConsumerInfo, Dispatcher, EntrySource};
use crate::managed_ledger::cursor::Position;

/// Entries 0..n of one ledger, and which are acknowledged.
pub struct Entries {
    ledger_id: u64,
    n: i64,
    acked: BTreeSet<Position>,
}

impl Entries {
    pub fn new(ledger_id: u64, n: i64) -> Entries {
        Entries {
            ledger_id,
            n,
            acked: BTreeSet::new(),
        }
    }

    pub fn ack(&mut self, p: Position) {
        self.acked.insert(p);
    }
}

impl EntrySource for Entries {
    fn at_or_after(&self, p: Position) -> Option<Position> {
        if p.ledger_id > self.ledger_id {
            return None;
        }
        let e = if p.ledger_id < self.ledger_id {
            0
        } else {
            p.entry_id.max(0)
        };
        (e < self.n).then(|| Position::new(self.ledger_id, e))
    }

    fn is_acked(&self, p: Position) -> bool {
        self.acked.contains(&p)
    }
}

/// Every delivery `d` makes now, each sent as one message: (ledger, entry).
pub fn drain(d: &mut dyn Dispatcher, src: &Entries, now: Instant) -> Vec<(u64, i64)> {
    let mut out = Vec::new();
    while let Some(x) = d.next(src, now) {
        out.push((x.position.ledger_id, x.position.entry_id));
        d.sent(x, 1);
    }
    out
}

/// Every delivery `d` makes now, each sent as one message: (consumer id,
/// entry, redelivery count).
pub fn deliver_counted(
    d: &mut dyn Dispatcher,
    src: &Entries,
    now: Instant,
) -> Vec<(u64, i64, u32)> {
    let mut out = Vec::new();
    while let Some(x) = d.next(src, now) {
        out.push((x.consumer.1, x.position.entry_id, x.redelivery_count));
        d.sent(x, 1);
    }
    out
}

/// Consumer `id` on connection 1.
pub fn consumer(id: u64) -> ConsumerInfo {
    ConsumerInfo {
        key: (1, id),
        name: format!("c{id}"),
        priority: 0,
        key_shared: Default::default(),
    }
}

//! Which ledgers a managed ledger may delete: the pure decisions.

use super::cursor::Position;
use super::ledger_list::LedgerInfo;

/// How long consumed data is kept (Pulsar's `RetentionPolicies`): by age
/// and by total size; `None` means without limit. With both `Some(0)`,
/// consumed data goes at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    pub time_ms: Option<u64>,
    pub size_bytes: Option<u64>,
}

impl Retention {
    /// Nothing consumed is kept.
    pub const NONE: Retention = Retention {
        time_ms: Some(0),
        size_bytes: Some(0),
    };
}

/// Which ledgers go under a retention policy, oldest first, as Pulsar
/// decides: of the closed ledgers every cursor consumed (all closed ones
/// when the topic has no cursor: `slowest` is `None`), a ledger goes while
/// it is older than the retention time or the data left is over the
/// retention size. Nothing goes when both limits are infinite. The open
/// ledger is never deleted.
pub fn expired_ledgers(
    ledgers: &[LedgerInfo],
    slowest: Option<Position>,
    retention: Retention,
    now_ms: u64,
) -> Vec<u64> {
    if retention.time_ms.is_none() && retention.size_bytes.is_none() {
        return Vec::new();
    }
    let consumed = match slowest {
        Some(s) => consumed_ledgers(ledgers, s),
        None => ledgers
            .iter()
            .filter(|l| l.closed)
            .map(|l| l.ledger_id)
            .collect(),
    };
    let mut left: u64 = ledgers.iter().map(|l| l.size_bytes).sum();
    let mut out = Vec::new();
    for l in ledgers {
        if !consumed.contains(&l.ledger_id) {
            break;
        }
        let too_old = retention
            .time_ms
            .is_some_and(|t| now_ms.saturating_sub(l.closed_at_ms) >= t);
        let too_big = retention.size_bytes.is_some_and(|s| left > s);
        if !(too_old || too_big) {
            break;
        }
        left -= l.size_bytes;
        out.push(l.ledger_id);
    }
    out
}

/// Closed ledgers every cursor has consumed completely, given the slowest
/// cursor's durable mark-delete position. The open ledger is never trimmed.
pub fn consumed_ledgers(ledgers: &[LedgerInfo], slowest: Position) -> Vec<u64> {
    ledgers
        .iter()
        .filter(|l| {
            l.closed
                && (l.ledger_id < slowest.ledger_id
                    || (l.ledger_id == slowest.ledger_id
                        && slowest.entry_id + 1 >= l.entries as i64))
        })
        .map(|l| l.ledger_id)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn l(ledger_id: u64, entries: u64, closed: bool) -> LedgerInfo {
        LedgerInfo {
            ledger_id,
            entries,
            size_bytes: entries * 10,
            closed,
            closed_at_ms: 1_000 * ledger_id,
        }
    }

    #[test]
    fn retention_keeps_consumed_ledgers_by_age_and_size() {
        // Ledgers 1, 4 closed at 1 s and 4 s, 30 and 50 bytes; 7 open.
        let ls = [l(1, 3, true), l(4, 5, true), l(7, 2, false)];
        let all = Some(Position::new(7, 1));
        let r = |t: Option<u64>, s: Option<u64>| Retention {
            time_ms: t,
            size_bytes: s,
        };
        assert_eq!(
            expired_ledgers(&ls, all, Retention::NONE, 10_000),
            vec![1, 4]
        );
        assert!(
            expired_ledgers(&ls, all, r(None, None), 10_000).is_empty(),
            "infinite"
        );
        // By age: ledger 1 is 9 s old, ledger 4 is 6 s old.
        assert_eq!(
            expired_ledgers(&ls, all, r(Some(8_000), None), 10_000),
            vec![1]
        );
        assert!(expired_ledgers(&ls, all, r(Some(10_000), None), 10_000).is_empty());
        // By size: 100 bytes in all; keep at most 75 — ledger 1 goes.
        assert_eq!(
            expired_ledgers(&ls, all, r(None, Some(75)), 10_000),
            vec![1]
        );
        assert_eq!(
            expired_ledgers(&ls, all, r(None, Some(10)), 10_000),
            vec![1, 4]
        );
        // Only what every cursor consumed, or every closed one without cursors.
        assert_eq!(
            expired_ledgers(&ls, Some(Position::new(4, 0)), Retention::NONE, 10_000),
            vec![1]
        );
        assert_eq!(
            expired_ledgers(&ls, None, Retention::NONE, 10_000),
            vec![1, 4]
        );
    }

    #[test]
    fn only_fully_consumed_closed_ledgers_go() {
        let ls = [l(1, 3, true), l(4, 5, true), l(7, 2, false)];
        assert_eq!(
            consumed_ledgers(&ls, Position::new(1, -1)),
            Vec::<u64>::new()
        );
        assert_eq!(consumed_ledgers(&ls, Position::new(1, 2)), vec![1]);
        assert_eq!(consumed_ledgers(&ls, Position::new(4, 3)), vec![1]);
        assert_eq!(consumed_ledgers(&ls, Position::new(4, 4)), vec![1, 4]);
        assert_eq!(
            consumed_ledgers(&ls, Position::new(7, 1)),
            vec![1, 4],
            "the open ledger stays"
        );
    }
}

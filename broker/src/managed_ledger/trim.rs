//! Which ledgers a managed ledger may delete: the pure decision.

use super::cursor::Position;
use super::ledger_list::LedgerInfo;

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
        }
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

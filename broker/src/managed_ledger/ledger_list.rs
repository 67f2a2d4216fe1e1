//! The managed ledger's record in the metadata service (its ledger list and
//! cursor pointers) and the pure decision of when the open ledger rolls.

use std::collections::BTreeMap;
use std::time::Duration;

use magnetar_bookie::LedgerMetadata;
use serde::{Deserialize, Serialize};

use super::cursor::Position;
use super::ManagedLedgerConfig;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerInfo {
    pub ledger_id: u64,
    pub entries: u64,
    pub size_bytes: u64,
    pub closed: bool,
    /// When it was closed (ms since the epoch; 0 if before this was kept).
    #[serde(default)]
    pub closed_at_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CursorPointer {
    pub cursor_ledger: Option<u64>,
    /// Mark-delete when the pointer was written (used if the ledger is empty).
    pub mark_delete: Position,
}

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// What the metadata service holds for a managed ledger: changed on ledger
/// rolls, trims and cursor-ledger rolls only, never per message.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MlInfo {
    pub ledgers: Vec<LedgerInfo>,
    pub cursors: BTreeMap<String, CursorPointer>,
    /// Set once the topic is terminated: its last entry, after which no
    /// entry is ever added.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub terminated: Option<Position>,
    /// The topic epoch of exclusive producers (0: none yet).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub producer_epoch: u64,
    /// The compacted view: a ledger of the latest entry per key up to the
    /// horizon.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compacted: Option<CompactedLedger>,
    /// Ledgers of the delayed-delivery index spilled out of memory
    /// (`topic::delayed`), oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub delayed_buckets: Vec<DelayedBucket>,
}

/// A sealed part of a topic's delayed-delivery index: `entries` index
/// records sorted by due time, in `chunks` ledger entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DelayedBucket {
    pub ledger_id: u64,
    pub chunks: u64,
    pub entries: u64,
    /// The highest position among its records.
    pub last: Position,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompactedLedger {
    pub ledger_id: u64,
    /// The last entry the compaction read.
    pub horizon: Position,
    pub entries: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

impl MlInfo {
    /// Records a ledger's final size once it is closed.
    pub fn mark_closed(&mut self, meta: &LedgerMetadata) {
        if let Some(l) = self
            .ledgers
            .iter_mut()
            .find(|l| l.ledger_id == meta.ledger_id)
        {
            l.entries = (meta.last_entry_id + 1) as u64;
            l.size_bytes = meta.length_bytes;
            if !l.closed {
                l.closed_at_ms = now_ms();
            }
            l.closed = true;
        }
    }

    /// Drops closed ledgers without entries; returns their ids (to delete).
    pub fn drop_empty_closed(&mut self) -> Vec<u64> {
        let empty: Vec<u64> = self
            .ledgers
            .iter()
            .filter(|l| l.closed && l.entries == 0)
            .map(|l| l.ledger_id)
            .collect();
        self.ledgers.retain(|l| !(l.closed && l.entries == 0));
        empty
    }
}

/// The open ledger as the roll decision sees it.
#[derive(Debug, Clone, Copy)]
pub struct OpenLedger {
    pub entries: u64,
    pub size_bytes: u64,
    pub age: Duration,
    pub failed: bool,
}

/// Whether the next entry must go to a new ledger: none is open, the open
/// one failed, or it reached its entry, size or age limit (an empty ledger
/// does not roll for age).
pub fn should_roll(open: Option<OpenLedger>, cfg: &ManagedLedgerConfig) -> bool {
    match open {
        None => true,
        Some(l) => {
            l.failed
                || l.entries >= cfg.max_entries_per_ledger
                || l.size_bytes >= cfg.max_ledger_bytes
                || (l.entries > 0 && l.age >= Duration::from_millis(cfg.max_ledger_age_ms))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rolls_at_each_limit_and_when_failed() {
        let cfg = ManagedLedgerConfig {
            max_entries_per_ledger: 10,
            max_ledger_bytes: 1000,
            max_ledger_age_ms: 60_000,
            ..Default::default()
        };
        let l = OpenLedger {
            entries: 5,
            size_bytes: 500,
            age: Duration::from_secs(1),
            failed: false,
        };
        assert!(should_roll(None, &cfg));
        assert!(!should_roll(Some(l), &cfg));
        assert!(should_roll(Some(OpenLedger { entries: 10, ..l }), &cfg));
        assert!(should_roll(
            Some(OpenLedger {
                size_bytes: 1000,
                ..l
            }),
            &cfg
        ));
        assert!(should_roll(Some(OpenLedger { failed: true, ..l }), &cfg));
        let old = Duration::from_secs(61);
        assert!(should_roll(Some(OpenLedger { age: old, ..l }), &cfg));
        let empty_old = OpenLedger {
            entries: 0,
            size_bytes: 0,
            age: old,
            failed: false,
        };
        assert!(
            !should_roll(Some(empty_old), &cfg),
            "empty ledgers do not roll for age"
        );
    }
}

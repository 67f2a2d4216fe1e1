//! What the ledger client reports.

use magnetar_metadata::MetadataError;
use magnetar_proto::ledger::BookieErrorCode;

#[derive(Debug, Clone, thiserror::Error)]
pub enum LedgerError {
    #[error("metadata: {0}")]
    Metadata(String),
    #[error("not enough writable bookies: need {need}, have {have}")]
    NotEnoughBookies { need: usize, have: usize },
    #[error("bookie {bookie}: {code}")]
    Bookie {
        bookie: String,
        code: BookieErrorCode,
    },
    #[error("bookie {bookie} unreachable: {reason}")]
    Unreachable { bookie: String, reason: String },
    /// The add may or may not be stored; it was not confirmed.
    #[error("ledger {0} failed; outcome of pending adds unknown: {1}")]
    WriterFailed(u64, String),
    #[error("ledger {0} not found")]
    NoSuchLedger(u64),
    #[error("entry {1} of ledger {0} not readable: {2}")]
    Unreadable(u64, u64, String),
    #[error("ledger {0} is closed")]
    Closed(u64),
    #[error("concurrent metadata change on ledger {0}")]
    Conflict(u64),
}

impl From<MetadataError> for LedgerError {
    fn from(e: MetadataError) -> Self {
        LedgerError::Metadata(e.to_string())
    }
}

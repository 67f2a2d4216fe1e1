//! The storage tier's metric names (meanings: `docs/metrics.md`). Recorded
//! through the `metrics` crate; the process's recorder exports them.

/// Writing one journal group and its `fdatasync`.
pub const JOURNAL_SYNC: &str = "magnetar_bookie_journal_sync_seconds";
/// Requests (adds, fences, deletions) in one journal group.
pub const JOURNAL_GROUP_ENTRIES: &str = "magnetar_bookie_journal_group_entries";
/// Bytes in one journal group (padding included).
pub const JOURNAL_GROUP_BYTES: &str = "magnetar_bookie_journal_group_bytes";
/// Entries moved from the journal into entry logs by checkpoints, and how
/// long each checkpoint took.
pub const CHECKPOINT_ENTRIES: &str = "magnetar_bookie_checkpoint_entries_total";
/// Bytes checkpoints wrote into entry logs.
pub const CHECKPOINT_BYTES: &str = "magnetar_bookie_checkpoint_bytes_total";
pub const CHECKPOINT_DURATION: &str = "magnetar_bookie_checkpoint_seconds";
/// Fraction of the data directory's file system in use (label `bookie`).
pub const DISK_USAGE: &str = "magnetar_bookie_disk_usage_ratio";
/// 1 while the bookie is read-only (label `bookie`).
pub const READ_ONLY: &str = "magnetar_bookie_read_only";
/// Ledgers with a copy on a bookie that is gone, as the auditor last found.
pub const UNDER_REPLICATED: &str = "magnetar_bookie_underreplicated_ledgers";
/// Ledger client (brokers): an add confirmed by the ack quorum, and a
/// range read, from call to answer.
pub const LEDGER_ADD: &str = "magnetar_ledger_add_seconds";
pub const LEDGER_READ: &str = "magnetar_ledger_read_seconds";

/// Registers the bookie's families at zero, so they are exported (and
/// charted) before their first event.
pub fn register_bookie(addr: &str) {
    let _ = metrics::histogram!(JOURNAL_SYNC);
    let _ = metrics::histogram!(JOURNAL_GROUP_ENTRIES);
    let _ = metrics::histogram!(JOURNAL_GROUP_BYTES);
    let _ = metrics::histogram!(CHECKPOINT_DURATION);
    metrics::counter!(CHECKPOINT_ENTRIES).increment(0);
    metrics::counter!(CHECKPOINT_BYTES).increment(0);
    metrics::gauge!(READ_ONLY, "bookie" => addr.to_string()).set(0.0);
}

/// Registers the ledger client's families at zero.
pub fn register_ledger_client() {
    let _ = metrics::histogram!(LEDGER_ADD);
    let _ = metrics::histogram!(LEDGER_READ);
}

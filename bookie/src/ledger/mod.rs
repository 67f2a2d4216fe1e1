//! The ledger client brokers use: placement, quorum writes with ensemble
//! changes, the LAC, reads, recovery, and the re-replication the auditor
//! runs. A ledger is an ordered list of byte entries; nothing here knows
//! about topics.
//!
//! `placement.rs` and `write_state.rs` hold the decisions without I/O (and
//! `recovery.rs` / `replicate.rs` theirs at the top); the rest carries them
//! out over the metadata service and the bookies.

pub mod add_queue;
mod client;
mod error;
mod meta;
pub mod placement;
mod read;
mod recovery;
pub mod replicate;
pub mod write_state;
mod writer;

pub use client::{LedgerClient, BELOW_QUORUM_WAIT, DEFAULT_ADD_TIMEOUT};
pub use error::LedgerError;
pub use meta::{Fragment, LedgerMetadata, LedgerState};
pub use read::{READ_AHEAD_PARALLEL, SPECULATIVE_RANGE_READ_DELAY, SPECULATIVE_READ_DELAY};
pub use writer::{LedgerWriter, SHRUNK_ENSEMBLES};

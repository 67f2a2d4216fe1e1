//! The storage tier: the bookie node (journal with group commit, index,
//! fencing, the ledger protocol over QUIC) and the ledger client brokers use
//! (placement, quorum writes, LAC, reads, recovery).
//!
//! It must not know about topics: a ledger is an ordered list of byte entries.

pub mod auditor;
pub mod identity;
pub mod ledger;
pub mod metrics;
pub mod registry;
pub mod server;
pub mod storage;

pub use ledger::{LedgerClient, LedgerError, LedgerMetadata, LedgerState, LedgerWriter};
pub use registry::BookieInfo;
pub use server::{Bookie, BookieConfig, BookieError};

//! The storage tier: the bookie node (journal with group commit, index,
//! fencing, the ledger protocol over QUIC) and the ledger client brokers use
//! (placement, quorum writes, LAC, reads, recovery).
//!
//! It must not know about topics: a ledger is an ordered list of byte entries.

pub mod add_queue;
pub mod auditor;
pub mod client;
pub mod ensemble;
pub mod server;
pub mod storage;
pub mod write_state;

pub use client::{LedgerClient, LedgerError, LedgerMetadata, LedgerState, LedgerWriter};
pub use server::{Bookie, BookieConfig, BookieInfo};

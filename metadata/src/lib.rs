//! The metadata service: a generic, replicated coordination store (openraft)
//! with versioned keys, CAS transactions, leases, ephemeral keys and watches,
//! and the `MetadataClient` every other tier uses.
//!
//! It must not know about topics, ledgers or any other user of it.

pub mod client;
pub mod lease;
pub mod metrics;
pub mod network;
pub mod server;
pub mod state;
pub mod store;

pub use client::{Lease, MetadataClient, MetadataError, WatchStream};
pub use magnetar_proto::metadata_api::{
    Compare, EventKind, KeyValue, Op, OpResult, Txn, TxnResult, WatchEvent,
};
pub use server::{MetadataConfig, MetadataNode};

openraft::declare_raft_types!(
    /// Raft types of the metadata service.
    pub TypeConfig:
        D = state::Command,
        R = state::CommandResult,
        SnapshotData = std::io::Cursor<Vec<u8>>,
);

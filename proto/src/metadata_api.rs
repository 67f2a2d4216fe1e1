//! The metadata service's client API (DESIGN §9): versioned keys, prefix
//! ranges, compare-and-swap transactions, leases, ephemeral keys and watches.
//! Raft traffic between metadata nodes travels in `MetaRequest::Raft`.

use serde::{Deserialize, Serialize};

/// Limits enforced by the server, each with a clear error.
pub const MAX_KEY_BYTES: usize = 4 * 1024;
pub const MAX_VALUE_BYTES: usize = 1024 * 1024;
pub const MAX_TXN_OPS: usize = 128;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    /// Revision of the change that created the key.
    pub create_revision: u64,
    /// Revision of the last change to the key.
    pub mod_revision: u64,
    /// Number of puts since creation (1 after the first put).
    pub version: u64,
    /// Lease the key is bound to, if ephemeral.
    pub lease: Option<u64>,
}

/// A condition a transaction checks. `version == 0` means "key absent".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Compare {
    pub key: String,
    pub version: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    Put {
        key: String,
        value: Vec<u8>,
        lease: Option<u64>,
    },
    Delete {
        key: String,
    },
    Get {
        key: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Txn {
    pub compares: Vec<Compare>,
    pub success: Vec<Op>,
    pub failure: Vec<Op>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum OpResult {
    Put { prev: Option<KeyValue> },
    Delete { prev: Option<KeyValue> },
    Get(Option<KeyValue>),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxnResult {
    pub succeeded: bool,
    /// The store's revision after the transaction.
    pub revision: u64,
    pub results: Vec<OpResult>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    Put,
    Delete,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchEvent {
    pub revision: u64,
    pub kind: EventKind,
    /// For a delete, the key with its last value.
    pub kv: KeyValue,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetaRequest {
    Get {
        key: String,
    },
    Range {
        prefix: String,
        limit: u32,
    },
    Txn(Txn),
    LeaseGrant {
        ttl_ms: u64,
    },
    LeaseKeepAlive {
        id: u64,
    },
    LeaseRevoke {
        id: u64,
    },
    /// Streams every change under `prefix` with revision ≥ `start_revision`
    /// (0: from now on), in revision order.
    Watch {
        prefix: String,
        start_revision: u64,
    },
    Status,
    /// Raft messages between nodes, encoded by the metadata crate.
    Raft {
        kind: RaftKind,
        body: Vec<u8>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RaftKind {
    AppendEntries,
    Vote,
    InstallSnapshot,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum MetaError {
    #[error("not the leader; leader is {leader:?}")]
    NotLeader { leader: Option<String> },
    #[error("lease {0} not found")]
    LeaseNotFound(u64),
    #[error("limit exceeded: {0}")]
    Limit(String),
    #[error("history compacted: oldest available revision is {0}")]
    Compacted(u64),
    #[error("internal: {0}")]
    Internal(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub node_id: u64,
    pub leader: Option<u64>,
    pub term: u64,
    pub revision: u64,
    pub last_applied: u64,
    pub members: Vec<(u64, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetaResponse {
    Get(Option<KeyValue>),
    Range(Vec<KeyValue>),
    Txn(TxnResult),
    Lease {
        id: u64,
        ttl_ms: u64,
    },
    Ok,
    /// Sent first on a watch stream: the store's revision when it started.
    WatchStarted {
        revision: u64,
    },
    Event(WatchEvent),
    Status(Status),
    Raft(Vec<u8>),
    Error(MetaError),
}

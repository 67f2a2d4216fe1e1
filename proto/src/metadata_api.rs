//! The metadata service's client API (DESIGN §9): versioned keys, prefix
//! ranges, compare-and-swap transactions, leases, ephemeral keys and watches.
//! Raft traffic between metadata nodes travels in `MetaRequest::Raft`.

use serde::{Deserialize, Serialize};

/// Limits a metadata node enforces, each with a clear error
/// (`MetaError::Limit`). Configurable per node; these are the defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Limits {
    pub max_key_bytes: usize,
    pub max_value_bytes: usize,
    /// Compares plus operations of both branches.
    pub max_txn_ops: usize,
    /// Concurrent watches one client connection may hold.
    pub max_watchers_per_connection: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_key_bytes: 4 * 1024,
            max_value_bytes: 1024 * 1024,
            max_txn_ops: 128,
            max_watchers_per_connection: 1024,
        }
    }
}

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

/// Identifies one client request across its retries: a client id chosen at
/// random by each client and a sequence number it increments per request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RequestId {
    pub client: u64,
    pub seq: u64,
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
    /// A transaction the client may retry: applied at most once per `request`.
    TxnOnce {
        request: RequestId,
        txn: Txn,
    },
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
    /// Adds a node: first as a learner that catches up, then as a voter.
    AddNode {
        id: u64,
        addr: String,
    },
    /// Removes a voter (possibly the leader, which then steps down).
    RemoveNode {
        id: u64,
    },
    /// A request a follower passes on to the leader; never forwarded again.
    Forwarded(Box<MetaRequest>),
    /// Sent between nodes forming a cluster for the first time: does the
    /// receiver's configured initial membership equal `members`?
    CheckMembers {
        members: Vec<(u64, String)>,
    },
    /// Raft messages between nodes, encoded by the metadata crate.
    Raft {
        kind: RaftKind,
        body: Vec<u8>,
    },
    /// One page of the keys under `prefix`, in key order, from just after
    /// `after` (from the first when `None`): at most `limit` keys (0: the
    /// server's most, [`RANGE_PAGE_KEYS`]), fewer once their keys and values
    /// reach [`RANGE_PAGE_BYTES`] (one key at least). With `keys_only` the
    /// values are left empty. Answered by [`MetaResponse::RangePage`]. A
    /// range of any size is read this way; one answer must fit a message.
    RangePage {
        prefix: String,
        after: Option<String>,
        limit: u32,
        keys_only: bool,
    },
}

/// Most keys one [`MetaRequest::RangePage`] answer holds.
pub const RANGE_PAGE_KEYS: u32 = 10_000;
/// A [`MetaRequest::RangePage`] answer stops adding keys once their keys
/// and values reach this many bytes: with one maximal value past it, an
/// answer stays well under the RPC message limit.
pub const RANGE_PAGE_BYTES: usize = 2 * 1024 * 1024;

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
    /// No leader answered in time; for a write, the outcome is unknown.
    #[error("unavailable: {0}")]
    Unavailable(String),
    #[error("configuration mismatch: {0}")]
    ConfigMismatch(String),
    #[error("membership change refused: {0}")]
    Membership(String),
    #[error("internal: {0}")]
    Internal(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub node_id: u64,
    /// Leader, Follower, Candidate or Learner.
    pub state: String,
    pub leader: Option<u64>,
    pub term: u64,
    pub revision: u64,
    pub last_applied: u64,
    /// Every node of the current configuration with its address.
    pub members: Vec<(u64, String)>,
    pub voters: Vec<u64>,
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
    /// The answer of the leader `leader` to a request a follower forwarded.
    Forwarded {
        leader: String,
        response: Box<MetaResponse>,
    },
    Raft(Vec<u8>),
    Error(MetaError),
    /// A page of a range; `more` when keys under the prefix follow it.
    RangePage {
        kvs: Vec<KeyValue>,
        more: bool,
    },
}

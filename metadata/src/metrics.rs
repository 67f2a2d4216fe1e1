//! The metadata service's metric names (meanings: `docs/metrics.md`), all
//! labelled with the node's id (`node`), refreshed every second.

/// The node's Raft term, last log index and applied index.
pub const RAFT_TERM: &str = "magnetar_metadata_raft_term";
pub const RAFT_LAST_LOG_INDEX: &str = "magnetar_metadata_raft_last_log_index";
pub const RAFT_APPLIED_INDEX: &str = "magnetar_metadata_raft_applied_index";
/// Log entries appended but not applied yet on this node.
pub const RAFT_APPLY_LAG: &str = "magnetar_metadata_raft_apply_lag";
/// 1 on the leader; 1 while the node knows a leader.
pub const RAFT_IS_LEADER: &str = "magnetar_metadata_raft_is_leader";
pub const RAFT_HAS_LEADER: &str = "magnetar_metadata_raft_has_leader";
/// Leases, keys and the revision of the applied state.
pub const LEASES: &str = "magnetar_metadata_leases";
pub const KEYS: &str = "magnetar_metadata_keys";
pub const REVISION: &str = "magnetar_metadata_revision";
/// Watches served by this node now.
pub const WATCHES: &str = "magnetar_metadata_watches";

//! Loaded topics: the registry (what this broker serves) and the topic
//! itself (storage, producers, subscriptions).

pub mod compaction;
pub mod dead_letter;
pub mod dedup;
pub mod delayed;
pub mod partitioned;
pub mod persistent;
pub mod policies;
pub mod producers;
pub mod registry;
pub mod schema;

pub use persistent::{InitialPosition, Topic};
pub use registry::TopicRegistry;

/// A topic's local name from its metadata-key form (`TopicName::as_key`
/// encodes `%` and `/`).
pub fn decode_key(local: &str) -> String {
    local.replace("%2F", "/").replace("%25", "%")
}

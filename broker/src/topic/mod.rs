//! Loaded topics: the registry (what this broker serves) and the topic
//! itself (storage, producers, subscriptions).

pub mod persistent;
pub mod registry;

pub use persistent::{InitialPosition, Topic};
pub use registry::TopicRegistry;

//! The broker: the Pulsar binary protocol server, topics backed by managed
//! ledgers on the bookie tier, durable cursors and dispatch.
//!
//! It must not keep message data that is not also in bookies (the tail cache
//! is only a cache).
//!
//! Layers, top to bottom (nothing imports upward): `service` builds and owns
//! the parts; `protocol` speaks to clients; `load` balances bundles; `topic`
//! holds loaded topics; `ownership` decides which broker serves which
//! bundle; `subscription` dispatches; `managed_ledger` stores.

pub mod admin;
pub mod config;
pub mod error;
pub mod keys;
pub mod load;
pub mod managed_ledger;
pub mod ownership;
pub mod protocol;
pub mod service;
pub mod standalone;
pub mod subscription;
pub mod topic;

pub use config::BrokerConfig;
pub use error::BrokerError;
pub use managed_ledger::ManagedLedgerConfig;
pub use service::Broker;
pub use topic::Topic;

/// Highest Pulsar protocol version whose features Magnetar implements.
pub const PROTOCOL_VERSION: i32 = 12;

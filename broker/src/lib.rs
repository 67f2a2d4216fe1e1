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
pub mod logs;
pub mod managed_ledger;
pub mod metrics;
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
/// What each version after 12 lets a client do, and why it holds here:
/// 13 JSON schemas as Avro definitions and 15 GET_OR_CREATE_SCHEMA (the
/// schema registry); 14 Key_Shared (and an auth challenge the broker would
/// have to start); 16 and 18 broker entry metadata (only when the broker
/// adds it, which it does not); 17 ack receipts (ACK_RESPONSE); 19 the
/// transaction coordinator (only for clients that enable transactions,
/// which get an error either way); 20 TOPIC_MIGRATED (sent by the broker
/// only); 21 the AUTO_CONSUME schema sent on SUBSCRIBE (accepted as no
/// schema). The Python client's C++ core sends 21.
pub const PROTOCOL_VERSION: i32 = 21;

//! The one place Magnetar's bytes are defined: the Pulsar wire subset and its
//! framing, the internal ledger and metadata protocols, and the QUIC/TLS
//! transport they travel on.
//!
//! This crate must not depend on the broker, bookie or metadata crates.

pub mod commands;
pub mod frame;
pub mod hash;
pub mod ledger;
pub mod metadata_api;
pub mod resolve;
pub mod rpc;
pub mod shared_bytes;
pub mod tls;
pub mod token;
pub mod topic;
mod unreachable;

/// Types generated from `proto/pulsar_api.proto` (Pulsar wire subset).
#[allow(clippy::all, missing_docs)]
pub mod pulsar {
    include!(concat!(env!("OUT_DIR"), "/pulsar.proto.rs"));
}

pub use frame::{Frame, FrameError, Payload};
pub use topic::{is_valid_segment, TopicName, TopicNameError};

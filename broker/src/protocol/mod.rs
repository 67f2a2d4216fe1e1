//! The Pulsar binary protocol: one task per client connection.

pub mod connection;

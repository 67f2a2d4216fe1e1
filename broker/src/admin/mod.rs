//! The admin REST API and HTTP lookups (`http.rs`: routing only; one file
//! per REST resource).

pub mod http;
pub mod subscriptions;

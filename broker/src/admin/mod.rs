//! The admin REST API and HTTP lookups (`http.rs`: routing only).

pub mod http;

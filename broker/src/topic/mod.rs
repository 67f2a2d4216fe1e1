//! Loaded topics.

pub mod persistent;

pub use persistent::{InitialPosition, Topic};

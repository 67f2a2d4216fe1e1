//! Every metadata key the broker reads or writes, in one place.

/// Where namespaces are declared; a topic can only live in one that exists.
pub const NAMESPACES_PREFIX: &str = "/namespaces/";
/// Brokers register here (ephemeral keys on their leases).
pub const BROKERS_PREFIX: &str = "/brokers/available/";
/// A topic's ledger list and cursor pointers.
pub const MANAGED_LEDGERS_PREFIX: &str = "/managed-ledgers/";

pub fn namespace(namespace: &str) -> String {
    format!("{NAMESPACES_PREFIX}{namespace}")
}

pub fn managed_ledger(name: &str) -> String {
    format!("{MANAGED_LEDGERS_PREFIX}{name}")
}

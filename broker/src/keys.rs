//! Every metadata key the broker reads or writes, in one place.

/// Where namespaces are declared (with their bundles); a topic can only
/// live in one that exists.
pub const NAMESPACES_PREFIX: &str = "/namespaces/";
/// Tenants: `/tenants/<tenant>`, Pulsar's `TenantInfo` as JSON.
pub const TENANTS_PREFIX: &str = "/tenants/";
/// Partitioned topics: `/partitioned-topics/<tenant>/<ns>/<domain>/<topic>`
/// holding `{"partitions": N}`; each partition is an ordinary topic.
pub const PARTITIONED_PREFIX: &str = "/partitioned-topics/";
/// A topic's own policies (Pulsar's topic policies) as JSON:
/// `/topic-policies/<tenant>/<ns>/<domain>/<topic>`.
pub const TOPIC_POLICIES_PREFIX: &str = "/topic-policies/";
/// A topic's schema versions: `/schemas/<tenant>/<ns>/<domain>/<topic>`.
pub const SCHEMAS_PREFIX: &str = "/schemas/";
/// Brokers register here (ephemeral keys on their leases).
pub const BROKERS_PREFIX: &str = "/brokers/available/";
/// A topic's ledger list and cursor pointers.
pub const MANAGED_LEDGERS_PREFIX: &str = "/managed-ledgers/";
/// Bundle owners: `/ownership/<tenant>/<ns>/<range>`, ephemeral on the
/// owner's lease; the key's creation revision is the ownership epoch. A
/// bundle handed to another broker gets its key re-created on that
/// broker's lease.
pub const OWNERSHIP_PREFIX: &str = "/ownership/";
/// The load manager's leader (ephemeral on its broker's lease).
pub const LOAD_MANAGER_LEADER: &str = "/loadbalance/leader";
/// Work for a bundle's owner (unload, split): `<prefix><broker>/<id>`.
pub const COMMANDS_PREFIX: &str = "/loadbalance/commands/";

pub fn namespace(namespace: &str) -> String {
    format!("{NAMESPACES_PREFIX}{namespace}")
}

pub fn tenant(tenant: &str) -> String {
    format!("{TENANTS_PREFIX}{tenant}")
}

/// `name` is `TopicName::as_key`.
pub fn partitioned(name: &str) -> String {
    format!("{PARTITIONED_PREFIX}{name}")
}

/// `name` is `TopicName::as_key`.
pub fn topic_policies(name: &str) -> String {
    format!("{TOPIC_POLICIES_PREFIX}{name}")
}

/// `name` is `TopicName::as_key`.
pub fn schema(name: &str) -> String {
    format!("{SCHEMAS_PREFIX}{name}")
}

pub fn managed_ledger(name: &str) -> String {
    format!("{MANAGED_LEDGERS_PREFIX}{name}")
}

pub fn broker(broker_id: &str) -> String {
    format!("{BROKERS_PREFIX}{broker_id}")
}

/// `bundle` is `tenant/ns/0x.._0x..`.
pub fn owner(bundle: &str) -> String {
    format!("{OWNERSHIP_PREFIX}{bundle}")
}

pub fn commands_of(broker_id: &str) -> String {
    format!("{COMMANDS_PREFIX}{broker_id}/")
}

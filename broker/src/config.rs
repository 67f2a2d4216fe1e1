//! `BrokerConfig`: the `magnetar broker --config` file (TOML, unknown keys
//! refused) apart from its `metadata` and `[tls]` entries, with defaults.

use std::net::SocketAddr;

use crate::managed_ledger::ManagedLedgerConfig;
use crate::protocol::ConnectionLimits;

/// A broker's configuration: what `magnetar broker --config` reads.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerConfig {
    /// Pulsar binary protocol listener.
    pub listen: SocketAddr,
    /// URL clients are sent to by LOOKUP (default: `pulsar://<listen>`).
    /// Its `host:port` is the broker's id in the cluster.
    #[serde(default)]
    pub advertised_url: Option<String>,
    /// TTL of the broker's lease, on which its registration and every
    /// bundle it owns hang: a broker that cannot renew it stops serving
    /// before it can expire; another broker takes over after.
    #[serde(default = "default_lease_ttl_ms")]
    pub lease_ttl_ms: u64,
    /// Bundles a namespace is split into when it is first used.
    #[serde(default = "default_bundles")]
    pub default_bundles: usize,
    /// How often the broker publishes its load report.
    #[serde(default = "default_load_report_interval_ms")]
    pub load_report_interval_ms: u64,
    /// Revoke the lease of an owner whose advertised address refuses
    /// connections (its process is gone) instead of waiting out the TTL.
    /// Turn off where the advertised address may refuse while the broker
    /// lives (a proxy or port mapping in between).
    #[serde(default = "default_true")]
    pub fast_failover: bool,
    /// `[managed_ledger]`: replication and ledger rolls of topics.
    #[serde(default)]
    pub managed_ledger: ManagedLedgerConfig,
    /// `[connection]`: per-client limits and keep-alive.
    #[serde(default)]
    pub connection: ConnectionLimits,
}

fn default_lease_ttl_ms() -> u64 {
    5000
}

fn default_bundles() -> usize {
    16
}

fn default_load_report_interval_ms() -> u64 {
    5000
}

fn default_true() -> bool {
    true
}

impl BrokerConfig {
    pub fn new(listen: SocketAddr) -> BrokerConfig {
        BrokerConfig {
            listen,
            advertised_url: None,
            lease_ttl_ms: default_lease_ttl_ms(),
            default_bundles: default_bundles(),
            load_report_interval_ms: default_load_report_interval_ms(),
            fast_failover: true,
            managed_ledger: ManagedLedgerConfig::default(),
            connection: ConnectionLimits::default(),
        }
    }
}

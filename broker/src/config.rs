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
    #[serde(default)]
    pub advertised_url: Option<String>,
    /// `[managed_ledger]`: replication and ledger rolls of topics.
    #[serde(default)]
    pub managed_ledger: ManagedLedgerConfig,
    /// `[connection]`: per-client limits and keep-alive.
    #[serde(default)]
    pub connection: ConnectionLimits,
}

impl BrokerConfig {
    pub fn new(listen: SocketAddr) -> BrokerConfig {
        BrokerConfig {
            listen,
            advertised_url: None,
            managed_ledger: ManagedLedgerConfig::default(),
            connection: ConnectionLimits::default(),
        }
    }
}

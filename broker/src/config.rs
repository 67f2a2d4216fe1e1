//! `BrokerConfig`: the `magnetar broker --config` file (TOML, unknown keys
//! refused) apart from its `metadata` and `[tls]` entries, with defaults.

use std::net::SocketAddr;

use crate::managed_ledger::ManagedLedgerConfig;

/// A broker's configuration: what `magnetar broker --config` reads (TOML,
/// unknown keys refused) apart from its `metadata` and `[tls]` entries.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerConfig {
    /// Pulsar binary protocol listener.
    pub listen: SocketAddr,
    /// URL clients are sent to by LOOKUP (default: `pulsar://<listen>`).
    #[serde(default)]
    pub advertised_url: Option<String>,
    #[serde(default)]
    pub managed_ledger: ManagedLedgerConfig,
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
    /// Seconds without traffic before the broker pings; twice that closes.
    #[serde(default = "default_keepalive_secs")]
    pub keepalive_secs: u64,
}

fn default_max_message_bytes() -> usize {
    magnetar_proto::frame::DEFAULT_MAX_MESSAGE_BYTES
}

fn default_keepalive_secs() -> u64 {
    30
}

impl BrokerConfig {
    pub fn new(listen: SocketAddr) -> BrokerConfig {
        BrokerConfig {
            listen,
            advertised_url: None,
            managed_ledger: ManagedLedgerConfig::default(),
            max_message_bytes: default_max_message_bytes(),
            keepalive_secs: default_keepalive_secs(),
        }
    }
}

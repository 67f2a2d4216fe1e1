//! `BrokerConfig`: the `magnetar broker --config` file (TOML, unknown keys
//! refused) apart from its `metadata` and `[tls]` entries, with defaults.

use std::net::SocketAddr;

use crate::load::manager::LoadManagerConfig;
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
    /// Pulsar protocol over TLS (Pulsar's `brokerServicePortTls`, 6651 by
    /// convention); needs `tls_cert_file` and `tls_key_file`. Lookups then
    /// also answer `pulsar+ssl://` URLs.
    #[serde(default)]
    pub tls_listen: Option<SocketAddr>,
    /// URL TLS clients are sent to (default: `pulsar+ssl://<tls_listen>`).
    #[serde(default)]
    pub advertised_tls_url: Option<String>,
    /// PEM certificate chain the TLS listener presents.
    #[serde(default)]
    pub tls_cert_file: Option<std::path::PathBuf>,
    /// PEM private key of `tls_cert_file`.
    #[serde(default)]
    pub tls_key_file: Option<std::path::PathBuf>,
    /// HTTP listener: admin REST API and HTTP lookups (default: port 8080
    /// on the host of `listen`).
    #[serde(default)]
    pub http_listen: Option<SocketAddr>,
    /// URL other brokers and clients reach the HTTP listener at (default:
    /// `http://<http_listen>`).
    #[serde(default)]
    pub advertised_http_url: Option<String>,
    /// The cluster's name, as in Pulsar's `/admin/v2/brokers/{cluster}`.
    #[serde(default = "default_cluster")]
    pub cluster_name: String,
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
    /// How often message TTL, backlog quotas and retention by age are
    /// checked on every loaded topic.
    #[serde(default = "default_policy_check_interval_ms")]
    pub policy_check_interval_ms: u64,
    /// `[load_manager]`: bundle balancing between brokers.
    #[serde(default)]
    pub load_manager: LoadManagerConfig,
    /// `[managed_ledger]`: replication and ledger rolls of topics.
    #[serde(default)]
    pub managed_ledger: ManagedLedgerConfig,
    /// `[connection]`: per-client limits and keep-alive.
    #[serde(default)]
    pub connection: ConnectionLimits,
    /// Pulsar's `exposeTopicLevelMetricsInPrometheus`: topic and
    /// subscription series on `/metrics` (true), or namespace sums only —
    /// for brokers with very many topics.
    #[serde(default = "default_true")]
    pub expose_topic_level_metrics_in_prometheus: bool,
    /// `auth_token_secret_key = "path"`: clients must CONNECT with a token
    /// (Pulsar's `token` method) signed by this HS256 key (`magnetar tokens
    /// create-secret-key`); none: no authentication.
    #[serde(default)]
    pub auth_token_secret_key: Option<std::path::PathBuf>,
}

fn default_cluster() -> String {
    "magnetar".into()
}

fn default_lease_ttl_ms() -> u64 {
    5000
}

fn default_bundles() -> usize {
    16
}

fn default_policy_check_interval_ms() -> u64 {
    10_000
}

fn default_load_report_interval_ms() -> u64 {
    5000
}

fn default_true() -> bool {
    true
}

/// The default HTTP port (Pulsar's).
pub const DEFAULT_HTTP_PORT: u16 = 8080;

impl BrokerConfig {
    /// Where the HTTP listener binds.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_listen
            .unwrap_or_else(|| SocketAddr::new(self.listen.ip(), DEFAULT_HTTP_PORT))
    }

    pub fn new(listen: SocketAddr) -> BrokerConfig {
        BrokerConfig {
            listen,
            advertised_url: None,
            tls_listen: None,
            advertised_tls_url: None,
            tls_cert_file: None,
            tls_key_file: None,
            http_listen: None,
            advertised_http_url: None,
            cluster_name: default_cluster(),
            lease_ttl_ms: default_lease_ttl_ms(),
            default_bundles: default_bundles(),
            load_report_interval_ms: default_load_report_interval_ms(),
            policy_check_interval_ms: default_policy_check_interval_ms(),
            fast_failover: true,
            load_manager: LoadManagerConfig::default(),
            managed_ledger: ManagedLedgerConfig::default(),
            connection: ConnectionLimits::default(),
            auth_token_secret_key: None,
            expose_topic_level_metrics_in_prometheus: true,
        }
    }
}

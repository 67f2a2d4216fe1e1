//! Wiring for `magnetar standalone`: one metadata node, one bookie and one
//! broker in one process, talking to each other over the same protocols a
//! cluster uses (QUIC with mutual TLS between tiers).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use magnetar_bookie::{Bookie, BookieConfig, LedgerClient};
use magnetar_metadata::{MetadataClient, MetadataConfig, MetadataNode};
use magnetar_proto::rpc::{client_endpoint, RpcClient};
use magnetar_proto::tls::TlsMaterial;

use crate::{Broker, BrokerConfig, ManagedLedgerConfig};

#[derive(Debug, Clone)]
pub struct StandaloneConfig {
    pub data_dir: PathBuf,
    pub bind_host: String,
    pub broker_port: u16,
    /// Pulsar protocol over TLS on this port (none: no TLS listener).
    pub broker_tls_port: Option<u16>,
    /// The TLS listener's certificate and key (PEM); without them one is
    /// made in `<data_dir>/client-tls/` for localhost, signed by a CA
    /// clients trust there (`ca.pem`).
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    /// The broker's HTTP port: admin REST API and HTTP lookups.
    pub http_port: u16,
    pub metadata_port: u16,
    pub bookie_port: u16,
    pub managed_ledger: ManagedLedgerConfig,
    /// Clients must connect with a token signed by this key (none: open).
    pub auth_token_secret_key: Option<PathBuf>,
    /// How often TTL, backlog quotas and retention by age are checked.
    pub policy_check_interval_ms: u64,
    /// Topic and subscription series on `/metrics` (else namespace sums).
    pub expose_topic_level_metrics_in_prometheus: bool,
}

impl StandaloneConfig {
    pub fn new(data_dir: PathBuf) -> StandaloneConfig {
        StandaloneConfig {
            data_dir,
            bind_host: "127.0.0.1".into(),
            broker_port: 6650,
            broker_tls_port: None,
            tls_cert_file: None,
            tls_key_file: None,
            http_port: crate::config::DEFAULT_HTTP_PORT,
            metadata_port: 2379,
            bookie_port: 3181,
            managed_ledger: ManagedLedgerConfig::default(),
            auth_token_secret_key: None,
            policy_check_interval_ms: 10_000,
            expose_topic_level_metrics_in_prometheus: true,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("standalone: {0}")]
pub struct StandaloneError(String);

fn err(e: impl std::fmt::Display) -> StandaloneError {
    StandaloneError(e.to_string())
}

pub struct Standalone {
    pub metadata_node: Arc<MetadataNode>,
    pub bookie: Arc<Bookie>,
    pub broker: Arc<Broker>,
    /// The ledger client the broker writes with.
    pub ledgers: LedgerClient,
}

impl Standalone {
    pub async fn start(cfg: StandaloneConfig) -> Result<Standalone, StandaloneError> {
        let addr = |port: u16| -> Result<SocketAddr, StandaloneError> {
            format!("{}:{port}", cfg.bind_host).parse().map_err(err)
        };
        std::fs::create_dir_all(&cfg.data_dir).map_err(err)?;
        let tls = TlsMaterial::load_or_generate(&cfg.data_dir.join("tls")).map_err(err)?;
        let mcfg = MetadataConfig::new(1, addr(cfg.metadata_port)?, cfg.data_dir.join("metadata"));
        let metadata_node = MetadataNode::start(mcfg, &tls).await.map_err(err)?;
        if !metadata_node.wait_for_leader(Duration::from_secs(30)).await {
            return Err(err("metadata node elected no leader"));
        }
        let rpc = RpcClient::new(client_endpoint(&tls).map_err(err)?);
        let metadata = MetadataClient::new(rpc.clone(), vec![metadata_node.local_addr()]);
        let mut broker_cfg = BrokerConfig::new(addr(cfg.broker_port)?);
        broker_cfg.managed_ledger = cfg.managed_ledger.clone();
        broker_cfg.policy_check_interval_ms = cfg.policy_check_interval_ms;
        broker_cfg.http_listen = Some(addr(cfg.http_port)?);
        broker_cfg.auth_token_secret_key = cfg.auth_token_secret_key.clone();
        broker_cfg.expose_topic_level_metrics_in_prometheus =
            cfg.expose_topic_level_metrics_in_prometheus;
        if let Some(port) = cfg.broker_tls_port {
            broker_cfg.tls_listen = Some(addr(port)?);
            let (cert, key) = match (&cfg.tls_cert_file, &cfg.tls_key_file) {
                (Some(c), Some(k)) => (c.clone(), k.clone()),
                (None, None) => {
                    let mut names: Vec<String> =
                        vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
                    if !names.contains(&cfg.bind_host) {
                        names.push(cfg.bind_host.clone());
                    }
                    let dir = cfg.data_dir.join("client-tls");
                    let made = TlsMaterial::issue_server(&dir, &names).map_err(err)?;
                    tracing::info!(ca = %made.ca_cert.display(), "TLS clients trust this CA");
                    (made.cert, made.key)
                }
                _ => return Err(err("give both tls_cert_file and tls_key_file, or neither")),
            };
            broker_cfg.tls_cert_file = Some(cert);
            broker_cfg.tls_key_file = Some(key);
        }
        Broker::create_namespace(&metadata, "public/default", broker_cfg.default_bundles)
            .await
            .map_err(err)?;
        let bcfg = BookieConfig::new(addr(cfg.bookie_port)?, cfg.data_dir.join("bookie"));
        let bookie = Bookie::start(bcfg, &tls, &metadata).await.map_err(err)?;
        let ledgers = LedgerClient::new(metadata.clone(), rpc);
        let broker = Broker::start(broker_cfg, metadata, ledgers.clone())
            .await
            .map_err(err)?;
        Ok(Standalone {
            metadata_node,
            bookie,
            broker,
            ledgers,
        })
    }

    pub fn service_url(&self) -> String {
        self.broker.service_url.clone()
    }

    /// Closes open ledgers and stops the tiers.
    pub async fn shutdown(self) {
        self.broker.shutdown().await;
        self.bookie.shutdown().await;
        self.metadata_node.shutdown().await;
    }
}

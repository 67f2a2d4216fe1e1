//! The broker: the Pulsar binary protocol server, topics backed by managed
//! ledgers on the bookie tier, durable cursors and dispatch.
//!
//! It must not keep message data that is not also in bookies (the tail cache
//! is only a cache).

pub mod connection;
pub mod cursor;
pub mod managed_ledger;
pub mod standalone;
pub mod subscription;
pub mod topic;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use magnetar_bookie::LedgerClient;
use magnetar_metadata::MetadataClient;
use magnetar_proto::pulsar::ServerError;
use magnetar_proto::TopicName;
use tokio::net::TcpListener;
use tokio::sync::OnceCell;

pub use managed_ledger::ManagedLedgerConfig;
pub use topic::Topic;

/// Where namespaces are declared; a topic can only live in one that exists.
pub const NAMESPACES_PREFIX: &str = "/namespaces/";
pub const BROKERS_PREFIX: &str = "/brokers/available/";
/// Highest Pulsar protocol version whose features Magnetar implements.
pub const PROTOCOL_VERSION: i32 = 12;

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

#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct BrokerError {
    pub code: ServerError,
    pub message: String,
}

impl BrokerError {
    pub fn new(code: ServerError, message: impl Into<String>) -> BrokerError {
        BrokerError {
            code,
            message: message.into(),
        }
    }
}

pub struct Broker {
    pub cfg: BrokerConfig,
    pub metadata: MetadataClient,
    pub ledgers: LedgerClient,
    pub service_url: String,
    pub local_addr: SocketAddr,
    topics: Mutex<HashMap<TopicName, Arc<OnceCell<Arc<Topic>>>>>,
    next_id: AtomicU64,
    accept: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Broker {
    pub async fn start(
        cfg: BrokerConfig,
        metadata: MetadataClient,
        ledgers: LedgerClient,
    ) -> std::io::Result<Arc<Broker>> {
        let listener = TcpListener::bind(cfg.listen).await?;
        let local_addr = listener.local_addr()?;
        let service_url = cfg
            .advertised_url
            .clone()
            .unwrap_or_else(|| format!("pulsar://{local_addr}"));
        let broker = Arc::new(Broker {
            cfg,
            metadata,
            ledgers,
            service_url,
            local_addr,
            topics: Mutex::default(),
            next_id: AtomicU64::new(1),
            accept: Mutex::default(),
        });
        let b = broker.clone();
        let task = tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((stream, peer)) => {
                        let _ = stream.set_nodelay(true);
                        let b = b.clone();
                        tokio::spawn(async move { connection::serve(b, stream, peer).await });
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    }
                }
            }
        });
        *broker.accept.lock().unwrap_or_else(|e| e.into_inner()) = Some(task);
        tracing::info!(addr = %local_addr, url = %broker.service_url, "broker listening");
        Ok(broker)
    }

    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Loads (or creates) a topic. Loading the same topic concurrently runs once.
    pub async fn topic(&self, name: &TopicName) -> Result<Arc<Topic>, BrokerError> {
        if !name.persistent {
            return Err(BrokerError::new(
                ServerError::TopicNotFound,
                "non-persistent topics are not supported yet",
            ));
        }
        let cell = self
            .topics
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(name.clone())
            .or_default()
            .clone();
        let res = cell
            .get_or_try_init(|| async {
                let ns_key = format!("{NAMESPACES_PREFIX}{}", name.namespace());
                match self.metadata.get(&ns_key).await {
                    Ok(Some(_)) => {}
                    Ok(None) => {
                        return Err(BrokerError::new(
                            ServerError::TopicNotFound,
                            format!("namespace {} does not exist", name.namespace()),
                        ))
                    }
                    Err(e) => {
                        return Err(BrokerError::new(ServerError::MetadataError, e.to_string()))
                    }
                }
                Topic::load(name.clone(), self).await
            })
            .await
            .cloned();
        if res.is_err() {
            self.topics
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(name);
        }
        res
    }

    /// Stops accepting, closes every topic's open ledger.
    pub async fn shutdown(&self) {
        if let Some(t) = self.accept.lock().unwrap_or_else(|e| e.into_inner()).take() {
            t.abort();
        }
        let topics: Vec<_> = self
            .topics
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .filter_map(|(_, c)| c.get().cloned())
            .collect();
        for t in topics {
            if let Err(e) = t.ml.close().await {
                tracing::warn!(topic = %t.name, error = %e, "closing topic failed");
            }
        }
    }

    /// Creates a namespace (idempotent).
    pub async fn create_namespace(
        metadata: &MetadataClient,
        namespace: &str,
    ) -> Result<(), magnetar_metadata::MetadataError> {
        metadata
            .cas(
                &format!("{NAMESPACES_PREFIX}{namespace}"),
                0,
                b"{}".to_vec(),
                None,
            )
            .await
            .map(|_| ())
    }
}

//! `Broker`: builds, owns, starts and stops the broker's parts. Nothing
//! below this module holds it; the parts get narrow handles.

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

use crate::keys::NAMESPACES_PREFIX;
use crate::protocol::connection;
use crate::{BrokerConfig, BrokerError, Topic};

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

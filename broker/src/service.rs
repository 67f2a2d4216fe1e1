//! `Broker`: builds, owns, starts and stops the broker's parts. Nothing
//! below this module holds it; the parts get narrow handles.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use magnetar_bookie::LedgerClient;
use magnetar_metadata::MetadataClient;
use magnetar_proto::commands::Assigned;
use tokio::net::TcpListener;

use crate::managed_ledger::Stores;
use crate::protocol::{connection, lookup::Lookups, ProtocolContext};
use crate::topic::TopicRegistry;
use crate::{keys, BrokerConfig};

pub struct Broker {
    pub service_url: String,
    pub local_addr: SocketAddr,
    pub topics: Arc<TopicRegistry>,
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
        let stores = Stores::new(Arc::new(ledgers), Arc::new(metadata.clone()));
        let topics = Arc::new(TopicRegistry::new(
            metadata,
            stores,
            cfg.managed_ledger.clone(),
        ));
        let ctx = Arc::new(ProtocolContext::new(
            topics.clone(),
            Arc::new(Lookups {
                service_url: service_url.clone(),
            }),
            cfg.connection.clone(),
        ));
        let task = tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((stream, peer)) => {
                        let _ = stream.set_nodelay(true);
                        tokio::spawn(connection::serve(ctx.clone(), stream, peer));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    }
                }
            }
        });
        tracing::info!(addr = %local_addr, url = %service_url, "broker listening");
        Ok(Arc::new(Broker {
            service_url,
            local_addr,
            topics,
            accept: Mutex::new(Some(task)),
        }))
    }

    /// Stops accepting, closes every topic's open ledger and tells clients.
    pub async fn shutdown(&self) {
        if let Some(t) = self.accept.lock().unwrap_or_else(|e| e.into_inner()).take() {
            t.abort();
        }
        for t in self.topics.loaded() {
            let (detached, res) = t.close().await;
            if let Err(e) = res {
                tracing::warn!(topic = %t.name, error = %e, "closing topic failed");
            }
            detached.disconnect(&Assigned::default());
            self.topics.remove(&t);
        }
    }

    /// Creates a namespace (idempotent).
    pub async fn create_namespace(
        metadata: &MetadataClient,
        namespace: &str,
    ) -> Result<(), magnetar_metadata::MetadataError> {
        metadata
            .cas(&keys::namespace(namespace), 0, b"{}".to_vec(), None)
            .await
            .map(|_| ())
    }
}

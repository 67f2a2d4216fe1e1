//! The broker's own producer for dead-letter topics: a client of the
//! cluster through this broker's service URL, so a dead-letter topic served
//! by another broker is reached the way any client reaches it (lookup,
//! redirect, reconnect). One producer per dead-letter topic, kept while in
//! use (bounded).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use futures::future::BoxFuture;
use futures::FutureExt;
use magnetar_client::{Client, OutgoingMessage, Producer, ProducerOptions};
use tokio::sync::{Mutex, OnceCell};

use crate::subscription::{DeadLetter, DeadLetterSink};

/// Dead-letter topics with a producer open at once; past it they are
/// closed and opened again as needed.
const MAX_PRODUCERS: usize = 1_000;

pub struct ClientSink {
    service_url: String,
    /// The token the broker's own client connects with, if tokens are on.
    token: Option<String>,
    client: OnceCell<Client>,
    producers: Mutex<HashMap<String, Arc<Producer>>>,
}

impl ClientSink {
    pub fn new(service_url: String, token: Option<String>) -> Arc<ClientSink> {
        Arc::new(ClientSink {
            service_url,
            token,
            client: OnceCell::new(),
            producers: Mutex::default(),
        })
    }

    async fn producer(&self, topic: &str) -> Result<Arc<Producer>, String> {
        let client = self
            .client
            .get_or_try_init(|| {
                let mut b = Client::builder(&self.service_url);
                if let Some(t) = &self.token {
                    b = b.auth_token(t.clone());
                }
                b.build()
            })
            .await
            .map_err(|e| format!("connecting to {}: {e}", self.service_url))?;
        let mut g = self.producers.lock().await;
        if let Some(p) = g.get(topic) {
            return Ok(p.clone());
        }
        if g.len() >= MAX_PRODUCERS {
            g.clear();
        }
        let p = client
            .create_producer(topic, ProducerOptions::default())
            .await
            .map_err(|e| format!("a producer of {topic}: {e}"))?;
        let p = Arc::new(p);
        g.insert(topic.to_string(), p.clone());
        Ok(p)
    }

    async fn send(&self, topic: String, msg: DeadLetter) -> Result<(), String> {
        let p = self.producer(&topic).await?;
        let out = OutgoingMessage {
            payload: msg.payload,
            key: msg.key,
            properties: msg.properties.into_iter().collect::<BTreeMap<_, _>>(),
            ..Default::default()
        };
        if let Err(e) = p.send(out).await {
            // Opened again next time.
            self.producers.lock().await.remove(&topic);
            return Err(e.to_string());
        }
        Ok(())
    }
}

/// The sink the subscriptions see.
pub struct Sink(pub Arc<ClientSink>);

impl DeadLetterSink for Sink {
    fn publish(&self, topic: String, msg: DeadLetter) -> BoxFuture<'static, Result<(), String>> {
        let me = self.0.clone();
        async move { me.send(topic, msg).await }.boxed()
    }
}

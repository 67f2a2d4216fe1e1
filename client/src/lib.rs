//! The Magnetar Rust SDK: a client, producers (with optional batching) and
//! consumers, speaking the Pulsar binary protocol.
//!
//! A service URL may name several brokers (`pulsar://h1:6650,h2:6651`).
//! Each topic is looked up (redirects followed) and served over one
//! connection per broker; producers and consumers reconnect with back-off
//! when their broker goes away or moves their topic, producers resending
//! what has no receipt yet in sequence order.
//!
//! It depends only on `magnetar-proto`, never on server crates.

pub mod backoff;
pub mod compression;
mod connection;
pub mod consumer;
mod error;
mod message;
pub mod pool;
pub mod producer;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

pub use compression::Compression;
pub use connection::Connection;
pub use consumer::{Consumer, ConsumerOptions, SubscriptionType};
pub use error::Error;
pub(crate) use message::now_ms;
pub use message::{Message, MessageId, OutgoingMessage};
pub use producer::{AccessMode, HashingScheme, Producer, ProducerOptions};

/// A client of a Magnetar (or Pulsar) cluster.
#[derive(Clone)]
pub struct Client {
    pool: Arc<pool::Pool>,
    ids: Arc<AtomicU64>,
}

impl Client {
    /// A client of the brokers named by `service_url`
    /// (`pulsar://host:port[,host:port...]`); connects to one of them to
    /// check that the service is there.
    pub async fn connect(service_url: &str) -> Result<Client, Error> {
        let pool = Arc::new(pool::Pool::new(service_url)?);
        pool.any().await?;
        Ok(Client {
            pool,
            ids: Arc::new(AtomicU64::new(1)),
        })
    }

    fn next_id(&self) -> u64 {
        self.ids.fetch_add(1, Ordering::Relaxed)
    }

    /// Opens a producer on the broker that serves `topic`.
    pub async fn create_producer(
        &self,
        topic: &str,
        options: ProducerOptions,
    ) -> Result<Producer, Error> {
        Producer::create(self.pool.clone(), topic, &self.ids, options).await
    }

    /// Subscribes to `topic` on the broker that serves it.
    pub async fn subscribe(
        &self,
        topic: &str,
        subscription: &str,
        options: ConsumerOptions,
    ) -> Result<Consumer, Error> {
        Consumer::subscribe(
            self.pool.clone(),
            topic,
            subscription,
            self.next_id(),
            options,
        )
        .await
    }

    /// The URL of the broker that serves `topic` now.
    pub async fn lookup(&self, topic: &str) -> Result<String, Error> {
        self.pool.lookup(topic).await
    }

    pub async fn close(&self) {
        self.pool.close();
    }
}

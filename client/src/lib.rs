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
mod connection;
pub mod consumer;
pub mod pool;
pub mod producer;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use magnetar_proto::pulsar::{MessageIdData, ServerError};

pub use connection::Connection;
pub use consumer::{Consumer, ConsumerOptions, SubscriptionType};
pub use producer::{AccessMode, Producer, ProducerOptions};

#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    #[error("connection: {0}")]
    Connection(String),
    #[error("broker error {code}: {message}")]
    Server { code: i32, message: String },
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("timed out")]
    Timeout,
    #[error("closed")]
    Closed,
    /// The topic was terminated and every message of it was received.
    #[error("end of topic: the topic is terminated and every message was received")]
    EndOfTopic,
}

impl Error {
    /// Whether trying again (after a lookup, with back-off) may succeed: the
    /// connection failed, or the broker is not ready for the topic yet (it
    /// is moving, or its owner's lease is being replaced).
    pub fn is_retriable(&self) -> bool {
        match self {
            Error::Connection(_) | Error::Timeout | Error::Closed => true,
            Error::Server { code, .. } => matches!(
                ServerError::try_from(*code),
                Ok(ServerError::ServiceNotReady
                    | ServerError::MetadataError
                    | ServerError::TooManyRequests)
            ),
            Error::Protocol(_) | Error::EndOfTopic => false,
        }
    }

    /// The broker's error code by name, where the broker sent one.
    pub fn server_error(&self) -> Option<ServerError> {
        match self {
            Error::Server { code, .. } => ServerError::try_from(*code).ok(),
            _ => None,
        }
    }
}

/// Where a message is stored: (ledger, entry), and its index within a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MessageId {
    pub ledger_id: u64,
    pub entry_id: u64,
    pub partition: i32,
    pub batch_index: i32,
}

impl MessageId {
    pub(crate) fn from_data(d: &MessageIdData) -> MessageId {
        MessageId {
            ledger_id: d.ledger_id,
            entry_id: d.entry_id,
            partition: d.partition.unwrap_or(-1),
            batch_index: d.batch_index.unwrap_or(-1),
        }
    }

    pub(crate) fn to_data(self) -> MessageIdData {
        MessageIdData {
            ledger_id: self.ledger_id,
            entry_id: self.entry_id,
            partition: Some(self.partition),
            batch_index: Some(self.batch_index),
            ..Default::default()
        }
    }

    pub const EARLIEST: MessageId = MessageId {
        ledger_id: u64::MAX,
        entry_id: u64::MAX,
        partition: -1,
        batch_index: -1,
    };
}

impl std::fmt::Display for MessageId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{}:{}:{}",
            self.ledger_id, self.entry_id, self.partition, self.batch_index
        )
    }
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A message to send.
#[derive(Debug, Clone, Default)]
pub struct OutgoingMessage {
    pub payload: Bytes,
    pub key: Option<String>,
    pub properties: BTreeMap<String, String>,
    /// Deliver no earlier than this (ms since the epoch) to Shared and
    /// Key_Shared subscriptions; such a message is never batched.
    pub deliver_at_ms: Option<u64>,
}

impl From<Bytes> for OutgoingMessage {
    fn from(payload: Bytes) -> Self {
        OutgoingMessage {
            payload,
            ..Default::default()
        }
    }
}

impl From<Vec<u8>> for OutgoingMessage {
    fn from(payload: Vec<u8>) -> Self {
        OutgoingMessage {
            payload: payload.into(),
            ..Default::default()
        }
    }
}

impl From<&str> for OutgoingMessage {
    fn from(s: &str) -> Self {
        OutgoingMessage {
            payload: Bytes::copy_from_slice(s.as_bytes()),
            ..Default::default()
        }
    }
}

/// A received message.
#[derive(Debug, Clone)]
pub struct Message {
    pub id: MessageId,
    pub payload: Bytes,
    pub key: Option<String>,
    pub properties: BTreeMap<String, String>,
    pub publish_time_ms: u64,
    pub redelivery_count: u32,
    pub(crate) batch_size: u32,
}

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
        Producer::create(self.pool.clone(), topic, self.next_id(), options).await
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

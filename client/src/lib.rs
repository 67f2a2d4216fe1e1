//! The Magnetar Rust SDK: producers, consumers and readers for Magnetar —
//! or any Pulsar cluster — over the Pulsar binary protocol.
//!
//! # Quick start
//!
//! ```no_run
//! use futures::StreamExt;
//! use magnetar_client::{Client, InitialPosition, OutgoingMessage, SubscriptionType};
//!
//! # async fn run() -> Result<(), magnetar_client::Error> {
//! let client = Client::builder("pulsar://127.0.0.1:6650").build().await?;
//!
//! // Send: the future resolves once the broker stored the message.
//! let producer = client.producer("orders").batched().create().await?;
//! let mut msg = OutgoingMessage::from("order 1");
//! msg.key = Some("customer-7".into());
//! let id = producer.send(msg).await?;
//! println!("stored as {id}");
//!
//! // Receive: a consumer is a Stream of messages.
//! let mut consumer = client
//!     .consumer()
//!     .topic("orders")
//!     .subscription("billing")
//!     .subscription_type(SubscriptionType::Shared)
//!     .initial_position(InitialPosition::Earliest)
//!     .subscribe()
//!     .await?;
//! while let Some(msg) = consumer.next().await {
//!     let msg = msg?;
//!     println!("{}: {}", msg.id, String::from_utf8_lossy(&msg.payload));
//!     consumer.ack(&msg)?;
//! }
//! # Ok(())
//! # }
//! ```
//!
//! More in `client/examples/`: Key_Shared workers, typed JSON, reader
//! replay, partitioned topics.
//!
//! # What it does
//!
//! - **Subscriptions**: Exclusive, Shared, Failover and Key_Shared (auto
//!   split or sticky hash ranges); individual, cumulative and negative
//!   acks (with a fixed delay or exponential back-off), ack receipts, an
//!   ack timeout, the client's own dead-letter and retry topics
//!   ([`DeadLetterPolicy`]), several topics under one subscription, or
//!   every topic matching a pattern, found as they appear
//!   ([`ConsumerBuilder::topics_pattern`]).
//! - **Readers** ([`Client::reader`]): from `EARLIEST`, `LATEST` or a
//!   message id (exclusive or inclusive, also inside a batch), seek by id
//!   or time, `has_message_available`.
//! - **Partitioned topics**: a producer per partition, keys routed with
//!   the Java client's hashing ([`HashingScheme`]) so clients of every
//!   language agree on a key's partition; consumers read every partition.
//! - **Payloads**: batching (one batch, or one per key), LZ4, ZLIB, ZSTD
//!   and Snappy compression, chunking of messages above the broker's
//!   maximum, schemas and typed JSON producers and consumers
//!   ([`JsonSchema`]).
//! - **Bounded**: pending messages per producer, a receiver queue per
//!   consumer, a memory limit across the client's producers; each a
//!   builder setting with a default.
//! - **Following topics**: a service URL may name several brokers
//!   (`pulsar://h1:6650,h2:6651`). Each topic is looked up (redirects
//!   followed) and served over one connection per broker; producers and
//!   consumers reconnect with back-off when their broker goes away or
//!   moves their topic, producers resending what has no receipt yet in
//!   sequence order.
//! - **Errors** ([`Error`]) say whether trying again may help
//!   ([`Error::is_retriable`]) and carry the broker's error kind by name
//!   ([`Error::server_error`]).
//!
//! - **Authentication**: Pulsar's token method
//!   ([`ClientBuilder::auth_token`]), or any [`auth::Authentication`].
//! - **TLS**: a `pulsar+ssl://` service URL connects with rustls, trusting
//!   a CA file ([`ClientBuilder::tls_trust_certs_file_path`]) or the
//!   system's roots and checking the broker's name:
//!
//! ```no_run
//! # async fn run() -> Result<(), magnetar_client::Error> {
//! let client = magnetar_client::Client::builder("pulsar+ssl://broker.example:6651")
//!     .tls_trust_certs_file_path("/etc/magnetar/ca.pem")
//!     .auth_token("eyJhbGciOiJIUzI1NiJ9…")
//!     .build()
//!     .await?;
//! # drop(client);
//! # Ok(())
//! # }
//! ```
//!
//! Not yet: TLS client certificates, transactions, end-to-end encryption.
//!
//! It depends only on `magnetar-proto`, never on server crates.

#![warn(missing_docs)]

pub mod auth;
pub(crate) mod backoff;
pub mod compression;
mod connection;
pub mod consumer;
mod error;
pub(crate) mod memory;
mod message;
pub(crate) mod pool;
pub mod producer;
pub mod schema;
mod tls;

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

pub use compression::Compression;
pub(crate) use connection::Connection;
pub use consumer::builder::{ConsumerBuilder, InitialPosition};
pub use consumer::reader::{Reader, ReaderBuilder};
pub use consumer::{Consumer, ConsumerOptions, DeadLetterPolicy, SubscriptionType};
pub use error::Error;
pub(crate) use message::now_ms;
pub use message::{Message, MessageId, OutgoingMessage};
pub use producer::builder::ProducerBuilder;
pub use producer::{
    AccessMode, BatchingType, HashingScheme, Producer, ProducerOptions, SendFuture,
};
pub use schema::{JsonSchema, Schema, Typed, TypedConsumer, TypedProducer};

/// Settings of a client; see [`Client::builder`].
#[must_use = "a builder does nothing until `build` is called"]
pub struct ClientBuilder {
    service_url: String,
    config: ClientConfig,
}

#[derive(Clone)]
pub(crate) struct ClientConfig {
    /// How long creating a producer or consumer keeps trying.
    pub(crate) operation_timeout_ms: u64,
    /// Payload bytes the client's producers may hold unacknowledged.
    pub(crate) memory: Option<Arc<memory::MemoryLimit>>,
    /// What connections authenticate with.
    pub(crate) auth: auth::Auth,
    /// How TLS connections (`pulsar+ssl://`) check the brokers.
    pub(crate) tls: tls::TlsOptions,
}

impl ClientBuilder {
    /// How long creating a producer, consumer or reader keeps retrying
    /// while its topic moves between brokers (default 30 s).
    pub fn operation_timeout(mut self, timeout: std::time::Duration) -> Self {
        self.config.operation_timeout_ms = timeout.as_millis().max(1) as u64;
        self
    }

    /// Payload bytes all producers of the client together may hold while
    /// they wait for receipts (default 64 MiB, as Pulsar's clients; 0: no
    /// limit); a send beyond it fails with [`Error::ProducerQueueFull`].
    pub fn memory_limit_bytes(mut self, bytes: usize) -> Self {
        self.config.memory = (bytes > 0).then(|| memory::MemoryLimit::new(bytes));
        self
    }

    /// Authenticates with a token (Pulsar's `token` method).
    pub fn auth_token(self, token: impl Into<String>) -> Self {
        self.authentication(Arc::new(auth::Token::new(token)))
    }

    /// Authenticates with any [`auth::Authentication`] method.
    pub fn authentication(mut self, auth: Arc<dyn auth::Authentication>) -> Self {
        self.config.auth = Some(auth);
        self
    }

    /// With a `pulsar+ssl://` URL: trust the CA certificates (PEM) in this
    /// file rather than the system's roots.
    pub fn tls_trust_certs_file_path(mut self, path: impl Into<std::path::PathBuf>) -> Self {
        self.config.tls.trust_certs_file = Some(path.into());
        self
    }

    /// With a `pulsar+ssl://` URL: accept any certificate (default false).
    /// The connection is encrypted but anyone may pose as the broker: for
    /// tests only.
    pub fn tls_allow_insecure_connection(mut self, allow: bool) -> Self {
        self.config.tls.allow_insecure = allow;
        self
    }

    /// With a `pulsar+ssl://` URL: check that the broker's certificate names
    /// the host the client connects to (default true; Pulsar's Java and
    /// Python clients default to false). The chain is checked either way.
    pub fn tls_validate_hostname(mut self, validate: bool) -> Self {
        self.config.tls.validate_hostname = validate;
        self
    }

    /// Connects to one of the brokers to check the service is there.
    pub async fn build(self) -> Result<Client, Error> {
        let pool = Arc::new(pool::Pool::new(
            &self.service_url,
            self.config.auth.clone(),
            &self.config.tls,
        )?);
        pool.any().await?;
        Ok(Client {
            pool,
            ids: Arc::new(AtomicU64::new(1)),
            config: Arc::new(self.config),
        })
    }
}

/// A client of a Magnetar (or Pulsar) cluster: cheap to clone, one
/// connection per broker shared by everything created from it.
#[derive(Clone)]
pub struct Client {
    pool: Arc<pool::Pool>,
    ids: Arc<AtomicU64>,
    config: Arc<ClientConfig>,
}

impl Client {
    /// A client of the brokers named by `service_url`
    /// (`pulsar://host:port[,host:port...]`, or `pulsar+ssl://…` for TLS),
    /// to configure and `build`.
    pub fn builder(service_url: impl Into<String>) -> ClientBuilder {
        ClientBuilder {
            service_url: service_url.into(),
            config: ClientConfig {
                operation_timeout_ms: 30_000,
                memory: Some(memory::MemoryLimit::new(64 * 1024 * 1024)),
                auth: None,
                tls: tls::TlsOptions::default(),
            },
        }
    }

    /// A client with the default settings; connects to one of the brokers
    /// to check that the service is there.
    pub async fn connect(service_url: &str) -> Result<Client, Error> {
        Client::builder(service_url).build().await
    }

    /// A producer of `topic`, to configure and `create`.
    pub fn producer(&self, topic: impl Into<String>) -> ProducerBuilder {
        ProducerBuilder::new(self.clone(), topic.into())
    }

    /// A consumer, to give topics and a subscription and `subscribe`.
    pub fn consumer(&self) -> ConsumerBuilder {
        ConsumerBuilder::new(self.clone())
    }

    /// A reader of `topic`, to give a start and `create`.
    pub fn reader(&self, topic: impl Into<String>) -> ReaderBuilder {
        ReaderBuilder::new(self.clone(), topic.into())
    }

    /// Opens a producer on the broker that serves `topic`.
    pub async fn create_producer(
        &self,
        topic: &str,
        options: ProducerOptions,
    ) -> Result<Producer, Error> {
        Producer::create(
            self.pool.clone(),
            topic,
            &self.ids,
            options,
            self.config.memory.clone(),
        )
        .await
    }

    /// Subscribes to `topic` on the broker that serves it.
    pub async fn subscribe(
        &self,
        topic: &str,
        subscription: &str,
        options: ConsumerOptions,
    ) -> Result<Consumer, Error> {
        Consumer::subscribe_topics(
            self,
            &[topic.to_string()],
            subscription,
            options,
            None,
            None,
        )
        .await
    }

    /// The URL of the broker that serves `topic` now.
    pub async fn lookup(&self, topic: &str) -> Result<String, Error> {
        self.pool.lookup(topic).await
    }

    /// Closes every connection of the client (producers and consumers
    /// created from it stop).
    pub async fn close(&self) {
        self.pool.close();
    }
}

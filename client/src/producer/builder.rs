//! `client.producer(topic)…create()`.

use std::time::Duration;

use super::{AccessMode, HashingScheme, Producer, ProducerOptions};
use crate::{Client, Compression, Error};

/// Settings of a producer to create; see [`Client::producer`].
#[must_use = "a builder does nothing until `create` is called"]
pub struct ProducerBuilder {
    client: Client,
    topic: String,
    options: ProducerOptions,
}

impl ProducerBuilder {
    pub(crate) fn new(client: Client, topic: String) -> ProducerBuilder {
        let options = ProducerOptions {
            operation_timeout_ms: client.config.operation_timeout_ms,
            ..Default::default()
        };
        ProducerBuilder {
            client,
            topic,
            options,
        }
    }

    /// The producer's name (unique per topic; the broker picks one if not
    /// given). A producer that reconnects under its name is deduplicated.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.options.name = Some(name.into());
        self
    }

    /// Groups messages into batches (one entry, one receipt) of up to
    /// `max_messages` / `max_bytes`, sent at the latest after `delay`.
    pub fn batching(mut self, max_messages: usize, max_bytes: usize, delay: Duration) -> Self {
        self.options.batching = true;
        self.options.batch_max_messages = max_messages.max(1);
        self.options.batch_max_bytes = max_bytes.max(1);
        self.options.batch_delay_ms = delay.as_millis().max(1) as u64;
        self
    }

    /// Batching with Pulsar's defaults: 1,000 messages, 128 KiB, 10 ms.
    pub fn batched(self) -> Self {
        let d = ProducerOptions::default();
        self.batching(
            d.batch_max_messages,
            d.batch_max_bytes,
            Duration::from_millis(d.batch_delay_ms),
        )
    }

    /// A batch per key (for Key_Shared subscriptions) instead of one of
    /// everything.
    pub fn batching_type(mut self, t: super::BatchingType) -> Self {
        self.options.batching_type = t;
        self
    }

    /// How entries (messages and batches) are compressed.
    pub fn compression(mut self, compression: Compression) -> Self {
        self.options.compression = compression;
        self
    }

    /// How keys choose partitions (Java's default: `JavaStringHash`).
    pub fn hashing_scheme(mut self, scheme: HashingScheme) -> Self {
        self.options.hashing_scheme = scheme;
        self
    }

    /// Whether other producers may write the topic too.
    pub fn access_mode(mut self, mode: AccessMode) -> Self {
        self.options.access_mode = mode;
        self
    }

    /// A message without a receipt after this long fails with `Timeout`
    /// (default 30 s).
    pub fn send_timeout(mut self, timeout: Duration) -> Self {
        self.options.send_timeout_ms = timeout.as_millis().max(1) as u64;
        self
    }

    /// At most this many messages wait for receipts (default 10,000);
    /// beyond it `send` fails with [`Error::ProducerQueueFull`].
    pub fn max_pending_messages(mut self, n: usize) -> Self {
        self.options.max_pending_messages = n.max(1);
        self
    }

    /// Splits a message larger than the broker takes into chunks, joined
    /// again by consumers (Pulsar's chunking); without it such a message
    /// fails with [`Error::MessageTooBig`].
    pub fn chunking(mut self, yes: bool) -> Self {
        self.options.chunking = yes;
        self
    }

    /// Chunks of at most this many bytes (default: the broker's maximum
    /// message size); implies chunking.
    pub fn chunk_max_size(mut self, bytes: usize) -> Self {
        self.options.chunking = true;
        self.options.chunk_max_bytes = Some(bytes.max(1));
        self
    }

    /// The schema to register with the topic.
    pub fn schema(mut self, schema: crate::Schema) -> Self {
        self.options.schema = schema;
        self
    }

    /// A producer of `T` as JSON, its schema registered with the topic.
    pub async fn create_typed<T: crate::JsonSchema>(
        self,
    ) -> Result<crate::TypedProducer<T>, Error> {
        let producer = self.schema(T::schema()).create().await?;
        Ok(crate::TypedProducer::new(producer))
    }

    /// Every setting at once.
    pub fn options(mut self, options: ProducerOptions) -> Self {
        self.options = options;
        self
    }

    /// Opens the producer (a producer per partition on a partitioned
    /// topic), retrying while the topic moves, up to the operation timeout.
    pub async fn create(self) -> Result<Producer, Error> {
        self.client.create_producer(&self.topic, self.options).await
    }
}

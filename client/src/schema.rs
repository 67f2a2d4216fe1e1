//! Schemas: what a topic's messages are, registered with the broker (which
//! checks a new producer's or consumer's schema against the topic's under
//! the namespace's compatibility strategy), and typed producers and
//! consumers of serde types encoded as JSON — Pulsar's `JSON` schema, whose
//! definition is an Avro record schema, as every Pulsar client sends it.
//!
//! ```
//! use magnetar_client::schema::{JsonSchema, Schema};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Serialize, Deserialize)]
//! struct Order {
//!     id: u64,
//!     item: String,
//! }
//!
//! impl JsonSchema for Order {
//!     fn definition() -> String {
//!         r#"{"type":"record","name":"Order","fields":[
//!             {"name":"id","type":"long"},{"name":"item","type":"string"}]}"#
//!             .into()
//!     }
//! }
//!
//! let schema = Order::schema();
//! assert!(matches!(schema, Schema::Json { .. }));
//! ```

use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use magnetar_proto::pulsar::{schema::Type as WireType, Schema as WireSchema};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::{Consumer, Error, Message, OutgoingMessage, Producer, SendFuture};

/// A topic's schema as a producer or consumer declares it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Schema {
    /// Raw bytes: no schema is registered (Pulsar's default).
    #[default]
    Bytes,
    /// UTF-8 text.
    String,
    /// JSON documents described by an Avro record definition.
    Json {
        /// The Avro record definition (JSON text).
        definition: String,
    },
    /// Avro binary described by an Avro definition (payloads are the
    /// application's to encode).
    Avro {
        /// The Avro definition (JSON text).
        definition: String,
    },
}

impl Schema {
    /// A JSON schema of this Avro record definition.
    pub fn json(definition: impl Into<String>) -> Schema {
        Schema::Json {
            definition: definition.into(),
        }
    }

    /// The schema as the protocol carries it (`None` for raw bytes).
    pub(crate) fn wire(&self, name: &str) -> Option<WireSchema> {
        let (t, data) = match self {
            Schema::Bytes => return None,
            Schema::String => (WireType::String, String::new()),
            Schema::Json { definition } => (WireType::Json, definition.clone()),
            Schema::Avro { definition } => (WireType::Avro, definition.clone()),
        };
        Some(WireSchema {
            name: name.to_string(),
            schema_data: data.into_bytes().into(),
            r#type: t as i32,
            properties: Vec::new(),
        })
    }
}

/// A serde type sent and received as Pulsar JSON.
pub trait JsonSchema: Serialize + DeserializeOwned {
    /// The Avro record definition of the type (what Java's clients derive
    /// from a class; other clients' readers check theirs against it).
    fn definition() -> String;

    /// The schema to register: JSON with [`JsonSchema::definition`].
    fn schema() -> Schema {
        Schema::json(Self::definition())
    }
}

impl Message {
    /// The payload decoded as JSON.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, Error> {
        serde_json::from_slice(&self.payload)
            .map_err(|e| Error::Schema(format!("message {}: {e}", self.id)))
    }
}

/// A producer of `T`s as JSON; see [`crate::ProducerBuilder::create_typed`].
pub struct TypedProducer<T> {
    producer: Producer,
    _t: PhantomData<fn(&T)>,
}

impl<T: Serialize> TypedProducer<T> {
    pub(crate) fn new(producer: Producer) -> TypedProducer<T> {
        TypedProducer {
            producer,
            _t: PhantomData,
        }
    }

    /// A message of `value`, to give a key or properties before sending
    /// it with [`TypedProducer::send_message`].
    pub fn message(&self, value: &T) -> Result<OutgoingMessage, Error> {
        let payload = serde_json::to_vec(value).map_err(|e| Error::Schema(e.to_string()))?;
        Ok(OutgoingMessage {
            payload: payload.into(),
            ..Default::default()
        })
    }

    /// Sends `value`; the future resolves once it is stored.
    pub fn send(&self, value: &T) -> Result<SendFuture, Error> {
        Ok(self.producer.send_async(self.message(value)?))
    }

    /// Sends a message made with [`TypedProducer::message`].
    pub fn send_message(&self, msg: OutgoingMessage) -> SendFuture {
        self.producer.send_async(msg)
    }

    /// The untyped producer underneath.
    pub fn producer(&self) -> &Producer {
        &self.producer
    }

    /// Flushes, waits for receipts and closes the producer.
    pub async fn close(self) -> Result<(), Error> {
        self.producer.close().await
    }
}

/// A received `T` with its message (id, key, properties…).
#[derive(Debug, Clone)]
pub struct Typed<T> {
    /// The decoded value.
    pub value: T,
    /// The message it came in.
    pub message: Message,
}

/// A consumer of `T`s sent as JSON; see
/// [`crate::ConsumerBuilder::subscribe_typed`]. A message that does not
/// decode is negatively acknowledged (so a dead-letter policy can take it)
/// and reported as [`Error::Schema`].
pub struct TypedConsumer<T> {
    consumer: Consumer,
    _t: PhantomData<fn() -> T>,
}

impl<T: DeserializeOwned> TypedConsumer<T> {
    pub(crate) fn new(consumer: Consumer) -> TypedConsumer<T> {
        TypedConsumer {
            consumer,
            _t: PhantomData,
        }
    }

    fn decode(&mut self, m: Message) -> Result<Typed<T>, Error> {
        match m.json::<T>() {
            Ok(value) => Ok(Typed { value, message: m }),
            Err(e) => {
                let _ = self.consumer.nack(&m);
                Err(e)
            }
        }
    }

    /// The next value, waiting as long as it takes.
    pub async fn receive(&mut self) -> Result<Typed<T>, Error> {
        let m = self.consumer.receive().await?;
        self.decode(m)
    }

    /// The next value, or `None` when none came in time.
    pub async fn receive_timeout(&mut self, timeout: Duration) -> Result<Option<Typed<T>>, Error> {
        match self.consumer.receive_timeout(timeout).await? {
            Some(m) => self.decode(m).map(Some),
            None => Ok(None),
        }
    }

    /// Acknowledges a value's message.
    pub fn ack(&mut self, t: &Typed<T>) -> Result<(), Error> {
        self.consumer.ack(&t.message)
    }

    /// Negatively acknowledges a value's message (it comes again).
    pub fn nack(&mut self, t: &Typed<T>) -> Result<(), Error> {
        self.consumer.nack(&t.message)
    }

    /// The untyped consumer underneath (seek, cumulative acks…).
    pub fn consumer(&mut self) -> &mut Consumer {
        &mut self.consumer
    }

    /// Closes the consumer on the broker.
    pub async fn close(self) -> Result<(), Error> {
        self.consumer.close().await
    }
}

impl<T: DeserializeOwned> futures::Stream for TypedConsumer<T> {
    type Item = Result<Typed<T>, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match self.consumer.poll_message(cx) {
            Poll::Ready(Some(Ok(m))) => Poll::Ready(Some(self.decode(m))),
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

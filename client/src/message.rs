//! Message ids, messages to send and messages received.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use magnetar_proto::pulsar::MessageIdData;

/// Where a message is stored: (ledger, entry), and its index within a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MessageId {
    /// The ledger holding the entry.
    pub ledger_id: u64,
    /// The entry within the ledger.
    pub entry_id: u64,
    /// The partition of a partitioned topic (-1: not partitioned).
    pub partition: i32,
    /// The message's index within its batch (-1: not batched).
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

    /// Before the first message of a topic.
    pub const EARLIEST: MessageId = MessageId {
        ledger_id: u64::MAX,
        entry_id: u64::MAX,
        partition: -1,
        batch_index: -1,
    };

    /// After the last message of a topic (Pulsar's `(Long.MAX, Long.MAX)`).
    pub const LATEST: MessageId = MessageId {
        ledger_id: i64::MAX as u64,
        entry_id: i64::MAX as u64,
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
///
/// ```
/// use magnetar_client::OutgoingMessage;
///
/// let mut msg = OutgoingMessage::from("payload");
/// msg.key = Some("customer-7".into());
/// msg.properties.insert("source".into(), "web".into());
/// // Delayed delivery (Shared and Key_Shared subscriptions):
/// msg.deliver_at_ms = Some(1_900_000_000_000);
/// ```
#[derive(Debug, Clone, Default)]
pub struct OutgoingMessage {
    /// The payload.
    pub payload: Bytes,
    /// The key: routes the message to a partition and, on Key_Shared, to a consumer.
    pub key: Option<String>,
    /// Properties the application reads back.
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

impl From<String> for OutgoingMessage {
    fn from(s: String) -> Self {
        OutgoingMessage {
            payload: s.into_bytes().into(),
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
    /// Where the message is stored.
    pub id: MessageId,
    /// The payload, decompressed and joined from its chunks.
    pub payload: Bytes,
    /// The message's key (partition key).
    pub key: Option<String>,
    /// The application's properties.
    pub properties: BTreeMap<String, String>,
    /// When the producer sent it (ms since the epoch).
    pub publish_time_ms: u64,
    /// How often it was delivered before (nacks, ack timeouts, consumers leaving).
    pub redelivery_count: u32,
    /// The topic (partition) the message was read from.
    pub topic: std::sync::Arc<str>,
    pub(crate) batch_size: u32,
    /// Which of its consumer's topics or partitions it came from.
    pub(crate) part: usize,
    /// A chunked message's chunks (the last is `id`); empty otherwise.
    pub(crate) chunk_ids: Vec<MessageId>,
}

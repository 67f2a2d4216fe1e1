//! Message ids, messages to send and messages received.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use magnetar_proto::pulsar::MessageIdData;

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
    pub id: MessageId,
    pub payload: Bytes,
    pub key: Option<String>,
    pub properties: BTreeMap<String, String>,
    pub publish_time_ms: u64,
    pub redelivery_count: u32,
    /// The topic (partition) the message was read from.
    pub topic: std::sync::Arc<str>,
    pub(crate) batch_size: u32,
    /// Which of its consumer's topics or partitions it came from.
    pub(crate) part: usize,
    /// A chunked message's chunks (the last is `id`); empty otherwise.
    pub(crate) chunk_ids: Vec<MessageId>,
}

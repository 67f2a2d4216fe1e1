//! Readers: a topic read from a chosen message on, with nothing stored on
//! the broker about how far (a non-durable subscription). A reader starts
//! *after* its start message (Pulsar's default) or at it
//! (`start_message_id_inclusive`).

use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use super::{Consumer, ConsumerOptions, SubscriptionType};
use crate::{Client, Error, Message, MessageId};

/// Settings of a reader to create; see [`Client::reader`].
#[must_use = "a builder does nothing until `create` is called"]
pub struct ReaderBuilder {
    client: Client,
    topic: String,
    start: MessageId,
    inclusive: bool,
    options: ConsumerOptions,
}

impl ReaderBuilder {
    pub(crate) fn new(client: Client, topic: String) -> ReaderBuilder {
        let options = ConsumerOptions {
            operation_timeout_ms: client.config.operation_timeout_ms,
            ..Default::default()
        };
        ReaderBuilder {
            client,
            topic,
            start: MessageId::LATEST,
            inclusive: false,
            options,
        }
    }

    /// Where to start: [`MessageId::EARLIEST`], [`MessageId::LATEST`] (the
    /// default) or the id of a message (of a topic that is not
    /// partitioned).
    pub fn start_message_id(mut self, id: MessageId) -> Self {
        self.start = id;
        self
    }

    /// Read the start message itself too.
    pub fn start_message_id_inclusive(mut self, yes: bool) -> Self {
        self.inclusive = yes;
        self
    }

    /// Read the compacted view (the latest message per key) first.
    pub fn read_compacted(mut self, yes: bool) -> Self {
        self.options.read_compacted = yes;
        self
    }

    /// Messages fetched ahead of the application.
    pub fn receiver_queue_size(mut self, n: u32) -> Self {
        self.options.receiver_queue = n.max(2);
        self
    }

    /// Creates the reader on the broker serving the topic.
    pub async fn create(self) -> Result<Reader, Error> {
        let subscription = format!(
            "reader-{:x}",
            crate::now_ms() ^ self.client.ids.fetch_add(1, Ordering::Relaxed) << 40
        );
        let mut options = self.options;
        options.sub_type = SubscriptionType::Exclusive;
        let specific = self.start != MessageId::EARLIEST && self.start != MessageId::LATEST;
        let consumer = Consumer::subscribe_topics(
            &self.client,
            std::slice::from_ref(&self.topic),
            &subscription,
            options,
            Some((self.start, self.inclusive)),
            None,
        )
        .await?;
        if specific && consumer.parts.len() > 1 {
            let _ = consumer.close().await;
            return Err(Error::Config(
                "a reader of a partitioned topic starts at EARLIEST or LATEST".into(),
            ));
        }
        Ok(Reader {
            consumer,
            sought_by_time: false,
        })
    }
}

/// Reads a topic from a message on; a [`futures::Stream`] of messages that
/// ends once a terminated topic is read to its end.
pub struct Reader {
    consumer: Consumer,
    /// Moved by publish time and nothing read since: where it stands is
    /// not known as an id yet.
    sought_by_time: bool,
}

/// Whether `m` comes before where a reader starts (`start`, itself
/// included or not).
pub(crate) fn before_start(m: &MessageId, start: &MessageId, inclusive: bool) -> bool {
    if (m.ledger_id, m.entry_id) != (start.ledger_id, start.entry_id) {
        return (m.ledger_id, m.entry_id) < (start.ledger_id, start.entry_id);
    }
    if start.batch_index < 0 {
        return !inclusive;
    }
    if inclusive {
        m.batch_index < start.batch_index
    } else {
        m.batch_index <= start.batch_index
    }
}

impl Reader {
    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Message, Error>>> {
        let polled = self.consumer.poll_message(cx);
        if let Poll::Ready(Some(Ok(_))) = &polled {
            self.sought_by_time = false;
        }
        polled
    }

    /// The next message; `Error::EndOfTopic` once a terminated topic is
    /// read to its end.
    pub async fn next_message(&mut self) -> Result<Message, Error> {
        std::future::poll_fn(|cx| self.poll_read(cx))
            .await
            .unwrap_or(Err(Error::EndOfTopic))
    }

    /// `next_message` with a timeout; `Ok(None)` when nothing came in time.
    pub async fn next_timeout(&mut self, timeout: Duration) -> Result<Option<Message>, Error> {
        match tokio::time::timeout(timeout, self.next_message()).await {
            Ok(r) => r.map(Some),
            Err(_) => Ok(None),
        }
    }

    /// Whether a message after the last one read is stored now (asks the
    /// broker for the topic's last message id unless one is buffered).
    pub async fn has_message_available(&mut self) -> Result<bool, Error> {
        if !self.consumer.queue.is_empty() {
            return Ok(true);
        }
        let lasts = self.consumer.last_message_ids().await?;
        for (part, last) in lasts.into_iter().enumerate() {
            if last.entry_id == u64::MAX {
                continue; // empty
            }
            // Where this partition's reader stands: the message it read
            // last (exclusive), or where it was started or sought.
            let (at, inclusive) = match self.consumer.resume_of(part) {
                _ if self.sought_by_time => return Ok(true),
                Some(r) => r,
                None => continue,
            };
            // (ledger, entry, batch index); a whole entry counts as its
            // last message.
            let key = |id: &MessageId| (id.ledger_id, id.entry_id, id.batch_index);
            let beyond = if at == MessageId::EARLIEST {
                true
            } else if at == MessageId::LATEST {
                false
            } else {
                key(&last) > key(&at) || (key(&last) == key(&at) && inclusive)
            };
            if beyond {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Whether the topic is terminated and every message was read.
    pub fn has_reached_end_of_topic(&self) -> bool {
        self.consumer.has_reached_end_of_topic()
    }

    /// Reads from `id` on (that message next).
    pub async fn seek(&mut self, id: MessageId) -> Result<(), Error> {
        self.consumer.seek(id).await?;
        self.sought_by_time = false;
        Ok(())
    }

    /// Reads from the first message published at or after `publish_time_ms`.
    pub async fn seek_time(&mut self, publish_time_ms: u64) -> Result<(), Error> {
        self.consumer.seek_time(publish_time_ms).await?;
        self.sought_by_time = true;
        Ok(())
    }

    /// The topic read.
    pub fn topic(&self) -> &str {
        self.consumer.topic()
    }

    /// Closes the reader (nothing of it stays on the broker).
    pub async fn close(self) -> Result<(), Error> {
        self.consumer.close().await
    }
}

impl futures::Stream for Reader {
    type Item = Result<Message, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.poll_read(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(l: u64, e: u64, b: i32) -> MessageId {
        MessageId {
            ledger_id: l,
            entry_id: e,
            partition: -1,
            batch_index: b,
        }
    }

    #[test]
    fn what_precedes_the_start_is_skipped() {
        let s = id(3, 5, -1);
        assert!(before_start(&id(3, 4, -1), &s, true));
        assert!(before_start(&id(3, 5, -1), &s, false));
        assert!(!before_start(&id(3, 5, -1), &s, true));
        assert!(!before_start(&id(3, 6, -1), &s, false));
        let b = id(3, 5, 2);
        assert!(before_start(&id(3, 5, 1), &b, true));
        assert!(!before_start(&id(3, 5, 2), &b, true));
        assert!(before_start(&id(3, 5, 2), &b, false));
        assert!(!before_start(&id(3, 5, 3), &b, false));
    }
}

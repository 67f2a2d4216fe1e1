//! The client's own dead-letter and retry topics (Pulsar's
//! `DeadLetterPolicy`): a message delivered `max_redeliver_count + 1` times
//! without being acknowledged is published to the dead-letter topic and
//! acknowledged instead of being delivered again; `reconsume_later` moves a
//! message to the retry topic, to come back after a delay, until it has
//! been retried `max_redeliver_count` times.
//!
//! Messages keep their key and properties and gain Pulsar's `REAL_TOPIC`
//! and `ORIGIN_MESSAGE_ID` (and `RECONSUMETIMES` on the retry topic), so
//! every Pulsar client reads them the same way. The broker's own
//! dead-letter policy (a topic policy) works with no client support at all;
//! this is for applications that configure it in the client, as with
//! Java's and Python's.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::mpsc;

use super::lock;
use super::redelivery::Redelivery;
use crate::{now_ms, Client, Message, OutgoingMessage, Producer, SubscriptionType};

pub const REAL_TOPIC: &str = "REAL_TOPIC";
pub const ORIGIN_MESSAGE_ID: &str = "ORIGIN_MESSAGE_ID";
pub const RECONSUME_TIMES: &str = "RECONSUMETIMES";

/// Where messages that keep failing go.
///
/// ```no_run
/// # async fn run(client: magnetar_client::Client) -> Result<(), magnetar_client::Error> {
/// use std::time::Duration;
/// use magnetar_client::{DeadLetterPolicy, SubscriptionType};
///
/// let mut policy = DeadLetterPolicy::new(3);
/// policy.retry_enabled = true;
/// let mut consumer = client
///     .consumer()
///     .topic("payments")
///     .subscription("settle")
///     .subscription_type(SubscriptionType::Shared)
///     .dead_letter_policy(policy)
///     .subscribe()
///     .await?;
/// let msg = consumer.receive().await?;
/// // Not now: again in a minute, through the retry topic.
/// consumer.reconsume_later(&msg, Duration::from_secs(60)).await?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct DeadLetterPolicy {
    /// Deliveries after the first before a message is dead-lettered
    /// (and retries through the retry topic).
    pub max_redeliver_count: u32,
    /// Default: `<topic>-<subscription>-DLQ`.
    pub dead_letter_topic: Option<String>,
    /// Default: `<topic>-<subscription>-RETRY`; used by `reconsume_later`
    /// once `retry_enabled` is set.
    pub retry_letter_topic: Option<String>,
    /// Subscribe to the retry topic too and allow `reconsume_later`
    /// (needs a Shared or Key_Shared subscription: the retry topic delays
    /// messages).
    pub retry_enabled: bool,
}

impl DeadLetterPolicy {
    /// Dead-lettering after `max_redeliver_count` redeliveries, to the
    /// default topics.
    pub fn new(max_redeliver_count: u32) -> DeadLetterPolicy {
        DeadLetterPolicy {
            max_redeliver_count,
            dead_letter_topic: None,
            retry_letter_topic: None,
            retry_enabled: false,
        }
    }

    pub(crate) fn dlq_topic(&self, topic: &str, subscription: &str) -> String {
        self.dead_letter_topic
            .clone()
            .unwrap_or_else(|| format!("{topic}-{subscription}-DLQ"))
    }

    pub(crate) fn retry_topic(&self, topic: &str, subscription: &str) -> String {
        self.retry_letter_topic
            .clone()
            .unwrap_or_else(|| format!("{topic}-{subscription}-RETRY"))
    }

    pub(crate) fn check(&self, sub_type: SubscriptionType) -> Result<(), crate::Error> {
        if self.retry_enabled
            && !matches!(
                sub_type,
                SubscriptionType::Shared | SubscriptionType::KeyShared
            )
        {
            return Err(crate::Error::Config(
                "retry topics need a Shared or Key_Shared subscription".into(),
            ));
        }
        Ok(())
    }
}

/// A message on its way to the dead-letter topic.
pub(crate) struct Job {
    pub message: Message,
    /// Acknowledge its entry once stored (the last open message of it).
    pub ack_entry: bool,
}

/// The message as it goes to a dead-letter or retry topic.
pub(crate) fn forwarded(m: &Message, real_topic: &str) -> OutgoingMessage {
    let mut properties = m.properties.clone();
    properties
        .entry(REAL_TOPIC.into())
        .or_insert_with(|| real_topic.to_string());
    properties
        .entry(ORIGIN_MESSAGE_ID.into())
        .or_insert_with(|| m.id.to_string());
    OutgoingMessage {
        payload: m.payload.clone(),
        key: m.key.clone(),
        properties,
        deliver_at_ms: None,
    }
}

/// The task that publishes dead letters, then acknowledges them; a letter
/// that cannot be stored is asked to be redelivered instead (never lost).
pub(crate) async fn forward(
    client: Client,
    topic: String,
    parts: super::Parts,
    redelivery: Arc<Mutex<Redelivery>>,
    mut jobs: mpsc::UnboundedReceiver<Job>,
) {
    let mut producer: Option<Producer> = None;
    while let Some(job) = jobs.recv().await {
        let m = &job.message;
        let part = m.part;
        if producer.is_none() {
            match client.producer(&topic).chunking(true).create().await {
                Ok(p) => producer = Some(p),
                Err(e) => {
                    tracing::warn!(topic, error = %e, "cannot open the dead-letter topic; redelivering");
                    lock(&redelivery).nacked((part, m.id.ledger_id, m.id.entry_id), Instant::now());
                    continue;
                }
            }
        }
        let Some(p) = &producer else { continue };
        let inner = lock(&parts).get(part).cloned();
        let real = inner.as_ref().map(|i| i.topic.clone()).unwrap_or_default();
        match p.send(forwarded(m, &real)).await {
            Ok(id) => {
                tracing::info!(message = %m.id, dead_letter = %id, topic, "moved to the dead-letter topic");
                if job.ack_entry {
                    if let Some(inner) = &inner {
                        // A chunked message's chunks, the last one (`id`) too.
                        for c in m.chunk_ids.iter().filter(|c| **c != m.id) {
                            let _ = inner.send(&super::ack_cmd(inner.consumer_id, *c));
                        }
                        let _ = inner.send(&super::ack_cmd(inner.consumer_id, m.id));
                    }
                }
            }
            Err(e) => {
                tracing::warn!(message = %m.id, error = %e, "dead letter not stored; redelivering");
                lock(&redelivery).nacked((part, m.id.ledger_id, m.id.entry_id), Instant::now());
            }
        }
    }
}

/// A message to the retry topic: due after `delay_ms`, its retries counted.
pub(crate) fn retry_message(
    m: &Message,
    real_topic: &str,
    times: u32,
    delay_ms: u64,
) -> OutgoingMessage {
    let mut out = forwarded(m, real_topic);
    out.properties
        .insert(RECONSUME_TIMES.into(), times.to_string());
    out.deliver_at_ms = Some(now_ms() + delay_ms);
    out
}

/// How often a message already went through the retry topic.
pub(crate) fn reconsume_times(m: &Message) -> u32 {
    m.properties
        .get(RECONSUME_TIMES)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

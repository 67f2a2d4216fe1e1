//! `client.consumer().topic(t).subscription(s)…subscribe()`.

use std::time::Duration;

use super::{Consumer, ConsumerOptions, SubscriptionType};
use crate::{Client, Error};

/// A pattern as Pulsar's clients take it: a full-name regex whose tenant
/// and namespace are literal, or a short one in `public/default`.
fn parse_pattern(p: &str, period: Duration) -> Result<super::Pattern, Error> {
    let full = if p.contains("://") {
        p.to_string()
    } else if p.contains('/') {
        return Err(Error::Config(format!(
            "topic pattern {p:?}: give persistent://tenant/namespace/<regex> or a short <regex>"
        )));
    } else {
        format!("persistent://public/default/{p}")
    };
    let rest = full
        .strip_prefix("persistent://")
        .ok_or_else(|| Error::Config(format!("topic pattern {p:?}: only persistent topics")))?;
    let mut it = rest.splitn(3, '/');
    let (Some(tenant), Some(ns), Some(_)) = (it.next(), it.next(), it.next()) else {
        return Err(Error::Config(format!(
            "topic pattern {p:?}: persistent://tenant/namespace/<regex>"
        )));
    };
    let regex =
        regex::Regex::new(&full).map_err(|e| Error::Config(format!("topic pattern {p:?}: {e}")))?;
    Ok(super::Pattern {
        regex,
        namespace: format!("{tenant}/{ns}"),
        period,
    })
}

/// Where a new subscription starts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum InitialPosition {
    /// At the next message published (Pulsar's default).
    #[default]
    Latest,
    /// At the first message the topic still has.
    Earliest,
}

/// Settings of a consumer to subscribe; see [`Client::consumer`].
#[must_use = "a builder does nothing until `subscribe` is called"]
pub struct ConsumerBuilder {
    client: Client,
    topics: Vec<String>,
    subscription: Option<String>,
    options: ConsumerOptions,
    pattern: Option<String>,
    pattern_period: Duration,
}

impl ConsumerBuilder {
    pub(crate) fn new(client: Client) -> ConsumerBuilder {
        let options = ConsumerOptions {
            operation_timeout_ms: client.config.operation_timeout_ms,
            ..Default::default()
        };
        ConsumerBuilder {
            client,
            topics: Vec::new(),
            subscription: None,
            options,
            pattern: None,
            pattern_period: Duration::from_secs(60),
        }
    }

    /// A topic to read (partitioned or not); may be given more than once.
    pub fn topic(mut self, topic: impl Into<String>) -> Self {
        self.topics.push(topic.into());
        self
    }

    /// Several topics under one subscription.
    pub fn topics<I, T>(mut self, topics: I) -> Self
    where
        I: IntoIterator<Item = T>,
        T: Into<String>,
    {
        self.topics.extend(topics.into_iter().map(Into::into));
        self
    }

    /// Every topic of a namespace whose full name matches `regex` (e.g.
    /// `persistent://public/default/orders-.*`, or `orders-.*` in
    /// `public/default`), now and as topics appear (see
    /// [`ConsumerBuilder::pattern_auto_discovery_period`]).
    pub fn topics_pattern(mut self, regex: impl Into<String>) -> Self {
        self.pattern = Some(regex.into());
        self
    }

    /// How often a pattern consumer looks for new topics (default 60 s).
    pub fn pattern_auto_discovery_period(mut self, period: Duration) -> Self {
        self.pattern_period = period;
        self
    }

    /// The subscription's name (required).
    pub fn subscription(mut self, name: impl Into<String>) -> Self {
        self.subscription = Some(name.into());
        self
    }

    /// How the subscription shares messages among its consumers (default
    /// Exclusive).
    pub fn subscription_type(mut self, t: SubscriptionType) -> Self {
        self.options.sub_type = t;
        self
    }

    /// Where a subscription that does not exist yet starts.
    pub fn initial_position(mut self, p: InitialPosition) -> Self {
        self.options.earliest = p == InitialPosition::Earliest;
        self
    }

    /// The consumer's name (Failover picks the active consumer by it).
    pub fn consumer_name(mut self, name: impl Into<String>) -> Self {
        self.options.consumer_name = Some(name.into());
        self
    }

    /// Lower levels are served first (Failover: the active consumer).
    pub fn priority_level(mut self, level: i32) -> Self {
        self.options.priority_level = level;
        self
    }

    /// Messages fetched ahead of the application (default 1,000), per
    /// topic or partition.
    pub fn receiver_queue_size(mut self, n: u32) -> Self {
        self.options.receiver_queue = n.max(2);
        self
    }

    /// Key_Shared in sticky mode: exactly these hash slot ranges
    /// (inclusive, within `0..65536`).
    pub fn sticky_key_ranges(mut self, ranges: Vec<(u16, u16)>) -> Self {
        self.options.sticky_ranges = Some(ranges);
        self
    }

    /// Read the compacted view (the latest message per key) first.
    pub fn read_compacted(mut self, yes: bool) -> Self {
        self.options.read_compacted = yes;
        self
    }

    /// How long after `nack` a message comes again (default one minute).
    pub fn nack_redelivery_delay(mut self, delay: Duration) -> Self {
        self.options.nack_redelivery_delay_ms = delay.as_millis() as u64;
        self
    }

    /// Nacked messages come again after `min * 2^redeliveries`, at most
    /// `max` (instead of the fixed nack delay).
    pub fn nack_backoff(mut self, min: Duration, max: Duration) -> Self {
        self.options.nack_backoff = Some((min.as_millis() as u64, max.as_millis() as u64));
        self
    }

    /// Messages received and not acknowledged this long come again
    /// (default: never).
    pub fn ack_timeout(mut self, timeout: Duration) -> Self {
        self.options.ack_timeout_ms = timeout.as_millis() as u64;
        self
    }

    /// The client's own dead-letter (and retry) topics.
    pub fn dead_letter_policy(mut self, policy: super::DeadLetterPolicy) -> Self {
        self.options.dead_letter = Some(policy);
        self
    }

    /// The schema to read with (checked against the topic's).
    pub fn schema(mut self, schema: crate::Schema) -> Self {
        self.options.schema = schema;
        self
    }

    /// A consumer of `T` sent as JSON, its schema checked against the
    /// topic's.
    pub async fn subscribe_typed<T: crate::JsonSchema>(
        mut self,
    ) -> Result<crate::TypedConsumer<T>, Error> {
        self.options.schema = T::schema();
        Ok(crate::TypedConsumer::new(self.subscribe().await?))
    }

    /// Every setting at once.
    pub fn options(mut self, options: ConsumerOptions) -> Self {
        self.options = options;
        self
    }

    /// Subscribes on the brokers serving the topics (each partition of a
    /// partitioned one), retrying while they move, up to the operation
    /// timeout.
    pub async fn subscribe(self) -> Result<Consumer, Error> {
        let subscription = self
            .subscription
            .ok_or_else(|| Error::Config("a consumer needs a subscription name".into()))?;
        let pattern = match &self.pattern {
            Some(p) => Some(parse_pattern(p, self.pattern_period)?),
            None => None,
        };
        let mut topics = self.topics;
        if let Some(p) = &pattern {
            for t in p.matching(&self.client.pool).await? {
                if !topics.contains(&t) {
                    topics.push(t);
                }
            }
        }
        Consumer::subscribe_topics(
            &self.client,
            &topics,
            &subscription,
            self.options,
            None,
            pattern,
        )
        .await
    }
}

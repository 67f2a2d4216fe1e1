//! A consumer that follows its topic: a task subscribes on the broker that
//! serves the topic and passes its messages on; when the connection ends or
//! the broker closes the consumer, it subscribes again (back-off, or at
//! once where the broker named the new owner). Messages received and not
//! yet taken by the application are dropped then: the broker redelivers
//! everything unacknowledged to the new subscription.

pub(crate) mod builder;
pub(crate) mod chunks;
pub(crate) mod dlq;
pub(crate) mod reader;
pub(crate) mod redelivery;
pub(crate) mod state;

use std::collections::{BTreeMap, VecDeque};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use magnetar_proto::frame::{base, decode_batch};
use magnetar_proto::pulsar::{
    base_command::Type, command_ack::AckType, command_subscribe::InitialPosition as WireInitial,
    BaseCommand, CommandAck, CommandCloseConsumer, CommandFlow, CommandGetLastMessageId,
    CommandRedeliverUnacknowledgedMessages, CommandSeek, CommandSubscribe, IntRange, KeySharedMeta,
    KeySharedMode, MessageIdData,
};
use magnetar_proto::Payload;
use tokio::sync::mpsc;

use crate::backoff::Backoff;
use crate::compression::Compression;
use crate::pool::Pool;
use crate::{Client, Connection, Error, Message, MessageId, Producer};
pub use dlq::DeadLetterPolicy;
use redelivery::Redelivery;
use state::ConsumerState;

/// How a subscription shares its messages among its consumers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubscriptionType {
    /// One consumer; a second one is refused (`ConsumerBusy`).
    Exclusive = 0,
    /// Messages spread round robin over the consumers.
    Shared = 1,
    /// One active consumer (the first by priority level, then name — per
    /// partition, spread over the consumers); the others stand by and take
    /// over, with what it left unacknowledged, when it goes.
    Failover = 2,
    /// Every message of a key goes to the same consumer, in order; keys
    /// spread over the consumers (see `ConsumerOptions::sticky_ranges`).
    KeyShared = 3,
}

/// Every setting of a consumer (the builder sets them one by one).
#[derive(Debug, Clone)]
pub struct ConsumerOptions {
    /// How the subscription shares messages among its consumers.
    pub sub_type: SubscriptionType,
    /// Start a new subscription at the earliest message (default: latest).
    pub earliest: bool,
    /// Messages fetched ahead of the application, per topic or partition.
    pub receiver_queue: u32,
    /// How long `subscribe` keeps retrying while the topic is moving.
    pub operation_timeout_ms: u64,
    /// The consumer's name (Failover picks the active consumer by it);
    /// the broker's choice when `None`.
    pub consumer_name: Option<String>,
    /// Lower levels are served first (Failover: the active consumer is of
    /// the lowest level there is).
    pub priority_level: i32,
    /// Key_Shared: the hash slot ranges (inclusive, within `0..65536`) this
    /// consumer takes (sticky mode); `None` lets the broker split ranges as
    /// consumers come and go.
    pub sticky_ranges: Option<Vec<(u16, u16)>>,
    /// Read the topic's compacted view (the latest message per key) up to
    /// its last compaction, then the rest (Exclusive and Failover).
    pub read_compacted: bool,
    /// How long after `nack` the broker is asked to send a message again
    /// (Pulsar's default: one minute).
    pub nack_redelivery_delay_ms: u64,
    /// A message received and not acknowledged this long is sent again;
    /// 0 (the default) turns the ack timeout off.
    pub ack_timeout_ms: u64,
    /// Nack redelivery back-off (Pulsar's `MultiplierRedeliveryBackoff`):
    /// `(min_ms, max_ms)` — a message nacked after `n` redeliveries comes
    /// again after `min(min_ms * 2^n, max_ms)`, instead of the fixed delay.
    pub nack_backoff: Option<(u64, u64)>,
    /// The client's own dead-letter (and retry) topics.
    pub dead_letter: Option<DeadLetterPolicy>,
    /// The schema the consumer reads with (checked against the topic's).
    pub schema: crate::Schema,
    /// Chunked messages joined at once, per topic or partition (the
    /// oldest is asked for again beyond it).
    pub max_pending_chunked_messages: usize,
    /// A chunked message still incomplete after this long is asked for
    /// again.
    pub expire_incomplete_chunked_ms: u64,
}

impl Default for ConsumerOptions {
    fn default() -> Self {
        ConsumerOptions {
            sub_type: SubscriptionType::Exclusive,
            earliest: false,
            receiver_queue: 1000,
            operation_timeout_ms: 30_000,
            consumer_name: None,
            priority_level: 0,
            sticky_ranges: None,
            read_compacted: false,
            nack_redelivery_delay_ms: 60_000,
            ack_timeout_ms: 0,
            nack_backoff: None,
            dead_letter: None,
            schema: crate::Schema::Bytes,
            max_pending_chunked_messages: 10,
            expire_incomplete_chunked_ms: 60_000,
        }
    }
}

type Route = mpsc::UnboundedReceiver<(BaseCommand, Option<Payload>)>;
type Events = mpsc::UnboundedSender<(usize, Event)>;

/// What a part's task passes to the consumer (tagged with the part).
enum Event {
    Message(Box<(BaseCommand, Option<Payload>)>),
    /// Subscribed again: what was received before comes again.
    Subscribed,
    /// A pattern consumer took on a new topic (its messages follow).
    Added(Arc<Inner>),
}

pub(crate) struct Inner {
    pool: Arc<Pool>,
    /// Which of the consumer's topics (or partitions) this is.
    part: usize,
    topic: String,
    /// The topic's name as messages carry it.
    topic_name: Arc<str>,
    /// The partition index on a partitioned topic.
    partition: Option<i32>,
    /// A reader's place: (message, whether it is still to be read). It
    /// subscribes again from there, never from its first start.
    resume: Option<Mutex<(MessageId, bool)>>,
    subscription: String,
    consumer_id: u64,
    options: ConsumerOptions,
    conn: Mutex<Option<Arc<Connection>>>,
}

impl Inner {
    fn conn(&self) -> Option<Arc<Connection>> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set_conn(&self, c: Option<Arc<Connection>>) {
        *self.conn.lock().unwrap_or_else(|e| e.into_inner()) = c;
    }

    fn send(&self, cmd: &BaseCommand) -> Result<(), Error> {
        match self.conn() {
            Some(c) => c.send(cmd),
            // Acks and permits while disconnected are moot: the broker
            // redelivers what is unacknowledged and permits start afresh.
            None => Ok(()),
        }
    }

    async fn request(&self, cmd: BaseCommand) -> Result<BaseCommand, Error> {
        match self.conn() {
            Some(c) => c.request(cmd).await,
            None => Err(Error::Connection("consumer is reconnecting".into())),
        }
    }

    async fn subscribe(&self, hint: Option<&str>) -> Result<(Arc<Connection>, Route), Error> {
        let conn = self.pool.for_topic(&self.topic, hint).await?;
        let route = conn.register_consumer(self.consumer_id);
        let mut cmd = base(Type::Subscribe);
        cmd.subscribe = Some(CommandSubscribe {
            topic: self.topic.clone(),
            subscription: self.subscription.clone(),
            sub_type: self.options.sub_type as i32,
            consumer_id: self.consumer_id,
            request_id: 0,
            consumer_name: self.options.consumer_name.clone(),
            priority_level: Some(self.options.priority_level),
            read_compacted: Some(self.options.read_compacted),
            durable: self.resume.as_ref().map(|_| false),
            schema: self.options.schema.wire(&self.topic),
            start_message_id: self.resume.as_ref().map(|r| {
                let (id, inclusive) = *lock(r);
                let mut d = id.to_data();
                d.partition = None;
                let specific = id != MessageId::EARLIEST && id != MessageId::LATEST;
                if specific && (inclusive || id.batch_index >= 0) {
                    // The whole entry comes; what precedes is skipped.
                    d.batch_index = Some(id.batch_index.max(0));
                } else {
                    d.batch_index = None;
                }
                d
            }),
            key_shared_meta: (self.options.sub_type == SubscriptionType::KeyShared).then(|| {
                let ranges = self.options.sticky_ranges.clone().unwrap_or_default();
                KeySharedMeta {
                    key_shared_mode: if self.options.sticky_ranges.is_some() {
                        KeySharedMode::Sticky
                    } else {
                        KeySharedMode::AutoSplit
                    } as i32,
                    hash_ranges: ranges
                        .into_iter()
                        .map(|(start, end)| IntRange {
                            start: start as i32,
                            end: end as i32,
                        })
                        .collect(),
                    allow_out_of_order_delivery: None,
                }
            }),
            initial_position: Some(if self.options.earliest {
                WireInitial::Earliest
            } else {
                WireInitial::Latest
            } as i32),
            ..Default::default()
        });
        if let Err(e) = conn.request(cmd).await {
            conn.unregister_consumer(self.consumer_id);
            return Err(e);
        }
        Ok((conn, route))
    }

    /// Subscribes, retrying retriable failures (until `deadline`, if any),
    /// then tells the application and grants a full queue of permits.
    async fn subscribe_until(
        &self,
        hint: Option<String>,
        deadline: Option<tokio::time::Instant>,
        backoff: &mut Backoff,
        events: &Events,
    ) -> Result<Route, Error> {
        let mut hint = hint;
        loop {
            match self.subscribe(hint.take().as_deref()).await {
                Ok((conn, route)) => {
                    backoff.reset();
                    let _ = events.send((self.part, Event::Subscribed));
                    self.set_conn(Some(conn.clone()));
                    let mut flow = base(Type::Flow);
                    flow.flow = Some(CommandFlow {
                        consumer_id: self.consumer_id,
                        message_permits: self.options.receiver_queue.max(2),
                    });
                    conn.send(&flow)?;
                    return Ok(route);
                }
                Err(e) if e.is_retriable() => {
                    let delay = backoff.next_delay();
                    if deadline.is_some_and(|d| tokio::time::Instant::now() + delay > d) {
                        return Err(e);
                    }
                    tracing::debug!(topic = %self.topic, error = %e, ?delay, "not subscribed yet; retrying");
                    tokio::time::sleep(delay).await;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// The consumer's task: pass messages on while subscribed, subscribe again
/// when the route ends.
async fn run(inner: Arc<Inner>, mut route: Route, events: Events) {
    let mut backoff = Backoff::default();
    loop {
        let hint = loop {
            match route.recv().await {
                None => break None,
                Some((c, _)) if c.close_consumer.is_some() => {
                    break c.close_consumer.and_then(|c| {
                        inner.pool.pick(
                            c.assigned_broker_service_url,
                            c.assigned_broker_service_url_tls,
                        )
                    });
                }
                Some((c, p)) => {
                    if events
                        .send((inner.part, Event::Message(Box::new((c, p)))))
                        .is_err()
                    {
                        return;
                    }
                }
            }
        };
        inner.set_conn(None);
        tracing::debug!(topic = %inner.topic, assigned = ?hint, "consumer disconnected; subscribing again");
        if hint.is_none() {
            tokio::time::sleep(backoff.next_delay()).await;
        }
        match inner
            .subscribe_until(hint, None, &mut backoff, &events)
            .await
        {
            Ok(r) => route = r,
            Err(e) => {
                tracing::warn!(topic = %inner.topic, error = %e, "consumer cannot subscribe again");
                return;
            }
        }
    }
}

/// The consumer's parts as its background tasks see them (a pattern
/// consumer adds parts as topics appear).
pub(crate) type Parts = Arc<Mutex<Vec<Arc<Inner>>>>;

/// A pattern subscription: which topics of which namespace, looked for
/// again every `period`.
#[derive(Debug, Clone)]
pub(crate) struct Pattern {
    pub regex: regex::Regex,
    pub namespace: String,
    pub period: Duration,
}

impl Pattern {
    /// The namespace's topics the pattern names (matched whole, against the
    /// full name, as Pulsar's clients do).
    pub(crate) async fn matching(&self, pool: &Pool) -> Result<Vec<String>, Error> {
        let all = pool.topics_of_namespace(&self.namespace).await?;
        Ok(all
            .into_iter()
            .filter(|t| {
                self.regex
                    .find(t)
                    .is_some_and(|m| m.start() == 0 && m.end() == t.len())
            })
            .collect())
    }
}

/// Looks for new topics of a pattern subscription every period and
/// subscribes to them, announcing each new part to the consumer before its
/// messages flow.
#[allow(clippy::too_many_arguments)]
async fn discover(
    client: Client,
    pattern: Pattern,
    subscription: String,
    options: ConsumerOptions,
    registry: Parts,
    events: Events,
    mut known: std::collections::HashSet<String>,
    tasks: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
) {
    loop {
        tokio::time::sleep(pattern.period).await;
        let found = match pattern.matching(&client.pool).await {
            Ok(f) => f,
            Err(e) => {
                tracing::debug!(namespace = %pattern.namespace, error = %e, "pattern discovery failed; next round");
                continue;
            }
        };
        for topic in found {
            if known.contains(&topic) {
                continue;
            }
            let part = lock(&registry).len();
            let inner = new_part(
                &client,
                part,
                topic.clone(),
                None,
                &subscription,
                &options,
                None,
            );
            let deadline =
                tokio::time::Instant::now() + Duration::from_millis(options.operation_timeout_ms);
            match inner
                .subscribe_until(None, Some(deadline), &mut Backoff::default(), &events)
                .await
            {
                Ok(route) => {
                    tracing::info!(topic, subscription, "pattern subscription: a new topic");
                    known.insert(topic);
                    lock(&registry).push(inner.clone());
                    if events.send((part, Event::Added(inner.clone()))).is_err() {
                        return;
                    }
                    let t = tokio::spawn(run(inner, route, events.clone()));
                    lock(&tasks).push(t);
                }
                Err(e) => {
                    tracing::warn!(topic, error = %e, "cannot subscribe to a new topic of the pattern; next round");
                }
            }
        }
    }
}

fn new_part(
    client: &Client,
    part: usize,
    topic: String,
    partition: Option<i32>,
    subscription: &str,
    options: &ConsumerOptions,
    reader: Option<(MessageId, bool)>,
) -> Arc<Inner> {
    Arc::new(Inner {
        pool: client.pool.clone(),
        part,
        topic_name: topic.as_str().into(),
        topic,
        partition,
        resume: reader.map(Mutex::new),
        subscription: subscription.to_string(),
        consumer_id: client.ids.fetch_add(1, Ordering::Relaxed),
        conn: Mutex::default(),
        options: options.clone(),
    })
}

/// Asks the broker to send nacked and timed-out entries again.
async fn redeliver_due(parts: Parts, redelivery: Arc<Mutex<Redelivery>>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let due = lock(&redelivery).due(Instant::now());
        if due.is_empty() {
            continue;
        }
        let mut by_part: BTreeMap<usize, Vec<MessageIdData>> = BTreeMap::new();
        for (part, ledger_id, entry_id) in due {
            by_part.entry(part).or_default().push(MessageIdData {
                ledger_id,
                entry_id,
                ..Default::default()
            });
        }
        for (part, ids) in by_part {
            let Some(inner) = lock(&parts).get(part).cloned() else {
                continue;
            };
            tracing::debug!(topic = %inner.topic, entries = ids.len(), "asking for redelivery");
            let mut cmd = base(Type::RedeliverUnacknowledgedMessages);
            cmd.redeliver_unacknowledged_messages = Some(CommandRedeliverUnacknowledgedMessages {
                consumer_id: inner.consumer_id,
                message_ids: ids,
                ..Default::default()
            });
            let _ = inner.send(&cmd);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Receives the messages of one subscription, following its topics from
/// broker to broker. On a partitioned topic (or several topics) it holds a
/// consumer per partition and merges what they receive.
///
/// It is a [`futures::Stream`] of messages, which ends once every topic is
/// terminated and read to its end.
pub struct Consumer {
    parts: Vec<Arc<Inner>>,
    states: Vec<ConsumerState>,
    /// The broker said the part's topic is terminated and everything was
    /// sent.
    ended: Vec<bool>,
    /// Chunked messages being joined, per part.
    chunks: Vec<chunks::Assembler>,
    /// A reader's part skips what precedes where it (re)starts.
    skip: Vec<Option<(MessageId, bool)>>,
    events: mpsc::UnboundedReceiver<(usize, Event)>,
    queue: VecDeque<Message>,
    redelivery: Arc<Mutex<Redelivery>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    client: Client,
    dead_letter: Option<DeadLetterPolicy>,
    nack_backoff: Option<(u64, u64)>,
    /// An ack timeout is on: received and acked entries are tracked.
    ack_timeout: bool,
    /// To the task that stores dead letters.
    dead_letters: Option<mpsc::UnboundedSender<dlq::Job>>,
    /// The retry topic's producer, once `reconsume_later` needed it.
    retry: Option<Producer>,
    /// A pattern consumer: topics come as they appear; it never ends.
    pattern: bool,
    /// The tasks of the parts discovery added.
    discovered: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl Consumer {
    /// Subscribes to every topic named (and every partition of the
    /// partitioned ones) under one subscription name.
    pub(crate) async fn subscribe_topics(
        client: &Client,
        topics: &[String],
        subscription: &str,
        options: ConsumerOptions,
        reader: Option<(MessageId, bool)>,
        pattern: Option<Pattern>,
    ) -> Result<Consumer, Error> {
        let pool = &client.pool;
        if topics.is_empty() && pattern.is_none() {
            return Err(Error::Config("no topic to subscribe to".into()));
        }
        let mut topics = topics.to_vec();
        if let Some(policy) = &options.dead_letter {
            if topics.is_empty() {
                return Err(Error::Config(
                    "a dead-letter policy needs a topic: the pattern matched none yet".into(),
                ));
            }
            policy.check(options.sub_type)?;
            if policy.retry_enabled {
                topics.push(policy.retry_topic(&topics[0], subscription));
            }
        }
        let mut names: Vec<(String, Option<i32>)> = Vec::new();
        for t in &topics {
            match pool.partitions(t).await? {
                0 => names.push((t.clone(), None)),
                n => names.extend((0..n as i32).map(|i| (format!("{t}-partition-{i}"), Some(i)))),
            }
        }
        let known: std::collections::HashSet<String> =
            names.iter().map(|(t, _)| t.clone()).collect();
        let parts: Vec<Arc<Inner>> = names
            .into_iter()
            .enumerate()
            .map(|(part, (topic, partition))| {
                new_part(
                    client,
                    part,
                    topic,
                    partition,
                    subscription,
                    &options,
                    reader,
                )
            })
            .collect();
        let (tx, rx) = mpsc::unbounded_channel();
        let deadline =
            tokio::time::Instant::now() + Duration::from_millis(options.operation_timeout_ms);
        let subscribing = parts.iter().map(|inner| {
            let tx = tx.clone();
            async move {
                inner
                    .subscribe_until(None, Some(deadline), &mut Backoff::default(), &tx)
                    .await
            }
        });
        let routes = match futures::future::try_join_all(subscribing).await {
            Ok(r) => r,
            Err(e) => {
                // Leave nothing half subscribed behind.
                for inner in &parts {
                    let _ = close_part(inner).await;
                }
                return Err(e);
            }
        };
        let mut tasks: Vec<_> = parts
            .iter()
            .zip(routes)
            .map(|(inner, route)| tokio::spawn(run(inner.clone(), route, tx.clone())))
            .collect();
        let nack_delay = Duration::from_millis(options.nack_redelivery_delay_ms);
        let ack_timeout = Duration::from_millis(options.ack_timeout_ms);
        let redelivery = Arc::new(Mutex::new(Redelivery::new(
            nack_delay,
            (options.ack_timeout_ms > 0).then_some(ack_timeout),
        )));
        let every = nack_delay
            .min(if ack_timeout.is_zero() {
                nack_delay
            } else {
                ack_timeout
            })
            .div_f32(4.0)
            .clamp(Duration::from_millis(10), Duration::from_millis(250));
        let registry: Parts = Arc::new(Mutex::new(parts.clone()));
        tasks.push(tokio::spawn(redeliver_due(
            registry.clone(),
            redelivery.clone(),
            every,
        )));
        let discovered = Arc::new(Mutex::new(Vec::new()));
        if let Some(p) = pattern.clone() {
            tasks.push(tokio::spawn(discover(
                client.clone(),
                p,
                subscription.to_string(),
                options.clone(),
                registry.clone(),
                tx.clone(),
                known,
                discovered.clone(),
            )));
        }
        let dead_letters = options.dead_letter.as_ref().map(|policy| {
            let (tx, rx) = mpsc::unbounded_channel();
            tasks.push(tokio::spawn(dlq::forward(
                client.clone(),
                policy.dlq_topic(&topics[0], subscription),
                registry.clone(),
                redelivery.clone(),
                rx,
            )));
            tx
        });
        Ok(Consumer {
            states: parts
                .iter()
                .map(|_| ConsumerState::new(options.receiver_queue))
                .collect(),
            ended: vec![false; parts.len()],
            chunks: parts
                .iter()
                .map(|_| {
                    chunks::Assembler::new(
                        options.max_pending_chunked_messages,
                        Duration::from_millis(options.expire_incomplete_chunked_ms),
                    )
                })
                .collect(),
            skip: vec![
                reader
                    .filter(|(id, _)| *id != MessageId::EARLIEST && *id != MessageId::LATEST);
                parts.len()
            ],
            parts,
            events: rx,
            queue: VecDeque::new(),
            redelivery,
            tasks,
            client: client.clone(),
            dead_letter: options.dead_letter.clone(),
            nack_backoff: options.nack_backoff,
            ack_timeout: options.ack_timeout_ms > 0,
            dead_letters,
            retry: None,
            pattern: pattern.is_some(),
            discovered,
        })
    }

    /// A reader part's place: the message it read last (exclusive) or where
    /// it was started or sought (inclusive or not).
    pub(crate) fn resume_of(&self, part: usize) -> Option<(MessageId, bool)> {
        self.parts.get(part)?.resume.as_ref().map(|r| *lock(r))
    }

    fn add_part(&mut self, inner: Arc<Inner>) {
        debug_assert_eq!(inner.part, self.parts.len());
        let o = &inner.options;
        self.states.push(ConsumerState::new(o.receiver_queue));
        self.ended.push(false);
        self.skip.push(None);
        self.chunks.push(chunks::Assembler::new(
            o.max_pending_chunked_messages,
            Duration::from_millis(o.expire_incomplete_chunked_ms),
        ));
        self.parts.push(inner);
    }

    /// The topic (the first one, for a consumer of several; empty for a
    /// pattern consumer that matched nothing yet).
    pub fn topic(&self) -> &str {
        let Some(first) = self.parts.first() else {
            return "";
        };
        let t = &first.topic;
        match first.partition {
            Some(_) => t.rsplit_once("-partition-").map_or(t, |(base, _)| base),
            None => t,
        }
    }

    /// The topics (partitions) this consumer reads.
    pub fn topics(&self) -> Vec<String> {
        self.parts.iter().map(|p| p.topic.clone()).collect()
    }

    fn flow(&self, part: usize, permits: u32) -> Result<(), Error> {
        let inner = &self.parts[part];
        let mut cmd = base(Type::Flow);
        cmd.flow = Some(CommandFlow {
            consumer_id: inner.consumer_id,
            message_permits: permits,
        });
        inner.send(&cmd)
    }

    fn unpack(
        &mut self,
        part: usize,
        cmd: BaseCommand,
        payload: Option<Payload>,
    ) -> Result<(), Error> {
        if cmd.reached_end_of_topic.is_some() {
            self.ended[part] = true;
            return Ok(());
        }
        let (Some(m), Some(pl)) = (cmd.message, payload) else {
            return Ok(());
        };
        let md = &pl.metadata;
        let mut id = MessageId::from_data(&m.message_id);
        if let Some(p) = self.parts[part].partition {
            id.partition = p;
        }
        let topic = self.parts[part].topic_name.clone();
        let redelivery_count = m.redelivery_count.unwrap_or(0);
        let mut raw = pl.payload();
        let mut chunk_ids = Vec::new();
        if let (Some(n), Some(uuid)) = (md.num_chunks_from_msg.filter(|n| *n > 1), &md.uuid) {
            let chunk = chunks::Chunk {
                uuid: uuid.clone(),
                chunk_id: md.chunk_id.unwrap_or(0).max(0) as u32,
                num_chunks: n as u32,
                total_size: md.total_chunk_msg_size.unwrap_or(0).max(0) as usize,
                id,
                payload: raw,
            };
            let added = self.chunks[part].add(chunk, Instant::now());
            for d in added.dropped {
                tracing::debug!(topic = %self.parts[part].topic, chunk = %d, "incomplete chunked message; asking for it again");
                lock(&self.redelivery).nacked((part, d.ledger_id, d.entry_id), Instant::now());
            }
            match added.complete {
                Some((whole, ids)) => {
                    raw = whole;
                    chunk_ids = ids;
                }
                None => {
                    // Held for the rest of its message: its permit now.
                    if let Some(permits) = self.states[part].taken() {
                        self.flow(part, permits)?;
                    }
                    return Ok(());
                }
            }
        }
        let body = match md.compression.filter(|c| *c != 0) {
            None => raw,
            Some(code) => {
                let inflated = Compression::from_wire(code)
                    .ok_or_else(|| Error::Protocol(format!("unknown compression {code}")))
                    .and_then(|c| c.decompress(raw, md.uncompressed_size.unwrap_or(0) as usize));
                match inflated {
                    Ok(b) => b,
                    Err(e) => return self.discard(part, id, e),
                }
            }
        };
        match md.num_messages_in_batch {
            Some(n) => {
                let items = match decode_batch(body, n.max(0) as usize) {
                    Ok(items) => items,
                    Err(e) => return self.discard(part, id, Error::Protocol(e.to_string())),
                };
                // Messages a compaction took out keep their places (ids)
                // but are not delivered.
                let live = items
                    .iter()
                    .filter(|it| it.metadata.compacted_out != Some(true))
                    .count();
                self.states[part].batch_arrived((id.ledger_id, id.entry_id), live as u32);
                for (i, item) in items.into_iter().enumerate() {
                    if item.metadata.compacted_out == Some(true) {
                        continue;
                    }
                    id.batch_index = i as i32;
                    self.queue.push_back(Message {
                        id,
                        topic: topic.clone(),
                        payload: item.payload,
                        key: item.metadata.partition_key,
                        properties: magnetar_proto::commands::properties(&item.metadata.properties),
                        publish_time_ms: md.publish_time,
                        redelivery_count,
                        batch_size: n as u32,
                        part,
                        chunk_ids: Vec::new(),
                    });
                }
            }
            None => self.queue.push_back(Message {
                id,
                topic,
                payload: body,
                key: md.partition_key.clone(),
                properties: magnetar_proto::commands::properties(&md.properties),
                publish_time_ms: md.publish_time,
                redelivery_count,
                batch_size: 0,
                part,
                chunk_ids,
            }),
        }
        Ok(())
    }

    /// A message that cannot be read (a payload that does not inflate or a
    /// batch that does not parse) is acknowledged and dropped, as Pulsar's
    /// clients do: redelivering it would only fail again and block the
    /// subscription.
    fn discard(&mut self, part: usize, id: MessageId, e: Error) -> Result<(), Error> {
        tracing::warn!(topic = %self.parts[part].topic, message = %id, error = %e, "dropping a message that cannot be read");
        if let Some(permits) = self.states[part].taken() {
            self.flow(part, permits)?;
        }
        self.send_ack(part, id, AckType::Individual)
    }

    /// Whether every topic is terminated and every message of it was
    /// received (the broker says so once the consumer read the last one).
    pub fn has_reached_end_of_topic(&self) -> bool {
        self.ended.iter().all(|e| *e) && self.queue.is_empty()
    }

    /// The next message, or `None` once every topic has ended.
    pub(crate) fn poll_message(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Message, Error>>> {
        loop {
            if let Some(m) = self.queue.pop_front() {
                if let Some(permits) = self.states[m.part].taken() {
                    if let Err(e) = self.flow(m.part, permits) {
                        return Poll::Ready(Some(Err(e)));
                    }
                }
                if let Some((start, inclusive)) = self.skip[m.part] {
                    if reader::before_start(&m.id, &start, inclusive) {
                        continue;
                    }
                    self.skip[m.part] = None;
                }
                if let Some(r) = &self.parts[m.part].resume {
                    *lock(r) = (m.id, false);
                }
                let max = self.dead_letter.as_ref().map(|p| p.max_redeliver_count);
                if max.is_some_and(|max| m.redelivery_count > max) {
                    // Delivered max + 1 times already: a dead letter.
                    self.dead_letter(m.part, m);
                    continue;
                }
                if self.ack_timeout {
                    lock(&self.redelivery)
                        .received((m.part, m.id.ledger_id, m.id.entry_id), Instant::now());
                }
                return Poll::Ready(Some(Ok(m)));
            }
            if !self.pattern && self.ended.iter().all(|e| *e) {
                return Poll::Ready(None);
            }
            let (part, event) = match self.events.poll_recv(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => return Poll::Ready(Some(Err(Error::Closed))),
                Poll::Ready(Some(ev)) => ev,
            };
            if let Event::Added(inner) = event {
                self.add_part(inner);
                continue;
            }
            if part >= self.parts.len() {
                // A part being added announces itself right after this.
                continue;
            }
            match event {
                Event::Message(m) => {
                    let (cmd, payload) = *m;
                    if let Err(e) = self.unpack(part, cmd, payload) {
                        return Poll::Ready(Some(Err(e)));
                    }
                }
                Event::Subscribed => {
                    self.ended[part] = false;
                    if let Some(r) = &self.parts[part].resume {
                        let at = *lock(r);
                        self.skip[part] = (at.0 != MessageId::EARLIEST
                            && at.0 != MessageId::LATEST)
                            .then_some(at);
                    }
                    self.queue.retain(|m| m.part != part);
                    self.states[part].subscribed();
                    self.chunks[part].clear();
                    lock(&self.redelivery).subscribed(part);
                }
                Event::Added(_) => {}
            }
        }
    }

    /// The next message, waiting as long as it takes (across reconnects);
    /// `Error::EndOfTopic` once a terminated topic has nothing more.
    pub async fn receive(&mut self) -> Result<Message, Error> {
        std::future::poll_fn(|cx| self.poll_message(cx))
            .await
            .unwrap_or(Err(Error::EndOfTopic))
    }

    /// `receive` with a timeout; `Ok(None)` when nothing came in time.
    pub async fn receive_timeout(&mut self, timeout: Duration) -> Result<Option<Message>, Error> {
        match tokio::time::timeout(timeout, self.receive()).await {
            Ok(r) => r.map(Some),
            Err(_) => Ok(None),
        }
    }

    fn ack_command(&self, part: usize, id: MessageId, ack_type: AckType) -> BaseCommand {
        if ack_type == AckType::Individual {
            return ack_cmd(self.parts[part].consumer_id, id);
        }
        let mut cmd = base(Type::Ack);
        let mut data = id.to_data();
        data.batch_index = None;
        data.partition = None;
        cmd.ack = Some(CommandAck {
            consumer_id: self.parts[part].consumer_id,
            ack_type: ack_type as i32,
            message_id: vec![data],
            ..Default::default()
        });
        cmd
    }

    fn send_ack(&self, part: usize, id: MessageId, ack_type: AckType) -> Result<(), Error> {
        self.parts[part].send(&self.ack_command(part, id, ack_type))
    }

    fn part_of(&self, msg: &Message) -> Result<usize, Error> {
        match self.parts.get(msg.part) {
            Some(p) if Arc::ptr_eq(&p.topic_name, &msg.topic) => Ok(msg.part),
            _ => Err(Error::Protocol(format!(
                "message {} of {} was not received by this consumer",
                msg.id, msg.topic
            ))),
        }
    }

    /// Whether acknowledging `msg` completes its entry (every message of a
    /// batch acknowledged); tracking updated.
    fn entry_done(&mut self, part: usize, msg: &Message) -> bool {
        let entry = (msg.id.ledger_id, msg.id.entry_id);
        if msg.batch_size > 0 && !self.states[part].ack_in_batch(entry) {
            return false;
        }
        if self.ack_timeout {
            lock(&self.redelivery).acked((part, entry.0, entry.1));
        }
        true
    }

    /// Acks the chunks of a chunked message before its last one (which the
    /// caller acks), once the message is done with.
    fn ack_earlier_chunks(&self, part: usize, msg: &Message) -> Result<(), Error> {
        for c in msg.chunk_ids.iter().filter(|c| **c != msg.id) {
            self.send_ack(part, *c, AckType::Individual)?;
        }
        Ok(())
    }

    /// Hands `msg` to the dead-letter task, which acks it once stored.
    fn dead_letter(&mut self, part: usize, msg: Message) {
        let ack_entry = self.entry_done(part, &msg);
        if let Some(tx) = &self.dead_letters {
            let _ = tx.send(dlq::Job {
                message: msg,
                ack_entry,
            });
        }
    }

    /// `ack`, answered by the broker once the acknowledgement is stored (an
    /// ack receipt). A message of a batch whose other messages are not all
    /// acknowledged yet needs no round trip: it returns at once.
    pub async fn ack_with_receipt(&mut self, msg: &Message) -> Result<(), Error> {
        let part = self.part_of(msg)?;
        if !self.entry_done(part, msg) {
            return Ok(());
        }
        self.ack_earlier_chunks(part, msg)?;
        self.parts[part]
            .request(self.ack_command(part, msg.id, AckType::Individual))
            .await
            .map(|_| ())
    }

    /// `ack_cumulative`, answered once stored; a shared subscription
    /// refuses it with `NotAllowedError`.
    pub async fn ack_cumulative_with_receipt(&mut self, msg: &Message) -> Result<(), Error> {
        let part = self.part_of(msg)?;
        self.parts[part]
            .request(self.ack_command(part, msg.id, AckType::Cumulative))
            .await?;
        self.states[part].acked_through((msg.id.ledger_id, msg.id.entry_id));
        if self.ack_timeout {
            lock(&self.redelivery).acked_through(part, msg.id.ledger_id, msg.id.entry_id);
        }
        Ok(())
    }

    /// Acknowledges one message. Messages of a batch are acked to the broker
    /// together, when the last of them is acked.
    pub fn ack(&mut self, msg: &Message) -> Result<(), Error> {
        let part = self.part_of(msg)?;
        if !self.entry_done(part, msg) {
            return Ok(());
        }
        self.ack_earlier_chunks(part, msg)?;
        self.send_ack(part, msg.id, AckType::Individual)
    }

    /// Acknowledges this message and every one before it (of its topic or
    /// partition).
    pub fn ack_cumulative(&mut self, msg: &Message) -> Result<(), Error> {
        let part = self.part_of(msg)?;
        let mut id = msg.id;
        if msg.batch_size > 0 && msg.id.batch_index + 1 < msg.batch_size as i32 {
            // Not the last of its batch: everything up to the previous entry.
            if id.entry_id == 0 {
                return Ok(());
            }
            id.entry_id -= 1;
        }
        self.states[part].acked_through((id.ledger_id, id.entry_id));
        if self.ack_timeout {
            lock(&self.redelivery).acked_through(part, id.ledger_id, id.entry_id);
        }
        self.send_ack(part, id, AckType::Cumulative)
    }

    /// Negatively acknowledges a message: the broker sends it (its whole
    /// batch, for a batched message) again after the consumer's nack
    /// redelivery delay, with its redelivery count raised.
    /// With a [`DeadLetterPolicy`], a message already redelivered
    /// `max_redeliver_count` times goes to the dead-letter topic instead.
    pub fn nack(&mut self, msg: &Message) -> Result<(), Error> {
        let part = self.part_of(msg)?;
        let max = self.dead_letter.as_ref().map(|p| p.max_redeliver_count);
        if max.is_some_and(|max| msg.redelivery_count >= max) {
            self.dead_letter(part, msg.clone());
            return Ok(());
        }
        let entry = (part, msg.id.ledger_id, msg.id.entry_id);
        match self.nack_backoff {
            Some((min, max)) => {
                let delay = min
                    .saturating_mul(1u64 << msg.redelivery_count.min(32))
                    .min(max);
                lock(&self.redelivery).nacked_after(
                    entry,
                    Instant::now(),
                    Duration::from_millis(delay),
                );
            }
            None => lock(&self.redelivery).nacked(entry, Instant::now()),
        }
        Ok(())
    }

    /// Moves `msg` to the retry topic, to come back after `delay` (with
    /// `RECONSUMETIMES` raised), and acknowledges it here; after
    /// `max_redeliver_count` retries it goes to the dead-letter topic
    /// instead. Needs a [`DeadLetterPolicy`] with `retry_enabled`.
    pub async fn reconsume_later(&mut self, msg: &Message, delay: Duration) -> Result<(), Error> {
        let part = self.part_of(msg)?;
        let Some(policy) = self.dead_letter.clone().filter(|p| p.retry_enabled) else {
            return Err(Error::Config(
                "reconsume_later needs a dead-letter policy with retry enabled".into(),
            ));
        };
        let times = dlq::reconsume_times(msg) + 1;
        if times > policy.max_redeliver_count {
            self.dead_letter(part, msg.clone());
            return Ok(());
        }
        if self.retry.is_none() {
            let topic = policy.retry_topic(self.topic(), &self.parts[0].subscription);
            self.retry = Some(self.client.producer(topic).chunking(true).create().await?);
        }
        let real = self.parts[part].topic.clone();
        if let Some(p) = &self.retry {
            p.send(dlq::retry_message(
                msg,
                &real,
                times,
                delay.as_millis() as u64,
            ))
            .await?;
        }
        self.ack(msg)
    }

    /// Asks the broker to send every unacknowledged message again.
    pub fn redeliver_unacknowledged(&mut self) -> Result<(), Error> {
        self.queue.clear();
        for (part, inner) in self.parts.iter().enumerate() {
            lock(&self.redelivery).subscribed(part);
            let mut cmd = base(Type::RedeliverUnacknowledgedMessages);
            cmd.redeliver_unacknowledged_messages = Some(CommandRedeliverUnacknowledgedMessages {
                consumer_id: inner.consumer_id,
                ..Default::default()
            });
            inner.send(&cmd)?;
        }
        Ok(())
    }

    async fn seek_part(
        &mut self,
        part: usize,
        message_id: Option<MessageId>,
        time: Option<u64>,
    ) -> Result<(), Error> {
        let inner = self.parts[part].clone();
        let mut cmd = base(Type::Seek);
        cmd.seek = Some(CommandSeek {
            consumer_id: inner.consumer_id,
            request_id: 0,
            message_id: message_id.map(|m| {
                let mut d = m.to_data();
                d.partition = None;
                d
            }),
            message_publish_time: time,
        });
        inner.request(cmd).await?;
        self.queue.retain(|m| m.part != part);
        self.skip[part] = None;
        if let (Some(r), Some(id)) = (&inner.resume, message_id) {
            *lock(r) = (id, true);
        }
        lock(&self.redelivery).subscribed(part);
        Ok(())
    }

    /// Moves the subscription to `id` (re-delivering from there). On a
    /// partitioned topic the id's partition is moved; an id without a
    /// partition (such as [`MessageId::EARLIEST`]) moves every one.
    pub async fn seek(&mut self, id: MessageId) -> Result<(), Error> {
        let targets: Vec<usize> = if self.parts.len() == 1 || id.partition < 0 {
            (0..self.parts.len()).collect()
        } else {
            self.parts
                .iter()
                .filter(|p| p.partition == Some(id.partition))
                .map(|p| p.part)
                .collect()
        };
        if targets.is_empty() {
            return Err(Error::Protocol(format!(
                "no partition {} here",
                id.partition
            )));
        }
        for part in targets {
            self.seek_part(part, Some(id), None).await?;
        }
        Ok(())
    }

    /// Moves the subscription (every topic and partition of it) to the
    /// first message published at or after `publish_time_ms`.
    pub async fn seek_time(&mut self, publish_time_ms: u64) -> Result<(), Error> {
        for part in 0..self.parts.len() {
            self.seek_part(part, None, Some(publish_time_ms)).await?;
        }
        Ok(())
    }

    /// The id of the last message stored in the topic (entry id `u64::MAX`,
    /// i.e. -1, when the topic is empty); for several topics or partitions,
    /// see [`Consumer::last_message_ids`].
    pub async fn last_message_id(&self) -> Result<MessageId, Error> {
        if self.parts.len() > 1 {
            return Err(Error::Protocol(
                "a consumer of several topics or partitions: use last_message_ids".into(),
            ));
        }
        last_message_id(&self.parts[0]).await
    }

    /// The id of the last message of each topic or partition.
    pub async fn last_message_ids(&self) -> Result<Vec<MessageId>, Error> {
        futures::future::try_join_all(self.parts.iter().map(|p| last_message_id(p))).await
    }

    /// Closes the consumer on the broker (its subscription stays).
    pub async fn close(self) -> Result<(), Error> {
        for t in self.tasks.iter().chain(lock(&self.discovered).iter()) {
            t.abort();
        }
        let closing = self.parts.iter().map(|p| close_part(p));
        futures::future::try_join_all(closing).await.map(|_| ())
    }
}

/// An individual ack of the entry of `id`.
pub(crate) fn ack_cmd(consumer_id: u64, id: MessageId) -> BaseCommand {
    let mut cmd = base(Type::Ack);
    let mut data = id.to_data();
    data.batch_index = None;
    data.partition = None;
    cmd.ack = Some(CommandAck {
        consumer_id,
        ack_type: AckType::Individual as i32,
        message_id: vec![data],
        ..Default::default()
    });
    cmd
}

async fn last_message_id(inner: &Inner) -> Result<MessageId, Error> {
    let mut cmd = base(Type::GetLastMessageId);
    cmd.get_last_message_id = Some(CommandGetLastMessageId {
        consumer_id: inner.consumer_id,
        request_id: 0,
    });
    let resp = inner.request(cmd).await?;
    let r = resp
        .get_last_message_id_response
        .ok_or_else(|| Error::Protocol("no GET_LAST_MESSAGE_ID_RESPONSE".into()))?;
    let mut id = MessageId::from_data(&r.last_message_id);
    if let Some(p) = inner.partition {
        id.partition = p;
    }
    Ok(id)
}

async fn close_part(inner: &Inner) -> Result<(), Error> {
    let Some(conn) = inner.conn() else {
        return Ok(());
    };
    let mut cmd = base(Type::CloseConsumer);
    cmd.close_consumer = Some(CommandCloseConsumer {
        consumer_id: inner.consumer_id,
        request_id: 0,
        ..Default::default()
    });
    let res = conn.request(cmd).await.map(|_| ());
    conn.unregister_consumer(inner.consumer_id);
    res
}

impl futures::Stream for Consumer {
    type Item = Result<Message, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.poll_message(cx)
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        for t in self.tasks.iter().chain(lock(&self.discovered).iter()) {
            t.abort();
        }
    }
}

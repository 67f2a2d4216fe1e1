//! A consumer that follows its topic: a task subscribes on the broker that
//! serves the topic and passes its messages on; when the connection ends or
//! the broker closes the consumer, it subscribes again (back-off, or at
//! once where the broker named the new owner). Messages received and not
//! yet taken by the application are dropped then: the broker redelivers
//! everything unacknowledged to the new subscription.

pub mod state;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use magnetar_proto::frame::{base, decode_batch};
use magnetar_proto::pulsar::{
    base_command::Type, command_ack::AckType, command_subscribe::InitialPosition as WireInitial,
    BaseCommand, CommandAck, CommandCloseConsumer, CommandFlow, CommandGetLastMessageId,
    CommandRedeliverUnacknowledgedMessages, CommandSeek, CommandSubscribe, IntRange, KeySharedMeta,
    KeySharedMode,
};
use magnetar_proto::Payload;
use tokio::sync::mpsc;

use crate::backoff::Backoff;
use crate::compression::Compression;
use crate::pool::Pool;
use crate::{Connection, Error, Message, MessageId};
use state::ConsumerState;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubscriptionType {
    Exclusive = 0,
    Shared = 1,
    /// One active consumer (the first by priority level, then name — per
    /// partition, spread over the consumers); the others stand by and take
    /// over, with what it left unacknowledged, when it goes.
    Failover = 2,
    /// Every message of a key goes to the same consumer, in order; keys
    /// spread over the consumers (see `ConsumerOptions::sticky_ranges`).
    KeyShared = 3,
}

#[derive(Debug, Clone)]
pub struct ConsumerOptions {
    pub sub_type: SubscriptionType,
    /// Start a new subscription at the earliest message (default: latest).
    pub earliest: bool,
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
        }
    }
}

type Route = mpsc::UnboundedReceiver<(BaseCommand, Option<Payload>)>;

enum Event {
    Message(Box<(BaseCommand, Option<Payload>)>),
    /// Subscribed again: what was received before comes again.
    Subscribed,
}

struct Inner {
    pool: Arc<Pool>,
    topic: String,
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
        events: &mpsc::UnboundedSender<Event>,
    ) -> Result<Route, Error> {
        let mut hint = hint;
        loop {
            match self.subscribe(hint.take().as_deref()).await {
                Ok((conn, route)) => {
                    backoff.reset();
                    let _ = events.send(Event::Subscribed);
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
async fn run(inner: Arc<Inner>, mut route: Route, events: mpsc::UnboundedSender<Event>) {
    let mut backoff = Backoff::default();
    loop {
        let hint = loop {
            match route.recv().await {
                None => break None,
                Some((c, _)) if c.close_consumer.is_some() => {
                    break c.close_consumer.and_then(|c| c.assigned_broker_service_url);
                }
                Some((c, p)) => {
                    if events.send(Event::Message(Box::new((c, p)))).is_err() {
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

/// Receives messages of one subscription, following the topic from broker
/// to broker.
pub struct Consumer {
    inner: Arc<Inner>,
    events: mpsc::UnboundedReceiver<Event>,
    queue: VecDeque<Message>,
    state: ConsumerState,
    task: tokio::task::JoinHandle<()>,
    /// The broker said the topic is terminated and everything was sent.
    end_of_topic: bool,
}

impl Consumer {
    pub(crate) async fn subscribe(
        pool: Arc<Pool>,
        topic: &str,
        subscription: &str,
        consumer_id: u64,
        options: ConsumerOptions,
    ) -> Result<Consumer, Error> {
        let inner = Arc::new(Inner {
            pool,
            topic: topic.to_string(),
            subscription: subscription.to_string(),
            consumer_id,
            conn: Mutex::default(),
            options,
        });
        let (tx, rx) = mpsc::unbounded_channel();
        let deadline =
            tokio::time::Instant::now() + Duration::from_millis(inner.options.operation_timeout_ms);
        let route = inner
            .subscribe_until(None, Some(deadline), &mut Backoff::default(), &tx)
            .await?;
        let task = tokio::spawn(run(inner.clone(), route, tx));
        let state = ConsumerState::new(inner.options.receiver_queue);
        Ok(Consumer {
            inner,
            events: rx,
            queue: VecDeque::new(),
            state,
            task,
            end_of_topic: false,
        })
    }

    fn flow(&self, permits: u32) -> Result<(), Error> {
        let mut cmd = base(Type::Flow);
        cmd.flow = Some(CommandFlow {
            consumer_id: self.inner.consumer_id,
            message_permits: permits,
        });
        self.inner.send(&cmd)
    }

    fn unpack(&mut self, cmd: BaseCommand, payload: Option<Payload>) -> Result<(), Error> {
        if cmd.reached_end_of_topic.is_some() {
            self.end_of_topic = true;
            return Ok(());
        }
        let (Some(m), Some(pl)) = (cmd.message, payload) else {
            return Ok(());
        };
        let md = &pl.metadata;
        let mut id = MessageId::from_data(&m.message_id);
        let redelivery_count = m.redelivery_count.unwrap_or(0);
        let body = match md.compression.filter(|c| *c != 0) {
            None => pl.payload(),
            Some(code) => {
                let inflated = Compression::from_wire(code)
                    .ok_or_else(|| Error::Protocol(format!("unknown compression {code}")))
                    .and_then(|c| {
                        c.decompress(pl.payload(), md.uncompressed_size.unwrap_or(0) as usize)
                    });
                match inflated {
                    Ok(b) => b,
                    Err(e) => return self.discard(id, e),
                }
            }
        };
        match md.num_messages_in_batch {
            Some(n) => {
                let items = match decode_batch(body, n.max(0) as usize) {
                    Ok(items) => items,
                    Err(e) => return self.discard(id, Error::Protocol(e.to_string())),
                };
                // Messages a compaction took out keep their places (ids)
                // but are not delivered.
                let live = items
                    .iter()
                    .filter(|it| it.metadata.compacted_out != Some(true))
                    .count();
                self.state
                    .batch_arrived((id.ledger_id, id.entry_id), live as u32);
                for (i, item) in items.into_iter().enumerate() {
                    if item.metadata.compacted_out == Some(true) {
                        continue;
                    }
                    id.batch_index = i as i32;
                    self.queue.push_back(Message {
                        id,
                        payload: item.payload,
                        key: item.metadata.partition_key,
                        properties: magnetar_proto::commands::properties(&item.metadata.properties),
                        publish_time_ms: md.publish_time,
                        redelivery_count,
                        batch_size: n as u32,
                    });
                }
            }
            None => self.queue.push_back(Message {
                id,
                payload: body,
                key: md.partition_key.clone(),
                properties: magnetar_proto::commands::properties(&md.properties),
                publish_time_ms: md.publish_time,
                redelivery_count,
                batch_size: 0,
            }),
        }
        Ok(())
    }

    /// A message that cannot be read (a payload that does not inflate or a
    /// batch that does not parse) is acknowledged and dropped, as Pulsar's
    /// clients do: redelivering it would only fail again and block the
    /// subscription.
    fn discard(&mut self, id: MessageId, e: Error) -> Result<(), Error> {
        tracing::warn!(topic = %self.inner.topic, message = %id, error = %e, "dropping a message that cannot be read");
        if let Some(permits) = self.state.taken() {
            self.flow(permits)?;
        }
        self.send_ack(id, AckType::Individual)
    }

    /// Whether the topic is terminated and every message of it was
    /// received (the broker says so once the consumer read the last one).
    pub fn has_reached_end_of_topic(&self) -> bool {
        self.end_of_topic && self.queue.is_empty()
    }

    /// The next message, waiting as long as it takes (across reconnects);
    /// `Error::EndOfTopic` once a terminated topic has nothing more.
    pub async fn receive(&mut self) -> Result<Message, Error> {
        loop {
            if let Some(m) = self.queue.pop_front() {
                if let Some(permits) = self.state.taken() {
                    self.flow(permits)?;
                }
                return Ok(m);
            }
            if self.end_of_topic {
                return Err(Error::EndOfTopic);
            }
            match self.events.recv().await.ok_or(Error::Closed)? {
                Event::Message(m) => {
                    let (cmd, payload) = *m;
                    self.unpack(cmd, payload)?
                }
                Event::Subscribed => {
                    self.end_of_topic = false;
                    self.queue.clear();
                    self.state.subscribed();
                }
            }
        }
    }

    /// `receive` with a timeout; `Ok(None)` when nothing came in time.
    pub async fn receive_timeout(&mut self, timeout: Duration) -> Result<Option<Message>, Error> {
        match tokio::time::timeout(timeout, self.receive()).await {
            Ok(r) => r.map(Some),
            Err(_) => Ok(None),
        }
    }

    fn ack_command(&self, id: MessageId, ack_type: AckType) -> BaseCommand {
        let mut cmd = base(Type::Ack);
        let mut data = id.to_data();
        data.batch_index = None;
        cmd.ack = Some(CommandAck {
            consumer_id: self.inner.consumer_id,
            ack_type: ack_type as i32,
            message_id: vec![data],
            ..Default::default()
        });
        cmd
    }

    fn send_ack(&self, id: MessageId, ack_type: AckType) -> Result<(), Error> {
        self.inner.send(&self.ack_command(id, ack_type))
    }

    /// `ack`, answered by the broker once the acknowledgement is stored (an
    /// ack receipt). A message of a batch whose other messages are not all
    /// acknowledged yet needs no round trip: it returns at once.
    pub async fn ack_with_receipt(&mut self, msg: &Message) -> Result<(), Error> {
        if msg.batch_size > 0 && !self.state.ack_in_batch((msg.id.ledger_id, msg.id.entry_id)) {
            return Ok(());
        }
        self.inner
            .request(self.ack_command(msg.id, AckType::Individual))
            .await
            .map(|_| ())
    }

    /// `ack_cumulative`, answered once stored; a shared subscription
    /// refuses it with `NotAllowedError`.
    pub async fn ack_cumulative_with_receipt(&mut self, msg: &Message) -> Result<(), Error> {
        self.inner
            .request(self.ack_command(msg.id, AckType::Cumulative))
            .await?;
        self.state
            .acked_through((msg.id.ledger_id, msg.id.entry_id));
        Ok(())
    }

    /// Acknowledges one message. Messages of a batch are acked to the broker
    /// together, when the last of them is acked.
    pub fn ack(&mut self, msg: &Message) -> Result<(), Error> {
        if msg.batch_size > 0 && !self.state.ack_in_batch((msg.id.ledger_id, msg.id.entry_id)) {
            return Ok(());
        }
        self.send_ack(msg.id, AckType::Individual)
    }

    /// Acknowledges this message and every one before it.
    pub fn ack_cumulative(&mut self, msg: &Message) -> Result<(), Error> {
        let mut id = msg.id;
        if msg.batch_size > 0 && msg.id.batch_index + 1 < msg.batch_size as i32 {
            // Not the last of its batch: everything up to the previous entry.
            if id.entry_id == 0 {
                return Ok(());
            }
            id.entry_id -= 1;
        }
        self.state.acked_through((id.ledger_id, id.entry_id));
        self.send_ack(id, AckType::Cumulative)
    }

    /// Asks the broker to send every unacknowledged message again.
    pub fn redeliver_unacknowledged(&mut self) -> Result<(), Error> {
        self.queue.clear();
        let mut cmd = base(Type::RedeliverUnacknowledgedMessages);
        cmd.redeliver_unacknowledged_messages = Some(CommandRedeliverUnacknowledgedMessages {
            consumer_id: self.inner.consumer_id,
            ..Default::default()
        });
        self.inner.send(&cmd)
    }

    async fn seek_to(
        &mut self,
        message_id: Option<MessageId>,
        time: Option<u64>,
    ) -> Result<(), Error> {
        let mut cmd = base(Type::Seek);
        cmd.seek = Some(CommandSeek {
            consumer_id: self.inner.consumer_id,
            request_id: 0,
            message_id: message_id.map(|m| m.to_data()),
            message_publish_time: time,
        });
        self.inner.request(cmd).await?;
        self.queue.clear();
        Ok(())
    }

    /// Moves the subscription to `id` (re-delivering from there).
    pub async fn seek(&mut self, id: MessageId) -> Result<(), Error> {
        self.seek_to(Some(id), None).await
    }

    /// Moves the subscription to the first message published at or after
    /// `publish_time_ms`.
    pub async fn seek_time(&mut self, publish_time_ms: u64) -> Result<(), Error> {
        self.seek_to(None, Some(publish_time_ms)).await
    }

    /// The id of the last message stored in the topic (entry id `u64::MAX`,
    /// i.e. -1, when the topic is empty).
    pub async fn last_message_id(&self) -> Result<MessageId, Error> {
        let mut cmd = base(Type::GetLastMessageId);
        cmd.get_last_message_id = Some(CommandGetLastMessageId {
            consumer_id: self.inner.consumer_id,
            request_id: 0,
        });
        let resp = self.inner.request(cmd).await?;
        let r = resp
            .get_last_message_id_response
            .ok_or_else(|| Error::Protocol("no GET_LAST_MESSAGE_ID_RESPONSE".into()))?;
        Ok(MessageId::from_data(&r.last_message_id))
    }

    pub async fn close(self) -> Result<(), Error> {
        self.task.abort();
        let Some(conn) = self.inner.conn() else {
            return Ok(());
        };
        let mut cmd = base(Type::CloseConsumer);
        cmd.close_consumer = Some(CommandCloseConsumer {
            consumer_id: self.inner.consumer_id,
            request_id: 0,
            ..Default::default()
        });
        let res = conn.request(cmd).await.map(|_| ());
        conn.unregister_consumer(self.inner.consumer_id);
        res
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

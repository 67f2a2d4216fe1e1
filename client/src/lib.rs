//! The Magnetar Rust SDK: a client, producers (with optional batching) and
//! consumers, speaking the Pulsar binary protocol.
//!
//! It depends only on `magnetar-proto`, never on server crates.

mod connection;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use magnetar_proto::frame::{base, decode_batch, encode_batch, BatchItem};
use magnetar_proto::pulsar::{
    base_command::Type, command_ack::AckType, command_subscribe::InitialPosition as WireInitial,
    BaseCommand, CommandAck, CommandCloseConsumer, CommandCloseProducer, CommandFlow,
    CommandProducer, CommandRedeliverUnacknowledgedMessages, CommandSeek, CommandSend,
    CommandSubscribe, KeyValue, MessageIdData, MessageMetadata, SingleMessageMetadata,
};
use magnetar_proto::Payload;
use tokio::sync::{mpsc, oneshot};

pub use connection::Connection;

#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    #[error("connection: {0}")]
    Connection(String),
    #[error("broker error {code}: {message}")]
    Server { code: i32, message: String },
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("timed out")]
    Timeout,
    #[error("closed")]
    Closed,
}

/// Where a message is stored: (ledger, entry), and its index within a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MessageId {
    pub ledger_id: u64,
    pub entry_id: u64,
    pub partition: i32,
    pub batch_index: i32,
}

impl MessageId {
    fn from_data(d: &MessageIdData) -> MessageId {
        MessageId {
            ledger_id: d.ledger_id,
            entry_id: d.entry_id,
            partition: d.partition.unwrap_or(-1),
            batch_index: d.batch_index.unwrap_or(-1),
        }
    }

    fn to_data(self) -> MessageIdData {
        MessageIdData {
            ledger_id: self.ledger_id,
            entry_id: self.entry_id,
            partition: Some(self.partition),
            batch_index: Some(self.batch_index),
            ..Default::default()
        }
    }

    pub const EARLIEST: MessageId = MessageId {
        ledger_id: u64::MAX,
        entry_id: u64::MAX,
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

fn now_ms() -> u64 {
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
    batch_size: u32,
}

fn props(kvs: &[KeyValue]) -> BTreeMap<String, String> {
    kvs.iter()
        .map(|kv| (kv.key.clone(), kv.value.clone()))
        .collect()
}

fn kvs(props: &BTreeMap<String, String>) -> Vec<KeyValue> {
    props
        .iter()
        .map(|(k, v)| KeyValue {
            key: k.clone(),
            value: v.clone(),
        })
        .collect()
}

/// A client bound to one broker service URL (`pulsar://host:port`).
#[derive(Clone)]
pub struct Client {
    conn: Arc<Connection>,
    ids: Arc<AtomicU64>,
}

impl Client {
    pub async fn connect(service_url: &str) -> Result<Client, Error> {
        let conn = Connection::connect(service_url).await?;
        Ok(Client {
            conn,
            ids: Arc::new(AtomicU64::new(1)),
        })
    }

    fn next_id(&self) -> u64 {
        self.ids.fetch_add(1, Ordering::Relaxed)
    }

    pub async fn create_producer(
        &self,
        topic: &str,
        options: ProducerOptions,
    ) -> Result<Producer, Error> {
        let producer_id = self.next_id();
        let mut cmd = base(Type::Producer);
        cmd.producer = Some(CommandProducer {
            topic: topic.into(),
            producer_id,
            request_id: 0,
            producer_name: options.name.clone(),
            ..Default::default()
        });
        let receipts = self.conn.register_producer(producer_id);
        let resp = self.conn.request(cmd).await?;
        let name = resp
            .producer_success
            .map(|s| s.producer_name)
            .ok_or_else(|| Error::Protocol("no PRODUCER_SUCCESS".into()))?;
        let inner = Arc::new(ProducerInner {
            conn: self.conn.clone(),
            producer_id,
            name,
            options,
            state: Mutex::new(ProducerState {
                next_seq: 0,
                pending: HashMap::new(),
                batch: Vec::new(),
                batch_bytes: 0,
                closed: false,
            }),
        });
        tokio::spawn(receipt_loop(Arc::downgrade(&inner), receipts));
        if inner.options.batching {
            let weak = Arc::downgrade(&inner);
            let every = Duration::from_millis(inner.options.batch_delay_ms.max(1));
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(every).await;
                    match weak.upgrade() {
                        Some(p) => p.flush_batch(),
                        None => return,
                    }
                }
            });
        }
        Ok(Producer { inner })
    }

    pub async fn subscribe(
        &self,
        topic: &str,
        subscription: &str,
        options: ConsumerOptions,
    ) -> Result<Consumer, Error> {
        let consumer_id = self.next_id();
        let mut cmd = base(Type::Subscribe);
        cmd.subscribe = Some(CommandSubscribe {
            topic: topic.into(),
            subscription: subscription.into(),
            sub_type: options.sub_type as i32,
            consumer_id,
            request_id: 0,
            initial_position: Some(if options.earliest {
                WireInitial::Earliest
            } else {
                WireInitial::Latest
            } as i32),
            ..Default::default()
        });
        let rx = self.conn.register_consumer(consumer_id);
        self.conn.request(cmd).await?;
        let consumer = Consumer {
            conn: self.conn.clone(),
            consumer_id,
            rx,
            queue: Default::default(),
            receiver_queue: options.receiver_queue.max(2),
            delivered: 0,
            batches: HashMap::new(),
        };
        consumer.flow(consumer.receiver_queue)?;
        Ok(consumer)
    }

    pub async fn close(&self) {
        self.conn.close();
    }
}

#[derive(Debug, Clone)]
pub struct ProducerOptions {
    pub name: Option<String>,
    pub batching: bool,
    pub batch_max_messages: usize,
    pub batch_max_bytes: usize,
    pub batch_delay_ms: u64,
}

impl Default for ProducerOptions {
    fn default() -> Self {
        ProducerOptions {
            name: None,
            batching: false,
            batch_max_messages: 1000,
            batch_max_bytes: 128 * 1024,
            batch_delay_ms: 10,
        }
    }
}

type Receipt = oneshot::Sender<Result<MessageId, Error>>;

struct ProducerState {
    next_seq: u64,
    /// Sequence id of a sent entry -> the senders of its messages (one per batch index).
    pending: HashMap<u64, Vec<Receipt>>,
    batch: Vec<(BatchItem, Receipt)>,
    batch_bytes: usize,
    /// Set when the connection is gone: further sends fail at once.
    closed: bool,
}

struct ProducerInner {
    conn: Arc<Connection>,
    producer_id: u64,
    name: String,
    options: ProducerOptions,
    state: Mutex<ProducerState>,
}

impl ProducerInner {
    fn lock(&self) -> std::sync::MutexGuard<'_, ProducerState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn send_entry(
        &self,
        st: &mut ProducerState,
        metadata_fn: impl FnOnce(u64) -> MessageMetadata,
        payload: &[u8],
        num: i32,
        receipts: Vec<Receipt>,
    ) {
        if st.closed {
            for r in receipts {
                let _ = r.send(Err(Error::Closed));
            }
            return;
        }
        let seq = st.next_seq;
        st.next_seq += num as u64;
        let metadata = metadata_fn(seq);
        let pl = Payload::build(metadata, payload);
        let mut cmd = base(Type::Send);
        cmd.send = Some(CommandSend {
            producer_id: self.producer_id,
            sequence_id: seq,
            num_messages: Some(num),
            highest_sequence_id: Some(seq + num as u64 - 1),
            ..Default::default()
        });
        st.pending.insert(seq, receipts);
        if let Err(e) = self.conn.send_payload(&cmd, &pl.headers_and_payload) {
            if let Some(rs) = st.pending.remove(&seq) {
                for r in rs {
                    let _ = r.send(Err(e.clone()));
                }
            }
        }
    }

    fn flush_batch(&self) {
        let mut st = self.lock();
        if st.batch.is_empty() {
            return;
        }
        let items: Vec<(BatchItem, Receipt)> = std::mem::take(&mut st.batch);
        st.batch_bytes = 0;
        let (items, receipts): (Vec<BatchItem>, Vec<Receipt>) = items.into_iter().unzip();
        let payload = encode_batch(&items);
        let n = items.len() as i32;
        let name = self.name.clone();
        self.send_entry(
            &mut st,
            |seq| MessageMetadata {
                producer_name: name,
                sequence_id: seq,
                publish_time: now_ms(),
                num_messages_in_batch: Some(n),
                ..Default::default()
            },
            &payload,
            n,
            receipts,
        );
    }
}

/// Sends messages to one topic.
pub struct Producer {
    inner: Arc<ProducerInner>,
}

impl Producer {
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Queues a message and returns a future of its receipt: it resolves once
    /// the broker has stored the message durably.
    pub fn send_async(
        &self,
        msg: impl Into<OutgoingMessage>,
    ) -> impl std::future::Future<Output = Result<MessageId, Error>> + Send + 'static {
        let msg = msg.into();
        let (tx, rx) = oneshot::channel();
        let p = &self.inner;
        if p.options.batching {
            let flush = {
                let mut st = p.lock();
                let metadata = SingleMessageMetadata {
                    properties: kvs(&msg.properties),
                    partition_key: msg.key.clone(),
                    payload_size: msg.payload.len() as i32,
                    ..Default::default()
                };
                st.batch_bytes += msg.payload.len();
                st.batch.push((
                    BatchItem {
                        metadata,
                        payload: msg.payload,
                    },
                    tx,
                ));
                st.batch.len() >= p.options.batch_max_messages
                    || st.batch_bytes >= p.options.batch_max_bytes
            };
            if flush {
                p.flush_batch();
            }
        } else {
            let mut st = p.lock();
            let name = p.name.clone();
            let (key, properties) = (msg.key.clone(), kvs(&msg.properties));
            p.send_entry(
                &mut st,
                |seq| MessageMetadata {
                    producer_name: name,
                    sequence_id: seq,
                    publish_time: now_ms(),
                    partition_key: key,
                    properties,
                    ..Default::default()
                },
                &msg.payload,
                1,
                vec![tx],
            );
        }
        async move { rx.await.unwrap_or(Err(Error::Closed)) }
    }

    /// Sends a message and waits for its receipt.
    pub async fn send(&self, msg: impl Into<OutgoingMessage>) -> Result<MessageId, Error> {
        let f = self.send_async(msg);
        self.flush();
        f.await
    }

    /// Sends what is waiting in the current batch now.
    pub fn flush(&self) {
        self.inner.flush_batch();
    }

    pub async fn close(self) -> Result<(), Error> {
        self.flush();
        let mut cmd = base(Type::CloseProducer);
        cmd.close_producer = Some(CommandCloseProducer {
            producer_id: self.inner.producer_id,
            request_id: 0,
            ..Default::default()
        });
        self.inner.conn.request(cmd).await.map(|_| ())
    }
}

async fn receipt_loop(
    inner: std::sync::Weak<ProducerInner>,
    mut rx: mpsc::UnboundedReceiver<BaseCommand>,
) {
    while let Some(cmd) = rx.recv().await {
        let Some(p) = inner.upgrade() else { return };
        if let Some(r) = cmd.send_receipt {
            let receipts = p.lock().pending.remove(&r.sequence_id).unwrap_or_default();
            let id = r.message_id.as_ref().map(MessageId::from_data);
            let batched = receipts.len() > 1 || p.options.batching;
            for (i, s) in receipts.into_iter().enumerate() {
                let res = match id {
                    Some(mut id) => {
                        id.batch_index = if batched { i as i32 } else { -1 };
                        Ok(id)
                    }
                    None => Err(Error::Protocol("receipt without a message id".into())),
                };
                let _ = s.send(res);
            }
        } else if let Some(e) = cmd.send_error {
            let receipts = p.lock().pending.remove(&e.sequence_id).unwrap_or_default();
            for s in receipts {
                let _ = s.send(Err(Error::Server {
                    code: e.error,
                    message: e.message.clone(),
                }));
            }
        }
    }
    // Connection gone: every pending send has an unknown outcome.
    if let Some(p) = inner.upgrade() {
        let pending: Vec<_> = {
            let mut st = p.lock();
            st.closed = true;
            st.pending.drain().collect()
        };
        for (_, rs) in pending {
            for s in rs {
                let _ = s.send(Err(Error::Closed));
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubscriptionType {
    Exclusive = 0,
    Shared = 1,
}

#[derive(Debug, Clone)]
pub struct ConsumerOptions {
    pub sub_type: SubscriptionType,
    /// Start a new subscription at the earliest message (default: latest).
    pub earliest: bool,
    pub receiver_queue: u32,
}

impl Default for ConsumerOptions {
    fn default() -> Self {
        ConsumerOptions {
            sub_type: SubscriptionType::Exclusive,
            earliest: false,
            receiver_queue: 1000,
        }
    }
}

/// Receives messages of one subscription.
pub struct Consumer {
    conn: Arc<Connection>,
    consumer_id: u64,
    rx: mpsc::UnboundedReceiver<(BaseCommand, Option<Payload>)>,
    queue: std::collections::VecDeque<Message>,
    receiver_queue: u32,
    delivered: u32,
    /// Batched entries with messages not yet acked: (ledger, entry) -> remaining.
    batches: HashMap<(u64, u64), u32>,
}

impl Consumer {
    fn flow(&self, permits: u32) -> Result<(), Error> {
        let mut cmd = base(Type::Flow);
        cmd.flow = Some(CommandFlow {
            consumer_id: self.consumer_id,
            message_permits: permits,
        });
        self.conn.send(&cmd)
    }

    fn unpack(&mut self, cmd: BaseCommand, payload: Option<Payload>) -> Result<(), Error> {
        let (Some(m), Some(pl)) = (cmd.message, payload) else {
            return Ok(());
        };
        let md = &pl.metadata;
        let mut id = MessageId::from_data(&m.message_id);
        let redelivery_count = m.redelivery_count.unwrap_or(0);
        match md.num_messages_in_batch {
            Some(n) => {
                let items = decode_batch(pl.payload(), n.max(0) as usize)
                    .map_err(|e| Error::Protocol(e.to_string()))?;
                self.batches
                    .insert((id.ledger_id, id.entry_id), items.len() as u32);
                for (i, item) in items.into_iter().enumerate() {
                    id.batch_index = i as i32;
                    self.queue.push_back(Message {
                        id,
                        payload: item.payload,
                        key: item.metadata.partition_key,
                        properties: props(&item.metadata.properties),
                        publish_time_ms: md.publish_time,
                        redelivery_count,
                        batch_size: n as u32,
                    });
                }
            }
            None => self.queue.push_back(Message {
                id,
                payload: pl.payload(),
                key: md.partition_key.clone(),
                properties: props(&md.properties),
                publish_time_ms: md.publish_time,
                redelivery_count,
                batch_size: 0,
            }),
        }
        Ok(())
    }

    /// The next message, waiting as long as it takes.
    pub async fn receive(&mut self) -> Result<Message, Error> {
        loop {
            if let Some(m) = self.queue.pop_front() {
                self.delivered += 1;
                if self.delivered >= self.receiver_queue / 2 {
                    self.flow(self.delivered)?;
                    self.delivered = 0;
                }
                return Ok(m);
            }
            let (cmd, payload) = self.rx.recv().await.ok_or(Error::Closed)?;
            self.unpack(cmd, payload)?;
        }
    }

    /// `receive` with a timeout; `Ok(None)` when nothing came in time.
    pub async fn receive_timeout(&mut self, timeout: Duration) -> Result<Option<Message>, Error> {
        match tokio::time::timeout(timeout, self.receive()).await {
            Ok(r) => r.map(Some),
            Err(_) => Ok(None),
        }
    }

    fn send_ack(&self, id: MessageId, ack_type: AckType) -> Result<(), Error> {
        let mut cmd = base(Type::Ack);
        let mut data = id.to_data();
        data.batch_index = None;
        cmd.ack = Some(CommandAck {
            consumer_id: self.consumer_id,
            ack_type: ack_type as i32,
            message_id: vec![data],
            ..Default::default()
        });
        self.conn.send(&cmd)
    }

    /// Acknowledges one message. Messages of a batch are acked to the broker
    /// together, when the last of them is acked.
    pub fn ack(&mut self, msg: &Message) -> Result<(), Error> {
        if msg.batch_size > 0 {
            let key = (msg.id.ledger_id, msg.id.entry_id);
            match self.batches.get_mut(&key) {
                Some(left) if *left > 1 => {
                    *left -= 1;
                    return Ok(());
                }
                _ => {
                    self.batches.remove(&key);
                }
            }
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
        self.batches
            .retain(|(l, e), _| (*l, *e) > (id.ledger_id, id.entry_id));
        self.send_ack(id, AckType::Cumulative)
    }

    /// Asks the broker to send every unacknowledged message again.
    pub fn redeliver_unacknowledged(&mut self) -> Result<(), Error> {
        self.queue.clear();
        let mut cmd = base(Type::RedeliverUnacknowledgedMessages);
        cmd.redeliver_unacknowledged_messages = Some(CommandRedeliverUnacknowledgedMessages {
            consumer_id: self.consumer_id,
            ..Default::default()
        });
        self.conn.send(&cmd)
    }

    /// Moves the subscription to `id` (re-delivering from there).
    pub async fn seek(&mut self, id: MessageId) -> Result<(), Error> {
        let mut cmd = base(Type::Seek);
        cmd.seek = Some(CommandSeek {
            consumer_id: self.consumer_id,
            request_id: 0,
            message_id: Some(id.to_data()),
            message_publish_time: None,
        });
        self.conn.request(cmd).await?;
        self.queue.clear();
        Ok(())
    }

    /// Moves the subscription to the first message published at or after
    /// `publish_time_ms`.
    pub async fn seek_time(&mut self, publish_time_ms: u64) -> Result<(), Error> {
        let mut cmd = base(Type::Seek);
        cmd.seek = Some(CommandSeek {
            consumer_id: self.consumer_id,
            request_id: 0,
            message_id: None,
            message_publish_time: Some(publish_time_ms),
        });
        self.conn.request(cmd).await?;
        self.queue.clear();
        Ok(())
    }

    /// The id of the last message stored in the topic (entry id `u64::MAX`,
    /// i.e. -1, when the topic is empty).
    pub async fn last_message_id(&self) -> Result<MessageId, Error> {
        let mut cmd = base(Type::GetLastMessageId);
        cmd.get_last_message_id = Some(magnetar_proto::pulsar::CommandGetLastMessageId {
            consumer_id: self.consumer_id,
            request_id: 0,
        });
        let resp = self.conn.request(cmd).await?;
        let r = resp
            .get_last_message_id_response
            .ok_or_else(|| Error::Protocol("no GET_LAST_MESSAGE_ID_RESPONSE".into()))?;
        Ok(MessageId::from_data(&r.last_message_id))
    }

    pub async fn close(self) -> Result<(), Error> {
        let mut cmd = base(Type::CloseConsumer);
        cmd.close_consumer = Some(CommandCloseConsumer {
            consumer_id: self.consumer_id,
            request_id: 0,
            ..Default::default()
        });
        self.conn.request(cmd).await.map(|_| ())
    }
}

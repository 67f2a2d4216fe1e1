//! A producer that follows its topic: a task looks the topic up, opens the
//! producer on the broker that serves it, and — when that connection ends
//! or the broker closes the producer (the topic moved) — does so again with
//! back-off, then sends every message still without a receipt again, in
//! sequence order. Sends made meanwhile wait in the pending queue.

pub(crate) mod builder;
pub(crate) mod partitioned;
pub(crate) mod state;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use magnetar_proto::frame::{base, encode_batch, BatchItem, DEFAULT_MAX_MESSAGE_BYTES};
use magnetar_proto::pulsar::{
    base_command::Type, BaseCommand, CommandCloseProducer, CommandProducer, CommandSend,
    MessageMetadata, SingleMessageMetadata,
};
use magnetar_proto::Payload;
use tokio::sync::{mpsc, oneshot, Notify};

use crate::backoff::Backoff;
use crate::compression::Compression;
use crate::pool::Pool;
use crate::schema::Schema;
use crate::{now_ms, Connection, Error, MessageId, OutgoingMessage};
pub use partitioned::HashingScheme;
use partitioned::Router;
use state::{ProducerState, ReceiptOutcome};

/// Every setting of a producer (the builder sets them one by one).
#[derive(Debug, Clone)]
pub struct ProducerOptions {
    /// The producer's name; the broker picks one if not given.
    pub name: Option<String>,
    /// Group messages into batches (one entry, one receipt).
    pub batching: bool,
    /// Most messages in a batch.
    pub batch_max_messages: usize,
    /// Most payload bytes in a batch.
    pub batch_max_bytes: usize,
    /// A batch is sent at the latest this long after its first message.
    pub batch_delay_ms: u64,
    /// A message without a receipt after this long fails with `Timeout`.
    pub send_timeout_ms: u64,
    /// How long `create_producer` keeps retrying while the topic is moving.
    pub operation_timeout_ms: u64,
    /// Whether other producers may write the topic too (Pulsar's access
    /// modes).
    pub access_mode: AccessMode,
    /// How entries (single messages and whole batches) are compressed.
    pub compression: Compression,
    /// How a key picks its partition on a partitioned topic.
    pub hashing_scheme: HashingScheme,
    /// At most this many messages wait for receipts (per partition); a
    /// send beyond it fails with `ProducerQueueFull`.
    pub max_pending_messages: usize,
    /// The schema registered with the topic (raw bytes: none).
    pub schema: Schema,
    /// Split a message larger than the broker takes into chunks (consumers
    /// join them); without it such a message fails with `MessageTooBig`.
    pub chunking: bool,
    /// Chunk size (default: the broker's maximum message size).
    pub chunk_max_bytes: Option<usize>,
    /// How batched messages are grouped.
    pub batching_type: BatchingType,
}

/// A producer's access to its topic (Pulsar's `ProducerAccessMode`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum AccessMode {
    /// Any number of producers.
    #[default]
    Shared,
    /// The only producer; refused (ProducerBusy) while another is there.
    Exclusive,
    /// The only producer; `create_producer` waits until the others left.
    WaitForExclusive,
    /// The only producer; the others are closed (and fenced).
    ExclusiveWithFencing,
}

impl Default for ProducerOptions {
    fn default() -> Self {
        ProducerOptions {
            name: None,
            batching: false,
            batch_max_messages: 1000,
            batch_max_bytes: 128 * 1024,
            batch_delay_ms: 10,
            send_timeout_ms: 30_000,
            operation_timeout_ms: 30_000,
            access_mode: AccessMode::Shared,
            compression: Compression::None,
            hashing_scheme: HashingScheme::JavaStringHash,
            max_pending_messages: 10_000,
            schema: Schema::Bytes,
            chunking: false,
            chunk_max_bytes: None,
            batching_type: BatchingType::Default,
        }
    }
}

/// Where a message's outcome goes, holding the client memory its payload
/// takes until then.
pub(crate) struct Receipt {
    tx: oneshot::Sender<Result<MessageId, Error>>,
    _memory: Option<crate::memory::Reservation>,
}

impl Receipt {
    fn send(self, r: Result<MessageId, Error>) -> Result<(), Result<MessageId, Error>> {
        self.tx.send(r)
    }
}

struct Shared {
    state: ProducerState<Receipt>,
    batch: Vec<(BatchItem, Receipt)>,
    batch_bytes: usize,
    /// The connection the producer is open on, if it is now.
    conn: Option<Arc<Connection>>,
    /// Set once the producer is closed or failed for good.
    closed: Option<Error>,
    /// The broker-assigned name, kept across reconnects.
    name: Option<String>,
    /// The topic epoch an exclusive producer is bound to.
    topic_epoch: Option<u64>,
    /// The version of the producer's schema, which its messages name.
    schema_version: Option<bytes::Bytes>,
}

pub(crate) struct ProducerInner {
    pool: Arc<Pool>,
    topic: String,
    producer_id: u64,
    options: ProducerOptions,
    /// The broker's largest message (from its CONNECTED).
    max_message: AtomicUsize,
    shared: Mutex<Shared>,
    closing: Notify,
}

/// How messages are grouped into batches.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum BatchingType {
    /// One batch of whatever was sent meanwhile.
    #[default]
    Default,
    /// A batch per key, carrying the key, so that Key_Shared subscriptions
    /// can give every batch to the consumer of its key.
    KeyBased,
}

/// A message waiting in a batch, with where its outcome goes.
type Batched = (BatchItem, Receipt);

/// Batched messages grouped by key, groups in the order their keys first
/// came (the order within a key kept).
fn by_key(items: Vec<Batched>) -> Vec<(Option<String>, Vec<Batched>)> {
    let mut groups: Vec<(Option<String>, Vec<Batched>)> = Vec::new();
    for it in items {
        let key = it.0.metadata.partition_key.clone();
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, g)) => g.push(it),
            None => groups.push((key, vec![it])),
        }
    }
    groups
}

/// Room kept in an entry for its metadata and headers besides the payload.
const CHUNK_HEADROOM: usize = 4096;

fn send_cmd(producer_id: u64, seq: u64, n: u32, is_chunk: bool) -> BaseCommand {
    let mut cmd = base(Type::Send);
    cmd.send = Some(CommandSend {
        producer_id,
        sequence_id: seq,
        num_messages: Some(n as i32),
        highest_sequence_id: Some(seq + n.max(1) as u64 - 1),
        is_chunk: is_chunk.then_some(true),
        ..Default::default()
    });
    cmd
}

fn close_cmd(producer_id: u64) -> BaseCommand {
    let mut cmd = base(Type::CloseProducer);
    cmd.close_producer = Some(CommandCloseProducer {
        producer_id,
        request_id: 0,
        ..Default::default()
    });
    cmd
}

impl ProducerInner {
    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues an entry (a message or a batch) and sends it if connected.
    fn enqueue(
        &self,
        sh: &mut Shared,
        n: u32,
        metadata_for: impl FnOnce(u64, String) -> MessageMetadata,
        payload: &[u8],
        waiters: Vec<Receipt>,
    ) {
        if let Some(e) = &sh.closed {
            for w in waiters {
                let _ = w.send(Err(e.clone()));
            }
            return;
        }
        let name = sh.name.clone().unwrap_or_default();
        let compression = self.options.compression;
        let schema_version = sh.schema_version.clone();
        let compressed;
        let body: &[u8] = match compression {
            Compression::None => payload,
            c => match c.compress(payload) {
                Ok(z) => {
                    compressed = z;
                    &compressed
                }
                Err(e) => {
                    for w in waiters {
                        let _ = w.send(Err(e.clone()));
                    }
                    return;
                }
            },
        };
        let mut md = metadata_for(sh.state.next_seq(), name);
        md.schema_version = schema_version;
        if compression != Compression::None {
            md.compression = Some(compression.wire() as i32);
            md.uncompressed_size = Some(payload.len() as u32);
        }
        // What the broker takes, with room for the metadata and headers.
        let limit = self.max_message.load(Ordering::Relaxed);
        let headroom = CHUNK_HEADROOM
            + md.properties
                .iter()
                .map(|kv| kv.key.len() + kv.value.len() + 8)
                .sum::<usize>()
            + md.partition_key.as_ref().map_or(0, |k| k.len());
        let room = limit.saturating_sub(headroom).max(1);
        let chunk_size = self.options.chunk_max_bytes.map_or(room, |n| n.min(room));
        if body.len() > chunk_size && (n == 1 && md.num_messages_in_batch.is_none()) {
            if !self.options.chunking {
                if body.len() + headroom > limit {
                    for w in waiters {
                        let _ = w.send(Err(Error::MessageTooBig {
                            size: body.len(),
                            limit,
                        }));
                    }
                    return;
                }
            } else {
                self.enqueue_chunks(sh, md, body, chunk_size, waiters);
                return;
            }
        }
        let (seq, stored) = sh.state.push(
            n,
            |seq| {
                md.sequence_id = seq;
                Payload::build(md, body).headers_and_payload
            },
            waiters,
            Instant::now(),
        );
        if let Some(c) = &sh.conn {
            // A failed send is noticed by the task, which resends it.
            let _ = c.send_payload(&send_cmd(self.producer_id, seq, n, false), &stored);
        }
    }

    /// A message too big for one entry, as chunks: consecutive entries of
    /// their own sequence ids naming the message (`uuid`), their place and
    /// the whole size; its receipt is the last chunk's.
    fn enqueue_chunks(
        &self,
        sh: &mut Shared,
        md: MessageMetadata,
        body: &[u8],
        chunk_size: usize,
        waiters: Vec<Receipt>,
    ) {
        let parts: Vec<&[u8]> = body.chunks(chunk_size).collect();
        let num_chunks = parts.len() as i32;
        let uuid = format!("{}-{}", md.producer_name, sh.state.next_seq());
        let mut waiters = Some(waiters);
        for (i, part) in parts.into_iter().enumerate() {
            let last = i as i32 == num_chunks - 1;
            let mut m = md.clone();
            m.uuid = Some(uuid.clone());
            m.chunk_id = Some(i as i32);
            m.num_chunks_from_msg = Some(num_chunks);
            m.total_chunk_msg_size = Some(body.len() as i32);
            let w = if last {
                waiters.take().unwrap_or_default()
            } else {
                Vec::new()
            };
            let (seq, stored) = sh.state.push(
                1,
                |seq| {
                    m.sequence_id = seq;
                    Payload::build(m, part).headers_and_payload
                },
                w,
                Instant::now(),
            );
            if let Some(c) = &sh.conn {
                let _ = c.send_payload(&send_cmd(self.producer_id, seq, 1, true), &stored);
            }
        }
    }

    fn flush_batch(&self) {
        let mut sh = self.lock();
        self.flush_locked(&mut sh);
    }

    /// Sends the current batch (one per key with key-based batching).
    fn flush_locked(&self, sh: &mut Shared) {
        if sh.batch.is_empty() {
            return;
        }
        let items = std::mem::take(&mut sh.batch);
        sh.batch_bytes = 0;
        let groups = match self.options.batching_type {
            BatchingType::Default => vec![(None, items)],
            BatchingType::KeyBased => by_key(items),
        };
        for (key, items) in groups {
            let (items, waiters): (Vec<BatchItem>, Vec<Receipt>) = items.into_iter().unzip();
            let payload = encode_batch(&items);
            let n = items.len() as u32;
            self.enqueue(
                sh,
                n,
                |seq, name| MessageMetadata {
                    producer_name: name,
                    sequence_id: seq,
                    publish_time: now_ms(),
                    num_messages_in_batch: Some(n as i32),
                    // A batch of one key is dispatched by it (Key_Shared).
                    partition_key: key,
                    ..Default::default()
                },
                &payload,
                waiters,
            );
        }
    }

    /// Opens the producer on the broker serving the topic (or on `hint`)
    /// and sends what is pending again. Returns the producer's route.
    async fn open(
        &self,
        hint: Option<&str>,
    ) -> Result<mpsc::UnboundedReceiver<BaseCommand>, Error> {
        let conn = self.pool.for_topic(&self.topic, hint).await?;
        let routes = conn.register_producer(self.producer_id);
        let mut cmd = base(Type::Producer);
        let name = self.lock().name.clone().or(self.options.name.clone());
        cmd.producer = Some(CommandProducer {
            topic: self.topic.clone(),
            producer_id: self.producer_id,
            request_id: 0,
            producer_name: name,
            producer_access_mode: Some(self.options.access_mode as i32),
            topic_epoch: self.lock().topic_epoch,
            schema: self.options.schema.wire(&self.topic),
            ..Default::default()
        });
        let resp = match conn.request(cmd).await {
            Ok(r) => r,
            Err(e) => {
                conn.unregister_producer(self.producer_id);
                return Err(e);
            }
        };
        let Some(ok) = resp.producer_success else {
            conn.unregister_producer(self.producer_id);
            return Err(Error::Protocol("no PRODUCER_SUCCESS".into()));
        };
        self.max_message
            .store(conn.max_message_size, Ordering::Relaxed);
        let mut sh = self.lock();
        sh.name = Some(ok.producer_name);
        if ok.schema_version.is_some() {
            sh.schema_version = ok.schema_version;
        }
        sh.state.resume_after(ok.last_sequence_id.unwrap_or(-1));
        if ok.topic_epoch.is_some() {
            sh.topic_epoch = ok.topic_epoch;
        }
        for p in sh.state.to_resend() {
            let _ = conn.send_payload(
                &send_cmd(self.producer_id, p.sequence_id, p.messages, false),
                &p.payload,
            );
        }
        sh.conn = Some(conn);
        Ok(routes)
    }

    /// Opens the producer, retrying retriable failures until `deadline`.
    async fn open_until(
        &self,
        hint: Option<String>,
        deadline: Option<tokio::time::Instant>,
        backoff: &mut Backoff,
    ) -> Result<mpsc::UnboundedReceiver<BaseCommand>, Error> {
        let mut hint = hint;
        loop {
            match self.open(hint.take().as_deref()).await {
                Ok(r) => {
                    backoff.reset();
                    return Ok(r);
                }
                Err(e) if e.is_retriable() => {
                    let delay = backoff.next_delay();
                    if deadline.is_some_and(|d| tokio::time::Instant::now() + delay > d) {
                        return Err(e);
                    }
                    tracing::debug!(topic = %self.topic, error = %e, ?delay, "producer not open yet; retrying");
                    tokio::time::sleep(delay).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn receipt(&self, cmd: BaseCommand) -> bool {
        let mut sh = self.lock();
        if let Some(r) = cmd.send_receipt {
            let (outcome, p) = sh.state.receipt(r.sequence_id);
            drop(sh);
            if let Some(p) = p {
                let batched = p.waiters.len() > 1 || self.options.batching;
                let id = r.message_id.as_ref().map(MessageId::from_data);
                for (i, w) in p.waiters.into_iter().enumerate() {
                    let res = match id {
                        Some(mut id) => {
                            id.batch_index = if batched { i as i32 } else { -1 };
                            Ok(id)
                        }
                        None => Err(Error::Protocol("receipt without a message id".into())),
                    };
                    let _ = w.send(res);
                }
            }
            return outcome != ReceiptOutcome::OutOfOrder;
        }
        if let Some(e) = cmd.send_error {
            if let Some(p) = sh.state.failed(e.sequence_id) {
                for w in p.waiters {
                    let _ = w.send(Err(Error::Server {
                        code: e.error,
                        message: e.message.clone(),
                    }));
                }
            }
        }
        true
    }

    fn expire(&self) {
        let timeout = Duration::from_millis(self.options.send_timeout_ms.max(1));
        let gone = self.lock().state.expired(Instant::now(), timeout);
        for p in gone {
            for w in p.waiters {
                let _ = w.send(Err(Error::Timeout));
            }
        }
    }

    fn fail_all(&self, e: Error) {
        let pending = {
            let mut sh = self.lock();
            sh.closed = Some(e.clone());
            sh.conn = None;
            let mut all: Vec<Receipt> = sh.batch.drain(..).map(|(_, r)| r).collect();
            for p in sh.state.drain() {
                all.extend(p.waiters);
            }
            all
        };
        for w in pending {
            let _ = w.send(Err(e.clone()));
        }
    }
}

/// The producer's task: serve the route while connected; reconnect when the
/// connection ends or the broker closes the producer.
async fn run(inner: Arc<ProducerInner>, mut routes: mpsc::UnboundedReceiver<BaseCommand>) {
    let mut backoff = Backoff::default();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        // Connected: receipts until the route ends.
        let hint = loop {
            tokio::select! {
                cmd = routes.recv() => match cmd {
                    None => break None,
                    Some(c) if c.close_producer.is_some() => {
                        break c.close_producer.and_then(|c| {
                        inner.pool.pick(c.assigned_broker_service_url, c.assigned_broker_service_url_tls)
                    });
                    }
                    Some(c) => {
                        if !inner.receipt(c) {
                            tracing::warn!(topic = %inner.topic, "receipts out of order; reconnecting");
                            if let Some(conn) = inner.lock().conn.clone() {
                                // Closed on the broker first: the reconnect
                                // may come over this same connection.
                                let _ = conn.send(&close_cmd(inner.producer_id));
                                conn.unregister_producer(inner.producer_id);
                            }
                            break None;
                        }
                    }
                },
                _ = tick.tick() => inner.expire(),
                _ = inner.closing.notified() => return,
            }
        };
        let moved = hint.is_some();
        inner.lock().conn = None;
        tracing::debug!(topic = %inner.topic, assigned = ?hint, "producer disconnected; reconnecting");
        if !moved {
            tokio::time::sleep(backoff.next_delay()).await;
        }
        // One attempt runs to its end while sends time out meanwhile
        // (cancelling it would send PRODUCER again under the same id).
        let open = inner.open_until(hint, None, &mut backoff);
        tokio::pin!(open);
        loop {
            tokio::select! {
                r = &mut open => match r {
                    Ok(r) => {
                        routes = r;
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(topic = %inner.topic, error = %e, "producer cannot reconnect");
                        inner.fail_all(e);
                        return;
                    }
                },
                _ = tick.tick() => inner.expire(),
                _ = inner.closing.notified() => return,
            }
        }
    }
}

/// The receipt of a message sent with [`Producer::send_async`]: resolves to
/// the message's id once the broker has stored it.
#[must_use = "the message is sent either way; the future tells whether it was stored"]
pub struct SendFuture {
    rx: oneshot::Receiver<Result<MessageId, Error>>,
    partition: Option<u32>,
}

impl std::future::Future for SendFuture {
    type Output = Result<MessageId, Error>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let partition = self.partition;
        std::pin::Pin::new(&mut self.rx).poll(cx).map(|r| {
            let mut id = r.unwrap_or(Err(Error::Closed))?;
            if let Some(p) = partition {
                id.partition = p as i32;
            }
            Ok(id)
        })
    }
}

/// The producer of one topic or partition: its state and its tasks.
struct Part {
    inner: Arc<ProducerInner>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Part {
    async fn create(
        pool: Arc<Pool>,
        topic: String,
        producer_id: u64,
        options: ProducerOptions,
    ) -> Result<Part, Error> {
        let inner = Arc::new(ProducerInner {
            pool,
            topic,
            producer_id,
            shared: Mutex::new(Shared {
                state: ProducerState::new(0),
                batch: Vec::new(),
                batch_bytes: 0,
                conn: None,
                closed: None,
                name: None,
                topic_epoch: None,
                schema_version: None,
            }),
            options,
            max_message: AtomicUsize::new(DEFAULT_MAX_MESSAGE_BYTES),
            closing: Notify::new(),
        });
        let deadline =
            tokio::time::Instant::now() + Duration::from_millis(inner.options.operation_timeout_ms);
        let routes = inner
            .open_until(None, Some(deadline), &mut Backoff::default())
            .await?;
        let mut tasks = vec![tokio::spawn(run(inner.clone(), routes))];
        if inner.options.batching {
            let weak = Arc::downgrade(&inner);
            let every = Duration::from_millis(inner.options.batch_delay_ms.max(1));
            tasks.push(tokio::spawn(async move {
                loop {
                    tokio::time::sleep(every).await;
                    match weak.upgrade() {
                        Some(p) => p.flush_batch(),
                        None => return,
                    }
                }
            }));
        }
        Ok(Part { inner, tasks })
    }

    fn send(&self, msg: OutgoingMessage, tx: Receipt) {
        let p = &self.inner;
        // One lock per send.
        let mut sh = p.lock();
        if sh.state.messages() + sh.batch.len() >= p.options.max_pending_messages {
            let _ = tx.send(Err(Error::ProducerQueueFull));
            return;
        }
        // A message as big as a whole batch goes alone (after what is
        // batched before it, keeping the order).
        let alone = msg.payload.len() >= p.options.batch_max_bytes;
        if p.options.batching && alone {
            p.flush_locked(&mut sh);
        }
        if p.options.batching && msg.deliver_at_ms.is_none() && !alone {
            let metadata = SingleMessageMetadata {
                properties: magnetar_proto::commands::key_values(&msg.properties),
                partition_key: msg.key,
                payload_size: msg.payload.len() as i32,
                ..Default::default()
            };
            sh.batch_bytes += msg.payload.len();
            sh.batch.push((
                BatchItem {
                    metadata,
                    payload: msg.payload,
                },
                tx,
            ));
            if sh.batch.len() >= p.options.batch_max_messages
                || sh.batch_bytes >= p.options.batch_max_bytes
            {
                p.flush_locked(&mut sh);
            }
        } else {
            let (key, properties) = (
                msg.key,
                magnetar_proto::commands::key_values(&msg.properties),
            );
            p.enqueue(
                &mut sh,
                1,
                |seq, name| MessageMetadata {
                    producer_name: name,
                    sequence_id: seq,
                    publish_time: now_ms(),
                    partition_key: key,
                    properties,
                    deliver_at_time: msg.deliver_at_ms.map(|t| t as i64),
                    ..Default::default()
                },
                &msg.payload,
                vec![tx],
            );
        }
    }

    /// Flushes, waits (up to `deadline`) for the pending messages'
    /// receipts, and closes the producer on the broker.
    async fn close(&self, deadline: Instant) -> Result<(), Error> {
        self.inner.flush_batch();
        while !self.inner.lock().state.is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.inner.closing.notify_waiters();
        let conn = self.inner.lock().conn.take();
        self.inner.fail_all(Error::Closed);
        if let Some(conn) = conn {
            conn.request(close_cmd(self.inner.producer_id)).await?;
            conn.unregister_producer(self.inner.producer_id);
        }
        Ok(())
    }
}

impl Drop for Part {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Sends messages to one topic, following it from broker to broker. On a
/// partitioned topic it holds a producer per partition and routes each
/// message by its key (see [`HashingScheme`]) or round robin.
pub struct Producer {
    topic: String,
    parts: Vec<Part>,
    /// Set on a partitioned topic.
    router: Option<Mutex<Router>>,
    /// The client's memory limit, shared by its producers.
    memory: Option<Arc<crate::memory::MemoryLimit>>,
}

impl Producer {
    pub(crate) async fn create(
        pool: Arc<Pool>,
        topic: &str,
        ids: &AtomicU64,
        options: ProducerOptions,
        memory: Option<Arc<crate::memory::MemoryLimit>>,
    ) -> Result<Producer, Error> {
        let partitions = pool.partitions(topic).await?;
        if partitions == 0 {
            let id = ids.fetch_add(1, Ordering::Relaxed);
            let part = Part::create(pool, topic.to_string(), id, options).await?;
            return Ok(Producer {
                topic: topic.to_string(),
                parts: vec![part],
                router: None,
                memory,
            });
        }
        let creating = (0..partitions).map(|i| {
            let id = ids.fetch_add(1, Ordering::Relaxed);
            Part::create(
                pool.clone(),
                format!("{topic}-partition-{i}"),
                id,
                options.clone(),
            )
        });
        let parts = futures::future::try_join_all(creating).await?;
        let switch_ms = options.batching.then_some(options.batch_delay_ms);
        // Round robin starts somewhere different for each producer.
        let start = (now_ms() ^ ids.load(Ordering::Relaxed).wrapping_mul(0x9e37_79b9)) as u32;
        Ok(Producer {
            topic: topic.to_string(),
            parts,
            router: Some(Mutex::new(Router::new(
                options.hashing_scheme,
                partitions,
                start,
                switch_ms,
            ))),
            memory,
        })
    }

    /// The producer's name (of its first partition's producer, on a
    /// partitioned topic).
    pub fn name(&self) -> String {
        self.parts[0].inner.lock().name.clone().unwrap_or_default()
    }

    /// The topic written (the partitioned topic, not a partition).
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// How many partitions the topic has (0: not partitioned).
    pub fn partitions(&self) -> u32 {
        if self.router.is_some() {
            self.parts.len() as u32
        } else {
            0
        }
    }

    /// Messages sent and not yet acknowledged.
    pub fn pending(&self) -> usize {
        self.parts
            .iter()
            .map(|p| {
                let sh = p.inner.lock();
                sh.state.messages() + sh.batch.len()
            })
            .sum()
    }

    /// Queues a message and returns a future of its receipt: it resolves
    /// once the broker has stored the message durably (after reconnects if
    /// the topic moves meanwhile).
    pub fn send_async(&self, msg: impl Into<OutgoingMessage>) -> SendFuture {
        let msg = msg.into();
        let (tx, rx) = oneshot::channel();
        let memory = match &self.memory {
            Some(limit) => match limit.reserve(msg.payload.len()) {
                Some(r) => Some(r),
                None => {
                    let _ = tx.send(Err(Error::ProducerQueueFull));
                    return SendFuture {
                        rx,
                        partition: None,
                    };
                }
            },
            None => None,
        };
        let tx = Receipt {
            tx,
            _memory: memory,
        };
        let partition = self.router.as_ref().map(|r| {
            r.lock()
                .unwrap_or_else(|e| e.into_inner())
                .route(msg.key.as_deref(), now_ms())
        });
        self.parts[partition.unwrap_or(0) as usize].send(msg, tx);
        SendFuture { rx, partition }
    }

    /// Sends a message and waits for its receipt.
    pub async fn send(&self, msg: impl Into<OutgoingMessage>) -> Result<MessageId, Error> {
        let f = self.send_async(msg);
        self.flush();
        f.await
    }

    /// Sends what is waiting in the current batch now.
    pub fn flush(&self) {
        for p in &self.parts {
            p.inner.flush_batch();
        }
    }

    /// Flushes, waits (up to the send timeout) for the pending messages'
    /// receipts, and closes the producer on the broker.
    pub async fn close(self) -> Result<(), Error> {
        let timeout = self.parts[0].inner.options.send_timeout_ms;
        let deadline = Instant::now() + Duration::from_millis(timeout);
        let closing = self.parts.iter().map(|p| p.close(deadline));
        futures::future::try_join_all(closing).await.map(|_| ())
    }
}

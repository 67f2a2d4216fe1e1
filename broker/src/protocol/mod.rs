//! The Pulsar binary protocol: one task per client connection that reads
//! frames and routes each command to its handler (`handshake`, `lookup`,
//! `producer`, `consumer`). Everything the connection sends goes through
//! one bounded queue to its writer task.

pub mod codec;
pub mod connection;
pub mod consumer;
pub mod handshake;
pub mod lookup;
pub mod producer;
pub mod schema;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use magnetar_proto::commands::{self, Assigned};
use magnetar_proto::pulsar::BaseCommand;
use serde::Deserialize;
use tokio::sync::mpsc::error::TrySendError;

use crate::subscription::{ClientLink, ConnTx, SubscriptionHandle};
use crate::topic::{Topic, TopicRegistry};

/// Per-connection limits: what one client may have queued at the broker.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConnectionLimits {
    /// Largest message accepted (announced in CONNECTED).
    pub max_message_bytes: usize,
    /// Seconds without traffic before the broker pings; twice that closes.
    pub keepalive_secs: u64,
    /// Sends accepted and not yet answered; past it the broker stops
    /// reading the connection's socket until receipts go out.
    pub max_pending_sends: usize,
    /// Bytes of such sends.
    pub max_pending_send_bytes: usize,
    /// Frames queued for the connection's socket.
    pub write_queue_frames: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            max_message_bytes: magnetar_proto::frame::DEFAULT_MAX_MESSAGE_BYTES,
            keepalive_secs: 30,
            max_pending_sends: 1000,
            max_pending_send_bytes: 64 << 20,
            write_queue_frames: 8192,
        }
    }
}

/// What connections need from the rest of the broker.
pub struct ProtocolContext {
    pub topics: Arc<TopicRegistry>,
    pub limits: ConnectionLimits,
    next_id: AtomicU64,
    /// Turns true when every connection must end at once (a crash, in tests).
    pub stop: tokio::sync::watch::Receiver<bool>,
    /// Set: clients must CONNECT with a token this key signed.
    pub auth: Option<Arc<magnetar_proto::token::SecretKey>>,
}

impl ProtocolContext {
    pub fn new(
        topics: Arc<TopicRegistry>,
        limits: ConnectionLimits,
        stop: tokio::sync::watch::Receiver<bool>,
    ) -> ProtocolContext {
        ProtocolContext {
            topics,
            limits,
            stop,
            next_id: AtomicU64::new(1),
            auth: None,
        }
    }

    /// Token authentication with `key` (none: off).
    pub fn with_auth(mut self, key: Option<Arc<magnetar_proto::token::SecretKey>>) -> Self {
        self.auth = key;
        self
    }

    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }
}

pub struct ProducerSlot {
    pub topic: Arc<Topic>,
    pub name: String,
}

pub struct ConsumerSlot {
    pub topic: Arc<Topic>,
    pub sub: String,
    /// It reads the topic's compacted view.
    pub read_compacted: bool,
    pub handle: SubscriptionHandle,
}

/// A connection's state that topics and subscriptions also reach: its
/// outgoing queue and its producers and consumers (the broker may close
/// them from the topic's side).
pub struct ConnShared {
    pub id: u64,
    pub tx: ConnTx,
    producers: Mutex<HashMap<u64, Arc<ProducerSlot>>>,
    consumers: Mutex<HashMap<u64, Arc<ConsumerSlot>>>,
    /// Producer ids the broker closed: their late sends are dropped quietly
    /// (the client resends them wherever it reconnects).
    closed_producers: Mutex<HashSet<u64>>,
    /// Producer and consumer ids being created (their requests run on
    /// tasks of their own): a second request for one is refused.
    creating: Mutex<HashSet<(bool, u64)>>,
    closed: std::sync::atomic::AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl ConnShared {
    fn new(id: u64, tx: ConnTx) -> ConnShared {
        ConnShared {
            id,
            tx,
            producers: Mutex::default(),
            consumers: Mutex::default(),
            closed_producers: Mutex::default(),
            creating: Mutex::default(),
            closed: Default::default(),
        }
    }

    fn reserve(&self, producer: bool, id: u64) -> bool {
        let taken = if producer {
            lock(&self.producers).contains_key(&id)
        } else {
            lock(&self.consumers).contains_key(&id)
        };
        !taken && lock(&self.creating).insert((producer, id))
    }

    /// Claims a producer id for a creation; false if it is in use.
    pub fn reserve_producer(&self, id: u64) -> bool {
        self.reserve(true, id)
    }

    pub fn unreserve_producer(&self, id: u64) {
        lock(&self.creating).remove(&(true, id));
    }

    pub fn reserve_consumer(&self, id: u64) -> bool {
        self.reserve(false, id)
    }

    pub fn unreserve_consumer(&self, id: u64) {
        lock(&self.creating).remove(&(false, id));
    }

    /// The connection ended (creations still running undo themselves).
    pub fn mark_closed(&self) {
        self.closed.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Queues a frame without waiting; when the queue is full, a task waits
    /// for room (these are rare control frames, never the message flow).
    pub fn push(&self, frame: Bytes) {
        if let Err(TrySendError::Full(frame)) = self.tx.try_send(frame.into()) {
            let tx = self.tx.clone();
            tokio::spawn(async move {
                let _ = tx.send(frame).await;
            });
        }
    }

    /// Queues a command, waiting for room.
    pub async fn send(&self, cmd: &BaseCommand) {
        let _ = self.tx.send(commands::frame(cmd).into()).await;
    }

    pub fn producer(&self, id: u64) -> Option<Arc<ProducerSlot>> {
        lock(&self.producers).get(&id).cloned()
    }

    pub fn consumer(&self, id: u64) -> Option<Arc<ConsumerSlot>> {
        lock(&self.consumers).get(&id).cloned()
    }

    fn was_closed_by_broker(&self, producer_id: u64) -> bool {
        lock(&self.closed_producers).contains(&producer_id)
    }
}

impl ClientLink for ConnShared {
    fn close_producer(&self, producer_id: u64, assigned: &Assigned) {
        if lock(&self.producers).remove(&producer_id).is_some() {
            self.remember_closed_producer(producer_id);
            self.push(commands::frame(&commands::close_producer(
                producer_id,
                assigned,
            )));
        }
    }

    fn close_consumer(&self, consumer_id: u64, assigned: &Assigned) {
        if lock(&self.consumers).remove(&consumer_id).is_some() {
            self.push(commands::frame(&commands::close_consumer(
                consumer_id,
                assigned,
            )));
        }
    }
}

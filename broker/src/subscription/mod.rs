//! A subscription: one task per durable cursor that executes what its
//! dispatcher decides. It owns the cursor and the consumers' connections,
//! reads entries and sends them, batches cursor flushes, and on unload
//! persists the cursor and hands its consumers back to the topic.
//!
//! The decisions live in the I/O-free `Dispatcher` of the subscription's
//! type (`exclusive.rs`, `failover.rs`, `shared.rs`, `key_shared.rs`).

pub mod delayed_index;
pub mod dispatcher;
pub mod exclusive;
pub mod failover;
pub mod key_shared;
pub mod live;
pub mod redelivery;
pub mod shared;
#[cfg(test)]
mod testing;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use magnetar_proto::commands;
use magnetar_proto::pulsar::{command_subscribe::SubType, MessageMetadata, ServerError};
use magnetar_proto::Payload;
use tokio::sync::{mpsc, oneshot};

use crate::managed_ledger::compacted::CompactedView;
use crate::managed_ledger::cursor::{CursorState, EntryAck, Position};
use crate::managed_ledger::ManagedLedger;
use crate::BrokerError;
use delayed_index::DelayedIndex;
pub use dispatcher::{ConsumerInfo, ConsumerKey, Dispatcher, KeySharedSpec};
use dispatcher::{Delivery, EntrySource};
use redelivery::Unacked;

/// Messages and bytes a topic's subscriptions sent (for load reports and
/// statistics).
#[derive(Debug, Default)]
pub struct OutCounters {
    pub msgs: std::sync::atomic::AtomicU64,
    pub bytes: std::sync::atomic::AtomicU64,
}

/// A connection's outgoing frames (bounded: a slow client slows its senders).
pub type ConnTx = mpsc::Sender<magnetar_proto::frame::OutFrame>;

/// How often acknowledgements are made durable at most (they are batched).
pub const CURSOR_FLUSH_INTERVAL_MS: u64 = 100;
/// Events waiting for a subscription's task.
pub const SUBSCRIPTION_EVENT_QUEUE: usize = 1024;
/// Events a subscription takes before it dispatches again.
const EVENTS_PER_ROUND: usize = 256;

/// How the topic tells a client connection that the broker closed one of
/// its producers or consumers (so it forgets the id and sends the close).
pub trait ClientLink: Send + Sync {
    fn close_producer(&self, producer_id: u64, assigned: &commands::Assigned);
    fn close_consumer(&self, consumer_id: u64, assigned: &commands::Assigned);
}

pub enum SeekTarget {
    Position(Position),
    PublishTime(u64),
}

/// A consumer as the subscription task holds it.
pub struct ConsumerConn {
    pub info: ConsumerInfo,
    /// Reads the topic's compacted view up to its horizon.
    pub read_compacted: bool,
    pub tx: ConnTx,
    pub link: Arc<dyn ClientLink>,
}

pub enum SubEvent {
    AddConsumer {
        consumer: ConsumerConn,
        sub_type: SubType,
        reply: oneshot::Sender<Result<(), BrokerError>>,
    },
    RemoveConsumer {
        key: ConsumerKey,
        reply: Option<oneshot::Sender<()>>,
    },
    Flow {
        key: ConsumerKey,
        permits: u32,
    },
    Ack {
        acks: Vec<EntryAck>,
        cumulative: bool,
        /// For an ack receipt: answered once the ack is stored.
        reply: Option<oneshot::Sender<Result<(), BrokerError>>>,
    },
    Redeliver {
        key: ConsumerKey,
        positions: Option<Vec<Position>>,
    },
    Seek {
        target: SeekTarget,
        reply: oneshot::Sender<Result<(), BrokerError>>,
    },
    Unsubscribe {
        key: ConsumerKey,
        reply: oneshot::Sender<Result<(), BrokerError>>,
    },
    MarkDelete {
        reply: oneshot::Sender<Position>,
    },
    /// Admin: acknowledge the next `entries` unacknowledged entries.
    Skip {
        entries: u64,
        reply: oneshot::Sender<Result<(), BrokerError>>,
    },
    /// Admin: acknowledge everything published before `publish_time_ms`
    /// (everything, with `u64::MAX`: clear the backlog).
    Expire {
        publish_time_ms: u64,
        reply: oneshot::Sender<Result<(), BrokerError>>,
    },
    /// Admin: delete the subscription — refused while it has consumers,
    /// unless `force` (then they are disconnected).
    Delete {
        force: bool,
        reply: oneshot::Sender<Result<(), BrokerError>>,
    },
    /// An entry handed to the dead-letter topic was stored there (`ok`),
    /// or could not be.
    DeadLettered {
        position: Position,
        ok: bool,
    },
    /// A message of a non-persistent topic (live subscriptions only).
    Live {
        position: Position,
        data: Bytes,
    },
    /// Entries of the topic's delayed-delivery index whose time came: the
    /// subscription takes back those it passed by and still owes.
    DelayedDue(Arc<[Position]>),
    /// Admin: what the subscription holds now.
    Stats {
        reply: oneshot::Sender<SubStats>,
    },
    /// Unload: persist the cursor, stop, and hand back the consumers.
    Close {
        reply: oneshot::Sender<Vec<ConsumerConn>>,
    },
}

/// A subscription's state for the stats REST resources.
#[derive(Debug, Clone)]
pub struct SubStats {
    pub sub_type: SubType,
    pub durable: bool,
    /// Consumer names, in no order.
    pub consumers: Vec<String>,
    /// Entries after the mark-delete position not acknowledged yet.
    pub msg_backlog: u64,
    /// Entries delivered and not acknowledged.
    pub unacked: u64,
    /// Entries whose delivery time has not come.
    pub delayed: u64,
    /// Messages of a non-persistent topic no consumer could take.
    pub dropped: u64,
    pub mark_delete: Position,
    /// Entries acknowledged after the mark-delete position.
    pub acked_after_mark: u64,
    /// The first ranges of them (at most `STATS_RANGES`).
    pub acked_ranges: Vec<(Position, Position)>,
    /// Messages and bytes sent to its consumers, and messages sent again,
    /// since the subscription was loaded here.
    pub msgs_out: u64,
    pub bytes_out: u64,
    pub redelivered: u64,
}

/// Most acknowledged ranges a stats answer lists.
pub const STATS_RANGES: usize = 100;

/// A message for a dead-letter topic.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    pub payload: Bytes,
    pub key: Option<String>,
    pub properties: Vec<(String, String)>,
}

/// Where dead letters go: publishes a message to a topic, wherever it is
/// served.
pub trait DeadLetterSink: Send + Sync {
    fn publish(
        &self,
        topic: String,
        msg: DeadLetter,
    ) -> futures::future::BoxFuture<'static, Result<(), String>>;
}

/// When entries go to a dead-letter topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetterRule {
    /// Delivered at most this many times more than once.
    pub max_redeliver_count: u32,
    /// Default: `<topic>-<subscription>-DLQ`, as Pulsar's clients name it.
    pub topic: Option<String>,
}

/// The policies a subscription acts on (they change while it runs).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SubPolicy {
    pub dead_letter: Option<DeadLetterRule>,
    pub redelivery_backoff: Option<crate::ownership::namespaces::RedeliveryBackoff>,
}

/// What every subscription of a topic shares.
#[derive(Clone)]
pub struct SubContext {
    /// The topic's full name.
    pub topic: String,
    /// The topic's compacted view, when it has one.
    pub compacted: Arc<std::sync::RwLock<Option<Arc<CompactedView>>>>,
    pub out: Arc<OutCounters>,
    pub policy: tokio::sync::watch::Receiver<SubPolicy>,
    pub sink: Option<Arc<dyn DeadLetterSink>>,
    /// The topic's delayed-delivery index (shared by its subscriptions).
    pub delayed: Arc<DelayedIndex>,
}

#[derive(Clone)]
pub struct SubscriptionHandle {
    pub tx: mpsc::Sender<SubEvent>,
}

impl SubscriptionHandle {
    /// Sends an event that carries a reply channel and waits for the reply.
    pub async fn ask<T>(
        &self,
        event: impl FnOnce(oneshot::Sender<Result<T, BrokerError>>) -> SubEvent,
    ) -> Result<T, BrokerError> {
        let closed = || BrokerError::new(ServerError::ServiceNotReady, "subscription closed");
        let (reply, rx) = oneshot::channel();
        self.tx.send(event(reply)).await.map_err(|_| closed())?;
        rx.await.map_err(|_| closed())?
    }

    /// Sends an event without waiting for its effect (a closed subscription
    /// drops it: its consumers are being told to go elsewhere).
    pub async fn tell(&self, event: SubEvent) {
        let _ = self.tx.send(event).await;
    }
}

struct Sub {
    ctx: SubContext,
    /// Its consumers read the compacted view (set by the first consumer).
    read_compacted: bool,
    /// Its own queue, for the outcome of work it hands to other tasks.
    me: mpsc::WeakSender<SubEvent>,
    name: String,
    /// False for a reader's subscription: its cursor lives in memory only,
    /// and the subscription ends with its last consumer.
    durable: bool,
    ml: Arc<ManagedLedger>,
    out: Arc<OutCounters>,
    cursor: CursorState,
    dispatcher: Box<dyn Dispatcher>,
    consumers: HashMap<ConsumerKey, ConsumerConn>,
    dirty: bool,
    read_error: bool,
    /// Consumers told that a terminated topic has nothing more for them.
    told_end: HashSet<ConsumerKey>,
    /// Ack receipts to answer once the cursor is stored (end of the round).
    receipts: Vec<oneshot::Sender<Result<(), BrokerError>>>,
    /// Sent to consumers since loaded: messages, bytes, messages again.
    sent: [u64; 3],
}

/// What a dispatcher sees: the topic's confirmed entries and the cursor.
struct Source<'a> {
    ml: &'a ManagedLedger,
    cursor: &'a CursorState,
    last: Position,
    /// The compacted view, for a subscription that reads it.
    compacted: Option<&'a CompactedView>,
}

impl EntrySource for Source<'_> {
    fn at_or_after(&self, p: Position) -> Option<Position> {
        if let Some(v) = self.compacted.filter(|v| p <= v.horizon) {
            if let Some(q) = v.at_or_after(p) {
                return Some(q);
            }
            return self
                .ml
                .at_or_after(v.horizon.bump())
                .filter(|q| *q <= self.last);
        }
        self.ml.at_or_after(p).filter(|q| *q <= self.last)
    }
    fn is_acked(&self, p: Position) -> bool {
        self.cursor.is_acked(p)
    }
}

fn dispatcher_for(sub_type: SubType, unacked: Unacked, topic: &str) -> Box<dyn Dispatcher> {
    match sub_type {
        SubType::Shared => Box::new(shared::Shared::new(unacked)),
        SubType::KeyShared => Box::new(key_shared::KeyShared::new(unacked)),
        SubType::Failover => Box::new(failover::Failover::new(
            unacked,
            failover::partition_index(topic),
        )),
        _ => Box::new(exclusive::Exclusive::new(unacked)),
    }
}

/// Starts the task of a subscription whose cursor is at `cursor` (kept in
/// the cursor store when `durable`).
pub fn spawn(
    name: String,
    durable: bool,
    ml: Arc<ManagedLedger>,
    cursor: CursorState,
    ctx: SubContext,
) -> SubscriptionHandle {
    let (tx, rx) = mpsc::channel(SUBSCRIPTION_EVENT_QUEUE);
    let unacked = Unacked::new(cursor.mark_delete.bump());
    let sub = Sub {
        name,
        durable,
        ml,
        out: ctx.out.clone(),
        ctx,
        read_compacted: false,
        me: tx.downgrade(),
        cursor,
        dispatcher: dispatcher_for(SubType::Exclusive, unacked, ""),
        consumers: HashMap::new(),
        dirty: false,
        read_error: false,
        told_end: HashSet::new(),
        receipts: Vec::new(),
        sent: [0; 3],
    };
    tokio::spawn(sub.run(rx));
    SubscriptionHandle { tx }
}

impl Sub {
    async fn run(mut self, mut rx: mpsc::Receiver<SubEvent>) {
        let mut appends = self.ml.subscribe_appends();
        let mut flush = tokio::time::interval(Duration::from_millis(CURSOR_FLUSH_INTERVAL_MS));
        loop {
            tokio::select! {
                ev = rx.recv() => {
                    let mut next = ev;
                    // Take what else is waiting (acks come one per message)
                    // before dispatching once for all of it.
                    for taken in 0..EVENTS_PER_ROUND {
                        match next.take() {
                            Some(SubEvent::Close { reply }) => {
                                self.answer_receipts().await;
                                let _ = self.flush().await;
                                let _ = reply.send(self.consumers.into_values().collect());
                                return;
                            }
                            Some(ev) => {
                                if !self.handle(ev).await {
                                    return;
                                }
                            }
                            None => {
                                self.answer_receipts().await;
                                let _ = self.flush().await;
                                return;
                            }
                        }
                        if taken + 1 == EVENTS_PER_ROUND {
                            break;
                        }
                        match rx.try_recv() {
                            Ok(ev) => next = Some(ev),
                            Err(mpsc::error::TryRecvError::Empty) => break,
                            Err(mpsc::error::TryRecvError::Disconnected) => {}
                        }
                    }
                }
                r = appends.changed() => if r.is_err() { return },
                _ = delayed_due(self.dispatcher.unacked_ref().next_delayed()) => {}
                _ = flush.tick() => {
                    self.read_error = false;
                    let _ = self.flush().await;
                }
            }
            self.answer_receipts().await;
            self.dispatch().await;
        }
    }

    /// Stores the cursor if it changed; a failure is logged and retried at
    /// the next tick.
    async fn flush(&mut self) -> Result<(), BrokerError> {
        if !self.dirty || !self.durable {
            return Ok(());
        }
        match self.ml.persist_cursor(&self.name, &self.cursor).await {
            Ok(()) => {
                self.dirty = false;
                // Ledgers behind this cursor may now be deletable.
                let _ = self.ml.trim().await;
                Ok(())
            }
            Err(e) => {
                tracing::warn!(subscription = %self.name, error = %e, "could not persist cursor; will retry");
                Err(e.into())
            }
        }
    }

    /// Answers the ack receipts of this round once the acks are stored.
    async fn answer_receipts(&mut self) {
        if self.receipts.is_empty() {
            return;
        }
        let res = self.flush().await;
        for reply in self.receipts.drain(..) {
            let _ = reply.send(res.clone());
        }
    }

    fn stats(&self) -> SubStats {
        let md = self.cursor.mark_delete;
        let after = self.ml.entries_after(md);
        let acked = self.cursor.acked_entries();
        let unacked = self.dispatcher.unacked_ref();
        SubStats {
            sub_type: self.dispatcher.sub_type(),
            durable: self.durable,
            consumers: self
                .consumers
                .values()
                .map(|c| c.info.name.clone())
                .collect(),
            msg_backlog: after.saturating_sub(acked),
            unacked: unacked.pending().count() as u64,
            // Only Shared and Key_Shared pass entries by for the topic's index.
            delayed: unacked.delayed() as u64
                + if self.shares() {
                    self.ctx.delayed.len()
                } else {
                    0
                },
            dropped: 0,
            mark_delete: md,
            acked_after_mark: acked,
            acked_ranges: self.cursor.acked_ranges().take(STATS_RANGES).collect(),
            msgs_out: self.sent[0],
            bytes_out: self.sent[1],
            redelivered: self.sent[2],
        }
    }

    /// Whether consumers share its entries (Shared, Key_Shared): delayed
    /// delivery applies and cumulative acks do not.
    fn shares(&self) -> bool {
        matches!(
            self.dispatcher.sub_type(),
            SubType::Shared | SubType::KeyShared
        )
    }

    /// The compacted view, when this subscription reads it.
    fn view(&self) -> Option<Arc<CompactedView>> {
        if !self.read_compacted {
            return None;
        }
        self.ctx
            .compacted
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn add_consumer(&mut self, c: ConsumerConn, sub_type: SubType) -> Result<(), BrokerError> {
        if c.read_compacted {
            if matches!(sub_type, SubType::Shared | SubType::KeyShared) {
                return Err(BrokerError::new(
                    ServerError::NotAllowedError,
                    "read_compacted is for Exclusive and Failover subscriptions and readers",
                ));
            }
            self.read_compacted = true;
        }
        let now = Instant::now();
        if self.dispatcher.sub_type() != sub_type {
            if !self.consumers.is_empty() {
                return Err(BrokerError::new(
                    ServerError::ConsumerBusy,
                    "subscription is of another type",
                ));
            }
            let placeholder = dispatcher_for(SubType::Exclusive, Unacked::default(), "");
            let old = std::mem::replace(&mut self.dispatcher, placeholder);
            self.dispatcher = dispatcher_for(sub_type, old.into_unacked(), &self.ml.name);
        }
        let before = self.dispatcher.active_consumer();
        let key = c.info.key;
        self.dispatcher.add_consumer(c.info.clone(), now)?;
        self.consumers.insert(key, c);
        self.tell_active(before, Some(key));
        Ok(())
    }

    /// A terminated topic whose every entry was read: each consumer is
    /// told once (REACHED_END_OF_TOPIC), as Pulsar does.
    fn tell_end_of_topic(&mut self) {
        let Some(end) = self.ml.terminated() else {
            return;
        };
        if self.told_end.len() == self.consumers.len() {
            return;
        }
        let read_pos = self.dispatcher.unacked_ref().read_pos();
        if self.ml.at_or_after(read_pos).is_some_and(|p| p <= end) {
            return;
        }
        for (key, c) in &self.consumers {
            if self.told_end.contains(key) {
                continue;
            }
            let frame = commands::frame(&commands::reached_end_of_topic(key.1));
            if c.tx.try_send(frame.into()).is_ok() {
                self.told_end.insert(*key);
            }
        }
    }

    fn remove_consumer(&mut self, key: ConsumerKey) {
        self.told_end.remove(&key);
        let before = self.dispatcher.active_consumer();
        self.dispatcher.remove_consumer(key, Instant::now());
        self.consumers.remove(&key);
        self.tell_active(before, None);
    }

    /// Failover: when the active consumer changed from `before`, tells every
    /// consumer whether it is the active one; otherwise tells only `joined`
    /// (a consumer that just came) — as Pulsar does.
    fn tell_active(&self, before: Option<ConsumerKey>, joined: Option<ConsumerKey>) {
        if self.dispatcher.sub_type() != SubType::Failover {
            return;
        }
        let active = self.dispatcher.active_consumer();
        let tell: Vec<ConsumerKey> = if active != before {
            self.consumers.keys().copied().collect()
        } else {
            joined.into_iter().collect()
        };
        for key in tell {
            if let Some(c) = self.consumers.get(&key) {
                let frame = commands::frame(&commands::active_consumer_change(
                    key.1,
                    Some(key) == active,
                ));
                // A full queue drops the notice rather than stall the
                // subscription: it is advisory, and the next change repeats it.
                if c.tx.try_send(frame.into()).is_err() {
                    tracing::debug!(subscription = %self.name, consumer = ?key, "active-consumer notice not queued");
                }
            }
        }
    }

    /// Returns false when the subscription is gone.
    async fn handle(&mut self, ev: SubEvent) -> bool {
        match ev {
            SubEvent::AddConsumer {
                consumer,
                sub_type,
                reply,
            } => {
                let _ = reply.send(self.add_consumer(consumer, sub_type));
            }
            SubEvent::RemoveConsumer { key, reply } => {
                self.remove_consumer(key);
                let _ = self.flush().await;
                if let Some(r) = reply {
                    let _ = r.send(());
                }
                if !self.durable && self.consumers.is_empty() {
                    return false;
                }
            }
            SubEvent::DeadLettered { position, ok } => {
                if ok {
                    let _ = self.ack(&[EntryAck::whole(position)], false);
                } else {
                    // Parked a while, then tried again.
                    self.dispatcher
                        .unacked()
                        .delay(position, now_ms() + DEAD_LETTER_RETRY_MS);
                }
            }
            SubEvent::Stats { reply } => {
                let _ = reply.send(self.stats());
            }
            SubEvent::Live { .. } => {}
            SubEvent::DelayedDue(due) => {
                if self.shares() {
                    let cursor = &self.cursor;
                    self.dispatcher
                        .unacked()
                        .release_passed(&due, |p| cursor.is_acked(p));
                }
            }
            SubEvent::Flow { key, permits } => self.dispatcher.flow(key, permits),
            SubEvent::Ack {
                acks,
                cumulative,
                reply,
            } => {
                let res = self.ack(&acks, cumulative);
                match (reply, res) {
                    (Some(reply), Ok(())) => self.receipts.push(reply),
                    (Some(reply), Err(e)) => {
                        let _ = reply.send(Err(e));
                    }
                    (None, _) => {}
                }
            }
            SubEvent::Redeliver { key, positions } => {
                // With a back-off policy (not on Key_Shared: a later entry of
                // the key would overtake) what the consumer held waits.
                let keyed = self.dispatcher.sub_type() == SubType::KeyShared;
                let backoff = self
                    .ctx
                    .policy
                    .borrow()
                    .redelivery_backoff
                    .filter(|_| !keyed);
                let held: Vec<Position> = match backoff {
                    Some(_) => self
                        .dispatcher
                        .unacked_ref()
                        .pending()
                        .filter(|(p, c)| {
                            *c == key && positions.as_ref().is_none_or(|ps| ps.contains(p))
                        })
                        .map(|(p, _)| p)
                        .collect(),
                    None => Vec::new(),
                };
                self.dispatcher.redeliver(key, positions.as_deref());
                if let Some(b) = backoff {
                    let now = now_ms();
                    let unacked = self.dispatcher.unacked();
                    for p in held {
                        let n = unacked.count(p);
                        unacked.delay(p, now + b.delay_ms(n));
                    }
                }
            }
            SubEvent::Seek { target, reply } => {
                let res = self.seek(target).await;
                let _ = reply.send(res);
            }
            SubEvent::Unsubscribe { key, reply } => {
                if self.consumers.keys().any(|k| *k != key) {
                    let _ = reply.send(Err(BrokerError::new(
                        ServerError::ConsumerBusy,
                        "subscription has other consumers",
                    )));
                    return true;
                }
                let res = if self.durable {
                    self.ml
                        .delete_cursor(&self.name)
                        .await
                        .map_err(BrokerError::from)
                } else {
                    Ok(())
                };
                let ok = res.is_ok();
                let _ = reply.send(res);
                return !ok;
            }
            SubEvent::MarkDelete { reply } => {
                let _ = reply.send(self.cursor.mark_delete);
            }
            SubEvent::Skip { entries, reply } => {
                self.skip(entries);
                let _ = self.flush().await;
                let _ = reply.send(Ok(()));
            }
            SubEvent::Expire {
                publish_time_ms,
                reply,
            } => {
                let res = self.expire(publish_time_ms).await;
                let _ = self.flush().await;
                let _ = reply.send(res);
            }
            SubEvent::Delete { force, reply } => {
                if !self.consumers.is_empty() && !force {
                    let _ = reply.send(Err(BrokerError::new(
                        ServerError::ConsumerBusy,
                        "Subscription has active connected consumers",
                    )));
                    return true;
                }
                self.disconnect_all();
                let res = if self.durable {
                    self.ml
                        .delete_cursor(&self.name)
                        .await
                        .map_err(BrokerError::from)
                } else {
                    Ok(())
                };
                let ok = res.is_ok();
                let _ = reply.send(res);
                return !ok;
            }
            SubEvent::Close { .. } => {}
        }
        true
    }

    /// Acknowledges the next `n` unacknowledged entries after the
    /// mark-delete position.
    fn skip(&mut self, n: u64) {
        let last = self.ml.last_confirmed();
        let mut p = self.cursor.mark_delete;
        let mut skipped = Vec::new();
        while (skipped.len() as u64) < n {
            let Some(q) = self.ml.next_after(p).filter(|q| *q <= last) else {
                break;
            };
            if !self.cursor.is_acked(q) {
                skipped.push(EntryAck::whole(q));
            }
            p = q;
        }
        let _ = self.ack(&skipped, false);
    }

    /// Acknowledges every entry published before `publish_time_ms`.
    async fn expire(&mut self, publish_time_ms: u64) -> Result<(), BrokerError> {
        let last = self.ml.last_confirmed();
        let first_kept = if publish_time_ms == u64::MAX {
            last.bump()
        } else {
            self.ml.find_by_publish_time(publish_time_ms).await?
        };
        // The entry before the first kept one.
        let through = if first_kept.entry_id > 0 {
            Some(Position::new(first_kept.ledger_id, first_kept.entry_id - 1))
        } else {
            let mut p = self.cursor.mark_delete;
            let mut before = None;
            while let Some(q) = self
                .ml
                .next_after(p)
                .filter(|q| *q < first_kept && *q <= last)
            {
                before = Some(q);
                p = q;
            }
            before
        };
        if let Some(p) = through.filter(|p| *p > self.cursor.mark_delete) {
            self.ack_through(p);
        }
        Ok(())
    }

    /// Everything up to `p` is acknowledged (whatever the type).
    fn ack_through(&mut self, p: Position) {
        let changed = {
            let next = |q: Position| self.ml.next_after(q);
            self.cursor.ack_cumulative(p, &next)
        };
        self.dirty |= changed;
        self.dispatcher.acked_through(p);
    }

    /// Disconnects every consumer (they may subscribe again).
    fn disconnect_all(&mut self) {
        let keys: Vec<ConsumerKey> = self.consumers.keys().copied().collect();
        for key in keys {
            if let Some(c) = self.consumers.get(&key) {
                c.link.close_consumer(key.1, &commands::Assigned::default());
            }
            self.remove_consumer(key);
        }
    }

    fn ack(&mut self, acks: &[EntryAck], cumulative: bool) -> Result<(), BrokerError> {
        if cumulative && self.shares() {
            let sub_type = self.dispatcher.sub_type();
            // Pulsar drops it; with an ack receipt the client learns why.
            // The entries stay unacknowledged.
            tracing::warn!(subscription = %self.name, ?sub_type, "cumulative ack on a shared subscription refused");
            return Err(BrokerError::new(
                ServerError::NotAllowedError,
                format!("a cumulative ack is not allowed on a {sub_type:?} subscription"),
            ));
        }
        for a in acks {
            let changed = {
                let next = |q: Position| self.ml.next_after(q);
                if cumulative {
                    self.cursor.ack_cumulative_entry(a, &next)
                } else {
                    self.cursor.ack_entry(a, &next)
                }
            };
            self.dirty |= changed;
            let p = a.position;
            if cumulative {
                let through = if a.unacked.is_some() { p.prev() } else { p };
                self.dispatcher.acked_through(through);
            }
            // A partial batch ack leaves the entry with its consumer.
            if self.cursor.is_acked(p) {
                self.dispatcher.acked(p);
            }
        }
        Ok(())
    }

    async fn seek(&mut self, target: SeekTarget) -> Result<(), BrokerError> {
        let p = match target {
            SeekTarget::Position(p) => p,
            SeekTarget::PublishTime(t) => self.ml.find_by_publish_time(t).await?,
        };
        let start = if p.entry_id < 0 {
            p
        } else {
            Position::new(p.ledger_id, p.entry_id - 1)
        };
        let start = start.max(self.ml.before_first());
        self.cursor = CursorState::new(start);
        self.dispatcher.rewind(start.bump());
        self.dirty = true;
        let _ = self.flush().await;
        // As Pulsar does: the consumers are disconnected and subscribe
        // again, so nothing sent before the seek is mistaken for after.
        self.disconnect_all();
        Ok(())
    }

    async fn dispatch(&mut self) {
        if self.read_error {
            return;
        }
        let now = Instant::now();
        let epoch_ms = now_ms();
        // Through `unacked()` only when something is due: Key_Shared drops
        // how far it looked whenever its state is reached mutably.
        if self
            .dispatcher
            .unacked_ref()
            .next_delayed()
            .is_some_and(|at| at <= epoch_ms)
        {
            self.dispatcher.unacked().release_delayed(epoch_ms);
        }
        // Entries read to learn their keys, kept for sending in this round.
        let mut read: HashMap<Position, Bytes> = HashMap::new();
        loop {
            let next = {
                let view = self.view();
                let src = Source {
                    compacted: view.as_deref(),
                    ml: &self.ml,
                    cursor: &self.cursor,
                    last: self.ml.last_confirmed(),
                };
                self.dispatcher.next(&src, now)
            };
            let Some(d) = next else {
                // Key_Shared may be waiting for keys: read them, then try again.
                match self.learn_keys(&mut read).await {
                    Some(n) if n > 0 => continue,
                    _ => {
                        self.tell_end_of_topic();
                        return;
                    }
                }
            };
            let data = match read.remove(&d.position) {
                Some(data) => Ok(data),
                None => {
                    self.ml
                        .read_through(self.view().as_deref(), d.position)
                        .await
                }
            };
            let data = match data {
                Ok(data) => data,
                Err(e) => {
                    tracing::warn!(subscription = %self.name, position = ?d.position, error = %e, "read failed; will retry");
                    self.dispatcher.not_sent(d);
                    self.read_error = true;
                    return;
                }
            };
            let md = match Payload::peek_metadata(&data) {
                Ok(md) => md,
                Err(e) => {
                    tracing::error!(subscription = %self.name, position = ?d.position, error = %e, "stored entry does not parse; skipping it");
                    continue;
                }
            };
            // Redelivered too often: to the dead-letter topic instead.
            let rule = self.ctx.policy.borrow().dead_letter.clone();
            if let Some(rule) = rule.filter(|r| d.redelivery_count > r.max_redeliver_count) {
                if self.dead_letter(d.position, &rule, &data, &md) {
                    continue;
                }
            }
            // Delayed delivery (Shared and Key_Shared, as in Pulsar): an
            // entry whose time has not come waits in the dispatcher.
            if let Some(at) = md.deliver_at_time.filter(|at| *at > 0) {
                if self.shares() && at as u64 > now_ms() {
                    // Passed by: the topic's index tells when it is due.
                    self.dispatcher.unacked().pass_by(d.position);
                    self.ctx.delayed.insert(at as u64, d.position);
                    continue;
                }
            }
            let count = md.num_messages_in_batch.unwrap_or(1).max(1) as u32;
            if md.publish_time > 0 {
                let lag_ms = now_ms().saturating_sub(md.publish_time);
                DELIVERY_LAG.record(lag_ms as f64 / 1000.0);
            }
            self.send(d, count, &data).await;
        }
    }

    /// Reads the entries whose keys the dispatcher wants (Key_Shared) and
    /// tells it their slots; keeps what it read in `read`. How many it
    /// learned; `None` after a read failed (the round stops; the flush tick
    /// retries).
    async fn learn_keys(&mut self, read: &mut HashMap<Position, Bytes>) -> Option<usize> {
        let wanted = {
            let view = self.view();
            let src = Source {
                compacted: view.as_deref(),
                ml: &self.ml,
                cursor: &self.cursor,
                last: self.ml.last_confirmed(),
            };
            self.dispatcher.wants_keys(&src)
        };
        for &p in &wanted {
            let data = match self.ml.read_through(self.view().as_deref(), p).await {
                Ok(data) => data,
                Err(e) => {
                    tracing::warn!(subscription = %self.name, position = ?p, error = %e, "read failed; will retry");
                    self.read_error = true;
                    return None;
                }
            };
            self.dispatcher.learn_key(p, sticky_slot(&data));
            if read.len() < KEYS_KEPT_PER_ROUND {
                read.insert(p, data);
            }
        }
        Some(wanted.len())
    }

    /// Hands an entry to the dead-letter topic: it is parked (no consumer
    /// gets it) until stored there, then acknowledged; false when there is
    /// no way to send it (it is delivered as usual).
    fn dead_letter(
        &mut self,
        position: Position,
        rule: &DeadLetterRule,
        data: &Bytes,
        md: &MessageMetadata,
    ) -> bool {
        let (Some(sink), Some(me)) = (self.ctx.sink.clone(), self.me.upgrade()) else {
            return false;
        };
        let topic = rule
            .topic
            .clone()
            .unwrap_or_else(|| format!("{}-{}-DLQ", self.ctx.topic, self.name));
        let messages = match dead_letters(&self.ctx.topic, position, data, md) {
            Ok(m) => m,
            Err(e) => {
                tracing::error!(subscription = %self.name, ?position, error = %e, "an entry to dead-letter does not parse; acknowledging it");
                let _ = self.ack(&[EntryAck::whole(position)], false);
                return true;
            }
        };
        tracing::info!(subscription = %self.name, ?position, dead_letter_topic = %topic, "redelivered too often: moving to the dead-letter topic");
        self.dispatcher.unacked().delay(position, u64::MAX);
        tokio::spawn(async move {
            let mut ok = true;
            for m in messages {
                if let Err(e) = sink.publish(topic.clone(), m).await {
                    tracing::warn!(%topic, error = %e, "publishing a dead letter failed; will retry");
                    ok = false;
                    break;
                }
            }
            let _ = me.send(SubEvent::DeadLettered { position, ok }).await;
        });
        true
    }

    async fn send(&mut self, d: Delivery, count: u32, data: &Bytes) {
        let ack_set = self.cursor.unacked_in_batch(d.position).unwrap_or(&[]);
        let frame = commands::message(
            d.consumer.1,
            d.position.message_id(),
            d.redelivery_count,
            ack_set,
            data,
        );
        let sent = match self.consumers.get(&d.consumer) {
            Some(c) => c.tx.send(frame).await.is_ok(),
            None => false,
        };
        if sent {
            use std::sync::atomic::Ordering::Relaxed;
            self.out.msgs.fetch_add(count as u64, Relaxed);
            self.out.bytes.fetch_add(data.len() as u64, Relaxed);
            self.sent[0] += count as u64;
            self.sent[1] += data.len() as u64;
            if d.redelivery_count > 0 {
                self.sent[2] += count as u64;
            }
            self.dispatcher.sent(d, count);
        } else {
            // Connection gone; its removal event may still be on the way.
            self.dispatcher.not_sent(d);
            self.remove_consumer(d.consumer);
        }
    }
}

/// Registered once, on first use (after the recorder is installed).
static DELIVERY_LAG: std::sync::LazyLock<metrics::Histogram> =
    std::sync::LazyLock::new(|| metrics::histogram!(crate::metrics::DELIVERY_LAG));

/// How long a dead letter that could not be stored waits before a retry.
const DEAD_LETTER_RETRY_MS: u64 = 1_000;

/// The messages of a stored entry as dead letters (a batch gives one per
/// message), with Pulsar's `REAL_TOPIC` and `ORIGIN_MESSAGE_ID` properties.
fn dead_letters(
    topic: &str,
    position: Position,
    data: &Bytes,
    md: &MessageMetadata,
) -> Result<Vec<DeadLetter>, String> {
    let mut payload = Payload::parse(data.clone())
        .map_err(|e| e.to_string())?
        .payload();
    // Dead letters go out uncompressed (their producer's default).
    if let Some(code) = md.compression.filter(|c| *c != 0) {
        let codec = magnetar_client::Compression::from_wire(code)
            .ok_or_else(|| format!("unknown compression {code}"))?;
        payload = codec
            .decompress(payload, md.uncompressed_size.unwrap_or(0) as usize)
            .map_err(|e| e.to_string())?;
    }
    let origin = |batch: Option<usize>| {
        let mut id = format!("{}:{}:-1", position.ledger_id, position.entry_id);
        if let Some(i) = batch {
            id.push_str(&format!(":{i}"));
        }
        id
    };
    let props = |own: &[magnetar_proto::pulsar::KeyValue], batch: Option<usize>| {
        let mut p: Vec<(String, String)> = own
            .iter()
            .map(|kv| (kv.key.clone(), kv.value.clone()))
            .collect();
        p.push(("REAL_TOPIC".into(), topic.to_string()));
        p.push(("ORIGIN_MESSAGE_ID".into(), origin(batch)));
        p
    };
    match md.num_messages_in_batch {
        Some(n) => Ok(
            magnetar_proto::frame::decode_batch(payload, n.max(0) as usize)
                .map_err(|e| e.to_string())?
                .into_iter()
                .enumerate()
                .map(|(i, item)| DeadLetter {
                    key: item.metadata.partition_key.clone(),
                    properties: props(&item.metadata.properties, Some(i)),
                    payload: item.payload,
                })
                .collect(),
        ),
        None => Ok(vec![DeadLetter {
            key: md.partition_key.clone(),
            properties: props(&md.properties, None),
            payload,
        }]),
    }
}

/// Entries read for their keys kept for sending within one dispatch round.
const KEYS_KEPT_PER_ROUND: usize = 512;

/// The Key_Shared hash slot of a stored entry: of its ordering key, else its
/// partition key (base64-decoded when it says so), else `NONE_KEY` — as
/// Pulsar's `peekStickyKey`. An entry whose metadata does not parse counts
/// as keyless (it is skipped when sent).
pub fn sticky_slot(entry: &[u8]) -> u16 {
    use base64::Engine;
    use magnetar_proto::hash::{key_hash_slot, NONE_KEY};
    let Ok(md) = Payload::peek_metadata(entry) else {
        return key_hash_slot(NONE_KEY);
    };
    if let Some(k) = md.ordering_key.as_deref() {
        return key_hash_slot(k);
    }
    match md.partition_key.as_deref() {
        Some(k) if md.partition_key_b64_encoded == Some(true) => {
            match base64::engine::general_purpose::STANDARD.decode(k) {
                Ok(raw) => key_hash_slot(&raw),
                Err(_) => key_hash_slot(k.as_bytes()),
            }
        }
        Some(k) => key_hash_slot(k.as_bytes()),
        None => key_hash_slot(NONE_KEY),
    }
}

/// Milliseconds since the epoch (the clock of `deliver_at_time`).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Resolves when the delayed entry due at `at_ms` is due; never without one.
async fn delayed_due(at_ms: Option<u64>) {
    match at_ms {
        Some(at) => tokio::time::sleep(Duration::from_millis(at.saturating_sub(now_ms()))).await,
        None => std::future::pending().await,
    }
}

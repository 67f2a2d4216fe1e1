//! A subscription: one task per durable cursor that owns its state, its
//! consumers and their permits, and dispatches entries to them — to the one
//! consumer of an Exclusive subscription, round-robin over consumers with
//! permits for Shared.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use magnetar_proto::frame::{base, encode_payload_command};
use magnetar_proto::pulsar::{
    base_command::Type, command_subscribe::SubType, CommandMessage, MessageIdData, ServerError,
};
use magnetar_proto::Payload;
use tokio::sync::{mpsc, oneshot};

use crate::managed_ledger::cursor::{CursorState, Position};
use crate::managed_ledger::ManagedLedger;
use crate::BrokerError;

pub type ConnTx = mpsc::UnboundedSender<Bytes>;

/// How often acknowledgements are made durable at most (they are batched).
pub const CURSOR_FLUSH_INTERVAL_MS: u64 = 100;

pub enum SeekTarget {
    Position(Position),
    PublishTime(u64),
}

pub enum SubEvent {
    AddConsumer {
        consumer_id: u64,
        conn_id: u64,
        sub_type: SubType,
        tx: ConnTx,
        reply: oneshot::Sender<Result<(), BrokerError>>,
    },
    RemoveConsumer {
        consumer_id: u64,
        conn_id: u64,
        reply: Option<oneshot::Sender<()>>,
    },
    Flow {
        consumer_id: u64,
        conn_id: u64,
        permits: u32,
    },
    Ack {
        positions: Vec<Position>,
        cumulative: bool,
    },
    Redeliver {
        consumer_id: u64,
        conn_id: u64,
        positions: Option<Vec<Position>>,
    },
    Seek {
        target: SeekTarget,
        reply: oneshot::Sender<Result<(), BrokerError>>,
    },
    Unsubscribe {
        consumer_id: u64,
        conn_id: u64,
        reply: oneshot::Sender<Result<(), BrokerError>>,
    },
    MarkDelete {
        reply: oneshot::Sender<Position>,
    },
}

struct Consumer {
    consumer_id: u64,
    conn_id: u64,
    tx: ConnTx,
    permits: u32,
}

struct Sub {
    name: String,
    ml: Arc<ManagedLedger>,
    cursor: CursorState,
    sub_type: Option<SubType>,
    consumers: Vec<Consumer>,
    rr: usize,
    /// Next position to read for first delivery.
    read_pos: Position,
    /// Delivered and not yet acked: position -> (consumer, conn).
    pending: BTreeMap<Position, (u64, u64)>,
    redeliver: BTreeSet<Position>,
    redelivery_count: HashMap<Position, u32>,
    dirty: bool,
    read_error: bool,
}

#[derive(Clone)]
pub struct SubscriptionHandle {
    pub tx: mpsc::UnboundedSender<SubEvent>,
}

/// Starts the task of a subscription whose cursor is at `cursor`.
pub fn spawn(name: String, ml: Arc<ManagedLedger>, cursor: CursorState) -> SubscriptionHandle {
    let (tx, rx) = mpsc::unbounded_channel();
    let read_pos = cursor.mark_delete.bump();
    let sub = Sub {
        name,
        ml,
        cursor,
        sub_type: None,
        consumers: Vec::new(),
        rr: 0,
        read_pos,
        pending: BTreeMap::new(),
        redeliver: BTreeSet::new(),
        redelivery_count: HashMap::new(),
        dirty: false,
        read_error: false,
    };
    tokio::spawn(sub.run(rx));
    SubscriptionHandle { tx }
}

impl Sub {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<SubEvent>) {
        let mut appends = self.ml.subscribe_appends();
        let mut flush = tokio::time::interval(Duration::from_millis(CURSOR_FLUSH_INTERVAL_MS));
        loop {
            tokio::select! {
                ev = rx.recv() => match ev {
                    Some(ev) => {
                        if !self.handle(ev).await {
                            return;
                        }
                    }
                    None => {
                        self.flush().await;
                        return;
                    }
                },
                r = appends.changed() => if r.is_err() { return },
                _ = flush.tick() => {
                    self.read_error = false;
                    self.flush().await;
                }
            }
            self.dispatch().await;
        }
    }

    async fn flush(&mut self) {
        if !self.dirty {
            return;
        }
        match self.ml.persist_cursor(&self.name, &self.cursor).await {
            Ok(()) => {
                self.dirty = false;
                // Ledgers behind this cursor may now be deletable.
                let _ = self.ml.trim().await;
            }
            Err(e) => {
                tracing::warn!(subscription = %self.name, error = %e, "could not persist cursor; will retry")
            }
        }
    }

    /// Drops delivery bookkeeping for every position up to and including `p`.
    fn forget_through(&mut self, p: Position) {
        let later = self.pending.split_off(&p.bump());
        for q in std::mem::replace(&mut self.pending, later).into_keys() {
            self.redelivery_count.remove(&q);
        }
        let later = self.redeliver.split_off(&p.bump());
        for q in std::mem::replace(&mut self.redeliver, later) {
            self.redelivery_count.remove(&q);
        }
    }

    fn give_back(&mut self, consumer_id: u64, conn_id: u64) {
        let mine: Vec<Position> = self
            .pending
            .iter()
            .filter(|(_, c)| **c == (consumer_id, conn_id))
            .map(|(p, _)| *p)
            .collect();
        for p in mine {
            self.pending.remove(&p);
            self.redeliver.insert(p);
            *self.redelivery_count.entry(p).or_default() += 1;
        }
    }

    /// Returns false when the subscription is gone.
    async fn handle(&mut self, ev: SubEvent) -> bool {
        match ev {
            SubEvent::AddConsumer {
                consumer_id,
                conn_id,
                sub_type,
                tx,
                reply,
            } => {
                let busy = match (self.sub_type, sub_type) {
                    (_, _) if self.consumers.is_empty() => None,
                    (Some(SubType::Exclusive), _) => {
                        Some("Exclusive subscription already has a consumer")
                    }
                    (Some(cur), new) if cur != new => Some("subscription is of another type"),
                    _ => None,
                };
                if let Some(msg) = busy {
                    let _ = reply.send(Err(BrokerError::new(ServerError::ConsumerBusy, msg)));
                } else {
                    self.sub_type = Some(sub_type);
                    self.consumers.push(Consumer {
                        consumer_id,
                        conn_id,
                        tx,
                        permits: 0,
                    });
                    let _ = reply.send(Ok(()));
                }
            }
            SubEvent::RemoveConsumer {
                consumer_id,
                conn_id,
                reply,
            } => {
                self.consumers
                    .retain(|c| (c.consumer_id, c.conn_id) != (consumer_id, conn_id));
                self.give_back(consumer_id, conn_id);
                self.flush().await;
                if let Some(r) = reply {
                    let _ = r.send(());
                }
            }
            SubEvent::Flow {
                consumer_id,
                conn_id,
                permits,
            } => {
                if let Some(c) = self
                    .consumers
                    .iter_mut()
                    .find(|c| (c.consumer_id, c.conn_id) == (consumer_id, conn_id))
                {
                    c.permits = c.permits.saturating_add(permits);
                }
            }
            SubEvent::Ack {
                positions,
                cumulative,
            } => {
                for p in positions {
                    let changed = {
                        let next = |q: Position| self.ml.next_after(q);
                        if cumulative {
                            self.cursor.ack_cumulative(p, &next)
                        } else {
                            self.cursor.ack(p, &next)
                        }
                    };
                    self.dirty |= changed;
                    // Anything the mark-delete folded over was acked (and
                    // forgotten) earlier, so only `p` itself, or everything up
                    // to it for a cumulative ack, needs forgetting here.
                    if cumulative {
                        self.forget_through(p);
                    } else {
                        self.pending.remove(&p);
                        self.redeliver.remove(&p);
                        self.redelivery_count.remove(&p);
                    }
                }
            }
            SubEvent::Redeliver {
                consumer_id,
                conn_id,
                positions,
            } => match positions {
                Some(list) => {
                    for p in list {
                        if self.pending.get(&p) == Some(&(consumer_id, conn_id)) {
                            self.pending.remove(&p);
                            self.redeliver.insert(p);
                            *self.redelivery_count.entry(p).or_default() += 1;
                        }
                    }
                }
                None => self.give_back(consumer_id, conn_id),
            },
            SubEvent::Seek { target, reply } => {
                let res = match target {
                    SeekTarget::Position(p) => Ok(p),
                    SeekTarget::PublishTime(t) => {
                        self.ml.find_by_publish_time(t).await.map_err(|e| {
                            BrokerError::new(ServerError::PersistenceError, e.to_string())
                        })
                    }
                };
                match res {
                    Ok(p) => {
                        let start = if p.entry_id < 0 {
                            p
                        } else {
                            Position::new(p.ledger_id, p.entry_id - 1)
                        };
                        let start = start.max(self.ml.before_first());
                        self.cursor = CursorState::new(start);
                        self.read_pos = start.bump();
                        self.pending.clear();
                        self.redeliver.clear();
                        self.redelivery_count.clear();
                        self.dirty = true;
                        self.flush().await;
                        let _ = reply.send(Ok(()));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                }
            }
            SubEvent::Unsubscribe {
                consumer_id,
                conn_id,
                reply,
            } => {
                if self
                    .consumers
                    .iter()
                    .any(|c| (c.consumer_id, c.conn_id) != (consumer_id, conn_id))
                {
                    let _ = reply.send(Err(BrokerError::new(
                        ServerError::ConsumerBusy,
                        "subscription has other consumers",
                    )));
                    return true;
                }
                let res =
                    self.ml.delete_cursor(&self.name).await.map_err(|e| {
                        BrokerError::new(ServerError::PersistenceError, e.to_string())
                    });
                let ok = res.is_ok();
                let _ = reply.send(res);
                return !ok;
            }
            SubEvent::MarkDelete { reply } => {
                let _ = reply.send(self.cursor.mark_delete);
            }
        }
        true
    }

    fn pick_consumer(&mut self) -> Option<usize> {
        let n = self.consumers.len();
        if n == 0 {
            return None;
        }
        if self.sub_type != Some(SubType::Shared) {
            return (self.consumers[0].permits > 0).then_some(0);
        }
        for i in 0..n {
            let idx = (self.rr + i) % n;
            if self.consumers[idx].permits > 0 {
                self.rr = idx + 1;
                return Some(idx);
            }
        }
        None
    }

    fn next_to_deliver(&mut self) -> Option<Position> {
        while let Some(p) = self.redeliver.pop_first() {
            if !self.cursor.is_acked(p) {
                return Some(p);
            }
        }
        let last = self.ml.last_confirmed();
        loop {
            let p = self.ml.at_or_after(self.read_pos)?;
            if p > last {
                return None;
            }
            self.read_pos = p.bump();
            if !self.cursor.is_acked(p) && !self.pending.contains_key(&p) {
                return Some(p);
            }
        }
    }

    async fn dispatch(&mut self) {
        if self.read_error {
            return;
        }
        loop {
            let rr = self.rr;
            let Some(idx) = self.pick_consumer() else {
                return;
            };
            let Some(p) = self.next_to_deliver() else {
                // Nothing to send: the turn stays with the same consumer.
                self.rr = rr;
                return;
            };
            let data = match self.ml.read(p).await {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!(subscription = %self.name, position = ?p, error = %e, "read failed; will retry");
                    self.redeliver.insert(p);
                    self.read_error = true;
                    return;
                }
            };
            let count = match Payload::peek_metadata(&data) {
                Ok(md) => md.num_messages_in_batch.unwrap_or(1).max(1) as u32,
                Err(e) => {
                    tracing::error!(subscription = %self.name, position = ?p, error = %e, "stored entry does not parse; skipping it");
                    continue;
                }
            };
            let c = &mut self.consumers[idx];
            let mut cmd = base(Type::Message);
            cmd.message = Some(CommandMessage {
                consumer_id: c.consumer_id,
                message_id: MessageIdData {
                    ledger_id: p.ledger_id,
                    entry_id: p.entry_id as u64,
                    ..Default::default()
                },
                redelivery_count: Some(self.redelivery_count.get(&p).copied().unwrap_or(0)),
                ..Default::default()
            });
            let mut buf = BytesMut::new();
            encode_payload_command(&cmd, &data, &mut buf);
            c.permits = c.permits.saturating_sub(count);
            if c.tx.send(buf.freeze()).is_err() {
                // Connection gone; its removal event is on the way.
                self.redeliver.insert(p);
                let (cid, conn) = (c.consumer_id, c.conn_id);
                self.consumers
                    .retain(|c| (c.consumer_id, c.conn_id) != (cid, conn));
                continue;
            }
            self.pending.insert(p, (c.consumer_id, c.conn_id));
        }
    }
}

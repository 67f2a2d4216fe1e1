//! A subscription of a non-persistent topic: nothing is stored. Each
//! message the topic publishes reaches the task as `SubEvent::Live` and
//! goes at once to a consumer with a permit — the active one (Exclusive,
//! Failover: highest priority level, then name), the next in turn
//! (Shared), or the one its key's slot maps to (Key_Shared) — or, with no
//! permit there, is dropped and counted, as Pulsar's non-persistent
//! dispatchers do. Acknowledgements are not needed; the subscription ends
//! with its last consumer.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use bytes::Bytes;
use magnetar_proto::commands;
use magnetar_proto::pulsar::{command_subscribe::SubType, ServerError};
use tokio::sync::mpsc;

use super::{sticky_slot, ConsumerConn, OutCounters, SubEvent, SubStats, SubscriptionHandle};
use crate::managed_ledger::cursor::Position;
use crate::BrokerError;

/// Events a live subscription queues; past it the topic drops (and
/// counts) its messages for this subscription.
pub const LIVE_EVENT_QUEUE: usize = 4096;

struct Live {
    sub_type: SubType,
    consumers: Vec<(ConsumerConn, u32)>,
    next: usize,
    dropped: u64,
    out: Arc<OutCounters>,
}

pub fn spawn(out: Arc<OutCounters>) -> SubscriptionHandle {
    let (tx, mut rx) = mpsc::channel(LIVE_EVENT_QUEUE);
    let mut live = Live {
        sub_type: SubType::Exclusive,
        consumers: Vec::new(),
        next: 0,
        dropped: 0,
        out,
    };
    tokio::spawn(async move {
        while let Some(ev) = rx.recv().await {
            if !live.handle(ev) {
                return;
            }
        }
    });
    SubscriptionHandle { tx }
}

impl Live {
    /// False when the subscription ends.
    fn handle(&mut self, ev: SubEvent) -> bool {
        match ev {
            SubEvent::Live { position, data } => self.dispatch(position, &data),
            SubEvent::AddConsumer {
                consumer,
                sub_type,
                reply,
            } => {
                let _ = reply.send(self.add(consumer, sub_type));
            }
            SubEvent::RemoveConsumer { key, reply } => {
                self.consumers.retain(|(c, _)| c.info.key != key);
                if let Some(r) = reply {
                    let _ = r.send(());
                }
                return !self.consumers.is_empty();
            }
            SubEvent::Flow { key, permits } => {
                if let Some((_, p)) = self.consumers.iter_mut().find(|(c, _)| c.info.key == key) {
                    *p = p.saturating_add(permits);
                }
            }
            SubEvent::Ack { .. } | SubEvent::Redeliver { .. } => {}
            SubEvent::DeadLettered { .. } | SubEvent::DelayedDue(_) => {}
            SubEvent::Seek { reply, .. } => {
                let _ = reply.send(Err(BrokerError::new(
                    ServerError::NotAllowedError,
                    "a non-persistent topic keeps no messages to seek to",
                )));
            }
            SubEvent::Unsubscribe { key, reply } => {
                self.consumers.retain(|(c, _)| c.info.key != key);
                let _ = reply.send(Ok(()));
                return !self.consumers.is_empty();
            }
            SubEvent::MarkDelete { reply } => {
                let _ = reply.send(Position::default());
            }
            SubEvent::Skip { reply, .. } | SubEvent::Expire { reply, .. } => {
                let _ = reply.send(Ok(()));
            }
            SubEvent::Delete { force, reply } => {
                if !force && !self.consumers.is_empty() {
                    let _ = reply.send(Err(BrokerError::new(
                        ServerError::ConsumerBusy,
                        "the subscription has consumers",
                    )));
                    return true;
                }
                for (c, _) in self.consumers.drain(..) {
                    c.link
                        .close_consumer(c.info.key.1, &commands::Assigned::default());
                }
                let _ = reply.send(Ok(()));
                return false;
            }
            SubEvent::Stats { reply } => {
                let _ = reply.send(SubStats {
                    sub_type: self.sub_type,
                    durable: false,
                    consumers: self
                        .consumers
                        .iter()
                        .map(|(c, _)| c.info.name.clone())
                        .collect(),
                    msg_backlog: 0,
                    unacked: 0,
                    delayed: 0,
                    dropped: self.dropped,
                    mark_delete: Position::default(),
                    acked_after_mark: 0,
                    acked_ranges: Vec::new(),
                    msgs_out: 0,
                    bytes_out: 0,
                    redelivered: 0,
                });
            }
            SubEvent::Close { reply } => {
                let _ = reply.send(self.consumers.drain(..).map(|(c, _)| c).collect());
                return false;
            }
        }
        true
    }

    fn add(&mut self, c: ConsumerConn, sub_type: SubType) -> Result<(), BrokerError> {
        if !self.consumers.is_empty() {
            if sub_type != self.sub_type {
                return Err(BrokerError::new(
                    ServerError::ConsumerBusy,
                    "subscription is of another type",
                ));
            }
            if sub_type == SubType::Exclusive {
                return Err(BrokerError::new(
                    ServerError::ConsumerBusy,
                    "exclusive subscription already has a consumer",
                ));
            }
        }
        self.sub_type = sub_type;
        self.consumers.push((c, 0));
        // Failover: the active consumer first.
        self.consumers.sort_by(|(a, _), (b, _)| {
            b.info
                .priority
                .cmp(&a.info.priority)
                .then_with(|| a.info.name.cmp(&b.info.name))
        });
        Ok(())
    }

    /// Which consumer a message goes to.
    fn pick(&mut self, data: &Bytes) -> Option<usize> {
        let n = self.consumers.len();
        if n == 0 {
            return None;
        }
        match self.sub_type {
            SubType::Shared => {
                // The next in turn with a permit.
                (0..n)
                    .map(|i| (self.next + i) % n)
                    .find(|i| self.consumers[*i].1 > 0)
                    .inspect(|i| self.next = i + 1)
            }
            SubType::KeyShared => Some(sticky_slot(data) as usize % n),
            _ => Some(0),
        }
    }

    fn dispatch(&mut self, position: Position, data: &Bytes) {
        let Some(i) = self.pick(data) else {
            self.dropped += 1;
            return;
        };
        let (c, permits) = &mut self.consumers[i];
        if *permits == 0 {
            self.dropped += 1;
            return;
        }
        let frame = commands::message(c.info.key.1, position.message_id(), 0, &[], data);
        if c.tx.try_send(frame).is_ok() {
            *permits -= 1;
            self.out.msgs.fetch_add(1, Relaxed);
            self.out.bytes.fetch_add(data.len() as u64, Relaxed);
        } else {
            self.dropped += 1;
        }
    }
}

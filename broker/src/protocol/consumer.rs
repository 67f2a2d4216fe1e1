//! SUBSCRIBE, FLOW, ACK, REDELIVER_UNACKNOWLEDGED_MESSAGES, CLOSE_CONSUMER,
//! UNSUBSCRIBE, SEEK, GET_LAST_MESSAGE_ID: each turned into an event of the
//! consumer's subscription.

use std::sync::Arc;

use magnetar_proto::commands;
use magnetar_proto::frame::base;
use magnetar_proto::hash::KEY_HASH_SLOTS;
use magnetar_proto::pulsar::{
    base_command::Type,
    command_ack::AckType,
    command_subscribe::{InitialPosition as WireInitial, SubType},
    CommandAck, CommandCloseConsumer, CommandFlow, CommandGetLastMessageId,
    CommandGetLastMessageIdResponse, CommandRedeliverUnacknowledgedMessages, CommandSeek,
    CommandSubscribe, CommandUnsubscribe, KeySharedMode, ServerError,
};
use tokio::sync::oneshot;

use super::connection::{error_cmd, Conn, ConnRef};
use super::{lock, ConsumerSlot};
use crate::managed_ledger::cursor::{EntryAck, Position};
use crate::subscription::{ConsumerConn, ConsumerInfo, KeySharedSpec, SeekTarget, SubEvent};
use crate::topic::schema;
use crate::topic::{persistent::unknown, InitialPosition};
use crate::BrokerError;

pub async fn subscribe(conn: ConnRef, c: CommandSubscribe) {
    if !conn.shared.reserve_consumer(c.consumer_id) {
        let e = BrokerError::new(
            ServerError::ConsumerBusy,
            "consumer id already in use on this connection",
        );
        conn.shared.send(&error_cmd(c.request_id, &e)).await;
        return;
    }
    let res = async {
        let name = Conn::topic_name(&c.topic)?;
        let sub_type = SubType::try_from(c.sub_type).map_err(|_| {
            BrokerError::new(
                ServerError::NotAllowedError,
                format!("unknown subscription type {}", c.sub_type),
            )
        })?;
        let key_shared = key_shared_spec(&c)?;
        let topic = conn.ctx.topics.get_or_load(&name).await?;
        if let Some(s) = c.schema.as_ref().filter(|s| !schema::is_none(s)) {
            let own = &conn.ctx.topics.ownership;
            schema::check_consumer(own.metadata(), &own.namespaces, &name, s).await?;
        }
        let initial = match c
            .initial_position
            .and_then(|p| WireInitial::try_from(p).ok())
        {
            Some(WireInitial::Earliest) => InitialPosition::Earliest,
            _ => InitialPosition::Latest,
        };
        let handle = if c.durable == Some(false) {
            // A reader: from its start message id, in memory only.
            let ml = &topic.ml;
            let mark_delete = match &c.start_message_id {
                Some(id) if id.ledger_id == u64::MAX => ml.before_first(),
                None => ml.last_confirmed(),
                Some(id) if id.ledger_id >= i64::MAX as u64 => ml.last_confirmed(),
                // Inside a batch: the whole batch again (the client skips
                // what came before), as Pulsar does.
                Some(id) if id.batch_index.is_some_and(|b| b >= 0) => {
                    Position::new(id.ledger_id, id.entry_id as i64 - 1)
                }
                Some(id) => Position::from_message_id(id),
            };
            topic
                .reader_subscription(&c.subscription, mark_delete)
                .await?
        } else {
            topic.subscription(&c.subscription, initial).await?
        };
        let consumer = ConsumerConn {
            read_compacted: c.read_compacted == Some(true),
            info: ConsumerInfo {
                key: (conn.shared.id, c.consumer_id),
                name: c.consumer_name.clone().unwrap_or_default(),
                priority: c.priority_level.unwrap_or(0),
                key_shared,
            },
            tx: conn.shared.tx.clone(),
            link: conn.shared.clone(),
        };
        handle
            .ask(|reply| SubEvent::AddConsumer {
                consumer,
                sub_type,
                reply,
            })
            .await?;
        Ok(ConsumerSlot {
            read_compacted: c.read_compacted == Some(true),
            topic,
            sub: c.subscription.clone(),
            handle,
        })
    }
    .await;
    conn.shared.unreserve_consumer(c.consumer_id);
    match res {
        Ok(slot) => {
            let added = {
                // Under the lock `close_all` takes to mark the connection closed.
                let mut g = lock(&conn.shared.consumers);
                let open = !conn.shared.is_closed();
                if open {
                    g.insert(c.consumer_id, Arc::new(slot));
                    None
                } else {
                    Some(slot)
                }
            };
            match added {
                None => conn.shared.send(&commands::success(c.request_id)).await,
                // The connection ended while subscribing.
                Some(slot) => {
                    slot.handle
                        .tell(SubEvent::RemoveConsumer {
                            key: (conn.shared.id, c.consumer_id),
                            reply: None,
                        })
                        .await
                }
            }
        }
        Err(e) => {
            tracing::info!(peer = %conn.peer, topic = %c.topic, subscription = %c.subscription, error = %e, "subscribe refused");
            conn.shared.send(&error_cmd(c.request_id, &e)).await;
        }
    }
}

/// A Key_Shared consumer's `KeySharedMeta`: auto-split (also when absent)
/// or sticky with its hash ranges, each within the slots.
fn key_shared_spec(c: &CommandSubscribe) -> Result<KeySharedSpec, BrokerError> {
    let Some(meta) = &c.key_shared_meta else {
        return Ok(KeySharedSpec::AutoSplit);
    };
    if KeySharedMode::try_from(meta.key_shared_mode) != Ok(KeySharedMode::Sticky) {
        return Ok(KeySharedSpec::AutoSplit);
    }
    let last = KEY_HASH_SLOTS as i32 - 1;
    let mut ranges = Vec::with_capacity(meta.hash_ranges.len());
    for r in &meta.hash_ranges {
        if r.start < 0 || r.end > last || r.start > r.end {
            return Err(BrokerError::new(
                ServerError::ConsumerAssignError,
                format!(
                    "hash range [{}, {}] is not within [0, {last}]",
                    r.start, r.end
                ),
            ));
        }
        ranges.push((r.start as u16, r.end as u16));
    }
    Ok(KeySharedSpec::Sticky(ranges))
}

pub async fn flow(conn: &mut Conn, c: Option<CommandFlow>) -> bool {
    let Some(c) = c else { return false };
    if let Some(slot) = conn.shared.consumer(c.consumer_id) {
        let key = (conn.shared.id, c.consumer_id);
        slot.handle
            .tell(SubEvent::Flow {
                key,
                permits: c.message_permits,
            })
            .await;
    }
    true
}

pub async fn ack(conn: &mut Conn, c: Option<CommandAck>) -> bool {
    let Some(c) = c else { return false };
    let Some(slot) = conn.shared.consumer(c.consumer_id) else {
        if let Some(request_id) = c.request_id {
            let e = unknown("consumer");
            let answer =
                commands::ack_response(c.consumer_id, request_id, Some((e.code(), e.to_string())));
            conn.shared.send(&answer).await;
        }
        return true;
    };
    let cumulative = c.ack_type == AckType::Cumulative as i32;
    let acks = c.message_id.iter().map(EntryAck::from_message_id).collect();
    let Some(request_id) = c.request_id else {
        slot.handle
            .tell(SubEvent::Ack {
                acks,
                cumulative,
                reply: None,
            })
            .await;
        return true;
    };
    // An ack receipt (protocol 17): answered once the ack is stored, on a
    // task of its own so the connection reads on meanwhile.
    let (reply, rx) = oneshot::channel();
    slot.handle
        .tell(SubEvent::Ack {
            acks,
            cumulative,
            reply: Some(reply),
        })
        .await;
    let shared = conn.shared.clone();
    tokio::spawn(async move {
        let res = rx.await.unwrap_or_else(|_| {
            Err(BrokerError::new(
                ServerError::ServiceNotReady,
                "the subscription closed before the ack was stored",
            ))
        });
        let error = res.err().map(|e| (e.code(), e.to_string()));
        shared
            .send(&commands::ack_response(c.consumer_id, request_id, error))
            .await;
    });
    true
}

pub async fn redeliver(conn: &mut Conn, c: Option<CommandRedeliverUnacknowledgedMessages>) -> bool {
    let Some(c) = c else { return false };
    if let Some(slot) = conn.shared.consumer(c.consumer_id) {
        let positions = (!c.message_ids.is_empty()).then(|| {
            c.message_ids
                .iter()
                .map(Position::from_message_id)
                .collect()
        });
        slot.handle
            .tell(SubEvent::Redeliver {
                key: (conn.shared.id, c.consumer_id),
                positions,
            })
            .await;
    }
    true
}

pub async fn close(conn: &mut Conn, c: Option<CommandCloseConsumer>) -> bool {
    let Some(c) = c else { return false };
    let slot = lock(&conn.shared.consumers).remove(&c.consumer_id);
    if let Some(slot) = slot {
        let (reply, rx) = oneshot::channel();
        slot.handle
            .tell(SubEvent::RemoveConsumer {
                key: (conn.shared.id, c.consumer_id),
                reply: Some(reply),
            })
            .await;
        let _ = rx.await;
    }
    conn.shared.send(&commands::success(c.request_id)).await;
    true
}

pub async fn unsubscribe(conn: &mut Conn, c: Option<CommandUnsubscribe>) -> bool {
    let Some(c) = c else { return false };
    let Some(slot) = conn.shared.consumer(c.consumer_id) else {
        conn.answer(c.request_id, Err(unknown("consumer"))).await;
        return true;
    };
    let key = (conn.shared.id, c.consumer_id);
    let res = slot
        .handle
        .ask(|reply| SubEvent::Unsubscribe { key, reply })
        .await;
    if res.is_ok() {
        lock(&conn.shared.consumers).remove(&c.consumer_id);
        slot.topic.forget_subscription(&slot.sub).await;
    }
    conn.answer(c.request_id, res).await;
    true
}

pub async fn seek(conn: &mut Conn, c: Option<CommandSeek>) -> bool {
    let Some(c) = c else { return false };
    let Some(slot) = conn.shared.consumer(c.consumer_id) else {
        conn.answer(c.request_id, Err(unknown("consumer"))).await;
        return true;
    };
    let ml = &slot.topic.ml;
    let target = match (&c.message_id, c.message_publish_time) {
        // The client's "earliest" and "latest" ids.
        (Some(id), _) if id.ledger_id == u64::MAX => {
            Some(SeekTarget::Position(ml.before_first().bump()))
        }
        (Some(id), _) if id.ledger_id >= i64::MAX as u64 => {
            Some(SeekTarget::Position(ml.last_confirmed().bump()))
        }
        (Some(id), _) => Some(SeekTarget::Position(Position::from_message_id(id))),
        (None, Some(t)) => Some(SeekTarget::PublishTime(t)),
        (None, None) => None,
    };
    let res = match target {
        Some(target) => {
            slot.handle
                .ask(|reply| SubEvent::Seek { target, reply })
                .await
        }
        None => Err(BrokerError::new(
            ServerError::UnknownError,
            "SEEK needs a message id or a publish time",
        )),
    };
    conn.answer(c.request_id, res).await;
    true
}

pub async fn last_message_id(conn: &mut Conn, c: Option<CommandGetLastMessageId>) -> bool {
    let Some(c) = c else { return false };
    let Some(slot) = conn.shared.consumer(c.consumer_id) else {
        conn.answer(c.request_id, Err(unknown("consumer"))).await;
        return true;
    };
    let (reply, rx) = oneshot::channel();
    slot.handle.tell(SubEvent::MarkDelete { reply }).await;
    let shared = conn.shared.clone();
    // The last entry may have to be read: not on the connection's loop.
    tokio::spawn(async move {
        let md = rx.await.ok();
        let last = slot.topic.last_message(slot.read_compacted);
        let mut last_message_id = last.message_id();
        // Of a batch, the last message's index (as Pulsar answers), so a
        // reader inside that batch knows whether anything is left.
        if !slot.read_compacted && last.entry_id >= 0 {
            if let Ok(entry) = slot.topic.ml.read(last).await {
                if let Some(n) = magnetar_proto::Payload::parse(entry)
                    .ok()
                    .and_then(|pl| pl.metadata.num_messages_in_batch)
                    .filter(|n| *n > 0)
                {
                    last_message_id.batch_index = Some(n - 1);
                }
            }
        }
        let mut r = base(Type::GetLastMessageIdResponse);
        r.get_last_message_id_response = Some(CommandGetLastMessageIdResponse {
            last_message_id,
            request_id: c.request_id,
            consumer_mark_delete_position: md.map(Position::message_id),
        });
        shared.send(&r).await;
    });
    true
}

/// The connection ended: its consumers leave their subscriptions (what
/// they held unacknowledged goes to others or waits for redelivery).
pub async fn close_all(conn: &Conn) {
    let all: Vec<(u64, Arc<ConsumerSlot>)> = {
        let mut g = lock(&conn.shared.consumers);
        conn.shared.mark_closed();
        g.drain().collect()
    };
    for (cid, slot) in all {
        slot.handle
            .tell(SubEvent::RemoveConsumer {
                key: (conn.shared.id, cid),
                reply: None,
            })
            .await;
    }
}

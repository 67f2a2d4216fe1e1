//! PRODUCER, SEND, CLOSE_PRODUCER. A SEND goes to `Topic::publish`; its
//! receipt is written by the topic's appender through a slot of the
//! connection's queue reserved before the send was accepted.

use std::sync::Arc;

use magnetar_proto::frame::{base, FrameError};
use magnetar_proto::pulsar::{
    base_command::Type, CommandCloseProducer, CommandProducer, CommandProducerSuccess, CommandSend,
    ServerError,
};
use magnetar_proto::{commands, Payload};

use super::codec::{send_error, send_receipt};
use super::connection::{error_cmd, Conn, ConnRef};
use super::{lock, ProducerSlot};
use crate::managed_ledger::MlError;
use crate::topic::persistent::{Joined, ProducerRequest};
use crate::topic::producers::AccessMode;
use crate::topic::schema;
use crate::BrokerError;

/// Producer ids a connection remembers as closed by the broker (beyond
/// this the memory is cleared: a very late send then gets an error).
const MAX_REMEMBERED_CLOSED_PRODUCERS: usize = 4096;

pub async fn create(conn: ConnRef, c: CommandProducer) {
    if !conn.shared.reserve_producer(c.producer_id) {
        let e = BrokerError::new(
            ServerError::ProducerBusy,
            "producer id already in use on this connection",
        );
        conn.shared.send(&error_cmd(c.request_id, &e)).await;
        return;
    }
    let producer_name = c
        .producer_name
        .clone()
        .unwrap_or_else(|| format!("magnetar-{}-{}", conn.shared.id, c.producer_id));
    let res = async {
        let name = Conn::topic_name(&c.topic)?;
        let mode = AccessMode::from_wire(c.producer_access_mode).ok_or_else(|| {
            BrokerError::new(
                ServerError::NotAllowedError,
                format!("unknown producer access mode {:?}", c.producer_access_mode),
            )
        })?;
        let topic = conn.ctx.topics.get_or_load(&name).await?;
        // A schema: its version (registered if new and compatible).
        let schema_version = match c.schema.as_ref().filter(|s| !schema::is_none(s)) {
            Some(s) => {
                let own = &conn.ctx.topics.ownership;
                Some(schema::get_or_create(own.metadata(), &own.namespaces, &name, s).await?)
            }
            None => None,
        };
        let req = ProducerRequest {
            conn_id: conn.shared.id,
            producer_id: c.producer_id,
            name: producer_name.clone(),
            link: conn.shared.clone(),
            mode,
            epoch: c.topic_epoch,
        };
        let mut told_waiting = false;
        loop {
            match topic.add_producer(&req).await? {
                Joined::Ready { epoch } => return Ok((topic, epoch, schema_version)),
                Joined::Waiting(woken) => {
                    // Tell the client it is queued (it then waits without
                    // a timeout), as Pulsar does.
                    if !told_waiting {
                        told_waiting = true;
                        conn.shared
                            .send(&producer_success(
                                c.request_id,
                                &producer_name,
                                None,
                                false,
                                -1,
                                None,
                            ))
                            .await;
                    }
                    woken.await.map_err(|_| {
                        BrokerError::NotServedHere(format!("topic {name} closed meanwhile"))
                    })?;
                }
            }
        }
    }
    .await;
    match res {
        Ok((topic, epoch, schema_version)) => {
            let last = topic.last_sequence_id(&producer_name);
            {
                // Under the lock `close_all` takes to mark the connection closed.
                let mut g = lock(&conn.shared.producers);
                if conn.shared.is_closed() {
                    drop(g);
                    topic.remove_producer(conn.shared.id, c.producer_id);
                    conn.shared.unreserve_producer(c.producer_id);
                    return;
                }
                g.insert(
                    c.producer_id,
                    Arc::new(ProducerSlot {
                        topic,
                        name: producer_name.clone(),
                    }),
                );
            }
            lock(&conn.shared.closed_producers).remove(&c.producer_id);
            conn.shared.unreserve_producer(c.producer_id);
            conn.shared
                .send(&producer_success(
                    c.request_id,
                    &producer_name,
                    epoch,
                    true,
                    last,
                    schema_version,
                ))
                .await;
        }
        Err(e) => {
            tracing::info!(peer = %conn.peer, topic = %c.topic, error = %e, "producer refused");
            conn.shared.unreserve_producer(c.producer_id);
            conn.shared.send(&error_cmd(c.request_id, &e)).await;
        }
    }
}

pub async fn send(
    conn: &mut Conn,
    c: Option<CommandSend>,
    payload: Option<Payload>,
    payload_error: Option<FrameError>,
) -> bool {
    let Some(c) = c else { return false };
    let (pid, seq) = (c.producer_id, c.sequence_id);
    // The message itself first: a bad one is refused for what it is,
    // whatever its producer.
    // As Pulsar counts it: the payload, its metadata aside (the frame
    // decoder leaves room for that).
    let max = conn.ctx.limits.max_message_bytes;
    let refused = match (payload, payload_error) {
        (Some(pl), _) if pl.payload().len() <= max => Ok(pl),
        (Some(pl), _) => Err((
            ServerError::UnknownError,
            format!("message of {} bytes exceeds {max}", pl.payload().len()),
        )),
        (None, Some(e @ FrameError::Checksum { .. })) => {
            Err((ServerError::ChecksumError, e.to_string()))
        }
        (None, Some(e)) => Err((ServerError::UnknownError, e.to_string())),
        (None, None) => Err((ServerError::UnknownError, "SEND without a payload".into())),
    };
    let pl = match refused {
        Ok(pl) => pl,
        Err((code, msg)) => {
            tracing::warn!(peer = %conn.peer, producer_id = pid, sequence_id = seq, error = %msg, "send refused");
            conn.shared.send(&send_error(pid, seq, code, msg)).await;
            return true;
        }
    };
    let Some(slot) = conn.shared.producer(pid) else {
        if conn.shared.was_closed_by_broker(pid) {
            tracing::debug!(peer = %conn.peer, producer_id = pid, sequence_id = seq, "send after the broker closed the producer; dropped");
        } else {
            tracing::warn!(peer = %conn.peer, producer_id = pid, "send for an unknown producer");
            let e = send_error(
                pid,
                seq,
                ServerError::UnknownError,
                "unknown producer".into(),
            );
            conn.shared.send(&e).await;
        }
        return true;
    };
    let highest = c.highest_sequence_id.unwrap_or(0).max(seq);
    publish(conn, &slot, pid, seq, highest, pl).await;
    true
}

/// Registered once, on first use (after the recorder is installed).
static PUBLISH_LATENCY: std::sync::LazyLock<metrics::Histogram> =
    std::sync::LazyLock::new(|| metrics::histogram!(crate::metrics::PUBLISH_LATENCY));

/// Waits for room under the connection's limits (the read loop does not
/// read meanwhile), then hands the message to the topic.
async fn publish(conn: &Conn, slot: &ProducerSlot, pid: u64, seq: u64, highest: u64, pl: Payload) {
    let data = pl.headers_and_payload;
    let max_kib = (conn.ctx.limits.max_pending_send_bytes >> 10).max(1);
    let kib = (data.len().div_ceil(1024)).clamp(1, max_kib) as u32;
    let (Ok(count), Ok(bytes), Ok(out)) = (
        conn.pending_sends.clone().acquire_owned().await,
        conn.pending_kib.clone().acquire_many_owned(kib).await,
        conn.shared.tx.clone().reserve_owned().await,
    ) else {
        return;
    };
    let topic = slot.topic.name.clone();
    let arrived = std::time::Instant::now();
    slot.topic
        .publish_from(
            &slot.name,
            seq,
            highest,
            data,
            Box::new(move |res| {
                let cmd = match res {
                    Ok(p) => {
                        PUBLISH_LATENCY.record(arrived.elapsed().as_secs_f64());
                        send_receipt(pid, seq, highest, p)
                    }
                    Err(MlError::Closed(_) | MlError::NotWritable(_)) => {
                        // The topic is leaving this broker; the producer is
                        // told to reconnect and resends what has no receipt.
                        tracing::debug!(%topic, producer_id = pid, sequence_id = seq, "send not stored: topic closing");
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(%topic, producer_id = pid, sequence_id = seq, error = %e, "persisting a message failed");
                        super::connection::count_error(ServerError::PersistenceError);
                        send_error(pid, seq, ServerError::PersistenceError, e.to_string())
                    }
                };
                out.send(commands::frame(&cmd).into());
                drop((count, bytes));
            }),
        )
        .await;
}

pub async fn close(conn: &mut Conn, c: Option<CommandCloseProducer>) -> bool {
    let Some(c) = c else { return false };
    if let Some(slot) = lock(&conn.shared.producers).remove(&c.producer_id) {
        slot.topic.remove_producer(conn.shared.id, c.producer_id);
    }
    conn.shared.send(&commands::success(c.request_id)).await;
    true
}

/// The connection ended: its producers leave their topics.
pub fn close_all(conn: &Conn) {
    let all: Vec<(u64, Arc<ProducerSlot>)> = {
        let mut g = lock(&conn.shared.producers);
        conn.shared.mark_closed();
        g.drain().collect()
    };
    for (pid, slot) in all {
        slot.topic.remove_producer(conn.shared.id, pid);
    }
}

impl super::ConnShared {
    pub(super) fn remember_closed_producer(&self, producer_id: u64) {
        let mut g = lock(&self.closed_producers);
        if g.len() >= MAX_REMEMBERED_CLOSED_PRODUCERS {
            g.clear();
        }
        g.insert(producer_id);
    }
}

fn producer_success(
    request_id: u64,
    name: &str,
    topic_epoch: Option<u64>,
    ready: bool,
    last_sequence_id: i64,
    schema_version: Option<u64>,
) -> magnetar_proto::pulsar::BaseCommand {
    let mut r = base(Type::ProducerSuccess);
    r.producer_success = Some(CommandProducerSuccess {
        request_id,
        producer_name: name.to_string(),
        last_sequence_id: Some(last_sequence_id),
        topic_epoch,
        producer_ready: Some(ready),
        schema_version: schema_version.map(|v| schema::version_bytes(v).into()),
    });
    r
}

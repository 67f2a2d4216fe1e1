//! One client connection speaking the Pulsar binary protocol.
//!
//! A reader loop decodes frames (bounded, CRC-checked) and handles commands;
//! everything sent back goes through one writer task. A malformed frame gets
//! a log line and closes this connection only.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use magnetar_proto::frame::{self, base, encode_command, Frame, FRAME_OVERHEAD_BYTES};
use magnetar_proto::pulsar::{
    base_command::Type,
    command_ack::AckType,
    command_lookup_topic_response::LookupType,
    command_partitioned_topic_metadata_response as pmr,
    command_subscribe::{InitialPosition as WireInitial, SubType},
    BaseCommand, CommandConnected, CommandError, CommandGetLastMessageIdResponse,
    CommandLookupTopicResponse, CommandPartitionedTopicMetadataResponse, CommandPing, CommandPong,
    CommandProducerSuccess, CommandSendError, CommandSendReceipt, CommandSuccess, MessageIdData,
    ServerError,
};
use magnetar_proto::TopicName;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

use crate::managed_ledger::cursor::Position;
use crate::managed_ledger::MlError;
use crate::subscription::{ConnTx, SeekTarget, SubEvent, SubscriptionHandle};
use crate::topic::{InitialPosition, Topic};
use crate::{Broker, BrokerError, PROTOCOL_VERSION};

/// A send waiting for its receipt: (sequence id, highest sequence id, outcome).
type PendingSend = (u64, u64, oneshot::Receiver<Result<Position, MlError>>);

struct Producer {
    topic: Arc<Topic>,
    receipts: mpsc::UnboundedSender<PendingSend>,
}

struct Consumer {
    topic: Arc<Topic>,
    sub: String,
    handle: SubscriptionHandle,
}

struct Conn {
    broker: Arc<Broker>,
    id: u64,
    peer: SocketAddr,
    tx: ConnTx,
    producers: HashMap<u64, Producer>,
    consumers: HashMap<u64, Consumer>,
}

fn send_cmd(tx: &ConnTx, cmd: &BaseCommand) {
    let mut buf = BytesMut::new();
    encode_command(cmd, &mut buf);
    let _ = tx.send(buf.freeze());
}

fn error_cmd(request_id: u64, e: &BrokerError) -> BaseCommand {
    let mut c = base(Type::Error);
    c.error = Some(CommandError {
        request_id,
        error: e.code as i32,
        message: e.message.clone(),
    });
    c
}

fn success_cmd(request_id: u64) -> BaseCommand {
    let mut c = base(Type::Success);
    c.success = Some(CommandSuccess { request_id });
    c
}

fn to_position(id: &MessageIdData) -> Position {
    Position::new(id.ledger_id, id.entry_id as i64)
}

fn to_id(p: Position) -> MessageIdData {
    MessageIdData {
        ledger_id: p.ledger_id,
        entry_id: p.entry_id as u64,
        partition: Some(-1),
        batch_index: Some(-1),
        ..Default::default()
    }
}

pub async fn serve(broker: Arc<Broker>, stream: TcpStream, peer: SocketAddr) {
    let (mut rd, wr) = stream.into_split();
    let (tx, rx) = mpsc::unbounded_channel::<Bytes>();
    let writer = tokio::spawn(frame::write_loop(rx, wr));
    let id = broker.next_id();
    let mut conn = Conn {
        broker: broker.clone(),
        id,
        peer,
        tx,
        producers: HashMap::new(),
        consumers: HashMap::new(),
    };
    let max_frame = broker.cfg.max_message_bytes + FRAME_OVERHEAD_BYTES;
    let idle = Duration::from_secs(broker.cfg.keepalive_secs.max(1));
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut connected = false;
    let mut pinged = false;
    'outer: loop {
        loop {
            match frame::decode(&mut buf, max_frame) {
                Ok(Some(f)) => {
                    pinged = false;
                    if !connected {
                        if f.command.r#type != Type::Connect as i32 {
                            tracing::warn!(%peer, "first frame is not CONNECT; closing");
                            break 'outer;
                        }
                        connected = true;
                    }
                    if !conn.handle(f).await {
                        break 'outer;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(%peer, error = %e, "malformed frame; closing connection");
                    break 'outer;
                }
            }
        }
        match tokio::time::timeout(idle, rd.read_buf(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(_)) => {}
            Err(_) if pinged => {
                tracing::info!(%peer, "no answer to keep-alive; closing");
                break;
            }
            Err(_) => {
                let mut c = base(Type::Ping);
                c.ping = Some(CommandPing {});
                send_cmd(&conn.tx, &c);
                pinged = true;
            }
        }
    }
    conn.close().await;
    drop(conn);
    let _ = writer.await;
}

impl Conn {
    async fn close(&mut self) {
        for (cid, c) in self.consumers.drain() {
            let _ = c.handle.tx.send(SubEvent::RemoveConsumer {
                consumer_id: cid,
                conn_id: self.id,
                reply: None,
            });
        }
        self.producers.clear();
        tracing::debug!(peer = %self.peer, "connection closed");
    }

    /// Answers a request with SUCCESS or ERROR.
    fn answer(&self, request_id: u64, res: Result<(), BrokerError>) {
        match res {
            Ok(()) => send_cmd(&self.tx, &success_cmd(request_id)),
            Err(e) => send_cmd(&self.tx, &error_cmd(request_id, &e)),
        }
    }

    /// The subscription of a consumer named by a request, or an ERROR answer.
    fn consumer_handle(&self, consumer_id: u64, request_id: u64) -> Option<SubscriptionHandle> {
        let handle = self.consumers.get(&consumer_id).map(|c| c.handle.clone());
        if handle.is_none() {
            self.answer(request_id, Err(unknown_consumer()));
        }
        handle
    }

    fn topic_name(name: &str) -> Result<TopicName, BrokerError> {
        TopicName::parse(name)
            .map_err(|e| BrokerError::new(ServerError::InvalidTopicName, e.to_string()))
    }

    /// Returns false to close the connection.
    async fn handle(&mut self, f: Frame) -> bool {
        let Frame {
            command: cmd,
            payload,
            payload_error,
        } = f;
        let t = Type::try_from(cmd.r#type).ok();
        match (t, cmd) {
            (
                Some(Type::Connect),
                BaseCommand {
                    connect: Some(c), ..
                },
            ) => {
                let version = c.protocol_version.unwrap_or(0).min(PROTOCOL_VERSION);
                let mut r = base(Type::Connected);
                r.connected = Some(CommandConnected {
                    server_version: format!("Magnetar {}", env!("CARGO_PKG_VERSION")),
                    protocol_version: Some(version),
                    max_message_size: Some(self.broker.cfg.max_message_bytes as i32),
                    feature_flags: None,
                });
                send_cmd(&self.tx, &r);
                tracing::debug!(peer = %self.peer, client = %c.client_version, version, "connected");
            }
            (Some(Type::Ping), _) => {
                let mut r = base(Type::Pong);
                r.pong = Some(CommandPong {});
                send_cmd(&self.tx, &r);
            }
            (Some(Type::Pong), _) => {}
            (
                Some(Type::PartitionedMetadata),
                BaseCommand {
                    partition_metadata: Some(c),
                    ..
                },
            ) => {
                let mut r = base(Type::PartitionedMetadataResponse);
                r.partition_metadata_response = Some(match Self::topic_name(&c.topic) {
                    Ok(_) => CommandPartitionedTopicMetadataResponse {
                        partitions: Some(0),
                        request_id: c.request_id,
                        response: Some(pmr::LookupType::Success as i32),
                        ..Default::default()
                    },
                    Err(e) => CommandPartitionedTopicMetadataResponse {
                        request_id: c.request_id,
                        response: Some(pmr::LookupType::Failed as i32),
                        error: Some(e.code as i32),
                        message: Some(e.message),
                        ..Default::default()
                    },
                });
                send_cmd(&self.tx, &r);
            }
            (
                Some(Type::Lookup),
                BaseCommand {
                    lookup_topic: Some(c),
                    ..
                },
            ) => {
                let mut r = base(Type::LookupResponse);
                r.lookup_topic_response = Some(match Self::topic_name(&c.topic) {
                    Ok(_) => CommandLookupTopicResponse {
                        broker_service_url: Some(self.broker.service_url.clone()),
                        response: Some(LookupType::Connect as i32),
                        request_id: c.request_id,
                        authoritative: Some(true),
                        ..Default::default()
                    },
                    Err(e) => CommandLookupTopicResponse {
                        response: Some(LookupType::Failed as i32),
                        request_id: c.request_id,
                        error: Some(e.code as i32),
                        message: Some(e.message),
                        ..Default::default()
                    },
                });
                send_cmd(&self.tx, &r);
            }
            (
                Some(Type::Producer),
                BaseCommand {
                    producer: Some(c), ..
                },
            ) => {
                let res = async {
                    let name = Self::topic_name(&c.topic)?;
                    let topic = self.broker.topic(&name).await?;
                    if self.producers.contains_key(&c.producer_id) {
                        return Err(BrokerError::new(
                            ServerError::ProducerBusy,
                            "producer id already in use on this connection",
                        ));
                    }
                    Ok(topic)
                }
                .await;
                match res {
                    Ok(topic) => {
                        let producer_name = c
                            .producer_name
                            .clone()
                            .unwrap_or_else(|| format!("magnetar-{}-{}", self.id, c.producer_id));
                        let (rtx, rrx) = mpsc::unbounded_channel();
                        tokio::spawn(receipts(c.producer_id, self.tx.clone(), rrx));
                        self.producers.insert(
                            c.producer_id,
                            Producer {
                                topic,
                                receipts: rtx,
                            },
                        );
                        let mut r = base(Type::ProducerSuccess);
                        r.producer_success = Some(CommandProducerSuccess {
                            request_id: c.request_id,
                            producer_name,
                            last_sequence_id: Some(-1),
                            producer_ready: Some(true),
                            ..Default::default()
                        });
                        send_cmd(&self.tx, &r);
                    }
                    Err(e) => {
                        tracing::info!(peer = %self.peer, topic = %c.topic, error = %e, "producer refused");
                        send_cmd(&self.tx, &error_cmd(c.request_id, &e));
                    }
                }
            }
            (Some(Type::Send), BaseCommand { send: Some(c), .. }) => {
                let send_error = |code: ServerError, message: String| {
                    let mut r = base(Type::SendError);
                    r.send_error = Some(CommandSendError {
                        producer_id: c.producer_id,
                        sequence_id: c.sequence_id,
                        error: code as i32,
                        message,
                    });
                    r
                };
                let Some(p) = self.producers.get(&c.producer_id) else {
                    tracing::warn!(peer = %self.peer, producer_id = c.producer_id, "send for an unknown producer");
                    send_cmd(
                        &self.tx,
                        &send_error(ServerError::UnknownError, "unknown producer".into()),
                    );
                    return true;
                };
                let (code, msg) = match (payload, payload_error) {
                    (Some(pl), _)
                        if pl.headers_and_payload.len() <= self.broker.cfg.max_message_bytes =>
                    {
                        let highest = c.highest_sequence_id.unwrap_or(0).max(c.sequence_id);
                        let rx = p.topic.ml.append(pl.headers_and_payload);
                        let _ = p.receipts.send((c.sequence_id, highest, rx));
                        return true;
                    }
                    (Some(pl), _) => (
                        ServerError::UnknownError,
                        format!(
                            "message of {} bytes exceeds {}",
                            pl.headers_and_payload.len(),
                            self.broker.cfg.max_message_bytes
                        ),
                    ),
                    (None, Some(e @ frame::FrameError::Checksum { .. })) => {
                        (ServerError::ChecksumError, e.to_string())
                    }
                    (None, Some(e)) => (ServerError::UnknownError, e.to_string()),
                    (None, None) => (ServerError::UnknownError, "SEND without a payload".into()),
                };
                tracing::warn!(peer = %self.peer, producer_id = c.producer_id, sequence_id = c.sequence_id, error = %msg, "send refused");
                send_cmd(&self.tx, &send_error(code, msg));
            }
            (
                Some(Type::CloseProducer),
                BaseCommand {
                    close_producer: Some(c),
                    ..
                },
            ) => {
                self.producers.remove(&c.producer_id);
                send_cmd(&self.tx, &success_cmd(c.request_id));
            }
            (
                Some(Type::Subscribe),
                BaseCommand {
                    subscribe: Some(c), ..
                },
            ) => {
                let res = async {
                    let name = Self::topic_name(&c.topic)?;
                    if self.consumers.contains_key(&c.consumer_id) {
                        return Err(BrokerError::new(
                            ServerError::ConsumerBusy,
                            "consumer id already in use on this connection",
                        ));
                    }
                    let sub_type = SubType::try_from(c.sub_type).unwrap_or(SubType::Exclusive);
                    if !matches!(sub_type, SubType::Exclusive | SubType::Shared) {
                        return Err(BrokerError::new(
                            ServerError::UnsupportedVersionError,
                            format!("{sub_type:?} subscriptions are not supported yet"),
                        ));
                    }
                    let topic = self.broker.topic(&name).await?;
                    let initial = match c
                        .initial_position
                        .and_then(|p| WireInitial::try_from(p).ok())
                    {
                        Some(WireInitial::Earliest) => InitialPosition::Earliest,
                        _ => InitialPosition::Latest,
                    };
                    let handle = topic.subscription(&c.subscription, initial).await?;
                    let (consumer_id, conn_id, tx) = (c.consumer_id, self.id, self.tx.clone());
                    ask(&handle, |reply| SubEvent::AddConsumer {
                        consumer_id,
                        conn_id,
                        sub_type,
                        tx,
                        reply,
                    })
                    .await?;
                    Ok(Consumer {
                        topic,
                        sub: c.subscription.clone(),
                        handle,
                    })
                }
                .await;
                match res {
                    Ok(consumer) => {
                        self.consumers.insert(c.consumer_id, consumer);
                        send_cmd(&self.tx, &success_cmd(c.request_id));
                    }
                    Err(e) => {
                        tracing::info!(peer = %self.peer, topic = %c.topic, subscription = %c.subscription, error = %e, "subscribe refused");
                        send_cmd(&self.tx, &error_cmd(c.request_id, &e));
                    }
                }
            }
            (Some(Type::Flow), BaseCommand { flow: Some(c), .. }) => {
                if let Some(cons) = self.consumers.get(&c.consumer_id) {
                    let _ = cons.handle.tx.send(SubEvent::Flow {
                        consumer_id: c.consumer_id,
                        conn_id: self.id,
                        permits: c.message_permits,
                    });
                }
            }
            (Some(Type::Ack), BaseCommand { ack: Some(c), .. }) => {
                if let Some(cons) = self.consumers.get(&c.consumer_id) {
                    let cumulative = c.ack_type == AckType::Cumulative as i32;
                    let mut positions = Vec::with_capacity(c.message_id.len());
                    for id in &c.message_id {
                        // A partial batch ack (some bits still set) does not ack the entry.
                        let partial = id.ack_set.iter().any(|w| *w != 0);
                        let p = to_position(id);
                        if !partial {
                            positions.push(p);
                        } else if cumulative && p.entry_id > 0 {
                            positions.push(Position::new(p.ledger_id, p.entry_id - 1));
                        }
                    }
                    let _ = cons.handle.tx.send(SubEvent::Ack {
                        positions,
                        cumulative,
                    });
                }
            }
            (
                Some(Type::RedeliverUnacknowledgedMessages),
                BaseCommand {
                    redeliver_unacknowledged_messages: Some(c),
                    ..
                },
            ) => {
                if let Some(cons) = self.consumers.get(&c.consumer_id) {
                    let positions = (!c.message_ids.is_empty())
                        .then(|| c.message_ids.iter().map(to_position).collect());
                    let _ = cons.handle.tx.send(SubEvent::Redeliver {
                        consumer_id: c.consumer_id,
                        conn_id: self.id,
                        positions,
                    });
                }
            }
            (
                Some(Type::CloseConsumer),
                BaseCommand {
                    close_consumer: Some(c),
                    ..
                },
            ) => {
                if let Some(cons) = self.consumers.remove(&c.consumer_id) {
                    let (reply, rx) = oneshot::channel();
                    let _ = cons.handle.tx.send(SubEvent::RemoveConsumer {
                        consumer_id: c.consumer_id,
                        conn_id: self.id,
                        reply: Some(reply),
                    });
                    let _ = rx.await;
                }
                send_cmd(&self.tx, &success_cmd(c.request_id));
            }
            (
                Some(Type::Unsubscribe),
                BaseCommand {
                    unsubscribe: Some(c),
                    ..
                },
            ) => {
                let Some(handle) = self.consumer_handle(c.consumer_id, c.request_id) else {
                    return true;
                };
                let (consumer_id, conn_id) = (c.consumer_id, self.id);
                let res = ask(&handle, |reply| SubEvent::Unsubscribe {
                    consumer_id,
                    conn_id,
                    reply,
                })
                .await;
                if res.is_ok() {
                    if let Some(cons) = self.consumers.remove(&c.consumer_id) {
                        cons.topic.forget_subscription(&cons.sub).await;
                    }
                }
                self.answer(c.request_id, res);
            }
            (Some(Type::Seek), BaseCommand { seek: Some(c), .. }) => {
                let Some(cons) = self.consumers.get(&c.consumer_id) else {
                    self.answer(c.request_id, Err(unknown_consumer()));
                    return true;
                };
                let ml = &cons.topic.ml;
                let target = match (&c.message_id, c.message_publish_time) {
                    // The client's "earliest" and "latest" ids.
                    (Some(id), _) if id.ledger_id == u64::MAX => {
                        Some(SeekTarget::Position(ml.before_first().bump()))
                    }
                    (Some(id), _) if id.ledger_id >= i64::MAX as u64 => {
                        Some(SeekTarget::Position(ml.last_confirmed().bump()))
                    }
                    (Some(id), _) => Some(SeekTarget::Position(to_position(id))),
                    (None, Some(t)) => Some(SeekTarget::PublishTime(t)),
                    (None, None) => None,
                };
                let res = match target {
                    Some(target) => {
                        ask(&cons.handle, |reply| SubEvent::Seek { target, reply }).await
                    }
                    None => Err(BrokerError::new(
                        ServerError::UnknownError,
                        "SEEK needs a message id or a publish time",
                    )),
                };
                self.answer(c.request_id, res);
            }
            (
                Some(Type::GetLastMessageId),
                BaseCommand {
                    get_last_message_id: Some(c),
                    ..
                },
            ) => {
                let Some(cons) = self.consumers.get(&c.consumer_id) else {
                    self.answer(c.request_id, Err(unknown_consumer()));
                    return true;
                };
                let (reply, rx) = oneshot::channel();
                let _ = cons.handle.tx.send(SubEvent::MarkDelete { reply });
                let md = rx.await.ok();
                let mut r = base(Type::GetLastMessageIdResponse);
                r.get_last_message_id_response = Some(CommandGetLastMessageIdResponse {
                    last_message_id: to_id(cons.topic.ml.last_confirmed()),
                    request_id: c.request_id,
                    consumer_mark_delete_position: md.map(to_id),
                });
                send_cmd(&self.tx, &r);
            }
            (t, cmd) => {
                tracing::warn!(peer = %self.peer, r#type = cmd.r#type, known = t.is_some(), "unsupported or incomplete command");
                let e = BrokerError::new(
                    ServerError::UnknownError,
                    format!("command type {} is not supported", cmd.r#type),
                );
                send_cmd(&self.tx, &error_cmd(0, &e));
            }
        }
        true
    }
}

fn unknown_consumer() -> BrokerError {
    BrokerError::new(ServerError::ConsumerNotFound, "unknown consumer")
}

/// Sends a subscription an event that carries a reply channel and waits for
/// the reply.
async fn ask(
    handle: &SubscriptionHandle,
    event: impl FnOnce(oneshot::Sender<Result<(), BrokerError>>) -> SubEvent,
) -> Result<(), BrokerError> {
    let closed = || BrokerError::new(ServerError::ServiceNotReady, "subscription closed");
    let (reply, rx) = oneshot::channel();
    handle.tx.send(event(reply)).map_err(|_| closed())?;
    rx.await.map_err(|_| closed())?
}

/// Sends a producer's receipts in the order its messages were sent.
async fn receipts(producer_id: u64, tx: ConnTx, mut rx: mpsc::UnboundedReceiver<PendingSend>) {
    while let Some((sequence_id, highest, done)) = rx.recv().await {
        let mut r;
        match done.await {
            Ok(Ok(p)) => {
                r = base(Type::SendReceipt);
                r.send_receipt = Some(CommandSendReceipt {
                    producer_id,
                    sequence_id,
                    message_id: Some(to_id(p)),
                    highest_sequence_id: Some(highest),
                });
            }
            Ok(Err(e)) => {
                tracing::warn!(producer_id, sequence_id, error = %e, "persisting a message failed");
                r = base(Type::SendError);
                r.send_error = Some(CommandSendError {
                    producer_id,
                    sequence_id,
                    error: ServerError::PersistenceError as i32,
                    message: e.to_string(),
                });
            }
            Err(_) => return,
        }
        send_cmd(&tx, &r);
    }
}

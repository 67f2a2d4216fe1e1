//! Builders of the Pulsar commands servers and clients send, in one place.

use bytes::{Bytes, BytesMut};

use crate::frame::{base, encode_command};
use crate::pulsar::{
    base_command::Type, BaseCommand, CommandActiveConsumerChange, CommandCloseConsumer,
    CommandCloseProducer, CommandError, CommandMessage, CommandSuccess, MessageIdData, ServerError,
};

/// A command-only frame.
/// Properties (message or schema) as the wire carries them.
pub fn key_values(
    props: &std::collections::BTreeMap<String, String>,
) -> Vec<crate::pulsar::KeyValue> {
    props
        .iter()
        .map(|(k, v)| crate::pulsar::KeyValue {
            key: k.clone(),
            value: v.clone(),
        })
        .collect()
}

/// Wire properties as a map (a repeated key keeps its last value).
pub fn properties(kvs: &[crate::pulsar::KeyValue]) -> std::collections::BTreeMap<String, String> {
    kvs.iter()
        .map(|kv| (kv.key.clone(), kv.value.clone()))
        .collect()
}

pub fn frame(cmd: &BaseCommand) -> Bytes {
    let mut buf = BytesMut::new();
    encode_command(cmd, &mut buf);
    buf.freeze()
}

pub fn error(request_id: u64, code: ServerError, message: impl Into<String>) -> BaseCommand {
    let mut c = base(Type::Error);
    c.error = Some(CommandError {
        request_id,
        error: code as i32,
        message: message.into(),
    });
    c
}

pub fn success(request_id: u64) -> BaseCommand {
    let mut c = base(Type::Success);
    c.success = Some(CommandSuccess { request_id });
    c
}

/// ACK_RESPONSE (protocol 17): the answer to an ACK carrying a request id.
pub fn ack_response(
    consumer_id: u64,
    request_id: u64,
    error: Option<(ServerError, String)>,
) -> BaseCommand {
    let mut c = base(Type::AckResponse);
    let (error, message) = match error {
        Some((code, m)) => (Some(code as i32), Some(m)),
        None => (None, None),
    };
    c.ack_response = Some(crate::pulsar::CommandAckResponse {
        consumer_id,
        request_id: Some(request_id),
        error,
        message,
        ..Default::default()
    });
    c
}

/// Where a closed producer or consumer should reconnect (PIP-307): the new
/// owner's `pulsar://` and `pulsar+ssl://` URLs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Assigned {
    pub url: Option<String>,
    pub url_tls: Option<String>,
}

/// The broker closes a producer: the client looks the topic up again, or
/// goes straight to `assigned`.
pub fn close_producer(producer_id: u64, assigned: &Assigned) -> BaseCommand {
    let mut c = base(Type::CloseProducer);
    c.close_producer = Some(CommandCloseProducer {
        producer_id,
        request_id: 0,
        assigned_broker_service_url: assigned.url.clone(),
        assigned_broker_service_url_tls: assigned.url_tls.clone(),
    });
    c
}

/// The broker closes a consumer (see `close_producer`).
pub fn close_consumer(consumer_id: u64, assigned: &Assigned) -> BaseCommand {
    let mut c = base(Type::CloseConsumer);
    c.close_consumer = Some(CommandCloseConsumer {
        consumer_id,
        request_id: 0,
        assigned_broker_service_url: assigned.url.clone(),
        assigned_broker_service_url_tls: assigned.url_tls.clone(),
    });
    c
}

/// Tells a consumer of a Failover subscription whether it is the active one.
pub fn active_consumer_change(consumer_id: u64, is_active: bool) -> BaseCommand {
    let mut c = base(Type::ActiveConsumerChange);
    c.active_consumer_change = Some(CommandActiveConsumerChange {
        consumer_id,
        is_active: Some(is_active),
    });
    c
}

pub fn reached_end_of_topic(consumer_id: u64) -> BaseCommand {
    let mut c = base(Type::ReachedEndOfTopic);
    c.reached_end_of_topic = Some(crate::pulsar::CommandReachedEndOfTopic { consumer_id });
    c
}

/// A MESSAGE frame carrying a stored entry (`[0x0e01][crc]...` form);
/// `ack_set`, for a batch of which some messages are acknowledged, has the
/// bits of those still to deliver.
pub fn message(
    consumer_id: u64,
    message_id: MessageIdData,
    redelivery_count: u32,
    ack_set: &[i64],
    headers_and_payload: &Bytes,
) -> crate::frame::OutFrame {
    let mut cmd = base(Type::Message);
    cmd.message = Some(CommandMessage {
        consumer_id,
        message_id,
        redelivery_count: Some(redelivery_count),
        ack_set: ack_set.to_vec(),
        ..Default::default()
    });
    crate::frame::OutFrame::with_payload(&cmd, headers_and_payload.clone())
}

//! LOOKUP and PARTITIONED_METADATA.

use magnetar_proto::frame::base;
use magnetar_proto::pulsar::{
    base_command::Type, command_get_topics_of_namespace::Mode,
    command_lookup_topic_response::LookupType, command_partitioned_topic_metadata_response as pmr,
    CommandGetTopicsOfNamespace, CommandGetTopicsOfNamespaceResponse, CommandLookupTopic,
    CommandLookupTopicResponse, CommandPartitionedTopicMetadata,
    CommandPartitionedTopicMetadataResponse,
};

use super::connection::{error_cmd, Conn, ConnRef};
use crate::ownership::LookupAnswer;
use crate::topic::partitioned;

/// The partition count of a topic (0: not partitioned); a namespace whose
/// policy creates partitioned topics on first use gets one here.
pub async fn partitioned_metadata(conn: ConnRef, c: CommandPartitionedTopicMetadata) {
    let answer = match Conn::topic_name(&c.topic) {
        Ok(name) => {
            let own = &conn.ctx.topics.ownership;
            partitioned::metadata_for(own.metadata(), &own.namespaces, &name).await
        }
        Err(e) => Err(e),
    };
    let mut r = base(Type::PartitionedMetadataResponse);
    r.partition_metadata_response = Some(match answer {
        Ok(n) => CommandPartitionedTopicMetadataResponse {
            partitions: Some(n),
            request_id: c.request_id,
            response: Some(pmr::LookupType::Success as i32),
            ..Default::default()
        },
        Err(e) => {
            tracing::info!(peer = %conn.peer, topic = %c.topic, error = %e, "partitioned metadata failed");
            CommandPartitionedTopicMetadataResponse {
                request_id: c.request_id,
                response: Some(pmr::LookupType::Failed as i32),
                error: Some({
                    super::connection::count_error(e.code());
                    e.code() as i32
                }),
                message: Some(e.to_string()),
                ..Default::default()
            }
        }
    });
    conn.shared.send(&r).await;
}

/// GET_TOPICS_OF_NAMESPACE: the persistent topics of a namespace (every
/// partition of the partitioned ones), unfiltered — the client matches its
/// pattern (`filtered` is false, as from a Pulsar broker without
/// server-side filtering).
pub async fn topics_of_namespace(conn: ConnRef, c: CommandGetTopicsOfNamespace) {
    let md = conn.ctx.topics.ownership.metadata();
    let answer = match c.mode.and_then(|m| Mode::try_from(m).ok()) {
        Some(Mode::NonPersistent) => Ok(Vec::new()),
        _ => partitioned::topics_of_namespace(md, &c.namespace).await,
    };
    match answer {
        Ok(topics) => {
            let mut r = base(Type::GetTopicsOfNamespaceResponse);
            r.get_topics_of_namespace_response = Some(CommandGetTopicsOfNamespaceResponse {
                request_id: c.request_id,
                topics,
                filtered: Some(false),
                topics_hash: None,
                changed: Some(true),
            });
            conn.shared.send(&r).await;
        }
        Err(e) => {
            tracing::info!(peer = %conn.peer, namespace = %c.namespace, error = %e, "topics of namespace failed");
            conn.shared.send(&error_cmd(c.request_id, &e)).await;
        }
    }
}

pub async fn lookup(conn: ConnRef, c: CommandLookupTopic) {
    let authoritative = c.authoritative.unwrap_or(false);
    let answer = match Conn::topic_name(&c.topic) {
        Ok(name) => conn.ctx.topics.ownership.lookup(&name, authoritative).await,
        Err(e) => Err(e),
    };
    let mut r = base(Type::LookupResponse);
    r.lookup_topic_response = Some(match answer {
        Ok(LookupAnswer::Connect { url, url_tls, .. }) => CommandLookupTopicResponse {
            broker_service_url: Some(url),
            broker_service_url_tls: url_tls,
            response: Some(LookupType::Connect as i32),
            request_id: c.request_id,
            authoritative: Some(true),
            ..Default::default()
        },
        Ok(LookupAnswer::Redirect { url, url_tls, .. }) => CommandLookupTopicResponse {
            broker_service_url: Some(url),
            broker_service_url_tls: url_tls,
            response: Some(LookupType::Redirect as i32),
            request_id: c.request_id,
            authoritative: Some(true),
            ..Default::default()
        },
        Err(e) => {
            tracing::info!(peer = %conn.peer, topic = %c.topic, error = %e, "lookup failed");
            CommandLookupTopicResponse {
                response: Some(LookupType::Failed as i32),
                request_id: c.request_id,
                error: Some({
                    super::connection::count_error(e.code());
                    e.code() as i32
                }),
                message: Some(e.to_string()),
                ..Default::default()
            }
        }
    });
    conn.shared.send(&r).await;
}

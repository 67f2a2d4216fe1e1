//! GET_SCHEMA and GET_OR_CREATE_SCHEMA (the schema registry is
//! `topic::schema`).

use magnetar_proto::frame::base;
use magnetar_proto::pulsar::{
    base_command::Type, CommandGetOrCreateSchema, CommandGetOrCreateSchemaResponse,
    CommandGetSchema, CommandGetSchemaResponse, ServerError,
};

use super::connection::{Conn, ConnRef};
use crate::topic::schema;
use crate::BrokerError;

pub async fn get(conn: ConnRef, c: CommandGetSchema) {
    let res = async {
        let name = Conn::topic_name(&c.topic)?;
        let version = c.schema_version.as_deref().and_then(schema::version_of);
        let md = conn.ctx.topics.ownership.metadata();
        schema::get(md, &name, version).await?.ok_or_else(|| {
            BrokerError::new(
                ServerError::TopicNotFound,
                format!(
                    "topic {name} has no schema{}",
                    match version {
                        Some(v) => format!(" version {v}"),
                        None => String::new(),
                    }
                ),
            )
        })
    }
    .await;
    let mut r = base(Type::GetSchemaResponse);
    r.get_schema_response = Some(match res {
        Ok(s) => CommandGetSchemaResponse {
            request_id: c.request_id,
            schema: Some(s.to_wire()),
            schema_version: Some(schema::version_bytes(s.version).into()),
            ..Default::default()
        },
        Err(e) => CommandGetSchemaResponse {
            request_id: c.request_id,
            error_code: Some(e.code() as i32),
            error_message: Some(e.to_string()),
            ..Default::default()
        },
    });
    conn.shared.send(&r).await;
}

pub async fn get_or_create(conn: ConnRef, c: CommandGetOrCreateSchema) {
    let res = async {
        let name = Conn::topic_name(&c.topic)?;
        let own = &conn.ctx.topics.ownership;
        schema::get_or_create(own.metadata(), &own.namespaces, &name, &c.schema).await
    }
    .await;
    let mut r = base(Type::GetOrCreateSchemaResponse);
    r.get_or_create_schema_response = Some(match res {
        Ok(v) => CommandGetOrCreateSchemaResponse {
            request_id: c.request_id,
            schema_version: Some(schema::version_bytes(v).into()),
            ..Default::default()
        },
        Err(e) => {
            tracing::info!(peer = %conn.peer, topic = %c.topic, error = %e, "schema refused");
            CommandGetOrCreateSchemaResponse {
                request_id: c.request_id,
                error_code: Some(e.code() as i32),
                error_message: Some(e.to_string()),
                ..Default::default()
            }
        }
    });
    conn.shared.send(&r).await;
}

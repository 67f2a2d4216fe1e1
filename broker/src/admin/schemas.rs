//! Pulsar's schemas resource, `/admin/v2/schemas/{tenant}/{ns}/{topic}/`:
//! `schema` (`GET` the latest, `POST` a new version as
//! `{"type", "schema", "properties"}`, `DELETE` every version),
//! `schema/{version}`, `schemas` (every version) and `compatibility` (would
//! a schema be accepted). Versions live in the metadata service, so any
//! broker answers.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use magnetar_proto::pulsar::Schema;
use serde::{Deserialize, Serialize};

use super::http::{AdminContext, ApiError};
use super::namespaces::parse_json;
use super::{error, topic_name, Answer};
use crate::topic::schema::{self, Candidate, StoredSchema};

type Ctx = State<Arc<AdminContext>>;

const BASE: &str = "/admin/v2/schemas/{tenant}/{ns}/{topic}";

pub fn routes() -> Router<Arc<AdminContext>> {
    Router::new()
        .route(
            &format!("{BASE}/schema"),
            get(latest).post(upload).delete(delete),
        )
        .route(&format!("{BASE}/schema/{{version}}"), get(version))
        .route(&format!("{BASE}/schemas"), get(all))
        .route(&format!("{BASE}/compatibility"), post(compatibility))
}

#[derive(Deserialize)]
struct TopicPath {
    tenant: String,
    ns: String,
    topic: String,
}

/// Pulsar's `GetSchemaResponse`.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct SchemaJson {
    version: u64,
    #[serde(rename = "type")]
    schema_type: &'static str,
    timestamp: u64,
    data: String,
    properties: BTreeMap<String, String>,
}

impl From<StoredSchema> for SchemaJson {
    fn from(s: StoredSchema) -> Self {
        SchemaJson {
            version: s.version,
            schema_type: schema::type_name(s.schema_type),
            timestamp: s.timestamp,
            data: String::from_utf8_lossy(&s.data_bytes()).into_owned(),
            properties: s.properties,
        }
    }
}

/// Pulsar's `PostSchemaPayload`.
#[derive(Deserialize)]
struct Upload {
    #[serde(rename = "type")]
    schema_type: String,
    #[serde(default)]
    schema: String,
    #[serde(default)]
    properties: BTreeMap<String, String>,
}

impl Upload {
    fn to_wire(&self) -> Result<Schema, ApiError> {
        let t = schema::type_of(&self.schema_type).ok_or_else(|| {
            ApiError(
                StatusCode::BAD_REQUEST,
                format!("unknown schema type {:?}", self.schema_type),
            )
        })?;
        Ok(Schema {
            name: String::new(),
            schema_data: self.schema.clone().into_bytes().into(),
            r#type: t,
            properties: magnetar_proto::commands::key_values(&self.properties),
        })
    }
}

fn not_found(what: String) -> axum::response::Response {
    ApiError(StatusCode::NOT_FOUND, what).into_response()
}

async fn latest(State(ctx): Ctx, Path(p): Path<TopicPath>) -> Answer {
    let name = topic_name(&p.tenant, &p.ns, &p.topic)?;
    match schema::get(&ctx.md, &name, None).await.map_err(error)? {
        Some(s) => Ok(Json(SchemaJson::from(s)).into_response()),
        None => Err(not_found(format!("topic {name} has no schema"))),
    }
}

async fn version(
    State(ctx): Ctx,
    Path((tenant, ns, topic, version)): Path<(String, String, String, u64)>,
) -> Answer {
    let name = topic_name(&tenant, &ns, &topic)?;
    match schema::get(&ctx.md, &name, Some(version))
        .await
        .map_err(error)?
    {
        Some(s) => Ok(Json(SchemaJson::from(s)).into_response()),
        None => Err(not_found(format!(
            "topic {name} has no schema version {version}"
        ))),
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct AllJson {
    get_schema_responses: Vec<SchemaJson>,
}

async fn all(State(ctx): Ctx, Path(p): Path<TopicPath>) -> Answer {
    let name = topic_name(&p.tenant, &p.ns, &p.topic)?;
    let versions = schema::versions(&ctx.md, &name).await.map_err(error)?;
    Ok(Json(AllJson {
        get_schema_responses: versions.into_iter().map(SchemaJson::from).collect(),
    })
    .into_response())
}

async fn upload(State(ctx): Ctx, Path(p): Path<TopicPath>, body: Bytes) -> Answer {
    let name = topic_name(&p.tenant, &p.ns, &p.topic)?;
    let up: Upload = parse_json(&body)?;
    let wire = up.to_wire()?;
    let own = &ctx.topics.ownership;
    let v = schema::get_or_create(&ctx.md, &own.namespaces, &name, &wire)
        .await
        .map_err(|e| match e.code() {
            magnetar_proto::pulsar::ServerError::IncompatibleSchema => {
                ApiError(StatusCode::CONFLICT, e.to_string()).into_response()
            }
            _ => error(e),
        })?;
    Ok(Json(serde_json::json!({ "version": v })).into_response())
}

async fn delete(State(ctx): Ctx, Path(p): Path<TopicPath>) -> Answer {
    let name = topic_name(&p.tenant, &p.ns, &p.topic)?;
    match schema::delete(&ctx.md, &name).await.map_err(error)? {
        Some(v) => Ok(Json(serde_json::json!({ "version": v })).into_response()),
        None => Err(not_found(format!("topic {name} has no schema"))),
    }
}

async fn compatibility(State(ctx): Ctx, Path(p): Path<TopicPath>, body: Bytes) -> Answer {
    let name = topic_name(&p.tenant, &p.ns, &p.topic)?;
    let up: Upload = parse_json(&body)?;
    let wire = up.to_wire()?;
    let own = &ctx.topics.ownership;
    let strategy = schema::strategy(&own.namespaces, &name)
        .await
        .map_err(error)?;
    let existing: Vec<Candidate> = schema::versions(&ctx.md, &name)
        .await
        .map_err(error)?
        .iter()
        .map(Candidate::from)
        .collect();
    let new = Candidate {
        schema_type: wire.r#type,
        data: wire.schema_data.to_vec(),
    };
    let ok = schema::compatible(strategy, &existing, &new).is_ok();
    Ok(Json(serde_json::json!({
        "isCompatible": ok,
        "schemaCompatibilityStrategy": strategy,
    }))
    .into_response())
}

//! Pulsar's tenants resource: `/admin/v2/tenants` (list) and
//! `/admin/v2/tenants/{tenant}` — create (`PUT`, 409 if it exists), read,
//! update (`POST`), delete (409 while it has namespaces). A tenant's record
//! is Pulsar's `TenantInfo` as JSON under `/tenants/<tenant>`.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use bytes::Bytes;
use magnetar_metadata::MetadataClient;
use serde::{Deserialize, Serialize};

use super::http::{AdminContext, ApiError};
use crate::{keys, BrokerError};

type Ctx = State<Arc<AdminContext>>;
type ApiResult<T> = Result<T, ApiError>;

/// Pulsar's `TenantInfo`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TenantInfo {
    #[serde(default)]
    pub admin_roles: Vec<String>,
    #[serde(default)]
    pub allowed_clusters: Vec<String>,
}

pub fn routes() -> Router<Arc<AdminContext>> {
    Router::new().route("/admin/v2/tenants", get(list)).route(
        "/admin/v2/tenants/{tenant}",
        get(read).put(create).post(update).delete(delete),
    )
}

/// Creates `tenant` unless it exists (start-up: the `public` tenant).
pub async fn ensure(md: &MetadataClient, tenant: &str, cluster: &str) -> Result<(), BrokerError> {
    let info = TenantInfo {
        admin_roles: vec![],
        allowed_clusters: vec![cluster.to_string()],
    };
    let value = serde_json::to_vec(&info).map_err(|e| BrokerError::NotServedHere(e.to_string()))?;
    md.cas(&keys::tenant(tenant), 0, value, None).await?;
    Ok(())
}

/// Whether `tenant` exists.
pub async fn exists(md: &MetadataClient, tenant: &str) -> Result<bool, BrokerError> {
    Ok(md.get(&keys::tenant(tenant)).await?.is_some())
}

fn not_found(tenant: &str) -> ApiError {
    ApiError(
        StatusCode::NOT_FOUND,
        format!("tenant {tenant} does not exist"),
    )
}

fn check_name(tenant: &str) -> ApiResult<()> {
    if magnetar_proto::is_valid_segment(tenant) {
        Ok(())
    } else {
        Err(ApiError(
            StatusCode::PRECONDITION_FAILED,
            format!("invalid tenant name {tenant:?}: [A-Za-z0-9-_.=:] only"),
        ))
    }
}

/// The body's `TenantInfo` (an empty body: allowed in this cluster).
fn parse_info(ctx: &AdminContext, body: &Bytes) -> ApiResult<TenantInfo> {
    let mut info: TenantInfo = if body.iter().all(u8::is_ascii_whitespace) {
        TenantInfo::default()
    } else {
        serde_json::from_slice(body)
            .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("not a TenantInfo: {e}")))?
    };
    if info.allowed_clusters.is_empty() {
        info.allowed_clusters.push(ctx.cluster.clone());
    }
    if let Some(c) = info.allowed_clusters.iter().find(|c| **c != ctx.cluster) {
        return Err(ApiError(
            StatusCode::PRECONDITION_FAILED,
            format!("cluster {c} does not exist (this is {})", ctx.cluster),
        ));
    }
    Ok(info)
}

async fn list(State(ctx): Ctx) -> ApiResult<Json<Vec<String>>> {
    let keys = ctx
        .md
        .range_keys(keys::TENANTS_PREFIX)
        .await
        .map_err(BrokerError::from)?;
    Ok(Json(
        keys.iter()
            .filter_map(|k| k.strip_prefix(keys::TENANTS_PREFIX))
            .map(String::from)
            .collect(),
    ))
}

async fn read(State(ctx): Ctx, Path(tenant): Path<String>) -> ApiResult<Json<TenantInfo>> {
    let kv = ctx
        .md
        .get(&keys::tenant(&tenant))
        .await
        .map_err(BrokerError::from)?
        .ok_or_else(|| not_found(&tenant))?;
    let info = serde_json::from_slice(&kv.value).unwrap_or_default();
    Ok(Json(info))
}

async fn create(State(ctx): Ctx, Path(tenant): Path<String>, body: Bytes) -> ApiResult<StatusCode> {
    check_name(&tenant)?;
    let info = parse_info(&ctx, &body)?;
    let value = serde_json::to_vec(&info).map_err(|e| BrokerError::NotServedHere(e.to_string()))?;
    if !ctx
        .md
        .cas(&keys::tenant(&tenant), 0, value, None)
        .await
        .map_err(BrokerError::from)?
    {
        return Err(ApiError(
            StatusCode::CONFLICT,
            format!("tenant {tenant} already exists"),
        ));
    }
    tracing::info!(%tenant, "tenant created");
    Ok(StatusCode::NO_CONTENT)
}

async fn update(State(ctx): Ctx, Path(tenant): Path<String>, body: Bytes) -> ApiResult<StatusCode> {
    let info = parse_info(&ctx, &body)?;
    let kv = ctx
        .md
        .get(&keys::tenant(&tenant))
        .await
        .map_err(BrokerError::from)?
        .ok_or_else(|| not_found(&tenant))?;
    let value = serde_json::to_vec(&info).map_err(|e| BrokerError::NotServedHere(e.to_string()))?;
    if !ctx
        .md
        .cas(&keys::tenant(&tenant), kv.version, value, None)
        .await
        .map_err(BrokerError::from)?
    {
        return Err(ApiError(
            StatusCode::CONFLICT,
            format!("tenant {tenant} changed meanwhile; retry"),
        ));
    }
    Ok(StatusCode::NO_CONTENT)
}

async fn delete(State(ctx): Ctx, Path(tenant): Path<String>) -> ApiResult<StatusCode> {
    if !exists(&ctx.md, &tenant).await? {
        return Err(not_found(&tenant));
    }
    let namespaces = ctx
        .md
        .range(&format!("{}{tenant}/", keys::NAMESPACES_PREFIX), 1)
        .await
        .map_err(BrokerError::from)?;
    if !namespaces.is_empty() {
        return Err(ApiError(
            StatusCode::CONFLICT,
            format!("tenant {tenant} still has namespaces; delete them first"),
        ));
    }
    ctx.md
        .delete(&keys::tenant(&tenant))
        .await
        .map_err(BrokerError::from)?;
    tracing::info!(%tenant, "tenant deleted");
    Ok(StatusCode::NO_CONTENT)
}

//! Pulsar's namespaces resource: `/admin/v2/namespaces/{tenant}` (list),
//! `/admin/v2/namespaces/{tenant}/{ns}` — create (`PUT`, with Pulsar's
//! `Policies` as an optional body: `bundles` as `{"numBundles": N}` or
//! boundaries, `autoTopicCreationOverride`), read the policies, delete
//! (409 while it has topics) — and the policies the broker acts on:
//! `.../autoTopicCreation` (`GET`, `POST`, `DELETE`).

use std::sync::Arc;

use axum::extract::Query;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;

use super::http::{AdminContext, ApiError};
use super::tenants;
use crate::ownership::bundle::Bundles;
use crate::ownership::namespaces::{
    self, AutoTopicCreation, BacklogQuota, DeadLetterPolicy, NamespacePolicies, RedeliveryBackoff,
    RetentionPolicies, Strategy, SIZE_QUOTA,
};
use crate::{keys, BrokerError};

type Ctx = State<Arc<AdminContext>>;
type ApiResult<T> = Result<T, ApiError>;

pub fn routes() -> Router<Arc<AdminContext>> {
    Router::new()
        .route("/admin/v2/namespaces/{tenant}", get(list))
        .route(
            "/admin/v2/namespaces/{tenant}/{ns}",
            get(read).put(create).delete(delete),
        )
        .route(
            "/admin/v2/namespaces/{tenant}/{ns}/retention",
            get(get_retention)
                .post(set_retention)
                .delete(remove_retention),
        )
        .route(
            "/admin/v2/namespaces/{tenant}/{ns}/messageTTL",
            get(get_ttl).post(set_ttl).delete(remove_ttl),
        )
        .route(
            "/admin/v2/namespaces/{tenant}/{ns}/backlogQuota",
            post(set_quota).delete(remove_quota),
        )
        .route(
            "/admin/v2/namespaces/{tenant}/{ns}/backlogQuotaMap",
            get(get_quotas),
        )
        .route(
            "/admin/v2/namespaces/{tenant}/{ns}/deadLetterPolicy",
            get(get_dead_letter)
                .post(set_dead_letter)
                .delete(remove_dead_letter),
        )
        .route(
            "/admin/v2/namespaces/{tenant}/{ns}/schemaCompatibilityStrategy",
            get(get_strategy).put(set_strategy).post(set_strategy),
        )
        .route(
            "/admin/v2/namespaces/{tenant}/{ns}/compactionThreshold",
            get(get_threshold)
                .post(set_threshold)
                .put(set_threshold)
                .delete(remove_threshold),
        )
        .route(
            "/admin/v2/namespaces/{tenant}/{ns}/redeliveryBackoff",
            get(get_backoff).post(set_backoff).delete(remove_backoff),
        )
        .route(
            "/admin/v2/namespaces/{tenant}/{ns}/deduplication",
            get(get_dedup).post(set_dedup).delete(remove_dedup),
        )
        .route(
            "/admin/v2/namespaces/{tenant}/{ns}/autoTopicCreation",
            get(get_auto_creation)
                .post(set_auto_creation)
                .delete(remove_auto_creation),
        )
}

fn bad(why: impl Into<String>) -> ApiError {
    ApiError(StatusCode::PRECONDITION_FAILED, why.into())
}

/// The policies of a create's body: Pulsar's `Policies`, of which
/// `bundles` and `autoTopicCreationOverride` are acted on.
fn parse_policies(body: &Bytes, default_bundles: usize) -> ApiResult<NamespacePolicies> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(NamespacePolicies {
            bundles: Some(Bundles::even(default_bundles)),
            ..Default::default()
        });
    }
    let mut v: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("not a Policies: {e}")))?;
    // `{"numBundles": N}` without boundaries: N even bundles.
    if let Some(b) = v.get_mut("bundles") {
        let has_bounds = b.get("boundaries").is_some_and(|x| !x.is_null());
        if !has_bounds {
            let n = b
                .get("numBundles")
                .and_then(|n| n.as_u64())
                .unwrap_or(default_bundles as u64);
            if n == 0 || n > 1 << 16 {
                return Err(bad(format!("numBundles must be 1 to 65536, not {n}")));
            }
            *b = serde_json::to_value(Bundles::even(n as usize)).map_err(|e| bad(e.to_string()))?;
        }
    }
    let mut p: NamespacePolicies = serde_json::from_value(v)
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("not a Policies: {e}")))?;
    match &p.bundles {
        Some(b) => {
            b.bounds().map_err(|e| bad(e.to_string()))?;
        }
        None => p.bundles = Some(Bundles::even(default_bundles)),
    }
    if let Some(a) = &p.auto_topic_creation {
        a.validate().map_err(bad)?;
    }
    Ok(p)
}

fn ns_name(tenant: &str, ns: &str) -> ApiResult<String> {
    if !magnetar_proto::is_valid_segment(ns) {
        return Err(bad(format!(
            "invalid namespace name {ns:?}: [A-Za-z0-9-_.=:] only"
        )));
    }
    Ok(format!("{tenant}/{ns}"))
}

async fn list(State(ctx): Ctx, Path(tenant): Path<String>) -> ApiResult<Json<Vec<String>>> {
    if !tenants::exists(&ctx.md, &tenant).await? {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("tenant {tenant} does not exist"),
        ));
    }
    let prefix = format!("{}{tenant}/", keys::NAMESPACES_PREFIX);
    let names = ctx
        .md
        .range_keys(&prefix)
        .await
        .map_err(BrokerError::from)?;
    Ok(Json(
        names
            .iter()
            .filter_map(|k| k.strip_prefix(keys::NAMESPACES_PREFIX))
            .map(String::from)
            .collect(),
    ))
}

async fn read(
    State(ctx): Ctx,
    Path((tenant, ns)): Path<(String, String)>,
) -> ApiResult<Json<NamespacePolicies>> {
    let (p, _) = ctx
        .topics
        .ownership
        .namespaces
        .get(&format!("{tenant}/{ns}"))
        .await?;
    Ok(Json((*p).clone()))
}

async fn create(
    State(ctx): Ctx,
    Path((tenant, ns)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<StatusCode> {
    let name = ns_name(&tenant, &ns)?;
    if !tenants::exists(&ctx.md, &tenant).await? {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("tenant {tenant} does not exist"),
        ));
    }
    let policies = parse_policies(&body, ctx.default_bundles)?;
    if !namespaces::create_with(&ctx.md, &name, policies).await? {
        return Err(ApiError(
            StatusCode::CONFLICT,
            format!("namespace {name} already exists"),
        ));
    }
    tracing::info!(namespace = %name, "namespace created");
    Ok(StatusCode::NO_CONTENT)
}

async fn delete(
    State(ctx): Ctx,
    Path((tenant, ns)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    let name = format!("{tenant}/{ns}");
    let own = &ctx.topics.ownership;
    own.namespaces.get(&name).await?;
    for prefix in [
        keys::managed_ledger(&format!("{name}/")),
        keys::partitioned(&format!("{name}/")),
    ] {
        let found = ctx.md.range(&prefix, 1).await.map_err(BrokerError::from)?;
        if let Some(kv) = found.first() {
            // The key's rest is `<domain>/<topic>`.
            let rest = kv.key.strip_prefix(&prefix).unwrap_or(&kv.key);
            let (domain, local) = rest.split_once('/').unwrap_or(("persistent", rest));
            let local = crate::topic::decode_key(local);
            return Err(ApiError(
                StatusCode::CONFLICT,
                format!(
                    "namespace {name} is not empty (it has topic {domain}://{name}/{local}); delete its topics first"
                ),
            ));
        }
    }
    ctx.md
        .delete(&keys::namespace(&name))
        .await
        .map_err(BrokerError::from)?;
    own.namespaces.invalidate(&name);
    tracing::info!(namespace = %name, "namespace deleted");
    Ok(StatusCode::NO_CONTENT)
}

/// The namespace's record, changed by `change`.
async fn update(
    ctx: &AdminContext,
    tenant: &str,
    ns: &str,
    change: impl Fn(&mut NamespacePolicies),
) -> ApiResult<StatusCode> {
    ctx.topics
        .ownership
        .namespaces
        .update(&format!("{tenant}/{ns}"), change)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn policies(ctx: &AdminContext, tenant: &str, ns: &str) -> ApiResult<Arc<NamespacePolicies>> {
    Ok(ctx
        .topics
        .ownership
        .namespaces
        .get(&format!("{tenant}/{ns}"))
        .await?
        .0)
}

/// A JSON body of type `T`.
pub fn parse_json<T: serde::de::DeserializeOwned>(body: &Bytes) -> ApiResult<T> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!("the body does not parse: {e}"),
        )
    })
}

async fn get_dead_letter(
    State(ctx): Ctx,
    Path((tenant, ns)): Path<(String, String)>,
) -> ApiResult<Json<Option<DeadLetterPolicy>>> {
    Ok(Json(
        policies(&ctx, &tenant, &ns)
            .await?
            .dead_letter_policy
            .clone(),
    ))
}

async fn set_dead_letter(
    State(ctx): Ctx,
    Path((tenant, ns)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<StatusCode> {
    let d: DeadLetterPolicy = parse_json(&body)?;
    d.validate().map_err(bad)?;
    update(&ctx, &tenant, &ns, |p| {
        p.dead_letter_policy = Some(d.clone())
    })
    .await
}

async fn remove_dead_letter(
    State(ctx): Ctx,
    Path((tenant, ns)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    update(&ctx, &tenant, &ns, |p| p.dead_letter_policy = None).await
}

async fn get_strategy(
    State(ctx): Ctx,
    Path((tenant, ns)): Path<(String, String)>,
) -> ApiResult<Json<Strategy>> {
    Ok(Json(
        policies(&ctx, &tenant, &ns)
            .await?
            .schema_compatibility_strategy
            .unwrap_or(Strategy::Undefined),
    ))
}

/// The body is the strategy's name as a JSON string (or bare).
async fn set_strategy(
    State(ctx): Ctx,
    Path((tenant, ns)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<StatusCode> {
    let text = std::str::from_utf8(&body).unwrap_or("").trim();
    let quoted = if text.starts_with('"') {
        text.to_string()
    } else {
        format!("\"{text}\"")
    };
    let s: Strategy = serde_json::from_str(&quoted).map_err(|_| {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!("unknown schema compatibility strategy {text}"),
        )
    })?;
    update(&ctx, &tenant, &ns, |p| {
        p.schema_compatibility_strategy = Some(s)
    })
    .await
}

async fn get_threshold(
    State(ctx): Ctx,
    Path((tenant, ns)): Path<(String, String)>,
) -> ApiResult<Json<Option<i64>>> {
    Ok(Json(
        policies(&ctx, &tenant, &ns).await?.compaction_threshold,
    ))
}

async fn set_threshold(
    State(ctx): Ctx,
    Path((tenant, ns)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<StatusCode> {
    let t: i64 = parse_json(&body)?;
    update(&ctx, &tenant, &ns, |p| p.compaction_threshold = Some(t)).await
}

async fn remove_threshold(
    State(ctx): Ctx,
    Path((tenant, ns)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    update(&ctx, &tenant, &ns, |p| p.compaction_threshold = None).await
}

async fn get_backoff(
    State(ctx): Ctx,
    Path((tenant, ns)): Path<(String, String)>,
) -> ApiResult<Json<Option<RedeliveryBackoff>>> {
    Ok(Json(policies(&ctx, &tenant, &ns).await?.redelivery_backoff))
}

async fn set_backoff(
    State(ctx): Ctx,
    Path((tenant, ns)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<StatusCode> {
    let b: RedeliveryBackoff = parse_json(&body)?;
    b.validate().map_err(bad)?;
    update(&ctx, &tenant, &ns, |p| p.redelivery_backoff = Some(b)).await
}

async fn remove_backoff(
    State(ctx): Ctx,
    Path((tenant, ns)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    update(&ctx, &tenant, &ns, |p| p.redelivery_backoff = None).await
}

async fn get_retention(
    State(ctx): Ctx,
    Path((tenant, ns)): Path<(String, String)>,
) -> ApiResult<Json<Option<RetentionPolicies>>> {
    Ok(Json(policies(&ctx, &tenant, &ns).await?.retention_policies))
}

async fn set_retention(
    State(ctx): Ctx,
    Path((tenant, ns)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<StatusCode> {
    let r: RetentionPolicies = parse_json(&body)?;
    r.validate().map_err(bad)?;
    update(&ctx, &tenant, &ns, |p| p.retention_policies = Some(r)).await
}

async fn remove_retention(
    State(ctx): Ctx,
    Path((tenant, ns)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    update(&ctx, &tenant, &ns, |p| p.retention_policies = None).await
}

async fn get_ttl(
    State(ctx): Ctx,
    Path((tenant, ns)): Path<(String, String)>,
) -> ApiResult<Json<Option<u32>>> {
    Ok(Json(
        policies(&ctx, &tenant, &ns).await?.message_ttl_in_seconds,
    ))
}

async fn set_ttl(
    State(ctx): Ctx,
    Path((tenant, ns)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<StatusCode> {
    let ttl: u32 = parse_json(&body)?;
    update(&ctx, &tenant, &ns, |p| p.message_ttl_in_seconds = Some(ttl)).await
}

async fn remove_ttl(
    State(ctx): Ctx,
    Path((tenant, ns)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    update(&ctx, &tenant, &ns, |p| p.message_ttl_in_seconds = None).await
}

/// `?backlogQuotaType=` (`destination_storage` when absent, as in Pulsar).
#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct QuotaType {
    backlog_quota_type: Option<String>,
}

impl QuotaType {
    pub fn kind(&self) -> String {
        self.backlog_quota_type
            .clone()
            .unwrap_or_else(|| SIZE_QUOTA.to_string())
    }
}

async fn get_quotas(
    State(ctx): Ctx,
    Path((tenant, ns)): Path<(String, String)>,
) -> ApiResult<Json<std::collections::BTreeMap<String, BacklogQuota>>> {
    Ok(Json(
        policies(&ctx, &tenant, &ns)
            .await?
            .backlog_quota_map
            .clone(),
    ))
}

async fn set_quota(
    State(ctx): Ctx,
    Path((tenant, ns)): Path<(String, String)>,
    Query(q): Query<QuotaType>,
    body: Bytes,
) -> ApiResult<StatusCode> {
    let quota: BacklogQuota = parse_json(&body)?;
    let kind = q.kind();
    quota.validate(&kind).map_err(bad)?;
    update(&ctx, &tenant, &ns, |p| {
        p.backlog_quota_map.insert(kind.clone(), quota);
    })
    .await
}

async fn remove_quota(
    State(ctx): Ctx,
    Path((tenant, ns)): Path<(String, String)>,
    Query(q): Query<QuotaType>,
) -> ApiResult<StatusCode> {
    let kind = q.kind();
    update(&ctx, &tenant, &ns, |p| {
        p.backlog_quota_map.remove(&kind);
    })
    .await
}

/// A boolean body, as Pulsar's tools send it.
pub fn parse_bool(body: &Bytes) -> ApiResult<bool> {
    match std::str::from_utf8(body).unwrap_or("").trim() {
        "true" => Ok(true),
        "false" => Ok(false),
        other => Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("the body must be true or false, not {other:?}"),
        )),
    }
}

async fn get_dedup(
    State(ctx): Ctx,
    Path((tenant, ns)): Path<(String, String)>,
) -> ApiResult<Json<Option<bool>>> {
    let (p, _) = ctx
        .topics
        .ownership
        .namespaces
        .get(&format!("{tenant}/{ns}"))
        .await?;
    Ok(Json(p.deduplication_enabled))
}

async fn set_dedup(
    State(ctx): Ctx,
    Path((tenant, ns)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<StatusCode> {
    let on = parse_bool(&body)?;
    ctx.topics
        .ownership
        .namespaces
        .update(&format!("{tenant}/{ns}"), |p| {
            p.deduplication_enabled = Some(on)
        })
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn remove_dedup(
    State(ctx): Ctx,
    Path((tenant, ns)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    ctx.topics
        .ownership
        .namespaces
        .update(&format!("{tenant}/{ns}"), |p| {
            p.deduplication_enabled = None
        })
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn get_auto_creation(
    State(ctx): Ctx,
    Path((tenant, ns)): Path<(String, String)>,
) -> ApiResult<Json<Option<AutoTopicCreation>>> {
    let (p, _) = ctx
        .topics
        .ownership
        .namespaces
        .get(&format!("{tenant}/{ns}"))
        .await?;
    Ok(Json(p.auto_topic_creation.clone()))
}

async fn set_auto_creation(
    State(ctx): Ctx,
    Path((tenant, ns)): Path<(String, String)>,
    Json(policy): Json<AutoTopicCreation>,
) -> ApiResult<StatusCode> {
    policy.validate().map_err(bad)?;
    ctx.topics
        .ownership
        .namespaces
        .update(&format!("{tenant}/{ns}"), |p| {
            p.auto_topic_creation = Some(policy.clone())
        })
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn remove_auto_creation(
    State(ctx): Ctx,
    Path((tenant, ns)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    ctx.topics
        .ownership
        .namespaces
        .update(&format!("{tenant}/{ns}"), |p| p.auto_topic_creation = None)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

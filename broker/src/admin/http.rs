//! The broker's HTTP server: Pulsar's admin REST paths and JSON shapes that
//! concern brokers and bundles, and the HTTP lookup. Routing and encoding
//! only; the work is done by `ownership`, `topic` and `load::commands`.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use bytes::Bytes;
use magnetar_metadata::MetadataClient;
use magnetar_proto::pulsar::ServerError;
use magnetar_proto::TopicName;
use serde::{Deserialize, Serialize};

use crate::load::commands::{self, Command};
use crate::managed_ledger::store::LedgerStore;
use crate::managed_ledger::{ManagedLedgerConfig, MlError};
use crate::ownership::bundle::BundleRange;
use crate::ownership::LookupAnswer;
use crate::topic::TopicRegistry;
use crate::BrokerError;

/// What the HTTP handlers reach.
pub struct AdminContext {
    pub topics: Arc<TopicRegistry>,
    pub md: MetadataClient,
    pub ledgers: Arc<dyn LedgerStore>,
    pub ml_cfg: ManagedLedgerConfig,
    pub cluster: String,
    /// Bundles of a namespace created without a split.
    pub default_bundles: usize,
    /// Topic and subscription series on `/metrics` (else namespace sums).
    pub expose_topic_level_metrics: bool,
    pub sub_rates: super::metrics::SubRates,
    /// This broker's Pulsar URL and the token its own client carries
    /// (health checks go through the Pulsar protocol like any client).
    pub service_url: String,
    pub token: Option<String>,
}

type Ctx = State<Arc<AdminContext>>;

/// An error as Pulsar's REST API returns it: a status and `{"reason"}`.
pub struct ApiError(pub StatusCode, pub String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        #[derive(Serialize)]
        struct Reason {
            reason: String,
        }
        (self.0, Json(Reason { reason: self.1 })).into_response()
    }
}

impl From<ApiError> for Response {
    fn from(e: ApiError) -> Response {
        e.into_response()
    }
}

impl From<BrokerError> for ApiError {
    fn from(e: BrokerError) -> Self {
        let status = match &e {
            BrokerError::InvalidTopicName(_) => StatusCode::PRECONDITION_FAILED,
            BrokerError::NamespaceNotFound(_) => StatusCode::NOT_FOUND,
            BrokerError::NotServedHere(_) => StatusCode::SERVICE_UNAVAILABLE,
            BrokerError::Refused { code, .. } => match code {
                ServerError::TopicNotFound | ServerError::SubscriptionNotFound => {
                    StatusCode::NOT_FOUND
                }
                ServerError::NotAllowedError
                | ServerError::ConsumerBusy
                | ServerError::ProducerBusy => StatusCode::PRECONDITION_FAILED,
                ServerError::ServiceNotReady => StatusCode::SERVICE_UNAVAILABLE,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            },
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        tracing::info!(%status, error = %e, "admin request failed");
        ApiError(status, e.to_string())
    }
}

type ApiResult<T> = Result<T, ApiError>;

pub fn router(ctx: Arc<AdminContext>) -> Router {
    Router::new()
        .route(
            "/lookup/v2/topic/{domain}/{tenant}/{ns}/{topic}",
            get(lookup),
        )
        .route("/admin/v2/brokers/health", get(health))
        .route("/admin/v2/brokers/ready", get(ready))
        .route("/admin/v2/brokers/log-level", put(set_log_level))
        .route("/metrics", get(super::metrics::handler))
        .route("/ready", get(ready))
        .route("/live", get(live))
        .route("/admin/v2/brokers/{cluster}", get(brokers))
        .route("/admin/v2/namespaces/{tenant}/{ns}/bundles", get(bundles))
        .route(
            "/admin/v2/namespaces/{tenant}/{ns}/{bundle}/unload",
            put(unload),
        )
        .route(
            "/admin/v2/namespaces/{tenant}/{ns}/{bundle}/split",
            put(split),
        )
        .merge(super::subscriptions::routes())
        .merge(super::tenants::routes())
        .merge(super::namespaces::routes())
        .merge(super::topics::routes())
        .merge(super::schemas::routes())
        .with_state(ctx)
}

/// Serves `router` on `listener` until the task is aborted.
pub async fn serve(listener: tokio::net::TcpListener, ctx: Arc<AdminContext>) {
    if let Err(e) = axum::serve(listener, router(ctx)).await {
        tracing::warn!(error = %e, "admin HTTP server stopped");
    }
}

/// Pulsar's LookupData.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LookupData {
    pub broker_url: String,
    pub broker_url_tls: Option<String>,
    pub http_url: Option<String>,
    pub http_url_tls: Option<String>,
    pub native_url: String,
}

#[derive(Deserialize)]
struct LookupQuery {
    #[serde(default)]
    authoritative: bool,
}

async fn lookup(
    State(ctx): Ctx,
    Path((domain, tenant, ns, topic)): Path<(String, String, String, String)>,
    Query(q): Query<LookupQuery>,
) -> ApiResult<Response> {
    let name = TopicName::parse(&format!("{domain}://{tenant}/{ns}/{topic}"))
        .map_err(BrokerError::from)?;
    let answer = ctx.topics.ownership.lookup(&name, q.authoritative).await?;
    Ok(match answer {
        LookupAnswer::Connect {
            url,
            url_tls,
            http_url,
        } => Json(LookupData {
            native_url: url.clone(),
            broker_url: url,
            broker_url_tls: url_tls,
            http_url,
            http_url_tls: None,
        })
        .into_response(),
        // Ask the chosen broker, authoritatively (as Pulsar redirects).
        LookupAnswer::Redirect {
            http_url: Some(h), ..
        } => {
            let to = format!(
                "{}/lookup/v2/topic/{domain}/{tenant}/{ns}/{topic}?authoritative=true",
                h.trim_end_matches('/')
            );
            (StatusCode::TEMPORARY_REDIRECT, [(header::LOCATION, to)]).into_response()
        }
        LookupAnswer::Redirect {
            url,
            url_tls,
            http_url: None,
        } => Json(LookupData {
            native_url: url.clone(),
            broker_url: url,
            broker_url_tls: url_tls,
            http_url: None,
            http_url_tls: None,
        })
        .into_response(),
    })
}

/// The active brokers of the cluster (Pulsar lists their `host:port`).
async fn brokers(State(ctx): Ctx, Path(cluster): Path<String>) -> ApiResult<Json<Vec<String>>> {
    if cluster != ctx.cluster {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("cluster {cluster} does not exist (this is {})", ctx.cluster),
        ));
    }
    let (brokers, _) = ctx.topics.ownership.cluster().await?;
    let mut ids: Vec<String> = brokers.into_iter().map(|b| b.info.broker_id).collect();
    ids.sort();
    Ok(Json(ids))
}

/// The process answers.
async fn live() -> &'static str {
    "ok"
}

/// Ready to serve topics: the broker holds its lease (so the metadata
/// service answers it) and is not stopping.
async fn ready(State(ctx): Ctx) -> ApiResult<&'static str> {
    let own = &ctx.topics.ownership;
    if !own.registration.is_valid() {
        return Err(ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "the broker does not hold its lease".into(),
        ));
    }
    if own.me().draining {
        return Err(ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "the broker is stopping".into(),
        ));
    }
    Ok("ok")
}

/// `PUT /admin/v2/brokers/log-level` with a filter as the body (`debug`,
/// `magnetar_broker=debug,info`).
async fn set_log_level(body: Bytes) -> ApiResult<StatusCode> {
    let filter = std::str::from_utf8(&body)
        .map_err(|_| ApiError(StatusCode::BAD_REQUEST, "the body is not UTF-8".into()))?
        .trim()
        .trim_matches('"')
        .to_string();
    crate::logs::set_filter(&filter).map_err(|e| ApiError(StatusCode::BAD_REQUEST, e))?;
    tracing::warn!(%filter, "log level changed");
    Ok(StatusCode::NO_CONTENT)
}

/// How long the health check's heartbeat round trip may take.
const HEALTH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The heartbeat topic of the broker `broker_id`.
pub fn heartbeat_topic(broker_id: &str) -> String {
    let id: String = broker_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("persistent://public/default/__heartbeat-{id}")
}

/// A message through the heartbeat topic, as a client sends and reads it:
/// produced over this broker's Pulsar listener and read back by a reader.
async fn heartbeat(ctx: &AdminContext) -> Result<(), String> {
    let mut b =
        magnetar_client::Client::builder(ctx.service_url.clone()).operation_timeout(HEALTH_TIMEOUT);
    if let Some(t) = &ctx.token {
        b = b.auth_token(t.clone());
    }
    let client = b.build().await.map_err(|e| format!("connecting: {e}"))?;
    let topic = heartbeat_topic(&ctx.topics.ownership.me().broker_id);
    let res = async {
        let producer = client
            .producer(topic.clone())
            .create()
            .await
            .map_err(|e| format!("producer on {topic}: {e}"))?;
        let probe = format!("health check {:?}", std::time::SystemTime::now());
        let id = producer
            .send(probe.clone().into_bytes())
            .await
            .map_err(|e| format!("sending to {topic}: {e}"))?;
        let mut reader = client
            .reader(topic.clone())
            .start_message_id(id)
            .start_message_id_inclusive(true)
            .create()
            .await
            .map_err(|e| format!("reader on {topic}: {e}"))?;
        let m = reader
            .next_message()
            .await
            .map_err(|e| format!("reading {topic}: {e}"))?;
        if m.payload.as_ref() != probe.as_bytes() {
            return Err(format!("{topic} gave back another message"));
        }
        Ok(())
    };
    let res = tokio::time::timeout(HEALTH_TIMEOUT, res)
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "no round trip through {topic} in {HEALTH_TIMEOUT:?}"
            ))
        });
    client.close().await;
    res
}

/// A real round trip: the lease is valid, a message goes through the
/// broker's heartbeat topic over the Pulsar protocol, and a ledger is
/// created on the bookies with the topics' quorums, written, read back and
/// deleted.
async fn health(State(ctx): Ctx) -> ApiResult<&'static str> {
    let fail = |what: String| ApiError(StatusCode::SERVICE_UNAVAILABLE, what);
    if !ctx.topics.ownership.registration.is_valid() {
        return Err(fail("the broker's lease is not valid".into()));
    }
    let c = &ctx.ml_cfg;
    let props = [(
        "health-check".to_string(),
        ctx.topics.ownership.me().broker_id,
    )]
    .into_iter()
    .collect();
    let w = ctx
        .ledgers
        .create(c.ensemble_size, c.write_quorum, c.ack_quorum, props)
        .await
        .map_err(|e| fail(format!("creating a ledger: {e}")))?;
    let probe = Bytes::from_static(b"magnetar health check");
    let res: Result<(), MlError> = async {
        let entry = w.add(probe.clone()).await?;
        let meta = w.close().await?;
        let back = ctx.ledgers.read(&meta, entry).await?;
        if back != probe {
            return Err(MlError::Corrupt(
                "health-check".into(),
                "read back differs".into(),
            ));
        }
        Ok(())
    }
    .await;
    let _ = ctx.ledgers.delete(w.ledger_id()).await;
    res.map_err(|e| fail(format!("writing to the bookies: {e}")))?;
    heartbeat(&ctx).await.map_err(fail)?;
    Ok("ok")
}

async fn bundles(
    State(ctx): Ctx,
    Path((tenant, ns)): Path<(String, String)>,
) -> ApiResult<Json<crate::ownership::bundle::Bundles>> {
    let (b, _) = ctx
        .topics
        .ownership
        .namespaces
        .bundles(&format!("{tenant}/{ns}"))
        .await?;
    Ok(Json(b))
}

fn bundle_name(tenant: &str, ns: &str, range: &str) -> ApiResult<String> {
    let r = BundleRange::parse(range)
        .map_err(|e| ApiError(StatusCode::PRECONDITION_FAILED, e.to_string()))?;
    Ok(format!("{tenant}/{ns}/{r}"))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct UnloadQuery {
    destination_broker: Option<String>,
}

async fn unload(
    State(ctx): Ctx,
    Path((tenant, ns, range)): Path<(String, String, String)>,
    Query(q): Query<UnloadQuery>,
) -> ApiResult<StatusCode> {
    let bundle = bundle_name(&tenant, &ns, &range)?;
    // A bundle of another namespace's split, or none at all: refuse.
    let (b, _) = ctx
        .topics
        .ownership
        .namespaces
        .bundles(&format!("{tenant}/{ns}"))
        .await?;
    if !b
        .ranges()
        .map_err(|e| BrokerError::NotServedHere(e.to_string()))?
        .iter()
        .any(|r| bundle.ends_with(&r.to_string()))
    {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("{bundle} is not a bundle of {tenant}/{ns}"),
        ));
    }
    let cmd = Command::Unload {
        bundle,
        destination: q.destination_broker,
    };
    // Unloading a bundle nobody owns has nothing to do.
    commands::on_owner(&ctx.topics, &ctx.md, cmd).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn split(
    State(ctx): Ctx,
    Path((tenant, ns, range)): Path<(String, String, String)>,
) -> ApiResult<StatusCode> {
    let bundle = bundle_name(&tenant, &ns, &range)?;
    let cmd = Command::Split {
        bundle: bundle.clone(),
    };
    if !commands::on_owner(&ctx.topics, &ctx.md, cmd.clone()).await? {
        // Nobody owns it: take it here, then split it.
        let own = &ctx.topics.ownership;
        let key = commands::parse_bundle(&bundle)?;
        let (_, version) = own.namespaces.bundles(&key.namespace).await?;
        if !own.acquire(&key, version).await? {
            return Err(ApiError(
                StatusCode::CONFLICT,
                format!("{bundle} changed meanwhile; retry"),
            ));
        }
        commands::execute(&ctx.topics, &cmd).await?;
    }
    Ok(StatusCode::NO_CONTENT)
}

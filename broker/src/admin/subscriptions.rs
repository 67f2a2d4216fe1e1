//! Pulsar's subscription REST resource on persistent topics:
//! `/admin/v2/persistent/{tenant}/{ns}/{topic}/subscriptions` (list) and
//! `.../subscription/{sub}` — create (`PUT`, at the latest message, or at the
//! message id in the body), delete (`DELETE`, `?force=true` disconnects its
//! consumers), `resetcursor/{timestamp}`, `resetcursor` (a message id in the
//! body), `skip/{n}`, `skip_all`, `expireMessages/{seconds}`. A topic this
//! broker does not own is answered with a redirect to its owner's HTTP
//! address, as Pulsar does.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use bytes::Bytes;
use serde::Deserialize;

use super::http::{AdminContext, ApiError};
use crate::managed_ledger::cursor::Position;
use crate::subscription::{SeekTarget, SubEvent, SubscriptionHandle};
use crate::topic::{persistent::Topic, InitialPosition};
use crate::BrokerError;

type Ctx = State<Arc<AdminContext>>;

const BASE: &str = "/admin/v2/persistent/{tenant}/{ns}/{topic}";

pub fn routes() -> Router<Arc<AdminContext>> {
    Router::new()
        .route(&format!("{BASE}/subscriptions"), get(list))
        .route(
            &format!("{BASE}/subscription/{{sub}}"),
            put(create).delete(delete),
        )
        .route(
            &format!("{BASE}/subscription/{{sub}}/resetcursor/{{timestamp}}"),
            post(reset_to_time),
        )
        .route(
            &format!("{BASE}/subscription/{{sub}}/resetcursor"),
            post(reset_to_id),
        )
        .route(
            &format!("{BASE}/subscription/{{sub}}/skip/{{n}}"),
            post(skip),
        )
        .route(
            &format!("{BASE}/subscription/{{sub}}/skip_all"),
            post(skip_all),
        )
        .route(
            &format!("{BASE}/subscription/{{sub}}/expireMessages/{{seconds}}"),
            post(expire),
        )
}

/// A topic and a subscription of it, from the path.
#[derive(Deserialize)]
struct SubPath {
    tenant: String,
    ns: String,
    topic: String,
    sub: String,
    /// The path's number, where it has one (timestamp, entries, seconds).
    #[serde(alias = "timestamp", alias = "seconds")]
    n: Option<u64>,
}

#[derive(Deserialize)]
struct TopicPath {
    tenant: String,
    ns: String,
    topic: String,
}

/// Pulsar's `MessageIdImpl` as JSON: `{"ledgerId", "entryId"}`; -1 for
/// the earliest, `Long.MAX_VALUE` for the latest.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct MessageIdJson {
    ledger_id: i64,
    entry_id: i64,
}

async fn owned(ctx: &AdminContext, t: &TopicPath, uri: &str) -> Result<Arc<Topic>, Response> {
    let name = super::topic_name(&t.tenant, &t.ns, &t.topic)?;
    super::owned(ctx, &name, uri).await
}

fn topic_path(p: &SubPath) -> TopicPath {
    TopicPath {
        tenant: p.tenant.clone(),
        ns: p.ns.clone(),
        topic: p.topic.clone(),
    }
}

/// The subscription of an owned topic, or 404.
async fn existing(
    ctx: &AdminContext,
    p: &SubPath,
    uri: &str,
) -> Result<(Arc<Topic>, SubscriptionHandle), Response> {
    let topic = owned(ctx, &topic_path(p), uri).await?;
    match topic.existing_subscription(&p.sub).await {
        Some(h) => Ok((topic, h)),
        None => {
            Err(ApiError(StatusCode::NOT_FOUND, "Subscription not found".into()).into_response())
        }
    }
}

fn done(res: Result<(), BrokerError>) -> Response {
    match res {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) if e.code() == magnetar_proto::pulsar::ServerError::ConsumerBusy => {
            ApiError(StatusCode::PRECONDITION_FAILED, e.to_string()).into_response()
        }
        Err(e) => ApiError::from(e).into_response(),
    }
}

use super::Answer;

async fn list(State(ctx): Ctx, Path(t): Path<TopicPath>, uri: Uri) -> Answer {
    let topic = owned(&ctx, &t, &uri.to_string()).await?;
    let mut names = topic.subscription_names().await;
    names.sort();
    Ok(Json(names).into_response())
}

async fn create(State(ctx): Ctx, Path(p): Path<SubPath>, uri: Uri, body: Bytes) -> Answer {
    let topic = owned(&ctx, &topic_path(&p), &uri.to_string()).await?;
    let fail = |status, reason: String| ApiError(status, reason).into_response();
    if topic.existing_subscription(&p.sub).await.is_some() {
        let reason = "Subscription already exists for topic".into();
        return Err(fail(StatusCode::CONFLICT, reason));
    }
    let at: Option<MessageIdJson> = if body.is_empty() {
        None
    } else {
        let id = serde_json::from_slice(&body)
            .map_err(|e| fail(StatusCode::BAD_REQUEST, format!("message id: {e}")))?;
        Some(id)
    };
    let initial = match &at {
        Some(id) if id.ledger_id < 0 => InitialPosition::Earliest,
        _ => InitialPosition::Latest,
    };
    let h = topic
        .subscription(&p.sub, initial)
        .await
        .map_err(|e| ApiError::from(e).into_response())?;
    if let Some(id) = at.filter(|id| id.ledger_id >= 0 && id.ledger_id < i64::MAX) {
        let target = SeekTarget::Position(Position::new(id.ledger_id as u64, id.entry_id));
        return Ok(done(h.ask(|reply| SubEvent::Seek { target, reply }).await));
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Deserialize)]
struct Force {
    #[serde(default)]
    force: bool,
}

async fn delete(
    State(ctx): Ctx,
    Path(p): Path<SubPath>,
    Query(q): Query<Force>,
    uri: Uri,
) -> Answer {
    let (topic, h) = existing(&ctx, &p, &uri.to_string()).await?;
    let force = q.force;
    let res = h.ask(|reply| SubEvent::Delete { force, reply }).await;
    if res.is_ok() {
        topic.forget_subscription(&p.sub).await;
    }
    Ok(done(res))
}

async fn reset_to_time(State(ctx): Ctx, Path(p): Path<SubPath>, uri: Uri) -> Answer {
    let (_, h) = existing(&ctx, &p, &uri.to_string()).await?;
    let target = SeekTarget::PublishTime(p.n.unwrap_or(0));
    Ok(done(h.ask(|reply| SubEvent::Seek { target, reply }).await))
}

async fn reset_to_id(
    State(ctx): Ctx,
    Path(p): Path<SubPath>,
    uri: Uri,
    Json(id): Json<MessageIdJson>,
) -> Answer {
    let (topic, h) = existing(&ctx, &p, &uri.to_string()).await?;
    let target = if id.ledger_id < 0 {
        SeekTarget::Position(topic.ml.before_first().bump())
    } else if id.ledger_id == i64::MAX {
        SeekTarget::Position(topic.ml.last_confirmed().bump())
    } else {
        SeekTarget::Position(Position::new(id.ledger_id as u64, id.entry_id))
    };
    Ok(done(h.ask(|reply| SubEvent::Seek { target, reply }).await))
}

async fn skip(State(ctx): Ctx, Path(p): Path<SubPath>, uri: Uri) -> Answer {
    let (_, h) = existing(&ctx, &p, &uri.to_string()).await?;
    let entries = p.n.unwrap_or(0);
    Ok(done(h.ask(|reply| SubEvent::Skip { entries, reply }).await))
}

async fn skip_all(State(ctx): Ctx, Path(p): Path<SubPath>, uri: Uri) -> Answer {
    let (_, h) = existing(&ctx, &p, &uri.to_string()).await?;
    let publish_time_ms = u64::MAX;
    Ok(done(
        h.ask(|reply| SubEvent::Expire {
            publish_time_ms,
            reply,
        })
        .await,
    ))
}

async fn expire(State(ctx): Ctx, Path(p): Path<SubPath>, uri: Uri) -> Answer {
    let (_, h) = existing(&ctx, &p, &uri.to_string()).await?;
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let seconds = p.n.unwrap_or(0);
    let publish_time_ms = now_ms.saturating_sub(seconds.saturating_mul(1000));
    Ok(done(
        h.ask(|reply| SubEvent::Expire {
            publish_time_ms,
            reply,
        })
        .await,
    ))
}

//! The admin REST API and HTTP lookups (`http.rs`: routing only; one file
//! per REST resource).

pub mod http;
pub mod metrics;
pub mod namespaces;
pub mod schemas;
pub mod subscriptions;
pub mod tenants;
pub mod topics;

use std::sync::Arc;

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use magnetar_proto::TopicName;

use crate::ownership::LookupAnswer;
use crate::topic::Topic;
use crate::BrokerError;
use http::{AdminContext, ApiError};

/// A handler's answer: an error response short-circuits with `?`.
pub type Answer = Result<Response, Response>;

pub fn error(e: BrokerError) -> Response {
    ApiError::from(e).into_response()
}

/// `persistent://{tenant}/{ns}/{topic}` from a REST path's parts.
pub fn topic_name(tenant: &str, ns: &str, topic: &str) -> Result<TopicName, ApiError> {
    TopicName::parse(&format!("persistent://{tenant}/{ns}/{topic}"))
        .map_err(|e| ApiError::from(BrokerError::from(e)))
}

/// Ok when this broker owns `name`'s bundle (claiming it if nobody does);
/// otherwise a redirect of the request (`uri`) to the owner, as Pulsar
/// answers admin calls on topics.
pub async fn here_or_redirect(ctx: &AdminContext, name: &TopicName, uri: &str) -> Answer {
    let answer = ctx
        .topics
        .ownership
        .lookup(name, false)
        .await
        .map_err(error)?;
    match answer {
        LookupAnswer::Connect { .. } => Ok(StatusCode::OK.into_response()),
        LookupAnswer::Redirect {
            http_url: Some(h), ..
        } => {
            let to = format!("{}{uri}", h.trim_end_matches('/'));
            Err((StatusCode::TEMPORARY_REDIRECT, [(header::LOCATION, to)]).into_response())
        }
        LookupAnswer::Redirect { url, .. } => Err(ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the topic is served by {url}, which has no HTTP address"),
        )
        .into_response()),
    }
}

/// The topic, loaded here when this broker owns it; otherwise a redirect
/// to the owner (or an error).
pub async fn owned(
    ctx: &AdminContext,
    name: &TopicName,
    uri: &str,
) -> Result<Arc<Topic>, Response> {
    here_or_redirect(ctx, name, uri).await?;
    ctx.topics.get_or_load(name).await.map_err(error)
}

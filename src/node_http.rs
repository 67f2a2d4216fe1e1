//! The HTTP listener of `magnetar bookie` and `magnetar metadata`:
//! `/metrics` (the process's recorder), `/live`, `/ready` (the node says
//! whether it can serve) and `PUT /log-level`. Brokers serve the same paths
//! from their admin server.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use axum::body::Bytes;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, put};
use axum::Router;

/// Whether the node can serve now; the reason when it cannot.
pub type Readiness = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// Binds `addr` and serves until the task is aborted.
pub async fn serve(
    addr: SocketAddr,
    ready: Readiness,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the HTTP listener {addr}"))?;
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/live", get(|| async { "ok" }))
        .route(
            "/ready",
            get(move || {
                let ready = ready.clone();
                async move {
                    match ready() {
                        Ok(()) => (StatusCode::OK, "ok".to_string()),
                        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, why),
                    }
                }
            }),
        )
        .route("/log-level", put(log_level));
    tracing::info!(%addr, "HTTP listening (/metrics, /ready, /live)");
    Ok(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::warn!(error = %e, "HTTP server stopped");
        }
    }))
}

async fn metrics() -> impl IntoResponse {
    let body = magnetar_broker::metrics::handle()
        .map(|h| h.render())
        .unwrap_or_default();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body)
}

async fn log_level(body: Bytes) -> (StatusCode, String) {
    let filter = String::from_utf8_lossy(&body)
        .trim()
        .trim_matches('"')
        .to_string();
    match magnetar_broker::logs::set_filter(&filter) {
        Ok(()) => {
            tracing::warn!(%filter, "log level changed");
            (StatusCode::NO_CONTENT, String::new())
        }
        Err(e) => (StatusCode::BAD_REQUEST, e),
    }
}

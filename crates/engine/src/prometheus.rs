//! The metrics listener (`metrics.prometheus`): plain HTTP on its own port,
//! kept off the TLS port so a scrape never competes with tunnel traffic.
//!
//! It serves the scrape at the configured path, guarded by
//! `bearer_token` when one is set (configuration refuses a non-loopback
//! address without one), and the health checks, which need no token so
//! orchestrator probes work without secrets.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;

use crate::Shared;
use crate::api::auth::{ApiError, bearer};

/// The OpenMetrics text format `prometheus-client` writes.
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Binds the listener if metrics are enabled and have an address.
pub async fn bind(shared_config: &crate::config::PrometheusConfig) -> Result<Option<TcpListener>, crate::StartError> {
    let (true, Some(addr)) = (shared_config.enabled, shared_config.listen_addr) else { return Ok(None) };
    TcpListener::bind(addr).await.map(Some).map_err(|source| crate::StartError::Bind {
        what: "metrics.prometheus.listen_addr",
        addr,
        source,
    })
}

pub fn router(shared: Arc<Shared>) -> Router {
    let path = shared.config.metrics.prometheus.path.clone();
    let mut router = Router::new().route(&path, get(scrape));
    for (health, handler) in [("/healthz", get(crate::api::healthz)), ("/readyz", get(ready))] {
        if health != path {
            router = router.route(health, handler);
        }
    }
    router.fallback(|| async { ApiError::not_found("no such endpoint") }).with_state(shared)
}

/// Serves until shutdown.
pub async fn serve(shared: Arc<Shared>, listener: TcpListener) {
    let shutdown = shared.shutdown.clone();
    let app = router(shared).into_make_service_with_connect_info::<SocketAddr>();
    if let Err(error) = axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await {
        tracing::error!(%error, "metrics listener failed");
    }
}

async fn ready(State(shared): State<Arc<Shared>>) -> Response {
    crate::api::readiness_response(&shared)
}

async fn scrape(
    State(shared): State<Arc<Shared>>,
    axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    if let Some(expected) = &shared.config.metrics.prometheus.bearer_token {
        let presented = bearer(&headers).ok().flatten().unwrap_or_default();
        if !bool::from(presented.as_bytes().ct_eq(expected.expose().as_bytes())) {
            shared.metrics.auth_failed();
            tracing::warn!(%peer, reason = "missing or wrong bearer token", "metrics scrape refused");
            return ApiError::unauthorized().into_response();
        }
    }
    shared.metrics.sync_certificates(shared.certs.reloads(), shared.certs.reload_failures());
    let mut response = shared.metrics.encode().into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
    response
}

//! The Engine API under `/api` on `engine.host` (HTTP/1.1 and HTTP/2 over
//! the TLS listener), plus the health checks.
//!
//! - [`inventory`]: `GET /api/clients`, `GET /api/tunnels` and one of each,
//!   `GET /api/reservations`; each shows a token its own principal's objects
//!   (an admin token's: everyone's);
//! - [`events`]: `GET /api/sse` and `GET /api/websocket`;
//! - [`openapi`]: `GET /api/openapi.json`, generated from [`model`];
//! - [`auth`]: the token check and the short error bodies.

pub mod auth;
pub mod events;
pub mod inventory;
pub mod model;
pub mod openapi;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Router};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

use crate::Shared;
use auth::{ApiError, Peer};

/// How long open requests get to finish once the engine shuts down. Watches
/// end at once; this only covers a list answer being written.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

pub fn router(shared: Arc<Shared>, peer: SocketAddr) -> Router {
    Router::new()
        .route("/api/openapi.json", get(openapi_json))
        .route("/api/clients", get(inventory::list_clients))
        .route("/api/clients/{id}", get(inventory::get_client))
        .route("/api/tunnels", get(inventory::list_tunnels))
        .route("/api/tunnels/{id}", get(inventory::get_tunnel))
        .route("/api/tunnels/{id}/cache", axum::routing::delete(inventory::purge_cache))
        .route("/api/reservations", get(inventory::list_reservations))
        .route("/api/sse", get(events::sse))
        .route("/api/websocket", get(events::websocket))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .fallback(|| async { ApiError::not_found("no such endpoint") })
        .layer(axum::middleware::from_fn(move |request, next| log_refusals(peer, request, next)))
        .layer(Extension(Peer(peer)))
        .with_state(shared)
}

/// One log line per refused request (401s are logged where the token is
/// checked, with the reason). Only the path is logged: the query may hold
/// `rstream.token`.
async fn log_refusals(peer: SocketAddr, request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let response = next.run(request).await;
    let status = response.status();
    if status.is_client_error() && status != StatusCode::UNAUTHORIZED {
        tracing::info!(%peer, %method, path, status = status.as_u16(), "API request refused");
    }
    response
}

/// This document.
#[utoipa::path(
    get,
    path = "/api/openapi.json",
    tag = "operations",
    responses((status = 200, description = "The OpenAPI 3.1 document", content_type = "application/json", body = Object))
)]
pub async fn openapi_json() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], openapi::document_text()).into_response()
}

/// Liveness: the process answers.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "operations",
    responses((status = 200, description = "Alive", body = String, content_type = "text/plain"))
)]
pub async fn healthz() -> &'static str {
    "ok\n"
}

/// Readiness: listeners up, a valid certificate loaded, not shutting down.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "operations",
    responses(
        (status = 200, description = "Ready", body = String, content_type = "text/plain"),
        (status = 503, description = "Not ready, and why", body = String, content_type = "text/plain"),
    )
)]
pub async fn readyz(State(shared): State<Arc<Shared>>) -> Response {
    readiness_response(&shared)
}

/// The `/readyz` answer, shared with the metrics listener.
pub fn readiness_response(shared: &Shared) -> Response {
    match shared.readiness() {
        Ok(()) => "ready\n".into_response(),
        Err(reason) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {reason}")).into_response(),
    }
}

/// Serves one API connection until the peer leaves or the engine shuts
/// down; then open requests get [`CLOSE_GRACE`] to finish.
pub async fn serve_connection(shared: Arc<Shared>, tls: TlsStream<TcpStream>, peer: SocketAddr) {
    let shutdown = shared.shutdown.clone();
    let service = TowerToHyperService::new(router(shared, peer));
    // A timer turns on hyper's HTTP/1 header read timeout (30 s), so a
    // client that trickles a request head cannot hold a connection forever.
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new());
    builder.http2().timer(TokioTimer::new());
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(tls), service);
    tokio::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        _ = shutdown.cancelled() => {
            connection.as_mut().graceful_shutdown();
            match tokio::time::timeout(CLOSE_GRACE, connection.as_mut()).await {
                Ok(result) => result,
                Err(_) => return,
            }
        }
    };
    if let Err(error) = result {
        tracing::debug!(%peer, %error, "API connection ended with an error");
    }
}

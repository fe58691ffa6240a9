//! The Engine API under `/api` on `engine.host` (HTTP/1.1 and HTTP/2 over
//! the TLS listener).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::routing::get;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

use crate::Shared;

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/api/openapi.json", get(openapi))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(shared)
}

async fn openapi() -> axum::Json<serde_json::Value> {
    axum::Json(serde_json::json!({
        "openapi": "3.1.0",
        "info": {"title": "strait Engine API", "version": env!("CARGO_PKG_VERSION")},
        "paths": {}
    }))
}

pub async fn serve_connection(shared: Arc<Shared>, tls: TlsStream<TcpStream>, peer: SocketAddr) {
    let service = TowerToHyperService::new(router(shared));
    if let Err(error) =
        auto::Builder::new(TokioExecutor::new()).serve_connection_with_upgrades(TokioIo::new(tls), service).await
    {
        tracing::debug!(%peer, %error, "API connection ended with an error");
    }
}

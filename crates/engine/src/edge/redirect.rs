//! The optional HTTP listener (`http.enabled`): every request gets a
//! permanent redirect to the same host, path and query over HTTPS.
//!
//! `308` keeps the method and body, so a form POST to `http://` lands as a
//! POST on `https://` instead of turning into a GET. The port is the TLS
//! port published addresses report, omitted when it is 443.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::uri::Authority;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::Shared;

/// How long a redirect connection may sit without sending a request.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

pub async fn run(shared: Arc<Shared>, listener: TcpListener) {
    crate::net::accept::accept_loop(shared, listener, "HTTP", serve).await;
}

async fn serve(shared: Arc<Shared>, tcp: tokio::net::TcpStream, _peer: SocketAddr) {
    let port = shared.public_port;
    let service =
        service_fn(move |request: Request<Incoming>| async move { Ok::<_, Infallible>(redirect(&request, port)) });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(TokioIo::new(tcp), service);
    tokio::select! {
        result = conn => {
            if let Err(error) = result {
                tracing::debug!(%error, "HTTP redirect connection ended with an error");
            }
        }
        _ = shared.shutdown.cancelled() => {}
    }
}

/// The redirect for one request, or 400 when it names no usable host.
pub fn redirect(request: &Request<Incoming>, port: u16) -> Response<Full<Bytes>> {
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.parse::<Authority>().ok())
        .map(|a| a.host().to_string())
        .or_else(|| request.uri().host().map(str::to_string));
    let target = request.uri().path_and_query().map(|pq| pq.as_str()).unwrap_or("/");
    let location = host.map(|host| match port {
        443 => format!("https://{host}{target}"),
        port => format!("https://{host}:{port}{target}"),
    });
    match location.and_then(|l| HeaderValue::try_from(l).ok()) {
        Some(location) => {
            let mut response = Response::new(Full::new(Bytes::new()));
            *response.status_mut() = StatusCode::PERMANENT_REDIRECT;
            response.headers_mut().insert(header::LOCATION, location);
            response
        }
        None => {
            let mut response = Response::new(Full::new(Bytes::from_static(b"bad request: no Host\n")));
            *response.status_mut() = StatusCode::BAD_REQUEST;
            response
        }
    }
}

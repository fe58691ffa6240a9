//! The stand-in services behind every tunnel, and the TLS bridge.

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpListener;

use crate::target::Target;

/// The body of every HTTP answer: small, like an API's JSON reply.
pub const BODY: &[u8] = b"{\"ok\":true,\"from\":\"strait-bench\"}\n";

async fn bind(listen: &str) -> anyhow::Result<TcpListener> {
    let listener = TcpListener::bind(listen).await?;
    crate::report(json!({"listen": listener.local_addr()?.to_string()}));
    Ok(listener)
}

pub async fn http(listen: &str) -> anyhow::Result<()> {
    let listener = bind(listen).await?;
    loop {
        let (tcp, _) = listener.accept().await?;
        let _ = tcp.set_nodelay(true);
        tokio::spawn(async move {
            let service = service_fn(|_req: Request<hyper::body::Incoming>| async {
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(BODY))))
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), service).await;
        });
    }
}

pub async fn echo(listen: &str) -> anyhow::Result<()> {
    echo_on(bind(listen).await?).await
}

/// Every connection gets back what it sends, until it half-closes.
pub async fn echo_on(listener: TcpListener) -> anyhow::Result<()> {
    loop {
        let (mut tcp, _) = listener.accept().await?;
        let _ = tcp.set_nodelay(true);
        tokio::spawn(async move {
            let (mut r, mut w) = tcp.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
        });
    }
}

pub async fn bridge(target: Target, listen: &str) -> anyhow::Result<()> {
    let listener = bind(listen).await?;
    loop {
        let (mut tcp, _) = listener.accept().await?;
        let _ = tcp.set_nodelay(true);
        let target = target.clone();
        tokio::spawn(async move {
            if let Ok(mut remote) = target.connect().await {
                let _ = strait_proto::splice::splice(&mut tcp, &mut remote).await;
            }
        });
    }
}

/// Requests per path seen by [`objects`].
type Counts = std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, u64>>>;

/// The edge-cache rows' origin: `GET /ANY/PATH/BYTES` answers BYTES bytes
/// marked immutable (`Cache-Control: public, max-age=31536000, immutable`),
/// so any cache in front may keep it; `GET /_count/ANY/PATH/BYTES` answers,
/// in an `x-count` header, how many requests reached the origin for that
/// path (not counted itself).
pub async fn objects(listen: &str) -> anyhow::Result<()> {
    let listener = bind(listen).await?;
    let counts = Counts::default();
    loop {
        let (tcp, _) = listener.accept().await?;
        let _ = tcp.set_nodelay(true);
        let counts = counts.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                let counts = counts.clone();
                async move { Ok::<_, Infallible>(object(&req, &counts)) }
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), service).await;
        });
    }
}

fn object(req: &Request<hyper::body::Incoming>, counts: &Counts) -> Response<crate::soak::services::Paced> {
    use crate::soak::services::Paced;
    let path = req.uri().path();
    let mut counts = counts.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(counted) = path.strip_prefix("/_count") {
        let n = counts.get(counted).copied().unwrap_or(0);
        return Response::builder()
            .header("x-count", n)
            .body(Paced::new(0))
            .unwrap_or_else(|_| Response::new(Paced::new(0)));
    }
    *counts.entry(path.to_string()).or_default() += 1;
    let Some(bytes) = path.rsplit('/').next().and_then(|s| s.parse::<usize>().ok()) else {
        return Response::builder().status(404).body(Paced::new(0)).unwrap_or_else(|_| Response::new(Paced::new(0)));
    };
    Response::builder()
        .header("cache-control", "public, max-age=31536000, immutable")
        .header("etag", format!("\"{bytes}\""))
        .header("content-type", "application/octet-stream")
        .body(Paced::new(bytes))
        .unwrap_or_else(|_| Response::new(Paced::new(0)))
}

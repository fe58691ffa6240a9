//! The demo tunnel of `strait-engine dev`: a tiny local HTTP service,
//! published through a real agent over real TLS, so the very first command
//! a user runs ends in a curl that works.
//!
//! The agent here is the same library the `strait` CLI uses; it dials the
//! engine exactly as a remote agent would (TLS, ALPN `rstrm/1`, a token),
//! so the demo proves the whole path, not an in-process shortcut.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;

use bytes::Bytes;
use http::{Request, Response, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use strait_agent::{Client, ClientConfig};
use strait_proto::TunnelProperties;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// A running demo: the public URL and the tasks serving it.
pub struct Demo {
    /// `https://<label>.t.localhost:<port>/`
    pub url: String,
}

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("cannot start the demo service: {0}")]
    Io(#[from] std::io::Error),
    #[error("the demo agent could not publish its tunnel: {0}")]
    Agent(#[from] strait_agent::AgentError),
    #[error("the engine returned a tunnel without a hostname")]
    NoHostname,
}

/// Starts the demo service and publishes it through `engine_addr`, trusting
/// `ca`. Everything stops when `stop` is cancelled.
pub async fn start(
    engine_addr: SocketAddr,
    ca: &Path,
    token: String,
    stop: CancellationToken,
) -> Result<Demo, DemoError> {
    let service = TcpListener::bind("127.0.0.1:0").await?;
    let service_addr = service.local_addr()?;
    tokio::spawn(serve(service, stop.clone()));

    let mut config = ClientConfig::new(format!("localhost:{}", engine_addr.port()), Some(token));
    config.ca_file = Some(ca.to_path_buf());
    let control = Client::new(config)?.connect().await?;
    let properties = TunnelProperties {
        name: Some("demo".into()),
        publish: Some(true),
        protocol: Some("http".into()),
        labels: [("app".to_string(), "strait-demo".to_string())].into(),
        ..Default::default()
    };
    let mut tunnel = control.open_tunnel(properties).await?;
    let url = tunnel.public_url().ok_or(DemoError::NoHostname)? + "/";
    tokio::spawn(async move {
        tokio::select! {
            _ = stop.cancelled() => { let _ = control.close().await; }
            _ = tunnel.forward(service_addr.to_string()) => {}
        }
    });
    Ok(Demo { url })
}

async fn serve(listener: TcpListener, stop: CancellationToken) {
    loop {
        let (tcp, _) = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(_) => continue,
            },
        };
        tokio::spawn(async move {
            let _ =
                auto::Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(tcp), service_fn(answer)).await;
        });
    }
}

async fn answer(request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let header = |name: &str| request.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or("-").to_string();
    let body = format!(
        "Hello from strait!\n\n\
         This answer came from a local service, through the strait agent,\n\
         over TLS to the engine and out of a published tunnel.\n\n  \
         request:         {method} {uri}\n  \
         host:            {host}\n  \
         forwarded for:   {xff}\n  \
         forwarded proto: {xfp}\n",
        method = request.method(),
        uri = request.uri(),
        host = header("x-forwarded-host"),
        xff = header("x-forwarded-for"),
        xfp = header("x-forwarded-proto"),
    );
    Ok(Response::builder()
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts are valid"))
}

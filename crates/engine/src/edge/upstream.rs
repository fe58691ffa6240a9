//! The agent side of a published tunnel: agent streams, TLS to the agent's
//! service (`upstream_tls`), and the pool of HTTP connections over streams.
//!
//! Every agent stream costs a round trip on the control channel and a new
//! TLS connection from the agent, so HTTP connections to the agent are kept
//! and reused: per public connection, HTTP/1.1 connections wait in a small
//! idle list (one per request in flight at most) and an `h2c` connection is
//! shared by every request. Keeping the pool per public connection keeps
//! the `source_ip` the agent sees true for every request on a stream.

use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::errors::Refusal;
use crate::Shared;
use crate::metrics::GaugeGuard;
use crate::registry::Tunnel;
use crate::streams;

/// Request bodies towards the agent.
pub type UpBody = UnsyncBoxBody<Bytes, BoxError>;
/// A request body's error: the client's (hyper's) or the edge's own (a
/// body over the policy's limit).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Idle HTTP/1.1 connections kept per tunnel per public connection. A
/// browser multiplexing on HTTP/2 rarely has more requests in flight than
/// this; beyond it, finished connections are closed rather than hoarded.
const MAX_IDLE: usize = 8;

/// How long a pooled connection may take to report ready. A connection
/// that finished its response is ready at once; one that is still closing
/// is not worth waiting for.
const READY_WAIT: Duration = Duration::from_millis(250);

pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// An agent stream, counted for metrics while it lives.
pub struct AgentStream {
    io: Box<dyn Io>,
    shared: Arc<Shared>,
    towards_agent: u64,
    from_agent: u64,
    _guard: GaugeGuard,
}

impl Drop for AgentStream {
    fn drop(&mut self) {
        self.shared.metrics.stream_bytes(self.towards_agent, self.from_agent);
    }
}

impl AsyncRead for AgentStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        self.from_agent += (buf.filled().len() - before) as u64;
        polled
    }
}

impl AsyncWrite for AgentStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = polled {
            self.towards_agent += n as u64;
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Whether the tunnel's service speaks HTTP/2 without TLS (`http_version`
/// `h2c`, or `h2`, taken as the same).
pub fn h2c(tunnel: &Tunnel) -> bool {
    matches!(tunnel.properties.http_version.as_deref(), Some("h2c") | Some("h2"))
}

/// Opens a stream to the tunnel's agent, with TLS inside it when the
/// tunnel asks for `upstream_tls` (offering `alpns`).
pub async fn open(
    shared: &Arc<Shared>,
    tunnel: &Tunnel,
    source: IpAddr,
    alpns: &[&[u8]],
) -> Result<AgentStream, Refusal> {
    let asked = Instant::now();
    let (stream_id, agent) = streams::open_to_agent(shared, tunnel, source).await.map_err(Refusal::from_stream)?;
    let guard = shared.metrics.stream_started("published", Some(asked.elapsed()));
    tracing::debug!(tunnel_id = %tunnel.id, %stream_id, %source, "agent stream opened");
    let io: Box<dyn Io> = if tunnel.properties.upstream_tls == Some(true) {
        let connector = tokio_rustls::TlsConnector::from(upstream_tls_config(alpns));
        let name = tunnel.hostname().and_then(|h| ServerName::try_from(h.to_string()).ok());
        let name = name.unwrap_or_else(|| ServerName::try_from("localhost").expect("a valid name"));
        let deadline = Duration::from_secs(shared.config.timeouts.stream_request_seconds);
        match tokio::time::timeout(deadline, connector.connect(name, agent)).await {
            Ok(Ok(tls)) => Box::new(tls),
            Ok(Err(error)) => return Err(Refusal::Upstream(format!("TLS to the agent's service failed: {error}"))),
            Err(_) => return Err(Refusal::Timeout),
        }
    } else {
        Box::new(agent)
    };
    Ok(AgentStream { io, shared: shared.clone(), towards_agent: 0, from_agent: 0, _guard: guard })
}

/// TLS towards the agent's own service. The certificate is not verified:
/// the service is the agent's local one, usually self-signed, and the agent
/// that carries the bytes is already authenticated; the TLS is there for
/// services that only speak TLS.
fn upstream_tls_config(alpns: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let provider = crate::crypto_provider();
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("the ring provider supports the default versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
        .with_no_client_auth();
    config.alpn_protocols = alpns.iter().map(|a| a.to_vec()).collect();
    Arc::new(config)
}

#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A connection ready to carry one request.
pub enum Sender {
    H1(http1::SendRequest<UpBody>),
    H2(http2::SendRequest<UpBody>),
}

/// A request that failed, and the request itself when it was never sent
/// (so it may be sent again elsewhere).
pub type SendFailure = (hyper::Error, Option<Request<UpBody>>);

impl Sender {
    pub async fn send(&mut self, request: Request<UpBody>) -> Result<Response<Incoming>, SendFailure> {
        let result = match self {
            Sender::H1(sender) => sender.try_send_request(request).await,
            Sender::H2(sender) => sender.try_send_request(request).await,
        };
        result.map_err(|mut e| {
            let message = e.take_message();
            (e.into_error(), message)
        })
    }
}

/// A sender and whether it already served a request (a reused connection
/// may have been closed by the service meanwhile; a fresh one was not).
pub struct Lease {
    pub sender: Sender,
    pub reused: bool,
}

/// HTTP connections to one tunnel's agent, for one public connection.
pub struct Pool {
    shared: Arc<Shared>,
    tunnel: Arc<Tunnel>,
    source: IpAddr,
    h2c: bool,
    idle: Mutex<Vec<http1::SendRequest<UpBody>>>,
    h2: tokio::sync::Mutex<Option<http2::SendRequest<UpBody>>>,
}

impl Pool {
    pub fn new(shared: Arc<Shared>, tunnel: Arc<Tunnel>, source: IpAddr) -> Self {
        let h2c = h2c(&tunnel);
        Self { shared, tunnel, source, h2c, idle: Mutex::new(Vec::new()), h2: tokio::sync::Mutex::new(None) }
    }

    pub fn tunnel(&self) -> &Arc<Tunnel> {
        &self.tunnel
    }

    /// A connection for one request. Upgrades (WebSocket, CONNECT) always
    /// get a fresh HTTP/1.1 connection: it becomes the tunnel for the
    /// upgraded bytes and never returns to the pool.
    pub async fn lease(&self, upgrade: bool) -> Result<Lease, Refusal> {
        if upgrade {
            return Ok(Lease { sender: Sender::H1(self.open_h1().await?), reused: false });
        }
        if self.h2c {
            return self.h2_sender(false).await;
        }
        while let Some(mut sender) = self.pop_idle() {
            if sender.is_closed() {
                continue;
            }
            if let Ok(Ok(())) = tokio::time::timeout(READY_WAIT, sender.ready()).await {
                return Ok(Lease { sender: Sender::H1(sender), reused: true });
            }
        }
        Ok(Lease { sender: Sender::H1(self.open_h1().await?), reused: false })
    }

    /// A connection that has not served anything yet, for a retry.
    pub async fn fresh(&self) -> Result<Lease, Refusal> {
        if self.h2c {
            return self.h2_sender(true).await;
        }
        Ok(Lease { sender: Sender::H1(self.open_h1().await?), reused: false })
    }

    fn pop_idle(&self) -> Option<http1::SendRequest<UpBody>> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop()
    }

    /// Returns a connection whose response ended cleanly.
    pub fn give_back(&self, sender: http1::SendRequest<UpBody>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < MAX_IDLE {
            idle.push(sender);
        }
    }

    async fn open_h1(&self) -> Result<http1::SendRequest<UpBody>, Refusal> {
        let io = open(&self.shared, &self.tunnel, self.source, &[b"http/1.1"]).await?;
        self.h1_over(io).await
    }

    /// Takes an idle HTTP/1.1 agent stream the relay used, so the requests
    /// hyper serves next reuse it.
    pub async fn adopt(&self, io: AgentStream) {
        if let Ok(sender) = self.h1_over(io).await {
            self.give_back(sender);
        }
    }

    async fn h1_over(&self, io: AgentStream) -> Result<http1::SendRequest<UpBody>, Refusal> {
        let (sender, conn) = http1::Builder::new()
            .preserve_header_case(true)
            .title_case_headers(false)
            .handshake(TokioIo::new(io))
            .await
            .map_err(|e| Refusal::Upstream(e.to_string()))?;
        let tunnel_id = self.tunnel.id.clone();
        self.shared.tasks.spawn(async move {
            if let Err(error) = conn.with_upgrades().await {
                tracing::debug!(%tunnel_id, %error, "agent HTTP/1.1 connection ended with an error");
            }
        });
        Ok(sender)
    }

    async fn h2_sender(&self, replace: bool) -> Result<Lease, Refusal> {
        let mut slot = self.h2.lock().await;
        if !replace && let Some(sender) = slot.as_ref().filter(|s| !s.is_closed()) {
            return Ok(Lease { sender: Sender::H2(sender.clone()), reused: true });
        }
        let io = open(&self.shared, &self.tunnel, self.source, &[b"h2"]).await?;
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(TokioIo::new(io))
            .await
            .map_err(|e| Refusal::Upstream(e.to_string()))?;
        let tunnel_id = self.tunnel.id.clone();
        self.shared.tasks.spawn(async move {
            if let Err(error) = conn.await {
                tracing::debug!(%tunnel_id, %error, "agent h2c connection ended with an error");
            }
        });
        *slot = Some(sender.clone());
        Ok(Lease { sender: Sender::H2(sender), reused: false })
    }
}

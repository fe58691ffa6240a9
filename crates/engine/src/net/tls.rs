//! The TLS port: accept, read the ClientHello, route on (SNI, ALPN).
//!
//! - `rstrm/1` anywhere but the tunnel namespace: the agent protocol;
//! - other ALPNs on `engine.host` (or no SNI): the Engine API;
//! - names under `.t.<engine.host>`: published tunnels.
//!
//! The accept loop only accepts and spawns; the ClientHello read and the
//! handshake run inside the connection's task under a deadline, so a slow
//! client never stalls anyone else.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rustls::server::{Accepted, Acceptor};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::StartHandshake;

use super::Transport;
use super::accept::accept_loop;
use crate::admission::HandshakeSlot;
use crate::{Shared, channel, edge};

/// The largest ClientHello we wait for. Post-quantum key shares make them
/// grow past 1 KiB; 64 KiB is far beyond any real client.
const MAX_CLIENT_HELLO: usize = 64 * 1024;

/// Where a connection goes, decided from its ClientHello.
#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    Agent,
    Api,
    Tunnel(String),
}

impl Route {
    /// The `route` field of the connection's span.
    pub fn name(&self) -> &'static str {
        match self {
            Route::Agent => "agent",
            Route::Api => "api",
            Route::Tunnel(_) => "tunnel",
        }
    }
}

pub fn route(engine_host: &str, sni: Option<&str>, offers_rstrm: bool) -> Route {
    if let Some(sni) = sni {
        let sni = sni.to_ascii_lowercase();
        if sni.strip_suffix(engine_host).is_some_and(|rest| rest.ends_with(".t.") && rest.len() > 3) {
            return Route::Tunnel(sni);
        }
    }
    if offers_rstrm { Route::Agent } else { Route::Api }
}

/// Accepts on the TLS port until shutdown.
pub async fn run(shared: Arc<Shared>, listener: TcpListener) {
    accept_loop(shared, listener, "TLS", handle).await;
}

/// Reads the ClientHello into a rustls `Acceptor`, keeping the raw bytes so
/// a passthrough tunnel can replay them to its agent. Generic over the
/// reader so the fuzz targets feed it from memory.
pub async fn read_client_hello<IO: AsyncRead + Unpin>(tcp: &mut IO) -> io::Result<(Accepted, Bytes)> {
    let mut acceptor = Acceptor::default();
    // Read straight into the heap: a buffer on this future's stack would
    // stay in the connection task's memory for as long as it lives.
    let mut raw = Vec::with_capacity(2048);
    loop {
        let start = raw.len();
        raw.reserve(2048);
        let n = tcp.read_buf(&mut raw).await?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed before a complete ClientHello"));
        }
        if raw.len() > MAX_CLIENT_HELLO {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "ClientHello too large"));
        }
        let mut fed = &raw[start..];
        while !fed.is_empty() {
            acceptor.read_tls(&mut fed)?;
        }
        match acceptor.accept() {
            Ok(Some(accepted)) => return Ok((accepted, Bytes::from(raw))),
            Ok(None) => continue,
            Err((error, _alert)) => {
                return Err(io::Error::new(io::ErrorKind::InvalidData, format!("not a TLS ClientHello: {error}")));
            }
        }
    }
}

/// Every branch below is boxed: a task's future is one allocation the size
/// of its largest state, so an unboxed HTTP/2-capable API branch would make
/// every spliced stream and idle agent pay for it.
async fn handle(shared: Arc<Shared>, mut tcp: TcpStream, peer: SocketAddr) {
    // Admitted before a byte is read: the slot is this connection's place
    // among its source's handshakes, given back once the handshake is over.
    let slot = match shared.admission.admit(peer.ip()) {
        Ok(slot) => slot,
        Err(refusal) => {
            shared.refused(peer.ip(), refusal);
            drop(tcp);
            return;
        }
    };
    let deadline = Duration::from_secs(shared.config.limits.handshake_seconds);
    let (accepted, raw_hello) = match tokio::time::timeout(deadline, Box::pin(read_client_hello(&mut tcp))).await {
        Ok(Ok(hello)) => hello,
        Ok(Err(error)) => {
            tracing::debug!(%error, "connection dropped before TLS");
            shared.metrics.tls_handshake_failed();
            return;
        }
        Err(_) => {
            tracing::debug!("no ClientHello within {}s", deadline.as_secs());
            shared.metrics.tls_handshake_failed();
            return;
        }
    };
    let hello = accepted.client_hello();
    let offers_rstrm = hello.alpn().is_some_and(|mut alpns| alpns.any(|a| a == strait_proto::ALPN));
    let route = route(&shared.config.engine.host, hello.server_name(), offers_rstrm);
    tracing::Span::current().record("route", route.name());
    match route {
        Route::Agent => {
            // Only passthrough tunnels replay the raw ClientHello.
            drop(raw_hello);
            Box::pin(agent_route(shared, accepted, tcp, peer, slot)).await;
        }
        Route::Api => {
            drop(raw_hello);
            Box::pin(api_route(shared, accepted, tcp, peer, slot)).await;
        }
        Route::Tunnel(hostname) => {
            let connection = edge::Connection { accepted, tcp, raw_hello, hostname, peer, slot };
            Box::pin(edge::serve(shared, connection)).await
        }
    }
}

/// The server TLS handshake, under `limits.handshake_seconds`, in its own
/// allocation: its state (a whole TLS connection in the middle of its
/// handshake) is freed when it completes rather than staying inside the
/// connection's task for its lifetime. A failure is counted and logged here,
/// once; `what` names the route in that line.
pub async fn handshake<IO>(
    shared: &Shared,
    start: StartHandshake<IO>,
    config: Arc<rustls::ServerConfig>,
    what: &'static str,
) -> Option<tokio_rustls::server::TlsStream<IO>>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let deadline = Duration::from_secs(shared.config.limits.handshake_seconds);
    let error = match tokio::time::timeout(deadline, Box::pin(start.into_stream(config))).await {
        Ok(Ok(tls)) => return Some(tls),
        Ok(Err(error)) => error.to_string(),
        Err(_) => format!("no handshake within {}s", deadline.as_secs()),
    };
    shared.metrics.tls_handshake_failed();
    tracing::debug!(route = what, %error, "TLS handshake failed");
    None
}

/// An agent-protocol connection: the TLS handshake, then the channel it
/// carries. The handshake runs in its own allocation, so the connection's
/// long-lived state is only what its kind needs.
async fn agent_route(shared: Arc<Shared>, accepted: Accepted, tcp: TcpStream, peer: SocketAddr, slot: HandshakeSlot) {
    let start = StartHandshake::from_parts(accepted, tcp);
    let Some(tls) = handshake(&shared, start, shared.tls.agent.clone(), "agent").await else { return };
    channel::serve(shared, Box::new(tls), peer, Transport::Tls, Some(slot)).await;
}

async fn api_route(shared: Arc<Shared>, accepted: Accepted, tcp: TcpStream, peer: SocketAddr, slot: HandshakeSlot) {
    let start = StartHandshake::from_parts(accepted, tcp);
    let tls = handshake(&shared, start, shared.tls.api.clone(), "api").await;
    drop(slot);
    if let Some(tls) = tls {
        crate::api::serve_connection(shared, tls, peer).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        let h = "edge.example.com";
        assert_eq!(route(h, Some("edge.example.com"), true), Route::Agent);
        assert_eq!(route(h, Some("edge.example.com"), false), Route::Api);
        assert_eq!(route(h, None, true), Route::Agent);
        assert_eq!(route(h, None, false), Route::Api);
        assert_eq!(route(h, Some("App.t.edge.example.com"), false), Route::Tunnel("app.t.edge.example.com".into()));
        assert_eq!(route(h, Some("app.t.edge.example.com"), true), Route::Tunnel("app.t.edge.example.com".into()));
        assert_eq!(route(h, Some(".t.edge.example.com"), false), Route::Api);
        assert_eq!(route(h, Some("x.t.other.example.com"), true), Route::Agent);
    }
}

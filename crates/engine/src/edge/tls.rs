//! `tls` tunnels, and the TLS options every published tunnel may set.
//!
//! - `terminated`: the engine completes the handshake with its certificate
//!   (`tls_min_version`, `tls_ciphers` and `tls_alpns` apply), then splices
//!   the plaintext into the agent stream;
//! - `passthrough`: the engine never decrypts. It replays the ClientHello
//!   bytes it read for routing into the agent stream and splices the rest,
//!   so the client completes its handshake with the agent's own service.
//!
//! A source outside `trusted_ips` gets a closed connection, before any
//! handshake.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use rustls::server::Accepted;
use rustls::{ServerConfig, SupportedProtocolVersion};
use strait_proto::TunnelProperties;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::StartHandshake;

use super::upstream::{self, AgentStream};
use crate::Shared;
use crate::admission::HandshakeSlot;
use crate::registry::Tunnel;

/// Whether the tunnel narrows the engine's default TLS settings.
pub fn has_options(p: &TunnelProperties) -> bool {
    p.tls_min_version.is_some() || !p.tls_ciphers.is_empty() || !p.tls_alpns.is_empty()
}

/// The server configuration for a tunnel's own TLS options, built once per
/// tunnel. It serves the engine's certificate store, so reloads apply here
/// too.
pub fn tunnel_config(
    shared: &Shared,
    tunnel: &Tunnel,
    alpns: Vec<Vec<u8>>,
) -> Result<Arc<ServerConfig>, rustls::Error> {
    if let Some(config) = tunnel.tls_config.get() {
        return Ok(config.clone());
    }
    let config = server_config(shared, &tunnel.properties, alpns)?;
    // Two first connections at once may both build one; either is right.
    Ok(tunnel.tls_config.get_or_init(|| config).clone())
}

fn server_config(
    shared: &Shared,
    p: &TunnelProperties,
    alpns: Vec<Vec<u8>>,
) -> Result<Arc<ServerConfig>, rustls::Error> {
    let mut provider = rustls::crypto::ring::default_provider();
    if !p.tls_ciphers.is_empty() {
        provider.cipher_suites.retain(|suite| {
            let name = suite.suite().as_str().unwrap_or_default();
            p.tls_ciphers.iter().any(|wanted| wanted.eq_ignore_ascii_case(name))
        });
    }
    let versions: &[&SupportedProtocolVersion] = match p.tls_min_version.as_deref() {
        Some("1.3") => &[&rustls::version::TLS13],
        _ => &[&rustls::version::TLS13, &rustls::version::TLS12],
    };
    let mut config = ServerConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(versions)?
        .with_no_client_auth()
        .with_cert_resolver(shared.certs.clone());
    config.alpn_protocols = alpns;
    Ok(Arc::new(config))
}

pub async fn serve(
    shared: Arc<Shared>,
    tunnel: Arc<Tunnel>,
    accepted: Accepted,
    tcp: TcpStream,
    raw_hello: Bytes,
    peer: SocketAddr,
    slot: HandshakeSlot,
) {
    if !tunnel.spec.allows(peer.ip()) {
        tracing::info!(tunnel_id = %tunnel.id, "connection refused: source address not in trusted_ips");
        return;
    }
    if tunnel.properties.tls_mode.as_deref() == Some("passthrough") {
        // The engine's part of the handshake is over: the rest is the agent's.
        drop(slot);
        passthrough(shared, tunnel, tcp, raw_hello, peer).await;
    } else {
        drop(raw_hello);
        terminated(shared, tunnel, accepted, tcp, peer, slot).await;
    }
}

async fn passthrough(shared: Arc<Shared>, tunnel: Arc<Tunnel>, mut tcp: TcpStream, raw_hello: Bytes, peer: SocketAddr) {
    let Some(mut agent) = open_agent(&shared, &tunnel, peer, &[]).await else { return };
    if let Err(error) = agent.write_all(&raw_hello).await {
        tracing::debug!(%error, "agent stream closed before the ClientHello was replayed");
        return;
    }
    drop(raw_hello);
    splice_to_agent(&shared, &mut tcp, &mut agent).await;
}

async fn terminated(
    shared: Arc<Shared>,
    tunnel: Arc<Tunnel>,
    accepted: Accepted,
    tcp: TcpStream,
    peer: SocketAddr,
    slot: HandshakeSlot,
) {
    let alpns = tunnel.properties.tls_alpns.iter().map(|a| a.as_bytes().to_vec()).collect();
    let config = match tunnel_config(&shared, &tunnel, alpns) {
        Ok(config) => config,
        Err(error) => {
            tracing::warn!(tunnel_id = %tunnel.id, %error, "tunnel TLS options unusable");
            return;
        }
    };
    let start = StartHandshake::from_parts(accepted, tcp);
    let public = crate::net::tls::handshake(&shared, start, config, "tls tunnel").await;
    drop(slot);
    let Some(mut public) = public else { return };
    // The negotiated protocol, offered again to a TLS upstream.
    let alpn = public.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
    let offer: Vec<&[u8]> = alpn.as_deref().into_iter().collect();
    let Some(mut agent) = open_agent(&shared, &tunnel, peer, &offer).await else {
        let _ = public.shutdown().await;
        return;
    };
    splice_to_agent(&shared, &mut public, &mut agent).await;
}

/// A stream to the tunnel's agent; a refusal is logged with its detail,
/// which the public side never sees (it gets a closed connection).
async fn open_agent(shared: &Arc<Shared>, tunnel: &Tunnel, peer: SocketAddr, alpns: &[&[u8]]) -> Option<AgentStream> {
    match upstream::open(shared, tunnel, peer.ip(), alpns).await {
        Ok(agent) => Some(agent),
        Err(refusal) => {
            let status = refusal.status().as_u16();
            tracing::warn!(tunnel_id = %tunnel.id, status, reason = %refusal.detail(), "TLS connection refused");
            None
        }
    }
}

/// Carries a `tls` tunnel's bytes until either side ends or the engine's
/// drain is over.
async fn splice_to_agent<P>(shared: &Shared, public: &mut P, agent: &mut AgentStream)
where
    P: AsyncRead + AsyncWrite + Unpin,
{
    tokio::select! {
        result = strait_proto::splice::splice(public, agent) => {
            if let Err(error) = result {
                tracing::debug!(%error, "TLS tunnel connection ended with an error");
            }
        }
        _ = shared.abort.cancelled() => {}
    }
}

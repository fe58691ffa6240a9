//! The QUIC port: agents on QUIC (ALPN `rstrm/1`), beside the TLS port.
//!
//! One QUIC connection per agent. Every bidirectional stream the agent
//! opens carries exactly what one TLS connection would (its control
//! channel, a reverse dial, a private dial) and goes to the same handler,
//! [`channel::serve`]. The engine never opens streams itself.
//!
//! Admission is the TLS port's: a source's handshake slot is held from the
//! first packet until its first stream's first frame, the per-source rate
//! applies to new connections, and `limits.max_connections` caps them (a
//! refused one gets QUIC's CONNECTION_REFUSED at once). A connection that
//! opens no stream within `limits.first_frame_seconds` is closed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::QuicServerConfig;
use quinn::{Endpoint, Incoming, VarInt};
use rustls::crypto::CryptoProvider;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::Instrument;

use super::Transport;
use crate::admission::HandshakeSlot;
use crate::certs::CertStore;
use crate::config::QuicConfig;
use crate::{Shared, channel};

/// Application close codes the engine sends.
pub mod close {
    use quinn::VarInt;

    /// The engine is shutting down or the agent is done.
    pub const NORMAL: VarInt = VarInt::from_u32(0);
    /// No stream was opened within `limits.first_frame_seconds`.
    pub const NO_STREAM: VarInt = VarInt::from_u32(1);
}

/// The server configuration: TLS 1.3 (QUIC has no other), ALPN `rstrm/1`
/// only, the engine's certificate store (so reloads apply), datagrams on.
pub fn server_config(
    certs: Arc<CertStore>,
    provider: Arc<CryptoProvider>,
    quic: &QuicConfig,
) -> Result<quinn::ServerConfig, rustls::Error> {
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_cert_resolver(certs);
    tls.alpn_protocols = vec![strait_proto::ALPN.to_vec()];
    let crypto = QuicServerConfig::try_from(tls).map_err(|e| rustls::Error::General(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_concurrent_bidi_streams(VarInt::from_u64(quic.max_streams_per_connection).unwrap_or(VarInt::MAX))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .max_idle_timeout(Some(
            Duration::from_secs(quic.idle_timeout_seconds).try_into().expect("at most an hour fits a VarInt"),
        ))
        // The engine keeps the connection alive itself: whether an agent
        // is still there is its control channel's liveness to decide (a
        // heartbeat interval may be far longer than the idle timeout); the
        // idle timeout only finds peers that no longer answer at all.
        .keep_alive_interval(Some(Duration::from_secs(quic.idle_timeout_seconds) / 3))
        .datagram_receive_buffer_size(Some(quic.max_datagram_bytes * 1024))
        .datagram_send_buffer_size(quic.max_datagram_bytes * 1024);
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// Binds the QUIC endpoint, on a socket with large kernel buffers: a
/// burst of handshakes (or of their closes) waits there instead of being
/// dropped while the engine is busy.
pub fn bind(config: quinn::ServerConfig, addr: SocketAddr) -> std::io::Result<Endpoint> {
    let socket = super::udp_socket(addr)?;
    Endpoint::new(quinn::EndpointConfig::default(), Some(config), socket, Arc::new(quinn::TokioRuntime))
}

/// Accepts QUIC connections until shutdown.
pub async fn run(shared: Arc<Shared>, endpoint: Endpoint) {
    let permits = Arc::new(Semaphore::new(shared.config.limits.max_connections));
    loop {
        let incoming = tokio::select! {
            _ = shared.shutdown.cancelled() => break,
            incoming = endpoint.accept() => incoming,
        };
        let Some(incoming) = incoming else { break };
        let peer = incoming.remote_address();
        // A refusal is QUIC's CONNECTION_REFUSED, sent at once.
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            shared.refused(peer.ip(), crate::admission::Refusal::Capacity);
            incoming.refuse();
            continue;
        };
        let slot = match shared.admission.admit(peer.ip()) {
            Ok(slot) => slot,
            Err(refusal) => {
                shared.refused(peer.ip(), refusal);
                incoming.refuse();
                continue;
            }
        };
        let span = tracing::info_span!("conn", listener = "QUIC", %peer, route = "agent");
        shared.tasks.spawn(connection(shared.clone(), incoming, peer, slot, permit).instrument(span));
    }
    // Streams in flight keep their connections; new ones are refused.
    endpoint.set_server_config(None);
}

/// One agent's QUIC connection: the handshake, then a task per stream.
async fn connection(
    shared: Arc<Shared>,
    incoming: Incoming,
    peer: SocketAddr,
    slot: HandshakeSlot,
    _permit: OwnedSemaphorePermit,
) {
    let deadline = Duration::from_secs(shared.config.limits.handshake_seconds);
    let connecting = match incoming.accept() {
        Ok(connecting) => connecting,
        Err(error) => {
            shared.metrics.quic_handshake_failed();
            tracing::debug!(%error, "QUIC connection refused before its handshake");
            return;
        }
    };
    let conn = match tokio::time::timeout(deadline, connecting).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(error)) => {
            shared.metrics.quic_handshake_failed();
            tracing::debug!(%error, "QUIC handshake failed");
            return;
        }
        Err(_) => {
            shared.metrics.quic_handshake_failed();
            tracing::debug!("no QUIC handshake within {}s", deadline.as_secs());
            return;
        }
    };
    let _open = shared.metrics.quic_connection();
    tracing::debug!("QUIC connection up");
    tokio::spawn(crate::datagram::read_datagrams(shared.clone(), conn.clone()));
    let transport = Transport::Quic(conn.clone());
    let first_stream = Duration::from_secs(shared.config.limits.first_frame_seconds);
    let mut slot = Some(slot);
    loop {
        let accepted = tokio::select! {
            _ = shared.shutdown.cancelled() => break,
            _ = tokio::time::sleep(first_stream), if slot.is_some() => {
                tracing::warn!("QUIC connection closed: no stream within {}s", first_stream.as_secs());
                conn.close(close::NO_STREAM, b"no stream opened in time");
                break;
            }
            accepted = conn.accept_bi() => accepted,
        };
        match accepted {
            Ok((send, recv)) => {
                let io = Box::new(strait_proto::quic::QuicStream::new(send, recv));
                let serve = channel::serve(shared.clone(), io, peer, transport.clone(), slot.take());
                shared.tasks.spawn(serve.in_current_span());
            }
            Err(error) => {
                tracing::debug!(%error, "QUIC connection ended");
                break;
            }
        }
    }
}

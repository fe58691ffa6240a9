//! Published TCP tunnels: a public port of their own, each connection a
//! stream to the agent, spliced byte for byte.
//!
//! The listener lives as long as its tunnel: closing the tunnel, revoking
//! it or losing its control channel closes the port and cuts the live
//! connections (during a shutdown they drain with everything else).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use tokio::net::{TcpListener, TcpStream};

use crate::Shared;
use crate::registry::Tunnel;

use super::upstream;

/// Accepts on `listener` until the tunnel closes or the engine shuts down.
pub async fn run(shared: Arc<Shared>, tunnel: Arc<Tunnel>, listener: TcpListener) {
    loop {
        let accepted = tokio::select! {
            _ = tunnel.closed.cancelled() => break,
            _ = shared.shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((tcp, peer)) => {
                shared.tasks.spawn(connection(shared.clone(), tunnel.clone(), tcp, peer));
            }
            // Out of descriptors or a connection reset before it was
            // accepted: the listener itself is fine.
            Err(error) => {
                tracing::warn!(tunnel_id = %tunnel.id, %error, "tcp accept failed");
                tokio::task::yield_now().await;
            }
        }
    }
    tracing::debug!(tunnel_id = %tunnel.id, "tcp port closed");
}

async fn connection(shared: Arc<Shared>, tunnel: Arc<Tunnel>, mut tcp: TcpStream, peer: SocketAddr) {
    if !tunnel.spec.allows(peer.ip()) {
        tracing::info!(tunnel_id = %tunnel.id, %peer, "tcp connection refused: source address not in trusted_ips");
        return;
    }
    let _ = tcp.set_nodelay(true);
    let _open = shared.metrics.published_connection("tcp");
    let started = Instant::now();
    let mut agent = match upstream::open(&shared, &tunnel, peer.ip(), &[]).await {
        Ok(agent) => agent,
        Err(refusal) => {
            tracing::warn!(tunnel_id = %tunnel.id, %peer, reason = %refusal.detail(), "tcp connection refused");
            return;
        }
    };
    let outcome = tokio::select! {
        result = strait_proto::splice::splice(&mut tcp, &mut agent) => Some(result),
        _ = cut(&shared, &tunnel) => None,
    };
    match outcome {
        Some(Ok((inbound, outbound))) => tracing::debug!(
            tunnel_id = %tunnel.id, %peer, inbound, outbound, seconds = started.elapsed().as_secs_f64(),
            "tcp connection ended"
        ),
        Some(Err(error)) => {
            tracing::debug!(tunnel_id = %tunnel.id, %peer, %error, "tcp connection ended with an error")
        }
        None => tracing::info!(tunnel_id = %tunnel.id, %peer, "tcp connection cut: its tunnel closed"),
    }
}

/// Resolves when a live connection of `tunnel` must be cut: its tunnel
/// closed, except during a shutdown, where the drain's end decides.
pub async fn cut(shared: &Shared, tunnel: &Tunnel) {
    tokio::select! {
        _ = shared.abort.cancelled() => {}
        _ = tunnel.closed.cancelled() => {
            if shared.shutdown.is_cancelled() {
                shared.abort.cancelled().await;
            }
        }
    }
}

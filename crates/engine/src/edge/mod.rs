//! Published tunnels: traffic for `<label>.t.<engine.host>` on the TLS port,
//! the optional HTTP listener that redirects to it, and the public ports of
//! published TCP ([`tcp`]) and UDP ([`udp`]) tunnels (bound by
//! [`crate::net::ports`], served from [`serve_port`]).
//!
//! The listener hands over a connection whose SNI is under the namespace,
//! with the ClientHello already read. What happens next depends on the
//! tunnel that holds the name:
//!
//! - a `tls` tunnel: [`tls`] terminates or passes through, then splices;
//! - an `http` tunnel, or no tunnel at all: [`http`] terminates TLS and
//!   serves HTTP/1.1 or HTTP/2, forwarding each request over pooled agent
//!   connections ([`upstream`]) or answering with a status page
//!   ([`errors`]) when it cannot. Plain HTTP/1.1 requests take the
//!   [`relay`], which passes heads and bodies through without hyper and
//!   leaves everything else to it.
//!
//! [`access`] decides `trusted_ips` and `token_auth`; [`activity`] keeps
//! the idle timer away from busy connections, and [`websocket`] writes the
//! close frame of a WebSocket the timer ends; [`redirect`] is the HTTP
//! listener.

pub mod access;
pub mod activity;
mod body;
pub mod cache;
pub mod chunked;
pub mod errors;
pub mod headers;
pub mod http;
pub mod redirect;
pub mod relay;
pub mod route;
pub mod tcp;
pub mod tls;
pub mod udp;
pub mod upstream;
pub mod websocket;

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use rustls::server::Accepted;
use tokio::net::TcpStream;

use crate::Shared;
use crate::admission::HandshakeSlot;
use crate::net::ports::Bound;
use crate::registry::Tunnel;

/// A public connection as the listener hands it over: the ClientHello read,
/// its SNI under the tunnel namespace.
pub struct Connection {
    pub accepted: Accepted,
    pub tcp: TcpStream,
    /// The ClientHello as it arrived, for a passthrough tunnel to replay.
    pub raw_hello: Bytes,
    /// The SNI, lower case.
    pub hostname: String,
    pub peer: SocketAddr,
    /// The connection's place among its source's handshakes; dropped once
    /// the TLS handshake is over (or, for passthrough, at once).
    pub slot: HandshakeSlot,
}

/// Serves one public connection.
pub async fn serve(shared: Arc<Shared>, connection: Connection) {
    let Connection { accepted, tcp, raw_hello, hostname, peer, slot } = connection;
    let tunnel = shared.registry.tunnel_by_hostname(&hostname);
    match tunnel {
        Some(tunnel) if tunnel.spec.kind == crate::tunnel::Kind::Tls => {
            Box::pin(tls::serve(shared, tunnel, accepted, tcp, raw_hello, peer, slot)).await;
        }
        tunnel => {
            // Held to the end of the connection otherwise.
            drop(raw_hello);
            Box::pin(http::serve(shared, tunnel, accepted, tcp, hostname, peer, slot)).await
        }
    }
}

/// Serves a published tcp or udp tunnel's port for as long as the tunnel
/// lives.
pub fn serve_port(shared: &Arc<Shared>, tunnel: Arc<Tunnel>, bound: Bound) {
    match bound {
        Bound::Tcp(listener) => shared.tasks.spawn(tcp::run(shared.clone(), tunnel, listener)),
        Bound::Udp(socket) => shared.tasks.spawn(udp::run(shared.clone(), tunnel, socket)),
    };
}

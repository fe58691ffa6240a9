//! Published tunnels: traffic for `<label>.t.<engine.host>`.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use rustls::server::Accepted;
use tokio::net::TcpStream;

use crate::Shared;

pub async fn serve(
    _shared: Arc<Shared>,
    _accepted: Accepted,
    _tcp: TcpStream,
    _raw_hello: Bytes,
    hostname: String,
    peer: SocketAddr,
) {
    tracing::debug!(%peer, %hostname, "published tunnels are not served yet");
}

//! A tunnel, agent side: the properties the engine serves and the streams
//! it sends.

use std::sync::Arc;

use strait_proto::TunnelProperties;
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::AgentError;
use crate::client::Stream;
use crate::control::Inner;

pub struct Tunnel {
    control: Arc<Inner>,
    properties: TunnelProperties,
    incoming: mpsc::Receiver<Stream>,
}

impl Tunnel {
    pub(crate) fn new(control: Arc<Inner>, properties: TunnelProperties, incoming: mpsc::Receiver<Stream>) -> Self {
        Self { control, properties, incoming }
    }

    pub fn id(&self) -> &str {
        self.properties.id.as_deref().unwrap_or_default()
    }

    /// The complete properties the engine serves.
    pub fn properties(&self) -> &TunnelProperties {
        &self.properties
    }

    /// `https://<hostname>[:port]` for a published tunnel.
    pub fn public_url(&self) -> Option<String> {
        let host = self.properties.hostname.as_deref()?;
        let scheme = if self.properties.protocol.as_deref() == Some("http") { "https" } else { "tls" };
        Some(match self.properties.port {
            Some(443) | None => format!("{scheme}://{host}"),
            Some(port) => format!("{scheme}://{host}:{port}"),
        })
    }

    /// The next stream; `None` once the tunnel or its channel is closed.
    pub async fn accept(&mut self) -> Option<Stream> {
        self.incoming.recv().await
    }

    /// Asks the engine to close the tunnel and waits for its answer.
    pub async fn close(&self) -> Result<(), AgentError> {
        self.control.close_tunnel(self.id()).await
    }

    /// Serves every stream by connecting to `local` and splicing, until the
    /// tunnel closes. Returns how many streams were served.
    pub async fn forward(&mut self, local: String) -> u64 {
        let mut served = 0;
        while let Some(stream) = self.accept().await {
            served += 1;
            tokio::spawn(forward_stream(stream, local.clone()));
        }
        served
    }
}

/// Connects to `local` and splices one stream to it.
pub async fn forward_stream(mut stream: Stream, local: String) {
    match TcpStream::connect(&local).await {
        Ok(mut upstream) => {
            let _ = upstream.set_nodelay(true);
            if let Err(error) = strait_proto::splice::splice(&mut stream, &mut upstream).await {
                tracing::debug!(%error, "forwarded stream ended with an error");
            }
        }
        Err(error) => tracing::warn!(%local, %error, "cannot reach the local service"),
    }
}

/// Serves one stream of a datagram tunnel: its framed packets to the local
/// UDP service `local` and the service's answers back, until the stream
/// ends (the dialer closed the channel) or the service goes.
pub async fn forward_packets(mut stream: Stream, local: String) {
    let bind = if local.parse::<std::net::SocketAddr>().is_ok_and(|a| a.is_ipv6()) { "[::]:0" } else { "0.0.0.0:0" };
    let udp = match tokio::net::UdpSocket::bind(bind).await {
        Ok(udp) => udp,
        Err(error) => return tracing::warn!(%error, "cannot open a UDP socket"),
    };
    if let Err(error) = udp.connect(&local).await {
        return tracing::warn!(%local, %error, "cannot reach the local UDP service");
    }
    let (mut read, mut write) = tokio::io::split(&mut stream);
    let outbound = async {
        while let Ok(Some(packet)) = strait_proto::packet::read_packet(&mut read).await {
            // A refused send (nothing listens yet) loses the packet, as UDP would.
            let _ = udp.send(&packet).await;
        }
    };
    let inbound = async {
        let mut buf = vec![0u8; strait_proto::packet::MAX_PACKET];
        loop {
            match udp.recv(&mut buf).await {
                Ok(n) => {
                    if strait_proto::packet::write_packet(&mut write, &buf[..n]).await.is_err() {
                        return;
                    }
                }
                // ICMP port unreachable from an earlier send: keep going.
                Err(error) if error.kind() == std::io::ErrorKind::ConnectionRefused => continue,
                Err(_) => return,
            }
        }
    };
    tokio::select! {
        _ = outbound => {}
        _ = inbound => {}
    }
}

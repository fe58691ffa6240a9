//! A tunnel, agent side: the properties the engine serves and the streams
//! it sends.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use strait_proto::TunnelProperties;
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::AgentError;
use crate::client::Stream;
use crate::control::Inner;

pub struct Tunnel {
    control: Arc<Inner>,
    properties: TunnelProperties,
    incoming: mpsc::Receiver<Incoming>,
}

/// A stream the engine sent, with the public address it carries.
pub struct Incoming {
    pub stream: Stream,
    /// The public client's address, as the engine reported it.
    pub source: Option<IpAddr>,
}

impl Tunnel {
    pub(crate) fn new(control: Arc<Inner>, properties: TunnelProperties, incoming: mpsc::Receiver<Incoming>) -> Self {
        Self { control, properties, incoming }
    }

    pub fn id(&self) -> &str {
        self.properties.id.as_deref().unwrap_or_default()
    }

    /// The complete properties the engine serves.
    pub fn properties(&self) -> &TunnelProperties {
        &self.properties
    }

    /// Where the public reaches a published tunnel: `https://<hostname>`,
    /// `tls://<hostname>`, or `tcp://` / `udp://<host>:<port>` for a tunnel
    /// on a port of its own.
    pub fn public_url(&self) -> Option<String> {
        if self.properties.publish != Some(true) {
            return None;
        }
        let host = self.properties.hostname.as_deref()?;
        let scheme = match self.properties.protocol.as_deref() {
            Some("http") => "https",
            Some(own_port @ ("tcp" | "udp")) => {
                return Some(format!("{own_port}://{host}:{}", self.properties.port?));
            }
            _ => "tls",
        };
        Some(match self.properties.port {
            Some(443) | None => format!("{scheme}://{host}"),
            Some(port) => format!("{scheme}://{host}:{port}"),
        })
    }

    /// The next stream; `None` once the tunnel or its channel is closed.
    pub async fn accept(&mut self) -> Option<Stream> {
        self.incoming.recv().await.map(|incoming| incoming.stream)
    }

    /// The next stream with the public address it carries.
    pub async fn accept_incoming(&mut self) -> Option<Incoming> {
        self.incoming.recv().await
    }

    /// Asks the engine to close the tunnel and waits for its answer.
    pub async fn close(&self) -> Result<(), AgentError> {
        self.control.close_tunnel(self.id()).await
    }

    /// Serves every stream by connecting to `local` and splicing (or, for
    /// a datagram tunnel, relaying its packets to the UDP service `local`),
    /// until the tunnel closes. Returns how many streams were served.
    pub async fn forward(&mut self, local: String) -> u64 {
        let datagrams = self.properties.r#type.as_deref() == Some("datagram");
        let mut served = 0;
        while let Some(stream) = self.accept().await {
            served += 1;
            tokio::spawn(forward_one(stream, local.clone(), datagrams));
        }
        served
    }
}

/// Serves one stream of a tunnel: a datagram tunnel's packets to the UDP
/// service `local` ([`forward_packets`]), else a TCP connection to `local`
/// spliced with it ([`forward_stream`]).
pub async fn forward_one(stream: Stream, local: String, datagrams: bool) -> Carried {
    if datagrams { forward_packets(stream, local).await } else { forward_stream(stream, local).await }
}

/// Whether served properties are a published tunnel on a public port of
/// its own (tcp or udp) rather than on a hostname.
pub fn on_own_port(served: &TunnelProperties) -> bool {
    served.publish == Some(true) && matches!(served.protocol.as_deref(), Some("tcp" | "udp"))
}

/// Makes `requested` ask again for the address the engine served, so a
/// reopen after a reconnection lands on it: the port of a tunnel on a port
/// of its own, else the hostname.
pub fn pin_address(requested: &mut TunnelProperties, served: &TunnelProperties) {
    if on_own_port(served) {
        requested.port = served.port;
    } else if let Some(host) = &served.hostname {
        requested.hostname = Some(host.clone());
    }
}

/// What a forwarded stream or packet session carried.
#[derive(Debug, Default, Clone, Copy)]
pub struct Carried {
    /// Bytes towards the local service, and from it.
    pub to_local: u64,
    pub from_local: u64,
    /// Packets each way (packet sessions only).
    pub packets_to_local: u64,
    pub packets_from_local: u64,
}

/// Connects to `local` and splices one stream to it.
pub async fn forward_stream(mut stream: Stream, local: String) -> Carried {
    match TcpStream::connect(&local).await {
        Ok(mut upstream) => {
            let _ = upstream.set_nodelay(true);
            match strait_proto::splice::splice(&mut stream, &mut upstream).await {
                Ok((to_local, from_local)) => return Carried { to_local, from_local, ..Carried::default() },
                Err(error) => tracing::debug!(%error, "forwarded stream ended with an error"),
            }
        }
        Err(error) => tracing::warn!(%local, %error, "cannot reach the local service"),
    }
    Carried::default()
}

/// A packet session with nothing either way for this long ends on the
/// agent's side too (the engine usually ends it first: a published UDP
/// session after `udp.session_idle_seconds`, a dialer when it leaves).
pub const PACKET_SESSION_IDLE: Duration = Duration::from_secs(600);

/// Serves one stream of a datagram tunnel: its framed packets to the local
/// UDP service `local` from a socket of its own (so the answers come back
/// to this stream alone) and the service's answers back, until the stream
/// ends (the dialer closed the channel, the engine ended the session), the
/// service goes, or nothing moves for [`PACKET_SESSION_IDLE`].
pub async fn forward_packets(mut stream: Stream, local: String) -> Carried {
    let idle = PACKET_SESSION_IDLE;
    let bind = if local.parse::<std::net::SocketAddr>().is_ok_and(|a| a.is_ipv6()) { "[::]:0" } else { "0.0.0.0:0" };
    let udp = match tokio::net::UdpSocket::bind(bind).await {
        Ok(udp) => udp,
        Err(error) => {
            tracing::warn!(%error, "cannot open a UDP socket");
            return Carried::default();
        }
    };
    if let Err(error) = udp.connect(&local).await {
        tracing::warn!(%local, %error, "cannot reach the local UDP service");
        return Carried::default();
    }
    let started = Instant::now();
    // Milliseconds since `started` of the last packet either way.
    let last = AtomicU64::new(0);
    let touch = || last.store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
    let (to_local, packets_to_local) = (AtomicU64::new(0), AtomicU64::new(0));
    let (from_local, packets_from_local) = (AtomicU64::new(0), AtomicU64::new(0));
    let (mut read, mut write) = tokio::io::split(&mut stream);
    let outbound = async {
        while let Ok(Some(packet)) = strait_proto::packet::read_packet(&mut read).await {
            touch();
            // A refused send (nothing listens yet) loses the packet, as UDP would.
            if udp.send(&packet).await.is_ok() {
                to_local.fetch_add(packet.len() as u64, Ordering::Relaxed);
                packets_to_local.fetch_add(1, Ordering::Relaxed);
            }
        }
    };
    let inbound = async {
        let mut buf = vec![0u8; strait_proto::packet::MAX_PACKET];
        loop {
            match udp.recv(&mut buf).await {
                Ok(n) => {
                    touch();
                    if strait_proto::packet::write_packet(&mut write, &buf[..n]).await.is_err() {
                        return;
                    }
                    from_local.fetch_add(n as u64, Ordering::Relaxed);
                    packets_from_local.fetch_add(1, Ordering::Relaxed);
                }
                // ICMP port unreachable from an earlier send: keep going.
                Err(error) if error.kind() == std::io::ErrorKind::ConnectionRefused => continue,
                Err(_) => return,
            }
        }
    };
    let quiet = async {
        loop {
            let since = Duration::from_millis(last.load(Ordering::Relaxed));
            let silent = started.elapsed().saturating_sub(since);
            if silent >= idle {
                return;
            }
            tokio::time::sleep(idle - silent).await;
        }
    };
    tokio::select! {
        _ = outbound => {}
        _ = inbound => {}
        _ = quiet => {}
    }
    Carried {
        to_local: to_local.into_inner(),
        from_local: from_local.into_inner(),
        packets_to_local: packets_to_local.into_inner(),
        packets_from_local: packets_from_local.into_inner(),
    }
}

//! Reaching an engine: a channel (a TLS connection, or a stream on the
//! client's QUIC connection) per control channel, stream or private dial.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use strait_proto::{
    BoxIo, ClientDetails, FrameReader, MAX_FRAME_LEN, Message, Payload, Prefixed, StreamReq, StreamResult,
    write_message,
};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::AgentError;
use crate::control::ControlChannel;
use crate::datagram::PacketConn;
use crate::transport::{Carrier, QuicSide, TransportMode};

/// A channel to the engine (a TLS connection or a QUIC stream) carrying raw
/// bytes, with any bytes that came right behind the engine's response
/// replayed first.
pub type Stream = Prefixed<BoxIo>;

/// How to reach and authenticate to an engine.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// `host:port` (port 443 when omitted).
    pub engine: String,
    pub token: Option<String>,
    /// Trust this CA file instead of the web PKI roots.
    pub ca_file: Option<PathBuf>,
    /// TLS server name, when it differs from the engine's host.
    pub server_name: Option<String>,
    /// Skip the engine's response on streams and dials (the SDK default).
    pub zero_rtt: bool,
    /// Heartbeat interval to negotiate; `None` sends no heartbeats.
    pub heartbeat_interval: Option<Duration>,
    pub connect_timeout: Duration,
    pub operation_timeout: Duration,
    /// Leave from this local address (bound before connecting), for a
    /// host with several addresses; `None` lets the system choose.
    pub local_addr: Option<IpAddr>,
    /// TLS, QUIC, or the first of both to connect (the default).
    pub transport: TransportMode,
}

impl ClientConfig {
    pub fn new(engine: impl Into<String>, token: Option<String>) -> Self {
        Self {
            engine: engine.into(),
            token,
            ca_file: None,
            server_name: None,
            zero_rtt: true,
            heartbeat_interval: Some(Duration::from_secs(5)),
            connect_timeout: Duration::from_secs(15),
            operation_timeout: Duration::from_secs(30),
            local_addr: None,
            transport: TransportMode::Auto,
        }
    }
}

/// A configured client; cheap to clone.
#[derive(Clone)]
pub struct Client {
    pub(crate) config: Arc<ClientConfig>,
    connector: TlsConnector,
    api_connector: TlsConnector,
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) server_name: ServerName<'static>,
    pub(crate) quic: Arc<QuicSide>,
}

pub(crate) fn client_details(token: Option<String>) -> ClientDetails {
    ClientDetails {
        agent: Some("strait".into()),
        channel: Some("stable".into()),
        version: Some(env!("CARGO_PKG_VERSION").into()),
        os: Some(std::env::consts::OS.into()),
        arch: Some(std::env::consts::ARCH.into()),
        token,
        protocol_version: Some(strait_proto::PROTOCOL_VERSION.into()),
        strait_features: Vec::new(),
    }
}

fn split_engine(engine: &str) -> Result<(String, u16), AgentError> {
    let bad = || AgentError::BadEngineAddress(engine.to_string());
    if engine.contains("://") || engine.trim().is_empty() {
        return Err(bad());
    }
    match engine.rsplit_once(':') {
        Some((host, _)) if !host.ends_with(']') && host.contains(':') => Ok((engine.to_string(), 443)),
        Some((host, port)) => {
            let port: u16 = port.parse().map_err(|_| bad())?;
            if port == 0 || host.is_empty() {
                return Err(bad());
            }
            Ok((host.trim_start_matches('[').trim_end_matches(']').to_string(), port))
        }
        None => Ok((engine.to_string(), 443)),
    }
}

impl Client {
    pub fn new(config: ClientConfig) -> Result<Self, AgentError> {
        let (host, port) = split_engine(&config.engine)?;
        let name = config.server_name.clone().unwrap_or_else(|| host.clone());
        let server_name = ServerName::try_from(name.clone()).map_err(|_| AgentError::BadEngineAddress(name.clone()))?;
        let connector = TlsConnector::from(crate::tls::client_config(config.ca_file.as_deref(), strait_proto::ALPN)?);
        let api_connector = TlsConnector::from(crate::tls::client_config(config.ca_file.as_deref(), b"http/1.1")?);
        let quic = Arc::default();
        Ok(Self { config: Arc::new(config), connector, api_connector, host, port, server_name, quic })
    }

    pub fn config(&self) -> &ClientConfig {
        &self.config
    }

    /// Opens a TLS connection to the engine with ALPN `rstrm/1`.
    pub(crate) async fn connect_tls(&self) -> Result<TlsStream<TcpStream>, AgentError> {
        self.connect_with(&self.connector).await
    }

    /// Opens an HTTP/1.1 TLS connection to the engine, for its Engine API.
    pub async fn connect_api(&self) -> Result<TlsStream<TcpStream>, AgentError> {
        self.connect_with(&self.api_connector).await
    }

    /// The `Host` header value for the Engine API.
    pub fn api_authority(&self) -> String {
        let host = self.server_name.to_str();
        if self.port == 443 { host.to_string() } else { format!("{host}:{}", self.port) }
    }

    /// The engine's host, as the configuration names it (`engine` without
    /// its port).
    pub fn engine_host(&self) -> &str {
        &self.host
    }

    /// The name the engine's certificate must carry (`server_name`, else
    /// the engine's host).
    pub fn server_name(&self) -> String {
        self.server_name.to_str().into_owned()
    }

    /// Opens a TLS connection to the engine's address for another name (a
    /// published hostname) with `alpn`, verified as the engine's own.
    pub async fn connect_named(&self, name: &str, alpn: &[u8]) -> Result<TlsStream<TcpStream>, AgentError> {
        let server_name =
            ServerName::try_from(name.to_string()).map_err(|_| AgentError::BadEngineAddress(name.to_string()))?;
        let connector = TlsConnector::from(crate::tls::client_config(self.config.ca_file.as_deref(), alpn)?);
        self.connect_as(&connector, server_name).await
    }

    async fn connect_with(&self, connector: &TlsConnector) -> Result<TlsStream<TcpStream>, AgentError> {
        self.connect_as(connector, self.server_name.clone()).await
    }

    async fn connect_as(
        &self,
        connector: &TlsConnector,
        server_name: ServerName<'static>,
    ) -> Result<TlsStream<TcpStream>, AgentError> {
        let addr = format!("{}:{}", self.host, self.port);
        let connect = async {
            // Resolved apart from connecting, so a name that does not
            // resolve is told from an engine that does not answer.
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((self.host.as_str(), self.port))
                .await
                .map_err(|source| AgentError::Resolve { host: self.host.clone(), source })?
                .collect();
            if addrs.is_empty() {
                let source = std::io::Error::new(std::io::ErrorKind::NotFound, "no address for this name");
                return Err(AgentError::Resolve { host: self.host.clone(), source });
            }
            let tcp = connect_from(self.config.local_addr, &addrs)
                .await
                .map_err(|source| AgentError::Connect { addr: addr.clone(), source })?;
            tcp.set_nodelay(true)?;
            connector.connect(server_name, tcp).await.map_err(|source| {
                // tokio-rustls carries rustls' own error inside the io::Error.
                match source.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) {
                    Some(tls) => AgentError::Tls { addr: addr.clone(), source: tls.clone() },
                    None => AgentError::Connect { addr: addr.clone(), source },
                }
            })
        };
        match tokio::time::timeout(self.config.connect_timeout, connect).await {
            Ok(result) => result,
            Err(_) => Err(AgentError::Timeout("connecting to the engine")),
        }
    }

    /// Opens a control channel.
    pub async fn connect(&self) -> Result<ControlChannel, AgentError> {
        ControlChannel::open(self.clone()).await
    }

    /// Dials a private tunnel by id or name.
    pub async fn dial(&self, tunnel: &str) -> Result<Stream, AgentError> {
        Ok(self.dial_carried(tunnel).await?.0)
    }

    /// [`Client::dial`], saying which transport carries the stream.
    pub async fn dial_carried(&self, tunnel: &str) -> Result<(Stream, Carrier), AgentError> {
        let (io, carrier) = self.open_first().await?;
        let (stream, _) = self.stream_req(io, tunnel, self.config.zero_rtt, false).await?;
        Ok((stream, carrier))
    }

    /// Dials a datagram tunnel: QUIC datagrams when the client is on QUIC
    /// and the tunnel allows them, else packets framed in a stream (the
    /// engine refuses a datagram channel with FEATURE_NOT_AVAILABLE for a
    /// tunnel that guarantees delivery, and the dial falls back, as the
    /// rstream Go SDK's PacketDial does).
    pub async fn dial_packets(&self, tunnel: &str) -> Result<PacketConn, AgentError> {
        let (io, carrier) = self.open_first().await?;
        let io = match &carrier {
            Carrier::Quic(conn) => match self.stream_req(io, tunnel, false, true).await {
                Ok((lifeline, Some(stream_id))) => {
                    let id = strait_proto::packet::channel_id(&stream_id)
                        .ok_or_else(|| AgentError::Protocol(format!("stream id {stream_id:?} is not 24 hex")))?;
                    let registration = self.quic.channels.register(id);
                    return Ok(PacketConn::quic(conn.clone(), id, registration, lifeline, self.quic.clone()));
                }
                Ok((_, None)) => return Err(AgentError::Protocol("StreamRsp without a stream id".into())),
                Err(error) if error.engine_code() == Some(strait_proto::ErrorCode::FeatureNotAvailable) => {
                    self.open_on(&carrier).await?
                }
                Err(error) => return Err(error),
            },
            Carrier::Tls => io,
        };
        let (stream, _) = self.stream_req(io, tunnel, self.config.zero_rtt, false).await?;
        Ok(PacketConn::framed(stream))
    }

    /// Sends `StreamReq` on a fresh channel and, unless zero-RTT, reads the
    /// answer; returns the stream and the stream id the engine gave.
    async fn stream_req(
        &self,
        mut io: BoxIo,
        tunnel: &str,
        zero_rtt: bool,
        datagram_channel: bool,
    ) -> Result<(Stream, Option<String>), AgentError> {
        let req = StreamReq {
            client_details: Some(client_details(self.config.token.clone())),
            tunnel_id_name: tunnel.trim().to_string(),
            zero_rtt: Some(zero_rtt),
            datagram_channel: datagram_channel.then_some(true),
        };
        write_message(&mut io, &Message::from(Payload::StreamReq(req))).await?;
        if zero_rtt {
            return Ok((Prefixed::new(Default::default(), io), None));
        }
        let mut reader = FrameReader::new(io, MAX_FRAME_LEN);
        let rsp = tokio::time::timeout(self.config.operation_timeout, reader.read_message())
            .await
            .map_err(|_| AgentError::Timeout("waiting for StreamRsp"))??;
        match rsp.payload {
            Some(Payload::StreamRsp(rsp)) => match rsp.payload {
                Some(StreamResult::StreamId(id)) => {
                    let (io, rest) = reader.into_parts();
                    Ok((Prefixed::new(rest, io), Some(id)))
                }
                Some(StreamResult::Error(e)) => Err(AgentError::Engine(e)),
                None => Err(AgentError::Protocol("empty StreamRsp".into())),
            },
            other => {
                Err(AgentError::Protocol(format!("expected StreamRsp, got {}", other.map_or("nothing", |p| p.name()))))
            }
        }
    }
}

/// Connects to the first of `addrs` that answers, from `local` when given
/// (only to addresses of its family).
async fn connect_from(local: Option<IpAddr>, addrs: &[SocketAddr]) -> std::io::Result<TcpStream> {
    let Some(local) = local else { return TcpStream::connect(addrs).await };
    let mut last = None;
    for addr in addrs.iter().filter(|a| a.is_ipv4() == local.is_ipv4()) {
        let socket = if local.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
        socket.bind(SocketAddr::new(local, 0))?;
        match socket.connect(*addr).await {
            Ok(tcp) => return Ok(tcp),
            Err(error) => last = Some(error),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::AddrNotAvailable, format!("no engine address of the family of {local}"))
    }))
}

#[cfg(test)]
mod tests {
    use super::{connect_from, split_engine};

    #[test]
    fn engine_addresses() {
        assert_eq!(split_engine("edge.example.com").unwrap(), ("edge.example.com".into(), 443));
        assert_eq!(split_engine("localhost:8443").unwrap(), ("localhost".into(), 8443));
        assert_eq!(split_engine("[::1]:8443").unwrap(), ("::1".into(), 8443));
        assert!(split_engine("https://x").is_err());
        assert!(split_engine("x:0").is_err());
        assert!(split_engine("x:http").is_err());
    }

    #[tokio::test]
    async fn leaves_from_the_local_address_asked_for() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let local: std::net::IpAddr = "127.0.0.7".parse().unwrap();
        let addrs = [addr];
        let (tcp, accepted) = tokio::join!(connect_from(Some(local), &addrs), listener.accept());
        assert_eq!(tcp.unwrap().local_addr().unwrap().ip(), local);
        assert_eq!(accepted.unwrap().1.ip(), local);
        let v6: std::net::IpAddr = "::1".parse().unwrap();
        assert!(connect_from(Some(v6), &addrs).await.is_err(), "no IPv4 address is dialled from an IPv6 one");
    }
}

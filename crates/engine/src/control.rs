//! The control channel: one TLS connection per agent carrying framed
//! messages both ways for as long as the agent stays.
//!
//! A reader loop handles what the agent sends; a writer task drains the
//! client's outbox, so replies, `ProxyConnReq`s and revocations from any
//! task leave in order without sharing the socket.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use strait_proto::{
    CloseControlChannelRsp, CloseTunnelRsp, ControlChannelLiveness, Error, ErrorCode, FrameError, FrameReader,
    Heartbeat, Message, OpenControlChannelOk, OpenControlChannelReq, OpenControlChannelResult, OpenControlChannelRsp,
    OpenTunnelReq, OpenTunnelResult, OpenTunnelRsp, Payload, ServerDetails, ServerMessage, write_message,
};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use crate::Shared;
use crate::net::{BoxIo, Transport};
use crate::registry::{Client, ClientInfo, Departure, RegistryError, Tunnel};
use crate::tunnel::{self, Kind, Namespace, TunnelSpec};
use crate::{ids, net};

/// Frames queued for one agent. `ProxyConnReq`s beyond this are refused
/// with CAPACITY_EXHAUSTED rather than queued without bound.
const OUTBOX: usize = 1024;

/// The most a heartbeat timeout may be, per the protocol.
const MAX_HEARTBEAT_TIMEOUT_MS: u32 = 900_000;

/// A negotiated timeout covers this many missed heartbeats.
const HEARTBEATS_PER_TIMEOUT: u32 = 3;

/// How long a closing channel may take to flush its last frames.
const FLUSH_GRACE: Duration = Duration::from_secs(5);

/// Checks the agent's protocol version: any 1.x speaks this wire format.
pub fn check_version(version: Option<&str>) -> Result<(), Error> {
    let version = version
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .ok_or_else(|| Error::new(ErrorCode::ProtocolVersionMissing, "client_details.protocol_version is required"))?;
    let invalid = || {
        Error::new(ErrorCode::ProtocolVersionInvalid, format!("protocol version {version:?} is not MAJOR.MINOR.PATCH"))
    };
    let parts: Vec<&str> = version.trim_start_matches('v').split('.').collect();
    if parts.len() != 3 || parts.iter().any(|p| p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit())) {
        return Err(invalid());
    }
    let major: u64 = parts[0].parse().map_err(|_| invalid())?;
    if major != 1 {
        return Err(Error::new(
            ErrorCode::ProtocolVersionIncompatible,
            format!("protocol version {version} is not compatible with {}", strait_proto::PROTOCOL_VERSION),
        ));
    }
    Ok(())
}

/// The liveness policy answered to a 1.4.5 agent, if it asked for one.
pub fn negotiate_liveness(asked: Option<&ControlChannelLiveness>) -> Option<ControlChannelLiveness> {
    let interval = asked?.heartbeat_interval_ms;
    if interval == 0 || interval > MAX_HEARTBEAT_TIMEOUT_MS {
        return None;
    }
    let timeout = interval.saturating_mul(HEARTBEATS_PER_TIMEOUT).clamp(interval, MAX_HEARTBEAT_TIMEOUT_MS);
    Some(ControlChannelLiveness { heartbeat_interval_ms: interval, heartbeat_timeout_ms: timeout })
}

fn server_details(shared: &Shared) -> ServerDetails {
    ServerDetails {
        agent: Some("strait-engine".into()),
        channel: Some("community".into()),
        version: Some(env!("CARGO_PKG_VERSION").into()),
        plan: None,
        provider: Some("self-hosted".into()),
        region: None,
        update: None,
        strait_features: vec![strait_proto::features::DATAGRAM_SPILL.into()],
        strait_max_datagram_bytes: u32::try_from(shared.config.quic.max_datagram_bytes).ok(),
    }
}

fn open_rsp(result: OpenControlChannelResult) -> Message {
    Payload::OpenControlChannelRsp(OpenControlChannelRsp { payload: Some(result) }).into()
}

/// Serves one control channel until the agent leaves, goes silent, or the
/// engine shuts down.
pub async fn serve(
    shared: Arc<Shared>,
    io: BoxIo,
    rest: Bytes,
    req: OpenControlChannelReq,
    peer: SocketAddr,
    transport: Transport,
) {
    let (read_half, mut write_half) = tokio::io::split(io);
    let details = req.client_details.unwrap_or_default();
    let admitted = check_version(details.protocol_version.as_deref()).and_then(|()| {
        shared.verifier.verify(details.token.as_deref()).map_err(|e| {
            shared.auth_failed(peer.ip());
            Error::new(ErrorCode::Unauthorized, e.to_string())
        })
    });
    let principal = match admitted {
        Ok(principal) => principal,
        Err(error) => {
            tracing::warn!(%error, "control channel refused");
            let _ = write_message(&mut write_half, &open_rsp(OpenControlChannelResult::Error(error))).await;
            let _ = write_half.shutdown().await;
            return;
        }
    };

    let liveness = negotiate_liveness(req.liveness.as_ref());
    let client_id = ids::client_id();
    let (outbox, mut outbox_rx) = mpsc::channel::<Message>(OUTBOX);
    let info = ClientInfo {
        id: client_id.clone(),
        principal: principal.id.clone(),
        agent: details.agent,
        channel: details.channel,
        version: details.version,
        os: details.os,
        arch: details.arch,
        protocol_version: details.protocol_version,
        labels: Default::default(),
        connected_at: Some(SystemTime::now()),
        transport: transport.name(),
    };
    let (agent, version) = (info.agent.clone(), info.version.clone());
    // Registered before the agent hears yes, so the principal's limit is
    // checked and taken in one step.
    let quic = match &transport {
        Transport::Quic(conn) => Some(conn.clone()),
        Transport::Tls => None,
    };
    let spill = details.strait_features.iter().any(|f| f == strait_proto::features::DATAGRAM_SPILL);
    let client = Arc::new(Client::new(info, outbox.clone(), quic).with_datagram_spill(spill));
    if let Err(refused) = shared.registry.add_client(client.clone()) {
        tracing::warn!(principal = %principal, error = %refused, "control channel refused");
        let error = Error::new(ErrorCode::CapacityExhausted, refused.to_string());
        let _ = write_message(&mut write_half, &open_rsp(OpenControlChannelResult::Error(error))).await;
        let _ = write_half.shutdown().await;
        return;
    }
    let ok = OpenControlChannelOk {
        client_id: client_id.clone(),
        server_details: Some(server_details(&shared)),
        liveness: liveness.clone(),
    };
    if write_message(&mut write_half, &open_rsp(OpenControlChannelResult::Ok(ok))).await.is_err() {
        shared.registry.remove_client(&client_id, Departure::Lost);
        return;
    }
    tracing::info!(
        client_id = %client_id, principal = %principal,
        agent = agent.as_deref().unwrap_or("-"), version = version.as_deref().unwrap_or("-"),
        liveness = liveness.is_some(), transport = transport.name(), "client connected"
    );
    shared.metrics.client_connected(transport.name());

    let writer = tokio::spawn(async move {
        while let Some(message) = outbox_rx.recv().await {
            if write_message(&mut write_half, &message).await.is_err() {
                break;
            }
        }
        let _ = write_half.shutdown().await;
    });

    let mut reader = FrameReader::with_buffer(read_half, rest, shared.config.limits.max_frame_bytes);
    let grace = match &liveness {
        Some(l) => Duration::from_millis(l.heartbeat_timeout_ms as u64),
        None => Duration::from_secs(shared.config.limits.control_idle_seconds),
    };
    let quic = match &transport {
        Transport::Quic(conn) => Some(conn),
        Transport::Tls => None,
    };
    let channel = Channel { shared: &shared, client_id: &client_id, principal: &principal.id, outbox: &outbox, quic };
    let (reason, departure) = loop {
        let message = tokio::select! {
            _ = shared.shutdown.cancelled() => {
                // The protocol has no GOAWAY: say why in a ServerMessage,
                // then close. Agents reconnect elsewhere or after the
                // restart; their streams in flight are separate connections
                // and drain on their own.
                let notice = ServerMessage { message: "engine shutting down".into() };
                let _ = outbox.try_send(Payload::ServerMessage(notice).into());
                break ("engine shutting down".to_string(), Departure::Lost);
            }
            read = tokio::time::timeout(grace, reader.read_message()) => match read {
                Err(_) => break (format!("silent for {}s", grace.as_secs()), Departure::Lost),
                Ok(Err(FrameError::Closed)) => break ("agent closed the connection".to_string(), Departure::Lost),
                // A QUIC agent that closes its connection ends its streams
                // with the connection's error, not a FIN.
                Ok(Err(FrameError::Io(e))) if e.kind() == std::io::ErrorKind::NotConnected => {
                    break (format!("agent's connection ended: {e}"), Departure::Lost)
                }
                Ok(Err(error)) => break (format!("protocol error: {error}"), Departure::Lost),
                Ok(Ok(message)) => message,
            },
        };
        client.heard();
        let Some(payload) = message.payload else { continue };
        if let Payload::CloseControlChannelReq(_) = payload {
            let _ = outbox.send(Payload::CloseControlChannelRsp(CloseControlChannelRsp {}).into()).await;
            break ("agent closed the control channel".to_string(), Departure::Closed);
        }
        channel.handle(payload, liveness.is_some()).await;
    };

    let tunnels = shared.registry.remove_client(&client_id, departure);
    shared.metrics.client_disconnected(transport.name());
    shared.pending.fail_client(&client_id);
    shared.datagrams.close_client(&client_id);
    for tunnel in &tunnels {
        shared.metrics.tunnel_closed(metric_protocol(tunnel));
        tracing::info!(tunnel_id = %tunnel.id, client_id = %client_id, reason = "control channel ended", "tunnel closed");
    }
    // The writer ends once every sender of the outbox is gone, the one in
    // our `Client` included.
    drop(outbox);
    drop(client);
    if tokio::time::timeout(FLUSH_GRACE, writer).await.is_err() {
        tracing::debug!(client_id = %client_id, "control channel writer did not flush in time");
    }
    tracing::info!(client_id = %client_id, %reason, tunnels = tunnels.len(), "client disconnected");
}

struct Channel<'a> {
    shared: &'a Arc<Shared>,
    client_id: &'a str,
    principal: &'a str,
    outbox: &'a mpsc::Sender<Message>,
    /// The agent's QUIC connection, for `DatagramChannelClose`.
    quic: Option<&'a quinn::Connection>,
}

impl Channel<'_> {
    async fn send(&self, payload: Payload) {
        // A closed outbox means the writer is gone; the reader ends soon too.
        let _ = self.outbox.send(payload.into()).await;
    }

    async fn handle(&self, payload: Payload, liveness: bool) {
        match payload {
            Payload::OpenTunnelReq(req) => {
                let reply = self.open_tunnel(req);
                self.send(Payload::OpenTunnelRsp(reply)).await;
            }
            Payload::CloseTunnelReq(req) => {
                // A channel closes only its own tunnels. Anything else is
                // answered as unknown (the same words for another's tunnel
                // and a missing one), and always answered, so the agent
                // never waits.
                let error = match self.shared.registry.remove_tunnel(self.client_id, &req.tunnel_id) {
                    Some(tunnel) => {
                        self.shared.metrics.tunnel_closed(metric_protocol(&tunnel));
                        tracing::info!(tunnel_id = %tunnel.id, client_id = %self.client_id, reason = "agent closed it", "tunnel closed");
                        None
                    }
                    None => {
                        tracing::warn!(tunnel_id = %req.tunnel_id, client_id = %self.client_id, "close refused: not a tunnel of this control channel");
                        let message = format!("no tunnel {:?} on this control channel", req.tunnel_id);
                        Some(Error::new(ErrorCode::TunnelNotFound, message))
                    }
                };
                self.send(Payload::CloseTunnelRsp(CloseTunnelRsp { tunnel_id: req.tunnel_id, error })).await;
            }
            Payload::ProxyConnRsp(report) => self.shared.pending.agent_reported(self.client_id, report),
            Payload::DatagramChannelClose(close) => {
                if let (Some(conn), Some(id)) = (self.quic, strait_proto::packet::channel_id(&close.stream_id)) {
                    self.shared.datagrams.close(conn.stable_id(), id);
                }
            }
            Payload::Heartbeat(hb) => {
                // Old agents send empty heartbeats and expect nothing back; an
                // engine that negotiated no liveness never sends one.
                if liveness && hb.sequence > 0 {
                    self.send(Payload::Heartbeat(Heartbeat { sequence: 0, acknowledgement: hb.sequence })).await;
                }
            }
            other => {
                tracing::warn!(client_id = %self.client_id, message = other.name(), "unexpected message on a control channel ignored");
            }
        }
    }

    fn open_tunnel(&self, req: OpenTunnelReq) -> OpenTunnelRsp {
        let request_id = req.request_id;
        let result = self.create(req.tunnel_properties.unwrap_or_default());
        let payload = match result {
            Ok(tunnel) => {
                self.shared.metrics.tunnel_opened(metric_protocol(&tunnel));
                tracing::info!(
                    tunnel_id = %tunnel.id, client_id = %self.client_id,
                    name = tunnel.name().unwrap_or("-"), hostname = tunnel.hostname().unwrap_or("-"),
                    protocol = tunnel.protocol().unwrap_or("-"), publish = tunnel.published(), "tunnel opened"
                );
                OpenTunnelResult::TunnelProperties(tunnel.properties.clone())
            }
            Err(error) => {
                tracing::warn!(client_id = %self.client_id, %error, "tunnel refused");
                OpenTunnelResult::Error(error)
            }
        };
        OpenTunnelRsp { request_id, payload: Some(payload) }
    }

    fn create(&self, requested: strait_proto::TunnelProperties) -> Result<Arc<Tunnel>, Error> {
        let config = &self.shared.config;
        let ns = Namespace::of(config, self.shared.public_port);
        let mut properties = tunnel::normalize(requested, &ns)?;
        let id = ids::tunnel_id();
        properties.id = Some(id.clone());
        properties.creation_date = Some(SystemTime::now().into());
        // A published tcp or udp tunnel gets its port (bound) before it is
        // registered; the registry then says whether another principal
        // holds it.
        let spec = TunnelSpec::of(&properties).under_policy(&config.edge.default_policy);
        let bound = match spec.public_port() {
            Some((kind, requested)) => {
                let ports = if kind == Kind::Udp { &config.udp } else { &config.tcp };
                let ip = net::ports::listen_ip(ports, config.tls.listen_addr);
                let (port, bound) = net::ports::bind(kind, ports, ip, requested, &self.shared.registry)?;
                properties.port = Some(port as u32);
                Some(bound)
            }
            None => None,
        };
        let mut spec = spec;
        if let Some(port) = properties.port.and_then(|p| u16::try_from(p).ok())
            && let Some((kind, _)) = spec.public_port()
        {
            spec.address = Some(crate::tunnel::Address::Port(kind, port));
        }
        let tunnel = Tunnel::with_spec(id, self.client_id.to_string(), self.principal.to_string(), properties, spec);
        let tunnel = self.register(tunnel)?;
        if let Some(bound) = bound {
            crate::edge::serve_port(self.shared, tunnel.clone(), bound);
        }
        Ok(tunnel)
    }

    fn register(&self, tunnel: Tunnel) -> Result<Arc<Tunnel>, Error> {
        self.shared.registry.add_tunnel(tunnel).map_err(|e| {
            let holder = match &e {
                RegistryError::NameTaken(name) => {
                    let principal = crate::auth::Principal { id: self.principal.to_string(), admin: false };
                    match self.shared.registry.resolve_dial(&principal, name) {
                        crate::registry::Dial::Live(t) => Some(t.client_id.clone()),
                        _ => None,
                    }
                }
                RegistryError::HostnameInUse(_, tunnel_id) | RegistryError::PathInUse(_, _, tunnel_id) => {
                    self.shared.registry.tunnel(tunnel_id).map(|t| t.client_id.clone())
                }
                _ => None,
            };
            // An agent restarted after a kill (or a lost network) meets
            // its own earlier channel: how long that one has been silent
            // tells it whether to wait for it to time out.
            let silence = holder
                .and_then(|id| self.shared.registry.client(&id))
                .map(|c| format!(" (its control channel was last heard from {:.1}s ago)", c.silence().as_secs_f64()))
                .unwrap_or_default();
            let code = match e {
                RegistryError::TooManyTunnels(_)
                | RegistryError::PrincipalTunnels(_)
                | RegistryError::LabelBytes(..)
                | RegistryError::PrincipalChannels(_) => ErrorCode::CapacityExhausted,
                RegistryError::NoClient => ErrorCode::ServiceUnavailable,
                RegistryError::HostnameTaken(_)
                | RegistryError::HostnameInUse(..)
                | RegistryError::PathInUse(..)
                | RegistryError::HostnameHeld(..)
                | RegistryError::NameTaken(_) => ErrorCode::InvalidRequest,
            };
            Error::new(code, format!("{e}{silence}"))
        })
    }
}

/// The `protocol` label of the tunnels gauge: the published protocol, or
/// `private` for tunnels only dialers reach.
pub fn metric_protocol(tunnel: &Tunnel) -> &str {
    if tunnel.published() { tunnel.protocol().unwrap_or("http") } else { "private" }
}

/// Revokes a tunnel: removes it and tells its agent with an unprompted
/// `CloseTunnelRsp`. Returns whether the tunnel existed.
pub fn revoke_tunnel(shared: &Shared, tunnel_id: &str, reason: &str) -> bool {
    let Some(tunnel) = shared.registry.tunnel(tunnel_id) else { return false };
    let Some(removed) = shared.registry.remove_tunnel(&tunnel.client_id, tunnel_id) else { return false };
    shared.metrics.tunnel_closed(metric_protocol(&removed));
    if let Some(client) = shared.registry.client(&removed.client_id) {
        let _ = client
            .outbox
            .try_send(Payload::CloseTunnelRsp(CloseTunnelRsp { tunnel_id: removed.id.clone(), error: None }).into());
    }
    tracing::info!(tunnel_id = %removed.id, client_id = %removed.client_id, reason, "tunnel revoked");
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions() {
        assert_eq!(check_version(None).unwrap_err().code(), ErrorCode::ProtocolVersionMissing);
        assert_eq!(check_version(Some(" ")).unwrap_err().code(), ErrorCode::ProtocolVersionMissing);
        assert_eq!(check_version(Some("one.two")).unwrap_err().code(), ErrorCode::ProtocolVersionInvalid);
        assert_eq!(check_version(Some("1.4")).unwrap_err().code(), ErrorCode::ProtocolVersionInvalid);
        assert_eq!(check_version(Some("2.0.0")).unwrap_err().code(), ErrorCode::ProtocolVersionIncompatible);
        assert_eq!(check_version(Some("0.9.1")).unwrap_err().code(), ErrorCode::ProtocolVersionIncompatible);
        assert!(check_version(Some("1.4.5")).is_ok());
        assert!(check_version(Some("1.0.0")).is_ok());
    }

    #[test]
    fn liveness() {
        assert_eq!(negotiate_liveness(None), None);
        let asked = |ms| ControlChannelLiveness { heartbeat_interval_ms: ms, heartbeat_timeout_ms: 0 };
        assert_eq!(negotiate_liveness(Some(&asked(0))), None);
        let l = negotiate_liveness(Some(&asked(5000))).unwrap();
        assert_eq!((l.heartbeat_interval_ms, l.heartbeat_timeout_ms), (5000, 15000));
        let l = negotiate_liveness(Some(&asked(600_000))).unwrap();
        assert_eq!((l.heartbeat_interval_ms, l.heartbeat_timeout_ms), (600_000, 900_000));
        assert_eq!(negotiate_liveness(Some(&asked(900_001))), None);
    }
}

//! Streams: pairing an inbound connection with the agent's reverse dial, and
//! private dials.
//!
//! For every inbound connection the engine sends `ProxyConnReq{stream_id,
//! secret}` on the tunnel's control channel and parks a waiter under the
//! stream id. The agent dials back with `ProxyReq{stream_id, secret}`; the
//! matching waiter receives the agent's connection (with any bytes that came
//! behind the frame) and splices. `ProxyConnRsp` may arrive before or after
//! the agent's stream: only its error matters, and only while still pending.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use strait_proto::{
    Error, ErrorCode, Message, Payload, Prefixed, ProxyConnReq, ProxyConnRsp, ProxyReq, ProxyRsp, StreamReq,
    StreamResult, StreamRsp, write_message,
};
use subtle::ConstantTimeEq;
use tokio::sync::oneshot;

use crate::Shared;
use crate::datagram::{self, Leg};
use crate::ids;
use crate::net::{BoxIo, Transport};
use crate::registry::{Dial, Tunnel};
use strait_proto::splice::splice;

/// An agent's reverse-dialled connection, ready to carry raw bytes.
pub type AgentIo = Prefixed<BoxIo>;

/// Why an inbound connection could not be paired with its agent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamFailure {
    #[error("the tunnel's agent is not connected")]
    AgentGone,
    #[error("the tunnel's agent has too many streams pending")]
    Capacity,
    #[error("the agent refused the stream: {0}")]
    Refused(String),
    #[error("the agent did not open the stream in time")]
    Timeout,
}

impl StreamFailure {
    pub fn to_error(&self) -> Error {
        let code = match self {
            StreamFailure::AgentGone => ErrorCode::ServiceUnavailable,
            StreamFailure::Capacity => ErrorCode::CapacityExhausted,
            StreamFailure::Refused(_) => ErrorCode::InvalidStream,
            StreamFailure::Timeout => ErrorCode::ServiceUnavailable,
        };
        Error::new(code, self.to_string())
    }
}

struct Waiter {
    secret: String,
    client_id: String,
    /// The agent answers with a QUIC datagram channel: its `ProxyConnRsp`
    /// without an error completes the pairing (`None`), no stream comes.
    datagrams: bool,
    tx: oneshot::Sender<Result<Option<AgentIo>, StreamFailure>>,
}

#[derive(Default)]
struct PendingState {
    waiters: HashMap<String, Waiter>,
    per_client: HashMap<String, usize>,
}

/// Streams announced to agents and not yet paired.
#[derive(Default)]
pub struct Pending {
    state: Mutex<PendingState>,
}

impl Pending {
    fn lock(&self) -> MutexGuard<'_, PendingState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn insert(&self, stream_id: String, waiter: Waiter, limit: usize) -> Result<(), StreamFailure> {
        let mut state = self.lock();
        let count = state.per_client.entry(waiter.client_id.clone()).or_default();
        if *count >= limit {
            return Err(StreamFailure::Capacity);
        }
        *count += 1;
        state.waiters.insert(stream_id, waiter);
        Ok(())
    }

    fn remove_locked(state: &mut PendingState, stream_id: &str) -> Option<Waiter> {
        let waiter = state.waiters.remove(stream_id)?;
        if let Some(count) = state.per_client.get_mut(&waiter.client_id) {
            *count -= 1;
            if *count == 0 {
                state.per_client.remove(&waiter.client_id);
            }
        }
        Some(waiter)
    }

    fn remove(&self, stream_id: &str) -> Option<Waiter> {
        Self::remove_locked(&mut self.lock(), stream_id)
    }

    /// Takes the waiter for `stream_id` if `secret` matches. A wrong secret
    /// leaves the waiter in place for the real agent.
    fn take_matching(&self, stream_id: &str, secret: &str) -> Result<Waiter, &'static str> {
        let mut state = self.lock();
        let expected = state.waiters.get(stream_id).ok_or("unknown or expired stream id")?;
        if !bool::from(expected.secret.as_bytes().ct_eq(secret.as_bytes())) {
            return Err("wrong stream secret");
        }
        Self::remove_locked(&mut state, stream_id).ok_or("unknown or expired stream id")
    }

    /// The agent reported a failure for a stream still pending.
    pub fn agent_reported(&self, client_id: &str, report: ProxyConnRsp) {
        let mut state = self.lock();
        let Some(waiter) = state.waiters.get(&report.stream_id).filter(|w| w.client_id == client_id) else { return };
        if report.error.is_none() && !waiter.datagrams {
            return;
        }
        let Some(waiter) = Self::remove_locked(&mut state, &report.stream_id) else { return };
        let _ = waiter.tx.send(match report.error {
            Some(error) => {
                Err(StreamFailure::Refused(error.message.unwrap_or_else(|| format!("error code {}", error.code))))
            }
            None => Ok(None),
        });
    }

    /// A control channel ended: every stream it was asked for fails now.
    pub fn fail_client(&self, client_id: &str) {
        let mut state = self.lock();
        let ids: Vec<String> =
            state.waiters.iter().filter(|(_, w)| w.client_id == client_id).map(|(id, _)| id.clone()).collect();
        for id in ids {
            if let Some(waiter) = Self::remove_locked(&mut state, &id) {
                let _ = waiter.tx.send(Err(StreamFailure::AgentGone));
            }
        }
    }

    pub fn len(&self) -> usize {
        self.lock().waiters.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Removes the waiter when the inbound side gives up (timeout or cancel).
struct PendingGuard<'a> {
    pending: &'a Pending,
    stream_id: &'a str,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.pending.remove(self.stream_id);
    }
}

/// Asks the tunnel's agent for a stream and waits for it to dial back.
/// Returns the stream id and the agent's connection.
pub async fn open_to_agent(
    shared: &Shared,
    tunnel: &Tunnel,
    source: IpAddr,
) -> Result<(String, AgentIo), StreamFailure> {
    match pair(shared, tunnel, source, ids::stream_id(), ids::stream_secret(), false).await? {
        (stream_id, Some(io)) => Ok((stream_id, io)),
        (_, None) => Err(StreamFailure::Refused("the agent answered with a datagram channel".into())),
    }
}

/// The agent's leg of a datagram tunnel's channel: a QUIC datagram channel
/// when its agent is on QUIC, else packets framed in its reverse dial.
pub async fn open_datagrams_to_agent(
    shared: &Shared,
    tunnel: &Tunnel,
    source: IpAddr,
) -> Result<(String, crate::datagram::Leg), StreamFailure> {
    let client = shared.registry.client(&tunnel.client_id);
    let (conn, spills) = match client.as_deref().and_then(|c| Some((c.quic.clone()?, c.datagram_spill))) {
        Some(quic) if tunnel.spec.datagram_channels => quic,
        _ => {
            let (stream_id, io) = open_to_agent(shared, tunnel, source).await?;
            return Ok((stream_id, crate::datagram::Leg::Framed(Box::new(io))));
        }
    };
    drop(client);
    let (stream_id, secret) = (ids::stream_id(), ids::stream_secret());
    let id = strait_proto::packet::channel_id(&stream_id).expect("stream ids are 24 hex characters");
    // The secret stays with the channel: the agent presents it again when
    // it opens the spill stream.
    let spill = spills.then(|| crate::datagram::SpillSpec {
        client_id: tunnel.client_id.clone(),
        tunnel_id: tunnel.id.clone(),
        stream_id: stream_id.clone(),
        secret: secret.clone(),
    });
    // Registered first: the agent may send right after its answer.
    let registration = shared.datagrams.register(&conn, id, Some(tunnel.client_id.clone()), spill);
    match pair(shared, tunnel, source, stream_id, secret, true).await? {
        (stream_id, None) => Ok((stream_id, crate::datagram::Leg::Quic { conn, id, registration })),
        // An agent may still answer with a stream; its packets are framed.
        (stream_id, Some(io)) => Ok((stream_id, crate::datagram::Leg::Framed(Box::new(io)))),
    }
}

/// Sends `ProxyConnReq` and waits for the agent: its stream, or (for a
/// datagram channel, `datagrams`) its `ProxyConnRsp`.
async fn pair(
    shared: &Shared,
    tunnel: &Tunnel,
    source: IpAddr,
    stream_id: String,
    secret: String,
    datagrams: bool,
) -> Result<(String, Option<AgentIo>), StreamFailure> {
    let client = shared.registry.client(&tunnel.client_id).ok_or(StreamFailure::AgentGone)?;
    let (tx, rx) = oneshot::channel();
    let waiter = Waiter { secret: secret.clone(), client_id: tunnel.client_id.clone(), datagrams, tx };
    shared.pending.insert(stream_id.clone(), waiter, shared.config.limits.pending_streams_per_client)?;
    let _guard = PendingGuard { pending: &shared.pending, stream_id: &stream_id };
    let request = Payload::ProxyConnReq(ProxyConnReq {
        tunnel_id: tunnel.id.clone(),
        stream_id: stream_id.clone(),
        secret: Some(secret),
        source_ip: Some(source.into()),
        proxy_endpoint: None,
        strait_spill: false,
    });
    // Never wait on a slow control channel: a full outbox is a busy agent.
    client.outbox.try_send(request.into()).map_err(|e| match e {
        tokio::sync::mpsc::error::TrySendError::Full(_) => StreamFailure::Capacity,
        tokio::sync::mpsc::error::TrySendError::Closed(_) => StreamFailure::AgentGone,
    })?;
    drop(client);
    let deadline = Duration::from_secs(shared.config.timeouts.stream_request_seconds);
    match tokio::time::timeout(deadline, rx).await {
        Ok(Ok(result)) => result.map(|io| (stream_id.clone(), io)),
        Ok(Err(_)) => Err(StreamFailure::AgentGone),
        Err(_) => Err(StreamFailure::Timeout),
    }
}

/// An agent dialled back with `ProxyReq`: for a stream asked for, or (on
/// QUIC) a datagram channel's spill stream.
pub async fn accept_agent_stream(shared: &Shared, mut io: BoxIo, rest: Bytes, req: ProxyReq, transport: &Transport) {
    let zero_rtt = req.zero_rtt.unwrap_or(false);
    let secret = req.client_details.and_then(|d| d.token).unwrap_or_default();
    let spill = match transport {
        Transport::Quic(conn) => {
            strait_proto::packet::channel_id(&req.stream_id).and_then(|id| shared.datagrams.spill(conn.stable_id(), id))
        }
        Transport::Tls => None,
    };
    if let Some(spill) = spill {
        return accept_spill(shared, io, rest, &req.stream_id, &secret, zero_rtt, &spill).await;
    }
    match shared.pending.take_matching(&req.stream_id, &secret) {
        Err(reason) => {
            tracing::warn!(stream_id = %req.stream_id, reason, "agent stream refused");
            if !zero_rtt {
                let rsp = ProxyRsp { error: Some(Error::new(ErrorCode::InvalidStream, reason)) };
                let _ = write_message(&mut io, &Payload::ProxyRsp(rsp).into()).await;
            }
            let _ = tokio::io::AsyncWriteExt::shutdown(&mut io).await;
        }
        Ok(waiter) => {
            if !zero_rtt && write_message(&mut io, &Payload::ProxyRsp(ProxyRsp { error: None }).into()).await.is_err() {
                let _ = waiter.tx.send(Err(StreamFailure::AgentGone));
                return;
            }
            // The inbound side may have given up meanwhile; then this drops.
            let _ = waiter.tx.send(Ok(Some(Prefixed::new(rest, io))));
        }
    }
}

/// The agent's spill stream for one of its datagram channels.
async fn accept_spill(
    shared: &Shared,
    mut io: BoxIo,
    rest: Bytes,
    stream_id: &str,
    secret: &str,
    zero_rtt: bool,
    spill: &crate::datagram::Spill,
) {
    let claimed = spill.claim(shared, secret);
    if !zero_rtt {
        let answer = match &claimed {
            Ok(_) => ProxyRsp { error: None },
            Err(reason) => ProxyRsp { error: Some(Error::new(ErrorCode::InvalidStream, *reason)) },
        };
        if write_message(&mut io, &Payload::ProxyRsp(answer).into()).await.is_err() {
            return;
        }
    }
    match claimed {
        Ok(slot) => {
            // The channel may have ended meanwhile; then this drops.
            let _ = slot.send(Prefixed::new(rest, io));
        }
        Err(reason) => tracing::warn!(%stream_id, reason, "spill stream refused"),
    }
}

/// What a private dial reaches: the agent's stream, or a datagram
/// channel's agent leg.
enum Reached {
    Stream(AgentIo),
    Packets(Leg),
}

/// A private dial: `StreamReq{token, tunnel_id_name, zero_rtt,
/// datagram_channel}`.
pub async fn private_dial(
    shared: Arc<Shared>,
    mut io: BoxIo,
    rest: Bytes,
    req: StreamReq,
    peer: SocketAddr,
    transport: Transport,
) {
    let wants_channel = req.datagram_channel == Some(true);
    // A datagram channel's id is in the answer: it is always sent.
    let zero_rtt = req.zero_rtt.unwrap_or(false) && !wants_channel;
    let target = req.tunnel_id_name.trim().to_string();
    let mut pairing_started = None;
    // Boxed: its state (waiting for the agent) is gone once it resolves.
    let outcome = Box::pin(async {
        let token = req.client_details.as_ref().and_then(|d| d.token.as_deref());
        let principal = shared.verifier.verify(token).map_err(|e| {
            shared.auth_failed(peer.ip());
            Error::new(ErrorCode::Unauthorized, e.to_string())
        })?;
        if wants_channel && matches!(transport, Transport::Tls) {
            return Err(Error::new(ErrorCode::FeatureNotAvailable, "datagram channels need the QUIC transport"));
        }
        let tunnel = match shared.registry.resolve_dial(&principal, &target) {
            Dial::Live(tunnel) => tunnel,
            Dial::Held(_) => {
                let message = format!("tunnel {target:?} is offline; its name is held until its agent opens it again");
                return Err(Error::new(ErrorCode::ServiceUnavailable, message));
            }
            Dial::NotFound => return Err(Error::new(ErrorCode::TunnelNotFound, format!("no tunnel {target:?}"))),
        };
        if !tunnel.spec.allows(peer.ip()) {
            return Err(Error::new(ErrorCode::Unauthorized, "source address is not in the tunnel's trusted_ips"));
        }
        // rstream dialers fall back to a stream of framed packets on this
        // refusal.
        if wants_channel && !tunnel.spec.datagram_channels {
            let why = if tunnel.properties.r#type.as_deref() == Some("datagram") {
                "the tunnel guarantees delivery: dial a stream of framed packets"
            } else {
                "the tunnel carries a byte stream, not datagrams"
            };
            return Err(Error::new(ErrorCode::FeatureNotAvailable, why));
        }
        pairing_started = Some(Instant::now());
        let reached = if tunnel.spec.datagram_channels {
            open_datagrams_to_agent(&shared, &tunnel, peer.ip()).await.map(|(id, leg)| (id, Reached::Packets(leg)))
        } else {
            open_to_agent(&shared, &tunnel, peer.ip()).await.map(|(id, io)| (id, Reached::Stream(io)))
        };
        reached.map(|r| (r, tunnel.client_id.clone())).map_err(|f| f.to_error())
    })
    .await;
    drop(req);
    let ((stream_id, reached), agent_client) = match outcome {
        Err(error) => {
            tracing::warn!(tunnel = %target, %error, "private dial refused");
            if !zero_rtt {
                let rsp = StreamRsp { payload: Some(StreamResult::Error(error)) };
                let _ = write_message(&mut io, &Message::from(Payload::StreamRsp(rsp))).await;
            }
            let _ = tokio::io::AsyncWriteExt::shutdown(&mut io).await;
            return;
        }
        Ok(reached) => reached,
    };
    if !zero_rtt {
        let rsp = StreamRsp { payload: Some(StreamResult::StreamId(stream_id.clone())) };
        if write_message(&mut io, &Payload::StreamRsp(rsp).into()).await.is_err() {
            return;
        }
    }
    let _active = shared.metrics.stream_started("private", pairing_started.map(|t| t.elapsed()));
    let dialer = Prefixed::new(rest, io);
    match reached {
        Reached::Stream(agent) => splice_private(&shared, &stream_id, dialer, agent).await,
        Reached::Packets(Leg::Framed(agent)) if !wants_channel => {
            splice_private(&shared, &stream_id, dialer, agent).await
        }
        Reached::Packets(agent) => {
            let agent_on_quic = matches!(agent, Leg::Quic { .. });
            let carried = match (wants_channel, &transport) {
                (true, Transport::Quic(conn)) => {
                    let id = strait_proto::packet::channel_id(&stream_id).expect("stream ids are 24 hex characters");
                    let registration = shared.datagrams.register(conn, id, None, None);
                    let (read, mut write) = tokio::io::split(dialer);
                    datagram::watch_lifeline(read, registration.closed_token());
                    let leg = Leg::Quic { conn: conn.clone(), id, registration };
                    let carried = datagram::bridge(&shared, leg, agent, Default::default()).await;
                    datagram::close_lifeline(&mut write, &stream_id).await;
                    carried
                }
                _ => datagram::bridge(&shared, Leg::Framed(Box::new(dialer)), agent, Default::default()).await,
            };
            if agent_on_quic {
                datagram::close_agent_channel(&shared, &agent_client, &stream_id);
            }
            tracing::debug!(%stream_id, to_agent = carried.to_agent, from_agent = carried.from_agent, "datagram channel ended");
        }
    }
}

/// Splices a private dial with the agent's stream until both ends are
/// done; only the end of a shutdown drain (`abort`) cuts it.
async fn splice_private<A, B>(shared: &Shared, stream_id: &str, mut dialer: A, mut agent: B)
where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    B: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let copied = tokio::select! {
        copied = splice(&mut dialer, &mut agent) => copied,
        _ = shared.abort.cancelled() => {
            tracing::info!(%stream_id, "private stream cut: shutdown drain time is up");
            return;
        }
    };
    match copied {
        Ok((to_agent, from_agent)) => shared.metrics.stream_bytes(to_agent, from_agent),
        Err(error) => tracing::debug!(%error, "private stream ended with an error"),
    }
}

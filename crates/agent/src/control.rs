//! An open control channel, agent side.
//!
//! A reader task routes what the engine sends: tunnel replies to their
//! waiting callers, `ProxyConnReq`s to a bounded pool of dial-back tasks,
//! heartbeat acknowledgements to the liveness check. A writer task drains
//! one outbox, so every caller's frames leave in order.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use strait_proto::{
    CloseControlChannelReq, CloseTunnelReq, ControlChannelLiveness, Error, ErrorCode, FrameError, FrameReader,
    Heartbeat, MAX_FRAME_LEN, Message, OpenControlChannelReq, OpenControlChannelResult, OpenTunnelReq,
    OpenTunnelResult, Payload, Prefixed, ProxyConnReq, ProxyConnRsp, ProxyReq, ServerDetails, TunnelProperties,
    write_message,
};
use tokio::sync::{Semaphore, mpsc, oneshot, watch};

use crate::AgentError;
use crate::client::{Client, Stream, client_details};
use crate::transport::Carrier;
use crate::tunnel::{Incoming, Tunnel};

/// Dial-backs in flight at once, as the Go and Python SDKs cap them; more
/// wait for a slot.
const MAX_ACTIVE_STREAMS: usize = 64;

/// Streams handed to a tunnel and not yet accepted.
const TUNNEL_BACKLOG: usize = 256;

/// The engine's largest datagram when it does not say (its default
/// `quic.max_datagram_bytes`).
const DEFAULT_MAX_DATAGRAM: usize = 1350;

type OpenReply = oneshot::Sender<Result<TunnelProperties, Error>>;

/// An open tunnel: where its streams go, and whether its packets ride QUIC
/// datagram channels (a datagram tunnel without guaranteed delivery).
#[derive(Clone)]
struct Open {
    streams: mpsc::Sender<Incoming>,
    datagrams: bool,
}

#[derive(Default)]
struct State {
    opening: HashMap<String, (OpenReply, mpsc::Sender<Incoming>)>,
    tunnels: HashMap<String, Open>,
    /// Datagram channels by stream id, for the engine's
    /// `DatagramChannelClose` and its asks for their spill streams.
    channels: HashMap<String, Channel>,
    /// Waiters for `CloseTunnelRsp`, with the engine's refusal if any.
    closing: HashMap<String, Vec<oneshot::Sender<Option<strait_proto::Error>>>>,
}

/// A datagram channel: cancelled when it closes, and its spill stream.
struct Channel {
    closed: tokio_util::sync::CancellationToken,
    spill: Option<Arc<crate::datagram::Spill>>,
}

pub(crate) struct Inner {
    client: Client,
    /// The largest QUIC datagram the engine takes, when it spills larger
    /// packets (`strait_proto::features::DATAGRAM_SPILL`).
    spill_above: Option<usize>,
    /// What carries this control channel; its streams go the same way.
    carrier: Carrier,
    outbox: mpsc::Sender<Message>,
    state: Mutex<State>,
    dialbacks: Semaphore,
    /// `None` while open; the reason once closed.
    closed: watch::Sender<Option<String>>,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn close_with(&self, reason: String) {
        self.closed.send_if_modified(|current| {
            if current.is_none() {
                *current = Some(reason);
                true
            } else {
                false
            }
        });
        let mut state = self.lock();
        state.opening.clear();
        state.tunnels.clear();
        for (_, channel) in state.channels.drain() {
            channel.closed.cancel();
        }
        state.closing.clear();
    }

    fn closed_reason(&self) -> Option<String> {
        self.closed.borrow().clone()
    }

    pub(crate) async fn send(&self, payload: Payload) -> Result<(), AgentError> {
        self.outbox
            .send(payload.into())
            .await
            .map_err(|_| AgentError::Closed(self.closed_reason().unwrap_or_else(|| "writer stopped".into())))
    }

    pub(crate) async fn close_tunnel(&self, tunnel_id: &str) -> Result<(), AgentError> {
        let (tx, rx) = oneshot::channel();
        {
            let mut state = self.lock();
            if !state.tunnels.contains_key(tunnel_id) {
                return Ok(());
            }
            state.closing.entry(tunnel_id.to_string()).or_default().push(tx);
        }
        self.send(Payload::CloseTunnelReq(CloseTunnelReq { tunnel_id: tunnel_id.to_string() })).await?;
        let refused = tokio::time::timeout(self.client.config.operation_timeout, rx)
            .await
            .map_err(|_| AgentError::Timeout("waiting for CloseTunnelRsp"))?
            .map_err(|_| AgentError::Closed(self.closed_reason().unwrap_or_default()))?;
        refused.map_or(Ok(()), |e| Err(AgentError::Engine(e)))
    }
}

/// An open control channel. Dropping it closes the connection.
pub struct ControlChannel {
    inner: Arc<Inner>,
    client_id: String,
    server_details: Option<ServerDetails>,
    liveness: Option<ControlChannelLiveness>,
    _stop: tokio_util::sync::DropGuard,
}

impl ControlChannel {
    pub(crate) async fn open(client: Client) -> Result<Self, AgentError> {
        let (io, carrier) = client.open_first().await?;
        let (read_half, mut write_half) = tokio::io::split(io);
        let interval_ms = client.config.heartbeat_interval.map(|d| d.as_millis().clamp(1, u32::MAX as u128) as u32);
        let mut details = client_details(client.config.token.clone());
        details.strait_features = vec![strait_proto::features::DATAGRAM_SPILL.into()];
        let req = OpenControlChannelReq {
            client_details: Some(details),
            liveness: interval_ms
                .map(|ms| ControlChannelLiveness { heartbeat_interval_ms: ms, heartbeat_timeout_ms: 0 }),
        };
        write_message(&mut write_half, &Payload::OpenControlChannelReq(req).into()).await?;
        let mut reader = FrameReader::new(read_half, MAX_FRAME_LEN);
        let rsp = tokio::time::timeout(client.config.operation_timeout, reader.read_message())
            .await
            .map_err(|_| AgentError::Timeout("waiting for OpenControlChannelRsp"))??;
        let ok = match rsp.payload {
            Some(Payload::OpenControlChannelRsp(rsp)) => match rsp.payload {
                Some(OpenControlChannelResult::Ok(ok)) => ok,
                Some(OpenControlChannelResult::Error(e)) => return Err(AgentError::Engine(e)),
                None => return Err(AgentError::Protocol("empty OpenControlChannelRsp".into())),
            },
            other => {
                return Err(AgentError::Protocol(format!(
                    "expected OpenControlChannelRsp, got {}",
                    other.map_or("nothing", |p| p.name())
                )));
            }
        };
        if let Some(l) = &ok.liveness
            && (Some(l.heartbeat_interval_ms) != interval_ms
                || l.heartbeat_timeout_ms < l.heartbeat_interval_ms
                || l.heartbeat_timeout_ms > 900_000)
        {
            return Err(AgentError::Protocol("engine returned an invalid liveness policy".into()));
        }

        let (outbox, mut outbox_rx) = mpsc::channel::<Message>(1024);
        let (closed, _) = watch::channel(None);
        let spill_above = ok.server_details.as_ref().and_then(|d| {
            let spills = d.strait_features.iter().any(|f| f == strait_proto::features::DATAGRAM_SPILL);
            spills.then(|| d.strait_max_datagram_bytes.map_or(DEFAULT_MAX_DATAGRAM, |max| max as usize))
        });
        let inner = Arc::new(Inner {
            client,
            spill_above,
            carrier,
            outbox,
            state: Mutex::new(State::default()),
            dialbacks: Semaphore::new(MAX_ACTIVE_STREAMS),
            closed,
        });
        let stop = tokio_util::sync::CancellationToken::new();

        // Writer.
        let writer_inner = Arc::downgrade(&inner);
        tokio::spawn(async move {
            while let Some(message) = outbox_rx.recv().await {
                if let Err(e) = write_message(&mut write_half, &message).await {
                    if let Some(inner) = writer_inner.upgrade() {
                        inner.close_with(format!("write failed: {e}"));
                    }
                    return;
                }
            }
            let _ = tokio::io::AsyncWriteExt::shutdown(&mut write_half).await;
        });

        // Heartbeats.
        let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
        if let Some(interval) = inner.client.config.heartbeat_interval {
            let hb_inner = Arc::downgrade(&inner);
            let negotiated = ok.liveness.is_some();
            let sent = sent.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut ticker = tokio::time::interval(interval);
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = ticker.tick() => {}
                    }
                    let Some(inner) = hb_inner.upgrade() else { return };
                    let hb = if negotiated {
                        let seq = sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                        Heartbeat { sequence: seq, acknowledgement: 0 }
                    } else {
                        Heartbeat::default()
                    };
                    if inner.send(Payload::Heartbeat(hb)).await.is_err() {
                        return;
                    }
                }
            });
        }

        // Reader.
        let read_inner = inner.clone();
        let timeout = ok.liveness.as_ref().map(|l| Duration::from_millis(l.heartbeat_timeout_ms as u64));
        let read_stop = stop.clone();
        tokio::spawn(async move {
            let reason = read_loop(&read_inner, &mut reader, timeout, &sent, &read_stop).await;
            read_stop.cancel();
            read_inner.close_with(reason);
        });

        Ok(Self {
            inner,
            client_id: ok.client_id,
            server_details: ok.server_details,
            liveness: ok.liveness,
            _stop: stop.drop_guard(),
        })
    }

    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    /// What carries this control channel and its streams: `tls` or `quic`.
    pub fn transport(&self) -> &'static str {
        self.inner.carrier.name()
    }

    pub fn server_details(&self) -> Option<&ServerDetails> {
        self.server_details.as_ref()
    }

    /// The liveness policy the engine accepted, if any.
    pub fn liveness(&self) -> Option<&ControlChannelLiveness> {
        self.liveness.as_ref()
    }

    /// Opens a tunnel; the reply carries the complete properties served.
    pub async fn open_tunnel(&self, properties: TunnelProperties) -> Result<Tunnel, AgentError> {
        let request_id = format!("{:032x}", rand::random::<u128>());
        let (reply, rx) = oneshot::channel();
        let (streams, incoming) = mpsc::channel(TUNNEL_BACKLOG);
        self.inner.lock().opening.insert(request_id.clone(), (reply, streams));
        let req = OpenTunnelReq { request_id: request_id.clone(), tunnel_properties: Some(properties) };
        if let Err(e) = self.inner.send(Payload::OpenTunnelReq(req)).await {
            self.inner.lock().opening.remove(&request_id);
            return Err(e);
        }
        let reply = tokio::time::timeout(self.inner.client.config.operation_timeout, rx).await;
        let properties = match reply {
            Ok(Ok(Ok(properties))) => properties,
            Ok(Ok(Err(e))) => return Err(AgentError::Engine(e)),
            Ok(Err(_)) => return Err(AgentError::Closed(self.inner.closed_reason().unwrap_or_default())),
            Err(_) => {
                self.inner.lock().opening.remove(&request_id);
                return Err(AgentError::Timeout("waiting for OpenTunnelRsp"));
            }
        };
        Ok(Tunnel::new(self.inner.clone(), properties, incoming))
    }

    /// Closes the channel: `CloseControlChannelReq`, then wait for the end.
    pub async fn close(&self) -> Result<(), AgentError> {
        if self.inner.closed_reason().is_some() {
            return Ok(());
        }
        let _ = self.inner.send(Payload::CloseControlChannelReq(CloseControlChannelReq {})).await;
        let mut closed = self.inner.closed.subscribe();
        let wait = closed.wait_for(|c| c.is_some());
        tokio::time::timeout(self.inner.client.config.operation_timeout, wait)
            .await
            .map_err(|_| AgentError::Timeout("waiting for CloseControlChannelRsp"))?
            .map(|_| ())
            .map_err(|_| AgentError::Closed("dropped".into()))
    }

    /// Waits until the channel ends; returns why.
    pub async fn closed(&self) -> String {
        let mut closed = self.inner.closed.subscribe();
        match closed.wait_for(|c| c.is_some()).await {
            Ok(reason) => reason.clone().unwrap_or_default(),
            Err(_) => "dropped".into(),
        }
    }

    pub fn is_closed(&self) -> bool {
        self.inner.closed_reason().is_some()
    }
}

async fn read_loop<R: tokio::io::AsyncRead + Unpin>(
    inner: &Arc<Inner>,
    reader: &mut FrameReader<R>,
    timeout: Option<Duration>,
    sent: &std::sync::atomic::AtomicU64,
    stop: &tokio_util::sync::CancellationToken,
) -> String {
    let mut acknowledged = 0u64;
    loop {
        let read = async {
            match timeout {
                Some(t) => tokio::time::timeout(t, reader.read_message()).await.ok(),
                None => Some(reader.read_message().await),
            }
        };
        let message = tokio::select! {
            _ = stop.cancelled() => return "closed by the agent".into(),
            read = read => match read {
                None => return "engine silent past the liveness timeout".into(),
                Some(Err(FrameError::Closed)) => return "engine closed the connection".into(),
                Some(Err(e)) => return format!("read failed: {e}"),
                Some(Ok(m)) => m,
            },
        };
        match message.payload {
            Some(Payload::OpenTunnelRsp(rsp)) => {
                let Some((reply, streams)) = inner.lock().opening.remove(&rsp.request_id) else { continue };
                match rsp.payload {
                    Some(OpenTunnelResult::TunnelProperties(p)) => {
                        if let Some(id) = p.id.clone() {
                            let datagrams =
                                p.r#type.as_deref() == Some("datagram") && p.datagram_guaranteed_delivery != Some(true);
                            inner.lock().tunnels.insert(id, Open { streams, datagrams });
                            let _ = reply.send(Ok(p));
                        } else {
                            let _ = reply.send(Err(Error::new(ErrorCode::Internal, "engine returned no tunnel id")));
                        }
                    }
                    Some(OpenTunnelResult::Error(e)) => {
                        let _ = reply.send(Err(e));
                    }
                    None => {
                        let _ = reply.send(Err(Error::new(ErrorCode::Internal, "empty OpenTunnelRsp")));
                    }
                }
            }
            Some(Payload::CloseTunnelRsp(rsp)) => {
                // Solicited or a revocation: either way the tunnel is gone.
                let mut state = inner.lock();
                state.tunnels.remove(&rsp.tunnel_id);
                for waiter in state.closing.remove(&rsp.tunnel_id).unwrap_or_default() {
                    let _ = waiter.send(rsp.error.clone());
                }
            }
            Some(Payload::ProxyConnReq(req)) => {
                // The engine asks for a live channel's spill stream: never a
                // new stream, even when the channel has just ended here.
                if req.strait_spill {
                    if let Some(Channel { spill: Some(spill), .. }) = inner.lock().channels.get(&req.stream_id) {
                        spill.open();
                    }
                    continue;
                }
                let inner = inner.clone();
                let open = inner.lock().tunnels.get(&req.tunnel_id).cloned();
                match (open, &inner.carrier) {
                    (Some(Open { streams, datagrams: true }), Carrier::Quic(conn)) => {
                        let conn = conn.clone();
                        tokio::spawn(async move { datagrams_back(inner, req, conn, streams).await });
                    }
                    _ => {
                        tokio::spawn(async move { dial_back(inner, req).await });
                    }
                }
            }
            Some(Payload::DatagramChannelClose(close)) => {
                if let Some(channel) = inner.lock().channels.remove(&close.stream_id) {
                    channel.closed.cancel();
                }
            }
            Some(Payload::Heartbeat(hb)) => {
                if timeout.is_none()
                    || hb.sequence != 0
                    || hb.acknowledgement <= acknowledged
                    || hb.acknowledgement > sent.load(std::sync::atomic::Ordering::Relaxed)
                {
                    return "engine sent an invalid heartbeat".into();
                }
                acknowledged = hb.acknowledgement;
            }
            Some(Payload::CloseControlChannelRsp(_)) => return "closed by the agent".into(),
            Some(Payload::ServerMessage(m)) => tracing::info!(message = %m.message, "engine says"),
            Some(other) => tracing::debug!(message = other.name(), "unexpected message from the engine ignored"),
            None => {}
        }
    }
}

/// Answers a `ProxyConnReq`: dial the engine, present the stream secret,
/// hand the stream to its tunnel, report the outcome.
async fn dial_back(inner: Arc<Inner>, req: ProxyConnReq) {
    let Some(Open { streams, .. }) = inner.lock().tunnels.get(&req.tunnel_id).cloned() else {
        let error = Error::new(ErrorCode::InvalidStream, "tunnel is not open on this client");
        let _ = inner.send(Payload::ProxyConnRsp(ProxyConnRsp { stream_id: req.stream_id, error: Some(error) })).await;
        return;
    };
    let Ok(_permit) = inner.dialbacks.acquire().await else { return };
    let result = async {
        let mut tls = inner.client.open_on(&inner.carrier).await?;
        let zero_rtt = inner.client.config.zero_rtt;
        let proxy = ProxyReq {
            client_details: Some(client_details(req.secret.clone())),
            stream_id: req.stream_id.clone(),
            zero_rtt: Some(zero_rtt),
        };
        write_message(&mut tls, &Payload::ProxyReq(proxy).into()).await?;
        if zero_rtt {
            return Ok::<Stream, AgentError>(Prefixed::new(Default::default(), tls));
        }
        let mut reader = FrameReader::new(tls, MAX_FRAME_LEN);
        let rsp = tokio::time::timeout(inner.client.config.operation_timeout, reader.read_message())
            .await
            .map_err(|_| AgentError::Timeout("waiting for ProxyRsp"))??;
        match rsp.payload {
            Some(Payload::ProxyRsp(rsp)) => match rsp.error {
                Some(e) => Err(AgentError::Engine(e)),
                None => {
                    let (tls, rest) = reader.into_parts();
                    Ok(Prefixed::new(rest, tls))
                }
            },
            other => {
                Err(AgentError::Protocol(format!("expected ProxyRsp, got {}", other.map_or("nothing", |p| p.name()))))
            }
        }
    }
    .await;
    let error = match result {
        Ok(stream) => {
            match streams.try_send(Incoming { stream, source: req.source_ip.as_ref().and_then(|ip| ip.ip()) }) {
                Ok(()) => None,
                Err(_) => Some(Error::new(ErrorCode::CapacityExhausted, "tunnel backlog is full or closed")),
            }
        }
        Err(e) => Some(Error::new(ErrorCode::InvalidStream, e.to_string())),
    };
    let _ = inner.send(Payload::ProxyConnRsp(ProxyConnRsp { stream_id: req.stream_id, error })).await;
}

/// Answers a `ProxyConnReq` of a datagram tunnel on QUIC: no stream, a
/// channel registered under the stream id, reported ready; the tunnel gets
/// it as a stream of framed packets.
async fn datagrams_back(
    inner: Arc<Inner>,
    req: ProxyConnReq,
    conn: quinn::Connection,
    streams: mpsc::Sender<Incoming>,
) {
    let Some(id) = strait_proto::packet::channel_id(&req.stream_id) else {
        let error = Error::new(ErrorCode::InvalidStream, "stream id is not 24 hex characters");
        let _ = inner.send(Payload::ProxyConnRsp(ProxyConnRsp { stream_id: req.stream_id, error: Some(error) })).await;
        return;
    };
    let registration = inner.client.quic.channels.register(id);
    let closed = tokio_util::sync::CancellationToken::new();
    let spill = inner.spill_above.map(|max| {
        Arc::new(crate::datagram::Spill::new(crate::datagram::SpillTo {
            conn: conn.clone(),
            stream_id: req.stream_id.clone(),
            secret: req.secret.clone(),
            max_datagram: max,
            deliver: registration.queue(),
            timeout: inner.client.config.operation_timeout,
        }))
    });
    let channel = Channel { closed: closed.clone(), spill: spill.clone() };
    inner.lock().channels.insert(req.stream_id.clone(), channel);
    let (stream, pump) = crate::datagram::pipe(conn, id, registration, closed, spill);
    let source = req.source_ip.as_ref().and_then(|ip| ip.ip());
    let error = streams
        .try_send(Incoming { stream, source })
        .err()
        .map(|_| Error::new(ErrorCode::CapacityExhausted, "tunnel backlog is full or closed"));
    let refused = error.is_some();
    let rsp = ProxyConnRsp { stream_id: req.stream_id.clone(), error };
    if inner.send(Payload::ProxyConnRsp(rsp)).await.is_err() || refused {
        inner.lock().channels.remove(&req.stream_id);
        return;
    }
    let ended_here = pump.await;
    inner.lock().channels.remove(&req.stream_id);
    if ended_here {
        let close = strait_proto::DatagramChannelClose { stream_id: req.stream_id, error: None };
        let _ = inner.send(Payload::DatagramChannelClose(close)).await;
    }
}

//! Spill streams: the packets of an agent's datagram channel that are too
//! large for a QUIC datagram (`strait_proto::features::DATAGRAM_SPILL`).
//!
//! A channel gets its spill stream only when such a packet comes, either
//! way: a flood of small packets opens nothing. The agent always opens it,
//! as a reverse dial (`ProxyReq`) for the channel's stream id with the
//! channel's secret, which the engine keeps for the channel's life. When
//! the engine has the first large packet it asks for it with a
//! `ProxyConnReq` that repeats the channel's stream id. Packets on the
//! stream are framed (`strait_proto::packet`); what the agent sends on it
//! joins the channel's queue beside its datagrams. A spill stream that does
//! not come within `timeouts.stream_request_seconds`, or that ends, is not
//! asked for again: the channel's large packets are dropped and counted from
//! then on (the channel itself carries on). An agent has at most
//! [`PER_CLIENT`] spill streams at once, so a flood of large packets from
//! many sources cannot take its QUIC connection's stream budget; past that
//! they are dropped and counted (`spill_limit`).

use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use prometheus_client::metrics::counter::Counter;
use strait_proto::packet::{read_packet, write_packet};
use strait_proto::{Payload, ProxyConnReq};
use subtle::ConstantTimeEq;
use tokio::sync::{mpsc, oneshot};

use super::Dropped;
use crate::Shared;
use crate::streams::AgentIo;

/// Large packets waiting for the spill stream or its writer, per channel.
const QUEUE: usize = 16;

/// Spill streams one agent may have open at once.
pub const PER_CLIENT: usize = 64;

/// What the engine keeps to ask for a channel's spill stream and to
/// recognise it.
pub struct SpillSpec {
    pub client_id: String,
    pub tunnel_id: String,
    pub stream_id: String,
    pub secret: String,
}

/// The spill of one channel: idle until its first large packet.
pub struct Spill {
    spec: SpillSpec,
    /// The channel's queue: what the agent sends on the stream goes there.
    deliver: mpsc::Sender<Bytes>,
    active: Mutex<Option<Active>>,
}

/// A spill whose stream is asked for, or open.
struct Active {
    /// Large packets towards the agent.
    out: mpsc::Sender<Bytes>,
    /// Takes the agent's stream; `None` once it came.
    stream: Option<oneshot::Sender<AgentIo>>,
    task: tokio::task::JoinHandle<()>,
    /// One of the agent's [`PER_CLIENT`] spill streams.
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Spill {
    pub(super) fn new(spec: SpillSpec, deliver: mpsc::Sender<Bytes>) -> Self {
        Self { spec, deliver, active: Mutex::new(None) }
    }

    fn lock(&self) -> MutexGuard<'_, Option<Active>> {
        self.active.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends a packet too large for a datagram towards the agent, asking
    /// for the spill stream first if the channel has none.
    pub fn send(&self, shared: &Shared, packet: Bytes) {
        let mut active = self.lock();
        let active = match &mut *active {
            Some(active) => active,
            None => {
                let Some(started) = self.start(shared) else {
                    shared.metrics.datagram_dropped(Dropped::SpillLimit.label());
                    return;
                };
                let ask = Payload::ProxyConnReq(ProxyConnReq {
                    tunnel_id: self.spec.tunnel_id.clone(),
                    stream_id: self.spec.stream_id.clone(),
                    secret: Some(self.spec.secret.clone()),
                    source_ip: None,
                    proxy_endpoint: None,
                    strait_spill: true,
                });
                let asked =
                    shared.registry.client(&self.spec.client_id).is_some_and(|c| c.outbox.try_send(ask.into()).is_ok());
                if !asked {
                    tracing::debug!(stream_id = %self.spec.stream_id, "could not ask the agent for a spill stream");
                }
                active.insert(started)
            }
        };
        match active.out.try_send(packet) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => shared.metrics.datagram_dropped(Dropped::QueueFull.label()),
            // The stream never came, or is gone.
            Err(mpsc::error::TrySendError::Closed(_)) => shared.metrics.datagram_dropped(Dropped::Oversized.label()),
        }
    }

    /// The agent dialled back for this channel (`ProxyReq` with its stream
    /// id): where its spill stream goes, if the secret is the channel's and
    /// the channel waits for one. Taken in one step, so two racing dials
    /// cannot both be told yes.
    pub fn claim(&self, shared: &Shared, secret: &str) -> Result<oneshot::Sender<AgentIo>, &'static str> {
        if !bool::from(self.spec.secret.as_bytes().ct_eq(secret.as_bytes())) {
            return Err("wrong stream secret");
        }
        let mut active = self.lock();
        let active = match &mut *active {
            Some(active) => active,
            None => active.insert(self.start(shared).ok_or("the agent has as many spill streams as it may")?),
        };
        let stream = active.stream.take().ok_or("the datagram channel has its spill stream already")?;
        if stream.is_closed() {
            return Err("the datagram channel no longer waits for its spill stream");
        }
        Ok(stream)
    }

    /// The pump, if the agent may have one more spill stream.
    fn start(&self, shared: &Shared) -> Option<Active> {
        let permit = shared.registry.client(&self.spec.client_id)?.spill_permits.clone().try_acquire_owned().ok()?;
        let (out, out_rx) = mpsc::channel(QUEUE);
        let (stream, stream_rx) = oneshot::channel();
        let pump = Pump {
            deliver: self.deliver.clone(),
            deadline: Duration::from_secs(shared.config.timeouts.stream_request_seconds),
            queue_full: shared.metrics.datagram_drops(Dropped::QueueFull.label()),
            unsent: shared.metrics.datagram_drops(Dropped::Oversized.label()),
            spilled: shared.metrics.datagrams_spilled(),
            stream_id: self.spec.stream_id.clone(),
        };
        let task = tokio::spawn(pump.run(stream_rx, out_rx));
        Some(Active { out, stream: Some(stream), task, _permit: permit })
    }
}

impl Drop for Spill {
    fn drop(&mut self) {
        if let Some(active) = self.lock().take() {
            active.task.abort();
        }
    }
}

/// The task of an active spill: waits for the stream, then carries
/// packets both ways on it until the channel ends (the task is aborted) or
/// the stream does.
struct Pump {
    deliver: mpsc::Sender<Bytes>,
    deadline: Duration,
    queue_full: Counter,
    unsent: Counter,
    spilled: Counter,
    stream_id: String,
}

impl Pump {
    async fn run(self, stream: oneshot::Receiver<AgentIo>, mut out: mpsc::Receiver<Bytes>) {
        let Ok(Ok(io)) = tokio::time::timeout(self.deadline, stream).await else {
            tracing::warn!(
                stream_id = %self.stream_id,
                "the agent did not open the datagram channel's spill stream; its packets too large for a QUIC \
                 datagram are dropped"
            );
            out.close();
            while out.try_recv().is_ok() {
                self.unsent.inc();
            }
            return;
        };
        let (mut read, mut write) = tokio::io::split(io);
        let from_agent = async {
            while let Ok(Some(packet)) = read_packet(&mut read).await {
                match self.deliver.try_send(packet) {
                    Ok(()) => self.spilled.inc(),
                    Err(_) => self.queue_full.inc(),
                };
            }
        };
        let to_agent = async {
            while let Some(packet) = out.recv().await {
                if write_packet(&mut write, &packet).await.is_err() {
                    self.unsent.inc();
                    return;
                }
                self.spilled.inc();
            }
        };
        tokio::select! {
            _ = from_agent => {}
            _ = to_agent => {}
        }
        // The stream is over: what still waits for it is lost.
        out.close();
        while out.try_recv().is_ok() {
            self.unsent.inc();
        }
    }
}

//! Datagram channels: the packets of a datagram tunnel as QUIC DATAGRAM
//! frames (a 12-byte channel id, then the packet), so a lost packet holds
//! up nobody and a late one is not waited for.
//!
//! A channel has two legs, the dialer's and the agent's. Each is either a
//! QUIC datagram channel on that peer's connection, packets framed in a
//! stream (`strait_proto::packet`: a TLS peer, a tunnel with guaranteed
//! delivery, a dialer that asked for a plain stream), or one public source
//! of a published UDP port ([`crate::edge::udp`]). [`bridge`] carries
//! packets between any two legs. The [`Router`] finds the channel a QUIC
//! datagram belongs to: unknown ids, short and oversized datagrams are
//! dropped and counted, never buffered without bound. A packet too large
//! for a datagram crosses an agent's channel on its [`spill`] stream, when
//! the agent speaks that extension.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use strait_proto::packet::{self, read_packet, write_packet};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::Shared;

pub mod spill;
pub use spill::{Spill, SpillSpec};

/// Packets queued per channel leg; a peer sending faster than the other
/// side takes them loses the excess, as UDP would.
pub const QUEUE: usize = 64;

/// Why a datagram was dropped: the `reason` of
/// `strait_datagrams_dropped_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dropped {
    /// Shorter than its 12-byte channel id.
    Short,
    /// Larger than `quic.max_datagram_bytes`, or than the path takes.
    Oversized,
    /// No channel with this id on this connection.
    UnknownChannel,
    /// The channel's queue is full.
    QueueFull,
    /// Too large for a datagram, and the agent has as many spill streams
    /// as it may.
    SpillLimit,
}

impl Dropped {
    pub fn label(self) -> &'static str {
        match self {
            Dropped::Short => "short",
            Dropped::Oversized => "oversized",
            Dropped::UnknownChannel => "unknown_channel",
            Dropped::QueueFull => "queue_full",
            Dropped::SpillLimit => "spill_limit",
        }
    }
}

struct Entry {
    tx: mpsc::Sender<Bytes>,
    closed: CancellationToken,
    /// The agent's client id, for an agent's leg: its control channel's
    /// end closes it.
    client_id: Option<String>,
    /// An agent's leg that spills large packets.
    spill: Option<Arc<Spill>>,
}

/// The datagram channels of every QUIC connection.
#[derive(Default)]
pub struct Router {
    channels: Mutex<HashMap<(usize, [u8; 12]), Entry>>,
}

impl Router {
    fn lock(&self) -> MutexGuard<'_, HashMap<(usize, [u8; 12]), Entry>> {
        self.channels.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers channel `id` on `conn` (an agent's leg: `client_id`, and
    /// `spill` if it spills); the registration removes it when dropped.
    pub fn register(
        self: &Arc<Self>,
        conn: &quinn::Connection,
        id: [u8; 12],
        client_id: Option<String>,
        spill: Option<SpillSpec>,
    ) -> Registration {
        let (tx, rx) = mpsc::channel(QUEUE);
        let closed = CancellationToken::new();
        let key = (conn.stable_id(), id);
        let spill = spill.map(|spec| Arc::new(Spill::new(spec, tx.clone())));
        self.lock().insert(key, Entry { tx, closed: closed.clone(), client_id, spill: spill.clone() });
        Registration { router: self.clone(), key, rx, closed, spill }
    }

    /// The spill of channel `id` on `conn`, for the agent's spill stream.
    pub fn spill(&self, conn: usize, id: [u8; 12]) -> Option<Arc<Spill>> {
        self.lock().get(&(conn, id)).and_then(|e| e.spill.clone())
    }

    /// Hands a datagram from `conn` to its channel.
    pub fn deliver(&self, conn: usize, datagram: Bytes, max: usize) -> Result<(), Dropped> {
        if datagram.len() < 12 {
            return Err(Dropped::Short);
        }
        if datagram.len() > max {
            return Err(Dropped::Oversized);
        }
        let id: [u8; 12] = datagram[..12].try_into().expect("checked above");
        let channels = self.lock();
        let entry = channels.get(&(conn, id)).ok_or(Dropped::UnknownChannel)?;
        entry.tx.try_send(datagram.slice(12..)).map_err(|_| Dropped::QueueFull)
    }

    /// The peer closed channel `id` on `conn` (`DatagramChannelClose`).
    pub fn close(&self, conn: usize, id: [u8; 12]) -> bool {
        self.lock().get(&(conn, id)).map(|e| e.closed.cancel()).is_some()
    }

    /// An agent's control channel ended: its legs end too.
    pub fn close_client(&self, client_id: &str) {
        for entry in self.lock().values().filter(|e| e.client_id.as_deref() == Some(client_id)) {
            entry.closed.cancel();
        }
    }

    /// Open channels, for tests and metrics.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A channel's place in the [`Router`].
pub struct Registration {
    router: Arc<Router>,
    key: (usize, [u8; 12]),
    rx: mpsc::Receiver<Bytes>,
    closed: CancellationToken,
    spill: Option<Arc<Spill>>,
}

impl Registration {
    /// Cancelled when the channel is closed from outside.
    pub fn closed_token(&self) -> CancellationToken {
        self.closed.clone()
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.router.lock().remove(&self.key);
    }
}

/// Reads one QUIC connection's datagrams until it closes.
pub async fn read_datagrams(shared: Arc<Shared>, conn: quinn::Connection) {
    let max = shared.config.quic.max_datagram_bytes;
    let id = conn.stable_id();
    while let Ok(datagram) = conn.read_datagram().await {
        if let Err(dropped) = shared.datagrams.deliver(id, datagram, max) {
            shared.metrics.datagram_dropped(dropped.label());
        }
    }
}

/// One side of a channel.
pub enum Leg {
    /// DATAGRAM frames on this connection under this channel id.
    Quic { conn: quinn::Connection, id: [u8; 12], registration: Registration },
    /// Packets framed in a stream.
    Framed(Box<dyn strait_proto::Io>),
    /// One source of a published UDP port: what it sent, as the port's
    /// reader queued it, and where the answers go.
    Udp { rx: mpsc::Receiver<Bytes>, socket: Arc<UdpSocket>, peer: SocketAddr },
}

/// How a bridge ended.
#[derive(Debug, Default)]
pub struct Carried {
    pub to_agent: u64,
    pub from_agent: u64,
}

/// When a bridge ends besides either leg ending or the drain being over.
#[derive(Default)]
pub struct Until {
    /// No packet either way for this long.
    pub idle: Option<Duration>,
    /// Cancelled from outside (a session evicted, its tunnel closed).
    pub stop: CancellationToken,
}

/// Carries packets between the dialer's leg and the agent's until either
/// ends, `until` says so, or the drain is over.
pub async fn bridge(shared: &Shared, dialer: Leg, agent: Leg, until: Until) -> Carried {
    let mut carried = Carried::default();
    let (mut dialer_rx, mut dialer_tx, dialer_task) = open(dialer);
    let (mut agent_rx, mut agent_tx, agent_task) = open(agent);
    // One timer for the idle limit, looked at only when it fires: a
    // packet only notes its time (no timer work per packet).
    let limit = until.idle.unwrap_or(Duration::from_secs(86_400 * 365));
    let timer = tokio::time::sleep(limit);
    tokio::pin!(timer);
    let mut last = tokio::time::Instant::now();
    loop {
        tokio::select! {
            packet = dialer_rx.recv() => match packet {
                Some(packet) => {
                    if !agent_tx.send(shared, packet).await {
                        break;
                    }
                    carried.to_agent += 1;
                    last = tokio::time::Instant::now();
                }
                None => break,
            },
            packet = agent_rx.recv() => match packet {
                Some(packet) => {
                    if !dialer_tx.send(shared, packet).await {
                        break;
                    }
                    carried.from_agent += 1;
                    last = tokio::time::Instant::now();
                }
                None => break,
            },
            _ = &mut timer, if until.idle.is_some() => {
                if last.elapsed() >= limit {
                    break;
                }
                timer.as_mut().reset(last + limit);
            }
            _ = until.stop.cancelled() => break,
            _ = shared.abort.cancelled() => break,
        }
    }
    for task in [dialer_task, agent_task].into_iter().flatten() {
        task.abort();
    }
    shared.metrics.datagrams_relayed(carried.to_agent + carried.from_agent);
    carried
}

/// Where a bridge sends a leg's packets.
enum Sender {
    Quic { conn: quinn::Connection, id: [u8; 12], spill: Option<Arc<Spill>> },
    Framed(tokio::io::WriteHalf<Box<dyn strait_proto::Io>>),
    Udp { socket: Arc<UdpSocket>, peer: SocketAddr },
}

impl Sender {
    /// Sends one packet; false once the leg can take no more.
    async fn send(&mut self, shared: &Shared, packet: Bytes) -> bool {
        match self {
            Sender::Quic { conn, id, spill } => {
                let size = packet.len() + 12;
                let fits = size <= shared.config.quic.max_datagram_bytes
                    && conn.max_datagram_size().is_some_and(|max| size <= max);
                let too_large = |packet| match spill.as_deref() {
                    Some(spill) => spill.send(shared, packet),
                    None => shared.metrics.datagram_dropped(Dropped::Oversized.label()),
                };
                if !fits {
                    too_large(packet);
                    return true;
                }
                match conn.send_datagram(packet::datagram(id, &packet)) {
                    Ok(()) => true,
                    // The path shrank between the check and the send.
                    Err(quinn::SendDatagramError::TooLarge) => {
                        too_large(packet);
                        true
                    }
                    Err(_) => false,
                }
            }
            Sender::Framed(writer) => write_packet(writer, &packet).await.is_ok(),
            // A source that went away loses its answers, as UDP would; the
            // session ends when it goes idle.
            Sender::Udp { socket, peer } => {
                let _ = socket.send_to(&packet, *peer).await;
                true
            }
        }
    }
}

/// A leg's packets as a queue (a QUIC leg's is its registration's; a
/// framed leg's is filled by a reader task), and where to send.
fn open(leg: Leg) -> (Receiver, Sender, Option<tokio::task::JoinHandle<()>>) {
    match leg {
        Leg::Quic { conn, id, registration } => {
            let spill = registration.spill.clone();
            (Receiver::Quic(registration), Sender::Quic { conn, id, spill }, None)
        }
        Leg::Udp { rx, socket, peer } => (Receiver::Framed(rx), Sender::Udp { socket, peer }, None),
        Leg::Framed(io) => {
            let (mut read, write) = tokio::io::split(io);
            let (tx, rx) = mpsc::channel(QUEUE);
            let task = tokio::spawn(async move {
                while let Ok(Some(packet)) = read_packet(&mut read).await {
                    if tx.send(packet).await.is_err() {
                        return;
                    }
                }
            });
            (Receiver::Framed(rx), Sender::Framed(write), Some(task))
        }
    }
}

enum Receiver {
    Quic(Registration),
    Framed(mpsc::Receiver<Bytes>),
}

impl Receiver {
    /// The next packet; `None` once the leg has ended.
    async fn recv(&mut self) -> Option<Bytes> {
        match self {
            Receiver::Quic(registration) => tokio::select! {
                biased;
                _ = registration.closed.cancelled() => None,
                packet = registration.rx.recv() => packet,
            },
            Receiver::Framed(rx) => rx.recv().await,
        }
    }
}

/// Watches a QUIC dialer's lifeline stream: its end, or a
/// `DatagramChannelClose` on it, closes the channel.
pub fn watch_lifeline<R: AsyncRead + Unpin + Send + 'static>(mut read: R, closed: CancellationToken) {
    tokio::spawn(async move {
        let mut reader = strait_proto::FrameReader::new(&mut read, strait_proto::MAX_FRAME_LEN);
        tokio::select! {
            _ = closed.cancelled() => {}
            _ = reader.read_message() => closed.cancel(),
        }
    });
}

/// Tells an agent on QUIC that its datagram channel `stream_id` is over.
pub fn close_agent_channel(shared: &Shared, client_id: &str, stream_id: &str) {
    if let Some(client) = shared.registry.client(client_id) {
        let close = strait_proto::DatagramChannelClose { stream_id: stream_id.to_string(), error: None };
        let _ = client.outbox.try_send(strait_proto::Payload::DatagramChannelClose(close).into());
    }
}

/// Tells a QUIC dialer on its lifeline that the channel is over.
pub async fn close_lifeline<W: AsyncWrite + Unpin>(write: &mut W, stream_id: &str) {
    let close = strait_proto::DatagramChannelClose { stream_id: stream_id.to_string(), error: None };
    let _ = strait_proto::write_message(write, &strait_proto::Payload::DatagramChannelClose(close).into()).await;
    let _ = tokio::io::AsyncWriteExt::shutdown(write).await;
}

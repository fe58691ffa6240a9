//! Datagram channels, agent side: the packets of a datagram tunnel as QUIC
//! DATAGRAM frames (a 12-byte channel id, then the packet) on the client's
//! QUIC connection.
//!
//! A tunnel sees every stream the same way: a datagram channel is handed to
//! it as a [`Stream`] of framed packets (`strait_proto::packet`), exactly
//! what the same tunnel carries over TLS, so forwarding code has one path.
//! A dialer gets a [`PacketConn`]: datagrams over QUIC, or framed packets
//! on a stream where the engine, the transport or the tunnel (guaranteed
//! delivery) calls for one.
//!
//! When the engine speaks strait's spill extension
//! (`strait_proto::features::DATAGRAM_SPILL`), a tunnel's packet too large
//! for a datagram crosses on the channel's [`Spill`] stream instead of
//! being lost.

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use strait_proto::packet::{self, read_packet, write_packet};
use strait_proto::{FrameReader, MAX_FRAME_LEN, Payload, ProxyReq, write_message};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::client::Stream;

/// Packets queued per channel before the excess is dropped, as UDP would.
const QUEUE: usize = 64;

/// Bytes buffered in a channel's framed pipe to its tunnel.
const PIPE: usize = 256 * 1024;

/// The channels of one QUIC connection, by id.
#[derive(Default)]
pub(crate) struct Channels {
    map: Mutex<HashMap<[u8; 12], mpsc::Sender<Bytes>>>,
}

impl Channels {
    fn lock(&self) -> MutexGuard<'_, HashMap<[u8; 12], mpsc::Sender<Bytes>>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn register(self: &Arc<Self>, id: [u8; 12]) -> Registration {
        let (tx, rx) = mpsc::channel(QUEUE);
        self.lock().insert(id, tx.clone());
        Registration { channels: self.clone(), id, rx, tx }
    }

    /// Reads `conn`'s datagrams into their channels until it closes;
    /// unknown ids and short datagrams are dropped.
    pub(crate) fn spawn_reader(self: &Arc<Self>, conn: quinn::Connection, gone: CancellationToken) {
        let channels = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let datagram = tokio::select! {
                    _ = gone.cancelled() => return,
                    datagram = conn.read_datagram() => match datagram {
                        Ok(datagram) => datagram,
                        Err(_) => return,
                    },
                };
                let Some(channels) = channels.upgrade() else { return };
                if datagram.len() < 12 {
                    continue;
                }
                let id: [u8; 12] = datagram[..12].try_into().expect("checked above");
                if let Some(tx) = channels.lock().get(&id) {
                    let _ = tx.try_send(datagram.slice(12..));
                }
            }
        });
    }
}

/// A channel's place among its connection's; removed when dropped.
pub(crate) struct Registration {
    channels: Arc<Channels>,
    id: [u8; 12],
    rx: mpsc::Receiver<Bytes>,
    /// Where the channel's packets queue: its spill stream's go there too.
    tx: mpsc::Sender<Bytes>,
}

impl Registration {
    pub(crate) fn queue(&self) -> mpsc::Sender<Bytes> {
        self.tx.clone()
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.channels.lock().remove(&self.id);
    }
}

/// Sends one packet as a datagram; a packet the path cannot carry is lost,
/// as it would be on UDP, and said so.
fn send_datagram(conn: &quinn::Connection, id: &[u8; 12], packet: &[u8]) -> io::Result<()> {
    /// Packets dropped for size, process-wide: the first and every
    /// thousandth are logged, so a service that sends big packets is seen
    /// without a line per packet.
    static TOO_LARGE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    match conn.send_datagram(packet::datagram(id, packet)) {
        Ok(()) => Ok(()),
        Err(quinn::SendDatagramError::TooLarge) => {
            let dropped = TOO_LARGE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if dropped.is_multiple_of(1000) {
                tracing::warn!(
                    bytes = packet.len(),
                    max = conn.max_datagram_size().map_or(0, |m| m.saturating_sub(12)),
                    dropped = dropped + 1,
                    "a packet too large for a QUIC datagram was dropped; a tunnel with guaranteed delivery carries \
                     packets of any size"
                );
            }
            Ok(())
        }
        Err(error) => Err(io::Error::new(io::ErrorKind::BrokenPipe, error.to_string())),
    }
}

/// Turns an agent-side datagram channel into a stream of framed packets
/// for its tunnel. The pump ends when the tunnel lets go of the stream (the
/// returned future then says so, for a `DatagramChannelClose`), when the
/// engine closes the channel (`closed`), or when the connection goes.
/// Packets too large for a datagram go on `spill`, if the engine has one.
pub(crate) fn pipe(
    conn: quinn::Connection,
    id: [u8; 12],
    mut registration: Registration,
    closed: CancellationToken,
    spill: Option<Arc<Spill>>,
) -> (Stream, impl Future<Output = bool>) {
    let (ours, theirs) = tokio::io::duplex(PIPE);
    let pump = async move {
        let (mut read, mut write) = tokio::io::split(ours);
        let from_tunnel = async {
            while let Ok(Some(packet)) = read_packet(&mut read).await {
                if let Some(spill) = spill.as_ref().filter(|s| !s.fits(&conn, packet.len())) {
                    spill.send(packet);
                    continue;
                }
                if send_datagram(&conn, &id, &packet).is_err() {
                    return;
                }
            }
        };
        let to_tunnel = async {
            while let Some(packet) = registration.rx.recv().await {
                if write_packet(&mut write, &packet).await.is_err() {
                    return;
                }
            }
        };
        tokio::select! {
            _ = closed.cancelled() => false,
            _ = from_tunnel => true,
            _ = to_tunnel => true,
        }
    };
    (strait_proto::Prefixed::new(Default::default(), Box::new(theirs) as strait_proto::BoxIo), pump)
}

/// Large packets waiting for the spill stream or its writer.
const SPILL_QUEUE: usize = 16;

/// The spill stream of one channel, idle until a packet too large for a
/// datagram comes either way: the engine asks for it with a `ProxyConnReq`
/// repeating the channel's stream id, or the tunnel has such a packet to
/// send. It is this connection's reverse dial for the channel's stream id,
/// with the channel's secret.
pub(crate) struct Spill {
    to: SpillTo,
    active: Mutex<Option<(mpsc::Sender<Bytes>, tokio::task::JoinHandle<()>)>>,
}

/// Where a channel's spill stream goes and what it presents.
#[derive(Clone)]
pub(crate) struct SpillTo {
    pub(crate) conn: quinn::Connection,
    pub(crate) stream_id: String,
    pub(crate) secret: Option<String>,
    /// The largest datagram the engine takes (channel id included).
    pub(crate) max_datagram: usize,
    /// The channel's queue towards the tunnel.
    pub(crate) deliver: mpsc::Sender<Bytes>,
    /// How long the stream may take to open.
    pub(crate) timeout: Duration,
}

impl Spill {
    pub(crate) fn new(to: SpillTo) -> Self {
        Self { to, active: Mutex::new(None) }
    }

    /// Whether a packet of `len` bytes rides a datagram.
    fn fits(&self, conn: &quinn::Connection, len: usize) -> bool {
        let size = len + 12;
        size <= self.to.max_datagram && conn.max_datagram_size().is_some_and(|max| size <= max)
    }

    /// Opens the stream if it is not open (the engine asked for it).
    pub(crate) fn open(&self) {
        self.start();
    }

    /// Sends a packet too large for a datagram.
    fn send(&self, packet: Bytes) {
        if self.start().try_send(packet).is_err() {
            static DROPPED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            if DROPPED.fetch_add(1, std::sync::atomic::Ordering::Relaxed).is_multiple_of(1000) {
                tracing::warn!(stream_id = %self.to.stream_id, "a large packet was dropped: the spill stream is backed up or gone");
            }
        }
    }

    fn start(&self) -> mpsc::Sender<Bytes> {
        let mut active = self.active.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((out, _)) = &*active {
            return out.clone();
        }
        let (out, out_rx) = mpsc::channel(SPILL_QUEUE);
        let task = tokio::spawn(spill_pump(self.to.clone(), out_rx));
        *active = Some((out.clone(), task));
        out
    }
}

impl Drop for Spill {
    fn drop(&mut self) {
        if let Some((_, task)) = self.active.lock().unwrap_or_else(|e| e.into_inner()).take() {
            task.abort();
        }
    }
}

/// Opens the spill stream, then carries packets both ways on it until the
/// channel ends (the task is aborted) or the stream does.
async fn spill_pump(to: SpillTo, mut out: mpsc::Receiver<Bytes>) {
    let SpillTo { conn, stream_id, secret, deliver, timeout, .. } = to;
    let opened = tokio::time::timeout(timeout, async {
        let mut io = crate::transport::open_bi(&conn).await?;
        let req = ProxyReq {
            client_details: Some(crate::client::client_details(secret)),
            stream_id: stream_id.clone(),
            zero_rtt: Some(false),
        };
        write_message(&mut io, &Payload::ProxyReq(req).into()).await?;
        let mut reader = FrameReader::new(io, MAX_FRAME_LEN);
        match reader.read_message().await?.payload {
            Some(Payload::ProxyRsp(rsp)) if rsp.error.is_none() => Ok(reader.into_parts()),
            Some(Payload::ProxyRsp(rsp)) => Err(crate::AgentError::Engine(rsp.error.unwrap_or_default())),
            other => Err(crate::AgentError::Protocol(format!(
                "expected ProxyRsp, got {}",
                other.map_or("nothing", |p| p.name())
            ))),
        }
    })
    .await;
    let (io, rest) = match opened {
        Ok(Ok(parts)) => parts,
        Ok(Err(error)) => {
            tracing::warn!(%stream_id, %error, "the datagram channel's spill stream failed; its large packets are dropped");
            return;
        }
        Err(_) => {
            tracing::warn!(%stream_id, "the datagram channel's spill stream did not open in time; its large packets are dropped");
            return;
        }
    };
    let (mut read, mut write) = tokio::io::split(strait_proto::Prefixed::new(rest, io));
    let from_engine = async {
        while let Ok(Some(packet)) = read_packet(&mut read).await {
            let _ = deliver.try_send(packet);
        }
    };
    let to_engine = async {
        while let Some(packet) = out.recv().await {
            if write_packet(&mut write, &packet).await.is_err() {
                return;
            }
        }
    };
    tokio::select! {
        _ = from_engine => {}
        _ = to_engine => {}
    }
}

/// A dialer's side of a datagram tunnel.
pub struct PacketConn {
    inner: Inner,
}

enum Inner {
    /// QUIC datagrams under this channel id; the lifeline stream stays open
    /// for as long as the channel, and its end (or the engine's
    /// `DatagramChannelClose` on it) ends the channel.
    Quic {
        conn: quinn::Connection,
        id: [u8; 12],
        registration: Registration,
        closed: CancellationToken,
        lifeline: tokio::io::WriteHalf<Stream>,
        /// The client's QUIC side, whose reader delivers this channel's
        /// datagrams: kept for as long as the channel, whatever happens to
        /// the `Client`.
        _side: Arc<crate::transport::QuicSide>,
    },
    /// Packets framed in a stream.
    Framed(Stream),
}

impl PacketConn {
    pub(crate) fn quic(
        conn: quinn::Connection,
        id: [u8; 12],
        registration: Registration,
        lifeline: Stream,
        side: Arc<crate::transport::QuicSide>,
    ) -> Self {
        let closed = CancellationToken::new();
        let (mut read, write) = tokio::io::split(lifeline);
        let watch = closed.clone();
        tokio::spawn(async move {
            let mut reader = strait_proto::FrameReader::new(&mut read, strait_proto::MAX_FRAME_LEN);
            tokio::select! {
                _ = watch.cancelled() => {}
                _ = reader.read_message() => watch.cancel(),
            }
        });
        Self { inner: Inner::Quic { conn, id, registration, closed, lifeline: write, _side: side } }
    }

    pub(crate) fn framed(stream: Stream) -> Self {
        Self { inner: Inner::Framed(stream) }
    }

    /// `datagrams` (QUIC DATAGRAM frames) or `framed` (packets in a stream).
    pub fn mode(&self) -> &'static str {
        match self.inner {
            Inner::Quic { .. } => "datagrams",
            Inner::Framed(_) => "framed",
        }
    }

    /// Sends one packet (at most 65,535 bytes; over QUIC, what the path
    /// takes, else it is lost as on UDP).
    pub async fn send(&mut self, packet: &[u8]) -> io::Result<()> {
        match &mut self.inner {
            Inner::Quic { conn, id, closed, .. } => {
                if closed.is_cancelled() {
                    return Err(io::Error::new(io::ErrorKind::BrokenPipe, "the datagram channel is closed"));
                }
                send_datagram(conn, id, packet)
            }
            Inner::Framed(stream) => write_packet(stream, packet).await,
        }
    }

    /// The next packet; `None` once the channel is closed.
    pub async fn recv(&mut self) -> io::Result<Option<Bytes>> {
        match &mut self.inner {
            Inner::Quic { registration, closed, .. } => Ok(tokio::select! {
                biased;
                packet = registration.rx.recv() => packet,
                _ = closed.cancelled() => None,
            }),
            Inner::Framed(stream) => read_packet(stream).await,
        }
    }

    /// Ends the channel: the lifeline's FIN (QUIC) or the stream's.
    pub async fn close(mut self) -> io::Result<()> {
        match &mut self.inner {
            Inner::Quic { lifeline, closed, .. } => {
                closed.cancel();
                tokio::io::AsyncWriteExt::shutdown(lifeline).await
            }
            Inner::Framed(stream) => tokio::io::AsyncWriteExt::shutdown(stream).await,
        }
    }
}

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

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use strait_proto::packet::{self, read_packet, write_packet};
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
        self.lock().insert(id, tx);
        Registration { channels: self.clone(), id, rx }
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
pub(crate) fn pipe(
    conn: quinn::Connection,
    id: [u8; 12],
    mut registration: Registration,
    closed: CancellationToken,
) -> (Stream, impl Future<Output = bool>) {
    let (ours, theirs) = tokio::io::duplex(PIPE);
    let pump = async move {
        let (mut read, mut write) = tokio::io::split(ours);
        let from_tunnel = async {
            while let Ok(Some(packet)) = read_packet(&mut read).await {
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

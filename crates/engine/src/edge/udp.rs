//! Published UDP tunnels: a public port of their own; each public source
//! address is a session with a datagram channel of its own to the agent
//! (QUIC datagrams when the agent is on QUIC, else packets framed in a
//! stream), so every answer goes back to the source that asked.
//!
//! Memory is bounded at every step: one receive buffer per port, a queue
//! of [`datagram::QUEUE`] packets per session (a source that outruns its
//! agent leg loses the excess, counted), and at most
//! `udp.max_sessions_per_tunnel` sessions (the longest idle is evicted,
//! counted). A session ends after `udp.session_idle_seconds` without a
//! packet either way.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::Shared;
use crate::datagram::{self, Leg, Until};
use crate::registry::Tunnel;
use crate::streams;

/// The largest UDP payload over IPv4; the receive buffer holds one.
const MAX_UDP_PAYLOAD: usize = 65_507;

struct Session {
    tx: mpsc::Sender<Bytes>,
    /// The last packet from the source.
    last: Instant,
    stop: CancellationToken,
    /// Tells a session that ended from the one that replaced it.
    generation: u64,
    /// The session counts as open while it is in the table.
    _open: crate::metrics::GaugeGuard,
}

/// Receives on `socket` until the tunnel closes or the engine shuts down.
pub async fn run(shared: Arc<Shared>, tunnel: Arc<Tunnel>, socket: UdpSocket) {
    let socket = Arc::new(socket);
    let limits = &shared.config.udp;
    let idle = Duration::from_secs(limits.session_idle_seconds);
    let mut sessions: HashMap<SocketAddr, Session> = HashMap::new();
    // Each session says once that it ended: at most one message per session.
    let (ended_tx, mut ended_rx) = mpsc::unbounded_channel::<(SocketAddr, u64)>();
    let mut buf = vec![0u8; MAX_UDP_PAYLOAD + 1];
    let mut generation = 0u64;
    loop {
        let (len, peer) = tokio::select! {
            _ = tunnel.closed.cancelled() => break,
            _ = shared.shutdown.cancelled() => break,
            Some((peer, ended)) = ended_rx.recv() => {
                if sessions.get(&peer).is_some_and(|s| s.generation == ended) {
                    sessions.remove(&peer);
                }
                continue;
            }
            received = socket.recv_from(&mut buf) => match received {
                Ok(received) => received,
                // An ICMP error for an earlier answer: the port is fine.
                Err(_) => continue,
            },
        };
        if len > limits.max_packet_bytes {
            shared.metrics.udp_packet_dropped("oversized");
            continue;
        }
        if !tunnel.spec.allows(peer.ip()) {
            shared.metrics.udp_packet_dropped("untrusted");
            continue;
        }
        let now = Instant::now();
        if !sessions.contains_key(&peer) {
            if sessions.len() >= limits.max_sessions_per_tunnel {
                evict_longest_idle(&shared, &mut sessions);
            }
            generation += 1;
            let (tx, rx) = mpsc::channel(datagram::QUEUE);
            let stop = tunnel.closed.child_token();
            let leg = Leg::Udp { rx, socket: socket.clone(), peer };
            let ended = ended_tx.clone();
            let task = session(shared.clone(), tunnel.clone(), leg, Until { idle: Some(idle), stop: stop.clone() });
            let this = generation;
            shared.tasks.spawn(async move {
                task.await;
                let _ = ended.send((peer, this));
            });
            let open = shared.metrics.published_connection("udp");
            sessions.insert(peer, Session { tx, last: now, stop, generation, _open: open });
        }
        let session = sessions.get_mut(&peer).expect("just made");
        session.last = now;
        if session.tx.try_send(Bytes::copy_from_slice(&buf[..len])).is_err() {
            shared.metrics.udp_packet_dropped("queue_full");
        }
    }
    for session in sessions.values() {
        session.stop.cancel();
    }
    tracing::debug!(tunnel_id = %tunnel.id, "udp port closed");
}

fn evict_longest_idle(shared: &Shared, sessions: &mut HashMap<SocketAddr, Session>) {
    let Some(oldest) = sessions.iter().min_by_key(|(_, s)| s.last).map(|(peer, _)| *peer) else { return };
    if let Some(session) = sessions.remove(&oldest) {
        session.stop.cancel();
        shared.metrics.udp_session_evicted();
    }
}

/// One source's session: a datagram channel to the agent, bridged with the
/// source until it goes idle, is evicted or its tunnel closes.
async fn session(shared: Arc<Shared>, tunnel: Arc<Tunnel>, public: Leg, until: Until) {
    let Leg::Udp { peer, .. } = &public else { unreachable!("a udp session's public leg") };
    let peer = *peer;
    let started = Instant::now();
    let opened = tokio::select! {
        opened = streams::open_datagrams_to_agent(&shared, &tunnel, peer.ip()) => opened,
        _ = until.stop.cancelled() => return,
    };
    let (stream_id, agent) = match opened {
        Ok(opened) => opened,
        Err(failure) => {
            tracing::warn!(tunnel_id = %tunnel.id, %peer, reason = %failure, "udp session refused");
            return;
        }
    };
    let agent_on_quic = matches!(agent, Leg::Quic { .. });
    let carried = datagram::bridge(&shared, public, agent, until).await;
    if agent_on_quic {
        datagram::close_agent_channel(&shared, &tunnel.client_id, &stream_id);
    }
    shared.metrics.udp_packets(carried.to_agent, carried.from_agent);
    tracing::debug!(
        tunnel_id = %tunnel.id, %peer, %stream_id, inbound = carried.to_agent, outbound = carried.from_agent,
        seconds = started.elapsed().as_secs_f64(), "udp session ended"
    );
}

//! `strait connect` and `strait dial`: private dials to a tunnel, from a
//! local port (one dial per accepted connection) or from stdin/stdout.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use strait_agent::{AgentError, Client};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::retry;
use crate::shutdown::Interrupted;

/// Whether a failed dial ends `strait connect`: a refused token or an
/// untrusted certificate will refuse every later dial too, while a tunnel
/// that is not found may come up.
fn ends_connect(error: &AgentError, dialled_before: bool) -> bool {
    // An engine that answered a refusal was reached by this very dial.
    error.is_permanent(dialled_before || error.engine_code().is_some())
}

/// Listens on `listen` until the shutdown signal, dialling `tunnel` for
/// each connection; stops on a dial error that no retry can fix.
pub async fn connect(client: Client, tunnel: &str, listen: &str, shutdown: &CancellationToken) -> anyhow::Result<()> {
    let listener =
        tokio::net::TcpListener::bind(listen).await.map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
    println!("Listening on {} -> rstrm://{tunnel}", listener.local_addr()?);
    let dialled = Arc::new(AtomicBool::new(false));
    let (fatal_tx, mut fatal_rx) = mpsc::channel::<anyhow::Error>(1);
    loop {
        let (mut local, peer) = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            Some(error) = fatal_rx.recv() => return Err(error),
            accepted = listener.accept() => accepted?,
        };
        let _ = local.set_nodelay(true);
        let (client, tunnel, dialled, fatal) = (client.clone(), tunnel.to_string(), dialled.clone(), fatal_tx.clone());
        tokio::spawn(async move {
            match client.dial(&tunnel).await {
                Ok(mut stream) => {
                    dialled.store(true, Ordering::Relaxed);
                    let _ = strait_proto::splice::splice(&mut local, &mut stream).await;
                }
                Err(error) if ends_connect(&error, dialled.load(Ordering::Relaxed)) => {
                    let _ = fatal.try_send(retry::explain(&error).context(format!("cannot dial {tunnel}")));
                }
                Err(error) => eprintln!("strait: {peer}: cannot dial {tunnel}: {error}"),
            }
        });
    }
}

/// A UDP source that sent nothing and got nothing for this long is
/// forgotten, as a NAT forgets a binding.
const UDP_SESSION_IDLE: std::time::Duration = std::time::Duration::from_secs(60);

/// Listens for UDP on `listen` until the shutdown signal: each source
/// address gets its own datagram channel to `tunnel` (QUIC datagrams, or
/// framed packets where the engine or the tunnel calls for them).
pub async fn connect_udp(
    client: Client,
    tunnel: &str,
    listen: &str,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let socket = Arc::new(
        tokio::net::UdpSocket::bind(listen).await.map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?,
    );
    println!("Listening on udp://{} -> rstrm://{tunnel}", socket.local_addr()?);
    let mut sessions: std::collections::HashMap<std::net::SocketAddr, mpsc::Sender<Vec<u8>>> = Default::default();
    let (ended_tx, mut ended_rx) = mpsc::unbounded_channel();
    let (fatal_tx, mut fatal_rx) = mpsc::channel::<anyhow::Error>(1);
    let dialled = Arc::new(AtomicBool::new(false));
    let mut buf = vec![0u8; strait_proto::packet::MAX_PACKET];
    loop {
        let (n, peer) = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            Some(error) = fatal_rx.recv() => return Err(error),
            Some(peer) = ended_rx.recv() => {
                sessions.remove(&peer);
                continue;
            }
            received = socket.recv_from(&mut buf) => match received {
                Ok(received) => received,
                // An ICMP error for an earlier answer: not this socket's end.
                Err(_) => continue,
            },
        };
        let packet = buf[..n].to_vec();
        if let Some(session) = sessions.get(&peer)
            && session.try_send(packet.clone()).is_ok()
        {
            continue;
        }
        let (tx, rx) = mpsc::channel(64);
        let _ = tx.try_send(packet);
        sessions.insert(peer, tx);
        let (client, tunnel, socket) = (client.clone(), tunnel.to_string(), socket.clone());
        let (ended, fatal, dialled) = (ended_tx.clone(), fatal_tx.clone(), dialled.clone());
        tokio::spawn(async move {
            match client.dial_packets(&tunnel).await {
                Ok(conn) => {
                    dialled.store(true, Ordering::Relaxed);
                    udp_session(conn, rx, &socket, peer).await;
                }
                Err(error) if ends_connect(&error, dialled.load(Ordering::Relaxed)) => {
                    let _ = fatal.try_send(retry::explain(&error).context(format!("cannot dial {tunnel}")));
                }
                Err(error) => eprintln!("strait: {peer}: cannot dial {tunnel}: {error}"),
            }
            let _ = ended.send(peer);
        });
    }
}

/// One UDP source's packets to its channel and the answers back, until
/// either side ends or the source falls quiet.
async fn udp_session(
    mut conn: strait_agent::PacketConn,
    mut from_source: mpsc::Receiver<Vec<u8>>,
    socket: &tokio::net::UdpSocket,
    peer: std::net::SocketAddr,
) {
    loop {
        tokio::select! {
            packet = from_source.recv() => match packet {
                Some(packet) => if conn.send(&packet).await.is_err() { break },
                None => break,
            },
            answer = conn.recv() => match answer {
                Ok(Some(answer)) => { let _ = socket.send_to(&answer, peer).await; }
                _ => break,
            },
            _ = tokio::time::sleep(UDP_SESSION_IDLE) => break,
        }
    }
    let _ = conn.close().await;
}

/// Dials `tunnel` and copies stdin to it and it to stdout.
pub async fn dial(client: Client, tunnel: &str, shutdown: &CancellationToken) -> anyhow::Result<()> {
    let stream = match shutdown.run_until_cancelled(client.dial(tunnel)).await {
        None => return Err(Interrupted.into()),
        Some(dialled) => dialled.map_err(|error| retry::explain(&error))?,
    };
    let (mut from_tunnel, mut to_tunnel) = tokio::io::split(stream);
    // stdin's end half-closes towards the service; the service's end ends
    // the command, as ssh expects of a ProxyCommand.
    let upload = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut tokio::io::stdin(), &mut to_tunnel).await;
        let _ = to_tunnel.shutdown().await;
    });
    let mut stdout = tokio::io::stdout();
    let copied = shutdown.run_until_cancelled(tokio::io::copy(&mut from_tunnel, &mut stdout)).await;
    let _ = stdout.flush().await;
    upload.abort();
    match copied {
        None => Err(Interrupted.into()),
        Some(copied) => {
            copied?;
            Ok(())
        }
    }
}

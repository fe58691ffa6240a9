//! Public ports for published TCP and UDP tunnels (`tcp.*`, `udp.*`).
//!
//! A tunnel asks for a port in the range or takes a free one at random;
//! either way the port must be free twice over: no live tunnel serves it
//! and no hold keeps it for another principal (the registry's word), and
//! the operating system lets the engine bind it. The socket is bound before
//! the tunnel is registered and lives exactly as long as the tunnel.

use std::net::{IpAddr, SocketAddr};

use rand::RngExt;
use strait_proto::{Error, ErrorCode};
use tokio::net::{TcpListener, TcpSocket, UdpSocket};

use crate::config::PortsConfig;
use crate::registry::Registry;
use crate::tunnel::Kind;

/// A bound public socket.
pub enum Bound {
    Tcp(TcpListener),
    Udp(UdpSocket),
}

/// TCP connections a public port queues before the engine accepts them.
const BACKLOG: u32 = 1024;

/// The IP public ports listen on: `listen_ip`, else the TLS listener's.
pub fn listen_ip(ports: &PortsConfig, tls_listen: SocketAddr) -> IpAddr {
    ports.listen_ip.unwrap_or(tls_listen.ip())
}

/// Binds `requested`, or a free port of the range, for a `kind` tunnel.
/// Whether a requested port is another principal's (live or held) is the
/// registry's to say when the tunnel is added; a live one is already bound.
pub fn bind(
    kind: Kind,
    ports: &PortsConfig,
    ip: IpAddr,
    requested: Option<u16>,
    registry: &Registry,
) -> Result<(u16, Bound), Error> {
    let section = kind.name();
    if let Some(port) = requested {
        if !ports.contains(port) {
            let message = format!("port {port} is outside this engine's {section}.port_range {}", ports.range());
            return Err(Error::new(ErrorCode::InvalidRequest, message));
        }
        return match bind_one(kind, SocketAddr::new(ip, port)) {
            Ok(bound) => Ok((port, bound)),
            Err(error) if error.kind() == std::io::ErrorKind::AddrInUse => Err(Error::new(
                ErrorCode::InvalidRequest,
                format!("{section} port {port} is in use on this engine; ask for another port or none"),
            )),
            Err(error) => Err(Error::new(
                ErrorCode::ServiceUnavailable,
                format!("{section} port {port} cannot be opened: {error}"),
            )),
        };
    }
    let taken = registry.ports_taken(kind);
    let (first, last) = (ports.first_port as u32, ports.last_port as u32);
    let span = last - first + 1;
    // Every port of the range once, from a random start: a free one is
    // found if there is one, and allocations spread over the range.
    let start = rand::rng().random_range(0..span);
    for step in 0..span {
        let port = (first + (start + step) % span) as u16;
        if taken.contains(&port) {
            continue;
        }
        if let Ok(bound) = bind_one(kind, SocketAddr::new(ip, port)) {
            return Ok((port, bound));
        }
    }
    Err(Error::new(
        ErrorCode::CapacityExhausted,
        format!("no free port left in this engine's {section}.port_range {}", ports.range()),
    ))
}

fn bind_one(kind: Kind, addr: SocketAddr) -> std::io::Result<Bound> {
    match kind {
        // Large kernel buffers: a burst of media packets, or of new
        // sources, waits there rather than being dropped.
        Kind::Udp => Ok(Bound::Udp(UdpSocket::from_std(super::udp_socket(addr)?)?)),
        _ => {
            let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
            // A port its tunnel just let go of (connections in TIME_WAIT)
            // can be bound again at once: a reconnecting agent gets it back.
            socket.set_reuseaddr(true)?;
            socket.bind(addr)?;
            Ok(Bound::Tcp(socket.listen(BACKLOG)?))
        }
    }
}

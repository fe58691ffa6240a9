//! Listening, apart from serving: the sockets the engine accepts on and
//! what carries an agent-protocol channel to the handlers.
//!
//! - [`accept`]: the accept loop every TCP listener shares, with its
//!   connection cap;
//! - [`tls`]: the TLS port. Reads the ClientHello and routes on SNI and ALPN
//!   to the agent protocol, the Engine API or a published tunnel;
//! - [`ports`]: the public ports of published TCP and UDP tunnels;
//! - [`quic`]: the QUIC port (the UDP side of the TLS address). Every
//!   bidirectional stream an agent opens carries what one TLS connection
//!   would.
//!
//! The protocol handlers ([`crate::channel`], [`crate::control`],
//! [`crate::streams`]) take a [`BoxIo`] and a [`Transport`], so a TLS
//! connection and a QUIC stream are served by the same code.

pub mod accept;
pub mod ports;
pub mod quic;
pub mod tls;

pub use strait_proto::{BoxIo, Io};

/// What carries an agent's channels.
#[derive(Clone, Debug)]
pub enum Transport {
    /// One TLS connection per channel.
    Tls,
    /// One bidirectional stream per channel on this QUIC connection, which
    /// also carries the datagram channels.
    Quic(quinn::Connection),
}

impl Transport {
    /// The name in metrics, logs and the Engine API.
    pub fn name(&self) -> &'static str {
        match self {
            Transport::Tls => "tls",
            Transport::Quic(_) => "quic",
        }
    }
}

/// The kernel buffers asked for the engine's UDP sockets (the QUIC port,
/// published UDP ports), capped by `net.core.rmem_max` / `wmem_max`.
const UDP_BUFFER_BYTES: usize = 4 << 20;

/// A bound UDP socket with [`UDP_BUFFER_BYTES`] asked for each way (best
/// effort: a smaller buffer still works), non-blocking.
pub fn udp_socket(addr: std::net::SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    let socket = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::DGRAM, None)?;
    let _ = socket.set_recv_buffer_size(UDP_BUFFER_BYTES);
    let _ = socket.set_send_buffer_size(UDP_BUFFER_BYTES);
    socket.bind(&addr.into())?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

//! strait-agent: the agent side of the rstream wire protocol.
//!
//! - [`Client`]: how to reach an engine (address, token, TLS trust);
//! - [`ControlChannel`]: one open control channel; opens and closes tunnels,
//!   answers `ProxyConnReq`s by dialling back, keeps liveness;
//! - [`Tunnel`]: a tunnel's incoming streams, or [`Tunnel::forward`] to a
//!   local address;
//! - [`Client::dial`]: a private dial to a tunnel by id or name.
//!
//! Used by the `strait` CLI, by `strait-engine dev` and by the engine's
//! end-to-end tests.

#![forbid(unsafe_code)]

mod client;
mod control;
mod datagram;
mod tls;
mod transport;
mod tunnel;

pub use client::{Client, ClientConfig, Stream};
pub use control::ControlChannel;
pub use datagram::PacketConn;
pub use strait_proto::TunnelProperties;
pub use tls::client_config as tls_client_config;
pub use transport::{AUTO_TLS_DELAY, Carrier, TransportMode, close_quic};
pub use tunnel::{
    Carried, Incoming, PACKET_SESSION_IDLE, Tunnel, forward_one, forward_packets, forward_stream, on_own_port,
    pin_address,
};

/// Re-exported so binaries install the same crypto provider.
pub use rustls;

/// Errors an agent meets, with what went wrong on which side.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("engine address {0:?} is not host:port")]
    BadEngineAddress(String),
    #[error("cannot read CA file {path}: {reason}")]
    CaFile { path: std::path::PathBuf, reason: String },
    #[error("cannot resolve the engine's name {host}: {source}")]
    Resolve { host: String, source: std::io::Error },
    #[error("cannot connect to the engine at {addr}: {source}")]
    Connect { addr: String, source: std::io::Error },
    #[error("TLS with the engine at {addr} failed: {source}")]
    Tls { addr: String, source: rustls::Error },
    #[error("QUIC with the engine at {addr} failed: {reason}")]
    QuicTls { addr: String, reason: String },
    #[error("timed out {0}")]
    Timeout(&'static str),
    #[error("the engine refused: {0}")]
    Engine(strait_proto::Error),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("the control channel is closed: {0}")]
    Closed(String),
    #[error(transparent)]
    Frame(#[from] strait_proto::FrameError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl AgentError {
    /// The engine's error code, when the engine refused.
    pub fn engine_code(&self) -> Option<strait_proto::ErrorCode> {
        match self {
            AgentError::Engine(e) => Some(e.code()),
            _ => None,
        }
    }

    /// When the engine refused a tunnel because this principal's own
    /// tunnel of that name or hostname is still open, how long that
    /// tunnel's control channel has been silent (strait engines say, "last
    /// heard from N s ago"). Most often it is this agent's previous
    /// connection, which a killed process or a lost network never closed
    /// (over QUIC nothing tells the engine; it lets go when the channel's
    /// liveness runs out): that heals by itself, while a channel heard from
    /// again is another agent really holding it. `None` for any other
    /// error, and from engines that do not say.
    pub fn holder_silence(&self) -> Option<std::time::Duration> {
        let AgentError::Engine(refusal) = self else { return None };
        let message = refusal.message.as_deref().unwrap_or_default();
        let ours = message.contains("is already open for this principal")
            || message.contains("is already served by this principal's tunnel");
        if refusal.code() != strait_proto::ErrorCode::InvalidRequest || !ours {
            return None;
        }
        let seconds = message.split("last heard from ").nth(1)?.split('s').next()?.parse::<f64>().ok()?;
        std::time::Duration::try_from_secs_f64(seconds).ok()
    }

    /// Whether trying again cannot help until the user changes something
    /// (the token, the CA, the address), as opposed to what may heal by
    /// itself: the engine restarting, the network dropping, a timeout.
    ///
    /// `reached_before`: the engine was reached earlier with the same
    /// settings. Then a name that stops resolving, an expired certificate
    /// (the operator renews it, the engine reloads it) or a refusal of a
    /// tunnel (its hostname still held by the old connection) may be a
    /// passing state; on a first attempt each is a mistake to report.
    pub fn is_permanent(&self, reached_before: bool) -> bool {
        use rustls::CertificateError as Cert;
        use strait_proto::ErrorCode as Code;
        match self {
            AgentError::BadEngineAddress(_) | AgentError::CaFile { .. } => true,
            AgentError::Tls { source: rustls::Error::InvalidCertificate(error), .. } => match error {
                Cert::Expired | Cert::ExpiredContext { .. } | Cert::NotValidYet | Cert::NotValidYetContext { .. } => {
                    !reached_before
                }
                _ => true,
            },
            AgentError::Engine(error) => match error.code() {
                Code::Unauthorized
                | Code::ProtocolVersionMissing
                | Code::ProtocolVersionInvalid
                | Code::ProtocolVersionIncompatible => true,
                Code::ServiceUnavailable | Code::CapacityExhausted | Code::Internal => false,
                _ => !reached_before,
            },
            AgentError::Resolve { .. }
            | AgentError::Tls { .. }
            | AgentError::QuicTls { .. }
            | AgentError::Protocol(_) => !reached_before,
            AgentError::Connect { .. }
            | AgentError::Timeout(_)
            | AgentError::Closed(_)
            | AgentError::Frame(_)
            | AgentError::Io(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use strait_proto::ErrorCode;

    fn refused(code: ErrorCode, message: &str) -> AgentError {
        AgentError::Engine(strait_proto::Error::new(code, message))
    }

    #[test]
    fn the_holders_silence_is_read_from_our_own_refusals_only() {
        let name = "a tunnel named \"db\" is already open for this principal \
                    (its control channel was last heard from 12.5s ago)";
        assert_eq!(refused(ErrorCode::InvalidRequest, name).holder_silence(), Some(Duration::from_millis(12_500)));
        let hostname = "hostname web.t.example is already served by this principal's tunnel abc; close it first, \
                        or wait until its control channel times out (its control channel was last heard from 0.0s ago)";
        assert_eq!(refused(ErrorCode::InvalidRequest, hostname).holder_silence(), Some(Duration::ZERO));
        // An engine that does not say, another code, another refusal.
        let silent = "a tunnel named \"db\" is already open for this principal";
        assert_eq!(refused(ErrorCode::InvalidRequest, silent).holder_silence(), None);
        assert_eq!(refused(ErrorCode::CapacityExhausted, name).holder_silence(), None);
        let other = "hostname web.t.example is already served by another principal's tunnel (last heard from 1s ago)";
        assert_eq!(refused(ErrorCode::InvalidRequest, other).holder_silence(), None);
        assert_eq!(AgentError::Timeout("opening a tunnel").holder_silence(), None);
    }
}

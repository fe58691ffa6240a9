//! What carries an agent's channels: a TLS connection each, or one QUIC
//! connection with a bidirectional stream each.
//!
//! `auto` (the default, as in the rstream Go SDK) starts QUIC first and TLS
//! [`AUTO_TLS_DELAY`] later, and keeps whichever carries the first channel
//! first, so an engine without QUIC (or a network that drops UDP) costs a
//! moment, not a failure. A control channel's streams go on the carrier
//! its control channel won; a reconnect races again, so QUIC comes back
//! once it works again.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::QuicClientConfig;
use strait_proto::BoxIo;

use crate::AgentError;
use crate::client::Client;

/// How long `auto` gives QUIC before starting TLS beside it.
pub const AUTO_TLS_DELAY: Duration = Duration::from_millis(300);

/// How long `auto` still waits for QUIC once TLS has failed.
const AUTO_QUIC_GRACE: Duration = Duration::from_secs(2);

/// How often an idle QUIC connection proves it is alive; well inside the
/// engine's idle timeout (15 s by default) and NAT bindings (often 30 s).
const QUIC_KEEP_ALIVE: Duration = Duration::from_secs(10);

/// The QUIC sides of this process's clients, for [`close_quic`]; weak, so
/// a dropped client's endpoint goes with it.
static SIDES: std::sync::Mutex<Vec<std::sync::Weak<QuicSide>>> = std::sync::Mutex::new(Vec::new());

/// Closes every QUIC connection of the process and waits (up to `within`)
/// until the engine has been told. A process that exits without this
/// leaves the engine waiting for its idle timeout, streams in flight
/// included, where a TCP connection would have been closed by the kernel.
pub async fn close_quic(within: Duration) {
    let sides = std::mem::take(&mut *SIDES.lock().unwrap_or_else(|e| e.into_inner()));
    let endpoints: Vec<quinn::Endpoint> =
        sides.iter().filter_map(|side| side.upgrade()?.endpoint.get().cloned()).collect();
    for endpoint in &endpoints {
        endpoint.close(0u32.into(), b"agent stopped");
    }
    let idle = async {
        for endpoint in &endpoints {
            endpoint.wait_idle().await;
        }
    };
    let _ = tokio::time::timeout(within, idle).await;
}

/// The transport an agent asks for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TransportMode {
    /// QUIC first, TLS 300 ms later; the first to connect wins.
    #[default]
    Auto,
    Tls,
    Quic,
}

impl TransportMode {
    pub fn as_str(self) -> &'static str {
        match self {
            TransportMode::Auto => "auto",
            TransportMode::Tls => "tls",
            TransportMode::Quic => "quic",
        }
    }
}

impl std::fmt::Display for TransportMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TransportMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" | "" => Ok(TransportMode::Auto),
            "tls" => Ok(TransportMode::Tls),
            "quic" => Ok(TransportMode::Quic),
            other => Err(format!("transport {other:?} is not one of auto, tls, quic")),
        }
    }
}

/// What carries a control channel and the streams that answer it.
#[derive(Clone, Debug)]
pub enum Carrier {
    /// A new TLS connection per channel.
    Tls,
    /// A new bidirectional stream per channel on this connection.
    Quic(quinn::Connection),
}

impl Carrier {
    /// `tls` or `quic`.
    pub fn name(&self) -> &'static str {
        match self {
            Carrier::Tls => "tls",
            Carrier::Quic(_) => "quic",
        }
    }
}

/// The client's QUIC side: its endpoint (one UDP socket) and the
/// connection its channels share, made on first use.
#[derive(Default)]
pub(crate) struct QuicSide {
    endpoint: tokio::sync::OnceCell<quinn::Endpoint>,
    connection: tokio::sync::Mutex<Option<quinn::Connection>>,
    /// The datagram channels on it (on each connection made, in turn).
    pub(crate) channels: Arc<crate::datagram::Channels>,
    /// Cancelled when the client is gone: its datagram reader lets go of
    /// the connection, which then closes once its last stream is done
    /// (the engine keeps connections alive, so none would ever idle out).
    pub(crate) gone: tokio_util::sync::CancellationToken,
}

impl Drop for QuicSide {
    fn drop(&mut self) {
        self.gone.cancel();
    }
}

impl Client {
    /// Opens the first channel of a control channel or a dial, on the
    /// transport the configuration asks for; returns it with its carrier.
    pub(crate) async fn open_first(&self) -> Result<(BoxIo, Carrier), AgentError> {
        match self.config.transport {
            TransportMode::Tls => Ok((Box::new(self.connect_tls().await?), Carrier::Tls)),
            TransportMode::Quic => self.open_quic().await,
            TransportMode::Auto => self.race().await,
        }
    }

    /// Opens another channel on `carrier`.
    pub(crate) async fn open_on(&self, carrier: &Carrier) -> Result<BoxIo, AgentError> {
        match carrier {
            Carrier::Tls => Ok(Box::new(self.connect_tls().await?)),
            Carrier::Quic(conn) => match open_bi(conn).await {
                Ok(io) => Ok(io),
                // The connection died under us: a fresh one, if QUIC still
                // works, else the error.
                Err(_) => Ok(self.open_quic().await?.0),
            },
        }
    }

    async fn race(&self) -> Result<(BoxIo, Carrier), AgentError> {
        let quic = self.open_quic();
        tokio::pin!(quic);
        let delay = tokio::time::sleep(AUTO_TLS_DELAY);
        tokio::pin!(delay);
        let mut quic_error = None;
        // QUIC alone until the delay is up or QUIC has failed.
        tokio::select! {
            result = &mut quic => match result {
                Ok(won) => return Ok(won),
                Err(error) => quic_error = Some(error),
            },
            _ = &mut delay => {}
        }
        let tls = self.connect_tls();
        tokio::pin!(tls);
        if quic_error.is_some() {
            return match tls.await {
                Ok(tls) => Ok((Box::new(tls), Carrier::Tls)),
                Err(error) => Err(error),
            };
        }
        tokio::select! {
            result = &mut quic => match result {
                Ok(won) => Ok(won),
                Err(error) => {
                    tracing::debug!(%error, "QUIC failed; waiting for TLS");
                    tls.await.map(|tls| (Box::new(tls) as BoxIo, Carrier::Tls))
                }
            },
            result = &mut tls => match result {
                Ok(tls) => Ok((Box::new(tls), Carrier::Tls)),
                // An engine that refuses TCP is most likely down: QUIC gets
                // a moment more (a network may pass only UDP), not its
                // whole connect timeout, and the error is TLS's.
                Err(error) => match tokio::time::timeout(AUTO_QUIC_GRACE, quic).await {
                    Ok(Ok(won)) => Ok(won),
                    _ => Err(error),
                },
            },
        }
    }

    /// A stream on the client's QUIC connection, connecting first when
    /// there is none or it is gone.
    async fn open_quic(&self) -> Result<(BoxIo, Carrier), AgentError> {
        let connect = async {
            let mut slot = self.quic.connection.lock().await;
            if let Some(conn) = slot.as_ref().filter(|c| c.close_reason().is_none()) {
                let conn = conn.clone();
                drop(slot);
                if let Ok(io) = open_bi(&conn).await {
                    return Ok((io, Carrier::Quic(conn)));
                }
                slot = self.quic.connection.lock().await;
            }
            let conn = self.connect_quic().await?;
            self.quic.channels.spawn_reader(conn.clone(), self.quic.gone.clone());
            *slot = Some(conn.clone());
            drop(slot);
            let io = open_bi(&conn).await?;
            Ok((io, Carrier::Quic(conn)))
        };
        match tokio::time::timeout(self.config.connect_timeout, connect).await {
            Ok(result) => result,
            Err(_) => Err(AgentError::Timeout("connecting to the engine over QUIC")),
        }
    }

    async fn connect_quic(&self) -> Result<quinn::Connection, AgentError> {
        let addr = format!("{}:{}", self.host, self.port);
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((self.host.as_str(), self.port))
            .await
            .map_err(|source| AgentError::Resolve { host: self.host.clone(), source })?
            .collect();
        let local = self.config.local_addr;
        let target =
            addrs.iter().find(|a| local.is_none_or(|l| l.is_ipv4() == a.is_ipv4())).copied().ok_or_else(|| {
                AgentError::Resolve {
                    host: self.host.clone(),
                    source: std::io::Error::new(std::io::ErrorKind::NotFound, "no address for this name"),
                }
            })?;
        let endpoint = self
            .quic
            .endpoint
            .get_or_try_init(|| async {
                let bind = local.unwrap_or(if target.is_ipv4() {
                    IpAddr::V4(Ipv4Addr::UNSPECIFIED)
                } else {
                    IpAddr::V6(Ipv6Addr::UNSPECIFIED)
                });
                let mut endpoint = quinn::Endpoint::client(SocketAddr::new(bind, 0))
                    .map_err(|source| AgentError::Connect { addr: addr.clone(), source })?;
                endpoint.set_default_client_config(quic_client_config(self)?);
                let mut sides = SIDES.lock().unwrap_or_else(|e| e.into_inner());
                sides.retain(|side| side.strong_count() > 0);
                sides.push(Arc::downgrade(&self.quic));
                Ok::<_, AgentError>(endpoint)
            })
            .await?;
        let connecting = endpoint
            .connect(target, self.server_name.to_str().as_ref())
            .map_err(|e| AgentError::Connect { addr: addr.clone(), source: std::io::Error::other(e.to_string()) })?;
        connecting.await.map_err(|error| match error {
            quinn::ConnectionError::TransportError(ref t) if t.code.to_string().contains("crypto") => {
                AgentError::QuicTls { addr: addr.clone(), reason: error.to_string() }
            }
            other => AgentError::Connect { addr: addr.clone(), source: std::io::Error::other(other.to_string()) },
        })
    }
}

pub(crate) async fn open_bi(conn: &quinn::Connection) -> Result<BoxIo, AgentError> {
    let (send, recv) = conn.open_bi().await.map_err(|e| AgentError::Closed(format!("QUIC connection: {e}")))?;
    Ok(Box::new(strait_proto::quic::QuicStream::new(send, recv)))
}

fn quic_client_config(client: &Client) -> Result<quinn::ClientConfig, AgentError> {
    let tls = crate::tls::quic_client_config(client.config.ca_file.as_deref())?;
    let crypto = QuicClientConfig::try_from(tls).map_err(|e| AgentError::Protocol(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport
        .keep_alive_interval(Some(QUIC_KEEP_ALIVE))
        .max_idle_timeout(Some(Duration::from_secs(30).try_into().expect("30 s fits a VarInt")))
        .max_concurrent_uni_streams(0u32.into());
    config.transport_config(Arc::new(transport));
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::TransportMode;

    #[test]
    fn modes() {
        assert_eq!("auto".parse::<TransportMode>().unwrap(), TransportMode::Auto);
        assert_eq!("QUIC".parse::<TransportMode>().unwrap(), TransportMode::Quic);
        assert_eq!(" tls ".parse::<TransportMode>().unwrap(), TransportMode::Tls);
        assert!("udp".parse::<TransportMode>().unwrap_err().contains("auto, tls, quic"));
    }
}

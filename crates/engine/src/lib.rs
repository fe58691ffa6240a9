//! strait-engine: a self-hosted tunnel engine that speaks the rstream agent
//! protocol.
//!
//! A tour of the parts, in the order a byte meets them:
//!
//! - [`listener`]: the TLS port. Accepts, reads the ClientHello and routes
//!   on SNI and ALPN to the agent protocol, the Engine API or a published
//!   tunnel;
//! - [`control`]: an agent's control channel: tunnels open and close,
//!   heartbeats, and the outbox that carries `ProxyConnReq`s to the agent;
//! - [`streams`]: pairing an inbound connection with the agent's reverse
//!   dial, and private dials;
//! - [`edge`]: published tunnels (`<label>.t.<engine.host>`);
//! - [`api`]: the Engine API under `/api`;
//! - [`registry`]: clients, tunnels and the names that reach them, with a
//!   change feed;
//! - [`tunnel`]: what a tunnel may ask for and the properties it gets;
//! - [`auth`], [`certs`], [`config`], [`metrics`]: the supporting cast;
//! - `strait_proto::splice`: the one copy loop, shared with the agent.

#![forbid(unsafe_code)]

pub mod api;
pub mod auth;
pub mod certs;
pub mod config;
pub mod control;
pub mod dev;
pub mod edge;
pub mod ids;
pub mod listener;
pub mod metrics;
pub mod registry;

pub mod streams;
pub mod tunnel;

use std::net::SocketAddr;
use std::sync::Arc;

use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::certs::CertStore;
use crate::config::Config;

/// The crypto provider, chosen once for the whole process.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Installs the process-wide default provider (for libraries that ask for
/// it). Safe to call more than once.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The TLS server configurations, one per route, all serving the same
/// certificate store.
pub struct TlsConfigs {
    pub agent: Arc<ServerConfig>,
    pub api: Arc<ServerConfig>,
}

impl TlsConfigs {
    fn new(certs: Arc<CertStore>, provider: Arc<CryptoProvider>) -> Result<Self, rustls::Error> {
        let build = |alpns: &[&[u8]]| -> Result<Arc<ServerConfig>, rustls::Error> {
            let mut config = ServerConfig::builder_with_provider(provider.clone())
                .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
                .with_no_client_auth()
                .with_cert_resolver(certs.clone());
            config.alpn_protocols = alpns.iter().map(|a| a.to_vec()).collect();
            Ok(Arc::new(config))
        };
        Ok(Self { agent: build(&[strait_proto::ALPN])?, api: build(&[b"h2", b"http/1.1"])? })
    }
}

/// Everything the engine's tasks share.
pub struct Shared {
    pub config: Config,
    pub registry: registry::Registry,
    pub pending: streams::Pending,
    pub verifier: auth::Verifier,
    pub certs: Arc<CertStore>,
    pub tls: TlsConfigs,
    pub metrics: metrics::Metrics,
    /// The TLS port that published addresses report.
    pub public_port: u16,
    pub shutdown: CancellationToken,
    pub tasks: TaskTracker,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Certs(#[from] certs::CertError),
    #[error("cannot listen on {what} {addr}: {source}")]
    Bind { what: &'static str, addr: SocketAddr, source: std::io::Error },
    #[error("TLS setup failed: {0}")]
    Tls(#[from] rustls::Error),
}

/// A started engine.
pub struct Engine {
    pub shared: Arc<Shared>,
    pub tls_addr: SocketAddr,
    /// The HTTP redirect listener's address, when `http.enabled`.
    pub http_addr: Option<SocketAddr>,
}

impl Engine {
    /// Loads certificates, binds the listeners and starts serving.
    pub async fn start(config: Config) -> Result<Engine, StartError> {
        let provider = crypto_provider();
        let certs = Arc::new(CertStore::load(
            &config.certs.r#static.cert_file,
            &config.certs.r#static.key_file,
            provider.clone(),
        )?);
        let tls = TlsConfigs::new(certs.clone(), provider)?;
        let tls_listener = TcpListener::bind(config.tls.listen_addr).await.map_err(|source| StartError::Bind {
            what: "tls.listen_addr",
            addr: config.tls.listen_addr,
            source,
        })?;
        let tls_addr = tls_listener.local_addr().expect("bound socket has an address");
        let http_listener = if config.http.enabled {
            let addr = config.http.listen_addr;
            Some(TcpListener::bind(addr).await.map_err(|source| StartError::Bind {
                what: "http.listen_addr",
                addr,
                source,
            })?)
        } else {
            None
        };
        let http_addr = http_listener.as_ref().map(|l| l.local_addr().expect("bound socket has an address"));
        let public_port = config.tls.public_port.unwrap_or(tls_addr.port());
        let shared = Arc::new(Shared {
            verifier: auth::Verifier::new(config.auth.jwt.token_jwt_secret.expose().as_bytes()),
            config,
            registry: registry::Registry::new(),
            pending: streams::Pending::default(),
            certs,
            tls,
            metrics: metrics::Metrics::new(),
            public_port,
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
        });
        shared.tasks.spawn(listener::run(shared.clone(), tls_listener));
        tracing::info!(addr = %tls_addr, host = %shared.config.engine.host, "TLS listener up");
        if let (Some(listener), Some(addr)) = (http_listener, http_addr) {
            shared.tasks.spawn(edge::redirect::run(shared.clone(), listener));
            tracing::info!(%addr, "HTTP redirect listener up");
        }
        Ok(Engine { shared, tls_addr, http_addr })
    }

    /// Stops accepting, ends every connection and waits for the tasks.
    pub async fn shutdown(self) {
        self.shared.shutdown.cancel();
        self.shared.tasks.close();
        self.shared.tasks.wait().await;
    }
}

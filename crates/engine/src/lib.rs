//! strait-engine: a self-hosted tunnel engine that speaks the rstream agent
//! protocol.
//!
//! A tour of the parts, in the order a byte meets them:
//!
//! - [`listener`]: the TLS port. Accepts, reads the ClientHello and routes
//!   on SNI and ALPN to the agent protocol, the Engine API or a published
//!   tunnel; [`admission`] decides, per source address, whether a new
//!   connection may start its handshake at all;
//! - [`control`]: an agent's control channel: tunnels open and close,
//!   heartbeats, and the outbox that carries `ProxyConnReq`s to the agent;
//! - [`streams`]: pairing an inbound connection with the agent's reverse
//!   dial, and private dials;
//! - [`edge`]: published tunnels (`<label>.t.<engine.host>`);
//! - [`api`]: the Engine API under `/api`;
//! - [`registry`]: clients, tunnels and the names that reach them, with a
//!   change feed;
//! - [`tunnel`]: what a tunnel may ask for and the properties it gets;
//! - [`prometheus`]: the metrics listener; [`check`]: `check-config`;
//! - [`auth`], [`certs`], [`config`], [`metrics`]: the supporting cast;
//! - `strait_proto::splice`: the one copy loop, shared with the agent.

#![forbid(unsafe_code)]

pub mod admission;
pub mod api;
pub mod auth;
pub mod certs;
pub mod channel;
pub mod check;
pub mod config;
pub mod control;
pub mod datagram;
pub mod dev;
pub mod edge;
/// What the fuzz targets (`fuzz/`) and the property tests check.
#[doc(hidden)]
pub mod fuzzing;
pub mod ids;
pub mod metrics;
pub mod net;
pub mod policy;
pub mod prometheus;
pub mod registry;
pub mod streams;
pub mod tunnel;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

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
    pub admission: Arc<admission::Admission>,
    pub pending: streams::Pending,
    pub datagrams: Arc<datagram::Router>,
    pub verifier: auth::Verifier,
    pub certs: Arc<CertStore>,
    pub tls: TlsConfigs,
    pub metrics: metrics::Metrics,
    /// The edge cache of the tunnels whose policy asks for one.
    pub cache: Arc<edge::cache::Cache>,
    /// The TLS port that published addresses report.
    pub public_port: u16,
    /// Stop accepting, close control channels and watches, let streams in
    /// flight finish.
    pub shutdown: CancellationToken,
    /// The drain is over: cut whatever still carries bytes. Copy loops
    /// select on it.
    pub abort: CancellationToken,
    pub tasks: TaskTracker,
    /// Every listener is bound and serving.
    pub listening: AtomicBool,
}

impl Shared {
    /// A connection from `ip` the limits refuse, on any port: counted by
    /// reason, and logged at most once per few seconds (a flood must not
    /// become a flood of log lines). The caller closes it.
    pub fn refused(&self, ip: std::net::IpAddr, refusal: admission::Refusal) {
        self.metrics.connection_refused(refusal.label());
        self.admission.log_refusal(ip, refusal);
    }

    /// A token from `ip` was refused: counted, and charged to its source.
    pub fn auth_failed(&self, ip: std::net::IpAddr) {
        self.metrics.auth_failed();
        self.admission.auth_failed(ip);
    }

    /// Whether the engine should receive traffic, and if not, why.
    pub fn readiness(&self) -> Result<(), String> {
        if self.shutdown.is_cancelled() {
            return Err("shutting down".into());
        }
        if !self.listening.load(Ordering::Acquire) {
            return Err("listeners are not up yet".into());
        }
        let der = self.certs.end_entity_der();
        let (_, cert) = x509_parser::parse_x509_certificate(&der)
            .map_err(|e| format!("the serving certificate does not parse: {e}"))?;
        let now = x509_parser::time::ASN1Time::from(time::OffsetDateTime::from(SystemTime::now()));
        let validity = cert.validity();
        if validity.not_after < now {
            return Err(format!("the serving certificate expired on {}", validity.not_after));
        }
        if validity.not_before > now {
            return Err(format!("the serving certificate is not valid before {}", validity.not_before));
        }
        Ok(())
    }
}

/// Streams still running this long after the drain was cut are left to the
/// runtime's end; a copy loop answers `abort` within one read.
const ABORT_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Certs(#[from] certs::CertError),
    #[error("cannot listen on {what} {addr}: {source}")]
    Bind { what: &'static str, addr: SocketAddr, source: std::io::Error },
    #[error("TLS setup failed: {0}")]
    Tls(#[from] rustls::Error),
    #[error("edge.cache_dir {dir}: {source}")]
    CacheDir { dir: std::path::PathBuf, source: std::io::Error },
}

/// Binds the TLS port and, when `quic.enabled`, the QUIC port: by default
/// the UDP side of the TLS address. With port 0 the kernel picks the TCP
/// port; should that port be taken on UDP, both are picked again.
async fn bind_agent_ports(
    config: &Config,
    certs: Arc<CertStore>,
    provider: Arc<CryptoProvider>,
) -> Result<(TcpListener, Option<quinn::Endpoint>), StartError> {
    let addr = config.tls.listen_addr;
    let bind_tls = || async move {
        TcpListener::bind(addr).await.map_err(|source| StartError::Bind { what: "tls.listen_addr", addr, source })
    };
    let mut attempts = 0;
    loop {
        let tcp = bind_tls().await?;
        if !config.quic.enabled {
            return Ok((tcp, None));
        }
        let quic_config = net::quic::server_config(certs.clone(), provider.clone(), &config.quic)?;
        let (what, udp_addr) = match config.quic.listen_addr {
            Some(udp) => ("quic.listen_addr", udp),
            None => {
                ("tls.listen_addr (its UDP side, for QUIC)", tcp.local_addr().expect("bound socket has an address"))
            }
        };
        match net::quic::bind(quic_config, udp_addr) {
            Ok(endpoint) => return Ok((tcp, Some(endpoint))),
            Err(source)
                if source.kind() == std::io::ErrorKind::AddrInUse
                    && addr.port() == 0
                    && config.quic.listen_addr.is_none()
                    && attempts < 16 =>
            {
                attempts += 1;
            }
            Err(source) => return Err(StartError::Bind { what, addr: udp_addr, source }),
        }
    }
}

/// A started engine.
pub struct Engine {
    pub shared: Arc<Shared>,
    pub tls_addr: SocketAddr,
    /// The QUIC listener's UDP address, when `quic.enabled`.
    pub quic_addr: Option<SocketAddr>,
    /// The metrics listener, when `metrics.prometheus` has one.
    pub metrics_addr: Option<SocketAddr>,
    /// The HTTP redirect listener's address, when `http.enabled`.
    pub http_addr: Option<SocketAddr>,
    /// Closed at the end of a shutdown, so its UDP port is free at once.
    quic_endpoint: Option<quinn::Endpoint>,
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
        let tls = TlsConfigs::new(certs.clone(), provider.clone())?;
        let (tls_listener, quic_endpoint) = bind_agent_ports(&config, certs.clone(), provider).await?;
        let metrics_listener = prometheus::bind(&config.metrics.prometheus).await?;
        let metrics_addr = metrics_listener.as_ref().map(|l| l.local_addr().expect("bound socket has an address"));
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
        let cache_dir = config.edge.cache_dir.clone();
        let cache = edge::cache::Cache::new(cache_dir.clone(), config.edge.cache_max_bytes)
            .map_err(|source| StartError::CacheDir { dir: cache_dir.unwrap_or_default(), source })?;
        let shared = Arc::new(Shared {
            cache: Arc::new(cache),
            verifier: auth::Verifier::new(config.auth.jwt.token_jwt_secret.expose().as_bytes()),
            registry: registry::Registry::new(registry::Policy::from_config(&config)),
            admission: Arc::new(admission::Admission::new(&config.limits)),
            config,
            pending: streams::Pending::default(),
            datagrams: Arc::default(),
            certs,
            tls,
            metrics: metrics::Metrics::new(),
            public_port,
            shutdown: CancellationToken::new(),
            abort: CancellationToken::new(),
            tasks: TaskTracker::new(),
            listening: AtomicBool::new(false),
        });
        shared.tasks.spawn(net::tls::run(shared.clone(), tls_listener));
        tracing::info!(addr = %tls_addr, host = %shared.config.engine.host, "TLS listener up");
        let quic_addr = quic_endpoint.as_ref().map(|e| e.local_addr().expect("bound socket has an address"));
        if let Some(endpoint) = quic_endpoint.clone() {
            shared.tasks.spawn(net::quic::run(shared.clone(), endpoint));
            tracing::info!(addr = ?quic_addr, "QUIC listener up");
        }
        if let Some(listener) = metrics_listener {
            shared.tasks.spawn(prometheus::serve(shared.clone(), listener));
            tracing::info!(
                addr = ?metrics_addr, path = %shared.config.metrics.prometheus.path,
                token = shared.config.metrics.prometheus.bearer_token.is_some(), "metrics listener up"
            );
        }
        if let (Some(listener), Some(addr)) = (http_listener, http_addr) {
            shared.tasks.spawn(edge::redirect::run(shared.clone(), listener));
            tracing::info!(%addr, "HTTP redirect listener up");
        }
        shared.listening.store(true, Ordering::Release);
        Ok(Engine { shared, tls_addr, quic_addr, metrics_addr, http_addr, quic_endpoint })
    }

    /// Graceful shutdown with the configured drain
    /// (`timeouts.shutdown_drain_seconds`).
    pub async fn shutdown(self) {
        let drain = Duration::from_secs(self.shared.config.timeouts.shutdown_drain_seconds);
        self.shutdown_within(drain).await;
    }

    /// Stops accepting, tells agents and watchers, lets streams in flight
    /// finish for up to `drain`, then cuts what is left. Returns whether
    /// everything finished within the drain.
    pub async fn shutdown_within(self, drain: Duration) -> bool {
        let shared = &self.shared;
        shared.shutdown.cancel();
        shared.tasks.close();
        tracing::info!(connections = shared.tasks.len(), drain_seconds = drain.as_secs(), "draining");
        let drained = tokio::time::timeout(drain, shared.tasks.wait()).await.is_ok();
        if drained {
            tracing::info!("drained");
        } else {
            tracing::warn!(connections = shared.tasks.len(), "drain time is up; cutting the streams still open");
            shared.abort.cancel();
            if tokio::time::timeout(ABORT_GRACE, shared.tasks.wait()).await.is_err() {
                tracing::warn!(connections = shared.tasks.len(), "connections still open after the cut");
            }
        }
        if let Some(endpoint) = self.quic_endpoint {
            // Streams that finished may still wait for their last
            // acknowledgements (QuicStream lingers); the drain is over.
            endpoint.close(net::quic::close::NORMAL, b"engine stopped");
            // The close frames leave at once; a second lets them go before
            // the process does (waiting for every connection to drain
            // would wait on handles still held by lingering streams).
            let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
        }
        drained
    }
}

//! The soak: `strait-bench soak-services` (what the agents forward to) and
//! `strait-bench soak-load` (everything a client does), driven by
//! `bench/soak.py`, which runs the engine and the real `strait forward`
//! agents, kills and restarts them, and watches the engine's memory and
//! file descriptors.
//!
//! The load runs until stdin closes. The driver writes `pause` (every
//! worker finishes what it has in flight, closes its connections and
//! waits; `{"event":"paused"}` says when all have), `resume`, and `stop`
//! (or closes stdin). Counters go out as `{"event":"stats"}` lines, every
//! finished transfer as a `{"event":"transfer"}` line. `hold N` opens N
//! streams and never closes them: a fault on purpose, to see the soak fail.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::json;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

mod load;
pub mod services;

/// What `soak-load` is pointed at, and how hard it pushes.
#[derive(clap::Args, Clone)]
pub struct LoadArgs {
    /// The engine's TLS port, host:port (the host must be covered by its
    /// certificate: `localhost` for `strait-engine gen-certs`).
    #[arg(long)]
    pub engine: String,
    #[arg(long)]
    pub ca: PathBuf,
    /// Token of the principal whose agents are never killed.
    #[arg(long)]
    pub stable_token: String,
    /// Token of the principal whose `strait forward` agents the driver
    /// kills and restarts.
    #[arg(long)]
    pub churn_token: String,
    /// Token of the principal of the in-process agents that come and go.
    #[arg(long)]
    pub inproc_token: String,
    /// First source address of the load's connections; they are spread
    /// over `--sources` consecutive addresses from it (127.0.0.0/8 is all
    /// local on Linux), as clients from many hosts would be.
    #[arg(long, default_value = "127.0.0.10")]
    pub source_first: std::net::Ipv4Addr,
    #[arg(long, default_value_t = 32)]
    pub sources: u32,
    /// Published HTTP tunnel of a stable agent (full hostname).
    #[arg(long)]
    pub web: String,
    /// Private echo tunnel of a stable agent (name).
    #[arg(long)]
    pub echo: String,
    /// Private tunnel of a stable agent to the echo that resets (name).
    #[arg(long)]
    pub cut: String,
    /// Private tunnel of a stable agent to the transfer service (name).
    #[arg(long)]
    pub blob: String,
    /// Published TLS tunnel (terminated) of a stable agent to the transfer
    /// service (full hostname).
    #[arg(long)]
    pub blob_tls: String,
    /// Published HTTP tunnels of the killed agents (full hostnames).
    #[arg(long, value_delimiter = ',')]
    pub churn_web: Vec<String>,
    /// Private echo tunnels of the killed agents (names).
    #[arg(long, value_delimiter = ',')]
    pub churn_echo: Vec<String>,
    /// The soak HTTP service (for the in-process agents' tunnels).
    #[arg(long)]
    pub service_http: String,
    /// The soak echo service (for the in-process agents' tunnels).
    #[arg(long)]
    pub service_echo: String,
    /// In-process agents, each connecting, opening one tunnel (even:
    /// published, odd: private), proving it, and closing or vanishing.
    #[arg(long, default_value_t = 8)]
    pub inproc_agents: usize,
    /// Steady published HTTP requests per second (over keep-alive
    /// connections) to the stable agent.
    #[arg(long, default_value_t = 100.0)]
    pub http_rate: f64,
    /// Steady private dials per second (echo round trips) to the stable agent.
    #[arg(long, default_value_t = 10.0)]
    pub dial_rate: f64,
    /// Streams and requests cut mid-flight per second, client side and
    /// service side each.
    #[arg(long, default_value_t = 2.0)]
    pub cut_rate: f64,
    /// Requests and dials per second to the killed agents' tunnels.
    #[arg(long, default_value_t = 4.0)]
    pub churn_rate: f64,
    /// Bytes of each checksummed transfer.
    #[arg(long, default_value_t = 1 << 30)]
    pub transfer_bytes: u64,
    /// A transfer starts this often (seconds); one at a time.
    #[arg(long, default_value_t = 30.0)]
    pub transfer_every: f64,
    /// Seconds between stats lines.
    #[arg(long, default_value_t = 10.0)]
    pub report_every: f64,
}

// ---------------------------------------------------------------- gate

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Run,
    Pause,
    Stop,
}

/// Whether workers may start new work, and how many units of work are in
/// flight: the driver's pause waits until none is.
pub struct Gate {
    mode: watch::Sender<Mode>,
    active: watch::Sender<usize>,
}

/// One unit of work in flight; dropping it says it is done.
pub struct Unit(Arc<Gate>);

impl Drop for Unit {
    fn drop(&mut self) {
        self.0.active.send_modify(|n| *n -= 1);
    }
}

impl Gate {
    fn new() -> Arc<Self> {
        Arc::new(Self { mode: watch::Sender::new(Mode::Run), active: watch::Sender::new(0) })
    }

    /// Waits while paused; `None` once stopped.
    pub async fn enter(self: &Arc<Self>) -> Option<Unit> {
        let mut mode = self.mode.subscribe();
        loop {
            let now = *mode.borrow_and_update();
            match now {
                Mode::Stop => return None,
                Mode::Pause => {
                    let _ = mode.changed().await;
                    continue;
                }
                Mode::Run => {}
            }
            self.active.send_modify(|n| *n += 1);
            let unit = Unit(self.clone());
            // A pause that came between the look and the count: back out,
            // so the pause never waits on work that had not started.
            if *self.mode.borrow() == Mode::Run {
                return Some(unit);
            }
        }
    }

    /// Whether work in flight should wind down.
    pub fn winding_down(&self) -> bool {
        *self.mode.borrow() != Mode::Run
    }

    /// Sleeps for `d`, or less if the load stops or pauses.
    pub async fn sleep(&self, d: Duration) {
        let mut mode = self.mode.subscribe();
        tokio::select! {
            _ = tokio::time::sleep(d) => {}
            _ = mode.wait_for(|m| *m != Mode::Run) => {}
        }
    }

    async fn idle(&self) {
        let _ = self.active.subscribe().wait_for(|n| *n == 0).await;
    }

    fn set(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }
}

// ---------------------------------------------------------------- stats

/// Counters by name, and the first unexpected errors word for word.
#[derive(Default)]
pub struct Stats {
    counts: Mutex<BTreeMap<&'static str, u64>>,
    unexpected: Mutex<Vec<String>>,
    started: Mutex<Option<Instant>>,
}

/// Unexpected errors kept word for word; the rest are counted.
const KEEP_ERRORS: usize = 50;

impl Stats {
    pub fn add(&self, key: &'static str) {
        self.add_n(key, 1);
    }

    pub fn add_n(&self, key: &'static str, n: u64) {
        *self.counts.lock().unwrap().entry(key).or_default() += n;
    }

    /// An error the soak must not see: counted under `unexpected` and
    /// `key`, and kept (the first [`KEEP_ERRORS`]) with its time.
    pub fn unexpected(&self, key: &'static str, what: impl std::fmt::Display) {
        self.add("unexpected");
        self.add(key);
        let elapsed = self.started.lock().unwrap().map_or(0.0, |s| s.elapsed().as_secs_f64());
        let line = format!("{elapsed:.1}s {key}: {what}");
        eprintln!("soak-load: unexpected: {line}");
        let mut kept = self.unexpected.lock().unwrap();
        if kept.len() < KEEP_ERRORS {
            kept.push(line);
        }
    }

    fn snapshot(&self) -> serde_json::Value {
        json!({
            "counts": *self.counts.lock().unwrap(),
            "unexpected_errors": *self.unexpected.lock().unwrap(),
        })
    }
}

fn report(event: &str, stats: &Stats) {
    let mut value = stats.snapshot();
    value["event"] = event.into();
    crate::report(value);
}

// ---------------------------------------------------------------- net

/// How the load reaches the engine: TCP from a rotating source address,
/// TLS to a published name, or a private dial as one of the principals.
pub struct Net {
    engine: SocketAddr,
    http_tls: TlsConnector,
    raw_tls: TlsConnector,
    sources: Vec<IpAddr>,
    next: AtomicUsize,
    /// Per principal, one agent-library client per source address.
    stable: Vec<strait_agent::Client>,
    churn: Vec<strait_agent::Client>,
    inproc: Vec<strait_agent::Client>,
}

/// Whose credentials a dial or a control channel uses.
#[derive(Clone, Copy)]
pub enum Principal {
    Stable,
    Churn,
    Inproc,
}

impl Net {
    async fn new(args: &LoadArgs) -> anyhow::Result<Self> {
        let (host, port) = args.engine.rsplit_once(':').context("--engine is not host:port")?;
        let engine = tokio::net::lookup_host((host, port.parse::<u16>()?))
            .await?
            .find(|a| a.is_ipv4())
            .context("the engine's name has no IPv4 address")?;
        let sources: Vec<IpAddr> = (0..args.sources.max(1))
            .map(|i| IpAddr::V4(std::net::Ipv4Addr::from(u32::from(args.source_first) + i)))
            .collect();
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(&args.ca).with_context(|| format!("reading {}", args.ca.display()))? {
            roots.add(cert?)?;
        }
        let config = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
        let mut http = config.clone();
        http.alpn_protocols = vec![b"http/1.1".to_vec()];
        let clients = |token: &str| -> anyhow::Result<Vec<strait_agent::Client>> {
            sources
                .iter()
                .map(|source| {
                    let mut config = strait_agent::ClientConfig::new(args.engine.clone(), Some(token.to_string()));
                    config.ca_file = Some(args.ca.clone());
                    config.local_addr = Some(*source);
                    Ok(strait_agent::Client::new(config)?)
                })
                .collect()
        };
        Ok(Self {
            engine,
            http_tls: TlsConnector::from(Arc::new(http)),
            raw_tls: TlsConnector::from(Arc::new(config)),
            stable: clients(&args.stable_token)?,
            churn: clients(&args.churn_token)?,
            inproc: clients(&args.inproc_token)?,
            sources,
            next: AtomicUsize::new(0),
        })
    }

    fn turn(&self) -> usize {
        self.next.fetch_add(1, Ordering::Relaxed)
    }

    /// A TCP connection to the engine from the next source address.
    pub async fn tcp(&self) -> std::io::Result<TcpStream> {
        let source = self.sources[self.turn() % self.sources.len()];
        let socket = TcpSocket::new_v4()?;
        socket.bind(SocketAddr::new(source, 0))?;
        let tcp = socket.connect(self.engine).await?;
        tcp.set_nodelay(true)?;
        Ok(tcp)
    }

    /// TLS to a published hostname; ALPN `http/1.1` when `http`.
    pub async fn tls(&self, host: &str, http: bool) -> std::io::Result<TlsStream<TcpStream>> {
        let tcp = self.tcp().await?;
        let name = ServerName::try_from(host.to_string()).map_err(std::io::Error::other)?;
        let connector = if http { &self.http_tls } else { &self.raw_tls };
        connector.connect(name, tcp).await
    }

    pub fn client(&self, principal: Principal) -> &strait_agent::Client {
        let clients = match principal {
            Principal::Stable => &self.stable,
            Principal::Churn => &self.churn,
            Principal::Inproc => &self.inproc,
        };
        &clients[self.turn() % clients.len()]
    }

    pub async fn dial(
        &self,
        principal: Principal,
        tunnel: &str,
    ) -> Result<strait_agent::Stream, strait_agent::AgentError> {
        self.client(principal).dial(tunnel).await
    }
}

// ---------------------------------------------------------------- main

/// Runs the load until stdin says stop (or closes).
pub async fn run(args: LoadArgs) -> anyhow::Result<()> {
    let net = Arc::new(Net::new(&args).await?);
    let gate = Gate::new();
    let stats = Arc::new(Stats::default());
    *stats.started.lock().unwrap() = Some(Instant::now());
    let workers = load::start(Arc::new(args.clone()), net.clone(), gate.clone(), stats.clone());
    let mut held = Vec::new();
    crate::report(json!({"event": "started", "workers": workers.len()}));

    let reporter = {
        let stats = stats.clone();
        let every = Duration::from_secs_f64(args.report_every.max(0.5));
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(every);
            ticker.tick().await;
            loop {
                ticker.tick().await;
                report("stats", &stats);
            }
        })
    };

    use tokio::io::AsyncBufReadExt;
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        match line.trim() {
            "pause" => {
                gate.set(Mode::Pause);
                gate.idle().await;
                report("paused", &stats);
            }
            "resume" => {
                gate.set(Mode::Run);
                report("resumed", &stats);
            }
            "stop" => break,
            other => match other.strip_prefix("hold ").and_then(|n| n.parse::<usize>().ok()) {
                // A fault on purpose (`bench/soak.py --inject held-streams`):
                // streams opened and never closed, outside the gate, so the
                // pause's return to baseline and the growth check must fail.
                Some(n) => {
                    for _ in 0..n {
                        match net.dial(Principal::Stable, &args.echo).await {
                            Ok(stream) => held.push(stream),
                            Err(error) => eprintln!("soak-load: hold: {error}"),
                        }
                    }
                    crate::report(json!({"event": "held", "streams": held.len()}));
                }
                None => eprintln!("soak-load: unknown command {other:?}"),
            },
        }
    }
    gate.set(Mode::Stop);
    // Every unit of work has a deadline of its own; this one only guards
    // against a bug in them.
    if tokio::time::timeout(Duration::from_secs(900), gate.idle()).await.is_err() {
        stats.unexpected("stop", "work still in flight 900 s after stop");
    }
    reporter.abort();
    for worker in workers {
        worker.abort();
    }
    report("done", &stats);
    Ok(())
}

//! The scale run's agents: COUNT control channels, each with one tunnel
//! (even: published http, odd: private), spread over source addresses
//! and principals, each reconnecting as `strait forward` does (capped
//! exponential backoff with jitter, the same hostname or name again).
//! `bench/soak.py --scale` runs them against one engine, restarts the
//! engine, and times the reconnect storm.
//!
//! Prints `{"event":"progress"}` lines (agents up, connection attempts,
//! errors by kind) every `--report-every` seconds and `{"event":"all_up"}`
//! whenever the last agent comes up; every line carries `unix`, the wall
//! clock, so the driver can line it up with the engine's restart. Runs
//! until stdin closes.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use serde_json::json;
use strait_agent::{AgentError, TunnelProperties};
use tokio::sync::Notify;

use crate::blob::Fill;

#[derive(clap::Args)]
pub struct ScaleArgs {
    /// The engine's TLS port, host:port.
    #[arg(long)]
    engine: String,
    #[arg(long)]
    ca: PathBuf,
    /// A file of tokens, one a line: agent i uses line i mod their count
    /// (one principal each).
    #[arg(long)]
    tokens: PathBuf,
    #[arg(long, default_value_t = 10_000)]
    count: usize,
    /// Agent i leaves from source address i mod --sources, counted from
    /// --source-first.
    #[arg(long, default_value = "127.0.0.2")]
    source_first: Ipv4Addr,
    #[arg(long, default_value_t = 100)]
    sources: u32,
    /// Hostnames and names are PREFIX-i.
    #[arg(long, default_value = "scale")]
    prefix: String,
    #[arg(long, default_value_t = 1.0)]
    report_every: f64,
}

/// `strait forward`'s reconnect backoff (crates/cli/src/retry.rs): the
/// ceiling doubles from 250 ms to 30 s, the delay is drawn from its upper
/// half.
const BACKOFF_BASE: Duration = Duration::from_millis(250);
const BACKOFF_CAP: Duration = Duration::from_secs(30);

struct Backoff {
    attempt: u32,
    rng: Fill,
}

impl Backoff {
    fn next_delay(&mut self) -> Duration {
        let ceiling = BACKOFF_BASE.saturating_mul(1u32 << self.attempt.min(16)).min(BACKOFF_CAP);
        self.attempt += 1;
        let millis = ceiling.as_millis().max(2) as u64;
        Duration::from_millis(millis / 2 + self.rng.next_u64() % (millis / 2 + 1))
    }
}

#[derive(Default)]
struct Progress {
    up: AtomicUsize,
    attempts: AtomicU64,
    drops: AtomicU64,
    errors: Mutex<BTreeMap<String, u64>>,
    /// Woken when `up` changes, for the all-up edge.
    changed: Notify,
}

fn unix_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// A short, stable name for what went wrong: the engine's error code, or
/// the kind of failure on the way to it.
fn kind(error: &AgentError) -> String {
    match error {
        AgentError::Engine(e) => {
            let message = e.message.as_deref().unwrap_or_default();
            let detail = if message.contains("already served") {
                " (hostname still served)"
            } else if message.contains("already open") {
                " (name still open)"
            } else {
                ""
            };
            format!("engine: {:?}{detail}", e.code())
        }
        AgentError::Connect { source, .. } => format!("connect: {:?}", source.kind()),
        AgentError::Tls { source, .. } => format!("tls: {source}"),
        AgentError::Timeout(what) => format!("timeout: {what}"),
        AgentError::Closed(_) => "closed during setup".into(),
        AgentError::Frame(_) | AgentError::Io(_) => "connection lost during setup".into(),
        other => format!("{other}"),
    }
}

pub async fn run(args: ScaleArgs) -> anyhow::Result<()> {
    let tokens: Vec<String> = std::fs::read_to_string(&args.tokens)
        .with_context(|| format!("reading {}", args.tokens.display()))?
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    anyhow::ensure!(!tokens.is_empty(), "no tokens in {}", args.tokens.display());
    let sources = args.sources.max(1);
    // One client per (principal, source) pair in use.
    let mut clients = BTreeMap::new();
    let progress = Arc::new(Progress::default());
    let mut agents = Vec::with_capacity(args.count);
    for i in 0..args.count {
        let key = (i % tokens.len(), i as u32 % sources);
        let client = match clients.get(&key) {
            Some(client) => strait_agent::Client::clone(client),
            None => {
                let mut config = strait_agent::ClientConfig::new(args.engine.clone(), Some(tokens[key.0].clone()));
                config.ca_file = Some(args.ca.clone());
                config.local_addr = Some(IpAddr::V4(Ipv4Addr::from(u32::from(args.source_first) + key.1)));
                let client = strait_agent::Client::new(config)?;
                clients.insert(key, client.clone());
                client
            }
        };
        let label = format!("{}-{i}", args.prefix);
        let properties = if i % 2 == 0 {
            TunnelProperties {
                publish: Some(true),
                protocol: Some("http".into()),
                hostname: Some(label),
                ..Default::default()
            }
        } else {
            TunnelProperties { publish: Some(false), name: Some(label), ..Default::default() }
        };
        agents.push(tokio::spawn(agent(client, properties, i as u64, progress.clone())));
    }

    let count = args.count;
    let edge = {
        let progress = progress.clone();
        tokio::spawn(async move {
            let mut was_all = false;
            loop {
                let notified = progress.changed.notified();
                let all = progress.up.load(Ordering::Relaxed) == count;
                if all && !was_all {
                    crate::report(json!({"event": "all_up", "unix": unix_now(), "up": count}));
                }
                was_all = all;
                notified.await;
            }
        })
    };
    let reporter = {
        let progress = progress.clone();
        let every = Duration::from_secs_f64(args.report_every.max(0.1));
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(every);
            loop {
                ticker.tick().await;
                crate::report(json!({
                    "event": "progress",
                    "unix": unix_now(),
                    "up": progress.up.load(Ordering::Relaxed),
                    "attempts": progress.attempts.load(Ordering::Relaxed),
                    "drops": progress.drops.load(Ordering::Relaxed),
                    "errors": *progress.errors.lock().unwrap(),
                }));
            }
        })
    };
    crate::stdin_closed().await;
    edge.abort();
    reporter.abort();
    for agent in agents {
        agent.abort();
    }
    Ok(())
}

/// One agent, for ever: connect and open, hold until the channel closes,
/// back off, again.
async fn agent(client: strait_agent::Client, properties: TunnelProperties, i: u64, progress: Arc<Progress>) {
    let mut backoff = Backoff { attempt: 0, rng: Fill::new(i.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ 0x5eed) };
    loop {
        progress.attempts.fetch_add(1, Ordering::Relaxed);
        let session = async {
            let control = client.connect().await?;
            let tunnel = control.open_tunnel(properties.clone()).await?;
            Ok::<_, AgentError>((control, tunnel))
        };
        match session.await {
            Ok((control, tunnel)) => {
                backoff.attempt = 0;
                progress.up.fetch_add(1, Ordering::Relaxed);
                progress.changed.notify_one();
                control.closed().await;
                progress.up.fetch_sub(1, Ordering::Relaxed);
                progress.drops.fetch_add(1, Ordering::Relaxed);
                progress.changed.notify_one();
                drop(tunnel);
                drop(control);
            }
            Err(error) => {
                *progress.errors.lock().unwrap().entry(kind(&error)).or_default() += 1;
            }
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

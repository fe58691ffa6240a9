//! `strait doctor`: a readiness gate against a running engine. Each check
//! passes, warns or fails; the verdict is the worst of them, and the exit
//! code says it (0 pass, 3 warn, 1 fail), so a deploy script can gate on
//! it. Nothing printed carries the token or a stream secret.
//!
//! The checks, in order: DNS for the engine's name and for a name under
//! `.t.` (`strait-doctor.t.<host>`: a wildcard record answers it), the
//! certificate served for each (verified as agents verify it, days left),
//! the Engine API, and a round trip through a private tunnel and through a
//! published HTTP tunnel that the doctor opens itself, with the agent on
//! TLS and on QUIC. The published round trip connects to the engine's
//! address with the tunnel's hostname as SNI and Host, so it does not
//! depend on DNS (DNS is its own check).

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use strait_agent::{Client, ClientConfig, TransportMode, TunnelProperties};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The label the wildcard DNS check and certificate check ask for.
const PROBE_LABEL: &str = "strait-doctor";

/// How long any one check may take before it fails.
const CHECK_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(clap::Args, Clone, Debug)]
pub struct DoctorArgs {
    /// human or json.
    #[arg(short = 'o', long, default_value = "human", value_parser = ["human", "json"])]
    output: String,
    /// A latency above this warns (milliseconds), for every timed check.
    #[arg(long, default_value_t = 250, value_name = "MS")]
    warn_ms: u64,
    /// A latency above this fails (milliseconds), for every timed check.
    #[arg(long, default_value_t = 2000, value_name = "MS")]
    fail_ms: u64,
    /// Thresholds of one check, e.g. `tunnel.private.quic=50:500`
    /// (warn:fail, milliseconds); repeatable.
    #[arg(long = "threshold", value_name = "CHECK=WARN:FAIL", value_parser = parse_threshold)]
    thresholds: Vec<(String, (u64, u64))>,
    /// A certificate with fewer days left warns.
    #[arg(long, default_value_t = 21, value_name = "DAYS")]
    cert_warn_days: i64,
    /// A certificate with fewer days left fails.
    #[arg(long, default_value_t = 7, value_name = "DAYS")]
    cert_fail_days: i64,
}

fn parse_threshold(text: &str) -> Result<(String, (u64, u64)), String> {
    let bad = || format!("{text:?} is not CHECK=WARN:FAIL (milliseconds)");
    let (check, limits) = text.split_once('=').ok_or_else(bad)?;
    let (warn, fail) = limits.split_once(':').ok_or_else(bad)?;
    let (warn, fail): (u64, u64) = (warn.trim().parse().map_err(|_| bad())?, fail.trim().parse().map_err(|_| bad())?);
    if warn > fail {
        return Err(format!("{text:?}: the warn threshold is above the fail threshold"));
    }
    Ok((check.trim().to_string(), (warn, fail)))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pass,
    Warn,
    Fail,
}

impl Status {
    fn label(self) -> &'static str {
        match self {
            Status::Pass => "pass",
            Status::Warn => "warn",
            Status::Fail => "fail",
        }
    }
}

#[derive(Debug, Serialize)]
struct Check {
    name: String,
    status: Status,
    detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    latency_ms: Option<f64>,
}

/// A verdict other than pass, as the process's exit code.
#[derive(Debug)]
pub struct Unhealthy(pub Status);

impl std::fmt::Display for Unhealthy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "verdict: {}", self.0.label())
    }
}

impl std::error::Error for Unhealthy {}

impl Unhealthy {
    pub fn exit_code(&self) -> u8 {
        match self.0 {
            Status::Pass => 0,
            Status::Warn => 3,
            Status::Fail => 1,
        }
    }
}

struct Doctor {
    args: DoctorArgs,
    thresholds: BTreeMap<String, (u64, u64)>,
    checks: Vec<Check>,
}

impl Doctor {
    fn record(&mut self, name: &str, status: Status, detail: String, latency: Option<Duration>) {
        let latency_ms = latency.map(|l| (l.as_secs_f64() * 1000.0 * 10.0).round() / 10.0);
        self.checks.push(Check { name: name.to_string(), status, detail, latency_ms });
    }

    /// Records a timed check that worked: its latency against its
    /// thresholds.
    fn timed(&mut self, name: &str, detail: String, latency: Duration) {
        let (warn, fail) = self.thresholds.get(name).copied().unwrap_or((self.args.warn_ms, self.args.fail_ms));
        let ms = latency.as_millis() as u64;
        let (status, detail) = if ms > fail {
            (Status::Fail, format!("{detail}; slower than the {fail} ms fail threshold"))
        } else if ms > warn {
            (Status::Warn, format!("{detail}; slower than the {warn} ms warn threshold"))
        } else {
            (Status::Pass, detail)
        };
        self.record(name, status, detail, Some(latency));
    }

    /// Records a timed check that worked or failed.
    fn outcome(&mut self, name: &str, result: anyhow::Result<(String, Duration)>) {
        match result {
            Ok((detail, latency)) => self.timed(name, detail, latency),
            Err(error) => self.record(name, Status::Fail, format!("{error:#}"), None),
        }
    }
}

/// Runs every check and prints the report.
pub async fn run(config: ClientConfig, args: DoctorArgs) -> anyhow::Result<()> {
    let client = Client::new(config.clone())?;
    let thresholds = args.thresholds.iter().cloned().collect();
    let mut doctor = Doctor { args, thresholds, checks: Vec::new() };
    let host = client.server_name();
    let port = client.config().engine.rsplit_once(':').and_then(|(_, p)| p.parse().ok()).unwrap_or(443u16);
    let probe = format!("{PROBE_LABEL}.t.{host}");

    // DNS.
    let engine_addrs = dns(&mut doctor, "dns.engine", &host, port, None, "").await;
    let hint = format!("; published URLs need a wildcard record *.t.{host}");
    dns(&mut doctor, "dns.wildcard", &probe, port, engine_addrs.as_ref(), &hint).await;

    // Certificates.
    for (name, sni) in [("certificate.engine", host.as_str()), ("certificate.wildcard", probe.as_str())] {
        let result = bounded(certificate(&client, sni, doctor.args.cert_warn_days, doctor.args.cert_fail_days)).await;
        match result {
            Ok((status, detail)) => doctor.record(name, status, detail, None),
            Err(error) => doctor.record(name, Status::Fail, format!("{error:#}"), None),
        }
    }

    // The Engine API.
    let api = bounded(api(&client)).await;
    doctor.outcome("api", api);

    // Round trips, with the agent on each transport.
    for (transport, mode) in [("tls", TransportMode::Tls), ("quic", TransportMode::Quic)] {
        let mut config = config.clone();
        config.transport = mode;
        config.connect_timeout = Duration::from_secs(5);
        let agent = Client::new(config)?;
        let control = match bounded(async { Ok(agent.connect().await?) }).await {
            Ok(control) => control,
            Err(error) => {
                // Without QUIC agents still work, over TLS.
                let status = if transport == "quic" { Status::Warn } else { Status::Fail };
                let detail = format!("no control channel over {transport}: {error:#}");
                for kind in ["private", "published"] {
                    doctor.record(&format!("tunnel.{kind}.{transport}"), status, detail.clone(), None);
                }
                continue;
            }
        };
        let private = bounded(private_round_trip(&agent, &control)).await;
        doctor.outcome(&format!("tunnel.private.{transport}"), private);
        let published = bounded(published_round_trip(&agent, &control)).await;
        doctor.outcome(&format!("tunnel.published.{transport}"), published);
        let _ = control.close().await;
    }

    let verdict = doctor.checks.iter().map(|c| c.status).max().unwrap_or(Status::Pass);
    if doctor.args.output == "json" {
        let report = serde_json::json!({
            "verdict": verdict,
            "engine": client.config().engine,
            "checks": doctor.checks,
        });
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("strait doctor: {}", client.config().engine);
        for check in &doctor.checks {
            let latency = check.latency_ms.map(|ms| format!(" ({ms} ms)")).unwrap_or_default();
            println!("  {:<4}  {:<24} {}{latency}", check.status.label(), check.name, check.detail);
        }
        println!("verdict: {}", verdict.label());
    }
    match verdict {
        Status::Pass => Ok(()),
        other => Err(Unhealthy(other).into()),
    }
}

async fn bounded<T>(check: impl Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::time::timeout(CHECK_TIMEOUT, check)
        .await
        .map_err(|_| anyhow::anyhow!("no answer within {CHECK_TIMEOUT:?}"))?
}

/// Resolves `name`; `compare`: the engine's addresses, which a `.t.` name
/// should share; `hint` ends the failure's message.
async fn dns(
    doctor: &mut Doctor,
    check: &str,
    name: &str,
    port: u16,
    compare: Option<&HashSet<std::net::IpAddr>>,
    hint: &str,
) -> Option<HashSet<std::net::IpAddr>> {
    if name.parse::<std::net::IpAddr>().is_ok() {
        doctor.record(
            check,
            Status::Warn,
            format!("{name} is an IP address: published hostnames need a DNS name"),
            None,
        );
        return None;
    }
    let started = Instant::now();
    let resolved =
        bounded(async { Ok(tokio::net::lookup_host((name, port)).await?.collect::<Vec<SocketAddr>>()) }).await;
    let addrs: HashSet<_> = match resolved {
        Ok(addrs) if !addrs.is_empty() => addrs.iter().map(|a| a.ip()).collect(),
        Ok(_) | Err(_) => {
            doctor.record(check, Status::Fail, format!("{name} does not resolve{hint}"), None);
            return None;
        }
    };
    let mut listed: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
    listed.sort();
    let detail = format!("{name} -> {}", listed.join(", "));
    match compare {
        Some(engine) if engine.is_disjoint(&addrs) => {
            doctor.record(check, Status::Warn, format!("{detail}: none of the engine's addresses"), None);
        }
        _ => doctor.timed(check, detail, started.elapsed()),
    }
    Some(addrs)
}

/// The certificate served for `sni`, verified as agents verify it.
async fn certificate(client: &Client, sni: &str, warn_days: i64, fail_days: i64) -> anyhow::Result<(Status, String)> {
    let tls = client.connect_named(sni, b"http/1.1").await.with_context(|| format!("TLS for {sni}"))?;
    let chain = tls.get_ref().1.peer_certificates().context("no certificate")?;
    let leaf = chain.first().context("no certificate")?;
    let (_, cert) =
        x509_parser::parse_x509_certificate(leaf).map_err(|e| anyhow::anyhow!("unreadable certificate: {e}"))?;
    let not_after = cert.validity().not_after.timestamp();
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs() as i64;
    let days = (not_after - now).div_euclid(86_400);
    let detail = format!("{sni}: valid, chain of {}, {days} days left", chain.len());
    let status = if days < fail_days {
        Status::Fail
    } else if days < warn_days {
        Status::Warn
    } else {
        Status::Pass
    };
    Ok((status, detail))
}

async fn api(client: &Client) -> anyhow::Result<(String, Duration)> {
    let started = Instant::now();
    let api = crate::engine_api::EngineApi::new(client.clone());
    let tunnels: serde_json::Value = api.get_json("/api/tunnels").await.map_err(|e| anyhow::anyhow!("{e}"))?;
    let count = tunnels.as_array().map_or(0, Vec::len);
    Ok((format!("GET /api/tunnels: 200, {count} tunnels visible"), started.elapsed()))
}

/// A private tunnel to an echo in this process; one dial, one echo.
async fn private_round_trip(
    agent: &Client,
    control: &strait_agent::ControlChannel,
) -> anyhow::Result<(String, Duration)> {
    let properties = TunnelProperties { publish: Some(false), ..Default::default() };
    let mut tunnel = control.open_tunnel(properties).await.context("opening a private tunnel")?;
    let id = tunnel.id().to_string();
    let echo = tokio::spawn(async move {
        while let Some(mut stream) = tunnel.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 64];
                while let Ok(n @ 1..) = stream.read(&mut buf).await {
                    if stream.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let nonce: [u8; 16] = rand::random();
    let started = Instant::now();
    let trip = async {
        let mut stream = agent.dial(&id).await.context("dialling it")?;
        stream.write_all(&nonce).await?;
        let mut back = [0u8; 16];
        stream.read_exact(&mut back).await.context("reading the echo")?;
        anyhow::ensure!(back == nonce, "the echo came back changed");
        Ok(started.elapsed())
    }
    .await;
    echo.abort();
    let latency = trip?;
    Ok((format!("dial and echo over {}", control.transport()), latency))
}

/// A published HTTP tunnel to a responder in this process; one HTTPS
/// request to its hostname at the engine's address.
async fn published_round_trip(
    agent: &Client,
    control: &strait_agent::ControlChannel,
) -> anyhow::Result<(String, Duration)> {
    let properties = TunnelProperties { publish: Some(true), protocol: Some("http".into()), ..Default::default() };
    let mut tunnel = control.open_tunnel(properties).await.context("opening a published http tunnel")?;
    let hostname = tunnel.properties().hostname.clone().context("the engine returned no hostname")?;
    let nonce = format!("{:032x}", rand::random::<u128>());
    let body = nonce.clone();
    let responder = tokio::spawn(async move {
        while let Some(stream) = tunnel.accept().await {
            let body = body.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |_request| {
                    let body = body.clone();
                    async move { Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(Bytes::from(body)))) }
                });
                let _ =
                    hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
            });
        }
    });
    let started = Instant::now();
    let trip = async {
        let tls = agent.connect_named(&hostname, b"http/1.1").await.with_context(|| format!("TLS for {hostname}"))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
        tokio::spawn(connection);
        let request = http::Request::get("/").header(http::header::HOST, &hostname).body(Empty::<Bytes>::new())?;
        let response = sender.send_request(request).await?;
        let status = response.status();
        let got = response.into_body().collect().await?.to_bytes();
        anyhow::ensure!(status == http::StatusCode::OK, "https://{hostname}/ answered {status}");
        anyhow::ensure!(got == nonce.as_bytes(), "https://{hostname}/ answered another body");
        Ok(started.elapsed())
    }
    .await;
    responder.abort();
    let latency = trip?;
    Ok((format!("https://{hostname}/ through the agent over {}", control.transport()), latency))
}

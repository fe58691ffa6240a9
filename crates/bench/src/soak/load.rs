//! The soak's workers. Each loops: wait at the gate, do one unit of work
//! (a keep-alive connection's worth of requests, a dial, a cut, a
//! transfer, an agent's life), count what happened. Every network wait has
//! a deadline; pacing is by interval, never a wait for a result.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use serde_json::json;
use strait_agent::TunnelProperties;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;
use tokio_rustls::client::TlsStream;

use super::services::{BIG_BYTES, CUT_BYTES, SLOW_BYTES, SMALL_BYTES};
use super::{Gate, LoadArgs, Net, Principal, Stats};
use crate::blob::{self, Direction, Fill};

/// Deadline of one request, dial or probe. Far above what any takes on a
/// busy 2-core machine (tens of milliseconds), so only a hang reaches it.
const OP: Duration = Duration::from_secs(30);

/// Requests on one keep-alive connection before it is replaced.
const RECYCLE: usize = 200;

/// Requests to the killed agents' tunnels in flight at once.
const CHURN_IN_FLIGHT: usize = 16;

/// How long an in-process agent retries a hostname or name that the engine
/// still sees as served by its previous, vanished, connection.
const REOPEN_FOR: Duration = Duration::from_secs(10);

#[derive(Clone)]
struct Ctx {
    args: Arc<LoadArgs>,
    net: Arc<Net>,
    gate: Arc<Gate>,
    stats: Arc<Stats>,
}

pub fn start(args: Arc<LoadArgs>, net: Arc<Net>, gate: Arc<Gate>, stats: Arc<Stats>) -> Vec<JoinHandle<()>> {
    let ctx = Ctx { args, net, gate, stats };
    let a = ctx.args.clone();
    let mut workers = Vec::new();
    let mut spawn = |f: JoinHandle<()>| workers.push(f);
    const WEB_WORKERS: usize = 4;
    const DIAL_WORKERS: usize = 2;
    if a.http_rate > 0.0 {
        for _ in 0..WEB_WORKERS {
            spawn(tokio::spawn(web(ctx.clone(), a.http_rate / WEB_WORKERS as f64)));
        }
    }
    if a.dial_rate > 0.0 {
        for _ in 0..DIAL_WORKERS {
            spawn(tokio::spawn(echo_dials(ctx.clone(), a.dial_rate / DIAL_WORKERS as f64, false)));
        }
    }
    if a.cut_rate > 0.0 {
        spawn(tokio::spawn(cuts(ctx.clone(), a.cut_rate, Cutter::Client)));
        spawn(tokio::spawn(cuts(ctx.clone(), a.cut_rate, Cutter::Service)));
    }
    if a.churn_rate > 0.0 && !a.churn_web.is_empty() {
        spawn(tokio::spawn(churn_web(ctx.clone(), a.churn_rate / 2.0)));
    }
    if a.churn_rate > 0.0 && !a.churn_echo.is_empty() {
        spawn(tokio::spawn(echo_dials(ctx.clone(), a.churn_rate / 2.0, true)));
    }
    if a.transfer_bytes > 0 {
        spawn(tokio::spawn(transfers(ctx.clone())));
    }
    for i in 0..a.inproc_agents {
        spawn(tokio::spawn(inproc_agent(ctx.clone(), i)));
    }
    workers
}

fn ticker(rate: f64) -> tokio::time::Interval {
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(0.001)));
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    ticker
}

/// `fut`, or an error naming `what` after `limit`.
async fn within<T, E: std::fmt::Display>(
    limit: Duration,
    what: &str,
    fut: impl Future<Output = Result<T, E>>,
) -> anyhow::Result<T> {
    match tokio::time::timeout(limit, fut).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(anyhow::anyhow!("{what}: {error}")),
        Err(_) => Err(anyhow::anyhow!("{what}: no answer in {}s", limit.as_secs())),
    }
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut fill = Fill::new(seed);
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        out.extend_from_slice(&fill.next_u64().to_le_bytes());
    }
    out.truncate(len);
    out
}

// ---------------------------------------------------------------- raw HTTP

/// A response head, and the body bytes that came with it.
struct Head {
    status: u16,
    length: Option<usize>,
    rest: Vec<u8>,
}

async fn read_head<R: AsyncRead + Unpin>(io: &mut R) -> anyhow::Result<Head> {
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = std::str::from_utf8(&buf[..end])?;
            let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
            let length = head.lines().find_map(|l| {
                let (name, value) = l.split_once(':')?;
                name.eq_ignore_ascii_case("content-length").then(|| value.trim().parse().ok())?
            });
            return Ok(Head { status, length, rest: buf[end + 4..].to_vec() });
        }
        anyhow::ensure!(buf.len() < 64 * 1024, "response head longer than 64 KiB");
        let n = io.read(&mut chunk).await?;
        anyhow::ensure!(n > 0, "connection closed before the response head ({} bytes)", buf.len());
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Reads body bytes until `limit` are in (counting `already`), the
/// connection ends, or [`OP`] passes; how many came.
async fn read_body<R: AsyncRead + Unpin>(io: &mut R, already: usize, limit: usize) -> anyhow::Result<usize> {
    let read = async {
        let mut got = already;
        let mut chunk = vec![0u8; 64 * 1024];
        while got < limit {
            match io.read(&mut chunk[..(limit - got).min(64 * 1024)]).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n,
            }
        }
        got
    };
    tokio::time::timeout(OP, read).await.map_err(|_| anyhow::anyhow!("the body stalled for {}s", OP.as_secs()))
}

fn get(path: &str, host: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: strait-soak\r\n\r\n").into_bytes()
}

/// `GET path` on a new connection to the published `host`: the connection
/// and the response head, which must be 200 with `Content-Length: length`.
async fn get_head(ctx: &Ctx, host: &str, path: &str, length: usize) -> anyhow::Result<(TlsStream<TcpStream>, Head)> {
    let mut tls = within(OP, "connecting", ctx.net.tls(host, true)).await?;
    tls.write_all(&get(path, host)).await?;
    let head = within(OP, &format!("GET {path} head"), read_head(&mut tls)).await?;
    anyhow::ensure!(
        head.status == 200 && head.length == Some(length),
        "GET {path}: {} with Content-Length {:?}",
        head.status,
        head.length
    );
    Ok((tls, head))
}

// ---------------------------------------------------------------- steady load

/// Published HTTP to the stable agent over keep-alive connections.
async fn web(ctx: Ctx, rate: f64) {
    let mut ticker = ticker(rate);
    loop {
        let Some(_unit) = ctx.gate.enter().await else { return };
        if let Err(error) = web_connection(&ctx, &mut ticker).await {
            ctx.stats.unexpected("web", format!("{error:#}"));
            ctx.gate.sleep(Duration::from_secs(1)).await;
        }
    }
}

async fn web_connection(ctx: &Ctx, ticker: &mut tokio::time::Interval) -> anyhow::Result<()> {
    let host = &ctx.args.web;
    let tls = within(OP, "connecting", ctx.net.tls(host, true)).await?;
    let (mut sender, connection) =
        within(OP, "HTTP handshake", hyper::client::conn::http1::handshake(TokioIo::new(tls))).await?;
    let driver = tokio::spawn(connection);
    let result = async {
        for _ in 0..RECYCLE {
            if ctx.gate.winding_down() {
                break;
            }
            ticker.tick().await;
            let request = hyper::Request::get("/").header("host", host.as_str()).body(Empty::<Bytes>::new())?;
            let exchange = async {
                let response = sender.send_request(request).await?;
                let status = response.status();
                let body = response.into_body().collect().await?.to_bytes();
                Ok::<_, hyper::Error>((status, body.len()))
            };
            let (status, len) = within(OP, "GET /", exchange).await?;
            anyhow::ensure!(status == 200 && len == SMALL_BYTES, "GET / answered {status} with {len} bytes");
            ctx.stats.add("web_ok");
        }
        Ok(())
    }
    .await;
    drop(sender);
    // The connection ends once its sender is gone.
    if tokio::time::timeout(OP, driver).await.is_err() {
        ctx.stats.unexpected("web", "the client connection did not close 30 s after its last request");
    }
    result
}

/// Private dials (echo round trips: a payload, the half-close, the same
/// payload back to the end) to the stable agent, where every failure is
/// unexpected, or to the killed agents, which fail while their agent is
/// down (the tunnel is not found, or the stream is cut) but never answer
/// wrong.
async fn echo_dials(ctx: Ctx, rate: f64, churned: bool) {
    let mut ticker = ticker(rate);
    let mut n = 0u64;
    let (key, ok) = if churned { ("churn_dial", "churn_dial_ok") } else { ("dial", "dial_ok") };
    loop {
        ticker.tick().await;
        let Some(_unit) = ctx.gate.enter().await else { return };
        n += 1;
        let (principal, name, size) = if churned {
            (Principal::Churn, &ctx.args.churn_echo[n as usize % ctx.args.churn_echo.len()], 4096)
        } else {
            (Principal::Stable, &ctx.args.echo, 1 + (n as usize * 7919) % (64 * 1024))
        };
        let payload = pattern(n, size);
        match echo_once(&ctx, principal, name, &payload).await {
            Ok(back) if back == payload => ctx.stats.add(ok),
            Ok(back) if churned && payload.starts_with(&back) => ctx.stats.add("churn_dial_failed"),
            Err(_) if churned => ctx.stats.add("churn_dial_failed"),
            Ok(back) => ctx
                .stats
                .unexpected(key, format!("{name}: {} bytes sent, {} other bytes came back", payload.len(), back.len())),
            Err(error) => ctx.stats.unexpected(key, format!("{error:#}")),
        }
    }
}

async fn echo_once(ctx: &Ctx, principal: Principal, tunnel: &str, payload: &[u8]) -> anyhow::Result<Vec<u8>> {
    let exchange = async {
        let mut stream = ctx.net.dial(principal, tunnel).await?;
        let (mut r, mut w) = tokio::io::split(&mut stream);
        let write = async {
            w.write_all(payload).await?;
            w.shutdown().await
        };
        let mut back = Vec::with_capacity(payload.len());
        let (wrote, read) = tokio::join!(write, r.read_to_end(&mut back));
        wrote?;
        read?;
        Ok::<_, anyhow::Error>(back)
    };
    within(OP, &format!("echo through {tunnel}"), exchange).await
}

// ---------------------------------------------------------------- cuts

/// Who cuts: the client leaves mid-flight, or the service does.
#[derive(Clone, Copy)]
enum Cutter {
    Client,
    Service,
}

/// Streams and requests cut mid-flight, one kind after another.
async fn cuts(ctx: Ctx, rate: f64, by: Cutter) {
    let mut ticker = ticker(rate);
    let mut n = 0u64;
    loop {
        ticker.tick().await;
        let Some(_unit) = ctx.gate.enter().await else { return };
        n += 1;
        let (key, result) = match (by, n % 4) {
            (Cutter::Client, 0) => ("cut_client_http_big", cut_big(&ctx, n).await),
            (Cutter::Client, 1) => ("cut_client_http_slow", cut_slow(&ctx).await),
            (Cutter::Client, 2) => ("cut_client_upload", cut_upload(&ctx).await),
            (Cutter::Client, _) => ("cut_client_dial", cut_dial(&ctx, n).await),
            (Cutter::Service, 0 | 2) => ("cut_service_http", cut_answer(&ctx).await),
            (Cutter::Service, _) => ("cut_service_dial", cut_echo(&ctx, n).await),
        };
        match result {
            Ok(()) => ctx.stats.add(key),
            Err(error) => ctx.stats.unexpected(key, format!("{error:#}")),
        }
    }
}

/// GET /big, read part of it, go.
async fn cut_big(ctx: &Ctx, n: u64) -> anyhow::Result<()> {
    let (mut tls, head) = get_head(ctx, &ctx.args.web, "/big", BIG_BYTES).await?;
    let want = 16 * 1024 + (n as usize * 104_729) % (BIG_BYTES / 2);
    let got = read_body(&mut tls, head.rest.len(), want).await?;
    anyhow::ensure!(got >= want, "GET /big ended after {got} bytes");
    Ok(()) // dropped here, mid-body
}

/// GET /slow, read its first chunk, go.
async fn cut_slow(ctx: &Ctx) -> anyhow::Result<()> {
    let (mut tls, head) = get_head(ctx, &ctx.args.web, "/slow", SLOW_BYTES).await?;
    anyhow::ensure!(read_body(&mut tls, head.rest.len(), 1).await? >= 1, "GET /slow sent no body");
    Ok(())
}

/// POST /upload announcing 4 MiB, send 64 KiB, go.
async fn cut_upload(ctx: &Ctx) -> anyhow::Result<()> {
    let host = &ctx.args.web;
    let mut tls = within(OP, "connecting", ctx.net.tls(host, true)).await?;
    let head = format!("POST /upload HTTP/1.1\r\nHost: {host}\r\nContent-Length: {}\r\n\r\n", 4 << 20);
    within(OP, "sending the upload", async {
        tls.write_all(head.as_bytes()).await?;
        tls.write_all(&[b'u'; 64 * 1024]).await?;
        tls.flush().await
    })
    .await?;
    Ok(())
}

/// A private dial that sends 1 MiB, reads 16 KiB of the echo, and goes.
async fn cut_dial(ctx: &Ctx, n: u64) -> anyhow::Result<()> {
    let payload = pattern(n, 1 << 20);
    let stream = within(OP, "dialling", ctx.net.dial(Principal::Stable, &ctx.args.echo)).await?;
    let (mut r, mut w) = tokio::io::split(stream);
    let sent = payload.clone();
    let writer = tokio::spawn(async move {
        let _ = w.write_all(&sent).await;
        w
    });
    let mut back = vec![0u8; 16 * 1024];
    let read = within(OP, "reading the echo", r.read_exact(&mut back)).await;
    writer.abort();
    read?;
    anyhow::ensure!(back[..] == payload[..back.len()], "the echo differs from what was sent");
    Ok(()) // both halves dropped here, the rest in flight
}

/// GET /cut: the head and part of the body arrive, then the connection
/// must end (the engine cannot say more in HTTP/1.1), not hang, and never
/// look complete.
async fn cut_answer(ctx: &Ctx) -> anyhow::Result<()> {
    let (mut tls, head) = get_head(ctx, &ctx.args.web, "/cut", CUT_BYTES).await?;
    let got = read_body(&mut tls, head.rest.len(), CUT_BYTES).await.map_err(|e| e.context("GET /cut"))?;
    anyhow::ensure!(got < CUT_BYTES, "GET /cut arrived whole though the service cut it");
    Ok(())
}

/// A private dial to the echo that resets: what comes back is a prefix of
/// what went, and the stream ends.
async fn cut_echo(ctx: &Ctx, n: u64) -> anyhow::Result<()> {
    let payload = pattern(n, 256 * 1024);
    let mut stream = within(OP, "dialling", ctx.net.dial(Principal::Stable, &ctx.args.cut)).await?;
    let (mut r, mut w) = tokio::io::split(&mut stream);
    let mut back = Vec::new();
    let exchange = async {
        let write = async {
            let _ = w.write_all(&payload).await;
        };
        let read = async {
            let _ = r.read_to_end(&mut back).await;
        };
        tokio::join!(write, read);
        Ok::<_, std::io::Error>(())
    };
    within(OP, "the cut stream to end", exchange).await?;
    anyhow::ensure!(back.len() < payload.len(), "the whole payload came back though the service cut it");
    anyhow::ensure!(back[..] == payload[..back.len()], "what came back is not what was sent");
    Ok(())
}

// ---------------------------------------------------------------- the killed agents

/// GET /slow (1.6 s) to the killed agents' published tunnels: an agent
/// killed mid-answer cuts it. 200, 502, 503 and 504 are what a client may
/// meet; 404 would mean the hostname was not held for its owner.
async fn churn_web(ctx: Ctx, rate: f64) {
    let mut ticker = ticker(rate);
    let in_flight = Arc::new(Semaphore::new(CHURN_IN_FLIGHT));
    let mut n = 0usize;
    loop {
        ticker.tick().await;
        let Ok(permit) = in_flight.clone().acquire_owned().await else { return };
        let Some(unit) = ctx.gate.enter().await else { return };
        n += 1;
        let host = ctx.args.churn_web[n % ctx.args.churn_web.len()].clone();
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let _held = (unit, permit);
            let key = match churn_request(&ctx, &host).await {
                Ok(key) => key,
                Err(error) => {
                    ctx.stats.unexpected("churn_web", format!("{host}: {error:#}"));
                    return;
                }
            };
            ctx.stats.add(key);
        });
    }
}

async fn churn_request(ctx: &Ctx, host: &str) -> anyhow::Result<&'static str> {
    let Ok(mut tls) = within(OP, "connecting", ctx.net.tls(host, true)).await else {
        return Ok("churn_web_no_connection");
    };
    if tls.write_all(&get("/slow", host)).await.is_err() {
        return Ok("churn_web_no_connection");
    }
    let head = match tokio::time::timeout(OP, read_head(&mut tls)).await {
        Err(_) => anyhow::bail!("no response head in 30 s"),
        Ok(Err(_)) => return Ok("churn_web_closed_before_head"),
        Ok(Ok(head)) => head,
    };
    match head.status {
        200 => {}
        502 => return Ok("churn_web_502"),
        503 => return Ok("churn_web_503"),
        504 => return Ok("churn_web_504"),
        other => anyhow::bail!("answered {other}"),
    }
    let Some(length) = head.length else { anyhow::bail!("200 without Content-Length") };
    anyhow::ensure!(length == SLOW_BYTES, "200 with Content-Length {length}");
    let got = read_body(&mut tls, head.rest.len(), length).await?;
    Ok(if got == length { "churn_web_ok" } else { "churn_web_cut" })
}

// ---------------------------------------------------------------- transfers

/// Checksummed transfers, one at a time, rotating over upload and
/// download, private dial and published TLS tunnel.
async fn transfers(ctx: Ctx) {
    let every = Duration::from_secs_f64(ctx.args.transfer_every.max(0.1));
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let bytes = ctx.args.transfer_bytes;
    // At least 2 MB/s: a tunnel slower than that on loopback is broken.
    let limit = Duration::from_secs((bytes / 2_000_000).max(120));
    let mut n = 0u64;
    loop {
        ticker.tick().await;
        let Some(_unit) = ctx.gate.enter().await else { return };
        n += 1;
        let direction = if n % 2 == 1 { Direction::Up } else { Direction::Down };
        let route = if (n / 2).is_multiple_of(2) { "private" } else { "published-tls" };
        let done = async {
            if route == "private" {
                let stream = ctx.net.dial(Principal::Stable, &ctx.args.blob).await?;
                blob::transfer(stream, direction, bytes, n).await
            } else {
                let tls = ctx.net.tls(&ctx.args.blob_tls, false).await?;
                blob::transfer(tls, direction, bytes, n).await
            }
        };
        match tokio::time::timeout(limit, done).await {
            Ok(Ok(outcome)) => {
                crate::report(json!({
                    "event": "transfer", "route": route, "direction": direction.name(), "bytes": outcome.bytes,
                    "seconds": outcome.seconds, "matched": outcome.matched,
                    "client_sha256": outcome.client_sha256, "service_sha256": outcome.service_sha256,
                }));
                if outcome.matched {
                    ctx.stats.add("transfer_ok");
                    ctx.stats.add_n("transfer_bytes", outcome.bytes);
                } else {
                    ctx.stats.unexpected(
                        "transfer_mismatch",
                        format!(
                            "{route} {}: sha256 {} here, {} at the service",
                            direction.name(),
                            outcome.client_sha256,
                            outcome.service_sha256
                        ),
                    );
                }
            }
            Ok(Err(error)) => {
                ctx.stats.unexpected("transfer_error", format!("{route} {}: {error:#}", direction.name()))
            }
            Err(_) => ctx.stats.unexpected(
                "transfer_error",
                format!("{route} {}: not done in {}s", direction.name(), limit.as_secs()),
            ),
        }
    }
}

// ---------------------------------------------------------------- in-process agents

/// One in-process agent: connects, opens its tunnel (the same hostname or
/// name every time), proves a stream through it, lives a little, then
/// closes cleanly or just drops its connection; again.
async fn inproc_agent(ctx: Ctx, i: usize) {
    let mut cycle = 0u64;
    loop {
        let Some(_unit) = ctx.gate.enter().await else { return };
        cycle += 1;
        if let Err(error) = inproc_cycle(&ctx, i, cycle).await {
            ctx.stats.unexpected("inproc", format!("agent {i}: {error:#}"));
            ctx.gate.sleep(Duration::from_secs(1)).await;
        }
    }
}

async fn inproc_cycle(ctx: &Ctx, i: usize, cycle: u64) -> anyhow::Result<()> {
    let published = i.is_multiple_of(2);
    let label = format!("soak-inproc-{i}");
    let properties = if published {
        TunnelProperties {
            publish: Some(true),
            protocol: Some("http".into()),
            hostname: Some(label.clone()),
            ..Default::default()
        }
    } else {
        TunnelProperties { publish: Some(false), name: Some(label.clone()), ..Default::default() }
    };
    let client = ctx.net.client(Principal::Inproc).clone();
    let control = within(OP, "opening the control channel", client.connect()).await?;
    let started = tokio::time::Instant::now();
    let mut tunnel = loop {
        match within(OP, "opening the tunnel", control.open_tunnel(properties.clone())).await {
            Ok(tunnel) => break tunnel,
            // The previous connection's drop may not have reached the
            // engine yet: its tunnel still holds the name.
            Err(error) if error.to_string().contains("already") && started.elapsed() < REOPEN_FOR => {
                ctx.stats.add("inproc_reopen_retries");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(error) => return Err(error),
        }
    };
    let local = if published { ctx.args.service_http.clone() } else { ctx.args.service_echo.clone() };
    let host = tunnel.properties().hostname.clone();
    let serving = tokio::spawn(async move {
        while let Some(stream) = tunnel.accept().await {
            tokio::spawn(strait_agent::forward_stream(stream, local.clone()));
        }
    });
    let proved = async {
        if published {
            let host = host.ok_or_else(|| anyhow::anyhow!("a published tunnel without a hostname"))?;
            anyhow::ensure!(host.starts_with(&label), "asked for {label}, got {host}");
            let mut tls = within(OP, "connecting", ctx.net.tls(&host, true)).await?;
            tls.write_all(format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes()).await?;
            let head = within(OP, "GET / head", read_head(&mut tls)).await?;
            anyhow::ensure!(head.status == 200, "GET / through {host} answered {}", head.status);
        } else {
            let payload = pattern(cycle, 1024);
            let back = echo_once(ctx, Principal::Inproc, &label, &payload).await?;
            anyhow::ensure!(back == payload, "echo through {label} differs");
        }
        Ok(())
    }
    .await;
    ctx.gate.sleep(Duration::from_millis(200 + (cycle * 7919 + i as u64 * 104_729) % 1800)).await;
    if cycle.is_multiple_of(2) {
        within(Duration::from_secs(5), "closing the control channel", control.close()).await?;
        ctx.stats.add("inproc_clean_close");
    } else {
        drop(control);
        ctx.stats.add("inproc_vanished");
    }
    let _ = tokio::time::timeout(OP, serving).await;
    proved?;
    ctx.stats.add("inproc_cycles");
    Ok(())
}

//! The HTTP measurements: new-connection latency and keep-alive requests
//! per second; the latency also with one echoed byte; and many clients
//! fetching one object at once (the edge cache's coalesced miss).

use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::target::Target;

/// One full exchange on a new connection: connect (and TLS handshake),
/// request, whole reply read, close.
async fn one_exchange(target: &Target, request: &[u8], buf: &mut Vec<u8>) -> anyhow::Result<()> {
    let mut conn = target.connect().await?;
    conn.write_all(request).await?;
    buf.clear();
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = std::str::from_utf8(&buf[..end]).context("reply head is not UTF-8")?;
            anyhow::ensure!(head.starts_with("HTTP/1.1 200"), "reply: {}", head.lines().next().unwrap_or(""));
            let length: usize = head
                .lines()
                .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_string()))
                .context("no content-length")?
                .parse()?;
            if buf.len() >= end + 4 + length {
                return Ok(());
            }
        }
        let mut chunk = [0u8; 4096];
        let n = conn.read(&mut chunk).await?;
        anyhow::ensure!(n > 0, "connection closed before the whole reply");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// One byte to an echo service on a new connection, and back: the time
/// from the dial to the first echoed byte.
async fn one_echo(target: &Target) -> anyhow::Result<()> {
    let mut conn = target.connect().await?;
    conn.write_all(b"x").await?;
    let mut byte = [0u8; 1];
    conn.read_exact(&mut byte).await?;
    anyhow::ensure!(&byte == b"x", "echoed {byte:?}");
    Ok(())
}

pub async fn latency(target: Target, count: usize, warmup: usize, echo: bool) -> anyhow::Result<()> {
    let request = format!("GET / HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n", target.host).into_bytes();
    let mut buf = Vec::with_capacity(4096);
    let mut errors = 0usize;
    let mut first_error = None;
    let mut exchange = async || {
        if echo { one_echo(&target).await } else { one_exchange(&target, &request, &mut buf).await }
    };
    for _ in 0..warmup {
        let _ = exchange().await;
    }
    let mut samples = Vec::with_capacity(count);
    let started = Instant::now();
    for _ in 0..count {
        let t = Instant::now();
        match exchange().await {
            Ok(()) => samples.push(t.elapsed().as_secs_f64() * 1e6),
            Err(error) => {
                errors += 1;
                first_error.get_or_insert_with(|| format!("{error:#}"));
            }
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    samples.sort_by(f64::total_cmp);
    let pct = |p: f64| samples.get(((samples.len() as f64 - 1.0) * p).round() as usize).copied();
    crate::report(json!({
        "count": samples.len(), "errors": errors, "first_error": first_error,
        "p50_us": pct(0.50), "p90_us": pct(0.90), "p99_us": pct(0.99), "max_us": samples.last(),
        "per_second": samples.len() as f64 / elapsed,
    }));
    anyhow::ensure!(!samples.is_empty(), "no exchange succeeded: {}", first_error.unwrap_or_default());
    Ok(())
}

pub async fn http(target: Target, path: String, connections: usize, duration: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + duration;
    let started = Instant::now();
    let mut workers = Vec::with_capacity(connections);
    for _ in 0..connections {
        let (target, path) = (target.clone(), path.clone());
        workers.push(tokio::spawn(async move { keep_alive_worker(target, path, deadline).await }));
    }
    let (mut done, mut errors, mut first_error) = (0u64, 0u64, None);
    for worker in workers {
        match worker.await? {
            Ok(n) => done += n,
            Err((n, error)) => {
                done += n;
                errors += 1;
                first_error.get_or_insert(error);
            }
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    crate::report(json!({
        "requests": done, "errors": errors, "first_error": first_error,
        "seconds": elapsed, "per_second": done as f64 / elapsed, "connections": connections,
    }));
    anyhow::ensure!(done > 0, "no request succeeded");
    Ok(())
}

/// Requests back to back on one connection until the deadline; the count,
/// or the count and the error that ended the connection.
async fn keep_alive_worker(target: Target, path: String, deadline: Instant) -> Result<u64, (u64, String)> {
    let conn = target.connect().await.map_err(|e| (0, e.to_string()))?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(conn)).await.map_err(|e| (0, e.to_string()))?;
    tokio::spawn(connection);
    let mut done = 0;
    while Instant::now() < deadline {
        let request = hyper::Request::get(&path).header("host", &target.host).body(Empty::<Bytes>::new()).unwrap();
        let exchange = async {
            let response = sender.send_request(request).await?;
            let status = response.status();
            response.into_body().collect().await?;
            Ok::<_, hyper::Error>(status)
        };
        match exchange.await {
            Ok(status) if status.is_success() => done += 1,
            Ok(status) => return Err((done, format!("status {status}"))),
            Err(error) => return Err((done, error.to_string())),
        }
    }
    Ok(done)
}

/// COUNT clients, each on its own connection (connected and handshaken
/// first), send `GET PATH` at the same moment and read the whole body.
/// Reports the time until the last client has its last byte, and how many
/// answers carried each value of the `status_header` (a cache's
/// HIT/MISS header), if given.
pub async fn fetch_many(
    target: Target,
    path: String,
    count: usize,
    status_header: Option<String>,
) -> anyhow::Result<()> {
    let start = std::sync::Arc::new(tokio::sync::Barrier::new(count + 1));
    let mut clients = Vec::with_capacity(count);
    for _ in 0..count {
        let conn = target.connect().await.context("connecting")?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(conn)).await?;
        tokio::spawn(connection);
        let request = hyper::Request::get(&path).header("host", &target.host).body(Empty::<Bytes>::new())?;
        let (start, header) = (start.clone(), status_header.clone());
        clients.push(tokio::spawn(async move {
            start.wait().await;
            let t = Instant::now();
            let response = sender.send_request(request).await.map_err(|e| e.to_string())?;
            if !response.status().is_success() {
                return Err(format!("status {}", response.status()));
            }
            let status = header.and_then(|h| response.headers().get(h)).map(|v| v.to_str().unwrap_or("?").to_string());
            let want: Option<u64> =
                response.headers().get("content-length").and_then(|v| v.to_str().ok()?.parse().ok());
            let mut body = response.into_body();
            let mut got = 0u64;
            while let Some(frame) = body.frame().await {
                got += frame.map_err(|e| e.to_string())?.data_ref().map_or(0, |d| d.len() as u64);
            }
            if want.is_some_and(|w| w != got) {
                return Err(format!("{got} of {} bytes", want.unwrap_or(0)));
            }
            Ok::<_, String>((t.elapsed().as_secs_f64(), got, status))
        }));
    }
    start.wait().await;
    let (mut times, mut bytes, mut errors, mut first_error) = (Vec::new(), 0u64, 0u64, None);
    let mut statuses = std::collections::BTreeMap::<String, u64>::new();
    for client in clients {
        match client.await? {
            Ok((seconds, got, status)) => {
                times.push(seconds);
                bytes += got;
                if let Some(status) = status {
                    *statuses.entry(status).or_default() += 1;
                }
            }
            Err(error) => {
                errors += 1;
                first_error.get_or_insert(error);
            }
        }
    }
    times.sort_by(f64::total_cmp);
    crate::report(json!({
        "clients": times.len(), "errors": errors, "first_error": first_error, "bytes": bytes,
        "seconds": times.last(), "first_seconds": times.first(), "statuses": statuses,
    }));
    anyhow::ensure!(errors == 0, "{errors} clients failed, first: {}", first_error.unwrap_or_default());
    Ok(())
}

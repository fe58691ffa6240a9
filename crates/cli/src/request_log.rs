//! The live request log of `strait forward` for HTTP tunnels: each agent
//! stream is served as HTTP/1.1 and relayed to the local service over one
//! upstream connection, so every request can be shown as one line (method,
//! path, status, time) while bytes still flow untouched: header case is
//! preserved both ways, bodies stream, and upgrades (WebSocket) are spliced.
//!
//! It is used only where a line per request helps (a terminal, or
//! `--log-requests`); otherwise streams are spliced raw. Published tcp and
//! udp tunnels log a [`session_line`] per connection or session instead.

use std::io::Write;
use std::time::Instant;

use http::{Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::client::conn::http1 as client;
use hyper::server::conn::http1 as server;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::Mutex;

type Body = BoxBody<Bytes, hyper::Error>;

/// Serves one agent stream, relaying each request to `local`.
pub async fn serve<S>(stream: S, local: String)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // One upstream connection per agent stream, opened on the first request:
    // the engine already reuses agent streams across a client's requests.
    let upstream: std::sync::Arc<Mutex<Option<client::SendRequest<Incoming>>>> = Default::default();
    let service = service_fn(move |request: Request<Incoming>| {
        let upstream = upstream.clone();
        let local = local.clone();
        async move { Ok::<_, hyper::Error>(relay(request, &upstream, &local).await) }
    });
    let connection = server::Builder::new()
        .preserve_header_case(true)
        .title_case_headers(false)
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    if let Err(error) = connection.await {
        tracing::debug!(%error, "request-log stream ended with an error");
    }
}

async fn connect(local: &str) -> std::io::Result<client::SendRequest<Incoming>> {
    let tcp = TcpStream::connect(local).await?;
    let _ = tcp.set_nodelay(true);
    let (sender, connection) = client::Builder::new()
        .preserve_header_case(true)
        .title_case_headers(false)
        .handshake(TokioIo::new(tcp))
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(async move {
        let _ = connection.with_upgrades().await;
    });
    Ok(sender)
}

async fn relay(
    mut request: Request<Incoming>,
    upstream: &Mutex<Option<client::SendRequest<Incoming>>>,
    local: &str,
) -> Response<Body> {
    let started = Instant::now();
    let method = request.method().clone();
    let target = request.uri().path_and_query().map_or_else(|| "/".to_string(), |p| p.to_string());
    let downstream_upgrade = hyper::upgrade::on(&mut request);

    let mut slot = upstream.lock().await;
    let reusable = slot.as_mut().is_some_and(|s| !s.is_closed());
    if !reusable {
        match connect(local).await {
            Ok(sender) => *slot = Some(sender),
            Err(error) => {
                drop(slot);
                print_line(&method, &target, Err(&format!("cannot reach {local}: {error}")), started);
                return bad_gateway();
            }
        }
    }
    let sender = slot.as_mut().expect("just connected");
    let sent = match sender.ready().await {
        Ok(()) => sender.send_request(request).await,
        Err(error) => Err(error),
    };
    drop(slot);
    let mut response = match sent {
        Ok(response) => response,
        Err(error) => {
            print_line(&method, &target, Err(&format!("{local} failed: {error}")), started);
            return bad_gateway();
        }
    };
    print_line(&method, &target, Ok(response.status()), started);
    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        let upstream_upgrade = hyper::upgrade::on(&mut response);
        tokio::spawn(async move {
            if let (Ok(down), Ok(up)) = (downstream_upgrade.await, upstream_upgrade.await) {
                let _ = strait_proto::splice::splice(&mut TokioIo::new(down), &mut TokioIo::new(up)).await;
            }
        });
    }
    response.map(|body| body.boxed())
}

/// The public side learns only that the service did not answer: what
/// failed (a local address, an OS error) is this machine's business and is
/// printed on the agent's screen instead.
fn bad_gateway() -> Response<Body> {
    let body = Full::new(Bytes::from_static(b"the tunnel's local service did not answer\n"));
    Response::builder()
        .status(StatusCode::BAD_GATEWAY)
        .header(http::header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(body.map_err(|never| match never {}).boxed())
        .expect("static response parts are valid")
}

/// One line per request: `GET /path 200 12ms`, or `GET /path 502 0ms
/// (cannot reach 127.0.0.1:3000: ...)` when the local service could not
/// answer. Time is to the response head: a long download or a WebSocket is
/// logged when it starts.
fn print_line(method: &http::Method, target: &str, status: Result<StatusCode, &str>, started: Instant) {
    let millis = started.elapsed().as_secs_f64() * 1000.0;
    let mut out = std::io::stdout().lock();
    let _ = match status {
        Ok(status) => writeln!(out, "{method} {target} {} {millis:.0}ms", status.as_u16()),
        Err(why) => writeln!(out, "{method} {target} 502 {millis:.0}ms ({why})"),
    };
    let _ = out.flush();
}

/// The line a published tcp connection or udp session leaves when it ends:
/// `tcp 203.0.113.7 in 1.2 KiB out 38.0 KiB 2.4s`.
pub fn session_line(
    protocol: &str,
    source: &str,
    carried: &strait_agent::Carried,
    took: std::time::Duration,
) -> String {
    let packets = |n: u64| if protocol == "udp" { format!(" ({n} packets)") } else { String::new() };
    format!(
        "{protocol} {source} in {}{} out {}{} {:.1}s",
        human_bytes(carried.to_local),
        packets(carried.packets_to_local),
        human_bytes(carried.from_local),
        packets(carried.packets_from_local),
        took.as_secs_f64()
    )
}

fn human_bytes(n: u64) -> String {
    match n {
        0..1024 => format!("{n} B"),
        1024..1_048_576 => format!("{:.1} KiB", n as f64 / 1024.0),
        1_048_576..1_073_741_824 => format!("{:.1} MiB", n as f64 / 1_048_576.0),
        _ => format!("{:.2} GiB", n as f64 / 1_073_741_824.0),
    }
}

#[cfg(test)]
mod session_tests {
    use super::*;

    #[test]
    fn session_lines_say_who_how_much_and_how_long() {
        let carried =
            strait_agent::Carried { to_local: 1200, from_local: 3 << 20, packets_to_local: 4, packets_from_local: 5 };
        let took = std::time::Duration::from_millis(2400);
        assert_eq!(session_line("tcp", "203.0.113.7", &carried, took), "tcp 203.0.113.7 in 1.2 KiB out 3.0 MiB 2.4s");
        assert_eq!(
            session_line("udp", "::1", &carried, took),
            "udp ::1 in 1.2 KiB (4 packets) out 3.0 MiB (5 packets) 2.4s"
        );
    }
}

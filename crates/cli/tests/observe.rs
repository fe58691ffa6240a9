//! `strait` on published tunnels and the Engine API: `forward` reached from
//! outside (HTTP by curl, TLS by a TLS client), the request log, `tunnels`,
//! `clients` and `events` over both transports.

mod common;

use std::net::SocketAddr;
use std::process::Stdio;

use common::{Running, Strait, TestEngine, output};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::process::Command;

/// A tiny HTTP/1.1 service answering every request with its method and path.
async fn http_service() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    // One request at a time: read to the end of the head (no bodies here).
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match tcp.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                    let head = String::from_utf8_lossy(&buf[..end]).to_string();
                    buf.drain(..end);
                    let line = head.lines().next().unwrap_or_default().to_string();
                    let status = if line.contains("/missing") { "404 Not Found" } else { "200 OK" };
                    let body = format!("you asked for {line}\n");
                    let response = format!(
                        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nX-Served-By: stand-in\r\n\r\n{body}",
                        body.len()
                    );
                    if tcp.write_all(response.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

async fn curl(engine: &TestEngine, url: &str, extra: &[&str]) -> std::process::Output {
    let host = url.trim_start_matches("https://").split('/').next().unwrap().to_string();
    let resolve = format!("{host}:127.0.0.1");
    // curl's own limit first; `output` bounds the wait in any case.
    output(
        Command::new("curl")
            .args(["-sS", "--max-time", "30", "--cacert"])
            .arg(engine.ca())
            .args(["--resolve", &resolve])
            .args(extra)
            .arg(url),
    )
    .await
}

/// Starts `strait forward` and returns it with its public URL.
async fn forward(engine: &TestEngine, args: &[&str]) -> (Running, String) {
    let mut cmd = engine.strait("alice");
    cmd.arg("forward").args(args);
    let mut running = Running::spawn(cmd);
    let line = running.line().await;
    let url = line
        .strip_prefix("Forwarding ")
        .and_then(|rest| rest.split(" -> ").next())
        .unwrap_or_else(|| panic!("unexpected: {line}"))
        .to_string();
    (running, url)
}

#[tokio::test]
async fn forward_publishes_http_reached_by_curl_with_a_request_log() {
    let engine = TestEngine::start().await;
    let service = http_service().await;
    let (mut running, url) = forward(&engine, &[&service.to_string(), "--request-log", "on"]).await;
    assert!(url.starts_with("https://") && url.contains(".t.localhost:"), "{url}");

    let out = curl(&engine, &format!("{url}/hello?x=1"), &["-i"]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("HTTP/1.1 200") || text.starts_with("HTTP/2 200"), "{text}");
    assert!(text.contains("you asked for GET /hello?x=1 HTTP/1.1"), "{text}");
    let out = curl(&engine, &format!("{url}/missing"), &["-o", "/dev/null", "-w", "%{http_code}"]).await;
    assert_eq!(String::from_utf8_lossy(&out.stdout), "404");

    // One line per request, in order.
    let first = running.line().await;
    assert!(first.starts_with("GET /hello?x=1 200 "), "{first}");
    let second = running.line().await;
    assert!(second.starts_with("GET /missing 404 "), "{second}");
    running.interrupt().await;
}

#[tokio::test]
async fn a_dead_local_service_is_a_generic_502_outside_and_a_reason_on_the_agents_screen() {
    let engine = TestEngine::start().await;
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let (mut running, url) = forward(&engine, &[&closed.to_string(), "--request-log", "on"]).await;
    let out = curl(&engine, &format!("{url}/x"), &["-i"]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("HTTP/1.1 502") || text.starts_with("HTTP/2 502"), "{text}");
    let port = closed.port().to_string();
    assert!(!text.contains(&port) && !text.contains("127.0.0.1") && !text.contains("refused"), "{text}");
    let line = running.line().await;
    assert!(line.starts_with("GET /x 502 ") && line.contains(&format!("cannot reach {closed}")), "{line}");
    running.interrupt().await;
}

#[tokio::test]
async fn forward_keeps_its_hostname_across_an_engine_restart() {
    let mut engine = TestEngine::start().await;
    let service = http_service().await;
    let (mut running, url) = forward(&engine, &[&service.to_string()]).await;
    engine.restart().await;
    running.stderr_until("reconnected").await;
    let out = curl(&engine, &format!("{url}/again"), &[]).await;
    assert!(String::from_utf8_lossy(&out.stdout).contains("GET /again"), "{out:?}");
    running.interrupt().await;
}

#[tokio::test]
async fn forward_publishes_a_terminated_tls_tunnel() {
    let engine = TestEngine::start().await;
    let echo = common::echo_server().await;
    let (running, url) = forward(&engine, &[&echo.to_string(), "--protocol", "tls"]).await;
    let host_port = url.strip_prefix("tls://").expect("a tls:// address").to_string();
    let host = host_port.split(':').next().unwrap().to_string();
    // openssl s_client as an operator would reach it: SNI set, engine CA trusted.
    let mut child = Command::new("openssl")
        .args(["s_client", "-quiet", "-verify_return_error", "-connect"])
        .arg(format!("127.0.0.1:{}", engine.addr.port()))
        .args(["-servername", &host, "-CAfile"])
        .arg(engine.ca())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("openssl runs (scripts/test.sh installs it)");
    let mut stdin = child.stdin.take().unwrap();
    let mut back = vec![0u8; 12];
    let echo = async {
        stdin.write_all(b"through tls\n").await.unwrap();
        child.stdout.take().unwrap().read_exact(&mut back).await.unwrap();
    };
    tokio::time::timeout(common::DEADLINE, echo).await.expect("an echo through openssl in time");
    assert_eq!(back, b"through tls\n");
    drop(stdin);
    running.interrupt().await;
}

#[tokio::test]
async fn tunnels_and_clients_tables() {
    let engine = TestEngine::start().await;
    let echo = common::echo_server().await;
    let (running, _) =
        forward(&engine, &[&echo.to_string(), "--private", "--name", "db", "--label", "team=core"]).await;

    let out = output(engine.strait_admin("ops").arg("tunnels")).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("ID"), "{text}");
    assert_eq!(lines.len(), 2, "{text}");
    assert!(lines[1].contains(" db ") && lines[1].contains("online") && lines[1].contains("team=core"), "{text}");

    let filtered = output(engine.strait_admin("ops").args([
        "tunnels",
        "--json",
        "--params",
        r#"{"filters":{"labels":{"team":"other"}}}"#,
    ]))
    .await;
    let items: serde_json::Value = serde_json::from_slice(&filtered.stdout).unwrap();
    assert_eq!(items.as_array().unwrap().len(), 0);

    let out = output(engine.strait_admin("ops").arg("clients")).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.lines().nth(1).is_some_and(|l| l.contains("alice") && l.contains("strait")), "{text}");

    let refused = output(engine.strait_admin("ops").env("RSTREAM_AUTHENTICATION_TOKEN", "bad").arg("tunnels")).await;
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("401"), "{refused:?}");
    running.interrupt().await;
}

async fn events_see_lifecycle(transport: &str) {
    let engine = TestEngine::start().await;
    let mut cmd = engine.strait_admin("ops");
    cmd.args(["events", "--transport", transport]);
    let mut events = Running::spawn(cmd);
    let initial: serde_json::Value = serde_json::from_str(&events.line().await).unwrap();
    assert_eq!(initial["type"], "state.initial");

    let echo = common::echo_server().await;
    let (running, _) = forward(&engine, &[&echo.to_string(), "--private", "--name", "watched"]).await;
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let event: serde_json::Value = serde_json::from_str(&events.line().await).unwrap();
        seen.push(event["type"].as_str().unwrap().to_string());
        if event["type"] == "tunnel.created" {
            assert_eq!(event["object"]["name"], "watched");
        }
    }
    assert_eq!(seen, ["client.created", "tunnel.created"]);
    running.interrupt().await;
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let event: serde_json::Value = serde_json::from_str(&events.line().await).unwrap();
        seen.push(event["type"].as_str().unwrap().to_string());
    }
    assert_eq!(seen, ["tunnel.deleted", "client.deleted"]);
    events.interrupt().await;
}

#[tokio::test]
async fn events_over_sse() {
    events_see_lifecycle("sse").await;
}

#[tokio::test]
async fn events_over_websocket() {
    events_see_lifecycle("websocket").await;
}

#[tokio::test]
async fn events_filtered_by_type() {
    let engine = TestEngine::start().await;
    let mut cmd = engine.strait_admin("ops");
    cmd.args(["events", "--events", "state.initial,tunnel.deleted"]);
    let mut events = Running::spawn(cmd);
    // The snapshot proves the feed is up before anything happens.
    let initial: serde_json::Value = serde_json::from_str(&events.line().await).unwrap();
    assert_eq!(initial["type"], "state.initial");
    let echo = common::echo_server().await;
    let (running, _) = forward(&engine, &[&echo.to_string(), "--private", "--name", "brief"]).await;
    running.interrupt().await;
    let event: serde_json::Value = serde_json::from_str(&events.line().await).unwrap();
    assert_eq!(event["type"], "tunnel.deleted");
    events.interrupt().await;
}

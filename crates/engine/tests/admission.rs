//! Admission on the TLS port: one source cannot starve the others. A flood
//! of idle sockets, a burst of connections or a run of bad tokens from one
//! loopback address is refused at once, while another address keeps being
//! served within normal latency.

mod common;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use http::{Request, StatusCode, header};
use http_body_util::BodyExt;
use rustls::pki_types::ServerName;
use strait_agent::TunnelProperties;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

const FLOOD: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2));
const OTHER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 3));

/// What "served within normal latency" allows, far below the handshake
/// timeout (10 s) that parked connections used to wait.
const PROMPT: Duration = Duration::from_secs(3);

/// Whether the engine closes `tcp` promptly (refused) rather than waiting
/// for a ClientHello that never comes.
async fn closed_promptly(tcp: &mut TcpStream) -> bool {
    let mut byte = [0u8; 1];
    matches!(tokio::time::timeout(PROMPT, tcp.read(&mut byte)).await, Ok(Ok(0)) | Ok(Err(_)))
}

fn refused(engine: &TestEngine, reason: &'static str) -> u64 {
    engine.engine.shared.metrics.connections_refused(reason)
}

/// `GET /healthz` on the Engine API from `from`, on a fresh connection.
async fn healthz_from(engine: &TestEngine, from: IpAddr) -> Result<u16, String> {
    let tcp = engine.public_tcp(from).await;
    let connector = tokio_rustls::TlsConnector::from(engine.public_tls_config(&[b"http/1.1"]));
    let tls =
        connector.connect(ServerName::try_from("localhost").unwrap(), tcp).await.map_err(|e| format!("TLS: {e}"))?;
    let (status, _, _) = http_request(tls, "/healthz", None).await;
    Ok(status)
}

#[tokio::test]
async fn idle_sockets_from_one_source_do_not_stall_the_others() {
    let engine = TestEngine::start_with("limits: {max_connections: 50, handshakes_per_source: 8}\n").await;
    let local = http_service(Arc::new(|_req| Box::pin(async { http::Response::new(full("served")) }))).await;
    let (_control, _) = publish(&engine, published("app"), local).await;

    // 60 sockets from one address that never say a word.
    let mut flood = Vec::new();
    for _ in 0..60 {
        flood.push(engine.public_tcp(FLOOD).await);
    }
    // Every socket is watched at once; the refused ones close within PROMPT
    // and the test goes on as soon as 52 have, without waiting out the rest.
    let mut watching: futures_util::stream::FuturesUnordered<_> =
        flood.iter_mut().map(|tcp| async move { closed_promptly(tcp).await }).collect();
    let mut closed = 0;
    while closed < 52 {
        match futures_util::StreamExt::next(&mut watching).await {
            Some(true) => closed += 1,
            Some(false) | None => break,
        }
    }
    drop(watching);
    assert_eq!(closed, 52, "all but handshakes_per_source were refused at once");
    assert_eq!(refused(&engine, "handshakes_per_source"), 52);

    // Meanwhile 127.0.0.1 is served: the API, a published request, an
    // agent and a private dial, each well within PROMPT.
    let started = Instant::now();
    tokio::time::timeout(PROMPT, async {
        assert_eq!(healthz_from(&engine, "127.0.0.1".parse().unwrap()).await, Ok(200));
        let mut h1 = engine.h1("app.t.localhost").await;
        let request = Request::get("/").header(header::HOST, "app.t.localhost").body(full("")).unwrap();
        let response = h1.send_request(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(&response.into_body().collect().await.unwrap().to_bytes()[..], b"served");
        let echo = echo_server().await;
        let control = engine.client("bob").connect().await.unwrap();
        let props = TunnelProperties { name: Some("db".into()), ..Default::default() };
        let mut tunnel = control.open_tunnel(props).await.unwrap();
        tokio::spawn(async move { tunnel.forward(echo.to_string()).await });
        let mut stream = engine.client("bob").dial("db").await.unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut stream, b"ping").await.unwrap();
        let mut back = [0u8; 4];
        stream.read_exact(&mut back).await.unwrap();
    })
    .await
    .expect("another source is served while the flood holds its sockets");
    println!("served 127.0.0.1 in {:?} during the flood", started.elapsed());
    // And a third address too, over its own connection.
    assert_eq!(healthz_from(&engine, OTHER).await, Ok(200));
}

#[tokio::test]
async fn past_max_connections_a_connection_is_refused_at_once() {
    let engine = TestEngine::start_with("limits: {max_connections: 5}\n").await;
    let mut held = Vec::new();
    for _ in 0..5 {
        held.push(engine.public_tcp(FLOOD).await);
    }
    // The sixth, from anywhere, is closed rather than parked.
    let mut sixth = engine.public_tcp(OTHER).await;
    assert!(closed_promptly(&mut sixth).await, "refused at once, not left waiting");
    assert_eq!(refused(&engine, "max_connections"), 1);
    // One held socket goes: its permit comes back to the next connection.
    let mut feed_gone = held.pop().unwrap();
    tokio::io::AsyncWriteExt::shutdown(&mut feed_gone).await.unwrap();
    assert!(closed_promptly(&mut feed_gone).await);
    drop(feed_gone);
    let answer = tokio::time::timeout(PROMPT, async {
        loop {
            // The engine frees the permit when it sees the close; until then
            // a connection may still be refused, and says so by closing.
            if let Ok(status) = healthz_from(&engine, OTHER).await {
                return status;
            }
        }
    })
    .await;
    assert_eq!(answer, Ok(200));
}

#[tokio::test]
async fn a_burst_beyond_the_handshake_rate_is_refused() {
    let engine =
        TestEngine::start_with("limits: {handshake_rate_per_source: 1, handshake_burst_per_source: 3}\n").await;
    for _ in 0..3 {
        assert_eq!(healthz_from(&engine, FLOOD).await, Ok(200));
    }
    let mut fourth = engine.public_tcp(FLOOD).await;
    assert!(closed_promptly(&mut fourth).await);
    assert_eq!(refused(&engine, "handshake_rate_per_source"), 1);
    assert_eq!(healthz_from(&engine, OTHER).await, Ok(200), "other sources keep their own budget");
}

#[tokio::test]
async fn refused_tokens_throttle_their_source() {
    let engine = TestEngine::start_with("limits: {auth_failures_per_source: 3}\n").await;
    let forged = strait_engine::auth::mint(b"another-secret-another-secret-another", "mallory", Some(60));
    // One keep-alive API connection from FLOOD presenting bad tokens.
    let tcp = engine.public_tcp(FLOOD).await;
    let connector = tokio_rustls::TlsConnector::from(engine.public_tls_config(&[b"http/1.1"]));
    let tls = connector.connect(ServerName::try_from("localhost").unwrap(), tcp).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await.unwrap();
    tokio::spawn(conn);
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let request = Request::get("/api/tunnels")
            .header(header::HOST, "localhost")
            .header(header::AUTHORIZATION, format!("Bearer {forged}"))
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        statuses.push(response.status().as_u16());
        if response.status() == StatusCode::TOO_MANY_REQUESTS {
            assert_eq!(response.headers()[header::RETRY_AFTER], "60");
        }
    }
    assert_eq!(statuses, [401, 401, 401, 429]);
    // New connections from that source are refused; a good token from
    // another source is not affected.
    let mut next = engine.public_tcp(FLOOD).await;
    assert!(closed_promptly(&mut next).await);
    assert_eq!(refused(&engine, "auth_failures_per_source"), 1);
    let good = engine.token("alice");
    let tcp = engine.public_tcp(OTHER).await;
    let tls = connector.connect(ServerName::try_from("localhost").unwrap(), tcp).await.unwrap();
    let (status, _, _) = http_request(tls, "/api/tunnels", Some(&good)).await;
    assert_eq!(status, 200);
}

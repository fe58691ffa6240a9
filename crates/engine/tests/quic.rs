//! Agents on QUIC: the same protocol on bidirectional streams of one QUIC
//! connection, beside TLS, with `auto` racing both; and what the QUIC port
//! does with bad input.

mod common;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use strait_agent::{TransportMode, TunnelProperties};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn private(name: &str) -> TunnelProperties {
    TunnelProperties { name: Some(name.into()), ..Default::default() }
}

/// A bound on every wait of this file.
const WAIT: Duration = Duration::from_secs(20);

async fn within<F: std::future::Future>(what: &str, future: F) -> F::Output {
    tokio::time::timeout(WAIT, future).await.unwrap_or_else(|_| panic!("{what}: nothing within {WAIT:?}"))
}

/// Writes `payload` and reads as many bytes back, at once (an echo).
async fn echo_roundtrip(stream: &mut strait_agent::Stream, payload: &[u8]) -> Vec<u8> {
    let (mut read, mut write) = tokio::io::split(stream);
    let send = async {
        write.write_all(payload).await.unwrap();
        write.flush().await.unwrap();
    };
    let mut back = vec![0u8; payload.len()];
    let receive = async { read.read_exact(&mut back).await.unwrap() };
    within("echo", async { tokio::join!(send, receive) }).await;
    back
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    let mut x = seed as u32 | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

#[tokio::test]
async fn an_agent_on_quic_serves_private_and_published_tunnels() {
    let engine = TestEngine::start().await;
    let echo = echo_server().await;
    let control = within("control", engine.client_over("alice", TransportMode::Quic).connect()).await.unwrap();
    assert_eq!(control.transport(), "quic");
    let mut tunnel = control.open_tunnel(private("svc")).await.unwrap();
    let id = tunnel.id().to_string();
    tokio::spawn(async move { tunnel.forward(echo.to_string()).await });

    // Dials by name and by id, with and without zero-RTT, over QUIC and TLS.
    for transport in [TransportMode::Quic, TransportMode::Tls] {
        for zero_rtt in [true, false] {
            for target in ["svc", id.as_str()] {
                let mut config = engine.client_config_over("alice", transport);
                config.zero_rtt = zero_rtt;
                let client = strait_agent::Client::new(config).unwrap();
                let (mut stream, carrier) = within("dial", client.dial_carried(target)).await.unwrap();
                assert_eq!(carrier.name(), transport.as_str());
                let payload = format!("{transport} {zero_rtt} {target}").into_bytes();
                assert_eq!(echo_roundtrip(&mut stream, &payload).await, payload);
            }
        }
    }

    // The Engine API and the metrics say which transport carries the agent.
    let admin = engine.admin_token("ops");
    let clients = engine.api_get("/api/clients", Some(&admin)).await.json();
    assert_eq!(clients[0]["transport"], "quic", "{clients}");
    let metrics = engine.engine.shared.metrics.encode();
    assert!(metrics.contains("strait_clients_by_transport{transport=\"quic\"} 1"), "{metrics}");
    assert!(engine.engine.shared.metrics.quic_connections() >= 1);

    // A published tunnel of a QUIC agent, reached over the public TLS port.
    let hello: Handler = Arc::new(|_req| Box::pin(async { http::Response::new(full("over quic\n")) }));
    let local = http_service(hello).await;
    let mut web = control.open_tunnel(published("web")).await.unwrap();
    tokio::spawn(async move { web.forward(local.to_string()).await });
    let mut h1 = engine.h1("web.t.localhost").await;
    let request = http::Request::get("/").header("host", "web.t.localhost").body(full("")).unwrap();
    let response = within("published GET", h1.send_request(request)).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(read_body(response.into_body()).await, "over quic\n");
}

#[tokio::test]
async fn sixteen_mib_each_way_in_every_mix_of_transports() {
    let engine = TestEngine::start().await;
    let echo = echo_server().await;
    for (agent, dialer) in [
        (TransportMode::Quic, TransportMode::Quic),
        (TransportMode::Quic, TransportMode::Tls),
        (TransportMode::Tls, TransportMode::Quic),
    ] {
        let name = format!("bulk-{agent}-{dialer}");
        let control = within("control", engine.client_over("alice", agent).connect()).await.unwrap();
        let mut tunnel = control.open_tunnel(private(&name)).await.unwrap();
        tokio::spawn(async move { tunnel.forward(echo.to_string()).await });
        let client = engine.client_over("alice", dialer);
        let mut stream = within("dial", client.dial(&name)).await.unwrap();
        let payload = pattern(16 << 20, 7);
        let back = echo_roundtrip(&mut stream, &payload).await;
        assert!(back == payload, "{agent} agent, {dialer} dialer: 16 MiB came back changed");
        // A clean end: the half-close goes through and the echo's follows.
        stream.shutdown().await.unwrap();
        let mut rest = Vec::new();
        within("end of stream", stream.read_to_end(&mut rest)).await.unwrap();
        assert!(rest.is_empty());
        control.close().await.unwrap();
    }
}

#[tokio::test]
async fn auto_takes_quic_when_it_answers_and_tls_when_it_does_not() {
    let engine = TestEngine::start().await;
    let control = within("auto", engine.client_over("alice", TransportMode::Auto).connect()).await.unwrap();
    assert_eq!(control.transport(), "quic");
    control.close().await.unwrap();

    // No QUIC listener: auto settles on TLS, QUIC alone says why it failed.
    let tls_only = TestEngine::start_with("quic: {enabled: false}\n").await;
    assert!(tls_only.engine.quic_addr.is_none());
    let started = std::time::Instant::now();
    let control = within("auto", tls_only.client_over("alice", TransportMode::Auto).connect()).await.unwrap();
    assert_eq!(control.transport(), "tls");
    assert!(started.elapsed() < Duration::from_secs(5), "TLS started {:?} in", started.elapsed());
    let mut config = tls_only.client_config_over("alice", TransportMode::Quic);
    config.connect_timeout = Duration::from_secs(2);
    let error = within("quic", strait_agent::Client::new(config).unwrap().connect()).await.err().expect("no QUIC");
    assert!(error.to_string().contains("QUIC"), "{error}");
}

#[tokio::test]
async fn a_drain_lets_quic_streams_finish() {
    let engine = TestEngine::start().await;
    let echo = echo_server().await;
    let control = engine.client_over("alice", TransportMode::Quic).connect().await.unwrap();
    let mut tunnel = control.open_tunnel(private("svc")).await.unwrap();
    tokio::spawn(async move { tunnel.forward(echo.to_string()).await });
    let mut stream = engine.client_over("alice", TransportMode::Quic).dial("svc").await.unwrap();
    assert_eq!(echo_roundtrip(&mut stream, b"before").await, b"before");

    let TestEngine { engine: running, dir: _dir, .. } = engine;
    let running = running.into_inner();
    let stopping = tokio::spawn(running.shutdown_within(Duration::from_secs(20)));
    within("agent told", control.closed()).await;
    let payload = pattern(1 << 20, 3);
    assert!(echo_roundtrip(&mut stream, &payload).await == payload);
    stream.shutdown().await.unwrap();
    let mut rest = Vec::new();
    within("end of stream", stream.read_to_end(&mut rest)).await.expect("a clean end, not a lost connection");
    assert!(within("drain", stopping).await.unwrap(), "drained within the bound");
}

/// A raw QUIC client on `from` offering `alpn`, for what the agent library
/// would never send.
fn raw_endpoint(engine: &TestEngine, from: IpAddr, alpn: &[u8]) -> quinn::Endpoint {
    // A close lost on the way is noticed in seconds, not the default 30.
    let mut transport = quinn::TransportConfig::default();
    transport.max_idle_timeout(Some(Duration::from_secs(5).try_into().unwrap()));
    engine.quic_endpoint(from, alpn, transport)
}

#[tokio::test]
async fn garbage_datagrams_and_other_alpns_are_refused_and_agents_still_served() {
    let engine = TestEngine::start().await;
    let addr = engine.quic_addr();
    // Random datagrams of every size, as a scanner would send.
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for i in 0..2000usize {
        let len = 1 + (i * 37) % 1500;
        socket.send_to(&pattern(len, i as u8), addr).await.unwrap();
    }
    // A QUIC client that offers another protocol (HTTP/3) is refused in
    // its handshake.
    let endpoint = raw_endpoint(&engine, [127, 0, 0, 1].into(), b"h3");
    let refused = within("h3 handshake", endpoint.connect(addr, "localhost").unwrap()).await;
    assert!(refused.is_err(), "h3 must not be served on the agent port");
    assert!(engine.engine.shared.metrics.quic_handshake_failures() >= 1);

    let echo = echo_server().await;
    let control = within("control", engine.client_over("alice", TransportMode::Quic).connect()).await.unwrap();
    let mut tunnel = control.open_tunnel(private("svc")).await.unwrap();
    tokio::spawn(async move { tunnel.forward(echo.to_string()).await });
    let mut stream = within("dial", engine.client_over("alice", TransportMode::Quic).dial("svc")).await.unwrap();
    assert_eq!(echo_roundtrip(&mut stream, b"still served").await, b"still served");
}

#[tokio::test]
async fn handshakes_that_open_no_stream_are_closed_and_others_served() {
    let engine = TestEngine::start_with("limits: {first_frame_seconds: 2}\n").await;
    let addr = engine.quic_addr();
    let echo = echo_server().await;
    let control = engine.client_over("alice", TransportMode::Quic).connect().await.unwrap();
    let mut tunnel = control.open_tunnel(private("svc")).await.unwrap();
    tokio::spawn(async move { tunnel.forward(echo.to_string()).await });

    // 1,000 handshakes from eight other addresses, each left without a
    // stream, 100 at a time.
    let endpoints: Vec<_> = (2..10u8).map(|i| raw_endpoint(&engine, [127, 0, 0, i].into(), b"rstrm/1")).collect();
    let mut idle = Vec::new();
    for batch in 0..10 {
        let mut connecting = tokio::task::JoinSet::new();
        for i in 0..100 {
            let endpoint = endpoints[(batch * 100 + i) % endpoints.len()].clone();
            connecting.spawn(async move { endpoint.connect(addr, "localhost").unwrap().await });
        }
        while let Some(done) = within("handshakes", connecting.join_next()).await {
            idle.push(done.unwrap().expect("the handshake itself is served"));
        }
        // Meanwhile the agent's tunnel answers from 127.0.0.1.
        let mut stream = within("dial", engine.client_over("alice", TransportMode::Quic).dial("svc")).await.unwrap();
        assert_eq!(echo_roundtrip(&mut stream, b"served").await, b"served");
    }
    assert_eq!(idle.len(), 1000);
    // Each is closed by the engine within its bound, saying why. A burst
    // of 1,000 handshakes loses packets even on loopback (the sockets'
    // buffers overflow), so a few hear of the close by a stateless reset,
    // or close in their handshake, or time out; most must get the reason.
    let mut told = 0;
    let mut other = Vec::new();
    for conn in &idle {
        match within("engine closes an idle connection", conn.closed()).await {
            quinn::ConnectionError::ApplicationClosed(close) => {
                assert_eq!(close.error_code, quinn::VarInt::from_u32(1));
                assert_eq!(&close.reason[..], b"no stream opened in time");
                told += 1;
            }
            outcome => other.push(outcome.to_string()),
        }
    }
    assert!(told >= 950, "only {told} of 1000 were told why; the others: {other:?}");
    let quiet = async {
        while engine.engine.shared.metrics.quic_connections() > 1 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    within("the engine forgets the closed connections", quiet).await;
    drop(idle);
    let mut stream = within("dial", engine.client_over("alice", TransportMode::Quic).dial("svc")).await.unwrap();
    assert_eq!(echo_roundtrip(&mut stream, b"after").await, b"after");
}

#[tokio::test]
async fn a_connection_holds_at_most_its_streams_and_the_next_waits() {
    let engine = TestEngine::start_with("quic: {max_streams_per_connection: 3}\n").await;
    let echo = echo_server().await;
    let control = engine.client_over("alice", TransportMode::Tls).connect().await.unwrap();
    let mut tunnel = control.open_tunnel(private("svc")).await.unwrap();
    tokio::spawn(async move { tunnel.forward(echo.to_string()).await });
    let client = engine.client_over("alice", TransportMode::Quic);
    let mut open = Vec::new();
    for i in 0..3u8 {
        let mut stream = within("dial", client.dial("svc")).await.unwrap();
        assert_eq!(echo_roundtrip(&mut stream, &[i]).await, [i]);
        open.push(stream);
    }
    // A fourth waits for QUIC flow control rather than failing...
    let mut fourth = tokio::spawn({
        let client = client.clone();
        async move {
            let mut stream = client.dial("svc").await.unwrap();
            echo_roundtrip(&mut stream, b"4").await
        }
    });
    // A negative can only be watched for a while: half a second is ample
    // for a dial on loopback that is not held back.
    assert!(tokio::time::timeout(Duration::from_millis(500), &mut fourth).await.is_err(), "the fourth went through");
    // ...and goes through once one of the three ends.
    let mut first = open.remove(0);
    first.shutdown().await.unwrap();
    let mut rest = Vec::new();
    within("end", first.read_to_end(&mut rest)).await.unwrap();
    drop(first);
    assert_eq!(within("fourth stream", fourth).await.unwrap(), b"4");
}

#[tokio::test]
async fn the_engine_keeps_a_quiet_agent_connection_alive_past_its_idle_timeout() {
    let engine = TestEngine::start_with("quic: {idle_timeout_seconds: 1}\n").await;
    // An agent that sends nothing for a while (no QUIC keep-alives, no
    // heartbeats): its control channel's liveness, not QUIC, decides.
    let mut transport = quinn::TransportConfig::default();
    transport.max_idle_timeout(Some(Duration::from_secs(60).try_into().unwrap())).keep_alive_interval(None);
    let endpoint = engine.quic_endpoint([127, 0, 0, 1].into(), strait_proto::ALPN, transport);
    let conn = within("handshake", endpoint.connect(engine.quic_addr(), "localhost").unwrap()).await.unwrap();
    let (mut send, mut reader) = engine.raw_quic_control(&conn, "alice").await;
    // The property is survival across idle periods: three of them.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(conn.close_reason().is_none(), "closed: {:?}", conn.close_reason());
    let open = strait_proto::Payload::OpenTunnelReq(strait_proto::OpenTunnelReq {
        request_id: "r1".into(),
        tunnel_properties: Some(private("quiet")),
    });
    strait_proto::write_message(&mut send, &open.into()).await.unwrap();
    let reply = within("reply", reader.read_message()).await.unwrap();
    assert!(matches!(reply.payload, Some(strait_proto::Payload::OpenTunnelRsp(_))), "{reply:?}");
}

/// Whether a QUIC handshake ended in the engine's CONNECTION_REFUSED.
fn refused_outright(outcome: Result<quinn::Connection, quinn::ConnectionError>) -> bool {
    matches!(outcome, Err(quinn::ConnectionError::ConnectionClosed(close))
        if close.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED)
}

#[tokio::test]
async fn quic_connections_past_the_limits_are_refused_and_counted_as_on_tls() {
    let engine = TestEngine::start_with("limits: {handshakes_per_source: 2, max_connections: 3}\n").await;
    let addr = engine.quic_addr();
    // Connections that open no stream hold their source's handshake slot;
    // keep-alives keep them up for as long as the test needs them.
    let endpoint = |from: [u8; 4]| {
        let mut transport = quinn::TransportConfig::default();
        transport.keep_alive_interval(Some(Duration::from_secs(1)));
        engine.quic_endpoint(from.into(), strait_proto::ALPN, transport)
    };
    let flood = endpoint([127, 0, 0, 2]);
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(within("handshake", flood.connect(addr, "localhost").unwrap()).await.unwrap());
    }
    let metrics = &engine.engine.shared.metrics;
    let third = within("refusal", flood.connect(addr, "localhost").unwrap()).await;
    assert!(refused_outright(third), "a third handshake from one source is refused");
    assert_eq!(metrics.connections_refused("handshakes_per_source"), 1);

    // Another source takes the last of max_connections; one more is refused.
    let other = endpoint([127, 0, 0, 3]);
    held.push(within("handshake", other.connect(addr, "localhost").unwrap()).await.unwrap());
    let fourth = within("refusal", endpoint([127, 0, 0, 4]).connect(addr, "localhost").unwrap()).await;
    assert!(refused_outright(fourth), "a connection past max_connections is refused");
    assert_eq!(metrics.connections_refused("max_connections"), 1);
    assert!(held.iter().all(|conn| conn.close_reason().is_none()), "the admitted ones stay up");
}

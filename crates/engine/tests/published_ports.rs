//! Published TCP and UDP tunnels: a public port of their own, allocated
//! from `tcp.port_range` / `udp.port_range`, held for the principal like a
//! hostname, closed (with its live connections) when the tunnel goes; UDP
//! sessions per public source, bounded, over a TLS or a QUIC agent.

mod common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use strait_agent::{TransportMode, TunnelProperties};
use strait_proto::ErrorCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

const WAIT: Duration = Duration::from_secs(20);

/// Wide ranges below Linux's ephemeral ports: the engine picks at random
/// and skips what is taken, so no test names a port.
const TCP: &str = "tcp: {enabled: true, port_range: \"20000-29999\"}\n";
const PORTS: &str = "tcp: {enabled: true, port_range: \"20000-29999\"}\n\
                     udp: {enabled: true, port_range: \"20000-29999\"}\n";

fn tcp_tunnel(port: Option<u16>) -> TunnelProperties {
    TunnelProperties {
        publish: Some(true),
        protocol: Some("tcp".into()),
        port: port.map(u32::from),
        ..Default::default()
    }
}

fn udp_tunnel() -> TunnelProperties {
    TunnelProperties {
        publish: Some(true),
        r#type: Some("datagram".into()),
        protocol: Some("udp".into()),
        ..Default::default()
    }
}

async fn eventually<F: FnMut() -> bool>(mut condition: F) -> bool {
    let deadline = tokio::time::Instant::now() + WAIT;
    while tokio::time::Instant::now() < deadline {
        if condition() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    condition()
}

fn port_of(p: &TunnelProperties) -> u16 {
    u16::try_from(p.port.expect("a served port")).unwrap()
}

async fn echo_round(tcp: &mut TcpStream, bytes: &[u8]) {
    tcp.write_all(bytes).await.unwrap();
    let mut back = vec![0u8; bytes.len()];
    tokio::time::timeout(WAIT, tcp.read_exact(&mut back)).await.expect("echo in time").unwrap();
    assert_eq!(back, bytes);
}

/// Whether the peer ended the connection (EOF or reset) within the wait.
async fn ended(tcp: &mut TcpStream) -> bool {
    let mut buf = [0u8; 16];
    matches!(tokio::time::timeout(WAIT, tcp.read(&mut buf)).await, Ok(Ok(0) | Err(_)))
}

#[tokio::test]
async fn a_published_tcp_tunnel_gets_a_port_and_carries_bytes_exactly() {
    let engine = TestEngine::start_with(PORTS).await;
    let (control, served) = publish(&engine, tcp_tunnel(None), echo_server().await).await;
    let port = port_of(&served);
    assert!((20000..=29999).contains(&port), "{port}");
    assert_eq!(served.hostname.as_deref(), Some("localhost"));
    assert_eq!(served.protocol.as_deref(), Some("tcp"));

    let mut tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let payload: Vec<u8> = (0..(1 << 20)).map(|i| (i * 7 % 251) as u8).collect();
    echo_round(&mut tcp, &payload).await;
    let shared = &engine.engine.shared;
    assert_eq!(shared.metrics.published_connections("tcp"), 1);

    // Ten at once, each its own stream to the agent.
    let mut many = Vec::new();
    for i in 0..10u8 {
        many.push(tokio::spawn(async move {
            let mut tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
            echo_round(&mut tcp, &[i; 4096]).await;
        }));
    }
    for task in many {
        task.await.unwrap();
    }
    let api = engine.api_get("/api/tunnels", Some(&engine.admin_token("ops"))).await.json();
    let listed = api.as_array().unwrap().iter().find(|t| t["id"] == served.id.clone().unwrap().as_str()).cloned();
    let listed = listed.expect("the tunnel is listed");
    assert_eq!((listed["protocol"].as_str(), listed["port"].as_u64()), (Some("tcp"), Some(port as u64)));
    assert_eq!(listed["type"], "bytestream");
    drop(tcp);
    assert!(eventually(|| shared.metrics.published_connections("tcp") == 0).await);
    control.close().await.unwrap();
}

#[tokio::test]
async fn closing_the_tunnel_closes_its_port_and_cuts_live_connections() {
    let engine = TestEngine::start_with(PORTS).await;
    let control = engine.client("alice").connect().await.unwrap();
    let mut tunnel = control.open_tunnel(tcp_tunnel(None)).await.unwrap();
    let port = port_of(tunnel.properties());
    let echo = echo_server().await;
    let id = tunnel.id().to_string();
    let forwarding = tokio::spawn(async move {
        tunnel.forward(echo.to_string()).await;
        tunnel
    });
    let mut live = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    echo_round(&mut live, b"before").await;
    assert!(strait_engine::control::revoke_tunnel(&engine.engine.shared, &id, "test"));
    assert!(ended(&mut live).await, "the live connection is cut");
    let refused = eventually(|| std::net::TcpStream::connect(("127.0.0.1", port)).is_err()).await;
    assert!(refused, "the port is closed");
    forwarding.abort();

    // Losing the control channel does the same.
    let control = engine.client("alice").connect().await.unwrap();
    let mut tunnel = control.open_tunnel(tcp_tunnel(Some(port))).await.expect("its principal gets the port back");
    assert_eq!(port_of(tunnel.properties()), port);
    tokio::spawn(async move { tunnel.forward(echo.to_string()).await });
    let mut live = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    echo_round(&mut live, b"again").await;
    control.close().await.unwrap();
    assert!(ended(&mut live).await, "the control channel's end cuts it");
}

#[tokio::test]
async fn ports_are_asked_for_within_the_range_and_refused_with_reasons() {
    // One port in the range, and something else already has it.
    let squatter = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = squatter.local_addr().unwrap().port();
    let engine = TestEngine::start_with(&format!("tcp: {{enabled: true, port_range: \"{taken}-{taken}\"}}\n")).await;
    let control = engine.client("alice").connect().await.unwrap();
    let refusal = |result: Result<strait_agent::Tunnel, strait_agent::AgentError>| {
        let error = result.err().expect("refused");
        (error.engine_code(), error.to_string())
    };

    let (code, message) = refusal(control.open_tunnel(tcp_tunnel(Some(taken.wrapping_sub(1)))).await);
    assert_eq!(code, Some(ErrorCode::InvalidRequest));
    assert!(message.contains("outside this engine's tcp.port_range"), "{message}");
    let (code, message) = refusal(control.open_tunnel(tcp_tunnel(Some(taken))).await);
    assert_eq!(code, Some(ErrorCode::InvalidRequest));
    assert!(message.contains("in use"), "{message}");
    let (code, message) = refusal(control.open_tunnel(tcp_tunnel(None)).await);
    assert_eq!(code, Some(ErrorCode::CapacityExhausted));
    assert!(message.contains("no free port left"), "{message}");

    // TCP takes no hostname, HTTP or TLS options; UDP is off here.
    let with = |p: TunnelProperties| async { refusal(control.open_tunnel(p).await).0 };
    let hostname = TunnelProperties { hostname: Some("web.t.localhost".into()), ..tcp_tunnel(None) };
    assert_eq!(with(hostname).await, Some(ErrorCode::InvalidRequest));
    let http = TunnelProperties { http_version: Some("h2c".into()), ..tcp_tunnel(None) };
    assert_eq!(with(http).await, Some(ErrorCode::InvalidRequest));
    let token = TunnelProperties { token_auth: Some(true), ..tcp_tunnel(None) };
    assert_eq!(with(token).await, Some(ErrorCode::InvalidRequest));
    let tls = TunnelProperties { tls_min_version: Some("1.3".into()), ..tcp_tunnel(None) };
    assert_eq!(with(tls).await, Some(ErrorCode::InvalidRequest));
    assert_eq!(with(udp_tunnel()).await, Some(ErrorCode::FeatureNotAvailable));
    let private_port = TunnelProperties { port: Some(20001), ..Default::default() };
    assert_eq!(with(private_port).await, Some(ErrorCode::InvalidRequest));

    // Once free, the port is served.
    drop(squatter);
    let tunnel = control.open_tunnel(tcp_tunnel(None)).await.expect("the port is free now");
    assert_eq!(port_of(tunnel.properties()), taken);
}

#[tokio::test]
async fn a_port_is_held_for_its_principal_after_its_agent_is_lost() {
    let engine = TestEngine::start_with(PORTS).await;
    let alice = engine.client("alice").connect().await.unwrap();
    let tunnel = alice.open_tunnel(tcp_tunnel(None)).await.unwrap();
    let port = port_of(tunnel.properties());
    // Lost, not closed: the engine ends the channel when its connection
    // goes; the port stays reserved.
    let client_id = alice.client_id().to_string();
    drop(tunnel);
    drop(alice);
    let shared = engine.engine.shared.clone();
    assert!(eventually(|| shared.registry.client(&client_id).is_none()).await);

    let bob = engine.client("bob").connect().await.unwrap();
    let error = bob.open_tunnel(tcp_tunnel(Some(port))).await.err().expect("refused");
    assert_eq!(error.engine_code(), Some(ErrorCode::InvalidRequest));
    assert!(error.to_string().contains("reserved for another principal"), "{error}");
    // A random allocation for bob never lands on it either.
    for _ in 0..20 {
        let other = bob.open_tunnel(tcp_tunnel(None)).await.unwrap();
        assert_ne!(port_of(other.properties()), port);
        other.close().await.unwrap();
    }
    let alice = engine.client("alice").connect().await.unwrap();
    let again = alice.open_tunnel(tcp_tunnel(Some(port))).await.expect("alice takes her port back");
    assert_eq!(port_of(again.properties()), port);
    let holds = engine.api_get("/api/reservations", Some(&engine.admin_token("ops"))).await;
    assert!(!holds.body.contains(&format!("tcp:{port}")), "{}", holds.body);
}

#[tokio::test]
async fn trusted_ips_close_connections_from_elsewhere() {
    let engine = TestEngine::start_with(PORTS).await;
    let properties = TunnelProperties { trusted_ips: vec!["127.0.0.2".into()], ..tcp_tunnel(None) };
    let (_control, served) = publish(&engine, properties, echo_server().await).await;
    let port = port_of(&served);
    let mut outsider = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    assert!(ended(&mut outsider).await, "a source outside trusted_ips is closed");
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let mut trusted = socket.connect(SocketAddr::from(([127, 0, 0, 1], port))).await.unwrap();
    echo_round(&mut trusted, b"trusted").await;
}

async fn publish_udp(
    engine: &TestEngine,
    transport: TransportMode,
    properties: TunnelProperties,
) -> (strait_agent::ControlChannel, u16) {
    let control = tokio::time::timeout(WAIT, engine.client_over("alice", transport).connect()).await.unwrap().unwrap();
    let mut tunnel = control.open_tunnel(properties).await.unwrap();
    let port = port_of(tunnel.properties());
    let echo = udp_echo_server().await;
    tokio::spawn(async move { tunnel.forward(echo.to_string()).await });
    (control, port)
}

fn packet(source: usize, seq: usize, size: usize) -> Vec<u8> {
    let mut p = vec![source as u8];
    p.extend((seq as u32).to_be_bytes());
    p.extend((0..size.saturating_sub(5)).map(|i| (seq * 31 + i + source) as u8));
    p.truncate(size.max(5));
    p
}

/// Sends `count` packets of sizes 5..=`largest` from one socket, at most
/// `window` unanswered, and checks every echo byte for byte. Returns the
/// packets that did not come back.
async fn udp_round(port: u16, source: usize, count: usize, window: usize, largest: usize) -> usize {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    socket.connect(("127.0.0.1", port)).await.unwrap();
    let mut expected = std::collections::HashMap::new();
    let (mut sent, mut lost) = (0, 0);
    let mut buf = vec![0u8; 65_536];
    while sent < count || !expected.is_empty() {
        while sent < count && expected.len() < window {
            // Every tenth packet is of the largest size, so the edge case
            // is always in the mix.
            let size = if sent % 10 == 9 { largest } else { 5 + (sent * 7919 + source * 13) % (largest - 4) };
            let p = packet(source, sent, size);
            socket.send(&p).await.unwrap();
            expected.insert(sent as u32, p);
            sent += 1;
        }
        match tokio::time::timeout(Duration::from_secs(2), socket.recv(&mut buf)).await {
            Ok(Ok(n)) => {
                assert_eq!(buf[0] as usize, source, "an answer for another source");
                let seq = u32::from_be_bytes(buf[1..5].try_into().unwrap());
                let want = expected.remove(&seq).expect("an answer to a packet in flight");
                assert_eq!(&buf[..n], &want[..], "packet {seq} came back changed");
            }
            // Two seconds of silence: what is still out is lost.
            _ => {
                lost += expected.len();
                expected.clear();
            }
        }
    }
    lost
}

/// A QUIC agent's packets ride QUIC datagrams where they fit the path's
/// datagram size (about 1,200 bytes before MTU discovery,
/// `quic.max_datagram_bytes` at most); strait's agent and engine carry the
/// larger ones on the channel's spill stream. Over TLS every packet
/// travels framed. Either way packets up to 65,507 bytes arrive whole.
async fn udp_echo_through(transport: TransportMode, largest: usize) {
    let engine = TestEngine::start_with(PORTS).await;
    let (_control, port) = publish_udp(&engine, transport, udp_tunnel()).await;
    let sources: Vec<_> = (0..4).map(|s| tokio::spawn(udp_round(port, s, 2500, 16, largest))).collect();
    let mut lost = 0;
    for source in sources {
        lost += tokio::time::timeout(Duration::from_secs(120), source).await.expect("in time").unwrap();
    }
    assert_eq!(lost, 0, "loopback at this pace loses nothing");
    let shared = &engine.engine.shared;
    assert_eq!(shared.metrics.published_connections("udp"), 4, "one session per source");
    assert_eq!(shared.metrics.datagrams_dropped("oversized"), 0, "no packet was lost for its size");
}

#[tokio::test]
async fn udp_packets_keep_their_boundaries_per_source_over_a_tls_agent() {
    udp_echo_through(TransportMode::Tls, 1400).await;
}

#[tokio::test]
async fn udp_packets_keep_their_boundaries_per_source_over_a_quic_agent() {
    udp_echo_through(TransportMode::Quic, 1400).await;
}

#[tokio::test]
async fn udp_packets_up_to_the_ipv4_limit_cross_either_agent_whole() {
    for transport in [TransportMode::Tls, TransportMode::Quic] {
        let engine = TestEngine::start_with(PORTS).await;
        let (control, port) = publish_udp(&engine, transport, udp_tunnel()).await;
        // One packet in flight: a few packets this size fill a socket's
        // default receive buffer.
        let lost = tokio::time::timeout(Duration::from_secs(120), udp_round(port, 0, 200, 1, 65_507)).await;
        assert_eq!(lost.expect("in time"), 0, "{transport:?}: every packet back, byte for byte");
        let metrics = &engine.engine.shared.metrics;
        assert_eq!(metrics.datagrams_dropped("oversized"), 0, "{transport:?}: none lost for its size");
        if transport == TransportMode::Quic {
            // The small ones went as datagrams, the large ones spilled,
            // both ways: 200 packets, every tenth the largest.
            let client = engine.engine.shared.registry.client(control.client_id()).unwrap();
            let stats = client.quic.as_ref().expect("on QUIC").stats();
            assert!(stats.frame_rx.datagram > 0 && stats.frame_tx.datagram > 0, "{stats:?}");
            assert!(metrics.datagrams_spilled().get() >= 2 * 20, "spilled: {}", metrics.datagrams_spilled().get());
        }
    }
}

/// A hand-driven agent on QUIC naming `features`, with a published UDP
/// tunnel whose first session is paired as a datagram channel (its first
/// packet, "hello", received as a datagram).
struct RawUdpAgent {
    conn: quinn::Connection,
    send: quinn::SendStream,
    reader: strait_proto::FrameReader<quinn::RecvStream>,
    public: UdpSocket,
    /// The channel's `ProxyConnReq`.
    req: strait_proto::ProxyConnReq,
    id: [u8; 12],
}

async fn raw_udp_agent(engine: &TestEngine, features: &[&str]) -> RawUdpAgent {
    use strait_proto::{Payload, ProxyConnRsp, write_message};
    let conn = engine.quic_connect().await;
    let (mut send, mut reader) = engine.raw_quic_control_naming(&conn, "alice", features).await;
    let open = Payload::OpenTunnelReq(strait_proto::OpenTunnelReq {
        request_id: "r1".into(),
        tunnel_properties: Some(udp_tunnel()),
    });
    write_message(&mut send, &open.into()).await.unwrap();
    let reply = tokio::time::timeout(WAIT, reader.read_message()).await.unwrap().unwrap();
    let Some(Payload::OpenTunnelRsp(strait_proto::OpenTunnelRsp {
        payload: Some(strait_proto::OpenTunnelResult::TunnelProperties(properties)),
        ..
    })) = reply.payload
    else {
        panic!("{reply:?}")
    };
    let public = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    public.connect(("127.0.0.1", port_of(&properties))).await.unwrap();
    public.send(b"hello").await.unwrap();
    let asked = tokio::time::timeout(WAIT, reader.read_message()).await.unwrap().unwrap();
    let Some(Payload::ProxyConnReq(req)) = asked.payload else { panic!("{asked:?}") };
    write_message(
        &mut send,
        &Payload::ProxyConnRsp(ProxyConnRsp { stream_id: req.stream_id.clone(), error: None }).into(),
    )
    .await
    .unwrap();
    let id = strait_proto::packet::channel_id(&req.stream_id).unwrap();
    let first = tokio::time::timeout(WAIT, conn.read_datagram()).await.unwrap().unwrap();
    assert_eq!(&first[..], strait_proto::packet::datagram(&id, b"hello").as_ref());
    RawUdpAgent { conn, send, reader, public, req, id }
}

/// An agent on QUIC that does not name the spill extension (an official
/// SDK) gets datagrams only: a packet too large for one is dropped and
/// counted, and the channel carries on.
#[tokio::test]
async fn an_sdk_agent_on_quic_gets_datagrams_only() {
    let engine = TestEngine::start_with(PORTS).await;
    // The control stream's halves stay bound: dropping them ends the channel.
    let RawUdpAgent { conn, public, id, send: _send, reader: _reader, .. } = raw_udp_agent(&engine, &[]).await;
    let metrics = &engine.engine.shared.metrics;
    public.send(&[9u8; 1400]).await.unwrap();
    assert!(eventually(|| metrics.datagrams_dropped("oversized") == 1).await, "too large for a datagram");
    // Answers of any size the datagram takes still reach the source.
    conn.send_datagram(strait_proto::packet::datagram(&id, b"back")).unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(WAIT, public.recv(&mut buf)).await.unwrap().unwrap();
    assert_eq!(&buf[..n], b"back");
}

#[tokio::test]
async fn oversized_packets_are_dropped_and_idle_sessions_end() {
    let engine = TestEngine::start_with(&format!(
        "{TCP}udp: {{enabled: true, port_range: \"20000-29999\", max_packet_bytes: 1000, session_idle_seconds: 1}}\n"
    ))
    .await;
    let (_control, port) = publish_udp(&engine, TransportMode::Tls, udp_tunnel()).await;
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    socket.connect(("127.0.0.1", port)).await.unwrap();
    socket.send(&[7u8; 1001]).await.unwrap();
    let shared = engine.engine.shared.clone();
    assert!(eventually(|| shared.metrics.udp_packets_dropped("oversized") == 1).await);
    socket.send(&[8u8; 1000]).await.unwrap();
    let mut buf = [0u8; 2048];
    let n = tokio::time::timeout(WAIT, socket.recv(&mut buf)).await.expect("echo").unwrap();
    assert_eq!(&buf[..n], &[8u8; 1000][..]);
    assert_eq!(shared.metrics.published_connections("udp"), 1);
    // A second without packets ends the session; the next packet opens one.
    assert!(eventually(|| shared.metrics.published_connections("udp") == 0).await);
    socket.send(b"again").await.unwrap();
    let n = tokio::time::timeout(WAIT, socket.recv(&mut buf)).await.expect("echo").unwrap();
    assert_eq!(&buf[..n], b"again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_sources_stay_within_the_session_table() {
    let engine = TestEngine::start_with(&format!(
        "{TCP}udp: {{enabled: true, port_range: \"20000-29999\", max_sessions_per_tunnel: 64}}\n"
    ))
    .await;
    let (_control, port) = publish_udp(&engine, TransportMode::Quic, udp_tunnel()).await;
    let shared = engine.engine.shared.clone();
    let mut ports = HashSet::new();
    for i in 0..10_000u32 {
        // A new source address each time (a new socket, a new port).
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        ports.insert(socket.local_addr().unwrap().port());
        socket.send_to(&i.to_be_bytes(), ("127.0.0.1", port)).unwrap();
        if i % 50 == 0 {
            assert!(shared.metrics.published_connections("udp") <= 64 + 1);
            // Paced, so the engine's receive buffer does not overflow and
            // nearly every source becomes a session.
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    assert!(ports.len() > 1000, "many distinct sources");
    assert!(
        eventually(|| shared.metrics.udp_sessions_evicted() >= 1000).await,
        "evictions counted: {}",
        shared.metrics.udp_sessions_evicted()
    );
    assert!(shared.metrics.published_connections("udp") <= 64);
    // A real source still gets through: right after the flood its first
    // session may be refused while the agent works through the flood's
    // channels, so it asks again, as any UDP client does; then nothing is
    // lost.
    let probe = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    probe.connect(("127.0.0.1", port)).await.unwrap();
    let mut answered = false;
    for _ in 0..20 {
        probe.send(b"anyone?").await.unwrap();
        let mut buf = [0u8; 64];
        if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(1), probe.recv(&mut buf)).await {
            assert_eq!(&buf[..n], b"anyone?");
            answered = true;
            break;
        }
    }
    assert!(answered, "a real source is served after the flood");
    assert_eq!(udp_round(port, 9, 50, 4, 1000).await, 0);
}

/// The spill stream, by hand: the engine asks for it when its first large
/// packet comes (a `ProxyConnReq` repeating the channel's stream id and
/// secret), takes it only with the channel's secret and only once, and
/// carries large packets both ways on it, framed.
#[tokio::test]
async fn a_spill_stream_is_asked_for_by_the_first_large_packet_and_needs_the_channel_secret() {
    use strait_proto::packet::{read_packet, write_packet};
    use strait_proto::{ErrorCode, Payload, ProxyReq, write_message};
    let engine = TestEngine::start_with(PORTS).await;
    let features = [strait_proto::features::DATAGRAM_SPILL];
    let RawUdpAgent { conn, send: _send, mut reader, public, req, .. } = raw_udp_agent(&engine, &features).await;
    let metrics = &engine.engine.shared.metrics;

    let large: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
    public.send(&large).await.unwrap();
    let ask = tokio::time::timeout(WAIT, reader.read_message()).await.unwrap().unwrap();
    let Some(Payload::ProxyConnReq(ask)) = ask.payload else { panic!("{ask:?}") };
    assert_eq!((&ask.stream_id, &ask.secret), (&req.stream_id, &req.secret), "the channel's own id and secret");
    assert!(ask.strait_spill && !req.strait_spill, "the ask is marked as one, the channel's request is not");

    // Opens a stream for the channel with `secret`; the engine's answer.
    let dial = |conn: &quinn::Connection, secret: &str| {
        let (conn, stream_id, secret) = (conn.clone(), req.stream_id.clone(), secret.to_string());
        async move {
            let (mut send, recv) = conn.open_bi().await.unwrap();
            let proxy = ProxyReq {
                client_details: Some(strait_proto::ClientDetails { token: Some(secret), ..Default::default() }),
                stream_id,
                zero_rtt: Some(false),
            };
            write_message(&mut send, &Payload::ProxyReq(proxy).into()).await.unwrap();
            let mut reader = strait_proto::FrameReader::new(recv, strait_proto::MAX_FRAME_LEN);
            let answer = tokio::time::timeout(WAIT, reader.read_message()).await.unwrap().unwrap();
            let Some(Payload::ProxyRsp(rsp)) = answer.payload else { panic!("{answer:?}") };
            let (recv, rest) = reader.into_parts();
            (rsp.error, send, strait_proto::Prefixed::new(rest, recv))
        }
    };
    let secret = req.secret.as_deref().unwrap();
    let (refused, _, _) = dial(&conn, "not-the-secret").await;
    assert_eq!(refused.map(|e| e.code), Some(ErrorCode::InvalidStream as i32), "a wrong secret is refused");
    // The right secret on another QUIC connection finds no channel there.
    let elsewhere = engine.quic_connect().await;
    let (refused, _, _) = dial(&elsewhere, secret).await;
    assert_eq!(refused.map(|e| e.code), Some(ErrorCode::InvalidStream as i32), "another connection is refused");
    let (accepted, mut spill_send, mut spill_recv) = dial(&conn, secret).await;
    assert_eq!(accepted, None);
    // The packet that asked for it waited for it.
    let first = tokio::time::timeout(WAIT, read_packet(&mut spill_recv)).await.unwrap().unwrap();
    assert_eq!(first.as_deref(), Some(&large[..]));
    // The other way: a large answer on the spill reaches the source whole.
    let answer = vec![7u8; 3000];
    write_packet(&mut spill_send, &answer).await.unwrap();
    let mut buf = vec![0u8; 65_536];
    let n = tokio::time::timeout(WAIT, public.recv(&mut buf)).await.unwrap().unwrap();
    assert_eq!(&buf[..n], &answer[..]);
    // One spill stream per channel.
    let (again, _, _) = dial(&conn, secret).await;
    assert_eq!(again.map(|e| e.code), Some(ErrorCode::InvalidStream as i32), "a second spill stream is refused");
    assert_eq!((metrics.datagrams_spilled().get(), metrics.datagrams_dropped("oversized")), (2, 0));
}

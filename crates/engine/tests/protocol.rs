//! The agent protocol end to end: the real engine, the real agent library,
//! real TLS on 127.0.0.1:0.

mod common;

use common::*;
use strait_agent::{Client, TunnelProperties};
use strait_proto::{
    ClientDetails, ControlChannelLiveness, ErrorCode, Heartbeat, OpenControlChannelReq, OpenControlChannelResult,
    Payload, ProxyReq, StreamReq, StreamResult,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn private(name: &str) -> TunnelProperties {
    TunnelProperties { name: Some(name.into()), ..Default::default() }
}

async fn echo_roundtrip(stream: &mut strait_agent::Stream, payload: &[u8]) -> Vec<u8> {
    stream.write_all(payload).await.unwrap();
    let mut back = vec![0u8; payload.len()];
    stream.read_exact(&mut back).await.unwrap();
    back
}

#[tokio::test]
async fn control_channel_reports_client_id_server_details_and_liveness() {
    let engine = TestEngine::start().await;
    let control = engine.client("alice").connect().await.unwrap();
    assert_eq!(control.client_id().len(), 24);
    assert_eq!(control.server_details().unwrap().agent.as_deref(), Some("strait-engine"));
    let liveness = control.liveness().expect("a 1.4.5 agent asking for liveness gets it");
    assert_eq!(liveness.heartbeat_interval_ms, 5000);
    assert!(liveness.heartbeat_timeout_ms >= 5000 && liveness.heartbeat_timeout_ms <= 900_000);
    assert_eq!(engine.engine.shared.registry.counts().0, 1);
    control.close().await.unwrap();
}

#[tokio::test]
async fn private_tunnel_dialed_by_name_and_id_with_and_without_zero_rtt() {
    let engine = TestEngine::start().await;
    let echo = echo_server().await;
    let control = engine.client("alice").connect().await.unwrap();
    let mut tunnel = control.open_tunnel(private("db")).await.unwrap();
    let props = tunnel.properties().clone();
    assert_eq!(props.name.as_deref(), Some("db"));
    assert_eq!(props.publish, Some(false));
    assert_eq!(props.r#type.as_deref(), Some("bytestream"));
    assert!(props.creation_date.is_some());
    let id = tunnel.id().to_string();
    tokio::spawn(async move { tunnel.forward(echo.to_string()).await });

    for zero_rtt in [true, false] {
        let mut config = engine.client_config("alice");
        config.zero_rtt = zero_rtt;
        let dialer = Client::new(config).unwrap();
        for target in ["db", id.as_str()] {
            let mut stream = dialer.dial(target).await.unwrap();
            assert_eq!(echo_roundtrip(&mut stream, b"hello through strait").await, b"hello through strait");
        }
    }
    // Another principal reaches it neither by name nor by id, and hears
    // exactly what a missing tunnel gets (isolation.rs covers the rest).
    let mut config = engine.client_config("bob");
    config.zero_rtt = false;
    let bob = Client::new(config).unwrap();
    for target in ["db", id.as_str()] {
        let err = bob.dial(target).await.err().unwrap();
        assert_eq!(err.engine_code(), Some(ErrorCode::TunnelNotFound));
    }
}

#[tokio::test]
async fn bytes_right_behind_the_first_frame_belong_to_the_stream() {
    let engine = TestEngine::start().await;
    let echo = echo_server().await;
    let control = engine.client("alice").connect().await.unwrap();
    let mut tunnel = control.open_tunnel(private("svc")).await.unwrap();
    tokio::spawn(async move { tunnel.forward(echo.to_string()).await });

    let mut raw = engine.raw().await;
    let req = StreamReq {
        client_details: Some(ClientDetails { token: Some(engine.token("alice")), ..Default::default() }),
        tunnel_id_name: "svc".into(),
        zero_rtt: Some(true),
        datagram_channel: None,
    };
    let mut bytes = strait_proto::encode(&Payload::StreamReq(req).into()).unwrap();
    bytes.extend_from_slice(b"early payload");
    raw.write_all(&bytes).await.unwrap();
    let mut back = [0u8; 13];
    raw.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"early payload");
}

#[tokio::test]
async fn dial_to_a_missing_tunnel() {
    let engine = TestEngine::start().await;
    // zero-RTT off: an explicit TUNNEL_NOT_FOUND.
    let mut config = engine.client_config("alice");
    config.zero_rtt = false;
    let err = Client::new(config).unwrap().dial("nope").await.err().unwrap();
    assert_eq!(err.engine_code(), Some(ErrorCode::TunnelNotFound));
    // zero-RTT on: the engine writes nothing and closes.
    let mut stream = engine.client("alice").dial("nope").await.unwrap();
    let mut buf = Vec::new();
    let _ = stream.read_to_end(&mut buf).await;
    assert!(buf.is_empty());
}

#[tokio::test]
async fn five_concurrent_dials_carry_their_own_bytes() {
    let engine = TestEngine::start().await;
    let echo = echo_server().await;
    let control = engine.client("alice").connect().await.unwrap();
    let mut tunnel = control.open_tunnel(private("echo")).await.unwrap();
    tokio::spawn(async move { tunnel.forward(echo.to_string()).await });
    let client = engine.client("alice");
    let mut tasks = Vec::new();
    for i in 0..5u8 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let payload: Vec<u8> = (0..200_000u32).map(|n| (n as u8).wrapping_mul(i + 1)).collect();
            let mut stream = client.dial("echo").await.unwrap();
            echo_roundtrip(&mut stream, &payload).await == payload
        }));
    }
    for task in tasks {
        assert!(task.await.unwrap());
    }
}

#[tokio::test]
async fn tunnel_names_are_unique_per_principal_and_freed_on_close() {
    let engine = TestEngine::start().await;
    let alice = engine.client("alice").connect().await.unwrap();
    let bob = engine.client("bob").connect().await.unwrap();
    let first = alice.open_tunnel(private("api")).await.unwrap();
    let err = alice.open_tunnel(private("api")).await.err().unwrap();
    assert_eq!(err.engine_code(), Some(ErrorCode::InvalidRequest));
    // Another principal may use the same name.
    bob.open_tunnel(private("api")).await.unwrap();
    first.close().await.unwrap();
    alice.open_tunnel(private("api")).await.unwrap();
}

#[tokio::test]
async fn a_name_or_hostname_held_by_our_other_channel_is_refused_saying_how_long_it_was_silent() {
    async fn within<F: std::future::Future>(future: F) -> F::Output {
        tokio::time::timeout(std::time::Duration::from_secs(20), future).await.expect("an answer in time")
    }
    let engine = TestEngine::start().await;
    let started = std::time::Instant::now();
    let first = within(engine.client("alice").connect()).await.unwrap();
    let _name = within(first.open_tunnel(private("db"))).await.unwrap();
    let _hostname = within(first.open_tunnel(published("web"))).await.unwrap();
    // The same principal's second control channel (a restarted agent, say).
    let second = within(engine.client("alice").connect()).await.unwrap();
    for props in [private("db"), published("web")] {
        let refusal = within(second.open_tunnel(props)).await.err().expect("held by the first channel");
        assert_eq!(refusal.engine_code(), Some(ErrorCode::InvalidRequest), "{refusal}");
        // The CLI's own reading of the engine's words (`strait forward`
        // waits on it for its earlier connection to time out).
        let silence = refusal.holder_silence().unwrap_or_else(|| panic!("no silence read from: {refusal}"));
        // Said to a tenth of a second; never longer than the channel lived.
        assert!(silence <= started.elapsed() + std::time::Duration::from_millis(100), "{silence:?}: {refusal}");
    }
    // Another principal's tunnel says nothing of its channel.
    let bob = within(engine.client("bob").connect()).await.unwrap();
    let taken = within(bob.open_tunnel(published("web"))).await.err().expect("another principal's hostname");
    assert_eq!(taken.holder_silence(), None, "{taken}");
}

#[tokio::test]
async fn closing_the_control_channel_removes_its_tunnels() {
    let engine = TestEngine::start().await;
    let control = engine.client("alice").connect().await.unwrap();
    control.open_tunnel(private("a")).await.unwrap();
    control.open_tunnel(private("b")).await.unwrap();
    assert_eq!(engine.engine.shared.registry.counts(), (1, 2));
    let mut changes = engine.engine.shared.registry.subscribe();
    control.close().await.unwrap();
    // Wait for the engine's own record of the disconnect.
    loop {
        if let strait_engine::registry::Change::ClientDeleted(_) = changes.recv().await.unwrap() {
            break;
        }
    }
    assert_eq!(engine.engine.shared.registry.counts(), (0, 0));
}

#[tokio::test]
async fn revocation_reaches_the_agent() {
    let engine = TestEngine::start().await;
    let control = engine.client("alice").connect().await.unwrap();
    let mut tunnel = control.open_tunnel(private("revoked")).await.unwrap();
    assert!(strait_engine::control::revoke_tunnel(&engine.engine.shared, tunnel.id(), "test"));
    // The agent's tunnel ends: no more streams.
    assert!(tunnel.accept().await.is_none());
    let err = engine.client("alice").connect().await.unwrap();
    drop(err);
    let mut config = engine.client_config("alice");
    config.zero_rtt = false;
    let dial = Client::new(config).unwrap().dial("revoked").await.err().unwrap();
    assert_eq!(dial.engine_code(), Some(ErrorCode::TunnelNotFound));
}

#[tokio::test]
async fn tokens_are_checked() {
    let engine = TestEngine::start().await;
    let mut config = engine.client_config("alice");
    config.token = Some("garbage".into());
    let err = Client::new(config.clone()).unwrap().connect().await.err().unwrap();
    assert_eq!(err.engine_code(), Some(ErrorCode::Unauthorized));
    config.token = Some(strait_engine::auth::mint(b"some-other-secret-some-other-secret!", "alice", Some(60)));
    let err = Client::new(config.clone()).unwrap().connect().await.err().unwrap();
    assert_eq!(err.engine_code(), Some(ErrorCode::Unauthorized));
    config.token = None;
    let err = Client::new(config).unwrap().connect().await.err().unwrap();
    assert_eq!(err.engine_code(), Some(ErrorCode::Unauthorized));
}

#[tokio::test]
async fn protocol_versions_are_checked() {
    let engine = TestEngine::start().await;
    for (version, code) in [
        (None, ErrorCode::ProtocolVersionMissing),
        (Some("banana"), ErrorCode::ProtocolVersionInvalid),
        (Some("2.0.0"), ErrorCode::ProtocolVersionIncompatible),
    ] {
        let mut raw = engine.raw().await;
        let req = OpenControlChannelReq {
            client_details: Some(ClientDetails {
                token: Some(engine.token("alice")),
                protocol_version: version.map(String::from),
                ..Default::default()
            }),
            liveness: None,
        };
        let rsp = roundtrip(&mut raw, Payload::OpenControlChannelReq(req)).await;
        let Some(Payload::OpenControlChannelRsp(rsp)) = rsp.payload else { panic!("{rsp:?}") };
        let Some(OpenControlChannelResult::Error(error)) = rsp.payload else { panic!("{rsp:?}") };
        assert_eq!(error.code(), code, "{version:?}");
    }
}

#[tokio::test]
async fn heartbeats_are_acknowledged_only_when_liveness_was_negotiated() {
    let engine = TestEngine::start().await;
    let details = || ClientDetails {
        token: Some(engine.token("alice")),
        protocol_version: Some("1.4.5".into()),
        ..Default::default()
    };
    // Negotiated: each sequence is acknowledged.
    let mut raw = engine.raw().await;
    let req = OpenControlChannelReq {
        client_details: Some(details()),
        liveness: Some(ControlChannelLiveness { heartbeat_interval_ms: 1000, heartbeat_timeout_ms: 0 }),
    };
    let rsp = roundtrip(&mut raw, Payload::OpenControlChannelReq(req)).await;
    let Some(Payload::OpenControlChannelRsp(rsp)) = rsp.payload else { panic!() };
    let Some(OpenControlChannelResult::Ok(ok)) = rsp.payload else { panic!() };
    assert_eq!(ok.liveness.unwrap().heartbeat_interval_ms, 1000);
    for seq in 1..=3 {
        let ack = roundtrip(&mut raw, Payload::Heartbeat(Heartbeat { sequence: seq, acknowledgement: 0 })).await;
        assert_eq!(ack.payload, Some(Payload::Heartbeat(Heartbeat { sequence: 0, acknowledgement: seq })));
    }
    // Not negotiated: an old agent's empty heartbeat gets no answer; the
    // next reply on the wire is the one for the request after it.
    let mut raw = engine.raw().await;
    let req = OpenControlChannelReq { client_details: Some(details()), liveness: None };
    let rsp = roundtrip(&mut raw, Payload::OpenControlChannelReq(req)).await;
    let Some(Payload::OpenControlChannelRsp(rsp)) = rsp.payload else { panic!() };
    let Some(OpenControlChannelResult::Ok(ok)) = rsp.payload else { panic!() };
    assert!(ok.liveness.is_none());
    strait_proto::write_message(&mut raw, &Payload::Heartbeat(Heartbeat::default()).into()).await.unwrap();
    let close = roundtrip(&mut raw, Payload::CloseControlChannelReq(Default::default())).await;
    assert!(matches!(close.payload, Some(Payload::CloseControlChannelRsp(_))), "{close:?}");
}

#[tokio::test]
async fn silent_control_channels_are_dropped() {
    let engine = TestEngine::start_with("limits: {control_idle_seconds: 1}\n").await;
    let mut raw = engine.raw_control("alice").await;
    // The engine ends the silent channel: the read sees the close.
    read_to_close(&mut raw).await;
    assert_eq!(engine.engine.shared.registry.counts().0, 0);
}

#[tokio::test]
async fn unknown_stream_or_wrong_secret_is_refused_with_invalid_stream() {
    let engine = TestEngine::start().await;
    let mut raw = engine.raw().await;
    let req = ProxyReq {
        client_details: Some(ClientDetails { token: Some("secret".into()), ..Default::default() }),
        stream_id: "0123456789abcdef01234567".into(),
        zero_rtt: Some(false),
    };
    let rsp = roundtrip(&mut raw, Payload::ProxyReq(req)).await;
    let Some(Payload::ProxyRsp(rsp)) = rsp.payload else { panic!("{rsp:?}") };
    assert_eq!(rsp.error.unwrap().code(), ErrorCode::InvalidStream);
    read_to_close(&mut raw).await;
}

#[tokio::test]
async fn private_dial_refusals_without_zero_rtt_are_explicit() {
    let engine = TestEngine::start().await;
    let mut raw = engine.raw().await;
    let req = StreamReq {
        client_details: Some(ClientDetails { token: Some("bad".into()), ..Default::default() }),
        tunnel_id_name: "x".into(),
        zero_rtt: Some(false),
        datagram_channel: None,
    };
    let rsp = roundtrip(&mut raw, Payload::StreamReq(req)).await;
    let Some(Payload::StreamRsp(rsp)) = rsp.payload else { panic!("{rsp:?}") };
    let Some(StreamResult::Error(error)) = rsp.payload else { panic!() };
    assert_eq!(error.code(), ErrorCode::Unauthorized);
}

#[tokio::test]
async fn tunnels_per_client_limit_is_capacity_exhausted() {
    let engine = TestEngine::start_with("limits: {tunnels_per_client: 2}\n").await;
    let control = engine.client("alice").connect().await.unwrap();
    control.open_tunnel(private("a")).await.unwrap();
    control.open_tunnel(private("b")).await.unwrap();
    let err = control.open_tunnel(private("c")).await.err().unwrap();
    assert_eq!(err.engine_code(), Some(ErrorCode::CapacityExhausted));
}

#[tokio::test]
async fn a_stream_the_agent_never_opens_times_out() {
    let engine = TestEngine::start_with("timeouts: {stream_request_seconds: 1}\n").await;
    // A raw control channel that ignores ProxyConnReq.
    let mut raw = engine.raw_control("alice").await;
    let open = strait_proto::OpenTunnelReq { request_id: "r1".into(), tunnel_properties: Some(private("lazy")) };
    roundtrip(&mut raw, Payload::OpenTunnelReq(open)).await;
    let mut config = engine.client_config("alice");
    config.zero_rtt = false;
    let err = Client::new(config).unwrap().dial("lazy").await.err().unwrap();
    assert_eq!(err.engine_code(), Some(ErrorCode::ServiceUnavailable), "{err}");
    assert!(engine.engine.shared.pending.is_empty());
}

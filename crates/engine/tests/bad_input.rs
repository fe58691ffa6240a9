//! Bad input on the wire and at start-up: each gets a clear answer or a
//! close, never a panic or a hang, and the engine keeps serving everyone
//! else.

mod common;

use std::process::Command;

use common::{TestEngine, read_to_close, roundtrip};
use strait_proto::{ErrorCode, OpenControlChannelResult, Payload, TunnelProperties, write_message};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// The engine still serves a well-behaved agent end to end.
async fn still_serving(engine: &TestEngine) {
    let control = engine.client("bob").connect().await.expect("a good agent still connects");
    let echo = common::echo_server().await;
    let props = TunnelProperties { name: Some("after".into()), ..Default::default() };
    let mut tunnel = control.open_tunnel(props).await.unwrap();
    tokio::spawn(async move { tunnel.forward(echo.to_string()).await });
    let mut stream = engine.client("bob").dial("after").await.unwrap();
    stream.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    tokio::io::AsyncReadExt::read_exact(&mut stream, &mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");
    drop(stream);
    control.close().await.unwrap();
}

#[tokio::test]
async fn garbage_instead_of_a_frame_is_closed() {
    let engine = TestEngine::start().await;
    let mut raw = engine.raw().await;
    // A length that fits, then bytes that are not a protobuf Message.
    raw.write_all(&[0, 0, 0, 6, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]).await.unwrap();
    raw.flush().await.unwrap();
    assert!(read_to_close(&mut raw).await.is_empty());
    still_serving(&engine).await;
}

#[tokio::test]
async fn a_frame_over_the_limit_is_closed_before_it_is_read() {
    let engine = TestEngine::start_with("limits: {max_frame_bytes: 1024}\n").await;
    let mut raw = engine.raw().await;
    // Announce 1 MiB; send nothing else. The engine must not wait for it.
    raw.write_all(&(1u32 << 20).to_be_bytes()).await.unwrap();
    raw.flush().await.unwrap();
    assert!(read_to_close(&mut raw).await.is_empty());
    still_serving(&engine).await;
}

#[tokio::test]
async fn a_truncated_frame_is_closed() {
    let engine = TestEngine::start().await;
    let mut raw = engine.raw().await;
    raw.write_all(&[0, 0, 0, 100, 1, 2, 3]).await.unwrap();
    // Half-close: the frame can never complete.
    raw.shutdown().await.unwrap();
    assert!(read_to_close(&mut raw).await.is_empty());
    still_serving(&engine).await;
}

#[tokio::test]
async fn an_unexpected_first_message_is_closed() {
    let engine = TestEngine::start().await;
    let mut raw = engine.raw().await;
    let heartbeat = Payload::Heartbeat(strait_proto::Heartbeat { sequence: 1, acknowledgement: 0 });
    write_message(&mut raw, &heartbeat.into()).await.unwrap();
    assert!(read_to_close(&mut raw).await.is_empty());
    still_serving(&engine).await;
}

#[tokio::test]
async fn an_empty_message_is_closed() {
    let engine = TestEngine::start().await;
    let mut raw = engine.raw().await;
    raw.write_all(&[0, 0, 0, 0]).await.unwrap();
    raw.flush().await.unwrap();
    assert!(read_to_close(&mut raw).await.is_empty());
    still_serving(&engine).await;
}

#[tokio::test]
async fn a_client_that_never_sends_its_first_frame_is_dropped() {
    let engine = TestEngine::start_with("limits: {first_frame_seconds: 1}\n").await;
    let mut raw = engine.raw().await;
    // Say nothing: the engine's first-frame deadline ends the connection.
    assert!(read_to_close(&mut raw).await.is_empty());
    still_serving(&engine).await;
}

#[tokio::test]
async fn a_connection_that_never_finishes_its_client_hello_is_dropped() {
    let engine = TestEngine::start_with("limits: {handshake_seconds: 1}\n").await;
    let mut tcp = TcpStream::connect(engine.addr).await.unwrap();
    // The first bytes of a TLS record header, then silence.
    tcp.write_all(&[0x16, 0x03, 0x01]).await.unwrap();
    let mut rest = Vec::new();
    let _ = tokio::io::AsyncReadExt::read_to_end(&mut tcp, &mut rest).await;
    assert!(engine.engine.shared.metrics.tls_handshake_failures() >= 1);
    still_serving(&engine).await;
}

#[tokio::test]
async fn plain_text_on_the_tls_port_is_dropped() {
    let engine = TestEngine::start().await;
    let mut tcp = TcpStream::connect(engine.addr).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n").await.unwrap();
    let mut rest = Vec::new();
    let _ = tokio::io::AsyncReadExt::read_to_end(&mut tcp, &mut rest).await;
    assert!(!String::from_utf8_lossy(&rest).contains("HTTP/1.1 200"));
    still_serving(&engine).await;
}

#[tokio::test]
async fn garbage_on_an_open_control_channel_ends_it_and_its_tunnels() {
    let engine = TestEngine::start().await;
    let mut raw = engine.raw().await;
    roundtrip(&mut raw, common::control_req(engine.token("alice"))).await;
    let open = strait_proto::OpenTunnelReq {
        request_id: "r1".into(),
        tunnel_properties: Some(TunnelProperties { name: Some("doomed".into()), ..Default::default() }),
    };
    roundtrip(&mut raw, Payload::OpenTunnelReq(open)).await;
    assert_eq!(engine.engine.shared.registry.counts(), (1, 1));
    raw.write_all(&[0, 0, 0, 3, 0xff, 0xff, 0xff]).await.unwrap();
    raw.flush().await.unwrap();
    read_to_close(&mut raw).await;
    assert_eq!(engine.engine.shared.registry.counts(), (0, 0));
    still_serving(&engine).await;
}

#[tokio::test]
async fn a_bad_token_on_the_control_channel_is_unauthorized() {
    let engine = TestEngine::start().await;
    let mut raw = engine.raw().await;
    let rsp = roundtrip(&mut raw, common::control_req("not-a-token".into())).await;
    let Some(Payload::OpenControlChannelRsp(rsp)) = rsp.payload else { panic!("{rsp:?}") };
    let Some(OpenControlChannelResult::Error(error)) = rsp.payload else { panic!("{rsp:?}") };
    assert_eq!(error.code(), ErrorCode::Unauthorized);
    read_to_close(&mut raw).await;
    still_serving(&engine).await;
}

// --- start-up ---------------------------------------------------------------

fn engine_bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_strait-engine"))
}

#[test]
fn a_config_with_several_bad_fields_names_each_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("engine.yaml");
    std::fs::write(
        &path,
        "engine: {host: \"https://x.example.com\", log_level: loud}\n\
         tls: {enabled: true, listen_addr: \"not-an-address\"}\n\
         certs: {static: {enabled: true, cert_file: /nope/cert.pem}}\n\
         auth: {jwt: {enabled: true, token_jwt_secret: \"do-not-print-me-0123456789\"}}\n\
         timeouts: {stream_request_seconds: zero}\n",
    )
    .unwrap();
    let out = engine_bin().arg("--config").arg(&path).env_remove("RSTREAM_ENGINE_CONFIG").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for field in [
        "engine.host",
        "engine.log_level",
        "tls.listen_addr",
        "certs.static.key_file",
        "timeouts.stream_request_seconds",
    ] {
        assert!(stderr.contains(field), "{field} not named in:\n{stderr}");
    }
    assert!(!stderr.contains("do-not-print-me"), "secret leaked:\n{stderr}");
}

#[test]
fn environment_overrides_reach_validation() {
    let out = engine_bin()
        .env_remove("RSTREAM_ENGINE_CONFIG")
        .env("RSTREAM_ENGINE_ENGINE__HOST", "edge.example.com")
        .env("RSTREAM_ENGINE_ENGINE__LOG_LEVEL", "chatty")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("engine.log_level"), "{stderr}");
    assert!(stderr.contains("auth.jwt.token_jwt_secret: is required"), "{stderr}");
}

#[tokio::test]
async fn a_certificate_and_key_that_do_not_match_stop_start_up() {
    strait_engine::install_crypto_provider();
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    strait_engine::dev::generate_certs("localhost", a.path()).unwrap();
    strait_engine::dev::generate_certs("localhost", b.path()).unwrap();
    // a's certificate with b's key.
    std::fs::copy(b.path().join("key.pem"), a.path().join("key.pem")).unwrap();
    let yaml = common::yaml(a.path(), "");
    let config = strait_engine::config::Config::from_yaml_str(&yaml, Vec::new()).unwrap().config;
    let error = strait_engine::Engine::start(config).await.err().expect("mismatched pair refused");
    let message = error.to_string();
    assert!(message.contains("match") || message.contains("key"), "{message}");

    let path = a.path().join("engine.yaml");
    std::fs::write(&path, &yaml).unwrap();
    let out = engine_bin().arg("-c").arg(&path).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cert.pem") || stderr.contains("key.pem"), "{stderr}");
}

#[test]
fn a_missing_certificate_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("engine.yaml");
    std::fs::write(&path, common::yaml(dir.path(), "")).unwrap();
    let out = engine_bin().arg("-c").arg(&path).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cert.pem"), "{stderr}");
}

/// A log that cannot be written (stderr on a full disk, here /dev/full)
/// must not stop the engine: it starts, serves an agent end to end and
/// exits 0 on SIGTERM. It used to exit 101 at its first log line (the
/// tracing subscriber reports a failed write with eprintln!, which panics).
#[tokio::test]
async fn an_unwritable_log_does_not_stop_the_engine() {
    use std::io::BufRead;

    strait_engine::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let files = strait_engine::dev::generate_certs("localhost", dir.path()).unwrap();
    let path = dir.path().join("engine.yaml");
    std::fs::write(&path, common::yaml(dir.path(), "")).unwrap();
    let full = std::fs::OpenOptions::new().write(true).open("/dev/full").unwrap();
    let mut child = engine_bin()
        .arg("-c")
        .arg(&path)
        .arg("--print-ready")
        .env_remove("RSTREAM_ENGINE_CONFIG")
        .env("STRAIT_LOG", "debug")
        .stdout(std::process::Stdio::piped())
        .stderr(full)
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let ready = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        std::io::BufReader::new(stdout).read_line(&mut line).map(|_| line)
    });
    let line =
        tokio::time::timeout(std::time::Duration::from_secs(30), ready).await.expect("ready in 30 s").unwrap().unwrap();
    let Some(ready) = serde_json::from_str::<serde_json::Value>(&line).ok() else {
        let status = child.wait().unwrap();
        panic!("no ready line ({line:?}); the engine exited with {status}");
    };
    let port: u16 = ready["tls"].as_str().unwrap().rsplit_once(':').unwrap().1.parse().unwrap();

    let mut config = strait_agent::ClientConfig::new(
        format!("localhost:{port}"),
        Some(strait_engine::auth::mint(common::SECRET.as_bytes(), "bob", Some(3600))),
    );
    config.ca_file = Some(files.ca.clone());
    let client = strait_agent::Client::new(config).unwrap();
    let control = client.connect().await.expect("an agent connects");
    let echo = common::echo_server().await;
    let props = TunnelProperties { name: Some("logless".into()), ..Default::default() };
    let mut tunnel = control.open_tunnel(props).await.unwrap();
    let forward = tokio::spawn(async move { tunnel.forward(echo.to_string()).await });
    let mut stream = client.dial("logless").await.unwrap();
    stream.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    tokio::io::AsyncReadExt::read_exact(&mut stream, &mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");
    drop(stream);
    control.close().await.unwrap();
    forward.abort();
    drop(client);

    let term = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status().unwrap();
    assert!(term.success());
    let exited = tokio::task::spawn_blocking(move || child.wait());
    let status = tokio::time::timeout(std::time::Duration::from_secs(60), exited)
        .await
        .expect("the engine exits within 60 s of SIGTERM")
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0), "the engine exited with {status}");
}

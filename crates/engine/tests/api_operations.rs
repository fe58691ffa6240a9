//! Operations: the metrics listener, certificate rotation as the runbook
//! does it, readiness and the graceful drain.

mod common;

use std::time::Duration;

use common::*;
use strait_agent::TunnelProperties;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const METRICS: &str = "metrics: {prometheus: {enabled: true, listen_addr: \"127.0.0.1:0\", path: \"scrape/\", bearer_token: \"scrape-token-0123\"}}\n";

fn private(name: &str) -> TunnelProperties {
    TunnelProperties { name: Some(name.into()), ..Default::default() }
}

/// Waits for `condition`, checking every few milliseconds, for at most 5 s.
async fn eventually<F: FnMut() -> bool>(mut condition: F) -> bool {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while tokio::time::Instant::now() < deadline {
        if condition() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    condition()
}

#[tokio::test]
async fn metrics_need_the_token_and_count_what_happens() {
    let engine = TestEngine::start_with(METRICS).await;
    let refused = engine.metrics_get("/scrape", None).await;
    assert_eq!((refused.status, refused.body.as_str()), (401, "missing or invalid bearer token\n"));
    assert_eq!(engine.metrics_get("/scrape", Some("wrong")).await.status, 401);
    assert_eq!(engine.metrics_get("/metrics", Some("scrape-token-0123")).await.status, 404);
    assert_eq!(engine.metrics_get("/readyz", None).await.body, "ready\n");
    assert_eq!(engine.metrics_get("/healthz", None).await.body, "ok\n");

    let echo = echo_server().await;
    let control = engine.client("alice").connect().await.unwrap();
    let mut tunnel = control.open_tunnel(private("svc")).await.unwrap();
    tokio::spawn(async move { tunnel.forward(echo.to_string()).await });
    let mut stream = engine.client("alice").dial("svc").await.unwrap();
    stream.write_all(b"0123456789").await.unwrap();
    let mut back = [0u8; 10];
    stream.read_exact(&mut back).await.unwrap();
    stream.shutdown().await.unwrap();
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).await.unwrap();

    // The stream's bytes are counted when its copy loop ends.
    let shared = engine.engine.shared.clone();
    assert!(eventually(|| shared.metrics.encode().contains("strait_stream_bytes_total{direction=\"in\"} 10")).await);
    let answer = engine.metrics_get("/scrape", Some("scrape-token-0123")).await;
    assert_eq!(answer.status, 200);
    assert!(answer.headers["content-type"].to_str().unwrap().starts_with("application/openmetrics-text"));
    let text = answer.body;
    for needle in [
        "strait_clients_connected 1",
        "strait_tunnels{protocol=\"private\"} 1",
        "strait_streams_total{kind=\"private\"} 1",
        "strait_streams_active{kind=\"private\"} 0",
        "strait_stream_bytes_total{direction=\"out\"} 10",
        "strait_stream_pairing_seconds_count 1",
        "strait_auth_failures_total 2",
        "strait_certificate_reloads_total 0",
        "strait_build_info{",
    ] {
        assert!(text.contains(needle), "{needle} missing in\n{text}");
    }
    control.close().await.unwrap();
    assert!(eventually(|| shared.metrics.encode().contains("strait_tunnels{protocol=\"private\"} 0")).await);
    assert!(shared.metrics.encode().contains("strait_clients_connected 0"));
}

/// The served certificate's DER, as a fresh client sees it.
async fn served_certificate(engine: &TestEngine) -> Vec<u8> {
    let tls = engine.raw_with_alpn(&[b"http/1.1"]).await;
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

/// The certificate a QUIC handshake on the agent port gets.
async fn served_quic_certificate(engine: &TestEngine) -> Vec<u8> {
    let conn = engine.quic_connect().await;
    let certs = conn.peer_identity().unwrap().downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>().unwrap();
    certs[0].to_vec()
}

#[tokio::test]
async fn certificate_rotation_by_rename_and_a_bad_replacement() {
    let engine = TestEngine::start_with(METRICS).await;
    let dir = engine.dir.path();
    let before = served_certificate(&engine).await;

    // The runbook: write the new pair beside the old, then rename into place.
    let staging = dir.join("staging");
    std::fs::create_dir(&staging).unwrap();
    for file in ["ca.pem", "ca-key.pem"] {
        std::fs::copy(dir.join(file), staging.join(file)).unwrap();
    }
    strait_engine::dev::generate_certs("localhost", &staging).unwrap();
    let new_der = {
        use rustls::pki_types::pem::PemObject;
        let pem = std::fs::read(staging.join("cert.pem")).unwrap();
        rustls::pki_types::CertificateDer::pem_slice_iter(&pem).next().unwrap().unwrap().to_vec()
    };
    assert_ne!(before, new_der);
    std::fs::rename(staging.join("key.pem"), dir.join("key.pem")).unwrap();
    std::fs::rename(staging.join("cert.pem"), dir.join("cert.pem")).unwrap();
    assert_eq!(served_certificate(&engine).await, new_der, "the next handshake serves the new certificate");
    assert_eq!(served_quic_certificate(&engine).await, new_der, "QUIC serves the same store");

    // A broken replacement keeps the current pair and is counted.
    std::fs::write(staging.join("cert.pem"), b"-----BEGIN CERTIFICATE-----\nnot a certificate\n").unwrap();
    std::fs::rename(staging.join("cert.pem"), dir.join("cert.pem")).unwrap();
    assert_eq!(served_certificate(&engine).await, new_der, "the old pair keeps serving");
    assert_eq!(served_quic_certificate(&engine).await, new_der, "on QUIC too");
    assert_eq!(served_certificate(&engine).await, new_der);
    let text = engine.metrics_get("/scrape", Some("scrape-token-0123")).await.body;
    assert!(text.contains("strait_certificate_reloads_total 1"), "{text}");
    assert!(text.contains("strait_certificate_reload_failures_total 1"), "{text}");
    assert_eq!(engine.api_get("/readyz", None).await.status, 200);
}

#[tokio::test]
async fn shutdown_stops_accepting_tells_agents_and_lets_streams_finish() {
    let engine = TestEngine::start().await;
    let echo = echo_server().await;
    let control = engine.client("alice").connect().await.unwrap();
    let mut tunnel = control.open_tunnel(private("svc")).await.unwrap();
    tokio::spawn(async move { tunnel.forward(echo.to_string()).await });
    let mut stream = engine.client("alice").dial("svc").await.unwrap();
    stream.write_all(b"before").await.unwrap();
    let mut back = [0u8; 6];
    stream.read_exact(&mut back).await.unwrap();

    let addr = engine.addr;
    let shared = engine.engine.shared.clone();
    let TestEngine { engine: running, dir: _dir, .. } = engine;
    let running = running.into_inner();
    let stopping = tokio::spawn(running.shutdown_within(Duration::from_secs(20)));

    // The agent is told, and its control channel ends.
    let reason = tokio::time::timeout(Duration::from_secs(5), control.closed()).await.expect("agent told");
    assert!(!reason.is_empty());
    assert_eq!(shared.registry.counts(), (0, 0));
    let mut refused = false;
    for _ in 0..500 {
        if tokio::net::TcpStream::connect(addr).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(refused, "the TLS port stops accepting");
    assert!(shared.readiness().is_err());

    // The stream in flight still carries bytes both ways.
    let payload = vec![7u8; 256 * 1024];
    stream.write_all(&payload).await.unwrap();
    let mut back = vec![0u8; payload.len()];
    stream.read_exact(&mut back).await.unwrap();
    assert_eq!(back, payload);
    assert!(!stopping.is_finished(), "the drain waits for the stream");
    stream.shutdown().await.unwrap();
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).await.unwrap();
    assert!(stopping.await.unwrap(), "drained within the bound");
}

#[tokio::test]
async fn the_drain_is_bounded() {
    let engine = TestEngine::start().await;
    let echo = echo_server().await;
    let control = engine.client("alice").connect().await.unwrap();
    let mut tunnel = control.open_tunnel(private("svc")).await.unwrap();
    tokio::spawn(async move { tunnel.forward(echo.to_string()).await });
    let mut stream = engine.client("alice").dial("svc").await.unwrap();
    stream.write_all(b"hold").await.unwrap();
    let mut back = [0u8; 4];
    stream.read_exact(&mut back).await.unwrap();
    let TestEngine { engine: running, dir: _dir, .. } = engine;
    let running = running.into_inner();
    assert!(!running.shutdown_within(Duration::from_millis(200)).await, "the idle stream outlives the drain");
    // The cut stream ends for the dialer.
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest)).await.expect("stream cut");
}

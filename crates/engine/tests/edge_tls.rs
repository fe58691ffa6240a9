//! Published TLS tunnels (terminated and passthrough), TLS towards the
//! agent's service, and what tunnel creation refuses.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use common::*;
use http::{Request, StatusCode, header};
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use strait_agent::TunnelProperties;
use strait_proto::ErrorCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

fn tls_tunnel(label: &str, mode: &str) -> TunnelProperties {
    TunnelProperties { protocol: Some("tls".into()), tls_mode: Some(mode.into()), ..published(label) }
}

fn client_config(ca: &Path, alpns: &[&[u8]], tls12_only: bool) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(strait_engine::crypto_provider());
    let builder = if tls12_only {
        builder.with_protocol_versions(&[&rustls::version::TLS12]).unwrap()
    } else {
        builder.with_safe_default_protocol_versions().unwrap()
    };
    let mut config = builder.with_root_certificates(roots).with_no_client_auth();
    config.alpn_protocols = alpns.iter().map(|a| a.to_vec()).collect();
    Arc::new(config)
}

async fn connect(
    engine: &TestEngine,
    from: [u8; 4],
    host: &str,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let tcp = engine.public_tcp(from.into()).await;
    tokio_rustls::TlsConnector::from(config).connect(ServerName::try_from(host.to_string()).unwrap(), tcp).await
}

async fn roundtrip<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(io: &mut S, payload: &[u8]) -> Vec<u8> {
    io.write_all(payload).await.unwrap();
    let mut back = vec![0u8; payload.len()];
    io.read_exact(&mut back).await.unwrap();
    back
}

/// The agent's own TLS service: a certificate from a CA the engine never
/// saw, echoing what it receives (or serving HTTP when `http` is set).
async fn agent_tls_service(dir: &Path, http: bool) -> SocketAddr {
    let files = strait_engine::dev::generate_certs("localhost", dir).unwrap();
    let certs: Vec<_> = CertificateDer::pem_file_iter(&files.cert).unwrap().map(|c| c.unwrap()).collect();
    let key = PrivateKeyDer::from_pem_file(&files.key).unwrap();
    let mut config = rustls::ServerConfig::builder_with_provider(strait_engine::crypto_provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { return };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                if http {
                    let service = hyper::service::service_fn(|req: Request<hyper::body::Incoming>| async move {
                        let body = format!("over TLS: {}", req.uri());
                        Ok::<_, std::convert::Infallible>(http::Response::new(full(body)))
                    });
                    let _ =
                        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tls), service).await;
                } else {
                    let (mut r, mut w) = tokio::io::split(&mut tls);
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn terminated_tls_applies_alpns_and_min_version() {
    let engine = TestEngine::start().await;
    let echo = echo_server().await;
    let props = TunnelProperties {
        tls_alpns: vec!["x-custom".into()],
        tls_min_version: Some("1.3".into()),
        ..tls_tunnel("term", "terminated")
    };
    let (_control, served) = publish(&engine, props, echo).await;
    assert_eq!(served.tls_mode.as_deref(), Some("terminated"));

    let mut tls =
        connect(&engine, [127, 0, 0, 1], "term.t.localhost", client_config(&engine.ca, &[b"x-custom"], false))
            .await
            .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"x-custom"[..]));
    assert_eq!(tls.get_ref().1.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_3));
    assert_eq!(roundtrip(&mut tls, b"terminated bytes").await, b"terminated bytes");

    // A TLS 1.2-only client is turned away.
    let old =
        connect(&engine, [127, 0, 0, 1], "term.t.localhost", client_config(&engine.ca, &[b"x-custom"], true)).await;
    assert!(old.is_err());
}

#[tokio::test]
async fn passthrough_serves_the_agents_own_certificate() {
    let engine = TestEngine::start().await;
    let dir = tempfile::tempdir().unwrap();
    let service = agent_tls_service(dir.path(), false).await;
    let (_control, _) = publish(&engine, tls_tunnel("pass", "passthrough"), service).await;

    // Trusting only the agent's CA: the handshake is with the agent's service.
    let agent_ca = dir.path().join("ca.pem");
    let mut tls =
        connect(&engine, [127, 0, 0, 1], "pass.t.localhost", client_config(&agent_ca, &[], false)).await.unwrap();
    assert_eq!(roundtrip(&mut tls, b"end to end").await, b"end to end");
    // Trusting only the engine's CA fails: the engine never terminates.
    assert!(connect(&engine, [127, 0, 0, 1], "pass.t.localhost", client_config(&engine.ca, &[], false)).await.is_err());
}

#[tokio::test]
async fn tls_tunnels_outside_trusted_ips_get_a_closed_connection() {
    let engine = TestEngine::start().await;
    let echo = echo_server().await;
    let props = TunnelProperties { trusted_ips: vec!["127.0.0.2/32".into()], ..tls_tunnel("guarded", "terminated") };
    let (_control, _) = publish(&engine, props, echo).await;
    let config = client_config(&engine.ca, &[], false);
    let mut ok = connect(&engine, [127, 0, 0, 2], "guarded.t.localhost", config.clone()).await.unwrap();
    assert_eq!(roundtrip(&mut ok, b"allowed").await, b"allowed");
    assert!(connect(&engine, [127, 0, 0, 3], "guarded.t.localhost", config).await.is_err());
}

#[tokio::test]
async fn upstream_tls_reaches_a_tls_only_service() {
    let engine = TestEngine::start().await;
    let dir = tempfile::tempdir().unwrap();
    let service = agent_tls_service(dir.path(), true).await;
    let props = TunnelProperties { upstream_tls: Some(true), ..published("secure") };
    let (_control, _) = publish(&engine, props, service).await;
    let mut h1 = engine.h1("secure.t.localhost").await;
    let request = Request::get("/x?y=1").header(header::HOST, "secure.t.localhost").body(full("")).unwrap();
    let response = h1.send_request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "over TLS: /x?y=1");
}

#[tokio::test]
async fn creation_refusals() {
    let engine = TestEngine::start().await;
    let control = engine.client("alice").connect().await.unwrap();
    let code = |props: TunnelProperties| {
        let control = &control;
        async move { control.open_tunnel(props).await.err().unwrap().engine_code() }
    };
    for props in [
        TunnelProperties { rstream_auth: Some(true), ..published("a") },
        TunnelProperties { challenge_mode: Some(true), ..published("b") },
        TunnelProperties { mtls_auth: Some(true), ..published("c") },
    ] {
        assert_eq!(code(props).await, Some(ErrorCode::FeatureNotAvailable));
    }
    for props in [
        TunnelProperties { tls_alpns: vec!["h2".into()], ..tls_tunnel("d", "passthrough") },
        TunnelProperties { tls_min_version: Some("1.2".into()), ..tls_tunnel("e", "passthrough") },
        TunnelProperties { tls_ciphers: vec!["TLS13_AES_128_GCM_SHA256".into()], ..tls_tunnel("f", "passthrough") },
        TunnelProperties {
            tls_min_version: Some("1.3".into()),
            tls_ciphers: vec!["TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256".into()],
            ..tls_tunnel("g", "terminated")
        },
        TunnelProperties { hostname: Some("a.b.t.localhost".into()), ..published("h") },
    ] {
        assert_eq!(code(props).await, Some(ErrorCode::InvalidRequest));
    }
}

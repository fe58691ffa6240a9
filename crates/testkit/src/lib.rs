//! The one test harness of strait's suites (the engine's integration
//! tests and the CLI's end-to-end tests): a real engine in-process on
//! 127.0.0.1:0 with generated certificates, which can be stopped and
//! started again on the same address; the real agent library; and raw
//! protocol clients for bytes the agent never would send.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use rustls::pki_types::ServerName;
use strait_agent::{Client, ClientConfig, TransportMode};
use strait_engine::Engine;
use strait_engine::config::Config;
use strait_proto::{FrameReader, MAX_FRAME_LEN, Message, Payload, write_message};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::client::TlsStream;

pub const SECRET: &str = "test-secret-test-secret-test-secret-0123";

/// How long a restarted engine may take to bind its old address again.
const REBIND: std::time::Duration = std::time::Duration::from_secs(30);

/// The most a raw client's handshake or first answer may take on a loaded
/// machine; only a broken engine reaches it.
const STEP: std::time::Duration = std::time::Duration::from_secs(20);

/// The bound on one whole test of the suites: a hang fails the test,
/// saying what it waited for, long before the CI stage's limit.
pub const TEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// `future`'s output if it ends within `bound`; else a panic saying that
/// `what` (what was being waited for) did not come in time.
pub async fn within<F: Future>(bound: std::time::Duration, what: &str, future: F) -> F::Output {
    tokio::time::timeout(bound, future).await.unwrap_or_else(|_| panic!("{what} in time: not within {bound:?}"))
}

pub struct TestEngine {
    pub engine: EngineSlot,
    pub dir: tempfile::TempDir,
    pub ca: PathBuf,
    pub addr: SocketAddr,
    /// The YAML the engine was started with beyond the basics, for a
    /// restart.
    extra: String,
}

/// A test engine's engine: running, or stopped between
/// [`TestEngine::stop`] and [`TestEngine::start_again`]. It reads as the
/// running [`Engine`].
pub struct EngineSlot(Option<Engine>);

impl std::ops::Deref for EngineSlot {
    type Target = Engine;

    fn deref(&self) -> &Engine {
        self.0.as_ref().expect("the test engine is stopped")
    }
}

impl EngineSlot {
    /// The running engine, to shut it down by hand.
    pub fn into_inner(self) -> Engine {
        self.0.expect("the test engine is stopped")
    }

    pub fn is_running(&self) -> bool {
        self.0.is_some()
    }
}

pub fn yaml(dir: &std::path::Path, extra: &str) -> String {
    yaml_listening(dir, "127.0.0.1:0", SECRET, extra)
}

fn yaml_listening(dir: &std::path::Path, listen: &str, secret: &str, extra: &str) -> String {
    format!(
        "engine: {{host: localhost, log_level: debug}}\n\
         tls: {{enabled: true, listen_addr: \"{listen}\"}}\n\
         certs: {{static: {{enabled: true, cert_file: \"{cert}\", key_file: \"{key}\"}}}}\n\
         auth: {{jwt: {{enabled: true, token_jwt_secret: \"{secret}\"}}}}\n{extra}",
        cert = dir.join("cert.pem").display(),
        key = dir.join("key.pem").display(),
    )
}

impl TestEngine {
    pub async fn start() -> Self {
        Self::start_with("").await
    }

    /// Starts with `extra` YAML appended (later keys win).
    pub async fn start_with(extra: &str) -> Self {
        strait_engine::install_crypto_provider();
        let _ = tracing_subscriber::fmt().with_env_filter("strait_engine=debug").with_test_writer().try_init();
        let dir = tempfile::tempdir().unwrap();
        let files = strait_engine::dev::generate_certs("localhost", dir.path()).unwrap();
        let config = Config::from_yaml_str(&yaml(dir.path(), extra), Vec::new()).expect("valid test config").config;
        let engine = Engine::start(config).await.expect("engine starts");
        let addr = engine.tls_addr;
        Self { engine: EngineSlot(Some(engine)), dir, ca: files.ca, addr, extra: extra.to_string() }
    }

    /// The CA file agents trust.
    pub fn ca(&self) -> PathBuf {
        self.ca.clone()
    }

    /// Stops the engine and starts a new one on the same address.
    pub async fn restart(&mut self) {
        self.restart_with_secret(SECRET).await;
    }

    /// Restarts on the same address with another JWT secret: tokens minted
    /// before no longer verify.
    pub async fn restart_with_secret(&mut self, secret: &str) {
        self.stop().await;
        self.boot(secret).await;
    }

    /// Stops the engine; its address refuses connections until
    /// [`TestEngine::start_again`].
    pub async fn stop(&mut self) {
        if let Some(engine) = self.engine.0.take() {
            engine.shutdown().await;
        }
    }

    /// Starts the engine again on its address after [`TestEngine::stop`].
    pub async fn start_again(&mut self) {
        self.boot(SECRET).await;
    }

    /// Starts an engine on the address of one just stopped. The old
    /// engine's side of a connection its peer has not closed yet can keep
    /// the port from being bound for a moment (seen as AddrInUse in about
    /// one restart in ten), so the bind is retried until it succeeds.
    async fn boot(&mut self, secret: &str) {
        let yaml = yaml_listening(self.dir.path(), &self.addr.to_string(), secret, &self.extra);
        let deadline = tokio::time::Instant::now() + REBIND;
        loop {
            let config = Config::from_yaml_str(&yaml, Vec::new()).expect("valid test config").config;
            match Engine::start(config).await {
                Ok(engine) => {
                    self.engine.0 = Some(engine);
                    return;
                }
                Err(strait_engine::StartError::Bind { .. }) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                Err(error) => panic!("the engine does not start again on {}: {error}", self.addr),
            }
        }
    }

    /// The engine's live tunnels by name.
    pub fn tunnels(&self) -> std::collections::HashMap<String, Arc<strait_engine::registry::Tunnel>> {
        let registry = &self.engine.shared.registry;
        registry.tunnels().into_iter().map(|t| (t.name().unwrap_or_default().to_string(), t)).collect()
    }

    /// The engine's live tunnel ids by name.
    pub fn ids(&self) -> std::collections::HashMap<String, String> {
        self.tunnels().into_iter().map(|(name, t)| (name, t.id.clone())).collect()
    }

    pub fn token(&self, sub: &str) -> String {
        strait_engine::auth::mint(SECRET.as_bytes(), sub, Some(3600))
    }

    /// An operator's token: it sees and acts on every principal's objects.
    pub fn admin_token(&self, sub: &str) -> String {
        strait_engine::auth::mint_with(SECRET.as_bytes(), sub, Some(3600), true)
    }

    /// A client over TLS: most tests are about the protocol, and TLS is
    /// what every rstream agent can speak. tests/quic.rs runs them over
    /// QUIC and auto.
    pub fn client_config(&self, sub: &str) -> ClientConfig {
        self.client_config_over(sub, TransportMode::Tls)
    }

    pub fn client_config_over(&self, sub: &str, transport: TransportMode) -> ClientConfig {
        let mut config = ClientConfig::new(format!("localhost:{}", self.addr.port()), Some(self.token(sub)));
        config.ca_file = Some(self.ca.clone());
        config.transport = transport;
        config
    }

    pub fn client(&self, sub: &str) -> Client {
        Client::new(self.client_config(sub)).unwrap()
    }

    pub fn client_over(&self, sub: &str, transport: TransportMode) -> Client {
        Client::new(self.client_config_over(sub, transport)).unwrap()
    }

    /// A raw TLS connection with ALPN `rstrm/1`, for hand-made frames.
    pub async fn raw(&self) -> TlsStream<TcpStream> {
        self.raw_with_alpn(&[b"rstrm/1"]).await
    }

    pub async fn raw_with_alpn(&self, alpns: &[&[u8]]) -> TlsStream<TcpStream> {
        let connector = tokio_rustls::TlsConnector::from(self.public_tls_config(alpns));
        let tcp = TcpStream::connect(self.addr).await.unwrap();
        connector.connect(ServerName::try_from("localhost").unwrap(), tcp).await.unwrap()
    }
}

/// An `OpenControlChannelReq` of protocol 1.4.5 without liveness.
pub fn control_req(token: String) -> Payload {
    control_req_naming(token, &[])
}

/// The same, naming strait's protocol extensions `features`.
pub fn control_req_naming(token: String, features: &[&str]) -> Payload {
    Payload::OpenControlChannelReq(strait_proto::OpenControlChannelReq {
        client_details: Some(strait_proto::ClientDetails {
            token: Some(token),
            protocol_version: Some("1.4.5".into()),
            strait_features: features.iter().map(|f| f.to_string()).collect(),
            ..Default::default()
        }),
        liveness: None,
    })
}

impl TestEngine {
    /// A hand-driven control channel for `sub`, already open.
    pub async fn raw_control(&self, sub: &str) -> TlsStream<TcpStream> {
        let mut raw = self.raw().await;
        roundtrip(&mut raw, control_req(self.token(sub))).await;
        raw
    }
}

impl TestEngine {
    /// The engine's QUIC address (the UDP side of its TLS port).
    pub fn quic_addr(&self) -> SocketAddr {
        self.engine.quic_addr.expect("QUIC is on by default")
    }

    /// A raw QUIC client endpoint bound to `from` (port 0), trusting the
    /// engine's CA and offering `alpn` alone, with `transport`'s settings:
    /// for what the agent library would never send.
    pub fn quic_endpoint(
        &self,
        from: std::net::IpAddr,
        alpn: &[u8],
        transport: quinn::TransportConfig,
    ) -> quinn::Endpoint {
        let tls = Arc::unwrap_or_clone(self.public_tls_config(&[alpn]));
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("TLS 1.3 for QUIC");
        let mut config = quinn::ClientConfig::new(Arc::new(crypto));
        config.transport_config(Arc::new(transport));
        // The engine's own socket helper: large kernel buffers, so a burst
        // of a thousand handshakes' closes is not lost on the way in.
        let socket = strait_engine::net::udp_socket(SocketAddr::new(from, 0)).unwrap();
        let runtime = Arc::new(quinn::TokioRuntime);
        let mut endpoint = quinn::Endpoint::new(quinn::EndpointConfig::default(), None, socket, runtime).unwrap();
        endpoint.set_default_client_config(config);
        endpoint
    }

    /// A raw QUIC connection to the agent port from 127.0.0.1: ALPN
    /// `rstrm/1`, quinn's default transport, the handshake done.
    pub async fn quic_connect(&self) -> quinn::Connection {
        let endpoint = self.quic_endpoint([127, 0, 0, 1].into(), strait_proto::ALPN, Default::default());
        let connecting = endpoint.connect(self.quic_addr(), "localhost").unwrap();
        tokio::time::timeout(STEP, connecting).await.expect("a QUIC handshake in time").expect("the QUIC handshake")
    }

    /// A hand-driven control channel for `sub` on a stream of `conn`,
    /// already open: its sending side and a reader of what comes back.
    pub async fn raw_quic_control(
        &self,
        conn: &quinn::Connection,
        sub: &str,
    ) -> (quinn::SendStream, FrameReader<quinn::RecvStream>) {
        self.raw_quic_control_naming(conn, sub, &[]).await
    }

    /// The same, naming strait's protocol extensions `features`.
    pub async fn raw_quic_control_naming(
        &self,
        conn: &quinn::Connection,
        sub: &str,
        features: &[&str],
    ) -> (quinn::SendStream, FrameReader<quinn::RecvStream>) {
        let open = async {
            let (mut send, recv) = conn.open_bi().await.unwrap();
            write_message(&mut send, &control_req_naming(self.token(sub), features).into()).await.unwrap();
            let mut reader = FrameReader::new(recv, MAX_FRAME_LEN);
            let answer = reader.read_message().await.unwrap();
            (send, reader, answer)
        };
        let (send, reader, answer) = tokio::time::timeout(STEP, open).await.expect("a control channel in time");
        let opened = match &answer.payload {
            Some(Payload::OpenControlChannelRsp(rsp)) => rsp.payload.as_ref(),
            _ => None,
        };
        assert!(matches!(opened, Some(strait_proto::OpenControlChannelResult::Ok(_))), "{answer:?}");
        (send, reader)
    }
}

/// Sends one message and reads one back.
pub async fn roundtrip(io: &mut TlsStream<TcpStream>, payload: Payload) -> Message {
    write_message(io, &payload.into()).await.unwrap();
    let mut reader = FrameReader::new(io, MAX_FRAME_LEN);
    reader.read_message().await.unwrap()
}

/// Reads until the peer closes; returns what arrived. Ends when the engine
/// closes the connection: the test waits on that event, not on a timer.
pub async fn read_to_close(io: &mut TlsStream<TcpStream>) -> Vec<u8> {
    let mut out = Vec::new();
    let _ = io.read_to_end(&mut out).await;
    out
}

/// A local echo service: every connection gets back what it sends.
pub async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = listener.accept().await else { return };
            tokio::spawn(async move {
                let (mut r, mut w) = tcp.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// A local UDP echo service: every datagram goes back to its sender.
pub async fn udp_echo_server() -> SocketAddr {
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65_536];
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            let _ = socket.send_to(&buf[..n], from).await;
        }
    });
    addr
}

/// One HTTP answer from the Engine API.
pub struct HttpAnswer {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: String,
}

impl HttpAnswer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// Sends one HTTP/1.1 request over a connection the caller opened.
pub async fn http_request<S>(io: S, path: &str, token: Option<&str>) -> (u16, http::HeaderMap, hyper::body::Incoming)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io)).await.expect("HTTP handshake");
    tokio::spawn(conn);
    let mut request = http::Request::get(path).header("host", "localhost");
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let response = sender
        .send_request(request.body(http_body_util::Empty::<bytes::Bytes>::new()).unwrap())
        .await
        .expect("HTTP response");
    let (parts, body) = response.into_parts();
    (parts.status.as_u16(), parts.headers, body)
}

/// Reads a whole body.
pub async fn read_body(body: hyper::body::Incoming) -> String {
    use http_body_util::BodyExt;
    String::from_utf8(body.collect().await.expect("body").to_bytes().to_vec()).expect("UTF-8 body")
}

impl TestEngine {
    /// `GET path` on the Engine API over TLS (SNI localhost, ALPN http/1.1).
    pub async fn api_get(&self, path: &str, token: Option<&str>) -> HttpAnswer {
        let tls = self.raw_with_alpn(&[b"http/1.1"]).await;
        let (status, headers, body) = http_request(tls, path, token).await;
        HttpAnswer { status, headers, body: read_body(body).await }
    }

    /// `GET path` on the metrics listener (plain HTTP).
    pub async fn metrics_get(&self, path: &str, token: Option<&str>) -> HttpAnswer {
        let addr = self.engine.metrics_addr.expect("a metrics listener");
        let tcp = TcpStream::connect(addr).await.unwrap();
        let (status, headers, body) = http_request(tcp, path, token).await;
        HttpAnswer { status, headers, body: read_body(body).await }
    }

    /// Opens `GET /api/sse` and returns its event reader.
    pub async fn sse(&self, query: &str, token: &str) -> SseReader {
        let tls = self.raw_with_alpn(&[b"http/1.1"]).await;
        let (status, headers, body) = http_request(tls, &format!("/api/sse{query}"), Some(token)).await;
        assert_eq!(status, 200, "SSE refused");
        assert_eq!(headers["content-type"], "text/event-stream");
        SseReader { body, buffer: String::new() }
    }
}

/// What an SSE stream carries: events and comments.
#[derive(Debug)]
pub enum SseItem {
    Event(serde_json::Value),
    Comment(String),
}

/// Splits an SSE body into items as they arrive.
pub struct SseReader {
    body: hyper::body::Incoming,
    buffer: String,
}

impl SseReader {
    /// The next event or comment; `None` when the stream ends.
    pub async fn next(&mut self) -> Option<SseItem> {
        use http_body_util::BodyExt;
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut data = Vec::new();
                let mut comment = None;
                for line in block.lines() {
                    if let Some(d) = line.strip_prefix("data:") {
                        data.push(d.trim_start().to_string());
                    } else if let Some(c) = line.strip_prefix(':') {
                        comment = Some(c.trim().to_string());
                    }
                }
                if !data.is_empty() {
                    return Some(SseItem::Event(serde_json::from_str(&data.join("\n")).expect("event JSON")));
                }
                if let Some(c) = comment {
                    return Some(SseItem::Comment(c));
                }
                continue;
            }
            let frame = self.body.frame().await?.ok()?;
            if let Ok(data) = frame.into_data() {
                self.buffer.push_str(std::str::from_utf8(&data).expect("UTF-8 SSE"));
            }
        }
    }

    /// The next event, skipping comments; panics if the stream ends.
    pub async fn event(&mut self) -> serde_json::Value {
        loop {
            match self.next().await.expect("SSE stream ended") {
                SseItem::Event(e) => return e,
                SseItem::Comment(_) => continue,
            }
        }
    }
}
// ---- Published tunnels: the public side and stand-in services. ----

pub type TestBody = http_body_util::combinators::BoxBody<bytes::Bytes, std::io::Error>;
pub type Handler = Arc<
    dyn Fn(
            http::Request<hyper::body::Incoming>,
        ) -> std::pin::Pin<Box<dyn Future<Output = http::Response<TestBody>> + Send>>
        + Send
        + Sync,
>;

/// A body from bytes, for requests and stand-in responses.
pub fn full(bytes: impl Into<bytes::Bytes>) -> TestBody {
    use http_body_util::BodyExt;
    http_body_util::Full::new(bytes.into()).map_err(|never| match never {}).boxed()
}

/// Published HTTP tunnel properties for `<label>.t.localhost`.
pub fn published(label: &str) -> strait_agent::TunnelProperties {
    strait_agent::TunnelProperties {
        publish: Some(true),
        hostname: Some(format!("{label}.t.localhost")),
        ..Default::default()
    }
}

impl TestEngine {
    /// The engine's CA, for public clients.
    pub fn public_tls_config(&self, alpns: &[&[u8]]) -> Arc<rustls::ClientConfig> {
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        let pem = std::fs::read(&self.ca).unwrap();
        for cert in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
            roots.add(cert.unwrap()).unwrap();
        }
        let mut config = rustls::ClientConfig::builder_with_provider(strait_engine::crypto_provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = alpns.iter().map(|a| a.to_vec()).collect();
        Arc::new(config)
    }

    /// A public TCP connection to the TLS port from a chosen loopback address.
    pub async fn public_tcp(&self, from: std::net::IpAddr) -> TcpStream {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::new(from, 0)).unwrap();
        socket.connect(self.addr).await.unwrap()
    }

    /// A public TLS connection to `host` (SNI), from 127.0.0.1.
    pub async fn public(&self, host: &str, alpns: &[&[u8]]) -> TlsStream<TcpStream> {
        self.public_from([127, 0, 0, 1].into(), host, alpns).await
    }

    pub async fn public_from(&self, from: std::net::IpAddr, host: &str, alpns: &[&[u8]]) -> TlsStream<TcpStream> {
        let tcp = self.public_tcp(from).await;
        let connector = tokio_rustls::TlsConnector::from(self.public_tls_config(alpns));
        connector.connect(ServerName::try_from(host.to_string()).unwrap(), tcp).await.unwrap()
    }

    /// An HTTP/1.1 client connection to `host`.
    pub async fn h1(&self, host: &str) -> hyper::client::conn::http1::SendRequest<TestBody> {
        let tls = self.public(host, &[b"http/1.1"]).await;
        let (sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await.unwrap();
        tokio::spawn(conn.with_upgrades());
        sender
    }

    /// An HTTP/2 client connection to `host`.
    pub async fn h2(&self, host: &str) -> hyper::client::conn::http2::SendRequest<TestBody> {
        let tls = self.public(host, &[b"h2"]).await;
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        let (sender, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tls),
        )
        .await
        .unwrap();
        tokio::spawn(conn);
        sender
    }

    /// Published streams paired since start, from the metrics.
    pub fn published_streams(&self) -> u64 {
        let text = self.engine.shared.metrics.encode();
        text.lines()
            .find_map(|l| l.strip_prefix("strait_streams_total{kind=\"published\"} "))
            .map_or(0, |n| n.trim().parse().unwrap())
    }
}

/// A stand-in HTTP service (HTTP/1.1 and h2c by prior knowledge, with
/// upgrades) answering with `handler`.
pub async fn http_service(handler: Handler) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { return };
            let handler = handler.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let handler = handler.clone();
                    async move { Ok::<_, std::convert::Infallible>(handler(req).await) }
                });
                let mut builder = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
                builder.http1().preserve_header_case(true);
                let _ = builder.serve_connection_with_upgrades(hyper_util::rt::TokioIo::new(tcp), service).await;
            });
        }
    });
    addr
}

/// Opens a published tunnel with the agent library and forwards it to `local`.
pub async fn publish(
    engine: &TestEngine,
    properties: strait_agent::TunnelProperties,
    local: SocketAddr,
) -> (strait_agent::ControlChannel, strait_agent::TunnelProperties) {
    let control = engine.client("alice").connect().await.unwrap();
    let mut tunnel = control.open_tunnel(properties).await.unwrap();
    let props = tunnel.properties().clone();
    tokio::spawn(async move { tunnel.forward(local.to_string()).await });
    (control, props)
}

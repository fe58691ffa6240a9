//! Published HTTP tunnels end to end: the real engine, the real agent
//! library, stand-in services and hyper clients over real TLS.

mod common;

use std::sync::Arc;

use bytes::Bytes;
use common::*;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use std::time::Duration;
use strait_proto::{FrameReader, MAX_FRAME_LEN, OpenTunnelReq, Payload, ProxyConnRsp, write_message};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Echoes what the service saw: method, target, version, body size and
/// the headers a test asks about.
fn echo_handler() -> Handler {
    Arc::new(|req: Request<Incoming>| {
        Box::pin(async move {
            let (parts, body) = req.into_parts();
            let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            let mut text = format!("{} {} {:?} {}\n", parts.method, parts.uri, parts.version, body.len());
            for (name, value) in &parts.headers {
                text.push_str(&format!("{}: {}\n", name, value.to_str().unwrap_or("?")));
            }
            http::Response::builder().header("x-echo", "1").body(full(text)).unwrap()
        })
    })
}

async fn text(response: http::Response<Incoming>) -> String {
    String::from_utf8(response.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
}

fn get(host: &str, target: &str) -> Request<TestBody> {
    Request::get(target).header(header::HOST, host).body(full("")).unwrap()
}

#[tokio::test]
async fn headers_paths_and_queries_pass_byte_for_byte() {
    let engine = TestEngine::start().await;
    // A raw service that records the request bytes it receives.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let local = listener.local_addr().unwrap();
    let (seen_tx, seen_rx) = tokio::sync::oneshot::channel::<Vec<u8>>();
    tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.unwrap();
        let mut seen = Vec::new();
        let mut chunk = [0u8; 4096];
        while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = tcp.read(&mut chunk).await.unwrap();
            assert!(n > 0);
            seen.extend_from_slice(&chunk[..n]);
        }
        tcp.write_all(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nSet-Cookie: a=1; Domain=bytes.t.localhost; HttpOnly\r\n\
              Set-Cookie: b=2\r\nETag: \"v1\"\r\nX-MiXeD-Case: yes\r\nCache-Control: max-age=60\r\n\r\nok",
        )
        .await
        .unwrap();
        seen_tx.send(seen).unwrap();
        let _ = tcp.read(&mut chunk).await;
    });
    let (_control, _) = publish(&engine, published("bytes"), local).await;

    let mut public = engine.public("bytes.t.localhost", &[b"http/1.1"]).await;
    public
        .write_all(
            b"GET /gateway/actor@tok/%2Fx//?q=1&q=2&e=%20 HTTP/1.1\r\nHost: bytes.t.localhost\r\n\
              X-Rivet-Token: abc\r\nx-dup: 1\r\nX-Dup: 2\r\nX-Forwarded-For: 10.1.1.1\r\n\r\n",
        )
        .await
        .unwrap();
    let mut response = Vec::new();
    let mut chunk = [0u8; 4096];
    while !response.ends_with(b"\r\n\r\nok") {
        let n = public.read(&mut chunk).await.unwrap();
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&response));
        response.extend_from_slice(&chunk[..n]);
    }
    let response = String::from_utf8(response).unwrap();
    for needle in [
        "HTTP/1.1 200 OK\r\n",
        "Set-Cookie: a=1; Domain=bytes.t.localhost; HttpOnly\r\nSet-Cookie: b=2\r\n",
        "ETag: \"v1\"\r\n",
        "X-MiXeD-Case: yes\r\n",
        "Cache-Control: max-age=60\r\n",
    ] {
        assert!(response.contains(needle), "{needle:?} missing in\n{response}");
    }
    let seen = String::from_utf8(seen_rx.await.unwrap()).unwrap();
    assert!(seen.starts_with("GET /gateway/actor@tok/%2Fx//?q=1&q=2&e=%20 HTTP/1.1\r\n"), "{seen}");
    for needle in [
        "Host: bytes.t.localhost\r\n",
        "X-Rivet-Token: abc\r\n",
        "x-dup: 1\r\nX-Dup: 2\r\n",
        "X-Forwarded-For: 10.1.1.1, 127.0.0.1\r\n",
        "x-forwarded-proto: https\r\n",
        "x-forwarded-host: bytes.t.localhost\r\n",
    ] {
        assert!(seen.contains(needle), "{needle:?} missing in\n{seen}");
    }
}

#[tokio::test]
async fn get_and_post_over_http1_and_http2_reuse_one_agent_stream() {
    let engine = TestEngine::start().await;
    let local = http_service(echo_handler()).await;
    let (_control, props) = publish(&engine, published("app"), local).await;
    assert_eq!(props.hostname.as_deref(), Some("app.t.localhost"));

    let mut h1 = engine.h1("app.t.localhost").await;
    for i in 0..100 {
        let response = h1.send_request(get("app.t.localhost", &format!("/n/{i}?x=y"))).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let body = text(response).await;
        assert!(body.starts_with(&format!("GET /n/{i}?x=y HTTP/1.1 0\n")), "{body}");
    }
    let post = Request::post("/upload").header(header::HOST, "app.t.localhost").body(full(vec![7u8; 100_000])).unwrap();
    let body = text(h1.send_request(post).await.unwrap()).await;
    assert!(body.starts_with("POST /upload HTTP/1.1 100000\n"), "{body}");
    assert_eq!(engine.published_streams(), 1, "a keep-alive client costs one agent stream");

    let mut h2 = engine.h2("app.t.localhost").await;
    let mut tasks = Vec::new();
    for i in 0..20 {
        let mut h2 = h2.clone();
        tasks.push(tokio::spawn(async move {
            let request =
                Request::post(format!("https://app.t.localhost/h2/{i}")).body(full(vec![1u8; 1000 * i])).unwrap();
            let response = h2.send_request(request).await.unwrap();
            assert_eq!(response.version(), http::Version::HTTP_2);
            text(response).await
        }));
    }
    for (i, task) in tasks.into_iter().enumerate() {
        let body = task.await.unwrap();
        assert!(body.starts_with(&format!("POST /h2/{i} HTTP/1.1 {}\n", 1000 * i)), "{body}");
        assert!(body.contains("host: app.t.localhost\n"), "{body}");
        assert!(body.contains("x-forwarded-for: 127.0.0.1\n"), "{body}");
    }
    let concurrent = engine.published_streams() - 1;
    assert!((1..=20).contains(&concurrent), "{concurrent}");
    for _ in 0..20 {
        let response = h2.send_request(get("app.t.localhost", "https://app.t.localhost/again")).await.unwrap();
        text(response).await;
    }
    assert_eq!(engine.published_streams() - 1, concurrent, "sequential requests reuse pooled streams");
}

#[tokio::test]
async fn h2c_upstream() {
    let engine = TestEngine::start().await;
    let local = http_service(echo_handler()).await;
    let props = strait_agent::TunnelProperties { http_version: Some("h2c".into()), ..published("h2c") };
    let (_control, _) = publish(&engine, props, local).await;
    let mut h1 = engine.h1("h2c.t.localhost").await;
    for _ in 0..10 {
        let body = text(h1.send_request(get("h2c.t.localhost", "/v?a=%2F")).await.unwrap()).await;
        assert!(body.starts_with("GET http://h2c.t.localhost/v?a=%2F HTTP/2.0 0\n"), "{body}");
    }
    let mut h2 = engine.h2("h2c.t.localhost").await;
    let body = text(h2.send_request(get("h2c.t.localhost", "https://h2c.t.localhost/z")).await.unwrap()).await;
    assert!(body.starts_with("GET http://h2c.t.localhost/z HTTP/2.0 0\n"), "{body}");
    assert_eq!(engine.published_streams(), 2, "one h2c stream per public connection");
}

/// A service that accepts any upgrade or CONNECT and echoes the bytes.
fn upgrade_echo_handler() -> Handler {
    Arc::new(|mut req: Request<Incoming>| {
        Box::pin(async move {
            let on = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                if let Ok(upgraded) = on.await {
                    let mut io = TokioIo::new(upgraded);
                    let (mut r, mut w) = tokio::io::split(&mut io);
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                }
            });
            let protocol = req.headers().get("sec-websocket-protocol").cloned();
            let mut response = http::Response::builder().header("x-target", req.uri().to_string());
            if req.method() == Method::CONNECT {
                return response.body(full("")).unwrap();
            }
            if !req.headers().contains_key(header::UPGRADE) {
                return response.body(full("plain")).unwrap();
            }
            let asked = req.headers()[header::UPGRADE].clone();
            response = response.status(101).header("Connection", "Upgrade").header("Upgrade", asked);
            if let Some(p) = protocol {
                let first = p.to_str().unwrap().split(',').next().unwrap().trim().to_string();
                response = response.header("Sec-WebSocket-Protocol", first);
            }
            response.header("Sec-WebSocket-Accept", "stand-in").body(full("")).unwrap()
        })
    })
}

async fn echo_through<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(io: &mut S, payload: &[u8]) -> Vec<u8> {
    io.write_all(payload).await.unwrap();
    let mut back = vec![0u8; payload.len()];
    io.read_exact(&mut back).await.unwrap();
    back
}

/// An HTTP/2 extended CONNECT opening a WebSocket (RFC 8441).
fn websocket_connect(uri: &str, subprotocol: Option<&str>) -> Request<TestBody> {
    let mut request = Request::connect(uri).header("sec-websocket-version", "13");
    if let Some(subprotocol) = subprotocol {
        request = request.header("sec-websocket-protocol", subprotocol);
    }
    let mut request = request.body(full("")).unwrap();
    request.extensions_mut().insert(hyper::ext::Protocol::from_static("websocket"));
    request
}

#[tokio::test]
async fn websocket_upgrades_over_http1_and_http2_and_connect() {
    let engine = TestEngine::start().await;
    let local = http_service(upgrade_echo_handler()).await;
    let (_control, _) = publish(&engine, published("ws"), local).await;
    let binary: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();

    // HTTP/1.1 Upgrade, subprotocol chosen by the service and echoed.
    let mut h1 = engine.h1("ws.t.localhost").await;
    let request = Request::get("/gateway/a@b/ws")
        .header(header::HOST, "ws.t.localhost")
        .header(header::CONNECTION, "Upgrade")
        .header(header::UPGRADE, "websocket")
        .header("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")
        .header("Sec-WebSocket-Version", "13")
        .header("Sec-WebSocket-Protocol", "rivet_token.abc, rivet")
        .body(full(""))
        .unwrap();
    let mut response = h1.send_request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    assert_eq!(response.headers()["sec-websocket-protocol"], "rivet_token.abc");
    assert_eq!(response.headers()["x-target"], "/gateway/a@b/ws");
    let upgraded = hyper::upgrade::on(&mut response).await.unwrap();
    assert_eq!(echo_through(&mut TokioIo::new(upgraded), &binary).await, binary);

    // HTTP/2 extended CONNECT becomes an HTTP/1.1 upgrade at the service.
    let mut h2 = engine.h2("ws.t.localhost").await;
    text(h2.send_request(get("ws.t.localhost", "https://ws.t.localhost/warmup")).await.unwrap()).await;
    let request = websocket_connect("https://ws.t.localhost/gateway/a@b/ws", Some("rivet"));
    let mut response = h2.send_request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["sec-websocket-protocol"], "rivet");
    assert!(response.headers().get("sec-websocket-accept").is_none());
    let upgraded = hyper::upgrade::on(&mut response).await.unwrap();
    assert_eq!(echo_through(&mut TokioIo::new(upgraded), &binary).await, binary);

    // CONNECT is relayed to the service, which decides.
    let mut h1 = engine.h1("ws.t.localhost").await;
    let request = Request::connect("db.internal:5432").header(header::HOST, "db.internal:5432").body(full("")).unwrap();
    let mut response = h1.send_request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["x-target"], "db.internal:5432");
    let upgraded = hyper::upgrade::on(&mut response).await.unwrap();
    assert_eq!(echo_through(&mut TokioIo::new(upgraded), b"SELECT 1").await, b"SELECT 1");
}

#[tokio::test]
async fn server_sent_events_arrive_before_the_stream_ends() {
    let engine = TestEngine::start().await;
    // The second event is only sent once the client has read the first.
    let release = Arc::new(tokio::sync::Semaphore::new(0));
    let gate = release.clone();
    let handler: Handler = Arc::new(move |_req| {
        let gate = gate.clone();
        Box::pin(async move {
            let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
            tokio::spawn(async move {
                tx.send(Bytes::from_static(b"data: first\n\n")).await.unwrap();
                gate.acquire().await.unwrap().forget();
                tx.send(Bytes::from_static(b"data: second\n\n")).await.unwrap();
            });
            let stream = futures_util::stream::unfold(rx, |mut rx| async move {
                rx.recv().await.map(|b| (Ok::<_, std::io::Error>(Frame::data(b)), rx))
            });
            http::Response::builder()
                .header("content-type", "text/event-stream")
                .body(BodyExt::boxed(StreamBody::new(stream)))
                .unwrap()
        })
    });
    let local = http_service(handler).await;
    let (_control, _) = publish(&engine, published("sse"), local).await;
    for h2 in [false, true] {
        let mut body = if h2 {
            let mut c = engine.h2("sse.t.localhost").await;
            c.send_request(get("sse.t.localhost", "https://sse.t.localhost/events")).await.unwrap().into_body()
        } else {
            let mut c = engine.h1("sse.t.localhost").await;
            c.send_request(get("sse.t.localhost", "/events")).await.unwrap().into_body()
        };
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(first, "data: first\n\n");
        release.add_permits(1);
        let second = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(second, "data: second\n\n");
    }
}

/// A hand-made agent: a control channel with one published tunnel, for
/// misbehaviours the agent library never shows.
async fn raw_agent(engine: &TestEngine, label: &str) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let mut raw = engine.raw_control("alice").await;
    let open = OpenTunnelReq { request_id: "r1".into(), tunnel_properties: Some(published(label)) };
    roundtrip(&mut raw, Payload::OpenTunnelReq(open)).await;
    raw
}

/// Waits for the engine to ask the raw agent for a stream.
async fn next_proxy_conn_req(
    raw: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
) -> strait_proto::ProxyConnReq {
    let mut reader = FrameReader::new(raw, MAX_FRAME_LEN);
    loop {
        if let Some(Payload::ProxyConnReq(req)) = reader.read_message().await.unwrap().payload {
            return req;
        }
    }
}

async fn status_and_body(engine: &TestEngine, host: &str, target: &str) -> (StatusCode, String) {
    let mut h1 = engine.h1(host).await;
    let response = h1.send_request(get(host, target)).await.unwrap();
    let status = response.status();
    (status, text(response).await)
}

#[tokio::test]
async fn failures_have_their_own_status_and_body() {
    let engine = TestEngine::start_with("timeouts: {stream_request_seconds: 1}\n").await;

    // Unknown host: 404.
    assert_eq!(
        status_and_body(&engine, "nobody.t.localhost", "/").await,
        (StatusCode::NOT_FOUND, "no tunnel for nobody.t.localhost\n".into())
    );

    // The agent's service is down: the agent drops the stream, 502.
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let (_control, _) = publish(&engine, published("down"), closed).await;
    let (status, _) = status_and_body(&engine, "down.t.localhost", "/").await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);

    // The agent refuses the stream: 502.
    let mut refusing = raw_agent(&engine, "refusing").await;
    let public = async { status_and_body(&engine, "refusing.t.localhost", "/").await };
    let agent = async {
        let req = next_proxy_conn_req(&mut refusing).await;
        let rsp = ProxyConnRsp {
            stream_id: req.stream_id,
            error: Some(strait_proto::Error::new(strait_proto::ErrorCode::InvalidStream, "no thanks")),
        };
        write_message(&mut refusing, &Payload::ProxyConnRsp(rsp).into()).await.unwrap();
    };
    let ((status, body), ()) = tokio::join!(public, agent);
    assert_eq!((status, body.as_str()), (StatusCode::BAD_GATEWAY, "upstream refused the stream\n"));

    // The agent goes away while the stream is pending: 503.
    let mut leaving = raw_agent(&engine, "leaving").await;
    let public = async { status_and_body(&engine, "leaving.t.localhost", "/").await };
    let agent = async {
        next_proxy_conn_req(&mut leaving).await;
        drop(leaving);
    };
    let ((status, body), ()) = tokio::join!(public, agent);
    assert_eq!((status, body.as_str()), (StatusCode::SERVICE_UNAVAILABLE, "agent offline\n"));

    // The agent never dials back: 504 after stream_request_seconds.
    let _lazy = raw_agent(&engine, "lazy").await;
    assert_eq!(
        status_and_body(&engine, "lazy.t.localhost", "/").await,
        (StatusCode::GATEWAY_TIMEOUT, "upstream timed out\n".into())
    );
}

#[tokio::test]
async fn token_auth_takes_one_proof_and_keeps_it_from_the_service() {
    let engine = TestEngine::start().await;
    let local = http_service(echo_handler()).await;
    let props = strait_agent::TunnelProperties { token_auth: Some(true), ..published("private") };
    let (_control, _) = publish(&engine, props, local).await;
    let host = "private.t.localhost";
    let good = engine.token("bob");
    let bad = strait_engine::auth::mint(b"another-secret-another-secret-another!!", "bob", Some(60));
    let send = |request: Request<TestBody>| {
        let engine = &engine;
        async move {
            let mut h1 = engine.h1(host).await;
            let response = h1.send_request(request).await.unwrap();
            (response.status(), response.headers().clone(), text(response).await)
        }
    };
    let with_header = |token: &str| {
        Request::get("/p?a=1").header(header::HOST, host).header("Authorization", format!("Bearer {token}"))
    };

    let (status, headers, _) = send(get(host, "/p")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(headers["www-authenticate"], "Bearer");
    assert_eq!(send(with_header(&bad).body(full("")).unwrap()).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(send(get(host, &format!("/p?rstream.token={bad}"))).await.0, StatusCode::UNAUTHORIZED);

    let (status, _, body) =
        send(with_header(&good).header("Authorization", "Basic d29ya2xvYWQ=").body(full("")).unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.starts_with("GET /p?a=1 "), "{body}");
    assert!(!body.contains("Bearer"), "the consumed proof is not forwarded: {body}");
    assert!(body.contains("authorization: Basic d29ya2xvYWQ=\n"), "other credentials pass: {body}");

    let (status, _, body) = send(get(host, &format!("/p/%2F?x=1&rstream.token={good}&y=%20"))).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.starts_with("GET /p/%2F?x=1&y=%20 "), "{body}");

    let two = with_header(&good).uri(format!("/p?rstream.token={good}")).body(full("")).unwrap();
    let (status, _, body) = send(two).await;
    assert_eq!((status, body.as_str()), (StatusCode::BAD_REQUEST, "more than one token in the request\n"));
    let two = with_header(&good).header("Authorization", format!("Bearer {good}")).body(full("")).unwrap();
    assert_eq!(send(two).await.0, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn trusted_ips_allow_addresses_and_cidrs() {
    let engine = TestEngine::start().await;
    let local = http_service(echo_handler()).await;
    let props = |label: &str, ips: &[&str]| strait_agent::TunnelProperties {
        trusted_ips: ips.iter().map(|s| s.to_string()).collect(),
        ..published(label)
    };
    let (_a, _) = publish(&engine, props("one", &["127.0.0.2", "::1"]), local).await;
    let (_b, _) = publish(&engine, props("net", &["10.0.0.0/8", "127.0.0.0/30"]), local).await;
    let status_from = |from: [u8; 4], host: &'static str| {
        let engine = &engine;
        async move {
            let tls = engine.public_from(from.into(), host, &[b"http/1.1"]).await;
            let (mut h1, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.unwrap();
            tokio::spawn(conn);
            let response = h1.send_request(get(host, "/")).await.unwrap();
            let status = response.status();
            let body = text(response).await;
            (status, body)
        }
    };
    assert_eq!(status_from([127, 0, 0, 2], "one.t.localhost").await.0, StatusCode::OK);
    assert_eq!(
        status_from([127, 0, 0, 3], "one.t.localhost").await,
        (StatusCode::FORBIDDEN, "source address not allowed\n".into())
    );
    assert_eq!(status_from([127, 0, 0, 3], "net.t.localhost").await.0, StatusCode::OK);
    assert_eq!(status_from([127, 0, 0, 4], "net.t.localhost").await.0, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn idle_connections_close_and_busy_ones_stay() {
    let engine = TestEngine::start_with("timeouts: {http_idle_seconds: 1}\n").await;
    let local = http_service(upgrade_echo_handler()).await;
    let (_control, _) = publish(&engine, published("idle"), local).await;

    // An idle keep-alive connection is closed by the engine.
    for h2 in [false, true] {
        let tls = engine.public("idle.t.localhost", if h2 { &[b"h2"] } else { &[b"http/1.1"] }).await;
        let started = tokio::time::Instant::now();
        // The senders stay alive: a client connection ends with its last sender.
        let (closed, _h1, _h2) = if h2 {
            let (mut c, conn) =
                hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), TokioIo::new(tls))
                    .await
                    .unwrap();
            let conn = tokio::spawn(conn);
            text(c.send_request(get("idle.t.localhost", "https://idle.t.localhost/")).await.unwrap()).await;
            (conn, None, Some(c))
        } else {
            let (mut c, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.unwrap();
            let conn = tokio::spawn(conn);
            text(c.send_request(get("idle.t.localhost", "/")).await.unwrap()).await;
            (conn, Some(c), None)
        };
        let result =
            tokio::time::timeout(Duration::from_secs(10), closed).await.expect("idle connection closed").unwrap();
        assert!(
            started.elapsed() >= Duration::from_millis(900),
            "h2={h2} closed too early: {:?} {result:?}",
            started.elapsed()
        );
    }

    // An upgraded connection kept up by pings outlives the idle timeout
    // several times over.
    let mut h1 = engine.h1("idle.t.localhost").await;
    let request = Request::get("/ws")
        .header(header::HOST, "idle.t.localhost")
        .header(header::CONNECTION, "Upgrade")
        .header(header::UPGRADE, "websocket")
        .body(full(""))
        .unwrap();
    let mut response = h1.send_request(request).await.unwrap();
    let mut io = TokioIo::new(hyper::upgrade::on(&mut response).await.unwrap());
    let mut ticks = tokio::time::interval(Duration::from_millis(300));
    for _ in 0..12 {
        ticks.tick().await;
        io.write_all(b"ping").await.unwrap();
        let mut pong = [0u8; 4];
        io.read_exact(&mut pong).await.unwrap();
        assert_eq!(&pong, b"ping");
    }
    // Silent, it is closed like any idle connection.
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), io.read_to_end(&mut rest)).await.expect("idle upgrade closed").ok();
}

#[tokio::test]
async fn a_slow_response_is_never_cut_by_the_idle_timer() {
    let engine = TestEngine::start_with("timeouts: {http_idle_seconds: 1}\n").await;
    let handler: Handler = Arc::new(|_req| {
        Box::pin(async move {
            // Silent for longer than the idle timeout, then the body.
            let stream = futures_util::stream::unfold(0u8, |step| async move {
                if step == 0 {
                    tokio::time::sleep(Duration::from_millis(2500)).await;
                    Some((Ok::<_, std::io::Error>(Frame::data(Bytes::from_static(b"late"))), 1))
                } else {
                    None
                }
            });
            http::Response::builder().body(BodyExt::boxed(StreamBody::new(stream))).unwrap()
        })
    });
    let local = http_service(handler).await;
    let (_control, _) = publish(&engine, published("slow"), local).await;
    assert_eq!(status_and_body(&engine, "slow.t.localhost", "/").await, (StatusCode::OK, "late".into()));
}

#[tokio::test]
async fn http_listener_redirects_permanently_keeping_host_path_and_query() {
    let engine = TestEngine::start_with("http: {enabled: true, listen_addr: \"127.0.0.1:0\"}\n").await;
    let addr = engine.engine.http_addr.expect("the HTTP listener is up");
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"GET /a/%2Fb?c=d&e HTTP/1.1\r\nHost: app.t.localhost:80\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    tcp.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 308 Permanent Redirect\r\n"), "{response}");
    let location = format!("location: https://app.t.localhost:{}/a/%2Fb?c=d&e\r\n", engine.addr.port());
    assert!(response.contains(&location), "{response}");
}

#[tokio::test]
async fn hostnames_are_random_requested_unique_and_freed() {
    let engine = TestEngine::start().await;
    let control = engine.client("alice").connect().await.unwrap();
    let random = control
        .open_tunnel(strait_agent::TunnelProperties { publish: Some(true), ..Default::default() })
        .await
        .unwrap();
    let host = random.properties().hostname.clone().unwrap();
    let label = host.strip_suffix(".t.localhost").unwrap();
    assert!(!label.is_empty() && !label.contains('.'), "{host}");
    assert_eq!(random.properties().port, Some(engine.addr.port() as u32));

    let first = control.open_tunnel(published("mine")).await.unwrap();
    let taken = control.open_tunnel(published("mine")).await.err().unwrap();
    assert_eq!(taken.engine_code(), Some(strait_proto::ErrorCode::InvalidRequest));
    // A bare label and an outside name land in the namespace.
    let bare = strait_agent::TunnelProperties { hostname: Some("bare".into()), ..published("x") };
    assert_eq!(control.open_tunnel(bare).await.unwrap().properties().hostname.as_deref(), Some("bare.t.localhost"));
    let outside =
        strait_agent::TunnelProperties { hostname: Some("r0a1b2c3d-edge.t.example.com".into()), ..published("x") };
    let mapped = control.open_tunnel(outside).await.unwrap();
    assert_eq!(mapped.properties().hostname.as_deref(), Some("r0a1b2c3d-edge.t.localhost"));
    let bad = strait_agent::TunnelProperties { hostname: Some("a_b.t.localhost".into()), ..published("x") };
    assert!(control.open_tunnel(bad).await.is_err());

    first.close().await.unwrap();
    control.open_tunnel(published("mine")).await.unwrap();
}

#[tokio::test]
async fn a_service_that_never_answers_gets_a_504_after_the_idle_timeout() {
    let engine = TestEngine::start_with("timeouts: {http_idle_seconds: 1}\n").await;
    // Accepts, reads, never answers.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let local = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = listener.accept().await {
            held.push(tcp);
        }
    });
    let (_control, _) = publish(&engine, published("mute"), local).await;
    assert_eq!(
        status_and_body(&engine, "mute.t.localhost", "/").await,
        (StatusCode::GATEWAY_TIMEOUT, "upstream timed out\n".into())
    );
}

#[tokio::test]
async fn shutdown_lets_a_published_download_in_flight_finish() {
    let engine = TestEngine::start().await;
    let release = Arc::new(tokio::sync::Notify::new());
    let handler: Handler = {
        let release = release.clone();
        Arc::new(move |_req: Request<Incoming>| {
            let release = release.clone();
            Box::pin(async move {
                // The first chunk now; the other 63 once the test has started
                // the engine's shutdown.
                let chunks = futures_util::stream::unfold(0u32, move |i| {
                    let release = release.clone();
                    async move {
                        if i == 64 {
                            return None;
                        }
                        if i == 1 {
                            release.notified().await;
                        }
                        Some((Ok::<_, std::io::Error>(Frame::data(Bytes::from(vec![b'x'; 64 * 1024]))), i + 1))
                    }
                });
                http::Response::builder().body(BodyExt::boxed(StreamBody::new(chunks))).unwrap()
            })
        })
    };
    let service = http_service(handler).await;
    let (_control, props) = publish(&engine, published("drain"), service).await;
    let host = props.hostname.clone().unwrap();
    let mut sender = engine.h1(&host).await;
    let request = Request::get("/big").header(header::HOST, &host).body(full("")).unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    let mut received = first.len();

    let shared = engine.engine.shared.clone();
    let stopping = tokio::spawn(engine.engine.into_inner().shutdown());
    shared.shutdown.cancelled().await;
    release.notify_one();
    while let Some(frame) = body.frame().await {
        received += frame.expect("the download is not cut").into_data().map_or(0, |d| d.len());
    }
    assert_eq!(received, 64 * 64 * 1024);
    stopping.await.unwrap();
}

/// A hand-written HTTP/1.1 service: answers each request by its path,
/// with framings and failures hyper-made services never show. A body
/// framed by `Content-Length` is read before the answer; a chunked one is
/// answered only once its last chunk (`0\r\n\r\n`) arrived, so a body
/// cut short is never answered.
struct RawService {
    addr: std::net::SocketAddr,
    /// Connections accepted.
    accepted: Arc<std::sync::atomic::AtomicUsize>,
    /// Every byte each connection carried, sent when the engine closed it.
    transcripts: tokio::sync::mpsc::UnboundedReceiver<String>,
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

async fn raw_service() -> RawService {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = accepted.clone();
    let (transcript_tx, transcripts) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = listener.accept().await else { return };
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let transcript_tx = transcript_tx.clone();
            tokio::spawn(async move {
                let mut transcript = Vec::new();
                let mut seen = Vec::new();
                let mut chunk = [0u8; 4096];
                // Reads more; false at the end of the connection.
                async fn more(
                    tcp: &mut tokio::net::TcpStream,
                    chunk: &mut [u8],
                    seen: &mut Vec<u8>,
                    transcript: &mut Vec<u8>,
                ) -> bool {
                    match tcp.read(chunk).await {
                        Ok(0) | Err(_) => false,
                        Ok(n) => {
                            seen.extend_from_slice(&chunk[..n]);
                            transcript.extend_from_slice(&chunk[..n]);
                            true
                        }
                    }
                }
                'requests: loop {
                    let Some(end) = find(&seen, b"\r\n\r\n") else {
                        if !more(&mut tcp, &mut chunk, &mut seen, &mut transcript).await {
                            break;
                        }
                        continue;
                    };
                    let head = String::from_utf8_lossy(&seen[..end]).into_owned();
                    seen.drain(..end + 4);
                    let lower = head.to_ascii_lowercase();
                    if lower.contains("\r\ntransfer-encoding: chunked") {
                        let end = loop {
                            match find(&seen, b"0\r\n\r\n") {
                                Some(end) => break end,
                                None if more(&mut tcp, &mut chunk, &mut seen, &mut transcript).await => {}
                                None => break 'requests,
                            }
                        };
                        seen.drain(..end + 5);
                    } else if let Some(length) = lower
                        .split("\r\n")
                        .find_map(|l| l.strip_prefix("content-length: "))
                        .and_then(|n| n.parse().ok())
                    {
                        while seen.len() < length {
                            if !more(&mut tcp, &mut chunk, &mut seen, &mut transcript).await {
                                break 'requests;
                            }
                        }
                        seen.drain(..length);
                    }
                    let path = head.split(' ').nth(1).unwrap_or_default().to_string();
                    let (answer, close): (Vec<u8>, bool) = match path.as_str() {
                        "/chunked" => {
                            (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-T: 1\r\n\r\n".to_vec(), false)
                        }
                        "/early" => (
                            b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\nHTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n".to_vec(),
                            false,
                        ),
                        "/head" => (b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n".to_vec(), false),
                        "/old" => (b"HTTP/1.0 200 OK\r\nX-Old: 1\r\n\r\nuntil the end".to_vec(), true),
                        "/then-close" => (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec(), true),
                        "/garbage" => (b"SSH-2.0-OpenSSH_9.6\r\n\r\n".to_vec(), true),
                        "/huge" => {
                            let mut head = b"HTTP/1.1 200 OK\r\n".to_vec();
                            for i in 0..2000 {
                                head.extend_from_slice(format!("X-Filler-{i}: {}\r\n", "f".repeat(40)).as_bytes());
                            }
                            head.extend_from_slice(b"Content-Length: 0\r\n\r\n");
                            (head, true)
                        }
                        "/cut" => (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc".to_vec(), true),
                        _ => (format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{head}", head.len()).into_bytes(), false),
                    };
                    if tcp.write_all(&answer).await.is_err() || close {
                        break;
                    }
                }
                let _ = transcript_tx.send(String::from_utf8_lossy(&transcript).into_owned());
            });
        }
    });
    RawService { addr, accepted, transcripts }
}

/// Sends `requests` in one write on a fresh public HTTP/1.1 connection and
/// returns everything the engine answered until it closed.
async fn exchange_raw(engine: &TestEngine, host: &str, requests: impl AsRef<[u8]>) -> String {
    let mut public = engine.public(host, &[b"http/1.1"]).await;
    public.write_all(requests.as_ref()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), public.read_to_end(&mut answer))
        .await
        .expect("the engine closes")
        .ok();
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn plain_requests_pass_with_every_response_framing() {
    let engine = TestEngine::start().await;
    let RawService { addr: service, accepted, .. } = raw_service().await;
    let (_control, _) = publish(&engine, published("raw"), service).await;
    let get = |path: &str, last: bool| {
        format!(
            "GET {path} HTTP/1.1\r\nHost: raw.t.localhost\r\n{}\r\n",
            if last { "Connection: close\r\n" } else { "" }
        )
    };

    // Pipelined on one connection: a chunked body with trailers, an early
    // hint before a 204, a HEAD whose response announces a body it does
    // not carry, and a last request echoed back. One agent stream carries
    // them all, in order.
    let requests = [
        get("/chunked", false),
        get("/early", false),
        "HEAD /head HTTP/1.1\r\nHost: raw.t.localhost\r\n\r\n".to_string(),
        get("/echo", true),
    ]
    .concat();
    let answer = exchange_raw(&engine, "raw.t.localhost", &requests).await;
    let expected_start = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-T: 1\r\n\r\n\
         HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\nHTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n\
         HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\nHTTP/1.1 200 OK\r\n";
    assert!(answer.starts_with(expected_start), "{answer}");
    assert!(answer.ends_with("x-forwarded-host: raw.t.localhost"), "{answer}");
    assert!(
        answer.contains("GET /echo HTTP/1.1\r\nHost: raw.t.localhost\r\nx-forwarded-for: 127.0.0.1\r\n"),
        "{answer}"
    );
    assert!(!answer.contains("Connection: close"), "hop-by-hop headers stay on the public hop: {answer}");
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);

    // A body delimited by the close of an HTTP/1.0 service: passed on, and
    // the public connection closes after it.
    let answer = exchange_raw(&engine, "raw.t.localhost", &get("/old", false)).await;
    assert_eq!(answer, "HTTP/1.1 200 OK\r\nX-Old: 1\r\nconnection: close\r\n\r\nuntil the end");

    // A kept agent stream the service closed after answering: the next
    // request goes again on a fresh stream.
    let answer =
        exchange_raw(&engine, "raw.t.localhost", &[get("/then-close", false), get("/after", true)].concat()).await;
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n"), "{answer}");
    assert!(answer.contains("GET /after HTTP/1.1\r\n"), "{answer}");
}

#[tokio::test]
async fn broken_service_responses_get_a_502_or_a_close() {
    let engine = TestEngine::start().await;
    let RawService { addr: service, .. } = raw_service().await;
    let (_control, _) = publish(&engine, published("bad"), service).await;
    let get = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: bad.t.localhost\r\n\r\n");

    // Not HTTP, and a response head beyond 64 KiB: a 502 page, and the
    // public connection carries the next request.
    for path in ["/garbage", "/huge"] {
        let answer = exchange_raw(
            &engine,
            "bad.t.localhost",
            &[get(path), get("/fine").replace("\r\n\r\n", "\r\nConnection: close\r\n\r\n")].concat(),
        )
        .await;
        assert!(
            answer.starts_with("HTTP/1.1 502 Bad Gateway\r\n") && answer.contains("upstream refused the stream\n"),
            "{path}: {answer}"
        );
        assert!(answer.contains("GET /fine HTTP/1.1\r\n"), "{path}: {answer}");
    }

    // A body cut short: the client sees the connection close before the
    // announced length, never a shorter body presented as complete.
    let answer = exchange_raw(&engine, "bad.t.localhost", &get("/cut")).await;
    assert_eq!(answer, "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc");
}

#[tokio::test]
async fn malformed_request_heads_get_an_error_and_never_reach_the_service() {
    let engine = TestEngine::start().await;
    let RawService { addr: service, accepted, .. } = raw_service().await;
    let (_control, _) = publish(&engine, published("strict"), service).await;
    // Connection: close, so every answer ends with the connection.
    let host = "Host: strict.t.localhost\r\nConnection: close\r\n";
    for (request, status) in [
        (format!("GET / HTTP/1.1\r\n{host}Bad Header\r\n\r\n"), "400"),
        (format!("GET / HTTP/1.1\r\n{host}Host: strict.t.localhost\r\n\r\n"), "400"),
        (format!("GET / HTTP/1.1\r\n{host}Content-Length: x\r\n\r\n"), "400"),
    ] {
        let answer = exchange_raw(&engine, "strict.t.localhost", &request).await;
        assert!(answer.starts_with(&format!("HTTP/1.1 {status} ")), "{request:?}: {answer}");
    }
    // A head beyond what the relay reads goes on to hyper, which has the
    // last word on its size.
    let mut public = engine.public("strict.t.localhost", &[b"http/1.1"]).await;
    let huge = format!("GET / HTTP/1.1\r\n{host}X-Big: {}\r\n\r\n", "b".repeat(1024 * 1024));
    let (mut read, mut write) = tokio::io::split(&mut public);
    let writing = async { write.write_all(huge.as_bytes()).await.ok() };
    let mut answer = Vec::new();
    let reading = tokio::time::timeout(Duration::from_secs(10), read.read_to_end(&mut answer));
    let (_, read) = tokio::join!(writing, reading);
    read.expect("the engine answers and closes").ok();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 431 "), "{answer}");
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 0, "nothing reached the service");

    // Both framings (RFC 9112 section 6.3): chunked wins and the
    // Content-Length never reaches the service, so the two cannot disagree
    // about where the request ends.
    let smuggle = format!("POST / HTTP/1.1\r\n{host}Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n");
    let answer = exchange_raw(&engine, "strict.t.localhost", &smuggle).await;
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
    let (_, seen) = answer.split_once("\r\n\r\n").unwrap();
    assert!(seen.starts_with("POST / HTTP/1.1\r\n"), "{answer}");
    assert!(!seen.to_ascii_lowercase().contains("content-length"), "{answer}");
}

// ---- Request framing, absolute-form targets, failure pages, idle WebSockets. ----

/// What comes before the request under test on one public HTTP/1.1
/// connection, so that each of the edge's readers meets it: nothing (the
/// relay reads it), a relayed request (the relay hands the connection to
/// hyper with its kept agent stream), or a request with a body (hyper
/// already serves the connection).
fn leads(host: &str) -> [(&'static str, String); 3] {
    [
        ("first on a connection", String::new()),
        ("after a relayed request", format!("GET /warm HTTP/1.1\r\nHost: {host}\r\n\r\n")),
        ("after a request hyper served", format!("POST /warm HTTP/1.1\r\nHost: {host}\r\nContent-Length: 2\r\n\r\nok")),
    ]
}

/// Asserts that `answer` holds one `200` per lead request, then `status`
/// with `body` as the last response.
fn assert_last_answer(what: &str, lead: &str, answer: &str, status: &str, body: &str) {
    let warm = usize::from(!lead.is_empty());
    assert_eq!(answer.matches("HTTP/1.1 200 OK\r\n").count(), warm, "{what}: {answer}");
    let last = &answer[answer.rfind("HTTP/1.1 ").unwrap_or_default()..];
    assert!(last.starts_with(&format!("HTTP/1.1 {status}\r\n")), "{what}: {answer}");
    assert!(last.ends_with(&format!("\r\n\r\n{body}")), "{what}: {answer}");
}

/// Waits for the transcript of every agent stream the engine opened.
async fn transcripts(engine: &TestEngine, service: &mut RawService) -> Vec<String> {
    let mut all = Vec::new();
    for _ in 0..engine.published_streams() {
        all.push(service.transcripts.recv().await.expect("the service is up"));
    }
    all
}

#[tokio::test]
async fn a_malformed_chunked_body_gets_a_400_and_never_reaches_the_service_whole() {
    within(TEST_TIMEOUT, "the answers to malformed chunked bodies", async {
        let engine = TestEngine::start().await;
        let mut service = raw_service().await;
        let (_control, _) = publish(&engine, published("chunky"), service.addr).await;
        let host = "chunky.t.localhost";
        // Not a chunk size; more data than the size says.
        for body in ["zz\r\nhello\r\n0\r\n\r\n", "5\r\nhello!!\r\n0\r\n\r\n"] {
            for (what, lead) in leads(host) {
                let request =
                    format!("{lead}POST /bad HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n{body}");
                let answer = exchange_raw(&engine, host, &request).await;
                assert_last_answer(what, &lead, &answer, "400 Bad Request", "bad request: malformed request body\n");
            }
        }
        // The service never saw a body it could take for complete: it
        // answers a chunked one only after its last chunk.
        for transcript in transcripts(&engine, &mut service).await {
            for request in transcript.split("POST /bad ").skip(1) {
                let (_, body) = request.split_once("\r\n\r\n").unwrap_or_default();
                assert!(!body.contains("0\r\n\r\n"), "{transcript}");
            }
        }

        // An h2c tunnel: hyper's HTTP/2 client towards the agent.
        let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
        let handler: Handler = Arc::new(move |req: Request<Incoming>| {
            let seen_tx = seen_tx.clone();
            Box::pin(async move {
                let whole = req.into_body().collect().await.is_ok();
                seen_tx.send(whole).unwrap();
                http::Response::builder().body(full("taken")).unwrap()
            })
        });
        let local = http_service(handler).await;
        let props = strait_agent::TunnelProperties { http_version: Some("h2c".into()), ..published("chunky2c") };
        let (_h2c, _) = publish(&engine, props, local).await;
        let host = "chunky2c.t.localhost";
        let request = format!("POST /bad HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n");
        let answer = exchange_raw(&engine, host, &request).await;
        assert_last_answer("h2c", "", &answer, "400 Bad Request", "bad request: malformed request body\n");
        while let Ok(whole) = seen.try_recv() {
            assert!(!whole, "the h2c service took a cut body for complete");
        }
    })
    .await
}

#[tokio::test]
async fn an_invalid_content_length_gets_a_400_and_never_reaches_the_service() {
    within(TEST_TIMEOUT, "the answers to invalid lengths", async {
        let engine = TestEngine::start().await;
        let mut service = raw_service().await;
        let (_control, _) = publish(&engine, published("lengths"), service.addr).await;
        let host = "lengths.t.localhost";
        let framings: [&[u8]; 9] = [
            b"Content-Length: 5\xff",
            b"Content-Length: 0\xff",
            b"Content-Length: \x80",
            b"Content-Length: 12, 13",
            b"Content-Length: +5",
            b"Content-Length: -1",
            b"Content-Length: 0x5",
            b"Content-Length: 0\r\nContent-Length: 5",
            b"Transfer-Encoding: chunked\xff",
        ];
        for (what, lead) in leads(host) {
            for framing in framings {
                let mut request = lead.clone().into_bytes();
                request.extend_from_slice(format!("GET /bad HTTP/1.1\r\nHost: {host}\r\n").as_bytes());
                request.extend_from_slice(framing);
                request.extend_from_slice(b"\r\nConnection: close\r\n\r\nhello");
                let answer = exchange_raw(&engine, host, &request).await;
                let what = format!("{what}, {}", String::from_utf8_lossy(framing));
                assert_last_answer(&what, &lead, &answer, "400 Bad Request", "");
            }
        }
        for transcript in transcripts(&engine, &mut service).await {
            assert!(!transcript.contains("/bad"), "{transcript}");
        }
    })
    .await
}

/// `echo_handler`, answering with an `x-service` header that names it.
fn tagged_echo(tag: &'static str, paths: Arc<std::sync::Mutex<Vec<String>>>) -> Handler {
    let echo = echo_handler();
    Arc::new(move |req: Request<Incoming>| {
        paths.lock().unwrap().push(req.uri().to_string());
        let answer = echo(req);
        Box::pin(async move {
            let mut response = answer.await;
            response.headers_mut().insert("x-service", http::HeaderValue::from_static(tag));
            response
        })
    })
}

#[tokio::test]
async fn an_absolute_form_target_is_routed_by_its_authority_which_becomes_the_host() {
    within(TEST_TIMEOUT, "the answers to absolute-form targets", async {
        let engine = TestEngine::start().await;
        let paths_a = Arc::new(std::sync::Mutex::new(Vec::new()));
        let a = http_service(tagged_echo("a", paths_a.clone())).await;
        let b = http_service(tagged_echo("b", Default::default())).await;
        let (_a, _) = publish(&engine, published("a"), a).await;
        let (_b, _) = publish(&engine, published("b"), b).await;
        let host = "a.t.localhost";
        for (what, lead) in leads(host) {
            let request = format!(
                "{lead}GET https://b.t.localhost/x/%2F?y=1 HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
            );
            let answer = exchange_raw(&engine, host, &request).await;
            let last = &answer[answer.rfind("HTTP/1.1 200 OK\r\n").unwrap_or_default()..];
            assert!(last.contains("\r\nx-service: b\r\n"), "{what}: {answer}");
            let (_, seen) = last.split_once("\r\n\r\n").unwrap();
            assert!(seen.starts_with("GET /x/%2F?y=1 HTTP/1.1 0\n"), "{what}: {answer}");
            assert!(seen.contains("\nhost: b.t.localhost\n"), "{what}: {answer}");
            assert!(seen.contains("\nx-forwarded-host: b.t.localhost\n"), "{what}: {answer}");
            assert!(!seen.contains("a.t.localhost"), "{what}: {answer}");

            // A target naming no published host goes nowhere.
            for (target, status, body) in [
                ("http://evil.example/", "404 Not Found", "no tunnel for evil.example\n"),
                ("https://localhost/api/tunnels", "404 Not Found", "no tunnel for localhost\n"),
                ("https://u@b.t.localhost/", "400 Bad Request", "bad request: userinfo in the request target\n"),
            ] {
                let request = format!("{lead}GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
                let answer = exchange_raw(&engine, host, &request).await;
                assert_last_answer(&format!("{what}, {target}"), &lead, &answer, status, body);
            }
        }
        assert!(paths_a.lock().unwrap().iter().all(|p| p == "/warm"), "{:?}", paths_a.lock().unwrap());

        // HTTP/2: `:authority` routes, and is the Host the service sees.
        let mut h2 = engine.h2(host).await;
        let request = Request::get("https://b.t.localhost/h2").header(header::HOST, host).body(full("")).unwrap();
        let response = h2.send_request(request).await.unwrap();
        assert_eq!(response.headers()["x-service"], "b");
        let seen = text(response).await;
        assert!(seen.contains("\nhost: b.t.localhost\n") && !seen.contains("a.t.localhost"), "{seen}");
    })
    .await
}

#[tokio::test]
async fn a_refused_local_service_gets_a_502_that_names_nothing_behind_the_agent() {
    within(TEST_TIMEOUT, "the 502 pages", async {
        let engine = TestEngine::start().await;
        // A port nothing listens on: the real agent cannot reach its service.
        let closed = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
        let (_control, _) = publish(&engine, published("gone"), closed).await;
        let host = "gone.t.localhost";
        let generic = |what: &str, answer: &str| {
            assert!(answer.ends_with("\r\n\r\nupstream refused the stream\n"), "{what}: {answer}");
            for detail in [closed.port().to_string().as_str(), "127.0.0.1", "onnection refused", "os error"] {
                assert!(!answer.contains(detail), "{what}: {detail:?} in {answer}");
            }
        };
        // The relay, then hyper on the same connection (a body hands over).
        let answer = exchange_raw(
            &engine,
            host,
            format!(
                "GET / HTTP/1.1\r\nHost: {host}\r\n\r\n\
                 POST / HTTP/1.1\r\nHost: {host}\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
            ),
        )
        .await;
        assert_eq!(answer.matches("HTTP/1.1 502 Bad Gateway\r\n").count(), 2, "{answer}");
        for page in answer.split("HTTP/1.1 502").skip(1) {
            generic("HTTP/1.1", page);
        }
        // HTTP/2.
        let mut h2 = engine.h2(host).await;
        let response = h2.send_request(get(host, "https://gone.t.localhost/")).await.unwrap();
        assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
        generic("HTTP/2", &format!("\r\n\r\n{}", text(response).await));

        // An agent that reports the failure in its ProxyConnRsp, as the
        // rstream agents do: the reason stays in the engine's log.
        let mut agent = raw_agent(&engine, "reporting").await;
        let public = async { status_and_body(&engine, "reporting.t.localhost", "/").await };
        let report = async {
            let req = next_proxy_conn_req(&mut agent).await;
            let error = strait_proto::Error::new(
                strait_proto::ErrorCode::InvalidStream,
                format!("dial tcp {closed}: connect: connection refused"),
            );
            let rsp = ProxyConnRsp { stream_id: req.stream_id, error: Some(error) };
            write_message(&mut agent, &Payload::ProxyConnRsp(rsp).into()).await.unwrap();
        };
        let ((status, body), ()) = tokio::join!(public, report);
        assert_eq!(status, StatusCode::BAD_GATEWAY);
        generic("ProxyConnRsp", &format!("\r\n\r\n{body}"));
    })
    .await
}

type CloseFrame = tokio_tungstenite::tungstenite::protocol::CloseFrame;

/// A WebSocket service: echoes messages (pings are answered by the
/// library) and reports the close frame each connection receives.
async fn websocket_service() -> (std::net::SocketAddr, tokio::sync::mpsc::UnboundedReceiver<Option<CloseFrame>>) {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (closes_tx, closes) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { return };
            let closes_tx = closes_tx.clone();
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(tcp).await else { return };
                while let Some(Ok(message)) = ws.next().await {
                    if let Message::Close(frame) = message {
                        let _ = closes_tx.send(frame);
                    } else if message.is_text() || message.is_binary() {
                        let _ = ws.send(message).await;
                    }
                }
            });
        }
    });
    (addr, closes)
}

/// Talks on a WebSocket kept up by pings for longer than the idle timeout
/// (one second), then stays silent: the engine closes it with 1001 on
/// both sides.
async fn idle_websocket_is_closed_going_away<S>(
    what: &str,
    ws: &mut tokio_tungstenite::WebSocketStream<S>,
    closes: &mut tokio::sync::mpsc::UnboundedReceiver<Option<CloseFrame>>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
    ws.send(Message::text("hello")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("hello"), "{what}");
    let mut ticks = tokio::time::interval(Duration::from_millis(400));
    for _ in 0..5 {
        ticks.tick().await;
        ws.send(Message::Ping("keep".into())).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap(), Message::Pong("keep".into()), "{what}");
    }
    let silent = tokio::time::Instant::now();
    let closed = tokio::time::timeout(Duration::from_secs(10), ws.next()).await.expect("closed after the idle time");
    assert!(silent.elapsed() >= Duration::from_millis(900), "{what}: closed after {:?}", silent.elapsed());
    match closed {
        Some(Ok(Message::Close(Some(frame)))) => {
            assert_eq!((frame.code, frame.reason.as_str()), (CloseCode::Away, "idle timeout"), "{what}");
        }
        other => panic!("{what}: expected a close frame, got {other:?}"),
    }
    let frame = tokio::time::timeout(Duration::from_secs(10), closes.recv()).await.expect("the service hears");
    let frame = frame.unwrap().expect("with a close frame");
    assert_eq!((frame.code, frame.reason.as_str()), (CloseCode::Away, "idle timeout"), "{what}");
    // The client answered the close; the connection ends.
    let end = tokio::time::timeout(Duration::from_secs(10), ws.next()).await.expect("the connection ends");
    assert!(!matches!(end, Some(Ok(_))), "{what}: {end:?}");
}

#[tokio::test]
async fn an_idle_websocket_is_closed_with_1001_on_both_sides() {
    within(TEST_TIMEOUT, "the idle WebSocket's close", async {
        let engine = TestEngine::start_with("timeouts: {http_idle_seconds: 1}\n").await;
        let (service, mut closes) = websocket_service().await;
        let (_control, _) = publish(&engine, published("wsidle"), service).await;
        let host = "wsidle.t.localhost";

        // HTTP/1.1 Upgrade, through the relay's hand-over to hyper.
        let tls = engine.public(host, &[b"http/1.1"]).await;
        let (mut ws, response) = tokio_tungstenite::client_async(format!("wss://{host}/chat"), tls).await.unwrap();
        assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
        idle_websocket_is_closed_going_away("HTTP/1.1", &mut ws, &mut closes).await;

        // HTTP/2 extended CONNECT.
        let mut h2 = engine.h2(host).await;
        let mut response = h2.send_request(websocket_connect(&format!("https://{host}/chat"), None)).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let upgraded = TokioIo::new(hyper::upgrade::on(&mut response).await.unwrap());
        let role = tokio_tungstenite::tungstenite::protocol::Role::Client;
        let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(upgraded, role, None).await;
        idle_websocket_is_closed_going_away("HTTP/2", &mut ws, &mut closes).await;
    })
    .await
}

#[tokio::test]
async fn other_idle_upgrades_and_connect_are_closed_without_a_frame() {
    within(TEST_TIMEOUT, "the idle upgrades' closes", async {
        let engine = TestEngine::start_with("timeouts: {http_idle_seconds: 1}\n").await;
        let local = http_service(upgrade_echo_handler()).await;
        let (_control, _) = publish(&engine, published("rawidle"), local).await;
        let host = "rawidle.t.localhost";
        let upgrade = Request::get("/raw")
            .header(header::HOST, host)
            .header(header::CONNECTION, "Upgrade")
            .header(header::UPGRADE, "x-raw")
            .body(full(""))
            .unwrap();
        let connect =
            Request::connect("db.internal:5432").header(header::HOST, "db.internal:5432").body(full("")).unwrap();
        for request in [upgrade, connect] {
            let what = request.method().to_string();
            let mut h1 = engine.h1(host).await;
            let mut response = h1.send_request(request).await.unwrap();
            assert!(response.status() == StatusCode::SWITCHING_PROTOCOLS || response.status() == StatusCode::OK);
            let mut io = TokioIo::new(hyper::upgrade::on(&mut response).await.unwrap());
            assert_eq!(echo_through(&mut io, b"bytes").await, b"bytes", "{what}");
            let mut rest = Vec::new();
            tokio::time::timeout(Duration::from_secs(10), io.read_to_end(&mut rest)).await.expect("closed").ok();
            assert!(rest.is_empty(), "{what}: {rest:?}");
        }
    })
    .await
}

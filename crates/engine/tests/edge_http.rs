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
use strait_proto::{
    ClientDetails, FrameReader, MAX_FRAME_LEN, OpenControlChannelReq, OpenTunnelReq, Payload, ProxyConnRsp,
    write_message,
};
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
            response = response.status(101).header("Connection", "Upgrade").header("Upgrade", "websocket");
            if let Some(p) = protocol {
                let first = p.to_str().unwrap().split(',').next().unwrap().trim().to_string();
                response = response.header("Sec-WebSocket-Protocol", first);
            }
            response.header("Sec-WebSocket-Accept", "stand-in").body(full("")).unwrap()
        })
    })
}

async fn echo_through(io: hyper::upgrade::Upgraded, payload: &[u8]) -> Vec<u8> {
    let mut io = TokioIo::new(io);
    io.write_all(payload).await.unwrap();
    let mut back = vec![0u8; payload.len()];
    io.read_exact(&mut back).await.unwrap();
    back
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
    assert_eq!(echo_through(upgraded, &binary).await, binary);

    // HTTP/2 extended CONNECT becomes an HTTP/1.1 upgrade at the service.
    let mut h2 = engine.h2("ws.t.localhost").await;
    text(h2.send_request(get("ws.t.localhost", "https://ws.t.localhost/warmup")).await.unwrap()).await;
    let mut request = Request::connect("https://ws.t.localhost/gateway/a@b/ws")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-protocol", "rivet")
        .body(full(""))
        .unwrap();
    request.extensions_mut().insert(hyper::ext::Protocol::from_static("websocket"));
    let mut response = h2.send_request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["sec-websocket-protocol"], "rivet");
    assert!(response.headers().get("sec-websocket-accept").is_none());
    let upgraded = hyper::upgrade::on(&mut response).await.unwrap();
    assert_eq!(echo_through(upgraded, &binary).await, binary);

    // CONNECT is relayed to the service, which decides.
    let mut h1 = engine.h1("ws.t.localhost").await;
    let request = Request::connect("db.internal:5432").header(header::HOST, "db.internal:5432").body(full("")).unwrap();
    let mut response = h1.send_request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["x-target"], "db.internal:5432");
    let upgraded = hyper::upgrade::on(&mut response).await.unwrap();
    assert_eq!(echo_through(upgraded, b"SELECT 1").await, b"SELECT 1");
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

//! One hostname, many services, and per-tunnel policy: path routing and
//! `strait.policy`, through the real engine and agent library over real
//! TLS, from HTTP/1.1 (the relay) and HTTP/2 (hyper) alike.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use base64::Engine as _;
use common::*;
use http::{HeaderMap, Request, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;

/// A public client over HTTP/1.1 (one keep-alive connection: the relay
/// must carry on after a refusal) or HTTP/2.
enum Public {
    H1(hyper::client::conn::http1::SendRequest<TestBody>),
    H2(hyper::client::conn::http2::SendRequest<TestBody>),
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
}

impl Public {
    async fn open(engine: &TestEngine, host: &str, h2: bool) -> Self {
        if h2 { Public::H2(engine.h2(host).await) } else { Public::H1(engine.h1(host).await) }
    }

    fn name(&self) -> &'static str {
        match self {
            Public::H1(_) => "HTTP/1.1",
            Public::H2(_) => "HTTP/2",
        }
    }

    /// Sends `request` (a target in origin form and a Host header).
    async fn send(&mut self, mut request: Request<TestBody>) -> Answer {
        let response = match self {
            Public::H1(sender) => {
                sender.ready().await.unwrap();
                sender.send_request(request).await.unwrap()
            }
            Public::H2(sender) => {
                let host = request.headers()[header::HOST].to_str().unwrap().to_string();
                *request.uri_mut() = format!("https://{host}{}", request.uri()).parse().unwrap();
                request.headers_mut().remove(header::HOST);
                sender.send_request(request).await.unwrap()
            }
        };
        let (parts, body) = response.into_parts();
        let body = String::from_utf8(body.collect().await.unwrap().to_bytes().to_vec()).unwrap();
        Answer { status: parts.status, headers: parts.headers, body }
    }
}

fn request(method: &str, host: &str, target: &str) -> http::request::Builder {
    Request::builder().method(method).uri(target).header(header::HOST, host)
}

fn get(host: &str, target: &str) -> Request<TestBody> {
    request("GET", host, target).body(full("")).unwrap()
}

/// A service that answers `<name> <method> <target>` and the headers it
/// was given, and counts its requests.
fn named(name: &'static str, count: Arc<AtomicUsize>) -> Handler {
    Arc::new(move |req: Request<Incoming>| {
        let count = count.clone();
        Box::pin(async move {
            count.fetch_add(1, Ordering::SeqCst);
            let (parts, body) = req.into_parts();
            let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            let mut text = format!("{name} {} {} {}\n", parts.method, parts.uri, body.len());
            for (key, value) in &parts.headers {
                text.push_str(&format!("{key}: {}\n", value.to_str().unwrap_or("?")));
            }
            http::Response::builder()
                .header("server", "stand-in")
                .header("location", "http://api.internal/next?x=1")
                .header("set-cookie", "sid=1; Domain=api.internal; Path=/")
                .body(full(text))
                .unwrap()
        })
    })
}

/// A published tunnel named `<label><path>`.
fn routed(label: &str, path: Option<&str>, strip: bool, policy: Option<&str>) -> strait_agent::TunnelProperties {
    let mut properties = published(label);
    properties.name = Some(format!("{label}{}", path.unwrap_or("")));
    if let Some(path) = path {
        properties.labels.insert("strait.route.path".into(), path.into());
    }
    if strip {
        properties.labels.insert("strait.route.strip".into(), "true".into());
    }
    if let Some(policy) = policy {
        properties.labels.insert("strait.policy".into(), policy.into());
    }
    properties
}

async fn service(name: &'static str) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let count = Arc::new(AtomicUsize::new(0));
    (http_service(named(name, count.clone())).await, count)
}

#[tokio::test]
async fn one_hostname_splits_by_path_across_agents() {
    within(TEST_TIMEOUT, "every path's answer from its agent, and the refusals of taken paths", async {
        let engine = TestEngine::start().await;
        let host = "keystone.t.localhost";
        let (api, _) = service("api").await;
        let (rtc, _) = service("rtc").await;
        let (ui, _) = service("ui").await;
        // Two agents of one principal: the API and the UI on one, WHIP on
        // the other.
        let (first, _) = publish(&engine, routed("keystone", Some("/api/"), true, None), api).await;
        let mut ui_tunnel = first.open_tunnel(routed("keystone", None, false, None)).await.unwrap();
        tokio::spawn(async move { ui_tunnel.forward(ui.to_string()).await });
        let (_second, _) = publish(&engine, routed("keystone", Some("/rtc/"), false, None), rtc).await;

        for h2 in [false, true] {
            let mut public = Public::open(&engine, host, h2).await;
            let name = public.name();
            let cases = [
                ("/api/v1/streams?q=%2F&x", "api GET /v1/streams?q=%2F&x"),
                ("/api/", "api GET /"),
                ("/rtc/whip/abc", "rtc GET /rtc/whip/abc"),
                ("/", "ui GET /"),
                ("/apix", "ui GET /apix"),
                ("/api", "ui GET /api"),
                ("/static/app.js", "ui GET /static/app.js"),
            ];
            for (target, expected) in cases {
                let answer = public.send(get(host, target)).await;
                assert_eq!(answer.status, StatusCode::OK, "{name} {target}: {}", answer.body);
                assert!(answer.body.starts_with(expected), "{name} {target}: {}", answer.body);
            }
            // WHIP's methods pass as they are.
            for method in ["POST", "PATCH", "DELETE", "OPTIONS"] {
                let answer = public.send(request(method, host, "/rtc/whip/abc").body(full("sdp")).unwrap()).await;
                assert!(answer.body.starts_with(&format!("rtc {method} /rtc/whip/abc")), "{name}: {}", answer.body);
            }
        }

        // Another principal cannot take a path of this hostname; the same path
        // twice is refused, naming the tunnel that has it.
        let bob = engine.client("bob").connect().await.unwrap();
        let refused = bob.open_tunnel(routed("keystone", Some("/other/"), false, None)).await.err().expect("refused");
        assert!(refused.to_string().contains("another principal"), "{refused}");
        let rtc_id = engine.ids()["keystone/rtc/"].clone();
        let refused = first.open_tunnel(routed("keystone", Some("/rtc/"), false, None)).await.err().expect("refused");
        assert!(refused.to_string().contains("path /rtc/ of hostname keystone.t.localhost"), "{refused}");
        assert!(refused.to_string().contains(&rtc_id), "{refused}");
    })
    .await
}

#[tokio::test]
async fn a_split_hostname_without_fallback_answers_404_for_other_paths() {
    within(TEST_TIMEOUT, "the split hostname's answers, its 404 and its 503", async {
        let engine = TestEngine::start().await;
        let (api, _) = service("api").await;
        let (control, props) = publish(&engine, routed("only", Some("/v1"), true, None), api).await;
        for h2 in [false, true] {
            let mut public = Public::open(&engine, "only.t.localhost", h2).await;
            let answer = public.send(get("only.t.localhost", "/v1?a=b")).await;
            assert!(answer.body.starts_with("api GET /?a=b"), "{}", answer.body);
            let answer = public.send(get("only.t.localhost", "/v1/x")).await;
            assert!(answer.body.starts_with("api GET /x"), "{}", answer.body);
            let answer = public.send(get("only.t.localhost", "/v2")).await;
            assert_eq!(answer.status, StatusCode::NOT_FOUND);
            assert_eq!(answer.body, "no route for this path\n");
            // The connection carries on after the refusal.
            let answer = public.send(get("only.t.localhost", "/v1/y")).await;
            assert_eq!(answer.status, StatusCode::OK, "{}", public.name());
        }
        let _ = props;
        drop(control);
        tokio::time::timeout(Duration::from_secs(10), async {
            while !engine.tunnels().is_empty() {
                tokio::task::yield_now().await;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the tunnel leaves with its control channel");
        let mut public = Public::open(&engine, "only.t.localhost", false).await;
        assert_eq!(public.send(get("only.t.localhost", "/v1/x")).await.status, StatusCode::SERVICE_UNAVAILABLE);
    })
    .await
}

#[tokio::test]
async fn denied_paths_and_methods_never_reach_the_service() {
    within(TEST_TIMEOUT, "the policy's refusals and the allowed answer", async {
        let engine = TestEngine::start().await;
        let (local, count) = service("app").await;
        let policy = r#"{"deny_paths": ["/internal/*", "/metrics"], "allow_methods": ["GET", "HEAD", "POST"]}"#;
        let (_control, _) = publish(&engine, routed("video", None, false, Some(policy)), local).await;
        let host = "video.t.localhost";
        for h2 in [false, true] {
            let mut public = Public::open(&engine, host, h2).await;
            let name = public.name();
            for target in ["/internal/x", "/metrics", "/metrics?x=1", "/%69nternal/x", "//internal/y"] {
                let answer = public.send(get(host, target)).await;
                assert_eq!(answer.status, StatusCode::NOT_FOUND, "{name} {target}");
                assert_eq!(answer.body, "not found\n");
            }
            // A path the service would resolve differently is not guessed at.
            for target in ["/v1/../internal/x", "/v1/%2e%2e/metrics", "/./metrics"] {
                let answer = public.send(get(host, target)).await;
                assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{name} {target}");
                assert_eq!(answer.body, "bad request: dot segments in the path\n");
            }
            let answer = public.send(request("HEAD", host, "/metrics").body(full("")).unwrap()).await;
            assert_eq!((answer.status, answer.body.as_str()), (StatusCode::NOT_FOUND, ""), "{name}");
            let answer = public.send(request("DELETE", host, "/v1/x").body(full("")).unwrap()).await;
            assert_eq!(answer.status, StatusCode::METHOD_NOT_ALLOWED, "{name}");
            assert_eq!(answer.headers[header::ALLOW], "GET, HEAD, POST");
            assert_eq!(count.load(Ordering::SeqCst), 0, "{name}: the service saw a refused request");
            let answer = public.send(get(host, "/v1/metrics")).await;
            assert_eq!(answer.status, StatusCode::OK, "{name}");
            count.store(0, Ordering::SeqCst);
        }
    })
    .await
}

#[tokio::test]
async fn basic_auth_checks_bcrypt_and_argon2id_and_keeps_the_proof() {
    within(TEST_TIMEOUT, "the basic-auth refusals and answers", async {
        let engine = TestEngine::start().await;
        let (local, count) = service("app").await;
        let bcrypt = bcrypt::hash("s3cret", 4).unwrap();
        let argon = {
            use argon2::PasswordHasher;
            argon2::Argon2::default().hash_password_with_salt(b"pa:ss", b"0123456789abcdef").unwrap().to_string()
        };
        let policy = serde_json::json!({"basic_auth": [format!("ann:{bcrypt}"), format!("bob:{argon}")]}).to_string();
        let (_control, _) = publish(&engine, routed("private", None, false, Some(&policy)), local).await;
        let host = "private.t.localhost";
        let basic = |user: &str, password: &str| {
            format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}")))
        };
        for h2 in [false, true] {
            let mut public = Public::open(&engine, host, h2).await;
            let name = public.name();
            let answer = public.send(get(host, "/")).await;
            assert_eq!(answer.status, StatusCode::UNAUTHORIZED, "{name}");
            assert_eq!(answer.headers[header::WWW_AUTHENTICATE], "Basic realm=\"strait\", charset=\"UTF-8\"");
            for (user, password) in [("ann", "wrong"), ("eve", "s3cret"), ("bob", "pa:sx")] {
                let refused = request("GET", host, "/").header(header::AUTHORIZATION, basic(user, password));
                assert_eq!(
                    public.send(refused.body(full("")).unwrap()).await.status,
                    StatusCode::UNAUTHORIZED,
                    "{name}"
                );
            }
            assert_eq!(count.load(Ordering::SeqCst), 0);
            for (user, password) in [("ann", "s3cret"), ("bob", "pa:ss"), ("ann", "s3cret")] {
                let good = request("GET", host, "/in").header(header::AUTHORIZATION, basic(user, password));
                let answer = public.send(good.body(full("")).unwrap()).await;
                assert_eq!(answer.status, StatusCode::OK, "{name} {user}: {}", answer.body);
                assert!(
                    !answer.body.to_ascii_lowercase().contains("authorization"),
                    "{name}: proof forwarded: {}",
                    answer.body
                );
            }
            count.store(0, Ordering::SeqCst);
        }
    })
    .await
}

#[tokio::test]
async fn the_rate_limit_answers_429_and_recovers() {
    within(TEST_TIMEOUT, "the rate-limited answers and the recovery", async {
        let engine = TestEngine::start().await;
        let (local, _) = service("app").await;
        let policy = r#"{"rate_limit": {"requests_per_second": 10, "burst": 3}}"#;
        let (_control, _) = publish(&engine, routed("limited", None, false, Some(policy)), local).await;
        let host = "limited.t.localhost";
        for h2 in [false, true] {
            let mut public = Public::open(&engine, host, h2).await;
            let name = public.name();
            let mut statuses = Vec::new();
            for _ in 0..6 {
                statuses.push(public.send(get(host, "/")).await.status.as_u16());
            }
            // Three at once, then refusals (at 10/s a token may come back
            // while the six are sent, never three).
            assert_eq!(&statuses[..3], [200, 200, 200], "{name}: {statuses:?}");
            assert!(statuses[3..].iter().filter(|s| **s == 429).count() >= 2, "{name}: {statuses:?}");
            let answer = public.send(get(host, "/")).await;
            if answer.status == StatusCode::TOO_MANY_REQUESTS {
                assert_eq!(answer.headers[header::RETRY_AFTER], "1");
            }
            // A token is back every 100 ms.
            tokio::time::sleep(Duration::from_millis(350)).await;
            assert_eq!(public.send(get(host, "/")).await.status, StatusCode::OK, "{name}: did not recover");
            tokio::time::sleep(Duration::from_millis(350)).await;
        }
    })
    .await
}

#[tokio::test]
async fn the_upstream_host_headers_and_locations_follow_the_policy() {
    within(TEST_TIMEOUT, "the answers through the rewriting policy", async {
        let engine = TestEngine::start().await;
        let (local, _) = service("app").await;
        let policy = r#"{"host": "api.internal", "rewrite_location": true,
            "request_headers": {"set": {"x-env": "prod"}, "remove": ["x-debug"]},
            "response_headers": {"set": {"strict-transport-security": "max-age=60"}, "remove": ["server"]}}"#;
        let (_control, _) = publish(&engine, routed("rewrite", None, false, Some(policy)), local).await;
        let host = "rewrite.t.localhost";
        for h2 in [false, true] {
            let mut public = Public::open(&engine, host, h2).await;
            let name = public.name();
            let sent = request("GET", host, "/a").header("x-debug", "1").header("x-env", "dev").header("x-keep", "k");
            let answer = public.send(sent.body(full("")).unwrap()).await;
            assert_eq!(answer.status, StatusCode::OK, "{name}");
            let seen = answer.body.to_ascii_lowercase();
            assert!(seen.contains("\nhost: api.internal\n"), "{name}: {seen}");
            assert!(seen.contains("\nx-forwarded-host: rewrite.t.localhost\n"), "{name}: {seen}");
            assert!(seen.contains("\nx-env: prod\n") && !seen.contains("x-env: dev"), "{name}: {seen}");
            assert!(!seen.contains("x-debug") && seen.contains("\nx-keep: k\n"), "{name}: {seen}");
            let location = format!("https://rewrite.t.localhost:{}/next?x=1", engine.addr.port());
            assert_eq!(answer.headers[header::LOCATION], location, "{name}: the public origin, port included");
            assert_eq!(answer.headers[header::SET_COOKIE], "sid=1; Domain=rewrite.t.localhost; Path=/", "{name}");
            assert_eq!(answer.headers["strict-transport-security"], "max-age=60", "{name}");
            assert!(answer.headers.get("server").is_none(), "{name}");
        }
    })
    .await
}

#[tokio::test]
async fn request_bodies_past_the_limit_get_413() {
    within(TEST_TIMEOUT, "the answers to bodies under and over the limit", async {
        let engine = TestEngine::start().await;
        let (local, count) = service("app").await;
        let policy = r#"{"max_request_body_bytes": 10}"#;
        let (_control, _) = publish(&engine, routed("upload", None, false, Some(policy)), local).await;
        let host = "upload.t.localhost";
        for h2 in [false, true] {
            let mut public = Public::open(&engine, host, h2).await;
            let name = public.name();
            let small = public.send(request("POST", host, "/u").body(full("0123456789")).unwrap()).await;
            assert!(small.body.starts_with("app POST /u 10"), "{name}: {}", small.body);
            let large = public.send(request("POST", host, "/u").body(full("0123456789a")).unwrap()).await;
            assert_eq!(large.status, StatusCode::PAYLOAD_TOO_LARGE, "{name}");
            assert_eq!(large.body, "request body too large\n");
        }
        // A streamed body without a length is counted as it comes.
        assert_eq!(count.load(Ordering::SeqCst), 2, "a body with a length over the limit never reached the service");
        let mut public = engine.h1(host).await;
        let (tx, body) = channel_body();
        let sent = tokio::spawn(async move {
            public.send_request(request("POST", host, "/s").body(body).unwrap()).await.map(|r| r.status())
        });
        for _ in 0..4 {
            if tx.send(bytes::Bytes::from_static(b"abcd")).await.is_err() {
                break;
            }
        }
        drop(tx);
        assert_eq!(sent.await.unwrap().unwrap(), StatusCode::PAYLOAD_TOO_LARGE);
    })
    .await
}

/// A request body fed from a channel: no length, sent chunked.
fn channel_body() -> (tokio::sync::mpsc::Sender<bytes::Bytes>, TestBody) {
    let (tx, rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(1);
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, std::io::Error>(hyper::body::Frame::data(b)), rx))
    });
    (tx, http_body_util::StreamBody::new(stream).boxed())
}

#[tokio::test]
async fn a_long_poll_waits_past_the_idle_limit_with_a_response_timeout() {
    within(TEST_TIMEOUT, "the long poll's answer and the 504", async {
        let engine = TestEngine::start_with("timeouts:\n  http_idle_seconds: 1\n").await;
        let slow: Handler = Arc::new(|_req: Request<Incoming>| {
            Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(2500)).await;
                http::Response::builder().body(full("late")).unwrap()
            })
        });
        let local = http_service(slow).await;
        let (_control, _) =
            publish(&engine, routed("poll", None, false, Some(r#"{"response_timeout_seconds": 10}"#)), local).await;
        let (_other, _) = publish(&engine, routed("nopoll", None, false, None), local).await;
        for h2 in [false, true] {
            let mut public = Public::open(&engine, "poll.t.localhost", h2).await;
            let answer = public.send(get("poll.t.localhost", "/wait")).await;
            assert_eq!((answer.status, answer.body.as_str()), (StatusCode::OK, "late"), "{}", public.name());
            let mut public = Public::open(&engine, "nopoll.t.localhost", h2).await;
            let answer = public.send(get("nopoll.t.localhost", "/wait")).await;
            assert_eq!(answer.status, StatusCode::GATEWAY_TIMEOUT, "{}", public.name());
        }
    })
    .await
}

#[tokio::test]
async fn bad_routes_and_policies_are_refused_naming_the_key() {
    within(TEST_TIMEOUT, "the refusals of bad routes and policies", async {
        let engine = TestEngine::start().await;
        let control = engine.client("alice").connect().await.unwrap();
        let cases = [
            (routed("bad", Some("api"), false, None), "strait.route.path"),
            (routed("bad", None, true, None), "strait.route.strip needs strait.route.path"),
            (routed("bad", None, false, Some("{\"deny_paths\": [1]}")), "strait.policy: deny_paths[0]: invalid type"),
            (routed("bad", None, false, Some("{\"rate_limit\": {\"requests_per_second\": -1}}")), "rate_limit"),
            (routed("bad", None, false, Some("{\"basic_auth\": [\"ann:plaintext\"]}")), "basic_auth: user ann"),
            (routed("bad", None, false, Some("{\"colour\": 1}")), "unknown field `colour`"),
        ];
        for (properties, expected) in cases {
            let error = control.open_tunnel(properties).await.err().expect("refused");
            assert!(error.to_string().contains("INVALID_REQUEST") || error.to_string().contains("invalid"), "{error}");
            assert!(error.to_string().contains(expected), "{expected}: {error}");
        }
        let mut private = strait_agent::TunnelProperties::default();
        private.labels.insert("strait.policy".into(), "{}".into());
        let error = control.open_tunnel(private).await.err().expect("refused");
        assert!(error.to_string().contains("apply to published http tunnels only"), "{error}");
        assert!(engine.tunnels().is_empty(), "nothing of a refused tunnel stays");
    })
    .await
}

/// Reads from a raw public connection until `count` responses ending in
/// their body's last line arrived, or the connection closes.
async fn read_until(public: &mut (impl tokio::io::AsyncRead + Unpin), needle: &str, count: usize) -> String {
    use tokio::io::AsyncReadExt;
    let mut seen = Vec::new();
    let mut chunk = [0u8; 8192];
    let read = async {
        while String::from_utf8_lossy(&seen).matches(needle).count() < count {
            let n = public.read(&mut chunk).await.unwrap_or(0);
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&chunk[..n]);
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read).await.expect("responses in time");
    String::from_utf8_lossy(&seen).into_owned()
}

#[tokio::test]
async fn pipelined_bodies_pass_through_the_relay_and_refused_bodies_close() {
    use tokio::io::AsyncWriteExt;
    within(TEST_TIMEOUT, "the pipelined answers and the 413", async {
        let engine = TestEngine::start().await;
        let (local, count) = service("app").await;
        let (_control, _) =
            publish(&engine, routed("posts", None, false, Some(r#"{"max_request_body_bytes": 100000}"#)), local).await;
        let host = "posts.t.localhost";
        let mut public = engine.public(host, &[b"http/1.1"]).await;
        let big = "x".repeat(70_000);
        let requests = format!(
            "POST /a HTTP/1.1\r\nHost: {host}\r\nContent-Length: 5\r\n\r\nhello\
             POST /b HTTP/1.1\r\nHost: {host}\r\nContent-Length: {}\r\n\r\n{big}\
             GET /c HTTP/1.1\r\nHost: {host}\r\n\r\n",
            big.len()
        );
        public.write_all(requests.as_bytes()).await.unwrap();
        let seen = read_until(&mut public, "\r\n\r\napp ", 3).await;
        for expected in ["app POST /a 5\n", "app POST /b 70000\n", "app GET /c 0\n"] {
            assert!(seen.contains(expected), "{expected:?} missing in {seen}");
        }
        // Over the limit: 413 without reading the body, and the connection ends.
        let over = format!("POST /d HTTP/1.1\r\nHost: {host}\r\nContent-Length: 100001\r\n\r\nsome of it");
        public.write_all(over.as_bytes()).await.unwrap();
        let seen = read_until(&mut public, "never", 1).await;
        assert!(seen.starts_with("HTTP/1.1 413 Payload Too Large\r\n"), "{seen}");
        assert!(seen.ends_with("request body too large\n"), "closed after the page: {seen}");
        assert_eq!(count.load(Ordering::SeqCst), 3);
    })
    .await
}

#[tokio::test]
async fn a_token_auth_tunnel_limits_each_token_principal() {
    within(TEST_TIMEOUT, "the answers limited per token principal", async {
        let engine = TestEngine::start().await;
        let (local, _) = service("app").await;
        let mut properties =
            routed("tokens", None, false, Some(r#"{"rate_limit": {"requests_per_second": 0.1, "burst": 2}}"#));
        properties.token_auth = Some(true);
        let (_control, _) = publish(&engine, properties, local).await;
        let host = "tokens.t.localhost";
        for h2 in [false, true] {
            let mut public = Public::open(&engine, host, h2).await;
            let name = public.name();
            let with = |sub: &str| {
                request("GET", host, "/").header(header::AUTHORIZATION, format!("Bearer {}", engine.token(sub)))
            };
            let (ann, bob) = (format!("ann-{name}"), format!("bob-{name}"));
            for _ in 0..2 {
                assert_eq!(public.send(with(&ann).body(full("")).unwrap()).await.status, StatusCode::OK, "{name}");
            }
            assert_eq!(public.send(with(&ann).body(full("")).unwrap()).await.status, StatusCode::TOO_MANY_REQUESTS);
            // The same address, another principal: a bucket of its own.
            assert_eq!(public.send(with(&bob).body(full("")).unwrap()).await.status, StatusCode::OK, "{name}");
            // No token: 401, not counted against anyone.
            assert_eq!(public.send(get(host, "/")).await.status, StatusCode::UNAUTHORIZED);
        }
    })
    .await
}

#[tokio::test]
async fn a_path_whose_agent_is_away_answers_503_not_the_fallback() {
    within(TEST_TIMEOUT, "the away path's 503 and the answers once it is back", async {
        let engine = TestEngine::start().await;
        let (api, _) = service("api").await;
        let (ui, _) = service("ui").await;
        let (api_control, _) = publish(&engine, routed("away", Some("/api/"), false, None), api).await;
        let (_ui_control, _) = publish(&engine, routed("away", None, false, None), ui).await;
        let host = "away.t.localhost";
        let mut public = Public::open(&engine, host, false).await;
        assert!(public.send(get(host, "/api/x")).await.body.starts_with("api "));
        drop(api_control);
        tokio::time::timeout(Duration::from_secs(10), async {
            while engine.tunnels().contains_key("away/api/") {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the API tunnel leaves with its control channel");
        let answer = public.send(get(host, "/api/x")).await;
        assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE, "{}", answer.body);
        assert!(public.send(get(host, "/other")).await.body.starts_with("ui "));
        // Back: served again.
        let (_again, _) = publish(&engine, routed("away", Some("/api/"), false, None), api).await;
        assert!(public.send(get(host, "/api/x")).await.body.starts_with("api "));
    })
    .await
}

#[tokio::test]
async fn the_operators_default_policy_applies_under_every_tunnel() {
    within(TEST_TIMEOUT, "the answers under the operator's default policy", async {
        let yaml =
            "edge:\n  default_policy:\n    deny_paths: [/metrics]\n    response_headers: {set: {x-edge: strait}}\n";
        let engine = TestEngine::start_with(yaml).await;
        let (local, count) = service("app").await;
        // The tunnel's own policy cannot let /metrics through; its keys add.
        let own = r#"{"deny_paths": ["/internal/*"], "response_headers": {"set": {"x-app": "1"}}}"#;
        let (_control, _) = publish(&engine, routed("ops", None, false, Some(own)), local).await;
        let (_plain, _) = publish(&engine, routed("plain", None, false, None), local).await;
        for h2 in [false, true] {
            for host in ["ops.t.localhost", "plain.t.localhost"] {
                let mut public = Public::open(&engine, host, h2).await;
                assert_eq!(public.send(get(host, "/metrics")).await.status, StatusCode::NOT_FOUND, "{host}");
                let answer = public.send(get(host, "/ok")).await;
                assert_eq!(answer.headers["x-edge"], "strait", "{host}");
            }
            let mut public = Public::open(&engine, "ops.t.localhost", h2).await;
            assert_eq!(public.send(get("ops.t.localhost", "/internal/a")).await.status, StatusCode::NOT_FOUND);
            assert_eq!(public.send(get("ops.t.localhost", "/ok")).await.headers["x-app"], "1");
        }
        assert_eq!(count.load(Ordering::SeqCst), 6, "only the allowed requests reached the service");
    })
    .await
}

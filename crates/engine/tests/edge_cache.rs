//! The edge cache (`strait.policy` `cache`): concurrent misses collapse
//! into one upstream fetch, ranges and HEAD come from the stored object,
//! purge through the Engine API, and what HTTP caching forbids is never
//! kept. Real engine, real agent library, real TLS; HTTP/1.1 and HTTP/2.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use http::{Request, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;

/// The artifact: deterministic bytes, so every copy can be compared.
fn artifact(len: usize) -> bytes::Bytes {
    (0..len).map(|i| (i.wrapping_mul(31) ^ (i >> 11)) as u8).collect::<Vec<u8>>().into()
}

fn digest(bytes: &[u8]) -> u64 {
    // FNV-1a: enough to tell copies apart.
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3))
}

/// A video platform stand-in: `/v/artifact` immutable, `/v/cookie` with a
/// cookie, anything else short-lived; counts requests per path. The origin
/// is slow to answer (200 ms) so that concurrent clients meet the fetch in
/// flight; the assertions hold however they interleave.
fn origin(body: bytes::Bytes, hits: Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>) -> Handler {
    Arc::new(move |req: Request<Incoming>| {
        let body = body.clone();
        let hits = hits.clone();
        Box::pin(async move {
            let path = req.uri().path().to_string();
            *hits.lock().unwrap().entry(path.clone()).or_default() += 1;
            tokio::time::sleep(Duration::from_millis(200)).await;
            let response = http::Response::builder().header("etag", "\"v1\"");
            match path.as_str() {
                "/v/artifact" => response
                    .header(header::CACHE_CONTROL, "public, max-age=31536000, immutable")
                    .header(header::CONTENT_TYPE, "application/octet-stream")
                    .body(full(body))
                    .unwrap(),
                "/v/cookie" => response
                    .header(header::CACHE_CONTROL, "max-age=60")
                    .header(header::SET_COOKIE, "sid=1")
                    .body(full("personal"))
                    .unwrap(),
                "/v/private" => {
                    response.header(header::CACHE_CONTROL, "private, max-age=60").body(full("mine")).unwrap()
                }
                _ => response.header(header::CACHE_CONTROL, "max-age=60").body(full(format!("page {path}"))).unwrap(),
            }
        })
    })
}

type Hits = Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>;

fn hits_of(hits: &Hits, path: &str) -> usize {
    hits.lock().unwrap().get(path).copied().unwrap_or(0)
}

async fn cached_tunnel(engine: &TestEngine, label: &str, body: bytes::Bytes) -> (strait_agent::ControlChannel, Hits) {
    let hits: Hits = Arc::default();
    let local = http_service(origin(body, hits.clone())).await;
    let mut properties = published(label);
    let policy = r#"{"cache": {"paths": ["/v/*"], "max_bytes": 268435456, "max_object_bytes": 134217728}}"#;
    properties.labels.insert("strait.policy".into(), policy.into());
    let (control, _) = publish(engine, properties, local).await;
    (control, hits)
}

struct Got {
    status: StatusCode,
    headers: http::HeaderMap,
    body: bytes::Bytes,
}

/// Sends one request on a new public connection (HTTP/2 or HTTP/1.1)
/// and returns the answer with its body still to read.
async fn send(engine: &TestEngine, host: &str, h2: bool, request: http::request::Builder) -> http::Response<Incoming> {
    let request = request.header(header::HOST, host).body(full("")).unwrap();
    if h2 {
        let mut sender = engine.h2(host).await;
        let (mut parts, body) = request.into_parts();
        parts.uri = format!("https://{host}{}", parts.uri).parse().unwrap();
        parts.headers.remove(header::HOST);
        sender.send_request(Request::from_parts(parts, body)).await.unwrap()
    } else {
        engine.h1(host).await.send_request(request).await.unwrap()
    }
}

async fn fetch(engine: &TestEngine, host: &str, h2: bool, request: http::request::Builder) -> Got {
    let (parts, body) = send(engine, host, h2, request).await.into_parts();
    Got { status: parts.status, headers: parts.headers, body: body.collect().await.unwrap().to_bytes() }
}

fn cache_header(got: &Got) -> &str {
    got.headers.get("x-strait-cache").map_or("-", |v| v.to_str().unwrap())
}

/// Fifty clients each take 16 MiB through TLS from one fill: slower than
/// a usual test on a loaded machine in a debug build.
const COALESCING_TIMEOUT: Duration = Duration::from_secs(180);

#[tokio::test]
async fn fifty_cold_gets_cause_one_upstream_fetch_and_get_the_same_bytes() {
    within(COALESCING_TIMEOUT, "fifty cold GETs of 16 MiB and the answers from the stored object", async {
        let engine = TestEngine::start().await;
        let body = artifact(16 << 20);
        let want = digest(&body);
        let (_control, hits) = cached_tunnel(&engine, "video", body.clone()).await;
        let host = "video.t.localhost";
        let engine = Arc::new(engine);
        let mut tasks = Vec::new();
        for i in 0..50 {
            let engine = engine.clone();
            tasks
                .push(tokio::spawn(async move { fetch(&engine, host, i % 2 == 1, Request::get("/v/artifact")).await }));
        }
        let mut how = std::collections::BTreeMap::<String, usize>::new();
        for task in tasks {
            let got = task.await.unwrap();
            assert_eq!(got.status, StatusCode::OK);
            assert_eq!(got.body.len(), body.len());
            assert_eq!(digest(&got.body), want, "a copy differs");
            *how.entry(cache_header(&got).to_string()).or_default() += 1;
        }
        assert_eq!(hits_of(&hits, "/v/artifact"), 1, "one upstream fetch for 50 clients: {how:?}");
        assert_eq!(how.get("MISS"), Some(&1), "{how:?}");
        assert!(how.contains_key("COALESCED"), "clients arriving during the fetch read along: {how:?}");

        // From the stored object: a range, HEAD, a validator.
        for h2 in [false, true] {
            let got =
                fetch(&engine, host, h2, Request::get("/v/artifact").header(header::RANGE, "bytes=1000-1999")).await;
            assert_eq!((got.status, cache_header(&got)), (StatusCode::PARTIAL_CONTENT, "HIT"));
            assert_eq!(got.headers[header::CONTENT_RANGE], format!("bytes 1000-1999/{}", body.len()));
            assert_eq!(got.body, body.slice(1000..2000));
            let got = fetch(&engine, host, h2, Request::get("/v/artifact").header(header::RANGE, "bytes=-10")).await;
            assert_eq!(got.body, body.slice(body.len() - 10..));
            let got =
                fetch(&engine, host, h2, Request::get("/v/artifact").header(header::RANGE, "bytes=99999999-")).await;
            assert_eq!(got.status, StatusCode::RANGE_NOT_SATISFIABLE);
            let got = fetch(&engine, host, h2, Request::head("/v/artifact")).await;
            assert_eq!((got.status, cache_header(&got), got.body.len()), (StatusCode::OK, "HIT", 0));
            assert_eq!(got.headers[header::CONTENT_LENGTH], body.len().to_string());
            let got =
                fetch(&engine, host, h2, Request::get("/v/artifact").header(header::IF_NONE_MATCH, "\"v1\"")).await;
            assert_eq!(got.status, StatusCode::NOT_MODIFIED);
        }
        assert_eq!(hits_of(&hits, "/v/artifact"), 1);
    })
    .await
}

/// `DELETE /api/tunnels/{id}/cache[?path=GLOB]` as `sub`.
async fn purge(engine: &TestEngine, sub: &str, id: &str, query: &str) -> (u16, String) {
    let tls = engine.raw_with_alpn(&[b"http/1.1"]).await;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await.unwrap();
    tokio::spawn(conn);
    let request = Request::delete(format!("/api/tunnels/{id}/cache{query}"))
        .header(header::HOST, "localhost")
        .header(header::AUTHORIZATION, format!("Bearer {}", engine.token(sub)))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let status = response.status().as_u16();
    (status, read_body(response.into_body()).await)
}

#[tokio::test]
async fn purge_cookies_private_and_bypass() {
    within(TEST_TIMEOUT, "the cache's answers and purges", async {
        let dir = tempfile::tempdir().unwrap();
        let engine = TestEngine::start_with(&format!("edge:\n  cache_dir: {}\n", dir.path().display())).await;
        let (_control, hits) = cached_tunnel(&engine, "site", artifact(1000)).await;
        let host = "site.t.localhost";
        let id = engine.tunnels().values().next().unwrap().id.clone();
        for h2 in [false, true] {
            let first = fetch(&engine, host, h2, Request::get("/v/page?a=1")).await;
            let again = fetch(&engine, host, h2, Request::get("/v/page?a=1")).await;
            assert_eq!((cache_header(&first), cache_header(&again)), (if h2 { "HIT" } else { "MISS" }, "HIT"));
            assert_eq!(again.body, "page /v/page");
            // Set-Cookie and private answers are never kept.
            for path in ["/v/cookie", "/v/private"] {
                for _ in 0..2 {
                    assert_eq!(cache_header(&fetch(&engine, host, h2, Request::get(path)).await), "MISS", "{path}");
                }
            }
            // A client asking for a fresh copy gets one.
            let got =
                fetch(&engine, host, h2, Request::get("/v/page?a=1").header(header::CACHE_CONTROL, "no-cache")).await;
            assert_eq!(cache_header(&got), "BYPASS");
            // Outside the cached paths: no cache at all.
            assert_eq!(cache_header(&fetch(&engine, host, h2, Request::get("/v1/page")).await), "-");
        }
        assert_eq!(hits_of(&hits, "/v/page"), 3, "one fill, two bypasses");
        assert_eq!(hits_of(&hits, "/v/cookie"), 4);
        assert_eq!(hits_of(&hits, "/v/private"), 4);
        // The object moves to edge.cache_dir once stored.
        files_become(dir.path(), |n| n >= 1).await;

        // Another principal cannot purge; the owner can, by glob or all.
        assert_eq!(purge(&engine, "mallory", &id, "").await.0, 404);
        assert_eq!(purge(&engine, "alice", &id, "?path=/nothing/*").await, (200, "{\"purged\":0}".to_string()));
        assert_eq!(purge(&engine, "alice", &id, "?path=/v/*").await, (200, "{\"purged\":1}".to_string()));
        assert_eq!(cache_header(&fetch(&engine, host, false, Request::get("/v/page?a=1")).await), "MISS");
        assert_eq!(hits_of(&hits, "/v/page"), 4);
        assert_eq!(purge(&engine, "alice", &id, "?path=relative").await.0, 400);
        assert_eq!(purge(&engine, "alice", &id, "").await, (200, "{\"purged\":1}".to_string()));
        files_become(dir.path(), |n| n == 0).await;
    })
    .await
}

/// Waits (bounded) until the number of files in `dir` satisfies `ok`.
async fn files_become(dir: &std::path::Path, ok: impl Fn(usize) -> bool) {
    let count = || std::fs::read_dir(dir).unwrap().filter_map(|e| e.ok()).count();
    let waited = tokio::time::timeout(Duration::from_secs(10), async {
        while !ok(count()) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(waited.is_ok(), "{} files in {}", count(), dir.display());
}

#[tokio::test]
async fn stored_objects_are_answered_on_a_keep_alive_connection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    within(TEST_TIMEOUT, "the stored object's answers on one connection", async {
        let engine = TestEngine::start().await;
        let body = artifact(5000);
        let (_control, hits) = cached_tunnel(&engine, "keep", body.clone()).await;
        let host = "keep.t.localhost";
        assert_eq!(cache_header(&fetch(&engine, host, false, Request::get("/v/artifact")).await), "MISS");
        // One connection, pipelined: HEAD (headers only), a range, the whole.
        let mut public = engine.public(host, &[b"http/1.1"]).await;
        let requests = format!(
            "HEAD /v/artifact HTTP/1.1\r\nHost: {host}\r\n\r\n\
             GET /v/artifact HTTP/1.1\r\nHost: {host}\r\nRange: bytes=10-19\r\n\r\n\
             GET /v/artifact HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        );
        public.write_all(requests.as_bytes()).await.unwrap();
        let mut seen = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), public.read_to_end(&mut seen)).await.expect("in time").ok();
        let text = String::from_utf8_lossy(&seen);
        assert_eq!(text.matches("x-strait-cache: HIT\r\n").count(), 3, "{text}");
        let head_end = text.find("\r\n\r\n").unwrap() + 4;
        assert!(text[head_end..].starts_with("HTTP/1.1 206 Partial Content\r\n"), "HEAD carried a body: {text}");
        assert!(seen.ends_with(&body), "the whole object last");
        assert!(seen.windows(10).any(|w| w == &body[10..20]), "the range");
        assert_eq!(hits_of(&hits, "/v/artifact"), 1);
    })
    .await
}

/// A service answering `/v/stream` with `body` in 64 KiB chunks and no
/// length (HTTP/1.1 chunked), cacheable, slowly enough at first that
/// concurrent clients meet the fetch in flight; counts its requests.
fn chunked_origin(body: bytes::Bytes, hits: Hits) -> Handler {
    Arc::new(move |_req: Request<Incoming>| {
        let (body, hits) = (body.clone(), hits.clone());
        Box::pin(async move {
            *hits.lock().unwrap().entry("/v/stream".into()).or_default() += 1;
            tokio::time::sleep(Duration::from_millis(200)).await;
            let chunks: Vec<_> = body.chunks(64 << 10).map(bytes::Bytes::copy_from_slice).collect();
            let frames = futures_util::stream::iter(chunks.into_iter().map(|c| Ok(hyper::body::Frame::data(c))));
            http::Response::builder()
                .header(header::CACHE_CONTROL, "public, max-age=600")
                .body(http_body_util::StreamBody::new(frames).boxed())
                .unwrap()
        })
    })
}

async fn chunked_tunnel(
    engine: &TestEngine,
    label: &str,
    body: bytes::Bytes,
    max_object: u64,
) -> (strait_agent::ControlChannel, Hits) {
    let hits: Hits = Arc::default();
    let local = http_service(chunked_origin(body, hits.clone())).await;
    let mut properties = published(label);
    let policy = format!(r#"{{"cache": {{"paths": ["/v/*"], "max_object_bytes": {max_object}}}}}"#);
    properties.labels.insert("strait.policy".into(), policy);
    let (control, _) = publish(engine, properties, local).await;
    (control, hits)
}

/// Ten concurrent GETs of `/v/stream`, HTTP/1.1 and HTTP/2 mixed: each
/// body checked whole, and how the cache said it served each.
async fn ten_at_once(
    engine: &Arc<TestEngine>,
    host: &'static str,
    body: &bytes::Bytes,
) -> std::collections::BTreeMap<String, usize> {
    let tasks: Vec<_> = (0..10)
        .map(|i| {
            let engine = engine.clone();
            tokio::spawn(async move { fetch(&engine, host, i % 2 == 1, Request::get("/v/stream")).await })
        })
        .collect();
    let mut how = std::collections::BTreeMap::new();
    for task in tasks {
        let got = tokio::time::timeout(Duration::from_secs(60), task).await.expect("in time").unwrap();
        assert_eq!(got.status, StatusCode::OK);
        assert_eq!((got.body.len(), digest(&got.body)), (body.len(), digest(body)), "a whole, unaltered copy");
        *how.entry(cache_header(&got).to_string()).or_default() += 1;
    }
    how
}

#[tokio::test]
async fn an_answer_of_unknown_length_is_cached_once_complete() {
    within(TEST_TIMEOUT, "a chunked answer cached for ten clients", async {
        let engine = Arc::new(TestEngine::start().await);
        let body = artifact(4 << 20);
        let (_control, hits) = chunked_tunnel(&engine, "chunked", body.clone(), 64 << 20).await;
        let host = "chunked.t.localhost";
        let how = ten_at_once(&engine, host, &body).await;
        // The others wait for the whole (it could have outgrown the store),
        // then read it as a hit.
        assert_eq!(hits_of(&hits, "/v/stream"), 1, "one upstream fetch: {how:?}");
        assert_eq!((how.get("MISS"), how.get("HIT")), (Some(&1), Some(&9)), "{how:?}");
        // Stored with its length now, ranges included.
        let got = fetch(&engine, host, false, Request::get("/v/stream").header(header::RANGE, "bytes=10-19")).await;
        assert_eq!((got.status, cache_header(&got)), (StatusCode::PARTIAL_CONTENT, "HIT"));
        assert_eq!(got.body, body.slice(10..20));
        let got = fetch(&engine, host, true, Request::head("/v/stream")).await;
        assert_eq!(got.headers[header::CONTENT_LENGTH], body.len().to_string());
        assert_eq!(hits_of(&hits, "/v/stream"), 1);
    })
    .await;
}

#[tokio::test]
async fn an_answer_of_unknown_length_that_outgrows_the_store_still_reaches_every_client_whole() {
    within(TEST_TIMEOUT, "a chunked answer too large to keep, for ten clients", async {
        // Past max_object_bytes, then past the engine's budget: either way the
        // fill is handed to its leader's client, the others fetch for
        // themselves, nothing is stored, and no byte is lost.
        for (engine_yaml, max_object) in [("", 1 << 20), ("edge: {cache_max_bytes: 1048576}\n", 64 << 20)] {
            let engine = Arc::new(TestEngine::start_with(engine_yaml).await);
            let body = artifact(3 << 20);
            let (_control, hits) = chunked_tunnel(&engine, "big", body.clone(), max_object).await;
            let how = ten_at_once(&engine, "big.t.localhost", &body).await;
            assert_eq!(how.get("MISS"), Some(&10), "{engine_yaml}: {how:?}");
            assert_eq!(hits_of(&hits, "/v/stream"), 10, "{engine_yaml}: each fetched for itself");
            let again = fetch(&engine, "big.t.localhost", false, Request::get("/v/stream")).await;
            assert_eq!((cache_header(&again), again.body.len()), ("MISS", body.len()), "{engine_yaml}: nothing stored");
        }
    })
    .await;
}

#[tokio::test]
async fn a_chunked_answer_that_breaks_off_reaches_its_client_as_broken() {
    within(TEST_TIMEOUT, "a broken chunked answer", async {
        let engine = TestEngine::start().await;
        // Half a MiB, then the service fails the body.
        let handler: Handler = Arc::new(|_req: Request<Incoming>| {
            Box::pin(async move {
                let frames = futures_util::stream::iter(
                    (0..8)
                        .map(|_| Ok(hyper::body::Frame::data(bytes::Bytes::from(vec![7u8; 64 << 10]))))
                        .chain(std::iter::once(Err(std::io::Error::other("the disk went away")))),
                );
                http::Response::builder()
                    .header(header::CACHE_CONTROL, "public, max-age=600")
                    .body(http_body_util::StreamBody::new(frames).boxed())
                    .unwrap()
            })
        });
        let local = http_service(handler).await;
        let mut properties = published("broken");
        properties.labels.insert("strait.policy".into(), r#"{"cache": {"paths": ["/v/*"]}}"#.into());
        let (_control, _) = publish(&engine, properties, local).await;
        for h2 in [false, true] {
            let response = send(&engine, "broken.t.localhost", h2, Request::get("/v/x")).await;
            assert_eq!(response.status(), StatusCode::OK);
            let read = response.into_body().collect().await;
            assert!(read.is_err(), "h2={h2}: a cut-off body must not look complete");
            // Nothing was stored.
            let again = fetch(&engine, "broken.t.localhost", false, Request::head("/v/x")).await;
            assert_ne!(cache_header(&again), "HIT", "h2={h2}");
        }
    })
    .await;
}

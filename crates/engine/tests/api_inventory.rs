//! The Engine API's inventory and document: real engine, real agents, real
//! TLS, HTTP/1.1 requests as curl would send them.

mod common;

use common::*;
use strait_agent::TunnelProperties;

fn tunnel(name: &str, labels: &[(&str, &str)]) -> TunnelProperties {
    TunnelProperties {
        name: Some(name.into()),
        labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        ..Default::default()
    }
}

fn params(json: serde_json::Value) -> String {
    let encoded: String = url_encode(&json.to_string());
    format!("?params={encoded}")
}

fn url_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn names(list: &serde_json::Value) -> Vec<String> {
    let mut names: Vec<String> =
        list.as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap_or("").to_string()).collect();
    names.sort();
    names
}

#[tokio::test]
async fn openapi_document_needs_no_token_and_names_itself() {
    let engine = TestEngine::start().await;
    let answer = engine.api_get("/api/openapi.json", None).await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.headers["content-type"], "application/json");
    let doc = answer.json();
    assert_eq!(doc["openapi"], "3.1.0");
    assert_eq!(doc["info"]["title"], "strait Engine API");
    assert!(doc["paths"]["/api/tunnels/{id}"]["get"].is_object());
    assert_eq!(engine.api_get("/healthz", None).await.body, "ok\n");
    assert_eq!(engine.api_get("/readyz", None).await.body, "ready\n");
}

#[tokio::test]
async fn lists_need_a_valid_bearer_token_and_refusals_are_counted() {
    let engine = TestEngine::start().await;
    for path in ["/api/clients", "/api/tunnels", "/api/clients/x", "/api/tunnels/x", "/api/sse"] {
        let answer = engine.api_get(path, None).await;
        assert_eq!(answer.status, 401, "{path}");
        assert_eq!(answer.body, "missing or invalid bearer token\n");
        assert_eq!(answer.headers["www-authenticate"], "Bearer");
    }
    let forged = strait_engine::auth::mint(b"another-secret-another-secret-another", "mallory", Some(60));
    assert_eq!(engine.api_get("/api/tunnels", Some(&forged)).await.status, 401);
    // The query token is for the streaming endpoints only.
    let token = engine.token("alice");
    assert_eq!(engine.api_get(&format!("/api/tunnels?rstream.token={token}"), None).await.status, 401);
    assert!(engine.engine.shared.metrics.encode().contains("strait_auth_failures_total 7"));
}

#[tokio::test]
async fn clients_and_tunnels_have_the_spec_shapes() {
    let engine = TestEngine::start().await;
    let control = engine.client("alice").connect().await.unwrap();
    let opened = control.open_tunnel(tunnel("db", &[("team", "core")])).await.unwrap();
    let token = engine.admin_token("ops");

    let clients = engine.api_get("/api/clients", Some(&token)).await.json();
    let client = &clients[0];
    assert_eq!(client["id"], control.client_id());
    assert_eq!(client["status"], "online");
    assert_eq!(client["user_id"], "alice");
    assert_eq!(client["protocol_version"], strait_proto::PROTOCOL_VERSION);
    assert!(client["labels"].is_object());

    let tunnels = engine.api_get("/api/tunnels", Some(&token)).await.json();
    let t = &tunnels[0];
    assert_eq!(t["id"], opened.id());
    assert_eq!(t["name"], "db");
    assert_eq!(t["type"], "bytestream");
    assert_eq!(t["publish"], false);
    assert_eq!(t["protocol"], "tcp");
    assert_eq!(t["labels"]["team"], "core");
    assert!(t["geo_ip"].is_array() && t.get("geoip").is_none());
    assert_eq!(t["status"], "online");
    assert_eq!(t["client_id"], control.client_id());
    assert_eq!(t["user_id"], "alice");
    assert!(t["creation_date"].as_str().unwrap().ends_with('Z'));

    let one = engine.api_get(&format!("/api/tunnels/{}", opened.id()), Some(&token)).await;
    assert_eq!(one.status, 200);
    assert_eq!(one.json()["id"], opened.id());
    let one = engine.api_get(&format!("/api/clients/{}", control.client_id()), Some(&token)).await;
    assert_eq!(one.json()["user_id"], "alice");

    let missing = engine.api_get("/api/tunnels/0123456789abcdef01234567", Some(&token)).await;
    assert_eq!((missing.status, missing.body.as_str()), (404, "no such tunnel\n"));
    let missing = engine.api_get("/api/clients/nope", Some(&token)).await;
    assert_eq!((missing.status, missing.body.as_str()), (404, "no such client\n"));
    assert_eq!(engine.api_get("/api/nothing", Some(&token)).await.status, 404);
}

#[tokio::test]
async fn params_filter_and_limit() {
    let engine = TestEngine::start().await;
    let alice = engine.client("alice").connect().await.unwrap();
    let bob = engine.client("bob").connect().await.unwrap();
    alice.open_tunnel(tunnel("a1", &[("team", "core"), ("env", "prod")])).await.unwrap();
    alice.open_tunnel(tunnel("a2", &[("team", "edge")])).await.unwrap();
    bob.open_tunnel(tunnel("b1", &[("env", "dev")])).await.unwrap();
    let token = engine.admin_token("ops");
    let list = |p: serde_json::Value| {
        let path = format!("/api/tunnels{}", params(p));
        let token = token.clone();
        let engine = &engine;
        async move { engine.api_get(&path, Some(&token)).await }
    };

    let all = list(serde_json::json!({})).await.json();
    assert_eq!(names(&all), ["a1", "a2", "b1"]);
    let by_user = list(serde_json::json!({"filters": {"user_id": "bob"}})).await.json();
    assert_eq!(names(&by_user), ["b1"]);
    let any_team = list(serde_json::json!({"filters": {"labels": {"team": null}}})).await.json();
    assert_eq!(names(&any_team), ["a1", "a2"]);
    let core_prod = list(serde_json::json!({"filters": {"labels": {"team": "core", "env": null}}})).await.json();
    assert_eq!(names(&core_prod), ["a1"]);
    let by_client = list(serde_json::json!({"filters": {"client_id": alice.client_id(), "publish": false}})).await;
    assert_eq!(names(&by_client.json()), ["a1", "a2"]);
    let offline = list(serde_json::json!({"filters": {"status": "offline"}})).await.json();
    assert_eq!(names(&offline), Vec::<String>::new());
    let limited = list(serde_json::json!({"limit": 2})).await.json();
    assert_eq!(limited.as_array().unwrap().len(), 2);

    let bad = list(serde_json::json!({"filters": {"nmae": "a1"}})).await;
    assert_eq!(bad.status, 400);
    assert!(bad.body.starts_with("bad params: unknown field `nmae`"), "{}", bad.body);
    let bad = list(serde_json::json!({"limit": 0})).await;
    assert_eq!((bad.status, bad.body.as_str()), (400, "bad params: limit must be at least 1\n"));
    let bad = engine.api_get("/api/tunnels?params=%7Bnot-json", Some(&token)).await;
    assert_eq!(bad.status, 400);
    assert!(bad.body.starts_with("bad params:"), "{}", bad.body);

    let clients = engine
        .api_get(&format!("/api/clients{}", params(serde_json::json!({"filters": {"user_id": "alice"}}))), Some(&token))
        .await
        .json();
    assert_eq!(clients.as_array().unwrap().len(), 1);
    assert_eq!(clients[0]["id"], alice.client_id());
}

#[tokio::test]
async fn api_speaks_http2_too() {
    let engine = TestEngine::start().await;
    let tls = engine.raw_with_alpn(&[b"h2"]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), hyper_util::rt::TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let request = http::Request::get("https://localhost/api/tunnels")
        .header("authorization", format!("Bearer {}", engine.token("ops")))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(read_body(response.into_body()).await, "[]");
}

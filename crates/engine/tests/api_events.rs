//! The Engine API's watches: a snapshot first, then lifecycle events, with
//! filters; slow consumers and shutdown end a watch with a reason.

mod common;

use std::sync::Arc;

use common::*;
use serde_json::json;
use strait_agent::TunnelProperties;
use strait_engine::registry::{Client, ClientInfo, Departure};

fn private(name: &str, team: &str) -> TunnelProperties {
    TunnelProperties {
        name: Some(name.into()),
        labels: [("team".to_string(), team.to_string())].into(),
        ..Default::default()
    }
}

fn encode(value: serde_json::Value) -> String {
    value
        .to_string()
        .bytes()
        .map(|b| if b.is_ascii_alphanumeric() { (b as char).to_string() } else { format!("%{b:02X}") })
        .collect()
}

#[tokio::test]
async fn snapshot_then_each_lifecycle_event() {
    let engine = TestEngine::start().await;
    let first = engine.client("alice").connect().await.unwrap();
    let existing = first.open_tunnel(private("existing", "core")).await.unwrap();
    // An operator watches every principal.
    let mut sse = engine.sse("", &engine.admin_token("ops")).await;

    let initial = sse.event().await;
    assert_eq!(initial["type"], "state.initial");
    assert_eq!(initial["user_id"], "ops");
    assert_eq!(initial["id"].as_str().unwrap().len(), 24);
    assert!(initial["object"]["snapshot_at"].is_string());
    assert_eq!(initial["object"]["clients"][0]["id"], first.client_id());
    assert_eq!(initial["object"]["tunnels"][0]["id"], existing.id());

    let second = engine.client("bob").connect().await.unwrap();
    let created = sse.event().await;
    assert_eq!(created["type"], "client.created");
    assert_eq!(created["object"]["id"], second.client_id());
    assert_eq!(created["user_id"], "bob");
    assert_eq!(created["object"]["status"], "online");

    let t = second.open_tunnel(private("new", "edge")).await.unwrap();
    let opened = sse.event().await;
    assert_eq!(opened["type"], "tunnel.created");
    assert_eq!(opened["object"]["id"], t.id());
    assert_eq!(opened["object"]["labels"]["team"], "edge");
    assert_eq!(opened["object"]["client_id"], second.client_id());

    t.close().await.unwrap();
    let closed = sse.event().await;
    assert_eq!(closed["type"], "tunnel.deleted");
    assert_eq!(closed["object"]["id"], t.id());
    assert_eq!(closed["object"]["status"], "offline");

    second.close().await.unwrap();
    let gone = sse.event().await;
    assert_eq!(gone["type"], "client.deleted");
    assert_eq!(gone["object"]["status"], "offline");
    assert!(gone["created_at"].as_str().unwrap().ends_with('Z'));
}

#[tokio::test]
async fn filters_apply_to_the_snapshot_and_to_events() {
    let engine = TestEngine::start().await;
    let control = engine.client("alice").connect().await.unwrap();
    control.open_tunnel(private("core-1", "core")).await.unwrap();
    control.open_tunnel(private("edge-1", "edge")).await.unwrap();
    let query = format!(
        "?params={}",
        encode(json!({"tunnels": {"labels": {"team": "core"}}, "clients": {"user_id": "nobody"}}))
    );
    let mut sse = engine.sse(&query, &engine.admin_token("ops")).await;
    let initial = sse.event().await;
    assert_eq!(initial["object"]["clients"], json!([]));
    let tunnels = initial["object"]["tunnels"].as_array().unwrap();
    assert_eq!(tunnels.len(), 1);
    assert_eq!(tunnels[0]["name"], "core-1");

    // Neither the edge tunnel nor the new client passes; the core tunnel does.
    let other = engine.client("bob").connect().await.unwrap();
    other.open_tunnel(private("edge-2", "edge")).await.unwrap();
    other.open_tunnel(private("core-2", "core")).await.unwrap();
    let event = sse.event().await;
    assert_eq!(event["type"], "tunnel.created");
    assert_eq!(event["object"]["name"], "core-2");
}

#[tokio::test]
async fn query_token_works_on_streams_and_bad_params_are_400() {
    let engine = TestEngine::start().await;
    let token = engine.token("ops");
    let tls = engine.raw_with_alpn(&[b"http/1.1"]).await;
    let (status, _, _) = http_request(tls, &format!("/api/sse?rstream.token={token}"), None).await;
    assert_eq!(status, 200);
    // Two proofs at once are refused.
    let tls = engine.raw_with_alpn(&[b"http/1.1"]).await;
    let (status, _, _) = http_request(tls, &format!("/api/sse?rstream.token={token}"), Some(&token)).await;
    assert_eq!(status, 401);
    let bad = engine.api_get(&format!("/api/sse?params={}", encode(json!({"tunnel": {}}))), Some(&token)).await;
    assert_eq!(bad.status, 400);
    assert!(bad.body.contains("unknown field `tunnel`"), "{}", bad.body);
    let bad = engine.api_get("/api/websocket?params=%5B", Some(&token)).await;
    assert_eq!(bad.status, 400);
    // Authenticated but not a WebSocket handshake.
    let plain = engine.api_get("/api/websocket", Some(&token)).await;
    assert!(plain.status == 400 || plain.status == 426, "{}", plain.status);
}

/// The test runs on one thread: the burst below happens without the SSE
/// task getting a turn, so the watcher falls behind the whole ring by
/// construction, not by timing.
#[tokio::test(flavor = "current_thread")]
async fn a_slow_consumer_is_disconnected_with_a_reason() {
    let engine = TestEngine::start().await;
    let mut sse = engine.sse("", &engine.token("ops")).await;
    assert_eq!(sse.event().await["type"], "state.initial");

    let registry = &engine.engine.shared.registry;
    let (outbox, _rx) = tokio::sync::mpsc::channel(1);
    for i in 0..strait_engine::registry::FEED_CAPACITY {
        let info = ClientInfo { id: format!("burst{i}"), principal: "ops".into(), ..Default::default() };
        registry.add_client(Arc::new(Client::new(info, outbox.clone(), None))).unwrap();
        registry.remove_client(&format!("burst{i}"), Departure::Closed);
    }
    let mut last = None;
    while let Some(item) = sse.next().await {
        last = Some(item);
    }
    match last {
        Some(SseItem::Comment(reason)) => assert!(reason.starts_with("slow consumer"), "{reason}"),
        other => panic!("the stream should end with the reason, got {other:?}"),
    }
    // The engine itself is unaffected: a new watch gets a fresh snapshot.
    let mut again = engine.sse("", &engine.token("ops")).await;
    assert_eq!(again.event().await["object"]["clients"], json!([]));
}

#[tokio::test]
async fn shutdown_ends_watches_with_a_reason() {
    let engine = TestEngine::start().await;
    let mut sse = engine.sse("", &engine.token("ops")).await;
    assert_eq!(sse.event().await["type"], "state.initial");
    let TestEngine { engine: running, dir: _dir, .. } = engine;
    let running = running.into_inner();
    let stopping = tokio::spawn(running.shutdown_within(std::time::Duration::from_secs(10)));
    let mut last = None;
    while let Some(item) = sse.next().await {
        last = Some(item);
    }
    match last {
        Some(SseItem::Comment(reason)) => assert_eq!(reason, "engine shutting down"),
        other => panic!("expected the shutdown reason, got {other:?}"),
    }
    assert!(stopping.await.unwrap(), "everything drained in time");
}

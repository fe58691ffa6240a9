//! Tenants kept apart: two principals (alice and bob) on one engine, each
//! trying what a hostile one would. Every answer to another principal's
//! object is the answer for a missing one; an operator token sees all.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use http::{Request, StatusCode, header};
use http_body_util::BodyExt;
use strait_agent::{Client, TunnelProperties};
use strait_engine::registry::Change;
use strait_proto::{CloseTunnelReq, ErrorCode, OpenTunnelReq, OpenTunnelResult, Payload};

/// Everything below runs well within this; a hang fails here, not in CI.
const BOUND: Duration = Duration::from_secs(20);

async fn bounded<F: Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(BOUND, f).await.unwrap_or_else(|_| panic!("{what} did not finish in {BOUND:?}"))
}

fn private(name: &str) -> TunnelProperties {
    TunnelProperties { name: Some(name.into()), ..Default::default() }
}

fn dialer(engine: &TestEngine, sub: &str) -> Client {
    let mut config = engine.client_config(sub);
    config.zero_rtt = false;
    Client::new(config).unwrap()
}

/// A published HTTP service that answers `who` to every request.
async fn service(who: &'static str) -> std::net::SocketAddr {
    http_service(Arc::new(move |_req| Box::pin(async move { http::Response::builder().body(full(who)).unwrap() })))
        .await
}

async fn get(engine: &TestEngine, host: &str) -> (StatusCode, String) {
    let mut h1 = engine.h1(host).await;
    let request = Request::get("/").header(header::HOST, host).body(full("")).unwrap();
    let response = h1.send_request(request).await.unwrap();
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8(body.to_vec()).unwrap())
}

/// Waits for the engine to see a control channel end.
async fn client_deleted(feed: &mut tokio::sync::broadcast::Receiver<Change>) {
    while !matches!(feed.recv().await.expect("feed open"), Change::ClientDeleted(_)) {}
}

fn ids(list: &serde_json::Value) -> Vec<String> {
    list.as_array().unwrap().iter().map(|o| o["id"].as_str().unwrap().to_string()).collect()
}

#[tokio::test]
async fn private_tunnels_answer_only_their_principal() {
    bounded("dials", async {
        let engine = TestEngine::start().await;
        let echo = echo_server().await;
        let control = engine.client("alice").connect().await.unwrap();
        let mut tunnel = control.open_tunnel(private("db")).await.unwrap();
        let id = tunnel.id().to_string();
        tokio::spawn(async move { tunnel.forward(echo.to_string()).await });

        for target in ["db", id.as_str()] {
            let mut stream = dialer(&engine, "alice").dial(target).await.unwrap();
            tokio::io::AsyncWriteExt::write_all(&mut stream, b"x").await.unwrap();
            let mut back = [0u8; 1];
            tokio::io::AsyncReadExt::read_exact(&mut stream, &mut back).await.unwrap();
        }
        // Bob hears what a missing tunnel gets, by id and by name.
        let missing = dialer(&engine, "bob").dial("no-such-tunnel").await.err().unwrap();
        for target in ["db", id.as_str()] {
            let err = dialer(&engine, "bob").dial(target).await.err().unwrap();
            assert_eq!(err.engine_code(), Some(ErrorCode::TunnelNotFound), "{target}");
            assert_eq!(
                err.to_string().replace(target, "T"),
                missing.to_string().replace("no-such-tunnel", "T"),
                "the refusal is no oracle"
            );
        }
        // An operator acts on every tunnel: a dial by id reaches it.
        let mut config = engine.client_config("ops");
        config.token = Some(engine.admin_token("ops"));
        config.zero_rtt = false;
        Client::new(config).unwrap().dial(&id).await.expect("an admin dials by id");
    })
    .await
}

#[tokio::test]
async fn the_api_lists_only_the_callers_objects() {
    bounded("lists", async {
        let engine = TestEngine::start().await;
        let alice = engine.client("alice").connect().await.unwrap();
        let a = alice.open_tunnel(private("a")).await.unwrap();
        let bob = engine.client("bob").connect().await.unwrap();
        let b = bob.open_tunnel(private("b")).await.unwrap();
        let (alice_token, bob_token) = (engine.token("alice"), engine.token("bob"));

        let tunnels = engine.api_get("/api/tunnels", Some(&alice_token)).await.json();
        assert_eq!(ids(&tunnels), [a.id()]);
        let clients = engine.api_get("/api/clients", Some(&alice_token)).await.json();
        assert_eq!(ids(&clients), [alice.client_id()]);
        // A filter on another principal finds nothing rather than its objects.
        let query = "/api/tunnels?params=%7B%22filters%22%3A%7B%22user_id%22%3A%22bob%22%7D%7D";
        assert_eq!(engine.api_get(query, Some(&alice_token)).await.json(), serde_json::json!([]));
        // One object by id: another principal's is 404, as a missing one.
        for (path, theirs) in [("/api/tunnels", b.id()), ("/api/clients", bob.client_id())] {
            let answer = engine.api_get(&format!("{path}/{theirs}"), Some(&alice_token)).await;
            let missing = engine.api_get(&format!("{path}/000000000000000000000000"), Some(&alice_token)).await;
            assert_eq!((answer.status, &answer.body), (404, &missing.body), "{path}");
            assert_eq!(engine.api_get(&format!("{path}/{theirs}"), Some(&bob_token)).await.status, 200);
        }
        // The operator sees both.
        let admin = engine.admin_token("ops");
        let mut all = ids(&engine.api_get("/api/tunnels", Some(&admin)).await.json());
        all.sort();
        let mut expected = vec![a.id().to_string(), b.id().to_string()];
        expected.sort();
        assert_eq!(all, expected);
        assert_eq!(ids(&engine.api_get("/api/clients", Some(&admin)).await.json()).len(), 2);
    })
    .await
}

#[tokio::test]
async fn watches_carry_only_the_callers_events_over_sse_and_websocket() {
    bounded("watches", async {
        let engine = TestEngine::start().await;
        let bob = engine.client("bob").connect().await.unwrap();
        bob.open_tunnel(private("before")).await.unwrap();

        let mut sse = engine.sse("", &engine.token("alice")).await;
        let mut admin_sse = engine.sse("", &engine.admin_token("ops")).await;
        let ws_url = format!("/api/websocket?rstream.token={}", engine.token("alice"));
        let tls = engine.raw_with_alpn(&[b"http/1.1"]).await;
        let request = tokio_tungstenite::tungstenite::http::Request::get(format!("wss://localhost{ws_url}"))
            .header("host", "localhost")
            .header("connection", "Upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-version", "13")
            .header("sec-websocket-key", tokio_tungstenite::tungstenite::handshake::client::generate_key())
            .body(())
            .unwrap();
        let (mut ws, _) = tokio_tungstenite::client_async(request, tls).await.expect("WebSocket watch");
        let mut ws_next = async move || loop {
            match ws.next().await.expect("watch open").expect("frame") {
                tokio_tungstenite::tungstenite::Message::Text(text) => {
                    return serde_json::from_str::<serde_json::Value>(&text).unwrap();
                }
                _ => continue,
            }
        };

        for initial in [sse.event().await, ws_next().await] {
            assert_eq!(initial["type"], "state.initial");
            assert_eq!(initial["object"]["clients"], serde_json::json!([]), "bob's client is not alice's to see");
            assert_eq!(initial["object"]["tunnels"], serde_json::json!([]));
        }
        let admin_initial = admin_sse.event().await;
        assert_eq!(admin_initial["object"]["tunnels"].as_array().unwrap().len(), 1);

        // Bob's changes, then alice's: alice's watchers see only hers.
        let t = bob.open_tunnel(private("during")).await.unwrap();
        t.close().await.unwrap();
        let alice = engine.client("alice").connect().await.unwrap();
        for event in [sse.event().await, ws_next().await] {
            assert_eq!(event["type"], "client.created");
            assert_eq!(event["object"]["id"], alice.client_id());
            assert_eq!(event["user_id"], "alice");
        }
        // The operator saw everything, in order.
        let kinds: Vec<String> = {
            let mut kinds = Vec::new();
            for _ in 0..3 {
                kinds.push(admin_sse.event().await["type"].as_str().unwrap().to_string());
            }
            kinds
        };
        assert_eq!(kinds, ["tunnel.created", "tunnel.deleted", "client.created"]);
    })
    .await
}

#[tokio::test]
async fn a_channel_cannot_close_another_principals_tunnel() {
    bounded("close", async {
        let engine = TestEngine::start().await;
        let bob = engine.client("bob").connect().await.unwrap();
        let theirs = bob.open_tunnel(private("keep")).await.unwrap();

        let mut alice = engine.raw_control("alice").await;
        for target in [theirs.id(), "000000000000000000000000"] {
            let reply =
                roundtrip(&mut alice, Payload::CloseTunnelReq(CloseTunnelReq { tunnel_id: target.into() })).await;
            let Some(Payload::CloseTunnelRsp(rsp)) = reply.payload else {
                panic!("expected CloseTunnelRsp: {reply:?}")
            };
            assert_eq!(rsp.tunnel_id, target);
            let error = rsp.error.expect("a refused close says so");
            assert_eq!(error.code(), ErrorCode::TunnelNotFound);
        }
        assert!(engine.engine.shared.registry.tunnel(theirs.id()).is_some(), "bob's tunnel stays up");
        theirs.close().await.expect("its owner closes it, with no error");
        assert!(engine.engine.shared.registry.tunnel(theirs.id()).is_none());
    })
    .await
}

#[tokio::test]
async fn a_published_hostname_is_held_for_its_principal() {
    bounded("hold", async {
        let engine = TestEngine::start().await;
        let (alice_site, bob_site) = (service("alice").await, service("bob").await);
        let host = "shop.t.localhost";

        let alice = engine.client("alice").connect().await.unwrap();
        let mut tunnel = alice.open_tunnel(published("shop")).await.unwrap();
        let first_id = tunnel.id().to_string();
        tokio::spawn(async move { tunnel.forward(alice_site.to_string()).await });
        assert_eq!(get(&engine, host).await, (StatusCode::OK, "alice".into()));

        // Alice's agent goes away: the URL says so, and bob cannot take it.
        let mut feed = engine.engine.shared.registry.subscribe();
        drop(alice);
        client_deleted(&mut feed).await;
        assert_eq!(get(&engine, host).await, (StatusCode::SERVICE_UNAVAILABLE, "agent offline\n".into()));

        let bob = engine.client("bob").connect().await.unwrap();
        let err = bob.open_tunnel(published("shop")).await.err().unwrap();
        assert_eq!(err.engine_code(), Some(ErrorCode::InvalidRequest));
        assert!(err.to_string().contains("reserved for another principal"), "{err}");
        assert_eq!(get(&engine, host).await.0, StatusCode::SERVICE_UNAVAILABLE, "bob's refusal changed nothing");

        // The hold is in the API, for alice and the operator, not for bob.
        let held = engine.api_get("/api/reservations", Some(&engine.token("alice"))).await.json();
        assert_eq!(held[0]["kind"], "hostname");
        assert_eq!(held[0]["value"], host);
        assert_eq!(held[0]["user_id"], "alice");
        assert_eq!(held[0]["tunnel_id"], first_id.as_str());
        assert!(held[0]["expires_at"].as_str().unwrap().ends_with('Z'));
        assert_eq!(engine.api_get("/api/reservations", Some(&engine.token("bob"))).await.json(), serde_json::json!([]));
        let all = engine.api_get("/api/reservations", Some(&engine.admin_token("ops"))).await.json();
        assert_eq!(all.as_array().unwrap().len(), 1);

        // Alice comes back (another agent of hers): same URL, hers again.
        let back = engine.client("alice").connect().await.unwrap();
        let mut again = back.open_tunnel(published("shop")).await.unwrap();
        assert_eq!(again.properties().hostname.as_deref(), Some(host));
        tokio::spawn(async move { again.forward(alice_site.to_string()).await });
        assert_eq!(get(&engine, host).await, (StatusCode::OK, "alice".into()));
        assert_eq!(
            engine.api_get("/api/reservations", Some(&engine.token("alice"))).await.json(),
            serde_json::json!([])
        );

        // Bob is still refused while alice serves it, and gets his own name.
        let err = bob.open_tunnel(published("shop")).await.err().unwrap();
        assert!(err.to_string().contains("another principal's tunnel"), "{err}");
        let mut his = bob.open_tunnel(published("bobs")).await.unwrap();
        tokio::spawn(async move { his.forward(bob_site.to_string()).await });
        assert_eq!(get(&engine, "bobs.t.localhost").await, (StatusCode::OK, "bob".into()));
    })
    .await
}

#[tokio::test]
async fn a_lost_agents_names_answer_offline_to_their_principal_only() {
    bounded("name hold", async {
        let engine = TestEngine::start().await;
        let alice = engine.client("alice").connect().await.unwrap();
        alice.open_tunnel(private("db")).await.unwrap();
        alice.open_tunnel(private("gone")).await.unwrap().close().await.unwrap();
        let mut feed = engine.engine.shared.registry.subscribe();
        drop(alice);
        client_deleted(&mut feed).await;

        let err = dialer(&engine, "alice").dial("db").await.err().unwrap();
        assert_eq!(err.engine_code(), Some(ErrorCode::ServiceUnavailable), "{err}");
        assert!(err.to_string().contains("offline"), "{err}");
        // A tunnel its agent closed is gone, as rstream agents expect; bob
        // has no tunnel of that name either way.
        let err = dialer(&engine, "alice").dial("gone").await.err().unwrap();
        assert_eq!(err.engine_code(), Some(ErrorCode::TunnelNotFound));
        let err = dialer(&engine, "bob").dial("db").await.err().unwrap();
        assert_eq!(err.engine_code(), Some(ErrorCode::TunnelNotFound));
        let held = engine.api_get("/api/reservations", Some(&engine.token("alice"))).await.json();
        assert_eq!(held.as_array().unwrap().len(), 1, "{held}");
        assert_eq!((held[0]["kind"].as_str(), held[0]["value"].as_str()), (Some("name"), Some("db")));

        // Back: the name reaches the new tunnel.
        let echo = echo_server().await;
        let back = engine.client("alice").connect().await.unwrap();
        let mut tunnel = back.open_tunnel(private("db")).await.unwrap();
        tokio::spawn(async move { tunnel.forward(echo.to_string()).await });
        dialer(&engine, "alice").dial("db").await.expect("the name is live again");
    })
    .await
}

#[tokio::test]
async fn without_holds_an_offline_hostname_is_free_and_unknown() {
    bounded("no hold", async {
        let engine = TestEngine::start_with("edge: {hostname_hold_seconds: 0}\n").await;
        let alice = engine.client("alice").connect().await.unwrap();
        alice.open_tunnel(published("free")).await.unwrap().close().await.unwrap();
        assert_eq!(get(&engine, "free.t.localhost").await.0, StatusCode::NOT_FOUND);
        let bob = engine.client("bob").connect().await.unwrap();
        bob.open_tunnel(published("free")).await.expect("no hold: anyone may claim it");
    })
    .await
}

#[tokio::test]
async fn per_principal_caps_refuse_with_capacity_exhausted() {
    bounded("caps", async {
        let engine = TestEngine::start_with(
            "limits: {control_channels_per_principal: 2, tunnels_per_principal: 3, label_bytes_per_principal: 64}\n",
        )
        .await;
        let first = engine.client("alice").connect().await.unwrap();
        let second = engine.client("alice").connect().await.unwrap();
        let err = engine.client("alice").connect().await.err().unwrap();
        assert_eq!(err.engine_code(), Some(ErrorCode::CapacityExhausted));
        assert!(err.to_string().contains("limits.control_channels_per_principal"), "{err}");
        let bob = engine.client("bob").connect().await.expect("bob has his own budget");

        for (i, control) in [&first, &second, &first].iter().enumerate() {
            control.open_tunnel(private(&format!("t{i}"))).await.unwrap();
        }
        let err = second.open_tunnel(private("t3")).await.err().unwrap();
        assert_eq!(err.engine_code(), Some(ErrorCode::CapacityExhausted));
        assert!(err.to_string().contains("limits.tunnels_per_principal"), "{err}");

        let big = TunnelProperties { labels: [("k".to_string(), "v".repeat(64))].into(), ..private("big") };
        let err = bob.open_tunnel(big).await.err().unwrap();
        assert_eq!(err.engine_code(), Some(ErrorCode::CapacityExhausted));
        assert!(err.to_string().contains("limits.label_bytes_per_principal"), "{err}");
        let fits = TunnelProperties { labels: [("k".to_string(), "v".repeat(60))].into(), ..private("fits") };
        bob.open_tunnel(fits).await.expect("nothing of the refused tunnel was counted");

        // A closed channel gives its place back.
        let mut feed = engine.engine.shared.registry.subscribe();
        drop(first);
        client_deleted(&mut feed).await;
        engine.client("alice").connect().await.expect("the slot came back with the channel's close");
    })
    .await
}

#[tokio::test]
async fn an_oversized_label_load_is_refused_before_it_is_stored() {
    bounded("labels", async {
        let engine = TestEngine::start_with("limits: {label_bytes_per_principal: 100000}\n").await;
        let mut raw = engine.raw_control("mallory").await;
        let mut stored = 0;
        for i in 0..8 {
            let labels = [(format!("k{i}"), "v".repeat(40_000))].into();
            let props = TunnelProperties { labels, ..private(&format!("t{i}")) };
            let open = OpenTunnelReq { request_id: format!("r{i}"), tunnel_properties: Some(props) };
            match roundtrip(&mut raw, Payload::OpenTunnelReq(open)).await.payload {
                Some(Payload::OpenTunnelRsp(rsp)) => match rsp.payload {
                    Some(OpenTunnelResult::TunnelProperties(_)) => stored += 1,
                    Some(OpenTunnelResult::Error(e)) => assert_eq!(e.code(), ErrorCode::CapacityExhausted),
                    None => panic!("empty reply"),
                },
                other => panic!("expected OpenTunnelRsp, got {other:?}"),
            }
        }
        assert_eq!(stored, 2, "two 40 KB labels fit in 100 KB, the third does not");
        assert_eq!(engine.engine.shared.registry.counts().1, 2);
    })
    .await
}

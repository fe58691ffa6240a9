//! The `strait` binary end to end against a real engine on 127.0.0.1:0:
//! forward, dial, connect, contexts, tokens, and an engine restart.

mod common;

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use common::{DEADLINE, Running, SECRET, Strait, TestEngine, dial, echo_server, echo_through, output};
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

async fn dial_alice(engine: &TestEngine, tunnel: &str, input: &[u8]) -> Vec<u8> {
    dial(engine, "alice", tunnel, input).await
}

async fn forward_private(engine: &TestEngine, name: &str, local: SocketAddr) -> Running {
    let mut cmd = engine.strait("alice");
    cmd.args(["forward", &local.to_string(), "--private", "--name", name]);
    let mut forward = Running::spawn(cmd);
    let line = forward.line().await;
    assert_eq!(line, format!("Forwarding rstrm://{name} (private) -> {local} (over quic)"));
    forward
}

#[tokio::test]
async fn forward_private_then_dial_and_connect() {
    let engine = TestEngine::start().await;
    let echo = echo_server().await;
    let forward = forward_private(&engine, "echo", echo).await;

    // dial: stdin/stdout, as ssh's ProxyCommand uses it.
    assert_eq!(dial_alice(&engine, "echo", b"hello through dial").await, b"hello through dial");

    // connect: a local port, one private dial per connection.
    let mut cmd = engine.strait("alice");
    cmd.args(["connect", "echo", "--listen", "127.0.0.1:0"]);
    let mut connect = Running::spawn(cmd);
    let line = connect.line().await;
    let listen: SocketAddr = line
        .strip_prefix("Listening on ")
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("unexpected: {line}"))
        .parse()
        .unwrap();
    for i in 0..3 {
        let payload = format!("connection {i}");
        assert_eq!(echo_through(listen, payload.as_bytes()).await, payload.as_bytes());
    }
    connect.interrupt().await;

    // Ctrl-C closes the tunnel: the engine forgets it.
    forward.interrupt().await;
    let registry = &engine.engine.shared.registry;
    assert_eq!(registry.counts().1, 0);
}

#[tokio::test]
async fn forward_survives_an_engine_restart() {
    let mut engine = TestEngine::start().await;
    let echo = echo_server().await;
    let mut forward = forward_private(&engine, "sturdy", echo).await;
    assert_eq!(dial_alice(&engine, "sturdy", b"before").await, b"before");

    engine.restart().await;
    forward.stderr_until("reconnected").await;
    assert_eq!(dial_alice(&engine, "sturdy", b"after").await, b"after");
    forward.interrupt().await;
}

#[tokio::test]
async fn a_refused_tunnel_exits_with_the_engines_reason() {
    let engine = TestEngine::start().await;
    let echo = echo_server().await;
    let _first = forward_private(&engine, "taken", echo).await;
    let out = output(engine.strait("alice").args(["forward", &echo.to_string(), "--private", "--name", "taken"])).await;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("taken"), "{stderr}");
}

#[tokio::test]
async fn a_bad_token_is_reported_not_retried() {
    let engine = TestEngine::start().await;
    let out = output(engine.strait("alice").env("RSTREAM_AUTHENTICATION_TOKEN", "not-a-token").args([
        "forward",
        "9",
        "--private",
    ]))
    .await;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.to_lowercase().contains("unauthorized"), "{stderr}");
}

#[tokio::test]
async fn minted_tokens_are_accepted_by_the_engine() {
    let engine = TestEngine::start().await;
    let out =
        output(engine.strait("alice").args(["token", "--secret", SECRET, "--sub", "minted", "--ttl", "10m"])).await;
    assert!(out.status.success());
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let principal = engine.engine.shared.verifier.verify(Some(&token)).unwrap();
    assert_eq!(principal.id, "minted");

    let weak = output(engine.strait("a").args(["token", "--secret", "short", "--sub", "x"])).await;
    assert!(!weak.status.success());
    let zero = output(engine.strait("a").args(["token", "--secret", SECRET, "--sub", "x", "--ttl", "0s"])).await;
    assert!(!zero.status.success());
}

#[tokio::test]
async fn a_context_carries_engine_token_and_ca() {
    let engine = TestEngine::start().await;
    let config = engine.dir.path().join("agent.yaml");
    let bare = || {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_strait"));
        cmd.env_clear().env("HOME", engine.dir.path()).arg("--config").arg(&config).kill_on_drop(true);
        cmd
    };
    let created = output(
        bare()
            .args(["context", "create", "lab", "--use", "--engine"])
            .arg(format!("localhost:{}", engine.addr.port()))
            .arg("--token")
            .arg(engine.token("carol"))
            .arg("--ca-file")
            .arg(engine.ca()),
    )
    .await;
    assert!(created.status.success(), "{}", String::from_utf8_lossy(&created.stderr));
    let listed = output(bare().args(["context", "list"])).await;
    assert!(String::from_utf8_lossy(&listed.stdout).contains("* lab"));

    let echo = echo_server().await;
    let mut cmd = bare();
    cmd.args(["forward", &echo.to_string(), "--private", "--name", "ctx"]);
    let forward = Running::spawn(cmd);
    let mut forward = forward;
    assert!(forward.line().await.starts_with("Forwarding rstrm://ctx"));
    assert_eq!(dial(&engine, "carol", "ctx", b"via context").await, b"via context");
    forward.interrupt().await;
    // The file keeps the rstream shape.
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(text.contains("version: 1"), "{text}");
}

/// Runs a dial whose stdin stays open until it exits.
async fn dial_holding_stdin(cmd: &mut Command) -> std::process::Output {
    let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let _stdin = child.stdin.take();
    tokio::time::timeout(Duration::from_secs(30), child.wait_with_output()).await.expect("dial returns").unwrap()
}

#[tokio::test]
async fn dial_to_a_missing_or_foreign_tunnel_fails_cleanly() {
    let engine = TestEngine::start().await;
    let echo = echo_server().await;
    let _alices = forward_private(&engine, "alices", echo).await;
    for (who, tunnel) in [("alice", "nowhere"), ("bob", "alices")] {
        // stdin stays open: the refusal alone must end the command.
        let out = dial_holding_stdin(engine.strait(who).args(["dial", tunnel])).await;
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("TUNNEL_NOT_FOUND") || stderr.contains("not found"), "{who}/{tunnel}: {stderr}");
    }
    // Zero-RTT learns of the refusal by the close: it ends, with no output.
    let out = dial_holding_stdin(engine.strait("alice").args(["dial", "nowhere", "--zero-rtt"])).await;
    assert!(out.stdout.is_empty());
}

#[tokio::test]
async fn no_publish_is_private_and_no_hint_turns_a_flag_around() {
    let engine = TestEngine::start().await;
    let echo = echo_server().await;
    // rstream's spelling of a private tunnel.
    let mut cmd = engine.strait("alice");
    cmd.args(["forward", &echo.to_string(), "--no-publish", "--name", "quiet"]);
    let mut forward = Running::spawn(cmd);
    assert_eq!(forward.line().await, format!("Forwarding rstrm://quiet (private) -> {echo} (over quic)"));
    assert_eq!(engine.tunnels()["quiet"].properties.publish, Some(false));
    forward.interrupt().await;

    // Near misses of a negated flag get the negated flag, never `--publish`.
    for typo in ["--no-publsh", "--publish-no", "--nopublish"] {
        let out = output(engine.strait("alice").args(["forward", "9", typo])).await;
        assert_eq!(out.status.code(), Some(2), "{typo}");
        let text = String::from_utf8_lossy(&out.stderr);
        assert!(text.contains("a similar argument exists: '--no-publish'"), "{typo}: {text}");
        assert!(!text.contains("'--publish'") && !text.contains(" --publish "), "{typo}: {text}");
    }
    // A near miss of a plain flag still gets it.
    let out = output(engine.strait("alice").args(["forward", "9", "--publsh"])).await;
    assert!(String::from_utf8_lossy(&out.stderr).contains("'--publish'"));
}

#[tokio::test]
async fn a_new_webhook_secret_reads_no_context_or_environment() {
    let dir = tempfile::tempdir().unwrap();
    // As `strait-engine dev` tells users to set them, then odder values.
    let environments = [
        ("localhost:8443", "eyJhbGciOiJIUzI1NiJ9.e30.x"),
        ("", ""),
        ("not an address", "\u{1}control"),
        ("https://edge.example.com:443/path", "two words"),
    ];
    for (engine, token) in environments {
        let out = output(
            Command::new(env!("CARGO_BIN_EXE_strait"))
                .env_clear()
                .env("HOME", dir.path())
                .env("RSTREAM_ENGINE", engine)
                .env("RSTREAM_AUTHENTICATION_TOKEN", token)
                .env("RSTREAM_CONTEXT", "nowhere")
                .env("RSTREAM_CONFIG", dir.path().join("missing/config.yaml"))
                .env("STRAIT_WEBHOOK_SECRET", "whsec_old")
                .args(["events", "--new-webhook-secret"]),
        )
        .await;
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{engine:?}/{token:?}: {}", String::from_utf8_lossy(&out.stderr));
        let secret = stdout.trim();
        assert!(secret.starts_with("whsec_") && secret.len() == 49, "{secret}");
    }
}

/// `auto` rides QUIC against an engine that has it; `--transport tls` (or
/// the rstream CLI's RSTREAM_TUNNEL_TRANSPORT) pins a transport, and
/// `forward` says which one carries it.
#[tokio::test]
async fn forward_says_which_transport_carries_it_and_takes_the_rstream_spellings() {
    let engine = TestEngine::start().await;
    let echo = echo_server().await;
    let mut cmd = engine.strait("alice");
    cmd.args(["forward", &echo.to_string(), "--no-publish", "--name", "pinned", "--transport", "tls"]);
    let mut forward = Running::spawn(cmd);
    assert_eq!(forward.line().await, format!("Forwarding rstrm://pinned (private) -> {echo} (over tls)"));
    let metrics = &engine.engine.shared.metrics;
    assert_eq!((metrics.clients_by_transport("tls"), metrics.clients_by_transport("quic")), (1, 0));

    // A dial over QUIC, chosen by the environment, reaches the TLS agent.
    let mut cmd = engine.strait("alice");
    cmd.env("RSTREAM_TUNNEL_TRANSPORT", "quic").args(["dial", "pinned"]);
    let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"over quic").await.unwrap();
    drop(stdin);
    let out = tokio::time::timeout(DEADLINE, child.wait_with_output()).await.expect("dial ends").unwrap();
    assert_eq!(out.stdout, b"over quic");
    assert!(out.status.success(), "{out:?}");

    // A bad value is named, from the flag and from the environment.
    let mut cmd = engine.strait("alice");
    cmd.args(["dial", "pinned", "--transport", "udp"]);
    let out = output(&mut cmd).await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("auto, tls, quic"), "{out:?}");
    let mut cmd = engine.strait("alice");
    cmd.env("RSTREAM_TUNNEL_TRANSPORT", "carrier-pigeon").args(["dial", "pinned"]);
    let out = output(&mut cmd).await;
    assert!(String::from_utf8_lossy(&out.stderr).contains("auto, tls, quic"), "{out:?}");
    forward.interrupt().await;
}

/// `forward --datagram` serves a local UDP service through a datagram
/// tunnel: a dialer's packets (QUIC datagrams here) reach it and its
/// answers come back.
#[tokio::test]
async fn forward_datagram_serves_a_local_udp_service() {
    let engine = TestEngine::start().await;
    let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let local = udp.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = udp.recv_from(&mut buf).await {
            let mut answer = b"echo:".to_vec();
            answer.extend_from_slice(&buf[..n]);
            let _ = udp.send_to(&answer, from).await;
        }
    });
    let mut cmd = engine.strait("alice");
    cmd.args(["forward", &local.to_string(), "--datagram", "--no-publish", "--name", "udp", "--transport", "quic"]);
    let mut forward = Running::spawn(cmd);
    assert_eq!(forward.line().await, format!("Forwarding rstrm://udp (private) -> {local} (over quic)"));

    let mut config =
        strait_agent::ClientConfig::new(format!("localhost:{}", engine.addr.port()), Some(engine.token("alice")));
    config.ca_file = Some(engine.ca());
    config.transport = strait_agent::TransportMode::Quic;
    let client = strait_agent::Client::new(config).unwrap();
    let mut conn = tokio::time::timeout(DEADLINE, client.dial_packets("udp")).await.unwrap().unwrap();
    assert_eq!(conn.mode(), "datagrams");
    for i in 0..100u32 {
        let packet = i.to_be_bytes();
        // UDP may lose a packet; on loopback it does not, and a lost one
        // would fail the wait below rather than pass unseen.
        conn.send(&packet).await.unwrap();
        let back =
            tokio::time::timeout(Duration::from_secs(5), conn.recv()).await.expect("an answer").unwrap().unwrap();
        assert_eq!(&back[..], [&b"echo:"[..], &packet].concat());
    }
    conn.close().await.unwrap();

    // `connect --udp` on the other side: a local UDP port, a channel per
    // source.
    let mut cmd = engine.strait("alice");
    cmd.args(["connect", "udp", "--udp", "--listen", "127.0.0.1:0"]);
    let mut connect = Running::spawn(cmd);
    let line = connect.line().await;
    let listen: SocketAddr = line
        .strip_prefix("Listening on udp://")
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("unexpected: {line}"))
        .parse()
        .unwrap();
    for source in 0..2 {
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        socket.connect(listen).await.unwrap();
        for i in 0..20u8 {
            let packet = [source, i];
            socket.send(&packet).await.unwrap();
            let mut buf = [0u8; 64];
            let n =
                tokio::time::timeout(Duration::from_secs(5), socket.recv(&mut buf)).await.expect("an answer").unwrap();
            assert_eq!(&buf[..n], [&b"echo:"[..], &packet].concat());
        }
    }
    connect.interrupt().await;
    forward.interrupt().await;
}

/// A QUIC agent killed with SIGKILL tells the engine nothing; restarted at
/// once, `forward` meets its own dead channel's tunnel, waits while that
/// channel stays silent, and is back on its name once the engine lets go
/// (the channel's liveness, 15 s). A live holder is refused at once (see
/// `a_refused_tunnel_exits_with_the_engines_reason`).
#[tokio::test]
async fn a_killed_quic_agent_restarted_at_once_gets_its_tunnel_back() {
    let engine = TestEngine::start().await;
    let echo = echo_server().await;
    let mut first = forward_private(&engine, "phoenix", echo).await;
    first.child.start_kill().unwrap();
    first.child.wait().await.unwrap();
    let mut cmd = engine.strait("alice");
    cmd.args(["forward", &echo.to_string(), "--private", "--name", "phoenix"]);
    let mut again = Running::spawn(cmd);
    again.stderr_until("liveness runs out").await;
    assert_eq!(again.line().await, format!("Forwarding rstrm://phoenix (private) -> {echo} (over quic)"));
    assert_eq!(dial_alice(&engine, "phoenix", b"back").await, b"back");
    again.interrupt().await;
}

/// `forward --protocol tcp` and `--protocol udp`: a public port of its own,
/// printed as `tcp://` / `udp://host:port`, one log line per connection or
/// session, and the same port back after the engine restarts.
#[tokio::test]
async fn forward_publishes_tcp_and_udp_on_ports_that_survive_a_restart() {
    let ports =
        "tcp: {enabled: true, port_range: \"20000-29999\"}\nudp: {enabled: true, port_range: \"20000-29999\"}\n";
    let mut engine = TestEngine::start_with(ports).await;
    let echo = echo_server().await;
    let mut cmd = engine.strait("alice");
    cmd.args(["forward", &echo.to_string(), "--protocol", "tcp", "--transport", "tls", "--request-log", "on"]);
    let mut tcp = Running::spawn(cmd);
    let line = tcp.line().await;
    let port = public_port(&line, "tcp", echo);
    assert_eq!(echo_through(SocketAddr::from(([127, 0, 0, 1], port)), b"over tcp").await, b"over tcp");
    let logged = tcp.line().await;
    assert!(logged.starts_with("tcp 127.0.0.1 in 8 B out 8 B "), "{logged}");

    let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let local = udp.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = udp.recv_from(&mut buf).await {
            let _ = udp.send_to(&buf[..n], from).await;
        }
    });
    let mut cmd = engine.strait("alice");
    cmd.args(["forward", &local.to_string(), "--udp", "--transport", "quic"]);
    let mut forward_udp = Running::spawn(cmd);
    let line = forward_udp.line().await;
    let udp_port = public_port(&line, "udp", local);
    udp_echo(udp_port, b"over udp").await;

    engine.restart().await;
    tcp.stderr_until("reconnected").await;
    forward_udp.stderr_until("reconnected").await;
    assert_eq!(echo_through(SocketAddr::from(([127, 0, 0, 1], port)), b"same port").await, b"same port");
    udp_echo(udp_port, b"same udp port").await;
    tcp.interrupt().await;
    forward_udp.interrupt().await;
}

/// The public port in `Forwarding <scheme>://localhost:<port> -> <local> (over ...)`.
fn public_port(line: &str, scheme: &str, local: SocketAddr) -> u16 {
    let rest = line.strip_prefix(&format!("Forwarding {scheme}://localhost:")).unwrap_or_else(|| panic!("{line}"));
    let (port, tail) = rest.split_once(' ').unwrap_or_else(|| panic!("{line}"));
    assert!(tail.starts_with(&format!("-> {local} (over ")), "{line}");
    port.parse().unwrap()
}

async fn udp_echo(port: u16, packet: &[u8]) {
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    socket.connect(("127.0.0.1", port)).await.unwrap();
    socket.send(packet).await.unwrap();
    let mut buf = [0u8; 2048];
    let n = tokio::time::timeout(DEADLINE, socket.recv(&mut buf)).await.expect("an answer").unwrap();
    assert_eq!(&buf[..n], packet);
}

/// `strait forward --path/--strip-path` and the policy flags: two services
/// on one hostname, basic auth hashed by the CLI, a denied path.
#[tokio::test]
async fn forward_splits_a_hostname_by_path_with_a_policy() {
    use http_body_util::BodyExt;
    let engine = TestEngine::start().await;
    let service = |name: &'static str| -> strait_testkit::Handler {
        std::sync::Arc::new(move |req: http::Request<hyper::body::Incoming>| {
            Box::pin(async move {
                let auth = req.headers().contains_key(http::header::AUTHORIZATION);
                let text = format!("{name} {} auth={auth}", req.uri());
                http::Response::builder().body(strait_testkit::full(text)).unwrap()
            })
        })
    };
    let api = strait_testkit::http_service(service("api")).await;
    let ui = strait_testkit::http_service(service("ui")).await;
    let mut cmd = engine.strait("alice");
    cmd.args(["forward", &api.to_string(), "--host", "keystone", "--path", "/api/", "--strip-path"]);
    cmd.args(["--basic-auth", "ann:s3cret", "--deny-path", "/api/internal/*", "--transport", "tls"]);
    let mut api_forward = Running::spawn(cmd);
    let line = api_forward.line().await;
    assert!(line.starts_with("Forwarding https://keystone.t.localhost"), "{line}");
    let mut cmd = engine.strait("alice");
    cmd.args(["forward", &ui.to_string(), "--host", "keystone", "--transport", "tls"]);
    let mut ui_forward = Running::spawn(cmd);
    let line = ui_forward.line().await;
    assert!(line.starts_with("Forwarding https://keystone.t.localhost"), "{line}");

    let host = "keystone.t.localhost";
    let mut public = engine.h1(host).await;
    let mut send = async |target: &str, auth: Option<&str>| {
        let mut request = http::Request::get(target).header(http::header::HOST, host);
        if let Some(auth) = auth {
            request = request.header(http::header::AUTHORIZATION, auth);
        }
        let response = public.send_request(request.body(strait_testkit::full("")).unwrap()).await.unwrap();
        let status = response.status().as_u16();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8(body.to_vec()).unwrap())
    };
    // base64("ann:s3cret")
    let good = "Basic YW5uOnMzY3JldA==";
    assert_eq!(send("/", None).await, (200, "ui / auth=false".to_string()));
    assert_eq!(send("/api/streams?x=1", None).await.0, 401);
    assert_eq!(send("/api/streams?x=1", Some(good)).await, (200, "api /streams?x=1 auth=false".to_string()));
    assert_eq!(send("/api/internal/keys", Some(good)).await.0, 404);
    api_forward.interrupt().await;
    ui_forward.interrupt().await;
}

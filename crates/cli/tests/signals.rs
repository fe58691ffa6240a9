//! One shutdown signal per command: SIGINT or SIGTERM ends a long-running
//! command promptly, whatever it is waiting on at that moment (a webhook
//! delivery, a connect to a silent engine, a backoff sleep).

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{DEADLINE, Running, Strait, TestEngine, echo_server};
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

/// The most a signalled command may take to exit.
const PROMPTLY: Duration = Duration::from_secs(5);

/// A TCP endpoint that accepts and reads but never answers: a webhook
/// receiver that hangs, or an engine that never finishes a handshake.
/// Each connection's first bytes (empty for a client that sends nothing
/// first) are reported.
async fn silent_endpoint() -> (SocketAddr, mpsc::UnboundedReceiver<Vec<u8>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut first = vec![0u8; 4096];
                let n = tcp.read(&mut first).await.unwrap_or(0);
                first.truncate(n);
                let _ = tx.send(first);
                // Hold the connection open, silent, until the peer leaves.
                let mut sink = [0u8; 4096];
                while matches!(tcp.read(&mut sink).await, Ok(n) if n > 0) {}
            });
        }
    });
    (addr, rx)
}

async fn next_connection(connections: &mut mpsc::UnboundedReceiver<Vec<u8>>) -> Vec<u8> {
    tokio::time::timeout(DEADLINE, connections.recv()).await.expect("a connection in time").unwrap()
}

#[tokio::test]
async fn events_stops_on_sigint_while_a_webhook_delivery_hangs() {
    let engine = TestEngine::start().await;
    let (receiver, mut requests) = silent_endpoint().await;
    // An operator watches alice's agent.
    let mut cmd = engine.strait_admin("ops");
    let url = format!("http://{receiver}/hooks/strait");
    cmd.args(["events", "--forward-to", &url, "--webhook", "--webhook-secret", "whsec_test"]);
    let mut events = Running::spawn(cmd);
    events.stderr_until("watching events").await;

    // An agent connecting is a deliverable event (client.created).
    let echo = echo_server().await;
    let mut agent = engine.strait("alice");
    agent.args(["forward", &echo.to_string(), "--private", "--name", "hooked"]);
    let mut forward = Running::spawn(agent);
    forward.line().await;
    let request = next_connection(&mut requests).await;
    assert!(request.starts_with(b"POST /hooks/strait "), "{}", String::from_utf8_lossy(&request));

    // The delivery waits on the receiver's answer: the signal must end it.
    events.signal("INT").await;
    let status = events.exit_within(PROMPTLY).await;
    assert!(status.success(), "exit status {status}");
    forward.interrupt().await;
}

#[tokio::test]
async fn forward_stops_on_sigterm_while_waiting_to_reconnect() {
    let mut engine = TestEngine::start().await;
    let echo = echo_server().await;
    let mut cmd = engine.strait("alice");
    cmd.args(["forward", &echo.to_string(), "--private", "--name", "patient"]);
    let mut forward = Running::spawn(cmd);
    forward.line().await;
    engine.stop().await;
    forward.stderr_until("reconnecting in").await;
    forward.signal("TERM").await;
    let status = forward.exit_within(PROMPTLY).await;
    assert!(status.success(), "exit status {status}");
}

#[tokio::test]
async fn commands_waiting_on_a_silent_engine_stop_on_sigint() {
    let engine = TestEngine::start().await;
    let (silent, mut connections) = silent_endpoint().await;
    let file = engine.dir.path().join("tunnels.yaml");
    std::fs::write(&file, "version: 1\ntunnels:\n  - name: web\n    forward: 9\n").unwrap();
    let file = file.display().to_string();
    // A long-running command stops cleanly; a one-shot one is interrupted (130).
    let commands: [(&[&str], Option<i32>); 5] = [
        (&["forward", "9", "--private"], Some(0)),
        (&["run", "--apply", &file], Some(0)),
        (&["events"], Some(0)),
        (&["tunnels"], Some(130)),
        (&["dial", "db"], Some(130)),
    ];
    for (args, code) in commands {
        let mut cmd = engine.strait("alice");
        cmd.env("RSTREAM_ENGINE", format!("localhost:{}", silent.port())).args(args);
        let mut running = Running::spawn(cmd);
        // The TLS handshake has begun and will never be answered.
        next_connection(&mut connections).await;
        running.signal("INT").await;
        let status = running.exit_within(PROMPTLY).await;
        assert_eq!(status.code(), code, "strait {args:?}: {status}");
    }
}

//! What the commands retry and what stops them. Each error that will not
//! heal by itself ends the command, non-zero, with a message saying what
//! to change; what may heal (an engine that is down or restarting) is
//! retried.

mod common;

use std::net::SocketAddr;

use common::{DEADLINE, Running, Strait, TestEngine, echo_server, output};
use tokio::io::AsyncReadExt;

/// A declarative file with one private tunnel to `local`.
fn tunnels_file(engine: &TestEngine, local: SocketAddr) -> String {
    let file = engine.dir.path().join("tunnels.yaml");
    std::fs::write(&file, format!("version: 1\ntunnels:\n  - name: declared\n    forward: {local}\n")).unwrap();
    file.display().to_string()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test]
async fn an_untrusted_engine_certificate_stops_every_command_with_the_ca_hint() {
    let engine = TestEngine::start().await;
    let echo = echo_server().await;
    let file = tunnels_file(&engine, echo);
    let hinted = |text: &str| text.contains("--ca-file") && text.contains("SSL_CERT_FILE") && text.contains("caFile");
    let one_shot: [&[&str]; 6] = [
        &["forward", "9", "--private"],
        &["events"],
        &["events", "--transport", "websocket"],
        &["run", "--apply", &file],
        &["dial", "db"],
        &["tunnels"],
    ];
    for args in one_shot {
        // Without SSL_CERT_FILE the development CA is not trusted.
        let out = output(engine.strait("alice").env_remove("SSL_CERT_FILE").args(args)).await;
        assert!(!out.status.success(), "strait {args:?} exits non-zero");
        assert!(hinted(&stderr(&out)), "strait {args:?}: {}", stderr(&out));
    }

    // connect listens first; its first dial finds the problem and ends it.
    let mut cmd = engine.strait("alice");
    cmd.env_remove("SSL_CERT_FILE").args(["connect", "db", "--listen", "127.0.0.1:0"]);
    let mut connect = Running::spawn(cmd);
    let line = connect.line().await;
    let listen = line.strip_prefix("Listening on ").and_then(|r| r.split_whitespace().next()).unwrap();
    let mut local = tokio::net::TcpStream::connect(listen).await.unwrap();
    let (status, text) = connect.finished().await;
    assert!(!status.success(), "connect exits non-zero");
    assert!(hinted(&text), "{text}");
    // The local connection is closed with it, not left hanging.
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(DEADLINE, local.read_to_end(&mut rest)).await;
    assert!(closed.is_ok() && rest.is_empty(), "{closed:?} {rest:?}");
}

#[tokio::test]
async fn an_engine_name_that_does_not_resolve_stops_at_the_first_attempt() {
    let engine = TestEngine::start().await;
    let echo = echo_server().await;
    let file = tunnels_file(&engine, echo);
    let commands: [&[&str]; 3] = [&["forward", "9", "--private"], &["events"], &["run", "--apply", &file]];
    for args in commands {
        // `.invalid` never resolves (RFC 6761).
        let out = output(engine.strait("alice").env("RSTREAM_ENGINE", "engine.invalid:443").args(args)).await;
        assert!(!out.status.success(), "strait {args:?} exits non-zero");
        let text = stderr(&out);
        assert!(text.contains("cannot resolve") && text.contains("RSTREAM_ENGINE"), "strait {args:?}: {text}");
        assert!(!text.contains("retrying"), "strait {args:?} did not retry: {text}");
    }
}

#[tokio::test]
async fn a_token_refused_after_an_engine_restart_with_a_new_secret_stops_the_commands() {
    let mut engine = TestEngine::start().await;
    let echo = echo_server().await;
    let file = tunnels_file(&engine, echo);
    let mut forward = engine.strait("alice");
    forward.args(["forward", &echo.to_string(), "--private", "--name", "plain"]);
    let mut forward = Running::spawn(forward);
    assert!(forward.line().await.starts_with("Forwarding "));
    let mut run = engine.strait("alice");
    run.args(["run", "--apply", &file]);
    let mut run = Running::spawn(run);
    run.until_applied().await;
    let mut events = Running::spawn({
        let mut cmd = engine.strait("ops");
        cmd.arg("events");
        cmd
    });
    events.line().await;

    // The tokens these commands hold were signed with the old secret.
    engine.restart_with_secret("another-secret-another-secret-0123456789").await;
    for (name, running) in [("forward", &mut forward), ("run", &mut run), ("events", &mut events)] {
        let (status, text) = running.finished().await;
        assert!(!status.success(), "{name} exits non-zero");
        assert!(text.contains("refused the token") && text.contains("RSTREAM_AUTHENTICATION_TOKEN"), "{name}: {text}");
    }
}

#[tokio::test]
async fn an_engine_that_is_down_is_waited_for() {
    let mut engine = TestEngine::start().await;
    let echo = echo_server().await;
    let file = tunnels_file(&engine, echo);
    engine.stop().await;

    let mut forward = engine.strait("alice");
    forward.args(["forward", &echo.to_string(), "--private", "--name", "early"]);
    let mut forward = Running::spawn(forward);
    forward.stderr_until("retrying in").await;
    let mut run = engine.strait("alice");
    run.args(["run", "--apply", &file]);
    let mut run = Running::spawn(run);
    run.stderr_until("retrying in").await;
    let mut events = engine.strait("ops");
    events.arg("events");
    let mut events = Running::spawn(events);
    events.stderr_until("reconnecting in").await;

    engine.start_again().await;
    assert_eq!(forward.line().await, format!("Forwarding rstrm://early (private) -> {echo} (over quic)"));
    let opened = run.stdout_until("opened declared").await;
    assert!(opened.last().unwrap().starts_with("opened declared: rstrm://declared"), "{opened:?}");
    let initial: serde_json::Value = serde_json::from_str(&events.line().await).unwrap();
    assert_eq!(initial["type"], "state.initial");
    assert_eq!(common::dial(&engine, "alice", "early", b"up at last").await, b"up at last");
    for running in [forward, run, events] {
        running.interrupt().await;
    }
}

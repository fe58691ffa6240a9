//! `strait run --apply` end to end: a real engine on 127.0.0.1:0, the real
//! `strait` binary, real local echo services. Every wait is on an output
//! line or a condition, bounded by a deadline.

mod common;

use std::path::Path;

use common::{Running, Strait, TestEngine, dial, echo_server, output};

async fn assert_echoes(engine: &TestEngine, tunnel: &str) {
    let payload = format!("hello {tunnel}");
    assert_eq!(dial(engine, "alice", tunnel, payload.as_bytes()).await, payload.as_bytes(), "through {tunnel}");
}

fn entry(name: &str, forward: &str, extra: &str) -> String {
    format!("  - name: {name}\n    forward: {forward}\n    tunnel:\n      publish: false\n{extra}")
}

fn write(path: &Path, text: &str) {
    // Write then rename, as editors do, so a poll never sees half a file.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test]
async fn apply_creates_changes_and_removes_and_refuses_a_broken_file() {
    let engine = TestEngine::start().await;
    let (ea, eb, ec, ed) = (echo_server().await, echo_server().await, echo_server().await, echo_server().await);
    let file = engine.dir.path().join("tunnels.yaml");
    let shown = file.display().to_string();
    // `a` takes its port from the environment.
    write(
        &file,
        &format!(
            "version: 1\ntunnels:\n{}{}{}",
            entry("a", "${A_PORT}", ""),
            entry("b", &eb.to_string(), "      labels: {tier: one}\n"),
            entry("c", &ec.to_string(), "")
        ),
    );
    let mut cmd = engine.strait("alice");
    cmd.env("A_PORT", ea.port().to_string()).args(["run", "--watch", "--apply"]).arg(&file);
    let mut run = Running::spawn(cmd);

    let out = run.until_applied().await;
    assert_eq!(out.last().unwrap(), &format!("applied {shown}: 3 created, 0 changed, 0 removed, 0 unchanged"));
    assert!(out.contains(&format!("created a: rstrm://a (private) -> 127.0.0.1:{}", ea.port())), "{out:?}");
    let live = engine.tunnels();
    assert_eq!(live.len(), 3);
    for tunnel in live.values() {
        let labels = &tunnel.properties.labels;
        assert_eq!(labels.get("rstream.managed-by").map(String::as_str), Some("run"), "{labels:?}");
        assert_eq!(labels.get("rstream.source").map(String::as_str), Some("apply"), "{labels:?}");
        assert_eq!(tunnel.principal, "alice");
    }
    assert_eq!(live["b"].properties.labels.get("tier").map(String::as_str), Some("one"));
    for name in ["a", "b", "c"] {
        assert_echoes(&engine, name).await;
    }
    let before = engine.ids();

    // a unchanged, b relabelled, c removed, d added.
    write(
        &file,
        &format!(
            "version: 1\ntunnels:\n{}{}{}",
            entry("a", "${A_PORT}", ""),
            entry("b", &eb.to_string(), "      labels: {tier: two}\n"),
            entry("d", &ed.to_string(), "")
        ),
    );
    let out = run.until_applied().await;
    assert_eq!(out.last().unwrap(), &format!("applied {shown}: 1 created, 1 changed, 1 removed, 1 unchanged"));
    assert!(out.contains(&"removed c".to_string()), "{out:?}");
    let after = engine.ids();
    assert_eq!(after["a"], before["a"], "an unchanged tunnel is not touched");
    assert_ne!(after["b"], before["b"], "a changed tunnel is reopened");
    assert!(!after.contains_key("c"), "a removed tunnel is closed");
    assert!(after.contains_key("d"));
    assert_eq!(engine.tunnels()["b"].properties.labels.get("tier").map(String::as_str), Some("two"));
    for name in ["a", "b", "d"] {
        assert_echoes(&engine, name).await;
    }

    // An unknown key on line 7 and an undefined variable on line 9: both
    // named, and nothing changes.
    let broken = format!(
        "version: 1\ntunnels:\n{}{}{}",
        entry("a", "${A_PORT}", "      bogus: true\n"),
        entry("e", "${NOT_SET_ANYWHERE}", ""),
        entry("d", &ed.to_string(), "")
    );
    assert_eq!(broken.lines().nth(6), Some("      bogus: true"));
    assert!(broken.lines().nth(8).unwrap().contains("NOT_SET_ANYWHERE"));
    write(&file, &broken);
    let err = run.stderr_until("keeping the current tunnels").await.join("\n");
    assert!(err.contains(&format!("{shown}:7:7: unknown field `bogus`")), "{err}");
    assert!(err.contains(&format!("{shown}:9:14: environment variable NOT_SET_ANYWHERE is not set")), "{err}");
    assert_eq!(engine.ids(), after, "a refused file changes nothing");
    assert_echoes(&engine, "b").await;

    // Fixing the file applies it again.
    write(&file, &format!("version: 1\ntunnels:\n{}", entry("a", "${A_PORT}", "")));
    let out = run.until_applied().await;
    assert_eq!(out.last().unwrap(), &format!("applied {shown}: 0 created, 0 changed, 2 removed, 1 unchanged"));
    assert_eq!(engine.ids()["a"], before["a"]);

    // Ctrl-C closes what it opened.
    run.interrupt().await;
    assert!(engine.tunnels().is_empty());
}

#[tokio::test]
async fn a_broken_file_at_start_exits_having_created_nothing() {
    let engine = TestEngine::start().await;
    let echo = echo_server().await;
    let file = engine.dir.path().join("tunnels.yaml");
    let shown = file.display().to_string();
    // A valid first tunnel, then a duplicate name and a bad protocol.
    let text = format!(
        "version: 1\ntunnels:\n{}{}{}",
        entry("a", &echo.to_string(), ""),
        entry("a", &echo.to_string(), ""),
        entry("b", &echo.to_string(), "      protocol: quic\n")
    );
    write(&file, &text);
    let out = output(engine.strait("alice").args(["run", "--apply"]).arg(&file)).await;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&format!("{shown}:7:11: tunnel name \"a\" is already used on line 3")), "{stderr}");
    assert!(
        stderr.contains(&format!("{shown}:15:17: protocol \"quic\" is not one of http, tls, tcp, udp")),
        "{stderr}"
    );
    assert!(stderr.contains("has 2 errors; nothing was changed"), "{stderr}");
    assert!(out.stdout.is_empty(), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(engine.tunnels().is_empty());

    // A wrong type, after a valid tunnel.
    let text = format!(
        "version: 1\ntunnels:\n{}{}",
        entry("a", &echo.to_string(), ""),
        entry("b", &echo.to_string(), "      upstreamTLS: sometimes\n")
    );
    write(&file, &text);
    let out = output(engine.strait("alice").args(["run", "--apply"]).arg(&file)).await;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&format!("{shown}:11:20: invalid boolean")), "{stderr}");
    assert!(engine.tunnels().is_empty());

    let out = output(engine.strait("alice").args(["run", "--apply"]).arg(engine.dir.path().join("missing.yaml"))).await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read"));
}

#[tokio::test]
async fn a_refused_tunnel_at_start_exits_and_closes_the_others() {
    let engine = TestEngine::start().await;
    let echo = echo_server().await;
    let file = engine.dir.path().join("tunnels.yaml");
    // geoip rules are refused by this engine.
    let text = format!(
        "version: 1\ntunnels:\n{}{}",
        entry("fine", &echo.to_string(), ""),
        entry("geo", &echo.to_string(), "      geoip: [FR]\n")
    );
    write(&file, &text);
    let out = output(engine.strait("alice").args(["run", "--apply"]).arg(&file)).await;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("tunnel geo") && stderr.contains("geoip"), "{stderr}");
    assert!(engine.tunnels().is_empty(), "the tunnel opened before the refusal is closed");
}

#[tokio::test]
async fn apply_survives_an_engine_restart_and_reloads_on_sighup() {
    let mut engine = TestEngine::start().await;
    let echo = echo_server().await;
    let file = engine.dir.path().join("tunnels.yaml");
    write(&file, &format!("version: 1\ntunnels:\n{}", entry("sturdy", &echo.to_string(), "")));
    // Without --watch: only SIGHUP re-reads the file.
    let mut cmd = engine.strait("alice");
    cmd.args(["run", "--apply"]).arg(&file);
    let mut run = Running::spawn(cmd);
    run.until_applied().await;
    assert_echoes(&engine, "sturdy").await;

    engine.restart().await;
    run.stderr_until("reconnected").await;
    let tunnels = engine.tunnels();
    assert!(tunnels.contains_key("sturdy"));
    assert_eq!(tunnels["sturdy"].properties.labels.get("rstream.source").map(String::as_str), Some("apply"));
    assert_echoes(&engine, "sturdy").await;

    write(
        &file,
        &format!(
            "version: 1\ntunnels:\n{}{}",
            entry("sturdy", &echo.to_string(), ""),
            entry("more", &echo.to_string(), "")
        ),
    );
    run.signal("HUP").await;
    let out = run.until_applied().await;
    assert!(out.last().unwrap().ends_with(": 1 created, 0 changed, 0 removed, 1 unchanged"), "{out:?}");
    assert_echoes(&engine, "more").await;
    run.interrupt().await;
}

#[tokio::test]
async fn a_tunnel_can_name_a_context_of_the_agent_configuration() {
    let engine = TestEngine::start().await;
    let echo = echo_server().await;
    let config = engine.dir.path().join("agent.yaml");
    std::fs::write(
        &config,
        format!(
            "version: 1\ncontexts:\n  - name: lab\n    engine: localhost:{}\n    \
             auth: {{token: {{storage: {{kind: inline, value: \"{}\"}}}}}}\n    \
             transport: {{tls: {{caFile: {}}}}}\n",
            engine.addr.port(),
            engine.token("carol"),
            engine.ca().display()
        ),
    )
    .unwrap();
    let file = engine.dir.path().join("tunnels.yaml");
    let lab = format!("  - name: labbed\n    forward: {echo}\n    context: lab\n");
    write(&file, &format!("version: 1\ntunnels:\n{}{lab}", entry("plain", &echo.to_string(), "")));
    let mut cmd = engine.strait("alice");
    cmd.arg("--config").arg(&config).args(["run", "--apply"]).arg(&file);
    let mut run = Running::spawn(cmd);
    run.until_applied().await;
    let tunnels = engine.tunnels();
    assert_eq!(tunnels["plain"].principal, "alice");
    assert_eq!(tunnels["labbed"].principal, "carol", "the named context's token is used");
    assert_eq!(dial(&engine, "carol", "labbed", b"via lab").await, b"via lab");
    run.interrupt().await;

    // An unknown context refuses the file, naming the tunnel's line.
    write(&file, "version: 1\ntunnels:\n  - name: x\n    forward: 1\n    context: nowhere\n");
    let out = output(engine.strait("alice").arg("--config").arg(&config).args(["run", "--apply"]).arg(&file)).await;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(":3: tunnel x: context \"nowhere\" is not in"), "{stderr}");
}

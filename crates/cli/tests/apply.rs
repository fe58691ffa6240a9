//! `strait run --apply` end to end: a real engine on 127.0.0.1:0, the real
//! `strait` binary, real local echo services. Every wait is on an output
//! line or a condition, bounded by a deadline.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use common::{DEADLINE, Running, Strait, TestEngine, dial, echo_server, echo_through, output};
use strait_testkit::udp_echo_server;
use tokio::net::UdpSocket;

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

/// A port free on 127.0.0.1 a moment ago, for a one-port range: bound on
/// port 0 (TCP or UDP, as the engine will bind it), read and released.
async fn free_port(udp: bool) -> u16 {
    let addr = if udp {
        UdpSocket::bind("127.0.0.1:0").await.unwrap().local_addr()
    } else {
        tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr()
    };
    addr.unwrap().port()
}

/// The public port in `created <name>: <scheme>://localhost:<port> -> <local>`.
fn created_port(out: &[String], name: &str, scheme: &str, local: SocketAddr) -> u16 {
    let prefix = format!("created {name}: {scheme}://localhost:");
    let line = out.iter().find(|l| l.starts_with(&prefix)).unwrap_or_else(|| panic!("no {prefix:?} in {out:?}"));
    let (port, tail) = line[prefix.len()..].split_once(' ').unwrap_or_else(|| panic!("{line}"));
    assert_eq!(tail, format!("-> {local}"), "{line}");
    port.parse().unwrap_or_else(|_| panic!("no port in {line}"))
}

/// Sends each packet to `port` on 127.0.0.1 from one socket and checks it
/// comes back intact. The first packets may be lost while the engine opens
/// the session and the agent its socket, so a packet unanswered for a
/// moment is sent again, until [`DEADLINE`]. Each packet starts with its
/// index: a late echo of an earlier resend is recognised and skipped.
async fn udp_echoes(port: u16, sizes: &[usize]) {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    socket.connect(("127.0.0.1", port)).await.unwrap();
    let mut buf = vec![0u8; 65_536];
    for (index, &size) in sizes.iter().enumerate() {
        let tag = index as u8;
        let packet: Vec<u8> = std::iter::once(tag).chain((1..size).map(|i| (i * 7 + index) as u8)).collect();
        let round = async {
            loop {
                socket.send(&packet).await.unwrap();
                let answer = async {
                    loop {
                        let n = socket.recv(&mut buf).await.unwrap();
                        if n > 0 && buf[0] == tag {
                            return n;
                        }
                        assert!(n > 0 && buf[0] < tag, "an answer to no packet sent: {:?}", &buf[..n.min(16)]);
                    }
                };
                if let Ok(n) = tokio::time::timeout(Duration::from_millis(500), answer).await {
                    return n;
                }
            }
        };
        let n = tokio::time::timeout(DEADLINE, round)
            .await
            .unwrap_or_else(|_| panic!("no echo of the {size}-byte packet through udp port {port} in {DEADLINE:?}"));
        assert_eq!(&buf[..n], &packet[..], "the {size}-byte packet came back changed");
    }
}

/// A file with a published tcp tunnel asking for a port and a published
/// udp tunnel taking one: `run --apply` prints each public address, and
/// both carry an echo.
#[tokio::test]
async fn apply_publishes_tcp_and_udp_ports() {
    let (tcp_port, udp_port) = (free_port(false).await, free_port(true).await);
    let engine = TestEngine::start_with(&format!(
        "tcp: {{enabled: true, port_range: \"{tcp_port}-{tcp_port}\"}}\n\
         udp: {{enabled: true, port_range: \"{udp_port}-{udp_port}\"}}\n"
    ))
    .await;
    let (tcp_echo, udp_echo) = (echo_server().await, udp_echo_server().await);
    let file = engine.dir.path().join("tunnels.yaml");
    write(
        &file,
        &format!(
            "version: 1\ntunnels:\n  \
             - name: rtmp\n    forward: {tcp_echo}\n    tunnel: {{publish: true, protocol: tcp, port: {tcp_port}}}\n  \
             - name: srt\n    forward: {udp_echo}\n    tunnel: {{publish: true, protocol: udp}}\n"
        ),
    );
    let mut cmd = engine.strait("alice");
    cmd.args(["run", "--apply"]).arg(&file);
    let mut run = Running::spawn(cmd);

    let out = run.until_applied().await;
    assert_eq!(
        out.last().unwrap(),
        &format!("applied {}: 2 created, 0 changed, 0 removed, 0 unchanged", file.display())
    );
    assert_eq!(created_port(&out, "rtmp", "tcp", tcp_echo), tcp_port, "the tcp port asked for: {out:?}");
    let udp_served = created_port(&out, "srt", "udp", udp_echo);
    assert!((udp_port..=udp_port).contains(&udp_served), "udp port {udp_served} outside {udp_port}-{udp_port}");

    let public = SocketAddr::from(([127, 0, 0, 1], tcp_port));
    for payload in [&b"over tcp"[..], &[0x5a; 100_000][..]] {
        let back = tokio::time::timeout(DEADLINE, echo_through(public, payload))
            .await
            .unwrap_or_else(|_| panic!("no tcp echo through {public} in {DEADLINE:?}"));
        assert!(back == payload, "{} bytes through {public} came back changed", payload.len());
    }
    // A QUIC agent's packets ride QUIC datagrams: about 1,200 bytes at most.
    udp_echoes(udp_served, &[1, 64, 512, 1100]).await;

    run.interrupt().await;
    assert!(engine.tunnels().is_empty(), "Ctrl-C closes both tunnels");
}

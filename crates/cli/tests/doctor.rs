//! `strait doctor` against a real engine: every check passes where DNS,
//! certificates and tunnels are right; a missing wildcard record, a
//! certificate near its end, a slow round trip and a refused token each
//! show as what they are, with the exit code scripts gate on; the token is
//! never printed.
//!
//! DNS is the system resolver's: each run gets its own /etc/hosts, bind-
//! mounted in a mount namespace of its own (`unshare -m`), so the test
//! neither depends on nor changes the machine's.

mod common;

use std::process::Output;

use common::{Strait, TestEngine, output};
use tokio::process::Command;

/// `strait doctor ARGS` as `sub`, resolving names through a hosts file
/// that lists `names` at 127.0.0.1.
async fn doctor(engine: &TestEngine, sub: &str, names: &str, token: Option<&str>, args: &[&str]) -> Output {
    let hosts = engine.dir.path().join(format!("hosts-{}", rand_suffix()));
    std::fs::write(&hosts, format!("127.0.0.1 {names}\n")).unwrap();
    let base = engine.strait(sub);
    let mut cmd = Command::new("unshare");
    cmd.env_clear();
    for (key, value) in base.as_std().get_envs() {
        if let Some(value) = value {
            cmd.env(key, value);
        }
    }
    if let Some(token) = token {
        cmd.env("RSTREAM_AUTHENTICATION_TOKEN", token);
    }
    cmd.args(["-m", "sh", "-c", "mount --bind \"$1\" /etc/hosts && shift && exec \"$@\"", "sh"])
        .arg(&hosts)
        .arg(env!("CARGO_BIN_EXE_strait"))
        .arg("doctor")
        .args(args);
    output(&mut cmd).await
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

const ALL: [&str; 9] = [
    "dns.engine",
    "dns.wildcard",
    "certificate.engine",
    "certificate.wildcard",
    "api",
    "tunnel.private.tls",
    "tunnel.published.tls",
    "tunnel.private.quic",
    "tunnel.published.quic",
];

fn parse(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("not JSON ({e}): {}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    })
}

fn status<'a>(report: &'a serde_json::Value, name: &str) -> (&'a str, &'a str) {
    let check = report["checks"].as_array().unwrap().iter().find(|c| c["name"] == name);
    let check = check.unwrap_or_else(|| panic!("no {name} check in {report:#}"));
    (check["status"].as_str().unwrap(), check["detail"].as_str().unwrap())
}

fn no_secret(out: &Output, secret: &str) {
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!text.contains(secret), "the token was printed: {text}");
}

const NAMES: &str = "localhost strait-doctor.t.localhost";

#[tokio::test]
async fn every_check_passes_where_dns_certificates_and_tunnels_are_right() {
    let engine = TestEngine::start().await;
    let out = doctor(&engine, "alice", NAMES, None, &["-o", "json"]).await;
    let report = parse(&out);
    assert_eq!(out.status.code(), Some(0), "{report:#}");
    assert_eq!(report["verdict"], "pass");
    let names: Vec<&str> = report["checks"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(names, ALL);
    for name in ALL {
        assert_eq!(status(&report, name).0, "pass", "{name}: {report:#}");
    }
    assert!(status(&report, "tunnel.published.quic").1.contains(".t.localhost/ through the agent over quic"));
    assert!(status(&report, "certificate.wildcard").1.contains("days left"));
    no_secret(&out, &engine.token("alice"));
    // The doctor's tunnels are gone with it.
    assert!(engine.tunnels().is_empty(), "{:?}", engine.ids());

    // Human output: one line per check, then the verdict.
    let out = doctor(&engine, "alice", NAMES, None, &[]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.lines().any(|l| l.contains("pass") && l.contains("tunnel.private.tls")), "{text}");
    assert!(text.trim_end().ends_with("verdict: pass"), "{text}");
}

#[tokio::test]
async fn a_missing_wildcard_record_fails_and_says_which_record() {
    let engine = TestEngine::start().await;
    let out = doctor(&engine, "alice", "localhost", None, &["-o", "json"]).await;
    let report = parse(&out);
    assert_eq!(out.status.code(), Some(1), "{report:#}");
    assert_eq!(report["verdict"], "fail");
    let (status, detail) = status(&report, "dns.wildcard");
    assert_eq!(status, "fail");
    assert!(
        detail.contains("strait-doctor.t.localhost does not resolve") && detail.contains("*.t.localhost"),
        "{detail}"
    );
    // The rest does not hang on DNS: the round trips use the engine's address.
    assert_eq!(self::status(&report, "tunnel.published.tls").0, "pass", "{report:#}");
}

#[tokio::test]
async fn thresholds_turn_a_certificate_or_a_round_trip_into_a_warning_or_a_failure() {
    let engine = TestEngine::start().await;
    // The test certificates last far less than a million days.
    let out = doctor(&engine, "alice", NAMES, None, &["-o", "json", "--cert-warn-days", "1000000"]).await;
    let report = parse(&out);
    assert_eq!((out.status.code(), report["verdict"].as_str()), (Some(3), Some("warn")), "{report:#}");
    assert_eq!(status(&report, "certificate.engine").0, "warn");

    let out = doctor(&engine, "alice", NAMES, None, &["-o", "json", "--cert-fail-days", "1000000"]).await;
    assert_eq!((out.status.code(), report_of(&out)), (Some(1), "fail".to_string()));

    // A published round trip (a TLS handshake, a pairing, an HTTP
    // exchange) takes more than 0 ms.
    let args = ["-o", "json", "--threshold", "tunnel.published.tls=0:600000"];
    let out = doctor(&engine, "alice", NAMES, None, &args).await;
    let report = parse(&out);
    assert_eq!(out.status.code(), Some(3), "{report:#}");
    let (status, detail) = status(&report, "tunnel.published.tls");
    assert!(status == "warn" && detail.contains("0 ms warn threshold"), "{detail}");
    assert_eq!(self::status(&report, "tunnel.published.quic").0, "pass", "the threshold is that check's alone");

    let out = doctor(&engine, "alice", NAMES, None, &["--threshold", "api=9:1"]).await;
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("warn threshold is above the fail threshold"), "{out:?}");
}

fn report_of(out: &Output) -> String {
    parse(out)["verdict"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn a_refused_token_fails_the_api_and_the_tunnels_and_is_not_printed() {
    let engine = TestEngine::start().await;
    let bad = strait_engine::auth::mint_with(b"another-secret-another-secret-32", "alice", Some(3600), false);
    let out = doctor(&engine, "alice", NAMES, Some(&bad), &["-o", "json"]).await;
    let report = parse(&out);
    assert_eq!(out.status.code(), Some(1), "{report:#}");
    assert_eq!(status(&report, "api").0, "fail");
    assert!(status(&report, "api").1.contains("401"), "{report:#}");
    assert_eq!(status(&report, "tunnel.private.tls").0, "fail");
    // DNS and certificates do not need the token.
    assert_eq!(status(&report, "certificate.engine").0, "pass");
    no_secret(&out, &bad);
}

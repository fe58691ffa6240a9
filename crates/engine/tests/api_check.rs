//! `check-config`: what production refuses, on certificates made for each
//! case.

use std::path::Path;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, date_time_ymd};
use strait_engine::check::{Severity, check};
use strait_engine::config::Config;

const GOOD_SECRET: &str = "0123456789abcdef0123456789abcdef0123456789abcdef";

struct Pair<'a> {
    names: &'a [&'a str],
    expired: bool,
    self_signed: bool,
}

/// Writes cert.pem and key.pem into `dir` for the case.
fn write_pair(dir: &Path, pair: Pair<'_>) {
    let names: Vec<String> = pair.names.iter().map(|n| n.to_string()).collect();
    let mut params = CertificateParams::new(names).unwrap();
    params.distinguished_name.push(DnType::CommonName, pair.names[0]);
    if pair.expired {
        params.not_before = date_time_ymd(2020, 1, 1);
        params.not_after = date_time_ymd(2021, 1, 1);
    }
    let key = KeyPair::generate().unwrap();
    let cert = if pair.self_signed {
        params.self_signed(&key).unwrap()
    } else {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.distinguished_name.push(DnType::CommonName, "Example Issuing CA");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.signed_by(&key, &Issuer::new(ca, ca_key)).unwrap()
    };
    std::fs::write(dir.join("cert.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
}

fn config(dir: &Path, secret: &str, extra: &str) -> Config {
    let yaml = format!(
        "engine: {{host: edge.example.com, log_level: info}}\n\
         tls: {{enabled: true, listen_addr: \":443\"}}\n\
         certs: {{static: {{enabled: true, cert_file: \"{}\", key_file: \"{}\"}}}}\n\
         auth: {{jwt: {{enabled: true, token_jwt_secret: \"{secret}\"}}}}\n{extra}",
        dir.join("cert.pem").display(),
        dir.join("key.pem").display()
    );
    Config::from_yaml_str(&yaml, Vec::new()).unwrap().config
}

const COVERING: &[&str] = &["edge.example.com", "*.t.edge.example.com"];

#[test]
fn a_proper_deployment_passes_production() {
    let dir = tempfile::tempdir().unwrap();
    write_pair(dir.path(), Pair { names: COVERING, expired: false, self_signed: false });
    let report = check(
        &config(
            dir.path(),
            GOOD_SECRET,
            "metrics: {prometheus: {enabled: true, listen_addr: \":9090\", bearer_token: tok}}\n",
        ),
        &[],
        true,
    );
    assert_eq!(report.errors(), 0, "{report}");
}

#[test]
fn production_refuses_development_defaults() {
    let dir = tempfile::tempdir().unwrap();
    write_pair(dir.path(), Pair { names: &["localhost"], expired: true, self_signed: true });
    let cfg = config(dir.path(), "short", "metrics: {prometheus: {enabled: true, listen_addr: \"127.0.0.1:9090\"}}\n");
    let report = check(&cfg, &[], true);
    let text = report.to_string();
    assert!(report.names("auth.jwt.token_jwt_secret", Severity::Error), "{text}");
    assert!(report.names("metrics.prometheus.bearer_token", Severity::Error), "{text}");
    for needle in ["expired", "self-signed", "does not cover edge.example.com", "does not cover *.t.edge.example.com"] {
        assert!(text.contains(needle), "{needle} missing from\n{text}");
    }
    assert!(!text.contains("short\n") && !text.contains(": short"), "the secret never prints: {text}");

    // The same findings are warnings without --production.
    let relaxed = check(&cfg, &[], false);
    assert_eq!(relaxed.errors(), 0, "{relaxed}");
    assert!(relaxed.warnings() >= 5, "{relaxed}");
}

#[test]
fn a_certificate_covering_only_the_host_misses_the_tunnels() {
    let dir = tempfile::tempdir().unwrap();
    write_pair(
        dir.path(),
        Pair { names: &["edge.example.com", "*.edge.example.com"], expired: false, self_signed: false },
    );
    let report = check(&config(dir.path(), GOOD_SECRET, ""), &[], true);
    assert_eq!(report.errors(), 1, "{report}");
    assert!(report.to_string().contains("does not cover *.t.edge.example.com"), "{report}");
}

#[test]
fn a_missing_or_mismatched_pair_is_an_error_in_any_mode() {
    let dir = tempfile::tempdir().unwrap();
    let report = check(&config(dir.path(), GOOD_SECRET, ""), &[], false);
    assert!(report.names("certs.static", Severity::Error), "{report}");
    write_pair(dir.path(), Pair { names: COVERING, expired: false, self_signed: false });
    std::fs::write(dir.path().join("key.pem"), KeyPair::generate().unwrap().serialize_pem()).unwrap();
    let report = check(&config(dir.path(), GOOD_SECRET, ""), &[], false);
    assert!(report.to_string().contains("do not form a usable pair"), "{report}");
}

//! `strait-engine check-config`: everything start-up would check, and what
//! an operator should know before going live, without binding a port.
//!
//! Without `--production`, development defaults (a short secret, a
//! self-signed or development certificate, open metrics) are warnings; with
//! it they are errors, so a deployment pipeline can refuse them.

use std::fmt;
use std::path::Path;
use std::time::{Duration, SystemTime};

use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;

use crate::certs::CertStore;
use crate::config::{Config, LogLevel};

/// A JWT secret shorter than this is guessable offline from any token: 32
/// bytes is the HS256 key size.
pub const MIN_SECRET_BYTES: usize = 32;

/// A certificate closer than this to its end gets a warning.
const EXPIRY_WARNING: Duration = Duration::from_secs(14 * 24 * 3600);

/// Secrets copied from documentation and samples.
const SAMPLE_SECRETS: &[&str] =
    &["<secret>", "secret", "changeme", "change-me", "change_me", "replace-me", "your-secret", "password", "test"];

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    Ok,
    Warning,
    Error,
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Severity::Ok => "ok",
            Severity::Warning => "warning",
            Severity::Error => "error",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub severity: Severity,
    /// The configuration key concerned.
    pub field: &'static str,
    pub message: String,
}

#[derive(Debug, Default)]
pub struct Report {
    pub findings: Vec<Finding>,
}

impl Report {
    fn push(&mut self, severity: Severity, field: &'static str, message: impl Into<String>) {
        self.findings.push(Finding { severity, field, message: message.into() });
    }

    pub fn errors(&self) -> usize {
        self.findings.iter().filter(|f| f.severity == Severity::Error).count()
    }

    pub fn warnings(&self) -> usize {
        self.findings.iter().filter(|f| f.severity == Severity::Warning).count()
    }

    /// Whether a finding of at least `severity` names `field`.
    pub fn names(&self, field: &str, severity: Severity) -> bool {
        self.findings.iter().any(|f| f.field == field && f.severity >= severity)
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for finding in &self.findings {
            writeln!(f, "{}: {}: {}", finding.severity, finding.field, finding.message)?;
        }
        match self.errors() {
            0 => write!(f, "configuration OK ({} warning(s))", self.warnings()),
            n => write!(f, "configuration refused: {n} error(s), {} warning(s)", self.warnings()),
        }
    }
}

/// Checks a loaded configuration; `warnings` are the loader's (unknown keys).
pub fn check(config: &Config, warnings: &[String], production: bool) -> Report {
    let mut report = Report::default();
    // What production refuses and development tolerates.
    let dev_default = if production { Severity::Error } else { Severity::Warning };
    for warning in warnings {
        report.push(Severity::Warning, "(file)", warning.clone());
    }

    let secret = config.auth.jwt.token_jwt_secret.expose();
    if SAMPLE_SECRETS.iter().any(|s| s.eq_ignore_ascii_case(secret.trim())) {
        report.push(dev_default, "auth.jwt.token_jwt_secret", "is a sample value; generate one (openssl rand -hex 32)");
    } else if secret.len() < MIN_SECRET_BYTES {
        report.push(
            dev_default,
            "auth.jwt.token_jwt_secret",
            format!("is {} bytes, shorter than {MIN_SECRET_BYTES}; generate one (openssl rand -hex 32)", secret.len()),
        );
    } else {
        report.push(Severity::Ok, "auth.jwt.token_jwt_secret", format!("{} bytes", secret.len()));
    }

    check_certificate(config, dev_default, &mut report);

    let prometheus = &config.metrics.prometheus;
    match (prometheus.enabled, prometheus.listen_addr) {
        (true, Some(addr)) if prometheus.bearer_token.is_none() => report.push(
            dev_default,
            "metrics.prometheus.bearer_token",
            format!("metrics on {addr} are open to anyone who reaches the port; set a bearer token"),
        ),
        (true, Some(addr)) => report.push(Severity::Ok, "metrics.prometheus", format!("{addr}, bearer token set")),
        (true, None) => report.push(
            Severity::Warning,
            "metrics.prometheus.listen_addr",
            "metrics are enabled but have no listen address, so no metrics server runs",
        ),
        (false, _) => {}
    }

    if production && config.engine.log_level == LogLevel::Debug {
        report.push(Severity::Warning, "engine.log_level", "debug logs every connection; info is the usual level");
    }
    report
}

fn check_certificate(config: &Config, dev_default: Severity, report: &mut Report) {
    let files = &config.certs.r#static;
    let store = match CertStore::load(&files.cert_file, &files.key_file, crate::crypto_provider()) {
        Ok(store) => store,
        Err(error) => {
            report.push(Severity::Error, "certs.static", error.to_string());
            return;
        }
    };
    check_key_permissions(&files.key_file, report);
    let der = store.end_entity_der();
    let cert = match x509_parser::parse_x509_certificate(&der) {
        Ok((_, cert)) => cert,
        Err(error) => {
            report.push(Severity::Error, "certs.static.cert_file", format!("certificate does not parse: {error}"));
            return;
        }
    };
    let field = "certs.static.cert_file";
    let now = SystemTime::now();
    let not_after = SystemTime::UNIX_EPOCH + Duration::from_secs(cert.validity().not_after.timestamp().max(0) as u64);
    let not_before = SystemTime::UNIX_EPOCH + Duration::from_secs(cert.validity().not_before.timestamp().max(0) as u64);
    if not_after < now {
        report.push(dev_default, field, format!("certificate expired on {}", cert.validity().not_after));
    } else if not_before > now {
        report.push(dev_default, field, format!("certificate is not valid before {}", cert.validity().not_before));
    } else if not_after.duration_since(now).unwrap_or_default() < EXPIRY_WARNING {
        report.push(Severity::Warning, field, format!("certificate expires soon, on {}", cert.validity().not_after));
    }
    if cert.subject() == cert.issuer() {
        report.push(dev_default, field, "certificate is self-signed; clients will not trust it without pinning");
    } else if cert.issuer().to_string().contains("strait development CA") {
        report.push(dev_default, field, "certificate comes from the strait development CA (strait-engine dev)");
    }
    let host = &config.engine.host;
    let wildcard = format!("*.t.{host}");
    let names = dns_names(&cert);
    for wanted in [host.as_str(), wildcard.as_str()] {
        if !covers(&names, wanted) {
            report.push(
                dev_default,
                field,
                format!("certificate does not cover {wanted} (it names: {})", names.join(", ")),
            );
        }
    }
    if report.findings.iter().all(|f| f.field != field || f.severity == Severity::Ok) {
        report.push(
            Severity::Ok,
            field,
            format!("covers {host} and {wildcard}, valid until {}", cert.validity().not_after),
        );
    }
}

#[cfg(unix)]
fn check_key_permissions(key: &Path, report: &mut Report) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(key)
        && meta.permissions().mode() & 0o004 != 0
    {
        report.push(
            Severity::Warning,
            "certs.static.key_file",
            "the private key is readable by every user (chmod 600)",
        );
    }
}

#[cfg(not(unix))]
fn check_key_permissions(_key: &Path, _report: &mut Report) {}

/// The DNS names a certificate holds (subjectAltName, else the CN).
fn dns_names(cert: &X509Certificate<'_>) -> Vec<String> {
    let mut names: Vec<String> = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::DNSName(d) => Some(d.to_ascii_lowercase()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    if names.is_empty() {
        names.extend(cert.subject().iter_common_name().filter_map(|cn| cn.as_str().ok()).map(str::to_ascii_lowercase));
    }
    names
}

/// Whether a certificate with `names` is valid for `wanted`, which may be
/// itself a wildcard (then only the same wildcard covers it).
pub fn covers(names: &[String], wanted: &str) -> bool {
    let wanted = wanted.to_ascii_lowercase();
    names.iter().any(|name| {
        if *name == wanted {
            return true;
        }
        if wanted.starts_with("*.") {
            return false;
        }
        match (name.strip_prefix("*."), wanted.split_once('.')) {
            (Some(suffix), Some((label, rest))) => !label.is_empty() && rest == suffix,
            _ => false,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coverage() {
        let names = vec!["edge.example.com".to_string(), "*.t.edge.example.com".to_string()];
        assert!(covers(&names, "edge.example.com"));
        assert!(covers(&names, "*.t.edge.example.com"));
        assert!(covers(&names, "app.t.edge.example.com"));
        assert!(!covers(&names, "a.b.t.edge.example.com"));
        let apex_wildcard = vec!["*.example.com".to_string()];
        assert!(covers(&apex_wildcard, "edge.example.com"));
        assert!(!covers(&apex_wildcard, "*.t.edge.example.com"));
    }
}

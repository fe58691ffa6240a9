//! What an `OpenTunnelReq` may ask for, and the complete properties the
//! engine answers with.
//!
//! Validation refuses what CE refuses (with the same error codes) and fills
//! in every default, so the reply tells the agent exactly what is served.

use std::net::IpAddr;

use ipnet::IpNet;
use rand::RngExt;
use strait_proto::{Error, ErrorCode, TunnelProperties};

/// Where published hostnames live: `<label>.t.<engine.host>`.
pub struct Namespace<'a> {
    pub engine_host: &'a str,
    /// The TLS port published addresses report.
    pub public_port: u16,
}

impl Namespace<'_> {
    pub fn suffix(&self) -> String {
        format!(".t.{}", self.engine_host)
    }

    /// The label of `host` if it is a published name of this engine.
    pub fn label_of<'h>(&self, host: &'h str) -> Option<&'h str> {
        let rest = host.strip_suffix(self.engine_host)?.strip_suffix(".t.")?;
        (!rest.is_empty()).then_some(rest)
    }
}

fn invalid(message: impl Into<String>) -> Error {
    Error::new(ErrorCode::InvalidRequest, message)
}

fn unavailable(message: impl Into<String>) -> Error {
    Error::new(ErrorCode::FeatureNotAvailable, message)
}

/// Validates and completes the requested properties. `id` and the creation
/// date are the caller's to set.
pub fn normalize(mut p: TunnelProperties, ns: &Namespace<'_>) -> Result<TunnelProperties, Error> {
    let kind = p.r#type.get_or_insert_with(|| "bytestream".into()).to_ascii_lowercase();
    if kind != "bytestream" && kind != "datagram" {
        return Err(invalid(format!("type {kind:?} is not bytestream or datagram")));
    }
    p.r#type = Some(kind.clone());
    let publish = *p.publish.get_or_insert(false);

    if p.mtls_auth == Some(true) || p.mtls_cacert_pem.is_some() {
        return Err(unavailable("mtls_auth is not available on this engine"));
    }
    if p.rstream_auth == Some(true) {
        return Err(unavailable("rstream_auth is not available on this engine"));
    }
    if p.challenge_mode == Some(true) {
        return Err(unavailable("challenge_mode is not available on this engine"));
    }
    if !p.geoip.is_empty() {
        return Err(unavailable("geoip rules are not available on this engine"));
    }
    for entry in &p.trusted_ips {
        if entry.parse::<IpAddr>().is_err() && entry.parse::<IpNet>().is_err() {
            return Err(invalid(format!("trusted_ips entry {entry:?} is not an IP address or CIDR")));
        }
    }
    if let Some(name) = &p.name
        && (name.trim().is_empty() || name.len() > 253)
    {
        return Err(invalid("name must be 1 to 253 characters"));
    }
    if let Some(alias) = p.http_use_tls.take() {
        p.upstream_tls.get_or_insert(alias);
    }

    let protocol = p.protocol.as_deref().map(str::to_ascii_lowercase);
    let protocol = match (publish, protocol.as_deref()) {
        (true, None) => "http".to_string(),
        (false, None) => "tcp".to_string(),
        (_, Some(known @ ("http" | "tls" | "tcp" | "dtls" | "quic" | "webtty"))) => known.to_string(),
        (_, Some(other)) => {
            return Err(invalid(format!("protocol {other:?} is not one of http, tls, tcp, dtls, quic")));
        }
    };
    if publish {
        match protocol.as_str() {
            "http" | "tls" => {}
            "tcp" => return Err(unavailable("published tcp tunnels are not available on this engine")),
            other => return Err(unavailable(format!("published {other} tunnels are not available on this engine"))),
        }
        if kind == "datagram" {
            return Err(unavailable("published datagram tunnels need a QUIC listener, not available on this engine"));
        }
    }
    p.protocol = Some(protocol.clone());

    if p.port.is_some() {
        return Err(invalid("port applies to published tcp tunnels only"));
    }

    // HTTP options.
    if protocol == "http" {
        let version = p.http_version.as_deref().map(str::to_ascii_lowercase).unwrap_or_else(|| "http/1.1".into());
        match version.as_str() {
            "http/1.1" | "h2c" | "h2" => {}
            "h3" => return Err(unavailable("http_version h3 needs an HTTP/3 listener, not available on this engine")),
            other => return Err(invalid(format!("http_version {other:?} is not http/1.1 or h2c"))),
        }
        p.http_version = Some(version);
        p.token_auth.get_or_insert(false);
    } else {
        if p.http_version.is_some() {
            return Err(invalid("http_version applies to http tunnels only"));
        }
        if p.token_auth == Some(true) {
            return Err(invalid("token_auth applies to http tunnels only"));
        }
    }

    // TLS options.
    if protocol == "tls" {
        let mode = p.tls_mode.as_deref().map(str::to_ascii_lowercase).unwrap_or_else(|| "terminated".into());
        match mode.as_str() {
            "terminated" => {}
            "passthrough" => {
                if !p.tls_alpns.is_empty() || p.tls_min_version.is_some() || !p.tls_ciphers.is_empty() {
                    return Err(invalid("a passthrough tunnel takes no tls_alpns, tls_min_version or tls_ciphers"));
                }
                if p.upstream_tls.is_some() {
                    return Err(invalid("a passthrough tunnel takes no upstream_tls"));
                }
            }
            other => return Err(invalid(format!("tls_mode {other:?} is not terminated or passthrough"))),
        }
        p.tls_mode = Some(mode);
    } else if p.tls_mode.is_some() {
        return Err(invalid("tls_mode applies to tls tunnels only"));
    }
    if let Some(v) = &p.tls_min_version {
        p.tls_min_version = Some(normalize_tls_version(v)?.to_string());
    }
    for suite in &p.tls_ciphers {
        if !known_cipher(suite) {
            return Err(invalid(format!("tls_ciphers entry {suite:?} is not a cipher suite this engine offers")));
        }
    }
    if !p.tls_ciphers.is_empty() && !ciphers_usable(&p.tls_ciphers, p.tls_min_version.as_deref()) {
        return Err(invalid("tls_ciphers holds no cipher suite for the TLS versions tls_min_version allows"));
    }
    if p.tls_alpns.iter().any(|a| a.is_empty() || a.len() > 255) {
        return Err(invalid("tls_alpns entries must be 1 to 255 bytes"));
    }

    // Hostname.
    let requested = p.hostname.take().or_else(|| p.host.take()).map(|h| h.trim().to_ascii_lowercase());
    if publish {
        let hostname = match requested {
            None => format!("{}{}", random_label(), ns.suffix()),
            Some(h) => served_hostname(&h, ns)?,
        };
        p.hostname = Some(hostname.clone());
        p.host = Some(hostname);
        p.port = Some(ns.public_port as u32);
    } else if requested.is_some() {
        return Err(invalid("hostname applies to published tunnels only"));
    }
    Ok(p)
}

/// Maps a requested hostname to the one served. Names under the namespace
/// are taken as they are; names outside it (the Go CLI derives
/// `r<hex>-<label>.t.<rest>` from the engine host) map to their first label
/// under the namespace, so the same request always lands on the same name.
fn served_hostname(requested: &str, ns: &Namespace<'_>) -> Result<String, Error> {
    let requested = requested.trim_end_matches('.');
    if let Some(label) = ns.label_of(requested) {
        if !valid_label(label) {
            return Err(invalid(format!(
                "hostname {requested:?} must be one DNS label (letters, digits, hyphens) under {}",
                ns.suffix()
            )));
        }
        return Ok(requested.to_string());
    }
    let first = requested.split('.').next().unwrap_or_default();
    if !requested.split('.').all(valid_label) {
        return Err(invalid(format!("hostname {requested:?} is not a valid DNS name")));
    }
    Ok(format!("{first}{}", ns.suffix()))
}

fn valid_label(label: &str) -> bool {
    !label.is_empty()
        && label.len() <= 63
        && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !label.starts_with('-')
        && !label.ends_with('-')
}

/// A fresh label: a letter then nine letters or digits (about 2^46 names).
pub fn random_label() -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    let mut label = String::with_capacity(10);
    label.push(ALPHABET[rng.random_range(0..26)] as char);
    for _ in 0..9 {
        label.push(ALPHABET[rng.random_range(0..ALPHABET.len())] as char);
    }
    label
}

pub fn normalize_tls_version(v: &str) -> Result<&'static str, Error> {
    match v.trim().to_ascii_lowercase().replace(['v', '_', ' '], "").as_str() {
        "1.2" | "tls1.2" | "tls12" => Ok("1.2"),
        "1.3" | "tls1.3" | "tls13" => Ok("1.3"),
        _ => Err(invalid(format!("tls_min_version {v:?} is not 1.2 or 1.3"))),
    }
}

/// Whether at least one named suite works with the allowed versions, so a
/// tunnel never goes live with a TLS configuration that cannot handshake.
fn ciphers_usable(names: &[String], min_version: Option<&str>) -> bool {
    rustls::crypto::ring::ALL_CIPHER_SUITES.iter().any(|suite| {
        let named = suite.suite().as_str().is_some_and(|n| names.iter().any(|w| w.eq_ignore_ascii_case(n)));
        named && (min_version != Some("1.3") || matches!(suite, rustls::SupportedCipherSuite::Tls13(_)))
    })
}

/// Cipher suite names as IANA and rustls spell them.
pub fn known_cipher(name: &str) -> bool {
    rustls::crypto::ring::ALL_CIPHER_SUITES
        .iter()
        .any(|s| s.suite().as_str().is_some_and(|n| n.eq_ignore_ascii_case(name)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NS: Namespace<'static> = Namespace { engine_host: "edge.example.com", public_port: 443 };

    fn props() -> TunnelProperties {
        TunnelProperties::default()
    }

    #[test]
    fn private_defaults() {
        let p = normalize(props(), &NS).unwrap();
        assert_eq!(p.r#type.as_deref(), Some("bytestream"));
        assert_eq!(p.publish, Some(false));
        assert_eq!(p.protocol.as_deref(), Some("tcp"));
        assert_eq!(p.hostname, None);
    }

    #[test]
    fn published_http_gets_a_random_hostname_and_port() {
        let p = normalize(TunnelProperties { publish: Some(true), ..props() }, &NS).unwrap();
        assert_eq!(p.protocol.as_deref(), Some("http"));
        assert_eq!(p.http_version.as_deref(), Some("http/1.1"));
        let host = p.hostname.unwrap();
        assert!(host.ends_with(".t.edge.example.com"), "{host}");
        assert_eq!(p.port, Some(443));
    }

    #[test]
    fn requested_hostnames() {
        let req = |h: &str| TunnelProperties { publish: Some(true), hostname: Some(h.into()), ..props() };
        assert_eq!(normalize(req("App.t.edge.example.com"), &NS).unwrap().hostname.unwrap(), "app.t.edge.example.com");
        // The Go CLI's derived names map into the namespace, the same way every time.
        let mapped = normalize(req("r0a1b2c3d-edge.t.example.com"), &NS).unwrap().hostname.unwrap();
        assert_eq!(mapped, "r0a1b2c3d-edge.t.edge.example.com");
        assert_eq!(normalize(req("r0a1b2c3d-edge.t.example.com"), &NS).unwrap().hostname.unwrap(), mapped);
        assert!(normalize(req("a.b.t.edge.example.com"), &NS).is_err());
        assert!(normalize(req("bad_label.t.edge.example.com"), &NS).is_err());
    }

    #[test]
    fn refusals_carry_ce_codes() {
        let code = |p: TunnelProperties| normalize(p, &NS).unwrap_err().code();
        assert_eq!(code(TunnelProperties { rstream_auth: Some(true), ..props() }), ErrorCode::FeatureNotAvailable);
        assert_eq!(code(TunnelProperties { challenge_mode: Some(true), ..props() }), ErrorCode::FeatureNotAvailable);
        assert_eq!(code(TunnelProperties { mtls_auth: Some(true), ..props() }), ErrorCode::FeatureNotAvailable);
        assert_eq!(
            code(TunnelProperties { publish: Some(true), protocol: Some("tcp".into()), ..props() }),
            ErrorCode::FeatureNotAvailable
        );
        assert_eq!(
            code(TunnelProperties { trusted_ips: vec!["10.0.0.0/33".into()], ..props() }),
            ErrorCode::InvalidRequest
        );
        assert_eq!(
            code(TunnelProperties {
                publish: Some(true),
                protocol: Some("tls".into()),
                tls_mode: Some("passthrough".into()),
                tls_alpns: vec!["h2".into()],
                ..props()
            }),
            ErrorCode::InvalidRequest
        );
        assert_eq!(code(TunnelProperties { r#type: Some("weird".into()), ..props() }), ErrorCode::InvalidRequest);
    }

    #[test]
    fn tls_options_are_normalised() {
        let p = normalize(
            TunnelProperties {
                publish: Some(true),
                protocol: Some("tls".into()),
                tls_min_version: Some("TLS1.3".into()),
                tls_ciphers: vec!["TLS13_AES_128_GCM_SHA256".into()],
                ..props()
            },
            &NS,
        )
        .unwrap();
        assert_eq!(p.tls_mode.as_deref(), Some("terminated"));
        assert_eq!(p.tls_min_version.as_deref(), Some("1.3"));
    }
}

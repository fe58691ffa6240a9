//! What an `OpenTunnelReq` may ask for, and the complete properties the
//! engine answers with.
//!
//! Validation refuses what CE refuses (with the same error codes) and fills
//! in every default, so the reply tells the agent exactly what is served.
//! [`TunnelSpec`] is the typed reading of the served properties that the
//! rest of the engine works from.

use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use rand::RngExt;
use strait_proto::{Error, ErrorCode, TunnelProperties};

use crate::config::PortsConfig;
use crate::policy::{PATH_LABEL, POLICY_LABEL, PathRoute, Policy, STRIP_LABEL};

/// Where published tunnels live: hostnames `<label>.t.<engine.host>`, and
/// the public ports of TCP and UDP tunnels.
pub struct Namespace<'a> {
    pub engine_host: &'a str,
    /// The TLS port published addresses report.
    pub public_port: u16,
    /// Published TCP ports, when `tcp.enabled`.
    pub tcp: Option<&'a PortsConfig>,
    /// Published UDP ports, when `udp.enabled`.
    pub udp: Option<&'a PortsConfig>,
}

impl<'a> Namespace<'a> {
    /// The namespace of an engine with this configuration.
    pub fn of(config: &'a crate::config::Config, public_port: u16) -> Self {
        Self {
            engine_host: &config.engine.host,
            public_port,
            tcp: config.tcp.enabled.then_some(&config.tcp),
            udp: config.udp.enabled.then_some(&config.udp),
        }
    }

    /// A namespace of hostnames only (no published ports).
    pub const fn hostnames(engine_host: &'a str, public_port: u16) -> Self {
        Self { engine_host, public_port, tcp: None, udp: None }
    }

    /// The hostname agents are given for a published port of `ports`.
    fn port_host(&self, ports: &'a PortsConfig) -> &'a str {
        ports.public_host.as_deref().unwrap_or(self.engine_host)
    }
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
    let datagram = kind == "datagram";
    let protocol = match (publish, datagram, protocol.as_deref()) {
        (true, false, None) => "http".to_string(),
        (true, true, None) => "udp".to_string(),
        (false, _, None) => "tcp".to_string(),
        (_, _, Some(known @ ("http" | "tls" | "tcp" | "udp" | "dtls" | "quic" | "webtty"))) => known.to_string(),
        (_, _, Some(other)) => {
            return Err(invalid(format!("protocol {other:?} is not one of http, tls, tcp, udp, dtls, quic")));
        }
    };
    // The public port a published tcp or udp tunnel gets, from which range.
    let mut ports = None;
    if publish {
        match (datagram, protocol.as_str()) {
            (false, "http" | "tls") => {}
            (false, "tcp") => {
                ports = Some((
                    "tcp",
                    ns.tcp.ok_or_else(|| unavailable("published tcp tunnels are off on this engine (tcp.enabled)"))?,
                ));
            }
            (true, "udp") => {
                ports = Some((
                    "udp",
                    ns.udp.ok_or_else(|| unavailable("published udp tunnels are off on this engine (udp.enabled)"))?,
                ));
            }
            (false, "udp") => return Err(invalid("a udp tunnel carries datagrams: set type to datagram")),
            (true, other) => {
                return Err(unavailable(format!(
                    "published datagram tunnels are udp; {other} is not available on this engine"
                )));
            }
            (false, other) => {
                return Err(unavailable(format!("published {other} tunnels are not available on this engine")));
            }
        }
    } else if protocol == "udp" && !datagram {
        return Err(invalid("a udp tunnel carries datagrams: set type to datagram"));
    }
    p.protocol = Some(protocol.clone());

    match (&ports, p.port) {
        (None, Some(_)) => return Err(invalid("port applies to published tcp and udp tunnels only")),
        (Some((name, range)), Some(port)) if !u16::try_from(port).is_ok_and(|port| range.contains(port)) => {
            return Err(invalid(format!("port {port} is outside this engine's {name}.port_range {}", range.range())));
        }
        _ => {}
    }
    if ports.is_some() {
        if p.upstream_tls.is_some() {
            return Err(invalid(format!("upstream_tls applies to http and tls tunnels, not {protocol}")));
        }
        if !p.tls_alpns.is_empty() || p.tls_min_version.is_some() || !p.tls_ciphers.is_empty() {
            return Err(invalid(format!(
                "tls_alpns, tls_min_version and tls_ciphers apply to tls tunnels, not {protocol}"
            )));
        }
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

    // Path routing and policy (labels any rstream client can set).
    let routing = [PATH_LABEL, STRIP_LABEL, POLICY_LABEL].iter().any(|l| p.labels.contains_key(*l));
    if publish && protocol == "http" {
        PathRoute::of_labels(&p.labels).map_err(invalid)?;
        if let Some(json) = p.labels.get(POLICY_LABEL) {
            let policy = Policy::parse(json).map_err(|e| invalid(format!("{POLICY_LABEL}: {e}")))?;
            if p.token_auth == Some(true) && !policy.basic_auth.is_empty() {
                return Err(invalid(format!(
                    "{POLICY_LABEL}: basic_auth and token_auth both use Authorization; choose one"
                )));
            }
        }
    } else if routing {
        return Err(invalid(format!(
            "{PATH_LABEL}, {STRIP_LABEL} and {POLICY_LABEL} apply to published http tunnels only"
        )));
    }

    // Hostname.
    let requested = p.hostname.take().or_else(|| p.host.take()).map(|h| h.trim().to_ascii_lowercase());
    if let Some((name, range)) = ports {
        // Reached at the engine's public host and the tunnel's port; the
        // served name may come back in a repeated request.
        let host = ns.port_host(range);
        if let Some(asked) = requested.filter(|h| h.trim_end_matches('.') != host) {
            return Err(invalid(format!(
                "hostname {asked:?} applies to http and tls tunnels; a {name} tunnel is reached at {host}:<port>"
            )));
        }
        p.hostname = Some(host.to_string());
        p.host = Some(host.to_string());
    } else if publish {
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

/// What a tunnel is, read once from its served properties.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Http,
    Tls,
    /// A byte stream: published on a TCP port, or private.
    Tcp,
    /// Datagrams: published on a UDP port, or private.
    Udp,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Http => "http",
            Kind::Tls => "tls",
            Kind::Tcp => "tcp",
            Kind::Udp => "udp",
        }
    }
}

/// Where the public reaches a published tunnel.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Address {
    /// An HTTPS or TLS hostname on the engine's TLS port.
    Hostname(String),
    /// A public port of its own (`Kind::Tcp` or `Kind::Udp`).
    Port(Kind, u16),
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Address::Hostname(host) => write!(f, "hostname {host}"),
            Address::Port(kind, port) => write!(f, "{} port {port}", kind.name()),
        }
    }
}

/// The typed tunnel: what every part of the engine after creation reads,
/// instead of re-testing the wire options.
#[derive(Debug, Clone)]
pub struct TunnelSpec {
    pub kind: Kind,
    pub publish: bool,
    /// Published tunnels only.
    pub address: Option<Address>,
    /// `trusted_ips`, parsed; empty lets anyone in.
    pub trusted: Vec<IpNet>,
    /// Datagrams that may ride QUIC DATAGRAM frames (no guaranteed delivery).
    pub datagram_channels: bool,
    /// Where an http tunnel sits on its hostname.
    pub route: PathRoute,
    /// An http tunnel's traffic policy, the operator's default merged in
    /// ([`TunnelSpec::under_policy`]); empty for every other kind.
    pub policy: Arc<Policy>,
    /// `token_auth`: requests carry an engine token.
    pub token_auth: bool,
}

impl TunnelSpec {
    /// Reads normalised properties (as [`normalize`] returns them).
    pub fn of(p: &TunnelProperties) -> Self {
        let publish = p.publish == Some(true);
        let datagram = p.r#type.as_deref() == Some("datagram");
        let kind = match (datagram, p.protocol.as_deref()) {
            (true, _) => Kind::Udp,
            (false, Some("http")) if publish => Kind::Http,
            (false, Some("tls")) if publish => Kind::Tls,
            _ => Kind::Tcp,
        };
        let address = match (publish, kind) {
            (false, _) => None,
            (true, Kind::Tcp | Kind::Udp) => {
                p.port.and_then(|port| u16::try_from(port).ok()).map(|p| Address::Port(kind, p))
            }
            (true, _) => p.hostname.clone().map(Address::Hostname),
        };
        let trusted = p
            .trusted_ips
            .iter()
            .filter_map(|entry| entry.parse::<IpNet>().ok().or_else(|| entry.parse::<IpAddr>().ok().map(IpNet::from)))
            .collect();
        // Validated by `normalize`: a label that fails here was never
        // admitted, so the defaults are only for hand-made properties.
        let http = publish && kind == Kind::Http;
        let route = if http { PathRoute::of_labels(&p.labels).unwrap_or_default() } else { PathRoute::default() };
        let policy = match p.labels.get(POLICY_LABEL) {
            Some(json) if http => Policy::parse(json).unwrap_or_default(),
            _ => Policy::default(),
        };
        Self {
            kind,
            publish,
            address,
            trusted,
            datagram_channels: datagram && p.datagram_guaranteed_delivery != Some(true),
            route,
            policy: Arc::new(policy),
            token_auth: p.token_auth == Some(true),
        }
    }

    /// The spec with the operator's default policy under its own (for
    /// published http tunnels).
    pub fn under_policy(mut self, default: &Policy) -> Self {
        if self.publish && self.kind == Kind::Http && !default.is_empty() {
            let mut merged = (*self.policy).clone().under(default);
            if self.token_auth {
                // Its requests carry a token in Authorization: the
                // operator's basic auth cannot apply to them.
                merged.basic_auth.clear();
            }
            self.policy = Arc::new(merged);
        }
        self
    }

    /// Whether `ip` may reach the tunnel. An IPv4 peer seen through an
    /// IPv6 socket (`::ffff:a.b.c.d`) is its IPv4 address.
    pub fn allows(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.trusted.is_empty() || self.trusted.iter().any(|net| net.contains(&ip))
    }

    /// A published tunnel on a port of its own: the port, to allocate.
    pub fn public_port(&self) -> Option<(Kind, Option<u16>)> {
        match (self.publish, self.kind) {
            (true, kind @ (Kind::Tcp | Kind::Udp)) => Some((
                kind,
                match &self.address {
                    Some(Address::Port(_, port)) => Some(*port),
                    _ => None,
                },
            )),
            _ => None,
        }
    }
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

    const NS: Namespace<'static> = Namespace::hostnames("edge.example.com", 443);

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

    fn ports(first: u16, last: u16) -> PortsConfig {
        PortsConfig {
            enabled: true,
            first_port: first,
            last_port: last,
            listen_ip: None,
            public_host: None,
            session_idle_seconds: 60,
            max_sessions_per_tunnel: 1024,
            max_packet_bytes: 65_507,
        }
    }

    #[test]
    fn tcp_and_udp_tunnels_take_ports_of_the_range_and_no_hostname_options() {
        let (tcp, udp) = (ports(20000, 20999), ports(21000, 21999));
        let ns = Namespace { tcp: Some(&tcp), udp: Some(&udp), ..NS };
        let tcp_req =
            |port: Option<u32>| TunnelProperties { publish: Some(true), protocol: Some("tcp".into()), port, ..props() };
        let served = normalize(tcp_req(Some(20001)), &ns).unwrap();
        assert_eq!((served.hostname.as_deref(), served.port), (Some("edge.example.com"), Some(20001)));
        let spec = TunnelSpec::of(&served);
        assert_eq!((spec.kind, spec.address), (Kind::Tcp, Some(Address::Port(Kind::Tcp, 20001))));
        let code = |p: TunnelProperties| normalize(p, &ns).unwrap_err();
        assert!(code(tcp_req(Some(19999))).to_string().contains("tcp.port_range 20000-20999"));
        assert!(code(tcp_req(Some(70000))).to_string().contains("outside"));
        let named = TunnelProperties { hostname: Some("web".into()), ..tcp_req(None) };
        assert_eq!(code(named).code(), ErrorCode::InvalidRequest);
        // The served host may come back in a repeated request.
        let again = TunnelProperties { hostname: Some("edge.example.com".into()), ..tcp_req(None) };
        assert!(normalize(again, &ns).is_ok());

        let udp_req = TunnelProperties { publish: Some(true), r#type: Some("datagram".into()), ..props() };
        let served = normalize(udp_req.clone(), &ns).unwrap();
        assert_eq!(served.protocol.as_deref(), Some("udp"));
        let spec = TunnelSpec::of(&served);
        assert_eq!((spec.kind, spec.datagram_channels), (Kind::Udp, true));
        assert_eq!(spec.public_port(), Some((Kind::Udp, None)));
        let stream_udp = TunnelProperties { protocol: Some("udp".into()), ..tcp_req(None) };
        assert_eq!(code(stream_udp).code(), ErrorCode::InvalidRequest);
        // Off unless enabled.
        assert_eq!(normalize(udp_req, &NS).unwrap_err().code(), ErrorCode::FeatureNotAvailable);
    }

    #[test]
    fn trusted_ips_are_parsed_once_and_mapped_addresses_are_their_ipv4() {
        let p = TunnelProperties { trusted_ips: vec!["10.0.0.0/8".into(), "192.0.2.7".into()], ..props() };
        let spec = TunnelSpec::of(&normalize(p, &NS).unwrap());
        assert!(spec.allows("10.1.2.3".parse().unwrap()));
        assert!(spec.allows("::ffff:192.0.2.7".parse().unwrap()));
        assert!(!spec.allows("192.0.2.8".parse().unwrap()));
        assert!(TunnelSpec::of(&normalize(props(), &NS).unwrap()).allows("2001:db8::1".parse().unwrap()));
    }
}

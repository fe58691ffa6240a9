//! The engine configuration, read exactly as rstream engine CE reads it.
//!
//! YAML first, then `RSTREAM_ENGINE_` environment overrides (`__` between
//! levels). Both land in one JSON tree, which is then read field by field
//! rather than through a single `serde` derive: serde stops at the first bad
//! value, and operators want every bad field named in one message.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

/// The environment prefix CE uses.
pub const ENV_PREFIX: &str = "RSTREAM_ENGINE_";

/// A value that must never reach a log line or an error message.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(********)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("********")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    Debug,
    Info,
    Warn,
    Error,
}

impl LogLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Debug => "debug",
            LogLevel::Info => "info",
            LogLevel::Warn => "warn",
            LogLevel::Error => "error",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub engine: EngineConfig,
    pub http: HttpConfig,
    pub tls: TlsConfig,
    pub certs: CertsConfig,
    pub auth: AuthConfig,
    pub metrics: MetricsConfig,
    pub timeouts: TimeoutsConfig,
    pub limits: LimitsConfig,
    pub edge: EdgeConfig,
    pub quic: QuicConfig,
    pub tcp: PortsConfig,
    pub udp: PortsConfig,
}

/// Beyond CE: published TCP (`tcp.*`) or UDP (`udp.*`) tunnels, each on a
/// public port of its own.
#[derive(Debug, Clone)]
pub struct PortsConfig {
    pub enabled: bool,
    /// The ports tunnels are given, inclusive.
    pub first_port: u16,
    pub last_port: u16,
    /// The address the ports listen on; `None` is the IP of
    /// `tls.listen_addr`.
    pub listen_ip: Option<IpAddr>,
    /// The hostname agents are told to publish; `None` is `engine.host`.
    pub public_host: Option<String>,
    /// UDP: a session (one public source address) with no packet either
    /// way for this long ends.
    pub session_idle_seconds: u64,
    /// UDP: sessions one tunnel keeps at once; past it the longest idle
    /// one is evicted.
    pub max_sessions_per_tunnel: usize,
    /// UDP: the largest packet relayed; bigger ones are dropped and counted.
    pub max_packet_bytes: usize,
}

impl PortsConfig {
    pub fn contains(&self, port: u16) -> bool {
        (self.first_port..=self.last_port).contains(&port)
    }

    pub fn range(&self) -> String {
        format!("{}-{}", self.first_port, self.last_port)
    }
}

/// Beyond CE: the QUIC listener for agents (ALPN `rstrm/1`, the same
/// certificate as the TLS port).
#[derive(Debug, Clone)]
pub struct QuicConfig {
    pub enabled: bool,
    /// UDP address; `None` is the UDP side of `tls.listen_addr`'s bound
    /// address (the same port).
    pub listen_addr: Option<SocketAddr>,
    /// Bidirectional streams an agent may have open at once on one QUIC
    /// connection (its control channel, streams and dials).
    pub max_streams_per_connection: u64,
    /// A QUIC connection with no packet for this long is gone.
    pub idle_timeout_seconds: u64,
    /// The largest datagram payload (the 12-byte channel id included) the
    /// engine accepts or sends.
    pub max_datagram_bytes: usize,
}

/// Beyond CE: the published edge.
#[derive(Debug, Clone)]
pub struct EdgeConfig {
    /// How long a published hostname (and a private tunnel's name) stays
    /// reserved for its principal after its tunnel went offline; 0 turns
    /// holds off.
    pub hostname_hold_seconds: u64,
    /// `edge.default_policy`: merged under every published http tunnel's
    /// `strait.policy` (its denied paths always hold).
    pub default_policy: crate::policy::Policy,
    /// `edge.cache_dir`: where the edge cache keeps its objects (emptied
    /// at start); unset, they stay in memory.
    pub cache_dir: Option<PathBuf>,
    /// `edge.cache_max_bytes`: all edge-cache objects together, whatever
    /// the tunnels' policies ask.
    pub cache_max_bytes: u64,
}

#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Bare hostname, lower case.
    pub host: String,
    pub log_level: LogLevel,
    /// Beyond CE: `text` (default) or `json`.
    pub log_format: LogFormat,
}

#[derive(Debug, Clone)]
pub struct HttpConfig {
    pub enabled: bool,
    pub listen_addr: SocketAddr,
}

#[derive(Debug, Clone)]
pub struct TlsConfig {
    pub enabled: bool,
    pub listen_addr: SocketAddr,
    /// Beyond CE: the port published addresses report, for engines behind a
    /// port mapping. Defaults to the bound listen port.
    pub public_port: Option<u16>,
}

#[derive(Debug, Clone)]
pub struct CertsConfig {
    pub r#static: StaticCertsConfig,
}

#[derive(Debug, Clone)]
pub struct StaticCertsConfig {
    pub enabled: bool,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

#[derive(Debug, Clone)]
pub struct AuthConfig {
    pub jwt: JwtConfig,
}

#[derive(Debug, Clone)]
pub struct JwtConfig {
    pub enabled: bool,
    pub token_jwt_secret: Secret,
}

#[derive(Debug, Clone)]
pub struct MetricsConfig {
    pub prometheus: PrometheusConfig,
}

#[derive(Debug, Clone)]
pub struct PrometheusConfig {
    pub enabled: bool,
    /// No address means no metrics server.
    pub listen_addr: Option<SocketAddr>,
    /// Normalised: one leading slash, no trailing slash.
    pub path: String,
    pub bearer_token: Option<Secret>,
}

#[derive(Debug, Clone)]
pub struct TimeoutsConfig {
    pub stream_request_seconds: u64,
    pub http_idle_seconds: u64,
    /// Beyond CE: on SIGTERM, how long streams in flight may take to finish
    /// before they are cut.
    pub shutdown_drain_seconds: u64,
}

/// Beyond CE: the limits that keep one peer from exhausting the engine.
#[derive(Debug, Clone)]
pub struct LimitsConfig {
    pub max_frame_bytes: usize,
    pub first_frame_seconds: u64,
    pub handshake_seconds: u64,
    pub tunnels_per_client: usize,
    pub pending_streams_per_client: usize,
    pub control_idle_seconds: u64,
    pub max_connections: usize,
    /// Connections from one source (IPv4 /32, IPv6 /64) that may be in
    /// their handshake (ClientHello, TLS, an agent's first frame) at once.
    pub handshakes_per_source: usize,
    /// New connections per second one source may open, sustained...
    pub handshake_rate_per_source: u64,
    /// ...and in a burst.
    pub handshake_burst_per_source: u64,
    /// Refused tokens one source may present per minute before its new
    /// connections are refused.
    pub auth_failures_per_source: u64,
    pub control_channels_per_principal: usize,
    pub tunnels_per_principal: usize,
    /// Label keys and values, summed over a principal's live tunnels.
    pub label_bytes_per_principal: usize,
}

/// A configuration that passed validation, with what was tolerated.
#[derive(Debug)]
pub struct Loaded {
    pub config: Config,
    /// Unknown keys and similar: reported, not fatal.
    pub warnings: Vec<String>,
}

/// One bad field and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub field: String,
    pub message: String,
}

/// Every bad field at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub problems: Vec<Problem>,
}

impl ConfigError {
    fn one(field: &str, message: impl Into<String>) -> Self {
        Self { problems: vec![Problem { field: field.to_string(), message: message.into() }] }
    }

    /// Whether a field is among the problems (for tests and tooling).
    pub fn names(&self, field: &str) -> bool {
        self.problems.iter().any(|p| p.field == field)
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid configuration ({} problem{}):",
            self.problems.len(),
            if self.problems.len() == 1 { "" } else { "s" }
        )?;
        for p in &self.problems {
            write!(f, "\n  {}: {}", p.field, p.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Reads a YAML file, then applies the environment.
    pub fn load<I>(path: &Path, env: I) -> Result<Loaded, ConfigError>
    where
        I: IntoIterator<Item = (String, String)>,
    {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::one("--config", format!("cannot read {}: {e}", path.display())))?;
        Self::from_yaml_str(&text, env)
    }

    /// Configuration from the environment alone (no file given).
    pub fn from_env<I>(env: I) -> Result<Loaded, ConfigError>
    where
        I: IntoIterator<Item = (String, String)>,
    {
        Self::from_yaml_str("", env)
    }

    /// Parses YAML text, then applies the environment.
    pub fn from_yaml_str<I>(yaml: &str, env: I) -> Result<Loaded, ConfigError>
    where
        I: IntoIterator<Item = (String, String)>,
    {
        let mut tree = if yaml.trim().is_empty() {
            Value::Object(Map::new())
        } else {
            serde_saphyr::from_str::<Value>(yaml)
                .map_err(|e| ConfigError::one("(file)", format!("not valid YAML: {e}")))?
        };
        if tree.is_null() {
            tree = Value::Object(Map::new());
        }
        if !tree.is_object() {
            return Err(ConfigError::one("(file)", "the top level must be a mapping"));
        }
        apply_env(&mut tree, env);
        Self::from_tree(&tree)
    }

    fn from_tree(tree: &Value) -> Result<Loaded, ConfigError> {
        let mut r = Reader { tree, problems: Vec::new(), known: Vec::new() };

        let host = r.required_str("engine.host").and_then(|h| r.check("engine.host", validate_host(&h)));
        let log_level = r.required_str("engine.log_level").and_then(|l| {
            let level = match l.to_ascii_lowercase().as_str() {
                "debug" => Ok(LogLevel::Debug),
                "info" => Ok(LogLevel::Info),
                "warn" | "warning" => Ok(LogLevel::Warn),
                "error" => Ok(LogLevel::Error),
                _ => Err(format!("{l:?} is not one of debug, info, warn, error")),
            };
            r.check("engine.log_level", level)
        });
        let log_format = r.optional_str("engine.log_format").map_or(Some(LogFormat::Text), |f| {
            let format = match f.to_ascii_lowercase().as_str() {
                "text" => Ok(LogFormat::Text),
                "json" => Ok(LogFormat::Json),
                _ => Err(format!("{f:?} is not one of text, json")),
            };
            r.check("engine.log_format", format)
        });

        let http_enabled = r.bool_or("http.enabled", false);
        let http_listen = r.addr_or("http.listen_addr", ":80");

        let tls_enabled = r.bool_or("tls.enabled", false);
        if tls_enabled == Some(false) {
            r.problem("tls.enabled", "must be true: the TLS listener carries agents, the API and tunnels");
        }
        let tls_listen = r.addr_or("tls.listen_addr", ":443");
        let public_port = r.optional_u64("tls.public_port", 1, 65535).map(|p| p.map(|p| p as u16));

        let certs_enabled = r.bool_or("certs.static.enabled", false);
        if certs_enabled == Some(false) {
            r.problem("certs.static.enabled", "must be true: the static provider is the certificate source");
        }
        let cert_file = r.required_str("certs.static.cert_file").map(PathBuf::from);
        let key_file = r.required_str("certs.static.key_file").map(PathBuf::from);

        let jwt_enabled = r.bool_or("auth.jwt.enabled", false);
        if jwt_enabled == Some(false) {
            r.problem("auth.jwt.enabled", "must be true: JWT is the authentication backend");
        }
        let secret = r.required_str("auth.jwt.token_jwt_secret").map(Secret);

        let metrics_enabled = r.bool_or("metrics.prometheus.enabled", false);
        let metrics_listen = r.optional_addr("metrics.prometheus.listen_addr");
        let metrics_path = r.optional_str("metrics.prometheus.path").map_or(Some("/metrics".to_string()), |p| {
            let normalised = normalise_path(&p);
            r.check("metrics.prometheus.path", normalised)
        });
        let bearer = r.optional_str("metrics.prometheus.bearer_token").filter(|t| !t.is_empty()).map(Secret);
        if let (Some(true), Some(Some(addr))) = (metrics_enabled, metrics_listen)
            && !addr.ip().is_loopback()
            && bearer.is_none()
        {
            r.problem(
                "metrics.prometheus.bearer_token",
                format!("required when metrics listen on the non-loopback address {addr}"),
            );
        }

        let stream_request = r.u64_or("timeouts.stream_request_seconds", 30, 1, 3600);
        let http_idle = r.u64_or("timeouts.http_idle_seconds", 90, 1, 86_400);
        let shutdown_drain = r.u64_or("timeouts.shutdown_drain_seconds", 30, 0, 3600);

        let max_frame = r.u64_or("limits.max_frame_bytes", 65_535, 1024, 65_535);
        let first_frame = r.u64_or("limits.first_frame_seconds", 10, 1, 600);
        let handshake = r.u64_or("limits.handshake_seconds", 10, 1, 600);
        let tunnels_per_client = r.u64_or("limits.tunnels_per_client", 256, 1, 1_000_000);
        let pending_per_client = r.u64_or("limits.pending_streams_per_client", 512, 1, 1_000_000);
        let control_idle = r.u64_or("limits.control_idle_seconds", 60, 1, 86_400);
        let max_connections = r.u64_or("limits.max_connections", 10_000, 1, 10_000_000);
        let handshakes_per_source = r.u64_or("limits.handshakes_per_source", 128, 1, 1_000_000);
        let handshake_rate = r.u64_or("limits.handshake_rate_per_source", 500, 1, 1_000_000);
        let handshake_burst = r.u64_or("limits.handshake_burst_per_source", 1000, 1, 1_000_000);
        let auth_failures = r.u64_or("limits.auth_failures_per_source", 30, 1, 1_000_000);
        let channels_per_principal = r.u64_or("limits.control_channels_per_principal", 1000, 1, 10_000_000);
        let tunnels_per_principal = r.u64_or("limits.tunnels_per_principal", 1024, 1, 10_000_000);
        let label_bytes = r.u64_or("limits.label_bytes_per_principal", 1 << 20, 0, 1 << 34);
        let hostname_hold = r.u64_or("edge.hostname_hold_seconds", 300, 0, 30 * 86_400);
        let cache_max_bytes = r.u64_or("edge.cache_max_bytes", 1 << 30, 1 << 20, 1 << 44);
        let cache_dir = r.optional_str("edge.cache_dir").filter(|d| !d.trim().is_empty()).map(PathBuf::from);
        let default_policy = match r.get("edge.default_policy") {
            None => Some(crate::policy::Policy::default()),
            // From the environment the policy is a JSON string.
            Some(Value::String(json)) => r.check("edge.default_policy", crate::policy::Policy::parse(json)),
            Some(value) => r.check("edge.default_policy", crate::policy::Policy::from_value(value.clone())),
        };
        let quic_enabled = r.bool_or("quic.enabled", true);
        let quic_listen = r.optional_addr("quic.listen_addr");
        let quic_streams = r.u64_or("quic.max_streams_per_connection", 4096, 1, 1 << 20);
        let quic_idle = r.u64_or("quic.idle_timeout_seconds", 15, 1, 3600);
        let quic_datagram = r.u64_or("quic.max_datagram_bytes", 1350, 64, 65_527);
        let tcp = r.ports("tcp", (20000, 20999));
        let udp = r.ports("udp", (21000, 21999));

        let warnings = unknown_keys(tree, &r.known);
        if !r.problems.is_empty() {
            return Err(ConfigError { problems: r.problems });
        }
        // Every Option below is Some: a None always recorded a problem.
        let config = Config {
            engine: EngineConfig {
                host: host.unwrap(),
                log_level: log_level.unwrap(),
                log_format: log_format.unwrap(),
            },
            http: HttpConfig { enabled: http_enabled.unwrap(), listen_addr: http_listen.unwrap() },
            tls: TlsConfig { enabled: true, listen_addr: tls_listen.unwrap(), public_port: public_port.unwrap() },
            certs: CertsConfig {
                r#static: StaticCertsConfig {
                    enabled: true,
                    cert_file: cert_file.unwrap(),
                    key_file: key_file.unwrap(),
                },
            },
            auth: AuthConfig { jwt: JwtConfig { enabled: true, token_jwt_secret: secret.unwrap() } },
            metrics: MetricsConfig {
                prometheus: PrometheusConfig {
                    enabled: metrics_enabled.unwrap(),
                    listen_addr: metrics_listen.unwrap(),
                    path: metrics_path.unwrap(),
                    bearer_token: bearer,
                },
            },
            timeouts: TimeoutsConfig {
                stream_request_seconds: stream_request.unwrap(),
                http_idle_seconds: http_idle.unwrap(),
                shutdown_drain_seconds: shutdown_drain.unwrap(),
            },
            limits: LimitsConfig {
                max_frame_bytes: max_frame.unwrap() as usize,
                first_frame_seconds: first_frame.unwrap(),
                handshake_seconds: handshake.unwrap(),
                tunnels_per_client: tunnels_per_client.unwrap() as usize,
                pending_streams_per_client: pending_per_client.unwrap() as usize,
                control_idle_seconds: control_idle.unwrap(),
                max_connections: max_connections.unwrap() as usize,
                handshakes_per_source: handshakes_per_source.unwrap() as usize,
                handshake_rate_per_source: handshake_rate.unwrap(),
                handshake_burst_per_source: handshake_burst.unwrap(),
                auth_failures_per_source: auth_failures.unwrap(),
                control_channels_per_principal: channels_per_principal.unwrap() as usize,
                tunnels_per_principal: tunnels_per_principal.unwrap() as usize,
                label_bytes_per_principal: label_bytes.unwrap() as usize,
            },
            edge: EdgeConfig {
                hostname_hold_seconds: hostname_hold.unwrap(),
                default_policy: default_policy.unwrap(),
                cache_dir,
                cache_max_bytes: cache_max_bytes.unwrap(),
            },
            quic: QuicConfig {
                enabled: quic_enabled.unwrap(),
                listen_addr: quic_listen.unwrap(),
                max_streams_per_connection: quic_streams.unwrap(),
                idle_timeout_seconds: quic_idle.unwrap(),
                max_datagram_bytes: quic_datagram.unwrap() as usize,
            },
            tcp: tcp.unwrap(),
            udp: udp.unwrap(),
        };
        Ok(Loaded { config, warnings })
    }
}

/// Folds `RSTREAM_ENGINE_A__B_C=v` into the tree as `a.b_c: "v"`. Values stay
/// strings; the reader coerces them to the field's type.
fn apply_env<I>(tree: &mut Value, env: I)
where
    I: IntoIterator<Item = (String, String)>,
{
    for (name, value) in env {
        let Some(rest) = name.strip_prefix(ENV_PREFIX) else { continue };
        // RSTREAM_ENGINE_CONFIG names the file; it is not a setting.
        if rest.is_empty() || rest == "CONFIG" {
            continue;
        }
        let mut node = &mut *tree;
        let parts: Vec<String> = rest.split("__").map(|p| p.to_ascii_lowercase()).collect();
        for (i, part) in parts.iter().enumerate() {
            if !node.is_object() {
                *node = Value::Object(Map::new());
            }
            let map = node.as_object_mut().expect("just made an object");
            if i + 1 == parts.len() {
                map.insert(part.clone(), Value::String(value.clone()));
                break;
            }
            node = map.entry(part.clone()).or_insert_with(|| Value::Object(Map::new()));
        }
    }
}

/// Reads typed fields out of the tree, recording each problem by its path.
struct Reader<'a> {
    tree: &'a Value,
    problems: Vec<Problem>,
    known: Vec<String>,
}

impl<'a> Reader<'a> {
    fn get(&mut self, path: &str) -> Option<&'a Value> {
        self.known.push(path.to_string());
        let mut node = self.tree;
        for part in path.split('.') {
            node = node.as_object()?.get(part)?;
        }
        (!node.is_null()).then_some(node)
    }

    fn problem(&mut self, field: &str, message: impl Into<String>) {
        self.problems.push(Problem { field: field.to_string(), message: message.into() });
    }

    fn check<T>(&mut self, field: &str, result: Result<T, String>) -> Option<T> {
        result.map_err(|m| self.problem(field, m)).ok()
    }

    fn optional_str(&mut self, path: &str) -> Option<String> {
        match self.get(path)? {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            Value::Bool(b) => Some(b.to_string()),
            _ => {
                self.problem(path, "must be a string");
                None
            }
        }
    }

    /// An address that may be absent or empty: `Some(None)` then; `None`
    /// records a problem.
    fn optional_addr(&mut self, path: &str) -> Option<Option<SocketAddr>> {
        match self.optional_str(path) {
            None => Some(None),
            Some(a) if a.is_empty() => Some(None),
            Some(a) => {
                let parsed = parse_listen_addr(&a);
                self.check(path, parsed).map(Some)
            }
        }
    }

    fn required_str(&mut self, path: &str) -> Option<String> {
        let present = self.get(path).is_some();
        match self.optional_str(path) {
            Some(s) if !s.trim().is_empty() => Some(s),
            Some(_) => {
                self.problem(path, "must not be empty");
                None
            }
            None => {
                if !present {
                    self.problem(path, "is required");
                }
                None
            }
        }
    }

    fn bool_or(&mut self, path: &str, default: bool) -> Option<bool> {
        match self.get(path) {
            None => Some(default),
            Some(Value::Bool(b)) => Some(*b),
            Some(Value::String(s)) => match s.to_ascii_lowercase().as_str() {
                "true" | "yes" | "on" | "1" => Some(true),
                "false" | "no" | "off" | "0" => Some(false),
                _ => {
                    self.problem(path, format!("{s:?} is not true or false"));
                    None
                }
            },
            Some(_) => {
                self.problem(path, "must be true or false");
                None
            }
        }
    }

    fn optional_u64(&mut self, path: &str, min: u64, max: u64) -> Option<Option<u64>> {
        let value = match self.get(path) {
            None => return Some(None),
            Some(Value::Number(n)) => n.as_u64().ok_or_else(|| format!("{n} is not a whole number")),
            Some(Value::String(s)) => s.trim().parse::<u64>().map_err(|_| format!("{s:?} is not a whole number")),
            Some(_) => Err("must be a whole number".to_string()),
        };
        let value = value
            .and_then(|v| if (min..=max).contains(&v) { Ok(v) } else { Err(format!("{v} is outside {min}..={max}")) });
        self.check(path, value).map(Some)
    }

    fn u64_or(&mut self, path: &str, default: u64, min: u64, max: u64) -> Option<u64> {
        self.optional_u64(path, min, max).map(|v| v.unwrap_or(default))
    }

    /// `tcp.*` or `udp.*`: published ports.
    fn ports(&mut self, section: &str, default_range: (u16, u16)) -> Option<PortsConfig> {
        let key = |field: &str| format!("{section}.{field}");
        let enabled = self.bool_or(&key("enabled"), false);
        let range_key = key("port_range");
        let range = match self.optional_str(&range_key) {
            None => Some(default_range),
            Some(text) => {
                let parsed = parse_port_range(&text);
                self.check(&range_key, parsed)
            }
        };
        let ip_key = key("listen_ip");
        let listen_ip = match self.optional_str(&ip_key) {
            None => Some(None),
            Some(ip) if ip.trim().is_empty() => Some(None),
            Some(ip) => {
                let parsed = ip.trim().parse::<IpAddr>().map_err(|_| format!("{ip:?} is not an IP address"));
                self.check(&ip_key, parsed).map(Some)
            }
        };
        let host_key = key("public_host");
        let public_host = match self.optional_str(&host_key) {
            None => Some(None),
            Some(host) if host.trim().is_empty() => Some(None),
            Some(host) => {
                let checked = validate_host(&host);
                self.check(&host_key, checked).map(Some)
            }
        };
        let idle = self.u64_or(&key("session_idle_seconds"), 60, 1, 86_400);
        let sessions = self.u64_or(&key("max_sessions_per_tunnel"), 1024, 1, 1_000_000);
        let packet = self.u64_or(&key("max_packet_bytes"), 65_507, 1, 65_507);
        let (first_port, last_port) = range?;
        Some(PortsConfig {
            enabled: enabled?,
            first_port,
            last_port,
            listen_ip: listen_ip?,
            public_host: public_host?,
            session_idle_seconds: idle?,
            max_sessions_per_tunnel: sessions? as usize,
            max_packet_bytes: packet? as usize,
        })
    }

    fn addr_or(&mut self, path: &str, default: &str) -> Option<SocketAddr> {
        let text = self.optional_str(path).unwrap_or_else(|| default.to_string());
        let parsed = parse_listen_addr(&text);
        self.check(path, parsed)
    }
}

/// Lists keys in the tree that no reader asked for.
fn unknown_keys(tree: &Value, known: &[String]) -> Vec<String> {
    fn walk(node: &Value, prefix: &str, known: &[String], out: &mut Vec<String>) {
        let Some(map) = node.as_object() else { return };
        for (key, value) in map {
            let path = if prefix.is_empty() { key.clone() } else { format!("{prefix}.{key}") };
            if known.contains(&path) {
                continue;
            }
            let is_section = known.iter().any(|k| k.starts_with(&format!("{path}.")));
            if is_section && value.is_object() {
                walk(value, &path, known, out);
            } else {
                out.push(format!("unknown configuration key {path:?} ignored"));
            }
        }
    }
    let mut out = Vec::new();
    walk(tree, "", known, &mut out);
    out
}

/// Parses a Go-style listen address: `:443`, `0.0.0.0:443`, `[::1]:443`,
/// `localhost:8443`.
pub fn parse_listen_addr(text: &str) -> Result<SocketAddr, String> {
    let text = text.trim();
    if let Some(port) = text.strip_prefix(':') {
        let port = port.parse::<u16>().map_err(|_| format!("{text:?}: bad port"))?;
        return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port));
    }
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let Some((host, port)) = text.rsplit_once(':') else {
        return Err(format!("{text:?} is not host:port or :port"));
    };
    let port = port.parse::<u16>().map_err(|_| format!("{text:?}: bad port"))?;
    match host {
        "localhost" => Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port)),
        "" | "*" => Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port)),
        "[::]" => Ok(SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port)),
        _ => Err(format!("{text:?}: the host must be an IP address, localhost or empty")),
    }
}

/// Parses `20000-20999` (or one port, `20000`).
fn parse_port_range(text: &str) -> Result<(u16, u16), String> {
    let port = |p: &str| match p.trim().parse::<u16>() {
        Ok(0) | Err(_) => Err(format!("{text:?} is not FIRST-LAST with ports 1 to 65535")),
        Ok(p) => Ok(p),
    };
    let (first, last) = match text.split_once('-') {
        Some((a, b)) => (port(a)?, port(b)?),
        None => (port(text)?, port(text)?),
    };
    if first > last {
        return Err(format!("{text:?}: the first port is above the last"));
    }
    Ok((first, last))
}

fn validate_host(host: &str) -> Result<String, String> {
    let host = host.trim().trim_end_matches('.').to_ascii_lowercase();
    if host.contains("://") {
        return Err(format!("{host:?} must be a bare hostname, without a scheme"));
    }
    if host.contains(':') || host.contains('/') {
        return Err(format!("{host:?} must be a bare hostname, without a port or path"));
    }
    let ok = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if ok { Ok(host) } else { Err(format!("{host:?} is not a valid hostname")) }
}

fn normalise_path(path: &str) -> Result<String, String> {
    let trimmed = path.trim().trim_matches('/');
    if trimmed.contains(['?', '#', ' ']) {
        return Err(format!("{path:?} must be a plain URL path"));
    }
    if trimmed.is_empty() {
        return Err("must not be empty or \"/\"".to_string());
    }
    Ok(format!("/{trimmed}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "engine: {host: edge.example.com, log_level: info}\n\
        tls: {enabled: true, listen_addr: \":443\"}\n\
        certs: {static: {enabled: true, cert_file: /etc/rstream/tls/cert.pem, key_file: /etc/rstream/tls/key.pem}}\n\
        auth: {jwt: {enabled: true, token_jwt_secret: \"s3cret-value-that-is-long-enough-xx\"}}\n";

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn minimal_file_gets_ce_defaults() {
        let loaded = Config::from_yaml_str(MINIMAL, Vec::new()).unwrap();
        let c = loaded.config;
        assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
        assert_eq!(c.engine.host, "edge.example.com");
        assert_eq!(c.engine.log_level, LogLevel::Info);
        assert_eq!(c.tls.listen_addr, "0.0.0.0:443".parse().unwrap());
        assert!(!c.http.enabled);
        assert_eq!(c.http.listen_addr.port(), 80);
        assert_eq!(c.timeouts.stream_request_seconds, 30);
        assert_eq!(c.timeouts.http_idle_seconds, 90);
        assert_eq!(c.timeouts.shutdown_drain_seconds, 30);
        assert_eq!(c.metrics.prometheus.path, "/metrics");
        assert_eq!(c.metrics.prometheus.listen_addr, None);
        assert_eq!(c.limits.max_frame_bytes, 65_535);
        assert_eq!(c.tls.public_port, None);
    }

    #[test]
    fn environment_overrides_with_double_underscore_levels() {
        let loaded = Config::from_yaml_str(
            MINIMAL,
            env(&[
                ("RSTREAM_ENGINE_AUTH__JWT__TOKEN_JWT_SECRET", "from-env"),
                ("RSTREAM_ENGINE_TLS__LISTEN_ADDR", "127.0.0.1:8443"),
                ("RSTREAM_ENGINE_TIMEOUTS__STREAM_REQUEST_SECONDS", "5"),
                ("RSTREAM_ENGINE_HTTP__ENABLED", "true"),
                ("RSTREAM_ENGINE_CONFIG", "/ignored.yaml"),
                ("UNRELATED", "x"),
            ]),
        )
        .unwrap();
        let c = loaded.config;
        assert_eq!(c.auth.jwt.token_jwt_secret.expose(), "from-env");
        assert_eq!(c.tls.listen_addr, "127.0.0.1:8443".parse().unwrap());
        assert_eq!(c.timeouts.stream_request_seconds, 5);
        assert!(c.http.enabled);
        assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
    }

    #[test]
    fn environment_alone_is_a_configuration() {
        let c = Config::from_env(env(&[
            ("RSTREAM_ENGINE_ENGINE__HOST", "edge.example.com"),
            ("RSTREAM_ENGINE_ENGINE__LOG_LEVEL", "debug"),
            ("RSTREAM_ENGINE_TLS__ENABLED", "true"),
            ("RSTREAM_ENGINE_CERTS__STATIC__ENABLED", "true"),
            ("RSTREAM_ENGINE_CERTS__STATIC__CERT_FILE", "/c.pem"),
            ("RSTREAM_ENGINE_CERTS__STATIC__KEY_FILE", "/k.pem"),
            ("RSTREAM_ENGINE_AUTH__JWT__ENABLED", "true"),
            ("RSTREAM_ENGINE_AUTH__JWT__TOKEN_JWT_SECRET", "12345"),
        ]))
        .unwrap()
        .config;
        assert_eq!(c.engine.log_level, LogLevel::Debug);
        assert_eq!(c.auth.jwt.token_jwt_secret.expose(), "12345");
    }

    #[test]
    fn every_bad_field_is_named_at_once() {
        let yaml = "engine: {host: \"https://edge.example.com:443\", log_level: loud}\n\
            tls: {enabled: false, listen_addr: \"nope\"}\n\
            certs: {static: {enabled: true, cert_file: /c.pem}}\n\
            auth: {jwt: {enabled: true, token_jwt_secret: \"\"}}\n\
            timeouts: {stream_request_seconds: -3, http_idle_seconds: lots}\n\
            limits: {max_frame_bytes: 100}\n\
            metrics: {prometheus: {enabled: true, listen_addr: \"0.0.0.0:9090\"}}\n";
        let error = Config::from_yaml_str(yaml, Vec::new()).unwrap_err();
        for field in [
            "engine.host",
            "engine.log_level",
            "tls.enabled",
            "tls.listen_addr",
            "certs.static.key_file",
            "auth.jwt.token_jwt_secret",
            "timeouts.stream_request_seconds",
            "timeouts.http_idle_seconds",
            "limits.max_frame_bytes",
            "metrics.prometheus.bearer_token",
        ] {
            assert!(error.names(field), "{field} missing from {error}");
        }
        assert_eq!(error.problems.len(), 10, "{error}");
    }

    #[test]
    fn isolation_limits_and_holds_are_validated_and_overridable() {
        let c = Config::from_yaml_str(MINIMAL, Vec::new()).unwrap().config;
        assert_eq!(c.limits.handshakes_per_source, 128);
        assert_eq!(c.limits.control_channels_per_principal, 1000);
        assert_eq!(c.edge.hostname_hold_seconds, 300);
        let yaml = format!(
            "{MINIMAL}limits: {{handshakes_per_source: 0, tunnels_per_principal: -3}}\nedge: {{hostname_hold_seconds: x}}\n"
        );
        let error = Config::from_yaml_str(&yaml, Vec::new()).unwrap_err();
        for field in ["limits.handshakes_per_source", "limits.tunnels_per_principal", "edge.hostname_hold_seconds"] {
            assert!(error.names(field), "{field} missing from {error}");
        }
        let env = [
            ("RSTREAM_ENGINE_EDGE__HOSTNAME_HOLD_SECONDS".to_string(), "3600".to_string()),
            ("RSTREAM_ENGINE_LIMITS__AUTH_FAILURES_PER_SOURCE".to_string(), "5".to_string()),
        ];
        let c = Config::from_yaml_str(MINIMAL, env).unwrap().config;
        assert_eq!((c.edge.hostname_hold_seconds, c.limits.auth_failures_per_source), (3600, 5));
    }

    #[test]
    fn published_ports_are_off_by_default_checked_and_overridable() {
        let c = Config::from_yaml_str(MINIMAL, Vec::new()).unwrap().config;
        assert!(!c.tcp.enabled && !c.udp.enabled);
        assert_eq!((c.tcp.range(), c.udp.range()), ("20000-20999".to_string(), "21000-21999".to_string()));
        assert_eq!((c.udp.session_idle_seconds, c.udp.max_packet_bytes), (60, 65_507));
        let yaml = format!(
            "{MINIMAL}tcp: {{enabled: sometimes, port_range: \"30000-20000\", listen_ip: \"not-an-ip\"}}\n\
             udp: {{port_range: \"0-10\", public_host: \"https://x\", session_idle_seconds: 0, max_packet_bytes: 70000}}\n"
        );
        let error = Config::from_yaml_str(&yaml, Vec::new()).unwrap_err();
        for field in [
            "tcp.enabled",
            "tcp.port_range",
            "tcp.listen_ip",
            "udp.port_range",
            "udp.public_host",
            "udp.session_idle_seconds",
            "udp.max_packet_bytes",
        ] {
            assert!(error.names(field), "{field} missing from {error}");
        }
        let env = [
            ("RSTREAM_ENGINE_TCP__ENABLED".to_string(), "true".to_string()),
            ("RSTREAM_ENGINE_TCP__PORT_RANGE".to_string(), "25000-25009".to_string()),
            ("RSTREAM_ENGINE_UDP__PORT_RANGE".to_string(), "26000".to_string()),
            ("RSTREAM_ENGINE_UDP__LISTEN_IP".to_string(), "127.0.0.2".to_string()),
        ];
        let c = Config::from_yaml_str(MINIMAL, env).unwrap().config;
        assert!(c.tcp.enabled && c.tcp.contains(25009) && !c.tcp.contains(25010));
        assert_eq!((c.udp.first_port, c.udp.last_port), (26000, 26000));
        assert_eq!(c.udp.listen_ip, Some("127.0.0.2".parse().unwrap()));
    }

    #[test]
    fn the_quic_listener_is_on_by_default_and_its_fields_are_checked() {
        let c = Config::from_yaml_str(MINIMAL, Vec::new()).unwrap().config;
        assert!(c.quic.enabled && c.quic.listen_addr.is_none());
        assert_eq!((c.quic.max_streams_per_connection, c.quic.idle_timeout_seconds), (4096, 15));
        let yaml = format!(
            "{MINIMAL}quic: {{enabled: maybe, listen_addr: nope, max_streams_per_connection: 0, \
             idle_timeout_seconds: 99999, max_datagram_bytes: 10}}\n"
        );
        let error = Config::from_yaml_str(&yaml, Vec::new()).unwrap_err();
        for field in [
            "quic.enabled",
            "quic.listen_addr",
            "quic.max_streams_per_connection",
            "quic.idle_timeout_seconds",
            "quic.max_datagram_bytes",
        ] {
            assert!(error.names(field), "{field} missing from {error}");
        }
        let env = [
            ("RSTREAM_ENGINE_QUIC__ENABLED".to_string(), "false".to_string()),
            ("RSTREAM_ENGINE_QUIC__LISTEN_ADDR".to_string(), "127.0.0.1:4433".to_string()),
        ];
        let c = Config::from_yaml_str(MINIMAL, env).unwrap().config;
        assert!(!c.quic.enabled);
        assert_eq!(c.quic.listen_addr, Some("127.0.0.1:4433".parse().unwrap()));
    }

    #[test]
    fn secrets_never_print() {
        let yaml = format!(
            "{MINIMAL}metrics: {{prometheus: {{enabled: true, listen_addr: \":9090\", bearer_token: scrape-token-value}}}}\n"
        );
        let c = Config::from_yaml_str(&yaml, Vec::new()).unwrap().config;
        let debug = format!("{c:?}");
        assert!(!debug.contains("s3cret-value"), "{debug}");
        assert!(!debug.contains("scrape-token-value"), "{debug}");
        assert!(debug.contains("********"));
        // A bad secret field reports the field, never the value.
        let error = Config::from_yaml_str(MINIMAL, env(&[("RSTREAM_ENGINE_ENGINE__LOG_LEVEL", "s3cret-value")]))
            .unwrap_err()
            .to_string();
        assert!(error.contains("engine.log_level"));
    }

    #[test]
    fn the_default_policy_comes_from_yaml_or_json_in_the_environment() {
        let yaml = format!("{MINIMAL}edge:\n  default_policy:\n    deny_paths: [/metrics]\n  cache_dir: /tmp/c\n");
        let loaded = Config::from_yaml_str(&yaml, Vec::new()).unwrap();
        assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
        assert!(loaded.config.edge.default_policy.denies("/metrics").is_some());
        assert_eq!(loaded.config.edge.cache_dir.as_deref(), Some(std::path::Path::new("/tmp/c")));
        let from_env = env(&[("RSTREAM_ENGINE_EDGE__DEFAULT_POLICY", r#"{"allow_methods": ["GET"]}"#)]);
        let loaded = Config::from_yaml_str(MINIMAL, from_env).unwrap();
        assert!(!loaded.config.edge.default_policy.allows_method("POST"));
        let bad = format!("{MINIMAL}edge:\n  default_policy:\n    deny_path: [/x]\n");
        let error = Config::from_yaml_str(&bad, Vec::new()).unwrap_err();
        assert_eq!(error.problems[0].field, "edge.default_policy");
        assert!(error.problems[0].message.contains("unknown field `deny_path`"), "{error:?}");
    }

    #[test]
    fn unknown_keys_warn_but_load() {
        let yaml = format!("{MINIMAL}engine_typo: 1\ntls_extra: {{a: 1}}\n");
        let loaded = Config::from_yaml_str(&yaml, env(&[("RSTREAM_ENGINE_TLS__LISTEN_ADRR", ":1")])).unwrap();
        assert_eq!(loaded.warnings.len(), 3, "{:?}", loaded.warnings);
        assert!(loaded.warnings.iter().any(|w| w.contains("tls.listen_adrr")));
    }

    #[test]
    fn listen_addresses_in_go_style() {
        assert_eq!(parse_listen_addr(":443").unwrap(), "0.0.0.0:443".parse().unwrap());
        assert_eq!(parse_listen_addr("[::1]:80").unwrap(), "[::1]:80".parse().unwrap());
        assert_eq!(parse_listen_addr("localhost:0").unwrap(), "127.0.0.1:0".parse().unwrap());
        assert!(parse_listen_addr("example.com:80").is_err());
        assert!(parse_listen_addr(":99999").is_err());
        assert!(parse_listen_addr("443").is_err());
    }

    #[test]
    fn metrics_path_is_normalised() {
        assert_eq!(normalise_path("metrics/").unwrap(), "/metrics");
        assert_eq!(normalise_path("/a/b").unwrap(), "/a/b");
        assert!(normalise_path("/").is_err());
    }

    #[test]
    fn loopback_metrics_need_no_token() {
        let yaml = format!("{MINIMAL}metrics: {{prometheus: {{enabled: true, listen_addr: \"127.0.0.1:9090\"}}}}\n");
        assert!(Config::from_yaml_str(&yaml, Vec::new()).is_ok());
    }

    #[test]
    fn broken_yaml_is_one_clear_problem() {
        let error = Config::from_yaml_str("engine: [", Vec::new()).unwrap_err();
        assert_eq!(error.problems.len(), 1);
        assert!(error.to_string().contains("YAML"));
    }
}

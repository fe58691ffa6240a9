//! The declarative tunnels file of `strait run --apply FILE`: `${ENV}`
//! expansion, strict parsing and validation, from text to a [`Plan`].
//!
//! Everything here is a pure function of the text and the environment, so
//! a file can be checked completely before a single tunnel is touched.
//! Every problem is reported with the line (and column) it sits on.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::IpAddr;

use serde::Deserialize;
use serde_saphyr::Spanned;
use strait_agent::TunnelProperties;

/// Labels every managed tunnel carries, as the rstream CLI sets them, so
/// operators can tell declarative tunnels from hand-made ones.
pub const MANAGED_LABELS: [(&str, &str); 2] = [("rstream.managed-by", "run"), ("rstream.source", "apply")];

/// The only format version this build reads.
const VERSION: u32 = 1;

/// A validated file: the tunnels wanted, in file order.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub tunnels: Vec<TunnelSpec>,
}

/// One tunnel of the file.
#[derive(Debug, Clone, PartialEq)]
pub struct TunnelSpec {
    pub name: String,
    /// Where the entry starts in the file, for later error messages.
    pub line: u32,
    pub desired: Desired,
}

/// What decides whether a tunnel changed: a tunnel whose `Desired` is equal
/// across two applies is left alone.
#[derive(Debug, Clone, PartialEq)]
pub struct Desired {
    /// The local service, as `HOST:PORT`.
    pub forward: String,
    /// A context of the agent configuration file; `None` is the one the
    /// command line resolves.
    pub context: Option<String>,
    /// What to ask the engine for, managed labels included.
    pub properties: TunnelProperties,
}

/// One problem in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub line: u32,
    /// 1-based, in characters; `None` when only the line is known.
    pub column: Option<u32>,
    pub message: String,
}

impl Problem {
    fn at(line: u32, column: Option<u32>, message: impl Into<String>) -> Self {
        Self { line, column, message: message.into() }
    }

    fn spanned<T>(at: &Spanned<T>, message: impl Into<String>) -> Self {
        Self::at(at.referenced.line() as u32, Some(at.referenced.column() as u32), message)
    }
}

/// Every problem found in a file, printed one per line as `FILE:LINE:COL: …`
/// (the shape editors and CI logs link to).
#[derive(Debug)]
pub struct Problems {
    pub file: String,
    pub problems: Vec<Problem>,
}

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.problems.len();
        write!(f, "{} has {n} error{}; nothing was changed", self.file, if n == 1 { "" } else { "s" })?;
        for p in &self.problems {
            match p.column {
                Some(column) => write!(f, "\n  {}:{}:{column}: {}", self.file, p.line, p.message)?,
                None => write!(f, "\n  {}:{}: {}", self.file, p.line, p.message)?,
            }
        }
        Ok(())
    }
}

impl std::error::Error for Problems {}

// The file's shape. `deny_unknown_fields` everywhere: a misspelt key is an
// error, never a silently ignored setting. Enumerations are read as strings
// and checked afterwards, because a serde error stops the parse and would
// hide every later problem.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDoc {
    version: Spanned<u32>,
    #[serde(default)]
    tunnels: Vec<Spanned<EntryDoc>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EntryDoc {
    name: Spanned<String>,
    forward: Spanned<String>,
    #[serde(default)]
    context: Option<Spanned<String>>,
    #[serde(default)]
    tunnel: Option<TunnelDoc>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct TunnelDoc {
    publish: Option<bool>,
    #[serde(default)]
    labels: Option<Spanned<BTreeMap<String, String>>>,
    protocol: Option<Spanned<String>>,
    #[serde(rename = "type")]
    kind: Option<Spanned<String>>,
    host: Option<Spanned<String>>,
    /// The public port of a tcp or udp tunnel.
    port: Option<Spanned<u16>>,
    #[serde(rename = "upstreamTLS")]
    upstream_tls: Option<bool>,
    #[serde(rename = "trustedIPs", default)]
    trusted_ips: Vec<Spanned<String>>,
    #[serde(default)]
    geoip: Vec<String>,
    http: Option<Spanned<HttpDoc>>,
    tls: Option<Spanned<TlsDoc>>,
    /// Path routing: the prefix of the hostname this tunnel serves.
    path: Option<Spanned<String>>,
    #[serde(rename = "stripPath")]
    strip_path: Option<Spanned<bool>>,
    /// Traffic policy: the keys of the `strait.policy` label.
    policy: Option<Spanned<serde_json::Value>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HttpDoc {
    version: Option<Spanned<String>>,
    auth: Option<HttpAuthDoc>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HttpAuthDoc {
    token: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct TlsDoc {
    mode: Option<Spanned<String>>,
    min_version: Option<String>,
    #[serde(default)]
    alpns: Vec<String>,
}

/// Expands, parses and validates a file. `env` looks up `${NAME}`s.
pub fn parse(text: &str, env: impl Fn(&str) -> Option<String>) -> Result<Plan, Vec<Problem>> {
    let (expanded, env_problems) = expand(text, &env);
    let mut problems = Vec::new();
    let plan = if expanded.trim().is_empty() {
        problems.push(Problem::at(1, None, "the file is empty; it must start with `version: 1`"));
        None
    } else {
        match serde_saphyr::from_str::<FileDoc>(&expanded) {
            Ok(doc) => Some(validate(doc, &mut problems)),
            Err(error) => {
                problems.push(yaml_problem(&error));
                None
            }
        }
    };
    // A reference that did not expand stays in the text as written and may
    // upset what reads it: report the variable, not its echo.
    problems.retain(|p| !env_problems.iter().any(|e| e.line == p.line));
    problems.extend(env_problems);
    match plan {
        Some(plan) if problems.is_empty() => Ok(plan),
        _ => {
            problems.sort_by_key(|p| (p.line, p.column));
            Err(problems)
        }
    }
}

/// serde-saphyr's message ends with " at line L, column C"; the location is
/// printed in front instead.
fn yaml_problem(error: &serde_saphyr::Error) -> Problem {
    let message = error.without_snippet().to_string();
    match error.location() {
        Some(loc) => {
            let suffix = format!(" at line {}, column {}", loc.line(), loc.column());
            let message = message.strip_suffix(&suffix).unwrap_or(&message).to_string();
            Problem::at(loc.line() as u32, Some(loc.column() as u32), message)
        }
        None => Problem::at(1, None, message),
    }
}

/// Replaces `${NAME}` from `env`; `$${` stands for a literal `${`.
/// Undefined names and malformed references are problems; they are left as
/// written (a plain YAML scalar) so parsing can go on and find more.
fn expand(text: &str, env: &dyn Fn(&str) -> Option<String>) -> (String, Vec<Problem>) {
    let mut out = String::with_capacity(text.len());
    let mut problems = Vec::new();
    for (index, line) in text.split_inclusive('\n').enumerate() {
        let line_no = index as u32 + 1;
        let mut rest = line;
        let mut column = 1u32;
        while let Some(at) = rest.find('$') {
            out.push_str(&rest[..at]);
            column += rest[..at].chars().count() as u32;
            let tail = &rest[at..];
            if let Some(after) = tail.strip_prefix("$${") {
                out.push_str("${");
                rest = after;
                column += 3;
            } else if let Some(body) = tail.strip_prefix("${") {
                let Some(end) = body.find('}') else {
                    problems.push(Problem::at(
                        line_no,
                        Some(column),
                        "`${` without a closing `}` (write `$${` for a literal `${`)",
                    ));
                    out.push_str("${");
                    rest = body;
                    column += 2;
                    continue;
                };
                let name = &body[..end];
                let written = &tail[..end + 3];
                if !valid_var_name(name) {
                    problems.push(Problem::at(line_no, Some(column), format!("{written} is not a variable name")));
                    out.push_str(written);
                } else {
                    match env(name) {
                        // A line break would shift every later line number
                        // and could reshape the YAML around it.
                        Some(value) if value.contains('\n') => {
                            problems.push(Problem::at(
                                line_no,
                                Some(column),
                                format!("environment variable {name} contains a line break"),
                            ));
                            out.push_str(written);
                        }
                        Some(value) => out.push_str(&value),
                        None => {
                            problems.push(Problem::at(
                                line_no,
                                Some(column),
                                format!("environment variable {name} is not set"),
                            ));
                            out.push_str(written);
                        }
                    }
                }
                column += 3 + name.chars().count() as u32;
                rest = &body[end + 1..];
            } else {
                out.push('$');
                rest = &tail[1..];
                column += 1;
            }
        }
        out.push_str(rest);
    }
    (out, problems)
}

fn valid_var_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Checks what the YAML shape cannot say, collecting every problem.
fn validate(doc: FileDoc, problems: &mut Vec<Problem>) -> Plan {
    if doc.version.value != VERSION {
        problems.push(Problem::spanned(
            &doc.version,
            format!("version {} is not supported; this strait reads version {VERSION}", doc.version.value),
        ));
    }
    let mut seen: HashMap<String, u32> = HashMap::new();
    let mut tunnels = Vec::new();
    for entry in doc.tunnels {
        let line = entry.referenced.line() as u32;
        let entry = entry.value;
        let name = entry.name.value.trim().to_string();
        if name.is_empty() || name.len() > 253 {
            problems.push(Problem::spanned(&entry.name, "name must be 1 to 253 characters"));
        } else if let Some(first) = seen.get(&name) {
            problems
                .push(Problem::spanned(&entry.name, format!("tunnel name {name:?} is already used on line {first}")));
        } else {
            seen.insert(name.clone(), entry.name.referenced.line() as u32);
        }
        let forward = match crate::forward::local_target(Some(&entry.forward.value)) {
            Ok(target) => target,
            Err(error) => {
                problems.push(Problem::spanned(&entry.forward, format!("forward: {error}")));
                String::new()
            }
        };
        let context = match entry.context {
            Some(c) if c.value.trim().is_empty() => {
                problems.push(Problem::spanned(&c, "context must name a context of the agent configuration file"));
                None
            }
            Some(c) => Some(c.value.trim().to_string()),
            None => None,
        };
        let properties = properties(&name, entry.tunnel.unwrap_or_default(), problems);
        tunnels.push(TunnelSpec { name, line, desired: Desired { forward, context, properties } });
    }
    Plan { tunnels }
}

fn properties(name: &str, t: TunnelDoc, problems: &mut Vec<Problem>) -> TunnelProperties {
    let mut labels: HashMap<String, String> = HashMap::new();
    if let Some(user) = &t.labels {
        for (key, value) in &user.value {
            if MANAGED_LABELS.iter().any(|(k, _)| k == key) {
                problems.push(Problem::spanned(user, format!("label {key} is set by `strait run`; remove it")));
            } else {
                labels.insert(key.clone(), value.clone());
            }
        }
    }
    labels.extend(MANAGED_LABELS.iter().map(|(k, v)| (k.to_string(), v.to_string())));

    let protocol = one_of(&t.protocol, "protocol", &["http", "tls", "tcp", "udp"], problems);
    let mut kind = one_of(&t.kind, "type", &["bytestream", "datagram"], problems);
    if protocol.as_deref() == Some("udp") {
        match (&t.kind, kind.as_deref()) {
            (Some(given), Some("bytestream")) => {
                problems.push(Problem::spanned(given, "protocol: udp carries datagrams (type: datagram)"));
            }
            _ => kind = Some("datagram".to_string()),
        }
    }
    if let Some(port) = &t.port
        && !matches!(protocol.as_deref(), Some("tcp" | "udp"))
    {
        problems.push(Problem::spanned(port, "port applies to protocol: tcp and protocol: udp only"));
    }
    let http = t.http.as_ref().map(|h| &h.value);
    let http_version = one_of(&http.and_then(|h| h.version.clone()), "http.version", &["http/1.1", "h2c"], problems);
    let tls = t.tls.as_ref().map(|t| &t.value);
    let tls_mode = one_of(&tls.and_then(|t| t.mode.clone()), "tls.mode", &["terminated", "passthrough"], problems);

    // Cheap checks the engine would also make, caught here so the whole
    // file is refused before anything changes.
    if let Some(host) = &t.host
        && t.publish != Some(true)
    {
        problems.push(Problem::spanned(host, "host applies to published tunnels only (set publish: true)"));
    }
    if let Some(http) = &t.http
        && protocol.as_deref().is_some_and(|p| p != "http")
    {
        problems.push(Problem::spanned(http, "http settings apply to protocol: http only"));
    }
    if let Some(tls) = &t.tls
        && protocol.as_deref() != Some("tls")
    {
        problems.push(Problem::spanned(tls, "tls settings apply to protocol: tls only"));
    }
    let http_published = t.publish == Some(true) && protocol.as_deref().is_none_or(|p| p == "http");
    if let Some(path) = &t.path {
        if !http_published {
            problems.push(Problem::spanned(path, "path applies to published http tunnels only"));
        }
        if !path.value.starts_with('/') {
            problems.push(Problem::spanned(path, format!("path {:?} must start with /", path.value)));
        }
        labels.insert(crate::policy::PATH_LABEL.to_string(), path.value.clone());
    }
    if let Some(strip) = &t.strip_path {
        if t.path.is_none() {
            problems.push(Problem::spanned(strip, "stripPath needs path"));
        }
        if strip.value {
            labels.insert(crate::policy::STRIP_LABEL.to_string(), "true".to_string());
        }
    }
    if let Some(policy) = &t.policy {
        if !http_published {
            problems.push(Problem::spanned(policy, "policy applies to published http tunnels only"));
        }
        match &policy.value {
            serde_json::Value::Object(_) => {
                labels.insert(crate::policy::POLICY_LABEL.to_string(), policy.value.to_string());
            }
            _ => problems.push(Problem::spanned(policy, "policy must be a mapping of policy keys")),
        }
    }
    for entry in &t.trusted_ips {
        if !ip_or_cidr(entry.value.trim()) {
            problems.push(Problem::spanned(
                entry,
                format!("trustedIPs entry {:?} is not an IP address or CIDR", entry.value),
            ));
        }
    }

    TunnelProperties {
        name: Some(name.to_string()),
        publish: t.publish,
        protocol,
        r#type: kind,
        labels,
        hostname: t.host.map(|h| h.value.trim().to_string()),
        port: t.port.map(|p| u32::from(p.value)),
        upstream_tls: t.upstream_tls,
        trusted_ips: t.trusted_ips.into_iter().map(|s| s.value.trim().to_string()).collect(),
        geoip: t.geoip,
        http_version,
        token_auth: http.and_then(|h| h.auth.as_ref()).and_then(|a| a.token),
        tls_mode,
        tls_min_version: tls.and_then(|t| t.min_version.clone()),
        tls_alpns: tls.map(|t| t.alpns.clone()).unwrap_or_default(),
        ..Default::default()
    }
}

/// The value, if it is one of `allowed`; a problem otherwise.
fn one_of(value: &Option<Spanned<String>>, key: &str, allowed: &[&str], problems: &mut Vec<Problem>) -> Option<String> {
    let value = value.as_ref()?;
    let text = value.value.trim();
    if allowed.contains(&text) {
        Some(text.to_string())
    } else {
        problems.push(Problem::spanned(value, format!("{key} {text:?} is not one of {}", allowed.join(", "))));
        None
    }
}

fn ip_or_cidr(text: &str) -> bool {
    match text.split_once('/') {
        None => text.parse::<IpAddr>().is_ok(),
        Some((ip, bits)) => match (ip.parse::<IpAddr>(), bits.parse::<u8>()) {
            (Ok(IpAddr::V4(_)), Ok(bits)) => bits <= 32,
            (Ok(IpAddr::V6(_)), Ok(bits)) => bits <= 128,
            _ => false,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "PORT" => Some("4000".into()),
            "TEAM" => Some("edge".into()),
            _ => None,
        }
    }

    fn problems(text: &str) -> Vec<Problem> {
        parse(text, env).expect_err("the file should be refused")
    }

    fn lines(text: &str) -> Vec<u32> {
        problems(text).iter().map(|p| p.line).collect()
    }

    #[test]
    fn a_full_entry_maps_to_tunnel_properties() {
        let text = "version: 1\n\
                    tunnels:\n\
                    \x20 - name: web\n\
                    \x20   forward: ${PORT}\n\
                    \x20   context: lab\n\
                    \x20   tunnel:\n\
                    \x20     publish: true\n\
                    \x20     protocol: http\n\
                    \x20     host: web\n\
                    \x20     labels: {team: \"${TEAM}\"}\n\
                    \x20     trustedIPs: [10.0.0.0/8, 192.0.2.1]\n\
                    \x20     upstreamTLS: true\n\
                    \x20     http: {version: h2c, auth: {token: true}}\n\
                    \x20 - name: db\n\
                    \x20   forward: db.internal:5432\n\
                    \x20   tunnel: {protocol: tls, tls: {mode: terminated, minVersion: \"1.3\", alpns: [h2]}}\n\
                    \x20 - name: bare\n\
                    \x20   forward: 9000\n";
        let plan = parse(text, env).unwrap();
        assert_eq!(plan.tunnels.len(), 3);
        let web = &plan.tunnels[0];
        assert_eq!((web.name.as_str(), web.line), ("web", 3));
        assert_eq!(web.desired.forward, "127.0.0.1:4000");
        assert_eq!(web.desired.context.as_deref(), Some("lab"));
        let p = &web.desired.properties;
        assert_eq!(p.name.as_deref(), Some("web"));
        assert_eq!(p.publish, Some(true));
        assert_eq!(p.protocol.as_deref(), Some("http"));
        assert_eq!(p.hostname.as_deref(), Some("web"));
        assert_eq!(p.labels.get("team").map(String::as_str), Some("edge"));
        assert_eq!(p.labels.get("rstream.managed-by").map(String::as_str), Some("run"));
        assert_eq!(p.labels.get("rstream.source").map(String::as_str), Some("apply"));
        assert_eq!(p.trusted_ips, ["10.0.0.0/8", "192.0.2.1"]);
        assert_eq!(p.upstream_tls, Some(true));
        assert_eq!(p.http_version.as_deref(), Some("h2c"));
        assert_eq!(p.token_auth, Some(true));
        let db = &plan.tunnels[1].desired.properties;
        assert_eq!(db.tls_mode.as_deref(), Some("terminated"));
        assert_eq!(db.tls_min_version.as_deref(), Some("1.3"));
        assert_eq!(db.tls_alpns, ["h2"]);
        let bare = &plan.tunnels[2].desired;
        assert_eq!(bare.forward, "127.0.0.1:9000");
        assert_eq!(bare.properties.publish, None);
        assert_eq!(bare.properties.labels.len(), 2);
    }

    #[test]
    fn an_empty_tunnel_list_is_a_valid_plan() {
        assert_eq!(parse("version: 1\ntunnels: []\n", env).unwrap().tunnels, []);
        assert_eq!(parse("version: 1\n", env).unwrap().tunnels, []);
    }

    #[test]
    fn unknown_keys_name_their_line_and_column() {
        let p = problems("version: 1\ntunnels:\n  - name: a\n    forward: 1\n    tunnel:\n      publsh: true\n");
        assert_eq!((p[0].line, p[0].column), (6, Some(7)));
        assert!(p[0].message.contains("publsh"), "{:?}", p);
        assert_eq!(lines("version: 1\ntunnel: []\n"), [2]);
        assert_eq!(lines("version: 1\ntunnels:\n  - name: a\n    forward: 1\n    labels: {}\n"), [5]);
    }

    #[test]
    fn wrong_types_missing_fields_and_bad_enums_are_located() {
        assert_eq!(lines("version: 1\ntunnels:\n  - name: a\n    forward: 1\n    tunnel: {publish: maybe}\n"), [5]);
        assert_eq!(lines("version: 1\ntunnels:\n  - name: a\n    tunnel: {publish: true}\n"), [4]);
        assert_eq!(lines("version: 1\ntunnels:\n  - forward: 1\n"), [3]);
        for bad in ["protocol: quic", "type: stream", "http: {version: h3}", "tls: {mode: bridged}"] {
            let text = format!("version: 1\ntunnels:\n  - name: a\n    forward: 1\n    tunnel: {{{bad}}}\n");
            let p = problems(&text);
            assert_eq!(p[0].line, 5, "{bad}: {p:?}");
        }
        assert_eq!(lines("version: one\n"), [1]);
        assert_eq!(lines("version: 1\ntunnels:\n  - name: a\n    forward: [1\n"), [4]);
    }

    #[test]
    fn semantic_problems_are_all_reported_with_lines() {
        let text = "version: 2\n\
                    tunnels:\n\
                    \x20 - name: a\n\
                    \x20   forward: 3000\n\
                    \x20 - name: a\n\
                    \x20   forward: \"host:\"\n\
                    \x20 - name: c\n\
                    \x20   forward: 1\n\
                    \x20   tunnel:\n\
                    \x20     host: c\n\
                    \x20     trustedIPs: [10.0.0.0/40]\n\
                    \x20     labels: {rstream.source: mine}\n";
        let p = problems(text);
        let at: Vec<u32> = p.iter().map(|p| p.line).collect();
        assert_eq!(at, [1, 5, 6, 10, 11, 12], "{p:?}");
        assert!(p[1].message.contains("already used on line 3"), "{p:?}");
        assert!(p[2].message.starts_with("forward:"), "{p:?}");
    }

    #[test]
    fn tcp_and_udp_tunnels_take_a_port() {
        let text = "version: 1\ntunnels:\n  - name: rtmp\n    forward: 1935\n    tunnel: {publish: true, protocol: tcp, \
                    port: 20001}\n  - name: srt\n    forward: 10080\n    tunnel: {publish: true, protocol: udp}\n";
        let plan = parse(text, env).unwrap();
        let rtmp = &plan.tunnels[0].desired.properties;
        assert_eq!((rtmp.protocol.as_deref(), rtmp.port, rtmp.r#type.as_deref()), (Some("tcp"), Some(20001), None));
        let srt = &plan.tunnels[1].desired.properties;
        assert_eq!((srt.protocol.as_deref(), srt.r#type.as_deref()), (Some("udp"), Some("datagram")));
        let wrong = "version: 1\ntunnels:\n  - name: a\n    forward: 1\n    tunnel: {protocol: http, port: 2}\n  - name: b\n    \
                     forward: 1\n    tunnel:\n      protocol: udp\n      type: bytestream\n";
        let p = problems(wrong);
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p[0].message.starts_with("port applies"), "{p:?}");
        assert!(p[1].message.contains("datagram"), "{p:?}");
    }

    #[test]
    fn paths_and_policies_become_labels() {
        let text = "version: 1\ntunnels:\n  - name: api\n    forward: 8081\n    tunnel:\n      publish: true\n      \
                    host: keystone\n      path: /api/\n      stripPath: true\n      policy:\n        deny_paths: \
                    [/internal/*]\n        rate_limit: {requests_per_second: 50}\n";
        let plan = parse(text, env).unwrap();
        let labels = &plan.tunnels[0].desired.properties.labels;
        assert_eq!(labels["strait.route.path"], "/api/");
        assert_eq!(labels["strait.route.strip"], "true");
        let policy: serde_json::Value = serde_json::from_str(&labels["strait.policy"]).unwrap();
        assert_eq!(
            policy,
            serde_json::json!({"deny_paths": ["/internal/*"], "rate_limit": {"requests_per_second": 50}})
        );
        let wrong = "version: 1\ntunnels:\n  - name: a\n    forward: 1\n    tunnel:\n      path: api\n      \
                     policy: [1]\n  - name: b\n    forward: 1\n    tunnel: {publish: true, stripPath: true}\n";
        let p = problems(wrong);
        let at: Vec<u32> = p.iter().map(|p| p.line).collect();
        assert_eq!(at, [6, 6, 7, 7, 10], "{p:?}");
        assert!(p[4].message.contains("stripPath needs path"), "{p:?}");
    }

    #[test]
    fn every_bad_enumeration_is_reported() {
        let text = "version: 1\ntunnels:\n  - name: a\n    forward: 1\n    tunnel:\n      protocol: quic\n      \
                    type: stream\n      http: {version: h3}\n  - name: b\n    forward: 2\n    tunnel:\n      \
                    protocol: tls\n      tls: {mode: bridged}\n";
        let p = problems(text);
        let at: Vec<(u32, Option<u32>)> = p.iter().map(|p| (p.line, p.column)).collect();
        assert_eq!(at, [(6, Some(17)), (7, Some(13)), (8, Some(23)), (13, Some(19))], "{p:?}");
        assert_eq!(p[0].message, "protocol \"quic\" is not one of http, tls, tcp, udp");
        assert_eq!(p[3].message, "tls.mode \"bridged\" is not one of terminated, passthrough");
    }

    #[test]
    fn settings_for_another_protocol_are_refused() {
        let t =
            |inner: &str| lines(&format!("version: 1\ntunnels:\n  - name: a\n    forward: 1\n    tunnel:\n{inner}"));
        assert_eq!(t("      protocol: tcp\n      http: {version: h2c}\n"), [7]);
        assert_eq!(t("      protocol: http\n      tls: {mode: passthrough}\n"), [7]);
    }

    #[test]
    fn environment_expansion() {
        let (out, p) = expand("a: ${PORT}\nb: $${PORT} $HOME $5\n", &env);
        assert_eq!(out, "a: 4000\nb: ${PORT} $HOME $5\n");
        assert!(p.is_empty());

        let (_, p) = expand("ok: 1\nx: ${MISSING} ${TEAM}\ny: ${bad-name}\nz: ${OPEN\n", &env);
        let at: Vec<(u32, Option<u32>)> = p.iter().map(|p| (p.line, p.column)).collect();
        assert_eq!(at, [(2, Some(4)), (3, Some(4)), (4, Some(4))], "{p:?}");
        assert!(p[0].message.contains("MISSING"));
    }

    #[test]
    fn an_undefined_variable_and_an_unknown_key_are_both_reported() {
        let text =
            "version: 1\ntunnels:\n  - name: a\n    forward: ${NOPE}\n  - name: b\n    forward: 1\n    bogus: x\n";
        let p = problems(text);
        let at: Vec<u32> = p.iter().map(|p| p.line).collect();
        // `forward: ${NOPE}` is also a bad forward target: reported once.
        assert_eq!(at, [4, 7], "{p:?}");
        assert!(p[0].message.contains("NOPE"));
        assert!(p[1].message.contains("bogus"));
    }

    #[test]
    fn problems_print_as_file_line_column() {
        let shown = Problems {
            file: "tunnels.yaml".into(),
            problems: vec![Problem::at(3, Some(5), "unknown field `x`"), Problem::at(9, None, "empty")],
        }
        .to_string();
        assert_eq!(
            shown,
            "tunnels.yaml has 2 errors; nothing was changed\n  tunnels.yaml:3:5: unknown field `x`\n  tunnels.yaml:9: empty"
        );
    }
}

//! Per-tunnel traffic policy: the `strait.policy` label (a JSON object)
//! and the path-routing labels, read once when a tunnel is created.
//!
//! Any rstream client can set labels, so the policy travels in one and
//! every agent (the Python and Go SDKs, `strait`) gets the same features.
//! Parsing is strict: an unknown key, a wrong type or a value out of range
//! refuses the tunnel with a message naming the key, and nothing of a
//! refused policy applies. The operator's `edge.default_policy` is merged
//! under each tunnel's ([`Policy::under`]); its `deny_paths` always hold.

use std::collections::BTreeMap;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Method};
use serde::Deserialize;

/// The label holding a tunnel's policy.
pub const POLICY_LABEL: &str = "strait.policy";
/// The label giving a tunnel's path prefix on a shared hostname.
pub const PATH_LABEL: &str = "strait.route.path";
/// The label asking the engine to remove that prefix before forwarding.
pub const STRIP_LABEL: &str = "strait.route.strip";

/// Longest path prefix, glob or header value a policy may carry.
const MAX_TEXT: usize = 1024;
/// Most entries one list of a policy may carry.
const MAX_ENTRIES: usize = 256;

/// A policy, validated.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Policy {
    /// Answered 404 without reaching the agent.
    pub deny_paths: Vec<Glob>,
    /// When set, other methods are answered 405.
    pub allow_methods: Option<Vec<Method>>,
    /// When non-empty, requests need one of these (401 otherwise).
    pub basic_auth: Vec<Credential>,
    pub rate_limit: Option<RateLimit>,
    /// The `Host` the service receives.
    pub host: Option<String>,
    /// `Location`, `Content-Location` and cookie `Domain`s naming `host`
    /// are rewritten back to the public name.
    pub rewrite_location: bool,
    pub request_headers: HeaderRules,
    pub response_headers: HeaderRules,
    /// 413 past this many request body bytes.
    pub max_request_body_bytes: Option<u64>,
    /// How long to wait for the first byte of the response, instead of
    /// the connection's idle limit.
    pub response_timeout: Option<Duration>,
    /// The edge cache for these paths.
    pub cache: Option<CacheRule>,
}

/// What the edge cache keeps for a tunnel.
#[derive(Debug, Clone, PartialEq)]
pub struct CacheRule {
    /// Requests whose path matches one of these may be cached.
    pub paths: Vec<Glob>,
    /// All objects of the hostname together.
    pub max_bytes: u64,
    /// One object; bigger responses pass uncached.
    pub max_object_bytes: u64,
}

impl CacheRule {
    pub fn covers(&self, path: &str) -> bool {
        let path = path.split('?').next().unwrap_or_default();
        self.paths.iter().any(|g| g.matches(path))
    }
}

/// The cache's defaults when a policy names only `paths`.
const CACHE_MAX_BYTES: u64 = 256 << 20;
const CACHE_MAX_OBJECT_BYTES: u64 = 64 << 20;

/// Token bucket per client: `burst` requests at once, refilled at
/// `requests_per_second`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    pub requests_per_second: f64,
    pub burst: u32,
}

/// Headers to set (replacing any the message had) and to remove.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HeaderRules {
    pub set: Vec<(HeaderName, HeaderValue)>,
    pub remove: Vec<HeaderName>,
}

impl HeaderRules {
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.remove.is_empty()
    }

    /// Whether the rules touch a header by this name.
    pub fn touches(&self, name: &str) -> bool {
        self.set.iter().any(|(n, _)| n.as_str().eq_ignore_ascii_case(name))
            || self.remove.iter().any(|n| n.as_str().eq_ignore_ascii_case(name))
    }

    /// Adds the `default` rules for headers these rules leave alone.
    fn under(&mut self, default: &HeaderRules) {
        for (name, value) in &default.set {
            if !self.touches(name.as_str()) {
                self.set.push((name.clone(), value.clone()));
            }
        }
        for name in &default.remove {
            if !self.touches(name.as_str()) {
                self.remove.push(name.clone());
            }
        }
    }

    pub fn apply(&self, headers: &mut http::HeaderMap) {
        for name in &self.remove {
            headers.remove(name);
        }
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
    }
}

/// One `user:hash` entry of `basic_auth`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credential {
    pub user: String,
    pub hash: PasswordHash,
}

/// A password hash as common tools write it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PasswordHash {
    /// `$2a$`, `$2b$` or `$2y$` (`htpasswd -B`).
    Bcrypt(String),
    /// `$argon2id$...` in the PHC string format (`argon2 -id -e`).
    Argon2id(String),
}

impl PasswordHash {
    fn parse(hash: &str) -> Result<Self, String> {
        if ["$2a$", "$2b$", "$2y$"].iter().any(|p| hash.starts_with(p)) {
            hash.parse::<bcrypt::HashParts>().map_err(|e| format!("not a bcrypt hash: {e}"))?;
            Ok(PasswordHash::Bcrypt(hash.to_string()))
        } else if hash.starts_with("$argon2id$") {
            argon2::PasswordHash::new(hash).map_err(|e| format!("not an argon2id hash: {e}"))?;
            Ok(PasswordHash::Argon2id(hash.to_string()))
        } else {
            Err("the hash must be bcrypt ($2y$..., htpasswd -B) or argon2id ($argon2id$...)".into())
        }
    }

    /// Checks a password. Slow by design (tens of milliseconds): callers
    /// run it off the async threads and remember what verified.
    pub fn verify(&self, password: &str) -> bool {
        match self {
            PasswordHash::Bcrypt(hash) => bcrypt::verify(password, hash).unwrap_or(false),
            PasswordHash::Argon2id(hash) => {
                use argon2::PasswordVerifier;
                argon2::PasswordHash::new(hash)
                    .is_ok_and(|parsed| argon2::Argon2::default().verify_password(password.as_bytes(), &parsed).is_ok())
            }
        }
    }
}

/// A path pattern: `*` stands for any run of characters (`/` too), `?` for
/// one character; everything else matches itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Glob(String);

impl Glob {
    /// A pattern, checked as a policy's are.
    pub fn new(pattern: &str) -> Result<Self, String> {
        Glob::parse(pattern)
    }

    fn parse(pattern: &str) -> Result<Self, String> {
        if !pattern.starts_with('/') && !pattern.starts_with('*') {
            return Err(format!("{pattern:?} must start with / or *"));
        }
        Ok(Glob(pattern.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn matches(&self, path: &str) -> bool {
        wildcard(self.0.as_bytes(), path.as_bytes())
    }
}

/// Iterative wildcard match with one backtrack point: linear in practice,
/// quadratic at worst, never exponential.
fn wildcard(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some(b'*') => {
                star = Some((p, t));
                p += 1;
            }
            Some(&c) if c == b'?' || c == text[t] => {
                p += 1;
                t += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    p = sp + 1;
                    t = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

/// The path a pattern is matched against: percent-decoded, dot segments
/// resolved, repeated slashes merged, so `/a/../internal/x`,
/// `//internal/x` and `/%69nternal/x` all meet `/internal/*`. (The
/// service may read a path either way; a deny holds for both.)
pub fn canonical_path(path: &str) -> std::borrow::Cow<'_, str> {
    let path = path.split(['?', '#']).next().unwrap_or_default();
    // Most paths are canonical already: nothing to decode, no empty or dot
    // segment. They are matched as they are, with no copy per request.
    if path.starts_with('/') && !path.contains('%') && !path.contains("//") && !path.contains("/.") {
        return path.into();
    }
    let decoded = percent_decode(path, false);
    let mut segments: Vec<&str> = Vec::new();
    for segment in decoded.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let mut out = String::with_capacity(decoded.len() + 1);
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if out.is_empty() || decoded.ends_with('/') || decoded.ends_with("/.") || decoded.ends_with("/..") {
        out.push('/');
    }
    out.into()
}

/// Decodes `%XX` escapes (a malformed one stays as it is); `+` is a space
/// only in a query (`plus_is_space`), never in a path.
pub fn percent_decode(input: &str, plus_is_space: bool) -> String {
    let bytes = input.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |at: usize| bytes.get(at).and_then(|&b| (b as char).to_digit(16));
        match bytes[i] {
            b'%' if let (Some(h), Some(l)) = (hex(i + 1), hex(i + 2)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
            b'+' if plus_is_space => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The wire form, strictly typed: serde names an unknown key or a wrong
/// type itself.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "an object of policy keys")]
struct Raw {
    deny_paths: Option<Vec<String>>,
    allow_methods: Option<Vec<String>>,
    basic_auth: Option<Vec<String>>,
    rate_limit: Option<RawRateLimit>,
    host: Option<String>,
    rewrite_location: Option<bool>,
    request_headers: Option<RawHeaderRules>,
    response_headers: Option<RawHeaderRules>,
    max_request_body_bytes: Option<u64>,
    response_timeout_seconds: Option<u64>,
    cache: Option<RawCache>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "an object with paths, max_bytes and max_object_bytes")]
struct RawCache {
    paths: Vec<String>,
    max_bytes: Option<u64>,
    max_object_bytes: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "an object with requests_per_second and burst")]
struct RawRateLimit {
    requests_per_second: f64,
    burst: Option<u32>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, expecting = "an object with set and remove")]
struct RawHeaderRules {
    #[serde(default)]
    set: BTreeMap<String, String>,
    #[serde(default)]
    remove: Vec<String>,
}

/// Headers a policy may not set or remove: they frame the message or the
/// connection, and changing them would desynchronise the two ends.
const FRAMING: [&str; 9] = [
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "upgrade",
    "te",
    "trailer",
    "proxy-connection",
];

fn header_rules(key: &str, raw: RawHeaderRules) -> Result<HeaderRules, String> {
    if raw.set.len() + raw.remove.len() > MAX_ENTRIES {
        return Err(format!("{key}: at most {MAX_ENTRIES} rules"));
    }
    let name = |n: &str| -> Result<HeaderName, String> {
        let parsed = HeaderName::try_from(n).map_err(|_| format!("{key}: {n:?} is not a header name"))?;
        if FRAMING.contains(&parsed.as_str()) {
            return Err(format!("{key}: {n} frames the message and cannot be changed (use host for Host)"));
        }
        Ok(parsed)
    };
    let mut rules = HeaderRules::default();
    for (n, v) in raw.set {
        if v.len() > MAX_TEXT {
            return Err(format!("{key}: the value of {n} is longer than {MAX_TEXT} bytes"));
        }
        let value =
            HeaderValue::try_from(v.as_str()).map_err(|_| format!("{key}: the value of {n} is not a header value"))?;
        rules.set.push((name(&n)?, value));
    }
    for n in raw.remove {
        rules.remove.push(name(&n)?);
    }
    Ok(rules)
}

fn list(key: &str, values: Option<Vec<String>>) -> Result<Vec<String>, String> {
    let values = values.unwrap_or_default();
    if values.len() > MAX_ENTRIES {
        return Err(format!("{key}: at most {MAX_ENTRIES} entries"));
    }
    if let Some(long) = values.iter().find(|v| v.len() > MAX_TEXT) {
        return Err(format!("{key}: an entry is longer than {MAX_TEXT} bytes ({} bytes)", long.len()));
    }
    Ok(values)
}

impl Policy {
    /// Parses a policy's JSON text. The error names the key and why.
    pub fn parse(json: &str) -> Result<Policy, String> {
        let value: serde_json::Value = serde_json::from_str(json).map_err(|e| format!("not JSON: {e}"))?;
        Policy::from_value(value)
    }

    /// Reads a policy given as a structure (the engine config's
    /// `edge.default_policy`).
    pub fn from_value(value: serde_json::Value) -> Result<Policy, String> {
        if !value.is_object() {
            return Err("must be an object of policy keys".into());
        }
        // The path of a type error names the key ("rate_limit.burst: ...").
        let raw: Raw = serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            let error = e.into_inner();
            if path == "." { error.to_string() } else { format!("{path}: {error}") }
        })?;
        Policy::from_raw(raw)
    }

    fn from_raw(raw: Raw) -> Result<Policy, String> {
        let mut policy = Policy::default();
        for pattern in list("deny_paths", raw.deny_paths)? {
            policy.deny_paths.push(Glob::parse(&pattern).map_err(|e| format!("deny_paths: {e}"))?);
        }
        if let Some(methods) = raw.allow_methods {
            let methods = list("allow_methods", Some(methods))?;
            if methods.is_empty() {
                return Err("allow_methods: an empty list would refuse every request".into());
            }
            let mut parsed = Vec::new();
            for m in methods {
                let upper = m.to_ascii_uppercase();
                let method = Method::from_bytes(upper.as_bytes())
                    .map_err(|_| format!("allow_methods: {m:?} is not an HTTP method"))?;
                parsed.push(method);
            }
            policy.allow_methods = Some(parsed);
        }
        for entry in list("basic_auth", raw.basic_auth)? {
            let (user, hash) =
                entry.split_once(':').ok_or("basic_auth: each entry is user:hash (htpasswd -B or argon2id)")?;
            if user.is_empty() {
                return Err("basic_auth: an entry has an empty user".into());
            }
            let hash = PasswordHash::parse(hash).map_err(|e| format!("basic_auth: user {user}: {e}"))?;
            policy.basic_auth.push(Credential { user: user.to_string(), hash });
        }
        if let Some(limit) = raw.rate_limit {
            let rate = limit.requests_per_second;
            if !(rate.is_finite() && rate > 0.0 && rate <= 1_000_000.0) {
                return Err("rate_limit: requests_per_second must be above 0 and at most 1000000".into());
            }
            let burst = limit.burst.unwrap_or_else(|| rate.ceil() as u32);
            if burst == 0 {
                return Err("rate_limit: burst must be at least 1".into());
            }
            policy.rate_limit = Some(RateLimit { requests_per_second: rate, burst });
        }
        if let Some(host) = raw.host {
            let valid = !host.is_empty()
                && host.len() <= 255
                && host.parse::<http::uri::Authority>().is_ok_and(|a| a.as_str() == host && !host.contains('@'));
            if !valid {
                return Err(format!("host: {host:?} is not a host name (with an optional :port)"));
            }
            policy.host = Some(host);
        }
        policy.rewrite_location = raw.rewrite_location.unwrap_or(false);
        if policy.rewrite_location && policy.host.is_none() {
            return Err("rewrite_location: needs host (the upstream name to rewrite back)".into());
        }
        if let Some(rules) = raw.request_headers {
            policy.request_headers = header_rules("request_headers", rules)?;
        }
        if let Some(rules) = raw.response_headers {
            policy.response_headers = header_rules("response_headers", rules)?;
        }
        policy.max_request_body_bytes = raw.max_request_body_bytes;
        if let Some(seconds) = raw.response_timeout_seconds {
            if !(1..=86_400).contains(&seconds) {
                return Err("response_timeout_seconds: must be 1 to 86400".into());
            }
            policy.response_timeout = Some(Duration::from_secs(seconds));
        }
        if let Some(cache) = raw.cache {
            let paths = list("cache.paths", Some(cache.paths))?;
            if paths.is_empty() {
                return Err("cache.paths: name at least one path glob".into());
            }
            let paths = paths
                .iter()
                .map(|p| Glob::parse(p).map_err(|e| format!("cache.paths: {e}")))
                .collect::<Result<Vec<_>, _>>()?;
            let max_bytes = cache.max_bytes.unwrap_or(CACHE_MAX_BYTES);
            let max_object_bytes = cache.max_object_bytes.unwrap_or(CACHE_MAX_OBJECT_BYTES.min(max_bytes));
            if max_bytes == 0 || max_object_bytes == 0 {
                return Err("cache: max_bytes and max_object_bytes must be above 0".into());
            }
            if max_object_bytes > max_bytes {
                return Err(format!(
                    "cache.max_object_bytes ({max_object_bytes}) is above cache.max_bytes ({max_bytes})"
                ));
            }
            policy.cache = Some(CacheRule { paths, max_bytes, max_object_bytes });
        }
        Ok(policy)
    }

    /// This policy over the operator's `default`: the tunnel's keys win,
    /// except that the operator's denied paths stay denied.
    pub fn under(mut self, default: &Policy) -> Policy {
        let mut deny = default.deny_paths.clone();
        deny.extend(self.deny_paths.into_iter().filter(|g| !default.deny_paths.contains(g)));
        self.deny_paths = deny;
        if self.allow_methods.is_none() {
            self.allow_methods = default.allow_methods.clone();
        }
        if self.basic_auth.is_empty() {
            self.basic_auth = default.basic_auth.clone();
        }
        self.rate_limit = self.rate_limit.or(default.rate_limit);
        if self.host.is_none() {
            self.host = default.host.clone();
            self.rewrite_location |= default.rewrite_location;
        }
        self.request_headers.under(&default.request_headers);
        self.response_headers.under(&default.response_headers);
        self.max_request_body_bytes = self.max_request_body_bytes.or(default.max_request_body_bytes);
        self.response_timeout = self.response_timeout.or(default.response_timeout);
        if self.cache.is_none() {
            self.cache = default.cache.clone();
        }
        self
    }

    /// Whether the policy asks nothing of a request. Asked per request:
    /// the fields are looked at in place (the destructuring names every
    /// one, so a new field cannot be forgotten here).
    pub fn is_empty(&self) -> bool {
        let Policy {
            deny_paths,
            allow_methods,
            basic_auth,
            rate_limit,
            host,
            rewrite_location,
            request_headers,
            response_headers,
            max_request_body_bytes,
            response_timeout,
            cache,
        } = self;
        deny_paths.is_empty()
            && allow_methods.is_none()
            && basic_auth.is_empty()
            && rate_limit.is_none()
            && host.is_none()
            && !rewrite_location
            && request_headers.is_empty()
            && response_headers.is_empty()
            && max_request_body_bytes.is_none()
            && response_timeout.is_none()
            && cache.is_none()
    }

    /// The denied pattern `path` meets, if any.
    pub fn denies(&self, path: &str) -> Option<&Glob> {
        if self.deny_paths.is_empty() {
            return None;
        }
        let raw = path.split(['?', '#']).next().unwrap_or_default();
        let canonical = canonical_path(raw);
        let differs = *canonical != *raw;
        self.deny_paths.iter().find(|g| g.matches(raw) || (differs && g.matches(&canonical)))
    }

    /// Whether `method` may pass.
    pub fn allows_method(&self, method: &str) -> bool {
        self.allow_methods.as_ref().is_none_or(|allowed| allowed.iter().any(|m| m.as_str() == method))
    }
}

/// Where a tunnel sits on its hostname.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PathRoute {
    /// The prefix it serves (`/api/`); `None` is the hostname's fallback.
    pub prefix: Option<String>,
    /// Remove the prefix before forwarding.
    pub strip: bool,
}

impl PathRoute {
    /// Reads the routing labels.
    pub fn of_labels(labels: &std::collections::HashMap<String, String>) -> Result<PathRoute, String> {
        let strip = match labels.get(STRIP_LABEL).map(|v| v.trim().to_ascii_lowercase()) {
            None => false,
            Some(v) if v == "true" || v == "1" || v == "yes" => true,
            Some(v) if v == "false" || v == "0" || v == "no" || v.is_empty() => false,
            Some(v) => return Err(format!("{STRIP_LABEL}: {v:?} is not true or false")),
        };
        let Some(prefix) = labels.get(PATH_LABEL) else {
            if strip {
                return Err(format!("{STRIP_LABEL} needs {PATH_LABEL}"));
            }
            return Ok(PathRoute::default());
        };
        if !prefix.starts_with('/') {
            return Err(format!("{PATH_LABEL}: {prefix:?} must start with /"));
        }
        if prefix.len() > MAX_TEXT {
            return Err(format!("{PATH_LABEL}: longer than {MAX_TEXT} bytes"));
        }
        let bad = |c: char| c.is_ascii_control() || c == ' ' || c == '?' || c == '#' || c == '*' || c == '%';
        if prefix.chars().any(bad) {
            return Err(format!("{PATH_LABEL}: {prefix:?} must be a plain path (no spaces, ?, #, *, %)"));
        }
        let canonical = canonical_path(prefix);
        if canonical != *prefix {
            return Err(format!("{PATH_LABEL}: {prefix:?} must be a plain path (no empty, . or .. segments)"));
        }
        if prefix == "/" {
            // `/` matches everything: that is the fallback.
            return Ok(PathRoute { prefix: None, strip: false });
        }
        Ok(PathRoute { prefix: Some(prefix.clone()), strip })
    }

    /// Whether `path` (the request's, query included) falls under the
    /// prefix: `/api/` takes `/api/x`; `/api` takes `/api`, `/api/x` and
    /// `/api?q`, not `/apix`.
    pub fn matches(&self, path: &str) -> bool {
        match &self.prefix {
            None => true,
            Some(prefix) => {
                let Some(rest) = path.strip_prefix(prefix.as_str()) else { return false };
                prefix.ends_with('/') || rest.is_empty() || rest.starts_with(['/', '?'])
            }
        }
    }

    /// The path the service receives: the prefix removed when asked (the
    /// rest, query included, byte for byte; never empty).
    pub fn upstream_path<'p>(&self, path: &'p str) -> std::borrow::Cow<'p, str> {
        match (&self.prefix, self.strip) {
            (Some(prefix), true) => {
                let prefix = prefix.trim_end_matches('/');
                let rest = path.strip_prefix(prefix).unwrap_or(path);
                if rest.starts_with('/') { rest.into() } else { format!("/{rest}").into() }
            }
            _ => path.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> std::collections::HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn globs() {
        let g = Glob::parse("/internal/*").unwrap();
        assert!(g.matches("/internal/a/b"));
        assert!(g.matches("/internal/"));
        assert!(!g.matches("/internal"));
        assert!(!g.matches("/x/internal/a"));
        assert!(Glob::parse("/metrics").unwrap().matches("/metrics"));
        assert!(!Glob::parse("/metrics").unwrap().matches("/metrics2"));
        assert!(Glob::parse("*.php").unwrap().matches("/a/b.php"));
        assert!(Glob::parse("/a?c").unwrap().matches("/abc"));
        assert!(Glob::parse("relative").is_err());
        // Many stars on a long miss end quickly.
        let g = Glob::parse(&"/*a".repeat(50)).unwrap();
        assert!(!g.matches(&"/".repeat(1000)));
    }

    #[test]
    fn a_policy_is_empty_only_without_any_key() {
        assert!(Policy::default().is_empty());
        assert!(Policy::parse("{}").unwrap().is_empty());
        for one in [
            r#"{"deny_paths": ["/x"]}"#,
            r#"{"allow_methods": ["GET"]}"#,
            r#"{"basic_auth": ["u:$2y$10$abcdefghijklmnopqrstuu5Q6QfG0g1d0k3b4Q4m7Yt5l0Q7h3Xy."]}"#,
            r#"{"rate_limit": {"requests_per_second": 5}}"#,
            r#"{"host": "api.internal"}"#,
            r#"{"host": "a", "rewrite_location": true}"#,
            r#"{"request_headers": {"remove": ["x-a"]}}"#,
            r#"{"response_headers": {"set": {"x-a": "1"}}}"#,
            r#"{"max_request_body_bytes": 10}"#,
            r#"{"response_timeout_seconds": 10}"#,
            r#"{"cache": {"paths": ["/v/*"]}}"#,
        ] {
            let policy = Policy::parse(one).unwrap_or_else(|e| panic!("{one}: {e}"));
            assert!(!policy.is_empty(), "{one}");
        }
    }

    #[test]
    fn denies_hold_for_encoded_and_dotted_paths() {
        let policy = Policy::parse(r#"{"deny_paths": ["/internal/*", "/metrics"]}"#).unwrap();
        for path in ["/internal/x", "/a/../internal/x", "//internal/x", "/%69nternal/x", "/metrics?x=1", "/./metrics"] {
            assert!(policy.denies(path).is_some(), "{path}");
        }
        for path in ["/internals", "/v1/metrics", "/", "/metrics2"] {
            assert!(policy.denies(path).is_none(), "{path}");
        }
    }

    #[test]
    fn canonical_paths() {
        assert_eq!(canonical_path("/a//b/./c/../d"), "/a/b/d");
        assert_eq!(canonical_path("/a/"), "/a/");
        assert_eq!(canonical_path(""), "/");
        assert_eq!(canonical_path("/../../x"), "/x");
        assert_eq!(canonical_path("/a%2Fb"), "/a/b");
        assert_eq!(canonical_path("/%zz"), "/%zz");
        assert_eq!(canonical_path("/a%"), "/a%");
    }

    #[test]
    fn every_key_parses() {
        let hash = bcrypt::hash("secret", 4).unwrap();
        let json = serde_json::json!({
            "deny_paths": ["/internal/*", "/metrics"],
            "allow_methods": ["get", "POST"],
            "basic_auth": [format!("ann:{hash}")],
            "rate_limit": {"requests_per_second": 50, "burst": 100},
            "host": "api.internal:8080",
            "rewrite_location": true,
            "request_headers": {"set": {"x-a": "1"}, "remove": ["x-b"]},
            "response_headers": {"set": {"x-c": "2"}, "remove": ["server"]},
            "max_request_body_bytes": 1000,
            "response_timeout_seconds": 120,
            "cache": {"paths": ["/v/*"], "max_bytes": 1000}
        });
        let p = Policy::parse(&json.to_string()).unwrap();
        assert_eq!(p.deny_paths.len(), 2);
        assert_eq!(p.allow_methods, Some(vec![Method::GET, Method::POST]));
        assert!(p.basic_auth[0].hash.verify("secret"));
        assert!(!p.basic_auth[0].hash.verify("wrong"));
        assert_eq!(p.rate_limit, Some(RateLimit { requests_per_second: 50.0, burst: 100 }));
        assert_eq!(p.host.as_deref(), Some("api.internal:8080"));
        assert!(p.rewrite_location);
        assert_eq!(p.request_headers.set[0].0, "x-a");
        assert_eq!(p.response_headers.remove[0], "server");
        assert_eq!(p.max_request_body_bytes, Some(1000));
        assert_eq!(p.response_timeout, Some(Duration::from_secs(120)));
        let cache = p.cache.unwrap();
        assert!(cache.covers("/v/a?x") && !cache.covers("/w"));
        assert_eq!((cache.max_bytes, cache.max_object_bytes), (1000, 1000));
        assert!(Policy::parse("{}").unwrap().is_empty());
    }

    #[test]
    fn argon2id_hashes_verify() {
        use argon2::PasswordHasher;
        let hash = argon2::Argon2::default().hash_password_with_salt(b"pw", b"somesaltsomesalt").unwrap().to_string();
        let p = Policy::parse(&serde_json::json!({"basic_auth": [format!("bob:{hash}")]}).to_string()).unwrap();
        assert!(p.basic_auth[0].hash.verify("pw"));
        assert!(!p.basic_auth[0].hash.verify("px"));
    }

    #[test]
    fn bad_values_name_their_key() {
        let cases = [
            (r#"{"deny_path": []}"#, "unknown field `deny_path`"),
            (r#"{"deny_paths": "/x"}"#, "deny_paths: invalid type"),
            (r#"{"deny_paths": ["x"]}"#, "deny_paths"),
            (r#"{"allow_methods": []}"#, "allow_methods"),
            (r#"{"allow_methods": ["GE T"]}"#, "allow_methods"),
            (r#"{"basic_auth": ["ann"]}"#, "basic_auth"),
            (r#"{"basic_auth": ["ann:plain"]}"#, "basic_auth: user ann"),
            (r#"{"basic_auth": ["ann:$2y$10$short"]}"#, "bcrypt"),
            (r#"{"rate_limit": {"requests_per_second": 0}}"#, "rate_limit"),
            (r#"{"rate_limit": {"requests_per_second": 5, "burst": 0}}"#, "burst"),
            (r#"{"rate_limit": {"rps": 5}}"#, "unknown field `rps`"),
            (r#"{"host": "a b"}"#, "host"),
            (r#"{"host": "u@h"}"#, "host"),
            (r#"{"rewrite_location": true}"#, "rewrite_location"),
            (r#"{"request_headers": {"set": {"content-length": "1"}}}"#, "request_headers"),
            (r#"{"response_headers": {"set": {"x": "a\nb"}}}"#, "response_headers"),
            (r#"{"request_headers": {"add": {}}}"#, "unknown field `add`"),
            (r#"{"max_request_body_bytes": -1}"#, "max_request_body_bytes: invalid value"),
            (r#"{"rate_limit": 5}"#, "rate_limit: invalid type: integer `5`, expected an object with"),
            (r#"{"rate_limit": {"requests_per_second": "fast"}}"#, "rate_limit.requests_per_second: invalid type"),
            (r#"{"deny_paths": [1]}"#, "deny_paths[0]: invalid type"),
            (r#"{"rewrite_location": "yes"}"#, "rewrite_location: invalid type"),
            (r#"{"host": 5}"#, "host: invalid type"),
            (r#"{"response_timeout_seconds": 0}"#, "response_timeout_seconds"),
            (r#"{"cache": {"paths": []}}"#, "cache.paths"),
            (r#"{"cache": {"paths": ["v/*"]}}"#, "cache.paths"),
            (r#"{"cache": {"paths": ["/v/*"], "max_bytes": 10, "max_object_bytes": 11}}"#, "max_object_bytes"),
            (r#"{"cache": {"paths": ["/v/*"], "ttl": 1}}"#, "unknown field `ttl`"),
            ("[]", "must be an object"),
            ("not json", "expected ident"),
        ];
        for (json, expected) in cases {
            let error = Policy::parse(json).unwrap_err();
            assert!(error.contains(expected), "{json}: {error}");
        }
    }

    #[test]
    fn operator_denies_stay_denied() {
        let default = Policy::parse(r#"{"deny_paths": ["/metrics"], "response_headers": {"set": {"x-edge": "1"}}, "max_request_body_bytes": 10}"#).unwrap();
        let tunnel =
            Policy::parse(r#"{"deny_paths": ["/internal/*"], "max_request_body_bytes": 99}"#).unwrap().under(&default);
        assert!(tunnel.denies("/metrics").is_some());
        assert!(tunnel.denies("/internal/a").is_some());
        assert_eq!(tunnel.max_request_body_bytes, Some(99));
        assert_eq!(tunnel.response_headers.set.len(), 1);
        let plain = Policy::default().under(&default);
        assert_eq!(plain.max_request_body_bytes, Some(10));
    }

    #[test]
    fn path_routes() {
        let api = PathRoute::of_labels(&labels(&[(PATH_LABEL, "/api/"), (STRIP_LABEL, "true")])).unwrap();
        assert!(api.matches("/api/x?q=1"));
        assert!(!api.matches("/api"));
        assert!(!api.matches("/apix"));
        assert_eq!(api.upstream_path("/api/x?q=%2F"), "/x?q=%2F");
        assert_eq!(api.upstream_path("/api/"), "/");
        let bare = PathRoute::of_labels(&labels(&[(PATH_LABEL, "/api"), (STRIP_LABEL, "true")])).unwrap();
        assert!(bare.matches("/api") && bare.matches("/api/x") && bare.matches("/api?q") && !bare.matches("/apix"));
        assert_eq!(bare.upstream_path("/api?q"), "/?q");
        assert_eq!(bare.upstream_path("/api/v/1"), "/v/1");
        let kept = PathRoute::of_labels(&labels(&[(PATH_LABEL, "/rtc/")])).unwrap();
        assert_eq!(kept.upstream_path("/rtc/whip"), "/rtc/whip");
        assert_eq!(PathRoute::of_labels(&labels(&[])).unwrap(), PathRoute::default());
        assert_eq!(PathRoute::of_labels(&labels(&[(PATH_LABEL, "/")])).unwrap(), PathRoute::default());
        for bad in ["api/", "/a b", "/a/../b", "/a//b", "/a*", "/%61"] {
            assert!(PathRoute::of_labels(&labels(&[(PATH_LABEL, bad)])).is_err(), "{bad}");
        }
        assert!(PathRoute::of_labels(&labels(&[(STRIP_LABEL, "true")])).is_err());
        assert!(PathRoute::of_labels(&labels(&[(PATH_LABEL, "/a/"), (STRIP_LABEL, "maybe")])).is_err());
    }
}

//! Path routing and traffic policy from the command line: the flags of
//! `strait forward` that become the engine's reserved labels
//! (`strait.route.path`, `strait.route.strip`, `strait.policy`), so any
//! engine feature an SDK reaches through labels is one flag away here.

use std::path::PathBuf;

use anyhow::{Context as _, bail};
use serde_json::{Map, Value};

pub const PATH_LABEL: &str = "strait.route.path";
pub const STRIP_LABEL: &str = "strait.route.strip";
pub const POLICY_LABEL: &str = "strait.policy";

/// bcrypt's work factor for `--basic-auth`: the engine verifies a proof
/// once per client and then remembers it, so a slow hash costs little.
const BCRYPT_COST: u32 = 10;

#[derive(Debug, Clone, Default, clap::Args)]
pub struct RouteOptions {
    /// Serve only this path prefix of the hostname (e.g. /api/); other
    /// tunnels of yours may take other prefixes of the same hostname.
    #[arg(long, value_name = "PREFIX")]
    pub path: Option<String>,
    /// Remove the --path prefix before the request reaches the service.
    #[arg(long, requires = "path")]
    pub strip_path: bool,
    /// Answer 404 for paths matching this glob (`*` any run, `?` one
    /// character), repeatable.
    #[arg(long = "deny-path", value_name = "GLOB")]
    pub deny_paths: Vec<String>,
    /// Let only these methods through (others get 405), repeatable.
    #[arg(long = "allow-method", value_name = "METHOD")]
    pub allow_methods: Vec<String>,
    /// Require HTTP basic auth, USER:PASSWORD, repeatable; the password is
    /// sent to the engine as a bcrypt hash, never in clear.
    #[arg(long = "basic-auth", value_name = "USER:PASSWORD")]
    pub basic_auth: Vec<String>,
    /// Requests per client address: N/s or N/m, optionally :BURST
    /// (e.g. 100/s or 100/s:200); past it, 429.
    #[arg(long, value_name = "RATE")]
    pub rate_limit: Option<String>,
    /// The Host the service receives; redirects and cookies naming it are
    /// pointed back at the public hostname.
    #[arg(long, value_name = "HOST")]
    pub upstream_host: Option<String>,
    /// Refuse request bodies larger than this many bytes (413).
    #[arg(long, value_name = "BYTES")]
    pub max_body: Option<u64>,
    /// Wait this long for the service's answer, however quiet the
    /// connection (long polls).
    #[arg(long, value_name = "SECONDS")]
    pub response_timeout: Option<u64>,
    /// Cache GET answers of paths matching this glob at the engine (as
    /// HTTP caching allows), repeatable.
    #[arg(long = "cache", value_name = "GLOB")]
    pub cache: Vec<String>,
    /// A policy file (YAML or JSON, the keys of strait.policy); the flags
    /// above add to it.
    #[arg(long, value_name = "FILE")]
    pub policy: Option<PathBuf>,
}

impl RouteOptions {
    /// The labels these options stand for.
    pub fn labels(&self) -> anyhow::Result<Vec<(String, String)>> {
        let mut labels = Vec::new();
        if let Some(path) = &self.path {
            labels.push((PATH_LABEL.to_string(), path.clone()));
        }
        if self.strip_path {
            labels.push((STRIP_LABEL.to_string(), "true".to_string()));
        }
        let policy = self.policy()?;
        if !policy.is_empty() {
            labels.push((POLICY_LABEL.to_string(), Value::Object(policy).to_string()));
        }
        Ok(labels)
    }

    fn policy(&self) -> anyhow::Result<Map<String, Value>> {
        let mut policy = match &self.policy {
            Some(file) => read_policy(file)?,
            None => Map::new(),
        };
        let mut append = |key: &str, values: Vec<Value>| {
            if values.is_empty() {
                return Ok(());
            }
            match policy.entry(key).or_insert_with(|| Value::Array(Vec::new())) {
                Value::Array(list) => {
                    list.extend(values);
                    Ok(())
                }
                _ => bail!("the policy file's {key} is not a list"),
            }
        };
        append("deny_paths", self.deny_paths.iter().cloned().map(Value::String).collect())?;
        append("allow_methods", self.allow_methods.iter().cloned().map(Value::String).collect())?;
        let mut hashed = Vec::new();
        for entry in &self.basic_auth {
            let (user, password) =
                entry.split_once(':').with_context(|| format!("--basic-auth {entry:?} is not USER:PASSWORD"))?;
            if user.is_empty() || password.is_empty() {
                bail!("--basic-auth needs a user and a password (USER:PASSWORD)");
            }
            let hash = bcrypt::hash(password, BCRYPT_COST).context("hashing the --basic-auth password")?;
            hashed.push(Value::String(format!("{user}:{hash}")));
        }
        append("basic_auth", hashed)?;
        if let Some(rate) = &self.rate_limit {
            let (per_second, burst) = parse_rate(rate)?;
            let mut limit = Map::new();
            limit.insert("requests_per_second".into(), per_second.into());
            if let Some(burst) = burst {
                limit.insert("burst".into(), burst.into());
            }
            policy.insert("rate_limit".into(), Value::Object(limit));
        }
        if let Some(host) = &self.upstream_host {
            policy.insert("host".into(), host.clone().into());
            policy.insert("rewrite_location".into(), true.into());
        }
        if let Some(bytes) = self.max_body {
            policy.insert("max_request_body_bytes".into(), bytes.into());
        }
        if let Some(seconds) = self.response_timeout {
            policy.insert("response_timeout_seconds".into(), seconds.into());
        }
        if !self.cache.is_empty() {
            let cache = policy.entry("cache").or_insert_with(|| Value::Object(Map::new()));
            let Value::Object(cache) = cache else { bail!("the policy file's cache is not a mapping") };
            match cache.entry("paths").or_insert_with(|| Value::Array(Vec::new())) {
                Value::Array(paths) => paths.extend(self.cache.iter().cloned().map(Value::String)),
                _ => bail!("the policy file's cache.paths is not a list"),
            }
        }
        Ok(policy)
    }
}

/// Reads a policy file: JSON, or YAML (a superset of it).
pub fn read_policy(file: &std::path::Path) -> anyhow::Result<Map<String, Value>> {
    let text = std::fs::read_to_string(file).with_context(|| format!("reading the policy file {}", file.display()))?;
    let value: Value = serde_saphyr::from_str(&text)
        .map_err(|e| anyhow::anyhow!("the policy file {} is not YAML or JSON: {e}", file.display()))?;
    match value {
        Value::Object(map) => Ok(map),
        Value::Null => Ok(Map::new()),
        _ => bail!("the policy file {} must hold a mapping of policy keys", file.display()),
    }
}

/// `100/s`, `6000/m`, `100/s:200`: requests per second and the burst.
fn parse_rate(text: &str) -> anyhow::Result<(f64, Option<u32>)> {
    let bad = || anyhow::anyhow!("--rate-limit {text:?} is not N/s or N/m, optionally :BURST (e.g. 100/s:200)");
    let (rate, burst) = match text.split_once(':') {
        Some((rate, burst)) => (rate, Some(burst.trim().parse::<u32>().map_err(|_| bad())?)),
        None => (text, None),
    };
    let (count, unit) = rate.split_once('/').ok_or_else(bad)?;
    let count: f64 = count.trim().parse().map_err(|_| bad())?;
    let per_second = match unit.trim() {
        "s" | "sec" | "second" => count,
        "m" | "min" | "minute" => count / 60.0,
        _ => return Err(bad()),
    };
    if !(per_second.is_finite() && per_second > 0.0) {
        return Err(bad());
    }
    Ok((per_second, burst))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates() {
        assert_eq!(parse_rate("100/s").unwrap(), (100.0, None));
        assert_eq!(parse_rate("120/m:5").unwrap(), (2.0, Some(5)));
        for bad in ["100", "x/s", "0/s", "10/h", "10/s:x", "-1/s"] {
            assert!(parse_rate(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn flags_add_to_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("policy.yaml");
        std::fs::write(&file, "deny_paths: [/metrics]\nrequest_headers:\n  set: {x-env: prod}\n").unwrap();
        let options = RouteOptions {
            path: Some("/api/".into()),
            strip_path: true,
            deny_paths: vec!["/internal/*".into()],
            basic_auth: vec!["ann:s3cret".into()],
            rate_limit: Some("50/s:100".into()),
            upstream_host: Some("api.internal".into()),
            cache: vec!["/v/*".into()],
            policy: Some(file),
            ..Default::default()
        };
        let labels = options.labels().unwrap();
        assert_eq!(labels[0], (PATH_LABEL.to_string(), "/api/".to_string()));
        assert_eq!(labels[1], (STRIP_LABEL.to_string(), "true".to_string()));
        let policy: Value = serde_json::from_str(&labels[2].1).unwrap();
        assert_eq!(policy["deny_paths"], serde_json::json!(["/metrics", "/internal/*"]));
        assert_eq!(policy["request_headers"]["set"]["x-env"], "prod");
        assert_eq!(policy["rate_limit"], serde_json::json!({"requests_per_second": 50.0, "burst": 100}));
        assert_eq!(policy["host"], "api.internal");
        assert_eq!(policy["rewrite_location"], true);
        assert_eq!(policy["cache"], serde_json::json!({"paths": ["/v/*"]}));
        let hash = policy["basic_auth"][0].as_str().unwrap().strip_prefix("ann:").unwrap();
        assert!(bcrypt::verify("s3cret", hash).unwrap());
        assert!(RouteOptions::default().labels().unwrap().is_empty());
        let bad = RouteOptions { basic_auth: vec!["nopassword".into()], ..Default::default() };
        assert!(bad.labels().is_err());
    }
}

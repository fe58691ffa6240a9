//! The one routing and policy decision for published HTTP requests.
//!
//! The HTTP/1.1 relay and the hyper path both hand a request head to
//! [`decide`] and get back either the tunnel and what to change on the
//! way (the request target, the consumed `Authorization`), or the refusal
//! to answer with. They differ only in how they carry bytes: what a
//! request may do is decided here, once (`../shared/DESIGN.md` section 1).
//!
//! In order: the tunnel for the hostname and path (longest prefix, else
//! the fallback), `trusted_ips`, the policy's methods, denied paths, rate
//! limit and basic auth. The rate limit comes before the password check so
//! that guessing costs the guesser its budget, not the engine its CPU.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use tokio::time::Instant;

use super::errors::Refusal;
use crate::Shared;
use crate::admission::{Bucket, Source};
use crate::policy::Policy;
use crate::registry::{Lookup, Tunnel};

/// What the decision reads of a request.
pub struct Head<'a> {
    /// The published hostname it is for.
    pub host: &'a str,
    pub method: &'a str,
    /// The request target in origin form: path and query as sent.
    pub target: &'a str,
    /// The first `Authorization` header, if any.
    pub authorization: Option<&'a str>,
    pub source: IpAddr,
}

/// A request the edge forwards.
pub struct Route {
    pub tunnel: Arc<Tunnel>,
    /// The target the service receives, when the prefix is stripped.
    pub target: Option<String>,
    /// The `Authorization` header was basic auth's proof: not forwarded.
    pub consumed_authorization: bool,
    /// A password still to verify (slow: off the async threads).
    pub pending: Option<Pending>,
}

impl Route {
    pub fn policy(&self) -> &Policy {
        &self.tunnel.spec.policy
    }
}

/// Decides where a request goes, or why it does not.
pub fn decide(shared: &Shared, head: &Head<'_>) -> Result<Route, Refusal> {
    let path = head.target.split('?').next().unwrap_or_default();
    let (tunnel, split) = match shared.registry.route(head.host, path) {
        Lookup::Found(tunnel, split) => (tunnel, split),
        Lookup::NoPath => return Err(Refusal::NoRoute),
        Lookup::Offline => return Err(Refusal::Offline),
        Lookup::Unknown => return Err(Refusal::unrouted(shared, head.host)),
    };
    if tunnel.spec.kind != crate::tunnel::Kind::Http {
        return Err(Refusal::NotHttp(head.host.to_string()));
    }
    if !tunnel.spec.allows(head.source) {
        return Err(Refusal::Forbidden);
    }
    let target = tunnel.spec.route.strip.then(|| tunnel.spec.route.upstream_path(head.target).into_owned());
    let policy = &tunnel.spec.policy;
    // Where the path decides (a split hostname, a policy), `..` would
    // decide one way here and another at the service, which resolves it:
    // such a request is refused rather than guessed at.
    if (split || tunnel.spec.route.prefix.is_some() || !policy.is_empty()) && dot_segments(path) {
        return Err(Refusal::BadRequest("dot segments in the path"));
    }
    if policy.is_empty() {
        return Ok(Route { tunnel, target, consumed_authorization: false, pending: None });
    }
    if !policy.allows_method(head.method) {
        let allowed = policy.allow_methods.iter().flatten().map(|m| m.as_str()).collect::<Vec<_>>().join(", ");
        return Err(Refusal::MethodNotAllowed(allowed));
    }
    if let Some(pattern) = policy.denies(head.target) {
        tracing::debug!(pattern = pattern.as_str(), "path denied by the tunnel's policy");
        return Err(Refusal::Denied);
    }
    let state = state(&tunnel);
    // A token_auth tunnel's requests are counted per token principal, once
    // the token is checked ([`admit_principal`]).
    if !tunnel.spec.token_auth
        && let Some(limit) = &state.limiter
        && let Err(wait) = limit.take(LimitKey::Source(Source::of(head.source)))
    {
        return Err(Refusal::RateLimited(wait));
    }
    let mut route = Route { tunnel: tunnel.clone(), target, consumed_authorization: false, pending: None };
    if !policy.basic_auth.is_empty() {
        let Some(proof) = head.authorization.and_then(basic) else {
            return Err(Refusal::BasicAuth);
        };
        if shared.admission.auth_throttled(head.source) {
            return Err(Refusal::RateLimited(1));
        }
        route.consumed_authorization = true;
        if !state.verified(head.authorization.unwrap_or_default()) {
            route.pending = Some(Pending { tunnel, header: head.authorization.unwrap_or_default().into(), proof });
        }
    }
    Ok(route)
}

/// Whether a path has a `.` or `..` segment, spelled out or
/// percent-encoded.
fn dot_segments(path: &str) -> bool {
    path.split('/').any(is_dot_segment)
}

/// `.` or `..`, each dot spelled out or as `%2e` (no copy: this runs per
/// request).
fn is_dot_segment(segment: &str) -> bool {
    let mut rest = segment.as_bytes();
    let mut dots = 0;
    while !rest.is_empty() {
        if rest[0] == b'.' {
            rest = &rest[1..];
        } else if rest.len() >= 3 && rest[0] == b'%' && rest[1] == b'2' && rest[2].eq_ignore_ascii_case(&b'e') {
            rest = &rest[3..];
        } else {
            return false;
        }
        dots += 1;
    }
    dots == 1 || dots == 2
}

/// The rate limit of a `token_auth` tunnel, for the principal whose token
/// a request carried.
pub fn admit_principal(tunnel: &Tunnel, principal: &str) -> Result<(), Refusal> {
    match &state(tunnel).limiter {
        Some(limit) => limit.take(LimitKey::Principal(principal.to_string())).map_err(Refusal::RateLimited),
        None => Ok(()),
    }
}

/// The user and password of a `Basic` header.
fn basic(value: &str) -> Option<(String, String)> {
    let (scheme, encoded) = value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD.decode(encoded.trim()).ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, password) = text.split_once(':')?;
    Some((user.to_string(), password.to_string()))
}

/// A basic-auth proof not yet verified.
pub struct Pending {
    tunnel: Arc<Tunnel>,
    header: String,
    proof: (String, String),
}

impl Pending {
    /// Checks the password (tens of milliseconds of hashing, on the
    /// blocking pool). A refused one counts against its source as a
    /// refused token does.
    pub async fn verify(self, shared: &Shared, source: IpAddr) -> Result<(), Refusal> {
        let Pending { tunnel, header, proof: (user, password) } = self;
        let credential = tunnel.spec.policy.basic_auth.iter().find(|c| c.user == user).cloned();
        let ok = match credential {
            Some(credential) => {
                tokio::task::spawn_blocking(move || credential.hash.verify(&password)).await.unwrap_or(false)
            }
            None => false,
        };
        if !ok {
            shared.auth_failed(source);
            return Err(Refusal::BasicAuth);
        }
        state(&tunnel).remember(header);
        Ok(())
    }
}

/// A tunnel's policy state: its rate limiter and the proofs that verified.
pub struct PolicyState {
    limiter: Option<Limiter>,
    verified: Mutex<HashSet<String>>,
}

/// Verified `Authorization` values kept per tunnel: enough for every
/// user of a team, few enough that a flood of good proofs stays small.
const VERIFIED_CAP: usize = 1024;

impl std::fmt::Debug for PolicyState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyState").field("rate_limited", &self.limiter.is_some()).finish_non_exhaustive()
    }
}

impl PolicyState {
    fn verified(&self, header: &str) -> bool {
        self.verified.lock().unwrap_or_else(|e| e.into_inner()).contains(header)
    }

    fn remember(&self, header: String) {
        let mut verified = self.verified.lock().unwrap_or_else(|e| e.into_inner());
        if verified.len() >= VERIFIED_CAP {
            verified.clear();
        }
        verified.insert(header);
    }
}

fn state(tunnel: &Tunnel) -> &PolicyState {
    tunnel.policy_state.get_or_init(|| PolicyState {
        limiter: tunnel.spec.policy.rate_limit.map(|l| Limiter {
            per_second: l.requests_per_second,
            burst: f64::from(l.burst),
            buckets: Mutex::new(HashMap::new()),
        }),
        verified: Mutex::new(HashSet::new()),
    })
}

/// Token buckets per client: its source (a host, or an IPv6 /64), or the
/// principal of its token on a `token_auth` tunnel.
struct Limiter {
    per_second: f64,
    burst: f64,
    buckets: Mutex<HashMap<LimitKey, Bucket>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum LimitKey {
    Source(Source),
    Principal(String),
}

/// Sources a limiter tracks before it forgets those back at a full bucket.
const LIMITER_SWEEP: usize = 65_536;

impl Limiter {
    /// Takes one request's token, or says how many seconds until one is
    /// back.
    fn take(&self, source: LimitKey) -> Result<(), u64> {
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() >= LIMITER_SWEEP && !buckets.contains_key(&source) {
            buckets.retain(|_, b| !b.is_full(self.burst, self.per_second, now));
            if buckets.len() >= LIMITER_SWEEP {
                // Every tracked source is mid-burst: a flood of sources.
                // Forgetting them all lets each one burst again, which is
                // no worse than one new source.
                buckets.clear();
            }
        }
        let bucket = buckets.entry(source).or_insert_with(|| Bucket::full(self.burst, now));
        if bucket.take(self.burst, self.per_second, now) {
            return Ok(());
        }
        Err((1.0 / self.per_second).ceil().max(1.0) as u64)
    }
}

/// `Location` or `Content-Location` naming the upstream host, pointed back
/// at the public one (`https`, the published hostname and the engine's
/// public TLS port). Relative values and other hosts are left alone.
pub fn rewrite_location(value: &str, upstream: &str, public: &str, public_port: u16) -> Option<String> {
    let (scheme, rest) = value.split_once("://")?;
    if !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("https") {
        return None;
    }
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let upstream_name = upstream.split(':').next().unwrap_or(upstream);
    let matches = authority.eq_ignore_ascii_case(upstream)
        || (!upstream.contains(':')
            && authority.split(':').next().is_some_and(|a| a.eq_ignore_ascii_case(upstream_name)));
    let port = if public_port == 443 { String::new() } else { format!(":{public_port}") };
    matches.then(|| format!("https://{public}{port}{tail}"))
}

/// A `Set-Cookie` whose `Domain` names the upstream host, set for the
/// public one instead.
pub fn rewrite_cookie_domain(value: &str, upstream: &str, public: &str) -> Option<String> {
    let upstream = upstream.split(':').next().unwrap_or(upstream);
    let mut changed = false;
    let parts: Vec<String> = value
        .split(';')
        .map(|part| {
            let trimmed = part.trim_start();
            if let Some((key, domain)) = trimmed.split_once('=')
                && key.trim().eq_ignore_ascii_case("domain")
                && domain.trim().trim_start_matches('.').eq_ignore_ascii_case(upstream)
            {
                changed = true;
                let lead = &part[..part.len() - trimmed.len()];
                return format!("{lead}{}={public}", key.trim());
            }
            part.to_string()
        })
        .collect();
    changed.then(|| parts.join(";"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_segments_are_found_however_spelled() {
        for path in ["/a/../b", "/..", "/a/./b", "/%2e%2E/x", "/a/%2e", "/v/%2e%2e/metrics"] {
            assert!(dot_segments(path), "{path}");
        }
        for path in ["/a/b", "/a..b/", "/.well-known/x", "/%2e%2e%2f", "/"] {
            assert!(!dot_segments(path), "{path}");
        }
    }

    #[test]
    fn basic_headers() {
        let header = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode("ann:p:w"));
        assert_eq!(basic(&header), Some(("ann".into(), "p:w".into())));
        assert_eq!(basic("basic !!"), None);
        assert_eq!(basic("Bearer abc"), None);
    }

    #[test]
    fn locations_point_back_at_the_public_name() {
        let public = "app.t.example.com";
        assert_eq!(
            rewrite_location("http://api.internal/x?y#z", "api.internal", public, 443).as_deref(),
            Some("https://app.t.example.com/x?y#z")
        );
        assert_eq!(
            rewrite_location("http://API.internal:8080", "api.internal", public, 8443).as_deref(),
            Some("https://app.t.example.com:8443")
        );
        assert_eq!(rewrite_location("http://api.internal:9/a", "api.internal:8080", public, 443), None);
        assert_eq!(rewrite_location("http://other/a", "api.internal", public, 443), None);
        assert_eq!(rewrite_location("/relative", "api.internal", public, 443), None);
        assert_eq!(
            rewrite_cookie_domain("id=1; Domain=.api.internal; Path=/", "api.internal:8080", public).as_deref(),
            Some("id=1; Domain=app.t.example.com; Path=/")
        );
        assert_eq!(rewrite_cookie_domain("id=1; Domain=other", "api.internal", public), None);
    }

    #[tokio::test(start_paused = true)]
    async fn the_limiter_refills() {
        let limiter = Limiter { per_second: 2.0, burst: 3.0, buckets: Mutex::new(HashMap::new()) };
        let a = LimitKey::Source(Source::of("192.0.2.1".parse().unwrap()));
        let b = LimitKey::Source(Source::of("192.0.2.2".parse().unwrap()));
        let p = LimitKey::Principal("ann".into());
        for _ in 0..3 {
            assert!(limiter.take(a.clone()).is_ok());
        }
        assert_eq!(limiter.take(a.clone()), Err(1));
        assert!(limiter.take(b).is_ok(), "sources have buckets of their own");
        assert!(limiter.take(p).is_ok(), "so do principals");
        tokio::time::advance(std::time::Duration::from_millis(500)).await;
        assert!(limiter.take(a.clone()).is_ok());
        assert!(limiter.take(a).is_err());
    }
}

//! Header rewriting between the public side and the agent's service.
//!
//! Everything not listed here passes byte for byte: names keep their case
//! (hyper's `preserve_header_case` on both connections), repeated headers
//! stay repeated and in order, values are never re-encoded.

use std::net::IpAddr;

use http::header::{self, HeaderName};
use http::{HeaderMap, HeaderValue};

/// Connection-level headers (RFC 9110 section 7.6.1): they describe one
/// hop, so each side of the edge writes its own.
const HOP_BY_HOP: &[&str] = &["connection", "keep-alive", "proxy-connection", "te", "transfer-encoding", "upgrade"];

pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Whether a comma-separated header holds `token` (case-insensitive).
pub fn has_token(headers: &HeaderMap, name: &HeaderName, token: &str) -> bool {
    lists_token(headers.get_all(name).iter().filter_map(|v| v.to_str().ok()), token)
}

/// Whether one of the comma-separated `values` holds `token`
/// (case-insensitive).
pub fn lists_token<'a>(values: impl IntoIterator<Item = &'a str>, token: &str) -> bool {
    values.into_iter().flat_map(|v| v.split(',')).any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Whether `name` is a hop-by-hop header.
pub fn is_hop_by_hop(name: &str) -> bool {
    HOP_BY_HOP.iter().any(|h| name.eq_ignore_ascii_case(h))
}

/// Removes hop-by-hop headers and those the `Connection` header names.
/// `keep_upgrade` keeps `Connection` and `Upgrade` for a WebSocket or
/// other protocol switch, which must reach the other side.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .filter(|n| !(keep_upgrade && *n == header::UPGRADE))
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        if keep_upgrade && (*name == "connection" || *name == "upgrade") {
            continue;
        }
        headers.remove(*name);
    }
}

/// Adds `X-Forwarded-For` (appended to what earlier proxies wrote),
/// `X-Forwarded-Proto` and `X-Forwarded-Host` (replacing what the client
/// claimed).
pub fn add_forwarded(headers: &mut HeaderMap, peer: IpAddr, host: Option<&str>) {
    let peer = client_ip(peer);
    let prior: Vec<&str> = headers.get_all(&X_FORWARDED_FOR).iter().filter_map(|v| v.to_str().ok()).collect();
    let chain = if prior.is_empty() { peer.to_string() } else { format!("{}, {peer}", prior.join(", ")) };
    if let Ok(value) = HeaderValue::try_from(chain) {
        headers.insert(X_FORWARDED_FOR, value);
    }
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("https"));
    match host.and_then(|h| HeaderValue::try_from(h).ok()) {
        Some(value) => headers.insert(X_FORWARDED_HOST, value),
        None => headers.remove(X_FORWARDED_HOST),
    };
}

/// The client's address as services expect it: IPv4 for a v4-mapped peer.
pub fn client_ip(peer: IpAddr) -> IpAddr {
    match peer {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

/// HTTP/2 may split `Cookie` into several fields; HTTP/1.1 wants one
/// (RFC 9113 section 8.2.3).
pub fn join_cookies(headers: &mut HeaderMap) {
    if headers.get_all(header::COOKIE).iter().count() < 2 {
        return;
    }
    let joined: Vec<&[u8]> = headers.get_all(header::COOKIE).iter().map(|v| v.as_bytes()).collect();
    if let Ok(value) = HeaderValue::from_bytes(&joined.join(&b"; "[..])) {
        headers.insert(header::COOKIE, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_for_is_appended() {
        let mut h = HeaderMap::new();
        h.append(X_FORWARDED_FOR, HeaderValue::from_static("10.0.0.1"));
        h.append(X_FORWARDED_FOR, HeaderValue::from_static("10.0.0.2"));
        h.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
        add_forwarded(&mut h, "::ffff:127.0.0.9".parse().unwrap(), Some("a.t.example.com"));
        assert_eq!(h.get(X_FORWARDED_FOR).unwrap(), "10.0.0.1, 10.0.0.2, 127.0.0.9");
        assert_eq!(h.get(X_FORWARDED_PROTO).unwrap(), "https");
        assert_eq!(h.get(X_FORWARDED_HOST).unwrap(), "a.t.example.com");
    }

    #[test]
    fn hop_by_hop() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, X-Secret, Upgrade"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        h.append("set-cookie", HeaderValue::from_static("a=1"));
        h.append("set-cookie", HeaderValue::from_static("b=2"));
        let mut kept = h.clone();
        strip_hop_by_hop(&mut kept, true);
        assert!(kept.contains_key(header::UPGRADE) && kept.contains_key(header::CONNECTION));
        assert!(!kept.contains_key("x-secret"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 2);
        assert_eq!(h.get_all("set-cookie").iter().count(), 2);
    }
}

//! Who may use a published tunnel: `trusted_ips` and `token_auth`.
//!
//! One place decides, so HTTP and TLS tunnels agree on what an allowed
//! address is, and the proof a `token_auth` tunnel consumed never reaches
//! the agent's service.

use std::net::IpAddr;

use http::header::AUTHORIZATION;
use http::request::Parts;
use http::uri::PathAndQuery;
use http::{HeaderValue, Uri};

use super::errors::Refusal;
use crate::Shared;

/// The query parameter that carries a token when a header cannot
/// (browsers opening a WebSocket, links).
pub const TOKEN_PARAM: &str = "rstream.token";

/// Where a request carried its token.
#[derive(Debug, PartialEq, Eq)]
enum Proof {
    Header(HeaderValue),
    Query(String),
}

fn bearer(value: &HeaderValue) -> Option<&str> {
    crate::auth::bearer(value.to_str().ok()?)
}

fn query_token(segment: &str) -> Option<&str> {
    let (key, value) = segment.split_once('=').unwrap_or((segment, ""));
    (percent_decode(key) == TOKEN_PARAM).then_some(value)
}

/// Checks a `token_auth` tunnel's request and removes the proof it used.
/// Other `Authorization` headers and every other query parameter pass on
/// untouched, in their order and spelling.
pub fn check_token(shared: &Shared, parts: &mut Parts, source: IpAddr) -> Result<crate::auth::Principal, Refusal> {
    let mut proofs: Vec<Proof> = parts
        .headers
        .get_all(AUTHORIZATION)
        .iter()
        .filter(|v| bearer(v).is_some())
        .map(|v| Proof::Header(v.clone()))
        .collect();
    if let Some(query) = parts.uri.query() {
        proofs.extend(query.split('&').filter_map(query_token).map(|t| Proof::Query(t.to_string())));
    }
    let proof = match proofs.len() {
        0 => {
            shared.auth_failed(source);
            return Err(Refusal::Unauthorized);
        }
        1 => proofs.remove(0),
        _ => {
            shared.auth_failed(source);
            return Err(Refusal::TwoProofs);
        }
    };
    let token = match &proof {
        Proof::Header(value) => bearer(value).unwrap_or_default().to_string(),
        Proof::Query(raw) => percent_decode(raw),
    };
    let Ok(principal) = shared.verifier.verify(Some(&token)) else {
        shared.auth_failed(source);
        return Err(Refusal::Unauthorized);
    };
    match proof {
        Proof::Header(used) => {
            let kept: Vec<HeaderValue> =
                parts.headers.get_all(AUTHORIZATION).iter().filter(|v| **v != used).cloned().collect();
            parts.headers.remove(AUTHORIZATION);
            for value in kept {
                parts.headers.append(AUTHORIZATION, value);
            }
        }
        Proof::Query(_) => {
            parts.uri = without_token_param(&parts.uri).ok_or(Refusal::BadRequest("unparsable request target"))?;
        }
    }
    Ok(principal)
}

/// The same URI without the `rstream.token` parameter; every other byte of
/// the path and query stays as it was.
fn without_token_param(uri: &Uri) -> Option<Uri> {
    let query = uri.query()?;
    let rest: Vec<&str> = query.split('&').filter(|s| query_token(s).is_none()).collect();
    let mut target = uri.path().to_string();
    if !rest.is_empty() {
        target.push('?');
        target.push_str(&rest.join("&"));
    }
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(PathAndQuery::try_from(target).ok()?);
    Uri::from_parts(parts).ok()
}

fn percent_decode(input: &str) -> String {
    crate::policy::percent_decode(input, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_only_the_token_parameter() {
        let uri: Uri = "/a/%2Fb@c/?x=1&rstream.token=abc&y=%20&x=2".parse().unwrap();
        assert_eq!(without_token_param(&uri).unwrap().to_string(), "/a/%2Fb@c/?x=1&y=%20&x=2");
        let uri: Uri = "/p?rstream.token=abc".parse().unwrap();
        assert_eq!(without_token_param(&uri).unwrap().to_string(), "/p");
        let uri: Uri = "/p?rstream%2Etoken=abc&z".parse().unwrap();
        assert_eq!(without_token_param(&uri).unwrap().to_string(), "/p?z");
    }

    #[test]
    fn decodes() {
        assert_eq!(percent_decode("a%2Eb+c%"), "a.b c%");
        assert_eq!(percent_decode("%4"), "%4");
        assert_eq!(percent_decode("%zz"), "%zz");
    }

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        assert_eq!(bearer(&HeaderValue::from_static("bearer abc")), Some("abc"));
        assert_eq!(bearer(&HeaderValue::from_static("Bearer  abc ")), Some("abc"));
        assert_eq!(bearer(&HeaderValue::from_static("Basic abc")), None);
    }
}

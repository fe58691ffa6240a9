//! Who may call the Engine API, and the short error answers every handler
//! shares.

use std::net::SocketAddr;

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::Shared;
use crate::auth::Principal;

/// The peer of the connection, for log lines.
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub SocketAddr);

/// A refused request: a status and a one-line text body.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub body: String,
    /// Seconds for a `Retry-After` header.
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, body: impl Into<String>) -> Self {
        let mut body = body.into();
        if !body.ends_with('\n') {
            body.push('\n');
        }
        Self { status, body, retry_after: None }
    }

    pub fn retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds);
        self
    }

    pub fn bad_request(body: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, body)
    }

    pub fn not_found(body: &str) -> Self {
        Self::new(StatusCode::NOT_FOUND, body)
    }

    pub fn unauthorized() -> Self {
        Self::new(StatusCode::UNAUTHORIZED, UNAUTHORIZED_BODY)
    }
}

/// The body of every 401: says what to send, never why a token failed (that
/// goes to the log, which the operator reads and an attacker does not).
pub const UNAUTHORIZED_BODY: &str = "missing or invalid bearer token\n";

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, self.body).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
        if self.status == StatusCode::UNAUTHORIZED {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let Some(seconds) = self.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

/// The token of an `Authorization: Bearer` header, if any; `Err` when the
/// header is there but is not a single Bearer credential.
pub fn bearer(headers: &HeaderMap) -> Result<Option<&str>, &'static str> {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let Some(value) = values.next() else { return Ok(None) };
    if values.next().is_some() {
        return Err("more than one Authorization header");
    }
    let value = value.to_str().map_err(|_| "Authorization header is not text")?;
    crate::auth::bearer(value).map(Some).ok_or("Authorization header is not `Bearer <token>`")
}

/// Checks the caller's token: the Bearer header, or on the streaming
/// endpoints the `rstream.token` query parameter (browsers' EventSource and
/// WebSocket cannot set headers). Refusals are counted and logged without
/// the token.
pub fn authorize(
    shared: &Shared,
    peer: Peer,
    path: &str,
    headers: &HeaderMap,
    query_token: Option<&str>,
) -> Result<Principal, ApiError> {
    if shared.admission.auth_throttled(peer.0.ip()) {
        tracing::warn!(peer = %peer.0, path, "API request refused: too many refused tokens from this source");
        return Err(ApiError::new(StatusCode::TOO_MANY_REQUESTS, "too many refused tokens; try again in a minute")
            .retry_after(60));
    }
    let refuse = |reason: &dyn std::fmt::Display| {
        shared.auth_failed(peer.0.ip());
        tracing::warn!(peer = %peer.0, path, %reason, "API request refused");
        ApiError::unauthorized()
    };
    let token = match (bearer(headers), query_token) {
        (Err(reason), _) => return Err(refuse(&reason)),
        (Ok(Some(_)), Some(_)) => return Err(refuse(&"token given both as a header and as rstream.token")),
        (Ok(Some(token)), None) => token,
        (Ok(None), Some(token)) => token,
        (Ok(None), None) => return Err(refuse(&"no token")),
    };
    shared.verifier.verify(Some(token)).map_err(|e| refuse(&e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(values: &[&str]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for v in values {
            map.append(header::AUTHORIZATION, HeaderValue::from_str(v).unwrap());
        }
        map
    }

    #[test]
    fn bearer_header_forms() {
        assert_eq!(bearer(&headers(&[])), Ok(None));
        assert_eq!(bearer(&headers(&["Bearer abc"])), Ok(Some("abc")));
        assert_eq!(bearer(&headers(&["bearer  abc "])), Ok(Some("abc")));
        assert!(bearer(&headers(&["Basic abc"])).is_err());
        assert!(bearer(&headers(&["Bearer"])).is_err());
        assert!(bearer(&headers(&["Bearer a", "Bearer b"])).is_err());
    }
}

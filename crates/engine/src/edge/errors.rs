//! The engine's own answers on a published hostname: short text pages, one
//! per failure, so an operator reading `curl -i` knows where to look.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};

use super::http::PublicBody;
use crate::streams::StreamFailure;

/// Why the edge answered instead of the agent's service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// No live tunnel serves this hostname.
    UnknownHost(String),
    /// The hostname belongs to a tunnel that is not an `http` tunnel.
    NotHttp(String),
    /// The source address is not in the tunnel's `trusted_ips`.
    Forbidden,
    /// `token_auth`: no proof, or a proof that does not verify.
    Unauthorized,
    /// `token_auth`: more than one proof in one request.
    TwoProofs,
    /// The tunnel's agent is gone.
    Offline,
    /// The agent has too many streams pending.
    Busy,
    /// The agent refused the stream, or the service behind it failed.
    Upstream(String),
    /// The agent did not open the stream within `timeouts.stream_request_seconds`.
    Timeout,
    /// A request the edge cannot forward.
    BadRequest(&'static str),
    /// The hostname is split by path and no tunnel takes this one.
    NoRoute,
    /// The tunnel's policy denies the path (`deny_paths`).
    Denied,
    /// The tunnel's policy allows other methods only (the list, for `Allow`).
    MethodNotAllowed(String),
    /// The tunnel's policy asks for basic auth: none given, or refused.
    BasicAuth,
    /// The tunnel's rate limit: seconds until the next request may pass.
    RateLimited(u64),
    /// The request body is over the policy's `max_request_body_bytes`.
    TooLarge,
}

impl Refusal {
    /// The answer for a hostname no live tunnel serves: its tunnel's agent
    /// is offline while the hostname is held for its principal, else there
    /// is no such tunnel.
    pub fn unrouted(shared: &crate::Shared, host: &str) -> Refusal {
        match shared.registry.hostname_hold(host) {
            Some(_) => Refusal::Offline,
            None => Refusal::UnknownHost(host.to_string()),
        }
    }

    pub fn from_stream(failure: StreamFailure) -> Self {
        match failure {
            StreamFailure::AgentGone => Refusal::Offline,
            StreamFailure::Capacity => Refusal::Busy,
            StreamFailure::Refused(reason) => Refusal::Upstream(reason),
            StreamFailure::Timeout => Refusal::Timeout,
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Refusal::UnknownHost(_) => StatusCode::NOT_FOUND,
            Refusal::NotHttp(_) => StatusCode::MISDIRECTED_REQUEST,
            Refusal::Forbidden => StatusCode::FORBIDDEN,
            Refusal::Unauthorized => StatusCode::UNAUTHORIZED,
            Refusal::TwoProofs | Refusal::BadRequest(_) => StatusCode::BAD_REQUEST,
            Refusal::Offline | Refusal::Busy => StatusCode::SERVICE_UNAVAILABLE,
            Refusal::Upstream(_) => StatusCode::BAD_GATEWAY,
            Refusal::Timeout => StatusCode::GATEWAY_TIMEOUT,
            Refusal::NoRoute | Refusal::Denied => StatusCode::NOT_FOUND,
            Refusal::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Refusal::BasicAuth => StatusCode::UNAUTHORIZED,
            Refusal::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            Refusal::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        }
    }

    /// The body: one line, no secrets, no internal detail beyond the host.
    pub fn body(&self) -> String {
        match self {
            Refusal::UnknownHost(host) => format!("no tunnel for {host}\n"),
            Refusal::NotHttp(host) => format!("{host} is not an http tunnel\n"),
            Refusal::Forbidden => "source address not allowed\n".into(),
            Refusal::Unauthorized => "missing or invalid token\n".into(),
            Refusal::TwoProofs => "more than one token in the request\n".into(),
            Refusal::Offline => "agent offline\n".into(),
            Refusal::Busy => "tunnel busy, retry later\n".into(),
            Refusal::Upstream(_) => "upstream refused the stream\n".into(),
            Refusal::Timeout => "upstream timed out\n".into(),
            Refusal::BadRequest(why) => format!("bad request: {why}\n"),
            Refusal::NoRoute => "no route for this path\n".into(),
            Refusal::Denied => "not found\n".into(),
            Refusal::MethodNotAllowed(_) => "method not allowed\n".into(),
            Refusal::BasicAuth => "authentication required\n".into(),
            Refusal::RateLimited(_) => "too many requests, retry later\n".into(),
            Refusal::TooLarge => "request body too large\n".into(),
        }
    }

    /// What the log says: the detail behind the page (an agent's or a
    /// service's own words), which the public never sees.
    pub fn detail(&self) -> String {
        match self {
            Refusal::Upstream(reason) => reason.clone(),
            other => other.body().trim_end().to_string(),
        }
    }

    pub fn response(&self) -> Response<PublicBody> {
        let mut response = page(self.status(), self.body());
        let headers = response.headers_mut();
        match self {
            Refusal::Unauthorized => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            Refusal::BasicAuth => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Basic realm=\"strait\", charset=\"UTF-8\""),
                );
            }
            Refusal::MethodNotAllowed(allowed) => {
                if let Ok(value) = HeaderValue::try_from(allowed.as_str()) {
                    headers.insert(header::ALLOW, value);
                }
            }
            Refusal::RateLimited(seconds) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(*seconds));
            }
            _ => {}
        }
        response
    }

    /// The same page as HTTP/1.1 bytes, for the relay.
    pub fn http1(&self) -> Vec<u8> {
        let response = self.response();
        let body = self.body();
        let status = response.status();
        let mut out = format!("HTTP/1.1 {} {}\r\n", status.as_u16(), status.canonical_reason().unwrap_or_default());
        for (name, value) in response.headers() {
            out.push_str(&format!("{name}: {}\r\n", value.to_str().unwrap_or_default()));
        }
        out.push_str(&format!("content-length: {}\r\n\r\n{body}", body.len()));
        out.into_bytes()
    }
}

fn page(status: StatusCode, body: String) -> Response<PublicBody> {
    let mut response = Response::new(Full::new(Bytes::from(body)).map_err(|never| match never {}).boxed_unsync());
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if status == StatusCode::SERVICE_UNAVAILABLE {
        headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses() {
        let cases = [
            (Refusal::from_stream(StreamFailure::AgentGone), 503),
            (Refusal::from_stream(StreamFailure::Refused("x".into())), 502),
            (Refusal::from_stream(StreamFailure::Timeout), 504),
            (Refusal::UnknownHost("a.t.h".into()), 404),
            (Refusal::TwoProofs, 400),
            (Refusal::Forbidden, 403),
        ];
        for (refusal, status) in cases {
            assert_eq!(refusal.response().status().as_u16(), status);
        }
        assert_eq!(Refusal::UnknownHost("a.t.h".into()).body(), "no tunnel for a.t.h\n");
        // What an agent reports stays in the log.
        let refused = Refusal::from_stream(StreamFailure::Refused("127.0.0.1:3999: Connection refused".into()));
        assert_eq!(refused.body(), "upstream refused the stream\n");
        assert_eq!(refused.detail(), "127.0.0.1:3999: Connection refused");
        let page = String::from_utf8(Refusal::Offline.http1()).unwrap();
        assert!(page.starts_with("HTTP/1.1 503 Service Unavailable\r\n"), "{page}");
        assert!(page.contains("retry-after: 1\r\n"), "{page}");
        assert!(page.ends_with("content-length: 14\r\n\r\nagent offline\n"), "{page}");
    }
}

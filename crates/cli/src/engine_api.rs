//! The Engine API, client side: `GET /api/...` over the engine's TLS port
//! with the context's token, for `strait tunnels`, `strait clients` and
//! `strait events`.

use http::{Request, StatusCode, header};
use http_body_util::{BodyExt, Empty};
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::TokioIo;
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use serde::de::DeserializeOwned;
use strait_agent::Client;

pub struct EngineApi {
    client: Client,
}

/// `path?params=<url-encoded JSON>` when there are params.
pub fn with_params(path: &str, params: Option<&serde_json::Value>) -> String {
    match params {
        Some(params) => format!("{path}?params={}", utf8_percent_encode(&params.to_string(), NON_ALPHANUMERIC)),
        None => path.to_string(),
    }
}

impl EngineApi {
    pub fn new(client: Client) -> Self {
        Self { client }
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Sends `GET path` and returns the response with its body unread.
    pub async fn get(&self, path: &str, accept: &str) -> anyhow::Result<http::Response<Incoming>> {
        let tls = self.client.connect_api().await?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let mut request = Request::get(path)
            .header(header::HOST, self.client.api_authority())
            .header(header::ACCEPT, accept)
            .header(header::USER_AGENT, concat!("strait/", env!("CARGO_PKG_VERSION")));
        if let Some(token) = &self.client.config().token {
            request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        Ok(sender.send_request(request.body(Empty::<Bytes>::new())?).await?)
    }

    /// `GET path` as JSON; a non-2xx answer is an error carrying the
    /// engine's short body.
    pub async fn get_json<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let response = self.get(path, "application/json").await?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        if !status.is_success() {
            anyhow::bail!("{path}: {}", failure(status, &body));
        }
        serde_json::from_slice(&body)
            .map_err(|e| anyhow::anyhow!("{path}: the engine's answer is not the expected JSON: {e}"))
    }
}

/// `401 Unauthorized: missing or invalid bearer token`.
pub fn failure(status: StatusCode, body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    let reason = status.canonical_reason().unwrap_or("");
    if text.is_empty() {
        format!("{} {reason}", status.as_u16())
    } else {
        format!("{} {reason}: {text}", status.as_u16())
    }
}

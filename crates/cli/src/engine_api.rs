//! The Engine API, client side: `GET /api/...` over the engine's TLS port
//! with the context's token, for `strait tunnels`, `strait clients` and
//! `strait events`.

use http::{Request, StatusCode, header};
use http_body_util::{BodyExt, Empty};
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::TokioIo;
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use serde::de::DeserializeOwned;
use strait_agent::{AgentError, Client};

use crate::retry;

pub struct EngineApi {
    client: Client,
}

/// Why an Engine API request failed.
#[derive(Debug)]
pub enum ApiError {
    /// The engine could not be reached.
    Connect(AgentError),
    /// The engine answered with an error status.
    Status { path: String, status: StatusCode, body: String },
    /// The exchange broke off, timed out, or its answer made no sense.
    Exchange(anyhow::Error),
}

impl ApiError {
    /// Whether asking again cannot help until the user changes something:
    /// see [`AgentError::is_permanent`]; a refusal for the request itself
    /// (a 4xx other than a timeout or a rate limit) stays a refusal.
    pub fn is_permanent(&self, reached_before: bool) -> bool {
        match self {
            ApiError::Connect(error) => error.is_permanent(reached_before),
            ApiError::Status { status, .. } => {
                status.is_client_error()
                    && *status != StatusCode::REQUEST_TIMEOUT
                    && *status != StatusCode::TOO_MANY_REQUESTS
            }
            ApiError::Exchange(_) => false,
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ApiError::Connect(error) => write!(f, "{:#}", retry::explain(error)),
            ApiError::Status { path, status, body } => {
                write!(f, "{path}: {}", failure(*status, body.as_bytes()))?;
                if matches!(*status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) {
                    write!(f, "\n  {}", retry::TOKEN_HINT)?;
                }
                Ok(())
            }
            ApiError::Exchange(error) => write!(f, "{error:#}"),
        }
    }
}

impl std::error::Error for ApiError {}

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

    /// Bounds one step of an exchange by the client's operation timeout.
    async fn within<T, E: Into<anyhow::Error>>(
        &self,
        what: &str,
        step: impl Future<Output = Result<T, E>>,
    ) -> Result<T, ApiError> {
        let limit = self.client.config().operation_timeout;
        match tokio::time::timeout(limit, step).await {
            Ok(result) => result.map_err(|e| ApiError::Exchange(e.into())),
            Err(_) => Err(ApiError::Exchange(anyhow::anyhow!("{what}: no answer in {}s", limit.as_secs()))),
        }
    }

    /// Sends `GET path` and returns the (2xx) response with its body
    /// unread; any other status is an [`ApiError::Status`] with the
    /// engine's short body.
    pub async fn get(&self, path: &str, accept: &str) -> Result<http::Response<Incoming>, ApiError> {
        let tls = self.client.connect_api().await.map_err(ApiError::Connect)?;
        let (mut sender, connection) =
            self.within(path, hyper::client::conn::http1::handshake(TokioIo::new(tls))).await?;
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
        let request = request.body(Empty::<Bytes>::new()).map_err(|e| ApiError::Exchange(e.into()))?;
        let response = self.within(path, sender.send_request(request)).await?;
        let status = response.status();
        if !status.is_success() {
            let body = self.within(path, response.into_body().collect()).await?.to_bytes();
            let body = String::from_utf8_lossy(&body).into_owned();
            return Err(ApiError::Status { path: path.to_string(), status, body });
        }
        Ok(response)
    }

    /// `GET path` as JSON.
    pub async fn get_json<T: DeserializeOwned>(&self, path: &str) -> Result<T, ApiError> {
        let response = self.get(path, "application/json").await?;
        let body = self.within(path, response.into_body().collect()).await?.to_bytes();
        serde_json::from_slice(&body).map_err(|e| {
            ApiError::Exchange(anyhow::anyhow!("{path}: the engine's answer is not the expected JSON: {e}"))
        })
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

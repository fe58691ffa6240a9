//! `strait events`: the engine's live event feed (SSE or WebSocket) as
//! newline-delimited JSON on stdout, or POSTed to a URL, optionally as
//! signed webhooks in the shape the rstream SDK's `verify_event` checks.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use hmac::{Hmac, Mac};
use http::{Request, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use rand::RngExt;
use serde_json::Value;
use sha2::Sha256;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{Error as WsError, Message as WsMessage};
use tokio_util::sync::CancellationToken;

use crate::engine_api::{ApiError, EngineApi, with_params};
use crate::retry::Backoff;

/// Event types a webhook may carry (the SDK refuses any other).
pub const DELIVERABLE: [&str; 4] = ["client.created", "client.deleted", "tunnel.created", "tunnel.deleted"];

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Transport {
    Sse,
    Websocket,
}

/// Where events go.
pub enum Sink {
    Stdout,
    Post { url: http::Uri, webhook: Option<Webhook> },
}

/// Webhook signing settings.
pub struct Webhook {
    pub secret: String,
    pub id: String,
}

pub struct Options {
    pub transport: Transport,
    /// Only these event types (all when empty).
    pub types: Vec<String>,
    pub params: Option<Value>,
    pub sink: Sink,
}

/// A feed that sends nothing for this long, not even the keep-alive strait
/// engines send every 15 s, is taken for dead and reconnected: a network
/// that drops without a reset would otherwise hold the command forever.
const FEED_SILENCE: Duration = Duration::from_secs(60);

/// Streams events until the shutdown signal, reconnecting when the feed
/// ends; stops on an error that will not heal (a refused token, an
/// untrusted certificate, a receiver that cannot be reached at all).
pub async fn run(api: EngineApi, options: Options, shutdown: &CancellationToken) -> anyhow::Result<()> {
    let poster = match &options.sink {
        Sink::Post { url, .. } => Some(Poster::new(url.clone())?),
        Sink::Stdout => None,
    };
    let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(30));
    let mut ever_connected = false;
    loop {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<String>(256);
        let feed = feed(&api, &options, tx);
        tokio::pin!(feed);
        let ended = loop {
            // Biased: the feed's end is seen before its channel closes.
            let event = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Ok(()),
                ended = &mut feed => break ended,
                event = rx.recv() => event,
            };
            let Some(text) = event else { break Ok(()) };
            ever_connected = true;
            backoff.reset();
            announce(&text);
            match shutdown.run_until_cancelled(deliver(&options, poster.as_ref(), &text)).await {
                None => return Ok(()),
                Some(delivered) => delivered?,
            }
        };
        // Deliver what arrived before the feed ended.
        while let Ok(text) = rx.try_recv() {
            match shutdown.run_until_cancelled(deliver(&options, poster.as_ref(), &text)).await {
                None => return Ok(()),
                Some(delivered) => delivered?,
            }
        }
        match ended {
            Err(error) if error.is_permanent(ever_connected) => return Err(error.into()),
            Err(error) => eprintln!("strait: event feed ended: {error}"),
            Ok(()) => eprintln!("strait: event feed ended"),
        }
        let delay = backoff.next_delay();
        eprintln!("strait: reconnecting in {:.1}s", delay.as_secs_f32());
        if shutdown.run_until_cancelled(tokio::time::sleep(delay)).await.is_none() {
            return Ok(());
        }
    }
}

fn feed_silent() -> ApiError {
    ApiError::Exchange(anyhow::anyhow!(
        "the engine sent nothing for {}s, not even a keep-alive",
        FEED_SILENCE.as_secs()
    ))
}

/// Reads one feed connection, sending each event's JSON text to `tx`.
async fn feed(api: &EngineApi, options: &Options, tx: tokio::sync::mpsc::Sender<String>) -> Result<(), ApiError> {
    let exchange = |e: anyhow::Error| ApiError::Exchange(e);
    match options.transport {
        Transport::Sse => {
            let response = api.get(&with_params("/api/sse", options.params.as_ref()), "text/event-stream").await?;
            let mut body = response.into_body();
            let mut parser = SseParser::default();
            loop {
                let frame = match tokio::time::timeout(FEED_SILENCE, body.frame()).await {
                    Err(_) => return Err(feed_silent()),
                    Ok(None) => break,
                    Ok(Some(frame)) => frame.map_err(|e| exchange(e.into()))?,
                };
                if let Ok(data) = frame.into_data() {
                    for event in parser.push(&data) {
                        if tx.send(event).await.is_err() {
                            return Ok(());
                        }
                    }
                }
            }
            match parser.last_comment {
                Some(reason) => Err(exchange(anyhow::anyhow!("{reason}"))),
                None => Ok(()),
            }
        }
        Transport::Websocket => {
            let tls = api.client().connect_api().await.map_err(ApiError::Connect)?;
            let path = with_params("/api/websocket", options.params.as_ref());
            let url = format!("wss://{}{path}", api.client().api_authority());
            let mut request = url.into_client_request().map_err(|e| exchange(e.into()))?;
            if let Some(token) = &api.client().config().token {
                let value = format!("Bearer {token}").parse().map_err(|_| {
                    exchange(anyhow::anyhow!("the token cannot be sent in a header (it has control characters)"))
                })?;
                request.headers_mut().insert(header::AUTHORIZATION, value);
            }
            let limit = api.client().config().operation_timeout;
            let mut socket = match tokio::time::timeout(limit, tokio_tungstenite::client_async(request, tls)).await {
                Err(_) => return Err(exchange(anyhow::anyhow!("{path}: no answer in {}s", limit.as_secs()))),
                Ok(Err(WsError::Http(response))) => {
                    let body = response.body().as_deref().map(String::from_utf8_lossy).unwrap_or_default();
                    return Err(ApiError::Status { path, status: response.status(), body: body.into_owned() });
                }
                Ok(Err(error)) => return Err(exchange(error.into())),
                Ok(Ok((socket, _))) => socket,
            };
            loop {
                let message = match tokio::time::timeout(FEED_SILENCE, socket.next()).await {
                    Err(_) => return Err(feed_silent()),
                    Ok(None) => return Ok(()),
                    Ok(Some(message)) => message.map_err(|e| exchange(e.into()))?,
                };
                match message {
                    WsMessage::Text(text) if tx.send(text.to_string()).await.is_err() => return Ok(()),
                    WsMessage::Close(Some(frame)) => {
                        return Err(exchange(anyhow::anyhow!("closed by the engine: {}", frame.reason)));
                    }
                    WsMessage::Close(None) => return Ok(()),
                    _ => {}
                }
            }
        }
    }
}

/// Says on stderr when a feed starts, so people and scripts know events
/// from now on will arrive.
fn announce(text: &str) {
    if !text.contains("\"state.initial\"") {
        return;
    }
    if let Ok(event) = serde_json::from_str::<Value>(text)
        && event["type"] == "state.initial"
    {
        let count = |k: &str| event["object"][k].as_array().map_or(0, Vec::len);
        eprintln!("strait: watching events ({} clients, {} tunnels now)", count("clients"), count("tunnels"));
    }
}

/// Prints or POSTs one event; an error is one that ends the command.
async fn deliver(options: &Options, poster: Option<&Poster>, text: &str) -> anyhow::Result<()> {
    let Ok(event) = serde_json::from_str::<Value>(text) else {
        eprintln!("strait: ignoring an event that is not JSON");
        return Ok(());
    };
    let kind = event.get("type").and_then(Value::as_str).unwrap_or_default();
    if !options.types.is_empty() && !options.types.iter().any(|t| t == kind) {
        return Ok(());
    }
    match (&options.sink, poster) {
        (Sink::Post { webhook: Some(webhook), .. }, Some(poster)) => {
            if !DELIVERABLE.contains(&kind) {
                return Ok(());
            }
            let body = webhook_body(&event);
            let delivery = format!("dlv_{}", hex_id());
            let headers = webhook_headers(&body, &event, webhook, &delivery, unix_now());
            poster.post(body, headers).await
        }
        (Sink::Post { .. }, Some(poster)) => poster.post(text.as_bytes().to_vec(), Vec::new()).await,
        _ => {
            println!("{text}");
            Ok(())
        }
    }
}

/// The webhook body: the event with the fields hosted deliveries carry.
pub fn webhook_body(event: &Value) -> Vec<u8> {
    let pick = |k: &str| event.get(k).cloned().unwrap_or(Value::Null);
    let body = serde_json::json!({
        "id": pick("id"),
        "type": pick("type"),
        "created_at": pick("created_at"),
        "workspace_id": Value::Null,
        "project_id": Value::Null,
        "cluster_id": Value::Null,
        "user_id": pick("user_id"),
        "object": pick("object"),
    });
    serde_json::to_vec(&body).expect("JSON values serialise")
}

/// `t=<unix>,v1=<hex HMAC-SHA256(secret, "<t>." + body)>`.
pub fn signature(secret: &str, timestamp: u64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    mac.update(format!("{timestamp}.").as_bytes());
    mac.update(body);
    format!("t={timestamp},v1={}", hex::encode(mac.finalize().into_bytes()))
}

fn webhook_headers(
    body: &[u8],
    event: &Value,
    webhook: &Webhook,
    delivery: &str,
    now: u64,
) -> Vec<(&'static str, String)> {
    let text = |k: &str| event.get(k).and_then(Value::as_str).unwrap_or_default().to_string();
    vec![
        ("rstream-signature", signature(&webhook.secret, now, body)),
        ("rstream-event-id", text("id")),
        ("rstream-event-type", text("type")),
        ("rstream-webhook-id", webhook.id.clone()),
        ("rstream-delivery-id", delivery.to_string()),
    ]
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn hex_id() -> String {
    let mut bytes = [0u8; 12];
    rand::rng().fill(&mut bytes[..]);
    hex::encode(bytes)
}

/// A new signing secret: `whsec_` + unpadded base64url of 32 random bytes.
pub fn generate_secret() -> String {
    use base64::Engine as _;
    let mut bytes = [0u8; 32];
    rand::rng().fill(&mut bytes[..]);
    format!("whsec_{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}

/// Splits an SSE body into event data as it arrives.
#[derive(Default)]
pub struct SseParser {
    buffer: String,
    /// The engine says why it ends a feed in a comment.
    pub last_comment: Option<String>,
}

impl SseParser {
    pub fn push(&mut self, chunk: &[u8]) -> Vec<String> {
        self.buffer.push_str(&String::from_utf8_lossy(chunk));
        let mut events = Vec::new();
        while let Some(end) = self.buffer.find("\n\n") {
            let block: String = self.buffer.drain(..end + 2).collect();
            let mut data: Vec<&str> = Vec::new();
            for line in block.lines() {
                if let Some(d) = line.strip_prefix("data:") {
                    data.push(d.strip_prefix(' ').unwrap_or(d));
                } else if let Some(c) = line.strip_prefix(':') {
                    let c = c.trim();
                    if !c.is_empty() {
                        self.last_comment = Some(c.to_string());
                    }
                }
            }
            if !data.is_empty() {
                events.push(data.join("\n"));
            }
        }
        events
    }
}

/// How long one delivery attempt may take, from the connect to the end of
/// the answer.
const POST_TIMEOUT: Duration = Duration::from_secs(30);

/// Attempts per event before it is dropped.
const POST_ATTEMPTS: u32 = 5;

/// POSTs bodies to one URL, retrying what may succeed later.
struct Poster {
    url: http::Uri,
    tls: Option<tokio_rustls::TlsConnector>,
    /// Whether a delivery ever got an answer: then a name that stops
    /// resolving may be a passing DNS failure rather than a typo.
    answered: AtomicBool,
}

/// Why a delivery attempt failed.
enum PostError {
    /// No attempt can succeed until the user changes something.
    Permanent(anyhow::Error),
    Transient(anyhow::Error),
}

impl Poster {
    fn new(url: http::Uri) -> anyhow::Result<Self> {
        let tls = match url.scheme_str() {
            Some("http") => None,
            Some("https") => {
                let ca = std::env::var_os("SSL_CERT_FILE").map(std::path::PathBuf::from);
                Some(tokio_rustls::TlsConnector::from(strait_agent::tls_client_config(ca.as_deref(), b"http/1.1")?))
            }
            _ => anyhow::bail!("--forward-to {url}: only http:// and https:// URLs"),
        };
        anyhow::ensure!(url.host().is_some(), "--forward-to {url}: no host");
        Ok(Self { url, tls, answered: AtomicBool::new(false) })
    }

    /// Delivers one body, with retries; a receiver that refuses it or stays
    /// down drops it with a message. An error ends the command.
    async fn post(&self, body: Vec<u8>, headers: Vec<(&'static str, String)>) -> anyhow::Result<()> {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
        for attempt in 1..=POST_ATTEMPTS {
            let sent = match tokio::time::timeout(POST_TIMEOUT, self.send(&body, &headers)).await {
                Ok(sent) => sent,
                Err(_) => Err(PostError::Transient(anyhow::anyhow!("no answer in {}s", POST_TIMEOUT.as_secs()))),
            };
            match sent {
                Ok(status) if status.is_success() => return Ok(()),
                Ok(status) if status.is_server_error() || status.as_u16() == 429 => {
                    eprintln!("strait: {} answered {status} (attempt {attempt})", self.url);
                }
                Ok(status) => {
                    eprintln!("strait: {} refused the event: {status}", self.url);
                    return Ok(());
                }
                Err(PostError::Permanent(error)) => anyhow::bail!("cannot deliver to {}: {error:#}", self.url),
                Err(PostError::Transient(error)) => {
                    eprintln!("strait: cannot deliver to {}: {error:#} (attempt {attempt})", self.url);
                }
            }
            if attempt < POST_ATTEMPTS {
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
        eprintln!("strait: event dropped after {POST_ATTEMPTS} attempts");
        Ok(())
    }

    async fn send(&self, body: &[u8], headers: &[(&'static str, String)]) -> Result<http::StatusCode, PostError> {
        let transient = |e: anyhow::Error| PostError::Transient(e);
        let host = self.url.host().expect("checked in new");
        let bare_host = host.trim_start_matches('[').trim_end_matches(']');
        let default_port = if self.tls.is_some() { 443 } else { 80 };
        let port = self.url.port_u16().unwrap_or(default_port);
        let addrs: Vec<std::net::SocketAddr> = match tokio::net::lookup_host((bare_host, port)).await {
            Ok(addrs) => addrs.collect(),
            Err(error) => {
                let error = anyhow::anyhow!("cannot resolve {bare_host}: {error}\n  check the --forward-to URL");
                return Err(if self.answered.load(Ordering::Relaxed) {
                    PostError::Transient(error)
                } else {
                    PostError::Permanent(error)
                });
            }
        };
        let tcp = TcpStream::connect(&addrs[..]).await.map_err(|e| transient(e.into()))?;
        let _ = tcp.set_nodelay(true);
        let authority = self.url.authority().map_or(host.to_string(), |a| a.to_string());
        let path = self.url.path_and_query().map_or("/", |p| p.as_str()).to_string();
        let mut request = Request::post(path)
            .header(header::HOST, authority)
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::USER_AGENT, concat!("strait/", env!("CARGO_PKG_VERSION")));
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        let request = request.body(Full::new(Bytes::copy_from_slice(body))).map_err(|e| transient(e.into()))?;
        let status = match &self.tls {
            Some(connector) => {
                let name = rustls::pki_types::ServerName::try_from(bare_host.to_string())
                    .map_err(|e| PostError::Permanent(e.into()))?;
                let tls = connector.connect(name, tcp).await.map_err(|error| {
                    match error.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) {
                        Some(rustls::Error::InvalidCertificate(reason)) => PostError::Permanent(anyhow::anyhow!(
                            "the receiver's certificate is refused ({reason})\n  if it is signed by a private CA, \
                             set SSL_CERT_FILE to that CA's file"
                        )),
                        _ => transient(error.into()),
                    }
                })?;
                send_on(TokioIo::new(tls), request).await.map_err(transient)?
            }
            None => send_on(TokioIo::new(tcp), request).await.map_err(transient)?,
        };
        self.answered.store(true, Ordering::Relaxed);
        Ok(status)
    }
}

async fn send_on<I>(io: I, request: Request<Full<Bytes>>) -> anyhow::Result<http::StatusCode>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let response = sender.send_request(request).await?;
    let status = response.status();
    // Read the body so the connection ends cleanly.
    let _ = response.into_body().collect().await;
    Ok(status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_follow_the_documented_scheme() {
        // The expected value came from Python's hmac module:
        // hmac.new(b"whsec_test", b"1700000000.{}", hashlib.sha256).hexdigest()
        let sig = signature("whsec_test", 1_700_000_000, b"{}");
        assert_eq!(sig, "t=1700000000,v1=35495024f4ef3f94e5a93e22221544c4b75e9a42300cd965ab81cb85cd994e91");
    }

    #[test]
    fn sse_blocks_split_across_chunks() {
        let mut p = SseParser::default();
        assert!(p.push(b"data: {\"a\"").is_empty());
        assert_eq!(p.push(b":1}\n\n: keep-alive\n\ndata: 2\n\n"), vec!["{\"a\":1}".to_string(), "2".to_string()]);
        assert_eq!(p.last_comment.as_deref(), Some("keep-alive"));
    }

    #[test]
    fn secrets_have_the_documented_shape() {
        let s = generate_secret();
        assert!(s.starts_with("whsec_"));
        assert_eq!(s.len(), 6 + 43);
    }
}

//! `strait events`: the engine's live event feed (SSE or WebSocket) as
//! newline-delimited JSON on stdout, or POSTed to a URL, optionally as
//! signed webhooks in the shape the rstream SDK's `verify_event` checks.

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
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::engine_api::{EngineApi, failure, with_params};
use crate::forward::Backoff;

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

/// Streams events until Ctrl-C, reconnecting when the feed ends.
pub async fn run(api: EngineApi, options: Options) -> anyhow::Result<()> {
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
            tokio::select! {
                ended = &mut feed => break ended,
                event = rx.recv() => match event {
                    Some(text) => {
                        ever_connected = true;
                        backoff.reset();
                        announce(&text);
                        deliver(&options, poster.as_ref(), &text).await;
                    }
                    None => break Ok(()),
                },
                _ = tokio::signal::ctrl_c() => return Ok(()),
            }
        };
        // Drain what arrived before the feed ended.
        while let Ok(text) = rx.try_recv() {
            deliver(&options, poster.as_ref(), &text).await;
        }
        match ended {
            Err(error) if !ever_connected => return Err(error),
            Err(error) => eprintln!("strait: event feed ended: {error:#}"),
            Ok(()) => eprintln!("strait: event feed ended"),
        }
        let delay = backoff.next_delay();
        eprintln!("strait: reconnecting in {:.1}s", delay.as_secs_f32());
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}

/// Reads one feed connection, sending each event's JSON text to `tx`.
async fn feed(api: &EngineApi, options: &Options, tx: tokio::sync::mpsc::Sender<String>) -> anyhow::Result<()> {
    match options.transport {
        Transport::Sse => {
            let response = api.get(&with_params("/api/sse", options.params.as_ref()), "text/event-stream").await?;
            let status = response.status();
            if !status.is_success() {
                let body = response.into_body().collect().await?.to_bytes();
                anyhow::bail!("/api/sse: {}", failure(status, &body));
            }
            let mut body = response.into_body();
            let mut parser = SseParser::default();
            while let Some(frame) = body.frame().await {
                if let Ok(data) = frame?.into_data() {
                    for event in parser.push(&data) {
                        if tx.send(event).await.is_err() {
                            return Ok(());
                        }
                    }
                }
            }
            if let Some(reason) = parser.last_comment {
                anyhow::bail!("{reason}");
            }
            Ok(())
        }
        Transport::Websocket => {
            let tls = api.client().connect_api().await?;
            let path = with_params("/api/websocket", options.params.as_ref());
            let mut request = format!("wss://{}{path}", api.client().api_authority()).into_client_request()?;
            if let Some(token) = &api.client().config().token {
                request.headers_mut().insert(header::AUTHORIZATION, format!("Bearer {token}").parse()?);
            }
            let (mut socket, _) = tokio_tungstenite::client_async(request, tls).await?;
            while let Some(message) = socket.next().await {
                match message? {
                    WsMessage::Text(text) if tx.send(text.to_string()).await.is_err() => {
                        return Ok(());
                    }
                    WsMessage::Close(Some(frame)) => anyhow::bail!("closed by the engine: {}", frame.reason),
                    WsMessage::Close(None) => return Ok(()),
                    _ => {}
                }
            }
            Ok(())
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

async fn deliver(options: &Options, poster: Option<&Poster>, text: &str) {
    let Ok(event) = serde_json::from_str::<Value>(text) else {
        eprintln!("strait: ignoring an event that is not JSON");
        return;
    };
    let kind = event.get("type").and_then(Value::as_str).unwrap_or_default();
    if !options.types.is_empty() && !options.types.iter().any(|t| t == kind) {
        return;
    }
    match (&options.sink, poster) {
        (Sink::Post { webhook: Some(webhook), .. }, Some(poster)) => {
            if !DELIVERABLE.contains(&kind) {
                return;
            }
            let body = webhook_body(&event);
            let delivery = format!("dlv_{}", hex_id());
            let headers = webhook_headers(&body, &event, webhook, &delivery, unix_now());
            poster.post(body, headers).await;
        }
        (Sink::Post { .. }, Some(poster)) => poster.post(text.as_bytes().to_vec(), Vec::new()).await,
        _ => println!("{text}"),
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

/// POSTs bodies to one URL, retrying what may succeed later.
struct Poster {
    url: http::Uri,
    tls: Option<tokio_rustls::TlsConnector>,
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
        Ok(Self { url, tls })
    }

    async fn post(&self, body: Vec<u8>, headers: Vec<(&'static str, String)>) {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
        for attempt in 1..=5 {
            match self.send(&body, &headers).await {
                Ok(status) if status.is_success() => return,
                Ok(status) if status.is_server_error() || status.as_u16() == 429 => {
                    eprintln!("strait: {} answered {status} (attempt {attempt})", self.url);
                }
                Ok(status) => {
                    eprintln!("strait: {} refused the event: {status}", self.url);
                    return;
                }
                Err(error) => eprintln!("strait: cannot deliver to {}: {error:#} (attempt {attempt})", self.url),
            }
            tokio::time::sleep(backoff.next_delay()).await;
        }
        eprintln!("strait: event dropped after 5 attempts");
    }

    async fn send(&self, body: &[u8], headers: &[(&'static str, String)]) -> anyhow::Result<http::StatusCode> {
        let host = self.url.host().expect("checked in new");
        let default_port = if self.tls.is_some() { 443 } else { 80 };
        let port = self.url.port_u16().unwrap_or(default_port);
        let tcp = TcpStream::connect((host.trim_start_matches('[').trim_end_matches(']'), port)).await?;
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
        let request = request.body(Full::new(Bytes::copy_from_slice(body)))?;
        let response = match &self.tls {
            Some(connector) => {
                let name = rustls::pki_types::ServerName::try_from(host.to_string())?;
                let tls = connector.connect(name, tcp).await?;
                send_on(TokioIo::new(tls), request).await?
            }
            None => send_on(TokioIo::new(tcp), request).await?,
        };
        Ok(response)
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
    let response = tokio::time::timeout(Duration::from_secs(30), sender.send_request(request))
        .await
        .map_err(|_| anyhow::anyhow!("no answer in 30s"))??;
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

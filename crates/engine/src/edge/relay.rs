//! The HTTP/1.1 relay: the fast lane for plain requests on a published
//! tunnel.
//!
//! Most requests are a head without a body: a page, an asset, an API read.
//! Through hyper each one is parsed into a header map, rebuilt, handed
//! through a channel to a client-connection task, parsed again on the way
//! back and re-framed. The relay reads the request head with httparse,
//! writes the rewritten head to one agent stream it keeps for the
//! connection, and passes the response through byte for byte, tracking
//! only where it ends (`Content-Length`, chunked framing, or the close).
//!
//! It takes only what it forwards exactly as the hyper path would. A request
//! with a body, an upgrade, `Expect`, a `token_auth` or `h2c` tunnel, a head
//! it cannot parse, a host no tunnel serves: the relay hands the connection
//! to hyper ([`super::http`]) with the bytes it already read and its idle
//! agent stream, and hyper serves the rest of the connection. Every refusal
//! page about the request itself therefore comes from one place; the relay
//! answers only for failures of the agent side (502, 503, 504).

use std::pin::Pin;
use std::sync::Arc;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::WaitForCancellationFutureOwned;

use super::activity::Tracked;
use super::cache;
use super::chunked;
use super::errors::Refusal;
use super::headers::{self, X_FORWARDED_FOR, X_FORWARDED_HOST, X_FORWARDED_PROTO};
use super::http::Edge;
use super::route;
use super::upstream::{self, AgentStream};
use crate::policy::Policy;
use crate::registry::Tunnel;

/// Longest request head the relay waits for before leaving the connection
/// to hyper (which has its own limit and answers 431 beyond it).
const MAX_HEAD: usize = 64 * 1024;
/// Longest response head accepted from a service.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// Headers per head, as hyper allows.
const MAX_HEADERS: usize = 100;
/// Bytes asked of the client per read: request heads are small.
const HEAD_READ: usize = 4 * 1024;
/// Bytes asked of the agent stream per read: responses carry the bodies.
const READ_SIZE: usize = 16 * 1024;

/// The public connection, TLS terminated.
pub type PublicTls = tokio_rustls::server::TlsStream<Tracked<TcpStream>>;

/// An idle agent stream the relay leaves to hyper's pool.
pub struct Kept {
    pub tunnel: Arc<Tunnel>,
    pub io: AgentStream,
}

/// How the relay left the connection.
pub enum Outcome {
    /// The connection is over.
    Closed,
    /// hyper serves the rest, starting with `buffered`.
    HandOff { buffered: Bytes, kept: Option<Kept> },
}

/// Relays plain requests until the connection ends or one needs hyper.
pub async fn relay(edge: &Edge, public: &mut PublicTls) -> Outcome {
    let mut relay = Relay {
        edge,
        client: headers::client_ip(edge.peer.ip()).to_string(),
        public,
        inbuf: BytesMut::new(),
        upbuf: BytesMut::new(),
        up_head: Vec::new(),
        down_head: Vec::new(),
        upstream: None,
    };
    let deadline = tokio::time::sleep(edge.idle);
    // Registered once for the connection, not once per request.
    let shutdown = edge.shared.shutdown.clone().cancelled_owned();
    tokio::pin!(deadline, shutdown);
    loop {
        deadline.as_mut().reset(Instant::now() + edge.idle);
        let mut plan = match relay.next_request(deadline.as_mut(), shutdown.as_mut()).await {
            Next::Relay(plan) => plan,
            Next::Refuse(refused) => {
                relay.inbuf.advance(refused.len);
                let keep_public = relay.refuse_request(&refused).await;
                if !keep_public || refused.close || edge.shared.shutdown.is_cancelled() {
                    return relay.close().await;
                }
                continue;
            }
            Next::Cached(cached) => {
                relay.inbuf.advance(cached.len);
                let close = cached.close;
                if !relay.answer_cached(cached).await || close || edge.shared.shutdown.is_cancelled() {
                    return relay.close().await;
                }
                continue;
            }
            Next::Close => return relay.close().await,
            Next::HandOff => return relay.hand_off(),
        };
        relay.inbuf.advance(plan.len);
        let verified = match plan.pending.take() {
            Some(pending) => pending.verify(&edge.shared, edge.peer.ip()).await,
            None => Ok(()),
        };
        let exchanged = match verified {
            Ok(()) => relay.exchange(&plan).await,
            Err(refusal) => Err(Failure::Refused(refusal)),
        };
        let keep_public = match exchanged {
            Ok(keep) => keep,
            Err(Failure::Refused(refusal)) => {
                relay.upstream = None;
                // A body may be left half read: the connection ends.
                relay.refuse(&plan, refusal).await && plan.body == 0
            }
            Err(Failure::Broken(error)) => {
                tracing::debug!(peer = %edge.peer, host = %plan.host, %error, "relayed response cut short");
                return Outcome::Closed;
            }
        };
        if !keep_public || plan.close || edge.shared.shutdown.is_cancelled() {
            return relay.close().await;
        }
    }
}

/// A request the relay forwards.
struct Plan {
    tunnel: Arc<Tunnel>,
    /// The published hostname, for logs.
    host: String,
    /// Length of the request head in the public buffer.
    len: usize,
    /// A `HEAD` request: the response has no body whatever it says.
    head_only: bool,
    /// The client asked to close after this response.
    close: bool,
    /// A basic-auth password to verify before the request goes on.
    pending: Option<route::Pending>,
    /// The request body's length (`Content-Length`), after the head.
    body: u64,
}

/// A request the relay answers itself with a refusal (it has no body).
struct Refused {
    len: usize,
    host: String,
    method: String,
    path: String,
    refusal: Refusal,
    head_only: bool,
    close: bool,
}

/// A request the relay answers from the edge cache (it has no body).
struct Cached {
    len: usize,
    host: String,
    method: String,
    path: String,
    response: http::Response<super::http::PublicBody>,
    head_only: bool,
    close: bool,
}

enum Next {
    Relay(Plan),
    Refuse(Refused),
    Cached(Cached),
    Close,
    HandOff,
}

/// How a response is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Empty,
    Length(u64),
    Chunked,
    /// Until the service closes: the public connection closes after it.
    UntilClose,
}

/// A response head, parsed and rewritten into `down_head`.
#[derive(Debug)]
struct Answer {
    len: usize,
    status: u16,
    framing: Framing,
    /// The agent stream may carry another request after this response.
    reusable: bool,
}

enum Failure {
    /// Nothing of the response reached the client: answer with a page.
    Refused(Refusal),
    /// The response was partly sent: only closing can tell the client.
    Broken(String),
}

struct Upstream {
    tunnel: Arc<Tunnel>,
    io: AgentStream,
    /// Whether it already carried a response (and so may have been closed
    /// by the service meanwhile).
    served: bool,
}

struct Relay<'a> {
    edge: &'a Edge,
    /// The client's address as `X-Forwarded-For` gives it.
    client: String,
    public: &'a mut PublicTls,
    /// Bytes read from the client and not yet forwarded.
    inbuf: BytesMut,
    /// Bytes read from the agent stream and not yet forwarded.
    upbuf: BytesMut,
    /// The request head as the service receives it.
    up_head: Vec<u8>,
    /// The response head as the client receives it.
    down_head: Vec<u8>,
    upstream: Option<Upstream>,
}

impl Relay<'_> {
    /// Reads the next request head, within the idle limit.
    async fn next_request(
        &mut self,
        mut deadline: Pin<&mut tokio::time::Sleep>,
        mut shutdown: Pin<&mut WaitForCancellationFutureOwned>,
    ) -> Next {
        loop {
            if !self.inbuf.is_empty() {
                match plan(self.edge, &self.client, &self.inbuf, &mut self.up_head) {
                    Parsed::Relay(plan) => return Next::Relay(plan),
                    Parsed::Refuse(refused) => return Next::Refuse(refused),
                    Parsed::Cached(cached) => return Next::Cached(cached),
                    Parsed::Other => return Next::HandOff,
                    Parsed::Partial if self.inbuf.len() >= MAX_HEAD => return Next::HandOff,
                    Parsed::Partial => {}
                }
            }
            let idle = self.inbuf.is_empty();
            if idle && self.upbuf.capacity() > HEAD_READ {
                // A keep-alive connection waiting for its next request keeps
                // small buffers only; a large body's buffer goes.
                self.upbuf = BytesMut::new();
            }
            self.inbuf.reserve(HEAD_READ);
            tokio::select! {
                biased;
                read = self.public.read_buf(&mut self.inbuf) => match read {
                    Ok(0) | Err(_) => return Next::Close,
                    Ok(_) => {}
                },
                _ = deadline.as_mut() => {
                    tracing::debug!(peer = %self.edge.peer, "published connection idle for {}s; closing", self.edge.idle.as_secs());
                    return Next::Close;
                }
                // Engine shutdown closes connections between requests.
                _ = shutdown.as_mut(), if idle => return Next::Close,
            }
        }
    }

    fn hand_off(self) -> Outcome {
        let kept = self.upstream.map(|u| Kept { tunnel: u.tunnel, io: u.io });
        Outcome::HandOff { buffered: self.inbuf.freeze(), kept }
    }

    async fn close(self) -> Outcome {
        // close_notify and FIN; a client that stopped reading does not
        // hold the task.
        let _ = tokio::time::timeout(self.edge.idle, self.public.shutdown()).await;
        Outcome::Closed
    }

    /// Forwards one request and its response. Returns whether the public
    /// connection can carry another request.
    async fn exchange(&mut self, plan: &Plan) -> Result<bool, Failure> {
        // A body already read whole can be sent again if a kept stream
        // fails; a longer one streams from the client once.
        let whole = plan.body <= self.inbuf.len() as u64;
        let result = self.exchange_once(plan, whole).await;
        if whole {
            self.inbuf.advance(plan.body as usize);
        }
        result
    }

    async fn exchange_once(&mut self, plan: &Plan, whole: bool) -> Result<bool, Failure> {
        let edge = self.edge;
        let mut retried = false;
        let answer = loop {
            // A body that streams can go once only: a kept stream the
            // service already closed is not worth the risk.
            let stale = !whole && self.upstream.as_mut().is_some_and(|u| u.served && closed(&mut u.io));
            if stale || self.upstream.as_ref().is_none_or(|u| !Arc::ptr_eq(&u.tunnel, &plan.tunnel)) {
                let io = upstream::open(&edge.shared, &plan.tunnel, edge.peer.ip(), &[b"http/1.1"])
                    .await
                    .map_err(Failure::Refused)?;
                self.upstream = Some(Upstream { tunnel: plan.tunnel.clone(), io, served: false });
            }
            match self.ask(plan).await {
                Ok(answer) => break answer,
                Err(HeadError { reason, silent }) => {
                    let up = self.upstream.take().expect("asked above");
                    if silent && up.served && !retried && whole {
                        // A kept stream the service closed meanwhile: the
                        // request (its body is still here) goes again on a
                        // fresh one.
                        tracing::debug!(host = %plan.host, ?reason, "kept agent stream failed; retrying on a fresh one");
                        retried = true;
                        continue;
                    }
                    return Err(Failure::Refused(reason));
                }
            }
        };
        edge.shared.metrics.http_response(answer.status);
        let up = self.upstream.as_mut().expect("answered above");
        up.served = true;
        self.upbuf.advance(answer.len);
        let complete = forward_body(self.public, &mut up.io, &mut self.upbuf, &mut self.down_head, answer.framing)
            .await
            .map_err(Failure::Broken)?;
        if !(answer.reusable && complete && self.upbuf.is_empty()) {
            // Bytes beyond the response, or a service that closes: the
            // stream cannot carry the next request.
            self.upstream = None;
            self.upbuf.clear();
        }
        Ok(answer.framing != Framing::UntilClose)
    }

    /// Sends the request head and reads the final response head (passing
    /// interim `1xx` heads on to the client).
    async fn ask(&mut self, plan: &Plan) -> Result<Answer, HeadError> {
        let edge = self.edge;
        let head_only = plan.head_only;
        let policy = &plan.tunnel.spec.policy;
        let rules = (!policy.response_headers.is_empty() || policy.rewrite_location)
            .then(|| (&**policy, plan.host.as_str(), edge.shared.public_port));
        let up = self.upstream.as_mut().expect("opened by the caller");
        self.upbuf.clear();
        let unsent = |e: std::io::Error| HeadError::silent(format!("writing to the agent stream: {e}"));
        up.io.write_all(&self.up_head).await.map_err(unsent)?;
        if plan.body > 0 {
            let buffered = (plan.body as usize).min(self.inbuf.len());
            up.io.write_all(&self.inbuf[..buffered]).await.map_err(unsent)?;
            let rest = plan.body - buffered as u64;
            if rest > 0 {
                // The caller keeps a whole body for a retry; a longer one
                // is gone once sent.
                self.inbuf.advance(buffered);
                stream_body(self.public, &mut up.io, &mut self.upbuf, rest, edge).await?;
            }
        }
        up.io.flush().await.map_err(unsent)?;
        let mut heard = false;
        loop {
            if !self.upbuf.is_empty() {
                match parse_answer(&self.upbuf, head_only, rules, &mut self.down_head) {
                    Ok(Some(answer)) if (100..200).contains(&answer.status) => {
                        self.public.write_all(&self.down_head).await.map_err(|e| HeadError::heard(e.to_string()))?;
                        self.public.flush().await.map_err(|e| HeadError::heard(e.to_string()))?;
                        self.upbuf.advance(answer.len);
                        continue;
                    }
                    Ok(Some(answer)) => return Ok(answer),
                    Ok(None) if self.upbuf.len() >= MAX_RESPONSE_HEAD => {
                        return Err(HeadError::heard("response head too large".into()));
                    }
                    Ok(None) => {}
                    Err(reason) => return Err(HeadError::heard(reason)),
                }
            }
            self.upbuf.reserve(HEAD_READ);
            // A service that says nothing on a silent connection gets a
            // 504 instead of holding the client forever (or, with the
            // policy's response_timeout_seconds, after that long).
            let timed_out = HeadError { reason: Refusal::Timeout, silent: false };
            let read = match policy.response_timeout {
                None => tokio::select! {
                    biased;
                    read = up.io.read_buf(&mut self.upbuf) => read,
                    _ = edge.activity.quiet(edge.idle) => return Err(timed_out),
                },
                Some(wait) => match tokio::time::timeout(wait, up.io.read_buf(&mut self.upbuf)).await {
                    Ok(read) => read,
                    Err(_) => return Err(timed_out),
                },
            };
            match read {
                Ok(0) if !heard => return Err(HeadError::silent("closed before answering".into())),
                Ok(0) => return Err(HeadError::heard("closed in the response head".into())),
                Ok(_) => heard = true,
                Err(e) if !heard => return Err(HeadError::silent(format!("reading the agent stream: {e}"))),
                Err(e) => return Err(HeadError::heard(format!("reading the agent stream: {e}"))),
            }
        }
    }

    /// Answers with the engine's page for a refusal. Returns whether the
    /// connection can carry another request.
    async fn refuse(&mut self, plan: &Plan, refusal: Refusal) -> bool {
        let (method, path) = request_line(&self.up_head);
        let (method, path) = (method.to_string(), path.to_string());
        self.write_refusal(&plan.host, &method, &path, &refusal, plan.head_only).await
    }

    /// Writes a response from the edge cache (its length is known).
    /// Returns whether the connection can carry another request.
    async fn answer_cached(&mut self, cached: Cached) -> bool {
        let Cached { host, method, path, response, head_only, .. } = cached;
        let (parts, mut body) = response.into_parts();
        self.edge.shared.metrics.http_response(parts.status.as_u16());
        tracing::debug!(%host, %method, %path, status = parts.status.as_u16(), "answered from the edge cache");
        let mut out = std::mem::take(&mut self.down_head);
        out.clear();
        out.extend_from_slice(b"HTTP/1.1 ");
        out.extend_from_slice(parts.status.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(parts.status.canonical_reason().unwrap_or_default().as_bytes());
        out.extend_from_slice(b"\r\n");
        for (name, value) in &parts.headers {
            write_header(&mut out, name.as_str(), value.as_bytes());
        }
        out.extend_from_slice(b"\r\n");
        let written = async {
            use http_body_util::BodyExt;
            self.public.write_all(&out).await?;
            if !head_only {
                while let Some(frame) = body.frame().await {
                    let frame = frame.map_err(std::io::Error::other)?;
                    if let Ok(data) = frame.into_data() {
                        self.public.write_all(&data).await?;
                    }
                }
            }
            self.public.flush().await
        };
        let ok = written.await.is_ok();
        self.down_head = out;
        ok
    }

    /// Answers a request the route refused.
    async fn refuse_request(&mut self, refused: &Refused) -> bool {
        self.write_refusal(&refused.host, &refused.method, &refused.path, &refused.refusal, refused.head_only).await
    }

    async fn write_refusal(
        &mut self,
        host: &str,
        method: &str,
        path: &str,
        refusal: &Refusal,
        head_only: bool,
    ) -> bool {
        self.edge.log_refusal(host, method, path, refusal);
        self.edge.shared.metrics.http_response(refusal.status().as_u16());
        let mut page = refusal.http1();
        if head_only {
            // A HEAD answer has the page's headers, not its body.
            let end = page.windows(4).position(|w| w == b"\r\n\r\n").map_or(page.len(), |i| i + 4);
            page.truncate(end);
        }
        self.public.write_all(&page).await.is_ok() && self.public.flush().await.is_ok()
    }
}

struct HeadError {
    reason: Refusal,
    /// Not one byte came back: the service may never have seen the request.
    silent: bool,
}

impl HeadError {
    fn silent(reason: String) -> Self {
        Self { reason: Refusal::Upstream(reason), silent: true }
    }

    fn heard(reason: String) -> Self {
        Self { reason: Refusal::Upstream(reason), silent: false }
    }

    /// Logs why, keeping the refusal.
    fn noted(self, why: String) -> Self {
        tracing::debug!(%why, "relayed request body failed");
        self
    }
}

/// Whether a kept agent stream was closed (or spoke out of turn) while it
/// waited: a read that completes at once says so; one that would wait
/// means it is open.
fn closed(io: &mut AgentStream) -> bool {
    let mut probe = [0u8; 1];
    futures_util::FutureExt::now_or_never(io.read(&mut probe)).is_some()
}

/// Copies `left` request body bytes from the client to the agent stream,
/// within the idle limit (the client sending nothing for that long ends
/// it).
async fn stream_body<R, W>(
    public: &mut R,
    upstream: &mut W,
    buf: &mut BytesMut,
    mut left: u64,
    edge: &Edge,
) -> Result<(), HeadError>
where
    R: tokio::io::AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let heard =
        |why: String| HeadError { reason: Refusal::BadRequest("request body cut short"), silent: false }.noted(why);
    while left > 0 {
        let want = (left as usize).min(READ_SIZE);
        buf.clear();
        buf.resize(want, 0);
        let read = tokio::select! {
            read = public.read(&mut buf[..want]) => read,
            _ = edge.activity.quiet(edge.idle) => return Err(heard("the client sent no body bytes in time".into())),
        };
        match read {
            Ok(0) => return Err(heard("the client closed in the body".into())),
            Ok(n) => {
                left -= n as u64;
                upstream.write_all(&buf[..n]).await.map_err(|e| HeadError::heard(format!("writing the body: {e}")))?;
            }
            Err(e) => return Err(heard(format!("reading the body: {e}"))),
        }
    }
    buf.clear();
    Ok(())
}

/// Writes the response head and its body to the client. Returns whether
/// the body ended where its framing said (rather than at a close).
async fn forward_body<W, R>(
    public: &mut W,
    upstream: &mut R,
    upbuf: &mut BytesMut,
    head: &mut Vec<u8>,
    framing: Framing,
) -> Result<bool, String>
where
    W: AsyncWrite + Unpin,
    R: tokio::io::AsyncRead + Unpin,
{
    let mut chunks = chunked::Scanner::new();
    let mut left = match framing {
        Framing::Length(n) => n,
        _ => 0,
    };
    // The head goes out with the first body bytes, in one TLS record when
    // the response is small.
    let mut out = std::mem::take(head);
    let mut done = framing == Framing::Empty || framing == Framing::Length(0);
    loop {
        if !done {
            let take = match framing {
                Framing::Length(_) => {
                    let take = (left as usize).min(upbuf.len());
                    left -= take as u64;
                    done = left == 0;
                    take
                }
                Framing::Chunked => {
                    let (take, end) = chunks.scan(upbuf).map_err(|e| e.to_string())?;
                    done = end;
                    take
                }
                Framing::UntilClose => upbuf.len(),
                Framing::Empty => 0,
            };
            out.extend_from_slice(&upbuf[..take]);
            upbuf.advance(take);
        }
        if !out.is_empty() {
            let written = async {
                public.write_all(&out).await?;
                public.flush().await
            };
            written.await.map_err(|e| format!("writing to the client: {e}"))?;
            out.clear();
        }
        if done {
            *head = out;
            return Ok(true);
        }
        upbuf.reserve(READ_SIZE);
        match upstream.read_buf(upbuf).await {
            Ok(0) if framing == Framing::UntilClose => {
                *head = out;
                return Ok(false);
            }
            Ok(0) => return Err("the service closed in the middle of the body".into()),
            Ok(_) => {}
            Err(e) => return Err(format!("reading the agent stream: {e}")),
        }
    }
}

enum Parsed {
    Relay(Plan),
    Refuse(Refused),
    Cached(Cached),
    Partial,
    /// Not for the relay: hyper serves it.
    Other,
}

fn eq(a: &str, b: &str) -> bool {
    a.eq_ignore_ascii_case(b)
}

/// Whether one of the comma-separated `lists` holds `token`.
fn listed(lists: &[&str], token: &str) -> bool {
    headers::lists_token(lists.iter().copied(), token)
}

fn write_header(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// The request headers whose values the relay acts on.
const DECIDING: [&str; 7] =
    ["host", "content-length", "transfer-encoding", "upgrade", "expect", "connection", "x-forwarded-for"];

/// Reads a request head and decides whether the relay forwards it; if so,
/// writes the head the service receives into `out`.
fn plan(edge: &Edge, client: &str, bytes: &[u8], out: &mut Vec<u8>) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let len = match request.parse(bytes) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(_) => return Parsed::Other,
    };
    let (Some(method), Some(path), Some(1)) = (request.method, request.path, request.version) else {
        return Parsed::Other;
    };
    if method == "CONNECT" || !path.starts_with('/') {
        return Parsed::Other;
    }
    let mut host = None;
    let mut body: Option<u64> = None;
    let mut authorization = None;
    let mut connection: Vec<&str> = Vec::new();
    let mut forwarded_for: Vec<&str> = Vec::new();
    for header in request.headers.iter() {
        let name = header.name;
        let Ok(value) = std::str::from_utf8(header.value) else {
            // A value the relay would act on but cannot read sends the
            // request to hyper, which has the last word (a framing header
            // it cannot read is a 400 there), rather than on to the
            // service unread.
            if DECIDING.iter().any(|d| eq(name, d)) {
                return Parsed::Other;
            }
            continue;
        };
        if eq(name, "host") {
            if host.replace(value).is_some() {
                return Parsed::Other;
            }
        } else if eq(name, "content-length") {
            // One plain length; anything else is hyper's to judge.
            match value.trim().parse::<u64>() {
                Ok(n) if body.is_none() && value.trim().bytes().all(|b| b.is_ascii_digit()) => body = Some(n),
                _ => return Parsed::Other,
            }
        } else if eq(name, "transfer-encoding") || eq(name, "upgrade") || eq(name, "expect") {
            return Parsed::Other;
        } else if eq(name, "connection") {
            connection.push(value);
        } else if eq(name, X_FORWARDED_FOR.as_str()) {
            forwarded_for.push(value.trim());
        } else if eq(name, "authorization") && authorization.is_none() {
            authorization = Some(value);
        }
    }
    let Some(given_host) = host else { return Parsed::Other };
    if listed(&connection, "upgrade") {
        return Parsed::Other;
    }
    let name = edge.published_name(Some(given_host));
    let head = route::Head { host: &name, method, target: path, authorization, source: edge.peer.ip() };
    let head_only = method == "HEAD";
    let body = body.unwrap_or(0);
    // A refused request's body is not read: the connection ends after the
    // refusal.
    let close = listed(&connection, "close") || body > 0;
    let refuse = |refusal: Refusal| {
        let (method, path) = (method.to_string(), path.to_string());
        Parsed::Refuse(Refused { len, host: name.clone(), method, path, refusal, head_only, close })
    };
    let route = match route::decide(&edge.shared, &head) {
        Ok(route) => route,
        Err(refusal) => return refuse(refusal),
    };
    if route.policy().max_request_body_bytes.is_some_and(|limit| body > limit) {
        return refuse(Refusal::TooLarge);
    }
    let tunnel = route.tunnel.clone();
    if tunnel.spec.token_auth || upstream::h2c(&tunnel) {
        return Parsed::Other;
    }
    // The edge cache: a stored object is answered here; a miss (which may
    // lead a fetch for others) is hyper's.
    if let Some(rule) = route.policy().cache.as_ref().filter(|c| c.covers(path))
        && (method == "GET" || head_only)
    {
        if route.pending.is_some() {
            return Parsed::Other;
        }
        let mut asked = http::HeaderMap::new();
        for header in request.headers.iter() {
            let consumed = route.consumed_authorization && eq(header.name, "authorization");
            if let (false, Ok(name), Ok(value)) = (
                consumed,
                http::HeaderName::from_bytes(header.name.as_bytes()),
                http::HeaderValue::from_bytes(header.value),
            ) {
                asked.append(name, value);
            }
        }
        let method = if head_only { http::Method::HEAD } else { http::Method::GET };
        if !cache::eligible(&method, &asked) {
            return Parsed::Other;
        }
        let store = edge.shared.cache.store(&cache::store_name(&tunnel), rule);
        let Some(entry) = store.hit(path, &asked) else { return Parsed::Other };
        let mut response = entry.respond(&method, &asked);
        super::http::response_policy(response.headers_mut(), &tunnel.spec.policy, &name, edge.shared.public_port);
        let (method, path) = (method.to_string(), path.to_string());
        return Parsed::Cached(Cached { len, host: name, method, path, response, head_only, close });
    }
    let policy = &tunnel.spec.policy;

    // The head the service receives: the request line as sent, every
    // header byte for byte in its order and spelling, minus this hop's,
    // with the X-Forwarded-* set as the hyper path sets them.
    out.clear();
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(route.target.as_deref().unwrap_or(path).as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    // Each X-Forwarded-* header is written once, where the client first
    // sent it (keeping its spelling), else at the end.
    let forwarded = [X_FORWARDED_FOR, X_FORWARDED_PROTO, X_FORWARDED_HOST];
    let write_forwarded = |out: &mut Vec<u8>, slot: usize, name: &str| {
        match slot {
            0 => {
                // Written in place: no allocation for the chain.
                out.extend_from_slice(name.as_bytes());
                out.extend_from_slice(b": ");
                for prior in &forwarded_for {
                    out.extend_from_slice(prior.as_bytes());
                    out.extend_from_slice(b", ");
                }
                out.extend_from_slice(client.as_bytes());
                out.extend_from_slice(b"\r\n");
            }
            1 => write_header(out, name, b"https"),
            _ => write_header(out, name, given_host.as_bytes()),
        }
    };
    let mut wrote = [false; 3];
    let mut consumed = route.consumed_authorization;
    let rules = &policy.request_headers;
    for header in request.headers.iter() {
        let name = header.name;
        if headers::is_hop_by_hop(name) || listed(&connection, name) {
            continue;
        }
        if consumed && eq(name, "authorization") {
            // Basic auth's proof stays here (the first Authorization).
            consumed = false;
            continue;
        }
        if !rules.is_empty() && rules.touches(name) {
            continue;
        }
        if let Some(upstream_host) = &policy.host
            && eq(name, "host")
        {
            write_header(out, name, upstream_host.as_bytes());
            continue;
        }
        match forwarded.iter().position(|h| eq(name, h.as_str())) {
            None => write_header(out, name, header.value),
            Some(slot) if wrote[slot] => {}
            Some(slot) => {
                wrote[slot] = true;
                write_forwarded(out, slot, name);
            }
        }
    }
    for (slot, name) in forwarded.iter().enumerate() {
        if !wrote[slot] {
            write_forwarded(out, slot, name.as_str());
        }
    }
    for (name, value) in &rules.set {
        write_header(out, name.as_str(), value.as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    let close = listed(&connection, "close");
    Parsed::Relay(Plan { tunnel, host: name, len, head_only, close, pending: route.pending, body })
}

/// Reads a response head; if complete, writes the head the client receives
/// into `out`.
///
/// `rules`: the tunnel's policy, the public hostname and port, when the policy
/// changes responses (header rules, `rewrite_location`).
fn parse_answer(
    bytes: &[u8],
    head_only: bool,
    rules: Option<(&Policy, &str, u16)>,
    out: &mut Vec<u8>,
) -> Result<Option<Answer>, String> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    let len = match response.parse(bytes) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(error) => return Err(format!("unparsable response head: {error}")),
    };
    let status = response.code.unwrap_or_default();
    if status == 101 {
        return Err("unexpected 101 Switching Protocols".into());
    }
    let mut connection: Vec<&str> = Vec::new();
    let mut encoded = None;
    let mut length: Option<u64> = None;
    for header in response.headers.iter() {
        let value = std::str::from_utf8(header.value).unwrap_or_default();
        if eq(header.name, "connection") {
            connection.push(value);
        } else if eq(header.name, "transfer-encoding") {
            // The last coding decides; only `chunked` frames the body.
            let last = value.rsplit(',').next().unwrap_or_default();
            encoded = Some(eq(last.trim(), "chunked"));
        } else if eq(header.name, "content-length") {
            for item in value.split(',') {
                let n: u64 = item.trim().parse().map_err(|_| format!("bad Content-Length {value:?}"))?;
                if length.is_some_and(|l| l != n) {
                    return Err("conflicting Content-Length".into());
                }
                length = Some(n);
            }
        }
    }
    let keep_alive = match response.version {
        Some(1) => !listed(&connection, "close"),
        _ => listed(&connection, "keep-alive"),
    };
    let framing = if head_only || (100..200).contains(&status) || status == 204 || status == 304 {
        Framing::Empty
    } else {
        match (encoded, length) {
            (Some(true), _) => Framing::Chunked,
            (Some(false), _) => Framing::UntilClose,
            (None, Some(n)) => Framing::Length(n),
            (None, None) => Framing::UntilClose,
        }
    };
    out.clear();
    // A status is three digits (httparse checks).
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(&[b'0' + (status / 100) as u8, b'0' + (status / 10 % 10) as u8, b'0' + (status % 10) as u8]);
    out.push(b' ');
    let reason = response.reason.filter(|r| !r.is_empty());
    let reason = reason.or_else(|| http::StatusCode::from_u16(status).ok().and_then(|s| s.canonical_reason()));
    out.extend_from_slice(reason.unwrap_or_default().as_bytes());
    out.extend_from_slice(b"\r\n");
    for header in response.headers.iter() {
        let name = header.name;
        // A chunked body passes through as it is, framing and all.
        let framing_header = eq(name, "transfer-encoding") && encoded.is_some();
        let superseded = eq(name, "content-length") && encoded.is_some();
        if superseded || (!framing_header && headers::is_hop_by_hop(name)) || listed(&connection, name) {
            continue;
        }
        if let Some((policy, public, public_port)) = rules {
            if policy.response_headers.touches(name) {
                continue;
            }
            if let (true, Some(upstream)) = (policy.rewrite_location, policy.host.as_deref()) {
                let value = std::str::from_utf8(header.value).unwrap_or_default();
                let rewritten = if eq(name, "location") || eq(name, "content-location") {
                    route::rewrite_location(value, upstream, public, public_port)
                } else if eq(name, "set-cookie") {
                    route::rewrite_cookie_domain(value, upstream, public)
                } else {
                    None
                };
                if let Some(rewritten) = rewritten {
                    write_header(out, name, rewritten.as_bytes());
                    continue;
                }
            }
        }
        write_header(out, name, header.value);
    }
    if let Some((policy, _, _)) = rules {
        for (name, value) in &policy.response_headers.set {
            write_header(out, name.as_str(), value.as_bytes());
        }
    }
    if framing == Framing::UntilClose {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    let reusable = keep_alive && framing != Framing::UntilClose;
    Ok(Some(Answer { len, status, framing, reusable }))
}

/// Method and target of a request head, for logs.
fn request_line(head: &[u8]) -> (&str, &str) {
    let line = head.split(|b| *b == b'\r').next().unwrap_or_default();
    let line = std::str::from_utf8(line).unwrap_or_default();
    let mut words = line.split(' ');
    (words.next().unwrap_or_default(), words.next().unwrap_or_default())
}

/// The relay's two head parsers for `crate::fuzzing` (the fuzz targets and
/// property tests): what [`plan`] and [`parse_answer`] decided, and nothing
/// else.
#[doc(hidden)]
pub mod fuzzing {
    use super::{Edge, Framing, Parsed};

    /// What the relay makes of a request head.
    #[derive(Debug, PartialEq, Eq)]
    pub enum Request {
        /// Relayed to `tunnel_id` (served as `host`): the head is the first
        /// `len` bytes, and the head the service receives is in `out`.
        Relay {
            tunnel_id: String,
            host: String,
            len: usize,
            head_only: bool,
            close: bool,
        },
        Partial,
        /// Left to hyper.
        Other,
    }

    pub fn request(edge: &Edge, client: &str, bytes: &[u8], out: &mut Vec<u8>) -> Request {
        match super::plan(edge, client, bytes, out) {
            Parsed::Relay(plan) => Request::Relay {
                tunnel_id: plan.tunnel.id.clone(),
                host: plan.host,
                len: plan.len,
                head_only: plan.head_only,
                close: plan.close,
            },
            Parsed::Partial => Request::Partial,
            Parsed::Other | Parsed::Refuse(_) | Parsed::Cached(_) => Request::Other,
        }
    }

    /// A response head as the relay reads it.
    #[derive(Debug, PartialEq, Eq)]
    pub struct Response {
        pub len: usize,
        pub status: u16,
        pub framing: Framing,
        pub reusable: bool,
    }

    pub fn response(bytes: &[u8], head_only: bool, out: &mut Vec<u8>) -> Result<Option<Response>, String> {
        let answer = super::parse_answer(bytes, head_only, None, out)?;
        Ok(answer.map(|a| Response { len: a.len, status: a.status, framing: a.framing, reusable: a.reusable }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(head: &str, head_only: bool) -> (Answer, String) {
        let mut out = Vec::new();
        let answer = parse_answer(head.as_bytes(), head_only, None, &mut out).unwrap().unwrap();
        (answer, String::from_utf8(out).unwrap())
    }

    #[test]
    fn response_framing() {
        let (a, out) = answer("HTTP/1.1 200 OK\r\nContent-Length: 5\r\nKeep-Alive: timeout=5\r\n\r\nhello", false);
        assert_eq!((a.framing, a.reusable, a.len), (Framing::Length(5), true, 61));
        assert_eq!(out, "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n");
        let (a, _) = answer("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", true);
        assert_eq!(a.framing, Framing::Empty);
        let (a, out) = answer(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 9\r\nConnection: close\r\n\r\n",
            false,
        );
        assert_eq!((a.framing, a.reusable), (Framing::Chunked, false));
        assert_eq!(out, "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n");
        let (a, out) = answer("HTTP/1.0 200 OK\r\nX-A: 1\r\n\r\n", false);
        assert_eq!((a.framing, a.reusable), (Framing::UntilClose, false));
        assert_eq!(out, "HTTP/1.1 200 OK\r\nX-A: 1\r\nconnection: close\r\n\r\n");
        let (a, _) = answer("HTTP/1.0 304 Not Modified\r\nConnection: keep-alive\r\n\r\n", false);
        assert_eq!((a.framing, a.reusable), (Framing::Empty, true));
        let (a, out) = answer("HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n", false);
        assert_eq!(a.status, 103);
        assert_eq!(out, "HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n");
        let (_, out) =
            answer("HTTP/1.1 404 \r\nConnection: x-private\r\nX-Private: 1\r\nContent-Length: 0\r\n\r\n", false);
        assert_eq!(out, "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n");
    }

    #[test]
    fn bad_responses_are_refused() {
        let mut out = Vec::new();
        for bad in [
            "HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            "HTTP/1.1 101 Switching Protocols\r\n\r\n",
            "HTTP/1.1 2000 OK\r\n\r\n",
            "SSH-2.0-OpenSSH\r\n\r\n",
        ] {
            assert!(parse_answer(bad.as_bytes(), false, None, &mut out).is_err(), "{bad}");
        }
        assert!(parse_answer(b"HTTP/1.1 200 OK\r\nContent-", false, None, &mut out).unwrap().is_none());
    }

    #[tokio::test]
    async fn bodies_end_where_their_framing_says() {
        let cases: [(Framing, &[u8], &[u8], bool); 4] = [
            (Framing::Length(5), b"hel", b"lo", true),
            (Framing::Chunked, b"3\r\nabc\r", b"\n0\r\n\r\n", true),
            (Framing::UntilClose, b"ab", b"cd", false),
            (Framing::Empty, b"", b"", true),
        ];
        for (framing, first, rest, complete) in cases {
            let mut public = Vec::new();
            let mut head = b"HEAD\r\n".to_vec();
            let mut upbuf = BytesMut::from(first);
            let mut upstream = rest;
            let ended = forward_body(&mut public, &mut upstream, &mut upbuf, &mut head, framing).await.unwrap();
            assert_eq!(ended, complete, "{framing:?}");
            let mut expected = b"HEAD\r\n".to_vec();
            expected.extend_from_slice(first);
            expected.extend_from_slice(rest);
            assert_eq!(String::from_utf8(public).unwrap(), String::from_utf8(expected).unwrap(), "{framing:?}");
        }
        // Bytes past the end of the body stay in the buffer.
        let mut public = Vec::new();
        let mut upbuf = BytesMut::from(&b"2\r\nab\r\n0\r\n\r\nEXTRA"[..]);
        forward_body(&mut public, &mut &b""[..], &mut upbuf, &mut Vec::new(), Framing::Chunked).await.unwrap();
        assert_eq!(&upbuf[..], b"EXTRA");
        // A body cut short is an error, not a silent truncation.
        let mut upbuf = BytesMut::from(&b"abc"[..]);
        let cut = forward_body(&mut Vec::new(), &mut &b""[..], &mut upbuf, &mut Vec::new(), Framing::Length(9)).await;
        assert!(cut.is_err());
    }
}

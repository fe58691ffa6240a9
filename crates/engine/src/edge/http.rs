//! `http` tunnels: TLS terminated with the engine certificate, HTTP/1.1 or
//! HTTP/2 towards the public (ALPN), HTTP/1.1, h2c or TLS inside the agent
//! stream.
//!
//! Each request is routed by its host (`:authority` or `Host`) when that
//! names a published hostname, else by the SNI: HTTP/2 clients may reuse a
//! connection for any name the certificate covers. Bodies are never
//! collected: hyper's `Incoming` on one side is the body sent on the other,
//! so memory per request stays at a few buffers and flow control reaches
//! the far end.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::request::Parts;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty};
use hyper::body::{Body, Incoming};
use hyper::service::service_fn;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use rustls::server::Accepted;
use strait_proto::Prefixed;
use tokio::net::TcpStream;
use tokio_rustls::StartHandshake;

use super::access;
use super::activity::{Activity, Tracked};
use super::body::{Busy, Returning, Watched};
use super::cache::{self, Lookup};
use super::errors::Refusal;
use super::headers;
use super::relay::{self, Outcome};
use super::route;
use super::tls;
use super::upstream::{self, Lease, Pool, Sender};
use super::websocket;
use crate::Shared;
use crate::admission::HandshakeSlot;
use crate::policy::Policy;
use crate::registry::Tunnel;
use crate::tunnel::Namespace;

/// Response bodies towards the public.
pub type PublicBody = UnsyncBoxBody<Bytes, hyper::Error>;

/// What a request asks of the edge beyond one exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A plain request and response.
    Plain,
    /// HTTP/1.1 `Upgrade` (WebSocket and others): spliced after `101`.
    Upgrade,
    /// HTTP/2 extended CONNECT (RFC 8441): sent to the agent as an
    /// HTTP/1.1 upgrade, spliced after `101`, answered `200`.
    ExtendedConnect,
    /// CONNECT: spliced after a `2xx`.
    Connect,
}

impl Kind {
    fn of(request: &Request<Incoming>) -> Kind {
        if request.method() == Method::CONNECT {
            if request.extensions().get::<hyper::ext::Protocol>().is_some() {
                Kind::ExtendedConnect
            } else {
                Kind::Connect
            }
        } else if request.version() <= Version::HTTP_11
            && request.headers().contains_key(header::UPGRADE)
            && headers::has_token(request.headers(), &header::CONNECTION, "upgrade")
        {
            Kind::Upgrade
        } else {
            Kind::Plain
        }
    }
}

/// Serves one public TLS connection whose SNI is under the namespace and
/// is not a `tls` tunnel (unknown names get their 404s over HTTP too).
pub async fn serve(
    shared: Arc<Shared>,
    sni_tunnel: Option<Arc<Tunnel>>,
    accepted: Accepted,
    tcp: TcpStream,
    sni: String,
    peer: SocketAddr,
    slot: HandshakeSlot,
) {
    let config = match sni_tunnel.as_deref() {
        Some(tunnel) if tls::has_options(&tunnel.properties) => {
            match tls::tunnel_config(&shared, tunnel, vec![b"h2".to_vec(), b"http/1.1".to_vec()]) {
                Ok(config) => config,
                Err(error) => {
                    tracing::warn!(tunnel_id = %tunnel.id, %error, "tunnel TLS options unusable");
                    return;
                }
            }
        }
        _ => shared.tls.api.clone(),
    };
    let activity = Activity::new();
    let start = StartHandshake::from_parts(accepted, Tracked::new(tcp, activity.clone()));
    let tls = crate::net::tls::handshake(&shared, start, config, "http tunnel").await;
    drop(slot);
    let Some(mut tls) = tls else { return };
    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    let idle = Duration::from_secs(shared.config.timeouts.http_idle_seconds);
    let edge = Arc::new(Edge {
        shared: shared.clone(),
        sni,
        peer,
        activity: activity.clone(),
        idle,
        pools: Mutex::new(HashMap::new()),
        span: tracing::Span::current(),
    });
    // HTTP/1.1 starts in the relay; hyper takes over for what the relay
    // leaves to it, and serves HTTP/2 from the start.
    let mut buffered = Bytes::new();
    if !h2 {
        let outcome = tokio::select! {
            outcome = relay::relay(&edge, &mut tls) => outcome,
            _ = shared.abort.cancelled() => return,
        };
        match outcome {
            Outcome::Closed => return,
            Outcome::HandOff { buffered: rest, kept } => {
                buffered = rest;
                if let Some(kept) = kept {
                    edge.pool(&kept.tunnel).adopt(kept.io).await;
                }
            }
        }
    }
    let service = service_fn(move |request| {
        let edge = edge.clone();
        let span = edge.span.clone();
        tracing::Instrument::instrument(async move { Ok::<_, Infallible>(edge.handle(request).await) }, span)
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .preserve_header_case(true)
        .title_case_headers(false)
        .auto_date_header(false)
        .timer(TokioTimer::new())
        // Between requests hyper is reading a head: this is the keep-alive
        // idle limit, and the slow-header limit.
        .header_read_timeout(idle);
    builder.http2().enable_connect_protocol().auto_date_header(false).timer(TokioTimer::new());
    let builder = if h2 { builder.http2_only() } else { builder.http1_only() };
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(Prefixed::new(buffered, tls)), service);
    tokio::pin!(conn);
    let mut closing = false;
    let mut draining = false;
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(error) = result {
                    tracing::debug!(%error, "published connection ended with an error");
                }
                break;
            }
            _ = activity.idle(idle), if !closing => {
                tracing::debug!("published connection idle for {}s; closing", idle.as_secs());
                conn.as_mut().graceful_shutdown();
                closing = true;
            }
            // Engine shutdown: finish the requests in flight, take no new
            // ones; the end of the drain (`abort`) cuts what is left.
            _ = shared.shutdown.cancelled(), if !draining => {
                conn.as_mut().graceful_shutdown();
                draining = true;
            }
            _ = shared.abort.cancelled() => break,
        }
    }
}

/// One public connection's state.
pub struct Edge {
    pub(super) shared: Arc<Shared>,
    sni: String,
    pub(super) peer: SocketAddr,
    pub(super) activity: Arc<Activity>,
    pub(super) idle: Duration,
    /// Agent connections by tunnel id.
    pools: Mutex<HashMap<String, Arc<Pool>>>,
    /// The connection's span: HTTP/2 requests and upgrades run as tasks of
    /// their own and log under it too.
    span: tracing::Span,
}

impl Edge {
    /// An edge that serves no connection, so the relay's head parser can be
    /// driven without a socket (`crate::fuzzing`).
    #[doc(hidden)]
    pub fn detached(shared: Arc<Shared>, sni: String, peer: SocketAddr) -> Self {
        let idle = Duration::from_secs(shared.config.timeouts.http_idle_seconds);
        Edge {
            shared,
            sni,
            peer,
            activity: Activity::new(),
            idle,
            pools: Mutex::new(HashMap::new()),
            span: tracing::Span::none(),
        }
    }
}

impl Edge {
    async fn handle(self: Arc<Self>, request: Request<Incoming>) -> Response<PublicBody> {
        let busy = self.activity.busy();
        let method = request.method().clone();
        let path = request.uri().path().to_string();
        let response = match self.proxy(request).await {
            Ok(response) => response,
            Err((host, refusal)) => {
                self.log_refusal(&host, method.as_str(), &path, &refusal);
                let response = refusal.response();
                if method == Method::HEAD {
                    // The page's headers without its body (HTTP/2 resets a
                    // HEAD answer that carries DATA).
                    response.map(|_| empty())
                } else {
                    response
                }
            }
        };
        self.shared.metrics.http_response(response.status().as_u16());
        response.map(|body| Busy { inner: body, guard: Some(busy) }.boxed_unsync())
    }

    pub(super) fn log_refusal(&self, host: &str, method: &str, path: &str, refusal: &Refusal) {
        let status = refusal.status().as_u16();
        match refusal {
            Refusal::Upstream(reason) => {
                tracing::warn!(peer = %self.peer, %host, %method, %path, status, %reason, "request refused: the agent or its service failed");
            }
            Refusal::BadRequest(reason) => {
                tracing::info!(peer = %self.peer, %host, %method, %path, status, %reason, "request refused: the client sent a bad request");
            }
            _ => tracing::info!(peer = %self.peer, %host, %method, %path, status, "request refused"),
        }
    }

    /// The published hostname a request is for, and the host it gave.
    ///
    /// An HTTP/1.1 target in absolute form names its host itself and
    /// overrides `Host` (RFC 9112 section 3.2.2), so it must name a
    /// published host: anything else would make the edge a proxy to
    /// wherever the client points. `:authority` and `Host` route when they
    /// name a published host, else the SNI does.
    fn route_host(&self, parts: &Parts) -> Result<(String, Option<String>), (String, Refusal)> {
        let authority = parts.uri.authority().map(Authority::as_str);
        let absolute = parts.version <= Version::HTTP_11 && parts.method != Method::CONNECT;
        if let Some(authority) = authority.filter(|_| absolute) {
            let name = name_of(authority);
            if authority.contains('@') {
                // RFC 9110 section 4.2.4.
                return Err((name, Refusal::BadRequest("userinfo in the request target")));
            }
            if !self.is_published(&name) {
                return Err((name.clone(), Refusal::UnknownHost(name)));
            }
            return Ok((name, Some(authority.to_string())));
        }
        let given = authority.or_else(|| parts.headers.get(header::HOST).and_then(|h| h.to_str().ok()));
        Ok((self.published_name(given), given.map(str::to_string)))
    }

    /// The published hostname for the host a request gave (`:authority` or
    /// `Host`), or the SNI when that names none.
    pub(super) fn published_name(&self, given: Option<&str>) -> String {
        match given.map(name_of) {
            Some(name) if self.is_published(&name) => name,
            _ => self.sni.clone(),
        }
    }

    /// Whether `name` is under `.t.<engine.host>`.
    fn is_published(&self, name: &str) -> bool {
        let namespace = Namespace::hostnames(&self.shared.config.engine.host, self.shared.public_port);
        namespace.label_of(name).is_some()
    }

    fn pool(&self, tunnel: &Arc<Tunnel>) -> Arc<Pool> {
        let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        pools
            .entry(tunnel.id.clone())
            .or_insert_with(|| Arc::new(Pool::new(self.shared.clone(), tunnel.clone(), self.peer.ip())))
            .clone()
    }

    async fn proxy(&self, mut request: Request<Incoming>) -> Result<Response<PublicBody>, (String, Refusal)> {
        let kind = Kind::of(&request);
        let public_upgrade = (kind != Kind::Plain).then(|| hyper::upgrade::on(&mut request));
        let public_version = request.version();
        let (mut parts, body) = request.into_parts();
        let (host, given_host) = self.route_host(&parts)?;
        let fail = |refusal: Refusal| (host.clone(), refusal);
        // RFC 9112 section 3.2: two Hosts could route one way here and
        // another at the service.
        if parts.headers.get_all(header::HOST).iter().nth(1).is_some() {
            return Err(fail(Refusal::BadRequest("more than one Host")));
        }

        let target = parts.uri.path_and_query().map_or("/", PathAndQuery::as_str);
        let authorization = parts.headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
        let head =
            route::Head { host: &host, method: parts.method.as_str(), target, authorization, source: self.peer.ip() };
        let mut route = route::decide(&self.shared, &head).map_err(fail)?;
        let public_target = target.to_string();
        if let Some(pending) = route.pending.take() {
            pending.verify(&self.shared, self.peer.ip()).await.map_err(fail)?;
        }
        let tunnel = route.tunnel.clone();
        let policy = tunnel.spec.policy.clone();
        if route.consumed_authorization {
            // Basic auth's proof stays here; any other Authorization passes.
            let used = parts.headers.get(header::AUTHORIZATION).cloned();
            let kept: Vec<HeaderValue> = parts
                .headers
                .get_all(header::AUTHORIZATION)
                .iter()
                .filter(|v| Some(*v) != used.as_ref())
                .cloned()
                .collect();
            parts.headers.remove(header::AUTHORIZATION);
            for value in kept {
                parts.headers.append(header::AUTHORIZATION, value);
            }
        }
        if tunnel.spec.token_auth {
            let principal = access::check_token(&self.shared, &mut parts, self.peer.ip()).map_err(fail)?;
            route::admit_principal(&tunnel, &principal.id).map_err(fail)?;
        }
        // The edge cache, for the paths the policy names.
        let mut leader = None;
        // What x-strait-cache says of an answer that passes by the cache.
        let mut passed: Option<&'static str> = None;
        let requested_authorization = parts.headers.contains_key(header::AUTHORIZATION);
        if let Some(rule) = policy.cache.as_ref().filter(|c| kind == Kind::Plain && c.covers(&public_target)) {
            if cache::eligible(&parts.method, &parts.headers) {
                let store = self.shared.cache.store(&cache::store_name(&tunnel), rule);
                match store.lookup(&public_target, &parts.headers) {
                    Lookup::Hit(entry) => {
                        let mut response = entry.respond(&parts.method, &parts.headers);
                        response_policy(response.headers_mut(), &policy, &host, self.shared.public_port);
                        return Ok(response);
                    }
                    Lookup::Coalesced(fill) => {
                        if let Some(mut response) = fill.joined().await {
                            response_policy(response.headers_mut(), &policy, &host, self.shared.public_port);
                            return Ok(response);
                        }
                        // The fill is not shared: a miss of its own.
                        passed = Some("MISS");
                    }
                    // One fetch for everyone: not this client's range or
                    // validators (served from the object once stored).
                    Lookup::Lead(lead) if parts.method == Method::GET => {
                        cache::for_everyone(&mut parts.headers);
                        leader = Some(lead);
                    }
                    // A HEAD goes as it is; it fills nothing.
                    Lookup::Lead(_) => {}
                }
            } else {
                passed = Some("BYPASS");
            }
        }
        let limit = policy.max_request_body_bytes.unwrap_or(u64::MAX);
        if body.size_hint().lower() > limit {
            return Err(fail(Refusal::TooLarge));
        }
        let pool = self.pool(&tunnel);
        let h2c = upstream::h2c(&tunnel) && kind == Kind::Plain;
        to_upstream(&mut parts, kind, h2c, self.peer, given_host.as_deref()).map_err(fail)?;
        apply_route(&mut parts, &route, &policy, h2c).map_err(fail)?;

        // A body-less request may be sent again on a fresh stream if a
        // reused connection turns out closed: nothing was consumed.
        let retry = body.is_end_stream().then(|| parts.clone());
        let failed = Arc::new(AtomicBool::new(false));
        let too_large = Arc::new(AtomicBool::new(false));
        let body = Watched { inner: body, failed: failed.clone(), too_large: too_large.clone(), left: limit };
        // When the client's body failed, so does the request towards the
        // agent: that is the client's doing, not the service's.
        let broken = |error: hyper::Error| {
            if too_large.load(Ordering::Relaxed) {
                fail(Refusal::TooLarge)
            } else if failed.load(Ordering::Relaxed) {
                fail(Refusal::BadRequest("malformed request body"))
            } else {
                fail(Refusal::Upstream(error.to_string()))
            }
        };
        let request = Request::from_parts(parts, body.boxed_unsync());
        let mut lease = pool.lease(kind != Kind::Plain).await.map_err(fail)?;
        let wait = policy.response_timeout;
        let response = match self.answer(lease.sender.send(request), wait).await.map_err(fail)? {
            Ok(response) => response,
            Err((error, unsent)) => {
                let again = unsent.or_else(|| retry.map(|p| Request::from_parts(p, empty())));
                match again {
                    Some(request) if lease.reused => {
                        tracing::debug!(%host, %error, "reused agent connection failed; retrying on a fresh stream");
                        lease = pool.fresh().await.map_err(fail)?;
                        let answer = self.answer(lease.sender.send(request), wait).await.map_err(fail)?;
                        answer.map_err(|(e, _)| broken(e))?
                    }
                    _ => return Err(broken(error)),
                }
            }
        };
        let mut response = self.respond(response, kind, public_version, public_upgrade, lease, pool).map_err(fail)?;
        if let Some(lead) = leader {
            response = lead.answer(&self.shared.cache, &self.shared.tasks, response, requested_authorization);
        }
        if let Some(passed) = passed {
            response.headers_mut().insert(cache::X_STRAIT_CACHE, HeaderValue::from_static(passed));
        }
        response_policy(response.headers_mut(), &policy, &host, self.shared.public_port);
        Ok(response)
    }

    /// Waits for the service's answer while bytes move on the connection.
    /// An upload of any size keeps it waiting; a service that says nothing
    /// on a silent connection for `http_idle_seconds` gets a 504 instead of
    /// holding the client forever. A policy's `response_timeout_seconds`
    /// replaces that (long polls wait for their answer, however quiet).
    async fn answer<T>(&self, sent: impl Future<Output = T>, wait: Option<Duration>) -> Result<T, Refusal> {
        match wait {
            Some(wait) => tokio::select! {
                answer = sent => Ok(answer),
                _ = tokio::time::sleep(wait) => Err(Refusal::Timeout),
            },
            None => tokio::select! {
                answer = sent => Ok(answer),
                _ = self.activity.quiet(self.idle) => Err(Refusal::Timeout),
            },
        }
    }

    fn respond(
        &self,
        mut response: Response<Incoming>,
        kind: Kind,
        public_version: Version,
        public_upgrade: Option<OnUpgrade>,
        lease: Lease,
        pool: Arc<Pool>,
    ) -> Result<Response<PublicBody>, Refusal> {
        let switched = match kind {
            Kind::Plain => false,
            Kind::Upgrade | Kind::ExtendedConnect => response.status() == StatusCode::SWITCHING_PROTOCOLS,
            Kind::Connect => response.status().is_success(),
        };
        if switched && let Some(public) = public_upgrade {
            // A WebSocket (RFC 6455, or RFC 8441 translated) is told why
            // the idle timer ends it; other protocols are just closed.
            let websocket =
                kind != Kind::Connect && headers::has_token(response.headers(), &header::UPGRADE, "websocket");
            let upstream = hyper::upgrade::on(&mut response);
            self.splice_upgraded(public, upstream, websocket);
            let (mut parts, _) = response.into_parts();
            parts.version = public_version;
            if kind == Kind::ExtendedConnect {
                // RFC 8441: the stream is open once the CONNECT gets a 2xx;
                // the HTTP/1.1 handshake headers stay on the agent's side.
                parts.status = StatusCode::OK;
                headers::strip_hop_by_hop(&mut parts.headers, false);
                parts.headers.remove(header::SEC_WEBSOCKET_ACCEPT);
            } else if kind == Kind::Connect {
                headers::strip_hop_by_hop(&mut parts.headers, false);
            }
            return Ok(Response::from_parts(parts, empty()));
        }
        if response.status() == StatusCode::SWITCHING_PROTOCOLS {
            // Nobody asked to switch (or the switch cannot be honoured).
            return Err(Refusal::Upstream("unexpected 101 Switching Protocols".into()));
        }
        if kind == Kind::ExtendedConnect && response.status().is_success() {
            // A 2xx without the switch would tell an HTTP/2 client the
            // WebSocket is open when it is not.
            return Err(Refusal::Upstream(format!("WebSocket upgrade answered {}", response.status())));
        }
        let (mut parts, body) = response.into_parts();
        headers::strip_hop_by_hop(&mut parts.headers, false);
        parts.version = public_version;
        let body = match lease.sender {
            Sender::H1(sender) if kind == Kind::Plain => {
                Returning { inner: body, sender: Some(sender), pool }.boxed_unsync()
            }
            _ => body.boxed_unsync(),
        };
        Ok(Response::from_parts(parts, body))
    }

    /// Carries an upgraded connection's bytes until either side ends or no
    /// byte moves for the idle timeout (pings count). An idle WebSocket
    /// gets a close frame each way before the close.
    fn splice_upgraded(&self, public: OnUpgrade, upstream: OnUpgrade, websocket: bool) {
        let activity = self.activity.clone();
        let idle = self.idle;
        // Upgraded connections are streams in flight: the drain lets them
        // run and only its end (`abort`) cuts them.
        let abort = self.shared.abort.clone();
        // Its own task: the connection's span goes with it (HTTP/2 requests
        // run outside the connection's future).
        let span = self.span.clone();
        self.shared.tasks.spawn(tracing::Instrument::instrument(
            async move {
                let (public, upstream) = match tokio::try_join!(public, upstream) {
                    Ok(both) => both,
                    Err(error) => {
                        tracing::debug!(%error, "upgrade did not complete");
                        return;
                    }
                };
                let mut public = TokioIo::new(public);
                let mut upstream = TokioIo::new(upstream);
                let idled = tokio::select! {
                    result = strait_proto::splice::splice(&mut public, &mut upstream) => {
                        if let Err(error) = result {
                            tracing::debug!(%error, "upgraded connection ended with an error");
                        }
                        false
                    }
                    _ = activity.idle(idle) => {
                        tracing::debug!(websocket, "upgraded connection idle for {}s; closing", idle.as_secs());
                        true
                    }
                    _ = abort.cancelled() => false,
                };
                if idled && websocket {
                    tokio::select! {
                        () = websocket::close_idle(&mut public, &mut upstream) => {}
                        _ = abort.cancelled() => {}
                    }
                }
            },
            span,
        ));
    }
}

fn empty<E: 'static>() -> UnsyncBoxBody<Bytes, E> {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

/// The host name of an authority (`Host`, `:authority`, an absolute
/// target): no port, no userinfo, no trailing dot, lower case.
fn name_of(authority: &str) -> String {
    // Most clients send a bare lower-case name: no parse needed.
    let simple = authority.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-');
    if simple {
        return authority.trim_end_matches('.').to_string();
    }
    let name = authority.parse::<Authority>().map(|a| a.host().to_string()).unwrap_or_else(|_| authority.to_string());
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// Applies what the route and the tunnel's policy change on a request the
/// agent receives (after [`to_upstream`]): the stripped target, the
/// upstream `Host`, the header rules.
fn apply_route(parts: &mut Parts, route: &route::Route, policy: &Policy, h2c: bool) -> Result<(), Refusal> {
    if let Some(target) = &route.target {
        let target = PathAndQuery::try_from(target.as_str()).map_err(|_| Refusal::BadRequest("bad request target"))?;
        let mut uri = parts.uri.clone().into_parts();
        uri.path_and_query = Some(target);
        parts.uri = Uri::from_parts(uri).map_err(|_| Refusal::BadRequest("bad request target"))?;
    }
    if let Some(host) = &policy.host {
        if h2c {
            let mut uri = parts.uri.clone().into_parts();
            uri.authority = Some(host.parse().map_err(|_| Refusal::BadRequest("bad Host"))?);
            parts.uri = Uri::from_parts(uri).map_err(|_| Refusal::BadRequest("bad request target"))?;
        } else {
            parts.headers.insert(
                header::HOST,
                HeaderValue::try_from(host.as_str()).map_err(|_| Refusal::BadRequest("bad Host"))?,
            );
        }
    }
    policy.request_headers.apply(&mut parts.headers);
    Ok(())
}

/// Applies the policy's response rules: header rules, and with
/// `rewrite_location` the upstream host in `Location`, `Content-Location`
/// and cookie domains turned back into the public name.
pub(super) fn response_policy(headers: &mut http::HeaderMap, policy: &Policy, public: &str, public_port: u16) {
    if let (true, Some(upstream)) = (policy.rewrite_location, policy.host.as_deref()) {
        for name in [header::LOCATION, header::CONTENT_LOCATION] {
            let rewritten = headers
                .get(&name)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| route::rewrite_location(v, upstream, public, public_port))
                .and_then(|v| HeaderValue::try_from(v).ok());
            if let Some(value) = rewritten {
                headers.insert(name, value);
            }
        }
        if headers.contains_key(header::SET_COOKIE) {
            let cookies: Vec<HeaderValue> = headers
                .get_all(header::SET_COOKIE)
                .iter()
                .map(|v| {
                    v.to_str()
                        .ok()
                        .and_then(|c| route::rewrite_cookie_domain(c, upstream, public))
                        .and_then(|c| HeaderValue::try_from(c).ok())
                        .unwrap_or_else(|| v.clone())
                })
                .collect();
            headers.remove(header::SET_COOKIE);
            for cookie in cookies {
                headers.append(header::SET_COOKIE, cookie);
            }
        }
    }
    policy.response_headers.apply(headers);
}

/// Rewrites a public request into the one the agent's service receives.
fn to_upstream(
    parts: &mut Parts,
    kind: Kind,
    h2c: bool,
    peer: SocketAddr,
    given_host: Option<&str>,
) -> Result<(), Refusal> {
    headers::strip_hop_by_hop(&mut parts.headers, kind == Kind::Upgrade);
    headers::add_forwarded(&mut parts.headers, peer.ip(), given_host);
    let authority = given_host.ok_or(Refusal::BadRequest("no Host"))?;
    if kind == Kind::ExtendedConnect {
        let protocol = parts
            .extensions
            .remove::<hyper::ext::Protocol>()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| "websocket".into());
        parts.method = Method::GET;
        let upgrade = HeaderValue::try_from(protocol).map_err(|_| Refusal::BadRequest("bad :protocol"))?;
        parts.headers.insert(header::UPGRADE, upgrade);
        parts.headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        if !parts.headers.contains_key(header::SEC_WEBSOCKET_KEY) {
            let key: [u8; 16] = rand::random();
            let key = base64::engine::general_purpose::STANDARD.encode(key);
            parts
                .headers
                .insert(header::SEC_WEBSOCKET_KEY, HeaderValue::try_from(key).expect("base64 is a valid value"));
        }
        parts.headers.entry(header::SEC_WEBSOCKET_VERSION).or_insert(HeaderValue::from_static("13"));
    }
    if h2c {
        parts.version = Version::HTTP_2;
        parts.headers.remove(header::HOST);
        let mut uri = parts.uri.clone().into_parts();
        uri.scheme = Some(Scheme::HTTP);
        uri.authority = Some(authority.parse().map_err(|_| Refusal::BadRequest("bad Host"))?);
        if uri.path_and_query.is_none() {
            uri.path_and_query = Some(PathAndQuery::from_static("/"));
        }
        parts.uri = Uri::from_parts(uri).map_err(|_| Refusal::BadRequest("bad request target"))?;
        return Ok(());
    }
    parts.version = Version::HTTP_11;
    headers::join_cookies(&mut parts.headers);
    // A target with an authority (absolute form, HTTP/2's `:authority`)
    // names the host, whatever `Host` says (RFC 9112 section 3.2.2).
    let from_target = parts.method != Method::CONNECT && parts.uri.authority().is_some();
    if from_target || !parts.headers.contains_key(header::HOST) {
        let host = HeaderValue::try_from(authority).map_err(|_| Refusal::BadRequest("bad Host"))?;
        parts.headers.insert(header::HOST, host);
    }
    if from_target {
        // Origin form for HTTP/1.1: the path and query exactly as sent.
        let target = parts.uri.path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/"));
        parts.uri = Uri::from(target);
    }
    Ok(())
}

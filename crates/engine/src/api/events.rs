//! `GET /api/sse` and `GET /api/websocket`: a `state.initial` snapshot, then
//! every matching registry change as it happens.
//!
//! Both transports read one [`Feed`]. A feed is a receiver on the
//! registry's fixed-size broadcast ring: a watcher that falls behind by the
//! whole ring is told it lagged and is disconnected as a slow consumer. The
//! registry never waits for a watcher and a stuck watcher holds no growing
//! buffer.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::extract::rejection::QueryRejection;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Extension, Query, State};
use axum::http::{HeaderMap, HeaderValue};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::broadcast::{self, error::RecvError};
use tokio_util::sync::CancellationToken;

use super::auth::{ApiError, Peer, authorize};
use super::inventory::{ApiQuery, query};
use super::model::{
    Client, Event, EventObject, EventType, Snapshot, Status, Tunnel, WatchParams, client_matches, parse_params,
    rfc3339, sort_clients, sort_tunnels, tunnel_matches,
};
use crate::auth::Principal;
use crate::registry::Change;
use crate::{Shared, ids};

/// How often an idle watch proves it is alive: an SSE comment or a
/// WebSocket ping. Below the 30 to 60 s idle timeouts of common proxies and
/// load balancers.
pub const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// The most one WebSocket frame may take to leave. A watcher that cannot
/// take a small frame in this long is a slow consumer.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a watch ended on the engine's side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    /// Fell behind the registry's change ring.
    SlowConsumer,
    ShuttingDown,
}

impl EndReason {
    pub fn text(self) -> &'static str {
        match self {
            EndReason::SlowConsumer => {
                "slow consumer: events were not read fast enough; reconnect for a fresh snapshot"
            }
            EndReason::ShuttingDown => "engine shutting down",
        }
    }

    /// WebSocket close codes: 1008 (policy violation) for a slow consumer,
    /// 1001 (going away) for a shutdown.
    fn close_code(self) -> u16 {
        match self {
            EndReason::SlowConsumer => 1008,
            EndReason::ShuttingDown => 1001,
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum FeedItem {
    /// One event, as JSON.
    Event(String),
    /// The last item: the feed is over.
    End(EndReason),
}

/// One watcher's view of the registry.
pub struct Feed {
    initial: Option<String>,
    rx: broadcast::Receiver<Change>,
    /// Whose objects this watcher sees: its own principal's, or all for an
    /// admin token.
    principal: Principal,
    params: WatchParams,
    shutdown: CancellationToken,
    ended: bool,
}

impl Feed {
    /// Takes the snapshot and subscribes in one step, so no change falls
    /// between them.
    pub fn start(shared: &Shared, principal: &Principal, params: WatchParams) -> Feed {
        let (mut clients, mut tunnels, rx) = shared.registry.snapshot_and_subscribe();
        let now = SystemTime::now();
        sort_clients(&mut clients);
        sort_tunnels(&mut tunnels);
        let clients = clients
            .iter()
            .filter(|c| principal.sees(&c.principal))
            .map(|c| Client::from_info(c, Status::Online))
            .filter(|c| client_matches(params.clients.as_ref(), c))
            .collect();
        let tunnels = tunnels
            .iter()
            .filter(|t| principal.sees(&t.principal))
            .map(|t| Tunnel::from_tunnel(t, Status::Online))
            .filter(|t| tunnel_matches(params.tunnels.as_ref(), t))
            .collect();
        let initial = Event {
            id: ids::event_id(),
            kind: EventType::StateInitial,
            created_at: rfc3339(now),
            user_id: principal.id.clone(),
            object: EventObject::Snapshot(Snapshot { snapshot_at: rfc3339(now), clients, tunnels }),
        };
        Feed {
            initial: Some(serde_json::to_string(&initial).expect("events serialise")),
            rx,
            principal: principal.clone(),
            params,
            shutdown: shared.shutdown.clone(),
            ended: false,
        }
    }

    /// The next item, or `None` once the feed is over. Cancel-safe: dropping
    /// the future loses no event.
    pub async fn next(&mut self) -> Option<FeedItem> {
        if self.ended {
            return None;
        }
        if let Some(initial) = self.initial.take() {
            return Some(FeedItem::Event(initial));
        }
        loop {
            let received = tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => {
                    self.ended = true;
                    return Some(FeedItem::End(EndReason::ShuttingDown));
                }
                received = self.rx.recv() => received,
            };
            match received {
                Ok(change) => {
                    if let Some(json) = self.render(&change) {
                        return Some(FeedItem::Event(json));
                    }
                }
                Err(RecvError::Lagged(_)) => {
                    self.ended = true;
                    return Some(FeedItem::End(EndReason::SlowConsumer));
                }
                Err(RecvError::Closed) => {
                    self.ended = true;
                    return None;
                }
            }
        }
    }

    /// The change as an event, if it is this watcher's to see and passes
    /// its filters.
    fn render(&self, change: &Change) -> Option<String> {
        if !self.principal.sees(change.principal()) {
            return None;
        }
        let (kind, id, at, object) = match change {
            Change::ClientCreated(s) | Change::ClientDeleted(s) => {
                let (kind, status) = match change {
                    Change::ClientCreated(_) => (EventType::ClientCreated, Status::Online),
                    _ => (EventType::ClientDeleted, Status::Offline),
                };
                let client = Client::from_info(&s.object, status);
                if !client_matches(self.params.clients.as_ref(), &client) {
                    return None;
                }
                (kind, &s.id, s.at, EventObject::Client(client))
            }
            Change::TunnelCreated(s) | Change::TunnelDeleted(s) => {
                let (kind, status) = match change {
                    Change::TunnelCreated(_) => (EventType::TunnelCreated, Status::Online),
                    _ => (EventType::TunnelDeleted, Status::Offline),
                };
                let tunnel = Tunnel::from_tunnel(&s.object, status);
                if !tunnel_matches(self.params.tunnels.as_ref(), &tunnel) {
                    return None;
                }
                (kind, &s.id, s.at, EventObject::Tunnel(Box::new(tunnel)))
            }
        };
        let user_id = match &object {
            EventObject::Client(c) => c.user_id.clone(),
            EventObject::Tunnel(t) => t.user_id.clone(),
            EventObject::Snapshot(_) => String::new(),
        };
        let event = Event { id: id.clone(), kind, created_at: rfc3339(at), user_id, object };
        Some(serde_json::to_string(&event).expect("events serialise"))
    }
}

fn start_feed(
    shared: &Shared,
    peer: Peer,
    path: &str,
    headers: &HeaderMap,
    q: Result<Query<ApiQuery>, QueryRejection>,
) -> Result<Feed, ApiError> {
    let q = query(q)?;
    let principal = authorize(shared, peer, path, headers, q.token.as_deref())?;
    let params: WatchParams = parse_params(q.params.as_deref()).map_err(ApiError::bad_request)?;
    tracing::debug!(peer = %peer.0, path, principal = %principal, "watch started");
    Ok(Feed::start(shared, &principal, params))
}

/// Server-sent events: one `data:` line per event, no `event:` name.
#[utoipa::path(
    get,
    path = "/api/sse",
    tag = "events",
    params(
        ("params" = Option<String>, Query, description = "URL-encoded JSON, a WatchParams: `{clients, tunnels}`"),
        ("rstream.token" = Option<String>, Query, description = "The token, for clients that cannot send headers"),
    ),
    responses(
        (status = 200, description = "`text/event-stream`: `data: <Event JSON>` per event, `state.initial` first; \
            comments keep the stream alive and give the reason when the engine ends it",
            body = Event, content_type = "text/event-stream"),
        (status = 400, description = "Bad `params`", body = String, content_type = "text/plain"),
        (status = 401, description = "Missing or invalid bearer token", body = String, content_type = "text/plain"),
        (status = 429, description = "Too many refused tokens from this source (`limits.auth_failures_per_source`); see `Retry-After`", body = String, content_type = "text/plain"),
    ),
    security(("bearer" = []), ("query_token" = []))
)]
pub async fn sse(
    State(shared): State<Arc<Shared>>,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    q: Result<Query<ApiQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let feed = start_feed(&shared, peer, "/api/sse", &headers, q)?;
    let stream = futures_util::stream::unfold(feed, move |mut feed| async move {
        let event = match feed.next().await? {
            FeedItem::Event(json) => SseEvent::default().data(json),
            FeedItem::End(reason) => {
                tracing::info!(peer = %peer.0, reason = reason.text(), "watch ended");
                SseEvent::default().comment(reason.text())
            }
        };
        Some((Ok::<_, Infallible>(event), feed))
    });
    let mut response = Sse::new(stream).keep_alive(KeepAlive::new().interval(KEEP_ALIVE)).into_response();
    // Reverse proxies (nginx) must not buffer a live stream.
    response.headers_mut().insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(response)
}

/// WebSocket: one event per text frame, pings to keep it alive.
#[utoipa::path(
    get,
    path = "/api/websocket",
    tag = "events",
    params(
        ("params" = Option<String>, Query, description = "URL-encoded JSON, a WatchParams: `{clients, tunnels}`"),
        ("rstream.token" = Option<String>, Query, description = "The token, for clients that cannot send headers"),
    ),
    responses(
        (status = 101, description = "Upgraded: one Event JSON per text frame, `state.initial` first; the close \
            frame's reason says why the engine ended the watch", body = Event),
        (status = 400, description = "Bad `params` or not a WebSocket handshake", body = String, content_type = "text/plain"),
        (status = 401, description = "Missing or invalid bearer token", body = String, content_type = "text/plain"),
        (status = 429, description = "Too many refused tokens from this source (`limits.auth_failures_per_source`); see `Retry-After`", body = String, content_type = "text/plain"),
    ),
    security(("bearer" = []), ("query_token" = []))
)]
pub async fn websocket(
    State(shared): State<Arc<Shared>>,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    q: Result<Query<ApiQuery>, QueryRejection>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let feed = start_feed(&shared, peer, "/api/websocket", &headers, q)?;
    let upgrade = upgrade.map_err(|e| ApiError::new(e.status(), e.body_text()))?;
    let tasks = shared.tasks.clone();
    Ok(upgrade.on_upgrade(move |socket| tasks.track_future(run_socket(socket, feed, peer))))
}

async fn run_socket(socket: WebSocket, mut feed: Feed, peer: Peer) {
    let (mut tx, mut rx) = socket.split();
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + KEEP_ALIVE, KEEP_ALIVE);
    let reason = loop {
        let message = tokio::select! {
            item = feed.next() => match item {
                Some(FeedItem::Event(json)) => Message::Text(json.into()),
                Some(FeedItem::End(reason)) => {
                    let frame = CloseFrame { code: reason.close_code(), reason: reason.text().into() };
                    let _ = tokio::time::timeout(SEND_TIMEOUT, tx.send(Message::Close(Some(frame)))).await;
                    break reason.text();
                }
                None => break "registry closed",
            },
            _ = ping.tick() => Message::Ping(Default::default()),
            incoming = rx.next() => match incoming {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => break "watcher closed the connection",
                Some(Ok(_)) => continue,
            },
        };
        match tokio::time::timeout(SEND_TIMEOUT, tx.send(message)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => break "connection lost",
            Err(_) => break EndReason::SlowConsumer.text(),
        }
    };
    tracing::info!(peer = %peer.0, reason, "watch ended");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_reasons_fit_a_close_frame() {
        for reason in [EndReason::SlowConsumer, EndReason::ShuttingDown] {
            assert!(reason.text().len() <= 123, "{}", reason.text());
        }
        assert!(EndReason::SlowConsumer.text().contains("slow consumer"));
    }
}

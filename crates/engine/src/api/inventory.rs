//! `GET /api/clients` and `GET /api/tunnels`: the live inventory, with the
//! `params` filters.

use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Extension, Path, Query, State};
use axum::http::HeaderMap;
use serde::Deserialize;

use super::auth::{ApiError, Peer, authorize};
use super::model::{
    Client, ClientListParams, Reservation, Status, Tunnel, TunnelListParams, client_matches, parse_params,
    sort_clients, sort_tunnels, tunnel_matches,
};
use crate::Shared;

/// The query every API endpoint understands. Unknown parameters are
/// ignored, as HTTP APIs usually do.
#[derive(Debug, Default, Deserialize)]
pub struct ApiQuery {
    pub params: Option<String>,
    #[serde(rename = "rstream.token")]
    pub token: Option<String>,
}

/// Reads the query, turning a malformed one into a short 400.
pub fn query(query: Result<Query<ApiQuery>, QueryRejection>) -> Result<ApiQuery, ApiError> {
    query.map(|Query(q)| q).map_err(|e| ApiError::bad_request(format!("bad query string: {}", e.body_text())))
}

fn check_limit(limit: Option<u32>) -> Result<usize, ApiError> {
    match limit {
        Some(0) => Err(ApiError::bad_request("bad params: limit must be at least 1")),
        Some(n) => Ok(n as usize),
        None => Ok(usize::MAX),
    }
}

/// Lists live clients, oldest first.
#[utoipa::path(
    get,
    path = "/api/clients",
    tag = "inventory",
    params(("params" = Option<String>, Query, description = "URL-encoded JSON, a ClientListParams: `{limit, filters}`")),
    responses(
        (status = 200, description = "Matching clients, oldest first", body = Vec<Client>),
        (status = 400, description = "Bad `params`", body = String, content_type = "text/plain"),
        (status = 401, description = "Missing or invalid bearer token", body = String, content_type = "text/plain"),
        (status = 429, description = "Too many refused tokens from this source (`limits.auth_failures_per_source`); see `Retry-After`", body = String, content_type = "text/plain"),
    ),
    security(("bearer" = []))
)]
pub async fn list_clients(
    State(shared): State<Arc<Shared>>,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    q: Result<Query<ApiQuery>, QueryRejection>,
) -> Result<Json<Vec<Client>>, ApiError> {
    let principal = authorize(&shared, peer, "/api/clients", &headers, None)?;
    let q = query(q)?;
    let params: ClientListParams = parse_params(q.params.as_deref()).map_err(ApiError::bad_request)?;
    let limit = check_limit(params.limit)?;
    let mut infos = shared.registry.clients();
    sort_clients(&mut infos);
    let clients = infos
        .iter()
        .filter(|info| principal.sees(&info.principal))
        .map(|info| Client::from_info(info, Status::Online))
        .filter(|c| client_matches(params.filters.as_ref(), c))
        .take(limit)
        .collect();
    Ok(Json(clients))
}

/// One live client.
#[utoipa::path(
    get,
    path = "/api/clients/{id}",
    tag = "inventory",
    params(("id" = String, Path, description = "Client id")),
    responses(
        (status = 200, description = "The client", body = Client),
        (status = 401, description = "Missing or invalid bearer token", body = String, content_type = "text/plain"),
        (status = 429, description = "Too many refused tokens from this source (`limits.auth_failures_per_source`); see `Retry-After`", body = String, content_type = "text/plain"),
        (status = 404, description = "No such client", body = String, content_type = "text/plain"),
    ),
    security(("bearer" = []))
)]
pub async fn get_client(
    State(shared): State<Arc<Shared>>,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Client>, ApiError> {
    let principal = authorize(&shared, peer, "/api/clients/{id}", &headers, None)?;
    let client = shared
        .registry
        .client(&id)
        .filter(|c| principal.sees(&c.info.principal))
        .ok_or_else(|| ApiError::not_found("no such client"))?;
    Ok(Json(Client::from_info(&client.info, Status::Online)))
}

/// Lists live tunnels, oldest first.
#[utoipa::path(
    get,
    path = "/api/tunnels",
    tag = "inventory",
    params(("params" = Option<String>, Query, description = "URL-encoded JSON, a TunnelListParams: `{limit, filters}`")),
    responses(
        (status = 200, description = "Matching tunnels, oldest first", body = Vec<Tunnel>),
        (status = 400, description = "Bad `params`", body = String, content_type = "text/plain"),
        (status = 401, description = "Missing or invalid bearer token", body = String, content_type = "text/plain"),
        (status = 429, description = "Too many refused tokens from this source (`limits.auth_failures_per_source`); see `Retry-After`", body = String, content_type = "text/plain"),
    ),
    security(("bearer" = []))
)]
pub async fn list_tunnels(
    State(shared): State<Arc<Shared>>,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    q: Result<Query<ApiQuery>, QueryRejection>,
) -> Result<Json<Vec<Tunnel>>, ApiError> {
    let principal = authorize(&shared, peer, "/api/tunnels", &headers, None)?;
    let q = query(q)?;
    let params: TunnelListParams = parse_params(q.params.as_deref()).map_err(ApiError::bad_request)?;
    let limit = check_limit(params.limit)?;
    let mut live = shared.registry.tunnels();
    sort_tunnels(&mut live);
    let tunnels = live
        .iter()
        .filter(|t| principal.sees(&t.principal))
        .map(|t| Tunnel::from_tunnel(t, Status::Online))
        .filter(|t| tunnel_matches(params.filters.as_ref(), t))
        .take(limit)
        .collect();
    Ok(Json(tunnels))
}

/// One live tunnel.
#[utoipa::path(
    get,
    path = "/api/tunnels/{id}",
    tag = "inventory",
    params(("id" = String, Path, description = "Tunnel id")),
    responses(
        (status = 200, description = "The tunnel", body = Tunnel),
        (status = 401, description = "Missing or invalid bearer token", body = String, content_type = "text/plain"),
        (status = 429, description = "Too many refused tokens from this source (`limits.auth_failures_per_source`); see `Retry-After`", body = String, content_type = "text/plain"),
        (status = 404, description = "No such tunnel", body = String, content_type = "text/plain"),
    ),
    security(("bearer" = []))
)]
pub async fn get_tunnel(
    State(shared): State<Arc<Shared>>,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Tunnel>, ApiError> {
    let principal = authorize(&shared, peer, "/api/tunnels/{id}", &headers, None)?;
    let tunnel = shared
        .registry
        .tunnel(&id)
        .filter(|t| principal.sees(&t.principal))
        .ok_or_else(|| ApiError::not_found("no such tunnel"))?;
    Ok(Json(Tunnel::from_tunnel(&tunnel, Status::Online)))
}

/// What a purge asks for.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
pub struct PurgeParams {
    /// Only cached paths matching this glob (`*` any run, `?` one
    /// character); all without it.
    pub path: Option<String>,
}

/// What a purge removed.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct Purged {
    /// Objects removed from the tunnel's edge cache.
    pub purged: usize,
}

/// Empties a tunnel's edge cache (the objects of its hostname and path
/// prefix), or the paths matching `path`. Beyond CE.
#[utoipa::path(
    delete,
    path = "/api/tunnels/{id}/cache",
    tag = "operations",
    params(("id" = String, Path, description = "Tunnel id"), PurgeParams),
    responses(
        (status = 200, description = "How many objects went", body = Purged),
        (status = 400, description = "The path glob is not one", body = String, content_type = "text/plain"),
        (status = 401, description = "Missing or invalid bearer token", body = String, content_type = "text/plain"),
        (status = 404, description = "No such tunnel", body = String, content_type = "text/plain"),
    ),
    security(("bearer" = []))
)]
pub async fn purge_cache(
    State(shared): State<Arc<Shared>>,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    Path(id): Path<String>,
    axum::extract::Query(params): axum::extract::Query<PurgeParams>,
) -> Result<Json<Purged>, ApiError> {
    let principal = authorize(&shared, peer, "/api/tunnels/{id}/cache", &headers, None)?;
    let tunnel = shared
        .registry
        .tunnel(&id)
        .filter(|t| principal.sees(&t.principal))
        .ok_or_else(|| ApiError::not_found("no such tunnel"))?;
    let glob = match params.path.as_deref() {
        Some(path) => Some(crate::policy::Glob::new(path).map_err(|e| ApiError::bad_request(format!("path: {e}")))?),
        None => None,
    };
    let purged = shared.cache.purge(&crate::edge::cache::store_name(&tunnel), glob.as_ref());
    tracing::info!(tunnel_id = %tunnel.id, purged, path = params.path.as_deref().unwrap_or("*"), "edge cache purged");
    Ok(Json(Purged { purged }))
}

/// Hostnames and names kept for their principal after their tunnel went
/// offline, soonest to expire first. Beyond CE.
#[utoipa::path(
    get,
    path = "/api/reservations",
    tag = "inventory",
    responses(
        (status = 200, description = "The caller's reservations (every principal's for an admin token)", body = Vec<Reservation>),
        (status = 401, description = "Missing or invalid bearer token", body = String, content_type = "text/plain"),
        (status = 429, description = "Too many refused tokens from this source (`limits.auth_failures_per_source`); see `Retry-After`", body = String, content_type = "text/plain"),
    ),
    security(("bearer" = []))
)]
pub async fn list_reservations(
    State(shared): State<Arc<Shared>>,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
) -> Result<Json<Vec<Reservation>>, ApiError> {
    let principal = authorize(&shared, peer, "/api/reservations", &headers, None)?;
    Ok(Json(shared.registry.holds(&principal).iter().map(Reservation::from_hold).collect()))
}

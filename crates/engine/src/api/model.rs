//! The JSON the Engine API speaks: Client, Tunnel, the `params` filters and
//! events. The OpenAPI document is generated from these same types, so the
//! schema and the wire cannot drift apart.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::registry::ClientInfo;

/// RFC 3339 with second precision or finer, UTC, as the SDK parses it.
pub fn rfc3339(at: SystemTime) -> String {
    time::OffsetDateTime::from(at)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".to_string())
}

/// Whether the object is live. Deleted objects are reported `offline`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Online,
    Offline,
}

/// An agent with a control channel.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Client {
    /// 24 lowercase hex characters, as `OpenControlChannelRsp` reported it.
    pub id: String,
    pub status: Status,
    /// The principal of the agent's token (`sub`, else `userId`, else `clientId`).
    pub user_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub os: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub arch: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protocol_version: Option<String>,
    pub labels: BTreeMap<String, String>,
    /// What carries the agent's control channel: `tls` or `quic` (beyond CE).
    pub transport: String,
}

impl Client {
    pub fn from_info(info: &ClientInfo, status: Status) -> Self {
        Self {
            id: info.id.clone(),
            status,
            user_id: info.principal.clone(),
            agent: info.agent.clone(),
            channel: info.channel.clone(),
            version: info.version.clone(),
            os: info.os.clone(),
            arch: info.arch.clone(),
            protocol_version: info.protocol_version.clone(),
            labels: info.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            transport: info.transport.to_string(),
        }
    }
}

/// A tunnel: its complete properties in snake_case (`geoip` spelled
/// `geo_ip`) plus where it lives.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Tunnel {
    /// 24 lowercase hex characters.
    pub id: String,
    /// RFC 3339.
    pub creation_date: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `bytestream` or `datagram`.
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub publish: Option<bool>,
    /// `http`, `tls`, `tcp`, `udp`, `dtls`, `quic` or `webtty`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub geo_ip: Vec<String>,
    pub trusted_ips: Vec<String>,
    /// Deprecated: the served hostname, as `hostname`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_mode: Option<String>,
    pub tls_alpns: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_min_version: Option<String>,
    pub tls_ciphers: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mtls_auth: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http_version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http_use_tls: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_auth: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rstream_auth: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub challenge_mode: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_tls: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub datagram_guaranteed_delivery: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allow_cross_region_routing: Option<bool>,
    pub status: Status,
    /// The control channel that offers the tunnel.
    pub client_id: String,
    /// The principal of that control channel's token.
    pub user_id: String,
}

impl Tunnel {
    pub fn from_tunnel(t: &crate::registry::Tunnel, status: Status) -> Self {
        let p = &t.properties;
        Self {
            id: t.id.clone(),
            creation_date: rfc3339(t.created_at),
            name: p.name.clone(),
            kind: p.r#type.clone(),
            publish: p.publish,
            protocol: p.protocol.clone(),
            labels: p.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            geo_ip: p.geoip.clone(),
            trusted_ips: p.trusted_ips.clone(),
            host: p.host.clone(),
            tls_mode: p.tls_mode.clone(),
            tls_alpns: p.tls_alpns.clone(),
            tls_min_version: p.tls_min_version.clone(),
            tls_ciphers: p.tls_ciphers.clone(),
            mtls_auth: p.mtls_auth,
            http_version: p.http_version.clone(),
            http_use_tls: p.http_use_tls,
            token_auth: p.token_auth,
            rstream_auth: p.rstream_auth,
            challenge_mode: p.challenge_mode,
            hostname: p.hostname.clone(),
            port: p.port,
            upstream_tls: p.upstream_tls,
            datagram_guaranteed_delivery: p.datagram_guaranteed_delivery,
            allow_cross_region_routing: p.allow_cross_region_routing,
            status,
            client_id: t.client_id.clone(),
            user_id: t.principal.clone(),
        }
    }
}

/// Label filters: every key must be present; a value of `null` matches any
/// value, a string only itself.
pub type LabelFilter = BTreeMap<String, Option<String>>;

fn labels_match(filter: &Option<LabelFilter>, labels: &BTreeMap<String, String>) -> bool {
    filter.as_ref().is_none_or(|wanted| {
        wanted.iter().all(|(key, value)| match (labels.get(key), value) {
            (None, _) => false,
            (Some(_), None) => true,
            (Some(have), Some(want)) => have == want,
        })
    })
}

fn eq<T: PartialEq + ?Sized>(wanted: Option<&T>, have: Option<&T>) -> bool {
    wanted.is_none_or(|w| have == Some(w))
}

/// Tunnel filters: every field given must equal the tunnel's.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TunnelFilters {
    pub id: Option<String>,
    pub name: Option<String>,
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub status: Option<Status>,
    pub client_id: Option<String>,
    pub user_id: Option<String>,
    pub protocol: Option<String>,
    pub hostname: Option<String>,
    pub publish: Option<bool>,
    pub http_version: Option<String>,
    #[schema(value_type = Option<BTreeMap<String, Option<String>>>)]
    pub labels: Option<LabelFilter>,
}

impl TunnelFilters {
    pub fn matches(&self, t: &Tunnel) -> bool {
        eq(self.id.as_deref(), Some(t.id.as_str()))
            && eq(self.name.as_deref(), t.name.as_deref())
            && eq(self.kind.as_deref(), t.kind.as_deref())
            && eq(self.status.as_ref(), Some(&t.status))
            && eq(self.client_id.as_deref(), Some(t.client_id.as_str()))
            && eq(self.user_id.as_deref(), Some(t.user_id.as_str()))
            && eq(self.protocol.as_deref(), t.protocol.as_deref())
            && eq(self.hostname.as_deref(), t.hostname.as_deref())
            && eq(self.publish.as_ref(), Some(&t.publish.unwrap_or(false)))
            && eq(self.http_version.as_deref(), t.http_version.as_deref())
            && labels_match(&self.labels, &t.labels)
    }
}

/// Client filters: every field given must equal the client's.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ClientFilters {
    pub id: Option<String>,
    pub status: Option<Status>,
    pub user_id: Option<String>,
    pub agent: Option<String>,
    pub channel: Option<String>,
    pub version: Option<String>,
    pub os: Option<String>,
    pub arch: Option<String>,
    pub protocol_version: Option<String>,
    #[schema(value_type = Option<BTreeMap<String, Option<String>>>)]
    pub labels: Option<LabelFilter>,
}

impl ClientFilters {
    pub fn matches(&self, c: &Client) -> bool {
        eq(self.id.as_deref(), Some(c.id.as_str()))
            && eq(self.status.as_ref(), Some(&c.status))
            && eq(self.user_id.as_deref(), Some(c.user_id.as_str()))
            && eq(self.agent.as_deref(), c.agent.as_deref())
            && eq(self.channel.as_deref(), c.channel.as_deref())
            && eq(self.version.as_deref(), c.version.as_deref())
            && eq(self.os.as_deref(), c.os.as_deref())
            && eq(self.arch.as_deref(), c.arch.as_deref())
            && eq(self.protocol_version.as_deref(), c.protocol_version.as_deref())
            && labels_match(&self.labels, &c.labels)
    }
}

/// `params` of `GET /api/tunnels`.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TunnelListParams {
    /// At most this many tunnels, oldest first.
    #[schema(minimum = 1)]
    pub limit: Option<u32>,
    pub filters: Option<TunnelFilters>,
}

/// `params` of `GET /api/clients`.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ClientListParams {
    /// At most this many clients, oldest first.
    #[schema(minimum = 1)]
    pub limit: Option<u32>,
    pub filters: Option<ClientFilters>,
}

/// `params` of the watch endpoints: each filter applies to the snapshot
/// and to every later event of its kind. A kind without a filter is not
/// filtered.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WatchParams {
    pub clients: Option<ClientFilters>,
    pub tunnels: Option<TunnelFilters>,
}

/// What a reservation keeps (beyond CE).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ReservationKind {
    /// A published hostname: only its principal may claim it.
    Hostname,
    /// A published TCP or UDP port (`tcp:20001`): only its principal may
    /// claim it.
    Port,
    /// A private tunnel's name: dials by it learn the agent is offline.
    Name,
}

/// A hostname, port or name kept for its principal after its tunnel went offline
/// (`edge.hostname_hold_seconds`). Beyond CE.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Reservation {
    pub kind: ReservationKind,
    /// The hostname, the port (`tcp:20001`), or the tunnel name.
    pub value: String,
    /// The principal it is kept for.
    pub user_id: String,
    /// The tunnel that held it when it went offline.
    pub tunnel_id: String,
    /// When its tunnel went offline (RFC 3339).
    pub since: String,
    /// When the reservation ends unless its principal claims it again.
    pub expires_at: String,
}

impl Reservation {
    pub fn from_hold(hold: &crate::registry::Hold) -> Self {
        use crate::registry::HoldKey;
        use crate::tunnel::Address;
        let (kind, value) = match &hold.key {
            HoldKey::Address(Address::Hostname(host)) => (ReservationKind::Hostname, host.clone()),
            HoldKey::Address(Address::Port(kind, port)) => (ReservationKind::Port, format!("{}:{port}", kind.name())),
            HoldKey::Name { name, .. } => (ReservationKind::Name, name.clone()),
        };
        Self {
            kind,
            value,
            user_id: hold.principal.clone(),
            tunnel_id: hold.tunnel.id.clone(),
            since: rfc3339(hold.since),
            expires_at: rfc3339(hold.until),
        }
    }
}

/// What a watch receives first: everything that matched when it started.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Snapshot {
    /// RFC 3339.
    pub snapshot_at: String,
    pub clients: Vec<Client>,
    pub tunnels: Vec<Tunnel>,
}

/// An event's object: the snapshot for `state.initial`, else the Client or
/// Tunnel the event is about.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(untagged)]
pub enum EventObject {
    Snapshot(Snapshot),
    Tunnel(Box<Tunnel>),
    Client(Client),
}

/// The event names a watch carries. `*.updated` are part of the format;
/// this engine emits none today, since nothing changes a live client or
/// tunnel in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
pub enum EventType {
    #[serde(rename = "state.initial")]
    StateInitial,
    #[serde(rename = "client.created")]
    ClientCreated,
    #[serde(rename = "client.updated")]
    ClientUpdated,
    #[serde(rename = "client.deleted")]
    ClientDeleted,
    #[serde(rename = "tunnel.created")]
    TunnelCreated,
    #[serde(rename = "tunnel.updated")]
    TunnelUpdated,
    #[serde(rename = "tunnel.deleted")]
    TunnelDeleted,
}

/// One event: an SSE `data:` line or one WebSocket text frame.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Event {
    /// 24 lowercase hex characters, the same for every watcher.
    pub id: String,
    #[serde(rename = "type")]
    pub kind: EventType,
    /// RFC 3339: when the change happened.
    pub created_at: String,
    /// The principal the object belongs to (for `state.initial`, the
    /// watcher's).
    pub user_id: String,
    pub object: EventObject,
}

/// Parses a `params` query value, naming what is wrong in terms an API
/// user can act on.
pub fn parse_params<T: for<'de> Deserialize<'de> + Default>(raw: Option<&str>) -> Result<T, String> {
    match raw.map(str::trim) {
        None | Some("") => Ok(T::default()),
        Some(text) => serde_json::from_str(text).map_err(|e| format!("bad params: {e}")),
    }
}

/// Whether `client` passes the filters (none: everything passes).
pub fn client_matches(filters: Option<&ClientFilters>, client: &Client) -> bool {
    filters.is_none_or(|f| f.matches(client))
}

/// Whether `tunnel` matches.
pub fn tunnel_matches(filters: Option<&TunnelFilters>, tunnel: &Tunnel) -> bool {
    filters.is_none_or(|f| f.matches(tunnel))
}

/// Sorts by age then id, so `limit` cuts a stable prefix.
pub fn sort_tunnels(tunnels: &mut [Arc<crate::registry::Tunnel>]) {
    tunnels.sort_by(|a, b| a.created_at.cmp(&b.created_at).then_with(|| a.id.cmp(&b.id)));
}

pub fn sort_clients(clients: &mut [ClientInfo]) {
    clients.sort_by(|a, b| a.connected_at.cmp(&b.connected_at).then_with(|| a.id.cmp(&b.id)));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn label_null_matches_any_value_but_needs_the_key() {
        let have = labels(&[("team", "core"), ("env", "prod")]);
        let f = |pairs: &[(&str, Option<&str>)]| {
            Some(pairs.iter().map(|(k, v)| (k.to_string(), v.map(str::to_string))).collect::<LabelFilter>())
        };
        assert!(labels_match(&None, &have));
        assert!(labels_match(&f(&[("team", None)]), &have));
        assert!(labels_match(&f(&[("team", Some("core")), ("env", None)]), &have));
        assert!(!labels_match(&f(&[("team", Some("edge"))]), &have));
        assert!(!labels_match(&f(&[("owner", None)]), &have));
    }

    #[test]
    fn params_errors_name_the_problem() {
        assert!(parse_params::<TunnelListParams>(None).unwrap().filters.is_none());
        let e = parse_params::<TunnelListParams>(Some("{\"filters\": {\"nmae\": \"x\"}}")).unwrap_err();
        assert!(e.contains("nmae"), "{e}");
        let e = parse_params::<TunnelListParams>(Some("{\"limit\": -1}")).unwrap_err();
        assert!(e.contains("bad params"), "{e}");
        let e = parse_params::<WatchParams>(Some("not json")).unwrap_err();
        assert!(e.starts_with("bad params"), "{e}");
        let p =
            parse_params::<TunnelListParams>(Some("{\"filters\": {\"labels\": {\"a\": null, \"b\": \"c\"}}}")).unwrap();
        assert_eq!(p.filters.unwrap().labels.unwrap().len(), 2);
    }
}

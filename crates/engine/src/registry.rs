//! The in-memory registry of clients (control channels), tunnels and the
//! names that lead to them.
//!
//! Every mutation goes through here and is published as a [`Change`] on a
//! broadcast feed, so the Engine API's events, metrics and any later
//! persistence or cross-engine replication hang off one place. The lock is a
//! plain mutex held for map updates only, never across an await.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, SystemTime};

use strait_proto::{Message, TunnelProperties};
use tokio::sync::{broadcast, mpsc};
use tokio::time::Instant;

use tokio_util::sync::CancellationToken;

use crate::auth::Principal;
use crate::ids;
use crate::tunnel::{Address, TunnelSpec};

/// What an agent said about itself when it opened its control channel.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientInfo {
    pub id: String,
    pub principal: String,
    pub agent: Option<String>,
    pub channel: Option<String>,
    pub version: Option<String>,
    pub os: Option<String>,
    pub arch: Option<String>,
    pub protocol_version: Option<String>,
    pub labels: HashMap<String, String>,
    pub connected_at: Option<SystemTime>,
    /// What carries the control channel: `tls` or `quic`.
    pub transport: &'static str,
}

/// A live control channel.
#[derive(Debug)]
pub struct Client {
    pub info: ClientInfo,
    /// Frames to send on the control channel, drained by its writer task.
    pub outbox: mpsc::Sender<Message>,
    /// The agent's QUIC connection, when it is on QUIC: its datagram
    /// tunnels' packets ride it.
    pub quic: Option<quinn::Connection>,
    /// The agent spills datagram packets too large for a QUIC datagram
    /// (`strait_proto::features::DATAGRAM_SPILL`).
    pub datagram_spill: bool,
    /// Its spill streams open at once (`datagram::spill::PER_CLIENT`).
    pub spill_permits: Arc<tokio::sync::Semaphore>,
    /// When the agent last sent a frame (milliseconds since the Unix
    /// epoch): a refusal of another channel's tunnel says how long this
    /// one has been silent.
    pub last_heard: std::sync::atomic::AtomicU64,
}

impl Client {
    pub fn new(info: ClientInfo, outbox: mpsc::Sender<Message>, quic: Option<quinn::Connection>) -> Self {
        let client = Self {
            info,
            outbox,
            quic,
            datagram_spill: false,
            spill_permits: Arc::new(tokio::sync::Semaphore::new(crate::datagram::spill::PER_CLIENT)),
            last_heard: Default::default(),
        };
        client.heard();
        client
    }

    /// The agent named the spill extension.
    pub fn with_datagram_spill(mut self, on: bool) -> Self {
        self.datagram_spill = on;
        self
    }

    /// The agent sent something.
    pub fn heard(&self) {
        let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_millis() as u64;
        self.last_heard.store(now, std::sync::atomic::Ordering::Relaxed);
    }

    /// How long the agent has been silent.
    pub fn silence(&self) -> Duration {
        let heard =
            SystemTime::UNIX_EPOCH + Duration::from_millis(self.last_heard.load(std::sync::atomic::Ordering::Relaxed));
        SystemTime::now().duration_since(heard).unwrap_or_default()
    }
}

/// A live tunnel with the complete properties the engine serves.
#[derive(Debug)]
pub struct Tunnel {
    pub id: String,
    pub client_id: String,
    pub principal: String,
    pub properties: TunnelProperties,
    /// The properties, typed.
    pub spec: TunnelSpec,
    pub created_at: SystemTime,
    /// The TLS server configuration of a tunnel with its own TLS options,
    /// built at its first connection and shared by the rest: one session
    /// cache per tunnel (so resumption works) instead of one per connection.
    pub tls_config: OnceLock<Arc<rustls::ServerConfig>>,
    /// The policy's rate limiter and verified proofs, built at the first
    /// request that needs them.
    pub policy_state: OnceLock<crate::edge::route::PolicyState>,
    /// Cancelled when the tunnel leaves the registry (closed, revoked, or
    /// its control channel gone): its listener and live connections end.
    pub closed: CancellationToken,
}

impl Tunnel {
    /// A tunnel with normalised `properties`.
    pub fn new(id: String, client_id: String, principal: String, properties: TunnelProperties) -> Self {
        let spec = TunnelSpec::of(&properties);
        Self::with_spec(id, client_id, principal, properties, spec)
    }

    /// A tunnel whose spec the caller read (and completed) already.
    pub fn with_spec(
        id: String,
        client_id: String,
        principal: String,
        properties: TunnelProperties,
        spec: TunnelSpec,
    ) -> Self {
        Self {
            id,
            client_id,
            principal,
            spec,
            properties,
            created_at: SystemTime::now(),
            tls_config: Default::default(),
            policy_state: Default::default(),
            closed: CancellationToken::new(),
        }
    }

    /// Where the public reaches it, if published.
    pub fn address(&self) -> Option<&Address> {
        self.spec.address.as_ref()
    }

    pub fn name(&self) -> Option<&str> {
        self.properties.name.as_deref()
    }

    pub fn hostname(&self) -> Option<&str> {
        self.properties.hostname.as_deref()
    }

    pub fn published(&self) -> bool {
        self.properties.publish == Some(true)
    }

    pub fn protocol(&self) -> Option<&str> {
        self.properties.protocol.as_deref()
    }
}

/// A change's identity: stamped once where it happens, so every watcher
/// (SSE, WebSocket, later webhooks) reports the same event id and time.
#[derive(Debug, Clone)]
pub struct Stamped<T> {
    /// Event id: 24 lowercase hex characters.
    pub id: String,
    pub at: SystemTime,
    pub object: T,
}

impl<T> Stamped<T> {
    fn now(object: T) -> Self {
        Self { id: ids::event_id(), at: SystemTime::now(), object }
    }
}

impl<T> std::ops::Deref for Stamped<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.object
    }
}

/// What a private dial's target resolves to.
#[derive(Debug)]
pub enum Dial {
    Live(Arc<Tunnel>),
    /// The dialer's own tunnel of that name is offline and held.
    Held(Hold),
    NotFound,
}

/// One registry mutation, as the event feed carries it.
#[derive(Debug, Clone)]
pub enum Change {
    ClientCreated(Stamped<ClientInfo>),
    ClientDeleted(Stamped<ClientInfo>),
    TunnelCreated(Stamped<Arc<Tunnel>>),
    TunnelDeleted(Stamped<Arc<Tunnel>>),
}

impl Change {
    /// The principal whose object changed.
    pub fn principal(&self) -> &str {
        match self {
            Change::ClientCreated(s) | Change::ClientDeleted(s) => &s.principal,
            Change::TunnelCreated(s) | Change::TunnelDeleted(s) => &s.principal,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RegistryError {
    #[error("{0} is already served by another principal's tunnel")]
    HostnameTaken(Address),
    #[error(
        "{0} is already served by this principal's tunnel {1}; close it first, or wait until its \
         control channel times out"
    )]
    HostnameInUse(Address, String),
    #[error(
        "path {1} of {0} is already served by this principal's tunnel {2}; close it first, or wait \
         until its control channel times out"
    )]
    PathInUse(Address, String, String),
    #[error("{0} is reserved for another principal (its tunnel went offline {1}s ago); try another one")]
    HostnameHeld(Address, u64),
    #[error("a tunnel named {0:?} is already open for this principal")]
    NameTaken(String),
    #[error("this client already has {0} tunnels open, the limit (limits.tunnels_per_client)")]
    TooManyTunnels(usize),
    #[error("this principal already has {0} tunnels open, the limit (limits.tunnels_per_principal)")]
    PrincipalTunnels(usize),
    #[error(
        "this principal's tunnels would carry {0} bytes of labels, over the limit of {1} \
         (limits.label_bytes_per_principal)"
    )]
    LabelBytes(usize, usize),
    #[error("this principal already has {0} control channels open, the limit (limits.control_channels_per_principal)")]
    PrincipalChannels(usize),
    #[error("the control channel is gone")]
    NoClient,
}

/// The limits and hold time the registry enforces, from `limits.*` and
/// `edge.hostname_hold_seconds`.
#[derive(Debug, Clone)]
pub struct Policy {
    pub tunnels_per_client: usize,
    pub tunnels_per_principal: usize,
    pub label_bytes_per_principal: usize,
    pub control_channels_per_principal: usize,
    /// How long a hostname or name stays reserved for its principal after
    /// its tunnel went offline. Zero: no holds.
    pub hold: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            tunnels_per_client: 256,
            tunnels_per_principal: 1024,
            label_bytes_per_principal: 1 << 20,
            control_channels_per_principal: 1000,
            hold: Duration::from_secs(300),
        }
    }
}

impl Policy {
    pub fn from_config(config: &crate::config::Config) -> Self {
        let limits = &config.limits;
        Self {
            tunnels_per_client: limits.tunnels_per_client,
            tunnels_per_principal: limits.tunnels_per_principal,
            label_bytes_per_principal: limits.label_bytes_per_principal,
            control_channels_per_principal: limits.control_channels_per_principal,
            hold: Duration::from_secs(config.edge.hostname_hold_seconds),
        }
    }
}

/// Where a request for a hostname and path goes.
#[derive(Debug)]
pub enum Lookup {
    /// The tunnel, and whether the hostname is split by path.
    Found(Arc<Tunnel>, bool),
    /// The hostname is served, but no tunnel takes this path.
    NoPath,
    /// The path's own tunnel went offline within the hold time: its agent
    /// is expected back (a fallback does not stand in for it meanwhile).
    Offline,
    /// No live tunnel serves the hostname.
    Unknown,
}

/// What a reservation keeps for its principal.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HoldKey {
    /// A published hostname or public port: nobody else may claim it.
    Address(Address),
    /// A private tunnel's name, within its principal: dials by name learn
    /// the agent is offline rather than that no such tunnel exists.
    Name { principal: String, name: String },
}

/// A hostname or name kept for the principal whose tunnel went offline.
#[derive(Debug, Clone)]
pub struct Hold {
    pub key: HoldKey,
    pub principal: String,
    /// The tunnel as it was when it went offline.
    pub tunnel: Arc<Tunnel>,
    pub since: SystemTime,
    pub until: SystemTime,
    expires: Instant,
}

/// How a tunnel went offline, which decides what is held for it.
///
/// A published hostname is held either way: a URL someone shared must not
/// pass to another principal because its agent restarted. A name is only
/// the principal's own, so its hold serves dialers of an agent that was
/// lost (they learn it is offline, a reason to retry); a tunnel its agent
/// closed is simply gone, as rstream agents expect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Departure {
    /// The agent closed the tunnel or its control channel.
    Closed,
    /// The control channel dropped, went silent or was cut.
    Lost,
}

/// What a principal holds, for its limits.
#[derive(Debug, Default)]
struct Usage {
    channels: usize,
    tunnels: usize,
    label_bytes: usize,
    holds: usize,
}

impl Usage {
    fn is_empty(&self) -> bool {
        self.channels == 0 && self.tunnels == 0 && self.label_bytes == 0 && self.holds == 0
    }
}

#[derive(Default)]
struct State {
    clients: HashMap<String, Arc<Client>>,
    tunnels: HashMap<String, Arc<Tunnel>>,
    /// Tunnel ids by client, for limits and for cleanup when a channel drops.
    tunnels_by_client: HashMap<String, Vec<String>>,
    /// Tunnel ids by published hostname or port. A hostname holds more
    /// than one when its principal's http tunnels split it by path.
    by_address: HashMap<Address, Vec<String>>,
    /// Path prefixes of a hostname whose tunnel went offline, until their
    /// hold ends.
    departed: HashMap<Address, Vec<(String, Instant)>>,
    by_name: HashMap<(String, String), String>,
    usage: HashMap<String, Usage>,
    holds: HashMap<HoldKey, Hold>,
    /// Holds in the order they expire (one hold time for all, so insertion
    /// order is expiry order); an entry whose hold was reclaimed or renewed
    /// since is skipped when it comes up.
    expiries: VecDeque<(Instant, HoldKey)>,
}

/// The label bytes a tunnel counts against its principal.
pub fn label_bytes(properties: &TunnelProperties) -> usize {
    properties.labels.iter().map(|(k, v)| k.len() + v.len()).sum()
}

impl State {
    fn usage(&mut self, principal: &str) -> &mut Usage {
        self.usage.entry(principal.to_string()).or_default()
    }

    fn release_usage(&mut self, principal: &str, change: impl FnOnce(&mut Usage)) {
        if let Some(usage) = self.usage.get_mut(principal) {
            change(usage);
            if usage.is_empty() {
                self.usage.remove(principal);
            }
        }
    }

    /// Drops the holds whose time is up.
    fn expire_holds(&mut self, now: Instant) {
        if !self.departed.is_empty() {
            self.departed.retain(|_, prefixes| {
                prefixes.retain(|(_, until)| *until > now);
                !prefixes.is_empty()
            });
        }
        while let Some((expires, _)) = self.expiries.front() {
            if *expires > now {
                break;
            }
            let (expires, key) = self.expiries.pop_front().expect("just looked");
            if self.holds.get(&key).is_some_and(|h| h.expires == expires) {
                self.drop_hold(&key);
            }
        }
    }

    fn drop_hold(&mut self, key: &HoldKey) -> Option<Hold> {
        let hold = self.holds.remove(key)?;
        self.release_usage(&hold.principal, |u| u.holds -= 1);
        Some(hold)
    }

    /// A live hold on `key`, if any (expired ones are gone first).
    fn hold(&mut self, key: &HoldKey) -> Option<&Hold> {
        self.expire_holds(Instant::now());
        self.holds.get(key)
    }

    /// Keeps what `tunnel` reached for its principal. A principal holds at
    /// most as many as it may have tunnels: past that its oldest hold goes.
    fn add_holds(&mut self, tunnel: &Arc<Tunnel>, how: Departure, hold: Duration, cap: usize) {
        if hold.is_zero() {
            return;
        }
        let mut keys = Vec::new();
        if let Some(address) = tunnel.address() {
            keys.push(HoldKey::Address(address.clone()));
        }
        if how == Departure::Lost
            && let Some(name) = tunnel.name()
        {
            keys.push(HoldKey::Name { principal: tunnel.principal.clone(), name: name.to_string() });
        }
        let now = Instant::now();
        let since = SystemTime::now();
        for key in keys {
            if self.usage(&tunnel.principal).holds >= cap {
                let oldest = self
                    .expiries
                    .iter()
                    .find(|(_, k)| self.holds.get(k).is_some_and(|h| h.principal == tunnel.principal));
                if let Some((_, key)) = oldest.cloned() {
                    self.drop_hold(&key);
                }
            }
            self.drop_hold(&key);
            let expires = now + hold;
            self.holds.insert(
                key.clone(),
                Hold {
                    key: key.clone(),
                    principal: tunnel.principal.clone(),
                    tunnel: tunnel.clone(),
                    since,
                    until: since + hold,
                    expires,
                },
            );
            self.usage(&tunnel.principal).holds += 1;
            self.expiries.push_back((expires, key));
        }
    }
}

/// Changes the feed holds for its slowest subscriber. A watcher that falls
/// this far behind is told it lagged and the Engine API disconnects it as a
/// slow consumer; the ring is fixed, so a stuck watcher costs no memory and
/// never slows a mutation. 4096 covers a reconnect storm of a few hundred
/// agents with several tunnels each.
pub const FEED_CAPACITY: usize = 4096;

pub struct Registry {
    state: Mutex<State>,
    changes: broadcast::Sender<Change>,
    policy: Policy,
}

impl Default for Registry {
    fn default() -> Self {
        Self::new(Policy::default())
    }
}

impl Registry {
    pub fn new(policy: Policy) -> Self {
        let (changes, _) = broadcast::channel(FEED_CAPACITY);
        Self { state: Mutex::new(State::default()), changes, policy }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A feed of every later change.
    pub fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.changes.subscribe()
    }

    /// A consistent snapshot and a feed that starts right after it.
    pub fn snapshot_and_subscribe(&self) -> (Vec<ClientInfo>, Vec<Arc<Tunnel>>, broadcast::Receiver<Change>) {
        let state = self.lock();
        let feed = self.changes.subscribe();
        let clients = state.clients.values().map(|c| c.info.clone()).collect();
        let tunnels = state.tunnels.values().cloned().collect();
        (clients, tunnels, feed)
    }

    fn publish(&self, change: Change) {
        // No subscriber is fine: nobody is watching.
        let _ = self.changes.send(change);
    }

    /// Registers a control channel, within its principal's limit.
    pub fn add_client(&self, client: Arc<Client>) -> Result<(), RegistryError> {
        let info = client.info.clone();
        let mut state = self.lock();
        let cap = self.policy.control_channels_per_principal;
        if state.usage.get(&info.principal).is_some_and(|u| u.channels >= cap) {
            return Err(RegistryError::PrincipalChannels(cap));
        }
        state.usage(&info.principal).channels += 1;
        state.clients.insert(info.id.clone(), client);
        self.publish(Change::ClientCreated(Stamped::now(info)));
        Ok(())
    }

    /// Removes a client and every tunnel it held; returns the tunnels.
    pub fn remove_client(&self, client_id: &str, how: Departure) -> Vec<Arc<Tunnel>> {
        let mut state = self.lock();
        let Some(client) = state.clients.remove(client_id) else {
            return Vec::new();
        };
        state.release_usage(&client.info.principal, |u| u.channels -= 1);
        let ids = state.tunnels_by_client.remove(client_id).unwrap_or_default();
        let mut removed = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(tunnel) = self.unindex(&mut state, &id, how) {
                self.publish(Change::TunnelDeleted(Stamped::now(tunnel.clone())));
                removed.push(tunnel);
            }
        }
        self.publish(Change::ClientDeleted(Stamped::now(client.info.clone())));
        removed
    }

    pub fn client(&self, client_id: &str) -> Option<Arc<Client>> {
        self.lock().clients.get(client_id).cloned()
    }

    pub fn clients(&self) -> Vec<ClientInfo> {
        self.lock().clients.values().map(|c| c.info.clone()).collect()
    }

    /// Registers a tunnel whose properties are already normalised. Every
    /// check runs before anything changes, so a refusal leaves no trace.
    pub fn add_tunnel(&self, tunnel: Tunnel) -> Result<Arc<Tunnel>, RegistryError> {
        let policy = &self.policy;
        let mut state = self.lock();
        if !state.clients.contains_key(&tunnel.client_id) {
            return Err(RegistryError::NoClient);
        }
        let count = state.tunnels_by_client.get(&tunnel.client_id).map_or(0, Vec::len);
        if count >= policy.tunnels_per_client {
            return Err(RegistryError::TooManyTunnels(policy.tunnels_per_client));
        }
        let labels = label_bytes(&tunnel.properties);
        let (tunnels, used) = state.usage.get(&tunnel.principal).map_or((0, 0), |u| (u.tunnels, u.label_bytes));
        if tunnels >= policy.tunnels_per_principal {
            return Err(RegistryError::PrincipalTunnels(policy.tunnels_per_principal));
        }
        if used + labels > policy.label_bytes_per_principal {
            return Err(RegistryError::LabelBytes(used + labels, policy.label_bytes_per_principal));
        }
        let address_key = tunnel.address().map(|a| HoldKey::Address(a.clone()));
        if let Some(address) = tunnel.address() {
            let live: Vec<&Arc<Tunnel>> =
                state.by_address.get(address).into_iter().flatten().filter_map(|id| state.tunnels.get(id)).collect();
            if let Some(first) = live.first() {
                // A hostname is its first tunnel's principal's; that
                // principal's http tunnels may share it, one per path.
                if first.principal != tunnel.principal {
                    return Err(RegistryError::HostnameTaken(address.clone()));
                }
                let http = |t: &Tunnel| t.spec.kind == crate::tunnel::Kind::Http;
                if !http(&tunnel) || !live.iter().all(|t| http(t)) {
                    return Err(RegistryError::HostnameInUse(address.clone(), first.id.clone()));
                }
                if let Some(same) = live.iter().find(|t| t.spec.route.prefix == tunnel.spec.route.prefix) {
                    return Err(match &tunnel.spec.route.prefix {
                        None => RegistryError::HostnameInUse(address.clone(), same.id.clone()),
                        Some(prefix) => RegistryError::PathInUse(address.clone(), prefix.clone(), same.id.clone()),
                    });
                }
            }
            let key = address_key.as_ref().expect("an address");
            if let Some(hold) = state.hold(key)
                && hold.principal != tunnel.principal
            {
                let ago = hold.since.elapsed().unwrap_or_default().as_secs();
                return Err(RegistryError::HostnameHeld(address.clone(), ago));
            }
        }
        let name_key = tunnel.name().map(|n| (tunnel.principal.clone(), n.to_string()));
        if let Some(key) = &name_key
            && state.by_name.contains_key(key)
        {
            return Err(RegistryError::NameTaken(key.1.clone()));
        }
        // Admitted: the principal takes back what it held.
        if let Some(key) = &address_key {
            state.drop_hold(key);
        }
        if let Some((principal, name)) = &name_key {
            state.drop_hold(&HoldKey::Name { principal: principal.clone(), name: name.clone() });
        }
        let tunnel = Arc::new(tunnel);
        if let Some(address) = tunnel.address() {
            state.by_address.entry(address.clone()).or_default().push(tunnel.id.clone());
            if let Some(departed) = state.departed.get_mut(address) {
                departed.retain(|(p, _)| Some(p) != tunnel.spec.route.prefix.as_ref());
                if departed.is_empty() {
                    state.departed.remove(address);
                }
            }
        }
        if let Some(key) = name_key {
            state.by_name.insert(key, tunnel.id.clone());
        }
        let usage = state.usage(&tunnel.principal);
        usage.tunnels += 1;
        usage.label_bytes += labels;
        state.tunnels_by_client.entry(tunnel.client_id.clone()).or_default().push(tunnel.id.clone());
        state.tunnels.insert(tunnel.id.clone(), tunnel.clone());
        self.publish(Change::TunnelCreated(Stamped::now(tunnel.clone())));
        Ok(tunnel)
    }

    /// Removes one tunnel of `client_id`; `None` if it holds no such tunnel.
    pub fn remove_tunnel(&self, client_id: &str, tunnel_id: &str) -> Option<Arc<Tunnel>> {
        let mut state = self.lock();
        if state.tunnels.get(tunnel_id).is_none_or(|t| t.client_id != client_id) {
            return None;
        }
        if let Some(ids) = state.tunnels_by_client.get_mut(client_id) {
            ids.retain(|id| id != tunnel_id);
        }
        let tunnel = self.unindex(&mut state, tunnel_id, Departure::Closed)?;
        self.publish(Change::TunnelDeleted(Stamped::now(tunnel.clone())));
        Some(tunnel)
    }

    /// Takes a tunnel out of every index; what it reached is held for its
    /// principal.
    fn unindex(&self, state: &mut State, tunnel_id: &str, how: Departure) -> Option<Arc<Tunnel>> {
        let tunnel = state.tunnels.remove(tunnel_id)?;
        tunnel.closed.cancel();
        if let Some(address) = tunnel.address()
            && let Some(ids) = state.by_address.get_mut(address)
        {
            ids.retain(|id| *id != tunnel.id);
            if ids.is_empty() {
                state.by_address.remove(address);
            }
            if let Some(prefix) = &tunnel.spec.route.prefix
                && !self.policy.hold.is_zero()
            {
                let departed = state.departed.entry(address.clone()).or_default();
                let now = Instant::now();
                departed.retain(|(p, until)| p != prefix && *until > now);
                departed.push((prefix.clone(), now + self.policy.hold));
            }
        }
        if let Some(name) = tunnel.name() {
            state.by_name.remove(&(tunnel.principal.clone(), name.to_string()));
        }
        let labels = label_bytes(&tunnel.properties);
        state.release_usage(&tunnel.principal, |u| {
            u.tunnels -= 1;
            u.label_bytes -= labels;
        });
        state.add_holds(&tunnel, how, self.policy.hold, self.policy.tunnels_per_principal);
        Some(tunnel)
    }

    /// The hold on a published hostname, if its tunnel is offline and the
    /// hold time is not up.
    pub fn hostname_hold(&self, hostname: &str) -> Option<Hold> {
        self.lock().hold(&HoldKey::Address(Address::Hostname(hostname.to_string()))).cloned()
    }

    /// The public ports of `kind` that a live tunnel serves or a hold keeps.
    pub fn ports_taken(&self, kind: crate::tunnel::Kind) -> std::collections::HashSet<u16> {
        let mut state = self.lock();
        state.expire_holds(Instant::now());
        let held = state.holds.keys().filter_map(|k| match k {
            HoldKey::Address(a) => Some(a),
            HoldKey::Name { .. } => None,
        });
        state
            .by_address
            .keys()
            .chain(held)
            .filter_map(|a| match a {
                Address::Port(k, port) if *k == kind => Some(*port),
                _ => None,
            })
            .collect()
    }

    /// The live holds `principal` may see, oldest first.
    pub fn holds(&self, principal: &Principal) -> Vec<Hold> {
        let mut state = self.lock();
        state.expire_holds(Instant::now());
        let mut holds: Vec<Hold> = state.holds.values().filter(|h| principal.sees(&h.principal)).cloned().collect();
        holds.sort_by_key(|h| h.expires);
        holds
    }

    pub fn tunnel(&self, tunnel_id: &str) -> Option<Arc<Tunnel>> {
        self.lock().tunnels.get(tunnel_id).cloned()
    }

    pub fn tunnels(&self) -> Vec<Arc<Tunnel>> {
        self.lock().tunnels.values().cloned().collect()
    }

    /// A tunnel serving `hostname`: its fallback if it is split by path,
    /// for what the TLS handshake decides (tls or http, the certificate).
    pub fn tunnel_by_hostname(&self, hostname: &str) -> Option<Arc<Tunnel>> {
        let state = self.lock();
        let address = Address::Hostname(hostname.to_string());
        let tunnels = state.by_address.get(&address)?.iter().filter_map(|id| state.tunnels.get(id));
        let mut first = None;
        for tunnel in tunnels {
            if tunnel.spec.route.prefix.is_none() {
                return Some(tunnel.clone());
            }
            first.get_or_insert(tunnel);
        }
        first.cloned()
    }

    /// The tunnel a request for `hostname` and `path` goes to: the longest
    /// path prefix that matches, else the hostname's fallback.
    pub fn route(&self, hostname: &str, path: &str) -> Lookup {
        let state = self.lock();
        let address = Address::Hostname(hostname.to_string());
        let Some(ids) = state.by_address.get(&address) else { return Lookup::Unknown };
        let mut best: Option<(&Arc<Tunnel>, usize)> = None;
        for tunnel in ids.iter().filter_map(|id| state.tunnels.get(id)) {
            let length = tunnel.spec.route.prefix.as_ref().map_or(0, |p| p.len() + 1);
            if best.is_none_or(|(_, l)| length > l) && tunnel.spec.route.matches(path) {
                best = Some((tunnel, length));
            }
        }
        // A longer prefix whose tunnel is briefly away wins over a shorter
        // live one: its requests wait for it rather than go astray.
        let live = best.map_or(0, |(_, l)| l);
        let now = Instant::now();
        let away = state.departed.get(&address).into_iter().flatten().any(|(prefix, until)| {
            *until > now
                && prefix.len() + 1 > live
                && crate::policy::PathRoute { prefix: Some(prefix.clone()), strip: false }.matches(path)
        });
        match best {
            _ if away => Lookup::Offline,
            Some((tunnel, _)) => Lookup::Found(tunnel.clone(), ids.len() > 1),
            None => Lookup::NoPath,
        }
    }

    /// Resolves what a dialer named: a tunnel id it may see, else a name of
    /// its own. Another principal's tunnel is answered exactly as a missing
    /// one, so ids are no oracle.
    pub fn resolve_dial(&self, principal: &Principal, id_or_name: &str) -> Dial {
        let mut state = self.lock();
        if let Some(t) = state.tunnels.get(id_or_name)
            && principal.sees(&t.principal)
        {
            return Dial::Live(t.clone());
        }
        let key = (principal.id.clone(), id_or_name.to_string());
        if let Some(t) = state.by_name.get(&key).and_then(|id| state.tunnels.get(id)) {
            return Dial::Live(t.clone());
        }
        let (principal, name) = key;
        match state.hold(&HoldKey::Name { principal, name }) {
            Some(hold) => Dial::Held(hold.clone()),
            None => Dial::NotFound,
        }
    }

    pub fn counts(&self) -> (usize, usize) {
        let state = self.lock();
        (state.clients.len(), state.tunnels.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry(hold_seconds: u64, tunnels_per_principal: usize) -> Registry {
        Registry::new(Policy { hold: Duration::from_secs(hold_seconds), tunnels_per_principal, ..Policy::default() })
    }

    fn client(registry: &Registry, id: &str, principal: &str) {
        let (outbox, _) = mpsc::channel(1);
        let info = ClientInfo { id: id.into(), principal: principal.into(), ..Default::default() };
        registry.add_client(Arc::new(Client::new(info, outbox, None))).unwrap();
    }

    fn tunnel(id: &str, client: &str, principal: &str, hostname: &str) -> Tunnel {
        let properties = TunnelProperties {
            publish: Some(true),
            protocol: Some("http".into()),
            hostname: Some(hostname.into()),
            name: Some(format!("n-{hostname}")),
            ..Default::default()
        };
        Tunnel::new(id.into(), client.into(), principal.into(), properties)
    }

    #[tokio::test(start_paused = true)]
    async fn a_hold_ends_after_its_time() {
        let r = registry(60, 10);
        client(&r, "c1", "alice");
        client(&r, "c2", "bob");
        r.add_tunnel(tunnel("t1", "c1", "alice", "a.t.h")).unwrap();
        r.remove_client("c1", Departure::Lost);
        assert!(r.hostname_hold("a.t.h").is_some());
        let err = r.add_tunnel(tunnel("t2", "c2", "bob", "a.t.h")).unwrap_err();
        assert!(matches!(err, RegistryError::HostnameHeld(..)), "{err}");
        tokio::time::advance(Duration::from_secs(59)).await;
        assert!(r.hostname_hold("a.t.h").is_some());
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(r.hostname_hold("a.t.h").is_none());
        r.add_tunnel(tunnel("t2", "c2", "bob", "a.t.h")).expect("free once the hold is over");
        let alice = Principal::new("alice");
        assert!(r.holds(&alice).is_empty(), "the name hold expired with it");
    }

    #[tokio::test(start_paused = true)]
    async fn a_principal_holds_no_more_than_it_may_open() {
        let r = registry(600, 2);
        client(&r, "c1", "alice");
        for i in 0..3 {
            r.add_tunnel(tunnel(&format!("t{i}"), "c1", "alice", &format!("h{i}.t.h"))).unwrap();
            r.remove_tunnel("c1", &format!("t{i}")).unwrap();
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        let holds = r.holds(&Principal::new("alice"));
        // Closed tunnels hold their hostnames; the oldest hold went first.
        let ids: Vec<&str> = holds.iter().map(|h| h.tunnel.id.as_str()).collect();
        assert_eq!(ids, ["t1", "t2"]);
        assert!(r.hostname_hold("h0.t.h").is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn reclaiming_drops_the_hold_and_usage_returns_to_zero() {
        let r = registry(600, 10);
        client(&r, "c1", "alice");
        r.add_tunnel(tunnel("t1", "c1", "alice", "a.t.h")).unwrap();
        r.remove_client("c1", Departure::Lost);
        client(&r, "c2", "alice");
        r.add_tunnel(tunnel("t2", "c2", "alice", "a.t.h")).expect("its principal takes it back");
        assert!(r.holds(&Principal::new("alice")).is_empty());
        r.remove_client("c2", Departure::Lost);
        tokio::time::advance(Duration::from_secs(601)).await;
        r.hostname_hold("a.t.h");
        assert!(r.lock().usage.is_empty(), "nothing is left counted once everything is gone");
    }
}

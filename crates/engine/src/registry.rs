//! The in-memory registry of clients (control channels), tunnels and the
//! names that lead to them.
//!
//! Every mutation goes through here and is published as a [`Change`] on a
//! broadcast feed, so the Engine API's events, metrics and any later
//! persistence or cross-engine replication hang off one place. The lock is a
//! plain mutex held for map updates only, never across an await.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::SystemTime;

use strait_proto::{Message, TunnelProperties};
use tokio::sync::{broadcast, mpsc};

use crate::auth::Principal;
use crate::ids;

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
}

/// A live control channel.
#[derive(Debug)]
pub struct Client {
    pub info: ClientInfo,
    /// Frames to send on the control channel, drained by its writer task.
    pub outbox: mpsc::Sender<Message>,
}

/// A live tunnel with the complete properties the engine serves.
#[derive(Debug, Clone)]
pub struct Tunnel {
    pub id: String,
    pub client_id: String,
    pub principal: String,
    pub properties: TunnelProperties,
    pub created_at: SystemTime,
    /// The TLS server configuration of a tunnel with its own TLS options,
    /// built at its first connection and shared by the rest: one session
    /// cache per tunnel (so resumption works) instead of one per connection.
    pub tls_config: OnceLock<Arc<rustls::ServerConfig>>,
}

impl Tunnel {
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

/// One registry mutation, as the event feed carries it.
#[derive(Debug, Clone)]
pub enum Change {
    ClientCreated(Stamped<ClientInfo>),
    ClientDeleted(Stamped<ClientInfo>),
    TunnelCreated(Stamped<Arc<Tunnel>>),
    TunnelDeleted(Stamped<Arc<Tunnel>>),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RegistryError {
    #[error("hostname {0} is already served by another tunnel")]
    HostnameTaken(String),
    #[error("a tunnel named {0:?} is already open for this principal")]
    NameTaken(String),
    #[error("this client already has {0} tunnels open, the limit")]
    TooManyTunnels(usize),
    #[error("the control channel is gone")]
    NoClient,
}

#[derive(Default)]
struct State {
    clients: HashMap<String, Arc<Client>>,
    tunnels: HashMap<String, Arc<Tunnel>>,
    /// Tunnel ids by client, for limits and for cleanup when a channel drops.
    tunnels_by_client: HashMap<String, Vec<String>>,
    by_hostname: HashMap<String, String>,
    by_name: HashMap<(String, String), String>,
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
}

impl Default for Registry {
    fn default() -> Self {
        Self::new()
    }
}

impl Registry {
    pub fn new() -> Self {
        Self::with_feed_capacity(FEED_CAPACITY)
    }

    /// A registry whose change feed holds `capacity` changes (tests use a
    /// small one to provoke a slow consumer).
    pub fn with_feed_capacity(capacity: usize) -> Self {
        let (changes, _) = broadcast::channel(capacity.max(1));
        Self { state: Mutex::new(State::default()), changes }
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

    pub fn add_client(&self, client: Arc<Client>) {
        let info = client.info.clone();
        {
            let mut state = self.lock();
            state.clients.insert(info.id.clone(), client);
            self.publish(Change::ClientCreated(Stamped::now(info)));
        }
    }

    /// Removes a client and every tunnel it held; returns the tunnels.
    pub fn remove_client(&self, client_id: &str) -> Vec<Arc<Tunnel>> {
        let mut state = self.lock();
        let Some(client) = state.clients.remove(client_id) else {
            return Vec::new();
        };
        let ids = state.tunnels_by_client.remove(client_id).unwrap_or_default();
        let mut removed = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(tunnel) = Self::unindex(&mut state, &id) {
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

    /// Registers a tunnel whose properties are already normalised.
    pub fn add_tunnel(&self, tunnel: Tunnel, max_per_client: usize) -> Result<Arc<Tunnel>, RegistryError> {
        let mut state = self.lock();
        if !state.clients.contains_key(&tunnel.client_id) {
            return Err(RegistryError::NoClient);
        }
        let count = state.tunnels_by_client.get(&tunnel.client_id).map_or(0, Vec::len);
        if count >= max_per_client {
            return Err(RegistryError::TooManyTunnels(max_per_client));
        }
        if let Some(host) = tunnel.hostname()
            && state.by_hostname.contains_key(host)
        {
            return Err(RegistryError::HostnameTaken(host.to_string()));
        }
        let name_key = tunnel.name().map(|n| (tunnel.principal.clone(), n.to_string()));
        if let Some(key) = &name_key
            && state.by_name.contains_key(key)
        {
            return Err(RegistryError::NameTaken(key.1.clone()));
        }
        let tunnel = Arc::new(tunnel);
        if let Some(host) = tunnel.hostname() {
            state.by_hostname.insert(host.to_string(), tunnel.id.clone());
        }
        if let Some(key) = name_key {
            state.by_name.insert(key, tunnel.id.clone());
        }
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
        let tunnel = Self::unindex(&mut state, tunnel_id)?;
        self.publish(Change::TunnelDeleted(Stamped::now(tunnel.clone())));
        Some(tunnel)
    }

    fn unindex(state: &mut State, tunnel_id: &str) -> Option<Arc<Tunnel>> {
        let tunnel = state.tunnels.remove(tunnel_id)?;
        if let Some(host) = tunnel.hostname() {
            state.by_hostname.remove(host);
        }
        if let Some(name) = tunnel.name() {
            state.by_name.remove(&(tunnel.principal.clone(), name.to_string()));
        }
        Some(tunnel)
    }

    pub fn tunnel(&self, tunnel_id: &str) -> Option<Arc<Tunnel>> {
        self.lock().tunnels.get(tunnel_id).cloned()
    }

    pub fn tunnels(&self) -> Vec<Arc<Tunnel>> {
        self.lock().tunnels.values().cloned().collect()
    }

    pub fn tunnel_by_hostname(&self, hostname: &str) -> Option<Arc<Tunnel>> {
        let state = self.lock();
        state.by_hostname.get(hostname).and_then(|id| state.tunnels.get(id)).cloned()
    }

    /// Resolves what a dialer named: a tunnel id, else a name of its own.
    pub fn resolve_dial(&self, principal: &Principal, id_or_name: &str) -> Option<Arc<Tunnel>> {
        let state = self.lock();
        if let Some(t) = state.tunnels.get(id_or_name) {
            return Some(t.clone());
        }
        state.by_name.get(&(principal.0.clone(), id_or_name.to_string())).and_then(|id| state.tunnels.get(id)).cloned()
    }

    pub fn counts(&self) -> (usize, usize) {
        let state = self.lock();
        (state.clients.len(), state.tunnels.len())
    }
}

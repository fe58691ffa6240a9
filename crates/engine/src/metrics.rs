//! Prometheus metrics: one registry and the handles every part of the
//! engine updates on its paths. Serving them (`metrics.prometheus`) is the
//! job of the metrics listener; the handles live here so every part counts
//! from day one and names stay in one place.

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProtocolLabel {
    pub protocol: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StaticProtocolLabel {
    /// `tcp` or `udp`.
    pub protocol: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    /// `published` (a public connection paired with the agent) or
    /// `private` (a dial by another agent).
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabel {
    /// `in`: towards the agent; `out`: from the agent to the public side.
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    /// `2xx`, `3xx`, `4xx`, `5xx` (or `1xx`).
    pub class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// The limit that refused it, as its configuration key under `limits.`.
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransportLabel {
    /// `tls` or `quic`.
    pub transport: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabel {
    pub version: &'static str,
    pub protocol: &'static str,
}

pub struct Metrics {
    pub registry: Registry,
    clients: Gauge,
    clients_by_transport: Family<TransportLabel, Gauge>,
    quic_connections: Gauge,
    quic_handshake_failures: Counter,
    datagrams_relayed: Counter,
    datagrams_dropped: Family<ReasonLabel, Counter>,
    datagrams_spilled: Counter,
    published_connections: Family<StaticProtocolLabel, Gauge>,
    udp_packets: Family<DirectionLabel, Counter>,
    udp_packets_dropped: Family<ReasonLabel, Counter>,
    udp_sessions_evicted: Counter,
    tunnels: Family<ProtocolLabel, Gauge>,
    streams_active: Family<KindLabel, Gauge>,
    streams_total: Family<KindLabel, Counter>,
    bytes: Family<DirectionLabel, Counter>,
    stream_pairing: Histogram,
    http_requests: Family<StatusLabel, Counter>,
    tls_handshake_failures: Counter,
    auth_failures: Counter,
    connections_refused: Family<ReasonLabel, Counter>,
    /// Mirrors of the certificate store's counters, refreshed at scrape.
    cert_reloads: Counter<u64, AtomicU64>,
    cert_reload_failures: Counter<u64, AtomicU64>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("strait");
        let m = Self {
            clients: Gauge::default(),
            clients_by_transport: Family::default(),
            quic_connections: Gauge::default(),
            quic_handshake_failures: Counter::default(),
            datagrams_relayed: Counter::default(),
            datagrams_dropped: Family::default(),
            datagrams_spilled: Counter::default(),
            published_connections: Family::default(),
            udp_packets: Family::default(),
            udp_packets_dropped: Family::default(),
            udp_sessions_evicted: Counter::default(),
            tunnels: Family::default(),
            streams_active: Family::default(),
            streams_total: Family::default(),
            bytes: Family::default(),
            stream_pairing: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            http_requests: Family::default(),
            tls_handshake_failures: Counter::default(),
            auth_failures: Counter::default(),
            connections_refused: Family::default(),
            cert_reloads: Counter::default(),
            cert_reload_failures: Counter::default(),
            registry: Registry::default(),
        };
        registry.register("clients_connected", "Agents with an open control channel", m.clients.clone());
        registry.register(
            "clients_by_transport",
            "Agents with an open control channel, by what carries it",
            m.clients_by_transport.clone(),
        );
        registry.register("quic_connections", "Open QUIC connections from agents", m.quic_connections.clone());
        registry.register(
            "datagrams_relayed",
            "Datagram-tunnel packets carried between a dialer and an agent (QUIC datagrams or framed)",
            m.datagrams_relayed.clone(),
        );
        registry.register(
            "datagrams_dropped",
            "QUIC datagrams dropped: short, oversized, unknown_channel, queue_full",
            m.datagrams_dropped.clone(),
        );
        registry.register(
            "datagrams_spilled",
            "Datagram-channel packets too large for a QUIC datagram, carried on the channel's spill stream",
            m.datagrams_spilled.clone(),
        );
        registry.register(
            "published_connections",
            "Open connections of published tcp tunnels and sessions of published udp tunnels",
            m.published_connections.clone(),
        );
        registry.register(
            "udp_packets",
            "Packets of published udp tunnels carried (in: towards the agent, out: to the public source)",
            m.udp_packets.clone(),
        );
        registry.register(
            "udp_packets_dropped",
            "Packets a published udp port dropped: oversized, untrusted, queue_full",
            m.udp_packets_dropped.clone(),
        );
        registry.register(
            "udp_sessions_evicted",
            "Idle udp sessions ended to make room (udp.max_sessions_per_tunnel)",
            m.udp_sessions_evicted.clone(),
        );
        registry.register(
            "quic_handshake_failures",
            "QUIC connections that failed their handshake (or offered another ALPN)",
            m.quic_handshake_failures.clone(),
        );
        registry.register(
            "tunnels",
            "Live tunnels by protocol (private tunnels count as \"private\")",
            m.tunnels.clone(),
        );
        registry.register("streams_active", "Streams carrying bytes now", m.streams_active.clone());
        registry.register("streams", "Streams paired since start", m.streams_total.clone());
        registry.register("stream_bytes", "Bytes carried through streams", m.bytes.clone());
        registry.register(
            "stream_pairing_seconds",
            "Time from asking the agent for a stream to the agent's stream arriving",
            m.stream_pairing.clone(),
        );
        registry.register(
            "http_requests",
            "Published HTTP requests answered, by status class",
            m.http_requests.clone(),
        );
        registry.register(
            "tls_handshake_failures",
            "TLS connections that failed before or during the handshake",
            m.tls_handshake_failures.clone(),
        );
        registry.register("auth_failures", "Refused tokens (agents, API, token_auth tunnels)", m.auth_failures.clone());
        registry.register(
            "connections_refused",
            "Connections closed at accept by a limit (max_connections or a per-source limit)",
            m.connections_refused.clone(),
        );
        registry.register("certificate_reloads", "Certificate pairs reloaded from disk", m.cert_reloads.clone());
        registry.register(
            "certificate_reload_failures",
            "Changed certificate pairs that failed to load (the old pair kept serving)",
            m.cert_reload_failures.clone(),
        );
        let build: Family<BuildLabel, Gauge> = Family::default();
        build
            .get_or_create(&BuildLabel { version: env!("CARGO_PKG_VERSION"), protocol: strait_proto::PROTOCOL_VERSION })
            .set(1);
        registry.register("build_info", "Build information", build);
        Self { registry, ..m }
    }

    pub fn client_connected(&self, transport: &'static str) {
        self.clients.inc();
        self.clients_by_transport.get_or_create(&TransportLabel { transport }).inc();
    }

    pub fn client_disconnected(&self, transport: &'static str) {
        self.clients.dec();
        self.clients_by_transport.get_or_create(&TransportLabel { transport }).dec();
    }

    pub fn clients_by_transport(&self, transport: &'static str) -> i64 {
        self.clients_by_transport.get_or_create(&TransportLabel { transport }).get()
    }

    /// A QUIC connection is up; the gauge falls when the guard drops.
    pub fn quic_connection(&self) -> GaugeGuard {
        self.quic_connections.inc();
        GaugeGuard { active: self.quic_connections.clone() }
    }

    pub fn quic_connections(&self) -> i64 {
        self.quic_connections.get()
    }

    pub fn quic_handshake_failed(&self) {
        self.quic_handshake_failures.inc();
    }

    pub fn quic_handshake_failures(&self) -> u64 {
        self.quic_handshake_failures.get()
    }

    pub fn datagrams_relayed(&self, packets: u64) {
        self.datagrams_relayed.inc_by(packets);
    }

    pub fn datagram_dropped(&self, reason: &'static str) {
        self.datagrams_dropped.get_or_create(&ReasonLabel { reason }).inc();
    }

    /// The drop counter for `reason`, for a task that counts on its own.
    pub fn datagram_drops(&self, reason: &'static str) -> Counter {
        self.datagrams_dropped.get_or_create(&ReasonLabel { reason }).clone()
    }

    /// The spilled-packets counter, for a spill stream's task.
    pub fn datagrams_spilled(&self) -> Counter {
        self.datagrams_spilled.clone()
    }

    pub fn datagrams_dropped(&self, reason: &'static str) -> u64 {
        self.datagrams_dropped.get_or_create(&ReasonLabel { reason }).get()
    }

    /// A published tcp connection or udp session is open; the gauge falls
    /// when the guard drops.
    pub fn published_connection(&self, protocol: &'static str) -> GaugeGuard {
        let active = self.published_connections.get_or_create(&StaticProtocolLabel { protocol }).clone();
        active.inc();
        GaugeGuard { active }
    }

    pub fn published_connections(&self, protocol: &'static str) -> i64 {
        self.published_connections.get_or_create(&StaticProtocolLabel { protocol }).get()
    }

    pub fn udp_packets(&self, towards_agent: u64, from_agent: u64) {
        self.udp_packets.get_or_create(&DirectionLabel { direction: "in" }).inc_by(towards_agent);
        self.udp_packets.get_or_create(&DirectionLabel { direction: "out" }).inc_by(from_agent);
    }

    pub fn udp_packet_dropped(&self, reason: &'static str) {
        self.udp_packets_dropped.get_or_create(&ReasonLabel { reason }).inc();
    }

    pub fn udp_packets_dropped(&self, reason: &'static str) -> u64 {
        self.udp_packets_dropped.get_or_create(&ReasonLabel { reason }).get()
    }

    pub fn udp_session_evicted(&self) {
        self.udp_sessions_evicted.inc();
    }

    pub fn udp_sessions_evicted(&self) -> u64 {
        self.udp_sessions_evicted.get()
    }

    /// `protocol` is the tunnel's published protocol or `private`.
    pub fn tunnel_opened(&self, protocol: &str) {
        self.tunnels.get_or_create(&ProtocolLabel { protocol: protocol.to_string() }).inc();
    }

    pub fn tunnel_closed(&self, protocol: &str) {
        self.tunnels.get_or_create(&ProtocolLabel { protocol: protocol.to_string() }).dec();
    }

    /// A stream paired; keep the guard alive while it carries bytes.
    pub fn stream_started(&self, kind: &'static str, pairing: Option<Duration>) -> GaugeGuard {
        let label = KindLabel { kind };
        self.streams_total.get_or_create(&label).inc();
        let active = self.streams_active.get_or_create(&label).clone();
        active.inc();
        if let Some(pairing) = pairing {
            self.stream_pairing.observe(pairing.as_secs_f64());
        }
        GaugeGuard { active }
    }

    /// Bytes a finished (or finishing) stream carried.
    pub fn stream_bytes(&self, towards_agent: u64, from_agent: u64) {
        self.bytes.get_or_create(&DirectionLabel { direction: "in" }).inc_by(towards_agent);
        self.bytes.get_or_create(&DirectionLabel { direction: "out" }).inc_by(from_agent);
    }

    pub fn http_response(&self, status: u16) {
        let class = match status {
            100..=199 => "1xx",
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            _ => "5xx",
        };
        self.http_requests.get_or_create(&StatusLabel { class }).inc();
    }

    pub fn tls_handshake_failed(&self) {
        self.tls_handshake_failures.inc();
    }

    pub fn tls_handshake_failures(&self) -> u64 {
        self.tls_handshake_failures.get()
    }

    pub fn auth_failed(&self) {
        self.auth_failures.inc();
    }

    /// `reason` is [`crate::admission::Refusal::label`].
    pub fn connection_refused(&self, reason: &'static str) {
        self.connections_refused.get_or_create(&ReasonLabel { reason }).inc();
    }

    pub fn connections_refused(&self, reason: &'static str) -> u64 {
        self.connections_refused.get_or_create(&ReasonLabel { reason }).get()
    }

    /// Brings the certificate counters up to the store's totals (called just
    /// before encoding a scrape).
    pub fn sync_certificates(&self, reloads: u64, failures: u64) {
        let add = |counter: &Counter<u64, AtomicU64>, total: u64| {
            let seen = counter.get();
            if total > seen {
                counter.inc_by(total - seen);
            }
        };
        add(&self.cert_reloads, reloads);
        add(&self.cert_reload_failures, failures);
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

/// Decrements the active-stream gauge when the stream ends.
/// Holds one unit of a gauge (a stream active, a QUIC connection open);
/// gives it back when dropped.
pub struct GaugeGuard {
    active: Gauge,
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.active.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_family_is_exposed() {
        let m = Metrics::new();
        m.client_connected("quic");
        m.tunnel_opened("http");
        let guard = m.stream_started("published", Some(Duration::from_millis(3)));
        m.stream_bytes(10, 20);
        m.http_response(503);
        m.auth_failed();
        m.sync_certificates(2, 1);
        let udp = m.published_connection("udp");
        m.udp_packets(3, 4);
        m.udp_packet_dropped("queue_full");
        m.udp_session_evicted();
        let text = m.encode();
        for needle in [
            "strait_clients_connected 1",
            "strait_clients_by_transport{transport=\"quic\"} 1",
            "strait_tunnels{protocol=\"http\"} 1",
            "strait_streams_active{kind=\"published\"} 1",
            "strait_streams_total{kind=\"published\"} 1",
            "strait_stream_bytes_total{direction=\"out\"} 20",
            "strait_stream_pairing_seconds_count 1",
            "strait_http_requests_total{class=\"5xx\"} 1",
            "strait_auth_failures_total 1",
            "strait_certificate_reloads_total 2",
            "strait_certificate_reload_failures_total 1",
            "strait_build_info{",
            "strait_published_connections{protocol=\"udp\"} 1",
            "strait_udp_packets_total{direction=\"out\"} 4",
            "strait_udp_packets_dropped_total{reason=\"queue_full\"} 1",
            "strait_udp_sessions_evicted_total 1",
        ] {
            assert!(text.contains(needle), "{needle} missing in\n{text}");
        }
        drop(guard);
        drop(udp);
        assert!(m.encode().contains("strait_published_connections{protocol=\"udp\"} 0"));
        assert!(m.encode().contains("strait_streams_active{kind=\"published\"} 0"));
    }
}

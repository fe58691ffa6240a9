//! Prometheus metrics: one registry, counters and gauges the engine updates
//! on its paths. Serving them (`metrics.prometheus`) lives in the Engine API
//! issue; the handles are here so every part counts from day one.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;

pub struct Metrics {
    pub registry: Registry,
    tls_handshake_failures: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("strait");
        let tls_handshake_failures = Counter::default();
        registry.register(
            "tls_handshake_failures",
            "TLS connections that failed before or during the handshake",
            tls_handshake_failures.clone(),
        );
        Self { registry, tls_handshake_failures }
    }

    pub fn tls_handshake_failed(&self) {
        self.tls_handshake_failures.inc();
    }

    pub fn tls_handshake_failures(&self) -> u64 {
        self.tls_handshake_failures.get()
    }
}

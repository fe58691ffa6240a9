//! Admission on the TLS port: who may start a handshake now.
//!
//! One engine serves many hosts, so no one host may take what the others
//! need. Every new connection is admitted or refused at once, before any
//! byte is read, by its source (an IPv4 address, or an IPv6 /64: one host
//! or one site's delegated prefix):
//!
//! - at most `limits.handshakes_per_source` of a source's connections may be
//!   in their handshake (ClientHello, TLS, an agent's first frame) at once,
//!   so idle sockets from one host cannot park the engine's accept budget;
//! - a token bucket of `limits.handshake_rate_per_source` new connections a
//!   second (burst `limits.handshake_burst_per_source`);
//! - a source whose tokens were refused `limits.auth_failures_per_source`
//!   times within a minute is refused until its bucket refills.
//!
//! A refusal closes the socket (the peer sees a reset or EOF, never a
//! stall), is counted in `strait_connections_refused_total{reason}` and
//! logged at most once per [`LOG_EVERY`], with how many were refused since.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

use crate::config::LimitsConfig;

/// One refusal log line at most this often; the count covers the rest.
pub const LOG_EVERY: Duration = Duration::from_secs(10);

/// Sources tracked before idle ones are swept out. Each costs well under a
/// hundred bytes; the sweep keeps only sources with a handshake in flight
/// or a bucket not yet full again.
const SWEEP_ABOVE: usize = 4096;

/// The window over which `auth_failures_per_source` refills.
const AUTH_WINDOW: Duration = Duration::from_secs(60);

/// Where a connection comes from, as limits count it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    V4(u32),
    /// The first 64 bits of the address.
    V6(u64),
}

impl Source {
    pub fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => Source::V4(v4.into()),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Source::V4(v4.into()),
                None => Source::V6((u128::from(v6) >> 64) as u64),
            },
        }
    }
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `limits.max_connections` connections are open.
    Capacity,
    /// The source has `limits.handshakes_per_source` handshakes in flight.
    Handshakes,
    /// The source opens connections faster than its handshake rate.
    Rate,
    /// The source presented too many refused tokens.
    AuthFailures,
}

impl Refusal {
    /// The `reason` label of `strait_connections_refused_total`.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::Capacity => "max_connections",
            Refusal::Handshakes => "handshakes_per_source",
            Refusal::Rate => "handshake_rate_per_source",
            Refusal::AuthFailures => "auth_failures_per_source",
        }
    }
}

/// A token bucket, refilled lazily from the time of its last use.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    pub(crate) fn full(capacity: f64, now: Instant) -> Self {
        Self { tokens: capacity, at: now }
    }

    pub(crate) fn refill(&mut self, capacity: f64, per_second: f64, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * per_second).min(capacity);
        self.at = now;
    }

    pub(crate) fn take(&mut self, capacity: f64, per_second: f64, now: Instant) -> bool {
        self.refill(capacity, per_second, now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    pub(crate) fn is_full(&self, capacity: f64, per_second: f64, now: Instant) -> bool {
        let mut probe = *self;
        probe.refill(capacity, per_second, now);
        probe.tokens >= capacity
    }
}

#[derive(Debug)]
struct SourceState {
    in_handshake: usize,
    handshakes: Bucket,
    auth: Bucket,
}

#[derive(Debug)]
struct Limits {
    handshakes: usize,
    rate: f64,
    burst: f64,
    auth_failures: f64,
}

impl Limits {
    fn auth_rate(&self) -> f64 {
        self.auth_failures / AUTH_WINDOW.as_secs_f64()
    }
}

#[derive(Debug, Default)]
struct LogState {
    last: Option<Instant>,
    suppressed: u64,
}

pub struct Admission {
    limits: Limits,
    sources: Mutex<HashMap<Source, SourceState>>,
    log: Mutex<LogState>,
}

/// A connection in its handshake. Dropping it ends the handshake for its
/// source's count.
pub struct HandshakeSlot {
    admission: Arc<Admission>,
    source: Source,
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        if let Some(state) = self.admission.lock().get_mut(&self.source) {
            state.in_handshake -= 1;
        }
    }
}

impl std::fmt::Debug for HandshakeSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HandshakeSlot").field("source", &self.source).finish()
    }
}

impl Admission {
    pub fn new(limits: &LimitsConfig) -> Self {
        Self {
            limits: Limits {
                handshakes: limits.handshakes_per_source,
                rate: limits.handshake_rate_per_source as f64,
                burst: limits.handshake_burst_per_source as f64,
                auth_failures: limits.auth_failures_per_source as f64,
            },
            sources: Mutex::new(HashMap::new()),
            log: Mutex::new(LogState::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<Source, SourceState>> {
        self.sources.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Admits a new connection from `ip` into its handshake, or says why not.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<HandshakeSlot, Refusal> {
        let source = Source::of(ip);
        let now = Instant::now();
        let l = &self.limits;
        let mut sources = self.lock();
        if sources.len() > SWEEP_ABOVE {
            sweep(&mut sources, l, now);
        }
        let state = sources.entry(source).or_insert_with(|| SourceState {
            in_handshake: 0,
            handshakes: Bucket::full(l.burst, now),
            auth: Bucket::full(l.auth_failures, now),
        });
        state.auth.refill(l.auth_failures, l.auth_rate(), now);
        if state.auth.tokens < 1.0 {
            return Err(Refusal::AuthFailures);
        }
        if state.in_handshake >= l.handshakes {
            return Err(Refusal::Handshakes);
        }
        if !state.handshakes.take(l.burst, l.rate, now) {
            return Err(Refusal::Rate);
        }
        state.in_handshake += 1;
        drop(sources);
        Ok(HandshakeSlot { admission: self.clone(), source })
    }

    /// A token from `ip` was refused.
    pub fn auth_failed(&self, ip: IpAddr) {
        let now = Instant::now();
        let l = &self.limits;
        let mut sources = self.lock();
        let state = sources.entry(Source::of(ip)).or_insert_with(|| SourceState {
            in_handshake: 0,
            handshakes: Bucket::full(l.burst, now),
            auth: Bucket::full(l.auth_failures, now),
        });
        state.auth.take(l.auth_failures, l.auth_rate(), now);
    }

    /// Whether `ip` has used up its refused tokens (the API answers 429
    /// without looking at the token).
    pub fn auth_throttled(&self, ip: IpAddr) -> bool {
        let now = Instant::now();
        let l = &self.limits;
        let mut sources = self.lock();
        sources.get_mut(&Source::of(ip)).is_some_and(|state| {
            state.auth.refill(l.auth_failures, l.auth_rate(), now);
            state.auth.tokens < 1.0
        })
    }

    /// Sources tracked now (for tests and the sweep's proof).
    pub fn tracked(&self) -> usize {
        self.lock().len()
    }

    /// Logs a refusal unless one was logged less than [`LOG_EVERY`] ago;
    /// the next line says how many were refused in between.
    pub fn log_refusal(&self, ip: IpAddr, refusal: Refusal) {
        let now = Instant::now();
        let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        if log.last.is_some_and(|last| now.saturating_duration_since(last) < LOG_EVERY) {
            log.suppressed += 1;
            return;
        }
        let suppressed = std::mem::take(&mut log.suppressed);
        log.last = Some(now);
        drop(log);
        tracing::warn!(
            source = %ip, limit = refusal.label(), refused_since_last_line = suppressed,
            "connection refused: over limits.{}", refusal.label()
        );
    }
}

/// Forgets sources with nothing in flight and full buckets: they would be
/// created afresh exactly as they are.
fn sweep(sources: &mut HashMap<Source, SourceState>, l: &Limits, now: Instant) {
    sources.retain(|_, s| {
        s.in_handshake > 0
            || !s.handshakes.is_full(l.burst, l.rate, now)
            || !s.auth.is_full(l.auth_failures, l.auth_rate(), now)
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(handshakes: usize, rate: u64, burst: u64, auth: u64) -> LimitsConfig {
        let mut config = crate::config::Config::from_yaml_str(
            "engine: {host: h, log_level: info}\ntls: {enabled: true}\n\
             certs: {static: {enabled: true, cert_file: c, key_file: k}}\n\
             auth: {jwt: {enabled: true, token_jwt_secret: s}}\n",
            Vec::new(),
        )
        .unwrap()
        .config
        .limits;
        config.handshakes_per_source = handshakes;
        config.handshake_rate_per_source = rate;
        config.handshake_burst_per_source = burst;
        config.auth_failures_per_source = auth;
        config
    }

    #[test]
    fn sources_are_hosts_and_v6_sites() {
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(Source::of(a), Source::of(b));
        assert_ne!(Source::of(a), Source::of(c));
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(Source::of(mapped), Source::of("10.0.0.1".parse().unwrap()));
        assert_ne!(Source::of("10.0.0.1".parse().unwrap()), Source::of("10.0.0.2".parse().unwrap()));
    }

    #[tokio::test(start_paused = true)]
    async fn handshakes_in_flight_are_capped_per_source() {
        let admission = Arc::new(Admission::new(&limits(2, 1000, 1000, 10)));
        let a: IpAddr = "127.0.0.2".parse().unwrap();
        let b: IpAddr = "127.0.0.3".parse().unwrap();
        let first = admission.admit(a).unwrap();
        let _second = admission.admit(a).unwrap();
        assert_eq!(admission.admit(a).unwrap_err(), Refusal::Handshakes);
        let _other = admission.admit(b).expect("another source is not affected");
        drop(first);
        admission.admit(a).expect("a finished handshake frees its slot");
    }

    #[tokio::test(start_paused = true)]
    async fn the_rate_refills_with_time() {
        let admission = Arc::new(Admission::new(&limits(100, 10, 3, 10)));
        let a: IpAddr = "127.0.0.2".parse().unwrap();
        for _ in 0..3 {
            drop(admission.admit(a).unwrap());
        }
        assert_eq!(admission.admit(a).unwrap_err(), Refusal::Rate);
        tokio::time::advance(Duration::from_millis(100)).await;
        drop(admission.admit(a).expect("one token back after 1/rate seconds"));
        assert_eq!(admission.admit(a).unwrap_err(), Refusal::Rate);
    }

    #[tokio::test(start_paused = true)]
    async fn refused_tokens_throttle_their_source() {
        let admission = Arc::new(Admission::new(&limits(100, 1000, 1000, 3)));
        let a: IpAddr = "127.0.0.2".parse().unwrap();
        for _ in 0..3 {
            assert!(!admission.auth_throttled(a));
            admission.auth_failed(a);
        }
        assert!(admission.auth_throttled(a));
        assert_eq!(admission.admit(a).unwrap_err(), Refusal::AuthFailures);
        admission.admit("127.0.0.3".parse().unwrap()).expect("others are not throttled");
        tokio::time::advance(AUTH_WINDOW / 3).await;
        admission.admit(a).expect("the bucket refills over the window");
    }

    #[tokio::test(start_paused = true)]
    async fn idle_sources_are_swept() {
        let admission = Arc::new(Admission::new(&limits(100, 1000, 1000, 3)));
        for i in 0..=SWEEP_ABOVE as u32 {
            drop(admission.admit(IpAddr::V4(i.into())).unwrap());
        }
        assert!(admission.tracked() > SWEEP_ABOVE);
        tokio::time::advance(Duration::from_secs(1)).await;
        let _held = admission.admit("127.0.0.9".parse().unwrap()).unwrap();
        assert_eq!(admission.tracked(), 1, "only the source in its handshake remains");
    }
}

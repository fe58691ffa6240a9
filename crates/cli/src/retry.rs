//! What the long-running commands retry, and what stops them.
//!
//! `forward`, `run --apply`, `events` and `connect` ride out what may heal
//! by itself (an engine restarting or shutting down, a refused or reset
//! connection, a timeout) with capped exponential backoff and jitter. They
//! stop, exiting non-zero, on what will not heal without a change by the
//! user ([`AgentError::is_permanent`]): a token the engine refuses, a
//! certificate this machine does not trust, a name that does not resolve
//! on the first attempt. The message then says what to change.

use std::time::Duration;

use rand::RngExt;
use strait_agent::AgentError;
use strait_agent::rustls::{CertificateError, Error as TlsError};
use strait_proto::ErrorCode;

/// What to do about a token the engine refuses.
pub const TOKEN_HINT: &str = "the engine refused the token: it is missing, malformed, expired, or signed with another \
                              secret (an engine restarted with a new one); pass a current token with --token, \
                              RSTREAM_AUTHENTICATION_TOKEN or the context's auth.token";

const CA_HINT: &str = "the engine's certificate is not signed by a CA this machine trusts: pass --ca-file FILE, set \
                       SSL_CERT_FILE=FILE, or set the context's transport.tls.caFile (`strait-engine dev` prints the \
                       path of its CA)";

const NAME_HINT: &str = "the engine's certificate does not cover the name dialled: use a name it covers in --engine, \
                         or pass --server-name NAME (the context's transport.tls.serverName)";

const DATES_HINT: &str = "the engine's certificate is outside its validity dates: its operator must renew it (or check this machine's clock)";

const ADDRESS_HINT: &str = "check the engine's address: --engine, RSTREAM_ENGINE or the context's engine";

/// How long the control channel holding a tunnel of ours has been silent,
/// when that is why the engine refused it: [`AgentError::holder_silence`],
/// which the engine's tests check against what the engine says.
pub fn silence_of_the_holder(error: &AgentError) -> Option<std::time::Duration> {
    error.holder_silence()
}

/// `error`, followed by what to do about it when there is a known fix.
pub fn explain(error: &AgentError) -> anyhow::Error {
    match hint(error) {
        Some(hint) => anyhow::anyhow!("{error}\n  {hint}"),
        None => anyhow::anyhow!("{error}"),
    }
}

fn hint(error: &AgentError) -> Option<&'static str> {
    match error {
        AgentError::Tls { source: TlsError::InvalidCertificate(error), .. } => Some(match error {
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => NAME_HINT,
            CertificateError::Expired
            | CertificateError::ExpiredContext { .. }
            | CertificateError::NotValidYet
            | CertificateError::NotValidYetContext { .. } => DATES_HINT,
            _ => CA_HINT,
        }),
        AgentError::Resolve { .. } | AgentError::BadEngineAddress(_) => Some(ADDRESS_HINT),
        // The same code refuses a dialler outside a tunnel's trusted_ips,
        // which no token fixes.
        AgentError::Engine(refusal)
            if refusal.code() == ErrorCode::Unauthorized
                && !refusal.message.as_deref().unwrap_or_default().contains("trusted_ips") =>
        {
            Some(TOKEN_HINT)
        }
        _ => None,
    }
}

/// Capped exponential backoff with full jitter.
pub struct Backoff {
    attempt: u32,
    base: Duration,
    cap: Duration,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self { attempt: 0, base, cap }
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.base.saturating_mul(1u32 << self.attempt.min(16)).min(self.cap);
        self.attempt += 1;
        let millis = ceiling.as_millis().max(1) as u64;
        Duration::from_millis(rand::rng().random_range(millis / 2..=millis))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_cap() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let delays: Vec<Duration> = (0..10).map(|_| b.next_delay()).collect();
        assert!(delays[0] <= Duration::from_millis(100));
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(2)));
        assert!(delays[9] >= Duration::from_secs(1));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn permanent_errors_say_what_to_do() {
        let untrusted = AgentError::Tls {
            addr: "edge:443".into(),
            source: TlsError::InvalidCertificate(CertificateError::UnknownIssuer),
        };
        assert!(untrusted.is_permanent(true));
        let text = explain(&untrusted).to_string();
        assert!(text.contains("--ca-file") && text.contains("SSL_CERT_FILE"), "{text}");

        let refused = AgentError::Engine(strait_proto::Error::new(ErrorCode::Unauthorized, "token expired"));
        assert!(refused.is_permanent(true));
        assert!(explain(&refused).to_string().contains("--token"));

        let outside = AgentError::Engine(strait_proto::Error::new(
            ErrorCode::Unauthorized,
            "source address is not in the tunnel's trusted_ips",
        ));
        assert!(!explain(&outside).to_string().contains("--token"));

        let unresolved = AgentError::Resolve { host: "edge".into(), source: std::io::ErrorKind::NotFound.into() };
        assert!(unresolved.is_permanent(false));
        assert!(!unresolved.is_permanent(true), "a name that resolved before may come back");

        let refused_conn =
            AgentError::Connect { addr: "edge:443".into(), source: std::io::ErrorKind::ConnectionRefused.into() };
        assert!(!refused_conn.is_permanent(false), "an engine not up yet may come up");
        assert!(!AgentError::Timeout("connecting to the engine").is_permanent(false));
    }
}

//! The TLS client configuration agents use: ALPN `rstrm/1`, trust from a CA
//! file or the web PKI roots, and session resumption, since every stream is
//! a new connection to the same engine.

use std::path::Path;
use std::sync::Arc;

use rustls::ClientConfig;
use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

use crate::AgentError;

/// A client configuration offering `alpn` (`rstrm/1` for the agent protocol,
/// `http/1.1` for the Engine API on the same port).
pub fn client_config(ca_file: Option<&Path>, alpn: &[u8]) -> Result<Arc<ClientConfig>, AgentError> {
    build(ca_file, alpn, &[&rustls::version::TLS13, &rustls::version::TLS12])
}

/// The configuration under QUIC: TLS 1.3 (QUIC has no other), ALPN
/// `rstrm/1`, the same trust.
pub(crate) fn quic_client_config(ca_file: Option<&Path>) -> Result<ClientConfig, AgentError> {
    let config = build(ca_file, strait_proto::ALPN, &[&rustls::version::TLS13])?;
    Ok(Arc::unwrap_or_clone(config))
}

fn build(
    ca_file: Option<&Path>,
    alpn: &[u8],
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Result<Arc<ClientConfig>, AgentError> {
    let mut roots = RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let pem = std::fs::read(path)
                .map_err(|e| AgentError::CaFile { path: path.to_path_buf(), reason: e.to_string() })?;
            let mut added = 0;
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(|e| AgentError::CaFile { path: path.to_path_buf(), reason: e.to_string() })?;
                roots.add(cert).map_err(|e| AgentError::CaFile { path: path.to_path_buf(), reason: e.to_string() })?;
                added += 1;
            }
            if added == 0 {
                return Err(AgentError::CaFile { path: path.to_path_buf(), reason: "no PEM certificate in it".into() });
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .expect("ring supports TLS 1.2 and 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(Arc::new(config))
}

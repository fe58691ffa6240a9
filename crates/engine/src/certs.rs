//! The static certificate provider (`certs.static`): one certificate chain
//! and key, loaded at start and reloaded when the files change.
//!
//! Reload is driven by handshakes, as in CE: each handshake stats both files
//! and, when either modification time moved, loads the new pair. A pair that
//! fails to load or does not match keeps the old one serving; the same
//! modification times are not retried, so a broken file costs one attempt
//! and one log line, not one per handshake.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("cannot read certificate file {path}: {source}")]
    ReadCert { path: PathBuf, source: std::io::Error },
    #[error("cannot read key file {path}: {source}")]
    ReadKey { path: PathBuf, source: std::io::Error },
    #[error("certificate file {0} holds no PEM certificate")]
    NoCertificate(PathBuf),
    #[error("key file {0} holds no PEM private key (PKCS#8, PKCS#1 or SEC1)")]
    NoKey(PathBuf),
    #[error("certificate {cert} and key {key} do not form a usable pair: {reason}")]
    Mismatch { cert: PathBuf, key: PathBuf, reason: String },
}

type Stamp = (Option<SystemTime>, Option<SystemTime>);

struct State {
    current: Arc<CertifiedKey>,
    /// Modification times of the pair now serving.
    loaded: Stamp,
    /// Modification times of the last pair that failed, not retried.
    failed: Option<Stamp>,
}

pub struct CertStore {
    cert_path: PathBuf,
    key_path: PathBuf,
    provider: Arc<CryptoProvider>,
    state: RwLock<State>,
    reloads: AtomicU64,
    reload_failures: AtomicU64,
}

impl std::fmt::Debug for CertStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertStore").field("cert", &self.cert_path).field("key", &self.key_path).finish()
    }
}

impl CertStore {
    pub fn load(cert_path: &Path, key_path: &Path, provider: Arc<CryptoProvider>) -> Result<Self, CertError> {
        let loaded = stamp(cert_path, key_path);
        let current = Arc::new(load_pair(cert_path, key_path, &provider)?);
        Ok(Self {
            cert_path: cert_path.to_path_buf(),
            key_path: key_path.to_path_buf(),
            provider,
            state: RwLock::new(State { current, loaded, failed: None }),
            reloads: AtomicU64::new(0),
            reload_failures: AtomicU64::new(0),
        })
    }

    /// The pair to serve now, after a reload if the files changed.
    pub fn current(&self) -> Arc<CertifiedKey> {
        let now = stamp(&self.cert_path, &self.key_path);
        {
            let state = self.state.read().unwrap_or_else(|e| e.into_inner());
            if state.loaded == now || state.failed == Some(now) {
                return state.current.clone();
            }
        }
        let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
        if state.loaded == now || state.failed == Some(now) {
            return state.current.clone();
        }
        match load_pair(&self.cert_path, &self.key_path, &self.provider) {
            Ok(pair) => {
                state.current = Arc::new(pair);
                state.loaded = now;
                state.failed = None;
                self.reloads.fetch_add(1, Ordering::Relaxed);
                tracing::info!(cert = %self.cert_path.display(), "certificate reloaded");
            }
            Err(error) => {
                state.failed = Some(now);
                self.reload_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%error, "certificate reload failed; still serving the previous certificate");
            }
        }
        state.current.clone()
    }

    /// Successful reloads since start.
    pub fn reloads(&self) -> u64 {
        self.reloads.load(Ordering::Relaxed)
    }

    /// Failed reload attempts since start.
    pub fn reload_failures(&self) -> u64 {
        self.reload_failures.load(Ordering::Relaxed)
    }

    /// The end-entity certificate now serving, DER-encoded.
    pub fn end_entity_der(&self) -> CertificateDer<'static> {
        self.current().cert[0].clone()
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

fn stamp(cert: &Path, key: &Path) -> Stamp {
    let mtime = |p: &Path| fs::metadata(p).and_then(|m| m.modified()).ok();
    (mtime(cert), mtime(key))
}

fn load_pair(cert_path: &Path, key_path: &Path, provider: &CryptoProvider) -> Result<CertifiedKey, CertError> {
    let cert_pem =
        fs::read(cert_path).map_err(|source| CertError::ReadCert { path: cert_path.to_path_buf(), source })?;
    let key_pem = fs::read(key_path).map_err(|source| CertError::ReadKey { path: key_path.to_path_buf(), source })?;
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(&cert_pem).filter_map(Result::ok).collect();
    if chain.is_empty() {
        return Err(CertError::NoCertificate(cert_path.to_path_buf()));
    }
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|_| CertError::NoKey(key_path.to_path_buf()))?;
    let mismatch =
        |reason: String| CertError::Mismatch { cert: cert_path.to_path_buf(), key: key_path.to_path_buf(), reason };
    let signing = provider.key_provider.load_private_key(key).map_err(|e| mismatch(e.to_string()))?;
    let pair = CertifiedKey::new(chain, signing);
    pair.keys_match().map_err(|e| mismatch(format!("the key does not belong to the certificate ({e})")))?;
    Ok(pair)
}

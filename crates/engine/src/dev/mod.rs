//! `strait-engine dev`: a self-contained local engine for a first run.
//!
//! It keeps a small state folder: a development CA and a certificate for
//! `localhost` and `*.t.localhost` signed by it (curl and browsers resolve
//! every `*.localhost` name to loopback), and a random JWT secret. The CA
//! and secret are reused on later runs so trust and tokens survive restarts.

pub mod demo;

use std::fs;
use std::path::{Path, PathBuf};

use rand::RngExt;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};

/// Files of a generated certificate set.
#[derive(Debug, Clone)]
pub struct CertFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum DevError {
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
}

fn write(path: &Path, contents: &[u8]) -> Result<(), DevError> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(|source| DevError::Write { path: parent.to_path_buf(), source })?;
    }
    fs::write(path, contents).map_err(|source| DevError::Write { path: path.to_path_buf(), source })
}

/// Generates (or reuses) a CA in `dir` and issues a fresh certificate for
/// `host` and `*.t.<host>`.
pub fn generate_certs(host: &str, dir: &Path) -> Result<CertFiles, DevError> {
    let files = CertFiles { ca: dir.join("ca.pem"), cert: dir.join("cert.pem"), key: dir.join("key.pem") };
    let ca_key_path = dir.join("ca-key.pem");
    let issuer = match (fs::read_to_string(&files.ca), fs::read_to_string(&ca_key_path)) {
        (Ok(ca_pem), Ok(key_pem)) => Issuer::from_ca_cert_pem(&ca_pem, KeyPair::from_pem(&key_pem)?)?,
        _ => {
            let key = KeyPair::generate()?;
            let mut params = CertificateParams::new(Vec::<String>::new())?;
            params.distinguished_name.push(DnType::CommonName, "strait development CA");
            params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            let cert = params.self_signed(&key)?;
            write(&files.ca, cert.pem().as_bytes())?;
            write(&ca_key_path, key.serialize_pem().as_bytes())?;
            Issuer::new(params, key)
        }
    };
    let leaf_key = KeyPair::generate()?;
    let mut params = CertificateParams::new(vec![host.to_string(), format!("*.t.{host}")])?;
    params.distinguished_name.push(DnType::CommonName, host);
    let leaf = params.signed_by(&leaf_key, &issuer)?;
    write(&files.cert, leaf.pem().as_bytes())?;
    write(&files.key, leaf_key.serialize_pem().as_bytes())?;
    Ok(files)
}

/// The JWT secret kept in `dir`, created on first use.
pub fn secret(dir: &Path) -> Result<String, DevError> {
    let path = dir.join("jwt-secret");
    match fs::read_to_string(&path) {
        Ok(s) if s.trim().len() >= 32 => Ok(s.trim().to_string()),
        _ => {
            let mut bytes = [0u8; 32];
            rand::rng().fill(&mut bytes[..]);
            let s = hex::encode(bytes);
            write(&path, s.as_bytes())?;
            Ok(s)
        }
    }
}

/// The default state folder: `$XDG_STATE_HOME/strait/dev`, else
/// `~/.local/state/strait/dev`, else `./.strait-dev`.
pub fn default_dir() -> PathBuf {
    if let Some(state) = std::env::var_os("XDG_STATE_HOME").filter(|s| !s.is_empty()) {
        return PathBuf::from(state).join("strait/dev");
    }
    if let Some(home) = std::env::var_os("HOME").filter(|s| !s.is_empty()) {
        return PathBuf::from(home).join(".local/state/strait/dev");
    }
    PathBuf::from(".strait-dev")
}

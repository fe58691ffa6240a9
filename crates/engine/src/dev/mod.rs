//! `strait-engine dev`: a self-contained local engine for a first run.
//!
//! It keeps a small state folder: a development CA and a certificate for
//! `localhost` and `*.t.localhost` signed by it (curl and browsers resolve
//! every `*.localhost` name to loopback), and a random JWT secret. The CA
//! and secret are reused on later runs so trust and tokens survive restarts.
//!
//! The keys and the secret are readable by their owner only (0600), in a
//! folder only its owner can enter (0700); certificates stay 0644.

pub mod demo;

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
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

/// Who may read a file of the folder.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Access {
    /// Certificates: anyone (0644).
    Public,
    /// Keys and the JWT secret: the owner only (0600).
    Secret,
}

impl Access {
    fn mode(self) -> u32 {
        match self {
            Access::Public => 0o644,
            Access::Secret => 0o600,
        }
    }
}

/// Creates `dir` (and its missing parents) if it does not exist: the folder
/// itself 0700, parents with the usual mode.
fn create_dir(dir: &Path) -> Result<(), DevError> {
    let failed = |source| DevError::Write { path: dir.to_path_buf(), source };
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent).map_err(|source| DevError::Write { path: parent.to_path_buf(), source })?;
    }
    match fs::DirBuilder::new().mode(0o700).create(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(()),
        other => other.map_err(failed),
    }
}

/// Takes away what group and others may do with `path` (a folder of an
/// older run, a secret written before files were private).
fn restrict(path: &Path, mode: u32) -> Result<(), DevError> {
    let meta = fs::metadata(path).map_err(|source| DevError::Read { path: path.to_path_buf(), source })?;
    if meta.permissions().mode() & 0o077 & !mode != 0 {
        fs::set_permissions(path, fs::Permissions::from_mode(mode))
            .map_err(|source| DevError::Write { path: path.to_path_buf(), source })?;
    }
    Ok(())
}

/// Writes a file whole: a new file created with its final mode under a
/// temporary name, then renamed over the old one. A secret is never
/// readable by others, not even for an instant, and a reader (the engine
/// reloading its certificate) never sees half a file.
fn write(path: &Path, contents: &[u8], access: Access) -> Result<(), DevError> {
    let failed = |source| DevError::Write { path: path.to_path_buf(), source };
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    create_dir(dir)?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    // Left by a run that died between create and rename.
    let _ = fs::remove_file(&tmp);
    let mut file =
        fs::OpenOptions::new().write(true).create_new(true).mode(access.mode()).open(&tmp).map_err(failed)?;
    let written = file.write_all(contents).and_then(|()| file.sync_all());
    drop(file);
    if let Err(source) = written.and_then(|()| fs::rename(&tmp, path)) {
        let _ = fs::remove_file(&tmp);
        return Err(failed(source));
    }
    Ok(())
}

/// Reads a file kept from an earlier run, making it private first if it
/// is a secret.
fn read_kept(path: &Path, access: Access) -> Option<String> {
    let text = fs::read_to_string(path).ok()?;
    if access == Access::Secret && restrict(path, access.mode()).is_err() {
        return None;
    }
    Some(text)
}

/// Generates (or reuses) a CA in `dir` and issues a fresh certificate for
/// `host` and `*.t.<host>`.
pub fn generate_certs(host: &str, dir: &Path) -> Result<CertFiles, DevError> {
    let files = CertFiles { ca: dir.join("ca.pem"), cert: dir.join("cert.pem"), key: dir.join("key.pem") };
    let ca_key_path = dir.join("ca-key.pem");
    let issuer = match (read_kept(&files.ca, Access::Public), read_kept(&ca_key_path, Access::Secret)) {
        (Some(ca_pem), Some(key_pem)) => Issuer::from_ca_cert_pem(&ca_pem, KeyPair::from_pem(&key_pem)?)?,
        _ => {
            let key = KeyPair::generate()?;
            let mut params = CertificateParams::new(Vec::<String>::new())?;
            params.distinguished_name.push(DnType::CommonName, "strait development CA");
            params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            let cert = params.self_signed(&key)?;
            // The key first: a CA certificate without its key is useless.
            write(&ca_key_path, key.serialize_pem().as_bytes(), Access::Secret)?;
            write(&files.ca, cert.pem().as_bytes(), Access::Public)?;
            Issuer::new(params, key)
        }
    };
    let leaf_key = KeyPair::generate()?;
    let mut params = CertificateParams::new(vec![host.to_string(), format!("*.t.{host}")])?;
    params.distinguished_name.push(DnType::CommonName, host);
    let leaf = params.signed_by(&leaf_key, &issuer)?;
    write(&files.key, leaf_key.serialize_pem().as_bytes(), Access::Secret)?;
    write(&files.cert, leaf.pem().as_bytes(), Access::Public)?;
    Ok(files)
}

/// The JWT secret kept in `dir`, created on first use. `dir` is the dev
/// state folder: one an older run left open to others is closed (0700).
pub fn secret(dir: &Path) -> Result<String, DevError> {
    create_dir(dir)?;
    restrict(dir, 0o700)?;
    let path = dir.join("jwt-secret");
    match read_kept(&path, Access::Secret) {
        Some(s) if s.trim().len() >= 32 => Ok(s.trim().to_string()),
        _ => {
            let mut bytes = [0u8; 32];
            rand::rng().fill(&mut bytes[..]);
            let s = hex::encode(bytes);
            write(&path, s.as_bytes(), Access::Secret)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    /// What `strait-engine dev` prepares: certificates, then the secret.
    fn prepare(dir: &Path) -> CertFiles {
        let files = generate_certs("localhost", dir).unwrap();
        secret(dir).unwrap();
        files
    }

    #[test]
    fn keys_and_the_secret_are_private_in_a_private_folder() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("state/strait/dev");
        let files = prepare(&dir);
        assert_eq!(mode(&dir), 0o700);
        for secret in [dir.join("ca-key.pem"), files.key.clone(), dir.join("jwt-secret")] {
            assert_eq!(mode(&secret), 0o600, "{}", secret.display());
        }
        for public in [&files.ca, &files.cert] {
            assert_eq!(mode(public), 0o644, "{}", public.display());
        }
        let left: Vec<_> = fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left.len(), 5, "no temporary file is left behind: {left:?}");
    }

    #[test]
    fn a_folder_an_older_run_left_open_is_closed() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("dev");
        prepare(&dir);
        let secret_before = fs::read_to_string(dir.join("jwt-secret")).unwrap();
        // As runs before this fix left them.
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        for name in ["ca-key.pem", "key.pem", "jwt-secret"] {
            fs::set_permissions(dir.join(name), fs::Permissions::from_mode(0o644)).unwrap();
        }
        prepare(&dir);
        assert_eq!(mode(&dir), 0o700);
        for name in ["ca-key.pem", "key.pem", "jwt-secret"] {
            assert_eq!(mode(&dir.join(name)), 0o600, "{name}");
        }
        assert_eq!(fs::read_to_string(dir.join("jwt-secret")).unwrap(), secret_before, "the secret is kept");
    }
}

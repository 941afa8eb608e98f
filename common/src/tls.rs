//! TLS for the router → edge gRPC stream: the edge's server configuration,
//! rebuilt when its certificate, key or client CA files change, and the
//! router's client configuration, read from its files at every connect.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The PEM certificates in `path`.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no PEM certificate in it", path.display()));
    }
    Ok(certs)
}

/// The PEM private key in `path` (never shown in errors).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| format!("{}: no usable PEM private key ({e})", path.display()))
}

/// A server configuration speaking HTTP/2 with `cert`/`key`, requiring client
/// certificates signed by `client_ca` when given (mutual TLS).
pub fn server_config(cert: &Path, key: &Path, client_ca: Option<&Path>) -> Result<ServerConfig, String> {
    let certs = load_certs(cert)?;
    let key = load_key(key)?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = match client_ca {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for c in load_certs(ca)? {
                roots.add(c).map_err(|e| format!("{}: {e}", ca.display()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|e| format!("{}: {e}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(certs, key).map_err(|e| format!("{}: {e}", cert.display()))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

type Stamp = Vec<Option<(SystemTime, u64)>>;

fn stamp(paths: &[PathBuf]) -> Stamp {
    paths.iter().map(|p| std::fs::metadata(p).ok().and_then(|m| Some((m.modified().ok()?, m.len())))).collect()
}

/// An edge's TLS server configuration that follows its files: each call to
/// [`ReloadingServerConfig::current`] checks their modification times and
/// rebuilds when one changed. A file that does not load keeps the previous
/// configuration (logged), so a half-written rotation never stops the edge.
pub struct ReloadingServerConfig {
    cert: PathBuf,
    key: PathBuf,
    client_ca: Option<PathBuf>,
    state: Mutex<(Stamp, Arc<ServerConfig>)>,
}

impl ReloadingServerConfig {
    /// Loads the files once; an error names the file at fault.
    pub fn new(cert: &str, key: &str, client_ca: &str) -> Result<Self, String> {
        let cert = PathBuf::from(cert);
        let key = PathBuf::from(key);
        let client_ca = (!client_ca.is_empty()).then(|| PathBuf::from(client_ca));
        let paths = Self::paths_of(&cert, &key, client_ca.as_ref());
        let st = stamp(&paths);
        let config = server_config(&cert, &key, client_ca.as_deref())?;
        Ok(Self { cert, key, client_ca, state: Mutex::new((st, Arc::new(config))) })
    }

    fn paths_of(cert: &Path, key: &Path, ca: Option<&PathBuf>) -> Vec<PathBuf> {
        let mut v = vec![cert.to_path_buf(), key.to_path_buf()];
        v.extend(ca.cloned());
        v
    }

    /// The configuration for the next handshake.
    pub fn current(&self) -> Arc<ServerConfig> {
        let paths = Self::paths_of(&self.cert, &self.key, self.client_ca.as_ref());
        let now = stamp(&paths);
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if now != state.0 {
            match server_config(&self.cert, &self.key, self.client_ca.as_deref()) {
                Ok(c) => {
                    tracing::info!(cert = %self.cert.display(), "gRPC TLS files changed; reloaded");
                    *state = (now, Arc::new(c));
                }
                Err(e) => {
                    // Keep serving with the previous files; retry on the next change.
                    tracing::warn!(error = %e, "gRPC TLS files changed but do not load; keeping the previous ones");
                    state.0 = now;
                }
            }
        }
        state.1.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let e = server_config(&empty, &empty, None).unwrap_err();
        assert!(e.contains("empty.pem"), "{e}");
        let e = ReloadingServerConfig::new("/nonexistent/c.pem", "/nonexistent/k.pem", "").err().unwrap();
        assert!(e.contains("/nonexistent/c.pem"), "{e}");
    }
}

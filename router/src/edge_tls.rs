//! The endpoint the router dials for one edge: plain `http://`, or `https://`
//! with the CA, client certificate and server name of `router.edge_tls_*`.
//! The files are read at every connect, so rotated ones apply to the next
//! connection without a restart.

use daisi_common::config::RouterConfig;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// The endpoint for the edge at `addr` (`host:port`).
pub fn endpoint(addr: &str, cfg: &RouterConfig) -> Result<Endpoint, String> {
    if cfg.edge_tls_ca_file.is_empty() {
        return Endpoint::from_shared(format!("http://{addr}")).map_err(|e| format!("bad edge address: {e}"));
    }
    let read = |key: &str, path: &str| std::fs::read(path).map_err(|e| format!("{key} {path}: {e}"));
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read("router.edge_tls_ca_file", &cfg.edge_tls_ca_file)?));
    if !cfg.edge_tls_cert_file.is_empty() {
        tls = tls.identity(Identity::from_pem(
            read("router.edge_tls_cert_file", &cfg.edge_tls_cert_file)?,
            read("router.edge_tls_key_file", &cfg.edge_tls_key_file)?,
        ));
    }
    if !cfg.edge_tls_server_name.is_empty() {
        tls = tls.domain_name(cfg.edge_tls_server_name.clone());
    }
    Endpoint::from_shared(format!("https://{addr}"))
        .map_err(|e| format!("bad edge address: {e}"))?
        .tls_config(tls)
        .map_err(|e| format!("router.edge_tls_*: {e}"))
}

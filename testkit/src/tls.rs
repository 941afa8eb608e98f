//! Certificates made at test time with the `openssl` command: a CA, a server
//! certificate for `localhost` and `127.0.0.1`, and a client certificate, all
//! PEM files in a temporary folder.

use std::path::{Path, PathBuf};
use std::process::Command;

use tempfile::TempDir;

/// A CA and the certificates it signed.
pub struct TestCerts {
    dir: TempDir,
    name: String,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("`openssl` not found: install it with `apt-get install -y openssl`");
    assert!(out.status.success(), "openssl {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
}

impl TestCerts {
    /// A fresh CA (named `name`) with a server and a client certificate.
    pub fn new(name: &str) -> Self {
        let dir = tempfile::Builder::new().prefix("dws-certs-").tempdir().expect("temp dir");
        let d = dir.path();
        openssl(
            d,
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "2",
                "-subj",
                &format!("/CN={name} test CA"),
            ],
        );
        Self::sign(d, "server", "localhost", "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth");
        Self::sign(d, "client", "client", "subjectAltName=DNS:client\nextendedKeyUsage=clientAuth");
        // A Redis Cluster node is both: it serves clients and dials its peers'
        // cluster bus with the same certificate.
        Self::sign(
            d,
            "node",
            "localhost",
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth",
        );
        Self { dir, name: name.to_string() }
    }

    fn sign(d: &Path, who: &str, cn: &str, ext: &str) {
        std::fs::write(d.join(format!("{who}.ext")), ext).expect("write ext");
        openssl(
            d,
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                &format!("{who}.key"),
                "-out",
                &format!("{who}.csr"),
                "-subj",
                &format!("/CN={cn}"),
            ],
        );
        openssl(
            d,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{who}.csr"),
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &format!("{who}.pem"),
                "-days",
                "2",
                "-extfile",
                &format!("{who}.ext"),
            ],
        );
        // PKCS#8 keys: what every TLS stack in the test reads.
        openssl(d, &["pkcs8", "-topk8", "-nocrypt", "-in", &format!("{who}.key"), "-out", &format!("{who}.p8")]);
        std::fs::rename(d.join(format!("{who}.p8")), d.join(format!("{who}.key"))).expect("rename key");
    }

    /// Signs a new server certificate (same CA) into the existing files, so a
    /// process watching them sees a rotation.
    pub fn rotate_server(&self) {
        Self::sign(
            self.dir.path(),
            "server",
            "localhost",
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth",
        );
    }

    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }
    pub fn server_cert(&self) -> PathBuf {
        self.dir.path().join("server.pem")
    }
    pub fn server_key(&self) -> PathBuf {
        self.dir.path().join("server.key")
    }
    /// A certificate for both server and client use (a Redis Cluster node).
    pub fn node_cert(&self) -> PathBuf {
        self.dir.path().join("node.pem")
    }
    pub fn node_key(&self) -> PathBuf {
        self.dir.path().join("node.key")
    }
    pub fn client_cert(&self) -> PathBuf {
        self.dir.path().join("client.pem")
    }
    pub fn client_key(&self) -> PathBuf {
        self.dir.path().join("client.key")
    }
}

/// A path as a string (for configuration keys).
pub fn s(p: PathBuf) -> String {
    p.display().to_string()
}

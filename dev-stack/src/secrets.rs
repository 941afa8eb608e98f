//! Fresh dev secrets for one run: random API keys, AES-256 token keys (64 hex
//! characters), the token issuer key and the internal router→edge token, read from the kernel's
//! random source. Written to a `0600` env file so a developer can `source` it.

use std::io::{Read, Write};
use std::path::Path;

/// The secrets of one dev stack.
#[derive(Clone, PartialEq, Eq)]
pub struct DevSecrets {
    pub api_key: String,
    pub admin_api_key: String,
    pub user_aes_key: String,
    pub admin_aes_key: String,
    pub internal_token: String,
    /// `auth.token_issuer_key`: what the platform's backend mints tokens with.
    pub token_issuer_key: String,
}

impl std::fmt::Debug for DevSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DevSecrets(***)")
    }
}

/// `n` random bytes as lower-case hex.
pub fn random_hex(n: usize) -> std::io::Result<String> {
    let mut buf = vec![0u8; n];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut buf)?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

impl DevSecrets {
    /// New random secrets (the two AES keys always differ).
    pub fn generate() -> std::io::Result<Self> {
        let user_aes_key = random_hex(32)?;
        let mut admin_aes_key = random_hex(32)?;
        while admin_aes_key == user_aes_key {
            admin_aes_key = random_hex(32)?;
        }
        Ok(Self {
            api_key: format!("dev-{}", random_hex(16)?),
            admin_api_key: format!("dev-admin-{}", random_hex(16)?),
            user_aes_key,
            admin_aes_key,
            internal_token: random_hex(24)?,
            token_issuer_key: format!("dev-issuer-{}", random_hex(16)?),
        })
    }

    /// The `DAISI_WS_AUTH_*` variables an edge needs.
    pub fn edge_env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("DAISI_WS_AUTH_SECRET_TOKEN", self.api_key.clone()),
            ("DAISI_WS_AUTH_ADMIN_SECRET_TOKEN", self.admin_api_key.clone()),
            ("DAISI_WS_AUTH_TOKEN_AES_KEY", self.user_aes_key.clone()),
            ("DAISI_WS_AUTH_ADMIN_TOKEN_AES_KEY", self.admin_aes_key.clone()),
            ("DAISI_WS_AUTH_INTERNAL_TOKEN", self.internal_token.clone()),
            ("DAISI_WS_AUTH_TOKEN_ISSUER_KEY", self.token_issuer_key.clone()),
        ]
    }

    /// The `DAISI_WS_AUTH_*` variables a router needs (only the internal token).
    pub fn router_env(&self) -> Vec<(&'static str, String)> {
        vec![("DAISI_WS_AUTH_INTERNAL_TOKEN", self.internal_token.clone())]
    }

    /// Writes the edge variables as a shell env file readable only by the owner.
    pub fn write_env_file(&self, path: &Path) -> std::io::Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
        writeln!(f, "# Daisi WS dev stack secrets: fresh for this run, deleted when it stops.")?;
        for (k, v) in self.edge_env() {
            writeln!(f, "{k}={v}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_fresh_well_formed_and_hidden() {
        let a = DevSecrets::generate().unwrap();
        let b = DevSecrets::generate().unwrap();
        assert_ne!(a, b);
        for key in [&a.user_aes_key, &a.admin_aes_key] {
            assert_eq!(key.len(), 64);
            assert!(key.bytes().all(|c| c.is_ascii_hexdigit()));
        }
        assert_ne!(a.user_aes_key, a.admin_aes_key);
        assert!(!format!("{a:?}").contains(&a.api_key));
        assert!(![&a.api_key, &a.admin_api_key].contains(&&a.token_issuer_key), "browsers never hold the issuer key");
    }

    #[test]
    fn env_file_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secrets.env");
        let s = DevSecrets::generate().unwrap();
        s.write_env_file(&path).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains(&format!("DAISI_WS_AUTH_TOKEN_AES_KEY={}", s.user_aes_key)));
    }
}

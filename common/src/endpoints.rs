//! Dependency endpoints: the list of NATS servers in `nats.url`, credentials
//! carried in URLs (taken out before a URL reaches a client library, a log
//! line or an error), and their masking for display.

use serde::Serializer;

use crate::config::Config;

/// `scheme://user:password@host:port/rest` split into the URL without its
/// user part, and the user part (`user`, optional `password`), percent-decoded.
#[derive(Debug, PartialEq, Eq)]
pub struct SplitUrl {
    pub url: String,
    pub user: Option<String>,
    pub password: Option<String>,
}

/// Takes the `user[:password]@` part out of a URL.
pub fn split_userinfo(url: &str) -> SplitUrl {
    let Some(scheme_end) = url.find("://") else {
        return SplitUrl { url: url.to_string(), user: None, password: None };
    };
    let rest_start = scheme_end + 3;
    let rest = &url[rest_start..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let Some(at) = authority.rfind('@') else {
        return SplitUrl { url: url.to_string(), user: None, password: None };
    };
    let userinfo = &authority[..at];
    let (user, password) = match userinfo.split_once(':') {
        Some((u, p)) => (percent_decode(u), Some(percent_decode(p))),
        None => (percent_decode(userinfo), None),
    };
    let stripped = format!("{}{}{}", &url[..rest_start], &authority[at + 1..], &rest[authority_end..]);
    SplitUrl { url: stripped, user: Some(user), password }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(hex) = bytes.get(i + 1..i + 3)
            && let Ok(h) = std::str::from_utf8(hex)
            && let Ok(b) = u8::from_str_radix(h, 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A URL (or comma-separated list) with every password (or lone token) replaced by `***`.
pub fn mask_urls(urls: &str) -> String {
    urls.split(',')
        .map(|one| {
            let s = split_userinfo(one);
            match (&s.user, &s.password) {
                (None, _) => one.to_string(),
                (Some(user), Some(_)) => insert_userinfo(&s.url, &format!("{user}:***")),
                (Some(_), None) => insert_userinfo(&s.url, "***"),
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn insert_userinfo(url: &str, userinfo: &str) -> String {
    match url.find("://") {
        Some(i) => format!("{}{userinfo}@{}", &url[..i + 3], &url[i + 3..]),
        None => url.to_string(),
    }
}

/// Serializes a URL field masked (used for `--check-config` and `Debug`).
pub fn serialize_masked_urls<S: Serializer>(value: &str, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&mask_urls(value))
}

/// `nats.url` taken apart: servers without credentials, and the credentials.
#[derive(Clone, PartialEq, Eq)]
pub struct NatsEndpoints {
    /// `nats://host:port` or `tls://host:port`, no user part.
    pub servers: Vec<String>,
    pub user: Option<String>,
    pub password: Option<String>,
    /// A lone `token@` in the URL.
    pub token: Option<String>,
    /// Some server is a `tls://` URL.
    pub tls: bool,
}

impl std::fmt::Debug for NatsEndpoints {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsEndpoints").field("servers", &self.servers).field("user", &self.user).finish()
    }
}

/// Parses `nats.url`: one server or a comma-separated list. Errors never
/// repeat a credential.
pub fn nats_endpoints(raw: &str) -> Result<NatsEndpoints, String> {
    let mut out = NatsEndpoints { servers: Vec::new(), user: None, password: None, token: None, tls: false };
    for (i, entry) in raw.split(',').map(str::trim).enumerate() {
        if entry.is_empty() {
            return Err(format!("server {} of the list is empty", i + 1));
        }
        let with_scheme = if entry.contains("://") { entry.to_string() } else { format!("nats://{entry}") };
        let split = split_userinfo(&with_scheme);
        let scheme = split.url.split("://").next().unwrap_or_default().to_ascii_lowercase();
        match scheme.as_str() {
            "nats" => {}
            "tls" => out.tls = true,
            other => {
                return Err(format!("server {}: scheme `{other}` is not supported (use nats:// or tls://)", i + 1));
            }
        }
        let host = split.url.split("://").nth(1).unwrap_or_default();
        if host.is_empty() || host.starts_with(':') {
            return Err(format!("server {} has no host", i + 1));
        }
        match (split.user, split.password) {
            (None, _) => {}
            (Some(user), Some(password)) => {
                if out.user.as_ref().is_some_and(|u| *u != user)
                    || out.password.as_ref().is_some_and(|p| *p != password)
                {
                    return Err("servers of the list carry different credentials".into());
                }
                out.user = Some(user);
                out.password = Some(password);
            }
            (Some(token), None) => {
                if out.token.as_ref().is_some_and(|t| *t != token) {
                    return Err("servers of the list carry different tokens".into());
                }
                out.token = Some(token);
            }
        }
        out.servers.push(split.url);
    }
    if out.token.is_some() && out.user.is_some() {
        return Err("servers of the list carry both a token and a user".into());
    }
    Ok(out)
}

fn readable(key: &str, path: &str) -> Result<(), (String, String)> {
    if path.is_empty() {
        return Ok(());
    }
    std::fs::metadata(path).map(|_| ()).map_err(|e| (key.to_string(), format!("cannot read {path}: {e}")))
}

/// Checks the `nats.*` and `redis.*` connection keys; the error names the key.
pub fn validate(config: &Config) -> Result<(), (String, String)> {
    let n = &config.nats;
    let err = |k: &str, m: &str| Err((k.to_string(), m.to_string()));
    let ep = nats_endpoints(&n.url).map_err(|m| ("nats.url".to_string(), m))?;
    if !(1..=5).contains(&n.stream_replicas) {
        return err("nats.stream_replicas", "must be between 1 and 5 (1, or 3 on a three-node cluster)");
    }
    if n.user.is_empty() != n.password.is_empty() {
        return err("nats.password", "nats.user and nats.password go together");
    }
    let methods = [
        ("credentials in nats.url", ep.user.is_some() || ep.token.is_some()),
        ("nats.user", !n.user.is_empty()),
        ("nats.token", !n.token.is_empty()),
        ("nats.nkey_seed", !n.nkey_seed.is_empty()),
        ("nats.credentials_file", !n.credentials_file.is_empty()),
    ];
    let set: Vec<&str> = methods.iter().filter(|(_, on)| *on).map(|(k, _)| *k).collect();
    if set.len() > 1 {
        return err(set[1], &format!("only one NATS authentication may be set (also {})", set[0]));
    }
    if !n.nkey_seed.is_empty() && !n.nkey_seed.expose().starts_with("SU") {
        return err("nats.nkey_seed", "must be a user NKey seed (starts with SU)");
    }
    readable("nats.credentials_file", &n.credentials_file)?;
    readable("nats.tls_ca_file", &n.tls_ca_file)?;
    readable("nats.tls_cert_file", &n.tls_cert_file)?;
    readable("nats.tls_key_file", &n.tls_key_file)?;
    if n.tls_cert_file.is_empty() != n.tls_key_file.is_empty() {
        return err("nats.tls_key_file", "nats.tls_cert_file and nats.tls_key_file go together");
    }

    let r = &config.redis;
    let entries: Vec<&str> = r.address.split(',').map(str::trim).collect();
    if entries.len() > 1 && r.mode == crate::config::RedisMode::Standalone {
        return err("redis.address", "a list of nodes needs redis.mode: cluster");
    }
    let (mut tls, mut plain, mut url_password, mut creds) = (false, false, false, None);
    for (i, entry) in entries.iter().enumerate() {
        if entry.is_empty() {
            return err("redis.address", &format!("node {} of the list is empty", i + 1));
        }
        if entry.contains("://") {
            let scheme = entry.split("://").next().unwrap_or_default();
            if scheme != "redis" && scheme != "rediss" {
                return err(
                    "redis.address",
                    &format!("scheme `{scheme}` is not supported (use redis:// or rediss://)"),
                );
            }
        }
        if entry.starts_with("rediss://") {
            tls = true;
        } else {
            plain = true;
        }
        let split = split_userinfo(entry);
        url_password |= split.password.is_some();
        let these = (split.user, split.password);
        if i > 0 && creds.as_ref() != Some(&these) {
            return err("redis.address", "nodes of the list carry different credentials");
        }
        creds = Some(these);
    }
    if tls && plain {
        return err("redis.address", "nodes of the list mix redis:// and rediss://");
    }
    if !r.username.is_empty() && r.password.is_empty() && !url_password {
        return err("redis.password", "redis.username needs a password");
    }
    for (key, path) in [
        ("redis.tls_ca_file", &r.tls_ca_file),
        ("redis.tls_cert_file", &r.tls_cert_file),
        ("redis.tls_key_file", &r.tls_key_file),
    ] {
        readable(key, path)?;
        if !path.is_empty() && !tls {
            return err(key, "needs a rediss:// redis.address");
        }
    }
    if r.tls_cert_file.is_empty() != r.tls_key_file.is_empty() {
        return err("redis.tls_key_file", "redis.tls_cert_file and redis.tls_key_file go together");
    }
    validate_grpc_tls(config)
}

/// The router → edge gRPC TLS keys.
fn validate_grpc_tls(config: &Config) -> Result<(), (String, String)> {
    let err = |k: &str, m: &str| Err((k.to_string(), m.to_string()));
    let s = &config.server;
    for (key, path) in [
        ("server.grpc_tls_cert_file", &s.grpc_tls_cert_file),
        ("server.grpc_tls_key_file", &s.grpc_tls_key_file),
        ("server.grpc_tls_client_ca_file", &s.grpc_tls_client_ca_file),
    ] {
        readable(key, path)?;
    }
    if s.grpc_tls_cert_file.is_empty() != s.grpc_tls_key_file.is_empty() {
        return err("server.grpc_tls_key_file", "server.grpc_tls_cert_file and server.grpc_tls_key_file go together");
    }
    if !s.grpc_tls_client_ca_file.is_empty() && s.grpc_tls_cert_file.is_empty() {
        return err("server.grpc_tls_client_ca_file", "needs server.grpc_tls_cert_file (mutual TLS is TLS first)");
    }
    let r = &config.router;
    for (key, path) in [
        ("router.edge_tls_ca_file", &r.edge_tls_ca_file),
        ("router.edge_tls_cert_file", &r.edge_tls_cert_file),
        ("router.edge_tls_key_file", &r.edge_tls_key_file),
    ] {
        readable(key, path)?;
    }
    if r.edge_tls_cert_file.is_empty() != r.edge_tls_key_file.is_empty() {
        return err("router.edge_tls_key_file", "router.edge_tls_cert_file and router.edge_tls_key_file go together");
    }
    if r.edge_tls_ca_file.is_empty() && (!r.edge_tls_cert_file.is_empty() || !r.edge_tls_server_name.is_empty()) {
        return err("router.edge_tls_ca_file", "must be set to use TLS to edges");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn userinfo_is_taken_out_and_decoded() {
        let s = split_userinfo("nats://al%40ice:p%3Ass@host:4222/x");
        assert_eq!(s.url, "nats://host:4222/x");
        assert_eq!(s.user.as_deref(), Some("al@ice"));
        assert_eq!(s.password.as_deref(), Some("p:ss"));
        let s = split_userinfo("redis://:pw@h:1");
        assert_eq!((s.url.as_str(), s.user.as_deref(), s.password.as_deref()), ("redis://h:1", Some(""), Some("pw")));
        assert_eq!(split_userinfo("127.0.0.1:6379").url, "127.0.0.1:6379");
    }

    #[test]
    fn masking_hides_passwords_and_tokens() {
        assert_eq!(mask_urls("nats://u:secret@a:1,nats://b:2"), "nats://u:***@a:1,nats://b:2");
        assert_eq!(mask_urls("nats://tok@a:1"), "nats://***@a:1");
        assert_eq!(mask_urls("rediss://:pw@h:1"), "rediss://:***@h:1");
        assert_eq!(mask_urls("127.0.0.1:6379"), "127.0.0.1:6379");
    }

    #[test]
    fn nats_list_is_parsed() {
        let ep = nats_endpoints("nats://u:p@a:1, b:2 ,tls://u:p@c:3").unwrap();
        assert_eq!(ep.servers, vec!["nats://a:1", "nats://b:2", "tls://c:3"]);
        assert_eq!((ep.user.as_deref(), ep.password.as_deref(), ep.tls), (Some("u"), Some("p"), true));
        assert_eq!(nats_endpoints("nats://t0k@a:1").unwrap().token.as_deref(), Some("t0k"));
        for bad in ["", "a:1,,b:2", "ws://a:1", "nats://u:p@a:1,nats://u:q@b:2", "nats://", "nats://:4222"] {
            let e = nats_endpoints(bad).expect_err(bad);
            assert!(!e.contains("p@") && !e.contains(":q"), "{e}");
        }
    }
}

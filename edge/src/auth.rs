//! Authentication: API keys (constant time), user and admin tokens with
//! their own keys, and a bounded cache of validated tokens that never
//! outlives a token's expiry. Rebuilt on config reload (key rotation).

use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use daisi_common::config::AuthConfig;
use daisi_common::token::{AdminClaims, Claims, TokenError, TokenKeys, UserClaims, unix_now};
use dashmap::DashMap;

/// Which API key a request must carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    User,
    Admin,
}

/// Keys derived from one version of `auth.*`.
struct Keys {
    api_key: daisi_common::Secret,
    admin_api_key: daisi_common::Secret,
    issuer_key: daisi_common::Secret,
    allow_api_key_minting: bool,
    user: TokenKeys,
    admin: TokenKeys,
}

#[derive(Clone)]
enum Cached {
    User(Arc<UserClaims>),
    Admin(Arc<AdminClaims>),
}

/// Token and API key checks for one edge.
pub struct Auth {
    keys: RwLock<Arc<Keys>>,
    cache: DashMap<TokenDigest, (Cached, Instant)>,
    cache_ttl: RwLock<(Duration, usize)>,
    digest: Digester,
}

/// A 128-bit keyed digest of a token: the cache key. A token is a few
/// hundred bytes and every socket has its own, so keying the cache by the
/// token itself would cost each idle socket that much again.
type TokenDigest = [u64; 2];

/// Two SipHash instances with random keys unknown outside this process: an
/// attacker cannot craft a token whose digest collides with a cached one
/// (which would reuse that token's claims) short of ~2^64 online guesses,
/// and each guess is a full connection attempt.
struct Digester([RandomState; 2]);

impl Digester {
    fn new() -> Self {
        Self([RandomState::new(), RandomState::new()])
    }

    fn digest(&self, token: &str) -> TokenDigest {
        [self.0[0].hash_one(token), self.0[1].hash_one(token)]
    }
}

impl Auth {
    /// Builds from validated config (keys are known to be well formed).
    /// Warns when the migration switch `auth.allow_api_key_minting` is on.
    pub fn new(config: &AuthConfig) -> Result<Self, TokenError> {
        if config.allow_api_key_minting {
            tracing::warn!(
                "auth.allow_api_key_minting is true: the API keys that browsers hold also mint tokens \
                 (any end user can mint a token for any tenant); give the backend auth.token_issuer_key \
                 and turn this off"
            );
        }
        Ok(Self {
            keys: RwLock::new(Arc::new(Self::keys(config)?)),
            cache: DashMap::new(),
            cache_ttl: RwLock::new(Self::cache_limits(config)),
            digest: Digester::new(),
        })
    }

    fn cache_limits(config: &AuthConfig) -> (Duration, usize) {
        (Duration::from_secs(config.token_cache_ttl_seconds), config.token_cache_max_entries as usize)
    }

    fn keys(config: &AuthConfig) -> Result<Keys, TokenError> {
        Ok(Keys {
            api_key: config.secret_token.clone(),
            admin_api_key: config.admin_secret_token.clone(),
            issuer_key: config.token_issuer_key.clone(),
            allow_api_key_minting: config.allow_api_key_minting,
            user: TokenKeys::new(&config.token_aes_key, &config.previous_token_aes_keys)?,
            admin: TokenKeys::new(&config.admin_token_aes_key, &config.previous_admin_token_aes_keys)?,
        })
    }

    /// Applies reloaded `auth.*`; clears the cache, so tokens sealed with a
    /// key that is no longer accepted stop working at once.
    pub fn reload(&self, config: &AuthConfig) -> Result<(), TokenError> {
        let keys = Arc::new(Self::keys(config)?);
        *self.keys.write().unwrap_or_else(|p| p.into_inner()) = keys;
        *self.cache_ttl.write().unwrap_or_else(|p| p.into_inner()) = Self::cache_limits(config);
        self.cache.clear();
        Ok(())
    }

    fn current(&self) -> Arc<Keys> {
        self.keys.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Whether `candidate` is the API key of `kind` (constant time).
    pub fn api_key_ok(&self, kind: KeyKind, candidate: &str) -> bool {
        let keys = self.current();
        match kind {
            KeyKind::User => keys.api_key.matches(candidate),
            KeyKind::Admin => keys.admin_api_key.matches(candidate),
        }
    }

    /// Whether `candidate` may mint tokens of `kind` (constant time): the
    /// token issuer key, or, only with `auth.allow_api_key_minting`, the API
    /// key of that kind. An empty issuer key matches nothing.
    pub fn may_mint(&self, kind: KeyKind, candidate: &str) -> bool {
        let keys = self.current();
        let issuer = keys.issuer_key.matches(candidate);
        let api_key = keys.allow_api_key_minting
            && match kind {
                KeyKind::User => keys.api_key.matches(candidate),
                KeyKind::Admin => keys.admin_api_key.matches(candidate),
            };
        issuer | api_key
    }

    /// Seals user claims with the current user key.
    pub fn seal_user(&self, claims: &UserClaims) -> Result<String, TokenError> {
        self.current().user.seal(claims)
    }

    /// Seals admin claims with the current admin key.
    pub fn seal_admin(&self, claims: &AdminClaims) -> Result<String, TokenError> {
        self.current().admin.seal(claims)
    }

    /// Validates a user token (cached).
    pub fn user_token(&self, token: &str) -> Result<Arc<UserClaims>, TokenError> {
        if let Some(Cached::User(c)) = self.cached(token) {
            return Ok(c);
        }
        let claims = Arc::new(self.current().user.open::<UserClaims>(token, unix_now())?);
        self.remember(token, Cached::User(claims.clone()), claims.expires_at());
        Ok(claims)
    }

    /// Validates an admin token (cached).
    pub fn admin_token(&self, token: &str) -> Result<Arc<AdminClaims>, TokenError> {
        if let Some(Cached::Admin(c)) = self.cached(token) {
            return Ok(c);
        }
        let claims = Arc::new(self.current().admin.open::<AdminClaims>(token, unix_now())?);
        self.remember(token, Cached::Admin(claims.clone()), claims.expires_at());
        Ok(claims)
    }

    fn cached(&self, token: &str) -> Option<Cached> {
        let key = self.digest.digest(token);
        let hit = self.cache.get(&key)?;
        if hit.1 > Instant::now() {
            return Some(hit.0.clone());
        }
        drop(hit);
        self.cache.remove(&key);
        None
    }

    fn remember(&self, token: &str, claims: Cached, expires_at: u64) {
        let (ttl, max) = *self.cache_ttl.read().unwrap_or_else(|p| p.into_inner());
        if ttl.is_zero() || max == 0 {
            return;
        }
        let left = Duration::from_secs(expires_at.saturating_sub(unix_now()));
        let until = Instant::now() + ttl.min(left);
        if self.cache.len() >= max {
            let now = Instant::now();
            self.cache.retain(|_, (_, t)| *t > now);
            if self.cache.len() >= max {
                // Still full of live entries: start over rather than grow.
                self.cache.clear();
            }
        }
        self.cache.insert(self.digest.digest(token), (claims, until));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use daisi_common::Secret;
    use daisi_common::token::new_token_id;

    fn config(user_key: u8, previous: &[u8]) -> AuthConfig {
        AuthConfig {
            secret_token: Secret::new("k"),
            admin_secret_token: Secret::new("ak"),
            token_aes_key: Secret::new(format!("{user_key:064x}")),
            admin_token_aes_key: Secret::new(format!("{:064x}", 200)),
            previous_token_aes_keys: previous.iter().map(|k| Secret::new(format!("{k:064x}"))).collect(),
            ..AuthConfig::default()
        }
    }

    fn claims(expires_at: u64) -> UserClaims {
        UserClaims {
            company_id: "c".into(),
            agent_id: "a".into(),
            user_id: "u".into(),
            expires_at,
            token_id: new_token_id(),
        }
    }

    #[test]
    fn api_keys_by_kind() {
        let auth = Auth::new(&config(1, &[])).unwrap();
        assert!(auth.api_key_ok(KeyKind::User, "k"));
        assert!(!auth.api_key_ok(KeyKind::User, "ak"));
        assert!(auth.api_key_ok(KeyKind::Admin, "ak"));
    }

    #[test]
    fn only_the_issuer_key_mints_unless_migrating() {
        let mut cfg = AuthConfig { token_issuer_key: Secret::new("issuer"), ..config(1, &[]) };
        let auth = Auth::new(&cfg).unwrap();
        for kind in [KeyKind::User, KeyKind::Admin] {
            assert!(auth.may_mint(kind, "issuer"));
            assert!(!auth.may_mint(kind, "k") && !auth.may_mint(kind, "ak") && !auth.may_mint(kind, ""));
        }
        cfg.allow_api_key_minting = true;
        auth.reload(&cfg).unwrap();
        assert!(auth.may_mint(KeyKind::User, "k") && auth.may_mint(KeyKind::Admin, "ak"));
        assert!(!auth.may_mint(KeyKind::User, "ak") && !auth.may_mint(KeyKind::Admin, "k"));
        assert!(auth.may_mint(KeyKind::User, "issuer"));
        cfg.token_issuer_key = Secret::default();
        auth.reload(&cfg).unwrap();
        assert!(!auth.may_mint(KeyKind::User, "") && auth.may_mint(KeyKind::User, "k"));
    }

    #[test]
    fn rotation_drops_cached_tokens_of_removed_keys() {
        let auth = Auth::new(&config(1, &[])).unwrap();
        let t = auth.seal_user(&claims(unix_now() + 60)).unwrap();
        assert!(auth.user_token(&t).is_ok());
        // Rotate with the old key kept as previous: still valid.
        auth.reload(&config(2, &[1])).unwrap();
        assert!(auth.user_token(&t).is_ok());
        // Drop the old key: refused even though it was cached.
        auth.reload(&config(2, &[])).unwrap();
        assert_eq!(auth.user_token(&t).unwrap_err(), TokenError::Undecryptable);
    }

    #[test]
    fn user_token_is_not_admin_token() {
        let auth = Auth::new(&config(1, &[])).unwrap();
        let t = auth.seal_user(&claims(unix_now() + 60)).unwrap();
        assert!(auth.admin_token(&t).is_err());
    }

    #[test]
    fn the_cache_answers_only_for_the_exact_token() {
        let auth = Auth::new(&config(1, &[])).unwrap();
        let t = auth.seal_user(&claims(unix_now() + 60)).unwrap();
        assert!(auth.user_token(&t).is_ok());
        assert_eq!(auth.cache.len(), 1);
        // Any other string, however close, is decrypted (and refused), never served from the cache.
        let mut forged = t.clone().into_bytes();
        let i = forged.len() / 2;
        forged[i] = if forged[i] == b'A' { b'B' } else { b'A' };
        let forged = String::from_utf8(forged).unwrap();
        assert!(auth.user_token(&forged).is_err());
        assert!(auth.user_token(&t).is_ok());
    }
}

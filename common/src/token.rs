//! Tokens: AES-256-GCM sealed JSON claims, `base64url(nonce || ciphertext+tag)`,
//! with a fresh random nonce per token and previous keys accepted for
//! decryption only (key rotation).

use std::time::{SystemTime, UNIX_EPOCH};

use aes_gcm::aead::{Aead, AeadCore, KeyInit, OsRng};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::names::valid_id;
use crate::secret::Secret;

const NONCE_LEN: usize = 12;
/// Longest token accepted, in characters (claims are small; this bounds work).
pub const MAX_TOKEN_LEN: usize = 4096;

/// Why a token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("token is malformed")]
    Malformed,
    #[error("token could not be decrypted with any accepted key")]
    Undecryptable,
    #[error("token claims are invalid")]
    BadClaims,
    #[error("token has expired")]
    Expired,
    #[error("AES key is not 64 hex characters")]
    BadKey,
    #[error("claims could not be encrypted")]
    Encrypt,
}

/// Claims of a user token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserClaims {
    pub company_id: String,
    pub agent_id: String,
    pub user_id: String,
    /// Unix seconds.
    pub expires_at: u64,
    pub token_id: String,
}

/// Claims of an admin token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminClaims {
    pub admin_id: String,
    /// Unix seconds.
    pub expires_at: u64,
    pub token_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subscribed_company_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subscribed_agent_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub company_id_restriction: Option<String>,
}

impl AdminClaims {
    /// The (company, agent) scope this admin may watch; `None` = any.
    /// `company_id_restriction` wins over `subscribed_company_id`.
    pub fn scope(&self) -> (Option<&str>, Option<&str>) {
        let company = self.company_id_restriction.as_deref().or(self.subscribed_company_id.as_deref());
        (company, self.subscribed_agent_id.as_deref())
    }

    /// Whether this admin may receive `websocket.{company}.{agent}.agents`.
    pub fn allows(&self, company: &str, agent: &str) -> bool {
        let (c, a) = self.scope();
        c.is_none_or(|c| c == company) && a.is_none_or(|a| a == agent)
    }
}

/// Claims that carry an expiry and identifiers to check.
pub trait Claims: Serialize + DeserializeOwned {
    fn expires_at(&self) -> u64;
    /// Whether every identifier is well formed.
    fn ids_valid(&self) -> bool;
}

impl Claims for UserClaims {
    fn expires_at(&self) -> u64 {
        self.expires_at
    }
    fn ids_valid(&self) -> bool {
        valid_id(&self.company_id) && valid_id(&self.agent_id) && valid_id(&self.user_id)
    }
}

impl Claims for AdminClaims {
    fn expires_at(&self) -> u64 {
        self.expires_at
    }
    fn ids_valid(&self) -> bool {
        valid_id(&self.admin_id)
            && [&self.subscribed_company_id, &self.subscribed_agent_id, &self.company_id_restriction]
                .iter()
                .all(|o| o.as_deref().is_none_or(valid_id))
    }
}

/// Seals tokens with the current key and opens them with the current or a
/// previous key.
#[derive(Clone)]
pub struct TokenKeys {
    current: Aes256Gcm,
    previous: Vec<Aes256Gcm>,
}

impl std::fmt::Debug for TokenKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenKeys(***)")
    }
}

fn cipher(hex_key: &Secret) -> Result<Aes256Gcm, TokenError> {
    let hex = hex_key.expose().as_bytes();
    if hex.len() != 64 {
        return Err(TokenError::BadKey);
    }
    let mut key = [0u8; 32];
    for (i, pair) in hex.chunks(2).enumerate() {
        let s = std::str::from_utf8(pair).map_err(|_| TokenError::BadKey)?;
        key[i] = u8::from_str_radix(s, 16).map_err(|_| TokenError::BadKey)?;
    }
    Ok(Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(&key)))
}

impl TokenKeys {
    /// Keys from hex secrets (64 hex characters each).
    pub fn new(current: &Secret, previous: &[Secret]) -> Result<Self, TokenError> {
        Ok(Self { current: cipher(current)?, previous: previous.iter().map(cipher).collect::<Result<_, _>>()? })
    }

    /// Seals claims with the current key and a fresh random nonce.
    pub fn seal<C: Claims>(&self, claims: &C) -> Result<String, TokenError> {
        let plain = serde_json::to_vec(claims).map_err(|_| TokenError::Encrypt)?;
        let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
        let sealed = self.current.encrypt(&nonce, plain.as_slice()).map_err(|_| TokenError::Encrypt)?;
        let mut out = Vec::with_capacity(NONCE_LEN + sealed.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        Ok(URL_SAFE_NO_PAD.encode(out))
    }

    /// Opens a token and checks its expiry against `now` (unix seconds).
    pub fn open<C: Claims>(&self, token: &str, now: u64) -> Result<C, TokenError> {
        if token.is_empty() || token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::Malformed);
        }
        // Accept padded tokens too (some clients pad base64url).
        let bytes = URL_SAFE_NO_PAD.decode(token.trim_end_matches('=')).map_err(|_| TokenError::Malformed)?;
        if bytes.len() <= NONCE_LEN + 16 {
            return Err(TokenError::Malformed);
        }
        let (nonce, sealed) = bytes.split_at(NONCE_LEN);
        let nonce = Nonce::from_slice(nonce);
        let plain = std::iter::once(&self.current)
            .chain(self.previous.iter())
            .find_map(|k| k.decrypt(nonce, sealed).ok())
            .ok_or(TokenError::Undecryptable)?;
        let claims: C = serde_json::from_slice(&plain).map_err(|_| TokenError::BadClaims)?;
        if !claims.ids_valid() {
            return Err(TokenError::BadClaims);
        }
        if claims.expires_at() <= now {
            return Err(TokenError::Expired);
        }
        Ok(claims)
    }
}

/// Unix seconds now.
pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Unix nanoseconds now.
pub fn unix_now_nanos() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as i64).unwrap_or(0)
}

/// A random token id (128 bits, hex).
pub fn new_token_id() -> String {
    let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
    let extra = Aes256Gcm::generate_nonce(&mut OsRng);
    nonce.iter().chain(extra.iter().take(4)).map(|b| format!("{b:02x}")).collect()
}

/// RFC 3339 UTC rendering of unix seconds.
pub fn rfc3339(unix_seconds: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + std::time::Duration::from_secs(unix_seconds)).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> Secret {
        Secret::new(format!("{:064x}", n))
    }

    fn user(expires_at: u64) -> UserClaims {
        UserClaims {
            company_id: "c1".into(),
            agent_id: "a1".into(),
            user_id: "u1".into(),
            expires_at,
            token_id: new_token_id(),
        }
    }

    #[test]
    fn round_trip_and_fresh_nonce() {
        let keys = TokenKeys::new(&key(1), &[]).unwrap();
        let claims = user(unix_now() + 60);
        let t1 = keys.seal(&claims).unwrap();
        let t2 = keys.seal(&claims).unwrap();
        assert_ne!(t1, t2, "same claims must seal differently");
        assert_eq!(keys.open::<UserClaims>(&t1, unix_now()).unwrap(), claims);
    }

    #[test]
    fn expired_wrong_key_and_garbage_are_refused() {
        let keys = TokenKeys::new(&key(1), &[]).unwrap();
        let other = TokenKeys::new(&key(2), &[]).unwrap();
        let t = keys.seal(&user(100)).unwrap();
        assert_eq!(keys.open::<UserClaims>(&t, 100), Err(TokenError::Expired));
        let t = keys.seal(&user(unix_now() + 60)).unwrap();
        assert_eq!(other.open::<UserClaims>(&t, unix_now()), Err(TokenError::Undecryptable));
        assert_eq!(keys.open::<UserClaims>("not base64!", 0), Err(TokenError::Malformed));
        assert_eq!(keys.open::<UserClaims>("AAAA", 0), Err(TokenError::Malformed));
        // A user token is not an admin token even under the same key.
        assert_eq!(keys.open::<AdminClaims>(&t, unix_now()), Err(TokenError::BadClaims));
    }

    #[test]
    fn previous_keys_open_but_never_seal() {
        let old = TokenKeys::new(&key(1), &[]).unwrap();
        let rotated = TokenKeys::new(&key(2), &[key(1)]).unwrap();
        let t_old = old.seal(&user(unix_now() + 60)).unwrap();
        assert!(rotated.open::<UserClaims>(&t_old, unix_now()).is_ok());
        let t_new = rotated.seal(&user(unix_now() + 60)).unwrap();
        assert!(old.open::<UserClaims>(&t_new, unix_now()).is_err());
    }

    #[test]
    fn admin_scope() {
        let mut a = AdminClaims {
            admin_id: "ad".into(),
            expires_at: 0,
            token_id: "t".into(),
            subscribed_company_id: None,
            subscribed_agent_id: None,
            company_id_restriction: None,
        };
        assert!(a.allows("x", "y"));
        a.subscribed_agent_id = Some("a1".into());
        assert!(a.allows("x", "a1") && !a.allows("x", "a2"));
        a.subscribed_company_id = Some("c1".into());
        a.company_id_restriction = Some("c2".into());
        assert!(a.allows("c2", "a1") && !a.allows("c1", "a1"));
    }

    #[test]
    fn rfc3339_format() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
    }
}

//! Pulsar's token authentication (auth method `token`): JSON Web Tokens
//! signed with HS256 under a secret key, the subject (`sub`) being the
//! client's role and `exp` (seconds since the epoch) an optional expiry —
//! the tokens `pulsar tokens create --secret-key …` makes, so they work with
//! every Pulsar client. Pure: the time comes in.

use std::path::Path;

use aws_lc_rs::hmac;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde::{Deserialize, Serialize};

/// The CONNECT `auth_method_name` of token authentication.
pub const METHOD: &str = "token";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("malformed token: {0}")]
    Malformed(String),
    #[error("token signed with {0}, not HS256")]
    Algorithm(String),
    #[error("token signature does not verify")]
    BadSignature,
    #[error("token expired at {expired_at} (now {now})")]
    Expired { expired_at: u64, now: u64 },
    #[error("token has no subject (role)")]
    NoSubject,
}

/// What a verified token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    /// The client's role.
    pub subject: String,
    pub expires_at: Option<u64>,
}

#[derive(Serialize, Deserialize)]
struct Header {
    alg: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    typ: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct Payload {
    #[serde(default)]
    sub: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    exp: Option<u64>,
}

/// An HS256 secret key.
#[derive(Clone)]
pub struct SecretKey {
    key: hmac::Key,
}

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretKey(..)")
    }
}

impl SecretKey {
    pub fn from_bytes(bytes: &[u8]) -> SecretKey {
        SecretKey {
            key: hmac::Key::new(hmac::HMAC_SHA256, bytes),
        }
    }

    /// 32 random bytes, as `pulsar tokens create-secret-key` makes.
    pub fn generate() -> Result<Vec<u8>, TokenError> {
        let mut bytes = vec![0u8; 32];
        aws_lc_rs::rand::fill(&mut bytes)
            .map_err(|_| TokenError::Malformed("no randomness".into()))?;
        Ok(bytes)
    }

    /// A key file: raw bytes, or `data:;base64,<base64>` as Pulsar also
    /// accepts.
    pub fn load(path: &Path) -> std::io::Result<SecretKey> {
        let raw = std::fs::read(path)?;
        let bytes = match raw.strip_prefix(b"data:;base64,") {
            Some(b64) => base64::engine::general_purpose::STANDARD
                .decode(b64.trim_ascii())
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?,
            None => raw,
        };
        if bytes.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "empty secret key",
            ));
        }
        Ok(SecretKey::from_bytes(&bytes))
    }

    /// A token for `subject`, valid until `expires_at` (seconds since the
    /// epoch) if given.
    pub fn sign(&self, subject: &str, expires_at: Option<u64>) -> String {
        let header = Header {
            alg: "HS256".into(),
            typ: None,
        };
        let payload = Payload {
            sub: Some(subject.to_string()),
            exp: expires_at,
        };
        let enc = |v: &[u8]| URL_SAFE_NO_PAD.encode(v);
        let h = enc(&serde_json::to_vec(&header).unwrap_or_default());
        let p = enc(&serde_json::to_vec(&payload).unwrap_or_default());
        let signing_input = format!("{h}.{p}");
        let tag = hmac::sign(&self.key, signing_input.as_bytes());
        format!("{signing_input}.{}", enc(tag.as_ref()))
    }

    /// The claims of `token` if this key signed it and it has not expired
    /// at `now` (seconds since the epoch).
    pub fn verify(&self, token: &str, now: u64) -> Result<Claims, TokenError> {
        let token = token.trim();
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed(
                "not three dot-separated parts".into(),
            ));
        };
        let dec = |part: &str, what: &str| {
            URL_SAFE_NO_PAD
                .decode(part.trim_end_matches('='))
                .map_err(|e| TokenError::Malformed(format!("{what}: {e}")))
        };
        let header: Header = serde_json::from_slice(&dec(h, "header")?)
            .map_err(|e| TokenError::Malformed(format!("header: {e}")))?;
        if header.alg != "HS256" {
            return Err(TokenError::Algorithm(header.alg));
        }
        let signature = dec(s, "signature")?;
        let signed = &token[..h.len() + 1 + p.len()];
        hmac::verify(&self.key, signed.as_bytes(), &signature)
            .map_err(|_| TokenError::BadSignature)?;
        let payload: Payload = serde_json::from_slice(&dec(p, "payload")?)
            .map_err(|e| TokenError::Malformed(format!("payload: {e}")))?;
        if let Some(exp) = payload.exp {
            if exp <= now {
                return Err(TokenError::Expired {
                    expired_at: exp,
                    now,
                });
            }
        }
        let subject = payload
            .sub
            .filter(|s| !s.is_empty())
            .ok_or(TokenError::NoSubject)?;
        Ok(Claims {
            subject,
            expires_at: payload.exp,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn tokens_verify_under_their_key_until_they_expire() {
        let key = SecretKey::from_bytes(b"0123456789abcdef0123456789abcdef");
        let t = key.sign("app", Some(2_000));
        assert_eq!(
            key.verify(&t, 1_999).unwrap(),
            Claims {
                subject: "app".into(),
                expires_at: Some(2_000)
            }
        );
        assert_eq!(
            key.verify(&t, 2_000),
            Err(TokenError::Expired {
                expired_at: 2_000,
                now: 2_000
            })
        );
        let forever = key.sign("admin", None);
        assert_eq!(key.verify(&forever, u64::MAX - 1).unwrap().subject, "admin");
        let other = SecretKey::from_bytes(b"another key");
        assert_eq!(other.verify(&t, 0), Err(TokenError::BadSignature));
    }

    #[test]
    fn a_token_made_elsewhere_verifies() {
        // HS256 over {"alg":"HS256","typ":"JWT"}.{"sub":"test-user"} with
        // the key "secret", as jwt.io and Pulsar's CLI encode it.
        let key = SecretKey::from_bytes(b"secret");
        let mut payload = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
        payload.push('.');
        payload.push_str(&URL_SAFE_NO_PAD.encode(br#"{"sub":"test-user"}"#));
        let tag = hmac::sign(&key.key, payload.as_bytes());
        let token = format!("{payload}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()));
        assert_eq!(key.verify(&token, 0).unwrap().subject, "test-user");
    }

    #[test]
    fn bad_tokens_are_errors_not_panics() {
        let key = SecretKey::from_bytes(b"k");
        let good = key.sign("a", None);
        let (h, rest) = good.split_once('.').unwrap();
        for bad in [
            "",
            "a.b",
            "a.b.c.d",
            "!!.??.**",
            &format!("{h}.{rest}x"),
            &format!("{}.{rest}", URL_SAFE_NO_PAD.encode(br#"{"alg":"none"}"#)),
        ] {
            assert!(key.verify(bad, 0).is_err(), "{bad:?}");
        }
        let nosub = {
            let h = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256"}"#);
            let p = URL_SAFE_NO_PAD.encode(br#"{"exp":5}"#);
            let tag = hmac::sign(&key.key, format!("{h}.{p}").as_bytes());
            format!("{h}.{p}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()))
        };
        assert_eq!(key.verify(&nosub, 0), Err(TokenError::NoSubject));
    }
}

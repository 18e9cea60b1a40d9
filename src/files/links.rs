//! Short-lived signed links: a URL that serves one file to whoever holds it, with no
//! credential header, so an `<img src>` or a `download_url` just works.
//!
//! A link is `<path>?expires=<unix seconds>&sig=<base64url HMAC-SHA256>`; the MAC
//! covers the path and the expiry, so neither can be changed, and it is keyed by a
//! key derived from the service secret, so a link MAC can never double as a session
//! token's signature (or the other way round) even when both come from one secret.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

type HmacSha256 = Hmac<Sha256>;

/// Separates this key's use from every other use of the same secret.
const KEY_CONTEXT: &[u8] = b"comfyfleet signed file links v1";

/// Why a link was not accepted. Each is a 403 (or 410 for `Expired`) for the lead's
/// file route.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    #[error("the link is missing its expires or sig parameter")]
    Missing,
    #[error("the link's expires parameter is not a unix time")]
    MalformedExpiry,
    #[error("the link has expired; ask for a new one")]
    Expired,
    #[error("the link's signature does not match")]
    BadSignature,
}

/// Signs and checks links. Cheap to clone.
#[derive(Clone)]
pub struct LinkSigner {
    /// The HMAC already keyed, cloned per use instead of re-keying.
    mac: HmacSha256,
    ttl: Duration,
}

impl std::fmt::Debug for LinkSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkSigner")
            .field("key", &"[redacted]")
            .field("ttl", &self.ttl)
            .finish()
    }
}

impl LinkSigner {
    /// `secret` is the service's signing secret (it should be at least 32 random
    /// bytes; config enforces that for the JWT secret); `ttl` is how long a link lives.
    pub fn new(secret: &[u8], ttl: Duration) -> Self {
        let mut derive = keyed(secret);
        derive.update(KEY_CONTEXT);
        let key = derive.finalize().into_bytes();
        Self {
            mac: keyed(&key),
            ttl,
        }
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// `path` (which must not carry a query) with `expires` and `sig` appended.
    /// Sign the exact path the client will request, percent-encoding included.
    pub fn sign(&self, path: &str, now: DateTime<Utc>) -> String {
        let expires = now.timestamp().saturating_add(self.ttl.as_secs() as i64);
        let sig = URL_SAFE_NO_PAD.encode(self.mac(path, expires));
        format!("{path}?expires={expires}&sig={sig}")
    }

    /// Checks a link's query parameters against the path it was requested at.
    /// The signature is checked first, so a forged link is never told it merely
    /// expired.
    pub fn verify(
        &self,
        path: &str,
        expires: Option<&str>,
        sig: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<(), LinkError> {
        let (Some(expires), Some(sig)) = (expires, sig) else {
            return Err(LinkError::Missing);
        };
        // Only the canonical decimal form was ever signed ("+5" or "05" were not).
        let expires_at = match expires.parse::<i64>() {
            Ok(n) if n.to_string() == expires => n,
            _ => return Err(LinkError::MalformedExpiry),
        };
        let presented = URL_SAFE_NO_PAD
            .decode(sig)
            .map_err(|_| LinkError::BadSignature)?;
        let expected = self.mac(path, expires_at);
        if !bool::from(expected.as_slice().ct_eq(&presented)) {
            return Err(LinkError::BadSignature);
        }
        if now.timestamp() >= expires_at {
            return Err(LinkError::Expired);
        }
        Ok(())
    }

    fn mac(&self, path: &str, expires: i64) -> [u8; 32] {
        let mut mac = self.mac.clone();
        // The NUL cannot occur in a URL path, so (path, expiry) pairs never collide.
        mac.update(path.as_bytes());
        mac.update(b"\0");
        mac.update(expires.to_string().as_bytes());
        mac.finalize().into_bytes().into()
    }
}

fn keyed(key: &[u8]) -> HmacSha256 {
    // HMAC takes keys of any length (long ones are hashed), so this cannot fail.
    HmacSha256::new_from_slice(key).expect("HMAC accepts keys of any length")
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";
    const PATH: &str = "/files/tenants/0192/outputs/a/b.png";

    fn at(secs: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(secs, 0).unwrap()
    }

    /// Splits a signed link into (path, expires, sig).
    fn parts(link: &str) -> (String, String, String) {
        let (path, query) = link.split_once('?').unwrap();
        let mut expires = String::new();
        let mut sig = String::new();
        for pair in query.split('&') {
            match pair.split_once('=').unwrap() {
                ("expires", v) => expires = v.to_string(),
                ("sig", v) => sig = v.to_string(),
                other => panic!("unexpected parameter {other:?}"),
            }
        }
        (path.to_string(), expires, sig)
    }

    fn signer() -> LinkSigner {
        LinkSigner::new(SECRET, Duration::from_secs(600))
    }

    #[test]
    fn round_trip_within_the_ttl() {
        let link = signer().sign(PATH, at(1_000_000));
        let (path, expires, sig) = parts(&link);
        assert_eq!(path, PATH);
        assert_eq!(expires, "1000600");
        assert!(!sig.contains(['+', '/', '=']), "not base64url: {sig}");
        for now in [1_000_000, 1_000_599] {
            assert_eq!(
                signer().verify(&path, Some(&expires), Some(&sig), at(now)),
                Ok(())
            );
        }
    }

    #[test]
    fn expired_links_are_refused() {
        let (path, expires, sig) = parts(&signer().sign(PATH, at(1_000_000)));
        assert_eq!(
            signer().verify(&path, Some(&expires), Some(&sig), at(1_000_600)),
            Err(LinkError::Expired)
        );
    }

    #[test]
    fn tampering_is_refused() {
        let (path, expires, sig) = parts(&signer().sign(PATH, at(1_000_000)));
        let now = at(1_000_001);
        let other_path = PATH.replace("b.png", "c.png");
        assert_eq!(
            signer().verify(&other_path, Some(&expires), Some(&sig), now),
            Err(LinkError::BadSignature)
        );
        // Extending the expiry is tampering too, not a longer life.
        assert_eq!(
            signer().verify(&path, Some("9999999999"), Some(&sig), now),
            Err(LinkError::BadSignature)
        );
        let mut flipped = sig.clone().into_bytes();
        flipped[0] = if flipped[0] == b'A' { b'B' } else { b'A' };
        let flipped = String::from_utf8(flipped).unwrap();
        assert_eq!(
            signer().verify(&path, Some(&expires), Some(&flipped), now),
            Err(LinkError::BadSignature)
        );
        assert_eq!(
            signer().verify(&path, Some(&expires), Some("!!not base64"), now),
            Err(LinkError::BadSignature)
        );
        assert_eq!(
            signer().verify(&path, Some(&expires), Some(""), now),
            Err(LinkError::BadSignature)
        );
        assert_eq!(
            signer().verify(&path, Some(&format!("+{expires}")), Some(&sig), now),
            Err(LinkError::MalformedExpiry)
        );
        assert_eq!(
            signer().verify(&path, None, Some(&sig), now),
            Err(LinkError::Missing)
        );
    }

    #[test]
    fn another_secret_cannot_verify() {
        let (path, expires, sig) = parts(&signer().sign(PATH, at(1_000_000)));
        let other = LinkSigner::new(
            b"another-secret-another-secret-000",
            Duration::from_secs(600),
        );
        assert_eq!(
            other.verify(&path, Some(&expires), Some(&sig), at(1_000_001)),
            Err(LinkError::BadSignature)
        );
    }

    #[test]
    fn debug_hides_the_key() {
        assert!(!format!("{:?}", signer()).contains("0123"));
    }
}

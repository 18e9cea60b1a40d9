//! API keys: `cf_` followed by 32 random bytes in unpadded base64url.
//!
//! The key is shown once, at creation; only its SHA-256 digest is stored. The keys
//! carry 256 bits of entropy, so a fast digest resists guessing as well as a slow
//! password hash would, and checking a key costs one index lookup per request.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::RngCore;
use sha2::{Digest, Sha256};

const KEY_PREFIX: &str = "cf_";
const KEY_BYTES: usize = 32;
/// Characters of the key kept in clear for listings (`cf_` + 8).
const DISPLAY_PREFIX_LEN: usize = KEY_PREFIX.len() + 8;

/// A key as a client presented it, checked for shape but not yet for existence.
#[derive(Clone, PartialEq, Eq)]
pub struct PresentedKey(String);

impl std::fmt::Debug for PresentedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PresentedKey({}…)", self.display_prefix())
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("malformed API key: expected cf_ followed by 43 base64url characters")]
pub struct MalformedKey;

impl PresentedKey {
    pub fn parse(raw: &str) -> Result<Self, MalformedKey> {
        let body = raw.strip_prefix(KEY_PREFIX).ok_or(MalformedKey)?;
        match URL_SAFE_NO_PAD.decode(body) {
            Ok(bytes) if bytes.len() == KEY_BYTES => Ok(Self(raw.to_string())),
            _ => Err(MalformedKey),
        }
    }

    pub fn digest(&self) -> [u8; 32] {
        Sha256::digest(self.0.as_bytes()).into()
    }

    pub fn display_prefix(&self) -> &str {
        &self.0[..DISPLAY_PREFIX_LEN]
    }

    /// The secret itself; only for showing once to the key's creator.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

/// Makes a fresh random key.
pub fn generate() -> PresentedKey {
    let mut bytes = [0u8; KEY_BYTES];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    PresentedKey(format!("{KEY_PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_parse_and_differ() {
        let a = generate();
        let b = generate();
        assert_ne!(a, b);
        assert_eq!(PresentedKey::parse(a.expose()).unwrap(), a);
        assert_eq!(a.expose().len(), 3 + 43);
        assert_ne!(a.digest(), b.digest());
    }

    #[test]
    fn malformed_keys_are_rejected() {
        for bad in [
            "",
            "cf_",
            "cf_short",
            "xx_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
            "cf_!!!!",
        ] {
            assert_eq!(PresentedKey::parse(bad), Err(MalformedKey), "{bad}");
        }
    }

    #[test]
    fn debug_does_not_print_the_secret() {
        let k = generate();
        assert!(!format!("{k:?}").contains(k.expose()));
    }
}

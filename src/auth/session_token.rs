//! Session tokens: an HS256 JWT naming the tenant, user and session.
//!
//! The token is what makes sessions stateless across pods: any pod can check the
//! signature. Logout is still honoured everywhere because the session row it names
//! is checked too (see `AuthService::authenticate_session`).

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, decode, encode};
use serde::{Deserialize, Serialize};

use crate::domain::ids::{SessionId, TenantId, UserId};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SessionClaims {
    /// The user.
    pub sub: UserId,
    pub tid: TenantId,
    pub sid: SessionId,
    pub iat: i64,
    pub exp: i64,
}

#[derive(Clone)]
pub struct SessionSigner {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
}

#[derive(Debug, thiserror::Error)]
#[error("invalid session token: {0}")]
pub struct InvalidToken(#[from] jsonwebtoken::errors::Error);

impl SessionSigner {
    pub fn new(secret: &[u8]) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 5;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Self {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
        }
    }

    pub fn sign(&self, claims: &SessionClaims) -> String {
        encode(&Header::new(Algorithm::HS256), claims, &self.encoding)
            .expect("HS256 signing of plain claims cannot fail")
    }

    pub fn verify(&self, token: &str) -> Result<SessionClaims, InvalidToken> {
        Ok(decode::<SessionClaims>(token, &self.decoding, &self.validation)?.claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(exp: i64) -> SessionClaims {
        SessionClaims {
            sub: UserId::new(),
            tid: TenantId::new(),
            sid: SessionId::new(),
            iat: 0,
            exp,
        }
    }

    #[test]
    fn signed_tokens_verify_and_tampered_ones_do_not() {
        let signer = SessionSigner::new(&[7u8; 32]);
        let c = claims(chrono::Utc::now().timestamp() + 60);
        let token = signer.sign(&c);
        assert_eq!(signer.verify(&token).unwrap(), c);

        let other = SessionSigner::new(&[8u8; 32]);
        assert!(other.verify(&token).is_err());
        let mut tampered = token.clone();
        tampered.push('x');
        assert!(signer.verify(&tampered).is_err());
    }

    #[test]
    fn expired_tokens_are_refused() {
        let signer = SessionSigner::new(&[7u8; 32]);
        let token = signer.sign(&claims(chrono::Utc::now().timestamp() - 120));
        assert!(signer.verify(&token).is_err());
    }
}

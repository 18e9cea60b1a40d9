//! Turning credentials into a [`Principal`], and the account operations around
//! them (login, logout, issuing keys).

use std::sync::Arc;
use std::time::Instant;

use chrono::{Duration as ChronoDuration, Utc};

use super::api_key::{self, PresentedKey};
use super::password;
use super::session_token::{SessionClaims, SessionSigner};
use super::{Credential, Principal};
use crate::domain::ids::{TenantId, UserId};
use crate::store::api_keys::{ActiveKey, ApiKeyRecord, NewApiKey};
use crate::store::shared_reads::SharedReads;
use crate::store::{Store, StoreError};

/// Why a credential was refused. The messages are what the client is told.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("email or password is wrong")]
    WrongPassword,
    #[error("malformed API key: expected cf_ followed by 43 base64url characters")]
    MalformedKey,
    /// Unknown and revoked keys are indistinguishable to the client on purpose.
    #[error("API key is not valid (unknown or revoked)")]
    UnknownKey,
    #[error("session is not valid (expired, signed out or tampered with); sign in again")]
    InvalidSession,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A successful login: the cookie value and when it lapses.
#[derive(Debug)]
pub struct Login {
    pub token: String,
    pub expires_at: chrono::DateTime<Utc>,
    pub principal: Principal,
}

#[derive(Clone)]
pub struct AuthService {
    store: Store,
    signer: SessionSigner,
    session_ttl: std::time::Duration,
    /// Keys whose use this pod is recording now, so that many requests with one key
    /// at once (clients reconnecting after a restart) write it once, not each.
    touching: Arc<KeySet>,
    /// Lookups of a key by its digest: many requests with one key at once (clients
    /// reconnecting after a restart) share one query instead of queueing for the
    /// pool, each with its own.
    lookups: Arc<SharedReads<[u8; 32], Option<ActiveKey>>>,
}

/// Key lookups that run at once: enough for many tenants' traffic, few enough that
/// a storm of new keys leaves the pool to the rest of the API.
const LOOKUPS_AT_ONCE: usize = 8;

impl AuthService {
    pub fn new(store: Store, jwt_secret: &[u8], session_ttl: std::time::Duration) -> Self {
        Self {
            store,
            signer: SessionSigner::new(jwt_secret),
            session_ttl,
            touching: Arc::default(),
            lookups: Arc::new(SharedReads::new(LOOKUPS_AT_ONCE)),
        }
    }

    pub async fn login(&self, email: &str, password_text: &str) -> Result<Login, AuthError> {
        let candidate = self.store.find_login_candidate(email.trim()).await?;
        let stored_hash = candidate
            .as_ref()
            .map(|c| c.password_hash.clone())
            .unwrap_or_else(|| password::decoy_hash().to_string());
        let password_text = password_text.to_string();
        // argon2 is deliberately slow: keep it off the async workers.
        let matches =
            tokio::task::spawn_blocking(move || password::verify(&password_text, &stored_hash))
                .await
                .unwrap_or(false);
        let candidate = match candidate {
            Some(c) if matches => c,
            _ => return Err(AuthError::WrongPassword),
        };
        let ttl = ChronoDuration::from_std(self.session_ttl).unwrap_or(ChronoDuration::days(7));
        let now = Utc::now();
        let expires_at = now + ttl;
        let user = candidate.user;
        let session_id = self
            .store
            .create_session(user.tenant_id, user.id, expires_at)
            .await?;
        let token = self.signer.sign(&SessionClaims {
            sub: user.id,
            tid: user.tenant_id,
            sid: session_id,
            iat: now.timestamp(),
            exp: expires_at.timestamp(),
        });
        Ok(Login {
            token,
            expires_at,
            principal: Principal {
                tenant_id: user.tenant_id,
                tenant_name: candidate.tenant_name,
                is_admin: user.is_admin,
                credential: Credential::Session {
                    session_id,
                    user_id: user.id,
                    email: user.email,
                },
            },
        })
    }

    /// Ends the session behind a cookie. API-key callers have nothing to end.
    pub async fn logout(&self, principal: &Principal) -> Result<(), AuthError> {
        if let Credential::Session { session_id, .. } = &principal.credential {
            self.store
                .revoke_session(principal.tenant_id, *session_id)
                .await?;
        }
        Ok(())
    }

    pub async fn authenticate_session(&self, token: &str) -> Result<Principal, AuthError> {
        let claims = self
            .signer
            .verify(token)
            .map_err(|_| AuthError::InvalidSession)?;
        let session = self
            .store
            .find_active_session(claims.tid, claims.sid)
            .await?
            .filter(|s| s.user_id == claims.sub)
            .ok_or(AuthError::InvalidSession)?;
        Ok(Principal {
            tenant_id: claims.tid,
            tenant_name: session.tenant_name,
            is_admin: session.is_admin,
            credential: Credential::Session {
                session_id: claims.sid,
                user_id: session.user_id,
                email: session.email,
            },
        })
    }

    pub async fn authenticate_key(&self, raw: &str) -> Result<Principal, AuthError> {
        let key = PresentedKey::parse(raw.trim()).map_err(|_| AuthError::MalformedKey)?;
        let digest = key.digest();
        // A shared lookup began after this request arrived, so a key revoked before
        // then is refused as it would be by a lookup of its own.
        let found = self
            .lookups
            .get(digest, Instant::now(), || {
                self.store.find_active_api_key(&digest)
            })
            .await
            .map_err(StoreError::Shared)?
            .ok_or(AuthError::UnknownKey)?;
        let record = found.key;
        let stale = record
            .last_used_at
            .is_none_or(|t| Utc::now() - t > ChronoDuration::seconds(60));
        let (tenant, id) = (record.tenant_id, record.id);
        if stale && touching_set(&self.touching).insert(id.as_uuid()) {
            let store = self.store.clone();
            let touching = self.touching.clone();
            // Bookkeeping only: the request does not wait for it.
            tokio::spawn(async move {
                if let Err(e) = store.touch_api_key(tenant, id).await {
                    tracing::warn!(error = %e, "could not record API key use");
                }
                touching_set(&touching).remove(&id.as_uuid());
            });
        }
        Ok(Principal {
            tenant_id: record.tenant_id,
            tenant_name: found.tenant_name,
            is_admin: record.is_admin,
            credential: Credential::ApiKey {
                key_id: record.id,
                name: record.name,
            },
        })
    }

    /// Registers a key chosen by the operator (dev mode's fixed key). Registering
    /// a key that is already live in this tenant is a no-op; one live in another
    /// tenant is refused.
    pub async fn register_api_key(
        &self,
        tenant: TenantId,
        name: &str,
        is_admin: bool,
        key: &PresentedKey,
    ) -> Result<(), AuthError> {
        let digest = key.digest();
        match self.store.find_active_api_key(&digest).await? {
            Some(found) if found.key.tenant_id == tenant => Ok(()),
            Some(_) => Err(AuthError::UnknownKey),
            None => {
                self.store
                    .insert_api_key(
                        tenant,
                        NewApiKey {
                            name,
                            prefix: key.display_prefix(),
                            digest: &digest,
                            is_admin,
                            created_by: None,
                        },
                    )
                    .await?;
                Ok(())
            }
        }
    }

    /// Issues a new key. The returned secret is the only copy there will ever be.
    pub async fn create_api_key(
        &self,
        tenant: TenantId,
        name: &str,
        is_admin: bool,
        created_by: Option<UserId>,
    ) -> Result<(ApiKeyRecord, PresentedKey), AuthError> {
        let key = api_key::generate();
        let record = self
            .store
            .insert_api_key(
                tenant,
                NewApiKey {
                    name,
                    prefix: key.display_prefix(),
                    digest: &key.digest(),
                    is_admin,
                    created_by,
                },
            )
            .await?;
        Ok((record, key))
    }
}

type KeySet = std::sync::Mutex<std::collections::HashSet<uuid::Uuid>>;

fn touching_set(set: &KeySet) -> std::sync::MutexGuard<'_, std::collections::HashSet<uuid::Uuid>> {
    // A poisoned set only means a skipped or repeated write: harmless.
    set.lock().unwrap_or_else(|e| e.into_inner())
}

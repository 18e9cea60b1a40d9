//! `GET/POST /api/keys`, `GET/DELETE /api/keys/{key_id}`: a tenant admin's API keys.

use chrono::{DateTime, Utc};
use poem::web::Data;
use poem_openapi::param::Path;
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Object, OpenApi};

use super::problem::ApiError;
use super::security::Auth;
use super::{ApiTags, AppState};
use crate::auth::{Credential, Principal};
use crate::domain::ids::ApiKeyId;
use crate::store::api_keys::ApiKeyRecord;

pub struct KeysApi;

#[derive(Debug, Object)]
pub struct ApiKeyView {
    pub id: String,
    pub name: String,
    /// The key's first characters, to tell keys apart; the rest is never shown again.
    pub prefix: String,
    pub is_admin: bool,
    pub created_at: DateTime<Utc>,
    pub last_used_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

impl From<ApiKeyRecord> for ApiKeyView {
    fn from(k: ApiKeyRecord) -> Self {
        Self {
            id: k.id.to_string(),
            name: k.name,
            prefix: k.prefix,
            is_admin: k.is_admin,
            created_at: k.created_at,
            last_used_at: k.last_used_at,
            revoked_at: k.revoked_at,
        }
    }
}

#[derive(Debug, Object)]
pub struct CreateKeyRequest {
    #[oai(validator(min_length = 1, max_length = 100))]
    pub name: String,
    /// Whether the key may manage keys and users. Default false.
    #[oai(default)]
    pub is_admin: bool,
}

/// A new key. `key` is shown this once; store it now.
#[derive(Debug, Object)]
pub struct CreatedKey {
    pub key: String,
    #[oai(flatten)]
    pub info: ApiKeyView,
}

#[derive(ApiResponse)]
pub enum CreatedKeyResponse {
    #[oai(status = 201)]
    Created(Json<CreatedKey>),
}

#[derive(ApiResponse)]
pub enum RevokedResponse {
    /// Revoked; requests with the key are refused from now on.
    #[oai(status = 204)]
    Revoked,
}

/// Managing keys and users is for tenant admins.
pub(super) fn require_admin(p: &Principal) -> Result<(), ApiError> {
    if p.is_admin {
        Ok(())
    } else {
        Err(ApiError::forbidden(
            "this operation needs a tenant admin (an admin user or an admin API key)",
        ))
    }
}

/// A path id that does not parse names nothing that exists: 404, like a missing one.
pub(super) fn parse_id<T: std::str::FromStr>(raw: &str, what: &str) -> Result<T, ApiError> {
    raw.parse().map_err(|_| ApiError::not_found(what))
}

#[OpenApi(prefix_path = "/api/keys", tag = "ApiTags::Keys")]
impl KeysApi {
    /// List the tenant's API keys, revoked ones included.
    #[oai(path = "/", method = "get", operation_id = "listApiKeys")]
    async fn list(
        &self,
        state: Data<&AppState>,
        auth: Auth,
    ) -> Result<Json<Vec<ApiKeyView>>, ApiError> {
        let p = auth.principal();
        require_admin(p)?;
        let keys = state.store.list_api_keys(p.tenant_id).await?;
        Ok(Json(keys.into_iter().map(Into::into).collect()))
    }

    /// Create an API key. The secret is in the response and nowhere else.
    #[oai(path = "/", method = "post", operation_id = "createApiKey")]
    async fn create(
        &self,
        state: Data<&AppState>,
        auth: Auth,
        body: Json<CreateKeyRequest>,
    ) -> Result<CreatedKeyResponse, ApiError> {
        let p = auth.principal();
        require_admin(p)?;
        let created_by = match &p.credential {
            Credential::Session { user_id, .. } => Some(*user_id),
            Credential::ApiKey { .. } => None,
        };
        let name = body.name.trim();
        if name.is_empty() {
            return Err(ApiError::bad_request("name must not be blank"));
        }
        let (record, key) = state
            .auth
            .create_api_key(p.tenant_id, name, body.is_admin, created_by)
            .await?;
        Ok(CreatedKeyResponse::Created(Json(CreatedKey {
            key: key.expose().to_string(),
            info: record.into(),
        })))
    }

    /// One API key of the tenant.
    #[oai(path = "/:key_id", method = "get", operation_id = "getApiKey")]
    async fn get(
        &self,
        state: Data<&AppState>,
        auth: Auth,
        key_id: Path<String>,
    ) -> Result<Json<ApiKeyView>, ApiError> {
        let p = auth.principal();
        require_admin(p)?;
        let id: ApiKeyId = parse_id(&key_id, "API key")?;
        let key = state
            .store
            .get_api_key(p.tenant_id, id)
            .await?
            .ok_or_else(|| ApiError::not_found("API key"))?;
        Ok(Json(key.into()))
    }

    /// Revoke an API key; it is refused at once on every pod.
    #[oai(path = "/:key_id", method = "delete", operation_id = "revokeApiKey")]
    async fn revoke(
        &self,
        state: Data<&AppState>,
        auth: Auth,
        key_id: Path<String>,
    ) -> Result<RevokedResponse, ApiError> {
        let p = auth.principal();
        require_admin(p)?;
        let id: ApiKeyId = parse_id(&key_id, "API key")?;
        state
            .store
            .revoke_api_key(p.tenant_id, id)
            .await?
            .ok_or_else(|| ApiError::not_found("API key"))?;
        Ok(RevokedResponse::Revoked)
    }
}

//! API keys, stored as digests.

use chrono::{DateTime, Utc};
use sqlx::FromRow;
use uuid::Uuid;

use super::{Store, StoreError};
use crate::domain::ids::{ApiKeyId, TenantId, UserId};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiKeyRecord {
    pub id: ApiKeyId,
    pub tenant_id: TenantId,
    pub name: String,
    pub prefix: String,
    pub is_admin: bool,
    pub created_at: DateTime<Utc>,
    pub last_used_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

/// A live key found by its digest, with its tenant's name.
#[derive(Clone, Debug)]
pub struct ActiveKey {
    pub key: ApiKeyRecord,
    pub tenant_name: String,
}

#[derive(FromRow)]
struct KeyRow {
    id: Uuid,
    tenant_id: Uuid,
    name: String,
    prefix: String,
    is_admin: bool,
    created_at: DateTime<Utc>,
    last_used_at: Option<DateTime<Utc>>,
    revoked_at: Option<DateTime<Utc>>,
}

impl From<KeyRow> for ApiKeyRecord {
    fn from(r: KeyRow) -> Self {
        Self {
            id: ApiKeyId::from_uuid(r.id),
            tenant_id: TenantId::from_uuid(r.tenant_id),
            name: r.name,
            prefix: r.prefix,
            is_admin: r.is_admin,
            created_at: r.created_at,
            last_used_at: r.last_used_at,
            revoked_at: r.revoked_at,
        }
    }
}

const KEY_COLUMNS: &str =
    "k.id, k.tenant_id, k.name, k.prefix, k.is_admin, k.created_at, k.last_used_at, k.revoked_at";

/// The new key's fields, apart from the id the store assigns.
pub struct NewApiKey<'a> {
    pub name: &'a str,
    pub prefix: &'a str,
    pub digest: &'a [u8; 32],
    pub is_admin: bool,
    pub created_by: Option<UserId>,
}

impl Store {
    pub async fn insert_api_key(
        &self,
        tenant: TenantId,
        new: NewApiKey<'_>,
    ) -> Result<ApiKeyRecord, StoreError> {
        let row: KeyRow = sqlx::query_as(&format!(
            "INSERT INTO api_keys AS k (id, tenant_id, name, prefix, digest, is_admin, created_by) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING {KEY_COLUMNS}"
        ))
        .bind(ApiKeyId::new().as_uuid())
        .bind(tenant.as_uuid())
        .bind(new.name)
        .bind(new.prefix)
        .bind(new.digest.as_slice())
        .bind(new.is_admin)
        .bind(new.created_by.map(|u| u.as_uuid()))
        .fetch_one(&self.pool)
        .await?;
        Ok(row.into())
    }

    pub async fn list_api_keys(&self, tenant: TenantId) -> Result<Vec<ApiKeyRecord>, StoreError> {
        let rows: Vec<KeyRow> = sqlx::query_as(&format!(
            "SELECT {KEY_COLUMNS} FROM api_keys k WHERE k.tenant_id = $1 \
             ORDER BY k.created_at, k.id"
        ))
        .bind(tenant.as_uuid())
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(Into::into).collect())
    }

    pub async fn get_api_key(
        &self,
        tenant: TenantId,
        id: ApiKeyId,
    ) -> Result<Option<ApiKeyRecord>, StoreError> {
        let row: Option<KeyRow> = sqlx::query_as(&format!(
            "SELECT {KEY_COLUMNS} FROM api_keys k WHERE k.tenant_id = $1 AND k.id = $2"
        ))
        .bind(tenant.as_uuid())
        .bind(id.as_uuid())
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(Into::into))
    }

    /// Revokes a key of this tenant. Returns the key as it now is, or `None` when
    /// the tenant has no such key. Revoking twice keeps the first revocation time.
    pub async fn revoke_api_key(
        &self,
        tenant: TenantId,
        id: ApiKeyId,
    ) -> Result<Option<ApiKeyRecord>, StoreError> {
        let row: Option<KeyRow> = sqlx::query_as(&format!(
            "UPDATE api_keys AS k SET revoked_at = coalesce(k.revoked_at, now()) \
             WHERE k.tenant_id = $1 AND k.id = $2 RETURNING {KEY_COLUMNS}"
        ))
        .bind(tenant.as_uuid())
        .bind(id.as_uuid())
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(Into::into))
    }

    /// Revokes a key by id alone. Not tenant-scoped: for the operator's CLI.
    pub async fn revoke_api_key_as_operator(
        &self,
        id: ApiKeyId,
    ) -> Result<Option<ApiKeyRecord>, StoreError> {
        let row: Option<KeyRow> = sqlx::query_as(&format!(
            "UPDATE api_keys AS k SET revoked_at = coalesce(k.revoked_at, now()) \
             WHERE k.id = $1 RETURNING {KEY_COLUMNS}"
        ))
        .bind(id.as_uuid())
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(Into::into))
    }

    /// The unrevoked key with this digest. Not tenant-scoped: the key is what
    /// tells us the tenant.
    pub async fn find_active_api_key(
        &self,
        digest: &[u8; 32],
    ) -> Result<Option<ActiveKey>, StoreError> {
        #[derive(FromRow)]
        struct Row {
            #[sqlx(flatten)]
            key: KeyRow,
            tenant_name: String,
        }
        let row: Option<Row> = sqlx::query_as(&format!(
            "SELECT {KEY_COLUMNS}, t.name AS tenant_name \
             FROM api_keys k JOIN tenants t ON t.id = k.tenant_id \
             WHERE k.digest = $1 AND k.revoked_at IS NULL"
        ))
        .bind(digest.as_slice())
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|r| ActiveKey {
            key: r.key.into(),
            tenant_name: r.tenant_name,
        }))
    }

    /// Records that a key was used. Called at most about once a minute per key
    /// (the caller checks `last_used_at`), so it is not a write per request.
    pub async fn touch_api_key(&self, tenant: TenantId, id: ApiKeyId) -> Result<(), StoreError> {
        sqlx::query("UPDATE api_keys SET last_used_at = now() WHERE tenant_id = $1 AND id = $2")
            .bind(tenant.as_uuid())
            .bind(id.as_uuid())
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

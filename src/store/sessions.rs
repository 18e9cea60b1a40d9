//! Browser sessions. The cookie holds a signed token; the row here is what
//! logout revokes, and every pod checks it.

use chrono::{DateTime, Utc};
use sqlx::FromRow;
use uuid::Uuid;

use super::{Store, StoreError};
use crate::domain::ids::{SessionId, TenantId, UserId};

/// A live session, with what a request needs to know about its user.
#[derive(Clone, Debug)]
pub struct ActiveSession {
    pub user_id: UserId,
    pub email: String,
    pub is_admin: bool,
    pub tenant_name: String,
}

impl Store {
    pub async fn create_session(
        &self,
        tenant: TenantId,
        user: UserId,
        expires_at: DateTime<Utc>,
    ) -> Result<SessionId, StoreError> {
        let id = SessionId::new();
        sqlx::query(
            "INSERT INTO sessions (id, tenant_id, user_id, expires_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(id.as_uuid())
        .bind(tenant.as_uuid())
        .bind(user.as_uuid())
        .bind(expires_at)
        .execute(&self.pool)
        .await?;
        Ok(id)
    }

    /// The session if it exists in this tenant, is not revoked and has not expired.
    pub async fn find_active_session(
        &self,
        tenant: TenantId,
        id: SessionId,
    ) -> Result<Option<ActiveSession>, StoreError> {
        #[derive(FromRow)]
        struct Row {
            user_id: Uuid,
            email: String,
            is_admin: bool,
            tenant_name: String,
        }
        let row: Option<Row> = sqlx::query_as(
            "SELECT s.user_id, u.email, u.is_admin, t.name AS tenant_name \
             FROM sessions s JOIN users u ON u.id = s.user_id JOIN tenants t ON t.id = s.tenant_id \
             WHERE s.tenant_id = $1 AND s.id = $2 \
               AND s.revoked_at IS NULL AND s.expires_at > now()",
        )
        .bind(tenant.as_uuid())
        .bind(id.as_uuid())
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|r| ActiveSession {
            user_id: UserId::from_uuid(r.user_id),
            email: r.email,
            is_admin: r.is_admin,
            tenant_name: r.tenant_name,
        }))
    }

    pub async fn revoke_session(
        &self,
        tenant: TenantId,
        id: SessionId,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE sessions SET revoked_at = coalesce(revoked_at, now()) \
             WHERE tenant_id = $1 AND id = $2",
        )
        .bind(tenant.as_uuid())
        .bind(id.as_uuid())
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }
}

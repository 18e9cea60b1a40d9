//! Tenants and their users.

use chrono::{DateTime, Utc};
use sqlx::FromRow;
use uuid::Uuid;

use super::{Store, StoreError, conflict_on_unique};
use crate::domain::ids::{TenantId, UserId};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tenant {
    pub id: TenantId,
    pub name: String,
    pub created_at: DateTime<Utc>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    pub id: UserId,
    pub tenant_id: TenantId,
    pub email: String,
    pub is_admin: bool,
    pub created_at: DateTime<Utc>,
}

/// What login needs to check a password: the user, their tenant, the stored hash.
#[derive(Clone, Debug)]
pub struct LoginCandidate {
    pub user: User,
    pub tenant_name: String,
    pub password_hash: String,
}

#[derive(FromRow)]
struct TenantRow {
    id: Uuid,
    name: String,
    created_at: DateTime<Utc>,
}

impl From<TenantRow> for Tenant {
    fn from(r: TenantRow) -> Self {
        Self {
            id: TenantId::from_uuid(r.id),
            name: r.name,
            created_at: r.created_at,
        }
    }
}

#[derive(FromRow)]
struct UserRow {
    id: Uuid,
    tenant_id: Uuid,
    email: String,
    is_admin: bool,
    created_at: DateTime<Utc>,
}

impl From<UserRow> for User {
    fn from(r: UserRow) -> Self {
        Self {
            id: UserId::from_uuid(r.id),
            tenant_id: TenantId::from_uuid(r.tenant_id),
            email: r.email,
            is_admin: r.is_admin,
            created_at: r.created_at,
        }
    }
}

const USER_COLUMNS: &str = "id, tenant_id, email, is_admin, created_at";

impl Store {
    /// Creates a tenant and its first admin user in one transaction, so a tenant
    /// never exists without someone who can sign in to it.
    pub async fn create_tenant_with_admin(
        &self,
        name: &str,
        admin_email: &str,
        admin_password_hash: &str,
    ) -> Result<(Tenant, User), StoreError> {
        let mut tx = self.pool.begin().await?;
        let tenant: TenantRow = sqlx::query_as(
            "INSERT INTO tenants (id, name) VALUES ($1, $2) RETURNING id, name, created_at",
        )
        .bind(TenantId::new().as_uuid())
        .bind(name)
        .fetch_one(&mut *tx)
        .await
        .map_err(conflict_on_unique("a tenant with this name"))?;
        let user: UserRow = sqlx::query_as(&format!(
            "INSERT INTO users (id, tenant_id, email, password_hash, is_admin) \
             VALUES ($1, $2, $3, $4, true) RETURNING {USER_COLUMNS}"
        ))
        .bind(UserId::new().as_uuid())
        .bind(tenant.id)
        .bind(admin_email)
        .bind(admin_password_hash)
        .fetch_one(&mut *tx)
        .await
        .map_err(conflict_on_unique("a user with this email"))?;
        tx.commit().await?;
        Ok((tenant.into(), user.into()))
    }

    /// Finds a tenant by id or by name. Not tenant-scoped: for the admin CLI only.
    pub async fn find_tenant_by_name_or_id(
        &self,
        name_or_id: &str,
    ) -> Result<Option<Tenant>, StoreError> {
        let as_id = name_or_id.parse::<Uuid>().ok();
        let row: Option<TenantRow> = sqlx::query_as(
            "SELECT id, name, created_at FROM tenants \
             WHERE name = $1 OR id = $2 ORDER BY (id = $2) DESC LIMIT 1",
        )
        .bind(name_or_id)
        .bind(as_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(Into::into))
    }

    pub async fn get_tenant(&self, tenant: TenantId) -> Result<Option<Tenant>, StoreError> {
        let row: Option<TenantRow> =
            sqlx::query_as("SELECT id, name, created_at FROM tenants WHERE id = $1")
                .bind(tenant.as_uuid())
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.map(Into::into))
    }

    /// The user with this email, whatever their tenant: login is what discovers
    /// the tenant, so this lookup cannot be scoped by one.
    pub async fn find_login_candidate(
        &self,
        email: &str,
    ) -> Result<Option<LoginCandidate>, StoreError> {
        #[derive(FromRow)]
        struct Row {
            #[sqlx(flatten)]
            user: UserRow,
            tenant_name: String,
            password_hash: String,
        }
        let row: Option<Row> = sqlx::query_as(
            "SELECT u.id, u.tenant_id, u.email, u.is_admin, u.created_at, \
                    t.name AS tenant_name, u.password_hash \
             FROM users u JOIN tenants t ON t.id = u.tenant_id \
             WHERE lower(u.email) = lower($1)",
        )
        .bind(email)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|r| LoginCandidate {
            user: r.user.into(),
            tenant_name: r.tenant_name,
            password_hash: r.password_hash,
        }))
    }

    pub async fn create_user(
        &self,
        tenant: TenantId,
        email: &str,
        password_hash: &str,
        is_admin: bool,
    ) -> Result<User, StoreError> {
        let row: UserRow = sqlx::query_as(&format!(
            "INSERT INTO users (id, tenant_id, email, password_hash, is_admin) \
             VALUES ($1, $2, $3, $4, $5) RETURNING {USER_COLUMNS}"
        ))
        .bind(UserId::new().as_uuid())
        .bind(tenant.as_uuid())
        .bind(email)
        .bind(password_hash)
        .bind(is_admin)
        .fetch_one(&self.pool)
        .await
        .map_err(conflict_on_unique("a user with this email"))?;
        Ok(row.into())
    }

    pub async fn list_users(&self, tenant: TenantId) -> Result<Vec<User>, StoreError> {
        let rows: Vec<UserRow> = sqlx::query_as(&format!(
            "SELECT {USER_COLUMNS} FROM users WHERE tenant_id = $1 ORDER BY created_at, id"
        ))
        .bind(tenant.as_uuid())
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(Into::into).collect())
    }

    pub async fn get_user(&self, tenant: TenantId, id: UserId) -> Result<Option<User>, StoreError> {
        let row: Option<UserRow> = sqlx::query_as(&format!(
            "SELECT {USER_COLUMNS} FROM users WHERE tenant_id = $1 AND id = $2"
        ))
        .bind(tenant.as_uuid())
        .bind(id.as_uuid())
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(Into::into))
    }

    /// Deletes a user (their sessions go with them). False when no such user in this tenant.
    pub async fn delete_user(&self, tenant: TenantId, id: UserId) -> Result<bool, StoreError> {
        let done = sqlx::query("DELETE FROM users WHERE tenant_id = $1 AND id = $2")
            .bind(tenant.as_uuid())
            .bind(id.as_uuid())
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Sets the password of the user with this email in this tenant, creating the
    /// user (as an admin) when absent. Used by dev mode to keep its printed
    /// credentials true across restarts.
    pub async fn reset_user_password(
        &self,
        tenant: TenantId,
        email: &str,
        password_hash: &str,
    ) -> Result<(), StoreError> {
        let updated = sqlx::query(
            "UPDATE users SET password_hash = $3 WHERE tenant_id = $1 AND lower(email) = lower($2)",
        )
        .bind(tenant.as_uuid())
        .bind(email)
        .bind(password_hash)
        .execute(&self.pool)
        .await?;
        if updated.rows_affected() == 0 {
            self.create_user(tenant, email, password_hash, true).await?;
        }
        Ok(())
    }
}

//! Input files: uploaded directly (ready at once) or fetched from a URL in the
//! background (pending until it lands or fails).

use chrono::{DateTime, Utc};
use sqlx::FromRow;
use uuid::Uuid;

use super::events::{self, StoredEvent};
use super::{Store, StoreError, conflict_on_unique};
use crate::domain::events::InputFacts;
use crate::domain::ids::{InputId, TenantId};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InputStatus {
    Pending,
    Ready,
    Failed,
}

impl InputStatus {
    pub fn as_str(&self) -> &'static str {
        match self {
            InputStatus::Pending => "pending",
            InputStatus::Ready => "ready",
            InputStatus::Failed => "failed",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Input {
    pub id: InputId,
    pub tenant_id: TenantId,
    pub status: InputStatus,
    /// The name jobs refer to it by (what ComfyUI's LoadImage sees).
    pub filename: String,
    pub content_type: Option<String>,
    pub object_key: Option<String>,
    pub size_bytes: Option<i64>,
    pub source_url: Option<String>,
    pub error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(FromRow)]
struct InputRow {
    id: Uuid,
    tenant_id: Uuid,
    status: String,
    filename: String,
    content_type: Option<String>,
    object_key: Option<String>,
    size_bytes: Option<i64>,
    source_url: Option<String>,
    error: Option<String>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

impl From<InputRow> for Input {
    fn from(r: InputRow) -> Self {
        Self {
            id: InputId::from_uuid(r.id),
            tenant_id: TenantId::from_uuid(r.tenant_id),
            status: match r.status.as_str() {
                "ready" => InputStatus::Ready,
                "failed" => InputStatus::Failed,
                _ => InputStatus::Pending,
            },
            filename: r.filename,
            content_type: r.content_type,
            object_key: r.object_key,
            size_bytes: r.size_bytes,
            source_url: r.source_url,
            error: r.error,
            created_at: r.created_at,
            updated_at: r.updated_at,
        }
    }
}

const INPUT_COLUMNS: &str = "id, tenant_id, status, filename, content_type, object_key, \
    size_bytes, source_url, error, created_at, updated_at";

/// A stored file's facts.
pub struct StoredFile<'a> {
    pub filename: &'a str,
    pub content_type: &'a str,
    pub object_key: &'a str,
    pub size_bytes: i64,
}

impl Store {
    /// Records a file already in the object store; appends `input.ready`.
    pub async fn insert_ready_input(
        &self,
        tenant: TenantId,
        file: StoredFile<'_>,
    ) -> Result<(Input, Vec<StoredEvent>), StoreError> {
        let mut tx = self.pool.begin().await?;
        let row: InputRow = sqlx::query_as(&format!(
            "INSERT INTO inputs (id, tenant_id, status, filename, content_type, object_key, size_bytes) \
             VALUES ($1, $2, 'ready', $3, $4, $5, $6) RETURNING {INPUT_COLUMNS}"
        ))
        .bind(InputId::new().as_uuid())
        .bind(tenant.as_uuid())
        .bind(file.filename)
        .bind(file.content_type)
        .bind(file.object_key)
        .bind(file.size_bytes)
        .fetch_one(&mut *tx)
        .await
        .map_err(conflict_on_unique("an input with this filename"))?;
        let input: Input = row.into();
        let facts = InputFacts {
            id: input.id,
            filename: &input.filename,
        };
        let stored = events::append(
            &mut tx,
            tenant,
            &[facts.ready(file.size_bytes, file.content_type)],
        )
        .await?;
        tx.commit().await?;
        Ok((input, stored))
    }

    /// Records an input to be fetched from `source_url`.
    pub async fn insert_pending_input(
        &self,
        tenant: TenantId,
        filename: &str,
        source_url: &str,
    ) -> Result<Input, StoreError> {
        let row: InputRow = sqlx::query_as(&format!(
            "INSERT INTO inputs (id, tenant_id, status, filename, source_url) \
             VALUES ($1, $2, 'pending', $3, $4) RETURNING {INPUT_COLUMNS}"
        ))
        .bind(InputId::new().as_uuid())
        .bind(tenant.as_uuid())
        .bind(filename)
        .bind(source_url)
        .fetch_one(&self.pool)
        .await
        .map_err(conflict_on_unique("an input with this filename"))?;
        Ok(row.into())
    }

    /// Settles a pending input: ready with its file, or failed with a reason.
    pub async fn settle_input(
        &self,
        tenant: TenantId,
        id: InputId,
        outcome: Result<StoredFile<'_>, &str>,
    ) -> Result<Option<(Input, Vec<StoredEvent>)>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let row: Option<InputRow> = match &outcome {
            Ok(file) => {
                sqlx::query_as(&format!(
                    "UPDATE inputs SET status = 'ready', content_type = $3, object_key = $4, \
                     size_bytes = $5, updated_at = now() \
                     WHERE tenant_id = $1 AND id = $2 AND status = 'pending' RETURNING {INPUT_COLUMNS}"
                ))
                .bind(tenant.as_uuid())
                .bind(id.as_uuid())
                .bind(file.content_type)
                .bind(file.object_key)
                .bind(file.size_bytes)
                .fetch_optional(&mut *tx)
                .await?
            }
            Err(reason) => {
                sqlx::query_as(&format!(
                    "UPDATE inputs SET status = 'failed', error = $3, updated_at = now() \
                     WHERE tenant_id = $1 AND id = $2 AND status = 'pending' RETURNING {INPUT_COLUMNS}"
                ))
                .bind(tenant.as_uuid())
                .bind(id.as_uuid())
                .bind(reason)
                .fetch_optional(&mut *tx)
                .await?
            }
        };
        let Some(row) = row else {
            return Ok(None);
        };
        let input: Input = row.into();
        let facts = InputFacts {
            id: input.id,
            filename: &input.filename,
        };
        let event = match &outcome {
            Ok(file) => facts.ready(file.size_bytes, file.content_type),
            Err(reason) => facts.failed(reason),
        };
        let stored = events::append(&mut tx, tenant, &[event]).await?;
        tx.commit().await?;
        Ok(Some((input, stored)))
    }

    pub async fn get_input(
        &self,
        tenant: TenantId,
        id: InputId,
    ) -> Result<Option<Input>, StoreError> {
        let row: Option<InputRow> = sqlx::query_as(&format!(
            "SELECT {INPUT_COLUMNS} FROM inputs WHERE tenant_id = $1 AND id = $2"
        ))
        .bind(tenant.as_uuid())
        .bind(id.as_uuid())
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(Into::into))
    }

    pub async fn find_input_by_filename(
        &self,
        tenant: TenantId,
        filename: &str,
    ) -> Result<Option<Input>, StoreError> {
        let row: Option<InputRow> = sqlx::query_as(&format!(
            "SELECT {INPUT_COLUMNS} FROM inputs WHERE tenant_id = $1 AND filename = $2"
        ))
        .bind(tenant.as_uuid())
        .bind(filename)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(Into::into))
    }

    /// Of these filenames, the ones the tenant has no ready input for.
    pub async fn missing_inputs(
        &self,
        tenant: TenantId,
        filenames: &[String],
    ) -> Result<Vec<String>, StoreError> {
        if filenames.is_empty() {
            return Ok(Vec::new());
        }
        let present: Vec<(String,)> = sqlx::query_as(
            "SELECT filename FROM inputs WHERE tenant_id = $1 AND status = 'ready' AND filename = ANY($2)",
        )
        .bind(tenant.as_uuid())
        .bind(filenames)
        .fetch_all(&self.pool)
        .await?;
        Ok(filenames
            .iter()
            .filter(|f| !present.iter().any(|(p,)| p == *f))
            .cloned()
            .collect())
    }

    pub async fn list_inputs(
        &self,
        tenant: TenantId,
        limit: i64,
    ) -> Result<Vec<Input>, StoreError> {
        let rows: Vec<InputRow> = sqlx::query_as(&format!(
            "SELECT {INPUT_COLUMNS} FROM inputs WHERE tenant_id = $1 ORDER BY created_at DESC, id DESC LIMIT $2"
        ))
        .bind(tenant.as_uuid())
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(Into::into).collect())
    }
}

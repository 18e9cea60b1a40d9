//! Files jobs produced. Written by workers when a job completes (in the same
//! transaction as the completion), read by every surface that shows results.

use chrono::{DateTime, Utc};
use sqlx::FromRow;
use uuid::Uuid;

use super::{Store, StoreError};
use crate::domain::ids::{JobId, OutputId, TenantId};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutputRecord {
    pub id: OutputId,
    pub tenant_id: TenantId,
    pub job_id: JobId,
    pub node_id: String,
    /// image, video or file.
    pub kind: String,
    pub filename: String,
    pub subfolder: String,
    pub content_type: String,
    pub object_key: String,
    pub size_bytes: i64,
    pub created_at: DateTime<Utc>,
}

#[derive(FromRow)]
struct OutputRow {
    id: Uuid,
    tenant_id: Uuid,
    job_id: Uuid,
    node_id: String,
    kind: String,
    filename: String,
    subfolder: String,
    content_type: String,
    object_key: String,
    size_bytes: i64,
    created_at: DateTime<Utc>,
}

impl From<OutputRow> for OutputRecord {
    fn from(r: OutputRow) -> Self {
        Self {
            id: OutputId::from_uuid(r.id),
            tenant_id: TenantId::from_uuid(r.tenant_id),
            job_id: JobId::from_uuid(r.job_id),
            node_id: r.node_id,
            kind: r.kind,
            filename: r.filename,
            subfolder: r.subfolder,
            content_type: r.content_type,
            object_key: r.object_key,
            size_bytes: r.size_bytes,
            created_at: r.created_at,
        }
    }
}

const OUTPUT_COLUMNS: &str = "id, tenant_id, job_id, node_id, kind, filename, subfolder, \
    content_type, object_key, size_bytes, created_at";

impl Store {
    /// A job's outputs in the order they were produced.
    pub async fn list_outputs(
        &self,
        tenant: TenantId,
        job: JobId,
    ) -> Result<Vec<OutputRecord>, StoreError> {
        let rows: Vec<OutputRow> = sqlx::query_as(&format!(
            "SELECT {OUTPUT_COLUMNS} FROM job_outputs WHERE tenant_id = $1 AND job_id = $2 \
             ORDER BY created_at, id"
        ))
        .bind(tenant.as_uuid())
        .bind(job.as_uuid())
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(Into::into).collect())
    }

    /// The output with this name in this subfolder, among the tenant's jobs
    /// (ComfyUI's `/view?type=output` addressing).
    pub async fn find_output_by_name(
        &self,
        tenant: TenantId,
        subfolder: &str,
        filename: &str,
    ) -> Result<Option<OutputRecord>, StoreError> {
        let row: Option<OutputRow> = sqlx::query_as(&format!(
            "SELECT {OUTPUT_COLUMNS} FROM job_outputs \
             WHERE tenant_id = $1 AND subfolder = $2 AND filename = $3 \
             ORDER BY created_at DESC LIMIT 1"
        ))
        .bind(tenant.as_uuid())
        .bind(subfolder)
        .bind(filename)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(Into::into))
    }
}

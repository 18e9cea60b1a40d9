//! The durable event log.
//!
//! Ids come from one identity sequence, but resuming clients read per tenant with
//! `id > since`; a transaction that took a lower id and committed later would be
//! skipped by such a reader. Appends therefore take a per-tenant advisory lock held
//! to commit, so within a tenant ids become visible in increasing order.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{FromRow, Postgres, Transaction};
use uuid::Uuid;

use super::{Store, StoreError};
use crate::domain::events::NewEvent;
use crate::domain::ids::{JobId, TenantId};

/// An event as stored: the seed-000 event object plus its tenant.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredEvent {
    pub id: i64,
    pub tenant_id: TenantId,
    pub kind: String,
    pub severity: String,
    pub message: String,
    pub data: Value,
    pub job_id: Option<JobId>,
    pub created_at: DateTime<Utc>,
    /// The tenant's event just before this one in the log; known when the event
    /// was just appended (0 for a tenant's first), `None` when read back.
    pub prev_id: Option<i64>,
}

#[derive(FromRow)]
struct EventRow {
    id: i64,
    tenant_id: Uuid,
    #[sqlx(rename = "type")]
    kind: String,
    severity: String,
    message: String,
    data: Value,
    job_id: Option<Uuid>,
    created_at: DateTime<Utc>,
    #[sqlx(default)]
    prev_id: Option<i64>,
}

impl From<EventRow> for StoredEvent {
    fn from(r: EventRow) -> Self {
        Self {
            id: r.id,
            tenant_id: TenantId::from_uuid(r.tenant_id),
            kind: r.kind,
            severity: r.severity,
            message: r.message,
            data: r.data,
            job_id: r.job_id.map(JobId::from_uuid),
            created_at: r.created_at,
            prev_id: r.prev_id,
        }
    }
}

/// Which events to read.
#[derive(Clone, Debug, Default)]
pub struct EventQuery {
    /// Only events after this id, oldest first. Without it: the newest `limit`.
    pub since: Option<i64>,
    /// Exact type (`job.completed`) or a prefix ending in `.` (`job.`) to match `job.*`.
    pub kind: Option<KindFilter>,
    pub job: Option<JobId>,
    pub limit: i64,
}

#[derive(Clone, Debug)]
pub enum KindFilter {
    Exact(String),
    Prefix(String),
}

const EVENT_COLUMNS: &str = "id, tenant_id, type, severity, message, data, job_id, created_at";

/// Appends events inside the caller's transaction (the one that made the change),
/// in the order given, in one statement whatever their number.
pub(super) async fn append(
    tx: &mut Transaction<'_, Postgres>,
    tenant: TenantId,
    events: &[NewEvent],
) -> Result<Vec<StoredEvent>, StoreError> {
    if events.is_empty() {
        return Ok(Vec::new());
    }
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1::text, 7))")
        .bind(tenant.as_uuid())
        .execute(&mut **tx)
        .await?;
    let kinds: Vec<&str> = events.iter().map(|e| e.kind).collect();
    let severities: Vec<&str> = events.iter().map(|e| e.severity.as_str()).collect();
    let messages: Vec<&str> = events.iter().map(|e| e.message.as_str()).collect();
    let data: Vec<&Value> = events.iter().map(|e| &e.data).collect();
    let jobs: Vec<Option<Uuid>> = events.iter().map(|e| e.job.map(|j| j.as_uuid())).collect();
    // Rows are produced in `n` order, so the identity hands out ids in that order.
    // Under the lock, the tenant's newest event so far is the first one's predecessor.
    let rows: Vec<EventRow> = sqlx::query_as(&format!(
        "WITH newest AS (SELECT coalesce(max(id), 0) AS id FROM events WHERE tenant_id = $1), \
         appended AS ( \
            INSERT INTO events (tenant_id, type, severity, message, data, job_id) \
            SELECT $1, e.type, e.severity, e.message, e.data, e.job_id \
            FROM unnest($2::text[], $3::text[], $4::text[], $5::jsonb[], $6::uuid[]) \
                 WITH ORDINALITY AS e(type, severity, message, data, job_id, n) \
            ORDER BY e.n \
            RETURNING {EVENT_COLUMNS}) \
         SELECT appended.*, (SELECT id FROM newest) AS prev_id FROM appended"
    ))
    .bind(tenant.as_uuid())
    .bind(&kinds)
    .bind(&severities)
    .bind(&messages)
    .bind(&data)
    .bind(&jobs)
    .fetch_all(&mut **tx)
    .await?;
    let mut stored: Vec<StoredEvent> = rows.into_iter().map(StoredEvent::from).collect();
    stored.sort_by_key(|e| e.id);
    for i in 1..stored.len() {
        stored[i].prev_id = Some(stored[i - 1].id);
    }
    if stored.len() != events.len() {
        return Err(StoreError::Corrupt(format!(
            "appended {} events, stored {}",
            events.len(),
            stored.len()
        )));
    }
    Ok(stored)
}

impl Store {
    pub async fn list_events(
        &self,
        tenant: TenantId,
        q: &EventQuery,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let (kind_exact, kind_prefix) = match &q.kind {
            None => (None, None),
            Some(KindFilter::Exact(k)) => (Some(k.clone()), None),
            Some(KindFilter::Prefix(p)) => (None, Some(format!("{}%", escape_like(p)))),
        };
        let newest_first = q.since.is_none();
        let rows: Vec<EventRow> = sqlx::query_as(&format!(
            "SELECT {EVENT_COLUMNS} FROM events \
             WHERE tenant_id = $1 \
               AND ($2::bigint IS NULL OR id > $2) \
               AND ($3::text IS NULL OR type = $3) \
               AND ($4::text IS NULL OR type LIKE $4) \
               AND ($5::uuid IS NULL OR job_id = $5) \
             ORDER BY id {} LIMIT $6",
            if newest_first { "DESC" } else { "ASC" }
        ))
        .bind(tenant.as_uuid())
        .bind(q.since)
        .bind(kind_exact)
        .bind(kind_prefix)
        .bind(q.job.map(|j| j.as_uuid()))
        .bind(q.limit)
        .fetch_all(&self.pool)
        .await?;
        let mut events: Vec<StoredEvent> = rows.into_iter().map(Into::into).collect();
        if newest_first {
            events.reverse();
        }
        Ok(events)
    }
}

fn escape_like(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('%', "\\%")
        .replace('_', "\\_")
}

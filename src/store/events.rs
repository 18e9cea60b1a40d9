//! The durable event log.
//!
//! Ids come from one identity sequence, but resuming clients read per tenant with
//! `id > since`; a transaction that took a lower id and committed later would be
//! skipped by such a reader. Appends therefore take a per-tenant advisory lock held
//! to commit, so within a tenant ids become visible in increasing order. The lock is
//! taken by the statement that appends, and appends are the last statement of their
//! transactions: it is held for that statement and the commit only.

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
    let kinds: Vec<&str> = events.iter().map(|e| e.kind).collect();
    let severities: Vec<&str> = events.iter().map(|e| e.severity.as_str()).collect();
    let messages: Vec<&str> = events.iter().map(|e| e.message.as_str()).collect();
    let data: Vec<&Value> = events.iter().map(|e| &e.data).collect();
    let jobs: Vec<Option<Uuid>> = events.iter().map(|e| e.job.map(|j| j.as_uuid())).collect();
    // The tenant's lock, the newest id under it and the insert are one round trip
    // (`append_events`, in the migrations): the lock is held to commit, and a round
    // trip made while holding it is time every other writer of the tenant waits.
    let rows: Vec<EventRow> = sqlx::query_as(&format!(
        "SELECT {EVENT_COLUMNS}, prev_id FROM append_events($1, $2, $3, $4, $5, $6)"
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

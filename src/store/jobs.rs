//! Jobs: submission (with idempotency), reads with their live queue position,
//! listing with cursor pagination, and cancellation. Every state change appends its
//! event in the same transaction.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::FromRow;
use uuid::Uuid;

use super::events::{self, StoredEvent};
use super::{Store, StoreError};
use crate::domain::events::JobFacts;
use crate::domain::ids::{JobId, TenantId};
use crate::domain::job::{FailureCause, JobStatus};

/// A job as clients see it.
#[derive(Clone, Debug, PartialEq)]
pub struct Job {
    pub id: JobId,
    pub tenant_id: TenantId,
    pub status: JobStatus,
    pub workflow_id: Option<String>,
    pub graph: Value,
    pub params: Value,
    pub seeds: Value,
    pub client_id: Option<String>,
    pub extra_data: Value,
    pub priority: i32,
    pub required_nodes: Vec<String>,
    pub required_models: Vec<String>,
    pub input_files: Vec<String>,
    /// Longest the job may run; the worker's own limit applies when absent.
    pub time_limit_secs: Option<i32>,
    pub cause: Option<FailureCause>,
    pub attempts: i32,
    pub created_at: DateTime<Utc>,
    pub queued_at: Option<DateTime<Utc>>,
    pub started_at: Option<DateTime<Utc>>,
    pub completed_at: Option<DateTime<Utc>>,
    pub cancel_requested_at: Option<DateTime<Utc>>,
    /// 1-based position among the tenant's queued jobs in claim order; `None`
    /// unless queued.
    pub queue_number: Option<i64>,
    /// ComfyUI's `number`, for prompts posted through the ComfyUI dialect.
    pub comfy_number: Option<f64>,
}

/// What a submit stores.
#[derive(Clone, Debug)]
pub struct NewJob {
    pub id: JobId,
    pub workflow_id: Option<String>,
    pub graph: Value,
    pub params: Value,
    pub seeds: Value,
    pub client_id: Option<String>,
    pub extra_data: Value,
    pub priority: i32,
    pub required_nodes: Vec<String>,
    pub required_models: Vec<String>,
    pub input_files: Vec<String>,
    pub time_limit_secs: Option<i32>,
    pub comfy_number: Option<f64>,
    /// With `request_digest`: a retried submit returns the original job.
    pub idempotency_key: Option<String>,
    pub request_digest: Option<[u8; 32]>,
}

impl NewJob {
    /// A raw graph at the default priority: no workflow, inputs, limits or
    /// idempotency key (what the bench's producer and store tests submit).
    pub fn raw(graph: Value, required_nodes: Vec<String>) -> Self {
        Self {
            id: JobId::new(),
            workflow_id: None,
            graph,
            params: Value::Object(Default::default()),
            seeds: Value::Object(Default::default()),
            client_id: None,
            extra_data: Value::Object(Default::default()),
            priority: 0,
            required_nodes,
            required_models: Vec::new(),
            input_files: Vec::new(),
            time_limit_secs: None,
            comfy_number: None,
            idempotency_key: None,
            request_digest: None,
        }
    }
}

/// The result of a submit.
#[derive(Debug)]
pub enum Submitted {
    /// A new job, queued, with the events its creation appended.
    Created(Job, Vec<StoredEvent>),
    /// The same idempotency key and the same request: the original job.
    Replayed(Job),
    /// The same idempotency key with a different request.
    KeyReused,
}

/// The result of a cancel request.
#[derive(Debug)]
pub enum Cancelled {
    /// It was waiting; it is cancelled now.
    Now(Job, Vec<StoredEvent>),
    /// It is running; the worker was asked to interrupt it.
    Requested(Job),
    /// It had already finished; nothing changed.
    AlreadyFinished(Job),
}

#[derive(FromRow)]
pub(super) struct JobRow {
    id: Uuid,
    tenant_id: Uuid,
    status: String,
    workflow_id: Option<String>,
    graph: Value,
    params: Value,
    seeds: Value,
    client_id: Option<String>,
    extra_data: Value,
    priority: i32,
    required_nodes: Vec<String>,
    required_models: Vec<String>,
    input_files: Vec<String>,
    time_limit_secs: Option<i32>,
    cause: Option<Value>,
    attempts: i32,
    created_at: DateTime<Utc>,
    queued_at: Option<DateTime<Utc>>,
    started_at: Option<DateTime<Utc>>,
    completed_at: Option<DateTime<Utc>>,
    cancel_requested_at: Option<DateTime<Utc>>,
    queue_number: Option<i64>,
    comfy_number: Option<f64>,
}

impl TryFrom<JobRow> for Job {
    type Error = StoreError;

    fn try_from(r: JobRow) -> Result<Self, StoreError> {
        let status = r
            .status
            .parse()
            .map_err(|e| StoreError::Corrupt(format!("job {}: {e}", r.id)))?;
        Ok(Self {
            id: JobId::from_uuid(r.id),
            tenant_id: TenantId::from_uuid(r.tenant_id),
            status,
            workflow_id: r.workflow_id,
            graph: r.graph,
            params: r.params,
            seeds: r.seeds,
            client_id: r.client_id,
            extra_data: r.extra_data,
            priority: r.priority,
            required_nodes: r.required_nodes,
            required_models: r.required_models,
            input_files: r.input_files,
            time_limit_secs: r.time_limit_secs,
            cause: r.cause.and_then(|c| serde_json::from_value(c).ok()),
            attempts: r.attempts,
            created_at: r.created_at,
            queued_at: r.queued_at,
            started_at: r.started_at,
            completed_at: r.completed_at,
            cancel_requested_at: r.cancel_requested_at,
            queue_number: r.queue_number,
            comfy_number: r.comfy_number,
        })
    }
}

/// The job columns of a `FROM jobs j` query, without the queue position.
macro_rules! job_columns {
    () => {
        "j.id, j.tenant_id, j.status, j.workflow_id, j.graph, j.params, \
        j.seeds, j.client_id, j.extra_data, j.priority, j.required_nodes, j.required_models, \
        j.input_files, j.time_limit_secs, j.cause, j.attempts, j.created_at, j.queued_at, j.started_at, \
        j.completed_at, j.cancel_requested_at, j.comfy_number"
    };
}

/// What an `UPDATE jobs AS j … RETURNING` gives back to make a [`Job`] of the row as
/// changed, sparing a read after the write. It is for a job leaving the queue or
/// finishing: such a job has no queue position.
pub(super) const JOB_RETURNING: &str = concat!(job_columns!(), ", NULL::bigint AS queue_number");

/// The job columns plus its live queue position, for a `FROM jobs j` query.
const JOB_SELECT: &str = concat!(
    "SELECT ",
    job_columns!(),
    ", CASE WHEN j.status = 'queued' THEN ( \
        SELECT count(*) FROM jobs q \
        WHERE q.tenant_id = j.tenant_id AND q.status = 'queued' \
          AND (q.priority > j.priority OR (q.priority = j.priority \
               AND (q.queued_at, q.id) <= (j.queued_at, j.id)))) \
    END AS queue_number \
    FROM jobs j"
);

/// The same for the jobs of tenant `$1` with the ids `$2`: the queue is ranked once
/// for all of them (counting per job would read the queue once per job).
/// `MATERIALIZED`: a plan that re-ranks the queue per joined row must not be
/// possible (one was chosen while the table was still small).
const JOBS_BY_IDS_SELECT: &str = concat!(
    "WITH queue AS MATERIALIZED ( \
        SELECT id, row_number() OVER (ORDER BY priority DESC, queued_at, id) AS place \
        FROM jobs WHERE tenant_id = $1 AND status = 'queued'), \
     wanted AS MATERIALIZED (SELECT id, place FROM queue WHERE id = ANY($2)) \
     SELECT ",
    job_columns!(),
    ", CASE WHEN j.status = 'queued' THEN w.place END AS queue_number \
     FROM jobs j LEFT JOIN wanted w ON w.id = j.id \
     WHERE j.tenant_id = $1 AND j.id = ANY($2)"
);

/// Where a page of a listing starts: after this (created_at, id).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JobCursor {
    pub created_at: DateTime<Utc>,
    pub id: JobId,
}

impl Store {
    /// One submit in its own transaction (see `intake` for the batched path).
    pub(super) async fn submit_one_job(
        &self,
        tenant: TenantId,
        new: NewJob,
    ) -> Result<Submitted, StoreError> {
        let mut tx = self.pool.begin().await?;
        let inserted = insert_job(tenant, &new)
            .execute(&mut *tx)
            .await
            // The id itself can collide only when a client chose it (a ComfyUI prompt_id).
            .map_err(super::conflict_on_unique("job id"))?;
        if inserted.rows_affected() == 0 {
            // The key was used before: same request → same job; otherwise refuse.
            tx.rollback().await?;
            let (id, digest): (Uuid, Option<Vec<u8>>) = sqlx::query_as(
                "SELECT id, request_digest FROM jobs WHERE tenant_id = $1 AND idempotency_key = $2",
            )
            .bind(tenant.as_uuid())
            .bind(&new.idempotency_key)
            .fetch_one(&self.pool)
            .await?;
            if digest.as_deref() != new.request_digest.as_ref().map(|d| d.as_slice()) {
                return Ok(Submitted::KeyReused);
            }
            let job = self
                .get_job(tenant, JobId::from_uuid(id))
                .await?
                .ok_or(StoreError::Corrupt(format!("job {id} vanished")))?;
            return Ok(Submitted::Replayed(job));
        }
        let job = fetch_job(&mut tx, tenant, new.id).await?;
        let facts = JobFacts {
            id: job.id,
            workflow_id: job.workflow_id.as_deref(),
        };
        let stored = events::append(
            &mut tx,
            tenant,
            &[facts.accepted(), facts.queued(job.queue_number)],
        )
        .await?;
        tx.commit().await?;
        Ok(Submitted::Created(job, stored))
    }

    pub async fn get_job(&self, tenant: TenantId, id: JobId) -> Result<Option<Job>, StoreError> {
        let row: Option<JobRow> = sqlx::query_as(&format!(
            "{JOB_SELECT} WHERE j.tenant_id = $1 AND j.id = $2"
        ))
        .bind(tenant.as_uuid())
        .bind(id.as_uuid())
        .fetch_optional(&self.pool)
        .await?;
        row.map(Job::try_from).transpose()
    }

    /// The tenant's jobs, newest first, optionally only those in `statuses`.
    pub async fn list_jobs(
        &self,
        tenant: TenantId,
        statuses: &[JobStatus],
        after: Option<JobCursor>,
        limit: i64,
    ) -> Result<Vec<Job>, StoreError> {
        let statuses: Vec<&str> = statuses.iter().map(|s| s.as_str()).collect();
        let rows: Vec<JobRow> = sqlx::query_as(&format!(
            "{JOB_SELECT} WHERE j.tenant_id = $1 \
               AND (cardinality($2::text[]) = 0 OR j.status = ANY($2)) \
               AND ($3::timestamptz IS NULL OR (j.created_at, j.id) < ($3, $4)) \
             ORDER BY j.created_at DESC, j.id DESC LIMIT $5"
        ))
        .bind(tenant.as_uuid())
        .bind(&statuses)
        .bind(after.map(|c| c.created_at))
        .bind(after.map(|c| c.id.as_uuid()))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(Job::try_from).collect()
    }

    /// The tenant's waiting and running jobs in claim order (running first).
    /// The tenant's next ComfyUI prompt number (0, 1, 2, …), as a ComfyUI server
    /// counts the prompts posted to it.
    pub async fn next_comfy_prompt_number(&self, tenant: TenantId) -> Result<i64, StoreError> {
        let (n,): (i64,) = sqlx::query_as(
            "UPDATE tenants SET comfy_prompt_count = comfy_prompt_count + 1 \
             WHERE id = $1 RETURNING comfy_prompt_count - 1",
        )
        .bind(tenant.as_uuid())
        .fetch_one(&self.pool)
        .await?;
        Ok(n)
    }

    /// How many of the tenant's jobs are pending or running (ComfyUI's `queue_remaining`).
    pub async fn count_active_jobs(&self, tenant: TenantId) -> Result<i64, StoreError> {
        let (n,): (i64,) = sqlx::query_as(
            "SELECT count(*) FROM jobs WHERE tenant_id = $1 \
             AND status IN ('accepted', 'uploaded', 'queued', 'running')",
        )
        .bind(tenant.as_uuid())
        .fetch_one(&self.pool)
        .await?;
        Ok(n)
    }

    pub async fn active_jobs(&self, tenant: TenantId) -> Result<Vec<Job>, StoreError> {
        let rows: Vec<JobRow> = sqlx::query_as(&format!(
            "{JOB_SELECT} WHERE j.tenant_id = $1 AND j.status IN ('accepted', 'uploaded', 'queued', 'running') \
             ORDER BY (j.status = 'running') DESC, j.priority DESC, j.queued_at, j.id"
        ))
        .bind(tenant.as_uuid())
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(Job::try_from).collect()
    }

    pub async fn cancel_job(
        &self,
        tenant: TenantId,
        id: JobId,
    ) -> Result<Option<Cancelled>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let status: Option<(String,)> =
            sqlx::query_as("SELECT status FROM jobs WHERE tenant_id = $1 AND id = $2 FOR UPDATE")
                .bind(tenant.as_uuid())
                .bind(id.as_uuid())
                .fetch_optional(&mut *tx)
                .await?;
        let Some((status,)) = status else {
            return Ok(None);
        };
        let status: JobStatus = status
            .parse()
            .map_err(|e| StoreError::Corrupt(format!("job {id}: {e}")))?;
        if status.is_terminal() {
            tx.rollback().await?;
            let job = self
                .get_job(tenant, id)
                .await?
                .ok_or(StoreError::Corrupt(format!("job {id} vanished")))?;
            return Ok(Some(Cancelled::AlreadyFinished(job)));
        }
        if status == JobStatus::Running {
            sqlx::query(
                "UPDATE jobs SET cancel_requested_at = coalesce(cancel_requested_at, now()), \
                 updated_at = now() WHERE tenant_id = $1 AND id = $2",
            )
            .bind(tenant.as_uuid())
            .bind(id.as_uuid())
            .execute(&mut *tx)
            .await?;
            let job = fetch_job(&mut tx, tenant, id).await?;
            tx.commit().await?;
            return Ok(Some(Cancelled::Requested(job)));
        }
        debug_assert!(status.can_become(JobStatus::Cancelled));
        sqlx::query(
            "UPDATE jobs SET status = 'cancelled', completed_at = now(), updated_at = now() \
             WHERE tenant_id = $1 AND id = $2",
        )
        .bind(tenant.as_uuid())
        .bind(id.as_uuid())
        .execute(&mut *tx)
        .await?;
        let job = fetch_job(&mut tx, tenant, id).await?;
        let facts = JobFacts {
            id,
            workflow_id: job.workflow_id.as_deref(),
        };
        let stored = events::append(&mut tx, tenant, &[facts.cancelled()]).await?;
        tx.commit().await?;
        Ok(Some(Cancelled::Now(job, stored)))
    }
}

/// Inserts `new` as a queued job. A repeated idempotency key skips the insert (the
/// caller answers with the original job); a taken id is an error.
pub(super) fn insert_job(
    tenant: TenantId,
    new: &NewJob,
) -> sqlx::query::Query<'_, sqlx::Postgres, sqlx::postgres::PgArguments> {
    let sql = "INSERT INTO jobs (id, tenant_id, status, workflow_id, graph, params, seeds, client_id, \
            extra_data, priority, required_nodes, required_models, input_files, \
            idempotency_key, request_digest, time_limit_secs, comfy_number, queued_at) \
         VALUES ($1, $2, 'queued', $3, $4::text::json, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, now()) \
         ON CONFLICT (tenant_id, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING";
    sqlx::query(sql)
        .bind(new.id.as_uuid())
        .bind(tenant.as_uuid())
        .bind(&new.workflow_id)
        // As text: a `Value` binds as jsonb, which would re-sort the prompt's nodes.
        .bind(new.graph.to_string())
        .bind(&new.params)
        .bind(&new.seeds)
        .bind(&new.client_id)
        .bind(&new.extra_data)
        .bind(new.priority)
        .bind(&new.required_nodes)
        .bind(&new.required_models)
        .bind(&new.input_files)
        .bind(&new.idempotency_key)
        .bind(new.request_digest.as_ref().map(|d| d.as_slice()))
        .bind(new.time_limit_secs)
        .bind(new.comfy_number)
}

/// Inserts many queued jobs in one statement, skipping any that collides with an
/// existing row (or an earlier one of the same statement). Returns the ids inserted.
pub(super) async fn insert_jobs(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    tenant: TenantId,
    jobs: &[&NewJob],
) -> Result<std::collections::HashSet<Uuid>, StoreError> {
    let strings = |values: &[String]| Value::from(values.to_vec());
    let rows: Vec<(Uuid,)> = sqlx::query_as(
        // Rows in batch order, so `queued_at` ties (one transaction, one `now()`)
        // keep the order the submits arrived in through their time-ordered ids.
        "INSERT INTO jobs (id, tenant_id, status, workflow_id, graph, params, seeds, client_id, \
            extra_data, priority, required_nodes, required_models, input_files, \
            idempotency_key, request_digest, time_limit_secs, comfy_number, queued_at) \
         SELECT n.id, $1, 'queued', n.workflow_id, n.graph::json, n.params, n.seeds, n.client_id, \
            n.extra_data, n.priority, \
            ARRAY(SELECT jsonb_array_elements_text(n.required_nodes)), \
            ARRAY(SELECT jsonb_array_elements_text(n.required_models)), \
            ARRAY(SELECT jsonb_array_elements_text(n.input_files)), \
            n.idempotency_key, n.request_digest, n.time_limit_secs, n.comfy_number, now() \
         FROM unnest($2::uuid[], $3::text[], $4::text[], $5::jsonb[], $6::jsonb[], $7::text[], \
                     $8::jsonb[], $9::int4[], $10::jsonb[], $11::jsonb[], $12::jsonb[], $13::text[], \
                     $14::bytea[], $15::int4[], $16::float8[]) \
              WITH ORDINALITY AS n(id, workflow_id, graph, params, seeds, client_id, extra_data, \
                  priority, required_nodes, required_models, input_files, idempotency_key, \
                  request_digest, time_limit_secs, comfy_number, ord) \
         ORDER BY n.ord \
         ON CONFLICT DO NOTHING \
         RETURNING id",
    )
    .bind(tenant.as_uuid())
    .bind(jobs.iter().map(|j| j.id.as_uuid()).collect::<Vec<_>>())
    .bind(jobs.iter().map(|j| j.workflow_id.clone()).collect::<Vec<_>>())
    // As text: a `Value` binds as jsonb, which would re-sort the prompt's nodes.
    .bind(jobs.iter().map(|j| j.graph.to_string()).collect::<Vec<_>>())
    .bind(jobs.iter().map(|j| &j.params).collect::<Vec<_>>())
    .bind(jobs.iter().map(|j| &j.seeds).collect::<Vec<_>>())
    .bind(jobs.iter().map(|j| j.client_id.clone()).collect::<Vec<_>>())
    .bind(jobs.iter().map(|j| &j.extra_data).collect::<Vec<_>>())
    .bind(jobs.iter().map(|j| j.priority).collect::<Vec<_>>())
    .bind(jobs.iter().map(|j| strings(&j.required_nodes)).collect::<Vec<_>>())
    .bind(jobs.iter().map(|j| strings(&j.required_models)).collect::<Vec<_>>())
    .bind(jobs.iter().map(|j| strings(&j.input_files)).collect::<Vec<_>>())
    .bind(jobs.iter().map(|j| j.idempotency_key.clone()).collect::<Vec<_>>())
    .bind(
        jobs.iter()
            .map(|j| j.request_digest.map(|d| d.to_vec()))
            .collect::<Vec<_>>(),
    )
    .bind(jobs.iter().map(|j| j.time_limit_secs).collect::<Vec<_>>())
    .bind(jobs.iter().map(|j| j.comfy_number).collect::<Vec<_>>())
    .fetch_all(&mut **tx)
    .await?;
    Ok(rows.into_iter().map(|(id,)| id).collect())
}

/// The tenant's jobs with these ids, by id.
pub(super) async fn fetch_jobs(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    tenant: TenantId,
    ids: &[Uuid],
) -> Result<std::collections::HashMap<Uuid, Job>, StoreError> {
    let rows: Vec<JobRow> = sqlx::query_as(JOBS_BY_IDS_SELECT)
        .bind(tenant.as_uuid())
        .bind(ids)
        .fetch_all(&mut **tx)
        .await?;
    rows.into_iter()
        .map(|r| Ok((r.id, Job::try_from(r)?)))
        .collect()
}

pub(super) async fn fetch_job(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    tenant: TenantId,
    id: JobId,
) -> Result<Job, StoreError> {
    let row: JobRow = sqlx::query_as(&format!(
        "{JOB_SELECT} WHERE j.tenant_id = $1 AND j.id = $2"
    ))
    .bind(tenant.as_uuid())
    .bind(id.as_uuid())
    .fetch_one(&mut **tx)
    .await?;
    row.try_into()
}

//! The worker side of jobs: claiming with `FOR UPDATE SKIP LOCKED`, leases, and the
//! terminal transitions. Every write names the worker and checks it still holds the
//! job, so a job whose lease lapsed and was claimed again can never be finished
//! twice: exactly one worker's result counts.

use std::time::Duration;

use serde_json::Value;
use uuid::Uuid;

use super::events::{self, StoredEvent};
use super::jobs::{JOB_RETURNING, Job, JobRow};
use super::{Store, StoreError};
use crate::domain::events::{JobFacts, NewEvent};
use crate::domain::ids::{JobId, OutputId, TenantId, WorkerId};
use crate::domain::job::{FailureCause, JobStatus};

/// What a worker can run.
#[derive(Clone, Debug, Default)]
pub struct Capabilities {
    pub node_classes: Vec<String>,
    pub models: Vec<String>,
}

/// A job a worker now holds.
#[derive(Debug)]
pub struct ClaimedJob {
    pub job: Job,
    pub events: Vec<StoredEvent>,
}

/// A job completed, and the worker's next job if it asked for one and one was there.
#[derive(Debug)]
pub struct Completed {
    pub job: Job,
    pub events: Vec<StoredEvent>,
    pub next: Option<ClaimedJob>,
}

/// Whether a worker still holds a job it is running.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lease {
    Held {
        cancel_requested: bool,
    },
    /// The job was reaped, cancelled or finished elsewhere: stop working on it.
    Lost,
}

/// A file to record with a completed job.
#[derive(Clone, Debug)]
pub struct NewOutput {
    pub node_id: String,
    pub kind: String,
    pub filename: String,
    pub subfolder: String,
    pub content_type: String,
    pub object_key: String,
    pub size_bytes: i64,
}

/// A job moved by the lease reaper.
#[derive(Debug)]
pub struct Reaped {
    pub tenant_id: TenantId,
    pub job_id: JobId,
    pub requeued: bool,
    pub events: Vec<StoredEvent>,
}

/// Where a claim looks for its candidates.
#[derive(Clone, Copy)]
enum CandidateSearch {
    /// The first queued jobs of each tenant, runnable here or not.
    FirstQueued,
    /// Every queued job of each tenant that this worker can run.
    AllRunnable,
}

/// Queued jobs a claim considers per tenant.
const CANDIDATES_PER_TENANT: i64 = 16;

/// The claim: among each tenant's candidates this worker can run, the order is
/// priority, then the place in the tenant's own queue, then the tenant that was
/// served least recently (its head's rank). So concurrent claimers take tenants'
/// heads first and then, rather than idling on a head another claimer has locked,
/// the next job behind it. `$1`/`$2` are the worker's node classes and models.
fn claim_query(search: CandidateSearch) -> String {
    let runnable = "j.required_nodes <@ $1::text[] AND j.required_models <@ $2::text[]";
    let inner = match search {
        CandidateSearch::FirstQueued => String::new(),
        CandidateSearch::AllRunnable => format!("AND {runnable}"),
    };
    format!(
        "WITH RECURSIVE busy(tenant_id) AS ( \
            (SELECT tenant_id FROM jobs WHERE status = 'queued' ORDER BY tenant_id LIMIT 1) \
            UNION ALL \
            SELECT (SELECT q.tenant_id FROM jobs q WHERE q.status = 'queued' \
                    AND q.tenant_id > b.tenant_id ORDER BY q.tenant_id LIMIT 1) \
            FROM busy b WHERE b.tenant_id IS NOT NULL \
         ), candidates AS ( \
            SELECT c.id, c.tenant_id, c.priority, c.queued_at, \
                row_number() OVER (PARTITION BY c.tenant_id \
                    ORDER BY c.priority DESC, c.queued_at, c.id) AS place \
            FROM busy t CROSS JOIN LATERAL ( \
                SELECT j.id, j.tenant_id, j.priority, j.queued_at, j.required_nodes, j.required_models \
                FROM jobs j WHERE j.tenant_id = t.tenant_id AND j.status = 'queued' {inner} \
                ORDER BY j.priority DESC, j.queued_at, j.id LIMIT {CANDIDATES_PER_TENANT}) c \
            WHERE t.tenant_id IS NOT NULL \
              AND c.required_nodes <@ $1::text[] AND c.required_models <@ $2::text[] \
         ), tenant_order AS ( \
            SELECT c.tenant_id, row_number() OVER ( \
                ORDER BY c.priority DESC, s.last_started NULLS FIRST, c.queued_at, c.id) AS rank \
            FROM candidates c LEFT JOIN LATERAL ( \
                SELECT max(r.started_at) AS last_started FROM jobs r \
                WHERE r.tenant_id = c.tenant_id AND r.started_at IS NOT NULL) s ON true \
            WHERE c.place = 1 \
         ) \
         SELECT j.id, j.tenant_id FROM jobs j \
         JOIN candidates c ON c.id = j.id JOIN tenant_order o ON o.tenant_id = c.tenant_id \
         WHERE j.status = 'queued' \
         ORDER BY c.priority DESC, c.place, o.rank \
         LIMIT 1 FOR UPDATE OF j SKIP LOCKED"
    )
}

fn lease_interval(lease: Duration) -> f64 {
    lease.as_secs_f64()
}

impl Store {
    /// Claims the next job this worker can run: highest priority first; among equal
    /// priority, the tenant served least recently (so one tenant's thousand queued
    /// jobs cannot starve another's single job: tenants take turns); then the oldest.
    pub async fn claim_job(
        &self,
        worker: WorkerId,
        caps: &Capabilities,
        lease: Duration,
    ) -> Result<Option<ClaimedJob>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let Some((job, started)) = claim_in(&mut tx, worker, caps, lease).await? else {
            return Ok(None);
        };
        let events = events::append(&mut tx, job.tenant_id, &[started]).await?;
        tx.commit().await?;
        Ok(Some(ClaimedJob { job, events }))
    }

    /// Extends the lease; tells the worker whether it still holds the job and
    /// whether a cancel was asked for.
    pub async fn renew_lease(
        &self,
        worker: WorkerId,
        tenant: TenantId,
        job: JobId,
        lease: Duration,
    ) -> Result<Lease, StoreError> {
        // The worker's heartbeat rides along: a worker busy with a long job is alive.
        let row: Option<(bool,)> = sqlx::query_as(
            "WITH alive AS (UPDATE workers SET last_heartbeat_at = now() WHERE id = $3) \
             UPDATE jobs SET lease_expires_at = now() + make_interval(secs => $4) \
             WHERE tenant_id = $1 AND id = $2 AND worker_id = $3 AND status = 'running' \
             RETURNING cancel_requested_at IS NOT NULL",
        )
        .bind(tenant.as_uuid())
        .bind(job.as_uuid())
        .bind(worker.as_uuid())
        .bind(lease_interval(lease))
        .fetch_optional(&self.pool)
        .await?;
        Ok(match row {
            Some((cancel_requested,)) => Lease::Held { cancel_requested },
            None => Lease::Lost,
        })
    }

    /// Completes a job this worker holds, recording its outputs, in one transaction
    /// with `job.completed`. `None` when the worker no longer held it.
    pub async fn complete_job(
        &self,
        worker: WorkerId,
        tenant: TenantId,
        id: JobId,
        outputs: &[NewOutput],
        outputs_for_event: impl FnOnce(&[(OutputId, &NewOutput)]) -> Value,
    ) -> Result<Option<(Job, Vec<StoredEvent>)>, StoreError> {
        let done = self
            .complete_job_and_claim(worker, tenant, id, outputs, outputs_for_event, None)
            .await?;
        Ok(done.map(|d| (d.job, d.events)))
    }

    /// [`Store::complete_job`], and with `next` the worker's next job claimed in the
    /// same transaction (as [`Store::claim_job`] would right after): one commit, one
    /// hold of the log lock and fewer round trips per job instead of two of each.
    pub async fn complete_job_and_claim(
        &self,
        worker: WorkerId,
        tenant: TenantId,
        id: JobId,
        outputs: &[NewOutput],
        outputs_for_event: impl FnOnce(&[(OutputId, &NewOutput)]) -> Value,
        next: Option<(&Capabilities, Duration)>,
    ) -> Result<Option<Completed>, StoreError> {
        let mut tx = self.pool.begin().await?;
        // Held and finished in one statement: it changes nothing (and the transaction
        // is rolled back) unless this worker still holds the job running.
        let row: Option<JobRow> = sqlx::query_as(&format!(
            "UPDATE jobs AS j SET status = 'completed', cause = NULL, completed_at = now(), \
                lease_expires_at = NULL, updated_at = now() \
             WHERE j.tenant_id = $1 AND j.id = $2 AND j.worker_id = $3 AND j.status = 'running' \
             RETURNING {JOB_RETURNING}"
        ))
        .bind(tenant.as_uuid())
        .bind(id.as_uuid())
        .bind(worker.as_uuid())
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let job = Job::try_from(row)?;
        let mut recorded = Vec::with_capacity(outputs.len());
        for o in outputs {
            let oid = OutputId::new();
            sqlx::query(
                "INSERT INTO job_outputs (id, tenant_id, job_id, node_id, kind, filename, subfolder, \
                    content_type, object_key, size_bytes) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
            )
            .bind(oid.as_uuid())
            .bind(tenant.as_uuid())
            .bind(id.as_uuid())
            .bind(&o.node_id)
            .bind(&o.kind)
            .bind(&o.filename)
            .bind(&o.subfolder)
            .bind(&o.content_type)
            .bind(&o.object_key)
            .bind(o.size_bytes)
            .execute(&mut *tx)
            .await?;
            recorded.push((oid, o));
        }
        let duration = duration_secs(&job);
        let facts = JobFacts {
            id,
            workflow_id: job.workflow_id.as_deref(),
        };
        let completed = facts.completed(duration, outputs_for_event(&recorded));
        let claimed = match next {
            Some((caps, lease)) => claim_in(&mut tx, worker, caps, lease).await?,
            None => None,
        };
        let (events, next) = match claimed {
            None => (events::append(&mut tx, tenant, &[completed]).await?, None),
            Some((next, started)) if next.tenant_id == tenant => {
                let mut both = events::append(&mut tx, tenant, &[completed, started]).await?;
                let started = both.split_off(1);
                (
                    both,
                    Some(ClaimedJob {
                        job: next,
                        events: started,
                    }),
                )
            }
            Some((next, started)) => {
                // Two tenants' log locks: always taken in the same order, so two
                // workers finishing and claiming across the same pair cannot deadlock.
                let (events, started) = if tenant.as_uuid() < next.tenant_id.as_uuid() {
                    let events = events::append(&mut tx, tenant, &[completed]).await?;
                    (
                        events,
                        events::append(&mut tx, next.tenant_id, &[started]).await?,
                    )
                } else {
                    let started = events::append(&mut tx, next.tenant_id, &[started]).await?;
                    (
                        events::append(&mut tx, tenant, &[completed]).await?,
                        started,
                    )
                };
                (
                    events,
                    Some(ClaimedJob {
                        job: next,
                        events: started,
                    }),
                )
            }
        };
        tx.commit().await?;
        Ok(Some(Completed { job, events, next }))
    }

    /// Fails a job this worker holds, with its cause.
    pub async fn fail_job(
        &self,
        worker: WorkerId,
        tenant: TenantId,
        id: JobId,
        cause: &FailureCause,
    ) -> Result<Option<(Job, Vec<StoredEvent>)>, StoreError> {
        self.finish_held(worker, tenant, id, JobStatus::Failed, Some(cause), |f| {
            f.failed(cause)
        })
        .await
    }

    /// Ends a running job this worker interrupted on request.
    pub async fn cancel_held_job(
        &self,
        worker: WorkerId,
        tenant: TenantId,
        id: JobId,
    ) -> Result<Option<(Job, Vec<StoredEvent>)>, StoreError> {
        self.finish_held(worker, tenant, id, JobStatus::Cancelled, None, |f| {
            f.cancelled()
        })
        .await
    }

    /// Moves a held job to a terminal `status` with the event `event` describes, in
    /// one transaction; `None` when the worker no longer held it.
    async fn finish_held(
        &self,
        worker: WorkerId,
        tenant: TenantId,
        id: JobId,
        status: JobStatus,
        cause: Option<&FailureCause>,
        event: impl FnOnce(&JobFacts) -> NewEvent,
    ) -> Result<Option<(Job, Vec<StoredEvent>)>, StoreError> {
        let mut tx = self.pool.begin().await?;
        if !lock_held(&mut tx, worker, tenant, id).await? {
            return Ok(None);
        }
        let job = finish(&mut tx, tenant, id, status, cause).await?;
        let facts = JobFacts {
            id,
            workflow_id: job.workflow_id.as_deref(),
        };
        let events = events::append(&mut tx, tenant, &[event(&facts)]).await?;
        tx.commit().await?;
        Ok(Some((job, events)))
    }

    /// Hands a held job back to the queue (worker shutting down, or its ComfyUI
    /// lost the prompt). Past `max_attempts` it fails instead, with `reason`.
    pub async fn release_job(
        &self,
        worker: WorkerId,
        tenant: TenantId,
        id: JobId,
        reason: &str,
    ) -> Result<Option<(Job, Vec<StoredEvent>)>, StoreError> {
        let mut tx = self.pool.begin().await?;
        if !lock_held(&mut tx, worker, tenant, id).await? {
            return Ok(None);
        }
        let (job, events) = requeue_or_fail(&mut tx, tenant, id, reason).await?;
        tx.commit().await?;
        Ok(Some((job, events)))
    }

    /// Requeues (or, past their attempts, fails) running jobs whose lease lapsed:
    /// their worker died or lost its network. Any pod or worker may call this.
    pub async fn reap_expired_leases(&self, limit: i64) -> Result<Vec<Reaped>, StoreError> {
        let mut reaped = Vec::new();
        let mut tx = self.pool.begin().await?;
        let expired: Vec<(Uuid, Uuid)> = sqlx::query_as(
            "SELECT tenant_id, id FROM jobs \
             WHERE status = 'running' AND lease_expires_at < now() \
             ORDER BY lease_expires_at LIMIT $1 FOR UPDATE SKIP LOCKED",
        )
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?;
        for (tenant, id) in expired {
            let (tenant, id) = (TenantId::from_uuid(tenant), JobId::from_uuid(id));
            let (job, events) = requeue_or_fail(
                &mut tx,
                tenant,
                id,
                "its worker stopped renewing the lease (worker lost)",
            )
            .await?;
            reaped.push(Reaped {
                tenant_id: tenant,
                job_id: id,
                requeued: job.status == JobStatus::Queued,
                events,
            });
        }
        tx.commit().await?;
        Ok(reaped)
    }
}

type Tx<'a> = sqlx::Transaction<'a, sqlx::Postgres>;

/// The claim itself (see [`Store::claim_job`]) inside the caller's transaction: the
/// job picked, marked running and leased, and its `job.started`, not yet appended.
async fn claim_in(
    tx: &mut Tx<'_>,
    worker: WorkerId,
    caps: &Capabilities,
    lease: Duration,
) -> Result<Option<(Job, NewEvent)>, StoreError> {
    // Usually one of the first few queued jobs of a tenant is runnable here: an
    // index range per tenant. Only when none is (a worker lacking what those
    // need, or all of them being claimed right now) are all queued jobs searched.
    let mut picked = None;
    for search in [CandidateSearch::FirstQueued, CandidateSearch::AllRunnable] {
        picked = sqlx::query_as::<_, (Uuid, Uuid)>(&claim_query(search))
            .bind(&caps.node_classes)
            .bind(&caps.models)
            .fetch_optional(&mut **tx)
            .await?;
        if picked.is_some() {
            break;
        }
    }
    let Some((id, tenant)) = picked else {
        return Ok(None);
    };
    let (tenant, id) = (TenantId::from_uuid(tenant), JobId::from_uuid(id));
    let row: JobRow = sqlx::query_as(&format!(
        "UPDATE jobs AS j SET status = 'running', worker_id = $3, attempts = j.attempts + 1, \
            started_at = now(), lease_expires_at = now() + make_interval(secs => $4), \
            updated_at = now() \
         WHERE j.tenant_id = $1 AND j.id = $2 RETURNING {JOB_RETURNING}"
    ))
    .bind(tenant.as_uuid())
    .bind(id.as_uuid())
    .bind(worker.as_uuid())
    .bind(lease_interval(lease))
    .fetch_one(&mut **tx)
    .await?;
    let job = Job::try_from(row)?;
    // In the claim's commit rather than a heartbeat of its own.
    sqlx::query("UPDATE workers SET status = 'busy', last_heartbeat_at = now() WHERE id = $1")
        .bind(worker.as_uuid())
        .execute(&mut **tx)
        .await?;
    let started = JobFacts {
        id,
        workflow_id: job.workflow_id.as_deref(),
    }
    .started(&worker.to_string(), job.attempts);
    Ok(Some((job, started)))
}

/// Locks the job row and says whether `worker` still holds it running.
async fn lock_held(
    tx: &mut Tx<'_>,
    worker: WorkerId,
    tenant: TenantId,
    id: JobId,
) -> Result<bool, StoreError> {
    let row: Option<(i32,)> = sqlx::query_as(
        "SELECT 1 FROM jobs WHERE tenant_id = $1 AND id = $2 AND worker_id = $3 \
         AND status = 'running' FOR UPDATE",
    )
    .bind(tenant.as_uuid())
    .bind(id.as_uuid())
    .bind(worker.as_uuid())
    .fetch_optional(&mut **tx)
    .await?;
    Ok(row.is_some())
}

async fn finish(
    tx: &mut Tx<'_>,
    tenant: TenantId,
    id: JobId,
    status: JobStatus,
    cause: Option<&FailureCause>,
) -> Result<Job, StoreError> {
    debug_assert!(JobStatus::Running.can_become(status));
    sqlx::query(
        "UPDATE jobs SET status = $3, cause = $4, completed_at = now(), lease_expires_at = NULL, \
            updated_at = now() \
         WHERE tenant_id = $1 AND id = $2",
    )
    .bind(tenant.as_uuid())
    .bind(id.as_uuid())
    .bind(status.as_str())
    .bind(cause.map(|c| serde_json::to_value(c).expect("a cause serialises")))
    .execute(&mut **tx)
    .await?;
    super::jobs::fetch_job(tx, tenant, id).await
}

async fn requeue_or_fail(
    tx: &mut Tx<'_>,
    tenant: TenantId,
    id: JobId,
    reason: &str,
) -> Result<(Job, Vec<StoredEvent>), StoreError> {
    let (attempts, max_attempts): (i32, i32) =
        sqlx::query_as("SELECT attempts, max_attempts FROM jobs WHERE tenant_id = $1 AND id = $2")
            .bind(tenant.as_uuid())
            .bind(id.as_uuid())
            .fetch_one(&mut **tx)
            .await?;
    if attempts >= max_attempts {
        let cause = FailureCause {
            node_id: None,
            node_type: None,
            exception_type: "WorkerLost".into(),
            exception_message: format!(
                "gave up after {attempts} attempts; the last ended because {reason}"
            ),
        };
        let job = finish(tx, tenant, id, JobStatus::Failed, Some(&cause)).await?;
        let facts = JobFacts {
            id,
            workflow_id: job.workflow_id.as_deref(),
        };
        let events = events::append(tx, tenant, &[facts.failed(&cause)]).await?;
        return Ok((job, events));
    }
    sqlx::query(
        "UPDATE jobs SET status = 'queued', worker_id = NULL, lease_expires_at = NULL, \
            started_at = NULL, updated_at = now() \
         WHERE tenant_id = $1 AND id = $2",
    )
    .bind(tenant.as_uuid())
    .bind(id.as_uuid())
    .execute(&mut **tx)
    .await?;
    let job = super::jobs::fetch_job(tx, tenant, id).await?;
    let facts = JobFacts {
        id,
        workflow_id: job.workflow_id.as_deref(),
    };
    let events = events::append(tx, tenant, &[facts.requeued(reason, attempts)]).await?;
    Ok((job, events))
}

fn duration_secs(job: &Job) -> i64 {
    match (job.started_at, job.completed_at) {
        (Some(s), Some(c)) => (c - s).num_seconds().max(0),
        _ => 0,
    }
}

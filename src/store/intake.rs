//! Group commit for submissions.
//!
//! Appending a tenant's events takes its log lock until commit (see `events`), so a
//! tenant's submits commit one after another. One transaction per submit would make
//! a burst queue on that lock, paying a lock hand-over, a handful of round trips and
//! a WAL flush per job. Instead, submits of a tenant that arrive while one of its
//! transactions is committing wait for the next one, which takes them all: one lock,
//! one flush, one statement for all their events.
//!
//! A batch that fails as a whole (a broken row must not sink the others) is retried
//! one submit at a time; a submit that collides (a reused idempotency key, a chosen
//! id that is taken) is settled on its own after the batch, by the single path that
//! knows how to answer it.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use tokio::sync::oneshot;
use uuid::Uuid;

use super::events;
use super::jobs::{NewJob, Submitted, fetch_jobs, insert_jobs};
use super::{Store, StoreError};
use crate::domain::events::JobFacts;
use crate::domain::ids::TenantId;

/// Most submits one transaction takes.
const MAX_BATCH: usize = 256;

/// Submits waiting for their tenant's next transaction. A tenant has an entry
/// exactly while a committer task is working through its submits.
#[derive(Debug, Default)]
pub(super) struct Intake {
    waiting: Mutex<HashMap<TenantId, Vec<Waiting>>>,
}

#[derive(Debug)]
struct Waiting {
    job: NewJob,
    reply: oneshot::Sender<Result<Submitted, StoreError>>,
}

impl Intake {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<TenantId, Vec<Waiting>>> {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a submit; true if the tenant has no committer yet (the caller starts one).
    fn enqueue(&self, tenant: TenantId, waiting: Waiting) -> bool {
        match self.lock().entry(tenant) {
            Entry::Occupied(mut queue) => {
                queue.get_mut().push(waiting);
                false
            }
            Entry::Vacant(slot) => {
                slot.insert(vec![waiting]);
                true
            }
        }
    }

    /// The next batch, or `None` (and the tenant's entry removed) when none waits.
    fn next_batch(&self, tenant: TenantId) -> Option<Vec<Waiting>> {
        let mut map = self.lock();
        let queue = map.get_mut(&tenant)?;
        if queue.is_empty() {
            map.remove(&tenant);
            return None;
        }
        let n = queue.len().min(MAX_BATCH);
        Some(queue.drain(..n).collect())
    }
}

/// Removes the tenant's entry if its committer dies (a panic), so the submits still
/// waiting get an error instead of waiting forever and later ones start afresh.
struct CommitterGuard<'a> {
    intake: &'a Intake,
    tenant: TenantId,
}

impl Drop for CommitterGuard<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.intake.lock().remove(&self.tenant);
        }
    }
}

impl Store {
    /// Stores a new job as queued, with its `job.accepted` and `job.queued` events —
    /// or, for a repeated idempotency key, returns what that key already produced.
    /// Concurrent submits of a tenant share one transaction.
    pub async fn submit_job(&self, tenant: TenantId, job: NewJob) -> Result<Submitted, StoreError> {
        let (reply, answer) = oneshot::channel();
        if self.intake.enqueue(tenant, Waiting { job, reply }) {
            // Its own task: a caller that goes away must not strand the others.
            let store = self.clone();
            tokio::spawn(async move { store.commit_submits(tenant).await });
        }
        answer
            .await
            .map_err(|_| StoreError::Database(sqlx::Error::WorkerCrashed))?
    }

    async fn commit_submits(&self, tenant: TenantId) {
        let _guard = CommitterGuard {
            intake: &self.intake,
            tenant,
        };
        while let Some(batch) = self.intake.next_batch(tenant) {
            self.commit_batch(tenant, batch).await;
        }
    }

    async fn commit_batch(&self, tenant: TenantId, batch: Vec<Waiting>) {
        tracing::trace!(%tenant, submits = batch.len(), "committing submits");
        if batch.len() > 1 {
            let jobs: Vec<&NewJob> = batch.iter().map(|w| &w.job).collect();
            match self.insert_queued_jobs(tenant, &jobs).await {
                Ok(results) => {
                    let mut collided = Vec::new();
                    for (waiting, result) in batch.into_iter().zip(results) {
                        match result {
                            Some(created) => {
                                let _ = waiting.reply.send(Ok(created));
                            }
                            None => collided.push(waiting),
                        }
                    }
                    for waiting in collided {
                        self.submit_alone(tenant, waiting).await;
                    }
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, submits = batch.len(), "a batch of submits failed; committing them one by one");
                }
            }
        }
        for waiting in batch {
            self.submit_alone(tenant, waiting).await;
        }
    }

    async fn submit_alone(&self, tenant: TenantId, waiting: Waiting) {
        let result = self.submit_one_job(tenant, waiting.job).await;
        let _ = waiting.reply.send(result);
    }

    /// Inserts the jobs and their events in one transaction. A job that collides
    /// with an existing one is skipped (`None`); the caller settles it alone.
    async fn insert_queued_jobs(
        &self,
        tenant: TenantId,
        jobs: &[&NewJob],
    ) -> Result<Vec<Option<Submitted>>, StoreError> {
        let mut tx = self.pool.begin().await?;
        // One statement for all; a collision skips its row instead of aborting the
        // transaction the others are in.
        let returned = insert_jobs(&mut tx, tenant, jobs).await?;
        let mut seen = HashSet::with_capacity(returned.len());
        let inserted: Vec<bool> = jobs
            .iter()
            .map(|j| returned.contains(&j.id.as_uuid()) && seen.insert(j.id))
            .collect();
        let ids: Vec<Uuid> = jobs
            .iter()
            .zip(&inserted)
            .filter(|(_, ok)| **ok)
            .map(|(j, _)| j.id.as_uuid())
            .collect();
        let mut stored_jobs = fetch_jobs(&mut tx, tenant, &ids).await?;
        let mut new_events = Vec::with_capacity(2 * ids.len());
        for id in &ids {
            let job = stored_jobs
                .get(id)
                .ok_or_else(|| StoreError::Corrupt(format!("job {id} vanished")))?;
            let facts = JobFacts {
                id: job.id,
                workflow_id: job.workflow_id.as_deref(),
            };
            new_events.push(facts.accepted());
            new_events.push(facts.queued(job.queue_number));
        }
        let mut stored = events::append(&mut tx, tenant, &new_events)
            .await?
            .into_iter();
        tx.commit().await?;
        Ok(jobs
            .iter()
            .zip(inserted)
            .map(|(job, ok)| {
                if !ok {
                    return None;
                }
                let job = stored_jobs.remove(&job.id.as_uuid())?;
                // Appended in job order, two per job.
                let events = stored.by_ref().take(2).collect();
                Some(Submitted::Created(job, events))
            })
            .collect())
    }
}

//! The worker pod: registers its ComfyUI's capabilities, claims jobs it can run,
//! runs each on ComfyUI while publishing progress and previews, and records the
//! outcome. Leases make a dead worker's job come back; the store makes sure only
//! the holder of a lease can finish a job, so nothing runs twice to completion.

pub mod comfy;
pub mod control;
mod job;

use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::bus::BusItem;
use crate::domain::ids::{JobId, WorkerId};
use crate::files::Files;
use crate::publish::Publisher;
use crate::store::Store;
use crate::store::claims::{Capabilities, ClaimedJob};
use crate::store::workers::WorkerRegistration;
use comfy::{ComfyClient, ComfyError};
use control::Control;

/// How often a worker looks for jobs whose worker died, at most.
const REAP_EVERY: Duration = Duration::from_secs(1);

/// How a worker behaves.
#[derive(Clone, Debug)]
pub struct WorkerSettings {
    pub pool: String,
    /// A claimed job is requeued if its worker has not renewed it for this long.
    pub lease: Duration,
    /// How often an idle worker looks for work when no wake-up arrived.
    pub poll_interval: Duration,
    /// How often the worker reports itself alive.
    pub heartbeat: Duration,
    /// Longest a job may run before it is interrupted and failed.
    pub max_job_time: Duration,
    /// Progress is published at most this often per job (seed 000's 150 ms).
    pub progress_interval: Duration,
}

impl Default for WorkerSettings {
    fn default() -> Self {
        Self {
            pool: "default".into(),
            lease: Duration::from_secs(30),
            poll_interval: Duration::from_secs(2),
            heartbeat: Duration::from_secs(10),
            max_job_time: Duration::from_secs(3600),
            progress_interval: Duration::from_millis(150),
        }
    }
}

/// Everything a worker talks to.
#[derive(Clone)]
pub struct Worker {
    pub id: WorkerId,
    pub store: Store,
    pub files: Files,
    pub publisher: Publisher,
    pub comfy: ComfyClient,
    pub settings: WorkerSettings,
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Comfy(#[from] ComfyError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

impl Worker {
    /// Asks ComfyUI what it can run, retrying with backoff until it answers or
    /// `shutdown` fires.
    async fn discover(&self, shutdown: &CancellationToken) -> Option<Capabilities> {
        let mut backoff = Duration::from_millis(200);
        loop {
            match self.capabilities().await {
                Ok(caps) => return Some(caps),
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "ComfyUI not ready");
                    tokio::select! {
                        _ = shutdown.cancelled() => return None,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
    }

    async fn capabilities(&self) -> Result<Capabilities, WorkerError> {
        let version = self.comfy.version().await?;
        let object_info = self.comfy.object_info().await?;
        let node_classes: Vec<String> = object_info.keys().cloned().collect();
        let models = self.comfy.models().await?;
        self.store
            .register_worker(&WorkerRegistration {
                id: self.id,
                pool: self.settings.pool.clone(),
                comfyui_url: self.comfy.base().to_string(),
                comfyui_version: version,
                node_classes: node_classes.clone(),
                models: models.clone(),
            })
            .await?;
        // The API serves the fleet's union of these as ComfyUI's `/object_info` and
        // validates prompts against it before queueing them.
        self.store
            .set_worker_object_info(self.id, &serde_json::Value::Object(object_info))
            .await?;
        Ok(Capabilities {
            node_classes,
            models,
        })
    }

    /// Runs until `shutdown`: claim, run, repeat. A job in progress at shutdown is
    /// interrupted and handed back to the queue.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), WorkerError> {
        let mut control = self.publisher.bus.subscribe_topic(&control::topic()).await;
        let Some(caps) = self.discover(&shutdown).await else {
            return Ok(());
        };
        tracing::info!(worker = %self.id, nodes = caps.node_classes.len(), models = caps.models.len(), "worker registered");
        // Cancels for the job in hand are forwarded to it; everything else wakes us.
        let (cancels_tx, mut cancels_rx) = mpsc::channel::<JobId>(16);
        let (wake_tx, mut wake_rx) = mpsc::channel::<()>(1);
        let listener = tokio::spawn({
            let shutdown = shutdown.clone();
            async move {
                loop {
                    let item = tokio::select! {
                        _ = shutdown.cancelled() => break,
                        item = control.recv() => item,
                    };
                    match item {
                        None => break,
                        Some(BusItem::Envelope(e)) => match control::parse(&e) {
                            Some(Control::Wake) => {
                                let _ = wake_tx.try_send(());
                            }
                            Some(Control::Cancel(job)) => {
                                let _ = cancels_tx.try_send(job);
                            }
                            None => {}
                        },
                        // A gap in control messages: look for work now.
                        Some(BusItem::Resync(_)) => {
                            let _ = wake_tx.try_send(());
                        }
                    }
                }
            }
        });
        let mut heartbeat = tokio::time::interval(self.settings.heartbeat);
        let mut link = job::ComfyLink::new(&self);
        let mut last_reap: Option<tokio::time::Instant> = None;
        // The claim marks the worker busy; it is marked idle when it runs out of work,
        // not between two jobs.
        let mut busy = false;
        // A job claimed together with the completion of the one before it.
        let mut next: Option<ClaimedJob> = None;
        let result = loop {
            if shutdown.is_cancelled() {
                if let Some(claimed) = next.take() {
                    self.hand_back(&claimed).await;
                }
                break Ok(());
            }
            if last_reap.is_none_or(|at| at.elapsed() >= REAP_EVERY) {
                last_reap = Some(tokio::time::Instant::now());
                if let Err(e) = self.reap().await {
                    tracing::warn!(error = %e, "lease reaping failed");
                }
            }
            // A job claimed with the last completion was published with it.
            let claimed = match next.take() {
                Some(claimed) => Some(claimed),
                None => match self
                    .store
                    .claim_job(self.id, &caps, self.settings.lease)
                    .await
                {
                    Ok(Some(claimed)) => {
                        busy = true;
                        self.publisher.events(&claimed.events).await;
                        Some(claimed)
                    }
                    Ok(None) => {
                        if busy && self.store.worker_heartbeat(self.id, "idle").await.is_ok() {
                            busy = false;
                        }
                        None
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "claiming failed");
                        None
                    }
                },
            };
            if let Some(claimed) = claimed {
                next = job::run(
                    &self,
                    claimed.job,
                    &mut link,
                    &mut cancels_rx,
                    &shutdown,
                    Some(&caps),
                )
                .await;
                continue;
            }
            tokio::select! {
                _ = shutdown.cancelled() => break Ok(()),
                _ = wake_rx.recv() => {}
                _ = link.drain_while_idle() => {}
                _ = tokio::time::sleep(self.settings.poll_interval) => {}
                _ = heartbeat.tick() => {
                    if let Err(e) = self.store.worker_heartbeat(self.id, "idle").await {
                        tracing::warn!(error = %e, "heartbeat failed");
                    }
                }
            }
        };
        listener.abort();
        if let Err(e) = self.store.deregister_worker(self.id).await {
            tracing::warn!(error = %e, "deregistering failed");
        }
        result
    }

    /// Returns a job claimed but not started to the queue at once, rather than
    /// when its lease lapses.
    async fn hand_back(&self, claimed: &ClaimedJob) {
        let (tenant, id) = (claimed.job.tenant_id, claimed.job.id);
        match self
            .store
            .release_job(self.id, tenant, id, "its worker is shutting down")
            .await
        {
            Ok(Some((_, events))) => self.publisher.events(&events).await,
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %e, job = %id, "handing back a claimed job failed; its lease will lapse")
            }
        }
    }

    /// Requeues jobs whose worker died (any worker may do this for all).
    async fn reap(&self) -> Result<(), WorkerError> {
        for reaped in self.store.reap_expired_leases(50).await? {
            tracing::warn!(job = %reaped.job_id, requeued = reaped.requeued, "reaped a job whose lease lapsed");
            self.publisher.events(&reaped.events).await;
            self.publisher.snapshots.clear(reaped.job_id).await;
        }
        Ok(())
    }
}

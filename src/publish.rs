//! What goes on the bus, built the same way by API pods and workers: durable events
//! (after their transaction committed), progress states, preview frames — and the
//! latest progress snapshot of each running job, so a client that arrives mid-job
//! sees it at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use chrono::SecondsFormat;
use serde_json::{Value, json};

use crate::bus::{Bus, Envelope, EnvelopeKind, Meta, meta_keys};
use crate::domain::ids::{JobId, TenantId};
use crate::store::events::StoredEvent;

/// The `type` prefix of relayed ComfyUI messages (`comfy.progress_state`).
pub const COMFY_TYPE_PREFIX: &str = "comfy.";

/// How long a snapshot outlives its last update (a worker that died mid-job).
const SNAPSHOT_TTL: Duration = Duration::from_secs(3600);

/// Where the latest progress of running jobs is kept.
#[derive(Clone)]
pub enum Snapshots {
    /// Shared by every pod and worker.
    Redis {
        conn: Box<redis::aio::ConnectionManager>,
        prefix: String,
    },
    /// One process only (dev mode, tests without Redis).
    Memory(Arc<Mutex<HashMap<JobId, Bytes>>>),
}

impl Snapshots {
    pub fn memory() -> Self {
        Snapshots::Memory(Arc::default())
    }

    fn key(prefix: &str, job: JobId) -> String {
        format!("{prefix}:progress:{job}")
    }

    async fn put(&self, job: JobId, state: Bytes) {
        match self {
            Snapshots::Redis { conn, prefix } => {
                let mut conn = (**conn).clone();
                let result: redis::RedisResult<()> = redis::cmd("SET")
                    .arg(Self::key(prefix, job))
                    .arg(state.as_ref())
                    .arg("EX")
                    .arg(SNAPSHOT_TTL.as_secs())
                    .query_async(&mut conn)
                    .await;
                if let Err(e) = result {
                    tracing::warn!(error = %e, %job, "could not store a progress snapshot");
                }
            }
            Snapshots::Memory(map) => {
                map.lock().expect("snapshot map").insert(job, state);
            }
        }
    }

    /// Forgets a finished job's progress.
    pub async fn clear(&self, job: JobId) {
        match self {
            Snapshots::Redis { conn, prefix } => {
                let mut conn = (**conn).clone();
                let _: redis::RedisResult<()> = redis::cmd("DEL")
                    .arg(Self::key(prefix, job))
                    .query_async(&mut conn)
                    .await;
            }
            Snapshots::Memory(map) => {
                map.lock().expect("snapshot map").remove(&job);
            }
        }
    }

    /// The latest progress state of a job, as JSON bytes.
    pub async fn get(&self, job: JobId) -> Option<Bytes> {
        match self {
            Snapshots::Redis { conn, prefix } => {
                let mut conn = (**conn).clone();
                let raw: redis::RedisResult<Option<Vec<u8>>> = redis::cmd("GET")
                    .arg(Self::key(prefix, job))
                    .query_async(&mut conn)
                    .await;
                raw.ok().flatten().map(Bytes::from)
            }
            Snapshots::Memory(map) => map.lock().expect("snapshot map").get(&job).cloned(),
        }
    }
}

/// Publishes on the bus. Cheap to clone.
#[derive(Clone)]
pub struct Publisher {
    pub bus: Bus,
    pub snapshots: Snapshots,
}

/// Seed 000's event object (the shape `GET /api/admin/events` returns).
pub fn event_object(e: &StoredEvent) -> Value {
    json!({
        "id": format!("evt_{}", e.id),
        "type": e.kind,
        "timestamp": e.created_at.to_rfc3339_opts(SecondsFormat::Millis, true),
        "severity": e.severity,
        "message": e.message,
        "data": e.data,
    })
}

impl Publisher {
    /// Publishes committed events. A failed publish is logged, not returned: the
    /// event is durable, and clients catch up from the log with `since`.
    pub async fn events(&self, events: &[StoredEvent]) {
        for e in events {
            let payload = Bytes::from(serde_json::to_vec(&event_object(e)).expect("JSON"));
            let envelope = match Envelope::event(
                e.tenant_id,
                e.job_id,
                e.id as u64,
                &e.kind,
                payload,
            )
            .and_then(|mut env| {
                if let Some(prev) = e.prev_id {
                    env.meta = env.meta.with(meta_keys::PREV, &prev.to_string())?;
                }
                Ok(env)
            }) {
                Ok(env) => env,
                Err(err) => {
                    tracing::error!(error = %err, kind = %e.kind, "event type does not fit an envelope");
                    continue;
                }
            };
            if let Err(err) = self.bus.publish(&envelope).await {
                tracing::warn!(error = %err, event = e.id, "publishing an event failed; clients will catch up from the log");
            }
        }
    }

    /// Publishes a job's progress state and keeps it as the job's snapshot.
    pub async fn progress(&self, tenant: TenantId, job: JobId, state: &Value) {
        let payload = Bytes::from(serde_json::to_vec(state).expect("JSON"));
        self.snapshots.put(job, payload.clone()).await;
        let mut envelope = Envelope::new(tenant, EnvelopeKind::Progress, payload);
        envelope.job = Some(job);
        if let Err(err) = self.bus.publish(&envelope).await {
            tracing::debug!(error = %err, %job, "publishing progress failed");
        }
    }

    /// Relays one of ComfyUI's own in-flight messages (`progress_state`, …) as the
    /// worker's ComfyUI sent it, for the ComfyUI dialect's clients. `seq` numbers a
    /// job's relayed messages: distinct numbers keep a slow client's outbox from
    /// merging them (it drops the oldest when full instead).
    pub async fn comfy_message(
        &self,
        tenant: TenantId,
        job: JobId,
        seq: u64,
        kind: &str,
        text: Bytes,
    ) {
        let meta = match Meta::typed(&format!("{COMFY_TYPE_PREFIX}{kind}")) {
            Ok(meta) => meta,
            Err(err) => {
                tracing::warn!(error = %err, "a ComfyUI message type does not fit an envelope");
                return;
            }
        };
        let mut envelope = Envelope::new(tenant, EnvelopeKind::Control, text);
        envelope.job = Some(job);
        envelope.id = seq;
        envelope.meta = meta;
        if let Err(err) = self.bus.publish(&envelope).await {
            tracing::debug!(error = %err, %job, "relaying a ComfyUI message failed");
        }
    }

    /// Publishes a preview frame: the raw image, never re-encoded.
    pub async fn preview(
        &self,
        tenant: TenantId,
        job: JobId,
        seq: u64,
        node: &str,
        mime: &str,
        image: Bytes,
    ) {
        match Envelope::preview(tenant, job, seq, node, mime, image) {
            Ok(envelope) => {
                if let Err(err) = self.bus.publish(&envelope).await {
                    tracing::debug!(error = %err, %job, "publishing a preview failed");
                }
            }
            Err(err) => tracing::warn!(error = %err, "preview metadata does not fit an envelope"),
        }
    }
}

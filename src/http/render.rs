//! How the stream dialects show an envelope, in one place. Each renderer's result is
//! cached on the [`SharedEnvelope`](crate::bus::SharedEnvelope) per dialect, so it
//! runs once per envelope per pod and every connection sends the same bytes:
//!
//! | dialect | event | progress | preview |
//! |---|---|---|---|
//! | session stream (000) | the event object, text | the progress state, text | raw image, binary |
//! | session preview meta | – | – | `{"type":"preview",…}` text |
//! | cloud WS (002) | `{"type":"event",…}` with a job payload (outputs read from the store) | `job.progress` event | – |
//! | SSE (003) | the job's full status snapshot, with `id:` | – | – |
//!
//! Also here: the snapshot of seed 003. The event-log reads every stream uses to
//! resume (`since`, `Last-Event-ID`, a hub resync) are in [`super::replay`].

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Map, Value, json};

use super::AppState;
use crate::bus::{Envelope, EnvelopeKind, Frame, meta_keys};
use crate::domain::ids::{JobId, TenantId};
use crate::domain::job::JobStatus;
use crate::store::StoreError;
use crate::store::events::EventQuery;
use crate::store::jobs::Job;

/// The id of the tenant's newest event (0 if none): where a stream that was not
/// asked to resume would replay from after a resync.
pub async fn newest_event_id(
    state: &AppState,
    tenant: TenantId,
    job: Option<JobId>,
) -> Result<i64, StoreError> {
    let newest = state
        .store
        .list_events(
            tenant,
            &EventQuery {
                job,
                limit: 1,
                ..EventQuery::default()
            },
        )
        .await?;
    Ok(newest.last().map_or(0, |e| e.id))
}

fn json_frame(value: &Value) -> Frame {
    Frame::text(value.to_string())
}

fn iso(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn published_at(env: &Envelope) -> String {
    let micros = i64::try_from(env.published_at_micros).unwrap_or(i64::MAX);
    iso(DateTime::from_timestamp_micros(micros).unwrap_or_else(Utc::now))
}

// ---------------------------------------------------------------- seed 000

/// Seed 000: events and progress as published (both are already the seed's JSON),
/// previews as the raw image.
pub fn session_frame(env: &Envelope) -> Option<Frame> {
    match env.kind {
        EnvelopeKind::Event | EnvelopeKind::Progress => Frame::text_from(env.payload.clone()),
        EnvelopeKind::Preview => Some(Frame::Binary(env.payload.clone())),
        _ => None,
    }
}

/// Seed 000 with `?preview_meta=1`: what the next binary frame is.
pub fn session_preview_meta(env: &Envelope) -> Option<Frame> {
    if env.kind != EnvelopeKind::Preview {
        return None;
    }
    Some(json_frame(&json!({
        "type": "preview",
        "prompt_id": env.job.map(|j| j.to_string()),
        "preview_seq": env.id,
        "node_id": env.meta.get(meta_keys::NODE),
        "mime": env.meta.get(meta_keys::MIME),
    })))
}

// ---------------------------------------------------------------- seed 002

/// The status a job event reports when its data does not say.
fn status_of(event_type: &str) -> Option<&'static str> {
    Some(match event_type {
        "job.accepted" => "accepted",
        "job.queued" | "job.requeued" => "queued",
        "job.started" => "running",
        "job.completed" => "completed",
        "job.failed" => "failed",
        "job.cancelled" => "cancelled",
        "job.invalid" => "invalid",
        _ => return None,
    })
}

/// Seed 002: a durable event or a progress state as an `event` message. Job events
/// carry the job in the payload (`id`, `status`, …); `job.completed` lists the
/// outputs with fresh signed `download_url`s, read from the store here — once per
/// envelope per pod, since the result is cached on the envelope.
pub async fn cloud_frame(state: &AppState, env: &Envelope) -> Option<Frame> {
    match env.kind {
        EnvelopeKind::Event => cloud_event(state, env).await,
        EnvelopeKind::Progress => cloud_progress(env),
        _ => None,
    }
}

async fn cloud_event(state: &AppState, env: &Envelope) -> Option<Frame> {
    let event_type = env.event_type()?;
    let object: Value = serde_json::from_slice(&env.payload).ok()?;
    let data = object.get("data").and_then(Value::as_object);
    let payload = match env.job {
        Some(job) => cloud_job_payload(state, env.tenant, job, event_type, data).await,
        None => data.cloned().unwrap_or_default(),
    };
    Some(json_frame(&json!({
        "type": "event",
        // The durable id, so a client can pass it as `since` when it resubscribes.
        "id": object.get("id"),
        "timestamp": object.get("timestamp"),
        "data": { "event": event_type, "payload": payload },
    })))
}

async fn cloud_job_payload(
    state: &AppState,
    tenant: TenantId,
    job: JobId,
    event_type: &str,
    data: Option<&Map<String, Value>>,
) -> Map<String, Value> {
    let mut payload = Map::new();
    payload.insert("id".into(), json!(job.to_string()));
    let status = data
        .and_then(|d| d.get("status"))
        .cloned()
        .or_else(|| status_of(event_type).map(Value::from))
        .unwrap_or(Value::Null);
    payload.insert("status".into(), status);
    for (key, value) in data.into_iter().flatten() {
        // `prompt_id`/`job_id` repeat `id`; `outputs`/`error` are rebuilt below.
        if !matches!(
            key.as_str(),
            "prompt_id" | "job_id" | "status" | "outputs" | "error"
        ) {
            payload.insert(key.clone(), value.clone());
        }
    }
    match event_type {
        "job.completed" => {
            let outputs = match state.store.list_outputs(tenant, job).await {
                Ok(outputs) => outputs
                    .iter()
                    .map(|o| {
                        json!({
                            "id": o.id.to_string(),
                            "type": o.kind,
                            "filename": o.filename,
                            "content_type": o.content_type,
                            "size_bytes": o.size_bytes,
                            "download_url": super::uploads::signed_url(state, &o.object_key),
                        })
                    })
                    .collect(),
                Err(e) => {
                    tracing::warn!(error = %e, %job, "outputs of a completed job could not be read for its event");
                    Vec::new()
                }
            };
            payload.insert("outputs".into(), Value::Array(outputs));
        }
        "job.failed" => {
            let cause = payload.get("cause").cloned().unwrap_or(Value::Null);
            payload.insert(
                "error".into(),
                json!({
                    "code": cause.get("exception_type"),
                    "message": cause.get("exception_message"),
                }),
            );
        }
        _ => {}
    }
    payload
}

fn cloud_progress(env: &Envelope) -> Option<Frame> {
    let state: Value = serde_json::from_slice(&env.payload).ok()?;
    let field = |k: &str| state.get(k).cloned().unwrap_or(Value::Null);
    let id = env
        .job
        .map(|j| Value::from(j.to_string()))
        .unwrap_or_else(|| field("prompt_id"));
    Some(json_frame(&json!({
        "type": "event",
        "timestamp": published_at(env),
        "data": {
            "event": "job.progress",
            "payload": {
                "id": id,
                "status": field("status"),
                "progress": field("percent"),
                "node": field("node_id"),
                "node_title": field("node_title"),
                "node_type": field("node_type"),
                "step": field("step"),
                "total_steps": field("total_steps"),
                "nodes_done": field("nodes_done"),
                "total_nodes": field("effective_total"),
                "eta_seconds": field("eta_seconds"),
                "preview_seq": field("preview_seq"),
            },
        },
    })))
}

// ---------------------------------------------------------------- seed 003

/// Seed 003's full status snapshot of a job.
pub async fn sse_snapshot(state: &AppState, job: &Job) -> Value {
    let outputs: Vec<Value> = if job.status == JobStatus::Completed {
        match state.store.list_outputs(job.tenant_id, job.id).await {
            Ok(outputs) => outputs
                .iter()
                .map(|o| {
                    json!({
                        "id": o.id.to_string(),
                        // Seed 003's "workflow" is the submitted run: our job.
                        "workflow_id": job.id.to_string(),
                        "src": super::uploads::signed_url(state, &o.object_key),
                    })
                })
                .collect(),
            Err(e) => {
                tracing::warn!(error = %e, job = %job.id, "outputs could not be read for a snapshot");
                Vec::new()
            }
        }
    } else {
        Vec::new()
    };
    json!({
        "status": job.status.as_str(),
        "id": job.id.to_string(),
        "prompt": { "prompt_id": job.id.to_string() },
        "queue_number": job.queue_number,
        "outputs": outputs,
        "cause": job.cause.as_ref().map(|c| c.public()),
        "started_at": job.started_at.map(iso),
        "completed_at": job.completed_at.map(iso),
    })
}

/// One SSE message: `id:` (when known) and the snapshot as one `data:` line.
pub fn sse_message(id: Option<u64>, snapshot: &Value) -> Frame {
    // serde_json escapes newlines inside strings, so the JSON is one line.
    let text = match id {
        Some(id) => format!("id: {id}\ndata: {snapshot}\n\n"),
        None => format!("data: {snapshot}\n\n"),
    };
    Frame::text(text)
}

/// Seed 003: a durable event of the job as the job's snapshot right after it, read
/// from the store once per envelope per pod.
pub async fn sse_frame(state: &AppState, env: &Envelope) -> Option<Frame> {
    if env.kind != EnvelopeKind::Event {
        return None;
    }
    let job = match state.store.get_job(env.tenant, env.job?).await {
        Ok(job) => job?,
        Err(e) => {
            tracing::warn!(error = %e, "a job could not be read for its SSE snapshot");
            return None;
        }
    };
    Some(sse_message(Some(env.id), &sse_snapshot(state, &job).await))
}

/// The status an SSE message reports (to close the stream after a terminal one).
pub fn sse_status(frame: &Frame) -> Option<JobStatus> {
    #[derive(serde::Deserialize)]
    struct StatusOnly {
        status: String,
    }
    let text = frame.as_text()?;
    let data = text.lines().find_map(|line| line.strip_prefix("data: "))?;
    serde_json::from_str::<StatusOnly>(data)
        .ok()?
        .status
        .parse()
        .ok()
}

//! The ComfyUI dialect's `WS /ws?clientId=` (see `comfy` for the conventions).

use std::collections::HashMap;

use chrono::Utc;
use poem::web::Query;
use poem::{Request, Response, handler};
use serde_json::{Value, json};

use super::AppState;
use crate::domain::ids::{JobId, TenantId};
use crate::store::jobs::Job;

use super::comfy::*;

// ---- the socket --------------------------------------------------------------------

/// `WS /ws?clientId=`: ComfyUI's socket, reduced to what a client follows a prompt by. On connect:
/// `status` with `sid` (the given clientId, else a fresh hex id); a first client
/// message `feature_flags` is answered with the server's. For the tenant's prompts
/// posted with this `client_id`: `execution_start`, then at the end `executed` per
/// output node, `execution_success` and `executing {node: null}` — or
/// `execution_error` / `execution_interrupted`. While it runs, `executing` per node
/// and sampler `progress`, from the fleet's progress snapshots. Not sent:
/// `execution_cached`, `progress_state` and preview frames.
#[handler]
pub(super) async fn comfy_ws(req: &Request, Query(q): Query<HashMap<String, String>>) -> Response {
    let (state, tenant) = match caller(req) {
        Ok(c) => c,
        Err(resp) => {
            // Refused before the upgrade: a ComfyUI client reports the status code.
            return resp;
        }
    };
    let sid = q
        .get("clientId")
        .filter(|c| !c.is_empty())
        .cloned()
        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
    super::ws::upgrade(req, move |socket| {
        socket_session(state, tenant, sid, socket)
    })
}

async fn socket_session(
    state: AppState,
    tenant: TenantId,
    sid: String,
    mut socket: super::ws::Socket,
) {
    use futures_util::{SinkExt, StreamExt};

    use super::ws::{Incoming, classify, text};
    use crate::bus::EnvelopeKind;
    use crate::hub::{Filter, Next};

    let conn = state
        .hub
        .attach(
            tenant,
            Filter::new(|e| {
                e.kind == EnvelopeKind::Progress
                    || e.kind == EnvelopeKind::Event
                        && e.event_type().is_some_and(|t| {
                            matches!(
                                t,
                                "job.started" | "job.completed" | "job.failed" | "job.cancelled"
                            )
                        })
            }),
        )
        .await;
    let remaining = state.store.active_jobs(tenant).await.map_or(0, |j| j.len());
    let hello = json!({"type": "status", "data": {"status": {"exec_info": {"queue_remaining": remaining}}, "sid": sid}});
    if socket.send(text(hello.to_string())).await.is_err() {
        return;
    }
    let mut negotiated = false;
    // Whether each job seen was posted by this socket's client.
    let mut ours: HashMap<JobId, bool> = HashMap::new();
    // Per running job of this client: the node and step last told.
    let mut told: HashMap<JobId, (Option<String>, u64)> = HashMap::new();
    loop {
        tokio::select! {
            read = socket.next() => match classify(read) {
                Incoming::Text(t) => {
                    // Only a first `feature_flags` message is answered, as in ComfyUI.
                    let first = !negotiated;
                    negotiated = true;
                    let is_flags = serde_json::from_str::<Value>(t.as_str())
                        .ok()
                        .is_some_and(|m| m["type"] == "feature_flags");
                    if first && is_flags {
                        let reply = json!({"type": "feature_flags", "data": {
                            "supports_preview_metadata": true,
                            "max_upload_size": state.max_upload.get()}});
                        if socket.send(text(reply.to_string())).await.is_err() {
                            return;
                        }
                    }
                }
                Incoming::Ignore => {}
                Incoming::Gone => return,
                Incoming::Refuse(code, reason) => {
                    super::ws::close(&mut socket, code, reason).await;
                    return;
                }
            },
            next = conn.next() => match next {
                Next::Envelope(env) if env.kind == EnvelopeKind::Progress => {
                    // Only for prompts this socket saw start: a late snapshot of a
                    // finished prompt must not follow its final `executing`.
                    let Some(id) = env.job else { continue };
                    if ours.get(&id) != Some(&true) {
                        continue;
                    }
                    let Ok(progress) = serde_json::from_slice::<Value>(&env.payload) else { continue };
                    let last = told.entry(id).or_default();
                    for message in progress_messages(id, &progress, last) {
                        if socket.send(text(message.to_string())).await.is_err() {
                            return;
                        }
                    }
                }
                Next::Envelope(env) => {
                    let (Some(id), Some(kind)) = (env.job, env.event_type()) else { continue };
                    // Another client's prompt: known from its first event, no read.
                    if ours.get(&id) == Some(&false) {
                        if kind != "job.started" {
                            ours.remove(&id);
                        }
                        continue;
                    }
                    let job = match state.store.get_job(tenant, id).await {
                        Ok(Some(job)) => job,
                        _ => continue,
                    };
                    let mine = *ours
                        .entry(id)
                        .or_insert_with(|| job.client_id.as_deref() == Some(sid.as_str()));
                    if !mine {
                        continue;
                    }
                    for message in lifecycle_messages(&state, kind, &job).await {
                        if socket.send(text(message.to_string())).await.is_err() {
                            return;
                        }
                    }
                    if job.status.is_terminal() {
                        ours.remove(&id);
                        told.remove(&id);
                    }
                }
                // A gap: lifecycle messages may have been lost; the client's
                // `/history` poll is the fallback, as after a ComfyUI reconnect.
                Next::Resync => {}
                Next::Close(reason) => {
                    super::ws::close(&mut socket, reason.code(), &reason.reason()).await;
                    return;
                }
            },
        }
    }
}

/// ComfyUI's `executing` (when the node changed) and `progress` (when the step did)
/// from one of the fleet's progress snapshots. Snapshots are throttled, so a fast
/// sampler's steps arrive with gaps, as over a slow ComfyUI socket.
fn progress_messages(id: JobId, progress: &Value, last: &mut (Option<String>, u64)) -> Vec<Value> {
    let pid = id.to_string();
    let node = progress["node_id"].as_str().map(str::to_string);
    let step = progress["step"].as_u64().unwrap_or(0);
    let total = progress["total_steps"].as_u64().unwrap_or(0);
    let mut out = Vec::new();
    if node.is_some() && node != last.0 {
        out.push(json!({"type": "executing",
                        "data": {"node": node, "display_node": node, "prompt_id": pid}}));
        last.1 = 0;
    }
    if node.is_some() && total > 0 && step != last.1 {
        out.push(json!({"type": "progress",
                        "data": {"value": step, "max": total, "prompt_id": pid, "node": node}}));
        last.1 = step;
    }
    last.0 = node;
    out
}

/// The ComfyUI messages one job event becomes.
async fn lifecycle_messages(state: &AppState, kind: &str, job: &Job) -> Vec<Value> {
    let pid = job.id.to_string();
    let now = Utc::now().timestamp_millis();
    let msg = |t: &str, data: Value| json!({"type": t, "data": data});
    match kind {
        "job.started" => vec![msg(
            "execution_start",
            json!({"prompt_id": pid, "timestamp": now}),
        )],
        "job.completed" => {
            let mut out = Vec::new();
            if let Ok(entry) = history_entry(state, job).await
                && let Some(nodes) = entry["outputs"].as_object()
            {
                for (node, output) in nodes {
                    out.push(msg(
                        "executed",
                        json!({"node": node, "display_node": node, "output": output, "prompt_id": pid}),
                    ));
                }
            }
            out.push(msg(
                "execution_success",
                json!({"prompt_id": pid, "timestamp": now}),
            ));
            out.push(msg("executing", json!({"node": null, "prompt_id": pid})));
            out
        }
        "job.failed" => vec![msg(
            "execution_error",
            json!({"prompt_id": pid, "timestamp": now, "node_id": null, "node_type": null,
                   "executed": [], "exception_message": job.cause.as_ref().map(|c| format!("{c:?}")),
                   "exception_type": "", "traceback": [], "current_inputs": {}, "current_outputs": {}}),
        )],
        // A prompt deleted from the queue never started: ComfyUI says nothing of it.
        "job.cancelled" if job.started_at.is_some() => vec![msg(
            "execution_interrupted",
            json!({"prompt_id": pid, "timestamp": now, "node_id": null, "node_type": null, "executed": []}),
        )],
        _ => Vec::new(),
    }
}

//! Running one claimed job on ComfyUI: inputs in, prompt queued with the job id as
//! `prompt_id`, messages followed into progress and previews, outputs copied out,
//! and exactly one terminal transition recorded.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Worker;
use super::comfy::{ComfyError, ComfyMessage, ComfySocket, Queued, Received};
use crate::domain::ids::JobId;
use crate::domain::job::FailureCause;
use crate::domain::progress::{NodeInfo, ProgressTracker};
use crate::files::{ObjectKey, SafeFilename, SafeSubfolder, content_type_for};
use crate::store::claims::{Capabilities, ClaimedJob, Lease, NewOutput};
use crate::store::jobs::Job;

/// How the run ended, before it is recorded.
enum Outcome {
    Succeeded,
    Failed(FailureCause),
    /// Interrupted because a cancel was asked for.
    Cancelled,
    /// Not finished here: hand it back to the queue (shutdown, ComfyUI lost it).
    Release(String),
    /// The lease was lost: someone else owns the job now; record nothing.
    Abandon,
}

fn cause(
    exception_type: &str,
    message: impl Into<String>,
    node_type: Option<String>,
) -> FailureCause {
    FailureCause {
        node_id: None,
        node_type,
        exception_type: exception_type.into(),
        exception_message: message.into(),
    }
}

/// The worker's one socket to its ComfyUI, kept from job to job. A socket per job
/// would cost a handshake each time, and would risk the job's messages: ComfyUI
/// forgets a client id when *any* socket with that id closes (`sockets.pop(sid)` in
/// its handler's `finally`), so the previous job's socket closing late could
/// unregister the new one, and ComfyUI drops frames for an unregistered client.
pub(super) struct ComfyLink {
    client_id: String,
    socket: Option<ComfySocket>,
}

impl ComfyLink {
    pub(super) fn new(worker: &Worker) -> Self {
        Self {
            client_id: format!("comfyfleet-{}", worker.id),
            socket: None,
        }
    }

    /// Reads and drops what ComfyUI sends while no job runs (queue `status` for other
    /// clients), so its sender never waits on this socket. Never returns; a socket
    /// that closes is reconnected by the next [`ComfyLink::ready`].
    pub(super) async fn drain_while_idle(&mut self) {
        if let Some(socket) = &mut self.socket {
            while let Some(Ok(_)) = socket.next_received().await {}
            self.socket = None;
        }
        std::future::pending::<()>().await
    }

    /// The open socket, reconnected if it closed while idle.
    async fn ready(&mut self, worker: &Worker) -> Result<&mut ComfySocket, ComfyError> {
        if self.socket.as_mut().is_some_and(|s| !s.discard_pending()) {
            self.socket = None;
        }
        let socket = match self.socket.take() {
            Some(socket) => socket,
            None => worker.comfy.connect(&self.client_id).await?,
        };
        Ok(self.socket.insert(socket))
    }
}

/// Runs the job and records how it ended. With `then_claim` (the worker's
/// capabilities) a job that completes is recorded together with the claim of the
/// worker's next job, which is returned (see `Store::complete_job_and_claim`).
pub(super) async fn run(
    worker: &Worker,
    job: Job,
    link: &mut ComfyLink,
    cancels: &mut mpsc::Receiver<JobId>,
    shutdown: &CancellationToken,
    then_claim: Option<&Capabilities>,
) -> Option<ClaimedJob> {
    let outcome = execute(worker, &job, link, cancels, shutdown).await;
    let then_claim = then_claim.filter(|_| !shutdown.is_cancelled());
    record(worker, &job, outcome, then_claim).await
}

async fn record(
    worker: &Worker,
    job: &Job,
    outcome: Outcome,
    then_claim: Option<&Capabilities>,
) -> Option<ClaimedJob> {
    let (store, tenant, id) = (&worker.store, job.tenant_id, job.id);
    let mut next = None;
    let recorded = match outcome {
        Outcome::Succeeded => match collect_outputs(worker, job).await {
            Ok(outputs) => store
                .complete_job_and_claim(
                    worker.id,
                    tenant,
                    id,
                    &outputs,
                    |recorded| {
                        json!(
                            recorded
                                .iter()
                                .map(|(oid, o)| json!({
                                    "id": oid.to_string(),
                                    "type": o.kind,
                                    "filename": o.filename,
                                    "content_type": o.content_type,
                                }))
                                .collect::<Vec<_>>()
                        )
                    },
                    then_claim.map(|caps| (caps, worker.settings.lease)),
                )
                .await
                .map(|done| {
                    done.map(|d| {
                        next = d.next;
                        (d.job, d.events)
                    })
                }),
            Err(e) => {
                let c = cause(
                    "OutputError",
                    format!("could not collect the outputs: {e}"),
                    None,
                );
                store.fail_job(worker.id, tenant, id, &c).await
            }
        },
        Outcome::Failed(c) => store.fail_job(worker.id, tenant, id, &c).await,
        Outcome::Cancelled => store.cancel_held_job(worker.id, tenant, id).await,
        Outcome::Release(reason) => store.release_job(worker.id, tenant, id, &reason).await,
        Outcome::Abandon => Ok(None),
    };
    match recorded {
        Ok(Some((_, events))) => worker.publisher.events(&events).await,
        Ok(None) => tracing::info!(job = %id, "job was no longer ours; result discarded"),
        Err(e) => {
            tracing::error!(error = %e, job = %id, "recording the job's outcome failed; its lease will lapse and it will be retried")
        }
    }
    worker.publisher.snapshots.clear(id).await;
    // After the completion's events: in the log, the next job's start follows them.
    if let Some(claimed) = &next {
        worker.publisher.events(&claimed.events).await;
    }
    next
}

/// The graph's nodes as progress names them (`_meta.title`, else the class).
fn node_infos(graph: &Value) -> BTreeMap<String, NodeInfo> {
    graph
        .as_object()
        .into_iter()
        .flatten()
        .map(|(id, node)| {
            let class_type = node["class_type"].as_str().unwrap_or_default().to_string();
            let title = node["_meta"]["title"]
                .as_str()
                .map(String::from)
                .unwrap_or_else(|| class_type.clone());
            (id.clone(), NodeInfo { class_type, title })
        })
        .collect()
}

async fn execute(
    worker: &Worker,
    job: &Job,
    link: &mut ComfyLink,
    cancels: &mut mpsc::Receiver<JobId>,
    shutdown: &CancellationToken,
) -> Outcome {
    let comfy = &worker.comfy;
    let prompt_id = job.id.to_string();
    let client_id = link.client_id.clone();
    // Connected before queueing: ComfyUI drops frames for a client with no socket.
    let socket = match link.ready(worker).await {
        Ok(s) => s,
        Err(e) => return Outcome::Release(format!("its ComfyUI was unreachable: {e}")),
    };
    if let Err(e) = upload_inputs(worker, job).await {
        return match e {
            InputProblem::Missing(name) => Outcome::Failed(cause(
                "InputMissing",
                format!("input file {name} is no longer available"),
                None,
            )),
            InputProblem::Comfy(e) => Outcome::Release(format!("uploading inputs failed: {e}")),
        };
    }
    match comfy
        .queue_prompt(&prompt_id, &client_id, &job.graph, &job.extra_data)
        .await
    {
        Ok(Queued::Accepted { .. }) => {}
        Ok(Queued::Rejected(body)) => return Outcome::Failed(rejection_cause(&body)),
        Err(e) => return Outcome::Release(format!("queueing on ComfyUI failed: {e}")),
    }

    let started = Instant::now();
    let at = || started.elapsed().as_secs_f64();
    let mut tracker = ProgressTracker::new(
        prompt_id.clone(),
        job.workflow_id.clone(),
        job.workflow_id
            .as_deref()
            .and_then(|w| crate::domain::manifest::WorkflowId::parse(w).ok())
            .map(|w| w.to_string()),
        node_infos(&job.graph),
    );
    let settings = &worker.settings;
    let mut renew = tokio::time::interval(settings.lease / 3);
    renew.tick().await;
    let limit = job
        .time_limit_secs
        .map(|s| Duration::from_secs(s.max(1) as u64))
        .map_or(settings.max_job_time, |l| l.min(settings.max_job_time));
    let deadline = started + limit;
    let mut last_published: Option<Instant> = None;
    let mut dirty = false;
    let mut cancelling = false;
    let mut succeeded = false;
    let mut relayed: u64 = 0;
    // When ComfyUI last said anything on the socket (see the lease tick).
    let mut heard = Instant::now();

    loop {
        let flush_at = match (dirty, last_published) {
            (true, Some(t)) => t + settings.progress_interval,
            (true, None) => Instant::now(),
            (false, _) => Instant::now() + Duration::from_secs(3600),
        };
        tokio::select! {
            _ = shutdown.cancelled() => {
                let _ = comfy.stop(&prompt_id).await;
                return Outcome::Release("its worker was shut down".into());
            }
            _ = tokio::time::sleep_until(deadline) => {
                let _ = comfy.stop(&prompt_id).await;
                return Outcome::Failed(cause(
                    "Timeout",
                    format!("the job ran longer than its limit of {}s", limit.as_secs()),
                    None,
                ));
            }
            _ = renew.tick() => {
                match worker.store.renew_lease(worker.id, job.tenant_id, job.id, settings.lease).await {
                    Ok(Lease::Held { cancel_requested }) => {
                        if cancel_requested && !cancelling {
                            cancelling = true;
                            let _ = comfy.stop(&prompt_id).await;
                        }
                    }
                    Ok(Lease::Lost) => {
                        let _ = comfy.stop(&prompt_id).await;
                        return Outcome::Abandon;
                    }
                    Err(e) => tracing::warn!(error = %e, "lease renewal failed"),
                }
                // A socket that went quiet may have stopped carrying this prompt's
                // messages (half-open, or ComfyUI no longer has this client id):
                // ask ComfyUI itself rather than wait out the job's time limit.
                if heard.elapsed() >= settings.lease / 3 {
                    heard = Instant::now();
                    match whereabouts(worker, &prompt_id).await {
                        Whereabouts::Finished(ok) => {
                            tracing::warn!(job = %job.id, "ComfyUI finished the prompt, but its messages did not reach this worker");
                            return finished(ok, cancelling);
                        }
                        Whereabouts::Gone => return Outcome::Release("its ComfyUI lost the prompt".into()),
                        Whereabouts::Pending | Whereabouts::Unreachable(_) => {}
                    }
                }
            }
            Some(cancelled) = cancels.recv() => {
                if cancelled == job.id && !cancelling {
                    cancelling = true;
                    let _ = comfy.stop(&prompt_id).await;
                }
            }
            _ = tokio::time::sleep_until(flush_at), if dirty => {
                publish_progress(worker, job, &tracker, at()).await;
                last_published = Some(Instant::now());
                dirty = false;
            }
            frame = socket.next_received() => {
                heard = Instant::now();
                let msg = match frame {
                    Some(Ok(Received { message, relay })) => {
                        if let Some(relay) = relay
                            && relay.prompt_id.as_deref() == Some(prompt_id.as_str())
                            && !relay.is_end_marker
                        {
                            relayed += 1;
                            worker.publisher.comfy_message(job.tenant_id, job.id, relayed, relay.kind, relay.text).await;
                        }
                        message
                    }
                    Some(Err(_)) | None => {
                        // The socket dropped: reconnect with the same client id and
                        // find out whether ComfyUI still has the prompt.
                        match reconnect(worker, &client_id, &prompt_id, shutdown).await {
                            Reconnected::Socket(s) => { *socket = *s; continue; }
                            Reconnected::Finished(ok) => return finished(ok, cancelling),
                            Reconnected::Lost(reason) => return Outcome::Release(reason),
                        }
                    }
                };
                match msg {
                    ComfyMessage::ExecutionStart { prompt_id: p } if p == prompt_id => { tracker.started(); dirty = true; }
                    ComfyMessage::ExecutionCached { prompt_id: p, nodes } if p == prompt_id => { tracker.cached(nodes); dirty = true; }
                    ComfyMessage::Executing { prompt_id: p, node } if p.as_deref().is_none_or(|p| p == prompt_id) => {
                        if node.is_none() && p.is_some() {
                            // The end marker: success was reported before it.
                            if succeeded {
                                return Outcome::Succeeded;
                            }
                            continue;
                        }
                        tracker.executing(node.as_deref(), at());
                        dirty = true;
                    }
                    ComfyMessage::Progress { prompt_id: p, node, value, max } if p.as_deref().is_none_or(|p| p == prompt_id) => {
                        tracker.progress(node.as_deref(), value, max, at());
                        dirty = true;
                    }
                    ComfyMessage::Executed { prompt_id: p, node, output } if p == prompt_id => {
                        tracker.executed(&node, output);
                        dirty = true;
                    }
                    ComfyMessage::Preview { image, mime, prompt_id: p, node_id } if p.as_deref().is_none_or(|p| p == prompt_id) => {
                        let seq = tracker.preview();
                        let node = node_id.or_else(|| tracker.state(at()).node_id).unwrap_or_default();
                        worker.publisher.preview(job.tenant_id, job.id, seq, &node, mime, image).await;
                        dirty = true;
                    }
                    ComfyMessage::Success { prompt_id: p } if p == prompt_id => {
                        succeeded = true;
                        // Every node is done now; publish that final state at once
                        // (the throttle may be holding it back) so watchers see it
                        // before the completion event.
                        tracker.executing(None, at());
                        publish_progress(worker, job, &tracker, at()).await;
                        dirty = false;
                    }
                    ComfyMessage::Error { prompt_id: p, node_id, node_type, exception_type, exception_message } if p == prompt_id => {
                        return Outcome::Failed(FailureCause { node_id, ..cause(&exception_type, exception_message, node_type) });
                    }
                    ComfyMessage::Interrupted { prompt_id: p, node_type, .. } if p == prompt_id => {
                        return if cancelling {
                            Outcome::Cancelled
                        } else {
                            Outcome::Failed(cause("Interrupted", "the prompt was interrupted on ComfyUI", node_type))
                        };
                    }
                    _ => {}
                }
            }
        }
    }
}

async fn publish_progress(worker: &Worker, job: &Job, tracker: &ProgressTracker, at: f64) {
    let state = serde_json::to_value(tracker.state(at)).expect("progress serialises");
    worker
        .publisher
        .progress(job.tenant_id, job.id, &state)
        .await;
}

/// ComfyUI's 400 → a failure cause naming the first bad node.
fn rejection_cause(body: &Value) -> FailureCause {
    let first = body["node_errors"]
        .as_object()
        .and_then(|m| m.iter().next());
    let node_type = first.and_then(|(_, e)| e["class_type"].as_str().map(String::from));
    let detail = first
        .and_then(|(_, e)| e["errors"][0]["details"].as_str().map(String::from))
        .or_else(|| body["error"]["details"].as_str().map(String::from))
        .unwrap_or_default();
    let message = body["error"]["message"]
        .as_str()
        .unwrap_or("prompt rejected");
    cause(
        "ValidationError",
        if detail.is_empty() {
            message.to_string()
        } else {
            format!("{message}: {detail}")
        },
        node_type,
    )
}

enum Reconnected {
    Socket(Box<ComfySocket>),
    /// ComfyUI's history has the prompt: `true` if it succeeded.
    Finished(bool),
    Lost(String),
}

/// The outcome of a prompt found in ComfyUI's history rather than on the socket.
fn finished(succeeded: bool, cancelling: bool) -> Outcome {
    if succeeded {
        Outcome::Succeeded
    } else if cancelling {
        Outcome::Cancelled
    } else {
        Outcome::Failed(cause(
            "ExecutionError",
            "ComfyUI reported the prompt as failed",
            None,
        ))
    }
}

/// Where ComfyUI has a prompt, asked over HTTP.
enum Whereabouts {
    /// In the history: `true` if it succeeded.
    Finished(bool),
    /// Queued or running.
    Pending,
    /// Neither: ComfyUI lost it (restarted, or the queue was cleared).
    Gone,
    Unreachable(String),
}

async fn whereabouts(worker: &Worker, prompt_id: &str) -> Whereabouts {
    match worker.comfy.history(prompt_id).await {
        Ok(Some(entry)) => {
            return Whereabouts::Finished(entry["status"]["status_str"] == "success");
        }
        Ok(None) => {}
        Err(e) => return Whereabouts::Unreachable(e.to_string()),
    }
    match worker.comfy.has_prompt(prompt_id).await {
        Ok(true) => return Whereabouts::Pending,
        Ok(false) => {}
        Err(e) => return Whereabouts::Unreachable(e.to_string()),
    }
    // It may have left the queue for the history between the two questions.
    match worker.comfy.history(prompt_id).await {
        Ok(Some(entry)) => Whereabouts::Finished(entry["status"]["status_str"] == "success"),
        Ok(None) => Whereabouts::Gone,
        Err(e) => Whereabouts::Unreachable(e.to_string()),
    }
}

async fn reconnect(
    worker: &Worker,
    client_id: &str,
    prompt_id: &str,
    shutdown: &CancellationToken,
) -> Reconnected {
    let mut backoff = Duration::from_millis(100);
    for _ in 0..8 {
        if let Ok(socket) = worker.comfy.connect(client_id).await {
            // Anything that happened while we were away is in the history or queue.
            return match whereabouts(worker, prompt_id).await {
                Whereabouts::Finished(ok) => Reconnected::Finished(ok),
                Whereabouts::Pending => Reconnected::Socket(Box::new(socket)),
                Whereabouts::Gone => Reconnected::Lost("its ComfyUI lost the prompt".into()),
                Whereabouts::Unreachable(e) => {
                    Reconnected::Lost(format!("its ComfyUI became unreachable: {e}"))
                }
            };
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
    Reconnected::Lost("its ComfyUI stayed unreachable".into())
}

enum InputProblem {
    Missing(String),
    Comfy(ComfyError),
}

/// Copies the job's input files from the object store into ComfyUI's input folder.
async fn upload_inputs(worker: &Worker, job: &Job) -> Result<(), InputProblem> {
    for name in &job.input_files {
        let input = worker
            .store
            .find_input_by_filename(job.tenant_id, name)
            .await
            .ok()
            .flatten()
            .and_then(|i| i.object_key)
            .and_then(|k| ObjectKey::parse(&k).ok())
            .ok_or_else(|| InputProblem::Missing(name.clone()))?;
        let bytes = worker
            .files
            .get(&input)
            .await
            .map_err(|_| InputProblem::Missing(name.clone()))?;
        worker
            .comfy
            .upload_image(name, bytes)
            .await
            .map_err(InputProblem::Comfy)?;
    }
    Ok(())
}

fn kind_of(filename: &str) -> &'static str {
    let ct = content_type_for(filename);
    if ct.starts_with("video/") || filename.ends_with(".gif") {
        "video"
    } else if ct.starts_with("image/") {
        "image"
    } else {
        "file"
    }
}

/// Reads the prompt's history and copies every output file into the object store.
async fn collect_outputs(worker: &Worker, job: &Job) -> Result<Vec<NewOutput>, String> {
    let entry = worker
        .comfy
        .history(&job.id.to_string())
        .await
        .map_err(|e| e.to_string())?
        .ok_or("ComfyUI has no history for the prompt")?;
    let mut outputs = Vec::new();
    for (node_id, node_out) in entry["outputs"].as_object().into_iter().flatten() {
        for (_, list) in node_out.as_object().into_iter().flatten() {
            for item in list.as_array().into_iter().flatten() {
                let (Some(filename), Some("output")) =
                    (item["filename"].as_str(), item["type"].as_str())
                else {
                    continue;
                };
                let subfolder = item["subfolder"].as_str().unwrap_or_default();
                let name =
                    SafeFilename::parse(filename).map_err(|e| format!("{filename:?}: {e}"))?;
                let sub =
                    SafeSubfolder::parse(subfolder).map_err(|e| format!("{subfolder:?}: {e}"))?;
                let bytes = worker
                    .comfy
                    .view(filename, subfolder, "output")
                    .await
                    .map_err(|e| e.to_string())?;
                let key = ObjectKey::output(job.tenant_id, job.id, &sub, &name);
                let size = bytes.len() as i64;
                worker
                    .files
                    .put(&key, bytes)
                    .await
                    .map_err(|e| e.to_string())?;
                outputs.push(NewOutput {
                    node_id: node_id.clone(),
                    kind: kind_of(filename).into(),
                    filename: filename.into(),
                    subfolder: subfolder.into(),
                    content_type: content_type_for(filename).into(),
                    object_key: key.as_str().into(),
                    size_bytes: size,
                });
            }
        }
    }
    Ok(outputs)
}

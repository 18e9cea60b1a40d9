//! The ComfyUI dialect on the API pods: ComfyUI's own REST routes (`/prompt`,
//! `/queue`, `/history`, `/view`, `/upload/image`, `/object_info`, …), each also under
//! `/api/`, so an existing ComfyUI client runs against the fleet by changing only its
//! base URL and adding an API key.
//!
//! These are plain poem handlers, not OpenAPI operations: ComfyUI's bodies are
//! free-form JSON and its clients expect its exact shapes (empty 200 bodies, a 500
//! text/plain answer to malformed JSON), which a typed spec would only misdescribe.
//! Request bodies are read as JSON whatever their Content-Type, like aiohttp's
//! `request.json()`: ComfyUI clients often post JSON as `text/plain`.
//!
//! `POST /prompt` checks the graph against the fleet's node catalogue (the union of
//! the fresh workers' `/object_info`) before queueing it, so a typo gets ComfyUI's own
//! 400 at once; with no worker online only the structural checks apply.
//!
//! Everything is scoped to the caller's tenant: a prompt is a job, its `prompt_id` is
//! the job id, and history, queue and files only ever show the tenant's own.
//!
//! Deliberate differences from one ComfyUI process (see the report of issue 7):
//! - `number` is a per-tenant counter (0, 1, …, negated for `front`, rejected prompts
//!   counting too), as one ComfyUI process keeps one; jobs from the other dialects
//!   show their creation time in milliseconds instead.
//! - A client-chosen `prompt_id` becomes the job id; one already taken (by any tenant)
//!   is refused like a reused one.
//! - `POST /history` (delete/clear) answers 200 and hides nothing: history is the
//!   tenant's job record, which other surfaces also read.
//! - `/upload/image` stores every image flat in the tenant's inputs and answers
//!   `subfolder: ""`, so the returned `name` is what a LoadImage node references.
//! - Saved outputs are kept; a worker's temp files (PreviewImage) are not, so no
//!   `executed` names them and `/view?type=temp` finds nothing. `/view` serves files
//!   as stored (`preview=webp;50` is not re-encoded).
//! - `executed` is sent once the job's outputs are stored, just before
//!   `execution_success`, rather than as each output node finishes.
//! - History keeps no `execution_cached` message, and an error report leaves the
//!   traceback, `executed` and the node's inputs and outputs on the worker;
//!   `execution_interrupted` does not say which node was running.
//! - A partly valid prompt is queued as just its valid outputs and what they need, so
//!   `/queue` and `/history` show that graph.

use std::collections::{HashMap, HashSet};

use bytes::Bytes;
use chrono::Utc;
use poem::http::StatusCode;
use poem::web::{Path, Query};
use poem::{Request, Response, Route, get, handler, post};
use serde_json::{Map, Value, json};

use super::AppState;
use super::comfy_files::{
    features, object_info, object_info_class, system_stats, upload_image, view,
};
use super::comfy_ws::comfy_ws;
use super::problem::Problem;
use super::security::{StreamCredential, stream_credential};
use crate::domain::graph::{ApiGraph, ComfyValidationError, NodeId};
use crate::domain::ids::{JobId, TenantId};
use crate::domain::job::JobStatus;
use crate::jobs::{SubmitError, SubmitOptions, WorkSpec};
use crate::store::jobs::Job;

/// Workers heard from within this long make up "the fleet" whose nodes are served.
pub(super) const FRESH_WORKER_SECS: i64 = 60;
/// `GET /history` without `max_items` lists at most this many of the latest prompts.
pub(super) const DEFAULT_HISTORY_ITEMS: i64 = 200;
/// Most prompts one `GET /history` lists.
pub(super) const MAX_HISTORY_ITEMS: i64 = 1000;
/// Priority a `front: true` prompt gets, ahead of the tenant's default 0.
pub(super) const FRONT_PRIORITY: i32 = 1;
/// Prefix of the idempotency key that reserves a client-chosen `prompt_id`.
pub(super) const PROMPT_ID_KEY: &str = "comfyui-prompt-id:";

/// Adds every ComfyUI route twice: at `/x` and at `/api/x`, as ComfyUI serves them.
pub fn routes(mut route: Route) -> Route {
    for prefix in ["", "/api"] {
        let at = |p: &str| format!("{prefix}{p}");
        route = route
            .at(at("/prompt"), get(get_prompt).post(post_prompt))
            .at(at("/queue"), get(get_queue).post(post_queue))
            .at(at("/interrupt"), post(interrupt))
            .at(at("/history"), get(get_history).post(post_history))
            .at(at("/history/:prompt_id"), get(get_history_item))
            .at(at("/view"), get(view))
            .at(at("/upload/image"), post(upload_image))
            .at(at("/object_info"), get(object_info))
            .at(at("/object_info/:class"), get(object_info_class))
            .at(at("/system_stats"), get(system_stats))
            .at(at("/features"), get(features))
            .at(at("/ws"), get(comfy_ws));
    }
    route
}

// ---- responses ----------------------------------------------------------------

pub(super) fn json_response(v: &Value) -> Response {
    Response::builder()
        .content_type("application/json; charset=utf-8")
        .body(v.to_string())
}

pub(super) fn status_only(status: StatusCode) -> Response {
    Response::builder().status(status).body(Bytes::new())
}

/// What aiohttp answers when a handler raises, e.g. on a body that is not JSON.
pub(super) fn server_error() -> Response {
    Response::builder()
        .status(StatusCode::INTERNAL_SERVER_ERROR)
        .content_type("text/plain; charset=utf-8")
        .body("500 Internal Server Error\n\nServer got itself in trouble")
}

/// A 400 in ComfyUI's `/prompt` error shape.
pub(super) fn prompt_error(kind: &str, message: &str, details: &str) -> Response {
    Response::builder()
        .status(StatusCode::BAD_REQUEST)
        .content_type("application/json; charset=utf-8")
        .body(
            json!({
                "error": {"type": kind, "message": message, "details": details, "extra_info": {}},
                "node_errors": {},
            })
            .to_string(),
        )
}

pub(super) fn internal(e: impl std::fmt::Display) -> Response {
    tracing::error!(error = %e, "ComfyUI-compatible request failed");
    Problem::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        "the request could not be completed",
    )
    .into_poem_response()
}

// ---- the caller ---------------------------------------------------------------

/// The caller's tenant, or the response refusing the request. Every credential form
/// is accepted, `?api_key=` included: ComfyUI clients build `/view` URLs for `<img>`
/// tags, which cannot carry a header.
pub(super) fn caller(req: &Request) -> Result<(AppState, TenantId), Response> {
    let Some(state) = req.data::<AppState>().cloned() else {
        return Err(internal("AppState missing"));
    };
    match stream_credential(req) {
        StreamCredential::Accepted(p, _) => Ok((state, p.tenant_id)),
        StreamCredential::Refused(reason) => {
            Err(Problem::new(StatusCode::UNAUTHORIZED, "unauthorized", reason).into_poem_response())
        }
        StreamCredential::Missing => Err(Problem::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "authentication required: send X-API-Key, Authorization: Bearer <key>, \
             ?api_key=<key>, HTTP Basic with the key as password, or sign in for a session cookie",
        )
        .into_poem_response()),
    }
}

macro_rules! caller_or_return {
    ($req:expr) => {
        match $crate::http::comfy::caller($req) {
            Ok(c) => c,
            Err(resp) => return resp,
        }
    };
}

pub(super) use caller_or_return;

/// The body as a JSON object, or `None` when it is not one.
pub(super) fn json_object(body: &[u8]) -> Option<Map<String, Value>> {
    match serde_json::from_slice(body) {
        Ok(Value::Object(m)) => Some(m),
        _ => None,
    }
}

/// Python's truthiness for the flags ComfyUI reads with `if json_data["clear"]`.
pub(super) fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    }
}

// ---- prompts and the queue -----------------------------------------------------

/// A job's ComfyUI `number`: the one it was posted with through this dialect; for
/// jobs from the other dialects its creation time in ms (negated when put in front),
/// which orders them among the tenant's prompts without a shared counter.
pub(super) fn number_of(job: &Job) -> Value {
    if let Some(n) = job.comfy_number {
        return if n.fract() == 0.0 && n.abs() < 9.0e15 {
            json!(n as i64)
        } else {
            json!(n)
        };
    }
    let n = job.created_at.timestamp_millis();
    json!(if job.priority > 0 { -n } else { n })
}

/// The output nodes a queue item lists: the graph's sinks.
pub(super) fn outputs_to_execute(job: &Job) -> Vec<String> {
    serde_json::from_value::<ApiGraph>(job.graph.clone())
        .map(|g| {
            g.output_nodes()
                .into_iter()
                .map(|n| n.as_str().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// `[number, prompt_id, prompt, extra_data, outputs_to_execute]`.
pub(super) fn queue_item(job: &Job) -> Value {
    json!([
        number_of(job),
        job.id.to_string(),
        job.graph,
        job.extra_data,
        outputs_to_execute(job)
    ])
}

#[handler]
pub(super) async fn post_prompt(req: &Request, body: Bytes) -> Response {
    let (state, tenant) = caller_or_return!(req);
    let Some(mut request) = json_object(&body) else {
        return server_error();
    };
    let number = match request.get("number") {
        None => None,
        Some(n) => match n
            .as_f64()
            .or_else(|| n.as_str().and_then(|s| s.trim().parse::<f64>().ok()))
        {
            Some(f) => Some(f),
            // ComfyUI's `float(number)` raises: a 500.
            None => return server_error(),
        },
    };
    let front = request.get("front").is_some_and(truthy);
    // Counted before validation, as ComfyUI does: a rejected prompt uses a number
    // too. ComfyUI answers a sent number as the float it made of it.
    let (number, number_json) = match number {
        Some(n) => (n, json!(n)),
        None => match state.store.next_comfy_prompt_number(tenant).await {
            Ok(n) => {
                let n = if front { -n } else { n };
                (n as f64, json!(n))
            }
            Err(e) => return internal(e),
        },
    };
    let Some(prompt) = request.remove("prompt") else {
        return prompt_error("no_prompt", "No prompt provided", "No prompt provided");
    };
    if !prompt.is_object() {
        return server_error();
    }
    let prompt_id = match request.get("prompt_id") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if let Ok(id) = s.parse::<JobId>() => Some(id),
        Some(_) => {
            return prompt_error(
                "invalid_prompt",
                "prompt_id must be a UUID",
                "Send a UUID as prompt_id, or leave it out to get one.",
            );
        }
    };
    let mut extra_data = match request.remove("extra_data") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m,
        Some(_) => return server_error(),
    };
    let client_id = match request.get("client_id") {
        Some(Value::String(c)) => Some(c.clone()),
        _ => None,
    };
    if let Some(c) = request.get("client_id") {
        extra_data.insert("client_id".to_owned(), c.clone());
    }
    // Secrets a client passes for API nodes never reach the queue or history.
    for key in ["auth_token_comfy_org", "api_key_comfy_org"] {
        extra_data.remove(key);
    }

    // `partial_execution_targets`: only these outputs are validated and run, so the
    // graph is cut down to them and what they need before anything else looks at it.
    let prompt = match request.get("partial_execution_targets") {
        Some(Value::Array(targets)) => match serde_json::from_value::<ApiGraph>(prompt.clone()) {
            Ok(graph) => {
                let targets: Vec<NodeId> = targets
                    .iter()
                    .filter_map(Value::as_str)
                    .filter(|t| graph.node(t).is_some())
                    .map(NodeId::new)
                    .collect();
                serde_json::to_value(graph.only_outputs(&targets)).expect("a graph serialises")
            }
            Err(_) => prompt,
        },
        _ => prompt,
    };

    // Validation at the door: a typo is answered with ComfyUI's own 400 now, not
    // after the prompt waited for a worker. Without a worker online the job service's
    // structural checks are all there is.
    let (node_errors, mut prompt) = match door_check(&state, prompt).await {
        Ok(checked) => checked,
        Err(resp) => return resp,
    };

    let options = SubmitOptions {
        client_id,
        priority: if front { FRONT_PRIORITY } else { 0 },
        // The key is unique per tenant, which is what makes a reused id a 400.
        idempotency_key: prompt_id.as_ref().map(|p| format!("{PROMPT_ID_KEY}{p}")),
        extra_data: Value::Object(extra_data),
        time_limit_secs: None,
        // ComfyUI clients that choose the id listen for it on their socket.
        job_id: prompt_id,
        comfy_number: Some(number),
    };
    let graph = serde_json::from_value::<ApiGraph>(prompt.clone()).ok();
    let mut node_errors = node_errors;
    let mut submitted = state
        .submit(tenant, WorkSpec::Graph(prompt.clone()), options.clone())
        .await;
    // An image the tenant never uploaded fails LoadImage's own validation: the outputs
    // that need it are reported, and the prompt runs if any other output stands.
    if let (Err(SubmitError::MissingInputs(files)), Some(graph)) = (&submitted, &graph) {
        let rejected = ComfyValidationError::missing_images(graph, files);
        let Some(rest) = rejected.surviving(graph) else {
            return Response::builder()
                .status(StatusCode::BAD_REQUEST)
                .content_type("application/json; charset=utf-8")
                .body(rejected.to_json().to_string());
        };
        if let (Some(all), Value::Object(more)) =
            (node_errors.as_object_mut(), json!(rejected.node_errors))
        {
            all.extend(more);
        }
        prompt = serde_json::to_value(&rest).expect("a graph serialises");
        submitted = state.submit(tenant, WorkSpec::Graph(prompt), options).await;
    }
    match submitted {
        Ok(accepted) if accepted.replayed => prompt_id_taken(),
        Ok(accepted) => json_response(&json!({
            "prompt_id": accepted.job.id.to_string(),
            "number": number_json,
            "node_errors": node_errors,
        })),
        Err(e) => submit_error(e),
    }
}

/// Checks a prompt against the fleet's node catalogue as ComfyUI would. Returns the
/// `node_errors` of a partly valid prompt (ComfyUI runs its valid outputs and reports
/// the rest with a 200), or the 400 of an invalid one.
pub(super) async fn door_check(
    state: &AppState,
    prompt: Value,
) -> Result<(Value, Value), Response> {
    // A prompt that is not a graph is left to the job service, which says why.
    let Ok(graph) = serde_json::from_value::<ApiGraph>(prompt.clone()) else {
        return Ok((json!({}), prompt));
    };
    let classes: Vec<String> = graph
        .class_types()
        .into_iter()
        .map(str::to_string)
        .collect();
    let catalogue = match state
        .store
        .fleet_catalogue(FRESH_WORKER_SECS, &classes)
        .await
    {
        Ok(Some(catalogue)) => catalogue,
        Ok(None) => return Ok((json!({}), prompt)),
        Err(e) => return Err(internal(e)),
    };
    match graph.validate_against(&catalogue) {
        // ComfyUI runs the outputs that passed; the rest are reported.
        Ok(report) if report.node_errors.is_empty() => Ok((json!({}), prompt)),
        Ok(report) => {
            let runs = graph.only_outputs(&report.good_outputs);
            Ok((
                json!(report.node_errors),
                serde_json::to_value(&runs).expect("a graph serialises"),
            ))
        }
        Err(rejected) => Err(Response::builder()
            .status(StatusCode::BAD_REQUEST)
            .content_type("application/json; charset=utf-8")
            .body(rejected.to_json().to_string())),
    }
}

pub(super) fn prompt_id_taken() -> Response {
    prompt_error(
        "invalid_prompt",
        "prompt_id already exists",
        "This prompt_id was already used; send a new UUID.",
    )
}

pub(super) fn submit_error(e: SubmitError) -> Response {
    match e {
        SubmitError::InvalidGraph(v) => Response::builder()
            .status(StatusCode::BAD_REQUEST)
            .content_type("application/json; charset=utf-8")
            .body(v.to_json().to_string()),
        SubmitError::IdempotencyKeyReused | SubmitError::JobIdTaken => prompt_id_taken(),
        SubmitError::NotAGraph(msg) => prompt_error("invalid_prompt", "Invalid prompt", &msg),
        SubmitError::MissingInputs(files) => prompt_error(
            "prompt_outputs_failed_validation",
            "Prompt outputs failed validation",
            &format!(
                "Invalid image file: {} (upload it with /upload/image first)",
                files.join(", ")
            ),
        ),
        SubmitError::InvalidOption(msg) => prompt_error("invalid_prompt", "Invalid prompt", &msg),
        e @ (SubmitError::UnknownWorkflow(_) | SubmitError::InvalidParams(_)) => {
            prompt_error("invalid_prompt", "Invalid prompt", &e.to_string())
        }
        SubmitError::Store(e) => internal(e),
    }
}

#[handler]
pub(super) async fn get_prompt(req: &Request) -> Response {
    let (state, tenant) = caller_or_return!(req);
    match state.store.active_jobs(tenant).await {
        Ok(jobs) => json_response(&json!({"exec_info": {"queue_remaining": jobs.len()}})),
        Err(e) => internal(e),
    }
}

#[handler]
pub(super) async fn get_queue(req: &Request) -> Response {
    let (state, tenant) = caller_or_return!(req);
    let jobs = match state.store.active_jobs(tenant).await {
        Ok(jobs) => jobs,
        Err(e) => return internal(e),
    };
    let (running, pending): (Vec<&Job>, Vec<&Job>) =
        jobs.iter().partition(|j| j.status == JobStatus::Running);
    json_response(&json!({
        "queue_running": running.into_iter().map(queue_item).collect::<Vec<_>>(),
        "queue_pending": pending.into_iter().map(queue_item).collect::<Vec<_>>(),
    }))
}

/// `{"delete": [ids]}` and/or `{"clear": true}`: cancels waiting prompts only; a
/// running one is stopped with `/interrupt`, as in ComfyUI.
#[handler]
pub(super) async fn post_queue(req: &Request, body: Bytes) -> Response {
    let (state, tenant) = caller_or_return!(req);
    let Some(request) = json_object(&body) else {
        return server_error();
    };
    let jobs = match state.store.active_jobs(tenant).await {
        Ok(jobs) => jobs,
        Err(e) => return internal(e),
    };
    let clear = request.get("clear").is_some_and(truthy);
    let delete: HashSet<&str> = request
        .get("delete")
        .and_then(Value::as_array)
        .map(|ids| ids.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    for job in jobs.iter().filter(|j| j.status != JobStatus::Running) {
        if (clear || delete.contains(job.id.to_string().as_str()))
            && let Err(e) = state.cancel(tenant, job.id).await
        {
            return internal(e);
        }
    }
    status_only(StatusCode::OK)
}

/// Body optional: `{"prompt_id": X}` stops X only if it is running; otherwise every
/// running prompt of the tenant stops (ComfyUI's global interrupt, per tenant).
#[handler]
pub(super) async fn interrupt(req: &Request, body: Bytes) -> Response {
    let (state, tenant) = caller_or_return!(req);
    let target = json_object(&body).and_then(|m| m.get("prompt_id").cloned());
    let jobs = match state.store.active_jobs(tenant).await {
        Ok(jobs) => jobs,
        Err(e) => return internal(e),
    };
    for job in jobs.iter().filter(|j| j.status == JobStatus::Running) {
        let hit = match &target {
            Some(Value::String(id)) => *id == job.id.to_string(),
            Some(Value::Null) | None => true,
            Some(_) => false,
        };
        if hit && let Err(e) = state.cancel(tenant, job.id).await {
            return internal(e);
        }
    }
    status_only(StatusCode::OK)
}

// ---- history ---------------------------------------------------------------------

/// Whether a job belongs in ComfyUI's history: it ran and it is over. A prompt
/// deleted from the queue never ran, so ComfyUI never lists it either.
pub(super) fn in_history(job: &Job) -> bool {
    job.status.is_terminal() && job.started_at.is_some()
}

/// `execution_error`'s data for a failed job (the worker's ComfyUI reported the
/// exception; its traceback and the node's inputs stay on the worker).
pub(super) fn execution_error_data(job: &Job, timestamp: i64) -> Value {
    let cause = job.cause.as_ref();
    json!({"prompt_id": job.id.to_string(),
           "node_id": cause.and_then(|c| c.node_id.clone()),
           "node_type": cause.and_then(|c| c.node_type.clone()),
           "executed": [],
           "exception_message": cause.map(|c| c.exception_message.clone()).unwrap_or_default(),
           "exception_type": cause.map(|c| c.exception_type.clone()).unwrap_or_default(),
           "traceback": [], "current_inputs": {}, "current_outputs": {},
           "timestamp": timestamp})
}

/// `execution_interrupted`'s data for a cancelled job.
pub(super) fn interrupted_data(job: &Job, timestamp: i64) -> Value {
    json!({"prompt_id": job.id.to_string(), "node_id": null, "node_type": null,
           "executed": [], "timestamp": timestamp})
}

/// ComfyUI's history entry of a finished job.
pub(super) async fn history_entry(state: &AppState, job: &Job) -> Result<Value, Response> {
    let outputs = state
        .store
        .list_outputs(job.tenant_id, job.id)
        .await
        .map_err(internal)?;
    let mut by_node: Map<String, Value> = Map::new();
    let mut meta: Map<String, Value> = Map::new();
    for o in &outputs {
        // ComfyUI's UI keys: images for pictures, `gifs` as VideoHelperSuite names
        // videos; anything else under its kind.
        let key = match o.kind.as_str() {
            "image" => "images",
            "video" => "gifs",
            other => other,
        };
        let node = by_node
            .entry(o.node_id.clone())
            .or_insert_with(|| json!({}));
        if let Some(obj) = node.as_object_mut() {
            let list = obj.entry(key).or_insert_with(|| json!([]));
            if let Some(list) = list.as_array_mut() {
                list.push(
                    json!({"filename": o.filename, "subfolder": o.subfolder, "type": "output"}),
                );
            }
        }
        meta.insert(
            o.node_id.clone(),
            json!({"node_id": o.node_id, "display_node": o.node_id, "parent_node": null,
                   "real_node_id": o.node_id}),
        );
    }
    let ok = job.status == JobStatus::Completed;
    let pid = job.id.to_string();
    let ms = |t: Option<chrono::DateTime<Utc>>| t.map(|t| t.timestamp_millis());
    let at = ms(job.completed_at).unwrap_or_default();
    let end = match job.status {
        JobStatus::Completed => {
            json!(["execution_success", {"prompt_id": pid, "timestamp": at}])
        }
        JobStatus::Cancelled => json!(["execution_interrupted", interrupted_data(job, at)]),
        _ => json!(["execution_error", execution_error_data(job, at)]),
    };
    Ok(json!({
        "prompt": queue_item(job),
        "outputs": by_node,
        "status": {
            "status_str": if ok { "success" } else { "error" },
            "completed": ok,
            "messages": [["execution_start", {"prompt_id": pid, "timestamp": ms(job.started_at)}], end],
        },
        "meta": meta,
    }))
}

#[handler]
pub(super) async fn get_history(
    req: &Request,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let (state, tenant) = caller_or_return!(req);
    let limit = q
        .get("max_items")
        .and_then(|m| m.parse::<i64>().ok())
        .map(|m| m.clamp(0, MAX_HISTORY_ITEMS))
        .unwrap_or(DEFAULT_HISTORY_ITEMS);
    let statuses = [
        JobStatus::Completed,
        JobStatus::Failed,
        JobStatus::Cancelled,
    ];
    // Cancelled-while-queued jobs are filtered out below, so read a little more.
    let jobs = match state
        .store
        .list_jobs(tenant, &statuses, None, limit.saturating_mul(2).max(1))
        .await
    {
        Ok(jobs) => jobs,
        Err(e) => return internal(e),
    };
    let mut picked: Vec<&Job> = jobs
        .iter()
        .filter(|j| in_history(j))
        .take(limit as usize)
        .collect();
    // ComfyUI lists history oldest first.
    picked.reverse();
    let mut out = Map::new();
    for job in picked {
        match history_entry(&state, job).await {
            Ok(entry) => {
                out.insert(job.id.to_string(), entry);
            }
            Err(resp) => return resp,
        }
    }
    json_response(&Value::Object(out))
}

#[handler]
pub(super) async fn get_history_item(req: &Request, Path(prompt_id): Path<String>) -> Response {
    let (state, tenant) = caller_or_return!(req);
    // Unknown, someone else's, or not finished yet: ComfyUI answers `{}` to all.
    let Ok(id) = prompt_id.parse::<JobId>() else {
        return json_response(&json!({}));
    };
    let job = match state.store.get_job(tenant, id).await {
        Ok(Some(job)) if in_history(&job) => job,
        Ok(_) => return json_response(&json!({})),
        Err(e) => return internal(e),
    };
    match history_entry(&state, &job).await {
        Ok(entry) => json_response(&json!({ prompt_id: entry })),
        Err(resp) => resp,
    }
}

/// Accepted and ignored: the history is the tenant's job record (see module docs).
#[handler]
pub(super) async fn post_history(req: &Request, body: Bytes) -> Response {
    let _ = caller_or_return!(req);
    if json_object(&body).is_none() {
        return server_error();
    }
    status_only(StatusCode::OK)
}

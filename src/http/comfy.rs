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
//! - `number` is not a process counter: it is the job's creation time in milliseconds
//!   (negated for `front`), which orders a tenant's prompts the same way across pods
//!   without shared state. A client-sent `number` is echoed in the reply only.
//! - A client-chosen `prompt_id` must be a UUID the tenant has not used; the prompt is
//!   still queued under the fleet's own id, which the reply returns (jobs get their ids
//!   from the job service).
//! - `POST /history` (delete/clear) answers 200 and hides nothing: history is the
//!   tenant's job record, which other surfaces also read.
//! - `/upload/image` stores every image flat in the tenant's inputs and answers
//!   `subfolder: ""`, so the returned `name` is what a LoadImage node references.

use std::collections::{HashMap, HashSet};

use bytes::Bytes;
use chrono::Utc;
use poem::http::StatusCode;
use poem::web::{Multipart, Path, Query};
use poem::{Request, Response, Route, get, handler, post};
use serde_json::{Map, Value, json};

use super::AppState;
use super::problem::Problem;
use super::security::{StreamCredential, stream_credential};
use super::uploads::file_response;
use crate::domain::graph::ApiGraph;
use crate::domain::ids::{JobId, TenantId};
use crate::domain::job::JobStatus;
use crate::domain::node_catalogue::NodeCatalogue;
use crate::files::{ObjectKey, SafeFilename, SafeSubfolder, read_limited, sniff_image};
use crate::jobs::{SubmitError, SubmitOptions, WorkSpec};
use crate::store::inputs::{InputStatus, StoredFile};
use crate::store::jobs::Job;

/// Workers heard from within this long make up "the fleet" whose nodes are served.
const FRESH_WORKER_SECS: i64 = 60;
/// `GET /history` without `max_items` lists at most this many of the latest prompts.
const DEFAULT_HISTORY_ITEMS: i64 = 200;
/// Most prompts one `GET /history` lists.
const MAX_HISTORY_ITEMS: i64 = 1000;
/// Priority a `front: true` prompt gets, ahead of the tenant's default 0.
const FRONT_PRIORITY: i32 = 1;
/// Prefix of the idempotency key that reserves a client-chosen `prompt_id`.
const PROMPT_ID_KEY: &str = "comfyui-prompt-id:";

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

fn json_response(v: &Value) -> Response {
    Response::builder()
        .content_type("application/json; charset=utf-8")
        .body(v.to_string())
}

fn status_only(status: StatusCode) -> Response {
    Response::builder().status(status).body(Bytes::new())
}

/// What aiohttp answers when a handler raises, e.g. on a body that is not JSON.
fn server_error() -> Response {
    Response::builder()
        .status(StatusCode::INTERNAL_SERVER_ERROR)
        .content_type("text/plain; charset=utf-8")
        .body("500 Internal Server Error\n\nServer got itself in trouble")
}

/// A 400 in ComfyUI's `/prompt` error shape.
fn prompt_error(kind: &str, message: &str, details: &str) -> Response {
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

fn internal(e: impl std::fmt::Display) -> Response {
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
fn caller(req: &Request) -> Result<(AppState, TenantId), Response> {
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
             ?api_key=<key>, or sign in for a session cookie",
        )
        .into_poem_response()),
    }
}

macro_rules! caller_or_return {
    ($req:expr) => {
        match caller($req) {
            Ok(c) => c,
            Err(resp) => return resp,
        }
    };
}

/// The body as a JSON object, or `None` when it is not one.
fn json_object(body: &[u8]) -> Option<Map<String, Value>> {
    match serde_json::from_slice(body) {
        Ok(Value::Object(m)) => Some(m),
        _ => None,
    }
}

/// Python's truthiness for the flags ComfyUI reads with `if json_data["clear"]`.
fn truthy(v: &Value) -> bool {
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

/// A job's ComfyUI `number`: its creation time in ms, negated when it was put in
/// front, so it orders the tenant's prompts like ComfyUI's counter does.
fn number_of(job: &Job) -> i64 {
    let n = job.created_at.timestamp_millis();
    if job.priority > 0 { -n } else { n }
}

/// The output nodes a queue item lists: the graph's sinks.
fn outputs_to_execute(job: &Job) -> Vec<String> {
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
fn queue_item(job: &Job) -> Value {
    json!([
        number_of(job),
        job.id.to_string(),
        job.graph,
        job.extra_data,
        outputs_to_execute(job)
    ])
}

#[handler]
async fn post_prompt(req: &Request, body: Bytes) -> Response {
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
    let Some(prompt) = request.remove("prompt") else {
        return prompt_error("no_prompt", "No prompt provided", "No prompt provided");
    };
    if !prompt.is_object() {
        return server_error();
    }
    let prompt_id = match request.get("prompt_id") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if uuid::Uuid::parse_str(s).is_ok() => Some(s.clone()),
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

    // Validation at the door: a typo is answered with ComfyUI's own 400 now, not
    // after the prompt waited for a worker. Without a worker online the job service's
    // structural checks are all there is.
    let node_errors = match door_check(&state, &prompt).await {
        Ok(report) => report,
        Err(resp) => return resp,
    };

    let options = SubmitOptions {
        client_id,
        priority: if front { FRONT_PRIORITY } else { 0 },
        // The key is unique per tenant, which is what makes a reused id a 400.
        idempotency_key: prompt_id.as_ref().map(|p| format!("{PROMPT_ID_KEY}{p}")),
        extra_data: Value::Object(extra_data),
        time_limit_secs: None,
    };
    match state.submit(tenant, WorkSpec::Graph(prompt), options).await {
        Ok(accepted) if accepted.replayed => prompt_id_taken(),
        Ok(accepted) => {
            let number = match number {
                Some(n) => json!(n),
                None => json!(number_of(&accepted.job)),
            };
            json_response(&json!({
                "prompt_id": accepted.job.id.to_string(),
                "number": number,
                "node_errors": node_errors,
            }))
        }
        Err(e) => submit_error(e),
    }
}

/// Checks a prompt against the fleet's node catalogue as ComfyUI would. Returns the
/// `node_errors` of a partly valid prompt (ComfyUI runs its valid outputs and reports
/// the rest with a 200), or the 400 of an invalid one.
async fn door_check(state: &AppState, prompt: &Value) -> Result<Value, Response> {
    // A prompt that is not a graph is left to the job service, which says why.
    let Ok(graph) = serde_json::from_value::<ApiGraph>(prompt.clone()) else {
        return Ok(json!({}));
    };
    let classes: Vec<String> = graph
        .class_types()
        .into_iter()
        .map(str::to_string)
        .collect();
    let schemas = match state
        .store
        .fleet_node_schemas(FRESH_WORKER_SECS, &classes)
        .await
    {
        Ok(Some(schemas)) => schemas,
        Ok(None) => return Ok(json!({})),
        Err(e) => return Err(internal(e)),
    };
    let mut union = Map::new();
    for (class, schema) in schemas {
        union.entry(class).or_insert(schema);
    }
    let catalogue: NodeCatalogue =
        serde_json::from_value(Value::Object(union)).map_err(internal)?;
    match graph.validate_against(&catalogue) {
        Ok(report) => Ok(json!(report.node_errors)),
        Err(rejected) => Err(Response::builder()
            .status(StatusCode::BAD_REQUEST)
            .content_type("application/json; charset=utf-8")
            .body(rejected.to_json().to_string())),
    }
}

fn prompt_id_taken() -> Response {
    prompt_error(
        "invalid_prompt",
        "prompt_id already exists",
        "This prompt_id was already used; send a new UUID.",
    )
}

fn submit_error(e: SubmitError) -> Response {
    match e {
        SubmitError::InvalidGraph(v) => Response::builder()
            .status(StatusCode::BAD_REQUEST)
            .content_type("application/json; charset=utf-8")
            .body(v.to_json().to_string()),
        SubmitError::IdempotencyKeyReused => prompt_id_taken(),
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
async fn get_prompt(req: &Request) -> Response {
    let (state, tenant) = caller_or_return!(req);
    match state.store.active_jobs(tenant).await {
        Ok(jobs) => json_response(&json!({"exec_info": {"queue_remaining": jobs.len()}})),
        Err(e) => internal(e),
    }
}

#[handler]
async fn get_queue(req: &Request) -> Response {
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
async fn post_queue(req: &Request, body: Bytes) -> Response {
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
async fn interrupt(req: &Request, body: Bytes) -> Response {
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
fn in_history(job: &Job) -> bool {
    job.status.is_terminal() && job.started_at.is_some()
}

/// ComfyUI's history entry of a finished job.
async fn history_entry(state: &AppState, job: &Job) -> Result<Value, Response> {
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
    let end = match job.status {
        JobStatus::Completed => {
            json!(["execution_success", {"prompt_id": pid, "timestamp": ms(job.completed_at)}])
        }
        JobStatus::Cancelled => {
            json!(["execution_interrupted", {"prompt_id": pid, "timestamp": ms(job.completed_at)}])
        }
        _ => json!(["execution_error", {"prompt_id": pid, "timestamp": ms(job.completed_at),
                     "exception_message": job.cause.as_ref().map(|c| format!("{c:?}"))}]),
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
async fn get_history(req: &Request, Query(q): Query<HashMap<String, String>>) -> Response {
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
async fn get_history_item(req: &Request, Path(prompt_id): Path<String>) -> Response {
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
async fn post_history(req: &Request, body: Bytes) -> Response {
    let _ = caller_or_return!(req);
    if json_object(&body).is_none() {
        return server_error();
    }
    status_only(StatusCode::OK)
}

// ---- files -------------------------------------------------------------------------

/// `GET /view?filename=&subfolder=&type=`: the tenant's output or input file.
/// Status codes follow ComfyUI: 400 for a `..` or absolute filename, 403 for a
/// subfolder that escapes, 404 for anything not found; all with empty bodies.
#[handler]
async fn view(req: &Request, Query(q): Query<HashMap<String, String>>) -> Response {
    let (state, tenant) = caller_or_return!(req);
    let Some(raw) = q.get("filename") else {
        return status_only(StatusCode::NOT_FOUND);
    };
    let mut kind = q.get("type").map(String::as_str).unwrap_or("output");
    // ComfyUI accepts an annotated name, `x.png [input]`, and lets it set the type.
    let mut name = raw.as_str();
    for (suffix, k) in [
        (" [output]", "output"),
        (" [input]", "input"),
        (" [temp]", "temp"),
    ] {
        if let Some(stripped) = name.strip_suffix(suffix) {
            name = stripped;
            kind = k;
        }
    }
    if name.starts_with('/') || name.contains("..") {
        return status_only(StatusCode::BAD_REQUEST);
    }
    let Ok(filename) = SafeFilename::parse(name) else {
        return status_only(StatusCode::NOT_FOUND);
    };
    let Ok(subfolder) = SafeSubfolder::parse(q.get("subfolder").map_or("", String::as_str)) else {
        return status_only(StatusCode::FORBIDDEN);
    };
    let found = match kind {
        "output" => state
            .store
            .find_output_by_name(tenant, subfolder.as_str(), filename.as_str())
            .await
            .map(|o| o.map(|o| (o.object_key, Some(o.content_type)))),
        // Inputs are stored flat (see module docs), so only the root folder has any.
        "input" if subfolder.is_root() => state
            .store
            .find_input_by_filename(tenant, filename.as_str())
            .await
            .map(|i| {
                i.filter(|i| i.status == InputStatus::Ready)
                    .and_then(|i| i.object_key.map(|k| (k, i.content_type)))
            }),
        _ => Ok(None),
    };
    let (object_key, content_type) = match found {
        Ok(Some(found)) => found,
        Ok(None) => return status_only(StatusCode::NOT_FOUND),
        Err(e) => return internal(e),
    };
    let Ok(key) = ObjectKey::parse(&object_key) else {
        return status_only(StatusCode::NOT_FOUND);
    };
    if key.tenant() != tenant {
        return status_only(StatusCode::NOT_FOUND);
    }
    match file_response(&state, &key, content_type.as_deref()).await {
        Ok(resp) => resp,
        Err(e) if e.is_not_found() => status_only(StatusCode::NOT_FOUND),
        Err(e) => internal(e),
    }
}

/// `POST /upload/image` (multipart `image`, optional `subfolder`, `overwrite`): stores
/// the image as a tenant input under the client's own name when that name is safe,
/// because ComfyUI clients put the returned `name` into LoadImage. A different image
/// under a taken name gets `name (1).ext`, as in ComfyUI; the same bytes reuse it.
#[handler]
async fn upload_image(req: &Request, mut multipart: Multipart) -> Response {
    let (state, tenant) = caller_or_return!(req);
    let mut image: Option<(String, Bytes)> = None;
    let mut overwrite = false;
    loop {
        let field = match multipart.next_field().await {
            Ok(Some(field)) => field,
            Ok(None) => break,
            Err(_) => return status_only(StatusCode::BAD_REQUEST),
        };
        match field.name() {
            Some("image") => {
                let original = field.file_name().unwrap_or("image.png").to_string();
                match read_limited(field.into_async_read(), state.max_upload).await {
                    Ok(bytes) => image = Some((original, bytes)),
                    Err(crate::files::UploadError::TooLarge { .. }) => {
                        return status_only(StatusCode::PAYLOAD_TOO_LARGE);
                    }
                    Err(_) => return status_only(StatusCode::BAD_REQUEST),
                }
            }
            Some("overwrite") => {
                let v = field.text().await.unwrap_or_default();
                overwrite = matches!(v.trim(), "true" | "1");
            }
            // `subfolder` and `type` are read by ComfyUI; here every upload is a flat
            // input, so they are accepted and not used.
            _ => {}
        }
    }
    let Some((original, bytes)) = image else {
        return status_only(StatusCode::BAD_REQUEST);
    };
    let Some(kind) = sniff_image(&bytes) else {
        return status_only(StatusCode::BAD_REQUEST);
    };
    // A browser may send `C:\fakepath\x.png`; only the last component is a name.
    let base = original.rsplit(['/', '\\']).next().unwrap_or_default();
    let wanted = match SafeFilename::parse(base) {
        Ok(n) => n,
        Err(_) => crate::files::unique_upload_name(base, Utc::now(), &mut rand::thread_rng()),
    };
    let (stem, ext) = match wanted.as_str().rsplit_once('.') {
        Some((s, e)) if !s.is_empty() => (s.to_string(), format!(".{e}")),
        _ => (wanted.as_str().to_string(), String::new()),
    };
    for n in 0..100u32 {
        let candidate = if n == 0 {
            wanted.as_str().to_string()
        } else {
            format!("{stem} ({n}){ext}")
        };
        let Ok(name) = SafeFilename::parse(&candidate) else {
            break;
        };
        let existing = match state
            .store
            .find_input_by_filename(tenant, name.as_str())
            .await
        {
            Ok(e) => e,
            Err(e) => return internal(e),
        };
        match existing {
            None => {
                let key = ObjectKey::input(tenant, &name);
                // The record first: its unique name is what claims the object key, so
                // a concurrent upload of another image never overwrites this one.
                let stored = state
                    .store
                    .insert_ready_input(
                        tenant,
                        StoredFile {
                            filename: name.as_str(),
                            content_type: kind.mime(),
                            object_key: key.as_str(),
                            size_bytes: bytes.len() as i64,
                        },
                    )
                    .await;
                let events = match stored {
                    Ok((_, events)) => events,
                    // Another upload took the name in between: try the next one.
                    Err(crate::store::StoreError::Conflict(_)) => continue,
                    Err(e) => return internal(e),
                };
                if let Err(e) = state.files.put(&key, bytes.clone()).await {
                    return internal(e);
                }
                state.publish(&events).await;
                return upload_reply(name.as_str());
            }
            Some(input) => {
                let Some(key) = input
                    .object_key
                    .as_deref()
                    .and_then(|k| ObjectKey::parse(k).ok())
                else {
                    continue;
                };
                if overwrite {
                    // The record keeps its first size; workers read the object itself.
                    if let Err(e) = state.files.put(&key, bytes.clone()).await {
                        return internal(e);
                    }
                    return upload_reply(name.as_str());
                }
                if input.size_bytes == Some(bytes.len() as i64)
                    && state.files.get(&key).await.is_ok_and(|b| b == bytes)
                {
                    return upload_reply(name.as_str());
                }
            }
        }
    }
    Problem::new(
        StatusCode::CONFLICT,
        "name_taken",
        "too many different images under this name; rename the file",
    )
    .into_poem_response()
}

fn upload_reply(name: &str) -> Response {
    json_response(&json!({"name": name, "subfolder": "", "type": "input"}))
}

// ---- the node catalogue and the server -------------------------------------------

/// The union of the fresh workers' `/object_info`; the newest worker's schema of a
/// class wins. Empty when no worker is online.
async fn fleet_object_info(state: &AppState) -> Result<Map<String, Value>, Response> {
    let docs = state
        .store
        .fleet_object_info(FRESH_WORKER_SECS)
        .await
        .map_err(internal)?;
    let mut union = Map::new();
    for doc in docs {
        if let Value::Object(classes) = doc {
            for (class, schema) in classes {
                union.entry(class).or_insert(schema);
            }
        }
    }
    Ok(union)
}

#[handler]
async fn object_info(req: &Request) -> Response {
    let (state, _) = caller_or_return!(req);
    match fleet_object_info(&state).await {
        Ok(union) => json_response(&Value::Object(union)),
        Err(resp) => resp,
    }
}

#[handler]
async fn object_info_class(req: &Request, Path(class): Path<String>) -> Response {
    let (state, _) = caller_or_return!(req);
    let classes = [class.clone()];
    match state
        .store
        .fleet_node_schemas(FRESH_WORKER_SECS, &classes)
        .await
    {
        Ok(schemas) => match schemas.and_then(|s| s.into_iter().next()) {
            Some((_, schema)) => json_response(&json!({ class: schema })),
            None => json_response(&json!({})),
        },
        Err(e) => internal(e),
    }
}

#[handler]
async fn system_stats(req: &Request) -> Response {
    let (state, _) = caller_or_return!(req);
    let version = state
        .store
        .list_workers(FRESH_WORKER_SECS)
        .await
        .ok()
        .and_then(|ws| ws.into_iter().find_map(|w| w.comfyui_version))
        .unwrap_or_else(|| "0.3.64".to_string());
    // A fleet has no single machine: the numbers describe no device in particular,
    // present only because clients read these fields.
    json_response(&json!({
        "system": {
            "os": "posix",
            "ram_total": 0,
            "ram_free": 0,
            "comfyui_version": version,
            "required_frontend_version": "1.27.10",
            "installed_templates_version": "0.1.95",
            "required_templates_version": "0.1.95",
            "python_version": concat!("comfyfleet ", env!("CARGO_PKG_VERSION")),
            "pytorch_version": "",
            "embedded_python": false,
            "argv": ["comfyfleet"],
        },
        "devices": [],
    }))
}

#[handler]
async fn features(req: &Request) -> Response {
    let (state, _) = caller_or_return!(req);
    json_response(&json!({
        "supports_preview_metadata": true,
        "max_upload_size": state.max_upload.get(),
    }))
}

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
async fn comfy_ws(req: &Request, Query(q): Query<HashMap<String, String>>) -> Response {
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

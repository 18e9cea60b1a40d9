//! The Runner API (seed 004): `/api/run/...`. Paths, fields and response shapes are
//! the seed's; errors use its `{"detail": …}` body, except where the seed is silent.

use poem::Body;
use poem::web::Data;
use poem_openapi::param::{Path, Query};
use poem_openapi::payload::{self, Binary, Json};
use poem_openapi::types::Any;
use poem_openapi::types::multipart::Upload;
use poem_openapi::{ApiResponse, Multipart, Object, OpenApi};
use serde_json::{Value, json};

use super::problem::{ApiError, Problem};
use super::security::Auth;
use super::uploads::file_response;
use super::{ApiTags, AppState};
use crate::catalog::Workflow;
use crate::domain::ids::JobId;
use crate::domain::job::JobStatus;
use crate::files::{ObjectKey, SafeFilename, SafeSubfolder};
use crate::jobs::{SubmitError, SubmitOptions, WorkSpec};
use crate::store::inputs::InputStatus;

pub struct RunnerApi;

/// A workflow manifest, as `manifest.yaml` has it.
#[derive(Debug, Object)]
pub struct ManifestView {
    pub id: String,
    pub name: String,
    #[oai(rename = "type")]
    pub kind: String,
    pub category: String,
    pub description: String,
    pub inputs: Vec<ManifestInput>,
    pub outputs: Vec<ManifestOutput>,
    pub required_models: Vec<String>,
    pub required_nodes: Vec<String>,
}

#[derive(Debug, Object)]
pub struct ManifestInput {
    pub id: String,
    /// text, int, float, bool, seed, image or select.
    #[oai(rename = "type")]
    pub kind: String,
    pub label: String,
    /// The node the input is bound to (an integer or a string, as the manifest has it).
    pub node_id: Any<Value>,
    pub field: String,
    #[oai(skip_serializing_if_is_none)]
    pub default: Option<Any<Value>>,
    #[oai(skip_serializing_if_is_none)]
    pub min: Option<Any<Value>>,
    #[oai(skip_serializing_if_is_none)]
    pub max: Option<Any<Value>>,
    #[oai(skip_serializing_if_is_none)]
    pub options: Option<Vec<Any<Value>>>,
}

#[derive(Debug, Object)]
pub struct ManifestOutput {
    #[oai(rename = "type")]
    pub kind: String,
    pub format: String,
}

impl From<&Workflow> for ManifestView {
    fn from(w: &Workflow) -> Self {
        // The manifest's own serde shape is the contract; the view re-reads it so the
        // two can never drift.
        let v = serde_json::to_value(&w.manifest).expect("a manifest serialises");
        let s = |key: &str| v[key].as_str().unwrap_or_default().to_string();
        let strings = |key: &str| -> Vec<String> {
            v[key]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|x| x.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default()
        };
        let opt = |x: &Value| (!x.is_null()).then(|| Any(x.clone()));
        ManifestView {
            id: s("id"),
            name: s("name"),
            kind: s("type"),
            category: s("category"),
            description: s("description"),
            inputs: v["inputs"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|i| ManifestInput {
                    id: i["id"].as_str().unwrap_or_default().into(),
                    kind: i["type"].as_str().unwrap_or_default().into(),
                    label: i["label"].as_str().unwrap_or_default().into(),
                    node_id: Any(i["node_id"].clone()),
                    field: i["field"].as_str().unwrap_or_default().into(),
                    default: opt(&i["default"]),
                    min: opt(&i["min"]),
                    max: opt(&i["max"]),
                    options: i["options"]
                        .as_array()
                        .map(|o| o.iter().cloned().map(Any).collect()),
                })
                .collect(),
            outputs: v["outputs"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|o| ManifestOutput {
                    kind: o["type"].as_str().unwrap_or_default().into(),
                    format: o["format"].as_str().unwrap_or_default().into(),
                })
                .collect(),
            required_models: strings("required_models"),
            required_nodes: strings("required_nodes"),
        }
    }
}

/// The seed's error body.
#[derive(Debug, Object)]
pub struct Detail {
    /// A message, or for validation failures an object with `message`, `errors`
    /// (one per bad parameter) and ComfyUI's `node_errors`.
    pub detail: Any<Value>,
}

#[derive(Debug, ApiResponse)]
pub enum RunnerError {
    /// Invalid parameters or an invalid workflow graph.
    #[oai(status = 400)]
    BadRequest(Json<Detail>),
    /// No such workflow, job or file in the caller's tenant.
    #[oai(status = 404)]
    NotFound(Json<Detail>),
    /// The same Idempotency-Key with a different request.
    #[oai(status = 409)]
    Conflict(Json<Detail>),
    /// The upload is larger than the limit.
    #[oai(status = 413)]
    TooLarge(Json<Detail>),
    /// Something failed on our side.
    #[oai(status = 500)]
    Internal(Json<Detail>),
    /// The requested format is not available yet.
    #[oai(status = 501, content_type = "application/problem+json")]
    NotImplemented(Json<Box<Problem>>),
}

impl RunnerError {
    pub fn detail(status: u16, detail: Value) -> Self {
        let body = Json(Detail {
            detail: Any(detail),
        });
        match status {
            400 => Self::BadRequest(body),
            404 => Self::NotFound(body),
            409 => Self::Conflict(body),
            413 => Self::TooLarge(body),
            _ => Self::Internal(body),
        }
    }

    pub fn not_found(what: &str) -> Self {
        Self::detail(404, json!(format!("{what} not found")))
    }
}

impl From<ApiError> for RunnerError {
    fn from(e: ApiError) -> Self {
        let (status, p) = match e {
            ApiError::BadRequest(p) => (400, p),
            ApiError::Unauthorized(p) | ApiError::Forbidden(p) | ApiError::NotFound(p) => (404, p),
            ApiError::Conflict(p) => (409, p),
            ApiError::Internal(p) => (500, p),
        };
        Self::detail(status, json!(p.0.detail))
    }
}

impl From<crate::store::StoreError> for RunnerError {
    fn from(e: crate::store::StoreError) -> Self {
        ApiError::from(e).into()
    }
}

impl From<SubmitError> for RunnerError {
    fn from(e: SubmitError) -> Self {
        match e {
            SubmitError::UnknownWorkflow(id) => Self::not_found(&format!("workflow {id:?}")),
            SubmitError::InvalidParams(errors) => Self::detail(
                400,
                json!({
                    "message": "invalid parameters",
                    "errors": errors,
                }),
            ),
            SubmitError::InvalidGraph(comfy) => {
                let mut body = comfy.to_json();
                if let Value::Object(map) = &mut body {
                    map.insert("message".into(), json!("the workflow graph is invalid"));
                }
                Self::detail(400, body)
            }
            SubmitError::IdempotencyKeyReused => Self::detail(409, json!(e.to_string())),
            SubmitError::Store(s) => s.into(),
            other => Self::detail(400, json!(other.to_string())),
        }
    }
}

/// The multipart body of `build` and `execute`.
#[derive(Debug, Multipart)]
pub struct RunForm {
    /// JSON object of parameters keyed by input id (default `{}`).
    pub params: Option<String>,
    /// An input image for the workflow's image input.
    pub input_image: Option<Upload>,
}

#[derive(Debug, Object)]
pub struct ExecuteResponse {
    /// The job id; also ComfyUI's prompt id.
    pub prompt_id: String,
    /// The WebSocket client id the job reports to.
    pub client_id: String,
    /// Seed inputs and the values used (random ones included).
    pub seeds: Any<Value>,
}

/// `GET /api/run/status/{prompt_id}`: one of the seed's four shapes.
#[derive(Debug, Object)]
pub struct RunStatus {
    /// pending, running, completed or error.
    pub status: String,
    #[oai(skip_serializing_if_is_none)]
    pub node_title: Option<String>,
    #[oai(skip_serializing_if_is_none)]
    pub node_type: Option<String>,
    #[oai(skip_serializing_if_is_none)]
    pub step: Option<i64>,
    #[oai(skip_serializing_if_is_none)]
    pub total_steps: Option<i64>,
    #[oai(skip_serializing_if_is_none)]
    pub percent: Option<i64>,
    #[oai(skip_serializing_if_is_none)]
    pub nodes_done: Option<i64>,
    #[oai(skip_serializing_if_is_none)]
    pub total_nodes: Option<i64>,
    #[oai(skip_serializing_if_is_none)]
    pub effective_total: Option<i64>,
    #[oai(skip_serializing_if_is_none)]
    pub cached_count: Option<i64>,
    #[oai(skip_serializing_if_is_none)]
    pub eta_seconds: Option<f64>,
    #[oai(skip_serializing_if_is_none)]
    pub step_rate: Option<f64>,
    #[oai(skip_serializing_if_is_none)]
    pub node_outputs: Option<Any<Value>>,
    #[oai(skip_serializing_if_is_none)]
    pub outputs: Option<Any<Value>>,
    #[oai(skip_serializing_if_is_none)]
    pub error: Option<String>,
}

impl RunStatus {
    fn bare(status: &str) -> Self {
        RunStatus {
            status: status.into(),
            node_title: None,
            node_type: None,
            step: None,
            total_steps: None,
            percent: None,
            nodes_done: None,
            total_nodes: None,
            effective_total: None,
            cached_count: None,
            eta_seconds: None,
            step_rate: None,
            node_outputs: None,
            outputs: None,
            error: None,
        }
    }
}

#[derive(Debug, Multipart)]
pub struct UploadImageForm {
    /// A PNG, JPEG or WebP image.
    pub file: Upload,
}

#[derive(Debug, Object)]
pub struct UploadedImage {
    /// The stored name; pass it as `_existing_input_image` (or a LoadImage input).
    pub filename: String,
}

/// A file's bytes; the Content-Type header says what it is.
#[derive(ApiResponse)]
pub enum FileResponse {
    #[oai(status = 200)]
    File(Binary<Body>),
}

/// Preferred kind of result for `GET /api/run/result/{prompt_id}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, poem_openapi::Enum)]
#[oai(rename_all = "lowercase")]
pub enum OutputPreference {
    Video,
    Image,
}

/// Which stored file `GET /api/comfyui/view` reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, poem_openapi::Enum)]
#[oai(rename_all = "lowercase")]
pub enum ViewType {
    Input,
    Output,
}

async fn serve_file(
    state: &AppState,
    object_key: &str,
    content_type: &str,
) -> Result<payload::Response<FileResponse>, RunnerError> {
    let key = ObjectKey::parse(object_key).map_err(|_| RunnerError::not_found("file"))?;
    let resp = file_response(state, &key, Some(content_type))
        .await
        .map_err(|e| {
            if e.is_not_found() {
                RunnerError::not_found("file")
            } else {
                tracing::error!(error = %e, "reading a stored file failed");
                RunnerError::detail(500, json!("could not read the file"))
            }
        })?;
    let (parts, body) = resp.into_parts();
    let mut out = payload::Response::new(FileResponse::File(Binary(body)));
    for (name, value) in parts.headers.iter() {
        out = out.header(name.clone(), value.clone());
    }
    Ok(out)
}

/// The running shape, from the job's latest progress snapshot.
async fn running_status(state: &AppState, job: JobId) -> RunStatus {
    let snapshot: Value = match state.publisher.snapshots.get(job).await {
        Some(bytes) => serde_json::from_slice(&bytes).unwrap_or_default(),
        None => Value::Null,
    };
    let int = |k: &str| Some(snapshot[k].as_i64().unwrap_or(0));
    let text = |k: &str| snapshot[k].as_str().map(String::from);
    RunStatus {
        node_title: text("node_title"),
        node_type: text("node_type"),
        step: int("step"),
        total_steps: int("total_steps"),
        percent: int("percent"),
        nodes_done: int("nodes_done"),
        total_nodes: int("total_nodes"),
        effective_total: int("effective_total"),
        cached_count: int("cached_count"),
        eta_seconds: snapshot["eta_seconds"].as_f64(),
        step_rate: snapshot["step_rate"].as_f64(),
        node_outputs: Some(Any(snapshot
            .get("node_outputs")
            .cloned()
            .unwrap_or_else(|| json!({})))),
        ..RunStatus::bare("running")
    }
}

/// Accepted values of `format` for `build`.
#[derive(Debug, Clone, Copy, poem_openapi::Enum)]
#[oai(rename_all = "lowercase")]
pub enum BuildFormat {
    /// Flat dict of node ids, ready for ComfyUI's `/prompt`.
    Api,
    /// ComfyUI's UI format (nodes with positions, links).
    Workflow,
}

fn parse_params(raw: Option<&str>) -> Result<Value, RunnerError> {
    match raw.map(str::trim).filter(|s| !s.is_empty()) {
        None => Ok(json!({})),
        Some(text) => serde_json::from_str(text)
            .map_err(|e| RunnerError::detail(400, json!(format!("params is not valid JSON: {e}")))),
    }
}

#[OpenApi(tag = "ApiTags::Runner")]
impl RunnerApi {
    /// List the workflows this fleet offers.
    #[oai(path = "/api/run", method = "get", operation_id = "listWorkflows")]
    async fn list(&self, state: Data<&AppState>, _auth: Auth) -> Json<Vec<ManifestView>> {
        Json(
            state
                .jobs
                .catalog()
                .list()
                .map(ManifestView::from)
                .collect(),
        )
    }

    /// The manifest of one workflow: inputs, outputs, requirements.
    #[oai(
        path = "/api/run/:workflow_id",
        method = "get",
        operation_id = "getWorkflow"
    )]
    async fn get(
        &self,
        state: Data<&AppState>,
        _auth: Auth,
        workflow_id: Path<String>,
    ) -> Result<Json<ManifestView>, RunnerError> {
        let id = crate::domain::manifest::WorkflowId::parse(&workflow_id)
            .map_err(|_| RunnerError::not_found("workflow"))?;
        let workflow = state
            .jobs
            .catalog()
            .get(&id)
            .ok_or_else(|| RunnerError::not_found("workflow"))?;
        Ok(Json(ManifestView::from(workflow)))
    }

    /// Build a workflow with parameters applied, without running it.
    #[oai(
        path = "/api/run/:workflow_id/build",
        method = "post",
        operation_id = "buildWorkflow"
    )]
    async fn build(
        &self,
        state: Data<&AppState>,
        auth: Auth,
        workflow_id: Path<String>,
        /// `api` (default) or `workflow`.
        format: Query<Option<BuildFormat>>,
        form: RunForm,
    ) -> Result<Json<Any<Value>>, RunnerError> {
        let params = parse_params(form.params.as_deref())?;
        let uploaded = match form.input_image {
            Some(upload) => {
                Some(super::uploads::store_image(&state, auth.principal(), upload).await?)
            }
            None => None,
        };
        let built = state
            .jobs
            .build(&workflow_id, &params, uploaded.as_deref())?;
        match format.0.unwrap_or(BuildFormat::Api) {
            BuildFormat::Api => Ok(Json(Any(
                serde_json::to_value(&built.graph).expect("a graph serialises")
            ))),
            BuildFormat::Workflow => {
                Err(RunnerError::NotImplemented(Json(Box::new(Problem::new(
                    poem::http::StatusCode::NOT_IMPLEMENTED,
                    "not_implemented",
                    "format=workflow (ComfyUI's UI format) is not available yet; use format=api",
                )))))
            }
        }
    }

    /// Run a workflow. Seeds of -1 are drawn at random and reported in `seeds`.
    #[oai(
        path = "/api/run/:workflow_id/execute",
        method = "post",
        operation_id = "executeWorkflow"
    )]
    async fn execute(
        &self,
        state: Data<&AppState>,
        auth: Auth,
        workflow_id: Path<String>,
        form: RunForm,
    ) -> Result<Json<ExecuteResponse>, RunnerError> {
        let principal = auth.principal();
        let params = parse_params(form.params.as_deref())?;
        let uploaded_image = match form.input_image {
            Some(upload) => Some(super::uploads::store_image(&state, principal, upload).await?),
            None => None,
        };
        let client_id = uuid::Uuid::new_v4().simple().to_string();
        let accepted = state
            .submit(
                principal.tenant_id,
                WorkSpec::Workflow {
                    id: workflow_id.0,
                    params,
                    uploaded_image,
                },
                SubmitOptions {
                    client_id: Some(client_id.clone()),
                    ..SubmitOptions::default()
                },
            )
            .await?;
        Ok(Json(ExecuteResponse {
            prompt_id: accepted.job.id.to_string(),
            client_id,
            seeds: Any(json!(accepted.seeds)),
        }))
    }

    /// Upload an input image; returns the unique name to use in later runs.
    #[oai(
        path = "/api/run/upload-image",
        method = "post",
        operation_id = "uploadImage"
    )]
    async fn upload_image(
        &self,
        state: Data<&AppState>,
        auth: Auth,
        form: UploadImageForm,
    ) -> Result<Json<UploadedImage>, RunnerError> {
        let filename = super::uploads::store_image(&state, auth.principal(), form.file).await?;
        Ok(Json(UploadedImage { filename }))
    }

    /// The result file of a completed job (video preferred over images unless
    /// `output_type=image`).
    #[oai(
        path = "/api/run/result/:prompt_id",
        method = "get",
        operation_id = "getRunResult"
    )]
    async fn result(
        &self,
        state: Data<&AppState>,
        auth: Auth,
        prompt_id: Path<String>,
        output_type: Query<Option<OutputPreference>>,
    ) -> Result<payload::Response<FileResponse>, RunnerError> {
        let tenant = auth.principal().tenant_id;
        let id: JobId = prompt_id
            .parse()
            .map_err(|_| RunnerError::not_found("job"))?;
        let job = state
            .store
            .get_job(tenant, id)
            .await?
            .ok_or_else(|| RunnerError::not_found("job"))?;
        if job.status != JobStatus::Completed {
            return Err(RunnerError::detail(
                404,
                json!(format!("result not ready: the job is {}", job.status)),
            ));
        }
        let outputs = state.store.list_outputs(tenant, id).await?;
        let preferred = match output_type.0.unwrap_or(OutputPreference::Video) {
            OutputPreference::Video => ["video", "image"],
            OutputPreference::Image => ["image", "video"],
        };
        let chosen = preferred
            .iter()
            .find_map(|kind| outputs.iter().find(|o| o.kind == *kind))
            .or_else(|| outputs.first())
            .ok_or_else(|| RunnerError::not_found("output"))?;
        serve_file(&state, &chosen.object_key, &chosen.content_type).await
    }

    /// An input or output file of the tenant, addressed as ComfyUI's `/view` does.
    #[oai(path = "/api/comfyui/view", method = "get", operation_id = "viewFile")]
    async fn view(
        &self,
        state: Data<&AppState>,
        auth: Auth,
        filename: Query<String>,
        /// `input` (default) or `output`.
        #[oai(name = "type")]
        kind: Query<Option<ViewType>>,
        subfolder: Query<Option<String>>,
    ) -> Result<payload::Response<FileResponse>, RunnerError> {
        let tenant = auth.principal().tenant_id;
        let bad = |e: crate::files::NameError| RunnerError::detail(400, json!(e.to_string()));
        let name = SafeFilename::parse(&filename).map_err(bad)?;
        let sub = SafeSubfolder::parse(subfolder.0.as_deref().unwrap_or("")).map_err(bad)?;
        match kind.0.unwrap_or(ViewType::Input) {
            ViewType::Input => {
                if !sub.is_root() {
                    return Err(RunnerError::not_found("file"));
                }
                let input = state
                    .store
                    .find_input_by_filename(tenant, name.as_str())
                    .await?
                    .filter(|i| i.status == InputStatus::Ready)
                    .ok_or_else(|| RunnerError::not_found("file"))?;
                let key = input
                    .object_key
                    .ok_or_else(|| RunnerError::not_found("file"))?;
                let ct = input
                    .content_type
                    .unwrap_or_else(|| crate::files::content_type_for(name.as_str()).into());
                serve_file(&state, &key, &ct).await
            }
            ViewType::Output => {
                let output = state
                    .store
                    .find_output_by_name(tenant, sub.as_str(), name.as_str())
                    .await?
                    .ok_or_else(|| RunnerError::not_found("file"))?;
                serve_file(&state, &output.object_key, &output.content_type).await
            }
        }
    }

    /// Poll a job: pending, running (with progress), completed (with outputs) or error.
    #[oai(
        path = "/api/run/status/:prompt_id",
        method = "get",
        operation_id = "getRunStatus"
    )]
    async fn status(
        &self,
        state: Data<&AppState>,
        auth: Auth,
        prompt_id: Path<String>,
    ) -> Result<Json<RunStatus>, RunnerError> {
        let tenant = auth.principal().tenant_id;
        let id: JobId = prompt_id
            .parse()
            .map_err(|_| RunnerError::not_found("job"))?;
        let job = state
            .store
            .get_job(tenant, id)
            .await?
            .ok_or_else(|| RunnerError::not_found("job"))?;
        let status = match job.status {
            JobStatus::Accepted | JobStatus::Uploaded | JobStatus::Queued => RunStatus {
                step: Some(0),
                total_steps: Some(0),
                ..RunStatus::bare("pending")
            },
            JobStatus::Running => running_status(&state, job.id).await,
            JobStatus::Completed => RunStatus {
                outputs: Some(Any(super::uploads::runner_outputs(&state, &job).await?)),
                ..RunStatus::bare("completed")
            },
            JobStatus::Failed | JobStatus::Invalid => RunStatus {
                error: Some(match &job.cause {
                    Some(c) => format!("{}: {}", c.exception_type, c.exception_message),
                    None => format!("job {}", job.status),
                }),
                ..RunStatus::bare("error")
            },
            JobStatus::Cancelled => RunStatus {
                error: Some("job was cancelled".into()),
                ..RunStatus::bare("error")
            },
        };
        Ok(Json(status))
    }
}

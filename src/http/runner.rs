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

pub use super::runner_types::{ManifestView, RunStatus, RunnerError};
use super::security::Auth;
use super::uploads::file_response;
use super::{ApiTags, AppState};
use crate::domain::graph::{ApiGraph, ui_format};
use crate::domain::ids::JobId;
use crate::domain::job::JobStatus;
use crate::domain::node_catalogue::NodeCatalogue;
use crate::files::{ObjectKey, SafeFilename, SafeSubfolder};
use crate::jobs::{SubmitOptions, WorkSpec};
use crate::store::inputs::InputStatus;

pub struct RunnerApi;

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

/// The `params` of a `build`/`execute` form, and the stored name of its image.
async fn read_form(
    state: &AppState,
    principal: &crate::auth::Principal,
    form: RunForm,
) -> Result<(Value, Option<String>), RunnerError> {
    let params = parse_params(form.params.as_deref())?;
    let uploaded = match form.input_image {
        Some(upload) => Some(super::uploads::store_image(state, principal, upload).await?),
        None => None,
    };
    Ok((params, uploaded))
}

/// The tenant's job with this id; anything else (malformed, unknown, another
/// tenant's) is 404.
async fn find_job(
    state: &AppState,
    tenant: crate::domain::ids::TenantId,
    raw: &str,
) -> Result<crate::store::jobs::Job, RunnerError> {
    let id: JobId = raw.parse().map_err(|_| RunnerError::not_found("job"))?;
    state
        .store
        .get_job(tenant, id)
        .await?
        .ok_or_else(|| RunnerError::not_found("job"))
}

/// The node schemas of the classes `graph` uses, as the fleet's fresh workers report
/// them (the newest worker's schema of a class wins, as in door validation).
async fn fleet_catalogue(state: &AppState, graph: &ApiGraph) -> Result<NodeCatalogue, RunnerError> {
    let classes: Vec<String> = graph
        .class_types()
        .into_iter()
        .map(str::to_string)
        .collect();
    match state
        .store
        .fleet_catalogue(super::comfy::FRESH_WORKER_SECS, &classes)
        .await
    {
        Ok(catalogue) => Ok(catalogue.unwrap_or_default()),
        Err(e @ crate::store::StoreError::Corrupt(_)) => {
            tracing::error!(error = %e, "a worker reported a node schema we cannot read");
            Err(RunnerError::detail(
                500,
                json!("the fleet's node schemas could not be read"),
            ))
        }
        Err(e) => Err(e.into()),
    }
}

/// A graph the fleet's schemas cannot describe is the fleet's gap (503, it may be
/// filled when another worker comes); anything else is a broken catalogue graph.
fn conversion_error(e: ui_format::UiFormatError) -> RunnerError {
    if e.is_schema_gap() {
        RunnerError::detail(503, json!(e.to_string()))
    } else {
        tracing::error!(error = %e, "a built graph could not be converted to the UI format");
        RunnerError::detail(500, json!(e.to_string()))
    }
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
    ///
    /// `format=api` (default) answers the ComfyUI API-format graph; `format=workflow`
    /// answers ComfyUI's UI format (nodes laid out left to right, widget values, links
    /// table), converted with the node schemas the fleet's workers report. A 503 says
    /// which node class no fresh worker reports.
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
        let (params, uploaded) = read_form(&state, auth.principal(), form).await?;
        let built = state
            .jobs
            .build(&workflow_id, &params, uploaded.as_deref())?;
        let body = match format.0.unwrap_or(BuildFormat::Api) {
            BuildFormat::Api => serde_json::to_value(&built.graph),
            BuildFormat::Workflow => {
                let catalogue = fleet_catalogue(&state, &built.graph).await?;
                let workflow =
                    ui_format::to_workflow(&built.graph, &catalogue).map_err(conversion_error)?;
                serde_json::to_value(&workflow)
            }
        };
        Ok(Json(Any(body.expect("plain data serialises"))))
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
        let (params, uploaded_image) = read_form(&state, principal, form).await?;
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
        let job = find_job(&state, tenant, &prompt_id).await?;
        let id = job.id;
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
        let job = find_job(&state, tenant, &prompt_id).await?;
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

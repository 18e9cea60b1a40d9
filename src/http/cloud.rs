//! The cloud jobs API (seed 002's REST side): `/developer/api/v1/jobs`.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use poem::web::Data;
use poem_openapi::param::{Header, Path, Query};
use poem_openapi::payload::Json;
use poem_openapi::types::Any;
use poem_openapi::{ApiResponse, Object, OpenApi};
use serde_json::Value;

use super::keys::parse_id;
use super::problem::{ApiError, FieldProblem};
use super::security::Auth;
use super::views::JobView;
use super::{ApiTags, AppState};
use crate::domain::ids::{JobId, TenantId};
use crate::domain::job::JobStatus;
use crate::jobs::{SubmitError, SubmitOptions, WorkSpec};
use crate::store::jobs::{Cancelled, Job, JobCursor};

pub struct CloudApi;

#[derive(Debug, Object)]
pub struct CreateJobRequest {
    /// A ComfyUI API-format graph to run. Give this or `workflow_id`.
    pub workflow: Option<Any<Value>>,
    /// A manifest workflow to run (see `GET /api/run`). Give this or `workflow`.
    pub workflow_id: Option<String>,
    /// Parameters for `workflow_id`, keyed by input id.
    pub params: Option<Any<Value>>,
    /// Higher runs first, from -100 to 100. Default 0.
    #[oai(default)]
    pub priority: i32,
    /// Longest the job may run, in seconds (1 to 86400); it is then interrupted and
    /// fails with a `Timeout` cause.
    #[oai(validator(minimum(value = "1"), maximum(value = "86400")))]
    pub time_limit_secs: Option<u32>,
}

#[derive(ApiResponse)]
pub enum CreateJobResponse {
    /// The job was created and queued.
    #[oai(status = 201)]
    Created(Json<JobView>),
    /// A retry with the same Idempotency-Key and body: the original job.
    #[oai(status = 200)]
    Replayed(Json<JobView>),
}

#[derive(Debug, Object)]
pub struct JobPage {
    pub jobs: Vec<JobView>,
    /// Pass as `cursor` for the next page; null on the last page.
    pub next_cursor: Option<String>,
}

/// Longest `wait` a long poll may ask for, in seconds.
pub const MAX_WAIT_SECS: u64 = 60;
const MAX_PAGE: i64 = 200;

pub(super) fn submit_error(e: SubmitError) -> ApiError {
    match e {
        SubmitError::UnknownWorkflow(id) => ApiError::not_found(&format!("workflow {id:?}")),
        SubmitError::InvalidParams(errors) => ApiError::invalid_fields(
            errors
                .into_iter()
                .map(|e| FieldProblem {
                    field: format!("params.{}", e.field),
                    message: e.message,
                })
                .collect(),
        ),
        SubmitError::InvalidGraph(comfy) => {
            let fields = comfy
                .node_errors
                .iter()
                .flat_map(|(node, errs)| {
                    errs.errors.iter().map(move |e| FieldProblem {
                        field: format!("workflow.{node}"),
                        message: format!("{}: {}", e.message, e.details),
                    })
                })
                .collect::<Vec<_>>();
            if fields.is_empty() {
                ApiError::bad_request(format!("{}: {}", comfy.error.message, comfy.error.details))
            } else {
                ApiError::invalid_fields(fields)
            }
        }
        SubmitError::IdempotencyKeyReused | SubmitError::JobIdTaken => {
            ApiError::conflict(e.to_string())
        }
        SubmitError::Store(s) => s.into(),
        other => ApiError::bad_request(other.to_string()),
    }
}

fn encode_cursor(job: &Job) -> String {
    URL_SAFE_NO_PAD.encode(format!("{}.{}", job.created_at.timestamp_micros(), job.id))
}

fn decode_cursor(raw: &str) -> Result<JobCursor, ApiError> {
    let bad = || ApiError::bad_request("cursor is not one this API issued");
    let text =
        String::from_utf8(URL_SAFE_NO_PAD.decode(raw).map_err(|_| bad())?).map_err(|_| bad())?;
    let (micros, id) = text.split_once('.').ok_or_else(bad)?;
    let created_at = micros
        .parse::<i64>()
        .ok()
        .and_then(chrono::DateTime::from_timestamp_micros)
        .ok_or_else(bad)?;
    let id: JobId = id.parse().map_err(|_| bad())?;
    Ok(JobCursor { created_at, id })
}

fn parse_statuses(raw: Option<&str>) -> Result<Vec<JobStatus>, ApiError> {
    raw.into_iter()
        .flat_map(|s| s.split(','))
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse().map_err(|e: crate::domain::job::UnknownStatus| {
                ApiError::bad_request(e.to_string())
            })
        })
        .collect()
}

pub(super) async fn job_view(state: &AppState, job: &Job) -> Result<JobView, ApiError> {
    Ok(job_views(state, std::slice::from_ref(job)).await?.remove(0))
}

/// Views of several jobs; the fleet is read once for all the queued ones.
pub(super) async fn job_views(state: &AppState, jobs: &[Job]) -> Result<Vec<JobView>, ApiError> {
    let workers = if jobs.iter().any(|j| j.status == JobStatus::Queued) {
        state.store.list_workers(WORKER_FRESH_SECS).await?
    } else {
        Vec::new()
    };
    let mut views = Vec::with_capacity(jobs.len());
    for job in jobs {
        let outputs = super::uploads::output_views(state, job).await?;
        let mut view = JobView::new(job, outputs);
        if job.status == JobStatus::Queued {
            view.queue_reason = queue_reason(job, &workers);
        }
        views.push(view);
    }
    Ok(views)
}

/// Workers seen within this many seconds count as online.
const WORKER_FRESH_SECS: i64 = 60;

/// Why no online worker can take `job`, if none can.
fn queue_reason(job: &Job, workers: &[crate::store::workers::WorkerRecord]) -> Option<String> {
    if workers.is_empty() {
        return Some("no worker is online".into());
    }
    let missing_for = |w: &crate::store::workers::WorkerRecord| -> Vec<&str> {
        job.required_nodes
            .iter()
            .filter(|n| !w.node_classes.contains(n))
            .chain(job.required_models.iter().filter(|m| !w.models.contains(m)))
            .map(String::as_str)
            .collect()
    };
    let closest = workers.iter().map(missing_for).min_by_key(Vec::len)?;
    (!closest.is_empty()).then(|| {
        format!(
            "no online worker offers everything this job needs; missing: {}",
            closest.join(", ")
        )
    })
}

async fn find_job(state: &AppState, tenant: TenantId, raw_id: &str) -> Result<Job, ApiError> {
    let id: JobId = parse_id(raw_id, "job")?;
    state
        .store
        .get_job(tenant, id)
        .await?
        .ok_or_else(|| ApiError::not_found("job"))
}

#[OpenApi(prefix_path = "/developer/api/v1", tag = "ApiTags::Jobs")]
impl CloudApi {
    /// Create a job from a raw graph or a manifest workflow. Send an
    /// `Idempotency-Key` to make retries safe.
    #[oai(path = "/jobs", method = "post", operation_id = "createJob")]
    async fn create(
        &self,
        state: Data<&AppState>,
        auth: Auth,
        body: Json<CreateJobRequest>,
        /// Retrying with the same key and body returns the original job; a different
        /// body with the same key is refused with 409.
        #[oai(name = "Idempotency-Key")]
        idempotency_key: Header<Option<String>>,
    ) -> Result<CreateJobResponse, ApiError> {
        let body = body.0;
        let spec = match (body.workflow, body.workflow_id) {
            (Some(graph), None) => {
                if body.params.is_some() {
                    return Err(ApiError::bad_request(
                        "params go with workflow_id; a raw workflow carries its own values",
                    ));
                }
                WorkSpec::Graph(graph.0)
            }
            (None, Some(id)) => WorkSpec::Workflow {
                id,
                params: body.params.map(|p| p.0).unwrap_or(Value::Null),
                uploaded_image: None,
            },
            (Some(_), Some(_)) => {
                return Err(ApiError::bad_request(
                    "give either workflow or workflow_id, not both",
                ));
            }
            (None, None) => {
                return Err(ApiError::bad_request(
                    "give workflow (a ComfyUI API-format graph) or workflow_id",
                ));
            }
        };
        let accepted = state
            .submit(
                auth.principal().tenant_id,
                spec,
                SubmitOptions {
                    priority: body.priority,
                    idempotency_key: idempotency_key.0,
                    time_limit_secs: body.time_limit_secs,
                    job_id: None,
                    ..SubmitOptions::default()
                },
            )
            .await
            .map_err(submit_error)?;
        let view = job_view(&state, &accepted.job).await?;
        Ok(if accepted.replayed {
            CreateJobResponse::Replayed(Json(view))
        } else {
            CreateJobResponse::Created(Json(view))
        })
    }

    /// One job. With `wait=N` (seconds, at most 60) the answer waits until the job
    /// is finished or the time is up.
    #[oai(path = "/jobs/:job_id", method = "get", operation_id = "getJob")]
    async fn get(
        &self,
        state: Data<&AppState>,
        auth: Auth,
        job_id: Path<String>,
        wait: Query<Option<u64>>,
    ) -> Result<Json<JobView>, ApiError> {
        let tenant = auth.principal().tenant_id;
        let mut job = find_job(&state, tenant, &job_id).await?;
        let wait = wait.0.unwrap_or(0);
        if wait > MAX_WAIT_SECS {
            return Err(ApiError::bad_request(format!(
                "wait must be at most {MAX_WAIT_SECS} seconds"
            )));
        }
        if wait > 0 && !job.status.is_terminal() {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(wait);
            job = state.wait_for_terminal(tenant, job, deadline).await?;
        }
        Ok(Json(job_view(&state, &job).await?))
    }

    /// The tenant's jobs, newest first, optionally filtered by status
    /// (`status=queued,running`).
    #[oai(path = "/jobs", method = "get", operation_id = "listJobs")]
    async fn list(
        &self,
        state: Data<&AppState>,
        auth: Auth,
        status: Query<Option<String>>,
        cursor: Query<Option<String>>,
        /// Page size, 1 to 200 (default 50).
        limit: Query<Option<i64>>,
    ) -> Result<Json<JobPage>, ApiError> {
        let tenant = auth.principal().tenant_id;
        let statuses = parse_statuses(status.0.as_deref())?;
        let after = cursor.0.as_deref().map(decode_cursor).transpose()?;
        let limit = limit.0.unwrap_or(50);
        if !(1..=MAX_PAGE).contains(&limit) {
            return Err(ApiError::bad_request(format!(
                "limit must be between 1 and {MAX_PAGE}"
            )));
        }
        let mut jobs = state
            .store
            .list_jobs(tenant, &statuses, after, limit + 1)
            .await?;
        let next_cursor = if jobs.len() as i64 > limit {
            jobs.truncate(limit as usize);
            jobs.last().map(encode_cursor)
        } else {
            None
        };
        Ok(Json(JobPage {
            jobs: job_views(&state, &jobs).await?,
            next_cursor,
        }))
    }

    /// Cancel a job: a waiting job is cancelled at once; a running one is
    /// interrupted on its worker and ends `cancelled`.
    #[oai(
        path = "/jobs/:job_id/cancel",
        method = "post",
        operation_id = "cancelJob"
    )]
    async fn cancel(
        &self,
        state: Data<&AppState>,
        auth: Auth,
        job_id: Path<String>,
    ) -> Result<Json<JobView>, ApiError> {
        let tenant = auth.principal().tenant_id;
        let id: JobId = parse_id(&job_id, "job")?;
        let job = match state.cancel(tenant, id).await? {
            None => return Err(ApiError::not_found("job")),
            Some(Cancelled::Now(job, _)) | Some(Cancelled::Requested(job)) => job,
            Some(Cancelled::AlreadyFinished(job)) => {
                return Err(ApiError::conflict(format!(
                    "job already finished ({}); nothing to cancel",
                    job.status
                )));
            }
        };
        Ok(Json(job_view(&state, &job).await?))
    }
}

//! The Runner API's payloads (seed 004): the manifest view, the status shapes, and
//! the `{"detail": …}` error body with the conversions into it.

use poem_openapi::payload::Json;
use poem_openapi::types::Any;
use poem_openapi::{ApiResponse, Object};
use serde_json::{Value, json};

use super::problem::ApiError;
use crate::catalog::Workflow;
use crate::jobs::SubmitError;

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
    /// Longest a run may take, in seconds, if the manifest sets a limit.
    #[oai(skip_serializing_if_is_none)]
    pub time_limit_secs: Option<u64>,
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
            time_limit_secs: v["time_limit_secs"].as_u64(),
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
    /// No fresh worker reports the node schemas the request needs (`build` with
    /// `format=workflow`), or they do not fit the workflow's graph.
    #[oai(status = 503)]
    Unavailable(Json<Detail>),
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
            503 => Self::Unavailable(body),
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
            SubmitError::IdempotencyKeyReused | SubmitError::JobIdTaken => {
                Self::detail(409, json!(e.to_string()))
            }
            SubmitError::Store(s) => s.into(),
            other => Self::detail(400, json!(other.to_string())),
        }
    }
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
    pub(super) fn bare(status: &str) -> Self {
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

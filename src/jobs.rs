//! The job service: turns a submit request (a manifest workflow with params, or a raw
//! ComfyUI graph) into a validated, queued job, and answers cancels. Handlers of every
//! dialect call this; none of them builds or validates a graph on its own.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::catalog::WorkflowCatalog;
use crate::domain::graph::{ApiGraph, ComfyValidationError};
use crate::domain::ids::{JobId, TenantId};
use crate::domain::manifest::WorkflowId;
use crate::domain::params::{self, BuiltWorkflow, ParamError};
use crate::store::events::StoredEvent;
use crate::store::jobs::{Cancelled, Job, NewJob, Submitted};
use crate::store::{Store, StoreError};

/// What to run.
#[derive(Clone, Debug)]
pub enum WorkSpec {
    /// A manifest workflow with Runner-style params.
    Workflow {
        id: String,
        params: Value,
        /// Stored name of an image uploaded with this very request.
        uploaded_image: Option<String>,
    },
    /// A raw ComfyUI API-format graph.
    Graph(Value),
}

/// How to run it.
#[derive(Clone, Debug, Default)]
pub struct SubmitOptions {
    /// ComfyUI `client_id`: whose socket hears about the run (ComfyUI dialect).
    pub client_id: Option<String>,
    pub priority: i32,
    pub idempotency_key: Option<String>,
    pub extra_data: Value,
    /// Longest the job may run, in seconds; a manifest's own limit wins if smaller.
    pub time_limit_secs: Option<u32>,
    /// An id the client chose (ComfyUI's `prompt_id`); a fresh one when absent.
    pub job_id: Option<JobId>,
    /// ComfyUI's `number` of a prompt posted through the ComfyUI dialect.
    pub comfy_number: Option<f64>,
}

/// A job the service accepted.
#[derive(Debug)]
pub struct Accepted {
    pub job: Job,
    /// Seed inputs and the values used (drawn ones included).
    pub seeds: BTreeMap<String, i64>,
    /// True when an idempotent retry returned the original job.
    pub replayed: bool,
    /// Events the submit appended (empty on replay); the caller publishes them.
    pub events: Vec<StoredEvent>,
}

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("workflow {0:?} not found")]
    UnknownWorkflow(String),
    #[error("invalid parameters")]
    InvalidParams(Vec<ParamError>),
    #[error("the workflow graph is invalid")]
    InvalidGraph(ComfyValidationError),
    #[error("workflow must be a ComfyUI API-format graph (an object of nodes): {0}")]
    NotAGraph(String),
    #[error("input files not found: {}; upload them first", .0.join(", "))]
    MissingInputs(Vec<String>),
    #[error("this Idempotency-Key was used with a different request")]
    IdempotencyKeyReused,
    /// A client-chosen job id that is already taken.
    #[error("this job id is already taken")]
    JobIdTaken,
    #[error("{0}")]
    InvalidOption(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Longest idempotency key accepted.
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;
/// Priorities a tenant may ask for.
pub const PRIORITY_RANGE: std::ops::RangeInclusive<i32> = -100..=100;

#[derive(Clone)]
pub struct JobService {
    store: Store,
    catalog: Arc<WorkflowCatalog>,
}

impl JobService {
    pub fn new(store: Store, catalog: Arc<WorkflowCatalog>) -> Self {
        Self { store, catalog }
    }

    pub fn catalog(&self) -> &WorkflowCatalog {
        &self.catalog
    }

    /// Builds a manifest workflow without running it (Runner `build`).
    pub fn build(
        &self,
        workflow_id: &str,
        params: &Value,
        uploaded_image: Option<&str>,
    ) -> Result<BuiltWorkflow, SubmitError> {
        let workflow = self.workflow(workflow_id)?;
        params::build(
            &workflow.manifest,
            &workflow.graph,
            params,
            uploaded_image,
            &mut rand::thread_rng(),
        )
        .map_err(SubmitError::InvalidParams)
    }

    fn workflow(&self, id: &str) -> Result<&crate::catalog::Workflow, SubmitError> {
        WorkflowId::parse(id)
            .ok()
            .and_then(|wid| self.catalog.get(&wid))
            .ok_or_else(|| SubmitError::UnknownWorkflow(id.to_string()))
    }

    /// Validates and queues a job.
    pub async fn submit(
        &self,
        tenant: TenantId,
        spec: WorkSpec,
        options: SubmitOptions,
    ) -> Result<Accepted, SubmitError> {
        if let Some(key) = &options.idempotency_key
            && (key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY_LEN)
        {
            return Err(SubmitError::InvalidOption(format!(
                "Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY_LEN} characters"
            )));
        }
        if !PRIORITY_RANGE.contains(&options.priority) {
            return Err(SubmitError::InvalidOption(format!(
                "priority must be between {} and {}",
                PRIORITY_RANGE.start(),
                PRIORITY_RANGE.end()
            )));
        }
        let request_digest = options
            .idempotency_key
            .as_ref()
            .map(|_| request_digest(&spec, &options));

        let mut time_limit = options.time_limit_secs;
        let (workflow_id, graph, params, seeds, required_nodes, mut required_models, input_files) =
            match &spec {
                WorkSpec::Workflow {
                    id,
                    params,
                    uploaded_image,
                } => {
                    let workflow = self.workflow(id)?;
                    let built = params::build(
                        &workflow.manifest,
                        &workflow.graph,
                        params,
                        uploaded_image.as_deref(),
                        &mut rand::thread_rng(),
                    )
                    .map_err(SubmitError::InvalidParams)?;
                    let files = built.image_inputs.iter().map(|(_, f)| f.clone()).collect();
                    time_limit = match (time_limit, workflow.manifest.time_limit_secs) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    };
                    (
                        Some(workflow.id().as_str().to_string()),
                        built.graph,
                        params.clone(),
                        built.seeds,
                        workflow.required_nodes(),
                        workflow.manifest.required_models.clone(),
                        files,
                    )
                }
                WorkSpec::Graph(raw) => {
                    let graph: ApiGraph = parse_graph(raw)?;
                    graph.check_structure().map_err(SubmitError::InvalidGraph)?;
                    let nodes = graph.class_types().into_iter().map(String::from).collect();
                    let files = image_files_of(&graph);
                    (
                        None,
                        graph,
                        json!({}),
                        BTreeMap::new(),
                        nodes,
                        Vec::new(),
                        files,
                    )
                }
            };
        for model in models_named_in(&graph) {
            if !required_models.contains(&model) {
                required_models.push(model);
            }
        }
        let missing = self.store.missing_inputs(tenant, &input_files).await?;
        if !missing.is_empty() {
            return Err(SubmitError::MissingInputs(missing));
        }
        let new = NewJob {
            id: options.job_id.unwrap_or_default(),
            workflow_id,
            graph: serde_json::to_value(&graph).expect("a graph serialises"),
            params,
            seeds: json!(seeds),
            client_id: options.client_id.clone(),
            extra_data: options.extra_data.clone(),
            priority: options.priority,
            required_nodes: required_nodes.into_iter().collect(),
            required_models,
            input_files,
            time_limit_secs: time_limit.map(|t| t.min(i32::MAX as u32) as i32),
            comfy_number: options.comfy_number,
            idempotency_key: options.idempotency_key.clone(),
            request_digest,
        };
        let submitted = match self.store.submit_job(tenant, new).await {
            Err(StoreError::Conflict(_)) => return Err(SubmitError::JobIdTaken),
            other => other?,
        };
        match submitted {
            Submitted::Created(job, events) => Ok(Accepted {
                job,
                seeds,
                replayed: false,
                events,
            }),
            Submitted::Replayed(job) => {
                let seeds = serde_json::from_value(job.seeds.clone()).unwrap_or_default();
                Ok(Accepted {
                    job,
                    seeds,
                    replayed: true,
                    events: Vec::new(),
                })
            }
            Submitted::KeyReused => Err(SubmitError::IdempotencyKeyReused),
        }
    }

    pub async fn cancel(
        &self,
        tenant: TenantId,
        id: JobId,
    ) -> Result<Option<Cancelled>, StoreError> {
        self.store.cancel_job(tenant, id).await
    }
}

fn parse_graph(raw: &Value) -> Result<ApiGraph, SubmitError> {
    if !raw.is_object() {
        return Err(SubmitError::NotAGraph("expected a JSON object".into()));
    }
    serde_json::from_value(raw.clone()).map_err(|e| SubmitError::NotAGraph(e.to_string()))
}

/// Files LoadImage-style nodes read from ComfyUI's input folder.
fn image_files_of(graph: &ApiGraph) -> Vec<String> {
    let mut files = BTreeSet::new();
    for (_, node) in graph.nodes() {
        if matches!(node.class_type(), Some("LoadImage" | "LoadImageMask"))
            && let Some(Value::String(name)) = node.inputs.get("image")
        {
            files.insert(name.clone());
        }
    }
    files.into_iter().collect()
}

/// Model files named by loader inputs; a worker must have them to run the graph.
fn models_named_in(graph: &ApiGraph) -> Vec<String> {
    const MODEL_FIELDS: &[&str] = &[
        "ckpt_name",
        "unet_name",
        "vae_name",
        "clip_name",
        "clip_name1",
        "clip_name2",
        "lora_name",
        "control_net_name",
        "upscale_model_name",
        "model_name",
    ];
    let mut models = BTreeSet::new();
    for (_, node) in graph.nodes() {
        for field in MODEL_FIELDS {
            if let Some(Value::String(name)) = node.inputs.get(*field) {
                models.insert(name.clone());
            }
        }
    }
    models.into_iter().collect()
}

/// What makes two submits "the same request" for idempotency: everything the
/// client sent, nothing the server decided (drawn seeds, ids).
fn request_digest(spec: &WorkSpec, options: &SubmitOptions) -> [u8; 32] {
    let canonical = match spec {
        WorkSpec::Workflow {
            id,
            params,
            uploaded_image,
        } => json!({"workflow_id": id, "params": params, "image": uploaded_image}),
        WorkSpec::Graph(g) => json!({"graph": g}),
    };
    let body = json!({
        "spec": canonical,
        "client_id": options.client_id,
        "priority": options.priority,
        "extra_data": options.extra_data,
        "time_limit_secs": options.time_limit_secs,
    });
    Sha256::digest(serde_json::to_vec(&body).expect("JSON serialises")).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn models_and_images_are_found_in_raw_graphs() {
        let graph: ApiGraph = serde_json::from_value(json!({
            "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd.safetensors"}},
            "2": {"class_type": "LoadImage", "inputs": {"image": "cat.png"}},
            "3": {"class_type": "ImageInvert", "inputs": {"image": ["2", 0]}}
        }))
        .unwrap();
        assert_eq!(models_named_in(&graph), ["sd.safetensors"]);
        assert_eq!(image_files_of(&graph), ["cat.png"]);
    }

    #[test]
    fn the_digest_ignores_nothing_the_client_sent() {
        let spec = WorkSpec::Graph(json!({"1": {}}));
        let a = request_digest(&spec, &SubmitOptions::default());
        let b = request_digest(
            &spec,
            &SubmitOptions {
                priority: 1,
                ..Default::default()
            },
        );
        assert_ne!(a, b);
        assert_eq!(a, request_digest(&spec, &SubmitOptions::default()));
    }
}

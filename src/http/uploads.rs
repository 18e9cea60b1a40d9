//! TEMPORARY scaffold until the files layer lands.
use poem_openapi::types::multipart::Upload;
use serde_json::{Value, json};

use super::AppState;
use super::problem::ApiError;
use super::runner::RunnerError;
use super::views::OutputView;
use crate::auth::Principal;
use crate::store::jobs::Job;

pub async fn store_image(_s: &AppState, _p: &Principal, _u: Upload) -> Result<String, RunnerError> {
    Err(RunnerError::detail(500, json!("x")))
}
pub async fn output_views(_s: &AppState, _j: &Job) -> Result<Vec<OutputView>, ApiError> {
    Ok(vec![])
}
pub async fn runner_outputs(_s: &AppState, _j: &Job) -> Result<Value, RunnerError> {
    Ok(json!({}))
}

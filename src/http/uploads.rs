//! Files over HTTP: storing uploaded images, the signed `/files/...` links that serve
//! inputs and outputs without credentials, and the output views every surface shows.

use bytes::Bytes;
use chrono::Utc;
use poem::http::{StatusCode, header};
use poem::web::Query;
use poem::{Body, Request, Response, handler};
use poem_openapi::types::multipart::Upload;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::AppState;
use super::problem::{ApiError, Problem};
use super::runner::RunnerError;
use super::views::OutputView;
use crate::auth::Principal;
use crate::files::{
    FilesError, ObjectKey, UploadError, content_type_for, read_limited, sniff_image,
    unique_upload_name,
};
use crate::store::inputs::StoredFile;
use crate::store::jobs::Job;
use crate::store::outputs::OutputRecord;

/// Why an upload was refused.
#[derive(Debug, thiserror::Error)]
pub enum UploadRefused {
    #[error("{0}")]
    TooLarge(String),
    #[error("{0}")]
    NotAnImage(String),
    #[error("upload failed: {0}")]
    Failed(String),
}

impl From<UploadRefused> for RunnerError {
    fn from(e: UploadRefused) -> Self {
        let status = match e {
            UploadRefused::TooLarge(_) => 413,
            UploadRefused::NotAnImage(_) => 400,
            UploadRefused::Failed(_) => 500,
        };
        RunnerError::detail(status, json!(e.to_string()))
    }
}

/// Reads an uploaded image (size-limited, sniffed by magic bytes), stores it under
/// the tenant's inputs with a unique name, and records it as a ready input.
pub async fn store_image(
    state: &AppState,
    principal: &Principal,
    upload: Upload,
) -> Result<String, UploadRefused> {
    let original = upload.file_name().unwrap_or("upload").to_string();
    let bytes = read_limited(upload.into_async_read(), state.max_upload)
        .await
        .map_err(|e| match e {
            UploadError::TooLarge { .. } => UploadRefused::TooLarge(e.to_string()),
            UploadError::Read(_) => UploadRefused::Failed(e.to_string()),
        })?;
    let kind = sniff_image(&bytes).ok_or_else(|| {
        UploadRefused::NotAnImage(format!(
            "{original:?} is not a PNG, JPEG or WebP image (checked by its content)"
        ))
    })?;
    let name = unique_upload_name(&original, Utc::now(), &mut rand::thread_rng());
    let key = ObjectKey::input(principal.tenant_id, &name);
    let size = bytes.len() as i64;
    state
        .files
        .put(&key, bytes)
        .await
        .map_err(|e| UploadRefused::Failed(e.to_string()))?;
    let (input, events) = state
        .store
        .insert_ready_input(
            principal.tenant_id,
            StoredFile {
                filename: name.as_str(),
                content_type: kind.mime(),
                object_key: key.as_str(),
                size_bytes: size,
            },
        )
        .await
        .map_err(|e| UploadRefused::Failed(e.to_string()))?;
    state.publish(&events).await;
    Ok(input.filename)
}

/// A signed, credential-free URL for a stored object.
pub fn signed_url(state: &AppState, object_key: &str) -> Option<String> {
    let key = ObjectKey::parse(object_key).ok()?;
    let path = format!("/files/{}", key.to_url_path());
    let signed = state.links.sign(&path, Utc::now());
    let base = state.public_url.as_str().trim_end_matches('/');
    Some(format!("{base}{signed}"))
}

fn output_view(state: &AppState, o: &OutputRecord) -> OutputView {
    OutputView {
        id: o.id.to_string(),
        kind: o.kind.clone(),
        filename: o.filename.clone(),
        content_type: o.content_type.clone(),
        size_bytes: o.size_bytes,
        download_url: signed_url(state, &o.object_key).unwrap_or_default(),
    }
}

/// The outputs of a job as clients see them, with fresh signed links.
pub async fn output_views(state: &AppState, job: &Job) -> Result<Vec<OutputView>, ApiError> {
    if job.status != crate::domain::job::JobStatus::Completed {
        return Ok(Vec::new());
    }
    let outputs = state.store.list_outputs(job.tenant_id, job.id).await?;
    Ok(outputs.iter().map(|o| output_view(state, o)).collect())
}

/// Seed 004's `outputs` of a completed status: the first output of each kind, by
/// kind (`{"video": {filename, subfolder, type}}`).
pub async fn runner_outputs(state: &AppState, job: &Job) -> Result<Value, RunnerError> {
    let outputs = state.store.list_outputs(job.tenant_id, job.id).await?;
    let mut map = Map::new();
    for o in outputs {
        map.entry(o.kind.clone()).or_insert_with(
            || json!({"filename": o.filename, "subfolder": o.subfolder, "type": "output"}),
        );
    }
    Ok(Value::Object(map))
}

/// Serves a stored object as a response: the right Content-Type, inline.
pub async fn file_response(
    state: &AppState,
    key: &ObjectKey,
    content_type: Option<&str>,
) -> Result<Response, FilesError> {
    let stream = state.files.get_stream(key).await?;
    let content_type = content_type
        .map(str::to_string)
        .unwrap_or_else(|| content_type_for(key.filename()).to_string());
    let disposition = format!(
        "inline; filename=\"{}\"",
        key.filename().replace(['"', '\\'], "_")
    );
    Ok(Response::builder()
        .content_type(content_type)
        .header(header::CONTENT_DISPOSITION, disposition)
        .header(header::CONTENT_LENGTH, stream.meta.size)
        .header(header::CACHE_CONTROL, "private, max-age=300")
        .body(Body::from_bytes_stream(stream.body)))
}

#[derive(Deserialize)]
struct LinkQuery {
    expires: Option<String>,
    sig: Option<String>,
}

/// `GET /files/{key}?expires=&sig=`: a signed link needs no header, so an
/// `<img src>` or a plain download works.
#[handler]
pub async fn serve_signed(req: &Request, Query(q): Query<LinkQuery>) -> Response {
    let Some(state) = req.data::<AppState>() else {
        return problem(StatusCode::INTERNAL_SERVER_ERROR, "internal", "no state");
    };
    let path = req.uri().path();
    if let Err(e) = state
        .links
        .verify(path, q.expires.as_deref(), q.sig.as_deref(), Utc::now())
    {
        return problem(
            StatusCode::FORBIDDEN,
            "invalid_link",
            format!("this link is not valid: {e}"),
        );
    }
    let Some(encoded) = path.strip_prefix("/files/") else {
        return problem(StatusCode::NOT_FOUND, "not_found", "file not found");
    };
    let Ok(key) = ObjectKey::parse_url_path(encoded) else {
        return problem(StatusCode::NOT_FOUND, "not_found", "file not found");
    };
    match file_response(state, &key, None).await {
        Ok(resp) => resp,
        Err(e) if e.is_not_found() => problem(StatusCode::NOT_FOUND, "not_found", "file not found"),
        Err(e) => {
            tracing::error!(error = %e, "serving a signed file failed");
            problem(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "could not read the file",
            )
        }
    }
}

fn problem(status: StatusCode, code: &str, detail: impl Into<String>) -> Response {
    Problem::new(status, code, detail).into_poem_response()
}

/// Reads a whole object (small files such as inputs for ComfyUI).
pub async fn read_object(state: &AppState, object_key: &str) -> Result<Bytes, FilesError> {
    let key = ObjectKey::parse(object_key).map_err(|_| FilesError::NotFound {
        key: object_key.to_string(),
    })?;
    state.files.get(&key).await
}

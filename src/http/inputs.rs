//! `/developer/api/v1/inputs`: input files, uploaded directly (multipart) or fetched
//! from a URL in the background (ending as `input.ready` or `input.failed`).

use chrono::{DateTime, Utc};
use poem::web::Data;
use poem_openapi::param::{Path, Query};
use poem_openapi::payload::Json;
use poem_openapi::types::multipart::Upload;
use poem_openapi::{ApiRequest, ApiResponse, Multipart, Object, OpenApi};

use super::keys::parse_id;
use super::problem::ApiError;
use super::security::Auth;
use super::uploads::{UploadRefused, signed_url, store_image};
use super::{ApiTags, AppState};
use crate::domain::ids::{InputId, TenantId};
use crate::files::{ObjectKey, sniff_image, unique_upload_name};
use crate::store::inputs::{Input, InputStatus, StoredFile};

pub struct InputsApi;

#[derive(Debug, Object)]
pub struct InputView {
    pub id: String,
    /// pending, ready or failed.
    pub status: String,
    /// The name jobs use for it (e.g. a LoadImage `image` value).
    pub filename: String,
    pub content_type: Option<String>,
    pub size_bytes: Option<i64>,
    /// Where a URL input was fetched from.
    pub source_url: Option<String>,
    /// Why a URL input failed.
    pub error: Option<String>,
    /// A short-lived signed link to the file, once ready.
    pub download_url: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

fn view(state: &AppState, i: Input) -> InputView {
    let download_url = match (&i.status, &i.object_key) {
        (InputStatus::Ready, Some(key)) => signed_url(state, key),
        _ => None,
    };
    InputView {
        id: i.id.to_string(),
        status: i.status.as_str().into(),
        filename: i.filename,
        content_type: i.content_type,
        size_bytes: i.size_bytes,
        source_url: i.source_url,
        error: i.error,
        download_url,
        created_at: i.created_at,
        updated_at: i.updated_at,
    }
}

#[derive(Debug, Multipart)]
pub struct InputUpload {
    /// A PNG, JPEG or WebP image.
    pub file: Upload,
}

#[derive(Debug, Object)]
pub struct UrlInput {
    /// An http(s) URL on the public internet; private and loopback addresses are refused.
    #[oai(validator(max_length = 2048))]
    pub url: String,
    /// The name to store it under (made unique); default: from the URL.
    pub filename: Option<String>,
}

#[derive(ApiRequest)]
pub enum CreateInput {
    /// Upload the file itself.
    Upload(InputUpload),
    /// Have the service fetch it.
    Url(Json<UrlInput>),
}

#[derive(ApiResponse)]
pub enum CreatedInput {
    /// Uploaded and ready.
    #[oai(status = 201)]
    Ready(Json<InputView>),
    /// Accepted; it is being fetched. Watch for `input.ready` / `input.failed`.
    #[oai(status = 202)]
    Pending(Json<InputView>),
}

#[derive(Debug, ApiResponse)]
pub enum InputError {
    #[oai(status = 400, content_type = "application/problem+json")]
    BadRequest(Json<Box<super::problem::Problem>>),
    #[oai(status = 401, content_type = "application/problem+json")]
    Unauthorized(Json<Box<super::problem::Problem>>),
    #[oai(status = 404, content_type = "application/problem+json")]
    NotFound(Json<Box<super::problem::Problem>>),
    #[oai(status = 409, content_type = "application/problem+json")]
    Conflict(Json<Box<super::problem::Problem>>),
    #[oai(status = 413, content_type = "application/problem+json")]
    TooLarge(Json<Box<super::problem::Problem>>),
    #[oai(status = 500, content_type = "application/problem+json")]
    Internal(Json<Box<super::problem::Problem>>),
}

impl From<ApiError> for InputError {
    fn from(e: ApiError) -> Self {
        match e {
            ApiError::BadRequest(p) => Self::BadRequest(p),
            ApiError::Unauthorized(p) | ApiError::Forbidden(p) => Self::Unauthorized(p),
            ApiError::NotFound(p) => Self::NotFound(p),
            ApiError::Conflict(p) => Self::Conflict(p),
            ApiError::Internal(p) => Self::Internal(p),
        }
    }
}

impl From<crate::store::StoreError> for InputError {
    fn from(e: crate::store::StoreError) -> Self {
        ApiError::from(e).into()
    }
}

impl From<UploadRefused> for InputError {
    fn from(e: UploadRefused) -> Self {
        let status = match e {
            UploadRefused::TooLarge(_) => poem::http::StatusCode::PAYLOAD_TOO_LARGE,
            UploadRefused::NotAnImage(_) => poem::http::StatusCode::BAD_REQUEST,
            UploadRefused::Failed(_) => poem::http::StatusCode::INTERNAL_SERVER_ERROR,
        };
        let p = Json(Box::new(super::problem::Problem::new(
            status,
            if status.is_server_error() {
                "internal"
            } else {
                "invalid_upload"
            },
            e.to_string(),
        )));
        match status.as_u16() {
            413 => Self::TooLarge(p),
            400 => Self::BadRequest(p),
            _ => Self::Internal(p),
        }
    }
}

/// Only http(s), and a host: everything else is refused before any network I/O.
fn check_url(raw: &str) -> Result<url::Url, ApiError> {
    let url = url::Url::parse(raw)
        .map_err(|e| ApiError::bad_request(format!("url is not a valid URL: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Err(ApiError::bad_request(
            "url must be an http:// or https:// URL with a host",
        ));
    }
    Ok(url)
}

/// Fetches a URL input and settles it. Runs after the request has been answered.
async fn fetch_input(state: AppState, tenant: TenantId, id: InputId, url: String, name: String) {
    let outcome = async {
        let fetched = state.fetcher.fetch(&url).await.map_err(|e| e.to_string())?;
        let kind = sniff_image(&fetched.bytes)
            .ok_or_else(|| "the file is not a PNG, JPEG or WebP image".to_string())?;
        let safe = crate::files::SafeFilename::parse(&name).map_err(|e| e.to_string())?;
        let key = ObjectKey::input(tenant, &safe);
        let size = fetched.bytes.len() as i64;
        state
            .files
            .put(&key, fetched.bytes)
            .await
            .map_err(|e| format!("could not store the file: {e}"))?;
        Ok::<_, String>((kind, key, size))
    }
    .await;
    let settled = match &outcome {
        Ok((kind, key, size)) => {
            state
                .store
                .settle_input(
                    tenant,
                    id,
                    Ok(StoredFile {
                        filename: &name,
                        content_type: kind.mime(),
                        object_key: key.as_str(),
                        size_bytes: *size,
                    }),
                )
                .await
        }
        Err(reason) => state.store.settle_input(tenant, id, Err(reason)).await,
    };
    match settled {
        Ok(Some((_, events))) => state.publish(&events).await,
        Ok(None) => {}
        Err(e) => {
            tracing::error!(error = %e, input = %id, "could not record a URL input's outcome")
        }
    }
}

#[OpenApi(prefix_path = "/developer/api/v1", tag = "ApiTags::Jobs")]
impl InputsApi {
    /// Add an input file: upload it (multipart `file`), or give a `url` to fetch.
    #[oai(path = "/inputs", method = "post", operation_id = "createInput")]
    async fn create(
        &self,
        state: Data<&AppState>,
        auth: Auth,
        body: CreateInput,
    ) -> Result<CreatedInput, InputError> {
        let p = auth.principal();
        match body {
            CreateInput::Upload(form) => {
                let name = store_image(&state, p, form.file).await?;
                let input = state
                    .store
                    .find_input_by_filename(p.tenant_id, &name)
                    .await?
                    .ok_or_else(|| ApiError::not_found("input"))?;
                Ok(CreatedInput::Ready(Json(view(&state, input))))
            }
            CreateInput::Url(Json(req)) => {
                let url = check_url(&req.url)?;
                let hint = req.filename.clone().unwrap_or_else(|| {
                    url.path_segments()
                        .and_then(|mut s| s.next_back().map(String::from))
                        .unwrap_or_default()
                });
                let name = unique_upload_name(&hint, Utc::now(), &mut rand::thread_rng());
                let input = state
                    .store
                    .insert_pending_input(p.tenant_id, name.as_str(), url.as_str())
                    .await?;
                tokio::spawn(fetch_input(
                    state.clone(),
                    p.tenant_id,
                    input.id,
                    url.to_string(),
                    name.as_str().to_string(),
                ));
                Ok(CreatedInput::Pending(Json(view(&state, input))))
            }
        }
    }

    /// One input.
    #[oai(path = "/inputs/:input_id", method = "get", operation_id = "getInput")]
    async fn get(
        &self,
        state: Data<&AppState>,
        auth: Auth,
        input_id: Path<String>,
    ) -> Result<Json<InputView>, ApiError> {
        let id: InputId = parse_id(&input_id, "input")?;
        let input = state
            .store
            .get_input(auth.principal().tenant_id, id)
            .await?
            .ok_or_else(|| ApiError::not_found("input"))?;
        Ok(Json(view(&state, input)))
    }

    /// The tenant's inputs, newest first.
    #[oai(path = "/inputs", method = "get", operation_id = "listInputs")]
    async fn list(
        &self,
        state: Data<&AppState>,
        auth: Auth,
        /// 1 to 200, default 50.
        limit: Query<Option<i64>>,
    ) -> Result<Json<Vec<InputView>>, ApiError> {
        let limit = limit.0.unwrap_or(50);
        if !(1..=200).contains(&limit) {
            return Err(ApiError::bad_request("limit must be between 1 and 200"));
        }
        let inputs = state
            .store
            .list_inputs(auth.principal().tenant_id, limit)
            .await?;
        Ok(Json(inputs.into_iter().map(|i| view(&state, i)).collect()))
    }
}

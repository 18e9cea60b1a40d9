//! RFC 9457 problem details: the error body wherever a seed gives no other shape.

use poem::http::StatusCode;
use poem::{Body, Response};
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Object};

use crate::auth::AuthError;
use crate::store::StoreError;

pub const PROBLEM_JSON: &str = "application/problem+json";

/// An error body: `type`, `title`, `status`, `detail`, plus a stable `code` for
/// programs and, for validation failures, the fields at fault.
#[derive(Debug, Clone, Object)]
pub struct Problem {
    /// A URI naming the kind of problem; `about:blank` means the status says it all.
    #[oai(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    /// What went wrong, for a person.
    pub detail: String,
    /// A short, stable identifier for programs (e.g. `unauthorized`, `not_found`).
    pub code: String,
    /// Per-field errors of a validation failure.
    #[oai(skip_serializing_if_is_none)]
    pub errors: Option<Vec<FieldProblem>>,
}

#[derive(Debug, Clone, Object)]
pub struct FieldProblem {
    pub field: String,
    pub message: String,
}

impl Problem {
    pub fn new(status: StatusCode, code: &str, detail: impl Into<String>) -> Self {
        Self {
            kind: "about:blank".into(),
            title: status.canonical_reason().unwrap_or("Error").into(),
            status: status.as_u16(),
            detail: detail.into(),
            code: code.into(),
            errors: None,
        }
    }

    /// The problem as a plain poem response (for middleware and error handlers).
    pub fn into_poem_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = serde_json::json!({
            "type": self.kind,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            "code": self.code,
        });
        Response::builder()
            .status(status)
            .content_type(PROBLEM_JSON)
            .body(Body::from_json(body).unwrap_or_default())
    }
}

/// The error responses of the JSON APIs.
#[derive(Debug, ApiResponse)]
pub enum ApiError {
    /// The request is malformed or a value is invalid.
    #[oai(status = 400, content_type = "application/problem+json")]
    BadRequest(Json<Box<Problem>>),
    /// Missing, malformed, expired or revoked credentials.
    #[oai(status = 401, content_type = "application/problem+json")]
    Unauthorized(Json<Box<Problem>>),
    /// Authenticated, but this needs a tenant admin.
    #[oai(status = 403, content_type = "application/problem+json")]
    Forbidden(Json<Box<Problem>>),
    /// No such object in the caller's tenant.
    #[oai(status = 404, content_type = "application/problem+json")]
    NotFound(Json<Box<Problem>>),
    /// The object already exists.
    #[oai(status = 409, content_type = "application/problem+json")]
    Conflict(Json<Box<Problem>>),
    /// Something failed on our side; the detail is deliberately opaque.
    #[oai(status = 500, content_type = "application/problem+json")]
    Internal(Json<Box<Problem>>),
}

fn body(status: StatusCode, code: &str, detail: impl Into<String>) -> Json<Box<Problem>> {
    Json(Box::new(Problem::new(status, code, detail)))
}

impl ApiError {
    pub fn bad_request(detail: impl Into<String>) -> Self {
        Self::BadRequest(body(StatusCode::BAD_REQUEST, "bad_request", detail))
    }

    pub fn invalid_fields(errors: Vec<FieldProblem>) -> Self {
        let detail = errors
            .iter()
            .map(|e| format!("{}: {}", e.field, e.message))
            .collect::<Vec<_>>()
            .join("; ");
        let mut p = body(StatusCode::BAD_REQUEST, "validation_failed", detail);
        p.0.errors = Some(errors);
        Self::BadRequest(p)
    }

    pub fn unauthorized(detail: impl Into<String>) -> Self {
        Self::Unauthorized(body(StatusCode::UNAUTHORIZED, "unauthorized", detail))
    }

    pub fn forbidden(detail: impl Into<String>) -> Self {
        Self::Forbidden(body(StatusCode::FORBIDDEN, "forbidden", detail))
    }

    pub fn not_found(what: &str) -> Self {
        Self::NotFound(body(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("{what} not found"),
        ))
    }

    pub fn conflict(detail: impl Into<String>) -> Self {
        Self::Conflict(body(StatusCode::CONFLICT, "conflict", detail))
    }

    /// Logs the cause chain and answers an opaque 500: internals never reach clients.
    pub fn internal(cause: &(dyn std::error::Error + 'static)) -> Self {
        let mut chain = cause.to_string();
        let mut source = cause.source();
        while let Some(s) = source {
            chain.push_str(": ");
            chain.push_str(&s.to_string());
            source = s.source();
        }
        tracing::error!(error = %chain, "request failed");
        Self::Internal(body(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "an internal error occurred; it has been logged",
        ))
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict(what) => Self::conflict(format!("{what} already exists")),
            other => Self::internal(&other),
        }
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::Store(s) => s.into(),
            other => Self::unauthorized(other.to_string()),
        }
    }
}

/// Turns any error that escaped a handler (unknown route, unparsable body, wrong
/// method…) into a problem body, keeping its status and message.
pub async fn problem_from_error(err: poem::Error) -> Response {
    let status = err.status();
    let response = err.into_response();
    // A handler's own error response (problem+json, or a seed's JSON error shape)
    // is already what the client should see.
    let already_shaped = response
        .content_type()
        .is_some_and(|ct| ct.starts_with(PROBLEM_JSON) || ct.starts_with("application/json"));
    if already_shaped {
        return response;
    }
    let text = response.into_body().into_string().await.unwrap_or_default();
    let code = match status {
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::UNAUTHORIZED => "unauthorized",
        StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        s if s.is_server_error() => "internal",
        _ => "bad_request",
    };
    let detail = if status.is_server_error() {
        tracing::error!(%status, error = %text, "request failed outside a handler");
        "an internal error occurred; it has been logged".to_string()
    } else if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_lowercase()
    } else {
        text
    };
    Problem::new(status, code, detail).into_poem_response()
}

/// The answer to a handler that panicked: logged, and an opaque 500 problem.
pub fn panic_response(panic: Box<dyn std::any::Any + Send + 'static>) -> Response {
    let message = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".into());
    tracing::error!(panic = %message, "a request handler panicked");
    Problem::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        "an internal error occurred; it has been logged",
    )
    .into_poem_response()
}

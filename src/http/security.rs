//! Credentials at the door: one middleware resolves whichever credential a request
//! carries into a [`Principal`], and the poem-openapi security schemes (what the spec
//! declares, and what handlers take as a parameter) read that result.
//!
//! Resolving once in a middleware, rather than in each scheme's checker, is what lets
//! a refused credential be answered with its own reason ("revoked", "malformed")
//! instead of whichever scheme poem-openapi happened to try last.

use poem::http::header;
use poem::{Endpoint, IntoResponse, Request, Response, Result};
use poem_openapi::SecurityScheme;
use poem_openapi::auth::{ApiKey, Bearer};

use super::AppState;
use super::problem::{PROBLEM_JSON, Problem};
use crate::auth::{AuthError, Principal};

/// Name of the session cookie.
pub const SESSION_COOKIE: &str = "comfyfleet_session";
/// Name of the query parameter that carries an API key on WebSocket and SSE.
pub const API_KEY_QUERY: &str = "api_key";

/// Which form a credential arrived in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CredentialForm {
    Header,
    Bearer,
    /// `Authorization: Basic` with the key as the password (or as the user name when
    /// the password is empty): what ComfyUI client libraries that take a user and a
    /// password send, on HTTP and in the WebSocket URL alike. Streams and the ComfyUI
    /// dialect only; the OpenAPI operations do not list it.
    Basic,
    Cookie,
    Query,
}

/// What the middleware found; stored in the request's extensions.
#[derive(Clone, Debug)]
enum Resolution {
    Accepted(Principal, CredentialForm),
    Refused(String),
}

/// The middleware. A request carrying no credential passes through untouched; the
/// endpoint's security scheme then decides whether that is acceptable.
pub async fn resolve_credentials<E: Endpoint>(ep: E, mut req: Request) -> Result<Response> {
    let state = req
        .data::<AppState>()
        .cloned()
        .expect("AppState is installed as data outside this middleware");
    let resolution = match presented_credential(&req) {
        None => None,
        Some((form, value)) => Some(match authenticate(&state, form, &value).await {
            Ok(p) => Resolution::Accepted(p, form),
            Err(AuthError::Store(e)) => {
                return Ok(super::problem::ApiError::from(e).into_response());
            }
            Err(refused) => Resolution::Refused(refused.to_string()),
        }),
    };
    let query_form = matches!(
        resolution,
        Some(Resolution::Accepted(_, CredentialForm::Query))
    );
    if let Some(r) = &resolution {
        req.extensions_mut().insert(r.clone());
    }
    match ep.call(req).await {
        Ok(resp) => Ok(resp.into_response()),
        Err(err) if err.status() == poem::http::StatusCode::UNAUTHORIZED => {
            let resp = err.into_response();
            if resp
                .content_type()
                .is_some_and(|ct| ct.starts_with(PROBLEM_JSON))
            {
                return Ok(resp);
            }
            let detail = match resolution {
                Some(Resolution::Refused(reason)) => reason,
                _ if query_form => format!(
                    "?{API_KEY_QUERY}= is accepted only on WebSocket and SSE endpoints; \
                     send the key as X-API-Key or Authorization: Bearer"
                ),
                _ => "authentication required: send X-API-Key, Authorization: Bearer <key>, \
                      or sign in for a session cookie"
                    .to_string(),
            };
            Ok(
                Problem::new(poem::http::StatusCode::UNAUTHORIZED, "unauthorized", detail)
                    .into_poem_response(),
            )
        }
        Err(err) => Err(err),
    }
}

async fn authenticate(
    state: &AppState,
    form: CredentialForm,
    value: &str,
) -> Result<Principal, AuthError> {
    match form {
        CredentialForm::Cookie => state.auth.authenticate_session(value).await,
        _ => state.auth.authenticate_key(value).await,
    }
}

/// The credential a request carries, by precedence: `X-API-Key`, then
/// `Authorization: Bearer`, then the session cookie, then `?api_key=`.
fn presented_credential(req: &Request) -> Option<(CredentialForm, String)> {
    if let Some(v) = req.headers().get("x-api-key") {
        return Some((
            CredentialForm::Header,
            v.to_str().unwrap_or_default().to_string(),
        ));
    }
    if let Some(v) = req.headers().get(header::AUTHORIZATION) {
        let v = v.to_str().unwrap_or_default();
        if let Some(token) = v
            .strip_prefix("Bearer ")
            .or_else(|| v.strip_prefix("bearer "))
        {
            return Some((CredentialForm::Bearer, token.trim().to_string()));
        }
        if let Some(encoded) = v
            .strip_prefix("Basic ")
            .or_else(|| v.strip_prefix("basic "))
        {
            return Some((
                CredentialForm::Basic,
                basic_key(encoded).unwrap_or_default(),
            ));
        }
    }
    if let Some(token) = session_cookie(req) {
        return Some((CredentialForm::Cookie, token));
    }
    query_api_key(req).map(|k| (CredentialForm::Query, k))
}

/// The API key in a Basic credential: the password, or the user name when the
/// password is empty (`key:` and `anything:key` both work).
fn basic_key(encoded: &str) -> Option<String> {
    use base64::Engine;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let pair = String::from_utf8(raw).ok()?;
    let (user, password) = pair.split_once(':').unwrap_or((pair.as_str(), ""));
    Some(if password.is_empty() { user } else { password }.to_owned())
}

fn session_cookie(req: &Request) -> Option<String> {
    req.headers()
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == SESSION_COOKIE)
        .map(|(_, value)| value.trim_matches('"').to_string())
        .filter(|v| !v.is_empty())
}

fn query_api_key(req: &Request) -> Option<String> {
    let query = req.uri().query()?;
    url::form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == API_KEY_QUERY)
        .map(|(_, v)| v.into_owned())
}

/// What the middleware concluded about a request, for plain poem handlers (the
/// WebSocket upgrades) that cannot take a security scheme as a parameter.
#[derive(Clone, Debug)]
pub enum StreamCredential {
    Accepted(Principal, CredentialForm),
    /// A credential was presented and refused; the reason is safe to show.
    Refused(String),
    Missing,
}

/// The request's credential as resolved by [`resolve_credentials`]. Every form is
/// accepted here (header, Bearer, cookie, `?api_key=`): callers are streams.
pub fn stream_credential(req: &Request) -> StreamCredential {
    match req.extensions().get::<Resolution>() {
        Some(Resolution::Accepted(p, form)) => StreamCredential::Accepted(p.clone(), *form),
        Some(Resolution::Refused(reason)) => StreamCredential::Refused(reason.clone()),
        None => StreamCredential::Missing,
    }
}

fn accepted(req: &Request, form: CredentialForm) -> Option<Principal> {
    match req.extensions().get::<Resolution>() {
        Some(Resolution::Accepted(p, f)) if *f == form => Some(p.clone()),
        _ => None,
    }
}

async fn via_header(req: &Request, _: ApiKey) -> Option<Principal> {
    accepted(req, CredentialForm::Header)
}

async fn via_bearer(req: &Request, _: Bearer) -> Option<Principal> {
    accepted(req, CredentialForm::Bearer)
}

async fn via_cookie(req: &Request, _: ApiKey) -> Option<Principal> {
    accepted(req, CredentialForm::Cookie)
}

async fn via_query(req: &Request, _: ApiKey) -> Option<Principal> {
    accepted(req, CredentialForm::Query)
}

/// An API key in the `X-API-Key` header.
#[derive(SecurityScheme)]
#[oai(
    rename = "ApiKeyHeader",
    ty = "api_key",
    key_name = "X-API-Key",
    key_in = "header",
    checker = "via_header"
)]
pub struct ApiKeyHeader(pub Principal);

/// An API key as `Authorization: Bearer <key>`.
#[derive(SecurityScheme)]
#[oai(rename = "BearerKey", ty = "bearer", checker = "via_bearer")]
pub struct BearerKey(pub Principal);

/// The browser session cookie set by `POST /api/auth/login`.
#[derive(SecurityScheme)]
#[oai(
    rename = "SessionCookie",
    ty = "api_key",
    key_name = "comfyfleet_session",
    key_in = "cookie",
    checker = "via_cookie"
)]
pub struct SessionCookie(pub Principal);

/// An API key as `?api_key=`, for WebSocket and SSE only (browsers cannot set
/// headers on those).
#[derive(SecurityScheme)]
#[oai(
    rename = "ApiKeyQuery",
    ty = "api_key",
    key_name = "api_key",
    key_in = "query",
    checker = "via_query"
)]
pub struct ApiKeyQuery(pub Principal);

/// The credentials every REST operation accepts.
#[derive(SecurityScheme)]
pub enum Auth {
    ApiKey(ApiKeyHeader),
    Bearer(BearerKey),
    Cookie(SessionCookie),
}

impl Auth {
    pub fn principal(&self) -> &Principal {
        match self {
            Auth::ApiKey(a) => &a.0,
            Auth::Bearer(a) => &a.0,
            Auth::Cookie(a) => &a.0,
        }
    }
}

/// The credentials a streaming endpoint (WebSocket, SSE) accepts.
#[derive(SecurityScheme)]
pub enum StreamAuth {
    ApiKey(ApiKeyHeader),
    Bearer(BearerKey),
    Cookie(SessionCookie),
    Query(ApiKeyQuery),
}

impl StreamAuth {
    pub fn principal(&self) -> &Principal {
        match self {
            StreamAuth::ApiKey(a) => &a.0,
            StreamAuth::Bearer(a) => &a.0,
            StreamAuth::Cookie(a) => &a.0,
            StreamAuth::Query(a) => &a.0,
        }
    }
}

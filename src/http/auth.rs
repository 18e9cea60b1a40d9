//! `POST /api/auth/login`, `POST /api/auth/logout`, `GET /api/auth/me`.

use poem::web::Data;
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Object, OpenApi};

use super::problem::ApiError;
use super::security::{Auth, SESSION_COOKIE};
use super::{ApiTags, AppState};
use crate::auth::{Credential, Principal};

pub struct AuthApi;

#[derive(Debug, Object)]
pub struct LoginRequest {
    #[oai(validator(max_length = 254))]
    pub email: String,
    #[oai(validator(max_length = 256))]
    pub password: String,
}

/// Who the caller is.
#[derive(Debug, Object)]
pub struct Me {
    pub tenant: TenantRef,
    /// True for tenant admins (and admin API keys).
    pub is_admin: bool,
    /// `session` or `api_key`.
    pub auth_method: String,
    /// The signed-in user (session auth only).
    #[oai(skip_serializing_if_is_none)]
    pub user: Option<UserRef>,
    /// The key used (API-key auth only).
    #[oai(skip_serializing_if_is_none)]
    pub api_key: Option<KeyRef>,
}

#[derive(Debug, Object)]
pub struct TenantRef {
    pub id: String,
    pub name: String,
}

#[derive(Debug, Object)]
pub struct UserRef {
    pub id: String,
    pub email: String,
}

#[derive(Debug, Object)]
pub struct KeyRef {
    pub id: String,
    pub name: String,
}

impl From<&Principal> for Me {
    fn from(p: &Principal) -> Self {
        let (auth_method, user, api_key) = match &p.credential {
            Credential::Session { user_id, email, .. } => (
                "session",
                Some(UserRef {
                    id: user_id.to_string(),
                    email: email.clone(),
                }),
                None,
            ),
            Credential::ApiKey { key_id, name } => (
                "api_key",
                None,
                Some(KeyRef {
                    id: key_id.to_string(),
                    name: name.clone(),
                }),
            ),
        };
        Me {
            tenant: TenantRef {
                id: p.tenant_id.to_string(),
                name: p.tenant_name.clone(),
            },
            is_admin: p.is_admin,
            auth_method: auth_method.into(),
            user,
            api_key,
        }
    }
}

#[derive(ApiResponse)]
pub enum LoginResponse {
    /// Signed in; the session cookie is set.
    #[oai(status = 200)]
    Ok(Json<Me>, #[oai(header = "Set-Cookie")] String),
}

#[derive(ApiResponse)]
pub enum LogoutResponse {
    /// Signed out; the session is revoked on every pod and the cookie cleared.
    #[oai(status = 204)]
    Done(#[oai(header = "Set-Cookie")] String),
}

#[OpenApi(prefix_path = "/api/auth", tag = "ApiTags::Auth")]
impl AuthApi {
    /// Sign in with email and password; sets an HttpOnly session cookie.
    #[oai(path = "/login", method = "post", operation_id = "login")]
    async fn login(
        &self,
        state: Data<&AppState>,
        body: Json<LoginRequest>,
    ) -> Result<LoginResponse, ApiError> {
        let login = state.auth.login(&body.email, &body.password).await?;
        let max_age = (login.expires_at - chrono::Utc::now()).num_seconds().max(0);
        let cookie = session_cookie(&login.token, max_age, state.secure_cookies);
        Ok(LoginResponse::Ok(Json(Me::from(&login.principal)), cookie))
    }

    /// Sign out: revokes the session behind the cookie everywhere.
    #[oai(path = "/logout", method = "post", operation_id = "logout")]
    async fn logout(&self, state: Data<&AppState>, auth: Auth) -> Result<LogoutResponse, ApiError> {
        state.auth.logout(auth.principal()).await?;
        Ok(LogoutResponse::Done(session_cookie(
            "",
            0,
            state.secure_cookies,
        )))
    }

    /// The caller: tenant, user or key, and whether it is an admin.
    #[oai(path = "/me", method = "get", operation_id = "me")]
    async fn me(&self, auth: Auth) -> Json<Me> {
        Json(Me::from(auth.principal()))
    }
}

fn session_cookie(value: &str, max_age_secs: i64, secure: bool) -> String {
    let mut cookie = format!(
        "{SESSION_COOKIE}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age_secs}"
    );
    if secure {
        cookie.push_str("; Secure");
    }
    cookie
}

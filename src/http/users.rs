//! `GET/POST /api/users`, `GET/DELETE /api/users/{user_id}`: a tenant admin's users.

use chrono::{DateTime, Utc};
use poem::web::Data;
use poem_openapi::param::Path;
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Object, OpenApi};

use super::keys::{parse_id, require_admin};
use super::problem::{ApiError, FieldProblem};
use super::security::Auth;
use super::{ApiTags, AppState};
use crate::auth::{Credential, password};
use crate::domain::ids::UserId;
use crate::store::accounts::User;

pub struct UsersApi;

#[derive(Debug, Object)]
pub struct UserView {
    pub id: String,
    pub email: String,
    pub is_admin: bool,
    pub created_at: DateTime<Utc>,
}

impl From<User> for UserView {
    fn from(u: User) -> Self {
        Self {
            id: u.id.to_string(),
            email: u.email,
            is_admin: u.is_admin,
            created_at: u.created_at,
        }
    }
}

#[derive(Debug, Object)]
pub struct CreateUserRequest {
    #[oai(validator(max_length = 254))]
    pub email: String,
    #[oai(validator(max_length = 256))]
    pub password: String,
    #[oai(default)]
    pub is_admin: bool,
}

#[derive(ApiResponse)]
pub enum CreatedUserResponse {
    #[oai(status = 201)]
    Created(Json<UserView>),
}

#[derive(ApiResponse)]
pub enum DeletedResponse {
    /// Deleted, with the user's sessions.
    #[oai(status = 204)]
    Deleted,
}

/// A plausible email: one `@`, something on each side, no spaces.
pub fn check_email(email: &str) -> Result<(), String> {
    let ok = email.len() <= 254
        && !email.contains(char::is_whitespace)
        && matches!(email.split_once('@'), Some((local, domain))
            if !local.is_empty() && domain.contains('.') && !domain.contains('@'));
    if ok {
        Ok(())
    } else {
        Err(format!("{email:?} is not an email address"))
    }
}

#[OpenApi(prefix_path = "/api/users", tag = "ApiTags::Users")]
impl UsersApi {
    /// List the tenant's users.
    #[oai(path = "/", method = "get", operation_id = "listUsers")]
    async fn list(
        &self,
        state: Data<&AppState>,
        auth: Auth,
    ) -> Result<Json<Vec<UserView>>, ApiError> {
        let p = auth.principal();
        require_admin(p)?;
        let users = state.store.list_users(p.tenant_id).await?;
        Ok(Json(users.into_iter().map(Into::into).collect()))
    }

    /// Add a user to the tenant.
    #[oai(path = "/", method = "post", operation_id = "createUser")]
    async fn create(
        &self,
        state: Data<&AppState>,
        auth: Auth,
        body: Json<CreateUserRequest>,
    ) -> Result<CreatedUserResponse, ApiError> {
        let p = auth.principal();
        require_admin(p)?;
        let email = body.email.trim().to_string();
        let mut errors = Vec::new();
        if let Err(message) = check_email(&email) {
            errors.push(FieldProblem {
                field: "email".into(),
                message,
            });
        }
        let pw = body.password.clone();
        let hash = tokio::task::spawn_blocking(move || password::hash(&pw))
            .await
            .map_err(|e| ApiError::internal(&e))?;
        let hash = match hash {
            Ok(h) => Some(h),
            Err(e @ (password::PasswordError::TooShort | password::PasswordError::TooLong)) => {
                errors.push(FieldProblem {
                    field: "password".into(),
                    message: e.to_string(),
                });
                None
            }
            Err(e) => return Err(ApiError::internal(&e)),
        };
        let Some(hash) = hash.filter(|_| errors.is_empty()) else {
            return Err(ApiError::invalid_fields(errors));
        };
        let user = state
            .store
            .create_user(p.tenant_id, &email, &hash, body.is_admin)
            .await?;
        Ok(CreatedUserResponse::Created(Json(user.into())))
    }

    /// One user of the tenant.
    #[oai(path = "/:user_id", method = "get", operation_id = "getUser")]
    async fn get(
        &self,
        state: Data<&AppState>,
        auth: Auth,
        user_id: Path<String>,
    ) -> Result<Json<UserView>, ApiError> {
        let p = auth.principal();
        require_admin(p)?;
        let id: UserId = parse_id(&user_id, "user")?;
        let user = state
            .store
            .get_user(p.tenant_id, id)
            .await?
            .ok_or_else(|| ApiError::not_found("user"))?;
        Ok(Json(user.into()))
    }

    /// Remove a user and end their sessions. You cannot remove yourself.
    #[oai(path = "/:user_id", method = "delete", operation_id = "deleteUser")]
    async fn delete(
        &self,
        state: Data<&AppState>,
        auth: Auth,
        user_id: Path<String>,
    ) -> Result<DeletedResponse, ApiError> {
        let p = auth.principal();
        require_admin(p)?;
        let id: UserId = parse_id(&user_id, "user")?;
        if matches!(&p.credential, Credential::Session { user_id, .. } if *user_id == id) {
            return Err(ApiError::conflict(
                "you cannot delete the user you are signed in as",
            ));
        }
        if state.store.delete_user(p.tenant_id, id).await? {
            Ok(DeletedResponse::Deleted)
        } else {
            Err(ApiError::not_found("user"))
        }
    }
}

//! Who is calling: credentials (passwords, API keys, session tokens) and the
//! [`Principal`] a request acts as once one of them checks out.

pub mod api_key;
pub mod password;
pub mod service;
pub mod session_token;

use crate::domain::ids::{ApiKeyId, SessionId, TenantId, UserId};

pub use service::{AuthError, AuthService};

/// The caller of a request, resolved once at the door. Every tenant-owned query
/// takes `tenant_id` from here, so a handler cannot reach another tenant's rows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    pub tenant_id: TenantId,
    pub tenant_name: String,
    pub is_admin: bool,
    pub credential: Credential,
}

/// How the caller proved who it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Credential {
    /// A browser session (cookie).
    Session {
        session_id: SessionId,
        user_id: UserId,
        email: String,
    },
    /// An API key, in any of its accepted forms.
    ApiKey { key_id: ApiKeyId, name: String },
}

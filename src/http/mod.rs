//! The HTTP shell: poem + poem-openapi. One file per API surface; handlers extract,
//! call a service or the store, and map the result to a response.

pub mod auth;
pub mod health;
pub mod keys;
pub mod problem;
pub mod security;
pub mod users;

use std::time::Duration;

use poem::listener::{Acceptor, TcpAcceptor};
use poem::middleware::{CatchPanic, CookieJarManager};
use poem::{Endpoint, EndpointExt, Route, Server};
use poem_openapi::{OpenApiService, Tags};
use tokio_util::sync::CancellationToken;

use crate::auth::AuthService;
use crate::store::Store;

/// Everything a request handler may reach. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    pub auth: AuthService,
    /// `None` when the pod runs without Redis.
    pub redis: Option<redis::Client>,
    pub secure_cookies: bool,
    pub session_ttl: Duration,
}

#[derive(Tags)]
pub enum ApiTags {
    /// Sign-in for browser sessions.
    Auth,
    /// The tenant's API keys (tenant admins).
    Keys,
    /// The tenant's users (tenant admins).
    Users,
    /// Liveness and readiness for load balancers and orchestrators.
    Health,
}

/// The OpenAPI service: the operations and their spec. Needs no state, so
/// `comfyfleet openapi` can print the spec without a database.
pub fn api_service() -> OpenApiService<
    (
        health::HealthApi,
        auth::AuthApi,
        keys::KeysApi,
        users::UsersApi,
    ),
    (),
> {
    OpenApiService::new(
        (
            health::HealthApi,
            auth::AuthApi,
            keys::KeysApi,
            users::UsersApi,
        ),
        "comfyfleet",
        env!("CARGO_PKG_VERSION"),
    )
    .description(
        "Multi-tenant cloud API for fleets of ComfyUI workers. Authenticate with an API key \
         (X-API-Key header or Authorization: Bearer) or a session cookie from /api/auth/login.",
    )
}

/// The whole HTTP application for one API pod.
pub fn app(state: AppState) -> impl Endpoint {
    let api = api_service();
    let docs = api.swagger_ui();
    let spec = api.spec_endpoint();
    Route::new()
        .nest("/", api)
        .nest("/docs", docs)
        .at("/openapi.json", spec)
        .around(security::resolve_credentials)
        // The cookie security scheme reads cookies through poem's jar.
        .with(CookieJarManager::new())
        .data(state)
        .catch_all_error(problem::problem_from_error)
        // A bug must cost one request a 500, never the connection or the pod.
        .with(CatchPanic::new().with_handler(problem::panic_response))
}

/// Serves `app` on a listener the caller bound, until `shutdown` fires; then
/// in-flight requests get a grace period.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let acceptor = TcpAcceptor::from_tokio(listener)?;
    tracing::info!(addr = ?acceptor.local_addr(), "API listening");
    Server::new_with_acceptor(acceptor)
        .run_with_graceful_shutdown(
            app(state),
            async move { shutdown.cancelled().await },
            Some(Duration::from_secs(10)),
        )
        .await
}

//! The HTTP shell: poem + poem-openapi. One file per API surface; handlers extract,
//! call a service or the store, and map the result to a response.

pub mod admin;
pub mod auth;
pub mod cloud;
pub mod cloud_ws;
pub mod comfy;
pub mod comfy_files;
pub mod comfy_ws;
pub mod health;
pub mod inputs;
pub mod keys;
pub mod problem;
pub mod render;
pub mod replay;
pub mod runner;
pub mod runner_types;
pub mod security;
pub mod session_ws;
pub mod sse;
pub mod uploads;
pub mod users;
pub mod views;
pub mod ws;

use std::time::Duration;

use poem::listener::{Acceptor, TcpAcceptor};
use poem::middleware::{CatchPanic, CookieJarManager};
use poem::web::{LocalAddr, RemoteAddr};
use poem::{Endpoint, EndpointExt, Route, Server};
use poem_openapi::{OpenApiService, Tags};
use tokio_util::sync::CancellationToken;

use std::sync::Arc;

use crate::auth::AuthService;
use crate::bus::EnvelopeKind;
use crate::domain::ids::{JobId, TenantId};
use crate::files::{Files, LinkSigner, MaxUploadBytes, UrlFetcher};
use crate::hub::{Filter, Hub, Next};
use crate::jobs::{Accepted, JobService, SubmitError, SubmitOptions, WorkSpec};
use crate::publish::Publisher;
use crate::store::events::StoredEvent;
use crate::store::jobs::{Cancelled, Job};
use crate::store::{Store, StoreError};

/// Everything a request handler may reach. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    pub auth: AuthService,
    pub jobs: JobService,
    /// Inputs and outputs.
    pub files: Files,
    /// Signs and checks the download links of outputs and inputs.
    pub links: LinkSigner,
    pub max_upload: MaxUploadBytes,
    /// Fetches URL inputs; refuses private and loopback addresses.
    pub fetcher: Arc<UrlFetcher>,
    /// Base of the links this pod hands out.
    pub public_url: url::Url,
    /// Publishes events, progress and previews on the bus.
    pub publisher: Publisher,
    /// This pod's live connections, fed from the bus.
    pub hub: Hub,
    /// `None` when the pod runs without Redis.
    pub redis: Option<redis::Client>,
    pub secure_cookies: bool,
    pub session_ttl: Duration,
    /// The fleet's `/object_info`, rendered once per change of the worker set.
    pub object_info: Arc<comfy_files::ObjectInfoCache>,
    /// Event-log reads and replayed envelopes shared by resuming streams.
    pub replay: Arc<replay::ReplayLog>,
}

impl AppState {
    /// Submits through the job service, then publishes what the submit recorded.
    pub async fn submit(
        &self,
        tenant: TenantId,
        spec: WorkSpec,
        options: SubmitOptions,
    ) -> Result<Accepted, SubmitError> {
        let accepted = self.jobs.submit(tenant, spec, options).await?;
        self.publish(&accepted.events).await;
        if !accepted.replayed {
            crate::worker::control::wake(&self.publisher.bus, tenant).await;
        }
        Ok(accepted)
    }

    pub async fn cancel(
        &self,
        tenant: TenantId,
        id: JobId,
    ) -> Result<Option<Cancelled>, StoreError> {
        let outcome = self.jobs.cancel(tenant, id).await?;
        match &outcome {
            Some(Cancelled::Now(_, events)) => self.publish(events).await,
            Some(Cancelled::Requested(job)) => {
                crate::worker::control::cancel(&self.publisher.bus, tenant, job.id).await
            }
            _ => {}
        }
        Ok(outcome)
    }

    /// Publishes committed events to every pod's live streams.
    pub async fn publish(&self, events: &[StoredEvent]) {
        self.publisher.events(events).await;
    }

    /// Waits until `job` is terminal or `deadline` passes; returns its latest state.
    /// Woken by the job's events on the bus; a slow re-read covers a lost publish.
    pub async fn wait_for_terminal(
        &self,
        tenant: TenantId,
        job: Job,
        deadline: tokio::time::Instant,
    ) -> Result<Job, StoreError> {
        let id = job.id;
        let conn = self
            .hub
            .attach(
                tenant,
                Filter::new(move |e| e.kind == EnvelopeKind::Event && e.job == Some(id)),
            )
            .await;
        // Subscribed first, then re-read: a change in between is not missed.
        let mut job = match self.store.get_job(tenant, id).await? {
            Some(latest) => latest,
            None => return Ok(job),
        };
        let mut recheck = tokio::time::interval(Duration::from_secs(5));
        recheck.tick().await;
        while !job.status.is_terminal() {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => break,
                next = conn.next() => {
                    if matches!(next, Next::Close(_)) {
                        break;
                    }
                }
                _ = recheck.tick() => {}
            }
            match self.store.get_job(tenant, id).await? {
                Some(latest) => job = latest,
                None => break,
            }
        }
        Ok(job)
    }
}

#[derive(Tags)]
pub enum ApiTags {
    /// Runner API: manifest workflows, upload, build, execute, status, results.
    Runner,
    /// Cloud jobs API: create, read, list and cancel jobs; inputs.
    Jobs,
    /// The tenant's event log and queue.
    Activity,
    /// Sign-in for browser sessions.
    Auth,
    /// The tenant's API keys (tenant admins).
    Keys,
    /// The tenant's users (tenant admins).
    Users,
    /// Liveness and readiness for load balancers and orchestrators.
    Health,
}

/// Every OpenAPI surface of an API pod.
pub type Apis = (
    health::HealthApi,
    auth::AuthApi,
    keys::KeysApi,
    users::UsersApi,
    runner::RunnerApi,
    cloud::CloudApi,
    inputs::InputsApi,
    admin::AdminApi,
    sse::SseApi,
);

/// The OpenAPI service: the operations and their spec. Needs no state, so
/// `comfyfleet openapi` can print the spec without a database.
pub fn api_service() -> OpenApiService<Apis, ()> {
    OpenApiService::new(
        (
            health::HealthApi,
            auth::AuthApi,
            keys::KeysApi,
            users::UsersApi,
            runner::RunnerApi,
            cloud::CloudApi,
            inputs::InputsApi,
            admin::AdminApi,
            sse::SseApi,
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
    // The built-in pages, then ComfyUI's own routes (`/prompt`, `/api/prompt`, …).
    crate::web::routes(comfy::routes(Route::new()))
        .at("/files/*path", poem::get(uploads::serve_signed))
        .at("/api/run/ws", poem::get(session_ws::session_ws))
        .at("/developer/api/v1/ws", poem::get(cloud_ws::cloud_ws))
        .nest("/", api)
        .nest("/docs", docs)
        .at("/openapi.json", spec)
        .around(crate::web::home)
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
    let acceptor = NoDelay(TcpAcceptor::from_tokio(listener)?);
    tracing::info!(addr = ?acceptor.local_addr(), "API listening");
    Server::new_with_acceptor(acceptor)
        .run_with_graceful_shutdown(
            app(state),
            async move { shutdown.cancelled().await },
            Some(Duration::from_secs(10)),
        )
        .await
}

/// Accepts with Nagle's algorithm off, as nginx's `tcp_nodelay on` does. A stream
/// socket writes one small frame after another; with Nagle on, a frame written
/// while the previous one is unacknowledged waits for the ACK, which the client may
/// delay by up to 40 ms (BENCHMARKS.md, profile, session 6).
struct NoDelay(TcpAcceptor);

impl Acceptor for NoDelay {
    type Io = tokio::net::TcpStream;

    fn local_addr(&self) -> Vec<LocalAddr> {
        self.0.local_addr()
    }

    async fn accept(
        &mut self,
    ) -> std::io::Result<(Self::Io, LocalAddr, RemoteAddr, poem::http::uri::Scheme)> {
        let accepted = self.0.accept().await?;
        // A socket that refuses the option still works, only with Nagle on.
        let _ = accepted.0.set_nodelay(true);
        Ok(accepted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepted_sockets_send_small_frames_without_waiting_for_acks() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut acceptor = NoDelay(TcpAcceptor::from_tokio(listener).unwrap());
        let (accepted, client) =
            tokio::join!(acceptor.accept(), tokio::net::TcpStream::connect(addr));
        let (socket, ..) = accepted.unwrap();
        client.unwrap();
        assert!(socket.nodelay().unwrap(), "Nagle's algorithm is still on");
    }
}

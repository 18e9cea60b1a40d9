//! What each CLI subcommand does. `main.rs` only parses; the work is here so that
//! tests and `dev` can call the same functions.

use std::io::Write;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use std::sync::Arc;

use crate::auth::{AuthError, AuthService, password};
use crate::bus::{Bus, BusConfig};
use crate::catalog::WorkflowCatalog;
use crate::config::{ApiArgs, ApiConfig, ConfigError, DatabaseArgs, Secret, WorkerArgs};
use crate::domain::ids::ApiKeyId;
use crate::domain::ids::WorkerId;
use crate::files::{Files, LinkSigner, UrlFetcher};
use crate::http::{self, AppState};
use crate::hub::{Hub, OutboxLimits};
use crate::jobs::JobService;
use crate::publish::{Publisher, Snapshots};
use crate::store::{ConnectError, Store, StoreError};
use crate::worker::comfy::ComfyClient;
use crate::worker::{Worker, WorkerSettings};

/// Why a command failed. Every variant displays as one line.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("DATABASE_URL: {0}")]
    Connect(#[from] ConnectError),
    #[error("{0}")]
    Store(StoreError),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error("cannot listen on {addr}: {cause}")]
    Bind {
        addr: std::net::SocketAddr,
        cause: std::io::Error,
    },
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

impl From<StoreError> for CommandError {
    fn from(e: StoreError) -> Self {
        match &e {
            StoreError::Database(inner) => {
                CommandError::Invalid(format!("database error: {inner}"))
            }
            StoreError::Migrate(inner) => {
                CommandError::Invalid(format!("migration failed: {inner}"))
            }
            StoreError::Shared(inner) => CommandError::Invalid(inner.to_string()),
            StoreError::Conflict(_) | StoreError::Corrupt(_) => CommandError::Store(e),
        }
    }
}

impl From<AuthError> for CommandError {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::Store(s) => s.into(),
            other => CommandError::Invalid(other.to_string()),
        }
    }
}

/// Connects and applies pending migrations.
pub async fn connect_and_migrate(args: &DatabaseArgs) -> Result<Store, CommandError> {
    let config = args.resolve()?;
    let store = Store::connect(&config).await?;
    store.migrate().await?;
    Ok(store)
}

/// Creates the database named in the URL when it does not exist yet, so a new
/// installation needs no manual `createdb`.
pub async fn create_database_if_missing(url: &str) -> Result<(), CommandError> {
    use sqlx::migrate::MigrateDatabase;
    let exists = sqlx::Postgres::database_exists(url)
        .await
        .map_err(|e| ConfigError::new("DATABASE_URL", format!("cannot reach Postgres: {e}")))?;
    if !exists {
        sqlx::Postgres::create_database(url).await.map_err(|e| {
            ConfigError::new("DATABASE_URL", format!("cannot create the database: {e}"))
        })?;
        tracing::info!("created the database");
    }
    Ok(())
}

/// `comfyfleet migrate`: creates the database if needed and applies migrations.
pub async fn migrate(args: &DatabaseArgs) -> Result<(), CommandError> {
    let config = args.resolve()?;
    create_database_if_missing(config.url.expose()).await?;
    connect_and_migrate(args).await?;
    tracing::info!("migrations applied");
    Ok(())
}

/// The bus and the progress snapshots: Redis when configured, else in-process.
pub async fn connect_publisher(
    redis_url: Option<&Secret>,
    prefix: &str,
    shutdown: &CancellationToken,
    tasks: &TaskTracker,
) -> Result<(Publisher, Option<redis::Client>), CommandError> {
    let Some(url) = redis_url else {
        return Ok((
            Publisher {
                bus: Bus::in_process(BusConfig::new(prefix)),
                snapshots: Snapshots::memory(),
            },
            None,
        ));
    };
    let bad = |e: &dyn std::fmt::Display| {
        ConfigError::new("REDIS_URL", format!("cannot reach Redis: {e}"))
    };
    let client = redis::Client::open(url.expose()).map_err(|e| bad(&e))?;
    let bus = Bus::redis(
        client.clone(),
        BusConfig::new(prefix),
        shutdown.clone(),
        tasks,
    )
    .await
    .map_err(|e| bad(&e))?;
    let conn = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        redis::aio::ConnectionManager::new(client.clone()),
    )
    .await
    .map_err(|_| bad(&"timed out"))?
    .map_err(|e| bad(&e))?;
    Ok((
        Publisher {
            bus,
            snapshots: Snapshots::Redis {
                conn: Box::new(conn),
                prefix: prefix.to_string(),
            },
        },
        Some(client),
    ))
}

/// Builds the API pod's state from its configuration (connects, migrates).
/// Background tasks (the bus reader, hub feeds) run on `tasks` until `shutdown`.
pub async fn api_state(
    config: &ApiConfig,
    shutdown: &CancellationToken,
    tasks: &TaskTracker,
) -> Result<AppState, CommandError> {
    let store = Store::connect(&config.database).await?;
    store.migrate().await?;
    let (publisher, redis) = connect_publisher(
        config.redis_url.as_ref(),
        &config.redis_prefix,
        shutdown,
        tasks,
    )
    .await?;
    let hub = Hub::new(
        publisher.bus.clone(),
        OutboxLimits::default(),
        shutdown.clone(),
        tasks,
    );
    let catalog = match &config.manifests_dir {
        None => WorkflowCatalog::builtin(),
        Some(dir) => WorkflowCatalog::load_dir(dir),
    }
    .map_err(|e| ConfigError::new("COMFYFLEET_MANIFESTS", one_line(&e.to_string())))?;
    let files = Files::open(&config.files.location)
        .await
        .map_err(|e| ConfigError::new("COMFYFLEET_OBJECT_STORE", e.to_string()))?;
    let fetcher = UrlFetcher::new(config.files.url_fetch)
        .map_err(|e| CommandError::Invalid(format!("cannot set up the URL fetcher: {e}")))?;
    Ok(AppState {
        jobs: JobService::new(store.clone(), Arc::new(catalog)),
        files,
        links: LinkSigner::new(config.jwt_secret.expose().as_bytes(), config.files.link_ttl),
        max_upload: config.files.max_upload,
        fetcher: Arc::new(fetcher),
        public_url: config.public_url.clone(),
        publisher,
        hub,
        auth: AuthService::new(
            store.clone(),
            config.jwt_secret.expose().as_bytes(),
            config.session_ttl,
        ),
        store,
        redis,
        secure_cookies: config.secure_cookies(),
        session_ttl: config.session_ttl,
        replay: Default::default(),
        object_info: Arc::default(),
    })
}

/// `comfyfleet api`: serves until SIGTERM or SIGINT.
pub async fn api(args: &ApiArgs) -> Result<(), CommandError> {
    let mut config = args.resolve()?;
    let listener = bind(&mut config).await?;
    let shutdown = CancellationToken::new();
    let tasks = TaskTracker::new();
    let state = api_state(&config, &shutdown, &tasks).await?;
    tokio::spawn(cancel_on_signal(shutdown.clone()));
    tracing::info!(public_url = %config.public_url, "comfyfleet API starting");
    http::serve(listener, state, shutdown).await?;
    tasks.close();
    tasks.wait().await;
    tracing::info!("comfyfleet API stopped");
    Ok(())
}

/// Binds the configured address. With port 0 the system picks one; a default
/// public URL then names the port actually bound, so links point somewhere real.
pub async fn bind(config: &mut ApiConfig) -> Result<tokio::net::TcpListener, CommandError> {
    let listener = listen(config.bind).map_err(|cause| CommandError::Bind {
        addr: config.bind,
        cause,
    })?;
    let local = listener.local_addr()?;
    if config.bind.port() == 0 && config.public_url.port() == Some(0) {
        config.public_url.set_port(Some(local.port())).ok();
    }
    Ok(listener)
}

/// Connections the kernel queues until the pod accepts them (capped by the system's
/// `net.core.somaxconn`). After a pod restart every client comes back at once: with
/// tokio's default of 1,024, the storm bench's 10,000 clients overflowed the queue,
/// and a client whose connection attempt is dropped waits out TCP's retries (1 s,
/// then 3 s, 7 s…) before it is back.
const ACCEPT_BACKLOG: u32 = 65_535;

fn listen(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = match addr {
        std::net::SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        std::net::SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    // As `TcpListener::bind` does: a restarted pod can take its port at once.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(ACCEPT_BACKLOG)
}

/// Fires `token` on SIGINT (Ctrl-C) or SIGTERM (what orchestrators send).
pub async fn cancel_on_signal(token: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
    tracing::info!("shutdown requested");
    token.cancel();
}

/// `comfyfleet tenant create`: prints the new tenant's id.
pub async fn tenant_create(
    db: &DatabaseArgs,
    name: &str,
    admin_email: &str,
    admin_password: &str,
    out: &mut impl Write,
) -> Result<(), CommandError> {
    let name = name.trim();
    if name.is_empty() || name.len() > 100 {
        return Err(CommandError::Invalid(
            "tenant name must be 1 to 100 characters".into(),
        ));
    }
    if name.parse::<uuid::Uuid>().is_ok() {
        return Err(CommandError::Invalid(
            "tenant name must not look like a UUID (ids and names share --tenant)".into(),
        ));
    }
    http::users::check_email(admin_email.trim()).map_err(CommandError::Invalid)?;
    let hash = password::hash(admin_password)
        .map_err(|e| CommandError::Invalid(format!("--admin-password: {e}")))?;
    let store = connect_and_migrate(db).await?;
    let (tenant, _admin) = store
        .create_tenant_with_admin(name, admin_email.trim(), &hash)
        .await?;
    writeln!(out, "{}", tenant.id)?;
    Ok(())
}

/// `comfyfleet apikey create`: prints only the new key, so scripts can capture it.
pub async fn apikey_create(
    db: &DatabaseArgs,
    tenant: &str,
    name: &str,
    admin: bool,
    out: &mut impl Write,
) -> Result<(), CommandError> {
    let store = connect_and_migrate(db).await?;
    let tenant = store
        .find_tenant_by_name_or_id(tenant)
        .await?
        .ok_or_else(|| CommandError::NotFound(format!("no tenant named or with id {tenant:?}")))?;
    // Key creation needs no session signing; any secret serves the service here.
    let auth = AuthService::new(store, &[0u8; 32], std::time::Duration::from_secs(1));
    let (_record, key) = auth.create_api_key(tenant.id, name, admin, None).await?;
    writeln!(out, "{}", key.expose())?;
    Ok(())
}

/// `comfyfleet apikey revoke`.
pub async fn apikey_revoke(
    db: &DatabaseArgs,
    key_id: &str,
    out: &mut impl Write,
) -> Result<(), CommandError> {
    let id: ApiKeyId = key_id
        .parse()
        .map_err(|_| CommandError::Invalid(format!("{key_id:?} is not an API key id (a UUID)")))?;
    let store = connect_and_migrate(db).await?;
    let key = store
        .revoke_api_key_as_operator(id)
        .await?
        .ok_or_else(|| CommandError::NotFound(format!("no API key with id {id}")))?;
    writeln!(out, "revoked {} ({})", key.id, key.name)?;
    Ok(())
}

/// `comfyfleet openapi`: the spec, exactly as `GET /openapi.json` serves it.
pub fn openapi(out: &mut impl Write) -> Result<(), CommandError> {
    writeln!(out, "{}", http::api_service().spec())?;
    Ok(())
}

fn one_line(text: &str) -> String {
    text.lines().map(str::trim).collect::<Vec<_>>().join("; ")
}

/// `comfyfleet sim`: serves a simulated ComfyUI until SIGTERM or SIGINT.
pub async fn sim(args: &crate::sim::SimArgs) -> Result<(), CommandError> {
    let listener = tokio::net::TcpListener::bind(args.bind)
        .await
        .map_err(|cause| CommandError::Bind {
            addr: args.bind,
            cause,
        })?;
    tracing::info!(url = %format!("http://{}", listener.local_addr()?), "comfyfleet sim listening");
    let shutdown = CancellationToken::new();
    tokio::spawn(cancel_on_signal(shutdown.clone()));
    crate::sim::run(listener, args.to_config(), shutdown).await?;
    Ok(())
}

/// `comfyfleet worker`: claims and runs jobs on one ComfyUI until SIGTERM/SIGINT.
pub async fn worker(args: &WorkerArgs) -> Result<(), CommandError> {
    let config = args.resolve()?;
    let store = Store::connect(&config.database).await?;
    store.migrate().await?;
    let files = Files::open(&config.files.location)
        .await
        .map_err(|e| ConfigError::new("COMFYFLEET_OBJECT_STORE", e.to_string()))?;
    let shutdown = CancellationToken::new();
    let tasks = TaskTracker::new();
    let (publisher, _) = connect_publisher(
        config.redis_url.as_ref(),
        &config.redis_prefix,
        &shutdown,
        &tasks,
    )
    .await?;
    let comfy = ComfyClient::new(config.comfyui_url.as_str())
        .map_err(|e| ConfigError::new("COMFYFLEET_COMFYUI_URL", e.to_string()))?;
    let worker = Worker {
        id: WorkerId::new(),
        store,
        files,
        publisher,
        comfy,
        settings: WorkerSettings {
            pool: config.pool.clone(),
            lease: config.lease,
            max_job_time: config.max_job_time,
            ..WorkerSettings::default()
        },
    };
    tokio::spawn(cancel_on_signal(shutdown.clone()));
    tracing::info!(worker = %worker.id, comfyui = %config.comfyui_url, "worker starting");
    let result = worker.run(shutdown.clone()).await;
    shutdown.cancel();
    tasks.close();
    tasks.wait().await;
    result.map_err(|e| CommandError::Invalid(e.to_string()))
}

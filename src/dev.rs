//! `comfyfleet dev`: everything for a laptop in one process, with defaults that
//! need no configuration — the API, two simulated ComfyUIs each with its worker, a
//! local Postgres database it creates if missing, a per-run signing secret, and a
//! dev tenant with a user and an API key it prints.

use std::io::Write;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::api_key::PresentedKey;
use crate::auth::password;
use crate::commands::{self, CommandError};
use crate::config::{ApiArgs, ConfigError};
use crate::domain::ids::WorkerId;
use crate::http;
use crate::sim::SimConfig;
use crate::worker::comfy::ComfyClient;
use crate::worker::{Worker, WorkerSettings};

/// Simulated ComfyUIs (each with a worker) that `dev` runs.
pub const DEV_WORKERS: usize = 2;

/// Postgres database `dev` uses when `DATABASE_URL` is not set.
pub const DEFAULT_DEV_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/comfyfleet_dev";
pub const DEV_TENANT: &str = "dev";
pub const DEV_EMAIL: &str = "dev@comfyfleet.local";
pub const DEV_PASSWORD: &str = "comfyfleet-dev";

#[derive(Clone, Debug, Default, clap::Args)]
pub struct DevArgs {
    #[command(flatten)]
    pub api: ApiArgs,
    /// Use this API key for the dev tenant instead of issuing a new one on each
    /// start (for scripts). Must have the shape of a comfyfleet key (cf_…).
    #[arg(long, env = "COMFYFLEET_DEV_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
}

/// What `dev` prints once it is serving.
#[derive(Debug)]
pub struct DevBanner {
    pub url: String,
    pub email: &'static str,
    pub password: &'static str,
    pub api_key: String,
}

pub async fn run(args: &DevArgs, out: &mut impl Write) -> Result<(), CommandError> {
    let mut api = args.api.clone();
    if api.database.database_url.is_none() {
        api.database.database_url = Some(DEFAULT_DEV_DATABASE_URL.to_string());
    }
    if api.jwt_secret.is_none() {
        // Sessions last as long as this process; a restart signs everyone out.
        api.jwt_secret = Some(hex::encode(rand::random::<[u8; 32]>()));
    }
    let mut config = api.resolve()?;
    commands::create_database_if_missing(config.database.url.expose()).await?;
    let listener = commands::bind(&mut config).await?;
    let shutdown = CancellationToken::new();
    let tasks = TaskTracker::new();
    let state = commands::api_state(&config, &shutdown, &tasks).await?;
    let api_key = ensure_dev_tenant(&state, args.api_key.as_deref()).await?;
    // Two simulated ComfyUIs, each with its worker, in this process.
    let mut sims = Vec::new();
    for _ in 0..DEV_WORKERS {
        let sim = crate::sim::spawn(SimConfig {
            step_time: Duration::from_millis(100),
            node_time: Duration::from_millis(150),
            preview_size: 256,
            ..SimConfig::default()
        })
        .await?;
        let worker = Worker {
            id: WorkerId::new(),
            store: state.store.clone(),
            files: state.files.clone(),
            publisher: state.publisher.clone(),
            comfy: ComfyClient::new(&sim.url())
                .map_err(|e| CommandError::Invalid(e.to_string()))?,
            settings: WorkerSettings::default(),
        };
        let stop = shutdown.clone();
        tasks.spawn(async move {
            if let Err(e) = worker.run(stop).await {
                tracing::error!(error = %e, "dev worker stopped");
            }
        });
        sims.push(sim);
    }
    let url = config.public_url.clone();
    let banner = DevBanner {
        url: url.as_str().trim_end_matches('/').to_string(),
        email: DEV_EMAIL,
        password: DEV_PASSWORD,
        api_key,
    };
    writeln!(
        out,
        "comfyfleet dev is running\n  url:      {}\n  docs:     {}/docs\n  email:    {}\n  password: {}\n  api key:  {}",
        banner.url, banner.url, banner.email, banner.password, banner.api_key
    )?;
    out.flush()?;

    tokio::spawn(commands::cancel_on_signal(shutdown.clone()));
    http::serve(listener, state, shutdown.clone()).await?;
    shutdown.cancel();
    tasks.close();
    tasks.wait().await;
    drop(sims);
    Ok(())
}

/// Makes sure the dev tenant, its user (with the documented password) and the
/// API key exist; returns the key to print.
async fn ensure_dev_tenant(
    state: &http::AppState,
    fixed_key: Option<&str>,
) -> Result<String, CommandError> {
    let store = &state.store;
    let hash = password::hash(DEV_PASSWORD).map_err(|e| CommandError::Invalid(e.to_string()))?;
    let tenant = match store.find_tenant_by_name_or_id(DEV_TENANT).await? {
        Some(t) => {
            store.reset_user_password(t.id, DEV_EMAIL, &hash).await?;
            t
        }
        None => {
            store
                .create_tenant_with_admin(DEV_TENANT, DEV_EMAIL, &hash)
                .await?
                .0
        }
    };
    match fixed_key.map(str::trim).filter(|k| !k.is_empty()) {
        Some(raw) => {
            let key = PresentedKey::parse(raw)
                .map_err(|e| ConfigError::new("COMFYFLEET_DEV_API_KEY", e.to_string()))?;
            state
                .auth
                .register_api_key(tenant.id, "dev", true, &key)
                .await?;
            Ok(key.expose().to_string())
        }
        None => {
            let (_, key) = state
                .auth
                .create_api_key(tenant.id, "dev", true, None)
                .await?;
            Ok(key.expose().to_string())
        }
    }
}

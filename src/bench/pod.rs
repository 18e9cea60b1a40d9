//! The API pod under test, started by the bench itself as a child process (this
//! same binary with `api`), so that one command reproduces a run and the bench knows
//! which pid to read `/proc` from. It gets a database of its own (created, migrated,
//! dropped at the end), its own Redis prefix, a tenant and an API key.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

use crate::auth::{AuthService, password};
use crate::commands::{CommandError, create_database_if_missing};
use crate::config::DatabaseArgs;
use crate::domain::ids::TenantId;
use crate::store::Store;

/// How long a starting pod may take to answer `/healthz`.
const START_DEADLINE: Duration = Duration::from_secs(60);

/// Where a started pod keeps its state.
pub struct PodSettings {
    /// The maintenance database URL of a server the bench may create databases on.
    pub admin_database_url: String,
    pub redis_url: String,
}

/// A running API pod and the credentials the bench drives it with.
pub struct Pod {
    child: Option<Child>,
    pub addr: SocketAddr,
    pub tenant: TenantId,
    pub api_key: String,
    pub redis_prefix: String,
    database_url: String,
    db_name: String,
    settings: PodSettings,
    jwt_secret: String,
    /// The bench's own connection to the pod's database (jobs, events).
    pub store: Store,
}

fn invalid(what: &str) -> impl Fn(&dyn std::fmt::Display) -> CommandError + '_ {
    move |e| CommandError::Invalid(format!("{what}: {e}"))
}

/// A tenant named `name` with an admin user and an API key; the key in clear.
async fn create_tenant(store: &Store, name: &str) -> Result<(TenantId, String), CommandError> {
    let hash = password::hash("bench-password-0123456789")
        .map_err(|e| invalid("hashing the bench password")(&e))?;
    let (tenant, _) = store
        .create_tenant_with_admin(name, &format!("{name}@bench.example.com"), &hash)
        .await?;
    let auth = AuthService::new(store.clone(), &[0u8; 32], Duration::from_secs(60));
    let (_, key) = auth.create_api_key(tenant.id, name, true, None).await?;
    Ok((tenant.id, key.expose().to_owned()))
}

impl Pod {
    /// Creates the database, the tenant and a key, then starts the pod and waits
    /// until it answers.
    pub async fn start(settings: PodSettings) -> Result<Self, CommandError> {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let db_name = format!("comfyfleet_bench_{}", &id[..12]);
        let mut url = url::Url::parse(&settings.admin_database_url)
            .map_err(|e| invalid("--database-url")(&e))?;
        url.set_path(&db_name);
        let database_url = url.to_string();
        create_database_if_missing(&database_url).await?;
        let db = DatabaseArgs {
            database_url: Some(database_url.clone()),
            db_max_connections: Some("10".into()),
        };
        let store = Store::connect(&db.resolve()?).await?;
        store.migrate().await?;
        let (tenant, api_key) = create_tenant(&store, "bench").await?;
        let addr = free_port()?;
        let mut pod = Self {
            child: None,
            addr,
            tenant,
            api_key,
            redis_prefix: format!("cfbench:{}", &id[..12]),
            database_url,
            db_name,
            settings,
            jwt_secret: format!("bench-{id}-{id}"),
            store,
        };
        pod.spawn().await?;
        Ok(pod)
    }

    /// Another tenant, with an admin user and an API key, beside the first.
    pub async fn add_tenant(&self, name: &str) -> Result<(TenantId, String), CommandError> {
        create_tenant(&self.store, name).await
    }

    async fn spawn(&mut self) -> Result<(), CommandError> {
        let exe = std::env::current_exe()?;
        // BENCH_POD_WRAPPER runs the pod under another program, e.g. valgrind's DHAT
        // for the previews scenario's allocation count (BENCHMARKS.md).
        let wrapper = std::env::var("BENCH_POD_WRAPPER").unwrap_or_default();
        let mut wrapper = wrapper.split_whitespace();
        let mut command = match wrapper.next() {
            Some(program) => {
                let mut command = Command::new(program);
                command.args(wrapper).arg(exe);
                command
            }
            None => Command::new(exe),
        };
        let child = command
            .arg("api")
            .env("DATABASE_URL", &self.database_url)
            .env("REDIS_URL", &self.settings.redis_url)
            .env("COMFYFLEET_REDIS_PREFIX", &self.redis_prefix)
            .env("COMFYFLEET_BIND", self.addr.to_string())
            .env("COMFYFLEET_JWT_SECRET", &self.jwt_secret)
            .env("COMFYFLEET_OBJECT_STORE", "memory://")
            .env(
                "RUST_LOG",
                std::env::var("BENCH_POD_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        self.child = Some(child);
        self.wait_ready().await
    }

    async fn wait_ready(&mut self) -> Result<(), CommandError> {
        let http = reqwest::Client::new();
        let url = format!("http://{}/healthz", self.addr);
        let deadline = tokio::time::Instant::now() + START_DEADLINE;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                return Err(CommandError::Invalid(format!(
                    "the API pod exited at start ({status})"
                )));
            }
            if let Ok(resp) = http.get(&url).send().await
                && resp.status().is_success()
            {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                return Err(CommandError::Invalid(format!(
                    "the API pod did not answer {url} within {START_DEADLINE:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The pod's own database (the bench's workers use it too).
    pub fn database_url(&self) -> &str {
        &self.database_url
    }

    /// A crash and a restart: the pod is killed (SIGKILL, no graceful close for its
    /// clients) and the same binary is started again on the same address and state.
    /// Returns once the new process answers `/healthz`.
    pub async fn restart(&mut self) -> Result<(), CommandError> {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
        self.spawn().await
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// Stops the pod (SIGTERM, then SIGKILL after a grace period) and drops its
    /// database.
    pub async fn stop(mut self) {
        if let Some(mut child) = self.child.take() {
            if let Some(pid) = child.id() {
                // SAFETY: signals our own child by its pid.
                unsafe {
                    libc::kill(pid as libc::pid_t, libc::SIGTERM);
                }
            }
            if tokio::time::timeout(Duration::from_secs(10), child.wait())
                .await
                .is_err()
            {
                let _ = child.kill().await;
            }
        }
        drop(self.store);
        drop_database(&self.settings.admin_database_url, &self.db_name).await;
    }
}

async fn drop_database(admin_url: &str, name: &str) {
    use sqlx::Connection;
    if let Ok(mut conn) = sqlx::PgConnection::connect(admin_url).await {
        let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .execute(&mut conn)
            .await;
    }
}

/// A loopback port nobody listens on right now.
fn free_port() -> Result<SocketAddr, CommandError> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?)
}

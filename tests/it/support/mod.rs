//! The test harness: a fresh database per test, the real app on port 0, typed helpers.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use comfyfleet::auth::AuthService;
use comfyfleet::config::{ApiArgs, DatabaseArgs};
use comfyfleet::domain::ids::TenantId;
use comfyfleet::http::{self, AppState};
use comfyfleet::store::Store;
use tokio_util::sync::CancellationToken;

/// Where the test Postgres server is: the maintenance database of a server on which
/// the test user may create databases.
pub fn admin_database_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_string())
}

pub fn redis_url() -> String {
    std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_string())
}

pub const JWT_SECRET: &str = "test-secret-test-secret-test-secret-0123";

/// A database of its own, dropped when the test ends.
pub struct TestDb {
    pub name: String,
    pub url: String,
}

impl TestDb {
    pub async fn create() -> Self {
        use sqlx::Connection;
        let name = format!("cf_test_{}", uuid::Uuid::new_v4().simple());
        let admin = admin_database_url();
        let mut conn = sqlx::PgConnection::connect(&admin)
            .await
            .unwrap_or_else(|e| panic!("tests need Postgres at {admin} (TEST_DATABASE_URL): {e}"));
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .expect("create test database");
        conn.close().await.ok();
        let mut url = url::Url::parse(&admin).expect("TEST_DATABASE_URL is a URL");
        url.set_path(&name);
        Self {
            name,
            url: url.to_string(),
        }
    }

    pub fn args(&self) -> DatabaseArgs {
        DatabaseArgs {
            database_url: Some(self.url.clone()),
            db_max_connections: Some("5".into()),
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop runs outside async context; a short-lived thread with its own runtime
        // does the async cleanup without blocking the test's runtime.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                use sqlx::Connection;
                if let Ok(mut conn) = sqlx::PgConnection::connect(&admin_database_url()).await {
                    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .execute(&mut conn)
                        .await;
                }
            });
        })
        .join();
    }
}

/// A running API pod over its own database.
pub struct TestApp {
    /// Holds the object store directory for the app's lifetime.
    pub files_dir: tempfile::TempDir,
    pub addr: SocketAddr,
    pub base: String,
    pub db: TestDb,
    pub store: Store,
    pub state: AppState,
    pub http: reqwest::Client,
    /// The Redis channel prefix, shared by peers started with [`TestApp::spawn_peer`].
    pub redis_prefix: String,
    shutdown: CancellationToken,
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub fn api_args(db: &TestDb, files_dir: &std::path::Path) -> ApiArgs {
    ApiArgs {
        object_store: Some(files_dir.display().to_string()),
        database: db.args(),
        redis_url: Some(redis_url()),
        redis_prefix: Some(format!("cftest:{}", uuid::Uuid::new_v4().simple())),
        bind: Some("127.0.0.1:0".into()),
        jwt_secret: Some(JWT_SECRET.into()),
        ..ApiArgs::default()
    }
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}, |_| {}).await
}

/// Like [`spawn_app`], letting the test adjust the settings and the state first.
pub async fn spawn_app_with(
    adjust_args: impl FnOnce(&mut ApiArgs),
    adjust_state: impl FnOnce(&mut AppState),
) -> TestApp {
    let db = TestDb::create().await;
    let files_dir = tempfile::tempdir().expect("temp dir");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut args = api_args(&db, files_dir.path());
    args.public_url = Some(format!("http://{addr}"));
    adjust_args(&mut args);
    let redis_prefix = args.redis_prefix.clone().unwrap_or_default();
    let config = args.resolve().expect("test config is valid");
    let shutdown = CancellationToken::new();
    let tasks = tokio_util::task::TaskTracker::new();
    let mut state = comfyfleet::commands::api_state(&config, &shutdown, &tasks)
        .await
        .expect("api state");
    adjust_state(&mut state);
    tokio::spawn(http::serve(listener, state.clone(), shutdown.clone()));
    TestApp {
        files_dir,
        addr,
        base: format!("http://{addr}"),
        store: state.store.clone(),
        state,
        db,
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap(),
        redis_prefix,
        shutdown,
    }
}

/// A second API pod over the same database, object store and Redis prefix as a
/// [`TestApp`]: what a client connected to another pod behind the load balancer sees.
pub struct TestPeer {
    pub addr: SocketAddr,
    pub base: String,
    pub state: AppState,
    shutdown: CancellationToken,
}

impl Drop for TestPeer {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl TestPeer {
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }
}

impl TestApp {
    pub async fn spawn_peer(&self) -> TestPeer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut args = api_args(&self.db, self.files_dir.path());
        args.redis_prefix = Some(self.redis_prefix.clone());
        args.public_url = Some(format!("http://{addr}"));
        let config = args.resolve().expect("test config is valid");
        let shutdown = CancellationToken::new();
        let tasks = tokio_util::task::TaskTracker::new();
        let state = comfyfleet::commands::api_state(&config, &shutdown, &tasks)
            .await
            .expect("peer api state");
        tokio::spawn(http::serve(listener, state.clone(), shutdown.clone()));
        TestPeer {
            addr,
            base: format!("http://{addr}"),
            state,
            shutdown,
        }
    }
}

/// A tenant with an admin user and an admin API key.
pub struct TestTenant {
    pub id: TenantId,
    pub name: String,
    pub admin_email: String,
    pub admin_password: String,
    pub admin_key: String,
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// Registers a worker in the store (for tests that play one through the store).
    pub async fn register_worker(&self) -> comfyfleet::domain::ids::WorkerId {
        let worker = comfyfleet::domain::ids::WorkerId::new();
        self.store
            .register_worker(&comfyfleet::store::workers::WorkerRegistration {
                id: worker,
                pool: "default".into(),
                comfyui_url: "http://127.0.0.1:8188".into(),
                comfyui_version: None,
                node_classes: vec![],
                models: vec![],
            })
            .await
            .unwrap();
        worker
    }

    pub fn auth_service(&self) -> AuthService {
        self.state.auth.clone()
    }

    pub async fn tenant(&self, name: &str) -> TestTenant {
        let admin_email = format!("admin@{name}.example.com");
        let admin_password = format!("pw-{name}-0123456789");
        let hash = comfyfleet::auth::password::hash(&admin_password).unwrap();
        let (tenant, _) = self
            .store
            .create_tenant_with_admin(name, &admin_email, &hash)
            .await
            .unwrap();
        let (_, key) = self
            .auth_service()
            .create_api_key(tenant.id, "admin key", true, None)
            .await
            .unwrap();
        TestTenant {
            id: tenant.id,
            name: name.to_string(),
            admin_email,
            admin_password,
            admin_key: key.expose().to_string(),
        }
    }

    /// A key without admin rights in `tenant`.
    pub async fn plain_key(&self, tenant: &TestTenant) -> String {
        let (_, key) = self
            .auth_service()
            .create_api_key(tenant.id, "plain key", false, None)
            .await
            .unwrap();
        key.expose().to_string()
    }
}

/// Asserts a response is a problem+json with this status, and returns the body.
pub async fn expect_problem(resp: reqwest::Response, status: u16) -> serde_json::Value {
    assert_eq!(resp.status().as_u16(), status, "status");
    let ct = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    assert!(
        ct.starts_with("application/problem+json"),
        "content-type {ct:?}"
    );
    let body: serde_json::Value = resp.json().await.expect("problem body is JSON");
    assert_eq!(body["status"], status);
    assert!(
        body["detail"].as_str().is_some_and(|d| !d.is_empty()),
        "problem has a detail: {body}"
    );
    body
}

/// The `Set-Cookie` session value from a login response.
pub fn session_cookie_of(resp: &reqwest::Response) -> (String, String) {
    let raw = resp
        .headers()
        .get("set-cookie")
        .expect("login sets a cookie")
        .to_str()
        .unwrap()
        .to_string();
    let value = raw.split(';').next().unwrap().trim().to_string();
    (value, raw)
}

/// Path of the built binary, for CLI tests.
pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_comfyfleet")
}

pub fn spawn_db_args(db: &TestDb) -> DatabaseArgs {
    db.args()
}

/// A valid 1×1 red PNG.
pub fn tiny_png() -> Vec<u8> {
    hex::decode(
        "89504e470d0a1a0a0000000d4948445200000001000000010802000000907753de\
         0000000c49444154789c63f8cfc0000003010100c9fe92ef0000000049454e44ae426082",
    )
    .unwrap()
}

/// Polls `check` until it yields a value or `deadline_secs` pass. For outcomes of
/// background work that has no stream to wait on; each attempt is a real request.
pub async fn eventually<T, F, Fut>(deadline_secs: u64, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(deadline_secs);
    let mut pace = tokio::time::interval(Duration::from_millis(25));
    loop {
        pace.tick().await;
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not met within {deadline_secs}s"
        );
    }
}

/// A simulated ComfyUI with a worker in front of it, sharing the app's bus.
pub struct TestWorker {
    pub id: comfyfleet::domain::ids::WorkerId,
    pub sim: comfyfleet::sim::SimHandle,
    pub task: tokio::task::JoinHandle<()>,
    stop: CancellationToken,
}

impl TestWorker {
    /// Kills the worker as a crash would: no deregistration, no hand-back.
    pub fn kill(&self) {
        self.task.abort();
    }
}

impl Drop for TestWorker {
    fn drop(&mut self) {
        self.stop.cancel();
        self.task.abort();
    }
}

/// Short leases and polls, so lapsed-lease recovery happens within a test's time.
pub fn test_worker_settings() -> comfyfleet::worker::WorkerSettings {
    comfyfleet::worker::WorkerSettings {
        lease: Duration::from_secs(3),
        poll_interval: Duration::from_millis(200),
        heartbeat: Duration::from_secs(1),
        ..Default::default()
    }
}

impl TestApp {
    pub async fn start_worker(&self, sim: comfyfleet::sim::SimConfig) -> TestWorker {
        let sim = comfyfleet::sim::spawn(sim).await.expect("sim starts");
        let worker = comfyfleet::worker::Worker {
            id: comfyfleet::domain::ids::WorkerId::new(),
            store: self.store.clone(),
            files: self.state.files.clone(),
            publisher: self.state.publisher.clone(),
            comfy: comfyfleet::worker::comfy::ComfyClient::new(&sim.url()).unwrap(),
            settings: test_worker_settings(),
        };
        let id = worker.id;
        let stop = CancellationToken::new();
        let run = worker.run(stop.clone());
        let task = tokio::spawn(async move {
            run.await.expect("worker runs");
        });
        TestWorker {
            id,
            sim,
            task,
            stop,
        }
    }

    /// Creates a job through the cloud API; returns its JSON.
    pub async fn create_job(&self, key: &str, body: serde_json::Value) -> serde_json::Value {
        let resp = self
            .http
            .post(self.url("/developer/api/v1/jobs"))
            .header("X-API-Key", key)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 201, "create job");
        resp.json().await.unwrap()
    }

    /// The job, after waiting (long poll) until it is finished or `secs` pass.
    pub async fn wait_job(&self, key: &str, id: &str, secs: u64) -> serde_json::Value {
        self.http
            .get(self.url(&format!("/developer/api/v1/jobs/{id}?wait={secs}")))
            .header("X-API-Key", key)
            // The long poll may take all of `secs`: outlast the client's default.
            .timeout(Duration::from_secs(secs + 10))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    pub async fn job(&self, key: &str, id: &str) -> serde_json::Value {
        self.wait_job(key, id, 0).await
    }

    /// Event types recorded for one job, in order.
    pub async fn job_event_types(&self, tenant: &TestTenant, id: &str) -> Vec<String> {
        let job: comfyfleet::domain::ids::JobId = id.parse().unwrap();
        let events = self
            .store
            .list_events(
                tenant.id,
                &comfyfleet::store::events::EventQuery {
                    since: Some(0),
                    kind: None,
                    job: Some(job),
                    limit: 1000,
                },
            )
            .await
            .unwrap();
        events.into_iter().map(|e| e.kind).collect()
    }
}

//! All SQL lives here. Every query on a tenant-owned table takes the tenant id as
//! its first parameter and filters on it, so another tenant's row is simply not
//! found: callers answer 404, never 403, and never see its data.
//!
//! The few lookups that are not tenant-scoped are the ones that *discover* the
//! tenant (login by email, API key by digest, the admin CLI) and say so in their docs.

pub mod accounts;
pub mod api_keys;
pub mod claims;
pub mod events;
pub mod inputs;
mod intake;
pub mod jobs;
pub mod outputs;
pub mod sessions;
pub mod shared_reads;
pub mod workers;

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgPool};

use crate::config::DatabaseConfig;

/// The migrations in `migrations/`, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// The Postgres side of comfyfleet. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    pool: PgPool,
    intake: std::sync::Arc<intake::Intake>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A unique constraint said no; the string names what collided.
    #[error("{0} already exists")]
    Conflict(&'static str),
    #[error("database error")]
    Database(#[from] sqlx::Error),
    /// A row that breaks an invariant the schema cannot express.
    #[error("inconsistent data: {0}")]
    Corrupt(String),
    #[error("migration failed")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The failure of a read this caller shared with others ([`shared_reads`]).
    #[error(transparent)]
    Shared(std::sync::Arc<StoreError>),
}

/// Why the database could not be reached at start; one line, password removed.
#[derive(Debug, thiserror::Error)]
#[error("cannot connect to {target}: {cause}")]
pub struct ConnectError {
    target: String,
    cause: String,
}

impl Store {
    /// Connects with a bounded wait, so a wrong URL fails fast at start.
    pub async fn connect(config: &DatabaseConfig) -> Result<Self, ConnectError> {
        let target = redacted_target(config.url.expose());
        let fail = |cause: String| ConnectError {
            target: target.clone(),
            cause,
        };
        let options: PgConnectOptions = config
            .url
            .expose()
            .parse()
            .map_err(|e: sqlx::Error| fail(one_line(&e)))?;
        // One direct connection first: a pool reports only "timed out", while this
        // says what actually failed (refused, unknown database, bad password).
        let probe = tokio::time::timeout(
            Duration::from_secs(5),
            sqlx::postgres::PgConnection::connect_with(&options),
        )
        .await
        .map_err(|_| fail("timed out after 5 s".into()))?
        .map_err(|e| fail(one_line(&e)))?;
        probe.close().await.ok();
        let ping_if_idle_for = config.ping_if_idle_for;
        let pool = PgPoolOptions::new()
            .max_connections(config.max_connections)
            .acquire_timeout(Duration::from_secs(5))
            // By default sqlx pings every connection it hands out: a round trip before
            // each transaction (BENCHMARKS.md, jobs). Only a connection that sat idle
            // is pinged here; a busy pool's were in use (and checked by sqlx on their
            // way back) a moment ago. One that fails its ping is dropped and another
            // taken, as before.
            .test_before_acquire(false)
            .before_acquire(move |conn, meta| {
                Box::pin(async move {
                    if meta.idle_for >= ping_if_idle_for {
                        conn.ping().await?;
                    }
                    Ok(true)
                })
            })
            .connect_lazy_with(options);
        Ok(Self::from_pool(pool))
    }

    pub fn from_pool(pool: PgPool) -> Self {
        Self {
            pool,
            intake: Default::default(),
        }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub async fn migrate(&self) -> Result<(), StoreError> {
        MIGRATOR.run(&self.pool).await?;
        Ok(())
    }

    /// Refreshes the planner's statistics of every table, as autovacuum does in a
    /// running deployment (the bench's database is younger than autovacuum's first
    /// visit).
    pub async fn analyze(&self) -> Result<(), StoreError> {
        sqlx::query("ANALYZE").execute(&self.pool).await?;
        Ok(())
    }

    /// `SELECT 1`, for readiness checks.
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }
}

/// Maps a unique violation (SQLSTATE 23505) to [`StoreError::Conflict`].
fn conflict_on_unique(what: &'static str) -> impl FnOnce(sqlx::Error) -> StoreError {
    move |e| match &e {
        sqlx::Error::Database(db) if db.code().as_deref() == Some("23505") => {
            StoreError::Conflict(what)
        }
        _ => StoreError::Database(e),
    }
}

fn redacted_target(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(u) => format!(
            "{}:{}{}",
            u.host_str().unwrap_or("localhost"),
            u.port().unwrap_or(5432),
            u.path()
        ),
        Err(_) => "the configured database".to_string(),
    }
}

fn one_line(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        source = s.source();
    }
    parts.join(": ").replace('\n', " ")
}

//! Every setting comfyfleet reads, typed and validated once at start.
//!
//! Settings come from flags or the environment (clap reads both); they arrive here
//! as raw strings so that a bad value is reported as one line naming the setting
//! and the problem (`COMFYFLEET_BIND: "x" is not a socket address`), never as a
//! panic or a multi-line usage dump. Secrets are wrapped in [`Secret`], whose
//! `Debug` never shows the value.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use url::Url;

use crate::files::settings::{DEFAULT_LINK_TTL, DEFAULT_LOCAL_DIR};
use crate::files::{FilesConfig, FilesLocation, MaxUploadBytes};

/// A setting that is missing or malformed. Displays as one line.
#[derive(Debug, thiserror::Error)]
#[error("{setting}: {problem}")]
pub struct ConfigError {
    /// The environment variable that carries the setting (flags have the same name).
    pub setting: &'static str,
    pub problem: String,
}

impl ConfigError {
    pub fn new(setting: &'static str, problem: impl Into<String>) -> Self {
        Self {
            setting,
            problem: problem.into(),
        }
    }
}

/// A string that must never reach a log line.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

/// Where Postgres is and how many connections a process may hold.
#[derive(Clone, Debug)]
pub struct DatabaseConfig {
    /// Kept secret: a database URL usually carries a password.
    pub url: Secret,
    pub max_connections: u32,
    /// A pooled connection unused this long is pinged before it is handed out (one
    /// that fails is dropped and another taken); a busier one is used as it is.
    pub ping_if_idle_for: std::time::Duration,
}

/// Minimum length of the JWT signing secret: HS256 wants at least 256 bits.
pub const MIN_JWT_SECRET_LEN: usize = 32;

/// Everything an API pod needs.
#[derive(Clone, Debug)]
pub struct ApiConfig {
    pub database: DatabaseConfig,
    /// `None` runs a single pod on the in-process bus.
    pub redis_url: Option<Secret>,
    /// Prefix of every Redis key and channel, so that tests and several deployments
    /// can share one Redis.
    pub redis_prefix: String,
    pub bind: SocketAddr,
    /// The URL clients reach this service at; used for signed links and cookie flags.
    pub public_url: Url,
    pub jwt_secret: Secret,
    pub session_ttl: Duration,
    /// Where inputs and outputs live, upload limits, signed-link lifetime.
    pub files: FilesConfig,
    /// A directory of workflow manifests to serve instead of the built-in ones.
    pub manifests_dir: Option<PathBuf>,
}

impl ApiConfig {
    /// Cookies carry `Secure` unless the service is reached over plain http on
    /// loopback (a developer's laptop), where browsers would refuse to store them.
    pub fn secure_cookies(&self) -> bool {
        !(self.public_url.scheme() == "http" && is_loopback_host(&self.public_url))
    }
}

fn is_loopback_host(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

/// The raw strings for the database settings, as clap collected them.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct DatabaseArgs {
    /// Postgres URL, e.g. postgres://user@127.0.0.1:5432/comfyfleet
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Largest number of Postgres connections this process opens.
    #[arg(long, env = "COMFYFLEET_DB_MAX_CONNECTIONS")]
    pub db_max_connections: Option<String>,
}

impl DatabaseArgs {
    pub fn resolve(&self) -> Result<DatabaseConfig, ConfigError> {
        let raw = required("DATABASE_URL", self.database_url.as_deref())?;
        let url = Url::parse(raw).map_err(|e| {
            ConfigError::new(
                "DATABASE_URL",
                format!("not a URL ({e}); expected postgres://user:password@host:port/database"),
            )
        })?;
        if !matches!(url.scheme(), "postgres" | "postgresql") {
            return Err(ConfigError::new(
                "DATABASE_URL",
                format!(
                    "scheme {:?} is not supported; expected postgres://",
                    url.scheme()
                ),
            ));
        }
        let max_connections = parse_or(
            "COMFYFLEET_DB_MAX_CONNECTIONS",
            self.db_max_connections.as_deref(),
            20u32,
        )?;
        if max_connections == 0 {
            return Err(ConfigError::new(
                "COMFYFLEET_DB_MAX_CONNECTIONS",
                "must be at least 1",
            ));
        }
        Ok(DatabaseConfig {
            url: Secret::new(raw),
            max_connections,
            ping_if_idle_for: std::time::Duration::from_secs(1),
        })
    }
}

/// The raw strings for an API pod's settings.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct ApiArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,
    /// Redis URL, e.g. redis://127.0.0.1:6379. Without it a single pod uses an in-process bus.
    #[arg(long, env = "REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,
    /// Prefix for every Redis key and channel.
    #[arg(long, env = "COMFYFLEET_REDIS_PREFIX")]
    pub redis_prefix: Option<String>,
    /// Address to listen on.
    #[arg(long, env = "COMFYFLEET_BIND")]
    pub bind: Option<String>,
    /// Public base URL of the service (default: http://<bind>).
    #[arg(long, env = "COMFYFLEET_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// Secret that signs session tokens and links; at least 32 characters.
    #[arg(long, env = "COMFYFLEET_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// Session lifetime in seconds (default 7 days).
    #[arg(long, env = "COMFYFLEET_SESSION_TTL_SECS")]
    pub session_ttl_secs: Option<String>,
    /// Where inputs and outputs are stored: a directory, file:///path,
    /// s3://bucket/prefix?endpoint=…&region=…, or memory:// (default ./data/objects).
    #[arg(long, env = "COMFYFLEET_OBJECT_STORE")]
    pub object_store: Option<String>,
    /// Largest accepted upload in bytes (default 104857600, as ComfyUI).
    #[arg(long, env = "COMFYFLEET_MAX_UPLOAD_BYTES")]
    pub max_upload_bytes: Option<String>,
    /// Lifetime of signed download links in seconds (default 3600).
    #[arg(long, env = "COMFYFLEET_LINK_TTL_SECS")]
    pub link_ttl_secs: Option<String>,
    /// Directory of workflow manifests (<id>/manifest.yaml + workflow.json); default: the built-in ones.
    #[arg(long, env = "COMFYFLEET_MANIFESTS")]
    pub manifests: Option<String>,
}

pub const DEFAULT_BIND: &str = "127.0.0.1:8080";

/// The raw strings for a worker pod's settings.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct WorkerArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,
    /// Redis URL; without it the worker cannot reach API pods in other processes.
    #[arg(long, env = "REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,
    #[arg(long, env = "COMFYFLEET_REDIS_PREFIX")]
    pub redis_prefix: Option<String>,
    /// The object store shared with the API pods.
    #[arg(long, env = "COMFYFLEET_OBJECT_STORE")]
    pub object_store: Option<String>,
    /// The ComfyUI this worker drives.
    #[arg(
        long,
        env = "COMFYFLEET_COMFYUI_URL",
        default_value = "http://127.0.0.1:8188"
    )]
    pub comfyui_url: String,
    /// Worker pool name (shown in the fleet view).
    #[arg(long, env = "COMFYFLEET_POOL", default_value = "default")]
    pub pool: String,
    /// Lease length in seconds: a job is requeued this long after its worker vanished.
    #[arg(long, env = "COMFYFLEET_LEASE_SECS")]
    pub lease_secs: Option<String>,
    /// Longest a job may run, in seconds (default 3600).
    #[arg(long, env = "COMFYFLEET_MAX_JOB_SECS")]
    pub max_job_secs: Option<String>,
}

/// A worker pod's settings.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    pub database: DatabaseConfig,
    pub redis_url: Option<Secret>,
    pub redis_prefix: String,
    pub files: FilesConfig,
    pub comfyui_url: Url,
    pub pool: String,
    pub lease: Duration,
    pub max_job_time: Duration,
}

impl WorkerArgs {
    pub fn resolve(&self) -> Result<WorkerConfig, ConfigError> {
        // The shared settings mean the same as for an API pod; reuse their checks.
        let shared = ApiArgs {
            database: self.database.clone(),
            redis_url: self.redis_url.clone(),
            redis_prefix: self.redis_prefix.clone(),
            object_store: self.object_store.clone(),
            jwt_secret: Some("x".repeat(MIN_JWT_SECRET_LEN)),
            ..ApiArgs::default()
        }
        .resolve()?;
        let comfyui_url = Url::parse(&self.comfyui_url)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some())
            .ok_or_else(|| {
                ConfigError::new(
                    "COMFYFLEET_COMFYUI_URL",
                    format!("{:?} is not an http(s) URL with a host", self.comfyui_url),
                )
            })?;
        let lease = parse_or("COMFYFLEET_LEASE_SECS", self.lease_secs.as_deref(), 30u64)?;
        let max_job = parse_or(
            "COMFYFLEET_MAX_JOB_SECS",
            self.max_job_secs.as_deref(),
            3600u64,
        )?;
        if lease < 3 {
            return Err(ConfigError::new(
                "COMFYFLEET_LEASE_SECS",
                "must be at least 3",
            ));
        }
        if max_job == 0 {
            return Err(ConfigError::new(
                "COMFYFLEET_MAX_JOB_SECS",
                "must be at least 1",
            ));
        }
        Ok(WorkerConfig {
            database: shared.database,
            redis_url: shared.redis_url,
            redis_prefix: shared.redis_prefix,
            files: shared.files,
            comfyui_url,
            pool: self.pool.clone(),
            lease: Duration::from_secs(lease),
            max_job_time: Duration::from_secs(max_job),
        })
    }
}

impl ApiArgs {
    pub fn resolve(&self) -> Result<ApiConfig, ConfigError> {
        let database = self.database.resolve()?;
        let redis_url = match non_empty(self.redis_url.as_deref()) {
            None => None,
            Some(raw) => {
                let url = Url::parse(raw)
                    .map_err(|e| ConfigError::new("REDIS_URL", format!("not a URL ({e})")))?;
                if !matches!(url.scheme(), "redis" | "rediss") {
                    return Err(ConfigError::new(
                        "REDIS_URL",
                        format!(
                            "scheme {:?} is not supported; expected redis://",
                            url.scheme()
                        ),
                    ));
                }
                Some(Secret::new(raw))
            }
        };
        let redis_prefix = non_empty(self.redis_prefix.as_deref())
            .unwrap_or("cf")
            .to_string();
        if !redis_prefix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'))
        {
            return Err(ConfigError::new(
                "COMFYFLEET_REDIS_PREFIX",
                "may hold only letters, digits, '-', '_', '.' and ':'",
            ));
        }
        let bind_raw = non_empty(self.bind.as_deref()).unwrap_or(DEFAULT_BIND);
        let bind: SocketAddr = bind_raw.parse().map_err(|_| {
            ConfigError::new(
                "COMFYFLEET_BIND",
                format!("{bind_raw:?} is not a socket address such as 127.0.0.1:8080"),
            )
        })?;
        let public_url = match non_empty(self.public_url.as_deref()) {
            Some(raw) => {
                let url = Url::parse(raw).map_err(|e| {
                    ConfigError::new("COMFYFLEET_PUBLIC_URL", format!("not a URL ({e})"))
                })?;
                if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
                    return Err(ConfigError::new(
                        "COMFYFLEET_PUBLIC_URL",
                        "must be an http:// or https:// URL with a host",
                    ));
                }
                url
            }
            None => default_public_url(bind),
        };
        let jwt_secret = required("COMFYFLEET_JWT_SECRET", self.jwt_secret.as_deref())?;
        if jwt_secret.len() < MIN_JWT_SECRET_LEN {
            return Err(ConfigError::new(
                "COMFYFLEET_JWT_SECRET",
                format!("must be at least {MIN_JWT_SECRET_LEN} characters long"),
            ));
        }
        let ttl_secs = parse_or(
            "COMFYFLEET_SESSION_TTL_SECS",
            self.session_ttl_secs.as_deref(),
            7 * 24 * 3600u64,
        )?;
        if ttl_secs == 0 {
            return Err(ConfigError::new(
                "COMFYFLEET_SESSION_TTL_SECS",
                "must be at least 1",
            ));
        }
        let files = self.files()?;
        let manifests_dir = non_empty(self.manifests.as_deref()).map(PathBuf::from);
        Ok(ApiConfig {
            database,
            redis_url,
            redis_prefix,
            bind,
            public_url,
            jwt_secret: Secret::new(jwt_secret),
            session_ttl: Duration::from_secs(ttl_secs),
            files,
            manifests_dir,
        })
    }
}

impl ApiArgs {
    fn files(&self) -> Result<FilesConfig, ConfigError> {
        let location = match non_empty(self.object_store.as_deref()) {
            None => FilesLocation::LocalDir(DEFAULT_LOCAL_DIR.into()),
            Some(raw) => FilesLocation::parse(raw)
                .map_err(|e| ConfigError::new("COMFYFLEET_OBJECT_STORE", e.to_string()))?,
        };
        let mut files = FilesConfig::at(location);
        if let Some(raw) = non_empty(self.max_upload_bytes.as_deref()) {
            let limit: MaxUploadBytes = raw.parse().map_err(|_| {
                ConfigError::new(
                    "COMFYFLEET_MAX_UPLOAD_BYTES",
                    format!("{raw:?} is not a positive whole number of bytes"),
                )
            })?;
            files = files.with_max_upload(limit);
        }
        let ttl = parse_or(
            "COMFYFLEET_LINK_TTL_SECS",
            self.link_ttl_secs.as_deref(),
            DEFAULT_LINK_TTL.as_secs(),
        )?;
        if ttl == 0 {
            return Err(ConfigError::new(
                "COMFYFLEET_LINK_TTL_SECS",
                "must be at least 1",
            ));
        }
        Ok(files.with_link_ttl(Duration::from_secs(ttl)))
    }
}

fn default_public_url(bind: SocketAddr) -> Url {
    // An unspecified bind address is reachable on loopback; name that in links.
    let host = match bind.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => "127.0.0.1".to_string(),
        IpAddr::V6(ip) if ip.is_unspecified() => "[::1]".to_string(),
        IpAddr::V4(ip) => ip.to_string(),
        IpAddr::V6(ip) => format!("[{ip}]"),
    };
    Url::parse(&format!("http://{host}:{}", bind.port())).expect("a socket address forms a URL")
}

fn non_empty(raw: Option<&str>) -> Option<&str> {
    raw.map(str::trim).filter(|s| !s.is_empty())
}

fn required<'a>(setting: &'static str, raw: Option<&'a str>) -> Result<&'a str, ConfigError> {
    non_empty(raw).ok_or_else(|| ConfigError::new(setting, "is not set"))
}

fn parse_or<T: std::str::FromStr + fmt::Display>(
    setting: &'static str,
    raw: Option<&str>,
    default: T,
) -> Result<T, ConfigError> {
    match non_empty(raw) {
        None => Ok(default),
        Some(s) => s
            .parse()
            .map_err(|_| ConfigError::new(setting, format!("{s:?} is not a whole number"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid_args() -> ApiArgs {
        ApiArgs {
            database: DatabaseArgs {
                database_url: Some("postgres://postgres@127.0.0.1/x".into()),
                db_max_connections: None,
            },
            jwt_secret: Some("x".repeat(32)),
            ..ApiArgs::default()
        }
    }

    #[test]
    fn defaults_fill_in() {
        let cfg = valid_args().resolve().unwrap();
        assert_eq!(cfg.bind.to_string(), DEFAULT_BIND);
        assert_eq!(cfg.public_url.as_str(), "http://127.0.0.1:8080/");
        assert!(!cfg.secure_cookies());
        assert!(cfg.redis_url.is_none());
    }

    #[test]
    fn each_bad_setting_is_named() {
        let mut a = valid_args();
        a.jwt_secret = None;
        assert_eq!(a.resolve().unwrap_err().setting, "COMFYFLEET_JWT_SECRET");

        let mut a = valid_args();
        a.jwt_secret = Some("short".into());
        assert_eq!(a.resolve().unwrap_err().setting, "COMFYFLEET_JWT_SECRET");

        let mut a = valid_args();
        a.database.database_url = Some("mysql://x".into());
        assert_eq!(a.resolve().unwrap_err().setting, "DATABASE_URL");

        let mut a = valid_args();
        a.bind = Some("nowhere".into());
        assert_eq!(a.resolve().unwrap_err().setting, "COMFYFLEET_BIND");

        let mut a = valid_args();
        a.redis_url = Some("http://x".into());
        assert_eq!(a.resolve().unwrap_err().setting, "REDIS_URL");

        let mut a = valid_args();
        a.object_store = Some("ftp://bucket".into());
        assert_eq!(a.resolve().unwrap_err().setting, "COMFYFLEET_OBJECT_STORE");

        let mut a = valid_args();
        a.max_upload_bytes = Some("lots".into());
        assert_eq!(
            a.resolve().unwrap_err().setting,
            "COMFYFLEET_MAX_UPLOAD_BYTES"
        );
    }

    #[test]
    fn https_public_url_sets_secure_cookies() {
        let mut a = valid_args();
        a.public_url = Some("https://fleet.example.com".into());
        assert!(a.resolve().unwrap().secure_cookies());
    }

    #[test]
    fn secrets_are_not_debug_printed() {
        let cfg = valid_args().resolve().unwrap();
        let printed = format!("{cfg:?}");
        assert!(!printed.contains(&"x".repeat(32)));
        assert!(!printed.contains("postgres://"));
    }
}

//! [`Files`]: reading and writing tenants' files in the object store.
//!
//! The store is a local directory by default and any S3-compatible service by URL
//! (`s3://bucket/prefix?endpoint=http://minio:9000&region=us-east-1`, credentials
//! from the usual `AWS_*` environment variables). Every operation takes an
//! [`ObjectKey`], so nothing here can address a path outside a tenant's prefix.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::prefix::PrefixStore;
use object_store::{ObjectStore, PutPayload};
use url::Url;

use super::keys::ObjectKey;

/// Where the files live.
#[derive(Clone, PartialEq, Eq)]
pub enum FilesLocation {
    /// A directory on the local disk, created if missing.
    LocalDir(PathBuf),
    /// An S3-compatible bucket: the URL without its query, plus the options the
    /// query carried (`endpoint`, `region`, `allow_http`, … as `object_store`
    /// names them).
    S3 {
        url: Url,
        options: Vec<(AmazonS3ConfigKey, String)>,
    },
    /// Process memory: for tests and throwaway demos only; lost on exit and not
    /// shared between pods.
    Memory,
}

/// A location setting that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LocationError {
    #[error("the files location is empty")]
    Empty,
    #[error("{raw:?} is not a valid URL: {problem}")]
    BadUrl {
        raw: String,
        problem: url::ParseError,
    },
    #[error(
        "{scheme}:// is not supported; use a directory, file:///path, s3://bucket/prefix or memory://"
    )]
    UnsupportedScheme { scheme: String },
    #[error("s3:// needs a bucket name (s3://bucket/prefix)")]
    MissingBucket,
    #[error("unknown object store option {key:?}")]
    UnknownOption { key: String },
    #[error("file:// needs a path")]
    MissingPath,
}

impl FilesLocation {
    /// Reads the setting: a directory path, `file:///path`, `s3://bucket[/prefix][?k=v…]`
    /// or `memory://`.
    pub fn parse(raw: &str) -> Result<Self, LocationError> {
        let raw = raw.trim();
        if raw.is_empty() {
            return Err(LocationError::Empty);
        }
        if !raw.contains("://") {
            return Ok(Self::LocalDir(PathBuf::from(raw)));
        }
        if let Some(rest) = raw.strip_prefix("file://") {
            return match rest {
                "" => Err(LocationError::MissingPath),
                path => Ok(Self::LocalDir(PathBuf::from(path))),
            };
        }
        let url = Url::parse(raw).map_err(|problem| LocationError::BadUrl {
            raw: raw.to_string(),
            problem,
        })?;
        match url.scheme() {
            "memory" => Ok(Self::Memory),
            "s3" | "s3a" => {
                if url.host_str().is_none_or(str::is_empty) {
                    return Err(LocationError::MissingBucket);
                }
                let mut options = Vec::new();
                for (key, value) in url.query_pairs() {
                    let parsed = key.parse::<AmazonS3ConfigKey>().map_err(|_| {
                        LocationError::UnknownOption {
                            key: key.to_string(),
                        }
                    })?;
                    options.push((parsed, value.into_owned()));
                }
                let mut url = url;
                url.set_query(None);
                Ok(Self::S3 { url, options })
            }
            other => Err(LocationError::UnsupportedScheme {
                scheme: other.to_string(),
            }),
        }
    }
}

/// Shows where, never the option values: they may carry access keys.
impl fmt::Debug for FilesLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for FilesLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::LocalDir(dir) => write!(f, "{}", dir.display()),
            Self::S3 { url, options } => {
                write!(f, "{url}")?;
                let keys: Vec<&str> = options.iter().map(|(k, _)| k.as_ref()).collect();
                if !keys.is_empty() {
                    write!(f, " (options: {})", keys.join(", "))?;
                }
                Ok(())
            }
            Self::Memory => f.write_str("memory://"),
        }
    }
}

/// The store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("could not create the files directory {}", path.display())]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("could not open the object store at {location}")]
    Store {
        location: String,
        #[source]
        source: object_store::Error,
    },
}

/// A file operation failed. `NotFound` is the caller's 404; anything else is a 500.
#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    #[error("no file at {key}")]
    NotFound { key: String },
    #[error("object store failed on {key}")]
    Store {
        key: String,
        #[source]
        source: object_store::Error,
    },
}

impl FilesError {
    fn from_store(key: &ObjectKey, source: object_store::Error) -> Self {
        match source {
            object_store::Error::NotFound { .. } => Self::NotFound {
                key: key.to_string(),
            },
            source => Self::Store {
                key: key.to_string(),
                source,
            },
        }
    }

    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::NotFound { .. })
    }
}

/// What is known about a stored file without reading it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileMeta {
    pub size: u64,
    pub last_modified: DateTime<Utc>,
}

/// A file being read: its metadata and a stream of its bytes, ready for
/// `poem::Body::from_bytes_stream`.
pub struct FileStream {
    pub meta: FileMeta,
    pub body: BoxStream<'static, Result<Bytes, std::io::Error>>,
}

impl fmt::Debug for FileStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileStream")
            .field("meta", &self.meta)
            .finish()
    }
}

/// The object store holding every tenant's files. Cheap to clone.
#[derive(Clone)]
pub struct Files {
    store: Arc<dyn ObjectStore>,
    /// For log lines and `Debug`; never carries option values.
    location: Arc<str>,
}

impl fmt::Debug for Files {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Files")
            .field("location", &self.location)
            .finish()
    }
}

impl Files {
    /// Opens the store, creating a local directory if it does not exist yet.
    /// Opening an S3 location does not contact the service; the first operation does.
    pub async fn open(location: &FilesLocation) -> Result<Self, OpenError> {
        let described = location.to_string();
        let store_error = |source| OpenError::Store {
            location: described.clone(),
            source,
        };
        let store: Arc<dyn ObjectStore> = match location {
            FilesLocation::LocalDir(dir) => {
                tokio::fs::create_dir_all(dir)
                    .await
                    .map_err(|source| OpenError::CreateDir {
                        path: dir.clone(),
                        source,
                    })?;
                let local = LocalFileSystem::new_with_prefix(dir)
                    .map_err(store_error)?
                    // Deleting a job's last output also removes its now-empty folders.
                    .with_automatic_cleanup(true);
                Arc::new(local)
            }
            FilesLocation::S3 { url, options } => {
                let mut builder = AmazonS3Builder::from_env().with_url(url.as_str());
                let mut allow_http_set = false;
                for (key, value) in options {
                    if let AmazonS3ConfigKey::Client(object_store::ClientConfigKey::AllowHttp) = key
                    {
                        allow_http_set = true;
                    }
                    builder = builder.with_config(*key, value);
                }
                // An http:// endpoint (MinIO in docker-compose) is useless without
                // this; an explicit allow_http option still wins.
                let plain_http_endpoint = options.iter().any(|(k, v)| {
                    matches!(k, AmazonS3ConfigKey::Endpoint) && v.starts_with("http://")
                });
                if plain_http_endpoint && !allow_http_set {
                    builder = builder.with_allow_http(true);
                }
                let s3 = builder.build().map_err(store_error)?;
                let prefix = url.path().trim_matches('/');
                if prefix.is_empty() {
                    Arc::new(s3)
                } else {
                    Arc::new(PrefixStore::new(s3, prefix))
                }
            }
            FilesLocation::Memory => Arc::new(InMemory::new()),
        };
        Ok(Self {
            store,
            location: described.into(),
        })
    }

    /// Stores `bytes` at `key`, replacing what was there.
    pub async fn put(&self, key: &ObjectKey, bytes: Bytes) -> Result<(), FilesError> {
        self.store
            .put(&key.store_path(), PutPayload::from(bytes))
            .await
            .map_err(|e| FilesError::from_store(key, e))?;
        Ok(())
    }

    /// The whole file in memory.
    pub async fn get(&self, key: &ObjectKey) -> Result<Bytes, FilesError> {
        let found = self
            .store
            .get(&key.store_path())
            .await
            .map_err(|e| FilesError::from_store(key, e))?;
        found
            .bytes()
            .await
            .map_err(|e| FilesError::from_store(key, e))
    }

    /// The file as a stream, for serving large outputs without holding them.
    pub async fn get_stream(&self, key: &ObjectKey) -> Result<FileStream, FilesError> {
        let found = self
            .store
            .get(&key.store_path())
            .await
            .map_err(|e| FilesError::from_store(key, e))?;
        let meta = file_meta(&found.meta);
        let body = found
            .into_stream()
            .map(|r| r.map_err(std::io::Error::other))
            .boxed();
        Ok(FileStream { meta, body })
    }

    /// Size and modification time.
    pub async fn head(&self, key: &ObjectKey) -> Result<FileMeta, FilesError> {
        let meta = self
            .store
            .head(&key.store_path())
            .await
            .map_err(|e| FilesError::from_store(key, e))?;
        Ok(file_meta(&meta))
    }

    pub async fn exists(&self, key: &ObjectKey) -> Result<bool, FilesError> {
        match self.head(key).await {
            Ok(_) => Ok(true),
            Err(FilesError::NotFound { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Removes the file. Deleting a file that is not there succeeds, as it does on
    /// S3, so a retried cleanup does not fail.
    pub async fn delete(&self, key: &ObjectKey) -> Result<(), FilesError> {
        match self.store.delete(&key.store_path()).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(FilesError::from_store(key, e)),
        }
    }
}

fn file_meta(meta: &object_store::ObjectMeta) -> FileMeta {
    FileMeta {
        size: meta.size as u64,
        last_modified: meta.last_modified,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_locations() {
        assert_eq!(
            FilesLocation::parse("data/objects").unwrap(),
            FilesLocation::LocalDir("data/objects".into())
        );
        assert_eq!(
            FilesLocation::parse("file:///srv/files").unwrap(),
            FilesLocation::LocalDir("/srv/files".into())
        );
        assert_eq!(
            FilesLocation::parse("memory://").unwrap(),
            FilesLocation::Memory
        );
        let FilesLocation::S3 { url, options } = FilesLocation::parse(
            "s3://bucket/pre/fix?endpoint=http://127.0.0.1:9000&region=eu-west-1&aws_secret_access_key=shh",
        )
        .unwrap() else {
            panic!("not s3");
        };
        assert_eq!(url.as_str(), "s3://bucket/pre/fix");
        assert_eq!(options.len(), 3);
        assert!(matches!(options[0].0, AmazonS3ConfigKey::Endpoint));
    }

    #[test]
    fn rejects_unusable_locations() {
        for (raw, message) in [
            ("", "the files location is empty"),
            ("file://", "file:// needs a path"),
            ("gs://bucket", "gs:// is not supported"),
            (
                "s3://bucket?colour=blue",
                "unknown object store option \"colour\"",
            ),
        ] {
            let err = FilesLocation::parse(raw).unwrap_err().to_string();
            assert!(err.starts_with(message), "{raw:?}: {err}");
        }
    }

    #[test]
    fn display_never_shows_option_values() {
        let location =
            FilesLocation::parse("s3://bucket?aws_secret_access_key=hunter2&region=x").unwrap();
        let shown = format!("{location:?} {location}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("s3://bucket"), "{shown}");
    }

    #[tokio::test]
    async fn s3_opens_without_contacting_the_service() {
        let location = FilesLocation::parse(
            "s3://bucket/prefix?endpoint=http://127.0.0.1:9&region=us-east-1&access_key_id=a&secret_access_key=b",
        )
        .unwrap();
        let files = Files::open(&location).await.unwrap();
        assert!(format!("{files:?}").contains("s3://bucket/prefix"));
    }
}

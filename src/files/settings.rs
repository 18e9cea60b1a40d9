//! [`FilesConfig`]: every files setting, with its default, in one place for the
//! config layer to fill in.

use std::time::Duration;

use super::fetch::FetchLimits;
use super::storage::FilesLocation;
use super::upload::MaxUploadBytes;

/// Default lifetime of a signed link: long enough to render a page and download
/// its outputs, short enough that a leaked link soon stops working.
pub const DEFAULT_LINK_TTL: Duration = Duration::from_secs(60 * 60);

/// Default directory for files when nothing is configured.
pub const DEFAULT_LOCAL_DIR: &str = "data/objects";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FilesConfig {
    pub location: FilesLocation,
    /// Largest upload (multipart or URL input) accepted; 413 above it.
    pub max_upload: MaxUploadBytes,
    /// How long a signed output link stays valid.
    pub link_ttl: Duration,
    /// Bounds on URL inputs; `max_bytes` follows `max_upload` unless set apart.
    pub url_fetch: FetchLimits,
}

impl Default for FilesConfig {
    fn default() -> Self {
        Self::at(FilesLocation::LocalDir(DEFAULT_LOCAL_DIR.into()))
    }
}

impl FilesConfig {
    /// The defaults, stored at `location`.
    pub fn at(location: FilesLocation) -> Self {
        let max_upload = MaxUploadBytes::default();
        Self {
            location,
            max_upload,
            link_ttl: DEFAULT_LINK_TTL,
            url_fetch: FetchLimits {
                max_bytes: max_upload,
                ..FetchLimits::default()
            },
        }
    }

    /// Sets the upload limit for multipart uploads and URL inputs alike.
    pub fn with_max_upload(mut self, max_upload: MaxUploadBytes) -> Self {
        self.max_upload = max_upload;
        self.url_fetch.max_bytes = max_upload;
        self
    }

    pub fn with_link_ttl(mut self, link_ttl: Duration) -> Self {
        self.link_ttl = link_ttl;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        let config = FilesConfig::default();
        assert_eq!(
            config.location,
            FilesLocation::LocalDir("data/objects".into())
        );
        assert_eq!(config.max_upload.get(), 104_857_600);
        assert_eq!(config.url_fetch.max_bytes, config.max_upload);
        assert_eq!(config.link_ttl, Duration::from_secs(3600));
        let small: MaxUploadBytes = "10".parse().unwrap();
        assert_eq!(config.with_max_upload(small).url_fetch.max_bytes, small);
    }
}

//! Tenants' files: object storage, safe names and keys, upload limits and sniffing,
//! signed links, and URL inputs fetched without SSRF.
//!
//! - [`names`]    `SafeFilename`, `SafeSubfolder`, `unique_upload_name`: names parsed once, at the door.
//! - [`keys`]     `ObjectKey`: `tenants/<tenant>/…`, built only from typed ids and safe names.
//! - [`storage`]  `Files` over `object_store` (local directory, S3 by URL, memory).
//! - [`sniff`]    image kinds by magic bytes; `Content-Type` by extension for serving.
//! - [`upload`]   `MaxUploadBytes` and body readers that stop at the limit.
//! - [`links`]    `LinkSigner`: expiring HMAC-signed links that need no credential header.
//! - [`address`]  which IP addresses a server-side fetch may reach.
//! - [`fetch`]    `UrlFetcher`: bounded downloads that re-check every hop.
//! - [`settings`] `FilesConfig`: the settings above with their defaults.

pub mod address;
pub mod fetch;
pub mod keys;
pub mod links;
pub mod names;
pub mod settings;
pub mod sniff;
pub mod storage;
pub mod upload;

pub use address::{AddressPolicy, Forbidden};
pub use fetch::{FetchError, FetchLimits, Fetched, FetcherSetupError, UrlFetcher};
pub use keys::{Area, KeyError, ObjectKey};
pub use links::{LinkError, LinkSigner};
pub use names::{NameError, SafeFilename, SafeSubfolder, unique_upload_name};
pub use settings::FilesConfig;
pub use sniff::{ImageKind, content_type_for, sniff_image};
pub use storage::{
    FileMeta, FileStream, Files, FilesError, FilesLocation, LocationError, OpenError,
};
pub use upload::{MaxUploadBytes, UploadError, read_field, read_limited, read_stream_limited};

//! Object keys: where a tenant's file lives in the object store.
//!
//! A key is built only from a [`TenantId`], typed ids and the safe names of
//! [`names`](super::names), so it always sits under its own tenant's prefix:
//!
//! ```text
//! tenants/<tenant-uuid>/inputs/<filename>
//! tenants/<tenant-uuid>/outputs/<job-uuid>/<subfolder/…>/<filename>
//! tenants/<tenant-uuid>/temp/<job-uuid>/<filename>
//! ```
//!
//! A tenant UUID has a fixed length, so one tenant's prefix is never a prefix of
//! another's. [`ObjectKey::parse`] reads the same layout back (for a signed link's
//! path) through the same checks, so text from outside can name only a key this
//! module could have built.

use std::fmt;

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};

use super::names::{NameError, SafeFilename, SafeSubfolder};
use crate::domain::ids::{JobId, TenantId};

const TENANTS: &str = "tenants";
const INPUTS: &str = "inputs";
const OUTPUTS: &str = "outputs";
const TEMP: &str = "temp";

/// Characters left as they are in a key's URL form: RFC 3986's unreserved set.
const URL_SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Which of a tenant's areas a key is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Area {
    /// Files uploaded (or fetched from a URL) to feed workflows.
    Input,
    /// Files a job produced.
    Output,
    /// A job's intermediate files (ComfyUI's `type=temp`, e.g. preview images).
    Temp,
}

/// The location of one stored file. Cheap to clone; displays as its canonical path.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ObjectKey {
    tenant: TenantId,
    area: Area,
    /// The canonical path, unencoded (`tenants/…/inputs/my photo.png`).
    path: String,
}

/// Text that does not name a stored file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("not a file path: {0}")]
    Layout(&'static str),
    #[error(transparent)]
    Name(#[from] NameError),
    #[error("file path is not valid percent-encoded UTF-8")]
    Encoding,
}

impl ObjectKey {
    /// An uploaded input: `tenants/<tenant>/inputs/<filename>`.
    pub fn input(tenant: TenantId, filename: &SafeFilename) -> Self {
        Self {
            tenant,
            area: Area::Input,
            path: format!("{}/{INPUTS}/{filename}", tenant_prefix(tenant)),
        }
    }

    /// A job's output: `tenants/<tenant>/outputs/<job>/[<subfolder>/]<filename>`.
    pub fn output(
        tenant: TenantId,
        job: JobId,
        subfolder: &SafeSubfolder,
        filename: &SafeFilename,
    ) -> Self {
        let folder = if subfolder.is_root() {
            String::new()
        } else {
            format!("{subfolder}/")
        };
        Self {
            tenant,
            area: Area::Output,
            path: format!(
                "{}/{OUTPUTS}/{job}/{folder}{filename}",
                tenant_prefix(tenant)
            ),
        }
    }

    /// A job's temporary file: `tenants/<tenant>/temp/<job>/<filename>`.
    pub fn temp(tenant: TenantId, job: JobId, filename: &SafeFilename) -> Self {
        Self {
            tenant,
            area: Area::Temp,
            path: format!("{}/{TEMP}/{job}/{filename}", tenant_prefix(tenant)),
        }
    }

    /// Reads a canonical path (as [`ObjectKey::as_str`] gives it) back into a key.
    pub fn parse(path: &str) -> Result<Self, KeyError> {
        let mut parts = path.split('/');
        if parts.next() != Some(TENANTS) {
            return Err(KeyError::Layout("it must start with tenants/"));
        }
        let tenant: TenantId = parts
            .next()
            .and_then(|t| t.parse().ok())
            .ok_or(KeyError::Layout("the tenant is not a UUID"))?;
        let area = parts.next();
        let rest: Vec<&str> = parts.collect();
        let key = match (area, rest.as_slice()) {
            (Some(INPUTS), [name]) => Self::input(tenant, &SafeFilename::parse(name)?),
            (Some(TEMP), [job, name]) => {
                Self::temp(tenant, parse_job(job)?, &SafeFilename::parse(name)?)
            }
            (Some(OUTPUTS), [job, folders @ .., name]) => Self::output(
                tenant,
                parse_job(job)?,
                &SafeSubfolder::parse(&folders.join("/"))?,
                &SafeFilename::parse(name)?,
            ),
            (Some(INPUTS | TEMP | OUTPUTS), _) => {
                return Err(KeyError::Layout("wrong number of path segments"));
            }
            _ => return Err(KeyError::Layout("unknown area")),
        };
        // The constructors normalise nothing, so a path that parses rebuilds to itself;
        // this catches any future drift between the two directions.
        if key.path != path {
            return Err(KeyError::Layout("not in canonical form"));
        }
        Ok(key)
    }

    /// Reads a key from its URL form ([`ObjectKey::to_url_path`]).
    pub fn parse_url_path(encoded: &str) -> Result<Self, KeyError> {
        let decoded = percent_decode_str(encoded)
            .decode_utf8()
            .map_err(|_| KeyError::Encoding)?;
        Self::parse(&decoded)
    }

    pub fn tenant(&self) -> TenantId {
        self.tenant
    }

    pub fn area(&self) -> Area {
        self.area
    }

    /// The canonical path, unencoded.
    pub fn as_str(&self) -> &str {
        &self.path
    }

    /// The last segment: the file's own name.
    pub fn filename(&self) -> &str {
        self.path.rsplit('/').next().unwrap_or_default()
    }

    /// The path with every segment percent-encoded, ready to follow `/files/` in a URL.
    pub fn to_url_path(&self) -> String {
        self.path
            .split('/')
            .map(|s| utf8_percent_encode(s, URL_SEGMENT).to_string())
            .collect::<Vec<_>>()
            .join("/")
    }

    /// The object-store path; each segment is encoded by `object_store` for the
    /// characters S3 and GCS advise against.
    pub(super) fn store_path(&self) -> object_store::path::Path {
        object_store::path::Path::from_iter(self.path.split('/'))
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.path)
    }
}

/// `tenants/<tenant-uuid>`: everything a tenant stores is under it.
pub fn tenant_prefix(tenant: TenantId) -> String {
    format!("{TENANTS}/{tenant}")
}

fn parse_job(raw: &str) -> Result<JobId, KeyError> {
    raw.parse()
        .map_err(|_| KeyError::Layout("the job is not a UUID"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> SafeFilename {
        SafeFilename::parse(s).unwrap()
    }

    #[test]
    fn layout_is_tenant_first() {
        let t = TenantId::new();
        let j = JobId::new();
        assert_eq!(
            ObjectKey::input(t, &name("a.png")).as_str(),
            format!("tenants/{t}/inputs/a.png")
        );
        assert_eq!(
            ObjectKey::output(t, j, &SafeSubfolder::root(), &name("o.png")).as_str(),
            format!("tenants/{t}/outputs/{j}/o.png")
        );
        assert_eq!(
            ObjectKey::output(t, j, &SafeSubfolder::parse("a/b").unwrap(), &name("o.png")).as_str(),
            format!("tenants/{t}/outputs/{j}/a/b/o.png")
        );
        assert_eq!(
            ObjectKey::temp(t, j, &name("p.png")).as_str(),
            format!("tenants/{t}/temp/{j}/p.png")
        );
    }

    #[test]
    fn two_tenants_never_share_a_prefix() {
        let a = TenantId::new();
        let b = TenantId::new();
        let j = JobId::new();
        let sub = SafeSubfolder::parse("x/y").unwrap();
        let keys_a = [
            ObjectKey::input(a, &name("f.png")),
            ObjectKey::output(a, j, &sub, &name("f.png")),
            ObjectKey::temp(a, j, &name("f.png")),
        ];
        let keys_b = [
            ObjectKey::input(b, &name("f.png")),
            ObjectKey::output(b, j, &sub, &name("f.png")),
            ObjectKey::temp(b, j, &name("f.png")),
        ];
        let prefix_a = format!("{}/", tenant_prefix(a));
        let prefix_b = format!("{}/", tenant_prefix(b));
        assert!(!prefix_a.starts_with(&prefix_b) && !prefix_b.starts_with(&prefix_a));
        for k in &keys_a {
            assert!(k.as_str().starts_with(&prefix_a));
            assert!(!k.as_str().starts_with(&prefix_b));
            assert_eq!(k.tenant(), a);
            for other in &keys_b {
                assert_ne!(k.store_path(), other.store_path());
                assert!(!other.as_str().starts_with(&prefix_a));
            }
        }
    }

    #[test]
    fn parse_round_trips_and_url_form_too() {
        let t = TenantId::new();
        let j = JobId::new();
        for key in [
            ObjectKey::input(t, &name("my photo (1)#?.png")),
            ObjectKey::output(
                t,
                j,
                &SafeSubfolder::parse("a/b").unwrap(),
                &name("фото.png"),
            ),
            ObjectKey::temp(t, j, &name("p.png")),
        ] {
            assert_eq!(ObjectKey::parse(key.as_str()).unwrap(), key);
            let url = key.to_url_path();
            assert!(!url.contains([' ', '?', '#']), "{url}");
            assert_eq!(ObjectKey::parse_url_path(&url).unwrap(), key);
        }
    }

    #[test]
    fn parse_rejects_what_no_constructor_builds() {
        let t = TenantId::new();
        let j = JobId::new();
        for bad in [
            "".to_string(),
            "/etc/passwd".to_string(),
            format!("tenants/{t}/inputs/../x"),
            format!("tenants/{t}/inputs/a/b.png"),
            format!("tenants/{t}/outputs/{j}/../../x.png"),
            format!("tenants/{t}/outputs/{j}"),
            format!("tenants/{t}/other/x.png"),
            format!("tenants/{t}/temp/x.png"),
            "tenants/not-a-uuid/inputs/x.png".to_string(),
            format!("tenants/{}/inputs/x.png", t.to_string().to_uppercase()),
            format!("tenants/{t}/outputs/{j}//x.png"),
        ] {
            assert!(ObjectKey::parse(&bad).is_err(), "{bad:?} was accepted");
        }
        assert!(
            ObjectKey::parse_url_path(&format!("tenants/{t}/inputs/%2E%2E%2Fx")).is_err(),
            "encoded traversal was accepted"
        );
        assert!(ObjectKey::parse_url_path(&format!("tenants/{t}/inputs/%FF.png")).is_err());
    }
}

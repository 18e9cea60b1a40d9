//! File and folder names that are safe to put inside an object key.
//!
//! Every name a client sends (an upload's filename, ComfyUI's `subfolder`, an output
//! name a worker reports) becomes a [`SafeFilename`] or [`SafeSubfolder`] once, at the
//! door. Neither can name a parent directory, an absolute path or a hidden file, so an
//! [`ObjectKey`](super::ObjectKey) built from them never leaves its tenant's prefix.
//! The rejection messages are written for the person who sent the name: they become
//! the `detail` of a 400.
//!
//! Names are otherwise permissive (spaces, unicode, brackets): ComfyUI clients upload
//! `my photo (1).png` and then reference that exact name in a prompt.

use std::fmt;

use chrono::{DateTime, Utc};
use rand::Rng;

/// Longest name most filesystems accept for one path component.
pub const MAX_NAME_BYTES: usize = 255;

/// Why a filename or subfolder was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("{what} must not be empty")]
    Empty { what: &'static str },
    #[error("{what} must not contain '..'")]
    ParentSegment { what: &'static str },
    #[error("{what} must not be '.'")]
    CurrentSegment { what: &'static str },
    #[error("{what} must not start with '/' (absolute paths are not allowed)")]
    Absolute { what: &'static str },
    #[error("{what} must not contain '\\' (use '/' between folders)")]
    Backslash { what: &'static str },
    #[error("filename must not contain '/'")]
    Slash,
    #[error("{what} must not contain NUL or control characters")]
    ControlCharacter { what: &'static str },
    #[error("{what} must not start with '.' (hidden files are not allowed)")]
    Hidden { what: &'static str },
    #[error("{what} must not start or end with whitespace")]
    SurroundingWhitespace { what: &'static str },
    #[error("{what} must be at most {MAX_NAME_BYTES} bytes long (got {len})")]
    TooLong { what: &'static str, len: usize },
    #[error("subfolder must not contain empty segments ('//' or a trailing '/')")]
    EmptySegment,
}

/// One path component: no separators, no `.`/`..`, no control characters, not hidden,
/// 1–255 bytes.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SafeFilename(String);

impl SafeFilename {
    pub fn parse(raw: &str) -> Result<Self, NameError> {
        check_segment(raw, "filename")?;
        if raw.contains('/') {
            return Err(NameError::Slash);
        }
        Ok(Self(raw.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The part after the last `.`, if any (`"a.tar.gz"` → `"gz"`).
    pub fn extension(&self) -> Option<&str> {
        self.0.rsplit_once('.').map(|(_, ext)| ext)
    }
}

impl fmt::Display for SafeFilename {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for SafeFilename {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// A relative folder path such as `""` (the root), `previews` or `a/b`: each segment
/// obeys the [`SafeFilename`] rules.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SafeSubfolder(String);

impl SafeSubfolder {
    /// The root folder: ComfyUI sends `subfolder: ""` for it.
    pub fn root() -> Self {
        Self(String::new())
    }

    pub fn parse(raw: &str) -> Result<Self, NameError> {
        const WHAT: &str = "subfolder";
        if raw.is_empty() {
            return Ok(Self::root());
        }
        // Checked on the whole string first so that `/etc` is reported as absolute,
        // not as an empty first segment.
        if raw.starts_with('/') {
            return Err(NameError::Absolute { what: WHAT });
        }
        if raw.contains('\\') {
            return Err(NameError::Backslash { what: WHAT });
        }
        if raw.split('/').any(|s| s == "..") {
            return Err(NameError::ParentSegment { what: WHAT });
        }
        for segment in raw.split('/') {
            if segment.is_empty() {
                return Err(NameError::EmptySegment);
            }
            check_segment(segment, WHAT)?;
        }
        Ok(Self(raw.to_string()))
    }

    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The folder's segments, none for the root.
    pub fn segments(&self) -> impl Iterator<Item = &str> {
        self.0.split('/').filter(|s| !s.is_empty())
    }
}

impl fmt::Display for SafeSubfolder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The rules shared by a filename and each folder segment.
fn check_segment(raw: &str, what: &'static str) -> Result<(), NameError> {
    if raw.is_empty() {
        return Err(NameError::Empty { what });
    }
    if raw == "." {
        return Err(NameError::CurrentSegment { what });
    }
    if raw.contains("..") && raw.split(['/', '\\']).any(|s| s == "..") {
        return Err(NameError::ParentSegment { what });
    }
    if raw.starts_with('/') {
        return Err(NameError::Absolute { what });
    }
    if raw.contains('\\') {
        return Err(NameError::Backslash { what });
    }
    if raw.chars().any(is_control_like) {
        return Err(NameError::ControlCharacter { what });
    }
    if raw.starts_with('.') {
        return Err(NameError::Hidden { what });
    }
    if raw.starts_with(char::is_whitespace) || raw.ends_with(char::is_whitespace) {
        return Err(NameError::SurroundingWhitespace { what });
    }
    if raw.len() > MAX_NAME_BYTES {
        return Err(NameError::TooLong {
            what,
            len: raw.len(),
        });
    }
    Ok(())
}

/// Control characters, plus the invisible bidirectional overrides and BOM that make
/// `gnp.exe` display as `exe.png`.
fn is_control_like(c: char) -> bool {
    c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{feff}')
}

/// Longest sanitised extension kept from an uploaded name; anything longer is
/// probably not an extension at all.
const MAX_EXTENSION_CHARS: usize = 16;

/// A fresh, collision-resistant name for an upload, in the Runner's shape:
/// `20260324_143052_a1b2c3_myimage.png` (UTC time, 6 random hex characters, the
/// original name sanitised).
///
/// Never fails: an ugly original (spaces, unicode, a Windows path, nothing at all)
/// is cleaned up rather than rejected, because the name the client chose is only a
/// hint here.
pub fn unique_upload_name<R: Rng>(original: &str, now: DateTime<Utc>, rng: &mut R) -> SafeFilename {
    let prefix = format!(
        "{}_{:06x}_",
        now.format("%Y%m%d_%H%M%S"),
        rng.gen_range(0..0x100_0000u32)
    );
    // A browser may send `C:\fakepath\x.png`; only the last component is a name.
    let base = original.rsplit(['/', '\\']).next().unwrap_or_default();
    let (stem, ext) = match base.rsplit_once('.') {
        Some((stem, ext)) if !stem.trim_matches('.').is_empty() => (stem, sanitise(ext)),
        _ => (base, String::new()),
    };
    let ext: String = ext.chars().take(MAX_EXTENSION_CHARS).collect();
    let mut stem = sanitise(stem);
    if stem.is_empty() {
        stem.push_str("upload");
    }
    let suffix = if ext.is_empty() {
        String::new()
    } else {
        format!(".{ext}")
    };
    // Sanitised text is ASCII, so truncating by bytes stays on a char boundary.
    let room = MAX_NAME_BYTES - prefix.len() - suffix.len();
    stem.truncate(room);
    let name = format!("{prefix}{stem}{suffix}");
    debug_assert!(SafeFilename::parse(&name).is_ok(), "{name:?}");
    SafeFilename(name)
}

/// Keeps ASCII letters, digits, `-` and `_`; every run of anything else becomes one
/// `_`; no leading or trailing `_`.
fn sanitise(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    for c in raw.chars() {
        if c.is_ascii_alphanumeric() || c == '-' {
            out.push(c);
        } else if !out.ends_with('_') {
            out.push('_');
        }
    }
    out.trim_matches('_').to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    #[test]
    fn accepts_ordinary_names() {
        for ok in [
            "a.png",
            "ComfyUI_00001_.png",
            "my photo (1).png",
            "фото.jpg",
            "x",
            "a..b.png",
        ] {
            assert_eq!(SafeFilename::parse(ok).unwrap().as_str(), ok);
        }
        assert_eq!(
            SafeFilename::parse("a.tar.gz").unwrap().extension(),
            Some("gz")
        );
    }

    #[test]
    fn rejects_every_traversal_attempt_as_a_filename() {
        let long = "a".repeat(300);
        for bad in [
            "../x",
            "a/../../b",
            "/etc/passwd",
            "C:\\x",
            "x\0y",
            "..",
            ".",
            ".hidden",
            long.as_str(),
            "",
            "a/b",
            "..\\x",
            "tab\there",
            "del\u{7f}",
            " lead",
            "trail ",
            "evil\u{202e}gnp.exe",
        ] {
            assert!(SafeFilename::parse(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn rejects_every_traversal_attempt_as_a_subfolder() {
        let long = "a".repeat(300);
        for bad in [
            "../x",
            "a/../../b",
            "/etc/passwd",
            "C:\\x",
            "x\0y",
            "..",
            ".",
            ".hidden",
            long.as_str(),
            "a//b",
            "a/",
            "a/./b",
            "a/.git",
        ] {
            assert!(SafeSubfolder::parse(bad).is_err(), "{bad:?} was accepted");
        }
        assert_eq!(
            SafeSubfolder::parse("a/b")
                .unwrap()
                .segments()
                .collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert!(SafeSubfolder::parse("").unwrap().is_root());
    }

    #[test]
    fn messages_name_the_problem() {
        assert_eq!(
            SafeFilename::parse("../x").unwrap_err().to_string(),
            "filename must not contain '..'"
        );
        assert_eq!(
            SafeSubfolder::parse("a/../../b").unwrap_err().to_string(),
            "subfolder must not contain '..'"
        );
        assert_eq!(
            SafeFilename::parse("/etc/passwd").unwrap_err().to_string(),
            "filename must not start with '/' (absolute paths are not allowed)"
        );
        assert_eq!(
            SafeFilename::parse(&"a".repeat(300))
                .unwrap_err()
                .to_string(),
            "filename must be at most 255 bytes long (got 300)"
        );
    }

    fn at() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 3, 24, 14, 30, 52).unwrap()
    }

    #[test]
    fn unique_names_have_the_runner_shape() {
        let mut rng = StdRng::seed_from_u64(7);
        let name = unique_upload_name("myimage.png", at(), &mut rng);
        let s = name.as_str();
        assert!(s.starts_with("20260324_143052_"), "{s}");
        assert!(s.ends_with("_myimage.png"), "{s}");
        let hex = &s["20260324_143052_".len()..][..6];
        assert!(hex.chars().all(|c| c.is_ascii_hexdigit()), "{s}");
    }

    #[test]
    fn unique_names_differ() {
        let mut rng = StdRng::seed_from_u64(1);
        let a = unique_upload_name("x.png", at(), &mut rng);
        let b = unique_upload_name("x.png", at(), &mut rng);
        assert_ne!(a, b);
    }

    #[test]
    fn ugly_originals_are_cleaned_not_rejected() {
        let mut rng = StdRng::seed_from_u64(3);
        let long = format!("{}.png", "é".repeat(400));
        let cases = [
            ("my photo (1).PNG", "_my_photo_1.PNG"),
            ("C:\\fakepath\\cat.jpg", "_cat.jpg"),
            ("../../etc/passwd", "_passwd"),
            ("фото.png", "_upload.png"),
            ("", "_upload"),
            (".bashrc", "_bashrc"),
            ("..", "_upload"),
            ("a\0b\n.png", "_a_b.png"),
            ("noext", "_noext"),
            ("x.we!rd ext", "_x.we_rd_ext"),
            (long.as_str(), "_upload.png"),
        ];
        for (original, suffix) in cases {
            let name = unique_upload_name(original, at(), &mut rng);
            assert!(
                name.as_str().ends_with(suffix),
                "{original:?} → {name} (wanted …{suffix})"
            );
            assert_eq!(SafeFilename::parse(name.as_str()).unwrap(), name);
        }
        let huge = format!("{}.png", "a".repeat(1000));
        let name = unique_upload_name(&huge, at(), &mut rng);
        assert_eq!(name.as_str().len(), MAX_NAME_BYTES);
        assert!(name.as_str().ends_with("a.png"));
    }
}

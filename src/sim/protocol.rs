//! ComfyUI's wire formats: Python-`json.dumps`-shaped JSON text, WebSocket message
//! envelopes and the binary preview framing (`server.py` `encode_bytes`).

use std::io;

use serde::Serialize;
use serde_json::{Value, json};

/// Binary event: image type (u32) + image bytes.
pub const PREVIEW_IMAGE: u32 = 1;
/// Binary event: metadata length (u32) + JSON metadata + image bytes.
pub const PREVIEW_IMAGE_WITH_METADATA: u32 = 4;

/// Serialises like Python's `json.dumps` defaults: `", "` and `": "` separators and
/// non-ASCII escaped as `\uXXXX`, so frames match the real server byte for byte.
pub fn dumps(value: &Value) -> String {
    let mut out = Vec::with_capacity(128);
    let mut ser = serde_json::Serializer::with_formatter(&mut out, PyFormatter);
    if value.serialize(&mut ser).is_err() {
        return "null".to_owned();
    }
    String::from_utf8(out).unwrap_or_else(|_| "null".to_owned())
}

struct PyFormatter;

impl serde_json::ser::Formatter for PyFormatter {
    fn begin_array_value<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> io::Result<()> {
        if first { Ok(()) } else { w.write_all(b", ") }
    }

    fn begin_object_key<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> io::Result<()> {
        if first { Ok(()) } else { w.write_all(b", ") }
    }

    fn begin_object_value<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        w.write_all(b": ")
    }

    fn write_string_fragment<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        fragment: &str,
    ) -> io::Result<()> {
        if fragment.is_ascii() {
            return w.write_all(fragment.as_bytes());
        }
        let mut buf = [0u16; 2];
        for c in fragment.chars() {
            if c.is_ascii() {
                w.write_all(&[c as u8])?;
            } else {
                for unit in c.encode_utf16(&mut buf) {
                    write!(w, "\\u{:04x}", unit)?;
                }
            }
        }
        Ok(())
    }

    fn write_f64<W: ?Sized + io::Write>(&mut self, w: &mut W, value: f64) -> io::Result<()> {
        w.write_all(py_float(value).as_bytes())
    }
}

/// Python's `repr(float)` for the values a prompt can carry.
pub fn py_float(v: f64) -> String {
    if v.is_nan() {
        return "NaN".to_owned();
    }
    if v.is_infinite() {
        return if v > 0.0 { "Infinity" } else { "-Infinity" }.to_owned();
    }
    if v == v.trunc() && v.abs() < 1e16 {
        return format!("{v:.1}");
    }
    let s = format!("{v}");
    if s.contains('e') {
        s.replace('e', "e+").replace("e+-", "e-")
    } else {
        s
    }
}

/// Python's `str()` of a JSON value, as validation messages print it.
pub fn py_str(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => py_repr(other),
    }
}

/// Python's `repr()` of a JSON value (`'single'` quoted strings, `True`, `None`).
pub fn py_repr(v: &Value) -> String {
    match v {
        Value::Null => "None".to_owned(),
        Value::Bool(true) => "True".to_owned(),
        Value::Bool(false) => "False".to_owned(),
        Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) => i.to_string(),
            (None, Some(u), _) => u.to_string(),
            (_, _, Some(f)) => py_float(f),
            _ => n.to_string(),
        },
        Value::String(s) => {
            if s.contains('\'') && !s.contains('"') {
                format!("\"{s}\"")
            } else {
                format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"))
            }
        }
        Value::Array(a) => format!("[{}]", a.iter().map(py_repr).collect::<Vec<_>>().join(", ")),
        Value::Object(o) => format!(
            "{{{}}}",
            o.iter()
                .map(|(k, v)| format!("{}: {}", py_repr(&Value::String(k.clone())), py_repr(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// A text frame: `{"type": T, "data": D}`.
pub fn message(kind: &str, data: Value) -> String {
    dumps(&json!({"type": kind, "data": data}))
}

/// `int(time.time() * 1000)`.
pub fn timestamp_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// What a preview image is encoded as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageKind {
    Jpeg,
    Png,
}

impl ImageKind {
    fn legacy_code(self) -> u32 {
        match self {
            ImageKind::Jpeg => 1,
            ImageKind::Png => 2,
        }
    }

    fn mime(self) -> &'static str {
        match self {
            ImageKind::Jpeg => "image/jpeg",
            ImageKind::Png => "image/png",
        }
    }
}

/// Event 1: for sockets that did not negotiate `supports_preview_metadata`.
pub fn preview_frame(kind: ImageKind, image: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + image.len());
    out.extend_from_slice(&PREVIEW_IMAGE.to_be_bytes());
    out.extend_from_slice(&kind.legacy_code().to_be_bytes());
    out.extend_from_slice(image);
    out
}

/// Event 4: metadata JSON names the node and prompt the image belongs to.
pub fn preview_frame_with_metadata(
    kind: ImageKind,
    image: &[u8],
    prompt_id: &str,
    node_id: &str,
) -> Vec<u8> {
    let meta = dumps(&json!({
        "node_id": node_id,
        "prompt_id": prompt_id,
        "display_node_id": node_id,
        "parent_node_id": null,
        "real_node_id": node_id,
        "image_type": kind.mime(),
    }));
    let mut out = Vec::with_capacity(8 + meta.len() + image.len());
    out.extend_from_slice(&PREVIEW_IMAGE_WITH_METADATA.to_be_bytes());
    out.extend_from_slice(&(meta.len() as u32).to_be_bytes());
    out.extend_from_slice(meta.as_bytes());
    out.extend_from_slice(image);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dumps_matches_python_spacing_and_escapes() {
        let v = json!({"type": "status", "data": {"a": [1, 2.0], "é": "x"}});
        assert_eq!(
            dumps(&v),
            r#"{"type": "status", "data": {"a": [1, 2.0], "\u00e9": "x"}}"#
        );
    }

    #[test]
    fn py_repr_of_lists() {
        let v = json!(["nearest-exact", "it's"]);
        assert_eq!(py_repr(&v), r#"['nearest-exact', "it's"]"#);
        assert_eq!(py_float(10.0), "10.0");
        assert_eq!(py_float(0.1), "0.1");
    }

    #[test]
    fn legacy_frame_layout() {
        let f = preview_frame(ImageKind::Jpeg, &[0xff, 0xd8]);
        assert_eq!(f, vec![0, 0, 0, 1, 0, 0, 0, 1, 0xff, 0xd8]);
    }
}

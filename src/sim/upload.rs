//! File routes: `GET /view` and `POST /upload/image`, with ComfyUI's naming,
//! duplicate detection and path checks.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use poem::http::StatusCode;
use poem::web::{Data, Multipart, Query};
use poem::{Response, handler};
use serde_json::json;

use super::files::{Root, mime_for, normalize_subfolder};
use super::http::{empty, json_response};
use super::pixels;
use super::state::Shared;

fn status(code: StatusCode) -> Response {
    Response::builder().status(code).body(Bytes::new())
}

#[handler]
pub async fn upload_image(mut form: Multipart, shared: Data<&Arc<Shared>>) -> Response {
    let mut image: Option<(String, Bytes)> = None;
    let mut fields: HashMap<String, String> = HashMap::new();
    loop {
        let field = match form.next_field().await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(_) => return status(StatusCode::BAD_REQUEST),
        };
        let name = field.name().unwrap_or("").to_owned();
        if name == "image" {
            let file_name = field.file_name().unwrap_or("").to_owned();
            match field.bytes().await {
                Ok(b) => image = Some((file_name, Bytes::from(b))),
                Err(_) => return status(StatusCode::BAD_REQUEST),
            }
        } else if let Ok(text) = field.text().await {
            fields.insert(name, text);
        }
    }
    let Some((file_name, data)) = image else {
        return status(StatusCode::BAD_REQUEST);
    };
    let root = match fields.get("type").map(String::as_str) {
        Some("temp") => Root::Temp,
        Some("output") => Root::Output,
        _ => Root::Input,
    };
    let subfolder = fields.get("subfolder").cloned().unwrap_or_default();
    let Some(sub) = normalize_subfolder(&subfolder) else {
        return status(StatusCode::BAD_REQUEST);
    };
    if file_name.is_empty() || file_name.contains('/') || file_name.contains("..") {
        return status(StatusCode::BAD_REQUEST);
    }
    let overwrite = matches!(
        fields.get("overwrite").map(String::as_str),
        Some("true") | Some("1")
    );
    let mut st = shared.lock();
    let mut name = file_name.clone();
    let (stem, ext) = match file_name.rfind('.') {
        Some(i) if i > 0 => (&file_name[..i], &file_name[i..]),
        _ => (file_name.as_str(), ""),
    };
    let mut duplicate = false;
    if !overwrite {
        let mut i = 1;
        while let Some(existing) = st.files.get(root, &sub, &name) {
            if existing == data {
                duplicate = true;
                break;
            }
            name = format!("{stem} ({i}){ext}");
            i += 1;
        }
    }
    if !duplicate {
        st.files.put(root, &sub, &name, data);
    }
    json_response(&json!({"name": name, "subfolder": subfolder, "type": root.as_str()}))
}

#[handler]
pub fn view(Query(q): Query<HashMap<String, String>>, shared: Data<&Arc<Shared>>) -> Response {
    let Some(raw_name) = q.get("filename") else {
        return status(StatusCode::NOT_FOUND);
    };
    let (mut name, mut root) = (raw_name.as_str(), None);
    for (suffix, r) in [
        (" [output]", Root::Output),
        (" [input]", Root::Input),
        (" [temp]", Root::Temp),
    ] {
        if let Some(stripped) = raw_name.strip_suffix(suffix) {
            name = stripped;
            root = Some(r);
        }
    }
    if name.is_empty() || name.starts_with('/') || name.contains("..") {
        return status(StatusCode::BAD_REQUEST);
    }
    let Some(root) = root.or_else(|| Root::parse(q.get("type").map_or("output", String::as_str)))
    else {
        return status(StatusCode::BAD_REQUEST);
    };
    let sub = match q.get("subfolder") {
        Some(s) => match normalize_subfolder(s) {
            Some(sub) => sub,
            None => return status(StatusCode::FORBIDDEN),
        },
        None => String::new(),
    };
    let base = name.rsplit('/').next().unwrap_or(name);
    let Some(data) = shared.lock().files.get(root, &sub, base) else {
        return status(StatusCode::NOT_FOUND);
    };
    let disposition = format!("filename=\"{base}\"");
    if let Some(preview) = q.get("preview") {
        let (format, quality) = preview.split_once(';').unwrap_or((preview.as_str(), "90"));
        let quality = quality.parse::<u8>().unwrap_or(90).clamp(1, 100);
        if let Some((frame, _)) = pixels::decode(&data) {
            let (body, mime) = match format {
                "webp" => (pixels::encode_webp(&frame), "image/webp"),
                _ => (pixels::encode_jpeg(&frame, quality), "image/jpeg"),
            };
            return Response::builder()
                .header("Content-Disposition", disposition)
                .content_type(mime)
                .body(body);
        }
    }
    let channel = q.get("channel").map_or("rgba", String::as_str);
    if channel != "rgba"
        && let Some((frame, alpha)) = pixels::decode(&data)
    {
        let body = if channel == "a" {
            let alpha = alpha.unwrap_or_else(|| vec![255; (frame.width * frame.height) as usize]);
            gray_png(frame.width, frame.height, &alpha)
        } else {
            pixels::encode_png(&frame, &[])
        };
        return Response::builder()
            .header("Content-Disposition", disposition)
            .content_type("image/png")
            .body(body);
    }
    Response::builder()
        .header("Content-Disposition", disposition)
        .content_type(mime_for(base))
        .body(data)
}

fn gray_png(width: u32, height: u32, luma: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut enc = png::Encoder::new(&mut out, width.max(1), height.max(1));
    enc.set_color(png::ColorType::Grayscale);
    enc.set_depth(png::BitDepth::Eight);
    if enc
        .write_header()
        .and_then(|mut w| w.write_image_data(luma))
        .is_err()
    {
        return Vec::new();
    }
    out
}

/// `POST /free`: nothing to unload in a simulation.
#[handler]
pub fn free() -> Response {
    empty()
}

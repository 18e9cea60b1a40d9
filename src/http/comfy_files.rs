//! The ComfyUI dialect's files and server routes: `/view`, `/upload/image`,
//! `/object_info`, `/system_stats`, `/features` (see `comfy` for the conventions).

use std::collections::HashMap;

use bytes::Bytes;
use chrono::Utc;
use poem::http::StatusCode;
use poem::web::{Multipart, Path, Query};
use poem::{Request, Response, handler};
use serde_json::{Map, Value, json};

use super::AppState;
use super::problem::Problem;
use super::uploads::file_response;
use crate::files::{ObjectKey, SafeFilename, SafeSubfolder, read_limited, sniff_image};
use crate::store::inputs::{InputStatus, StoredFile};

use super::comfy::caller_or_return;
use super::comfy::*;

// ---- files -------------------------------------------------------------------------

/// `GET /view?filename=&subfolder=&type=`: the tenant's output or input file.
/// Status codes follow ComfyUI: 400 for a `..` or absolute filename, 403 for a
/// subfolder that escapes, 404 for anything not found; all with empty bodies.
#[handler]
pub(super) async fn view(req: &Request, Query(q): Query<HashMap<String, String>>) -> Response {
    let (state, tenant) = caller_or_return!(req);
    let Some(raw) = q.get("filename") else {
        return status_only(StatusCode::NOT_FOUND);
    };
    let mut kind = q.get("type").map(String::as_str).unwrap_or("output");
    // ComfyUI accepts an annotated name, `x.png [input]`, and lets it set the type.
    let mut name = raw.as_str();
    for (suffix, k) in [
        (" [output]", "output"),
        (" [input]", "input"),
        (" [temp]", "temp"),
    ] {
        if let Some(stripped) = name.strip_suffix(suffix) {
            name = stripped;
            kind = k;
        }
    }
    if name.starts_with('/') || name.contains("..") {
        return status_only(StatusCode::BAD_REQUEST);
    }
    let Ok(filename) = SafeFilename::parse(name) else {
        return status_only(StatusCode::NOT_FOUND);
    };
    let Ok(subfolder) = SafeSubfolder::parse(q.get("subfolder").map_or("", String::as_str)) else {
        return status_only(StatusCode::FORBIDDEN);
    };
    let found = match kind {
        "output" => state
            .store
            .find_output_by_name(tenant, subfolder.as_str(), filename.as_str())
            .await
            .map(|o| o.map(|o| (o.object_key, Some(o.content_type)))),
        // Inputs are stored flat (see module docs), so only the root folder has any.
        "input" if subfolder.is_root() => state
            .store
            .find_input_by_filename(tenant, filename.as_str())
            .await
            .map(|i| {
                i.filter(|i| i.status == InputStatus::Ready)
                    .and_then(|i| i.object_key.map(|k| (k, i.content_type)))
            }),
        _ => Ok(None),
    };
    let (object_key, content_type) = match found {
        Ok(Some(found)) => found,
        Ok(None) => return status_only(StatusCode::NOT_FOUND),
        Err(e) => return internal(e),
    };
    let Ok(key) = ObjectKey::parse(&object_key) else {
        return status_only(StatusCode::NOT_FOUND);
    };
    if key.tenant() != tenant {
        return status_only(StatusCode::NOT_FOUND);
    }
    match file_response(&state, &key, content_type.as_deref()).await {
        Ok(resp) => resp,
        Err(e) if e.is_not_found() => status_only(StatusCode::NOT_FOUND),
        Err(e) => internal(e),
    }
}

/// `POST /upload/image` (multipart `image`, optional `subfolder`, `overwrite`): stores
/// the image as a tenant input under the client's own name when that name is safe,
/// because ComfyUI clients put the returned `name` into LoadImage. A different image
/// under a taken name gets `name (1).ext`, as in ComfyUI; the same bytes reuse it.
#[handler]
pub(super) async fn upload_image(req: &Request, mut multipart: Multipart) -> Response {
    let (state, tenant) = caller_or_return!(req);
    let mut image: Option<(String, Bytes)> = None;
    let mut overwrite = false;
    loop {
        let field = match multipart.next_field().await {
            Ok(Some(field)) => field,
            Ok(None) => break,
            Err(_) => return status_only(StatusCode::BAD_REQUEST),
        };
        match field.name() {
            Some("image") => {
                let original = field.file_name().unwrap_or("image.png").to_string();
                match read_limited(field.into_async_read(), state.max_upload).await {
                    Ok(bytes) => image = Some((original, bytes)),
                    Err(crate::files::UploadError::TooLarge { .. }) => {
                        return status_only(StatusCode::PAYLOAD_TOO_LARGE);
                    }
                    Err(_) => return status_only(StatusCode::BAD_REQUEST),
                }
            }
            Some("overwrite") => {
                let v = field.text().await.unwrap_or_default();
                overwrite = matches!(v.trim(), "true" | "1");
            }
            // `subfolder` and `type` are read by ComfyUI; here every upload is a flat
            // input, so they are accepted and not used.
            _ => {}
        }
    }
    let Some((original, bytes)) = image else {
        return status_only(StatusCode::BAD_REQUEST);
    };
    let Some(kind) = sniff_image(&bytes) else {
        return status_only(StatusCode::BAD_REQUEST);
    };
    // A browser may send `C:\fakepath\x.png`; only the last component is a name.
    let base = original.rsplit(['/', '\\']).next().unwrap_or_default();
    let wanted = match SafeFilename::parse(base) {
        Ok(n) => n,
        Err(_) => crate::files::unique_upload_name(base, Utc::now(), &mut rand::thread_rng()),
    };
    let (stem, ext) = match wanted.as_str().rsplit_once('.') {
        Some((s, e)) if !s.is_empty() => (s.to_string(), format!(".{e}")),
        _ => (wanted.as_str().to_string(), String::new()),
    };
    for n in 0..100u32 {
        let candidate = if n == 0 {
            wanted.as_str().to_string()
        } else {
            format!("{stem} ({n}){ext}")
        };
        let Ok(name) = SafeFilename::parse(&candidate) else {
            break;
        };
        let existing = match state
            .store
            .find_input_by_filename(tenant, name.as_str())
            .await
        {
            Ok(e) => e,
            Err(e) => return internal(e),
        };
        match existing {
            None => {
                let key = ObjectKey::input(tenant, &name);
                // The record first: its unique name is what claims the object key, so
                // a concurrent upload of another image never overwrites this one.
                let stored = state
                    .store
                    .insert_ready_input(
                        tenant,
                        StoredFile {
                            filename: name.as_str(),
                            content_type: kind.mime(),
                            object_key: key.as_str(),
                            size_bytes: bytes.len() as i64,
                        },
                    )
                    .await;
                let events = match stored {
                    Ok((_, events)) => events,
                    // Another upload took the name in between: try the next one.
                    Err(crate::store::StoreError::Conflict(_)) => continue,
                    Err(e) => return internal(e),
                };
                if let Err(e) = state.files.put(&key, bytes.clone()).await {
                    return internal(e);
                }
                state.publish(&events).await;
                return upload_reply(name.as_str());
            }
            Some(input) => {
                let Some(key) = input
                    .object_key
                    .as_deref()
                    .and_then(|k| ObjectKey::parse(k).ok())
                else {
                    continue;
                };
                if overwrite {
                    // The record keeps its first size; workers read the object itself.
                    if let Err(e) = state.files.put(&key, bytes.clone()).await {
                        return internal(e);
                    }
                    return upload_reply(name.as_str());
                }
                if input.size_bytes == Some(bytes.len() as i64)
                    && state.files.get(&key).await.is_ok_and(|b| b == bytes)
                {
                    return upload_reply(name.as_str());
                }
            }
        }
    }
    Problem::new(
        StatusCode::CONFLICT,
        "name_taken",
        "too many different images under this name; rename the file",
    )
    .into_poem_response()
}

fn upload_reply(name: &str) -> Response {
    json_response(&json!({"name": name, "subfolder": "", "type": "input"}))
}

// ---- the node catalogue and the server -------------------------------------------

/// The union of the fresh workers' `/object_info`; the newest worker's schema of a
/// class wins. Empty when no worker is online.
async fn fleet_object_info(state: &AppState) -> Result<Map<String, Value>, Response> {
    let docs = state
        .store
        .fleet_object_info(FRESH_WORKER_SECS)
        .await
        .map_err(internal)?;
    let mut union = Map::new();
    for doc in docs {
        if let Value::Object(classes) = doc {
            for (class, schema) in classes {
                union.entry(class).or_insert(schema);
            }
        }
    }
    Ok(union)
}

/// The rendered `/object_info` union of this pod, and which workers it was built
/// from: the documents are large (megabytes per worker), so they are read and
/// rendered again only when the set of fresh workers changed.
#[derive(Default)]
pub struct ObjectInfoCache(tokio::sync::Mutex<Option<(String, Bytes)>>);

#[handler]
pub(super) async fn object_info(req: &Request) -> Response {
    let (state, _) = caller_or_return!(req);
    let version = match state
        .store
        .fleet_object_info_version(FRESH_WORKER_SECS)
        .await
    {
        Ok(v) => v,
        Err(e) => return internal(e),
    };
    // One rebuild at a time; the others wait for it rather than repeat it.
    let mut cached = state.object_info.0.lock().await;
    if let Some((built_from, body)) = cached.as_ref()
        && *built_from == version
    {
        return json_bytes(body.clone());
    }
    match fleet_object_info(&state).await {
        Ok(union) => {
            let body = Bytes::from(Value::Object(union).to_string());
            *cached = Some((version, body.clone()));
            json_bytes(body)
        }
        Err(resp) => resp,
    }
}

fn json_bytes(body: Bytes) -> Response {
    Response::builder()
        .content_type("application/json; charset=utf-8")
        .body(body)
}

#[handler]
pub(super) async fn object_info_class(req: &Request, Path(class): Path<String>) -> Response {
    let (state, _) = caller_or_return!(req);
    let classes = [class.clone()];
    match state
        .store
        .fleet_node_schemas(FRESH_WORKER_SECS, &classes)
        .await
    {
        Ok(schemas) => match schemas.and_then(|s| s.into_iter().next()) {
            Some((_, schema)) => json_response(&json!({ class: schema })),
            None => json_response(&json!({})),
        },
        Err(e) => internal(e),
    }
}

#[handler]
pub(super) async fn system_stats(req: &Request) -> Response {
    let (state, _) = caller_or_return!(req);
    let version = state
        .store
        .list_workers(FRESH_WORKER_SECS)
        .await
        .ok()
        .and_then(|ws| ws.into_iter().find_map(|w| w.comfyui_version))
        .unwrap_or_else(|| "0.3.64".to_string());
    // A fleet has no single machine: the numbers describe no device in particular,
    // present only because clients read these fields.
    json_response(&json!({
        "system": {
            "os": "posix",
            "ram_total": 0,
            "ram_free": 0,
            "comfyui_version": version,
            "required_frontend_version": "1.27.10",
            "installed_templates_version": "0.1.95",
            "required_templates_version": "0.1.95",
            "python_version": concat!("comfyfleet ", env!("CARGO_PKG_VERSION")),
            "pytorch_version": "",
            "embedded_python": false,
            "argv": ["comfyfleet"],
        },
        "devices": [],
    }))
}

#[handler]
pub(super) async fn features(req: &Request) -> Response {
    let (state, _) = caller_or_return!(req);
    json_response(&json!({
        "supports_preview_metadata": true,
        "max_upload_size": state.max_upload.get(),
    }))
}

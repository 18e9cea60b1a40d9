//! ComfyUI's HTTP surface (every route at `/x` and `/api/x`), the "slow HTTP"
//! middleware and the acceptor that can refuse connections.
//!
//! Bodies are read as JSON whatever their Content-Type says, like aiohttp's
//! `request.json()`, and a body that is not JSON is answered the way aiohttp
//! answers an unhandled exception: 500 text/plain.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use poem::http::StatusCode;
use poem::listener::{Acceptor, TcpAcceptor};
use poem::web::{Data, Path, Query};
use poem::web::{LocalAddr, RemoteAddr};
use poem::{Endpoint, EndpointExt, IntoEndpoint, Request, Response, Route, get, handler, post};
use serde_json::{Map, Value, json};
use tokio::net::{TcpListener, TcpStream};

use super::catalog::{Catalog, MODEL_FOLDERS};
use super::files::Root;
use super::nodes::split_image_name;
use super::protocol::dumps;
use super::state::{QueueItem, Shared};
use super::validate::{truthy, validate_prompt};
use super::{upload, ws};

pub fn json_response(v: &Value) -> Response {
    Response::builder()
        .content_type("application/json; charset=utf-8")
        .body(dumps(v))
}

pub fn empty() -> Response {
    Response::builder()
        .status(StatusCode::OK)
        .body(Bytes::new())
}

fn server_error() -> Response {
    Response::builder()
        .status(StatusCode::INTERNAL_SERVER_ERROR)
        .content_type("text/plain; charset=utf-8")
        .body("500 Internal Server Error\n\nServer got itself in trouble")
}

fn parse_json(body: &[u8]) -> Option<Value> {
    serde_json::from_slice(body).ok()
}

fn routes() -> Route {
    Route::new()
        .at("/ws", get(ws::ws))
        .at("/prompt", get(get_prompt).post(post_prompt))
        .at("/queue", get(get_queue).post(post_queue))
        .at("/interrupt", post(interrupt))
        .at("/free", post(upload::free))
        .at("/history", get(get_history).post(post_history))
        .at("/history/:prompt_id", get(get_history_item))
        .at("/view", get(upload::view))
        .at("/upload/image", post(upload::upload_image))
        .at("/object_info", get(object_info))
        .at("/object_info/:class", get(object_info_class))
        .at("/system_stats", get(system_stats))
        .at("/features", get(features))
        .at("/embeddings", get(list_empty))
        .at("/extensions", get(list_empty))
        .at("/models", get(models))
        .at("/models/:folder", get(models_in))
}

/// The whole app: routes twice, state, and the HTTP-delay fault.
pub fn app(shared: Arc<Shared>) -> impl Endpoint + 'static {
    Route::new()
        .nest("/api", routes())
        .nest("/", routes().at("/", get(index)))
        .data(shared.clone())
        .around(move |ep, req: Request| {
            let shared = shared.clone();
            async move {
                let delay = shared.faults.http_delay();
                let is_ws = req.uri().path().ends_with("/ws");
                if !delay.is_zero() && !is_ws {
                    tokio::time::sleep(delay).await;
                }
                ep.call(req).await
            }
        })
        .into_endpoint()
}

#[handler]
fn index() -> Response {
    Response::builder().content_type("text/html").body(
        "<!doctype html><title>ComfyUI</title><p>comfyfleet sim: a simulated ComfyUI server.</p>",
    )
}

#[handler]
fn list_empty() -> Response {
    json_response(&json!([]))
}

#[handler]
fn get_prompt(shared: Data<&Arc<Shared>>) -> Response {
    let remaining = shared.lock().queue_remaining();
    json_response(&json!({"exec_info": {"queue_remaining": remaining}}))
}

#[handler]
fn post_prompt(body: Bytes, shared: Data<&Arc<Shared>>) -> Response {
    let Some(Value::Object(mut req)) = parse_json(&body) else {
        return server_error();
    };
    let number = {
        let mut st = shared.lock();
        match req.get("number") {
            Some(n) => match n
                .as_f64()
                .or_else(|| n.as_str().and_then(|s| s.trim().parse::<f64>().ok()))
            {
                Some(f) => json!(f),
                None => return server_error(),
            },
            None => {
                let mut n = st.number;
                if req.get("front").is_some_and(truthy) {
                    n = -n;
                }
                st.number += 1;
                json!(n)
            }
        }
    };
    let Some(prompt) = req.remove("prompt") else {
        let error = json!({"type": "no_prompt", "message": "No prompt provided",
                           "details": "No prompt provided", "extra_info": {}});
        return Response::builder()
            .status(StatusCode::BAD_REQUEST)
            .content_type("application/json; charset=utf-8")
            .body(dumps(&json!({"error": error, "node_errors": {}})));
    };
    let Value::Object(mut prompt) = prompt else {
        return server_error();
    };
    let prompt_id = match req.get("prompt_id") {
        Some(Value::String(s)) => s.clone(),
        Some(other) => super::protocol::py_str(other),
        None => shared.lock().random_uuid(),
    };
    let partial: Option<Vec<String>> = req
        .get("partial_execution_targets")
        .and_then(Value::as_array)
        .map(|a| a.iter().map(super::protocol::py_str).collect());
    let info = shared.object_info();
    let outcome = {
        let st = shared.lock();
        let exists = |name: &str| {
            let (sub, file) = split_image_name(name);
            st.files.get(Root::Input, &sub, &file).is_some()
        };
        validate_prompt(&mut prompt, partial.as_deref(), &info, &exists)
    };
    let mut extra_data = match req.remove("extra_data") {
        Some(Value::Object(m)) => m,
        Some(_) => return server_error(),
        None => Map::new(),
    };
    if let Some(c) = req.get("client_id") {
        extra_data.insert("client_id".to_owned(), c.clone());
    }
    match outcome {
        Ok((outputs, node_errors)) => {
            // Secrets a client passes for API nodes never reach queue or history.
            for key in ["auth_token_comfy_org", "api_key_comfy_org"] {
                extra_data.shift_remove(key);
            }
            let item = QueueItem {
                number: number.clone(),
                prompt_id: prompt_id.clone(),
                prompt,
                extra_data: Value::Object(extra_data),
                outputs,
            };
            shared.lock().put(item);
            shared.queued.notify_one();
            json_response(
                &json!({"prompt_id": prompt_id, "number": number, "node_errors": node_errors}),
            )
        }
        Err(rejected) => {
            let (error, node_errors) = *rejected;
            Response::builder()
                .status(StatusCode::BAD_REQUEST)
                .content_type("application/json; charset=utf-8")
                .body(dumps(&json!({"error": error, "node_errors": node_errors})))
        }
    }
}

#[handler]
fn get_queue(shared: Data<&Arc<Shared>>) -> Response {
    let st = shared.lock();
    let running: Vec<Value> = st.running.iter().map(QueueItem::to_json).collect();
    json_response(&json!({"queue_running": running, "queue_pending": st.pending_sorted()}))
}

#[handler]
fn post_queue(body: Bytes, shared: Data<&Arc<Shared>>) -> Response {
    let Some(Value::Object(req)) = parse_json(&body) else {
        return server_error();
    };
    let mut st = shared.lock();
    if req.get("clear").is_some_and(truthy) {
        st.pending.clear();
        st.queue_updated();
    }
    if let Some(ids) = req.get("delete").and_then(Value::as_array) {
        for id in ids {
            if let Some(pos) = st
                .pending
                .iter()
                .position(|i| Value::String(i.prompt_id.clone()) == *id)
            {
                st.pending.remove(pos);
                st.queue_updated();
            }
        }
    }
    empty()
}

#[handler]
fn interrupt(body: Bytes, shared: Data<&Arc<Shared>>) -> Response {
    let target = parse_json(&body).and_then(|v| v.get("prompt_id").cloned());
    {
        let mut st = shared.lock();
        let running = st.running.as_ref().map(|i| i.prompt_id.clone());
        match target {
            // Targeted: only if that prompt is the one running; otherwise a no-op.
            Some(id) => {
                if running.is_some_and(|r| Value::String(r) == id) {
                    st.interrupt = true;
                }
            }
            None => st.interrupt = true,
        }
    }
    shared.interrupted.notify_waiters();
    empty()
}

#[handler]
fn get_history(Query(q): Query<HashMap<String, String>>, shared: Data<&Arc<Shared>>) -> Response {
    let max_items = q.get("max_items").and_then(|m| m.parse::<usize>().ok());
    let offset = q
        .get("offset")
        .and_then(|o| o.parse::<i64>().ok())
        .unwrap_or(-1);
    let st = shared.lock();
    let len = st.history.len();
    let start = match (offset, max_items) {
        (o, Some(m)) if o < 0 => len.saturating_sub(m),
        (o, _) if o < 0 => 0,
        (o, _) => o as usize,
    };
    let out: Map<String, Value> = st
        .history
        .iter()
        .skip(start)
        .take(max_items.unwrap_or(usize::MAX))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    json_response(&Value::Object(out))
}

#[handler]
fn get_history_item(Path(prompt_id): Path<String>, shared: Data<&Arc<Shared>>) -> Response {
    let st = shared.lock();
    match st.history.get(&prompt_id) {
        Some(entry) => json_response(&json!({ prompt_id: entry })),
        None => json_response(&json!({})),
    }
}

#[handler]
fn post_history(body: Bytes, shared: Data<&Arc<Shared>>) -> Response {
    let Some(Value::Object(req)) = parse_json(&body) else {
        return server_error();
    };
    let mut st = shared.lock();
    if req.get("clear").is_some_and(truthy) {
        st.history.clear();
    }
    if let Some(ids) = req.get("delete").and_then(Value::as_array) {
        for id in ids.iter().filter_map(Value::as_str) {
            st.history.shift_remove(id);
        }
    }
    empty()
}

#[handler]
fn object_info(shared: Data<&Arc<Shared>>) -> Response {
    json_response(&Value::Object(Map::clone(&shared.object_info())))
}

#[handler]
fn object_info_class(Path(class): Path<String>, shared: Data<&Arc<Shared>>) -> Response {
    let info = shared.object_info();
    match info.get(&class) {
        Some(entry) => json_response(&json!({ class: entry })),
        None => json_response(&json!({})),
    }
}

#[handler]
fn features(shared: Data<&Arc<Shared>>) -> Response {
    json_response(&ws::server_features(&shared))
}

#[handler]
fn models() -> Response {
    json_response(&json!(MODEL_FOLDERS))
}

#[handler]
fn models_in(Path(folder): Path<String>, shared: Data<&Arc<Shared>>) -> Response {
    if !MODEL_FOLDERS.contains(&folder.as_str()) {
        return Response::builder()
            .status(StatusCode::NOT_FOUND)
            .body(Bytes::new());
    }
    json_response(&json!(Catalog::model_files(&shared.config.models, &folder)))
}

#[handler]
fn system_stats() -> Response {
    const RAM: u64 = 25_276_502_016;
    json_response(&json!({
        "system": {
            "os": "posix",
            "ram_total": RAM,
            "ram_free": RAM / 4 * 3,
            "comfyui_version": "0.3.64",
            "required_frontend_version": "1.27.10",
            "installed_templates_version": "0.1.95",
            "required_templates_version": "0.1.95",
            "python_version": "3.11.7 (comfyfleet sim)",
            "pytorch_version": "2.8.0+cu128",
            "embedded_python": false,
            "argv": ["main.py", "--comfyfleet-sim"],
        },
        "devices": [{
            "name": "cpu", "type": "cpu", "index": null,
            "vram_total": RAM, "vram_free": RAM / 4 * 3,
            "torch_vram_total": RAM, "torch_vram_free": RAM / 4 * 3,
        }],
    }))
}

/// Accepts TCP connections, dropping them at once while the "refuse" fault is on.
pub struct RefusingAcceptor {
    inner: TcpAcceptor,
    shared: Arc<Shared>,
}

impl RefusingAcceptor {
    pub fn new(listener: TcpListener, shared: Arc<Shared>) -> std::io::Result<Self> {
        Ok(Self {
            inner: TcpAcceptor::from_tokio(listener)?,
            shared,
        })
    }
}

impl Acceptor for RefusingAcceptor {
    type Io = TcpStream;

    fn local_addr(&self) -> Vec<LocalAddr> {
        self.inner.local_addr()
    }

    async fn accept(
        &mut self,
    ) -> std::io::Result<(TcpStream, LocalAddr, RemoteAddr, poem::http::uri::Scheme)> {
        loop {
            let conn = self.inner.accept().await?;
            if !self.shared.faults.refusing() {
                return Ok(conn);
            }
            drop(conn);
        }
    }
}

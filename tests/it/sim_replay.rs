//! Replays the recorded ComfyUI traces against a sim: every client action in
//! order, each after the sockets have caught up with the recording, and every
//! answer and frame compared with what the real server sent.

use std::collections::HashMap;
use std::sync::Arc;

use futures_util::SinkExt;
use serde_json::{Value, json};

use crate::sim_support::{
    Frame, Inbox, WsSink, compare_frames, connect, expected_frame, first_diff, fixture_dir,
    load_trace, send_text, shape,
};

/// Requests whose JSON answer must equal the recording exactly (ids aside).
fn exact_json(path: &str) -> bool {
    [
        "/features",
        "/embeddings",
        "/models",
        "/upload/image",
        "/object_info/",
        "/prompt",
    ]
    .iter()
    .any(|p| path.starts_with(p) && !path.starts_with("/history"))
}

/// Replays recorded scenarios, in order, against one sim at `base`
/// (`http://127.0.0.1:PORT`), checking every answer and every frame.
pub async fn replay(base: &str, files: &[&str]) {
    replay_on(base, None, files).await;
}

/// Replays recorded scenarios against an API pod as a client of one tenant
/// (`api_key`), with sim workers behind it. Every answer is checked as against a
/// sim; a socket's frames are checked modulo the fleet's documented departures
/// (see [`fleet_order`]).
pub async fn replay_fleet(base: &str, api_key: &str, files: &[&str]) {
    replay_on(base, Some(api_key), files).await;
}

/// A frame with what the fleet does not record made uniform (see [`WORKER_SIDE`]).
fn fleet_shape(f: &Frame) -> Frame {
    let mut f = f.clone();
    if let Frame::Text { kind, shape } = &mut f
        && (kind == "execution_error" || kind == "execution_interrupted")
        && let Some(o) = shape.as_object_mut()
    {
        for key in WORKER_SIDE {
            if o.contains_key(key) {
                o.insert(key.into(), json!("<worker-side>"));
            }
        }
        if kind == "execution_interrupted" {
            for key in INTERRUPTED_AT {
                o.insert(key.into(), json!("<worker-side>"));
            }
        }
    }
    f
}

/// Where an interruption caught the prompt: not kept once a job is cancelled.
const INTERRUPTED_AT: [&str; 2] = ["node_id", "node_type"];

/// What an error report keeps on the worker: the nodes run before it, the failing
/// node's inputs and outputs, the traceback.
const WORKER_SIDE: [&str; 4] = ["executed", "current_inputs", "current_outputs", "traceback"];

/// Whether a frame counts towards "the socket caught up with the recording": a
/// fleet's `status` broadcasts differ in number, so they do not.
fn counted(fleet: bool, f: &Frame) -> bool {
    !(fleet && matches!(f, Frame::Text { kind, .. } if kind == "status"))
}

/// The recorded frames the way a fleet sends them: queue `status` broadcasts left
/// out (ComfyUI sends one per queue operation, the fleet one per job event), and
/// each `executed` moved to just before its prompt's `execution_success` (the
/// fleet announces outputs once they are stored, so `/view` can serve them).
fn fleet_order(frames: &[Frame]) -> Vec<Frame> {
    let mut out = Vec::new();
    let mut held = Vec::new();
    for f in frames.iter().map(fleet_shape) {
        let f = &f;
        match f {
            Frame::Text { kind, .. } if kind == "status" => {}
            Frame::Text { kind, .. } if kind == "executed" => held.push(f.clone()),
            Frame::Text { kind, .. }
                if kind.starts_with("execution_")
                    && kind != "execution_start"
                    && kind != "execution_cached" =>
            {
                out.append(&mut held);
                out.push(f.clone());
            }
            _ => out.push(f.clone()),
        }
    }
    out.append(&mut held);
    out
}

async fn replay_on(base: &str, api_key: Option<&str>, files: &[&str]) {
    let fleet = api_key.is_some();
    let http = {
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(key) = api_key {
            headers.insert("x-api-key", key.parse().expect("header value"));
        }
        reqwest::Client::builder()
            .default_headers(headers)
            .build()
            .expect("client")
    };
    let mut ids: HashMap<String, String> = HashMap::new();
    for file in files {
        let trace = load_trace(file);
        let mut sinks: HashMap<String, WsSink> = HashMap::new();
        let mut inboxes: HashMap<String, Arc<Inbox>> = HashMap::new();
        let mut expected: HashMap<String, Vec<Frame>> = HashMap::new();
        let expected_before = |conn: &str, seq: usize| {
            trace[..seq]
                .iter()
                .filter(|l| l["dir"] == "server->client" && l["conn"] == conn)
                .filter(|l| l["kind"] == "ws-text" || l["kind"] == "ws-binary")
                .filter(|l| counted(fleet, &expected_frame(l)) && !(fleet && only_temp_output(l)))
                .count()
        };
        let map_ids = |text: String, ids: &HashMap<String, String>| {
            ids.iter().fold(text, |t, (from, to)| t.replace(from, to))
        };
        let mut i = 0;
        while i < trace.len() {
            let line = &trace[i];
            let conn = line["conn"].as_str().unwrap_or("").to_owned();
            let client_action = line["dir"] == "client->server"
                || (line["kind"] == "http-response" && line.get("request_body_raw").is_some())
                || (line["kind"] == "http-response" && line["label"] == "no_body");
            if line["dir"] == "server->client"
                && (line["kind"] == "ws-text" || line["kind"] == "ws-binary")
                && !(fleet && only_temp_output(line))
            {
                expected
                    .entry(conn.clone())
                    .or_default()
                    .push(expected_frame(line));
            }
            if client_action {
                // Let every open socket catch up with the recording first.
                for (c, inbox) in &inboxes {
                    if sinks.contains_key(c) {
                        inbox
                            .wait_for_matching(
                                expected_before(c, i),
                                &format!("{file} seq {i} ({c})"),
                                |f| counted(fleet, f),
                            )
                            .await;
                    }
                }
            }
            match (line["dir"].as_str(), line["kind"].as_str()) {
                (Some("client->server"), Some("ws-open")) => {
                    let mut path = line["path"].as_str().unwrap_or("/ws").to_owned();
                    if let Some(key) = api_key {
                        let sep = if path.contains('?') { '&' } else { '?' };
                        path = format!("{path}{sep}api_key={key}");
                    }
                    let (sink, inbox) =
                        connect(&format!("{}{}", base.replace("http", "ws"), path)).await;
                    sinks.insert(conn.clone(), sink);
                    inboxes.insert(conn.clone(), inbox);
                }
                (Some("client->server"), Some("ws-text")) => {
                    let sink = sinks.get_mut(&conn).expect("socket open");
                    send_text(sink, line["raw"].as_str().unwrap_or("")).await;
                }
                (Some("client->server"), Some("ws-close")) => {
                    let inbox = inboxes[&conn].clone();
                    let exp = expected.get(&conn).cloned().unwrap_or_default();
                    let actual: Vec<Frame> = inbox
                        .frames
                        .lock()
                        .unwrap()
                        .iter()
                        .map(|(f, _, _)| f.clone())
                        .collect();
                    if fleet {
                        let actual: Vec<Frame> = actual
                            .iter()
                            .filter(|f| counted(true, f))
                            .map(fleet_shape)
                            .collect();
                        if std::env::var("REPLAY_DEBUG").is_ok() {
                            for (f, v, _) in inbox.frames.lock().unwrap().iter() {
                                eprintln!("{conn} {f:?} {v}");
                            }
                        }
                        compare_frames(file, &conn, &fleet_order(&exp), &actual);
                    } else {
                        compare_frames(file, &conn, &exp, &actual);
                    }
                    if let Some(mut sink) = sinks.remove(&conn) {
                        let _ = sink.close().await;
                    }
                }
                // The fleet keeps no PreviewImage temp files (see `only_temp_output`),
                // and serves files as stored (no `preview=webp;50` re-encoding).
                (Some("client->server"), Some("http-request"))
                    if fleet
                        && line["path"]
                            .as_str()
                            .is_some_and(|p| p.contains("type=temp") || p.contains("preview=")) => {
                }
                (Some("client->server"), Some("http-request")) => {
                    let resp = trace[i + 1..]
                        .iter()
                        .find(|l| l["kind"] == "http-response")
                        .expect("request has a response")
                        .clone();
                    let path = map_ids(line["path"].as_str().unwrap_or("/").to_owned(), &ids);
                    let url = format!("{base}{path}");
                    if fleet && path.starts_with("/history/") && resp["body"] != json!({}) {
                        // The recorded client waited for the queue to drain (a `status`
                        // frame, which a fleet sends on its own schedule); a fleet lists
                        // a prompt once its outputs are stored. Wait for that instead.
                        crate::support::eventually(20, || async {
                            let body: Value =
                                http.get(&url).send().await.ok()?.json().await.ok()?;
                            (body != json!({})).then_some(())
                        })
                        .await;
                    }
                    let req = match line["method"].as_str() {
                        Some("POST") if line.get("form").is_some() => {
                            http.post(&url).multipart(upload_form(&line["form"]))
                        }
                        Some("POST") => {
                            let body = map_ids(line["body"].to_string(), &ids);
                            http.post(&url)
                                .header("content-type", "application/json")
                                .body(body)
                        }
                        _ => http.get(&url),
                    };
                    let got = req.send().await.expect("http answer");
                    check_response(file, &path, &resp, got, &mut ids, fleet).await;
                }
                (Some("server->client"), Some("http-response")) if client_action => {
                    let path = line["path"].as_str().unwrap_or("/");
                    let body = line
                        .get("request_body_raw")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_owned();
                    let got = http
                        .post(format!("{base}{path}"))
                        .body(body)
                        .send()
                        .await
                        .expect("http answer");
                    check_response(file, path, line, got, &mut ids, fleet).await;
                }
                _ => {}
            }
            i += 1;
        }
    }
}

fn upload_form(form: &Value) -> reqwest::multipart::Form {
    let mut f = reqwest::multipart::Form::new();
    for (k, v) in form.as_object().into_iter().flatten() {
        if k == "image" {
            // The recording keeps the first upload's bytes; the "different bytes" one is any other PNG.
            let bytes = if v["len"] == 77 {
                std::fs::read(fixture_dir().join("bin/03-view-input.png")).expect("bin")
            } else {
                std::fs::read(fixture_dir().join("bin/02-view-output.png")).expect("bin")
            };
            let part = reqwest::multipart::Part::bytes(bytes)
                .file_name(v["filename"].as_str().unwrap_or("x.png").to_owned())
                .mime_str("image/png")
                .expect("mime");
            f = f.part("image", part);
        } else {
            f = f.text(k.clone(), v.as_str().unwrap_or("").to_owned());
        }
    }
    f
}

async fn check_response(
    file: &str,
    path: &str,
    exp: &Value,
    got: reqwest::Response,
    ids: &mut HashMap<String, String>,
    fleet: bool,
) {
    let what = format!("{file} {path} {}", exp["label"].as_str().unwrap_or(""));
    assert_eq!(
        got.status().as_u16() as u64,
        exp["status"].as_u64().unwrap_or(0),
        "{what}: status"
    );
    let ct = got
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap_or("").to_owned());
    let exp_ct = exp["headers"]["content-type"].as_str().map(str::to_owned);
    if exp_ct.is_some() {
        assert_eq!(ct, exp_ct, "{what}: content-type");
    }
    let body = got.bytes().await.expect("body");
    if let Some(text) = exp.get("body_text").and_then(Value::as_str) {
        assert_eq!(String::from_utf8_lossy(&body), text, "{what}: body");
        return;
    }
    if exp["headers"]["content-length"] == "0" {
        assert!(body.is_empty(), "{what}: empty body");
        return;
    }
    if let Some(head) = exp.get("body_head_hex").and_then(Value::as_str) {
        assert_eq!(
            hex::encode(&body[..4.min(body.len())]),
            head[..8],
            "{what}: file magic"
        );
        return;
    }
    let Some(expected) = exp.get("body") else {
        // Summarised in the recording (full /object_info, full /history): JSON is enough.
        assert!(
            serde_json::from_slice::<Value>(&body).is_ok(),
            "{what}: JSON body"
        );
        return;
    };
    let actual: Value = serde_json::from_slice(&body).expect("JSON body");
    if std::env::var("REPLAY_DEBUG").is_ok() {
        eprintln!("BODY {path} {actual}");
    }
    if let (Some(e), Some(a)) = (expected["prompt_id"].as_str(), actual["prompt_id"].as_str()) {
        ids.insert(e.to_owned(), a.to_owned());
    }
    learn_names(expected, &actual, ids);
    // Prompt ids are also object keys (history): speak the sim's ids.
    let mapped = ids
        .iter()
        .fold(expected.to_string(), |t, (from, to)| t.replace(from, to));
    let mut expected: Value = serde_json::from_str(&mapped).expect("JSON");
    let mut actual = actual;
    if fleet && path.starts_with("/history") {
        for v in [&mut expected, &mut actual] {
            fleet_history(v);
        }
    }
    let expected = &expected;
    if path.starts_with("/extensions") {
        return; // the frontend's file list; the sim serves no frontend
    }
    if exact_json(path) {
        let mut a = actual.clone();
        let mut e = expected.clone();
        for v in [&mut a, &mut e] {
            if let Some(o) = v.as_object_mut()
                && o.contains_key("prompt_id")
            {
                o.insert("prompt_id".into(), json!("<id>"));
                // The tenant's prompt counter counts this replay's prompts, not the
                // recording's (not every recorded scenario is replayed on a fleet).
                if fleet && o.get("number").is_some_and(Value::is_i64) {
                    o.insert("number".into(), json!("<n>"));
                }
            }
            // A traceback is the server's own source lines: the fleet validates in
            // Rust and has none to show.
            if fleet {
                blank_tracebacks(v);
            }
        }
        assert_eq!(a, e, "{what}: body must match the recording exactly");
    } else {
        let (a, e) = (shape(&actual, ""), shape(expected, ""));
        assert!(
            a == e,
            "{what}: body shape differs at {}",
            first_diff(&a, &e, "")
        );
    }
}

/// Temp file names are random per server: learn the sim's name for each recorded one.
fn learn_names(expected: &Value, actual: &Value, ids: &mut HashMap<String, String>) {
    match (expected, actual) {
        (Value::Object(e), Value::Object(a)) => {
            for (k, ev) in e {
                let key = ids.get(k).cloned().unwrap_or_else(|| k.clone());
                let Some(av) = a.get(&key).or_else(|| {
                    if e.len() == 1 && a.len() == 1 {
                        a.values().next()
                    } else {
                        None
                    }
                }) else {
                    continue;
                };
                if k == "filename"
                    && let (Some(en), Some(an)) = (ev.as_str(), av.as_str())
                    && en != an
                {
                    ids.insert(en.to_owned(), an.to_owned());
                }
                learn_names(ev, av, ids);
            }
        }
        (Value::Array(e), Value::Array(a)) => {
            for (ev, av) in e.iter().zip(a) {
                learn_names(ev, av, ids);
            }
        }
        _ => {}
    }
}

/// Whether a recorded frame is an `executed` naming only temp files (PreviewImage's):
/// the fleet keeps a job's saved outputs, not a worker's temp previews, so it
/// announces only nodes that saved something.
fn only_temp_output(line: &Value) -> bool {
    let data = &line["json"]["data"];
    line["json"]["type"] == "executed"
        && data["output"].as_object().is_some_and(|o| {
            o.values()
                .flat_map(|l| l.as_array().into_iter().flatten())
                .all(|i| i["type"] == "temp")
        })
}

/// A history body the way the fleet keeps it: temp files left out (see
/// `only_temp_output`), and `status.messages` without `execution_cached` and with
/// `executed` made uniform (the fleet does not record which nodes a worker's cache
/// served or ran before an error).
fn fleet_history(body: &mut Value) {
    for entry in body
        .as_object_mut()
        .into_iter()
        .flat_map(|o| o.values_mut())
    {
        if let Some(outputs) = entry["outputs"].as_object_mut() {
            for node in outputs.values_mut() {
                for list in node
                    .as_object_mut()
                    .into_iter()
                    .flat_map(|n| n.values_mut())
                {
                    if let Some(items) = list.as_array_mut() {
                        items.retain(|i| i["type"] != "temp");
                    }
                }
                if let Some(n) = node.as_object_mut() {
                    n.retain(|_, l| l.as_array().is_none_or(|a| !a.is_empty()));
                }
            }
            outputs.retain(|_, n| n.as_object().is_none_or(|n| !n.is_empty()));
            let kept: Vec<String> = outputs.keys().cloned().collect();
            if let Some(meta) = entry["meta"].as_object_mut() {
                meta.retain(|k, _| kept.contains(k));
            }
        }
        if let Some(messages) = entry["status"]["messages"].as_array_mut() {
            messages.retain(|m| m[0] != "execution_cached");
            for m in messages.iter_mut() {
                let interrupted = m[0] == "execution_interrupted";
                if let Some(data) = m[1].as_object_mut() {
                    if interrupted {
                        for key in INTERRUPTED_AT {
                            data.insert(key.into(), json!("<worker-side>"));
                        }
                    }
                    for key in WORKER_SIDE {
                        if data.contains_key(key) {
                            data.insert(key.into(), json!("<worker-side>"));
                        }
                    }
                }
            }
        }
    }
}

fn blank_tracebacks(v: &mut Value) {
    match v {
        Value::Object(o) => {
            for (k, x) in o.iter_mut() {
                if k == "traceback" {
                    *x = json!("<traceback>");
                } else {
                    blank_tracebacks(x);
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(blank_tracebacks),
        _ => {}
    }
}

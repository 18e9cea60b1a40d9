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
    let http = reqwest::Client::new();
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
                            .wait_for(expected_before(c, i), &format!("{file} seq {i} ({c})"))
                            .await;
                    }
                }
            }
            match (line["dir"].as_str(), line["kind"].as_str()) {
                (Some("client->server"), Some("ws-open")) => {
                    let path = line["path"].as_str().unwrap_or("/ws");
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
                    compare_frames(file, &conn, &exp, &actual);
                    if let Some(mut sink) = sinks.remove(&conn) {
                        let _ = sink.close().await;
                    }
                }
                (Some("client->server"), Some("http-request")) => {
                    let resp = trace[i + 1..]
                        .iter()
                        .find(|l| l["kind"] == "http-response")
                        .expect("request has a response")
                        .clone();
                    let path = map_ids(line["path"].as_str().unwrap_or("/").to_owned(), &ids);
                    let url = format!("{base}{path}");
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
                    check_response(file, &path, &resp, got, &mut ids).await;
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
                    check_response(file, path, line, got, &mut ids).await;
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
    if let (Some(e), Some(a)) = (expected["prompt_id"].as_str(), actual["prompt_id"].as_str()) {
        ids.insert(e.to_owned(), a.to_owned());
    }
    learn_names(expected, &actual, ids);
    // Prompt ids are also object keys (history): speak the sim's ids.
    let mapped = ids
        .iter()
        .fold(expected.to_string(), |t, (from, to)| t.replace(from, to));
    let expected: &Value = &serde_json::from_str(&mapped).expect("JSON");
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

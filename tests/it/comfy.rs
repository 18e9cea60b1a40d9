//! The ComfyUI-compatible REST surface on the API pods: a ComfyUI client's requests,
//! unchanged, against the fleet.

use std::time::Duration;

use comfyfleet::sim::SimConfig;
use reqwest::multipart::{Form, Part};
use serde_json::{Value, json};

use crate::support::{TestApp, eventually, spawn_app, tiny_png};

/// Fixture 02's graph: EmptyImage → ImageInvert → SaveImage.
fn invert_graph() -> Value {
    json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "fixture_basic"}}
    })
}

/// POSTs a ComfyUI body as `text/plain`, as many ComfyUI clients do.
async fn post_plain(app: &TestApp, key: &str, path: &str, body: &Value) -> reqwest::Response {
    app.http
        .post(app.url(path))
        .header("X-API-Key", key)
        .header("Content-Type", "text/plain;charset=UTF-8")
        .body(body.to_string())
        .send()
        .await
        .unwrap()
}

async fn get_json(app: &TestApp, key: &str, path: &str) -> Value {
    let resp = app
        .http
        .get(app.url(path))
        .header("X-API-Key", key)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "GET {path}");
    resp.json().await.unwrap()
}

#[tokio::test]
async fn a_prompt_runs_on_the_fleet_and_history_and_view_serve_its_image() {
    let app = spawn_app().await;
    let t = app.tenant("acme").await;
    let other = app.tenant("globex").await;
    let _w = app.start_worker(SimConfig::default()).await;

    let resp = post_plain(
        &app,
        &t.admin_key,
        "/prompt",
        &json!({"prompt": invert_graph(), "client_id": "c1"}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let queued: Value = resp.json().await.unwrap();
    let id = queued["prompt_id"].as_str().unwrap().to_string();
    assert!(queued["number"].is_number(), "{queued}");
    assert_eq!(queued["node_errors"], json!({}));

    let done = app.wait_job(&t.admin_key, &id, 30).await;
    assert_eq!(done["status"], "completed", "{done}");

    let history = get_json(&app, &t.admin_key, &format!("/history/{id}")).await;
    let entry = &history[&id];
    assert_eq!(entry["prompt"][1], id.as_str());
    assert_eq!(entry["prompt"][2], invert_graph());
    assert_eq!(entry["prompt"][3]["client_id"], "c1");
    assert_eq!(entry["prompt"][4], json!(["3"]));
    assert_eq!(entry["status"]["status_str"], "success");
    assert_eq!(entry["status"]["completed"], true);
    let image = &entry["outputs"]["3"]["images"][0];
    assert_eq!(image["type"], "output");
    let filename = image["filename"].as_str().unwrap().to_string();
    let subfolder = image["subfolder"].as_str().unwrap().to_string();
    assert!(filename.starts_with("fixture_basic"), "{filename}");
    assert_eq!(entry["meta"]["3"]["node_id"], "3");

    // The same history under /api/, and in the full listing.
    let api_history = get_json(&app, &t.admin_key, &format!("/api/history/{id}")).await;
    assert_eq!(api_history, history);
    let listing = get_json(&app, &t.admin_key, "/api/history?max_items=1").await;
    assert_eq!(listing.as_object().unwrap().len(), 1);
    assert!(listing.get(&id).is_some(), "{listing}");

    // /view returns the PNG; `?api_key=` works as an <img src> would send it.
    let view = format!("/view?filename={filename}&subfolder={subfolder}&type=output");
    let png = app
        .http
        .get(app.url(&format!("{view}&api_key={}", t.admin_key)))
        .send()
        .await
        .unwrap();
    assert_eq!(png.status(), 200);
    assert_eq!(png.headers()["content-type"], "image/png");
    let bytes = png.bytes().await.unwrap();
    let mut reader = png::Decoder::new(std::io::Cursor::new(bytes.to_vec()))
        .read_info()
        .unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!((info.width, info.height), (8, 8));
    assert_eq!(&buf[..3], &[255, 255, 255], "black, inverted");

    // Nothing waits any more.
    let queue = get_json(&app, &t.admin_key, "/api/queue").await;
    assert_eq!(
        queue,
        json!({"queue_running": [], "queue_pending": []}),
        "{queue}"
    );
    let prompt = get_json(&app, &t.admin_key, "/prompt").await;
    assert_eq!(prompt, json!({"exec_info": {"queue_remaining": 0}}));

    // ComfyUI's 404/400 cases of /view.
    for (path, status) in [
        ("/view?filename=nope.png&type=output", 404),
        ("/view?filename=../x.png&type=output", 400),
        ("/view", 404),
    ] {
        let resp = app
            .http
            .get(app.url(path))
            .header("X-API-Key", &t.admin_key)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), status, "{path}");
    }

    // The fleet's catalogue, from the worker's ComfyUI.
    let info = get_json(&app, &t.admin_key, "/object_info/EmptyImage").await;
    assert_eq!(info["EmptyImage"]["name"], "EmptyImage");
    assert!(info["EmptyImage"]["input"]["required"]["width"].is_array());
    let none = get_json(&app, &t.admin_key, "/api/object_info/NoSuchNode").await;
    assert_eq!(none, json!({}));
    let all = get_json(&app, &t.admin_key, "/object_info").await;
    assert!(all.get("KSampler").is_some());
    let stats = get_json(&app, &t.admin_key, "/system_stats").await;
    assert!(stats["system"]["comfyui_version"].is_string(), "{stats}");
    let features = get_json(&app, &t.admin_key, "/api/features").await;
    assert_eq!(features["supports_preview_metadata"], true);

    // Another tenant sees none of it.
    let theirs = get_json(&app, &other.admin_key, "/history").await;
    assert_eq!(theirs, json!({}));
    let theirs = get_json(&app, &other.admin_key, &format!("/history/{id}")).await;
    assert_eq!(theirs, json!({}));
    let theirs = get_json(&app, &other.admin_key, "/queue").await;
    assert_eq!(theirs, json!({"queue_running": [], "queue_pending": []}));
    let resp = app
        .http
        .get(app.url(&view))
        .header("X-API-Key", &other.admin_key)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404, "another tenant's file");
}

#[tokio::test]
async fn bad_bodies_get_comfyui_answers_and_missing_credentials_a_401() {
    let app = spawn_app().await;
    let t = app.tenant("acme").await;

    let resp = app
        .http
        .post(app.url("/prompt"))
        .header("X-API-Key", &t.admin_key)
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 500);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );

    let resp = post_plain(
        &app,
        &t.admin_key,
        "/api/prompt",
        &json!({"client_id": "x"}),
    )
    .await;
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["type"], "no_prompt");
    assert_eq!(body["node_errors"], json!({}));

    let resp = post_plain(
        &app,
        &t.admin_key,
        "/prompt",
        &json!({"prompt": invert_graph(), "prompt_id": "not-a-uuid"}),
    )
    .await;
    assert_eq!(resp.status(), 400);

    // A client-chosen prompt_id is taken once per tenant.
    let chosen = uuid::Uuid::new_v4().to_string();
    let body = json!({"prompt": invert_graph(), "prompt_id": chosen});
    let first = post_plain(&app, &t.admin_key, "/prompt", &body).await;
    assert_eq!(first.status(), 200);
    let again = post_plain(&app, &t.admin_key, "/prompt", &body).await;
    assert_eq!(again.status(), 400);
    let again: Value = again.json().await.unwrap();
    assert_eq!(again["error"]["type"], "invalid_prompt", "{again}");

    // Without a worker, the structural checks still answer in ComfyUI's shape.
    let resp = post_plain(
        &app,
        &t.admin_key,
        "/prompt",
        &json!({"prompt": {"1": {"inputs": {}}}}),
    )
    .await;
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["type"], "invalid_prompt", "{body}");

    for path in [
        "/prompt",
        "/api/queue",
        "/history",
        "/object_info",
        "/view",
        "/ws",
    ] {
        let resp = app.http.get(app.url(path)).send().await.unwrap();
        crate::support::expect_problem(resp, 401).await;
    }
    let resp = app
        .http
        .post(app.url("/prompt"))
        .body(json!({"prompt": invert_graph()}).to_string())
        .send()
        .await
        .unwrap();
    crate::support::expect_problem(resp, 401).await;
}

#[tokio::test]
async fn queue_delete_cancels_a_waiting_prompt_and_interrupt_a_running_one() {
    let app = spawn_app().await;
    let t = app.tenant("acme").await;
    let _w = app
        .start_worker(SimConfig {
            step_time: Duration::from_millis(100),
            ..SimConfig::default()
        })
        .await;
    let built: Value = app
        .http
        .post(app.url("/api/run/sdxl-txt2img/build?format=api"))
        .header("X-API-Key", &t.admin_key)
        .multipart(Form::new().text("params", r#"{"steps": 150, "width": 512, "height": 512}"#))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let submit = |graph: Value| {
        let app = &app;
        let key = t.admin_key.clone();
        async move {
            let resp = post_plain(app, &key, "/prompt", &json!({"prompt": graph})).await;
            assert_eq!(resp.status(), 200);
            let body: Value = resp.json().await.unwrap();
            body["prompt_id"].as_str().unwrap().to_string()
        }
    };
    let running = submit(built.clone()).await;
    eventually(20, || async {
        (app.job(&t.admin_key, &running).await["status"] == "running").then_some(())
    })
    .await;
    let waiting = submit(built).await;

    let queue = get_json(&app, &t.admin_key, "/queue").await;
    assert_eq!(queue["queue_running"][0][1], running.as_str(), "{queue}");
    assert_eq!(queue["queue_pending"][0][1], waiting.as_str(), "{queue}");
    assert_eq!(queue["queue_pending"][0][4], json!(["7"]), "{queue}");
    let prompt = get_json(&app, &t.admin_key, "/prompt").await;
    assert_eq!(prompt["exec_info"]["queue_remaining"], 2);

    // delete touches only waiting prompts: the running one keeps running.
    let resp = post_plain(
        &app,
        &t.admin_key,
        "/queue",
        &json!({"delete": [waiting, running]}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(app.job(&t.admin_key, &waiting).await["status"], "cancelled");
    assert_eq!(app.job(&t.admin_key, &running).await["status"], "running");

    // A targeted interrupt of a prompt that is not running does nothing.
    let resp = post_plain(
        &app,
        &t.admin_key,
        "/interrupt",
        &json!({"prompt_id": waiting}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(app.job(&t.admin_key, &running).await["status"], "running");

    // A bodyless interrupt stops what runs.
    let resp = app
        .http
        .post(app.url("/api/interrupt"))
        .header("X-API-Key", &t.admin_key)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let done = app.wait_job(&t.admin_key, &running, 30).await;
    assert_eq!(done["status"], "cancelled", "{done}");
    let history = get_json(&app, &t.admin_key, &format!("/history/{running}")).await;
    assert_eq!(history[&running]["status"]["status_str"], "error");
    // The deleted prompt never ran, so it has no history.
    let history = get_json(&app, &t.admin_key, &format!("/history/{waiting}")).await;
    assert_eq!(history, json!({}));
}

#[tokio::test]
async fn uploads_keep_the_clients_name_and_are_viewable_as_inputs() {
    let app = spawn_app().await;
    let t = app.tenant("acme").await;
    let other = app.tenant("globex").await;
    let upload = |bytes: Vec<u8>, overwrite: bool| {
        let app = &app;
        let key = t.admin_key.clone();
        async move {
            let mut form = Form::new().part(
                "image",
                Part::bytes(bytes)
                    .file_name("fixture upload.png")
                    .mime_str("image/png")
                    .unwrap(),
            );
            if overwrite {
                form = form.text("overwrite", "true");
            }
            let resp = app
                .http
                .post(app.url("/upload/image"))
                .header("X-API-Key", key)
                .multipart(form)
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 200);
            resp.json::<Value>().await.unwrap()
        }
    };
    let png = tiny_png();
    let first = upload(png.clone(), false).await;
    assert_eq!(
        first,
        json!({"name": "fixture upload.png", "subfolder": "", "type": "input"})
    );
    // The same bytes again: the same name.
    assert_eq!(upload(png.clone(), false).await, first);
    // Different bytes: ComfyUI's `name (1).ext`.
    let mut different = png.clone();
    different.extend_from_slice(b"trailer");
    let second = upload(different.clone(), false).await;
    assert_eq!(second["name"], "fixture upload (1).png");
    // overwrite keeps the name.
    assert_eq!(upload(different.clone(), true).await, first);

    let resp = app
        .http
        .get(app.url("/api/view?filename=fixture%20upload.png&type=input&subfolder="))
        .header("X-API-Key", &t.admin_key)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.bytes().await.unwrap().to_vec(), different);
    let resp = app
        .http
        .get(app.url("/view?filename=fixture%20upload.png&type=input"))
        .header("X-API-Key", &other.admin_key)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404, "another tenant's input");

    // No image field: 400 with an empty body, as ComfyUI answers.
    let resp = app
        .http
        .post(app.url("/upload/image"))
        .header("X-API-Key", &t.admin_key)
        .multipart(Form::new().text("subfolder", "x"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
}

#[tokio::test]
async fn invalid_prompts_are_refused_at_the_door_with_comfyuis_body() {
    let app = spawn_app().await;
    let t = app.tenant("acme").await;
    let _w = app.start_worker(SimConfig::default()).await;
    // The worker has registered its catalogue once a class is served.
    eventually(20, || async {
        let info = get_json(&app, &t.admin_key, "/object_info/EmptyImage").await;
        info.get("EmptyImage").map(|_| ())
    })
    .await;

    let mut unknown = invert_graph();
    unknown["1"]["class_type"] = json!("NoSuchNode");
    let mut missing = invert_graph();
    missing["1"]["inputs"]
        .as_object_mut()
        .unwrap()
        .remove("width");
    let mut too_small = invert_graph();
    too_small["1"]["inputs"]["width"] = json!(0);
    let mut bad_link = invert_graph();
    bad_link["2"]["inputs"]["image"] = json!(["99", 0]);
    let cases = [
        (unknown, "invalid_prompt", None),
        (
            missing,
            "prompt_outputs_failed_validation",
            Some(("1", "required_input_missing")),
        ),
        (
            too_small,
            "prompt_outputs_failed_validation",
            Some(("1", "value_smaller_than_min")),
        ),
        (
            bad_link,
            "prompt_outputs_failed_validation",
            Some(("2", "")),
        ),
    ];
    for (graph, top, node) in cases {
        let resp = post_plain(&app, &t.admin_key, "/prompt", &json!({"prompt": graph})).await;
        assert_eq!(resp.status(), 400);
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["error"]["type"], top, "{body}");
        match node {
            None => assert_eq!(body["node_errors"], json!({}), "{body}"),
            Some((id, kind)) => {
                let errors = &body["node_errors"][id];
                assert_eq!(errors["dependent_outputs"], json!(["3"]), "{body}");
                if !kind.is_empty() {
                    assert_eq!(errors["errors"][0]["type"], kind, "{body}");
                }
            }
        }
    }
    // The missing-input body is ComfyUI's, field for field (fixture 05).
    let mut missing = invert_graph();
    missing["1"]["inputs"]
        .as_object_mut()
        .unwrap()
        .remove("width");
    let resp = post_plain(
        &app,
        &t.admin_key,
        "/api/prompt",
        &json!({"prompt": missing}),
    )
    .await;
    let body: Value = resp.json().await.unwrap();
    assert_eq!(
        body,
        json!({"error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation", "details": "", "extra_info": {}},
               "node_errors": {"1": {"errors": [{"type": "required_input_missing", "message": "Required input is missing", "details": "width", "extra_info": {"input_name": "width"}}],
                                     "dependent_outputs": ["3"], "class_type": "EmptyImage"}}})
    );

    // Nothing was queued.
    let prompt = get_json(&app, &t.admin_key, "/prompt").await;
    assert_eq!(prompt["exec_info"]["queue_remaining"], 0);
    let jobs = get_json(&app, &t.admin_key, "/developer/api/v1/jobs").await;
    assert_eq!(jobs["jobs"].as_array().map(Vec::len), Some(0), "{jobs}");

    // Partly valid: ComfyUI runs the valid output and reports the other with a 200.
    let mut partial = invert_graph();
    partial["4"] = json!({"class_type": "EmptyImage", "inputs": {"width": 0, "height": 8, "batch_size": 1, "color": 0}});
    partial["5"] = json!({"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "broken"}});
    let resp = post_plain(&app, &t.admin_key, "/prompt", &json!({"prompt": partial})).await;
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(
        body["node_errors"]["4"]["errors"][0]["type"], "value_smaller_than_min",
        "{body}"
    );
    assert_eq!(body["node_errors"]["4"]["dependent_outputs"], json!(["5"]));
    let id = body["prompt_id"].as_str().unwrap();
    let done = app.wait_job(&t.admin_key, id, 30).await;
    assert_eq!(done["status"], "completed", "{done}");
}

/// The next text message of a ComfyUI socket, as JSON.
async fn next_text(
    ws: &mut tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
) -> Value {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(30), ws.next())
            .await
            .expect("a message in time")
            .expect("socket open")
            .expect("no socket error");
        if let Message::Text(t) = msg {
            return serde_json::from_str(t.as_str()).unwrap();
        }
    }
}

#[tokio::test]
async fn the_socket_tells_a_client_about_its_prompt() {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;

    let app = spawn_app().await;
    let t = app.tenant("acme").await;
    let _w = app.start_worker(SimConfig::default()).await;
    let url = format!(
        "{}/ws?clientId=c-1&api_key={}",
        app.base.replacen("http://", "ws://", 1),
        t.admin_key
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    // Another client of the tenant, and the same client id in another tenant.
    let other = app.tenant("globex").await;
    let connect = |client: &str, key: &str| {
        let url = format!(
            "{}/api/ws?clientId={client}&api_key={key}",
            app.base.replacen("http://", "ws://", 1)
        );
        async move { tokio_tungstenite::connect_async(url).await.unwrap().0 }
    };
    let mut ws_c2 = connect("c-2", &t.admin_key).await;
    let mut ws_b = connect("c-1", &other.admin_key).await;
    for ws in [&mut ws_c2, &mut ws_b] {
        assert_eq!(next_text(ws).await["type"], "status");
    }
    let hello = next_text(&mut ws).await;
    assert_eq!(hello["type"], "status");
    assert_eq!(hello["data"]["sid"], "c-1");
    ws.send(Message::text(
        json!({"type": "feature_flags", "data": {"supports_preview_metadata": true}}).to_string(),
    ))
    .await
    .unwrap();
    let flags = next_text(&mut ws).await;
    assert_eq!(flags["type"], "feature_flags");

    let resp = post_plain(
        &app,
        &t.admin_key,
        "/prompt",
        &json!({"prompt": invert_graph(), "client_id": "c-1"}),
    )
    .await;
    let body: Value = resp.json().await.unwrap();
    let id = body["prompt_id"].as_str().unwrap().to_string();
    let mut types = Vec::new();
    let mut statuses = Vec::new();
    loop {
        let m = next_text(&mut ws).await;
        if m["type"] == "status" {
            // The tenant's queue changed: broadcast, without a prompt id.
            statuses.push(m["data"]["status"]["exec_info"]["queue_remaining"].clone());
            continue;
        }
        assert_eq!(m["data"]["prompt_id"], id.as_str(), "{m}");
        types.push(m["type"].as_str().unwrap().to_string());
        if m["type"] == "executed" {
            assert_eq!(m["data"]["node"], "3");
            assert_eq!(m["data"]["output"]["images"][0]["type"], "output");
        }
        if m["type"] == "executing" {
            if m["data"]["node"].is_null() {
                types.pop();
                types.push("executing null".into());
                break;
            }
            // Per-node `executing` is relayed from the worker's ComfyUI while it runs.
            assert!(!types.iter().any(|t| t == "execution_success"), "{m}");
            types.pop();
        }
        if ["progress", "progress_state", "execution_cached"].contains(&m["type"].as_str().unwrap())
        {
            types.pop();
        }
    }
    // Queued (1), then done (0) before the end marker.
    assert_eq!(statuses, [json!(1), json!(0)]);
    assert_eq!(
        types,
        [
            "execution_start",
            "executed",
            "execution_success",
            "executing null"
        ]
    );

    // Neither the other client nor the other tenant heard of that prompt: the first
    // thing each socket gets is about its own next prompt.
    for (ws, key, client) in [
        (&mut ws_c2, &t.admin_key, "c-2"),
        (&mut ws_b, &other.admin_key, "c-1"),
    ] {
        let resp = post_plain(
            &app,
            key,
            "/prompt",
            &json!({"prompt": invert_graph(), "client_id": client}),
        )
        .await;
        let body: Value = resp.json().await.unwrap();
        let mut first = next_text(ws).await;
        while first["type"] == "status" {
            first = next_text(ws).await;
        }
        assert_eq!(first["type"], "execution_start", "{first}");
        assert_eq!(first["data"]["prompt_id"], body["prompt_id"], "{first}");
    }
}

#[tokio::test]
async fn the_socket_reports_sampler_progress() {
    let app = spawn_app().await;
    let t = app.tenant("acme").await;
    let _w = app
        .start_worker(SimConfig {
            step_time: Duration::from_millis(100),
            ..SimConfig::default()
        })
        .await;
    let built: Value = app
        .http
        .post(app.url("/api/run/sdxl-txt2img/build?format=api"))
        .header("X-API-Key", &t.admin_key)
        .multipart(Form::new().text("params", r#"{"steps": 6, "width": 512, "height": 512}"#))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let url = format!(
        "{}/ws?clientId=p-1&api_key={}",
        app.base.replacen("http://", "ws://", 1),
        t.admin_key
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    assert_eq!(next_text(&mut ws).await["type"], "status");
    let resp = post_plain(
        &app,
        &t.admin_key,
        "/prompt",
        &json!({"prompt": built, "client_id": "p-1"}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let mut sampler_running = false;
    let mut steps = Vec::new();
    loop {
        let m = next_text(&mut ws).await;
        match m["type"].as_str() {
            Some("executing") if m["data"]["node"].is_null() => break,
            Some("executing") => sampler_running = m["data"]["node"] == "5",
            Some("progress") => {
                assert!(
                    sampler_running,
                    "progress follows the node's executing: {m}"
                );
                assert_eq!(m["data"]["node"], "5");
                assert_eq!(m["data"]["max"], 6);
                steps.push(m["data"]["value"].as_u64().unwrap());
            }
            _ => {}
        }
    }
    assert!(!steps.is_empty(), "some progress was told");
    assert!(steps.windows(2).all(|w| w[0] < w[1]), "{steps:?}");
}

// ---- the recorded traces, replayed against an API pod ---------------------------

/// Server A of the recordings behind one worker (see the sim conformance tests).
fn recorded_server_a() -> SimConfig {
    SimConfig {
        previews: false,
        step_time: Duration::from_millis(150),
        node_time: Duration::from_millis(60),
        models: vec![comfyfleet::sim::ModelFile::new(
            "checkpoints",
            "random_sd15_fixture.safetensors",
        )],
        seed: Some(1),
        ..SimConfig::default()
    }
}

#[tokio::test]
async fn fleet_conformance_prompt_lifecycles() {
    let app = spawn_app().await;
    let t = app.tenant("acme").await;
    let _w = app.start_worker(recorded_server_a()).await;
    crate::sim_replay::replay_fleet(
        &app.base,
        &t.admin_key,
        &[
            "01-ws-handshake-feature-flags.jsonl",
            "02-prompt-emptyimage-invert-save.jsonl",
        ],
    )
    .await;
}

/// Not replayed on a fleet: 03 (uploads into subfolders: the fleet keeps a tenant's
/// uploads flat, see src/http/comfy.rs), 07 (interrupting a running prompt while others
/// queue: the fleet's frames around the interruption differ — an open gap), 10
/// (`/system_stats` and friends
/// describe one machine), 13 (interrupt mid-node, like 07). 04 expects the cache 03
/// left, so it starts afresh.
#[tokio::test]
async fn fleet_conformance_cache_and_errors() {
    let app = spawn_app().await;
    let t = app.tenant("acme").await;
    let _w = app.start_worker(recorded_server_a()).await;
    crate::sim_replay::replay_fleet(
        &app.base,
        &t.admin_key,
        &[
            "04-cached-resubmit.jsonl",
            "05-validation-errors.jsonl",
            "06-runtime-execution-error.jsonl",
            "08-reconnect-during-execution.jsonl",
            "09-binary-saveimagewebsocket.jsonl",
            "11-ksampler-no-previews.jsonl",
        ],
    )
    .await;
}

#[tokio::test]
async fn fleet_conformance_sampler_previews() {
    let app = spawn_app().await;
    let t = app.tenant("acme").await;
    let _w = app
        .start_worker(SimConfig {
            previews: true,
            preview_size: 64,
            ..recorded_server_a()
        })
        .await;
    crate::sim_replay::replay_fleet(
        &app.base,
        &t.admin_key,
        &[
            "12-ksampler-latent2rgb-previews.jsonl",
            "14-reconnect-without-flags-switches-preview-format.jsonl",
        ],
    )
    .await;
}

/// A published ComfyUI client library (comfy-api-simplified, PyPI), unmodified, runs
/// a workflow through the fleet with only the URL and the key changed: it queues over
/// HTTP, waits on the WebSocket (taking the binary previews), and downloads outputs.
#[tokio::test]
async fn a_published_client_library_runs_on_the_fleet() {
    let app = spawn_app().await;
    let t = app.tenant("acme").await;
    let _w = app
        .start_worker(SimConfig {
            step_time: Duration::from_millis(100),
            preview_size: 64,
            ..SimConfig::default()
        })
        .await;
    crate::sim::drive_comfy_api_simplified(&app.base, Some(&t.admin_key)).await;
}

/// Reconnecting with the same clientId on another pod closes the old socket (4009)
/// and tells the new one the node the client's prompt is on, as ComfyUI does for a
/// reconnect; the prompt's messages then follow the new socket. Another tenant's
/// socket with the same clientId is not touched.
#[tokio::test]
async fn a_client_id_reconnecting_on_another_pod_takes_over() {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;

    let app = spawn_app().await;
    let peer = app.spawn_peer().await;
    let t = app.tenant("acme").await;
    let other = app.tenant("globex").await;
    let _w = app
        .start_worker(SimConfig {
            step_time: Duration::from_millis(150),
            ..SimConfig::default()
        })
        .await;
    let ws_url = |base: &str, key: &str| {
        format!(
            "{}/ws?clientId=same&api_key={key}",
            base.replacen("http://", "ws://", 1)
        )
    };
    let (mut old, _) = tokio_tungstenite::connect_async(ws_url(&app.base, &t.admin_key))
        .await
        .unwrap();
    let (mut bystander, _) = tokio_tungstenite::connect_async(ws_url(&peer.base, &other.admin_key))
        .await
        .unwrap();
    assert_eq!(next_text(&mut old).await["data"]["sid"], "same");
    assert_eq!(next_text(&mut bystander).await["data"]["sid"], "same");

    let built: Value = app
        .http
        .post(app.url("/api/run/sdxl-txt2img/build?format=api"))
        .header("X-API-Key", &t.admin_key)
        .multipart(Form::new().text("params", r#"{"steps": 24, "width": 512, "height": 512}"#))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let resp = post_plain(
        &app,
        &t.admin_key,
        "/prompt",
        &json!({"prompt": built, "client_id": "same"}),
    )
    .await;
    let id = resp.json::<Value>().await.unwrap()["prompt_id"]
        .as_str()
        .unwrap()
        .to_owned();
    // Wait until the sampler is running and the fleet's snapshot says so.
    loop {
        let m = next_text(&mut old).await;
        if m["type"] == "progress" && m["data"]["value"].as_u64() >= Some(2) {
            break;
        }
    }

    let (mut new, _) = tokio_tungstenite::connect_async(ws_url(&peer.base, &t.admin_key))
        .await
        .unwrap();
    let hello = next_text(&mut new).await;
    assert_eq!(hello["data"]["sid"], "same");
    let resent = next_text(&mut new).await;
    assert_eq!(
        resent,
        json!({"type": "executing", "data": {"node": "5"}}),
        "the reconnect is told the current node, bare, like ComfyUI"
    );

    // The old socket is closed with the takeover code.
    let closed = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match old.next().await {
                Some(Ok(Message::Close(frame))) => return frame.map(|f| u16::from(f.code)),
                Some(Ok(_)) => continue,
                _ => return None,
            }
        }
    })
    .await
    .expect("the old socket is closed in time");
    assert_eq!(closed, Some(4009));

    // The prompt's messages follow the new socket to the end.
    let mut progressed = false;
    loop {
        let m = next_text(&mut new).await;
        if m["type"] == "progress" {
            assert_eq!(m["data"]["prompt_id"], id.as_str());
            progressed = true;
        }
        if m["type"] == "executing" && m["data"]["node"].is_null() {
            assert_eq!(m["data"]["prompt_id"], id.as_str());
            break;
        }
    }
    assert!(progressed, "progress continued on the new socket");

    // The other tenant's "same" socket is still open and heard nothing of it.
    let resp = post_plain(
        &app,
        &other.admin_key,
        "/prompt",
        &json!({"prompt": invert_graph(), "client_id": "same"}),
    )
    .await;
    let theirs = resp.json::<Value>().await.unwrap()["prompt_id"].clone();
    loop {
        let m = next_text(&mut bystander).await;
        assert_ne!(m["data"]["prompt_id"], id.as_str(), "{m}");
        if m["type"] == "execution_start" {
            assert_eq!(m["data"]["prompt_id"], theirs);
            break;
        }
    }
}

/// `number` counts each tenant's prompts from 0 like a ComfyUI process (negated for
/// `front`), and a client-chosen `prompt_id` is the prompt's id everywhere.
#[tokio::test]
async fn prompt_numbers_and_chosen_ids_are_comfyuis() {
    let app = spawn_app().await;
    let t = app.tenant("acme").await;
    let other = app.tenant("globex").await;
    let post = |key: String, body: Value| {
        let app = &app;
        async move {
            let resp = post_plain(app, &key, "/prompt", &body).await;
            (resp.status().as_u16(), resp.json::<Value>().await.unwrap())
        }
    };
    let (_, first) = post(t.admin_key.clone(), json!({"prompt": invert_graph()})).await;
    let (_, second) = post(t.admin_key.clone(), json!({"prompt": invert_graph()})).await;
    let (_, front) = post(
        t.admin_key.clone(),
        json!({"prompt": invert_graph(), "front": true}),
    )
    .await;
    let (_, theirs) = post(other.admin_key.clone(), json!({"prompt": invert_graph()})).await;
    assert_eq!(
        [
            &first["number"],
            &second["number"],
            &front["number"],
            &theirs["number"]
        ],
        [&json!(0), &json!(1), &json!(-2), &json!(0)]
    );

    let chosen = "5b3c0a57-27a4-4c53-9a43-4d2c1c1f8f0e";
    let (status, reply) = post(
        t.admin_key.clone(),
        json!({"prompt": invert_graph(), "prompt_id": chosen}),
    )
    .await;
    assert_eq!((status, reply["prompt_id"].as_str()), (200, Some(chosen)));
    let queue: Value = app
        .http
        .get(app.url("/queue"))
        .header("X-API-Key", &t.admin_key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        queue["queue_pending"]
            .as_array()
            .unwrap()
            .iter()
            .any(|item| item[1] == chosen),
        "{queue}"
    );
    // Taken, by this tenant or any other: ComfyUI's answer to a reused id.
    for key in [&t.admin_key, &other.admin_key] {
        let (status, reply) = post(
            key.clone(),
            json!({"prompt": invert_graph(), "prompt_id": chosen}),
        )
        .await;
        assert_eq!(status, 400, "{reply}");
        assert_eq!(reply["error"]["message"], "prompt_id already exists");
    }
    // The other tenant still cannot see it.
    let resp = app
        .http
        .get(app.url(&format!("/history/{chosen}")))
        .header("X-API-Key", &other.admin_key)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.json::<Value>().await.unwrap(), json!({}));
}

/// The flow of ComfyUI's own example client (tests/clients/example_flow_client.py:
/// HTTP `/prompt`, wait on `/ws` for the end marker, `/history` + `/view`) against the
/// fleet, with the URL and an X-API-Key header as the only changes.
#[tokio::test]
async fn the_example_client_flow_runs_on_the_fleet() {
    let app = spawn_app().await;
    let t = app.tenant("acme").await;
    let _w = app.start_worker(SimConfig::default()).await;
    let out = tempfile::tempdir().expect("tempdir");
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let run = tokio::process::Command::new(crate::sim::client_python())
        .arg(root.join("tests/clients/example_flow_client.py"))
        .arg(app.base.trim_start_matches("http://"))
        .arg(&t.admin_key)
        .arg(out.path())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("client finished in time")
        .expect("python runs");
    assert!(
        output.status.success(),
        "client failed (run scripts/test to install websocket-client):\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let summary: Value = serde_json::from_slice(&output.stdout).expect("summary JSON");
    let seen: Vec<&str> = summary["seen"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(seen.first(), Some(&"status"), "{seen:?}");
    assert!(
        seen.contains(&"execution_start") && seen.contains(&"executed"),
        "{seen:?}"
    );
    let saved = summary["saved"].as_array().expect("saved");
    assert_eq!(saved.len(), 1, "{summary}");
    let png = image::open(saved[0].as_str().unwrap()).expect("the downloaded image decodes");
    assert_eq!((png.width(), png.height()), (40, 24));
    assert_eq!(
        png.to_rgb8().get_pixel(0, 0).0,
        [255, 255, 0],
        "inverted blue"
    );
}

/// `/object_info` is rendered once per set of fresh workers: the empty catalogue of a
/// fleet without workers is not served once a worker joins.
#[tokio::test]
async fn object_info_follows_the_fleet_as_workers_join() {
    let app = spawn_app().await;
    let t = app.tenant("acme").await;
    assert_eq!(
        get_json(&app, &t.admin_key, "/object_info").await,
        json!({})
    );
    let _w = app.start_worker(SimConfig::default()).await;
    let all = eventually(20, || async {
        let all = get_json(&app, &t.admin_key, "/object_info").await;
        all.get("KSampler").is_some().then_some(all)
    })
    .await;
    // Served again from the pod's rendering, unchanged.
    assert_eq!(get_json(&app, &t.admin_key, "/api/object_info").await, all);
}

//! Uploads, inputs (multipart and URL), signed links, `/api/comfyui/view`, and the
//! results of a completed job.

use std::sync::Arc;

use comfyfleet::files::{
    AddressPolicy, FetchLimits, ObjectKey, SafeFilename, SafeSubfolder, UrlFetcher,
};
use comfyfleet::store::claims::{Capabilities, NewOutput};
use poem::{EndpointExt, Route};
use reqwest::multipart::{Form, Part};
use serde_json::{Value, json};

use crate::support::{
    TestApp, TestTenant, eventually, expect_problem, spawn_app, spawn_app_with, tiny_png,
};

fn png_part(name: &str) -> Part {
    Part::bytes(tiny_png())
        .file_name(name.to_string())
        .mime_str("image/png")
        .unwrap()
}

async fn upload(app: &TestApp, t: &TestTenant, part: Part) -> reqwest::Response {
    app.http
        .post(app.url("/api/run/upload-image"))
        .header("X-API-Key", &t.admin_key)
        .multipart(Form::new().part("file", part))
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn uploaded_images_get_unique_names_and_are_viewable_by_their_tenant_only() {
    let app = spawn_app().await;
    let a = app.tenant("tenant-a").await;
    let b = app.tenant("tenant-b").await;
    let resp = upload(&app, &a, png_part("my image.png")).await;
    assert_eq!(resp.status(), 200);
    let name = resp.json::<Value>().await.unwrap()["filename"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(name.ends_with("_my_image.png") && name.len() > 24, "{name}");
    let again = upload(&app, &a, png_part("my image.png"))
        .await
        .json::<Value>()
        .await
        .unwrap();
    assert_ne!(
        again["filename"].as_str().unwrap(),
        name,
        "names never collide"
    );

    let view = app
        .http
        .get(app.url(&format!("/api/comfyui/view?filename={name}&type=input")))
        .header("X-API-Key", &a.admin_key)
        .send()
        .await
        .unwrap();
    assert_eq!(view.status(), 200);
    assert_eq!(view.headers()["content-type"], "image/png");
    assert_eq!(view.bytes().await.unwrap().as_ref(), tiny_png().as_slice());

    let other = app
        .http
        .get(app.url(&format!("/api/comfyui/view?filename={name}&type=input")))
        .header("X-API-Key", &b.admin_key)
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 404);
}

#[tokio::test]
async fn non_images_oversized_files_and_traversal_are_refused() {
    let app = spawn_app_with(|args| args.max_upload_bytes = Some("2048".into()), |_| {}).await;
    let t = app.tenant("acme").await;
    let text = upload(
        &app,
        &t,
        Part::bytes(b"hello, not an image".to_vec()).file_name("x.png"),
    )
    .await;
    assert_eq!(text.status(), 400);
    assert!(
        text.json::<Value>().await.unwrap()["detail"]
            .as_str()
            .unwrap()
            .contains("not a PNG")
    );
    let mut big = tiny_png();
    big.extend(std::iter::repeat_n(0u8, 4096));
    let too_big = upload(&app, &t, Part::bytes(big).file_name("big.png")).await;
    assert_eq!(too_big.status(), 413);
    for query in [
        "filename=../../etc/passwd&type=input",
        "filename=x.png&type=output&subfolder=../../x",
        "filename=%2Fetc%2Fpasswd&type=input",
        "filename=a%00b.png&type=input",
    ] {
        let resp = app
            .http
            .get(app.url(&format!("/api/comfyui/view?{query}")))
            .header("X-API-Key", &t.admin_key)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400, "{query}");
    }
    // Nothing was stored by the refused uploads.
    let inputs: Value = app
        .http
        .get(app.url("/developer/api/v1/inputs"))
        .header("X-API-Key", &t.admin_key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(inputs, json!([]));
}

#[tokio::test]
async fn execute_takes_an_uploaded_or_an_existing_image() {
    let app = spawn_app().await;
    let t = app.tenant("acme").await;
    let direct = app
        .http
        .post(app.url("/api/run/invert-image/execute"))
        .header("X-API-Key", &t.admin_key)
        .multipart(
            Form::new()
                .text("params", "{}")
                .part("input_image", png_part("cat.png")),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(direct.status(), 200);
    let name = upload(&app, &t, png_part("dog.png"))
        .await
        .json::<Value>()
        .await
        .unwrap()["filename"]
        .as_str()
        .unwrap()
        .to_string();
    let existing = app
        .http
        .post(app.url("/api/run/invert-image/execute"))
        .header("X-API-Key", &t.admin_key)
        .multipart(Form::new().text("params", json!({"_existing_input_image": name}).to_string()))
        .send()
        .await
        .unwrap();
    assert_eq!(existing.status(), 200);
    let run: Value = existing.json().await.unwrap();
    let job: Value = app
        .http
        .get(app.url(&format!(
            "/developer/api/v1/jobs/{}",
            run["prompt_id"].as_str().unwrap()
        )))
        .header("X-API-Key", &t.admin_key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(job["status"], "queued");

    // Another tenant's upload name does not resolve.
    let other = app.tenant("other").await;
    let foreign = app
        .http
        .post(app.url("/api/run/invert-image/execute"))
        .header("X-API-Key", &other.admin_key)
        .multipart(Form::new().text("params", json!({"_existing_input_image": name}).to_string()))
        .send()
        .await
        .unwrap();
    assert_eq!(foreign.status(), 400);
    assert!(foreign.text().await.unwrap().contains(&name));
}

#[tokio::test]
async fn multipart_inputs_are_ready_with_a_signed_link_that_refuses_tampering() {
    let app = spawn_app().await;
    let t = app.tenant("acme").await;
    let resp = app
        .http
        .post(app.url("/developer/api/v1/inputs"))
        .header("X-API-Key", &t.admin_key)
        .multipart(Form::new().part("file", png_part("in.png")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let input: Value = resp.json().await.unwrap();
    assert_eq!(input["status"], "ready");
    assert_eq!(input["content_type"], "image/png");
    let link = input["download_url"].as_str().unwrap().to_string();
    // No credentials needed.
    let got = reqwest::get(&link).await.unwrap();
    assert_eq!(got.status(), 200);
    assert_eq!(got.bytes().await.unwrap().as_ref(), tiny_png().as_slice());
    let tampered_sig = format!("{}A", link);
    expect_problem(reqwest::get(&tampered_sig).await.unwrap(), 403).await;
    let other_tenant_path = link.replace(&t.id.to_string(), &uuid::Uuid::new_v4().to_string());
    expect_problem(reqwest::get(&other_tenant_path).await.unwrap(), 403).await;
    // An expired link: signed two hours ago with the same key.
    let key = ObjectKey::input(
        t.id,
        &SafeFilename::parse(input["filename"].as_str().unwrap()).unwrap(),
    );
    let path = format!("/files/{}", key.to_url_path());
    let old = app
        .state
        .links
        .sign(&path, chrono::Utc::now() - chrono::Duration::hours(2));
    let expired = reqwest::get(app.url(&old)).await.unwrap();
    let body = expect_problem(expired, 403).await;
    assert!(
        body["detail"].as_str().unwrap().contains("expired"),
        "{body}"
    );

    let got = app
        .http
        .get(app.url(&format!(
            "/developer/api/v1/inputs/{}",
            input["id"].as_str().unwrap()
        )))
        .header("X-API-Key", &t.admin_key)
        .send()
        .await
        .unwrap();
    assert_eq!(got.status(), 200);
    let other = app.tenant("other").await;
    let hidden = app
        .http
        .get(app.url(&format!(
            "/developer/api/v1/inputs/{}",
            input["id"].as_str().unwrap()
        )))
        .header("X-API-Key", &other.admin_key)
        .send()
        .await
        .unwrap();
    expect_problem(hidden, 404).await;
}

#[tokio::test]
async fn url_inputs_to_loopback_fail_and_public_ones_land() {
    // A local server plays "the internet"; the fetcher is told to allow exactly it.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let origin = listener.local_addr().unwrap();
    let png = tiny_png();
    let route = Route::new().at(
        "/pics/cat.png",
        poem::get(poem::endpoint::make_sync(move |_| png.clone())),
    );
    let acceptor = poem::listener::TcpAcceptor::from_tokio(listener).unwrap();
    tokio::spawn(poem::Server::new_with_acceptor(acceptor).run(route.boxed()));
    let app = spawn_app_with(
        |_| {},
        |state| {
            state.fetcher = Arc::new(
                UrlFetcher::with_policy(
                    FetchLimits::default(),
                    AddressPolicy::AlsoAllowForTests(origin),
                )
                .unwrap(),
            )
        },
    )
    .await;
    let t = app.tenant("acme").await;
    let create = |url: String| {
        app.http
            .post(app.url("/developer/api/v1/inputs"))
            .header("X-API-Key", &t.admin_key)
            .json(&json!({"url": url}))
            .send()
    };
    let good = create(format!("http://{origin}/pics/cat.png"))
        .await
        .unwrap();
    assert_eq!(good.status(), 202);
    let good: Value = good.json().await.unwrap();
    assert_eq!(good["status"], "pending");
    // Loopback on any other port is refused.
    let bad = create("http://127.0.0.1:9/secret.png".into())
        .await
        .unwrap();
    assert_eq!(bad.status(), 202);
    let bad: Value = bad.json().await.unwrap();
    let not_http = create("file:///etc/passwd".into()).await.unwrap();
    expect_problem(not_http, 400).await;

    let settled = |id: String| {
        let (http, key, url) = (
            app.http.clone(),
            t.admin_key.clone(),
            app.url(&format!("/developer/api/v1/inputs/{id}")),
        );
        async move {
            let v: Value = http
                .get(url)
                .header("X-API-Key", key)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            (v["status"] != "pending").then_some(v)
        }
    };
    let good_id = good["id"].as_str().unwrap().to_string();
    let good = eventually(20, || settled(good_id.clone())).await;
    assert_eq!(good["status"], "ready", "{good}");
    assert_eq!(good["size_bytes"], tiny_png().len());
    let bad_id = bad["id"].as_str().unwrap().to_string();
    let bad = eventually(20, || settled(bad_id.clone())).await;
    assert_eq!(bad["status"], "failed");
    assert!(
        bad["error"].as_str().unwrap().contains("127.0.0.1"),
        "{bad}"
    );

    let events: Value = app
        .http
        .get(app.url("/api/admin/events?type=input.*"))
        .header("X-API-Key", &t.admin_key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let kinds: Vec<&str> = events
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert!(
        kinds.contains(&"input.ready") && kinds.contains(&"input.failed"),
        "{kinds:?}"
    );
}

#[tokio::test]
async fn a_completed_jobs_outputs_are_served_everywhere_with_signed_links() {
    let app = spawn_app().await;
    let t = app.tenant("acme").await;
    let other = app.tenant("other").await;
    let job: Value = app
        .http
        .post(app.url("/developer/api/v1/jobs"))
        .header("X-API-Key", &t.admin_key)
        .json(&json!({"workflow_id": "solid-color"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id: comfyfleet::domain::ids::JobId = job["id"].as_str().unwrap().parse().unwrap();

    let not_ready = app
        .http
        .get(app.url(&format!("/api/run/result/{id}")))
        .header("X-API-Key", &t.admin_key)
        .send()
        .await
        .unwrap();
    assert_eq!(not_ready.status(), 404);

    // Play the worker through the real store: claim, store the file, complete.
    let worker = app.register_worker().await;
    let caps = Capabilities {
        node_classes: ["EmptyImage", "ImageScale", "SaveImage"]
            .map(String::from)
            .to_vec(),
        models: vec![],
    };
    let claimed = app
        .store
        .claim_job(worker, &caps, std::time::Duration::from_secs(30))
        .await
        .unwrap()
        .expect("the job is claimable");
    assert_eq!(claimed.job.id, id);
    let sub = SafeSubfolder::parse("").unwrap();
    let name = SafeFilename::parse("ComfyUI_00001_.png").unwrap();
    let key = ObjectKey::output(t.id, id, &sub, &name);
    app.state.files.put(&key, tiny_png().into()).await.unwrap();
    let output = NewOutput {
        node_id: "3".into(),
        kind: "image".into(),
        filename: name.as_str().into(),
        subfolder: String::new(),
        content_type: "image/png".into(),
        object_key: key.as_str().into(),
        size_bytes: tiny_png().len() as i64,
    };
    app.store
        .complete_job(worker, t.id, id, &[output], |_| json!([]))
        .await
        .unwrap()
        .expect("the worker holds it");

    let result = app
        .http
        .get(app.url(&format!("/api/run/result/{id}")))
        .header("X-API-Key", &t.admin_key)
        .send()
        .await
        .unwrap();
    assert_eq!(result.status(), 200);
    assert_eq!(result.headers()["content-type"], "image/png");
    assert!(
        result.headers()["content-disposition"]
            .to_str()
            .unwrap()
            .starts_with("inline; filename=\"ComfyUI_00001_.png\"")
    );
    assert_eq!(
        result.bytes().await.unwrap().as_ref(),
        tiny_png().as_slice()
    );

    let status: Value = app
        .http
        .get(app.url(&format!("/api/run/status/{id}")))
        .header("X-API-Key", &t.admin_key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        status,
        json!({"status": "completed", "outputs": {"image": {"filename": "ComfyUI_00001_.png", "subfolder": "", "type": "output"}}})
    );

    let job: Value = app
        .http
        .get(app.url(&format!("/developer/api/v1/jobs/{id}")))
        .header("X-API-Key", &t.admin_key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(job["status"], "completed");
    let link = job["outputs"][0]["download_url"].as_str().unwrap();
    assert_eq!(
        reqwest::get(link)
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap()
            .as_ref(),
        tiny_png().as_slice()
    );

    let view = app
        .http
        .get(app.url("/api/comfyui/view?filename=ComfyUI_00001_.png&type=output"))
        .header("X-API-Key", &t.admin_key)
        .send()
        .await
        .unwrap();
    assert_eq!(view.status(), 200);
    for path in [
        format!("/api/run/result/{id}"),
        "/api/comfyui/view?filename=ComfyUI_00001_.png&type=output".to_string(),
    ] {
        let resp = app
            .http
            .get(app.url(&path))
            .header("X-API-Key", &other.admin_key)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 404, "{path}");
    }
}

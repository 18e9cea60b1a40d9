//! The Runner API (seed 004).

use reqwest::multipart::Form;
use serde_json::{Value, json};

use comfyfleet::domain::graph::ui_format::{self, UiWorkflow};
use comfyfleet::domain::node_catalogue::NodeCatalogue;
use comfyfleet::sim::SimConfig;

use crate::support::{TestApp, eventually, spawn_app};

#[tokio::test]
async fn manifests_are_listed_and_served_in_the_seed_shape() {
    let app = spawn_app().await;
    let t = app.tenant("acme").await;
    let list: Value = app
        .http
        .get(app.url("/api/run"))
        .header("X-API-Key", &t.admin_key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    for id in ["invert-image", "solid-color", "sdxl-txt2img", "wan-i2v-14b"] {
        assert!(ids.contains(&id), "{id} in {ids:?}");
    }
    let wan: Value = app
        .http
        .get(app.url("/api/run/wan-i2v-14b"))
        .header("X-API-Key", &t.admin_key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(wan["name"], "WAN 2.1 I2V 14B");
    assert_eq!(wan["type"], "static");
    assert_eq!(wan["category"], "video");
    assert_eq!(
        wan["inputs"][0],
        json!({"id": "image", "type": "image", "label": "Input Image", "node_id": 1, "field": "image"})
    );
    assert_eq!(wan["inputs"][2]["min"], 1);
    assert_eq!(wan["inputs"][2]["max"], 100);
    assert_eq!(wan["inputs"][3]["default"], -1);
    assert_eq!(wan["outputs"], json!([{"type": "video", "format": "mp4"}]));

    let missing = app
        .http
        .get(app.url("/api/run/nope"))
        .header("X-API-Key", &t.admin_key)
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    let body: Value = missing.json().await.unwrap();
    assert!(body["detail"].is_string(), "{body}");
}

#[tokio::test]
async fn build_applies_params_and_names_every_bad_one() {
    let app = spawn_app().await;
    let t = app.tenant("acme").await;
    let built: Value = app
        .http
        .post(app.url("/api/run/sdxl-txt2img/build?format=api"))
        .header("X-API-Key", &t.admin_key)
        .multipart(Form::new().text(
            "params",
            r#"{"prompt": "a cat walking", "steps": 30, "seed": 42}"#,
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(built["2"]["inputs"]["text"], "a cat walking");
    assert_eq!(built["5"]["inputs"]["steps"], 30);
    assert_eq!(built["5"]["inputs"]["seed"], 42);
    assert_eq!(built["5"]["class_type"], "KSampler");

    let bad = app
        .http
        .post(app.url("/api/run/sdxl-txt2img/build"))
        .header("X-API-Key", &t.admin_key)
        .multipart(Form::new().text(
            "params",
            r#"{"steps": 0, "cfg": "hot", "sampler_name": "fastest", "colour": 1}"#,
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    let body: Value = bad.json().await.unwrap();
    let fields: Vec<&str> = body["detail"]["errors"]
        .as_array()
        .unwrap_or_else(|| panic!("errors listed: {body}"))
        .iter()
        .map(|e| e["field"].as_str().unwrap())
        .collect();
    for f in ["steps", "cfg", "sampler_name", "colour"] {
        assert!(fields.contains(&f), "{f} named in {body}");
    }

    let not_json = app
        .http
        .post(app.url("/api/run/sdxl-txt2img/build"))
        .header("X-API-Key", &t.admin_key)
        .multipart(Form::new().text("params", "{oops"))
        .send()
        .await
        .unwrap();
    assert_eq!(not_json.status(), 400);
}

#[tokio::test]
async fn execute_resolves_random_seeds_and_status_starts_pending() {
    let app = spawn_app().await;
    let t = app.tenant("acme").await;
    let resp = app
        .http
        .post(app.url("/api/run/sdxl-txt2img/execute"))
        .header("X-API-Key", &t.admin_key)
        .multipart(Form::new().text("params", r#"{"prompt": "a cat", "seed": -1}"#))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let run: Value = resp.json().await.unwrap();
    let seed = run["seeds"]["seed"].as_i64().unwrap();
    assert!((0..1i64 << 53).contains(&seed), "{seed}");
    assert_eq!(run["client_id"].as_str().unwrap().len(), 32);
    let prompt_id = run["prompt_id"].as_str().unwrap();
    // The job really carries the drawn seed.
    let job: Value = app
        .http
        .get(app.url(&format!("/developer/api/v1/jobs/{prompt_id}")))
        .header("X-API-Key", &t.admin_key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(job["seeds"]["seed"], seed);

    let status: Value = app
        .http
        .get(app.url(&format!("/api/run/status/{prompt_id}")))
        .header("X-API-Key", &t.admin_key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        status,
        json!({"status": "pending", "step": 0, "total_steps": 0})
    );

    let missing_image = app
        .http
        .post(app.url("/api/run/invert-image/execute"))
        .header("X-API-Key", &t.admin_key)
        .multipart(Form::new().text("params", "{}"))
        .send()
        .await
        .unwrap();
    assert_eq!(missing_image.status(), 400);
    let body: Value = missing_image.json().await.unwrap();
    assert!(body.to_string().contains("image"), "{body}");

    let unknown_job = app
        .http
        .get(app.url(&format!("/api/run/status/{}", uuid::Uuid::new_v4())))
        .header("X-API-Key", &t.admin_key)
        .send()
        .await
        .unwrap();
    assert_eq!(unknown_job.status(), 404);
}

async fn build(
    app: &TestApp,
    key: &str,
    workflow: &str,
    format: &str,
    params: &str,
) -> reqwest::Response {
    app.http
        .post(app.url(&format!("/api/run/{workflow}/build?format={format}")))
        .header("X-API-Key", key)
        .multipart(Form::new().text("params", params.to_owned()))
        .send()
        .await
        .unwrap()
}

/// `format=workflow` answers ComfyUI's UI format of the very graph `format=api` gives:
/// converted back with the fleet's own schemas, it is that graph exactly.
#[tokio::test]
async fn build_as_workflow_converts_back_to_the_api_graph() {
    let app = spawn_app().await;
    let t = app.tenant("acme").await;
    let _worker = app.start_worker(SimConfig::default()).await;
    // A fixed seed: -1 would draw a different one per build.
    let params = r#"{"prompt": "a lighthouse", "seed": 1234, "steps": 12}"#;

    // The worker reports its /object_info in the background after it starts.
    let workflow: Value = eventually(30, || async {
        let resp = build(&app, &t.admin_key, "sdxl-txt2img", "workflow", params).await;
        match resp.status().as_u16() {
            200 => Some(resp.json().await.unwrap()),
            503 => None,
            other => panic!("unexpected {other}: {}", resp.text().await.unwrap()),
        }
    })
    .await;
    let api_resp = build(&app, &t.admin_key, "sdxl-txt2img", "api", params).await;
    assert_eq!(api_resp.status(), 200);
    let api: Value = api_resp.json().await.unwrap();

    assert_eq!(workflow["version"], json!(0.4));
    assert_eq!(workflow["nodes"].as_array().unwrap().len(), 7);
    assert_eq!(workflow["links"].as_array().unwrap().len(), 9);
    let ksampler = workflow["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["type"] == "KSampler")
        .unwrap();
    assert_eq!(ksampler["widgets_values"][0], 1234);
    assert_eq!(ksampler["widgets_values"][1], "fixed");
    assert_eq!(ksampler["widgets_values"][2], 12);

    let object_info: Value = app
        .http
        .get(app.url("/api/object_info"))
        .header("X-API-Key", &t.admin_key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let catalogue = NodeCatalogue::from_object_info(&object_info.to_string()).unwrap();
    let ui: UiWorkflow = serde_json::from_value(workflow).unwrap();
    let back = ui_format::to_api(&ui, &catalogue).unwrap();
    assert_eq!(serde_json::to_value(&back).unwrap(), api);
}

#[tokio::test]
async fn build_as_workflow_without_workers_says_which_schema_is_missing() {
    let app = spawn_app().await;
    let t = app.tenant("acme").await;
    let resp = build(&app, &t.admin_key, "sdxl-txt2img", "workflow", "{}").await;
    let status = resp.status();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(status, 503, "{body}");
    assert_eq!(
        body["detail"],
        "no worker reports the schema of node class CheckpointLoaderSimple (node 1)",
        "{body}"
    );
}

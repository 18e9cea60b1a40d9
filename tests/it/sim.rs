//! `comfyfleet sim` against the recorded ComfyUI traces, plus its knobs and faults.

use std::time::Duration;

use comfyfleet::sim::{self, ModelFile, SimConfig};
use serde_json::{Value, json};

use crate::sim_replay::replay;
use crate::sim_support::{self, Frame, connect, get_bytes, post_json, send_text};

/// Server A of the recordings: default preview method (none), one checkpoint.
/// Nodes take a little time so interrupts and reconnects land where they did.
fn server_a() -> SimConfig {
    SimConfig {
        previews: false,
        step_time: Duration::from_millis(150),
        node_time: Duration::from_millis(60),
        models: vec![ModelFile::new(
            "checkpoints",
            "random_sd15_fixture.safetensors",
        )],
        seed: Some(1),
        ..SimConfig::default()
    }
}

#[tokio::test]
async fn sim_conformance_server_a_traces() {
    let sim = sim::spawn(server_a()).await.expect("sim starts");
    // The capture ran 11 before 10 (10's history already holds 11's prompt).
    let files = [
        "01-ws-handshake-feature-flags.jsonl",
        "02-prompt-emptyimage-invert-save.jsonl",
        "03-upload-loadimage.jsonl",
        "04-cached-resubmit.jsonl",
        "05-validation-errors.jsonl",
        "06-runtime-execution-error.jsonl",
        "07-interrupt-and-queue.jsonl",
        "08-reconnect-during-execution.jsonl",
        "09-binary-saveimagewebsocket.jsonl",
        "11-ksampler-no-previews.jsonl",
        "10-rest-endpoints.jsonl",
    ];
    replay(&sim.url(), &files).await;
}

#[tokio::test]
async fn sim_conformance_server_b_previews() {
    let config = SimConfig {
        previews: true,
        preview_size: 64,
        ..server_a()
    };
    let sim = sim::spawn(config).await.expect("sim starts");
    let files = [
        "12-ksampler-latent2rgb-previews.jsonl",
        "13-ksampler-interrupt-mid-node.jsonl",
        "14-reconnect-without-flags-switches-preview-format.jsonl",
    ];
    replay(&sim.url(), &files).await;
}

fn sampler_prompt(ckpt: &str, steps: u64) -> Value {
    json!({
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 128, "height": 96, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red cube", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["4", 1]}},
        "3": {"class_type": "KSampler", "inputs": {"seed": 3, "steps": steps, "cfg": 7.0, "sampler_name": "euler",
              "scheduler": "normal", "denoise": 1.0, "model": ["4", 0], "positive": ["6", 0],
              "negative": ["7", 0], "latent_image": ["5", 0]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "t", "images": ["8", 0]}},
    })
}

fn fast() -> SimConfig {
    SimConfig {
        step_time: Duration::from_millis(5),
        preview_size: 48,
        seed: Some(7),
        ..SimConfig::default()
    }
}

async fn open_with_flags(
    sim: &sim::SimHandle,
    client: &str,
) -> (sim_support::WsSink, std::sync::Arc<sim_support::Inbox>) {
    let (mut sink, inbox) = connect(&sim.ws_url(client)).await;
    send_text(
        &mut sink,
        r#"{"type": "feature_flags", "data": {"supports_preview_metadata": true}}"#,
    )
    .await;
    inbox
        .wait_text("feature_flags reply", |v| v["type"] == "feature_flags")
        .await;
    (sink, inbox)
}

#[tokio::test]
async fn sim_previews_decode_as_jpeg_and_outputs_as_png() {
    let sim = sim::spawn(fast()).await.expect("sim");
    let (_sink, inbox) = open_with_flags(&sim, "c1").await;
    let (status, body) = post_json(
        &sim.url(),
        "/prompt",
        &json!({"prompt": sampler_prompt("sd_xl_base_1.0.safetensors", 4), "client_id": "c1"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let pid = body["prompt_id"].as_str().expect("prompt_id").to_owned();
    inbox.wait_done(&pid).await;

    let progress: Vec<u64> = inbox
        .texts("progress")
        .iter()
        .map(|p| p["data"]["value"].as_u64().unwrap_or(0))
        .collect();
    assert_eq!(progress, vec![1, 2, 3, 4], "one progress per step");
    let previews = inbox.binaries();
    assert_eq!(previews.len(), 4, "one preview per step");
    let mut decoded = Vec::new();
    for (frame, image) in &previews {
        let Frame::Binary { event, detail } = frame else {
            unreachable!()
        };
        assert_eq!(*event, 4, "metadata framing after negotiation");
        assert_eq!(detail["image_type"], "image/jpeg");
        let img = image::load_from_memory_with_format(image, image::ImageFormat::Jpeg)
            .expect("preview is a JPEG");
        assert_eq!(
            (img.width(), img.height()),
            (48, 36),
            "latent 16x12 contained to 48"
        );
        decoded.push(img.to_rgb8().into_raw());
    }
    assert!(
        decoded.windows(2).all(|w| w[0] != w[1]),
        "previews change from step to step"
    );

    let executed = inbox
        .wait_text("executed", |v| v["type"] == "executed")
        .await;
    let out = &executed["data"]["output"]["images"][0];
    let (code, png) = get_bytes(
        &sim.url(),
        &format!(
            "/api/view?filename={}&type=output",
            out["filename"].as_str().unwrap_or("")
        ),
    )
    .await;
    assert_eq!(code, 200);
    let img = image::load_from_memory_with_format(&png, image::ImageFormat::Png)
        .expect("output is a PNG");
    assert_eq!((img.width(), img.height()), (128, 96));
}

#[tokio::test]
async fn sim_legacy_clients_get_event_1_previews() {
    let sim = sim::spawn(SimConfig {
        preview_format: sim::PreviewFormat::Png,
        ..fast()
    })
    .await
    .expect("sim");
    let (_sink, inbox) = connect(&sim.ws_url("legacy")).await;
    let (_, body) = post_json(
        &sim.url(),
        "/prompt",
        &json!({"prompt": sampler_prompt("sd_xl_base_1.0.safetensors", 2), "client_id": "legacy"}),
    )
    .await;
    inbox
        .wait_done(body["prompt_id"].as_str().unwrap_or(""))
        .await;
    let previews = inbox.binaries();
    assert_eq!(previews.len(), 2);
    for (frame, image) in previews {
        assert_eq!(
            frame,
            Frame::Binary {
                event: 1,
                detail: json!({"image_type": 2, "magic": "png"})
            }
        );
        image::load_from_memory_with_format(&image, image::ImageFormat::Png)
            .expect("PNG preview decodes");
    }
    // Without flags the text comes before its image: progress, then binary.
    let kinds = inbox.kinds();
    let first_bin = kinds.iter().position(|k| k == "binary1").expect("binary");
    assert_eq!(kinds[first_bin - 1], "progress");
}

#[tokio::test]
async fn sim_video_workflow_saves_a_real_mp4() {
    let sim = sim::spawn(fast()).await.expect("sim");
    let (_sink, inbox) = open_with_flags(&sim, "vid").await;
    let prompt = json!({
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "wan2.1_i2v_720p_14B_fp16.safetensors", "weight_dtype": "default"}},
        "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": "umt5_xxl_fp8_e4m3fn_scaled.safetensors", "type": "wan"}},
        "3": {"class_type": "VAELoader", "inputs": {"vae_name": "wan_2.1_vae.safetensors"}},
        "4": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": "clip_vision_h.safetensors"}},
        "5": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
        "6": {"class_type": "CLIPVisionEncode", "inputs": {"clip_vision": ["4", 0], "image": ["5", 0], "crop": "none"}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["2", 0]}},
        "8": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["2", 0]}},
        "9": {"class_type": "WanImageToVideo", "inputs": {"positive": ["7", 0], "negative": ["8", 0], "vae": ["3", 0],
              "width": 64, "height": 48, "length": 9, "batch_size": 1, "clip_vision_output": ["6", 0], "start_image": ["5", 0]}},
        "10": {"class_type": "KSampler", "inputs": {"seed": 1, "steps": 2, "cfg": 6.0, "sampler_name": "uni_pc", "scheduler": "simple",
               "denoise": 1.0, "model": ["1", 0], "positive": ["9", 0], "negative": ["9", 1], "latent_image": ["9", 2]}},
        "11": {"class_type": "VAEDecode", "inputs": {"samples": ["10", 0], "vae": ["3", 0]}},
        "12": {"class_type": "CreateVideo", "inputs": {"images": ["11", 0], "fps": 16.0}},
        "13": {"class_type": "SaveVideo", "inputs": {"video": ["12", 0], "filename_prefix": "video/wan", "format": "auto", "codec": "auto"}},
    });
    let (status, body) = post_json(
        &sim.url(),
        "/prompt",
        &json!({"prompt": prompt, "client_id": "vid"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let pid = body["prompt_id"].as_str().unwrap_or("").to_owned();
    inbox.wait_done(&pid).await;
    assert!(
        inbox.texts("execution_success").len() == 1,
        "{:?}",
        inbox.texts("execution_error")
    );
    let (_, hist) = get_bytes(&sim.url(), &format!("/history/{pid}")).await;
    let hist: Value = serde_json::from_slice(&hist).expect("json");
    let out = &hist[&pid]["outputs"]["13"];
    assert_eq!(out["animated"], json!([true]));
    let file = &out["images"][0];
    assert_eq!(file["subfolder"], "video");
    assert!(file["filename"].as_str().unwrap_or("").ends_with(".mp4"));
    let (code, mp4) = get_bytes(
        &sim.url(),
        &format!(
            "/view?filename={}&subfolder=video&type=output",
            file["filename"].as_str().unwrap_or("")
        ),
    )
    .await;
    assert_eq!(code, 200);
    assert_eq!(&mp4[4..12], b"ftypisom");
    // The sample table must describe 9 samples (one per frame) in the mdat.
    let stsz = mp4.windows(4).position(|w| w == b"stsz").expect("stsz box");
    let count = u32::from_be_bytes(mp4[stsz + 12..stsz + 16].try_into().expect("4 bytes"));
    assert_eq!(count, 9);
    assert!(mp4.windows(4).any(|w| w == b"avcC"), "H.264 sample entry");
}

#[tokio::test]
async fn sim_models_drive_validation_and_object_info() {
    let sim = sim::spawn(fast()).await.expect("sim");
    let (code, body) = get_bytes(&sim.url(), "/models/diffusion_models").await;
    assert_eq!(code, 200);
    assert_eq!(
        serde_json::from_slice::<Value>(&body).ok(),
        Some(json!(["wan2.1_i2v_720p_14B_fp16.safetensors"]))
    );
    let (_, info) = get_bytes(&sim.url(), "/api/object_info/CheckpointLoaderSimple").await;
    let info: Value = serde_json::from_slice(&info).expect("json");
    let choices = &info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0];
    assert!(
        choices
            .as_array()
            .is_some_and(|c| c.contains(&json!("sd_xl_base_1.0.safetensors")))
    );

    let (status, body) = post_json(
        &sim.url(),
        "/prompt",
        &json!({"prompt": sampler_prompt("flux_dev.safetensors", 2)}),
    )
    .await;
    assert_eq!(status, 400);
    let err = &body["node_errors"]["4"]["errors"][0];
    assert_eq!(err["type"], "value_not_in_list");
    assert_eq!(
        err["details"],
        "ckpt_name: 'flux_dev.safetensors' not in ['random_sd15_fixture.safetensors', 'sd_xl_base_1.0.safetensors']"
    );
    assert_eq!(body["error"]["type"], "prompt_outputs_failed_validation");
}

#[tokio::test]
async fn sim_faults_fail_hang_and_drop_the_socket() {
    let sim = sim::spawn(fast()).await.expect("sim");
    let (_sink, inbox) = open_with_flags(&sim, "f").await;
    // Fail a node with a chosen exception.
    let extra = json!({"sim": {"faults": [{"node": "8", "fail": {"exception_type": "torch.OutOfMemoryError", "exception_message": "CUDA out of memory"}}]}});
    let (_, body) = post_json(&sim.url(), "/prompt", &json!({"prompt": sampler_prompt("sd_xl_base_1.0.safetensors", 2), "client_id": "f", "extra_data": extra})).await;
    let pid = body["prompt_id"].as_str().unwrap_or("").to_owned();
    inbox.wait_done(&pid).await;
    let err = &inbox.texts("execution_error")[0]["data"];
    assert_eq!(
        (err["node_id"].as_str(), err["node_type"].as_str()),
        (Some("8"), Some("VAEDecode"))
    );
    assert_eq!(
        (
            err["exception_type"].as_str(),
            err["exception_message"].as_str()
        ),
        (Some("torch.OutOfMemoryError"), Some("CUDA out of memory"))
    );

    // Hang a node until an interrupt arrives.
    let extra = json!({"sim": {"faults": [{"class": "VAEDecode", "hang": true}]}});
    let (_, body) = post_json(&sim.url(), "/prompt", &json!({"prompt": sampler_prompt("sd_xl_base_1.0.safetensors", 3), "client_id": "f", "extra_data": extra})).await;
    let pid2 = body["prompt_id"].as_str().unwrap_or("").to_owned();
    inbox
        .wait_text("hanging node", |v| {
            v["type"] == "executing"
                && v["data"]["node"] == "8"
                && v["data"]["prompt_id"] == pid2.as_str()
        })
        .await;
    let (code, _) = post_json(&sim.url(), "/interrupt", &json!({"prompt_id": pid2})).await;
    assert_eq!(code, 200);
    inbox.wait_done(&pid2).await;
    let int = inbox
        .wait_text("interrupted", |v| v["type"] == "execution_interrupted")
        .await;
    assert_eq!(int["data"]["node_id"], "8");

    // Drop the socket at sampler step 2; a reconnect gets the running node.
    let (_sink2, inbox2) = open_with_flags(&sim, "d").await;
    let extra = json!({"sim": {"step_ms": 100, "faults": [{"node": "3", "drop_ws_at_step": 2}]}});
    let (_, body) = post_json(&sim.url(), "/prompt", &json!({"prompt": sampler_prompt("sd_xl_base_1.0.safetensors", 6), "client_id": "d", "extra_data": extra})).await;
    let pid3 = body["prompt_id"].as_str().unwrap_or("").to_owned();
    inbox2
        .wait_text("step 1", |v| {
            v["type"] == "progress" && v["data"]["prompt_id"] == pid3.as_str()
        })
        .await;
    inbox2.wait_closed("drop_ws_at_step fault").await;
    let (_s3, inbox3) = connect(&sim.ws_url("d")).await;
    let first_two = {
        inbox3.wait_for(2, "status + executing on reconnect").await;
        inbox3
            .frames
            .lock()
            .unwrap()
            .iter()
            .take(2)
            .map(|(_, v, _)| v.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(first_two[0]["type"], "status");
    assert_eq!(
        first_two[1],
        json!({"type": "executing", "data": {"node": "3"}})
    );
    inbox3.wait_done(&pid3).await;
    assert!(
        inbox2.texts("progress").len() < 6,
        "the dropped socket stopped receiving"
    );
}

#[tokio::test]
async fn sim_refuses_connections_and_answers_slowly_on_demand() {
    let sim = sim::spawn(fast()).await.expect("sim");
    sim.set_refuse_connections(true);
    assert!(
        reqwest::get(format!("{}/features", sim.url()))
            .await
            .is_err(),
        "connection refused"
    );
    sim.set_refuse_connections(false);
    sim.set_http_delay(Duration::from_millis(200));
    let started = std::time::Instant::now();
    let (code, _) = get_bytes(&sim.url(), "/api/system_stats").await;
    assert_eq!(code, 200);
    assert!(
        started.elapsed() >= Duration::from_millis(200),
        "answer was delayed"
    );
}

#[tokio::test]
async fn sim_seeded_runs_are_deterministic() {
    let mut ids = Vec::new();
    for _ in 0..2 {
        let sim = sim::spawn(fast()).await.expect("sim");
        let (_, body) = post_json(
            &sim.url(),
            "/prompt",
            &json!({"prompt": sampler_prompt("sd_xl_base_1.0.safetensors", 1)}),
        )
        .await;
        ids.push(body["prompt_id"].as_str().unwrap_or("").to_owned());
        sim.shutdown().await.expect("clean shutdown");
    }
    assert_eq!(ids[0], ids[1]);
    assert_eq!(ids[0].len(), 36);
}

/// A ComfyUI client library nobody here wrote (comfy-api-simplified on PyPI) queues
/// prompts, streams previews and downloads outputs from the sim, unmodified.
/// Install: `python3 -m venv tests/clients/.venv && tests/clients/.venv/bin/pip install comfy-api-simplified==1.6.0`
/// (or set COMFYFLEET_CLIENT_PYTHON to a Python that has it).
#[tokio::test]
async fn sim_third_party_client_comfy_api_simplified() {
    let sim = sim::spawn(SimConfig {
        step_time: Duration::from_millis(100),
        preview_size: 64,
        ..fast()
    })
    .await
    .expect("sim");
    drive_comfy_api_simplified(&sim.url(), None).await;
}

/// The Python that has the client libraries: scripts/test's venv, or
/// COMFYFLEET_CLIENT_PYTHON.
pub fn client_python() -> std::path::PathBuf {
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let venv = root.join("tests/clients/.venv/bin/python");
    std::env::var("COMFYFLEET_CLIENT_PYTHON")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| {
            if venv.exists() {
                venv
            } else {
                "python3".into()
            }
        })
}

/// Runs tests/clients/comfy_api_simplified_client.py against `base` (with `api_key`
/// as the library's password, if given) and checks what the library got back.
pub async fn drive_comfy_api_simplified(base: &str, api_key: Option<&str>) {
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let python = client_python();
    let out = tempfile::tempdir().expect("tempdir");
    let run = tokio::process::Command::new(&python)
        .arg(root.join("tests/clients/comfy_api_simplified_client.py"))
        .arg(base)
        .arg(out.path())
        .args(api_key)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("client finished in time")
        .expect("python runs");
    assert!(
        output.status.success(),
        "client failed (is comfy-api-simplified installed for {}?):\n{}",
        python.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    let summary: Value = serde_json::from_slice(&output.stdout).expect("summary JSON");
    assert_eq!(summary["status"], "success");
    let saved = summary["saved"].as_array().expect("saved list");
    assert_eq!(saved.len(), 1);
    let png = image::open(saved[0].as_str().unwrap_or("")).expect("downloaded output decodes");
    assert_eq!((png.width(), png.height()), (48, 32));
    assert_eq!(
        png.to_rgb8().get_pixel(0, 0).0,
        [255, 255, 0],
        "inverted blue"
    );
    let previews = summary["previews"].as_array().expect("previews");
    assert!(!previews.is_empty(), "the library saw streamed previews");
    for p in previews {
        image::load_from_memory_with_format(
            &std::fs::read(p.as_str().unwrap_or("")).expect("file"),
            image::ImageFormat::Jpeg,
        )
        .expect("preview bytes are a JPEG");
    }
    image::open(summary["final"].as_str().unwrap_or("")).expect("final PNG decodes");
}

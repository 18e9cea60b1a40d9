//! `comfyfleet sim` against the recorded ComfyUI traces, plus its knobs and faults.

use std::time::Duration;

use comfyfleet::sim::{self, ModelFile, SimConfig};
use serde_json::{Value, json};

use crate::sim_support::{DEADLINE, Frame, binary_frame, connect, replay, send_text};

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

//! Workers running jobs on simulated ComfyUIs: end to end, failures, cancels,
//! crashes, fairness, capability routing, dropped sockets, progress.

use std::time::Duration;

use comfyfleet::bus::{BusItem, EnvelopeKind};
use comfyfleet::sim::SimConfig;
use comfyfleet::sim::knobs::{FaultKind, NodeFault};
use serde_json::{Value, json};

use crate::support::{eventually, spawn_app};

fn raw_invert(color: u32) -> Value {
    json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": color}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "t"}}
    })
}

fn slow_sampler(steps: u64) -> Value {
    json!({"workflow_id": "sdxl-txt2img", "params": {"steps": steps, "width": 512, "height": 512, "seed": 7}})
}

#[tokio::test]
async fn a_manifest_workflow_runs_end_to_end_to_a_real_png() {
    let app = spawn_app().await;
    let t = app.tenant("acme").await;
    let _w = app.start_worker(SimConfig::default()).await;
    let job = app
        .create_job(&t.admin_key, json!({"workflow_id": "solid-color", "params": {"width": 16, "height": 16, "output_width": 16, "output_height": 16, "color": 0x00ff00}}))
        .await;
    let id = job["id"].as_str().unwrap();
    let done = app.wait_job(&t.admin_key, id, 30).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert!(done["started_at"].is_string() && done["completed_at"].is_string());
    let link = done["outputs"][0]["download_url"].as_str().unwrap();
    let png = reqwest::get(link).await.unwrap().bytes().await.unwrap();
    let decoder = png::Decoder::new(std::io::Cursor::new(png.to_vec()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!((info.width, info.height), (16, 16));
    assert_eq!(&buf[..3], &[0, 255, 0], "the colour asked for");
    assert_eq!(
        app.job_event_types(&t, id).await,
        ["job.accepted", "job.queued", "job.started", "job.completed"]
    );
    // The fleet view shows the worker and what its ComfyUI offers.
    let fleet: Value = app
        .http
        .get(app.url("/api/admin/workers"))
        .header("X-API-Key", &t.admin_key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(fleet[0]["id"], _w.id.to_string());
    assert!(
        fleet[0]["node_classes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c == "KSampler")
    );
    assert!(
        fleet[0]["models"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m == "sd_xl_base_1.0.safetensors")
    );
    assert!(
        fleet[0].get("comfyui_url").is_none(),
        "no internal addresses"
    );
}

#[tokio::test]
async fn a_failing_node_fails_the_job_with_its_cause() {
    let app = spawn_app().await;
    let t = app.tenant("acme").await;
    let _w = app
        .start_worker(SimConfig {
            faults: vec![NodeFault {
                node: None,
                class: Some("ImageInvert".into()),
                kind: FaultKind::Fail {
                    exception_type: "RuntimeError".into(),
                    exception_message: "out of pixels".into(),
                },
            }],
            ..SimConfig::default()
        })
        .await;
    let job = app
        .create_job(&t.admin_key, json!({"workflow": raw_invert(0)}))
        .await;
    let done = app
        .wait_job(&t.admin_key, job["id"].as_str().unwrap(), 30)
        .await;
    assert_eq!(done["status"], "failed");
    assert_eq!(
        done["cause"],
        json!({"node_type": "ImageInvert", "exception_type": "RuntimeError", "exception_message": "out of pixels"})
    );
    let status: Value = app
        .http
        .get(app.url(&format!("/api/run/status/{}", job["id"].as_str().unwrap())))
        .header("X-API-Key", &t.admin_key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(status["status"], "error");
    assert!(status["error"].as_str().unwrap().contains("out of pixels"));
}

#[tokio::test]
async fn cancelling_a_running_job_interrupts_it_on_comfyui() {
    let app = spawn_app().await;
    let t = app.tenant("acme").await;
    let w = app
        .start_worker(SimConfig {
            step_time: Duration::from_millis(100),
            ..SimConfig::default()
        })
        .await;
    let job = app.create_job(&t.admin_key, slow_sampler(150)).await;
    let id = job["id"].as_str().unwrap().to_string();
    eventually(20, || async {
        (app.job(&t.admin_key, &id).await["status"] == "running").then_some(())
    })
    .await;
    let resp = app
        .http
        .post(app.url(&format!("/developer/api/v1/jobs/{id}/cancel")))
        .header("X-API-Key", &t.admin_key)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let now: Value = resp.json().await.unwrap();
    assert_eq!(now["cancel_requested"], true);
    let done = app.wait_job(&t.admin_key, &id, 30).await;
    assert_eq!(done["status"], "cancelled", "{done}");
    // The sim saw the interrupt: its history says so.
    let history: Value = reqwest::get(format!("{}/history/{id}", w.sim.url()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_ne!(history[&id]["status"]["status_str"], "success", "{history}");
}

#[tokio::test]
async fn a_killed_worker_loses_no_job_and_duplicates_none() {
    let app = spawn_app().await;
    let t = app.tenant("acme").await;
    let a = app
        .start_worker(SimConfig {
            step_time: Duration::from_millis(100),
            ..SimConfig::default()
        })
        .await;
    let job = app.create_job(&t.admin_key, slow_sampler(40)).await;
    let id = job["id"].as_str().unwrap().to_string();
    eventually(20, || async {
        (app.job(&t.admin_key, &id).await["status"] == "running").then_some(())
    })
    .await;
    a.kill();
    let _b = app.start_worker(SimConfig::default()).await;
    let done = app.wait_job(&t.admin_key, &id, 40).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(
        done["outputs"].as_array().unwrap().len(),
        1,
        "exactly one result"
    );
    let kinds = app.job_event_types(&t, &id).await;
    assert_eq!(
        kinds.iter().filter(|k| *k == "job.started").count(),
        2,
        "{kinds:?}"
    );
    assert_eq!(
        kinds.iter().filter(|k| *k == "job.requeued").count(),
        1,
        "{kinds:?}"
    );
    assert_eq!(
        kinds.iter().filter(|k| *k == "job.completed").count(),
        1,
        "{kinds:?}"
    );
}

#[tokio::test]
async fn two_workers_run_fifty_jobs_each_exactly_once() {
    let app = spawn_app().await;
    let t = app.tenant("acme").await;
    let _a = app.start_worker(SimConfig::default()).await;
    let _b = app.start_worker(SimConfig::default()).await;
    let mut ids = Vec::new();
    for i in 0..50u32 {
        let job = app
            .create_job(&t.admin_key, json!({"workflow": raw_invert(i)}))
            .await;
        ids.push(job["id"].as_str().unwrap().to_string());
    }
    for id in &ids {
        let done = app.wait_job(&t.admin_key, id, 60).await;
        assert_eq!(done["status"], "completed", "{done}");
        let kinds = app.job_event_types(&t, id).await;
        assert_eq!(
            kinds,
            ["job.accepted", "job.queued", "job.started", "job.completed"],
            "{id}"
        );
    }
    let by_worker: Vec<(uuid::Uuid,)> =
        sqlx::query_as("SELECT DISTINCT worker_id FROM jobs WHERE worker_id IS NOT NULL")
            .fetch_all(app.store.pool())
            .await
            .unwrap();
    assert_eq!(by_worker.len(), 2, "both workers took jobs");
}

#[tokio::test]
async fn one_tenants_backlog_does_not_starve_another() {
    let app = spawn_app().await;
    let busy = app.tenant("busy").await;
    let small = app.tenant("small").await;
    let mut busy_ids = Vec::new();
    for i in 0..12u32 {
        busy_ids.push(
            app.create_job(&busy.admin_key, json!({"workflow": raw_invert(i)}))
                .await["id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    let lone = app
        .create_job(&small.admin_key, json!({"workflow": raw_invert(99)}))
        .await;
    // One worker, started after everything was queued.
    let _w = app.start_worker(SimConfig::default()).await;
    let lone = app
        .wait_job(&small.admin_key, lone["id"].as_str().unwrap(), 30)
        .await;
    assert_eq!(lone["status"], "completed");
    let lone_started = lone["started_at"].as_str().unwrap().to_string();
    let mut busy_before = 0;
    for id in &busy_ids {
        let j = app.wait_job(&busy.admin_key, id, 30).await;
        if j["started_at"].as_str().unwrap() < lone_started.as_str() {
            busy_before += 1;
        }
    }
    assert!(
        busy_before <= 1,
        "the lone job waited behind {busy_before} of the backlog"
    );
}

#[tokio::test]
async fn a_job_no_worker_can_run_stays_queued_with_a_reason() {
    let app = spawn_app().await;
    let t = app.tenant("acme").await;
    let _w = app.start_worker(SimConfig::default()).await;
    let job = app
        .create_job(
            &t.admin_key,
            json!({"workflow": {"1": {"class_type": "FancyCustomNode", "inputs": {}}}}),
        )
        .await;
    let runnable = app
        .create_job(&t.admin_key, json!({"workflow": raw_invert(1)}))
        .await;
    // The runnable job, queued after it, finishes: the worker is alive and skipped it.
    let done = app
        .wait_job(&t.admin_key, runnable["id"].as_str().unwrap(), 30)
        .await;
    assert_eq!(done["status"], "completed");
    let stuck = app.job(&t.admin_key, job["id"].as_str().unwrap()).await;
    assert_eq!(stuck["status"], "queued");
    assert!(
        stuck["queue_reason"]
            .as_str()
            .unwrap()
            .contains("FancyCustomNode"),
        "{stuck}"
    );
}

/// Runs a sampler job of `steps` on a worker whose sim injects `fault` at the
/// KSampler, and asserts that the job completes with its image all the same.
async fn completes_despite_a_sampler_fault(fault: FaultKind, steps: u64) {
    let app = spawn_app().await;
    let t = app.tenant("acme").await;
    let _w = app
        .start_worker(SimConfig {
            faults: vec![NodeFault {
                node: None,
                class: Some("KSampler".into()),
                kind: fault,
            }],
            ..SimConfig::default()
        })
        .await;
    let job = app.create_job(&t.admin_key, slow_sampler(steps)).await;
    let done = app
        .wait_job(&t.admin_key, job["id"].as_str().unwrap(), 30)
        .await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["outputs"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn a_dropped_comfyui_socket_is_survived() {
    completes_despite_a_sampler_fault(FaultKind::DropWebSocket { at_step: 3 }, 8).await;
}

#[tokio::test]
async fn a_prompt_whose_messages_stop_coming_is_finished_from_comfyuis_history() {
    // Nothing about the prompt reaches the worker's socket after the sampler
    // starts; without asking ComfyUI it would wait out the job's time limit.
    completes_despite_a_sampler_fault(FaultKind::ForgetClient, 4).await;
}

#[tokio::test]
async fn progress_counts_cached_nodes_and_previews_travel_raw() {
    let app = spawn_app().await;
    let t = app.tenant("acme").await;
    let _w = app
        .start_worker(SimConfig {
            step_time: Duration::from_millis(60),
            ..SimConfig::default()
        })
        .await;
    // First run warms the cache (checkpoint, prompts, latent); the second changes
    // only the seed, so only the sampler and what follows it run.
    let first = app.create_job(&t.admin_key, slow_sampler(4)).await;
    app.wait_job(&t.admin_key, first["id"].as_str().unwrap(), 30)
        .await;
    let mut feed = app.state.publisher.bus.subscribe(t.id).await;
    let second = app
        .create_job(&t.admin_key, json!({"workflow_id": "sdxl-txt2img", "params": {"steps": 12, "width": 512, "height": 512, "seed": 8}}))
        .await;
    let id: comfyfleet::domain::ids::JobId = second["id"].as_str().unwrap().parse().unwrap();
    let mut states = Vec::new();
    let mut previews = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(item) = feed.recv().await {
            let BusItem::Envelope(e) = item else { continue };
            if e.job != Some(id) {
                continue;
            }
            match e.kind {
                EnvelopeKind::Progress => {
                    states.push(serde_json::from_slice::<Value>(&e.payload).unwrap())
                }
                EnvelopeKind::Preview => previews.push(e.payload.clone()),
                EnvelopeKind::Event if e.event_type() == Some("job.completed") => break,
                _ => {}
            }
        }
    })
    .await
    .expect("the job completes");
    let sampling: Vec<&Value> = states
        .iter()
        .filter(|s| s["node_type"] == "KSampler")
        .collect();
    assert!(!sampling.is_empty(), "{states:?}");
    let last = sampling.last().unwrap();
    assert_eq!(last["total_nodes"], 7);
    assert_eq!(last["cached_count"], 4, "{last}");
    assert_eq!(last["effective_total"], 3);
    assert_eq!(last["total_steps"], 12);
    assert!(
        last["step_rate"].as_f64().is_some_and(|r| r > 0.0),
        "{last}"
    );
    assert!(last["eta_seconds"].is_u64());
    // Throttling never loses the end: the last state has every node done.
    let final_state = states.last().unwrap();
    assert_eq!(
        final_state["nodes_done"], final_state["effective_total"],
        "{final_state}"
    );
    assert_eq!(final_state["percent"], 99);
    let percents: Vec<u64> = states
        .iter()
        .map(|s| s["percent"].as_u64().unwrap())
        .collect();
    assert!(percents.windows(2).all(|w| w[0] <= w[1]), "{percents:?}");
    assert!(percents.iter().all(|p| *p <= 99));
    // Throttled: far fewer states than steps × messages per step.
    assert!(states.len() < 40, "{}", states.len());
    assert!(!previews.is_empty());
    for p in &previews {
        assert_eq!(&p[..2], &[0xff, 0xd8], "raw JPEG bytes, not base64");
    }
}

#[tokio::test]
async fn a_job_over_its_time_limit_is_interrupted_and_failed() {
    let app = spawn_app().await;
    let t = app.tenant("acme").await;
    let w = app
        .start_worker(SimConfig {
            step_time: Duration::from_millis(100),
            ..SimConfig::default()
        })
        .await;
    let mut body = slow_sampler(150);
    body["time_limit_secs"] = json!(1);
    let job = app.create_job(&t.admin_key, body).await;
    let id = job["id"].as_str().unwrap().to_string();
    let done = app.wait_job(&t.admin_key, &id, 30).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(done["cause"]["exception_type"], "Timeout");
    // The prompt was stopped on ComfyUI, not left running there.
    let queue = eventually(10, || async {
        let q: Value = reqwest::get(format!("{}/queue", w.sim.url()))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        q["queue_running"]
            .as_array()
            .unwrap()
            .is_empty()
            .then_some(q)
    })
    .await;
    assert_eq!(queue["queue_pending"], json!([]));
}

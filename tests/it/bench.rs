//! `comfyfleet bench` at toy scale, so the instrument never rots: it starts its own
//! API pod, connects, publishes through Redis, measures and writes its JSON. The
//! figures themselves are not asserted (speed lives in BENCHMARKS.md).

use std::time::Duration;

use serde_json::Value;
use tokio::process::Command;

use crate::support::{admin_database_url, binary, redis_url};

async fn bench(args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new(binary());
    cmd.arg("bench")
        .args(args)
        .env_remove("DATABASE_URL")
        .env_remove("REDIS_URL")
        .env("BENCH_DATABASE_URL", admin_database_url())
        .env("BENCH_REDIS_URL", redis_url())
        .env("RUST_LOG", "warn")
        .kill_on_drop(true);
    tokio::time::timeout(Duration::from_secs(180), cmd.output())
        .await
        .expect("the bench finishes")
        .expect("run the comfyfleet binary")
}

fn report(out: &std::process::Output, json: &std::path::Path) -> Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "bench failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("delivered/s"), "prints its table: {stdout}");
    serde_json::from_slice(&std::fs::read(json).expect("the JSON file is written"))
        .expect("the JSON file is JSON")
}

#[tokio::test]
async fn fanout_smoke_run_delivers_and_reports() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("fanout.json");
    let out = bench(&[
        "fanout",
        "--clients",
        "3",
        "--rate",
        "40",
        "--duration",
        "1",
        "--json",
        json.to_str().unwrap(),
    ])
    .await;
    let r = report(&out, &json);
    assert_eq!(r["scenario"], "fanout");
    assert_eq!(r["target"], "comfyfleet");
    assert_eq!(r["connected"], 3, "{r}");
    assert_eq!(r["published"], 40, "{r}");
    assert!(r["delivered"].as_u64().unwrap() > 0, "{r}");
    assert_eq!(
        r["latency"]["samples"].as_u64().unwrap(),
        r["delivered"].as_u64().unwrap() + r["duplicates"].as_u64().unwrap(),
        "every received message is timed: {r}"
    );
    assert!(r["server"]["rss_mib_after"].as_f64().unwrap() > 0.0, "{r}");
    assert!(r["machine"]["cores"].as_u64().unwrap() >= 1, "{r}");
    for key in ["p50_ms", "p90_ms", "p99_ms", "p999_ms", "max_ms"] {
        assert!(r["latency"][key].is_number(), "{key}: {r}");
    }
}

#[tokio::test]
async fn idle_and_previews_smoke_runs_report() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("idle.json");
    let out = bench(&[
        "idle",
        "--clients",
        "4",
        "--duration",
        "0.5",
        "--json",
        json.to_str().unwrap(),
    ])
    .await;
    let r = report(&out, &json);
    assert_eq!(r["connected"], 4, "{r}");
    assert_eq!(r["closed_by_server"], 0, "idle sockets stay open: {r}");
    assert!(r["server"]["rss_kib_per_connection"].is_number(), "{r}");

    let json = dir.path().join("previews.json");
    let out = bench(&[
        "previews",
        "--jobs",
        "2",
        "--watchers",
        "2",
        "--rate",
        "10",
        "--size",
        "4096",
        "--duration",
        "1",
        "--json",
        json.to_str().unwrap(),
    ])
    .await;
    let r = report(&out, &json);
    assert_eq!(r["connected"], 4, "{r}");
    assert!(r["delivered"].as_u64().unwrap() > 0, "{r}");
    assert!(r["avg_message_bytes"].as_f64().unwrap() >= 4096.0, "{r}");
}

#[tokio::test]
async fn bad_bench_options_are_refused_in_one_line() {
    for args in [
        &["fanout", "--rate", "0"][..],
        &["fanout", "--clients", "0"],
        &["slow", "--slow-share", "1.5"],
        &["fanout", "--target", "nchan"],
        &["jobs", "--workers", "0"],
        &["jobs", "--concurrency", "0"],
        &["jobs", "--tenants", "0"],
        &["storm", "--url", "http://127.0.0.1:9"],
        &[
            "jobs",
            "--target",
            "nchan",
            "--nchan-url",
            "http://127.0.0.1:9",
        ],
    ] {
        let out = bench(args).await;
        assert!(!out.status.success(), "{args:?} must fail");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.starts_with("comfyfleet: --"), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

fn fleet_report(out: &std::process::Output, json: &std::path::Path) -> Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "bench failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&std::fs::read(json).expect("the JSON file is written"))
        .expect("the JSON file is JSON")
}

#[tokio::test]
async fn jobs_smoke_run_submits_runs_and_reports() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("jobs.json");
    let out = bench(&[
        "jobs",
        "--jobs",
        "6",
        "--workers",
        "2",
        "--concurrency",
        "3",
        "--warm-up",
        "4",
        "--tenants",
        "2",
        "--json",
        json.to_str().unwrap(),
    ])
    .await;
    let r = fleet_report(&out, &json);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("intake:") && stdout.contains("end to end:"),
        "{stdout}"
    );
    assert_eq!(r["scenario"], "jobs");
    let j = &r["jobs"];
    assert_eq!(j["accepted"], 6, "every submit is acknowledged: {r}");
    assert_eq!(j["submit_errors"], 0, "{r}");
    assert!(
        j["completed"].as_u64().unwrap() > 0,
        "jobs run on the sims: {r}"
    );
    assert_eq!(
        j["end_to_end_latency"]["samples"], j["completed"],
        "every completed job is timed: {r}"
    );
    assert_eq!(j["intake_latency"]["samples"], 6, "{r}");
    assert_eq!(r["params"]["warm_up_jobs"], 4, "{r}");
    assert_eq!(r["params"]["tenants"], 2, "{r}");
    assert_eq!(r["connected"], 2, "one observer per tenant: {r}");
    assert_eq!(
        j["completed"].as_u64().unwrap() + j["failed"].as_u64().unwrap(),
        6,
        "the warm-up's jobs are not counted: {r}"
    );
}

#[tokio::test]
async fn storm_smoke_run_restarts_the_pod_and_everyone_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("storm.json");
    let out = bench(&[
        "storm",
        "--clients",
        "4",
        "--workers",
        "1",
        "--rate",
        "10",
        "--duration",
        "1.5",
        "--json",
        json.to_str().unwrap(),
    ])
    .await;
    let r = fleet_report(&out, &json);
    assert_eq!(r["scenario"], "storm");
    assert_eq!(r["connected"], 4, "{r}");
    let s = &r["storm"];
    assert_eq!(s["clients_resumed"], 4, "every client came back: {r}");
    assert!(s["all_back_ms"].is_number(), "{r}");
    assert!(s["durable_events"].as_u64().unwrap() > 0, "{r}");
    assert_eq!(s["missed"], 0, "nothing durable is missed: {r}");
    for step in ["waiting", "upgrade", "greeting", "subscribe"] {
        assert_eq!(
            s["back_by_step"][step]["samples"], 4,
            "each client's way back is timed by step: {r}"
        );
    }
}

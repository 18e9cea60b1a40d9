//! The three client streams against the real app, Postgres and Redis: the session
//! stream (`WS /api/run/ws`, seed 000), the cloud pub/sub WebSocket
//! (`/developer/api/v1/ws`, seed 002) and SSE status snapshots
//! (`/v1/workflow/{id}/subscribe`, seed 003).
//!
//! Events are driven through the real API (create, cancel) or the real store (a
//! worker's claim and completion), progress and previews through the publisher the
//! worker uses. Nothing sleeps: every expectation awaits the next frame with a
//! deadline, and "sees nothing" is checked by a later frame of the client's own
//! arriving first.

use std::time::Duration;

use bytes::Bytes;
use comfyfleet::domain::ids::{JobId, WorkerId};
use comfyfleet::files::{ObjectKey, SafeFilename, SafeSubfolder};
use comfyfleet::store::claims::{Capabilities, NewOutput};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async};

use crate::support::{TestApp, TestTenant, expect_problem, session_cookie_of, spawn_app, tiny_png};

const DEADLINE: Duration = Duration::from_secs(10);

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

fn ws_url(base: &str, path: &str) -> String {
    format!("{}{}", base.replacen("http://", "ws://", 1), path)
}

async fn ws_connect(base: &str, path: &str, headers: &[(&str, &str)]) -> Ws {
    let mut request = ws_url(base, path).into_client_request().unwrap();
    for (name, value) in headers {
        request.headers_mut().insert(
            tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            value.parse().unwrap(),
        );
    }
    let (ws, response) = timeout(DEADLINE, connect_async(request))
        .await
        .expect("handshake before the deadline")
        .expect("handshake succeeds");
    assert_eq!(response.status().as_u16(), 101);
    ws
}

/// The next data or close message (tungstenite answers pings itself).
async fn next_message(ws: &mut Ws) -> Message {
    loop {
        let msg = timeout(DEADLINE, ws.next())
            .await
            .expect("a message before the deadline")
            .expect("the stream is open")
            .expect("a valid frame");
        if !matches!(msg, Message::Ping(_) | Message::Pong(_)) {
            return msg;
        }
    }
}

async fn next_json(ws: &mut Ws) -> Value {
    match next_message(ws).await {
        Message::Text(text) => serde_json::from_str(text.as_str()).expect("JSON text"),
        other => panic!("expected a text frame, got {other:?}"),
    }
}

async fn expect_close(ws: &mut Ws, code: u16) -> String {
    match next_message(ws).await {
        Message::Close(Some(frame)) => {
            assert_eq!(u16::from(frame.code), code, "close code ({})", frame.reason);
            frame.reason.to_string()
        }
        other => panic!("expected a close frame {code}, got {other:?}"),
    }
}

async fn create_job(app: &TestApp, t: &TestTenant) -> JobId {
    let resp = app
        .http
        .post(app.url("/developer/api/v1/jobs"))
        .header("X-API-Key", &t.admin_key)
        .json(&json!({"workflow_id": "solid-color"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let body: Value = resp.json().await.unwrap();
    body["id"].as_str().unwrap().parse().unwrap()
}

async fn cancel_job(app: &TestApp, t: &TestTenant, job: JobId) {
    let resp = app
        .http
        .post(app.url(&format!("/developer/api/v1/jobs/{job}/cancel")))
        .header("X-API-Key", &t.admin_key)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

/// Plays a worker through the real store: claims the next job (it must be `job`).
async fn claim(app: &TestApp, job: JobId) -> WorkerId {
    let worker = app.register_worker().await;
    let caps = Capabilities {
        node_classes: ["EmptyImage", "ImageScale", "SaveImage"]
            .map(String::from)
            .to_vec(),
        models: vec![],
    };
    let claimed = app
        .store
        .claim_job(worker, &caps, Duration::from_secs(30))
        .await
        .unwrap()
        .expect("the job is claimable");
    assert_eq!(claimed.job.id, job);
    app.state.publish(&claimed.events).await;
    worker
}

/// Completes a claimed job with one PNG output and publishes its events.
async fn complete(app: &TestApp, t: &TestTenant, worker: WorkerId, job: JobId) {
    let sub = SafeSubfolder::parse("").unwrap();
    let name = SafeFilename::parse("ComfyUI_00001_.png").unwrap();
    let key = ObjectKey::output(t.id, job, &sub, &name);
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
    let (_, events) = app
        .store
        .complete_job(worker, t.id, job, &[output], |_| json!([]))
        .await
        .unwrap()
        .expect("the worker holds it");
    app.state.publish(&events).await;
}

fn progress_state(job: JobId, percent: u8) -> Value {
    json!({
        "prompt_id": job.to_string(),
        "status": "running",
        "workflow_id": "solid-color",
        "node_id": "3",
        "node_title": "KSampler",
        "node_type": "KSampler",
        "step": 5,
        "total_steps": 20,
        "nodes_done": 1,
        "total_nodes": 3,
        "effective_total": 3,
        "cached_count": 0,
        "percent": percent,
        "eta_seconds": 4,
        "step_rate": 2.5,
        "preview_seq": 0,
        "node_outputs": {},
    })
}

async fn publish_preview(app: &TestApp, tenant: comfyfleet::domain::ids::TenantId, job: JobId) {
    app.state
        .publisher
        .preview(tenant, job, 1, "9", "image/png", Bytes::from(tiny_png()))
        .await;
}

/// Connects to the session stream with an API key. `since=0` makes the test immune
/// to the race between the handshake and the server attaching to the hub: whatever
/// commits before the attach is replayed from the log. Receiving any event then
/// proves the connection is attached, so ephemeral frames published afterwards
/// reach it.
async fn session(base: &str, key: &str, query: &str) -> Ws {
    let sep = if query.is_empty() { "" } else { "&" };
    ws_connect(
        base,
        &format!("/api/run/ws?since=0{sep}{query}"),
        &[("x-api-key", key)],
    )
    .await
}

/// Creates a job and waits for its two events on `ws`: after this the connection
/// is surely attached.
async fn barrier(app: &TestApp, t: &TestTenant, ws: &mut Ws) -> JobId {
    let job = create_job(app, t).await;
    for expected in ["job.accepted", "job.queued"] {
        let event = next_json(ws).await;
        assert_eq!(event["type"], expected, "{event}");
        assert_eq!(event["data"]["prompt_id"], job.to_string());
    }
    job
}

fn event_num(event: &Value) -> i64 {
    event["id"]
        .as_str()
        .and_then(|id| id.strip_prefix("evt_"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("an event id: {event}"))
}

// ------------------------------------------------------------ session stream

#[tokio::test]
async fn streams_session_refuses_missing_or_bad_credentials_with_4001() {
    let app = spawn_app().await;
    let mut anonymous = ws_connect(&app.base, "/api/run/ws", &[]).await;
    assert_eq!(
        expect_close(&mut anonymous, 4001).await,
        "Not authenticated"
    );
    let mut bad = ws_connect(&app.base, "/api/run/ws?api_key=comfyfleet_nope", &[]).await;
    assert_eq!(expect_close(&mut bad, 4001).await, "Not authenticated");
}

#[tokio::test]
async fn streams_session_cookie_from_a_foreign_origin_is_refused() {
    let app = spawn_app().await;
    let t = app.tenant("acme").await;
    let login = app
        .http
        .post(app.url("/api/auth/login"))
        .json(&json!({"email": t.admin_email, "password": t.admin_password}))
        .send()
        .await
        .unwrap();
    assert!(login.status().is_success());
    let (cookie, _) = session_cookie_of(&login);

    let mut foreign = ws_connect(
        &app.base,
        "/api/run/ws",
        &[("cookie", &cookie), ("origin", "https://evil.example")],
    )
    .await;
    assert_eq!(expect_close(&mut foreign, 4003).await, "Origin not allowed");

    // The pod's own origin is fine, and the cookie is a credential on this stream.
    let own = app.base.clone();
    let mut ws = ws_connect(
        &app.base,
        "/api/run/ws?since=0",
        &[("cookie", &cookie), ("origin", &own)],
    )
    .await;
    let job = create_job(&app, &t).await;
    let accepted = next_json(&mut ws).await;
    assert_eq!(accepted["type"], "job.accepted");
    assert_eq!(accepted["data"]["prompt_id"], job.to_string());
}

#[tokio::test]
async fn streams_session_sends_events_progress_and_byte_exact_previews() {
    let app = spawn_app().await;
    let t = app.tenant("acme").await;
    let mut ws = session(&app.base, &t.admin_key, "preview_meta=1").await;
    let job = create_job(&app, &t).await;
    let accepted = next_json(&mut ws).await;
    assert_eq!(accepted["type"], "job.accepted");
    assert!(
        accepted.get("prompt_id").is_none(),
        "events have no top-level prompt_id"
    );
    let queued = next_json(&mut ws).await;
    assert_eq!(queued["type"], "job.queued");
    assert!(event_num(&queued) > event_num(&accepted));

    app.state
        .publisher
        .progress(t.id, job, &progress_state(job, 42))
        .await;
    let progress = next_json(&mut ws).await;
    assert_eq!(progress, progress_state(job, 42));

    let image: Vec<u8> = (0..50_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let mut jpeg = vec![0xFF, 0xD8];
    jpeg.extend_from_slice(&image);
    app.state
        .publisher
        .preview(t.id, job, 3, "9", "image/jpeg", Bytes::from(jpeg.clone()))
        .await;
    let meta = next_json(&mut ws).await;
    assert_eq!(
        meta,
        json!({"type": "preview", "prompt_id": job.to_string(), "preview_seq": 3,
               "node_id": "9", "mime": "image/jpeg"})
    );
    match next_message(&mut ws).await {
        Message::Binary(bytes) => assert_eq!(bytes.as_ref(), jpeg.as_slice()),
        other => panic!("expected the preview bytes, got {other:?}"),
    }

    // Without preview_meta the binary frame comes alone.
    let mut plain = session(&app.base, &t.admin_key, "").await;
    for expected in ["job.accepted", "job.queued"] {
        assert_eq!(next_json(&mut plain).await["type"], expected);
    }
    let png = tiny_png();
    app.state
        .publisher
        .preview(t.id, job, 4, "9", "image/png", Bytes::from(png.clone()))
        .await;
    match next_message(&mut plain).await {
        Message::Binary(bytes) => assert_eq!(bytes.as_ref(), png.as_slice()),
        other => panic!("expected the preview bytes, got {other:?}"),
    }
}

#[tokio::test]
async fn streams_session_starts_with_the_snapshot_of_running_jobs() {
    let app = spawn_app().await;
    let t = app.tenant("acme").await;
    let job = create_job(&app, &t).await;
    claim(&app, job).await;
    app.state
        .publisher
        .progress(t.id, job, &progress_state(job, 61))
        .await;
    let mut ws = ws_connect(&app.base, "/api/run/ws", &[("x-api-key", &t.admin_key)]).await;
    assert_eq!(next_json(&mut ws).await, progress_state(job, 61));
}

#[tokio::test]
async fn streams_session_prompt_id_narrows_to_those_jobs() {
    let app = spawn_app().await;
    let t = app.tenant("acme").await;
    let watched = create_job(&app, &t).await;
    let other = create_job(&app, &t).await;
    let mut ws = session(&app.base, &t.admin_key, &format!("prompt_id={watched}")).await;
    // The replay holds only the watched job's events (and proves the attach).
    for expected in ["job.accepted", "job.queued"] {
        let event = next_json(&mut ws).await;
        assert_eq!(event["type"], expected);
        assert_eq!(event["data"]["prompt_id"], watched.to_string());
    }
    app.state
        .publisher
        .progress(t.id, other, &progress_state(other, 10))
        .await;
    publish_preview(&app, t.id, other).await;
    cancel_job(&app, &t, other).await;
    cancel_job(&app, &t, watched).await;
    let first = next_json(&mut ws).await;
    assert_eq!(first["type"], "job.cancelled");
    assert_eq!(first["data"]["prompt_id"], watched.to_string());
    app.state
        .publisher
        .progress(t.id, watched, &progress_state(watched, 20))
        .await;
    assert_eq!(next_json(&mut ws).await, progress_state(watched, 20));

    let mut bad = ws_connect(
        &app.base,
        "/api/run/ws?prompt_id=not-a-job",
        &[("x-api-key", &t.admin_key)],
    )
    .await;
    expect_close(&mut bad, 1008).await;
}

#[tokio::test]
async fn streams_session_since_resumes_after_a_disconnect_without_gap_or_duplicate() {
    let app = spawn_app().await;
    let t = app.tenant("acme").await;
    let mut ws = session(&app.base, &t.admin_key, "").await;
    // A burst: 4 jobs × (accepted, queued).
    let mut jobs = Vec::new();
    for _ in 0..4 {
        jobs.push(create_job(&app, &t).await);
    }
    let mut seen = Vec::new();
    for _ in 0..3 {
        seen.push(event_num(&next_json(&mut ws).await));
    }
    drop(ws); // mid-burst
    // More happens while the client is away.
    cancel_job(&app, &t, jobs[0]).await;
    cancel_job(&app, &t, jobs[1]).await;
    let last_seen = *seen.last().unwrap();

    let mut ws = ws_connect(
        &app.base,
        &format!("/api/run/ws?since=evt_{last_seen}"),
        &[("x-api-key", &t.admin_key)],
    )
    .await;
    // And some more after it reconnected (live).
    cancel_job(&app, &t, jobs[2]).await;
    let expected: Vec<i64> = app
        .store
        .list_events(
            t.id,
            &comfyfleet::store::events::EventQuery {
                since: Some(last_seen),
                limit: 1000,
                ..Default::default()
            },
        )
        .await
        .unwrap()
        .iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(
        expected.len(),
        5 + 2 + 1,
        "the burst's rest, two cancels, one live"
    );
    let mut got = Vec::new();
    while got.len() < expected.len() {
        got.push(event_num(&next_json(&mut ws).await));
    }
    assert_eq!(got, expected);
    // Nothing duplicated behind them: the next thing is a fresh event.
    cancel_job(&app, &t, jobs[3]).await;
    let next = next_json(&mut ws).await;
    assert_eq!(next["type"], "job.cancelled");
    assert!(event_num(&next) > *expected.last().unwrap());
}

#[tokio::test]
async fn streams_session_tenants_see_only_their_own_jobs() {
    let app = spawn_app().await;
    let a = app.tenant("acme").await;
    let b = app.tenant("bravo").await;
    let mut ws_b = session(&app.base, &b.admin_key, "").await;
    barrier(&app, &b, &mut ws_b).await;
    let job_a = create_job(&app, &a).await;
    app.state
        .publisher
        .progress(a.id, job_a, &progress_state(job_a, 50))
        .await;
    publish_preview(&app, a.id, job_a).await;
    cancel_job(&app, &a, job_a).await;
    // B's own job is the first thing B hears about.
    let job_b = create_job(&app, &b).await;
    let first = next_json(&mut ws_b).await;
    assert_eq!(first["type"], "job.accepted");
    assert_eq!(first["data"]["prompt_id"], job_b.to_string());
}

#[tokio::test]
async fn streams_session_refuses_oversized_and_binary_client_frames() {
    let app = spawn_app().await;
    let t = app.tenant("acme").await;
    let mut ws = session(&app.base, &t.admin_key, "").await;
    // Small text is ignored, and the stream keeps working.
    ws.send(Message::text("hello")).await.unwrap();
    barrier(&app, &t, &mut ws).await;
    ws.send(Message::text("x".repeat(70 * 1024))).await.unwrap();
    expect_close(&mut ws, 1009).await;

    // No `since` here: the earlier job's events would be replayed ahead of the close.
    let mut ws = ws_connect(&app.base, "/api/run/ws", &[("x-api-key", &t.admin_key)]).await;
    ws.send(Message::binary(vec![1u8, 2, 3])).await.unwrap();
    expect_close(&mut ws, 1003).await;
}

// ------------------------------------------------------------ cloud pub/sub

async fn cloud_connect(app_base: &str, key: &str) -> Ws {
    let mut ws = ws_connect(
        app_base,
        &format!("/developer/api/v1/ws?api_key={key}"),
        &[],
    )
    .await;
    let connected = next_json(&mut ws).await;
    assert_eq!(connected["type"], "connected");
    assert!(
        connected["data"]["session_id"]
            .as_str()
            .is_some_and(|s| !s.is_empty())
    );
    ws
}

async fn send_json(ws: &mut Ws, value: Value) {
    ws.send(Message::text(value.to_string())).await.unwrap();
}

async fn subscribe(ws: &mut Ws, events: &[&str]) -> Value {
    send_json(ws, json!({"type": "subscribe", "data": {"events": events}})).await;
    let reply = next_json(ws).await;
    assert_eq!(reply["type"], "subscribed", "{reply}");
    reply
}

#[tokio::test]
async fn streams_cloud_refuses_a_bad_key_with_4001() {
    let app = spawn_app().await;
    let mut ws = ws_connect(&app.base, "/developer/api/v1/ws?api_key=comfyui-nope", &[]).await;
    assert_eq!(expect_close(&mut ws, 4001).await, "invalid API key");
    let mut ws = ws_connect(&app.base, "/developer/api/v1/ws", &[]).await;
    expect_close(&mut ws, 4001).await;
}

#[tokio::test]
async fn streams_cloud_ping_subscribe_wildcards_and_unsubscribe() {
    let app = spawn_app().await;
    let t = app.tenant("acme").await;
    let mut ws = cloud_connect(&app.base, &t.admin_key).await;
    send_json(&mut ws, json!({"type": "ping"})).await;
    assert_eq!(next_json(&mut ws).await["type"], "pong");

    // Only cancellations: accepted/queued are not delivered.
    let reply = subscribe(&mut ws, &["job.cancelled"]).await;
    assert_eq!(reply["data"]["events"], json!(["job.cancelled"]));
    let job = create_job(&app, &t).await;
    cancel_job(&app, &t, job).await;
    let event = next_json(&mut ws).await;
    assert_eq!(event["type"], "event");
    assert_eq!(event["data"]["event"], "job.cancelled");
    assert_eq!(event["data"]["payload"]["id"], job.to_string());
    assert_eq!(event["data"]["payload"]["status"], "cancelled");
    assert!(
        event["timestamp"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z'))
    );

    // Progress is only for subscribers of job.progress (or a wildcard over it).
    let running = create_job(&app, &t).await;
    app.state
        .publisher
        .progress(t.id, running, &progress_state(running, 33))
        .await;
    // The bus keeps a tenant's order: once this cancellation arrives, progress 33 has
    // passed the socket's filter (and was dropped), so subscribing now cannot race it.
    let marker = create_job(&app, &t).await;
    cancel_job(&app, &t, marker).await;
    let event = next_json(&mut ws).await;
    assert_eq!(
        event["data"]["event"], "job.cancelled",
        "progress 33 leaked"
    );
    assert_eq!(event["data"]["payload"]["id"], marker.to_string());
    let reply = subscribe(&mut ws, &["job.*"]).await;
    assert_eq!(reply["data"]["events"], json!(["job.cancelled", "job.*"]));
    app.state
        .publisher
        .progress(t.id, running, &progress_state(running, 34))
        .await;
    let progress = next_json(&mut ws).await;
    assert_eq!(progress["data"]["event"], "job.progress");
    assert_eq!(progress["data"]["payload"]["id"], running.to_string());
    assert_eq!(progress["data"]["payload"]["progress"], 34);
    assert_eq!(progress["data"]["payload"]["node"], "3");
    assert_eq!(progress["data"]["payload"]["step"], 5);
    assert_eq!(progress["data"]["payload"]["total_steps"], 20);

    send_json(
        &mut ws,
        json!({"type": "unsubscribe", "data": {"events": ["job.*"]}}),
    )
    .await;
    let reply = next_json(&mut ws).await;
    assert_eq!(reply["type"], "unsubscribed");
    assert_eq!(reply["data"]["events"], json!(["job.cancelled"]));
    app.state
        .publisher
        .progress(t.id, running, &progress_state(running, 35))
        .await;
    cancel_job(&app, &t, running).await;
    let next = next_json(&mut ws).await;
    assert_eq!(
        next["data"]["event"], "job.cancelled",
        "no progress after unsubscribe"
    );

    // `*` takes everything, inputs included.
    let mut all = cloud_connect(&app.base, &t.admin_key).await;
    subscribe(&mut all, &["*"]).await;
    let job = create_job(&app, &t).await;
    let first = next_json(&mut all).await;
    assert_eq!(first["data"]["event"], "job.accepted");
    assert_eq!(first["data"]["payload"]["id"], job.to_string());
    assert!(
        first["id"]
            .as_str()
            .is_some_and(|id| id.starts_with("evt_"))
    );
}

#[tokio::test]
async fn streams_cloud_answers_malformed_messages_with_errors_and_stays_open() {
    let app = spawn_app().await;
    let t = app.tenant("acme").await;
    let mut ws = cloud_connect(&app.base, &t.admin_key).await;
    let cases: Vec<(String, &str)> = vec![
        ("not json".into(), "invalid_json"),
        (json!({"data": {}}).to_string(), "invalid_message"),
        (json!(["subscribe"]).to_string(), "invalid_message"),
        (json!({"type": "dance"}).to_string(), "unknown_type"),
        (
            json!({"type": "subscribe", "data": {}}).to_string(),
            "invalid_message",
        ),
        (
            json!({"type": "subscribe", "data": {"events": "job.*"}}).to_string(),
            "invalid_message",
        ),
        (
            json!({"type": "subscribe", "data": {"events": ["job.**"]}}).to_string(),
            "invalid_pattern",
        ),
        (
            json!({"type": "subscribe", "data": {"events": ["Job Completed"]}}).to_string(),
            "invalid_pattern",
        ),
        (
            json!({"type": "unsubscribe", "data": {"events": ["*.x"]}}).to_string(),
            "invalid_pattern",
        ),
        (
            json!({"type": "subscribe", "data": {"events": ["job.*"], "since": "evt_x"}})
                .to_string(),
            "invalid_since",
        ),
        (
            json!({"type": "subscribe", "data": {"events":
                (0..65).map(|i| format!("e{i}")).collect::<Vec<_>>()}})
            .to_string(),
            "too_many_patterns",
        ),
    ];
    for (message, code) in cases {
        ws.send(Message::text(message.clone())).await.unwrap();
        let reply = next_json(&mut ws).await;
        assert_eq!(reply["type"], "error", "{message} → {reply}");
        assert_eq!(reply["data"]["code"], code, "{message} → {reply}");
        assert!(
            reply["data"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
    }
    // None of those changed the subscriptions, and the connection still works.
    send_json(&mut ws, json!({"type": "ping"})).await;
    assert_eq!(next_json(&mut ws).await["type"], "pong");
    let reply = subscribe(&mut ws, &["model.*"]).await;
    assert_eq!(reply["data"]["events"], json!(["model.*"]));

    ws.send(Message::text("x".repeat(65 * 1024))).await.unwrap();
    expect_close(&mut ws, 1009).await;

    let mut ws = cloud_connect(&app.base, &t.admin_key).await;
    ws.send(Message::binary(vec![0u8; 8])).await.unwrap();
    expect_close(&mut ws, 1003).await;
}

#[tokio::test]
async fn streams_cloud_closes_a_flooding_client_with_1008() {
    let app = spawn_app().await;
    let t = app.tenant("acme").await;
    let mut ws = cloud_connect(&app.base, &t.admin_key).await;
    for _ in 0..200 {
        if ws.send(Message::text(r#"{"type":"ping"}"#)).await.is_err() {
            break;
        }
    }
    loop {
        match next_message(&mut ws).await {
            Message::Text(text) => assert!(text.as_str().contains("pong")),
            Message::Close(Some(frame)) => {
                assert_eq!(frame.code, CloseCode::Policy);
                assert_eq!(frame.reason.as_str(), "rate limit exceeded");
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test]
async fn streams_cloud_completed_event_has_signed_download_urls() {
    let app = spawn_app().await;
    let t = app.tenant("acme").await;
    let mut ws = cloud_connect(&app.base, &t.admin_key).await;
    subscribe(&mut ws, &["job.completed", "job.failed"]).await;
    let job = create_job(&app, &t).await;
    let worker = claim(&app, job).await;
    complete(&app, &t, worker, job).await;
    let event = next_json(&mut ws).await;
    assert_eq!(event["data"]["event"], "job.completed");
    let payload = &event["data"]["payload"];
    assert_eq!(payload["id"], job.to_string());
    assert_eq!(payload["status"], "completed");
    let outputs = payload["outputs"].as_array().unwrap();
    assert_eq!(outputs.len(), 1);
    assert_eq!(outputs[0]["type"], "image");
    let url = outputs[0]["download_url"].as_str().unwrap();
    // A signed link: no credentials needed.
    let file = reqwest::get(url).await.unwrap();
    assert_eq!(file.status(), 200);
    assert_eq!(file.bytes().await.unwrap().as_ref(), tiny_png().as_slice());
}

#[tokio::test]
async fn streams_cloud_since_replays_missed_events_then_live() {
    let app = spawn_app().await;
    let t = app.tenant("acme").await;
    let mut ws = cloud_connect(&app.base, &t.admin_key).await;
    subscribe(&mut ws, &["job.*"]).await;
    let first = create_job(&app, &t).await;
    let accepted = next_json(&mut ws).await;
    let seen = accepted["id"].as_str().unwrap().to_string();
    drop(ws);
    cancel_job(&app, &t, first).await; // queued (already published) + cancelled missed
    let mut ws = cloud_connect(&app.base, &t.admin_key).await;
    send_json(
        &mut ws,
        json!({"type": "subscribe", "data": {"events": ["job.*"], "since": seen}}),
    )
    .await;
    assert_eq!(next_json(&mut ws).await["type"], "subscribed");
    let queued = next_json(&mut ws).await;
    assert_eq!(queued["data"]["event"], "job.queued");
    let cancelled = next_json(&mut ws).await;
    assert_eq!(cancelled["data"]["event"], "job.cancelled");
    let second = create_job(&app, &t).await;
    let live = next_json(&mut ws).await;
    assert_eq!(live["data"]["event"], "job.accepted");
    assert_eq!(live["data"]["payload"]["id"], second.to_string());
}

#[tokio::test]
async fn streams_cloud_tenants_see_only_their_own_events() {
    let app = spawn_app().await;
    let a = app.tenant("acme").await;
    let b = app.tenant("bravo").await;
    let mut ws_b = cloud_connect(&app.base, &b.admin_key).await;
    subscribe(&mut ws_b, &["*"]).await;
    let job_a = create_job(&app, &a).await;
    app.state
        .publisher
        .progress(a.id, job_a, &progress_state(job_a, 50))
        .await;
    cancel_job(&app, &a, job_a).await;
    let job_b = create_job(&app, &b).await;
    let first = next_json(&mut ws_b).await;
    assert_eq!(first["data"]["payload"]["id"], job_b.to_string());
}

// ------------------------------------------------------------ SSE

/// Reads a `text/event-stream` body event by event.
struct SseReader {
    body: std::pin::Pin<Box<dyn futures_util::Stream<Item = reqwest::Result<Bytes>> + Send>>,
    buf: String,
}

#[derive(Debug)]
enum Sse {
    Data { id: Option<String>, data: Value },
    Comment,
    End,
}

impl SseReader {
    fn new(resp: reqwest::Response) -> Self {
        Self {
            body: Box::pin(resp.bytes_stream()),
            buf: String::new(),
        }
    }

    async fn next(&mut self) -> Sse {
        loop {
            if let Some(at) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..at + 2).collect();
                let mut id = None;
                let mut data = None;
                for line in block.lines() {
                    if let Some(c) = line.strip_prefix(':') {
                        let _ = c;
                        return Sse::Comment;
                    } else if let Some(v) = line.strip_prefix("id: ") {
                        id = Some(v.to_string());
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        data = Some(serde_json::from_str(v).expect("data is JSON"));
                    }
                }
                return Sse::Data {
                    id,
                    data: data.expect("an event has data"),
                };
            }
            match timeout(DEADLINE, self.body.next())
                .await
                .expect("an SSE chunk before the deadline")
            {
                Some(chunk) => self
                    .buf
                    .push_str(std::str::from_utf8(&chunk.unwrap()).unwrap()),
                None => {
                    assert!(self.buf.trim().is_empty(), "leftover {:?}", self.buf);
                    return Sse::End;
                }
            }
        }
    }

    async fn snapshot(&mut self) -> (Option<String>, Value) {
        match self.next().await {
            Sse::Data { id, data } => (id, data),
            other => panic!("expected a snapshot, got {other:?}"),
        }
    }
}

async fn sse(
    app_base: &str,
    http: &reqwest::Client,
    job: &str,
    headers: &[(&str, &str)],
) -> reqwest::Response {
    let mut req = http.get(format!("{app_base}/v1/workflow/{job}/subscribe"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send().await.unwrap()
}

#[tokio::test]
async fn streams_sse_needs_credentials_and_hides_other_tenants_jobs() {
    let app = spawn_app().await;
    let a = app.tenant("acme").await;
    let b = app.tenant("bravo").await;
    let job = create_job(&app, &a).await.to_string();
    expect_problem(sse(&app.base, &app.http, &job, &[]).await, 401).await;
    expect_problem(
        sse(
            &app.base,
            &app.http,
            &job,
            &[("authorization", "Bearer comfyui-nope")],
        )
        .await,
        401,
    )
    .await;
    let bearer_b = format!("Bearer {}", b.admin_key);
    expect_problem(
        sse(&app.base, &app.http, &job, &[("authorization", &bearer_b)]).await,
        404,
    )
    .await;
    let unknown = JobId::new().to_string();
    let bearer_a = format!("Bearer {}", a.admin_key);
    expect_problem(
        sse(
            &app.base,
            &app.http,
            &unknown,
            &[("authorization", &bearer_a)],
        )
        .await,
        404,
    )
    .await;
    expect_problem(
        sse(
            &app.base,
            &app.http,
            "not-an-id",
            &[("authorization", &bearer_a)],
        )
        .await,
        404,
    )
    .await;
}

#[tokio::test]
async fn streams_sse_sends_snapshots_until_the_terminal_one() {
    let app = spawn_app().await;
    let t = app.tenant("acme").await;
    let job = create_job(&app, &t).await;
    let bearer = format!("Bearer {}", t.admin_key);
    let resp = sse(
        &app.base,
        &app.http,
        &job.to_string(),
        &[("authorization", &bearer)],
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let mut reader = SseReader::new(resp);
    let (id, first) = reader.snapshot().await;
    assert!(id.is_some());
    assert_eq!(first["status"], "queued");
    assert_eq!(first["queue_number"], 1);
    assert_eq!(first["prompt"]["prompt_id"], job.to_string());
    assert_eq!(first["outputs"], json!([]));
    assert_eq!(first["cause"], Value::Null);
    assert_eq!(first["completed_at"], Value::Null);

    cancel_job(&app, &t, job).await;
    let (cancel_id, last) = reader.snapshot().await;
    assert_eq!(last["status"], "cancelled");
    assert!(last["completed_at"].is_string());
    assert!(cancel_id.unwrap().parse::<i64>().unwrap() > id.unwrap().parse::<i64>().unwrap());
    assert!(matches!(reader.next().await, Sse::End));
}

#[tokio::test]
async fn streams_sse_completed_snapshot_has_signed_output_links() {
    let app = spawn_app().await;
    let t = app.tenant("acme").await;
    let job = create_job(&app, &t).await;
    let key = format!("/v1/workflow/{job}/subscribe?api_key={}", t.admin_key);
    let resp = app.http.get(app.url(&key)).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut reader = SseReader::new(resp);
    assert_eq!(reader.snapshot().await.1["status"], "queued");
    let worker = claim(&app, job).await;
    let (_, running) = reader.snapshot().await;
    assert_eq!(running["status"], "running");
    assert!(running["started_at"].is_string());
    complete(&app, &t, worker, job).await;
    let (_, done) = reader.snapshot().await;
    assert_eq!(done["status"], "completed");
    let outputs = done["outputs"].as_array().unwrap();
    assert_eq!(outputs.len(), 1);
    assert_eq!(outputs[0]["workflow_id"], job.to_string());
    let src = outputs[0]["src"].as_str().unwrap();
    assert_eq!(reqwest::get(src).await.unwrap().status(), 200);
    assert!(matches!(reader.next().await, Sse::End));
}

#[tokio::test]
async fn streams_sse_last_event_id_resumes_after_what_was_seen() {
    let app = spawn_app().await;
    let t = app.tenant("acme").await;
    let job = create_job(&app, &t).await;
    let bearer = format!("Bearer {}", t.admin_key);
    let resp = sse(
        &app.base,
        &app.http,
        &job.to_string(),
        &[("authorization", &bearer)],
    )
    .await;
    let mut reader = SseReader::new(resp);
    let (id, queued) = reader.snapshot().await;
    assert_eq!(queued["status"], "queued");
    let id = id.unwrap();
    drop(reader);

    // Up to date: nothing is repeated; the next snapshot is the next change.
    let resp = sse(
        &app.base,
        &app.http,
        &job.to_string(),
        &[("authorization", &bearer), ("last-event-id", &id)],
    )
    .await;
    let mut reader = SseReader::new(resp);
    cancel_job(&app, &t, job).await;
    let (cancel_id, cancelled) = reader.snapshot().await;
    assert_eq!(cancelled["status"], "cancelled");
    assert!(matches!(reader.next().await, Sse::End));

    // Behind: one snapshot of where the job is now, then the end (it is terminal).
    let resp = sse(
        &app.base,
        &app.http,
        &job.to_string(),
        &[("authorization", &bearer), ("last-event-id", &id)],
    )
    .await;
    let mut reader = SseReader::new(resp);
    let (again_id, again) = reader.snapshot().await;
    assert_eq!(again["status"], "cancelled");
    assert_eq!(again_id, cancel_id);
    assert!(matches!(reader.next().await, Sse::End));

    // Seen the terminal one: the stream just ends.
    let resp = sse(
        &app.base,
        &app.http,
        &job.to_string(),
        &[
            ("authorization", &bearer),
            ("last-event-id", &cancel_id.unwrap()),
        ],
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert!(matches!(SseReader::new(resp).next().await, Sse::End));
}

// ------------------------------------------------------------ across pods

#[tokio::test]
async fn streams_reach_clients_on_another_pod() {
    let app = spawn_app().await;
    let peer = app.spawn_peer().await;
    let t = app.tenant("acme").await;
    let mut session = session(&peer.base, &t.admin_key, "").await;
    let mut cloud = cloud_connect(&peer.base, &t.admin_key).await;
    subscribe(&mut cloud, &["job.*"]).await;

    let job = create_job(&app, &t).await; // on pod A
    let bearer = format!("Bearer {}", t.admin_key);
    let resp = app
        .http
        .get(peer.url(&format!("/v1/workflow/{job}/subscribe")))
        .header("authorization", &bearer)
        .send()
        .await
        .unwrap();
    let mut sse_reader = SseReader::new(resp);
    assert_eq!(sse_reader.snapshot().await.1["status"], "queued");

    let accepted = next_json(&mut session).await;
    assert_eq!(accepted["type"], "job.accepted");
    assert_eq!(accepted["data"]["prompt_id"], job.to_string());
    let cloud_accepted = next_json(&mut cloud).await;
    assert_eq!(cloud_accepted["data"]["payload"]["id"], job.to_string());

    app.state
        .publisher
        .preview(t.id, job, 1, "9", "image/png", Bytes::from(tiny_png()))
        .await;
    // Skip job.queued, then the preview.
    assert_eq!(next_json(&mut session).await["type"], "job.queued");
    match next_message(&mut session).await {
        Message::Binary(bytes) => assert_eq!(bytes.as_ref(), tiny_png().as_slice()),
        other => panic!("expected the preview, got {other:?}"),
    }

    cancel_job(&app, &t, job).await; // on pod A
    assert_eq!(sse_reader.snapshot().await.1["status"], "cancelled");
    assert!(matches!(sse_reader.next().await, Sse::End));
}

/// Issue 6's "done when": a real job, run by a worker on a simulated ComfyUI, is
/// watched through three pods at once — session stream, cloud socket, SSE — from
/// queued to completed with its previews and outputs; the cloud client drops off
/// halfway and, resuming with `since`, misses nothing durable and sees nothing twice.
#[tokio::test]
async fn streams_three_clients_on_three_pods_follow_a_real_job() {
    let pod_a = spawn_app().await;
    let pod_b = pod_a.spawn_peer().await;
    let pod_c = pod_a.spawn_peer().await;
    let t = pod_a.tenant("acme").await;

    let mut session = session(&pod_b.base, &t.admin_key, "preview_meta=1").await;
    let mut cloud = cloud_connect(&pod_c.base, &t.admin_key).await;
    subscribe(&mut cloud, &["job.*"]).await;

    // Submitted on pod A while no worker runs, so every client sees it queued.
    let job: Value = pod_a
        .create_job(
            &t.admin_key,
            json!({"workflow_id": "sdxl-txt2img", "params": {"steps": 12, "width": 512, "height": 512}}),
        )
        .await;
    let id = job["id"].as_str().unwrap().to_string();
    let resp = pod_a
        .http
        .get(pod_b.url(&format!("/v1/workflow/{id}/subscribe")))
        .header("authorization", format!("Bearer {}", t.admin_key))
        .send()
        .await
        .unwrap();
    let mut sse_reader = SseReader::new(resp);
    assert_eq!(sse_reader.snapshot().await.1["status"], "queued");

    // The cloud client sees the job queued, then leaves before it runs.
    let mut cloud_seen: Vec<i64> = Vec::new();
    loop {
        let msg = next_json(&mut cloud).await;
        if msg["type"] == "event" && msg["data"]["payload"]["id"] == id.as_str() {
            cloud_seen.push(event_num(&msg));
            if msg["data"]["event"] == "job.queued" {
                break;
            }
        }
    }
    drop(cloud);

    let _worker = pod_a
        .start_worker(comfyfleet::sim::SimConfig {
            step_time: Duration::from_millis(40),
            ..Default::default()
        })
        .await;

    // Session stream on pod B: progress, previews (each announced), completion.
    let (mut previews, mut progress, mut session_events) = (0, 0, Vec::new());
    let mut announced = false;
    let mut completed = false;
    while !completed {
        match next_message(&mut session).await {
            Message::Text(text) => {
                let v: Value = serde_json::from_str(text.as_str()).unwrap();
                if v["type"] == "preview" {
                    assert_eq!(v["prompt_id"], id.as_str());
                    announced = true;
                } else if v.get("prompt_id").is_some() && v.get("percent").is_some() {
                    progress += 1;
                } else if v["data"]["prompt_id"] == id.as_str() {
                    session_events.push(v["type"].as_str().unwrap().to_string());
                    completed = v["type"] == "job.completed";
                }
            }
            Message::Binary(bytes) => {
                assert!(announced, "a preview_meta frame precedes each preview");
                assert_eq!(&bytes[..2], &[0xff, 0xd8], "raw JPEG");
                previews += 1;
                announced = false;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(
        previews >= 1 && progress >= 1,
        "previews {previews}, progress {progress}"
    );
    assert_eq!(
        session_events,
        ["job.accepted", "job.queued", "job.started", "job.completed"]
    );

    // SSE on pod B: running, then the completed snapshot with a working link, then end.
    let mut statuses = Vec::new();
    let last = loop {
        match sse_reader.next().await {
            Sse::Data { data, .. } => {
                statuses.push(data["status"].as_str().unwrap().to_string());
                if data["status"] == "completed" {
                    break data;
                }
            }
            Sse::Comment => {}
            Sse::End => panic!("ended before completion: {statuses:?}"),
        }
    };
    assert!(statuses.contains(&"running".to_string()), "{statuses:?}");
    let src = last["outputs"][0]["src"].as_str().unwrap();
    let png = reqwest::get(src).await.unwrap().bytes().await.unwrap();
    assert_eq!(&png[..4], b"\x89PNG");
    assert!(matches!(sse_reader.next().await, Sse::End));

    // The cloud client comes back on pod C and resumes after the last id it saw.
    let mut cloud = cloud_connect(&pod_c.base, &t.admin_key).await;
    let since = *cloud_seen.last().unwrap();
    send_json(
        &mut cloud,
        json!({"type": "subscribe", "data": {"events": ["job.*"], "since": format!("evt_{since}")}}),
    )
    .await;
    loop {
        let msg = next_json(&mut cloud).await;
        if msg["type"] == "event"
            && msg["data"]["payload"]["id"] == id.as_str()
            && msg["data"]["event"] != "job.progress"
        {
            cloud_seen.push(event_num(&msg));
            if msg["data"]["event"] == "job.completed" {
                assert!(
                    msg["data"]["payload"]["outputs"][0]["download_url"].is_string(),
                    "{msg}"
                );
                break;
            }
        }
    }
    let log: Vec<i64> = pod_a
        .store
        .list_events(
            t.id,
            &comfyfleet::store::events::EventQuery {
                since: Some(0),
                kind: None,
                job: Some(id.parse().unwrap()),
                limit: 100,
            },
        )
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(cloud_seen, log, "every durable event once, in order");
}

/// Without `since`, a session client is attached by the time its handshake ends:
/// a job it creates right after connecting is announced to it.
#[tokio::test]
async fn streams_session_is_attached_when_the_handshake_ends() {
    let app = spawn_app().await;
    let t = app.tenant("acme").await;
    for _ in 0..5 {
        let mut ws = ws_connect(&app.base, "/api/run/ws", &[("x-api-key", &t.admin_key)]).await;
        let job = create_job(&app, &t).await;
        let first = next_json(&mut ws).await;
        assert_eq!(first["type"], "job.accepted", "{first}");
        assert_eq!(first["data"]["prompt_id"], job.to_string());
    }
}

#[tokio::test]
async fn streams_events_published_out_of_log_order_arrive_in_log_order() {
    let app = spawn_app().await;
    let t = app.tenant("acme").await;
    let mut ws = cloud_connect(&app.base, &t.admin_key).await;
    subscribe(&mut ws, &["job.*"]).await;
    // The pod's feed passes on its first event as it comes: it has nothing to
    // compare it with yet.
    create_job(&app, &t).await;
    for _ in 0..2 {
        next_json(&mut ws).await;
    }
    // Committed but not yet published, as a worker's or another pod's would be.
    let submitted = app
        .store
        .submit_job(t.id, crate::jobs::new_job(None))
        .await
        .unwrap();
    let comfyfleet::store::jobs::Submitted::Created(job, events) = submitted else {
        panic!("expected a new job");
    };
    assert_eq!(events[1].prev_id, Some(events[0].id));
    // Two publishers racing: the later event reaches Redis first.
    app.state.publisher.events(&events[1..]).await;
    app.state.publisher.events(&events[..1]).await;
    let first = next_json(&mut ws).await;
    let second = next_json(&mut ws).await;
    assert_eq!(first["data"]["event"], "job.accepted");
    assert_eq!(second["data"]["event"], "job.queued");
    assert!(event_num(&first) < event_num(&second));
    assert_eq!(second["data"]["payload"]["id"], job.id.to_string());
}

//! The cloud jobs API, the event log and the queue view.

use serde_json::{Value, json};

use crate::support::{TestApp, TestTenant, expect_problem, spawn_app};

async fn create(app: &TestApp, t: &TestTenant, body: Value) -> reqwest::Response {
    app.http
        .post(app.url("/developer/api/v1/jobs"))
        .header("X-API-Key", &t.admin_key)
        .json(&body)
        .send()
        .await
        .unwrap()
}

async fn create_ok(app: &TestApp, t: &TestTenant, body: Value) -> Value {
    let resp = create(app, t, body).await;
    assert_eq!(resp.status(), 201);
    resp.json().await.unwrap()
}

async fn get(app: &TestApp, key: &str, path: &str) -> reqwest::Response {
    app.http
        .get(app.url(path))
        .header("X-API-Key", key)
        .send()
        .await
        .unwrap()
}

async fn get_json(app: &TestApp, key: &str, path: &str) -> Value {
    let resp = get(app, key, path).await;
    assert_eq!(resp.status(), 200, "GET {path}");
    resp.json().await.unwrap()
}

fn raw_graph() -> Value {
    json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "t"}}
    })
}

#[tokio::test]
async fn jobs_from_manifests_and_raw_graphs_are_queued_in_order() {
    let app = spawn_app().await;
    let t = app.tenant("acme").await;
    let a = create_ok(
        &app,
        &t,
        json!({"workflow_id": "solid-color", "params": {"width": 64}}),
    )
    .await;
    assert_eq!(a["status"], "queued");
    assert_eq!(a["queue_number"], 1);
    assert_eq!(a["workflow_id"], "solid-color");
    assert_eq!(a["outputs"], json!([]));
    let b = create_ok(&app, &t, json!({"workflow": raw_graph()})).await;
    assert_eq!(b["queue_number"], 2);
    assert!(b["workflow_id"].is_null());
    let c = create_ok(&app, &t, json!({"workflow": raw_graph()})).await;
    assert_eq!(c["queue_number"], 3);

    // Cancelling an earlier job moves the later ones up.
    let cancel = app
        .http
        .post(app.url(&format!(
            "/developer/api/v1/jobs/{}/cancel",
            a["id"].as_str().unwrap()
        )))
        .header("X-API-Key", &t.admin_key)
        .send()
        .await
        .unwrap();
    assert_eq!(cancel.status(), 200);
    let cancelled: Value = cancel.json().await.unwrap();
    assert_eq!(cancelled["status"], "cancelled");
    assert!(cancelled["queue_number"].is_null());
    assert!(cancelled["completed_at"].is_string());
    let b_now = get_json(
        &app,
        &t.admin_key,
        &format!("/developer/api/v1/jobs/{}", b["id"].as_str().unwrap()),
    )
    .await;
    assert_eq!(b_now["queue_number"], 1);
    let c_now = get_json(
        &app,
        &t.admin_key,
        &format!("/developer/api/v1/jobs/{}", c["id"].as_str().unwrap()),
    )
    .await;
    assert_eq!(c_now["queue_number"], 2);

    // Cancelling again is a conflict, not a silent success.
    let again = app
        .http
        .post(app.url(&format!(
            "/developer/api/v1/jobs/{}/cancel",
            a["id"].as_str().unwrap()
        )))
        .header("X-API-Key", &t.admin_key)
        .send()
        .await
        .unwrap();
    expect_problem(again, 409).await;
}

#[tokio::test]
async fn higher_priority_jumps_the_queue() {
    let app = spawn_app().await;
    let t = app.tenant("acme").await;
    let low = create_ok(&app, &t, json!({"workflow": raw_graph()})).await;
    let high = create_ok(&app, &t, json!({"workflow": raw_graph(), "priority": 10})).await;
    assert_eq!(high["queue_number"], 1);
    let low = get_json(
        &app,
        &t.admin_key,
        &format!("/developer/api/v1/jobs/{}", low["id"].as_str().unwrap()),
    )
    .await;
    assert_eq!(low["queue_number"], 2);
}

#[tokio::test]
async fn bad_submissions_are_400_naming_the_problem() {
    let app = spawn_app().await;
    let t = app.tenant("acme").await;
    let cases = [
        (json!({}), "workflow"),
        (
            json!({"workflow": raw_graph(), "workflow_id": "solid-color"}),
            "not both",
        ),
        (json!({"workflow": [1, 2]}), "object"),
        (json!({"workflow": {"1": {"inputs": {}}}}), "class_type"),
        (
            json!({"workflow": {"1": {"class_type": "ImageInvert", "inputs": {"image": ["9", 0]}}}}),
            "workflow.1",
        ),
        (
            json!({"workflow_id": "solid-color", "params": {"width": 0, "bogus": 1, "upscale_method": "x"}}),
            "params.width",
        ),
        (
            json!({"workflow": raw_graph(), "priority": 1000}),
            "priority",
        ),
        (
            json!({"workflow": {"1": {"class_type": "LoadImage", "inputs": {"image": "never-uploaded.png"}}}}),
            "never-uploaded.png",
        ),
    ];
    for (body, needle) in cases {
        let resp = create(&app, &t, body.clone()).await;
        let problem = expect_problem(resp, 400).await;
        assert!(problem.to_string().contains(needle), "{body} → {problem}");
    }
    let unknown = create(&app, &t, json!({"workflow_id": "no-such-workflow"})).await;
    expect_problem(unknown, 404).await;
    let traversal = create(&app, &t, json!({"workflow_id": "../../etc/passwd"})).await;
    expect_problem(traversal, 404).await;
    // Several bad params are all named at once.
    let resp = create(
        &app,
        &t,
        json!({"workflow_id": "solid-color", "params": {"width": 0, "bogus": 1}}),
    )
    .await;
    let problem = expect_problem(resp, 400).await;
    assert_eq!(problem["errors"].as_array().unwrap().len(), 2, "{problem}");
    // Nothing was queued by any of it.
    let page = get_json(&app, &t.admin_key, "/developer/api/v1/jobs").await;
    assert_eq!(page["jobs"], json!([]));
}

#[tokio::test]
async fn idempotency_key_returns_the_original_or_409() {
    let app = spawn_app().await;
    let t = app.tenant("acme").await;
    let send = |body: Value| {
        app.http
            .post(app.url("/developer/api/v1/jobs"))
            .header("X-API-Key", &t.admin_key)
            .header("Idempotency-Key", "retry-1")
            .json(&body)
            .send()
    };
    let first = send(json!({"workflow_id": "sdxl-txt2img"})).await.unwrap();
    assert_eq!(first.status(), 201);
    let first: Value = first.json().await.unwrap();
    let again = send(json!({"workflow_id": "sdxl-txt2img"})).await.unwrap();
    assert_eq!(again.status(), 200);
    let again: Value = again.json().await.unwrap();
    assert_eq!(again["id"], first["id"]);
    // The drawn seed is the original's, not a new draw.
    assert_eq!(again["seeds"], first["seeds"]);
    let other = send(json!({"workflow_id": "solid-color"})).await.unwrap();
    expect_problem(other, 409).await;
    let page = get_json(&app, &t.admin_key, "/developer/api/v1/jobs").await;
    assert_eq!(page["jobs"].as_array().unwrap().len(), 1, "ran once");
}

#[tokio::test]
async fn listing_filters_by_status_and_pages_with_a_cursor() {
    let app = spawn_app().await;
    let t = app.tenant("acme").await;
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(create_ok(&app, &t, json!({"workflow": raw_graph()})).await["id"].clone());
    }
    app.http
        .post(app.url(&format!(
            "/developer/api/v1/jobs/{}/cancel",
            ids[0].as_str().unwrap()
        )))
        .header("X-API-Key", &t.admin_key)
        .send()
        .await
        .unwrap();
    let mut seen = Vec::new();
    let mut path = "/developer/api/v1/jobs?limit=2".to_string();
    loop {
        let page = get_json(&app, &t.admin_key, &path).await;
        for j in page["jobs"].as_array().unwrap() {
            seen.push(j["id"].clone());
        }
        match page["next_cursor"].as_str() {
            Some(c) => path = format!("/developer/api/v1/jobs?limit=2&cursor={c}"),
            None => break,
        }
    }
    ids.reverse();
    assert_eq!(seen, ids, "newest first, each once");

    let queued = get_json(&app, &t.admin_key, "/developer/api/v1/jobs?status=queued").await;
    assert_eq!(queued["jobs"].as_array().unwrap().len(), 4);
    let cancelled = get_json(
        &app,
        &t.admin_key,
        "/developer/api/v1/jobs?status=cancelled,failed",
    )
    .await;
    assert_eq!(cancelled["jobs"].as_array().unwrap().len(), 1);

    for bad in ["?status=done", "?limit=0", "?limit=201", "?cursor=garbage"] {
        let resp = get(&app, &t.admin_key, &format!("/developer/api/v1/jobs{bad}")).await;
        expect_problem(resp, 400).await;
    }
}

#[tokio::test]
async fn long_poll_returns_a_finished_job_at_once_and_refuses_long_waits() {
    let app = spawn_app().await;
    let t = app.tenant("acme").await;
    let job = create_ok(&app, &t, json!({"workflow": raw_graph()})).await;
    let id = job["id"].as_str().unwrap();
    app.http
        .post(app.url(&format!("/developer/api/v1/jobs/{id}/cancel")))
        .header("X-API-Key", &t.admin_key)
        .send()
        .await
        .unwrap();
    let done = get_json(
        &app,
        &t.admin_key,
        &format!("/developer/api/v1/jobs/{id}?wait=30"),
    )
    .await;
    assert_eq!(done["status"], "cancelled");
    let resp = get(
        &app,
        &t.admin_key,
        &format!("/developer/api/v1/jobs/{id}?wait=61"),
    )
    .await;
    expect_problem(resp, 400).await;
}

#[tokio::test]
async fn long_poll_wakes_when_the_job_finishes() {
    let app = spawn_app().await;
    let t = app.tenant("acme").await;
    let job = create_ok(&app, &t, json!({"workflow": raw_graph()})).await;
    let id = job["id"].as_str().unwrap().to_string();
    let waiter = {
        let (http, url, key) = (
            app.http.clone(),
            app.url(&format!("/developer/api/v1/jobs/{id}?wait=30")),
            t.admin_key.clone(),
        );
        tokio::spawn(async move {
            http.get(url)
                .header("X-API-Key", key)
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        })
    };
    let cancel = app
        .http
        .post(app.url(&format!("/developer/api/v1/jobs/{id}/cancel")))
        .header("X-API-Key", &t.admin_key)
        .send()
        .await
        .unwrap();
    assert_eq!(cancel.status(), 200);
    let seen = tokio::time::timeout(std::time::Duration::from_secs(20), waiter)
        .await
        .expect("the long poll answers well before its 30 s")
        .unwrap();
    assert_eq!(seen["status"], "cancelled");
}

#[tokio::test]
async fn another_tenants_jobs_are_404_and_invisible() {
    let app = spawn_app().await;
    let a = app.tenant("tenant-a").await;
    let b = app.tenant("tenant-b").await;
    let job = create_ok(&app, &a, json!({"workflow": raw_graph()})).await;
    let id = job["id"].as_str().unwrap();
    let resp = get(&app, &b.admin_key, &format!("/developer/api/v1/jobs/{id}")).await;
    let body = expect_problem(resp, 404).await;
    assert!(!body.to_string().contains(id));
    let resp = app
        .http
        .post(app.url(&format!("/developer/api/v1/jobs/{id}/cancel")))
        .header("X-API-Key", &b.admin_key)
        .send()
        .await
        .unwrap();
    expect_problem(resp, 404).await;
    let listed = get_json(&app, &b.admin_key, "/developer/api/v1/jobs").await;
    assert_eq!(listed["jobs"], json!([]));
    let events = get_json(&app, &b.admin_key, "/api/admin/events").await;
    assert_eq!(events, json!([]));
    let queue = get_json(&app, &b.admin_key, "/api/admin/queue").await;
    assert_eq!(queue["queued"], json!([]));
    let status = get(&app, &b.admin_key, &format!("/api/run/status/{id}")).await;
    assert_eq!(status.status(), 404);
    // A's job is still there and still queued.
    let mine = get_json(&app, &a.admin_key, &format!("/developer/api/v1/jobs/{id}")).await;
    assert_eq!(mine["status"], "queued");
}

#[tokio::test]
async fn events_record_each_change_and_resume_with_since() {
    let app = spawn_app().await;
    let t = app.tenant("acme").await;
    let job = create_ok(&app, &t, json!({"workflow_id": "solid-color"})).await;
    let id = job["id"].as_str().unwrap();
    let all = get_json(&app, &t.admin_key, "/api/admin/events?type=job.*").await;
    let kinds: Vec<&str> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["job.accepted", "job.queued"]);
    for e in all.as_array().unwrap() {
        assert!(e["id"].as_str().unwrap().starts_with("evt_"));
        assert_eq!(e["data"]["prompt_id"], id);
        assert!(["info", "success", "warning", "error"].contains(&e["severity"].as_str().unwrap()));
        assert!(e["timestamp"].is_string() && e["message"].is_string());
    }
    let last = all[1]["id"].as_str().unwrap().to_string();
    app.http
        .post(app.url(&format!("/developer/api/v1/jobs/{id}/cancel")))
        .header("X-API-Key", &t.admin_key)
        .send()
        .await
        .unwrap();
    let after = get_json(
        &app,
        &t.admin_key,
        &format!("/api/admin/events?since={last}"),
    )
    .await;
    let kinds: Vec<&str> = after
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["job.cancelled"]);
    let only = get_json(&app, &t.admin_key, "/api/admin/events?type=job.cancelled").await;
    assert_eq!(only.as_array().unwrap().len(), 1);
    let latest = get_json(&app, &t.admin_key, "/api/admin/events?limit=1").await;
    assert_eq!(latest[0]["type"], "job.cancelled");
    for bad in ["?since=evt_x", "?type=job.*.x", "?limit=0"] {
        let resp = get(&app, &t.admin_key, &format!("/api/admin/events{bad}")).await;
        expect_problem(resp, 400).await;
    }
}

#[tokio::test]
async fn the_queue_view_lists_waiting_and_finished_jobs() {
    let app = spawn_app().await;
    let t = app.tenant("acme").await;
    let a = create_ok(&app, &t, json!({"workflow": raw_graph()})).await;
    let b = create_ok(&app, &t, json!({"workflow": raw_graph()})).await;
    app.http
        .post(app.url(&format!(
            "/developer/api/v1/jobs/{}/cancel",
            a["id"].as_str().unwrap()
        )))
        .header("X-API-Key", &t.admin_key)
        .send()
        .await
        .unwrap();
    let q = get_json(&app, &t.admin_key, "/api/admin/queue").await;
    assert_eq!(q["running"], json!([]));
    assert_eq!(q["queued"].as_array().unwrap().len(), 1);
    assert_eq!(q["queued"][0]["id"], b["id"]);
    assert_eq!(q["recent"][0]["id"], a["id"]);
    assert_eq!(q["recent"][0]["status"], "cancelled");
}

/// A job for the store's submit, with an idempotency key when given.
pub(crate) fn new_job(key: Option<(&str, u8)>) -> comfyfleet::store::jobs::NewJob {
    comfyfleet::store::jobs::NewJob {
        idempotency_key: key.map(|(k, _)| k.to_string()),
        request_digest: key.map(|(_, d)| [d; 32]),
        ..comfyfleet::store::jobs::NewJob::raw(
            raw_graph(),
            vec!["EmptyImage".into(), "SaveImage".into()],
        )
    }
}

#[tokio::test]
async fn concurrent_submits_share_a_transaction_and_each_gets_its_own_answer() {
    use comfyfleet::store::StoreError;
    use comfyfleet::store::jobs::Submitted;

    let app = spawn_app().await;
    let t = app.tenant("acme").await;
    let taken = new_job(None);
    let taken_id = taken.id;
    assert!(matches!(
        app.store.submit_job(t.id, taken).await.unwrap(),
        Submitted::Created(..)
    ));

    // Submitted together: the first starts the tenant's committer, which runs only
    // once all of them are waiting, so they go in as one batch.
    let mut jobs: Vec<_> = (0..30).map(|_| new_job(None)).collect();
    jobs.push(new_job(Some(("same", 1))));
    jobs.push(new_job(Some(("same", 1))));
    jobs.push(new_job(Some(("same", 2))));
    let mut collides = new_job(None);
    collides.id = taken_id;
    jobs.push(collides);
    let results =
        futures_util::future::join_all(jobs.into_iter().map(|j| app.store.submit_job(t.id, j)))
            .await;

    let mut event_ids = Vec::new();
    let mut queue_numbers = Vec::new();
    for result in &results[..31] {
        let Ok(Submitted::Created(job, events)) = result else {
            panic!("expected a new job, got {result:?}");
        };
        let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
        assert_eq!(kinds, ["job.accepted", "job.queued"]);
        assert!(events.iter().all(|e| e.job_id == Some(job.id)));
        assert_eq!(events[1].data["queue_number"], json!(job.queue_number));
        event_ids.extend(events.iter().map(|e| e.id));
        queue_numbers.push(job.queue_number.unwrap());
    }
    // The log holds them in submission order, and so do the queue positions.
    assert!(event_ids.windows(2).all(|w| w[0] < w[1]), "{event_ids:?}");
    assert_eq!(queue_numbers, (2..=32).collect::<Vec<i64>>());
    let Ok(Submitted::Created(original, _)) = &results[30] else {
        unreachable!()
    };
    match &results[31] {
        Ok(Submitted::Replayed(job)) => assert_eq!(job.id, original.id),
        other => panic!("the same key and request should replay, got {other:?}"),
    }
    assert!(matches!(results[32], Ok(Submitted::KeyReused)));
    assert!(matches!(results[33], Err(StoreError::Conflict(_))));

    let page = get_json(&app, &t.admin_key, "/developer/api/v1/jobs?limit=200").await;
    assert_eq!(
        page["jobs"].as_array().unwrap().len(),
        32,
        "nothing twice, nothing lost"
    );
    let log = get_json(&app, &t.admin_key, "/api/admin/events?type=job.*&limit=500").await;
    assert_eq!(log.as_array().unwrap().len(), 64);
}

#[tokio::test]
async fn racing_appends_each_name_the_event_just_before_them_in_the_log() {
    use comfyfleet::store::Store;
    use comfyfleet::store::events::EventQuery;
    use comfyfleet::store::jobs::Submitted;
    use std::collections::HashMap;

    let app = spawn_app().await;
    let t = app.tenant("acme").await;
    // Separate stores have separate intakes: their transactions race for the
    // tenant's log lock instead of sharing one.
    let mut stores = Vec::new();
    for _ in 0..4 {
        let config = app.db.args().resolve().unwrap();
        stores.push(Store::connect(&config).await.unwrap());
    }
    let submits = stores
        .iter()
        .flat_map(|s| (0..12).map(|_| s.submit_job(t.id, new_job(None))));
    let mut prev_of = HashMap::new();
    for result in futures_util::future::join_all(submits).await {
        let Ok(Submitted::Created(_, events)) = result else {
            panic!("expected a new job, got {result:?}");
        };
        for e in events {
            prev_of.insert(
                e.id,
                e.prev_id.expect("an appended event knows its predecessor"),
            );
        }
    }
    assert_eq!(prev_of.len(), 96);

    let log = app
        .store
        .list_events(
            t.id,
            &EventQuery {
                since: Some(0),
                limit: 1000,
                ..EventQuery::default()
            },
        )
        .await
        .unwrap();
    // What a pod's feed relies on to hold an event until its predecessor arrives.
    let mut before = 0;
    for e in &log {
        if let Some(prev) = prev_of.get(&e.id) {
            assert_eq!(
                *prev, before,
                "event {} names {prev}, the log has {before} before it",
                e.id
            );
        }
        before = e.id;
    }
}

#[tokio::test]
async fn a_completion_claims_the_workers_next_job_in_the_same_commit() {
    use comfyfleet::domain::job::JobStatus;
    use comfyfleet::store::claims::Capabilities;
    use comfyfleet::store::jobs::Submitted;
    use std::time::Duration;

    let app = spawn_app().await;
    let (a, b) = (app.tenant("acme").await, app.tenant("bravo").await);
    let worker = app.register_worker().await;
    let caps = Capabilities {
        node_classes: vec!["EmptyImage".into(), "SaveImage".into()],
        models: vec![],
    };
    let lease = Duration::from_secs(30);
    let submit = |tenant| {
        let store = app.store.clone();
        async move {
            match store.submit_job(tenant, new_job(None)).await.unwrap() {
                Submitted::Created(job, events) => (job.id, events),
                other => panic!("expected a new job, got {other:?}"),
            }
        }
    };
    let (first, _) = submit(a.id).await;
    let (second, second_events) = submit(b.id).await;
    let claimed = app.store.claim_job(worker, &caps, lease).await.unwrap();
    assert_eq!(claimed.map(|c| c.job.id), Some(first));

    // Another tenant's job next: each tenant's log gets its own event.
    let done = app
        .store
        .complete_job_and_claim(
            worker,
            a.id,
            first,
            &[],
            |_| json!([]),
            Some((&caps, lease)),
        )
        .await
        .unwrap()
        .expect("the worker holds the first job");
    assert_eq!(done.job.status, JobStatus::Completed);
    let kinds: Vec<&str> = done.events.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds, ["job.completed"]);
    assert_eq!(done.events[0].tenant_id, a.id);
    let next = done
        .next
        .expect("the queued job is claimed with the completion");
    assert_eq!(next.job.id, second);
    assert_eq!(next.job.status, JobStatus::Running);
    assert_eq!(next.events.len(), 1);
    assert_eq!(next.events[0].kind, "job.started");
    assert_eq!(next.events[0].tenant_id, b.id);
    assert_eq!(
        next.events[0].prev_id,
        Some(second_events[1].id),
        "b's log continues"
    );

    // The same tenant's job next: one append, the start right after the completion.
    let (third, _) = submit(b.id).await;
    let done = app
        .store
        .complete_job_and_claim(
            worker,
            b.id,
            second,
            &[],
            |_| json!([]),
            Some((&caps, lease)),
        )
        .await
        .unwrap()
        .expect("the worker holds the second job");
    let next = done.next.expect("the third job is claimed");
    assert_eq!(next.job.id, third);
    assert_eq!(next.events[0].prev_id, Some(done.events[0].id));

    // Nothing left to claim: the completion alone.
    let done = app
        .store
        .complete_job_and_claim(
            worker,
            b.id,
            third,
            &[],
            |_| json!([]),
            Some((&caps, lease)),
        )
        .await
        .unwrap()
        .expect("the worker holds the third job");
    assert!(done.next.is_none());
    assert_eq!(done.job.status, JobStatus::Completed);
}

#[tokio::test]
async fn a_pooled_connection_cut_while_idle_is_replaced_before_use() {
    use comfyfleet::config::DatabaseConfig;
    use comfyfleet::store::Store;
    use std::time::Duration;

    let app = spawn_app().await;
    let t = app.tenant("acme").await;
    // One connection per store, so the one cut is the one handed out next.
    let one_connection = |ping_if_idle_for| DatabaseConfig {
        max_connections: 1,
        ping_if_idle_for,
        ..app.db.args().resolve().unwrap()
    };
    let checked = Store::connect(&one_connection(Duration::ZERO))
        .await
        .unwrap();
    let unchecked = Store::connect(&one_connection(Duration::from_secs(3600)))
        .await
        .unwrap();

    for store in [&checked, &unchecked] {
        let (pid,): (i32,) = sqlx::query_as("SELECT pg_backend_pid()")
            .fetch_one(store.pool())
            .await
            .unwrap();
        // sqlx checks a connection on its way back into the pool, in a task of its
        // own: the cut must come after that, while the connection sits idle.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while store.pool().num_idle() != 1 {
            assert!(
                std::time::Instant::now() < deadline,
                "never back in the pool"
            );
            tokio::task::yield_now().await;
        }
        // As a database restart or a proxy's idle timeout would.
        let (cut,): (bool,) = sqlx::query_as("SELECT pg_terminate_backend($1)")
            .bind(pid)
            .fetch_one(app.store.pool())
            .await
            .unwrap();
        assert!(cut);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let (left,): (i64,) =
                sqlx::query_as("SELECT count(*) FROM pg_stat_activity WHERE pid = $1")
                    .bind(pid)
                    .fetch_one(app.store.pool())
                    .await
                    .unwrap();
            if left == 0 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "backend {pid} lingers"
            );
            tokio::task::yield_now().await;
        }
    }

    // Idle past its threshold: pinged, found dead, replaced; the caller sees nothing.
    assert_eq!(checked.count_active_jobs(t.id).await.unwrap(), 0);
    // Idle less than its threshold: used as it is, and the cut shows as one failed
    // call. That is the price of not pinging a busy pool's connections.
    assert!(unchecked.count_active_jobs(t.id).await.is_err());
}

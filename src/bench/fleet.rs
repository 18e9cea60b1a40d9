//! The scenarios that need a whole fleet: `jobs` (jobs submitted over HTTP, run by
//! `sim` workers, watched on the cloud WebSocket) and `storm` (the pod restarted
//! under connected clients, which reconnect and resume from the event log).
//!
//! The bench starts the API pod as a child process ([`Pod`]) and, like `comfyfleet
//! dev`, runs the simulated ComfyUIs and their workers in its own process against the
//! pod's database and Redis prefix: the workers claim, run and finish jobs exactly
//! as deployed workers do, and a pod restart does not touch them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::stream::FuturesUnordered;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::pod::Pod;
use super::report::{BackSteps, JobFigures, Report, ServerFigures, StormFigures};
use super::stats::{Backoff, Delivery, Latencies, event_frame};
use super::system::{ServerProcs, cpu_percent};
use super::target::{ClientSocket, client_config};
use crate::commands::CommandError;
use crate::config::DatabaseArgs;
use crate::domain::ids::{TenantId, WorkerId};
use crate::domain::job::JobStatus;
use crate::files::storage::{Files, FilesLocation};
use crate::publish::Publisher;
use crate::sim::{SimConfig, SimHandle};
use crate::store::Store;
use crate::store::events::{EventQuery, KindFilter};
use crate::store::jobs::{NewJob, Submitted};
use crate::worker::comfy::ComfyClient;
use crate::worker::{Worker, WorkerSettings};

/// How long the bench waits for submitted jobs to finish (and clients to catch up)
/// before it counts what is missing.
const DRAIN: Duration = Duration::from_secs(30);
/// After the jobs are done, storm clients are waited for while deliveries keep
/// arriving, until none has arrived for this long...
const CATCH_UP_STALL: Duration = Duration::from_secs(5);
/// ...or this long has passed.
const CATCH_UP_LIMIT: Duration = Duration::from_secs(180);
/// How long every client has to come back after a restart.
const RESUME_DEADLINE: Duration = Duration::from_secs(120);
/// Warm-up submits in flight at once.
const WARM_UP_CONCURRENCY: usize = 16;
/// Clients connecting at the same time at the start.
const CONNECT_CONCURRENCY: usize = 128;

/// The smallest graph that still runs a node and saves an output.
fn tiny_graph() -> Value {
    json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "bench"}}
    })
}

fn invalid(message: impl Into<String>) -> CommandError {
    CommandError::Invalid(message.into())
}

/// Simulated ComfyUIs with near-zero node time, each with a worker, in this process.
pub struct Fleet {
    _sims: Vec<SimHandle>,
    pub store: Store,
}

impl Fleet {
    pub async fn start(
        pod: &Pod,
        publisher: &Publisher,
        workers: usize,
        shutdown: &CancellationToken,
        tasks: &TaskTracker,
    ) -> Result<Self, CommandError> {
        let db = DatabaseArgs {
            database_url: Some(pod.database_url().to_owned()),
            db_max_connections: Some((4 * workers + 4).to_string()),
        };
        let store = Store::connect(&db.resolve()?).await?;
        let files = Files::open(&FilesLocation::Memory)
            .await
            .map_err(|e| invalid(format!("the workers' file store: {e}")))?;
        let mut sims = Vec::with_capacity(workers);
        for _ in 0..workers {
            let sim = crate::sim::spawn(SimConfig {
                step_time: Duration::ZERO,
                node_time: Duration::ZERO,
                previews: false,
                ..SimConfig::default()
            })
            .await?;
            let worker = Worker {
                id: WorkerId::new(),
                store: store.clone(),
                files: files.clone(),
                publisher: publisher.clone(),
                comfy: ComfyClient::new(&sim.url()).map_err(|e| invalid(e.to_string()))?,
                settings: WorkerSettings::default(),
            };
            let stop = shutdown.clone();
            tasks.spawn(async move {
                if let Err(e) = worker.run(stop).await {
                    tracing::error!(error = %e, "bench worker stopped");
                }
            });
            sims.push(sim);
        }
        Ok(Self { _sims: sims, store })
    }
}

/// Where the pod is and who the bench is to it.
#[derive(Clone)]
pub struct PodAccess {
    pub http_base: String,
    pub ws_base: String,
    pub api_key: String,
    pub tenant: TenantId,
}

/// How long each step of opening an events socket took, from the call.
#[derive(Clone, Copy, Debug, Default)]
pub struct OpenPhases {
    /// TCP connect and the WebSocket upgrade (the API key checked) done.
    pub upgraded: Duration,
    /// The pod's `connected` greeting read.
    pub greeted: Duration,
    /// The `subscribed` reply read.
    pub subscribed: Duration,
}

async fn open_events_socket(pod: &PodAccess, since: Option<i64>) -> Result<ClientSocket, String> {
    open_events_socket_timed(pod, since).await.map(|(s, _)| s)
}

async fn open_events_socket_timed(
    pod: &PodAccess,
    since: Option<i64>,
) -> Result<(ClientSocket, OpenPhases), String> {
    let start = Instant::now();
    let mut phases = OpenPhases::default();
    let url = format!(
        "{}/developer/api/v1/ws?api_key={}",
        pod.ws_base, pod.api_key
    );
    let (mut socket, _) =
        tokio_tungstenite::connect_async_with_config(url, Some(client_config()), true)
            .await
            .map_err(|e| format!("connect: {e}"))?;
    phases.upgraded = start.elapsed();
    wait_text(&mut socket, "\"connected\"").await?;
    phases.greeted = start.elapsed();
    let mut data = json!({"events": ["job.*"]});
    if let Some(since) = since {
        data["since"] = json!(format!("evt_{since}"));
    }
    socket
        .send(Message::text(
            json!({"type": "subscribe", "data": data}).to_string(),
        ))
        .await
        .map_err(|e| format!("subscribe: {e}"))?;
    wait_text(&mut socket, "\"subscribed\"").await?;
    phases.subscribed = start.elapsed();
    Ok((socket, phases))
}

async fn wait_text(socket: &mut ClientSocket, marker: &str) -> Result<(), String> {
    let wait = async {
        while let Some(msg) = socket.next().await {
            match msg.map_err(|e| e.to_string())? {
                Message::Text(t) if t.as_str().contains(marker) => return Ok(()),
                Message::Close(_) => return Err("closed before subscribing".to_owned()),
                _ => {}
            }
        }
        Err("closed before subscribing".to_owned())
    };
    tokio::time::timeout(Duration::from_secs(60), wait)
        .await
        .map_err(|_| format!("no {marker} within 60 s"))?
}

/// Options of `jobs`.
pub struct JobsParams {
    pub jobs: usize,
    pub concurrency: usize,
}

/// When each job was submitted, acknowledged and finished.
#[derive(Default)]
struct JobTimes {
    submitted: HashMap<String, (Instant, Instant)>,
    finished: HashMap<String, (Instant, bool)>,
}

/// `jobs`: K jobs through `POST /developer/api/v1/jobs` (a raw graph; the job and
/// its `job.accepted`/`job.queued` events are committed before the 201), C submits in
/// flight, spread round robin over the tenants; completion observed on each tenant's
/// cloud WebSocket.
pub async fn jobs(
    tenants: &[PodAccess],
    procs: Option<&ServerProcs>,
    params: &JobsParams,
    report: &mut Report,
) -> Result<(), CommandError> {
    let times = Arc::new(Mutex::new(JobTimes::default()));
    let finished_count = Arc::new(AtomicU64::new(0));
    let stop = CancellationToken::new();
    let mut watchers = Vec::with_capacity(tenants.len());
    let mut clients = Vec::with_capacity(tenants.len());
    for pod in tenants {
        let observer = open_events_socket(pod, None)
            .await
            .map_err(|e| invalid(format!("the observer's WebSocket: {e}")))?;
        watchers.push(tokio::spawn(watch_completions(
            observer,
            times.clone(),
            finished_count.clone(),
            stop.clone(),
        )));
        clients.push(submit_client(pod, params.concurrency)?);
    }
    report.clients = tenants.len() as u64;
    report.connected = tenants.len() as u64;
    let url = format!("{}/developer/api/v1/jobs", tenants[0].http_base);
    let body = json!({ "workflow": tiny_graph() }).to_string();
    let before = procs.map(ServerProcs::sample).unwrap_or_default();
    let me = ServerProcs::only(&[std::process::id()]);
    let me_before = me.sample();

    let start = Instant::now();
    let mut intake = Latencies::new();
    let mut errors = 0u64;
    let mut first_error = None;
    let mut accepted = 0u64;
    let mut last_ack = start;
    let mut inflight = FuturesUnordered::new();
    let mut next = 0;
    while next < params.jobs || !inflight.is_empty() {
        while next < params.jobs && inflight.len() < params.concurrency {
            let http = clients[next % clients.len()].clone();
            let (url, body) = (url.clone(), body.clone());
            inflight.push(async move {
                let sent = Instant::now();
                let result = submit(&http, &url, body).await;
                (sent, Instant::now(), result)
            });
            next += 1;
        }
        if let Some((sent, acked, result)) = inflight.next().await {
            match result {
                Ok(id) => {
                    accepted += 1;
                    last_ack = last_ack.max(acked);
                    intake.record(acked.duration_since(sent).as_micros() as u64);
                    times
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .submitted
                        .insert(id, (sent, acked));
                }
                Err(e) => {
                    errors += 1;
                    first_error.get_or_insert(e);
                }
            }
        }
    }
    let intake_secs = last_ack.duration_since(start).as_secs_f64().max(1e-3);
    let deadline = Instant::now() + DRAIN;
    while finished_count.load(Ordering::Relaxed) < accepted && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let after = procs.map(ServerProcs::sample).unwrap_or_default();
    report.load_generator_cpu_percent = cpu_percent(&me_before, &me.sample());
    stop.cancel();
    for watcher in watchers {
        let _ = watcher.await;
    }

    let unseen = {
        let t = times.lock().unwrap_or_else(|e| e.into_inner());
        t.submitted
            .keys()
            .find(|id| !t.finished.contains_key(*id))
            .cloned()
    };
    if let Some(id) = unseen {
        // What the pod says of it, for whoever investigates (another tenant's job is
        // a 404, so each tenant is asked).
        for http in &clients {
            if let Ok(resp) = http.get(format!("{url}/{id}")).send().await
                && resp.status().is_success()
            {
                let body = resp.text().await.unwrap_or_default();
                tracing::warn!(job = %id, %body, "a job whose end was not seen");
                break;
            }
        }
    }
    let times = times.lock().unwrap_or_else(|e| e.into_inner());
    let mut e2e = Latencies::new();
    let (mut completed, mut failed) = (0u64, 0u64);
    let mut last_done = start;
    for (id, (sent, _)) in &times.submitted {
        if let Some((done, ok)) = times.finished.get(id) {
            if *ok {
                completed += 1;
                e2e.record(done.duration_since(*sent).as_micros() as u64);
                last_done = last_done.max(*done);
            } else {
                failed += 1;
            }
        }
    }
    let e2e_secs = last_done.duration_since(start).as_secs_f64().max(1e-3);
    report.published = accepted;
    report.publish_errors = errors;
    report.offered_per_sec = accepted as f64 / intake_secs;
    report.expected = accepted;
    report.delivered = completed;
    report.lost = accepted.saturating_sub(completed + failed);
    report.window_secs = e2e_secs;
    report.delivered_per_sec = completed as f64 / e2e_secs;
    report.latency = e2e.summary();
    report.connect_error = first_error.map(|e| format!("submit: {e}"));
    report.jobs = Some(JobFigures {
        submitted: params.jobs as u64,
        accepted,
        submit_errors: errors,
        intake_per_sec: accepted as f64 / intake_secs,
        intake_latency: intake.summary(),
        completed,
        failed,
        unfinished: accepted.saturating_sub(completed + failed),
        end_to_end_per_sec: completed as f64 / e2e_secs,
        end_to_end_latency: e2e.summary(),
    });
    if procs.is_some() {
        report.server = Some(ServerFigures::new(&before, &after, after.rss_kib, 1));
    }
    Ok(())
}

/// An HTTP client that presents the bench's API key.
fn submit_client(pod: &PodAccess, connections: usize) -> Result<reqwest::Client, CommandError> {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        "x-api-key",
        reqwest::header::HeaderValue::from_str(&pod.api_key)
            .map_err(|e| invalid(format!("the API key: {e}")))?,
    );
    reqwest::Client::builder()
        .default_headers(headers)
        .pool_max_idle_per_host(connections)
        .build()
        .map_err(|e| invalid(format!("HTTP client: {e}")))
}

/// Runs `jobs` jobs through the fleet before anything is measured, waits for them to
/// finish, then has Postgres refresh its statistics, as `pgbench` vacuums before it
/// measures. Without it every figure is of a database younger than autovacuum's
/// first visit: the plans a connection keeps for its prepared statements are then
/// made for empty tables, and a job looked up by id walked the tenant's whole index
/// range (1,400 buffers per lookup, the top of Postgres's profile).
pub async fn warm_up(pod: &PodAccess, store: &Store, jobs: usize) -> Result<(), CommandError> {
    if jobs == 0 {
        return Ok(());
    }
    let http = submit_client(pod, WARM_UP_CONCURRENCY)?;
    let url = format!("{}/developer/api/v1/jobs", pod.http_base);
    let body = json!({ "workflow": tiny_graph() }).to_string();
    let submitted: Vec<_> = futures_util::stream::iter(0..jobs)
        .map(|_| submit(&http, &url, body.clone()))
        .buffer_unordered(WARM_UP_CONCURRENCY)
        .collect()
        .await;
    if let Some(Err(e)) = submitted.into_iter().find(Result::is_err) {
        return Err(invalid(format!("a warm-up job was refused: {e}")));
    }
    let unfinished = [
        JobStatus::Accepted,
        JobStatus::Uploaded,
        JobStatus::Queued,
        JobStatus::Running,
    ];
    let deadline = Instant::now() + DRAIN;
    while !store
        .list_jobs(pod.tenant, &unfinished, None, 1)
        .await?
        .is_empty()
    {
        if Instant::now() >= deadline {
            return Err(invalid("the warm-up jobs did not finish within 30 s"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    store.analyze().await?;
    Ok(())
}

async fn submit(http: &reqwest::Client, url: &str, body: String) -> Result<String, String> {
    let resp = http
        .post(url)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = resp.status();
    let bytes = resp.bytes().await.map_err(|e| e.to_string())?;
    if !status.is_success() {
        return Err(format!(
            "{status}: {}",
            String::from_utf8_lossy(&bytes[..bytes.len().min(200)])
        ));
    }
    let view: Value = serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
    view["id"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| "the reply has no job id".to_owned())
}

async fn watch_completions(
    mut socket: ClientSocket,
    times: Arc<Mutex<JobTimes>>,
    count: Arc<AtomicU64>,
    stop: CancellationToken,
) {
    loop {
        let msg = tokio::select! {
            _ = stop.cancelled() => break,
            msg = socket.next() => msg,
        };
        let text = match msg {
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(Message::Close(frame))) => {
                tracing::warn!(?frame, "the observer's socket was closed");
                break;
            }
            Some(Ok(_)) => continue,
            other => {
                tracing::warn!(?other, "the observer's socket ended");
                break;
            }
        };
        let now = Instant::now();
        let Some(frame) = event_frame(text.as_bytes()) else {
            continue;
        };
        let ok = match frame.kind.as_str() {
            "job.completed" => true,
            "job.failed" | "job.cancelled" | "job.invalid" => false,
            _ => continue,
        };
        if let Some(job) = frame.job {
            let mut t = times.lock().unwrap_or_else(|e| e.into_inner());
            if t.finished.insert(job, (now, ok)).is_none() {
                count.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Options of `storm`.
pub struct StormParams {
    pub clients: usize,
    /// Jobs submitted per second while the storm runs (each appends durable events).
    pub rate: f64,
    /// Seconds of load; the pod is killed at a third of it.
    pub duration: Duration,
}

/// What the clients share.
#[derive(Default)]
struct StormShared {
    /// Clients subscribed again after the restart.
    resumed: AtomicU64,
    /// Distinct durable events received, over all clients.
    received: AtomicU64,
    /// Reconnect attempts that failed (refused while the pod was down, etc.).
    failed_attempts: AtomicU64,
    first_reconnect_error: Mutex<Option<String>>,
}

/// One client's run: what it saw, and whether it came back.
#[derive(Default)]
struct ClientRun {
    delivery: Delivery,
    came_back: Option<Instant>,
    /// The highest `since` the client resubscribed with.
    resumed_from: Option<i64>,
    /// The attempt that brought it back: when it began, and its steps.
    return_attempt: Option<(Instant, OpenPhases)>,
}

/// `storm`: N clients subscribed to `job.*` while jobs run; the pod is killed
/// (SIGKILL, as a crash or an OOM kill would) and started again on the same port;
/// every client reconnects with backoff and resubscribes with `since` = the last
/// event id it saw. Afterwards each client's ids are compared with the event log.
pub async fn storm(
    pod: &mut Pod,
    access: &PodAccess,
    publisher: &Publisher,
    store: &Store,
    params: &StormParams,
    report: &mut Report,
) -> Result<(), CommandError> {
    let shared = Arc::new(StormShared::default());
    let killed_at: Arc<Mutex<Option<Instant>>> = Arc::default();
    let access = Arc::new(PodAccess {
        http_base: access.http_base.clone(),
        ws_base: access.ws_base.clone(),
        api_key: access.api_key.clone(),
        tenant: access.tenant,
    });
    // Connect everyone first.
    let sockets: Vec<_> = futures_util::stream::iter(0..params.clients)
        .map(|_| {
            let a = access.clone();
            async move { open_events_socket(&a, None).await }
        })
        .buffered(CONNECT_CONCURRENCY)
        .collect()
        .await;
    report.clients = params.clients as u64;
    let stop = CancellationToken::new();
    let mut clients = Vec::new();
    for socket in sockets {
        match socket {
            Ok(s) => clients.push(tokio::spawn(storm_client(
                s,
                access.clone(),
                shared.clone(),
                killed_at.clone(),
                stop.clone(),
            ))),
            Err(e) => {
                report.connect_error.get_or_insert(e);
            }
        }
    }
    let connected = clients.len() as u64;
    report.connected = connected;
    if connected == 0 {
        return Err(invalid(format!(
            "no client could connect: {}",
            report.connect_error.clone().unwrap_or_default()
        )));
    }

    // Durable events: jobs submitted the way an API pod submits them (the job and
    // its events in one transaction, then published), from this process so they
    // keep coming while the pod under test is down; the workers run them.
    let run_start = Instant::now();
    let producing = CancellationToken::new();
    let producer = tokio::spawn(produce(
        store.clone(),
        publisher.clone(),
        access.tenant,
        params.rate,
        producing.clone(),
    ));
    {
        let producing = producing.clone();
        let duration = params.duration;
        tokio::spawn(async move {
            tokio::time::sleep(duration).await;
            producing.cancel();
        });
    }
    tokio::time::sleep(params.duration / 3).await;

    let kill = Instant::now();
    *killed_at.lock().unwrap_or_else(|e| e.into_inner()) = Some(kill);
    pod.restart().await?;
    let ready = kill.elapsed();
    let deadline = Instant::now() + RESUME_DEADLINE;
    while shared.resumed.load(Ordering::Relaxed) < connected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let resumed = shared.resumed.load(Ordering::Relaxed);
    producing.cancelled().await;
    let submitted = producer.await.unwrap_or(0);

    // Every submitted job finished, then every client caught up with the log.
    let deadline = Instant::now() + DRAIN;
    let mut log = durable_log(store, access.tenant).await?;
    while terminal_count(&log) < submitted && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        log = durable_log(store, access.tenant).await?;
    }
    let expected = log.len() as u64 * connected;
    // Clients may still be catching up (a storm can leave millions of deliveries
    // queued): wait while they make progress, so what is counted missing is missing.
    let mut last = (shared.received.load(Ordering::Relaxed), Instant::now());
    let give_up = Instant::now() + CATCH_UP_LIMIT;
    while last.0 < expected && last.1.elapsed() < CATCH_UP_STALL && Instant::now() < give_up {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let received = shared.received.load(Ordering::Relaxed);
        if received > last.0 {
            last = (received, Instant::now());
        }
    }
    stop.cancel();

    let mut delivery = Delivery::default();
    let mut missed = 0u64;
    let mut missed_behind_resume = 0u64;
    let mut last_back = None;
    let mut back_after_kill = Latencies::new();
    let mut phases = PhaseLatencies::default();
    for c in clients {
        let Ok(run) = c.await else { continue };
        for (id, _) in log.iter().filter(|(id, _)| !run.delivery.has(*id as u64)) {
            missed += 1;
            if run.resumed_from.is_some_and(|since| *id <= since) {
                missed_behind_resume += 1;
            }
        }
        delivery.merge(&run.delivery);
        if let Some(t) = run.came_back {
            last_back = last_back.max(Some(t));
            back_after_kill.record(t.duration_since(kill).as_micros() as u64);
        }
        if let Some((began, steps)) = run.return_attempt {
            phases.record(began.saturating_duration_since(kill), steps);
        }
    }
    report.published = submitted;
    report.offered_per_sec = submitted as f64 / run_start.elapsed().as_secs_f64().max(1e-3);
    report.window_secs = run_start.elapsed().as_secs_f64();
    report.expected = expected;
    report.delivered = delivery.received;
    report.duplicates = delivery.duplicates;
    report.reordered = delivery.reordered;
    report.lost = missed;
    report.connect_error = report.connect_error.take().or_else(|| {
        shared
            .first_reconnect_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .map(|e| format!("first failed reconnect: {e}"))
    });
    report.latency = back_after_kill.summary();
    report.storm = Some(StormFigures {
        clients_resumed: resumed,
        pod_down_ms: ready.as_secs_f64() * 1000.0,
        all_back_ms: (resumed == connected)
            .then(|| last_back.map(|t| t.duration_since(kill).as_secs_f64() * 1000.0))
            .flatten(),
        back_after_kill: back_after_kill.summary(),
        back_by_step: phases.summary(),
        failed_reconnect_attempts: shared.failed_attempts.load(Ordering::Relaxed),
        jobs_submitted: submitted,
        durable_events: log.len() as u64,
        missed,
        missed_behind_resume,
        duplicates: delivery.duplicates,
    });
    Ok(())
}

/// Where each client's way back went: the wait before its successful attempt,
/// then that attempt's steps.
#[derive(Default)]
struct PhaseLatencies {
    waiting: Latencies,
    upgrade: Latencies,
    greeting: Latencies,
    subscribe: Latencies,
}

impl PhaseLatencies {
    fn record(&mut self, waited: Duration, steps: OpenPhases) {
        let us = |d: Duration| d.as_micros() as u64;
        self.waiting.record(us(waited));
        self.upgrade.record(us(steps.upgraded));
        self.greeting
            .record(us(steps.greeted.saturating_sub(steps.upgraded)));
        self.subscribe
            .record(us(steps.subscribed.saturating_sub(steps.greeted)));
    }

    fn summary(&self) -> BackSteps {
        BackSteps {
            waiting: self.waiting.summary(),
            upgrade: self.upgrade.summary(),
            greeting: self.greeting.summary(),
            subscribe: self.subscribe.summary(),
        }
    }
}

/// The tenant's durable `job.*` events, id and type, oldest first.
async fn durable_log(store: &Store, tenant: TenantId) -> Result<Vec<(i64, String)>, CommandError> {
    let mut all = Vec::new();
    let mut since = 0;
    loop {
        let page = store
            .list_events(
                tenant,
                &EventQuery {
                    since: Some(since),
                    kind: Some(KindFilter::Prefix("job.".into())),
                    job: None,
                    limit: 1000,
                },
            )
            .await?;
        let Some(last) = page.last() else { break };
        since = last.id;
        all.extend(page.into_iter().map(|e| (e.id, e.kind)));
    }
    Ok(all)
}

fn terminal_count(log: &[(i64, String)]) -> u64 {
    log.iter()
        .filter(|(_, kind)| {
            matches!(
                kind.as_str(),
                "job.completed" | "job.failed" | "job.cancelled" | "job.invalid"
            )
        })
        .count() as u64
}

/// Submits `rate` jobs a second until stopped; returns how many were committed.
async fn produce(
    store: Store,
    publisher: Publisher,
    tenant: TenantId,
    rate: f64,
    stop: CancellationToken,
) -> u64 {
    let start = Instant::now();
    let mut n = 0u64;
    let graph = tiny_graph();
    while !stop.is_cancelled() {
        let due = start + Duration::from_secs_f64(n as f64 / rate);
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep_until(due.into()) => {}
        }
        let new = NewJob::raw(graph.clone(), vec!["EmptyImage".into(), "SaveImage".into()]);
        match store.submit_job(tenant, new).await {
            Ok(Submitted::Created(_, events)) => {
                publisher.events(&events).await;
                crate::worker::control::wake(&publisher.bus, tenant).await;
                n += 1;
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "the storm's producer could not submit"),
        }
    }
    n
}

/// One storm client: reads, and after a drop reconnects with backoff and resumes
/// from the last event id it saw.
async fn storm_client(
    socket: ClientSocket,
    access: Arc<PodAccess>,
    shared: Arc<StormShared>,
    killed_at: Arc<Mutex<Option<Instant>>>,
    stop: CancellationToken,
) -> ClientRun {
    let mut run = ClientRun::default();
    let mut last_id: Option<i64> = None;
    let mut socket = Some(socket);
    let backoff = Backoff::default();
    loop {
        if let Some(mut s) = socket.take() {
            loop {
                let msg = tokio::select! {
                    _ = stop.cancelled() => return run,
                    msg = s.next() => msg,
                };
                let text = match msg {
                    Some(Ok(Message::Text(t))) => t,
                    Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                    Some(Ok(_)) => continue,
                };
                let Some(frame) = event_frame(text.as_bytes()) else {
                    continue;
                };
                let Some(id) = frame.id else { continue };
                let before = run.delivery.received;
                run.delivery.observe(id as u64, text.len());
                if run.delivery.received > before {
                    shared.received.fetch_add(1, Ordering::Relaxed);
                }
                last_id = Some(last_id.map_or(id, |l| l.max(id)));
            }
        }
        // Dropped: come back.
        tracing::debug!(?last_id, "dropped");
        let mut attempt = 0u32;
        loop {
            let delay = backoff.delay(attempt, rand::random::<f64>());
            tokio::select! {
                _ = stop.cancelled() => return run,
                _ = tokio::time::sleep(delay) => {}
            }
            let since = last_id.unwrap_or(0);
            let began = Instant::now();
            match open_events_socket_timed(&access, Some(since)).await {
                Ok((s, phases)) => {
                    run.resumed_from = run.resumed_from.max(Some(since));
                    let now = Instant::now();
                    if run.came_back.is_none()
                        && killed_at
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .is_some()
                    {
                        run.came_back = Some(now);
                        run.return_attempt = Some((began, phases));
                        shared.resumed.fetch_add(1, Ordering::Relaxed);
                    }
                    socket = Some(s);
                    break;
                }
                Err(e) => {
                    tracing::debug!(error = %e, attempt, "reconnect failed");
                    shared
                        .first_reconnect_error
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .get_or_insert(e);
                    shared.failed_attempts.fetch_add(1, Ordering::Relaxed);
                    attempt = attempt.saturating_add(1);
                }
            }
        }
    }
}

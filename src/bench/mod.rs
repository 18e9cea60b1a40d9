//! `comfyfleet bench SCENARIO`: the load generator. It opens real WebSocket
//! connections to a running server, drives load through the path production uses
//! (a worker-side [`Publisher`](crate::publish::Publisher) writing to Redis), and
//! measures on the receiving side: end-to-end latency from the publish time carried
//! in each message to the client's receive, in an HDR histogram.
//!
//! By default it starts the API pod itself (this binary, `api`, as a child process
//! over a database of its own) so one command reproduces a run and the pod's pid is
//! known for `/proc`; `--url …` drives an external pod instead, and `--target nchan`
//! drives nginx + nchan for the side-by-side (`scripts/bench-compare.sh`).
//!
//! Every run prints one table and writes one JSON file ([`report::Report`]).

mod fleet;
mod pod;
mod report;
mod scenarios;
pub mod stats;
mod system;
mod target;

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::json;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::commands::{CommandError, connect_publisher};
use crate::config::Secret;
use crate::domain::ids::{JobId, TenantId};
use pod::{Pod, PodSettings};
use report::Report;
use scenarios::{DeliverParams, Load};
use system::ServerProcs;
use target::{Comfyfleet, Nchan, Stream, Target};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// N clients of one tenant subscribed to `job.*`; R messages/s for that tenant.
    Fanout,
    /// N authenticated, subscribed, idle connections: RSS per connection.
    Idle,
    /// `fanout` with a share of the clients that stop reading.
    Slow,
    /// J jobs × R preview frames/s of SIZE bytes, W watchers per job.
    Previews,
    /// K jobs submitted over HTTP, run by W `sim` workers: intake and end to end.
    Jobs,
    /// N subscribed clients; the pod is killed and restarted; all reconnect and resume.
    Storm,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TargetKind {
    Comfyfleet,
    Nchan,
}

/// Options of `comfyfleet bench`.
#[derive(Clone, Debug, clap::Args)]
pub struct BenchArgs {
    #[arg(value_enum)]
    pub scenario: Scenario,
    #[arg(long, value_enum, default_value = "comfyfleet")]
    pub target: TargetKind,
    /// Client connections (previews: watchers per job, see --watchers).
    #[arg(long, default_value_t = 100)]
    pub clients: usize,
    /// Messages published per second (previews: frames per second per job).
    #[arg(long, default_value_t = 100.0)]
    pub rate: f64,
    /// Seconds of load (idle: seconds the connections are held).
    #[arg(long, default_value_t = 5.0)]
    pub duration: f64,
    /// Bytes per message as the client receives it (default 300; previews 102400).
    #[arg(long)]
    pub size: Option<usize>,
    /// slow: the share of clients that stop reading.
    #[arg(long, default_value_t = 0.1)]
    pub slow_share: f64,
    /// previews: concurrent jobs; jobs: jobs submitted (default 1000).
    #[arg(long)]
    pub jobs: Option<usize>,
    /// jobs, storm: `sim` workers (near-zero node time) the bench runs.
    #[arg(long, default_value_t = 4)]
    pub workers: usize,
    /// jobs: jobs run before the measured ones (then the database is analyzed, as
    /// autovacuum would have done in a running deployment); 0 measures a cold database.
    #[arg(long, default_value_t = 500)]
    pub warm_up: usize,
    /// jobs: submits in flight at once.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// jobs: tenants the jobs are spread over, round robin. Each tenant's event log
    /// is ordered on its own lock, so this shows whether one tenant's order bounds a
    /// run (BENCHMARKS.md: it did not).
    #[arg(long, default_value_t = 1)]
    pub tenants: usize,
    /// previews: watchers per job.
    #[arg(long, default_value_t = 5)]
    pub watchers: usize,
    /// An external comfyfleet pod (`http://host:port`) instead of starting one;
    /// needs --api-key, --tenant-id and the pod's --redis-prefix.
    #[arg(long)]
    pub url: Option<String>,
    #[arg(long, env = "BENCH_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    #[arg(long)]
    pub tenant_id: Option<String>,
    #[arg(long, default_value = "cf")]
    pub redis_prefix: String,
    /// nchan's nginx (`http://127.0.0.1:port`, serving /sub/{channel} and /pub/{channel}).
    #[arg(long)]
    pub nchan_url: Option<String>,
    /// Pids of the server under test, for CPU and RSS (their children are included);
    /// not needed when the bench starts the pod.
    #[arg(long = "server-pid")]
    pub server_pids: Vec<u32>,
    /// Where the bench creates the pod's database (a maintenance database URL).
    #[arg(
        long,
        env = "BENCH_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    pub database_url: String,
    #[arg(
        long,
        env = "BENCH_REDIS_URL",
        default_value = "redis://127.0.0.1:6379"
    )]
    pub redis_url: String,
    /// The JSON result file (default target/bench/<scenario>-<target>-<time>.json).
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// A free-form label kept in the JSON (e.g. the compare script's step).
    #[arg(long)]
    pub label: Option<String>,
}

fn invalid(message: impl Into<String>) -> CommandError {
    CommandError::Invalid(message.into())
}

impl BenchArgs {
    fn check(&self) -> Result<(), CommandError> {
        if self.clients == 0 {
            return Err(invalid("--clients must be at least 1"));
        }
        if !(self.rate.is_finite() && self.rate > 0.0) {
            return Err(invalid("--rate must be a positive number"));
        }
        if !(self.duration.is_finite() && self.duration > 0.0 && self.duration <= 3600.0) {
            return Err(invalid("--duration must be between 0 and 3600 seconds"));
        }
        if !(0.0..1.0).contains(&self.slow_share) {
            return Err(invalid("--slow-share must be in [0, 1)"));
        }
        if self.jobs == Some(0) || self.watchers == 0 {
            return Err(invalid("--jobs and --watchers must be at least 1"));
        }
        if self.workers == 0 || self.workers > 64 {
            return Err(invalid("--workers must be between 1 and 64"));
        }
        if self.concurrency == 0 || self.concurrency > 4096 {
            return Err(invalid("--concurrency must be between 1 and 4096"));
        }
        if self.tenants == 0 || self.tenants > 64 {
            return Err(invalid("--tenants must be between 1 and 64"));
        }
        if matches!(self.scenario, Scenario::Jobs | Scenario::Storm) {
            if self.target != TargetKind::Comfyfleet {
                return Err(invalid(
                    "--target nchan has no jobs and no event log: jobs and storm run on comfyfleet only",
                ));
            }
            if self.url.is_some() {
                return Err(invalid(
                    "--url is not supported by jobs and storm: the bench starts (and restarts) the pod and runs its workers",
                ));
            }
        }
        if self.target == TargetKind::Nchan && self.nchan_url.is_none() {
            return Err(invalid("--target nchan needs --nchan-url"));
        }
        Ok(())
    }

    fn jobs(&self) -> usize {
        self.jobs.unwrap_or(match self.scenario {
            Scenario::Jobs => 1000,
            _ => 4,
        })
    }

    fn size(&self) -> usize {
        self.size.unwrap_or(match self.scenario {
            Scenario::Previews => 100 * 1024,
            _ => 300,
        })
    }
}

/// Runs one scenario and reports it on `out` and in the JSON file.
pub async fn run(args: &BenchArgs, out: &mut impl Write) -> Result<(), CommandError> {
    args.check()?;
    let nofile = system::raise_nofile_limit();
    if (nofile as usize) < args.clients + 256 {
        tracing::warn!(
            nofile,
            clients = args.clients,
            "the open-file limit is below the client count"
        );
    }
    let shutdown = CancellationToken::new();
    let tasks = TaskTracker::new();
    let mut pod = None;
    if matches!(args.scenario, Scenario::Jobs | Scenario::Storm) {
        let result = run_fleet(args, out, &mut pod, &shutdown, &tasks).await;
        shutdown.cancel();
        tasks.close();
        if let Some(pod) = pod {
            pod.stop().await;
        }
        return result;
    }
    let result = async {
        let (target, pids) = build_target(args, &mut pod, &shutdown, &tasks).await?;
        let procs = (!pids.is_empty()).then(|| ServerProcs::with_children(&pids));
        let report = measure(args, &target, procs.as_ref()).await;
        report.print_table(out)?;
        let path = write_json(args, &report)?;
        writeln!(out, "wrote {}", path.display())?;
        Ok::<_, CommandError>(())
    }
    .await;
    shutdown.cancel();
    tasks.close();
    if let Some(pod) = pod {
        pod.stop().await;
    }
    result
}

/// `jobs` and `storm`: the bench's own pod, with `sim` workers in this process.
async fn run_fleet(
    args: &BenchArgs,
    out: &mut impl Write,
    slot: &mut Option<Pod>,
    shutdown: &CancellationToken,
    tasks: &TaskTracker,
) -> Result<(), CommandError> {
    let pod = slot.insert(
        Pod::start(PodSettings {
            admin_database_url: args.database_url.clone(),
            redis_url: args.redis_url.clone(),
        })
        .await?,
    );
    let redis = Secret::new(args.redis_url.clone());
    let (publisher, _) =
        connect_publisher(Some(&redis), &pod.redis_prefix, shutdown, tasks).await?;
    let workers = fleet::Fleet::start(pod, &publisher, args.workers, shutdown, tasks).await?;
    let access = fleet::PodAccess {
        http_base: format!("http://{}", pod.addr),
        ws_base: format!("ws://{}", pod.addr),
        api_key: pod.api_key.clone(),
        tenant: pod.tenant,
    };
    let scenario = format!("{:?}", args.scenario).to_lowercase();
    let mut report = Report::new(&scenario, "comfyfleet", args.label.clone(), json!({}));
    match args.scenario {
        Scenario::Jobs => {
            report.params = json!({
                "jobs": args.jobs(),
                "workers": args.workers,
                "concurrency": args.concurrency,
                "tenants": args.tenants,
                "endpoint": "POST /developer/api/v1/jobs",
                "warm_up_jobs": args.warm_up,
            });
            fleet::warm_up(&access, &workers.store, args.warm_up).await?;
            let mut tenants = vec![access];
            for i in 1..args.tenants {
                let (tenant, api_key) = pod.add_tenant(&format!("bench-{i}")).await?;
                tenants.push(fleet::PodAccess {
                    api_key,
                    tenant,
                    ..tenants[0].clone()
                });
            }
            let procs = ServerProcs::with_children(&pod.pid().into_iter().collect::<Vec<_>>());
            let params = fleet::JobsParams {
                jobs: args.jobs(),
                concurrency: args.concurrency,
            };
            fleet::jobs(&tenants, Some(&procs), &params, &mut report).await?;
        }
        _ => {
            report.params = json!({
                "clients": args.clients,
                "workers": args.workers,
                "jobs_per_sec": args.rate,
                "duration_secs": args.duration,
                "restart": "SIGKILL, then the same binary on the same port",
            });
            let params = fleet::StormParams {
                clients: args.clients,
                rate: args.rate,
                duration: Duration::from_secs_f64(args.duration),
            };
            fleet::storm(
                pod,
                &access,
                &publisher,
                &workers.store,
                &params,
                &mut report,
            )
            .await?;
        }
    }
    report.print_table(out)?;
    let path = write_json(args, &report)?;
    writeln!(out, "wrote {}", path.display())?;
    drop(workers);
    Ok(())
}

async fn build_target(
    args: &BenchArgs,
    pod: &mut Option<Pod>,
    shutdown: &CancellationToken,
    tasks: &TaskTracker,
) -> Result<(Target, Vec<u32>), CommandError> {
    if args.target == TargetKind::Nchan {
        let raw = args.nchan_url.as_deref().unwrap_or_default();
        let base = url::Url::parse(raw).map_err(|e| invalid(format!("--nchan-url: {e}")))?;
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(4)
            .build()
            .map_err(|e| invalid(format!("HTTP client: {e}")))?;
        let run = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
        let nchan = Nchan { base, http, run };
        return Ok((Target::Nchan(nchan), args.server_pids.clone()));
    }
    let (base, api_key, tenant, prefix, pids) = match &args.url {
        Some(url) => {
            let key = args
                .api_key
                .clone()
                .ok_or_else(|| invalid("--url needs --api-key"))?;
            let tenant: TenantId = args
                .tenant_id
                .as_deref()
                .ok_or_else(|| invalid("--url needs --tenant-id"))?
                .parse()
                .map_err(|_| invalid("--tenant-id is not a tenant id"))?;
            let base = url::Url::parse(url).map_err(|e| invalid(format!("--url: {e}")))?;
            (
                base,
                key,
                tenant,
                args.redis_prefix.clone(),
                args.server_pids.clone(),
            )
        }
        None => {
            let started = Pod::start(PodSettings {
                admin_database_url: args.database_url.clone(),
                redis_url: args.redis_url.clone(),
            })
            .await?;
            let base = url::Url::parse(&format!("http://{}", started.addr))
                .map_err(|e| invalid(e.to_string()))?;
            let found = (
                base,
                started.api_key.clone(),
                started.tenant,
                started.redis_prefix.clone(),
                started.pid().into_iter().collect(),
            );
            *pod = Some(started);
            found
        }
    };
    let redis = Secret::new(args.redis_url.clone());
    let (publisher, _) = connect_publisher(Some(&redis), &prefix, shutdown, tasks).await?;
    let mut ws = base;
    let _ = ws.set_scheme("ws");
    let ws_base = ws.as_str().trim_end_matches('/').to_owned();
    Ok((
        Target::Comfyfleet(Comfyfleet {
            ws_base,
            api_key,
            tenant,
            publisher,
        }),
        pids,
    ))
}

async fn measure(args: &BenchArgs, target: &Target, procs: Option<&ServerProcs>) -> Report {
    let duration = Duration::from_secs_f64(args.duration);
    let size = args.size();
    let scenario = format!("{:?}", args.scenario).to_lowercase();
    let mut params = json!({
        "clients": args.clients,
        "rate": args.rate,
        "duration_secs": args.duration,
        "size_bytes": size,
    });
    let mut report = Report::new(&scenario, target.name(), args.label.clone(), json!({}));
    match args.scenario {
        Scenario::Idle => {
            let streams = vec![Stream::Events; args.clients];
            scenarios::idle(target, procs, &streams, duration, &mut report).await;
        }
        Scenario::Fanout | Scenario::Slow => {
            let slow = if args.scenario == Scenario::Slow {
                params["slow_share"] = json!(args.slow_share);
                (args.clients as f64 * args.slow_share).round() as usize
            } else {
                0
            };
            let load = Load::Events {
                pad: target.pad_for(size),
            };
            let p = DeliverParams {
                streams: vec![Stream::Events; args.clients],
                slow,
                rate: args.rate,
                duration,
            };
            scenarios::deliver(target, procs, &load, &p, &mut report).await;
        }
        // Measured by `run_fleet`.
        Scenario::Jobs | Scenario::Storm => {}
        Scenario::Previews => {
            let n = args.jobs();
            params["jobs"] = json!(n);
            params["watchers_per_job"] = json!(args.watchers);
            params["clients"] = json!(n * args.watchers);
            params["rate"] = json!(args.rate * n as f64);
            let jobs: Vec<JobId> = (0..n).map(|_| JobId::new()).collect();
            let streams = (0..n * args.watchers)
                .map(|i| Stream::Previews(i % n))
                .collect();
            let load = Load::Previews { jobs, size };
            let p = DeliverParams {
                streams,
                slow: 0,
                rate: args.rate * n as f64,
                duration,
            };
            scenarios::deliver(target, procs, &load, &p, &mut report).await;
        }
    }
    report.params = params;
    report
}

fn write_json(args: &BenchArgs, report: &Report) -> Result<PathBuf, CommandError> {
    let path = args.json.clone().unwrap_or_else(|| {
        PathBuf::from("target/bench").join(format!(
            "{}-{}-{}.json",
            report.scenario, report.target, report.started_at
        ))
    });
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let json = serde_json::to_vec_pretty(report).map_err(|e| invalid(e.to_string()))?;
    std::fs::write(&path, json)?;
    Ok(path)
}

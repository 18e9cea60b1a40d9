//! One run's result: printed as one table, written as one JSON file.

use std::io::Write;

use serde::Serialize;
use serde_json::Value;

use super::stats::LatencySummary;
use super::system::{Machine, ProcSample, cpu_percent};
use super::target::ClientSocket;

#[derive(Debug, Serialize)]
pub struct Report {
    pub scenario: String,
    pub target: String,
    pub label: Option<String>,
    pub params: Value,
    pub machine: Machine,
    /// Unix time the run started.
    pub started_at: i64,
    pub clients: u64,
    pub connected: u64,
    pub connect_error: Option<String>,
    pub published: u64,
    pub publish_errors: u64,
    pub offered_per_sec: f64,
    /// Deliveries owed to the reading clients.
    pub expected: u64,
    pub delivered: u64,
    pub lost: u64,
    pub duplicates: u64,
    /// Deliveries that arrived after a later message (publishes overlap).
    pub reordered: u64,
    /// Reading clients whose socket the server closed (or that failed) mid-run.
    pub closed_by_server: u64,
    pub window_secs: f64,
    pub delivered_per_sec: f64,
    pub mb_per_sec: f64,
    pub avg_message_bytes: f64,
    pub latency: LatencySummary,
    pub server: Option<ServerFigures>,
    /// The bench's own CPU over the run (percent of one core): on a shared box the
    /// load generator competes with the server it measures.
    pub load_generator_cpu_percent: f64,
    /// `jobs`: intake and end to end.
    pub jobs: Option<JobFigures>,
    /// `storm`: the restart and the resume.
    pub storm: Option<StormFigures>,
}

/// `jobs`: intake is submit → the 201 (the job and its first events committed);
/// end to end is submit → `job.completed` received on the cloud WebSocket.
#[derive(Clone, Debug, Serialize)]
pub struct JobFigures {
    pub submitted: u64,
    pub accepted: u64,
    pub submit_errors: u64,
    pub intake_per_sec: f64,
    pub intake_latency: LatencySummary,
    pub completed: u64,
    pub failed: u64,
    /// Accepted jobs whose end was not seen before the drain deadline.
    pub unfinished: u64,
    pub end_to_end_per_sec: f64,
    pub end_to_end_latency: LatencySummary,
}

/// `storm`: every figure counted from the instant the pod was killed.
#[derive(Clone, Debug, Serialize)]
pub struct StormFigures {
    pub clients_resumed: u64,
    /// Kill → the new pod answers `/healthz`.
    pub pod_down_ms: f64,
    /// Kill → the last client subscribed again with `since` (none if some never did).
    pub all_back_ms: Option<f64>,
    /// Kill → each client subscribed again.
    pub back_after_kill: LatencySummary,
    /// The same, by step.
    pub back_by_step: BackSteps,
    /// Reconnects refused or failed (the pod was down) before they succeeded.
    pub failed_reconnect_attempts: u64,
    pub jobs_submitted: u64,
    /// `job.*` events in the log over the run.
    pub durable_events: u64,
    /// Durable events some client never received (over all clients; must be 0).
    pub missed: u64,
    /// Of those, events with an id below a `since` the client resumed from: it had
    /// seen a later event live before this one arrived (delivered out of id order).
    pub missed_behind_resume: u64,
    pub duplicates: u64,
}

/// A client's way back after the kill, step by step.
#[derive(Clone, Debug, Serialize)]
pub struct BackSteps {
    /// Kill → the start of the attempt that succeeded (refused attempts and backoff).
    pub waiting: LatencySummary,
    /// That attempt: TCP connect and WebSocket upgrade, the API key checked.
    pub upgrade: LatencySummary,
    /// Upgrade → the pod's `connected` greeting.
    pub greeting: LatencySummary,
    /// Greeting → `subscribed` (the subscribe with `since` sent and answered).
    pub subscribe: LatencySummary,
}

/// The server's CPU and memory over the run (all its processes together).
#[derive(Clone, Debug, Serialize)]
pub struct ServerFigures {
    /// Percent of one core (200 = two cores busy).
    pub cpu_percent: f64,
    pub rss_mib_before: f64,
    pub rss_mib_after: f64,
    pub rss_mib_peak: f64,
    /// (RSS after − RSS before) / connections, in KiB.
    pub rss_kib_per_connection: f64,
}

impl ServerFigures {
    pub fn new(before: &ProcSample, after: &ProcSample, peak_kib: u64, connections: u64) -> Self {
        let mib = |kib: u64| kib as f64 / 1024.0;
        let grown = after.rss_kib as f64 - before.rss_kib as f64;
        Self {
            cpu_percent: cpu_percent(before, after),
            rss_mib_before: mib(before.rss_kib),
            rss_mib_after: mib(after.rss_kib),
            rss_mib_peak: mib(peak_kib.max(after.rss_kib)),
            rss_kib_per_connection: if connections > 0 {
                grown / connections as f64
            } else {
                0.0
            },
        }
    }
}

impl Report {
    pub fn new(scenario: &str, target: &str, label: Option<String>, params: Value) -> Self {
        Self {
            scenario: scenario.to_owned(),
            target: target.to_owned(),
            label,
            params,
            machine: Machine::read(),
            started_at: chrono::Utc::now().timestamp(),
            clients: 0,
            connected: 0,
            connect_error: None,
            published: 0,
            publish_errors: 0,
            offered_per_sec: 0.0,
            expected: 0,
            delivered: 0,
            lost: 0,
            duplicates: 0,
            reordered: 0,
            closed_by_server: 0,
            window_secs: 0.0,
            delivered_per_sec: 0.0,
            mb_per_sec: 0.0,
            avg_message_bytes: 0.0,
            latency: LatencySummary::default(),
            server: None,
            load_generator_cpu_percent: 0.0,
            jobs: None,
            storm: None,
        }
    }

    pub fn note_connections(&mut self, sockets: &[Option<ClientSocket>], error: Option<String>) {
        self.clients = sockets.len() as u64;
        self.connected = sockets.iter().filter(|s| s.is_some()).count() as u64;
        self.connect_error = error;
    }

    /// The run as one table: a header line and a value line.
    pub fn print_table(&self, out: &mut impl Write) -> std::io::Result<()> {
        let server = self.server.as_ref();
        let f1 = |v: f64| format!("{v:.1}");
        let f2 = |v: f64| format!("{v:.2}");
        let cols: Vec<(&str, String)> = vec![
            ("scenario", self.scenario.clone()),
            ("target", self.target.clone()),
            ("clients", format!("{}/{}", self.connected, self.clients)),
            ("offered/s", f1(self.offered_per_sec)),
            ("delivered/s", f1(self.delivered_per_sec)),
            ("MB/s", f2(self.mb_per_sec)),
            ("p50ms", f2(self.latency.p50_ms)),
            ("p90ms", f2(self.latency.p90_ms)),
            ("p99ms", f2(self.latency.p99_ms)),
            ("p99.9ms", f2(self.latency.p999_ms)),
            ("maxms", f2(self.latency.max_ms)),
            ("lost", self.lost.to_string()),
            ("closed", self.closed_by_server.to_string()),
            ("cpu%", server.map_or("-".into(), |s| f1(s.cpu_percent))),
            ("benchCpu%", f1(self.load_generator_cpu_percent)),
            ("rssMiB", server.map_or("-".into(), |s| f1(s.rss_mib_after))),
            ("peakMiB", server.map_or("-".into(), |s| f1(s.rss_mib_peak))),
            (
                "KiB/conn",
                server.map_or("-".into(), |s| f1(s.rss_kib_per_connection)),
            ),
            (
                "load",
                format!(
                    "{:.2} {:.2} {:.2}",
                    self.machine.load_average[0],
                    self.machine.load_average[1],
                    self.machine.load_average[2]
                ),
            ),
        ];
        let widths: Vec<usize> = cols.iter().map(|(h, v)| h.len().max(v.len())).collect();
        let line = |pick: &dyn Fn(&(&str, String)) -> String| {
            cols.iter()
                .zip(&widths)
                .map(|(c, w)| format!("{:>w$}", pick(c), w = *w))
                .collect::<Vec<_>>()
                .join("  ")
        };
        writeln!(out, "{}", line(&|c| c.0.to_owned()))?;
        writeln!(out, "{}", line(&|c| c.1.clone()))?;
        if let Some(e) = &self.connect_error {
            writeln!(out, "first connect error: {e}")?;
        }
        if let Some(j) = &self.jobs {
            let l = |s: &LatencySummary| {
                format!(
                    "p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
                    s.p50_ms, s.p99_ms, s.max_ms
                )
            };
            writeln!(
                out,
                "intake: {}/{} accepted, {:.1} jobs/s, {}; {} submit errors",
                j.accepted,
                j.submitted,
                j.intake_per_sec,
                l(&j.intake_latency),
                j.submit_errors
            )?;
            writeln!(
                out,
                "end to end: {} completed, {} failed, {} unfinished, {:.1} jobs/s, {}",
                j.completed,
                j.failed,
                j.unfinished,
                j.end_to_end_per_sec,
                l(&j.end_to_end_latency)
            )?;
        }
        if let Some(s) = &self.storm {
            writeln!(
                out,
                "storm: {}/{} clients resumed; pod down {:.0} ms; all back {}; back p50 {:.0} ms, p99 {:.0} ms; {} failed reconnects",
                s.clients_resumed,
                self.connected,
                s.pod_down_ms,
                s.all_back_ms
                    .map_or("never".to_owned(), |ms| format!("{ms:.0} ms")),
                s.back_after_kill.p50_ms,
                s.back_after_kill.p99_ms,
                s.failed_reconnect_attempts
            )?;
            let b = &s.back_by_step;
            writeln!(
                out,
                "way back, p50/p99 ms: waiting {:.0}/{:.0}; upgrade {:.0}/{:.0}; greeting {:.0}/{:.0}; subscribe {:.0}/{:.0}",
                b.waiting.p50_ms,
                b.waiting.p99_ms,
                b.upgrade.p50_ms,
                b.upgrade.p99_ms,
                b.greeting.p50_ms,
                b.greeting.p99_ms,
                b.subscribe.p50_ms,
                b.subscribe.p99_ms
            )?;
            writeln!(
                out,
                "durable: {} jobs, {} job.* events in the log, missed {} ({} behind a resume point), duplicates {}",
                s.jobs_submitted, s.durable_events, s.missed, s.missed_behind_resume, s.duplicates
            )?;
        }
        Ok(())
    }
}

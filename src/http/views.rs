//! JSON views shared by several surfaces: a job as the cloud API and SSE show it,
//! and an event as seed 000 shows it.

use chrono::{DateTime, SecondsFormat, Utc};
use poem_openapi::Object;
use poem_openapi::types::Any;
use serde_json::Value;

use crate::store::events::StoredEvent;
use crate::store::jobs::Job;

/// A job (seed 003's status model).
#[derive(Debug, Clone, Object)]
pub struct JobView {
    pub id: String,
    /// accepted, uploaded, queued, running, completed, cancelled, invalid or failed.
    pub status: String,
    /// The manifest workflow, for jobs created from one.
    pub workflow_id: Option<String>,
    /// 1-based position among your queued jobs; null unless queued.
    pub queue_number: Option<i64>,
    pub priority: i32,
    /// Seed inputs and the values used.
    pub seeds: Any<Value>,
    /// Why it failed (`node_type`, `exception_type`, `exception_message`); null otherwise.
    pub cause: Option<Any<Value>>,
    pub outputs: Vec<OutputView>,
    /// True once a cancel was asked for while the job runs.
    pub cancel_requested: bool,
    /// Why a queued job cannot start yet (no worker online, or none offers a node
    /// class or model it needs); null when it is simply waiting its turn.
    pub queue_reason: Option<String>,
    pub created_at: DateTime<Utc>,
    pub queued_at: Option<DateTime<Utc>>,
    pub started_at: Option<DateTime<Utc>>,
    pub completed_at: Option<DateTime<Utc>>,
}

/// A file a job produced.
#[derive(Debug, Clone, Object)]
pub struct OutputView {
    pub id: String,
    /// image, video or file.
    #[oai(rename = "type")]
    pub kind: String,
    pub filename: String,
    pub content_type: String,
    pub size_bytes: i64,
    /// A short-lived signed link that needs no credentials.
    pub download_url: String,
}

impl JobView {
    pub fn new(job: &Job, outputs: Vec<OutputView>) -> Self {
        Self {
            id: job.id.to_string(),
            status: job.status.as_str().into(),
            workflow_id: job.workflow_id.clone(),
            queue_number: job.queue_number,
            priority: job.priority,
            seeds: Any(job.seeds.clone()),
            cause: job.cause.as_ref().map(|c| Any(c.public())),
            outputs,
            cancel_requested: job.cancel_requested_at.is_some(),
            queue_reason: None,
            created_at: job.created_at,
            queued_at: job.queued_at,
            started_at: job.started_at,
            completed_at: job.completed_at,
        }
    }
}

/// An event (seed 000's event object, as `GET /api/admin/events` returns it).
#[derive(Debug, Clone, Object)]
pub struct EventView {
    /// `evt_<n>`; `n` only grows, so `since=evt_<n>` resumes after it.
    pub id: String,
    /// Dotted type, e.g. `job.completed`.
    #[oai(rename = "type")]
    pub kind: String,
    /// ISO 8601, UTC.
    pub timestamp: String,
    /// info, success, warning or error.
    pub severity: String,
    pub message: String,
    pub data: Any<Value>,
}

impl From<&StoredEvent> for EventView {
    fn from(e: &StoredEvent) -> Self {
        Self {
            id: event_id(e.id),
            kind: e.kind.clone(),
            timestamp: e.created_at.to_rfc3339_opts(SecondsFormat::Millis, true),
            severity: e.severity.clone(),
            message: e.message.clone(),
            data: Any(e.data.clone()),
        }
    }
}

pub fn event_id(n: i64) -> String {
    format!("evt_{n}")
}

/// Reads `evt_<n>` or a bare `<n>`.
pub fn parse_event_id(raw: &str) -> Option<i64> {
    raw.strip_prefix("evt_")
        .unwrap_or(raw)
        .parse()
        .ok()
        .filter(|n: &i64| *n >= 0)
}

//! The event catalogue: the durable lifecycle events of jobs and inputs, in seed
//! 000's shape (`type`, `severity`, `message`, `data`). The store gives each its id
//! and timestamp when it is appended in the same transaction as the change it records.

use serde_json::{Value, json};

use super::ids::{InputId, JobId};
use super::job::FailureCause;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Severity {
    Info,
    Success,
    Warning,
    Error,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Success => "success",
            Severity::Warning => "warning",
            Severity::Error => "error",
        }
    }
}

/// An event about to be appended to the log.
#[derive(Clone, Debug, PartialEq)]
pub struct NewEvent {
    /// Dotted name, e.g. `job.completed`; what subscriptions match on.
    pub kind: &'static str,
    pub severity: Severity,
    pub message: String,
    pub data: Value,
    pub job: Option<JobId>,
}

/// What the job events say about their job.
pub struct JobFacts<'a> {
    pub id: JobId,
    pub workflow_id: Option<&'a str>,
}

impl JobFacts<'_> {
    fn data(&self, extra: Value) -> Value {
        let mut data = json!({
            "prompt_id": self.id.to_string(),
            "job_id": self.id.to_string(),
            "workflow_id": self.workflow_id,
        });
        if let (Value::Object(base), Value::Object(more)) = (&mut data, extra) {
            base.extend(more);
        }
        data
    }

    fn label(&self) -> String {
        match self.workflow_id {
            Some(w) => format!("{w} job {}", short(self.id)),
            None => format!("Job {}", short(self.id)),
        }
    }

    fn event(
        &self,
        kind: &'static str,
        severity: Severity,
        message: String,
        extra: Value,
    ) -> NewEvent {
        NewEvent {
            kind,
            severity,
            message,
            data: self.data(extra),
            job: Some(self.id),
        }
    }

    pub fn accepted(&self) -> NewEvent {
        self.event(
            "job.accepted",
            Severity::Info,
            format!("{} accepted", self.label()),
            json!({}),
        )
    }

    pub fn queued(&self, queue_number: Option<i64>) -> NewEvent {
        self.event(
            "job.queued",
            Severity::Info,
            format!("{} queued", self.label()),
            json!({ "queue_number": queue_number }),
        )
    }

    pub fn started(&self, worker: &str, attempt: i32) -> NewEvent {
        self.event(
            "job.started",
            Severity::Info,
            format!("{} started", self.label()),
            json!({ "status": "running", "worker_id": worker, "attempt": attempt }),
        )
    }

    /// `outputs` is the list clients get (ids, types, filenames).
    pub fn completed(&self, duration_secs: i64, outputs: Value) -> NewEvent {
        self.event(
            "job.completed",
            Severity::Success,
            format!("{} completed in {duration_secs}s", self.label()),
            json!({ "status": "completed", "duration": duration_secs, "outputs": outputs }),
        )
    }

    pub fn failed(&self, cause: &FailureCause) -> NewEvent {
        self.event(
            "job.failed",
            Severity::Error,
            format!(
                "{} failed: {}: {}",
                self.label(),
                cause.exception_type,
                cause.exception_message
            ),
            json!({ "status": "failed", "cause": cause.public(), "error": cause.exception_message }),
        )
    }

    pub fn requeued(&self, reason: &str, attempt: i32) -> NewEvent {
        self.event(
            "job.requeued",
            Severity::Warning,
            format!("{} requeued: {reason}", self.label()),
            json!({ "status": "queued", "reason": reason, "attempt": attempt }),
        )
    }

    pub fn cancelled(&self) -> NewEvent {
        self.event(
            "job.cancelled",
            Severity::Warning,
            format!("{} cancelled", self.label()),
            json!({ "status": "cancelled" }),
        )
    }
}

/// What the input events say about their input.
pub struct InputFacts<'a> {
    pub id: InputId,
    pub filename: &'a str,
}

impl InputFacts<'_> {
    fn data(&self, extra: Value) -> Value {
        let mut data = json!({ "id": self.id.to_string(), "filename": self.filename });
        if let (Value::Object(base), Value::Object(more)) = (&mut data, extra) {
            base.extend(more);
        }
        data
    }

    pub fn ready(&self, size_bytes: i64, content_type: &str) -> NewEvent {
        NewEvent {
            kind: "input.ready",
            severity: Severity::Success,
            message: format!("Input {} is ready", self.filename),
            data: self.data(json!({
                "status": "ready",
                "size_bytes": size_bytes,
                "content_type": content_type,
            })),
            job: None,
        }
    }

    pub fn failed(&self, error: &str) -> NewEvent {
        NewEvent {
            kind: "input.failed",
            severity: Severity::Error,
            message: format!("Input {} failed: {error}", self.filename),
            data: self.data(json!({ "status": "failed", "error": error })),
            job: None,
        }
    }
}

fn short(id: impl ToString) -> String {
    id.to_string().chars().take(8).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_events_name_the_job() {
        let id = JobId::new();
        let facts = JobFacts {
            id,
            workflow_id: Some("invert-image"),
        };
        let e = facts.queued(Some(3));
        assert_eq!(e.kind, "job.queued");
        assert_eq!(e.data["prompt_id"], id.to_string());
        assert_eq!(e.data["queue_number"], 3);
        assert_eq!(e.data["workflow_id"], "invert-image");
        assert_eq!(e.job, Some(id));
        assert!(e.message.contains("invert-image"));
    }
}

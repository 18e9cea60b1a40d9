//! The job state machine (seed 003's status set) and what a failed job says about why.
//!
//! Only this module decides whether a job may move from one status to another; the
//! store asks it before writing, so a bug elsewhere cannot resurrect a finished job.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// `accepted → uploaded → queued → running → completed | failed | cancelled`, plus
/// `invalid` for what validation rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    Accepted,
    Uploaded,
    Queued,
    Running,
    Completed,
    Failed,
    Cancelled,
    Invalid,
}

impl JobStatus {
    pub const ALL: [JobStatus; 8] = [
        JobStatus::Accepted,
        JobStatus::Uploaded,
        JobStatus::Queued,
        JobStatus::Running,
        JobStatus::Completed,
        JobStatus::Failed,
        JobStatus::Cancelled,
        JobStatus::Invalid,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Accepted => "accepted",
            JobStatus::Uploaded => "uploaded",
            JobStatus::Queued => "queued",
            JobStatus::Running => "running",
            JobStatus::Completed => "completed",
            JobStatus::Failed => "failed",
            JobStatus::Cancelled => "cancelled",
            JobStatus::Invalid => "invalid",
        }
    }

    /// A terminal job never changes again.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobStatus::Completed | JobStatus::Failed | JobStatus::Cancelled | JobStatus::Invalid
        )
    }

    /// Whether a job in `self` may move to `next`.
    pub fn can_become(self, next: JobStatus) -> bool {
        use JobStatus::*;
        match (self, next) {
            (Accepted, Uploaded | Queued | Invalid | Cancelled | Failed) => true,
            (Uploaded, Queued | Invalid | Cancelled | Failed) => true,
            (Queued, Running | Cancelled | Failed) => true,
            // Running → queued is the requeue of a job whose worker vanished.
            (Running, Completed | Failed | Cancelled | Queued) => true,
            _ => false,
        }
    }
}

impl fmt::Display for JobStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "unknown job status {0:?}; expected one of accepted, uploaded, queued, running, completed, failed, cancelled, invalid"
)]
pub struct UnknownStatus(pub String);

impl FromStr for JobStatus {
    type Err = UnknownStatus;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        JobStatus::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| UnknownStatus(s.to_string()))
    }
}

/// Why a job failed, in seed 003's shape.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailureCause {
    /// The graph node that raised, when a node did (ComfyUI's `node_id`). Kept for
    /// the ComfyUI dialect; the public shape ([`FailureCause::public`]) is seed 003's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_id: Option<String>,
    pub node_type: Option<String>,
    pub exception_type: String,
    pub exception_message: String,
}

impl FailureCause {
    /// Seed 003's `cause`: node type, exception type and message.
    pub fn public(&self) -> serde_json::Value {
        serde_json::json!({
            "node_type": self.node_type,
            "exception_type": self.exception_type,
            "exception_message": self.exception_message,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_states_are_final() {
        for from in JobStatus::ALL.into_iter().filter(|s| s.is_terminal()) {
            for to in JobStatus::ALL {
                assert!(!from.can_become(to), "{from} -> {to}");
            }
        }
    }

    #[test]
    fn the_happy_path_and_cancellation_are_allowed() {
        use JobStatus::*;
        for (a, b) in [
            (Accepted, Queued),
            (Queued, Running),
            (Running, Completed),
            (Queued, Cancelled),
            (Running, Cancelled),
            (Running, Queued),
        ] {
            assert!(a.can_become(b), "{a} -> {b}");
        }
        assert!(!Queued.can_become(Completed));
        assert!(!Running.can_become(Accepted));
    }

    #[test]
    fn statuses_round_trip() {
        for s in JobStatus::ALL {
            assert_eq!(s.as_str().parse::<JobStatus>().unwrap(), s);
        }
        assert!("done".parse::<JobStatus>().is_err());
    }
}

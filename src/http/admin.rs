//! `GET /api/admin/events` and `GET /api/admin/queue` (seed 000's Activity panel and
//! Queue page read these). "Admin" is the seed's name for the pages; any principal of
//! the tenant may read its own events and queue.

use poem::web::Data;
use poem_openapi::param::Query;
use poem_openapi::payload::Json;
use poem_openapi::{Object, OpenApi};

use super::problem::ApiError;
use super::security::Auth;
use super::views::{EventView, JobView, parse_event_id};
use super::{ApiTags, AppState};
use crate::domain::job::JobStatus;
use crate::store::events::{EventQuery, KindFilter};

pub struct AdminApi;

const MAX_EVENTS: i64 = 500;
const RECENT_JOBS: i64 = 20;

/// A worker of the fleet, as tenants may see it (no internal addresses).
#[derive(Debug, Object)]
pub struct WorkerView {
    pub id: String,
    pub pool: String,
    /// idle, busy or draining.
    pub status: String,
    pub comfyui_version: Option<String>,
    /// Node classes its ComfyUI offers.
    pub node_classes: Vec<String>,
    /// Model files its ComfyUI has.
    pub models: Vec<String>,
    pub started_at: chrono::DateTime<chrono::Utc>,
    pub last_heartbeat_at: chrono::DateTime<chrono::Utc>,
}

/// Workers seen within this many seconds are listed.
const FRESH_WORKER_SECS: i64 = 60;

#[derive(Debug, Object)]
pub struct QueueView {
    /// Running jobs.
    pub running: Vec<JobView>,
    /// Waiting jobs in the order they will run (`queue_number` 1 first).
    pub queued: Vec<JobView>,
    /// The most recently created finished jobs.
    pub recent: Vec<JobView>,
}

/// `job.completed` → exact; `job.*` → prefix `job.`; `*` → everything.
fn kind_filter(raw: Option<&str>) -> Result<Option<KindFilter>, ApiError> {
    let Some(raw) = raw.map(str::trim).filter(|s| !s.is_empty()) else {
        return Ok(None);
    };
    let valid = raw.len() <= 64
        && raw
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '*'));
    if !valid {
        return Err(ApiError::bad_request(format!(
            "type {raw:?} is not an event type or pattern (e.g. job.completed, job.*, *)"
        )));
    }
    if raw == "*" {
        return Ok(None);
    }
    match raw.strip_suffix(".*") {
        Some(prefix) if !prefix.is_empty() && !prefix.contains('*') => {
            Ok(Some(KindFilter::Prefix(format!("{prefix}."))))
        }
        _ if !raw.contains('*') => Ok(Some(KindFilter::Exact(raw.to_string()))),
        _ => Err(ApiError::bad_request(format!(
            "type {raw:?}: a wildcard may only end a pattern, as in job.*"
        ))),
    }
}

#[OpenApi(prefix_path = "/api/admin", tag = "ApiTags::Activity")]
impl AdminApi {
    /// The tenant's event log: the newest `limit` events, or with `since` every
    /// event after that id (oldest first), optionally of one type or pattern.
    #[oai(path = "/events", method = "get", operation_id = "listEvents")]
    async fn events(
        &self,
        state: Data<&AppState>,
        auth: Auth,
        /// Exact type (`job.completed`) or pattern (`job.*`, `*`).
        #[oai(name = "type")]
        kind: Query<Option<String>>,
        /// Only events after this id (`evt_<n>` or `<n>`).
        since: Query<Option<String>>,
        /// 1 to 500, default 100.
        limit: Query<Option<i64>>,
    ) -> Result<Json<Vec<EventView>>, ApiError> {
        let limit = limit.0.unwrap_or(100);
        if !(1..=MAX_EVENTS).contains(&limit) {
            return Err(ApiError::bad_request(format!(
                "limit must be between 1 and {MAX_EVENTS}"
            )));
        }
        let since = match since.0.as_deref() {
            None => None,
            Some(raw) => Some(parse_event_id(raw).ok_or_else(|| {
                ApiError::bad_request(format!("since {raw:?} is not an event id (evt_<n>)"))
            })?),
        };
        let query = EventQuery {
            since,
            kind: kind_filter(kind.0.as_deref())?,
            job: None,
            limit,
        };
        let events = state
            .store
            .list_events(auth.principal().tenant_id, &query)
            .await?;
        Ok(Json(events.iter().map(EventView::from).collect()))
    }

    /// The worker fleet: every worker seen in the last minute, with what it can run.
    #[oai(path = "/workers", method = "get", operation_id = "listWorkers")]
    async fn workers(
        &self,
        state: Data<&AppState>,
        _auth: Auth,
    ) -> Result<Json<Vec<WorkerView>>, ApiError> {
        let workers = state.store.list_workers(FRESH_WORKER_SECS).await?;
        Ok(Json(
            workers
                .into_iter()
                .map(|w| WorkerView {
                    id: w.id.to_string(),
                    pool: w.pool,
                    status: w.status,
                    comfyui_version: w.comfyui_version,
                    node_classes: w.node_classes,
                    models: w.models,
                    started_at: w.started_at,
                    last_heartbeat_at: w.last_heartbeat_at,
                })
                .collect(),
        ))
    }

    /// The tenant's queue: running, waiting, and recently finished jobs.
    #[oai(path = "/queue", method = "get", operation_id = "getQueue")]
    async fn queue(&self, state: Data<&AppState>, auth: Auth) -> Result<Json<QueueView>, ApiError> {
        let tenant = auth.principal().tenant_id;
        let active = state.store.active_jobs(tenant).await?;
        let finished = state
            .store
            .list_jobs(
                tenant,
                &[
                    JobStatus::Completed,
                    JobStatus::Failed,
                    JobStatus::Cancelled,
                    JobStatus::Invalid,
                ],
                None,
                RECENT_JOBS,
            )
            .await?;
        let mut view = QueueView {
            running: Vec::new(),
            queued: Vec::new(),
            recent: Vec::new(),
        };
        for job in &active {
            let v = super::cloud::job_view(&state, job).await?;
            if job.status == JobStatus::Running {
                view.running.push(v);
            } else {
                view.queued.push(v);
            }
        }
        for job in &finished {
            view.recent.push(super::cloud::job_view(&state, job).await?);
        }
        Ok(Json(view))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_patterns() {
        assert!(
            matches!(kind_filter(Some("job.*")).unwrap(), Some(KindFilter::Prefix(p)) if p == "job.")
        );
        assert!(matches!(
            kind_filter(Some("job.completed")).unwrap(),
            Some(KindFilter::Exact(_))
        ));
        assert!(kind_filter(Some("*")).unwrap().is_none());
        for bad in ["job.*.x", "**", "JOB", "job;drop", "*.job"] {
            assert!(kind_filter(Some(bad)).is_err(), "{bad}");
        }
    }
}

//! Seed 003: `GET /v1/workflow/{id}/subscribe`, a job's full status snapshots over
//! Server-Sent Events.
//!
//! The job is looked up before the stream starts: 401 without valid credentials,
//! 404 for an unknown id or another tenant's job. Then: the current snapshot at
//! once, and a fresh snapshot after each durable event of the job (from the hub,
//! rendered once per event per pod), each with `id: <event id>` so a reconnecting
//! client's `Last-Event-ID` resumes — it then gets one snapshot if the job changed
//! since that id, else only what comes next. A `: keep-alive` comment goes out after
//! [`KEEP_ALIVE`] without anything to send. The stream ends after a snapshot with a
//! terminal status (completed, failed, cancelled, invalid), or after [`SSE_LIMITS`]
//! if set (the seed's 120 updates / ~4 minutes; off by default: a snapshot is sent
//! on change, not polled, so there is no cost in letting it run).

use std::time::Duration;

use bytes::Bytes;
use poem::Body;
use poem::web::Data;
use poem_openapi::param::{Header, Path};
use poem_openapi::payload::Binary;
use poem_openapi::{ApiResponse, OpenApi};

use super::problem::ApiError;
use super::render;
use super::security::StreamAuth;
use super::views::parse_event_id;
use super::{ApiTags, AppState};
use crate::bus::{Dialect, EnvelopeKind, Frame};
use crate::domain::ids::JobId;
use crate::hub::{Connection, Filter, Next};

/// A comment sent while idle, so proxies keep the connection open.
pub const KEEP_ALIVE: Duration = Duration::from_secs(15);
const KEEP_ALIVE_COMMENT: &[u8] = b": keep-alive\n\n";

/// Optional caps on one subscription (seed 003: 120 updates, ~4 minutes).
#[derive(Clone, Copy, Debug)]
pub struct SseLimits {
    /// Snapshots sent before the stream ends (the first counts).
    pub max_updates: Option<usize>,
    /// How long a stream may stay open.
    pub max_duration: Option<Duration>,
}

/// The caps this build applies: none.
pub const SSE_LIMITS: SseLimits = SseLimits {
    max_updates: None,
    max_duration: None,
};

pub struct SseApi;

#[derive(ApiResponse)]
pub enum SubscribeResponse {
    /// `text/event-stream`: each event's `data` is a full status snapshot
    /// `{status, id, prompt:{prompt_id}, queue_number, outputs:[{id, workflow_id,
    /// src}], cause, started_at, completed_at}` and its `id` the event id to resume
    /// from with `Last-Event-ID`.
    #[oai(status = 200, content_type = "text/event-stream")]
    Stream(
        Binary<Body>,
        #[oai(header = "Cache-Control")] String,
        #[oai(header = "X-Accel-Buffering")] String,
    ),
}

#[OpenApi(tag = "ApiTags::Jobs")]
impl SseApi {
    /// Subscribe to a job's status (Server-Sent Events): a full snapshot now and
    /// after every change, until the job finishes. Reconnect with `Last-Event-ID`.
    #[oai(
        path = "/v1/workflow/:id/subscribe",
        method = "get",
        operation_id = "subscribeWorkflow"
    )]
    async fn subscribe(
        &self,
        state: Data<&AppState>,
        auth: StreamAuth,
        /// The job id.
        id: Path<String>,
        /// The `id` of the last event received; the stream then resumes after it.
        #[oai(name = "Last-Event-ID")]
        last_event_id: Header<Option<String>>,
    ) -> Result<SubscribeResponse, ApiError> {
        let tenant = auth.principal().tenant_id;
        // An id that does not parse names no job of the caller's: 404 as the seed says.
        let job_id: JobId = id.0.parse().map_err(|_| ApiError::not_found("workflow"))?;
        if state.store.get_job(tenant, job_id).await?.is_none() {
            return Err(ApiError::not_found("workflow"));
        }
        let resume = last_event_id.0.as_deref().and_then(parse_event_id);
        let job_filter = job_id;
        // Attach before the snapshot is read: a change committed after the read is
        // then queued for us, and one before it is already in the snapshot.
        let conn = state
            .hub
            .attach(
                tenant,
                Filter::new(move |env| {
                    env.kind == EnvelopeKind::Event && env.job == Some(job_filter)
                }),
            )
            .await;
        let mut stream = SnapshotStream {
            state: state.clone(),
            conn,
            job: job_id,
            sent: 0,
            deadline: SSE_LIMITS
                .max_duration
                .map(|d| tokio::time::Instant::now() + d),
            done: false,
        };
        let first = stream.current(resume).await?;
        let body = futures_util::stream::unfold((stream, first), |(mut s, first)| async move {
            let chunk = match first {
                Some(frame) => s.emit(frame),
                None => s.next_chunk().await?,
            };
            Some((Ok::<_, std::io::Error>(chunk), (s, None)))
        });
        Ok(SubscribeResponse::Stream(
            Binary(Body::from_bytes_stream(body)),
            "no-cache".into(),
            // Tell nginx-style proxies not to buffer the stream.
            "no".into(),
        ))
    }
}

/// One subscriber's state between chunks.
struct SnapshotStream {
    state: AppState,
    conn: Connection,
    job: JobId,
    sent: usize,
    deadline: Option<tokio::time::Instant>,
    /// A terminal snapshot (or a cap) was sent: end the body.
    done: bool,
}

impl SnapshotStream {
    /// The snapshot to open (or resume) with. With a `Last-Event-ID` that is still
    /// the job's newest event, nothing: the client is up to date.
    async fn current(&mut self, resume: Option<i64>) -> Result<Option<Frame>, ApiError> {
        let tenant = self.conn.tenant();
        let newest = render::newest_event_id(&self.state, tenant, Some(self.job)).await?;
        // Live copies of what the snapshot already shows must not be sent again.
        self.conn
            .skip_events_through(u64::try_from(newest).unwrap_or(0));
        let Some(job) = self.state.store.get_job(tenant, self.job).await? else {
            return Err(ApiError::not_found("workflow"));
        };
        if resume.is_some_and(|seen| seen >= newest) {
            // Up to date; if the job has also finished there is nothing left to say.
            self.done = job.status.is_terminal();
            return Ok(None);
        }
        let id = u64::try_from(newest).ok().filter(|id| *id > 0);
        Ok(Some(render::sse_message(
            id,
            &render::sse_snapshot(&self.state, &job).await,
        )))
    }

    /// Counts a snapshot and decides whether it is the last one.
    fn emit(&mut self, frame: Frame) -> Bytes {
        self.sent += 1;
        let terminal = render::sse_status(&frame).is_some_and(|s| s.is_terminal());
        let capped = SSE_LIMITS.max_updates.is_some_and(|max| self.sent >= max);
        self.done = terminal || capped;
        frame.bytes().clone()
    }

    /// The next chunk to write: a snapshot, or a keep-alive comment while idle;
    /// `None` ends the body.
    async fn next_chunk(&mut self) -> Option<Bytes> {
        loop {
            if self.done
                || self
                    .deadline
                    .is_some_and(|d| tokio::time::Instant::now() >= d)
            {
                return None;
            }
            let wait = match self.deadline {
                Some(deadline) => {
                    KEEP_ALIVE.min(deadline.saturating_duration_since(tokio::time::Instant::now()))
                }
                None => KEEP_ALIVE,
            };
            let next = match tokio::time::timeout(wait, self.conn.next()).await {
                Ok(next) => next,
                Err(_) => return Some(Bytes::from_static(KEEP_ALIVE_COMMENT)),
            };
            match next {
                Next::Envelope(env) => {
                    let state = &self.state;
                    let frame = env
                        .rendered_async(Dialect::Sse, |env| async move {
                            render::sse_frame(state, &env).await
                        })
                        .await;
                    if let Some(frame) = frame {
                        return Some(self.emit(frame));
                    }
                }
                // Events may have been missed: one fresh snapshot covers them all.
                Next::Resync => match self.current(None).await {
                    Ok(Some(frame)) => return Some(self.emit(frame)),
                    Ok(None) => {}
                    Err(_) => return None,
                },
                Next::Close(_) => return None,
            }
        }
    }
}

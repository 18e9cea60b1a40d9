//! Seed 000: `WS /api/run/ws`, the per-session stream of the built-in pages.
//!
//! Server → client only: progress states (text JSON with `prompt_id`), event objects
//! (text JSON with `type`, the shape of `GET /api/admin/events`) and preview frames
//! (binary, the raw JPEG/PNG). On connect the current progress of each running job of
//! the tenant is sent first, so a page opened mid-job shows it at once.
//!
//! Beyond the seed, all optional query parameters:
//! - `prompt_id=a,b`: only those jobs (events without a job, such as `input.*`, are
//!   then left out too);
//! - `preview_meta=1`: before each binary preview, a text frame
//!   `{"type":"preview","prompt_id","preview_seq","node_id","mime"}`;
//! - `since=evt_<n>` (or `<n>`): first the durable events after that id from the
//!   log, then live ones — no gap, no duplicate.
//!
//! Credentials: the session cookie (as the seed says) or an API key in any form
//! (`X-API-Key`, `Authorization: Bearer`, `?api_key=`).
//!
//! Close codes:
//! - `4001 "Not authenticated"`: no credential, or a refused one (seed 000); the
//!   upgrade is accepted first so browsers can read the code.
//! - `4003 "Origin not allowed"`: a cookie-authenticated upgrade whose `Origin` is
//!   neither the request's `Host` nor the public URL (cross-site WebSocket hijacking;
//!   `SameSite=Strict` already stops it in browsers that honour it).
//! - `1008`: a malformed query parameter (the reason names it).
//! - `1009` / `1003`: the client sent a message over 64 KiB / a binary message.
//!   Other client text messages are ignored: this stream has no requests.
//! - `4008`: the client fell too far behind on lifecycle events; reconnect with
//!   `since=` the last event id received.
//! - `1001`: the pod is shutting down; reconnect (with `since=`).
//! - `1011`: the event log could not be read for a replay; reconnect with `since=`.

use std::collections::HashSet;
use std::sync::Arc;

use futures_util::SinkExt;
use poem::{Request, Response, handler};

use super::AppState;
use super::render;
use super::replay::REPLAY_PAGE;
use super::security::{CredentialForm, StreamCredential, stream_credential};
use super::views::parse_event_id;
use super::ws::{self, Incoming, Socket};
use crate::bus::{Dialect, EnvelopeKind};
use crate::domain::ids::{JobId, TenantId};
use crate::domain::job::JobStatus;
use crate::hub::{Connection, Filter, Next};
use crate::publish::event_object;

/// The query of an upgrade, parsed at the door.
#[derive(Debug, Default)]
struct SessionQuery {
    jobs: Option<Arc<HashSet<JobId>>>,
    preview_meta: bool,
    since: Option<i64>,
}

fn parse_query(raw: Option<&str>) -> Result<SessionQuery, String> {
    let mut query = SessionQuery::default();
    let mut jobs: Option<HashSet<JobId>> = None;
    for (key, value) in url::form_urlencoded::parse(raw.unwrap_or_default().as_bytes()) {
        match key.as_ref() {
            "prompt_id" => {
                let set = jobs.get_or_insert_with(HashSet::new);
                for id in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                    set.insert(
                        id.parse::<JobId>()
                            .map_err(|_| "prompt_id: not a job id".to_owned())?,
                    );
                }
            }
            "preview_meta" => query.preview_meta = matches!(value.as_ref(), "1" | "true"),
            "since" => {
                query.since = Some(
                    parse_event_id(&value).ok_or_else(|| "since: not an event id".to_owned())?,
                );
            }
            _ => {}
        }
    }
    query.jobs = jobs.map(Arc::new);
    Ok(query)
}

/// `GET /api/run/ws` (WebSocket upgrade).
#[handler]
pub async fn session_ws(req: &Request) -> Response {
    let Some(state) = req.data::<AppState>().cloned() else {
        return Response::builder()
            .status(poem::http::StatusCode::INTERNAL_SERVER_ERROR)
            .finish();
    };
    let credential = stream_credential(req);
    let origin_ok = ws::same_origin(req, &state.public_url);
    let query = parse_query(req.uri().query());
    // Attach before the 101 goes out: the seed's stream has no welcome message, so
    // a client may act as soon as it is connected, and what it causes must reach it.
    let attached = match (&credential, &query) {
        (StreamCredential::Accepted(principal, form), Ok(query))
            if origin_ok || *form != CredentialForm::Cookie =>
        {
            Some(attach(&state, principal.tenant_id, query).await)
        }
        _ => None,
    };
    ws::upgrade(req, move |socket| async move {
        let mut socket = socket;
        let tenant = match credential {
            StreamCredential::Accepted(_, CredentialForm::Cookie) if !origin_ok => {
                return ws::close(
                    &mut socket,
                    ws::CLOSE_FORBIDDEN_ORIGIN,
                    "Origin not allowed",
                )
                .await;
            }
            StreamCredential::Accepted(principal, _) => principal.tenant_id,
            StreamCredential::Refused(_) | StreamCredential::Missing => {
                return ws::close(&mut socket, ws::CLOSE_UNAUTHENTICATED, "Not authenticated")
                    .await;
            }
        };
        let query = match query {
            Ok(query) => query,
            Err(reason) => return ws::close(&mut socket, ws::CLOSE_POLICY, &reason).await,
        };
        match attached {
            Some(Ok((conn, baseline))) => serve(state, tenant, query, conn, baseline, socket).await,
            Some(Err(Stop::Close(code, reason))) => ws::close(&mut socket, code, &reason).await,
            Some(Err(Stop::Gone)) => {}
            // Unreachable: every refusal above returned already.
            None => ws::close(&mut socket, ws::CLOSE_INTERNAL, "not attached").await,
        }
    })
}

/// Why the connection loop ended early.
enum Stop {
    /// The client is gone (or its socket failed); nothing more to send.
    Gone,
    /// Close with this code and reason.
    Close(u16, String),
}

struct Session {
    state: AppState,
    tenant: TenantId,
    jobs: Option<Arc<HashSet<JobId>>>,
    preview_meta: bool,
    socket: Socket,
    conn: Connection,
    /// Where a resync replays from while no event has been delivered yet.
    baseline: i64,
}

/// Joins the tenant's live feed and fixes where a resync replays from. Runs before
/// the upgrade completes, so nothing committed after the client connects is missed.
async fn attach(
    state: &AppState,
    tenant: TenantId,
    query: &SessionQuery,
) -> Result<(Connection, i64), Stop> {
    let filter_jobs = query.jobs.clone();
    let filter = Filter::new(move |env| {
        matches!(
            env.kind,
            EnvelopeKind::Event | EnvelopeKind::Progress | EnvelopeKind::Preview
        ) && filter_jobs
            .as_ref()
            .is_none_or(|set| env.job.is_some_and(|job| set.contains(&job)))
    });
    // Attach before reading the log: whatever commits from here on is queued for
    // us, so a replay from the baseline leaves no gap.
    let conn = state.hub.attach(tenant, filter).await;
    let baseline = match query.since {
        Some(since) => since,
        None => state
            .replay
            .newest(&state.store, tenant, std::time::Instant::now())
            .await
            .map_err(|e| replay_failed(&e, None))?,
    };
    Ok((conn, baseline))
}

async fn serve(
    state: AppState,
    tenant: TenantId,
    query: SessionQuery,
    conn: Connection,
    baseline: i64,
    socket: Socket,
) {
    let mut session = Session {
        state,
        tenant,
        jobs: query.jobs.clone(),
        preview_meta: query.preview_meta,
        socket,
        conn,
        baseline,
    };
    let stop = match session.start(query.since).await {
        Ok(()) => session.run().await,
        Err(stop) => stop,
    };
    if let Stop::Close(code, reason) = stop {
        ws::close(&mut session.socket, code, &reason).await;
    }
}

impl Session {
    async fn start(&mut self, since: Option<i64>) -> Result<(), Stop> {
        if let Some(since) = since {
            self.replay(since).await?;
        }
        self.send_snapshots().await
    }

    async fn run(&mut self) -> Stop {
        let mut reads = ws::ReadGate::default();
        loop {
            tokio::select! {
                read = reads.next(&mut self.socket) => match ws::classify(read) {
                    // The seed's clients only receive; what they send is ignored.
                    Incoming::Text(_) | Incoming::Ignore => {}
                    Incoming::Gone => return Stop::Gone,
                    Incoming::Refuse(code, reason) => return Stop::Close(code, reason.into()),
                },
                next = self.conn.next() => {
                    if let Err(stop) = self.handle_burst(next).await {
                        return stop;
                    }
                }
            }
        }
    }

    /// Handles `next` and what else the outbox holds now (up to [`ws::SEND_BURST`]
    /// items), then flushes once.
    async fn handle_burst(&mut self, next: Next) -> Result<(), Stop> {
        self.handle(next).await?;
        for _ in 1..ws::SEND_BURST {
            let Some(next) = self.conn.try_next() else {
                break;
            };
            self.handle(next).await?;
        }
        self.socket.flush().await.map_err(|_| Stop::Gone)
    }

    async fn handle(&mut self, next: Next) -> Result<(), Stop> {
        match next {
            Next::Envelope(env) => {
                if self.preview_meta
                    && env.kind == EnvelopeKind::Preview
                    && let Some(frame) =
                        env.rendered(Dialect::SessionPreviewMeta, render::session_preview_meta)
                {
                    self.feed_frame(frame).await?;
                }
                if let Some(frame) = env.rendered(Dialect::SessionStream, render::session_frame) {
                    self.feed_frame(frame).await?;
                }
                Ok(())
            }
            Next::Resync => {
                let after = self
                    .conn
                    .last_event_id()
                    .map_or(self.baseline, |id| i64::try_from(id).unwrap_or(i64::MAX));
                self.replay(after).await
            }
            Next::Close(reason) => Err(Stop::Close(reason.code(), reason.reason())),
        }
    }

    /// Queues a frame for the burst's flush ([`Self::handle_burst`]).
    async fn feed_frame(&mut self, frame: crate::bus::Frame) -> Result<(), Stop> {
        ws::feed_frame(&mut self.socket, frame)
            .await
            .map_err(|_| Stop::Gone)
    }

    async fn send_frame(&mut self, frame: crate::bus::Frame) -> Result<(), Stop> {
        ws::send_frame(&mut self.socket, frame)
            .await
            .map_err(|_| Stop::Gone)
    }

    fn wants(&self, job: Option<JobId>) -> bool {
        self.jobs
            .as_ref()
            .is_none_or(|set| job.is_some_and(|job| set.contains(&job)))
    }

    /// Sends the durable events after `after` from the log, then tells the outbox
    /// to drop the live copies of what was sent.
    async fn replay(&mut self, after: i64) -> Result<(), Stop> {
        // One job: let the store filter. Several: filter here.
        let single = self
            .jobs
            .as_ref()
            .filter(|set| set.len() == 1)
            .and_then(|set| set.iter().next().copied());
        // The live feed is in place: reads that begin from now on may be shared.
        let live_since = std::time::Instant::now();
        let mut cursor = after;
        loop {
            let page = self
                .state
                .replay
                .page(&self.state.store, self.tenant, cursor, single, live_since)
                .await
                .map_err(|e| replay_failed(&e, Some(cursor)))?;
            for replayed in page.iter() {
                if !self.wants(replayed.event.job_id) {
                    continue;
                }
                // Rendered as a live event is, once per pod.
                let frame = replayed
                    .envelope
                    .as_ref()
                    .and_then(|env| env.rendered(Dialect::SessionStream, render::session_frame));
                match frame {
                    Some(frame) => self.feed_frame(frame).await?,
                    None => {
                        let text = event_object(&replayed.event).to_string();
                        self.feed_frame(crate::bus::Frame::text(text)).await?;
                    }
                }
            }
            self.socket.flush().await.map_err(|_| Stop::Gone)?;
            cursor = page.last().map_or(cursor, |r| r.event.id);
            if page.len() < REPLAY_PAGE as usize {
                break;
            }
        }
        self.conn
            .skip_events_through(u64::try_from(cursor).unwrap_or(0));
        Ok(())
    }

    /// The latest progress of each running job the client watches.
    async fn send_snapshots(&mut self) -> Result<(), Stop> {
        let active = self
            .state
            .store
            .active_jobs(self.tenant)
            .await
            .map_err(|e| replay_failed(&e, None))?;
        for job in active {
            if job.status != JobStatus::Running || !self.wants(Some(job.id)) {
                continue;
            }
            let snapshot = self.state.publisher.snapshots.get(job.id).await;
            match snapshot.map(crate::bus::Frame::text_from) {
                Some(Some(frame)) => self.send_frame(frame).await?,
                Some(None) => {
                    tracing::error!(job = %job.id, "a progress snapshot is not UTF-8; skipped")
                }
                None => {}
            }
        }
        Ok(())
    }
}

fn replay_failed(e: &crate::store::StoreError, resume: Option<i64>) -> Stop {
    let (code, reason) = ws::log_unavailable(e, resume, "reconnect with since");
    Stop::Close(code, reason)
}

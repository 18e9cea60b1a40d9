//! Seed 002: `WS /developer/api/v1/ws?api_key=`, the cloud pub/sub stream.
//!
//! Protocol (JSON text messages `{type, data}`):
//! - server, on connect: `{"type":"connected","data":{"session_id":"…"}}`;
//! - `subscribe {events:[patterns], since?}` adds patterns (exact names, `job.*`,
//!   `input.*`, `model.*`, `*`) to the connection's set and answers
//!   `{"type":"subscribed","data":{"events":[the whole set]}}`. With `since` (an event
//!   id, `evt_<n>` or `<n>`) the durable events after it that match the set are
//!   replayed from the log first, then live ones follow: no gap, no duplicate;
//! - `unsubscribe {events:[patterns]}` removes them: `unsubscribed` with the set left;
//! - `ping` → `pong`;
//! - events: `{"type":"event","id":"evt_<n>","timestamp":…,"data":{"event","payload"}}`.
//!   Job events carry the job as payload (`id`, `status`, …; `outputs` with signed
//!   `download_url` on `job.completed`; `error {code, message}` and `cause` on
//!   `job.failed`). Progress arrives as `job.progress` (`progress` in percent, 0–99;
//!   no `id`: it is not durable) to connections whose set matches `job.progress`.
//!
//! A bad message is answered `{"type":"error","data":{"code","message"}}` and the
//! connection stays. Codes: `invalid_json`, `invalid_message` (no `type`, or `data`
//! of the wrong shape), `unknown_type`, `invalid_pattern`, `too_many_patterns`,
//! `invalid_since`.
//!
//! Close codes:
//! - `4001 "invalid API key"`: missing or refused credential, sent right after the
//!   upgrade (the SDK's `WebSocketAuthError` path tells it apart from other failures);
//! - `1009`: a message over 64 KiB; `1003`: a binary message;
//! - `1008 "rate limit exceeded"`: more than [`BURST`] messages at once or a sustained
//!   [`PER_SECOND`] per second (the SDK pings every 30 s);
//! - `4008`: too slow to keep up with lifecycle events: resubscribe with `since`;
//! - `1001`: the pod is shutting down; `1011`: the log could not be read for a replay.

use futures_util::SinkExt;
use futures_util::future::Either;
use poem::{Request, Response, handler};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use super::AppState;
use super::render;
use super::replay::REPLAY_PAGE;
use super::security::{StreamCredential, stream_credential};
use super::views::parse_event_id;
use super::ws::{self, Incoming, RateLimit, Socket};
use crate::bus::{Dialect, EnvelopeKind, SharedEnvelope};
use crate::domain::ids::TenantId;
use crate::domain::patterns::{EventPattern, InvalidPattern, PatternSet};
use crate::hub::{Connection, Filter, Next};

/// Messages a client may send at once before it is throttled.
pub const BURST: u32 = 60;
/// Sustained client messages per second.
pub const PER_SECOND: u32 = 10;

/// `GET /developer/api/v1/ws` (WebSocket upgrade).
#[handler]
pub async fn cloud_ws(req: &Request) -> Response {
    let Some(state) = req.data::<AppState>().cloned() else {
        return Response::builder()
            .status(poem::http::StatusCode::INTERNAL_SERVER_ERROR)
            .finish();
    };
    let credential = stream_credential(req);
    // The connection's future is returned as is rather than awaited inside another
    // `async` block, which would keep a second copy of the captured state for the
    // socket's whole life.
    ws::upgrade(req, move |socket| match credential {
        StreamCredential::Accepted(principal, _) => {
            Either::Left(serve(state, principal.tenant_id, socket))
        }
        StreamCredential::Refused(_) | StreamCredential::Missing => Either::Right(async move {
            let mut socket = socket;
            ws::close(&mut socket, ws::CLOSE_UNAUTHENTICATED, "invalid API key").await
        }),
    })
}

/// Why the connection loop ended.
enum Stop {
    Gone,
    Close(u16, String),
}

/// A message from the client. `data` stays loose so that a wrong shape gets a
/// precise error rather than "invalid JSON".
#[derive(Deserialize)]
struct ClientMessage {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    data: Value,
}

#[derive(Deserialize)]
struct Patterns {
    events: Vec<String>,
    #[serde(default)]
    since: Option<Value>,
}

struct Session {
    state: AppState,
    tenant: TenantId,
    socket: Socket,
    conn: Connection,
    patterns: PatternSet,
    limit: RateLimit,
    /// Where a resync replays from while no event has been delivered yet.
    baseline: i64,
}

fn filter_for(patterns: &PatternSet) -> Filter {
    if patterns.is_empty() {
        return Filter::new(|_| false);
    }
    let progress = patterns.matches("job.progress");
    let patterns = patterns.clone();
    Filter::new(move |env| match env.kind {
        EnvelopeKind::Event => env.event_type().is_some_and(|t| patterns.matches(t)),
        EnvelopeKind::Progress => progress,
        _ => false,
    })
}

async fn serve(state: AppState, tenant: TenantId, socket: Socket) {
    // Nothing is wanted until the first `subscribe`.
    let conn = state.hub.attach(tenant, Filter::new(|_| false)).await;
    let mut session = Session {
        state,
        tenant,
        socket,
        conn,
        patterns: PatternSet::new(),
        limit: RateLimit::new(BURST, PER_SECOND),
        baseline: 0,
    };
    let stop = session.run().await;
    if let Stop::Close(code, reason) = stop {
        ws::close(&mut session.socket, code, &reason).await;
    }
}

fn reply(kind: &str, data: Value) -> Message {
    ws::text(json!({ "type": kind, "data": data }).to_string())
}

fn error(code: &str, message: impl Into<String>) -> Message {
    reply("error", json!({ "code": code, "message": message.into() }))
}

impl Session {
    async fn run(&mut self) -> Stop {
        // The rare paths that await the store are boxed (here, client messages,
        // replays, a first rendering): a connection task is allocated at the size of
        // its largest await state, and an idle socket should not pay for them.
        let attached = std::time::Instant::now();
        let newest = self
            .state
            .replay
            .newest(&self.state.store, self.tenant, attached);
        match Box::pin(newest).await {
            Ok(id) => self.baseline = id,
            Err(e) => return replay_failed(&e, None),
        }
        let session_id = uuid::Uuid::new_v4().to_string();
        if let Err(stop) = self
            .send(reply("connected", json!({ "session_id": session_id })))
            .await
        {
            return stop;
        }
        let mut reads = ws::ReadGate::default();
        loop {
            let result = tokio::select! {
                read = reads.next(&mut self.socket) => match ws::classify(read) {
                    Incoming::Text(text) => {
                        if self.limit.allow() {
                            Box::pin(self.on_message(text.as_str())).await
                        } else {
                            Err(Stop::Close(ws::CLOSE_POLICY, "rate limit exceeded".into()))
                        }
                    }
                    Incoming::Ignore => Ok(()),
                    Incoming::Gone => Err(Stop::Gone),
                    Incoming::Refuse(code, reason) => Err(Stop::Close(code, reason.into())),
                },
                next = self.conn.next() => self.on_burst(next).await,
            };
            if let Err(stop) = result {
                return stop;
            }
        }
    }

    async fn send(&mut self, message: Message) -> Result<(), Stop> {
        self.socket.send(message).await.map_err(|_| Stop::Gone)
    }

    async fn on_message(&mut self, text: &str) -> Result<(), Stop> {
        let message: ClientMessage = match serde_json::from_str(text) {
            Ok(m) => m,
            Err(e) if e.is_data() => {
                return self
                    .send(error(
                        "invalid_message",
                        "a message is a JSON object with a string \"type\"",
                    ))
                    .await;
            }
            Err(e) => return self.send(error("invalid_json", e.to_string())).await,
        };
        match message.kind.as_str() {
            "ping" => self.send(reply("pong", json!({}))).await,
            "subscribe" => self.subscribe(message.data).await,
            "unsubscribe" => self.unsubscribe(message.data).await,
            other => {
                let other: String = other.chars().take(40).collect();
                self.send(error(
                    "unknown_type",
                    format!(
                        "unknown message type {other:?}: expected subscribe, unsubscribe or ping"
                    ),
                ))
                .await
            }
        }
    }

    fn parse_patterns(data: Value) -> Result<Patterns, Message> {
        serde_json::from_value(data).map_err(|_| {
            error(
                "invalid_message",
                "data must be {\"events\": [\"pattern\", …]}",
            )
        })
    }

    fn pattern_error(e: InvalidPattern) -> Message {
        match e {
            InvalidPattern::TooMany => error("too_many_patterns", e.to_string()),
            e => error("invalid_pattern", e.to_string()),
        }
    }

    fn current(&self) -> Value {
        json!({ "events": self.patterns.iter().map(ToString::to_string).collect::<Vec<_>>() })
    }

    async fn subscribe(&mut self, data: Value) -> Result<(), Stop> {
        let request = match Self::parse_patterns(data) {
            Ok(r) => r,
            Err(reply) => return self.send(reply).await,
        };
        let since = match &request.since {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => match parse_event_id(s) {
                Some(id) => Some(id),
                None => {
                    return self
                        .send(error("invalid_since", "since is not an event id"))
                        .await;
                }
            },
            Some(Value::Number(n)) => match n.as_i64().filter(|n| *n >= 0) {
                Some(id) => Some(id),
                None => {
                    return self
                        .send(error("invalid_since", "since is not an event id"))
                        .await;
                }
            },
            Some(_) => {
                return self
                    .send(error("invalid_since", "since is not an event id"))
                    .await;
            }
        };
        if let Err(e) = self
            .patterns
            .extend_parsed(request.events.iter().map(String::as_str))
        {
            return self.send(Self::pattern_error(e)).await;
        }
        // The filter first, then the replay: what commits in between is both queued
        // and replayed, and `skip_events_through` drops the queued copy.
        self.conn.set_filter(filter_for(&self.patterns));
        self.send(reply("subscribed", self.current())).await?;
        if let Some(since) = since {
            self.replay(since).await?;
        }
        Ok(())
    }

    async fn unsubscribe(&mut self, data: Value) -> Result<(), Stop> {
        let request = match Self::parse_patterns(data) {
            Ok(r) => r,
            Err(reply) => return self.send(reply).await,
        };
        let mut parsed = Vec::with_capacity(request.events.len());
        for raw in &request.events {
            match EventPattern::parse(raw) {
                Ok(p) => parsed.push(p),
                Err(e) => return self.send(Self::pattern_error(e)).await,
            }
        }
        for pattern in &parsed {
            self.patterns.remove(pattern);
        }
        self.conn.set_filter(filter_for(&self.patterns));
        self.send(reply("unsubscribed", self.current())).await
    }

    /// Handles `first` and what else the outbox holds now (up to [`ws::SEND_BURST`]
    /// items), then flushes once.
    async fn on_burst(&mut self, first: Next) -> Result<(), Stop> {
        self.on_next(first).await?;
        for _ in 1..ws::SEND_BURST {
            let Some(next) = self.conn.try_next() else {
                break;
            };
            self.on_next(next).await?;
        }
        self.socket.flush().await.map_err(|_| Stop::Gone)
    }

    async fn on_next(&mut self, next: Next) -> Result<(), Stop> {
        match next {
            Next::Envelope(env) => self.feed_envelope(&env).await,
            Next::Resync => {
                let after = self
                    .conn
                    .last_event_id()
                    .map_or(self.baseline, |id| i64::try_from(id).unwrap_or(i64::MAX));
                Box::pin(self.replay(after)).await
            }
            Next::Close(reason) => Err(Stop::Close(reason.code(), reason.reason())),
        }
    }

    async fn feed_envelope(&mut self, env: &SharedEnvelope) -> Result<(), Stop> {
        let state = &self.state;
        let frame = env
            .rendered_async(Dialect::CloudWs, |env| async move {
                Box::pin(render::cloud_frame(state, &env)).await
            })
            .await;
        match frame {
            // Flushed by the caller, with whatever else it sends in the same burst.
            Some(frame) => ws::feed_frame(&mut self.socket, frame)
                .await
                .map_err(|_| Stop::Gone),
            None => Ok(()),
        }
    }

    /// Sends the matching durable events after `after` from the log, then drops the
    /// live copies of what was sent.
    async fn replay(&mut self, after: i64) -> Result<(), Stop> {
        // The live feed is in place: reads that begin from now on may be shared.
        let live_since = std::time::Instant::now();
        let mut cursor = after;
        loop {
            let page = self
                .state
                .replay
                .page(&self.state.store, self.tenant, cursor, None, live_since)
                .await
                .map_err(|e| replay_failed(&e, Some(cursor)))?;
            for replayed in page.iter() {
                if !self.patterns.matches(&replayed.event.kind) {
                    continue;
                }
                if let Some(envelope) = &replayed.envelope {
                    self.feed_envelope(envelope).await?;
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
}

fn replay_failed(e: &crate::store::StoreError, resume: Option<i64>) -> Stop {
    let (code, reason) = ws::log_unavailable(e, resume, "resubscribe with since");
    Stop::Close(code, reason)
}

//! The ComfyUI dialect's `WS /ws?clientId=` (see `comfy` for the conventions).
//!
//! One socket per (tenant, clientId) across the fleet: a new socket announces itself
//! on the tenant's bus topic and the older one, on whichever pod, closes. A prompt's
//! messages go to the socket of the `client_id` it was posted with; those of a prompt
//! posted without one (progress, previews, interruptions) and the queue `status` go to
//! every socket of the tenant — never to another tenant's.
//!
//! Sources: lifecycle messages (`execution_start`, `executed`, `execution_success`,
//! `execution_error`, `execution_interrupted`, the `executing {node: null}` end
//! marker) are rendered from the durable job events, after the outputs are stored so
//! `/view` serves what `executed` names; in-flight ones (`execution_cached`,
//! `executing`, `progress`, `progress_state`) are relayed as the worker's ComfyUI
//! wrote them; previews are the workers' frames in ComfyUI's binary framing.

use std::collections::HashMap;
use std::ops::ControlFlow;

use bytes::{BufMut, Bytes, BytesMut};
use chrono::Utc;
use futures_util::SinkExt;
use poem::http::StatusCode;
use poem::web::Query;
use poem::{Request, Response, handler};
use serde_json::{Value, json};

use super::AppState;
use super::ws::{Incoming, Socket, classify, text};
use crate::bus::{Dialect, Envelope, EnvelopeKind, Frame, Meta, SharedEnvelope, meta_keys};
use crate::domain::ids::{JobId, TenantId};
use crate::domain::job::JobStatus;
use crate::hub::{Connection, Filter, Next};
use crate::publish::COMFY_TYPE_PREFIX;
use crate::store::jobs::Job;

use super::comfy::*;

/// Longest `clientId` accepted; ComfyUI's own are 32-character hex strings.
pub const MAX_CLIENT_ID_LEN: usize = 256;
/// Close code for a socket whose clientId reconnected elsewhere.
pub const CLOSE_REPLACED: u16 = 4009;
/// The bus message type announcing a socket for a clientId (suffix: the clientId).
const TAKEOVER_TYPE: &str = "comfy.takeover:";

/// ComfyUI's binary event types (server.py `BinaryEventTypes`).
const PREVIEW_IMAGE: u32 = 1;
const PREVIEW_IMAGE_WITH_METADATA: u32 = 4;

/// `WS /ws?clientId=`: ComfyUI's socket. On connect: `status` with `sid` (the given
/// clientId, else a fresh hex id) and, when this client's prompt is running, the
/// node it is on; a first client message `feature_flags` is answered with the
/// server's and decides the preview framing.
#[handler]
pub(super) async fn comfy_ws(req: &Request, Query(q): Query<HashMap<String, String>>) -> Response {
    // Refused before the upgrade: a ComfyUI client reports the status code.
    let (state, tenant) = caller_or_return!(req);
    let client_id = q.get("clientId").filter(|c| !c.is_empty()).cloned();
    if client_id
        .as_ref()
        .is_some_and(|c| c.len() > MAX_CLIENT_ID_LEN)
    {
        return Response::builder()
            .status(StatusCode::BAD_REQUEST)
            .content_type("text/plain; charset=utf-8")
            .body(format!(
                "clientId is longer than {MAX_CLIENT_ID_LEN} characters"
            ));
    }
    super::ws::upgrade(req, move |socket| async move {
        Session::open(state, tenant, client_id)
            .await
            .serve(socket)
            .await;
    })
}

/// Who hears about a prompt on this socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Audience {
    /// Posted with this socket's clientId.
    Mine,
    /// Posted without a client_id: ComfyUI broadcasts its progress to everyone.
    Everyone,
    /// Another client's.
    Other,
    /// Ended: whatever still arrives about it is stale.
    Finished,
}

/// Jobs a socket remembers before it forgets the finished ones.
const MAX_REMEMBERED_JOBS: usize = 1024;

struct Session {
    state: AppState,
    tenant: TenantId,
    sid: String,
    /// Whether the sid was the client's (a takeover applies) or made up here.
    chosen: bool,
    /// Tells this socket from a newer one with the same sid.
    nonce: String,
    conn: Connection,
    negotiated: bool,
    preview_metadata: bool,
    audience: HashMap<JobId, Audience>,
    /// A preview waiting for its step's `progress` (see `in_comfyui_order`).
    held_preview: Option<Frame>,
}

impl Session {
    async fn open(state: AppState, tenant: TenantId, client_id: Option<String>) -> Self {
        let chosen = client_id.is_some();
        let sid = client_id.unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
        let takeover = format!("{TAKEOVER_TYPE}{sid}");
        let conn = state
            .hub
            .attach(
                tenant,
                Filter::new(move |e| match e.kind {
                    EnvelopeKind::Event => e.event_type().is_some_and(|t| {
                        matches!(
                            t,
                            "job.queued"
                                | "job.started"
                                | "job.completed"
                                | "job.failed"
                                | "job.cancelled"
                        )
                    }),
                    EnvelopeKind::Preview => true,
                    EnvelopeKind::Control => e.event_type().is_some_and(|t| {
                        t == takeover
                            || (t.starts_with(COMFY_TYPE_PREFIX) && !t.starts_with(TAKEOVER_TYPE))
                    }),
                    _ => false,
                }),
            )
            .await;
        let session = Self {
            state,
            tenant,
            sid,
            chosen,
            nonce: uuid::Uuid::new_v4().simple().to_string(),
            conn,
            negotiated: false,
            preview_metadata: false,
            audience: HashMap::new(),
            held_preview: None,
        };
        if chosen {
            session.announce().await;
        }
        session
    }

    /// Tells the fleet this socket now owns the sid; older ones close.
    async fn announce(&self) {
        let meta = match Meta::typed(&format!("{TAKEOVER_TYPE}{}", self.sid)) {
            Ok(meta) => meta,
            Err(e) => {
                tracing::warn!(error = %e, "clientId does not fit an envelope");
                return;
            }
        };
        let mut envelope = Envelope::new(
            self.tenant,
            EnvelopeKind::Control,
            Bytes::from(self.nonce.clone()),
        );
        envelope.meta = meta;
        if let Err(e) = self.state.hub.bus().publish(&envelope).await {
            tracing::warn!(error = %e, "announcing a ComfyUI socket failed; an older one may stay open");
        }
    }

    async fn serve(&mut self, mut socket: Socket) {
        for hello in self.greeting().await {
            if socket.send(text(hello.to_string())).await.is_err() {
                return;
            }
        }
        let mut reads = super::ws::ReadGate::default();
        loop {
            tokio::select! {
                read = reads.next(&mut socket) => match classify(read) {
                    Incoming::Text(t) => {
                        if let Some(reply) = self.client_message(t.as_str())
                            && socket.send(text(reply.to_string())).await.is_err()
                        {
                            return;
                        }
                    }
                    Incoming::Ignore => {}
                    Incoming::Gone => return,
                    Incoming::Refuse(code, reason) => {
                        super::ws::close(&mut socket, code, reason).await;
                        return;
                    }
                },
                next = self.conn.next() => {
                    if self.send_burst(&mut socket, next).await.is_break() {
                        return;
                    }
                }
            }
        }
    }

    /// Sends `first` and what else the outbox holds now (up to [`super::ws::SEND_BURST`]
    /// items), flushed once; `Break` when the socket is closed or gone.
    async fn send_burst(&mut self, socket: &mut Socket, first: Next) -> ControlFlow<()> {
        self.feed(socket, first).await?;
        for _ in 1..super::ws::SEND_BURST {
            let Some(next) = self.conn.try_next() else {
                break;
            };
            self.feed(socket, next).await?;
        }
        match socket.flush().await {
            Ok(()) => ControlFlow::Continue(()),
            Err(_) => ControlFlow::Break(()),
        }
    }

    async fn feed(&mut self, socket: &mut Socket, next: Next) -> ControlFlow<()> {
        match next {
            Next::Envelope(env) => {
                if self.is_replaced_by(&env) {
                    super::ws::close(
                        socket,
                        CLOSE_REPLACED,
                        "another connection took over this clientId",
                    )
                    .await;
                    return ControlFlow::Break(());
                }
                let frames = self.frames_for(&env).await;
                for frame in self.in_comfyui_order(&env, frames) {
                    if super::ws::feed_frame(socket, frame).await.is_err() {
                        return ControlFlow::Break(());
                    }
                }
                ControlFlow::Continue(())
            }
            // A gap: lifecycle messages may have been lost; the client's
            // `/history` poll is the fallback, as after a ComfyUI reconnect.
            Next::Resync => ControlFlow::Continue(()),
            Next::Close(reason) => {
                super::ws::close(socket, reason.code(), &reason.reason()).await;
                ControlFlow::Break(())
            }
        }
    }

    /// ComfyUI encodes a preview for sockets without preview metadata after the
    /// step's `progress` (with metadata it sends it before): a worker's preview waits
    /// for that `progress`, or for whatever comes next.
    fn in_comfyui_order(&mut self, env: &Envelope, frames: Vec<Frame>) -> Vec<Frame> {
        if self.preview_metadata {
            return frames;
        }
        if env.kind == EnvelopeKind::Preview {
            // A newer preview replaces one still waiting, as latest-wins would.
            self.held_preview = frames.into_iter().next().or(self.held_preview.take());
            return Vec::new();
        }
        let Some(held) = self.held_preview.take() else {
            return frames;
        };
        let is_progress = env.kind == EnvelopeKind::Control
            && env.event_type() == Some("comfy.progress")
            && !frames.is_empty();
        let mut out = Vec::with_capacity(frames.len() + 1);
        if is_progress {
            out.extend(frames);
            out.push(held);
        } else {
            out.push(held);
            out.extend(frames);
        }
        out
    }

    /// `status` with the sid, then — when this client's prompt is running (it
    /// reconnected) — ComfyUI's bare `executing` naming the current node.
    async fn greeting(&mut self) -> Vec<Value> {
        let active = self
            .state
            .store
            .active_jobs(self.tenant)
            .await
            .unwrap_or_default();
        let mut out = vec![json!({"type": "status", "data": {
            "status": {"exec_info": {"queue_remaining": active.len()}}, "sid": self.sid}})];
        if !self.chosen {
            return out;
        }
        for job in active.iter().filter(|j| j.status == JobStatus::Running) {
            if job.client_id.as_deref() != Some(self.sid.as_str()) {
                continue;
            }
            self.audience.insert(job.id, Audience::Mine);
            let node = match self.state.publisher.snapshots.get(job.id).await {
                Some(snapshot) => serde_json::from_slice::<Value>(&snapshot)
                    .ok()
                    .and_then(|p| p["node_id"].as_str().map(str::to_owned)),
                None => None,
            };
            if let Some(node) = node {
                out.push(json!({"type": "executing", "data": {"node": node}}));
            }
        }
        out
    }

    /// ComfyUI answers only a first `feature_flags` message (a first message that is
    /// not JSON does not count).
    fn client_message(&mut self, t: &str) -> Option<Value> {
        let parsed = serde_json::from_str::<Value>(t).ok()?;
        if std::mem::replace(&mut self.negotiated, true) || parsed["type"] != "feature_flags" {
            return None;
        }
        self.preview_metadata = parsed["data"]["supports_preview_metadata"] == true;
        Some(json!({"type": "feature_flags", "data": {
            "supports_preview_metadata": true,
            "max_upload_size": self.state.max_upload.get()}}))
    }

    fn is_replaced_by(&self, env: &Envelope) -> bool {
        env.kind == EnvelopeKind::Control
            && env
                .event_type()
                .and_then(|t| t.strip_prefix(TAKEOVER_TYPE))
                .is_some_and(|sid| sid == self.sid)
            && env.payload != self.nonce.as_bytes()
    }

    /// Who hears about a job here, read once per job and socket.
    async fn audience_of(&mut self, id: JobId) -> Audience {
        if let Some(a) = self.audience.get(&id) {
            return *a;
        }
        let audience = match self.state.store.get_job(self.tenant, id).await {
            Ok(Some(job)) if job.status.is_terminal() => Audience::Finished,
            Ok(Some(job)) => self.audience_of_job(&job),
            // Unknown or unreadable: say nothing rather than guess.
            _ => return Audience::Other,
        };
        self.remember(id, audience);
        audience
    }

    fn audience_of_job(&self, job: &Job) -> Audience {
        match job.client_id.as_deref() {
            Some(c) if c == self.sid => Audience::Mine,
            Some(_) => Audience::Other,
            None => Audience::Everyone,
        }
    }

    async fn frames_for(&mut self, env: &SharedEnvelope) -> Vec<Frame> {
        let Some(id) = env.job else {
            return Vec::new();
        };
        match env.kind {
            EnvelopeKind::Preview => match self.audience_of(id).await {
                Audience::Other | Audience::Finished => Vec::new(),
                Audience::Mine | Audience::Everyone => {
                    let (dialect, render): (Dialect, fn(&Envelope) -> Option<Frame>) =
                        if self.preview_metadata {
                            (Dialect::ComfyWsMeta, preview_with_metadata)
                        } else {
                            (Dialect::ComfyWs, preview_image)
                        };
                    env.rendered(dialect, render).into_iter().collect()
                }
            },
            EnvelopeKind::Control => {
                let kind = env
                    .event_type()
                    .and_then(|t| t.strip_prefix(COMFY_TYPE_PREFIX))
                    .unwrap_or_default();
                let to_everyone = matches!(kind, "progress" | "progress_state");
                match self.audience_of(id).await {
                    Audience::Mine => {}
                    Audience::Everyone if to_everyone => {}
                    _ => return Vec::new(),
                }
                env.rendered(Dialect::ComfyWs, relayed_text)
                    .into_iter()
                    .collect()
            }
            EnvelopeKind::Event => self.lifecycle_frames(env, id).await,
            _ => Vec::new(),
        }
    }

    /// What one job event becomes here: the prompt's own messages for its client
    /// (rendered for this socket), and the queue `status` every socket gets (rendered
    /// once per pod).
    async fn lifecycle_frames(&mut self, env: &SharedEnvelope, id: JobId) -> Vec<Frame> {
        let kind = env.event_type().unwrap_or_default().to_owned();
        let mut out = Vec::new();
        if kind == "job.queued" {
            return queue_status(&self.state, self.tenant, env)
                .await
                .into_iter()
                .collect();
        }
        let job = match self.state.store.get_job(self.tenant, id).await {
            Ok(Some(job)) => job,
            _ => {
                return queue_status(&self.state, self.tenant, env)
                    .await
                    .into_iter()
                    .collect();
            }
        };
        let audience = match self.audience.get(&id) {
            Some(Audience::Finished) | None => self.audience_of_job(&job),
            Some(a) => *a,
        };
        let mine = audience == Audience::Mine;
        let pid = job.id.to_string();
        let now = Utc::now().timestamp_millis();
        let msg = |t: &str, data: Value| Frame::text(json!({"type": t, "data": data}).to_string());
        match kind.as_str() {
            "job.started" if mine => {
                out.push(msg(
                    "execution_start",
                    json!({"prompt_id": pid, "timestamp": now}),
                ));
            }
            "job.completed" if mine => {
                if let Ok(entry) = history_entry(&self.state, &job).await
                    && let Some(nodes) = entry["outputs"].as_object()
                {
                    for (node, output) in nodes {
                        out.push(msg(
                            "executed",
                            json!({"node": node, "display_node": node, "output": output, "prompt_id": pid}),
                        ));
                    }
                }
                out.push(msg(
                    "execution_success",
                    json!({"prompt_id": pid, "timestamp": now}),
                ));
            }
            "job.failed" if mine => {
                out.push(msg("execution_error", execution_error_data(&job, now)));
            }
            // A prompt deleted from the queue never started: ComfyUI says nothing of
            // it. An interruption goes to everyone when the prompt had no client.
            "job.cancelled"
                if job.started_at.is_some()
                    && matches!(audience, Audience::Mine | Audience::Everyone) =>
            {
                out.push(msg("execution_interrupted", interrupted_data(&job, now)));
            }
            _ => {}
        }
        if kind != "job.started" {
            out.extend(queue_status(&self.state, self.tenant, env).await);
        }
        // ComfyUI's reliable end marker comes after the queue status.
        if mine && job.status.is_terminal() && job.started_at.is_some() {
            out.push(msg("executing", json!({"node": null, "prompt_id": pid})));
        }
        self.remember(
            id,
            if job.status.is_terminal() {
                Audience::Finished
            } else {
                audience
            },
        );
        out
    }

    /// Keeps what a job is to this socket; forgets finished jobs when many piled up
    /// on a long-lived socket.
    fn remember(&mut self, id: JobId, audience: Audience) {
        if self.audience.len() >= MAX_REMEMBERED_JOBS {
            self.audience.retain(|_, a| *a != Audience::Finished);
        }
        self.audience.insert(id, audience);
    }
}

/// The queue `status` ComfyUI broadcasts on every queue change: the same for every
/// socket of the tenant, so read and rendered once per pod and event.
async fn queue_status(state: &AppState, tenant: TenantId, env: &SharedEnvelope) -> Option<Frame> {
    let state = state.clone();
    env.rendered_async(Dialect::ComfyWs, move |_| async move {
        let remaining = state.store.count_active_jobs(tenant).await.ok()?;
        Some(Frame::text(
            json!({"type": "status", "data": {"status": {"exec_info": {
                "queue_remaining": remaining}}}})
            .to_string(),
        ))
    })
    .await
}

/// A relayed ComfyUI message, as the worker's ComfyUI wrote it.
fn relayed_text(env: &Envelope) -> Option<Frame> {
    Frame::text_from(env.payload.clone())
}

/// Binary type 1 for sockets without preview metadata: image type (1 JPEG, 2 PNG),
/// then the image.
fn preview_image(env: &Envelope) -> Option<Frame> {
    let image_type: u32 = match env.meta.get(meta_keys::MIME) {
        Some("image/png") => 2,
        _ => 1,
    };
    let mut buf = BytesMut::with_capacity(8 + env.payload.len());
    buf.put_u32(PREVIEW_IMAGE);
    buf.put_u32(image_type);
    buf.put_slice(&env.payload);
    Some(Frame::Binary(buf.freeze()))
}

/// Binary type 4 for sockets that negotiated `supports_preview_metadata`: the JSON
/// metadata's length, the metadata, then the image.
fn preview_with_metadata(env: &Envelope) -> Option<Frame> {
    let node = env.meta.get(meta_keys::NODE).unwrap_or_default();
    let metadata = json!({
        "node_id": node,
        "prompt_id": env.job?.to_string(),
        "display_node_id": node,
        "parent_node_id": null,
        "real_node_id": node,
        "image_type": env.meta.get(meta_keys::MIME).unwrap_or("image/jpeg"),
    })
    .to_string();
    let mut buf = BytesMut::with_capacity(8 + metadata.len() + env.payload.len());
    buf.put_u32(PREVIEW_IMAGE_WITH_METADATA);
    buf.put_u32(metadata.len() as u32);
    buf.put_slice(metadata.as_bytes());
    buf.put_slice(&env.payload);
    Some(Frame::Binary(buf.freeze()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::ids::TenantId;

    fn preview(mime: &str) -> Envelope {
        Envelope::preview(
            TenantId::new(),
            JobId::new(),
            3,
            "7",
            mime,
            Bytes::from_static(b"IMG"),
        )
        .unwrap()
    }

    #[test]
    fn preview_frames_use_comfyui_binary_framing() {
        let Some(Frame::Binary(b)) = preview_image(&preview("image/png")) else {
            panic!("a binary frame")
        };
        assert_eq!(&b[..], &[0, 0, 0, 1, 0, 0, 0, 2, b'I', b'M', b'G']);
        let Some(Frame::Binary(b)) = preview_image(&preview("image/jpeg")) else {
            panic!("a binary frame")
        };
        assert_eq!(&b[4..8], &[0, 0, 0, 1]);
    }

    #[test]
    fn metadata_previews_carry_node_and_prompt() {
        let env = preview("image/jpeg");
        let Some(Frame::Binary(b)) = preview_with_metadata(&env) else {
            panic!("a binary frame")
        };
        assert_eq!(&b[..4], &[0, 0, 0, 4]);
        let len = u32::from_be_bytes(b[4..8].try_into().unwrap()) as usize;
        let meta: Value = serde_json::from_slice(&b[8..8 + len]).unwrap();
        assert_eq!(meta["node_id"], "7");
        assert_eq!(meta["prompt_id"], env.job.unwrap().to_string());
        assert_eq!(meta["image_type"], "image/jpeg");
        assert_eq!(&b[8 + len..], b"IMG");
    }

    #[test]
    fn relayed_text_refuses_bytes_that_are_not_utf8() {
        let env = Envelope::new(
            TenantId::new(),
            EnvelopeKind::Control,
            Bytes::from_static(&[0xff, 0xfe]),
        );
        assert!(relayed_text(&env).is_none());
    }
}

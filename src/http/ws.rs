//! WebSocket plumbing shared by the stream dialects (`session_ws`, `cloud_ws`, `comfy_ws`): the
//! upgrade, the socket settings, and closing with a code.
//!
//! The upgrade is done here over poem's raw [`Upgraded`](poem::Upgraded) connection
//! rather than with `poem::web::websocket::WebSocket`, because poem's `Message`
//! carries `Vec<u8>`/`String`: every send would copy the shared rendered bytes (a
//! 200 KB preview, once per connection) before tungstenite copies them again into
//! its write buffer. tungstenite's own `Message` takes `Bytes`, so a frame rendered
//! once per pod goes to every socket as a reference-counted handle.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use poem::http::{HeaderMap, HeaderName, Method, StatusCode, header};
use poem::{Request, Response};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Error as WsError;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::Utf8Bytes;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::Frame as WireFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};

use super::problem::Problem;
use crate::bus::Frame;

/// A server-side socket over poem's upgraded connection.
pub type Socket = WebSocketStream<poem::Upgraded>;

/// Read buffer per socket. tungstenite allocates it eagerly and defaults to 128 KiB
/// (DESIGN §9: 10,000 idle clients would cost 1.3 GB); clients of these streams
/// send a few small control messages at most. It is also the most tungstenite reads
/// per call, so a rare large client message takes a few more reads; at 4 KiB the
/// buffer alone was a third of an idle socket's cost (BENCHMARKS.md).
pub const READ_BUFFER_BYTES: usize = 512;
/// Largest client message the dialects accept; a bigger one is answered with close
/// code [`CLOSE_TOO_BIG`] after it has been read whole, so the close handshake
/// stays clean.
pub const MAX_CLIENT_MESSAGE: usize = 64 * 1024;
/// Hard transport limit: tungstenite stops reading past it (the socket is then
/// dropped without a clean close). Well above [`MAX_CLIENT_MESSAGE`] so that the
/// application check, which can close politely, is the one clients normally meet.
const TRANSPORT_MAX_MESSAGE: usize = 1024 * 1024;
/// How long a close waits for the client's closing handshake before dropping it.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// Close code: the client sent a message larger than [`MAX_CLIENT_MESSAGE`].
pub const CLOSE_TOO_BIG: u16 = 1009;
/// Close code: the client sent a binary frame to a text-only protocol.
pub const CLOSE_UNSUPPORTED_DATA: u16 = 1003;
/// Close code: the client broke the protocol's rules (message flood, bad query).
pub const CLOSE_POLICY: u16 = 1008;
/// Close code: the server could not read the event log to replay; reconnect and
/// resume with the last event id received.
pub const CLOSE_INTERNAL: u16 = 1011;
/// Close code: the credential is missing or was refused.
pub const CLOSE_UNAUTHENTICATED: u16 = 4001;
/// Close code: a cookie-authenticated upgrade came from a foreign `Origin`.
pub const CLOSE_FORBIDDEN_ORIGIN: u16 = 4003;

/// Binary frames longer than this go out as fragments of this size. tungstenite
/// keeps its write buffer at the largest size it ever reached, for the life of the
/// socket: one 200 KB preview would leave every watcher holding 200 KB. With a small
/// write batch (below) and previews fragmented, the buffer stays near this size; the
/// fragments are slices of the shared frame, copied only into that buffer.
pub const FRAGMENT_BYTES: usize = 16 * 1024;

/// Frames are gathered in the write buffer up to this size before they are written
/// out, and a flush writes the rest: a connection that is behind sends what is
/// pending with one write instead of one per frame (fewer syscalls and wake-ups on
/// both ends just when the pod is busiest). The buffer keeps the largest size it
/// reached, so this is also about what a busy socket holds after the burst.
pub const WRITE_BATCH_BYTES: usize = 2 * 1024;

/// Most outbox items a connection sends before it flushes; a fair share of the
/// pod's time for each socket, however far behind it is.
pub const SEND_BURST: usize = 32;

fn config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER_BYTES)
        .write_buffer_size(WRITE_BATCH_BYTES)
        .max_message_size(Some(TRANSPORT_MAX_MESSAGE))
        .max_frame_size(Some(TRANSPORT_MAX_MESSAGE))
}

fn has_token(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Answers a WebSocket handshake with 101 and runs `run` on the socket once the
/// connection is upgraded; anything else is answered 426 (problem+json).
///
/// The connection task is spawned on the runtime: it ends when the client leaves or
/// when the hub closes its connection at shutdown ([`crate::hub::CloseReason`]).
pub fn upgrade<F, Fut>(req: &Request, run: F) -> Response
where
    F: FnOnce(Socket) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let headers = req.headers();
    let key = headers.get(header::SEC_WEBSOCKET_KEY);
    let valid = req.method() == Method::GET
        && has_token(headers, header::UPGRADE, "websocket")
        && has_token(headers, header::CONNECTION, "upgrade")
        && headers
            .get(header::SEC_WEBSOCKET_VERSION)
            .is_some_and(|v| v == "13");
    let (Some(key), true) = (key, valid) else {
        return Problem::new(
            StatusCode::UPGRADE_REQUIRED,
            "websocket_required",
            "this endpoint speaks WebSocket (RFC 6455, version 13) only",
        )
        .into_poem_response();
    };
    let Ok(on_upgrade) = req.take_upgrade() else {
        return Problem::new(
            StatusCode::BAD_REQUEST,
            "websocket_required",
            "this connection cannot be upgraded",
        )
        .into_poem_response();
    };
    let accept = derive_accept_key(key.as_bytes());
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let socket = WebSocketStream::from_raw_socket(upgraded, Role::Server, Some(config())).await;
        // A task of its own, sized for the connection's future alone: awaited here,
        // this task would also keep the upgrade's state (and `run`'s captures, moved
        // out but still allocated) for the socket's whole life.
        tokio::spawn(run(socket));
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, "websocket")
        .header(header::SEC_WEBSOCKET_ACCEPT, accept)
        .finish()
}

/// The socket message for a rendered frame: shares the frame's bytes.
pub fn message(frame: Frame) -> Message {
    match frame {
        Frame::Text(text) => Message::Text(text),
        Frame::Binary(bytes) => Message::Binary(bytes),
    }
}

/// Sends a rendered frame, a long binary one in [`FRAGMENT_BYTES`] fragments (which
/// every WebSocket client reassembles into one message).
pub async fn send_frame(socket: &mut Socket, frame: Frame) -> Result<(), WsError> {
    feed_frame(socket, frame).await?;
    socket.flush().await
}

/// Like [`send_frame`], but what fits in the write buffer waits there for the next
/// flush: a connection that finds several frames pending sends them with one write.
pub async fn feed_frame(socket: &mut Socket, frame: Frame) -> Result<(), WsError> {
    let bytes = match frame {
        Frame::Binary(bytes) if bytes.len() > FRAGMENT_BYTES => bytes,
        other => return socket.feed(message(other)).await,
    };
    let mut start = 0;
    while start < bytes.len() {
        let end = (start + FRAGMENT_BYTES).min(bytes.len());
        let opcode = if start == 0 {
            OpCode::Data(Data::Binary)
        } else {
            OpCode::Data(Data::Continue)
        };
        let fragment = WireFrame::message(bytes.slice(start..end), opcode, end == bytes.len());
        socket.feed(Message::Frame(fragment)).await?;
        start = end;
    }
    Ok(())
}

/// A text message from a string built for one connection (replies, replays).
pub fn text(s: String) -> Message {
    Message::Text(Utf8Bytes::from(s))
}

/// Sends a close frame and waits briefly for the client's reply, so the client sees
/// the code rather than a reset. `reason` must stay under 123 bytes.
pub async fn close(socket: &mut Socket, code: u16, reason: &str) {
    let frame = CloseFrame {
        code: CloseCode::from(code),
        reason: Utf8Bytes::from(reason),
    };
    if socket.send(Message::Close(Some(frame))).await.is_err() {
        return;
    }
    let _ = tokio::time::timeout(CLOSE_GRACE, async {
        while let Some(Ok(_)) = socket.next().await {}
    })
    .await;
}

/// Reads a socket only after its read side has signalled, instead of every time
/// the connection task wakes.
///
/// A connection task sleeps in a `select!` over the client's socket and its outbox,
/// and a plain `select!` polls both whenever either wakes it. Stream clients send
/// next to nothing while the outbox wakes the task for every burst, and polling the
/// read side (tungstenite, its waker proxy, poem's split halves, tokio's readiness)
/// found nothing ~10 % of a fan-out pod's CPU (BENCHMARKS.md, profile). The gate
/// hands the socket a waker of its own that marks the read side ready before it
/// wakes the task; until then a poll costs one atomic swap.
pub struct ReadGate {
    signal: Arc<ReadSignal>,
    /// The waker given to the socket: `signal`'s, made once.
    waker: Waker,
    /// The task waker last handed to `signal`: the same task polls every time, so
    /// it is handed over again only if it changed.
    task: Option<Waker>,
}

struct ReadSignal {
    /// The socket may have something: poll it. Starts true, and stays true after a
    /// message (more may be buffered).
    ready: AtomicBool,
    /// Kept, not taken, when woken (unlike an `AtomicWaker`): the gate does not
    /// register it again on every poll.
    task: Mutex<Option<Waker>>,
}

impl Wake for ReadSignal {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.ready.store(true, Ordering::Release);
        if let Some(task) = &*self.task.lock().unwrap_or_else(|e| e.into_inner()) {
            task.wake_by_ref();
        }
    }
}

impl Default for ReadGate {
    fn default() -> Self {
        let signal = Arc::new(ReadSignal {
            ready: AtomicBool::new(true),
            task: Mutex::new(None),
        });
        Self {
            waker: Waker::from(signal.clone()),
            signal,
            task: None,
        }
    }
}

impl ReadGate {
    /// The socket's next message, as `socket.next()`; cancel-safe like it.
    pub async fn next(&mut self, socket: &mut Socket) -> Option<Result<Message, WsError>> {
        std::future::poll_fn(|cx| self.poll_next(socket, cx)).await
    }

    fn poll_next(
        &mut self,
        socket: &mut Socket,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Message, WsError>>> {
        if !self.task.as_ref().is_some_and(|t| t.will_wake(cx.waker())) {
            let task = cx.waker().clone();
            *self.signal.task.lock().unwrap_or_else(|e| e.into_inner()) = Some(task.clone());
            self.task = Some(task);
        }
        // Registered first, so a signal that lands after this swap wakes the task.
        if !self.signal.ready.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        let read = socket.poll_next_unpin(&mut Context::from_waker(&self.waker));
        if read.is_ready() {
            self.signal.ready.store(true, Ordering::Release);
        }
        read
    }
}

/// What a dialect should do with a message from its client.
pub enum Incoming {
    /// A text message within the size limit.
    Text(Utf8Bytes),
    /// Nothing to do (ping/pong are answered by tungstenite).
    Ignore,
    /// The client closed or the connection failed.
    Gone,
    /// Close with this code and reason.
    Refuse(u16, &'static str),
}

/// Classifies what the socket read. Both dialects speak text only: a binary
/// message is refused with [`CLOSE_UNSUPPORTED_DATA`].
pub fn classify(read: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>) -> Incoming {
    use tokio_tungstenite::tungstenite::Error;
    match read {
        None | Some(Err(Error::ConnectionClosed | Error::AlreadyClosed)) => Incoming::Gone,
        Some(Err(Error::Capacity(_))) => Incoming::Refuse(CLOSE_TOO_BIG, "message too big"),
        Some(Err(_)) => Incoming::Gone,
        Some(Ok(Message::Close(_))) => Incoming::Gone,
        Some(Ok(Message::Text(t))) if t.len() > MAX_CLIENT_MESSAGE => {
            Incoming::Refuse(CLOSE_TOO_BIG, "message too big (64 KiB at most)")
        }
        Some(Ok(Message::Text(t))) => Incoming::Text(t),
        Some(Ok(Message::Binary(b))) if b.len() > MAX_CLIENT_MESSAGE => {
            Incoming::Refuse(CLOSE_TOO_BIG, "message too big (64 KiB at most)")
        }
        Some(Ok(Message::Binary(_))) => {
            Incoming::Refuse(CLOSE_UNSUPPORTED_DATA, "binary messages are not accepted")
        }
        Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => Incoming::Ignore,
    }
}

/// Whether the `Origin` of a browser request names this server: the request's own
/// `Host`, or the host of the public URL. A missing `Origin` (non-browser clients)
/// passes; browsers always send one on a WebSocket handshake.
pub fn same_origin(req: &Request, public_url: &url::Url) -> bool {
    let Some(origin) = req.headers().get(header::ORIGIN) else {
        return true;
    };
    let Some(origin) = origin.to_str().ok().and_then(|o| url::Url::parse(o).ok()) else {
        return false;
    };
    let Some(origin_host) = origin.host_str() else {
        return false;
    };
    let origin_authority = match origin.port() {
        Some(port) => format!("{origin_host}:{port}"),
        None => origin_host.to_owned(),
    };
    let host_header = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok());
    if host_header.is_some_and(|h| h.eq_ignore_ascii_case(&origin_authority)) {
        return true;
    }
    public_url.origin() == origin.origin()
}

/// A token bucket over client messages, refilled by elapsed time when a message
/// arrives: no timer per connection.
#[derive(Debug)]
pub struct RateLimit {
    tokens: f64,
    burst: f64,
    per_second: f64,
    last: tokio::time::Instant,
}

impl RateLimit {
    pub fn new(burst: u32, per_second: u32) -> Self {
        Self {
            tokens: f64::from(burst),
            burst: f64::from(burst),
            per_second: f64::from(per_second),
            last: tokio::time::Instant::now(),
        }
    }

    /// Takes a token for one message; false when the client is flooding.
    pub fn allow(&mut self) -> bool {
        let now = tokio::time::Instant::now();
        let refill = now.duration_since(self.last).as_secs_f64() * self.per_second;
        self.tokens = (self.tokens + refill).min(self.burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The close for a stream whose event-log replay failed: logged, with a reason that
/// tells the client how to resume (`hint` names the dialect's way, e.g.
/// "reconnect with since").
pub fn log_unavailable(
    e: &crate::store::StoreError,
    resume: Option<i64>,
    hint: &str,
) -> (u16, String) {
    tracing::error!(error = %e, "a stream could not read the event log");
    let reason = match resume {
        Some(id) => format!("event log unavailable; {hint}={id}"),
        None => "event log unavailable; reconnect".to_owned(),
    };
    (CLOSE_INTERNAL, reason)
}

//! What travels on the bus: the [`Envelope`], its binary codec, and the per-envelope
//! render cache ([`SharedEnvelope`]) that lets every connection of a pod share one
//! rendering per dialect.
//!
//! Wire format, version 1 (all integers big-endian):
//!
//! ```text
//! offset size field
//!      0    1 version (1)
//!      1    1 kind (EnvelopeKind as u8)
//!      2    1 flags (bit 0: a job id is present; other bits must be 0)
//!      3    1 reserved (0)
//!      4   16 tenant uuid
//!     20   16 job uuid (all zero when absent)
//!     36    8 id
//!     44    8 published_at_micros
//!     52    2 meta length M
//!     54    M meta: entries of (u8 key len, key, u16 value len, value), UTF-8
//! 54 + M    * payload, to the end of the frame
//! ```
//!
//! The payload is the rest of the frame, so previews travel as raw image bytes (never
//! base64) and decoding slices them out of the received buffer without copying.

use std::fmt;
use std::sync::{Arc, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};
use tokio_tungstenite::tungstenite::Utf8Bytes;
use uuid::Uuid;

use crate::domain::ids::{JobId, TenantId};

/// The codec version this build writes and reads.
pub const VERSION: u8 = 1;
/// Size of the fixed header that precedes the meta block.
pub const HEADER_LEN: usize = 54;
const FLAG_HAS_JOB: u8 = 0b0000_0001;

/// Well-known meta keys, so publishers and renderers agree on spelling.
pub mod meta_keys {
    /// The event or message type: `job.completed`, `progress`, `status`, …
    /// Pattern matching (`job.*`) reads this without parsing the payload.
    pub const TYPE: &str = "type";
    /// The ComfyUI node a progress or preview frame is about.
    pub const NODE: &str = "node";
    /// The preview's media type (`image/jpeg`, `image/png`).
    pub const MIME: &str = "mime";
    /// An event's predecessor in its tenant's log (decimal id): lets a pod put
    /// events that reached it out of order back in log order.
    pub const PREV: &str = "prev";
}

/// What an envelope carries; decides how the hub delivers it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum EnvelopeKind {
    /// A durable lifecycle event (`job.*`, `input.*`, `model.*`); `id` is its event-log id.
    /// Delivered in order, never dropped.
    Event = 1,
    /// Execution progress of a job; latest-wins.
    Progress = 2,
    /// A live preview image of a job; `id` is the preview sequence; latest-wins.
    Preview = 3,
    /// A full status snapshot of a job (the SSE dialect); latest-wins.
    JobStatus = 4,
    /// Anything else (queue status broadcasts, worker wake-ups); latest-wins per type.
    Control = 5,
}

impl EnvelopeKind {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::Event,
            2 => Self::Progress,
            3 => Self::Preview,
            4 => Self::JobStatus,
            5 => Self::Control,
            _ => return None,
        })
    }

    /// Durable kinds must reach the client or the client must be told to resume;
    /// the others only matter in their newest state.
    pub fn is_durable(self) -> bool {
        matches!(self, Self::Event)
    }
}

/// Why a frame could not be decoded. Frames come from the network, so every
/// malformation is an error, never a panic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("frame is {0} bytes, shorter than the {HEADER_LEN}-byte header")]
    TooShort(usize),
    #[error("unsupported envelope version {0}")]
    Version(u8),
    #[error("unknown envelope kind {0}")]
    Kind(u8),
    #[error("unknown flag bits {0:#04x}")]
    Flags(u8),
    #[error("a job id is set but the has-job flag is not")]
    StrayJob,
    #[error("meta block of {declared} bytes overruns the frame")]
    MetaOverrun { declared: usize },
    #[error("malformed meta block: {0}")]
    Meta(#[from] MetaError),
}

/// Why a meta block was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetaError {
    #[error("meta entry is truncated")]
    Truncated,
    #[error("meta key is empty")]
    EmptyKey,
    #[error("meta key is longer than 255 bytes")]
    KeyTooLong,
    #[error("meta value is longer than 65535 bytes")]
    ValueTooLong,
    #[error("meta block is longer than 65535 bytes")]
    TooLarge,
    #[error("meta is not UTF-8")]
    NotUtf8,
}

/// Small string key/value annotations that let the pod route and match an envelope
/// without parsing its payload. Stored in its encoded form (validated once), so
/// decoding a frame does not allocate per entry.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Meta {
    raw: Bytes,
}

impl Meta {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds an entry. Keys should come from [`meta_keys`]; later duplicates are
    /// ignored by [`Meta::get`].
    pub fn with(self, key: &str, value: &str) -> Result<Self, MetaError> {
        if key.is_empty() {
            return Err(MetaError::EmptyKey);
        }
        let key_len = u8::try_from(key.len()).map_err(|_| MetaError::KeyTooLong)?;
        let value_len = u16::try_from(value.len()).map_err(|_| MetaError::ValueTooLong)?;
        let total = self.raw.len() + 3 + key.len() + value.len();
        if total > usize::from(u16::MAX) {
            return Err(MetaError::TooLarge);
        }
        let mut buf = BytesMut::with_capacity(total);
        buf.extend_from_slice(&self.raw);
        buf.put_u8(key_len);
        buf.extend_from_slice(key.as_bytes());
        buf.put_u16(value_len);
        buf.extend_from_slice(value.as_bytes());
        Ok(Self { raw: buf.freeze() })
    }

    /// Meta with just a type, the common case.
    pub fn typed(event_type: &str) -> Result<Self, MetaError> {
        Self::new().with(meta_keys::TYPE, event_type)
    }

    fn parse(raw: Bytes) -> Result<Self, MetaError> {
        let mut rest = &raw[..];
        while !rest.is_empty() {
            let (_, _, tail) = split_entry(rest)?;
            rest = tail;
        }
        Ok(Self { raw })
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.iter().find(|(k, _)| *k == key).map(|(_, v)| v)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        let mut rest = &self.raw[..];
        std::iter::from_fn(move || {
            if rest.is_empty() {
                return None;
            }
            // Validated at construction, so this never fails; stop quietly if it did.
            // Not validated again: the hub's filters read the type of every envelope
            // once per connection, and re-checking UTF-8 there was ~2 % of a fan-out
            // pod's instructions (BENCHMARKS.md, profile).
            let (k, v, tail) = split_entry_bytes(rest).ok()?;
            rest = tail;
            // SAFETY: `raw` only ever holds entries built from `&str` (`Meta::with`)
            // or checked by `split_entry` (`Meta::parse`), so both are UTF-8.
            Some(unsafe {
                (
                    std::str::from_utf8_unchecked(k),
                    std::str::from_utf8_unchecked(v),
                )
            })
        })
    }

    pub fn is_empty(&self) -> bool {
        self.raw.is_empty()
    }

    fn encoded_len(&self) -> usize {
        self.raw.len()
    }
}

/// One `(key, value, rest)` off the front of an encoded meta block.
fn split_entry(buf: &[u8]) -> Result<(&str, &str, &[u8]), MetaError> {
    let (key, value, rest) = split_entry_bytes(buf)?;
    let key = std::str::from_utf8(key).map_err(|_| MetaError::NotUtf8)?;
    let value = std::str::from_utf8(value).map_err(|_| MetaError::NotUtf8)?;
    Ok((key, value, rest))
}

/// A meta entry's key and value, unchecked, and the rest of the block.
type RawEntry<'a> = (&'a [u8], &'a [u8], &'a [u8]);

/// [`split_entry`] without the UTF-8 check.
fn split_entry_bytes(buf: &[u8]) -> Result<RawEntry<'_>, MetaError> {
    let (&key_len, buf) = buf.split_first().ok_or(MetaError::Truncated)?;
    let key_len = usize::from(key_len);
    if key_len == 0 {
        return Err(MetaError::EmptyKey);
    }
    if buf.len() < key_len + 2 {
        return Err(MetaError::Truncated);
    }
    let (key, buf) = buf.split_at(key_len);
    let value_len = usize::from(u16::from_be_bytes([buf[0], buf[1]]));
    let buf = &buf[2..];
    if buf.len() < value_len {
        return Err(MetaError::Truncated);
    }
    let (value, rest) = buf.split_at(value_len);
    Ok((key, value, rest))
}

impl fmt::Debug for Meta {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

/// One message on the bus.
#[derive(Clone, PartialEq, Eq)]
pub struct Envelope {
    /// Whose clients may see it; also picks the Redis channel.
    pub tenant: TenantId,
    pub kind: EnvelopeKind,
    pub job: Option<JobId>,
    /// Event: the durable event-log id (clients resume after it). Preview: the
    /// preview sequence. Others: a publisher sequence, for ordering and debugging.
    pub id: u64,
    /// When the publisher sent it, for end-to-end latency measurement.
    pub published_at_micros: u64,
    pub meta: Meta,
    /// JSON for events, progress and status; raw image bytes for previews.
    pub payload: Bytes,
}

impl Envelope {
    /// An envelope stamped with the current time.
    pub fn new(tenant: TenantId, kind: EnvelopeKind, payload: Bytes) -> Self {
        Self {
            tenant,
            kind,
            job: None,
            id: 0,
            published_at_micros: now_micros(),
            meta: Meta::new(),
            payload,
        }
    }

    /// A durable lifecycle event with its event-log id and type (`job.completed`).
    pub fn event(
        tenant: TenantId,
        job: Option<JobId>,
        id: u64,
        event_type: &str,
        payload: Bytes,
    ) -> Result<Self, MetaError> {
        Ok(Self {
            job,
            id,
            meta: Meta::typed(event_type)?,
            ..Self::new(tenant, EnvelopeKind::Event, payload)
        })
    }

    /// A raw preview image of a job.
    pub fn preview(
        tenant: TenantId,
        job: JobId,
        preview_seq: u64,
        node: &str,
        mime: &str,
        image: Bytes,
    ) -> Result<Self, MetaError> {
        Ok(Self {
            job: Some(job),
            id: preview_seq,
            meta: Meta::new()
                .with(meta_keys::NODE, node)?
                .with(meta_keys::MIME, mime)?,
            ..Self::new(tenant, EnvelopeKind::Preview, image)
        })
    }

    /// The `type` meta entry, which event patterns match against.
    pub fn event_type(&self) -> Option<&str> {
        self.meta.get(meta_keys::TYPE)
    }

    /// An event's predecessor in its tenant's log, when the publisher knew it.
    pub fn prev_event_id(&self) -> Option<u64> {
        self.meta.get(meta_keys::PREV)?.parse().ok()
    }

    pub fn encoded_len(&self) -> usize {
        HEADER_LEN + self.meta.encoded_len() + self.payload.len()
    }

    /// The wire form. Copies the payload once, on the publisher side.
    pub fn encode(&self) -> Bytes {
        let mut buf = BytesMut::with_capacity(self.encoded_len());
        buf.put_u8(VERSION);
        buf.put_u8(self.kind as u8);
        buf.put_u8(if self.job.is_some() { FLAG_HAS_JOB } else { 0 });
        buf.put_u8(0);
        buf.extend_from_slice(self.tenant.as_uuid().as_bytes());
        match self.job {
            Some(job) => buf.extend_from_slice(job.as_uuid().as_bytes()),
            None => buf.put_bytes(0, 16),
        }
        buf.put_u64(self.id);
        buf.put_u64(self.published_at_micros);
        // Meta cannot exceed u16::MAX: `Meta::with` refuses to grow past it.
        buf.put_u16(self.meta.encoded_len() as u16);
        buf.extend_from_slice(&self.meta.raw);
        buf.extend_from_slice(&self.payload);
        buf.freeze()
    }

    /// Parses a frame. The payload (and meta) are slices of `frame`: no copy.
    pub fn decode(frame: Bytes) -> Result<Self, DecodeError> {
        if frame.len() < HEADER_LEN {
            return Err(DecodeError::TooShort(frame.len()));
        }
        let h = &frame[..HEADER_LEN];
        if h[0] != VERSION {
            return Err(DecodeError::Version(h[0]));
        }
        let kind = EnvelopeKind::from_u8(h[1]).ok_or(DecodeError::Kind(h[1]))?;
        let flags = h[2];
        if flags & !FLAG_HAS_JOB != 0 || h[3] != 0 {
            return Err(DecodeError::Flags(flags | h[3]));
        }
        let tenant = TenantId::from_uuid(Uuid::from_bytes(field(h, 4)));
        let job_bytes: [u8; 16] = field(h, 20);
        let job = if flags & FLAG_HAS_JOB != 0 {
            Some(JobId::from_uuid(Uuid::from_bytes(job_bytes)))
        } else if job_bytes != [0; 16] {
            return Err(DecodeError::StrayJob);
        } else {
            None
        };
        let id = u64::from_be_bytes(field(h, 36));
        let published_at_micros = u64::from_be_bytes(field(h, 44));
        let meta_len = usize::from(u16::from_be_bytes(field(h, 52)));
        let meta_end = HEADER_LEN + meta_len;
        if frame.len() < meta_end {
            return Err(DecodeError::MetaOverrun { declared: meta_len });
        }
        let meta = Meta::parse(frame.slice(HEADER_LEN..meta_end))?;
        Ok(Self {
            tenant,
            kind,
            job,
            id,
            published_at_micros,
            meta,
            payload: frame.slice(meta_end..),
        })
    }
}

/// A fixed-size field of the header; the caller has checked the header length.
fn field<const N: usize>(header: &[u8], at: usize) -> [u8; N] {
    let mut out = [0; N];
    out.copy_from_slice(&header[at..at + N]);
    out
}

impl fmt::Debug for Envelope {
    // The payload may be a 200 KB image: show its size, not its bytes.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Envelope")
            .field("tenant", &self.tenant)
            .field("kind", &self.kind)
            .field("job", &self.job)
            .field("id", &self.id)
            .field("published_at_micros", &self.published_at_micros)
            .field("meta", &self.meta)
            .field("payload_len", &self.payload.len())
            .finish()
    }
}

/// Microseconds since the Unix epoch (0 if the clock is before it).
pub fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// The wire dialects a pod renders envelopes into; each renders at most once per
/// envelope per pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dialect {
    /// Seed 000: `WS /api/run/ws`.
    SessionStream,
    /// Seed 000 with `?preview_meta=1`: the JSON text frame announcing a preview.
    SessionPreviewMeta,
    /// Seed 002: `WS /developer/api/v1/ws`.
    CloudWs,
    /// Seed 001: ComfyUI `/ws` for sockets without preview metadata.
    ComfyWs,
    /// Seed 001: ComfyUI `/ws` for sockets that negotiated `supports_preview_metadata`.
    ComfyWsMeta,
    /// Seed 003: SSE status snapshots.
    Sse,
}

impl Dialect {
    pub const COUNT: usize = 6;
    pub const ALL: [Dialect; Self::COUNT] = [
        Self::SessionStream,
        Self::SessionPreviewMeta,
        Self::CloudWs,
        Self::ComfyWs,
        Self::ComfyWsMeta,
        Self::Sse,
    ];
}

/// A rendered wire frame. Cloning shares the bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// Checked as UTF-8 once, when rendered: tungstenite's type, so a WebSocket
    /// send takes it as is instead of checking it again for every socket.
    Text(Utf8Bytes),
    Binary(Bytes),
}

impl Frame {
    pub fn text(s: String) -> Self {
        Self::Text(Utf8Bytes::from(s))
    }

    /// A text frame of bytes from elsewhere (a published payload); `None` if they
    /// are not UTF-8.
    pub fn text_from(bytes: Bytes) -> Option<Self> {
        Utf8Bytes::try_from(bytes).ok().map(Self::Text)
    }

    pub fn bytes(&self) -> &Bytes {
        match self {
            Self::Text(text) => text.as_ref(),
            Self::Binary(b) => b,
        }
    }

    /// The text of a text frame.
    pub fn as_text(&self) -> Option<&str> {
        match self {
            Self::Text(text) => Some(text.as_str()),
            Self::Binary(_) => None,
        }
    }
}

/// A decoded envelope shared by every connection of the pod, with a lazily filled
/// render cache: the first connection of a dialect renders, the rest clone bytes.
#[derive(Clone)]
pub struct SharedEnvelope(Arc<SharedInner>);

struct SharedInner {
    envelope: Envelope,
    /// `None` inside means "this dialect does not show this envelope", cached too.
    rendered: [OnceLock<Option<Frame>>; Dialect::COUNT],
    /// The cache of renderers that must await something (a store read), allocated
    /// on first use so envelopes no such dialect looks at stay small. A dialect uses
    /// either this cache or `rendered`, never both.
    rendered_async: OnceLock<Box<AsyncCache>>,
}

type AsyncCache = [tokio::sync::OnceCell<Option<Frame>>; Dialect::COUNT];

impl SharedEnvelope {
    pub fn new(envelope: Envelope) -> Self {
        Self(Arc::new(SharedInner {
            envelope,
            rendered: Default::default(),
            rendered_async: OnceLock::new(),
        }))
    }

    pub fn envelope(&self) -> &Envelope {
        &self.0.envelope
    }

    /// The frame for `dialect`, rendering it with `render` only if no connection has
    /// yet. `render` must not depend on the connection: its result is shared.
    pub fn rendered(
        &self,
        dialect: Dialect,
        render: impl FnOnce(&Envelope) -> Option<Frame>,
    ) -> Option<Frame> {
        self.0.rendered[dialect as usize]
            .get_or_init(|| render(&self.0.envelope))
            .clone()
    }

    /// Like [`SharedEnvelope::rendered`] for a renderer that awaits (e.g. reads the
    /// job's outputs from the store): one connection renders, the others of the pod
    /// wait for its result instead of repeating the read. `render` gets a handle on
    /// the envelope (so its future may own it); if the rendering connection goes
    /// away mid-way, the next one renders.
    pub async fn rendered_async<F, Fut>(&self, dialect: Dialect, render: F) -> Option<Frame>
    where
        F: FnOnce(SharedEnvelope) -> Fut,
        Fut: std::future::Future<Output = Option<Frame>>,
    {
        let cache = self.0.rendered_async.get_or_init(Default::default);
        cache[dialect as usize]
            .get_or_init(|| render(self.clone()))
            .await
            .clone()
    }

    /// Whether two handles share one decoded envelope (and so one payload).
    pub fn ptr_eq(a: &Self, b: &Self) -> bool {
        Arc::ptr_eq(&a.0, &b.0)
    }
}

impl std::ops::Deref for SharedEnvelope {
    type Target = Envelope;

    fn deref(&self) -> &Envelope {
        &self.0.envelope
    }
}

impl fmt::Debug for SharedEnvelope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.envelope.fmt(f)
    }
}

#[cfg(test)]
mod tests;

//! Server state shared by the HTTP handlers, the WebSocket sessions and the
//! executor: queue, history, sockets, cache and files.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use indexmap::IndexMap;
use poem::web::websocket::Message;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Map, Value, json};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use super::SimConfig;
use super::catalog::Catalog;
use super::exec::Cache;
use super::files::{FileStore, Root};
use super::protocol;

/// Frames a socket may have waiting before the sim gives up on it. A client that
/// falls this far behind is disconnected instead of growing memory without bound.
pub const SOCKET_BACKLOG: usize = 4096;

/// A queued or running prompt: ComfyUI's `(number, prompt_id, prompt, extra_data,
/// outputs_to_execute)` tuple.
#[derive(Clone, Debug)]
pub struct QueueItem {
    pub number: Value,
    pub prompt_id: String,
    pub prompt: Map<String, Value>,
    pub extra_data: Value,
    pub outputs: Vec<String>,
}

impl QueueItem {
    pub fn to_json(&self) -> Value {
        json!([
            self.number,
            self.prompt_id,
            self.prompt,
            self.extra_data,
            self.outputs
        ])
    }

    fn sort_key(&self) -> f64 {
        self.number.as_f64().unwrap_or(0.0)
    }

    pub fn client_id(&self) -> Option<String> {
        self.extra_data
            .get("client_id")
            .and_then(Value::as_str)
            .map(str::to_owned)
    }
}

/// One registered WebSocket.
pub struct SocketEntry {
    /// Distinguishes a replaced socket from its replacement with the same sid.
    pub generation: u64,
    pub tx: mpsc::Sender<Message>,
    pub supports_preview_metadata: bool,
    /// Cancelled to drop the connection without a close frame (fault injection).
    pub kill: CancellationToken,
}

/// Runtime-switchable faults that act below the executor.
pub struct LiveFaults {
    refuse: AtomicBool,
    http_delay_ms: AtomicU64,
}

impl LiveFaults {
    pub fn set_refuse(&self, refuse: bool) {
        self.refuse.store(refuse, Ordering::Relaxed);
    }

    pub fn refusing(&self) -> bool {
        self.refuse.load(Ordering::Relaxed)
    }

    pub fn set_http_delay(&self, d: Duration) {
        self.http_delay_ms
            .store(d.as_millis() as u64, Ordering::Relaxed);
    }

    pub fn http_delay(&self) -> Duration {
        Duration::from_millis(self.http_delay_ms.load(Ordering::Relaxed))
    }
}

pub struct State {
    /// `PromptServer.number`: bumped by every `POST /prompt` that has no `number`.
    pub number: i64,
    pub pending: Vec<QueueItem>,
    pub running: Option<QueueItem>,
    pub history: IndexMap<String, Value>,
    pub sockets: HashMap<String, SocketEntry>,
    pub next_generation: u64,
    /// The running prompt's client and the node it is executing, for the
    /// `executing` frame a reconnecting client gets.
    pub current_client: Option<String>,
    pub last_node_id: Option<String>,
    pub interrupt: bool,
    pub cache: Cache,
    pub files: FileStore,
    pub rng: StdRng,
}

pub struct Shared {
    pub config: SimConfig,
    pub catalog: Catalog,
    pub state: Mutex<State>,
    /// Wakes the executor when something is queued.
    pub queued: Notify,
    /// Wakes a sleeping or hanging node when an interrupt arrives.
    pub interrupted: Notify,
    pub faults: LiveFaults,
    pub shutdown: CancellationToken,
    /// The last `/object_info` rendered and the input files it lists. Every prompt
    /// is validated against it, and rendering copies the whole catalog: done per
    /// prompt, that was a seventh of the bench process's CPU in `jobs` (BENCHMARKS.md).
    rendered: Mutex<Option<Rendered>>,
}

/// A rendered `/object_info` and the input files it lists.
struct Rendered {
    inputs: Vec<String>,
    info: Arc<Map<String, Value>>,
}

impl Shared {
    pub fn new(config: SimConfig, shutdown: CancellationToken) -> Arc<Self> {
        let rng = match config.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_entropy(),
        };
        let mut files = FileStore::default();
        // ComfyUI ships input/example.png, so LoadImage always has a valid default.
        files.put(
            Root::Input,
            "",
            "example.png",
            Bytes::from(super::pixels::example_png()),
        );
        let faults = LiveFaults {
            refuse: AtomicBool::new(config.refuse_connections),
            http_delay_ms: AtomicU64::new(config.http_delay.as_millis() as u64),
        };
        Arc::new(Self {
            catalog: Catalog::new(),
            state: Mutex::new(State {
                number: 0,
                pending: Vec::new(),
                running: None,
                history: IndexMap::new(),
                sockets: HashMap::new(),
                next_generation: 0,
                current_client: None,
                last_node_id: None,
                interrupt: false,
                cache: Cache::default(),
                files,
                rng,
            }),
            config,
            queued: Notify::new(),
            interrupted: Notify::new(),
            faults,
            shutdown,
            rendered: Mutex::new(None),
        })
    }

    pub fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock must not take the whole sim down with it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `/object_info` as of now: rendered again only when the input files changed
    /// (the models are fixed at start).
    pub fn object_info(&self) -> Arc<Map<String, Value>> {
        let inputs = self.lock().files.input_images();
        let mut rendered = self.rendered.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(last) = &*rendered
            && last.inputs == inputs
        {
            return last.info.clone();
        }
        let info = Arc::new(self.catalog.render(&self.config.models, &inputs));
        *rendered = Some(Rendered {
            inputs,
            info: info.clone(),
        });
        info
    }
}

impl State {
    pub fn queue_remaining(&self) -> usize {
        self.pending.len() + usize::from(self.running.is_some())
    }

    pub fn status_data(&self) -> Value {
        json!({"status": {"exec_info": {"queue_remaining": self.queue_remaining()}}})
    }

    /// Sends to one socket; frames for a sid with no socket are dropped, as ComfyUI does.
    pub fn send_to(&mut self, sid: &str, msg: Message) {
        let overflow = match self.sockets.get(sid) {
            Some(entry) => entry.tx.try_send(msg).is_err(),
            None => false,
        };
        if overflow && let Some(entry) = self.sockets.remove(sid) {
            entry.kill.cancel();
        }
    }

    pub fn broadcast(&mut self, msg: Message) {
        let mut dead = Vec::new();
        for (sid, entry) in &self.sockets {
            if entry.tx.try_send(msg.clone()).is_err() {
                dead.push(sid.clone());
            }
        }
        for sid in dead {
            if let Some(entry) = self.sockets.remove(&sid) {
                entry.kill.cancel();
            }
        }
    }

    pub fn send_json(&mut self, to: Option<&str>, kind: &str, data: Value) {
        let msg = Message::Text(protocol::message(kind, data));
        match to {
            Some(sid) => self.send_to(sid, msg),
            None => self.broadcast(msg),
        }
    }

    /// `PromptServer.queue_updated`: every socket gets the queue size.
    pub fn queue_updated(&mut self) {
        let data = self.status_data();
        self.send_json(None, "status", data);
    }

    pub fn supports_metadata(&self, sid: &str) -> bool {
        self.sockets
            .get(sid)
            .is_some_and(|s| s.supports_preview_metadata)
    }

    pub fn put(&mut self, item: QueueItem) {
        self.pending.push(item);
        self.queue_updated();
    }

    /// Takes the next prompt by `(number, prompt_id)`, like ComfyUI's heap.
    pub fn take_next(&mut self) -> Option<QueueItem> {
        let idx = (0..self.pending.len()).min_by(|&a, &b| {
            let (x, y) = (&self.pending[a], &self.pending[b]);
            x.sort_key()
                .total_cmp(&y.sort_key())
                .then_with(|| x.prompt_id.cmp(&y.prompt_id))
        })?;
        let item = self.pending.remove(idx);
        self.running = Some(item.clone());
        self.queue_updated();
        Some(item)
    }

    pub fn pending_sorted(&self) -> Vec<Value> {
        let mut items: Vec<&QueueItem> = self.pending.iter().collect();
        items.sort_by(|x, y| {
            x.sort_key()
                .total_cmp(&y.sort_key())
                .then_with(|| x.prompt_id.cmp(&y.prompt_id))
        });
        items.iter().map(|i| i.to_json()).collect()
    }

    pub fn random_hex_id(&mut self) -> String {
        format!("{:032x}", self.random_uuid_bits())
    }

    /// A uuid4 string, drawn from the (possibly seeded) RNG.
    pub fn random_uuid(&mut self) -> String {
        let bits = self.random_uuid_bits();
        let h = format!("{bits:032x}");
        format!(
            "{}-{}-{}-{}-{}",
            &h[0..8],
            &h[8..12],
            &h[12..16],
            &h[16..20],
            &h[20..32]
        )
    }

    fn random_uuid_bits(&mut self) -> u128 {
        let raw: u128 = self.rng.r#gen();
        (raw & !(0xf000u128 << 64) | (0x4000u128 << 64)) & !(0xc000u128 << 48) | (0x8000u128 << 48)
    }

    pub fn random_letters(&mut self, n: usize) -> String {
        (0..n)
            .map(|_| (b'a' + self.rng.gen_range(0..26u8)) as char)
            .collect()
    }
}

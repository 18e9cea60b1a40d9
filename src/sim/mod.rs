//! `comfyfleet sim`: a ComfyUI-protocol server that simulates execution.
//!
//! It speaks ComfyUI 0.3.64's HTTP and WebSocket surface (every route also under
//! `/api`), validates prompts the way ComfyUI does, and "executes" them with a
//! deterministic model of ComfyUI's executor: topological order, the classic
//! output cache, progress bars, per-step previews, and real PNG / MP4 outputs.
//! Knobs (timing, previews, faults) come from [`SimConfig`] and, per prompt, from
//! `extra_data.sim` (see [`knobs`]).
//!
//! The caller owns the listener and the shutdown token ([`run`]); tests use
//! [`spawn`], which binds a random loopback port and stops the server on drop.

mod args;
mod catalog;
mod exec;
mod files;
mod http;
pub mod knobs;
mod nodes;
mod pixels;
mod protocol;
mod state;
mod upload;
mod validate;
mod video;
mod ws;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use args::SimArgs;
pub use knobs::{NodeFault, PreviewFormat};

/// A model file the simulated server "has": it is listed in `/models/{folder}` and
/// in the option list of the loaders that read that folder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelFile {
    /// ComfyUI model folder, e.g. `checkpoints`, `diffusion_models`, `vae`.
    pub folder: String,
    /// File name as a workflow names it, e.g. `sd_xl_base_1.0.safetensors`.
    pub name: String,
}

impl ModelFile {
    pub fn new(folder: &str, name: &str) -> Self {
        Self {
            folder: folder.to_owned(),
            name: name.to_owned(),
        }
    }
}

/// The models a sim has unless told otherwise: enough for the shipped manifests
/// (SDXL, Wan 2.1 image-to-video) and the recorded fixtures.
pub fn default_models() -> Vec<ModelFile> {
    [
        ("checkpoints", "sd_xl_base_1.0.safetensors"),
        ("checkpoints", "random_sd15_fixture.safetensors"),
        ("diffusion_models", "wan2.1_i2v_720p_14B_fp16.safetensors"),
        ("text_encoders", "umt5_xxl_fp8_e4m3fn_scaled.safetensors"),
        ("vae", "wan_2.1_vae.safetensors"),
        ("clip_vision", "clip_vision_h.safetensors"),
    ]
    .iter()
    .map(|(f, n)| ModelFile::new(f, n))
    .collect()
}

/// Everything a sim can be told at start. Per-prompt overrides live in
/// `extra_data.sim` ([`knobs::PromptKnobs`]).
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Time one sampler step takes (KSampler emits one `progress` per step).
    pub step_time: Duration,
    /// Time every other executed node takes.
    pub node_time: Duration,
    /// Send a preview image per sampler step (ComfyUI's `--preview-method`
    /// other than `none`). Real ComfyUI defaults to none; the sim defaults to on
    /// because previews are what clients of the fleet are tested with.
    pub previews: bool,
    /// Longest side of a preview (ComfyUI's `--preview-size`, default 512).
    pub preview_size: u32,
    /// Encoding of sampler previews.
    pub preview_format: PreviewFormat,
    /// Seeds every generated id and random name, making a run reproducible.
    pub seed: Option<u64>,
    /// Model files the sim has.
    pub models: Vec<ModelFile>,
    /// Faults applied to every prompt (in addition to `extra_data.sim`).
    pub faults: Vec<NodeFault>,
    /// Delay before answering every HTTP request (not WebSocket frames).
    pub http_delay: Duration,
    /// Accept TCP connections and close them at once, like a server that is down.
    pub refuse_connections: bool,
    /// Reported as `max_upload_size` in `/features` and the `feature_flags` reply.
    pub max_upload_size: u64,
    /// Finished prompts kept in `/history` (ComfyUI keeps 10000).
    pub history_limit: usize,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            step_time: Duration::from_millis(20),
            node_time: Duration::ZERO,
            previews: true,
            preview_size: 512,
            preview_format: PreviewFormat::Jpeg,
            seed: None,
            models: default_models(),
            faults: Vec::new(),
            http_delay: Duration::ZERO,
            refuse_connections: false,
            max_upload_size: 100 * 1024 * 1024,
            history_limit: 10_000,
        }
    }
}

/// Serves the simulated ComfyUI on `listener` until `shutdown` is cancelled.
pub async fn run(
    listener: TcpListener,
    config: SimConfig,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let shared = state::Shared::new(config, shutdown.clone());
    serve(listener, shared, shutdown).await
}

async fn serve(
    listener: TcpListener,
    shared: Arc<state::Shared>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let executor = tokio::spawn(exec::worker(shared.clone()));
    let acceptor = http::RefusingAcceptor::new(listener, shared.clone())?;
    let app = http::app(shared.clone());
    let stop = shutdown.clone();
    let result = poem::Server::new_with_acceptor(acceptor)
        .run_with_graceful_shutdown(
            app,
            async move { stop.cancelled().await },
            Some(Duration::from_secs(1)),
        )
        .await;
    shutdown.cancel();
    let _ = executor.await;
    result
}

/// A sim running in this process on a random loopback port.
/// Dropping it shuts the server down.
pub struct SimHandle {
    addr: SocketAddr,
    shared: Arc<state::Shared>,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

/// Starts a sim on `127.0.0.1:0` in the current tokio runtime.
pub async fn spawn(config: SimConfig) -> std::io::Result<SimHandle> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let shutdown = CancellationToken::new();
    let shared = state::Shared::new(config, shutdown.clone());
    let task = tokio::spawn(serve(listener, shared.clone(), shutdown.clone()));
    Ok(SimHandle {
        addr,
        shared,
        shutdown,
        task: Some(task),
    })
}

impl SimHandle {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT` (no trailing slash).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `ws://127.0.0.1:PORT/ws?clientId=...`.
    pub fn ws_url(&self, client_id: &str) -> String {
        format!("ws://{}/ws?clientId={}", self.addr, client_id)
    }

    /// Toggles the "server is down" fault at run time.
    pub fn set_refuse_connections(&self, refuse: bool) {
        self.shared.faults.set_refuse(refuse);
    }

    /// Changes the HTTP answer delay at run time.
    pub fn set_http_delay(&self, delay: Duration) {
        self.shared.faults.set_http_delay(delay);
    }

    /// Stops the server and waits for it to finish.
    pub async fn shutdown(mut self) -> std::io::Result<()> {
        self.shutdown.cancel();
        match self.task.take() {
            Some(task) => task.await.unwrap_or(Ok(())),
            None => Ok(()),
        }
    }
}

impl Drop for SimHandle {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

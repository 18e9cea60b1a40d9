//! Command-line flags of `comfyfleet sim`, kept here so the CLI ports them in one line.

use std::net::SocketAddr;
use std::time::Duration;

use super::knobs::{FaultKind, NodeFault, PreviewFormat};
use super::{ModelFile, SimConfig, default_models};

/// `comfyfleet sim`: a ComfyUI-protocol server that simulates execution.
#[derive(Clone, Debug, clap::Args)]
pub struct SimArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8188", env = "COMFYFLEET_SIM_BIND")]
    pub bind: SocketAddr,
    /// Milliseconds per sampler step.
    #[arg(long, default_value_t = 20)]
    pub step_ms: u64,
    /// Milliseconds per executed non-sampler node.
    #[arg(long, default_value_t = 0)]
    pub node_ms: u64,
    /// Preview method: `none` sends no sampler previews (ComfyUI's default), `auto` sends one per step.
    #[arg(long, default_value = "auto", value_parser = ["none", "auto", "latent2rgb", "taesd"])]
    pub preview_method: String,
    /// Longest side of a sampler preview, in pixels.
    #[arg(long, default_value_t = 512)]
    pub preview_size: u32,
    /// Encoding of sampler previews.
    #[arg(long, value_enum, default_value = "jpeg")]
    pub preview_format: PreviewFormat,
    /// Seed for every generated id and name (deterministic runs).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Model files the sim has, as `folder/name` (repeatable; replaces the defaults).
    #[arg(long = "model", value_name = "FOLDER/NAME")]
    pub models: Vec<String>,
    /// Fail this node id (or class name) in every prompt.
    #[arg(long)]
    pub fail_node: Option<String>,
    /// Exception type of `--fail-node`.
    #[arg(long, default_value = "RuntimeError")]
    pub fail_type: String,
    /// Exception message of `--fail-node`.
    #[arg(long, default_value = "simulated failure")]
    pub fail_message: String,
    /// Hang this node id (or class name) in every prompt until interrupted.
    #[arg(long)]
    pub hang_node: Option<String>,
    /// Milliseconds to wait before answering each HTTP request.
    #[arg(long, default_value_t = 0)]
    pub http_delay_ms: u64,
    /// Accept connections and close them at once.
    #[arg(long)]
    pub refuse_connections: bool,
}

impl SimArgs {
    /// The server configuration these flags describe.
    pub fn to_config(&self) -> SimConfig {
        let models = if self.models.is_empty() {
            default_models()
        } else {
            self.models
                .iter()
                .map(|m| match m.split_once('/') {
                    Some((folder, name)) => ModelFile::new(folder, name),
                    None => ModelFile::new("checkpoints", m),
                })
                .collect()
        };
        let mut faults = Vec::new();
        let target = |spec: &str| {
            if spec.chars().all(|c| c.is_ascii_digit() || c == ':') {
                (Some(spec.to_owned()), None)
            } else {
                (None, Some(spec.to_owned()))
            }
        };
        if let Some(spec) = &self.fail_node {
            let (node, class) = target(spec);
            faults.push(NodeFault {
                node,
                class,
                kind: FaultKind::Fail {
                    exception_type: self.fail_type.clone(),
                    exception_message: self.fail_message.clone(),
                },
            });
        }
        if let Some(spec) = &self.hang_node {
            let (node, class) = target(spec);
            faults.push(NodeFault {
                node,
                class,
                kind: FaultKind::Hang,
            });
        }
        SimConfig {
            step_time: Duration::from_millis(self.step_ms),
            node_time: Duration::from_millis(self.node_ms),
            previews: self.preview_method != "none",
            preview_size: self.preview_size,
            preview_format: self.preview_format,
            seed: self.seed,
            models,
            faults,
            http_delay: Duration::from_millis(self.http_delay_ms),
            refuse_connections: self.refuse_connections,
            ..SimConfig::default()
        }
    }
}

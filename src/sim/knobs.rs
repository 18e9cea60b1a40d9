//! Per-prompt knobs: the server-wide [`SimConfig`](super::SimConfig) overridden by
//! `extra_data.sim` of a `POST /prompt`.
//!
//! ```json
//! "extra_data": {"sim": {
//!   "step_ms": 50, "node_ms": 0, "previews": true, "preview_size": 64, "preview_format": "png",
//!   "faults": [
//!     {"node": "3", "fail": {"exception_type": "RuntimeError", "exception_message": "boom"}},
//!     {"node": "8", "hang": true},
//!     {"node": "3", "drop_ws_at_step": 2},
//!     {"class": "KSampler", "forget_client": true}
//!   ]
//! }}
//! ```
//! A fault's `node` is a node id of the prompt, or a class name (`"class": "KSampler"`).

use std::time::Duration;

use serde_json::Value;

use super::SimConfig;

/// Image encoding of sampler previews.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PreviewFormat {
    Jpeg,
    Png,
}

/// What goes wrong at a node.
#[derive(Clone, Debug, PartialEq)]
pub enum FaultKind {
    /// The node raises: `execution_error` with this type and message.
    Fail {
        exception_type: String,
        exception_message: String,
    },
    /// The node never finishes; only an interrupt ends it.
    Hang,
    /// The prompt's client socket is dropped (no close frame) when the node
    /// reaches this sampler step (0 = when the node starts). Execution goes on.
    DropWebSocket { at_step: u64 },
    /// When the node starts, the prompt's client id is forgotten, as ComfyUI does
    /// when another socket with that id closes: the socket stays open but gets
    /// nothing more. Execution goes on and the history records the outcome.
    ForgetClient,
}

/// A fault bound to a node id or a node class.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeFault {
    /// Node id in the prompt (`"3"`); `None` matches by `class`.
    pub node: Option<String>,
    /// Node class (`"KSampler"`); used when `node` is `None`.
    pub class: Option<String>,
    pub kind: FaultKind,
}

impl NodeFault {
    pub fn matches(&self, node_id: &str, class_type: &str) -> bool {
        match (&self.node, &self.class) {
            (Some(n), _) => n == node_id,
            (None, Some(c)) => c == class_type,
            (None, None) => false,
        }
    }

    fn from_json(v: &Value) -> Option<Self> {
        let node = v.get("node").and_then(Value::as_str).map(str::to_owned);
        let class = v.get("class").and_then(Value::as_str).map(str::to_owned);
        let kind = if let Some(fail) = v.get("fail") {
            FaultKind::Fail {
                exception_type: fail
                    .get("exception_type")
                    .and_then(Value::as_str)
                    .unwrap_or("RuntimeError")
                    .to_owned(),
                exception_message: fail
                    .get("exception_message")
                    .and_then(Value::as_str)
                    .unwrap_or("simulated failure")
                    .to_owned(),
            }
        } else if v.get("hang").and_then(Value::as_bool) == Some(true) {
            FaultKind::Hang
        } else if let Some(step) = v.get("drop_ws_at_step").and_then(Value::as_u64) {
            FaultKind::DropWebSocket { at_step: step }
        } else if v.get("forget_client").and_then(Value::as_bool) == Some(true) {
            FaultKind::ForgetClient
        } else {
            return None;
        };
        Some(Self { node, class, kind })
    }
}

/// The settings one prompt runs with.
#[derive(Clone, Debug)]
pub struct PromptKnobs {
    pub step_time: Duration,
    pub node_time: Duration,
    pub previews: bool,
    pub preview_size: u32,
    pub preview_format: PreviewFormat,
    pub faults: Vec<NodeFault>,
}

impl PromptKnobs {
    pub fn new(config: &SimConfig, extra_data: &Value) -> Self {
        let mut k = Self {
            step_time: config.step_time,
            node_time: config.node_time,
            previews: config.previews,
            preview_size: config.preview_size,
            preview_format: config.preview_format,
            faults: config.faults.clone(),
        };
        let Some(sim) = extra_data.get("sim") else {
            return k;
        };
        if let Some(ms) = sim.get("step_ms").and_then(Value::as_u64) {
            k.step_time = Duration::from_millis(ms);
        }
        if let Some(ms) = sim.get("node_ms").and_then(Value::as_u64) {
            k.node_time = Duration::from_millis(ms);
        }
        if let Some(p) = sim.get("previews").and_then(Value::as_bool) {
            k.previews = p;
        }
        if let Some(size) = sim.get("preview_size").and_then(Value::as_u64) {
            k.preview_size = size.clamp(8, 4096) as u32;
        }
        match sim.get("preview_format").and_then(Value::as_str) {
            Some("png") => k.preview_format = PreviewFormat::Png,
            Some("jpeg") | Some("jpg") => k.preview_format = PreviewFormat::Jpeg,
            _ => {}
        }
        if let Some(faults) = sim.get("faults").and_then(Value::as_array) {
            k.faults
                .extend(faults.iter().filter_map(NodeFault::from_json));
        }
        k
    }

    pub fn fault(
        &self,
        node_id: &str,
        class_type: &str,
        want: impl Fn(&FaultKind) -> bool,
    ) -> Option<&FaultKind> {
        self.faults
            .iter()
            .filter(|f| f.matches(node_id, class_type))
            .map(|f| &f.kind)
            .find(|k| want(k))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn extra_data_overrides_config() {
        let extra = json!({"sim": {"step_ms": 5, "preview_format": "png",
            "faults": [{"node": "3", "fail": {"exception_type": "ValueError", "exception_message": "x"}},
                       {"class": "KSampler", "hang": true}]}});
        let k = PromptKnobs::new(&SimConfig::default(), &extra);
        assert_eq!(k.step_time, Duration::from_millis(5));
        assert_eq!(k.preview_format, PreviewFormat::Png);
        assert!(
            k.fault("3", "SaveImage", |k| matches!(k, FaultKind::Fail { .. }))
                .is_some()
        );
        assert!(
            k.fault("9", "KSampler", |k| matches!(k, FaultKind::Hang))
                .is_some()
        );
        assert!(k.fault("9", "VAEDecode", |_| true).is_none());
    }
}

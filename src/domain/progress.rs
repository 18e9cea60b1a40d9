//! Progress of a running job, computed from ComfyUI's messages: the seed-000 progress
//! state (node, step/total, nodes done, cached count, percent, ETA, step rate, preview
//! sequence, node outputs).
//!
//! Time is passed in as seconds since the job started, so the arithmetic is testable
//! without a clock.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::Serialize;
use serde_json::{Map, Value};

/// The rolling window of the step rate (seed 000: "rolling 10-step average").
const RATE_WINDOW: usize = 10;

/// A node of the job's graph, as progress reports name it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeInfo {
    pub class_type: String,
    /// `_meta.title` when the graph has one, else the class type.
    pub title: String,
}

/// Seed 000's progress state.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ProgressState {
    pub prompt_id: String,
    /// `queued` or `running`.
    pub status: String,
    pub workflow_name: Option<String>,
    pub workflow_id: Option<String>,
    pub node_id: Option<String>,
    pub node_title: Option<String>,
    pub node_type: Option<String>,
    pub step: u64,
    pub total_steps: u64,
    pub nodes_done: usize,
    pub total_nodes: usize,
    pub effective_total: usize,
    pub cached_count: usize,
    pub percent: u8,
    pub eta_seconds: Option<u64>,
    pub step_rate: Option<f64>,
    pub preview_seq: u64,
    pub node_outputs: Map<String, Value>,
}

/// Follows one job's execution.
#[derive(Clone, Debug)]
pub struct ProgressTracker {
    prompt_id: String,
    workflow_id: Option<String>,
    workflow_name: Option<String>,
    nodes: BTreeMap<String, NodeInfo>,
    started: bool,
    cached: BTreeSet<String>,
    done: BTreeSet<String>,
    current: Option<String>,
    current_since: f64,
    step: u64,
    total_steps: u64,
    step_times: VecDeque<f64>,
    /// Durations of nodes that ran (not cached), to estimate the ones still to come.
    node_durations: Vec<f64>,
    preview_seq: u64,
    node_outputs: Map<String, Value>,
}

impl ProgressTracker {
    pub fn new(
        prompt_id: impl Into<String>,
        workflow_id: Option<String>,
        workflow_name: Option<String>,
        nodes: BTreeMap<String, NodeInfo>,
    ) -> Self {
        Self {
            prompt_id: prompt_id.into(),
            workflow_id,
            workflow_name,
            nodes,
            started: false,
            cached: BTreeSet::new(),
            done: BTreeSet::new(),
            current: None,
            current_since: 0.0,
            step: 0,
            total_steps: 0,
            step_times: VecDeque::with_capacity(RATE_WINDOW),
            node_durations: Vec::new(),
            preview_seq: 0,
            node_outputs: Map::new(),
        }
    }

    /// `execution_start`.
    pub fn started(&mut self) {
        self.started = true;
    }

    /// `execution_cached`: these nodes will not run.
    pub fn cached(&mut self, nodes: impl IntoIterator<Item = String>) {
        self.cached.extend(nodes);
    }

    /// `executing {node}`: a node starts (or, with `None`, the prompt ends).
    pub fn executing(&mut self, node: Option<&str>, at: f64) {
        self.finish_current(at);
        self.current = node.map(String::from);
        self.current_since = at;
        self.step = 0;
        self.total_steps = 0;
        self.step_times.clear();
    }

    /// `progress {value, max, node}`: a step of the current node.
    pub fn progress(&mut self, node: Option<&str>, value: u64, max: u64, at: f64) {
        if let Some(node) = node
            && self.current.as_deref() != Some(node)
        {
            self.executing(Some(node), at);
        }
        self.step = value.min(max);
        self.total_steps = max;
        if self.step_times.len() == RATE_WINDOW {
            self.step_times.pop_front();
        }
        self.step_times.push_back(at);
    }

    /// `executed {node, output}`: a node produced output.
    pub fn executed(&mut self, node: &str, output: Value) {
        let info = self.nodes.get(node);
        let mut entry = Map::new();
        entry.insert(
            "node_title".into(),
            Value::from(info.map(|i| i.title.clone()).unwrap_or_default()),
        );
        entry.insert(
            "node_type".into(),
            Value::from(info.map(|i| i.class_type.clone()).unwrap_or_default()),
        );
        entry.insert("items".into(), Value::Array(output_items(&output)));
        self.node_outputs
            .insert(node.to_string(), Value::Object(entry));
    }

    /// A preview frame arrived; returns its sequence number (1, 2, …).
    pub fn preview(&mut self) -> u64 {
        self.preview_seq += 1;
        self.preview_seq
    }

    pub fn preview_seq(&self) -> u64 {
        self.preview_seq
    }

    fn finish_current(&mut self, at: f64) {
        if let Some(node) = self.current.take()
            && !self.cached.contains(&node)
            && self.done.insert(node)
        {
            self.node_durations.push((at - self.current_since).max(0.0));
        }
    }

    /// Steps per second over the last (up to) ten steps.
    pub fn step_rate(&self) -> Option<f64> {
        let (first, last) = (self.step_times.front()?, self.step_times.back()?);
        let span = last - first;
        (self.step_times.len() >= 2 && span > 0.0)
            .then(|| (self.step_times.len() - 1) as f64 / span)
    }

    pub fn state(&self, at: f64) -> ProgressState {
        let total_nodes = self.nodes.len();
        let cached_count = self
            .cached
            .iter()
            .filter(|n| self.nodes.contains_key(*n))
            .count();
        let effective_total = total_nodes.saturating_sub(cached_count);
        let nodes_done = self.done.len().min(effective_total);
        let fraction = if self.total_steps > 0 {
            self.step as f64 / self.total_steps as f64
        } else {
            0.0
        };
        let percent = if effective_total == 0 {
            0
        } else {
            let p = 100.0 * (nodes_done as f64 + fraction) / effective_total as f64;
            p.floor().clamp(0.0, 99.0) as u8
        };
        let rate = self.step_rate();
        let eta_seconds = self.eta(at, rate, nodes_done, effective_total);
        let info = self.current.as_ref().and_then(|n| self.nodes.get(n));
        ProgressState {
            prompt_id: self.prompt_id.clone(),
            status: if self.started { "running" } else { "queued" }.into(),
            workflow_name: self.workflow_name.clone(),
            workflow_id: self.workflow_id.clone(),
            node_id: self.current.clone(),
            node_title: info.map(|i| i.title.clone()),
            node_type: info.map(|i| i.class_type.clone()),
            step: self.step,
            total_steps: self.total_steps,
            nodes_done,
            total_nodes,
            effective_total,
            cached_count,
            percent,
            eta_seconds,
            step_rate: rate.map(|r| (r * 100.0).round() / 100.0),
            preview_seq: self.preview_seq,
            node_outputs: self.node_outputs.clone(),
        }
    }

    /// The current node's remaining steps at the current rate, plus the nodes still
    /// to run at the average duration of those that ran.
    fn eta(&self, at: f64, rate: Option<f64>, done: usize, total: usize) -> Option<u64> {
        if !self.started {
            return None;
        }
        let current_left = match (self.current.is_some(), rate) {
            (true, Some(r)) if self.total_steps > 0 => (self.total_steps - self.step) as f64 / r,
            (true, _) => {
                let avg = self.average_node_secs()?;
                (avg - (at - self.current_since)).max(0.0)
            }
            (false, _) => 0.0,
        };
        let after_current = total.saturating_sub(done + usize::from(self.current.is_some()));
        let rest = if after_current == 0 {
            0.0
        } else {
            after_current as f64 * self.average_node_secs().unwrap_or(0.0)
        };
        Some((current_left + rest).round() as u64)
    }

    fn average_node_secs(&self) -> Option<f64> {
        (!self.node_durations.is_empty())
            .then(|| self.node_durations.iter().sum::<f64>() / self.node_durations.len() as f64)
    }
}

/// `executed.output` → seed 000's `items` (`filename`, `subfolder`, `type`, `media`).
fn output_items(output: &Value) -> Vec<Value> {
    let mut items = Vec::new();
    let Some(map) = output.as_object() else {
        return items;
    };
    for (key, list) in map {
        let media = match key.as_str() {
            "images" => "image",
            "gifs" | "videos" | "video" => "video",
            "audio" => "audio",
            _ => "file",
        };
        for entry in list.as_array().into_iter().flatten() {
            if let Some(obj) = entry.as_object() {
                let mut item = obj.clone();
                let media = if media == "image" && item.get("animated").is_some() {
                    "video"
                } else {
                    media
                };
                item.insert("media".into(), Value::from(media));
                items.push(Value::Object(item));
            }
        }
    }
    items
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn graph() -> BTreeMap<String, NodeInfo> {
        [
            ("1", "CheckpointLoaderSimple"),
            ("2", "CLIPTextEncode"),
            ("3", "KSampler"),
            ("4", "VAEDecode"),
            ("5", "SaveImage"),
        ]
        .into_iter()
        .map(|(id, class)| {
            (
                id.to_string(),
                NodeInfo {
                    class_type: class.into(),
                    title: class.into(),
                },
            )
        })
        .collect()
    }

    #[test]
    fn cached_nodes_leave_the_effective_total() {
        let mut t = ProgressTracker::new("p", Some("w".into()), None, graph());
        t.started();
        t.cached(["1".to_string(), "2".to_string()]);
        t.executing(Some("3"), 0.0);
        let s = t.state(0.0);
        assert_eq!(
            (s.total_nodes, s.cached_count, s.effective_total),
            (5, 2, 3)
        );
        assert_eq!(s.status, "running");
        assert_eq!(s.node_type.as_deref(), Some("KSampler"));
        assert_eq!(s.percent, 0);
    }

    #[test]
    fn steps_drive_percent_rate_and_eta() {
        let mut t = ProgressTracker::new("p", None, None, graph());
        t.started();
        t.cached(["1".to_string(), "2".to_string()]);
        t.executing(Some("3"), 0.0);
        // 10 steps, one every 0.5 s.
        for i in 1..=10u64 {
            t.progress(Some("3"), i, 20, i as f64 * 0.5);
        }
        let s = t.state(5.0);
        assert_eq!(s.step, 10);
        assert_eq!(s.step_rate, Some(2.0));
        // Half of node 3 of 3 effective nodes: 0.5/3 = 16 %.
        assert_eq!(s.percent, 16);
        // 10 steps left at 2/s = 5 s; the two nodes after it have no history yet.
        assert_eq!(s.eta_seconds, Some(5));

        t.executing(Some("4"), 10.0);
        let s = t.state(10.0);
        assert_eq!(s.nodes_done, 1);
        assert_eq!(s.percent, 33);
        // VAEDecode has no steps: average node time (10 s) minus 0 elapsed, plus one
        // more node at 10 s.
        assert_eq!(s.eta_seconds, Some(20));
    }

    #[test]
    fn percent_never_reaches_100_before_completion() {
        let mut t = ProgressTracker::new("p", None, None, graph());
        t.started();
        for (i, n) in ["1", "2", "3", "4", "5"].iter().enumerate() {
            t.executing(Some(n), i as f64);
        }
        t.executing(None, 5.0);
        assert_eq!(t.state(5.0).nodes_done, 5);
        assert_eq!(t.state(5.0).percent, 99);
    }

    #[test]
    fn outputs_and_previews_are_recorded() {
        let mut t = ProgressTracker::new("p", None, None, graph());
        assert_eq!(t.preview(), 1);
        assert_eq!(t.preview(), 2);
        t.executed(
            "5",
            json!({"images": [{"filename": "a.png", "subfolder": "", "type": "output"}]}),
        );
        let s = t.state(0.0);
        assert_eq!(s.preview_seq, 2);
        assert_eq!(s.node_outputs["5"]["items"][0]["media"], "image");
        assert_eq!(s.node_outputs["5"]["node_type"], "SaveImage");
        assert_eq!(s.status, "queued");
    }
}

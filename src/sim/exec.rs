//! The executor: one prompt at a time, in ComfyUI's order, with its messages.
//!
//! Mirrors `PromptExecutor.execute` and `comfy_execution.graph.ExecutionList`: the
//! classic cache keyed by input signature (entries not in the current prompt are
//! dropped when it starts), the "output first" node pick, `progress_state`
//! bookkeeping, and the terminal `execution_*` message recorded in history.

use std::collections::{HashMap, HashSet};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;

use indexmap::{IndexMap, IndexSet};
use poem::web::websocket::Message;
use serde_json::{Map, Value, json};

use super::catalog::ClassInfo;
use super::files::{FileStore, Root};
use super::knobs::{FaultKind, PromptKnobs};
use super::nodes::{self, NodeError, Val};
use super::protocol::{self, ImageKind, timestamp_ms};
use super::state::{QueueItem, Shared};

/// What a node produced: its outputs and its UI payload (`executed.output`).
pub struct CacheEntry {
    pub values: Vec<Val>,
    pub ui: Option<Value>,
}

/// ComfyUI's CLASSIC output cache: input signature → outputs.
#[derive(Default)]
pub struct Cache {
    entries: HashMap<u64, Arc<CacheEntry>>,
}

/// Runs queued prompts until shutdown.
pub async fn worker(shared: Arc<Shared>) {
    loop {
        let item = loop {
            let notified = shared.queued.notified();
            if let Some(item) = shared.lock().take_next() {
                break item;
            }
            tokio::select! {
                _ = notified => {}
                _ = shared.shutdown.cancelled() => return,
            }
        };
        let client = item.client_id();
        let prompt_id = item.prompt_id.clone();
        let mut run = Run::new(shared.clone(), item);
        let ok = run.execute().await;
        let entry = run.history_entry(ok);
        let mut st = shared.lock();
        st.running = None;
        st.current_client = None;
        st.last_node_id = None;
        st.history.insert(prompt_id.clone(), entry);
        while st.history.len() > shared.config.history_limit.max(1) {
            st.history.shift_remove_index(0);
        }
        st.queue_updated();
        if let Some(c) = client {
            st.send_json(
                Some(&c),
                "executing",
                json!({"node": null, "prompt_id": prompt_id}),
            );
        }
    }
}

/// Input signatures: equal signature = same work = cache hit.
fn signatures(prompt: &Map<String, Value>, files: &FileStore) -> HashMap<String, u64> {
    fn sig(
        id: &str,
        prompt: &Map<String, Value>,
        files: &FileStore,
        memo: &mut HashMap<String, Option<u64>>,
        visiting: &mut HashSet<String>,
    ) -> Option<u64> {
        if let Some(s) = memo.get(id) {
            return *s;
        }
        if !visiting.insert(id.to_owned()) {
            return None;
        }
        let node = prompt.get(id)?;
        let mut h = DefaultHasher::new();
        let class = node.get("class_type").and_then(Value::as_str).unwrap_or("");
        class.hash(&mut h);
        let mut inputs: Vec<(&String, &Value)> = node
            .get("inputs")
            .and_then(Value::as_object)
            .map(|m| m.iter().collect())
            .unwrap_or_default();
        inputs.sort_by(|a, b| a.0.cmp(b.0));
        let mut ok = true;
        for (name, v) in inputs {
            name.hash(&mut h);
            match nodes::as_link(v) {
                Some((src, slot)) => match sig(src, prompt, files, memo, visiting) {
                    Some(s) => (s, slot).hash(&mut h),
                    None => ok = false,
                },
                None => protocol::dumps(v).hash(&mut h),
            }
            if class == "LoadImage" && name == "image" {
                // LoadImage.IS_CHANGED hashes the file, so a re-upload re-runs it.
                let (sub, file) = nodes::split_image_name(&protocol::py_str(v));
                files.get(Root::Input, &sub, &file).hash(&mut h);
            }
        }
        visiting.remove(id);
        let out = ok.then(|| h.finish());
        memo.insert(id.to_owned(), out);
        out
    }
    let mut memo = HashMap::new();
    let mut out = HashMap::new();
    for id in prompt.keys() {
        if let Some(s) = sig(id, prompt, files, &mut memo, &mut HashSet::new()) {
            out.insert(id.clone(), s);
        }
    }
    out
}

/// `comfy_execution.graph.ExecutionList`, reduced to what the sim's nodes need.
struct ExecList<'a> {
    prompt: &'a Map<String, Value>,
    info: &'a Map<String, Value>,
    cached: &'a HashSet<String>,
    pending: IndexSet<String>,
    block_count: HashMap<String, usize>,
    blocking: HashMap<String, IndexSet<String>>,
}

impl<'a> ExecList<'a> {
    fn is_output(&self, id: &str) -> bool {
        self.prompt
            .get(id)
            .and_then(|n| n.get("class_type"))
            .and_then(Value::as_str)
            .and_then(|c| self.info.get(c))
            .is_some_and(|i| ClassInfo(i).is_output())
    }

    fn add_node(&mut self, id: &str) {
        let mut stack = vec![id.to_owned()];
        let mut links = Vec::new();
        while let Some(u) = stack.pop() {
            if self.pending.contains(&u) {
                continue;
            }
            self.pending.insert(u.clone());
            self.block_count.insert(u.clone(), 0);
            self.blocking.entry(u.clone()).or_default();
            let inputs = self
                .prompt
                .get(&u)
                .and_then(|n| n.get("inputs"))
                .and_then(Value::as_object);
            for v in inputs.into_iter().flat_map(|m| m.values()) {
                if let Some((from, _)) = nodes::as_link(v)
                    && self.prompt.contains_key(from)
                {
                    if !self.cached.contains(from) {
                        stack.push(from.to_owned());
                    }
                    links.push((from.to_owned(), u.clone()));
                }
            }
        }
        for (from, to) in links {
            if self.cached.contains(&from) {
                continue;
            }
            if self.blocking.entry(from).or_default().insert(to.clone()) {
                *self.block_count.entry(to).or_default() += 1;
            }
        }
    }

    /// `ux_friendly_pick_node`: outputs first, then their direct and second-hand inputs.
    fn next(&self) -> Option<String> {
        let available: Vec<&String> = self
            .pending
            .iter()
            .filter(|id| self.block_count.get(*id).copied().unwrap_or(0) == 0)
            .collect();
        let blocked = |id: &str| self.blocking.get(id).into_iter().flatten();
        available
            .iter()
            .find(|id| self.is_output(id))
            .or_else(|| {
                available
                    .iter()
                    .find(|id| blocked(id).any(|b| self.is_output(b)))
            })
            .or_else(|| {
                available
                    .iter()
                    .find(|id| blocked(id).any(|b| blocked(b).any(|b1| self.is_output(b1))))
            })
            .or(available.first())
            .map(|s| (*s).clone())
    }

    fn complete(&mut self, id: &str) {
        self.pending.shift_remove(id);
        for b in self.blocking.remove(id).unwrap_or_default() {
            if let Some(c) = self.block_count.get_mut(&b) {
                *c = c.saturating_sub(1);
            }
        }
    }
}

/// One prompt's execution and everything it reports.
pub struct Run {
    pub shared: Arc<Shared>,
    pub item: QueueItem,
    pub client: Option<String>,
    pub knobs: PromptKnobs,
    progress: IndexMap<String, (Value, Value, &'static str)>,
    messages: Vec<Value>,
    outputs: Map<String, Value>,
    meta: Map<String, Value>,
    executed: Vec<String>,
}

impl Run {
    fn new(shared: Arc<Shared>, item: QueueItem) -> Self {
        let knobs = PromptKnobs::new(&shared.config, &item.extra_data);
        Self {
            client: item.client_id(),
            knobs,
            shared,
            item,
            progress: IndexMap::new(),
            messages: Vec::new(),
            outputs: Map::new(),
            meta: Map::new(),
            executed: Vec::new(),
        }
    }

    pub fn prompt_id(&self) -> &str {
        &self.item.prompt_id
    }

    /// Sends to the prompt's client; without one, the message goes nowhere.
    fn send_client(&self, kind: &str, data: Value) {
        if let Some(c) = &self.client {
            self.shared.lock().send_json(Some(c), kind, data);
        }
    }

    /// `PromptExecutor.add_message`: recorded in history, sent to the client (or to
    /// everyone when `broadcast` and there is no client).
    fn add_message(&mut self, kind: &str, mut data: Value, broadcast: bool) {
        data["timestamp"] = json!(timestamp_ms());
        self.messages.push(json!([kind, data.clone()]));
        match (&self.client, broadcast) {
            (Some(c), _) => self.shared.lock().send_json(Some(c), kind, data),
            (None, true) => self.shared.lock().send_json(None, kind, data),
            (None, false) => {}
        }
    }

    fn progress_state_data(&self) -> Value {
        let pid = self.prompt_id();
        let nodes: Map<String, Value> = self
            .progress
            .iter()
            .map(|(id, (value, max, state))| {
                (
                    id.clone(),
                    json!({"value": value, "max": max, "state": state, "node_id": id, "prompt_id": pid,
                           "display_node_id": id, "parent_node_id": null, "real_node_id": id}),
                )
            })
            .collect();
        json!({"prompt_id": pid, "nodes": nodes})
    }

    fn send_progress_state(&self) {
        let data = self.progress_state_data();
        self.shared
            .lock()
            .send_json(self.client.as_deref(), "progress_state", data);
    }

    /// A progress-bar tick: `progress_state`, then the preview and `progress` in the
    /// order the client's feature flags call for.
    pub fn tick(
        &mut self,
        node: &str,
        value: u64,
        max: u64,
        preview: Option<(ImageKind, Vec<u8>)>,
    ) {
        self.progress
            .insert(node.to_owned(), (json!(value), json!(max), "running"));
        let ps = protocol::message("progress_state", self.progress_state_data());
        let progress = protocol::message(
            "progress",
            json!({"value": value, "max": max, "prompt_id": self.prompt_id(), "node": node}),
        );
        let mut st = self.shared.lock();
        match &self.client {
            Some(c) => {
                st.send_to(c, Message::Text(ps));
                let meta = st.supports_metadata(c);
                if meta && let Some((kind, img)) = &preview {
                    let frame =
                        protocol::preview_frame_with_metadata(*kind, img, self.prompt_id(), node);
                    st.send_to(c, Message::Binary(frame));
                }
                st.send_to(c, Message::Text(progress));
                if !meta && let Some((kind, img)) = &preview {
                    st.send_to(c, Message::Binary(protocol::preview_frame(*kind, img)));
                }
            }
            None => {
                st.broadcast(Message::Text(ps));
                st.broadcast(Message::Text(progress));
                if let Some((kind, img)) = &preview {
                    st.broadcast(Message::Binary(protocol::preview_frame(*kind, img)));
                }
            }
        }
    }

    /// Drops the client's socket without a close frame (the `drop_ws` fault).
    pub fn drop_client_socket(&self) {
        if let Some(c) = &self.client
            && let Some(entry) = self.shared.lock().sockets.remove(c)
        {
            entry.kill.cancel();
        }
    }

    pub fn interrupted(&self) -> bool {
        self.shared.lock().interrupt || self.shared.shutdown.is_cancelled()
    }

    /// Works for `d`; only shutdown cuts it short.
    pub async fn busy(&self, d: std::time::Duration) {
        if !d.is_zero() {
            tokio::select! {
                _ = tokio::time::sleep(d) => {}
                _ = self.shared.shutdown.cancelled() => {}
            }
        }
    }

    /// Sleeps, waking early on an interrupt; `Err` if the prompt was interrupted.
    pub async fn pause(&self, d: std::time::Duration) -> Result<(), NodeError> {
        // Registered before the flag check, so an interrupt in between still wakes us.
        let woken = self.shared.interrupted.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        if self.interrupted() {
            return Err(NodeError::Interrupted);
        }
        if !d.is_zero() {
            tokio::select! {
                _ = tokio::time::sleep(d) => {}
                _ = woken => {}
                _ = self.shared.shutdown.cancelled() => {}
            }
        }
        if self.interrupted() {
            Err(NodeError::Interrupted)
        } else {
            Ok(())
        }
    }

    /// Returns whether the prompt succeeded.
    async fn execute(&mut self) -> bool {
        {
            let mut st = self.shared.lock();
            st.interrupt = false;
            st.current_client = self.client.clone();
            st.last_node_id = None;
        }
        let pid = self.prompt_id().to_owned();
        self.add_message("execution_start", json!({"prompt_id": pid}), false);
        let info = self.shared.object_info();
        let prompt = self.item.prompt.clone();
        let mut results: HashMap<String, Arc<CacheEntry>> = HashMap::new();
        let sigs = {
            let mut st = self.shared.lock();
            let sigs = signatures(&prompt, &st.files);
            let live: HashSet<u64> = sigs.values().copied().collect();
            st.cache.entries.retain(|k, _| live.contains(k));
            for (id, s) in &sigs {
                if let Some(e) = st.cache.entries.get(s) {
                    results.insert(id.clone(), e.clone());
                }
            }
            sigs
        };
        let cached: Vec<&String> = prompt
            .keys()
            .filter(|id| results.contains_key(*id))
            .collect();
        self.add_message(
            "execution_cached",
            json!({"nodes": cached, "prompt_id": pid}),
            false,
        );
        let cached: HashSet<String> = cached.into_iter().cloned().collect();

        let mut list = ExecList {
            prompt: &prompt,
            info: &info,
            cached: &cached,
            pending: IndexSet::new(),
            block_count: HashMap::new(),
            blocking: HashMap::new(),
        };
        for o in self.item.outputs.clone() {
            list.add_node(&o);
        }
        while !list.pending.is_empty() {
            let Some(id) = list.next() else {
                let err = NodeError::failed("DependencyCycleError", "Dependency cycle detected");
                let first = list.pending.first().cloned().unwrap_or_default();
                self.report_error(&first, &prompt, err);
                return false;
            };
            if let Some(entry) = results.get(&id).filter(|_| cached.contains(&id)) {
                self.send_client(
                    "executed",
                    json!({"node": id, "display_node": id, "output": entry.ui, "prompt_id": pid}),
                );
                if let Some(ui) = &entry.ui {
                    self.record_output(&id, ui.clone());
                }
                self.progress
                    .insert(id.clone(), (json!(1), json!(1), "finished"));
                self.send_progress_state();
            } else {
                match self.run_node(&id, &prompt, &results).await {
                    Ok(entry) => {
                        let entry = Arc::new(entry);
                        if let Some(s) = sigs.get(&id) {
                            self.shared.lock().cache.entries.insert(*s, entry.clone());
                        }
                        results.insert(id.clone(), entry);
                        self.executed.push(id.clone());
                    }
                    Err(err) => {
                        self.report_error(&id, &prompt, err);
                        return false;
                    }
                }
            }
            list.complete(&id);
        }
        self.add_message("execution_success", json!({"prompt_id": pid}), false);
        true
    }

    fn record_output(&mut self, id: &str, ui: Value) {
        self.outputs.insert(id.to_owned(), ui);
        self.meta.insert(
            id.to_owned(),
            json!({"node_id": id, "display_node": id, "parent_node": null, "real_node_id": id}),
        );
    }

    async fn run_node(
        &mut self,
        id: &str,
        prompt: &Map<String, Value>,
        results: &HashMap<String, Arc<CacheEntry>>,
    ) -> Result<CacheEntry, NodeError> {
        let pid = self.prompt_id().to_owned();
        self.progress
            .insert(id.to_owned(), (json!(0.0), json!(1.0), "running"));
        self.send_progress_state();
        self.shared.lock().last_node_id = Some(id.to_owned());
        self.send_client(
            "executing",
            json!({"node": id, "display_node": id, "prompt_id": pid}),
        );
        if self.interrupted() {
            return Err(NodeError::Interrupted);
        }
        let node = &prompt[id];
        let class = node["class_type"].as_str().unwrap_or("");
        let inputs = node
            .get("inputs")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        let mut linked: HashMap<String, Val> = HashMap::new();
        for (name, v) in &inputs {
            if let Some((src, slot)) = nodes::as_link(v)
                && let Some(val) = results.get(src).and_then(|e| e.values.get(slot as usize))
            {
                linked.insert(name.clone(), val.clone());
            }
        }
        if let Some(FaultKind::DropWebSocket { at_step: 0 }) = self.knobs.fault(id, class, |k| {
            matches!(k, FaultKind::DropWebSocket { at_step: 0 })
        }) {
            self.drop_client_socket();
        }
        if self
            .knobs
            .fault(id, class, |k| matches!(k, FaultKind::ForgetClient))
            .is_some()
            && let Some(c) = &self.client
        {
            // Unregistered, not killed: the socket stays open and silent.
            self.shared.lock().sockets.remove(c);
        }
        let entry = nodes::run(self, id, class, &inputs, linked).await?;
        if let Some(ui) = &entry.ui {
            self.send_client(
                "executed",
                json!({"node": id, "display_node": id, "output": ui, "prompt_id": pid}),
            );
            self.record_output(id, ui.clone());
        }
        if let Some(p) = self.progress.get_mut(id) {
            p.0 = p.1.clone();
            p.2 = "finished";
        }
        self.send_progress_state();
        Ok(entry)
    }

    fn report_error(&mut self, id: &str, prompt: &Map<String, Value>, err: NodeError) {
        let pid = self.prompt_id().to_owned();
        let class = prompt
            .get(id)
            .and_then(|n| n.get("class_type"))
            .cloned()
            .unwrap_or(Value::Null);
        let executed = self.executed.clone();
        match err {
            NodeError::Interrupted => self.add_message(
                "execution_interrupted",
                json!({"prompt_id": pid, "node_id": id, "node_type": class, "executed": executed}),
                true,
            ),
            NodeError::Failed {
                exception_type,
                message,
                traceback,
            } => {
                let inputs = prompt
                    .get(id)
                    .and_then(|n| n.get("inputs"))
                    .and_then(Value::as_object)
                    .map(|m| {
                        m.iter()
                            .map(|(k, v)| (k.clone(), json!([describe_input(v)])))
                            .collect::<Map<String, Value>>()
                    })
                    .unwrap_or_default();
                let mut inputs = inputs;
                // Hidden inputs are passed to the node too, so ComfyUI lists them.
                let info = self.shared.object_info();
                let hidden = class
                    .as_str()
                    .and_then(|c| info.get(c))
                    .and_then(|i| i.pointer("/input/hidden"))
                    .and_then(Value::as_object);
                for (name, kind) in hidden.into_iter().flatten() {
                    let kind = kind
                        .as_str()
                        .or_else(|| kind.get(0).and_then(Value::as_str));
                    let v = match kind {
                        Some("PROMPT") => json!(protocol::py_repr(&Value::Object(prompt.clone()))),
                        Some("EXTRA_PNGINFO") => self
                            .item
                            .extra_data
                            .get("extra_pnginfo")
                            .cloned()
                            .unwrap_or(Value::Null),
                        Some("UNIQUE_ID") => json!(id),
                        _ => Value::Null,
                    };
                    inputs.insert(name.clone(), json!([v]));
                }
                let outputs: Vec<&String> = prompt.keys().collect();
                self.add_message(
                    "execution_error",
                    json!({"prompt_id": pid, "node_id": id, "node_type": class, "executed": executed,
                           "exception_message": message, "exception_type": exception_type,
                           "traceback": traceback, "current_inputs": inputs, "current_outputs": outputs}),
                    false,
                );
            }
        }
    }

    fn history_entry(&self, ok: bool) -> Value {
        let i = &self.item;
        json!({
            "prompt": [i.number, i.prompt_id, i.prompt, i.extra_data, i.outputs],
            "outputs": self.outputs,
            "status": {
                "status_str": if ok { "success" } else { "error" },
                "completed": ok,
                "messages": self.messages,
            },
            "meta": self.meta,
        })
    }
}

/// How `current_inputs` shows a value (ComfyUI prints the tensors themselves).
fn describe_input(v: &Value) -> String {
    match nodes::as_link(v) {
        Some((src, slot)) => format!("<output {slot} of node {src}>"),
        None => protocol::py_str(v),
    }
}

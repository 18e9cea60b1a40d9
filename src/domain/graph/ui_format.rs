//! ComfyUI's UI ("workflow") format: the document its editor saves and loads, converted
//! from and to an API-format [`ApiGraph`] with the node schemas of `/object_info`.
//!
//! The API format names inputs; the UI format is positional. A node's `inputs` list
//! its sockets (schema types such as `MODEL` or `IMAGE`) plus the widgets that the API
//! graph feeds from another node (marked `widget: {name}`, as the editor marks a widget
//! turned into a socket); `widgets_values` holds one entry per widget in schema order,
//! with the extra entries the editor's own widgets add (a seed's `control_after_generate`
//! and an upload button). Which input is a widget, where the extras sit and what they
//! hold follow ComfyUI_frontend (`useIntWidget`, `Comfy.UploadImage`,
//! `LGraphNode.configure`), so the editor loads the document as if it had saved it.
//!
//! What the UI format cannot say — an optional widget the API graph leaves unset, or a
//! `_meta` other than `{"title": …}` — is kept under one node property,
//! [`KEPT_PROPERTY`], so converting back gives exactly the original graph.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use super::{ApiGraph, ApiNode, CycleError, NodeId, as_link};
use crate::domain::node_catalogue::{InputDef, NodeCatalogue, NodeSchema};

/// The `version` of the documents written here (the editor's 0.4 schema).
pub const WORKFLOW_VERSION: f64 = 0.4;

/// Node property holding what the UI format has no field for (see the module docs).
pub const KEPT_PROPERTY: &str = "comfyfleet";

/// The property ComfyUI's editor uses for search-and-replace in file names.
const SEARCH_REPLACE_PROPERTY: &str = "Node name for S&R";

/// Value of the control widget after a seed: keep the built seed when the user
/// queues the loaded workflow (the editor's own default would draw a new one).
const CONTROL_FIXED: &str = "fixed";

/// Value of the upload button widget, as the editor serialises it.
const UPLOAD_WIDGET_VALUE: &str = "image";

/// A whole UI-format workflow.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UiWorkflow {
    pub last_node_id: u64,
    pub last_link_id: u64,
    pub nodes: Vec<UiNode>,
    pub links: Vec<UiLink>,
    #[serde(default)]
    pub groups: Vec<Value>,
    #[serde(default)]
    pub config: Map<String, Value>,
    #[serde(default)]
    pub extra: Map<String, Value>,
    pub version: f64,
}

/// A node id as the editor writes it: a number when the API id is one.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(untagged)]
pub enum UiNodeId {
    Number(u64),
    Text(String),
}

impl UiNodeId {
    /// A number only when it prints back as the same id (`"007"` stays text).
    fn from_api(id: &NodeId) -> Self {
        match id.as_str().parse::<u64>() {
            Ok(n) if n.to_string() == id.as_str() => Self::Number(n),
            _ => Self::Text(id.as_str().to_owned()),
        }
    }

    fn to_api(&self) -> NodeId {
        match self {
            Self::Number(n) => NodeId::new(n.to_string()),
            Self::Text(s) => NodeId::new(s.clone()),
        }
    }
}

/// One row of the links table: `[id, origin_id, origin_slot, target_id, target_slot, type]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UiLink(
    pub u64,
    pub UiNodeId,
    pub usize,
    pub UiNodeId,
    pub usize,
    pub String,
);

impl UiLink {
    pub fn id(&self) -> u64 {
        self.0
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UiNode {
    pub id: UiNodeId,
    #[serde(rename = "type")]
    pub class_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    /// Top-left of the node body; the title bar sits above it.
    pub pos: [f64; 2],
    pub size: [f64; 2],
    #[serde(default)]
    pub flags: Map<String, Value>,
    pub order: usize,
    pub mode: u8,
    #[serde(default)]
    pub inputs: Vec<UiInput>,
    #[serde(default)]
    pub outputs: Vec<UiOutput>,
    #[serde(default)]
    pub properties: Map<String, Value>,
    #[serde(default)]
    pub widgets_values: Vec<Value>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UiInput {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub link: Option<u64>,
    /// Present when the socket stands in for a widget of the same name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub widget: Option<WidgetRef>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WidgetRef {
    pub name: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UiOutput {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    /// The editor writes `null` for an output nothing reads.
    pub links: Option<Vec<u64>>,
    pub slot_index: usize,
}

/// Why a graph and a set of node schemas do not make a workflow (either way).
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum UiFormatError {
    #[error("no worker reports the schema of node class {class_type} (node {node})")]
    UnknownClass { node: String, class_type: String },
    #[error("node {node} has no class_type")]
    MissingClassType { node: String },
    #[error("node {node} ({class_type}) sets input {input:?}, which its schema does not have")]
    UnknownInput {
        node: String,
        class_type: String,
        input: String,
    },
    #[error(
        "input {input:?} of node {node} ({class_type}) is of type {kind} and must be linked from another node"
    )]
    SocketNotLinked {
        node: String,
        class_type: String,
        input: String,
        kind: String,
    },
    #[error("input {input:?} of node {node} links to node {source_node}, which does not exist")]
    MissingSource {
        node: String,
        input: String,
        source_node: String,
    },
    #[error(
        "input {input:?} of node {node} links to output {slot} of node {source_node} ({class_type}), which has {outputs} outputs"
    )]
    MissingOutput {
        node: String,
        input: String,
        source_node: String,
        class_type: String,
        slot: usize,
        outputs: usize,
    },
    #[error(transparent)]
    Cycle(#[from] CycleError),
    #[error("input {input:?} of node {node} uses link {link}, which is not in the links table")]
    UnknownLink {
        node: String,
        input: String,
        link: u64,
    },
    #[error("node {node} has mode {mode}; only active nodes (mode 0) convert")]
    UnsupportedMode { node: String, mode: u8 },
    #[error("node id {0} appears twice")]
    DuplicateNode(String),
}

impl UiFormatError {
    /// True when the fleet's schemas are what is missing or different, rather than
    /// the graph being malformed.
    pub fn is_schema_gap(&self) -> bool {
        matches!(
            self,
            Self::UnknownClass { .. }
                | Self::UnknownInput { .. }
                | Self::SocketNotLinked { .. }
                | Self::MissingOutput { .. }
        )
    }
}

/// One entry of a node's `widgets_values`, in the editor's order.
enum WidgetSlot<'a> {
    Input(InputDef<'a>),
    /// The `control_after_generate` combo after a seed-like INT.
    Control,
    /// The upload button the editor adds after the required inputs of a media loader.
    Upload,
}

/// Whether the editor draws an input as a widget (a value) rather than a socket.
fn is_widget(def: &InputDef<'_>) -> bool {
    let flag = |k: &str| def.options.get(k).and_then(Value::as_bool) == Some(true);
    if flag("forceInput") || flag("defaultInput") {
        return false;
    }
    match def.kind {
        Value::Array(_) => true,
        Value::String(t) => matches!(t.as_str(), "INT" | "FLOAT" | "STRING" | "BOOLEAN" | "COMBO"),
        _ => false,
    }
}

/// The editor adds a control widget to an INT that asks for one, and to any INT named
/// like a seed unless the schema says `control_after_generate: false`.
fn has_control(def: &InputDef<'_>) -> bool {
    if def.type_name() != Some("INT") {
        return false;
    }
    match def.options.get("control_after_generate") {
        Some(Value::Bool(b)) => *b,
        Some(Value::String(_)) => true,
        Some(_) => false,
        None => matches!(def.name, "seed" | "noise_seed"),
    }
}

fn is_upload(def: &InputDef<'_>) -> bool {
    def.required
        && def.combo_choices().is_some()
        && ["image_upload", "video_upload", "animated_image_upload"]
            .iter()
            .any(|k| def.options.get(*k).and_then(Value::as_bool) == Some(true))
}

fn widget_slots(schema: &NodeSchema) -> Vec<WidgetSlot<'_>> {
    let inputs = schema.inputs();
    let upload = inputs.iter().any(is_upload);
    let mut slots = Vec::new();
    let mut upload_placed = !upload;
    for def in inputs.into_iter().filter(is_widget) {
        if !def.required && !upload_placed {
            slots.push(WidgetSlot::Upload);
            upload_placed = true;
        }
        let control = has_control(&def);
        slots.push(WidgetSlot::Input(def));
        if control {
            slots.push(WidgetSlot::Control);
        }
    }
    if !upload_placed {
        slots.push(WidgetSlot::Upload);
    }
    slots
}

/// The value a fresh widget holds in the editor.
fn widget_default(def: &InputDef<'_>) -> Value {
    if let Some(default) = def.options.get("default") {
        return default.clone();
    }
    if let Some(first) = def.combo_choices().and_then(|c| c.first()) {
        return first.clone();
    }
    match def.type_name() {
        Some("INT") | Some("FLOAT") => def.options.get("min").cloned().unwrap_or(json!(0)),
        Some("BOOLEAN") => json!(false),
        _ => json!(""),
    }
}

/// A socket's type name; combos (list or `COMBO`) are `"COMBO"` to the editor.
fn slot_type(kind: &Value) -> String {
    match kind {
        Value::String(s) => s.clone(),
        _ => "COMBO".to_owned(),
    }
}

/// Everything the layout needs to know about one node.
struct Placed {
    depth: usize,
    order: usize,
    size: [f64; 2],
}

/// Layout constants, in the editor's canvas units.
const MARGIN: f64 = 50.0;
const TITLE_HEIGHT: f64 = 30.0;
const SLOT_HEIGHT: f64 = 20.0;
const WIDGET_HEIGHT: f64 = 24.0;
const COLUMN_GAP: f64 = 80.0;
const ROW_GAP: f64 = 40.0;

/// A size at least as large as the editor computes on load (it grows nodes that are
/// too small, which would make neighbours overlap; never shrinks them).
fn estimate_size(title: &str, inputs: usize, outputs: usize, slots: &[WidgetSlot<'_>]) -> [f64; 2] {
    let text_width = 10.0 * title.chars().count() as f64 + 60.0;
    let mut width = text_width.max(220.0);
    if !slots.is_empty() {
        width = width.max(320.0);
    }
    let rows = inputs.max(outputs) as f64;
    let mut height = rows * SLOT_HEIGHT + slots.len() as f64 * WIDGET_HEIGHT + 16.0;
    for slot in slots {
        if let WidgetSlot::Input(def) = slot
            && def.options.get("multiline").and_then(Value::as_bool) == Some(true)
        {
            height += 100.0;
        }
        if let WidgetSlot::Upload = slot {
            // The loaded image is previewed inside the node.
            height += 260.0;
        }
    }
    [width.round(), height.max(60.0).round()]
}

/// Converts an API graph to the UI format with the node schemas of `catalogue`.
pub fn to_workflow(
    graph: &ApiGraph,
    catalogue: &NodeCatalogue,
) -> Result<UiWorkflow, UiFormatError> {
    let order = graph.topological_order()?;
    let order_index: HashMap<&NodeId, usize> =
        order.iter().enumerate().map(|(i, id)| (*id, i)).collect();

    // Check every node against its schema before numbering anything.
    let mut schemas: BTreeMap<&NodeId, &NodeSchema> = BTreeMap::new();
    for (id, node) in graph.nodes() {
        let class_type = node
            .class_type()
            .ok_or_else(|| UiFormatError::MissingClassType {
                node: id.to_string(),
            })?;
        let schema = catalogue
            .get(class_type)
            .ok_or_else(|| UiFormatError::UnknownClass {
                node: id.to_string(),
                class_type: class_type.to_owned(),
            })?;
        schemas.insert(id, schema);
    }
    for (id, node) in graph.nodes() {
        check_node(graph, id, node, schemas[id], catalogue)?;
    }

    // Depth: the longest path from a node nothing feeds.
    let mut depth: HashMap<&str, usize> = HashMap::new();
    for id in &order {
        let node = graph.node(id.as_str()).expect("ordered ids exist");
        let d = graph
            .links_of(node)
            .filter_map(|(_, l)| depth.get(l.node).map(|d| d + 1))
            .max()
            .unwrap_or(0);
        depth.insert(id.as_str(), d);
    }

    let mut links: Vec<UiLink> = Vec::new();
    let mut outgoing: HashMap<(String, usize), Vec<u64>> = HashMap::new();
    let mut nodes = Vec::with_capacity(graph.len());
    let mut placed = Vec::with_capacity(graph.len());
    for (id, node) in graph.nodes() {
        let schema = schemas[id];
        let class_type = node.class_type().expect("checked above").to_owned();
        let ui_id = UiNodeId::from_api(id);
        let defs = schema.inputs();
        let mut inputs = Vec::new();
        // Sockets first, in schema order, then the widgets fed by a link: the order in
        // which the editor creates them when it loads an API graph.
        let sockets = defs.iter().filter(|d| !is_widget(d));
        let converted = defs
            .iter()
            .filter(|d| is_widget(d) && node.inputs.get(d.name).and_then(as_link).is_some());
        for def in sockets.chain(converted) {
            let link = match node.inputs.get(def.name).and_then(as_link) {
                Some(source) => {
                    let source_id = NodeId::from(source.node);
                    let kind = schemas[&source_id]
                        .output_type(source.slot)
                        .map(slot_type)
                        .expect("checked above");
                    let link_id = links.len() as u64 + 1;
                    links.push(UiLink(
                        link_id,
                        UiNodeId::from_api(&source_id),
                        source.slot,
                        ui_id.clone(),
                        inputs.len(),
                        kind,
                    ));
                    outgoing
                        .entry((source.node.to_owned(), source.slot))
                        .or_default()
                        .push(link_id);
                    Some(link_id)
                }
                None => None,
            };
            inputs.push(UiInput {
                name: def.name.to_owned(),
                kind: slot_type(def.kind),
                link,
                widget: is_widget(def).then(|| WidgetRef {
                    name: def.name.to_owned(),
                }),
            });
        }

        let slots = widget_slots(schema);
        let mut unset = Vec::new();
        let widgets_values: Vec<Value> = slots
            .iter()
            .map(|slot| match slot {
                WidgetSlot::Input(def) => match node.inputs.get(def.name) {
                    Some(v) if as_link(v).is_none() => v.clone(),
                    Some(_) => widget_default(def),
                    None => {
                        unset.push(Value::from(def.name));
                        widget_default(def)
                    }
                },
                WidgetSlot::Control => json!(CONTROL_FIXED),
                WidgetSlot::Upload => json!(UPLOAD_WIDGET_VALUE),
            })
            .collect();

        let meta_title = node
            .meta
            .as_ref()
            .and_then(|m| m.get("title"))
            .and_then(Value::as_str);
        let title = meta_title
            .map(str::to_owned)
            .or_else(|| schema.display_name.clone())
            .unwrap_or_else(|| class_type.clone());
        let mut kept = Map::new();
        let plain_meta =
            matches!(&node.meta, Some(Value::Object(m)) if m.len() == 1 && meta_title.is_some());
        if !plain_meta {
            kept.insert("meta".into(), node.meta.clone().unwrap_or(Value::Null));
        }
        if !unset.is_empty() {
            kept.insert("unset_inputs".into(), Value::Array(unset));
        }
        let mut properties = Map::new();
        properties.insert(SEARCH_REPLACE_PROPERTY.into(), json!(class_type));
        if !kept.is_empty() {
            properties.insert(KEPT_PROPERTY.into(), Value::Object(kept));
        }

        let size = estimate_size(&title, inputs.len(), schema.output.len(), &slots);
        placed.push(Placed {
            depth: depth[id.as_str()],
            order: order_index[id],
            size,
        });
        nodes.push(UiNode {
            id: ui_id,
            class_type,
            title: Some(title),
            pos: [0.0, 0.0],
            size,
            flags: Map::new(),
            order: order_index[id],
            mode: 0,
            inputs,
            outputs: Vec::new(),
            properties,
            widgets_values,
        });
    }

    // Outputs last: they list the links other nodes made to them.
    for ((id, _), ui) in graph.nodes().zip(nodes.iter_mut()) {
        let schema = schemas[id];
        ui.outputs = schema
            .output
            .iter()
            .enumerate()
            .map(|(slot, kind)| UiOutput {
                name: schema
                    .output_name
                    .get(slot)
                    .and_then(Value::as_str)
                    .map(str::to_owned)
                    .unwrap_or_else(|| slot_type(kind)),
                kind: slot_type(kind),
                links: Some(
                    outgoing
                        .remove(&(id.as_str().to_owned(), slot))
                        .unwrap_or_default(),
                ),
                slot_index: slot,
            })
            .collect();
    }

    for (ui, pos) in nodes.iter_mut().zip(layout(&placed)) {
        ui.pos = pos;
    }

    let last_node_id = nodes
        .iter()
        .map(|n| match n.id {
            UiNodeId::Number(v) => v,
            UiNodeId::Text(_) => 0,
        })
        .max()
        .unwrap_or(0)
        .max(nodes.len() as u64);
    Ok(UiWorkflow {
        last_node_id,
        last_link_id: links.len() as u64,
        nodes,
        links,
        groups: Vec::new(),
        config: Map::new(),
        extra: Map::new(),
        version: WORKFLOW_VERSION,
    })
}

/// Left to right by depth; within a column, nodes stacked in execution order.
fn layout(placed: &[Placed]) -> Vec<[f64; 2]> {
    let columns = placed.iter().map(|p| p.depth).max().map_or(0, |d| d + 1);
    let mut column_width = vec![0.0f64; columns];
    for p in placed {
        column_width[p.depth] = column_width[p.depth].max(p.size[0]);
    }
    let mut column_x = Vec::with_capacity(columns);
    let mut x = MARGIN;
    for width in &column_width {
        column_x.push(x);
        x += width + COLUMN_GAP;
    }
    let mut by_column: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (i, p) in placed.iter().enumerate() {
        by_column.entry(p.depth).or_default().push(i);
    }
    let mut positions = vec![[0.0, 0.0]; placed.len()];
    for (depth, mut members) in by_column {
        members.sort_by_key(|i| placed[*i].order);
        let mut y = MARGIN + TITLE_HEIGHT;
        for i in members {
            positions[i] = [column_x[depth], y];
            y += placed[i].size[1] + TITLE_HEIGHT + ROW_GAP;
        }
    }
    positions
}

/// The API node's inputs are all in its schema, its sockets are linked, and its links
/// reach outputs that exist.
fn check_node(
    graph: &ApiGraph,
    id: &NodeId,
    node: &ApiNode,
    schema: &NodeSchema,
    catalogue: &NodeCatalogue,
) -> Result<(), UiFormatError> {
    let class_type = node.class_type().unwrap_or_default();
    let defs = schema.inputs();
    for (name, value) in &node.inputs {
        let Some(def) = defs.iter().find(|d| d.name == name) else {
            return Err(UiFormatError::UnknownInput {
                node: id.to_string(),
                class_type: class_type.to_owned(),
                input: name.clone(),
            });
        };
        match as_link(value) {
            Some(link) => {
                let source = graph
                    .node(link.node)
                    .ok_or_else(|| UiFormatError::MissingSource {
                        node: id.to_string(),
                        input: name.clone(),
                        source_node: link.node.to_owned(),
                    })?;
                let source_class = source.class_type().unwrap_or_default();
                let outputs = catalogue.get(source_class).map_or(0, |s| s.output.len());
                if link.slot >= outputs {
                    return Err(UiFormatError::MissingOutput {
                        node: id.to_string(),
                        input: name.clone(),
                        source_node: link.node.to_owned(),
                        class_type: source_class.to_owned(),
                        slot: link.slot,
                        outputs,
                    });
                }
            }
            None if !is_widget(def) => {
                return Err(UiFormatError::SocketNotLinked {
                    node: id.to_string(),
                    class_type: class_type.to_owned(),
                    input: name.clone(),
                    kind: slot_type(def.kind),
                });
            }
            None => {}
        }
    }
    Ok(())
}

/// Converts a UI-format workflow back to an API graph with the node schemas of
/// `catalogue`: the inverse of [`to_workflow`].
pub fn to_api(workflow: &UiWorkflow, catalogue: &NodeCatalogue) -> Result<ApiGraph, UiFormatError> {
    let links: HashMap<u64, &UiLink> = workflow.links.iter().map(|l| (l.id(), l)).collect();
    let mut nodes = BTreeMap::new();
    for ui in &workflow.nodes {
        let id = ui.id.to_api();
        if ui.mode != 0 {
            return Err(UiFormatError::UnsupportedMode {
                node: id.to_string(),
                mode: ui.mode,
            });
        }
        let schema = catalogue
            .get(&ui.class_type)
            .ok_or_else(|| UiFormatError::UnknownClass {
                node: id.to_string(),
                class_type: ui.class_type.clone(),
            })?;
        let kept = ui.properties.get(KEPT_PROPERTY);
        let unset: BTreeSet<&str> = kept
            .and_then(|k| k.get("unset_inputs"))
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();

        let mut linked: HashMap<&str, Value> = HashMap::new();
        for input in &ui.inputs {
            let Some(link_id) = input.link else { continue };
            let link = links
                .get(&link_id)
                .ok_or_else(|| UiFormatError::UnknownLink {
                    node: id.to_string(),
                    input: input.name.clone(),
                    link: link_id,
                })?;
            let name = input.widget.as_ref().map_or(&input.name, |w| &w.name);
            linked.insert(name, json!([link.1.to_api().as_str(), link.2]));
        }

        let mut values: HashMap<&str, &Value> = HashMap::new();
        for (slot, value) in widget_slots(schema).iter().zip(&ui.widgets_values) {
            if let WidgetSlot::Input(def) = slot {
                values.insert(def.name, value);
            }
        }

        let mut inputs = Map::new();
        for def in schema.inputs() {
            if let Some(link) = linked.remove(def.name) {
                inputs.insert(def.name.to_owned(), link);
            } else if is_widget(&def)
                && !unset.contains(def.name)
                && let Some(value) = values.get(def.name)
            {
                inputs.insert(def.name.to_owned(), (*value).clone());
            }
        }
        if let Some(name) = linked.keys().next() {
            return Err(UiFormatError::UnknownInput {
                node: id.to_string(),
                class_type: ui.class_type.clone(),
                input: (*name).to_owned(),
            });
        }

        let meta = match kept.and_then(|k| k.get("meta")) {
            Some(Value::Null) => None,
            Some(meta) => Some(meta.clone()),
            None => ui.title.as_ref().map(|t| json!({ "title": t })),
        };
        let node = ApiNode {
            class_type: Some(ui.class_type.clone()),
            inputs,
            meta,
        };
        if nodes.insert(id.clone(), node).is_some() {
            return Err(UiFormatError::DuplicateNode(id.to_string()));
        }
    }
    Ok(ApiGraph::from_nodes(nodes))
}

#[cfg(test)]
mod tests;

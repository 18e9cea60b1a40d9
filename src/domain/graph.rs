//! ComfyUI prompts in API format and their validation.
//!
//! An [`ApiGraph`] is the `prompt` object of `POST /prompt`: node id → `{class_type,
//! inputs, _meta?}`, where an input is either a literal or a link `["node_id", slot]`.
//! Validation answers in ComfyUI's own 400 body ([`ComfyValidationError`]) because the
//! ComfyUI-compatible dialect must hand that body to unchanged ComfyUI clients, and the
//! other dialects embed it as the detail of their 400. The algorithm mirrors ComfyUI
//! 0.3.64's `validate_prompt`/`validate_inputs` (including which node an error is pinned
//! on and how `dependent_outputs` accumulate), so bodies match the captured traces.

use indexmap::IndexMap;
use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::node_catalogue::NodeCatalogue;

mod pyfmt;
pub mod ui_format;
mod validate;

/// A node id: the string key of a prompt object.
///
/// Ordered numerically when both ids are numbers (`"2" < "10"`), so iteration follows the
/// order a workflow author wrote; ComfyUI's own order (dict insertion) is not kept by JSON
/// maps, and a numeric order is the one that matches it for every real workflow file.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct NodeId(String);

impl NodeId {
    pub fn new(id: impl Into<String>) -> Self {
        Self(id.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Ord for NodeId {
    fn cmp(&self, other: &Self) -> Ordering {
        match (self.0.parse::<u64>(), other.0.parse::<u64>()) {
            (Ok(a), Ok(b)) => a.cmp(&b).then_with(|| self.0.cmp(&other.0)),
            (Ok(_), Err(_)) => Ordering::Less,
            (Err(_), Ok(_)) => Ordering::Greater,
            (Err(_), Err(_)) => self.0.cmp(&other.0),
        }
    }
}

impl PartialOrd for NodeId {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for NodeId {
    fn from(s: &str) -> Self {
        Self(s.to_owned())
    }
}

/// One node of a prompt.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ApiNode {
    /// Optional in the type because a client may omit it, and ComfyUI answers that with
    /// a specific `invalid_prompt` body rather than a parse error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class_type: Option<String>,
    #[serde(default)]
    pub inputs: Map<String, Value>,
    /// Editor metadata (`{"title": …}`); carried through untouched.
    #[serde(default, rename = "_meta", skip_serializing_if = "Option::is_none")]
    pub meta: Option<Value>,
}

impl ApiNode {
    pub fn class_type(&self) -> Option<&str> {
        self.class_type.as_deref()
    }
}

/// A link read from an input value: output `slot` of node `node`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link<'a> {
    pub node: &'a str,
    pub slot: usize,
}

/// Reads a well-formed link `["node_id", slot]`; anything else is a literal here (the
/// validator reports lists that are not well-formed links).
pub fn as_link(value: &Value) -> Option<Link<'_>> {
    match value.as_array()?.as_slice() {
        [Value::String(node), slot] => Some(Link {
            node,
            slot: usize::try_from(slot.as_u64()?).ok()?,
        }),
        _ => None,
    }
}

/// A prompt in ComfyUI API format.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ApiGraph {
    nodes: IndexMap<NodeId, ApiNode>,
}

/// The graph has a dependency cycle through this node, so it has no execution order.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("node {0} is part of a dependency cycle")]
pub struct CycleError(pub NodeId);

impl ApiGraph {
    pub fn from_nodes(nodes: impl IntoIterator<Item = (NodeId, ApiNode)>) -> Self {
        Self {
            nodes: nodes.into_iter().collect(),
        }
    }

    pub fn node(&self, id: &str) -> Option<&ApiNode> {
        self.nodes.get(&NodeId::from(id))
    }

    pub fn node_mut(&mut self, id: &str) -> Option<&mut ApiNode> {
        self.nodes.get_mut(&NodeId::from(id))
    }

    pub fn nodes(&self) -> impl Iterator<Item = (&NodeId, &ApiNode)> {
        self.nodes.iter()
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Distinct class types the graph uses, sorted: what a worker must have installed.
    pub fn class_types(&self) -> BTreeSet<&str> {
        self.nodes
            .values()
            .filter_map(ApiNode::class_type)
            .collect()
    }

    /// Well-formed links of a node, by input name.
    pub fn links_of<'a>(&'a self, node: &'a ApiNode) -> impl Iterator<Item = (&'a str, Link<'a>)> {
        node.inputs
            .iter()
            .filter_map(|(name, v)| as_link(v).map(|link| (name.as_str(), link)))
    }

    /// Nodes nothing links from: the outputs of the graph when no catalogue says which
    /// classes are output nodes (with one, use [`ApiGraph::catalogue_outputs`]).
    /// The graph of just these outputs and the nodes they need: what ComfyUI runs of
    /// a prompt whose other outputs failed validation.
    pub fn only_outputs(&self, outputs: &[NodeId]) -> ApiGraph {
        let mut keep = BTreeSet::new();
        let mut stack = outputs.to_vec();
        while let Some(id) = stack.pop() {
            if !keep.insert(id.clone()) {
                continue;
            }
            if let Some(node) = self.node(id.as_str()) {
                stack.extend(self.links_of(node).map(|(_, l)| NodeId::new(l.node)));
            }
        }
        ApiGraph::from_nodes(
            self.nodes()
                .filter(|(id, _)| keep.contains(*id))
                .map(|(id, n)| (id.clone(), n.clone())),
        )
    }

    pub fn output_nodes(&self) -> Vec<&NodeId> {
        let used: BTreeSet<&str> = self
            .nodes
            .values()
            .flat_map(|n| self.links_of(n).map(|(_, l)| l.node))
            .collect();
        self.nodes
            .keys()
            .filter(|id| !used.contains(id.as_str()))
            .collect()
    }

    /// Nodes whose class is an output node according to `catalogue`.
    pub fn catalogue_outputs(&self, catalogue: &NodeCatalogue) -> Vec<&NodeId> {
        self.nodes
            .iter()
            .filter(|(_, n)| {
                n.class_type()
                    .and_then(|c| catalogue.get(c))
                    .is_some_and(|s| s.output_node)
            })
            .map(|(id, _)| id)
            .collect()
    }

    /// Every node after the nodes it links from (Kahn's algorithm, ties by node id so the
    /// order is stable). Links to missing nodes are ignored here; `check_structure`
    /// reports them.
    pub fn topological_order(&self) -> Result<Vec<&NodeId>, CycleError> {
        let mut indegree: BTreeMap<&NodeId, usize> = self.nodes.keys().map(|k| (k, 0)).collect();
        let mut dependents: HashMap<&str, Vec<&NodeId>> = HashMap::new();
        for (id, node) in &self.nodes {
            let sources: BTreeSet<&str> = self
                .links_of(node)
                .map(|(_, l)| l.node)
                .filter(|n| self.node(n).is_some())
                .collect();
            for source in sources {
                *indegree.get_mut(id).expect("every node has an entry") += 1;
                dependents.entry(source).or_default().push(id);
            }
        }
        let mut ready: BTreeSet<&NodeId> = indegree
            .iter()
            .filter(|(_, d)| **d == 0)
            .map(|(id, _)| *id)
            .collect();
        let mut order = Vec::with_capacity(self.nodes.len());
        while let Some(id) = ready.pop_first() {
            order.push(id);
            for dependent in dependents.get(id.as_str()).into_iter().flatten() {
                let d = indegree.get_mut(dependent).expect("known node");
                *d -= 1;
                if *d == 0 {
                    ready.insert(dependent);
                }
            }
        }
        if order.len() == self.nodes.len() {
            Ok(order)
        } else {
            let stuck = indegree
                .into_iter()
                .find(|(_, d)| *d > 0)
                .map(|(id, _)| id.clone())
                .expect("a node is left over");
            Err(CycleError(stuck))
        }
    }

    /// The checks that need no node catalogue: no nodes, a node without `class_type`, a
    /// malformed link, a link to a node that does not exist, a dependency cycle.
    ///
    /// Without a catalogue the outputs are guessed (the sink nodes), so this check is
    /// strict where ComfyUI is lenient: any node error fails the whole graph instead of
    /// only the outputs depending on it. Errors carry no `input_config` (only a catalogue
    /// knows it); otherwise the body is the one ComfyUI would send.
    pub fn check_structure(&self) -> Result<(), ComfyValidationError> {
        self.validate(None).map(|_| ())
    }

    /// ComfyUI's full prompt validation against the node schemas of one ComfyUI:
    /// unknown classes, required inputs, link types, number ranges, conversions, combos.
    ///
    /// Deliberate difference: combo inputs flagged `image_upload` (LoadImage's file list)
    /// are not checked against the catalogue's list, because uploads land on the worker
    /// after the catalogue was taken; ComfyUI checks the file itself at run time.
    pub fn validate_against(
        &self,
        catalogue: &NodeCatalogue,
    ) -> Result<ValidationReport, ComfyValidationError> {
        self.validate(Some(catalogue))
    }

    fn validate(
        &self,
        catalogue: Option<&NodeCatalogue>,
    ) -> Result<ValidationReport, ComfyValidationError> {
        for (id, node) in &self.nodes {
            let Some(class_type) = node.class_type() else {
                return Err(ComfyValidationError::prompt(
                    PromptErrorType::InvalidPrompt,
                    "Cannot execute because a node is missing the class_type property.",
                    format!("Node ID '#{id}'"),
                ));
            };
            if catalogue.is_some_and(|c| !c.contains(class_type)) {
                return Err(ComfyValidationError::prompt(
                    PromptErrorType::InvalidPrompt,
                    format!("Cannot execute because node {class_type} does not exist."),
                    format!("Node ID '#{id}'"),
                ));
            }
        }
        let outputs = match catalogue {
            Some(c) => self.catalogue_outputs(c),
            None => self.output_nodes(),
        };
        if outputs.is_empty() {
            return Err(ComfyValidationError::prompt(
                PromptErrorType::PromptNoOutputs,
                "Prompt has no outputs",
                "",
            ));
        }
        if let Err(CycleError(id)) = self.topological_order() {
            // ComfyUI 0.3.64 would recurse until Python's stack gives out; we refuse early
            // with the same top-level type it uses for other malformed prompts.
            return Err(ComfyValidationError::prompt(
                PromptErrorType::InvalidPrompt,
                "Cannot execute because the prompt contains a dependency cycle.",
                format!("Node ID '#{id}'"),
            ));
        }
        validate::Validator::new(self, catalogue).run(outputs, catalogue.is_none())
    }
}

/// What a successful validation leaves behind: the outputs that will run, and errors of
/// the outputs that will not (ComfyUI's 200 body carries these as `node_errors`).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ValidationReport {
    pub good_outputs: Vec<NodeId>,
    pub node_errors: BTreeMap<NodeId, NodeErrors>,
}

/// ComfyUI's 400 body for a rejected prompt, field for field.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, thiserror::Error)]
#[error("{}: {}", error.message, error.details)]
pub struct ComfyValidationError {
    pub error: PromptError,
    pub node_errors: BTreeMap<NodeId, NodeErrors>,
}

impl ComfyValidationError {
    fn prompt(
        kind: PromptErrorType,
        message: impl Into<String>,
        details: impl Into<String>,
    ) -> Self {
        Self {
            error: PromptError {
                kind,
                message: message.into(),
                details: details.into(),
                extra_info: Map::new(),
            },
            node_errors: BTreeMap::new(),
        }
    }

    /// The outputs `self` leaves standing, and the graph of just them and what they
    /// need: what ComfyUI runs of a partly valid prompt.
    pub fn surviving(&self, graph: &ApiGraph) -> Option<ApiGraph> {
        let fallen: BTreeSet<&NodeId> = self
            .node_errors
            .values()
            .flat_map(|e| e.dependent_outputs.iter())
            .collect();
        let standing: Vec<NodeId> = graph
            .output_nodes()
            .into_iter()
            .filter(|o| !fallen.contains(o))
            .cloned()
            .collect();
        if standing.is_empty() {
            return None;
        }
        Some(graph.only_outputs(&standing))
    }

    /// What ComfyUI's LoadImage validation says of image files it does not have:
    /// `custom_validation_failed` on each node naming one, with the outputs it takes
    /// down, under `prompt_outputs_failed_validation`.
    pub fn missing_images(graph: &ApiGraph, missing: &[String]) -> Self {
        let mut out = Self::prompt(
            PromptErrorType::PromptOutputsFailedValidation,
            "Prompt outputs failed validation",
            "",
        );
        for output in graph.output_nodes() {
            let mut stack = vec![output.clone()];
            let mut seen = BTreeSet::new();
            while let Some(id) = stack.pop() {
                if !seen.insert(id.clone()) {
                    continue;
                }
                let Some(node) = graph.node(id.as_str()) else {
                    continue;
                };
                stack.extend(graph.links_of(node).map(|(_, l)| NodeId::new(l.node)));
                let Some(Value::String(name)) = node.inputs.get("image") else {
                    continue;
                };
                if !missing.contains(name) {
                    continue;
                }
                let entry = out
                    .node_errors
                    .entry(id.clone())
                    .or_insert_with(|| NodeErrors {
                        errors: vec![InputError::new(
                            InputErrorType::CustomValidationFailed,
                            "Custom validation failed for node",
                            format!("image - Invalid image file: {name}"),
                            Map::from_iter([("input_name".to_owned(), Value::from("image"))]),
                        )],
                        dependent_outputs: Vec::new(),
                        class_type: node.class_type().unwrap_or_default().to_owned(),
                    });
                entry.dependent_outputs.push(output.clone());
            }
        }
        out
    }

    /// The body a ComfyUI-compatible `/prompt` answers with (status 400).
    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).expect("plain data serialises")
    }
}

/// The top-level `error` object.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PromptError {
    #[serde(rename = "type")]
    pub kind: PromptErrorType,
    pub message: String,
    pub details: String,
    pub extra_info: Map<String, Value>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PromptErrorType {
    InvalidPrompt,
    PromptNoOutputs,
    PromptOutputsFailedValidation,
    NoPrompt,
}

/// `node_errors[id]`: why one node failed and which outputs it took down.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeErrors {
    pub errors: Vec<InputError>,
    pub dependent_outputs: Vec<NodeId>,
    pub class_type: String,
}

/// One entry of `node_errors[id].errors`. `extra_info` varies by kind (input name, input
/// config, received value, linked node…), so it stays a JSON object built by the validator.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InputError {
    #[serde(rename = "type")]
    pub kind: InputErrorType,
    pub message: String,
    pub details: String,
    pub extra_info: Map<String, Value>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InputErrorType {
    RequiredInputMissing,
    BadLinkedInput,
    ReturnTypeMismatch,
    ValueSmallerThanMin,
    ValueBiggerThanMax,
    InvalidInputType,
    ValueNotInList,
    CustomValidationFailed,
    ExceptionDuringInnerValidation,
    ExceptionDuringValidation,
}

impl InputError {
    pub(crate) fn new(
        kind: InputErrorType,
        message: impl Into<String>,
        details: impl Into<String>,
        extra_info: Map<String, Value>,
    ) -> Self {
        Self {
            kind,
            message: message.into(),
            details: details.into(),
            extra_info,
        }
    }
}

#[cfg(test)]
mod tests;

//! Workflow manifests: the Runner's description of a shipped workflow (seed 004's
//! `manifest.yaml`) and its checks against the workflow graph it describes.
//!
//! A manifest says which ComfyUI node fields a user may set and within which limits;
//! [`crate::domain::params`] applies a user's values through it. Field names here are the
//! wire contract of `GET /api/run/{workflow_id}`, so they follow the seed exactly.

use std::collections::HashMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{Number, Value};

use super::graph::{ApiGraph, as_link};

/// A workflow's id, also its folder name under `manifests/` and a URL path segment.
///
/// Only lowercase ASCII letters, digits, `-` and `_`, 1–64 characters: a path parameter
/// that parses can never name a file outside the catalogue (no `/`, `.`, `\`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct WorkflowId(String);

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid workflow id {0:?}: use 1-64 lowercase letters, digits, '-' or '_'")]
pub struct InvalidWorkflowId(pub String);

impl WorkflowId {
    pub fn parse(s: &str) -> Result<Self, InvalidWorkflowId> {
        let ok = (1..=64).contains(&s.len())
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(InvalidWorkflowId(s.to_owned()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for WorkflowId {
    type Error = InvalidWorkflowId;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse(&s)
    }
}

impl From<WorkflowId> for String {
    fn from(id: WorkflowId) -> Self {
        id.0
    }
}

impl std::str::FromStr for WorkflowId {
    type Err = InvalidWorkflowId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for WorkflowId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// `manifest.yaml`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub id: WorkflowId,
    pub name: String,
    #[serde(rename = "type")]
    pub kind: WorkflowType,
    pub category: String,
    pub description: String,
    #[serde(default)]
    pub inputs: Vec<InputSpec>,
    #[serde(default)]
    pub outputs: Vec<OutputSpec>,
    /// Model files a worker must hold to run this workflow.
    #[serde(default)]
    pub required_models: Vec<String>,
    /// Node class names (as `/object_info` reports them) beyond what the graph itself
    /// shows; see [`Manifest::required_nodes`]. The seed lists a node *pack* here; class
    /// names are what workers can actually report.
    #[serde(default)]
    pub required_nodes: Vec<String>,
    /// Longest a run may take before its worker interrupts it and fails it with a
    /// timeout (the worker's own limit applies when this is absent or larger).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_limit_secs: Option<u32>,
}

/// Only pre-built graphs exist today; the seed's `dynamic` (block-assembled) workflows
/// would add a variant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkflowType {
    Static,
}

/// One user-settable parameter, bound to one field of one node.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputSpec {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: InputKind,
    pub label: String,
    pub node_id: NodeRef,
    pub field: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<Number>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<Number>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub options: Option<Vec<Value>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InputKind {
    Text,
    Int,
    Float,
    Bool,
    /// An int where -1 means "draw a random one" at execution time.
    Seed,
    /// A filename in ComfyUI's input directory (an upload).
    Image,
    /// One of `options`.
    Select,
}

impl fmt::Display for InputKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            InputKind::Text => "text",
            InputKind::Int => "int",
            InputKind::Float => "float",
            InputKind::Bool => "bool",
            InputKind::Seed => "seed",
            InputKind::Image => "image",
            InputKind::Select => "select",
        })
    }
}

/// A node reference as written in the YAML: the seed writes `node_id: 1`, graphs key
/// nodes by string. Kept as written so the manifest serialises back unchanged.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum NodeRef {
    Number(u64),
    Name(String),
}

impl NodeRef {
    /// The graph's key for this node.
    pub fn key(&self) -> String {
        match self {
            NodeRef::Number(n) => n.to_string(),
            NodeRef::Name(s) => s.clone(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputSpec {
    #[serde(rename = "type")]
    pub kind: String,
    pub format: String,
}

/// A manifest that does not fit its graph. Each message starts with the field path.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum ManifestError {
    #[error("id: \"{id}\" does not match its folder \"{folder}\"")]
    IdMismatch { id: String, folder: String },
    #[error("inputs[{index}].id: \"{id}\" is already used by inputs[{first}]")]
    DuplicateInputId {
        index: usize,
        id: String,
        first: usize,
    },
    #[error("inputs[{index}].id: \"{id}\" starts with '_', which is reserved for special params")]
    ReservedInputId { index: usize, id: String },
    #[error("inputs[{index}].node_id: node \"{node}\" does not exist in workflow.json")]
    UnknownNode { index: usize, node: String },
    #[error(
        "inputs[{index}].field: node \"{node}\" ({class_type}) has no input \"{field}\" in workflow.json"
    )]
    UnknownField {
        index: usize,
        node: String,
        class_type: String,
        field: String,
    },
    #[error(
        "inputs[{index}].field: \"{field}\" of node \"{node}\" is a link to another node, not a value a user can set"
    )]
    FieldIsLink {
        index: usize,
        node: String,
        field: String,
    },
    #[error("inputs[{index}].min: {min} is greater than max {max}")]
    MinAboveMax {
        index: usize,
        min: Number,
        max: Number,
    },
    #[error("inputs[{index}].{bound}: min and max only apply to int, float and seed inputs")]
    BoundOnNonNumber { index: usize, bound: &'static str },
    #[error("inputs[{index}].default: {value} is below min {min}")]
    DefaultBelowMin {
        index: usize,
        value: Value,
        min: Number,
    },
    #[error("inputs[{index}].default: {value} is above max {max}")]
    DefaultAboveMax {
        index: usize,
        value: Value,
        max: Number,
    },
    #[error("inputs[{index}].default: {value} is not a valid {kind} value")]
    DefaultWrongType {
        index: usize,
        value: Value,
        kind: InputKind,
    },
    #[error("inputs[{index}].options: a select input needs a non-empty list of options")]
    MissingOptions { index: usize },
    #[error("inputs[{index}].options: only select inputs take options")]
    OptionsOnNonSelect { index: usize },
    #[error("inputs[{index}].default: {value} is not one of the options")]
    DefaultNotInOptions { index: usize, value: Value },
}

impl Manifest {
    /// Every way this manifest fails to describe `graph`, all at once.
    pub fn validate(&self, graph: &ApiGraph) -> Result<(), Vec<ManifestError>> {
        let mut errors = Vec::new();
        let mut seen: HashMap<&str, usize> = HashMap::new();
        for (index, input) in self.inputs.iter().enumerate() {
            if let Some(&first) = seen.get(input.id.as_str()) {
                errors.push(ManifestError::DuplicateInputId {
                    index,
                    id: input.id.clone(),
                    first,
                });
            } else {
                seen.insert(&input.id, index);
            }
            if input.id.starts_with('_') {
                errors.push(ManifestError::ReservedInputId {
                    index,
                    id: input.id.clone(),
                });
            }
            check_binding(index, input, graph, &mut errors);
            check_limits(index, input, &mut errors);
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }

    /// The folder a manifest lives in must carry its id, or lookups by URL would miss it.
    pub fn check_folder(&self, folder: &str) -> Result<(), ManifestError> {
        if self.id.as_str() == folder {
            Ok(())
        } else {
            Err(ManifestError::IdMismatch {
                id: self.id.to_string(),
                folder: folder.to_owned(),
            })
        }
    }

    /// Node classes a worker needs: those declared plus those the graph uses.
    pub fn required_nodes(&self, graph: &ApiGraph) -> std::collections::BTreeSet<String> {
        graph
            .class_types()
            .into_iter()
            .map(str::to_owned)
            .chain(self.required_nodes.iter().cloned())
            .collect()
    }

    pub fn input(&self, id: &str) -> Option<&InputSpec> {
        self.inputs.iter().find(|i| i.id == id)
    }
}

fn check_binding(
    index: usize,
    input: &InputSpec,
    graph: &ApiGraph,
    errors: &mut Vec<ManifestError>,
) {
    let node_key = input.node_id.key();
    let Some(node) = graph.node(&node_key) else {
        errors.push(ManifestError::UnknownNode {
            index,
            node: node_key,
        });
        return;
    };
    match node.inputs.get(&input.field) {
        None => errors.push(ManifestError::UnknownField {
            index,
            node: node_key,
            class_type: node.class_type().unwrap_or("no class_type").to_owned(),
            field: input.field.clone(),
        }),
        // Overwriting a link with a literal would silently cut the graph.
        Some(v) if as_link(v).is_some() => errors.push(ManifestError::FieldIsLink {
            index,
            node: node_key,
            field: input.field.clone(),
        }),
        Some(_) => {}
    }
}

fn check_limits(index: usize, input: &InputSpec, errors: &mut Vec<ManifestError>) {
    let numeric = matches!(
        input.kind,
        InputKind::Int | InputKind::Float | InputKind::Seed
    );
    for (bound, value) in [("min", &input.min), ("max", &input.max)] {
        if value.is_some() && !numeric {
            errors.push(ManifestError::BoundOnNonNumber { index, bound });
        }
    }
    if let (Some(min), Some(max)) = (&input.min, &input.max)
        && as_f64(min) > as_f64(max)
    {
        errors.push(ManifestError::MinAboveMax {
            index,
            min: min.clone(),
            max: max.clone(),
        });
    }
    match (&input.options, input.kind) {
        (Some(o), InputKind::Select) if !o.is_empty() => {}
        (_, InputKind::Select) => errors.push(ManifestError::MissingOptions { index }),
        (Some(_), _) => errors.push(ManifestError::OptionsOnNonSelect { index }),
        (None, _) => {}
    }
    let Some(default) = &input.default else {
        return;
    };
    if !default_fits_kind(input.kind, default) {
        errors.push(ManifestError::DefaultWrongType {
            index,
            value: default.clone(),
            kind: input.kind,
        });
        return;
    }
    if input.kind == InputKind::Seed && default.as_i64() == Some(-1) {
        return; // -1 means "random", whatever the bounds
    }
    if let Some(v) = default.as_f64() {
        if let Some(min) = input.min.as_ref().filter(|m| v < as_f64(m)) {
            errors.push(ManifestError::DefaultBelowMin {
                index,
                value: default.clone(),
                min: min.clone(),
            });
        }
        if let Some(max) = input.max.as_ref().filter(|m| v > as_f64(m)) {
            errors.push(ManifestError::DefaultAboveMax {
                index,
                value: default.clone(),
                max: max.clone(),
            });
        }
    }
    if let Some(options) = &input.options
        && input.kind == InputKind::Select
        && !options.contains(default)
    {
        errors.push(ManifestError::DefaultNotInOptions {
            index,
            value: default.clone(),
        });
    }
}

fn as_f64(n: &Number) -> f64 {
    n.as_f64().unwrap_or(f64::NAN)
}

fn default_fits_kind(kind: InputKind, v: &Value) -> bool {
    match kind {
        InputKind::Text | InputKind::Image => v.is_string(),
        InputKind::Int | InputKind::Seed => v.is_i64() || v.is_u64(),
        InputKind::Float => v.is_number(),
        InputKind::Bool => v.is_boolean(),
        InputKind::Select => !v.is_null() && !v.is_array() && !v.is_object(),
    }
}

#[cfg(test)]
mod tests;

//! The recursive walk of ComfyUI's `validate_inputs`, output by output.
//!
//! Kept faithful where clients can see it: an exception while validating a linked node
//! (a link to a missing node, a slot out of range) is pinned on the node that *holds* the
//! bad link but names the input of the node that linked to it, and `dependent_outputs`
//! of an already-failed node grow with every later output that fails. Tracebacks are
//! sent empty: ours would be Rust's, and clients only read their presence.

use std::collections::{BTreeMap, HashMap};

use serde_json::{Map, Value, json};

use super::pyfmt::{PyNum, py_float, py_int, py_repr, py_str, py_truthy};
use super::{
    ApiGraph, ComfyValidationError, InputError, InputErrorType as T, NodeErrors, NodeId,
    PromptError, PromptErrorType, ValidationReport,
};
use crate::domain::node_catalogue::{InputDef, NodeCatalogue};

/// A Python exception raised while reading a link, caught one level up.
struct Raised {
    exception_type: &'static str,
    message: String,
}

pub(super) struct Validator<'a> {
    graph: &'a ApiGraph,
    catalogue: Option<&'a NodeCatalogue>,
    /// ComfyUI's `validated` dict: results in the order they were decided.
    validated: Vec<(NodeId, bool, Vec<InputError>)>,
    index: HashMap<NodeId, usize>,
}

impl<'a> Validator<'a> {
    pub(super) fn new(graph: &'a ApiGraph, catalogue: Option<&'a NodeCatalogue>) -> Self {
        Self {
            graph,
            catalogue,
            validated: Vec::new(),
            index: HashMap::new(),
        }
    }

    pub(super) fn run(
        mut self,
        outputs: Vec<&NodeId>,
        strict: bool,
    ) -> Result<ValidationReport, ComfyValidationError> {
        let mut good_outputs = Vec::new();
        let mut failed_reasons: Vec<InputError> = Vec::new();
        let mut node_errors: BTreeMap<NodeId, NodeErrors> = BTreeMap::new();
        for output in outputs {
            let (valid, reasons) = match self.node(output.as_str()) {
                Ok(valid) => (valid, self.reasons(output).to_vec()),
                Err(raised) => {
                    let mut extra = Map::new();
                    extra.insert("exception_type".into(), raised.exception_type.into());
                    extra.insert("traceback".into(), json!([]));
                    let reasons = vec![InputError::new(
                        T::ExceptionDuringValidation,
                        "Exception when validating node",
                        raised.message,
                        extra,
                    )];
                    self.record(output.clone(), false, reasons.clone());
                    (false, reasons)
                }
            };
            if valid {
                good_outputs.push(output.clone());
                continue;
            }
            failed_reasons.extend(reasons);
            for (id, ok, reasons) in &self.validated {
                if *ok || reasons.is_empty() {
                    continue;
                }
                let class_type = self
                    .graph
                    .node(id.as_str())
                    .and_then(|n| n.class_type())
                    .unwrap_or_default();
                node_errors
                    .entry(id.clone())
                    .or_insert_with(|| NodeErrors {
                        errors: reasons.clone(),
                        dependent_outputs: Vec::new(),
                        class_type: class_type.to_owned(),
                    })
                    .dependent_outputs
                    .push(output.clone());
            }
        }
        if good_outputs.is_empty() || (strict && !node_errors.is_empty()) {
            let details: Vec<String> = failed_reasons
                .iter()
                .map(|r| format!("{}: {}", r.message, r.details))
                .collect();
            return Err(ComfyValidationError {
                error: PromptError {
                    kind: PromptErrorType::PromptOutputsFailedValidation,
                    message: "Prompt outputs failed validation".into(),
                    details: details.join("\n"),
                    extra_info: Map::new(),
                },
                node_errors,
            });
        }
        Ok(ValidationReport {
            good_outputs,
            node_errors,
        })
    }

    fn reasons(&self, id: &NodeId) -> &[InputError] {
        self.index
            .get(id)
            .map_or(&[], |i| self.validated[*i].2.as_slice())
    }

    fn record(&mut self, id: NodeId, ok: bool, reasons: Vec<InputError>) {
        match self.index.get(&id) {
            Some(i) => self.validated[*i] = (id, ok, reasons),
            None => {
                self.index.insert(id.clone(), self.validated.len());
                self.validated.push((id, ok, reasons));
            }
        }
    }

    /// Validates one node (callers guarantee it exists and has a class); `Err` is an
    /// exception ComfyUI would raise to the caller rather than record here.
    fn node(&mut self, id: &str) -> Result<bool, Raised> {
        if let Some(i) = self.index.get(&NodeId::from(id)) {
            return Ok(self.validated[*i].1);
        }
        let graph = self.graph;
        let node = graph.node(id).expect("caller checked the node exists");
        let class_type = node.class_type().unwrap_or_default();
        let schema = self.catalogue.and_then(|c| c.get(class_type));
        // With a schema, the inputs the class declares; without, the ones the node has.
        let defs: Vec<(String, Option<InputDef<'_>>)> = match schema {
            Some(s) => s
                .inputs()
                .into_iter()
                .map(|d| (d.name.to_owned(), Some(d)))
                .collect(),
            None => node.inputs.keys().map(|k| (k.clone(), None)).collect(),
        };
        let mut errors = Vec::new();
        let mut valid = true;
        for (x, def) in defs {
            let input_config = def.as_ref().map(InputDef::input_config);
            let Some(val) = node.inputs.get(&x) else {
                if def.as_ref().is_some_and(|d| d.required) {
                    errors.push(InputError::new(
                        T::RequiredInputMissing,
                        "Required input is missing",
                        &x,
                        extra(&x, None, []),
                    ));
                }
                continue;
            };
            let Value::Array(items) = val else {
                if let Some(d) = &def {
                    check_value(&x, d, val, &mut errors);
                }
                continue;
            };
            if items.len() != 2 {
                errors.push(InputError::new(
                    T::BadLinkedInput,
                    "Bad linked input, must be a length-2 list of [node_id, slot_index]",
                    &x,
                    extra(&x, input_config, [("received_value", val.clone())]),
                ));
                continue;
            }
            // ComfyUI reads the linked node and its return type outside any try: a
            // failure here propagates to whoever is validating this node.
            let linked = match &items[0] {
                Value::String(s) if graph.node(s).is_some() => s.as_str(),
                other => {
                    return Err(Raised {
                        exception_type: "KeyError",
                        message: py_repr(other),
                    });
                }
            };
            let received_type = self.return_type(linked, &items[1])?;
            if let (Some(received), Some(d)) = (received_type, &def)
                && !types_compatible(received, d.kind)
            {
                errors.push(InputError::new(
                    T::ReturnTypeMismatch,
                    "Return type mismatch between linked nodes",
                    format!(
                        "{x}, received_type({}) mismatch input_type({})",
                        py_str(received),
                        py_str(d.kind)
                    ),
                    extra(
                        &x,
                        input_config,
                        [
                            ("received_type", received.clone()),
                            ("linked_node", val.clone()),
                        ],
                    ),
                ));
                continue;
            }
            match self.node(linked) {
                Ok(true) => {}
                Ok(false) => valid = false,
                Err(raised) => {
                    valid = false;
                    let reasons = vec![InputError::new(
                        T::ExceptionDuringInnerValidation,
                        "Exception when validating inner node",
                        &raised.message,
                        extra(
                            &x,
                            input_config,
                            [
                                ("exception_message", raised.message.clone().into()),
                                ("exception_type", raised.exception_type.into()),
                                ("traceback", json!([])),
                                ("linked_node", val.clone()),
                            ],
                        ),
                    )];
                    self.record(NodeId::new(linked), false, reasons);
                }
            }
        }
        let ok = valid && errors.is_empty();
        self.record(NodeId::new(id), ok, errors);
        Ok(ok)
    }

    /// `RETURN_TYPES[slot]` of the linked node: `None` without a catalogue.
    fn return_type(&self, linked: &str, slot: &Value) -> Result<Option<&'a Value>, Raised> {
        let Some(slot) = slot.as_u64() else {
            // Python would index from the end for a negative int; a negative output slot
            // is never meaningful, so it is refused like a slot past the end.
            let (exception_type, message) = match slot {
                Value::Number(n) if n.is_i64() => ("IndexError", "tuple index out of range".into()),
                other => (
                    "TypeError",
                    format!(
                        "tuple indices must be integers or slices, not {}",
                        python_type(other)
                    ),
                ),
            };
            return Err(Raised {
                exception_type,
                message,
            });
        };
        let Some(catalogue) = self.catalogue else {
            return Ok(None);
        };
        let class_type = self
            .graph
            .node(linked)
            .and_then(|n| n.class_type())
            .unwrap_or_default();
        let schema = catalogue
            .get(class_type)
            .expect("unknown classes are rejected before the walk");
        usize::try_from(slot)
            .ok()
            .and_then(|s| schema.output_type(s))
            .map(Some)
            .ok_or(Raised {
                exception_type: "IndexError",
                message: "tuple index out of range".into(),
            })
    }
}

fn python_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "NoneType",
        Value::Bool(_) => "bool",
        Value::Number(_) => "float",
        Value::String(_) => "str",
        Value::Array(_) => "list",
        Value::Object(_) => "dict",
    }
}

/// `extra_info` in ComfyUI's key order: input_name, input_config, then the rest.
fn extra<const N: usize>(
    input_name: &str,
    input_config: Option<Value>,
    rest: [(&str, Value); N],
) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("input_name".into(), input_name.into());
    if let Some(c) = input_config {
        m.insert("input_config".into(), c);
    }
    for (k, v) in rest {
        m.insert(k.into(), v);
    }
    m
}

/// ComfyUI's `validate_node_input`: equal types, a `*` wildcard, or overlapping
/// comma-separated unions.
fn types_compatible(received: &Value, input: &Value) -> bool {
    if received == input {
        return true;
    }
    let (Some(r), Some(i)) = (received.as_str(), input.as_str()) else {
        return false;
    };
    let split = |s: &'_ str| {
        s.split(',')
            .map(|t| t.trim().to_owned())
            .collect::<Vec<_>>()
    };
    let (rs, is) = (split(r), split(i));
    if rs.iter().chain(&is).any(|t| t == "*") {
        return true;
    }
    rs.iter().any(|t| is.contains(t))
}

/// A literal widget value: conversion to the declared type, then min, max, combo list.
fn check_value(x: &str, def: &InputDef<'_>, raw: &Value, errors: &mut Vec<InputError>) {
    // The frontend wraps list-valued widgets as {"__value__": [...]} so they are not links.
    let val = match raw {
        Value::Object(o) if o.contains_key("__value__") => &o["__value__"],
        other => other,
    };
    let type_name = def.type_name().unwrap_or_default();
    let converted = match type_name {
        "INT" => py_int(val).map(PyNum::to_json),
        "FLOAT" => py_float(val).map(PyNum::to_json),
        "STRING" => Ok(Value::String(py_str(val))),
        "BOOLEAN" => Ok(Value::Bool(py_truthy(val))),
        _ => Ok(val.clone()),
    };
    let val = match converted {
        Ok(v) => v,
        Err(exception) => {
            errors.push(InputError::new(
                T::InvalidInputType,
                format!("Failed to convert an input value to a {type_name} value"),
                format!("{x}, {}, {exception}", py_str(val)),
                extra(
                    x,
                    Some(def.input_config()),
                    [
                        ("received_value", val.clone()),
                        ("exception_message", exception.into()),
                    ],
                ),
            ));
            return;
        }
    };
    let bound = |key: &str| def.options.get(key).and_then(PyNum::from_json);
    let num = PyNum::from_json(&val);
    for (key, kind, word) in [
        ("min", T::ValueSmallerThanMin, "smaller than min"),
        ("max", T::ValueBiggerThanMax, "bigger than max"),
    ] {
        let (Some(limit), Some(n)) = (bound(key), num) else {
            continue;
        };
        let out_of_range = match n.py_cmp(limit) {
            Some(std::cmp::Ordering::Less) => key == "min",
            Some(std::cmp::Ordering::Greater) => key == "max",
            _ => false,
        };
        if out_of_range {
            errors.push(InputError::new(
                kind,
                format!("Value {n} {word} of {limit}"),
                x,
                extra(x, Some(def.input_config()), [("received_value", val)]),
            ));
            return;
        }
    }
    // Uploaded images reach the worker after its catalogue was taken; ComfyUI checks the
    // file itself (LoadImage's VALIDATE_INPUTS), so the list is not authoritative.
    if def
        .options
        .get("image_upload")
        .is_some_and(|v| v == &Value::Bool(true))
    {
        return;
    }
    if let Some(choices) = def.combo_choices()
        && !choices.iter().any(|c| super::pyfmt::py_eq(c, &val))
    {
        // ComfyUI leaves out long lists (model folders) from the body.
        let (list_info, input_config) = if choices.len() > 20 {
            (format!("(list of length {})", choices.len()), Value::Null)
        } else {
            (py_repr(&Value::Array(choices.clone())), def.input_config())
        };
        errors.push(InputError::new(
            T::ValueNotInList,
            "Value not in list",
            format!("{x}: '{}' not in {list_info}", py_str(&val)),
            extra(x, Some(input_config), [("received_value", val)]),
        ));
    }
}

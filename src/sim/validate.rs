//! Prompt validation, reproducing ComfyUI 0.3.64's `execution.validate_prompt` and
//! `validate_inputs`: the same error types, messages, details and `extra_info`,
//! including the way an exception inside a linked node is reported on that node
//! with the *outer* node's input.

use std::collections::HashMap;

use serde_json::{Map, Value, json};

use super::catalog::ClassInfo;
use super::protocol::{py_float, py_repr, py_str};

/// A Python exception raised while validating (turned into
/// `exception_during_inner_validation` / `exception_during_validation`).
struct PyError {
    kind: &'static str,
    message: String,
    traceback: Vec<String>,
}

type Checked = (bool, Vec<Value>);

/// Outcome of `validate_prompt`: the outputs to execute and the per-node errors,
/// or the top-level error (HTTP 400).
pub type Outcome = Result<(Vec<String>, Map<String, Value>), Box<(Value, Map<String, Value>)>>;

fn top_error(kind: &str, message: &str, details: &str) -> Value {
    json!({"type": kind, "message": message, "details": details, "extra_info": {}})
}

pub struct Validator<'a> {
    prompt: &'a mut Map<String, Value>,
    info: &'a Map<String, Value>,
    input_exists: &'a dyn Fn(&str) -> bool,
    validated: HashMap<String, Checked>,
    order: Vec<String>,
}

/// Validates `prompt` in place (inputs are converted to their declared types, as
/// ComfyUI does before queueing).
pub fn validate_prompt(
    prompt: &mut Map<String, Value>,
    partial: Option<&[String]>,
    info: &Map<String, Value>,
    input_exists: &dyn Fn(&str) -> bool,
) -> Outcome {
    let mut outputs = Vec::new();
    for (id, node) in prompt.iter() {
        let Some(class) = node.get("class_type") else {
            let e = top_error(
                "invalid_prompt",
                "Cannot execute because a node is missing the class_type property.",
                &format!("Node ID '#{id}'"),
            );
            return Err(Box::new((e, Map::new())));
        };
        let Some(class_info) = class.as_str().and_then(|c| info.get(c)) else {
            let e = top_error(
                "invalid_prompt",
                &format!(
                    "Cannot execute because node {} does not exist.",
                    py_str(class)
                ),
                &format!("Node ID '#{id}'"),
            );
            return Err(Box::new((e, Map::new())));
        };
        if ClassInfo(class_info).is_output() && partial.is_none_or(|p| p.iter().any(|t| t == id)) {
            outputs.push(id.clone());
        }
    }
    if outputs.is_empty() {
        let e = top_error("prompt_no_outputs", "Prompt has no outputs", "");
        return Err(Box::new((e, Map::new())));
    }
    // ComfyUI keeps outputs in a Python set, so their order is the string hashes'.
    // The recorded server listed them last-first; do the same, deterministically.
    outputs.reverse();

    let mut v = Validator {
        prompt,
        info,
        input_exists,
        validated: HashMap::new(),
        order: Vec::new(),
    };
    let mut good = Vec::new();
    let mut node_errors = Map::new();
    let mut failed_reasons: Vec<String> = Vec::new();
    for o in &outputs {
        let (valid, reasons) = match v.check(o) {
            Ok(r) => r,
            Err(ex) => {
                let reasons = vec![json!({
                    "type": "exception_during_validation",
                    "message": "Exception when validating node",
                    "details": ex.message,
                    "extra_info": {"exception_type": ex.kind, "traceback": ex.traceback},
                })];
                v.record(o, (false, reasons.clone()));
                (false, reasons)
            }
        };
        if valid {
            good.push(o.clone());
            continue;
        }
        for r in &reasons {
            failed_reasons.push(format!(
                "{}: {}",
                r["message"].as_str().unwrap_or(""),
                r["details"].as_str().unwrap_or("")
            ));
        }
        // Like ComfyUI, every node that has failed so far is charged to this output,
        // even one found while validating another output.
        for id in &v.order {
            let (ok, reasons) = &v.validated[id];
            if *ok || reasons.is_empty() {
                continue;
            }
            let entry = node_errors.entry(id.clone()).or_insert_with(|| {
                json!({
                    "errors": reasons,
                    "dependent_outputs": [],
                    "class_type": v.prompt[id]["class_type"],
                })
            });
            if let Some(deps) = entry["dependent_outputs"].as_array_mut() {
                deps.push(json!(o));
            }
        }
    }
    if good.is_empty() {
        let e = top_error(
            "prompt_outputs_failed_validation",
            "Prompt outputs failed validation",
            &failed_reasons.join("\n"),
        );
        return Err(Box::new((e, node_errors)));
    }
    Ok((good, node_errors))
}

/// The frames ComfyUI 0.3.64 prints for validation exceptions, verbatim.
const TB_RECURSE: &str = "  File \"/srv/ComfyUI/execution.py\", line 808, in validate_inputs\n    r = await validate_inputs(prompt_id, prompt, o_id, validated)\n        ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^\n";
const TB_LOOKUP: &str = "  File \"/srv/ComfyUI/execution.py\", line 788, in validate_inputs\n    o_class_type = prompt[o_id]['class_type']\n                   ~~~~~~^^^^^^\n";
const TB_SLOT: &str = "  File \"/srv/ComfyUI/execution.py\", line 790, in validate_inputs\n    received_type = r[val[1]]\n                    ~^^^^^^^^\n";
const TB_INPUTS: &str = "  File \"/srv/ComfyUI/execution.py\", line 752, in validate_inputs\n    inputs = prompt[unique_id]['inputs']\n             ~~~~~~~~~~~~~~~~~^^^^^^^^^^\n";

fn traceback(frames: &[&str]) -> Vec<String> {
    frames.iter().map(|f| (*f).to_owned()).collect()
}

impl Validator<'_> {
    fn record(&mut self, id: &str, r: Checked) {
        if !self.validated.contains_key(id) {
            self.order.push(id.to_owned());
        }
        self.validated.insert(id.to_owned(), r);
    }

    fn check(&mut self, id: &str) -> Result<Checked, PyError> {
        if let Some(r) = self.validated.get(id) {
            return Ok(r.clone());
        }
        let node = &self.prompt[id];
        let Some(inputs) = node.get("inputs").and_then(Value::as_object).cloned() else {
            return Err(PyError {
                kind: "KeyError",
                message: "'inputs'".to_owned(),
                traceback: traceback(&[TB_INPUTS]),
            });
        };
        let class = node["class_type"].as_str().unwrap_or("").to_owned();
        let info = &self.info[&class];
        let mut errors = Vec::new();
        let mut valid = true;
        let mut converted = Vec::new();
        for (name, required, spec) in ClassInfo(info).inputs() {
            let Some(val) = inputs.get(name) else {
                if required {
                    errors.push(json!({
                        "type": "required_input_missing",
                        "message": "Required input is missing",
                        "details": name,
                        "extra_info": {"input_name": name},
                    }));
                }
                continue;
            };
            let input_type = spec.get(0).cloned().unwrap_or(Value::Null);
            let opts = spec.get(1).cloned().unwrap_or_else(|| json!({}));
            let config = json!([input_type, opts]);
            if let Value::Array(link) = val {
                if link.len() != 2 {
                    errors.push(json!({
                        "type": "bad_linked_input",
                        "message": "Bad linked input, must be a length-2 list of [node_id, slot_index]",
                        "details": name,
                        "extra_info": {"input_name": name, "input_config": config, "received_value": val},
                    }));
                    continue;
                }
                let o_id = match &link[0] {
                    Value::String(s) if self.prompt.contains_key(s) => s.clone(),
                    other => {
                        return Err(PyError {
                            kind: "KeyError",
                            message: py_repr(other),
                            traceback: traceback(&[TB_LOOKUP]),
                        });
                    }
                };
                let o_class = self.prompt[&o_id]["class_type"]
                    .as_str()
                    .unwrap_or("")
                    .to_owned();
                let returns = ClassInfo(&self.info[&o_class]).output_types();
                let slot = match &link[1] {
                    Value::Number(n) if n.is_i64() => n.as_i64().unwrap_or(0),
                    other => {
                        let tname = match other {
                            Value::String(_) => "str",
                            Value::Number(_) => "float",
                            Value::Bool(_) => "bool",
                            Value::Null => "NoneType",
                            _ => "dict",
                        };
                        return Err(PyError {
                            kind: "TypeError",
                            message: format!(
                                "tuple indices must be integers or slices, not {tname}"
                            ),
                            traceback: traceback(&[TB_SLOT]),
                        });
                    }
                };
                let idx = if slot < 0 {
                    returns.len() as i64 + slot
                } else {
                    slot
                };
                let Some(received) = usize::try_from(idx)
                    .ok()
                    .and_then(|i| returns.get(i))
                    .copied()
                else {
                    return Err(PyError {
                        kind: "IndexError",
                        message: "tuple index out of range".to_owned(),
                        traceback: traceback(&[TB_SLOT]),
                    });
                };
                if !types_match(received, &input_type) {
                    errors.push(json!({
                        "type": "return_type_mismatch",
                        "message": "Return type mismatch between linked nodes",
                        "details": format!("{name}, received_type({received}) mismatch input_type({})", py_str(&input_type)),
                        "extra_info": {"input_name": name, "input_config": config, "received_type": received, "linked_node": val},
                    }));
                    continue;
                }
                match self.check(&o_id) {
                    Ok((true, _)) => {}
                    Ok((false, _)) => valid = false,
                    Err(mut ex) => {
                        valid = false;
                        let mut tb = traceback(&[TB_RECURSE]);
                        tb.append(&mut ex.traceback);
                        let reason = json!({
                            "type": "exception_during_inner_validation",
                            "message": "Exception when validating inner node",
                            "details": ex.message,
                            "extra_info": {
                                "input_name": name, "input_config": config,
                                "exception_message": ex.message, "exception_type": ex.kind,
                                "traceback": tb, "linked_node": val,
                            },
                        });
                        self.record(&o_id, (false, vec![reason]));
                    }
                }
                continue;
            }
            let mut val = val.clone();
            if let Some(inner) = val.get("__value__") {
                val = inner.clone();
            }
            let val = match convert(&input_type, &val) {
                Ok(v) => v,
                Err(msg) => {
                    errors.push(json!({
                        "type": "invalid_input_type",
                        "message": format!("Failed to convert an input value to a {} value", py_str(&input_type)),
                        "details": format!("{name}, {}, {msg}", py_str(&val)),
                        "extra_info": {"input_name": name, "input_config": config, "received_value": val, "exception_message": msg},
                    }));
                    continue;
                }
            };
            converted.push((name.to_owned(), val.clone()));
            if class == "LoadImage" && name == "image" {
                // LoadImage.VALIDATE_INPUTS replaces the combo check.
                let file = py_str(&val);
                if !(self.input_exists)(&file) {
                    errors.push(json!({
                        "type": "custom_validation_failed",
                        "message": "Custom validation failed for node",
                        "details": format!("{name} - Invalid image file: {file}"),
                        "extra_info": {"input_name": name},
                    }));
                }
                continue;
            }
            if let Some(e) = range_error(name, &val, &opts, &config) {
                errors.push(e);
                continue;
            }
            let choices = match &input_type {
                Value::Array(list) => Some(list.clone()),
                Value::String(t) if t == "COMBO" => {
                    opts.get("options").and_then(Value::as_array).cloned()
                }
                _ => None,
            };
            if let Some(choices) = choices
                && !choices.contains(&val)
            {
                let (list_info, input_config) = if choices.len() > 20 {
                    (format!("(list of length {})", choices.len()), Value::Null)
                } else {
                    (py_repr(&Value::Array(choices)), config)
                };
                errors.push(json!({
                    "type": "value_not_in_list",
                    "message": "Value not in list",
                    "details": format!("{name}: '{}' not in {list_info}", py_str(&val)),
                    "extra_info": {"input_name": name, "input_config": input_config, "received_value": val},
                }));
            }
        }
        if let Some(node_inputs) = self
            .prompt
            .get_mut(id)
            .and_then(|n| n.get_mut("inputs"))
            .and_then(Value::as_object_mut)
        {
            for (name, val) in converted {
                node_inputs.insert(name, val);
            }
        }
        let r = (valid && errors.is_empty(), errors);
        self.record(id, r.clone());
        Ok(r)
    }
}

/// `validate_node_input`: equal, `*`, or overlapping comma-separated type sets.
fn types_match(received: &str, input: &Value) -> bool {
    let Some(input) = input.as_str() else {
        return false;
    };
    if received == input {
        return true;
    }
    let split = |s: &str| {
        s.split(',')
            .map(|t| t.trim().to_owned())
            .collect::<Vec<_>>()
    };
    let (a, b) = (split(received), split(input));
    a.iter().any(|t| t == "*") || b.iter().any(|t| t == "*") || a.iter().any(|t| b.contains(t))
}

fn py_type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "NoneType",
        Value::Object(_) => "dict",
        Value::Array(_) => "list",
        Value::String(_) => "str",
        Value::Bool(_) => "bool",
        Value::Number(_) => "float",
    }
}

/// Python's `int()`, `float()`, `str()`, `bool()` as `validate_inputs` applies them.
fn convert(input_type: &Value, v: &Value) -> Result<Value, String> {
    match input_type.as_str() {
        Some("INT") => match v {
            Value::Number(n) if n.is_i64() || n.is_u64() => Ok(v.clone()),
            Value::Number(n) => Ok(json!(n.as_f64().unwrap_or(0.0).trunc() as i64)),
            Value::Bool(b) => Ok(json!(i64::from(*b))),
            Value::String(s) => {
                let t = s.trim().replace('_', "");
                t.parse::<i64>()
                    .map(|i| json!(i))
                    .or_else(|_| t.parse::<u64>().map(|u| json!(u)))
                    .map_err(|_| format!("invalid literal for int() with base 10: {}", py_repr(v)))
            }
            other => Err(format!(
                "int() argument must be a string, a bytes-like object or a real number, not '{}'",
                py_type_name(other)
            )),
        },
        Some("FLOAT") => match v {
            Value::Number(n) => Ok(json!(n.as_f64().unwrap_or(0.0))),
            Value::Bool(b) => Ok(json!(if *b { 1.0 } else { 0.0 })),
            Value::String(s) => s
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|f| f.is_finite())
                .map(|f| json!(f))
                .ok_or_else(|| format!("could not convert string to float: {}", py_repr(v))),
            other => Err(format!(
                "float() argument must be a string or a real number, not '{}'",
                py_type_name(other)
            )),
        },
        Some("STRING") => Ok(Value::String(py_str(v))),
        Some("BOOLEAN") => Ok(Value::Bool(truthy(v))),
        _ => Ok(v.clone()),
    }
}

/// Python truthiness of a JSON value.
pub fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    }
}

fn py_num(v: &Value) -> String {
    match v {
        Value::Number(n) if n.is_f64() => py_float(n.as_f64().unwrap_or(0.0)),
        other => py_str(other),
    }
}

fn range_error(name: &str, val: &Value, opts: &Value, config: &Value) -> Option<Value> {
    let x = val.as_f64()?;
    if let Some(min) = opts
        .get("min")
        .filter(|m| m.as_f64().is_some_and(|m| x < m))
    {
        return Some(json!({
            "type": "value_smaller_than_min",
            "message": format!("Value {} smaller than min of {}", py_num(val), py_num(min)),
            "details": name,
            "extra_info": {"input_name": name, "input_config": config, "received_value": val},
        }));
    }
    if let Some(max) = opts
        .get("max")
        .filter(|m| m.as_f64().is_some_and(|m| x > m))
    {
        return Some(json!({
            "type": "value_bigger_than_max",
            "message": format!("Value {} bigger than max of {}", py_num(val), py_num(max)),
            "details": name,
            "extra_info": {"input_name": name, "input_config": config, "received_value": val},
        }));
    }
    None
}

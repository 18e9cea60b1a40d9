//! Applying a Runner `params` object to a workflow: the seed 004 `build`/`execute` step.
//!
//! Every bad field is reported at once (a form can then mark them all), each with the
//! parameter it concerns and a sentence a person can act on. Random seeds come from a
//! caller-supplied RNG so tests are deterministic and the service can log what it drew.

use std::collections::BTreeMap;

use rand::Rng;
use serde::Serialize;
use serde_json::{Map, Value};

use super::graph::ApiGraph;
use super::manifest::{InputKind, InputSpec, Manifest};

/// Reserved param naming an image uploaded earlier (seed 004), used for the image input.
pub const EXISTING_INPUT_IMAGE: &str = "_existing_input_image";

/// Seeds drawn for `-1` stay below 2^53 so every JSON client (JavaScript included) reads
/// them back exactly.
pub const RANDOM_SEED_BOUND: u64 = 1 << 53;

/// A graph ready for ComfyUI's `/prompt`, and what the build decided on the way.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BuiltWorkflow {
    pub graph: ApiGraph,
    /// Every seed input's final value, the drawn ones included (the `seeds` of the
    /// execute response).
    pub seeds: BTreeMap<String, i64>,
    /// `(input id, filename)` for each image input: files the worker must have before
    /// the prompt runs.
    pub image_inputs: Vec<(String, String)>,
}

/// One rejected parameter.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ParamError {
    pub field: String,
    pub message: String,
}

impl ParamError {
    fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Builds the workflow from `params` (the decoded `params` form field; `Value::Null` when
/// absent). `uploaded_image` is the stored name of an `input_image` file sent with the
/// request; it wins over `_existing_input_image`.
pub fn build(
    manifest: &Manifest,
    graph: &ApiGraph,
    params: &Value,
    uploaded_image: Option<&str>,
    rng: &mut impl Rng,
) -> Result<BuiltWorkflow, Vec<ParamError>> {
    let empty = Map::new();
    let params = match params {
        Value::Null => &empty,
        Value::Object(map) => map,
        _ => return Err(vec![ParamError::new("params", "must be a JSON object")]),
    };
    let mut errors = Vec::new();
    for key in params.keys() {
        // Other `_` keys are reserved for future special params and ignored.
        if !key.starts_with('_') && manifest.input(key).is_none() {
            let known: Vec<&str> = manifest.inputs.iter().map(|i| i.id.as_str()).collect();
            errors.push(ParamError::new(
                key,
                format!(
                    "unknown parameter; this workflow takes: {}",
                    known.join(", ")
                ),
            ));
        }
    }
    let existing = match params.get(EXISTING_INPUT_IMAGE) {
        None | Some(Value::Null) => None,
        Some(Value::String(name)) => Some(name.as_str()),
        Some(other) => {
            errors.push(ParamError::new(
                EXISTING_INPUT_IMAGE,
                format!("must be the filename of an uploaded image, got {other}"),
            ));
            None
        }
    };
    // The request's single image (upload or earlier upload) feeds the first image input
    // that has no explicit value.
    let mut request_image = uploaded_image.or(existing);

    let mut built = BuiltWorkflow {
        graph: graph.clone(),
        seeds: BTreeMap::new(),
        image_inputs: Vec::new(),
    };
    for input in &manifest.inputs {
        let given = params.get(&input.id).filter(|v| !v.is_null());
        let value = if input.kind == InputKind::Image {
            let from_request = if given.is_none() {
                request_image.take()
            } else {
                None
            };
            match resolve_image(input, given, from_request) {
                Ok(Some(filename)) => {
                    built
                        .image_inputs
                        .push((input.id.clone(), filename.clone()));
                    Some(Value::String(filename))
                }
                Ok(None) => None,
                Err(e) => {
                    errors.push(e);
                    None
                }
            }
        } else {
            match given.or(input.default.as_ref()) {
                None => None,
                Some(v) => match coerce(input, v, rng) {
                    Ok(v) => Some(v),
                    Err(message) => {
                        errors.push(ParamError::new(&input.id, message));
                        None
                    }
                },
            }
        };
        let Some(value) = value else { continue };
        if input.kind == InputKind::Seed
            && let Some(seed) = value.as_i64()
        {
            built.seeds.insert(input.id.clone(), seed);
        }
        // The manifest was validated against this graph, so the node exists.
        if let Some(node) = built.graph.node_mut(&input.node_id.key()) {
            node.inputs.insert(input.field.clone(), value);
        }
    }
    if errors.is_empty() {
        Ok(built)
    } else {
        Err(errors)
    }
}

fn resolve_image(
    input: &InputSpec,
    given: Option<&Value>,
    from_request: Option<&str>,
) -> Result<Option<String>, ParamError> {
    let name = match (given, from_request) {
        (Some(Value::String(s)), _) => s.clone(),
        (Some(other), _) => {
            return Err(ParamError::new(
                &input.id,
                format!("must be the filename of an uploaded image, got {other}"),
            ));
        }
        (None, Some(s)) => s.to_owned(),
        (None, None) => match &input.default {
            Some(Value::String(s)) => s.clone(),
            _ => {
                return Err(ParamError::new(
                    &input.id,
                    format!(
                        "an image is required: upload one as input_image or name an uploaded one in {EXISTING_INPUT_IMAGE}"
                    ),
                ));
            }
        },
    };
    // ComfyUI resolves the name inside its input directory; refuse anything that could
    // step out of it before it leaves us.
    let unsafe_name = name.is_empty()
        || name.starts_with('/')
        || name.contains('\\')
        || name.contains('\0')
        || name.split('/').any(|part| part == ".." || part.is_empty());
    if unsafe_name {
        return Err(ParamError::new(
            &input.id,
            format!("{name:?} is not a valid image filename"),
        ));
    }
    Ok(Some(name))
}

/// Checks one value against its input's kind and limits, giving the value to store.
fn coerce(input: &InputSpec, v: &Value, rng: &mut impl Rng) -> Result<Value, String> {
    let got = describe(v);
    match input.kind {
        InputKind::Text => v
            .as_str()
            .map(|_| v.clone())
            .ok_or(format!("must be text, got {got}")),
        InputKind::Bool => v
            .as_bool()
            .map(Value::Bool)
            .ok_or(format!("must be true or false, got {got}")),
        InputKind::Select => {
            let options = input.options.as_deref().unwrap_or_default();
            if options.contains(v) {
                Ok(v.clone())
            } else {
                let list: Vec<String> = options.iter().map(ToString::to_string).collect();
                Err(format!("must be one of {}, got {got}", list.join(", ")))
            }
        }
        InputKind::Int => {
            let n = whole_number(v).ok_or(format!("must be a whole number, got {got}"))?;
            check_range(input, n as f64, &got)?;
            Ok(Value::from(n))
        }
        InputKind::Float => {
            let n = v.as_f64().ok_or(format!("must be a number, got {got}"))?;
            check_range(input, n, &got)?;
            Ok(v.clone())
        }
        InputKind::Seed => {
            let n = whole_number(v).ok_or(format!("must be a whole number or -1, got {got}"))?;
            if n == -1 {
                let drawn = rng.gen_range(0..RANDOM_SEED_BOUND);
                return Ok(Value::from(i64::try_from(drawn).expect("below 2^53")));
            }
            if n < 0 {
                return Err(format!("must be 0 or more (or -1 for random), got {got}"));
            }
            check_range(input, n as f64, &got)?;
            Ok(Value::from(n))
        }
        InputKind::Image => unreachable!("image inputs are resolved by name"),
    }
}

/// An integer, also from a float with no fractional part (`30.0` from some JSON writers).
fn whole_number(v: &Value) -> Option<i64> {
    v.as_i64().or_else(|| {
        let f = v.as_f64()?;
        (f.fract() == 0.0 && f.abs() < 9.0e15).then_some(f as i64)
    })
}

fn check_range(input: &InputSpec, n: f64, got: &str) -> Result<(), String> {
    if let Some(min) = input
        .min
        .as_ref()
        .filter(|m| m.as_f64().is_some_and(|m| n < m))
    {
        return Err(format!("must be at least {min}, got {got}"));
    }
    if let Some(max) = input
        .max
        .as_ref()
        .filter(|m| m.as_f64().is_some_and(|m| n > m))
    {
        return Err(format!("must be at most {max}, got {got}"));
    }
    Ok(())
}

fn describe(v: &Value) -> String {
    match v {
        Value::String(s) => format!("{s:?}"),
        Value::Array(_) => "a list".into(),
        Value::Object(_) => "an object".into(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests;

//! Node schemas as ComfyUI publishes them in `GET /object_info`.
//!
//! Workers report their ComfyUI's `/object_info`; the API keeps it as a [`NodeCatalogue`]
//! so a prompt can be checked the way ComfyUI would check it *before* it is queued
//! (see [`crate::domain::graph::ApiGraph::validate_against`]). Only the parts validation
//! needs are typed; everything else in the document is ignored on purpose, because the
//! format grows with every ComfyUI release.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Every node class one ComfyUI knows, by class name.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct NodeCatalogue {
    classes: HashMap<String, NodeSchema>,
}

impl NodeCatalogue {
    /// Parses a whole `GET /object_info` body.
    pub fn from_object_info(body: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(body)
    }

    pub fn get(&self, class_type: &str) -> Option<&NodeSchema> {
        self.classes.get(class_type)
    }

    pub fn contains(&self, class_type: &str) -> bool {
        self.classes.contains_key(class_type)
    }

    pub fn len(&self) -> usize {
        self.classes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.classes.is_empty()
    }
}

/// One `/object_info` entry.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeSchema {
    #[serde(default)]
    pub input: InputGroups,
    /// ComfyUI iterates inputs in an unordered set; `input_order` gives us a stable,
    /// declaration order for error lists instead.
    #[serde(default)]
    pub input_order: InputOrder,
    /// Return types, by output slot. Each is a type name (`"IMAGE"`) or, for combo
    /// outputs, a list of choices.
    #[serde(default)]
    pub output: Vec<Value>,
    /// Output nodes are what a prompt executes towards; a prompt without one is rejected.
    #[serde(default)]
    pub output_node: bool,
    /// Slot labels, by output slot (`"IMAGE"`, `"MASK"`); the editor shows these.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub output_name: Vec<Value>,
    /// The title the editor gives a new node of this class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct InputGroups {
    #[serde(default)]
    pub required: Map<String, Value>,
    #[serde(default)]
    pub optional: Map<String, Value>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct InputOrder {
    #[serde(default)]
    pub required: Vec<String>,
    #[serde(default)]
    pub optional: Vec<String>,
}

/// One input of a node class, as validation sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct InputDef<'a> {
    pub name: &'a str,
    pub required: bool,
    /// `"INT"`, `"IMAGE"`, `"COMBO"`, … or the list of choices of a legacy combo.
    pub kind: &'a Value,
    /// The options object (`min`, `max`, `options`, `image_upload`, …); empty when absent.
    pub options: Map<String, Value>,
}

impl InputDef<'_> {
    /// `[type, options]`, the `input_config` ComfyUI echoes in its error bodies.
    pub fn input_config(&self) -> Value {
        Value::Array(vec![self.kind.clone(), Value::Object(self.options.clone())])
    }

    /// The choices of a combo input (legacy list form or `COMBO` with `options`).
    pub fn combo_choices(&self) -> Option<&Vec<Value>> {
        match self.kind {
            Value::Array(choices) => Some(choices),
            Value::String(s) if s == "COMBO" => match self.options.get("options") {
                Some(Value::Array(choices)) => Some(choices),
                _ => None,
            },
            _ => None,
        }
    }

    /// The type name, if the input has one (combos given as a list have none).
    pub fn type_name(&self) -> Option<&str> {
        self.kind.as_str()
    }
}

impl NodeSchema {
    /// Required then optional inputs, in `input_order` where given, else in
    /// document order. Hidden inputs are not part of a prompt and are left out.
    pub fn inputs(&self) -> Vec<InputDef<'_>> {
        let mut defs = Vec::new();
        for (required, group, order) in [
            (true, &self.input.required, &self.input_order.required),
            (false, &self.input.optional, &self.input_order.optional),
        ] {
            let mut names: Vec<&String> = order.iter().filter(|n| group.contains_key(*n)).collect();
            names.extend(group.keys().filter(|k| !order.contains(k)));
            for name in names {
                if let Some(def) = input_def(name, required, &group[name]) {
                    defs.push(def);
                }
            }
        }
        defs
    }

    /// The return type of an output slot; `None` when the slot does not exist.
    pub fn output_type(&self, slot: usize) -> Option<&Value> {
        self.output.get(slot)
    }
}

fn input_def<'a>(name: &'a str, required: bool, spec: &'a Value) -> Option<InputDef<'a>> {
    // A spec is `[TYPE]` or `[TYPE, {options}]`; anything else is a catalogue we do not
    // understand and is skipped rather than guessed at.
    let items = spec.as_array()?;
    let kind = items.first()?;
    let options = match items.get(1) {
        Some(Value::Object(o)) => o.clone(),
        _ => Map::new(),
    };
    Some(InputDef {
        name,
        required,
        kind,
        options,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The `/object_info` entries the unit tests need, copied from the real ComfyUI
    /// 0.3.64 capture (fixture `object_info-subset.json`), trimmed to what matters.
    pub(crate) fn sample() -> NodeCatalogue {
        NodeCatalogue::from_object_info(include_str!(
            "../../tests/fixtures/object_info-sample.json"
        ))
        .expect("sample object_info parses")
    }

    #[test]
    fn inputs_follow_input_order_and_fill_empty_options() {
        let cat = sample();
        let scale = cat.get("ImageScale").unwrap();
        let names: Vec<_> = scale.inputs().iter().map(|d| d.name).collect();
        assert_eq!(
            names,
            ["image", "upscale_method", "width", "height", "crop"]
        );
        let image = &scale.inputs()[0];
        assert_eq!(image.input_config(), serde_json::json!(["IMAGE", {}]));
        assert_eq!(scale.inputs()[1].combo_choices().unwrap().len(), 5);
    }

    #[test]
    fn new_style_combo_exposes_its_options() {
        let cat = sample();
        let save = cat.get("SaveVideo").unwrap();
        let format = save
            .inputs()
            .into_iter()
            .find(|d| d.name == "format")
            .unwrap();
        assert_eq!(
            format.combo_choices().unwrap(),
            &vec![Value::from("auto"), Value::from("mp4")]
        );
        assert!(save.output_node);
    }
}

//! Validation bodies compared with what a real ComfyUI 0.3.64 answered (fixture file
//! 05, copied to `tests/fixtures/comfyui-05-validation-bodies.json`).

use serde_json::{Value, json};

use super::*;
use crate::domain::node_catalogue::tests::sample;

fn case(label: &str) -> (ApiGraph, u64, Value) {
    let all: Value = serde_json::from_str(include_str!(
        "../../../tests/fixtures/comfyui-05-validation-bodies.json"
    ))
    .unwrap();
    let c = &all[label];
    let graph = serde_json::from_value(c["prompt"].clone()).unwrap();
    (graph, c["status"].as_u64().unwrap(), c["body"].clone())
}

/// Tracebacks hold the capture machine's paths; we send an empty list in their place.
fn blank_tracebacks(v: &mut Value) {
    match v {
        Value::Object(m) => {
            if let Some(tb) = m.get_mut("traceback") {
                *tb = json!([]);
            }
            m.values_mut().for_each(blank_tracebacks);
        }
        Value::Array(a) => a.iter_mut().for_each(blank_tracebacks),
        _ => {}
    }
}

/// Without a catalogue nobody knows an input's config, so structure errors leave it out.
fn drop_input_config(v: &mut Value) {
    match v {
        Value::Object(m) => {
            m.remove("input_config");
            m.values_mut().for_each(drop_input_config);
        }
        Value::Array(a) => a.iter_mut().for_each(drop_input_config),
        _ => {}
    }
}

#[test]
fn catalogue_validation_matches_comfyui_400_bodies() {
    let cat = sample();
    for label in [
        "unknown_class_type",
        "missing_class_type_key",
        "missing_required_input",
        "link_to_missing_node",
        "link_bad_output_index",
        "link_malformed",
        "link_type_mismatch",
        "value_below_min",
        "value_above_max",
        "value_wrong_type",
        "no_output_nodes",
        "empty_prompt",
        "multiple_errors_mixed",
    ] {
        let (graph, status, mut expected) = case(label);
        assert_eq!(status, 400, "{label}");
        blank_tracebacks(&mut expected);
        let err = graph.validate_against(&cat).expect_err(label);
        assert_eq!(err.to_json(), expected, "{label}");
    }
}

#[test]
fn partially_valid_prompts_pass_with_node_errors_like_comfyui_200() {
    let cat = sample();
    for (label, good) in [
        ("combo_value_not_in_list", vec!["3"]),
        ("partially_valid_prompt_accepted", vec!["4"]),
    ] {
        let (graph, status, mut expected) = case(label);
        assert_eq!(status, 200);
        blank_tracebacks(&mut expected);
        let report = graph.validate_against(&cat).expect(label);
        assert_eq!(
            serde_json::to_value(&report.node_errors).unwrap(),
            expected["node_errors"],
            "{label}"
        );
        let good: Vec<NodeId> = good.into_iter().map(NodeId::from).collect();
        assert_eq!(report.good_outputs, good);
    }
}

#[test]
fn structure_check_matches_comfyui_bodies_minus_input_config() {
    for label in [
        "missing_class_type_key",
        "link_to_missing_node",
        "link_malformed",
        "empty_prompt",
    ] {
        let (graph, _, mut expected) = case(label);
        blank_tracebacks(&mut expected);
        drop_input_config(&mut expected);
        let err = graph.check_structure().expect_err(label);
        assert_eq!(err.to_json(), expected, "{label}");
    }
}

#[test]
fn structure_check_accepts_a_sound_graph_and_knows_nothing_of_classes() {
    let (graph, _, _) = case("unknown_class_type");
    assert_eq!(graph.check_structure(), Ok(()));
}

#[test]
fn upload_combo_is_not_checked_against_the_catalogue_list() {
    let (graph, _, _) = case("loadimage_missing_file");
    assert!(graph.validate_against(&sample()).is_ok());
}

#[test]
fn cycles_are_refused_and_have_no_order() {
    let graph: ApiGraph = serde_json::from_value(json!({
        "1": {"class_type": "ImageInvert", "inputs": {"image": ["2", 0]}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0]}},
    }))
    .unwrap();
    assert_eq!(
        graph.topological_order(),
        Err(CycleError(NodeId::from("1")))
    );
    let err = graph.check_structure().unwrap_err();
    assert_eq!(err.error.kind, PromptErrorType::InvalidPrompt);
}

#[test]
fn order_outputs_and_class_types() {
    let graph: ApiGraph = serde_json::from_value(json!({
        "10": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "x"}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "3": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
    }))
    .unwrap();
    let order: Vec<&str> = graph
        .topological_order()
        .unwrap()
        .into_iter()
        .map(NodeId::as_str)
        .collect();
    assert_eq!(order, ["1", "2", "3", "10"]);
    let outputs: Vec<&str> = graph
        .output_nodes()
        .into_iter()
        .map(NodeId::as_str)
        .collect();
    // In the prompt's own order, which the graph keeps (ComfyUI walks it as sent).
    assert_eq!(outputs, ["10", "3"]);
    assert_eq!(
        graph.class_types().into_iter().collect::<Vec<_>>(),
        ["EmptyImage", "ImageInvert", "PreviewImage", "SaveImage"]
    );
    // Serialising gives back ComfyUI's shape.
    assert_eq!(
        serde_json::to_value(&graph).unwrap()["2"],
        json!({"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}})
    );
}

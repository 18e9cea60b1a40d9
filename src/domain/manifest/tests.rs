use serde_json::json;

use super::*;

fn graph() -> ApiGraph {
    serde_json::from_value(json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "x"}},
    }))
    .unwrap()
}

fn manifest(inputs: &str) -> Manifest {
    let yaml = format!(
        "id: demo\nname: Demo\ntype: static\ncategory: image\ndescription: d\ninputs:\n{inputs}\noutputs:\n  - {{type: image, format: png}}\n"
    );
    serde_yaml::from_str(&yaml).unwrap()
}

fn messages(m: &Manifest) -> Vec<String> {
    m.validate(&graph())
        .unwrap_err()
        .iter()
        .map(ToString::to_string)
        .collect()
}

#[test]
fn workflow_ids_reject_anything_path_like() {
    assert!(WorkflowId::parse("wan-i2v-14b").is_ok());
    assert!(WorkflowId::parse("a_b-9").is_ok());
    for bad in ["", "../etc", "a/b", "A", "a.b", "a b", "é", &"x".repeat(65)] {
        assert!(WorkflowId::parse(bad).is_err(), "{bad:?}");
    }
    assert!(serde_json::from_value::<WorkflowId>(json!("..")).is_err());
}

#[test]
fn a_good_manifest_validates_and_keeps_its_node_id_shape() {
    let m = manifest(
        "  - {id: width, type: int, label: W, node_id: 1, field: width, default: 64, min: 1, max: 4096}\n  - {id: height, type: int, label: H, node_id: \"1\", field: height}",
    );
    assert_eq!(m.validate(&graph()), Ok(()));
    let v = serde_json::to_value(&m).unwrap();
    assert_eq!(v["inputs"][0]["node_id"], json!(1));
    assert_eq!(v["inputs"][1]["node_id"], json!("1"));
    assert_eq!(v["inputs"][1].get("default"), None);
}

#[test]
fn binding_errors_name_the_field() {
    let m = manifest(
        "  - {id: a, type: int, label: A, node_id: 99, field: width}\n  - {id: b, type: int, label: B, node_id: 1, field: nope}\n  - {id: c, type: text, label: C, node_id: 2, field: image}",
    );
    assert_eq!(
        messages(&m),
        [
            "inputs[0].node_id: node \"99\" does not exist in workflow.json",
            "inputs[1].field: node \"1\" (EmptyImage) has no input \"nope\" in workflow.json",
            "inputs[2].field: \"image\" of node \"2\" is a link to another node, not a value a user can set",
        ]
    );
}

#[test]
fn limit_errors_name_the_field() {
    let m = manifest(
        "  - {id: w, type: int, label: W, node_id: 1, field: width, default: 500, min: 1, max: 150}\n  - {id: w, type: int, label: W2, node_id: 1, field: height, default: 0, min: 1}\n  - {id: c, type: int, label: C, node_id: 1, field: color, min: 10, max: 1}\n  - {id: s, type: select, label: S, node_id: 3, field: filename_prefix, default: z, options: [x, y]}\n  - {id: t, type: select, label: T, node_id: 3, field: filename_prefix}\n  - {id: u, type: int, label: U, node_id: 1, field: batch_size, default: 1.5}",
    );
    assert_eq!(
        messages(&m),
        [
            "inputs[0].default: 500 is above max 150",
            "inputs[1].id: \"w\" is already used by inputs[0]",
            "inputs[1].default: 0 is below min 1",
            "inputs[2].min: 10 is greater than max 1",
            "inputs[3].default: \"z\" is not one of the options",
            "inputs[4].options: a select input needs a non-empty list of options",
            "inputs[5].default: 1.5 is not a valid int value",
        ]
    );
}

#[test]
fn folder_must_match_id_and_required_nodes_include_the_graph() {
    let m = manifest("  []");
    assert_eq!(m.check_folder("demo"), Ok(()));
    assert_eq!(
        m.check_folder("other").unwrap_err().to_string(),
        "id: \"demo\" does not match its folder \"other\""
    );
    let nodes: Vec<String> = m.required_nodes(&graph()).into_iter().collect();
    assert_eq!(nodes, ["EmptyImage", "ImageInvert", "SaveImage"]);
}

use rand::SeedableRng;
use rand::rngs::StdRng;
use serde_json::json;

use super::*;
use crate::domain::graph::InputErrorType;
use crate::domain::params;

fn id(s: &str) -> WorkflowId {
    WorkflowId::parse(s).unwrap()
}

#[test]
fn every_shipped_manifest_loads_and_validates() {
    let cat = WorkflowCatalog::builtin().unwrap();
    let ids: Vec<&str> = cat.list().map(|w| w.id().as_str()).collect();
    assert_eq!(
        ids,
        ["invert-image", "sdxl-txt2img", "solid-color", "wan-i2v-14b"]
    );
    for w in cat.list() {
        assert_eq!(w.manifest.validate(&w.graph), Ok(()), "{}", w.id());
        assert_eq!(w.graph.check_structure(), Ok(()), "{}", w.id());
    }
    // The directory on disk is the same catalogue as the compiled-in one.
    let from_disk =
        WorkflowCatalog::load_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("manifests"))
            .unwrap();
    assert_eq!(from_disk, cat);
}

/// The graphs use real class and input names: ComfyUI 0.3.64's schemas accept them, except
/// for model files the capture machine did not have.
#[test]
fn shipped_graphs_pass_comfyui_validation_but_for_missing_models() {
    let schemas = crate::domain::node_catalogue::tests::sample();
    for w in WorkflowCatalog::builtin().unwrap().list() {
        let errors = match w.graph.validate_against(&schemas) {
            Ok(report) => report.node_errors,
            Err(e) => e.node_errors,
        };
        for (node, e) in errors {
            for err in e.errors {
                let value = err.extra_info["received_value"]
                    .as_str()
                    .unwrap_or_default();
                assert!(
                    err.kind == InputErrorType::ValueNotInList
                        && w.manifest.required_models.iter().any(|m| m == value),
                    "{} node {node}: {err:?}",
                    w.id()
                );
            }
        }
    }
}

#[test]
fn wan_manifest_serialises_in_the_seed_shape() {
    let cat = WorkflowCatalog::builtin().unwrap();
    let wan = cat.get(&id("wan-i2v-14b")).unwrap();
    let expected = json!({
        "id": "wan-i2v-14b",
        "name": "WAN 2.1 I2V 14B",
        "type": "static",
        "category": "video",
        "description": "Image-to-video with WAN 2.1 14B",
        "inputs": [
            {"id": "image", "type": "image", "label": "Input Image", "node_id": 1, "field": "image"},
            {"id": "prompt", "type": "text", "label": "Prompt", "node_id": 5, "field": "text", "default": ""},
            {"id": "steps", "type": "int", "label": "Steps", "node_id": 10, "field": "steps", "default": 30, "min": 1, "max": 100},
            // Deviation: node 10 (KSampler) instead of the seed's 12.
            {"id": "seed", "type": "seed", "label": "Seed", "node_id": 10, "field": "seed", "default": -1}
        ],
        "outputs": [{"type": "video", "format": "mp4"}],
        "required_models": [
            "wan2.1_i2v_720p_14B_fp16.safetensors",
            "umt5_xxl_fp8_e4m3fn_scaled.safetensors",
            "wan_2.1_vae.safetensors",
            "clip_vision_h.safetensors"
        ],
        "required_nodes": ["WanImageToVideo", "CreateVideo", "SaveVideo"]
    });
    assert_eq!(serde_json::to_value(&wan.manifest).unwrap(), expected);
    let nodes = cat.required_nodes(&id("wan-i2v-14b")).unwrap();
    assert!(nodes.contains("KSampler") && nodes.contains("SaveVideo"));
    assert_eq!(cat.get(&id("nope")), None);
}

#[test]
fn the_seed_example_params_build_the_wan_graph() {
    let cat = WorkflowCatalog::builtin().unwrap();
    let wan = cat.get(&id("wan-i2v-14b")).unwrap();
    let p = json!({"prompt": "a cat walking on the beach", "steps": 30, "seed": -1});
    let built = params::build(
        &wan.manifest,
        &wan.graph,
        &p,
        Some("cat.png"),
        &mut StdRng::seed_from_u64(1),
    )
    .unwrap();
    let g = serde_json::to_value(&built.graph).unwrap();
    assert_eq!(g["1"]["inputs"]["image"], json!("cat.png"));
    assert_eq!(
        g["5"]["inputs"]["text"],
        json!("a cat walking on the beach")
    );
    assert_eq!(g["10"]["inputs"]["seed"], json!(built.seeds["seed"]));
    assert_eq!(built.graph.check_structure(), Ok(()));
}

fn write(dir: &Path, folder: &str, yaml: &str, json: &str) {
    let d = dir.join(folder);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("manifest.yaml"), yaml).unwrap();
    std::fs::write(d.join("workflow.json"), json).unwrap();
}

#[test]
fn errors_name_the_file_and_the_field() {
    let tmp = tempfile::tempdir().unwrap();
    let graph = r#"{"1": {"class_type": "EmptyLatentImage", "inputs": {"width": 8, "height": 8, "batch_size": 1}},
                    "2": {"class_type": "KSampler", "inputs": {"steps": 20, "latent_image": ["1", 0]}}}"#;
    let yaml = "id: foo\nname: Foo\ntype: static\ncategory: image\ndescription: d\ninputs:\n  - {id: w, type: int, label: W, node_id: 1, field: width}\n  - {id: steps, type: int, label: Steps, node_id: 2, field: steps, default: 500, min: 1, max: 150}\n";
    write(tmp.path(), "foo", yaml, graph);
    write(
        tmp.path(),
        "bar",
        &yaml.replace("id: foo", "id: baz"),
        graph,
    );
    write(tmp.path(), "qux", yaml, r#"{"1": {"inputs": {}}}"#);
    let err = WorkflowCatalog::load_dir(tmp.path()).unwrap_err();
    let root = tmp.path().display().to_string();
    let lines: Vec<String> = err
        .problems
        .iter()
        .map(|p| p.to_string().replace(&root, "manifests"))
        .collect();
    assert_eq!(
        lines,
        [
            "manifests/bar/manifest.yaml: id: \"baz\" does not match its folder \"bar\"",
            "manifests/bar/manifest.yaml: inputs[1].default: 500 is above max 150",
            "manifests/foo/manifest.yaml: inputs[1].default: 500 is above max 150",
            "manifests/qux/workflow.json: Cannot execute because a node is missing the class_type property.: Node ID '#1'",
            "manifests/qux/manifest.yaml: id: \"foo\" does not match its folder \"qux\"",
            "manifests/qux/manifest.yaml: inputs[0].field: node \"1\" (no class_type) has no input \"width\" in workflow.json",
            "manifests/qux/manifest.yaml: inputs[1].node_id: node \"2\" does not exist in workflow.json",
            "manifests/qux/manifest.yaml: inputs[1].default: 500 is above max 150",
        ]
    );
    assert!(err.to_string().starts_with("invalid workflow catalogue:\n"));
}

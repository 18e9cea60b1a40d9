use std::collections::HashMap;
use std::io::Read;

use serde_json::{Value, json};

use super::*;
use crate::catalog::WorkflowCatalog;

/// The whole `/object_info` of a real ComfyUI 0.3.64 (496 classes).
fn full_object_info() -> NodeCatalogue {
    let gz: &[u8] = include_bytes!("../../../../tests/fixtures/comfyui/object_info-full.json.gz");
    let mut text = String::new();
    flate2::read::GzDecoder::new(gz)
        .read_to_string(&mut text)
        .expect("fixture is gzip");
    NodeCatalogue::from_object_info(&text).expect("full object_info parses")
}

/// The node schemas the simulator serves.
fn sim_object_info() -> NodeCatalogue {
    NodeCatalogue::from_object_info(include_str!("../../../sim/object_info.json"))
        .expect("sim object_info parses")
}

fn graph(value: Value) -> ApiGraph {
    serde_json::from_value(value).expect("an API graph")
}

/// To the UI format, through JSON text (as a client would receive it), and back.
fn round_trip(graph: &ApiGraph, catalogue: &NodeCatalogue) -> (UiWorkflow, ApiGraph) {
    let workflow = to_workflow(graph, catalogue).expect("converts to the UI format");
    let text = serde_json::to_string(&workflow).unwrap();
    let parsed: UiWorkflow = serde_json::from_str(&text).unwrap();
    assert_eq!(parsed, workflow, "the document survives JSON");
    let back = to_api(&parsed, catalogue).expect("converts back");
    (workflow, back)
}

fn node(workflow: &UiWorkflow, id: u64) -> &UiNode {
    workflow
        .nodes
        .iter()
        .find(|n| n.id == UiNodeId::Number(id))
        .expect("node present")
}

#[test]
fn every_builtin_workflow_round_trips_with_real_and_sim_schemas() {
    let catalogues = [("full", full_object_info()), ("sim", sim_object_info())];
    let builtin = WorkflowCatalog::builtin().unwrap();
    let mut checked = 0;
    for workflow in builtin.list() {
        for (name, catalogue) in &catalogues {
            let (_, back) = round_trip(&workflow.graph, catalogue);
            assert_eq!(
                back,
                workflow.graph,
                "{} with {name} schemas",
                workflow.id()
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 8);
}

#[test]
fn ksampler_widgets_follow_the_schema_with_a_fixed_seed_control() {
    let builtin = WorkflowCatalog::builtin().unwrap();
    let sdxl = builtin
        .list()
        .find(|w| w.id().as_str() == "sdxl-txt2img")
        .unwrap();
    let workflow = to_workflow(&sdxl.graph, &full_object_info()).unwrap();
    let ksampler = node(&workflow, 5);
    assert_eq!(ksampler.class_type, "KSampler");
    assert_eq!(
        ksampler.widgets_values,
        vec![
            json!(0),
            json!("fixed"),
            json!(25),
            json!(7.0),
            json!("euler"),
            json!("normal"),
            json!(1.0)
        ]
    );
    let names: Vec<&str> = ksampler.inputs.iter().map(|i| i.name.as_str()).collect();
    assert_eq!(names, ["model", "positive", "negative", "latent_image"]);
    assert!(
        ksampler
            .inputs
            .iter()
            .all(|i| i.link.is_some() && i.widget.is_none())
    );
    assert_eq!(ksampler.outputs.len(), 1);
    assert_eq!(ksampler.outputs[0].name, "LATENT");
    assert_eq!(ksampler.outputs[0].kind, "LATENT");
    assert_eq!(ksampler.properties["Node name for S&R"], "KSampler");
    assert_eq!(ksampler.title.as_deref(), Some("KSampler"));
    assert_eq!(ksampler.mode, 0);

    let checkpoint = node(&workflow, 1);
    let names: Vec<&str> = checkpoint.outputs.iter().map(|o| o.name.as_str()).collect();
    assert_eq!(names, ["MODEL", "CLIP", "VAE"]);
    assert_eq!(checkpoint.outputs[1].links.as_ref().unwrap().len(), 2);
    assert_eq!(workflow.version, 0.4);
    assert_eq!(workflow.last_node_id, 7);
    assert_eq!(workflow.last_link_id, 9);
}

#[test]
fn an_upload_combo_gets_the_upload_button_value_after_it() {
    let g = graph(json!({
        "1": {"class_type": "LoadImage", "inputs": {"image": "cat.png"}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}}
    }));
    let (workflow, back) = round_trip(&g, &full_object_info());
    assert_eq!(
        node(&workflow, 1).widgets_values,
        vec![json!("cat.png"), json!("image")]
    );
    assert_eq!(back, g);
}

#[test]
fn titles_default_to_the_display_name_and_meta_round_trips_exactly() {
    let g = graph(json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}, "_meta": {"title": "Invert Image"}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "x"},
              "_meta": {"title": "Out", "note": "kept"}}
    }));
    let (workflow, back) = round_trip(&g, &full_object_info());
    assert_eq!(node(&workflow, 1).title.as_deref(), Some("EmptyImage"));
    assert_eq!(node(&workflow, 2).title.as_deref(), Some("Invert Image"));
    assert!(node(&workflow, 2).properties.get(KEPT_PROPERTY).is_none());
    assert_eq!(node(&workflow, 3).title.as_deref(), Some("Out"));
    assert_eq!(back, g);
}

#[test]
fn a_widget_fed_by_a_link_becomes_a_marked_socket() {
    let g = graph(json!({
        "1": {"class_type": "PrimitiveInt", "inputs": {"value": 42}},
        "2": {"class_type": "EmptyImage", "inputs": {"width": ["1", 0], "height": 64, "batch_size": 1, "color": 0}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "x"}}
    }));
    let (workflow, back) = round_trip(&g, &full_object_info());
    let empty = node(&workflow, 2);
    assert_eq!(empty.inputs.len(), 1);
    assert_eq!(empty.inputs[0].name, "width");
    assert_eq!(empty.inputs[0].kind, "INT");
    assert_eq!(
        empty.inputs[0].widget,
        Some(WidgetRef {
            name: "width".into()
        })
    );
    // The converted widget keeps a value slot, as the editor keeps it.
    assert_eq!(empty.widgets_values.len(), 4);
    // PrimitiveInt asks for a control widget explicitly.
    assert_eq!(
        node(&workflow, 1).widgets_values,
        vec![json!(42), json!("fixed")]
    );
    assert_eq!(
        workflow.links[0],
        UiLink(
            1,
            UiNodeId::Number(1),
            0,
            UiNodeId::Number(2),
            0,
            "INT".into()
        )
    );
    assert_eq!(back, g);
}

#[test]
fn unset_optional_widgets_and_text_ids_survive_the_round_trip() {
    // CLIPLoader's optional `device` is a widget the graph leaves unset.
    let g = graph(json!({
        "loader": {"class_type": "CLIPLoader", "inputs": {"clip_name": "t5.safetensors", "type": "wan"}},
        "007": {"class_type": "CLIPTextEncode", "inputs": {"text": "hi", "clip": ["loader", 0]}}
    }));
    let (workflow, back) = round_trip(&g, &full_object_info());
    let loader = workflow
        .nodes
        .iter()
        .find(|n| n.id == UiNodeId::Text("loader".into()))
        .unwrap();
    assert_eq!(
        loader.widgets_values,
        vec![json!("t5.safetensors"), json!("wan"), json!("default")]
    );
    assert_eq!(
        loader.properties[KEPT_PROPERTY]["unset_inputs"],
        json!(["device"])
    );
    assert!(
        workflow
            .nodes
            .iter()
            .any(|n| n.id == UiNodeId::Text("007".into()))
    );
    assert_eq!(back, g);
}

#[test]
fn force_input_widgets_are_sockets() {
    let catalogue = NodeCatalogue::from_object_info(
        &json!({
            "Count": {"input": {"required": {}}, "output": ["INT"], "output_name": ["count"]},
            "Sink": {
                "input": {"required": {"n": ["INT", {"forceInput": true}], "m": ["INT", {"default": 2}]}},
                "input_order": {"required": ["n", "m"]},
                "output": [],
                "output_node": true
            }
        })
        .to_string(),
    )
    .unwrap();
    let g = graph(json!({
        "1": {"class_type": "Count", "inputs": {}},
        "2": {"class_type": "Sink", "inputs": {"n": ["1", 0], "m": 5}}
    }));
    let (workflow, back) = round_trip(&g, &catalogue);
    let sink = node(&workflow, 2);
    assert_eq!(sink.inputs.len(), 1);
    assert_eq!(sink.inputs[0].name, "n");
    assert_eq!(sink.inputs[0].widget, None);
    assert_eq!(sink.widgets_values, vec![json!(5)]);
    assert_eq!(node(&workflow, 1).outputs[0].name, "count");
    // Without a display name the class names the node.
    assert_eq!(node(&workflow, 1).title.as_deref(), Some("Count"));
    assert_eq!(back, g);
}

#[test]
fn a_literal_for_a_force_input_is_refused() {
    let g = graph(json!({
        "2": {"class_type": "SaveLoRANode", "inputs": {"prefix": "p", "steps": 5}}
    }));
    let err = to_workflow(&g, &full_object_info()).unwrap_err();
    assert!(
        matches!(err, UiFormatError::SocketNotLinked { ref input, .. } if input == "steps"),
        "{err}"
    );
    assert!(err.is_schema_gap());
}

#[test]
fn unknown_classes_inputs_and_slots_are_clear_errors() {
    let catalogue = full_object_info();
    let err = to_workflow(
        &graph(json!({"1": {"class_type": "NoSuchNode", "inputs": {}}})),
        &catalogue,
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "no worker reports the schema of node class NoSuchNode (node 1)"
    );
    let err = to_workflow(
        &graph(json!({"1": {"class_type": "ImageInvert", "inputs": {"colour": 1}}})),
        &catalogue,
    )
    .unwrap_err();
    assert!(matches!(err, UiFormatError::UnknownInput { .. }), "{err}");
    let err = to_workflow(
        &graph(json!({
            "1": {"class_type": "EmptyImage", "inputs": {}},
            "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 3]}}
        })),
        &catalogue,
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            UiFormatError::MissingOutput {
                slot: 3,
                outputs: 1,
                ..
            }
        ),
        "{err}"
    );
    let err = to_workflow(
        &graph(json!({"2": {"class_type": "ImageInvert", "inputs": {"image": ["9", 0]}}})),
        &catalogue,
    )
    .unwrap_err();
    assert!(matches!(err, UiFormatError::MissingSource { .. }), "{err}");
}

/// Every link appears once in the table, on the input that uses it and in the output
/// list of the node it comes from, with the output's type; `order` runs sources first.
fn assert_links_consistent(workflow: &UiWorkflow) {
    let by_id: HashMap<&UiNodeId, &UiNode> = workflow.nodes.iter().map(|n| (&n.id, n)).collect();
    let mut seen = std::collections::BTreeSet::new();
    for UiLink(id, origin, origin_slot, target, target_slot, kind) in &workflow.links {
        assert!(seen.insert(*id), "link {id} listed twice");
        let origin = by_id[origin];
        let target = by_id[target];
        assert_eq!(
            target.inputs[*target_slot].link,
            Some(*id),
            "link {id} target"
        );
        let output = &origin.outputs[*origin_slot];
        assert!(
            output.links.as_ref().unwrap().contains(id),
            "link {id} origin"
        );
        assert_eq!(&output.kind, kind, "link {id} type");
        assert_eq!(output.slot_index, *origin_slot);
        assert!(
            origin.order < target.order,
            "link {id} runs backwards in order"
        );
    }
    let used: usize = workflow
        .nodes
        .iter()
        .flat_map(|n| &n.inputs)
        .filter(|i| i.link.is_some())
        .count();
    let listed: usize = workflow
        .nodes
        .iter()
        .flat_map(|n| &n.outputs)
        .map(|o| o.links.as_ref().map_or(0, Vec::len))
        .sum();
    assert_eq!(used, workflow.links.len());
    assert_eq!(listed, workflow.links.len());
    assert_eq!(workflow.last_link_id, workflow.links.len() as u64);
    let mut orders: Vec<usize> = workflow.nodes.iter().map(|n| n.order).collect();
    orders.sort_unstable();
    assert_eq!(orders, (0..workflow.nodes.len()).collect::<Vec<_>>());
}

/// Columns by depth, left to right, and no two nodes (title bars included) overlap.
fn assert_layout_readable(graph: &ApiGraph, workflow: &UiWorkflow) {
    let mut depth: HashMap<String, usize> = HashMap::new();
    for id in graph.topological_order().unwrap() {
        let node = graph.node(id.as_str()).unwrap();
        let d = graph
            .links_of(node)
            .map(|(_, l)| depth[l.node] + 1)
            .max()
            .unwrap_or(0);
        depth.insert(id.to_string(), d);
    }
    let x_of = |n: &UiNode| n.pos[0];
    let depth_of = |n: &UiNode| depth[n.id.to_api().as_str()];
    for a in &workflow.nodes {
        for b in &workflow.nodes {
            if depth_of(a) < depth_of(b) {
                assert!(
                    x_of(a) + a.size[0] <= x_of(b),
                    "{:?} left of {:?}",
                    a.id,
                    b.id
                );
            }
            if a.id != b.id {
                let apart = a.pos[0] + a.size[0] <= b.pos[0]
                    || b.pos[0] + b.size[0] <= a.pos[0]
                    || a.pos[1] + a.size[1] <= top_of(b)
                    || b.pos[1] + b.size[1] <= top_of(a);
                assert!(apart, "{:?} overlaps {:?}", a.id, b.id);
            }
        }
        assert!(a.pos[0] >= 0.0 && top_of(a) >= 0.0);
        // Room for every slot row and widget, or the editor grows the node on load
        // and it overlaps its neighbours after all.
        let rows = a.inputs.len().max(a.outputs.len()) as f64;
        let needed = rows * SLOT_HEIGHT + a.widgets_values.len() as f64 * WIDGET_HEIGHT;
        assert!(
            a.size[1] >= needed,
            "{:?} is {} high, needs {needed}",
            a.id,
            a.size[1]
        );
    }
}

fn top_of(n: &UiNode) -> f64 {
    n.pos[1] - TITLE_HEIGHT
}

#[test]
fn builtin_workflows_have_consistent_links_and_a_readable_layout() {
    let catalogue = full_object_info();
    for workflow in WorkflowCatalog::builtin().unwrap().list() {
        let ui = to_workflow(&workflow.graph, &catalogue).unwrap();
        assert_links_consistent(&ui);
        assert_layout_readable(&workflow.graph, &ui);
        assert_eq!(ui.nodes.len(), workflow.graph.len());
    }
}

#[test]
fn a_graph_with_a_cycle_is_refused() {
    let g = graph(json!({
        "1": {"class_type": "ImageInvert", "inputs": {"image": ["2", 0]}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}}
    }));
    assert!(matches!(
        to_workflow(&g, &full_object_info()),
        Err(UiFormatError::Cycle(_))
    ));
}

#[test]
fn a_dangling_link_id_in_a_workflow_is_refused() {
    let builtin = WorkflowCatalog::builtin().unwrap();
    let invert = builtin
        .list()
        .find(|w| w.id().as_str() == "invert-image")
        .unwrap();
    let catalogue = full_object_info();
    let mut ui = to_workflow(&invert.graph, &catalogue).unwrap();
    ui.links.clear();
    let err = to_api(&ui, &catalogue).unwrap_err();
    assert!(matches!(err, UiFormatError::UnknownLink { .. }), "{err}");
}

use rand::SeedableRng;
use rand::rngs::StdRng;
use serde_json::json;

use super::*;

fn fixture() -> (Manifest, ApiGraph) {
    let graph = serde_json::from_value(json!({
        "1": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["4", 0]}},
        "10": {"class_type": "KSampler", "inputs": {"seed": 0, "steps": 20, "cfg": 8.0, "sampler_name": "euler", "denoise": 1.0}},
        "11": {"class_type": "Flag", "inputs": {"on": false}},
    }))
    .unwrap();
    let manifest: Manifest = serde_yaml::from_str(
        r#"
id: demo
name: Demo
type: static
category: video
description: d
inputs:
  - {id: image, type: image, label: Image, node_id: 1, field: image}
  - {id: prompt, type: text, label: Prompt, node_id: 5, field: text, default: ""}
  - {id: steps, type: int, label: Steps, node_id: 10, field: steps, default: 30, min: 1, max: 100}
  - {id: cfg, type: float, label: CFG, node_id: 10, field: cfg, default: 7.5, min: 0, max: 30}
  - {id: seed, type: seed, label: Seed, node_id: 10, field: seed, default: -1}
  - {id: sampler, type: select, label: Sampler, node_id: 10, field: sampler_name, default: euler, options: [euler, dpmpp_2m]}
  - {id: flag, type: bool, label: Flag, node_id: 11, field: "on", default: false}
outputs: [{type: video, format: mp4}]
"#,
    )
    .unwrap();
    (manifest, graph)
}

fn rng() -> StdRng {
    StdRng::seed_from_u64(7)
}

#[test]
fn values_and_defaults_land_in_their_fields() {
    let (m, g) = fixture();
    let params = json!({"prompt": "a cat", "steps": 12, "cfg": 3, "seed": 42, "sampler": "dpmpp_2m", "flag": true, "_existing_input_image": "up.png", "_future": 1});
    let built = build(&m, &g, &params, None, &mut rng()).unwrap();
    let node = |id: &str| built.graph.node(id).unwrap().inputs.clone();
    assert_eq!(node("1")["image"], json!("up.png"));
    assert_eq!(node("5")["text"], json!("a cat"));
    assert_eq!(node("5")["clip"], json!(["4", 0]), "links stay untouched");
    assert_eq!(node("10")["steps"], json!(12));
    assert_eq!(node("10")["cfg"], json!(3));
    assert_eq!(node("10")["seed"], json!(42));
    assert_eq!(node("10")["sampler_name"], json!("dpmpp_2m"));
    assert_eq!(node("11")["on"], json!(true));
    assert_eq!(built.seeds, BTreeMap::from([("seed".to_owned(), 42)]));
    assert_eq!(
        built.image_inputs,
        [("image".to_owned(), "up.png".to_owned())]
    );

    let defaults = build(&m, &g, &Value::Null, Some("new.png"), &mut rng()).unwrap();
    let ks = &defaults.graph.node("10").unwrap().inputs;
    assert_eq!((&ks["steps"], &ks["cfg"]), (&json!(30), &json!(7.5)));
    assert_eq!(defaults.image_inputs[0].1, "new.png");
}

#[test]
fn seed_minus_one_draws_from_the_given_rng() {
    let (m, g) = fixture();
    let expected = rng().gen_range(0..RANDOM_SEED_BOUND) as i64;
    for params in [
        json!({"seed": -1, "_existing_input_image": "a.png"}),
        json!({"_existing_input_image": "a.png"}),
    ] {
        let built = build(&m, &g, &params, None, &mut rng()).unwrap();
        assert_eq!(built.seeds["seed"], expected);
        assert_eq!(
            built.graph.node("10").unwrap().inputs["seed"],
            json!(expected)
        );
        assert!((0..1i64 << 53).contains(&expected));
    }
}

#[test]
fn every_bad_field_is_reported_at_once() {
    let (m, g) = fixture();
    let params = json!({
        "steps": "abc", "cfg": 99.5, "seed": -5, "sampler": "bogus", "flag": 3,
        "prompt": 7, "colour": "red",
    });
    let errors = build(&m, &g, &params, None, &mut rng()).unwrap_err();
    let got: Vec<String> = errors.iter().map(ToString::to_string).collect();
    assert_eq!(
        got,
        [
            "colour: unknown parameter; this workflow takes: image, prompt, steps, cfg, seed, sampler, flag",
            "image: an image is required: upload one as input_image or name an uploaded one in _existing_input_image",
            "prompt: must be text, got 7",
            "steps: must be a whole number, got \"abc\"",
            "cfg: must be at most 30, got 99.5",
            "seed: must be 0 or more (or -1 for random), got -5",
            "sampler: must be one of \"euler\", \"dpmpp_2m\", got \"bogus\"",
            "flag: must be true or false, got 3",
        ]
    );
}

#[test]
fn ints_reject_fractions_and_ranges_apply() {
    let (m, g) = fixture();
    let with = |p: Value| build(&m, &g, &p, Some("x.png"), &mut rng());
    assert_eq!(
        with(json!({"steps": 1.5})).unwrap_err()[0].to_string(),
        "steps: must be a whole number, got 1.5"
    );
    assert_eq!(
        with(json!({"steps": 0})).unwrap_err()[0].to_string(),
        "steps: must be at least 1, got 0"
    );
    assert_eq!(
        with(json!({"steps": 101})).unwrap_err()[0].to_string(),
        "steps: must be at most 100, got 101"
    );
    assert!(with(json!({"steps": 100.0})).is_ok());
}

#[test]
fn image_names_and_params_shape_are_checked() {
    let (m, g) = fixture();
    for bad in ["../x.png", "/etc/passwd", "a/../b.png", ""] {
        let errors = build(&m, &g, &json!({"image": bad}), None, &mut rng()).unwrap_err();
        assert_eq!(errors[0].field, "image", "{bad}");
    }
    let errors = build(
        &m,
        &g,
        &json!({"_existing_input_image": 5}),
        None,
        &mut rng(),
    )
    .unwrap_err();
    assert_eq!(errors[0].field, EXISTING_INPUT_IMAGE);
    let errors = build(&m, &g, &json!([1]), None, &mut rng()).unwrap_err();
    assert_eq!(errors, [ParamError::new("params", "must be a JSON object")]);
    // An upload wins over an earlier upload's name.
    let built = build(
        &m,
        &g,
        &json!({"_existing_input_image": "old.png"}),
        Some("new.png"),
        &mut rng(),
    )
    .unwrap();
    assert_eq!(built.image_inputs[0].1, "new.png");
}

//! The node classes the sim knows: ComfyUI 0.3.64's own `/object_info` entries
//! (embedded), with the option lists that depend on the server's files filled in.

use serde_json::{Map, Value, json};

use super::ModelFile;

const OBJECT_INFO: &str = include_str!("object_info.json");

/// Model folder names as `GET /models` lists them on ComfyUI 0.3.64.
pub const MODEL_FOLDERS: &[&str] = &[
    "checkpoints",
    "configs",
    "loras",
    "vae",
    "text_encoders",
    "diffusion_models",
    "clip_vision",
    "style_models",
    "embeddings",
    "diffusers",
    "vae_approx",
    "controlnet",
    "gligen",
    "upscale_models",
    "custom_nodes",
    "hypernetworks",
    "photomaker",
    "classifiers",
    "model_patches",
    "audio_encoders",
];

/// ComfyUI maps legacy folder names onto the new ones (`unet` → `diffusion_models`,
/// `clip` → `text_encoders`); a model given under either is listed under both.
fn folder_matches(folder: &str, wanted: &str) -> bool {
    folder == wanted
        || matches!(
            (folder, wanted),
            ("unet", "diffusion_models") | ("clip", "text_encoders")
        )
}

/// Which inputs list files, and from which model folder.
const MODEL_INPUTS: &[(&str, &str, &str)] = &[
    ("CheckpointLoaderSimple", "ckpt_name", "checkpoints"),
    ("UNETLoader", "unet_name", "diffusion_models"),
    ("CLIPLoader", "clip_name", "text_encoders"),
    ("VAELoader", "vae_name", "vae"),
    ("CLIPVisionLoader", "clip_name", "clip_vision"),
];

/// The static catalogue, parsed once per server.
pub struct Catalog {
    base: Map<String, Value>,
}

impl Catalog {
    pub fn new() -> Self {
        let base = match serde_json::from_str::<Value>(OBJECT_INFO) {
            Ok(Value::Object(map)) => map,
            _ => Map::new(),
        };
        Self { base }
    }

    /// Sorted file names of a model folder.
    pub fn model_files(models: &[ModelFile], folder: &str) -> Vec<String> {
        let mut names: Vec<String> = models
            .iter()
            .filter(|m| folder_matches(&m.folder, folder))
            .map(|m| m.name.clone())
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// `/object_info` as this server currently answers it.
    pub fn render(&self, models: &[ModelFile], input_files: &[String]) -> Map<String, Value> {
        let mut out = self.base.clone();
        for (class, input, folder) in MODEL_INPUTS {
            let mut files = Self::model_files(models, folder);
            if *class == "VAELoader" {
                files.push("pixel_space".to_owned());
            }
            set_options(&mut out, class, input, files);
        }
        set_options(&mut out, "LoadImage", "image", input_files.to_vec());
        out
    }
}

/// Replaces the choice list of a combo input, keeping its options object.
fn set_options(info: &mut Map<String, Value>, class: &str, input: &str, choices: Vec<String>) {
    let Some(spec) = info
        .get_mut(class)
        .and_then(|c| c.pointer_mut(&format!("/input/required/{input}")))
        .and_then(Value::as_array_mut)
    else {
        return;
    };
    if let Some(first) = spec.first_mut() {
        *first = json!(choices);
    }
}

/// Looks at one class of a rendered object_info.
pub struct ClassInfo<'a>(pub &'a Value);

impl<'a> ClassInfo<'a> {
    pub fn is_output(&self) -> bool {
        self.0.get("output_node").and_then(Value::as_bool) == Some(true)
    }

    pub fn output_types(&self) -> Vec<&'a str> {
        self.0
            .get("output")
            .and_then(Value::as_array)
            .map(|a| a.iter().map(|t| t.as_str().unwrap_or("*")).collect())
            .unwrap_or_default()
    }

    /// `(name, required, spec)` in declaration order: required then optional.
    pub fn inputs(&self) -> Vec<(&'a str, bool, &'a Value)> {
        let mut out = Vec::new();
        for (group, required) in [("required", true), ("optional", false)] {
            if let Some(map) = self
                .0
                .pointer(&format!("/input/{group}"))
                .and_then(Value::as_object)
            {
                for (name, spec) in map {
                    out.push((name.as_str(), required, spec));
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loaders_list_the_configured_models() {
        let cat = Catalog::new();
        let info = cat.render(&super::super::default_models(), &["example.png".to_owned()]);
        let ckpts = info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0].clone();
        assert!(
            ckpts
                .as_array()
                .is_some_and(|a| a.contains(&json!("sd_xl_base_1.0.safetensors")))
        );
        assert_eq!(
            info["LoadImage"]["input"]["required"]["image"][0],
            json!(["example.png"])
        );
        let vae = info["VAELoader"]["input"]["required"]["vae_name"][0].clone();
        assert_eq!(vae, json!(["wan_2.1_vae.safetensors", "pixel_space"]));
        assert!(ClassInfo(&info["SaveImage"]).is_output());
        assert_eq!(info.len(), 21);
    }
}

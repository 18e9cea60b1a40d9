//! What each simulated node class does: real pixels for image nodes, handles for
//! models and conditioning, a progress bar with previews for the sampler, and
//! real PNG / MP4 files for the save nodes.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use serde_json::{Map, Value, json};

use super::exec::{CacheEntry, Run};
use super::files::Root;
use super::knobs::{FaultKind, PreviewFormat};
use super::pixels::{self, Frame};
use super::protocol::{self, ImageKind};
use super::video;

/// A value on a link between nodes.
#[derive(Clone, Debug)]
pub enum Val {
    Images(Arc<Vec<Frame>>),
    Latent(Latent),
    Video(Arc<(Vec<Frame>, f64)>),
    /// Models, CLIP, VAE, conditioning...: nothing the sim needs to look inside.
    Handle(String),
}

/// A simulated latent: its pixel size, batch, frame count and what it will decode to.
#[derive(Clone, Debug)]
pub struct Latent {
    pub width: u32,
    pub height: u32,
    pub batch: u32,
    pub frames: u32,
    pub seed: u64,
}

pub enum NodeError {
    Interrupted,
    Failed {
        exception_type: String,
        message: String,
        traceback: Vec<String>,
    },
}

impl NodeError {
    pub fn failed(exception_type: &str, message: &str) -> Self {
        NodeError::Failed {
            exception_type: exception_type.to_owned(),
            message: message.to_owned(),
            traceback: vec![
                "  File \"/srv/ComfyUI/execution.py\", line 496, in execute\n    output_data, output_ui, has_subgraph, has_pending_tasks = await get_output_data(prompt_id, unique_id, obj, input_data_all, execution_block_cb=execution_block_cb, pre_execute_cb=pre_execute_cb, hidden_inputs=hidden_inputs)\n".to_owned(),
                "  File \"/srv/ComfyUI/execution.py\", line 277, in process_inputs\n    result = f(**inputs)\n".to_owned(),
            ],
        }
    }
}

/// `["node_id", slot]`.
pub fn as_link(v: &Value) -> Option<(&str, u64)> {
    let a = v.as_array()?;
    if a.len() != 2 {
        return None;
    }
    Some((a[0].as_str()?, a[1].as_u64()?))
}

/// `"sub/name.png [input]"` → (`"sub"`, `"name.png"`).
pub fn split_image_name(name: &str) -> (String, String) {
    let name = name
        .strip_suffix(" [input]")
        .or_else(|| name.strip_suffix(" [output]"))
        .or_else(|| name.strip_suffix(" [temp]"))
        .unwrap_or(name);
    match name.rsplit_once('/') {
        Some((sub, file)) => (sub.to_owned(), file.to_owned()),
        None => (String::new(), name.to_owned()),
    }
}

struct Args<'a> {
    literal: &'a Map<String, Value>,
    linked: HashMap<String, Val>,
}

impl Args<'_> {
    fn int(&self, name: &str, default: i64) -> i64 {
        self.literal
            .get(name)
            .and_then(Value::as_i64)
            .unwrap_or(default)
    }

    fn uint(&self, name: &str, default: u64) -> u64 {
        self.literal
            .get(name)
            .and_then(Value::as_u64)
            .unwrap_or(default)
    }

    fn float(&self, name: &str, default: f64) -> f64 {
        self.literal
            .get(name)
            .and_then(Value::as_f64)
            .unwrap_or(default)
    }

    fn string(&self, name: &str, default: &str) -> String {
        self.literal
            .get(name)
            .map(protocol::py_str)
            .unwrap_or_else(|| default.to_owned())
    }

    fn images(&self, name: &str) -> Result<Arc<Vec<Frame>>, NodeError> {
        match self.linked.get(name) {
            Some(Val::Images(i)) => Ok(i.clone()),
            _ => Err(NodeError::failed(
                "TypeError",
                &format!("input '{name}' is not an IMAGE"),
            )),
        }
    }

    fn latent(&self, name: &str) -> Result<Latent, NodeError> {
        match self.linked.get(name) {
            Some(Val::Latent(l)) => Ok(l.clone()),
            _ => Err(NodeError::failed(
                "TypeError",
                &format!("input '{name}' is not a LATENT"),
            )),
        }
    }
}

fn out(values: Vec<Val>) -> CacheEntry {
    CacheEntry { values, ui: None }
}

fn images(frames: Vec<Frame>) -> Val {
    Val::Images(Arc::new(frames))
}

fn mix(a: u64, b: u64) -> u64 {
    a.wrapping_mul(0x9e3779b97f4a7c15).rotate_left(17) ^ b
}

/// Runs one node (its class's behaviour plus the prompt's faults and timing).
pub async fn run(
    ctx: &mut Run,
    id: &str,
    class: &str,
    literal: &Map<String, Value>,
    linked: HashMap<String, Val>,
) -> Result<CacheEntry, NodeError> {
    let a = Args { literal, linked };
    if class != "KSampler" {
        // A node without a progress bar cannot be interrupted midway in ComfyUI:
        // the interrupt lands at the next node.
        ctx.busy(ctx.knobs.node_time).await;
    }
    if ctx
        .knobs
        .fault(id, class, |k| matches!(k, FaultKind::Hang))
        .is_some()
    {
        loop {
            ctx.pause(std::time::Duration::from_secs(3600)).await?;
        }
    }
    if let Some(FaultKind::Fail {
        exception_type,
        exception_message,
    }) = ctx
        .knobs
        .fault(id, class, |k| matches!(k, FaultKind::Fail { .. }))
    {
        return Err(NodeError::failed(exception_type, exception_message));
    }
    let handle = |kind: &str, name: &str| Val::Handle(format!("{kind}:{name}"));
    Ok(match class {
        "CheckpointLoaderSimple" => {
            let n = a.string("ckpt_name", "");
            out(vec![
                handle("MODEL", &n),
                handle("CLIP", &n),
                handle("VAE", &n),
            ])
        }
        "UNETLoader" => out(vec![handle("MODEL", &a.string("unet_name", ""))]),
        "CLIPLoader" => out(vec![handle("CLIP", &a.string("clip_name", ""))]),
        "VAELoader" => out(vec![handle("VAE", &a.string("vae_name", ""))]),
        "CLIPVisionLoader" => out(vec![handle("CLIP_VISION", &a.string("clip_name", ""))]),
        "CLIPVisionEncode" => out(vec![handle("CLIP_VISION_OUTPUT", id)]),
        "CLIPTextEncode" => out(vec![handle("CONDITIONING", &a.string("text", ""))]),
        "EmptyLatentImage" => out(vec![Val::Latent(Latent {
            width: a.int("width", 512) as u32,
            height: a.int("height", 512) as u32,
            batch: a.int("batch_size", 1) as u32,
            frames: 1,
            seed: 0,
        })]),
        "WanImageToVideo" => out(vec![
            handle("CONDITIONING", "positive"),
            handle("CONDITIONING", "negative"),
            Val::Latent(Latent {
                width: a.int("width", 832) as u32,
                height: a.int("height", 480) as u32,
                batch: a.int("batch_size", 1) as u32,
                frames: a.int("length", 81).max(1) as u32,
                seed: 1,
            }),
        ]),
        "KSampler" => sample(ctx, id, &a).await?,
        "VAEDecode" => {
            let l = a.latent("samples")?;
            // Video latents decode to small frames: the sim's videos are kept tiny.
            let (w, h) = if l.frames > 1 {
                fit(l.width, l.height, 128)
            } else {
                (l.width, l.height)
            };
            let n = (l.batch * l.frames) as u64;
            out(vec![images(
                (0..n).map(|i| pixels::painting(l.seed, w, h, i)).collect(),
            )])
        }
        "EmptyImage" => {
            let c = a.int("color", 0);
            let color = [(c >> 16) as u8, (c >> 8) as u8, c as u8];
            let (w, h) = (a.int("width", 512) as u32, a.int("height", 512) as u32);
            let frame = Frame::solid(w, h, color);
            out(vec![images(vec![
                frame;
                a.int("batch_size", 1).max(1) as usize
            ])])
        }
        "ImageInvert" => out(vec![images(
            a.images("image")?.iter().map(Frame::inverted).collect(),
        )]),
        "ImageBlur" => {
            let r = a.int("blur_radius", 1).max(0) as u32;
            out(vec![images(
                a.images("image")?.iter().map(|f| f.blurred(r)).collect(),
            )])
        }
        "ImageScale" => {
            let src = a.images("image")?;
            let (w, h) = (
                a.int("width", 0).max(0) as u32,
                a.int("height", 0).max(0) as u32,
            );
            let scaled = src
                .iter()
                .map(|f| {
                    let (w, h) = match (w, h) {
                        (0, 0) => (f.width, f.height),
                        (0, h) => (
                            (f.width as u64 * h as u64 / f.height.max(1) as u64) as u32,
                            h,
                        ),
                        (w, 0) => (
                            w,
                            (f.height as u64 * w as u64 / f.width.max(1) as u64) as u32,
                        ),
                        wh => wh,
                    };
                    f.resized(w, h)
                })
                .collect();
            out(vec![images(scaled)])
        }
        "LoadImage" => load_image(ctx, &a)?,
        "SaveImage" => save_images(
            ctx,
            &a,
            Root::Output,
            &a.string("filename_prefix", "ComfyUI"),
        )?,
        "PreviewImage" => {
            let prefix = format!("ComfyUI_temp_{}", ctx.shared.lock().random_letters(5));
            save_images(ctx, &a, Root::Temp, &prefix)?
        }
        "SaveImageWebsocket" => {
            let frames = a.images("images")?;
            let n = frames.len() as u64;
            for (i, f) in frames.iter().enumerate() {
                ctx.tick(
                    id,
                    i as u64,
                    n,
                    Some((ImageKind::Png, pixels::encode_png(f, &[]))),
                );
            }
            out(vec![])
        }
        "CreateVideo" => {
            let frames = a.images("images")?;
            out(vec![Val::Video(Arc::new((
                frames.to_vec(),
                a.float("fps", 30.0),
            )))])
        }
        "SaveVideo" => save_video(ctx, &a)?,
        other => {
            return Err(NodeError::failed(
                "NotImplementedError",
                &format!("the sim cannot run {other}"),
            ));
        }
    })
}

fn fit(w: u32, h: u32, size: u32) -> (u32, u32) {
    let scale = (size as f64 / w.max(h).max(1) as f64).min(1.0);
    (
        ((w as f64 * scale) as u32).max(1),
        ((h as f64 * scale) as u32).max(1),
    )
}

async fn sample(ctx: &mut Run, id: &str, a: &Args<'_>) -> Result<CacheEntry, NodeError> {
    let latent = a.latent("latent_image")?;
    let steps = a.uint("steps", 20).max(1);
    // A different checkpoint paints a different picture from the same seed.
    let model = match a.linked.get("model") {
        Some(Val::Handle(name)) => name.bytes().fold(0u64, |h, b| mix(h, b as u64)),
        _ => 0,
    };
    let seed = mix(a.uint("seed", 0), latent.seed ^ steps ^ model);
    let (pw, ph) = {
        // latent2rgb previews are latent-sized, then contained to --preview-size.
        let (lw, lh) = ((latent.width / 8).max(1), (latent.height / 8).max(1));
        let scale = ctx.knobs.preview_size as f64 / lw.max(lh) as f64;
        (
            ((lw as f64 * scale).round() as u32).max(1),
            ((lh as f64 * scale).round() as u32).max(1),
        )
    };
    for step in 1..=steps {
        ctx.pause(ctx.knobs.step_time).await?;
        if let Some(FaultKind::DropWebSocket { .. }) = ctx.knobs.fault(
            id,
            "KSampler",
            |k| matches!(k, FaultKind::DropWebSocket { at_step } if *at_step == step),
        ) {
            ctx.drop_client_socket();
        }
        let preview = ctx.knobs.previews.then(|| {
            let frame = pixels::preview(seed, pw, ph, step, steps);
            match ctx.knobs.preview_format {
                PreviewFormat::Jpeg => (ImageKind::Jpeg, pixels::encode_jpeg(&frame, 95)),
                PreviewFormat::Png => (ImageKind::Png, pixels::encode_png(&frame, &[])),
            }
        });
        ctx.tick(id, step, steps, preview);
    }
    Ok(out(vec![Val::Latent(Latent { seed, ..latent })]))
}

fn load_image(ctx: &Run, a: &Args<'_>) -> Result<CacheEntry, NodeError> {
    let name = a.string("image", "");
    let (sub, file) = split_image_name(&name);
    let bytes = ctx.shared.lock().files.get(Root::Input, &sub, &file);
    let Some(bytes) = bytes else {
        return Err(NodeError::failed(
            "FileNotFoundError",
            &format!("[Errno 2] No such file or directory: '{name}'"),
        ));
    };
    let Some((frame, alpha)) = pixels::decode(&bytes) else {
        return Err(NodeError::failed(
            "PIL.UnidentifiedImageError",
            &format!("cannot identify image file '{name}'"),
        ));
    };
    // ComfyUI's mask is 1 - alpha; the sim carries it as a grey image.
    let mask = match alpha {
        Some(alpha) => Frame {
            width: frame.width,
            height: frame.height,
            rgb: alpha.iter().flat_map(|a| [255 - a; 3]).collect(),
        },
        None => Frame::solid(frame.width, frame.height, [0, 0, 0]),
    };
    Ok(out(vec![images(vec![frame]), images(vec![mask])]))
}

/// `folder_paths.get_save_image_path`: the subfolder and file stem of a prefix,
/// refusing prefixes that leave the folder with ComfyUI's own message.
fn save_path(prefix: &str) -> Result<(String, String), NodeError> {
    let (sub, stem) = match prefix.rsplit_once('/') {
        Some((s, f)) => (s, f),
        None => ("", prefix),
    };
    let root = ["srv", "ComfyUI", "output"];
    let mut parts: Vec<&str> = root.to_vec();
    for p in sub.split('/') {
        match p {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    if parts.len() < 3 || parts[..3] != root {
        let full = format!("/{}", parts.join("/"));
        let common: Vec<&str> = parts
            .iter()
            .zip(root.iter())
            .take_while(|(a, b)| a == b)
            .map(|(a, _)| *a)
            .collect();
        let msg = format!(
            "**** ERROR: Saving image outside the output folder is not allowed.\n full_output_folder: {full}\n         output_dir: /srv/ComfyUI/output\n         commonpath: /{}\n",
            common.join("/")
        );
        return Err(NodeError::failed("Exception", &msg));
    }
    Ok((parts[3..].join("/"), stem.to_owned()))
}

fn save_images(
    ctx: &mut Run,
    a: &Args<'_>,
    root: Root,
    prefix: &str,
) -> Result<CacheEntry, NodeError> {
    let frames = a.images("images")?;
    let (sub, stem) = save_path(prefix)?;
    let mut text = vec![(
        "prompt",
        protocol::dumps(&Value::Object(ctx.item.prompt.clone())),
    )];
    if let Some(info) = ctx
        .item
        .extra_data
        .get("extra_pnginfo")
        .and_then(Value::as_object)
    {
        for (k, v) in info {
            text.push((k.as_str(), protocol::dumps(v)));
        }
    }
    let mut results = Vec::new();
    let mut st = ctx.shared.lock();
    let first = st.files.next_counter(root, &sub, &stem);
    for (counter, f) in (first..).zip(frames.iter()) {
        let name = format!("{stem}_{counter:05}_.png");
        st.files
            .put(root, &sub, &name, Bytes::from(pixels::encode_png(f, &text)));
        results.push(json!({"filename": name, "subfolder": sub, "type": root.as_str()}));
    }
    Ok(CacheEntry {
        values: vec![],
        ui: Some(json!({"images": results})),
    })
}

fn save_video(ctx: &mut Run, a: &Args<'_>) -> Result<CacheEntry, NodeError> {
    let Some(Val::Video(v)) = a.linked.get("video") else {
        return Err(NodeError::failed(
            "TypeError",
            "input 'video' is not a VIDEO",
        ));
    };
    let (frames, fps) = (&v.0, v.1);
    let (sub, stem) = save_path(&a.string("filename_prefix", "video/ComfyUI"))?;
    let mp4 = video::encode_mp4(frames, fps);
    let mut st = ctx.shared.lock();
    let counter = st.files.next_counter(Root::Output, &sub, &stem);
    let name = format!("{stem}_{counter:05}_.mp4");
    st.files.put(Root::Output, &sub, &name, Bytes::from(mp4));
    Ok(CacheEntry {
        values: vec![],
        ui: Some(json!({
            "images": [{"filename": name, "subfolder": sub, "type": "output"}],
            "animated": [true],
        })),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_that_escape_fail_like_comfyui() {
        assert_eq!(
            save_path("video/ComfyUI").ok(),
            Some(("video".to_owned(), "ComfyUI".to_owned()))
        );
        let Err(NodeError::Failed { message, .. }) = save_path("../escape_attempt") else {
            panic!("escape accepted");
        };
        assert!(message.contains("full_output_folder: /srv/ComfyUI\n"));
        assert!(message.ends_with("commonpath: /srv/ComfyUI\n"));
    }
}

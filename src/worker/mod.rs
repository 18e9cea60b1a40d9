//! The worker pod: claims jobs, drives one ComfyUI, publishes progress.

pub mod comfy;

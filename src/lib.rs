//! comfyfleet: a multi-tenant cloud API in front of a fleet of ComfyUI worker pods.
//!
//! Module map (one line per module, what it owns):
//! - [`config`]  every setting, typed and validated once; secrets never printed.
//! - [`domain`]  pure domain logic: workflow manifests, ComfyUI prompt graphs and their validation, run parameters; no IO.
//! - [`catalog`] the shipped workflow catalogue: loads and validates `manifests/*/` (manifest.yaml + workflow.json).
pub mod catalog;
pub mod config {}
pub mod domain;

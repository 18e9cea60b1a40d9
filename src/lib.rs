//! comfyfleet: a multi-tenant cloud API in front of a fleet of ComfyUI worker pods.
//!
//! Module map (one line per module, what it owns):
//! - [`config`]  every setting, typed and validated once; secrets never printed.
//! - [`sim`]     `comfyfleet sim`: a ComfyUI-protocol server that simulates execution, usable in-process.
pub mod config {}
pub mod sim;

//! The domain: what comfyfleet's objects are and which moves they may make. No IO,
//! no HTTP, no SQL.

pub mod events;
pub mod graph;
pub mod ids;
pub mod job;
pub mod manifest;
pub mod node_catalogue;
pub mod params;
pub mod patterns;
pub mod progress;

//! The fan-out fabric.
pub mod envelope;

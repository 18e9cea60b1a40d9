//! The integration test binary.

mod sim;
mod sim_support;

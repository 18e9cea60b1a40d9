//! The integration test binary.

mod sim;
mod sim_replay;
mod sim_support;

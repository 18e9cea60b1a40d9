//! The integration suite: one binary, one shared harness (`support`), a module per
//! area. Every test gets its own Postgres database and its own Redis prefix.

mod support;

mod auth;
mod bench;
mod bus;
mod cli;
mod comfy;
mod e2e;
mod files;
mod jobs;
mod keys_users;
mod openapi;
mod runner;
mod sim;
mod sim_replay;
mod sim_support;
mod streams;
mod uploads;
mod worker;

//! comfyfleet: a multi-tenant cloud API in front of a fleet of ComfyUI worker pods.
//!
//! Module map (one line per module, what it owns):
//! - [`bench`]      `comfyfleet bench`: the load generator that measures fan-out end to end.
//! - [`config`]     every setting, typed and validated once; secrets never printed.
//! - [`domain`]     ids, manifests, prompt graphs and their validation, run parameters; no IO.
//! - [`catalog`]    the workflow catalogue: loads and validates `manifests/*/`.
//! - [`jobs`]       the job service: validate, queue, cancel; shared by every dialect.
//! - [`publish`]    what goes on the bus (events, progress, previews) and progress snapshots.
//! - [`auth`]       credentials (argon2id passwords, API-key digests, session JWTs) → a `Principal`.
//! - [`bus`]        the fan-out fabric: envelope codec, Redis and in-process pub/sub behind one `Bus`.
//! - [`hub`]        per-pod connection registry: one bus feed per tenant → N bounded, coalescing outboxes.
//! - [`store`]      all SQL; tenant-owned queries take the tenant id first.
//! - [`files`]      object storage, tenant-scoped keys, upload limits, signed links, safe URL inputs.
//! - [`http`]       poem-openapi surfaces, the WebSocket/SSE streams (rendered once per pod), problem+json errors, the credential middleware.
//! - [`commands`]   what each CLI subcommand does.
//! - [`dev`]        `comfyfleet dev`: the whole thing on a laptop, zero configuration.
//! - [`sim`]        `comfyfleet sim`: a ComfyUI-protocol server that simulates execution, usable in-process.
//! - [`telemetry`]  structured logging setup.
//! - [`web`]        the built-in pages (Login, Workflows, Runner, Queue, Activity), embedded.
//! - [`worker`]     the worker pod: claim, run on ComfyUI, publish progress, finish.

// Validation errors carry ComfyUI's whole 400 body (JSON maps that keep key order),
// so several error types are large. They are built once per rejected request, off
// any hot path; boxing each would only add noise to every signature.
#![allow(clippy::result_large_err)]

pub mod auth;
pub mod bench;
pub mod bus;
pub mod catalog;
pub mod commands;
pub mod config;
pub mod dev;
pub mod domain;
pub mod files;
pub mod http;
pub mod hub;
pub mod jobs;
pub mod publish;
pub mod sim;
pub mod store;
pub mod telemetry;
pub mod web;
pub mod worker;

//! # sink: the telemetry-sink runtime
//!
//! Loads a `pipeline.toml`, builds its stages (each a `typetag` plugin from
//! [`sink_api`]), wires them with bounded channels, runs them, reloads what
//! can change live, and shuts down without losing what was accepted.
//!
//! A custom distribution, one binary with extra stage crates linked in, is
//! three lines of `main`:
//!
//! ```no_run
//! use sink_stages as _; // the built-in stages (linked by `sink` already)
//! // use my_stages as _;  // every extra stage crate, named so the linker keeps it
//! fn main() -> std::process::ExitCode {
//!     sink::run()
//! }
//! ```

pub mod api;
mod cli;
pub mod env;
mod health;
mod logging;
pub mod metrics;
pub mod pipeline;
pub mod reload;
pub mod runtime;
pub mod top;

use std::process::ExitCode;

// The built-in stages register themselves when linked; naming the crate links it.
use sink_mqtt as _;
use sink_nats as _;
use sink_otlp as _;
use sink_postgres as _;
use sink_prometheus as _;
use sink_stages as _;

pub use cli::{ArgsError, REFERENCE_COMMAND, check_args, run_with_args};

/// The pipeline `sink` runs when given no `--pipeline` (pipelines/default.toml).
pub const DEFAULT_PIPELINE: &str = include_str!("../../../pipelines/default.toml");

/// Runs the `sink` command line with this process's arguments: `sink --pipeline
/// FILE` (run), `sink validate`, `sink list`, `sink describe TYPE`, `sink health`. Every stage
/// type linked into the binary is available.
pub fn run() -> ExitCode {
    run_with_args(std::env::args_os())
}

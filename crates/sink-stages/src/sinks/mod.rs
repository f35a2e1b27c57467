//! Built-in sinks.

pub mod blackhole;
pub mod json_file;
mod lines;
pub mod stdout;

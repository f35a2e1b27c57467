//! Built-in sinks.

pub mod json_file;
mod lines;
pub mod stdout;

//! A `sink` distribution outside the telemetry-sink repository: the runtime,
//! with each stage crate named so that the linker keeps it.

use my_stages as _;

fn main() -> std::process::ExitCode {
    sink::run()
}

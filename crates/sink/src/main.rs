//! The `sink` binary: the built-in stages and the runtime's command line.

fn main() -> std::process::ExitCode {
    sink::run()
}

//! Logs to stderr (stdout carries data), with a level that reloads live.

use std::io::IsTerminal;

use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::prelude::*;
use tracing_subscriber::{Registry, fmt, reload};

use crate::pipeline::{LogFormat, LogLevel};

/// Changes the log level of the running process.
#[derive(Clone)]
pub struct LogControl {
    handle: reload::Handle<Targets, Registry>,
    /// Set from `--log-level`: it wins over the file, on reload too.
    pinned: Option<LogLevel>,
}

impl LogControl {
    /// Starts logging at `pinned`, or at info until the file says otherwise,
    /// in `format` (fixed for the life of the process).
    pub fn init(pinned: Option<LogLevel>, format: LogFormat) -> Self {
        let (filter, handle) = reload::Layer::new(filter(pinned.unwrap_or_default()));
        let layer = match format {
            LogFormat::Text => fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::stderr().is_terminal())
                .boxed(),
            // One object a line, the message and the event's fields at the
            // top level, as log shippers expect.
            LogFormat::Json => fmt::layer()
                .json()
                .flatten_event(true)
                .with_current_span(false)
                .with_span_list(false)
                .with_writer(std::io::stderr)
                .boxed(),
        };
        // A second init (tests that run the CLI twice in one process) keeps the first.
        let _ = tracing_subscriber::registry()
            .with(filter)
            .with(layer)
            .try_init();
        Self { handle, pinned }
    }

    /// Applies the file's `log_level`, unless `--log-level` pinned one.
    pub fn apply(&self, from_file: LogLevel) {
        let level = self.pinned.unwrap_or(from_file);
        let _ = self.handle.modify(|current| *current = filter(level));
    }
}

/// The log targets of this project's own crates (`sink`, `sink_api`,
/// `sink_stages`, `sink_load`, ...): targets match by prefix.
const OWN_TARGETS: &str = "sink";

/// What `level` lets through. `debug` is for this project's own crates: the
/// libraries under them (h2, hyper, tonic, tower, notify...) log every HTTP/2
/// frame at debug, tens of thousands of lines a second under load, so they
/// stay at `info` unless `trace` asks for everything.
fn filter(level: LogLevel) -> Targets {
    let everything = |level| Targets::new().with_default(level);
    match level {
        LogLevel::Trace => everything(LevelFilter::TRACE),
        LogLevel::Debug => {
            everything(LevelFilter::INFO).with_target(OWN_TARGETS, LevelFilter::DEBUG)
        }
        LogLevel::Info => everything(LevelFilter::INFO),
        LogLevel::Warn => everything(LevelFilter::WARN),
        LogLevel::Error => everything(LevelFilter::ERROR),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_is_for_our_crates_and_trace_for_everything() {
        let debug = filter(LogLevel::Debug);
        assert!(debug.would_enable("sink::runtime", &tracing::Level::DEBUG));
        assert!(debug.would_enable("sink_stages::sinks::lines", &tracing::Level::DEBUG));
        assert!(!debug.would_enable("h2::codec::framed_read", &tracing::Level::DEBUG));
        assert!(debug.would_enable("h2::codec::framed_read", &tracing::Level::INFO));
        let trace = filter(LogLevel::Trace);
        assert!(trace.would_enable("h2::codec::framed_read", &tracing::Level::TRACE));
        assert!(!filter(LogLevel::Warn).would_enable("sink", &tracing::Level::INFO));
    }
}

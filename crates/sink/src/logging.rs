//! Logs to stderr (stdout carries data), with a level that reloads live.

use std::io::IsTerminal;

use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::prelude::*;
use tracing_subscriber::{Registry, fmt, reload};

use crate::pipeline::LogLevel;

/// Changes the log level of the running process.
#[derive(Clone)]
pub struct LogControl {
    handle: reload::Handle<LevelFilter, Registry>,
    /// Set from `--log-level`: it wins over the file, on reload too.
    pinned: Option<LogLevel>,
}

impl LogControl {
    /// Starts logging at `pinned`, or at info until the file says otherwise.
    pub fn init(pinned: Option<LogLevel>) -> Self {
        let (filter, handle) = reload::Layer::new(filter(pinned.unwrap_or_default()));
        let layer = fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal());
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

fn filter(level: LogLevel) -> LevelFilter {
    match level {
        LogLevel::Trace => LevelFilter::TRACE,
        LogLevel::Debug => LevelFilter::DEBUG,
        LogLevel::Info => LevelFilter::INFO,
        LogLevel::Warn => LevelFilter::WARN,
        LogLevel::Error => LevelFilter::ERROR,
    }
}

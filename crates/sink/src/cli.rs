//! The command line: run, validate, list, describe.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use sink_api::registered_stages;
use tokio::signal::unix::{SignalKind, signal};

use crate::DEFAULT_PIPELINE;
use crate::logging::LogControl;
use crate::pipeline::{LogLevel, Pipeline, PipelineErrors};
use crate::runtime::{Ending, Running};

/// Exit code for a pipeline file with mistakes.
const EXIT_CONFIG: u8 = 2;

/// Receives sensor readings over gRPC and writes them out, through the
/// pipeline declared in one TOML file.
#[derive(Parser)]
#[command(name = "sink", version, about)]
struct Cli {
    /// The pipeline file; without it, the built-in default pipeline
    /// (gRPC on 127.0.0.1:8000 -> buffered -> telemetry-sink.log.json).
    #[arg(long, short, global = true, value_name = "FILE")]
    pipeline: Option<PathBuf>,

    /// Log level; overrides `settings.log_level`, on reload too.
    #[arg(long, global = true, value_enum)]
    log_level: Option<LogLevel>,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the pipeline (the default command).
    Run,
    /// Check the pipeline file and exit: 0 if it is good, 2 with every mistake if not.
    Validate,
    /// List the stage types this binary knows.
    List {
        /// Also show each type's keys.
        #[arg(long, short)]
        verbose: bool,
    },
    /// Show one stage type's keys and a ready-to-paste table.
    Describe {
        /// The type name, as in `type = "..."`.
        name: String,
    },
}

/// Runs the command line given by `args` (the first being the program name).
pub fn run_with_args(args: impl IntoIterator<Item = OsString>) -> ExitCode {
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(err) => {
            let _ = err.print();
            return if err.use_stderr() {
                ExitCode::from(EXIT_CONFIG)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => serve(cli.pipeline.as_deref(), cli.log_level),
        Command::Validate => match load(cli.pipeline.as_deref()) {
            Ok(pipeline) => {
                println!(
                    "{}: valid, {} stages",
                    pipeline.file.display(),
                    pipeline.stages.len()
                );
                ExitCode::SUCCESS
            }
            Err(errors) => config_failure(&errors),
        },
        Command::List { verbose } => {
            list(verbose);
            ExitCode::SUCCESS
        }
        Command::Describe { name } => describe(&name),
    }
}

fn load(path: Option<&Path>) -> Result<Pipeline, PipelineErrors> {
    match path {
        Some(path) => Pipeline::load(path),
        None => Pipeline::parse(
            Path::new("(built-in default pipeline)"),
            DEFAULT_PIPELINE,
            |name| std::env::var(name).ok(),
        ),
    }
}

fn config_failure(errors: &PipelineErrors) -> ExitCode {
    for error in &errors.0 {
        eprintln!("error: {error}");
    }
    ExitCode::from(EXIT_CONFIG)
}

fn list(verbose: bool) {
    for info in registered_stages() {
        println!(
            "{:<10} {:<12} {:<14} {}",
            info.kind,
            info.name,
            info.crate_name,
            info.description()
        );
        if verbose {
            for key in info.keys() {
                println!(
                    "    {:<20} {:<22} default {:<12} {}",
                    key.name,
                    key.value_type,
                    key.default.as_deref().unwrap_or("(required)"),
                    if key.live { "live" } else { "restart" }
                );
            }
        }
    }
}

fn describe(name: &str) -> ExitCode {
    let Some(info) = registered_stages().find(|info| info.name == name) else {
        let known: Vec<&str> = registered_stages().map(|info| info.name).collect();
        eprintln!(
            "error: no stage type `{name}` in this binary; known: {}",
            known.join(", ")
        );
        return ExitCode::from(EXIT_CONFIG);
    };
    println!(
        "{} `{}` (crate {})\n{}\n",
        info.kind,
        info.name,
        info.crate_name,
        info.description()
    );
    for key in info.keys() {
        println!(
            "{} ({}, default {}, {})\n    {}\n",
            key.name,
            key.value_type,
            key.default.as_deref().unwrap_or("required"),
            if key.live { "live" } else { "needs a restart" },
            key.doc
        );
    }
    print!("{}", info.example_toml(&format!("my_{}", info.name)));
    ExitCode::SUCCESS
}

/// `sink run`: loads, starts, serves until a signal, then drains.
fn serve(path: Option<&Path>, log_level: Option<LogLevel>) -> ExitCode {
    let logs = LogControl::init(log_level);
    let pipeline = match load(path) {
        Ok(pipeline) => pipeline,
        Err(errors) => return config_failure(&errors),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        logs.apply(pipeline.settings.log_level);
        let settings = pipeline.settings.clone();
        let file = pipeline.file.clone();
        let running = match Running::start(pipeline) {
            Ok(running) => running,
            Err(errors) => return config_failure(&errors),
        };
        tracing::info!(pipeline = %file.display(), "pipeline running");
        match run_until_signal(running, settings.shutdown_timeout).await {
            Ok(Ending::Clean) => {
                tracing::info!("shut down cleanly: everything accepted was written");
                ExitCode::SUCCESS
            }
            Ok(_) | Err(_) => ExitCode::FAILURE,
        }
    })
}

async fn run_until_signal(
    mut running: Running,
    shutdown_timeout: std::time::Duration,
) -> std::io::Result<Ending> {
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let failed = tokio::select! {
        _ = interrupt.recv() => false,
        _ = terminate.recv() => false,
        failure = running.next_failure() => match failure {
            Some(_) => true,
            None => return Ok(Ending::Clean),
        },
    };
    tracing::info!("shutting down: sources stop accepting, then every stage drains");
    tokio::select! {
        ending = running.shut_down(shutdown_timeout, failed) => Ok(ending),
        _ = interrupt.recv() => {
            tracing::error!("second signal: exiting without draining");
            Ok(Ending::TimedOut)
        }
        _ = terminate.recv() => {
            tracing::error!("second signal: exiting without draining");
            Ok(Ending::TimedOut)
        }
    }
}

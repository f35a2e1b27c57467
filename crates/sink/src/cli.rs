//! The command line: run, validate, list, describe, health.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use sink_api::{KeyInfo, StageInfo, StageKind, registered_stages};
use tokio::signal::unix::{SignalKind, signal};

use crate::DEFAULT_PIPELINE;
use crate::api::ReadyState;
use crate::health::{self, HealthArgs};
use crate::logging::LogControl;
use crate::metrics::{ReloadOutcome, RuntimeMetrics};
use crate::pipeline::{LogFormat, LogLevel, Pipeline, PipelineError, PipelineErrors};
use crate::reload::{FileWatcher, Plan, Snapshot, configs_to_apply};
use crate::runtime::{Ending, Loss, Running};

/// `println!` that stops quietly when stdout has closed (`sink list | head`)
/// rather than panicking.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// Exit code for a pipeline file with mistakes.
const EXIT_CONFIG: u8 = 2;

/// Receives sensor readings over gRPC and writes them out, through the
/// pipeline declared in one TOML file.
#[derive(Parser)]
// `about` is spelled out: a distribution built on this crate would otherwise
// show the `sink` crate's package description.
#[command(
    name = "sink",
    version,
    about = "Receives sensor readings over gRPC and writes them out, through the pipeline declared in one TOML file."
)]
struct Cli {
    /// The pipeline file; without it, the built-in default pipeline
    /// (gRPC on 127.0.0.1:8000 -> buffered -> telemetry-sink.log.json).
    #[arg(long, short, global = true, value_name = "FILE", env = "SINK_PIPELINE")]
    pipeline: Option<PathBuf>,

    /// Log level; overrides `settings.log_level`, on reload too.
    #[arg(long, global = true, value_enum)]
    log_level: Option<LogLevel>,

    /// Log line format on stderr; overrides `settings.log_format`.
    #[arg(long, global = true, value_enum, value_name = "FORMAT")]
    log_format: Option<LogFormat>,

    #[command(subcommand)]
    command: Option<Command>,
}

/// A stage kind, as `describe --kind` takes it.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum KindArg {
    Source,
    Processor,
    Sink,
}

impl KindArg {
    fn matches(self, kind: StageKind) -> bool {
        matches!(
            (self, kind),
            (Self::Source, StageKind::Source)
                | (Self::Processor, StageKind::Processor)
                | (Self::Sink, StageKind::Sink)
        )
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run the pipeline (the default command).
    Run,
    /// Check the pipeline file and exit: 0 if it is good, 2 with every mistake if not.
    Validate {
        /// Also show what reloading from this older file to the new one would
        /// do: keys that change live, and changes that need a restart (exit 3).
        #[arg(long, value_name = "OLD")]
        against: Option<PathBuf>,
    },
    /// List the stage types this binary knows.
    List {
        /// Also show each type's keys.
        #[arg(long, short)]
        verbose: bool,
    },
    /// Show a stage type's keys and a ready-to-paste table (every kind of
    /// that name: `nats` is a source and a sink).
    Describe {
        /// The type name, as in `type = "..."`; may be left out with
        /// `--markdown`, which then describes every type.
        name: Option<String>,
        /// Only the type of this kind.
        #[arg(long, value_enum)]
        kind: Option<KindArg>,
        /// Write Markdown (the stage reference, docs/reference.md).
        #[arg(long)]
        markdown: bool,
    },
    /// Ask a running sink over gRPC health (grpc.health.v1) whether it serves:
    /// exit 0 if every address answers SERVING, 1 if not.
    Health(HealthArgs),
    /// Watch a running sink live: per stage its rates, channel fill and
    /// errors, the gRPC calls by status and the reloads, read each second
    /// from its `[api]` endpoint. `q` or Ctrl-C quits; plain lines when
    /// stdout is not a terminal.
    Top {
        /// The `[api] address` of the running sink, `host:port`.
        #[arg(long, value_name = "ADDRESS")]
        api: String,
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
    // A binary with a half-registered stage type would run it under a name
    // `describe` does not know and change its restart-only keys live.
    if let Err(errors) = sink_api::check_registrations() {
        eprintln!("error: {errors}");
        return ExitCode::FAILURE;
    }
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => serve(cli.pipeline.as_deref(), cli.log_level, cli.log_format),
        Command::Validate { against } => validate(cli.pipeline.as_deref(), against.as_deref()),
        Command::List { verbose } => {
            list(verbose);
            ExitCode::SUCCESS
        }
        Command::Describe {
            name,
            kind,
            markdown,
        } => describe(name.as_deref(), kind, markdown),
        Command::Health(args) => health::run(args, || load(cli.pipeline.as_deref())),
        Command::Top { api } => crate::top::run(&api),
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

/// Exit code of `validate --against` when the change needs a restart.
const EXIT_NEEDS_RESTART: u8 = 3;

fn validate(path: Option<&Path>, against: Option<&Path>) -> ExitCode {
    let pipeline = match load(path) {
        Ok(pipeline) => pipeline,
        Err(errors) => return config_failure(&errors),
    };
    let text = match path {
        Some(path) => crate::pipeline::read_text(path).unwrap_or_default(),
        None => DEFAULT_PIPELINE.to_string(),
    };
    for warning in unread_original_vars(&pipeline.file, &text, env_var) {
        eprintln!("warning: {warning}");
    }
    out!(
        "{}: valid, {} stages",
        pipeline.file.display(),
        pipeline.stages.len()
    );
    let Some(against) = against else {
        return ExitCode::SUCCESS;
    };
    let old = match Pipeline::load(against) {
        Ok(old) => old,
        Err(errors) => return config_failure(&errors),
    };
    let plan = Plan::between(&Snapshot::of(&old), &Snapshot::of(&pipeline));
    if plan.is_empty() {
        out!("against {}: nothing would change", against.display());
        return ExitCode::SUCCESS;
    }
    if !plan.settings.is_empty() || !plan.stages.is_empty() || !plan.when_full.is_empty() {
        out!(
            "against {}: would change live: {}",
            against.display(),
            plan.describe_live()
        );
    }
    if plan.needs_restart.is_empty() {
        return ExitCode::SUCCESS;
    }
    for change in &plan.needs_restart {
        out!("against {}: needs a restart: {change}", against.display());
    }
    ExitCode::from(EXIT_NEEDS_RESTART)
}

fn config_failure(errors: &PipelineErrors) -> ExitCode {
    for error in &errors.0 {
        eprintln!("error: {error}");
    }
    ExitCode::from(EXIT_CONFIG)
}

fn list(verbose: bool) {
    let stages: Vec<_> = registered_stages().collect();
    let width = |f: &dyn Fn(&StageInfo) -> usize| stages.iter().map(|i| f(i)).max().unwrap_or(0);
    let name_width = width(&|info| info.name.len());
    let crate_width = width(&|info| info.crate_name.len());
    let keys: Vec<Vec<KeyInfo>> = stages
        .iter()
        .map(|info| if verbose { info.keys() } else { Vec::new() })
        .collect();
    let all = || keys.iter().flatten();
    let key_width = all().map(|key| key.name.chars().count()).max().unwrap_or(0);
    let type_width = all()
        .map(|key| key.value_type.chars().count())
        .max()
        .unwrap_or(0);
    let live_width = all()
        .map(|key| key.liveness().chars().count())
        .max()
        .unwrap_or(0);
    for (info, keys) in stages.iter().zip(&keys) {
        out!(
            "{:<10} {:<name_width$} {:<crate_width$} {}",
            info.kind,
            info.name,
            info.crate_name,
            info.description()
        );
        for key in keys {
            out!(
                "    {:<key_width$}  {:<type_width$}  {:<live_width$}  {}",
                key.name,
                key.value_type,
                key.liveness(),
                default_text(key)
            );
        }
    }
}

fn describe(name: Option<&str>, kind: Option<KindArg>, markdown: bool) -> ExitCode {
    let of_kind = |info: &&StageInfo| kind.is_none_or(|kind| kind.matches(info.kind));
    let Some(name) = name else {
        if !markdown {
            eprintln!(
                "error: name a stage type (`sink list` shows them), or give --markdown to describe every type"
            );
            return ExitCode::from(EXIT_CONFIG);
        }
        let stages: Vec<&StageInfo> = registered_stages().filter(of_kind).collect();
        out!("{}", reference_markdown(&stages).trim_end());
        return ExitCode::SUCCESS;
    };
    let found: Vec<&StageInfo> = registered_stages()
        .filter(|info| info.name == name)
        .filter(of_kind)
        .collect();
    if found.is_empty() {
        eprintln!("error: {}", unknown_type(name, kind));
        return ExitCode::from(EXIT_CONFIG);
    }
    for (i, info) in found.iter().enumerate() {
        if i > 0 {
            out!();
        }
        if markdown {
            out!("{}", stage_markdown(info, "##").trim_end());
        } else {
            describe_text(info);
        }
    }
    ExitCode::SUCCESS
}

/// "no stage type `x` ... (did you mean `y`?); known: a (source), b (source, sink)".
fn unknown_type(name: &str, kind: Option<KindArg>) -> String {
    let mut known: std::collections::BTreeMap<&str, Vec<String>> = Default::default();
    for info in registered_stages() {
        known
            .entry(info.name)
            .or_default()
            .push(info.kind.to_string());
    }
    let names: Vec<String> = known.keys().map(|name| name.to_string()).collect();
    // No type name is anywhere near that long: no suggestion to look for.
    let hint = if known.contains_key(name) || name.len() > 256 {
        String::new()
    } else {
        crate::pipeline::did_you_mean(name, &names)
    };
    let listed: Vec<String> = known
        .iter()
        .map(|(name, kinds)| format!("{name} ({})", kinds.join(", ")))
        .collect();
    let of_kind = if kind.is_some() && known.contains_key(name) {
        " of that kind"
    } else {
        ""
    };
    format!(
        "no stage type `{}`{of_kind} in this binary{hint}; known: {}",
        crate::pipeline::echoed(name),
        listed.join(", ")
    )
}

fn describe_text(info: &StageInfo) {
    out!(
        "{} `{}` (crate {})\n{}\n",
        info.kind,
        info.name,
        info.crate_name,
        info.description()
    );
    for key in info.keys() {
        out!(
            "{} ({}, {}, {})\n    {}\n",
            key.name,
            key.value_type,
            default_text(&key),
            key.liveness(),
            key.doc
        );
    }
    out!(
        "{}",
        info.example_toml(&format!("my_{}", info.name)).trim_end()
    );
}

/// How docs/reference.md is regenerated; the test that compares it says so.
pub const REFERENCE_COMMAND: &str = "cargo run -p sink -- describe --markdown > docs/reference.md";

/// The stage reference: every type of `stages`, by kind.
fn reference_markdown(stages: &[&StageInfo]) -> String {
    let mut out = String::from("# Stage reference\n\n");
    out.push_str(&format!(
        "<!-- Generated from the binary; do not edit. Regenerate with: {REFERENCE_COMMAND} -->\n\n"
    ));
    out.push_str(
        "Every key of every stage type this binary has, generated from the types \
         themselves (`sink describe --markdown`); a test fails when this page \
         differs from what the binary says. `sink describe TYPE` prints the same \
         for one type. The keys every stage has (`type`, `inputs`, `capacity`, \
         `when_full`) and `[settings]` are in [Configuration](configuration.md); \
         each type's own page in [stages/](stages/) explains it at length.\n",
    );
    for (kind, title) in [
        (StageKind::Source, "Sources"),
        (StageKind::Processor, "Processors"),
        (StageKind::Sink, "Sinks"),
    ] {
        let of_kind: Vec<&&StageInfo> = stages.iter().filter(|info| info.kind == kind).collect();
        if of_kind.is_empty() {
            continue;
        }
        out.push_str(&format!("\n## {title}\n"));
        for info in of_kind {
            out.push('\n');
            out.push_str(&stage_markdown(info, "###"));
        }
    }
    out
}

/// One type as Markdown: a heading at `level`, its description, a table of
/// its keys, and a ready-to-paste table.
fn stage_markdown(info: &StageInfo, level: &str) -> String {
    let cell = |text: &str| text.replace('|', "\\|").replace('\n', " ");
    let mut out = format!(
        "{level} `{}` {} (crate `{}`)\n\n{}\n\n",
        info.name,
        info.kind,
        info.crate_name,
        info.description()
    );
    out.push_str("| key | type | default | reload | meaning |\n|---|---|---|---|---|\n");
    for key in info.keys() {
        let default = match key.default.as_deref() {
            None => "required".to_string(),
            Some("(none)") => default_text(&key),
            Some(default) => format!("`{default}`"),
        };
        out.push_str(&format!(
            "| `{}` | {} | {} | {} | {} |\n",
            key.name,
            cell(&key.value_type),
            cell(&default),
            key.liveness(),
            cell(&key.doc)
        ));
    }
    out.push_str(&format!(
        "\n```toml\n{}\n```\n",
        info.example_toml(&format!("my_{}", info.name)).trim_end()
    ));
    out
}

/// A key's default in words: `default <value>`, `required`, the computed
/// default its doc gives (`Defaults to ...`), or `optional` when absent
/// means "not used".
fn default_text(key: &KeyInfo) -> String {
    match key.default.as_deref() {
        None => "required".into(),
        Some("(none)") => computed_default(&key.doc).map_or_else(
            || "optional".into(),
            |computed| format!("default: {computed}"),
        ),
        Some(default) => format!("default {default}"),
    }
}

/// The default a key's doc comment states in words (`Defaults to the soft
/// open-file limit less 64, at most 1024.`), for keys whose default is
/// computed when the pipeline starts.
fn computed_default(doc: &str) -> Option<String> {
    let start = doc.find("Defaults to ")? + "Defaults to ".len();
    let rest = &doc[start..];
    let end = rest.find(". ").map_or(rest.len(), |end| end);
    Some(rest[..end].trim_end_matches('.').to_string())
}

/// One warning per variable of the original service that is set but that the
/// pipeline's text never names: setting it changes nothing, and the user
/// should hear why.
fn unread_original_vars(
    file: &Path,
    text: &str,
    env: impl Fn(&str) -> Option<String>,
) -> Vec<String> {
    crate::env::ORIGINAL_VARS
        .iter()
        .filter(|name| env(name).is_some() && !text.contains(&format!("${{{name}")))
        .map(|name| {
            format!(
                "the environment variable {name} is set, but {} does not read it, so it has no effect; \
                 name it in the file (`${{{name}:-default}}`), or run pipelines/original-env.toml, which reads every variable of the original service",
                file.display()
            )
        })
        .collect()
}

/// Why a command line does not parse, from [`check_args`].
#[derive(Debug)]
pub struct ArgsError {
    /// Only something is missing (a required option, an option's value): the
    /// line may be a mention in prose (`sink top`), not a wrong command.
    pub incomplete: bool,
    /// clap's message.
    pub message: String,
}

/// Whether `args` (without the program name) parse as a `sink` command line:
/// the check the docs' tests run on every `sink ...` line they show.
pub fn check_args<I, T>(args: I) -> Result<(), ArgsError>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    use clap::error::ErrorKind;
    let all = std::iter::once(OsString::from("sink")).chain(args.into_iter().map(Into::into));
    match Cli::try_parse_from(all) {
        Ok(_) => Ok(()),
        // --help and --version parse; clap reports them as errors to stop.
        Err(err) if !err.use_stderr() => Ok(()),
        Err(err) => {
            let message = err.to_string();
            let incomplete = matches!(
                err.kind(),
                ErrorKind::MissingRequiredArgument | ErrorKind::MissingSubcommand
            ) || message.contains("a value is required");
            Err(ArgsError {
                incomplete,
                message,
            })
        }
    }
}

/// `sink run`: loads, starts, serves (reloading on file change or SIGHUP)
/// until SIGINT or SIGTERM, then drains.
fn serve(
    path: Option<&Path>,
    log_level: Option<LogLevel>,
    log_format: Option<LogFormat>,
) -> ExitCode {
    let text = match path {
        Some(path) => match crate::pipeline::read_text(path) {
            Ok(text) => text,
            Err(err) => {
                eprintln!("error: {}: cannot read: {err}", path.display());
                return ExitCode::from(EXIT_CONFIG);
            }
        },
        None => DEFAULT_PIPELINE.to_string(),
    };
    let file = path.map_or_else(
        || PathBuf::from("(built-in default pipeline)"),
        Path::to_path_buf,
    );
    let pipeline = match Pipeline::parse(&file, &text, env_var) {
        Ok(pipeline) => pipeline,
        Err(errors) => return config_failure(&errors),
    };
    let logs = LogControl::init(
        log_level,
        log_format.unwrap_or(pipeline.settings.log_format),
    );
    for warning in unread_original_vars(&file, &text, env_var) {
        tracing::warn!("{warning}");
    }
    // Half the cores for async work: file writes run on the blocking pool and
    // the kernel's network and disk work needs CPU too. On 2 cores, 1 worker
    // spent a quarter less CPU per reading than 2 (bench/run, README).
    let workers = std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1));
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let (code, loss) = runtime.block_on(async move {
        logs.apply(pipeline.settings.log_level);
        log_shape(&pipeline);
        let registry = sink_api::metrics::MetricsRegistry::new();
        let ready = ReadyState::starting();
        // Bound before any stage is built, so that a taken address stops
        // everything first, like every other mistake.
        let api = match start_api(&pipeline, &registry, &ready) {
            Ok(api) => api,
            Err(errors) => return (config_failure(&errors), None),
        };
        let reloader = Reloader {
            watched: path.is_some(),
            file,
            current: Snapshot::of(&pipeline),
            last_text: text,
            logs,
            metrics: RuntimeMetrics::register(&registry),
            ready,
        };
        let running = match Running::start_observed(pipeline, &registry) {
            Ok(running) => running,
            Err(errors) => return (config_failure(&errors), None),
        };
        let ending = run_until_signal(running, reloader).await;
        if let Some(api) = api {
            api.abort();
        }
        match ending {
            Ok(Ending::Clean) => {
                tracing::info!("shut down cleanly: everything accepted was written");
                (ExitCode::SUCCESS, None)
            }
            Ok(Ending::StageFailed) => (ExitCode::FAILURE, None),
            Ok(Ending::Cut(loss)) => (ExitCode::FAILURE, Some(loss)),
            Err(err) => {
                tracing::error!("cannot install signal handlers: {err}");
                (ExitCode::FAILURE, None)
            }
        }
    });
    // A write stuck in the blocking pool (a hung disk, a full pipe) must not
    // keep a cut process alive; one that ends within this grace counts the
    // lines it landed, so the loss is counted only after it.
    runtime.shutdown_timeout(std::time::Duration::from_millis(500));
    if let Some(loss) = loss {
        loss.report();
    }
    code
}

/// Starts the `[api]` endpoint, if the file asks for one.
fn start_api(
    pipeline: &Pipeline,
    registry: &sink_api::metrics::MetricsRegistry,
    ready: &ReadyState,
) -> Result<Option<tokio::task::JoinHandle<()>>, PipelineErrors> {
    let Some(address) = &pipeline.api.address else {
        return Ok(None);
    };
    let error = |message: String| {
        PipelineErrors(vec![PipelineError {
            file: pipeline.file.clone(),
            stage: None,
            key: Some("api.address".into()),
            message,
        }])
    };
    let listener = crate::api::bind(address)
        .map_err(|err| error(format!("cannot listen on {address}: {err}")))?;
    let (local, task) = crate::api::spawn(listener, registry.clone(), ready.clone())
        .map_err(|err| error(format!("cannot serve on {address}: {err}")))?;
    tracing::info!("api listening on {local} (/metrics, /health, /ready)");
    Ok(Some(task))
}

fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// How long a reload waits for the pipeline file to be read.
const READ_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// How long a reload waits for the stages it changed to confirm.
const APPLY_WAIT: std::time::Duration = std::time::Duration::from_millis(500);

/// What a running pipeline needs to take a new version of its file.
struct Reloader {
    file: PathBuf,
    /// Whether there is a file at all (not the built-in default).
    watched: bool,
    /// The shape of what runs now.
    current: Snapshot,
    /// The text last read, so that events that change nothing are ignored.
    last_text: String,
    logs: LogControl,
    /// Counts each reload's outcome.
    metrics: RuntimeMetrics,
    /// What `/ready` answers: told when the pipeline runs and when
    /// shutdown begins.
    ready: ReadyState,
}

impl Reloader {
    /// Reads, validates and applies the file, all or nothing, logging one
    /// line with the outcome. `forced` (SIGHUP) reloads even unchanged text.
    async fn reload(&mut self, running: &Running, trigger: &str, forced: bool) {
        if !self.watched {
            tracing::warn!("{trigger}: the built-in default pipeline has no file to reload");
            return;
        }
        let file = self.file.display();
        // Read on the blocking pool, never on this thread (it also waits for
        // signals) nor an async worker; a read that hangs anyway (a stuck
        // network file system) is given up, leaving the pipeline unchanged.
        let path = self.file.clone();
        let read = tokio::task::spawn_blocking(move || crate::pipeline::read_text(&path));
        let read = match tokio::time::timeout(READ_WAIT, read).await {
            Ok(Ok(read)) => read,
            Ok(Err(err)) => Err(std::io::Error::other(err)),
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer within {READ_WAIT:?}"),
            )),
        };
        let text = match read {
            Ok(text) => text,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                tracing::info!(
                    "{file} is absent for now ({trigger}); the running pipeline is unchanged until it returns"
                );
                return;
            }
            Err(err) => {
                self.metrics.reloaded(ReloadOutcome::Failed);
                tracing::warn!(
                    "reload failed ({trigger}): {file}: cannot read: {err}; the running pipeline is unchanged"
                );
                return;
            }
        };
        if !forced && text == self.last_text {
            tracing::debug!("{file} changed on disk but its text did not ({trigger})");
            return;
        }
        self.last_text.clone_from(&text);
        let new = match Pipeline::parse(&self.file, &text, env_var) {
            Ok(new) => new,
            Err(errors) => {
                let errors: Vec<String> = errors.0.iter().map(ToString::to_string).collect();
                self.metrics.reloaded(ReloadOutcome::Failed);
                tracing::warn!(
                    "reload failed ({trigger}): {}; the running pipeline is unchanged",
                    errors.join("; ")
                );
                return;
            }
        };
        let snapshot = Snapshot::of(&new);
        let plan = Plan::between(&self.current, &snapshot);
        if !plan.needs_restart.is_empty() {
            self.metrics.reloaded(ReloadOutcome::Refused);
            tracing::warn!(
                "reload refused ({trigger}): needs a restart: {}; the running pipeline is unchanged",
                plan.needs_restart.join("; ")
            );
            return;
        }
        if plan.is_empty() {
            self.metrics.reloaded(ReloadOutcome::Unchanged);
            tracing::info!("reload ({trigger}): nothing changed");
            return;
        }
        self.logs.apply(new.settings.log_level);
        running.set_memory_limit(new.settings.memory_limit.0);
        let described = plan.describe_live();
        for (id, when_full) in &plan.when_full {
            running.set_when_full(id, *when_full);
        }
        // Stages apply between batches; one busy with a batch (or waiting for
        // its next one, if it checks per batch) confirms later.
        let deadline = tokio::time::Instant::now() + APPLY_WAIT;
        let mut pending = Vec::new();
        for (id, config) in configs_to_apply(&plan, new) {
            if !running.update(&id, config, deadline).await {
                pending.push(format!("`{id}`"));
            }
        }
        self.current = snapshot;
        self.metrics.reloaded(ReloadOutcome::Applied);
        if pending.is_empty() {
            tracing::info!("reload applied ({trigger}): {described}");
        } else {
            tracing::info!(
                "reload applied ({trigger}): {described}; stage {} will apply it with its next batch",
                pending.join(", ")
            );
        }
    }
}

/// What woke the main loop.
enum Wake {
    Stop,
    Reload(&'static str, bool),
    Failed,
    AllDone,
}

async fn run_until_signal(mut running: Running, mut reloader: Reloader) -> std::io::Result<Ending> {
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut hangup = signal(SignalKind::hangup())?;
    let mut watcher = if reloader.watched {
        match FileWatcher::start(&reloader.file) {
            Ok(watcher) => Some(watcher),
            Err(err) => {
                tracing::warn!(
                    "cannot watch {}: {err}; reload with SIGHUP",
                    reloader.file.display()
                );
                None
            }
        }
    } else {
        None
    };
    // Said only once signals and the file are watched: from here on, every
    // SIGTERM drains and every edit reloads.
    tracing::info!(pipeline = %reloader.file.display(), "pipeline running");
    reloader.ready.running(running.readiness().clone());
    let failed = loop {
        let wake = tokio::select! {
            _ = interrupt.recv() => Wake::Stop,
            _ = terminate.recv() => Wake::Stop,
            _ = hangup.recv() => Wake::Reload("SIGHUP", true),
            Some(()) = async { watcher.as_mut()?.changed().await } => Wake::Reload("file changed", false),
            failure = running.next_failure() => match failure {
                Some(_) => Wake::Failed,
                None => Wake::AllDone,
            },
        };
        match wake {
            Wake::Stop => break false,
            Wake::Failed => break true,
            Wake::AllDone => return Ok(Ending::Clean),
            Wake::Reload(trigger, forced) => reloader.reload(&running, trigger, forced).await,
        }
    };
    let timeout = reloader.current.settings().shutdown_timeout;
    reloader.ready.shutting_down();
    tracing::info!("shutting down: sources stop accepting, then every stage drains");
    let accounts = running.accounts();
    let second = tokio::select! {
        ending = running.shut_down(timeout, failed) => return Ok(ending),
        _ = interrupt.recv() => "SIGINT",
        _ = terminate.recv() => "SIGTERM",
    };
    // Dropping the shutdown above cut every stage (its `JoinSet` aborts them).
    Ok(Ending::Cut(Loss::new(
        accounts,
        format!("second signal ({second}): exiting without draining"),
    )))
}

/// At debug level, what the runtime is about to build: each stage's kind,
/// type, inputs and the names of its keys (not their values: they may hold
/// credentials).
fn log_shape(pipeline: &Pipeline) {
    for stage in &pipeline.stages {
        let keys: Vec<&str> = stage.params.keys().map(String::as_str).collect();
        tracing::debug!(
            "stage `{}`: {} of type `{}`, inputs {:?}, input capacity {} batches, keys {:?}",
            stage.id,
            stage.kind,
            stage.type_name,
            stage.inputs,
            stage.capacity,
            keys
        );
    }
}

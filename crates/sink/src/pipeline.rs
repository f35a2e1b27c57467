//! Loading `pipeline.toml`: substitution, parsing, each stage's config through
//! typetag, and the checks on the graph. Every mistake found is reported, each
//! naming the file, the stage and the key, before anything starts.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde::de::DeserializeOwned;
use sink_api::{
    ByteSize, ConfigError, ProcessorConfig, SinkConfig, SourceConfig, StageKind, WhenFull,
};
use toml::{Table, Value};

/// The section of the stage author's guide that explains linking a stage
/// crate, named in every "unknown type" error.
pub const LINKING_HELP: &str = "docs/stage-authors.md, section \"Linking a stage crate\"";

/// A validated pipeline file, ready to build.
#[derive(Debug)]
pub struct Pipeline {
    /// Where it was read from (for messages).
    pub file: PathBuf,
    /// `[settings]`.
    pub settings: Settings,
    /// `[api]`.
    pub api: crate::api::ApiConfig,
    /// Every stage, sources first, then processors, then sinks, each section in file order.
    pub stages: Vec<StageSpec>,
}

/// `[settings]`: every key has a default.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Least severe log level written: trace, debug, info, warn or error. Live.
    #[serde(default)]
    pub log_level: LogLevel,
    /// How log lines are written to stderr: `text` or `json` (one object a
    /// line, for Loki, Elasticsearch and other shippers). Needs a restart.
    #[serde(default)]
    pub log_format: LogFormat,
    /// How long shutdown may take before the process gives up and exits non-zero. Live.
    #[serde(default = "default_shutdown_timeout", with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// Capacity, in batches, of every stage input channel without a `capacity`. Topology.
    #[serde(default = "default_channel_capacity")]
    pub channel_capacity: usize,
    /// Bytes the batches in flight may hold in all (decoded size, reserved by
    /// the sources per call, released once every sink has finished the
    /// batch). Live.
    #[serde(default = "default_memory_limit")]
    pub memory_limit: ByteSize,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            log_level: LogLevel::default(),
            log_format: LogFormat::default(),
            shutdown_timeout: default_shutdown_timeout(),
            channel_capacity: default_channel_capacity(),
            memory_limit: default_memory_limit(),
        }
    }
}

fn default_shutdown_timeout() -> Duration {
    Duration::from_secs(30)
}

/// The largest channel capacity accepted, in batches: far more than memory
/// would hold of real batches, and far below what tokio's channels can count.
const MAX_CAPACITY: usize = 1 << 20;

fn default_channel_capacity() -> usize {
    1024
}

/// 256 MiB: a hundred thousand times a typical call of 100 readings, and
/// one 4 MiB request of empty items (about 170 MB decoded) still passes.
fn default_memory_limit() -> ByteSize {
    ByteSize(256 << 20)
}

/// Below this, ordinary calls would be refused as larger than the whole limit.
const MIN_MEMORY_LIMIT: u64 = 1 << 20;

/// A log level as written in `settings.log_level` or `--log-level`.
///
/// The file also takes the original's level names (zap's, in either case), so
/// that its `LOGGER_MIN_LOG_LEVEL` works unchanged: `dpanic`, `panic` and
/// `fatal` mean `error`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogLevel {
    /// Everything.
    Trace,
    /// Detail for debugging.
    Debug,
    /// Normal operation.
    #[default]
    Info,
    /// Something needs attention.
    Warn,
    /// Something failed.
    Error,
}

impl<'de> Deserialize<'de> for LogLevel {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        match text.to_ascii_lowercase().as_str() {
            "trace" => Ok(Self::Trace),
            "debug" => Ok(Self::Debug),
            "info" => Ok(Self::Info),
            "warn" => Ok(Self::Warn),
            "error" | "dpanic" | "panic" | "fatal" => Ok(Self::Error),
            _ => Err(serde::de::Error::invalid_value(
                serde::de::Unexpected::Str(&text),
                &"one of trace, debug, info, warn, error",
            )),
        }
    }
}

/// How log lines are written, as in `settings.log_format` or `--log-format`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines: time, level, the stage, the message.
    #[default]
    Text,
    /// One JSON object per line: `timestamp`, `level`, `target`, `message`
    /// and the event's fields (`stage`, ...).
    Json,
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Text => "text",
            Self::Json => "json",
        })
    }
}

/// One stage of the file.
#[derive(Debug)]
pub struct StageSpec {
    /// Its `<id>`.
    pub id: String,
    /// Its section.
    pub kind: StageKind,
    /// Its `type`.
    pub type_name: String,
    /// Its `inputs`, as written.
    pub inputs: Vec<String>,
    /// Its input channel's capacity, in batches (0 for sources, which have none).
    pub capacity: usize,
    /// A sink's `when_full`: what its upstream stages do when its input
    /// channel is full (always `Wait` for other stages).
    pub when_full: WhenFull,
    /// Its own keys (everything but `type`, `inputs`, `capacity` and a sink's
    /// `when_full`), to tell what a reload changes.
    pub params: Table,
    /// Its config, deserialized by its type.
    pub config: StageConfig,
}

/// A stage's config as its type deserialized it.
#[derive(Debug)]
pub enum StageConfig {
    /// A `[sources.<id>]` table.
    Source(Box<dyn SourceConfig>),
    /// A `[processors.<id>]` table.
    Processor(Box<dyn ProcessorConfig>),
    /// A `[sinks.<id>]` table.
    Sink(Box<dyn SinkConfig>),
}

impl StageConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        match self {
            Self::Source(config) => config.validate(),
            Self::Processor(config) => config.validate(),
            Self::Sink(config) => config.validate(),
        }
    }
}

/// One mistake in a pipeline file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PipelineError {
    /// The file.
    pub file: PathBuf,
    /// The stage, as `sinks.file`, when the mistake is in one.
    pub stage: Option<String>,
    /// The key, when the mistake is in one.
    pub key: Option<String>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for PipelineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", cut(&self.file.display().to_string()))?;
        if let Some(stage) = &self.stage {
            write!(f, ": stage `{}`", cut(stage))?;
        }
        if let Some(key) = &self.key {
            write!(f, ": key `{}`", cut(key))?;
        }
        write!(f, ": {}", cut(&self.message))
    }
}

/// The longest line of an error shown whole, in characters.
const MAX_LINE_CHARS: usize = 240;
/// The most lines of one error shown.
const MAX_LINES: usize = 20;

/// `text` with overlong lines shortened, saying how much was cut, and at
/// most [`MAX_LINES`] lines: an error quotes the bad value (or the file's
/// line), which may be megabytes long. What is cut is the longest quoted
/// part (`"..."` or `` `...` ``), in its middle, so that a message such as
/// `invalid value: string "...", expected one of ...` keeps the whole list
/// it expected; a line with no long quoted part is cut in its middle.
fn cut(text: &str) -> std::borrow::Cow<'_, str> {
    let long = |line: &str| line.len() > MAX_LINE_CHARS && line.chars().count() > MAX_LINE_CHARS;
    if !text.lines().any(long) && text.lines().count() <= MAX_LINES {
        return text.into();
    }
    let mut shown: Vec<String> = text
        .lines()
        .take(MAX_LINES)
        .map(|line| {
            if long(line) {
                shorten(line)
            } else {
                line.to_string()
            }
        })
        .collect();
    let lines = text.lines().count();
    if lines > MAX_LINES {
        shown.push(format!("[... {} more lines cut]", lines - MAX_LINES));
    }
    shown.join("\n").into()
}

/// Quoted parts no longer than this are never cut.
const MAX_QUOTED_CHARS: usize = 60;

/// A line with no long quoted part is cut only beyond this: its length then
/// comes from many short words (a list of the keys a type knows), which are
/// worth reading whole.
const MAX_UNQUOTED_LINE_CHARS: usize = 2000;

/// One overlong line made short: its long quoted parts cut in their middle,
/// longest first, until it fits; then, if it is still far too long, its
/// middle.
fn shorten(line: &str) -> String {
    let mut long: Vec<(usize, usize)> = quoted_ranges(line)
        .into_iter()
        .filter(|(start, end)| line[*start..*end].chars().count() > MAX_QUOTED_CHARS)
        .collect();
    long.sort_by_key(|(start, end)| std::cmp::Reverse(end - start));
    let mut length = line.chars().count();
    let mut chosen = Vec::new();
    for (start, end) in long {
        if length <= MAX_LINE_CHARS {
            break;
        }
        length -= line[start..end].chars().count();
        length += cut_middle(&line[start..end], QUOTED_HEAD, QUOTED_TAIL)
            .chars()
            .count();
        chosen.push((start, end));
    }
    chosen.sort_unstable();
    let mut out = String::new();
    let mut at = 0;
    for (start, end) in chosen {
        out.push_str(&line[at..start]);
        out.push_str(&cut_middle(&line[start..end], QUOTED_HEAD, QUOTED_TAIL));
        at = end;
    }
    out.push_str(&line[at..]);
    if out.chars().count() > MAX_UNQUOTED_LINE_CHARS {
        cut_middle(&out, MAX_LINE_CHARS * 2 / 3, MAX_LINE_CHARS / 4)
    } else {
        out
    }
}

/// What a cut quoted part keeps of its start and its end, in characters.
const QUOTED_HEAD: usize = MAX_QUOTED_CHARS / 2;
const QUOTED_TAIL: usize = MAX_QUOTED_CHARS / 4;

/// The byte ranges inside each `"..."` and `` `...` `` of `line` (quotes
/// excluded); an unclosed quote runs to the end of the line.
fn quoted_ranges(line: &str) -> Vec<(usize, usize)> {
    let mut ranges = Vec::new();
    let mut open: Option<(char, usize)> = None;
    for (at, c) in line.char_indices() {
        match open {
            Some((quote, start)) if c == quote => {
                ranges.push((start, at));
                open = None;
            }
            None if c == '"' || c == '`' => open = Some((c, at + 1)),
            _ => {}
        }
    }
    if let Some((_, start)) = open {
        ranges.push((start, line.len()));
    }
    ranges
}

/// `text` with its middle replaced by a note of how much was cut, keeping
/// `head` characters at the start and `tail` at the end.
fn cut_middle(text: &str, head: usize, tail: usize) -> String {
    let total = text.chars().count();
    if total <= head + tail {
        return text.to_string();
    }
    let start: String = text.chars().take(head).collect();
    let end: String = text.chars().skip(total - tail).collect();
    format!(
        "{start}[... {} characters cut, of {total} ...]{end}",
        total - head - tail
    )
}

/// Every mistake found in one pipeline file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct PipelineErrors(pub Vec<PipelineError>);

impl fmt::Display for PipelineErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

impl Pipeline {
    /// Reads (see [`read_text`]), substitutes, parses and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Self, PipelineErrors> {
        let text = read_text(path).map_err(|err| {
            PipelineErrors(vec![PipelineError {
                file: path.to_path_buf(),
                stage: None,
                key: None,
                message: format!("cannot read: {err}"),
            }])
        })?;
        Self::parse(path, &text, |name| std::env::var(name).ok())
    }

    /// Substitutes, parses and validates `text`, read from `file`.
    pub fn parse(
        file: &Path,
        text: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, PipelineErrors> {
        let mut errors = Errors {
            file: file.to_path_buf(),
            found: Vec::new(),
        };
        let text = crate::env::substitute(text, env).map_err(|err| {
            let (stage, key) = locate(text, err.line);
            errors.single(stage, key, err.to_string())
        })?;
        let document: Document = toml::from_str(&text)
            .map_err(|err| errors.single(None, None, err.to_string().trim_end().to_string()))?;

        let settings = parse_settings(document.settings, &mut errors);
        if !(1..=MAX_CAPACITY).contains(&settings.channel_capacity) {
            errors.push(
                None,
                Some("settings.channel_capacity".into()),
                format!("must be from 1 to {MAX_CAPACITY} batches"),
            );
        }
        if settings.shutdown_timeout.is_zero() {
            // Zero leaves no time to drain: every exit would be a failure.
            errors.push(
                None,
                Some("settings.shutdown_timeout".into()),
                "must be more than 0s: it is the time the pipeline has to drain on shutdown".into(),
            );
        }
        if settings.memory_limit.0 < MIN_MEMORY_LIMIT {
            errors.push(
                None,
                Some("settings.memory_limit".into()),
                format!(
                    "{} bytes is too small: at least {MIN_MEMORY_LIMIT} bytes (\"1MiB\")",
                    settings.memory_limit.0
                ),
            );
        }

        let api = parse_api(document.api, &mut errors);

        let mut stages = Vec::new();
        // Every declared stage takes part in the graph checks, even one whose
        // own keys are wrong, so that one mistake is not also reported as
        // "names no stage" or "nobody reads" elsewhere.
        let mut nodes = Vec::new();
        for (kind, section) in [
            (StageKind::Source, document.sources),
            (StageKind::Processor, document.processors),
            (StageKind::Sink, document.sinks),
        ] {
            for (id, table) in section {
                if let Some((node, stage)) =
                    parse_stage(kind, id, table, settings.channel_capacity, &mut errors)
                {
                    nodes.push(node);
                    stages.extend(stage);
                }
            }
        }
        check_graph(&nodes, &mut errors);
        check_exclusive_files(&stages, &mut errors);
        if errors.found.is_empty() {
            Ok(Self {
                file: file.to_path_buf(),
                settings,
                api,
                stages,
            })
        } else {
            Err(PipelineErrors(errors.found))
        }
    }

    /// The stage named `id`.
    pub fn stage(&self, id: &str) -> Option<&StageSpec> {
        self.stages.iter().find(|stage| stage.id == id)
    }
}

/// Refuses two sinks that claim the same file (see
/// [`SinkConfig::exclusive_files`]), however each spells it.
fn check_exclusive_files(stages: &[StageSpec], errors: &mut Errors) {
    let mut claimed: HashMap<PathBuf, String> = HashMap::new();
    for stage in stages {
        let StageConfig::Sink(config) = &stage.config else {
            continue;
        };
        let name = format!("{}.{}", stage.kind.section(), stage.id);
        for (key, path) in config.exclusive_files() {
            match claimed.entry(resolved(&path)) {
                std::collections::hash_map::Entry::Occupied(first) => errors.push(
                    Some(name.clone()),
                    Some(key.into()),
                    format!(
                        "`{}` is the file `{}` writes too; two sinks cannot share a file",
                        path.display(),
                        first.get()
                    ),
                ),
                std::collections::hash_map::Entry::Vacant(slot) => {
                    slot.insert(name.clone());
                }
            }
        }
    }
}

/// `path` as one spelling of its file: absolute, without `.` and `..`, and
/// through the links of its existing parent directories.
fn resolved(path: &Path) -> PathBuf {
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let mut normal = PathBuf::new();
    for part in absolute.components() {
        match part {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir => {
                normal.pop();
            }
            other => normal.push(other),
        }
    }
    // The file itself may be missing, and a link at its name is its own file
    // to json_file; its directory is resolved where it exists.
    match (normal.parent(), normal.file_name()) {
        (Some(parent), Some(name)) => match parent.canonicalize() {
            Ok(parent) => parent.join(name),
            Err(_) => normal,
        },
        _ => normal,
    }
}

/// The largest pipeline file read, in bytes: far beyond any real pipeline,
/// far below what would strain memory.
pub const MAX_FILE_BYTES: u64 = 16 * 1024 * 1024;

/// Reads the pipeline file at `path` as text, refusing what is not a regular
/// file of at most [`MAX_FILE_BYTES`]. A FIFO would block the read until a
/// writer comes (forever), and `/dev/zero` or a device would be read until
/// memory runs out: the file is opened without blocking (`O_NONBLOCK`, which
/// lets `open` of a FIFO return at once) and checked with `fstat` on the
/// descriptor opened, so a symlink swapped in between cannot slip past.
/// Symlinks are followed (a Kubernetes ConfigMap mount is made of them).
pub fn read_text(path: &Path) -> std::io::Result<String> {
    use std::io::{Error, ErrorKind, Read};
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};

    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    let metadata = file.metadata()?;
    let kind = metadata.file_type();
    if !kind.is_file() {
        let what = if kind.is_dir() {
            "a directory"
        } else if kind.is_fifo() {
            "a FIFO (named pipe)"
        } else if kind.is_char_device() {
            "a character device"
        } else if kind.is_block_device() {
            "a block device"
        } else if kind.is_socket() {
            "a socket"
        } else {
            "not a regular file"
        };
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!("it is {what}; a pipeline file must be a regular file"),
        ));
    }
    let too_big = || {
        Error::new(
            ErrorKind::InvalidData,
            format!("larger than {MAX_FILE_BYTES} bytes (16 MiB); a pipeline file is far smaller"),
        )
    };
    if metadata.len() > MAX_FILE_BYTES {
        return Err(too_big());
    }
    // The cap holds even if the file grows while it is read.
    let mut bytes = Vec::with_capacity(metadata.len() as usize);
    file.take(MAX_FILE_BYTES + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(too_big());
    }
    String::from_utf8(bytes)
        .map_err(|err| Error::new(ErrorKind::InvalidData, format!("not UTF-8 text: {err}")))
}

/// The top level of the file, before each stage is read by its type.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Document {
    #[serde(default)]
    settings: Table,
    #[serde(default)]
    api: Table,
    #[serde(default)]
    sources: Table,
    #[serde(default)]
    processors: Table,
    #[serde(default)]
    sinks: Table,
}

/// Reads `[settings]`, reporting every bad key, not only the first: each key
/// is first read alone (the others at their defaults).
fn parse_settings(table: Table, errors: &mut Errors) -> Settings {
    let before = errors.found.len();
    for (key, value) in &table {
        let alone = Table::from_iter([(key.clone(), value.clone())]);
        deserialize_key::<Settings>(Value::Table(alone), errors, None, "settings.");
    }
    if errors.found.len() > before {
        return Settings::default();
    }
    deserialize_key::<Settings>(Value::Table(table), errors, None, "settings.").unwrap_or_default()
}

/// Reads `[api]`, reporting a bad key or address as `api.<key>`.
fn parse_api(table: Table, errors: &mut Errors) -> crate::api::ApiConfig {
    let config: crate::api::ApiConfig =
        deserialize_key(Value::Table(table), errors, None, "api.").unwrap_or_default();
    if let Err(message) = config.validate() {
        errors.push(None, Some("api.address".into()), message);
    }
    config
}

/// Collects mistakes, each naming the file.
struct Errors {
    file: PathBuf,
    found: Vec<PipelineError>,
}

impl Errors {
    fn push(&mut self, stage: Option<String>, key: Option<String>, message: String) {
        self.found.push(PipelineError {
            file: self.file.clone(),
            stage,
            key,
            message,
        });
    }

    fn single(
        &mut self,
        stage: Option<String>,
        key: Option<String>,
        message: String,
    ) -> PipelineErrors {
        self.push(stage, key, message);
        PipelineErrors(std::mem::take(&mut self.found))
    }
}

/// A stage as the graph checks see it: declared, whether or not its own keys
/// are right.
struct Node {
    id: String,
    kind: StageKind,
    inputs: Vec<String>,
    /// False when `inputs` was malformed (and reported): its emptiness then
    /// says nothing.
    inputs_known: bool,
}

/// The keys of a stage's table that the runtime reads, whatever its type
/// (`when_full` for sinks only: a source type may have its own).
const RUNTIME_KEYS: [&str; 4] = ["type", "inputs", "capacity", "when_full"];

/// Reads one `[<section>.<id>]` table: the runtime's keys (`type`, `inputs`,
/// `capacity`, a sink's `when_full`) here, the rest by the stage's type. Gives the stage's place in
/// the graph whenever it is a table, and the stage itself when all is right.
fn parse_stage(
    kind: StageKind,
    id: String,
    table: Value,
    default_capacity: usize,
    errors: &mut Errors,
) -> Option<(Node, Option<StageSpec>)> {
    let stage = format!("{}.{id}", kind.section());
    let Value::Table(mut params) = table else {
        errors.push(Some(stage), None, "must be a table".into());
        return None;
    };
    let mut node = Node {
        id: id.clone(),
        kind,
        inputs: Vec::new(),
        inputs_known: true,
    };
    if let Some(value) = params.remove("inputs") {
        let inputs = value.as_array().and_then(|items| {
            items
                .iter()
                .map(|item| item.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
        });
        match inputs {
            Some(inputs) => node.inputs = inputs,
            None => {
                node.inputs_known = false;
                errors.push(
                    Some(stage.clone()),
                    Some("inputs".into()),
                    "must be an array of stage ids".into(),
                );
            }
        }
    }
    let inputs = node.inputs.clone();
    let type_name = match params.remove("type") {
        Some(Value::String(name)) => name,
        Some(other) => {
            errors.push(
                Some(stage),
                Some("type".into()),
                format!("must be a string, not {}", other.type_str()),
            );
            return Some((node, None));
        }
        None => {
            let known = known_types(kind);
            errors.push(
                Some(stage),
                Some("type".into()),
                format!("is missing; {known}"),
            );
            return Some((node, None));
        }
    };
    let capacity = match (kind, params.remove("capacity")) {
        (_, None) => default_capacity,
        (StageKind::Source, Some(_)) => {
            errors.push(
                Some(stage.clone()),
                Some("capacity".into()),
                "a source has no input channel to size".into(),
            );
            0
        }
        (_, Some(Value::Integer(n))) if (1..=MAX_CAPACITY as i64).contains(&n) => n as usize,
        (_, Some(other)) => {
            errors.push(
                Some(stage.clone()),
                Some("capacity".into()),
                format!("must be an integer from 1 to {MAX_CAPACITY}, not {other}"),
            );
            default_capacity
        }
    };

    let when_full = match kind {
        StageKind::Sink => match params.remove("when_full") {
            None => WhenFull::Wait,
            Some(Value::String(text)) if text == "wait" => WhenFull::Wait,
            Some(Value::String(text)) if text == "drop" => WhenFull::Drop,
            Some(other) => {
                errors.push(
                    Some(stage.clone()),
                    Some("when_full".into()),
                    format!("must be \"wait\" or \"drop\", not {other}"),
                );
                WhenFull::Wait
            }
        },
        _ => WhenFull::Wait,
    };

    if kind == StageKind::Source {
        check_listen_address(&params, &stage, errors);
    }
    // serde stops at a table's first mistake: each key it refuses is reported
    // and left out, and the rest read again, so that every mistake of the
    // stage is reported at once.
    let mut remaining = params.clone();
    let mut removed: Vec<String> = Vec::new();
    let config = loop {
        let mut tagged = Table::new();
        tagged.insert(type_name.clone(), Value::Table(remaining.clone()));
        let tagged = Value::Table(tagged);
        let read = match kind {
            StageKind::Source => deserialize_stage::<Box<dyn SourceConfig>>(
                tagged, kind, &type_name, &stage, &removed, errors,
            )
            .map(StageConfig::Source),
            StageKind::Processor => deserialize_stage::<Box<dyn ProcessorConfig>>(
                tagged, kind, &type_name, &stage, &removed, errors,
            )
            .map(StageConfig::Processor),
            StageKind::Sink => deserialize_stage::<Box<dyn SinkConfig>>(
                tagged, kind, &type_name, &stage, &removed, errors,
            )
            .map(StageConfig::Sink),
        };
        match read {
            Ok(config) => break removed.is_empty().then_some(config),
            Err(Some(key)) if remaining.remove(&key).is_some() => removed.push(key),
            Err(_) => break None,
        }
    };
    let Some(config) = config else {
        return Some((node, None));
    };
    if let Err(err) = config.validate() {
        errors.push(Some(stage), Some(err.key), err.message);
        return Some((node, None));
    }
    let spec = StageSpec {
        id,
        kind,
        type_name,
        inputs,
        capacity,
        when_full,
        params,
        config,
    };
    Some((node, Some(spec)))
}

/// Deserializes a stage config through typetag, turning serde's messages
/// into ones that name the key and suggest the right one. A mistake is
/// reported, and `Err` names the top-level key to leave out before reading
/// the rest again (`None` when leaving one out cannot help).
fn deserialize_stage<T: DeserializeOwned>(
    tagged: Value,
    kind: StageKind,
    type_name: &str,
    stage: &str,
    removed: &[String],
    errors: &mut Errors,
) -> Result<T, Option<String>> {
    match serde_path_to_error::deserialize::<_, T>(tagged) {
        Ok(config) => Ok(config),
        Err(err) => {
            let message = first_line(&err.inner().to_string());
            // The first path segment is the type name the value was tagged with.
            let path = err.path().to_string();
            let key = path.split_once('.').map(|(_, key)| key.to_string());
            let top = |key: &str| key.split('.').next().map(str::to_string);
            // An unknown variant inside the table (`layout = "lines"`) is a
            // bad value, not an unknown type: only the tag itself has no key.
            if message.starts_with("unknown variant") && key.is_none() {
                let known = known_types(kind);
                let hint = did_you_mean(type_name, &backticked(&message)[1..]);
                errors.push(
                    Some(stage.into()),
                    Some("type".into()),
                    format!("unknown {kind} type `{type_name}`{hint}; {known}. A type from another crate must be linked into the binary: see {LINKING_HELP}"),
                );
                Err(None)
            } else if message.starts_with("unknown field") {
                let words = backticked(&message);
                let field = words.first().cloned().unwrap_or_default();
                let parent = key
                    .as_deref()
                    .and_then(|k| k.rsplit_once('.'))
                    .map(|(parent, _)| parent);
                let mut known = words[1..].to_vec();
                if parent.is_none() {
                    // `input` for `inputs`: the runtime's keys are near misses too.
                    known.extend(RUNTIME_KEYS.map(String::from));
                }
                let hint = did_you_mean(&field, &known);
                let full_key = match parent {
                    Some(parent) => format!("{parent}.{field}"),
                    None => field,
                };
                let retry = top(&full_key);
                errors.push(
                    Some(stage.into()),
                    Some(full_key),
                    format!("{message}{hint}"),
                );
                Err(retry)
            } else if message.starts_with("missing field") {
                let field = backticked(&message).into_iter().next().unwrap_or_default();
                let nested = key.is_some();
                let full_key = match key {
                    Some(parent) => format!("{parent}.{field}"),
                    None => field,
                };
                let retry = nested.then(|| top(&full_key)).flatten();
                // A required key left out for its own mistake was reported.
                if !removed.contains(&full_key) {
                    errors.push(
                        Some(stage.into()),
                        Some(full_key),
                        "is required but missing".into(),
                    );
                }
                // A missing top-level key stays missing: serde reports it
                // only once every key present was read.
                Err(retry)
            } else {
                let retry = key.as_deref().and_then(top);
                let message = friendly(&message, key.as_deref());
                errors.push(Some(stage.into()), key, message);
                Err(retry)
            }
        }
    }
}

/// Deserializes `value`, reporting a failure against `prefix` + its key path.
fn deserialize_key<T: DeserializeOwned>(
    value: Value,
    errors: &mut Errors,
    stage: Option<String>,
    prefix: &str,
) -> Option<T> {
    match serde_path_to_error::deserialize::<_, T>(value) {
        Ok(value) => Some(value),
        Err(err) => {
            let message = first_line(&err.inner().to_string());
            let path = err.path().to_string();
            let key =
                if message.starts_with("unknown field") || message.starts_with("missing field") {
                    backticked(&message).into_iter().next().unwrap_or(path)
                } else {
                    path
                };
            let words = backticked(&message);
            let hint = if message.starts_with("unknown field") {
                did_you_mean(&key, &words[1..])
            } else {
                String::new()
            };
            let message = friendly(&message, Some(&key));
            errors.push(
                stage,
                Some(format!("{prefix}{key}")),
                format!("{message}{hint}"),
            );
            None
        }
    }
}

/// serde's words for a wrong value made a user's: `expected usize` becomes
/// `expected a whole number of readings` (the unit from the key's name).
fn friendly(message: &str, key: Option<&str>) -> String {
    let Some((what, expected)) = message.rsplit_once(", expected ") else {
        return message.to_string();
    };
    let name = key.and_then(|key| key.rsplit('.').next()).unwrap_or("");
    let unit = unit_of(name);
    let expected = match expected {
        "usize" | "u64" | "u32" | "u16" | "u8" | "a nonzero usize" | "a nonzero u64"
        | "a nonzero u32" => format!("a whole number{unit}, without quotes"),
        "i64" | "i32" | "i16" | "i8" => format!("a whole number{unit}, without quotes"),
        "f64" | "f32" => format!("a number{unit}, without quotes"),
        "a boolean" => "true or false, without quotes".into(),
        "a duration" => "a duration in quotes, such as \"500ms\", \"30s\" or \"1m\"".into(),
        "a sequence" => "an array, such as [\"a\", \"b\"]".into(),
        "a map" | "struct" => "a table, such as { key = value }".into(),
        other => other.to_string(),
    };
    format!("{what}, expected {expected}")
}

/// What a number of `key` counts, from its name, as words to follow "a whole
/// number": ` of bytes`, ` of readings`...
fn unit_of(key: &str) -> &'static str {
    match key {
        _ if key.contains("bytes") => " of bytes",
        "max_events" => " of readings",
        _ if key.contains("readings") => " of readings",
        "capacity" | "channel_capacity" => " of batches",
        "max_concurrent_calls" => " of calls",
        "max_connections" => " of connections",
        "max_files" => " of files",
        "max_ack_pending" => " of messages",
        "replicas" => " of replicas",
        _ => "",
    }
}

/// A source's `address`, checked as the listen address it will be, without
/// binding or resolving it: `host:port` (or Go's `:port`) with a port from 0
/// to 65535, so that `localhost` or port 80000 is refused here rather than
/// when the pipeline starts.
fn check_listen_address(params: &Table, stage: &str, errors: &mut Errors) {
    let Some(Value::String(address)) = params.get("address") else {
        return;
    };
    if let Err(message) = listen_address_problem(address) {
        errors.push(Some(stage.into()), Some("address".into()), message);
    }
}

/// Why `address` is not a `host:port` to listen on, if it is not.
fn listen_address_problem(address: &str) -> Result<(), String> {
    let Some((host, port)) = address.rsplit_once(':') else {
        return Err(format!(
            "`{address}` has no port: write `host:port`, such as `127.0.0.1:8000` (`0.0.0.0:8000` for every interface)"
        ));
    };
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "`{address}`: the port `{port}` is not a number (write `host:port`, such as `127.0.0.1:8000`)"
        ));
    }
    match port.parse::<u32>() {
        Ok(port) if port <= 65_535 => {}
        _ => {
            return Err(format!(
                "`{address}`: port {port} is out of range (0 to 65535)"
            ));
        }
    }
    let bracketed = host.starts_with('[') || host.ends_with(']');
    if bracketed {
        let inner = host.trim_start_matches('[').trim_end_matches(']');
        if !(host.starts_with('[') && host.ends_with(']'))
            || inner.parse::<std::net::Ipv6Addr>().is_err()
        {
            return Err(format!(
                "`{address}`: `{host}` is not an IPv6 address in brackets, such as `[::1]`"
            ));
        }
        return Ok(());
    }
    if host.contains(':') {
        return Err(format!(
            "`{address}`: an IPv6 address needs brackets, such as `[::1]:8000`"
        ));
    }
    let name_ok = host.split('.').all(|label| {
        !label.is_empty()
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
    });
    if !host.is_empty() && !name_ok {
        return Err(format!(
            "`{address}`: `{host}` is neither an IP address nor a host name"
        ));
    }
    Ok(())
}

/// The first line of a deserializer's message: the toml crate appends `in
/// `key`` lines (once per nesting level) that the key named in our message
/// already says.
fn first_line(message: &str) -> String {
    message
        .lines()
        .next()
        .unwrap_or_default()
        .trim_end()
        .to_string()
}

/// The stage (`sinks.file`) and key (`path`, or `settings.log_level`) of line
/// `line` (from 1) of a pipeline file, as far as its text tells: the nearest
/// table header above it and the key before its `=`.
fn locate(text: &str, line: usize) -> (Option<String>, Option<String>) {
    let lines: Vec<&str> = text.lines().collect();
    let Some(target) = line.checked_sub(1).and_then(|index| lines.get(index)) else {
        return (None, None);
    };
    let header = lines[..line - 1].iter().rev().find_map(|text| {
        let text = text.trim();
        let inner = text.strip_prefix('[')?.split(']').next()?;
        (!text.starts_with("[[")).then(|| inner.split('.').map(str::trim).collect::<Vec<_>>())
    });
    let (stage, prefix) = match header.as_deref() {
        Some([section, id, rest @ ..]) if ["sources", "processors", "sinks"].contains(section) => (
            Some(format!("{section}.{id}")),
            rest.iter()
                .map(|part| format!("{part}."))
                .collect::<String>(),
        ),
        Some(parts) => (None, parts.iter().map(|part| format!("{part}.")).collect()),
        None => (None, String::new()),
    };
    let key = target
        .split_once('=')
        .map(|(key, _)| key.trim().replace(['"', '\''], ""))
        .filter(|key| {
            !key.is_empty()
                && key
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c))
        })
        .map(|key| format!("{prefix}{key}"));
    (stage, key)
}

/// The words between backticks in a serde message.
fn backticked(message: &str) -> Vec<String> {
    message
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect()
}

/// ` (did you mean `x`?)` when one of `known` is near `word`.
pub(crate) fn did_you_mean(word: &str, known: &[String]) -> String {
    known
        .iter()
        .map(|candidate| (strsim::damerau_levenshtein(word, candidate), candidate))
        .filter(|(distance, candidate)| *distance <= 2.max(candidate.len() / 3))
        .min()
        .map(|(_, candidate)| format!(" (did you mean `{candidate}`?)"))
        .unwrap_or_default()
}

/// The longest piece of a user's word echoed back, in characters.
const MAX_ECHOED_CHARS: usize = 64;

/// `word` as an error may echo it to a terminal: control characters (escape
/// sequences, newlines) written as escapes, and cut after
/// [`MAX_ECHOED_CHARS`] characters, saying how many more there were.
pub(crate) fn echoed(word: &str) -> String {
    let mut shown: String = word
        .chars()
        .take(MAX_ECHOED_CHARS)
        .flat_map(|c| {
            let escaped: Vec<char> = if c.is_control() {
                c.escape_default().collect()
            } else {
                vec![c]
            };
            escaped
        })
        .collect();
    let total = word.chars().count();
    if total > MAX_ECHOED_CHARS {
        shown.push_str(&format!(
            "... ({} more characters)",
            total - MAX_ECHOED_CHARS
        ));
    }
    shown
}

/// "known <kind> types: a, b" for this binary.
fn known_types(kind: StageKind) -> String {
    let names: Vec<&str> = sink_api::registered_stages()
        .filter(|info| info.kind == kind)
        .map(|info| info.name)
        .collect();
    format!("known {kind} types in this binary: {}", names.join(", "))
}

/// The checks across stages: ids unique, inputs that exist and carry data,
/// no cycles, every processor and sink fed, every source and processor read.
fn check_graph(stages: &[Node], errors: &mut Errors) {
    let mut by_id: HashMap<&str, &Node> = HashMap::new();
    let mut duplicates = false;
    for stage in stages {
        if let Some(first) = by_id.insert(&stage.id, stage) {
            duplicates = true;
            errors.push(
                Some(format!("{}.{}", stage.kind.section(), stage.id)),
                None,
                format!(
                    "id `{}` is also used by `{}.{}`; ids must be unique",
                    stage.id,
                    first.kind.section(),
                    first.id
                ),
            );
        }
    }
    if duplicates {
        // Which stage an input names is unknown until the ids are unique:
        // any further finding would be a guess.
        return;
    }
    if !stages.iter().any(|s| s.kind == StageKind::Source) {
        errors.push(
            None,
            Some("sources".into()),
            "no source is declared; nothing would be received".into(),
        );
    }
    if !stages.iter().any(|s| s.kind == StageKind::Sink) {
        errors.push(
            None,
            Some("sinks".into()),
            "no sink is declared; nothing would be written".into(),
        );
    }
    let mut readers: BTreeMap<&str, usize> = BTreeMap::new();
    for stage in stages {
        let name = format!("{}.{}", stage.kind.section(), stage.id);
        match stage.kind {
            StageKind::Source if !stage.inputs.is_empty() => {
                errors.push(
                    Some(name.clone()),
                    Some("inputs".into()),
                    "a source takes no inputs".into(),
                );
            }
            StageKind::Processor | StageKind::Sink
                if stage.inputs.is_empty() && stage.inputs_known =>
            {
                errors.push(
                    Some(name.clone()),
                    Some("inputs".into()),
                    format!(
                        "no stage feeds this {}; name at least one source or processor",
                        stage.kind
                    ),
                );
            }
            _ => {}
        }
        for input in &stage.inputs {
            match by_id.get(input.as_str()) {
                None => {
                    let ids: Vec<String> = by_id.keys().map(|id| id.to_string()).collect();
                    let hint = did_you_mean(input, &ids);
                    errors.push(
                        Some(name.clone()),
                        Some("inputs".into()),
                        format!("`{input}` names no stage{hint}"),
                    );
                }
                Some(upstream) if upstream.kind == StageKind::Sink => {
                    errors.push(
                        Some(name.clone()),
                        Some("inputs".into()),
                        format!("`{input}` is a sink, which has no output"),
                    );
                }
                Some(_) => *readers.entry(input.as_str()).or_default() += 1,
            }
        }
    }
    // A stage whose `inputs` could not be read may be the reader.
    let readers_known = stages.iter().all(|stage| stage.inputs_known);
    for stage in stages.iter().filter(|_| readers_known) {
        if stage.kind != StageKind::Sink && !readers.contains_key(stage.id.as_str()) {
            errors.push(
                Some(format!("{}.{}", stage.kind.section(), stage.id)),
                None,
                format!("no stage reads from this {}; its readings would be dropped (name it in some `inputs`)", stage.kind),
            );
        }
    }
    if let Some(cycle) = find_cycle(stages) {
        let section = by_id
            .get(cycle[0].as_str())
            .map_or("processors", |stage| stage.kind.section());
        errors.push(
            Some(format!("{section}.{}", cycle[0])),
            Some("inputs".into()),
            format!(
                "stages read from each other in a cycle: {}",
                cycle.join(" <- ")
            ),
        );
    }
}

/// A cycle among the stages' inputs, as the ids along it, if there is one.
fn find_cycle(stages: &[Node]) -> Option<Vec<String>> {
    let inputs: HashMap<&str, &[String]> = stages
        .iter()
        .map(|s| (s.id.as_str(), s.inputs.as_slice()))
        .collect();
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Visiting,
        Done,
    }
    fn visit<'a>(
        id: &'a str,
        inputs: &HashMap<&'a str, &'a [String]>,
        marks: &mut HashMap<&'a str, Mark>,
        path: &mut Vec<&'a str>,
    ) -> Option<Vec<String>> {
        match marks.get(id) {
            Some(Mark::Done) => return None,
            Some(Mark::Visiting) => {
                let start = path.iter().position(|p| *p == id).unwrap_or(0);
                let mut cycle: Vec<String> = path[start..].iter().map(|s| s.to_string()).collect();
                cycle.push(id.to_string());
                return Some(cycle);
            }
            None => {}
        }
        marks.insert(id, Mark::Visiting);
        path.push(id);
        for upstream in inputs.get(id).copied().unwrap_or_default() {
            if inputs.contains_key(upstream.as_str())
                && let Some(cycle) = visit(upstream.as_str(), inputs, marks, path)
            {
                return Some(cycle);
            }
        }
        path.pop();
        marks.insert(id, Mark::Done);
        None
    }
    let mut marks = HashMap::new();
    for stage in stages {
        if let Some(cycle) = visit(&stage.id, &inputs, &mut marks, &mut Vec::new()) {
            return Some(cycle);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locate_finds_the_stage_and_key_of_a_line() {
        let text = "[settings]\nlog_level = \"x\"\n\n[sinks.file]\ntype = \"json_file\"\npath = \"${OUT}\"\n\n[sources.s.rate_limit]\nbytes_per_second = 1\n";
        assert_eq!(locate(text, 2), (None, Some("settings.log_level".into())));
        assert_eq!(
            locate(text, 6),
            (Some("sinks.file".into()), Some("path".into()))
        );
        assert_eq!(
            locate(text, 9),
            (
                Some("sources.s".into()),
                Some("rate_limit.bytes_per_second".into())
            )
        );
        assert_eq!(locate(text, 99), (None, None));
    }

    #[test]
    fn the_original_log_levels_are_accepted() {
        let level = |text: &str| {
            toml::from_str::<Settings>(&format!("log_level = \"{text}\""))
                .map(|settings| settings.log_level)
        };
        assert_eq!(level("DEBUG"), Ok(LogLevel::Debug));
        assert_eq!(level("fatal"), Ok(LogLevel::Error));
        assert_eq!(level("warn"), Ok(LogLevel::Warn));
        assert!(level("loud").is_err());
    }

    #[test]
    fn a_long_value_is_cut_saying_how_long_it_was() {
        let value = "x".repeat(10_000_000);
        let error = PipelineError {
            file: "p.toml".into(),
            stage: Some("processors.batch".into()),
            key: Some("max_events".into()),
            message: format!("invalid type: string \"{value}\", expected usize"),
        }
        .to_string();
        assert!(error.len() < 400, "{} bytes", error.len());
        assert!(error.contains("characters cut, of 10000000"), "{error}");
        assert!(error.ends_with("\", expected usize"), "{error}");
        assert_eq!(cut("short\nlines"), "short\nlines");
        let many = "line\n".repeat(1_000);
        assert!(cut(&many).ends_with("[... 980 more lines cut]"));
    }

    #[test]
    fn listen_addresses_are_checked_by_their_form() {
        for good in [
            "127.0.0.1:8000",
            ":8000",
            "0.0.0.0:0",
            "[::1]:65535",
            "localhost:80",
        ] {
            assert_eq!(listen_address_problem(good), Ok(()), "{good}");
        }
        for (bad, says) in [
            ("localhost", "has no port"),
            ("127.0.0.1:65536", "out of range"),
            ("127.0.0.1:", "not a number"),
            ("::1", "needs brackets"),
            ("fe80::1:80", "needs brackets"),
            ("[fe80::zz]:80", "not an IPv6 address"),
            ("a_b:80", "neither an IP address nor a host name"),
        ] {
            let problem = listen_address_problem(bad).expect_err(bad);
            assert!(problem.contains(says), "{bad}: {problem}");
        }
    }

    #[test]
    fn type_errors_speak_of_whole_numbers_and_units() {
        assert_eq!(
            friendly(
                "invalid type: string \"ten\", expected usize",
                Some("max_events")
            ),
            "invalid type: string \"ten\", expected a whole number of readings, without quotes"
        );
        assert_eq!(
            friendly(
                "invalid type: string \"x\", expected u64",
                Some("rate_limit.burst_bytes")
            ),
            "invalid type: string \"x\", expected a whole number of bytes, without quotes"
        );
        assert_eq!(friendly("no comma here", None), "no comma here");
    }

    #[test]
    fn a_long_line_loses_its_long_quoted_value_not_its_list() {
        let list: Vec<String> = (0..40).map(|i| format!("`key_number_{i}`")).collect();
        let line = format!(
            "invalid value: string \"{}\", expected one of {}",
            "v".repeat(5_000),
            list.join(", ")
        );
        let short = shorten(&line);
        assert!(short.contains("characters cut, of 5000"), "{short}");
        assert!(short.ends_with(&list.join(", ")), "{short}");
    }

    #[test]
    fn first_line_drops_the_key_trail() {
        assert_eq!(
            first_line("unknown field `x`\n\n\nin `buffered`\n"),
            "unknown field `x`"
        );
    }
}

//! `json_file`: appends JSON lines to a file, and rotates, retains and
//! compresses it if asked.
//!
//! The write loop is [`super::lines`]; this module says how to open the file
//! ([`open`]), when to rotate it ([`rotate`]), and what happens to rotated
//! files in the background ([`housekeeping`]).

mod housekeeping;
mod open;
mod rotate;

use std::fs::File;
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use sink_api::json::Layout;
use sink_api::metrics::{Counter, Metrics};
use sink_api::{BuildContext, ConfigError, Context, Input, Sink, SinkConfig, StageError};

use self::housekeeping::{Housekeeper, Job};
use self::open::{Opened, identity, open_output};
pub use self::rotate::{Compression, Retain, Rotate};
use self::rotate::{Names, period_end, rename_no_replace};
use super::lines::{LineSinkConfig, target_reopens, write_lines};

/// Appends JSON lines to a file, one write and flush per batch; rotates it
/// on size or time, keeps what `retain` asks and compresses rotated files.
///
/// ```toml
/// [sinks.archive]
/// type = "json_file"
/// inputs = ["batch"]
/// path = "data/telemetry-sink.log.json"
/// rotate = { max_bytes = "100MiB", every = "1h" }
/// retain = { max_files = 48, max_age = "7d" }
/// compression = "zstd"
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct JsonFileConfig {
    /// File to append to, relative to the working directory; missing parent
    /// directories are created. Only a regular file is written to. A reload
    /// moves writing to the new path between two batches, or at once while
    /// writes to the old path fail.
    pub path: PathBuf,
    /// `"value"`: one line per reading; `"batch"`: one line per batch, as the
    /// original Go service wrote.
    #[serde(default)]
    pub layout: Layout,
    /// Also `fdatasync` each write before the sink takes its next batch, so
    /// that what was written survives a power loss, at the cost of a disk
    /// round trip per write. Without it, lines reach the OS per batch and the
    /// disk when the OS flushes them.
    #[serde(default)]
    pub fsync: bool,
    /// Rename the file aside and start a new one on size (`max_bytes`), on
    /// time (`every`), or both. Absent: never rotate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotate: Option<Rotate>,
    /// Which rotated files to keep: at most `max_files`, none older than
    /// `max_age`. Absent: keep them all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retain: Option<Retain>,
    /// Compress rotated files in the background: `"none"`, `"gzip"` or
    /// `"zstd"`. The active file is never compressed.
    #[serde(default)]
    pub compression: Compression,
}

#[sink_api::stage(name = "json_file")]
impl SinkConfig for JsonFileConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.path.as_os_str().is_empty() {
            return Err(ConfigError::new("path", "must name a file"));
        }
        // Said here, so that `sink validate` and a reload refuse it (the
        // reload is then not applied), rather than the stage alone later.
        if let Ok(metadata) = std::fs::metadata(&self.path) {
            open::refuse_unless_regular(&metadata).map_err(|err| {
                ConfigError::new(
                    "path",
                    format!("cannot write to {}: {err}", self.target_name()),
                )
            })?;
        }
        rotate::validate(self.rotate.as_ref(), self.retain.as_ref(), &self.path)
    }

    fn exclusive_files(&self) -> Vec<(&'static str, PathBuf)> {
        vec![("path", self.path.clone())]
    }

    /// Runs while the pipeline is built, before any stage runs: the open
    /// cannot block (see [`open_output`]) and nothing else is waiting.
    fn build(&self, _: &BuildContext) -> Result<Box<dyn Sink>, ConfigError> {
        let file = self.open().map_err(|err| {
            ConfigError::new("path", format!("cannot open {}: {err}", self.target_name()))
        })?;
        Ok(Box::new(JsonFile {
            config: Arc::new(self.clone()),
            file,
        }))
    }
}

/// The file being written, and what rotation needs to know of it.
#[derive(Debug)]
pub(crate) struct ActiveFile {
    file: File,
    /// Its length, kept by the writes (no `stat` per write).
    len: u64,
    /// When what it holds began: the first write into it, or its last
    /// modification if it held something when opened. Decides its period
    /// for rotation on time.
    since: Option<SystemTime>,
    /// The time in the name of the last file this sink rotated, so that
    /// names stay unique and in order.
    last_rotation: Option<SystemTime>,
    /// After a failed rotation, not tried again before this.
    retry_rotation_at: Option<SystemTime>,
    housekeeper: Arc<Housekeeper>,
    metrics: FileMetrics,
}

/// What json_file counts beside the line sinks' metrics; exported once the
/// writer hands the stage's handle over ([`LineSinkConfig::observe`]).
#[derive(Debug, Clone, Default)]
pub(super) struct FileMetrics {
    /// New files opened at the path (ours or another's rotation).
    reopens: Counter,
    rotations: Counter,
    rotation_errors: Counter,
    /// Rotated files removed by `retain`.
    pub(super) retention_removed: Counter,
    /// Rotated files compressed.
    pub(super) compressed: Counter,
    /// Housekeeping steps that failed (to be retried).
    pub(super) housekeeping_errors: Counter,
}

impl FileMetrics {
    fn new(metrics: &Metrics) -> Self {
        Self {
            reopens: target_reopens(metrics),
            rotations: metrics.counter(
                "sink_file_rotations_total",
                "Times the sink rotated its file (rotate.max_bytes or rotate.every)",
            ),
            rotation_errors: metrics.counter(
                "sink_file_rotation_errors_total",
                "Rotations that failed (writing goes on in the active file; retried each second)",
            ),
            retention_removed: metrics.counter(
                "sink_file_retention_removed_total",
                "Rotated files removed by retain (max_files, max_age)",
            ),
            compressed: metrics.counter(
                "sink_file_compressions_total",
                "Rotated files compressed in the background",
            ),
            housekeeping_errors: metrics.counter(
                "sink_file_housekeeping_errors_total",
                "Failed steps of the background housekeeping (list, remove, compress); retried later",
            ),
        }
    }
}

impl ActiveFile {
    fn new(opened: Opened) -> Self {
        let housekeeper = Arc::new(Housekeeper::default());
        housekeeper.set_in_use(opened.file.metadata().ok().as_ref());
        Self {
            file: opened.file,
            len: opened.len,
            since: opened.modified,
            last_rotation: None,
            retry_rotation_at: None,
            metrics: FileMetrics::default(),
            housekeeper,
        }
    }

    /// Writes on in `opened` from now on.
    fn replace(&mut self, opened: Opened) {
        self.housekeeper
            .set_in_use(opened.file.metadata().ok().as_ref());
        self.file = opened.file;
        self.len = opened.len;
        self.since = opened.modified;
        self.metrics.reopens.inc();
    }
}

impl Write for ActiveFile {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        let written = self.file.write(bytes)?;
        if self.len == 0 && written > 0 {
            self.since = Some(SystemTime::now());
        }
        self.len += written as u64;
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

/// A rotation that failed is tried again after this long (not per batch).
const ROTATION_RETRY: Duration = Duration::from_secs(1);

impl JsonFileConfig {
    fn names(&self) -> Option<Names> {
        Names::of(&self.path)
    }

    /// Whether `file` is to be rotated now, and the time its name gets: now
    /// for size, the end of its period for time (so hourly files are named
    /// on the hour even when the first batch of the next hour comes late).
    fn rotation_due(&self, file: &ActiveFile, now: SystemTime) -> Option<SystemTime> {
        let rotate = self.rotate.as_ref()?;
        if file.len == 0 || file.retry_rotation_at.is_some_and(|at| at > now) {
            return None;
        }
        if rotate.max_bytes.is_some_and(|max| file.len >= max.0) {
            return Some(now);
        }
        let end = period_end(file.since?, rotate.every?);
        (end <= now).then_some(end)
    }

    /// Renames the active file aside under a name with `time` (later than
    /// any name before, by a millisecond if need be, and never over an
    /// existing file), opens a new one at the path, and starts the
    /// housekeeping of rotated files.
    fn rotate(&self, file: &mut ActiveFile, time: SystemTime) -> io::Result<PathBuf> {
        let names = self
            .names()
            .ok_or_else(|| io::Error::other("the file name cannot be rotated"))?;
        if self.fsync {
            file.file.sync_data()?;
        }
        let mut time = match file.last_rotation {
            Some(last) if last >= time => last + Duration::from_millis(1),
            _ => time,
        };
        let rotated = loop {
            let rotated = names.rotated(time);
            match rename_no_replace(&self.path, &rotated) {
                Ok(()) => break rotated,
                Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {
                    time += Duration::from_millis(1);
                }
                Err(err) => return Err(err),
            }
        };
        file.last_rotation = Some(time);
        match open_output(&self.path) {
            Ok(opened) => file.replace(opened),
            Err(err) => {
                // Put the file back and write on in it: a reading is never
                // held up by housekeeping.
                rename_no_replace(&rotated, &self.path).ok();
                return Err(err);
            }
        }
        self.housekeep(file);
        Ok(rotated)
    }

    fn housekeep(&self, file: &ActiveFile) {
        if let Some(names) = self.names() {
            file.housekeeper.request(Job {
                names,
                compression: self.compression,
                retain: self.retain.clone(),
                metrics: file.metrics.clone(),
            });
        }
    }

    /// Reopens the path if what it names is no longer the open file (a log
    /// rotator renamed or deleted it); says whether it did.
    fn follow_outside_rotation(&self, file: &mut ActiveFile) -> io::Result<bool> {
        let open = file.file.metadata()?;
        let at_path = match std::fs::metadata(&self.path) {
            Ok(at_path) => Some(at_path),
            Err(err) if err.kind() == io::ErrorKind::NotFound => None,
            Err(err) => return Err(err),
        };
        if at_path.is_some_and(|m| identity(&m) == identity(&open)) {
            return Ok(false);
        }
        file.replace(open_output(&self.path)?);
        Ok(true)
    }

    fn rotates_or_keeps(&self) -> bool {
        self.rotate.is_some() || self.retain.is_some() || self.compression != Compression::None
    }
}

impl LineSinkConfig for JsonFileConfig {
    type Target = ActiveFile;

    fn layout(&self) -> Layout {
        self.layout
    }

    fn open(&self) -> io::Result<ActiveFile> {
        open_output(&self.path).map(ActiveFile::new)
    }

    fn moves_target(&self, old: &Self) -> bool {
        self.path != old.path
    }

    fn target_name(&self) -> String {
        format!("`{}`", self.path.display())
    }

    fn follow(&self, file: &mut ActiveFile) -> io::Result<()> {
        if self.follow_outside_rotation(file)? {
            tracing::info!(
                "{} was moved or deleted while a write was failing; the rest of the write goes to a new file there",
                self.target_name()
            );
        }
        Ok(())
    }

    /// Follows logrotate-style rotation (rename or delete, then a new file at
    /// the path) with two `stat` calls per write, and no signal needed; then
    /// rotates by itself if due. A failed rotation logs a WARN and writing
    /// goes on in the active file.
    fn prepare(&self, file: &mut ActiveFile) -> io::Result<()> {
        if self.follow_outside_rotation(file)? {
            tracing::info!(
                "{} was moved or deleted (rotated?); writing to a new file there",
                self.target_name()
            );
        }
        let now = SystemTime::now();
        if let Some(time) = self.rotation_due(file, now) {
            match self.rotate(file, time) {
                Ok(rotated) => {
                    file.retry_rotation_at = None;
                    file.metrics.rotations.inc();
                    tracing::debug!("rotated {} to `{}`", self.target_name(), rotated.display());
                }
                Err(err) => {
                    file.metrics.rotation_errors.inc();
                    if file.retry_rotation_at.is_none() {
                        tracing::warn!(
                            "cannot rotate {}: {err}; writing on in it, trying again each second",
                            self.target_name()
                        );
                    }
                    file.retry_rotation_at = Some(now + ROTATION_RETRY);
                }
            }
        }
        if file.housekeeper.next_due().is_some_and(|due| due <= now) {
            self.housekeep(file);
        }
        Ok(())
    }

    fn observe(&self, file: &mut ActiveFile, metrics: &Metrics) {
        file.metrics = FileMetrics::new(metrics);
    }

    fn room(&self, file: &ActiveFile) -> usize {
        match self.rotate.as_ref().and_then(|r| r.max_bytes) {
            // Full: the write goes to a new file, which has all the room.
            Some(max) if file.len >= max.0 => usize::try_from(max.0).unwrap_or(usize::MAX),
            Some(max) => usize::try_from(max.0 - file.len).unwrap_or(usize::MAX),
            None => usize::MAX,
        }
    }

    fn cut_back(&self, file: &mut ActiveFile, partial: u64) -> io::Result<()> {
        file.len = open::cut_back(&file.file, partial)?;
        Ok(())
    }

    fn sync(&self, file: &mut ActiveFile) -> io::Result<()> {
        if self.fsync {
            file.file.sync_data()
        } else {
            Ok(())
        }
    }

    fn wake_at(&self, file: &ActiveFile) -> Option<SystemTime> {
        let period = self
            .rotate
            .as_ref()
            .and_then(|r| Some(period_end(file.since?, r.every?)))
            .filter(|_| file.len > 0)
            .map(|end| end.max(file.retry_rotation_at.unwrap_or(end)));
        let housekeeping = file.housekeeper.next_due();
        match (period, housekeeping) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// At start and on every reload that keeps the path: a housekeeping pass
    /// finishes what a crash interrupted and applies new `retain` and
    /// `compression` values.
    fn applied(&self, file: &mut ActiveFile) {
        if self.rotates_or_keeps() {
            self.housekeep(file);
        }
    }
}

struct JsonFile {
    config: Arc<JsonFileConfig>,
    file: ActiveFile,
}

#[async_trait]
impl Sink for JsonFile {
    async fn run(self: Box<Self>, input: Input, cx: Context) -> Result<(), StageError> {
        write_lines(self.config, self.file, input, cx).await
    }
}

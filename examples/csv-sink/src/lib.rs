//! # sink-example-csv: a custom sink, `csv_file`
//!
//! Appends one CSV row per reading to a file, under a header line. It shows
//! what a sink adds to a processor: opening its file in `build`, so that a bad
//! path is reported before the pipeline starts; writing each batch off the
//! async threads and flushing it; and a live key (`path`) that moves writing to
//! another file between two batches. Its unit tests run the test kit's
//! conformance check on a real file.
//!
//! It is kept short for the walkthrough: a write that fails (a full disk)
//! ends the stage with an error naming the file, which stops the pipeline.
//! The built-in `json_file` retries the rest of the batch with backoff
//! instead ([`sink_api::backoff`]); a sink meant for production should too.
//!
//! ```toml
//! [sinks.table]
//! type = "csv_file"
//! inputs = ["sensors"]
//! path = "readings.csv"
//! ```

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sink_api::{
    BuildContext, ConfigError, Context, Input, Reading, Sink, SinkConfig, StageError, async_trait,
};
use tokio::io::AsyncWriteExt;

/// Appends one CSV row per reading to a file:
/// `sensor_name,labels,sensor_value,created_at,received_at`.
///
/// ```
/// use sink_api::SinkConfig;
/// use sink_example_csv::CsvFileConfig;
///
/// let nowhere = CsvFileConfig { path: "".into() };
/// assert_eq!(nowhere.validate().map_err(|err| err.key), Err("path".into()));
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CsvFileConfig {
    /// File to append to, relative to the working directory; missing parent
    /// directories are created, and the header line is written when the file
    /// is empty. A reload moves writing to the new path from the next batch on.
    pub path: PathBuf,
}

/// The first line of every file `csv_file` starts.
pub const HEADER: &str = "sensor_name,labels,sensor_value,created_at,received_at\n";

#[sink_api::stage(name = "csv_file")]
impl SinkConfig for CsvFileConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.path.as_os_str().is_empty() {
            return Err(ConfigError::new("path", "must name a file"));
        }
        Ok(())
    }

    fn build(&self, _: &BuildContext) -> Result<Box<dyn Sink>, ConfigError> {
        let file = open(&self.path).map_err(|err| {
            ConfigError::new(
                "path",
                format!("cannot open `{}`: {err}", self.path.display()),
            )
        })?;
        Ok(Box::new(CsvFile {
            config: Arc::new(self.clone()),
            file,
        }))
    }
}

/// Opens `path` for appending, creating it and its directories as needed, and
/// writes the header only into an empty file, so that appending to an earlier
/// run's file does not repeat it.
fn open(path: &Path) -> io::Result<File> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    let mut file = OpenOptions::new().create(true).append(true).open(path)?;
    if file.metadata()?.len() == 0 {
        file.write_all(HEADER.as_bytes())?;
    }
    Ok(file)
}

/// The running `csv_file`: the config in force and its open file.
struct CsvFile {
    config: Arc<CsvFileConfig>,
    file: File,
}

#[async_trait]
impl Sink for CsvFile {
    async fn run(self: Box<Self>, mut input: Input, cx: Context) -> Result<(), StageError> {
        let mut config = self.config;
        // tokio's file does its blocking writes on tokio's blocking threads.
        let mut file = tokio::fs::File::from_std(self.file);
        let mut params = cx.params::<CsvFileConfig>();
        let mut rows = Vec::new();
        while let Some(batch) = input.recv().await {
            if let Some(new) = params.try_changed() {
                if new.path == config.path {
                    config = new;
                } else {
                    let path = new.path.clone();
                    match tokio::task::spawn_blocking(move || open(&path)).await? {
                        Ok(opened) => {
                            file = tokio::fs::File::from_std(opened);
                            config = new;
                        }
                        // A bad path in a reload must not stop the pipeline:
                        // keep writing to the old file, and say so.
                        Err(err) => tracing::warn!(
                            stage = cx.id(),
                            "cannot open `{}`: {err}; still writing to `{}`",
                            new.path.display(),
                            config.path.display()
                        ),
                    }
                }
            }
            rows.clear();
            for reading in &batch {
                encode_row(reading, &mut rows);
            }
            // Written and flushed per batch: what was taken is on disk before
            // the next batch is read.
            let written = match file.write_all(&rows).await {
                Ok(()) => file.flush().await,
                Err(err) => Err(err),
            };
            written.map_err(|err| format!("cannot write `{}`: {err}", config.path.display()))?;
        }
        Ok(())
    }
}

/// Appends `reading` to `out` as one CSV row (RFC 4180, `\n`-terminated): a
/// missing value or creation time is an empty field, timestamps are RFC 3339,
/// labels are a JSON object (empty when there are none), a float keeps its
/// `.` or exponent, and a field holding a comma, a quote or a line break is
/// quoted.
///
/// ```
/// use sink_api::{Labels, Reading, Timestamp, Value};
/// let reading = Reading {
///     sensor_name: "hall, north".into(),
///     labels: Labels::from_iter([("site", "a")]),
///     value: Some(Value::Float(21.0)),
///     created_at: None,
///     received_at: Timestamp::new(1_795_860_000, 0).unwrap(),
/// };
/// let mut out = Vec::new();
/// sink_example_csv::encode_row(&reading, &mut out);
/// assert_eq!(out, b"\"hall, north\",\"{\"\"site\"\":\"\"a\"\"}\",21.0,,2026-11-28T10:00:00Z\n");
/// ```
pub fn encode_row(reading: &Reading, out: &mut Vec<u8>) {
    push_field(&reading.sensor_name, out);
    out.push(b',');
    if !reading.labels.is_empty() {
        // Serializing strings to a String cannot fail.
        push_field(
            &serde_json::to_string(&reading.labels).unwrap_or_default(),
            out,
        );
    }
    out.push(b',');
    if let Some(value) = reading.value {
        out.extend_from_slice(value.to_string().as_bytes());
    }
    out.push(b',');
    if let Some(created_at) = reading.created_at {
        created_at.write_rfc3339(out);
    }
    out.push(b',');
    reading.received_at.write_rfc3339(out);
    out.push(b'\n');
}

/// Appends `text` as one CSV field, quoted when it holds a comma, a quote or
/// a line break.
fn push_field(text: &str, out: &mut Vec<u8>) {
    if text.contains([',', '"', '\n', '\r']) {
        out.push(b'"');
        out.extend_from_slice(text.replace('"', "\"\"").as_bytes());
        out.push(b'"');
    } else {
        out.extend_from_slice(text.as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use sink_api::Timestamp;
    use sink_api::testkit::{Harness, check_sink_with, readings};

    use super::*;

    fn config(path: &Path) -> CsvFileConfig {
        CsvFileConfig { path: path.into() }
    }

    /// The file's lines, which must start with exactly one header.
    fn rows(path: &Path) -> Vec<String> {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let mut lines = text.lines().map(String::from);
        assert_eq!(lines.next().as_deref(), Some(HEADER.trim_end()), "header");
        let rows: Vec<String> = lines.collect();
        assert!(
            !rows.contains(&HEADER.trim_end().to_string()),
            "header repeated"
        );
        rows
    }

    /// The first field of each row: the sensor name, for unquoted names.
    fn names(path: &Path) -> Vec<String> {
        rows(path)
            .iter()
            .map(|row| row.split(',').next().unwrap_or_default().to_string())
            .collect()
    }

    /// Waits, at most five seconds, until the file at `path` holds `count` rows.
    async fn wait_for_rows(path: &Path, count: usize) {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            if text.lines().count() > count {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{count} rows not written"
            );
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    async fn write_through_harness(config: CsvFileConfig, batches: &[&str]) {
        let stage = Harness::sink(config).expect("builds");
        for prefix in batches {
            stage.send(readings(prefix, 0..2)).await;
        }
        stage.finish().await.expect("ends cleanly");
    }

    #[tokio::test]
    async fn conforms_to_the_stage_contract() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("nested/out.csv");
        // Each reading sent is one whole row, in the order sent.
        let expected = |sent: &[Reading]| -> Vec<String> {
            sent.iter()
                .map(|reading| {
                    let mut row = Vec::new();
                    encode_row(reading, &mut row);
                    String::from_utf8_lossy(&row).trim_end().to_string()
                })
                .collect()
        };
        check_sink_with(config(&path), expected, || rows(&path)).await;
    }

    #[tokio::test]
    async fn appending_to_a_file_does_not_repeat_the_header() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("out.csv");
        write_through_harness(config(&path), &["first"]).await;
        write_through_harness(config(&path), &["second"]).await;
        assert_eq!(names(&path), ["first0", "first1", "second0", "second1"]);
    }

    #[tokio::test]
    async fn rows_quote_names_and_leave_missing_fields_empty() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("out.csv");
        let at = |seconds| Timestamp::new(seconds, 0).expect("in range");
        let reading = |name: &str, value: Option<i64>, created_at| Reading {
            sensor_name: name.into(),
            labels: sink_api::Labels::new(),
            value: value.map(sink_api::Value::Int),
            created_at,
            received_at: at(1_795_860_001),
        };
        let stage = Harness::sink(config(&path)).expect("builds");
        stage
            .send(vec![
                reading("plain", Some(-42), Some(at(1_795_860_000))),
                reading("say \"hi\"", None, None),
                reading("two\nlines", Some(0), None),
            ])
            .await;
        stage.finish().await.expect("ends cleanly");
        assert_eq!(
            std::fs::read_to_string(&path).expect("written"),
            format!(
                "{HEADER}\
                 plain,,-42,2026-11-28T10:00:00Z,2026-11-28T10:00:01Z\n\
                 \"say \"\"hi\"\"\",,,,2026-11-28T10:00:01Z\n\
                 \"two\nlines\",,0,,2026-11-28T10:00:01Z\n"
            )
        );
    }

    #[tokio::test]
    async fn a_new_path_applies_from_the_next_batch() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (old, new) = (dir.path().join("old.csv"), dir.path().join("new.csv"));
        let stage = Harness::sink(config(&old)).expect("builds");
        stage.send(readings("a", 0..2)).await;
        // A config applies from the next batch the stage takes; wait until it
        // has taken this one, or the new path could apply to it already.
        wait_for_rows(&old, 2).await;
        stage.update(config(&new));
        stage.send(readings("b", 0..2)).await;
        stage.finish().await.expect("ends cleanly");
        assert_eq!(names(&old), ["a0", "a1"]);
        assert_eq!(names(&new), ["b0", "b1"]);
    }

    #[tokio::test]
    async fn a_reload_to_a_path_that_cannot_open_keeps_the_old_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("out.csv");
        let stage = Harness::sink(config(&path)).expect("builds");
        // A directory cannot be opened as a file.
        stage.update(config(dir.path()));
        stage.send(readings("kept", 0..2)).await;
        stage.finish().await.expect("ends cleanly");
        assert_eq!(names(&path), ["kept0", "kept1"]);
    }

    #[test]
    fn a_path_that_cannot_open_fails_the_build_on_its_key() {
        let dir = tempfile::tempdir().expect("temp dir");
        let err = config(dir.path())
            .build(&BuildContext::new("table"))
            .err()
            .expect("a directory is not a file");
        assert_eq!(err.key, "path");
        assert!(err.message.contains("cannot open"), "{err}");
        assert_eq!(
            config(Path::new("")).validate().map_err(|e| e.key),
            Err("path".into())
        );
    }
}

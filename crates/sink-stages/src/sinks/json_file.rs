//! `json_file`: appends JSON lines to a file.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use sink_api::json::Layout;
use sink_api::{BuildContext, ConfigError, Context, Input, Sink, SinkConfig, StageError};

use super::lines::{LineSinkConfig, write_lines};

/// Appends JSON lines to a file, one write and flush per batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct JsonFileConfig {
    /// File to append to, relative to the working directory; missing parent
    /// directories are created. A reload moves writing to the new path between
    /// two batches.
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
}

#[typetag::serde(name = "json_file")]
impl SinkConfig for JsonFileConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.path.as_os_str().is_empty() {
            return Err(ConfigError::new("path", "must name a file"));
        }
        Ok(())
    }

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

sink_api::register_stage!(sink "json_file" => JsonFileConfig);

impl LineSinkConfig for JsonFileConfig {
    type Target = File;

    fn layout(&self) -> Layout {
        self.layout
    }

    fn open(&self) -> io::Result<File> {
        if let Some(parent) = self.path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)?;
        }
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
    }

    fn moves_target(&self, old: &Self) -> bool {
        self.path != old.path
    }

    fn target_name(&self) -> String {
        format!("`{}`", self.path.display())
    }

    /// Follows logrotate-style rotation (rename or delete, then a new file at
    /// the path) with two `stat` calls per write, and no signal needed.
    /// `copytruncate` rotation needs nothing: the file is opened to append.
    fn sync(&self, file: &mut File) -> io::Result<()> {
        if self.fsync { file.sync_data() } else { Ok(()) }
    }

    fn reopen_if_moved(&self, file: &mut File) -> io::Result<bool> {
        let open = file.metadata()?;
        let at_path = match std::fs::metadata(&self.path) {
            Ok(at_path) => Some(at_path),
            Err(err) if err.kind() == io::ErrorKind::NotFound => None,
            Err(err) => return Err(err),
        };
        if at_path.is_some_and(|m| (m.dev(), m.ino()) == (open.dev(), open.ino())) {
            return Ok(false);
        }
        *file = self.open()?;
        Ok(true)
    }
}

struct JsonFile {
    config: Arc<JsonFileConfig>,
    file: File,
}

#[async_trait]
impl Sink for JsonFile {
    async fn run(self: Box<Self>, input: Input, cx: Context) -> Result<(), StageError> {
        write_lines(self.config, self.file, input, cx).await
    }
}

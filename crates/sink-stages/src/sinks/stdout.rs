//! `stdout`: writes JSON lines to standard output (logs go to stderr).

use std::io::{self, Stdout};
use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use sink_api::json::Layout;
use sink_api::{BuildContext, ConfigError, Context, Input, Sink, SinkConfig, StageError};

use super::lines::{LineSinkConfig, write_lines};

/// Writes JSON lines to standard output, one write and flush per batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StdoutConfig {
    /// `"value"`: one line per reading; `"batch"`: one line per batch, as the
    /// original Go service wrote.
    #[serde(default)]
    pub layout: Layout,
}

#[sink_api::stage(name = "stdout")]
impl SinkConfig for StdoutConfig {
    fn build(&self, _: &BuildContext) -> Result<Box<dyn Sink>, ConfigError> {
        Ok(Box::new(StdoutSink {
            config: Arc::new(self.clone()),
        }))
    }
}

impl LineSinkConfig for StdoutConfig {
    type Target = Stdout;

    fn layout(&self) -> Layout {
        self.layout
    }

    fn open(&self) -> io::Result<Stdout> {
        Ok(io::stdout())
    }

    fn moves_target(&self, _old: &Self) -> bool {
        false
    }

    fn target_name(&self) -> String {
        "standard output".into()
    }
}

struct StdoutSink {
    config: Arc<StdoutConfig>,
}

#[async_trait]
impl Sink for StdoutSink {
    async fn run(self: Box<Self>, input: Input, cx: Context) -> Result<(), StageError> {
        write_lines(self.config, io::stdout(), input, cx).await
    }
}

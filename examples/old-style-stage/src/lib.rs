//! # sink-example-old-style: the compatibility test of the stage API
//!
//! **Intentionally old-fashioned: do not modernise this file.** It is a stage
//! crate written against the first stage API, as its README taught: each type
//! registered twice (`#[typetag::serde]` and `register_stage!`), a
//! hand-written processor loop with `cx.params::<C>()`, and the test kit's
//! first checks (`check_processor` by name, `check_sink` by name). That it
//! still builds, and its tests pass unchanged, is what keeps older stage
//! crates compiling. New crates use `#[sink_api::stage]` and
//! `sink_api::map_processor` (see `examples/scale-processor`).

use std::io::Write;
use std::path::PathBuf;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use sink_api::{
    BuildContext, ConfigError, Context, Input, Output, Processor, ProcessorConfig, Sink,
    SinkConfig, StageError,
};

/// Keeps readings whose value is at least `min`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AtLeastConfig {
    /// The smallest value kept.
    pub min: i64,
}

#[typetag::serde(name = "old_style_at_least")]
impl ProcessorConfig for AtLeastConfig {
    fn build(&self, _: &BuildContext) -> Result<Box<dyn Processor>, ConfigError> {
        Ok(Box::new(AtLeast { min: self.min }))
    }
}

sink_api::register_stage!(processor "old_style_at_least" => AtLeastConfig);

struct AtLeast {
    min: i64,
}

#[async_trait]
impl Processor for AtLeast {
    async fn run(
        self: Box<Self>,
        mut input: Input,
        output: Output,
        cx: Context,
    ) -> Result<(), StageError> {
        let mut min = self.min;
        let mut params = cx.params::<AtLeastConfig>();
        while let Some(mut batch) = input.recv().await {
            if let Some(new) = params.try_changed() {
                min = new.min;
            }
            batch.retain(|reading| {
                reading
                    .value
                    .is_some_and(|value| value.as_f64() >= min as f64)
            });
            if !batch.is_empty() {
                output.send(batch).await?;
            }
        }
        Ok(())
    }
}

/// Appends each reading's sensor name to a file, one per line.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NamesConfig {
    /// The file.
    #[schemars(extend("x-restart" = true))]
    pub path: PathBuf,
}

#[typetag::serde(name = "old_style_names")]
impl SinkConfig for NamesConfig {
    fn build(&self, _: &BuildContext) -> Result<Box<dyn Sink>, ConfigError> {
        Ok(Box::new(Names {
            path: self.path.clone(),
        }))
    }
}

sink_api::register_stage!(sink "old_style_names" => NamesConfig);

struct Names {
    path: PathBuf,
}

#[async_trait]
impl Sink for Names {
    async fn run(self: Box<Self>, mut input: Input, _cx: Context) -> Result<(), StageError> {
        while let Some(batch) = input.recv().await {
            let path = self.path.clone();
            tokio::task::spawn_blocking(move || {
                let mut file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)?;
                for reading in &batch {
                    writeln!(file, "{}", reading.sensor_name)?;
                }
                std::io::Result::Ok(())
            })
            .await??;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use sink_api::testkit::{Harness, check_processor, check_sink, readings};

    use super::*;

    #[tokio::test]
    async fn processor_conforms() {
        check_processor(AtLeastConfig { min: 500 }, |r| {
            r.value.is_some_and(|v| v.as_f64() >= 500.0)
        })
        .await;
    }

    #[tokio::test]
    async fn processor_applies_a_reload() {
        const WAIT: Duration = Duration::from_secs(5);
        let mut stage = Harness::processor(AtLeastConfig { min: 0 }).expect("builds");
        stage.send(readings("a", 0..3)).await;
        assert_eq!(stage.next_batch(WAIT).await.expect("a batch").len(), 3);
        let version = stage.update(AtLeastConfig { min: 2 });
        stage.send(readings("b", 0..3)).await;
        assert_eq!(stage.next_batch(WAIT).await.expect("a batch").len(), 1);
        assert!(stage.applied(version, WAIT).await);
        assert!(stage.finish().await.expect("ends").is_empty());
    }

    #[tokio::test]
    async fn sink_conforms() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("names.txt");
        let written = || {
            std::fs::read_to_string(&path)
                .unwrap_or_default()
                .lines()
                .map(String::from)
                .collect()
        };
        check_sink(NamesConfig { path: path.clone() }, written).await;
    }
}

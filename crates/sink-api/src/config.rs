//! What a stage type implements to be named in `pipeline.toml`.

use std::any::Any;
use std::fmt::Debug;

use async_trait::async_trait;

use crate::{Context, Input, Output};

/// A mistake in one key of a stage's configuration, found while validating or
/// building it. The runtime adds the file and the stage id to the message.
///
/// ```
/// use sink_api::ConfigError;
/// let err = ConfigError::new("max_events", "must be at least 1");
/// assert_eq!(err.to_string(), "key `max_events`: must be at least 1");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("key `{key}`: {message}")]
pub struct ConfigError {
    /// The key at fault, as written in the file (`rate_limit.burst_bytes` for a nested one).
    pub key: String,
    /// What is wrong with its value, and what would be right.
    pub message: String,
}

impl ConfigError {
    /// A mistake in `key`, explained by `message`.
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            message: message.into(),
        }
    }
}

/// Why a running stage stopped before its input ended.
pub type StageError = Box<dyn std::error::Error + Send + Sync>;

/// Turns a boxed config into `Any`, so that the runtime can hand a stage its new
/// parameters as the stage's own config type. Implemented for every type.
pub trait IntoAny: Any + Send + Sync {
    /// `self` as a boxed `Any`.
    fn into_any(self: Box<Self>) -> Box<dyn Any + Send + Sync>;
}

impl<T: Any + Send + Sync> IntoAny for T {
    fn into_any(self: Box<Self>) -> Box<dyn Any + Send + Sync> {
        self
    }
}

/// The `[sources.<id>]` table of a source type. Register an implementation with
/// `#[typetag::serde(name = "...")]` and [`register_stage!`](crate::register_stage).
///
/// A source produces batches and stops when shutdown starts; the runtime never
/// gives it an input.
///
/// ```
/// use async_trait::async_trait;
/// use serde::{Deserialize, Serialize};
/// use sink_api::{BuildContext, ConfigError, Context, Output, Source, SourceConfig, StageError};
///
/// /// Emits nothing; shows the shape of a source.
/// #[derive(Debug, Serialize, Deserialize, schemars::JsonSchema)]
/// #[serde(deny_unknown_fields)]
/// struct Silent {}
///
/// #[typetag::serde(name = "silent")]
/// impl SourceConfig for Silent {
///     fn build(&self, _: &BuildContext) -> Result<Box<dyn Source>, ConfigError> {
///         Ok(Box::new(SilentSource))
///     }
/// }
/// sink_api::register_stage!(source "silent" => Silent);
///
/// struct SilentSource;
///
/// #[async_trait]
/// impl Source for SilentSource {
///     async fn run(self: Box<Self>, _output: Output, cx: Context) -> Result<(), StageError> {
///         cx.shutdown().wait().await;
///         Ok(())
///     }
/// }
/// ```
#[typetag::serde]
pub trait SourceConfig: IntoAny + Debug {
    /// Checks values beyond their types (ranges, consistency). Runs at startup
    /// and on every reload, before anything is applied.
    fn validate(&self) -> Result<(), ConfigError> {
        Ok(())
    }

    /// Builds the running source: bind sockets and open files here, so that a
    /// failure is reported before the pipeline starts.
    fn build(&self, cx: &BuildContext) -> Result<Box<dyn Source>, ConfigError>;
}

/// The `[processors.<id>]` table of a processor type. See [`SourceConfig`] for
/// how to register one; [`Processor`] shows a whole processor.
#[typetag::serde]
pub trait ProcessorConfig: IntoAny + Debug {
    /// Checks values beyond their types; runs at startup and on every reload.
    fn validate(&self) -> Result<(), ConfigError> {
        Ok(())
    }

    /// Builds the running processor.
    fn build(&self, cx: &BuildContext) -> Result<Box<dyn Processor>, ConfigError>;
}

/// The `[sinks.<id>]` table of a sink type. See [`SourceConfig`] for how to
/// register one; [`Sink`] shows a whole sink.
#[typetag::serde]
pub trait SinkConfig: IntoAny + Debug {
    /// Checks values beyond their types; runs at startup and on every reload.
    fn validate(&self) -> Result<(), ConfigError> {
        Ok(())
    }

    /// Builds the running sink: open its file or connection here.
    fn build(&self, cx: &BuildContext) -> Result<Box<dyn Sink>, ConfigError>;

    /// The files this sink writes that no other sink of the pipeline may
    /// write, each with the key that names it. The runtime refuses two sinks
    /// whose files resolve to the same one (`x.json` and `./x.json`), at
    /// startup and on reload: their writes, rotations and retention would
    /// tread on each other. None by default.
    fn exclusive_files(&self) -> Vec<(&'static str, std::path::PathBuf)> {
        Vec::new()
    }
}

/// What the runtime tells a config while building its stage.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct BuildContext {
    /// The stage's id, the `<id>` of its `[sinks.<id>]` table.
    pub id: String,
}

impl BuildContext {
    /// The context for building the stage named `id`.
    pub fn new(id: impl Into<String>) -> Self {
        Self { id: id.into() }
    }
}

/// A running source: an async task that owns its state and sends batches to
/// `output` until shutdown starts. Returning drops `output`, which tells the
/// stages downstream that no more batches will come.
#[async_trait]
pub trait Source: Send {
    /// Runs until `cx.shutdown()` fires and work in flight is handed on.
    async fn run(self: Box<Self>, output: Output, cx: Context) -> Result<(), StageError>;
}

/// A running processor: reads batches from `input`, sends batches to `output`,
/// and returns once `input` ends, having sent everything it held.
///
/// ```
/// use async_trait::async_trait;
/// use sink_api::{Context, Input, Output, Processor, StageError};
///
/// /// Drops readings that carry no value.
/// struct DropEmpty;
///
/// #[async_trait]
/// impl Processor for DropEmpty {
///     async fn run(self: Box<Self>, mut input: Input, output: Output, _cx: Context) -> Result<(), StageError> {
///         while let Some(mut batch) = input.recv().await {
///             batch.retain(|reading| reading.value.is_some());
///             if !batch.is_empty() {
///                 output.send(batch).await?;
///             }
///         }
///         Ok(())
///     }
/// }
/// ```
#[async_trait]
pub trait Processor: Send {
    /// Runs until `input` ends; everything received must be sent on (or
    /// deliberately dropped) before returning.
    async fn run(
        self: Box<Self>,
        input: Input,
        output: Output,
        cx: Context,
    ) -> Result<(), StageError>;
}

/// A running sink: writes every batch from `input` somewhere, and returns once
/// `input` ends and all is written and flushed.
///
/// ```
/// use async_trait::async_trait;
/// use sink_api::{Context, Input, Sink, StageError};
///
/// /// Counts readings and forgets them.
/// struct Counter;
///
/// #[async_trait]
/// impl Sink for Counter {
///     async fn run(self: Box<Self>, mut input: Input, _cx: Context) -> Result<(), StageError> {
///         let mut count = 0;
///         while let Some(batch) = input.recv().await {
///             count += batch.len();
///         }
///         println!("{count} readings");
///         Ok(())
///     }
/// }
/// ```
#[async_trait]
pub trait Sink: Send {
    /// Runs until `input` ends; everything received must be written before returning.
    async fn run(self: Box<Self>, input: Input, cx: Context) -> Result<(), StageError>;
}

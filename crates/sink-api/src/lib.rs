//! # sink-api: the stage API of telemetry-sink
//!
//! Everything a custom source, processor or sink depends on. A stage type is
//! two parts:
//!
//! - a **config**, deserialized from its `[sources|processors|sinks.<id>]`
//!   table and registered under its `type` name with
//!   [`#[stage(name = "...")]`](macro@stage) on its [`SourceConfig`],
//!   [`ProcessorConfig`] or [`SinkConfig`] impl (which makes the name usable
//!   in `pipeline.toml` and puts the type, with its config's own schema, in
//!   `sink list` and `sink describe`);
//! - a **running stage**, an async task that owns its state ([`Source`],
//!   [`Processor`], [`Sink`]) and gets its [`Input`], [`Output`] and a
//!   [`Context`] (its id, the shutdown signal, live parameters). A processor
//!   that transforms each batch on its own needs no task of its own:
//!   [`MapReadings`] and [`MapBatch`] run the loop.
//!
//! [`Batch`]es of [`Reading`]s, never single readings, cross the channels.
//!
//! ## Live parameters
//!
//! On reload the runtime hands a stage its new config, typed as the stage's
//! own config type, through [`Context::params`]: `changed().await` in a
//! `select!` loop, or `try_changed()` once per batch. A stage applies what it
//! can between batches: `try_changed()` confirms the config it returns (the
//! stage applies it to the batch in hand), and `changed()` confirms a config
//! when the stage asks for the next one. The runtime logs the reload as
//! applied once every stage it changed has confirmed. Asking for parameters
//! of any type but the stage's own config type panics, naming both types. A key that cannot change while running is marked
//! `#[schemars(extend("x-restart" = true))]`; the runtime then refuses an
//! edit of it as a topology change and never sends it.
//!
//! ## Testing
//!
//! [`testkit`] runs one stage with in-memory input and output, and its
//! conformance checks ([`testkit::check_processor_maps`],
//! [`testkit::check_sink_with`] and their kin) are what every stage should
//! pass, each given the property it verifies.

#![warn(missing_docs)]

// `#[stage]` expands to `::sink_api::...` paths, which this crate's own tests
// and examples use too.
extern crate self as sink_api;

pub mod backoff;
mod batch;
mod config;
mod context;
pub mod json;
mod limits;
mod map;
pub mod metrics;
mod name;
mod readiness;
mod reading;
mod registration;
mod registry;
mod size;
pub mod testkit;
mod token;
pub mod watch;

pub use batch::Batch;
pub use config::{
    BuildContext, ConfigError, IntoAny, Processor, ProcessorConfig, Sink, SinkConfig, Source,
    SourceConfig, StageError,
};
pub use context::{
    AnyConfig, BatchSender, ChannelFill, Context, DoneMarker, Inlet, Input, Output, ParamSender,
    Params, SendError, ShutdownSignal, WhenFull, channel,
};
pub use limits::ReadingLimits;
pub use map::{MapBatch, MapReadings, map_processor};
pub use name::SensorName;
pub use readiness::{Readiness, ReadinessWatch};
pub use reading::{Labels, Reading, Timestamp, Value};
pub use registration::{RegistrationErrors, check_registrations};
pub use registry::{ConfigType, KeyInfo, StageInfo, StageKind, registered_stages};
pub use size::{ByteSize, ByteSizeError};
pub use token::{Acknowledgement, Delivery, MemoryBudget, Reservation, ReserveError, Token};

/// Registers a stage type under one `type` name: put it on the type's
/// [`SourceConfig`], [`ProcessorConfig`] or [`SinkConfig`] impl. It does what
/// `#[typetag::serde(name = ...)]` and [`register_stage!`] did as two steps,
/// so the name `pipeline.toml` uses and the name `sink list` and
/// `sink describe` show cannot differ; a stage crate needs no `typetag`
/// dependency of its own. The kind (source, processor or sink) comes from the
/// trait.
///
/// The description `sink list` shows is the config type's doc comment, and
/// each key's doc comment, type and default come from its schema (derive
/// `schemars::JsonSchema`). Mark a key that cannot change while running with
/// `#[schemars(extend("x-restart" = true))]`: a reload that changes it is
/// then refused as a topology change.
///
/// ```standalone_crate
/// use serde::{Deserialize, Serialize};
/// use sink_api::{BuildContext, ConfigError, MapReadings, Processor, ProcessorConfig, Reading};
///
/// /// Drops readings that carry no value.
/// #[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
/// #[serde(deny_unknown_fields)]
/// struct DropEmpty {}
///
/// #[sink_api::stage(name = "drop_empty")]
/// impl ProcessorConfig for DropEmpty {
///     fn build(&self, _: &BuildContext) -> Result<Box<dyn Processor>, ConfigError> {
///         Ok(sink_api::map_processor(self))
///     }
/// }
///
/// impl MapReadings for DropEmpty {
///     fn map_reading(&self, reading: &mut Reading) -> bool {
///         reading.value.is_some()
///     }
/// }
///
/// let info = sink_api::registered_stages().find(|s| s.name == "drop_empty").unwrap();
/// assert_eq!(info.kind, sink_api::StageKind::Processor);
/// assert_eq!(info.description(), "Drops readings that carry no value.");
/// let config: Box<dyn ProcessorConfig> = serde_json::from_str(r#"{"drop_empty": {}}"#).unwrap();
/// assert_eq!(config.typetag_name(), "drop_empty");
/// assert_eq!(sink_api::check_registrations(), Ok(()));
/// ```
pub use sink_api_macros::stage;

/// The attribute that lets a trait have async methods, for implementing
/// [`Source`], [`Processor`] and [`Sink`]: re-exported, so that a stage crate
/// needs no dependency of its own for it.
pub use async_trait::async_trait;

#[doc(hidden)]
pub use inventory;
#[doc(hidden)]
pub use schemars;

/// What `#[stage]` expands to; not part of the API.
#[doc(hidden)]
pub mod __private {
    pub use typetag;
}

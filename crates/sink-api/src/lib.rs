//! # sink-api: the stage API of telemetry-sink
//!
//! Everything a custom source, processor or sink depends on. A stage type is
//! two parts:
//!
//! - a **config**, deserialized from its `[sources|processors|sinks.<id>]`
//!   table and registered by name with `typetag` ([`SourceConfig`],
//!   [`ProcessorConfig`], [`SinkConfig`]) and with [`register_stage!`] (which
//!   feeds `sink list` and `sink describe` from the config's own schema);
//! - a **running stage**, an async task that owns its state ([`Source`],
//!   [`Processor`], [`Sink`]) and gets its [`Input`], [`Output`] and a
//!   [`Context`] (shutdown signal, live parameters).
//!
//! [`Batch`]es of [`Reading`]s, never single readings, cross the channels.
//!
//! ## Live parameters
//!
//! On reload the runtime hands a stage its new config, typed as the stage's
//! own config type, through [`Context::params`]: `changed().await` in a
//! `select!` loop, or `try_changed()` once per batch. A stage applies what it
//! can between batches; asking for the next config confirms the last one, and
//! the runtime logs the reload as applied once every stage it changed has
//! confirmed. A key that cannot change while running is marked
//! `#[schemars(extend("x-restart" = true))]`; the runtime then refuses an
//! edit of it as a topology change and never sends it.
//!
//! ## Testing
//!
//! [`testkit`] runs one stage with in-memory input and output, and its
//! [`testkit::check_processor`] and [`testkit::check_sink`] are the
//! conformance checks every stage should pass.

#![warn(missing_docs)]

mod batch;
mod config;
mod context;
pub mod json;
mod readiness;
mod reading;
mod registry;
mod size;
pub mod testkit;
mod token;

pub use batch::Batch;
pub use config::{
    BuildContext, ConfigError, IntoAny, Processor, ProcessorConfig, Sink, SinkConfig, Source,
    SourceConfig, StageError,
};
pub use context::{
    AnyConfig, BatchSender, Context, Inlet, Input, Output, ParamSender, Params, SendError,
    ShutdownSignal, WhenFull, channel,
};
pub use readiness::{Readiness, ReadinessWatch};
pub use reading::{Reading, Timestamp};
pub use registry::{KeyInfo, StageInfo, StageKind, registered_stages};
pub use size::{ByteSize, ByteSizeError};
pub use token::{Acknowledgement, Delivery, MemoryBudget, Reservation, ReserveError, Token};

#[doc(hidden)]
pub use inventory;
#[doc(hidden)]
pub use schemars;

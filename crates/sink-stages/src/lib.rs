//! The built-in stages of telemetry-sink, one module each.
//!
//! | kind | type | module |
//! |---|---|---|
//! | source | `grpc` | [`sources::grpc`] |
//! | processor | `buffered` | [`processors::buffered`] |
//! | sink | `json_file` | [`sinks::json_file`] |
//! | sink | `stdout` | [`sinks::stdout`] |
//! | sink | `blackhole` | [`sinks::blackhole`] |
//!
//! Types register themselves (`#[sink_api::stage]`) when this crate is linked; a binary
//! that names no item of it must still say `use sink_stages as _;`.

pub mod client_tls;
pub mod processors;
pub mod sinks;
pub mod sources;

//! Built-in sources.

pub mod grpc;

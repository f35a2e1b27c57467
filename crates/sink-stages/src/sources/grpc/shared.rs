//! The grpc source's machinery, for other sources that accept calls over
//! HTTP/2 or HTTP/1.1 with the same guarantees (the `otlp` source in
//! crates/sink-otlp): the accept loop with its connection bound and idle
//! timeout, TLS with live reload, reading and inflating a gRPC message under
//! its limits, the byte-rate limit, the memory reservation, the hand-off
//! with acknowledgements, readiness and the `sink_grpc_*` metrics.
//!
//! Re-exported rather than copied so that a fix to one is a fix to all; not
//! a stable API (it moves with the grpc source).

pub use super::acks::{AckStats, Handoff, decoded_bound, decoded_bytes, reserve};
pub use super::body::{ACCEPTED_ENCODINGS, BodyReader, Encoding, Prefix, decompress};
pub use super::incoming::{
    Activity, CallGuard, Connection, ConnectionInfo, IdleTimeout, Incoming, TrackCalls, bind,
    default_max_connections, incoming,
};
pub use super::metrics::{ConnectionMetrics, GrpcMetrics, Refusal};
pub use super::ready::{Stall, report_health};
pub use super::tls::{Conn, Handshaker, Incoming as TlsIncoming, Running as RunningTls, Tls};
pub use super::{
    CONNECTION_WINDOW, FULL_RETRY_DELAY, MAX_TIMEOUT, STREAM_WINDOW, admit, listen_address,
    retry_status,
};

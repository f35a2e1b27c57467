//! The grpc source's own metrics: calls by status, request bytes, call
//! latency and readings refused by the rate limit. Every series is created
//! when the source starts, so a call only adds to atomics.

use std::time::Instant;

use sink_api::metrics::{Counter, Histogram, Metrics};
use tonic::Code;
use tonic::codegen::http;

/// The gRPC status names, indexed by code number.
const CODE_NAMES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// Upper bounds of the call-latency buckets, in seconds: from well under a
/// millisecond (an idle pipeline) to the seconds a full one makes clients wait.
const LATENCY_BUCKETS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

pub(super) struct GrpcMetrics {
    calls: [Counter; 17],
    request_bytes: Counter,
    duration: Histogram,
    rate_limited: Counter,
}

impl GrpcMetrics {
    pub(super) fn new(metrics: &Metrics) -> Self {
        Self {
            calls: CODE_NAMES.map(|code| {
                metrics.counter_with(
                    "sink_grpc_calls_total",
                    "Calls answered, by gRPC status",
                    &[("code", code)],
                )
            }),
            request_bytes: metrics.counter(
                "sink_grpc_request_bytes_total",
                "Encoded size of the request messages decoded, in bytes",
            ),
            duration: metrics.histogram(
                "sink_grpc_call_duration_seconds",
                "Time from a call's arrival to its answer, in seconds (waiting for room downstream included)",
                &LATENCY_BUCKETS,
            ),
            rate_limited: metrics.counter(
                "sink_grpc_rate_limited_bytes_total",
                "Encoded bytes of the request messages refused by the rate limit (RESOURCE_EXHAUSTED), before their body is read",
            ),
        }
    }

    /// Counts a call answered with `response`, which started at `started`.
    /// A unary answer carries its status in the headers when it fails; a
    /// success carries it in the trailers, so no status here means OK.
    pub(super) fn answered<B>(&self, started: Instant, response: &http::Response<B>) {
        let code = response
            .headers()
            .get("grpc-status")
            .and_then(|value| value.to_str().ok()?.parse::<usize>().ok())
            .unwrap_or(Code::Ok as usize);
        self.calls[code.min(CODE_NAMES.len() - 1)].inc();
        self.duration.observe(started.elapsed().as_secs_f64());
    }

    /// Counts a request message of `bytes` read.
    pub(super) fn request(&self, bytes: usize) {
        self.request_bytes.inc_by(bytes as u64);
    }

    /// Counts a message of `bytes` refused by the rate limit (its readings
    /// are unknown: the body is refused unread).
    pub(super) fn rate_limited(&self, bytes: usize) {
        self.rate_limited.inc_by(bytes as u64);
    }
}

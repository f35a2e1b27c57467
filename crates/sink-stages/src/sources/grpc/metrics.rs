//! The grpc source's own metrics: calls by status, refusals by reason,
//! request bytes, call latency, bytes refused by the rate limit,
//! acknowledgements, connections and failed TLS handshakes. Every series is
//! created when the source starts, so a call only adds to atomics.

use std::time::Instant;

use sink_api::metrics::{Counter, Gauge, Histogram, Metrics};
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

/// Why a call was refused by a limit of the source or the pipeline: the
/// `reason` label of `sink_grpc_refusals_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Over `max_message_bytes` (or decompressing to more).
    MessageTooLarge,
    /// Over `rate_limit`.
    RateLimited,
    /// The body did not arrive within `body_timeout`.
    BodyTimeout,
    /// More than `max_readings_per_call` readings.
    TooManyReadings,
    /// `settings.memory_limit` reached (`when_full = "reject"`), or the call
    /// alone decodes to more than the whole limit.
    MemoryLimit,
    /// The pipeline's channel was full (`when_full = "reject"`).
    PipelineFull,
    /// The sink is shutting down.
    ShuttingDown,
}

impl Refusal {
    const ALL: [Self; 7] = [
        Self::MessageTooLarge,
        Self::RateLimited,
        Self::BodyTimeout,
        Self::TooManyReadings,
        Self::MemoryLimit,
        Self::PipelineFull,
        Self::ShuttingDown,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Self::MessageTooLarge => "message_too_large",
            Self::RateLimited => "rate_limited",
            Self::BodyTimeout => "body_timeout",
            Self::TooManyReadings => "too_many_readings",
            Self::MemoryLimit => "memory_limit",
            Self::PipelineFull => "pipeline_full",
            Self::ShuttingDown => "shutting_down",
        }
    }
}

pub struct GrpcMetrics {
    calls: [Counter; 17],
    refusals: [Counter; 7],
    request_bytes: Counter,
    duration: Histogram,
    rate_limited: Counter,
    /// Calls answered once written (`acknowledge = "written"`): OK, failed.
    pub(super) acks_written: Counter,
    pub(super) acks_failed: Counter,
    /// Calls waiting for their readings to be written now.
    pub(super) acks_waiting: Gauge,
    /// How long answered calls waited for their readings to be written.
    pub(super) ack_wait: Histogram,
    pub connections: ConnectionMetrics,
    /// Failed TLS handshakes by reason, in [`HANDSHAKE_FAILURES`] order.
    pub handshake_failures: [Counter; 6],
}

/// The `reason` label values of `sink_grpc_tls_handshake_failures_total`.
pub(super) const HANDSHAKE_FAILURES: [&str; 6] = [
    "not_tls",
    "no_client_certificate",
    "bad_client_certificate",
    "timeout",
    "closed",
    "other",
];

/// The accept loop's metrics: connections open and accepted, closed idle or
/// half-open, failed accepts, and times the `max_connections` bound was reached.
#[derive(Clone, Default)]
pub struct ConnectionMetrics {
    pub(super) open: Gauge,
    pub(super) accepted: Counter,
    pub(super) idle_closed: Counter,
    pub(super) half_open_closed: Counter,
    pub(super) accept_errors: Counter,
    pub(super) limit_reached: Counter,
}

impl GrpcMetrics {
    pub fn new(metrics: &Metrics) -> Self {
        Self {
            calls: CODE_NAMES.map(|code| {
                metrics.counter_with(
                    "sink_grpc_calls_total",
                    "Calls answered, by gRPC status",
                    &[("code", code)],
                )
            }),
            refusals: Refusal::ALL.map(|reason| {
                metrics.counter_with(
                    "sink_grpc_refusals_total",
                    "Calls refused by a limit, by reason: message_too_large, rate_limited, body_timeout, too_many_readings, memory_limit, pipeline_full, shutting_down",
                    &[("reason", reason.as_str())],
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
            acks_written: acknowledgements(metrics, "written"),
            acks_failed: acknowledgements(metrics, "failed"),
            acks_waiting: metrics.gauge(
                "sink_grpc_calls_waiting_for_write",
                "Calls waiting now for their readings to be written (acknowledge = \"written\")",
            ),
            ack_wait: metrics.histogram(
                "sink_grpc_acknowledgement_wait_seconds",
                "Time a call of acknowledge = \"written\" waited, once its readings were handed on, until every sink had written them or one could not, in seconds",
                &LATENCY_BUCKETS,
            ),
            connections: ConnectionMetrics {
                open: metrics.gauge("sink_grpc_connections", "Client connections open now"),
                accepted: metrics.counter(
                    "sink_grpc_connections_accepted_total",
                    "Client connections accepted",
                ),
                idle_closed: metrics.counter(
                    "sink_grpc_connections_idle_closed_total",
                    "Connections closed after idle_timeout with no call",
                ),
                half_open_closed: metrics.counter(
                    "sink_grpc_connections_half_open_closed_total",
                    "Connections closed before their client began to speak: the handshake not begun within 5 s (or idle_timeout), or the oldest of too many half-open connections",
                ),
                accept_errors: metrics.counter(
                    "sink_grpc_accept_errors_total",
                    "Failed accepts (such as EMFILE at the descriptor limit), each followed by a pause",
                ),
                limit_reached: metrics.counter(
                    "sink_grpc_connection_limit_reached_total",
                    "Times max_connections connections were open and the source stopped accepting (new clients wait in the listen backlog)",
                ),
            },
            handshake_failures: HANDSHAKE_FAILURES.map(|reason| {
                metrics.counter_with(
                    "sink_grpc_tls_handshake_failures_total",
                    "TLS handshakes that failed, by reason: not_tls, no_client_certificate, bad_client_certificate, timeout, closed, other",
                    &[("reason", reason)],
                )
            }),
        }
    }

    /// Counts a call refused for `reason`.
    pub fn refused(&self, reason: Refusal) {
        self.refusals[reason as usize].inc();
    }

    /// Counts a call answered with `response`, which started at `started`.
    /// A unary answer carries its status in the headers when it fails; a
    /// success carries it in the trailers, so no status here means OK.
    pub fn answered_with<B>(&self, started: Instant, response: &http::Response<B>) {
        let code = response
            .headers()
            .get("grpc-status")
            .and_then(|value| value.to_str().ok()?.parse::<i32>().ok())
            .map_or(Code::Ok, Code::from_i32);
        self.answered(started, code);
    }

    /// Counts a call answered with `code`, which started at `started`.
    pub fn answered(&self, started: Instant, code: Code) {
        // Codes beyond the known ones are UNKNOWN already (`Code::from_i32`).
        let code = (code as usize).min(CODE_NAMES.len() - 1);
        self.calls[code].inc();
        self.duration.observe(started.elapsed().as_secs_f64());
    }

    /// Counts a request message of `bytes` read.
    pub fn request(&self, bytes: usize) {
        self.request_bytes.inc_by(bytes as u64);
    }

    /// Counts a message of `bytes` refused by the rate limit (its readings
    /// are unknown: the body is refused unread).
    pub fn rate_limited(&self, bytes: usize) {
        self.rate_limited.inc_by(bytes as u64);
        self.refused(Refusal::RateLimited);
    }
}

fn acknowledgements(metrics: &Metrics, outcome: &str) -> Counter {
    metrics.counter_with(
        "sink_grpc_acknowledgements_total",
        "Calls of acknowledge = \"written\" answered once their readings were written (outcome=\"written\", OK) or could not be (outcome=\"failed\", UNAVAILABLE)",
        &[("outcome", outcome)],
    )
}

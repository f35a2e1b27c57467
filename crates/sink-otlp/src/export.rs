//! What an export does whichever transport carried it: the checks made
//! before the body is read (size, shutdown, rate limit), the permit and the
//! memory reservation, decoding into readings, and the hand-off with its
//! acknowledgement. The answer is a gRPC [`Status`]; OTLP/HTTP maps it onto
//! its status codes ([`crate::http`]).

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use bytes::Bytes;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use sink_api::metrics::{Counter, Metrics};
use sink_api::{Batch, MemoryBudget, Output, ReadingLimits, Reservation, Timestamp};
use sink_stages::sources::grpc::shared::{
    self, AckStats, GrpcMetrics, Handoff, Refusal, Stall, decoded_bound,
};
use sink_stages::sources::grpc::{Acknowledge, RateLimit, WhenFull};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::Status;

use crate::OtlpConfig;
use crate::decode::{self, DecodeError};
use crate::json;
use crate::points::{Points, Refused};

/// How a request body is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `application/x-protobuf`, and every gRPC call.
    Protobuf,
    /// `application/json`.
    Json,
}

/// What every call of one source shares, over both listeners.
pub struct Shared {
    pub limits: ArcSwap<Limits>,
    pub output: ArcSwapOption<Output>,
    /// One permit per call being decoded or held: `max_concurrent_calls`.
    pub calls: Arc<Semaphore>,
    pub memory: MemoryBudget,
    pub acks: AckStats,
    pub stage: Arc<str>,
    pub started: std::time::Instant,
    pub metrics: GrpcMetrics,
    pub otlp: OtlpMetrics,
    pub stall: Arc<Stall>,
}

/// The limits one call checks, swapped whole on reload.
pub struct Limits {
    pub max_message_bytes: usize,
    pub max_points_per_call: usize,
    pub reading: ReadingLimits,
    pub body_timeout: Duration,
    pub when_full: WhenFull,
    pub acknowledge: Acknowledge,
    pub rate: Option<(RateLimit, Arc<DefaultDirectRateLimiter>)>,
}

impl Limits {
    /// The limits of `config`. An unchanged rate limit keeps its bucket from
    /// `previous`; a changed one starts full at its new burst.
    pub fn new(config: &OtlpConfig, previous: Option<&Limits>) -> Self {
        let rate = config.rate_limit.map(|limit| {
            let kept = previous
                .and_then(|p| p.rate.as_ref())
                .filter(|(old, _)| *old == limit)
                .map(|(_, bucket)| Arc::clone(bucket));
            let bucket = kept.unwrap_or_else(|| {
                // validate() guarantees both are at least 1.
                let rate = NonZeroU32::new(limit.bytes_per_second).unwrap_or(NonZeroU32::MIN);
                let burst = NonZeroU32::new(limit.burst_bytes.unwrap_or(limit.bytes_per_second))
                    .unwrap_or(NonZeroU32::MIN);
                Arc::new(RateLimiter::direct(
                    Quota::per_second(rate).allow_burst(burst),
                ))
            });
            (limit, bucket)
        });
        Self {
            max_message_bytes: config.max_message_bytes,
            max_points_per_call: config.max_points_per_call,
            reading: config.limits,
            body_timeout: config.body_timeout,
            when_full: config.when_full,
            acknowledge: config.acknowledge,
            rate,
        }
    }
}

/// The source's own series beside the grpc source's `sink_grpc_*` ones.
pub struct OtlpMetrics {
    accepted: Counter,
    rejected: Counter,
    /// HTTP answers by status, in [`HTTP_STATUSES`] order, then any other.
    http: Vec<Counter>,
}

/// The HTTP statuses the source answers with (`sink_otlp_http_requests_total`).
const HTTP_STATUSES: [u16; 10] = [200, 400, 404, 405, 408, 413, 415, 429, 500, 503];

impl OtlpMetrics {
    pub fn new(metrics: &Metrics) -> Self {
        let points = |outcome| {
            metrics.counter_with(
                "sink_otlp_points_total",
                "OTLP data points received, by outcome: accepted (became readings) or rejected (counted in partial_success)",
                &[("outcome", outcome)],
            )
        };
        let http = HTTP_STATUSES
            .iter()
            .map(|status| status.to_string())
            .chain(["other".to_string()])
            .map(|status| {
                metrics.counter_with(
                    "sink_otlp_http_requests_total",
                    "OTLP/HTTP requests answered, by HTTP status",
                    &[("status", &status)],
                )
            })
            .collect();
        Self {
            accepted: points("accepted"),
            rejected: points("rejected"),
            http,
        }
    }

    /// Counts an HTTP answer.
    pub fn http(&self, status: u16) {
        let at = HTTP_STATUSES
            .iter()
            .position(|known| *known == status)
            .unwrap_or(HTTP_STATUSES.len());
        self.http[at].inc();
    }
}

/// An export answered with success: how many points were rejected, and why.
#[derive(Debug, Default)]
pub struct Exported {
    pub rejected: u64,
    pub error_message: String,
}

/// What a call holds from admission to its answer.
pub struct Held {
    _permit: OwnedSemaphorePermit,
    memory: Reservation,
}

/// What a point costs beyond the grpc source's reading: the metadata labels
/// the source adds (a Sum's point gets up to three that its bytes do not carry).
const METADATA_COST: u64 = 3 * std::mem::size_of::<(String, String)>() as u64 + 64;

/// The most a body of `len` bytes can decode to: the grpc source's bound
/// (points, their labels, their text) plus the metadata labels.
fn bound(limits: &Limits, len: usize) -> u64 {
    let points = (len / 2).min(limits.max_points_per_call) as u64;
    decoded_bound(len, limits.max_points_per_call, limits.reading.max_labels)
        .saturating_add(points.saturating_mul(METADATA_COST))
}

impl Shared {
    /// The checks on a body of `len` bytes made before it is read: its size,
    /// shutdown, and (when the length is known) the rate limit.
    pub fn admit(&self, limits: &Limits, len: usize) -> Result<(), Status> {
        if len > limits.max_message_bytes {
            self.metrics.refused(Refusal::MessageTooLarge);
            return Err(Status::resource_exhausted(format!(
                "the request of {len} bytes is too large: max_message_bytes is {}",
                limits.max_message_bytes
            )));
        }
        if len > 0 {
            if self.output.load().is_none() {
                self.metrics.refused(Refusal::ShuttingDown);
                return Err(Status::unavailable("the sink is shutting down"));
            }
            self.charge(limits, len)?;
        }
        Ok(())
    }

    /// Charges `len` bytes to the rate limit.
    pub fn charge(&self, limits: &Limits, len: usize) -> Result<(), Status> {
        if let Some((limit, bucket)) = &limits.rate {
            shared::admit(len, *limit, bucket).inspect_err(|_| self.metrics.rate_limited(len))?;
        }
        Ok(())
    }

    /// Takes a `max_concurrent_calls` permit, then reserves what a body of
    /// `raw_len` bytes (as sent, or the most it may inflate to) can decode
    /// to, waiting or refusing as `when_full` says.
    pub async fn hold(&self, limits: &Limits, raw_len: usize) -> Result<Held, Status> {
        let Ok(permit) = Arc::clone(&self.calls).acquire_owned().await else {
            self.metrics.refused(Refusal::ShuttingDown);
            return Err(Status::unavailable("the sink is shutting down"));
        };
        let bound = bound(limits, raw_len).min(self.memory.limit());
        let memory = match self.memory.try_reserve(bound) {
            Ok(memory) => memory,
            Err(_) => self
                .stall
                .waiting_for_memory(shared::reserve(&self.memory, bound, limits.when_full))
                .await
                .inspect_err(|_| self.metrics.refused(Refusal::MemoryLimit))?,
        };
        Ok(Held {
            _permit: permit,
            memory,
        })
    }

    /// Decodes `message` into readings within what `held` reserved, and
    /// hands them on; success says how many points were rejected.
    pub async fn export(
        &self,
        limits: &Limits,
        message: Bytes,
        format: Format,
        held: Held,
    ) -> Result<Exported, Status> {
        self.metrics.request(message.len());
        let Held {
            _permit,
            mut memory,
        } = held;
        // A compressed body was reserved for at the most it could inflate
        // to; now its size is known.
        let known = bound(limits, message.len());
        if memory.bytes() > known {
            memory.shrink_to(known);
        }
        let budget = memory.bytes().saturating_sub(message.len() as u64);
        let cap = limits.reading.max_label_value_bytes;
        let mut points = Points::new(
            Timestamp::now(),
            &limits.reading,
            limits.max_points_per_call,
            budget,
        );
        let decoded = match format {
            Format::Protobuf => decode::decode(&message, &mut points, cap),
            Format::Json => json::decode(&message, &mut points, cap),
        };
        drop(message);
        decoded.map_err(|err| self.refusal(err))?;
        let decoded = points.finish();
        self.otlp.accepted.inc_by(decoded.readings.len() as u64);
        self.otlp.rejected.inc_by(decoded.rejected);
        let exported = Exported {
            rejected: decoded.rejected,
            error_message: decoded.error_message,
        };
        if decoded.readings.is_empty() {
            return Ok(exported);
        }
        let Some(output) = self.output.load_full() else {
            self.metrics.refused(Refusal::ShuttingDown);
            return Err(Status::unavailable("the sink is shutting down"));
        };
        memory.shrink_to(decoded.bytes);
        let handoff = Handoff {
            output,
            when_full: limits.when_full,
            acknowledge: limits.acknowledge,
            stats: &self.acks,
            metrics: &self.metrics,
            stage: &self.stage,
            epoch: self.started,
            stall: &self.stall,
        };
        handoff.send(Batch::from(decoded.readings), memory).await?;
        Ok(exported)
    }

    fn refusal(&self, err: DecodeError) -> Status {
        match err {
            DecodeError::Malformed(why) => {
                Status::invalid_argument(format!("the request is malformed: {why}"))
            }
            DecodeError::Refused(Refused::TooManyPoints(max)) => {
                self.metrics.refused(Refusal::TooManyReadings);
                Status::resource_exhausted(format!(
                    "the request holds more than max_points_per_call ({max}) data points; send fewer per request"
                ))
            }
            DecodeError::Refused(Refused::TooLarge(bytes)) => {
                self.metrics.refused(Refusal::MemoryLimit);
                Status::resource_exhausted(format!(
                    "the request decodes to more than the {bytes} bytes its size allows (bounded by settings.memory_limit); send smaller requests"
                ))
            }
        }
    }
}

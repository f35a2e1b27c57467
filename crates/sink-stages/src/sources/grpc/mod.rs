//! `grpc`: the original service's `sensor.v1.SensorService/SendSensorValues`,
//! with a byte-rate limit, a message-size limit and backpressure, plus the
//! standard health service and server reflection on the same port, in
//! plaintext or over TLS ([`tls`]).
//!
//! The service is written out here rather than generated so that every limit
//! is read per call and can change on reload without restarting the listener;
//! requests are decoded straight into readings by [`decode`].

mod acks;
mod body;
mod decode;
mod http2;
mod incoming;
mod metrics;
mod ready;
mod server;
pub mod shared;
mod tls;

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use async_trait::async_trait;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use serde::{Deserialize, Serialize};
use sink_api::{
    Batch, BuildContext, ConfigError, Context, MemoryBudget, Output, ReadingLimits, Reservation,
    Source, SourceConfig, StageError, Timestamp,
};
use tokio::sync::Semaphore;
use tokio::time::{Instant, timeout_at};
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

pub use self::acks::Acknowledge;
use self::acks::{AckStats, Handoff};
use self::decode::{DecodedRequest, decode_request};
use self::metrics::{GrpcMetrics, Refusal};
pub use self::tls::{HandshakeFailures, TlsConfig};

/// Receives batches of readings over gRPC (`sensor.v1.SensorService`,
/// wire-compatible with the original Go service) and serves the gRPC health
/// service and server reflection on the same address.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GrpcConfig {
    /// Address to listen on, `host:port`; port 0 picks a free port (the log
    /// says which). `:port`, as the original (Go) service took it, means every
    /// IPv4 interface, like `0.0.0.0:port`.
    #[schemars(extend("x-restart" = true))]
    pub address: String,
    /// Byte-rate limit over each request's encoded size; absent means
    /// unlimited. Over it, calls fail with RESOURCE_EXHAUSTED and a RetryInfo.
    #[serde(default)]
    pub rate_limit: Option<RateLimit>,
    /// Largest request message accepted, in bytes; larger ones fail with
    /// RESOURCE_EXHAUSTED.
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
    /// When the next stage is full: `"wait"` holds the call until there is
    /// room (backpressure); `"reject"` fails it with UNAVAILABLE and a RetryInfo.
    #[serde(default)]
    pub when_full: WhenFull,
    /// Calls decoded and held at once, over all connections (and the most
    /// streams one connection may open). A call beyond it waits with its body
    /// unread, so HTTP/2 flow control holds its client back; with the channel
    /// capacities, this bounds memory: at most this many requests of up to
    /// `max_message_bytes` are decoded at a time.
    #[serde(default = "default_max_concurrent_calls")]
    #[schemars(extend("x-restart" = true))]
    pub max_concurrent_calls: u32,
    /// How long a client has to deliver a call's request body (the time spent
    /// waiting for a `max_concurrent_calls` permit does not count); past it
    /// the call fails with DEADLINE_EXCEEDED and frees its permit, so slow
    /// clients cannot hold every permit. A duration such as "10s".
    #[serde(default = "default_body_timeout", with = "humantime_serde")]
    #[schemars(with = "String", extend("format" = "duration"))]
    pub body_timeout: Duration,
    /// Most readings one call may carry; more fail with RESOURCE_EXHAUSTED
    /// before any is decoded (decoding expands: an empty item is 2 bytes on
    /// the wire and a whole reading in memory).
    #[serde(default = "default_max_readings_per_call")]
    pub max_readings_per_call: usize,
    /// The most one reading may hold: `max_name_bytes` (1024),
    /// `max_labels` (64), `max_label_key_bytes` (128) and
    /// `max_label_value_bytes` (1024). A reading past one is INVALID_ARGUMENT
    /// naming the item and the bound.
    #[serde(default)]
    pub limits: ReadingLimits,
    /// Most connections open at once; beyond it new clients wait in the
    /// listen backlog until one closes. Defaults to the soft open-file limit
    /// (RLIMIT_NOFILE) less 64, at most 1024.
    #[serde(default)]
    #[schemars(extend("x-restart" = true))]
    pub max_connections: Option<usize>,
    /// A connection with no call open and none started or ended for this
    /// long is closed. A duration such as "1m".
    #[serde(default = "default_idle_timeout", with = "humantime_serde")]
    #[schemars(with = "String", extend("format" = "duration"))]
    pub idle_timeout: Duration,
    /// How often an HTTP/2 PING checks that a connection's client is still
    /// there, busy or not; a client that does not answer within
    /// `keepalive_timeout` is disconnected.
    #[serde(default = "default_keepalive_interval", with = "humantime_serde")]
    #[schemars(with = "String", extend("format" = "duration"))]
    #[schemars(extend("x-restart" = true))]
    pub keepalive_interval: Duration,
    /// How long a keepalive PING may wait for its answer.
    #[serde(default = "default_keepalive_timeout", with = "humantime_serde")]
    #[schemars(with = "String", extend("format" = "duration"))]
    #[schemars(extend("x-restart" = true))]
    pub keepalive_timeout: Duration,
    /// When a call is answered OK: `"accepted"`, once its readings are in the
    /// pipeline; `"written"`, once every sink they reach has written them
    /// (UNAVAILABLE if any could not: the client retries, delivery is at least
    /// once). Calls waiting count against `max_concurrent_calls`.
    #[serde(default)]
    pub acknowledge: Acknowledge,
    /// TLS, and with `client_ca` mutual TLS, on the listener (health and
    /// reflection included); absent means plaintext. Turning it on or off
    /// needs a restart; new contents of its files, or other files named
    /// here, apply live to new connections.
    #[serde(default)]
    #[schemars(extend("x-restart" = "presence"))]
    pub tls: Option<TlsConfig>,
}

/// A token bucket over request bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// Sustained rate, in bytes per second.
    pub bytes_per_second: u32,
    /// Bucket size, in bytes: the most a burst can send at once, and the
    /// largest request that can ever pass. Defaults to `bytes_per_second`.
    #[serde(default)]
    pub burst_bytes: Option<u32>,
}

/// What a call does when the next stage has no room.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum WhenFull {
    /// Wait for room: backpressure reaches the client as a slower answer.
    #[default]
    Wait,
    /// Answer UNAVAILABLE with a RetryInfo at once.
    Reject,
}

/// Suggested wait before retrying a call refused because the pipeline was full.
pub const FULL_RETRY_DELAY: Duration = Duration::from_millis(100);

fn default_max_concurrent_calls() -> u32 {
    256
}

fn default_max_message_bytes() -> usize {
    4 * 1024 * 1024
}

fn default_body_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_max_readings_per_call() -> usize {
    100_000
}

fn default_idle_timeout() -> Duration {
    Duration::from_secs(60)
}

fn default_keepalive_interval() -> Duration {
    Duration::from_secs(30)
}

fn default_keepalive_timeout() -> Duration {
    Duration::from_secs(10)
}

/// HTTP/2 flow-control windows the server grants. A call waiting for a
/// permit leaves its body unread, and what its client may send meanwhile is
/// buffered up to these: per connection at most `CONNECTION_WINDOW` bytes,
/// so waiting calls hold at most `max_connections` × 512 KiB in all.
pub const STREAM_WINDOW: u32 = 256 * 1024;
pub const CONNECTION_WINDOW: u32 = 512 * 1024;

/// Bodies still arriving may hold at most this fraction of
/// `settings.memory_limit` in all, on top of it: their bytes are reserved as
/// they arrive, so a body announced and not sent holds nothing, and bodies
/// that trickle in cannot take what decoded calls need.
const ARRIVING_SHARE: u64 = 8;

/// What the bodies still arriving may hold: [`ARRIVING_SHARE`] of the
/// memory limit, and at least one whole message of `max_message_bytes` (up
/// to the limit) so that the largest message can always arrive.
fn arriving_limit(memory_limit: u64, max_message_bytes: usize) -> u64 {
    let message = (max_message_bytes as u64).saturating_add(64);
    (memory_limit / ARRIVING_SHARE).max(message.min(memory_limit))
}

/// Durations beyond this are refused: no timeout needs to be longer, and the
/// timer arithmetic stays far from overflowing.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

impl RateLimit {
    fn burst(&self) -> u32 {
        self.burst_bytes.unwrap_or(self.bytes_per_second)
    }
}

#[sink_api::stage(name = "grpc")]
impl SourceConfig for GrpcConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.max_concurrent_calls == 0 {
            return Err(ConfigError::new(
                "max_concurrent_calls",
                "must be at least 1",
            ));
        }
        if self.max_message_bytes == 0 {
            return Err(ConfigError::new("max_message_bytes", "must be at least 1"));
        }
        if self.max_message_bytes > u32::MAX as usize {
            return Err(ConfigError::new(
                "max_message_bytes",
                "must be at most 4294967295 (a gRPC message length is 32 bits)",
            ));
        }
        if self.max_readings_per_call == 0 {
            return Err(ConfigError::new(
                "max_readings_per_call",
                "must be at least 1",
            ));
        }
        if self.max_connections == Some(0) {
            return Err(ConfigError::new("max_connections", "must be at least 1"));
        }
        for (key, value, min) in [
            ("body_timeout", self.body_timeout, Duration::from_millis(1)),
            ("idle_timeout", self.idle_timeout, Duration::from_millis(1)),
            (
                "keepalive_interval",
                self.keepalive_interval,
                Duration::from_millis(10),
            ),
            (
                "keepalive_timeout",
                self.keepalive_timeout,
                Duration::from_millis(10),
            ),
        ] {
            if value < min || value > MAX_TIMEOUT {
                return Err(ConfigError::new(
                    key,
                    format!(
                        "must be between {} and 24h, not {}",
                        humantime::format_duration(min),
                        humantime::format_duration(value)
                    ),
                ));
            }
        }
        if let Some(tls) = &self.tls {
            tls.validate()?;
        }
        if let Some(limit) = &self.rate_limit {
            if limit.bytes_per_second == 0 {
                return Err(ConfigError::new(
                    "rate_limit.bytes_per_second",
                    "must be at least 1",
                ));
            }
            if limit.burst() == 0 {
                return Err(ConfigError::new(
                    "rate_limit.burst_bytes",
                    "must be at least 1",
                ));
            }
        }
        Ok(())
    }

    fn build(&self, _: &BuildContext) -> Result<Box<dyn Source>, ConfigError> {
        // Bad TLS files refuse the start, before the port is taken.
        let tls = self.tls.as_ref().map(tls::Tls::load).transpose()?;
        let listener = incoming::bind(&listen_address(&self.address)).map_err(|err| {
            ConfigError::new(
                "address",
                format!("cannot listen on {}: {err}", self.address),
            )
        })?;
        let local = listener
            .local_addr()
            .map_err(|err| ConfigError::new("address", err.to_string()))?;
        Ok(Box::new(GrpcSource {
            config: self.clone(),
            listener,
            local,
            tls,
        }))
    }
}

/// What `address` binds: Go's `:port` (an original `.env`'s
/// GRPC_SERVER_SOCKET may say `:8000`) is every IPv4 interface.
pub fn listen_address(address: &str) -> std::borrow::Cow<'_, str> {
    match address.strip_prefix(':') {
        Some(port) => format!("0.0.0.0:{port}").into(),
        None => address.into(),
    }
}

struct GrpcSource {
    config: GrpcConfig,
    listener: std::net::TcpListener,
    local: SocketAddr,
    tls: Option<tls::Tls>,
}

#[async_trait]
impl Source for GrpcSource {
    async fn run(self: Box<Self>, output: Output, cx: Context) -> Result<(), StageError> {
        let listener = tokio::net::TcpListener::from_std(self.listener)?;
        // Said here rather than at build: a later stage's build may still fail.
        tracing::info!(
            stage = cx.id(),
            "grpc source listening on {}{}",
            self.local,
            match &self.config.tls {
                None => "",
                Some(tls) if tls.client_ca.is_some() => " (TLS, client certificates required)",
                Some(_) => " (TLS)",
            }
        );
        let metrics = GrpcMetrics::new(cx.metrics());
        let tls = self.tls.map(|tls| {
            tls.start(
                cx.id(),
                cx.shutdown().clone(),
                metrics.handshake_failures.clone(),
            )
        });
        let shared = Arc::new(Shared {
            limits: ArcSwap::from_pointee(Limits::new(&self.config, None)),
            output: ArcSwapOption::from_pointee(output),
            calls: Arc::new(Semaphore::new(self.config.max_concurrent_calls as usize)),
            memory: cx.memory().clone(),
            arriving: MemoryBudget::new(arriving_limit(
                cx.memory().limit(),
                self.config.max_message_bytes,
            )),
            acks: AckStats::default(),
            stage: cx.id().into(),
            started: std::time::Instant::now(),
            metrics,
            stall: ready::Stall::new(&cx),
        });
        let idle = incoming::IdleTimeout::new(self.config.idle_timeout);
        let max_connections = self
            .config
            .max_connections
            .unwrap_or_else(incoming::default_max_connections);
        let service = SensorService(Arc::clone(&shared));

        let (health, health_service) = tonic_health::server::health_reporter();
        let health_reporter =
            ready::report_health(health.clone(), &cx, sink_proto::SERVICE_NAME).await;
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(sink_proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        };
        let reflection_v1 = reflection().build_v1()?;
        let reflection_v1alpha = reflection().build_v1alpha()?;

        // Every path but SendSensorValues, which the server answers itself.
        let routes = tonic::service::Routes::new(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .prepare();
        let config = &self.config;
        let mut server = tokio::spawn(server::serve(
            tls::Incoming::new(
                incoming::incoming(
                    listener,
                    max_connections,
                    idle.clone(),
                    shared.metrics.connections.clone(),
                ),
                tls.as_ref().map(tls::Running::handshaker),
            ),
            server::Settings {
                max_concurrent_streams: config.max_concurrent_calls,
                keepalive_interval: config.keepalive_interval,
                keepalive_timeout: config.keepalive_timeout,
            },
            service,
            incoming::LimitStreams::new(routes, incoming::long_lived_limit(max_connections)),
            cx.shutdown().clone(),
        ));

        // Limits change live: each call reads the current ones.
        let mut params = cx.params::<GrpcConfig>();
        // The TLS table in force, which a reload may not loosen.
        let mut tls_config = self.config.tls.clone();
        loop {
            tokio::select! {
                // Shutdown first: the server also ends when shutdown starts.
                biased;
                _ = cx.shutdown().wait() => break,
                new = params.changed() => {
                    let old = shared.limits.load();
                    shared.limits.store(Arc::new(Limits::new(&new, Some(&old))));
                    idle.set(new.idle_timeout);
                    match (&tls, &new.tls) {
                        (Some(running), Some(config)) => {
                            let config = tls::kept_client_auth(cx.id(), tls_config.as_ref(), config);
                            running.update(&config);
                            tls_config = Some(config);
                        }
                        (None, None) => {}
                        // The runtime refuses this edit (`x-restart = "presence"`).
                        _ => tracing::warn!(
                            stage = cx.id(),
                            "turning TLS on or off needs a restart; the listener keeps its mode"
                        ),
                    }
                }
                served = &mut server => {
                    served?;
                    return Err("the gRPC server stopped on its own".into());
                }
            }
        }

        // Stop accepting: calls from now on answer UNAVAILABLE. Calls in flight
        // hold their own reference to the output and finish; the downstream
        // channel closes when the last of them does. Connections that clients
        // keep open cannot hold shutdown up, as they no longer reach the output.
        shared.output.store(None);
        health_reporter.abort();
        let _ = health_reporter.await;
        health
            .set_service_status(
                sink_proto::SERVICE_NAME,
                tonic_health::ServingStatus::NotServing,
            )
            .await;
        health
            .set_service_status("", tonic_health::ServingStatus::NotServing)
            .await;
        let failed = tls
            .as_ref()
            .map(|tls| format!("; {} TLS handshakes failed", tls.failures().count()))
            .unwrap_or_default();
        tracing::info!(
            stage = cx.id(),
            "grpc source on {} stopped accepting{failed}",
            self.local
        );
        // Calls still in flight (waiting for room, or for their readings to
        // be written) are answered before the source ends, so that the
        // process does not exit under them: each holds a permit until then.
        let waiting = shared
            .acks
            .waiting
            .load(std::sync::atomic::Ordering::Relaxed);
        if waiting > 0 {
            tracing::info!(
                stage = cx.id(),
                "{waiting} call(s) wait for their readings to be written"
            );
        }
        let _all = shared
            .calls
            .acquire_many(self.config.max_concurrent_calls)
            .await;
        // Give the server a moment to write those last answers (it ends once
        // every connection has finished; a client that keeps one open cannot
        // hold shutdown up beyond this).
        let _ = tokio::time::timeout(ANSWER_GRACE, server).await;
        Ok(())
    }
}

/// How long the server may take, after the last call is answered at
/// shutdown, to write the answers out and close its connections.
const ANSWER_GRACE: Duration = Duration::from_secs(1);

/// What every call of one source shares: its limits and its output, each
/// swapped whole (on reload, and at shutdown) without a lock on the call path.
struct Shared {
    limits: ArcSwap<Limits>,
    output: ArcSwapOption<Output>,
    /// One permit per call being decoded or held: `max_concurrent_calls`.
    calls: Arc<Semaphore>,
    /// The pipeline's `settings.memory_limit`.
    memory: MemoryBudget,
    /// What the bodies still arriving may hold in all: a share of `memory`
    /// ([`ARRIVING_SHARE`]), reserved byte by byte as they arrive.
    arriving: MemoryBudget,
    acks: AckStats,
    stage: Arc<str>,
    started: std::time::Instant,
    metrics: GrpcMetrics,
    /// Tells readiness when the output stays full.
    stall: Arc<ready::Stall>,
}

/// The limits one call checks, swapped whole on reload.
struct Limits {
    max_message_bytes: usize,
    max_readings_per_call: usize,
    reading: ReadingLimits,
    body_timeout: Duration,
    when_full: WhenFull,
    acknowledge: Acknowledge,
    rate: Option<(RateLimit, Arc<DefaultDirectRateLimiter>)>,
}

impl Limits {
    /// The limits of `config`. An unchanged rate limit keeps its bucket from
    /// `previous`; a changed one starts full at its new burst.
    fn new(config: &GrpcConfig, previous: Option<&Limits>) -> Self {
        let rate = config.rate_limit.map(|limit| {
            let kept = previous
                .and_then(|p| p.rate.as_ref())
                .filter(|(old, _)| *old == limit)
                .map(|(_, bucket)| Arc::clone(bucket));
            let bucket = kept.unwrap_or_else(|| Arc::new(RateLimiter::direct(quota(limit))));
            (limit, bucket)
        });
        Self {
            max_message_bytes: config.max_message_bytes,
            max_readings_per_call: config.max_readings_per_call,
            reading: config.limits,
            body_timeout: config.body_timeout,
            when_full: config.when_full,
            acknowledge: config.acknowledge,
            rate,
        }
    }
}

fn quota(limit: RateLimit) -> Quota {
    // validate() guarantees both are at least 1.
    let rate = NonZeroU32::new(limit.bytes_per_second).unwrap_or(NonZeroU32::MIN);
    let burst = NonZeroU32::new(limit.burst()).unwrap_or(NonZeroU32::MIN);
    Quota::per_second(rate).allow_burst(burst)
}

/// The hand-written `sensor.v1.SensorService/SendSensorValues`, which
/// [`server`] calls for each request on that path.
#[derive(Clone)]
struct SensorService(Arc<Shared>);

/// Decodes one encoded `SensorValuesRequest` into the batch a call hands on,
/// all stamped `received_at`, as the service does for every call. Public for
/// the benchmarks (`cargo bench -p sink-stages`).
pub fn decode_batch(
    message: &[u8],
    received_at: Timestamp,
    limits: &ReadingLimits,
) -> Result<Batch, Status> {
    decode_request(message, received_at, limits)?.readings
}

impl SensorService {
    /// Answers one `SendSensorValues` call and counts its answer; `None`
    /// when the client reset it first.
    async fn answer(self, call: http2::SensorCall) -> Option<Result<(), Status>> {
        let started = std::time::Instant::now();
        let http2::SensorCall {
            encoding,
            timeout,
            body,
        } = call;
        let inbox = Arc::clone(body.inbox());
        let outcome = http2::guarded(&inbox, timeout, async {
            self.unary(encoding?, body, started.into()).await
        })
        .await;
        if let Some(outcome) = &outcome {
            let code = outcome.as_ref().map_or_else(Status::code, |()| Code::Ok);
            self.0.metrics.answered(started, code);
        }
        outcome
    }

    /// Serves one call from its request: reads the message prefix, refuses
    /// what the limits refuse before reading any more, takes a
    /// `max_concurrent_calls` permit, reads the one message within
    /// `body_timeout`, decodes it and hands it on ([`accept`](Self::accept)).
    async fn unary(
        &self,
        encoding: body::Encoding,
        body: http2::RequestBody,
        started: Instant,
    ) -> Result<(), Status> {
        let limits = self.0.limits.load_full();
        let mut body = body::BodyReader::new(body);
        // The client's time to deliver the body runs from `started`, while
        // its bytes are awaited, not while the call waits for a permit.
        let too_slow = || {
            self.0.metrics.refused(Refusal::BodyTimeout);
            Status::deadline_exceeded(format!(
                "the request body did not arrive within body_timeout ({})",
                humantime::format_duration(limits.body_timeout)
            ))
        };
        let prefix = timeout_at(started + limits.body_timeout, body.prefix())
            .await
            .map_err(|_| too_slow())??;
        let Some(prefix) = prefix else {
            return Err(Status::internal("the request carries no message"));
        };
        if prefix.len > limits.max_message_bytes {
            self.0.metrics.refused(Refusal::MessageTooLarge);
            return Err(Status::resource_exhausted(format!(
                "the message of {} bytes is too large: max_message_bytes is {}",
                prefix.len, limits.max_message_bytes
            )));
        }
        if prefix.len > 0 {
            if self.0.output.load().is_none() {
                self.0.metrics.refused(Refusal::ShuttingDown);
                return Err(Status::unavailable("the sink is shutting down"));
            }
            // Charged on the encoded (for a compressed message, the
            // compressed) size, known from the prefix: refused before the
            // body is read, let alone decoded.
            if let Some((limit, bucket)) = &limits.rate {
                admit(prefix.len, *limit, bucket)
                    .inspect_err(|_| self.0.metrics.rate_limited(prefix.len))?;
            }
        }
        // Beyond `max_concurrent_calls`, wait here with the body unread.
        // Neither the wait for a slot nor the wait for memory below counts
        // against the client's body_timeout.
        let waited = Instant::now();
        let Ok(_permit) = Arc::clone(&self.0.calls).acquire_owned().await else {
            self.0.metrics.refused(Refusal::ShuttingDown);
            return Err(Status::unavailable("the sink is shutting down"));
        };
        // Reserved as its bytes arrive, from the share of memory that bodies
        // still arriving may hold: a body announced and not sent reserves
        // nothing, so streams that send only a prefix cannot starve calls
        // whose bytes are here (they hold a permit for body_timeout at most).
        let deadline = started + limits.body_timeout + waited.elapsed();
        let arriving = arriving_limit(self.0.memory.limit(), limits.max_message_bytes);
        if self.0.arriving.limit() != arriving.div_ceil(1024) * 1024 {
            self.0.arriving.set_limit(arriving);
        }
        let message = timeout_at(deadline, async {
            body.metered(self.0.arriving.clone()).await?;
            body.message(prefix).await
        })
        .await
        .map_err(|_| too_slow())??;
        // The most the message can decode to, reserved now that it is here
        // and before it is decompressed or decoded (waiting or refusing per
        // `when_full`, as at a full channel); cut to the real size once
        // decoded.
        let bound = if prefix.compressed {
            acks::decoded_bound(
                limits.max_message_bytes,
                limits.max_readings_per_call,
                limits.reading.max_labels,
            )
            .saturating_add(body::decompression_overhead(
                encoding,
                limits.max_message_bytes,
            ))
            .saturating_add(prefix.len as u64)
        } else {
            acks::decoded_bound(
                prefix.len,
                limits.max_readings_per_call,
                limits.reading.max_labels,
            )
        };
        let bound = bound.min(self.0.memory.limit());
        let memory = self.reserve_memory(bound, limits.when_full).await?;
        // The message's bytes are in `memory` now.
        drop(body);
        self.0.metrics.request(prefix.len);
        let message = if prefix.compressed {
            body::decompress(encoding, &message, limits.max_message_bytes)
                .inspect_err(|status| self.refused_if_exhausted(status, Refusal::MessageTooLarge))?
        } else {
            message
        };
        let request = decode::decode_request_at_most(
            &message,
            Timestamp::now(),
            &limits.reading,
            limits.max_readings_per_call,
        )
        .inspect_err(|status| self.refused_if_exhausted(status, Refusal::TooManyReadings))?;
        let decoded_len = message.len();
        drop(message);
        self.accept(request, memory, decoded_len).await
    }

    /// Admits the request under the limits and hands its readings on; OK means
    /// they are in the pipeline, or written with `acknowledge = "written"`. A
    /// request with an invalid timestamp is refused only once it has passed
    /// the other checks.
    async fn accept(
        &self,
        request: DecodedRequest,
        memory: Reservation,
        message_len: usize,
    ) -> Result<(), Status> {
        if request.is_empty() {
            return Ok(());
        }
        let Some(output) = self.0.output.load_full() else {
            self.0.metrics.refused(Refusal::ShuttingDown);
            return Err(Status::unavailable("the sink is shutting down"));
        };
        let limits = self.0.limits.load_full();
        let batch = request.readings?;
        let bytes = acks::decoded_bytes(batch.len(), request.labels, message_len);
        let memory = if memory.bytes() >= bytes {
            let mut memory = memory;
            memory.shrink_to(bytes);
            memory
        } else {
            // At most the whole limit was reserved before decoding; it takes
            // more (and is refused as too large).
            drop(memory);
            self.reserve_memory(bytes, limits.when_full).await?
        };
        let handoff = Handoff {
            output,
            when_full: limits.when_full,
            acknowledge: limits.acknowledge,
            stats: &self.0.acks,
            metrics: &self.0.metrics,
            stage: &self.0.stage,
            epoch: self.0.started,
            stall: &self.0.stall,
        };
        handoff.send(batch, memory).await
    }

    /// Reserves `bytes` of `settings.memory_limit` for a call: at once when
    /// there is room (every call does this twice), else as `when_full` says,
    /// telling readiness when the wait lasts.
    async fn reserve_memory(&self, bytes: u64, when_full: WhenFull) -> Result<Reservation, Status> {
        if let Ok(memory) = self.0.memory.try_reserve(bytes) {
            return Ok(memory);
        }
        self.0
            .stall
            .waiting_for_memory(acks::reserve(&self.0.memory, bytes, when_full))
            .await
            .inspect_err(|_| self.0.metrics.refused(Refusal::MemoryLimit))
    }

    /// Counts `reason` if `status` is RESOURCE_EXHAUSTED (the other errors
    /// of the same step are malformed input, counted by code alone).
    fn refused_if_exhausted(&self, status: &Status, reason: Refusal) {
        if status.code() == Code::ResourceExhausted {
            self.0.metrics.refused(reason);
        }
    }
}

/// Takes `cost` bytes from the bucket, or says when to retry.
pub fn admit(
    cost: usize,
    limit: RateLimit,
    bucket: &DefaultDirectRateLimiter,
) -> Result<(), Status> {
    let never = || {
        Status::resource_exhausted(format!(
            "request of {cost} bytes exceeds the rate limit's burst of {} bytes and can never pass; send smaller requests",
            limit.burst()
        ))
    };
    let cost = u32::try_from(cost)
        .ok()
        .and_then(NonZeroU32::new)
        .ok_or_else(never)?;
    match bucket.check_n(cost) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(not_until)) => {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            Err(retry_status(
                Code::ResourceExhausted,
                format!(
                    "rate limit of {} bytes/s exceeded; retry in {} ms",
                    limit.bytes_per_second,
                    wait.as_millis().max(1)
                ),
                wait,
            ))
        }
        Err(_) => Err(never()),
    }
}

/// A status carrying a `google.rpc.RetryInfo` with `delay`, which OTLP-style
/// clients honour instead of dropping the data.
pub fn retry_status(code: Code, message: String, delay: Duration) -> Status {
    Status::with_error_details(code, message, ErrorDetails::with_retry_info(Some(delay)))
}

#[cfg(test)]
mod tests {
    use prost::Message;
    use sink_proto::sensor_value::Measurement;
    use sink_proto::{SensorValue, SensorValuesRequest};

    use super::*;

    #[test]
    fn decode_batch_reads_every_item_and_refuses_garbage() {
        let request = SensorValuesRequest {
            items: vec![
                SensorValue {
                    sensor_name: "t1".into(),
                    measurement: Some(Measurement {
                        sensor_value: Some(0),
                        created_at: Some(prost_types::Timestamp {
                            seconds: 1_795_860_000,
                            nanos: 512_000_000,
                        }),
                        sensor_value_float: None,
                    }),
                    labels: Default::default(),
                },
                SensorValue {
                    sensor_name: "t2".into(),
                    measurement: None,
                    labels: Default::default(),
                },
            ],
        };
        let received_at = Timestamp::new(1_795_860_001, 0).unwrap();
        let batch = decode_batch(
            &request.encode_to_vec(),
            received_at,
            &ReadingLimits::default(),
        )
        .unwrap();
        assert_eq!(batch.len(), 2);
        assert_eq!(batch[0].sensor_name, "t1");
        assert_eq!(batch[0].value, Some(0.into()));
        assert_eq!(
            batch[0].created_at,
            Timestamp::new(1_795_860_000, 512_000_000)
        );
        assert_eq!(batch[1].value, None);
        assert_eq!(batch[1].created_at, None);
        assert!(batch.iter().all(|r| r.received_at == received_at));

        let garbage =
            decode_batch(&[0xff, 0xff, 0xff], received_at, &ReadingLimits::default()).unwrap_err();
        assert_eq!(garbage.code(), Code::Internal);
    }

    #[test]
    fn a_go_style_port_only_address_listens_on_every_interface() {
        assert_eq!(listen_address(":8000"), "0.0.0.0:8000");
        assert_eq!(listen_address("127.0.0.1:8000"), "127.0.0.1:8000");
        assert_eq!(listen_address("[::]:8000"), "[::]:8000");
    }
}

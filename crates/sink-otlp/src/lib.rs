//! # sink-otlp: the `otlp` source
//!
//! Receives OpenTelemetry metrics as every OpenTelemetry SDK and the
//! Collector export them: OTLP/gRPC (`MetricsService/Export`) and OTLP/HTTP
//! (`POST /v1/metrics`, protobuf or JSON, gzip or not), answering as the OTLP
//! specification asks of a receiver (status codes, `partial_success`,
//! `RetryInfo` and `Retry-After` on backpressure). Each number point of a
//! Gauge or a Sum becomes one reading ([`points`]); histograms and summaries
//! are refused point by point, counted in `partial_success`.
//!
//! The limits, memory reservation, acknowledgements, TLS, connection
//! handling, readiness and metrics are the `grpc` source's own
//! ([`sink_stages::sources::grpc::shared`]), so both sources keep the same
//! guarantees. Linked into the `sink` binary by `use sink_otlp as _;`.

mod decode;
mod export;
mod grpc;
mod http;
pub mod json;
pub mod points;

use std::sync::Arc;
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use sink_api::{
    BuildContext, ConfigError, Context, Output, ReadingLimits, Source, SourceConfig, StageError,
};
use sink_stages::sources::grpc::shared::{self, AckStats, GrpcMetrics, Stall};
use sink_stages::sources::grpc::{Acknowledge, GrpcConfig, RateLimit, TlsConfig, WhenFull};
use tokio::sync::Semaphore;

pub use self::decode::DecodeError;
use self::export::{Limits, OtlpMetrics, Shared};
pub use self::http::RpcStatus;

/// The generated OTLP messages (only those the source reads or answers
/// with), and a client, for tests and benchmarks.
#[allow(clippy::all, missing_docs)]
pub mod proto {
    /// `opentelemetry.proto.common.v1`.
    pub mod common {
        pub mod v1 {
            tonic::include_proto!("opentelemetry.proto.common.v1");
        }
    }
    /// `opentelemetry.proto.resource.v1`.
    pub mod resource {
        pub mod v1 {
            tonic::include_proto!("opentelemetry.proto.resource.v1");
        }
    }
    /// `opentelemetry.proto.metrics.v1`.
    pub mod metrics {
        pub mod v1 {
            tonic::include_proto!("opentelemetry.proto.metrics.v1");
        }
    }
    /// `opentelemetry.proto.collector.metrics.v1`.
    pub mod collector {
        pub mod metrics {
            pub mod v1 {
                tonic::include_proto!("opentelemetry.proto.collector.metrics.v1");
            }
        }
    }
}

/// Decodes one request, protobuf or JSON (`json`), into readings stamped
/// `received_at`, as a call does (within `limits`, with no bound on points
/// or memory). Public for the benchmarks (`cargo bench -p sink-otlp`).
pub fn decode_request(
    message: &[u8],
    json: bool,
    received_at: sink_api::Timestamp,
    limits: &ReadingLimits,
) -> Result<points::Decoded, DecodeError> {
    let mut points = points::Points::new(received_at, limits, usize::MAX, u64::MAX);
    let cap = limits.max_label_value_bytes;
    if json {
        json::decode(message, &mut points, cap)?;
    } else {
        decode::decode(message, &mut points, cap)?;
    }
    Ok(points.finish())
}

/// The gRPC service name, as the health service reports it.
pub const SERVICE_NAME: &str = "opentelemetry.proto.collector.metrics.v1.MetricsService";
/// The gRPC path of `MetricsService/Export`.
pub const EXPORT_PATH: &str = "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export";
/// The OTLP/HTTP path for metrics.
pub const HTTP_PATH: &str = "/v1/metrics";

/// Receives OpenTelemetry metrics over OTLP/gRPC and OTLP/HTTP (protobuf and
/// JSON): each number point of a Gauge or a Sum becomes one reading, named
/// after its metric, with the resource's and the point's attributes as labels.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OtlpConfig {
    /// Address of the OTLP/gRPC listener (`MetricsService/Export`, plus the
    /// gRPC health service), `host:port` (4317 is OTLP's); absent: no gRPC
    /// listener.
    #[serde(default)]
    #[schemars(extend("x-restart" = true))]
    pub grpc_address: Option<String>,
    /// Address of the OTLP/HTTP listener (`POST /v1/metrics`,
    /// `application/x-protobuf` or `application/json`), `host:port` (4318 is
    /// OTLP's); absent: no HTTP listener.
    #[serde(default)]
    #[schemars(extend("x-restart" = true))]
    pub http_address: Option<String>,
    /// Byte-rate limit over each request's body as sent; absent means
    /// unlimited. Over it: RESOURCE_EXHAUSTED with a RetryInfo, or HTTP 429
    /// with Retry-After.
    #[serde(default)]
    pub rate_limit: Option<RateLimit>,
    /// Largest request body accepted, in bytes, as sent and once inflated;
    /// larger: RESOURCE_EXHAUSTED, or HTTP 413.
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
    /// When the next stage or `settings.memory_limit` is full: `"wait"`
    /// holds the call (backpressure); `"reject"` answers UNAVAILABLE with a
    /// RetryInfo, or HTTP 503 with Retry-After.
    #[serde(default)]
    pub when_full: WhenFull,
    /// Calls decoded and held at once, over both listeners; beyond it a call
    /// waits with its body unread.
    #[serde(default = "default_max_concurrent_calls")]
    #[schemars(extend("x-restart" = true))]
    pub max_concurrent_calls: u32,
    /// How long a client has to deliver a request's headers and body (the
    /// wait for a `max_concurrent_calls` permit does not count): past it,
    /// DEADLINE_EXCEEDED, or HTTP 408. A duration such as "10s".
    #[serde(default = "default_body_timeout", with = "humantime_serde")]
    #[schemars(with = "String", extend("format" = "duration"))]
    pub body_timeout: Duration,
    /// Most data points one request may carry (of any metric type); more:
    /// RESOURCE_EXHAUSTED, or HTTP 413, before the readings are kept.
    #[serde(default = "default_max_points_per_call")]
    pub max_points_per_call: usize,
    /// The most one reading may hold: `max_name_bytes` (1024), `max_labels`
    /// (64), `max_label_key_bytes` (128), `max_label_value_bytes` (1024). A
    /// point past one is rejected alone, counted in `partial_success`.
    #[serde(default)]
    pub limits: ReadingLimits,
    /// Most connections open at once on each listener; beyond it new clients
    /// wait in the listen backlog. Defaults to the soft open-file limit less
    /// 64, at most 1024.
    #[serde(default)]
    #[schemars(extend("x-restart" = true))]
    pub max_connections: Option<usize>,
    /// A connection with no call open and none started or ended for this
    /// long is closed. A duration such as "1m".
    #[serde(default = "default_idle_timeout", with = "humantime_serde")]
    #[schemars(with = "String", extend("format" = "duration"))]
    pub idle_timeout: Duration,
    /// How often an HTTP/2 PING checks a quiet gRPC connection.
    #[serde(default = "default_keepalive_interval", with = "humantime_serde")]
    #[schemars(with = "String", extend("format" = "duration", "x-restart" = true))]
    pub keepalive_interval: Duration,
    /// How long a keepalive PING may wait for its answer.
    #[serde(default = "default_keepalive_timeout", with = "humantime_serde")]
    #[schemars(with = "String", extend("format" = "duration", "x-restart" = true))]
    pub keepalive_timeout: Duration,
    /// When a request is answered with success: `"accepted"`, once its
    /// readings are in the pipeline; `"written"`, once every sink they reach
    /// has written them (UNAVAILABLE, or HTTP 503, if any could not: the
    /// client retries, delivery is at least once).
    #[serde(default)]
    pub acknowledge: Acknowledge,
    /// TLS (and with `client_ca` mutual TLS) on both listeners, as on the
    /// grpc source; absent means plaintext. Turning it on or off needs a
    /// restart; new file contents apply live to new connections.
    #[serde(default)]
    #[schemars(extend("x-restart" = "presence"))]
    pub tls: Option<TlsConfig>,
}

fn default_max_message_bytes() -> usize {
    4 * 1024 * 1024
}

fn default_max_concurrent_calls() -> u32 {
    256
}

fn default_body_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_max_points_per_call() -> usize {
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

impl OtlpConfig {
    /// The grpc source's config with the same limits: its checks are the
    /// ones these keys need.
    fn as_grpc(&self) -> GrpcConfig {
        GrpcConfig {
            address: String::new(),
            rate_limit: self.rate_limit,
            max_message_bytes: self.max_message_bytes,
            when_full: self.when_full,
            max_concurrent_calls: self.max_concurrent_calls,
            body_timeout: self.body_timeout,
            max_readings_per_call: self.max_points_per_call,
            limits: self.limits,
            max_connections: self.max_connections,
            idle_timeout: self.idle_timeout,
            keepalive_interval: self.keepalive_interval,
            keepalive_timeout: self.keepalive_timeout,
            acknowledge: self.acknowledge,
            tls: self.tls.clone(),
        }
    }
}

#[sink_api::stage(name = "otlp")]
impl SourceConfig for OtlpConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.grpc_address.is_none() && self.http_address.is_none() {
            return Err(ConfigError::new(
                "grpc_address",
                "set grpc_address, http_address or both: with neither the source listens nowhere",
            ));
        }
        for (key, address) in [
            ("grpc_address", &self.grpc_address),
            ("http_address", &self.http_address),
        ] {
            if address.as_deref() == Some("") {
                return Err(ConfigError::new(key, "must be host:port"));
            }
        }
        self.as_grpc().validate().map_err(|mut err| {
            if err.key == "max_readings_per_call" {
                err.key = "max_points_per_call".into();
            }
            err
        })
    }

    fn build(&self, _: &BuildContext) -> Result<Box<dyn Source>, ConfigError> {
        // Bad TLS files refuse the start, before a port is taken.
        let tls = self.tls.as_ref().map(shared::Tls::load).transpose()?;
        let bind = |key: &str, address: &Option<String>| {
            address
                .as_deref()
                .map(|address| {
                    let listener =
                        shared::bind(&shared::listen_address(address)).map_err(|err| {
                            ConfigError::new(key, format!("cannot listen on {address}: {err}"))
                        })?;
                    let local = listener
                        .local_addr()
                        .map_err(|err| ConfigError::new(key, err.to_string()))?;
                    Ok::<_, ConfigError>((listener, local))
                })
                .transpose()
        };
        Ok(Box::new(OtlpSource {
            config: self.clone(),
            grpc: bind("grpc_address", &self.grpc_address)?,
            http: bind("http_address", &self.http_address)?,
            tls,
        }))
    }
}

type Listener = (std::net::TcpListener, std::net::SocketAddr);

struct OtlpSource {
    config: OtlpConfig,
    grpc: Option<Listener>,
    http: Option<Listener>,
    tls: Option<shared::Tls>,
}

/// How long the servers may take, after the last call is answered at
/// shutdown, to write the answers out and close their connections.
const ANSWER_GRACE: Duration = Duration::from_secs(1);

#[async_trait]
impl Source for OtlpSource {
    async fn run(self: Box<Self>, output: Output, cx: Context) -> Result<(), StageError> {
        let mode = match &self.config.tls {
            None => "",
            Some(tls) if tls.client_ca.is_some() => " (TLS, client certificates required)",
            Some(_) => " (TLS)",
        };
        for (what, listener) in [("OTLP/gRPC", &self.grpc), ("OTLP/HTTP", &self.http)] {
            if let Some((_, local)) = listener {
                tracing::info!(
                    stage = cx.id(),
                    "otlp source listening for {what} on {local}{mode}"
                );
            }
        }
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
            acks: AckStats::default(),
            stage: cx.id().into(),
            started: std::time::Instant::now(),
            otlp: OtlpMetrics::new(cx.metrics()),
            metrics,
            stall: Stall::new(&cx),
        });
        let idle = shared::IdleTimeout::new(self.config.idle_timeout);
        let max_connections = self
            .config
            .max_connections
            .unwrap_or_else(shared::default_max_connections);
        let handshaker = tls.as_ref().map(shared::RunningTls::handshaker);
        let accept = |listener: std::net::TcpListener| {
            let listener = tokio::net::TcpListener::from_std(listener)?;
            Ok::<_, std::io::Error>(shared::TlsIncoming::new(
                shared::incoming(
                    listener,
                    max_connections,
                    idle.clone(),
                    shared.metrics.connections.clone(),
                ),
                handshaker.clone(),
            ))
        };

        let mut servers = tokio::task::JoinSet::new();
        let mut health = None;
        if let Some((listener, _)) = self.grpc {
            let (reporter, server) =
                grpc::serve(Arc::clone(&shared), &self.config, accept(listener)?, &cx).await;
            health = Some(reporter);
            servers.spawn(server);
        }
        if let Some((listener, _)) = self.http {
            servers.spawn(http::serve(
                Arc::clone(&shared),
                accept(listener)?,
                http::Http2::new(&self.config),
                cx.shutdown().clone(),
            ));
        }

        // Limits change live: each call reads the current ones.
        let mut params = cx.params::<OtlpConfig>();
        loop {
            tokio::select! {
                biased;
                _ = cx.shutdown().wait() => break,
                new = params.changed() => {
                    let old = shared.limits.load();
                    shared.limits.store(Arc::new(Limits::new(&new, Some(&old))));
                    idle.set(new.idle_timeout);
                    match (&tls, &new.tls) {
                        (Some(running), Some(config)) => running.update(config),
                        (None, None) => {}
                        _ => tracing::warn!(
                            stage = cx.id(),
                            "turning TLS on or off needs a restart; the listeners keep their mode"
                        ),
                    }
                }
                Some(served) = servers.join_next() => {
                    served??;
                    return Err("an OTLP server stopped on its own".into());
                }
            }
        }

        // Stop accepting: calls from now on are refused as unavailable; calls
        // in flight hold their own reference to the output and finish.
        shared.output.store(None);
        if let Some(health) = health {
            health.stop().await;
        }
        tracing::info!(stage = cx.id(), "otlp source stopped accepting");
        let _all = shared
            .calls
            .acquire_many(self.config.max_concurrent_calls)
            .await;
        let _ = tokio::time::timeout(ANSWER_GRACE, async {
            while servers.join_next().await.is_some() {}
        })
        .await;
        Ok(())
    }
}

//! `grpc`: the original service's `sensor.v1.SensorService/SendSensorValues`,
//! with a byte-rate limit, a message-size limit and backpressure, plus the
//! standard health service and server reflection on the same port.
//!
//! The service is written out here rather than generated so that every limit
//! is read per call and can change on reload without restarting the listener;
//! requests are decoded straight into readings by [`decode`].

mod decode;

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use async_trait::async_trait;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use prost::bytes::Buf;
use serde::{Deserialize, Serialize};
use sink_api::{
    Batch, BuildContext, ConfigError, Context, Output, SendError, Source, SourceConfig, StageError,
    Timestamp,
};
use sink_proto::SensorValuesResponse;
use tokio::sync::Semaphore;
use tonic::codec::{Codec, DecodeBuf, Decoder};
use tonic::codegen::{Body, BoxFuture, Service, StdError, http};
use tonic::server::{NamedService, UnaryService};
use tonic::transport::server::TcpIncoming;
use tonic::{Code, Request, Response, Status};
use tonic_prost::ProstEncoder;
use tonic_types::{ErrorDetails, StatusExt};

use self::decode::{DecodedRequest, decode_request};

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
const FULL_RETRY_DELAY: Duration = Duration::from_millis(100);

fn default_max_concurrent_calls() -> u32 {
    256
}

fn default_max_message_bytes() -> usize {
    4 * 1024 * 1024
}

impl RateLimit {
    fn burst(&self) -> u32 {
        self.burst_bytes.unwrap_or(self.bytes_per_second)
    }
}

#[typetag::serde(name = "grpc")]
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
        let listener = std::net::TcpListener::bind(listen_address(&self.address).as_ref())
            .and_then(|listener| listener.set_nonblocking(true).map(|()| listener))
            .map_err(|err| {
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
        }))
    }
}

sink_api::register_stage!(source "grpc" => GrpcConfig);

/// What `address` binds: Go's `:port` (an original `.env`'s
/// GRPC_SERVER_SOCKET may say `:8000`) is every IPv4 interface.
fn listen_address(address: &str) -> std::borrow::Cow<'_, str> {
    match address.strip_prefix(':') {
        Some(port) => format!("0.0.0.0:{port}").into(),
        None => address.into(),
    }
}

struct GrpcSource {
    config: GrpcConfig,
    listener: std::net::TcpListener,
    local: SocketAddr,
}

#[async_trait]
impl Source for GrpcSource {
    async fn run(self: Box<Self>, output: Output, cx: Context) -> Result<(), StageError> {
        let listener = tokio::net::TcpListener::from_std(self.listener)?;
        // Said here rather than at build: a later stage's build may still fail.
        tracing::info!(stage = cx.id(), "grpc source listening on {}", self.local);
        let shared = Arc::new(Shared {
            limits: ArcSwap::from_pointee(Limits::new(&self.config, None)),
            output: ArcSwapOption::from_pointee(output),
            calls: Arc::new(Semaphore::new(self.config.max_concurrent_calls as usize)),
        });
        let service = SensorService(Arc::clone(&shared));

        let (health, health_service) = tonic_health::server::health_reporter();
        health
            .set_service_status(
                sink_proto::SERVICE_NAME,
                tonic_health::ServingStatus::Serving,
            )
            .await;
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(sink_proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        };
        let reflection_v1 = reflection().build_v1()?;
        let reflection_v1alpha = reflection().build_v1alpha()?;

        let shutdown = cx.shutdown().clone();
        let mut server = tokio::spawn(
            tonic::transport::Server::builder()
                .tcp_nodelay(true)
                .max_concurrent_streams(Some(self.config.max_concurrent_calls))
                .add_service(health_service)
                .add_service(reflection_v1)
                .add_service(reflection_v1alpha)
                .add_service(service)
                .serve_with_incoming_shutdown(
                    // `tcp_nodelay` above applies only to listeners tonic binds
                    // itself; without it here, Nagle's algorithm holds small
                    // answers back until the client's delayed ACK, 40 ms later.
                    TcpIncoming::from(listener).with_nodelay(Some(true)),
                    async move { shutdown.wait().await },
                ),
        );

        // Limits change live: each call reads the current ones.
        let mut params = cx.params::<GrpcConfig>();
        loop {
            tokio::select! {
                // Shutdown first: the server also ends when shutdown starts.
                biased;
                _ = cx.shutdown().wait() => break,
                new = params.changed() => {
                    let old = shared.limits.load();
                    shared.limits.store(Arc::new(Limits::new(&new, Some(&old))));
                }
                served = &mut server => {
                    served??;
                    return Err("the gRPC server stopped on its own".into());
                }
            }
        }

        // Stop accepting: calls from now on answer UNAVAILABLE. Calls in flight
        // hold their own reference to the output and finish; the downstream
        // channel closes when the last of them does. Connections that clients
        // keep open cannot hold shutdown up, as they no longer reach the output.
        shared.output.store(None);
        health
            .set_service_status(
                sink_proto::SERVICE_NAME,
                tonic_health::ServingStatus::NotServing,
            )
            .await;
        health
            .set_service_status("", tonic_health::ServingStatus::NotServing)
            .await;
        tracing::info!(
            stage = cx.id(),
            "grpc source on {} stopped accepting",
            self.local
        );
        Ok(())
    }
}

/// What every call of one source shares: its limits and its output, each
/// swapped whole (on reload, and at shutdown) without a lock on the call path.
struct Shared {
    limits: ArcSwap<Limits>,
    output: ArcSwapOption<Output>,
    /// One permit per call being decoded or held: `max_concurrent_calls`.
    calls: Arc<Semaphore>,
}

/// The limits one call checks, swapped whole on reload.
struct Limits {
    max_message_bytes: usize,
    when_full: WhenFull,
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
            when_full: config.when_full,
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

/// The hand-written `sensor.v1.SensorService` server.
#[derive(Clone)]
struct SensorService(Arc<Shared>);

impl NamedService for SensorService {
    const NAME: &'static str = sink_proto::SERVICE_NAME;
}

impl<B> Service<http::Request<B>> for SensorService
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if request.uri().path() != sink_proto::SEND_SENSOR_VALUES_PATH {
            return Box::pin(async { Ok(Status::unimplemented("no such method").into_http()) });
        }
        let max_message_bytes = self.0.limits.load().max_message_bytes;
        let handler = SendSensorValues(self.clone());
        let calls = Arc::clone(&self.0.calls);
        Box::pin(async move {
            // Beyond `max_concurrent_calls`, wait here before the body is read.
            let Ok(_permit) = calls.acquire_owned().await else {
                return Ok(Status::unavailable("the sink is shutting down").into_http());
            };
            let mut grpc =
                tonic::server::Grpc::new(SensorCodec).max_decoding_message_size(max_message_bytes);
            let mut response = grpc.unary(handler, request).await;
            // tonic refuses an oversize message with OUT_OF_RANGE before reading
            // its body; the contract (like OTLP) requires RESOURCE_EXHAUSTED.
            // The handler itself never answers OUT_OF_RANGE.
            let headers = response.headers_mut();
            if headers.get("grpc-status").is_some_and(|code| code == "11") {
                headers.insert(
                    "grpc-status",
                    http::HeaderValue::from(Code::ResourceExhausted as i32),
                );
            }
            Ok(response)
        })
    }
}

/// tonic's prost codec for the response; requests are decoded by
/// [`decode::decode_request`] from one contiguous slice, straight into the
/// readings. (Decoding through tonic's `DecodeBuf` made prost advance a
/// `BytesMut` field by field, which the profile showed costing half as much
/// again as the decoding itself.)
#[derive(Debug, Clone, Copy)]
struct SensorCodec;

impl Codec for SensorCodec {
    type Encode = SensorValuesResponse;
    type Decode = DecodedRequest;
    type Encoder = ProstEncoder<SensorValuesResponse>;
    type Decoder = SensorDecoder;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::default()
    }

    fn decoder(&mut self) -> Self::Decoder {
        SensorDecoder
    }
}

/// Decodes a `SensorValuesRequest` from the bytes of one whole message,
/// stamping its readings with the time it arrived.
#[derive(Debug)]
struct SensorDecoder;

impl Decoder for SensorDecoder {
    type Item = DecodedRequest;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, Status> {
        let len = src.remaining();
        let received_at = Timestamp::now();
        // `DecodeBuf` views one `BytesMut`, so its first chunk is the whole
        // message; the fallback only keeps this correct should that change.
        let decoded = if src.chunk().len() == len {
            let decoded = decode_request(src.chunk(), received_at);
            src.advance(len);
            decoded
        } else {
            decode_request(&src.copy_to_bytes(len), received_at)
        };
        decoded.map(Some)
    }
}

/// Decodes one encoded `SensorValuesRequest` into the batch a call hands on,
/// all stamped `received_at`, as the service does for every call. Public for
/// the benchmarks (`cargo bench -p sink-stages`).
pub fn decode_batch(message: &[u8], received_at: Timestamp) -> Result<Batch, Status> {
    decode_request(message, received_at)?.readings
}

struct SendSensorValues(SensorService);

impl UnaryService<DecodedRequest> for SendSensorValues {
    type Response = SensorValuesResponse;
    type Future = BoxFuture<Response<SensorValuesResponse>, Status>;

    fn call(&mut self, request: Request<DecodedRequest>) -> Self::Future {
        let service = self.0.clone();
        Box::pin(async move { service.accept(request.into_inner()).await })
    }
}

impl SensorService {
    /// Admits the request under the limits and hands its readings on; OK means
    /// they are in the pipeline. A request with an invalid timestamp is
    /// refused only once it has passed the other checks.
    async fn accept(
        &self,
        request: DecodedRequest,
    ) -> Result<Response<SensorValuesResponse>, Status> {
        if request.is_empty() {
            return Ok(Response::new(SensorValuesResponse {}));
        }
        let Some(output) = self.0.output.load_full() else {
            return Err(Status::unavailable("the sink is shutting down"));
        };
        let limits = self.0.limits.load_full();
        if let Some((limit, bucket)) = &limits.rate {
            admit(request.encoded_len, *limit, bucket)?;
        }
        let batch = request.readings?;
        let sent = match limits.when_full {
            WhenFull::Wait => output.send(batch).await,
            WhenFull::Reject => output.try_send(batch),
        };
        match sent {
            Ok(()) => Ok(Response::new(SensorValuesResponse {})),
            Err(SendError::Full(_)) => Err(retry_status(
                Code::Unavailable,
                "the pipeline is full; retry later".into(),
                FULL_RETRY_DELAY,
            )),
            Err(SendError::Closed(_)) => Err(Status::unavailable("the pipeline is shutting down")),
        }
    }
}

/// Takes `cost` bytes from the bucket, or says when to retry.
fn admit(cost: usize, limit: RateLimit, bucket: &DefaultDirectRateLimiter) -> Result<(), Status> {
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
fn retry_status(code: Code, message: String, delay: Duration) -> Status {
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
                    }),
                },
                SensorValue {
                    sensor_name: "t2".into(),
                    measurement: None,
                },
            ],
        };
        let received_at = Timestamp::new(1_795_860_001, 0).unwrap();
        let batch = decode_batch(&request.encode_to_vec(), received_at).unwrap();
        assert_eq!(batch.len(), 2);
        assert_eq!(batch[0].sensor_name, "t1");
        assert_eq!(batch[0].value, Some(0));
        assert_eq!(
            batch[0].created_at,
            Timestamp::new(1_795_860_000, 512_000_000)
        );
        assert_eq!(batch[1].value, None);
        assert_eq!(batch[1].created_at, None);
        assert!(batch.iter().all(|r| r.received_at == received_at));

        let garbage = decode_batch(&[0xff, 0xff, 0xff], received_at).unwrap_err();
        assert_eq!(garbage.code(), Code::Internal);
    }

    #[test]
    fn a_go_style_port_only_address_listens_on_every_interface() {
        assert_eq!(listen_address(":8000"), "0.0.0.0:8000");
        assert_eq!(listen_address("127.0.0.1:8000"), "127.0.0.1:8000");
        assert_eq!(listen_address("[::]:8000"), "[::]:8000");
    }
}

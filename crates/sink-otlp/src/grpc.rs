//! OTLP/gRPC: `opentelemetry.proto.collector.metrics.v1.MetricsService/Export`,
//! unary, with the gRPC health service on the same listener.
//!
//! Written out, as the grpc source's service is, so that each limit acts
//! before the bytes that would break it are read: the message prefix is read
//! first (size and rate limit checked on it), then the permit and memory are
//! taken, then the body is read within `body_timeout`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message;
use sink_api::{Context, StageError};
use sink_stages::sources::grpc::shared::{
    self, ACCEPTED_ENCODINGS, BodyReader, CONNECTION_WINDOW, Connection, Encoding, Refusal,
    STREAM_WINDOW, TlsIncoming, TrackCalls,
};
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout_at};
use tonic::codegen::{Body, BoxFuture, Service, StdError, http};
use tonic::server::NamedService;
use tonic::{Code, Status};
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::export::{Exported, Format, Shared};
use crate::proto::collector::metrics::v1::{
    ExportMetricsPartialSuccess, ExportMetricsServiceResponse,
};
use crate::{EXPORT_PATH, OtlpConfig, SERVICE_NAME};

/// The health service's view of the source, until shutdown.
pub struct Health {
    reporter: HealthReporter,
    task: JoinHandle<()>,
}

impl Health {
    /// Stops following readiness and answers NOT_SERVING from now on.
    pub async fn stop(self) {
        self.task.abort();
        let _ = self.task.await;
        for service in [SERVICE_NAME, ""] {
            self.reporter
                .set_service_status(service, ServingStatus::NotServing)
                .await;
        }
    }
}

type Accepted = TlsIncoming<shared::Incoming, Connection>;

/// The gRPC server over `incoming`, until shutdown; and its health service.
pub async fn serve(
    shared: Arc<Shared>,
    config: &OtlpConfig,
    incoming: Accepted,
    cx: &Context,
) -> (
    Health,
    impl Future<Output = Result<(), StageError>> + Send + 'static,
) {
    let (reporter, health_service) = tonic_health::server::health_reporter();
    let task = shared::report_health(reporter.clone(), cx, SERVICE_NAME).await;
    let routes = tonic::service::Routes::new(health_service)
        .add_service(MetricsService(shared))
        .prepare();
    let shutdown = cx.shutdown().clone();
    let server = tonic::transport::Server::builder()
        .max_concurrent_streams(Some(config.max_concurrent_calls))
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .http2_keepalive_interval(Some(config.keepalive_interval))
        .http2_keepalive_timeout(Some(config.keepalive_timeout))
        .serve_with_incoming_shutdown(TrackCalls(routes), incoming, async move {
            shutdown.wait().await
        });
    let server = async move { server.await.map_err(StageError::from) };
    (Health { reporter, task }, server)
}

/// The hand-written `MetricsService` server.
#[derive(Clone)]
struct MetricsService(Arc<Shared>);

impl NamedService for MetricsService {
    const NAME: &'static str = SERVICE_NAME;
}

impl<B> Service<http::Request<B>> for MetricsService
where
    B: Body + Send + Unpin + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let started = std::time::Instant::now();
        if request.uri().path() != EXPORT_PATH {
            let response = Status::unimplemented("no such method").into_http();
            self.0.metrics.answered_with(started, &response);
            return Box::pin(async { Ok(response) });
        }
        let service = self.clone();
        Box::pin(async move {
            let response = match service.export(request, started.into()).await {
                Ok(exported) => ok_response(&exported),
                Err(status) => status.into_http(),
            };
            service.0.metrics.answered_with(started, &response);
            Ok(response)
        })
    }
}

impl MetricsService {
    async fn export<B>(
        &self,
        request: http::Request<B>,
        started: Instant,
    ) -> Result<Exported, Status>
    where
        B: Body + Unpin,
        B::Error: Into<StdError>,
    {
        let shared = &self.0;
        let limits = shared.limits.load_full();
        let (head, body) = request.into_parts();
        let encoding = Encoding::from_headers(&head.headers)?;
        let mut body = BodyReader::new(body);
        let too_slow = || {
            shared.metrics.refused(Refusal::BodyTimeout);
            Status::deadline_exceeded(format!(
                "the request body did not arrive within body_timeout ({})",
                humantime::format_duration(limits.body_timeout)
            ))
        };
        let prefix = timeout_at(started + limits.body_timeout, body.prefix())
            .await
            .map_err(|_| too_slow())??;
        let Some(prefix) = prefix else {
            return Err(Status::invalid_argument("the request carries no message"));
        };
        shared.admit(&limits, prefix.len)?;
        let waited = Instant::now();
        let raw_len = if prefix.compressed {
            limits.max_message_bytes
        } else {
            prefix.len
        };
        let held = shared.hold(&limits, raw_len).await?;
        let deadline = started + limits.body_timeout + waited.elapsed();
        let message = timeout_at(deadline, body.message(prefix))
            .await
            .map_err(|_| too_slow())??;
        let message = if prefix.compressed {
            shared::decompress(encoding, &message, limits.max_message_bytes).inspect_err(
                |status| {
                    if status.code() == Code::ResourceExhausted {
                        shared.metrics.refused(Refusal::MessageTooLarge);
                    }
                },
            )?
        } else {
            message
        };
        shared
            .export(&limits, message, Format::Protobuf, held)
            .await
    }
}

/// The answer to an export that succeeded: the `ExportMetricsServiceResponse`
/// (with `partial_success` when points were rejected) and OK in the trailers.
fn ok_response(exported: &Exported) -> http::Response<tonic::body::Body> {
    let message = response_message(exported).encode_to_vec();
    let mut frame = BytesMut::with_capacity(5 + message.len());
    frame.put_u8(0);
    frame.put_u32(message.len() as u32);
    frame.put_slice(&message);
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
    let mut response = http::Response::new(tonic::body::Body::new(Unary {
        message: Some(frame.freeze()),
        trailers: Some(trailers),
    }));
    let headers = response.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    headers.insert(
        "grpc-accept-encoding",
        http::HeaderValue::from_static(ACCEPTED_ENCODINGS),
    );
    response
}

/// The response message for `exported`.
pub fn response_message(exported: &Exported) -> ExportMetricsServiceResponse {
    ExportMetricsServiceResponse {
        partial_success: (exported.rejected > 0 || !exported.error_message.is_empty()).then(|| {
            ExportMetricsPartialSuccess {
                rejected_data_points: exported.rejected as i64,
                error_message: exported.error_message.clone(),
            }
        }),
    }
}

/// A body of one data frame, then trailers (if any).
pub struct Unary {
    pub message: Option<Bytes>,
    pub trailers: Option<http::HeaderMap>,
}

impl Body for Unary {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        if let Some(message) = this.message.take() {
            return Poll::Ready(Some(Ok(http_body::Frame::data(message))));
        }
        Poll::Ready(
            this.trailers
                .take()
                .map(|t| Ok(http_body::Frame::trailers(t))),
        )
    }

    fn is_end_stream(&self) -> bool {
        self.message.is_none() && self.trailers.is_none()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match &self.message {
            Some(message) if self.trailers.is_none() => {
                http_body::SizeHint::with_exact(message.len() as u64)
            }
            _ => http_body::SizeHint::default(),
        }
    }
}

//! OTLP/HTTP: `POST /v1/metrics` with an `application/x-protobuf` or
//! `application/json` body, `Content-Encoding: gzip` (or zstd) or none, over
//! HTTP/1.1 or HTTP/2 (by ALPN under TLS, by the connection's first bytes in
//! plaintext), on the grpc source's accept loop.
//!
//! The answers are the specification's: 200 with an
//! `ExportMetricsServiceResponse` in the request's encoding (its
//! `partial_success` when points were rejected); on failure a
//! `google.rpc.Status` in the request's encoding, with 400 for a body that
//! does not decode, 413 for one too large, 415 for an unknown content type
//! or encoding, 429 (rate limit) and 503 (full, shutting down, not written)
//! with `Retry-After` where a wait is known, 408 when the body is too slow.
//! Only 429, 502, 503 and 504 are retryable in OTLP/HTTP, so each failure's
//! code says whether the client should send it again.

use std::convert::Infallible;
use std::future::poll_fn;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body::Body;
use hyper::body::Incoming as RequestBody;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use prost::Message;
use sink_api::{ShutdownSignal, StageError};
use sink_stages::sources::grpc::shared::{
    self, CONNECTION_WINDOW, Conn, Connection, ConnectionInfo, Encoding, Refusal, STREAM_WINDOW,
    TlsIncoming,
};
use tokio::task::JoinSet;
use tokio::time::{Instant, timeout_at};
use tokio_stream::StreamExt;
use tonic::transport::server::Connected;
use tonic::{Code, Status};
use tonic_types::StatusExt;

use crate::export::{Exported, Format, Shared};
use crate::grpc::{Unary, response_message};
use crate::{HTTP_PATH, OtlpConfig};

type Accepted = TlsIncoming<shared::Incoming, Connection>;

/// How long open connections get, once shutdown starts, to finish their
/// requests before they are closed.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// The HTTP/2 settings of the listener (HTTP/1.1 needs none beyond the
/// header timeout, which is `body_timeout`'s).
#[derive(Clone, Copy)]
pub struct Http2 {
    max_streams: u32,
    keepalive_interval: Duration,
    keepalive_timeout: Duration,
}

impl Http2 {
    /// As the gRPC listener has them.
    pub fn new(config: &OtlpConfig) -> Self {
        Self {
            max_streams: config.max_concurrent_calls,
            keepalive_interval: config.keepalive_interval,
            keepalive_timeout: config.keepalive_timeout,
        }
    }
}

/// Serves OTLP/HTTP on the connections of `incoming` until shutdown, then
/// lets the open ones finish (answering their last request) within
/// [`CLOSE_GRACE`].
pub async fn serve(
    shared: Arc<Shared>,
    mut incoming: Accepted,
    http2: Http2,
    shutdown: ShutdownSignal,
) -> Result<(), StageError> {
    let mut connections = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            _ = shutdown.wait() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = incoming.next() => accepted,
        };
        let conn = match accepted {
            Some(Ok(conn)) => conn,
            // The accept loop logs and backs off on its own.
            Some(Err(_)) => continue,
            None => break,
        };
        connections.spawn(connection(
            Arc::clone(&shared),
            conn,
            http2,
            shutdown.clone(),
        ));
    }
    drop(incoming);
    let _ = tokio::time::timeout(CLOSE_GRACE, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    Ok(())
}

/// Serves one connection: HTTP/1.1 with keep-alive, its headers within
/// `body_timeout`, or HTTP/2 with the gRPC listener's windows and stream
/// bound; each request counted as activity for the idle timeout.
async fn connection(
    shared: Arc<Shared>,
    conn: Conn<Connection>,
    http2: Http2,
    shutdown: ShutdownSignal,
) {
    let info: ConnectionInfo = conn.connect_info();
    let header_timeout = shared.limits.load().body_timeout;
    let service = hyper::service::service_fn(move |request| {
        let shared = Arc::clone(&shared);
        let activity = info.activity.begin();
        async move {
            let response = handle(&shared, request).await;
            drop(activity);
            Ok::<_, Infallible>(response)
        }
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .max_buf_size(64 * 1024);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(http2.max_streams)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .keep_alive_interval(http2.keepalive_interval)
        .keep_alive_timeout(http2.keepalive_timeout);
    let serving = builder.serve_connection(TokioIo::new(conn), service);
    let mut serving = std::pin::pin!(serving);
    tokio::select! {
        _ = serving.as_mut() => return,
        _ = shutdown.wait() => {}
    }
    serving.as_mut().graceful_shutdown();
    let _ = serving.await;
}

/// The answer to one request, counted by status.
async fn handle(shared: &Shared, request: Request<RequestBody>) -> Response<Unary> {
    let format = format_of(&request);
    let response = match answer(shared, request, format).await {
        Ok(exported) => success(format.unwrap_or(Format::Protobuf), &exported),
        Err(failure) => failure.into_response(format.unwrap_or(Format::Protobuf)),
    };
    shared.otlp.http(response.status().as_u16());
    response
}

/// The body's encoding, from `Content-Type`; `None` when it is neither.
fn format_of<B>(request: &Request<B>) -> Option<Format> {
    let value = request.headers().get(header::CONTENT_TYPE)?.to_str().ok()?;
    let media = value.split(';').next()?.trim();
    if media.eq_ignore_ascii_case("application/x-protobuf")
        || media.eq_ignore_ascii_case("application/protobuf")
    {
        Some(Format::Protobuf)
    } else if media.eq_ignore_ascii_case("application/json") {
        Some(Format::Json)
    } else {
        None
    }
}

/// A failed request: its HTTP status, the gRPC status it stands for, and
/// the wait a client should make before sending it again, if known.
struct Failure {
    status: StatusCode,
    code: Code,
    message: String,
    retry_after: Option<Duration>,
    allow: bool,
}

impl Failure {
    fn new(status: StatusCode, code: Code, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after: None,
            allow: false,
        }
    }

    fn into_response(self, format: Format) -> Response<Unary> {
        let body = match format {
            Format::Protobuf => RpcStatus {
                code: self.code as i32,
                message: self.message,
            }
            .encode_to_vec(),
            Format::Json => serde_json::json!({"code": self.code as i32, "message": self.message})
                .to_string()
                .into_bytes(),
        };
        let mut response = respond(self.status, format, body);
        if let Some(wait) = self.retry_after {
            // Whole seconds, rounded up: a client that waits that long finds room.
            let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds.max(1)));
        }
        if self.allow {
            response
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("POST"));
        }
        response
    }
}

/// A gRPC status as OTLP/HTTP answers it.
impl From<Status> for Failure {
    fn from(status: Status) -> Self {
        let retry_after = status.get_details_retry_info().and_then(|r| r.retry_delay);
        let http = match status.code() {
            Code::ResourceExhausted if retry_after.is_some() => StatusCode::TOO_MANY_REQUESTS,
            Code::ResourceExhausted => StatusCode::PAYLOAD_TOO_LARGE,
            Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Code::DeadlineExceeded => StatusCode::REQUEST_TIMEOUT,
            Code::InvalidArgument | Code::Internal | Code::Cancelled => StatusCode::BAD_REQUEST,
            Code::Unimplemented => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self {
            status: http,
            code: status.code(),
            message: status.message().to_owned(),
            retry_after,
            allow: false,
        }
    }
}

/// `google.rpc.Status`, the body of an OTLP/HTTP failure.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RpcStatus {
    /// The gRPC code the failure stands for.
    #[prost(int32, tag = "1")]
    pub code: i32,
    /// What went wrong.
    #[prost(string, tag = "2")]
    pub message: String,
}

fn respond(status: StatusCode, format: Format, body: Vec<u8>) -> Response<Unary> {
    let mut response = Response::new(Unary {
        message: Some(Bytes::from(body)),
        trailers: None,
    });
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(match format {
            Format::Protobuf => "application/x-protobuf",
            Format::Json => "application/json",
        }),
    );
    response
}

/// 200 with the `ExportMetricsServiceResponse`.
fn success(format: Format, exported: &Exported) -> Response<Unary> {
    let message = response_message(exported);
    let body = match format {
        Format::Protobuf => message.encode_to_vec(),
        Format::Json => match message.partial_success {
            // int64 as a decimal string, as protobuf's JSON mapping writes it.
            Some(partial) => serde_json::json!({"partialSuccess": {
                "rejectedDataPoints": partial.rejected_data_points.to_string(),
                "errorMessage": partial.error_message,
            }})
            .to_string()
            .into_bytes(),
            None => b"{}".to_vec(),
        },
    };
    respond(StatusCode::OK, format, body)
}

/// Serves one request: the checks made on its headers, then the body (read
/// once the permit and memory are held), then the export.
async fn answer(
    shared: &Shared,
    request: Request<RequestBody>,
    format: Option<Format>,
) -> Result<Exported, Failure> {
    let started = Instant::now();
    if request.uri().path() != HTTP_PATH {
        return Err(Failure::new(
            StatusCode::NOT_FOUND,
            Code::Unimplemented,
            format!("no such path; OTLP metrics go to POST {HTTP_PATH}"),
        ));
    }
    if request.method() != Method::POST {
        let mut failure = Failure::new(
            StatusCode::METHOD_NOT_ALLOWED,
            Code::Unimplemented,
            format!("{HTTP_PATH} takes POST"),
        );
        failure.allow = true;
        return Err(failure);
    }
    let Some(format) = format else {
        return Err(Failure::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Code::InvalidArgument,
            "Content-Type must be application/x-protobuf or application/json",
        ));
    };
    let encoding = match request.headers().get(header::CONTENT_ENCODING) {
        None => Encoding::Identity,
        Some(value) => match value.as_bytes() {
            b"identity" => Encoding::Identity,
            b"gzip" => Encoding::Gzip,
            b"zstd" => Encoding::Zstd,
            other => {
                return Err(Failure::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    Code::Unimplemented,
                    format!(
                        "Content-Encoding {:?} is not supported; use gzip, zstd or none",
                        String::from_utf8_lossy(other)
                    ),
                ));
            }
        },
    };
    let limits = shared.limits.load_full();
    let length = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok()?.parse::<usize>().ok());
    // With a length, the size and the rate limit act before the body is
    // read; without one (chunked), the body is read up to the size limit
    // and charged once read.
    if let Some(length) = length {
        shared.admit(&limits, length)?;
    } else if shared.output.load().is_none() {
        shared.metrics.refused(Refusal::ShuttingDown);
        return Err(Status::unavailable("the sink is shutting down").into());
    }
    let raw_len = match (length, encoding) {
        (Some(length), Encoding::Identity) => length,
        _ => limits.max_message_bytes,
    };
    let waited = Instant::now();
    let held = shared.hold(&limits, raw_len).await?;
    let deadline = started + limits.body_timeout + waited.elapsed();
    let body = timeout_at(
        deadline,
        read_body(request.into_body(), limits.max_message_bytes),
    )
    .await
    .map_err(|_| {
        shared.metrics.refused(Refusal::BodyTimeout);
        Status::deadline_exceeded(format!(
            "the request body did not arrive within body_timeout ({})",
            humantime::format_duration(limits.body_timeout)
        ))
    })?
    .inspect_err(|status| {
        if status.code() == Code::ResourceExhausted {
            shared.metrics.refused(Refusal::MessageTooLarge);
        }
    })?;
    if length.is_none() && !body.is_empty() {
        shared.charge(&limits, body.len())?;
    }
    let message = match encoding {
        Encoding::Identity => body,
        _ => shared::decompress(encoding, &body, limits.max_message_bytes).map_err(|status| {
            if status.code() == Code::ResourceExhausted {
                shared.metrics.refused(Refusal::MessageTooLarge);
                return status;
            }
            // Corrupt compressed bytes are bad data, not a server fault.
            Status::invalid_argument(status.message())
        })?,
    };
    Ok(shared.export(&limits, message, format, held).await?)
}

/// Reads a whole body of at most `max` bytes, into a buffer that grows with
/// what arrives.
async fn read_body(body: RequestBody, max: usize) -> Result<Bytes, Status> {
    let mut body = std::pin::pin!(body);
    let mut buf = BytesMut::new();
    while let Some(frame) = poll_fn(|cx| Pin::as_mut(&mut body).poll_frame(cx)).await {
        let frame =
            frame.map_err(|err| Status::cancelled(format!("the request body broke off: {err}")))?;
        if let Ok(data) = frame.into_data() {
            if buf.len() + data.len() > max {
                return Err(Status::resource_exhausted(format!(
                    "the request body is larger than max_message_bytes ({max} bytes)"
                )));
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(buf.freeze())
}

//! A minimal gRPC client for the one unary method sink-load calls, straight
//! on HTTP/2.
//!
//! tonic's client encodes every message again and passes every call through a
//! tower buffer task; at one reading per call that made sink-load spend about
//! as much CPU as the sink it measures. Here a call is one HTTP/2 stream: the
//! request headers, one DATA frame that shares the bytes framed before the run
//! (no copy), and the status read from the answer's trailers as tonic reads it.

use std::time::Duration;

use anyhow::Context as _;
use base64::Engine as _;
use base64::alphabet;
use base64::engine::DecodePaddingMode;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use bytes::Bytes;
use h2::client::SendRequest;
use http::header::{CONTENT_TYPE, HeaderMap, HeaderValue, TE};
use http::{Method, Request, StatusCode, Uri};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tonic::{Code, Status};

use crate::tls::Tls;

/// How long connecting may take before sink-load gives up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// One HTTP/2 connection to the sink; cheap to clone, clones share it.
#[derive(Clone)]
pub struct Connection {
    sender: SendRequest<Bytes>,
    uri: Uri,
    /// OTLP/HTTP (a protobuf body, the answer in the HTTP status) rather
    /// than a gRPC call.
    otlp_http: bool,
}

impl Connection {
    /// Connects to `address` (`host:port`, `http://host:port` or
    /// `https://host:port`), over TLS with `tls`, to call the method at `path`
    /// (`/v1/metrics`: OTLP/HTTP over HTTP/2).
    pub async fn open(address: &str, tls: Option<&Tls>, path: &str) -> anyhow::Result<Self> {
        let otlp_http = path == OTLP_HTTP_PATH;
        let authority = authority(address);
        let scheme = if tls.is_some() { "https" } else { "http" };
        let uri: Uri = format!("{scheme}://{authority}{path}")
            .parse()
            .with_context(|| format!("bad address {address}"))?;
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(authority))
            .await
            .map_err(|_| anyhow::anyhow!("timed out after {CONNECT_TIMEOUT:?}"))
            .and_then(|connected| Ok(connected?))
            .with_context(|| format!("cannot connect to {authority}"))?;
        // Small requests and answers must not wait for Nagle's algorithm.
        tcp.set_nodelay(true)?;
        let sender = match tls {
            None => http2(tcp, authority).await?,
            Some(tls) => {
                let stream = tokio::time::timeout(CONNECT_TIMEOUT, tls.connect(tcp))
                    .await
                    .map_err(|_| anyhow::anyhow!("timed out after {CONNECT_TIMEOUT:?}"))
                    .and_then(|handshake| Ok(handshake?))
                    .with_context(|| format!("TLS handshake with {authority} failed"))?;
                http2(stream, authority).await?
            }
        };
        Ok(Self {
            sender,
            uri,
            otlp_http,
        })
    }

    /// Sends one gRPC frame (the 5-byte prefix and the message) as a unary
    /// call; `Ok` when the server answered OK.
    pub async fn call(&self, frame: Bytes) -> Result<(), Failure> {
        let mut sender = self
            .sender
            .clone()
            .ready()
            .await
            .map_err(Failure::ConnectionLost)?;
        let mut request = Request::new(());
        *request.method_mut() = Method::POST;
        *request.uri_mut() = self.uri.clone();
        let headers = request.headers_mut();
        if self.otlp_http {
            headers.insert(
                CONTENT_TYPE,
                HeaderValue::from_static("application/x-protobuf"),
            );
        } else {
            headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
            headers.insert(TE, HeaderValue::from_static("trailers"));
        }
        let (answer, mut stream) = sender.send_request(request, false).map_err(lost)?;
        // OTLP/HTTP sends the message alone, without the gRPC prefix.
        let body = if self.otlp_http {
            frame.slice(5..)
        } else {
            frame
        };
        stream.send_data(body, true).map_err(lost)?;

        let (head, mut body) = answer.await.map_err(lost)?.into_parts();
        if self.otlp_http && head.status == StatusCode::OK {
            while let Some(chunk) = body.data().await {
                let chunk = chunk.map_err(lost)?;
                let _ = body.flow_control().release_capacity(chunk.len());
            }
            return Ok(());
        }
        if head.status != StatusCode::OK {
            return Err(Failure::Status(Status::new(
                http_code(head.status),
                format!("HTTP status {}", head.status),
            )));
        }
        // A "trailers-only" answer (an error before any message) carries the
        // status in its headers.
        if let Some(status) = status_of(&head.headers) {
            return status.map_err(Failure::Status);
        }
        while let Some(chunk) = body.data().await {
            let chunk = chunk.map_err(lost)?;
            // The answer is the empty SensorValuesResponse: nothing to read,
            // but the window must be given back.
            let _ = body.flow_control().release_capacity(chunk.len());
        }
        let trailers = body.trailers().await.map_err(lost)?;
        trailers
            .as_ref()
            .and_then(status_of)
            .unwrap_or_else(|| Err(Status::internal("answer without a grpc-status")))
            .map_err(Failure::Status)
    }
}

/// The OTLP/HTTP path for metrics.
pub const OTLP_HTTP_PATH: &str = "/v1/metrics";

/// The `host:port` of `address`, without a scheme.
pub fn authority(address: &str) -> &str {
    address
        .strip_prefix("http://")
        .or_else(|| address.strip_prefix("https://"))
        .unwrap_or(address)
}

/// The HTTP/2 handshake over `io`; the connection is then driven by its own
/// task, and once it fails, every call on it fails with the error, which the
/// caller counts.
async fn http2<T>(io: T, authority: &str) -> anyhow::Result<SendRequest<Bytes>>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = h2::client::Builder::new()
        .initial_window_size(1 << 20)
        .initial_connection_window_size(8 << 20)
        .handshake(io)
        .await
        .with_context(|| format!("HTTP/2 handshake with {authority} failed"))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}

/// Why a call failed.
#[derive(Debug)]
pub enum Failure {
    /// The server answered with this status, or reset the call's stream
    /// (UNAVAILABLE): the call may be retried on the same connection.
    Status(Status),
    /// The connection itself is gone (closed, broken, or told to go away):
    /// every call on it would fail at once, so retrying on it only spins.
    ConnectionLost(h2::Error),
}

/// The outcome that `headers` carry, if they have a `grpc-status`.
fn status_of(headers: &HeaderMap) -> Option<Result<(), Status>> {
    let code = headers.get("grpc-status")?;
    if code == "0" {
        return Some(Ok(()));
    }
    // tonic panics on details that are not base64; keep such details out.
    let details_ok = headers
        .get("grpc-status-details-bin")
        .is_none_or(|details| TONIC_BASE64.decode(details.as_bytes()).is_ok());
    let status = if details_ok {
        Status::from_header_map(headers)
    } else {
        let mut cleaned = headers.clone();
        cleaned.remove("grpc-status-details-bin");
        Status::from_header_map(&cleaned)
    };
    status.map(Err)
}

/// The base64 that tonic decodes `grpc-status-details-bin` with.
const TONIC_BASE64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// A reset stream is UNAVAILABLE, which is retried; a broken or closing
/// connection is [`Failure::ConnectionLost`].
fn lost(err: h2::Error) -> Failure {
    if err.is_reset() && !err.is_go_away() {
        Failure::Status(Status::unavailable(format!("HTTP/2: {err}")))
    } else {
        Failure::ConnectionLost(err)
    }
}

/// The gRPC code for an HTTP status other than 200, as the gRPC spec maps them.
fn http_code(status: StatusCode) -> Code {
    match status.as_u16() {
        400 => Code::Internal,
        401 => Code::Unauthenticated,
        403 => Code::PermissionDenied,
        404 => Code::Unimplemented,
        429 | 502..=504 => Code::Unavailable,
        _ => Code::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(name, value)| {
                (
                    http::HeaderName::from_static(name),
                    HeaderValue::from_static(value),
                )
            })
            .collect()
    }

    #[test]
    fn reads_ok_and_error_statuses() {
        assert!(status_of(&HeaderMap::new()).is_none());
        assert!(matches!(
            status_of(&headers(&[("grpc-status", "0")])),
            Some(Ok(()))
        ));
        let status = status_of(&headers(&[
            ("grpc-status", "8"),
            ("grpc-message", "slow%20down"),
        ]))
        .and_then(Result::err)
        .expect("an error");
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert_eq!(status.message(), "slow down");
    }

    #[test]
    fn undecodable_details_are_dropped_not_a_panic() {
        let status = status_of(&headers(&[
            ("grpc-status", "14"),
            ("grpc-status-details-bin", "!!not base64!!"),
        ]))
        .and_then(Result::err)
        .expect("an error");
        assert_eq!(status.code(), Code::Unavailable);
        assert!(status.details().is_empty());
    }

    #[test]
    fn http_errors_map_as_the_grpc_spec_says() {
        assert_eq!(
            http_code(StatusCode::SERVICE_UNAVAILABLE),
            Code::Unavailable
        );
        assert_eq!(http_code(StatusCode::NOT_FOUND), Code::Unimplemented);
        assert_eq!(http_code(StatusCode::IM_A_TEAPOT), Code::Unknown);
    }
}

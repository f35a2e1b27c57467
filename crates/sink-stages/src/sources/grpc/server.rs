//! The grpc source's HTTP/2 server, written on the `h2` crate rather than
//! served through tonic's transport (hyper).
//!
//! `SendSensorValues` is the one call a sensor makes, often with one reading
//! per call, so its path is kept short: the request goes from h2 straight to
//! [`SensorService::answer`](super::SensorService) (prefix, limits, decode,
//! hand-off) and the answer is a fixed one, with no router, no boxed body
//! and no per-request service stack. Every other path (health, reflection,
//! unknown methods) goes to tonic's routes behind the same listener, so that
//! probes, grpcurl and every client see the same server as before.
//!
//! h2 keeps the framing, HPACK, flow control and its defences against
//! protocol abuse (rapid reset, CONTINUATION floods, oversized header lists,
//! PING floods); this module sets the same limits hyper's server set, and
//! adds what hyper did around them:
//!
//! - **keepalive**: a PING every `keepalive_interval`; no answer within
//!   `keepalive_timeout` drops the connection;
//! - **graceful shutdown**: when shutdown starts the listener closes, every
//!   connection gets a GOAWAY, and calls in flight are answered;
//! - **cancellation**: a call whose client resets the stream (or whose
//!   connection dies) is dropped at once, freeing its permit and memory;
//! - **deadlines**: a client's `grpc-timeout` ends its call with
//!   DEADLINE_EXCEEDED, as tonic did;
//! - **bounded answers**: a long-lived stream's answer is written only as
//!   the client's flow-control window opens, one frame at a time.

use std::fmt::Display;
use std::future::{Future, poll_fn};
use std::pin::{Pin, pin};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::FuturesUnordered;
use h2::server::SendResponse;
use h2::{Ping, PingPong, RecvStream, SendStream};
use http_body::{Body, Frame};
use sink_api::ShutdownSignal;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::task::JoinSet;
use tokio_stream::{Stream, StreamExt};
use tonic::codegen::{Service, http};
use tonic::transport::server::Connected;
use tonic::{Code, Status};

use super::incoming::{ConnectionInfo, LimitStreams};
use super::{CONNECTION_WINDOW, STREAM_WINDOW, SensorService};

/// The largest header list a request may carry, as hyper's server granted:
/// a larger one is refused before it is decoded whole.
pub const MAX_HEADER_LIST_SIZE: u32 = 16 * 1024;

/// The most a stream may buffer of its answer before the client's window
/// opens, as hyper's server allowed.
const MAX_SEND_BUFFER: usize = 400 * 1024;

/// Streams a connection may cause the server to reset for errors before it
/// is closed with ENHANCE_YOUR_CALM (MadeYouReset): hyper's default, which
/// tonic's server turned off.
const MAX_LOCAL_ERROR_RESETS: usize = 1024;

// Named once: a name given as text is parsed again at every use.
const GRPC_ACCEPT_ENCODING: http::HeaderName =
    http::HeaderName::from_static("grpc-accept-encoding");
const GRPC_STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");
const GRPC_TIMEOUT: http::HeaderName = http::HeaderName::from_static("grpc-timeout");

/// How the HTTP/2 connections are run: the stream bound and keepalive.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Streams one connection may open at once (`max_concurrent_calls`).
    pub max_concurrent_streams: u32,
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
}

impl Settings {
    fn builder(&self) -> h2::server::Builder {
        let mut builder = h2::server::Builder::new();
        builder
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_concurrent_streams(self.max_concurrent_streams)
            .max_header_list_size(MAX_HEADER_LIST_SIZE)
            .max_send_buffer_size(MAX_SEND_BUFFER)
            .max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESETS));
        builder
    }
}

/// A connection the server can serve: accepted, and over TLS or not.
pub trait Transport:
    AsyncRead + AsyncWrite + Connected<ConnectInfo = ConnectionInfo> + Unpin + Send + 'static
{
}

impl<T> Transport for T where
    T: AsyncRead + AsyncWrite + Connected<ConnectInfo = ConnectionInfo> + Unpin + Send + 'static
{
}

/// Where every path but `SendSensorValues` goes: tonic's services (health,
/// reflection), with the bound on long-lived streams.
pub type OtherRoutes = LimitStreams<tonic::service::Routes>;

/// Serves every connection of `incoming` until `shutdown` starts, then
/// closes the listener (by dropping `incoming`), sends every connection a
/// GOAWAY, and returns once they have all closed.
pub async fn serve<I, IO, E>(
    incoming: I,
    settings: Settings,
    sensor: SensorService,
    other: OtherRoutes,
    shutdown: ShutdownSignal,
) where
    I: Stream<Item = Result<IO, E>>,
    E: Display,
    IO: Transport,
{
    let builder = settings.builder();
    let mut connections = JoinSet::new();
    let mut incoming = Box::pin(incoming);
    {
        let mut stop = pin!(shutdown.wait());
        loop {
            tokio::select! {
                biased;
                () = &mut stop => break,
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
                accepted = incoming.next() => match accepted {
                    Some(Ok(io)) => {
                        connections.spawn(connection(
                            io,
                            builder.clone(),
                            settings,
                            sensor.clone(),
                            other.clone(),
                            shutdown.clone(),
                        ));
                    }
                    Some(Err(err)) => tracing::debug!("a connection could not be accepted: {err}"),
                    None => break,
                },
            }
        }
    }
    // New clients are refused at once rather than left waiting in the backlog.
    drop(incoming);
    while connections.join_next().await.is_some() {}
}

/// Serves one connection until the
/// client closes it, it breaks, it misses a keepalive PING, or it has
/// finished its calls after shutdown's GOAWAY.
async fn connection<IO>(
    io: IO,
    builder: h2::server::Builder,
    settings: Settings,
    sensor: SensorService,
    other: OtherRoutes,
    shutdown: ShutdownSignal,
) where
    IO: Transport,
{
    let ConnectionInfo { remote, activity } = io.connect_info();
    let mut stop = pin!(shutdown.wait());
    // A client that never completes the handshake is closed by the
    // connection's own idle and half-open deadlines (it reads as ended).
    let mut conn = tokio::select! {
        handshake = builder.handshake::<_, Bytes>(io) => match handshake {
            Ok(conn) => conn,
            Err(err) => {
                tracing::debug!(%remote, "HTTP/2 handshake failed: {err}");
                return;
            }
        },
        () = &mut stop => return,
    };
    let mut keepalive = pin!(keepalive(
        conn.ping_pong(),
        settings.keepalive_interval,
        settings.keepalive_timeout
    ));
    // The sensor calls run here, in the connection's task, rather than on
    // a task each: every request read is accepted first, then every call
    // that can run runs, and the connection's next poll writes all their
    // answers in one write. While any call is open the connection is busy.
    let mut calls = FuturesUnordered::new();
    let mut busy = None;
    let mut closing = false;
    loop {
        tokio::select! {
            biased;
            accepted = conn.accept() => match accepted {
                Some(Ok((request, respond))) => {
                    if request.uri().path() == sink_proto::SEND_SENSOR_VALUES_PATH {
                        busy.get_or_insert_with(|| activity.begin());
                        calls.push(sensor.answer(request, respond));
                    } else {
                        // Other calls (health watches, reflection) may be
                        // long-lived streams: each runs on a task of its own.
                        let call = activity.begin();
                        let other = other.clone();
                        tokio::spawn(async move {
                            answer_other(other, request, respond).await;
                            drop(call);
                        });
                    }
                }
                Some(Err(err)) => {
                    tracing::debug!(%remote, "HTTP/2 connection ended: {err}");
                    break;
                }
                None => break,
            },
            () = run_ready(&mut calls) => {
                if calls.is_empty() {
                    busy = None;
                }
            }
            () = &mut stop, if !closing => {
                closing = true;
                conn.graceful_shutdown();
            }
            () = &mut keepalive => {
                tracing::debug!(%remote, "closing a connection: no answer to a keepalive PING");
                break;
            }
        }
    }
}

/// Runs every call of `calls` that can make progress; ready once one or
/// more have ended.
async fn run_ready<F: Future<Output = ()>>(calls: &mut FuturesUnordered<F>) {
    poll_fn(|cx| {
        let mut ended = false;
        while let Poll::Ready(Some(())) = Pin::new(&mut *calls).poll_next(cx) {
            ended = true;
        }
        if ended {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await;
}

/// Pings every `interval` and ends when a PING goes unanswered for
/// `timeout` (the connection must be polled meanwhile for the answer to be
/// read). Never ends when the connection has no PINGs to give.
async fn keepalive(ping: Option<PingPong>, interval: Duration, timeout: Duration) {
    let Some(mut ping) = ping else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(interval).await;
        match tokio::time::timeout(timeout, ping.ping(Ping::opaque())).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) | Err(_) => return,
        }
    }
}

/// A request body read from h2: its window is given back as its data is
/// taken, so a call that does not read (waiting for a permit or for memory)
/// holds its client back by flow control.
pub struct RequestBody(RecvStream);

impl Body for RequestBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let stream = &mut self.get_mut().0;
        match ready!(stream.poll_data(cx)) {
            Some(Ok(data)) => {
                // Fails only once the stream is gone, which the next poll says.
                let _ = stream.flow_control().release_capacity(data.len());
                Poll::Ready(Some(Ok(Frame::data(data))))
            }
            Some(Err(err)) => Poll::Ready(Some(Err(err))),
            None => match ready!(stream.poll_trailers(cx)) {
                Ok(Some(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
                Ok(None) => Poll::Ready(None),
                Err(err) => Poll::Ready(Some(Err(err))),
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_end_stream()
    }
}

/// Runs a unary call to its answer: `call`'s outcome, or DEADLINE_EXCEEDED
/// once the client's `grpc-timeout` has passed. A call whose client resets
/// the stream is dropped unanswered (`None`); otherwise says the code sent.
pub async fn answer_unary<F>(
    request: http::Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    call: impl FnOnce(http::Request<RequestBody>) -> F,
) -> Option<Code>
where
    F: Future<Output = Result<(), Status>>,
{
    let deadline = request
        .headers()
        .get(GRPC_TIMEOUT)
        .and_then(|value| grpc_timeout(value.as_bytes()));
    let mut call = pin!(call(request.map(RequestBody)));
    let mut expiry = pin!(deadline.map(tokio::time::sleep));
    let outcome = poll_fn(|cx| {
        if let Poll::Ready(outcome) = call.as_mut().poll(cx) {
            return Poll::Ready(Some(outcome));
        }
        if respond.poll_reset(cx).is_ready() {
            return Poll::Ready(None);
        }
        match expiry.as_mut().as_pin_mut().map(|sleep| sleep.poll(cx)) {
            Some(Poll::Ready(())) => Poll::Ready(Some(Err(Status::deadline_exceeded(
                "the call's grpc-timeout passed before it was answered",
            )))),
            _ => Poll::Pending,
        }
    })
    .await?;
    Some(match outcome {
        Ok(()) => {
            send_ok(&mut respond);
            Code::Ok
        }
        Err(status) => {
            let code = status.code();
            // Trailers-only: the status in the one HEADERS frame.
            let _ = respond.send_response(status.into_http::<()>(), true);
            code
        }
    })
}

/// The answer to a call that succeeded: the empty response message (a
/// 5-byte gRPC frame of length 0) and an OK status in the trailers. Sent
/// whatever the client's window: h2 holds the 5 bytes until it opens.
fn send_ok(respond: &mut SendResponse<Bytes>) {
    let mut head = http::Response::new(());
    let headers = head.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    headers.insert(
        GRPC_ACCEPT_ENCODING,
        http::HeaderValue::from_static(super::body::ACCEPTED_ENCODINGS),
    );
    let Ok(mut stream) = respond.send_response(head, false) else {
        return;
    };
    if stream
        .send_data(Bytes::from_static(&[0; 5]), false)
        .is_err()
    {
        return;
    }
    let mut trailers = http::HeaderMap::with_capacity(1);
    trailers.insert(GRPC_STATUS, http::HeaderValue::from_static("0"));
    let _ = stream.send_trailers(trailers);
}

/// The value of a `grpc-timeout` header: up to 8 digits and a unit (H, M,
/// S, m, u, n); `None` when malformed, as tonic ignored those.
fn grpc_timeout(value: &[u8]) -> Option<Duration> {
    let (&unit, digits) = value.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let amount = digits
        .iter()
        .fold(0u64, |n, digit| n * 10 + u64::from(digit - b'0'));
    Some(match unit {
        b'H' => Duration::from_secs(amount * 3600),
        b'M' => Duration::from_secs(amount * 60),
        b'S' => Duration::from_secs(amount),
        b'm' => Duration::from_millis(amount),
        b'u' => Duration::from_micros(amount),
        b'n' => Duration::from_nanos(amount),
        _ => return None,
    })
}

/// Serves a request on any other path through tonic's routes, and writes
/// their answer out as the client's window allows.
async fn answer_other(
    mut other: OtherRoutes,
    request: http::Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
) {
    let request = request.map(|body| tonic::body::Body::new(RequestBody(body)));
    let Ok(()) =
        poll_fn(|cx| Service::<http::Request<tonic::body::Body>>::poll_ready(&mut other, cx)).await;
    let mut answer = pin!(other.call(request));
    let response = poll_fn(|cx| {
        if let Poll::Ready(Ok(response)) = answer.as_mut().poll(cx) {
            return Poll::Ready(Some(response));
        }
        if respond.poll_reset(cx).is_ready() {
            return Poll::Ready(None);
        }
        Poll::Pending
    })
    .await;
    let Some(response) = response else {
        return;
    };
    let (head, body) = response.into_parts();
    let end = body.is_end_stream();
    let Ok(stream) = respond.send_response(http::Response::from_parts(head, ()), end) else {
        return;
    };
    if !end {
        send_body(body, stream).await;
    }
}

/// Writes `body` to `stream` a frame at a time, each once the client's
/// window has room, so that at most one frame waits in h2's buffer.
async fn send_body(mut body: tonic::body::Body, mut stream: SendStream<Bytes>) {
    loop {
        stream.reserve_capacity(1);
        let room = poll_fn(|cx| {
            if stream.capacity() > 0 {
                return Poll::Ready(true);
            }
            match stream.poll_capacity(cx) {
                Poll::Ready(Some(Ok(_))) => Poll::Ready(true),
                Poll::Ready(_) => Poll::Ready(false),
                Poll::Pending => Poll::Pending,
            }
        })
        .await;
        if !room {
            return;
        }
        let frame = poll_fn(|cx| {
            if stream.poll_reset(cx).is_ready() {
                return Poll::Ready(None);
            }
            Pin::new(&mut body).poll_frame(cx).map(Some)
        })
        .await;
        let sent = match frame {
            // Reset by the client, or the connection is gone.
            None => return,
            Some(None) => {
                let _ = stream.send_data(Bytes::new(), true);
                return;
            }
            Some(Some(Ok(frame))) => match frame.into_data() {
                Ok(data) => stream.send_data(data, false),
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        let _ = stream.send_trailers(trailers);
                        return;
                    }
                    Ok(())
                }
            },
            Some(Some(Err(status))) => {
                tracing::debug!("an answer's body failed: {status}");
                stream.send_reset(h2::Reason::INTERNAL_ERROR);
                return;
            }
        };
        if sent.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_are_read_in_every_unit_and_malformed_ones_ignored() {
        assert_eq!(grpc_timeout(b"1H"), Some(Duration::from_secs(3600)));
        assert_eq!(grpc_timeout(b"2M"), Some(Duration::from_secs(120)));
        assert_eq!(grpc_timeout(b"3S"), Some(Duration::from_secs(3)));
        assert_eq!(grpc_timeout(b"250m"), Some(Duration::from_millis(250)));
        assert_eq!(
            grpc_timeout(b"99999999u"),
            Some(Duration::from_micros(99_999_999))
        );
        assert_eq!(grpc_timeout(b"5n"), Some(Duration::from_nanos(5)));
        for bad in [&b""[..], b"S", b"123456789S", b"1x", b"-1S", b"1.5S"] {
            assert_eq!(
                grpc_timeout(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}

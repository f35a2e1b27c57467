//! The grpc source's server: the listener's accept loop, and each
//! connection served by the source's own HTTP/2 ([`super::http2`]).
//!
//! `SendSensorValues` is the one call a sensor makes, often with one reading
//! per call, so its path is kept short: the request goes from the
//! connection straight to [`SensorService::answer`](super::SensorService)
//! (prefix, limits, decode, hand-off) and the answer is a fixed one. Every
//! other path (health, reflection, unknown methods) goes to tonic's routes
//! behind the same listener, so that probes, grpcurl and every client see
//! the same server as before. Around the protocol, this module adds:
//!
//! - **keepalive**: a PING every `keepalive_interval`; no answer within
//!   `keepalive_timeout` drops the connection;
//! - **graceful shutdown**: when shutdown starts the listener closes, every
//!   connection gets a GOAWAY, and calls in flight are answered;
//! - **cancellation**: a call whose client resets the stream (or whose
//!   connection dies) is dropped at once, freeing its permit and memory;
//! - **deadlines**: a client's `grpc-timeout` ends its call with
//!   DEADLINE_EXCEEDED, as tonic did;
//! - **bounded answers**: a long-lived stream's answer is taken one frame
//!   at a time, each once the one before has been written.

use std::fmt::Display;
use std::future::poll_fn;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use http_body::Body;
use sink_api::ShutdownSignal;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_stream::{Stream, StreamExt};
use tonic::codegen::{Service, http};
use tonic::transport::server::Connected;

use super::http2::{self, Handlers, Out};
use super::incoming::{ConnectionInfo, LimitStreams};
use super::{CONNECTION_WINDOW, STREAM_WINDOW, SensorService};

/// How the HTTP/2 connections are run: the stream bound and keepalive.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Streams one connection may open at once (`max_concurrent_calls`).
    pub max_concurrent_streams: u32,
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
}

impl Settings {
    fn config(&self) -> http2::Config {
        http2::Config {
            max_concurrent_streams: self.max_concurrent_streams,
            stream_window: STREAM_WINDOW,
            connection_window: CONNECTION_WINDOW,
            keepalive_interval: self.keepalive_interval,
            keepalive_timeout: self.keepalive_timeout,
        }
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

/// Serves one connection until the client closes it, it breaks, it misses
/// a keepalive PING, or it has finished its calls after shutdown's GOAWAY.
async fn connection<IO>(
    io: IO,
    settings: Settings,
    sensor: SensorService,
    other: OtherRoutes,
    shutdown: ShutdownSignal,
) where
    IO: Transport,
{
    let ConnectionInfo { activity, .. } = io.connect_info();
    // The sensor calls run in the connection's task, rather than on a task
    // each: every request read is taken first, then every call that can
    // run runs, and the answers go out in one write. While any is open the
    // connection is busy (for the idle timeout).
    let mut busy = None;
    let calls = Handlers {
        sensor: move |call| sensor.clone().answer(call),
        other: |call| {
            // Other calls (health watches, reflection) may be long-lived
            // streams: each runs on a task of its own.
            let guard = activity.begin();
            let other = other.clone();
            tokio::spawn(async move {
                answer_other(other, call).await;
                drop(guard);
            });
        },
        busy: |now| {
            if now {
                busy.get_or_insert_with(|| activity.begin());
            } else {
                busy = None;
            }
        },
    };
    http2::serve(io, settings.config(), calls, shutdown.wait()).await;
}

/// Serves a request on any other path through tonic's routes, and hands
/// their answer to the connection a part at a time.
async fn answer_other(mut other: OtherRoutes, call: http2::OtherCall) {
    let http2::OtherCall { request, answer } = call;
    let inbox = Arc::clone(request.body().inbox());
    let request = request.map(tonic::body::Body::new);
    let Ok(()) =
        poll_fn(|cx| Service::<http::Request<tonic::body::Body>>::poll_ready(&mut other, cx)).await;
    let mut response = pin!(other.call(request));
    let mut reset = pin!(inbox.wait_reset());
    let response = poll_fn(|cx| {
        if let Poll::Ready(Ok(response)) = response.as_mut().poll(cx) {
            return Poll::Ready(Some(response));
        }
        if reset.as_mut().poll(cx).is_ready() {
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
    if answer.send(Out::Head(head, end)).await.is_err() || end {
        return;
    }
    send_body(body, &answer, &inbox).await;
}

/// Hands `body` to the connection a frame at a time, each once the one
/// before has been taken (the connection takes it once the one before that
/// is written, as the client's window allows).
async fn send_body(mut body: tonic::body::Body, answer: &mpsc::Sender<Out>, inbox: &http2::Inbox) {
    loop {
        let Ok(permit) = answer.reserve().await else {
            return;
        };
        let mut reset = pin!(inbox.wait_reset());
        let frame = poll_fn(|cx| {
            if reset.as_mut().poll(cx).is_ready() {
                return Poll::Ready(None);
            }
            Pin::new(&mut body).poll_frame(cx).map(Some)
        })
        .await;
        match frame {
            // Reset by the client, or the connection is gone.
            None => return,
            Some(None) => {
                permit.send(Out::Data(Bytes::new(), true));
                return;
            }
            Some(Some(Ok(frame))) => match frame.into_data() {
                Ok(data) => permit.send(Out::Data(data, false)),
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        permit.send(Out::Trailers(trailers));
                        return;
                    }
                }
            },
            Some(Some(Err(status))) => {
                tracing::debug!("an answer's body failed: {status}");
                permit.send(Out::Reset);
                return;
            }
        }
    }
}

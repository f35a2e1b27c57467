//! The grpc source's own HTTP/2 server: one task per connection reads
//! frames, decodes header blocks and runs the `SendSensorValues` calls
//! itself, with no per-request machinery between the socket and the call.
//!
//! Why not the `h2` crate: measured with `bench/run --instructions`, h2
//! alone took over 27,000 instructions per one-reading call (frame and
//! stream bookkeeping, a `HeaderMap` and an `http::Request` built for every
//! call, three sends for the fixed answer), more than the 30,000 the whole
//! call may cost. Here a sensor call's header block is decoded into the
//! two values it needs, and its answer is three frames copied from bytes
//! encoded once per connection.
//!
//! What h2 and hyper defended against is defended here, each with its test
//! in `tests/tests/http2_abuse.rs`: rapid reset, streams the server must
//! reset (MadeYouReset), CONTINUATION floods, HPACK bombs, header lists
//! over 16 KiB, PING and SETTINGS floods from clients that never read (no
//! more is read while 64 KiB of answers wait), zero windows at shutdown,
//! keepalive, and GOAWAY on shutdown. Every other path (health,
//! reflection) is an ordinary HTTP request handed to tonic's routes on a
//! task of its own.

pub mod conn;
mod frame;
mod hpack;
mod huffman;
mod inbox;
mod request;

use std::future::{Future, poll_fn};
use std::pin::pin;
use std::task::Poll;
use std::time::Duration;

use tonic::Status;

pub use conn::{Calls, Config, OtherCall, Out, SensorCall, serve};
pub use inbox::{Inbox, RequestBody};

/// The connection's handlers: a closure for each kind of call, so that the
/// sensor call's future type is the closure's own (no box per call).
pub struct Handlers<S, O, B> {
    pub sensor: S,
    pub other: O,
    pub busy: B,
}

impl<S, F, O, B> Calls for Handlers<S, O, B>
where
    S: FnMut(SensorCall) -> F,
    F: Future<Output = Option<Result<(), Status>>> + Send,
    O: FnMut(OtherCall),
    B: FnMut(bool),
{
    type Call = F;

    fn sensor(&mut self, call: SensorCall) -> F {
        (self.sensor)(call)
    }

    fn other(&mut self, call: OtherCall) {
        (self.other)(call);
    }

    fn busy(&mut self, busy: bool) {
        (self.busy)(busy);
    }
}

/// Runs `call` to its outcome, or to DEADLINE_EXCEEDED once `timeout` (the
/// client's `grpc-timeout`) has passed; `None`, dropping the call at once,
/// when the client resets the stream or the connection ends.
pub async fn guarded<F>(
    inbox: &Inbox,
    timeout: Option<Duration>,
    call: F,
) -> Option<Result<(), Status>>
where
    F: Future<Output = Result<(), Status>>,
{
    let mut call = pin!(call);
    let mut expiry = pin!(timeout.map(tokio::time::sleep));
    poll_fn(|cx| {
        if inbox.is_reset() {
            return Poll::Ready(None);
        }
        if let Poll::Ready(outcome) = call.as_mut().poll(cx) {
            return Poll::Ready(Some(outcome));
        }
        if let Some(Poll::Ready(())) = expiry.as_mut().as_pin_mut().map(|sleep| sleep.poll(cx)) {
            return Poll::Ready(Some(Err(Status::deadline_exceeded(
                "the call's grpc-timeout passed before it was answered",
            ))));
        }
        inbox.register(cx);
        if inbox.is_reset() {
            Poll::Ready(None)
        } else {
            Poll::Pending
        }
    })
    .await
}

/// A small deterministic generator for the tests, so that failures reproduce.
#[cfg(test)]
struct XorShift(u64);

#[cfg(test)]
impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// Up to `max_len` bytes: printable ASCII three times in four, else any.
    fn bytes(&mut self, max_len: usize) -> Vec<u8> {
        let len = self.below(max_len + 1);
        let any = self.below(4) == 0;
        (0..len)
            .map(|_| {
                let r = self.next() as u8;
                if any { r } else { b' ' + r % 95 }
            })
            .collect()
    }
}

//! One HTTP/2 connection, served by one task: frames read, header blocks
//! decoded, calls run and answered, windows kept, and the connection's
//! defences.
//!
//! The task alternates between reading everything the socket has, running
//! every call that can make progress, and writing everything their answers
//! and the protocol produced, in one write where the socket takes it.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use futures_util::stream::{FuturesUnordered, Stream as _};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio::time::{Instant, Sleep};
use tonic::Status;
use tonic::codegen::http;

use super::frame::{self, Head, Reason};
use super::hpack;
use super::inbox::{Inbox, RequestBody, Returned};
use super::request::{Fields, Route};

/// The client's first bytes (RFC 9113 3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The largest header list a request may carry (SETTINGS_MAX_HEADER_LIST_SIZE),
/// as hyper's server granted: a larger one is refused with 431.
pub const MAX_HEADER_LIST_SIZE: usize = 16 * 1024;

/// The most a header block may take on the wire, HEADERS and CONTINUATION
/// frames together: past it the connection is closed (a CONTINUATION flood).
const MAX_HEADER_BLOCK: usize = 4 * MAX_HEADER_LIST_SIZE;

/// CONTINUATION frames one header block may take, whatever their size.
const MAX_CONTINUATIONS: usize = 64;

/// Streams a connection may cause the server to reset for errors before it
/// is closed with ENHANCE_YOUR_CALM (MadeYouReset, CVE-2025-8671), as h2.
const MAX_LOCAL_ERROR_RESETS: usize = 1024;

/// Streams a client may reset before their answer (rapid reset,
/// CVE-2023-44487) beyond the calls it was answered, before the connection
/// is closed with ENHANCE_YOUR_CALM. A client that cancels calls now and
/// then never comes near it.
const MAX_EARLY_RESETS: usize = 1024;

/// While this much waits to be written, nothing more is read: a client
/// that sends PINGs or SETTINGS or calls and never reads its answers is
/// held back by its own socket.
const WRITE_HIGH_WATER: usize = 64 * 1024;

/// Reads the connection's task makes before it lets other tasks run.
const READS_PER_POLL: usize = 1;

/// How long answers may wait for a client's window after the last call of
/// a connection that is closing has ended.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// How a connection is run.
#[derive(Debug, Clone, Copy)]
pub struct Config {
    /// Streams one connection may open at once (`max_concurrent_calls`).
    pub max_concurrent_streams: u32,
    /// The window each stream of a request grants (SETTINGS_INITIAL_WINDOW_SIZE).
    pub stream_window: u32,
    /// The window the connection grants all its streams together.
    pub connection_window: u32,
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
}

/// A `SendSensorValues` call, as the connection hands it to the service.
pub struct SensorCall {
    /// The call's `grpc-encoding`, or why it is refused.
    pub encoding: Result<super::super::body::Encoding, Status>,
    /// The client's `grpc-timeout`.
    pub timeout: Option<Duration>,
    pub body: RequestBody,
}

/// Every other call (health, reflection, unknown paths), as an HTTP
/// request, to be run on a task of its own: it answers through `answer`.
pub struct OtherCall {
    pub request: http::Request<RequestBody>,
    pub answer: mpsc::Sender<Out>,
}

/// A part of the answer to an [`OtherCall`], in order.
pub enum Out {
    /// The response's head, and whether it is all of the answer.
    Head(http::response::Parts, bool),
    /// Data, and whether it ends the answer.
    Data(Bytes, bool),
    Trailers(http::HeaderMap),
    /// The answer failed: the stream is reset.
    Reset,
}

/// What a connection's calls are run by.
pub trait Calls {
    type Call: Future<Output = Option<Result<(), Status>>> + Send;
    /// Starts a sensor call, to be run by the connection's task.
    fn sensor(&mut self, call: SensorCall) -> Self::Call;
    /// Starts any other call, on a task of its own.
    fn other(&mut self, call: OtherCall);
    /// A call began or the connection's last call ended (for the idle timeout).
    fn busy(&mut self, busy: bool);
}

/// Serves `io` until the client closes it, it breaks, it misses a
/// keepalive PING, or it has finished its calls after `stop`'s GOAWAY.
pub async fn serve<IO, C>(io: IO, config: Config, calls: C, stop: impl Future<Output = ()>)
where
    IO: AsyncRead + AsyncWrite + Unpin,
    C: Calls,
{
    let mut conn = Connection::new(io, config, calls);
    let mut stop = std::pin::pin!(stop);
    let mut running = FuturesUnordered::new();
    std::future::poll_fn(|cx| {
        if !conn.closing && stop.as_mut().poll(cx).is_ready() {
            conn.go_away(Reason::NO_ERROR, b"");
        }
        conn.poll(cx, &mut running)
    })
    .await;
    conn.finish().await;
}

pin_project_lite::pin_project! {
    /// A call run by the connection's task, with its stream.
    struct Running<F> {
        stream: u32,
        #[pin]
        call: F,
    }
}

impl<F: Future> Future for Running<F> {
    type Output = (u32, F::Output);

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let outcome = ready!(this.call.poll(cx));
        Poll::Ready((*this.stream, outcome))
    }
}

struct Connection<IO, C: Calls> {
    io: IO,
    config: Config,
    calls: C,
    read: BytesMut,
    write: Vec<u8>,
    /// How much of `write` the socket has taken.
    written: usize,
    decoder: hpack::Decoder,
    /// Pseudo-header values of the block being decoded, reused.
    scratch: Vec<u8>,
    streams: std::collections::HashMap<u32, Stream, foldhash::fast::FixedState>,
    /// Streams whose answer is written by a task of its own.
    others: Vec<u32>,
    returned: Arc<Returned>,
    returned_streams: Vec<(u32, usize)>,
    /// The highest stream the client opened.
    last_stream: u32,
    /// The preface has been read.
    started: bool,
    /// The client's first frame, SETTINGS, has been read.
    settled: bool,
    /// A header block in CONTINUATION frames: its stream, END_STREAM, frames.
    continuing: Option<(u32, bool, usize)>,
    block: Vec<u8>,
    /// The client's window for the answers of all streams.
    send_window: i64,
    /// The client's initial window for each stream's answer.
    peer_stream_window: i64,
    peer_max_frame: usize,
    /// What the client may still send before the connection's window is
    /// given back, and what calls have given back since it last was.
    recv_window: i64,
    to_return: usize,
    local_resets: usize,
    early_resets: usize,
    answered: u64,
    /// GOAWAY was sent (or received): no new streams.
    closing: bool,
    /// The socket is done: end once the answers are written.
    done: bool,
    ping: Keepalive,
    grace: Option<Pin<Box<Sleep>>>,
    ok_head: Vec<u8>,
    ok_trailers: Vec<u8>,
    blocks: Blocks,
    /// The table size the client allows now.
    peer_table_size: usize,
}

/// How header blocks are written to the client.
struct Blocks {
    /// The client lowered its HPACK table: the next block says so first.
    table_size_update: Option<usize>,
    /// The largest frame the client takes.
    max_frame: usize,
}

impl Blocks {
    /// Appends `block` as HEADERS (and CONTINUATION) frames, after the
    /// table size update the client is owed.
    fn put(&mut self, write: &mut Vec<u8>, stream: u32, block: &[u8], end_stream: bool) {
        match self.table_size_update.take() {
            None => frame::put_headers(write, stream, block, end_stream, self.max_frame),
            Some(size) => {
                let mut updated = Vec::with_capacity(block.len() + 5);
                hpack::encode_table_size(&mut updated, size);
                updated.extend_from_slice(block);
                frame::put_headers(write, stream, &updated, end_stream, self.max_frame);
            }
        }
    }
}

struct Stream {
    inbox: Arc<Inbox>,
    /// What the client may still send on it.
    recv_window: i64,
    /// END_STREAM came.
    recv_ended: bool,
    /// The client's window for its answer.
    send_window: i64,
    /// Its call has been answered (the answer may still wait for window).
    answered: bool,
    /// Answer bytes waiting for window, and what follows them.
    waiting: Option<(Bytes, After)>,
    /// For a call on a task of its own: where its answer comes from.
    out: Option<mpsc::Receiver<Out>>,
}

/// What follows an answer's data.
enum After {
    /// More parts, from the call's task.
    More,
    /// The trailers' header block, which ends the stream.
    Trailers(Vec<u8>),
    /// The end of the stream, with no trailers.
    End,
}

/// The keepalive PINGs.
struct Keepalive {
    timer: Pin<Box<Sleep>>,
    /// The payload of the PING awaiting its answer.
    outstanding: Option<[u8; 8]>,
    sent: u64,
    interval: Duration,
    timeout: Duration,
}

/// A connection error: GOAWAY with this reason, then the end.
struct Fatal(Reason, &'static str);

impl<IO, C> Connection<IO, C>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    C: Calls,
{
    fn new(io: IO, config: Config, calls: C) -> Self {
        let mut write = Vec::with_capacity(4096);
        frame::put_settings(
            &mut write,
            &[
                (
                    frame::SETTINGS_MAX_CONCURRENT_STREAMS,
                    config.max_concurrent_streams,
                ),
                (frame::SETTINGS_INITIAL_WINDOW_SIZE, config.stream_window),
                (
                    frame::SETTINGS_MAX_HEADER_LIST_SIZE,
                    MAX_HEADER_LIST_SIZE as u32,
                ),
            ],
        );
        let default_window = 65_535;
        if config.connection_window > default_window {
            frame::put_window_update(&mut write, 0, config.connection_window - default_window);
        }
        let mut ok_head = Vec::new();
        hpack::encode_status(&mut ok_head, 200);
        hpack::encode_field(&mut ok_head, b"content-type", b"application/grpc");
        hpack::encode_field(
            &mut ok_head,
            b"grpc-accept-encoding",
            super::super::body::ACCEPTED_ENCODINGS.as_bytes(),
        );
        let mut ok_trailers = Vec::new();
        hpack::encode_field(&mut ok_trailers, b"grpc-status", b"0");
        Self {
            io,
            config,
            calls,
            read: BytesMut::with_capacity(frame::DEFAULT_MAX_FRAME_SIZE + frame::HEADER_LEN),
            write,
            written: 0,
            decoder: hpack::Decoder::new(4096),
            scratch: Vec::new(),
            streams: Default::default(),
            others: Vec::new(),
            returned: Arc::default(),
            returned_streams: Vec::new(),
            last_stream: 0,
            started: false,
            settled: false,
            continuing: None,
            block: Vec::new(),
            send_window: 65_535,
            peer_stream_window: 65_535,
            peer_max_frame: frame::DEFAULT_MAX_FRAME_SIZE,
            recv_window: i64::from(config.connection_window.max(default_window)),
            to_return: 0,
            local_resets: 0,
            early_resets: 0,
            answered: 0,
            closing: false,
            done: false,
            ping: Keepalive {
                timer: Box::pin(tokio::time::sleep(config.keepalive_interval)),
                outstanding: None,
                sent: 0,
                interval: config.keepalive_interval,
                timeout: config.keepalive_timeout,
            },
            grace: None,
            ok_head,
            ok_trailers,
            blocks: Blocks {
                table_size_update: None,
                max_frame: frame::DEFAULT_MAX_FRAME_SIZE,
            },
            peer_table_size: 4096,
        }
    }

    /// Makes every step that can be made; ready when the connection is over.
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        running: &mut FuturesUnordered<Running<C::Call>>,
    ) -> Poll<()> {
        self.returned.driver.register(cx.waker());
        let mut reads = 0;
        loop {
            if self.done {
                return Poll::Ready(());
            }
            if let Err(Fatal(reason, why)) = self.keepalive(cx) {
                tracing::debug!("closing an HTTP/2 connection: {why}");
                self.go_away(reason, why.as_bytes());
                self.done = true;
                continue;
            }
            let mut progress = self.run_calls(cx, running);
            progress |= self.poll_others(cx);
            self.give_back_windows();
            if self.flush(cx).is_err() {
                return Poll::Ready(());
            }
            if self.closing && running.is_empty() && self.streams_all_answered() {
                if self.write.is_empty() && self.waiting_is_empty() {
                    return Poll::Ready(());
                }
                let grace = self
                    .grace
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(CLOSE_GRACE)));
                if grace.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(());
                }
            }
            if reads == READS_PER_POLL {
                // The calls of the last read have run and their answers are
                // out: the stages downstream, on the same workers, get their
                // turn before the next read brings more.
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            if self.write.len() < WRITE_HIGH_WATER {
                match self.read_frames(cx, running) {
                    Poll::Ready(Ok(true)) => {
                        reads += 1;
                        progress = true;
                    }
                    Poll::Ready(Ok(false)) => {
                        // The client closed its side: its calls go with it.
                        return Poll::Ready(());
                    }
                    Poll::Ready(Err(Fatal(reason, why))) => {
                        tracing::debug!("closing an HTTP/2 connection: {why}");
                        self.go_away(reason, why.as_bytes());
                        let _ = self.flush(cx);
                        return Poll::Ready(());
                    }
                    Poll::Pending => {}
                }
            }
            if !progress {
                return Poll::Pending;
            }
        }
    }

    /// Sends a PING every interval; an error once one went unanswered for
    /// the timeout.
    fn keepalive(&mut self, cx: &mut Context<'_>) -> Result<(), Fatal> {
        while self.ping.timer.as_mut().poll(cx).is_ready() {
            if self.ping.outstanding.is_some() {
                return Err(Fatal(Reason::NO_ERROR, "no answer to a keepalive PING"));
            }
            self.ping.sent += 1;
            let payload = self.ping.sent.to_be_bytes();
            frame::put_frame(&mut self.write, frame::PING, 0, 0, &payload);
            self.ping.outstanding = Some(payload);
            let deadline = Instant::now() + self.ping.timeout;
            self.ping.timer.as_mut().reset(deadline);
        }
        Ok(())
    }

    /// Runs the calls that can make progress and writes the answers of
    /// those that ended.
    fn run_calls(
        &mut self,
        cx: &mut Context<'_>,
        running: &mut FuturesUnordered<Running<C::Call>>,
    ) -> bool {
        let mut ended = false;
        while let Poll::Ready(Some((stream, outcome))) = Pin::new(&mut *running).poll_next(cx) {
            ended = true;
            match outcome {
                Some(outcome) => self.answer(stream, outcome),
                // Reset by the client: closed already.
                None => {
                    self.close(stream, false);
                }
            }
        }
        if ended && running.is_empty() {
            self.calls.busy(false);
        }
        ended
    }

    /// Writes a sensor call's answer: the empty message and OK, or the
    /// error in the headers alone.
    fn answer(&mut self, id: u32, outcome: Result<(), Status>) {
        let Some(stream) = self.streams.get_mut(&id) else {
            return;
        };
        stream.answered = true;
        self.answered += 1;
        match outcome {
            Ok(()) => {
                self.blocks.put(&mut self.write, id, &self.ok_head, false);
                let message = Bytes::from_static(&[0; 5]);
                if stream.send_window >= 5 && self.send_window >= 5 {
                    stream.send_window -= 5;
                    self.send_window -= 5;
                    frame::put_frame(&mut self.write, frame::DATA, 0, id, &message);
                    self.blocks
                        .put(&mut self.write, id, &self.ok_trailers, true);
                } else {
                    stream.waiting = Some((message, After::Trailers(self.ok_trailers.clone())));
                    return;
                }
            }
            Err(status) => {
                let block = status_block(status);
                self.blocks.put(&mut self.write, id, &block, true);
            }
        }
        self.answered_fully(id);
    }

    /// The stream's answer is all written: it is closed, and a request
    /// still arriving is cut short (RFC 9113 8.1).
    fn answered_fully(&mut self, id: u32) {
        if let Some(stream) = self.close(id, false)
            && !stream.recv_ended
        {
            frame::put_rst_stream(&mut self.write, id, Reason::NO_ERROR);
        }
    }

    /// The connection is done with stream `id`: what it received and its
    /// call never took is given back to the window, and with `reset` a call
    /// still running is told to stop.
    fn close(&mut self, id: u32, reset: bool) -> Option<Stream> {
        let stream = self.streams.remove(&id)?;
        if reset {
            stream.inbox.reset();
        }
        self.to_return += stream.inbox.close();
        Some(stream)
    }

    fn streams_all_answered(&self) -> bool {
        self.streams.values().all(|s| s.answered && s.out.is_none())
    }

    fn waiting_is_empty(&self) -> bool {
        self.streams.values().all(|s| s.waiting.is_none())
    }

    /// Takes the next part of each answer written by a task of its own,
    /// once the one before has been written and while the socket keeps up.
    fn poll_others(&mut self, cx: &mut Context<'_>) -> bool {
        let mut progress = false;
        if self.write.len() >= WRITE_HIGH_WATER {
            // Taken once the socket takes what waits (its write wakes us).
            return false;
        }
        let mut i = 0;
        while i < self.others.len() {
            let id = self.others[i];
            let Some(stream) = self.streams.get_mut(&id) else {
                self.others.swap_remove(i);
                continue;
            };
            if stream.waiting.is_some() {
                i += 1;
                continue;
            }
            let Some(out) = stream.out.as_mut() else {
                self.others.swap_remove(i);
                continue;
            };
            match out.poll_recv(cx) {
                Poll::Pending => i += 1,
                Poll::Ready(part) => {
                    progress = true;
                    let last = self.write_other(id, part);
                    if last {
                        self.others.swap_remove(i);
                    }
                }
            }
        }
        progress
    }

    /// Writes a part of a task's answer; true once it is the last.
    fn write_other(&mut self, id: u32, part: Option<Out>) -> bool {
        let Some(stream) = self.streams.get_mut(&id) else {
            return true;
        };
        match part {
            Some(Out::Head(head, end)) => {
                let mut block = Vec::new();
                hpack::encode_status(&mut block, head.status.as_u16());
                encode_headers(&mut block, &head.headers);
                self.blocks.put(&mut self.write, id, &block, end);
                if end {
                    stream.out = None;
                    stream.answered = true;
                    self.answered_fully(id);
                    return true;
                }
                false
            }
            Some(Out::Data(data, end)) => {
                stream.waiting = Some((data, if end { After::End } else { After::More }));
                if end {
                    stream.out = None;
                    stream.answered = true;
                }
                self.send_waiting(id);
                end
            }
            Some(Out::Trailers(trailers)) => {
                let mut block = Vec::new();
                encode_headers(&mut block, &trailers);
                self.blocks.put(&mut self.write, id, &block, true);
                stream.out = None;
                stream.answered = true;
                self.answered_fully(id);
                true
            }
            Some(Out::Reset) | None => {
                frame::put_rst_stream(&mut self.write, id, Reason::INTERNAL_ERROR);
                stream.out = None;
                stream.answered = true;
                stream.recv_ended = true;
                self.answered_fully(id);
                true
            }
        }
    }

    /// Writes what waits on `id` as far as the windows allow.
    fn send_waiting(&mut self, id: u32) {
        let Some(stream) = self.streams.get_mut(&id) else {
            return;
        };
        let Some((data, _)) = stream.waiting.as_mut() else {
            return;
        };
        while !data.is_empty() {
            let room = stream
                .send_window
                .min(self.send_window)
                .min(self.peer_max_frame as i64);
            if room <= 0 {
                return;
            }
            let chunk = data.split_to(data.len().min(room as usize));
            stream.send_window -= chunk.len() as i64;
            self.send_window -= chunk.len() as i64;
            frame::put_frame(&mut self.write, frame::DATA, 0, id, &chunk);
        }
        let Some((_, after)) = stream.waiting.take() else {
            return;
        };
        match after {
            After::More => {}
            After::Trailers(block) => {
                self.blocks.put(&mut self.write, id, &block, true);
                self.answered_fully(id);
            }
            After::End => {
                frame::put_frame(&mut self.write, frame::DATA, frame::END_STREAM, id, &[]);
                self.answered_fully(id);
            }
        }
    }

    /// Gives back the windows of what calls have taken.
    fn give_back_windows(&mut self) {
        self.to_return += self.returned.take(&mut self.returned_streams);
        for (id, bytes) in self.returned_streams.drain(..) {
            if let Some(stream) = self.streams.get_mut(&id)
                && !stream.recv_ended
                && bytes > 0
            {
                stream.recv_window += bytes as i64;
                frame::put_window_update(&mut self.write, id, bytes as u32);
            }
        }
        // Given back in halves of the window: one update for many calls.
        if self.to_return > 0
            && (self.to_return >= self.config.connection_window as usize / 2
                || self.recv_window < i64::from(self.config.connection_window) / 2)
        {
            let bytes = std::mem::take(&mut self.to_return);
            self.recv_window += bytes as i64;
            frame::put_window_update(&mut self.write, 0, bytes as u32);
        }
    }

    /// Writes what is buffered, as far as the socket takes it.
    fn flush(&mut self, cx: &mut Context<'_>) -> std::io::Result<()> {
        while self.written < self.write.len() {
            match Pin::new(&mut self.io).poll_write(cx, &self.write[self.written..]) {
                Poll::Ready(Ok(0)) => return Err(std::io::ErrorKind::WriteZero.into()),
                Poll::Ready(Ok(n)) => self.written += n,
                Poll::Ready(Err(err)) => return Err(err),
                Poll::Pending => return Ok(()),
            }
        }
        if self.written > 0 {
            self.write.clear();
            self.written = 0;
            // TLS holds what it has encrypted until flushed.
            if let Poll::Ready(Err(err)) = Pin::new(&mut self.io).poll_flush(cx) {
                return Err(err);
            }
        }
        Ok(())
    }

    /// Reads what the socket has and handles every whole frame in it:
    /// true when something was read, false at the end of the stream.
    fn read_frames(
        &mut self,
        cx: &mut Context<'_>,
        running: &mut FuturesUnordered<Running<C::Call>>,
    ) -> Poll<Result<bool, Fatal>> {
        if self.read.capacity() - self.read.len() < frame::HEADER_LEN + 1024 {
            self.read
                .reserve(frame::DEFAULT_MAX_FRAME_SIZE + frame::HEADER_LEN);
        }
        let read = match ready!(tokio_util::io::poll_read_buf(
            Pin::new(&mut self.io),
            cx,
            &mut self.read
        )) {
            Ok(read) => read,
            Err(_) => return Poll::Ready(Ok(false)),
        };
        if read == 0 {
            return Poll::Ready(Ok(false));
        }
        if !self.started {
            if self.read.len() < PREFACE.len() {
                if !PREFACE.starts_with(&self.read) {
                    return Poll::Ready(Err(Fatal(Reason::PROTOCOL_ERROR, "not HTTP/2")));
                }
                return Poll::Ready(Ok(true));
            }
            if &self.read[..PREFACE.len()] != PREFACE {
                return Poll::Ready(Err(Fatal(Reason::PROTOCOL_ERROR, "not HTTP/2")));
            }
            self.read.advance(PREFACE.len());
            self.started = true;
        }
        while self.read.len() >= frame::HEADER_LEN {
            let head = Head::parse(&self.read);
            if !self.settled {
                if head.kind != frame::SETTINGS || head.has(frame::ACK) {
                    return Poll::Ready(Err(Fatal(
                        Reason::PROTOCOL_ERROR,
                        "the first frame is not SETTINGS",
                    )));
                }
                self.settled = true;
            }
            if head.len > frame::DEFAULT_MAX_FRAME_SIZE {
                return Poll::Ready(Err(Fatal(
                    Reason::FRAME_SIZE_ERROR,
                    "a frame larger than SETTINGS_MAX_FRAME_SIZE",
                )));
            }
            if self.read.len() < frame::HEADER_LEN + head.len {
                self.read
                    .reserve(frame::HEADER_LEN + head.len - self.read.len());
                break;
            }
            let mut bytes = self.read.split_to(frame::HEADER_LEN + head.len);
            bytes.advance(frame::HEADER_LEN);
            if let Err(fatal) = self.on_frame(head, bytes.freeze(), running) {
                return Poll::Ready(Err(fatal));
            }
        }
        Poll::Ready(Ok(true))
    }

    fn on_frame(
        &mut self,
        head: Head,
        payload: Bytes,
        running: &mut FuturesUnordered<Running<C::Call>>,
    ) -> Result<(), Fatal> {
        if let Some((stream, _, _)) = self.continuing
            && (head.kind != frame::CONTINUATION || head.stream != stream)
        {
            return Err(Fatal(
                Reason::PROTOCOL_ERROR,
                "a frame inside a header block",
            ));
        }
        match head.kind {
            frame::DATA => self.on_data(head, payload),
            frame::HEADERS => self.on_headers(head, payload, running),
            frame::CONTINUATION => self.on_continuation(head, &payload, running),
            frame::PRIORITY => {
                if head.stream == 0 {
                    return Err(Fatal(Reason::PROTOCOL_ERROR, "PRIORITY on stream 0"));
                }
                if head.len != 5 {
                    self.reset_for_error(head.stream, Reason::FRAME_SIZE_ERROR)?;
                }
                Ok(())
            }
            frame::RST_STREAM => self.on_rst_stream(head, &payload),
            frame::SETTINGS => self.on_settings(head, &payload),
            frame::PUSH_PROMISE => Err(Fatal(Reason::PROTOCOL_ERROR, "PUSH_PROMISE from a client")),
            frame::PING => self.on_ping(head, &payload),
            frame::GOAWAY => {
                if head.stream != 0 {
                    return Err(Fatal(Reason::PROTOCOL_ERROR, "GOAWAY on a stream"));
                }
                self.closing = true;
                Ok(())
            }
            frame::WINDOW_UPDATE => self.on_window_update(head, &payload),
            // Unknown frames are ignored (RFC 9113 4.1).
            _ => Ok(()),
        }
    }

    fn on_data(&mut self, head: Head, payload: Bytes) -> Result<(), Fatal> {
        if head.stream == 0 {
            return Err(Fatal(Reason::PROTOCOL_ERROR, "DATA on stream 0"));
        }
        let len = payload.len();
        self.recv_window -= len as i64;
        if self.recv_window < 0 {
            return Err(Fatal(
                Reason::FLOW_CONTROL_ERROR,
                "DATA beyond the connection's window",
            ));
        }
        let data = strip_padding(&head, payload)?;
        let padding = len - data.len();
        if head.stream > self.last_stream {
            return Err(Fatal(Reason::PROTOCOL_ERROR, "DATA on an idle stream"));
        }
        let end = head.has(frame::END_STREAM);
        let Some(stream) = self.streams.get_mut(&head.stream) else {
            // A stream already closed: its data is dropped, its window given back.
            self.to_return += len;
            return Ok(());
        };
        if stream.recv_ended {
            self.to_return += len;
            return self.reset_for_error(head.stream, Reason::STREAM_CLOSED);
        }
        stream.recv_window -= len as i64;
        if stream.recv_window < 0 {
            self.to_return += len;
            return self.reset_for_error(head.stream, Reason::FLOW_CONTROL_ERROR);
        }
        self.to_return += padding;
        stream.recv_ended = end;
        stream.inbox.push(data, end);
        Ok(())
    }

    fn on_headers(
        &mut self,
        head: Head,
        payload: Bytes,
        running: &mut FuturesUnordered<Running<C::Call>>,
    ) -> Result<(), Fatal> {
        if head.stream == 0 {
            return Err(Fatal(Reason::PROTOCOL_ERROR, "HEADERS on stream 0"));
        }
        let mut fragment = strip_padding(&head, payload)?;
        if head.has(frame::PRIORITY_FLAG) {
            if fragment.len() < 5 {
                return Err(Fatal(Reason::FRAME_SIZE_ERROR, "a short priority"));
            }
            fragment.advance(5);
        }
        let end_stream = head.has(frame::END_STREAM);
        if head.has(frame::END_HEADERS) {
            return self.on_header_block(head.stream, end_stream, &fragment, running);
        }
        self.block.clear();
        self.block.extend_from_slice(&fragment);
        self.continuing = Some((head.stream, end_stream, 0));
        self.check_block_size()
    }

    fn on_continuation(
        &mut self,
        head: Head,
        payload: &[u8],
        running: &mut FuturesUnordered<Running<C::Call>>,
    ) -> Result<(), Fatal> {
        let Some((stream, end_stream, frames)) = self.continuing else {
            return Err(Fatal(
                Reason::PROTOCOL_ERROR,
                "CONTINUATION outside a header block",
            ));
        };
        self.block.extend_from_slice(payload);
        self.continuing = Some((stream, end_stream, frames + 1));
        self.check_block_size()?;
        if head.has(frame::END_HEADERS) {
            self.continuing = None;
            let block = std::mem::take(&mut self.block);
            let handled = self.on_header_block(stream, end_stream, &block, running);
            self.block = block;
            return handled;
        }
        Ok(())
    }

    fn check_block_size(&self) -> Result<(), Fatal> {
        let frames = self.continuing.map_or(0, |(_, _, frames)| frames);
        if self.block.len() > MAX_HEADER_BLOCK || frames > MAX_CONTINUATIONS {
            return Err(Fatal(
                Reason::ENHANCE_YOUR_CALM,
                "a header block past every bound (CONTINUATION flood)",
            ));
        }
        Ok(())
    }

    /// A whole header block: a new request, or a request's trailers.
    fn on_header_block(
        &mut self,
        id: u32,
        end_stream: bool,
        block: &[u8],
        running: &mut FuturesUnordered<Running<C::Call>>,
    ) -> Result<(), Fatal> {
        let mut fields = Fields::new(&mut self.scratch, MAX_HEADER_LIST_SIZE);
        self.decoder
            .decode(block, |name, value| fields.field(name, value))
            .map_err(|err| Fatal(Reason::COMPRESSION_ERROR, err.0))?;
        if id <= self.last_stream {
            // Trailers of a request (the block is decoded all the same, to
            // keep the table in step), or a stream reused.
            let Some(stream) = self.streams.get_mut(&id) else {
                // A stream closed already: after an early answer and its
                // RST_STREAM the client may still have trailers in flight,
                // which RFC 9113 5.1 asks to ignore.
                return Ok(());
            };
            if stream.recv_ended || !end_stream {
                return self.reset_for_error(id, Reason::PROTOCOL_ERROR);
            }
            stream.recv_ended = true;
            stream.inbox.push(Bytes::new(), true);
            return Ok(());
        }
        if id.is_multiple_of(2) {
            return Err(Fatal(
                Reason::PROTOCOL_ERROR,
                "a stream the client may not open",
            ));
        }
        self.last_stream = id;
        if self.closing {
            // Opened after our GOAWAY: ignored, as the GOAWAY told the client.
            return Ok(());
        }
        if self.streams.len() >= self.config.max_concurrent_streams as usize {
            frame::put_rst_stream(&mut self.write, id, Reason::REFUSED_STREAM);
            return Ok(());
        }
        let route = match fields.finish() {
            Ok(route) => route,
            Err(None) => {
                // Larger than SETTINGS_MAX_HEADER_LIST_SIZE: 431, as hyper.
                let mut block = Vec::new();
                hpack::encode_status(&mut block, 431);
                self.blocks.put(&mut self.write, id, &block, true);
                if !end_stream {
                    frame::put_rst_stream(&mut self.write, id, Reason::NO_ERROR);
                }
                return Ok(());
            }
            Err(Some(why)) => {
                tracing::debug!("a malformed request: {why}");
                return self.reset_for_error(id, Reason::PROTOCOL_ERROR);
            }
        };
        let inbox = Inbox::new(id, Arc::clone(&self.returned));
        if end_stream {
            inbox.push(Bytes::new(), true);
        }
        let mut stream = Stream {
            inbox: Arc::clone(&inbox),
            recv_window: i64::from(self.config.stream_window),
            recv_ended: end_stream,
            send_window: self.peer_stream_window,
            answered: false,
            waiting: None,
            out: None,
        };
        match route {
            Route::Sensor { encoding, timeout } => {
                if running.is_empty() {
                    self.calls.busy(true);
                }
                let call = self.calls.sensor(SensorCall {
                    encoding,
                    timeout,
                    body: RequestBody::new(inbox, false),
                });
                running.push(Running { stream: id, call });
            }
            Route::Other(parts) => {
                let (answer, out) = mpsc::channel(1);
                stream.out = Some(out);
                self.others.push(id);
                self.calls.other(OtherCall {
                    request: http::Request::from_parts(parts, RequestBody::new(inbox, true)),
                    answer,
                });
            }
        }
        self.streams.insert(id, stream);
        Ok(())
    }

    fn on_rst_stream(&mut self, head: Head, payload: &[u8]) -> Result<(), Fatal> {
        if head.stream == 0 {
            return Err(Fatal(Reason::PROTOCOL_ERROR, "RST_STREAM on stream 0"));
        }
        if payload.len() != 4 {
            return Err(Fatal(Reason::FRAME_SIZE_ERROR, "RST_STREAM not 4 bytes"));
        }
        if head.stream > self.last_stream {
            return Err(Fatal(
                Reason::PROTOCOL_ERROR,
                "RST_STREAM on an idle stream",
            ));
        }
        let Some(stream) = self.close(head.stream, true) else {
            return Ok(());
        };
        if !stream.answered {
            self.early_resets += 1;
            if self.early_resets > MAX_EARLY_RESETS && self.early_resets as u64 > self.answered {
                return Err(Fatal(
                    Reason::ENHANCE_YOUR_CALM,
                    "too many streams reset before their answer (rapid reset)",
                ));
            }
        }
        Ok(())
    }

    fn on_settings(&mut self, head: Head, payload: &[u8]) -> Result<(), Fatal> {
        if head.stream != 0 {
            return Err(Fatal(Reason::PROTOCOL_ERROR, "SETTINGS on a stream"));
        }
        if head.has(frame::ACK) {
            if !payload.is_empty() {
                return Err(Fatal(
                    Reason::FRAME_SIZE_ERROR,
                    "a SETTINGS ACK with a payload",
                ));
            }
            return Ok(());
        }
        if !payload.len().is_multiple_of(6) {
            return Err(Fatal(
                Reason::FRAME_SIZE_ERROR,
                "SETTINGS not in 6-byte entries",
            ));
        }
        for entry in payload.chunks_exact(6) {
            let id = u16::from_be_bytes([entry[0], entry[1]]);
            let value = u32::from_be_bytes([entry[2], entry[3], entry[4], entry[5]]);
            match id {
                frame::SETTINGS_ENABLE_PUSH if value > 1 => {
                    return Err(Fatal(
                        Reason::PROTOCOL_ERROR,
                        "SETTINGS_ENABLE_PUSH not 0 or 1",
                    ));
                }
                frame::SETTINGS_INITIAL_WINDOW_SIZE => {
                    let value = i64::from(value);
                    if value > frame::MAX_WINDOW {
                        return Err(Fatal(
                            Reason::FLOW_CONTROL_ERROR,
                            "SETTINGS_INITIAL_WINDOW_SIZE above 2^31-1",
                        ));
                    }
                    let delta = value - self.peer_stream_window;
                    self.peer_stream_window = value;
                    for stream in self.streams.values_mut() {
                        stream.send_window += delta;
                        if stream.send_window > frame::MAX_WINDOW {
                            return Err(Fatal(Reason::FLOW_CONTROL_ERROR, "a window past 2^31-1"));
                        }
                    }
                }
                frame::SETTINGS_MAX_FRAME_SIZE => {
                    if !(16_384..=16_777_215).contains(&value) {
                        return Err(Fatal(
                            Reason::PROTOCOL_ERROR,
                            "SETTINGS_MAX_FRAME_SIZE out of range",
                        ));
                    }
                    self.peer_max_frame = value as usize;
                    self.blocks.max_frame = self.peer_max_frame;
                }
                frame::SETTINGS_HEADER_TABLE_SIZE => {
                    let size = value as usize;
                    // Our answers never add to the client's table; a
                    // smaller one must still be acknowledged in the next
                    // block (RFC 7541 4.2).
                    if size < self.peer_table_size {
                        self.blocks.table_size_update = Some(size);
                    }
                    self.peer_table_size = size;
                }
                // The rest is the client's own business.
                _ => {}
            }
        }
        frame::put_frame(&mut self.write, frame::SETTINGS, frame::ACK, 0, &[]);
        // A larger window may free answers that waited.
        self.send_all_waiting();
        Ok(())
    }

    fn on_ping(&mut self, head: Head, payload: &[u8]) -> Result<(), Fatal> {
        if head.stream != 0 {
            return Err(Fatal(Reason::PROTOCOL_ERROR, "PING on a stream"));
        }
        let Ok(payload) = <[u8; 8]>::try_from(payload) else {
            return Err(Fatal(Reason::FRAME_SIZE_ERROR, "PING not 8 bytes"));
        };
        if head.has(frame::ACK) {
            if self.ping.outstanding == Some(payload) {
                self.ping.outstanding = None;
                let next = Instant::now() + self.ping.interval;
                self.ping.timer.as_mut().reset(next);
            }
            return Ok(());
        }
        frame::put_frame(&mut self.write, frame::PING, frame::ACK, 0, &payload);
        Ok(())
    }

    fn on_window_update(&mut self, head: Head, payload: &[u8]) -> Result<(), Fatal> {
        let Ok(bytes) = <[u8; 4]>::try_from(payload) else {
            return Err(Fatal(Reason::FRAME_SIZE_ERROR, "WINDOW_UPDATE not 4 bytes"));
        };
        let increment = i64::from(u32::from_be_bytes(bytes) & 0x7fff_ffff);
        if head.stream == 0 {
            if increment == 0 {
                return Err(Fatal(Reason::PROTOCOL_ERROR, "a WINDOW_UPDATE of 0"));
            }
            self.send_window += increment;
            if self.send_window > frame::MAX_WINDOW {
                return Err(Fatal(Reason::FLOW_CONTROL_ERROR, "a window past 2^31-1"));
            }
            self.send_all_waiting();
            return Ok(());
        }
        if head.stream > self.last_stream {
            return Err(Fatal(
                Reason::PROTOCOL_ERROR,
                "WINDOW_UPDATE on an idle stream",
            ));
        }
        let Some(stream) = self.streams.get_mut(&head.stream) else {
            return Ok(());
        };
        if increment == 0 {
            return self.reset_for_error(head.stream, Reason::PROTOCOL_ERROR);
        }
        stream.send_window += increment;
        if stream.send_window > frame::MAX_WINDOW {
            return self.reset_for_error(head.stream, Reason::FLOW_CONTROL_ERROR);
        }
        self.send_waiting(head.stream);
        Ok(())
    }

    fn send_all_waiting(&mut self) {
        let waiting: Vec<u32> = self
            .streams
            .iter()
            .filter(|(_, s)| s.waiting.is_some())
            .map(|(&id, _)| id)
            .collect();
        for id in waiting {
            self.send_waiting(id);
        }
    }

    /// Resets a stream for the client's error; too many of those close the
    /// connection.
    fn reset_for_error(&mut self, id: u32, reason: Reason) -> Result<(), Fatal> {
        frame::put_rst_stream(&mut self.write, id, reason);
        self.close(id, true);
        self.local_resets += 1;
        if self.local_resets > MAX_LOCAL_ERROR_RESETS {
            return Err(Fatal(
                Reason::ENHANCE_YOUR_CALM,
                "too many streams reset for errors (MadeYouReset)",
            ));
        }
        Ok(())
    }

    /// Sends a GOAWAY: no stream past the last one opened will be served.
    fn go_away(&mut self, reason: Reason, debug: &[u8]) {
        if self.closing && reason == Reason::NO_ERROR {
            return;
        }
        self.closing = true;
        frame::put_goaway(&mut self.write, self.last_stream, reason, debug);
    }

    /// Ends the connection: every call still open is dropped, and the
    /// socket is shut down after what is written.
    async fn finish(mut self) {
        for stream in self.streams.values() {
            stream.inbox.reset();
        }
        self.streams.clear();
        let io = &mut self.io;
        let write = &self.write[self.written..];
        let _ = tokio::time::timeout(CLOSE_GRACE, async {
            use tokio::io::AsyncWriteExt;
            if !write.is_empty() {
                io.write_all(write).await?;
            }
            io.shutdown().await
        })
        .await;
    }
}

/// `payload` without the padding a PADDED frame carries.
fn strip_padding(head: &Head, mut payload: Bytes) -> Result<Bytes, Fatal> {
    if !head.has(frame::PADDED) {
        return Ok(payload);
    }
    let Some(&pad) = payload.first() else {
        return Err(Fatal(
            Reason::FRAME_SIZE_ERROR,
            "a padded frame without its length",
        ));
    };
    let pad = usize::from(pad);
    if pad >= payload.len() {
        return Err(Fatal(Reason::PROTOCOL_ERROR, "padding past the frame"));
    }
    payload.advance(1);
    payload.truncate(payload.len() - pad);
    Ok(payload)
}

/// A failed call's answer in one header block (trailers-only), with the
/// headers tonic gives the status.
fn status_block(status: Status) -> Vec<u8> {
    let mut block = Vec::with_capacity(128);
    hpack::encode_status(&mut block, 200);
    encode_headers(&mut block, status.into_http::<()>().headers());
    block
}

fn encode_headers(block: &mut Vec<u8>, headers: &http::HeaderMap) {
    for (name, value) in headers {
        hpack::encode_field(block, name.as_str().as_bytes(), value.as_bytes());
    }
}

//! The grpc source's listener and accept loop: the stream of accepted
//! connections that the HTTP/2 server serves.
//!
//! Written out rather than tonic's `TcpIncoming` for four defences:
//!
//! - **a bounded number of connections** (`max_connections`): at the bound the
//!   loop stops accepting, and new clients wait in the kernel's listen backlog
//!   (1024) until a connection closes, instead of costing descriptors;
//! - **accept errors back off** (EMFILE at the descriptor limit, ENFILE,
//!   ENOBUFS, ...): the loop sleeps 5 ms doubling to 1 s, logs one WARN at
//!   once and then at most one every 10 s with the count, and an INFO when
//!   accepting works again, instead of retrying in a hot loop;
//! - **idle connections close** (`idle_timeout`): a connection with no call
//!   open, and none started or finished for that long, is closed (it reads
//!   as ended); this also ends connections that never complete the HTTP/2
//!   handshake. Keepalive pings (configured on the server) do not count as
//!   activity;
//! - **half-open connections are bounded and short-lived**: a connection is
//!   half-open until its client has sent the first [`HANDSHAKE_BYTES`] bytes
//!   (the HTTP/2 preface, or a TLS ClientHello). One that stays half-open
//!   for [`HANDSHAKE_DEADLINE`] (or `idle_timeout`, if shorter) is closed,
//!   and at most a quarter of `max_connections` may be half-open at once:
//!   beyond that, the oldest half-open one is closed to make room. So a
//!   flood of silent connections cannot keep honest clients, who speak at
//!   once, out of the slots;
//! - TCP_NODELAY on every connection (small answers must not wait for Nagle).
//!
//! The seam: [`incoming`] yields [`Connection`]s, each an `AsyncRead +
//! AsyncWrite` carrying its [`ConnectionInfo`] (through tonic's `Connected`,
//! into every request's extensions). A wrapper such as a TLS acceptor takes
//! this stream, wraps each connection, and forwards `connect_info()` so that
//! calls are still counted against their connection.

use std::collections::VecDeque;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex, Weak};
use std::task::{Context, Poll, Waker, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tokio_stream::Stream;
use tokio_util::sync::PollSemaphore;
use tonic::body::Body as ResponseBody;
use tonic::codegen::http::{Request, Response};
use tonic::codegen::{Body, BoxFuture, Service};
use tonic::transport::server::Connected;

use super::metrics::ConnectionMetrics;

/// Connections the kernel queues for `accept` (Linux caps it at somaxconn).
pub const LISTEN_BACKLOG: i32 = 1024;

/// Descriptors kept back from `max_connections`' default for files, the
/// listener and the runtime.
const RESERVED_FDS: u64 = 64;

/// The largest default `max_connections`, however high the descriptor limit.
const MAX_DEFAULT_CONNECTIONS: u64 = 1024;

/// First and longest pause after a failed `accept`.
const FIRST_BACKOFF: Duration = Duration::from_millis(5);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// How long a connection may stay half-open (its client silent) before it
/// is closed: honest clients speak at once.
pub const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(5);

/// Bytes a client must send before its connection counts as begun: the
/// length of the HTTP/2 client preface (`PRI * HTTP/2.0...`), and less than
/// any TLS ClientHello. Garbage of that length is refused by the server
/// that reads it (HTTP/2 or TLS), and a stalled TLS handshake by
/// `handshake_timeout`.
pub const HANDSHAKE_BYTES: u64 = 24;

/// At most one WARN about failing accepts per this long.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// Binds `address` (`host:port`, the first address it resolves to that binds)
/// with a listen backlog of [`LISTEN_BACKLOG`] rather than std's 128, so that
/// a burst of connects waits in the kernel rather than being retried by the
/// clients a second later. The listener is non-blocking, for tokio.
pub fn bind(address: &str) -> io::Result<std::net::TcpListener> {
    let mut last = None;
    for addr in address.to_socket_addrs()? {
        match bind_one(addr) {
            Ok(listener) => return Ok(listener),
            Err(err) => last = Some(err),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::other("the address resolves to nothing")))
}

fn bind_one(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    // As std does: a restarted sink rebinds at once despite TIME_WAIT.
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// `max_connections` by default: the soft descriptor limit less
/// [`RESERVED_FDS`], between 1 and [`MAX_DEFAULT_CONNECTIONS`].
pub fn default_max_connections() -> usize {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the struct we pass.
    let soft = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
        limit.rlim_cur
    } else {
        1024
    };
    soft.saturating_sub(RESERVED_FDS)
        .clamp(1, MAX_DEFAULT_CONNECTIONS) as usize
}

/// The idle timeout, shared by every connection and changed live on reload.
#[derive(Debug, Clone)]
pub struct IdleTimeout(Arc<AtomicU64>);

impl IdleTimeout {
    pub fn new(timeout: Duration) -> Self {
        Self(Arc::new(AtomicU64::new(millis(timeout))))
    }

    pub fn set(&self, timeout: Duration) {
        self.0.store(millis(timeout), Ordering::Relaxed);
    }

    fn get(&self) -> Duration {
        Duration::from_millis(self.0.load(Ordering::Relaxed))
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// The connections accepted from `listener`, at most `max_connections` open
/// at once. Accepts only when polled (as tonic's `TcpIncoming` does), so a
/// connection accepted is always handed to the server; dropping the stream
/// (tonic does when shutdown starts) closes the listener.
pub fn incoming(
    listener: TcpListener,
    max_connections: usize,
    idle: IdleTimeout,
    metrics: ConnectionMetrics,
) -> Incoming {
    Incoming {
        local: listener.local_addr().ok(),
        listener,
        half_open: Arc::new(HalfOpen::new((max_connections / 4).max(1))),
        slots: PollSemaphore::new(Arc::new(Semaphore::new(max_connections))),
        slot: None,
        pause: None,
        failures: Failures::default(),
        idle,
        metrics,
        at_limit: false,
    }
}

/// See [`incoming`].
pub struct Incoming {
    listener: TcpListener,
    local: Option<SocketAddr>,
    /// One permit per open connection.
    slots: PollSemaphore,
    /// The connections whose clients have not spoken yet.
    half_open: Arc<HalfOpen>,
    /// The slot the next connection takes, once one is free.
    slot: Option<OwnedSemaphorePermit>,
    /// The pause after a failed accept.
    pause: Option<Pin<Box<Sleep>>>,
    failures: Failures,
    idle: IdleTimeout,
    metrics: ConnectionMetrics,
    /// Whether the last wait for a slot found none: counted once per time
    /// the bound is reached.
    at_limit: bool,
}

impl Stream for Incoming {
    type Item = io::Result<Connection>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(pause) = &mut this.pause {
                ready!(pause.as_mut().poll(cx));
                this.pause = None;
            }
            // At the bound, wait here: new clients queue in the backlog.
            let slot = match this.slot.take() {
                Some(slot) => slot,
                None => match this.slots.poll_acquire(cx) {
                    Poll::Ready(Some(slot)) => {
                        this.at_limit = false;
                        slot
                    }
                    Poll::Ready(None) => return Poll::Ready(None),
                    Poll::Pending => {
                        if !this.at_limit {
                            this.at_limit = true;
                            this.metrics.limit_reached.inc();
                        }
                        return Poll::Pending;
                    }
                },
            };
            let accepted = match this.listener.poll_accept(cx) {
                Poll::Ready(accepted) => accepted,
                Poll::Pending => {
                    this.slot = Some(slot);
                    return Poll::Pending;
                }
            };
            match accepted {
                Ok((stream, remote)) => {
                    this.failures.recovered(this.local);
                    // Without it, small answers wait for the client's delayed ACK.
                    let _ = stream.set_nodelay(true);
                    this.metrics.accepted.inc();
                    let open = Open::new(&this.metrics);
                    let activity = Arc::new(Activity::new(Some(Arc::clone(&this.half_open))));
                    this.half_open.admit(&activity, &this.metrics);
                    let connection =
                        Connection::new(stream, remote, slot, this.idle.clone(), open, activity);
                    return Poll::Ready(Some(Ok(connection)));
                }
                Err(err) => {
                    this.slot = Some(slot);
                    this.metrics.accept_errors.inc();
                    let pause = this.failures.failed(&err, this.local);
                    this.pause = Some(Box::pin(tokio::time::sleep(pause)));
                }
            }
        }
    }
}

/// Consecutive accept failures: the backoff and the rate-limited warning.
#[derive(Default)]
struct Failures {
    /// Failures since the last success.
    count: u64,
    /// Since when accepting fails.
    since: Option<Instant>,
    /// When the last WARN was logged, and failures not logged since.
    warned: Option<Instant>,
    unlogged: u64,
}

impl Failures {
    /// Counts a failure, logs it if a WARN is due, and says how long to pause.
    fn failed(&mut self, err: &io::Error, local: Option<SocketAddr>) -> Duration {
        let now = Instant::now();
        self.count += 1;
        self.since.get_or_insert(now);
        let pause = FIRST_BACKOFF
            .saturating_mul(1 << self.count.saturating_sub(1).min(10))
            .min(MAX_BACKOFF);
        if self
            .warned
            .is_none_or(|warned| now.duration_since(warned) >= WARN_EVERY)
        {
            let at = local.map(|a| a.to_string()).unwrap_or_default();
            tracing::warn!(
                "grpc source on {at}: accepting a connection failed: {err} ({} more failures since the last warning); retrying in {} ms{}",
                self.unlogged,
                pause.as_millis(),
                if err.raw_os_error() == Some(libc::EMFILE) {
                    "; the process is at its open-file limit (RLIMIT_NOFILE): raise it or lower max_connections"
                } else {
                    ""
                }
            );
            self.warned = Some(now);
            self.unlogged = 0;
        } else {
            self.unlogged += 1;
        }
        pause
    }

    /// Accepting works again: says so if it had failed.
    fn recovered(&mut self, local: Option<SocketAddr>) {
        if let Some(since) = self.since.take() {
            let at = local.map(|a| a.to_string()).unwrap_or_default();
            tracing::info!(
                "grpc source on {at}: accepting connections again after {} failures over {} ms",
                self.count,
                since.elapsed().as_millis()
            );
        }
        *self = Self::default();
    }
}

/// What a connection tells the calls on it (a request extension, through
/// tonic's `Connected`).
#[derive(Debug, Clone)]
pub struct ConnectionInfo {
    /// The client's address.
    pub remote: SocketAddr,
    /// Its calls, for the idle timeout.
    pub activity: Arc<Activity>,
}

/// The calls open on one connection and when one last started or ended.
#[derive(Debug)]
pub struct Activity {
    open: AtomicUsize,
    /// Milliseconds since [`CLOCK`].
    last: AtomicU64,
    /// [`HALF_OPEN`], [`BEGUN`] or [`EVICTED`].
    state: AtomicU8,
    /// The half-open connections this one counts among while half-open.
    half_open: Option<Arc<HalfOpen>>,
    /// The connection's reader, woken when it is evicted.
    waker: Mutex<Option<Waker>>,
}

/// The client has not sent [`HANDSHAKE_BYTES`] yet.
const HALF_OPEN: u8 = 0;
/// The client has spoken.
const BEGUN: u8 = 1;
/// Closed half-open to make room for a newer connection.
const EVICTED: u8 = 2;

/// The half-open connections, oldest first, and their bound.
#[derive(Debug)]
struct HalfOpen {
    limit: usize,
    count: AtomicUsize,
    /// Oldest first; entries that are no longer half-open are skipped.
    queue: Mutex<VecDeque<Weak<Activity>>>,
}

impl HalfOpen {
    fn new(limit: usize) -> Self {
        Self {
            limit,
            count: AtomicUsize::new(0),
            queue: Mutex::new(VecDeque::new()),
        }
    }

    /// Counts a new connection half-open; beyond the bound, evicts the
    /// oldest half-open one (it reads as ended at once).
    fn admit(&self, activity: &Arc<Activity>, metrics: &ConnectionMetrics) {
        let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        let over = self.count.fetch_add(1, Ordering::SeqCst) + 1 > self.limit;
        // Entries that left the half-open state are dropped as they reach
        // the front, so the queue holds about what the last
        // HANDSHAKE_DEADLINE accepted.
        while let Some(oldest) = queue.front() {
            match oldest.upgrade() {
                Some(oldest) if oldest.is_half_open() => {
                    if !over {
                        break;
                    }
                    queue.pop_front();
                    if oldest.leave_half_open(EVICTED) {
                        metrics.half_open_closed.inc();
                        oldest.wake();
                        break;
                    }
                }
                _ => {
                    queue.pop_front();
                }
            }
        }
        queue.push_back(Arc::downgrade(activity));
    }
}

/// The origin of [`Activity::last`].
static CLOCK: LazyLock<std::time::Instant> = LazyLock::new(std::time::Instant::now);

fn now_millis() -> u64 {
    millis(CLOCK.elapsed())
}

impl Activity {
    fn new(half_open: Option<Arc<HalfOpen>>) -> Self {
        Self {
            open: AtomicUsize::new(0),
            last: AtomicU64::new(now_millis()),
            state: AtomicU8::new(if half_open.is_some() {
                HALF_OPEN
            } else {
                BEGUN
            }),
            half_open,
            waker: Mutex::new(None),
        }
    }

    fn is_half_open(&self) -> bool {
        self.state.load(Ordering::SeqCst) == HALF_OPEN
    }

    fn is_evicted(&self) -> bool {
        self.state.load(Ordering::SeqCst) == EVICTED
    }

    /// Moves a half-open connection to `state` (once: `false` if it was not
    /// half-open any more), counting it out of the half-open ones.
    fn leave_half_open(&self, state: u8) -> bool {
        let left = self
            .state
            .compare_exchange(HALF_OPEN, state, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok();
        if left && let Some(half_open) = &self.half_open {
            half_open.count.fetch_sub(1, Ordering::SeqCst);
        }
        left
    }

    fn wake(&self) {
        let waker = self.waker.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// Keeps `waker` to wake the reader of a half-open connection if it is
    /// evicted.
    fn wake_on_eviction(&self, waker: &Waker) {
        let mut slot = self.waker.lock().unwrap_or_else(|e| e.into_inner());
        if !slot.as_ref().is_some_and(|kept| kept.will_wake(waker)) {
            *slot = Some(waker.clone());
        }
    }

    /// A call starts; it counts as open until the guard drops.
    pub fn begin(self: &Arc<Self>) -> CallGuard {
        self.open.fetch_add(1, Ordering::Relaxed);
        self.last.store(now_millis(), Ordering::Relaxed);
        CallGuard(Arc::clone(self))
    }

    /// How long the connection has had no call, or `None` while one is open.
    fn idle_for(&self) -> Option<Duration> {
        if self.open.load(Ordering::Relaxed) > 0 {
            return None;
        }
        let last = self.last.load(Ordering::Relaxed);
        Some(Duration::from_millis(now_millis().saturating_sub(last)))
    }
}

/// An open call; dropping it ends the call.
#[derive(Debug)]
pub struct CallGuard(Arc<Activity>);

impl Drop for CallGuard {
    fn drop(&mut self) {
        self.0.last.store(now_millis(), Ordering::Relaxed);
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An accepted connection: the TCP stream, its slot among
/// `max_connections`, and its idle timer.
pub struct Connection {
    stream: TcpStream,
    info: ConnectionInfo,
    idle: IdleTimeout,
    /// When to look at the connection's activity next.
    check: Pin<Box<Sleep>>,
    /// Set once idle: every later read sees the end.
    closed: bool,
    /// Bytes read while half-open.
    heard: u64,
    _slot: OwnedSemaphorePermit,
    open: Open,
}

impl Drop for Connection {
    fn drop(&mut self) {
        // A connection closed half-open leaves the count.
        self.info.activity.leave_half_open(BEGUN);
    }
}

/// A connection counted open (`sink_grpc_connections`) until dropped.
struct Open(ConnectionMetrics);

impl Open {
    fn new(metrics: &ConnectionMetrics) -> Self {
        metrics.open.inc();
        Self(metrics.clone())
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.open.dec();
    }
}

impl Connection {
    fn new(
        stream: TcpStream,
        remote: SocketAddr,
        slot: OwnedSemaphorePermit,
        idle: IdleTimeout,
        open: Open,
        activity: Arc<Activity>,
    ) -> Self {
        let check = Box::pin(tokio::time::sleep(idle.get().min(HANDSHAKE_DEADLINE)));
        Self {
            stream,
            info: ConnectionInfo { remote, activity },
            idle,
            check,
            closed: false,
            heard: 0,
            _slot: slot,
            open,
        }
    }

    /// Closes the connection: every later read sees the end.
    fn close(&mut self, why: &str, counter: &sink_api::metrics::Counter) -> Poll<io::Result<()>> {
        tracing::debug!(remote = %self.info.remote, "closing a connection: {why}");
        self.closed = true;
        counter.inc();
        Poll::Ready(Ok(()))
    }

    /// Whether the idle timeout has passed with no call; re-arms the timer
    /// otherwise.
    fn poll_idle(&mut self, cx: &mut Context<'_>) -> bool {
        loop {
            if self.check.as_mut().poll(cx).is_pending() {
                return false;
            }
            // A connection whose client has not spoken has no call either:
            // the same measure, with the shorter handshake deadline.
            let timeout = if self.info.activity.is_half_open() {
                self.idle.get().min(HANDSHAKE_DEADLINE)
            } else {
                self.idle.get()
            };
            let wait = match self.info.activity.idle_for() {
                Some(idle) if idle >= timeout => return true,
                Some(idle) => timeout - idle,
                // A call is open: look again a whole timeout later.
                None => timeout,
            };
            let next = Instant::now() + wait;
            self.check.as_mut().reset(next);
        }
    }
}

impl Connected for Connection {
    type ConnectInfo = ConnectionInfo;

    fn connect_info(&self) -> ConnectionInfo {
        self.info.clone()
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.closed {
            return Poll::Ready(Ok(()));
        }
        let half_open = this.info.activity.is_half_open();
        if half_open {
            this.info.activity.wake_on_eviction(cx.waker());
        }
        if this.info.activity.is_evicted() {
            // Counted by the eviction.
            this.closed = true;
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.stream).poll_read(cx, buf) {
            Poll::Pending => {
                // The server always has a read pending, so this is where an
                // idle connection is noticed: it reads as ended, and the
                // server closes it.
                if this.poll_idle(cx) {
                    let metrics = this.open.0.clone();
                    if this.info.activity.leave_half_open(EVICTED) {
                        return this.close(
                            "silent past the handshake deadline",
                            &metrics.half_open_closed,
                        );
                    }
                    return this.close("idle", &metrics.idle_closed);
                }
                Poll::Pending
            }
            Poll::Ready(Ok(())) if half_open => {
                this.heard += (buf.filled().len() - before) as u64;
                if this.heard >= HANDSHAKE_BYTES {
                    this.info.activity.leave_half_open(BEGUN);
                }
                Poll::Ready(Ok(()))
            }
            ready => ready,
        }
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// Wraps the server's routes so that every call (any service: the sensor
/// service, health, reflection) counts as activity on its connection until
/// its answer has been sent whole.
#[derive(Clone)]
pub struct TrackCalls<S>(pub S);

impl<S, B> Service<Request<B>> for TrackCalls<S>
where
    S: Service<Request<B>, Response = Response<ResponseBody>>,
    S::Future: Send + 'static,
    S::Error: 'static,
{
    type Response = Response<ResponseBody>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let guard = request
            .extensions()
            .get::<ConnectionInfo>()
            .map(|info| info.activity.begin());
        let answer = self.0.call(request);
        Box::pin(async move {
            let response = answer.await?;
            Ok(match guard {
                Some(guard) => guarded(response, guard),
                None => response,
            })
        })
    }
}

/// The methods whose calls are long-lived streams: they stay open for as
/// long as the client likes, holding their connection busy.
const LONG_LIVED: [&str; 3] = [
    "/grpc.health.v1.Health/Watch",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
];

/// Wraps the server's routes so that at most so many long-lived streams
/// (health `Watch`, reflection) are open at once; one more is answered
/// RESOURCE_EXHAUSTED at once. A connection with such a stream open is never
/// idle, so without this bound a few hundred of them would hold every
/// `max_connections` slot for as long as they liked.
#[derive(Clone)]
pub struct LimitStreams<S> {
    inner: S,
    streams: Arc<Semaphore>,
    limit: usize,
}

impl<S> LimitStreams<S> {
    /// `inner`, with at most `limit` long-lived streams open at once.
    pub fn new(inner: S, limit: usize) -> Self {
        Self {
            inner,
            streams: Arc::new(Semaphore::new(limit)),
            limit,
        }
    }
}

/// The most long-lived streams for `max_connections`: an eighth of the
/// connections, so that they can never take the slots of the others.
pub fn long_lived_limit(max_connections: usize) -> usize {
    (max_connections / 8).max(1)
}

impl<S, B> Service<Request<B>> for LimitStreams<S>
where
    S: Service<Request<B>, Response = Response<ResponseBody>>,
    S::Future: Send + 'static,
    S::Error: 'static,
{
    type Response = Response<ResponseBody>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        if !LONG_LIVED.contains(&request.uri().path()) {
            return Box::pin(self.inner.call(request));
        }
        let Ok(permit) = Arc::clone(&self.streams).try_acquire_owned() else {
            let status = tonic::Status::resource_exhausted(format!(
                "too many long-lived streams (health Watch, reflection) are open: at most {}; use health Check, or retry later",
                self.limit
            ));
            let refused = status.into_http();
            return Box::pin(async move { Ok(refused) });
        };
        let answer = self.inner.call(request);
        Box::pin(async move { Ok(guarded(answer.await?, permit)) })
    }
}

/// `response`, holding `guard` until its body has been sent (or dropped).
fn guarded(
    response: Response<ResponseBody>,
    guard: impl Send + Sync + 'static,
) -> Response<ResponseBody> {
    response.map(|body| {
        ResponseBody::new(Guarded {
            body,
            _guard: Box::new(guard),
        })
    })
}

/// A response body that holds its call open until it has been sent.
struct Guarded {
    body: ResponseBody,
    /// Released once the body has been sent (or dropped).
    _guard: Box<dyn Send + Sync>,
}

impl Body for Guarded {
    type Data = <ResponseBody as Body>::Data;
    type Error = <ResponseBody as Body>::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let frame = ready!(Pin::new(&mut self.get_mut().body).poll_frame(cx));
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backlog_holds_a_burst_of_connects_that_nobody_accepts() {
        let listener = bind("127.0.0.1:0").expect("bind");
        let address = listener.local_addr().expect("address");
        // With std's backlog of 128, connects past ~129 get no answer to
        // their SYN and wait a second for the retry.
        let connected: Vec<_> = (0..600)
            .map(|i| {
                std::net::TcpStream::connect_timeout(&address, Duration::from_millis(500))
                    .unwrap_or_else(|err| panic!("connect {i} waited: {err}"))
            })
            .collect();
        assert_eq!(connected.len(), 600);
    }

    #[test]
    fn the_default_connection_limit_leaves_descriptors_spare() {
        let limit = default_max_connections();
        assert!((1..=MAX_DEFAULT_CONNECTIONS as usize).contains(&limit));
    }

    #[test]
    fn failures_back_off_to_a_second_and_recover() {
        let mut failures = Failures::default();
        let err = io::Error::from_raw_os_error(libc::EMFILE);
        let pauses: Vec<Duration> = (0..12).map(|_| failures.failed(&err, None)).collect();
        assert_eq!(pauses[0], FIRST_BACKOFF);
        assert_eq!(pauses[1], FIRST_BACKOFF * 2);
        assert_eq!(pauses[11], MAX_BACKOFF);
        // One warning logged; the other eleven wait for the next one.
        assert_eq!(failures.unlogged, 11);
        failures.recovered(None);
        assert_eq!(failures.failed(&err, None), FIRST_BACKOFF);
    }
}

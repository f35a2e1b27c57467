//! `[api]`: the HTTP endpoint that serves `/metrics` (Prometheus),
//! `/health` and `/ready`, off unless the file gives it an address.
//!
//! The listener is bound before any stage is built, so an address in use is
//! refused at startup like every other mistake; it stays open through the
//! drain that follows SIGTERM (with `/ready` answering 503), and closes as
//! the process exits.

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use serde::Deserialize;
use sink_api::Readiness;
use sink_api::metrics::{MetricsRegistry, OPENMETRICS_TEXT, PROMETHEUS_TEXT};

/// The `[api]` table.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// `host:port` to serve on; absent: no endpoint. Port 0 picks a free
    /// port, which the log names. Needs a restart to change.
    #[serde(default)]
    pub address: Option<String>,
}

impl ApiConfig {
    /// Checks that the address is `host:port` and resolves; the message
    /// suits key `api.address`.
    pub fn validate(&self) -> Result<(), String> {
        let Some(address) = &self.address else {
            return Ok(());
        };
        match address.to_socket_addrs() {
            Ok(addresses) if addresses.len() > 0 => Ok(()),
            Ok(_) => Err(format!("`{address}` resolves to no address")),
            Err(err) => Err(format!(
                "`{address}` is not a host:port address such as \"127.0.0.1:9464\": {err}"
            )),
        }
    }
}

/// Binds the endpoint's listener on `address`.
pub fn bind(address: &str) -> std::io::Result<std::net::TcpListener> {
    let listener = std::net::TcpListener::bind(address)?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// What `/ready` answers from: the process's own phase (starting, running,
/// shutting down) and, while running, the pipeline's [`sink_api::Readiness`],
/// the one value the stages mark (a stalled source, a failed sink) and the
/// gRPC health service reports. So `/ready` is 503 exactly when gRPC health
/// says NOT_SERVING, plus while the pipeline starts.
#[derive(Debug, Clone, Default)]
pub struct ReadyState(Arc<ReadyInner>);

#[derive(Debug, Default)]
struct ReadyInner {
    /// [`STARTING`], [`RUNNING`] or [`SHUTTING_DOWN`].
    phase: AtomicU8,
    /// The running pipeline's readiness, once it runs.
    pipeline: OnceLock<Readiness>,
}

const STARTING: u8 = 0;
const RUNNING: u8 = 1;
const SHUTTING_DOWN: u8 = 2;

impl ReadyState {
    /// Not ready yet: the pipeline is starting.
    pub fn starting() -> Self {
        Self::default()
    }

    /// The pipeline runs; from now on its `readiness` decides.
    pub fn running(&self, readiness: Readiness) {
        let _ = self.0.pipeline.set(readiness);
        let _ =
            self.0
                .phase
                .compare_exchange(STARTING, RUNNING, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// Shutdown has begun: not ready from now on.
    pub fn shutting_down(&self) {
        self.0.phase.store(SHUTTING_DOWN, Ordering::Relaxed);
    }

    /// `Ok` when ready, else why, on one line.
    pub fn check(&self) -> Result<(), String> {
        match self.0.phase.load(Ordering::Relaxed) {
            STARTING => Err("the pipeline is starting".into()),
            SHUTTING_DOWN => Err("shutting down".into()),
            _ => match self.0.pipeline.get() {
                Some(readiness) if !readiness.is_ready() => Err(readiness.reasons().join("; ")),
                _ => Ok(()),
            },
        }
    }
}

/// Serves the endpoint on `listener` until the process ends; says where.
pub fn spawn(
    listener: std::net::TcpListener,
    registry: MetricsRegistry,
    readiness: ReadyState,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let local = listener.local_addr()?;
    let router = Router::new()
        .route(
            "/metrics",
            get(move |headers: HeaderMap| {
                let registry = registry.clone();
                async move { metrics(&registry, &headers) }
            }),
        )
        .route("/health", get(|| async { "ok\n" }))
        .route(
            "/ready",
            get(move || {
                let readiness = readiness.clone();
                async move {
                    match readiness.check() {
                        Ok(()) => (StatusCode::OK, "ready\n".to_string()),
                        Err(reason) => (StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")),
                    }
                }
            }),
        );
    let task = tokio::spawn(serve(listener, router));
    Ok((local, task))
}

/// Connections served at once; more wait in the kernel's queue. A scraper or
/// a probe needs one or two: the bound keeps a flood of idle connections from
/// taking the descriptors the gRPC listener needs.
const MAX_CONNECTIONS: usize = 64;
/// How long a client may take to send a request's headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one connection may stay open, requests included: a scrape takes
/// milliseconds, and a client that keeps a connection alive opens a new one.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

/// How long an answer may wait for its client to read it: a client that
/// sends requests and never reads the answers (pipelining `GET /metrics`)
/// would otherwise hold its connection, and with 64 such a client every slot,
/// until `CONNECTION_LIFETIME`.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// Accepts connections and serves each in a task of its own, within the
/// bounds above (axum's own loop has no header timeout or connection bound).
async fn serve(listener: tokio::net::TcpListener, router: Router) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(err) => {
                // Out of descriptors, most likely: wait for some to close.
                tracing::warn!("the [api] endpoint cannot accept a connection: {err}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        tokio::spawn(async move {
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(
                    hyper_util::rt::TokioIo::new(WriteDeadline::new(stream, WRITE_TIMEOUT)),
                    service,
                );
            tokio::pin!(connection);
            if tokio::time::timeout(CONNECTION_LIFETIME, connection.as_mut())
                .await
                .is_err()
            {
                // Finish the answer in progress, if any, then close.
                connection.as_mut().graceful_shutdown();
                let _ = tokio::time::timeout(HEADER_TIMEOUT, connection).await;
            }
            drop(slot);
        });
    }
}

/// A stream whose writes fail (`TimedOut`) once its client has left answers
/// unread for `timeout`: from a write that finds bytes still in the
/// kernel's send queue, until a write finds it empty (the client took
/// everything). Partial progress does not count: the kernel's send buffer
/// grows by itself while a client reads nothing. The server then drops the
/// connection.
struct WriteDeadline<S> {
    stream: S,
    timeout: Duration,
    /// Set while answers wait for the client.
    unread_since: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl<S: std::os::fd::AsRawFd> WriteDeadline<S> {
    fn new(stream: S, timeout: Duration) -> Self {
        Self {
            stream,
            timeout,
            unread_since: None,
        }
    }

    /// Bytes sent and not yet taken by the client (`SIOCOUTQ`); 0 if unknown.
    fn unread(&self) -> i32 {
        let mut queued: libc::c_int = 0;
        // SAFETY: TIOCOUTQ writes one int into `queued` for a socket fd that
        // `self.stream` keeps open.
        let done = unsafe { libc::ioctl(self.stream.as_raw_fd(), libc::TIOCOUTQ, &mut queued) };
        if done == 0 { queued } else { 0 }
    }

    /// What a write that returned `poll` means under the deadline.
    fn judge<T>(
        &mut self,
        cx: &mut std::task::Context<'_>,
        poll: std::task::Poll<std::io::Result<T>>,
    ) -> std::task::Poll<std::io::Result<T>> {
        if self.unread() == 0 {
            self.unread_since = None;
            return poll;
        }
        let timeout = self.timeout;
        let since = self
            .unread_since
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        if since.as_mut().poll(cx).is_ready() {
            return std::task::Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the client did not read its answers",
            )));
        }
        poll
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for WriteDeadline<S> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + std::os::fd::AsRawFd + Unpin> tokio::io::AsyncWrite
    for WriteDeadline<S>
{
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let poll = std::pin::Pin::new(&mut this.stream).poll_write(cx, buf);
        this.judge(cx, poll)
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let poll = std::pin::Pin::new(&mut this.stream).poll_flush(cx);
        this.judge(cx, poll)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// `/metrics`: OpenMetrics when the scraper accepts it, else the Prometheus
/// text format.
fn metrics(registry: &MetricsRegistry, headers: &HeaderMap) -> axum::response::Response {
    let openmetrics = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .any(|value| value.contains("application/openmetrics-text"));
    let content_type = if openmetrics {
        OPENMETRICS_TEXT
    } else {
        PROMETHEUS_TEXT
    };
    (
        [(header::CONTENT_TYPE, content_type)],
        registry.encode(openmetrics),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_follows_the_phase_then_the_pipelines_readiness() {
        let ready = ReadyState::starting();
        assert_eq!(ready.check(), Err("the pipeline is starting".into()));
        let pipeline = Readiness::new();
        ready.running(pipeline.clone());
        assert_eq!(ready.check(), Ok(()));
        pipeline.set_not_ready("file", "failed and stopped");
        pipeline.set_not_ready("sensors", "full for 1s");
        assert_eq!(
            ready.check(),
            Err("stage `file`: failed and stopped; stage `sensors`: full for 1s".into())
        );
        pipeline.set_ready("file");
        pipeline.set_ready("sensors");
        assert_eq!(ready.check(), Ok(()));
        ready.shutting_down();
        assert_eq!(ready.check(), Err("shutting down".into()));
    }

    #[test]
    fn addresses_are_checked() {
        let config = |address: &str| ApiConfig {
            address: Some(address.into()),
        };
        assert!(config("127.0.0.1:0").validate().is_ok());
        assert!(config("localhost:9464").validate().is_ok());
        assert!(config("127.0.0.1").validate().is_err());
        assert!(config("127.0.0.1:99999").validate().is_err());
        assert!(ApiConfig::default().validate().is_ok());
    }
}

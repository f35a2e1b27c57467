//! TLS for the `grpc` source: a layer between the accept loop and the HTTP/2
//! server that turns each accepted connection into a TLS stream, and the
//! upkeep of the certificate material while the source runs.
//!
//! - Handshakes run in their own tasks, each bounded by `handshake_timeout`,
//!   at most [`MAX_HANDSHAKES`] at a time, so that a slow or silent client
//!   holds neither the accept loop nor more than a socket for long. A failed
//!   handshake is counted ([`HandshakeFailures`]) and logged; the server
//!   serves on.
//! - Each handshake takes the `ServerConfig` current when it starts, from an
//!   `ArcSwap`: swapping in a new one (files changed, SIGHUP, or a reload
//!   that names other files) changes what new connections get, while every
//!   established connection keeps the config it was made with.
//! - New material that fails to load leaves the old in use, with a WARN
//!   naming the file and the reason.

mod material;

use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};
use sink_api::metrics::Counter;
use sink_api::watch::FileWatcher;
use sink_api::{ConfigError, ShutdownSignal};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::Stream;
use tonic::transport::server::Connected;

use super::incoming::ConnectionInfo;
use super::metrics::HANDSHAKE_FAILURES;

use self::material::{LeafInfo, Loaded, rfc3339, unix_now};

/// TLS on the listener: `tls = { cert = "server.crt", key = "server.key" }`,
/// plus `client_ca` to require client certificates (mutual TLS).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file holding the server's certificate, then any intermediate CA
    /// certificates. Reloaded live when it changes.
    pub cert: PathBuf,
    /// PEM file holding the certificate's private key (PKCS#8, PKCS#1 or
    /// SEC1). Reloaded live when it changes.
    pub key: PathBuf,
    /// PEM file of CA certificates: when set, every client must present a
    /// certificate signed by one of them (mutual TLS). Reloaded live.
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
    /// Longest a client may take to complete the TLS handshake after
    /// connecting; past it the connection is closed and counted as failed.
    #[serde(default = "default_handshake_timeout", with = "humantime_serde")]
    #[schemars(with = "String", extend("format" = "duration"))]
    pub handshake_timeout: Duration,
}

/// As the plaintext handshake deadline: honest clients take milliseconds.
fn default_handshake_timeout() -> Duration {
    super::incoming::HANDSHAKE_DEADLINE
}

/// Handshakes in progress at once; beyond it the listener is not polled, and
/// further clients wait in the kernel's backlog. Each costs a socket and a
/// few tens of kilobytes for at most `handshake_timeout`.
pub const MAX_HANDSHAKES: usize = 512;

/// The longest `handshake_timeout`.
const MAX_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(300);

/// A certificate this close to expiry is warned about, at startup, on every
/// load and once a day.
const EXPIRY_WARNING_DAYS: i64 = 30;

/// How often the running certificate's expiry is looked at.
const EXPIRY_CHECK_EVERY: Duration = Duration::from_secs(24 * 3600);

/// Failed handshakes are logged at WARN at most this often (with the count);
/// the others at DEBUG.
const FAILURE_WARN_EVERY: Duration = Duration::from_secs(10);

impl TlsConfig {
    /// Checks what can be checked without reading the files (which happens
    /// when the source is built, and again on every change).
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (key, path) in [("tls.cert", &self.cert), ("tls.key", &self.key)]
            .into_iter()
            .chain(self.client_ca.as_ref().map(|path| ("tls.client_ca", path)))
        {
            if path.as_os_str().is_empty() {
                return Err(ConfigError::new(key, "must name a PEM file"));
            }
        }
        if self.handshake_timeout.is_zero() || self.handshake_timeout > MAX_HANDSHAKE_TIMEOUT {
            return Err(ConfigError::new(
                "tls.handshake_timeout",
                format!(
                    "must be more than 0 and at most {}",
                    humantime::format_duration(MAX_HANDSHAKE_TIMEOUT)
                ),
            ));
        }
        Ok(())
    }
}

/// The TLS table a reload may apply: `new`, except that a reload never
/// turns client authentication off. Removing `client_ca` from a running
/// mutual-TLS listener would let every client in without a certificate, so
/// it is refused (the CA in force stays, with an ERROR saying that a restart
/// applies it); every other change of the table applies.
pub(super) fn kept_client_auth(
    stage: &str,
    in_force: Option<&TlsConfig>,
    new: &TlsConfig,
) -> TlsConfig {
    let mut applied = new.clone();
    if let Some(client_ca) = in_force.and_then(|old| old.client_ca.as_ref())
        && new.client_ca.is_none()
    {
        tracing::error!(
            stage,
            "reload refused for tls.client_ca: removing it would turn client certificate checks off; client certificates stay required with {} until a restart applies the change",
            client_ca.display()
        );
        applied.client_ca = Some(client_ca.clone());
    }
    applied
}

/// What a handshake starts from; swapped whole when the material changes.
struct Material {
    server: TlsAcceptor,
    handshake_timeout: Duration,
}

/// The TLS side of one source: loaded when the source is built (so that bad
/// files refuse the start), kept up to date while it runs.
pub struct Tls {
    config: TlsConfig,
    loaded: Loaded,
}

impl Tls {
    /// Loads the files `config` names; a refusal names the key, file and reason.
    pub fn load(config: &TlsConfig) -> Result<Self, ConfigError> {
        Ok(Self {
            config: config.clone(),
            loaded: material::load(config)?,
        })
    }

    /// Starts keeping the material up to date (file changes, SIGHUP, new
    /// config through [`Running::update`], a daily expiry check) until
    /// shutdown. Failed handshakes are counted in `by_reason` (in
    /// [`HANDSHAKE_FAILURES`] order) too.
    pub fn start(
        self,
        stage: &str,
        shutdown: ShutdownSignal,
        by_reason: [Counter; HANDSHAKE_FAILURES.len()],
    ) -> Running {
        let stage: Arc<str> = stage.into();
        let current = Arc::new(ArcSwap::from_pointee(Material {
            server: TlsAcceptor::from(Arc::clone(&self.loaded.server)),
            handshake_timeout: self.config.handshake_timeout,
        }));
        let failures = Arc::new(HandshakeFailures {
            by_reason,
            ..HandshakeFailures::default()
        });
        let (updates, receiver) = watch::channel(self.config.clone());
        let upkeep = Upkeep {
            stage: Arc::clone(&stage),
            config: self.config,
            leaf: self.loaded.leaf,
            fingerprint: self.loaded.fingerprint,
            current: Arc::clone(&current),
        };
        tokio::spawn(upkeep.run(receiver, shutdown));
        Running {
            handshaker: Handshaker {
                stage,
                current,
                failures,
            },
            updates,
        }
    }
}

/// A running source's handle on its TLS.
pub struct Running {
    handshaker: Handshaker,
    updates: watch::Sender<TlsConfig>,
}

impl Running {
    /// What the accept layer needs.
    pub fn handshaker(&self) -> Handshaker {
        self.handshaker.clone()
    }

    /// Hands a reloaded `tls` table over: the files are read again (even if
    /// they are the same) and `handshake_timeout` applies to new handshakes.
    pub fn update(&self, config: &TlsConfig) {
        self.updates.send_replace(config.clone());
    }

    /// Handshakes that failed since the source started.
    pub fn failures(&self) -> Arc<HandshakeFailures> {
        Arc::clone(&self.handshaker.failures)
    }
}

/// Failed TLS handshakes of one source: a count that only grows (for the
/// metrics endpoint to export) and the rate limit of their WARN lines.
#[derive(Debug, Default)]
pub struct HandshakeFailures {
    count: AtomicU64,
    /// The `sink_grpc_tls_handshake_failures_total` series, by reason.
    by_reason: [Counter; HANDSHAKE_FAILURES.len()],
    last_warned: Mutex<Option<Instant>>,
}

impl HandshakeFailures {
    /// Handshakes that failed (refused, broken off or timed out) so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    fn record(&self, stage: &str, peer: std::net::SocketAddr, (label, reason): (&str, String)) {
        let count = self.count.fetch_add(1, Ordering::Relaxed) + 1;
        let index = HANDSHAKE_FAILURES
            .iter()
            .position(|known| *known == label)
            .unwrap_or(HANDSHAKE_FAILURES.len() - 1);
        self.by_reason[index].inc();
        let warn = {
            let mut last = self.last_warned.lock().unwrap_or_else(|e| e.into_inner());
            let due = last.is_none_or(|at| at.elapsed() >= FAILURE_WARN_EVERY);
            if due {
                *last = Some(Instant::now());
            }
            due
        };
        if warn {
            tracing::warn!(
                stage,
                "TLS handshake with {peer} failed: {reason} ({count} failed since start; more within {}s are logged at debug level)",
                FAILURE_WARN_EVERY.as_secs()
            );
        } else {
            tracing::debug!(stage, "TLS handshake with {peer} failed: {reason}");
        }
    }
}

/// Turns accepted connections into TLS streams.
#[derive(Clone)]
pub struct Handshaker {
    stage: Arc<str>,
    current: Arc<ArcSwap<Material>>,
    failures: Arc<HandshakeFailures>,
}

impl Handshaker {
    /// The handshake of one accepted connection, with the material current
    /// now and within its timeout; `None` (counted) if it fails.
    fn handshake<IO>(&self, io: IO) -> impl Future<Output = Option<TlsStream<IO>>> + Send + 'static
    where
        IO: AsyncRead
            + AsyncWrite
            + Connected<ConnectInfo = ConnectionInfo>
            + Unpin
            + Send
            + 'static,
    {
        let material = self.current.load_full();
        let this = self.clone();
        async move {
            let peer = io.connect_info().remote;
            let timeout = material.handshake_timeout;
            let reason = match tokio::time::timeout(timeout, material.server.accept(io)).await {
                Ok(Ok(stream)) => return Some(stream),
                Ok(Err(err)) => describe_failure(&err),
                Err(_) => (
                    "timeout",
                    format!(
                        "not completed within {} (handshake_timeout)",
                        humantime::format_duration(timeout)
                    ),
                ),
            };
            this.failures.record(&this.stage, peer, reason);
            None
        }
    }
}

/// Why a handshake failed: its `reason` label (one of
/// [`HANDSHAKE_FAILURES`]), and in the operator's words where rustls's are
/// terse.
fn describe_failure(err: &io::Error) -> (&'static str, String) {
    let rustls_error = err
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    match rustls_error {
        Some(rustls::Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType)) => (
            "not_tls",
            "the client did not speak TLS (a plaintext client on a TLS port?)".into(),
        ),
        Some(rustls::Error::NoCertificatesPresented) => (
            "no_client_certificate",
            "the client sent no certificate, and client_ca requires one".into(),
        ),
        Some(rustls::Error::InvalidCertificate(why)) => (
            "bad_client_certificate",
            format!("the client's certificate was refused: {why:?}"),
        ),
        Some(other) => ("other", other.to_string()),
        None if err.kind() == io::ErrorKind::UnexpectedEof => (
            "closed",
            "the client closed the connection during the handshake".into(),
        ),
        None => ("other", err.to_string()),
    }
}

/// The connections the HTTP/2 server is given: accepted ones, through a TLS
/// handshake when TLS is on.
pub struct Incoming<S, IO> {
    accepted: S,
    accepted_ended: bool,
    handshaker: Option<Handshaker>,
    handshakes: JoinSet<Option<TlsStream<IO>>>,
}

impl<S, IO> Incoming<S, IO> {
    /// The connections of `accepted`, plain when `handshaker` is `None`.
    pub fn new(accepted: S, handshaker: Option<Handshaker>) -> Self {
        Self {
            accepted,
            accepted_ended: false,
            handshaker,
            handshakes: JoinSet::new(),
        }
    }
}

impl<S, IO, E> Stream for Incoming<S, IO>
where
    S: Stream<Item = Result<IO, E>> + Unpin,
    IO: AsyncRead + AsyncWrite + Connected<ConnectInfo = ConnectionInfo> + Unpin + Send + 'static,
{
    type Item = Result<Conn<IO>, E>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        let Some(handshaker) = &this.handshaker else {
            return Pin::new(&mut this.accepted)
                .poll_next(cx)
                .map(|item| item.map(|accepted| accepted.map(Conn::Plain)));
        };
        loop {
            // Accept while there is room for another handshake; when full,
            // the next finished handshake wakes this up again.
            while !this.accepted_ended && this.handshakes.len() < MAX_HANDSHAKES {
                match Pin::new(&mut this.accepted).poll_next(cx) {
                    Poll::Ready(Some(Ok(io))) => {
                        this.handshakes.spawn(handshaker.handshake(io));
                    }
                    Poll::Ready(Some(Err(err))) => return Poll::Ready(Some(Err(err))),
                    Poll::Ready(None) => this.accepted_ended = true,
                    Poll::Pending => break,
                }
            }
            match this.handshakes.poll_join_next(cx) {
                Poll::Ready(Some(Ok(Some(stream)))) => {
                    return Poll::Ready(Some(Ok(Conn::Tls(Box::new(stream)))));
                }
                // Failed (counted already) or aborted: room for another.
                Poll::Ready(Some(_)) => continue,
                Poll::Ready(None) if this.accepted_ended => return Poll::Ready(None),
                Poll::Ready(None) | Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// One connection to serve: plain, or TLS over the accepted one.
pub enum Conn<IO> {
    /// Plaintext (no `tls` key).
    Plain(IO),
    /// After a completed handshake.
    Tls(Box<TlsStream<IO>>),
}

impl<IO: Connected> Connected for Conn<IO> {
    // The accepted connection's own info, so that calls are still counted
    // against their connection (idle timeout) and know their peer.
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        match self {
            Conn::Plain(io) => io.connect_info(),
            Conn::Tls(stream) => stream.get_ref().0.connect_info(),
        }
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncRead for Conn<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(io) => Pin::new(io).poll_read(cx, buf),
            Conn::Tls(stream) => Pin::new(stream.as_mut()).poll_read(cx, buf),
        }
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Conn<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(io) => Pin::new(io).poll_write(cx, buf),
            Conn::Tls(stream) => Pin::new(stream.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(io) => Pin::new(io).poll_write_vectored(cx, bufs),
            Conn::Tls(stream) => Pin::new(stream.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(io) => io.is_write_vectored(),
            Conn::Tls(stream) => stream.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(io) => Pin::new(io).poll_flush(cx),
            Conn::Tls(stream) => Pin::new(stream.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(io) => Pin::new(io).poll_shutdown(cx),
            Conn::Tls(stream) => Pin::new(stream.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Keeps the material current while the source runs.
struct Upkeep {
    stage: Arc<str>,
    config: TlsConfig,
    leaf: LeafInfo,
    fingerprint: u64,
    current: Arc<ArcSwap<Material>>,
}

impl Upkeep {
    async fn run(mut self, mut updates: watch::Receiver<TlsConfig>, shutdown: ShutdownSignal) {
        let mut watcher = self.watch();
        // A file replaced between the first load and the watch's start sends
        // no event: compare once now that the watch is on.
        self.reload("a file changed", false).await;
        // Another handler of the same signal; the runtime's own reload of the
        // pipeline file is unaffected.
        let mut hangup = match signal(SignalKind::hangup()) {
            Ok(hangup) => Some(hangup),
            Err(err) => {
                tracing::warn!(stage = %self.stage, "cannot handle SIGHUP for TLS material: {err}");
                None
            }
        };
        let mut expiry = tokio::time::interval(EXPIRY_CHECK_EVERY);
        loop {
            tokio::select! {
                _ = shutdown.wait() => return,
                // The first tick is at once: the startup warning.
                _ = expiry.tick() => self.check_expiry(),
                Some(()) = async { watcher.as_mut()?.changed().await } => {
                    self.reload("a file changed", false).await;
                }
                Some(()) = async { hangup.as_mut()?.recv().await } => {
                    self.reload("SIGHUP", false).await;
                }
                Ok(()) = updates.changed() => {
                    let config = updates.borrow_and_update().clone();
                    if config.cert != self.config.cert
                        || config.key != self.config.key
                        || config.client_ca != self.config.client_ca
                    {
                        self.config = config;
                        watcher = self.watch();
                    } else {
                        self.config = config;
                    }
                    self.reload("pipeline reload", true).await;
                }
            }
        }
    }

    /// Watches the directories of the files now named.
    fn watch(&self) -> Option<FileWatcher> {
        let mut files = vec![self.config.cert.as_path(), self.config.key.as_path()];
        files.extend(self.config.client_ca.as_deref());
        match FileWatcher::start_all(&files) {
            Ok(watcher) => Some(watcher),
            Err(err) => {
                tracing::warn!(
                    stage = %self.stage,
                    "cannot watch the TLS files: {err}; send SIGHUP to reload them"
                );
                None
            }
        }
    }

    /// Loads the files again and, if they changed (or `always`), makes them
    /// what new handshakes use; if they fail to load, keeps the old material.
    async fn reload(&mut self, trigger: &str, always: bool) {
        let config = self.config.clone();
        let loaded = tokio::task::spawn_blocking(move || material::load(&config))
            .await
            .unwrap_or_else(|err| Err(ConfigError::new("tls", format!("loading failed: {err}"))));
        let loaded = match loaded {
            Ok(loaded) => loaded,
            Err(err) => {
                if always {
                    // A reloaded handshake_timeout applies all the same.
                    let server = self.current.load().server.clone();
                    self.current.store(Arc::new(Material {
                        server,
                        handshake_timeout: self.config.handshake_timeout,
                    }));
                }
                tracing::warn!(
                    stage = %self.stage,
                    "TLS material not reloaded ({trigger}): {err}; new connections keep the certificate with serial {} (expires {})",
                    self.leaf.serial,
                    self.leaf.expires()
                );
                return;
            }
        };
        if !always && loaded.fingerprint == self.fingerprint {
            tracing::debug!(stage = %self.stage, "TLS files unchanged ({trigger})");
            return;
        }
        self.current.store(Arc::new(Material {
            server: TlsAcceptor::from(loaded.server),
            handshake_timeout: self.config.handshake_timeout,
        }));
        self.fingerprint = loaded.fingerprint;
        self.leaf = loaded.leaf;
        tracing::info!(
            stage = %self.stage,
            "TLS material reloaded ({trigger}): certificate {} serial {}, expires {}; new connections use it, open ones keep theirs",
            self.config.cert.display(),
            self.leaf.serial,
            self.leaf.expires()
        );
        self.check_expiry();
    }

    fn check_expiry(&self) {
        if let Some(warning) = expiry_warning(&self.config, &self.leaf, unix_now()) {
            tracing::warn!(stage = %self.stage, "{warning}");
        }
    }
}

/// The warning due about `leaf`'s validity at `now`, if any.
fn expiry_warning(config: &TlsConfig, leaf: &LeafInfo, now: i64) -> Option<String> {
    let cert = config.cert.display();
    let days = leaf.days_left(now);
    if leaf.not_after < now {
        Some(format!(
            "the TLS certificate {cert} (serial {}) expired on {} ({} days ago): clients refuse it; replace the file",
            leaf.serial,
            leaf.expires(),
            -days
        ))
    } else if days < EXPIRY_WARNING_DAYS {
        Some(format!(
            "the TLS certificate {cert} (serial {}) expires in {days} days, on {}; renew it (the new file is picked up live)",
            leaf.serial,
            leaf.expires()
        ))
    } else if leaf.not_before > now {
        Some(format!(
            "the TLS certificate {cert} (serial {}) is not valid before {}: clients refuse it until then (is a clock wrong?)",
            leaf.serial,
            rfc3339(leaf.not_before)
        ))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_is_warned_within_thirty_days_and_past_it() {
        let config = TlsConfig {
            cert: "tls/server.crt".into(),
            key: "tls/server.key".into(),
            client_ca: None,
            handshake_timeout: default_handshake_timeout(),
        };
        let now = 1_800_000_000;
        let leaf = |days: i64| LeafInfo {
            serial: "0A".into(),
            not_before: now - 86_400,
            not_after: now + days * 86_400 + 3600,
        };
        assert_eq!(expiry_warning(&config, &leaf(90), now), None);
        assert_eq!(expiry_warning(&config, &leaf(30), now), None);
        let soon = expiry_warning(&config, &leaf(29), now).unwrap();
        assert!(
            soon.contains("tls/server.crt (serial 0A) expires in 29 days"),
            "{soon}"
        );
        let past = expiry_warning(&config, &leaf(-3), now).unwrap();
        assert!(past.contains("expired on"), "{past}");
        assert!(past.contains("(3 days ago)"), "{past}");
        let early = LeafInfo {
            not_before: now + 60,
            ..leaf(90)
        };
        assert!(
            expiry_warning(&config, &early, now)
                .unwrap()
                .contains("not valid before")
        );
    }

    #[test]
    fn validate_names_the_key() {
        let mut config = TlsConfig {
            cert: "a.crt".into(),
            key: "".into(),
            client_ca: None,
            handshake_timeout: default_handshake_timeout(),
        };
        assert_eq!(config.validate().unwrap_err().key, "tls.key");
        config.key = "a.key".into();
        config.handshake_timeout = Duration::ZERO;
        assert_eq!(config.validate().unwrap_err().key, "tls.handshake_timeout");
        config.handshake_timeout = Duration::from_secs(5);
        assert!(config.validate().is_ok());
    }
}

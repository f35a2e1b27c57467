//! Readiness for the grpc source: it tells the pipeline's [`Readiness`] when
//! its output has been full for a while (clients cannot be served), and
//! reports readiness on the standard gRPC health service, so that load
//! balancers move traffic away from a stalled sink and back once it drains.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use sink_api::{Batch, Context, Output, Readiness, SendError, ShutdownSignal};
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

/// How long the output may stay full before the pipeline counts as stalled:
/// longer than a burst takes to pass, short enough for a load balancer's
/// health checks to move traffic soon.
pub(super) const STALL_AFTER: Duration = Duration::from_secs(1);

/// Watches the source's output while it is full.
pub struct Stall {
    stage: String,
    readiness: Readiness,
    shutdown: ShutdownSignal,
    /// Whether a watcher task runs (at most one does).
    watching: AtomicBool,
    /// Whether the output has been full for over [`STALL_AFTER`].
    output_full: AtomicBool,
    /// Calls that have waited over [`STALL_AFTER`] for room in
    /// `settings.memory_limit`.
    waiting_for_memory: AtomicUsize,
    /// Serializes the (rare) changes of the stage's readiness, so that the
    /// last one set reflects both conditions.
    report: Mutex<()>,
}

impl Stall {
    pub fn new(cx: &Context) -> Arc<Self> {
        Arc::new(Self {
            stage: cx.id().to_string(),
            readiness: cx.readiness().clone(),
            shutdown: cx.shutdown().clone(),
            watching: AtomicBool::new(false),
            output_full: AtomicBool::new(false),
            waiting_for_memory: AtomicUsize::new(0),
            report: Mutex::new(()),
        })
    }

    /// Awaits `reserving` (a call's wait for room in `settings.memory_limit`);
    /// past [`STALL_AFTER`] the pipeline counts as stalled until the wait ends,
    /// as when the output is full.
    pub async fn waiting_for_memory<T>(&self, reserving: impl Future<Output = T>) -> T {
        let mut reserving = std::pin::pin!(reserving);
        // Most calls find room at once: no timer for them.
        let first = std::future::poll_fn(|cx| Poll::Ready(reserving.as_mut().poll(cx))).await;
        if let Poll::Ready(reserved) = first {
            return reserved;
        }
        if let Ok(reserved) = tokio::time::timeout(STALL_AFTER, reserving.as_mut()).await {
            return reserved;
        }
        if self.waiting_for_memory.fetch_add(1, Ordering::AcqRel) == 0 {
            tracing::warn!(
                stage = self.stage,
                "calls have waited {STALL_AFTER:?} for room in settings.memory_limit: gRPC health says NOT_SERVING until there is room"
            );
        }
        self.report();
        let reserved = reserving.await;
        if self.waiting_for_memory.fetch_sub(1, Ordering::AcqRel) == 1 {
            tracing::info!(stage = self.stage, "settings.memory_limit has room again");
        }
        self.report();
        reserved
    }

    /// Sets the stage's readiness from both conditions.
    fn report(&self) {
        let _one_at_a_time = self.report.lock().unwrap_or_else(|e| e.into_inner());
        let stage = self.stage.as_str();
        if self.output_full.load(Ordering::Acquire) {
            self.readiness.set_not_ready(
                stage,
                format!("its output has been full for over {STALL_AFTER:?}"),
            );
        } else if self.waiting_for_memory.load(Ordering::Acquire) > 0 {
            self.readiness.set_not_ready(
                stage,
                format!("settings.memory_limit has been reached for over {STALL_AFTER:?}"),
            );
        } else {
            self.readiness.set_ready(stage);
        }
    }

    /// Hands `batch` to `output`: at once if there is room; otherwise it
    /// starts watching the output and, if `wait`, waits for room (else hands
    /// the batch back as `Full`).
    pub(super) async fn hand_on(
        self: &Arc<Self>,
        output: &Arc<Output>,
        batch: Batch,
        wait: bool,
    ) -> Result<(), SendError> {
        match output.try_send(batch) {
            Err(SendError::Full(batch)) => {
                self.watch(output);
                if wait {
                    output.send(batch).await
                } else {
                    Err(SendError::Full(batch))
                }
            }
            sent => sent,
        }
    }

    /// Starts (unless one runs) a task that marks the pipeline not ready if
    /// `output` has no room within [`STALL_AFTER`], and ready once it has.
    fn watch(self: &Arc<Self>, output: &Arc<Output>) {
        if self.watching.swap(true, Ordering::AcqRel) {
            return;
        }
        let this = Arc::clone(self);
        let output = Arc::clone(output);
        tokio::spawn(async move {
            // At shutdown the watcher lets go of the output at once, so that
            // the channels downstream can close.
            tokio::select! {
                _ = this.shutdown.wait() => {}
                _ = this.follow(&output) => {}
            }
            drop(output);
            this.watching.store(false, Ordering::Release);
        });
    }

    async fn follow(&self, output: &Output) {
        if tokio::time::timeout(STALL_AFTER, output.room())
            .await
            .is_ok()
        {
            return;
        }
        let stage = self.stage.as_str();
        tracing::warn!(
            stage,
            "the pipeline has been full for {STALL_AFTER:?}: calls wait or are refused, and gRPC health says NOT_SERVING until it drains"
        );
        self.output_full.store(true, Ordering::Release);
        self.report();
        let since = tokio::time::Instant::now();
        output.room().await;
        self.output_full.store(false, Ordering::Release);
        self.report();
        tracing::info!(
            stage,
            "the pipeline has room again, after being full for about {:.1}s: gRPC health says SERVING unless another stage is not ready",
            since.elapsed().as_secs_f64() + STALL_AFTER.as_secs_f64()
        );
    }
}

/// The health service name that answers SERVING as long as the process
/// serves at all, whatever readiness says: for liveness probes, which must
/// not restart a sink whose pipeline is only full for a while.
pub(super) const LIVENESS: &str = "liveness";

/// Keeps the gRPC health service's answer for the whole server (`""`) and
/// for `service` in line with the pipeline's readiness, until shutdown, and
/// answers [`LIVENESS`] SERVING. The first answers are set before this returns.
pub async fn report_health(
    health: HealthReporter,
    cx: &Context,
    service: &'static str,
) -> tokio::task::JoinHandle<()> {
    let mut watch = cx.readiness().watch();
    let shutdown = cx.shutdown().clone();
    let reporter = health.clone();
    let set = move |ready: bool| {
        let health = reporter.clone();
        async move {
            let status = if ready {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            health.set_service_status(service, status).await;
            health.set_service_status("", status).await;
        }
    };
    health
        .set_service_status(LIVENESS, ServingStatus::Serving)
        .await;
    set(watch.ready()).await;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = shutdown.wait() => return,
                changed = watch.changed() => match changed {
                    Some(ready) => set(ready).await,
                    None => return,
                },
            }
        }
    })
}

//! The running sink: a batch's readings become series, the series become
//! requests of at most `max_samples_per_request` samples, and the requests
//! go out over `concurrency` connections until the receiver has answered
//! each one for good.
//!
//! Ordering: the series of a batch are dealt out to the connections, each
//! series to one, and each connection sends its requests one after another.
//! The next batch is taken only when every request of this one is answered,
//! so the samples of a series reach the receiver in time order (as far as
//! the readings came in time order) whatever `concurrency` is.
//!
//! Failures, as the remote-write specification asks: 5xx, 429 and no answer
//! are retried with exponential backoff (or after the receiver's
//! `Retry-After`), holding the batch, so backpressure reaches the clients;
//! any other status is final: its samples are dropped, counted by reason,
//! logged at most every 10 s, and the batch's acknowledgements fail.
//!
//! Memory: besides the batch (already counted in `settings.memory_limit`),
//! the sink holds its series (the labels of each distinct series once, 16
//! bytes per sample) and one encoded request per connection.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use sink_api::backoff::Backoff;
use sink_api::metrics::{Counter, Histogram, Metrics};
use sink_api::{
    BuildContext, ConfigError, Context, Input, Readiness, Sink, SinkConfig, StageError,
};
use tokio::sync::watch;

use crate::client::{self, Answer, Connection, Endpoint};
use crate::config::PrometheusRemoteWriteConfig;
use crate::encode::{Encoder, Part};
use crate::mapping::{self, Grouped, Series};

#[sink_api::stage(name = "prometheus_remote_write")]
impl SinkConfig for PrometheusRemoteWriteConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        self.check_numbers()?;
        Endpoint::new(self).map(drop)
    }

    fn build(&self, _: &BuildContext) -> Result<Box<dyn Sink>, ConfigError> {
        Ok(Box::new(RemoteWriteSink {
            config: Arc::new(self.clone()),
            endpoint: Arc::new(Endpoint::new(self)?),
        }))
    }
}

struct RemoteWriteSink {
    config: Arc<PrometheusRemoteWriteConfig>,
    endpoint: Arc<Endpoint>,
}

/// What a request in flight reads at each attempt, so that a reload (a new
/// URL, token or backoff) applies to retries already under way.
struct Settings {
    endpoint: Arc<Endpoint>,
    min_backoff: Duration,
    max_backoff: Duration,
}

/// What the senders share.
struct Shared {
    stage: String,
    settings: watch::Receiver<Arc<Settings>>,
    metrics: SinkMetrics,
    readiness: Readiness,
    /// Whether this stage has marked the pipeline not ready.
    not_ready: AtomicBool,
    retry_log: LogEvery,
    refusal_log: LogEvery,
}

/// Consecutive failed attempts after which the stage reports NOT_SERVING.
const FAILURES_BEFORE_NOT_READY: u32 = 3;

#[async_trait]
impl Sink for RemoteWriteSink {
    async fn run(self: Box<Self>, mut input: Input, cx: Context) -> Result<(), StageError> {
        let mut params = cx.params::<PrometheusRemoteWriteConfig>();
        let mut config = self.config;
        let (settings_tx, settings) = watch::channel(Arc::new(Settings {
            endpoint: self.endpoint,
            min_backoff: config.min_backoff,
            max_backoff: config.max_backoff,
        }));
        let shared = Shared {
            stage: cx.id().to_string(),
            settings,
            metrics: SinkMetrics::new(cx.metrics()),
            readiness: cx.readiness().clone(),
            not_ready: AtomicBool::new(false),
            retry_log: LogEvery::default(),
            refusal_log: LogEvery::default(),
        };
        let mut senders: Vec<Sender> = Vec::new();
        while let Some(batch) = input.recv().await {
            if let Some(new) = params.try_changed() {
                config = apply(&shared.stage, new, &config, &settings_tx).await;
            }
            let grouped = mapping::group(&batch);
            shared.metrics.without_value.inc_by(grouped.without_value);
            shared.metrics.superseded.inc_by(grouped.superseded);
            let plans = plan(&grouped, config.concurrency, config.max_samples_per_request);
            senders.resize_with(config.concurrency, Sender::default);
            let work = futures_util::future::join_all(
                senders
                    .iter_mut()
                    .zip(plans)
                    .map(|(sender, requests)| sender.send_all(&grouped.series, requests, &shared)),
            );
            tokio::pin!(work);
            let refused: u64 = loop {
                tokio::select! {
                    refused = &mut work => break refused.into_iter().sum(),
                    new = params.changed() => {
                        config = apply(&shared.stage, new, &config, &settings_tx).await;
                    }
                }
            };
            if refused > 0 {
                // Its clients hear the batch was not written (they may send
                // it again; the receiver refuses what it already holds).
                input.fail_taken();
            }
        }
        let metrics = &shared.metrics;
        tracing::info!(
            stage = shared.stage,
            "prometheus_remote_write sent {} samples; {} refused by the receiver, {} readings without a value, {} superseded",
            metrics.sent.get(),
            metrics.failed.iter().map(Counter::get).sum::<u64>(),
            metrics.without_value.get(),
            metrics.superseded.get()
        );
        Ok(())
    }
}

/// Takes a reloaded config: the endpoint is rebuilt (reading the token file
/// and TLS material off the async workers); if that fails now though it
/// validated, the old config stays and the log says why.
async fn apply(
    stage: &str,
    new: Arc<PrometheusRemoteWriteConfig>,
    old: &Arc<PrometheusRemoteWriteConfig>,
    settings: &watch::Sender<Arc<Settings>>,
) -> Arc<PrometheusRemoteWriteConfig> {
    let for_build = Arc::clone(&new);
    let built = tokio::task::spawn_blocking(move || Endpoint::new(&for_build))
        .await
        .map_err(|err| err.to_string())
        .and_then(|endpoint| endpoint.map_err(|err| err.to_string()));
    match built {
        Ok(endpoint) => {
            settings.send_replace(Arc::new(Settings {
                endpoint: Arc::new(endpoint),
                min_backoff: new.min_backoff,
                max_backoff: new.max_backoff,
            }));
            new
        }
        Err(err) => {
            tracing::error!(stage, "reloaded config not applied, keeping the old: {err}");
            Arc::clone(old)
        }
    }
}

/// The requests of each connection: series dealt out round-robin (each to
/// one connection, so its samples stay in order), cut into requests of at
/// most `max` samples; a long series goes on in the connection's next
/// request.
fn plan(grouped: &Grouped, senders: usize, max: usize) -> Vec<Vec<Vec<Part>>> {
    let mut plans: Vec<Vec<Vec<Part>>> = vec![Vec::new(); senders];
    let mut open: Vec<(Vec<Part>, usize)> = vec![(Vec::new(), 0); senders];
    for (index, series) in grouped.series.iter().enumerate() {
        let sender = index % senders;
        let (parts, count) = &mut open[sender];
        let mut start = 0;
        while start < series.samples.len() {
            let take = (max - *count).min(series.samples.len() - start);
            parts.push(Part {
                series: index,
                samples: start..start + take,
            });
            *count += take;
            start += take;
            if *count == max {
                plans[sender].push(std::mem::take(parts));
                *count = 0;
            }
        }
    }
    for (plan, (parts, _)) in plans.iter_mut().zip(open) {
        if !parts.is_empty() {
            plan.push(parts);
        }
    }
    plans
}

/// One connection's state, kept from batch to batch.
#[derive(Default)]
struct Sender {
    connection: Option<Connection>,
    encoder: Encoder,
}

impl Sender {
    /// Sends `requests` in order, each until the receiver answered it for
    /// good; returns how many samples the receiver refused.
    async fn send_all(
        &mut self,
        series: &[Series],
        requests: Vec<Vec<Part>>,
        shared: &Shared,
    ) -> u64 {
        let mut refused = 0;
        for parts in requests {
            let samples: usize = parts.iter().map(|part| part.samples.len()).sum();
            let body = self.encoder.encode(series, &parts);
            refused += self.send_one(body, samples as u64, shared).await;
        }
        refused
    }

    async fn send_one(&mut self, body: bytes::Bytes, samples: u64, shared: &Shared) -> u64 {
        let metrics = &shared.metrics;
        let mut backoff: Option<Backoff> = None;
        let mut failures = 0u32;
        loop {
            let settings = Arc::clone(&shared.settings.borrow());
            let started = Instant::now();
            let answer = client::send(&settings.endpoint, &mut self.connection, body.clone()).await;
            metrics.latency.observe(started.elapsed().as_secs_f64());
            match answer {
                Answer::Written => {
                    metrics.sent.inc_by(samples);
                    shared.answering(&settings.endpoint);
                    return 0;
                }
                Answer::Refused { status, message } => {
                    // It refuses these samples, but it is up and answering.
                    shared.answering(&settings.endpoint);
                    let reason = Reason::of(&message);
                    metrics.failed[reason as usize].inc_by(samples);
                    if let Some(also) = shared.refusal_log.allow() {
                        tracing::error!(
                            stage = shared.stage,
                            "the receiver refused {samples} samples for good (HTTP {status}, {}), \
                             dropped{}: {message}",
                            reason.label(),
                            also_note(also)
                        );
                    }
                    return samples;
                }
                Answer::Retry { why, after } => {
                    metrics.retries.inc();
                    failures += 1;
                    let backoff = backoff.get_or_insert_with(|| {
                        Backoff::between(settings.min_backoff, settings.max_backoff)
                    });
                    let delay = after.unwrap_or_else(|| backoff.next_delay());
                    if failures >= FAILURES_BEFORE_NOT_READY {
                        shared.failing(&settings.endpoint, &why);
                    }
                    if let Some(also) = shared.retry_log.allow() {
                        tracing::warn!(
                            stage = shared.stage,
                            "{samples} samples not written to {}, retrying in {delay:?}{}: {why}",
                            settings.endpoint.describe(),
                            also_note(also)
                        );
                    }
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }
}

fn also_note(also: u64) -> String {
    if also == 0 {
        String::new()
    } else {
        format!(" ({also} more like it since the last such line)")
    }
}

impl Shared {
    /// The receiver keeps failing: NOT_SERVING, with why.
    fn failing(&self, endpoint: &Endpoint, why: &str) {
        self.not_ready.store(true, Ordering::Relaxed);
        self.readiness.set_not_ready(
            &self.stage,
            format!(
                "the remote-write receiver {} keeps failing: {why}",
                endpoint.describe()
            ),
        );
    }

    /// The receiver answered: ready again if this stage had said otherwise.
    fn answering(&self, endpoint: &Endpoint) {
        if self.not_ready.swap(false, Ordering::Relaxed) {
            self.readiness.set_ready(&self.stage);
            tracing::info!(
                stage = self.stage,
                "the receiver {} takes samples again",
                endpoint.describe()
            );
        }
    }
}

/// Why a receiver refused samples, read from its message (Prometheus,
/// Mimir and VictoriaMetrics word them alike).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reason {
    OutOfOrder,
    Duplicate,
    TooOld,
    BadLabels,
    Other,
}

impl Reason {
    const ALL: [Reason; 5] = [
        Reason::OutOfOrder,
        Reason::Duplicate,
        Reason::TooOld,
        Reason::BadLabels,
        Reason::Other,
    ];

    fn of(message: &str) -> Self {
        let message = message.to_ascii_lowercase();
        if message.contains("out of order") || message.contains("out-of-order") {
            Reason::OutOfOrder
        } else if message.contains("duplicate") {
            Reason::Duplicate
        } else if message.contains("out of bounds")
            || message.contains("too old")
            || message.contains("too far")
        {
            Reason::TooOld
        } else if message.contains("label") {
            Reason::BadLabels
        } else {
            Reason::Other
        }
    }

    fn label(self) -> &'static str {
        match self {
            Reason::OutOfOrder => "out_of_order",
            Reason::Duplicate => "duplicate",
            Reason::TooOld => "too_old",
            Reason::BadLabels => "bad_labels",
            Reason::Other => "other",
        }
    }
}

/// The `sink_prometheus_remote_write_*` metrics.
struct SinkMetrics {
    sent: Counter,
    /// By [`Reason`], in the order of [`Reason::ALL`].
    failed: Vec<Counter>,
    without_value: Counter,
    superseded: Counter,
    retries: Counter,
    latency: Histogram,
}

impl SinkMetrics {
    fn new(metrics: &Metrics) -> Self {
        let skipped = "Readings not sent as samples, by reason: no_value (a reading without a value), \
                       superseded (a later reading of the same series at the same millisecond)";
        Self {
            sent: metrics.counter(
                "sink_prometheus_remote_write_samples_sent_total",
                "Samples the receiver stored (answered 2xx)",
            ),
            failed: Reason::ALL
                .iter()
                .map(|reason| {
                    metrics.counter_with(
                        "sink_prometheus_remote_write_samples_failed_total",
                        "Samples the receiver refused for good (4xx other than 429) and that were dropped, by reason",
                        &[("reason", reason.label())],
                    )
                })
                .collect(),
            without_value: metrics.counter_with(
                "sink_prometheus_remote_write_readings_skipped_total",
                skipped,
                &[("reason", "no_value")],
            ),
            superseded: metrics.counter_with(
                "sink_prometheus_remote_write_readings_skipped_total",
                skipped,
                &[("reason", "superseded")],
            ),
            retries: metrics.counter(
                "sink_prometheus_remote_write_retries_total",
                "Requests sent again after a 5xx, a 429 or no answer",
            ),
            latency: metrics.histogram(
                "sink_prometheus_remote_write_request_duration_seconds",
                "Time from sending a request to its answer (or failure)",
                &[0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0],
            ),
        }
    }
}

/// Allows a log line at most every 10 s, counting those it held back.
#[derive(Default)]
struct LogEvery {
    last: Mutex<Option<Instant>>,
    held_back: AtomicU64,
}

const LOG_EVERY: Duration = Duration::from_secs(10);

impl LogEvery {
    /// `Some(lines held back since the last)` when a line may be logged now.
    fn allow(&self) -> Option<u64> {
        let mut last = self
            .last
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if last.is_some_and(|at| at.elapsed() < LOG_EVERY) {
            self.held_back.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        *last = Some(Instant::now());
        Some(self.held_back.swap(0, Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use sink_api::testkit::readings;

    use super::*;

    #[test]
    fn every_sample_goes_in_one_request_and_a_series_stays_on_one_connection() {
        let mut grouped = mapping::group(&readings("s", 0..7));
        // Series of 1 to 7 samples.
        for (i, series) in grouped.series.iter_mut().enumerate() {
            let first = series.samples[0];
            series.samples = (0..=i as i64)
                .map(|t| mapping::Sample {
                    timestamp: first.timestamp + t,
                    value: 0.0,
                })
                .collect();
        }
        for (senders, max) in [(1, 2000), (1, 3), (3, 4), (2, 1)] {
            let plans = plan(&grouped, senders, max);
            assert_eq!(plans.len(), senders);
            let mut seen: Vec<Vec<usize>> = vec![Vec::new(); grouped.series.len()];
            for (sender, requests) in plans.iter().enumerate() {
                for request in requests {
                    let count: usize = request.iter().map(|p| p.samples.len()).sum();
                    assert!(count >= 1 && count <= max);
                    for part in request {
                        assert_eq!(part.series % senders, sender);
                        seen[part.series].extend(part.samples.clone());
                    }
                }
            }
            for (i, samples) in seen.iter().enumerate() {
                assert_eq!(*samples, (0..=i).collect::<Vec<_>>(), "{senders} {max}");
            }
        }
    }

    #[test]
    fn refusals_are_counted_by_the_reason_receivers_give() {
        assert_eq!(Reason::of("out of order sample"), Reason::OutOfOrder);
        assert_eq!(
            Reason::of("duplicate sample for timestamp"),
            Reason::Duplicate
        );
        assert_eq!(Reason::of("out of bounds"), Reason::TooOld);
        assert_eq!(
            Reason::of("invalid metric name: label name \"1a\" is not valid"),
            Reason::BadLabels
        );
        assert_eq!(Reason::of("snappy: corrupt input"), Reason::Other);
    }

    #[test]
    fn a_log_line_is_allowed_at_most_every_ten_seconds() {
        let log = LogEvery::default();
        assert_eq!(log.allow(), Some(0));
        assert_eq!(log.allow(), None);
        assert_eq!(log.allow(), None);
        *log.last.lock().unwrap() = Some(Instant::now() - LOG_EVERY);
        assert_eq!(log.allow(), Some(2));
    }
}

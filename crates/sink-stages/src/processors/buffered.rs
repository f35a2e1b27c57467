//! `buffered`: holds readings and forwards them in larger batches.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use sink_api::metrics::{Counter, Gauge, Metrics};
use sink_api::{
    Batch, BuildContext, ConfigError, Context, Input, Output, Processor, ProcessorConfig,
    StageError,
};
use tokio::time::{Instant, Interval, MissedTickBehavior};

/// Holds readings and forwards them as one batch when it holds `max_events`,
/// when `flush_interval` ticks, when its input ends, and when shutdown starts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BufferedConfig {
    /// Forward the buffer once it holds this many readings or more. Batches
    /// are never split, so a forwarded batch can be larger.
    #[serde(default = "default_max_events")]
    pub max_events: usize,
    /// Forward whatever is held this often; the tick restarts after each
    /// flush on size. A duration such as "1m" or "500ms".
    #[serde(default = "default_flush_interval", with = "humantime_serde")]
    #[schemars(with = "String", extend("format" = "duration"))]
    pub flush_interval: Duration,
}

/// Shorter ticks flush nothing sooner in practice and keep a core busy (1ns
/// took 80% of one).
const MIN_FLUSH_INTERVAL: Duration = Duration::from_millis(10);

/// Far beyond any useful interval, and far below where the timer's arithmetic
/// would overflow.
const MAX_FLUSH_INTERVAL: Duration = Duration::from_secs(365 * 24 * 3600);

fn default_max_events() -> usize {
    10
}

fn default_flush_interval() -> Duration {
    Duration::from_secs(60)
}

impl Default for BufferedConfig {
    fn default() -> Self {
        Self {
            max_events: default_max_events(),
            flush_interval: default_flush_interval(),
        }
    }
}

#[sink_api::stage(name = "buffered")]
impl ProcessorConfig for BufferedConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.max_events == 0 {
            return Err(ConfigError::new("max_events", "must be at least 1"));
        }
        if self.flush_interval < MIN_FLUSH_INTERVAL {
            return Err(ConfigError::new(
                "flush_interval",
                format!(
                    "must be at least {MIN_FLUSH_INTERVAL:?} (shorter ticks only burn CPU; use max_events for small batches)"
                ),
            ));
        }
        if self.flush_interval > MAX_FLUSH_INTERVAL {
            return Err(ConfigError::new(
                "flush_interval",
                "must be at most 365 days (the timer cannot count further)",
            ));
        }
        Ok(())
    }

    fn build(&self, _: &BuildContext) -> Result<Box<dyn Processor>, ConfigError> {
        Ok(Box::new(Buffered {
            config: Arc::new(self.clone()),
        }))
    }
}

struct Buffered {
    config: Arc<BufferedConfig>,
}

#[async_trait]
impl Processor for Buffered {
    async fn run(
        self: Box<Self>,
        mut input: Input,
        output: Output,
        cx: Context,
    ) -> Result<(), StageError> {
        let mut config = self.config;
        let mut params = cx.params::<BufferedConfig>();
        let mut buffer = Batch::new();
        let mut ticker = periodic(config.flush_interval);
        let mut flushed_for_shutdown = false;
        let metrics = BufferMetrics::new(cx.metrics());
        loop {
            tokio::select! {
                received = input.recv() => {
                    let Some(batch) = received else {
                        return forward(&mut buffer, &output, &metrics, Reason::InputClosed).await;
                    };
                    // Readings and the tokens of their calls, merged.
                    buffer.append(batch);
                    metrics.held.set(buffer.len() as i64);
                    if buffer.len() >= config.max_events {
                        forward(&mut buffer, &output, &metrics, Reason::Size).await?;
                        ticker.reset();
                    }
                }
                _ = ticker.tick() => forward(&mut buffer, &output, &metrics, Reason::Interval).await?,
                new = params.changed() => {
                    if new.flush_interval != config.flush_interval {
                        ticker = periodic(new.flush_interval);
                    }
                    if buffer.len() >= new.max_events {
                        forward(&mut buffer, &output, &metrics, Reason::Reload).await?;
                        ticker.reset();
                    }
                    config = new;
                }
                // Hand on what is held now rather than when the sources have
                // finished: it shortens shutdown. Input is still drained after.
                _ = cx.shutdown().wait(), if !flushed_for_shutdown => {
                    flushed_for_shutdown = true;
                    forward(&mut buffer, &output, &metrics, Reason::Shutdown).await?;
                }
            }
        }
    }
}

/// A periodic tick whose first tick is one `period` from now.
fn periodic(period: Duration) -> Interval {
    let mut ticker = tokio::time::interval_at(Instant::now() + period, period);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    ticker
}

/// Why the buffer was forwarded: the `reason` label of
/// `sink_buffered_flushes_total`.
#[derive(Debug, Clone, Copy)]
enum Reason {
    Size,
    Interval,
    InputClosed,
    Shutdown,
    Reload,
}

impl Reason {
    const ALL: [Self; 5] = [
        Self::Size,
        Self::Interval,
        Self::InputClosed,
        Self::Shutdown,
        Self::Reload,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Self::Size => "size",
            Self::Interval => "interval",
            Self::InputClosed => "input_closed",
            Self::Shutdown => "shutdown",
            Self::Reload => "reload",
        }
    }
}

/// The stage's metrics: readings held now, and flushes by reason.
struct BufferMetrics {
    held: Gauge,
    flushes: [Counter; 5],
}

impl BufferMetrics {
    fn new(metrics: &Metrics) -> Self {
        Self {
            held: metrics.gauge("sink_buffered_readings", "Readings held in the buffer now"),
            flushes: Reason::ALL.map(|reason| {
                metrics.counter_with(
                    "sink_buffered_flushes_total",
                    "Batches forwarded, by reason: size, interval, input_closed, shutdown, reload (a lower max_events)",
                    &[("reason", reason.as_str())],
                )
            }),
        }
    }
}

/// Sends the buffer on whole, leaving an empty one; sends nothing when empty.
/// The sent batch is moved away, never touched again.
async fn forward(
    buffer: &mut Batch,
    output: &Output,
    metrics: &BufferMetrics,
    reason: Reason,
) -> Result<(), StageError> {
    if buffer.is_empty() {
        return Ok(());
    }
    output.send(std::mem::take(buffer)).await?;
    metrics.flushes[reason as usize].inc();
    metrics.held.set(0);
    Ok(())
}

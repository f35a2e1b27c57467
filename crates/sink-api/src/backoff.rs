//! Waiting between retries of a failing write, as the built-in `json_file`
//! does: a sink that cannot write (a full disk, a server down) keeps the batch
//! and tries again, first after 100 ms, then twice as long each time up to
//! 5 s, so that a long outage costs little and a short one little delay.
//!
//! Retrying keeps the pipeline running and loses nothing: while the sink
//! waits, its input fills and backpressure reaches the clients. Returning an
//! error from `run` instead stops the whole pipeline, and the readings the
//! stages still held are counted as lost in the log; do that only for a
//! failure no retry can mend (the reader of a pipe has gone).

use std::time::Duration;

/// The delays between retries: each twice the last, up to a maximum.
///
/// ```
/// use std::time::Duration;
/// use sink_api::backoff::Backoff;
///
/// let mut backoff = Backoff::new();
/// assert_eq!(backoff.next_delay(), Duration::from_millis(100));
/// assert_eq!(backoff.next_delay(), Duration::from_millis(200));
/// backoff.reset();
/// assert_eq!(backoff.next_delay(), Duration::from_millis(100));
/// ```
///
/// In a sink, retrying one batch's write until it succeeds (the write must
/// be one that can be repeated: nothing of it lands twice):
///
/// ```
/// # async fn write(_: &sink_api::Batch) -> std::io::Result<()> { Ok(()) }
/// # async fn demo(batch: sink_api::Batch, cx: sink_api::Context) {
/// let mut backoff = sink_api::backoff::Backoff::new();
/// while let Err(err) = write(&batch).await {
///     let delay = backoff.next_delay();
///     tracing::warn!(stage = cx.id(), "write failed, retrying in {delay:?}: {err}");
///     tokio::time::sleep(delay).await;
/// }
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    next: Duration,
    max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

impl Backoff {
    /// 100 ms, doubling up to 5 s: what `json_file` waits.
    pub fn new() -> Self {
        Self::between(Duration::from_millis(100), Duration::from_secs(5))
    }

    /// `first`, doubling up to `max`.
    pub fn between(first: Duration, max: Duration) -> Self {
        Self {
            first,
            next: first,
            max,
        }
    }

    /// The delay before the next retry; each call doubles the next one.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        delay
    }

    /// Starts again from the first delay, after a success.
    pub fn reset(&mut self) {
        self.next = self.first;
    }
}

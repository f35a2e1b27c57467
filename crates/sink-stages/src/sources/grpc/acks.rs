//! What a call does once its request is decoded: reserve the batch's memory
//! under `settings.memory_limit`, hand the batch on with its call's token and,
//! with `acknowledge = "written"`, wait until every sink it reaches has
//! written it before answering.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sink_api::{
    Acknowledgement, Batch, Delivery, MemoryBudget, Output, Reading, Reservation, ReserveError,
    SendError, Token,
};
use tonic::{Code, Status};

use super::metrics::{GrpcMetrics, Refusal};
use super::ready::Stall;
use super::{FULL_RETRY_DELAY, WhenFull, retry_status};

/// When a call is answered OK.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Acknowledge {
    /// Once its readings are in the next stage's channel: fast, but what a
    /// crash catches in channels and buffers is lost after the client's OK.
    #[default]
    Accepted,
    /// Once every sink the readings reach has written them (synced, with
    /// `fsync = true`); UNAVAILABLE if any could not, so that the client
    /// retries: at least once, never lost after OK.
    Written,
}

/// What a batch of `readings` with `labels` labels in all, decoded from
/// `encoded_len` bytes, holds in memory: the readings themselves, their
/// labels' slots, and the text of names and labels, which is at most the
/// encoded bytes.
pub fn decoded_bytes(readings: usize, labels: usize, encoded_len: usize) -> u64 {
    (readings as u64)
        .saturating_mul(std::mem::size_of::<Reading>() as u64)
        .saturating_add((labels as u64).saturating_mul(LABEL_SLOT))
        .saturating_add(encoded_len as u64)
}

/// What one label takes beside its text: its key's and value's `String`s.
const LABEL_SLOT: u64 = std::mem::size_of::<(String, String)>() as u64;

/// The most a message of `message_len` bytes can decode to: every item and
/// every label entry takes at least 2 bytes on the wire (its tag and length),
/// a call carries at most `max_readings` items, and an item's labels are
/// allocated only when they number at most `max_labels`.
pub fn decoded_bound(message_len: usize, max_readings: usize, max_labels: usize) -> u64 {
    let readings = (message_len / 2).min(max_readings);
    let labels = (message_len / 2).min(readings.saturating_mul(max_labels));
    decoded_bytes(readings, labels, message_len)
}

/// The calls' account of acknowledgements, for logs (the metrics are
/// [`GrpcMetrics`]'s).
#[derive(Debug, Default)]
pub struct AckStats {
    /// Calls waiting for their readings to be written now.
    pub waiting: AtomicU64,
    /// Calls answered UNAVAILABLE because some reading was not written.
    pub(super) failed: AtomicU64,
    /// `failed` when a failure was last logged, and when (ms since start).
    logged: AtomicU64,
    logged_at_ms: AtomicU64,
}

/// At most one WARN line a second about failed acknowledgements.
const FAILURE_LOG_INTERVAL: Duration = Duration::from_secs(1);

impl AckStats {
    fn record(&self, stage: &str, outcome: Delivery, waited: Duration, epoch: Instant) {
        match outcome {
            Delivery::Written => {
                tracing::trace!(stage, "call acknowledged as written after {waited:?}");
            }
            Delivery::Failed => {
                let failed = self.failed.fetch_add(1, Ordering::Relaxed) + 1;
                let now_ms = u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
                let last = self.logged_at_ms.load(Ordering::Relaxed);
                let due = failed == 1
                    || now_ms.saturating_sub(last) >= FAILURE_LOG_INTERVAL.as_millis() as u64;
                if due
                    && self
                        .logged_at_ms
                        .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                        .is_ok()
                {
                    let before = self.logged.swap(failed, Ordering::Relaxed);
                    tracing::warn!(
                        stage,
                        "{} call(s) answered UNAVAILABLE since the last report: some of their readings were not written (a sink failed, or shutdown cut the drain); clients retry them. {} waiting now",
                        failed - before,
                        self.waiting.load(Ordering::Relaxed)
                    );
                }
            }
        }
    }
}

/// Reserves `bytes` of the pipeline's memory for a call: waiting for room
/// with `when_full = "wait"`, refusing with UNAVAILABLE at once with
/// `"reject"` (as at a full channel), and refusing with RESOURCE_EXHAUSTED
/// a call larger than the whole limit (no retry can pass it).
pub async fn reserve(
    memory: &MemoryBudget,
    bytes: u64,
    when_full: WhenFull,
) -> Result<Reservation, Status> {
    let reserved = match when_full {
        WhenFull::Wait => memory.reserve(bytes).await,
        WhenFull::Reject => memory.try_reserve(bytes),
    };
    reserved.map_err(|err| match err {
        ReserveError::TooLarge { bytes, limit } => Status::resource_exhausted(format!(
            "the request decodes to about {bytes} bytes, more than settings.memory_limit ({limit} bytes) allows in flight; send smaller requests"
        )),
        ReserveError::Full => retry_status(
            Code::Unavailable,
            "the pipeline's memory limit is reached; retry later".into(),
            FULL_RETRY_DELAY,
        ),
    })
}

/// What one call needs to hand its batch on and answer.
pub struct Handoff<'a> {
    pub output: Arc<Output>,
    pub when_full: WhenFull,
    pub acknowledge: Acknowledge,
    pub stats: &'a AckStats,
    pub metrics: &'a GrpcMetrics,
    pub stage: &'a str,
    pub epoch: Instant,
    /// Tells readiness when the output stays full.
    pub stall: &'a Arc<Stall>,
}

impl Handoff<'_> {
    /// Sends `batch`, holding `memory` until the last copy of it is finished,
    /// and answers: OK once sent (`accepted`) or once written (`written`).
    pub async fn send(self, mut batch: Batch, memory: Reservation) -> Result<(), Status> {
        let acknowledgement = match self.acknowledge {
            Acknowledge::Accepted => {
                batch.attach(Token::new(Some(memory)));
                None
            }
            Acknowledge::Written => {
                let (token, acknowledgement) = Token::acknowledged(Some(memory));
                batch.attach(token);
                Some(acknowledgement)
            }
        };
        let waits = self.when_full == WhenFull::Wait;
        let sent = self.stall.hand_on(&self.output, batch, waits).await;
        // A call waiting for its acknowledgement must not hold the output:
        // at shutdown, the stages downstream drain once the sources' outputs
        // are all gone.
        let Self {
            output,
            stats,
            metrics,
            stage,
            epoch,
            ..
        } = self;
        drop(output);
        match sent {
            Ok(()) => {}
            // The batch handed back is dropped unsent: its token fails, and
            // nobody waits for it.
            Err(SendError::Full(_)) => {
                metrics.refused(Refusal::PipelineFull);
                return Err(retry_status(
                    Code::Unavailable,
                    "the pipeline is full; retry later".into(),
                    FULL_RETRY_DELAY,
                ));
            }
            Err(SendError::Closed(_)) => {
                metrics.refused(Refusal::ShuttingDown);
                return Err(Status::unavailable("the pipeline is shutting down"));
            }
        }
        match acknowledgement {
            None => Ok(()),
            Some(acknowledgement) => wait(acknowledgement, stats, metrics, stage, epoch).await,
        }
    }
}

/// Waits for the call's readings to be written, and answers.
async fn wait(
    acknowledgement: Acknowledgement,
    stats: &AckStats,
    metrics: &GrpcMetrics,
    stage: &str,
    epoch: Instant,
) -> Result<(), Status> {
    let started = Instant::now();
    tracing::debug!(stage, "a call waits for its readings to be written");
    stats.waiting.fetch_add(1, Ordering::Relaxed);
    metrics.acks_waiting.inc();
    // Counted down even if the client goes away while it waits.
    let _waiting = Waiting(&stats.waiting, metrics);
    let outcome = acknowledgement.await;
    let waited = started.elapsed();
    metrics.ack_wait.observe(waited.as_secs_f64());
    stats.record(stage, outcome, waited, epoch);
    match outcome {
        Delivery::Written => {
            metrics.acks_written.inc();
            Ok(())
        }
        Delivery::Failed => {
            metrics.acks_failed.inc();
            Err(Status::unavailable(
                "some readings of this call were not written (a sink failed, or the sink shut down before writing them); retry the call",
            ))
        }
    }
}

/// Counts a waiting call out when it ends, however it ends.
struct Waiting<'a>(&'a AtomicU64, &'a GrpcMetrics);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
        self.1.acks_waiting.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acknowledge_is_accepted_by_default_and_spelled_in_lowercase() {
        assert_eq!(Acknowledge::default(), Acknowledge::Accepted);
        let written: Acknowledge = serde_json::from_str("\"written\"").unwrap();
        assert_eq!(written, Acknowledge::Written);
        assert!(serde_json::from_str::<Acknowledge>("\"Written\"").is_err());
    }

    #[test]
    fn decoded_size_counts_readings_and_names() {
        // 4 MiB of empty items (2 bytes each) decode to about 2 M readings.
        let bytes = decoded_bytes(2 << 20, 0, 4 << 20);
        assert_eq!(
            bytes,
            (2 << 20) * std::mem::size_of::<Reading>() as u64 + (4 << 20)
        );
        assert!(bytes > 100 << 20, "an empty item costs far more decoded");
    }

    #[tokio::test]
    async fn a_call_larger_than_the_whole_budget_is_resource_exhausted() {
        let memory = MemoryBudget::new(1 << 20);
        let err = reserve(&memory, 2 << 20, WhenFull::Wait).await.unwrap_err();
        assert_eq!(err.code(), Code::ResourceExhausted);
        let held = reserve(&memory, 1 << 20, WhenFull::Wait).await.unwrap();
        let err = reserve(&memory, 1, WhenFull::Reject).await.unwrap_err();
        assert_eq!(err.code(), Code::Unavailable);
        drop(held);
    }
}

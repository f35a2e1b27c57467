//! The loop shared by the sinks that write JSON lines to a byte stream
//! (`json_file`, `stdout`): encode each batch into one reused buffer, write it
//! (with whatever other batches are already waiting) with one call off the
//! async threads, retry failed writes without splitting or repeating a line,
//! and switch targets between batches on reload, or during a failing write.
//!
//! Every call that touches the target (open, write, stat, truncate, sync)
//! runs on tokio's blocking pool: a hung disk or a FIFO must never stall an
//! async worker.

use std::any::Any;
use std::io::{self, Write};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use sink_api::json::{Layout, encode_batch};
use sink_api::metrics::{Counter, Metrics};
use sink_api::{Batch, Context, DoneMarker, Input, Params, StageError, Timestamp};

/// Waiting batches are added to one write until it holds this many bytes.
const COALESCE_BYTES: usize = 1 << 20;

/// The most one write carries of a large batch (in the `value` layout, one
/// line per reading): its lines are encoded and written in pieces of about
/// this, so that what encoding holds stays bounded however large the batch,
/// even when its names escape six times larger (`\u0001`). A piece holds
/// at least one line.
const PIECE_BYTES: usize = 4 << 20;

/// The most bytes a reading's `value` line can take: its text escaped (at
/// most six bytes a byte, `\u0001`) and its fixed fields.
fn line_bound(reading: &sink_api::Reading) -> usize {
    let text = reading.sensor_name.len()
        + reading
            .labels
            .iter()
            .map(|(key, value)| key.len() + value.len() + 6)
            .sum::<usize>();
    6 * text + 160
}

/// The shortest time between two wake-ups of a target with no batch.
const MIN_WAKE_GAP: Duration = Duration::from_secs(1);

/// The encode buffer starts this large and is never shrunk below it.
const INITIAL_BUFFER: usize = 64 * 1024;

/// A buffer larger than this, and far larger than recent writes needed, is
/// released after its write (see [`BufferTrim`]).
const SHRINK_ABOVE: usize = 8 << 20;

/// What a line-writing sink's config tells the shared loop.
pub(crate) trait LineSinkConfig: Any + Send + Sync {
    /// Where the bytes go.
    type Target: Write + Send + 'static;

    /// How readings are laid out.
    fn layout(&self) -> Layout;

    /// Opens the target, for startup and for a reload that moves it. Runs on
    /// the blocking pool (or while the pipeline is built, before it runs).
    fn open(&self) -> io::Result<Self::Target>;

    /// Whether moving from `old` to this config needs the target reopened.
    fn moves_target(&self, old: &Self) -> bool;

    /// The target in words, for log lines.
    fn target_name(&self) -> String;

    /// Runs on the blocking pool before the first byte of each write, and
    /// never in the middle of one, so a batch is finished in the file it
    /// started in: follows an outside rotation, rotates by size or time. An
    /// error fails the write, which is retried.
    fn prepare(&self, _target: &mut Self::Target) -> io::Result<()> {
        Ok(())
    }

    /// Runs on the blocking pool before a retry that resumes a write cut
    /// short (at a line boundary): follows an outside rotation only. A file
    /// moved away (or deleted) while writes fail for want of room would
    /// otherwise stay open, its space never freed, and the retries never
    /// succeed. What remains of the write goes to the new file.
    fn follow(&self, _target: &mut Self::Target) -> io::Result<()> {
        Ok(())
    }

    /// How many more bytes the next write may carry before the target wants
    /// rotating; waiting batches are added to a write only while it fits (the
    /// first batch of a write always goes in whole). Must not block.
    fn room(&self, _target: &Self::Target) -> usize {
        usize::MAX
    }

    /// Removes the last `partial` bytes written to the target: a line a failed
    /// write cut short, so that no partial line is ever left behind. Runs on
    /// the blocking pool. A target that cannot (a pipe) says so with an error,
    /// and the retry then completes the line instead.
    fn cut_back(&self, _target: &mut Self::Target, _partial: u64) -> io::Result<()> {
        Err(io::ErrorKind::Unsupported.into())
    }

    /// Makes what was written durable, if the config asks for it. Runs on the
    /// blocking pool after each write and flush.
    fn sync(&self, _target: &mut Self::Target) -> io::Result<()> {
        Ok(())
    }

    /// When the target wants [`prepare`](Self::prepare) called even if no
    /// batch comes (a rotation on time). Must not block.
    fn wake_at(&self, _target: &Self::Target) -> Option<SystemTime> {
        None
    }

    /// This config now applies to `target`: at start, and on a reload that
    /// keeps the target. Must not block (start background work instead).
    fn applied(&self, _target: &mut Self::Target) {}

    /// Hands `target` the stage's metrics handle, once opened (at start, and
    /// after a reload moved it), for counts only the target knows (its own
    /// reopens and rotations). Must not block.
    fn observe(&self, _target: &mut Self::Target, _metrics: &Metrics) {}
}

/// Writes every batch of `input` to `target` until the input ends, then flushes.
pub(crate) async fn write_lines<C: LineSinkConfig>(
    config: Arc<C>,
    target: C::Target,
    mut input: Input,
    cx: Context,
) -> Result<(), StageError> {
    let mut params = cx.params::<C>();
    let mut writer = Writer {
        open_for: Arc::clone(&config),
        wanted: config,
        target: Arc::new(Mutex::new(target)),
        bytes: Vec::with_capacity(INITIAL_BUFFER),
        stage: cx.id().to_string(),
        failing_since: None,
        last_wake: None,
        trim: BufferTrim::default(),
        metrics: LineMetrics::new(cx.metrics()),
        handle: cx.metrics().clone(),
        progress: Progress::default(),
        rest: None,
    };
    {
        let mut target = lock(&writer.target);
        writer.open_for.observe(&mut target, &writer.handle);
        writer.open_for.applied(&mut target);
    }
    loop {
        // At most one wake-up a second: a target whose wish cannot be met
        // (a rotation failing) must not spin the loop.
        let wake =
            writer
                .open_for
                .wake_at(&lock(&writer.target))
                .map(|at| match writer.last_wake {
                    Some(last) => at.max(last + MIN_WAKE_GAP),
                    None => at,
                });
        tokio::select! {
            // New parameters first: a config handed over before a batch applies to it.
            biased;
            new = params.changed() => {
                writer.reconfigure(new, true).await;
            }
            () = sleep_until(wake), if wake.is_some() => writer.wake().await?,
            received = input.recv() => {
                let Some(batch) = received else { break };
                if writer.wanted.moves_target(&writer.open_for) {
                    writer.move_target(false).await;
                }
                writer.rest = Some((batch, 0));
                while writer.rest.is_some() {
                    writer.encode(&mut input);
                    writer.write(&mut params, &mut input).await?;
                }
                // Every batch encoded above is now written (and synced, if the
                // config asks), and counted done by the write itself; the
                // next `input.recv()` finishes their tokens.
                writer.trim.after_write(&mut writer.bytes);
            }
        }
    }
    close(writer.target, &writer.open_for.target_name(), &writer.stage).await;
    Ok(())
}

/// The target is shared with the blocking thread that works on it, one user
/// at a time (the loop waits for each blocking call), so the lock is never
/// contended. A panic in a blocking call cannot leave it half-written in a
/// way that matters more than the panic itself, so poisoning is ignored.
fn lock<T>(target: &Mutex<T>) -> MutexGuard<'_, T> {
    target.lock().unwrap_or_else(PoisonError::into_inner)
}

async fn sleep_until(wake: Option<SystemTime>) {
    if let Some(wake) = wake {
        let wait = wake
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO);
        tokio::time::sleep(wait).await;
    }
}

/// The state of the loop.
struct Writer<C: LineSinkConfig> {
    /// The latest config.
    wanted: Arc<C>,
    /// The config whose target is open. It lags `wanted` while a reload's
    /// new target cannot be opened; every batch tries again, so the sink
    /// ends up where the file says as soon as it can.
    open_for: Arc<C>,
    target: Arc<Mutex<C::Target>>,
    /// The encoded lines of the write in hand; moved into the blocking
    /// thread and back, never copied.
    bytes: Vec<u8>,
    stage: String,
    /// Since when writes have been failing, to say how long once one works.
    failing_since: Option<Instant>,
    /// When the target was last woken without a batch.
    last_wake: Option<SystemTime>,
    trim: BufferTrim,
    metrics: LineMetrics,
    /// The stage's handle, for [`LineSinkConfig::observe`].
    handle: Metrics,
    progress: Progress,
    /// A batch not yet encoded whole, and the index of its next reading.
    rest: Option<(Batch, usize)>,
}

impl<C: LineSinkConfig> Writer<C> {
    /// Encodes the next piece of the batch in hand ([`rest`](Self::rest))
    /// and, under load, the batches already waiting too, so that one write,
    /// and one trip to the blocking pool and back, carries them all (as far
    /// as the target has room before rotating). A batch whose lines pass
    /// [`PIECE_BYTES`] is left in `rest` for the next piece.
    fn encode(&mut self, input: &mut Input) {
        // The latest layout, even while a new path cannot be opened yet.
        let layout = self.wanted.layout();
        let bytes = &mut self.bytes;
        bytes.clear();
        self.progress.start(layout);
        let now = Timestamp::now();
        let limit = COALESCE_BYTES.min(self.open_for.room(&lock(&self.target)));
        loop {
            let Some((batch, from)) = &mut self.rest else {
                if bytes.len() >= limit {
                    break;
                }
                let Ok(batch) = input.try_recv() else { break };
                self.rest = Some((batch, 0));
                continue;
            };
            let start = *from;
            let end = match layout {
                // One line per batch: the line is written whole.
                Layout::Batch => {
                    encode_batch(layout, batch, now, bytes);
                    batch.len()
                }
                Layout::Value => {
                    let mut end = start;
                    while end < batch.len() && (end == start || bytes.len() < PIECE_BYTES) {
                        // As many readings at once as surely fit what is left
                        // of the piece (one line more, as a piece may hold),
                        // not one at a time: each call encodes its timestamps
                        // afresh, which doubled the cost per reading.
                        let room = PIECE_BYTES.saturating_sub(bytes.len());
                        let mut next = end;
                        let mut bound = 0;
                        while next < batch.len() && (next == end || bound < room) {
                            bound += line_bound(&batch[next]);
                            next += 1;
                        }
                        encode_batch(layout, &batch[end..next], now, bytes);
                        end = next;
                    }
                    end
                }
            };
            self.progress.encoded(bytes.len(), end - start);
            if end < batch.len() {
                *from = end;
                break;
            }
            self.rest = None;
        }
    }

    /// Applies a new config: moves to its target if it names another one,
    /// and says whether it did. A failure to open is logged at WARN when
    /// `loudly` (on reload), not on each batch's retry.
    async fn reconfigure(&mut self, new: Arc<C>, loudly: bool) -> bool {
        self.wanted = new;
        if self.wanted.moves_target(&self.open_for) {
            self.move_target(loudly).await
        } else {
            // Same target: the new config is the one it is open for.
            self.open_for = Arc::clone(&self.wanted);
            self.open_for.applied(&mut lock(&self.target));
            false
        }
    }

    /// Opens `wanted`'s target (on the blocking pool) and, if that works,
    /// closes the old one and writes there from now on; says whether it moved.
    async fn move_target(&mut self, loudly: bool) -> bool {
        let wanted = Arc::clone(&self.wanted);
        let opened = tokio::task::spawn_blocking(move || wanted.open())
            .await
            .unwrap_or_else(|err| Err(io::Error::other(err)));
        match opened {
            Ok(mut target) => {
                self.metrics.reopens.inc();
                self.wanted.observe(&mut target, &self.handle);
                let old = std::mem::replace(&mut self.target, Arc::new(Mutex::new(target)));
                close(old, &self.open_for.target_name(), &self.stage).await;
                self.open_for = Arc::clone(&self.wanted);
                self.open_for.applied(&mut lock(&self.target));
                tracing::info!(
                    stage = self.stage,
                    "now writing to {}",
                    self.open_for.target_name()
                );
                true
            }
            Err(err) if loudly => {
                tracing::warn!(
                    stage = self.stage,
                    "cannot open {}: {err}; still writing to {}, trying again before each batch",
                    self.wanted.target_name(),
                    self.open_for.target_name()
                );
                false
            }
            Err(err) => {
                tracing::debug!(
                    stage = self.stage,
                    "still cannot open {}: {err}",
                    self.wanted.target_name()
                );
                false
            }
        }
    }

    /// Lets the target rotate on time when no batch comes.
    async fn wake(&mut self) -> Result<(), StageError> {
        self.last_wake = Some(SystemTime::now());
        let config = Arc::clone(&self.open_for);
        let target = Arc::clone(&self.target);
        let prepared =
            tokio::task::spawn_blocking(move || config.prepare(&mut lock(&target))).await?;
        if let Err(err) = prepared {
            tracing::warn!(stage = self.stage, "{}: {err}", self.open_for.target_name());
        }
        Ok(())
    }

    /// Writes all of `self.bytes`, retrying with backoff while the target
    /// fails (a full disk, say): a reading accepted is never dropped here.
    /// A failed write is cut back to its last whole line and retries resume
    /// there, so no line is split or written twice. A reload that moves the
    /// target while writes fail takes the rest of the write with it.
    /// The batches being written fail their acknowledgements at the first
    /// failure (`input.fail_taken()`), so that waiting clients retry at once
    /// rather than wait out the retries (at least once); the readings whose
    /// lines landed whole count as written all the same, so that a timed-out
    /// shutdown's loss count is what the file lacks.
    ///
    /// Each attempt counts what it landed on its blocking thread, as soon as
    /// it returns ([`DoneMarker`]), not here after the await: a timed-out
    /// shutdown aborts this task while an attempt may still be running, and
    /// the attempt then finishes (the runtime gives the blocking pool a grace
    /// before the loss is counted) with nobody here to hear of it.
    async fn write(&mut self, params: &mut Params<C>, input: &mut Input) -> Result<(), StageError> {
        let mut backoff = Duration::from_millis(100);
        let mut written = 0;
        let done = input.done_marker();
        loop {
            let config = Arc::clone(&self.open_for);
            let target = Arc::clone(&self.target);
            let bytes = std::mem::take(&mut self.bytes);
            let mut progress = std::mem::take(&mut self.progress);
            let done = done.clone();
            let last_piece = self.rest.is_none();
            let (bytes, progress, outcome) = tokio::task::spawn_blocking(move || {
                let outcome = attempt(&*config, &mut lock(&target), &bytes, written);
                match &outcome {
                    // Written and synced: every reading in hand is in this write.
                    Ok(()) if last_piece => done.mark_all_done(),
                    // A piece of a batch: the readings whose lines it holds.
                    Ok(()) => progress.report(&bytes, bytes.len(), &done),
                    Err((reached, _)) => progress.report(&bytes, *reached, &done),
                }
                (bytes, progress, outcome)
            })
            .await?;
            self.bytes = bytes;
            self.progress = progress;
            self.metrics.count(written, &outcome, self.bytes.len());
            let err = match outcome {
                Ok(()) => {
                    if let Some(since) = self.failing_since.take() {
                        tracing::info!(
                            stage = self.stage,
                            "writing to {} works again, after failing for {:.1?}",
                            self.open_for.target_name(),
                            since.elapsed()
                        );
                    }
                    return Ok(());
                }
                // The reader of a pipe has gone (`sink | head`): no retry can
                // ever succeed, so the stage fails; the runtime stops it alone.
                Err((_, err)) if err.kind() == io::ErrorKind::BrokenPipe => {
                    return Err(format!("the reader of its output has gone: {err}").into());
                }
                Err((reached, err)) => {
                    written = reached;
                    err
                }
            };
            self.failing_since.get_or_insert_with(Instant::now);
            input.fail_taken();
            tracing::warn!(
                stage = self.stage,
                "writing to {} failed, retrying in {backoff:?}: {err}",
                self.open_for.target_name()
            );
            // Wait out the backoff, unless a reload comes: one that moves the
            // target takes the rest of this write along (a full disk must not
            // hold the sink on its path).
            let moved = tokio::select! {
                biased;
                new = params.changed() => self.reconfigure(new, true).await,
                () = tokio::time::sleep(backoff) => {
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    // A new path that could not be opened before may open now.
                    self.wanted.moves_target(&self.open_for) && self.move_target(false).await
                }
            };
            if moved {
                // A line cut short on the old target (where the cut back
                // failed) is written whole on the new one.
                written = line_start(&self.bytes, written);
                backoff = Duration::from_millis(100);
            }
        }
    }
}

/// Which readings of the write in hand have landed as whole lines: a write
/// of several batches may stop partway (a full disk) and never finish (a
/// timed-out shutdown), and the loss count must not count those as lost.
#[derive(Default)]
struct Progress {
    layout: Layout,
    /// Where each batch of the write ends in its bytes, and its readings.
    batches: Vec<(usize, usize)>,
    /// Readings already reported done to the input.
    reported: u64,
}

impl Progress {
    fn start(&mut self, layout: Layout) {
        self.layout = layout;
        self.batches.clear();
        self.reported = 0;
    }

    fn encoded(&mut self, end: usize, readings: usize) {
        self.batches.push((end, readings));
    }

    /// Marks `done` the readings whose lines lie whole in `bytes[..written]`
    /// and were not marked before.
    fn report(&mut self, bytes: &[u8], written: usize, done: &DoneMarker) {
        let whole = match self.layout {
            // One line per reading.
            Layout::Value => bytes[..written].iter().filter(|&&b| b == b'\n').count(),
            // One line per batch.
            Layout::Batch => self
                .batches
                .iter()
                .take_while(|(end, _)| *end <= written)
                .map(|(_, readings)| readings)
                .sum(),
        } as u64;
        if whole > self.reported {
            done.mark_done(whole - self.reported);
            self.reported = whole;
        }
    }
}

/// One try at writing `bytes[from..]`: prepares the target first when the
/// write starts, syncs it after. On failure, a partial line is cut back (when
/// the target can) and the error says from where to resume.
fn attempt<C: LineSinkConfig>(
    config: &C,
    target: &mut C::Target,
    bytes: &[u8],
    from: usize,
) -> Result<(), (usize, io::Error)> {
    if from == 0 {
        config.prepare(target).map_err(|err| (0, err))?;
    } else {
        config.follow(target).map_err(|err| (from, err))?;
    }
    if let Err((done, err)) = write_from(target, bytes, from) {
        let whole = line_start(bytes, done);
        if whole < done && config.cut_back(target, (done - whole) as u64).is_ok() {
            return Err((whole, err));
        }
        return Err((done, err));
    }
    // A failed sync is retried like a failed write, with nothing left to write.
    config.sync(target).map_err(|err| (bytes.len(), err))
}

/// Where the line holding `bytes[at]` starts: just past the last newline
/// before `at`, or 0.
fn line_start(bytes: &[u8], at: usize) -> usize {
    bytes[..at]
        .iter()
        .rposition(|&byte| byte == b'\n')
        .map_or(0, |newline| newline + 1)
}

/// Writes `bytes[from..]` and flushes; on failure says how far it got.
fn write_from(
    target: &mut impl Write,
    bytes: &[u8],
    mut from: usize,
) -> Result<(), (usize, io::Error)> {
    while from < bytes.len() {
        match target.write(&bytes[from..]) {
            Ok(0) => return Err((from, io::ErrorKind::WriteZero.into())),
            Ok(n) => from += n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err((from, err)),
        }
    }
    target.flush().map_err(|err| (from, err))
}

/// The metrics of a line-writing sink.
struct LineMetrics {
    bytes: Counter,
    errors: Counter,
    /// Reopens by a reload; a target counts its own (rotation) in the same
    /// series through [`LineSinkConfig::observe`].
    reopens: Counter,
}

impl LineMetrics {
    fn new(metrics: &Metrics) -> Self {
        Self {
            bytes: metrics.counter(
                "sink_bytes_written_total",
                "Bytes written to the sink's target",
            ),
            errors: metrics.counter(
                "sink_write_errors_total",
                "Failed writes (each is retried with backoff, so none loses a reading)",
            ),
            reopens: target_reopens(metrics),
        }
    }

    /// Counts one attempt that started at byte `from` of a write of `len`
    /// bytes: what it wrote, and whether it failed.
    fn count(&self, from: usize, outcome: &Result<(), (usize, io::Error)>, len: usize) {
        let reached = match outcome {
            Ok(()) => len,
            Err((done, _)) => {
                self.errors.inc();
                *done
            }
        };
        self.bytes.inc_by(reached.saturating_sub(from) as u64);
    }
}

/// The `sink_target_reopens_total` series of the stage `metrics` is for.
pub(crate) fn target_reopens(metrics: &Metrics) -> Counter {
    metrics.counter(
        "sink_target_reopens_total",
        "Times a new file was opened: rotated (by the sink or by another program) or moved by a reload",
    )
}

async fn close<T: Write + Send + 'static>(target: Arc<Mutex<T>>, name: &str, stage: &str) {
    let flushed = tokio::task::spawn_blocking(move || lock(&target).flush()).await;
    if let Ok(Err(err)) = flushed {
        tracing::warn!(stage, "flushing {name} on close failed: {err}");
    }
}

/// Releases what a rare large write grew the encode buffer to. A buffer
/// larger than [`SHRINK_ABOVE`] and over four times what the writes of the
/// last window needed is shrunk right after its write, so one huge request
/// does not pin its memory for good, while steadily large writes keep theirs.
#[derive(Debug, Default)]
struct BufferTrim {
    /// The largest write of the last full window.
    usual: usize,
    /// The largest write of this window so far, and its count.
    peak: usize,
    writes: u32,
}

impl BufferTrim {
    const WINDOW: u32 = 16;

    fn after_write(&mut self, bytes: &mut Vec<u8>) {
        self.peak = self.peak.max(bytes.len());
        self.writes += 1;
        if self.writes == Self::WINDOW {
            self.usual = self.peak;
            self.peak = 0;
            self.writes = 0;
        }
        if bytes.capacity() > SHRINK_ABOVE && bytes.capacity() / 4 > self.usual {
            bytes.clear();
            bytes.shrink_to((self.usual * 2).max(INITIAL_BUFFER));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_write_that_stops_partway_counts_the_readings_of_whole_lines() {
        use sink_api::testkit::readings;
        for layout in [Layout::Value, Layout::Batch] {
            let (sender, mut input) = sink_api::channel(4);
            let output = sink_api::Output::new(vec![sender]);
            output.send(readings("a", 0..3)).await.unwrap();
            output.send(readings("b", 0..4)).await.unwrap();
            drop(output);
            let handled = input.handled_counter();
            let mut progress = Progress::default();
            progress.start(layout);
            let mut bytes = Vec::new();
            for _ in 0..2 {
                let batch = input.try_recv().unwrap();
                encode_batch(layout, &batch, Timestamp::now(), &mut bytes);
                progress.encoded(bytes.len(), batch.len());
            }
            let first = progress.batches[0].0;
            // Partway into a's last line: a's first two lines in value layout.
            let done = input.done_marker();
            progress.report(&bytes, first - 3, &done);
            let counted = || handled.load(std::sync::atomic::Ordering::Relaxed);
            assert_eq!(counted(), if layout == Layout::Value { 2 } else { 0 });
            // Past a and b's first line (value layout), into b's only line (batch).
            let b_first = bytes[first..].iter().position(|&b| b == b'\n').unwrap();
            let at = (first + b_first + 6).min(bytes.len() - 1);
            progress.report(&bytes, at, &done);
            match layout {
                Layout::Value => assert_eq!(counted(), 4, "3 of a, 1 of b"),
                Layout::Batch => assert_eq!(counted(), 3, "a's line only"),
            }
            // The rest counts once the sink asks for more, nothing twice.
            assert!(input.recv().await.is_none());
            assert_eq!(handled.load(std::sync::atomic::Ordering::Relaxed), 7);
        }
    }

    /// A target whose writes wait until the test lets them go on, as a
    /// write to a slow disk does.
    struct Gated {
        entered: tokio::sync::mpsc::UnboundedSender<()>,
        release: std::sync::mpsc::Receiver<()>,
        landed: Arc<Mutex<Vec<u8>>>,
    }

    impl Write for Gated {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            let _ = self.entered.send(());
            self.release
                .recv()
                .map_err(|_| io::Error::other("the test has gone"))?;
            lock(&self.landed).extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    struct GatedConfig;

    impl LineSinkConfig for GatedConfig {
        type Target = Gated;

        fn layout(&self) -> Layout {
            Layout::Value
        }

        fn open(&self) -> io::Result<Gated> {
            Err(io::ErrorKind::Unsupported.into())
        }

        fn moves_target(&self, _old: &Self) -> bool {
            false
        }

        fn target_name(&self) -> String {
            "the gate".into()
        }
    }

    #[tokio::test]
    async fn a_write_running_when_its_sink_is_cut_counts_what_it_lands() {
        use sink_api::testkit::readings;
        let (entered, mut writing) = tokio::sync::mpsc::unbounded_channel();
        let (release, gate) = std::sync::mpsc::channel();
        let landed = Arc::new(Mutex::new(Vec::new()));
        let target = Gated {
            entered,
            release: gate,
            landed: Arc::clone(&landed),
        };
        let (sender, input) = sink_api::channel(4);
        let output = sink_api::Output::new(vec![sender]);
        output.send(readings("a", 0..5)).await.unwrap();
        let handled = input.handled_counter();
        let (cx, _params) = Context::new(
            "file",
            sink_api::ShutdownSignal::new(),
            Arc::new(GatedConfig),
        );
        let sink = tokio::spawn(write_lines(Arc::new(GatedConfig), target, input, cx));
        writing.recv().await.expect("the write started");
        // A timed-out shutdown cuts the sink while its write runs on.
        sink.abort();
        assert!(sink.await.unwrap_err().is_cancelled());
        assert_eq!(handled.load(std::sync::atomic::Ordering::Relaxed), 0);
        release.send(()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while handled.load(std::sync::atomic::Ordering::Relaxed) < 5 {
            assert!(
                Instant::now() < deadline,
                "the landed lines were never counted"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let lines = lock(&landed).iter().filter(|&&b| b == b'\n').count();
        assert_eq!(lines, 5);
        assert_eq!(handled.load(std::sync::atomic::Ordering::Relaxed), 5);
    }

    #[test]
    fn a_line_starts_after_the_last_newline() {
        let bytes = b"{\"a\":1}\n{\"b\":2}\n{\"c\"";
        assert_eq!(line_start(bytes, 0), 0);
        assert_eq!(line_start(bytes, 5), 0);
        assert_eq!(line_start(bytes, 8), 8);
        assert_eq!(line_start(bytes, bytes.len()), 16);
    }

    #[test]
    fn a_rare_large_buffer_is_released_and_a_steady_one_kept() {
        let mut trim = BufferTrim::default();
        let mut bytes = Vec::with_capacity(INITIAL_BUFFER);
        for _ in 0..BufferTrim::WINDOW {
            bytes.clear();
            bytes.resize(100_000, b'x');
            trim.after_write(&mut bytes);
        }
        bytes.clear();
        bytes.resize(64 << 20, b'x');
        trim.after_write(&mut bytes);
        assert!(bytes.capacity() < 1 << 20, "kept {}", bytes.capacity());

        // Large writes, window after window, keep their buffer.
        let mut trim = BufferTrim::default();
        for _ in 0..3 * BufferTrim::WINDOW {
            bytes.clear();
            bytes.resize(20 << 20, b'x');
            trim.after_write(&mut bytes);
        }
        assert!(bytes.capacity() >= 20 << 20);
    }
}

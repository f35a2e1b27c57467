//! The loop shared by the sinks that write JSON lines to a byte stream
//! (`json_file`, `stdout`): encode each batch into one reused buffer, write it
//! (with whatever other batches are already waiting) with one call off the
//! async threads, retry failed writes without splitting
//! or repeating a line, and switch targets between batches on reload.

use std::any::Any;
use std::io::{self, Write};
use std::sync::Arc;
use std::time::Duration;

use sink_api::json::{Layout, encode_batch};
use sink_api::{Context, Input, StageError, Timestamp};

/// Waiting batches are added to one write until it holds this many bytes.
const COALESCE_BYTES: usize = 1 << 20;

/// What a line-writing sink's config tells the shared loop.
pub(crate) trait LineSinkConfig: Any + Send + Sync {
    /// Where the bytes go.
    type Target: Write + Send + 'static;

    /// How readings are laid out.
    fn layout(&self) -> Layout;

    /// Opens the target, for startup and for a reload that moves it.
    fn open(&self) -> io::Result<Self::Target>;

    /// Whether moving from `old` to this config needs the target reopened.
    fn moves_target(&self, old: &Self) -> bool;

    /// The target in words, for log lines.
    fn target_name(&self) -> String;

    /// Reopens the target if what its name points to is no longer what is
    /// open (a log rotator renamed or deleted the file); says whether it did.
    /// Runs on the blocking pool right before each write.
    fn reopen_if_moved(&self, _target: &mut Self::Target) -> io::Result<bool> {
        Ok(false)
    }

    /// Makes what was written durable, if the config asks for it. Runs on the
    /// blocking pool after each write and flush.
    fn sync(&self, _target: &mut Self::Target) -> io::Result<()> {
        Ok(())
    }
}

/// Writes every batch of `input` to `target` until the input ends, then flushes.
pub(crate) async fn write_lines<C: LineSinkConfig>(
    mut config: Arc<C>,
    target: C::Target,
    mut input: Input,
    cx: Context,
) -> Result<(), StageError> {
    let mut params = cx.params::<C>();
    // The config whose target is open. It lags `config` while a reload's new
    // target cannot be opened; every batch tries again, so the sink ends up
    // where the file says as soon as it can.
    let mut open_for = Arc::clone(&config);
    let mut pending = Pending {
        target,
        bytes: Vec::with_capacity(64 * 1024),
    };
    loop {
        tokio::select! {
            // New parameters first: a config handed over before a batch applies to it.
            biased;
            new = params.changed() => {
                config = new;
                if config.moves_target(&open_for) {
                    move_target(&mut pending, &mut open_for, &config, cx.id(), true).await;
                } else {
                    // Same target: the new config is the one it is open for.
                    open_for = Arc::clone(&config);
                }
            }
            received = input.recv() => {
                let Some(batch) = received else { break };
                if config.moves_target(&open_for) {
                    move_target(&mut pending, &mut open_for, &config, cx.id(), false).await;
                }
                pending.bytes.clear();
                let now = Timestamp::now();
                encode_batch(config.layout(), &batch, now, &mut pending.bytes);
                drop(batch);
                // Under load, more batches wait by the time a write returns:
                // encode them too, so that one write, and one trip to the
                // blocking pool and back, carries them all.
                while pending.bytes.len() < COALESCE_BYTES {
                    let Ok(batch) = input.try_recv() else { break };
                    encode_batch(config.layout(), &batch, now, &mut pending.bytes);
                }
                pending = write_until_done(pending, &open_for, cx.id()).await?;
            }
        }
    }
    close(pending.target, &open_for.target_name(), cx.id()).await;
    Ok(())
}

/// Opens `wanted`'s target and, if that works, closes the old one and writes
/// there from now on. A failure keeps the old target; it is logged at WARN
/// when `loudly` (on reload), not on each batch's retry.
async fn move_target<C: LineSinkConfig>(
    pending: &mut Pending<C::Target>,
    open_for: &mut Arc<C>,
    wanted: &Arc<C>,
    stage: &str,
    loudly: bool,
) {
    match wanted.open() {
        Ok(target) => {
            let old = std::mem::replace(&mut pending.target, target);
            close(old, &open_for.target_name(), stage).await;
            *open_for = Arc::clone(wanted);
            tracing::info!(stage, "now writing to {}", wanted.target_name());
        }
        Err(err) if loudly => tracing::warn!(
            stage,
            "cannot open {}: {err}; still writing to {}, trying again before each batch",
            wanted.target_name(),
            open_for.target_name()
        ),
        Err(err) => tracing::debug!(stage, "still cannot open {}: {err}", wanted.target_name()),
    }
}

/// A target and the encoded bytes still to be written to it, moved together
/// into the blocking thread and back so that neither is copied.
struct Pending<T> {
    target: T,
    bytes: Vec<u8>,
}

/// Writes all of `pending.bytes`, retrying with backoff while the target
/// fails (a full disk, say): a reading accepted is never dropped here.
/// Retries resume after the bytes already written, so no line is split or
/// written twice.
async fn write_until_done<C: LineSinkConfig>(
    mut pending: Pending<C::Target>,
    config: &Arc<C>,
    stage: &str,
) -> Result<Pending<C::Target>, StageError> {
    let mut backoff = Duration::from_millis(100);
    let mut written = 0;
    loop {
        let config = Arc::clone(config);
        let (returned, outcome) = tokio::task::spawn_blocking(move || {
            let outcome = reopen_then_write(&*config, &mut pending, written);
            (pending, outcome)
        })
        .await?;
        pending = returned;
        match outcome {
            Ok(()) => return Ok(pending),
            // The reader of a pipe has gone (`sink | head`): no retry can
            // ever succeed, so the stage fails and the pipeline shuts down.
            Err((_, err)) if err.kind() == io::ErrorKind::BrokenPipe => {
                return Err(format!("the reader of its output has gone: {err}").into());
            }
            Err((done, err)) => {
                written = done;
                tracing::warn!(stage, "write failed, retrying in {backoff:?}: {err}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Follows a rotated target, then writes `pending.bytes[from..]`.
fn reopen_then_write<C: LineSinkConfig>(
    config: &C,
    pending: &mut Pending<C::Target>,
    from: usize,
) -> Result<(), (usize, io::Error)> {
    match config.reopen_if_moved(&mut pending.target) {
        Ok(false) => {}
        Ok(true) => tracing::info!(
            "{} was moved or deleted (rotated?); writing to a new file there",
            config.target_name()
        ),
        Err(err) => return Err((from, err)),
    }
    write_from(&mut pending.target, &pending.bytes, from)?;
    // A failed sync is retried like a failed write, with nothing left to write.
    config
        .sync(&mut pending.target)
        .map_err(|err| (pending.bytes.len(), err))
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

async fn close<T: Write + Send + 'static>(mut target: T, name: &str, stage: &str) {
    let flushed = tokio::task::spawn_blocking(move || target.flush()).await;
    if let Ok(Err(err)) = flushed {
        tracing::warn!(stage, "flushing {name} on close failed: {err}");
    }
}

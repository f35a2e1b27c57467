//! What a batch carries for the calls its readings came from: a [`Token`] per
//! call, shared by every copy of the batch, that resolves once the last copy
//! is finished with: an acknowledgement back to the source, and the release
//! of the call's [`Reservation`] of pipeline memory.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::task::{Context as TaskContext, Poll};

use tokio::sync::{Mutex, Notify, oneshot};

/// Shared by every copy of the batches that hold one source call's readings
/// (one `Arc`, cloned per copy, never per reading). When the last copy is
/// gone, the token resolves: [`Delivery::Written`] if every copy was finished
/// (written by a sink, or deliberately dropped by a filter),
/// [`Delivery::Failed`] if any copy was lost (dropped unwritten, a sink failed,
/// shutdown cut the drain). Its memory [`Reservation`], if any, is released
/// then too.
///
/// A source that acknowledges its own clients (a gRPC call, a JetStream
/// message) makes one, attaches it to the batch it sends and awaits the
/// [`Acknowledgement`]:
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// use sink_api::testkit::readings;
/// use sink_api::{Delivery, Output, Token, channel};
///
/// let (to_sink, mut sink) = channel(8);
/// let output = Output::new(vec![to_sink]);
///
/// let (token, acknowledgement) = Token::acknowledged(None);
/// let mut batch = readings("t", 0..3);
/// batch.attach(token);
/// output.send(batch).await.unwrap();
///
/// // The sink takes the batch, writes it, and asks for the next one.
/// let batch = sink.recv().await.unwrap();
/// drop(batch);
/// drop(output);
/// assert!(sink.recv().await.is_none());
/// assert_eq!(acknowledgement.await, Delivery::Written);
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Token(Arc<TokenState>);

#[derive(Debug)]
struct TokenState {
    failed: AtomicBool,
    acknowledgement: Option<oneshot::Sender<Delivery>>,
    _memory: Option<Reservation>,
}

/// How the readings a [`Token`] covers ended up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Every copy was finished: written by every sink it reached (synced,
    /// for a sink that syncs), or dropped on purpose by a processor.
    Written,
    /// Some copy was lost: dropped unwritten, its sink failed, or shutdown
    /// cut the drain. Some readings may still have been written: a source
    /// that has its client retry delivers at least once.
    Failed,
}

impl Token {
    /// A token holding `memory` (released once the token resolves), with no
    /// one waiting for its outcome.
    pub fn new(memory: Option<Reservation>) -> Self {
        Self::with(memory, None)
    }

    /// A token holding `memory`, and the [`Acknowledgement`] that resolves
    /// with its outcome.
    pub fn acknowledged(memory: Option<Reservation>) -> (Self, Acknowledgement) {
        let (sender, receiver) = oneshot::channel();
        (Self::with(memory, Some(sender)), Acknowledgement(receiver))
    }

    fn with(
        memory: Option<Reservation>,
        acknowledgement: Option<oneshot::Sender<Delivery>>,
    ) -> Self {
        Self(Arc::new(TokenState {
            failed: AtomicBool::new(false),
            acknowledgement,
            _memory: memory,
        }))
    }

    /// Marks the outcome failed, whatever the other copies do.
    pub fn fail(&self) {
        self.0.failed.store(true, Ordering::Relaxed);
    }

    /// Whether this and `other` are the same token (copies of one call's).
    pub fn same_as(&self, other: &Token) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Drop for TokenState {
    fn drop(&mut self) {
        if let Some(acknowledgement) = self.acknowledgement.take() {
            let outcome = if self.failed.load(Ordering::Relaxed) {
                Delivery::Failed
            } else {
                Delivery::Written
            };
            // Nobody waiting any more (the client went away): nothing to tell.
            let _ = acknowledgement.send(outcome);
        }
    }
}

/// Resolves with the [`Delivery`] of a [`Token`] once every copy of every
/// batch holding it is gone; see [`Token::acknowledged`].
#[derive(Debug)]
pub struct Acknowledgement(oneshot::Receiver<Delivery>);

impl Future for Acknowledgement {
    type Output = Delivery;

    fn poll(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Delivery> {
        // The token always sends before its sender goes; a closed channel
        // without an answer cannot mean "written".
        Pin::new(&mut self.0)
            .poll(cx)
            .map(|outcome| outcome.unwrap_or(Delivery::Failed))
    }
}

/// The pipeline-wide bound, in bytes, on the memory that batches in flight
/// hold (`settings.memory_limit`). A source reserves a batch's decoded size
/// before sending it and hands the [`Reservation`] to the batch's [`Token`];
/// it is released when the last copy of the batch is finished. Cheap to clone.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// use sink_api::{MemoryBudget, ReserveError};
///
/// let budget = MemoryBudget::new(64 * 1024);
/// let held = budget.try_reserve(40 * 1024).unwrap();
/// assert_eq!(budget.try_reserve(40 * 1024).unwrap_err(), ReserveError::Full);
/// assert!(matches!(budget.reserve(100 * 1024).await, Err(ReserveError::TooLarge { .. })));
/// drop(held);
/// assert!(budget.try_reserve(40 * 1024).is_ok());
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct MemoryBudget(Arc<BudgetState>);

/// Every call reserves and releases, so the common path is one atomic
/// update each way, with no lock: a lock here is taken twice per call, from
/// two threads. Only a reservation that finds too little free waits, in a
/// first-come-first-served line.
#[derive(Debug)]
struct BudgetState {
    /// KiB free: the limit less what is reserved. Below zero while a limit
    /// lowered under what is held waits for releases to pay it back.
    free: AtomicI64,
    /// The limit, in KiB.
    limit: AtomicI64,
    /// Reservations waiting in the line. While any wait, newcomers queue
    /// behind them: a stream of small calls cannot starve a large one.
    waiting: AtomicUsize,
    /// The line: only its head waits for room, the others for the head.
    line: Mutex<()>,
    /// Woken by a release while someone waits.
    room: Notify,
}

// Every update is one atomic operation, and the line's lock guards no data:
// a panic cannot leave the state half-changed. (Declared so that `Context`,
// which holds a budget, stays unwind-safe as it was.)
impl std::panic::RefUnwindSafe for BudgetState {}
impl std::panic::UnwindSafe for BudgetState {}

/// Why memory could not be reserved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ReserveError {
    /// More than the whole budget: it could never be granted.
    #[error("{bytes} bytes exceed the whole memory limit of {limit} bytes")]
    TooLarge {
        /// What was asked for.
        bytes: u64,
        /// The whole budget.
        limit: u64,
    },
    /// Not that much free now (only from [`MemoryBudget::try_reserve`]).
    #[error("the memory limit is reached")]
    Full,
}

/// Reserved memory, given back when dropped; see [`MemoryBudget`].
#[derive(Debug)]
pub struct Reservation {
    budget: Arc<BudgetState>,
    kib: i64,
}

/// The budget counts whole KiB.
const KIB: u64 = 1024;

/// The largest limit, in KiB (`u64::MAX` bytes, "unlimited", fits).
const MAX_KIB: u64 = u64::MAX / KIB + 1;

fn kib_of(bytes: u64) -> i64 {
    // At most 2^54: every sum of limits and reservations fits an i64.
    bytes.div_ceil(KIB).min(MAX_KIB) as i64
}

impl MemoryBudget {
    /// A budget of `limit_bytes` (rounded up to whole KiB).
    pub fn new(limit_bytes: u64) -> Self {
        let limit = kib_of(limit_bytes);
        Self(Arc::new(BudgetState {
            free: AtomicI64::new(limit),
            limit: AtomicI64::new(limit),
            waiting: AtomicUsize::new(0),
            line: Mutex::new(()),
            room: Notify::new(),
        }))
    }

    /// A budget that never runs out (for tests and tools).
    pub fn unlimited() -> Self {
        Self::new(u64::MAX)
    }

    /// The limit, in bytes.
    pub fn limit(&self) -> u64 {
        (self.0.limit.load(Ordering::Relaxed) as u64).saturating_mul(KIB)
    }

    /// Bytes reserved now (approximate while the limit is being changed).
    pub fn used(&self) -> u64 {
        let state = &self.0;
        let used = state.limit.load(Ordering::Relaxed) - state.free.load(Ordering::Relaxed);
        (used.max(0) as u64).saturating_mul(KIB)
    }

    /// Changes the limit, live. Lowering it below what is reserved takes
    /// effect as reservations are released.
    pub fn set_limit(&self, limit_bytes: u64) {
        let state = &self.0;
        let new = kib_of(limit_bytes);
        let old = state.limit.swap(new, Ordering::SeqCst);
        state.release(new - old);
    }

    /// Reserves `bytes`, waiting until that much is free. Refuses at once a
    /// request for more than the whole limit, and one waiting when the limit
    /// is lowered below it.
    pub async fn reserve(&self, bytes: u64) -> Result<Reservation, ReserveError> {
        let kib = self.admissible(bytes)?;
        let state = &self.0;
        if state.waiting.load(Ordering::SeqCst) == 0 && state.take(kib) {
            return Ok(self.reservation(kib));
        }
        state.waiting.fetch_add(1, Ordering::SeqCst);
        // Counted out however the wait ends, the caller's going away included.
        let _waiting = Waiting(&state.waiting);
        let _head = state.line.lock().await;
        loop {
            let room = state.room.notified();
            let mut room = std::pin::pin!(room);
            // Registered before looking, so that a release between the look
            // and the wait still wakes it.
            room.as_mut().enable();
            if state.take(kib) {
                return Ok(self.reservation(kib));
            }
            self.admissible(bytes)?;
            room.await;
        }
    }

    /// Reserves `bytes` if that much is free now and nobody waits for room.
    pub fn try_reserve(&self, bytes: u64) -> Result<Reservation, ReserveError> {
        let kib = self.admissible(bytes)?;
        let state = &self.0;
        if state.waiting.load(Ordering::SeqCst) == 0 && state.take(kib) {
            Ok(self.reservation(kib))
        } else {
            Err(ReserveError::Full)
        }
    }

    fn admissible(&self, bytes: u64) -> Result<i64, ReserveError> {
        let kib = kib_of(bytes);
        let limit = self.0.limit.load(Ordering::Relaxed);
        if kib > limit {
            return Err(ReserveError::TooLarge {
                bytes,
                limit: self.limit(),
            });
        }
        Ok(kib)
    }

    fn reservation(&self, kib: i64) -> Reservation {
        Reservation {
            budget: Arc::clone(&self.0),
            kib,
        }
    }
}

/// Counts a reservation out of the line when it stops waiting.
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Reservation {
    /// The bytes held (in whole KiB).
    pub fn bytes(&self) -> u64 {
        self.kib as u64 * KIB
    }

    /// Gives back all but `bytes` of it, once the real size is known to be
    /// smaller than the estimate reserved.
    pub fn shrink_to(&mut self, bytes: u64) {
        let keep = kib_of(bytes).min(self.kib);
        self.budget.release(self.kib - keep);
        self.kib = keep;
    }

    /// Takes `other` into this one: one reservation holding both, given
    /// back together. For memory reserved piece by piece as it arrives (a
    /// body's bytes, messages handed on as one batch). A reservation of
    /// another budget is not taken: it is released when `other` drops.
    pub fn merge(&mut self, mut other: Reservation) {
        if Arc::ptr_eq(&self.budget, &other.budget) {
            self.kib += std::mem::take(&mut other.kib);
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.release(self.kib);
    }
}

impl BudgetState {
    /// Takes `kib` if that much is free.
    fn take(&self, kib: i64) -> bool {
        self.free
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |free| {
                (free >= kib).then_some(free - kib)
            })
            .is_ok()
    }

    /// Gives back `kib` (a negative amount takes it out of circulation: a
    /// lowered limit) and wakes the head of the line if there is one.
    fn release(&self, kib: i64) {
        if kib == 0 {
            return;
        }
        self.free.fetch_add(kib, Ordering::SeqCst);
        // SeqCst on both sides: either the waiter, which counts itself in
        // before it looks, sees this release, or this sees the waiter.
        if self.waiting.load(Ordering::SeqCst) > 0 {
            self.room.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn a_token_resolves_when_its_last_copy_goes() {
        let (token, acknowledgement) = Token::acknowledged(None);
        let copy = token.clone();
        drop(token);
        let mut acknowledgement = acknowledgement;
        assert!(
            tokio::time::timeout(Duration::from_millis(20), &mut acknowledgement)
                .await
                .is_err(),
            "resolved while a copy was alive"
        );
        drop(copy);
        assert_eq!(acknowledgement.await, Delivery::Written);
    }

    #[tokio::test]
    async fn one_failed_copy_fails_the_token() {
        let (token, acknowledgement) = Token::acknowledged(None);
        let copy = token.clone();
        copy.fail();
        drop(copy);
        drop(token);
        assert_eq!(acknowledgement.await, Delivery::Failed);
    }

    #[tokio::test]
    async fn the_token_holds_its_memory_until_resolved() {
        let budget = MemoryBudget::new(10 * KIB);
        let (token, _ack) = Token::acknowledged(Some(budget.try_reserve(10 * KIB).unwrap()));
        assert_eq!(budget.try_reserve(1).unwrap_err(), ReserveError::Full);
        let copy = token.clone();
        drop(token);
        assert_eq!(budget.try_reserve(1).unwrap_err(), ReserveError::Full);
        drop(copy);
        assert!(budget.try_reserve(10 * KIB).is_ok());
    }

    #[test]
    fn merged_reservations_are_given_back_together() {
        let budget = MemoryBudget::new(10 * KIB);
        let mut held = budget.try_reserve(4 * KIB).unwrap();
        held.merge(budget.try_reserve(6 * KIB).unwrap());
        assert_eq!(held.bytes(), 10 * KIB);
        assert_eq!(budget.try_reserve(1).unwrap_err(), ReserveError::Full);
        drop(held);
        assert_eq!(budget.used(), 0);
    }

    #[tokio::test]
    async fn reserve_waits_for_room() {
        let budget = MemoryBudget::new(8 * KIB);
        let held = budget.reserve(6 * KIB).await.unwrap();
        let waiting = queued(&budget, 4 * KIB).await;
        assert!(!waiting.is_finished(), "granted beyond the limit");
        drop(held);
        assert_eq!(waiting.await.unwrap(), Ok(4 * KIB));
    }

    #[tokio::test]
    async fn a_large_waiter_is_served_before_later_small_ones() {
        let budget = MemoryBudget::new(8 * KIB);
        let held = budget.try_reserve(6 * KIB).unwrap();
        let large = queued(&budget, 8 * KIB).await;
        // 2 KiB are free, but the line is not empty: newcomers queue.
        assert_eq!(budget.try_reserve(KIB).unwrap_err(), ReserveError::Full);
        let mut small = std::pin::pin!(budget.reserve(KIB));
        assert!(futures_poll(&mut small).is_none(), "jumped the line");
        drop(held);
        assert_eq!(large.await.unwrap(), Ok(8 * KIB));
        assert_eq!(small.await.unwrap().bytes(), KIB);
    }

    #[tokio::test]
    async fn a_waiter_that_goes_away_leaves_the_line() {
        let budget = MemoryBudget::new(4 * KIB);
        let held = budget.try_reserve(4 * KIB).unwrap();
        let gone = queued(&budget, 4 * KIB).await;
        gone.abort();
        let _ = gone.await;
        assert_eq!(budget.0.waiting.load(Ordering::SeqCst), 0);
        drop(held);
        assert_eq!(budget.reserve(4 * KIB).await.unwrap().bytes(), 4 * KIB);
    }

    #[tokio::test]
    async fn a_waiter_larger_than_a_lowered_limit_is_refused() {
        let budget = MemoryBudget::new(8 * KIB);
        let held = budget.try_reserve(8 * KIB).unwrap();
        let waiting = queued(&budget, 6 * KIB).await;
        budget.set_limit(4 * KIB);
        drop(held);
        assert!(matches!(
            waiting.await.unwrap(),
            Err(ReserveError::TooLarge { .. })
        ));
        assert_eq!(budget.used(), 0);
    }

    /// Polls `future` once.
    fn futures_poll<F: Future + Unpin>(future: &mut F) -> Option<F::Output> {
        let waker = std::task::Waker::noop();
        match Pin::new(future).poll(&mut TaskContext::from_waker(waker)) {
            Poll::Ready(output) => Some(output),
            Poll::Pending => None,
        }
    }

    /// A task reserving `bytes` of `budget`, once it waits in the line (the
    /// only one there).
    async fn queued(
        budget: &MemoryBudget,
        bytes: u64,
    ) -> tokio::task::JoinHandle<Result<u64, ReserveError>> {
        let task = tokio::spawn({
            let budget = budget.clone();
            async move { budget.reserve(bytes).await.map(|r| r.bytes()) }
        });
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while budget.0.waiting.load(Ordering::SeqCst) != 1 {
            assert!(tokio::time::Instant::now() < deadline, "never waited");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        task
    }

    #[test]
    fn shrinking_and_changing_the_limit_keep_the_count() {
        let budget = MemoryBudget::new(100 * KIB);
        let mut big = budget.try_reserve(80 * KIB).unwrap();
        big.shrink_to(30 * KIB + 1);
        assert_eq!(big.bytes(), 31 * KIB);
        assert_eq!(budget.used(), 31 * KIB);
        // Lowered below what is held: nothing more until enough is released.
        budget.set_limit(20 * KIB);
        assert_eq!(budget.try_reserve(1).unwrap_err(), ReserveError::Full);
        assert!(matches!(
            budget.try_reserve(21 * KIB),
            Err(ReserveError::TooLarge { .. })
        ));
        drop(big);
        assert_eq!(budget.used(), 0);
        let all = budget.try_reserve(20 * KIB).unwrap();
        assert_eq!(budget.try_reserve(1).unwrap_err(), ReserveError::Full);
        budget.set_limit(30 * KIB);
        assert!(budget.try_reserve(10 * KIB).is_ok());
        drop(all);
    }
}

//! The handles a running stage is given: its input, its output, the shutdown
//! signal and its live parameters.

use std::any::{Any, TypeId};
use std::marker::PhantomData;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use smallvec::SmallVec;
use tokio::sync::{Notify, mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::batch::Lent;
use crate::metrics::Metrics;
use crate::{Batch, MemoryBudget, Readiness, Token};

/// A stage's config as the runtime hands it over on reload: the stage's own
/// config type, behind `Any`.
pub type AnyConfig = Arc<dyn Any + Send + Sync>;

/// A config and the number of the reload that handed it over.
type Versioned = (u64, AnyConfig);

/// Everything a running stage is given besides its data: its id, the shutdown
/// signal and its live parameter updates.
#[derive(Debug, Clone)]
pub struct Context {
    id: Arc<str>,
    shutdown: ShutdownSignal,
    params: watch::Receiver<Versioned>,
    applied: Arc<watch::Sender<u64>>,
    memory: MemoryBudget,
    /// The type of the stage's config: the only type its parameters come as.
    config_type: TypeId,
    metrics: Metrics,
    readiness: Readiness,
}

impl Context {
    /// A context for stage `id`, and the sender through which its new
    /// parameters reach it. The runtime and the test kit make these.
    pub fn new(id: &str, shutdown: ShutdownSignal, initial: AnyConfig) -> (Self, ParamSender) {
        // Of the config, not of the `Arc` holding it.
        let config_type = Any::type_id(&*initial);
        let (sender, params) = watch::channel((0, initial));
        let (applied, applied_receiver) = watch::channel(0);
        let cx = Self {
            id: id.into(),
            shutdown,
            params,
            applied: Arc::new(applied),
            memory: MemoryBudget::unlimited(),
            config_type,
            metrics: Metrics::detached(),
            readiness: Readiness::new(),
        };
        let sender = ParamSender {
            sender,
            sent: AtomicU64::new(0),
            applied: applied_receiver,
        };
        (cx, sender)
    }

    /// The stage's id from `pipeline.toml`, for log lines.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The signal that shutdown has started.
    pub fn shutdown(&self) -> &ShutdownSignal {
        &self.shutdown
    }

    /// This context sharing the pipeline-wide `memory` budget (the runtime
    /// sets `settings.memory_limit` here; a new context's is unlimited).
    pub fn with_memory(mut self, memory: MemoryBudget) -> Self {
        self.memory = memory;
        self
    }

    /// The pipeline-wide memory budget (`settings.memory_limit`): a source
    /// reserves a batch's decoded size here before sending it, and attaches
    /// the [`Reservation`](crate::Reservation) to the batch's [`Token`].
    ///
    /// ```
    /// # async fn demo(cx: sink_api::Context, output: sink_api::Output, batch: sink_api::Batch) {
    /// use sink_api::Token;
    /// let bytes = (batch.len() * std::mem::size_of::<sink_api::Reading>()) as u64;
    /// let Ok(memory) = cx.memory().reserve(bytes).await else {
    ///     return; // more than the whole budget: refuse it
    /// };
    /// let mut batch = batch;
    /// batch.attach(Token::new(Some(memory)));
    /// let _ = output.send(batch).await;
    /// # }
    /// ```
    pub fn memory(&self) -> &MemoryBudget {
        &self.memory
    }

    /// This context with `metrics` as the stage's metrics handle; the
    /// runtime gives each stage one labelled with its id, type and kind.
    pub fn with_metrics(mut self, metrics: Metrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// The handle through which the stage creates its own metrics, exported
    /// beside the built-in ones; see [`metrics`](crate::metrics). Outside
    /// the runtime (tests), a handle that exports nothing.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The pipeline's readiness, which the stage marks when it cannot do its
    /// part (see [`Readiness`]) and a source reports to its clients.
    pub fn readiness(&self) -> &Readiness {
        &self.readiness
    }

    /// This context, sharing the pipeline-wide `readiness` (the runtime gives
    /// every stage the same one; [`Context::new`] makes a fresh one).
    pub fn with_readiness(mut self, readiness: Readiness) -> Self {
        self.readiness = readiness;
        self
    }

    /// New parameters for this stage, typed as its config `C`, as the file is
    /// reloaded. Only changes of live keys arrive here: a change to a key the
    /// stage marks `x-restart` is refused as a topology change.
    ///
    /// A config counts as applied once the stage has taken it with
    /// [`Params::try_changed`], or asks for the next one after taking it with
    /// [`Params::changed`]; the runtime logs a reload as applied when every
    /// stage it changed has done so.
    ///
    /// # Panics
    ///
    /// When `C` is not the stage's own config type (the type whose `build`
    /// made the stage): parameters of any other type would never arrive. The
    /// message names both types, so the first test run shows the mistake.
    ///
    /// ```should_panic
    /// # use std::sync::Arc;
    /// # use sink_api::{Context, ShutdownSignal};
    /// struct MyConfig;
    /// struct OtherConfig;
    ///
    /// let (cx, _) = Context::new("demo", ShutdownSignal::new(), Arc::new(MyConfig));
    /// let _ = cx.params::<MyConfig>(); // fine
    /// let _ = cx.params::<OtherConfig>(); // panics: not this stage's config
    /// ```
    ///
    /// ```
    /// # async fn demo(cx: sink_api::Context) {
    /// #[derive(Debug)]
    /// struct MyConfig { threshold: i64 }
    ///
    /// let mut params = cx.params::<MyConfig>();
    /// let mut threshold = 10;
    /// tokio::select! {
    ///     new = params.changed() => threshold = new.threshold,
    ///     _ = cx.shutdown().wait() => {}
    /// }
    /// # let _ = threshold;
    /// # }
    /// ```
    #[track_caller]
    pub fn params<C: Any + Send + Sync>(&self) -> Params<C> {
        if TypeId::of::<C>() != self.config_type {
            let own = crate::registered_stages()
                .map(|info| (info.config_type)())
                .find(|config| config.id == self.config_type)
                .map_or_else(
                    || "the type whose `build` made it".to_string(),
                    |config| format!("`{}`", config.name),
                );
            panic!(
                "stage `{}` asked for its live parameters as `{}`, which is not its config \
                 type; they arrive only as {own}",
                self.id,
                std::any::type_name::<C>(),
            );
        }
        Params {
            taken: self.params.borrow().0,
            receiver: self.params.clone(),
            applied: Arc::clone(&self.applied),
            config: PhantomData,
        }
    }
}

/// The sending half of a stage's parameter updates, held by the runtime.
#[derive(Debug)]
pub struct ParamSender {
    sender: watch::Sender<Versioned>,
    sent: AtomicU64,
    applied: watch::Receiver<u64>,
}

impl ParamSender {
    /// Hands the stage `config`, which must be of the stage's own config type,
    /// and returns its number for [`applied`](Self::applied).
    pub fn send(&self, config: AnyConfig) -> u64 {
        let version = self.sent.fetch_add(1, Ordering::Relaxed) + 1;
        // A stage that has finished has no use for parameters.
        let _ = self.sender.send((version, config));
        version
    }

    /// Waits until the stage has applied config number `version` (or has
    /// ended).
    pub async fn applied(&self, version: u64) {
        let mut applied = self.applied.clone();
        let _ = applied.wait_for(|done| *done >= version).await;
    }
}

/// A stage's stream of new parameters; see [`Context::params`].
#[derive(Debug)]
pub struct Params<C> {
    receiver: watch::Receiver<Versioned>,
    applied: Arc<watch::Sender<u64>>,
    /// The number of the last config handed to the stage.
    taken: u64,
    config: PhantomData<fn() -> C>,
}

impl<C: Any + Send + Sync> Params<C> {
    /// Waits for the next new config. Pending forever once the runtime is gone,
    /// so it can sit in a `select!` loop without spinning.
    pub async fn changed(&mut self) -> Arc<C> {
        self.acknowledge();
        loop {
            if self.receiver.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
            if let Some(config) = self.take() {
                return config;
            }
        }
    }

    /// The new config if one arrived since the last look, without waiting.
    ///
    /// For a stage that needs its parameters only when a batch comes (a
    /// filter, a file writer): checking once per batch needs no `select!`, and
    /// a config handed over before a batch is sent applies to that batch. The
    /// config returned counts as applied at once: the stage applies it to the
    /// batch in hand.
    ///
    /// ```
    /// # async fn demo(mut input: sink_api::Input, cx: sink_api::Context) {
    /// #[derive(Debug)]
    /// struct MyConfig { threshold: i64 }
    ///
    /// let mut params = cx.params::<MyConfig>();
    /// let mut threshold = 10;
    /// while let Some(batch) = input.recv().await {
    ///     if let Some(new) = params.try_changed() {
    ///         threshold = new.threshold;
    ///     }
    ///     # let _ = (batch, threshold);
    /// }
    /// # }
    /// ```
    pub fn try_changed(&mut self) -> Option<Arc<C>> {
        // `has_changed` errs only once the runtime is gone: nothing new then.
        let new = if self.receiver.has_changed().unwrap_or(false) {
            self.take()
        } else {
            None
        };
        self.acknowledge();
        new
    }

    /// Marks the latest config taken, and returns it if it is of type `C`.
    fn take(&mut self) -> Option<Arc<C>> {
        let (version, latest) = self.receiver.borrow_and_update().clone();
        self.taken = version;
        latest.downcast::<C>().ok()
    }

    /// Confirms every config the stage has taken.
    fn acknowledge(&self) {
        let taken = self.taken;
        self.applied.send_if_modified(|applied| {
            let newer = *applied < taken;
            if newer {
                *applied = taken;
            }
            newer
        });
    }
}

/// Fires once when shutdown starts. Cheap to clone; every stage holds one.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let shutdown = sink_api::ShutdownSignal::new();
/// let waiter = shutdown.clone();
/// shutdown.trigger();
/// waiter.wait().await;
/// assert!(waiter.is_triggered());
/// # }
/// ```
#[derive(Debug, Clone, Default)]
pub struct ShutdownSignal(CancellationToken);

impl ShutdownSignal {
    /// A signal that has not fired.
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts shutdown for every holder of this signal.
    pub fn trigger(&self) {
        self.0.cancel();
    }

    /// Whether shutdown has started.
    pub fn is_triggered(&self) -> bool {
        self.0.is_cancelled()
    }

    /// Waits until shutdown starts.
    pub async fn wait(&self) {
        self.0.cancelled().await
    }
}

/// A bounded channel of batches into a stage, with `capacity` batches of room.
/// The runtime wires stages with these; the test kit feeds stages with them.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// use sink_api::testkit::readings;
/// use sink_api::{Output, channel};
///
/// // One output feeding two stages (fan-out): each gets every batch.
/// let (to_a, mut a) = channel(8);
/// let (to_b, mut b) = channel(8);
/// let output = Output::new(vec![to_a, to_b]);
/// output.send(readings("t", 0..3)).await.unwrap();
/// assert_eq!(a.recv().await.unwrap().len(), 3);
/// assert_eq!(b.recv().await.unwrap().len(), 3);
/// # }
/// ```
///
/// # Panics
///
/// When `capacity` is 0; the runtime refuses such a file before building.
pub fn channel(capacity: usize) -> (BatchSender, Input) {
    let (sender, receiver) = mpsc::channel(capacity);
    let input = Input {
        receiver,
        handled: Arc::default(),
        handled_batches: Arc::default(),
        received: Arc::default(),
        in_hand: Arc::default(),
        epoch: Arc::default(),
        taken: Vec::new(),
        batches_in_hand: 0,
    };
    let sender = BatchSender {
        sender,
        inlet: Arc::default(),
    };
    (sender, input)
}

/// The sending end of a stage's input channel; see [`channel`].
#[derive(Debug, Clone)]
pub struct BatchSender {
    sender: mpsc::Sender<Batch>,
    inlet: Arc<Inlet>,
}

impl BatchSender {
    /// What happens to batches sent into this channel: its `when_full`
    /// policy, shared by every clone, and its counts.
    pub fn inlet(&self) -> Arc<Inlet> {
        Arc::clone(&self.inlet)
    }

    /// Room for one batch: at once if there is some, else once there is;
    /// `None` if the stage has stopped or its `when_full` turned to `Drop`
    /// while waiting.
    async fn room(&self) -> Option<mpsc::Permit<'_, Batch>> {
        match self.sender.try_reserve() {
            Ok(permit) => return Some(permit),
            Err(mpsc::error::TrySendError::Closed(())) => return None,
            Err(mpsc::error::TrySendError::Full(())) => {}
        }
        loop {
            let changed = self.inlet.changed.notified();
            tokio::pin!(changed);
            // Registered before the check, so that no change slips between.
            changed.as_mut().enable();
            if self.inlet.when_full() == WhenFull::Drop {
                return None;
            }
            tokio::select! {
                permit = self.sender.reserve() => return permit.ok(),
                _ = changed => {}
            }
        }
    }
}

/// What an output does with a batch when one stage's input channel is full.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum WhenFull {
    /// Wait for room: the backpressure that reaches the sources (the default).
    #[default]
    Wait,
    /// Drop the batch for this stage alone, counted in
    /// [`Inlet::dropped`]; the other stages still get it.
    Drop,
}

/// One input channel's `when_full` policy (which can change while running)
/// and the count of readings delivered into it and dropped before it.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// use sink_api::testkit::readings;
/// use sink_api::{Output, WhenFull, channel};
///
/// let (to_slow, _slow) = channel(1);
/// let (to_file, mut file) = channel(8);
/// to_slow.inlet().set_when_full(WhenFull::Drop);
/// let output = Output::new(vec![to_slow.clone(), to_file]);
/// output.send(readings("t", 0..3)).await.unwrap();
/// // The slow stage is full now: it misses the next batch, the file does not.
/// output.send(readings("t", 3..5)).await.unwrap();
/// assert_eq!(to_slow.inlet().dropped(), 2);
/// assert_eq!(file.recv().await.unwrap().len(), 3);
/// assert_eq!(file.recv().await.unwrap().len(), 2);
/// # }
/// ```
#[derive(Debug, Default)]
pub struct Inlet {
    drop_when_full: AtomicBool,
    /// Wakes the sends waiting for room when `when_full` changes.
    changed: Notify,
    delivered: AtomicU64,
    dropped: AtomicU64,
}

impl Inlet {
    /// Sets what outputs do when this channel is full; a send waiting for
    /// room stops waiting once it is `Drop`.
    pub fn set_when_full(&self, when_full: WhenFull) {
        self.drop_when_full
            .store(when_full == WhenFull::Drop, Ordering::Relaxed);
        self.changed.notify_waiters();
    }

    /// What outputs do when this channel is full.
    pub fn when_full(&self) -> WhenFull {
        if self.drop_when_full.load(Ordering::Relaxed) {
            WhenFull::Drop
        } else {
            WhenFull::Wait
        }
    }

    /// Readings put into this channel.
    pub fn delivered(&self) -> u64 {
        self.delivered.load(Ordering::Relaxed)
    }

    /// Readings meant for this channel that were not put in: it was full
    /// under [`WhenFull::Drop`], or its stage had stopped.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

impl BatchSender {
    /// A view of how full the channel is that does not keep it open.
    pub fn fill(&self) -> ChannelFill {
        ChannelFill(self.sender.downgrade())
    }
}

/// How many batches wait in a stage's input channel, for the runtime's
/// metrics; see [`BatchSender::fill`].
#[derive(Debug, Clone)]
pub struct ChannelFill(mpsc::WeakSender<Batch>);

impl ChannelFill {
    /// Batches waiting (or being put in), or `None` once the channel has
    /// closed.
    pub fn waiting(&self) -> Option<usize> {
        let sender = self.0.upgrade()?;
        Some(sender.max_capacity() - sender.capacity())
    }
}

/// A stage's input: the batches of all its upstream stages, merged.
#[derive(Debug)]
pub struct Input {
    receiver: mpsc::Receiver<Batch>,
    /// Readings of the batches the stage has finished with.
    handled: Arc<AtomicU64>,
    /// Batches the stage has finished with.
    handled_batches: Arc<AtomicU64>,
    /// Readings of the batches the stage has taken.
    received: Arc<AtomicU64>,
    /// Readings taken since the stage last asked to wait for more and not
    /// yet marked done; shared with the stage's [`DoneMarker`]s.
    in_hand: Arc<AtomicU64>,
    /// How many times the stage has asked for more: batches it took are
    /// stamped with it, so a batch still held after the next `recv` is known.
    epoch: Arc<AtomicU64>,
    /// The tokens of the batches taken since the stage last asked for more:
    /// finished when it asks again, failed if the input is dropped first.
    taken: Vec<Token>,
    /// Batches taken since then.
    batches_in_hand: u64,
}

impl Input {
    /// The next batch, or `None` once every upstream stage has finished.
    ///
    /// Asking for the next batch says the stage is done with every batch it
    /// took before (written, for a sink): that is what
    /// [`handled_counter`](Self::handled_counter) counts, and what finishes
    /// those batches' [`Token`]s (see [`Batch`] for the rules).
    pub async fn recv(&mut self) -> Option<Batch> {
        if self.batches_in_hand > 0 {
            all_done(&self.in_hand, &self.handled);
            self.handled_batches
                .fetch_add(self.batches_in_hand, Ordering::Relaxed);
        }
        self.taken.clear();
        self.epoch.fetch_add(1, Ordering::Relaxed);
        self.batches_in_hand = 0;
        let batch = self.receiver.recv().await?;
        Some(self.take(batch))
    }

    /// The next batch if one is waiting, without waiting; for a stage that
    /// gathers what is waiting into one write. It stays in hand until the
    /// next [`recv`](Self::recv).
    pub fn try_recv(&mut self) -> Result<Batch, mpsc::error::TryRecvError> {
        let batch = self.receiver.try_recv()?;
        Ok(self.take(batch))
    }

    /// Marks every batch taken since the last [`recv`](Self::recv) failed,
    /// and lets go of them: they could not be written (a sink whose write
    /// failed; it may keep retrying, and the sources' clients retry what
    /// failed). Their sources hear so as soon as no other copy is pending.
    pub fn fail_taken(&mut self) {
        for token in self.taken.drain(..) {
            token.fail();
        }
    }

    /// Lets go of the batches taken, which the caller now answers for.
    pub(crate) fn forget_taken(&mut self) {
        self.taken.clear();
        self.epoch.fetch_add(1, Ordering::Relaxed);
    }

    fn take(&mut self, mut batch: Batch) -> Batch {
        self.in_hand
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        self.batches_in_hand += 1;
        self.received
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        if !batch.tokens().is_empty() {
            self.taken.extend(batch.tokens().iter().cloned());
            batch.lend(Lent {
                epoch: Arc::clone(&self.epoch),
                at: self.epoch.load(Ordering::Relaxed),
            });
        }
        batch
    }

    /// A counter of the readings this stage has finished with, for the
    /// runtime's account of what a timed-out shutdown lost.
    pub fn handled_counter(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.handled)
    }

    /// A counter of the batches this stage has finished with (written, for
    /// a sink), for the runtime's metrics.
    pub fn handled_batches_counter(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.handled_batches)
    }

    /// A counter of the readings this stage has taken from its input, for
    /// the runtime's metrics.
    pub fn received_counter(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.received)
    }

    /// Says that `readings` of those in hand are done (written, for a sink)
    /// before the stage asks for more: a sink whose write of several batches
    /// stops partway counts the readings whose lines landed whole, so that a
    /// timed-out shutdown's loss count is exact. At most what is in hand counts.
    /// From a blocking thread, use a [`DoneMarker`].
    pub fn mark_done(&mut self, readings: u64) {
        done(&self.in_hand, &self.handled, readings);
    }

    /// A handle that marks readings in hand done from wherever the work
    /// happens, such as the blocking thread that writes them: counted there,
    /// right as they land, they count even if the stage is cut (a timed-out
    /// shutdown aborts it) before that thread's result reaches it. See
    /// [`DoneMarker`].
    pub fn done_marker(&self) -> DoneMarker {
        DoneMarker {
            handled: Arc::clone(&self.handled),
            in_hand: Arc::clone(&self.in_hand),
        }
    }
}

/// Marks readings of an [`Input`]'s batches in hand done (written, for a
/// sink) from another thread; see [`Input::done_marker`]. Cheap to clone.
///
/// It counts against what is in hand when it is called: use it for the
/// batches taken since the stage last asked for more, before it asks again
/// (a sink waits for its blocking write before taking the next batch).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// use sink_api::testkit::readings;
/// use sink_api::{Output, channel};
///
/// let (to_sink, mut input) = channel(4);
/// Output::new(vec![to_sink]).send(readings("t", 0..5)).await.unwrap();
/// let batch = input.recv().await.unwrap();
/// let done = input.done_marker();
/// let handled = input.handled_counter();
/// tokio::task::spawn_blocking(move || {
///     // Three lines of the batch landed, then the disk filled up: they
///     // count as written now, whatever becomes of the stage.
///     done.mark_done(3);
/// })
/// .await
/// .unwrap();
/// assert_eq!(handled.load(std::sync::atomic::Ordering::Relaxed), 3);
/// # drop(batch);
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct DoneMarker {
    handled: Arc<AtomicU64>,
    in_hand: Arc<AtomicU64>,
}

impl DoneMarker {
    /// Says that `readings` of those in hand are done; at most what is in
    /// hand counts, so nothing counts twice.
    pub fn mark_done(&self, readings: u64) {
        done(&self.in_hand, &self.handled, readings);
    }

    /// Says that every reading in hand is done: a write that carried them
    /// all has succeeded.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// use sink_api::testkit::readings;
    /// use sink_api::{Output, channel};
    ///
    /// let (to_sink, mut input) = channel(4);
    /// Output::new(vec![to_sink]).send(readings("t", 0..5)).await.unwrap();
    /// let _batch = input.recv().await.unwrap();
    /// input.done_marker().mark_all_done();
    /// assert_eq!(input.handled_counter().load(std::sync::atomic::Ordering::Relaxed), 5);
    /// # }
    /// ```
    pub fn mark_all_done(&self) {
        all_done(&self.in_hand, &self.handled);
    }
}

/// Moves `readings` of those `in_hand` (at most all of them) to `handled`.
fn done(in_hand: &AtomicU64, handled: &AtomicU64, readings: u64) {
    let held = in_hand
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |held| {
            Some(held - readings.min(held))
        })
        .unwrap_or_else(|held| held);
    handled.fetch_add(readings.min(held), Ordering::Relaxed);
}

/// Moves every reading `in_hand` to `handled`.
fn all_done(in_hand: &AtomicU64, handled: &AtomicU64) {
    handled.fetch_add(in_hand.swap(0, Ordering::Relaxed), Ordering::Relaxed);
}

impl Drop for Input {
    /// The stage ended (failed, panicked, or stopped early) without asking
    /// for more: what it held was not finished.
    fn drop(&mut self) {
        self.fail_taken();
    }
}

/// Where a stage sends its batches: every downstream stage gets each batch.
/// Cheap to clone, so a source can hand one to each connection task.
///
/// A downstream stage that has stopped (a sink that failed for good) is
/// skipped, and what it misses is counted in its [`Inlet::dropped`]; only
/// when every downstream stage has stopped does sending fail. A stage whose
/// input drops when full ([`WhenFull::Drop`]) never holds a send back.
///
/// A batch that some downstream stage misses (dropped, or skipped because
/// that stage has stopped) fails its [`Token`]s: with acknowledgements, its
/// calls learn that their readings were not written everywhere.
#[derive(Debug, Clone, Default)]
pub struct Output {
    targets: Arc<[BatchSender]>,
    sent: Arc<AtomicU64>,
    batches: Arc<AtomicU64>,
}

/// Room reserved in the channels a batch goes to: inline for up to two
/// (most stages feed one or two), so a send allocates nothing.
type Permits<'a> = SmallVec<[(&'a BatchSender, mpsc::Permit<'a, Batch>); 2]>;

/// The batch could not be sent; it is handed back.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// A downstream stage has stopped; nothing more can be delivered there.
    #[error("a downstream stage has stopped")]
    Closed(Batch),
    /// A downstream channel has no room now (only from [`Output::try_send`]).
    #[error("a downstream stage is full")]
    Full(Batch),
}

impl Output {
    /// An output that delivers to each of `targets`.
    pub fn new(targets: Vec<BatchSender>) -> Self {
        Self {
            targets: targets.into(),
            sent: Arc::default(),
            batches: Arc::default(),
        }
    }

    /// Sends `batch` to every downstream stage, waiting while any is full: this
    /// wait is the backpressure that reaches clients. Room is reserved in every
    /// channel that waits before anything is sent, so a batch reaches all of
    /// them or none; a channel that drops when full is tried last, at once.
    pub async fn send(&self, batch: impl Into<Batch>) -> Result<(), SendError> {
        let batch = batch.into();
        let mut permits = Permits::new();
        let mut dropping = false;
        for target in self.targets.iter() {
            if target.inlet.when_full() == WhenFull::Drop {
                dropping = true;
            } else if let Some(permit) = target.room().await {
                permits.push((target, permit));
            } else {
                // Stopped, or turned to `Drop` while this send waited.
                dropping = true;
            }
        }
        if dropping {
            self.reserve_dropping(&mut permits);
        }
        self.deliver(permits, batch)
    }

    /// Sends `batch` to every downstream stage if all that wait when full have
    /// room now; otherwise sends nothing and hands it back.
    pub fn try_send(&self, batch: impl Into<Batch>) -> Result<(), SendError> {
        let batch = batch.into();
        let mut permits = Permits::new();
        let mut dropping = false;
        for target in self.targets.iter() {
            if target.inlet.when_full() == WhenFull::Drop {
                dropping = true;
                continue;
            }
            match target.sender.try_reserve() {
                Ok(permit) => permits.push((target, permit)),
                Err(mpsc::error::TrySendError::Full(())) => return Err(SendError::Full(batch)),
                Err(mpsc::error::TrySendError::Closed(())) => {}
            }
        }
        if dropping {
            self.reserve_dropping(&mut permits);
        }
        self.deliver(permits, batch)
    }

    /// Waits until every downstream stage that waits when full has room for
    /// a batch (or has stopped), without sending anything: a source can tell
    /// when a full pipeline has drained.
    pub async fn room(&self) {
        for target in self.targets.iter() {
            // The permit goes back at once; stopped stages have room forever.
            let _ = target.room().await;
        }
    }

    /// Adds the room there is now in the channels that drop when full.
    fn reserve_dropping<'a>(&'a self, permits: &mut Permits<'a>) {
        for target in self.targets.iter() {
            let taken = permits.iter().any(|(t, _)| std::ptr::eq(*t, target));
            if !taken && let Ok(permit) = target.sender.try_reserve() {
                permits.push((target, permit));
            }
        }
    }

    /// A counter of the readings sent, for the runtime's accounting.
    pub fn sent_counter(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.sent)
    }

    /// A counter of the batches sent, for the runtime's metrics.
    pub fn batches_counter(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.batches)
    }

    /// Sends `batch` through `permits`. A target without one misses it: the
    /// batch counts as dropped there and fails its tokens (the readings are
    /// not written everywhere they were meant to go). When every target has
    /// stopped, nothing is sent and the batch comes back as `Closed`.
    fn deliver(&self, permits: Permits<'_>, batch: Batch) -> Result<(), SendError> {
        let readings = batch.len() as u64;
        if permits.len() < self.targets.len() {
            let open = self.targets.iter().any(|t| !t.sender.is_closed());
            if !open {
                // Every downstream stage has stopped: nothing was accepted.
                return Err(SendError::Closed(batch));
            }
            for target in self.targets.iter() {
                if !permits.iter().any(|(t, _)| std::ptr::eq(*t, target)) {
                    target.inlet.dropped.fetch_add(readings, Ordering::Relaxed);
                }
            }
            // A stage that misses the batch will not write it: its calls are
            // not "written", whatever the other stages do (their clients get
            // UNAVAILABLE and retry, with `acknowledge = "written"`).
            if readings > 0 {
                for token in batch.tokens() {
                    token.fail();
                }
            }
        }
        self.sent.fetch_add(readings, Ordering::Relaxed);
        self.batches.fetch_add(1, Ordering::Relaxed);
        // In a channel, the batch is no longer in the sending stage's hands.
        let batch = batch.owned();
        let mut permits = permits.into_iter();
        let last = permits.next_back();
        // Fan-out copies the batch, tokens included, for all targets but the
        // last, which gets the original: every branch must finish its copy.
        for (target, permit) in permits {
            target
                .inlet
                .delivered
                .fetch_add(readings, Ordering::Relaxed);
            permit.send(batch.clone());
        }
        if let Some((target, permit)) = last {
            target
                .inlet
                .delivered
                .fetch_add(readings, Ordering::Relaxed);
            permit.send(batch);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{Reading, Timestamp};

    fn batch(n: usize) -> Batch {
        (0..n)
            .map(|i| Reading {
                sensor_name: format!("s{i}").into(),
                labels: crate::Labels::new(),
                value: Some(crate::Value::Int(i as i64)),
                created_at: None,
                received_at: Timestamp::now(),
            })
            .collect()
    }

    #[tokio::test]
    async fn fan_out_delivers_to_all_or_none() {
        let (a_tx, mut a) = channel(2);
        let (b_tx, mut b) = channel(1);
        let output = Output::new(vec![a_tx, b_tx]);
        output.try_send(batch(2)).unwrap();
        // b is full now, a is not: the next batch must reach neither.
        assert!(matches!(output.try_send(batch(3)), Err(SendError::Full(b)) if b.len() == 3));
        assert_eq!(a.recv().await.unwrap().len(), 2);
        assert!(a.try_recv().is_err(), "a got a batch that b could not take");
        assert_eq!(b.recv().await.unwrap().len(), 2);
        assert_eq!(output.sent_counter().load(Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn a_batch_counts_as_handled_once_the_next_is_asked_for() {
        let (tx, mut input) = channel(4);
        let output = Output::new(vec![tx]);
        for size in [2, 3, 4] {
            output.send(batch(size)).await.unwrap();
        }
        drop(output);
        let handled = input.handled_counter();
        input.recv().await.unwrap();
        input.try_recv().unwrap();
        assert_eq!(handled.load(Ordering::Relaxed), 0, "still in hand");
        input.recv().await.unwrap();
        assert_eq!(handled.load(Ordering::Relaxed), 5);
        assert!(input.recv().await.is_none());
        assert_eq!(
            handled.load(Ordering::Relaxed),
            9,
            "the input ended: all done"
        );
    }

    fn tracked(n: usize) -> (Batch, crate::Acknowledgement) {
        let (token, acknowledgement) = Token::acknowledged(None);
        let mut batch = batch(n);
        batch.attach(token);
        (batch, acknowledgement)
    }

    async fn outcome(acknowledgement: &mut crate::Acknowledgement) -> Option<crate::Delivery> {
        tokio::time::timeout(Duration::from_millis(20), acknowledgement)
            .await
            .ok()
    }

    #[tokio::test]
    async fn a_sink_finishes_a_batch_by_asking_for_the_next() {
        let (tx, mut input) = channel(4);
        let output = Output::new(vec![tx]);
        let (first, mut first_ack) = tracked(2);
        let (second, mut second_ack) = tracked(2);
        output.send(first).await.unwrap();
        output.send(second).await.unwrap();
        let taken = input.recv().await.unwrap();
        drop(taken);
        assert_eq!(
            outcome(&mut first_ack).await,
            None,
            "finished before asking for more"
        );
        let second = input.recv().await.unwrap();
        assert_eq!(
            outcome(&mut first_ack).await,
            Some(crate::Delivery::Written)
        );
        // The stage ends (fails) with the second in hand.
        drop(input);
        drop(second);
        assert_eq!(
            outcome(&mut second_ack).await,
            Some(crate::Delivery::Failed)
        );
    }

    #[tokio::test]
    async fn fan_out_waits_for_every_branch() {
        let (a_tx, mut a) = channel(2);
        let (b_tx, mut b) = channel(2);
        let output = Output::new(vec![a_tx, b_tx]);
        let (sent, mut acknowledgement) = tracked(3);
        output.send(sent).await.unwrap();
        drop(output);
        a.recv().await.unwrap();
        assert!(a.recv().await.is_none());
        assert_eq!(
            outcome(&mut acknowledgement).await,
            None,
            "b has not written"
        );
        b.recv().await.unwrap();
        assert!(b.recv().await.is_none());
        assert_eq!(
            outcome(&mut acknowledgement).await,
            Some(crate::Delivery::Written)
        );
    }

    #[tokio::test]
    async fn a_batch_kept_across_recv_and_dropped_fails() {
        let (tx, mut input) = channel(4);
        let output = Output::new(vec![tx]);
        let (first, mut acknowledgement) = tracked(2);
        output.send(first).await.unwrap();
        output.send(batch(1)).await.unwrap();
        // A buffering stage that keeps what it took, asks for more, then loses it.
        let kept = input.recv().await.unwrap();
        input.recv().await.unwrap();
        assert_eq!(outcome(&mut acknowledgement).await, None);
        drop(kept);
        assert_eq!(
            outcome(&mut acknowledgement).await,
            Some(crate::Delivery::Failed)
        );
    }

    #[tokio::test]
    async fn a_batch_left_in_a_channel_fails() {
        let (tx, input) = channel(4);
        let (sent, acknowledgement) = tracked(2);
        Output::new(vec![tx]).send(sent).await.unwrap();
        drop(input);
        assert_eq!(acknowledgement.await, crate::Delivery::Failed);
    }

    #[tokio::test]
    async fn a_failed_write_fails_what_was_taken() {
        let (tx, mut input) = channel(4);
        let (sent, acknowledgement) = tracked(2);
        Output::new(vec![tx]).send(sent).await.unwrap();
        drop(input.recv().await.unwrap());
        input.fail_taken();
        assert!(input.recv().await.is_none());
        assert_eq!(acknowledgement.await, crate::Delivery::Failed);
    }

    #[tokio::test]
    async fn a_stopped_downstream_is_skipped_and_counted() {
        let (gone_tx, gone) = channel(4);
        let (file_tx, mut file) = channel(4);
        drop(gone);
        let output = Output::new(vec![gone_tx.clone(), file_tx]);
        output.send(batch(2)).await.unwrap();
        output.try_send(batch(3)).unwrap();
        assert_eq!(file.recv().await.unwrap().len(), 2);
        assert_eq!(file.recv().await.unwrap().len(), 3);
        assert_eq!(gone_tx.inlet().dropped(), 5);
        assert_eq!(gone_tx.inlet().delivered(), 0);
    }

    #[tokio::test]
    async fn a_full_input_that_drops_never_holds_a_send_back() {
        let (slow_tx, mut slow) = channel(1);
        let (file_tx, mut file) = channel(1);
        slow_tx.inlet().set_when_full(WhenFull::Drop);
        let output = Output::new(vec![slow_tx.clone(), file_tx.clone()]);
        output.try_send(batch(1)).unwrap();
        // The file waits when full: try_send refuses, and nothing is counted.
        assert!(matches!(output.try_send(batch(2)), Err(SendError::Full(_))));
        assert_eq!(slow_tx.inlet().dropped(), 0);
        assert_eq!(file.recv().await.unwrap().len(), 1);
        output.send(batch(2)).await.unwrap();
        assert_eq!(slow_tx.inlet().dropped(), 2);
        assert_eq!(file_tx.inlet().delivered(), 3);
        assert_eq!(slow.recv().await.unwrap().len(), 1);
        // `room` waits for the file (which waits when full), not the slow input.
        tokio::time::timeout(Duration::from_millis(50), output.room())
            .await
            .expect_err("the file is still full");
        assert_eq!(file.recv().await.unwrap().len(), 2);
        tokio::time::timeout(Duration::from_secs(5), output.room())
            .await
            .expect("room once the file took its batch");
    }

    #[tokio::test]
    async fn a_waiting_send_goes_on_once_its_full_input_turns_to_drop() {
        let (slow_tx, _slow) = channel(1);
        let (file_tx, mut file) = channel(4);
        let output = Output::new(vec![slow_tx.clone(), file_tx]);
        output.send(batch(1)).await.unwrap();
        let waiting = tokio::spawn({
            let output = output.clone();
            async move { output.send(batch(2)).await }
        });
        assert_eq!(file.recv().await.unwrap().len(), 1);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished(), "the slow input waits when full");
        slow_tx.inlet().set_when_full(WhenFull::Drop);
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("the send went on")
            .unwrap()
            .unwrap();
        assert_eq!(file.recv().await.unwrap().len(), 2);
        assert_eq!(slow_tx.inlet().dropped(), 2);
    }

    #[tokio::test]
    async fn a_batch_a_target_misses_fails_its_token_and_frees_its_memory() {
        let memory = MemoryBudget::new(1 << 20);
        let (slow_tx, mut slow) = channel(1);
        let (file_tx, mut file) = channel(4);
        let (gone_tx, gone) = channel(4);
        slow_tx.inlet().set_when_full(WhenFull::Drop);
        let output = Output::new(vec![slow_tx, file_tx, gone_tx]);
        drop(gone);
        let mut sent = Vec::new();
        for n in [2, 3] {
            let (token, acknowledgement) =
                Token::acknowledged(Some(memory.try_reserve(4096).unwrap()));
            let mut batch = batch(n);
            batch.attach(token);
            output.send(batch).await.unwrap();
            sent.push(acknowledgement);
        }
        drop(output);
        // Every copy that was delivered is written...
        while slow.recv().await.is_some() {}
        while file.recv().await.is_some() {}
        // ...yet the stopped target (and, for the second, the full one)
        // missed each batch: neither call was written everywhere.
        for acknowledgement in sent {
            assert_eq!(acknowledgement.await, crate::Delivery::Failed);
        }
        assert_eq!(
            memory.used(),
            0,
            "the reservations went with the last copies"
        );
    }

    #[tokio::test]
    async fn mark_done_counts_part_of_what_is_in_hand() {
        let (tx, mut input) = channel(4);
        let output = Output::new(vec![tx]);
        output.send(batch(3)).await.unwrap();
        output.send(batch(4)).await.unwrap();
        drop(output);
        let handled = input.handled_counter();
        input.recv().await.unwrap();
        input.try_recv().unwrap();
        input.mark_done(5);
        assert_eq!(handled.load(Ordering::Relaxed), 5);
        input.mark_done(100);
        assert_eq!(
            handled.load(Ordering::Relaxed),
            7,
            "at most what is in hand"
        );
        assert!(input.recv().await.is_none());
        assert_eq!(handled.load(Ordering::Relaxed), 7, "nothing counted twice");
    }

    #[tokio::test]
    async fn a_done_marker_counts_from_another_thread_even_after_the_input_is_gone() {
        let (tx, mut input) = channel(4);
        let output = Output::new(vec![tx]);
        for size in [3, 4, 5] {
            output.send(batch(size)).await.unwrap();
        }
        let handled = input.handled_counter();
        let batches = input.handled_batches_counter();
        let counted = || handled.load(Ordering::Relaxed);
        input.recv().await.unwrap();
        input.try_recv().unwrap();
        let done = input.done_marker();
        let marker = done.clone();
        tokio::task::spawn_blocking(move || marker.mark_done(2))
            .await
            .unwrap();
        assert_eq!(counted(), 2, "counted on the blocking thread");
        done.mark_all_done();
        assert_eq!(counted(), 7, "the rest of the 3 + 4 in hand");
        done.mark_done(10);
        assert_eq!(counted(), 7, "nothing beyond what is in hand");
        input.recv().await.unwrap();
        assert_eq!(counted(), 7, "asking for more counts nothing twice");
        assert_eq!(batches.load(Ordering::Relaxed), 2);

        // The stage is cut (aborted) while its blocking write runs: the
        // write still counts what it landed, against the batch it held.
        let done = input.done_marker();
        drop(input);
        tokio::task::spawn_blocking(move || done.mark_done(4))
            .await
            .unwrap();
        assert_eq!(counted(), 11);
    }

    #[tokio::test]
    async fn send_reports_a_stopped_downstream() {
        let (tx, input) = channel(4);
        drop(input);
        let output = Output::new(vec![tx]);
        assert!(matches!(
            output.send(batch(1)).await,
            Err(SendError::Closed(_))
        ));
    }

    #[tokio::test]
    async fn a_config_counts_as_applied_when_the_next_is_asked_for() {
        let (cx, sender) = Context::new("x", ShutdownSignal::new(), Arc::new(1_u32));
        let mut params = cx.params::<u32>();
        let version = sender.send(Arc::new(2_u32));
        assert_eq!(*params.changed().await, 2);
        let confirmed = tokio::time::timeout(Duration::from_millis(50), sender.applied(version));
        assert!(
            confirmed.await.is_err(),
            "confirmed before the stage asked again"
        );
        assert!(params.try_changed().is_none());
        tokio::time::timeout(Duration::from_secs(5), sender.applied(version))
            .await
            .expect("confirmed once the stage asked again");
    }

    #[tokio::test]
    async fn try_changed_confirms_what_it_returns_at_once() {
        let (cx, sender) = Context::new("x", ShutdownSignal::new(), Arc::new(1_u32));
        let mut params = cx.params::<u32>();
        let version = sender.send(Arc::new(2_u32));
        assert_eq!(params.try_changed().as_deref(), Some(&2));
        tokio::time::timeout(Duration::from_secs(5), sender.applied(version))
            .await
            .expect("confirmed as it was taken");
    }

    #[test]
    fn params_of_another_type_panic_naming_both() {
        let (cx, _sender) = Context::new("hot", ShutdownSignal::new(), Arc::new(1_u32));
        let panic = std::panic::catch_unwind(|| cx.params::<String>()).expect_err("panics");
        let message = panic.downcast_ref::<String>().expect("a message");
        assert!(
            message.contains("stage `hot`") && message.contains("`alloc::string::String`"),
            "{message}"
        );
    }

    #[tokio::test]
    async fn params_arrive_typed() {
        let (cx, sender) = Context::new("x", ShutdownSignal::new(), Arc::new(1_u32));
        let mut params = cx.params::<u32>();
        sender.send(Arc::new(2_u32));
        assert_eq!(*params.changed().await, 2);
    }

    #[test]
    fn try_changed_yields_each_new_config_once() {
        let (cx, sender) = Context::new("x", ShutdownSignal::new(), Arc::new(1_u32));
        let mut params = cx.params::<u32>();
        assert!(
            params.try_changed().is_none(),
            "the initial config is not a change"
        );
        sender.send(Arc::new(2_u32));
        sender.send(Arc::new(3_u32));
        assert_eq!(params.try_changed().as_deref(), Some(&3));
        assert!(params.try_changed().is_none());
        // A config of another type is not this stage's: ignored.
        sender.send(Arc::new("other"));
        assert!(params.try_changed().is_none());
    }
}

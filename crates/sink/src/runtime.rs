//! Building a validated pipeline into running tasks, keeping it running when
//! one sink fails for good, and shutting it down without losing what it
//! accepted, or saying exactly how much was lost.
//!
//! Failure policy: a sink that fails (its reader gone, say) is stopped alone.
//! The stages upstream skip it from then on, counting what it misses, so the
//! other sinks lose nothing; readiness turns NOT_SERVING and the log names the
//! sink and its loss. A stage whose every reader has stopped stops too. The
//! pipeline shuts down (draining, then exit 1) when a source or a processor
//! that still had readers fails, or when some source no longer reaches any
//! running sink.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use sink_api::{
    AnyConfig, BatchSender, BuildContext, Context, Inlet, Input, MemoryBudget, Output, ParamSender,
    Readiness, ShutdownSignal, StageError, StageKind, WhenFull,
};
use tokio::task::JoinSet;

use sink_api::metrics::MetricsRegistry;

use crate::metrics::{MemoryCollector, StageCollector, StageCounters};
use crate::pipeline::{Pipeline, PipelineError, PipelineErrors, StageConfig};

/// How long a timed-out shutdown waits, once it has cut the processors and
/// sinks, for the sources to answer the calls that waited for them.
const ANSWER_WAITING_CALLS: Duration = Duration::from_secs(2);

/// A pipeline whose stages are running.
pub struct Running {
    shutdown: ShutdownSignal,
    tasks: JoinSet<(String, Result<(), StageError>)>,
    /// Stage ids by task, to name a stage that panicked.
    names: HashMap<tokio::task::Id, String>,
    params: HashMap<String, ParamSender>,
    /// Each stage's kind and the stages that read from it.
    graph: HashMap<String, (StageKind, Vec<String>)>,
    /// Stages whose task has ended.
    stopped: HashSet<String>,
    accounts: Accounts,
    readiness: Readiness,
    /// Logs what sinks under `when_full = "drop"` (or stopped) miss.
    monitor: tokio::task::JoinHandle<()>,
    /// `settings.memory_limit`, shared by every stage.
    memory: MemoryBudget,
    /// The processors and sinks, cut first when shutdown times out, so that
    /// the sources can still answer the calls that waited for them.
    downstream: Vec<tokio::task::AbortHandle>,
}

/// What sources accepted and sinks wrote, shared with whoever reports a loss.
#[derive(Clone)]
pub struct Accounts(Arc<[SinkAccount]>);

/// One sink's account.
struct SinkAccount {
    id: String,
    /// Counters of readings accepted by the sources that reach this sink.
    sources: Vec<Arc<AtomicU64>>,
    /// Readings the sink has finished with (written).
    written: Arc<AtomicU64>,
    /// Its input channel: delivered and dropped readings, and `when_full`.
    inlet: Arc<Inlet>,
    /// Set once the sink has failed and stopped.
    failed: AtomicBool,
}

impl SinkAccount {
    fn accepted(&self) -> u64 {
        self.sources
            .iter()
            .map(|sent| sent.load(Ordering::Relaxed))
            .sum()
    }

    fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }
}

impl Accounts {
    /// Logs, per sink, how many readings accepted for it were not written,
    /// and how many of those it missed earlier (dropped when full, or after it
    /// stopped), as one ERROR line each headed by `why`.
    pub fn report_loss(&self, why: &str) {
        for sink in self.0.iter() {
            // Accepted first: a reading counted written was counted accepted.
            let accepted = sink.accepted();
            let written = sink.written();
            let dropped = sink.inlet.dropped();
            let lost = accepted.saturating_sub(written);
            let earlier = if dropped > 0 {
                format!("{dropped} of them missed earlier, dropped when full or after it failed; ")
            } else {
                String::new()
            };
            tracing::error!(
                stage = sink.id,
                "{why}: sources accepted {accepted} readings, this sink wrote {written}: {lost} readings lost ({earlier}fewer if a processor dropped some on purpose)"
            );
        }
    }

    /// Logs the loss of every sink that failed, as a clean ending's summary.
    fn report_failed_sinks(&self) {
        for sink in self.0.iter().filter(|s| s.failed.load(Ordering::Relaxed)) {
            let accepted = sink.accepted();
            let written = sink.written();
            tracing::error!(
                stage = sink.id,
                "this sink failed: sources accepted {accepted} readings, it wrote {written}: {} readings lost; the other sinks wrote everything",
                accepted.saturating_sub(written)
            );
        }
    }
}

/// How often the monitor looks at drop counts.
const MONITOR_TICK: Duration = Duration::from_secs(1);
/// At most one drop warning per sink this often.
const DROP_LOG_EVERY: Duration = Duration::from_secs(10);

/// Warns, at most once per [`DROP_LOG_EVERY`] per sink, of readings a sink
/// missed since the last warning: dropped as its input was full under
/// `when_full = "drop"`, or not delivered because it had failed.
async fn monitor_drops(accounts: Accounts) {
    let mut reported: Vec<(u64, Option<tokio::time::Instant>)> =
        accounts.0.iter().map(|_| (0, None)).collect();
    let mut ticker = tokio::time::interval(MONITOR_TICK);
    loop {
        ticker.tick().await;
        for (sink, (count, at)) in accounts.0.iter().zip(&mut reported) {
            let dropped = sink.inlet.dropped();
            let due = at.is_none_or(|at| at.elapsed() >= DROP_LOG_EVERY);
            if dropped == *count || !due {
                continue;
            }
            let why = if sink.failed.load(Ordering::Relaxed) {
                "not delivered: this sink has failed and is stopped"
            } else {
                "dropped: its input channel was full (when_full = \"drop\")"
            };
            let since = at.map_or_else(
                || "so far".to_string(),
                |at| format!("in the last {}s", at.elapsed().as_secs()),
            );
            tracing::warn!(
                stage = sink.id,
                "{} readings {since} {why}; {dropped} in all",
                dropped - *count
            );
            *count = dropped;
            *at = Some(tokio::time::Instant::now());
        }
    }
}

/// How a pipeline ended.
#[derive(Debug)]
pub enum Ending {
    /// Every stage finished and all that was accepted was handed to the sinks.
    Clean,
    /// A stage failed (a sink alone, or one that stopped the pipeline); the
    /// rest were drained.
    StageFailed,
    /// The stages were cut before they drained (`shutdown_timeout` passed,
    /// or a second signal came): what they lost is to be reported.
    Cut(Loss),
}

/// The loss of a pipeline whose stages were cut, not yet counted: count and
/// log it with [`report`](Self::report) once the runtime has shut down.
///
/// A sink's write on the blocking pool is not stopped by cutting the sink's
/// task: it finishes, lands more lines and counts them (see
/// `sink_api::DoneMarker`). Counted before that, the loss would include
/// readings that are in the file; counted after the runtime's shutdown (which
/// waits a while for the blocking pool), it is what the sinks lack.
#[must_use = "the loss is logged only by `report`"]
pub struct Loss {
    accounts: Accounts,
    why: String,
}

impl Loss {
    /// A loss for `accounts`, its log lines headed by `why`.
    pub fn new(accounts: Accounts, why: String) -> Self {
        Self { accounts, why }
    }

    /// Counts and logs the loss, one ERROR line per sink
    /// ([`Accounts::report_loss`]).
    pub fn report(self) {
        self.accounts.report_loss(&self.why);
    }
}

impl std::fmt::Debug for Loss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loss")
            .field("why", &self.why)
            .finish_non_exhaustive()
    }
}

/// A stage built but not yet wired.
enum Built {
    Source(Box<dyn sink_api::Source>),
    Processor(Box<dyn sink_api::Processor>),
    Sink(Box<dyn sink_api::Sink>),
}

impl Running {
    /// Builds every stage (binding sockets, opening files), wires them with
    /// bounded channels and starts them. A stage that cannot be built stops
    /// everything before any data flows.
    pub fn start(pipeline: Pipeline) -> Result<Self, PipelineErrors> {
        Self::start_observed(pipeline, &MetricsRegistry::new())
    }

    /// [`start`](Self::start), with every stage's metrics in `registry`.
    pub fn start_observed(
        pipeline: Pipeline,
        registry: &MetricsRegistry,
    ) -> Result<Self, PipelineErrors> {
        let mut built = Vec::new();
        let mut errors = Vec::new();
        for stage in &pipeline.stages {
            let cx = BuildContext::new(stage.id.clone());
            let result = match &stage.config {
                StageConfig::Source(config) => config.build(&cx).map(Built::Source),
                StageConfig::Processor(config) => config.build(&cx).map(Built::Processor),
                StageConfig::Sink(config) => config.build(&cx).map(Built::Sink),
            };
            match result {
                Ok(stage) => built.push(stage),
                Err(err) => errors.push(PipelineError {
                    file: pipeline.file.clone(),
                    stage: Some(format!("{}.{}", stage.kind.section(), stage.id)),
                    key: Some(err.key),
                    message: err.message,
                }),
            }
        }
        if !errors.is_empty() {
            return Err(PipelineErrors(errors));
        }

        // Every processor and sink gets one input channel; each upstream
        // stage's output holds a sender into it.
        let mut senders: HashMap<String, BatchSender> = HashMap::new();
        let mut fills = HashMap::new();
        let mut inputs: HashMap<String, Input> = HashMap::new();
        let mut inlets: HashMap<String, Arc<Inlet>> = HashMap::new();
        for stage in pipeline
            .stages
            .iter()
            .filter(|s| s.kind != StageKind::Source)
        {
            let (sender, input) = sink_api::channel(stage.capacity);
            fills.insert(stage.id.clone(), (sender.fill(), stage.capacity));
            let inlet = sender.inlet();
            inlet.set_when_full(stage.when_full);
            inlets.insert(stage.id.clone(), inlet);
            senders.insert(stage.id.clone(), sender);
            inputs.insert(stage.id.clone(), input);
        }
        // The stages that read each stage's output.
        let readers_of = |id: &String| {
            pipeline
                .stages
                .iter()
                .filter(|reader| reader.inputs.contains(id))
                .map(|reader| &reader.id)
                .collect::<Vec<_>>()
        };
        let graph: HashMap<String, (StageKind, Vec<String>)> = pipeline
            .stages
            .iter()
            .map(|stage| {
                let readers = readers_of(&stage.id).into_iter().cloned().collect();
                (stage.id.clone(), (stage.kind, readers))
            })
            .collect();
        let outputs: HashMap<String, Output> = pipeline
            .stages
            .iter()
            .map(|stage| {
                let targets = readers_of(&stage.id)
                    .into_iter()
                    .filter_map(|reader| senders.get(reader).cloned())
                    .collect();
                (stage.id.clone(), Output::new(targets))
            })
            .collect();
        // Only outputs hold senders now, so each input ends when its upstreams do.
        drop(senders);

        let readiness = Readiness::new();
        let mut running = Self {
            shutdown: ShutdownSignal::new(),
            tasks: JoinSet::new(),
            names: HashMap::new(),
            params: HashMap::new(),
            graph,
            stopped: HashSet::new(),
            accounts: Accounts(Arc::new([])),
            readiness: readiness.clone(),
            monitor: tokio::spawn(async {}),
            memory: MemoryBudget::new(pipeline.settings.memory_limit.0),
            downstream: Vec::new(),
        };
        let mut counters = Vec::new();
        let mut accepted: HashMap<String, Arc<AtomicU64>> = HashMap::new();
        let mut written: Vec<(String, Arc<AtomicU64>)> = Vec::new();
        let Pipeline { stages, .. } = pipeline;
        for (stage, built) in stages.into_iter().zip(built) {
            let initial: AnyConfig = match stage.config {
                StageConfig::Source(config) => Arc::from(config.into_any()),
                StageConfig::Processor(config) => Arc::from(config.into_any()),
                StageConfig::Sink(config) => Arc::from(config.into_any()),
            };
            let (cx, params) = Context::new(&stage.id, running.shutdown.clone(), initial);
            let cx = cx
                .with_memory(running.memory.clone())
                .with_readiness(readiness.clone())
                .with_metrics(registry.for_stage(&stage.id, &stage.type_name, stage.kind));
            running.params.insert(stage.id.clone(), params);
            let output = outputs.get(&stage.id).cloned().unwrap_or_default();
            let input = inputs.remove(&stage.id);
            counters.push(StageCounters {
                labels: StageCounters::labels(&stage.id, &stage.type_name, stage.kind),
                received: input
                    .as_ref()
                    .map_or_else(|| output.sent_counter(), Input::received_counter),
                sent: match (&built, &input) {
                    (Built::Sink(_), Some(input)) => input.handled_counter(),
                    _ => output.sent_counter(),
                },
                batches: match (&built, &input) {
                    (Built::Sink(_), Some(input)) => input.handled_batches_counter(),
                    _ => output.batches_counter(),
                },
                input: fills.remove(&stage.id),
                inlet: inlets.get(&stage.id).cloned(),
            });
            let id = stage.id.clone();
            let task = match (built, input) {
                (Built::Source(source), _) => {
                    accepted.insert(id.clone(), output.sent_counter());
                    running
                        .tasks
                        .spawn(async move { (id, source.run(output, cx).await) })
                }
                (Built::Processor(processor), Some(input)) => {
                    let task = running
                        .tasks
                        .spawn(async move { (id, processor.run(input, output, cx).await) });
                    running.downstream.push(task.clone());
                    task
                }
                (Built::Sink(sink), Some(input)) => {
                    written.push((id.clone(), input.handled_counter()));
                    let task = running
                        .tasks
                        .spawn(async move { (id, sink.run(input, cx).await) });
                    running.downstream.push(task.clone());
                    task
                }
                (_, None) => unreachable!("every processor and sink was given an input above"),
            };
            running.names.insert(task.id(), stage.id);
        }
        let accounts: Vec<SinkAccount> = written
            .into_iter()
            .map(|(id, written)| SinkAccount {
                sources: accepted
                    .iter()
                    .filter(|(source, _)| running.reaches(source, &id))
                    .map(|(_, sent)| Arc::clone(sent))
                    .collect(),
                inlet: inlets.remove(&id).unwrap_or_default(),
                written,
                failed: AtomicBool::new(false),
                id,
            })
            .collect();
        running.accounts = Accounts(accounts.into());
        running.monitor = tokio::spawn(monitor_drops(running.accounts.clone()));
        registry.register_collector(Box::new(StageCollector(counters)));
        registry.register_collector(Box::new(MemoryCollector(running.memory.clone())));
        Ok(running)
    }

    /// The pipeline's readiness: every stage sets it, the grpc source
    /// reports it on the gRPC health service.
    pub fn readiness(&self) -> &Readiness {
        &self.readiness
    }

    /// The accounts of what was accepted and written, to report a loss.
    pub fn accounts(&self) -> Accounts {
        self.accounts.clone()
    }

    /// Sets sink `id`'s `when_full`; says whether there is such a sink.
    pub fn set_when_full(&self, id: &str, when_full: WhenFull) -> bool {
        let sink = self.accounts.0.iter().find(|sink| sink.id == id);
        if let Some(sink) = sink {
            sink.inlet.set_when_full(when_full);
        }
        sink.is_some()
    }

    /// Whether data from stage `from` flows to stage `to`.
    fn reaches(&self, from: &str, to: &str) -> bool {
        let mut seen = HashSet::new();
        let mut next = vec![from];
        while let Some(id) = next.pop() {
            if id == to {
                return true;
            }
            if seen.insert(id)
                && let Some((_, readers)) = self.graph.get(id)
            {
                next.extend(readers.iter().map(String::as_str));
            }
        }
        false
    }

    /// Whether data from stage `from` still reaches a sink that runs.
    fn reaches_running_sink(&self, from: &str) -> bool {
        self.graph.iter().any(|(id, (kind, _))| {
            *kind == StageKind::Sink && !self.stopped.contains(id) && self.reaches(from, id)
        })
    }

    /// Hands stage `id` its new config, of the stage's own type, and waits
    /// until `deadline` for the stage to apply it. Says whether it did.
    pub async fn update(
        &self,
        id: &str,
        config: AnyConfig,
        deadline: tokio::time::Instant,
    ) -> bool {
        let Some(sender) = self.params.get(id) else {
            return false;
        };
        let version = sender.send(config);
        tokio::time::timeout_at(deadline, sender.applied(version))
            .await
            .is_ok()
    }

    /// Applies a new `settings.memory_limit`: lowered, it binds as what is
    /// held now is released.
    pub fn set_memory_limit(&self, bytes: u64) {
        self.memory.set_limit(bytes);
    }

    /// Waits until a stage fails in a way that stops the pipeline (`Some`,
    /// see the module's failure policy), or all stages end (`None`). A sink
    /// that fails alone is stopped, logged and counted here, and waiting goes on.
    pub async fn next_failure(&mut self) -> Option<String> {
        while let Some(joined) = self.tasks.join_next().await {
            let (id, failure) = match joined {
                Ok((id, Ok(()))) => (id, None),
                Ok((id, Err(err))) => (id, Some(format!("stage failed: {err}"))),
                Err(err) => {
                    let id = self
                        .names
                        .get(&err.id())
                        .cloned()
                        .unwrap_or_else(|| "(unknown)".into());
                    (id, Some(format!("stage panicked: {err}")))
                }
            };
            self.stopped.insert(id.clone());
            let Some(failure) = failure else { continue };
            if !self.contain(&id, &failure) {
                return Some(id);
            }
        }
        None
    }

    /// Logs the failure of stage `id` and says whether the rest of the
    /// pipeline can run on without it.
    fn contain(&mut self, id: &str, failure: &str) -> bool {
        let Some((kind, readers)) = self.graph.get(id) else {
            tracing::error!(stage = id, "{failure}");
            return false;
        };
        let cut_off = *kind == StageKind::Sink
            || (*kind != StageKind::Source && readers.iter().all(|r| self.stopped.contains(r)));
        if !cut_off {
            tracing::error!(stage = id, "{failure}");
            return false;
        }
        if let Some(sink) = self.accounts.0.iter().find(|sink| sink.id == id) {
            sink.failed.store(true, Ordering::Relaxed);
            let in_hand = sink.inlet.delivered().saturating_sub(sink.written());
            tracing::error!(
                stage = id,
                "{failure}; this sink is stopped: {in_hand} readings handed to it were not written, and what it misses from now on is counted; the other sinks run on (readiness: NOT_SERVING)"
            );
        } else {
            tracing::error!(
                stage = id,
                "{failure}; every stage it fed had stopped, so it stops too"
            );
        }
        self.readiness
            .set_not_ready(id, "failed and stopped; restart to recover it");
        let sources: Vec<&String> = self
            .graph
            .iter()
            .filter(|(_, (kind, _))| *kind == StageKind::Source)
            .map(|(id, _)| id)
            .collect();
        if let Some(source) = sources
            .into_iter()
            .find(|source| !self.reaches_running_sink(source))
        {
            tracing::error!(
                stage = id,
                "source `{source}` no longer reaches a running sink: the pipeline shuts down"
            );
            return false;
        }
        true
    }

    /// Whether a sink has failed and stopped.
    fn a_sink_failed(&self) -> bool {
        self.accounts
            .0
            .iter()
            .any(|sink| sink.failed.load(Ordering::Relaxed))
    }

    /// Starts shutdown and waits for every stage to drain, at most `timeout`.
    /// Sources stop accepting; each stage then ends as its input ends, so
    /// everything accepted flows down to the sinks before they close. Past
    /// `timeout` the processors and sinks are cut, and the loss is handed
    /// back to be reported once the runtime has shut down ([`Loss`]).
    pub async fn shut_down(mut self, timeout: Duration, already_failed: bool) -> Ending {
        self.shutdown.trigger();
        let mut failed = already_failed;
        let drained = tokio::time::timeout(timeout, async {
            while let Some(failure) = self.next_failure().await {
                tracing::error!(stage = failure, "stage failed during shutdown");
                failed = true;
            }
        })
        .await;
        self.monitor.abort();
        if drained.is_err() {
            let loss = Loss::new(
                self.accounts.clone(),
                format!(
                    "shutdown_timeout ({}) passed",
                    humantime::format_duration(timeout)
                ),
            );
            // What the cut stages held fails its acknowledgements; the
            // sources answer the calls that waited for it (UNAVAILABLE, so
            // that clients retry) before the process exits.
            for stage in &self.downstream {
                stage.abort();
            }
            let _ = tokio::time::timeout(ANSWER_WAITING_CALLS, async {
                while self.tasks.join_next().await.is_some() {}
            })
            .await;
            return Ending::Cut(loss);
        }
        for sink in self.accounts.0.iter() {
            let dropped = sink.inlet.dropped();
            if dropped > 0 && !sink.failed.load(Ordering::Relaxed) {
                tracing::warn!(
                    stage = sink.id,
                    "{dropped} readings in all were dropped for this sink as its input was full (when_full = \"drop\")"
                );
            }
        }
        if self.a_sink_failed() {
            self.accounts.report_failed_sinks();
            return Ending::StageFailed;
        }
        if failed {
            Ending::StageFailed
        } else {
            Ending::Clean
        }
    }
}

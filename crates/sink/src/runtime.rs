//! Building a validated pipeline into running tasks, and shutting it down
//! without losing what it accepted.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sink_api::{
    AnyConfig, BatchSender, BuildContext, Context, Input, MemoryBudget, Output, ParamSender,
    ShutdownSignal, StageError, StageKind,
};
use tokio::task::JoinSet;

use sink_api::metrics::MetricsRegistry;

use crate::api::Readiness;
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
    accepted: Vec<(String, Arc<AtomicU64>)>,
    written: Vec<(String, Arc<AtomicU64>)>,
    /// `settings.memory_limit`, shared by every stage.
    memory: MemoryBudget,
    /// The processors and sinks, cut first when shutdown times out, so that
    /// the sources can still answer the calls that waited for them.
    downstream: Vec<tokio::task::AbortHandle>,
    /// Told when a stage stops before shutdown.
    readiness: Readiness,
}

/// How a pipeline ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ending {
    /// Every stage finished and all that was accepted was handed to the sinks.
    Clean,
    /// A stage failed; the rest were drained.
    StageFailed,
    /// `shutdown_timeout` passed first.
    TimedOut,
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
        Self::start_observed(pipeline, &MetricsRegistry::new(), Readiness::default())
    }

    /// [`start`](Self::start), with every stage's metrics in `registry` and
    /// a stage that stops before shutdown reported to `readiness`.
    pub fn start_observed(
        pipeline: Pipeline,
        registry: &MetricsRegistry,
        readiness: Readiness,
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
        for stage in pipeline
            .stages
            .iter()
            .filter(|s| s.kind != StageKind::Source)
        {
            let (sender, input) = sink_api::channel(stage.capacity);
            fills.insert(stage.id.clone(), (sender.fill(), stage.capacity));
            senders.insert(stage.id.clone(), sender);
            inputs.insert(stage.id.clone(), input);
        }
        let outputs: HashMap<String, Output> = pipeline
            .stages
            .iter()
            .map(|stage| {
                let targets = pipeline
                    .stages
                    .iter()
                    .filter(|reader| reader.inputs.contains(&stage.id))
                    .filter_map(|reader| senders.get(&reader.id).cloned())
                    .collect();
                (stage.id.clone(), Output::new(targets))
            })
            .collect();
        // Only outputs hold senders now, so each input ends when its upstreams do.
        drop(senders);

        let mut running = Self {
            shutdown: ShutdownSignal::new(),
            tasks: JoinSet::new(),
            names: HashMap::new(),
            params: HashMap::new(),
            accepted: Vec::new(),
            written: Vec::new(),
            memory: MemoryBudget::new(pipeline.settings.memory_limit.0),
            downstream: Vec::new(),
            readiness,
        };
        let mut counters = Vec::new();
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
            });
            let id = stage.id.clone();
            let task = match (built, input) {
                (Built::Source(source), _) => {
                    running.accepted.push((id.clone(), output.sent_counter()));
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
                    running.written.push((id.clone(), input.handled_counter()));
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
        registry.register_collector(Box::new(StageCollector(counters)));
        registry.register_collector(Box::new(MemoryCollector(running.memory.clone())));
        Ok(running)
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

    /// Waits until a stage ends with an error (`Some`), or all stages end (`None`).
    pub async fn next_failure(&mut self) -> Option<String> {
        while let Some(joined) = self.tasks.join_next().await {
            match joined {
                Ok((id, Ok(()))) => {
                    if !self.shutdown.is_triggered() {
                        self.readiness
                            .not_ready(&format!("stage:{id}"), format!("stage `{id}` has stopped"));
                    }
                }
                Ok((id, Err(err))) => {
                    tracing::error!(stage = id, "stage failed: {err}");
                    self.readiness.not_ready(
                        &format!("stage:{id}"),
                        format!("stage `{id}` failed: {err}"),
                    );
                    return Some(id);
                }
                Err(err) => {
                    let id = self
                        .names
                        .get(&err.id())
                        .cloned()
                        .unwrap_or_else(|| "(unknown)".into());
                    tracing::error!(stage = id, "stage panicked: {err}");
                    self.readiness
                        .not_ready(&format!("stage:{id}"), format!("stage `{id}` panicked"));
                    return Some(id);
                }
            }
        }
        None
    }

    /// Starts shutdown and waits for every stage to drain, at most `timeout`.
    /// Sources stop accepting; each stage then ends as its input ends, so
    /// everything accepted flows down to the sinks before they close.
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
        if drained.is_err() {
            let accepted: u64 = self
                .accepted
                .iter()
                .map(|(_, n)| n.load(Ordering::Relaxed))
                .sum();
            for (sink, written) in &self.written {
                let written = written.load(Ordering::Relaxed);
                tracing::error!(
                    stage = sink,
                    "shutdown_timeout ({}) passed: sources accepted {accepted} readings, this sink wrote {written}: {} readings lost (fewer if a processor dropped some on purpose)",
                    humantime::format_duration(timeout),
                    accepted.saturating_sub(written)
                );
            }
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
            return Ending::TimedOut;
        }
        if failed {
            Ending::StageFailed
        } else {
            Ending::Clean
        }
    }
}

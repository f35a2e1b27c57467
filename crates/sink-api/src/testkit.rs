//! A test kit for stage authors: run one stage in a unit test with in-memory
//! input and output, send it batches, hand it new parameters, shut it down, and
//! collect what came out. [`check_processor`] and [`check_sink`] are the
//! conformance checks every stage should pass.
//!
//! ```
//! use sink_api::testkit::{Harness, readings};
//! # #[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
//! # struct Pass;
//! # #[typetag::serde(name = "testkit_doc_pass")]
//! # impl sink_api::ProcessorConfig for Pass {
//! #     fn build(&self, _: &sink_api::BuildContext) -> Result<Box<dyn sink_api::Processor>, sink_api::ConfigError> {
//! #         Ok(Box::new(PassStage))
//! #     }
//! # }
//! # struct PassStage;
//! # #[async_trait::async_trait]
//! # impl sink_api::Processor for PassStage {
//! #     async fn run(self: Box<Self>, mut input: sink_api::Input, output: sink_api::Output, _: sink_api::Context) -> Result<(), sink_api::StageError> {
//! #         while let Some(b) = input.recv().await { output.send(b).await?; }
//! #         Ok(())
//! #     }
//! # }
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let mut stage = Harness::processor(Pass).unwrap();
//! stage.send(readings("t", 0..3)).await;
//! let out = stage.finish().await.unwrap();
//! assert_eq!(out.len(), 3);
//! # }
//! ```

use std::any::Any;
use std::collections::BTreeSet;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;

use crate::{
    Acknowledgement, Batch, BatchSender, BuildContext, ConfigError, Context, Delivery, Input,
    Output, ParamSender, ProcessorConfig, Reading, ShutdownSignal, SinkConfig, SourceConfig,
    StageError, Timestamp, Token,
};

/// Readings named `<prefix><i>` with value `i`, for `i` in `range`.
pub fn readings(prefix: &str, range: Range<i64>) -> Batch {
    let received_at = Timestamp::now();
    range
        .map(|i| Reading {
            sensor_name: format!("{prefix}{i}"),
            value: Some(i),
            created_at: Timestamp::new(1_795_860_000 + i, 0),
            received_at,
        })
        .collect()
}

/// One stage running on its own, fed and drained by the test.
pub struct Harness {
    input: Option<BatchSender>,
    output: Input,
    shutdown: ShutdownSignal,
    params: ParamSender,
    task: JoinHandle<Result<(), StageError>>,
}

impl Harness {
    /// Builds and starts the source `config`; its output is collected.
    pub fn source<C: SourceConfig + Clone>(config: C) -> Result<Self, ConfigError> {
        config.validate()?;
        let source = config.build(&BuildContext::new("test"))?;
        Ok(Self::spawn(config, false, |output, _input, cx| {
            tokio::spawn(async move { source.run(output, cx).await })
        }))
    }

    /// Builds and starts the processor `config`.
    pub fn processor<C: ProcessorConfig + Clone>(config: C) -> Result<Self, ConfigError> {
        config.validate()?;
        let processor = config.build(&BuildContext::new("test"))?;
        Ok(Self::spawn(config, true, |output, input, cx| {
            tokio::spawn(async move { processor.run(input, output, cx).await })
        }))
    }

    /// Builds and starts the sink `config`; check what it wrote where it writes.
    pub fn sink<C: SinkConfig + Clone>(config: C) -> Result<Self, ConfigError> {
        config.validate()?;
        let sink = config.build(&BuildContext::new("test"))?;
        Ok(Self::spawn(config, true, |_output, input, cx| {
            tokio::spawn(async move { sink.run(input, cx).await })
        }))
    }

    fn spawn<C: Any + Send + Sync>(
        config: C,
        has_input: bool,
        start: impl FnOnce(Output, Input, Context) -> JoinHandle<Result<(), StageError>>,
    ) -> Self {
        let (stage_input_sender, stage_input) = crate::channel(16);
        let (output_sender, output) = crate::channel(1024);
        let shutdown = ShutdownSignal::new();
        let (cx, params) = Context::new("test", shutdown.clone(), Arc::new(config));
        let task = start(Output::new(vec![output_sender]), stage_input, cx);
        Self {
            input: has_input.then_some(stage_input_sender),
            output,
            shutdown,
            params,
            task,
        }
    }

    /// Sends `batch` to the stage's input.
    ///
    /// # Panics
    ///
    /// For a source (it has no input), or when the stage has stopped.
    pub async fn send(&self, batch: impl Into<Batch>) {
        let input = self.input.as_ref().expect("a source has no input");
        let target = Output::new(vec![input.clone()]);
        target
            .send(batch)
            .await
            .expect("the stage stopped reading its input");
    }

    /// Hands the stage a new config, as a reload would, and returns its number
    /// for [`applied`](Self::applied).
    pub fn update<C: Any + Send + Sync>(&self, config: C) -> u64 {
        self.params.send(Arc::new(config))
    }

    /// Whether the stage applied config number `version` (asked for the next
    /// one, as the runtime's reload confirmation counts it) within `within`.
    pub async fn applied(&self, version: u64, within: Duration) -> bool {
        tokio::time::timeout(within, self.params.applied(version))
            .await
            .is_ok()
    }

    /// Starts shutdown, as SIGTERM would.
    pub fn shutdown(&self) {
        self.shutdown.trigger();
    }

    /// The readings of the next batch the stage sent, waiting at most
    /// `within`. Taken here, the batch counts as written.
    pub async fn next_batch(&mut self, within: Duration) -> Option<Vec<Reading>> {
        tokio::time::timeout(within, self.output.recv())
            .await
            .ok()
            .flatten()
            .map(Batch::into_readings)
    }

    /// Starts shutdown, closes the input (as the runtime does once the sources
    /// have stopped), waits for the stage to end and returns every reading it
    /// sent that was not taken with [`next_batch`](Self::next_batch).
    pub async fn finish(self) -> Result<Vec<Reading>, StageError> {
        let batches = self.finish_batches().await?;
        Ok(batches.into_iter().flat_map(Batch::into_readings).collect())
    }

    /// As [`finish`](Self::finish), but the batches whole, tokens and all,
    /// still unfinished: the caller finishes or drops each.
    async fn finish_batches(mut self) -> Result<Vec<Batch>, StageError> {
        self.shutdown.trigger();
        drop(self.input.take());
        // Drain while the stage ends: one that sends more than the output
        // channel holds must not wait for room that never comes.
        let mut out = Vec::new();
        let ended = loop {
            tokio::select! {
                ended = &mut self.task => break ended,
                Some(batch) = self.output.recv() => out.push(batch.owned()),
            }
        };
        ended.map_err(|err| format!("stage panicked: {err}"))??;
        while let Ok(batch) = self.output.try_recv() {
            out.push(batch.owned());
        }
        // What was taken is in `out`, which answers for it now.
        self.output.forget_taken();
        Ok(out)
    }
}

/// Conformance check for a processor: across batches, a reload mid-stream
/// and a shutdown, every reading that `keeps` selects comes out exactly once,
/// none other does, and nothing is left behind; every reading comes out in a
/// batch that carries the [`Token`] of the batch it went in with (so
/// acknowledgements follow it), and every token resolves as written once the
/// output is; and if the type declares live keys, the stage confirms the
/// reload (by asking for its next config).
pub async fn check_processor<C: ProcessorConfig + Clone>(
    config: C,
    keeps: impl Fn(&Reading) -> bool,
) {
    let sent = readings("conformance-", 0..1000);
    let expected: BTreeSet<String> = sent
        .iter()
        .filter(|r| keeps(r))
        .map(|r| r.sensor_name.clone())
        .collect();
    let stage = Harness::processor(config.clone()).expect("config builds");
    let name = config.typetag_name();
    let calls = send_reloading_midway(&stage, &sent, config, name).await;
    let out = stage.finish_batches().await.expect("stage ends cleanly");
    for batch in &out {
        for reading in batch.iter() {
            let ((token, _), _) = calls
                .iter()
                .find(|((_, names), _)| names.contains(&reading.sensor_name))
                .expect("a reading that was sent");
            assert!(
                batch.tokens().iter().any(|carried| carried.same_as(token)),
                "`{name}` lost the acknowledgement token of `{}`'s batch: forward, merge \
                 and split batches with `Output::send`, `Batch::append` and `split_off`, \
                 or `carry_tokens_of` the batch a new one is built from",
                reading.sensor_name
            );
        }
    }
    let out: Vec<Reading> = out.into_iter().flat_map(Batch::into_readings).collect();
    expect_written(calls, name).await;
    let names: Vec<String> = out.into_iter().map(|r| r.sensor_name).collect();
    let unique: BTreeSet<String> = names.iter().cloned().collect();
    assert_eq!(unique.len(), names.len(), "a reading came out twice");
    assert_eq!(unique, expected, "readings lost or let through wrongly");
}

/// Conformance check for a sink: 1000 readings in batches, a reload
/// mid-stream, then shutdown; `written` must then list each reading's sensor
/// name exactly once, every batch's [`Token`] must have resolved as written,
/// and if the type declares live keys, the stage must have confirmed the
/// reload.
pub async fn check_sink<C: SinkConfig + Clone>(config: C, written: impl Fn() -> Vec<String>) {
    let sent = readings("conformance-", 0..1000);
    let stage = Harness::sink(config.clone()).expect("config builds");
    let name = config.typetag_name();
    let calls = send_reloading_midway(&stage, &sent, config, name).await;
    stage.finish().await.expect("stage ends cleanly");
    expect_written(calls, name).await;
    let mut names = written();
    names.sort();
    let mut expected: Vec<String> = sent.into_iter().map(|r| r.sensor_name).collect();
    expected.sort();
    assert_eq!(names, expected, "the sink lost or repeated readings");
}

/// One batch the checks sent, as a call of a source would: its token, the
/// names of its readings, and its acknowledgement.
type Call = (Token, BTreeSet<String>);

/// Sends `readings` in batches, handing the stage `config` again halfway, and
/// checks that a type with live keys confirms it while batches still flow (a
/// stage that checks its parameters once per batch confirms on the next).
/// Each batch carries a token of its own, as a source's call would.
async fn send_reloading_midway<C: Any + Send + Sync>(
    stage: &Harness,
    readings: &[Reading],
    config: C,
    type_name: &str,
) -> Vec<(Call, Acknowledgement)> {
    let chunks: Vec<&[Reading]> = readings.chunks(97).collect();
    let (first, second) = chunks.split_at(chunks.len() / 2);
    let mut calls = Vec::new();
    let send = |chunk: &[Reading]| {
        let (token, acknowledgement) = Token::acknowledged(None);
        let mut batch = Batch::from(chunk.to_vec());
        batch.attach(token.clone());
        let names = chunk.iter().map(|r| r.sensor_name.clone()).collect();
        (batch, ((token, names), acknowledgement))
    };
    for chunk in first {
        let (batch, call) = send(chunk);
        stage.send(batch).await;
        calls.push(call);
    }
    let version = stage.update(config);
    for chunk in second {
        let (batch, call) = send(chunk);
        stage.send(batch).await;
        calls.push(call);
    }
    let declares_live_keys = crate::registered_stages()
        .find(|info| info.name == type_name)
        .is_some_and(|info| info.keys().iter().any(|key| key.live));
    if declares_live_keys {
        assert!(
            stage.applied(version, Duration::from_secs(10)).await,
            "`{type_name}` declares live keys but never took its new config \
             (call `cx.params().changed()` or `try_changed()`)"
        );
    }
    calls
}

/// Checks that every call's token resolved as written, now that the stage
/// and the test are done with every batch.
async fn expect_written(calls: Vec<(Call, Acknowledgement)>, type_name: &str) {
    for ((token, names), acknowledgement) in calls {
        drop(token);
        let first = names.first().cloned().unwrap_or_default();
        let outcome = tokio::time::timeout(Duration::from_secs(10), acknowledgement).await;
        assert_eq!(
            outcome,
            Ok(Delivery::Written),
            "`{type_name}`: the batch of `{first}` was not acknowledged as written \
             (a batch was dropped unwritten, kept after asking for more, or still held)"
        );
    }
}

#[cfg(test)]
mod tests {
    use async_trait::async_trait;
    use serde::{Deserialize, Serialize};

    use super::*;
    use crate::{Processor, StageError};

    /// Sends every reading as a batch of its own: more batches than the
    /// harness's output channel holds.
    #[derive(Debug, Clone, Serialize, Deserialize)]
    struct Split;

    #[typetag::serde(name = "testkit_split")]
    impl ProcessorConfig for Split {
        fn build(&self, _: &BuildContext) -> Result<Box<dyn Processor>, ConfigError> {
            Ok(Box::new(SplitStage))
        }
    }

    struct SplitStage;

    #[async_trait]
    impl Processor for SplitStage {
        async fn run(
            self: Box<Self>,
            mut input: Input,
            output: Output,
            _: Context,
        ) -> Result<(), StageError> {
            while let Some(batch) = input.recv().await {
                for reading in batch {
                    output.send(vec![reading]).await?;
                }
            }
            Ok(())
        }
    }

    /// Declares a live key but never looks at its parameters.
    #[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
    struct Deaf {
        /// A key it claims to apply live.
        threshold: i64,
    }

    #[typetag::serde(name = "testkit_deaf")]
    impl ProcessorConfig for Deaf {
        fn build(&self, _: &BuildContext) -> Result<Box<dyn Processor>, ConfigError> {
            Ok(Box::new(SplitStage))
        }
    }

    crate::register_stage!(processor "testkit_deaf" => Deaf);

    #[tokio::test(start_paused = true)]
    #[should_panic(expected = "never took its new config")]
    async fn conformance_catches_a_stage_that_ignores_its_live_keys() {
        check_processor(Deaf { threshold: 1 }, |_| true).await;
    }

    /// Rebuilds each batch from its readings, dropping the tokens.
    #[derive(Debug, Clone, Serialize, Deserialize)]
    struct Rebuild;

    #[typetag::serde(name = "testkit_rebuild")]
    impl ProcessorConfig for Rebuild {
        fn build(&self, _: &BuildContext) -> Result<Box<dyn Processor>, ConfigError> {
            Ok(Box::new(RebuildStage))
        }
    }

    struct RebuildStage;

    #[async_trait]
    impl Processor for RebuildStage {
        async fn run(
            self: Box<Self>,
            mut input: Input,
            output: Output,
            _: Context,
        ) -> Result<(), StageError> {
            while let Some(batch) = input.recv().await {
                let rebuilt: Vec<Reading> = batch.into_iter().collect();
                output.send(rebuilt).await?;
            }
            Ok(())
        }
    }

    #[tokio::test]
    #[should_panic(expected = "lost the acknowledgement token")]
    async fn conformance_catches_a_stage_that_loses_tokens() {
        check_processor(Rebuild, |_| true).await;
    }

    /// Splits every batch in two, through the API: conforms.
    #[derive(Debug, Clone, Serialize, Deserialize)]
    struct Halve;

    #[typetag::serde(name = "testkit_halve")]
    impl ProcessorConfig for Halve {
        fn build(&self, _: &BuildContext) -> Result<Box<dyn Processor>, ConfigError> {
            Ok(Box::new(HalveStage))
        }
    }

    struct HalveStage;

    #[async_trait]
    impl Processor for HalveStage {
        async fn run(
            self: Box<Self>,
            mut input: Input,
            output: Output,
            _: Context,
        ) -> Result<(), StageError> {
            while let Some(mut batch) = input.recv().await {
                let tail = batch.split_off(batch.len() / 2);
                output.send(batch).await?;
                output.send(tail).await?;
            }
            Ok(())
        }
    }

    #[tokio::test]
    async fn conformance_passes_a_stage_that_splits_through_the_api() {
        check_processor(Halve, |_| true).await;
    }

    #[tokio::test]
    async fn finish_collects_more_batches_than_the_output_holds() {
        let stage = Harness::processor(Split).expect("builds");
        stage.send(readings("s", 0..3000)).await;
        assert_eq!(stage.finish().await.expect("ends").len(), 3000);
    }
}

//! A test kit for stage authors: run one stage in a unit test with in-memory
//! input and output, send it batches, hand it new parameters, shut it down, and
//! collect what came out. The conformance checks every stage should pass take
//! the property they verify, what must come out of what went in:
//!
//! - a processor: [`check_processor_maps`] (each reading comes out changed as
//!   the test says, or dropped), [`check_processor`] (each reading that passes
//!   comes out, by name), or [`check_processor_with`] (any property of all
//!   that came out);
//! - a sink: [`check_sink_with`] (what it wrote, read back however the test
//!   likes: rows, a count, a sum) or [`check_sink`] (the names it wrote).
//!
//! ```
//! use sink_api::testkit::{Harness, readings};
//! # #[derive(Debug, Clone, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
//! # struct Pass;
//! # #[sink_api::stage(name = "testkit_doc_pass")]
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
use std::fmt::Debug;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;

use crate::{
    Acknowledgement, Batch, BatchSender, BuildContext, ConfigError, ConfigType, Context, Delivery,
    Input, Labels, Output, ParamSender, ProcessorConfig, Reading, ShutdownSignal, SinkConfig,
    SourceConfig, StageError, StageKind, Timestamp, Token, Value,
};

/// A batch of readings made up for a test: for each `i` in `range`, the
/// reading named `<prefix><i>` with value `i`, created `i` seconds after
/// 2026-11-28T10:00:00Z (Unix time 1 795 860 000), all received now (one
/// `received_at` for the whole batch).
///
/// ```
/// use sink_api::testkit::readings;
///
/// let batch = readings("t", 5..7);
/// assert_eq!(batch.len(), 2);
/// assert_eq!(batch[0].sensor_name, "t5");
/// assert_eq!(batch[0].value, Some(5.into()));
/// assert_eq!(batch[1].created_at.unwrap().to_string(), "2026-11-28T10:00:06Z");
/// assert_eq!(batch[0].received_at, batch[1].received_at);
/// ```
pub fn readings(prefix: &str, range: Range<i64>) -> Batch {
    let received_at = Timestamp::now();
    range
        .map(|i| Reading {
            sensor_name: format!("{prefix}{i}").into(),
            labels: Labels::new(),
            value: Some(Value::Int(i)),
            created_at: Timestamp::new(1_795_860_000 + i, 0),
            received_at,
        })
        .collect()
}

/// As [`readings`], but of every kind a reading can be: by `i % 4`, an
/// integer `i`, the float `i + 0.25`, no value, or the float `-i * 1e-3`;
/// and readings with an even `i` carry the labels `site` (`north` or
/// `south`, by `i % 4`) and `unit = C`.
///
/// ```
/// use sink_api::Value;
/// use sink_api::testkit::mixed_readings;
///
/// let batch = mixed_readings("t", 0..4);
/// assert_eq!(batch[0].value, Some(Value::Int(0)));
/// assert_eq!(batch[1].value, Some(Value::Float(1.25)));
/// assert_eq!(batch[2].value, None);
/// assert_eq!(batch[2].labels.get("site"), Some("south"));
/// assert!(batch[3].labels.is_empty());
/// ```
pub fn mixed_readings(prefix: &str, range: Range<i64>) -> Batch {
    let mut batch = readings(prefix, range);
    for reading in batch.iter_mut() {
        let i = reading.value.and_then(Value::as_i64).unwrap_or_default();
        reading.value = match i % 4 {
            0 => Some(Value::Int(i)),
            1 => Some(Value::Float(i as f64 + 0.25)),
            2 => None,
            _ => Some(Value::Float(-(i as f64) * 1e-3)),
        };
        if i % 2 == 0 {
            let site = if i % 4 == 0 { "north" } else { "south" };
            reading.labels = Labels::from_iter([("site", site), ("unit", "C")]);
        }
    }
    batch
}

/// One stage running on its own, fed and drained by the test.
pub struct Harness {
    input: Option<BatchSender>,
    output: Input,
    shutdown: ShutdownSignal,
    params: ParamSender,
    /// The stage's config type, the only type [`update`](Self::update) takes.
    config_type: ConfigType,
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
            config_type: ConfigType::of::<C>(),
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
    ///
    /// # Panics
    ///
    /// When `C` is not the type the stage was built from: a reload never hands
    /// a stage another type.
    #[track_caller]
    pub fn update<C: Any + Send + Sync>(&self, config: C) -> u64 {
        let given = ConfigType::of::<C>();
        assert!(
            given == self.config_type,
            "update with a `{}`, but the stage was built from a `{}`",
            given.name,
            self.config_type.name
        );
        self.params.send(Arc::new(config))
    }

    /// Whether the stage applied config number `version` within `within`, as
    /// the runtime's reload confirmation counts it: a stage that takes its
    /// parameters with `try_changed()` confirms as it takes them (with the
    /// next batch), one waiting on `changed()` once it asks for the next.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use sink_api::testkit::{Harness, readings};
    /// # #[derive(Debug, Clone, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
    /// # struct Scale { factor: i64 }
    /// # #[sink_api::stage(name = "applied_doc_scale")]
    /// # impl sink_api::ProcessorConfig for Scale {
    /// #     fn build(&self, _: &sink_api::BuildContext) -> Result<Box<dyn sink_api::Processor>, sink_api::ConfigError> {
    /// #         Ok(sink_api::map_processor(self))
    /// #     }
    /// # }
    /// # impl sink_api::MapReadings for Scale {
    /// #     fn map_reading(&self, r: &mut sink_api::Reading) -> bool {
    /// #         r.value = r.value.map(|v| v.map(|i| i * self.factor, |f| f * self.factor as f64));
    /// #         true
    /// #     }
    /// # }
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// const WAIT: Duration = Duration::from_secs(5);
    /// let mut stage = Harness::processor(Scale { factor: 1 }).unwrap();
    /// let version = stage.update(Scale { factor: 10 });
    /// stage.send(readings("t", 1..2)).await;
    /// assert_eq!(stage.next_batch(WAIT).await.unwrap()[0].value, Some(10.into()));
    /// assert!(stage.applied(version, WAIT).await);
    /// # }
    /// ```
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

/// The readings the conformance checks send unless given others:
/// [`mixed_readings`]`("conformance-", 0..1000)`, that is 1000 readings named
/// `conformance-0` to `conformance-999`, of every kind a reading can be
/// (integers, floats, no value; half of them with labels `site` and `unit`),
/// created 0 to 999 seconds after 2026-11-28T10:00:00Z. They are sent in
/// batches of 97.
///
/// A stage that selects readings (by name, by value) may keep or drop all of
/// these: a filter whose `sensors = ["sensor-*"]` matches none of them drops
/// everything, and one that keeps everything passes a check that expected
/// it to keep everything. Give such a stage readings it must keep and readings
/// it must drop, with the `_on` form of each check
/// ([`check_processor_on`], [`check_processor_maps_on`],
/// [`check_processor_with_on`], [`check_sink_with_on`]).
pub fn conformance_readings() -> Batch {
    mixed_readings("conformance-", 0..1000)
}

/// Says, on stderr, when a check's selection kept all of the readings sent or
/// none of them: the check then cannot tell whether the stage selects at all.
fn note_if_uniform(kept: usize, sent: usize, check: &str) {
    if sent > 0 && (kept == 0 || kept == sent) {
        let what = if kept == 0 { "none" } else { "every one" };
        eprintln!(
            "note: {check}: the expected output keeps {what} of the {sent} readings sent, so this \
             check cannot tell whether the stage selects readings at all; give it readings it must \
             keep and readings it must drop with {check}_on (see testkit::conformance_readings)"
        );
    }
}

/// Conformance check for a processor, given the property it must have: the
/// stage is fed [`mixed_readings`]`("conformance-", 0..1000)` in batches (each
/// carrying a [`Token`], as a source's call would), handed its config again
/// midway as a reload would, and shut down; then `observed` of every reading
/// it sent must equal `expected` of every reading it was sent. It also checks
/// that the type is registered under one name; that a type with live keys
/// confirms the reload (takes its new config); that every batch out carries
/// the tokens of the batches its readings came in (traced by sensor name,
/// where the stage keeps names), so acknowledgements follow the readings; and
/// that every token resolves as written once the output is.
///
/// ```
/// # use sink_api::{MapReadings, Reading};
/// # #[derive(Debug, Clone, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
/// # struct Total {}
/// # #[sink_api::stage(name = "check_doc_total")]
/// # impl sink_api::ProcessorConfig for Total {
/// #     fn build(&self, _: &sink_api::BuildContext) -> Result<Box<dyn sink_api::Processor>, sink_api::ConfigError> {
/// #         Ok(sink_api::map_processor(self))
/// #     }
/// # }
/// # impl MapReadings for Total {
/// #     fn map_reading(&self, _: &mut Reading) -> bool { true }
/// # }
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// use sink_api::testkit::check_processor_with;
///
/// // Whatever it does to batches, the values must add up to the same.
/// let sum = |readings: &[Reading]| readings.iter().filter_map(|r| r.value).map(|v| v.as_f64()).sum::<f64>();
/// check_processor_with(Total {}, sum, sum).await;
/// # }
/// ```
pub async fn check_processor_with<C, T>(
    config: C,
    expected: impl FnOnce(&[Reading]) -> T,
    observed: impl FnOnce(&[Reading]) -> T,
) where
    C: ProcessorConfig + Clone,
    T: PartialEq + Debug,
{
    check_processor_with_on(config, conformance_readings(), expected, observed).await;
}

/// [`check_processor_with`] on readings of your own instead of
/// [`conformance_readings`] (sent in batches of 97, a reload midway).
pub async fn check_processor_with_on<C, T>(
    config: C,
    sent: impl Into<Batch>,
    expected: impl FnOnce(&[Reading]) -> T,
    observed: impl FnOnce(&[Reading]) -> T,
) where
    C: ProcessorConfig + Clone,
    T: PartialEq + Debug,
{
    let name = config.typetag_name();
    assert_registered::<C>(StageKind::Processor, name);
    let sent: Batch = sent.into();
    let stage = Harness::processor(config.clone()).expect("config builds");
    let calls = send_reloading_midway(&stage, &sent, config, name).await;
    let out = stage.finish_batches().await.expect("stage ends cleanly");
    expect_tokens_carried(&out, &calls, name);
    let out: Vec<Reading> = out.into_iter().flat_map(Batch::into_readings).collect();
    expect_written(calls, name).await;
    let (expected, observed) = (expected(&sent), observed(&out));
    assert!(
        observed == expected,
        "what came out is not what should have\n  came out: {observed:?}\n  expected: {expected:?}"
    );
}

/// Conformance check for a processor that changes or drops each reading on
/// its own (see [`check_processor_with`] for the run): each reading `r` sent
/// must come out exactly once as `map(r)`, compared whole, or not at all
/// when `map(r)` is `None`; in any order, and nothing else may.
///
/// ```
/// # use sink_api::{MapReadings, Reading};
/// # #[derive(Debug, Clone, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
/// # struct Negate {}
/// # #[sink_api::stage(name = "check_doc_negate")]
/// # impl sink_api::ProcessorConfig for Negate {
/// #     fn build(&self, _: &sink_api::BuildContext) -> Result<Box<dyn sink_api::Processor>, sink_api::ConfigError> {
/// #         Ok(sink_api::map_processor(self))
/// #     }
/// # }
/// # impl MapReadings for Negate {
/// #     fn map_reading(&self, r: &mut Reading) -> bool {
/// #         r.value = r.value.map(|v| v.map(|i| -i, |f| -f));
/// #         r.value.is_some_and(|v| v != 0.into())
/// #     }
/// # }
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// use sink_api::testkit::check_processor_maps;
///
/// check_processor_maps(Negate {}, |reading| {
///     let value = reading.value?.map(|i| -i, |f| -f);
///     (value != 0.into()).then(|| sink_api::Reading { value: Some(value), ..reading.clone() })
/// })
/// .await;
/// # }
/// ```
pub async fn check_processor_maps<C: ProcessorConfig + Clone>(
    config: C,
    map: impl Fn(&Reading) -> Option<Reading>,
) {
    check_processor_maps_on(config, conformance_readings(), map).await;
}

/// [`check_processor_maps`] on readings of your own.
pub async fn check_processor_maps_on<C: ProcessorConfig + Clone>(
    config: C,
    sent: impl Into<Batch>,
    map: impl Fn(&Reading) -> Option<Reading>,
) {
    let expected = |sent: &[Reading]| {
        let kept: Vec<Reading> = sent.iter().filter_map(&map).collect();
        note_if_uniform(kept.len(), sent.len(), "check_processor_maps");
        sorted(kept)
    };
    check_processor_with_on(config, sent, expected, |out| sorted(out.to_vec())).await;
}

/// Conformance check for a processor that drops readings but changes none
/// (see [`check_processor_with`] for the run): every reading that `keeps`
/// selects must come out exactly once, and no other, compared by sensor name.
pub async fn check_processor<C: ProcessorConfig + Clone>(
    config: C,
    keeps: impl Fn(&Reading) -> bool,
) {
    check_processor_on(config, conformance_readings(), keeps).await;
}

/// [`check_processor`] on readings of your own: give it readings the stage
/// must keep and readings it must drop.
///
/// ```no_run
/// # async fn demo(config: impl sink_api::ProcessorConfig + Clone) {
/// use sink_api::testkit::{check_processor_on, readings};
///
/// // A filter of `sensors = ["keep-*"]`: half of these must go.
/// let mut sent = readings("keep-", 0..500);
/// sent.append(readings("drop-", 0..500));
/// check_processor_on(config, sent, |r| r.sensor_name.starts_with("keep-")).await;
/// # }
/// ```
pub async fn check_processor_on<C: ProcessorConfig + Clone>(
    config: C,
    sent: impl Into<Batch>,
    keeps: impl Fn(&Reading) -> bool,
) {
    let names = |readings: &mut dyn Iterator<Item = &Reading>| -> Vec<String> {
        let mut names: Vec<String> = readings.map(|r| r.sensor_name.to_string()).collect();
        names.sort();
        names
    };
    let expected = |sent: &[Reading]| {
        let kept = names(&mut sent.iter().filter(|r| keeps(r)));
        note_if_uniform(kept.len(), sent.len(), "check_processor");
        kept
    };
    check_processor_with_on(config, sent, expected, |out| names(&mut out.iter())).await;
}

/// Conformance check for a sink, given what it must have written: the stage
/// is fed [`mixed_readings`]`("conformance-", 0..1000)` in batches, handed its config
/// again midway as a reload would, and shut down; then what `written` reads
/// back from where the sink writes must equal `expected` of every reading
/// sent. It also checks that the type is registered under one name, that a
/// type with live keys confirms the reload, and that every batch's [`Token`]
/// resolved as written.
///
/// ```no_run
/// # async fn demo(config: impl sink_api::SinkConfig + Clone, count_in_file: impl FnOnce() -> usize) {
/// use sink_api::testkit::check_sink_with;
///
/// // A sink that only counts: the count it wrote must be the number sent.
/// check_sink_with(config, |sent| sent.len(), count_in_file).await;
/// # }
/// ```
pub async fn check_sink_with<C, T>(
    config: C,
    expected: impl FnOnce(&[Reading]) -> T,
    written: impl FnOnce() -> T,
) where
    C: SinkConfig + Clone,
    T: PartialEq + Debug,
{
    check_sink_with_on(config, conformance_readings(), expected, written).await;
}

/// [`check_sink_with`] on readings of your own (readings without a value or
/// a `created_at`, names that need escaping, whatever the sink must handle).
pub async fn check_sink_with_on<C, T>(
    config: C,
    sent: impl Into<Batch>,
    expected: impl FnOnce(&[Reading]) -> T,
    written: impl FnOnce() -> T,
) where
    C: SinkConfig + Clone,
    T: PartialEq + Debug,
{
    let name = config.typetag_name();
    assert_registered::<C>(StageKind::Sink, name);
    let sent: Batch = sent.into();
    let stage = Harness::sink(config.clone()).expect("config builds");
    let calls = send_reloading_midway(&stage, &sent, config, name).await;
    stage.finish().await.expect("stage ends cleanly");
    expect_written(calls, name).await;
    let (expected, written) = (expected(&sent), written());
    assert!(
        written == expected,
        "the sink did not write what it should have\n   written: {written:?}\n  expected: {expected:?}"
    );
}

/// Conformance check for a sink that writes each reading's sensor name (see
/// [`check_sink_with`] for the run): `written` must list the name of every
/// reading sent exactly once, in any order.
pub async fn check_sink<C: SinkConfig + Clone>(config: C, written: impl Fn() -> Vec<String>) {
    let names = |sent: &[Reading]| {
        let mut names: Vec<String> = sent.iter().map(|r| r.sensor_name.to_string()).collect();
        names.sort();
        names
    };
    let written = || {
        let mut names = written();
        names.sort();
        names
    };
    check_sink_with(config, names, written).await;
}

/// Checks that each batch that came out carries the token of every batch its
/// readings went in with (found by sensor name; a reading renamed on the way
/// cannot be traced, but its batch must carry some token).
#[track_caller]
fn expect_tokens_carried(out: &[Batch], calls: &[(Call, Acknowledgement)], name: &str) {
    for batch in out.iter().filter(|batch| !batch.is_empty()) {
        assert!(
            !batch.tokens().is_empty(),
            "`{name}` lost the acknowledgement tokens of a batch: it sent readings without \
             the tokens of the batches they came in: forward, merge and split batches with `Output::send`, \
             `Batch::append` and `split_off`, or `carry_tokens_of` the batch a new one is \
             built from"
        );
        for reading in batch.iter() {
            let Some(((token, _), _)) = calls
                .iter()
                .find(|((_, names), _)| names.contains(reading.sensor_name.as_str()))
            else {
                continue;
            };
            assert!(
                batch.tokens().iter().any(|carried| carried.same_as(token)),
                "`{name}` lost the acknowledgement token of `{}`'s batch: forward, merge \
                 and split batches with `Output::send`, `Batch::append` and `split_off`, \
                 or `carry_tokens_of` the batch a new one is built from",
                reading.sensor_name
            );
        }
    }
}

/// `readings` in a fixed order, for comparing two collections whatever order
/// they came in.
fn sorted(mut readings: Vec<Reading>) -> Vec<Reading> {
    readings.sort_by(|a, b| {
        (&a.sensor_name, a.value, a.created_at, a.received_at).cmp(&(
            &b.sensor_name,
            b.value,
            b.created_at,
            b.received_at,
        ))
    });
    readings
}

/// Fails the test unless the config type `C`, known to typetag as `name`, is
/// in the catalogue under the same name: what the runtime checks at startup,
/// here for the one type under test.
#[track_caller]
fn assert_registered<C: Any>(kind: StageKind, name: &str) {
    let config = ConfigType::of::<C>();
    let listed = crate::registered_stages().find(|info| info.kind == kind && info.name == name);
    match listed.map(|info| (info.config_type)()) {
        Some(listed) if listed == config => {}
        Some(listed) => panic!(
            "{kind} `{name}` is `{}` for typetag but `{}` in the catalogue (register_stage!): \
             register each type once, with #[sink_api::stage(name = \"...\")]",
            config.name, listed.name
        ),
        None => panic!(
            "`{}` is registered with typetag as {kind} `{name}` but is not in the catalogue \
             under that name, so `sink list` and `sink describe` miss it: register it with \
             #[sink_api::stage(name = \"{name}\")] instead of #[typetag::serde]",
            config.name
        ),
    }
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
        let names = chunk.iter().map(|r| r.sensor_name.to_string()).collect();
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
    use crate::{MapReadings, Processor, StageError};

    /// Sends every reading as a batch of its own: more batches than the
    /// harness's output channel holds.
    #[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
    struct Split;

    #[crate::stage(name = "testkit_split")]
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

    #[crate::stage(name = "testkit_deaf")]
    impl ProcessorConfig for Deaf {
        fn build(&self, _: &BuildContext) -> Result<Box<dyn Processor>, ConfigError> {
            Ok(Box::new(SplitStage))
        }
    }

    /// Multiplies each value by `factor`, live.
    #[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
    struct Times {
        /// The factor.
        factor: i64,
    }

    #[crate::stage(name = "testkit_times")]
    impl ProcessorConfig for Times {
        fn build(&self, _: &BuildContext) -> Result<Box<dyn Processor>, ConfigError> {
            Ok(crate::map_processor(self))
        }
    }

    impl MapReadings for Times {
        fn map_reading(&self, reading: &mut Reading) -> bool {
            let factor = self.factor;
            reading.value = reading
                .value
                .map(|v| v.map(|i| i * factor, |f| f * factor as f64));
            true
        }
    }

    /// Registered twice by hand, under two names.
    #[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
    struct TwoNames {}

    #[typetag::serde(name = "testkit_tagged")]
    impl ProcessorConfig for TwoNames {
        fn build(&self, _: &BuildContext) -> Result<Box<dyn Processor>, ConfigError> {
            Ok(crate::map_processor(&Times { factor: 1 }))
        }
    }

    crate::register_stage!(processor "testkit_listed" => TwoNames);

    /// Asks for its parameters as a type that is not its config.
    #[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
    struct Confused {}

    #[crate::stage(name = "testkit_confused")]
    impl ProcessorConfig for Confused {
        fn build(&self, _: &BuildContext) -> Result<Box<dyn Processor>, ConfigError> {
            Ok(Box::new(ConfusedStage))
        }
    }

    struct ConfusedStage;

    #[async_trait]
    impl Processor for ConfusedStage {
        async fn run(self: Box<Self>, _: Input, _: Output, cx: Context) -> Result<(), StageError> {
            let _ = cx.params::<Times>();
            Ok(())
        }
    }

    #[tokio::test(start_paused = true)]
    #[should_panic(expected = "never took its new config")]
    async fn conformance_catches_a_stage_that_ignores_its_live_keys() {
        check_processor(Deaf { threshold: 1 }, |_| true).await;
    }

    /// Rebuilds each batch from its readings, dropping the tokens.
    #[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
    struct Rebuild;

    #[crate::stage(name = "testkit_rebuild")]
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
    #[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
    struct Halve;

    #[crate::stage(name = "testkit_halve")]
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
    #[should_panic(expected = "typetag as processor `testkit_tagged` but is not in the catalogue")]
    async fn conformance_catches_a_type_with_two_names() {
        check_processor(TwoNames {}, |_| true).await;
    }

    #[tokio::test]
    async fn asking_for_another_type_s_params_fails_the_stage_naming_both() {
        let stage = Harness::processor(Confused {}).expect("builds");
        let err = stage.finish().await.expect_err("the stage panicked");
        let err = err.to_string();
        assert!(
            err.contains("as `sink_api::testkit::tests::Times`")
                && err.contains("`sink_api::testkit::tests::Confused`"),
            "{err}"
        );
    }

    #[tokio::test]
    #[should_panic(expected = "update with a `sink_api::testkit::tests::Deaf`")]
    async fn an_update_of_another_type_is_refused() {
        let stage = Harness::processor(Times { factor: 2 }).expect("builds");
        stage.update(Deaf { threshold: 1 });
    }

    #[tokio::test]
    async fn a_transform_conforms_and_its_reload_shows_as_applied_with_its_batch() {
        check_processor_maps(Times { factor: 3 }, |r| {
            Some(Reading {
                value: r.value.map(|v| v.map(|i| i * 3, |f| f * 3.0)),
                ..r.clone()
            })
        })
        .await;

        // The natural test: update, send, read, and the update is applied.
        const WAIT: Duration = Duration::from_secs(5);
        let mut stage = Harness::processor(Times { factor: 1 }).expect("builds");
        let version = stage.update(Times { factor: 10 });
        stage.send(readings("t", 2..3)).await;
        let out = stage.next_batch(WAIT).await.expect("a batch");
        assert_eq!(out[0].value, Some(Value::Int(20)));
        assert!(stage.applied(version, Duration::ZERO).await);
    }

    #[tokio::test]
    #[should_panic(expected = "what came out is not what should have")]
    async fn a_transform_check_compares_values() {
        check_processor_maps(Times { factor: 3 }, |r| Some(r.clone())).await;
    }

    #[tokio::test]
    #[should_panic(expected = "what came out is not what should have")]
    async fn own_readings_catch_a_filter_that_drops_nothing() {
        // `Times` keeps every reading: given readings it should drop, the
        // check fails, where on the conformance readings alone a `keeps`
        // that matches them all would pass.
        let mut sent = readings("keep-", 0..50);
        sent.append(readings("drop-", 0..50));
        check_processor_on(Times { factor: 1 }, sent, |r| {
            r.sensor_name.starts_with("keep-")
        })
        .await;
    }

    #[tokio::test]
    async fn own_readings_are_the_ones_sent() {
        let sent = readings("mine-", 0..10);
        check_processor_with_on(
            Times { factor: 1 },
            sent,
            |sent| sorted(sent.to_vec()),
            |out| {
                assert!(out.iter().all(|r| r.sensor_name.starts_with("mine-")));
                sorted(out.to_vec())
            },
        )
        .await;
        assert_eq!(conformance_readings().len(), 1000);
        assert_eq!(conformance_readings()[999].sensor_name, "conformance-999");
    }

    #[tokio::test]
    async fn finish_collects_more_batches_than_the_output_holds() {
        let stage = Harness::processor(Split).expect("builds");
        stage.send(readings("s", 0..3000)).await;
        assert_eq!(stage.finish().await.expect("ends").len(), 3000);
    }
}

//! Processors that transform each reading, or each batch, on its own: the
//! author writes the transform, and [`map_processor`] runs the loop every such
//! processor needs (receive, apply new parameters, transform, send, and return
//! only once the input has ended, having sent everything).

use std::any::Any;
use std::sync::Arc;

use async_trait::async_trait;

use crate::{Batch, Context, Input, Output, Processor, Reading, StageError};

/// A transform of one reading at a time, implemented by a processor's config:
/// the config in force is `self`, so a reload changes what the next batch
/// sees. Run it with [`map_processor`].
///
/// ```
/// use sink_api::{MapBatch, MapReadings, Reading};
///
/// /// Adds `offset` to each value, and drops readings without one.
/// #[derive(Clone)]
/// struct Offset {
///     offset: i64,
/// }
///
/// impl MapReadings for Offset {
///     fn map_reading(&self, reading: &mut Reading) -> bool {
///         let Some(value) = &mut reading.value else { return false };
///         *value = value.map(|i| i.saturating_add(self.offset), |f| f + self.offset as f64);
///         true
///     }
/// }
///
/// let mut batch = sink_api::testkit::readings("t", 0..3);
/// batch[1].value = None;
/// Offset { offset: 10 }.map_batch(&mut batch);
/// let values: Vec<_> = batch.iter().map(|r| r.value).collect();
/// assert_eq!(values, [Some(10.into()), Some(12.into())]);
/// ```
pub trait MapReadings: Any + Send + Sync {
    /// Changes `reading` in place; returns whether to keep it.
    fn map_reading(&self, reading: &mut Reading) -> bool;
}

/// A transform of one batch at a time, for what needs the whole batch (sort
/// it, keep one reading per sensor); implemented by a processor's config, the
/// config in force being `self`. Every [`MapReadings`] is one. Run it with
/// [`map_processor`]; a batch left empty is not sent on.
///
/// ```
/// use sink_api::MapBatch;
///
/// /// Sorts each batch by sensor name.
/// #[derive(Clone)]
/// struct ByName;
///
/// impl MapBatch for ByName {
///     fn map_batch(&self, batch: &mut sink_api::Batch) {
///         batch.sort_by(|a, b| a.sensor_name.cmp(&b.sensor_name));
///     }
/// }
///
/// let mut batch = sink_api::testkit::readings("t", 8..11);
/// ByName.map_batch(&mut batch);
/// let names: Vec<_> = batch.iter().map(|r| r.sensor_name.as_str()).collect();
/// assert_eq!(names, ["t10", "t8", "t9"]);
/// ```
pub trait MapBatch: Any + Send + Sync {
    /// Changes `batch` in place.
    fn map_batch(&self, batch: &mut Batch);
}

impl<T: MapReadings> MapBatch for T {
    fn map_batch(&self, batch: &mut Batch) {
        batch.retain_mut(|reading| self.map_reading(reading));
    }
}

/// The running processor for the transform `config`, to return from
/// `build`; `config` must be the type `build` is implemented for, the type
/// whose reloads then reach the stage.
///
/// Before each batch it takes the config a reload handed over, if any (so a
/// reload applies from the next batch on and is confirmed as it is taken);
/// it sends each batch on unless the transform left it empty, and returns once
/// its input has ended.
///
/// ```
/// use sink_api::{BuildContext, ConfigError, MapReadings, Processor, ProcessorConfig, Reading};
///
/// /// Keeps readings whose value is at least `min`.
/// #[derive(Debug, Clone, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
/// struct AtLeast {
///     /// The smallest value kept.
///     min: i64,
/// }
///
/// #[sink_api::stage(name = "map_doc_at_least")]
/// impl ProcessorConfig for AtLeast {
///     fn build(&self, _: &BuildContext) -> Result<Box<dyn Processor>, ConfigError> {
///         Ok(sink_api::map_processor(self))
///     }
/// }
///
/// impl MapReadings for AtLeast {
///     fn map_reading(&self, reading: &mut Reading) -> bool {
///         reading.value.is_some_and(|value| value.as_f64() >= self.min as f64)
///     }
/// }
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let stage = sink_api::testkit::Harness::processor(AtLeast { min: 2 }).unwrap();
/// stage.send(sink_api::testkit::readings("t", 0..5)).await;
/// assert_eq!(stage.finish().await.unwrap().len(), 3);
/// # }
/// ```
pub fn map_processor<C: MapBatch + Clone>(config: &C) -> Box<dyn Processor> {
    Box::new(MapStage {
        config: Arc::new(config.clone()),
    })
}

/// The running stage of a [`MapBatch`]: only the config in force.
struct MapStage<C> {
    config: Arc<C>,
}

#[async_trait]
impl<C: MapBatch> Processor for MapStage<C> {
    async fn run(
        self: Box<Self>,
        mut input: Input,
        output: Output,
        cx: Context,
    ) -> Result<(), StageError> {
        let mut config = self.config;
        let mut params = cx.params::<C>();
        while let Some(mut batch) = input.recv().await {
            if let Some(new) = params.try_changed() {
                config = new;
            }
            config.map_batch(&mut batch);
            // An empty batch would only wake the stages downstream for nothing.
            if !batch.is_empty() {
                output.send(batch).await?;
            }
        }
        Ok(())
    }
}

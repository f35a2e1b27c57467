//! # sink-example-scale: a custom processor, `scale`
//!
//! Multiplies each reading's value by a factor that can change while the
//! pipeline runs. It is the smallest whole stage crate: a config registered
//! under its `type` name, a transform run by [`sink_api::map_processor`], and
//! the test kit's conformance check. The stage author's guide
//! (docs/stage-authors.md) walks through this file.
//!
//! ```toml
//! [processors.kilo]
//! type = "scale"
//! inputs = ["sensors"]
//! factor = 1000
//! ```

use serde::{Deserialize, Serialize};
use sink_api::{BuildContext, ConfigError, MapReadings, Processor, ProcessorConfig, Reading};

/// Multiplies each reading's value by `factor`, an integer value as an
/// integer and a float as a float; a reading without a value passes unchanged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ScaleConfig {
    /// What each value is multiplied by; a product beyond the 64-bit range
    /// is clamped to it.
    pub factor: i64,
}

#[sink_api::stage(name = "scale")]
impl ProcessorConfig for ScaleConfig {
    fn build(&self, _: &BuildContext) -> Result<Box<dyn Processor>, ConfigError> {
        Ok(sink_api::map_processor(self))
    }
}

impl MapReadings for ScaleConfig {
    fn map_reading(&self, reading: &mut Reading) -> bool {
        if let Some(value) = &mut reading.value {
            *value = value.map(
                |int| int.saturating_mul(self.factor),
                |float| float * self.factor as f64,
            );
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use sink_api::MapBatch;
    use sink_api::testkit::{Harness, check_processor_maps, readings};

    use super::*;

    #[tokio::test]
    async fn conforms_to_the_stage_contract() {
        check_processor_maps(ScaleConfig { factor: 3 }, |reading| {
            let mut scaled = reading.clone();
            scaled.value = reading.value.map(|value| value.map(|i| i * 3, |f| f * 3.0));
            Some(scaled)
        })
        .await;
    }

    #[tokio::test]
    async fn a_new_factor_applies_from_the_next_batch() {
        const WAIT: Duration = Duration::from_secs(5);
        let values = |batch: Option<Vec<Reading>>| -> Vec<Option<i64>> {
            batch
                .expect("a batch came out")
                .iter()
                .map(|r| r.value.and_then(|v| v.as_i64()))
                .collect()
        };
        let mut stage = Harness::processor(ScaleConfig { factor: 2 }).expect("builds");
        stage.send(readings("t", 1..3)).await;
        assert_eq!(values(stage.next_batch(WAIT).await), [Some(2), Some(4)]);

        let reload = stage.update(ScaleConfig { factor: 10 });
        stage.send(readings("t", 1..3)).await;
        assert_eq!(values(stage.next_batch(WAIT).await), [Some(10), Some(20)]);
        assert!(stage.applied(reload, WAIT).await, "reload not confirmed");
        stage.finish().await.expect("ends cleanly");
    }

    #[test]
    fn no_value_stays_none_and_products_saturate() {
        let config = ScaleConfig { factor: i64::MAX };
        let mut batch = readings("t", 0..3);
        batch[0].value = None;
        config.map_batch(&mut batch);
        let values: Vec<Option<i64>> = batch
            .iter()
            .map(|r| r.value.and_then(|v| v.as_i64()))
            .collect();
        assert_eq!(values, [None, Some(i64::MAX), Some(i64::MAX)]);
    }
}

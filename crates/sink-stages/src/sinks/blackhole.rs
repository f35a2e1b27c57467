//! `blackhole`: counts readings and drops them, so that a benchmark can tell
//! the cost of the pipeline from the cost of writing; with `delay_per_batch`
//! it is a deliberately slow sink for showing backpressure and bounded memory.

use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use sink_api::{BuildContext, ConfigError, Context, Input, Sink, SinkConfig, StageError};

/// Counts readings and drops them; logs how many at shutdown. For
/// benchmarks and for trying a pipeline out.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BlackholeConfig {
    /// Wait this long after each batch, as a slow disk or network would
    /// ("0s" = no wait). Makes the sink deliberately slow, to show
    /// backpressure reaching the clients under overload.
    #[serde(default, with = "humantime_serde")]
    #[schemars(with = "String", extend("format" = "duration"))]
    pub delay_per_batch: Duration,
}

#[sink_api::stage(name = "blackhole")]
impl SinkConfig for BlackholeConfig {
    fn build(&self, _: &BuildContext) -> Result<Box<dyn Sink>, ConfigError> {
        Ok(Box::new(Blackhole {
            delay_per_batch: self.delay_per_batch,
        }))
    }
}

struct Blackhole {
    delay_per_batch: Duration,
}

#[async_trait]
impl Sink for Blackhole {
    async fn run(self: Box<Self>, mut input: Input, cx: Context) -> Result<(), StageError> {
        let mut params = cx.params::<BlackholeConfig>();
        let mut delay = self.delay_per_batch;
        let (mut readings, mut batches) = (0_u64, 0_u64);
        loop {
            tokio::select! {
                // New parameters first, so that a reload acts from the next batch on.
                biased;
                new = params.changed() => delay = new.delay_per_batch,
                received = input.recv() => {
                    let Some(batch) = received else { break };
                    readings += batch.len() as u64;
                    batches += 1;
                    drop(batch);
                    if !delay.is_zero() {
                        // A timer, not a blocked thread: slow like a remote
                        // service, without starving the other stages.
                        tokio::time::sleep(delay).await;
                    }
                }
            }
        }
        tracing::info!(
            stage = cx.id(),
            "blackhole dropped {readings} readings in {batches} batches"
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use sink_api::testkit::{Harness, readings};

    use super::*;

    fn config(delay: &str) -> BlackholeConfig {
        toml::from_str(&format!("delay_per_batch = \"{delay}\"")).expect("valid config")
    }

    #[test]
    fn config_defaults_to_no_delay_and_refuses_unknown_keys() {
        let empty: BlackholeConfig = toml::from_str("").expect("empty table is valid");
        assert_eq!(empty.delay_per_batch, Duration::ZERO);
        assert_eq!(config("25ms").delay_per_batch, Duration::from_millis(25));
        let err = toml::from_str::<BlackholeConfig>("delay = \"1s\"").unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
    }

    #[test]
    fn is_registered_with_its_keys() {
        let info = sink_api::registered_stages()
            .find(|info| info.name == "blackhole")
            .expect("blackhole is registered");
        assert_eq!(info.kind, sink_api::StageKind::Sink);
        let keys = info.keys();
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].name, "delay_per_batch");
        assert!(keys[0].live);
    }

    #[tokio::test]
    async fn drains_every_batch_and_ends_with_its_input() {
        let stage = Harness::sink(BlackholeConfig::default()).expect("builds");
        // Far more batches than the harness channel holds: each send waits
        // until the blackhole has taken an earlier one.
        for start in (0..10_000).step_by(100) {
            stage.send(readings("b", start..start + 100)).await;
        }
        let out = stage.finish().await.expect("ends cleanly");
        assert!(out.is_empty(), "a sink sends nothing on");
    }

    #[tokio::test]
    async fn delay_per_batch_slows_it_and_reloads_live() {
        let stage = Harness::sink(config("30ms")).expect("builds");
        let started = Instant::now();
        // The harness channel holds 16 batches, so the 20th send waits on
        // at least three 30 ms delays.
        for i in 0..20 {
            stage.send(readings("slow", i..i + 1)).await;
        }
        assert!(started.elapsed() >= Duration::from_millis(90));

        stage.update(config("0s"));
        let finished = Instant::now();
        stage.finish().await.expect("ends cleanly");
        // Without the reload, the 16 queued batches would take 480 ms.
        assert!(
            finished.elapsed() < Duration::from_millis(400),
            "took {:?}",
            finished.elapsed()
        );
    }
}

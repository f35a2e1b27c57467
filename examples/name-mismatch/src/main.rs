//! **Intentionally broken**: a `sink` distribution linking a stage type whose
//! two registrations disagree (`#[typetag::serde]` says `named_in_pipelines`,
//! `register_stage!` says `named_in_catalogue`). The runtime must refuse to
//! start it with a message naming both; `tests/startup.rs` checks that it
//! does. `#[sink_api::stage]` makes this mistake impossible.

use serde::{Deserialize, Serialize};
use sink_api::{BuildContext, ConfigError, MapReadings, Processor, ProcessorConfig, Reading};

/// Passes every reading; registered under two names.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
struct Mismatched {}

#[typetag::serde(name = "named_in_pipelines")]
impl ProcessorConfig for Mismatched {
    fn build(&self, _: &BuildContext) -> Result<Box<dyn Processor>, ConfigError> {
        Ok(sink_api::map_processor(self))
    }
}

impl MapReadings for Mismatched {
    fn map_reading(&self, _: &mut Reading) -> bool {
        true
    }
}

sink_api::register_stage!(processor "named_in_catalogue" => Mismatched);

fn main() -> std::process::ExitCode {
    sink::run()
}

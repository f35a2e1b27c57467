//! Hot reload: watching the pipeline file, telling what an edit changes, and
//! applying it to the running pipeline all or nothing.
//!
//! A reload parses and validates the whole file first. If the topology is the
//! same, each stage whose keys changed gets its new config through its
//! `Context::params` channel and applies it in place, between two batches, so
//! nothing is dropped or written twice. A topology change (a stage added,
//! removed or rewired, a `type`, a channel capacity, or a key the stage marks
//! `x-restart`) is refused with one line naming it; the pipeline runs on.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

pub use sink_api::watch::FileWatcher;
use sink_api::{AnyConfig, StageInfo, StageKind, WhenFull, registered_stages};
use toml::Table;

use crate::pipeline::{Pipeline, Settings, StageConfig};

/// What a pipeline looks like, without its configs: enough to tell what a
/// new version of the file changes.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    settings: Settings,
    api: crate::api::ApiConfig,
    stages: BTreeMap<String, StageShape>,
}

#[derive(Debug, Clone, PartialEq)]
struct StageShape {
    kind: StageKind,
    type_name: String,
    inputs: BTreeSet<String>,
    capacity: usize,
    when_full: WhenFull,
    params: Table,
}

impl Snapshot {
    /// The shape of `pipeline`.
    pub fn of(pipeline: &Pipeline) -> Self {
        Self {
            settings: pipeline.settings.clone(),
            api: pipeline.api.clone(),
            stages: pipeline
                .stages
                .iter()
                .map(|stage| {
                    let shape = StageShape {
                        kind: stage.kind,
                        type_name: stage.type_name.clone(),
                        inputs: stage.inputs.iter().cloned().collect(),
                        capacity: stage.capacity,
                        when_full: stage.when_full,
                        params: stage.params.clone(),
                    };
                    (stage.id.clone(), shape)
                })
                .collect(),
        }
    }

    /// The settings.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }
}

/// What going from one version of the file to another would do.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    /// Changes that need a restart; if any, nothing is applied.
    pub needs_restart: Vec<String>,
    /// Settings keys that change live.
    pub settings: Vec<&'static str>,
    /// Stages whose keys change live, with those keys.
    pub stages: BTreeMap<String, Vec<String>>,
    /// Sinks whose `when_full` changes: the runtime applies it, at once.
    pub when_full: BTreeMap<String, WhenFull>,
}

impl Plan {
    /// Compares the running shape `old` with `new`.
    pub fn between(old: &Snapshot, new: &Snapshot) -> Self {
        let mut plan = Plan::default();
        if old.settings.channel_capacity != new.settings.channel_capacity {
            plan.needs_restart.push(format!(
                "settings.channel_capacity changed from {} to {}",
                old.settings.channel_capacity, new.settings.channel_capacity
            ));
        }
        if old.api != new.api {
            let shown = |api: &crate::api::ApiConfig| {
                api.address
                    .as_deref()
                    .map_or_else(|| "(none)".to_string(), |a| format!("\"{a}\""))
            };
            plan.needs_restart.push(format!(
                "api.address changed from {} to {}",
                shown(&old.api),
                shown(&new.api)
            ));
        }
        if old.settings.log_format != new.settings.log_format {
            plan.needs_restart.push(format!(
                "settings.log_format changed from \"{}\" to \"{}\"",
                old.settings.log_format, new.settings.log_format
            ));
        }
        if old.settings.log_level != new.settings.log_level {
            plan.settings.push("log_level");
        }
        if old.settings.shutdown_timeout != new.settings.shutdown_timeout {
            plan.settings.push("shutdown_timeout");
        }
        if old.settings.memory_limit != new.settings.memory_limit {
            plan.settings.push("memory_limit");
        }
        for id in old.stages.keys().filter(|id| !new.stages.contains_key(*id)) {
            let kind = old.stages[id].kind;
            plan.needs_restart
                .push(format!("{}.{id} was removed", kind.section()));
        }
        for (id, new_stage) in &new.stages {
            let name = format!("{}.{id}", new_stage.kind.section());
            let Some(old_stage) = old.stages.get(id) else {
                plan.needs_restart.push(format!("{name} was added"));
                continue;
            };
            if old_stage.kind != new_stage.kind || old_stage.type_name != new_stage.type_name {
                plan.needs_restart.push(format!(
                    "{name}: type changed from {} `{}` to {} `{}`",
                    old_stage.kind, old_stage.type_name, new_stage.kind, new_stage.type_name
                ));
                continue;
            }
            if old_stage.inputs != new_stage.inputs {
                plan.needs_restart.push(format!(
                    "{name}: inputs changed from {:?} to {:?}",
                    old_stage.inputs, new_stage.inputs
                ));
            }
            if old_stage.capacity != new_stage.capacity {
                plan.needs_restart.push(format!(
                    "{name}: input channel capacity changed from {} to {}",
                    old_stage.capacity, new_stage.capacity
                ));
            }
            if old_stage.when_full != new_stage.when_full {
                plan.when_full.insert(id.clone(), new_stage.when_full);
            }
            let changed = changed_keys(&old_stage.params, &new_stage.params);
            let info = stage_info(new_stage.kind, &new_stage.type_name);
            let fixed = info.map(StageInfo::restart_keys).unwrap_or_default();
            let (restart, live): (Vec<String>, Vec<String>) =
                changed.into_iter().partition(|key| fixed.contains(key));
            for key in restart {
                plan.needs_restart
                    .push(format!("{name}: key `{key}` cannot change while running"));
            }
            let presence = info
                .map(StageInfo::presence_restart_keys)
                .unwrap_or_default();
            let (restart, live): (Vec<String>, Vec<String>) = live.into_iter().partition(|key| {
                presence.contains(key)
                    && old_stage.params.contains_key(key) != new_stage.params.contains_key(key)
            });
            for key in restart {
                let done = if new_stage.params.contains_key(&key) {
                    "added"
                } else {
                    "removed"
                };
                plan.needs_restart.push(format!(
                    "{name}: key `{key}` cannot be {done} while running (its contents can change)"
                ));
            }
            if !live.is_empty() {
                plan.stages.insert(id.clone(), live);
            }
        }
        plan
    }

    /// Whether the new file changes nothing at all.
    pub fn is_empty(&self) -> bool {
        self.needs_restart.is_empty()
            && self.settings.is_empty()
            && self.stages.is_empty()
            && self.when_full.is_empty()
    }

    /// The live changes in words: `settings.log_level; stage `batch`: max_events`.
    pub fn describe_live(&self) -> String {
        let settings = self.settings.iter().map(|key| format!("settings.{key}"));
        let ids: BTreeSet<&String> = self.stages.keys().chain(self.when_full.keys()).collect();
        let stages = ids.into_iter().map(|id| {
            let runtime = self
                .when_full
                .contains_key(id)
                .then(|| "when_full".to_string());
            let keys: Vec<String> = runtime
                .into_iter()
                .chain(self.stages.get(id).into_iter().flatten().cloned())
                .collect();
            format!("stage `{id}`: {}", keys.join(", "))
        });
        settings.chain(stages).collect::<Vec<_>>().join("; ")
    }
}

/// Top-level keys whose values differ between `old` and `new`, added and removed ones included.
fn changed_keys(old: &Table, new: &Table) -> Vec<String> {
    let keys: BTreeSet<&String> = old.keys().chain(new.keys()).collect();
    keys.into_iter()
        .filter(|key| old.get(*key) != new.get(*key))
        .cloned()
        .collect()
}

/// The registered description of type `type_name` of `kind`.
fn stage_info(kind: StageKind, type_name: &str) -> Option<&'static StageInfo> {
    registered_stages().find(|info| info.kind == kind && info.name == type_name)
}

/// The new configs of the stages `plan` changes, ready to hand over.
pub fn configs_to_apply(plan: &Plan, pipeline: Pipeline) -> Vec<(String, AnyConfig)> {
    pipeline
        .stages
        .into_iter()
        .filter(|stage| plan.stages.contains_key(&stage.id))
        .map(|stage| {
            let config: AnyConfig = match stage.config {
                StageConfig::Source(config) => Arc::from(config.into_any()),
                StageConfig::Processor(config) => Arc::from(config.into_any()),
                StageConfig::Sink(config) => Arc::from(config.into_any()),
            };
            (stage.id, config)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn snapshot(text: &str) -> Snapshot {
        let pipeline = Pipeline::parse(Path::new("p.toml"), text, |_| None).expect("valid");
        Snapshot::of(&pipeline)
    }

    const BASE: &str = r#"
[sources.in]
type = "grpc"
address = "127.0.0.1:0"
[processors.batch]
type = "buffered"
inputs = ["in"]
max_events = 10
[sinks.out]
type = "json_file"
inputs = ["batch"]
path = "a.json"
"#;

    #[test]
    fn same_file_changes_nothing() {
        assert!(Plan::between(&snapshot(BASE), &snapshot(BASE)).is_empty());
    }

    #[test]
    fn live_keys_are_listed_per_stage() {
        let new = BASE
            .replace("max_events = 10", "max_events = 5")
            .replace("a.json", "b.json");
        let plan = Plan::between(&snapshot(BASE), &snapshot(&new));
        assert!(plan.needs_restart.is_empty(), "{plan:?}");
        assert_eq!(plan.stages["batch"], ["max_events"]);
        assert_eq!(plan.stages["out"], ["path"]);
        assert_eq!(
            plan.describe_live(),
            "stage `batch`: max_events; stage `out`: path"
        );
    }

    #[test]
    fn a_sinks_when_full_changes_live() {
        let new = BASE.replace(
            "path = \"a.json\"",
            "path = \"a.json\"\nwhen_full = \"drop\"",
        );
        let plan = Plan::between(&snapshot(BASE), &snapshot(&new));
        assert!(plan.needs_restart.is_empty(), "{plan:?}");
        assert!(
            plan.stages.is_empty(),
            "the stage itself has nothing to apply"
        );
        assert_eq!(plan.when_full["out"], WhenFull::Drop);
        assert_eq!(plan.describe_live(), "stage `out`: when_full");
    }

    #[test]
    fn removed_key_counts_as_a_change() {
        let new = BASE.replace("max_events = 10\n", "");
        assert_eq!(
            Plan::between(&snapshot(BASE), &snapshot(&new)).stages["batch"],
            ["max_events"]
        );
    }

    #[test]
    fn address_and_rewiring_need_a_restart() {
        let new = BASE
            .replace("127.0.0.1:0", "127.0.0.1:1")
            .replace("inputs = [\"batch\"]", "inputs = [\"in\"]");
        let new = new.replace("[processors.batch]", "[processors.batch]\ncapacity = 3");
        let plan = Plan::between(
            &snapshot(BASE),
            &snapshot(&format!(
                "{new}\n[sinks.more]\ntype = \"stdout\"\ninputs = [\"batch\"]\n"
            )),
        );
        let text = plan.needs_restart.join("\n");
        assert!(text.contains("sources.in: key `address`"), "{text}");
        assert!(text.contains("sinks.out: inputs changed"), "{text}");
        assert!(
            text.contains("processors.batch: input channel capacity changed from 1024 to 3"),
            "{text}"
        );
        assert!(text.contains("sinks.more was added"), "{text}");
    }

    #[test]
    fn the_api_address_needs_a_restart() {
        let new = format!("[api]\naddress = \"127.0.0.1:0\"\n{BASE}");
        let plan = Plan::between(&snapshot(BASE), &snapshot(&new));
        assert_eq!(
            plan.needs_restart,
            ["api.address changed from (none) to \"127.0.0.1:0\""]
        );
    }

    #[test]
    fn settings_split_into_live_and_topology() {
        let new = format!("[settings]\nlog_level = \"debug\"\nchannel_capacity = 8\n{BASE}");
        let plan = Plan::between(&snapshot(BASE), &snapshot(&new));
        assert_eq!(plan.settings, ["log_level"]);
        assert!(
            plan.needs_restart
                .iter()
                .any(|c| c.contains("channel_capacity"))
        );
    }

    #[test]
    fn tls_on_or_off_needs_a_restart_but_its_files_change_live() {
        let address = "address = \"127.0.0.1:0\"";
        let with = |cert: &str| {
            BASE.replace(
                address,
                &format!("{address}\ntls = {{ cert = \"{cert}\", key = \"a.key\" }}"),
            )
        };
        let on = Plan::between(&snapshot(BASE), &snapshot(&with("a.crt")));
        assert_eq!(
            on.needs_restart,
            ["sources.in: key `tls` cannot be added while running (its contents can change)"]
        );
        let off = Plan::between(&snapshot(&with("a.crt")), &snapshot(BASE));
        assert!(
            off.needs_restart[0].contains("`tls` cannot be removed"),
            "{off:?}"
        );
        let moved = Plan::between(&snapshot(&with("a.crt")), &snapshot(&with("b.crt")));
        assert!(moved.needs_restart.is_empty(), "{moved:?}");
        assert_eq!(moved.stages["in"], ["tls"]);
    }
}

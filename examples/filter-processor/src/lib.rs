//! # sink-example-filter: a custom processor, `filter`
//!
//! Keeps the readings whose sensor name and labels match globs and whose
//! value lies in a range, and drops the rest. It shows a config that checks itself in
//! `validate`, and a processor that is only a per-reading decision: the
//! config implements [`MapReadings`], and [`sink_api::map_processor`] runs it,
//! applying every key live. The stage author's guide (docs/stage-authors.md) builds the
//! simpler `scale` the same way.
//!
//! ```toml
//! [processors.hot]
//! type = "filter"
//! inputs = ["sensors"]
//! sensors = ["boiler-*", "pump-?"]
//! labels = { site = "north-*" }
//! min = 60.5
//! ```

use std::collections::BTreeMap;
use std::str::Chars;

use serde::{Deserialize, Serialize};
use sink_api::{BuildContext, ConfigError, MapReadings, Processor, ProcessorConfig, Reading};

/// Keeps readings whose sensor name matches `sensors` but no `exclude` glob,
/// whose labels match `labels`, and whose value lies between `min` and `max`;
/// drops the rest.
///
/// ```
/// use sink_api::{Labels, Reading, Timestamp, Value};
/// use sink_example_filter::FilterConfig;
///
/// let config = FilterConfig {
///     sensors: vec!["boiler-*".into()],
///     labels: [("site".to_string(), "north-*".to_string())].into(),
///     min: Some(60.5),
///     ..FilterConfig::default()
/// };
/// let reading = |name: &str, site: &str, value: Value| Reading {
///     sensor_name: name.into(),
///     labels: Labels::from_iter([("site", site)]),
///     value: Some(value),
///     created_at: None,
///     received_at: Timestamp::now(),
/// };
/// assert!(config.keeps(&reading("boiler-1", "north-2", Value::Int(75))));
/// assert!(config.keeps(&reading("boiler-1", "north-2", Value::Float(60.5))));
/// assert!(!config.keeps(&reading("boiler-1", "north-2", Value::Float(60.4))));
/// assert!(!config.keeps(&reading("boiler-1", "south-1", Value::Int(75))));
/// assert!(!config.keeps(&reading("pump-1", "north-2", Value::Int(75))));
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FilterConfig {
    /// Sensor-name globs to keep: `*` matches any run of characters, `?`
    /// exactly one.
    #[serde(default = "default_sensors")]
    pub sensors: Vec<String>,
    /// Sensor-name globs to drop, even when `sensors` keeps the name.
    #[serde(default)]
    pub exclude: Vec<String>,
    /// Label globs a reading must match to be kept: each named label must be
    /// present and its value match the glob (`{ site = "north-*" }`).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Smallest value kept (an integer or a float; integers compare as
    /// floats); absent means no lower bound.
    #[serde(default)]
    pub min: Option<f64>,
    /// Largest value kept; absent means no upper bound.
    #[serde(default)]
    pub max: Option<f64>,
    /// What happens to a reading that carries no value: `"keep"` or `"drop"`.
    #[serde(default)]
    pub missing_value: MissingValue,
}

/// What `filter` does with a reading that carries no value.
///
/// ```
/// use sink_example_filter::{FilterConfig, MissingValue};
///
/// let config: FilterConfig = serde_json::from_str(r#"{"missing_value": "drop"}"#).unwrap();
/// assert_eq!(config.missing_value, MissingValue::Drop);
/// ```
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum MissingValue {
    /// Keep it (when its name is kept): no value is not out of range.
    #[default]
    Keep,
    /// Drop it.
    Drop,
}

fn default_sensors() -> Vec<String> {
    vec!["*".into()]
}

impl Default for FilterConfig {
    fn default() -> Self {
        Self {
            sensors: default_sensors(),
            exclude: Vec::new(),
            labels: BTreeMap::new(),
            min: None,
            max: None,
            missing_value: MissingValue::default(),
        }
    }
}

impl FilterConfig {
    /// Whether `reading` passes this filter.
    pub fn keeps(&self, reading: &Reading) -> bool {
        let name = &reading.sensor_name;
        let named = self.sensors.iter().any(|glob| glob_matches(glob, name))
            && !self.exclude.iter().any(|glob| glob_matches(glob, name));
        let labelled = self.labels.iter().all(|(key, glob)| {
            reading
                .labels
                .get(key)
                .is_some_and(|value| glob_matches(glob, value))
        });
        named
            && labelled
            && match reading.value {
                None => self.missing_value == MissingValue::Keep,
                Some(value) => {
                    let value = value.as_f64();
                    self.min.is_none_or(|min| value >= min)
                        && self.max.is_none_or(|max| value <= max)
                }
            }
    }
}

#[sink_api::stage(name = "filter")]
impl ProcessorConfig for FilterConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.sensors.is_empty() {
            return Err(ConfigError::new(
                "sensors",
                "would drop every reading; [\"*\"] keeps every name",
            ));
        }
        for (key, bound) in [("min", self.min), ("max", self.max)] {
            if bound.is_some_and(|bound| !bound.is_finite()) {
                return Err(ConfigError::new(key, "must be a finite number"));
            }
        }
        if let (Some(min), Some(max)) = (self.min, self.max)
            && min > max
        {
            return Err(ConfigError::new(
                "min",
                format!("{min} is above max ({max}): nothing would pass"),
            ));
        }
        Ok(())
    }

    fn build(&self, _: &BuildContext) -> Result<Box<dyn Processor>, ConfigError> {
        Ok(sink_api::map_processor(self))
    }
}

/// The running `filter` is [`sink_api::map_processor`] keeping what
/// [`FilterConfig::keeps`] keeps, with the config in force.
impl MapReadings for FilterConfig {
    fn map_reading(&self, reading: &mut Reading) -> bool {
        self.keeps(reading)
    }
}

/// Whether `name` matches `glob`, where `*` matches any run of characters
/// (the empty one too), `?` exactly one, and any other character itself.
///
/// ```
/// use sink_example_filter::glob_matches;
/// assert!(glob_matches("boiler-*", "boiler-12"));
/// assert!(glob_matches("pump-?", "pump-3"));
/// assert!(!glob_matches("pump-?", "pump-12"));
/// ```
pub fn glob_matches(glob: &str, name: &str) -> bool {
    let (mut glob_rest, mut name_rest) = (glob.chars(), name.chars());
    // After a `*`: the glob just past it, and the name from the first
    // character that star has not swallowed. A mismatch later lets the star
    // swallow one more character and retries from there, which keeps the work
    // at most len(glob) * len(name), however many stars there are.
    let mut retry: Option<(Chars<'_>, Chars<'_>)> = None;
    loop {
        let mut glob_next = glob_rest.clone();
        match (glob_next.next(), name_rest.clone().next()) {
            (Some('*'), _) => {
                glob_rest = glob_next;
                retry = Some((glob_rest.clone(), name_rest.clone()));
            }
            (Some(wanted), Some(got)) if wanted == '?' || wanted == got => {
                glob_rest = glob_next;
                name_rest.next();
            }
            (None, None) => return true,
            _ => {
                let Some((after_star, unswallowed)) = &mut retry else {
                    return false;
                };
                if unswallowed.next().is_none() {
                    return false;
                }
                glob_rest = after_star.clone();
                name_rest = unswallowed.clone();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use sink_api::testkit::{Harness, check_processor, readings};

    use super::*;

    #[test]
    fn globs_match_like_a_shell() {
        let cases = [
            ("*", "", true),
            ("*", "anything", true),
            ("", "", true),
            ("", "a", false),
            ("t?", "t1", true),
            ("t?", "t", false),
            ("t?", "t12", false),
            ("a*b*c", "aXbYc", true),
            ("a*b*c", "abcbc", true),
            ("a*b*c", "acb", false),
            ("*-x", "a-x-x", true),
            ("*a", "b", false),
            ("**", "x", true),
            ("ü?", "üß", true),
            ("exact", "exact", true),
            ("exact", "exact2", false),
        ];
        for (glob, name, expected) in cases {
            assert_eq!(glob_matches(glob, name), expected, "{glob:?} on {name:?}");
        }
    }

    #[test]
    fn glob_with_many_stars_stays_fast() {
        let name = "a".repeat(10_000);
        assert!(!glob_matches("*a*a*a*a*a*a*b", &name));
    }

    #[test]
    fn defaults_keep_everything() {
        let config: FilterConfig = serde_json::from_str("{}").expect("all keys have defaults");
        assert_eq!(config, FilterConfig::default());
        let mut batch = readings("any-", 0..5);
        batch[0].value = None;
        assert!(batch.iter().all(|r| config.keeps(r)));
    }

    #[test]
    fn validate_names_the_key_at_fault() {
        let empty = FilterConfig {
            sensors: vec![],
            ..FilterConfig::default()
        };
        assert_eq!(empty.validate().map_err(|e| e.key), Err("sensors".into()));
        let inverted = FilterConfig {
            min: Some(10.0),
            max: Some(5.0),
            ..FilterConfig::default()
        };
        assert_eq!(inverted.validate().map_err(|e| e.key), Err("min".into()));
        let point = FilterConfig {
            min: Some(5.0),
            max: Some(5.0),
            ..FilterConfig::default()
        };
        assert_eq!(point.validate(), Ok(()));
    }

    #[test]
    fn missing_value_policy_applies_only_to_kept_names() {
        let mut reading = readings("t", 0..1).remove(0);
        reading.value = None;
        let keep = FilterConfig {
            min: Some(100.0),
            ..FilterConfig::default()
        };
        assert!(keep.keeps(&reading), "no value is not out of range");
        let drop = FilterConfig {
            missing_value: MissingValue::Drop,
            ..keep.clone()
        };
        assert!(!drop.keeps(&reading));
        let other_names = FilterConfig {
            sensors: vec!["x*".into()],
            ..keep
        };
        assert!(!other_names.keeps(&reading));
    }

    #[test]
    fn float_bounds_and_label_globs_decide_together() {
        let config: FilterConfig =
            toml_like(r#"{"labels": {"site": "north-*", "unit": "C"}, "min": -0.5, "max": 21}"#);
        let batch = sink_api::testkit::mixed_readings("t", 0..40);
        let kept: Vec<&str> = batch
            .iter()
            .filter(|r| config.keeps(r))
            .map(|r| r.sensor_name.as_str())
            .collect();
        // Labelled readings are the even ones; `north` sites are i % 4 == 0,
        // whose values are the integers i; mixed_readings names them `north`,
        // not `north-*`, so none match until the glob allows it.
        assert!(kept.is_empty(), "{kept:?}");
        let config = FilterConfig {
            labels: [("site".to_string(), "north*".to_string())].into(),
            ..config
        };
        let kept: Vec<&str> = batch
            .iter()
            .filter(|r| config.keeps(r))
            .map(|r| r.sensor_name.as_str())
            .collect();
        assert_eq!(kept, ["t0", "t4", "t8", "t12", "t16", "t20"]);
    }

    fn toml_like(json: &str) -> FilterConfig {
        serde_json::from_str(json).expect("a filter config")
    }

    #[test]
    fn a_bound_that_is_not_finite_is_refused() {
        let config = FilterConfig {
            max: Some(f64::NAN),
            ..FilterConfig::default()
        };
        assert_eq!(config.validate().map_err(|e| e.key), Err("max".into()));
    }

    #[tokio::test]
    async fn conforms_to_the_stage_contract() {
        let config = FilterConfig {
            sensors: vec!["conformance-1*".into(), "conformance-?".into()],
            exclude: vec!["*7".into()],
            labels: [("site".to_string(), "n*".to_string())].into(),
            min: Some(0.0),
            max: Some(150.5),
            missing_value: MissingValue::Drop,
        };
        let keeps = config.clone();
        check_processor(config, move |reading| keeps.keeps(reading)).await;
    }

    #[tokio::test]
    async fn applies_new_params_from_the_next_batch() {
        const WAIT: Duration = Duration::from_secs(5);
        let names = |batch: Option<Vec<Reading>>| -> Vec<String> {
            batch
                .expect("a batch came out")
                .into_iter()
                .map(|r| r.sensor_name.into())
                .collect()
        };
        let mut stage = Harness::processor(FilterConfig::default()).expect("builds");
        stage.send(readings("a", 0..3)).await;
        assert_eq!(names(stage.next_batch(WAIT).await), ["a0", "a1", "a2"]);

        stage.update(FilterConfig {
            sensors: vec!["b*".into()],
            min: Some(1.0),
            ..FilterConfig::default()
        });
        // The `a` batch is dropped whole, so the next batch out is from `b`.
        stage.send(readings("a", 0..3)).await;
        stage.send(readings("b", 0..3)).await;
        assert_eq!(names(stage.next_batch(WAIT).await), ["b1", "b2"]);

        stage.update(FilterConfig {
            max: Some(0.0),
            ..FilterConfig::default()
        });
        stage.send(readings("c", 0..3)).await;
        let rest = stage.finish().await.expect("ends cleanly");
        let rest: Vec<String> = rest.into_iter().map(|r| r.sensor_name.into()).collect();
        assert_eq!(rest, ["c0"]);
    }
}

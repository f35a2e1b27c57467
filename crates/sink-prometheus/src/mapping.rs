//! Readings as Prometheus samples: names and labels sanitised, readings of
//! one series gathered and put in time order.
//!
//! - The metric name (`__name__`) is the sensor name with every character
//!   outside `[a-zA-Z0-9_:]` replaced by `_`, and `_` put before a leading
//!   digit (an empty name becomes `_`).
//! - Label names are sanitised the same way, without `:`. Values are kept.
//! - A label whose name sanitises to `__name__` is renamed
//!   `exported___name__` (as Prometheus renames a scraped label that clashes
//!   with a target label), so the metric name always comes from the sensor.
//! - Labels whose sanitised names collide (`site.id` and `site-id`) become one
//!   label whose value is their values joined with `;`, in the order of their
//!   original names (what the OpenTelemetry Collector's Prometheus exporters
//!   do): nothing is silently lost.
//! - A label with an empty value is left out: Prometheus treats it as absent.
//! - The value is the reading's as a float (an integer beyond 2^53 loses
//!   precision); a reading without a value is no sample.
//! - The timestamp is `created_at`, or `received_at` when absent, in
//!   milliseconds since the epoch.

use std::collections::HashMap;

use sink_api::{Labels, Reading};

/// The label that holds the metric name.
pub const NAME_LABEL: &str = "__name__";
/// What a reading's own label that sanitises to `__name__` is renamed.
pub const EXPORTED_NAME_LABEL: &str = "exported___name__";

/// One sample: a value at a time (milliseconds since the epoch).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    /// Milliseconds since the Unix epoch.
    pub timestamp: i64,
    /// The reading's value as a float.
    pub value: f64,
}

/// A series: its labels (sorted by name, `__name__` among them) and its
/// samples in time order, one per millisecond.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Sorted by name, as remote write requires.
    pub labels: Vec<(String, String)>,
    /// In timestamp order, no timestamp twice.
    pub samples: Vec<Sample>,
}

/// A batch's readings as series, and what did not become a sample.
#[derive(Debug, Default)]
pub struct Grouped {
    /// The series, in the order their first reading came.
    pub series: Vec<Series>,
    /// Readings without a value: no sample.
    pub without_value: u64,
    /// Samples replaced by a later reading of the same series at the same
    /// millisecond (a receiver would refuse the pair as a duplicate).
    pub superseded: u64,
}

impl Grouped {
    /// How many samples there are to send.
    pub fn samples(&self) -> usize {
        self.series.iter().map(|series| series.samples.len()).sum()
    }
}

/// Gathers `readings` into series. Work and allocation are per series, not
/// per reading: readings are looked up by their own name and labels, and
/// only a series seen first is sanitised.
pub fn group(readings: &[Reading]) -> Grouped {
    let mut grouped = Grouped::default();
    let mut by_reading: HashMap<(&str, &Labels), usize> = HashMap::new();
    let mut by_labels: HashMap<Vec<(String, String)>, usize> = HashMap::new();
    for reading in readings {
        let Some(value) = reading.value else {
            grouped.without_value += 1;
            continue;
        };
        let index = *by_reading
            .entry((reading.sensor_name.as_str(), &reading.labels))
            .or_insert_with(|| {
                // Two sensors may sanitise to one series ("a.b" and "a-b").
                let labels = series_labels(&reading.sensor_name, &reading.labels);
                let next = grouped.series.len();
                *by_labels.entry(labels).or_insert_with_key(|labels| {
                    grouped.series.push(Series {
                        labels: labels.clone(),
                        samples: Vec::new(),
                    });
                    next
                })
            });
        let at = reading.created_at.unwrap_or(reading.received_at);
        grouped.series[index].samples.push(Sample {
            timestamp: at
                .seconds()
                .saturating_mul(1000)
                .saturating_add(i64::from(at.nanos() / 1_000_000)),
            value: value.as_f64(),
        });
    }
    for series in &mut grouped.series {
        grouped.superseded += in_time_order(&mut series.samples);
    }
    grouped
}

/// Sorts `samples` by time (stably: of readings at the same millisecond the
/// last received stays), keeps one per millisecond, and returns how many
/// were left out.
fn in_time_order(samples: &mut Vec<Sample>) -> u64 {
    if samples.is_sorted_by(|a, b| a.timestamp < b.timestamp) {
        return 0;
    }
    samples.sort_by_key(|sample| sample.timestamp);
    let before = samples.len();
    // `dedup_by` keeps the first of a run; reversed, the first is the last.
    samples.reverse();
    samples.dedup_by_key(|sample| sample.timestamp);
    samples.reverse();
    (before - samples.len()) as u64
}

/// The sorted labels of the series of a reading named `name` with `labels`.
pub fn series_labels(name: &str, labels: &Labels) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::with_capacity(labels.len() + 1);
    for (key, value) in labels.iter() {
        if value.is_empty() {
            continue;
        }
        let mut key = sanitize(key, false);
        if key == NAME_LABEL {
            key = EXPORTED_NAME_LABEL.to_string();
        }
        out.push((key, value.to_string()));
    }
    out.push((NAME_LABEL.to_string(), sanitize(name, true)));
    // Stable: labels that collide stay in the order of their original names.
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out.dedup_by(|later, kept| {
        if later.0 != kept.0 {
            return false;
        }
        kept.1.push(';');
        kept.1.push_str(&later.1);
        true
    });
    out
}

/// `text` with every character outside `[a-zA-Z0-9_]` (and `:` when
/// `colon`) replaced by `_`, and `_` before a leading digit.
pub fn sanitize(text: &str, colon: bool) -> String {
    let mut out = String::with_capacity(text.len() + 1);
    if text.is_empty() || text.starts_with(|c: char| c.is_ascii_digit()) {
        out.push('_');
    }
    out.extend(text.chars().map(|c| {
        if c.is_ascii_alphanumeric() || c == '_' || (colon && c == ':') {
            c
        } else {
            '_'
        }
    }));
    out
}

#[cfg(test)]
mod tests {
    use sink_api::{Timestamp, Value};

    use super::*;

    fn reading(name: &str, labels: &[(&str, &str)], value: Option<Value>, ms: i64) -> Reading {
        let at = Timestamp::new(ms / 1000, (ms % 1000) as u32 * 1_000_000).unwrap();
        Reading {
            sensor_name: name.into(),
            labels: Labels::from_pairs(
                labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            value,
            created_at: Some(at),
            received_at: Timestamp::now(),
        }
    }

    fn pairs(labels: &[(&str, &str)]) -> Vec<(String, String)> {
        labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn names_keep_what_prometheus_allows_and_replace_the_rest() {
        assert_eq!(sanitize("room-1.temp°C", true), "room_1_temp_C");
        assert_eq!(sanitize("node:cpu_seconds", true), "node:cpu_seconds");
        assert_eq!(sanitize("node:cpu", false), "node_cpu");
        assert_eq!(sanitize("1st", true), "_1st");
        assert_eq!(sanitize("", true), "_");
        assert_eq!(sanitize("Ünïcode", false), "_n_code");
    }

    #[test]
    fn labels_are_sorted_with_the_name_among_them() {
        let labels = Labels::from_pairs(pairs(&[("Zone", "z"), ("site", "n"), ("unit", "C")]));
        // `Z` sorts before `_`, which sorts before lower case.
        assert_eq!(
            series_labels("t", &labels),
            pairs(&[
                ("Zone", "z"),
                ("__name__", "t"),
                ("site", "n"),
                ("unit", "C")
            ])
        );
    }

    #[test]
    fn colliding_labels_are_joined_and_the_name_is_never_overwritten() {
        let labels = Labels::from_pairs(pairs(&[
            ("__name__", "evil"),
            ("site-id", "a"),
            ("site.id", "b"),
            ("empty", ""),
        ]));
        assert_eq!(
            series_labels("t", &labels),
            pairs(&[
                ("__name__", "t"),
                ("exported___name__", "evil"),
                ("site_id", "a;b")
            ])
        );
    }

    #[test]
    fn readings_become_series_in_time_order_one_sample_per_millisecond() {
        let readings = vec![
            reading("t", &[], Some(Value::Int(3)), 3000),
            reading("t", &[], Some(Value::Int(1)), 1000),
            reading("u", &[("site", "n")], Some(Value::Float(0.5)), 1500),
            reading("t", &[], None, 2000),
            reading("t", &[], Some(Value::Int(30)), 3000),
            reading("t", &[], Some(Value::Int(2)), 2000),
        ];
        let grouped = group(&readings);
        assert_eq!(grouped.without_value, 1);
        assert_eq!(grouped.superseded, 1);
        assert_eq!(grouped.series.len(), 2);
        let t = &grouped.series[0];
        assert_eq!(t.labels, pairs(&[("__name__", "t")]));
        let samples: Vec<(i64, f64)> = t.samples.iter().map(|s| (s.timestamp, s.value)).collect();
        assert_eq!(samples, [(1000, 1.0), (2000, 2.0), (3000, 30.0)]);
        assert_eq!(grouped.samples(), 4);
    }

    #[test]
    fn sensors_that_sanitise_alike_share_one_series() {
        let readings = vec![
            reading("a.b", &[], Some(Value::Int(1)), 1000),
            reading("a-b", &[], Some(Value::Int(2)), 500),
        ];
        let grouped = group(&readings);
        assert_eq!(grouped.series.len(), 1);
        assert_eq!(grouped.series[0].samples[0].timestamp, 500);
    }

    #[test]
    fn the_time_is_received_at_when_created_at_is_absent_and_big_integers_round() {
        let mut r = reading("t", &[], Some(Value::Int((1 << 53) + 1)), 0);
        r.created_at = None;
        r.received_at = Timestamp::new(1_700_000_000, 123_456_789).unwrap();
        let grouped = group(&[r]);
        let sample = grouped.series[0].samples[0];
        assert_eq!(sample.timestamp, 1_700_000_000_123);
        assert_eq!(sample.value, (1u64 << 53) as f64);
    }
}

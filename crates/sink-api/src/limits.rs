//! Bounds on what one reading may hold, shared by every source so that a
//! reading accepted by one is accepted by all.

use serde::{Deserialize, Serialize};

use crate::Reading;

/// The most a source accepts in one reading: a sensor name, and a number of
/// labels each with a key and a value. The defaults are far past what a real
/// fleet sends and keep one reading's worst case small enough to budget for.
///
/// ```
/// use sink_api::{Labels, ReadingLimits};
/// let limits = ReadingLimits::default();
/// assert_eq!(limits.max_labels, 64);
/// let labels = Labels::from_iter([("", "x")]);
/// let err = limits.check("t1", &labels).unwrap_err();
/// assert_eq!(err, "a label key is empty");
/// assert!(limits.check(&"n".repeat(1025), &Labels::new()).unwrap_err().contains("max_name_bytes"));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct ReadingLimits {
    /// Bytes of a sensor name (UTF-8), at most.
    pub max_name_bytes: usize,
    /// Labels on one reading, at most.
    pub max_labels: usize,
    /// Bytes of a label key, at most.
    pub max_label_key_bytes: usize,
    /// Bytes of a label value, at most.
    pub max_label_value_bytes: usize,
}

impl Default for ReadingLimits {
    fn default() -> Self {
        Self {
            max_name_bytes: 1024,
            max_labels: 64,
            max_label_key_bytes: 128,
            max_label_value_bytes: 1024,
        }
    }
}

impl ReadingLimits {
    /// Checks a name and its labels; the error names the bound that was passed
    /// (by its key) or says that a label key is empty.
    pub fn check(&self, sensor_name: &str, labels: &crate::Labels) -> Result<(), String> {
        self.check_name(sensor_name)?;
        self.check_label_count(labels.len())?;
        labels
            .iter()
            .try_for_each(|(key, value)| self.check_label(key, value))
    }

    /// Checks a whole reading, as [`check`](Self::check).
    pub fn check_reading(&self, reading: &Reading) -> Result<(), String> {
        self.check(&reading.sensor_name, &reading.labels)
    }

    // The checks run once per reading on every source's hot path: inlined
    // comparisons, with the message written out of line only on failure.

    /// Checks a sensor name's length.
    #[inline]
    pub fn check_name(&self, sensor_name: &str) -> Result<(), String> {
        if sensor_name.len() > self.max_name_bytes {
            return Err(over(
                format_args!("the sensor name is {} bytes", sensor_name.len()),
                "max_name_bytes",
                self.max_name_bytes,
            ));
        }
        Ok(())
    }

    /// Checks how many labels a reading has.
    #[inline]
    pub fn check_label_count(&self, count: usize) -> Result<(), String> {
        if count > self.max_labels {
            return Err(over(
                format_args!("{count} labels"),
                "max_labels",
                self.max_labels,
            ));
        }
        Ok(())
    }

    /// Checks one label: a key that is not empty, and both within their bounds.
    #[inline]
    pub fn check_label(&self, key: &str, value: &str) -> Result<(), String> {
        if key.is_empty() {
            return Err(empty_key());
        }
        if key.len() > self.max_label_key_bytes {
            return Err(over(
                format_args!("label key of {} bytes", key.len()),
                "max_label_key_bytes",
                self.max_label_key_bytes,
            ));
        }
        if value.len() > self.max_label_value_bytes {
            return Err(over(
                format_args!("label `{key}` has a value of {} bytes", value.len()),
                "max_label_value_bytes",
                self.max_label_value_bytes,
            ));
        }
        Ok(())
    }
}

/// `what`, over the bound `key` of `bound`.
#[cold]
#[inline(never)]
fn over(what: std::fmt::Arguments<'_>, key: &str, bound: usize) -> String {
    format!("{what}, over {key} ({bound})")
}

#[cold]
#[inline(never)]
fn empty_key() -> String {
    "a label key is empty".into()
}

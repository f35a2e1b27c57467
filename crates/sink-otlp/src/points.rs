//! The mapping from OTLP data points to readings, shared by the protobuf and
//! the JSON decoder: each decoder walks its encoding and tells [`Points`]
//! what it finds, in document order (a resource's attributes before its
//! metrics, a metric's name before its points).
//!
//! - A number point of a Gauge or a Sum is one reading: the metric's name,
//!   `as_int` as an integer or `as_double` as a float, `time_unix_nano` as
//!   `created_at` (0 means unknown), labels the resource's attributes, then
//!   the point's (a point's attribute wins over the resource's of the same
//!   key), then the metric's metadata under the [`RESERVED`] keys.
//! - A point that a reading cannot hold (a NaN, a reserved key, a name or
//!   labels past the [`ReadingLimits`]) is rejected alone: counted, with the
//!   reason, for the answer's `partial_success`.
//! - Histogram, exponential histogram and summary points are rejected the
//!   same way (counted, never dropped silently).
//! - What the readings will hold is counted as they are built; past
//!   `budget` (the memory reserved for the call) or past `max_points`, the
//!   whole request is refused, so that decoding never holds more than was
//!   reserved.

use sink_api::{Labels, Reading, ReadingLimits, SensorName, Timestamp, Value};

/// The label holding a metric's unit, when it has one.
pub const UNIT: &str = "otlp.unit";
/// The label holding a Sum's temporality: `delta`, `cumulative` or `unspecified`.
pub const TEMPORALITY: &str = "otlp.temporality";
/// The label holding whether a Sum is monotonic: `true` or `false`.
pub const MONOTONIC: &str = "otlp.monotonic";

/// The label keys the source writes itself: an attribute with one of these
/// keys would be ambiguous, so a point carrying one (on itself or on its
/// resource) is rejected.
pub const RESERVED: [&str; 3] = [MONOTONIC, TEMPORALITY, UNIT];

/// What one label costs beside its text: its key's and value's `String`s.
const LABEL_SLOT: u64 = std::mem::size_of::<(String, String)>() as u64;

/// How many distinct rejection reasons the answer's `error_message` lists.
const REASONS_SHOWN: usize = 3;

/// The kind of metric whose points follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A Gauge: no metadata beyond the unit.
    Gauge,
    /// A Sum, with its `aggregation_temporality` (the enum's number) and
    /// `is_monotonic`.
    Sum {
        /// `AggregationTemporality` as sent: 1 delta, 2 cumulative.
        temporality: i32,
        /// `is_monotonic`.
        monotonic: bool,
    },
}

/// A request refused whole while decoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// More points than `max_points_per_call`.
    TooManyPoints(usize),
    /// The readings would hold more than the memory reserved for the call.
    TooLarge(u64),
}

/// The readings decoded from one request, and the points rejected.
#[derive(Debug, Default)]
pub struct Decoded {
    /// The readings, in the request's order.
    pub readings: Vec<Reading>,
    /// What the readings hold in memory, in bytes (as the budget counts).
    pub bytes: u64,
    /// Points not turned into readings.
    pub rejected: u64,
    /// Why, for `partial_success.error_message`; empty when none was.
    pub error_message: String,
}

/// Builds the readings of one request; see the module documentation.
pub struct Points<'l> {
    readings: Vec<Reading>,
    received_at: Timestamp,
    limits: &'l ReadingLimits,
    max_points: usize,
    budget: u64,
    used: u64,
    seen: usize,
    rejected: u64,
    reasons: Vec<(String, u64)>,
    /// The current resource's attributes, as labels.
    resource: Vec<(String, String)>,
    /// Why every point of the current resource is rejected, if one must be.
    resource_refusal: Option<String>,
    name: SensorName,
    /// The current metric's metadata labels.
    meta: Vec<(&'static str, String)>,
}

impl<'l> Points<'l> {
    /// Readings stamped `received_at`, within `limits`, at most `max_points`
    /// points and `budget` bytes.
    pub fn new(
        received_at: Timestamp,
        limits: &'l ReadingLimits,
        max_points: usize,
        budget: u64,
    ) -> Self {
        Self {
            readings: Vec::new(),
            received_at,
            limits,
            max_points,
            budget,
            used: 0,
            seen: 0,
            rejected: 0,
            reasons: Vec::new(),
            resource: Vec::new(),
            resource_refusal: None,
            name: SensorName::default(),
            meta: Vec::new(),
        }
    }

    /// Room for `additional` more readings (a decoder that counted them).
    pub fn reserve(&mut self, additional: usize) {
        self.readings
            .reserve(additional.min(self.max_points.saturating_sub(self.readings.len())));
    }

    /// A new resource starts: its attributes follow.
    pub fn begin_resource(&mut self) {
        self.resource.clear();
        self.resource_refusal = None;
    }

    /// One attribute of the current resource, its value as label text.
    pub fn resource_attribute(&mut self, key: &str, value: String) -> Result<(), Refused> {
        if RESERVED.contains(&key) {
            self.resource_refusal = Some(format!(
                "the resource attribute `{key}` uses a key reserved for the metric's metadata"
            ));
        }
        self.charge(LABEL_SLOT + (key.len() + value.len()) as u64)?;
        self.resource.push((key.to_owned(), value));
        Ok(())
    }

    /// An empty list for a point's attributes, with room for the labels
    /// [`point`](Self::point) adds to it, so that a point's labels take one
    /// allocation.
    pub fn attributes(&self) -> Vec<(String, String)> {
        Vec::with_capacity(self.resource.len() + self.meta.len() + 4)
    }

    /// A new metric starts: its points follow.
    pub fn begin_metric(&mut self, name: &str, unit: &str, kind: Kind) {
        self.name = SensorName::intern_str(name);
        self.meta.clear();
        if !unit.is_empty() {
            self.meta.push((UNIT, unit.to_owned()));
        }
        if let Kind::Sum {
            temporality,
            monotonic,
        } = kind
        {
            let temporality = match temporality {
                1 => "delta",
                2 => "cumulative",
                _ => "unspecified",
            };
            self.meta.push((TEMPORALITY, temporality.to_owned()));
            self.meta.push((
                MONOTONIC,
                if monotonic { "true" } else { "false" }.to_owned(),
            ));
        }
    }

    /// One number point of the current metric: its attributes (as label
    /// text, in the order sent), time and value (`None` when the point
    /// carries none, or flags it as having none).
    pub fn point(
        &mut self,
        attributes: Vec<(String, String)>,
        time_unix_nano: u64,
        value: Option<Value>,
    ) -> Result<(), Refused> {
        self.count_point()?;
        if let Err(reason) = self.check(&attributes, value) {
            self.reject(1, reason);
            return Ok(());
        }
        // In `from_pairs` the later of a key wins: the resource's first.
        let mut pairs = attributes;
        pairs.splice(0..0, self.resource.iter().cloned());
        pairs.extend(self.meta.iter().map(|(k, v)| ((*k).to_owned(), v.clone())));
        let labels = Labels::from_pairs(pairs);
        if let Err(reason) = self.limits.check_label_count(labels.len()).and_then(|()| {
            labels
                .iter()
                .try_for_each(|(k, v)| self.limits.check_label(k, v))
        }) {
            self.reject(1, reason);
            return Ok(());
        }
        self.charge(
            std::mem::size_of::<Reading>() as u64
                + labels.len() as u64 * LABEL_SLOT
                + (self.name.len() + labels.text_bytes()) as u64,
        )?;
        let created_at = (time_unix_nano != 0).then(|| {
            let seconds = (time_unix_nano / 1_000_000_000) as i64;
            let nanos = (time_unix_nano % 1_000_000_000) as u32;
            // u64 nanoseconds end in the year 2554, well within Timestamp's range.
            Timestamp::new(seconds, nanos)
        });
        self.readings.push(Reading {
            sensor_name: self.name.clone(),
            labels,
            value,
            created_at: created_at.flatten(),
            received_at: self.received_at,
        });
        Ok(())
    }

    /// Why a point cannot be a reading, checked before anything is built.
    fn check(&self, attributes: &[(String, String)], value: Option<Value>) -> Result<(), String> {
        if let Some(refusal) = &self.resource_refusal {
            return Err(refusal.clone());
        }
        if self.name.is_empty() {
            return Err("the metric has no name".into());
        }
        self.limits
            .check_name(&self.name)
            .map_err(|err| format!("metric `{}`: {err}", self.name))?;
        if let Some((key, _)) = attributes
            .iter()
            .find(|(key, _)| RESERVED.contains(&key.as_str()))
        {
            return Err(format!(
                "metric `{}`: the attribute `{key}` uses a key reserved for the metric's metadata",
                self.name
            ));
        }
        if value.is_some_and(|value| !value.is_finite()) {
            return Err(format!(
                "metric `{}`: a NaN or infinite value (JSON output cannot hold it)",
                self.name
            ));
        }
        Ok(())
    }

    /// `count` points of the current metric of a type the source does not
    /// take (`what`: "histogram", ...).
    pub fn unsupported(&mut self, what: &str, count: usize) -> Result<(), Refused> {
        for _ in 0..count {
            self.count_point()?;
        }
        if count > 0 {
            self.reject(
                count as u64,
                format!("{what} points are not accepted (only gauges and sums are)"),
            );
        }
        Ok(())
    }

    fn count_point(&mut self) -> Result<(), Refused> {
        self.seen += 1;
        if self.seen > self.max_points {
            return Err(Refused::TooManyPoints(self.max_points));
        }
        Ok(())
    }

    /// Counts `bytes` a decoder holds while it works (its own lists) against
    /// the budget, as the readings are.
    pub fn hold(&mut self, bytes: usize) -> Result<(), Refused> {
        self.charge(bytes as u64)
    }

    fn charge(&mut self, bytes: u64) -> Result<(), Refused> {
        self.used = self.used.saturating_add(bytes);
        if self.used > self.budget {
            return Err(Refused::TooLarge(self.budget));
        }
        Ok(())
    }

    fn reject(&mut self, count: u64, reason: String) {
        self.rejected += count;
        match self.reasons.iter_mut().find(|(known, _)| *known == reason) {
            Some((_, n)) => *n += count,
            None => self.reasons.push((reason, count)),
        }
    }

    /// The readings and the account of rejected points.
    pub fn finish(self) -> Decoded {
        let mut error_message = String::new();
        if self.rejected > 0 {
            error_message = format!("{} data point(s) rejected: ", self.rejected);
            for (i, (reason, count)) in self.reasons.iter().take(REASONS_SHOWN).enumerate() {
                if i > 0 {
                    error_message.push_str("; ");
                }
                error_message.push_str(&format!("{count} × {reason}"));
            }
            if self.reasons.len() > REASONS_SHOWN {
                error_message.push_str(&format!(
                    "; and {} other reason(s)",
                    self.reasons.len() - REASONS_SHOWN
                ));
            }
        }
        Decoded {
            readings: self.readings,
            bytes: self.used,
            rejected: self.rejected,
            error_message,
        }
    }
}

/// Label text of attribute values: strings as they are, everything else as
/// its JSON text (arrays and maps compact), with a cap past which the text
/// is cut (the point is then rejected by `max_label_value_bytes`), so that a
/// huge nested value costs no more than the cap to render.
pub struct Text {
    /// The text so far.
    pub out: String,
    cap: usize,
}

impl Text {
    /// Rendering of at most `cap` bytes (and a little beyond, to tell).
    pub fn new(cap: usize) -> Self {
        Self {
            out: String::new(),
            cap,
        }
    }

    /// Whether the text has passed its cap (more is ignored).
    pub fn full(&self) -> bool {
        self.out.len() > self.cap
    }

    /// Appends `s` as it is.
    pub fn raw(&mut self, s: &str) {
        if !self.full() {
            self.out.push_str(s);
        }
    }

    /// Appends `s` as a JSON string.
    pub fn string(&mut self, s: &str) {
        if self.full() {
            return;
        }
        self.out.push('"');
        for c in s.chars() {
            match c {
                '"' => self.out.push_str("\\\""),
                '\\' => self.out.push_str("\\\\"),
                '\n' => self.out.push_str("\\n"),
                '\r' => self.out.push_str("\\r"),
                '\t' => self.out.push_str("\\t"),
                c if (c as u32) < 0x20 => {
                    self.out.push_str(&format!("\\u{:04x}", c as u32));
                }
                c => self.out.push(c),
            }
        }
        self.out.push('"');
    }

    /// Appends an integer.
    pub fn int(&mut self, value: i64) {
        self.raw(itoa::Buffer::new().format(value));
    }

    /// Appends a double as JSON writes it (`1.0`, `2.5e-7`); NaN and the
    /// infinities as protobuf's JSON spells them.
    pub fn double(&mut self, value: f64, nested: bool) {
        if value.is_finite() {
            let mut buf = Vec::new();
            sink_api::json::write_value(Value::Float(value), &mut buf);
            self.raw(std::str::from_utf8(&buf).unwrap_or("0"));
        } else {
            let word = if value.is_nan() {
                "NaN"
            } else if value > 0.0 {
                "Infinity"
            } else {
                "-Infinity"
            };
            if nested {
                self.string(word)
            } else {
                self.raw(word)
            }
        }
    }

    /// Appends a boolean.
    pub fn bool(&mut self, value: bool) {
        self.raw(if value { "true" } else { "false" });
    }

    /// Appends a string value: itself at the top, a JSON string when nested.
    pub fn text(&mut self, s: &str, nested: bool) {
        if nested { self.string(s) } else { self.raw(s) }
    }

    /// Appends the absence of a value: nothing at the top, `null` nested.
    pub fn empty(&mut self, nested: bool) {
        if nested {
            self.raw("null");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn points(limits: &ReadingLimits) -> Points<'_> {
        Points::new(Timestamp::new(0, 0).unwrap(), limits, 100, 1 << 20)
    }

    #[test]
    fn a_point_takes_the_resource_then_its_own_attributes_then_the_metadata() {
        let limits = ReadingLimits::default();
        let mut p = points(&limits);
        p.begin_resource();
        p.resource_attribute("host", "a".into()).unwrap();
        p.resource_attribute("zone", "r".into()).unwrap();
        p.begin_metric(
            "requests",
            "1",
            Kind::Sum {
                temporality: 2,
                monotonic: true,
            },
        );
        p.point(
            vec![("zone".into(), "p".into())],
            1_795_860_000_500_000_000,
            Some(Value::Int(7)),
        )
        .unwrap();
        let decoded = p.finish();
        assert_eq!(decoded.rejected, 0);
        let r = &decoded.readings[0];
        assert_eq!(r.sensor_name, "requests");
        assert_eq!(r.value, Some(Value::Int(7)));
        assert_eq!(r.created_at, Timestamp::new(1_795_860_000, 500_000_000));
        let labels: Vec<_> = r.labels.iter().collect();
        assert_eq!(
            labels,
            [
                ("host", "a"),
                ("otlp.monotonic", "true"),
                ("otlp.temporality", "cumulative"),
                ("otlp.unit", "1"),
                ("zone", "p"),
            ]
        );
    }

    #[test]
    fn bad_points_are_rejected_alone_with_their_reasons() {
        let limits = ReadingLimits {
            max_labels: 1,
            ..ReadingLimits::default()
        };
        let mut p = points(&limits);
        p.begin_resource();
        p.begin_metric("m", "", Kind::Gauge);
        p.point(vec![], 0, Some(Value::Float(f64::NAN))).unwrap();
        p.point(vec![("otlp.unit".into(), "x".into())], 0, None)
            .unwrap();
        p.point(
            vec![("a".into(), "1".into()), ("b".into(), "2".into())],
            0,
            None,
        )
        .unwrap();
        p.point(vec![("a".into(), "1".into())], 0, Some(Value::Int(1)))
            .unwrap();
        p.unsupported("histogram", 2).unwrap();
        let decoded = p.finish();
        assert_eq!(decoded.readings.len(), 1);
        assert_eq!(decoded.readings[0].created_at, None);
        assert_eq!(decoded.rejected, 5);
        assert!(
            decoded
                .error_message
                .starts_with("5 data point(s) rejected: 1 × metric `m`: a NaN"),
            "{}",
            decoded.error_message
        );
        assert!(decoded.error_message.contains("and 1 other reason"));
    }

    #[test]
    fn past_the_budget_or_the_point_count_the_request_is_refused() {
        let limits = ReadingLimits::default();
        let mut p = Points::new(Timestamp::new(0, 0).unwrap(), &limits, 2, 1 << 20);
        p.begin_metric("m", "", Kind::Gauge);
        p.point(vec![], 0, None).unwrap();
        p.point(vec![], 0, None).unwrap();
        assert_eq!(p.point(vec![], 0, None), Err(Refused::TooManyPoints(2)));
        let mut p = Points::new(Timestamp::new(0, 0).unwrap(), &limits, 100, 200);
        p.begin_metric("m", "", Kind::Gauge);
        let big = "v".repeat(300);
        assert_eq!(
            p.point(vec![("k".into(), big)], 0, None),
            Err(Refused::TooLarge(200))
        );
    }

    #[test]
    fn text_renders_json_and_stops_at_its_cap() {
        let mut t = Text::new(100);
        t.raw("[");
        t.string("a\"b\n\u{1}");
        t.raw(",");
        t.double(1.0, true);
        t.raw(",");
        t.double(f64::NAN, true);
        t.raw("]");
        assert_eq!(t.out, r#"["a\"b\n\u0001",1.0,"NaN"]"#);
        let mut t = Text::new(4);
        t.string("abcdefgh");
        t.string("ignored");
        assert_eq!(t.out, "\"abcdefgh\"");
        assert!(t.full());
    }
}

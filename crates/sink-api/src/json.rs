//! The JSON lines the built-in sinks write, shared so that custom sinks can
//! write the same format.

use std::borrow::Cow;

use serde::{Deserialize, Deserializer, Serialize};

use crate::{Labels, Reading, SensorName, Timestamp, Value};

/// How readings are laid out as JSON lines.
///
/// ```
/// use sink_api::json::{Layout, encode_batch};
/// use sink_api::{Labels, Reading, Timestamp, Value};
/// let reading = Reading {
///     sensor_name: "t1".into(),
///     labels: Labels::new(),
///     value: Some(Value::Int(42)),
///     created_at: Timestamp::new(1_795_860_000, 0),
///     received_at: Timestamp::new(1_795_860_000, 512_000_000).unwrap(),
/// };
/// let mut out = Vec::new();
/// encode_batch(Layout::Value, &[reading], Timestamp::now(), &mut out);
/// assert_eq!(
///     String::from_utf8(out).unwrap(),
///     "{\"sensor_name\":\"t1\",\"sensor_value\":42,\"created_at\":\"2026-11-28T10:00:00Z\",\
///      \"received_at\":\"2026-11-28T10:00:00.512Z\"}\n"
/// );
/// ```
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    /// One line per reading: `{"sensor_name":…,"labels":{…},"sensor_value":…,"created_at":…,"received_at":…}`
    /// (`labels` only when the reading has some).
    #[default]
    Value,
    /// One line per batch, as the original Go service wrote its log file.
    Batch,
}

/// Appends `readings` to `out` as JSON lines in `layout`; `now` stamps a
/// `batch` line. Writes nothing for an empty batch, so no empty line or batch
/// ever reaches a file.
pub fn encode_batch(layout: Layout, readings: &[Reading], now: Timestamp, out: &mut Vec<u8>) {
    if readings.is_empty() {
        return;
    }
    match layout {
        Layout::Value => {
            let mut encoder = ReadingEncoder::default();
            for reading in readings {
                encoder.encode(reading, out);
                out.push(b'\n');
            }
        }
        Layout::Batch => {
            out.extend_from_slice(br#"{"level":"info","ts":""#);
            now.write_rfc3339(out);
            out.extend_from_slice(br#"","msg":"sensor values batch received","timestamp":"#);
            out.extend_from_slice(itoa::Buffer::new().format(now.seconds()).as_bytes());
            out.extend_from_slice(br#","messageCount":"#);
            out.extend_from_slice(itoa::Buffer::new().format(readings.len()).as_bytes());
            out.extend_from_slice(br#","values":["#);
            let mut encoder = ReadingEncoder::default();
            for (i, reading) in readings.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                encoder.encode(reading, out);
            }
            out.extend_from_slice(b"]}\n");
        }
    }
}

/// Appends one reading as a JSON object (no newline).
pub fn encode_reading(reading: &Reading, out: &mut Vec<u8>) {
    ReadingEncoder::default().encode(reading, out);
}

/// Encodes readings one after another, remembering the text of the last
/// timestamps written: the readings of a batch share `received_at`, and
/// often `created_at`, and formatting timestamps was the largest cost of
/// encoding in the profile.
#[derive(Default)]
struct ReadingEncoder {
    created_at: TimestampText,
    received_at: TimestampText,
}

impl ReadingEncoder {
    fn encode(&mut self, reading: &Reading, out: &mut Vec<u8>) {
        out.extend_from_slice(br#"{"sensor_name":"#);
        write_string(&reading.sensor_name, out);
        if !reading.labels.is_empty() {
            out.extend_from_slice(br#","labels":{"#);
            for (i, (key, value)) in reading.labels.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_string(key, out);
                out.push(b':');
                write_string(value, out);
            }
            out.push(b'}');
        }
        out.extend_from_slice(br#","sensor_value":"#);
        match reading.value {
            Some(value) => write_value(value, out),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(br#","created_at":"#);
        match reading.created_at {
            Some(created_at) => self.created_at.write_quoted(created_at, out),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(br#","received_at":"#);
        self.received_at.write_quoted(reading.received_at, out);
        out.push(b'}');
    }
}

/// Appends `value` as a JSON number: an integer as its digits, a float in
/// the shortest form that reads back to the same `f64`, always with a `.` or
/// an exponent (`3.0`, `1e21`) so that a reader tells it from an integer.
/// NaN and the infinities, which JSON cannot write and the built-in sources
/// refuse, are written `null`.
///
/// ```
/// use sink_api::{Value, json::write_value};
/// let text = |value| {
///     let mut out = Vec::new();
///     write_value(value, &mut out);
///     String::from_utf8(out).unwrap()
/// };
/// assert_eq!(text(Value::Int(-3)), "-3");
/// assert_eq!(text(Value::Float(3.0)), "3.0");
/// assert_eq!(text(Value::Float(0.1)), "0.1");
/// assert_eq!(text(Value::Float(1e21)), "1e21");
/// assert_eq!(text(Value::Float(f64::NAN)), "null");
/// ```
#[inline]
pub fn write_value(value: Value, out: &mut Vec<u8>) {
    match value {
        Value::Int(value) => out.extend_from_slice(itoa::Buffer::new().format(value).as_bytes()),
        Value::Float(value) if value.is_finite() => {
            out.extend_from_slice(ryu::Buffer::new().format_finite(value).as_bytes())
        }
        Value::Float(_) => out.extend_from_slice(b"null"),
    }
}

/// A reading read from JSON in the shape [`encode_reading`] writes, where
/// every field but `sensor_value` may be left out: a source fills in what is
/// missing (the name from a topic, `received_at` from its clock).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedReading {
    /// `sensor_name`, if given (interned: lines of one sensor share it).
    pub sensor_name: Option<SensorName>,
    /// `labels`, empty if not given.
    pub labels: Labels,
    /// `sensor_value`: a number (an integer without `.` or exponent, else a
    /// float) or `null`.
    pub value: Option<Value>,
    /// `created_at`, if given and not `null`.
    pub created_at: Option<Timestamp>,
    /// `received_at`, if given.
    pub received_at: Option<Timestamp>,
}

impl ParsedReading {
    /// The reading, with `sensor_name` and `received_at` taken from the JSON
    /// when it has them and from the arguments when it does not.
    pub fn into_reading(self, sensor_name: &str, received_at: Timestamp) -> Reading {
        Reading {
            sensor_name: self
                .sensor_name
                .unwrap_or_else(|| SensorName::intern_str(sensor_name)),
            labels: self.labels,
            value: self.value,
            created_at: self.created_at,
            received_at: self.received_at.unwrap_or(received_at),
        }
    }
}

/// Why JSON did not read as readings.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ParseError(String);

/// Reads one JSON object in the shape [`encode_reading`] writes.
///
/// ```
/// use sink_api::{Value, json::parse_reading};
/// let r = parse_reading(br#"{"labels":{"site":"a"},"sensor_value":21.5}"#).unwrap();
/// assert_eq!(r.value, Some(Value::Float(21.5)));
/// assert_eq!(r.labels.get("site"), Some("a"));
/// assert!(parse_reading(br#"{"sensor_name":"t1"}"#).is_err()); // no value, not even null
/// ```
pub fn parse_reading(json: &[u8]) -> Result<ParsedReading, ParseError> {
    let object: JsonReading =
        serde_json::from_slice(json).map_err(|err| ParseError(err.to_string()))?;
    object.parsed()
}

/// Reads a JSON object as [`parse_reading`] does, or an array of them.
///
/// ```
/// use sink_api::json::parse_readings;
/// let all = parse_readings(br#"[{"sensor_value":1},{"sensor_value":null}]"#).unwrap();
/// assert_eq!(all.len(), 2);
/// assert_eq!(all[1].value, None);
/// ```
pub fn parse_readings(json: &[u8]) -> Result<Vec<ParsedReading>, ParseError> {
    let is_array = json.iter().find(|byte| !byte.is_ascii_whitespace()) == Some(&b'[');
    if is_array {
        let many: Vec<JsonReading> =
            serde_json::from_slice(json).map_err(|err| ParseError(err.to_string()))?;
        many.into_iter()
            .enumerate()
            .map(|(i, object)| {
                object
                    .parsed()
                    .map_err(|ParseError(why)| ParseError(format!("[{i}]: {why}")))
            })
            .collect()
    } else {
        parse_reading(json).map(|one| vec![one])
    }
}

/// One reading's JSON object as it arrives.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonReading<'a> {
    #[serde(borrow, default)]
    sensor_name: Option<Cow<'a, str>>,
    #[serde(default)]
    labels: Labels,
    /// `None`: the key is missing; `Some(None)`: it is `null`.
    #[serde(default, deserialize_with = "present")]
    sensor_value: Option<Option<serde_json::Number>>,
    #[serde(borrow, default)]
    created_at: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    received_at: Option<Cow<'a, str>>,
}

/// Deserializes a key that is there, `null` or not.
fn present<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Option<serde_json::Number>>, D::Error> {
    Option::deserialize(deserializer).map(Some)
}

impl JsonReading<'_> {
    fn parsed(self) -> Result<ParsedReading, ParseError> {
        let value = match self.sensor_value {
            None => {
                return Err(ParseError(
                    "missing `sensor_value` (a number, or null for no value)".into(),
                ));
            }
            Some(None) => None,
            Some(Some(number)) => Some(number_value(&number)?),
        };
        let time = |text: Option<Cow<str>>, key: &str| {
            text.map(|text| {
                Timestamp::parse_rfc3339(&text).ok_or_else(|| {
                    ParseError(format!(
                        "`{key}`: `{text}` is not an RFC 3339 time in the years 0001 to 9999"
                    ))
                })
            })
            .transpose()
        };
        Ok(ParsedReading {
            created_at: time(self.created_at, "created_at")?,
            received_at: time(self.received_at, "received_at")?,
            sensor_name: self.sensor_name.as_deref().map(SensorName::intern_str),
            labels: self.labels,
            value,
        })
    }
}

/// An integer when the text had no `.` or exponent, else a float.
fn number_value(number: &serde_json::Number) -> Result<Value, ParseError> {
    if let Some(int) = number.as_i64() {
        Ok(Value::Int(int))
    } else if number.is_u64() {
        Err(ParseError(format!(
            "`sensor_value`: {number} is beyond the 64-bit integer range (write it as a float)"
        )))
    } else {
        number
            .as_f64()
            .filter(|float| float.is_finite())
            .map(Value::Float)
            .ok_or_else(|| ParseError(format!("`sensor_value`: {number} is not a finite number")))
    }
}

/// The quoted RFC 3339 text of a timestamp written earlier.
#[derive(Default)]
struct TimestampText {
    last: Option<Timestamp>,
    text: Vec<u8>,
}

/// Length of `"YYYY-MM-DDTHH:MM:SS`, the opening quote included.
const QUOTED_DATE_TIME: usize = 20;

impl TimestampText {
    /// Appends `timestamp` as a JSON string, formatting only what differs
    /// from the remembered one: nothing for the same instant, the fraction
    /// alone within the same second (readings taken together share their
    /// second), and everything only when the second changes.
    fn write_quoted(&mut self, timestamp: Timestamp, out: &mut Vec<u8>) {
        match self.last {
            Some(last) if last == timestamp => out.extend_from_slice(&self.text),
            Some(last) if last.seconds() == timestamp.seconds() => {
                out.extend_from_slice(&self.text[..QUOTED_DATE_TIME]);
                timestamp.write_fraction_and_zone(out);
                out.push(b'"');
            }
            _ => {
                self.text.clear();
                self.text.push(b'"');
                timestamp.write_rfc3339(&mut self.text);
                self.text.push(b'"');
                self.last = Some(timestamp);
                out.extend_from_slice(&self.text);
            }
        }
    }
}

/// Appends `text` as a JSON string. Sensor names and labels rarely need
/// escaping, so they are copied as they are unless a byte needs it; serde_json
/// escapes the rest. Inlined: it runs up to three times per reading.
#[inline]
fn write_string(text: &str, out: &mut Vec<u8>) {
    if text.bytes().all(|byte| PLAIN[usize::from(byte)]) {
        out.reserve(text.len() + 2);
        out.push(b'"');
        out.extend_from_slice(text.as_bytes());
        out.push(b'"');
    } else {
        write_escaped(text, out);
    }
}

/// Which bytes go into a JSON string as they are: all but the control
/// characters, `"` and `\\`. A table, as one lookup per byte costs less than
/// three comparisons.
const PLAIN: [bool; 256] = {
    let mut plain = [true; 256];
    let mut byte = 0;
    while byte < 0x20 {
        plain[byte] = false;
        byte += 1;
    }
    plain[b'"' as usize] = false;
    plain[b'\\' as usize] = false;
    plain
};

#[cold]
#[inline(never)]
fn write_escaped(text: &str, out: &mut Vec<u8>) {
    // Writing to a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, text);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(name: &str, value: Option<i64>) -> Reading {
        Reading {
            sensor_name: name.into(),
            labels: Labels::new(),
            value: value.map(Value::Int),
            created_at: None,
            received_at: Timestamp::new(0, 0).unwrap(),
        }
    }

    #[test]
    fn value_lines_are_valid_json_with_nulls_and_escapes() {
        let mut out = Vec::new();
        let batch = [
            reading("quote\"and\\newline\n", None),
            reading("ü", Some(-7)),
        ];
        encode_batch(Layout::Value, &batch, Timestamp::now(), &mut out);
        let lines: Vec<serde_json::Value> = out
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["sensor_name"], "quote\"and\\newline\n");
        assert!(lines[0]["sensor_value"].is_null());
        assert!(lines[0]["created_at"].is_null());
        assert_eq!(lines[1]["sensor_value"], -7);
        assert_eq!(lines[1]["received_at"], "1970-01-01T00:00:00Z");
    }

    #[test]
    fn batch_line_matches_the_original_format() {
        let mut out = Vec::new();
        let now = Timestamp::new(1_795_860_000, 0).unwrap();
        encode_batch(
            Layout::Batch,
            &[reading("a", Some(1)), reading("b", Some(2))],
            now,
            &mut out,
        );
        assert_eq!(out.iter().filter(|&&b| b == b'\n').count(), 1);
        let line: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(line["level"], "info");
        assert_eq!(line["ts"], "2026-11-28T10:00:00Z");
        assert_eq!(line["msg"], "sensor values batch received");
        assert_eq!(line["timestamp"], 1_795_860_000);
        assert_eq!(line["messageCount"], 2);
        assert_eq!(line["values"][1]["sensor_name"], "b");
    }

    #[test]
    fn strings_are_escaped_exactly_as_serde_json_escapes_them() {
        for text in [
            "plain",
            "",
            "quote\"",
            "back\\slash",
            "tab\t",
            "\u{1}",
            "\u{1f}",
            "\u{7f}",
            "ü€😀",
            "a/b",
        ] {
            let mut out = Vec::new();
            write_string(text, &mut out);
            assert_eq!(out, serde_json::to_vec(text).unwrap(), "{text:?}");
        }
    }

    #[test]
    fn repeated_and_changing_timestamps_are_each_written_right() {
        let at = |seconds, nanos| Timestamp::new(seconds, nanos).unwrap();
        let mut batch = vec![
            reading("a", Some(1)),
            reading("b", Some(2)),
            reading("c", None),
            reading("d", Some(4)),
        ];
        batch[0].created_at = Some(at(10, 0));
        batch[1].created_at = Some(at(10, 0));
        batch[3].created_at = Some(at(10, 5_000));
        // Same second, fractions of every length, and back to none.
        for (i, nanos) in [123_000_000, 1, 0, 999_999_000, 7_000_000]
            .into_iter()
            .enumerate()
        {
            let mut extra = reading(&format!("same-second-{i}"), None);
            extra.created_at = Some(at(10, nanos));
            batch.push(extra);
        }
        batch.push(reading("next-second", None));
        batch[9].created_at = Some(at(11, 5_000));
        batch[2].received_at = at(20, 0);
        batch[3].received_at = at(21, 0);
        let mut out = Vec::new();
        encode_batch(Layout::Value, &batch, Timestamp::now(), &mut out);
        // Each line is what a fresh encoder writes for that reading alone.
        let mut expected = Vec::new();
        for reading in &batch {
            encode_reading(reading, &mut expected);
            expected.push(b'\n');
        }
        assert_eq!(
            String::from_utf8(out).unwrap(),
            String::from_utf8(expected).unwrap()
        );
        let mut alone = Vec::new();
        encode_reading(&batch[3], &mut alone);
        let line: serde_json::Value = serde_json::from_slice(&alone).unwrap();
        assert_eq!(line["created_at"], "1970-01-01T00:00:10.000005Z");
        assert_eq!(line["received_at"], "1970-01-01T00:00:21Z");
    }

    #[test]
    fn empty_batch_writes_nothing() {
        let mut out = Vec::new();
        encode_batch(Layout::Batch, &[], Timestamp::now(), &mut out);
        encode_batch(Layout::Value, &[], Timestamp::now(), &mut out);
        assert!(out.is_empty());
    }
}

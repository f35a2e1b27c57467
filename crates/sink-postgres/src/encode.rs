//! Readings as COPY data (binary or text format) and as the arrays of an
//! `INSERT … SELECT FROM unnest(…)`, in the column order of [`COLUMNS`].
//!
//! Timestamps are written with microsecond precision, PostgreSQL's: the
//! nanoseconds below a microsecond are cut off (rounded down, towards the
//! past), the same in every method, so that a reading never moves into the
//! next microsecond, second or day.

use serde::ser::{Serialize, Serializer};
use sink_api::{Labels, Reading, Timestamp, Value};

/// The columns written, in this order.
pub const COLUMNS: [&str; 6] = [
    "sensor_name",
    "labels",
    "sensor_value",
    "sensor_value_float",
    "created_at",
    "received_at",
];

/// Seconds from the Unix epoch to PostgreSQL's, 2000-01-01T00:00:00Z.
const POSTGRES_EPOCH: i64 = 946_684_800;

/// The 19-byte signature, flags and header extension length that open
/// binary COPY data.
const BINARY_HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";

/// Why a reading cannot be written: PostgreSQL refuses a NUL character in
/// `text` and `jsonb`, and one such reading would fail the whole transaction.
pub fn refused(reading: &Reading) -> Option<&'static str> {
    let nul = |text: &str| text.as_bytes().contains(&0);
    (nul(&reading.sensor_name) || reading.labels.iter().any(|(k, v)| nul(k) || nul(v)))
        .then_some("nul")
}

/// Microseconds since PostgreSQL's epoch, rounded down.
pub fn postgres_micros(at: Timestamp) -> i64 {
    (at.seconds() - POSTGRES_EPOCH) * 1_000_000 + i64::from(at.nanos() / 1_000)
}

/// Microseconds since the Unix epoch, rounded down.
pub fn unix_micros(at: Timestamp) -> i64 {
    at.seconds() * 1_000_000 + i64::from(at.nanos() / 1_000)
}

/// The labels as a JSON object, written straight into a buffer.
struct LabelsJson<'a>(&'a Labels);

impl Serialize for LabelsJson<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.0.iter())
    }
}

/// Appends the labels as a JSON object (`{}` when there are none).
pub fn write_labels(labels: &Labels, out: &mut Vec<u8>) {
    if labels.is_empty() {
        out.extend_from_slice(b"{}");
    } else {
        // Writing strings into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, &LabelsJson(labels));
    }
}

/// What a `labels` column holds: `jsonb` takes a version byte before the
/// text in binary COPY; `json` takes the text alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LabelsType {
    /// `jsonb`.
    Jsonb,
    /// `json`.
    Json,
}

/// Writes readings as COPY data in one format; the caller sends the buffer
/// on whenever it has grown past its chunk size, so memory stays bounded
/// whatever the batch.
pub trait CopyEncoder: Send {
    /// What starts the data.
    fn header(&self, out: &mut Vec<u8>);
    /// Appends one reading.
    fn row(&mut self, reading: &Reading, out: &mut Vec<u8>);
    /// What ends the data.
    fn trailer(&self, out: &mut Vec<u8>);
}

/// PostgreSQL's binary COPY format: no parsing on the server.
pub struct Binary {
    pub labels: LabelsType,
    /// Reused for each reading's labels, whose length precedes them.
    scratch: Vec<u8>,
}

impl Binary {
    /// An encoder for a table whose `labels` column is `labels`.
    pub fn new(labels: LabelsType) -> Self {
        Self {
            labels,
            scratch: Vec::new(),
        }
    }
}

fn field(bytes: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(bytes.len() as i32).to_be_bytes());
    out.extend_from_slice(bytes);
}

fn null(out: &mut Vec<u8>) {
    out.extend_from_slice(&(-1i32).to_be_bytes());
}

impl CopyEncoder for Binary {
    fn header(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(BINARY_HEADER);
    }

    fn row(&mut self, reading: &Reading, out: &mut Vec<u8>) {
        out.extend_from_slice(&(COLUMNS.len() as i16).to_be_bytes());
        field(reading.sensor_name.as_bytes(), out);
        self.scratch.clear();
        if self.labels == LabelsType::Jsonb {
            self.scratch.push(1);
        }
        write_labels(&reading.labels, &mut self.scratch);
        field(&self.scratch, out);
        match reading.value {
            Some(Value::Int(value)) => {
                field(&value.to_be_bytes(), out);
                null(out);
            }
            Some(Value::Float(value)) => {
                null(out);
                field(&value.to_be_bytes(), out);
            }
            None => {
                null(out);
                null(out);
            }
        }
        match reading.created_at {
            Some(at) => field(&postgres_micros(at).to_be_bytes(), out),
            None => null(out),
        }
        field(&postgres_micros(reading.received_at).to_be_bytes(), out);
    }

    fn trailer(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&(-1i16).to_be_bytes());
    }
}

/// PostgreSQL's text COPY format: tab-separated, `\N` for null, backslash
/// escapes.
#[derive(Default)]
pub struct Text {
    scratch: Vec<u8>,
}

/// Appends `bytes` escaped for the text COPY format.
fn escaped(bytes: &[u8], out: &mut Vec<u8>) {
    for &byte in bytes {
        match byte {
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\t' => out.extend_from_slice(b"\\t"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            _ => out.push(byte),
        }
    }
}

/// Appends a timestamp as RFC 3339, rounded down to the microsecond.
fn text_timestamp(at: Timestamp, out: &mut Vec<u8>) {
    Timestamp::new(at.seconds(), at.nanos() / 1_000 * 1_000)
        .unwrap_or(at)
        .write_rfc3339(out);
}

impl CopyEncoder for Text {
    fn header(&self, _: &mut Vec<u8>) {}

    fn row(&mut self, reading: &Reading, out: &mut Vec<u8>) {
        escaped(reading.sensor_name.as_bytes(), out);
        out.push(b'\t');
        self.scratch.clear();
        write_labels(&reading.labels, &mut self.scratch);
        escaped(&self.scratch, out);
        out.push(b'\t');
        match reading.value {
            Some(Value::Int(value)) => {
                out.extend_from_slice(itoa::Buffer::new().format(value).as_bytes());
                out.extend_from_slice(b"\t\\N\t");
            }
            Some(Value::Float(value)) => {
                out.extend_from_slice(b"\\N\t");
                if value.is_finite() {
                    out.extend_from_slice(ryu::Buffer::new().format_finite(value).as_bytes());
                } else if value.is_nan() {
                    out.extend_from_slice(b"NaN");
                } else if value > 0.0 {
                    out.extend_from_slice(b"Infinity");
                } else {
                    out.extend_from_slice(b"-Infinity");
                }
                out.push(b'\t');
            }
            None => out.extend_from_slice(b"\\N\t\\N\t"),
        }
        match reading.created_at {
            Some(at) => text_timestamp(at, out),
            None => out.extend_from_slice(b"\\N"),
        }
        out.push(b'\t');
        text_timestamp(reading.received_at, out);
        out.push(b'\n');
    }

    fn trailer(&self, _: &mut Vec<u8>) {}
}

/// The columns of some readings as arrays, the parameters of the `insert`
/// method's statement.
#[derive(Debug, Default)]
pub struct Columns<'a> {
    pub names: Vec<&'a str>,
    pub labels: Vec<String>,
    pub ints: Vec<Option<i64>>,
    pub floats: Vec<Option<f64>>,
    pub created: Vec<Option<i64>>,
    pub received: Vec<i64>,
}

impl<'a> Columns<'a> {
    /// The columns of `readings`.
    pub fn of(readings: impl Iterator<Item = &'a Reading>) -> Self {
        let mut columns = Self::default();
        for reading in readings {
            columns.names.push(&reading.sensor_name);
            let mut labels = Vec::new();
            write_labels(&reading.labels, &mut labels);
            columns
                .labels
                .push(String::from_utf8(labels).unwrap_or_default());
            columns.ints.push(reading.value.and_then(Value::as_i64));
            columns.floats.push(match reading.value {
                Some(Value::Float(value)) => Some(value),
                _ => None,
            });
            columns.created.push(reading.created_at.map(unix_micros));
            columns.received.push(unix_micros(reading.received_at));
        }
        columns
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(name: &str, value: Option<Value>) -> Reading {
        Reading {
            sensor_name: name.into(),
            labels: Labels::from_iter([("site", "n\"orth\\"), ("unit", "°C")]),
            value,
            created_at: Timestamp::new(946_684_800, 1_999),
            received_at: Timestamp::new(946_684_801, 512_000_999).unwrap(),
        }
    }

    #[test]
    fn microseconds_are_rounded_down_from_postgres_epoch() {
        assert_eq!(
            postgres_micros(Timestamp::new(946_684_800, 999).unwrap()),
            0
        );
        assert_eq!(
            postgres_micros(Timestamp::new(946_684_799, 999_999_999).unwrap()),
            -1
        );
        assert_eq!(unix_micros(Timestamp::new(1, 2_500).unwrap()), 1_000_002);
    }

    #[test]
    fn text_rows_escape_what_copy_reads_specially() {
        let mut out = Vec::new();
        let mut text = Text::default();
        text.row(&reading("a\tb\\c\nd\re", Some(Value::Int(-3))), &mut out);
        text.row(
            &reading("f", Some(Value::Float(f64::NEG_INFINITY))),
            &mut out,
        );
        text.row(&reading("g", None), &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "a\\tb\\\\c\\nd\\re\t{\"site\":\"n\\\\\"orth\\\\\\\\\",\"unit\":\"°C\"}\t-3\t\\N\t2000-01-01T00:00:00.000001Z\t2000-01-01T00:00:01.512Z\n\
             f\t{\"site\":\"n\\\\\"orth\\\\\\\\\",\"unit\":\"°C\"}\t\\N\t-Infinity\t2000-01-01T00:00:00.000001Z\t2000-01-01T00:00:01.512Z\n\
             g\t{\"site\":\"n\\\\\"orth\\\\\\\\\",\"unit\":\"°C\"}\t\\N\t\\N\t2000-01-01T00:00:00.000001Z\t2000-01-01T00:00:01.512Z\n"
        );
    }

    #[test]
    fn binary_rows_hold_six_fields_with_lengths() {
        let mut out = Vec::new();
        let mut binary = Binary::new(LabelsType::Jsonb);
        binary.header(&mut out);
        assert_eq!(out.len(), 19);
        out.clear();
        let mut plain = reading("t", Some(Value::Float(1.5)));
        plain.labels = Labels::new();
        plain.created_at = None;
        binary.row(&plain, &mut out);
        let mut expected = vec![0, 6, 0, 0, 0, 1, b't', 0, 0, 0, 3, 1, b'{', b'}'];
        expected.extend_from_slice(&(-1i32).to_be_bytes());
        expected.extend_from_slice(&8i32.to_be_bytes());
        expected.extend_from_slice(&1.5f64.to_be_bytes());
        expected.extend_from_slice(&(-1i32).to_be_bytes());
        expected.extend_from_slice(&8i32.to_be_bytes());
        expected.extend_from_slice(&1_512_000i64.to_be_bytes());
        assert_eq!(out, expected);
    }

    #[test]
    fn a_nul_anywhere_is_refused_and_nothing_else_is() {
        assert_eq!(refused(&reading("ok ☃ \u{1}", None)), None);
        assert_eq!(refused(&reading("a\0b", None)), Some("nul"));
        let mut labelled = reading("ok", None);
        labelled.labels.insert("k", "v\0");
        assert_eq!(refused(&labelled), Some("nul"));
    }
}

//! How readings travel as NATS messages: JSON lines (the same lines
//! `json_file` writes) or protobuf (one `sensor.v1.SensorValuesRequest` per
//! message, the original's wire format), and the subject each reading goes to.

use std::collections::HashMap;

use prost::encoding::{encode_varint, encoded_len_varint};
use serde::{Deserialize, Serialize};
use sink_api::json::{Layout, encode_batch, parse_reading};
use sink_api::{Batch, Reading, ReadingLimits, Timestamp, Value};

/// The header that says how a message is encoded, so that a consumer never
/// has to guess.
pub const CONTENT_TYPE: &str = "Content-Type";
const JSON_TYPE: &str = "application/x-ndjson";
const PROTOBUF_TYPE: &str = "application/x-protobuf; proto=sensor.v1.SensorValuesRequest";

/// How a batch is encoded in a NATS message.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    /// JSON lines, one per reading, exactly as `json_file` writes them.
    #[default]
    Json,
    /// One `sensor.v1.SensorValuesRequest`, as the original's clients send;
    /// it has no `received_at`, so a consumer stamps the time JetStream
    /// stored the message.
    Protobuf,
}

impl Encoding {
    /// The value of the [`CONTENT_TYPE`] header.
    pub fn content_type(self) -> &'static str {
        match self {
            Self::Json => JSON_TYPE,
            Self::Protobuf => PROTOBUF_TYPE,
        }
    }

    /// The encoding a message says it has, or, for a message without the
    /// header, what its first byte suggests (a JSON line starts with `{`; a
    /// request starts with field 1's key, 0x0a).
    pub fn of_message(content_type: Option<&str>, payload: &[u8]) -> Self {
        match content_type {
            Some(JSON_TYPE) => Self::Json,
            Some(PROTOBUF_TYPE) => Self::Protobuf,
            _ if payload.first() == Some(&b'{') => Self::Json,
            _ => Self::Protobuf,
        }
    }

    /// Appends one reading to a message being built.
    fn append(self, reading: &Reading, out: &mut Vec<u8>) {
        match self {
            Self::Json => encode_batch(
                Layout::Value,
                std::slice::from_ref(reading),
                reading.received_at,
                out,
            ),
            Self::Protobuf => encode_item(reading, out),
        }
    }
}

/// A subject with an optional `{sensor_name}` in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubjectTemplate {
    before: String,
    /// The text after `{sensor_name}`, when the template has one.
    after: Option<String>,
}

impl SubjectTemplate {
    const PLACEHOLDER: &str = "{sensor_name}";

    /// Reads a template; the error says what is wrong with it.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (before, after) = match text.split_once(Self::PLACEHOLDER) {
            Some((before, after)) => (before, Some(after)),
            None => (text, None),
        };
        if after.is_some_and(|after| after.contains(Self::PLACEHOLDER)) {
            return Err("may hold `{sensor_name}` once".into());
        }
        // The subject with a one-letter sensor name, checked as NATS would.
        let sample = match after {
            Some(after) => format!("{before}x{after}"),
            None => before.to_string(),
        };
        if sample.is_empty()
            || sample.split('.').any(|token| token.is_empty())
            || sample.contains(|c: char| c.is_whitespace() || c == '*' || c == '>')
        {
            return Err(format!(
                "`{text}` is not a subject to publish to: dot-separated tokens, no spaces or wildcards"
            ));
        }
        Ok(Self {
            before: before.to_string(),
            after: after.map(str::to_string),
        })
    }

    /// Whether readings of different sensors may go to different subjects.
    pub fn varies(&self) -> bool {
        self.after.is_some()
    }

    /// The subject of `sensor_name`'s readings. A name is one subject token:
    /// characters a subject cannot hold there (`.`, `*`, `>`, whitespace)
    /// become `_`, and an empty name is `_`.
    pub fn render(&self, sensor_name: &str, out: &mut String) {
        out.clear();
        out.push_str(&self.before);
        if let Some(after) = &self.after {
            if sensor_name.is_empty() {
                out.push('_');
            }
            out.extend(sensor_name.chars().map(|c| {
                if c == '.' || c == '*' || c == '>' || c.is_whitespace() {
                    '_'
                } else {
                    c
                }
            }));
            out.push_str(after);
        }
    }

    /// The subjects this template can produce, as one subject filter
    /// (`telemetry.*`), for checking and creating a stream.
    pub fn filter(&self) -> String {
        match &self.after {
            Some(after) => format!("{}*{after}", self.before),
            None => self.before.clone(),
        }
    }
}

/// One NATS message to publish: a subject and the encoded readings of one
/// part of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Where it goes.
    pub subject: String,
    /// Its encoded readings.
    pub payload: Vec<u8>,
    /// How many readings it holds.
    pub readings: usize,
}

/// Splits `batch` into messages: one group per subject (in the order each
/// subject first appears), each cut so that its payload stays within
/// `max_bytes` (a single reading larger than that travels alone).
pub fn encode(
    batch: &[Reading],
    subject: &SubjectTemplate,
    encoding: Encoding,
    max_bytes: usize,
) -> Vec<Message> {
    let mut messages: Vec<Message> = Vec::new();
    let mut rendered = String::new();
    // The message still open for each subject, by index into `messages`.
    let mut open: HashMap<String, usize> = HashMap::new();
    let mut one = Vec::new();
    for reading in batch {
        subject.render(&reading.sensor_name, &mut rendered);
        one.clear();
        encoding.append(reading, &mut one);
        match open.get_mut(rendered.as_str()) {
            Some(index) if messages[*index].payload.len() + one.len() <= max_bytes => {
                let message = &mut messages[*index];
                message.payload.extend_from_slice(&one);
                message.readings += 1;
            }
            slot => {
                let index = messages.len();
                messages.push(Message {
                    subject: rendered.clone(),
                    payload: one.clone(),
                    readings: 1,
                });
                match slot {
                    Some(slot) => *slot = index,
                    None => {
                        open.insert(rendered.clone(), index);
                    }
                }
            }
        }
    }
    messages
}

/// Why a message could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Undecodable(pub String);

/// Reads the readings of one message. `stored_at` stamps readings whose
/// encoding carries no `received_at` (protobuf).
pub fn decode(
    encoding: Encoding,
    payload: &[u8],
    stored_at: Timestamp,
) -> Result<Batch, Undecodable> {
    match encoding {
        Encoding::Json => decode_json(payload),
        Encoding::Protobuf => {
            sink_stages::sources::grpc::decode_batch(payload, stored_at, &ReadingLimits::default())
                .map_err(|status| Undecodable(status.message().to_string()))
        }
    }
}

/// Reads JSON lines as `json_file` writes them: every field there, the
/// reading's own `received_at` kept.
fn decode_json(payload: &[u8]) -> Result<Batch, Undecodable> {
    let mut batch = Batch::new();
    for (number, line) in payload
        .split(|byte| *byte == b'\n')
        .enumerate()
        .filter(|(_, line)| !line.is_empty())
    {
        let bad = |what: String| Undecodable(format!("line {}: {what}", number + 1));
        let parsed = parse_reading(line).map_err(|err| bad(err.to_string()))?;
        let (Some(_), Some(received_at)) = (&parsed.sensor_name, parsed.received_at) else {
            return Err(bad("a line needs `sensor_name` and `received_at`".into()));
        };
        // Both are there: the defaults given are not used.
        batch.push(parsed.into_reading("", received_at));
    }
    Ok(batch)
}

/// Appends `reading` as field 1 (`items`) of a `SensorValuesRequest`, so
/// that concatenated items make one request.
fn encode_item(reading: &Reading, out: &mut Vec<u8>) {
    // Measurement { Int64Value sensor_value = 2; Timestamp created_at = 3;
    // DoubleValue sensor_value_float = 4; }: a wrapper present with value 0
    // is an empty message, not an absent one.
    let int = reading
        .value
        .and_then(Value::as_i64)
        .map(|v| varint_field_len(1, v as u64));
    let float = match reading.value {
        Some(Value::Float(v)) => Some(if v.to_bits() == 0 { 0 } else { 9 }),
        _ => None,
    };
    let created = reading.created_at.map(|t| {
        varint_field_len(1, t.seconds() as u64) + varint_field_len(2, u64::from(t.nanos()))
    });
    let measurement =
        int.map_or(0, nested_len) + float.map_or(0, nested_len) + created.map_or(0, nested_len);
    let name = reading.sensor_name.len();
    let labels: usize = reading
        .labels
        .iter()
        .map(|(k, v)| nested_len(label_entry_len(k, v)))
        .sum();
    let item = nested_len(name) + nested_len(measurement) + labels;

    key(1, out);
    encode_varint(item as u64, out);
    key(1, out);
    encode_varint(name as u64, out);
    out.extend_from_slice(reading.sensor_name.as_bytes());
    key(2, out);
    encode_varint(measurement as u64, out);
    if let (Some(len), Some(v)) = (int, reading.value.and_then(Value::as_i64)) {
        key(2, out);
        encode_varint(len as u64, out);
        varint_field(1, v as u64, out);
    }
    if let (Some(len), Some(Value::Float(v))) = (float, reading.value) {
        key(4, out);
        encode_varint(len as u64, out);
        if len > 0 {
            out.push(1 << 3 | 1);
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
    if let (Some(len), Some(t)) = (created, reading.created_at) {
        key(3, out);
        encode_varint(len as u64, out);
        varint_field(1, t.seconds() as u64, out);
        varint_field(2, u64::from(t.nanos()), out);
    }
    encode_labels(reading, out);
}

/// Size of a `labels` map entry: a key field and a value field, each left
/// out when empty.
fn label_entry_len(key: &str, value: &str) -> usize {
    let field = |text: &str| {
        if text.is_empty() {
            0
        } else {
            nested_len(text.len())
        }
    };
    field(key) + field(value)
}

/// Appends `labels` as field 3 entries of a `SensorValue`.
fn encode_labels(reading: &Reading, out: &mut Vec<u8>) {
    for (label, value) in reading.labels.iter() {
        key(3, out);
        encode_varint(label_entry_len(label, value) as u64, out);
        for (field, text) in [(1, label), (2, value)] {
            if !text.is_empty() {
                key(field, out);
                encode_varint(text.len() as u64, out);
                out.extend_from_slice(text.as_bytes());
            }
        }
    }
}

/// Key of length-delimited field `field` (all fields here have numbers below 16).
fn key(field: u8, out: &mut Vec<u8>) {
    out.push(field << 3 | 2);
}

/// Size of a length-delimited field holding `len` bytes.
fn nested_len(len: usize) -> usize {
    1 + encoded_len_varint(len as u64) + len
}

/// Size of a varint field; proto3 leaves a zero out.
fn varint_field_len(_field: u8, value: u64) -> usize {
    if value == 0 {
        0
    } else {
        1 + encoded_len_varint(value)
    }
}

fn varint_field(field: u8, value: u64, out: &mut Vec<u8>) {
    if value != 0 {
        out.push(field << 3);
        encode_varint(value, out);
    }
}

#[cfg(test)]
mod tests {
    use prost::Message as _;
    use sink_proto::SensorValuesRequest;

    use super::*;
    use sink_api::Labels;

    fn reading(name: &str, value: Option<i64>, created: Option<(i64, u32)>) -> Reading {
        Reading {
            sensor_name: name.into(),
            labels: Default::default(),
            value: value.map(Value::Int),
            created_at: created.and_then(|(s, n)| Timestamp::new(s, n)),
            received_at: Timestamp::new(1_795_860_000, 512_000_000).unwrap(),
        }
    }

    fn sample() -> Vec<Reading> {
        vec![
            reading("t1", Some(42), Some((1_795_860_000, 0))),
            reading("t.2", Some(0), None),
            reading("", None, Some((-62_135_596_800, 999_999_999))),
            reading("t1", Some(-7), Some((0, 1))),
            reading("ü", Some(i64::MIN), Some((253_402_300_799, 0))),
            Reading {
                labels: Labels::from_iter([("site", "north"), ("unit", "°C"), ("empty", "")]),
                value: Some(Value::Float(21.5)),
                ..reading("floats", None, None)
            },
            Reading {
                value: Some(Value::Float(-0.0)),
                ..reading("negative zero", None, None)
            },
            Reading {
                labels: Labels::from_iter([("a\"\n", "\u{1}")]),
                value: Some(Value::Float(f64::MIN_POSITIVE / 2.0)),
                ..reading("subnormal", None, None)
            },
            Reading {
                value: Some(Value::Float(0.0)),
                ..reading("zero", None, None)
            },
            Reading {
                value: Some(Value::Float(1e300)),
                ..reading("huge", None, None)
            },
        ]
    }

    #[test]
    fn protobuf_is_a_request_the_generated_code_reads() {
        let template = SubjectTemplate::parse("telemetry").unwrap();
        let messages = encode(&sample(), &template, Encoding::Protobuf, usize::MAX);
        assert_eq!(messages.len(), 1);
        let request = SensorValuesRequest::decode(&messages[0].payload[..]).unwrap();
        assert_eq!(request.items.len(), 10);
        let floats = &request.items[5];
        assert_eq!(floats.measurement.unwrap().sensor_value_float, Some(21.5));
        assert_eq!(floats.labels.get("unit").map(String::as_str), Some("°C"));
        let stored = Timestamp::new(1, 0).unwrap();
        let back = decode(Encoding::Protobuf, &messages[0].payload, stored).unwrap();
        let expected: Vec<Reading> = sample()
            .into_iter()
            .map(|r| Reading {
                received_at: stored,
                ..r
            })
            .collect();
        assert_eq!(back, expected);
    }

    #[test]
    fn json_round_trips_every_field() {
        let template = SubjectTemplate::parse("telemetry").unwrap();
        let messages = encode(&sample(), &template, Encoding::Json, usize::MAX);
        let back = decode(Encoding::Json, &messages[0].payload, Timestamp::now()).unwrap();
        assert_eq!(back, sample());
    }

    #[test]
    fn subjects_group_readings_and_sizes_cut_messages() {
        let template = SubjectTemplate::parse("telemetry.{sensor_name}.v").unwrap();
        let messages = encode(&sample(), &template, Encoding::Json, usize::MAX);
        let subjects: Vec<(&str, usize)> = messages
            .iter()
            .map(|m| (m.subject.as_str(), m.readings))
            .collect();
        assert_eq!(
            subjects,
            [
                ("telemetry.t1.v", 2),
                ("telemetry.t_2.v", 1),
                ("telemetry._.v", 1),
                ("telemetry.ü.v", 1),
                ("telemetry.floats.v", 1),
                ("telemetry.negative_zero.v", 1),
                ("telemetry.subnormal.v", 1),
                ("telemetry.zero.v", 1),
                ("telemetry.huge.v", 1)
            ]
        );
        assert_eq!(template.filter(), "telemetry.*.v");

        let many: Vec<Reading> = (0..100).map(|i| reading("s", Some(i), None)).collect();
        let plain = SubjectTemplate::parse("telemetry").unwrap();
        let cut = encode(&many, &plain, Encoding::Json, 1000);
        assert!(cut.len() > 1);
        assert!(cut.iter().all(|m| m.payload.len() <= 1000));
        assert_eq!(cut.iter().map(|m| m.readings).sum::<usize>(), 100);
        let back: Vec<Reading> = cut
            .iter()
            .flat_map(|m| decode(Encoding::Json, &m.payload, Timestamp::now()).unwrap())
            .collect();
        assert_eq!(back, many, "order kept across the cut");
    }

    #[test]
    fn bad_subjects_and_bad_messages_are_refused() {
        for bad in [
            "",
            "a..b",
            "a.*",
            "a b",
            "{sensor_name}.{sensor_name}",
            "a.>",
        ] {
            assert!(SubjectTemplate::parse(bad).is_err(), "{bad:?}");
        }
        assert!(decode(Encoding::Json, b"{\"sensor_name\":1}\n", Timestamp::now()).is_err());
        assert!(decode(Encoding::Json, b"not json", Timestamp::now()).is_err());
        assert!(decode(Encoding::Protobuf, &[0xff, 0xff, 0xff], Timestamp::now()).is_err());
        assert_eq!(Encoding::of_message(None, b"{}"), Encoding::Json);
        assert_eq!(
            Encoding::of_message(Some(PROTOBUF_TYPE), b"{"),
            Encoding::Protobuf
        );
    }
}

//! What a message's payload holds, and how it becomes readings: one number
//! as text, the JSON `json_file` writes, or the original's protobuf.

use serde::{Deserialize, Serialize};
use sink_api::json::parse_readings;
use sink_api::{Labels, Reading, ReadingLimits, SensorName, Timestamp, Value};

use crate::topic::TopicFields;

/// How a payload is read.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
pub enum Payload {
    /// One number as text (`21.5`, `-3`, `42`): an integer without `.` or
    /// exponent, else a float; named by the topic.
    #[default]
    #[serde(rename = "number")]
    Number,
    /// A JSON object in the shape `json_file` writes, or an array of them;
    /// a `sensor_name` there wins over the topic's, and its labels over the
    /// topic's.
    #[serde(rename = "json")]
    Json,
    /// A `sensor.v1.SensorValuesRequest` protobuf, as the original's nodes send.
    #[serde(rename = "sensor.v1")]
    SensorV1,
}

/// Why a message was refused: its reason as the metrics label it, and what
/// was wrong in words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// The `reason` label of `sink_mqtt_messages_refused_total`.
    pub reason: Reason,
    /// What was wrong, for the log.
    pub detail: String,
}

/// The reasons a message is refused, each a metrics label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The topic does not fit `topic_pattern`.
    Topic,
    /// The payload is over `max_payload_bytes`.
    TooLarge,
    /// `payload = "number"` and the text is not a number.
    NotANumber,
    /// `payload = "json"` and the JSON is not readings.
    BadJson,
    /// `payload = "sensor.v1"` and the protobuf does not decode.
    BadProtobuf,
    /// A value beyond the data model (not finite, past 64-bit), or a name or
    /// labels past the reading limits.
    OutOfBounds,
}

impl Reason {
    /// Every reason, for registering the metric's series up front.
    pub const ALL: [Reason; 6] = [
        Reason::Topic,
        Reason::TooLarge,
        Reason::NotANumber,
        Reason::BadJson,
        Reason::BadProtobuf,
        Reason::OutOfBounds,
    ];

    /// The metrics label.
    pub fn label(self) -> &'static str {
        match self {
            Reason::Topic => "topic_mismatch",
            Reason::TooLarge => "too_large",
            Reason::NotANumber => "not_a_number",
            Reason::BadJson => "bad_json",
            Reason::BadProtobuf => "bad_protobuf",
            Reason::OutOfBounds => "out_of_bounds",
        }
    }
}

/// What one label takes beside its text: its key's and value's `String`s.
const LABEL_SLOT: usize = std::mem::size_of::<(String, String)>();

fn refused(reason: Reason, detail: impl Into<String>) -> Refused {
    Refused {
        reason,
        detail: detail.into(),
    }
}

impl Payload {
    /// The most a message of `payload` bytes on a topic of `topic` bytes can
    /// hold in memory until its readings are written: the message itself,
    /// then its readings (each JSON reading takes at least 18 bytes,
    /// `{"sensor_value":1}`, and each protobuf item at least 2), each with a
    /// name and labels from the topic, and the text and label slots the
    /// payload can carry. Reserved as the message arrives, and shrunk to what
    /// its readings really hold once decoded.
    pub fn decoded_bound(self, payload: usize, topic: usize) -> u64 {
        let readings = match self {
            Payload::Number => 1,
            Payload::Json => payload / 18 + 1,
            Payload::SensorV1 => payload / 2 + 1,
        };
        let label_slots = match self {
            Payload::Number => 0,
            Payload::Json | Payload::SensorV1 => payload / 2,
        };
        let per_reading = std::mem::size_of::<Reading>() + topic + topic * LABEL_SLOT / 2;
        let message = std::mem::size_of::<rumqttc::Publish>() + topic + payload;
        (message + readings * per_reading + payload + label_slots * LABEL_SLOT) as u64
    }

    /// Appends the readings of one message to `out`, all stamped
    /// `received_at`; on a refusal `out` is left as it was.
    pub fn decode_into(
        self,
        payload: &[u8],
        topic: &TopicFields<'_>,
        received_at: Timestamp,
        limits: &ReadingLimits,
        out: &mut Vec<Reading>,
    ) -> Result<(), Refused> {
        let before = out.len();
        let decoded = self
            .decode(payload, topic, received_at, out)
            .and_then(|()| {
                out[before..].iter().try_for_each(|reading| {
                    limits
                        .check_reading(reading)
                        .map_err(|why| refused(Reason::OutOfBounds, why))
                })
            });
        if decoded.is_err() {
            out.truncate(before);
        }
        decoded
    }

    fn decode(
        self,
        payload: &[u8],
        topic: &TopicFields<'_>,
        received_at: Timestamp,
        out: &mut Vec<Reading>,
    ) -> Result<(), Refused> {
        let no_name = || {
            refused(
                Reason::Topic,
                "no sensor name: topic_pattern has no `{sensor_name}` and the payload names none",
            )
        };
        match self {
            Payload::Number => {
                let name = topic.sensor_name.ok_or_else(no_name)?;
                out.push(Reading {
                    sensor_name: SensorName::intern_str(name),
                    labels: topic.labels.clone(),
                    value: Some(number(payload)?),
                    created_at: None,
                    received_at,
                });
            }
            Payload::Json => {
                let parsed = parse_readings(payload)
                    .map_err(|err| refused(Reason::BadJson, err.to_string()))?;
                for mut reading in parsed {
                    let name = match (&reading.sensor_name, topic.sensor_name) {
                        (Some(_), _) => "",
                        (None, Some(name)) => name,
                        (None, None) => return Err(no_name()),
                    };
                    // The readings are this source's receipts, whatever a
                    // re-published line says.
                    reading.received_at = None;
                    reading.labels = merged(&topic.labels, reading.labels);
                    out.push(reading.into_reading(name, received_at));
                }
            }
            Payload::SensorV1 => {
                let batch = sink_stages::sources::grpc::decode_batch(
                    payload,
                    received_at,
                    &ReadingLimits::default(),
                )
                .map_err(|status| {
                    // INVALID_ARGUMENT: readings that decode but break the
                    // data model's bounds; anything else is not a request.
                    let reason = if status.code() == tonic::Code::InvalidArgument {
                        Reason::OutOfBounds
                    } else {
                        Reason::BadProtobuf
                    };
                    refused(reason, status.message())
                })?;
                for mut reading in batch.into_readings() {
                    if reading.sensor_name.is_empty() {
                        reading.sensor_name =
                            SensorName::intern_str(topic.sensor_name.ok_or_else(no_name)?);
                    }
                    reading.labels = merged(&topic.labels, reading.labels);
                    out.push(reading);
                }
            }
        }
        Ok(())
    }
}

/// The topic's labels with the payload's over them.
fn merged(topic: &Labels, payload: Labels) -> Labels {
    if topic.is_empty() {
        return payload;
    }
    let mut labels = topic.clone();
    for (key, value) in payload.iter() {
        labels.insert(key, value);
    }
    labels
}

/// Reads one number as the data model does: an integer without `.` or
/// exponent, a float otherwise; never NaN or infinite.
fn number(payload: &[u8]) -> Result<Value, Refused> {
    let text = std::str::from_utf8(payload)
        .map_err(|_| refused(Reason::NotANumber, "the payload is not UTF-8 text"))?
        .trim();
    let shown = || text.chars().take(40).collect::<String>();
    let is_float = text.contains(['.', 'e', 'E']);
    let plain = !text.is_empty()
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || matches!(b, b'-' | b'+' | b'.' | b'e' | b'E'));
    if !plain {
        return Err(refused(
            Reason::NotANumber,
            format!("`{}` is not a number", shown()),
        ));
    }
    if is_float {
        match text.parse::<f64>() {
            Ok(float) if float.is_finite() => Ok(Value::Float(float)),
            Ok(_) => Err(refused(
                Reason::OutOfBounds,
                format!("`{}` is not a finite number", shown()),
            )),
            Err(_) => Err(refused(
                Reason::NotANumber,
                format!("`{}` is not a number", shown()),
            )),
        }
    } else {
        match text.parse::<i64>() {
            Ok(int) => Ok(Value::Int(int)),
            Err(err)
                if matches!(
                    err.kind(),
                    std::num::IntErrorKind::PosOverflow | std::num::IntErrorKind::NegOverflow
                ) =>
            {
                Err(refused(
                    Reason::OutOfBounds,
                    format!(
                        "`{}` is beyond the 64-bit integer range (write it as a float)",
                        shown()
                    ),
                ))
            }
            Err(_) => Err(refused(
                Reason::NotANumber,
                format!("`{}` is not a number", shown()),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;
    use sink_proto::sensor_value::Measurement;
    use sink_proto::{SensorValue, SensorValuesRequest};

    use super::*;

    fn at() -> Timestamp {
        Timestamp::new(1_795_860_000, 0).unwrap()
    }

    fn decode(
        payload: Payload,
        bytes: &[u8],
        topic: &TopicFields,
    ) -> Result<Vec<Reading>, Refused> {
        let mut out = Vec::new();
        payload.decode_into(bytes, topic, at(), &ReadingLimits::default(), &mut out)?;
        Ok(out)
    }

    fn topic(
        name: Option<&'static str>,
        labels: &[(&'static str, &'static str)],
    ) -> TopicFields<'static> {
        TopicFields {
            sensor_name: name,
            labels: Labels::from_iter(labels.iter().copied()),
        }
    }

    #[test]
    fn numbers_are_integers_or_floats() {
        let t = topic(Some("t1"), &[("site", "north")]);
        for (text, value) in [
            ("42", Value::Int(42)),
            ("-3", Value::Int(-3)),
            (" 21.5\n", Value::Float(21.5)),
            ("1e3", Value::Float(1000.0)),
            ("-9223372036854775808", Value::Int(i64::MIN)),
        ] {
            let readings = decode(Payload::Number, text.as_bytes(), &t).unwrap();
            assert_eq!(readings.len(), 1);
            assert_eq!(readings[0].value, Some(value), "{text:?}");
            assert_eq!(readings[0].sensor_name, "t1");
            assert_eq!(readings[0].labels.get("site"), Some("north"));
            assert_eq!(readings[0].created_at, None);
            assert_eq!(readings[0].received_at, at());
        }
    }

    #[test]
    fn what_is_not_a_number_is_refused_by_reason() {
        let t = topic(Some("t1"), &[]);
        for (text, reason) in [
            ("", Reason::NotANumber),
            ("abc", Reason::NotANumber),
            ("NaN", Reason::NotANumber),
            ("inf", Reason::NotANumber),
            ("1.2.3", Reason::NotANumber),
            ("0x10", Reason::NotANumber),
            ("1e999", Reason::OutOfBounds),
            ("9223372036854775808", Reason::OutOfBounds),
        ] {
            let err = decode(Payload::Number, text.as_bytes(), &t).unwrap_err();
            assert_eq!(err.reason, reason, "{text:?}: {}", err.detail);
        }
        let err = decode(Payload::Number, &[0xff, 0xfe], &t).unwrap_err();
        assert_eq!(err.reason, Reason::NotANumber);
    }

    #[test]
    fn json_names_and_labels_win_over_the_topic() {
        let t = topic(Some("from-topic"), &[("site", "north"), ("unit", "C")]);
        let json = br#"[{"sensor_value":1},
            {"sensor_name":"own","labels":{"unit":"F","x":"y"},"sensor_value":2.5,"created_at":"2026-11-28T10:00:00Z","received_at":"2020-01-01T00:00:00Z"},
            {"sensor_value":null}]"#;
        let readings = decode(Payload::Json, json, &t).unwrap();
        assert_eq!(readings.len(), 3);
        assert_eq!(readings[0].sensor_name, "from-topic");
        assert_eq!(readings[0].value, Some(Value::Int(1)));
        assert_eq!(readings[0].labels, t.labels);
        assert_eq!(readings[1].sensor_name, "own");
        assert_eq!(
            readings[1].labels,
            Labels::from_iter([("site", "north"), ("unit", "F"), ("x", "y")])
        );
        assert_eq!(readings[1].created_at, Timestamp::new(1_795_860_000, 0));
        assert_eq!(readings[1].received_at, at());
        assert_eq!(readings[2].value, None);
    }

    #[test]
    fn bad_json_is_refused_whole() {
        let t = topic(Some("t"), &[]);
        for json in [
            &br#"{"sensor_value":"#[..],
            br#"{"sensor_name":"t1"}"#,
            br#"[{"sensor_value":1},{"nope":2}]"#,
            br#"{"sensor_value":1e999}"#,
        ] {
            let err = decode(Payload::Json, json, &t).unwrap_err();
            assert_eq!(err.reason, Reason::BadJson, "{}", err.detail);
        }
        let err = decode(Payload::Json, br#"{"sensor_value":1}"#, &topic(None, &[])).unwrap_err();
        assert_eq!(err.reason, Reason::Topic);
    }

    #[test]
    fn readings_past_the_limits_are_refused_and_nothing_is_kept() {
        let t = topic(Some("t"), &[]);
        let long = format!(
            r#"[{{"sensor_value":1}},{{"sensor_name":"{}","sensor_value":1}}]"#,
            "n".repeat(2000)
        );
        let mut out = vec![];
        let err = Payload::Json
            .decode_into(
                long.as_bytes(),
                &t,
                at(),
                &ReadingLimits::default(),
                &mut out,
            )
            .unwrap_err();
        assert_eq!(err.reason, Reason::OutOfBounds);
        assert!(out.is_empty());
    }

    #[test]
    fn protobuf_keeps_its_names_and_takes_the_topic_labels() {
        let request = SensorValuesRequest {
            items: vec![
                SensorValue {
                    sensor_name: "p1".into(),
                    measurement: Some(Measurement {
                        sensor_value: Some(7),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                SensorValue {
                    sensor_name: String::new(),
                    measurement: None,
                    ..Default::default()
                },
            ],
        };
        let t = topic(Some("node-9"), &[("site", "south")]);
        let readings = decode(Payload::SensorV1, &request.encode_to_vec(), &t).unwrap();
        assert_eq!(readings[0].sensor_name, "p1");
        assert_eq!(readings[0].value, Some(Value::Int(7)));
        assert_eq!(readings[0].labels.get("site"), Some("south"));
        assert_eq!(readings[1].sensor_name, "node-9");
        assert_eq!(readings[1].value, None);
        let err = decode(Payload::SensorV1, b"\x0a\xff\xff", &t).unwrap_err();
        assert_eq!(err.reason, Reason::BadProtobuf, "{}", err.detail);
    }

    #[test]
    fn payload_kinds_are_spelled_as_in_the_file() {
        for (text, kind) in [
            ("\"number\"", Payload::Number),
            ("\"json\"", Payload::Json),
            ("\"sensor.v1\"", Payload::SensorV1),
        ] {
            assert_eq!(serde_json::from_str::<Payload>(text).unwrap(), kind);
        }
        assert!(serde_json::from_str::<Payload>("\"protobuf\"").is_err());
    }
}

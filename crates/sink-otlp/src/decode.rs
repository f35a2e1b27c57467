//! Decodes an encoded `ExportMetricsServiceRequest` straight into readings
//! ([`Points`]), walking the wire format once per level instead of building
//! prost's tree of messages first (the benchmark `cargo bench -p sink-otlp`
//! compares both).
//!
//! Protobuf's rules as prost applies them: unknown fields of any wire type
//! are skipped; a known field with the wrong wire type, a bad varint, a
//! length past its message's end or a string that is not UTF-8 makes the
//! request malformed; a scalar given twice keeps its last value. Fields may
//! come in any order: a level whose meaning depends on a sibling (a
//! resource's attributes, a metric's name and kind, a sum's temporality) is
//! read in two passes over its bytes.

use prost::encoding::{DecodeContext, WireType, decode_key, decode_varint, skip_field};
use sink_api::Value;

use crate::points::{Kind, Points, Refused, Text};

/// Why a request could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// The bytes are not an `ExportMetricsServiceRequest` (or the JSON not
    /// its JSON form).
    Malformed(String),
    /// A limit refused the request whole.
    Refused(Refused),
}

impl From<Refused> for DecodeError {
    fn from(refused: Refused) -> Self {
        Self::Refused(refused)
    }
}

impl From<prost::DecodeError> for DecodeError {
    fn from(err: prost::DecodeError) -> Self {
        Self::Malformed(err.to_string())
    }
}

fn malformed(what: impl Into<String>) -> DecodeError {
    DecodeError::Malformed(what.into())
}

/// How deeply attribute values (arrays and maps in arrays and maps) may nest.
const MAX_VALUE_DEPTH: u32 = 32;

/// One field of a message.
enum Field<'a> {
    Varint(u64),
    Fixed64(u64),
    Fixed32,
    Bytes(&'a [u8]),
}

/// The fields of one message's bytes, in order; groups are skipped.
struct Fields<'a>(&'a [u8]);

impl<'a> Iterator for Fields<'a> {
    type Item = Result<(u32, Field<'a>), DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        while !self.0.is_empty() {
            match self.field() {
                Ok(Some(field)) => return Some(Ok(field)),
                Ok(None) => continue,
                Err(err) => {
                    // Nothing after a malformed field can be trusted.
                    self.0 = &[];
                    return Some(Err(err));
                }
            }
        }
        None
    }
}

impl<'a> Fields<'a> {
    /// The next field; `None` for a group (skipped).
    fn field(&mut self) -> Result<Option<(u32, Field<'a>)>, DecodeError> {
        let buf = &mut self.0;
        let (tag, wire_type) = decode_key(buf)?;
        let field = match wire_type {
            WireType::Varint => Field::Varint(decode_varint(buf)?),
            WireType::SixtyFourBit => {
                let (bytes, rest) = buf
                    .split_first_chunk::<8>()
                    .ok_or_else(|| malformed("a 64-bit field is cut short"))?;
                *buf = rest;
                Field::Fixed64(u64::from_le_bytes(*bytes))
            }
            WireType::ThirtyTwoBit => {
                let rest = buf
                    .get(4..)
                    .ok_or_else(|| malformed("a 32-bit field is cut short"))?;
                *buf = rest;
                Field::Fixed32
            }
            WireType::LengthDelimited => {
                let len = decode_varint(buf)?;
                let len = usize::try_from(len)
                    .ok()
                    .filter(|len| *len <= buf.len())
                    .ok_or_else(|| malformed("a field's length runs past its message"))?;
                let (bytes, rest) = buf.split_at(len);
                *buf = rest;
                Field::Bytes(bytes)
            }
            WireType::StartGroup | WireType::EndGroup => {
                skip_field(wire_type, tag, buf, DecodeContext::default())?;
                return Ok(None);
            }
        };
        Ok(Some((tag, field)))
    }
}

impl<'a> Field<'a> {
    fn bytes(self, what: &str) -> Result<&'a [u8], DecodeError> {
        match self {
            Field::Bytes(bytes) => Ok(bytes),
            _ => Err(malformed(format!("{what} has the wrong wire type"))),
        }
    }

    fn text(self, what: &str) -> Result<&'a str, DecodeError> {
        std::str::from_utf8(self.bytes(what)?)
            .map_err(|_| malformed(format!("{what} is not valid UTF-8")))
    }

    fn varint(self, what: &str) -> Result<u64, DecodeError> {
        match self {
            Field::Varint(value) => Ok(value),
            _ => Err(malformed(format!("{what} has the wrong wire type"))),
        }
    }

    fn fixed64(self, what: &str) -> Result<u64, DecodeError> {
        match self {
            Field::Fixed64(value) => Ok(value),
            _ => Err(malformed(format!("{what} has the wrong wire type"))),
        }
    }
}

/// Decodes one `ExportMetricsServiceRequest` into `points`.
pub fn decode(message: &[u8], points: &mut Points<'_>, cap: usize) -> Result<(), DecodeError> {
    points.reserve(count_number_points(message));
    for field in Fields(message) {
        let (tag, field) = field?;
        if tag == 1 {
            resource_metrics(field.bytes("resource_metrics")?, points, cap)?;
        }
    }
    Ok(())
}

/// `ResourceMetrics`: the resource first, wherever it is, then the metrics.
fn resource_metrics(buf: &[u8], points: &mut Points<'_>, cap: usize) -> Result<(), DecodeError> {
    points.begin_resource();
    for field in Fields(buf) {
        let (tag, field) = field?;
        if tag == 1 {
            for field in Fields(field.bytes("resource")?) {
                let (tag, field) = field?;
                if tag == 1 {
                    let (key, value) = key_value(field.bytes("attributes")?, cap)?;
                    points.resource_attribute(key, value)?;
                }
            }
        }
    }
    for field in Fields(buf) {
        let (tag, field) = field?;
        if tag == 2 {
            for field in Fields(field.bytes("scope_metrics")?) {
                let (tag, field) = field?;
                if tag == 2 {
                    metric(field.bytes("metrics")?, points, cap)?;
                }
            }
        }
    }
    Ok(())
}

/// The `Metric.data` oneof's field numbers.
const GAUGE: u32 = 5;
const SUM: u32 = 7;
const HISTOGRAM: u32 = 9;
const EXPONENTIAL_HISTOGRAM: u32 = 10;
const SUMMARY: u32 = 11;

/// `Metric`: its name, unit and kind first, then its points.
fn metric(buf: &[u8], points: &mut Points<'_>, cap: usize) -> Result<(), DecodeError> {
    let mut name = "";
    let mut unit = "";
    let mut data = None;
    for field in Fields(buf) {
        let (tag, field) = field?;
        match tag {
            1 => name = field.text("name")?,
            3 => unit = field.text("unit")?,
            GAUGE | SUM | HISTOGRAM | EXPONENTIAL_HISTOGRAM | SUMMARY => {
                field.bytes("data")?;
                data = Some(tag);
            }
            _ => {}
        }
    }
    let Some(data) = data else {
        return Ok(());
    };
    // The oneof's last field wins; each of its occurrences merges.
    for field in Fields(buf) {
        let (tag, field) = field?;
        if tag != data {
            continue;
        }
        let bytes = field.bytes("data")?;
        match data {
            GAUGE => {
                points.begin_metric(name, unit, Kind::Gauge);
                number_points(bytes, points, cap)?;
            }
            SUM => {
                let (mut temporality, mut monotonic) = (0, false);
                for field in Fields(bytes) {
                    let (tag, field) = field?;
                    match tag {
                        2 => temporality = field.varint("aggregation_temporality")? as i32,
                        3 => monotonic = field.varint("is_monotonic")? != 0,
                        _ => {}
                    }
                }
                points.begin_metric(
                    name,
                    unit,
                    Kind::Sum {
                        temporality,
                        monotonic,
                    },
                );
                number_points(bytes, points, cap)?;
            }
            _ => {
                let what = match data {
                    HISTOGRAM => "histogram",
                    EXPONENTIAL_HISTOGRAM => "exponential histogram",
                    _ => "summary",
                };
                points.unsupported(what, count_field(bytes, 1)?)?;
            }
        }
    }
    Ok(())
}

/// How many times field `tag` occurs in `buf`.
fn count_field(buf: &[u8], tag: u32) -> Result<usize, DecodeError> {
    let mut count = 0;
    for field in Fields(buf) {
        if field?.0 == tag {
            count += 1;
        }
    }
    Ok(count)
}

/// How many number points `message` holds (what the readings' vector is
/// sized for; malformed bytes count as none).
fn count_number_points(message: &[u8]) -> usize {
    fn each<'a>(buf: &'a [u8], tags: &'a [u32]) -> impl Iterator<Item = &'a [u8]> + 'a {
        Fields(buf)
            .map_while(Result::ok)
            .filter_map(move |(tag, field)| match field {
                Field::Bytes(bytes) if tags.contains(&tag) => Some(bytes),
                _ => None,
            })
    }
    each(message, &[1])
        .flat_map(|resource| each(resource, &[2]))
        .flat_map(|scope| each(scope, &[2]))
        .flat_map(|metric| each(metric, &[GAUGE, SUM]))
        .map(|data| each(data, &[1]).count())
        .sum()
}

/// The `NumberDataPoint`s (field 1) of a Gauge or a Sum.
fn number_points(buf: &[u8], points: &mut Points<'_>, cap: usize) -> Result<(), DecodeError> {
    for field in Fields(buf) {
        let (tag, field) = field?;
        if tag == 1 {
            number_point(field.bytes("data_points")?, points, cap)?;
        }
    }
    Ok(())
}

/// `NumberDataPoint.flags`' bit for "no recorded value".
const NO_RECORDED_VALUE: u64 = 1;

fn number_point(buf: &[u8], points: &mut Points<'_>, cap: usize) -> Result<(), DecodeError> {
    let mut attributes = points.attributes();
    let mut time = 0;
    let mut value = None;
    let mut flags = 0;
    for field in Fields(buf) {
        let (tag, field) = field?;
        match tag {
            3 => time = field.fixed64("time_unix_nano")?,
            4 => value = Some(Value::Float(f64::from_bits(field.fixed64("as_double")?))),
            6 => value = Some(Value::Int(field.fixed64("as_int")? as i64)),
            7 => {
                let (key, value) = key_value(field.bytes("attributes")?, cap)?;
                attributes.push((key.to_owned(), value));
            }
            8 => flags = field.varint("flags")?,
            _ => {}
        }
    }
    if flags & NO_RECORDED_VALUE != 0 {
        value = None;
    }
    points.point(attributes, time, value)?;
    Ok(())
}

/// A `KeyValue`: its key, and its value as label text.
fn key_value(buf: &[u8], cap: usize) -> Result<(&str, String), DecodeError> {
    let mut key = "";
    let mut value = None;
    for field in Fields(buf) {
        let (tag, field) = field?;
        match tag {
            1 => key = field.text("key")?,
            2 => value = Some(field.bytes("value")?),
            _ => {}
        }
    }
    let mut text = Text::new(cap);
    match value {
        Some(value) => any_value(value, &mut text, 0)?,
        None => text.empty(false),
    }
    Ok((key, text.out))
}

/// An `AnyValue`, rendered into `text` (nested below the top from `depth` 1).
fn any_value(buf: &[u8], text: &mut Text, depth: u32) -> Result<(), DecodeError> {
    if depth > MAX_VALUE_DEPTH {
        return Err(malformed(format!(
            "an attribute value nests deeper than {MAX_VALUE_DEPTH} levels"
        )));
    }
    let nested = depth > 0;
    // The oneof's last field wins.
    let mut last = None;
    for field in Fields(buf) {
        let (tag, field) = field?;
        if (1..=7).contains(&tag) {
            last = Some((tag, field));
        }
    }
    let Some((tag, field)) = last else {
        text.empty(nested);
        return Ok(());
    };
    match tag {
        1 => text.text(field.text("string_value")?, nested),
        2 => text.bool(field.varint("bool_value")? != 0),
        3 => text.int(field.varint("int_value")? as i64),
        4 => text.double(f64::from_bits(field.fixed64("double_value")?), nested),
        5 => {
            text.raw("[");
            let mut first = true;
            for field in Fields(field.bytes("array_value")?) {
                let (tag, field) = field?;
                if tag == 1 {
                    if !first {
                        text.raw(",");
                    }
                    first = false;
                    any_value(field.bytes("values")?, text, depth + 1)?;
                }
            }
            text.raw("]");
        }
        6 => {
            text.raw("{");
            let mut first = true;
            for field in Fields(field.bytes("kvlist_value")?) {
                let (tag, field) = field?;
                if tag == 1 {
                    if !first {
                        text.raw(",");
                    }
                    first = false;
                    let mut key = "";
                    let mut value = None;
                    for field in Fields(field.bytes("values")?) {
                        let (tag, field) = field?;
                        match tag {
                            1 => key = field.text("key")?,
                            2 => value = Some(field.bytes("value")?),
                            _ => {}
                        }
                    }
                    text.string(key);
                    text.raw(":");
                    match value {
                        Some(value) => any_value(value, text, depth + 1)?,
                        None => text.empty(true),
                    }
                }
            }
            text.raw("}");
        }
        _ => {
            let bytes = field.bytes("bytes_value")?;
            let encoded = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, bytes);
            text.text(&encoded, nested);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use prost::Message;
    use sink_api::{ReadingLimits, Timestamp, Value};

    use super::*;
    use crate::points::Points;
    use crate::proto::collector::metrics::v1::ExportMetricsServiceRequest;
    use crate::proto::common::v1::{
        AnyValue, ArrayValue, KeyValue, KeyValueList, any_value::Value as Any,
    };
    use crate::proto::metrics::v1::{
        Gauge, Histogram, HistogramDataPoint, Metric, NumberDataPoint, ResourceMetrics,
        ScopeMetrics, Sum, metric::Data, number_data_point,
    };
    use crate::proto::resource::v1::Resource;

    fn kv(key: &str, value: Any) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: Some(AnyValue { value: Some(value) }),
        }
    }

    fn point(value: number_data_point::Value, attributes: Vec<KeyValue>) -> NumberDataPoint {
        NumberDataPoint {
            attributes,
            start_time_unix_nano: 1,
            time_unix_nano: 1_795_860_000_123_456_789,
            value: Some(value),
            flags: 0,
        }
    }

    fn request(metrics: Vec<Metric>) -> ExportMetricsServiceRequest {
        ExportMetricsServiceRequest {
            resource_metrics: vec![ResourceMetrics {
                resource: Some(Resource {
                    attributes: vec![
                        kv("service.name", Any::StringValue("api".into())),
                        kv("host", Any::StringValue("r".into())),
                    ],
                    dropped_attributes_count: 0,
                }),
                scope_metrics: vec![ScopeMetrics {
                    scope: None,
                    metrics,
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            }],
        }
    }

    fn decode_all(bytes: &[u8]) -> Result<crate::points::Decoded, DecodeError> {
        let limits = ReadingLimits::default();
        let mut points = Points::new(Timestamp::new(0, 0).unwrap(), &limits, 1000, 1 << 24);
        decode(bytes, &mut points, limits.max_label_value_bytes)?;
        Ok(points.finish())
    }

    #[test]
    fn gauges_and_sums_become_readings_with_every_attribute_as_a_label() {
        let nested = AnyValue {
            value: Some(Any::KvlistValue(KeyValueList {
                values: vec![
                    kv("a", Any::IntValue(1)),
                    kv("b", Any::StringValue("x\"".into())),
                ],
            })),
        };
        let request = request(vec![
            Metric {
                name: "temperature".into(),
                unit: "Cel".into(),
                data: Some(Data::Gauge(Gauge {
                    data_points: vec![point(
                        number_data_point::Value::AsDouble(21.5),
                        vec![
                            kv("host", Any::StringValue("p".into())),
                            kv("ok", Any::BoolValue(true)),
                            kv("n", Any::IntValue(-3)),
                            kv("d", Any::DoubleValue(2.0)),
                            kv(
                                "list",
                                Any::ArrayValue(ArrayValue {
                                    values: vec![
                                        AnyValue {
                                            value: Some(Any::StringValue("s".into())),
                                        },
                                        nested,
                                        AnyValue { value: None },
                                    ],
                                }),
                            ),
                            kv("raw", Any::BytesValue(vec![1, 2, 3])),
                        ],
                    )],
                })),
                ..Default::default()
            },
            Metric {
                name: "requests".into(),
                data: Some(Data::Sum(Sum {
                    data_points: vec![point(number_data_point::Value::AsInt(i64::MAX), vec![])],
                    aggregation_temporality: 1,
                    is_monotonic: true,
                })),
                ..Default::default()
            },
            Metric {
                name: "latency".into(),
                data: Some(Data::Histogram(Histogram {
                    data_points: vec![HistogramDataPoint::default(); 2],
                    aggregation_temporality: 2,
                })),
                ..Default::default()
            },
        ]);
        let decoded = decode_all(&request.encode_to_vec()).unwrap();
        assert_eq!(decoded.readings.len(), 2);
        let gauge = &decoded.readings[0];
        assert_eq!(gauge.sensor_name, "temperature");
        assert_eq!(gauge.value, Some(Value::Float(21.5)));
        assert_eq!(gauge.created_at, Timestamp::new(1_795_860_000, 123_456_789));
        let labels: Vec<_> = gauge.labels.iter().collect();
        assert_eq!(
            labels,
            [
                ("d", "2.0"),
                ("host", "p"),
                ("list", r#"["s",{"a":1,"b":"x\""},null]"#),
                ("n", "-3"),
                ("ok", "true"),
                ("otlp.unit", "Cel"),
                ("raw", "AQID"),
                ("service.name", "api"),
            ]
        );
        let sum = &decoded.readings[1];
        assert_eq!(sum.value, Some(Value::Int(i64::MAX)));
        assert_eq!(sum.labels.get("otlp.temporality"), Some("delta"));
        assert_eq!(sum.labels.get("otlp.monotonic"), Some("true"));
        assert_eq!(decoded.rejected, 2);
        assert!(
            decoded
                .error_message
                .contains("histogram points are not accepted")
        );
    }

    #[test]
    fn fields_in_any_order_decode_the_same() {
        // The resource after the metrics, the name after the points.
        let request = request(vec![Metric {
            name: "m".into(),
            data: Some(Data::Gauge(Gauge {
                data_points: vec![point(number_data_point::Value::AsInt(5), vec![])],
            })),
            ..Default::default()
        }]);
        let rm = &request.resource_metrics[0];
        let mut metric = Vec::new();
        rm.scope_metrics[0].metrics[0]
            .data
            .as_ref()
            .unwrap()
            .encode(&mut metric);
        prost::encoding::string::encode(1, &"m".to_string(), &mut metric);
        let mut scope = Vec::new();
        prost::encoding::bytes::encode(2, &metric, &mut scope);
        let mut resource_metrics = Vec::new();
        prost::encoding::bytes::encode(2, &scope, &mut resource_metrics);
        prost::encoding::message::encode(1, rm.resource.as_ref().unwrap(), &mut resource_metrics);
        let mut bytes = Vec::new();
        prost::encoding::bytes::encode(1, &resource_metrics, &mut bytes);
        let reordered = decode_all(&bytes).unwrap();
        let ordered = decode_all(&request.encode_to_vec()).unwrap();
        assert_eq!(reordered.readings, ordered.readings);
        assert_eq!(ordered.readings[0].labels.get("host"), Some("r"));
    }

    #[test]
    fn truncated_or_mistyped_bytes_are_malformed_never_a_panic() {
        let bytes = request(vec![Metric {
            name: "m".into(),
            data: Some(Data::Gauge(Gauge {
                data_points: vec![point(number_data_point::Value::AsDouble(1.0), vec![]); 3],
            })),
            ..Default::default()
        }])
        .encode_to_vec();
        for end in 0..bytes.len() {
            let cut = &bytes[..end];
            let ours = decode_all(cut);
            let prost = ExportMetricsServiceRequest::decode(cut);
            assert_eq!(ours.is_ok(), prost.is_ok(), "cut at {end}");
        }
        // A name sent as a varint.
        let err = decode_all(&[0x0a, 0x06, 0x12, 0x04, 0x12, 0x02, 0x08, 0x01]).unwrap_err();
        assert!(matches!(err, DecodeError::Malformed(_)), "{err:?}");
        assert!(decode_all(&[]).unwrap().readings.is_empty());
    }
}

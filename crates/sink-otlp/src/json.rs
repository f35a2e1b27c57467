//! Decodes the JSON form of an `ExportMetricsServiceRequest` (OTLP/HTTP with
//! `Content-Type: application/json`) into readings, by protobuf's JSON
//! mapping as the OTLP specification narrows it:
//!
//! - field names in lowerCamelCase (`resourceMetrics`, `timeUnixNano`); the
//!   original snake_case names are accepted too, as protobuf's JSON parsers do;
//! - 64-bit integers as decimal strings or as numbers;
//! - enums (`aggregationTemporality`) as integers, or by name;
//! - doubles as numbers, or `"NaN"`, `"Infinity"`, `"-Infinity"`;
//! - `bytesValue` in base64 (kept as that text);
//! - unknown fields ignored, `null` as the field's default.
//!
//! The levels whose meaning depends on a sibling are borrowed as raw JSON
//! text first (a resource's attributes may follow its metrics in the
//! object), then read in order; points and attributes are read one at a time
//! straight into [`Points`], so what decoding holds is the readings and
//! one point.

use std::borrow::Cow;
use std::fmt;

use serde::Deserialize;
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;
use sink_api::Value;

use crate::decode::DecodeError;
use crate::points::{Kind, Points, Refused, Text};

/// How deeply attribute values (arrays and maps in arrays and maps) may nest.
const MAX_VALUE_DEPTH: u32 = 32;

#[derive(Deserialize)]
struct Request<'a> {
    #[serde(
        borrow,
        default,
        rename = "resourceMetrics",
        alias = "resource_metrics"
    )]
    resource_metrics: Option<Vec<&'a RawValue>>,
}

#[derive(Deserialize)]
struct ResourceMetrics<'a> {
    #[serde(borrow, default)]
    resource: Option<&'a RawValue>,
    #[serde(borrow, default, rename = "scopeMetrics", alias = "scope_metrics")]
    scope_metrics: Option<Vec<ScopeMetrics<'a>>>,
}

#[derive(Deserialize)]
struct Resource<'a> {
    #[serde(borrow, default)]
    attributes: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct ScopeMetrics<'a> {
    #[serde(borrow, default)]
    metrics: Option<Vec<&'a RawValue>>,
}

#[derive(Deserialize)]
struct Metric<'a> {
    #[serde(borrow, default)]
    name: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    unit: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    gauge: Option<&'a RawValue>,
    #[serde(borrow, default)]
    sum: Option<&'a RawValue>,
    #[serde(default)]
    histogram: Option<Counted>,
    #[serde(
        default,
        rename = "exponentialHistogram",
        alias = "exponential_histogram"
    )]
    exponential_histogram: Option<Counted>,
    #[serde(default)]
    summary: Option<Counted>,
}

#[derive(Deserialize)]
struct Numbers<'a> {
    #[serde(borrow, default, rename = "dataPoints", alias = "data_points")]
    data_points: Option<&'a RawValue>,
    #[serde(
        default,
        rename = "aggregationTemporality",
        alias = "aggregation_temporality",
        deserialize_with = "temporality"
    )]
    aggregation_temporality: i32,
    #[serde(default, rename = "isMonotonic", alias = "is_monotonic")]
    is_monotonic: Option<bool>,
}

/// Points of a kind the source does not take: only counted.
#[derive(Deserialize)]
struct Counted {
    #[serde(default, rename = "dataPoints", alias = "data_points")]
    data_points: Option<Vec<IgnoredAny>>,
}

impl Counted {
    fn count(this: &Option<Self>) -> usize {
        this.as_ref()
            .and_then(|c| c.data_points.as_ref())
            .map_or(0, Vec::len)
    }
}

/// Decodes one JSON `ExportMetricsServiceRequest` into `points`.
pub fn decode(json: &[u8], points: &mut Points<'_>, cap: usize) -> Result<(), DecodeError> {
    let request: Request = serde_json::from_slice(json).map_err(malformed)?;
    // The lists of raw values borrowed from the body cost memory too (an
    // empty `{}` is 3 bytes of JSON and a 16-byte slot here).
    let slot = std::mem::size_of::<&RawValue>();
    points.hold(request.resource_metrics.as_ref().map_or(0, Vec::len) * slot)?;
    for raw in request.resource_metrics.into_iter().flatten() {
        let resource_metrics: ResourceMetrics = parse(raw)?;
        let scopes = resource_metrics
            .scope_metrics
            .as_deref()
            .unwrap_or_default();
        points.hold(
            std::mem::size_of_val(scopes)
                + scopes
                    .iter()
                    .map(|scope| scope.metrics.as_ref().map_or(0, Vec::len) * slot)
                    .sum::<usize>(),
        )?;
        points.begin_resource();
        if let Some(resource) = resource_metrics.resource {
            let resource: Option<Resource> = parse(resource)?;
            if let Some(attributes) = resource.and_then(|r| r.attributes) {
                let mut pairs = Vec::new();
                let mut de = serde_json::Deserializer::from_str(attributes.get());
                KeyValues {
                    out: &mut pairs,
                    cap,
                }
                .deserialize(&mut de)
                .and_then(|()| de.end())
                .map_err(malformed)?;
                for (key, value) in pairs {
                    points.resource_attribute(&key, value)?;
                }
            }
        }
        for scope in resource_metrics.scope_metrics.into_iter().flatten() {
            for raw in scope.metrics.into_iter().flatten() {
                metric(parse(raw)?, points, cap)?;
            }
        }
    }
    Ok(())
}

fn metric(metric: Metric<'_>, points: &mut Points<'_>, cap: usize) -> Result<(), DecodeError> {
    let name = metric.name.as_deref().unwrap_or("");
    let unit = metric.unit.as_deref().unwrap_or("");
    // Of a oneof sent twice, protobuf keeps the last; JSON objects have no
    // order serde keeps, so a metric with two kinds takes the first here.
    if let Some(raw) = metric.gauge.or(metric.sum) {
        let numbers: Option<Numbers> = parse(raw)?;
        let Some(numbers) = numbers else {
            return Ok(());
        };
        let kind = if metric.gauge.is_some() {
            Kind::Gauge
        } else {
            Kind::Sum {
                temporality: numbers.aggregation_temporality,
                monotonic: numbers.is_monotonic.unwrap_or(false),
            }
        };
        points.begin_metric(name, unit, kind);
        if let Some(raw) = numbers.data_points {
            run(raw, points, |cx, de| DataPoints { cx, cap }.deserialize(de))?;
        }
        return Ok(());
    }
    for (what, counted) in [
        ("histogram", &metric.histogram),
        ("exponential histogram", &metric.exponential_histogram),
        ("summary", &metric.summary),
    ] {
        points.unsupported(what, Counted::count(counted))?;
    }
    Ok(())
}

fn malformed(err: serde_json::Error) -> DecodeError {
    DecodeError::Malformed(format!(
        "the JSON is not an ExportMetricsServiceRequest: {err}"
    ))
}

fn parse<'a, T: Deserialize<'a>>(raw: &'a RawValue) -> Result<T, DecodeError> {
    serde_json::from_str(raw.get()).map_err(malformed)
}

/// What the seeds below share: the readings being built, and the refusal
/// that stopped them (a serde error cannot carry it).
struct Cx<'p, 'l> {
    points: &'p mut Points<'l>,
    refused: Option<Refused>,
}

/// Runs `read` over `raw` with the readings at hand; a refusal it met wins
/// over the JSON error it stopped with.
fn run<'a>(
    raw: &'a RawValue,
    points: &mut Points<'_>,
    read: impl FnOnce(
        &mut Cx<'_, '_>,
        &mut serde_json::Deserializer<serde_json::de::StrRead<'a>>,
    ) -> Result<(), serde_json::Error>,
) -> Result<(), DecodeError> {
    let mut cx = Cx {
        points,
        refused: None,
    };
    let mut de = serde_json::Deserializer::from_str(raw.get());
    let read = read(&mut cx, &mut de).and_then(|()| de.end());
    if let Some(refused) = cx.refused {
        return Err(refused.into());
    }
    read.map_err(malformed)
}

/// The index in `names` of a map's next key (`names` lists each field's
/// lowerCamelCase name, then its snake_case one), `usize::MAX` for an
/// unknown key, or `None` at the map's end.
fn next_field<'de, A: MapAccess<'de>>(
    map: &mut A,
    names: &'static [(&'static str, &'static str)],
) -> Result<Option<usize>, A::Error> {
    struct Name(&'static [(&'static str, &'static str)]);
    impl<'de> DeserializeSeed<'de> for Name {
        type Value = usize;
        fn deserialize<D: Deserializer<'de>>(self, de: D) -> Result<usize, D::Error> {
            de.deserialize_str(self)
        }
    }
    impl Visitor<'_> for Name {
        type Value = usize;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a field name")
        }
        fn visit_str<E: de::Error>(self, name: &str) -> Result<usize, E> {
            Ok(self
                .0
                .iter()
                .position(|(camel, snake)| name == *camel || name == *snake)
                .unwrap_or(usize::MAX))
        }
    }
    map.next_key_seed(Name(names))
}

/// A JSON array of `NumberDataPoint`s.
struct DataPoints<'c, 'p, 'l> {
    cx: &'c mut Cx<'p, 'l>,
    cap: usize,
}

impl<'de> DeserializeSeed<'de> for DataPoints<'_, '_, '_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, de: D) -> Result<(), D::Error> {
        de.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for DataPoints<'_, '_, '_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array of data points")
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq
            .next_element_seed(DataPoint {
                cx: &mut *self.cx,
                cap: self.cap,
            })?
            .is_some()
        {}
        Ok(())
    }
}

/// One `NumberDataPoint`.
struct DataPoint<'c, 'p, 'l> {
    cx: &'c mut Cx<'p, 'l>,
    cap: usize,
}

const POINT_FIELDS: &[(&str, &str)] = &[
    ("attributes", "attributes"),
    ("timeUnixNano", "time_unix_nano"),
    ("asInt", "as_int"),
    ("asDouble", "as_double"),
    ("flags", "flags"),
];

impl<'de> DeserializeSeed<'de> for DataPoint<'_, '_, '_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, de: D) -> Result<(), D::Error> {
        de.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for DataPoint<'_, '_, '_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a data point")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut attributes = self.cx.points.attributes();
        let (mut time, mut value, mut flags) = (0, None, 0);
        while let Some(field) = next_field(&mut map, POINT_FIELDS)? {
            match field {
                0 => map.next_value_seed(KeyValues {
                    out: &mut attributes,
                    cap: self.cap,
                })?,
                1 => time = map.next_value_seed(Int)?.unwrap_or(0) as u64,
                2 => value = map.next_value_seed(Int)?.map(|v| Value::Int(v as i64)),
                3 => value = map.next_value_seed(Double)?.map(Value::Float),
                4 => flags = map.next_value_seed(Int)?.unwrap_or(0),
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        if flags & 1 != 0 {
            value = None;
        }
        self.cx
            .points
            .point(attributes, time, value)
            .map_err(|refused| {
                self.cx.refused = Some(refused);
                de::Error::custom("refused")
            })
    }
}

/// A JSON array of `KeyValue`s, appended to `out` as label text.
struct KeyValues<'o> {
    out: &'o mut Vec<(String, String)>,
    cap: usize,
}

impl<'de> DeserializeSeed<'de> for KeyValues<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, de: D) -> Result<(), D::Error> {
        de.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for KeyValues<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array of key-value attributes")
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while let Some(pair) = seq.next_element_seed(KeyValue {
            depth: 0,
            cap: self.cap,
        })? {
            self.out.push(pair);
        }
        Ok(())
    }
}

/// One `KeyValue`: its key, and its value rendered at `depth`.
struct KeyValue {
    depth: u32,
    cap: usize,
}

const KEY_VALUE_FIELDS: &[(&str, &str)] = &[("key", "key"), ("value", "value")];

impl<'de> DeserializeSeed<'de> for KeyValue {
    type Value = (String, String);
    fn deserialize<D: Deserializer<'de>>(self, de: D) -> Result<Self::Value, D::Error> {
        de.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for KeyValue {
    type Value = (String, String);
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a key-value attribute")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut key = String::new();
        let mut value = None;
        while let Some(field) = next_field(&mut map, KEY_VALUE_FIELDS)? {
            match field {
                0 => key = map.next_value::<Option<String>>()?.unwrap_or_default(),
                1 => {
                    value = map.next_value_seed(AnyValue {
                        depth: self.depth,
                        cap: self.cap,
                    })?
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        let value = value.unwrap_or_else(|| if self.depth > 0 { "null" } else { "" }.into());
        Ok((key, value))
    }
}

/// An `AnyValue`, rendered as label text (a JSON value below the top).
struct AnyValue {
    depth: u32,
    cap: usize,
}

const ANY_VALUE_FIELDS: &[(&str, &str)] = &[
    ("stringValue", "string_value"),
    ("boolValue", "bool_value"),
    ("intValue", "int_value"),
    ("doubleValue", "double_value"),
    ("arrayValue", "array_value"),
    ("kvlistValue", "kvlist_value"),
    ("bytesValue", "bytes_value"),
];

impl<'de> DeserializeSeed<'de> for AnyValue {
    type Value = Option<String>;
    fn deserialize<D: Deserializer<'de>>(self, de: D) -> Result<Self::Value, D::Error> {
        de.deserialize_option(self)
    }
}

impl<'de> Visitor<'de> for AnyValue {
    type Value = Option<String>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an attribute value")
    }
    fn visit_none<E>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_some<D: Deserializer<'de>>(self, de: D) -> Result<Self::Value, D::Error> {
        de.deserialize_map(self)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        if self.depth > MAX_VALUE_DEPTH {
            return Err(de::Error::custom(format!(
                "an attribute value nests deeper than {MAX_VALUE_DEPTH} levels"
            )));
        }
        let nested = self.depth > 0;
        // The oneof's last field wins.
        let mut text = None;
        while let Some(field) = next_field(&mut map, ANY_VALUE_FIELDS)? {
            let mut t = Text::new(self.cap);
            match field {
                0 | 6 => match map.next_value::<Option<Cow<'de, str>>>()? {
                    Some(s) => t.text(&s, nested),
                    None => continue,
                },
                1 => match map.next_value::<Option<bool>>()? {
                    Some(b) => t.bool(b),
                    None => continue,
                },
                2 => match map.next_value_seed(Int)? {
                    Some(i) => t.int(i as i64),
                    None => continue,
                },
                3 => match map.next_value_seed(Double)? {
                    Some(d) => t.double(d, nested),
                    None => continue,
                },
                4 | 5 => {
                    let list = map.next_value_seed(List {
                        map: field == 5,
                        depth: self.depth + 1,
                        cap: self.cap,
                    })?;
                    let (open, close) = if field == 5 { ("{", "}") } else { ("[", "]") };
                    t.raw(open);
                    for (i, item) in list.iter().enumerate() {
                        if i > 0 {
                            t.raw(",");
                        }
                        t.raw(item);
                    }
                    t.raw(close);
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                    continue;
                }
            }
            text = Some(t.out);
        }
        Ok(Some(text.unwrap_or_else(|| {
            if nested { "null" } else { "" }.into()
        })))
    }
}

/// An `ArrayValue` or a `KeyValueList` (`map`): `{"values": [...]}`, each
/// item rendered as JSON (`"key":value` in a map).
#[derive(Clone, Copy)]
struct List {
    map: bool,
    depth: u32,
    cap: usize,
}

impl<'de> DeserializeSeed<'de> for List {
    type Value = Vec<String>;
    fn deserialize<D: Deserializer<'de>>(self, de: D) -> Result<Self::Value, D::Error> {
        de.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for List {
    type Value = Vec<String>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object with `values`")
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(Vec::new())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut items = Vec::new();
        while let Some(field) = next_field(&mut map, &[("values", "values")])? {
            if field == 0 {
                items = map.next_value_seed(Items(self))?;
                continue;
            }
            map.next_value::<IgnoredAny>()?;
        }
        Ok(items)
    }
}

struct Items(List);

impl<'de> DeserializeSeed<'de> for Items {
    type Value = Vec<String>;
    fn deserialize<D: Deserializer<'de>>(self, de: D) -> Result<Self::Value, D::Error> {
        de.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Items {
    type Value = Vec<String>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array of values")
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(Vec::new())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let List { map, depth, cap } = self.0;
        let mut items = Vec::new();
        // The rendered items count against the cap too, so that a wide
        // value stops costing once it is known to be too long.
        let mut len = 0;
        loop {
            let item = if map {
                seq.next_element_seed(KeyValue { depth, cap })?
                    .map(|(key, value)| {
                        let mut t = Text::new(cap);
                        t.string(&key);
                        t.raw(":");
                        t.raw(&value);
                        t.out
                    })
            } else {
                seq.next_element_seed(AnyValue { depth, cap })?
                    .map(|value| value.unwrap_or_else(|| "null".into()))
            };
            let Some(item) = item else { break };
            len += item.len() + 1;
            if len <= cap + 1 {
                items.push(item);
            }
        }
        Ok(items)
    }
}

/// A 64-bit integer as a number or a decimal string; `null` is `None`.
struct Int;

impl<'de> DeserializeSeed<'de> for Int {
    type Value = Option<i128>;
    fn deserialize<D: Deserializer<'de>>(self, de: D) -> Result<Self::Value, D::Error> {
        de.deserialize_any(self)
    }
}

impl Visitor<'_> for Int {
    type Value = Option<i128>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a 64-bit integer, as a number or a decimal string")
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
        Ok(Some(v.into()))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
        Ok(Some(v.into()))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
        // Protobuf's JSON parsers take an integral float such as 1e3.
        if v.fract() == 0.0 && v.abs() < 1.9e19 {
            return Ok(Some(v as i128));
        }
        Err(E::custom(format!("{v} is not a 64-bit integer")))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        v.parse::<i128>()
            .ok()
            .filter(|v| (i64::MIN as i128..=u64::MAX as i128).contains(v))
            .map(Some)
            .ok_or_else(|| E::custom(format!("{v:?} is not a 64-bit integer")))
    }
}

/// A double as a number, a numeric string, or `"NaN"`, `"Infinity"`,
/// `"-Infinity"`; `null` is `None`.
struct Double;

impl<'de> DeserializeSeed<'de> for Double {
    type Value = Option<f64>;
    fn deserialize<D: Deserializer<'de>>(self, de: D) -> Result<Self::Value, D::Error> {
        de.deserialize_any(self)
    }
}

impl Visitor<'_> for Double {
    type Value = Option<f64>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a double")
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
        Ok(Some(v as f64))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
        Ok(Some(v as f64))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
        Ok(Some(v))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        match v {
            "NaN" => Ok(Some(f64::NAN)),
            "Infinity" => Ok(Some(f64::INFINITY)),
            "-Infinity" => Ok(Some(f64::NEG_INFINITY)),
            _ => v
                .parse()
                .map(Some)
                .map_err(|_| E::custom(format!("{v:?} is not a double"))),
        }
    }
}

/// `aggregationTemporality`: its number, or its name.
fn temporality<'de, D: Deserializer<'de>>(de: D) -> Result<i32, D::Error> {
    struct Temporality;
    impl Visitor<'_> for Temporality {
        type Value = i32;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an AggregationTemporality number or name")
        }
        fn visit_unit<E>(self) -> Result<i32, E> {
            Ok(0)
        }
        fn visit_u64<E>(self, v: u64) -> Result<i32, E> {
            Ok(i32::try_from(v).unwrap_or(0))
        }
        fn visit_i64<E>(self, v: i64) -> Result<i32, E> {
            Ok(i32::try_from(v).unwrap_or(0))
        }
        fn visit_str<E>(self, v: &str) -> Result<i32, E> {
            Ok(match v {
                "AGGREGATION_TEMPORALITY_DELTA" => 1,
                "AGGREGATION_TEMPORALITY_CUMULATIVE" => 2,
                _ => 0,
            })
        }
    }
    de.deserialize_any(Temporality)
}

#[cfg(test)]
mod tests {
    use prost::Message;
    use sink_api::{ReadingLimits, Timestamp};

    use super::*;
    use crate::points::{Decoded, Points};

    fn decode_json(json: &str) -> Result<Decoded, DecodeError> {
        let limits = ReadingLimits::default();
        let mut points = Points::new(Timestamp::new(0, 0).unwrap(), &limits, 1000, 1 << 24);
        decode(json.as_bytes(), &mut points, limits.max_label_value_bytes)?;
        Ok(points.finish())
    }

    /// The shape of the specification's example (opentelemetry-proto's
    /// examples/metrics.json), the metadata after the points here and there.
    const EXAMPLE: &str = r#"{
      "resourceMetrics": [{
        "scopeMetrics": [{
          "scope": {"name": "my.library", "version": "1.0.0"},
          "metrics": [
            {"name": "my.counter", "unit": "1", "description": "I am a Counter",
             "sum": {"dataPoints": [{"asDouble": 5, "startTimeUnixNano": "1544712660300000000",
                                     "timeUnixNano": "1544712660300000000",
                                     "attributes": [{"key": "my.counter.attr", "value": {"stringValue": "some value"}}]}],
                     "aggregationTemporality": 1, "isMonotonic": true}},
            {"name": "my.gauge", "unit": "1",
             "gauge": {"dataPoints": [{"asInt": "-9007199254740993", "timeUnixNano": 1544712660300000001,
                                       "attributes": [{"key": "ids", "value": {"arrayValue": {"values": [{"intValue": "7"}, {"boolValue": false}]}}},
                                                      {"key": "f", "value": {"doubleValue": "NaN"}}],
                                       "exemplars": [{"spanId": "abcd", "traceId": "00ff"}],
                                       "unknownField": {"ignored": [1, 2]}}]}},
            {"name": "my.histogram", "histogram": {"aggregationTemporality": 1,
             "dataPoints": [{"count": "2", "sum": 2, "bucketCounts": ["1", "1"], "explicitBounds": [1]}]}},
            {"name": "my.summary", "summary": {"dataPoints": [{}, {}]}}
          ]
        }],
        "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "my.service"}}]}
      }]
    }"#;

    #[test]
    fn the_specification_example_decodes_with_its_rules() {
        let decoded = decode_json(EXAMPLE).unwrap();
        assert_eq!(decoded.readings.len(), 2);
        let counter = &decoded.readings[0];
        assert_eq!(counter.sensor_name, "my.counter");
        assert_eq!(counter.value, Some(Value::Float(5.0)));
        assert_eq!(
            counter.created_at,
            Timestamp::new(1_544_712_660, 300_000_000)
        );
        let labels: Vec<_> = counter.labels.iter().collect();
        assert_eq!(
            labels,
            [
                ("my.counter.attr", "some value"),
                ("otlp.monotonic", "true"),
                ("otlp.temporality", "delta"),
                ("otlp.unit", "1"),
                ("service.name", "my.service"),
            ]
        );
        let gauge = &decoded.readings[1];
        assert_eq!(gauge.value, Some(Value::Int(-9_007_199_254_740_993)));
        assert_eq!(gauge.labels.get("ids"), Some(r#"[7,false]"#));
        assert_eq!(gauge.labels.get("f"), Some("NaN"));
        assert_eq!(decoded.rejected, 3);
        assert!(decoded.error_message.contains("1 × histogram points"));
        assert!(decoded.error_message.contains("2 × summary points"));
    }

    #[test]
    fn json_and_protobuf_of_the_same_request_decode_alike() {
        use crate::proto::collector::metrics::v1::ExportMetricsServiceRequest;
        use crate::proto::common::v1::{AnyValue, KeyValue, any_value};
        use crate::proto::metrics::v1::{
            Gauge, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics, metric,
            number_data_point,
        };
        let request = ExportMetricsServiceRequest {
            resource_metrics: vec![ResourceMetrics {
                scope_metrics: vec![ScopeMetrics {
                    metrics: vec![Metric {
                        name: "g".into(),
                        data: Some(metric::Data::Gauge(Gauge {
                            data_points: vec![NumberDataPoint {
                                attributes: vec![KeyValue {
                                    key: "k".into(),
                                    value: Some(AnyValue {
                                        value: Some(any_value::Value::DoubleValue(0.1)),
                                    }),
                                }],
                                time_unix_nano: 5,
                                value: Some(number_data_point::Value::AsDouble(1e-7)),
                                ..Default::default()
                            }],
                        })),
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        };
        let limits = ReadingLimits::default();
        let mut points = Points::new(Timestamp::new(0, 0).unwrap(), &limits, 10, 1 << 20);
        crate::decode::decode(&request.encode_to_vec(), &mut points, 1024).unwrap();
        let from_protobuf = points.finish();
        let from_json = decode_json(
            r#"{"resource_metrics":[{"scope_metrics":[{"metrics":[{"name":"g","gauge":{"data_points":[
                {"time_unix_nano":"5","as_double":1e-7,"attributes":[{"key":"k","value":{"double_value":0.1}}]}]}}]}]}]}"#,
        )
        .unwrap();
        assert_eq!(from_json.readings, from_protobuf.readings);
        assert_eq!(from_json.readings[0].labels.get("k"), Some("0.1"));
    }

    #[test]
    fn bad_json_is_malformed_and_empty_json_is_nothing() {
        for bad in [
            "",
            "5",
            "{\"resourceMetrics\": 5}",
            r#"{"resourceMetrics":[{"scopeMetrics":[{"metrics":[{"name":"g","gauge":{"dataPoints":[{"asInt":"1.5"}]}}]}]}]}"#,
            r#"{"resourceMetrics":[{"scopeMetrics":[{"metrics":[{"name":"g","gauge":{"dataPoints":[{"asInt":"18446744073709551616"}]}}]}]}]}"#,
            "{\"resourceMetrics\": [",
        ] {
            assert!(
                matches!(decode_json(bad), Err(DecodeError::Malformed(_))),
                "{bad}"
            );
        }
        for empty in [
            "{}",
            "{\"resourceMetrics\": []}",
            "{\"resourceMetrics\": null}",
        ] {
            let decoded = decode_json(empty).unwrap();
            assert!(
                decoded.readings.is_empty() && decoded.rejected == 0,
                "{empty}"
            );
        }
    }

    #[test]
    fn a_refusal_stops_decoding_and_is_reported_as_such() {
        let limits = ReadingLimits::default();
        let mut points = Points::new(Timestamp::new(0, 0).unwrap(), &limits, 1, 1 << 20);
        let err = decode(
            br#"{"resourceMetrics":[{"scopeMetrics":[{"metrics":[{"name":"g","gauge":{"dataPoints":[{},{}]}}]}]}]}"#,
            &mut points,
            1024,
        )
        .unwrap_err();
        assert_eq!(err, DecodeError::Refused(Refused::TooManyPoints(1)));
    }
}

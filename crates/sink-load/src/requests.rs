//! The requests of a run, encoded once before it starts.

use std::collections::BTreeMap;

use bytes::Bytes;
use prost::Message;
use sink_proto::sensor_value::Measurement;
use sink_proto::{SensorValue, SensorValuesRequest};

/// At most this many distinct full requests are encoded; calls cycle through
/// them. Enough to vary names and values, few enough to stay in cache.
const MAX_VARIANTS: u64 = 256;

/// One encoded request and how many readings it carries.
#[derive(Debug, Clone)]
pub struct Encoded {
    /// The `SensorValuesRequest`, protobuf-encoded, as one gRPC frame: a
    /// byte saying "not compressed", the length as 4 bytes big-endian, the
    /// message. Calls share these bytes; none copies them.
    pub frame: Bytes,
    /// Its number of readings.
    pub readings: u64,
}

/// Labels every reading of a run carries.
pub type LabelSet = BTreeMap<String, String>;

/// Reads `--labels`: `key=value` pairs separated by commas (empty: none).
pub fn parse_labels(text: &str) -> Result<LabelSet, String> {
    text.split(',')
        .filter(|pair| !pair.is_empty())
        .map(|pair| match pair.split_once('=') {
            Some((key, value)) if !key.is_empty() => Ok((key.to_string(), value.to_string())),
            _ => Err(format!("`{pair}` is not key=value with a key")),
        })
        .collect()
}

/// What each reading of a run looks like beyond its name and time.
#[derive(Debug, Clone, Default)]
pub struct Shape {
    /// An OTLP `ExportMetricsServiceRequest` instead of a sensor.v1 request:
    /// each reading a gauge point of a metric of its name, its labels the
    /// point's attributes.
    pub otlp: bool,
    /// A float value (`i + 0.5`) instead of the integer `i`.
    pub float: bool,
    /// Labels on every reading.
    pub labels: LabelSet,
}

/// What every call of a run sends. Reading `i` of the run is named
/// `sensor-<i mod sensors>`, has value `i` and was created `i` milliseconds
/// after the start, so that, as from real sensors, no two readings of a call
/// share a timestamp; call `k` carries readings `k * per_call ..`, and
/// with a total count the last call carries what is left. Calls cycle through
/// at most [`MAX_VARIANTS`] distinct encoded requests, so values and
/// timestamps (`i` within the cycle) repeat across cycles.
#[derive(Debug)]
pub struct Plan {
    variants: Vec<Encoded>,
    /// The shorter last call of a counted run, and its index.
    last: Option<(u64, Encoded)>,
    /// Number of calls, when the run is counted.
    calls: Option<u64>,
}

impl Plan {
    /// Encodes the requests for `per_call` readings per call over `sensors`
    /// sensor names, `count` readings in all (or unbounded), created from
    /// `start` on.
    pub fn new(
        per_call: u64,
        sensors: u64,
        count: Option<u64>,
        start: prost_types::Timestamp,
        shape: &Shape,
    ) -> Self {
        let per_call = per_call.max(1);
        let sensors = sensors.max(1);
        let cycle = sensors / gcd(sensors, per_call);
        let encode = |call: u64, readings: u64| Encoded {
            frame: encode_call(call * per_call, readings, sensors, start, shape).into(),
            readings,
        };
        let variants = (0..cycle.min(MAX_VARIANTS))
            .map(|call| encode(call, per_call))
            .collect();
        let calls = count.map(|count| count.div_ceil(per_call));
        let last = count
            .filter(|count| count % per_call != 0)
            .map(|count| (count / per_call, encode(count / per_call, count % per_call)));
        Self {
            variants,
            last,
            calls,
        }
    }

    /// The request of call `call`, or `None` past the last call of a counted run.
    pub fn request(&self, call: u64) -> Option<&Encoded> {
        if self.calls.is_some_and(|calls| call >= calls) {
            return None;
        }
        match &self.last {
            Some((last, encoded)) if *last == call => Some(encoded),
            _ => Some(&self.variants[(call % self.variants.len() as u64) as usize]),
        }
    }
}

fn encode_call(
    first: u64,
    readings: u64,
    sensors: u64,
    start: prost_types::Timestamp,
    shape: &Shape,
) -> Vec<u8> {
    if shape.otlp {
        return frame(&otlp_request(first, readings, sensors, start, shape));
    }
    let request = SensorValuesRequest {
        items: (first..first + readings)
            .map(|i| SensorValue {
                sensor_name: format!("sensor-{}", i % sensors),
                measurement: Some(Measurement {
                    sensor_value: (!shape.float).then_some(i as i64),
                    sensor_value_float: shape.float.then_some(i as f64 + 0.5),
                    created_at: Some(millis_after(start, i)),
                }),
                labels: shape.labels.clone(),
            })
            .collect(),
    };
    frame(&request)
}

/// `message` as one uncompressed gRPC frame.
fn frame(message: &impl Message) -> Vec<u8> {
    let length = message.encoded_len();
    let mut frame = Vec::with_capacity(5 + length);
    frame.push(0);
    // A request over 4 GiB would be refused by any server long before.
    frame.extend_from_slice(&u32::try_from(length).unwrap_or(u32::MAX).to_be_bytes());
    message
        .encode(&mut frame)
        .expect("a Vec grows to any encoded length");
    frame
}

/// The OTLP form of the readings `first..first + readings`.
fn otlp_request(
    first: u64,
    readings: u64,
    sensors: u64,
    start: prost_types::Timestamp,
    shape: &Shape,
) -> sink_otlp::proto::collector::metrics::v1::ExportMetricsServiceRequest {
    use sink_otlp::proto::common::v1::{AnyValue, KeyValue, any_value};
    use sink_otlp::proto::metrics::v1::{
        Gauge, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics, metric, number_data_point,
    };
    let attributes: Vec<KeyValue> = shape
        .labels
        .iter()
        .map(|(key, value)| KeyValue {
            key: key.clone(),
            value: Some(AnyValue {
                value: Some(any_value::Value::StringValue(value.clone())),
            }),
        })
        .collect();
    let metrics = (first..first + readings)
        .map(|i| {
            let at = millis_after(start, i);
            let value = if shape.float {
                number_data_point::Value::AsDouble(i as f64 + 0.5)
            } else {
                number_data_point::Value::AsInt(i as i64)
            };
            Metric {
                name: format!("sensor-{}", i % sensors),
                data: Some(metric::Data::Gauge(Gauge {
                    data_points: vec![NumberDataPoint {
                        attributes: attributes.clone(),
                        time_unix_nano: at.seconds as u64 * 1_000_000_000 + at.nanos as u64,
                        value: Some(value),
                        ..Default::default()
                    }],
                })),
                ..Default::default()
            }
        })
        .collect();
    sink_otlp::proto::collector::metrics::v1::ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            scope_metrics: vec![ScopeMetrics {
                metrics,
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

/// `start` plus `millis` milliseconds.
fn millis_after(start: prost_types::Timestamp, millis: u64) -> prost_types::Timestamp {
    let nanos = i64::from(start.nanos) + (millis % 1000) as i64 * 1_000_000;
    prost_types::Timestamp {
        seconds: start.seconds + (millis / 1000) as i64 + nanos / 1_000_000_000,
        nanos: (nanos % 1_000_000_000) as i32,
    }
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(encoded: &Encoded) -> SensorValuesRequest {
        let (prefix, message) = encoded.frame.split_at(5);
        assert_eq!(prefix[0], 0, "not compressed");
        assert_eq!(
            u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize,
            message.len()
        );
        SensorValuesRequest::decode(message).unwrap()
    }

    fn names(encoded: &Encoded) -> Vec<String> {
        decode(encoded)
            .items
            .into_iter()
            .map(|item| item.sensor_name)
            .collect()
    }

    const T: prost_types::Timestamp = prost_types::Timestamp {
        seconds: 1_795_860_000,
        nanos: 0,
    };

    #[test]
    fn counted_run_sends_exactly_count_readings() {
        let plan = Plan::new(4, 3, Some(10), T, &Shape::default());
        let sizes: Vec<u64> = (0..)
            .map_while(|call| plan.request(call))
            .map(|encoded| encoded.readings)
            .collect();
        assert_eq!(sizes, [4, 4, 2]);
        let last = plan.request(2).unwrap();
        assert_eq!(decode(last).items.len(), 2);
        assert_eq!(names(last), ["sensor-2", "sensor-0"]);
    }

    #[test]
    fn calls_rotate_through_every_sensor() {
        let plan = Plan::new(2, 3, None, T, &Shape::default());
        let all: Vec<String> = (0..3)
            .flat_map(|call| names(plan.request(call).unwrap()))
            .collect();
        assert_eq!(
            all,
            [
                "sensor-0", "sensor-1", "sensor-2", "sensor-0", "sensor-1", "sensor-2"
            ]
        );
        // An unbounded run never runs out.
        assert!(plan.request(u64::MAX).is_some());
    }

    #[test]
    fn requests_carry_values_and_distinct_timestamps() {
        let plan = Plan::new(2, 1, Some(2), T, &Shape::default());
        let items = decode(plan.request(0).unwrap()).items;
        let measurements: Vec<_> = items.iter().map(|i| i.measurement.unwrap()).collect();
        assert_eq!(measurements[0].sensor_value, Some(0));
        assert_eq!(measurements[0].created_at, Some(T));
        assert_eq!(measurements[1].sensor_value, Some(1));
        assert_eq!(
            measurements[1].created_at,
            Some(prost_types::Timestamp {
                seconds: T.seconds,
                nanos: 1_000_000
            })
        );
        assert!(plan.request(1).is_none());
    }

    #[test]
    fn otlp_requests_carry_one_gauge_point_per_reading() {
        use sink_otlp::proto::collector::metrics::v1::ExportMetricsServiceRequest;
        let shape = Shape {
            otlp: true,
            labels: parse_labels("site=a,unit=C").unwrap(),
            ..Shape::default()
        };
        let plan = Plan::new(3, 10, Some(3), T, &shape);
        let frame = &plan.request(0).unwrap().frame;
        let request = ExportMetricsServiceRequest::decode(&frame[5..]).unwrap();
        let metrics = &request.resource_metrics[0].scope_metrics[0].metrics;
        let names: Vec<_> = metrics.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["sensor-0", "sensor-1", "sensor-2"]);
        let Some(sink_otlp::proto::metrics::v1::metric::Data::Gauge(gauge)) = &metrics[1].data
        else {
            panic!("not a gauge: {:?}", metrics[1]);
        };
        assert_eq!(gauge.data_points[0].attributes.len(), 2);
    }

    #[test]
    fn floats_and_labels_are_sent_when_asked_for() {
        let shape = Shape {
            float: true,
            labels: parse_labels("site=a,unit=C").unwrap(),
            ..Shape::default()
        };
        let plan = Plan::new(2, 1, Some(2), T, &shape);
        let items = decode(plan.request(0).unwrap()).items;
        let measurement = items[1].measurement.unwrap();
        assert_eq!(measurement.sensor_value, None);
        assert_eq!(measurement.sensor_value_float, Some(1.5));
        assert_eq!(items[1].labels, shape.labels);
        assert_eq!(parse_labels("").unwrap(), LabelSet::new());
        assert!(parse_labels("=x").is_err());
        assert!(parse_labels("novalue").is_err());
    }

    #[test]
    fn milliseconds_carry_into_seconds() {
        let start = prost_types::Timestamp {
            seconds: 10,
            nanos: 999_500_000,
        };
        let later = millis_after(start, 2_001);
        assert_eq!((later.seconds, later.nanos), (13, 500_000));
    }
}

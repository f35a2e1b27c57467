//! Decoding OTLP export requests into readings: the source's own decoder
//! against prost's generated one (which builds the message tree only, before
//! any conversion into readings). `cargo bench -p sink-otlp`.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use prost::Message;
use sink_api::{ReadingLimits, Timestamp};
use sink_otlp::proto::collector::metrics::v1::ExportMetricsServiceRequest;
use sink_otlp::proto::common::v1::{AnyValue, KeyValue, any_value};
use sink_otlp::proto::metrics::v1::{
    Gauge, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics, metric, number_data_point,
};
use sink_otlp::proto::resource::v1::Resource;

fn text(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.into())),
        }),
    }
}

fn point(i: u64) -> NumberDataPoint {
    NumberDataPoint {
        attributes: vec![
            text("site", "north-1"),
            text("device", "boiler-7"),
            text("unit", "C"),
        ],
        time_unix_nano: 1_795_860_000_000_000_000 + i,
        value: Some(number_data_point::Value::AsDouble(i as f64 + 0.5)),
        ..Default::default()
    }
}

fn request(metrics: Vec<Metric>, resource: Vec<KeyValue>) -> Vec<u8> {
    ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            resource: Some(Resource {
                attributes: resource,
                dropped_attributes_count: 0,
            }),
            scope_metrics: vec![ScopeMetrics {
                metrics,
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
    .encode_to_vec()
}

fn gauge(name: String, points: Vec<NumberDataPoint>) -> Metric {
    Metric {
        name,
        data: Some(metric::Data::Gauge(Gauge {
            data_points: points,
        })),
        ..Default::default()
    }
}

fn decode(c: &mut Criterion) {
    // As sink-load --otlp sends them: 100 metrics of one point each, no
    // resource attributes.
    let load = request(
        (0..100)
            .map(|i| gauge(format!("sensor-{i}"), vec![point(i)]))
            .collect(),
        vec![],
    );
    // As an SDK sends them: one metric of 100 points, a resource of four
    // attributes (service.name and the telemetry.sdk ones).
    let sdk = request(
        vec![gauge("queue.depth".into(), (0..100).map(point).collect())],
        vec![
            text("service.name", "api"),
            text("telemetry.sdk.language", "python"),
            text("telemetry.sdk.name", "opentelemetry"),
            text("telemetry.sdk.version", "1.45.2"),
        ],
    );
    let limits = ReadingLimits::default();
    let mut group = c.benchmark_group("decode 100 points");
    group.throughput(Throughput::Elements(100));
    for (name, message) in [("load", &load), ("sdk", &sdk)] {
        group.bench_function(format!("{name}: into readings"), |b| {
            b.iter(|| {
                sink_otlp::decode_request(black_box(message), false, Timestamp::now(), &limits)
                    .expect("decodes")
            })
        });
        group.bench_function(format!("{name}: prost tree only"), |b| {
            b.iter(|| {
                ExportMetricsServiceRequest::decode(black_box(&message[..])).expect("decodes")
            })
        });
    }
    group.finish();
}

criterion_group!(benches, decode);
criterion_main!(benches);

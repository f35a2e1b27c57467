//! Micro-benchmarks of the per-reading work: decoding a request into a batch,
//! encoding a batch as JSON lines, and the buffered processor merging small
//! batches. `cargo bench -p sink-stages`; bench/run measures the whole sink.

use std::hint::black_box;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use prost::Message;
use sink_api::json::{Layout, encode_batch};
use sink_api::testkit::{Harness, readings};
use sink_api::{Batch, Reading, ReadingLimits, Timestamp, Value};
use sink_proto::sensor_value::Measurement;
use sink_proto::{SensorValue, SensorValuesRequest};
use sink_stages::processors::buffered::BufferedConfig;
use sink_stages::sources::grpc::decode_batch;

/// An encoded request of `count` readings, as sink-load sends them.
fn encoded_request(count: usize) -> Vec<u8> {
    SensorValuesRequest {
        items: (0..count)
            .map(|i| SensorValue {
                sensor_name: format!("sensor-{}", i % 100),
                measurement: Some(Measurement {
                    sensor_value: Some(i as i64 * 37),
                    created_at: Some(prost_types::Timestamp {
                        seconds: 1_795_860_000,
                        nanos: 512_000_000,
                    }),
                    sensor_value_float: None,
                }),
                labels: Default::default(),
            })
            .collect(),
    }
    .encode_to_vec()
}

fn decode(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode request to batch");
    for count in [1, 100] {
        let message = encoded_request(count);
        group.throughput(Throughput::Elements(count as u64));
        group.bench_function(format!("{count} readings"), |b| {
            b.iter(|| {
                decode_batch(
                    black_box(&message),
                    Timestamp::now(),
                    &ReadingLimits::default(),
                )
            })
        });
        // What the source did before it decoded by hand, for comparison.
        group.bench_function(format!("{count} readings, prost then convert"), |b| {
            b.iter(|| prost_then_convert(black_box(&message), Timestamp::now()))
        });
    }
    group.finish();
}

/// The earlier decoding: prost's `SensorValuesRequest`, then each item moved
/// into a reading.
fn prost_then_convert(message: &[u8], received_at: Timestamp) -> Option<Batch> {
    let request = SensorValuesRequest::decode(message).ok()?;
    let mut batch = Batch::with_capacity(request.items.len());
    for item in request.items {
        let measurement = item.measurement.unwrap_or_default();
        let created_at = match measurement.created_at {
            None => None,
            Some(t) => Some(Timestamp::new(t.seconds, u32::try_from(t.nanos).ok()?)?),
        };
        batch.push(Reading {
            sensor_name: item.sensor_name.into(),
            labels: item.labels.into_iter().collect(),
            value: measurement.sensor_value.map(Value::Int),
            created_at,
            received_at,
        });
    }
    Some(batch)
}

fn encode(c: &mut Criterion) {
    let mut group = c.benchmark_group("encode batch as JSON lines");
    let batch = readings("sensor-", 0..100);
    let now = Timestamp::now();
    let mut out = Vec::with_capacity(1 << 16);
    group.throughput(Throughput::Elements(batch.len() as u64));
    for (name, layout) in [("value", Layout::Value), ("batch", Layout::Batch)] {
        group.bench_function(format!("100 readings, layout {name}"), |b| {
            b.iter(|| {
                out.clear();
                encode_batch(layout, black_box(&batch), now, &mut out);
                out.len()
            })
        });
    }
    group.finish();
}

fn buffered_merge(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut group = c.benchmark_group("buffered merge");
    // 1000 one-reading batches merged into batches of 10, the default
    // pipeline's shape at one reading per call; includes the channel hops.
    group.throughput(Throughput::Elements(1000));
    group.bench_function("1000 batches of 1, max_events 10", |b| {
        b.iter_batched(
            || -> Vec<Batch> { (0..1000).map(|i| readings("s", i..i + 1)).collect() },
            |batches| {
                runtime.block_on(async {
                    let config: BufferedConfig =
                        toml::from_str("max_events = 10").expect("valid config");
                    let stage = Harness::processor(config).expect("builds");
                    for batch in batches {
                        stage.send(batch).await;
                    }
                    stage.finish().await.expect("ends cleanly").len()
                })
            },
            BatchSize::LargeInput,
        )
    });
    group.finish();
}

criterion_group!(benches, decode, encode, buffered_merge);
criterion_main!(benches);

//! `settings.memory_limit`: the readings in flight are bounded in bytes, so a
//! flood of requests that decode to far more than they weigh (empty items)
//! cannot take the machine's memory.

use sink_e2e::*;
use sink_proto::{SensorValue, SensorValuesRequest};
use tonic::Code;

/// Lets a call carry millions of readings, so that memory_limit is what
/// stops it.
const UNBOUNDED_READINGS: &str = "max_readings_per_call = 10000000";

/// A request of `count` empty items: 2 bytes each on the wire, a whole
/// reading (about 80 bytes) each decoded.
fn empty_items(count: usize) -> SensorValuesRequest {
    SensorValuesRequest {
        items: vec![SensorValue::default(); count],
    }
}

/// `[settings]` with `settings` (and whatever tables follow), then grpc with
/// `grpc_keys` into a blackhole that holds its first batch for an hour.
fn stuck_pipeline(settings: &str, grpc_keys: &str) -> String {
    format!(
        "[settings]\n{settings}\n{}",
        [
            grpc("sensors", grpc_keys),
            stage(
                "sinks",
                "stuck",
                "blackhole",
                &["sensors"],
                "delay_per_batch = \"1h\"",
            ),
        ]
        .concat()
    )
}

#[tokio::test]
async fn a_request_larger_than_the_whole_limit_is_resource_exhausted() {
    let pipeline = format!(
        "[settings]\nmemory_limit = \"16MiB\"\n{}",
        [
            grpc("sensors", UNBOUNDED_READINGS),
            json_file("file", &["sensors"], "out.json", ""),
        ]
        .concat()
    );
    let mut sink = SinkProcess::start(&pipeline);
    let mut client = sink.client("sensors").await;
    // 1 MiB of empty items decodes to about 45 MB.
    let status = client
        .send_sensor_values(empty_items(512 * 1024))
        .await
        .expect_err("accepted beyond the whole memory limit");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("memory_limit"), "{status:?}");
    // Ordinary calls pass.
    client
        .send_sensor_values(request("fits", 100))
        .await
        .expect("a small call");
    sink.stop();
    assert_eq!(sensor_names(&sink.path("out.json")).len(), 100);
}

#[test]
fn memory_limit_takes_units_and_refuses_too_small_a_limit() {
    let pipeline = |limit: &str| {
        format!(
            "[settings]\nmemory_limit = {limit}\n{}",
            [
                grpc("sensors", ""),
                json_file("file", &["sensors"], "out.json", ""),
            ]
            .concat()
        )
    };
    assert_refused(
        &pipeline("\"100KiB\""),
        &[],
        &["settings.memory_limit", "too small"],
    );
    assert_refused(&pipeline("\"lots\""), &[], &["settings.memory_limit"]);
    let run = run_sink(&pipeline("\"512MiB\""), &["validate"], &[]);
    assert_eq!(run.status.code(), Some(0), "{}", run.stderr);
}

/// Twelve 1 MiB requests of empty items (half a million readings, about
/// 45 MB, each decoded) from four clients at once into a sink that is stuck
/// with the first. With a 64 MiB limit, only that one is held and the others
/// are refused before their bodies are read (`when_full = "reject"`;
/// `"wait"` would hold them unread); without it, all twelve (over 500 MB;
/// 456 MiB peak RSS measured) sit in the sink's channel. The stated bound:
/// the limit plus 64 MiB for the process itself and the bodies in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_empty_items_into_a_stuck_sink_stays_within_the_bound() {
    const BOUND: u64 = 128 << 20;
    let pipeline = stuck_pipeline(
        "memory_limit = \"64MiB\"",
        &format!("{UNBOUNDED_READINGS}\nwhen_full = \"reject\""),
    );
    let sink = SinkProcess::start(&pipeline);
    let address = sink.address("sensors");
    let clients: Vec<_> = (0..4)
        .map(|_| {
            tokio::spawn(async move {
                let mut client = connect(address).await;
                let mut answers = Vec::new();
                for _ in 0..3 {
                    let request = empty_items(512 * 1024 - 8);
                    answers.push(client.send_sensor_values(request).await.map(|_| ()));
                }
                answers
            })
        })
        .collect();
    let mut oks = 0;
    for client in clients {
        for answer in client.await.expect("client task") {
            match answer {
                Ok(()) => oks += 1,
                Err(status) => assert_eq!(status.code(), Code::Unavailable, "{status:?}"),
            }
        }
    }
    let peak = peak_rss_kb(sink.pid()) * 1024;
    eprintln!("{oks} of 12 calls accepted; peak RSS {} MiB", peak >> 20);
    assert_eq!(oks, 1, "more than the limit was let in");
    assert!(
        peak < BOUND,
        "peak RSS {} MiB over {} MiB",
        peak >> 20,
        BOUND >> 20
    );
}

/// Labels count in memory_limit as names do: a request of nothing but tiny
/// labels (64 per item, 6 bytes each on the wire, about 50 decoded) weighs
/// 4 MiB and decodes to about 35 MB, and a call held by a stuck sink holds
/// all of it under the limit. Twelve such calls, one after the other: only
/// what fits the 128 MiB limit is accepted, and the process stays within the
/// limit plus 64 MiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_tiny_labels_stays_within_the_bound() {
    const BOUND: u64 = 192 << 20;
    let pipeline = stuck_pipeline(
        "memory_limit = \"128MiB\"\n[api]\naddress = \"127.0.0.1:0\"",
        // The test's own debug-built client is slow to encode these.
        "when_full = \"reject\"\nbody_timeout = \"60s\"",
    );
    const ITEMS: usize = 10_000;
    const LABELS: usize = 64;
    let labels: std::collections::BTreeMap<String, String> = (0..LABELS)
        .map(|i| (format!("{i:02}"), String::new()))
        .collect();
    let item = SensorValue {
        labels,
        ..SensorValue::default()
    };
    let request = SensorValuesRequest {
        items: vec![item; ITEMS],
    };
    assert!(encoded_len(&request) < 4 << 20);
    let sink = SinkProcess::start(&pipeline);
    let mut client = connect(sink.address("sensors")).await;
    client
        .send_sensor_values(request.clone())
        .await
        .expect("the first call fits");
    // What the held call counts: at least its labels' slots (two `String`s
    // each) and their text.
    let labels_held = (ITEMS * LABELS * (2 * std::mem::size_of::<String>() + 2)) as f64;
    let reserved = sink
        .metric("sink_memory_reserved_bytes", &[])
        .expect("metric");
    assert!(
        reserved >= labels_held,
        "{reserved} bytes reserved for a call holding {labels_held} bytes of labels"
    );
    let mut oks = 1;
    for _ in 1..12 {
        match client.send_sensor_values(request.clone()).await {
            Ok(_) => oks += 1,
            Err(status) => assert_eq!(status.code(), Code::Unavailable, "{status:?}"),
        }
    }
    let peak = peak_rss_kb(sink.pid()) * 1024;
    eprintln!("{oks} of 12 calls accepted; peak RSS {} MiB", peak >> 20);
    assert!(oks <= 3, "{oks} calls of about 35 MB each let into 128 MiB");
    assert!(
        peak < BOUND,
        "peak RSS {} MiB over {} MiB",
        peak >> 20,
        BOUND >> 20
    );
}

/// The whole server's gRPC health status, polled until it is `want` (at
/// most [`DEADLINE`]).
async fn health_becomes(
    address: std::net::SocketAddr,
    want: tonic_health::pb::health_check_response::ServingStatus,
) -> bool {
    let start = std::time::Instant::now();
    while start.elapsed() < DEADLINE {
        if health_of(address, "")
            .await
            .is_ok_and(|status| status == want)
        {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    false
}

/// Calls waiting for room in memory_limit (the channel itself has room)
/// make the pipeline not ready, as a full channel does; room makes it ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_waiting_for_memory_turn_health_not_serving_until_there_is_room() {
    use tonic_health::pb::health_check_response::ServingStatus;
    let pipeline = format!(
        "[settings]\nmemory_limit = \"16MiB\"\n{}",
        [
            grpc("sensors", UNBOUNDED_READINGS),
            stage(
                "sinks",
                "slow",
                "blackhole",
                &["sensors"],
                "delay_per_batch = \"3s\"",
            ),
        ]
        .concat()
    );
    let mut sink = SinkProcess::start(&pipeline);
    let address = sink.address("sensors");
    // About 9.5 MB each once decoded: one fits in 16 MiB, two do not.
    let calls: Vec<_> = (0..2)
        .map(|_| {
            tokio::spawn(async move {
                let mut client = connect(address).await;
                client.send_sensor_values(empty_items(110_000)).await
            })
        })
        .collect();
    assert!(
        health_becomes(address, ServingStatus::NotServing).await,
        "health stayed SERVING while a call waited for memory"
    );
    assert!(
        sink.wait_log("for room in settings.memory_limit"),
        "{}",
        sink.log_text()
    );
    assert!(
        health_becomes(address, ServingStatus::Serving).await,
        "health did not recover once there was room"
    );
    for call in calls {
        call.await
            .expect("call task")
            .expect("both calls are accepted in the end");
    }
    sink.stop();
    assert!(sink.log_text().contains("220000"), "{}", sink.log_text());
}

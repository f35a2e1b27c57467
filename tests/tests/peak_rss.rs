//! Peak resident memory of the real binary under the memory attacks of
//! issue 24 (item 5), on the default pipeline's stages and limits (except
//! where an attack needs a longer sensor name): each test starts a fresh
//! sink, attacks it, and checks the kernel's high-water mark (`VmHWM`).
//! Ignored by default: each sends hundreds of megabytes, and the figures
//! are for the release build (`cargo build --release -p sink`, then
//! `SINK_BIN=target/release/sink cargo test -p sink-e2e --test peak_rss --
//! --ignored --nocapture`); docs/memory.md gives the figures measured.

use std::time::Duration;

use prost::Message;
use sink_e2e::*;
use sink_proto::sensor_service_client::SensorServiceClient;

/// The default pipeline (grpc -> buffered -> json_file), with `grpc` keys.
fn default_pipeline(grpc_keys: &str) -> String {
    [
        grpc("sensors", grpc_keys),
        buffered("batch", &["sensors"], ""),
        json_file("file", &["batch"], "out.json", ""),
    ]
    .concat()
}

/// Lines in `path` so far (without parsing them: each is 24 MiB).
fn line_count(path: &std::path::Path) -> usize {
    std::fs::read(path)
        .map(|bytes| bytes.iter().filter(|&&b| b == b'\n').count())
        .unwrap_or(0)
}

/// The limit the issue sets: the default `memory_limit`.
const LIMIT_MIB: u64 = 256;

fn report(attack: &str, sink: &SinkProcess) -> u64 {
    let peak = peak_rss_kb(sink.pid()) / 1024;
    println!("peak RSS under {attack}: {peak} MiB");
    peak
}

#[tokio::test]
#[ignore = "measurement: sends hundreds of megabytes; see the module docs"]
async fn names_that_escape_sixfold_stay_under_the_limit() {
    let mut sink = SinkProcess::start(&default_pipeline(
        "limits = { max_name_bytes = 4194304 }\nmax_message_bytes = 4200000",
    ));
    let mut client = sink.client("sensors").await;
    for i in 0..10 {
        let mut call = request(&format!("x{i}"), 1);
        call.items[0].sensor_name = "\u{1}".repeat(4 << 20);
        client.send_sensor_values(call).await.expect("sent");
    }
    // Ten lines of 24 MiB each take a while in a debug build.
    let out = sink.path("out.json");
    let started = std::time::Instant::now();
    while line_count(&out) < 10 {
        assert!(started.elapsed() < Duration::from_secs(180), "not written");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let peak = report("ten 4 MiB names of \\x01", &sink);
    sink.stop();
    assert!(peak < LIMIT_MIB, "{peak} MiB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "measurement: sends hundreds of megabytes; see the module docs"]
async fn a_hundred_zstd_clients_stay_under_the_limit() {
    let mut sink = SinkProcess::start(&default_pipeline(""));
    let address = sink.address("sensors");
    // One request of 100 000 readings named alike: a few hundred bytes of zstd.
    let mut plain = request("z", 99_999);
    for item in &mut plain.items {
        item.sensor_name = "zzzzzzzz".into();
        item.measurement = None;
    }
    let packed = zstd::stream::encode_all(&plain.encode_to_vec()[..], 19).expect("zstd");
    println!("zstd request of {} bytes", packed.len());
    let mut calls = Vec::new();
    for _ in 0..100 {
        let packed = packed.clone();
        calls.push(tokio::spawn(async move {
            let _ = call_compressed(address, "zstd", &packed).await;
        }));
    }
    for call in calls {
        let _ = call.await;
    }
    let peak = report("100 clients of zstd requests", &sink);
    sink.stop();
    assert!(peak < LIMIT_MIB, "{peak} MiB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "measurement: sends hundreds of megabytes; see the module docs"]
async fn calls_of_99_999_readings_stay_under_the_limit() {
    let mut sink = SinkProcess::start(&default_pipeline(""));
    let address = sink.address("sensors");
    let mut calls = Vec::new();
    for c in 0..20 {
        calls.push(tokio::spawn(async move {
            let mut client: SensorServiceClient<_> = connect(address).await;
            for i in 0..3 {
                let _ = client
                    .send_sensor_values(request(&format!("c{c}-{i}-"), 99_999))
                    .await;
            }
        }));
    }
    for call in calls {
        let _ = call.await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let peak = report("20 clients of 99 999-reading calls", &sink);
    sink.stop();
    assert!(peak < LIMIT_MIB, "{peak} MiB");
}

/// One call of `packed` (compressed with `encoding`), over raw HTTP/2.
async fn call_compressed(
    address: std::net::SocketAddr,
    encoding: &'static str,
    packed: &[u8],
) -> Option<()> {
    let tcp = tokio::net::TcpStream::connect(address).await.ok()?;
    let (sender, connection) = h2::client::handshake(tcp).await.ok()?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let mut sender = sender.ready().await.ok()?;
    let request = http::Request::builder()
        .method("POST")
        .uri("http://sink/sensor.v1.SensorService/SendSensorValues")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-encoding", encoding)
        .body(())
        .ok()?;
    let (answer, mut stream) = sender.send_request(request, false).ok()?;
    let mut framed = vec![1u8];
    framed.extend_from_slice(&(packed.len() as u32).to_be_bytes());
    framed.extend_from_slice(packed);
    stream.send_data(framed.into(), true).ok()?;
    let response = answer.await.ok()?;
    let mut body = response.into_body();
    while let Some(chunk) = body.data().await {
        let _ = chunk.ok()?;
    }
    let _ = body.trailers().await;
    Some(())
}

//! The `grpc` source alone, with a real tonic client on 127.0.0.1.

use std::net::SocketAddr;
use std::time::Duration;

use prost::Message;
use sink_api::testkit::Harness;
use sink_proto::sensor_service_client::SensorServiceClient;
use sink_proto::sensor_value::Measurement;
use sink_proto::{SensorValue, SensorValuesRequest, SensorValuesResponse};
use sink_stages::sources::grpc::{GrpcConfig, RateLimit, WhenFull};
use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt;

const WAIT: Duration = Duration::from_secs(20);

/// The config of a grpc source on `address`, every other key at its default
/// (as a pipeline file with only `address` gives it).
fn config(address: String) -> GrpcConfig {
    let config: GrpcConfig =
        toml::from_str(&format!("address = {address:?}")).expect("a minimal grpc config");
    assert_eq!(config.when_full, WhenFull::Wait);
    config
}

fn limited(rate: u32, burst: usize) -> Option<RateLimit> {
    Some(RateLimit {
        bytes_per_second: rate,
        burst_bytes: Some(u32::try_from(burst).expect("small")),
    })
}

/// Starts the source with `adjust` applied to its config, on a port that was
/// free a moment ago (tried again if another process took it meanwhile), and
/// a client connected to it.
async fn start(
    adjust: impl Fn(&mut GrpcConfig),
) -> (Harness, GrpcConfig, SensorServiceClient<Channel>) {
    for _ in 0..20 {
        let free = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("a free port");
        let mut config = config(free.to_string());
        adjust(&mut config);
        if let Ok(stage) = Harness::source(config.clone()) {
            return (stage, config, connect(free).await);
        }
    }
    panic!("no free port in 20 tries");
}

async fn connect(address: SocketAddr) -> SensorServiceClient<Channel> {
    let channel = Channel::from_shared(format!("http://{address}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    SensorServiceClient::new(channel)
}

fn request(prefix: &str, count: usize) -> SensorValuesRequest {
    SensorValuesRequest {
        items: (0..count)
            .map(|i| {
                // The timestamp type is prost-types', reached through the field.
                let mut measurement = Measurement {
                    sensor_value: Some(i as i64 + 1),
                    created_at: Some(Default::default()),
                    sensor_value_float: None,
                };
                if let Some(created_at) = measurement.created_at.as_mut() {
                    created_at.seconds = 1_795_860_000;
                }
                SensorValue {
                    sensor_name: format!("{prefix}{i}"),
                    measurement: Some(measurement),
                    labels: Default::default(),
                }
            })
            .collect(),
    }
}

/// Fills the test kit's output channel: 1024 batches that nobody reads yet.
async fn fill_output(client: &mut SensorServiceClient<Channel>) {
    for _ in 0..1024 {
        client
            .send_sensor_values(request("w", 1))
            .await
            .expect("room");
    }
}

/// Sends `request` on a connection of its own, in the background.
async fn send_in_background(
    address: SocketAddr,
    request: SensorValuesRequest,
) -> tokio::task::JoinHandle<Result<tonic::Response<SensorValuesResponse>, tonic::Status>> {
    let mut client = connect(address).await;
    tokio::spawn(async move { client.send_sensor_values(request).await })
}

#[tokio::test]
async fn a_request_becomes_one_batch_and_an_empty_one_becomes_none() {
    let (mut stage, _, mut client) = start(|_| {}).await;
    client
        .send_sensor_values(request("r", 3))
        .await
        .expect("send");
    let batch = stage.next_batch(WAIT).await.expect("a batch");
    let names: Vec<&str> = batch.iter().map(|r| r.sensor_name.as_str()).collect();
    assert_eq!(names, ["r0", "r1", "r2"]);
    assert_eq!(batch[2].value, Some(3.into()));
    assert_eq!(
        batch[0].created_at.map(|t| t.to_string()).as_deref(),
        Some("2026-11-28T10:00:00Z")
    );
    client
        .send_sensor_values(request("e", 0))
        .await
        .expect("an empty request is OK");
    client
        .send_sensor_values(request("s", 1))
        .await
        .expect("send");
    // The next batch is the one-reading request: the empty one sent nothing.
    assert_eq!(stage.next_batch(WAIT).await.expect("a batch").len(), 1);
    assert!(stage.finish().await.expect("ends").is_empty());
}

#[tokio::test]
async fn over_the_rate_limit_a_call_is_refused_with_retry_info_and_empties_cost_nothing() {
    let probe = request("p", 5);
    let cost = probe.encoded_len();
    let (stage, _, mut client) = start(|c| c.rate_limit = limited(1, cost)).await;
    for _ in 0..20 {
        client
            .send_sensor_values(request("e", 0))
            .await
            .expect("empty");
    }
    client
        .send_sensor_values(probe.clone())
        .await
        .expect("the bucket is full: empties cost nothing");
    let refused = client
        .send_sensor_values(probe)
        .await
        .expect_err("the bucket is empty");
    assert_eq!(refused.code(), Code::ResourceExhausted);
    let retry = refused.get_details_retry_info().expect("RetryInfo");
    assert!(
        retry
            .retry_delay
            .is_some_and(|d| d > Duration::from_secs(1))
    );
    assert_eq!(stage.finish().await.expect("ends").len(), 5);
}

#[tokio::test]
async fn a_changed_limit_acts_at_once_with_a_full_bucket_and_an_unchanged_one_keeps_its_bucket() {
    let probe = request("p", 5);
    let cost = probe.encoded_len();
    let (stage, mut current, mut client) = start(|c| c.rate_limit = limited(1, cost)).await;
    client
        .send_sensor_values(probe.clone())
        .await
        .expect("first");
    // The same limit again keeps the empty bucket.
    stage.update(current.clone());
    let refused = |result: Result<_, tonic::Status>| {
        result.expect_err("the bucket is empty").code() == Code::ResourceExhausted
    };
    assert!(refused(client.send_sensor_values(probe.clone()).await));
    // A new burst starts full.
    current.rate_limit = limited(1, cost + 1);
    stage.update(current);
    let mut passed = false;
    for _ in 0..2_000 {
        if client.send_sensor_values(probe.clone()).await.is_ok() {
            passed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(passed, "the new limit never applied");
    assert_eq!(stage.finish().await.expect("ends").len(), 10);
}

#[tokio::test]
async fn when_full_reject_answers_unavailable_until_there_is_room() {
    let (mut stage, _, mut client) = start(|c| c.when_full = WhenFull::Reject).await;
    // The test kit's output channel holds 1024 batches; nobody reads it yet.
    let mut accepted = 0;
    let refused = loop {
        match client.send_sensor_values(request("f", 1)).await {
            Ok(_) => accepted += 1,
            Err(status) => break status,
        }
        assert!(accepted <= 1024, "the output never filled");
    };
    assert_eq!(accepted, 1024);
    assert_eq!(refused.code(), Code::Unavailable);
    assert!(refused.get_details_retry_info().is_some(), "no RetryInfo");
    stage.next_batch(WAIT).await.expect("a batch");
    client
        .send_sensor_values(request("f", 1))
        .await
        .expect("room again");
    assert_eq!(stage.finish().await.expect("ends").len(), 1024);
}

#[tokio::test]
async fn when_full_wait_holds_the_call_until_there_is_room() {
    let (mut stage, config, mut client) = start(|_| {}).await;
    fill_output(&mut client).await;
    let address: SocketAddr = config.address.parse().expect("address");
    let waiting = send_in_background(address, request("last", 1)).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!waiting.is_finished(), "the call did not wait for room");
    stage.next_batch(WAIT).await.expect("a batch");
    tokio::time::timeout(WAIT, waiting)
        .await
        .expect("the call ends once there is room")
        .expect("no panic")
        .expect("OK");
    assert_eq!(stage.finish().await.expect("ends").len(), 1024);
}

#[tokio::test]
async fn beyond_max_concurrent_calls_a_call_waits_before_it_is_decoded() {
    let (mut stage, config, mut client) = start(|c| c.max_concurrent_calls = 1).await;
    fill_output(&mut client).await;
    let address: SocketAddr = config.address.parse().expect("address");
    // This call takes the only permit and waits for room in the output...
    let held = send_in_background(address, request("held", 1)).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    // ...so this one, which decoding alone would refuse at once (a timestamp
    // out of range), must wait for the permit before it is even decoded.
    let mut bad = request("bad", 1);
    if let Some(created_at) = bad.items[0]
        .measurement
        .as_mut()
        .and_then(|m| m.created_at.as_mut())
    {
        created_at.seconds = i64::MAX;
    }
    let refused = send_in_background(address, bad).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !refused.is_finished(),
        "decoded beyond max_concurrent_calls"
    );

    stage.next_batch(WAIT).await.expect("a batch");
    tokio::time::timeout(WAIT, held)
        .await
        .expect("the holder ends once there is room")
        .expect("no panic")
        .expect("OK");
    let status = tokio::time::timeout(WAIT, refused)
        .await
        .expect("the second call runs once the permit is free")
        .expect("no panic")
        .expect_err("an invalid timestamp");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(stage.finish().await.expect("ends").len(), 1024);
}

#[tokio::test]
async fn after_shutdown_calls_are_unavailable() {
    let (stage, _, mut client) = start(|_| {}).await;
    stage.shutdown();
    let mut refused = None;
    for _ in 0..2_000 {
        match client.send_sensor_values(request("late", 1)).await {
            Ok(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            Err(status) => {
                refused = Some(status);
                break;
            }
        }
    }
    let refused = refused.expect("still accepting after shutdown");
    assert!(
        matches!(refused.code(), Code::Unavailable | Code::Cancelled),
        "{refused:?}"
    );
    stage.finish().await.expect("ends");
}

#[test]
fn refuses_zero_limits() {
    use sink_api::SourceConfig;
    let mut bad = config("127.0.0.1:0".into());
    bad.max_message_bytes = 0;
    assert_eq!(bad.validate().expect_err("0").key, "max_message_bytes");
    let mut bad = config("127.0.0.1:0".into());
    bad.rate_limit = Some(RateLimit {
        bytes_per_second: 0,
        burst_bytes: None,
    });
    assert_eq!(
        bad.validate().expect_err("0").key,
        "rate_limit.bytes_per_second"
    );
}

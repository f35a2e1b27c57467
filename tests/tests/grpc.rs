//! The grpc source's answers, through the real binary: rate limit with
//! RetryInfo, message size, undecodable bytes, a full pipeline, health and
//! reflection.

use std::time::Duration;

use sink_e2e::*;
use tonic::Code;

/// grpc (with `source` keys) -> buffered(max_events = 1) -> out.json.
fn pipeline_with_source(source: &str) -> String {
    [
        grpc("sensors", source),
        buffered("batch", &["sensors"], "max_events = 1"),
        json_file("file", &["batch"], "out.json", ""),
    ]
    .concat()
}

#[tokio::test]
async fn over_the_rate_limit_a_call_gets_resource_exhausted_with_retry_info() {
    let probe = request("rate", 10);
    let cost = encoded_len(&probe);
    // The bucket holds exactly one such request and refills at 1 byte/s.
    let mut sink = SinkProcess::start(&pipeline_with_source(&format!(
        "rate_limit = {{ bytes_per_second = 1, burst_bytes = {cost} }}"
    )));
    let mut client = sink.client("sensors").await;
    client
        .send_sensor_values(probe.clone())
        .await
        .expect("a request the size of the burst passes");
    let refused = client
        .send_sensor_values(probe)
        .await
        .expect_err("the bucket is empty");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    let delay = retry_delay(&refused).expect("a RetryInfo detail");
    // Refilling `cost` bytes at 1 byte/s takes about `cost` seconds.
    assert!(
        delay > Duration::from_secs(cost as u64 / 2) && delay <= Duration::from_secs(cost as u64),
        "retry delay {delay:?} for {cost} bytes at 1 byte/s"
    );
    sink.stop();
    assert_each_once(
        &sensor_names(&sink.path("out.json")),
        &(0..10).map(|i| format!("rate{i}")).collect::<Vec<_>>(),
    );
}

#[tokio::test]
async fn a_request_larger_than_the_burst_is_told_it_can_never_pass() {
    let request = request("big", 10);
    let cost = encoded_len(&request);
    // One byte short: shows the cost is the encoded message size exactly.
    let mut sink = SinkProcess::start(&pipeline_with_source(&format!(
        "rate_limit = {{ bytes_per_second = 1000000, burst_bytes = {} }}",
        cost - 1
    )));
    let mut client = sink.client("sensors").await;
    let refused = client
        .send_sensor_values(request)
        .await
        .expect_err("larger than the burst");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("can never pass"),
        "{}",
        refused.message()
    );
    assert_eq!(
        retry_delay(&refused),
        None,
        "retrying can never help, so no RetryInfo"
    );
    // Smaller requests still pass.
    client
        .send_sensor_values(request_range("big", 0..5))
        .await
        .expect("a smaller request");
    sink.stop();
    assert_eq!(sensor_names(&sink.path("out.json")).len(), 5);
}

#[tokio::test]
async fn unknown_fields_count_toward_the_rate_limit_cost() {
    // Valid readings plus an unknown field 99 of 1000 bytes: the cost is the
    // message as received, so a burst of 1000 can never pass it, although
    // the readings alone fit.
    let request = request("u", 10);
    let known = encoded_len(&request);
    assert!(known < 1000, "the readings alone must fit the burst");
    let mut body = prost::Message::encode_to_vec(&request);
    body.extend_from_slice(&[0x9a, 0x06]); // field 99, length-delimited
    body.extend_from_slice(&[0xe8, 0x07]); // length 1000
    body.extend(std::iter::repeat_n(0_u8, 1000));
    let mut sink = SinkProcess::start(&pipeline_with_source(
        "rate_limit = { bytes_per_second = 1000000, burst_bytes = 1000 }",
    ));
    let refused = call_raw(
        sink.address("sensors"),
        "/sensor.v1.SensorService/SendSensorValues",
        body,
    )
    .await
    .expect_err("over the burst with its unknown field");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("can never pass"),
        "{}",
        refused.message()
    );
    let mut client = sink.client("sensors").await;
    client
        .send_sensor_values(request)
        .await
        .expect("the same readings alone pass");
    sink.stop();
    assert_eq!(sensor_names(&sink.path("out.json")).len(), 10);
}

#[tokio::test]
async fn an_empty_request_is_ok_and_costs_nothing() {
    let full = request("e", 10);
    let cost = encoded_len(&full);
    let mut sink = SinkProcess::start(&pipeline_with_source(&format!(
        "rate_limit = {{ bytes_per_second = 1, burst_bytes = {cost} }}"
    )));
    let mut client = sink.client("sensors").await;
    for _ in 0..50 {
        client
            .send_sensor_values(request("e", 0))
            .await
            .expect("an empty request is OK");
    }
    // Had the empty requests cost anything, this would not fit the bucket.
    client
        .send_sensor_values(full)
        .await
        .expect("the bucket is still full");
    sink.stop();
    assert_eq!(
        sensor_names(&sink.path("out.json")).len(),
        10,
        "an empty request wrote something"
    );
}

#[tokio::test]
async fn an_oversize_message_gets_resource_exhausted_and_the_server_keeps_serving() {
    let mut sink = SinkProcess::start(&pipeline_with_source("max_message_bytes = 1000"));
    let mut client = sink.client("sensors").await;
    let large = request("o", 100);
    assert!(encoded_len(&large) > 1000);
    let refused = client
        .send_sensor_values(large)
        .await
        .expect_err("over max_message_bytes");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    client
        .send_sensor_values(request("o", 3))
        .await
        .expect("a small request after the refused one");
    sink.stop();
    assert_eq!(sensor_names(&sink.path("out.json")), ["o0", "o1", "o2"]);
}

#[tokio::test]
async fn garbage_bytes_get_an_error_status_and_the_server_keeps_serving() {
    let mut sink = SinkProcess::start(&pipeline_with_source(""));
    let address = sink.address("sensors");
    let garbage: [&[u8]; 3] = [
        // A varint that never ends.
        &[0xff; 16],
        // Field 1 (items) claims 100 bytes and brings 2.
        &[0x0a, 100, 0x01, 0x02],
        // Wire type 7 does not exist.
        &[0x0f, 0x00],
    ];
    for bytes in garbage {
        let refused = call_raw(
            address,
            "/sensor.v1.SensorService/SendSensorValues",
            bytes.to_vec(),
        )
        .await
        .expect_err("undecodable bytes");
        assert!(
            matches!(refused.code(), Code::Internal | Code::InvalidArgument),
            "{bytes:?} answered {refused:?}"
        );
    }
    // Valid bytes through the same raw path, and a normal client, still work.
    let valid = prost::Message::encode_to_vec(&request("g", 2));
    call_raw(address, "/sensor.v1.SensorService/SendSensorValues", valid)
        .await
        .expect("a valid raw request");
    let mut client = sink.client("sensors").await;
    client
        .send_sensor_values(request("h", 1))
        .await
        .expect("the server still serves");
    sink.stop();
    assert_each_once(
        &sensor_names(&sink.path("out.json")),
        &["g0".into(), "g1".into(), "h0".into()],
    );
}

#[tokio::test]
async fn an_unknown_method_is_unimplemented() {
    let sink = SinkProcess::start(&pipeline_with_source(""));
    let refused = call_raw(
        sink.address("sensors"),
        "/sensor.v1.SensorService/Nope",
        Vec::new(),
    )
    .await
    .expect_err("no such method");
    assert_eq!(refused.code(), Code::Unimplemented, "{refused:?}");
}

#[tokio::test]
async fn when_full_reject_answers_unavailable_with_retry_info_under_a_full_pipeline() {
    let mut sink = SinkProcess::start_holding_stdout(&stdout_pipeline("when_full = \"reject\""));
    let mut client = sink.client("sensors").await;
    let (mut accepted, refused) = fill_until_refused(&mut client, "w", 20, 2_000).await;
    let refused = refused.expect("the pipeline never filled");
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(retry_delay(&refused).is_some_and(|d| d > Duration::ZERO));
    // Once the pipe is read again, the pipeline drains and accepts again.
    sink.release_stdout();
    let mut retried = false;
    for _ in 0..2_000 {
        let request = request_range("again", 0..1);
        if client.send_sensor_values(request).await.is_ok() {
            retried = true;
            accepted.push("again0".into());
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(retried, "the pipeline did not accept again after draining");
    sink.stop();
    assert_each_once(&names_in(&sink.stdout_lines()), &accepted);
}

#[tokio::test]
async fn the_health_service_says_serving() {
    use tonic_health::pb::health_check_response::ServingStatus;
    let sink = SinkProcess::start(&pipeline_with_source(""));
    let address = sink.address("sensors");
    assert_eq!(
        health_of(address, "sensor.v1.SensorService")
            .await
            .expect("check"),
        ServingStatus::Serving
    );
    assert_eq!(
        health_of(address, "").await.expect("check"),
        ServingStatus::Serving
    );
    let unknown = health_of(address, "no.such.Service")
        .await
        .expect_err("unknown service");
    assert_eq!(unknown.code(), Code::NotFound);
}

#[tokio::test]
async fn reflection_lists_the_sensor_service() {
    let sink = SinkProcess::start(&pipeline_with_source(""));
    let services = reflected_services(sink.address("sensors")).await;
    assert!(
        services.iter().any(|s| s == "sensor.v1.SensorService"),
        "{services:?}"
    );
    assert!(
        services.iter().any(|s| s == "grpc.health.v1.Health"),
        "{services:?}"
    );
}

#[tokio::test]
async fn a_timestamp_outside_rfc3339_is_invalid_argument() {
    let mut sink = SinkProcess::start(&pipeline_with_source(""));
    let mut client = sink.client("sensors").await;
    let mut bad = request("ts", 2);
    if let Some(measurement) = bad.items[1].measurement.as_mut() {
        measurement.created_at = Some(prost_types::Timestamp {
            seconds: i64::MAX,
            nanos: 0,
        });
    }
    let refused = client
        .send_sensor_values(bad)
        .await
        .expect_err("bad timestamp");
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(
        refused.message().contains("items[1]"),
        "{}",
        refused.message()
    );
    sink.stop();
    assert!(
        json_lines(&sink.path("out.json")).is_empty(),
        "part of a refused request was written"
    );
}

#[tokio::test]
async fn garbage_on_the_connection_itself_is_dropped_and_the_server_keeps_serving() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut sink = SinkProcess::start(&pipeline_with_source(""));
    let address = sink.address("sensors");
    for junk in [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        (0..4096u32).map(|i| (i * 7919 % 251) as u8).collect(),
        // The HTTP/2 preface, then a frame header announcing more than is sent.
        [
            &b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"[..],
            &[0xff, 0xff, 0xff, 0x01, 0x00, 0, 0, 0, 1],
        ]
        .concat(),
    ] {
        let mut stream = tokio::net::TcpStream::connect(address)
            .await
            .expect("connect");
        stream.write_all(&junk).await.expect("write");
        let _ = stream.shutdown().await;
        // The server answers (or not) and closes; it must not hang or crash.
        let mut answer = Vec::new();
        tokio::time::timeout(DEADLINE, stream.read_to_end(&mut answer))
            .await
            .expect("the server closed the connection")
            .ok();
    }
    let mut client = sink.client("sensors").await;
    client
        .send_sensor_values(request("after", 2))
        .await
        .expect("the server still serves");
    sink.stop();
    assert_eq!(sensor_names(&sink.path("out.json")), ["after0", "after1"]);
}

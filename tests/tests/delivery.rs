//! Readings in = lines out, through the real binary over real gRPC.

use sink_e2e::*;

#[tokio::test]
async fn one_reading_becomes_one_valid_line() {
    let mut sink = SinkProcess::start(&basic_pipeline("max_events = 1"));
    let mut client = sink.client("sensors").await;
    client
        .send_sensor_values(request("t", 1))
        .await
        .expect("send");
    let out = sink.path("out.json");
    assert!(wait_for_lines(&out, 1));
    sink.stop();
    let lines = json_lines(&out);
    assert_eq!(lines.len(), 1);
    let line = &lines[0];
    assert_eq!(line["sensor_name"], "t0");
    assert_eq!(line["sensor_value"], 0);
    assert_eq!(line["created_at"], "2026-11-28T10:00:00Z");
    assert!(
        line["received_at"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z'))
    );
}

#[tokio::test]
async fn ten_thousand_readings_in_are_ten_thousand_lines_out() {
    let mut sink = SinkProcess::start(&basic_pipeline("max_events = 100"));
    let mut client = sink.client("sensors").await;
    for call in 0..100 {
        client
            .send_sensor_values(request_range("r", call * 100..call * 100 + 100))
            .await
            .expect("send");
    }
    sink.stop();
    let mut names = sensor_names(&sink.path("out.json"));
    assert_eq!(names.len(), 10_000);
    names.sort();
    names.dedup();
    assert_eq!(names.len(), 10_000, "a reading was written twice");
}

#[tokio::test]
async fn fan_out_writes_every_reading_to_every_sink() {
    let pipeline = [
        grpc("sensors", ""),
        buffered("batch", &["sensors"], "max_events = 50"),
        json_file("first", &["batch"], "first.json", ""),
        json_file("second", &["batch"], "second.json", ""),
        stdout_sink("console", &["batch"], ""),
    ]
    .concat();
    let mut sink = SinkProcess::start(&pipeline);
    let mut client = sink.client("sensors").await;
    let sent = send_all(&mut client, "f", 20, 25).await;
    sink.stop();
    assert_each_once(&sensor_names(&sink.path("first.json")), &sent);
    assert_each_once(&sensor_names(&sink.path("second.json")), &sent);
    assert_each_once(&names_in(&sink.stdout_lines()), &sent);
}

#[tokio::test]
async fn fan_in_merges_two_sources_into_one_file() {
    let pipeline = [
        grpc("north", ""),
        grpc("south", ""),
        buffered("batch", &["north", "south"], "max_events = 7"),
        json_file("file", &["batch"], "out.json", ""),
    ]
    .concat();
    let mut sink = SinkProcess::start(&pipeline);
    let mut north = sink.client("north").await;
    let mut south = sink.client("south").await;
    let (mut sent, from_south) = tokio::join!(
        send_all(&mut north, "n", 10, 10),
        send_all(&mut south, "s", 10, 10)
    );
    sent.extend(from_south);
    sink.stop();
    assert_each_once(&sensor_names(&sink.path("out.json")), &sent);
}

#[tokio::test]
async fn a_reading_without_value_or_timestamp_is_written_with_nulls() {
    let mut sink = SinkProcess::start(&basic_pipeline("max_events = 1"));
    let mut client = sink.client("sensors").await;
    let mut empty = request("e", 1);
    empty.items[0].measurement = None;
    let mut zero = request("z", 1);
    if let Some(measurement) = zero.items[0].measurement.as_mut() {
        measurement.sensor_value = Some(0);
        measurement.created_at = None;
    }
    client.send_sensor_values(empty).await.expect("send");
    client.send_sensor_values(zero).await.expect("send");
    sink.stop();
    let lines = json_lines(&sink.path("out.json"));
    assert_eq!(lines.len(), 2);
    assert!(lines[0]["sensor_value"].is_null(), "{}", lines[0]);
    assert!(lines[0]["created_at"].is_null(), "{}", lines[0]);
    assert_eq!(lines[1]["sensor_value"], 0, "0 is a value, not null");
    assert!(lines[1]["created_at"].is_null(), "{}", lines[1]);
}

#[tokio::test]
async fn awkward_names_and_extreme_values_stay_one_valid_line_each() {
    let mut sink = SinkProcess::start(&basic_pipeline("max_events = 1"));
    let mut client = sink.client("sensors").await;
    let names = [
        "quote\"d",
        "new\nline",
        "back\\slash",
        "tab\there",
        "ünï😀",
        "",
    ];
    let values = [i64::MIN, i64::MAX, -1, 0, 1, 42];
    let mut sent = request("x", names.len());
    for ((item, name), value) in sent.items.iter_mut().zip(names).zip(values) {
        item.sensor_name = name.to_string();
        if let Some(measurement) = item.measurement.as_mut() {
            measurement.sensor_value = Some(value);
        }
    }
    client.send_sensor_values(sent).await.expect("send");
    sink.stop();
    let lines = json_lines(&sink.path("out.json"));
    assert_eq!(lines.len(), names.len(), "a name broke a line");
    for ((line, name), value) in lines.iter().zip(names).zip(values) {
        assert_eq!(line["sensor_name"], name);
        assert_eq!(line["sensor_value"].as_i64(), Some(value), "{line}");
    }
}

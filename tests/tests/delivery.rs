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

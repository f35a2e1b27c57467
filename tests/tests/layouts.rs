//! The JSON lines of both layouts, in a file and on standard output.

use sink_e2e::*;

/// The keys of a JSON object line in the order the text has them.
fn key_order(line: &str) -> Vec<String> {
    let value: serde_json::Value = serde_json::from_str(line).expect("JSON line");
    let mut keys: Vec<(usize, String)> = value
        .as_object()
        .expect("an object")
        .keys()
        .map(|key| {
            let at = line
                .find(&format!("\"{key}\":"))
                .unwrap_or_else(|| panic!("{key} not at the top of {line}"));
            (at, key.clone())
        })
        .collect();
    keys.sort();
    keys.into_iter().map(|(_, key)| key).collect()
}

#[tokio::test]
async fn value_layout_writes_one_object_per_reading_in_the_documented_order() {
    let mut sink = SinkProcess::start(&basic_pipeline("max_events = 3"));
    let mut client = sink.client("sensors").await;
    let sent = send_all(&mut client, "v", 1, 3).await;
    sink.stop();
    let text = std::fs::read_to_string(sink.path("out.json")).expect("read");
    assert!(text.ends_with('\n') && !text.contains("\n\n"), "{text:?}");
    for line in text.lines() {
        assert_eq!(
            key_order(line),
            ["sensor_name", "sensor_value", "created_at", "received_at"],
            "{line}"
        );
    }
    assert_each_once(&sensor_names(&sink.path("out.json")), &sent);
}

#[tokio::test]
async fn batch_layout_writes_the_original_line_per_batch() {
    let pipeline = [
        grpc("sensors", ""),
        buffered("batch", &["sensors"], "max_events = 4"),
        json_file("file", &["batch"], "out.json", "layout = \"batch\""),
    ]
    .concat();
    let mut sink = SinkProcess::start(&pipeline);
    let mut client = sink.client("sensors").await;
    let sent = send_all(&mut client, "b", 2, 4).await;
    sink.stop();
    let text = std::fs::read_to_string(sink.path("out.json")).expect("read");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "one line per batch of four:\n{text}");
    let mut written = Vec::new();
    for line in lines {
        assert!(
            line.starts_with(r#"{"level":"info","ts":""#),
            "not the original's line: {line}"
        );
        assert_eq!(
            key_order(line),
            ["level", "ts", "msg", "timestamp", "messageCount", "values"],
            "{line}"
        );
        let value: serde_json::Value = serde_json::from_str(line).expect("JSON");
        assert_eq!(value["msg"], "sensor values batch received");
        let ts = value["ts"].as_str().expect("ts");
        let at = humantime::parse_rfc3339(ts).unwrap_or_else(|e| panic!("ts {ts}: {e}"));
        let seconds = at
            .duration_since(std::time::UNIX_EPOCH)
            .expect("after 1970")
            .as_secs();
        assert_eq!(
            value["timestamp"], seconds,
            "timestamp is ts in Unix seconds"
        );
        let values = value["values"].as_array().expect("values");
        assert_eq!(value["messageCount"], values.len());
        assert_eq!(values.len(), 4);
        for reading in values {
            assert_eq!(reading["created_at"], "2026-11-28T10:00:00Z");
            assert!(reading["sensor_value"].is_i64());
            assert!(reading["received_at"].is_string());
            written.push(reading["sensor_name"].as_str().expect("name").to_string());
        }
    }
    assert_each_once(&written, &sent);
}

#[tokio::test]
async fn stdout_carries_only_data_and_logs_go_to_stderr() {
    let pipeline = [
        grpc("sensors", ""),
        buffered("batch", &["sensors"], "max_events = 1"),
        stdout_sink("console", &["batch"], ""),
    ]
    .concat();
    let mut sink = SinkProcess::start(&pipeline);
    let mut client = sink.client("sensors").await;
    let sent = send_all(&mut client, "o", 3, 2).await;
    sink.stop();
    // Every stdout line is a reading (names_in panics on anything else).
    assert_each_once(&names_in(&sink.stdout_lines()), &sent);
    assert!(
        sink.count_log("pipeline running") == 1,
        "{}",
        sink.log_text()
    );
    assert!(
        sink.log_lines()
            .iter()
            .all(|line| !line.contains("\"sensor_name\"")),
        "data on stderr"
    );
}

#[tokio::test]
async fn stdout_batch_layout_writes_one_line_per_batch() {
    let pipeline = [
        grpc("sensors", ""),
        buffered("batch", &["sensors"], "max_events = 5"),
        stdout_sink("console", &["batch"], "layout = \"batch\""),
    ]
    .concat();
    let mut sink = SinkProcess::start(&pipeline);
    let mut client = sink.client("sensors").await;
    send_all(&mut client, "o", 3, 5).await;
    sink.stop();
    let lines = sink.stdout_lines();
    assert_eq!(lines.len(), 3, "{lines:?}");
    for line in &lines {
        let value: serde_json::Value = serde_json::from_str(line).expect("JSON");
        assert_eq!(value["messageCount"], 5, "{line}");
    }
}

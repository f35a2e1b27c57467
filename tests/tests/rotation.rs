//! Log rotation: json_file follows a file renamed or deleted under it (as
//! logrotate's default `create` mode does) and keeps every reading.

use sink_e2e::*;

#[tokio::test]
async fn a_renamed_or_deleted_file_is_followed_with_nothing_lost() {
    let mut sink = SinkProcess::start(&basic_pipeline("max_events = 1"));
    let mut client = sink.client("sensors").await;
    let out = sink.path("out.json");

    client
        .send_sensor_values(request_range("r", 0..10))
        .await
        .expect("send");
    assert!(wait_for_lines(&out, 10));
    std::fs::rename(&out, sink.path("out.json.1")).expect("rotate by rename");

    client
        .send_sensor_values(request_range("r", 10..20))
        .await
        .expect("send");
    assert!(wait_for_lines(&out, 10), "no new file after the rename");
    assert!(sink.wait_log("was moved or deleted"));
    std::fs::remove_file(&out).expect("rotate by delete");

    client
        .send_sensor_values(request_range("r", 20..25))
        .await
        .expect("send");
    assert!(wait_for_lines(&out, 5), "no new file after the delete");
    sink.stop();

    let rotated = sensor_names(&sink.path("out.json.1"));
    let current = sensor_names(&out);
    assert_eq!(rotated.len(), 10);
    assert_eq!(
        current,
        (20..25).map(|i| format!("r{i}")).collect::<Vec<_>>()
    );
}

//! Wire compatibility with the original's own client: its Go sensor node
//! (grpc-go) sends to the real sink, whose HTTP/2 server is the project's
//! own, and every reading it sent is written as the original would.
//!
//! Needs the node's binary in `$ORIGINAL_NODE`; `.ci/system/45-original-node.sh`
//! finds it (../shared/peers/original/telemetry-node) and runs this test.

use std::process::{Command, Stdio};

use sink_e2e::*;

#[test]
#[ignore = "needs the original's telemetry-node ($ORIGINAL_NODE): .ci/system/45-original-node.sh"]
fn the_original_go_node_is_served_and_its_readings_written() {
    let node = std::env::var("ORIGINAL_NODE").expect("ORIGINAL_NODE names the node's binary");
    let mut sink = SinkProcess::start(
        &[
            grpc("sensors", ""),
            json_file("file", &["sensors"], "out.json", ""),
        ]
        .concat(),
    );
    let out = sink.path("out.json");
    let log = sink.path("node.log");
    let mut running = Command::new(&node)
        .env("GRPC_SERVER_SOCKET", sink.address("sensors").to_string())
        .env("LOGGER_MIN_LOG_LEVEL", "debug")
        .stdout(std::fs::File::create(&log).expect("node log"))
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|err| panic!("cannot run {node}: {err}"));
    // The node sends one reading a second on one connection, call after call.
    let written = wait_until(|| json_lines(&out).len() >= 3);
    // SIGINT: the node shuts down as it does for an operator.
    unsafe { libc::kill(running.id() as i32, libc::SIGINT) };
    let _ = running.wait();
    sink.stop();
    let node_log = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        written,
        "fewer than 3 readings written; node log:\n{node_log}\nsink log:\n{}",
        sink.log_text()
    );
    // Every call before the shutdown succeeded (the node logs failures only).
    let before_shutdown = node_log.split("received signal").next().unwrap_or_default();
    assert!(
        !before_shutdown.contains("failed"),
        "the node saw a failed call:\n{node_log}"
    );
    for line in json_lines(&out) {
        assert_eq!(line["sensor_name"], "default-sensor-name", "{line}");
        assert!(line["sensor_value"].is_i64(), "{line}");
        for field in ["created_at", "received_at"] {
            assert!(
                line[field].as_str().is_some_and(|t| t.ends_with('Z')),
                "{field}: {line}"
            );
        }
    }
    let warnings: Vec<String> = sink
        .log_lines()
        .into_iter()
        .filter(|line| line.contains("WARN") || line.contains("ERROR"))
        .collect();
    assert!(warnings.is_empty(), "{warnings:?}");
}

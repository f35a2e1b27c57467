//! The `stdout` sink alone. It writes to the process's real standard output,
//! so each test runs this test binary again as a child (`child_writes` below)
//! and reads the child's standard output.

use std::process::Command;

use sink_api::json::Layout;
use sink_api::testkit::{Harness, readings};
use sink_stages::sinks::stdout::StdoutConfig;

/// Set in the child: the layout it writes.
const CHILD_LAYOUT: &str = "SINK_STDOUT_TEST_LAYOUT";

/// The child's part: writes batches of 2 and 3 readings in the layout named by
/// the environment. Does nothing in a normal test run.
#[tokio::test]
async fn child_writes() {
    let layout = match std::env::var(CHILD_LAYOUT).as_deref() {
        Ok("value") => Layout::Value,
        Ok("batch") => Layout::Batch,
        _ => return,
    };
    let stage = Harness::sink(StdoutConfig { layout }).expect("builds");
    stage.send(readings("s", 0..2)).await;
    stage.send(Vec::new()).await;
    stage.send(readings("s", 2..5)).await;
    stage.finish().await.expect("ends");
}

/// The JSON lines the child wrote in `layout`. The test harness's own lines
/// are left out; its `test child_writes ... ` has no newline, so the first
/// JSON line follows it on the same line.
fn child_output(layout: &str) -> Vec<serde_json::Value> {
    let output = Command::new(std::env::current_exe().expect("test binary"))
        .args(["--exact", "child_writes", "--test-threads=1", "--nocapture"])
        .env(CHILD_LAYOUT, layout)
        .output()
        .expect("run the child");
    assert!(output.status.success(), "{output:?}");
    String::from_utf8(output.stdout)
        .expect("UTF-8")
        .lines()
        .filter_map(|line| line.find('{').map(|start| &line[start..]))
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{line:?}: {e}")))
        .collect()
}

#[test]
fn value_layout_writes_one_line_per_reading() {
    let lines = child_output("value");
    let names: Vec<&str> = lines
        .iter()
        .map(|line| line["sensor_name"].as_str().expect("name"))
        .collect();
    assert_eq!(names, ["s0", "s1", "s2", "s3", "s4"]);
    assert!(lines.iter().all(|line| line["received_at"].is_string()));
}

#[test]
fn batch_layout_writes_one_line_per_non_empty_batch() {
    let lines = child_output("batch");
    let counts: Vec<u64> = lines
        .iter()
        .map(|line| line["messageCount"].as_u64().expect("messageCount"))
        .collect();
    assert_eq!(counts, [2, 3], "{lines:?}");
    assert!(
        lines
            .iter()
            .all(|line| line["msg"] == "sensor values batch received")
    );
}

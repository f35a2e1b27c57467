//! Wire compatibility with a client that is not Rust: the Python client in
//! examples/python-client (grpcio, stubs compiled from proto/ at run time)
//! sends readings with a 0 value, no value and no timestamp, and every one is
//! written exactly as DESIGN.md says.
//!
//! Needs `pip install grpcio grpcio-tools`. Without them the test says so and
//! passes, unless SINK_REQUIRE_PYTHON_CLIENT is set (CI sets it).

use std::process::Command;

use sink_e2e::*;

fn python_has_grpc() -> bool {
    Command::new("python3")
        .args(["-c", "import grpc, grpc_tools"])
        .status()
        .is_ok_and(|status| status.success())
}

#[test]
fn a_python_grpcio_client_is_understood() {
    if !python_has_grpc() {
        assert!(
            std::env::var_os("SINK_REQUIRE_PYTHON_CLIENT").is_none(),
            "python3 with grpcio and grpcio-tools is required here"
        );
        eprintln!("skipped: `pip install grpcio grpcio-tools` to run the Python client test");
        return;
    }
    let mut sink = SinkProcess::start(&basic_pipeline("max_events = 5"));
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/python-client/send_readings.py"
    );
    let address = sink.address("sensors").to_string();
    let out = Command::new("python3")
        .args([
            script,
            "--address",
            &address,
            "--count",
            "25",
            "--per-call",
            "5",
        ])
        .output()
        .expect("run the Python client");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    sink.stop();

    let lines = json_lines(&sink.path("out.json"));
    assert_eq!(lines.len(), 25);
    let by_name = |name: &str| {
        lines
            .iter()
            .find(|line| line["sensor_name"] == name)
            .unwrap_or_else(|| panic!("{name} missing"))
    };
    assert_eq!(by_name("py-0")["sensor_value"], 0);
    assert_eq!(by_name("py-0")["created_at"], "2026-11-28T10:00:00Z");
    assert!(
        by_name("py-1")["sensor_value"].is_null(),
        "no value must stay null, not 0"
    );
    assert!(by_name("py-2")["created_at"].is_null());
    assert_eq!(by_name("py-24")["sensor_value"], 24);
}

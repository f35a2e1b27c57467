//! Wire compatibility with a client that is not Rust: the Python client in
//! examples/python-client (grpcio, stubs compiled from proto/ at run time)
//! sends readings with a 0 value, no value and no timestamp, and every one is
//! written exactly as DESIGN.md says.
//!
//! The same client over TLS and mutual TLS (`grpc.ssl_channel_credentials`),
//! with certificates made in the test.
//!
//! Needs `pip install grpcio grpcio-tools`. Without them the test says so and
//! passes, unless SINK_REQUIRE_PYTHON_CLIENT is set (CI sets it).

use std::process::Command;

use sink_e2e::tls::TestCa;
use sink_e2e::*;

fn python_has_grpc() -> bool {
    Command::new("python3")
        .args(["-c", "import grpc, grpc_tools"])
        .status()
        .is_ok_and(|status| status.success())
}

/// Whether the test can run; fails where it must (CI), skips elsewhere.
fn python_ready() -> bool {
    if python_has_grpc() {
        return true;
    }
    assert!(
        std::env::var_os("SINK_REQUIRE_PYTHON_CLIENT").is_none(),
        "python3 with grpcio and grpcio-tools is required here"
    );
    eprintln!("skipped: `pip install grpcio grpcio-tools` to run the Python client test");
    false
}

/// Runs the Python client against `sink` with `extra` options; it must succeed.
fn run_client(sink: &SinkProcess, extra: &[&str]) {
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
        .args(extra)
        .output()
        .expect("run the Python client");
    assert!(
        out.status.success(),
        "{}\nsink log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        sink.log_text()
    );
}

#[test]
fn a_python_grpcio_client_is_understood() {
    if !python_ready() {
        return;
    }
    let mut sink = SinkProcess::start(&basic_pipeline("max_events = 5"));
    run_client(&sink, &[]);
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
    assert!(by_name("py-24").get("labels").is_none());
}

#[test]
fn a_python_grpcio_client_sends_floats_and_labels() {
    if !python_ready() {
        return;
    }
    let mut sink = SinkProcess::start(&basic_pipeline("max_events = 5"));
    run_client(&sink, &["--float", "--labels", "unit=C,site=north"]);
    sink.stop();
    let text = std::fs::read_to_string(sink.path("out.json")).expect("written");
    let line = text
        .lines()
        .find(|line| line.contains(r#""py-3""#))
        .expect("py-3 written");
    assert!(
        line.starts_with(
            r#"{"sensor_name":"py-3","labels":{"site":"north","unit":"C"},"sensor_value":3.5,"#
        ),
        "{line}"
    );
    assert_eq!(text.lines().count(), 25);
}

#[test]
fn a_python_grpcio_client_sends_over_tls_and_mutual_tls() {
    if !python_ready() {
        return;
    }
    let certs = tempfile::tempdir().expect("temp dir");
    let ca = TestCa::new("test CA");
    let (cert, key) = ca.server(1, 365.0).write(certs.path(), "server");
    let ca_file = ca.write(certs.path(), "ca.crt");
    let (client_cert, client_key) = ca.client("python").write(certs.path(), "client");
    let path = |p: &std::path::Path| p.display().to_string();
    let (ca_file, client_cert, client_key) =
        (path(&ca_file), path(&client_cert), path(&client_key));
    let tls = format!("cert = \"{}\", key = \"{}\"", path(&cert), path(&key));
    let mtls = format!("{tls}, client_ca = \"{ca_file}\"");
    let trusting = ["--tls-ca", ca_file.as_str()];
    let certified = [
        "--tls-ca",
        &ca_file,
        "--tls-cert",
        &client_cert,
        "--tls-key",
        &client_key,
        "--tls-server-name",
        "localhost",
    ];
    for (table, client) in [(tls, &trusting[..]), (mtls, &certified[..])] {
        let pipeline = [
            grpc("sensors", &format!("tls = {{ {table} }}\n")),
            buffered("batch", &["sensors"], "max_events = 5"),
            json_file("file", &["batch"], "out.json", ""),
        ]
        .concat();
        let mut sink = SinkProcess::start(&pipeline);
        run_client(&sink, client);
        sink.stop();
        assert_eq!(json_lines(&sink.path("out.json")).len(), 25, "{table}");
    }
}

//! `sink-load` against the real `sink` binary on an ephemeral port: what it
//! reports acknowledged is exactly what the sink wrote.

use std::process::{Command, Output};

use sink_e2e::{SinkProcess, basic_pipeline, json_lines, wait_for_lines};

/// Runs `sink-load` with `args` and returns its exit status and JSON report.
fn sink_load(args: &[&str]) -> (Output, serde_json::Value) {
    let out = Command::new(env!("CARGO_BIN_EXE_sink-load"))
        .args(args)
        .arg("--json")
        .output()
        .expect("run sink-load");
    let report = serde_json::from_slice(&out.stdout).unwrap_or_else(|err| {
        panic!(
            "no JSON report ({err}); stdout {:?}, stderr {:?}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out, report)
}

#[test]
fn acknowledged_readings_are_the_lines_written() {
    let mut sink = SinkProcess::start(&basic_pipeline("max_events = 10"));
    let address = sink.address("sensors").to_string();
    let (out, report) = sink_load(&[
        "--address",
        &address,
        "--count",
        "2345",
        "--readings-per-call",
        "100",
        "--concurrency",
        "4",
        "--connections",
        "2",
    ]);
    assert!(out.status.success(), "{report}");
    assert_eq!(report["readings_acknowledged"], 2345);
    // 23 full calls and one of 45.
    assert_eq!(report["calls_ok"], 24);
    assert_eq!(report["errors"], serde_json::json!({}));

    assert!(wait_for_lines(&sink.path("out.json"), 2345));
    sink.stop();
    let lines = json_lines(&sink.path("out.json"));
    assert_eq!(lines.len(), 2345);
    assert!(
        lines.iter().all(|line| line["sensor_name"]
            .as_str()
            .is_some_and(|n| n.starts_with("sensor-"))),
        "a line that sink-load did not send"
    );
}

#[test]
fn rate_limited_calls_are_retried_as_retry_info_says() {
    // 10 readings of ~35 bytes each per call against 20 kB/s, with a burst
    // of about two calls: the 8 calls sent at once cannot all pass, however
    // slowly the machine runs, and the rest wait for RetryInfo's delay.
    let pipeline = basic_pipeline("max_events = 10").replacen(
        "address = \"127.0.0.1:0\"",
        "address = \"127.0.0.1:0\"\nrate_limit = { bytes_per_second = 20000, burst_bytes = 1000 }",
        1,
    );
    let mut sink = SinkProcess::start(&pipeline);
    let address = sink.address("sensors").to_string();
    let (out, report) = sink_load(&[
        "--address",
        &address,
        "--count",
        "1000",
        "--concurrency",
        "8",
        "--max-retries",
        "100",
    ]);
    assert!(out.status.success(), "{report}");
    assert_eq!(report["readings_acknowledged"], 1000);
    assert_eq!(report["calls_failed"], 0);
    assert!(report["retries"].as_u64().unwrap_or(0) > 0, "{report}");
    assert!(
        report["errors"]["RESOURCE_EXHAUSTED"].as_u64().unwrap_or(0) > 0,
        "{report}"
    );
    assert!(wait_for_lines(&sink.path("out.json"), 1000));
    sink.stop();
    assert_eq!(json_lines(&sink.path("out.json")).len(), 1000);
}

#[test]
fn no_sink_listening_is_a_clear_error() {
    // A port that was free a moment ago.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("free port")
        .port();
    let out = Command::new(env!("CARGO_BIN_EXE_sink-load"))
        .args(["--address", &format!("127.0.0.1:{port}"), "--count", "10"])
        .output()
        .expect("run sink-load");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot connect"), "{stderr}");
}

#[test]
fn rate_paces_calls_and_a_blackhole_counts_what_was_acknowledged() {
    let mut sink = SinkProcess::start(
        r#"
[sources.sensors]
type = "grpc"
address = "127.0.0.1:0"

[sinks.drop]
type = "blackhole"
inputs = ["sensors"]
"#,
    );
    let address = sink.address("sensors").to_string();
    // 10 calls at 50 calls/s: the last is due 180 ms after the first.
    let (out, report) = sink_load(&[
        "--address",
        &address,
        "--count",
        "100",
        "--rate",
        "50",
        "--concurrency",
        "4",
    ]);
    assert!(out.status.success(), "{report}");
    assert_eq!(report["calls_ok"], 10);
    assert!(
        report["elapsed_s"].as_f64().unwrap_or(0.0) >= 0.18,
        "{report}"
    );
    sink.stop();
    assert!(
        sink.wait_log("blackhole dropped 100 readings in 10 batches"),
        "{}",
        sink.log_text()
    );
}

#[test]
fn a_lost_connection_stops_the_run_with_a_clear_error_instead_of_spinning() {
    let sink = SinkProcess::start(&basic_pipeline("max_events = 10"));
    let address = sink.address("sensors").to_string();
    let load = Command::new(env!("CARGO_BIN_EXE_sink-load"))
        .args([
            "--address",
            &address,
            "--duration",
            "60s",
            "--max-retries",
            "0",
        ])
        .args(["--concurrency", "4", "--json", "--quiet"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start sink-load");
    assert!(wait_for_lines(&sink.path("out.json"), 10), "no progress");
    // The sink dies (SIGKILL): every call on the connection fails at once.
    let started = std::time::Instant::now();
    drop(sink);
    let out = load.wait_with_output().expect("sink-load ends");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "sink-load ran on for {:?} after the sink died",
        started.elapsed()
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("was lost"), "{stderr}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("a report");
    // The calls in flight when it died, not millions.
    let failed = report["calls_failed"].as_u64().expect("calls_failed");
    assert!((1..=4).contains(&failed), "{report}");
}

#[test]
fn sends_over_mutual_tls_with_the_tls_options() {
    use sink_e2e::tls::TestCa;
    let certs = tempfile::tempdir().expect("temp dir");
    let ca = TestCa::new("test CA");
    let (cert, key) = ca.server(1, 365.0).write(certs.path(), "server");
    let ca_file = ca.write(certs.path(), "ca.crt");
    let (client_cert, client_key) = ca.client("sink-load").write(certs.path(), "client");
    let pipeline = basic_pipeline("max_events = 10").replace(
        "address = \"127.0.0.1:0\"",
        &format!(
            "address = \"127.0.0.1:0\"\ntls = {{ cert = \"{}\", key = \"{}\", client_ca = \"{}\" }}",
            cert.display(),
            key.display(),
            ca_file.display()
        ),
    );
    let mut sink = SinkProcess::start(&pipeline);
    let address = sink.address("sensors").to_string();
    let path = |p: &std::path::Path| p.display().to_string();
    let (out, report) = sink_load(&[
        "--address",
        &address,
        "--count",
        "500",
        "--readings-per-call",
        "100",
        "--connections",
        "2",
        "--tls-ca",
        &path(&ca_file),
        "--tls-cert",
        &path(&client_cert),
        "--tls-key",
        &path(&client_key),
        "--tls-server-name",
        "localhost",
    ]);
    assert!(out.status.success(), "{report}");
    assert_eq!(report["readings_acknowledged"], 500);
    sink.stop();
    assert_eq!(json_lines(&sink.path("out.json")).len(), 500);

    // Without the client certificate, the sink refuses every call.
    let mut sink = SinkProcess::start(&pipeline);
    let address = sink.address("sensors").to_string();
    let out = Command::new(env!("CARGO_BIN_EXE_sink-load"))
        .args(["--address", &address, "--count", "10", "--max-retries", "0"])
        .args(["--tls-ca", &path(&ca_file), "--quiet"])
        .output()
        .expect("run sink-load");
    assert!(!out.status.success());
    sink.stop();
    assert!(!sink.path("out.json").exists() || json_lines(&sink.path("out.json")).is_empty());
}

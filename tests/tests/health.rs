//! `sink health`: the real binary asks a real running sink over
//! grpc.health.v1, and exits 0 only when it is answered SERVING. It is the
//! container image's HEALTHCHECK, so it must also fail, quickly and with a
//! reason, when nothing listens or a server never answers.

use std::net::TcpListener;
use std::process::Command;
use std::time::{Duration, Instant};

use sink_e2e::*;

/// A pipeline whose grpc source listens on `address`.
fn pipeline_on(address: &str) -> String {
    grpc("sensors", "").replace("127.0.0.1:0", address)
        + &json_file("file", &["sensors"], "out.json", "")
}

/// A running sink on an ephemeral loopback port, and that port.
fn running_sink() -> (SinkProcess, u16) {
    let sink = SinkProcess::start(&pipeline_on("127.0.0.1:0"));
    let port = sink.address("sensors").port();
    (sink, port)
}

#[test]
fn without_an_address_it_asks_the_pipelines_grpc_sources_on_loopback() {
    let (mut sink, port) = running_sink();
    // The file a container would have: a wildcard listen address, asked on
    // loopback. `health` only reads the file; it never listens.
    for listen in [format!("0.0.0.0:{port}"), format!(":{port}")] {
        let done = run_sink(&pipeline_on(&listen), &["health"], &[]);
        assert!(done.status.success(), "{listen}: {}", done.stderr);
        assert_eq!(done.stdout.trim(), format!("127.0.0.1:{port}: SERVING"));
    }
    sink.stop();
}

#[test]
fn an_address_and_a_service_can_be_named() {
    let (mut sink, port) = running_sink();
    let address = format!("127.0.0.1:{port}");
    let done = run_sink(
        "",
        &[
            "health",
            "--address",
            &address,
            "--service",
            "sensor.v1.SensorService",
        ],
        &[],
    );
    assert!(done.status.success(), "{}", done.stderr);

    let done = run_sink(
        "",
        &[
            "health",
            "--address",
            &address,
            "--service",
            "no.such.Service",
        ],
        &[],
    );
    assert_eq!(done.status.code(), Some(1), "{}", done.stdout);
    assert!(done.stderr.contains("NOT_FOUND"), "{}", done.stderr);
    sink.stop();
}

#[test]
fn sink_pipeline_in_the_environment_names_the_file() {
    let (mut sink, port) = running_sink();
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("from-env.toml");
    std::fs::write(&file, pipeline_on(&format!("0.0.0.0:{port}"))).expect("write");
    for command in ["health", "validate"] {
        let output = Command::new(sink_binary())
            .arg(command)
            .env("SINK_PIPELINE", &file)
            .current_dir(dir.path())
            .output()
            .expect("run sink");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "{command}: {stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            stdout.contains(&format!("127.0.0.1:{port}: SERVING"))
                || stdout.contains("from-env.toml: valid"),
            "{command}: {stdout}"
        );
    }
    sink.stop();
}

#[test]
fn nothing_listening_is_unhealthy() {
    let port = {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("address").port()
    };
    let done = run_sink(
        "",
        &["health", "--address", &format!("127.0.0.1:{port}")],
        &[],
    );
    assert_eq!(done.status.code(), Some(1), "{}", done.stdout);
    assert!(
        done.stderr.contains("not reachable: connection refused"),
        "{}",
        done.stderr
    );
}

#[test]
fn a_server_that_never_answers_is_unhealthy_within_the_timeout() {
    // The kernel completes the handshake into the backlog; nobody ever reads.
    let silent = TcpListener::bind("127.0.0.1:0").expect("bind");
    let address = silent.local_addr().expect("address").to_string();
    let start = Instant::now();
    let done = run_sink(
        "",
        &["health", "--address", &address, "--timeout", "300ms"],
        &[],
    );
    assert_eq!(done.status.code(), Some(1), "{}", done.stdout);
    assert!(
        done.stderr.contains("no answer within 300ms"),
        "{}",
        done.stderr
    );
    assert!(start.elapsed() < Duration::from_secs(10));
    drop(silent);
}

#[test]
fn a_pipeline_with_mistakes_is_unhealthy_and_says_why() {
    let text = pipeline_on("127.0.0.1:0").replace("\"json_file\"", "\"json_fil\"");
    let done = run_sink(&text, &["health"], &[]);
    assert_eq!(done.status.code(), Some(1), "{}", done.stdout);
    assert!(done.stderr.contains("json_fil"), "{}", done.stderr);
}

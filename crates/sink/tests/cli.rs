//! The `sink` binary's informational commands. (Having an integration test
//! here also makes `cargo test` build the binary that tests/ runs.)

use std::process::Command;

fn sink(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_sink"))
        .args(args)
        .output()
        .expect("run sink");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn version_and_help() {
    let (ok, out, _) = sink(&["--version"]);
    assert!(ok && out.starts_with("sink "), "{out}");
    let (ok, out, _) = sink(&["--help"]);
    assert!(
        ok && out.contains("--pipeline") && out.contains("validate"),
        "{out}"
    );
}

#[test]
fn list_shows_every_built_in_type_with_its_kind_and_crate() {
    let (ok, out, _) = sink(&["list"]);
    assert!(ok);
    for (kind, name) in [
        ("source", "grpc"),
        ("processor", "buffered"),
        ("sink", "json_file"),
        ("sink", "stdout"),
    ] {
        assert!(
            out.lines()
                .any(|l| l.starts_with(kind) && l.contains(name) && l.contains("sink-stages")),
            "{kind} {name} missing from:\n{out}"
        );
    }
}

#[test]
fn list_verbose_and_describe_show_keys_defaults_and_liveness() {
    let (ok, out, _) = sink(&["list", "--verbose"]);
    assert!(ok);
    let address = out
        .lines()
        .find(|l| l.trim_start().starts_with("address"))
        .expect("address key");
    assert!(address.contains("restart"), "{address}");
    let max_events = out
        .lines()
        .find(|l| l.trim_start().starts_with("max_events"))
        .expect("max_events");
    assert!(
        max_events.contains("10") && max_events.contains("live"),
        "{max_events}"
    );

    let (ok, out, _) = sink(&["describe", "buffered"]);
    assert!(ok);
    assert!(
        out.contains("[processors.my_buffered]") && out.contains("flush_interval = \"1m\""),
        "{out}"
    );
    let (ok, _, err) = sink(&["describe", "nope"]);
    assert!(!ok && err.contains("json_file"), "{err}");
}

#[test]
fn validate_accepts_the_built_in_default() {
    let (ok, out, _) = sink(&["validate"]);
    assert!(ok && out.contains("valid"), "{out}");
}

#[test]
fn validate_against_shows_live_changes_and_restarts() {
    let dir = tempfile::tempdir().expect("temp dir");
    let old = dir.path().join("old.toml");
    let live = dir.path().join("live.toml");
    let topology = dir.path().join("topology.toml");
    let base = sink_default();
    std::fs::write(&old, &base).expect("write");
    std::fs::write(&live, base.replace("${BUFFER_SIZE:-10}", "20")).expect("write");
    std::fs::write(&topology, base.replace("127.0.0.1:8000", "127.0.0.1:9000")).expect("write");
    let path = |p: &std::path::Path| p.to_str().expect("utf-8 path").to_string();

    let out = Command::new(env!("CARGO_BIN_EXE_sink"))
        .args([
            "validate",
            "--pipeline",
            &path(&live),
            "--against",
            &path(&old),
        ])
        .output()
        .expect("run");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("would change live: stage `batch`: max_events"),
        "{text}"
    );

    let out = Command::new(env!("CARGO_BIN_EXE_sink"))
        .args([
            "validate",
            "--pipeline",
            &path(&topology),
            "--against",
            &path(&old),
        ])
        .output()
        .expect("run");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(3), "{text}");
    assert!(
        text.contains("needs a restart: sources.sensors: key `address`"),
        "{text}"
    );
}

fn sink_default() -> String {
    std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../pipelines/default.toml"
    ))
    .expect("default pipeline")
}

#[test]
fn list_shows_nested_keys_and_durations() {
    let (ok, out, _) = sink(&["list", "--verbose"]);
    assert!(ok);
    let burst = out
        .lines()
        .find(|l| l.trim_start().starts_with("rate_limit.burst_bytes"))
        .expect("a nested key");
    assert!(
        burst.contains("integer") && burst.contains("live"),
        "{burst}"
    );
    let interval = out
        .lines()
        .find(|l| l.trim_start().starts_with("flush_interval"))
        .expect("flush_interval");
    assert!(interval.contains("duration"), "{interval}");
}

#[test]
fn a_reader_that_goes_away_ends_list_quietly() {
    use std::process::Stdio;

    let mut child = Command::new(env!("CARGO_BIN_EXE_sink"))
        .args(["list", "--verbose"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run sink");
    // Close the reading end before sink writes, as `sink list | head -0`
    // would: every write then fails with a broken pipe.
    drop(child.stdout.take());
    let out = child.wait_with_output().expect("wait");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(out.status.success(), "{:?}: {stderr}", out.status);
}

/// `sink validate --pipeline FILE` on `text`: (exit code, stdout, stderr).
fn validate(text: &str, env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("pipeline.toml");
    std::fs::write(&file, text).expect("write");
    let mut command = Command::new(env!("CARGO_BIN_EXE_sink"));
    command
        .args(["validate", "--pipeline"])
        .arg(&file)
        .env_remove("SINK_PIPELINE");
    for (key, value) in env {
        command.env(key, value);
    }
    let out = command.output().expect("run sink");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The error line of `stderr` about `stage`'s `key`.
fn error_about<'a>(stderr: &'a str, stage: &str, key: &str) -> &'a str {
    let needle = format!("stage `{stage}`: key `{key}`:");
    stderr
        .lines()
        .find(|line| line.contains(&needle))
        .unwrap_or_else(|| panic!("no error about {stage} {key} in:\n{stderr}"))
}

#[test]
fn validate_reports_every_mistake_of_every_stage() {
    let text = r#"
[sources.sensors]
type = "grpc"
address = "127.0.0.1:80000"
max_readings_per_call = "lots"
max_concurent_calls = 3
body_timeout = "10 parsecs"

[processors.batch]
type = "buffered"
inputs = ["sensors"]
max_events = "ten"
flush_interval = 5
extra = 1

[sinks.file]
type = "json_file"
inputs = ["batch"]
path = "out.json"
layout = "lines"
"#;
    let (code, _, stderr) = validate(text, &[]);
    assert_eq!(code, Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 8, "one line per mistake:\n{stderr}");
    assert!(
        error_about(&stderr, "sources.sensors", "address").contains("port 80000 is out of range")
    );
    assert!(
        error_about(&stderr, "sources.sensors", "max_readings_per_call")
            .contains("expected a whole number of readings")
    );
    assert!(
        error_about(&stderr, "sources.sensors", "max_concurent_calls")
            .contains("(did you mean `max_concurrent_calls`?)")
    );
    assert!(
        error_about(&stderr, "sources.sensors", "body_timeout").contains("expected a duration")
    );
    assert!(
        error_about(&stderr, "processors.batch", "max_events")
            .contains("expected a whole number of readings")
    );
    error_about(&stderr, "processors.batch", "flush_interval");
    error_about(&stderr, "processors.batch", "extra");
    error_about(&stderr, "sinks.file", "layout");
    assert!(!stderr.contains("usize"), "{stderr}");
}

#[test]
fn validate_checks_listen_addresses_without_binding() {
    let pipeline = |address: &str| {
        format!(
            "[sources.s]\ntype = \"grpc\"\naddress = \"{address}\"\n\n[sinks.o]\ntype = \"blackhole\"\ninputs = [\"s\"]\n"
        )
    };
    for (address, says) in [
        ("localhost", "has no port"),
        ("127.0.0.1:80000", "out of range"),
        ("127.0.0.1:http", "is not a number"),
        ("::1:8000", "needs brackets"),
        ("[::1:8000", "not an IPv6 address"),
        ("bad host:8000", "neither an IP address nor a host name"),
    ] {
        let (code, _, stderr) = validate(&pipeline(address), &[]);
        assert_eq!(code, Some(2), "{address}: {stderr}");
        assert!(
            error_about(&stderr, "sources.s", "address").contains(says),
            "{address}: {stderr}"
        );
    }
    // Taken or privileged ports are the machine's business, seen at start:
    // validate binds nothing, so even a port in use here passes.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("address").port();
    for address in [
        format!("127.0.0.1:{port}"),
        ":8000".into(),
        "[::1]:0".into(),
        "localhost:8000".into(),
        "0.0.0.0:65535".into(),
    ] {
        let (code, _, stderr) = validate(&pipeline(&address), &[]);
        assert_eq!(code, Some(0), "{address}: {stderr}");
    }
}

#[test]
fn a_long_list_of_known_keys_is_never_cut() {
    let text = "[sources.s]\ntype = \"grpc\"\naddress = \"127.0.0.1:0\"\nmax_conections = 1\n\n[sinks.o]\ntype = \"blackhole\"\ninputs = [\"s\"]\n";
    let (code, _, stderr) = validate(text, &[]);
    assert_eq!(code, Some(2));
    let line = error_about(&stderr, "sources.s", "max_conections");
    assert!(line.len() > 240, "a line longer than the cut: {line}");
    assert!(
        line.contains("`keepalive_timeout`, `acknowledge`, `tls`") && !line.contains("cut"),
        "{line}"
    );
}

#[test]
fn describe_shows_every_kind_of_a_name_and_suggests_near_names() {
    let (ok, out, _) = sink(&["describe", "nats"]);
    assert!(ok);
    assert!(
        out.contains("source `nats`") && out.contains("sink `nats`"),
        "{out}"
    );
    let (ok, out, _) = sink(&["describe", "nats", "--kind", "sink"]);
    assert!(ok && out.contains("sink `nats`") && !out.contains("source `nats`"));
    assert!(out.contains("subject"), "{out}");

    let (ok, _, err) = sink(&["describe", "bufferd"]);
    assert!(!ok && err.contains("(did you mean `buffered`?)"), "{err}");
    assert_eq!(err.matches("nats").count(), 1, "each name once: {err}");
    assert!(err.contains("nats (source, sink)"), "{err}");
}

#[test]
fn describe_shows_a_computed_default_in_words() {
    let (ok, out, _) = sink(&["describe", "grpc"]);
    assert!(ok);
    let line = out
        .lines()
        .find(|line| line.starts_with("max_connections"))
        .expect("max_connections");
    assert!(
        line.contains("default: the soft open-file limit") && !line.contains("(none)"),
        "{line}"
    );
    assert!(!out.contains("default (none)"), "{out}");
}

#[test]
fn list_verbose_columns_line_up() {
    let (ok, out, _) = sink(&["list", "--verbose"]);
    assert!(ok);
    // Every key line has its columns at the same places: a column starts
    // after a run of at least two spaces.
    let starts = |line: &str| -> Vec<usize> {
        let bytes = line.as_bytes();
        (6..bytes.len())
            .filter(|&at| bytes[at] != b' ' && bytes[at - 1] == b' ' && bytes[at - 2] == b' ')
            .collect()
    };
    let layouts: std::collections::BTreeSet<Vec<usize>> = out
        .lines()
        .filter(|line| line.starts_with("    "))
        .map(|line| starts(line).into_iter().take(3).collect())
        .collect();
    assert_eq!(layouts.len(), 1, "{layouts:?}\n{out}");
}

#[test]
fn an_original_variable_the_file_does_not_read_is_named() {
    let text = "[sources.s]\ntype = \"grpc\"\naddress = \"127.0.0.1:8000\"\n\n[sinks.o]\ntype = \"blackhole\"\ninputs = [\"s\"]\n";
    let (code, _, stderr) = validate(text, &[("GRPC_SERVER_SOCKET", "127.0.0.1:8800")]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stderr.contains("warning: the environment variable GRPC_SERVER_SOCKET is set, but")
            && stderr.contains("original-env.toml"),
        "{stderr}"
    );
    // The built-in default reads it, but not RATE_PER_SECOND.
    let out = Command::new(env!("CARGO_BIN_EXE_sink"))
        .arg("validate")
        .env_remove("SINK_PIPELINE")
        .env("GRPC_SERVER_SOCKET", "127.0.0.1:8800")
        .env("RATE_PER_SECOND", "1000")
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("GRPC_SERVER_SOCKET"), "{stderr}");
    assert!(stderr.contains("RATE_PER_SECOND is set, but"), "{stderr}");
}

#[test]
fn health_says_plainly_that_nothing_listens() {
    let free = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let address = free.local_addr().expect("address").to_string();
    drop(free);
    let (ok, _, err) = sink(&["health", "--address", &address, "--timeout", "2s"]);
    assert!(!ok);
    assert!(err.contains("connection refused"), "{err}");
    assert!(
        !err.contains("tcp connect error") && !err.contains("transport error"),
        "{err}"
    );
}

#[test]
fn a_required_key_with_a_wrong_value_is_reported_once() {
    let text = "[sources.s]\ntype = \"grpc\"\naddress = 8000\nbody_timeout = 3\n\n[sinks.o]\ntype = \"json_file\"\ninputs = [\"s\"]\npath = 5\n";
    let (code, _, stderr) = validate(text, &[]);
    assert_eq!(code, Some(2));
    assert_eq!(stderr.matches("key `address`").count(), 1, "{stderr}");
    assert!(!stderr.contains("required but missing"), "{stderr}");
    error_about(&stderr, "sources.s", "body_timeout");
    error_about(&stderr, "sinks.o", "path");
}

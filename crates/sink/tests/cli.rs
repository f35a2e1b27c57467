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
    std::fs::write(&live, base.replace("max_events = 10", "max_events = 20")).expect("write");
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

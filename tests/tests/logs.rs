//! JSON logs, for log shippers: `--log-format json` and `settings.log_format`
//! make every line on stderr one JSON object, the running sink included.

use sink_e2e::*;

/// Each stderr line as JSON; panics naming a line that is not an object
/// with a level and a message.
fn json_log(lines: &[String]) -> Vec<serde_json::Value> {
    lines
        .iter()
        .map(|line| {
            let value: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|err| panic!("not a JSON log line ({err}): {line}"));
            assert!(
                value["level"].is_string() && value["message"].is_string(),
                "no level or message: {line}"
            );
            assert!(value["timestamp"].is_string(), "no timestamp: {line}");
            value
        })
        .collect()
}

fn pipeline(settings: &str) -> String {
    format!(
        "[settings]\n{settings}\n\n{}\n{}",
        grpc("sensors", ""),
        json_file("file", &["sensors"], "out.json", "")
    )
}

#[tokio::test]
async fn json_logs_from_the_command_line_and_from_the_file() {
    for (settings, args) in [
        ("", &["--log-format", "json"][..]),
        ("log_format = \"json\"", &[][..]),
    ] {
        let mut sink = SinkProcess::start_with(&sink_binary(), &pipeline(settings), args, &[]);
        let mut address = None;
        assert!(
            wait_until(|| {
                address = sink.log_lines().iter().find_map(|line| {
                    let line: serde_json::Value = serde_json::from_str(line).ok()?;
                    let rest = line["message"]
                        .as_str()?
                        .strip_prefix("grpc source listening on ")?;
                    rest.split_whitespace()
                        .next()?
                        .parse::<std::net::SocketAddr>()
                        .ok()
                });
                address.is_some()
            }),
            "no listening line:\n{}",
            sink.log_text()
        );
        let address = address.expect("address");
        let mut client = connect(address).await;
        client
            .send_sensor_values(request("json", 3))
            .await
            .expect("send");
        sink.stop();
        let lines = json_log(&sink.log_lines());
        let messages: Vec<&str> = lines
            .iter()
            .filter_map(|line| line["message"].as_str())
            .collect();
        assert!(
            messages
                .iter()
                .any(|m| m.starts_with("grpc source listening on")),
            "{messages:?}"
        );
        assert!(
            messages.iter().any(|m| m.contains("shut down cleanly")),
            "{messages:?}"
        );
        // The stage a line is about is a field of its own.
        assert!(
            lines.iter().any(|line| line["stage"] == "sensors"),
            "{lines:?}"
        );
        assert_eq!(sensor_names(&sink.path("out.json")).len(), 3);
    }
}

#[test]
fn text_logs_stay_the_default_and_a_bad_format_is_refused() {
    let run = run_sink(&pipeline("log_format = \"xml\""), &["validate"], &[]);
    assert_eq!(run.status.code(), Some(2));
    assert!(
        run.stderr.contains("key `settings.log_format`") && run.stderr.contains("`json`"),
        "{}",
        run.stderr
    );
    let run = run_sink(&pipeline(""), &["validate", "--log-format", "xml"], &[]);
    assert_eq!(run.status.code(), Some(2), "{}", run.stderr);
}

#[test]
fn changing_the_log_format_needs_a_restart() {
    let dir = tempfile::tempdir().expect("temp dir");
    let old = dir.path().join("old.toml");
    let new = dir.path().join("new.toml");
    std::fs::write(&old, pipeline("")).expect("write");
    std::fs::write(&new, pipeline("log_format = \"json\"")).expect("write");
    let out = std::process::Command::new(sink_binary())
        .arg("validate")
        .arg("--pipeline")
        .arg(&new)
        .arg("--against")
        .arg(&old)
        .output()
        .expect("run");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(3), "{text}");
    assert!(text.contains("settings.log_format"), "{text}");
}

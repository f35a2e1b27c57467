//! The ready pipeline files in pipelines/: each validates, and the one that
//! reads the original's environment variables runs on them.

use std::process::Command;

use sink::env::ORIGINAL_VARS;
use sink_e2e::*;

#[test]
fn every_file_in_pipelines_validates() {
    let mut checked = Vec::new();
    for entry in std::fs::read_dir(pipelines_dir()).expect("pipelines/") {
        let path = entry.expect("entry").path();
        if path.extension().is_none_or(|ext| ext != "toml") {
            continue;
        }
        // A file for the example distribution names types only it links.
        let text = std::fs::read_to_string(&path).expect("read");
        let binary = if text.contains("-p sink-example-distribution") {
            binary("sink-custom")
        } else {
            sink_binary()
        };
        let mut command = Command::new(&binary);
        command.arg("validate").arg("--pipeline").arg(&path);
        for var in ORIGINAL_VARS {
            command.env_remove(var);
        }
        let output = command.output().expect("run validate");
        assert!(
            output.status.success(),
            "{} refused {}:\n{}",
            binary.display(),
            path.display(),
            String::from_utf8_lossy(&output.stderr)
        );
        checked.push(
            path.file_name()
                .expect("name")
                .to_string_lossy()
                .into_owned(),
        );
    }
    for expected in ["default.toml", "fanout.toml", "original-env.toml"] {
        assert!(checked.iter().any(|name| name == expected), "{checked:?}");
    }
}

#[test]
fn the_embedded_default_is_pipelines_default_toml() {
    // `sink validate` with no --pipeline checks the built-in default.
    let output = Command::new(sink_binary())
        .arg("validate")
        .output()
        .expect("run validate");
    assert!(output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stdout).contains("valid, 3 stages"),
        "{}",
        String::from_utf8_lossy(&output.stdout)
    );
}

#[tokio::test]
async fn original_env_runs_on_the_original_variables() {
    let text = std::fs::read_to_string(pipelines_dir().join("original-env.toml")).expect("read");
    let first = request_range("env", 0..3);
    let second = request_range("env", 3..6);
    // Room for the two small requests at once; a large one can never pass.
    let rate = (encoded_len(&first) + encoded_len(&second)).to_string();
    let mut sink = SinkProcess::start_env(
        &text,
        &[
            ("FILE_PATH", "var/log/sink"),
            ("BUFFER_SIZE", "3"),
            ("BUFFER_FLUSH_INTERVAL", "1h"),
            ("RATE_PER_SECOND", &rate),
            ("GRPC_SERVER_SOCKET", "127.0.0.1:0"),
            // zap's spelling, as an old .env file may have it.
            ("LOGGER_MIN_LOG_LEVEL", "DEBUG"),
        ],
    );
    let mut client = sink.client("sensors").await;
    client.send_sensor_values(first).await.expect("first");
    client.send_sensor_values(second).await.expect("second");
    let refused = client
        .send_sensor_values(request("large", 40))
        .await
        .expect_err("RATE_PER_SECOND is the burst too");
    assert!(refused.message().contains("can never pass"), "{refused:?}");
    let out = sink.path("var/log/sink/telemetry-sink.log.json");
    // BUFFER_SIZE = 3: two batch lines before any shutdown.
    assert!(wait_for_lines(&out, 2), "nothing at {}", out.display());
    sink.stop();
    let lines = json_lines(&out);
    assert_eq!(lines.len(), 2);
    let mut names = Vec::new();
    for line in &lines {
        assert_eq!(line["msg"], "sensor values batch received");
        assert_eq!(line["messageCount"], 3);
        for value in line["values"].as_array().expect("values") {
            names.push(value["sensor_name"].as_str().expect("name").to_string());
        }
    }
    let expected: Vec<String> = (0..6).map(|i| format!("env{i}")).collect();
    assert_each_once(&names, &expected);
}

#[test]
fn original_env_takes_the_original_log_levels_and_empty_values() {
    let text = std::fs::read_to_string(pipelines_dir().join("original-env.toml")).expect("read");
    for level in ["debug", "INFO", "warn", "error", "dpanic", "panic", "FATAL"] {
        let run = run_sink(&text, &["validate"], &[("LOGGER_MIN_LOG_LEVEL", level)]);
        assert!(run.status.success(), "{level}: {}", run.stderr);
    }
    // `BUFFER_SIZE=` in an env file keeps the default.
    let empty: Vec<(&str, &str)> = ORIGINAL_VARS.iter().map(|var| (*var, "")).collect();
    let run = run_sink(&text, &["validate"], &empty);
    assert!(run.status.success(), "{}", run.stderr);
}

#[tokio::test]
async fn the_default_pipeline_reads_the_original_variables() {
    let text = std::fs::read_to_string(pipelines_dir().join("default.toml")).expect("read");
    let mut sink = SinkProcess::start_env(
        &text,
        &[
            ("GRPC_SERVER_SOCKET", "127.0.0.1:0"),
            ("FILE_PATH", "data/out"),
            ("BUFFER_SIZE", "2"),
            ("BUFFER_FLUSH_INTERVAL", "1h"),
            ("LOGGER_MIN_LOG_LEVEL", "debug"),
        ],
    );
    let mut client = sink.client("sensors").await;
    client
        .send_sensor_values(request("default", 2))
        .await
        .expect("send");
    // BUFFER_SIZE = 2 flushes at once, long before the hour.
    let out = sink.path("data/out/telemetry-sink.log.json");
    assert!(wait_for_lines(&out, 2), "nothing at {}", out.display());
    assert!(sink.log_text().contains("DEBUG"), "{}", sink.log_text());
    sink.stop();
    assert_each_once(
        &sensor_names(&out),
        &["default0".to_string(), "default1".to_string()],
    );
}

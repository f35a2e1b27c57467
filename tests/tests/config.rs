//! Every mistake in a pipeline file is refused before anything starts, with a
//! message naming the file, the stage and the key, exit code 2 and no panic;
//! `${VAR}` substitution; what a json_file path does at startup.

use sink_e2e::*;

/// grpc -> buffered (with `buffer` keys) -> json_file (with `file` keys).
fn pipeline(buffer: &str, file: &str) -> String {
    [
        grpc("sensors", ""),
        buffered("batch", &["sensors"], buffer),
        stage("sinks", "file", "json_file", &["batch"], file),
    ]
    .concat()
}

#[test]
fn an_unknown_type_lists_the_known_ones() {
    let text = pipeline("", "path = \"out.json\"").replace("\"buffered\"", "\"bufferd\"");
    let error = assert_refused(
        &text,
        &[],
        &["stage `processors.batch`", "key `type`", "`bufferd`"],
    );
    assert!(error.contains("known processor types"), "{error}");
    assert!(error.contains("did you mean `buffered`"), "{error}");
    assert!(!error.contains("names no stage"), "a cascade: {error}");
}

#[test]
fn an_unknown_key_suggests_the_near_one() {
    assert_refused(
        &pipeline("max_event = 5", "path = \"out.json\""),
        &[],
        &[
            "stage `processors.batch`",
            "key `max_event`",
            "did you mean `max_events`",
        ],
    );
}

#[test]
fn a_misspelt_nested_key_is_named_with_its_table() {
    let text = [
        grpc(
            "sensors",
            "rate_limit = { bytes_per_second = 5, brust_bytes = 5 }",
        ),
        json_file("file", &["sensors"], "out.json", ""),
    ]
    .concat();
    assert_refused(
        &text,
        &[],
        &[
            "stage `sources.sensors`",
            "key `rate_limit.brust_bytes`",
            "did you mean `burst_bytes`",
        ],
    );
}

#[test]
fn a_misspelt_runtime_key_suggests_it() {
    let text = [
        grpc("sensors", ""),
        stage(
            "sinks",
            "file",
            "json_file",
            &[],
            "input = [\"sensors\"]\npath = \"out.json\"",
        ),
    ]
    .concat();
    assert_refused(
        &text,
        &[],
        &["stage `sinks.file`", "key `input`", "did you mean `inputs`"],
    );
}

#[test]
fn a_misspelt_settings_key_suggests_the_near_one() {
    let text = format!(
        "[settings]\nlog_lvl = \"info\"\n{}",
        pipeline("", "path = \"out.json\"")
    );
    assert_refused(
        &text,
        &[],
        &["key `settings.log_lvl`", "did you mean `log_level`"],
    );
}

#[test]
fn a_value_of_the_wrong_type_names_its_key_on_one_line() {
    let error = assert_refused(
        &pipeline("max_events = \"ten\"", "path = \"out.json\""),
        &[],
        &[
            "stage `processors.batch`",
            "key `max_events`",
            "invalid type: string \"ten\"",
        ],
    );
    assert!(!error.contains("in `"), "serde's key trail leaked: {error}");
}

#[test]
fn an_unknown_layout_is_a_bad_value_not_an_unknown_type() {
    let error = assert_refused(
        &pipeline("", "path = \"out.json\"\nlayout = \"lines\""),
        &[],
        &[
            "stage `sinks.file`",
            "key `layout`",
            "`lines`",
            "`value`",
            "`batch`",
        ],
    );
    assert!(!error.contains("unknown sink type"), "{error}");
}

#[test]
fn a_bad_duration_names_its_key() {
    assert_refused(
        &pipeline("flush_interval = \"10 parsecs\"", "path = \"out.json\""),
        &[],
        &[
            "stage `processors.batch`",
            "key `flush_interval`",
            "10 parsecs",
            "duration",
        ],
    );
    let text = format!(
        "[settings]\nshutdown_timeout = \"soon\"\n{}",
        pipeline("", "path = \"out.json\"")
    );
    assert_refused(&text, &[], &["key `settings.shutdown_timeout`", "duration"]);
}

#[test]
fn a_missing_required_key_is_named() {
    assert_refused(
        &pipeline("", ""),
        &[],
        &["stage `sinks.file`", "key `path`", "required"],
    );
}

#[test]
fn an_input_naming_no_stage_suggests_the_near_one() {
    let text = [
        grpc("sensors", ""),
        json_file("file", &["sensor"], "out.json", ""),
    ]
    .concat();
    assert_refused(
        &text,
        &[],
        &[
            "stage `sinks.file`",
            "key `inputs`",
            "`sensor` names no stage",
            "did you mean `sensors`",
        ],
    );
}

#[test]
fn a_cycle_is_named_with_its_stages() {
    let text = [
        grpc("sensors", ""),
        buffered("a", &["sensors", "b"], ""),
        buffered("b", &["a"], ""),
        json_file("file", &["b"], "out.json", ""),
    ]
    .concat();
    assert_refused(&text, &[], &["key `inputs`", "cycle", "a <- b <- a"]);
}

#[test]
fn a_sink_nobody_feeds_is_named() {
    let text = [
        grpc("sensors", ""),
        json_file("file", &["sensors"], "out.json", ""),
        stdout_sink("lonely", &[], ""),
    ]
    .concat();
    assert_refused(
        &text,
        &[],
        &[
            "stage `sinks.lonely`",
            "key `inputs`",
            "no stage feeds this sink",
        ],
    );
}

#[test]
fn a_source_with_inputs_is_named() {
    let text = [
        stage(
            "sources",
            "sensors",
            "grpc",
            &["file"],
            "address = \"127.0.0.1:0\"",
        ),
        json_file("file", &["sensors"], "out.json", ""),
    ]
    .concat();
    assert_refused(
        &text,
        &[],
        &[
            "stage `sources.sensors`",
            "key `inputs`",
            "a source takes no inputs",
        ],
    );
}

#[test]
fn an_unset_variable_is_named_with_its_stage_and_key() {
    let text = pipeline("", "path = \"${SINK_TEST_UNSET_DIR}/out.json\"");
    assert_refused(
        &text,
        &[],
        &[
            "stage `sinks.file`",
            "key `path`",
            "`SINK_TEST_UNSET_DIR` is not set",
        ],
    );
}

#[test]
fn a_toml_syntax_error_names_the_file_and_line() {
    let run = run_sink("[sources.sensors\ntype = \"grpc\"\n", &["validate"], &[]);
    assert_eq!(run.status.code(), Some(2), "{}", run.stderr);
    assert!(run.stderr.contains("pipeline.toml"), "{}", run.stderr);
    assert!(run.stderr.contains("line 1"), "{}", run.stderr);
    assert!(!run.stderr.contains("panicked"), "{}", run.stderr);
}

#[test]
fn every_mistake_of_a_file_is_reported_at_once() {
    let text = [
        grpc("sensors", "max_message_bytes = \"big\""),
        buffered("batch", &["sensors"], "max_evnts = 1"),
        json_file("file", &["batch", "nowhere"], "out.json", ""),
    ]
    .concat();
    let run = run_sink(&text, &["validate"], &[]);
    assert_eq!(run.status.code(), Some(2));
    for needle in [
        "key `max_message_bytes`",
        "key `max_evnts`",
        "`nowhere` names no stage",
    ] {
        assert!(run.stderr.contains(needle), "no {needle}:\n{}", run.stderr);
    }
    assert_eq!(
        run.stderr
            .lines()
            .filter(|l| l.starts_with("error:"))
            .count(),
        3,
        "one error per mistake, no cascades:\n{}",
        run.stderr
    );
}

#[test]
fn a_valid_file_validates_with_exit_zero() {
    let run = run_sink(&pipeline("", "path = \"out.json\""), &["validate"], &[]);
    assert!(run.status.success(), "{}", run.stderr);
    assert!(run.stdout.contains("valid, 3 stages"), "{}", run.stdout);
    assert!(
        !run.dir.path().join("out.json").exists(),
        "validate wrote output"
    );
}

#[tokio::test]
async fn variables_and_defaults_are_substituted() {
    let text = [
        grpc("sensors", ""),
        buffered("batch", &["sensors"], "max_events = ${SINK_TEST_BATCH:-1}"),
        json_file(
            "file",
            &["batch"],
            "${SINK_TEST_DIR}/${SINK_TEST_NAME:-default.json}",
            "",
        ),
    ]
    .concat();
    // An empty variable takes its default, as in the shell.
    let mut sink = SinkProcess::start_env(
        &text,
        &[("SINK_TEST_DIR", "from-env"), ("SINK_TEST_NAME", "")],
    );
    let mut client = sink.client("sensors").await;
    let sent = send_all(&mut client, "v", 1, 1).await;
    // max_events defaulted to 1: the reading is written without shutdown.
    let out = sink.path("from-env/default.json");
    assert!(wait_for_lines(&out, 1), "nothing at {}", out.display());
    sink.stop();
    assert_each_once(&sensor_names(&out), &sent);
}

#[test]
fn a_json_file_path_that_cannot_be_opened_fails_at_startup_naming_path_and_reason() {
    // A directory cannot be appended to; a FIFO must not hang the start.
    for (name, reason) in [
        ("a-directory", "it is a directory"),
        ("a-fifo", "it is a FIFO (named pipe)"),
    ] {
        let text = pipeline("", &format!("path = \"{name}\""));
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("pipeline.toml"), &text).expect("write");
        if name == "a-directory" {
            std::fs::create_dir(dir.path().join(name)).expect("mkdir");
        } else {
            let made = std::process::Command::new("mkfifo")
                .arg(dir.path().join(name))
                .status()
                .expect("mkfifo");
            assert!(made.success());
        }
        let run = run_in(dir, &[], &[]);
        assert_eq!(run.status.code(), Some(2), "{}", run.stderr);
        let error = run
            .stderr
            .lines()
            .find(|line| line.contains("stage `sinks.file`") && line.contains("key `path`"))
            .unwrap_or_else(|| panic!("no error naming the stage:\n{}", run.stderr));
        assert!(error.contains(name), "{error}");
        assert!(error.contains(reason), "no reason: {error}");
        assert!(!run.stderr.contains("pipeline running"), "{}", run.stderr);
        assert!(
            !run.stderr.contains("listening on"),
            "claims to listen though it never serves:\n{}",
            run.stderr
        );
    }
}

#[tokio::test]
async fn json_file_creates_missing_parent_directories() {
    let mut sink = SinkProcess::start(&pipeline("max_events = 1", "path = \"a/b/c/out.json\""));
    let mut client = sink.client("sensors").await;
    let sent = send_all(&mut client, "p", 2, 2).await;
    sink.stop();
    assert_each_once(&sensor_names(&sink.path("a/b/c/out.json")), &sent);
}

#[test]
fn a_duplicate_id_is_named_without_guesses_about_the_graph() {
    let text = [grpc("x", ""), stdout_sink("x", &["x"], "")].concat();
    let run = run_sink(&text, &["validate"], &[]);
    assert_eq!(run.status.code(), Some(2), "{}", run.stderr);
    let errors: Vec<&str> = run
        .stderr
        .lines()
        .filter(|l| l.starts_with("error:"))
        .collect();
    assert_eq!(errors.len(), 1, "{}", run.stderr);
    assert!(errors[0].contains("stage `sinks.x`"), "{}", errors[0]);
    assert!(
        errors[0].contains("`sources.x`") && errors[0].contains("unique"),
        "{}",
        errors[0]
    );
}

#[test]
fn channel_capacities_must_be_in_range_and_sources_have_none() {
    for (global, own) in [("0", "0"), ("4000000000000000000", "2000000")] {
        let text = format!(
            "[settings]\nchannel_capacity = {global}\n{}",
            [
                grpc("sensors", "capacity = 5"),
                stage(
                    "sinks",
                    "file",
                    "stdout",
                    &["sensors"],
                    &format!("capacity = {own}")
                ),
            ]
            .concat()
        );
        for needles in [
            &["key `settings.channel_capacity`", "from 1 to 1048576"][..],
            &[
                "stage `sources.sensors`",
                "key `capacity`",
                "a source has no input channel",
            ][..],
            &["stage `sinks.file`", "key `capacity`", "from 1 to 1048576"][..],
        ] {
            assert_refused(&text, &[], needles);
        }
    }
}

#[test]
fn an_empty_file_says_what_is_missing() {
    let run = run_sink("", &["validate"], &[]);
    assert_eq!(run.status.code(), Some(2));
    assert!(
        run.stderr.contains("no source is declared"),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("no sink is declared"), "{}", run.stderr);
}

#[test]
fn an_address_in_use_fails_at_startup_naming_stage_and_key() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let address = taken.local_addr().expect("address");
    let text = [
        stage(
            "sources",
            "sensors",
            "grpc",
            &[],
            &format!("address = \"{address}\""),
        ),
        json_file("file", &["sensors"], "out.json", ""),
    ]
    .concat();
    let run = run_sink(&text, &[], &[]);
    assert_eq!(run.status.code(), Some(2), "{}", run.stderr);
    let error = run
        .stderr
        .lines()
        .find(|l| l.contains("stage `sources.sensors`") && l.contains("key `address`"))
        .unwrap_or_else(|| panic!("{}", run.stderr));
    assert!(error.contains("in use"), "no OS reason: {error}");
}

#[test]
fn every_bad_settings_key_is_reported_not_only_the_first() {
    let text = format!(
        "[settings]\nlog_level = \"loud\"\nshutdown_timeout = 5\nchanel_capacity = 3\n{}",
        [grpc("sensors", ""), stdout_sink("out", &["sensors"], "")].concat()
    );
    let run = run_sink(&text, &["validate"], &[]);
    assert_eq!(run.status.code(), Some(2), "{}", run.stderr);
    for key in [
        "key `settings.log_level`",
        "key `settings.shutdown_timeout`",
        "key `settings.chanel_capacity`",
    ] {
        assert!(run.stderr.contains(key), "{key} missing:\n{}", run.stderr);
    }
    assert!(
        run.stderr.contains("did you mean `channel_capacity`"),
        "{}",
        run.stderr
    );
}

#[test]
fn a_zero_shutdown_timeout_is_refused() {
    // With no time to drain, every shutdown would exit 1 saying "0 lost".
    let text = format!(
        "[settings]\nshutdown_timeout = \"0s\"\n{}",
        pipeline("", "path = \"out.json\"")
    );
    assert_refused(
        &text,
        &[],
        &["key `settings.shutdown_timeout`", "must be more than 0s"],
    );
}

#[test]
fn describe_cuts_and_escapes_the_name_it_echoes() {
    let name = format!("\x1b[31mred\x1b[0m{}", "x".repeat(100_000));
    let output = std::process::Command::new(sink_binary())
        .args(["describe", &name])
        .output()
        .expect("run sink describe");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.len() < 2000, "{} bytes echoed", stderr.len());
    assert!(
        !stderr.contains('\x1b'),
        "raw escape codes echoed: {stderr:?}"
    );
    assert!(stderr.contains(r"\u{1b}[31mred"), "{stderr}");
    assert!(stderr.contains("more characters"), "{stderr}");
}

#[test]
fn two_file_sinks_on_one_file_are_refused_however_it_is_spelt() {
    for (first, second) in [("x.json", "./x.json"), ("x.json", "sub/../x.json")] {
        let text = [
            grpc("sensors", ""),
            json_file("one", &["sensors"], first, ""),
            json_file("two", &["sensors"], second, ""),
        ]
        .concat();
        let error = assert_refused(
            &text,
            &[],
            &[
                "stage `sinks.two`",
                "key `path`",
                "two sinks cannot share a file",
            ],
        );
        assert!(error.contains("sinks.one"), "{error}");
    }
}

//! The `sink-custom` distribution end to end: its real binary runs the custom
//! stages beside the built-in ones over real gRPC, lists them, and plain
//! `sink`, which does not link them, refuses them with a pointer to the
//! stage author's guide (docs/stage-authors.md), whose code it checks.

use std::path::Path;
use std::process::{Command, Output};

use sink_e2e::{SinkProcess, request, sensor_names, sink_binary, wait_for_lines};
use sink_example_csv::HEADER;

/// The binary this package builds.
fn sink_custom() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_sink-custom"))
}

/// grpc -> filter -> csv_file and json_file; `{sensors}` is the filter's globs.
fn pipeline(sensors: &str) -> String {
    format!(
        r#"
[sources.sensors]
type = "grpc"
address = "127.0.0.1:0"

[processors.hot]
type = "filter"
inputs = ["sensors"]
sensors = {sensors}
exclude = ["*-7"]
min = 3

[sinks.table]
type = "csv_file"
inputs = ["hot"]
path = "out/readings.csv"

[sinks.file]
type = "json_file"
inputs = ["hot"]
path = "out.json"
"#
    )
}

/// The sensor names in a `csv_file` output, after checking its one header.
fn csv_names(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some(HEADER.trim_end()), "{text}");
    lines
        .map(|row| row.split(',').next().unwrap_or_default().to_string())
        .collect()
}

/// Runs `binary` with `args` in `dir` and returns what it did.
fn run(binary: &Path, args: &[&str], dir: &Path) -> Output {
    Command::new(binary)
        .args(args)
        .current_dir(dir)
        .output()
        .expect("binary runs")
}

fn names(prefix: &str, range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("{prefix}{i}")).collect()
}

#[tokio::test]
async fn custom_stages_run_beside_built_in_ones_over_grpc() {
    let mut sink = SinkProcess::start_with(sink_custom(), &pipeline(r#"["keep-*"]"#), &[], &[]);
    let mut client = sink.client("sensors").await;
    for prefix in ["keep-", "drop-", "keep-"] {
        client
            .send_sensor_values(request(prefix, 10))
            .await
            .expect("send");
    }
    // Everything a client got OK for is written by the time the process exits.
    sink.stop();
    let kept: Vec<String> = names("keep-", 3..10)
        .into_iter()
        .filter(|name| name != "keep-7")
        .collect();
    let expected = [kept.clone(), kept].concat();
    assert_eq!(csv_names(&sink.path("out/readings.csv")), expected);
    assert_eq!(sensor_names(&sink.path("out.json")), expected);
}

#[tokio::test]
async fn filter_params_reload_live() {
    let mut sink = SinkProcess::start_with(sink_custom(), &pipeline(r#"["keep-*"]"#), &[], &[]);
    let mut client = sink.client("sensors").await;
    client
        .send_sensor_values(request("keep-", 5))
        .await
        .expect("send");
    let csv = sink.path("out/readings.csv");
    // Header and keep-3, keep-4: the first batch has gone through.
    assert!(wait_for_lines(&csv, 3), "first batch not written");

    std::fs::write(sink.path("pipeline.toml"), pipeline(r#"["new-*"]"#)).expect("edit");
    assert!(
        sink.wait_log("reload applied"),
        "no reload; log:\n{}",
        sink.log_text()
    );
    for prefix in ["keep-", "new-"] {
        client
            .send_sensor_values(request(prefix, 5))
            .await
            .expect("send");
    }
    sink.stop();
    let expected = [names("keep-", 3..5), names("new-", 3..5)].concat();
    assert_eq!(csv_names(&csv), expected);
    assert_eq!(sensor_names(&sink.path("out.json")), expected);
}

#[test]
fn list_shows_the_custom_types_only_in_the_distribution() {
    let dir = tempfile_dir();
    let custom = run(sink_custom(), &["list"], dir.path());
    assert!(custom.status.success());
    let custom = String::from_utf8_lossy(&custom.stdout);
    let row = |kind: &str, name: &str| {
        custom
            .lines()
            .find(|line| line.split_whitespace().take(2).eq([kind, name]))
            .unwrap_or_else(|| panic!("no {kind} {name} in:\n{custom}"))
            .to_string()
    };
    assert!(row("processor", "filter").contains("sink-example-filter"));
    assert!(row("processor", "scale").contains("sink-example-scale"));
    assert!(row("sink", "csv_file").contains("sink-example-csv"));
    // The built-in types are all there too.
    for built_in in ["grpc", "buffered", "json_file", "stdout"] {
        assert!(custom.contains(built_in), "{built_in} missing:\n{custom}");
    }

    let plain = run(&sink_binary(), &["list"], dir.path());
    assert!(plain.status.success());
    let plain = String::from_utf8_lossy(&plain.stdout);
    assert!(plain.contains("json_file"), "{plain}");
    assert!(
        !plain.contains("filter") && !plain.contains("csv_file"),
        "{plain}"
    );
    assert!(
        !plain
            .lines()
            .any(|line| line.split_whitespace().nth(1) == Some("scale")),
        "{plain}"
    );
}

#[test]
fn describe_shows_the_filter_keys_as_live() {
    let dir = tempfile_dir();
    let out = run(sink_custom(), &["describe", "filter"], dir.path());
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for key in ["sensors", "exclude", "min", "max", "missing_value"] {
        assert!(text.contains(key), "{key} missing:\n{text}");
    }
    assert!(text.contains("type = \"filter\""), "no snippet:\n{text}");
    assert!(
        !text.contains("restart"),
        "every filter key is live:\n{text}"
    );
}

#[test]
fn describe_says_required_for_a_key_without_default() {
    let dir = tempfile_dir();
    for (name, key) in [
        ("scale", "factor (integer, "),
        ("csv_file", "path (string, "),
    ] {
        let out = run(sink_custom(), &["describe", name], dir.path());
        assert!(out.status.success());
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains(&format!("{key}required, live)")),
            "{name}:\n{text}"
        );
        assert!(!text.contains("default required"), "{name}:\n{text}");
    }
}

#[test]
fn plain_sink_refuses_a_custom_type_and_points_at_the_guide() {
    let dir = tempfile_dir();
    std::fs::write(dir.path().join("pipeline.toml"), pipeline(r#"["*"]"#)).expect("write");
    let out = run(
        &sink_binary(),
        &["validate", "--pipeline", "pipeline.toml"],
        dir.path(),
    );
    assert_eq!(out.status.code(), Some(2));
    let errors = String::from_utf8_lossy(&out.stderr);
    assert!(errors.contains("`filter`"), "{errors}");
    assert!(errors.contains("\"Linking a stage crate\""), "{errors}");
    // ...and the distribution that links the crates takes the same file.
    let out = run(
        sink_custom(),
        &["validate", "--pipeline", "pipeline.toml"],
        dir.path(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The stage author's guide, and the files its walkthrough quotes.
/// `include_str!` makes cargo rebuild this test whenever one of them changes.
const GUIDE: &str = include_str!("../../../docs/stage-authors.md");
const QUOTED_FILES: [(&str, &str); 13] = [
    ("Cargo.toml", include_str!("../../../Cargo.toml")),
    (
        "examples/scale-processor/Cargo.toml",
        include_str!("../../scale-processor/Cargo.toml"),
    ),
    (
        "examples/scale-processor/src/lib.rs",
        include_str!("../../scale-processor/src/lib.rs"),
    ),
    (
        "examples/outside-workspace/Cargo.toml",
        include_str!("../../outside-workspace/Cargo.toml"),
    ),
    (
        "examples/filter-processor/Cargo.toml",
        include_str!("../../filter-processor/Cargo.toml"),
    ),
    (
        "examples/filter-processor/src/lib.rs",
        include_str!("../../filter-processor/src/lib.rs"),
    ),
    (
        "examples/csv-sink/Cargo.toml",
        include_str!("../../csv-sink/Cargo.toml"),
    ),
    (
        "examples/csv-sink/src/lib.rs",
        include_str!("../../csv-sink/src/lib.rs"),
    ),
    (
        "examples/distribution/Cargo.toml",
        include_str!("../Cargo.toml"),
    ),
    (
        "examples/distribution/src/main.rs",
        include_str!("../src/main.rs"),
    ),
    (
        "pipelines/custom.toml",
        include_str!("../../../pipelines/custom.toml"),
    ),
    (
        "examples/outside-distribution/Cargo.toml",
        include_str!("../../outside-distribution/Cargo.toml"),
    ),
    (
        "examples/outside-distribution/src/main.rs",
        include_str!("../../outside-distribution/src/main.rs"),
    ),
];

/// The guide's walkthrough: all of it before "Migrating from 0.1", whose
/// examples show the old API next to the new.
fn walkthrough() -> &'static str {
    let end = GUIDE.find("\n## Migrating from 0.1").unwrap_or(GUIDE.len());
    &GUIDE[..end]
}

/// The fenced blocks of `text` in `language`.
fn code_blocks<'a>(text: &'a str, language: &str) -> Vec<&'a str> {
    let fence = format!("```{language}\n");
    text.split(fence.as_str())
        .skip(1)
        .filter_map(|after| after.split("```\n").next())
        .collect()
}

#[test]
fn the_guide_has_the_section_the_error_names() {
    assert!(
        walkthrough()
            .lines()
            .any(|line| line == "## Linking a stage crate")
    );
}

#[test]
fn the_walkthrough_quotes_the_example_code_exactly() {
    let blocks = [
        code_blocks(walkthrough(), "rust"),
        code_blocks(walkthrough(), "toml"),
    ]
    .concat();
    assert!(
        blocks.len() >= 8,
        "the walkthrough lost its code: {blocks:?}"
    );
    for block in blocks {
        assert!(
            QUOTED_FILES.iter().any(|(_, text)| text.contains(block)),
            "this block of docs/stage-authors.md is in none of {:?}; update it from the file:\n{block}",
            QUOTED_FILES.map(|(name, _)| name)
        );
    }
}

#[test]
fn the_guide_quotes_the_unknown_type_error_as_plain_sink_says_it() {
    let quoted = code_blocks(walkthrough(), "text")
        .into_iter()
        .find(|block| block.starts_with("error:"))
        .expect("the walkthrough quotes the error");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = run(
        &sink_binary(),
        &["validate", "--pipeline", "pipelines/custom.toml"],
        &root,
    );
    let errors = String::from_utf8_lossy(&out.stderr);
    assert!(
        errors.contains(quoted.trim_end()),
        "docs/stage-authors.md says:\n{quoted}\nsink says:\n{errors}"
    );
}

#[test]
fn the_custom_pipeline_file_is_valid_for_the_distribution() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = run(
        sink_custom(),
        &["validate", "--pipeline", "pipelines/custom.toml"],
        &root,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn tempfile_dir() -> tempfile::TempDir {
    tempfile::tempdir().expect("temp dir")
}

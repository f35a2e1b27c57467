//! The `json_file` sink alone, on real files.

use std::path::{Path, PathBuf};

use sink_api::SinkConfig;
use sink_api::json::Layout;
use sink_api::testkit::{Harness, check_sink, readings};
use sink_stages::sinks::json_file::{Compression, JsonFileConfig, Retain, Rotate};

fn config(path: &Path, layout: Layout) -> JsonFileConfig {
    JsonFileConfig {
        path: path.to_path_buf(),
        layout,
        fsync: false,
        rotate: None,
        retain: None,
        compression: Compression::None,
    }
}

/// Every line of the file at `path` as JSON (none if it does not exist);
/// panics on a line that is not valid JSON, such as half a line.
fn lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{line:?}: {e}")))
        .collect()
}

/// The sensor names of a file in either layout, in file order.
fn names(path: &Path) -> Vec<String> {
    let mut names = Vec::new();
    for line in lines(path) {
        let readings = match line.get("values") {
            Some(values) => values.as_array().expect("values").clone(),
            None => vec![line],
        };
        for reading in readings {
            names.push(reading["sensor_name"].as_str().expect("name").to_string());
        }
    }
    names
}

/// Polls `condition` every 5 ms, for at most 20 s.
async fn wait_for(mut condition: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !condition() {
        assert!(std::time::Instant::now() < deadline, "timed out");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn passes_the_sink_conformance_check_in_both_layouts() {
    let dir = tempfile::tempdir().expect("temp dir");
    for (layout, file) in [(Layout::Value, "value.json"), (Layout::Batch, "batch.json")] {
        let path = dir.path().join(file);
        check_sink(config(&path, layout), || names(&path)).await;
    }
}

#[tokio::test]
async fn fsync_on_writes_everything_too_and_can_be_turned_on_live() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("synced.json");
    let synced = JsonFileConfig {
        fsync: true,
        ..config(&path, Layout::Value)
    };
    check_sink(synced.clone(), || names(&path)).await;
    // Live: a reload that only turns fsync on keeps the same file.
    let other = dir.path().join("other.json");
    let stage = Harness::sink(config(&other, Layout::Value)).expect("builds");
    stage.send(readings("a", 0..2)).await;
    stage.update(JsonFileConfig {
        fsync: true,
        ..config(&other, Layout::Value)
    });
    stage.send(readings("b", 0..2)).await;
    stage.finish().await.expect("ends");
    assert_eq!(names(&other), ["a0", "a1", "b0", "b1"]);
}

#[tokio::test]
async fn the_batch_layout_writes_one_line_per_batch() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("out.json");
    let stage = Harness::sink(config(&path, Layout::Batch)).expect("builds");
    stage.send(readings("a", 0..3)).await;
    stage.send(readings("b", 0..5)).await;
    stage.finish().await.expect("ends");
    let counts: Vec<u64> = lines(&path)
        .iter()
        .map(|line| line["messageCount"].as_u64().expect("messageCount"))
        .collect();
    assert_eq!(counts, [3, 5]);
}

#[tokio::test]
async fn an_empty_batch_writes_nothing() {
    let dir = tempfile::tempdir().expect("temp dir");
    for layout in [Layout::Value, Layout::Batch] {
        let path = dir.path().join(format!("{layout:?}.json"));
        let stage = Harness::sink(config(&path, layout)).expect("builds");
        stage.send(Vec::new()).await;
        stage.finish().await.expect("ends");
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "");
    }
}

#[tokio::test]
async fn appends_to_an_existing_file_and_creates_parent_directories() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("x/y/out.json");
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    std::fs::write(&path, "{\"sensor_name\":\"earlier\"}\n").expect("seed");
    let stage = Harness::sink(config(&path, Layout::Value)).expect("builds");
    stage.send(readings("n", 0..2)).await;
    stage.finish().await.expect("ends");
    assert_eq!(names(&path), ["earlier", "n0", "n1"]);

    let fresh = dir.path().join("new/parents/out.json");
    let stage = Harness::sink(config(&fresh, Layout::Value)).expect("builds");
    stage.send(readings("p", 0..1)).await;
    stage.finish().await.expect("ends");
    assert_eq!(names(&fresh), ["p0"]);
}

#[test]
fn a_path_that_cannot_be_opened_fails_the_build_with_path_and_reason() {
    let dir = tempfile::tempdir().expect("temp dir");
    // A regular file where a parent directory should be.
    std::fs::write(dir.path().join("blocker"), "").expect("write");
    let path = dir.path().join("blocker/out.json");
    let err = config(&path, Layout::Value)
        .build(&sink_api::BuildContext::new("file"))
        .err()
        .expect("cannot open");
    assert_eq!(err.key, "path");
    assert!(err.message.contains("blocker/out.json"), "{}", err.message);
    assert!(
        err.message.contains(&format!(
            "parent `{}` is not a directory",
            dir.path().join("blocker").display()
        )),
        "{}",
        err.message
    );
}

#[test]
fn an_empty_path_is_refused() {
    let err = config(&PathBuf::new(), Layout::Value)
        .validate()
        .expect_err("empty path");
    assert_eq!(err.key, "path");
}

#[tokio::test]
async fn a_new_path_on_reload_moves_writing_without_losing_or_splitting_a_line() {
    let dir = tempfile::tempdir().expect("temp dir");
    let first = dir.path().join("first.json");
    let second = dir.path().join("moved/second.json");
    let stage = Harness::sink(config(&first, Layout::Batch)).expect("builds");
    let mut sent = Vec::new();
    let mut batch_sizes = Vec::new();
    let mut send = |prefix: String, size: i64| {
        let batch = readings(&prefix, 0..size);
        sent.extend(batch.iter().map(|r| r.sensor_name.clone()));
        batch_sizes.push(size as u64);
        batch
    };
    for i in 0..5 {
        stage.send(send(format!("before{i}-"), 3 + i)).await;
    }
    wait_for(|| lines(&first).len() == 5).await;
    stage.update(config(&second, Layout::Batch));
    // The move happens between two batches; keep sending until it shows.
    for i in 0.. {
        stage.send(send(format!("after{i}-"), 1 + i % 4)).await;
        if !lines(&second).is_empty() {
            break;
        }
        assert!(i < 4_000, "writing never moved to the new path");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    stage.finish().await.expect("ends");
    assert!(
        !lines(&first).is_empty(),
        "nothing was written before the move"
    );
    // Each batch is one whole line in one of the two files.
    let mut sizes: Vec<u64> = [lines(&first), lines(&second)]
        .concat()
        .iter()
        .map(|line| line["messageCount"].as_u64().expect("count"))
        .collect();
    sizes.sort();
    batch_sizes.sort();
    assert_eq!(sizes, batch_sizes);
    let mut written = [names(&first), names(&second)].concat();
    written.sort();
    sent.sort();
    assert_eq!(written, sent, "readings lost or repeated across the move");
}

#[tokio::test]
async fn a_new_path_that_cannot_be_opened_keeps_the_old_one_until_it_can() {
    let dir = tempfile::tempdir().expect("temp dir");
    let old = dir.path().join("old.json");
    let blocker = dir.path().join("blocked");
    let new = blocker.join("new.json");
    let stage = Harness::sink(config(&old, Layout::Value)).expect("builds");
    stage.send(readings("a", 0..3)).await;
    wait_for(|| lines(&old).len() == 3).await;

    // `blocked` is a file, so `blocked/new.json` cannot be created; the
    // layout in the same reload still applies.
    std::fs::write(&blocker, "").expect("blocker");
    stage.update(config(&new, Layout::Batch));
    stage.send(readings("b", 0..2)).await;
    wait_for(|| lines(&old).len() == 4).await;
    assert_eq!(
        lines(&old)[3]["messageCount"],
        2,
        "the new layout was not applied"
    );

    // Once the path can be opened, the next batch goes there.
    std::fs::remove_file(&blocker).expect("unblock");
    stage.send(readings("c", 0..4)).await;
    stage.finish().await.expect("ends cleanly");
    assert_eq!(names(&new), ["c0", "c1", "c2", "c3"]);
    assert_eq!(names(&old).len(), 5);
}

fn rotating(path: &Path, rotate: Rotate, compression: Compression) -> JsonFileConfig {
    JsonFileConfig {
        rotate: Some(rotate),
        compression,
        ..config(path, Layout::Value)
    }
}

fn by_size(max_bytes: &str) -> Rotate {
    Rotate {
        max_bytes: Some(max_bytes.parse().expect("size")),
        every: None,
    }
}

/// The files in `dir` by name, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("list")
        .map(|entry| {
            entry
                .expect("entry")
                .file_name()
                .into_string()
                .expect("utf-8")
        })
        .collect();
    names.sort();
    names
}

/// The text of a file, decompressed by its extension.
fn decompressed(path: &Path) -> String {
    use std::io::Read;
    let file = std::fs::File::open(path).expect("open");
    let mut text = String::new();
    let name = path.to_string_lossy();
    if name.ends_with(".zst") {
        zstd::stream::read::Decoder::new(file)
            .expect("zstd")
            .read_to_string(&mut text)
    } else if name.ends_with(".gz") {
        flate2::read::GzDecoder::new(file).read_to_string(&mut text)
    } else {
        std::io::BufReader::new(file).read_to_string(&mut text)
    }
    .expect("read");
    text
}

/// Sensor names of every line of every file in `dir` (rotated ones first,
/// in name order, then the active `active`), checking that each line parses.
fn names_across(dir: &Path, active: &str) -> Vec<String> {
    let mut files: Vec<String> = listing(dir).into_iter().filter(|n| n != active).collect();
    files.push(active.to_string());
    let mut names = Vec::new();
    for file in files {
        for line in decompressed(&dir.join(&file)).lines() {
            let value: serde_json::Value =
                serde_json::from_str(line).unwrap_or_else(|e| panic!("{file}: {line:?}: {e}"));
            names.push(value["sensor_name"].as_str().expect("name").to_string());
        }
    }
    names
}

/// Whether the background compression is done: no uncompressed rotated
/// file and no temporary file left.
fn compressed_all(dir: &Path, active: &str) -> bool {
    listing(dir)
        .iter()
        .all(|n| n == active || n.ends_with(".zst") || n.ends_with(".gz"))
}

#[tokio::test]
async fn size_rotation_keeps_every_reading_once_within_one_batch_of_the_limit() {
    for compression in [Compression::None, Compression::Zstd, Compression::Gzip] {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("out.json");
        let stage = Harness::sink(rotating(&path, by_size("4KiB"), compression)).expect("builds");
        let mut sent = Vec::new();
        for i in 0..60 {
            let batch = readings(&format!("b{i}-"), 0..(1 + i % 7));
            sent.extend(batch.iter().map(|r| r.sensor_name.clone()));
            stage.send(batch).await;
        }
        stage.finish().await.expect("ends");
        if compression != Compression::None {
            wait_for(|| compressed_all(dir.path(), "out.json")).await;
        }
        let files = listing(dir.path());
        assert!(files.len() > 5, "{files:?}");
        // Rotated names sort in time order, and hold the readings in order.
        assert_eq!(
            names_across(dir.path(), "out.json"),
            sent,
            "{compression:?}"
        );
        // One batch of at most 7 readings is about 1 KB: no file goes further
        // past the limit.
        for file in files.iter().filter(|n| *n != "out.json") {
            let size = decompressed(&dir.path().join(file)).len();
            assert!(
                (4096..4096 + 7 * 150).contains(&size),
                "{file}: {size} bytes"
            );
        }
    }
}

#[tokio::test]
async fn time_rotation_names_files_on_the_interval_boundary() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("out.json");
    let every = Rotate {
        max_bytes: None,
        every: Some(std::time::Duration::from_secs(1)),
    };
    let stage = Harness::sink(rotating(&path, every, Compression::None)).expect("builds");
    let mut sent = Vec::new();
    let start = std::time::Instant::now();
    let mut i = 0;
    while start.elapsed() < std::time::Duration::from_millis(2_500) {
        let batch = readings(&format!("t{i}-"), 0..2);
        sent.extend(batch.iter().map(|r| r.sensor_name.clone()));
        stage.send(batch).await;
        i += 1;
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // With no batch coming, the last period's file is rotated on time too.
    wait_for(|| std::fs::metadata(&path).is_ok_and(|m| m.len() == 0)).await;
    stage.finish().await.expect("ends");
    let rotated: Vec<String> = listing(dir.path())
        .into_iter()
        .filter(|n| n != "out.json")
        .collect();
    assert!(rotated.len() >= 2, "{rotated:?}");
    for name in &rotated {
        assert!(
            name.contains(".000Z"),
            "{name} is not on a second's boundary"
        );
    }
    assert_eq!(names_across(dir.path(), "out.json"), sent);
}

#[tokio::test]
async fn retention_keeps_the_newest_rotated_files() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("out.json");
    let config = JsonFileConfig {
        retain: Some(Retain {
            max_files: Some(3),
            max_age: None,
        }),
        ..rotating(&path, by_size("1KiB"), Compression::Zstd)
    };
    let stage = Harness::sink(config).expect("builds");
    let mut sent = Vec::new();
    for i in 0..40 {
        let batch = readings(&format!("r{i}-"), 0..5);
        sent.extend(batch.iter().map(|r| r.sensor_name.clone()));
        stage.send(batch).await;
    }
    stage.finish().await.expect("ends");
    wait_for(|| compressed_all(dir.path(), "out.json") && listing(dir.path()).len() == 4).await;
    // What is left is the newest readings, in order, with nothing missing
    // between them.
    let left = names_across(dir.path(), "out.json");
    assert!(!left.is_empty());
    assert_eq!(left, sent[sent.len() - left.len()..]);
}

#[tokio::test]
async fn reload_turns_rotation_on_changes_it_and_switches_compression() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("out.json");
    let stage = Harness::sink(config(&path, Layout::Value)).expect("builds");
    let mut sent = Vec::new();
    let steps = [
        None,
        Some(rotating(&path, by_size("2KiB"), Compression::None)),
        Some(rotating(&path, by_size("3KiB"), Compression::Gzip)),
        Some(rotating(&path, by_size("2KiB"), Compression::Zstd)),
    ];
    for (step, new) in steps.into_iter().enumerate() {
        if let Some(new) = new {
            let version = stage.update(new);
            assert!(
                stage
                    .applied(version, std::time::Duration::from_secs(10))
                    .await
            );
        }
        for i in 0..30 {
            let batch = readings(&format!("s{step}-{i}-"), 0..3);
            sent.extend(batch.iter().map(|r| r.sensor_name.clone()));
            stage.send(batch).await;
        }
    }
    stage.finish().await.expect("ends");
    // Files rotated before the switch to zstd are compressed with zstd too
    // (a pass compresses every uncompressed rotated file); gzip ones stay.
    wait_for(|| compressed_all(dir.path(), "out.json")).await;
    let files = listing(dir.path());
    assert!(files.iter().any(|n| n.ends_with(".zst")), "{files:?}");
    assert_eq!(names_across(dir.path(), "out.json"), sent);
}

#[tokio::test]
async fn a_partial_line_left_by_a_crash_is_removed_before_appending() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("out.json");
    std::fs::write(
        &path,
        "{\"sensor_name\":\"whole\"}\n{\"sensor_name\":\"cut\",\"received_at\":\"2026-12-0",
    )
    .expect("seed");
    let stage = Harness::sink(config(&path, Layout::Value)).expect("builds");
    stage.send(readings("n", 0..2)).await;
    stage.finish().await.expect("ends");
    // `names` panics on a line that does not parse.
    assert_eq!(names(&path), ["whole", "n0", "n1"]);
}

/// A FIFO, made with `mkfifo`.
fn fifo(path: &Path) {
    let made = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .expect("mkfifo runs");
    assert!(made.success());
}

#[tokio::test]
async fn a_fifo_or_a_directory_is_refused_at_start_and_on_reload() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pipe = dir.path().join("pipe.json");
    fifo(&pipe);
    for path in [pipe.as_path(), dir.path()] {
        let err = config(path, Layout::Value)
            .build(&sink_api::BuildContext::new("file"))
            .err()
            .expect("refused");
        assert_eq!(err.key, "path");
        assert!(err.message.contains("regular files"), "{}", err.message);
    }

    // On reload the old path is kept; nothing blocks.
    let old = dir.path().join("old.json");
    let stage = Harness::sink(config(&old, Layout::Value)).expect("builds");
    stage.send(readings("a", 0..2)).await;
    stage.update(config(&pipe, Layout::Value));
    stage.send(readings("b", 0..2)).await;
    tokio::time::timeout(std::time::Duration::from_secs(20), stage.finish())
        .await
        .expect("a FIFO must not block the sink")
        .expect("ends");
    assert_eq!(names(&old), ["a0", "a1", "b0", "b1"]);
}
